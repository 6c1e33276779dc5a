//! HTTP/1.1 over a Unix socket, one request per connection (`Connection:
//! close`), as Cloud Hypervisor's API and the reference VMM speak it. Raw on
//! purpose: the suite sends bodies no client would (malformed JSON, none at
//! all) and reads every answer as bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest answer read, headers and body, in bytes (Cloud Hypervisor's body
/// limit plus room for the headers).
const MAX_ANSWER_BYTES: usize = (4 << 20) + (64 << 10);

/// One answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as text, clipped for a one-line reason.
    pub fn body_text(&self) -> String {
        clip_text(&String::from_utf8_lossy(&self.body))
    }
}

/// At most 200 bytes of `s` on one line.
pub fn clip_text(s: &str) -> String {
    const MAX: usize = 200;
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= MAX {
        return one_line;
    }
    let mut end = MAX;
    while end > 0 && !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", one_line.get(..end).unwrap_or_default())
}

/// `method path` on `socket` with `body` (`None`: no body, `Content-Length:
/// 0`). Every failure is a sentence naming the socket and the stage.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(|e| format!("{}: cannot set timeouts: {e}", socket.display()))?;
    let bytes = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        bytes.len()
    );
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(bytes);
    stream
        .write_all(&out)
        .map_err(|e| format!("{method} {path}: sending the request failed: {e}"))?;
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(answer) = complete_answer(&got, method, path)? {
            return Ok(answer);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{method} {path}: no complete answer within {} ms",
                timeout.as_millis()
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => return finish_at_eof(&got, method, path),
            Ok(n) => {
                got.extend_from_slice(buf.get(..n).unwrap_or_default());
                if got.len() > MAX_ANSWER_BYTES {
                    return Err(format!(
                        "{method} {path}: the answer exceeds {MAX_ANSWER_BYTES} bytes"
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "{method} {path}: reading the answer failed after {} bytes: {e}",
                    got.len()
                ))
            }
        }
    }
}

struct Head {
    status: u16,
    /// Bytes of the status line and headers, the blank line included.
    len: usize,
    content_length: Option<usize>,
    chunked: bool,
}

fn parse_head(got: &[u8], method: &str, path: &str) -> Result<Option<Head>, String> {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(got.get(..end).unwrap_or_default()).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err(format!(
            "{method} {path}: not an HTTP/1.x status line: {:?}",
            clip_text(status_line)
        ));
    };
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| {
                format!(
                    "{method} {path}: Content-Length {:?} is not a number",
                    clip_text(value)
                )
            })?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    Ok(Some(Head {
        status,
        len: end + 4,
        content_length,
        chunked,
    }))
}

/// The answer once everything has arrived, `None` while more is expected.
fn complete_answer(got: &[u8], method: &str, path: &str) -> Result<Option<Answer>, String> {
    let Some(head) = parse_head(got, method, path)? else {
        return Ok(None);
    };
    let rest = got.get(head.len..).unwrap_or_default();
    if head.chunked {
        return Ok(dechunk(rest).map(|body| Answer {
            status: head.status,
            body,
        }));
    }
    if let Some(n) = head.content_length {
        return Ok((rest.len() >= n).then(|| Answer {
            status: head.status,
            body: rest.get(..n).unwrap_or_default().to_vec(),
        }));
    }
    if head.status == 204 || head.status == 304 || (100..200).contains(&head.status) {
        return Ok(Some(Answer {
            status: head.status,
            body: Vec::new(),
        }));
    }
    // No length: the body runs to the end of the connection.
    Ok(None)
}

fn finish_at_eof(got: &[u8], method: &str, path: &str) -> Result<Answer, String> {
    let Some(head) = parse_head(got, method, path)? else {
        return Err(format!(
            "{method} {path}: the VMM closed the connection after {} bytes, before a complete \
             status line and headers",
            got.len()
        ));
    };
    let rest = got.get(head.len..).unwrap_or_default();
    if head.chunked {
        return Err(format!(
            "{method} {path}: the connection closed inside a chunked body"
        ));
    }
    match head.content_length {
        Some(n) if rest.len() < n => Err(format!(
            "{method} {path}: the connection closed after {} of {n} body bytes",
            rest.len()
        )),
        _ => Ok(Answer {
            status: head.status,
            body: rest.to_vec(),
        }),
    }
}

/// A complete chunked body, decoded; `None` while incomplete or malformed
/// (the caller's end of connection reports it).
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(rest.get(..line_end)?).into_owned();
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        rest = rest.get(line_end + 2..)?;
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_chunks_and_bare_answers() {
        let a = complete_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            "GET",
            "/",
        )
        .unwrap()
        .unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, b"{}".as_slice()));
        assert!(complete_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}",
            "GET",
            "/"
        )
        .unwrap()
        .is_none());
        let c = complete_answer(
            b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n",
            "GET",
            "/",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.body, b"[]");
        let n = complete_answer(b"HTTP/1.1 204 No Content\r\n\r\n", "PUT", "/")
            .unwrap()
            .unwrap();
        assert!(n.body.is_empty());
        assert!(complete_answer(b"SSH-2.0\r\n\r\n", "GET", "/").is_err());
        assert!(finish_at_eof(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
            "GET",
            "/"
        )
        .is_err());
        assert_eq!(
            finish_at_eof(b"HTTP/1.0 200 OK\r\n\r\n{\"a\":1}", "GET", "/")
                .unwrap()
                .body,
            b"{\"a\":1}"
        );
    }

    #[test]
    fn clipping_is_one_line() {
        assert_eq!(clip_text("a\nb"), "a b");
        assert!(clip_text(&"é".repeat(300)).ends_with("..."));
    }
}
