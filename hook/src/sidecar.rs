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
//! root may have written them. Key files must be private
//! ([`SidecarKey::from_file`]).
//!
//! The format is documented in `docs/sidecar.md`; the JSON Schema lives in
//! `hook/schema/sidecar-v1.schema.json`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::model::{HostIdentity, HostSample, OffsetEstimate, VmClock};

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
/// Domain separation prefix of key ids.
const KEY_ID_DOMAIN: &[u8] = b"clockcarry-key-id\0";
/// Length of a key id, in hex digits.
const KEY_ID_HEX_LEN: usize = 16;
/// Longest value quoted back in an error message, in bytes.
const MAX_QUOTED_BYTES: usize = 200;

/// Result of every sidecar operation.
pub type Result<T, E = SidecarError> = std::result::Result<T, E>;

type HmacSha256 = Hmac<Sha256>;

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

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SidecarError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        SidecarError::Io {
            path: path.to_path_buf(),
            source,
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

    fn mac(&self) -> Result<HmacSha256> {
        <HmacSha256 as Mac>::new_from_slice(&self.bytes)
            .map_err(|e| SidecarError::Key(format!("cannot key HMAC-SHA256: {e}")))
    }
}

impl SidecarBody {
    /// A version-1 body for `vm_id`; fills `format`, `version`,
    /// `vm.vcpu_count` (from `vm_clock.vcpus`) and `created_by`.
    pub fn new(
        vm_id: impl Into<String>,
        host: HostIdentity,
        capture: HostSample,
        vm_clock: VmClock,
    ) -> SidecarBody {
        SidecarBody {
            format: FORMAT.to_string(),
            version: VERSION,
            vm: VmIdentity {
                id: vm_id.into(),
                vcpu_count: u32::try_from(vm_clock.vcpus.len()).unwrap_or(u32::MAX),
            },
            source_host: host,
            capture,
            vm_clock,
            offset_estimate: None,
            created_by: concat!("clockcarry ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// The bytes the digest and the HMAC cover: `serde_json::to_vec(self)`.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| SidecarError::invalid(".", e.to_string()))
    }

    /// SHA-256 of [`Self::canonical_bytes`], lowercase hex.
    pub fn sha256_hex(&self) -> Result<String> {
        Ok(hex_lower(&Sha256::digest(self.canonical_bytes()?)))
    }

    /// The semantic rules every sidecar must meet (the parser applies them
    /// after the integrity checks; [`Sidecar::seal`] before sealing).
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(SidecarError::UnknownFormat(clip(&self.format)));
        }
        if self.version != VERSION {
            return Err(SidecarError::UnknownVersion(u64::from(self.version)));
        }
        check_text("vm.id", &self.vm.id, true, MAX_VM_ID_BYTES)?;

        let count = self.vm.vcpu_count;
        if count == 0 || count > MAX_VCPUS {
            return Err(SidecarError::invalid(
                "vm.vcpu_count",
                format!("is {count}; a VM has 1 to {MAX_VCPUS} vCPUs"),
            ));
        }
        let listed = self.vm_clock.vcpus.len();
        if usize::try_from(count).ok() != Some(listed) {
            return Err(SidecarError::invalid(
                "vm.vcpu_count",
                format!("is {count} but vm_clock.vcpus lists {listed} TSC offsets"),
            ));
        }
        let mut ids: Vec<u32> = self.vm_clock.vcpus.iter().map(|v| v.id).collect();
        ids.sort_unstable();
        if let Some(dup) = ids.windows(2).find_map(|w| match w {
            [a, b] if a == b => Some(*a),
            _ => None,
        }) {
            let at = self
                .vm_clock
                .vcpus
                .iter()
                .enumerate()
                .filter(|(_, v)| v.id == dup)
                .map(|(i, _)| i)
                .nth(1)
                .unwrap_or(0);
            return Err(SidecarError::invalid(
                format!("vm_clock.vcpus[{at}].id"),
                format!("vCPU id {dup} appears more than once"),
            ));
        }

        let host = &self.source_host;
        check_text(
            "source_host.hostname",
            &host.hostname,
            true,
            MAX_HOST_STRING_BYTES,
        )?;
        check_text(
            "source_host.boot_id",
            &host.boot_id,
            true,
            MAX_HOST_STRING_BYTES,
        )?;
        check_text(
            "source_host.kernel_release",
            &host.kernel_release,
            false,
            MAX_HOST_STRING_BYTES,
        )?;
        check_text(
            "source_host.clocksource",
            &host.clocksource,
            false,
            MAX_HOST_STRING_BYTES,
        )?;
        check_tsc_khz("source_host.tsc_khz", host.tsc_khz)?;

        let cap = &self.capture;
        if cap.tai_ns == 0 {
            return Err(SidecarError::invalid(
                "capture.tai_ns",
                "is 0: the capture instant is missing",
            ));
        }
        if cap.uncertainty_ns > MAX_UNCERTAINTY_NS {
            return Err(SidecarError::invalid(
                "capture.uncertainty_ns",
                format!(
                    "is {} ns; at most {MAX_UNCERTAINTY_NS} ns (1 s) is accepted",
                    cap.uncertainty_ns
                ),
            ));
        }
        if !(0..=MAX_TAI_OFFSET_S).contains(&cap.tai_offset_s) {
            return Err(SidecarError::invalid(
                "capture.tai_offset_s",
                format!(
                    "is {} s; TAI - UTC lies in 0..={MAX_TAI_OFFSET_S} s",
                    cap.tai_offset_s
                ),
            ));
        }

        let clock = &self.vm_clock;
        check_tsc_khz("vm_clock.tsc_khz", clock.tsc_khz)?;
        if let Some(pvti) = &clock.pvti {
            if pvti.tsc_to_system_mul == 0 {
                return Err(SidecarError::invalid(
                    "vm_clock.pvti.tsc_to_system_mul",
                    "is 0: the TSC-to-ns line would be flat",
                ));
            }
            if !(-32..=32).contains(&pvti.tsc_shift) {
                return Err(SidecarError::invalid(
                    "vm_clock.pvti.tsc_shift",
                    format!("is {}; KVM produces shifts in -32..=32", pvti.tsc_shift),
                ));
            }
        }
        match (clock.pvti.is_some(), clock.pvti_source.is_some()) {
            (true, false) => {
                return Err(SidecarError::invalid(
                    "vm_clock.pvti_source",
                    "is absent but vm_clock.pvti is present: say where the PVTI came from",
                ))
            }
            (false, true) => {
                return Err(SidecarError::invalid(
                    "vm_clock.pvti_source",
                    "is present but vm_clock.pvti is absent",
                ))
            }
            _ => {}
        }
        if let Some(scaling) = &clock.tsc_scaling {
            if scaling.frac_bits != 32 && scaling.frac_bits != 48 {
                return Err(SidecarError::invalid(
                    "vm_clock.tsc_scaling.frac_bits",
                    format!(
                        "is {}; hardware uses 48 (Intel VMX) or 32 (AMD SVM)",
                        scaling.frac_bits
                    ),
                ));
            }
            if scaling.ratio == 0 {
                return Err(SidecarError::invalid(
                    "vm_clock.tsc_scaling.ratio",
                    "is 0: the guest TSC would stand still",
                ));
            }
        }
        check_text("created_by", &self.created_by, true, MAX_HOST_STRING_BYTES)?;
        Ok(())
    }

