//! This host's side of a capture or restore: its TSC rate, identity and a
//! (TSC, TAI) sample.
//!
//! The host TSC rate matters to the planner (rate check, error bound) and
//! must not cost a calibration inside the blackout. Sources, best first:
//!
//! 1. `--host-tsc-khz` on the command line;
//! 2. the per-boot cache `$CLOCKCARRY_RUN_DIR/host-tsc-khz.json` (default
//!    `/run/clockcarry`), valid only for the boot id it names;
//! 3. `KVM_GET_TSC_KHZ` on a scratch VM (feature `kvm`, /dev/kvm usable):
//!    exactly the rate KVM gives new vCPUs, i.e. the host's;
//! 4. [`host::host_tsc_khz`]: sysfs `tsc_freq_khz`, else a 50 ms calibration
//!    against CLOCK_MONOTONIC_RAW.
//!
//! What 3 or 4 found is written to the cache, with the kernel release and
//! the TSC flags (/proc/cpuinfo), so only the first run after a boot pays
//! for them; the boot id, hostname and clocksource are read every time. `/run` is a tmpfs (emptied at boot) and the cache is
//! trusted only when it and its directory belong to this user and nobody
//! else can write them.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use clockcarry::host::{self, TscKhzSource};
use clockcarry::model::{HostIdentity, HostSample, TscFlags};
use serde::{Deserialize, Serialize};

use super::exit::{CliError, CliResult};

/// Environment variable naming the cache directory.
pub const RUN_DIR_ENV: &str = "CLOCKCARRY_RUN_DIR";
/// Default cache directory.
pub const DEFAULT_RUN_DIR: &str = "/run/clockcarry";
/// The cache file's name.
const CACHE_FILE: &str = "host-tsc-khz.json";
/// Largest cache file read, bytes.
const MAX_CACHE_BYTES: u64 = 4096;

/// Where a host TSC rate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSource {
    CommandLine,
    KvmGetTscKhz,
    SysfsTscFreqKhz,
    CalibratedMonotonicRaw,
}

/// A host TSC rate, how it was found, and whether it came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostRate {
    pub khz: u32,
    pub source: RateSource,
    pub uncertainty_khz: u32,
    pub cached: bool,
}

/// The per-boot cache: what cannot change until the next boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheEntry {
    boot_id: String,
    khz: u32,
    source: RateSource,
    uncertainty_khz: u32,
    kernel_release: String,
    tsc_flags: TscFlags,
}

impl CacheEntry {
    fn rate(&self) -> HostRate {
        HostRate {
            khz: self.khz,
            source: self.source,
            uncertainty_khz: self.uncertainty_khz,
            cached: true,
        }
    }
}

/// The cache directory: `$CLOCKCARRY_RUN_DIR` or `/run/clockcarry`.
pub fn run_dir() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from)
}

/// Owned by us and writable by nobody else.
fn trusted(meta: &fs::Metadata) -> bool {
    let euid = nix::unistd::geteuid().as_raw();
    meta.uid() == euid && meta.mode() & 0o022 == 0
}

fn read_cache(dir: &Path, boot_id: &str) -> Option<CacheEntry> {
    let dir_meta = fs::symlink_metadata(dir).ok()?;
    if !dir_meta.is_dir() || !trusted(&dir_meta) {
        log::debug!(
            "{}: not a private directory; rate cache ignored",
            dir.display()
        );
        return None;
    }
    let path = dir.join(CACHE_FILE);
    let file = fs::File::open(&path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || !trusted(&meta) || meta.len() > MAX_CACHE_BYTES {
        log::debug!("{}: untrusted; ignored", path.display());
        return None;
    }
    let mut text = Vec::new();
    file.take(MAX_CACHE_BYTES).read_to_end(&mut text).ok()?;
    let entry: CacheEntry = serde_json::from_slice(&text).ok()?;
    if entry.boot_id != boot_id
        || entry.khz == 0
        || entry.source == RateSource::CommandLine
        || entry.kernel_release.is_empty()
        || entry.kernel_release.len() > 255
        || entry.kernel_release.chars().any(char::is_control)
    {
        return None;
    }
    Some(entry)
}

fn write_cache(dir: &Path, entry: &CacheEntry) {
    let result = (|| -> Result<(), String> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| e.to_string())?;
        }
        let meta = fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
        if !meta.is_dir() || !trusted(&meta) {
            return Err("not a private directory".into());
        }
        let mut bytes = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        clockcarry::fsio::write_atomic(&dir.join(CACHE_FILE), &bytes).map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        log::debug!("host TSC rate not cached in {}: {e}", dir.display());
    }
}

