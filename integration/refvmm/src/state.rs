//! The saved VM: what a snapshot directory holds and a migration carries.
//!
//! A snapshot directory (`file://DIR`) has `state.json` (this
//! [`VmSnapshot`]) and `memory.bin` (all guest RAM, raw).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use clockcarry::model::KvmClockSample;
use serde::{Deserialize, Serialize};

use crate::cpu::VcpuState;

/// `format` of [`VmSnapshot`].
pub const FORMAT: &str = "clockcarry-refvmm-state";
/// `version` of [`VmSnapshot`].
pub const VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory.bin";
/// Largest state.json read, bytes.
const MAX_STATE_BYTES: u64 = 4 << 20;

/// The VM's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// What was booted (a path, or "probe" for the embedded probe).
    pub kernel: String,
}

/// A VM's saved state, without its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    pub format: String,
    pub version: u32,
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    /// The kvm-clock value the baseline restores (see [`crate::baseline`]).
    pub clock: Option<KvmClockSample>,
    /// Host CLOCK_TAI when the state was taken, ns.
    pub taken_tai_ns: u64,
    /// The VM was paused (not only parked for the save) when it was taken.
    pub paused: bool,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("URL {0:?}: expected file:///absolute/dir")]
    BadUrl(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory a `file://` URL names.
pub fn dir_from_url(url: &str) -> Result<PathBuf, StateError> {
    match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(StateError::BadUrl(url.to_string())),
    }
}

impl VmSnapshot {
    /// Checks the parts a restore relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(format!(
                "format {:?} version {}: expected {FORMAT:?} version {VERSION}",
                self.format, self.version
            ));
        }
        let n = usize::try_from(self.config.vcpus).unwrap_or(usize::MAX);
        if n == 0 || n > usize::try_from(crate::probe::MAX_VCPUS).unwrap_or(8) {
            return Err(format!(
                "{} vCPUs: 1 to {} are supported",
                self.config.vcpus,
                crate::probe::MAX_VCPUS
            ));
        }
        if self.vcpus.len() != n {
            return Err(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.config.vcpus
            ));
        }
        Ok(())
    }

    /// Writes `state.json` into `dir` (created if needed) and returns the
    /// memory file to fill.
    pub fn write_dir(&self, dir: &Path) -> Result<BufWriter<File>, StateError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let state = dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| StateError::Invalid {
            path: state.clone(),
            reason: e.to_string(),
        })?;
        let mut f = File::create(&state).map_err(io(&state))?;
        f.write_all(&json).map_err(io(&state))?;
        let mem = dir.join(MEMORY_FILE);
        Ok(BufWriter::new(File::create(&mem).map_err(io(&mem))?))
    }

    /// Reads `state.json` of `dir` and opens its memory file.
    pub fn read_dir(dir: &Path) -> Result<(VmSnapshot, File), StateError> {
        let state = dir.join(STATE_FILE);
        let len = fs::metadata(&state).map_err(io(&state))?.len();
        if len > MAX_STATE_BYTES {
            return Err(StateError::Invalid {
                path: state,
                reason: format!("{len} bytes is too large"),
            });
        }
        let bytes = fs::read(&state).map_err(io(&state))?;
        let snap: VmSnapshot = serde_json::from_slice(&bytes).map_err(|e| StateError::Invalid {
            path: state.clone(),
            reason: e.to_string(),
        })?;
        snap.validate().map_err(|reason| StateError::Invalid {
            path: state.clone(),
            reason,
        })?;
        let mem = dir.join(MEMORY_FILE);
        let file = File::open(&mem).map_err(io(&mem))?;
        Ok((snap, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            dir_from_url("file:///tmp/x").expect("ok"),
            PathBuf::from("/tmp/x")
        );
        assert!(dir_from_url("file://tmp/x").is_err());
        assert!(dir_from_url("/tmp/x").is_err());
    }

    #[test]
    fn validate_counts() {
        let mut s = VmSnapshot {
            format: FORMAT.into(),
            version: VERSION,
            config: VmConfig {
                vcpus: 2,
                memory_bytes: 4096,
                kernel: "probe".into(),
            },
            vcpus: Vec::new(),
            clock: None,
            taken_tai_ns: 0,
            paused: true,
        };
        assert!(s.validate().is_err());
        s.config.vcpus = 0;
        assert!(s.validate().is_err());
        s.config.vcpus = 9;
        assert!(s.validate().is_err());
    }
}