    /// Refuses a capture later than `now_tai_ns + error_bound_ns` (a clock
    /// on one of the hosts is wrong, or the file is not what it says).
    pub fn check_capture_not_in_future(&self, now_tai_ns: u64, error_bound_ns: u64) -> Result<()> {
        let capture = self.capture.tai_ns;
        if capture > now_tai_ns.saturating_add(error_bound_ns) {
            return Err(SidecarError::CaptureInFuture {
                ahead_ns: capture.saturating_sub(now_tai_ns),
                bound_ns: error_bound_ns,
            });
        }
        Ok(())
    }
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

fn check_text(field: &str, s: &str, required: bool, max_bytes: usize) -> Result<()> {
    if required && s.is_empty() {
        return Err(SidecarError::invalid(field, "is empty"));
    }
    if s.len() > max_bytes {
        return Err(SidecarError::invalid(
            field,
            format!(
                "is {} bytes long; at most {max_bytes} are accepted",
                s.len()
            ),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(SidecarError::invalid(field, "contains control characters"));
    }
    Ok(())
}

fn check_tsc_khz(field: &str, khz: u32) -> Result<()> {
    if khz == 0 {
        return Err(SidecarError::invalid(
            field,
            "is 0 kHz: a TSC rate of zero is impossible (the rate was not read)",
        ));
    }
    if khz > MAX_TSC_KHZ {
        return Err(SidecarError::invalid(
            field,
            format!("is {khz} kHz; at most {MAX_TSC_KHZ} kHz (100 GHz) is accepted"),
        ));
    }
    Ok(())
}

/// At most [`MAX_QUOTED_BYTES`] of `s`, cut on a character boundary.
fn clip(s: &str) -> String {
    if s.len() <= MAX_QUOTED_BYTES {
        return s.to_string();
    }
    let mut end = MAX_QUOTED_BYTES;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or_default())
}

fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| hex_val(c).is_some())
}

