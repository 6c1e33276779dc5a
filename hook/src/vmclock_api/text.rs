//! Error text from a VMM, clipped and made safe to print.

use serde_json::Value;

use super::reply::parse_put_failure;

/// Longest piece of a response quoted back in an error, in bytes.
const MAX_QUOTED_BYTES: usize = 300;

/// The error strings of a VMM error body: a JSON array of strings (Cloud
/// Hypervisor), a JSON string, or else the text itself (clipped).
pub fn error_messages(body: &[u8]) -> Vec<String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    if let Some(f) = parse_put_failure(body) {
        return f.messages.iter().map(|m| clip(m)).collect();
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => clip(s),
                other => clip(&other.to_string()),
            })
            .collect(),
        Ok(Value::String(s)) => vec![clip(&s)],
        Ok(other) => vec![clip(&other.to_string())],
        Err(_) => vec![quote_bytes(body)],
    }
}

/// At most [`MAX_QUOTED_BYTES`] of `s`, cut on a character boundary, with
/// control characters replaced.
pub(crate) fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_QUOTED_BYTES);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    let head: String = s
        .get(..end)
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if end < s.len() {
        format!("{head}...")
    } else {
        head
    }
}

pub(crate) fn quote_bytes(body: &[u8]) -> String {
    format!("{:?}", clip(&String::from_utf8_lossy(body)))
}
