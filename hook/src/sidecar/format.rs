//! Sealing, parsing, reading and writing a sidecar: the digest and HMAC
//! over the body's canonical bytes, and the strict parse that names the
//! JSON path of every field it refuses.

use std::path::Path;

use hmac::Mac;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::key::{ct_eq, hex_lower, is_lower_hex, parse_hex_32, KEY_ID_HEX_LEN};
use super::{
    read_bounded, read_trusted, write_atomic, Integrity, Result, Sidecar, SidecarBody,
    SidecarError, SidecarKey, FORMAT, MAX_QUOTED_BYTES, MAX_SIDECAR_BYTES, VERSION,
};

fn max_bytes_u64() -> u64 {
    u64::try_from(MAX_SIDECAR_BYTES).unwrap_or(u64::MAX)
}

impl Sidecar {
    /// Validates `body` and seals it: digest always, HMAC and key id when a
    /// key is given.
    pub fn seal(body: SidecarBody, key: Option<&SidecarKey>) -> Result<Sidecar> {
        body.validate()?;
        let canonical = body.canonical_bytes()?;
        let sha256 = hex_lower(&Sha256::digest(&canonical));
        let (hmac_sha256, key_id) = match key {
            Some(key) => {
                let mut mac = key.mac()?;
                mac.update(&canonical);
                let tag = mac.finalize().into_bytes();
                (Some(hex_lower(&tag)), Some(key.id().to_string()))
            }
            None => (None, None),
        };
        Ok(Sidecar {
            body,
            integrity: Integrity {
                sha256,
                hmac_sha256,
                key_id,
            },
        })
    }

