//! libvirt's hook arguments: `NAME OP SUBOP EXTRA`, validated.
//!
//! libvirt runs every hook with exactly four arguments after the program
//! name. `OP` and `SUBOP` come from small fixed sets; a value this version
//! does not know (a newer libvirt) is kept as [`Op::Other`] / [`SubOp::Other`]
//! and ignored by the hook rather than failing a domain start.

use std::ffi::{OsStr, OsString};
use std::fmt;

use super::LibvirtError;

/// Longest domain name accepted, in bytes. libvirt itself sets no limit,
/// but every name it can turn into a file name fits `NAME_MAX` (255).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest `EXTRA` argument kept, in bytes (it is only logged and reported).
pub const MAX_EXTRA_BYTES: usize = 255;

/// A libvirt domain name that passed [`DomainName::parse`].
///
/// Parsing refuses what libvirt refuses (empty, `/`, newline) plus every
/// control character and anything over [`MAX_NAME_BYTES`]. Such a name can
/// safely be logged, reported and passed as one `argv` element; it becomes a
/// path component only through [`DomainName::as_path_component`], which
/// applies a much stricter allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainName(String);

impl DomainName {
    /// Validates a domain name as given by libvirt.
    pub fn parse(raw: &OsStr) -> Result<DomainName, LibvirtError> {
        let text = raw.to_str().ok_or_else(|| LibvirtError::BadName {
            name: raw.to_string_lossy().into_owned(),
            why: "not UTF-8",
        })?;
        let bad = |why| LibvirtError::BadName {
            name: clip(text, 80),
            why,
        };
        if text.is_empty() {
            return Err(bad("empty"));
        }
        if text.len() > MAX_NAME_BYTES {
            return Err(bad("longer than 255 bytes"));
        }
        if text.contains('/') {
            return Err(bad("contains '/'"));
        }
        if text.chars().any(char::is_control) {
            return Err(bad("contains a control character"));
        }
        Ok(DomainName(text.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, if it is safe as a single path component: ASCII letters,
    /// digits and `. _ - + : @` only, not starting with `.` or `-` (so
    /// never `.` or `..`), at most [`MAX_NAME_BYTES`] bytes. `None`
    /// otherwise: the caller then does without any per-name path.
    pub fn as_path_component(&self) -> Option<&str> {
        path_component_ok(&self.0).then_some(self.0.as_str())
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug-style escaping: a name may hold quotes or unusual Unicode.
        write!(f, "{:?}", self.0)
    }
}

/// Whether `text` passes the path-component allow-list of
/// [`DomainName::as_path_component`].
pub fn path_component_ok(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_NAME_BYTES
        && !text.starts_with('.')
        && !text.starts_with('-')
        && text.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b':' | b'@')
        })
}

/// A domain UUID in libvirt's canonical form: 36 characters, lowercase hex
/// in groups 8-4-4-4-12. Safe as a file name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainUuid(String);

impl DomainUuid {
    /// Accepts `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in either case (with
    /// surrounding whitespace, as XML text may have) and normalises it to
    /// lowercase. libvirt also accepts UUIDs without dashes on input but
    /// always formats them with dashes.
    pub fn parse(raw: &str) -> Result<DomainUuid, LibvirtError> {
        let text = raw.trim();
        let bad = || LibvirtError::BadUuid {
            uuid: clip(text, 80),
        };
        if text.len() != 36 {
            return Err(bad());
        }
        for (i, b) in text.bytes().enumerate() {
            let ok = if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            };
            if !ok {
                return Err(bad());
            }
        }
        Ok(DomainUuid(text.to_ascii_lowercase()))
    }

    /// The UUID as text (lowercase, with dashes).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The hook's `OP` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Prepare,
    Start,
    Started,
    Stopped,
    Release,
    Migrate,
    Restore,
    Reconnect,
    Attach,
    /// An operation this version does not know; ignored.
    Other(String),
}

