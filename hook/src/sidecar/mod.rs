//! The sidecar, version 1: one JSON file per VM per capture that carries the
//! VM's clock state from the source to the restore.
//!
//! The file is flat JSON: the [`SidecarBody`] fields at the top level plus an
//! `"integrity"` object ([`Integrity`]). The digest (and the optional
//! HMAC-SHA256) covers the *canonical bytes* of the body,
//! `serde_json::to_vec(&body)`: the body re-serialised compactly in struct
//! order, so whitespace and key order in the file do not matter, while every
//! value the parser accepts is covered.
//!
//! [`Sidecar::parse`] checks, in this order: size, JSON syntax, `format`,
//! `version`, strict structure (unknown, missing and mistyped fields are
//! refused with their JSON path), digest, HMAC, then the semantic rules of
//! [`SidecarBody::validate`]. No input panics.
//!
//! Files are written with [`write_atomic`] (temp file, fsync, rename, fsync
//! of the directory; mode 0600; only ever replacing a regular file) and
//! read with [`read_bounded`], or [`read_trusted`] when only this user or
//! root may have written them (both in [`crate::fsio`]). Key files must be
//! private ([`SidecarKey::from_file`]).
//!
//! - [`format`]: sealing, parsing, reading and writing;
//! - [`rules`]: the semantic rules of a body (the VM clock's through
//!   [`crate::validate`]);
//! - [`key`]: the HMAC key and its id.
//!
//! The format is documented in `docs/sidecar.md`; the JSON Schema lives in
//! `hook/schema/sidecar-v1.schema.json`.

pub mod format;
pub mod key;
pub mod rules;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsio::{self, FileError};
use crate::model::{HostIdentity, HostSample, OffsetEstimate, VmClock};

pub use key::SidecarKey;

/// The value of the `format` field.
pub const FORMAT: &str = "clockcarry-sidecar";
/// The sidecar version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest sidecar accepted, in bytes (a 255-vCPU sidecar is about 20 KiB).
pub const MAX_SIDECAR_BYTES: usize = 1 << 20;
/// Highest TSC rate accepted, in kHz (100 GHz).
pub use crate::validate::MAX_TSC_KHZ;
/// Most vCPUs a sidecar may describe.
pub use crate::validate::MAX_VCPUS;
/// Largest capture uncertainty accepted, in ns (1 s).
pub const MAX_UNCERTAINTY_NS: u64 = 1_000_000_000;
/// Largest TAI - UTC offset accepted, in s.
pub const MAX_TAI_OFFSET_S: i32 = 1000;
/// Longest host string (hostname, boot id, kernel release, clocksource,
/// `created_by`), in bytes.
pub const MAX_HOST_STRING_BYTES: usize = 255;
/// Longest VM id, in bytes.
pub const MAX_VM_ID_BYTES: usize = 1024;
/// Shortest sidecar key, in bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Largest sidecar key file, in bytes.
pub const MAX_KEY_FILE_BYTES: usize = 64 * 1024;
/// Longest value quoted back in an error message, in bytes.
pub(crate) const MAX_QUOTED_BYTES: usize = 200;

/// Result of every sidecar operation.
pub type Result<T, E = SidecarError> = std::result::Result<T, E>;

/// Why a sidecar could not be read, written, sealed or accepted.
///
/// Every message names the JSON field at fault where there is one;
/// [`SidecarError::field`] returns it.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("sidecar I/O on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sidecar is {size} bytes, more than the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("sidecar is truncated: the JSON text ends before the document does")]
    Truncated,
    #[error("sidecar is not JSON: {msg} at line {line} column {column}")]
    NotJson {
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("field `format` is {0:?}, expected \"{FORMAT}\": not a clockcarry sidecar")]
    UnknownFormat(String),
    #[error("field `version` is {0}: this clockcarry reads sidecar version {VERSION} only")]
    UnknownVersion(u64),
    #[error("missing field `{field}`")]
    MissingField { field: String },
    #[error("field `{field}` has the wrong type or value: {msg}")]
    WrongType { field: String, msg: String },
    #[error("unknown field `{field}`")]
    UnknownField { field: String },
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: String, reason: String },
    #[error(
        "field `capture.tai_ns` is {ahead_ns} ns in the future, beyond the error bound of {bound_ns} ns"
    )]
    CaptureInFuture { ahead_ns: u64, bound_ns: u64 },
    #[error(
        "field `integrity.sha256` does not match the content: the sidecar was altered or corrupted"
    )]
    DigestMismatch,
    #[error(
        "field `integrity.hmac_sha256` is absent but a sidecar key is configured: unauthenticated sidecars are refused"
    )]
    HmacMissing,
    #[error(
        "field `integrity.hmac_sha256` does not match: the sidecar was altered or sealed with another key"
    )]
    HmacMismatch,
    #[error(
        "field `integrity.key_id` is {file}, but the configured key's id is {configured}: sealed with another key"
    )]
    KeyIdMismatch { file: String, configured: String },
    #[error("sidecar key: {0}")]
    Key(String),
    #[error("{what} {} {reason}: refused", path.display())]
    Untrusted {
        /// "key file", "sidecar", "host configuration".
        what: &'static str,
        path: PathBuf,
        /// Who else could read or write it, and how (mode, owner, directory).
        reason: String,
    },
    #[error("{} is {kind}, not a regular file: refusing to replace it", path.display())]
    NotRegularFile {
        path: PathBuf,
        /// What is there: "a directory", "a symbolic link", "a FIFO", ...
        kind: &'static str,
    },
}