    /// The file's bytes: pretty JSON, body fields in struct order then
    /// `integrity`, with a trailing newline.
    pub fn to_json_pretty(&self) -> Vec<u8> {
        // Cannot fail: only structs, strings, integers, booleans and nulls.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses and checks a sidecar; see the module documentation for the
    /// order of the checks. With `key`, only files sealed with that key are
    /// accepted; without, a file carrying an HMAC is accepted on its digest
    /// and a warning is logged.
    pub fn parse(bytes: &[u8], key: Option<&SidecarKey>) -> Result<Sidecar> {
        if bytes.len() > MAX_SIDECAR_BYTES {
            return Err(SidecarError::TooLarge {
                size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
                max: max_bytes_u64(),
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(json_error)?;
        let mut map = match value {
            Value::Object(map) => map,
            other => {
                return Err(SidecarError::WrongType {
                    field: ".".to_string(),
                    msg: format!("the document is {}, expected an object", kind(&other)),
                })
            }
        };
        check_format_and_version(&map)?;
        let integrity_value = map.remove("integrity");
        let body: SidecarBody = strict(Value::Object(map), "")?;
        let integrity: Integrity = match integrity_value {
            Some(v) => strict(v, "integrity")?,
            None => {
                return Err(SidecarError::MissingField {
                    field: "integrity".to_string(),
                })
            }
        };

        let canonical = body.canonical_bytes()?;
        let stated = parse_hex_32(&integrity.sha256).ok_or_else(|| {
            SidecarError::invalid("integrity.sha256", "expected 64 lowercase hex digits")
        })?;
        let actual: [u8; 32] = Sha256::digest(&canonical).into();
        if !ct_eq(&stated, &actual) {
            return Err(SidecarError::DigestMismatch);
        }

        let mac_hex = match (&integrity.hmac_sha256, &integrity.key_id) {
            (Some(mac), Some(id)) => {
                if !is_lower_hex(id, KEY_ID_HEX_LEN) {
                    return Err(SidecarError::invalid(
                        "integrity.key_id",
                        "expected 16 lowercase hex digits",
                    ));
                }
                Some((mac.as_str(), id.as_str()))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(SidecarError::invalid(
                    "integrity.key_id",
                    "is absent but integrity.hmac_sha256 is present",
                ))
            }
            (None, Some(_)) => {
                return Err(SidecarError::invalid(
                    "integrity.hmac_sha256",
                    "is absent but integrity.key_id is present",
                ))
            }
        };
        if let Some((mac, _)) = mac_hex {
            if parse_hex_32(mac).is_none() {
                return Err(SidecarError::invalid(
                    "integrity.hmac_sha256",
                    "expected 64 lowercase hex digits",
                ));
            }
        }
        match (key, mac_hex) {
            (Some(_), None) => return Err(SidecarError::HmacMissing),
            (Some(key), Some((mac, id))) => {
                if id != key.id() {
                    return Err(SidecarError::KeyIdMismatch {
                        file: id.to_string(),
                        configured: key.id().to_string(),
                    });
                }
                let tag = parse_hex_32(mac).ok_or(SidecarError::HmacMismatch)?;
                let mut m = key.mac()?;
                m.update(&canonical);
                m.verify_slice(&tag)
                    .map_err(|_| SidecarError::HmacMismatch)?;
            }
            (None, Some((_, id))) => {
                log::warn!(
                    "sidecar for VM {:?} carries an HMAC (key id {id}) but no sidecar key is configured: \
                     accepted on its digest alone, authenticity not checked",
                    clip(&body.vm.id)
                );
            }
            (None, None) => {}
        }

        body.validate()?;
        Ok(Sidecar { body, integrity })
    }

    /// Reads ([`read_bounded`]) and parses a sidecar file.
    pub fn read_from(path: &Path, key: Option<&SidecarKey>) -> Result<Sidecar> {
        Sidecar::parse(&read_bounded(path)?, key)
    }

    /// Reads a sidecar file that nobody but this user or root could have
    /// written ([`read_trusted`]), and parses it.
    pub fn read_from_trusted(path: &Path, key: Option<&SidecarKey>) -> Result<Sidecar> {
        Sidecar::parse(&read_trusted(path)?, key)
    }

    /// Writes the sidecar to `path` with [`write_atomic`].
    pub fn write_to(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_json_pretty())
    }
}

/// Checks `format` and `version` before anything else, so a file of another
/// kind or version is named as such rather than as a pile of field errors.
fn check_format_and_version(map: &Map<String, Value>) -> Result<()> {
    match map.get("format") {
        None => {
            return Err(SidecarError::MissingField {
                field: "format".to_string(),
            })
        }
        Some(Value::String(s)) if s == FORMAT => {}
        Some(Value::String(s)) => return Err(SidecarError::UnknownFormat(clip(s))),
        Some(other) => {
            return Err(SidecarError::WrongType {
                field: "format".to_string(),
                msg: format!("is {}, expected a string", kind(other)),
            })
        }
    }
    match map.get("version") {
        None => Err(SidecarError::MissingField {
            field: "version".to_string(),
        }),
        Some(v) => match v.as_u64() {
            Some(n) if n == u64::from(VERSION) => Ok(()),
            Some(n) => Err(SidecarError::UnknownVersion(n)),
            None => Err(SidecarError::WrongType {
                field: "version".to_string(),
                msg: format!("is {}, expected an unsigned integer", kind(v)),
            }),
        },
    }
}

/// Deserialises `value` strictly, turning serde's message into an error
/// variant that names the JSON path (prefixed with `prefix`).
fn strict<T: serde::de::DeserializeOwned>(value: Value, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let msg = err.inner().to_string();
        let base = join_path(prefix, if path == "." { "" } else { &path });
        if msg.starts_with("missing field") {
            SidecarError::MissingField {
                field: join_path(&base, &backticked(&msg).unwrap_or_default()),
            }
        } else if msg.starts_with("unknown field") {
            // serde_path_to_error's path already ends at the unknown key in
            // some cases; do not name it twice.
            let name = backticked(&msg).unwrap_or_default();
            let field = if base == name || base.ends_with(&format!(".{name}")) {
                base
            } else {
                join_path(&base, &name)
            };
            SidecarError::UnknownField {
                field: clip(&field),
            }
        } else {
            SidecarError::WrongType {
                field: if base.is_empty() {
                    ".".to_string()
                } else {
                    base
                },
                msg: clip(&msg),
            }
        }
    })
}

fn join_path(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (false, true) => a.to_string(),
        (false, false) if b.starts_with('[') => format!("{a}{b}"),
        (false, false) => format!("{a}.{b}"),
    }
}

/// The text between the first pair of backticks in a serde message.
fn backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')?.checked_add(1)?;
    let rest = msg.get(start..)?;
    let end = rest.find('`')?;
    rest.get(..end).map(str::to_string)
}

fn json_error(err: serde_json::Error) -> SidecarError {
    match err.classify() {
        serde_json::error::Category::Eof => SidecarError::Truncated,
        _ => {
            let (line, column) = (err.line(), err.column());
            let full = err.to_string();
            let suffix = format!(" at line {line} column {column}");
            let msg = full.strip_suffix(&suffix).unwrap_or(&full);
            SidecarError::NotJson {
                line,
                column,
                msg: clip(msg),
            }
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most [`MAX_QUOTED_BYTES`] of `s`, cut on a character boundary.
pub(crate) fn clip(s: &str) -> String {
    if s.len() <= MAX_QUOTED_BYTES {
        return s.to_string();
    }
    let mut end = MAX_QUOTED_BYTES;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_respects_char_boundaries() {
        let s = "é".repeat(300);
        let c = clip(&s);
        assert!(c.len() <= MAX_QUOTED_BYTES + 3);
        assert!(c.ends_with("..."));
    }

    #[test]
    fn paths_join() {
        assert_eq!(join_path("", "a"), "a");
        assert_eq!(join_path("a.b", "c"), "a.b.c");
        assert_eq!(join_path("a", "[1].id"), "a[1].id");
        assert_eq!(join_path("integrity", ""), "integrity");
    }
}
