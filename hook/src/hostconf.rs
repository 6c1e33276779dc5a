//! The host configuration: `/etc/clockcarry/clockcarry.conf`, or the file
//! `$CLOCKCARRY_CONFIG` names. It makes sidecar authentication a property
//! of the host instead of a flag each command must remember: when it names
//! a key file, every command that reads or writes sidecars seals with that
//! key and refuses sidecars without a valid HMAC under it, `--key` or not
//! (an explicit `--key` is used instead, and is just as mandatory).
//!
//! The format is deliberately tiny and strict (docs/cli.md, "Host
//! configuration"):
//!
//! ```text
//! # /etc/clockcarry/clockcarry.conf
//! key_file = /etc/clockcarry/sidecar.key
//! ```
//!
//! UTF-8, at most [`MAX_CONFIG_BYTES`]; one `name = value` per line, blank
//! lines and lines whose first non-blank character is `#` ignored. The only
//! setting is `key_file`, an absolute path without `..` components. An
//! unknown or repeated setting, a line without `=`, an empty or relative
//! value is an error naming the file, the line and the setting: a
//! configuration that cannot be read exactly as written is never half
//! applied. Invariants of a loaded [`HostConfig`]: it came from a regular
//! file owned by the effective user or root, writable by nobody else, in a
//! directory nobody else could replace it in; `key_file`, when present, is
//! absolute and free of `..`.
//!
//! The default file may be absent (no host configuration, keys optional);
//! a file named by `CLOCKCARRY_CONFIG` must exist, so a typo there does not
//! silently turn authentication off.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use crate::sidecar::{check_owner_and_mode, check_parent_dir, file_kind, SidecarError, SidecarKey};

/// Where the host configuration lives by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/clockcarry/clockcarry.conf";
/// Environment variable naming another host configuration file.
pub const CONFIG_ENV: &str = "CLOCKCARRY_CONFIG";
/// Largest host configuration accepted, in bytes.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Longest path accepted as a value, in bytes.
const MAX_PATH_BYTES: usize = 4096;
/// The settings the format knows.
const KNOWN: &[&str] = &["key_file"];

/// The host configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// `key_file`: the sidecar key every command uses, and requires, when
    /// no `--key` is given.
    pub key_file: Option<PathBuf>,
}

/// Why the host configuration cannot be used. Every message names the
/// file; [`HostConfigError::Invalid`] also names the line and the setting.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    #[error("host configuration {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "host configuration {} (named by {CONFIG_ENV}) does not exist",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("host configuration {} is {kind}, not a regular file", path.display())]
    NotRegularFile { path: PathBuf, kind: &'static str },
    /// Others could have written it ([`SidecarError::Untrusted`]).
    #[error("{0}")]
    Untrusted(SidecarError),
    #[error(
        "host configuration {}, line {line}: {}{message}",
        path.display(),
        field.as_deref().map(|f| format!("`{f}`: ")).unwrap_or_default()
    )]
    Invalid {
        path: PathBuf,
        /// 1-based; 0 for the file as a whole (size, encoding).
        line: u32,
        /// The setting at fault, when the line names one.
        field: Option<String>,
        message: String,
    },
}

impl HostConfigError {
    /// The setting at fault, if there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            HostConfigError::Invalid { field, .. } => field.as_deref(),
            _ => None,
        }
    }
}