/// Equality for tests and for errors that embed this one: an `Io` error
/// compares its path and its [`io::ErrorKind`] (an [`io::Error`] has no
/// equality of its own); every other variant compares all its fields.
impl PartialEq for SidecarError {
    fn eq(&self, other: &Self) -> bool {
        use SidecarError as E;
        match (self, other) {
            (E::Io { path: a, source: x }, E::Io { path: b, source: y }) => {
                a == b && x.kind() == y.kind()
            }
            (E::TooLarge { size: a, max: x }, E::TooLarge { size: b, max: y }) => a == b && x == y,
            (E::Truncated, E::Truncated) => true,
            (
                E::NotJson {
                    line: a,
                    column: x,
                    msg: m,
                },
                E::NotJson {
                    line: b,
                    column: y,
                    msg: n,
                },
            ) => a == b && x == y && m == n,
            (E::UnknownFormat(a), E::UnknownFormat(b)) => a == b,
            (E::UnknownVersion(a), E::UnknownVersion(b)) => a == b,
            (E::MissingField { field: a }, E::MissingField { field: b }) => a == b,
            (E::WrongType { field: a, msg: m }, E::WrongType { field: b, msg: n }) => {
                a == b && m == n
            }
            (E::UnknownField { field: a }, E::UnknownField { field: b }) => a == b,
            (
                E::Invalid {
                    field: a,
                    reason: m,
                },
                E::Invalid {
                    field: b,
                    reason: n,
                },
            ) => a == b && m == n,
            (
                E::CaptureInFuture {
                    ahead_ns: a,
                    bound_ns: x,
                },
                E::CaptureInFuture {
                    ahead_ns: b,
                    bound_ns: y,
                },
            ) => a == b && x == y,
            (E::DigestMismatch, E::DigestMismatch) => true,
            (E::HmacMissing, E::HmacMissing) => true,
            (E::HmacMismatch, E::HmacMismatch) => true,
            (
                E::KeyIdMismatch {
                    file: a,
                    configured: x,
                },
                E::KeyIdMismatch {
                    file: b,
                    configured: y,
                },
            ) => a == b && x == y,
            (E::Key(a), E::Key(b)) => a == b,
            (E::NotRegularFile { path: a, kind: x }, E::NotRegularFile { path: b, kind: y }) => {
                a == b && x == y
            }
            (
                E::Untrusted {
                    what: w,
                    path: a,
                    reason: x,
                },
                E::Untrusted {
                    what: v,
                    path: b,
                    reason: y,
                },
            ) => w == v && a == b && x == y,
            _ => false,
        }
    }
}

