//! HTTP/1.1 over a Unix socket, one request per connection (the VMM closes
//! it after the answer), and the request/response framing the proxy needs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest head or body read, bytes.
const MAX: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// One request; `Err` names what failed (connect, send, no answer).
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Answer, String> {
    crate::util::step(format!("{method} {path} on {}", socket.display()));
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: send: {e}"))?;
    let mut raw = Vec::new();
    s.take(MAX as u64)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{method} {path}: no answer: {e}"))?;
    let msg = parse_response(&raw)
        .ok_or_else(|| format!("{method} {path}: incomplete answer ({} bytes)", raw.len()))?;
    Ok(msg)
}

/// Where the head ends (index after `\r\n\r\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// A complete response (head and its Content-Length body), else `None`.
pub fn parse_response(raw: &[u8]) -> Option<Answer> {
    let end = head_end(raw)?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split(' ').nth(1)?.trim().parse().ok()?;
    let body = &raw[end..];
    let body = match content_length(head) {
        Some(n) if body.len() < n => return None,
        Some(n) => &body[..n],
        None => body,
    };
    Some(Answer {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// A whole request read from `s`: its bytes, method and path.
pub fn read_request(s: &mut UnixStream) -> Result<(Vec<u8>, String, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let end = loop {
        if let Some(e) = head_end(&buf) {
            break e;
        }
        if buf.len() > MAX {
            return Err("request head too large".into());
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed after {} bytes", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut words = head.split(' ');
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let want = end + content_length(&head).unwrap_or(0).min(MAX);
    while buf.len() < want {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed in the body after {} bytes", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((buf, method, path))
}