impl Op {
    fn parse(text: &str) -> Op {
        match text {
            "prepare" => Op::Prepare,
            "start" => Op::Start,
            "started" => Op::Started,
            "stopped" => Op::Stopped,
            "release" => Op::Release,
            "migrate" => Op::Migrate,
            "restore" => Op::Restore,
            "reconnect" => Op::Reconnect,
            "attach" => Op::Attach,
            other => Op::Other(clip(other, 40)),
        }
    }

    /// The argument as libvirt spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Op::Prepare => "prepare",
            Op::Start => "start",
            Op::Started => "started",
            Op::Stopped => "stopped",
            Op::Release => "release",
            Op::Migrate => "migrate",
            Op::Restore => "restore",
            Op::Reconnect => "reconnect",
            Op::Attach => "attach",
            Op::Other(s) => s,
        }
    }
}

/// The hook's `SUBOP` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubOp {
    Begin,
    End,
    /// `-`
    None,
    /// A sub-operation this version does not know; ignored.
    Other(String),
}

impl SubOp {
    fn parse(text: &str) -> SubOp {
        match text {
            "begin" => SubOp::Begin,
            "end" => SubOp::End,
            "-" => SubOp::None,
            other => SubOp::Other(clip(other, 40)),
        }
    }

    /// The argument as libvirt spells it.
    pub fn as_str(&self) -> &str {
        match self {
            SubOp::Begin => "begin",
            SubOp::End => "end",
            SubOp::None => "-",
            SubOp::Other(s) => s,
        }
    }
}

/// libvirt's four hook arguments, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookArgs {
    pub name: DomainName,
    pub op: Op,
    pub subop: SubOp,
    /// `EXTRA`: `-` mostly; the shutoff reason on `release end` since
    /// libvirt 10.5.0. Kept for the log only; `None` for `-`.
    pub extra: Option<String>,
}

impl HookArgs {
    /// Parses the arguments after the program name. Exactly four are
    /// required (libvirt always passes four); `OP`, `SUBOP` and `EXTRA`
    /// must be printable ASCII.
    pub fn parse(args: &[OsString]) -> Result<HookArgs, LibvirtError> {
        if args.len() != 4 {
            return Err(LibvirtError::Usage(format!(
                "expected 4 arguments (NAME OP SUBOP EXTRA) as libvirt passes them, got {}",
                args.len()
            )));
        }
        let name = DomainName::parse(&args[0])?;
        let word = |i: usize, what: &str, max: usize| -> Result<String, LibvirtError> {
            let s = args[i].to_str().unwrap_or("\u{fffd}");
            if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(LibvirtError::Usage(format!(
                    "{what} argument {:?} is not a short printable word",
                    clip(&args[i].to_string_lossy(), 40)
                )));
            }
            Ok(s.to_owned())
        };
        let op = Op::parse(&word(1, "OP", 40)?);
        let subop = SubOp::parse(&word(2, "SUBOP", 40)?);
        // EXTRA may hold spaces in future versions ("from snapshot" is one
        // of the 10.5.0 reasons): printable ASCII and space.
        let extra_raw = args[3].to_str().unwrap_or("\u{fffd}");
        if extra_raw.len() > MAX_EXTRA_BYTES
            || !extra_raw.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
        {
            return Err(LibvirtError::Usage(format!(
                "EXTRA argument {:?} is not short printable text",
                clip(&args[3].to_string_lossy(), 40)
            )));
        }
        let extra = match extra_raw {
            "-" | "" => None,
            other => Some(other.to_owned()),
        };
        Ok(HookArgs {
            name,
            op,
            subop,
            extra,
        })
    }

    /// Whether libvirt reads this call's stdout as replacement domain XML
    /// (`migrate begin`, `restore begin`). The hook never prints anything,
    /// which libvirt takes as "keep the XML unchanged"; this is for tests
    /// and documentation.
    pub fn stdout_is_xml(&self) -> bool {
        matches!(
            (&self.op, &self.subop),
            (Op::Migrate, SubOp::Begin) | (Op::Restore, SubOp::Begin)
        )
    }
}

/// At most `max` bytes of `text`, cut at a character boundary, with `...`
/// appended when cut.
pub(crate) fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