/// 64 lowercase hex digits to 32 bytes.
fn parse_hex_32(s: &str) -> Option<[u8; 32]> {
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
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn max_bytes_u64() -> u64 {
    u64::try_from(MAX_SIDECAR_BYTES).unwrap_or(u64::MAX)
}

/// Reads a sidecar file, refusing one over [`MAX_SIDECAR_BYTES`] without
/// reading it whole (its size is checked first, and the read stops one byte
/// past the limit for files whose size is not known in advance).
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| SidecarError::io(path, e))?;
    let meta = file.metadata().map_err(|e| SidecarError::io(path, e))?;
    read_open(path, file, &meta)
}

/// [`read_bounded`], for a sidecar that only this user or root could have
/// written: the opened file must be owned by the effective user or root
/// and not writable by group or others, and a regular file must sit in a
/// directory nobody else could replace it in ([`check_parent_dir`]).
/// Otherwise [`SidecarError::Untrusted`], naming the reason. (A pipe such
/// as `/dev/stdin` has no directory entry to replace: only its owner and
/// mode are checked.)
pub fn read_trusted(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| SidecarError::io(path, e))?;
    let meta = file.metadata().map_err(|e| SidecarError::io(path, e))?;
    check_owner_and_mode("sidecar", path, &meta, 0o022)?;
    if meta.is_file() {
        check_parent_dir("sidecar", path)?;
    }
    read_open(path, file, &meta)
}

