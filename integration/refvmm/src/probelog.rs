//! The probe log: one JSON line per guest report, stamped with host TAI.
//!
//! ```text
//! {"vm":"src","vcpu":0,"seq":12,"tsc":...,"pvti":{...},"kvmclock_ns":...,
//!  "tai_ns":...,"host_tsc":...,"tsc_offset":0,"stamp_width":80}
//! ```
//!
//! Logs of several VMM processes (source and destination of a migration)
//! are read together by [`read_logs`] and analysed by [`crate::analysis`].

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::probe::{GuestReport, ReportedPvti};
use crate::stamp::Stamp;

/// One logged report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedReport {
    /// Label of the VMM process that received it (`--name`).
    pub vm: String,
    pub vcpu: u32,
    pub seq: u64,
    pub tsc: u64,
    pub pvti: ReportedPvti,
    /// kvm-clock the guest computes from `tsc` and `pvti`, ns.
    pub kvmclock_ns: Option<u64>,
    /// Host CLOCK_TAI when the report reached the VMM, ns.
    pub tai_ns: Option<u64>,
    /// Host TSC at that instant.
    pub host_tsc: Option<u64>,
    /// The vCPU's TSC offset as KVM reported it while this report was made
    /// (guest TSC = host TSC + offset, no scaling here).
    #[serde(default)]
    pub tsc_offset: Option<i64>,
    /// Width of the (TSC, TAI, TSC) bracket of the stamp, cycles.
    #[serde(default)]
    pub stamp_width: Option<u64>,
}

impl LoggedReport {
    pub fn new(vm: &str, r: &GuestReport, stamp: Option<Stamp>) -> LoggedReport {
        LoggedReport {
            vm: vm.to_string(),
            vcpu: r.vcpu,
            seq: r.seq,
            tsc: r.tsc,
            pvti: r.pvti,
            kvmclock_ns: r.kvmclock_ns(),
            tai_ns: stamp.map(|s| s.tai_ns),
            host_tsc: stamp.map(|s| s.host_tsc),
            tsc_offset: None,
            stamp_width: stamp.map(|s| s.width_cycles),
        }
    }

    pub fn report(&self) -> GuestReport {
        GuestReport {
            vcpu: self.vcpu,
            seq: self.seq,
            tsc: self.tsc,
            pvti: self.pvti,
        }
    }
}

/// Default size at which the log is rotated, bytes (64 MiB: about a minute
/// of a busy guest's reports; the demo's runs write a few MB).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// Appends reports to a file, one line each (shared by the vCPU threads).
///
/// Bounded: a line that would take the file past `max_bytes` first moves
/// it to `<path>.1` (replacing the previous one), so the log never holds
/// more than about twice `max_bytes`, and [`read_logs`] reads `<path>.1`
/// before `<path>`, the reports in order.
#[derive(Debug)]
pub struct ProbeLog {
    state: Mutex<LogFile>,
}

#[derive(Debug)]
struct LogFile {
    file: File,
    path: PathBuf,
    written: u64,
    max_bytes: u64,
}

/// Where a rotated log's older part goes.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl ProbeLog {
    /// Opens `path` for appending (created if missing), rotated at
    /// [`DEFAULT_MAX_BYTES`].
    pub fn open(path: &Path) -> std::io::Result<ProbeLog> {
        ProbeLog::open_bounded(path, DEFAULT_MAX_BYTES)
    }

    /// Opens `path` for appending, rotated at `max_bytes` (at least 1).
    pub fn open_bounded(path: &Path, max_bytes: u64) -> std::io::Result<ProbeLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(ProbeLog {
            state: Mutex::new(LogFile {
                file,
                path: path.to_path_buf(),
                written,
                max_bytes: max_bytes.max(1),
            }),
        })
    }

    /// Writes one line; errors are dropped (a full disk must not stop the guest).
    pub fn write(&self, report: &LoggedReport) {
        let Ok(mut line) = serde_json::to_vec(report) else {
            return;
        };
        line.push(b'\n');
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        if st.written > 0 && st.written.saturating_add(len) > st.max_bytes {
            st.rotate();
        }
        if st.file.write_all(&line).is_ok() {
            st.written = st.written.saturating_add(len);
        }
    }
}

impl LogFile {
    /// `path` -> `path.1`, and a new empty `path`. On an error the old file
    /// is kept and written on (never a lost guest).
    fn rotate(&mut self) {
        if std::fs::rename(&self.path, rotated_path(&self.path)).is_err() {
            return;
        }
        if let Ok(f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            self.file = f;
            self.written = 0;
        }
    }
}

/// Reads every parseable line of the given logs (others are skipped),
/// in file order.
pub fn read_logs(paths: &[&Path]) -> std::io::Result<Vec<LoggedReport>> {
    let mut out = Vec::new();
    let with_rotated: Vec<PathBuf> = paths
        .iter()
        .flat_map(|p| [rotated_path(p), p.to_path_buf()])
        .collect();
    for path in &with_rotated {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).lines() {
            if let Ok(r) = serde_json::from_str::<LoggedReport>(&line?) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Reads the probe's text lines from a serial log (another VMM's COM1
/// file). They carry no host stamp.
pub fn read_serial(path: &Path, vm: &str) -> std::io::Result<Vec<LoggedReport>> {
    let file = File::open(path)?;
    let mut out = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if let Some(r) = std::str::from_utf8(&line)
            .ok()
            .and_then(GuestReport::from_text_line)
        {
            out.push(LoggedReport::new(vm, &r, None));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seq: u64) -> LoggedReport {
        LoggedReport {
            vm: "t".into(),
            vcpu: 0,
            seq,
            tsc: seq * 1000,
            pvti: ReportedPvti {
                version: 2,
                tsc_timestamp: 0,
                system_time: 0,
                tsc_to_system_mul: 1,
                tsc_shift: 0,
                flags: 0,
            },
            kvmclock_ns: None,
            tai_ns: None,
            host_tsc: None,
            tsc_offset: None,
            stamp_width: None,
        }
    }

    /// 4 KiB cap, 2000 reports (about 400 KB unbounded): each file stays
    /// under the cap, and what is read back is the newest reports in order,
    /// ending with the last one.
    #[test]
    fn the_log_is_bounded_and_reads_back_in_order() {
        let dir = std::env::temp_dir().join(format!("probelog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.jsonl");
        let log = ProbeLog::open_bounded(&path, 4096).unwrap();
        for seq in 0..2000 {
            log.write(&report(seq));
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 4096, "{}", size(&path));
        assert!(size(&rotated_path(&path)) <= 4096);
        assert!(size(&rotated_path(&path)) > 0);
        let back = read_logs(&[&path]).unwrap();
        let seqs: Vec<u64> = back.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.last(), Some(&1999));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert!(seqs.len() > 20 && seqs.len() < 2000, "{}", seqs.len());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