impl HostConfig {
    /// The configuration's path, and whether it was named explicitly:
    /// `$CLOCKCARRY_CONFIG` when set and not empty, else
    /// [`DEFAULT_CONFIG_PATH`].
    pub fn path_from_env() -> (PathBuf, bool) {
        match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        }
    }

    /// Loads the host configuration from [`HostConfig::path_from_env`]:
    /// `None` when the default file does not exist.
    pub fn load() -> Result<Option<HostConfig>, HostConfigError> {
        let (path, explicit) = HostConfig::path_from_env();
        HostConfig::load_from(&path, explicit)
    }

    /// Loads `path`. A missing file is `None`, or
    /// [`HostConfigError::Missing`] when `must_exist`. The file must be a
    /// regular file (symlinks are followed: the file they reach is
    /// checked) that only this user or root could have written.
    pub fn load_from(path: &Path, must_exist: bool) -> Result<Option<HostConfig>, HostConfigError> {
        let io = |source| HostConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !must_exist => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(HostConfigError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(HostConfigError::NotRegularFile {
                path: path.to_path_buf(),
                kind: file_kind(&meta.file_type()),
            });
        }
        check_owner_and_mode("host configuration", path, &meta, 0o022)
            .map_err(HostConfigError::Untrusted)?;
        check_parent_dir("host configuration", path).map_err(HostConfigError::Untrusted)?;
        let limit = u64::try_from(MAX_CONFIG_BYTES).unwrap_or(u64::MAX);
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let whole = |message: String| HostConfigError::Invalid {
            path: path.to_path_buf(),
            line: 0,
            field: None,
            message,
        };
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(whole(format!("larger than {MAX_CONFIG_BYTES} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| whole("not UTF-8".into()))?;
        HostConfig::parse(path, &text).map(Some)
    }

    /// Parses configuration text read from `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<HostConfig, HostConfigError> {
        let mut cfg = HostConfig {
            path: path.to_path_buf(),
            key_file: None,
        };
        let mut seen: Vec<(&str, u32)> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = u32::try_from(idx).unwrap_or(u32::MAX).saturating_add(1);
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let err = |field: Option<&str>, message: String| HostConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                field: field.map(clip),
                message,
            };
            let Some((name, value)) = trimmed.split_once('=') else {
                return Err(err(
                    None,
                    format!("expected key = value, found {:?}", clip(trimmed)),
                ));
            };
            let (name, value) = (name.trim(), value.trim());
            if !KNOWN.contains(&name) {
                return Err(err(
                    Some(name),
                    format!("unknown setting (known: {})", KNOWN.join(", ")),
                ));
            }
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
                return Err(err(
                    Some(name),
                    format!("set twice (first on line {first})"),
                ));
            }
            seen.push((name, line));
            // `name` is one of KNOWN: today only `key_file`.
            cfg.key_file = Some(absolute_path(value).map_err(|m| err(Some(name), m))?);
        }
        Ok(cfg)
    }

    /// The key `key_file` names, loaded with [`SidecarKey::from_file`]
    /// (which refuses a key file others could read or write); `None`
    /// without `key_file`.
    pub fn key(&self) -> Result<Option<SidecarKey>, SidecarError> {
        self.key_file
            .as_deref()
            .map(SidecarKey::from_file)
            .transpose()
    }
}

/// An absolute path without `..`, control characters or excess length.
fn absolute_path(value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err("is empty: give an absolute path, or remove the line".into());
    }
    let p = Path::new(value);
    if !p.is_absolute()
        || value.len() > MAX_PATH_BYTES
        || value.chars().any(char::is_control)
        || p.components().any(|c| c == Component::ParentDir)
    {
        return Err(format!(
            "{:?} is not an absolute path without `..` (at most {MAX_PATH_BYTES} bytes)",
            clip(value)
        ));
    }
    Ok(p.to_path_buf())
}

/// At most 80 bytes of `s`, cut on a character boundary.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostConfig, HostConfigError> {
        HostConfig::parse(Path::new("/etc/clockcarry/clockcarry.conf"), text)
    }

    #[test]
    fn the_format() {
        assert_eq!(parse("").unwrap().key_file, None);
        assert_eq!(
            parse("# c\n\n  key_file =  /etc/k  \n").unwrap().key_file,
            Some(PathBuf::from("/etc/k"))
        );
        let e = parse("key_file = /a\nkey_file = /b\n").unwrap_err();
        assert_eq!(e.field(), Some("key_file"));
        assert!(e.to_string().contains("line 2"), "{e}");
        for bad in [
            "key_file = k",
            "key_file = /a/../k",
            "key_file =",
            "key_file = /a\u{7}",
            "key_file",
            "other = /x",
            "é = /x",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains("line 1"), "{bad}: {e}");
        }
        let long = format!("{} = /x", "n".repeat(500));
        assert!(parse(&long).unwrap_err().to_string().len() < 400);
    }
}