/// `KVM_GET_TSC_KHZ` on a scratch VM: the rate KVM gives a new vCPU, which
/// is the host's own `tsc_khz`.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn kvm_tsc_khz() -> Option<u32> {
    use clockcarry::kvm::sys;
    if !Path::new("/dev/kvm").exists() {
        return None;
    }
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| log::debug!("/dev/kvm: {e}"))
        .ok()?;
    let vm = kvm
        .create_vm()
        .map_err(|e| log::debug!("KVM_CREATE_VM: {e}"))
        .ok()?;
    if vm.check_extension_raw(sys::KVM_CAP_VM_TSC_CONTROL as libc::c_ulong) > 0 {
        if let Ok(khz) = sys::vm_get_tsc_khz(&vm) {
            return Some(khz).filter(|k| *k > 0);
        }
    }
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| log::debug!("KVM_CREATE_VCPU: {e}"))
        .ok()?;
    sys::vcpu_get_tsc_khz(&vcpu)
        .map_err(|e| log::debug!("{e}"))
        .ok()
        .filter(|k| *k > 0)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn kvm_tsc_khz() -> Option<u32> {
    None
}

/// The host TSC rate from KVM, sysfs or a calibration (sources 3 and 4).
fn measure_rate() -> CliResult<HostRate> {
    if let Some(khz) = kvm_tsc_khz() {
        return Ok(HostRate {
            khz,
            source: RateSource::KvmGetTscKhz,
            uncertainty_khz: 0,
            cached: false,
        });
    }
    let t = host::host_tsc_khz()
        .map_err(|e| CliError::internal(format!("cannot find the host TSC rate: {e}")))?;
    Ok(HostRate {
        khz: t.khz,
        source: match t.source {
            TscKhzSource::SysfsTscFreqKhz => RateSource::SysfsTscFreqKhz,
            TscKhzSource::CalibratedMonotonicRaw => RateSource::CalibratedMonotonicRaw,
        },
        uncertainty_khz: t.uncertainty_khz,
        cached: false,
    })
}

/// The host TSC rate; see the module documentation for the order.
pub fn host_rate(override_khz: Option<u32>, boot_id: &str) -> CliResult<HostRate> {
    identity_with(override_khz, boot_id).map(|(_, rate)| rate)
}

fn host_err(e: host::HostError) -> CliError {
    CliError::internal(format!("cannot measure this host: {e}"))
}

/// Identity and rate; the sample is taken separately so it sits as close as
/// possible to the moment it is used. The boot id, hostname and
/// clocksource are read every time; the rate, kernel release and TSC flags
/// come from the per-boot cache when it is valid (and fill it otherwise).
pub fn identity(override_khz: Option<u32>) -> CliResult<(HostIdentity, HostRate)> {
    let boot_id = host::boot_id().map_err(host_err)?;
    identity_with(override_khz, &boot_id)
}

fn identity_with(override_khz: Option<u32>, boot_id: &str) -> CliResult<(HostIdentity, HostRate)> {
    let dir = run_dir();
    let (kernel_release, tsc_flags, rate) = match (read_cache(&dir, boot_id), override_khz) {
        (Some(entry), None) => {
            let rate = entry.rate();
            (entry.kernel_release, entry.tsc_flags, rate)
        }
        (cached, _) => {
            let (kernel_release, tsc_flags) = match cached {
                Some(entry) => (entry.kernel_release, entry.tsc_flags),
                None => (
                    host::kernel_release().map_err(host_err)?,
                    host::tsc_flags().map_err(host_err)?,
                ),
            };
            let rate = match override_khz {
                Some(khz) => HostRate {
                    khz,
                    source: RateSource::CommandLine,
                    uncertainty_khz: 0,
                    cached: false,
                },
                None => {
                    let rate = measure_rate()?;
                    log::debug!(
                        "host TSC rate {} kHz from {:?}; caching it in {}",
                        rate.khz,
                        rate.source,
                        dir.display()
                    );
                    write_cache(
                        &dir,
                        &CacheEntry {
                            boot_id: boot_id.to_string(),
                            khz: rate.khz,
                            source: rate.source,
                            uncertainty_khz: rate.uncertainty_khz,
                            kernel_release: kernel_release.clone(),
                            tsc_flags,
                        },
                    );
                    rate
                }
            };
            (kernel_release, tsc_flags, rate)
        }
    };
    if rate.khz == 0 {
        return Err(CliError::internal("host TSC rate of 0 kHz"));
    }
    let identity = HostIdentity {
        hostname: host::hostname().map_err(host_err)?,
        boot_id: boot_id.to_string(),
        kernel_release,
        tsc_khz: rate.khz,
        tsc_flags,
        clocksource: host::clocksource().map_err(host_err)?,
    };
    Ok((identity, rate))
}

