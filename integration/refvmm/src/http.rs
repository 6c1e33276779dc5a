//! A small HTTP/1.1 server and client over Unix sockets: one request per
//! connection (`Connection: close`), bodies up to 4 MiB (Cloud Hypervisor's
//! limit). Enough for Cloud Hypervisor's API style and its clients
//! (ch-remote, curl --unix-socket, clockcarry).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest body accepted, bytes.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Largest request head (request line and headers), bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without query.
    pub path: String,
    /// `None` when there was no body (or an empty one).
    pub body: Option<Vec<u8>>,
}

/// A response: status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
        }
    }

    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            body: Some(body),
        }
    }

    /// Cloud Hypervisor's error form: a JSON array of strings.
    pub fn error(status: u16, messages: &[String]) -> Response {
        let body = serde_json::to_string(messages).unwrap_or_else(|_| "[]".into());
        Response::json(status, body)
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            _ => "Unknown",
        }
    }

    /// Serialises the response (HTTP/1.1, `Connection: close`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: Cloud Hypervisor API\r\nConnection: close\r\n",
            self.status,
            self.reason()
        );
        match &self.body {
            Some(b) => {
                out.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                ));
            }
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        out.into_bytes()
    }
}

/// Why a request could not be read. Each maps to a response (or to none
/// when the peer is gone).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("body of {0} bytes exceeds the 4 MiB limit")]
    TooLarge(usize),
}

fn read_line_limited(r: &mut impl BufRead, budget: &mut usize) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(u64::try_from(*budget).unwrap_or(0) + 1)
        .read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(HttpError::Malformed("request head too long".into()));
    }
    *budget -= n;
    if !line.ends_with(b"\n") {
        return Err(HttpError::Malformed("connection closed mid-line".into()));
    }
    String::from_utf8(line).map_err(|_| HttpError::Malformed("non-UTF-8 head".into()))
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut r = BufReader::new(stream);
    let mut budget = MAX_HEAD_BYTES;
    let line = read_line_limited(&mut r, &mut budget)?;
    let mut parts = line.trim_end().split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(HttpError::Malformed(format!(
            "request line {:?}",
            line.trim_end()
        )));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Err(HttpError::Malformed(format!(
            "request line {:?}",
            line.trim_end()
        )));
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let mut content_length = 0usize;
    loop {
        let header = read_line_limited(&mut r, &mut budget)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(HttpError::Malformed(format!("header {header:?}")));
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            content_length = value
                .trim()
                .parse()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {:?}", value.trim())))?;
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed(
                "chunked bodies are not supported".into(),
            ));
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(HttpError::TooLarge(content_length));
    }
    let body = if content_length == 0 {
        None
    } else {
        let mut b = vec![0u8; content_length];
        r.read_exact(&mut b)?;
        Some(b)
    };
    Ok(Request {
        method: method.to_string(),
        path,
        body,
    })
}

/// What a client got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub body: String,
}

/// Sends one request over the Unix socket at `socket` and reads the answer.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<ClientResponse> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes())?;
    read_response(&mut s)
}

/// Parses a response (status line, headers, Content-Length body or to EOF).
pub fn read_response(stream: &mut impl Read) -> std::io::Result<ClientResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut length = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n.min(MAX_BODY_BYTES), 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.take(MAX_BODY_BYTES as u64).read_to_end(&mut body)?;
        }
    }
    Ok(ClientResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_put_with_body() {
        let raw = b"PUT /api/v1/vm.clock?x=1 HTTP/1.1\r\nHost: l\r\nContent-Length: 2\r\n\r\n{}";
        let req = read_request(&mut &raw[..]).expect("parses");
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/api/v1/vm.clock");
        assert_eq!(req.body.as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn refuses_bad_requests() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\n",
            b"",
        ] {
            assert!(read_request(&mut &raw[..]).is_err(), "{raw:?}");
        }
        let huge = b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n";
        assert!(matches!(
            read_request(&mut &huge[..]),
            Err(HttpError::TooLarge(_))
        ));
        let long = vec![b'a'; MAX_HEAD_BYTES + 10];
        assert!(read_request(&mut &long[..]).is_err());
    }

    #[test]
    fn response_round_trip() {
        let r = Response::error(500, &["Error from API".into(), "why".into()]);
        let back = read_response(&mut &r.to_bytes()[..]).expect("parses");
        assert_eq!(back.status, 500);
        assert_eq!(back.body, r#"["Error from API","why"]"#);
        let back = read_response(&mut &Response::no_content().to_bytes()[..]).expect("parses");
        assert_eq!((back.status, back.body.as_str()), (204, ""));
    }
}