/// The effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses ([`SidecarError::Untrusted`]) a file, described by `meta` (best
/// taken from the opened file, so no symlink or rename stands in between),
/// that is owned by someone other than the effective user or root, or has
/// any of the permission bits `forbidden` (`0o022`: writable by group or
/// others; `0o066`: readable or writable by them).
pub fn check_owner_and_mode(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
    forbidden: u32,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let untrusted = |reason: String| SidecarError::Untrusted {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(untrusted(format!(
            "is owned by uid {}, not by this user (uid {me}) or root",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & forbidden != 0 {
        let how = if forbidden & 0o044 != 0 {
            "readable or writable"
        } else {
            "writable"
        };
        return Err(untrusted(format!(
            "is {how} by group or others (mode {mode:04o})"
        )));
    }
    Ok(())
}

/// Refuses ([`SidecarError::Untrusted`]) a file whose directory (that of
/// its canonical path, symlinks resolved) would let someone other than the
/// effective user or root replace it: a directory owned by another user,
/// or one writable by group or others without the sticky bit (with it, as
/// on `/tmp`, only a file's owner may rename or remove it). Directories
/// further up are not examined.
pub fn check_parent_dir(what: &'static str, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(path).map_err(|e| SidecarError::io(path, e))?;
    let Some(dir) = real.parent() else {
        return Ok(());
    };
    let meta = std::fs::metadata(dir).map_err(|e| SidecarError::io(dir, e))?;
    let untrusted = |reason: String| SidecarError::Untrusted {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(untrusted(format!(
            "is in directory {}, owned by uid {} (not this user, uid {me}, nor root), who could have replaced it",
            dir.display(),
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(untrusted(format!(
            "is in directory {}, writable by group or others without the sticky bit \
             (mode {mode:04o}): anyone could have replaced it",
            dir.display()
        )));
    }
    Ok(())
}

/// Reads an opened sidecar file within [`MAX_SIDECAR_BYTES`].
fn read_open(path: &Path, file: File, meta: &std::fs::Metadata) -> Result<Vec<u8>> {
    if meta.is_file() && meta.len() > max_bytes_u64() {
        return Err(SidecarError::TooLarge {
            size: meta.len(),
            max: max_bytes_u64(),
        });
    }
    let mut bytes = Vec::with_capacity(
        usize::try_from(meta.len())
            .unwrap_or(0)
            .min(MAX_SIDECAR_BYTES),
    );
    file.take(max_bytes_u64().saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| SidecarError::io(path, e))?;
    if bytes.len() > MAX_SIDECAR_BYTES {
        return Err(SidecarError::TooLarge {
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            max: max_bytes_u64(),
        });
    }
    Ok(bytes)
}

/// What a file type is, for messages: "a regular file", "a directory", "a
/// symbolic link", "a FIFO", "a socket", "a character device", "a block
/// device".
pub fn file_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "a file of unknown type"
    }
}

/// Whether an atomic write may put a file at `path`: nothing is there, or
/// a regular file is. Anything else (a directory, a device such as
/// `/dev/full`, a FIFO, a socket, a symbolic link, dangling or not: the
/// path is examined with `lstat`, never followed) is
/// [`SidecarError::NotRegularFile`], since a rename would replace it.
pub fn check_replaceable(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(meta) => Err(SidecarError::NotRegularFile {
            path: path.to_path_buf(),
            kind: file_kind(&meta.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SidecarError::io(path, e)),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
/// Temp names tried before giving up (each collision is a leftover file).
const TEMP_ATTEMPTS: u32 = 64;

/// The first stage of an atomic write: the new content, complete and
/// fsynced, in a temp file next to the target. [`StagedFile::commit`]
/// renames it over the target; dropping it uncommitted removes it, and a
/// crash before the commit leaves the target as it was. Only a missing
/// target or a regular file is ever replaced ([`check_replaceable`], at
/// both stages).
#[derive(Debug)]
pub struct StagedFile {
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Creates `.<filename>.tmp-<pid>-<counter>` in the target's directory
    /// (O_CREAT|O_EXCL, mode 0600; an existing name is skipped, never
    /// overwritten), writes `bytes` and fsyncs it. Refuses first, with
    /// [`SidecarError::NotRegularFile`], a target that exists and is not a
    /// regular file.
    pub fn create(path: &Path, bytes: &[u8]) -> Result<StagedFile> {
        let name = path.file_name().ok_or_else(|| {
            SidecarError::io(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
            )
        })?;
        check_replaceable(path)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let pid = std::process::id();
        for _ in 0..TEMP_ATTEMPTS {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut temp_name = OsString::from(".");
            temp_name.push(name);
            temp_name.push(format!(".tmp-{pid}-{n}"));
            let temp = dir.join(temp_name);
            let file = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SidecarError::io(&temp, e)),
            };
            let staged = StagedFile {
                temp,
                target: path.to_path_buf(),
                dir,
                committed: false,
            };
            // On error `staged` drops here and removes the temp file.
            staged.fill(file, bytes)?;
            return Ok(staged);
        }
        Err(SidecarError::io(
            path,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "no free temporary file name next to the target",
            ),
        ))
    }

    fn fill(&self, mut file: File, bytes: &[u8]) -> Result<()> {
        let err = |e| SidecarError::io(&self.temp, e);
        // The umask may have removed bits but never adds any: make it 0600.
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(err)?;
        file.write_all(bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(())
    }

    /// The temp file holding the staged content.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The file the commit will replace.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temp file over the target, then fsyncs the directory so
    /// the rename itself is durable. The target is checked again first
    /// ([`check_replaceable`]): something that appeared there since
    /// [`StagedFile::create`] and is not a regular file is left alone (the
    /// temp file is removed).
    pub fn commit(mut self) -> Result<()> {
        check_replaceable(&self.target)?;
        std::fs::rename(&self.temp, &self.target).map_err(|e| SidecarError::io(&self.target, e))?;
        self.committed = true;
        let dir = File::open(&self.dir).map_err(|e| SidecarError::io(&self.dir, e))?;
        dir.sync_all().map_err(|e| SidecarError::io(&self.dir, e))?;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` atomically: [`StagedFile::create`] then
/// [`StagedFile::commit`]. Readers see the old file or the new one, never a
/// mix, and after a crash the target is one of the two. A target that is
/// not a regular file (a device, a directory, a FIFO, a socket, a symbolic
/// link) is refused, never replaced: [`SidecarError::NotRegularFile`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    StagedFile::create(path, bytes)?.commit()
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

    #[test]
    fn key_id_is_domain_separated() {
        let key = SidecarKey::from_bytes(b"0123456789abcdef").unwrap();
        let plain = hex_lower(&Sha256::digest(b"0123456789abcdef"));
        assert_eq!(key.id().len(), 16);
        assert_ne!(key.id(), &plain[..16]);
        assert!(!format!("{key:?}").contains("0123456789abcdef"));
    }
}
