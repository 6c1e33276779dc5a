//! The JSON report the resync helper writes for every run:
//! `REPORT_DIR/<uuid>-<YYYYmmddTHHMMSS>Z.json`, mode 0600, written
//! atomically and never over an existing report.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::secure_dir;
use super::LibvirtError;

/// The `format` field.
pub const REPORT_FORMAT: &str = "clockcarry-libvirt-resync";
/// What a QEMU domain keeps losing, said in every report.
pub const NOT_PRESERVED: &str = "tsc and kvm-clock not preserved: QEMU offers no clock control";

/// An estimate of guest wall clock minus host wall clock.
///
/// virsh prints the guest time in whole seconds (truncated), so one reading
/// pins the offset only to an interval about 1 s wide; readings that
/// straddle a guest second boundary narrow it to about one virsh round
/// trip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsetReport {
    /// Centre of the interval, seconds (negative: guest behind).
    pub offset_s: f64,
    /// Half the interval's width, seconds.
    pub uncertainty_s: f64,
    /// Readings used.
    pub readings: u32,
}

/// The blackout, when the hook could bound it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackoutReport {
    /// `started begin` minus the last `stopped end` on this host, seconds.
    /// The guest was paused before that stop and resumes after `started
    /// begin`, so the real blackout is longer.
    pub lower_bound_s: f64,
    pub basis: String,
}

/// A resync report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncReport {
    pub format: String,
    pub version: u32,
    pub domain: String,
    pub uuid: String,
    pub trigger: String,
    /// `synced`, `failed`, `timeout`, `domain-gone`, `superseded`.
    pub outcome: String,
    pub started_begin_at: String,
    pub finished_at: String,
    pub blackout: Option<BlackoutReport>,
    /// The command that set the clock (argv, no shell), if one succeeded.
    pub method: String,
    pub set_command: Option<Vec<String>>,
    /// Seconds from `started begin` until virsh reported the domain running.
    pub wait_running_s: Option<f64>,
    /// Guest minus host before the correction.
    pub offset_before: Option<OffsetReport>,
    /// Guest minus host after the correction.
    pub offset_after: Option<OffsetReport>,
    /// `offset_after - offset_before`, seconds: the step applied to the
    /// guest's wall clock (positive: moved forward).
    pub correction_s: Option<f64>,
    /// Round trip of the first successful guest-time read (virsh, libvirtd,
    /// guest agent), milliseconds.
    pub agent_latency_ms: Option<f64>,
    /// Aligned set: how long before host second `S` virsh was started (the
    /// fastest of the reads before the set), milliseconds.
    pub set_lead_ms: Option<f64>,
    /// Duration of the successful set command, milliseconds.
    pub set_latency_ms: Option<f64>,
    /// Agent calls made (reads and sets, failed ones included).
    pub attempts: u32,
    /// The last errors seen (at most a few).
    pub errors: Vec<String>,
    pub tsc_and_kvm_clock: String,
    pub note: String,
}

/// Writes `report` into `dir` (created 0700 if missing) as
/// `<uuid>-<YYYYmmddTHHMMSS>Z.json`, adding `-2`, `-3`, ... rather than
/// replacing an existing report. Returns the path.
pub fn write_report(
    dir: &Path,
    report: &ResyncReport,
    at_ns: u64,
) -> Result<PathBuf, LibvirtError> {
    secure_dir(dir, 0o700)?;
    let uuid = super::args::DomainUuid::parse(&report.uuid)?;
    let mut bytes = serde_json::to_vec_pretty(report)
        .map_err(|e| LibvirtError::State(format!("serialising the report: {e}")))?;
    bytes.push(b'\n');
    let stamp = compact_stamp(at_ns);
    let staged =
        clockcarry::fsio::StagedFile::create(&dir.join(format!("{uuid}.json.new")), &bytes)
            .map_err(|e| LibvirtError::State(format!("staging the report: {e}")))?;
    for n in 1u32..=100 {
        let name = if n == 1 {
            format!("{uuid}-{stamp}.json")
        } else {
            format!("{uuid}-{stamp}-{n}.json")
        };
        let target = dir.join(name);
        // link(2) never replaces an existing file: no report is clobbered.
        match fs::hard_link(staged.temp_path(), &target) {
            Ok(()) => {
                // Dropping the uncommitted stage removes the temp name.
                drop(staged);
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
                return Ok(target);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(LibvirtError::io(&target, e)),
        }
    }
    Err(LibvirtError::State(format!(
        "no free report name for {uuid} at {stamp} in {}",
        dir.display()
    )))
}

pub use clockcarry::timefmt::{compact_stamp, rfc3339_ns};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(compact_stamp(951_782_400_000_000_000), "20000229T000000Z");
        assert_eq!(
            rfc3339_ns(1_795_754_622_500_000_000),
            "2026-11-27T04:43:42.500000000Z"
        );
        assert_eq!(compact_stamp(4_102_444_799_000_000_000), "20991231T235959Z");
    }
}
