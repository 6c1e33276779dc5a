//! The HMAC-SHA256 key a sidecar is sealed with, its id, and the hex and
//! constant-time helpers the integrity block needs.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{
    check_owner_and_mode, check_parent_dir, Result, SidecarError, MAX_KEY_FILE_BYTES, MIN_KEY_BYTES,
};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Domain separation prefix of key ids.
const KEY_ID_DOMAIN: &[u8] = b"clockcarry-key-id\0";
/// Length of a key id, in hex digits.
pub(crate) const KEY_ID_HEX_LEN: usize = 16;

/// A key for HMAC-SHA256 sealing. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct SidecarKey {
    bytes: Vec<u8>,
    id: String,
}

impl std::fmt::Debug for SidecarKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarKey")
            .field("id", &self.id)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

impl Drop for SidecarKey {
    fn drop(&mut self) {
        // Best effort: do not leave the key in freed memory.
        self.bytes.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&self.bytes);
    }
}

impl SidecarKey {
    /// A key from raw bytes; at least [`MIN_KEY_BYTES`] of them.
    pub fn from_bytes(bytes: &[u8]) -> Result<SidecarKey> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(SidecarError::Key(format!(
                "the key is {} bytes long; at least {MIN_KEY_BYTES} are required",
                bytes.len()
            )));
        }
        let mut h = Sha256::new();
        h.update(KEY_ID_DOMAIN);
        h.update(bytes);
        let digest = h.finalize();
        let mut id = hex_lower(&digest);
        id.truncate(KEY_ID_HEX_LEN);
        Ok(SidecarKey {
            bytes: bytes.to_vec(),
            id,
        })
    }

    /// A key from a file: its raw bytes with one trailing newline stripped.
    /// At least [`MIN_KEY_BYTES`] bytes, at most [`MAX_KEY_FILE_BYTES`].
    ///
    /// The file must be private ([`SidecarError::Untrusted`] otherwise): not
    /// readable or writable by group or others (execute bits do not
    /// matter), owned by the effective user or root, and, when it is a
    /// regular file, in a directory nobody else could replace it in
    /// ([`check_parent_dir`]). Owner and mode are those of the opened file.
    pub fn from_file(path: &Path) -> Result<SidecarKey> {
        let file = File::open(path).map_err(|e| SidecarError::io(path, e))?;
        let meta = file.metadata().map_err(|e| SidecarError::io(path, e))?;
        check_owner_and_mode("key file", path, &meta, 0o066)?;
        if meta.is_file() {
            check_parent_dir("key file", path)?;
        }
        let mut bytes = Vec::new();
        let limit = u64::try_from(MAX_KEY_FILE_BYTES)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        file.take(limit)
            .read_to_end(&mut bytes)
            .map_err(|e| SidecarError::io(path, e))?;
        if bytes.len() > MAX_KEY_FILE_BYTES {
            return Err(SidecarError::Key(format!(
                "key file {} is larger than {MAX_KEY_FILE_BYTES} bytes",
                path.display()
            )));
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        let key = SidecarKey::from_bytes(&bytes).map_err(|_| {
            SidecarError::Key(format!(
                "key file {} holds {} bytes (after stripping one trailing newline); at least {MIN_KEY_BYTES} are required",
                path.display(),
                bytes.len()
            ))
        });
        bytes.iter_mut().for_each(|b| *b = 0);
        key
    }

    /// The key id: the first 16 hex digits of
    /// SHA-256("clockcarry-key-id\0" || key).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn mac(&self) -> Result<HmacSha256> {
        <HmacSha256 as Mac>::new_from_slice(&self.bytes)
            .map_err(|e| SidecarError::Key(format!("cannot key HMAC-SHA256: {e}")))
    }
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

pub(crate) fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| hex_val(c).is_some())
}

/// 64 lowercase hex digits to 32 bytes.
pub(crate) fn parse_hex_32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let (hi, lo) = match pair {
            [hi, lo] => (hex_val(*hi)?, hex_val(*lo)?),
            _ => return None,
        };
        *byte = (hi << 4) | lo;
    }
    Some(out)
}

/// Constant-time equality of two digests.
pub(crate) fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let bytes: [u8; 32] = core::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let hex = hex_lower(&bytes);
        assert_eq!(parse_hex_32(&hex), Some(bytes));
        assert_eq!(parse_hex_32(&hex.to_uppercase()), None);
        assert_eq!(parse_hex_32(&hex[..62]), None);
        assert_eq!(parse_hex_32("é".repeat(32).as_str()), None);
    }

    #[test]
    fn ct_eq_detects_each_byte() {
        let a = [7u8; 32];
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!ct_eq(&a, &b));
        }
        assert!(ct_eq(&a, &a));
    }

    #[test]
    fn key_id_is_domain_separated() {
        let key = SidecarKey::from_bytes(b"0123456789abcdef").unwrap();
        let plain = hex_lower(&Sha256::digest(b"0123456789abcdef"));
        assert_eq!(key.id().len(), 16);
        assert_ne!(key.id(), &plain[..16]);
        assert!(!format!("{key:?}").contains("0123456789abcdef"));
    }
}