/// A best-of-[`host::DEFAULT_TRIES`] (TSC, TAI) sample at `khz`.
pub fn sample(khz: u32) -> CliResult<HostSample> {
    host::sample(host::DEFAULT_TRIES, khz).map_err(host_err)
}

/// What `check` would fail on this host, from what `capture` and `restore`
/// read anyway: each a warning naming the fix. `uses_tai`: whether the
/// operation relies on this host's CLOCK_TAI (a capture may go anywhere;
/// a same-host or freeze restore does not use it).
pub fn host_warnings(identity: &HostIdentity, sample: &HostSample, uses_tai: bool) -> Vec<String> {
    let mut out = Vec::new();
    if uses_tai && sample.tai_offset_s == 0 {
        out.push(
            "this host's kernel does not know TAI - UTC (adjtimex tai = 0): CLOCK_TAI is UTC \
             here, so leap seconds leak in and hosts that know the offset disagree with it by \
             37 s; set it (chrony: `leapsectz right/UTC`; ntpd: `leapfile`; ptp4l sets it), \
             see `clockcarry check`"
                .to_string(),
        );
    }
    if uses_tai && !sample.quality.synchronised {
        out.push(format!(
            "this host's clock is NOT synchronised (adjtimex): a cross-host restore counts its \
             maxerror ({}) in the error bound and --require-sync refuses it; start and sync \
             its time service (chronyd, ntpd, ptp4l), see `clockcarry check`",
            super::units::human_ns(sample.quality.maxerror_ns)
        ));
    }
    let f = &identity.tsc_flags;
    if !f.constant_tsc || !f.nonstop_tsc {
        out.push(format!(
            "this host's TSC is not constant and non-stop (constant_tsc {}, nonstop_tsc {} in \
             /proc/cpuinfo): guest TSC arithmetic assumes both; do not carry VMs to or from \
             this host",
            f.constant_tsc, f.nonstop_tsc
        ));
    }
    out
}

#[cfg(test)]
mod warning_tests {
    use super::host_warnings;
    use clockcarry::model::{ClockQuality, HostIdentity, HostSample, LeapPending, TscFlags};

    fn host(constant: bool, nonstop: bool) -> HostIdentity {
        HostIdentity {
            hostname: "h".into(),
            boot_id: "b".into(),
            kernel_release: "6.1".into(),
            tsc_khz: 2_000_000,
            tsc_flags: TscFlags {
                constant_tsc: constant,
                nonstop_tsc: nonstop,
                tsc_known_freq: true,
            },
            clocksource: "tsc".into(),
        }
    }

    fn sample(tai_offset_s: i32, synchronised: bool) -> HostSample {
        HostSample {
            host_tsc: 1,
            tai_ns: 1,
            realtime_ns: 1,
            tai_offset_s,
            uncertainty_ns: 10,
            quality: ClockQuality {
                synchronised,
                maxerror_ns: 16_000_000_000,
                esterror_ns: 0,
                leap_pending: LeapPending::None,
            },
        }
    }

    #[test]
    fn a_good_host_gets_no_warning() {
        assert!(host_warnings(&host(true, true), &sample(37, true), true).is_empty());
    }

    #[test]
    fn each_failing_check_is_a_warning_naming_the_fix() {
        let w = host_warnings(&host(true, true), &sample(0, true), true);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("leapsectz right/UTC"), "{w:?}");
        let w = host_warnings(&host(true, true), &sample(37, false), true);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("NOT synchronised") && w[0].contains("chronyd"),
            "{w:?}"
        );
        let w = host_warnings(&host(false, true), &sample(37, true), true);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("constant_tsc false"), "{w:?}");
        assert_eq!(
            host_warnings(&host(true, false), &sample(0, false), true).len(),
            3
        );
    }

    #[test]
    fn the_clock_checks_only_where_tai_is_used() {
        assert!(host_warnings(&host(true, true), &sample(0, false), false).is_empty());
        assert_eq!(
            host_warnings(&host(true, false), &sample(0, false), false).len(),
            1
        );
    }
}