impl SidecarError {
    /// The JSON path of the field at fault (`vm_clock.kvmclock.clock`,
    /// `vm_clock.vcpus[1].id`, `integrity.sha256`, ...), if there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            SidecarError::MissingField { field }
            | SidecarError::WrongType { field, .. }
            | SidecarError::UnknownField { field }
            | SidecarError::Invalid { field, .. } => Some(field),
            SidecarError::UnknownFormat(_) => Some("format"),
            SidecarError::UnknownVersion(_) => Some("version"),
            SidecarError::CaptureInFuture { .. } => Some("capture.tai_ns"),
            SidecarError::DigestMismatch => Some("integrity.sha256"),
            SidecarError::HmacMissing | SidecarError::HmacMismatch => Some("integrity.hmac_sha256"),
            SidecarError::KeyIdMismatch { .. } => Some("integrity.key_id"),
            SidecarError::Io { .. }
            | SidecarError::TooLarge { .. }
            | SidecarError::Truncated
            | SidecarError::NotJson { .. }
            | SidecarError::Key(_)
            | SidecarError::Untrusted { .. }
            | SidecarError::NotRegularFile { .. } => None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SidecarError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        SidecarError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A file error on a sidecar (or its key) as a sidecar error.
impl From<FileError> for SidecarError {
    fn from(e: FileError) -> SidecarError {
        match e {
            FileError::Io { path, source } => SidecarError::Io { path, source },
            FileError::TooLarge { size, max, .. } => SidecarError::TooLarge { size, max },
            FileError::Untrusted { what, path, reason } => {
                SidecarError::Untrusted { what, path, reason }
            }
            FileError::NotRegularFile { path, kind } => SidecarError::NotRegularFile { path, kind },
        }
    }
}

/// Which VM the sidecar describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIdentity {
    /// The VM's UUID or name.
    pub id: String,
    /// Number of vCPUs; equals `vm_clock.vcpus.len()`.
    pub vcpu_count: u32,
}

/// Everything the sidecar says, without its integrity block.
///
/// Field order is part of the format: the digest covers
/// `serde_json::to_vec(&body)`, which follows struct order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarBody {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    pub vm: VmIdentity,
    /// The host the capture was taken on.
    pub source_host: HostIdentity,
    /// The capture instant: (host TSC, CLOCK_TAI), its uncertainty and the
    /// host clock's quality.
    pub capture: HostSample,
    /// The VM's clock at capture.
    pub vm_clock: VmClock,
    /// A measured (destination - source) TAI offset, when one exists.
    #[serde(default)]
    pub offset_estimate: Option<OffsetEstimate>,
    /// `"clockcarry <version>"` of the writer.
    pub created_by: String,
}

/// The integrity block: a digest, and an HMAC when a key was configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Integrity {
    /// SHA-256 of the body's canonical bytes, 64 lowercase hex digits.
    pub sha256: String,
    /// HMAC-SHA256 of the same bytes, 64 lowercase hex digits.
    #[serde(default)]
    pub hmac_sha256: Option<String>,
    /// Id of the HMAC key ([`SidecarKey::id`]), 16 lowercase hex digits.
    #[serde(default)]
    pub key_id: Option<String>,
}

/// A sealed sidecar: the body and its integrity block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    pub body: SidecarBody,
    pub integrity: Integrity,
}

/// The flat JSON shape of a [`Sidecar`] (serialisation only: parsing goes
/// through [`Sidecar::parse`], which keeps `deny_unknown_fields`).
#[derive(Serialize)]
struct FlatSidecar<'a> {
    #[serde(flatten)]
    body: &'a SidecarBody,
    integrity: &'a Integrity,
}

impl Serialize for Sidecar {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        FlatSidecar {
            body: &self.body,
            integrity: &self.integrity,
        }
        .serialize(serializer)
    }
}

/// Reads a sidecar file within [`MAX_SIDECAR_BYTES`] ([`fsio::read_bounded`]).
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    Ok(fsio::read_bounded(path, MAX_SIDECAR_BYTES)?)
}

/// Reads a sidecar only this user or root could have written
/// ([`fsio::read_trusted`]).
pub fn read_trusted(path: &Path) -> Result<Vec<u8>> {
    Ok(fsio::read_trusted("sidecar", path, MAX_SIDECAR_BYTES)?)
}

/// Writes a sidecar atomically ([`fsio::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(fsio::write_atomic(path, bytes)?)
}

/// Refuses a target an atomic write must not replace ([`fsio::check_replaceable`]).
pub fn check_replaceable(path: &Path) -> Result<()> {
    Ok(fsio::check_replaceable(path)?)
}

/// [`fsio::check_owner_and_mode`], as a sidecar error.
pub fn check_owner_and_mode(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
    forbidden: u32,
) -> Result<()> {
    Ok(fsio::check_owner_and_mode(what, path, meta, forbidden)?)
}

/// [`fsio::check_parent_dir`], as a sidecar error.
pub fn check_parent_dir(what: &'static str, path: &Path) -> Result<()> {
    Ok(fsio::check_parent_dir(what, path)?)
}

pub use crate::fsio::{file_kind, StagedFile};
