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
use std::path::Path;
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

/// Appends reports to a file, one line each (shared by the vCPU threads).
#[derive(Debug)]
pub struct ProbeLog {
    file: Mutex<File>,
}

impl ProbeLog {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: &Path) -> std::io::Result<ProbeLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(ProbeLog {
            file: Mutex::new(file),
        })
    }

    /// Writes one line; errors are dropped (a full disk must not stop the guest).
    pub fn write(&self, report: &LoggedReport) {
        if let Ok(mut line) = serde_json::to_vec(report) {
            line.push(b'\n');
            if let Ok(mut f) = self.file.lock() {
                let _ = f.write_all(&line);
            }
        }
    }
}

/// Reads every parseable line of the given logs (others are skipped),
/// in file order.
pub fn read_logs(paths: &[&Path]) -> std::io::Result<Vec<LoggedReport>> {
    let mut out = Vec::new();
    for path in paths {
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
