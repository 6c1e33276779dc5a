//! Host time and host identity: CLOCK_TAI, read-only `adjtimex`, the
//! `(rdtsc, clock_gettime(CLOCK_TAI), rdtsc)` bracket, boot id, TSC flags,
//! clocksource and the host TSC rate.
//!
//! Everything here only *reads*: no clock is ever set, `adjtimex` is called
//! with `modes = 0`. Every function is total: failures come back as a
//! [`HostError`] naming the file or call (and the errno), never as a panic.
//! Files are read with a size bound and their content is validated (UTF-8,
//! no control characters, bounded length).
//!
//! The TSC is read with `rdtsc`, so the bracket functions exist on x86-64
//! only; elsewhere they return [`HostError::TscUnsupported`]. See
//! `docs/host.md` for the method and what the uncertainty means.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use nix::sys::utsname::uname;
use nix::time::{clock_gettime, ClockId};
use serde::{Deserialize, Serialize};

use crate::model::{ClockQuality, HostIdentity, HostSample, LeapPending, TscFlags};

/// Brackets taken by [`sample`] when the caller has no better figure.
pub const DEFAULT_TRIES: u32 = 16;
/// Default calibration window of [`host_tsc_khz`] when it has to measure.
pub const DEFAULT_CALIBRATION_WINDOW: Duration = Duration::from_millis(50);
/// Added to every uncertainty: `clock_gettime` truncates to whole ns.
pub const CLOCK_RESOLUTION_NS: u64 = 1;

/// `/proc/sys/kernel/random/boot_id`: a fresh random UUID every boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
/// `/proc/sys/kernel/osrelease`: the running kernel's release string.
pub const OSRELEASE_PATH: &str = "/proc/sys/kernel/osrelease";
/// `/proc/cpuinfo`: only the first processor block is needed.
pub const CPUINFO_PATH: &str = "/proc/cpuinfo";
/// The clocksource the kernel's timekeeping currently runs on.
pub const CLOCKSOURCE_PATH: &str =
    "/sys/devices/system/clocksource/clocksource0/current_clocksource";
/// The kernel's `tsc_khz`, exported by some kernels / vendor patches only.
pub const TSC_FREQ_KHZ_PATH: &str = "/sys/devices/system/cpu/cpu0/tsc_freq_khz";

/// Read at most this much of `/proc/cpuinfo` (the first block is < 4 KiB).
const CPUINFO_LIMIT_BYTES: usize = 1 << 20;
/// Single-value files (`boot_id`, `osrelease`, ...) larger than this are refused.
const SMALL_FILE_LIMIT_BYTES: usize = 4096;
/// Longest accepted single-value string (hostname, release, clocksource).
const MAX_TEXT_LEN: usize = 256;

const NS_PER_S: u64 = 1_000_000_000;
/// ns per ms: `ns = cycles * NS_PER_MS / khz` because 1 kHz = 1 cycle per ms.
const NS_PER_MS: u128 = 1_000_000;

// Kernel ABI values (include/uapi/linux/timex.h); spelled out here so the
// module does not depend on which libc flavour exports them.
const TIME_ERROR: i32 = 5;
const STA_INS: i32 = 0x0010;
const STA_DEL: i32 = 0x0020;
const STA_UNSYNC: i32 = 0x0040;

/// How many times [`sample`] retries when the TAI offset changes under it.
const TAI_OFFSET_ATTEMPTS: u32 = 3;

/// Everything that can go wrong while reading the host's clocks and identity.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("clock_gettime({clock}) failed: errno {errno}")]
    ClockGettime { clock: &'static str, errno: i32 },
    #[error("clock_gettime({clock}) returned an out-of-range time ({tv_sec} s, {tv_nsec} ns)")]
    ClockOutOfRange {
        clock: &'static str,
        tv_sec: i64,
        tv_nsec: i64,
    },
    #[error("adjtimex (read-only, modes = 0) failed: errno {errno}")]
    Adjtimex { errno: i32 },
    #[error("uname failed: errno {errno}")]
    Uname { errno: i32 },
    #[error("prctl(PR_GET_TSC) says rdtsc is disabled for this process (PR_TSC_SIGSEGV)")]
    TscDisabled,
    /// `errno` is 0 when the failure did not come from the OS.
    #[error("{op} {path} failed: errno {errno}")]
    Io {
        op: &'static str,
        path: String,
        errno: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {limit_bytes} bytes")]
    TooLarge { path: String, limit_bytes: usize },
    #[error("{path}: invalid content: {reason}")]
    InvalidContent { path: String, reason: &'static str },
    #[error("host TSC rate of 0 kHz")]
    ZeroTscKhz,
    #[error("rdtsc is not available on {arch}: the host side of clockcarry needs x86-64")]
    TscUnsupported { arch: &'static str },
    #[error(
        "the TSC went backwards inside all {tries} brackets (TSCs not synchronised across CPUs?)"
    )]
    NoValidBracket { tries: u32 },
    #[error("the TAI offset kept changing while sampling (last {before_s} s -> {after_s} s)")]
    TaiOffsetUnstable { before_s: i32, after_s: i32 },
    #[error(
        "realtime = TAI - offset is out of range (tai_ns {tai_ns}, tai_offset_s {tai_offset_s})"
    )]
    RealtimeOutOfRange { tai_ns: u64, tai_offset_s: i32 },
    #[error("a bracket of {width_cycles} cycles does not fit in u64 ns at {host_tsc_khz} kHz")]
    UncertaintyOverflow {
        width_cycles: u64,
        host_tsc_khz: u32,
    },
    #[error("TSC calibration against CLOCK_MONOTONIC_RAW failed: {reason}")]
    Calibration { reason: &'static str },
}

impl HostError {
    /// The OS errno behind the error, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::ClockGettime { errno, .. }
            | HostError::Adjtimex { errno }
            | HostError::Uname { errno }
            | HostError::Io { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Clocks
// ---------------------------------------------------------------------------

/// A `timespec` as ns since the clock's epoch; `None` when negative,
/// not normalised, or beyond `u64` (year 2554).
fn timespec_to_ns(tv_sec: i64, tv_nsec: i64) -> Option<u64> {
    let sec = u64::try_from(tv_sec).ok()?;
    let nsec = u64::try_from(tv_nsec).ok()?;
    if nsec >= NS_PER_S {
        return None;
    }
    sec.checked_mul(NS_PER_S)?.checked_add(nsec)
}

fn clock_ns(clock: ClockId, name: &'static str) -> Result<u64, HostError> {
    let ts = clock_gettime(clock).map_err(|errno| HostError::ClockGettime {
        clock: name,
        errno: errno as i32,
    })?;
    // time_t / c_long are i64 here but i32 on some targets.
    #[allow(clippy::useless_conversion)]
    let (tv_sec, tv_nsec) = (i64::from(ts.tv_sec()), i64::from(ts.tv_nsec()));
    timespec_to_ns(tv_sec, tv_nsec).ok_or(HostError::ClockOutOfRange {
        clock: name,
        tv_sec,
        tv_nsec,
    })
}

/// `clock_gettime(CLOCK_TAI)`, ns since the epoch.
///
/// Equals CLOCK_REALTIME while the kernel's TAI offset is 0 ("unknown").
pub fn tai_now_ns() -> Result<u64, HostError> {
    clock_ns(ClockId::CLOCK_TAI, "CLOCK_TAI")
}

/// `clock_gettime(CLOCK_REALTIME)` (UTC), ns since the epoch.
pub fn realtime_now_ns() -> Result<u64, HostError> {
    clock_ns(ClockId::CLOCK_REALTIME, "CLOCK_REALTIME")
}

/// `clock_gettime(CLOCK_MONOTONIC_RAW)`, ns: the clocksource's own rate,
/// never slewed by NTP.
pub fn monotonic_raw_now_ns() -> Result<u64, HostError> {
    clock_ns(ClockId::CLOCK_MONOTONIC_RAW, "CLOCK_MONOTONIC_RAW")
}

/// Builds a [`ClockQuality`] from the raw `adjtimex` answer.
///
/// `ret` is adjtimex's return value (the clock state, 5 = TIME_ERROR),
/// `status` its `status` word, the errors in µs as the kernel reports them.
/// A negative error (never produced by a sane kernel) is read as unbounded
/// (`u64::MAX`) rather than as 0. When both STA_INS and STA_DEL are set the
/// kernel inserts, so does this.
pub fn quality_from_timex(
    ret: i32,
    status: i32,
    maxerror_us: i64,
    esterror_us: i64,
) -> ClockQuality {
    let us_to_ns = |us: i64| u64::try_from(us).map_or(u64::MAX, |us| us.saturating_mul(1000));
    let leap_pending = if status & STA_INS != 0 {
        LeapPending::Insert
    } else if status & STA_DEL != 0 {
        LeapPending::Delete
    } else {
        LeapPending::None
    };
    ClockQuality {
        synchronised: ret != TIME_ERROR && status & STA_UNSYNC == 0,
        maxerror_ns: us_to_ns(maxerror_us),
        esterror_ns: us_to_ns(esterror_us),
        leap_pending,
    }
}

/// Read-only `adjtimex` (modes = 0): the host clock's quality and the
/// kernel's TAI offset (TAI - UTC, seconds; 0 = unknown).
///
/// Never sets anything and needs no privilege.
pub fn clock_quality() -> Result<(ClockQuality, i32), HostError> {
    // Raw libc: nix has no adjtimex.
    // SAFETY: timex is plain integers; all-zero is a valid value, and
    // modes = 0 makes the call read-only.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = 0;
    // SAFETY: `tx` is a valid, writable timex that outlives the call.
    let ret = unsafe { libc::adjtimex(&mut tx) };
    if ret < 0 {
        return Err(HostError::Adjtimex {
            errno: last_errno(),
        });
    }
    // c_long is i64 here but i32 on some targets.
    #[allow(clippy::useless_conversion)]
    let (maxerror_us, esterror_us) = (i64::from(tx.maxerror), i64::from(tx.esterror));
    Ok((
        quality_from_timex(ret, tx.status, maxerror_us, esterror_us),
        tx.tai,
    ))
}

// ---------------------------------------------------------------------------
// The TSC
// ---------------------------------------------------------------------------

/// The host TSC, in cycles: the counter KVM reads as `host_tsc`.
///
/// Fenced on both sides (`lfence; rdtsc; lfence`): the first `lfence` keeps
/// the read from executing before earlier instructions have completed, the
/// second keeps later instructions (the clock read of a bracket) from
/// starting before it. With both ends of a bracket read this way the clock
/// read is really inside the bracket. On AMD, `lfence` is dispatch
/// serialising when the kernel sets the LFENCE_RDTSC bit, as Linux does.
///
/// `rdtsc` works in user space on x86-64 unless the kernel set CR4.TSD for
/// this process (`prctl(PR_SET_TSC, PR_TSC_SIGSEGV)`), in which case it
/// faults; [`sample`] and the calibration check that with `PR_GET_TSC`
/// first. On other architectures use [`try_read_host_tsc`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn read_host_tsc() -> u64 {
    use core::arch::x86_64::{_mm_lfence, _rdtsc};
    // SAFETY: lfence (SSE2) and rdtsc are baseline x86-64, no memory access.
    unsafe {
        _mm_lfence();
        let host_tsc = _rdtsc();
        _mm_lfence();
        host_tsc
    }
}

/// [`read_host_tsc`] where it exists, a typed error elsewhere.
pub fn try_read_host_tsc() -> Result<u64, HostError> {
    #[cfg(target_arch = "x86_64")]
    {
        Ok(read_host_tsc())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(HostError::TscUnsupported {
            arch: std::env::consts::ARCH,
        })
    }
}

/// Fails unless `rdtsc` can be executed by this process without faulting.
fn check_tsc_usable() -> Result<(), HostError> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut mode: libc::c_int = 0;
        // Raw libc: nix's prctl module has no PR_GET_TSC.
        // SAFETY: PR_GET_TSC writes one int through the pointer, which is
        // valid for the duration of the call.
        let rc = unsafe { libc::prctl(libc::PR_GET_TSC, &mut mode as *mut libc::c_int) };
        // A kernel without PR_GET_TSC (EINVAL) cannot disable rdtsc either.
        if rc == 0 && mode == libc::PR_TSC_SIGSEGV {
            return Err(HostError::TscDisabled);
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(HostError::TscUnsupported {
            arch: std::env::consts::ARCH,
        })
    }
}

/// One `(rdtsc, clock, rdtsc)` bracket: the clock was read while the TSC
/// was somewhere in `[tsc_before, tsc_after]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bracket {
    tsc_before: u64,
    clock_ns: u64,
    tsc_after: u64,
}

impl Bracket {
    fn width_cycles(&self) -> u64 {
        self.tsc_after.saturating_sub(self.tsc_before)
    }
}

/// The midpoint of a bracket and its half width, rounded so that every TSC
/// value in `[tsc_before, tsc_after]` is within `half_cycles` of `host_tsc`.
fn bracket_midpoint(tsc_before: u64, tsc_after: u64) -> Option<(u64, u64)> {
    if tsc_after < tsc_before {
        return None;
    }
    let mid = (u128::from(tsc_before) + u128::from(tsc_after)) / 2;
    let host_tsc = u64::try_from(mid).ok()?;
    let half_cycles = tsc_after - host_tsc; // = ceil(width / 2)
    Some((host_tsc, half_cycles))
}

/// Cycles to ns at `tsc_khz`, rounded up; `None` for 0 kHz or overflow.
pub fn cycles_to_ns_ceil(cycles: u64, tsc_khz: u32) -> Option<u64> {
    if tsc_khz == 0 {
        return None;
    }
    let khz = u128::from(tsc_khz);
    let ns = (u128::from(cycles) * NS_PER_MS).div_ceil(khz);
    u64::try_from(ns).ok()
}

/// Cycles to ns at `tsc_khz`, rounded to nearest; `None` for 0 kHz or overflow.
pub fn cycles_to_ns_round(cycles: u64, tsc_khz: u32) -> Option<u64> {
    if tsc_khz == 0 {
        return None;
    }
    let khz = u128::from(tsc_khz);
    let ns = (u128::from(cycles) * NS_PER_MS + khz / 2) / khz;
    u64::try_from(ns).ok()
}

/// `host_tsc` and `uncertainty_ns` of a bracket: the midpoint, and half the
/// width in ns (rounded up) plus the clock's own 1 ns resolution.
fn bracket_pair(b: &Bracket, tsc_khz: u32) -> Option<(u64, u64)> {
    let (host_tsc, half_cycles) = bracket_midpoint(b.tsc_before, b.tsc_after)?;
    let half_ns = cycles_to_ns_ceil(half_cycles, tsc_khz)?;
    Some((host_tsc, half_ns.checked_add(CLOCK_RESOLUTION_NS)?))
}

/// The narrower of the best so far and `b`; ties keep the earlier one, and a
/// bracket in which the TSC went backwards never wins.
fn keep_narrower(best: Option<Bracket>, b: Bracket) -> Option<Bracket> {
    if b.tsc_after < b.tsc_before {
        return best;
    }
    match best {
        Some(cur) if cur.width_cycles() <= b.width_cycles() => Some(cur),
        _ => Some(b),
    }
}

/// One bracket around `clock`.
fn take_bracket(clock: ClockId, name: &'static str) -> Result<Bracket, HostError> {
    let tsc_before = try_read_host_tsc()?;
    let clock_ns = clock_ns(clock, name)?;
    let tsc_after = try_read_host_tsc()?;
    Ok(Bracket {
        tsc_before,
        clock_ns,
        tsc_after,
    })
}

/// The narrowest of `tries` (at least 1) brackets from `take`. Brackets in
/// which the TSC went backwards are dropped; ties keep the first.
fn best_of(
    tries: u32,
    mut take: impl FnMut() -> Result<Bracket, HostError>,
) -> Result<Bracket, HostError> {
    let tries = tries.max(1);
    let mut best: Option<Bracket> = None;
    for _ in 0..tries {
        best = keep_narrower(best, take()?);
    }
    best.ok_or(HostError::NoValidBracket { tries })
}

/// The narrowest of `tries` (at least 1) brackets around `clock`.
fn best_bracket(clock: ClockId, name: &'static str, tries: u32) -> Result<Bracket, HostError> {
    best_of(tries, || take_bracket(clock, name))
}

/// `tai_ns - tai_offset_s` seconds, checked.
fn realtime_from_tai(tai_ns: u64, tai_offset_s: i32) -> Option<u64> {
    let offset_ns = i128::from(tai_offset_s) * i128::from(NS_PER_S);
    u64::try_from(i128::from(tai_ns) - offset_ns).ok()
}

/// One host instant as an atomic (host TSC, CLOCK_TAI) pair.
///
/// Takes `tries` (0 counts as 1; [`DEFAULT_TRIES`] is a good choice)
/// `(rdtsc, clock_gettime(CLOCK_TAI), rdtsc)` brackets and keeps the
/// narrowest: `host_tsc` is its midpoint, `uncertainty_ns` half its width
/// converted with `host_tsc_khz` (rounded up) plus 1 ns of clock resolution.
/// `realtime_ns` is `tai_ns` minus the kernel's TAI offset (equal to it when
/// the offset is 0, i.e. unknown). The offset and quality come from
/// [`clock_quality`] read before and after the brackets; if the offset
/// changed in between (a leap second, or a daemon setting it), sampling is
/// repeated.
pub fn sample(tries: u32, host_tsc_khz: u32) -> Result<HostSample, HostError> {
    if host_tsc_khz == 0 {
        return Err(HostError::ZeroTscKhz);
    }
    check_tsc_usable()?;
    let mut last = (0, 0);
    for _ in 0..TAI_OFFSET_ATTEMPTS {
        let (_, offset_before_s) = clock_quality()?;
        let bracket = best_bracket(ClockId::CLOCK_TAI, "CLOCK_TAI", tries)?;
        let (quality, tai_offset_s) = clock_quality()?;
        if tai_offset_s != offset_before_s {
            last = (offset_before_s, tai_offset_s);
            continue;
        }
        let (host_tsc, uncertainty_ns) =
            bracket_pair(&bracket, host_tsc_khz).ok_or(HostError::UncertaintyOverflow {
                width_cycles: bracket.width_cycles(),
                host_tsc_khz,
            })?;
        let tai_ns = bracket.clock_ns;
        let realtime_ns =
            realtime_from_tai(tai_ns, tai_offset_s).ok_or(HostError::RealtimeOutOfRange {
                tai_ns,
                tai_offset_s,
            })?;
        return Ok(HostSample {
            host_tsc,
            tai_ns,
            realtime_ns,
            tai_offset_s,
            uncertainty_ns,
            quality,
        });
    }
    Err(HostError::TaiOffsetUnstable {
        before_s: last.0,
        after_s: last.1,
    })
}

// ---------------------------------------------------------------------------
// TSC rate
// ---------------------------------------------------------------------------

/// Where a host TSC rate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TscKhzSource {
    /// `/sys/devices/system/cpu/cpu0/tsc_freq_khz`: the kernel's own
    /// `tsc_khz` (only some kernels export it).
    SysfsTscFreqKhz,
    /// Measured: `rdtsc` against CLOCK_MONOTONIC_RAW.
    CalibratedMonotonicRaw,
}

/// A host TSC rate and how it was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TscKhz {
    pub khz: u32,
    pub source: TscKhzSource,
    /// Bound on |true rate - `khz`| in kHz, relative to CLOCK_MONOTONIC_RAW
    /// (0 for the kernel's own figure: it *is* the rate KVM uses).
    pub uncertainty_khz: u32,
}

/// Bounds of `cycles / ns` in kHz given ± errors on both, and the rounded
/// estimate: `(khz, uncertainty_khz)`.
fn rate_khz(cycles: u64, cycles_err: u64, ns: u64, ns_err: u64) -> Option<(u32, u32)> {
    if cycles == 0 || ns <= ns_err {
        return None;
    }
    let (c, dc, n, dn) = (
        u128::from(cycles),
        u128::from(cycles_err),
        u128::from(ns),
        u128::from(ns_err),
    );
    let khz = (c * NS_PER_MS + n / 2) / n;
    let hi = ((c + dc) * NS_PER_MS).div_ceil(n - dn);
    let lo = (c.saturating_sub(dc) * NS_PER_MS) / (n + dn);
    let err = (hi - khz).max(khz - lo);
    let khz = u32::try_from(khz).ok().filter(|k| *k > 0)?;
    Some((khz, u32::try_from(err).unwrap_or(u32::MAX)))
}

/// Measures the host TSC rate against CLOCK_MONOTONIC_RAW over `window`
/// (50 ms gives a few ppm here). Two best-of-16 brackets around a sleep;
/// the rate is rounded to the nearest kHz and its bound accounts for both
/// brackets' half widths and the clock's 1 ns resolution.
///
/// CLOCK_MONOTONIC_RAW is never slewed; when the clocksource is `tsc` it
/// runs at the kernel's own `tsc_khz` conversion, so the result matches
/// what KVM uses to within rounding.
pub fn calibrate_tsc_khz(window: Duration) -> Result<TscKhz, HostError> {
    const RAW: &str = "CLOCK_MONOTONIC_RAW";
    check_tsc_usable()?;
    let b0 = best_bracket(ClockId::CLOCK_MONOTONIC_RAW, RAW, DEFAULT_TRIES)?;
    std::thread::sleep(window);
    let b1 = best_bracket(ClockId::CLOCK_MONOTONIC_RAW, RAW, DEFAULT_TRIES)?;
    let bad = |reason| HostError::Calibration { reason };
    let (tsc0, half0) =
        bracket_midpoint(b0.tsc_before, b0.tsc_after).ok_or(bad("TSC went backwards"))?;
    let (tsc1, half1) =
        bracket_midpoint(b1.tsc_before, b1.tsc_after).ok_or(bad("TSC went backwards"))?;
    let cycles = tsc1
        .checked_sub(tsc0)
        .ok_or(bad("TSC went backwards across the window"))?;
    let ns = b1
        .clock_ns
        .checked_sub(b0.clock_ns)
        .ok_or(bad("CLOCK_MONOTONIC_RAW went backwards"))?;
    let cycles_err = half0.saturating_add(half1);
    let ns_err = 2 * CLOCK_RESOLUTION_NS;
    let (khz, uncertainty_khz) = rate_khz(cycles, cycles_err, ns, ns_err)
        .ok_or(bad("window too short or rate out of range"))?;
    Ok(TscKhz {
        khz,
        source: TscKhzSource::CalibratedMonotonicRaw,
        uncertainty_khz,
    })
}

/// The host TSC rate, best source first:
///
/// 1. `/sys/devices/system/cpu/cpu0/tsc_freq_khz` when the kernel exports
///    it (a present but unreadable or malformed file is logged and skipped);
/// 2. a [`calibrate_tsc_khz`] measurement over [`DEFAULT_CALIBRATION_WINDOW`].
///
/// There is no universal user-space source for the kernel's `tsc_khz`; the
/// KVM layer prefers `KVM_GET_TSC_KHZ`, which is exactly the rate KVM uses.
pub fn host_tsc_khz() -> Result<TscKhz, HostError> {
    match read_small_text(Path::new(TSC_FREQ_KHZ_PATH)) {
        Ok(text) => match text.parse::<u32>() {
            Ok(khz) if khz > 0 => {
                return Ok(TscKhz {
                    khz,
                    source: TscKhzSource::SysfsTscFreqKhz,
                    uncertainty_khz: 0,
                })
            }
            _ => log::warn!(
                "{TSC_FREQ_KHZ_PATH}: not a positive kHz value ({text:?}); measuring instead"
            ),
        },
        Err(HostError::Io { errno, .. }) if errno == libc::ENOENT => {}
        Err(e) => log::warn!("{e}; measuring the TSC rate instead"),
    }
    calibrate_tsc_khz(DEFAULT_CALIBRATION_WINDOW)
}

// ---------------------------------------------------------------------------
// Host identity
// ---------------------------------------------------------------------------

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HostError + 'a {
    move |source| HostError::Io {
        op,
        path: path.display().to_string(),
        errno: source.raw_os_error().unwrap_or(0),
        source,
    }
}

/// Reads at most `limit` bytes; the flag says whether the file was longer.
fn read_bounded(path: &Path, limit: usize) -> Result<(Vec<u8>, bool), HostError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    file.take(cap)
        .read_to_end(&mut buf)
        .map_err(io_error("read", path))?;
    let truncated = buf.len() > limit;
    buf.truncate(limit);
    Ok((buf, truncated))
}

/// Checks a single-value string: trimmed, non-empty, at most
/// [`MAX_TEXT_LEN`] bytes, no control characters.
fn validate_text(text: &str) -> Result<&str, &'static str> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty");
    }
    if text.len() > MAX_TEXT_LEN {
        return Err("longer than 256 bytes");
    }
    if text.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    Ok(text)
}

/// A small single-value file (`boot_id`, `osrelease`, ...), validated.
fn read_small_text(path: &Path) -> Result<String, HostError> {
    let (bytes, truncated) = read_bounded(path, SMALL_FILE_LIMIT_BYTES)?;
    let name = || path.display().to_string();
    if truncated {
        return Err(HostError::TooLarge {
            path: name(),
            limit_bytes: SMALL_FILE_LIMIT_BYTES,
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| HostError::InvalidContent {
        path: name(),
        reason: "not UTF-8",
    })?;
    validate_text(text)
        .map(str::to_owned)
        .map_err(|reason| HostError::InvalidContent {
            path: name(),
            reason,
        })
}

/// True for the 8-4-4-4-12 hex layout of a UUID (either case).
pub fn looks_like_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// `/proc/sys/kernel/random/boot_id`, trimmed; refused unless UUID-shaped.
pub fn boot_id() -> Result<String, HostError> {
    let id = read_small_text(Path::new(BOOT_ID_PATH))?;
    if !looks_like_uuid(&id) {
        return Err(HostError::InvalidContent {
            path: BOOT_ID_PATH.to_owned(),
            reason: "not a UUID (8-4-4-4-12 hex digits)",
        });
    }
    Ok(id)
}

/// The node name from `uname(2)` (the caller's UTS namespace).
pub fn hostname() -> Result<String, HostError> {
    const WHAT: &str = "uname(2) nodename";
    let uts = uname().map_err(|errno| HostError::Uname {
        errno: errno as i32,
    })?;
    let invalid = |reason| HostError::InvalidContent {
        path: WHAT.to_owned(),
        reason,
    };
    // Cut at the first NUL (the kernel always writes one: the name is at
    // most __NEW_UTS_LEN = 64 bytes in a 65-byte field).
    let text = uts.nodename().to_str().ok_or(invalid("not UTF-8"))?;
    validate_text(text).map(str::to_owned).map_err(invalid)
}

/// `/proc/sys/kernel/osrelease`, e.g. `6.12.9-200.fc41.x86_64`.
pub fn kernel_release() -> Result<String, HostError> {
    read_small_text(Path::new(OSRELEASE_PATH))
}

/// The current clocksource (`tsc`, `kvm-clock`, `hpet`, ...).
pub fn clocksource() -> Result<String, HostError> {
    read_small_text(Path::new(CLOCKSOURCE_PATH))
}

/// TSC flags from the first `flags` line of `/proc/cpuinfo` text.
///
/// The key must be exactly `flags` (not `vmx flags`), and flags match as
/// whole words (`nonstop_tsc_s3` is not `nonstop_tsc`). Text without a
/// `flags` line (another architecture) gives all false.
pub fn parse_cpuinfo_flags(cpuinfo: &str) -> TscFlags {
    let flags = cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "flags").then_some(value)
    });
    let mut out = TscFlags::default();
    for flag in flags.unwrap_or("").split_whitespace() {
        match flag {
            "constant_tsc" => out.constant_tsc = true,
            "nonstop_tsc" => out.nonstop_tsc = true,
            "tsc_known_freq" => out.tsc_known_freq = true,
            _ => {}
        }
    }
    out
}

/// The TSC flags of the boot CPU, from `/proc/cpuinfo` (read up to 1 MiB;
/// only the first processor block matters).
pub fn tsc_flags() -> Result<TscFlags, HostError> {
    let path = Path::new(CPUINFO_PATH);
    let (mut bytes, truncated) = read_bounded(path, CPUINFO_LIMIT_BYTES)?;
    if truncated {
        // Drop the partial last line; the first block is long complete.
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(keep);
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| HostError::InvalidContent {
        path: CPUINFO_PATH.to_owned(),
        reason: "not UTF-8",
    })?;
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(HostError::InvalidContent {
            path: CPUINFO_PATH.to_owned(),
            reason: "contains control characters",
        });
    }
    Ok(parse_cpuinfo_flags(text))
}

/// Who this host is, with the TSC rate the caller established (KVM's
/// `KVM_GET_TSC_KHZ` when available, else [`host_tsc_khz`]).
pub fn identity(host_tsc_khz: u32) -> Result<HostIdentity, HostError> {
    if host_tsc_khz == 0 {
        return Err(HostError::ZeroTscKhz);
    }
    Ok(HostIdentity {
        hostname: hostname()?,
        boot_id: boot_id()?,
        kernel_release: kernel_release()?,
        tsc_khz: host_tsc_khz,
        tsc_flags: tsc_flags()?,
        clocksource: clocksource()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespec_conversion_is_checked() {
        assert_eq!(timespec_to_ns(0, 0), Some(0));
        assert_eq!(timespec_to_ns(1, 999_999_999), Some(1_999_999_999));
        assert_eq!(timespec_to_ns(-1, 0), None);
        assert_eq!(timespec_to_ns(0, -1), None);
        assert_eq!(timespec_to_ns(0, 1_000_000_000), None);
        assert_eq!(timespec_to_ns(18_446_744_073, 709_551_615), Some(u64::MAX));
        assert_eq!(timespec_to_ns(18_446_744_073, 709_551_616), None);
        assert_eq!(timespec_to_ns(i64::MAX, 0), None);
    }

    #[test]
    fn quality_from_timex_reads_the_bits() {
        let q = quality_from_timex(0, 0x2001, 16_000, 2); // TIME_OK, PLL|NANO
        assert!(q.synchronised);
        assert_eq!((q.maxerror_ns, q.esterror_ns), (16_000_000, 2_000));
        assert_eq!(q.leap_pending, LeapPending::None);
        assert!(!quality_from_timex(5, 0x2001, 0, 0).synchronised); // TIME_ERROR
        assert!(!quality_from_timex(0, 0x0041, 0, 0).synchronised); // STA_UNSYNC
        assert_eq!(
            quality_from_timex(1, 0x11, 0, 0).leap_pending,
            LeapPending::Insert
        );
        assert_eq!(
            quality_from_timex(2, 0x21, 0, 0).leap_pending,
            LeapPending::Delete
        );
        assert_eq!(
            quality_from_timex(1, 0x31, 0, 0).leap_pending,
            LeapPending::Insert
        );
        let q = quality_from_timex(0, 0, i64::MAX, -1);
        assert_eq!((q.maxerror_ns, q.esterror_ns), (u64::MAX, u64::MAX));
    }

    #[test]
    fn bracket_midpoint_covers_the_bracket() {
        assert_eq!(bracket_midpoint(100, 100), Some((100, 0)));
        assert_eq!(bracket_midpoint(100, 200), Some((150, 50)));
        // Odd width: the midpoint rounds down, the half width up.
        assert_eq!(bracket_midpoint(100, 201), Some((150, 51)));
        assert_eq!(
            bracket_midpoint(u64::MAX - 1, u64::MAX),
            Some((u64::MAX - 1, 1))
        );
        assert_eq!(bracket_midpoint(201, 200), None);
    }

    #[test]
    fn bracket_pair_rounds_up_and_adds_resolution() {
        let b = |w: u64| Bracket {
            tsc_before: 1_000,
            clock_ns: 0,
            tsc_after: 1_000 + w,
        };
        // 1 GHz: 1 cycle = 1 ns.
        assert_eq!(bracket_pair(&b(0), 1_000_000), Some((1_000, 1)));
        assert_eq!(bracket_pair(&b(100), 1_000_000), Some((1_050, 51)));
        assert_eq!(bracket_pair(&b(101), 1_000_000), Some((1_050, 52)));
        // 3 GHz: 51 cycles = 17 ns exactly, 52 cycles = 17.33 -> 18 ns.
        assert_eq!(bracket_pair(&b(102), 3_000_000), Some((1_051, 18)));
        assert_eq!(bracket_pair(&b(104), 3_000_000), Some((1_052, 19)));
        assert_eq!(bracket_pair(&b(10), 0), None);
    }

    #[test]
    fn keep_narrower_picks_the_narrowest() {
        let b = |before: u64, after: u64, clock_ns: u64| Bracket {
            tsc_before: before,
            clock_ns,
            tsc_after: after,
        };
        let widths = [
            b(100, 190, 1),
            b(200, 250, 2),
            b(300, 280, 3), // backwards: never kept
            b(400, 450, 4), // tie: the first stays
            b(500, 600, 5),
        ];
        let best = widths.iter().fold(None, |best, x| keep_narrower(best, *x));
        assert_eq!(best, Some(b(200, 250, 2)));
        assert_eq!(keep_narrower(None, b(10, 5, 0)), None);
        assert_eq!(keep_narrower(None, b(5, 5, 0)), Some(b(5, 5, 0)));
    }

    #[test]
    fn best_of_takes_every_try_and_keeps_the_narrowest() {
        let scripted = |widths: Vec<u64>| {
            let mut calls = 0u64;
            let r = best_of(u32::try_from(widths.len()).unwrap_or(0), || {
                let w = widths.get(calls as usize).copied().unwrap_or(u64::MAX);
                calls += 1;
                // u64::MAX marks "TSC went backwards".
                Ok(if w == u64::MAX {
                    Bracket {
                        tsc_before: 1_000,
                        clock_ns: calls,
                        tsc_after: 999,
                    }
                } else {
                    Bracket {
                        tsc_before: 1_000,
                        clock_ns: calls,
                        tsc_after: 1_000 + w,
                    }
                })
            });
            (r.ok().map(|b| (b.clock_ns, b.width_cycles())), calls)
        };
        // The 9th of 16 is the narrowest: all 16 are taken, the 9th wins.
        let mut widths = vec![90; 16];
        widths[8] = 40;
        widths[12] = 40;
        assert_eq!(scripted(widths), (Some((9, 40)), 16));
        assert_eq!(scripted(vec![u64::MAX, 70, u64::MAX]), (Some((2, 70)), 3));
        // tries = 0 takes one bracket.
        let mut calls = 0;
        let r = best_of(0, || {
            calls += 1;
            Ok(Bracket {
                tsc_before: 5,
                clock_ns: 0,
                tsc_after: 6,
            })
        });
        assert!(r.is_ok());
        assert_eq!(calls, 1);
        // Every bracket backwards: a typed error, not a panic.
        let r = best_of(4, || {
            Ok(Bracket {
                tsc_before: 6,
                clock_ns: 0,
                tsc_after: 5,
            })
        });
        assert!(matches!(r, Err(HostError::NoValidBracket { tries: 4 })));
    }

    #[test]
    fn cycle_conversions() {
        assert_eq!(cycles_to_ns_ceil(2_596_126, 2_596_126), Some(1_000_000));
        assert_eq!(cycles_to_ns_ceil(1, 2_596_126), Some(1));
        assert_eq!(cycles_to_ns_round(1, 2_596_126), Some(0));
        assert_eq!(cycles_to_ns_round(u64::MAX, 1), None);
        assert_eq!(cycles_to_ns_ceil(5, 0), None);
    }

    #[test]
    fn realtime_from_tai_is_checked() {
        assert_eq!(realtime_from_tai(40_000_000_000, 37), Some(3_000_000_000));
        assert_eq!(realtime_from_tai(5, 0), Some(5));
        assert_eq!(realtime_from_tai(5, 1), None);
        assert_eq!(realtime_from_tai(u64::MAX, -1), None);
        assert_eq!(realtime_from_tai(0, -1), Some(1_000_000_000));
    }

    #[test]
    fn rate_khz_bounds() {
        // 2.596126 GHz over 50 ms, exact.
        assert_eq!(
            rate_khz(129_806_300, 0, 50_000_000, 0),
            Some((2_596_126, 0))
        );
        // 100 cycles and 2 ns of slack over 50 ms: about 2 + 0.1 kHz.
        let (khz, err) = rate_khz(129_806_300, 100, 50_000_000, 2).unwrap_or((0, 0));
        assert_eq!(khz, 2_596_126);
        assert!((2..=3).contains(&err), "err {err}");
        assert_eq!(rate_khz(0, 0, 50, 0), None);
        assert_eq!(rate_khz(10, 0, 2, 2), None);
        assert_eq!(rate_khz(u64::MAX, 0, 1, 0), None);
    }

    #[test]
    fn text_validation() {
        assert_eq!(validate_text("  tsc\n"), Ok("tsc"));
        assert!(validate_text("\n").is_err());
        assert!(validate_text("a\u{1b}[31m").is_err());
        assert!(validate_text(&"x".repeat(257)).is_err());
        assert!(looks_like_uuid("6739a715-f9cc-417a-a6c7-3b5d7ee6fa68"));
        assert!(looks_like_uuid("6739A715-F9CC-417A-A6C7-3B5D7EE6FA68"));
        assert!(!looks_like_uuid("6739a715f9cc417aa6c73b5d7ee6fa68"));
        assert!(!looks_like_uuid("6739a715-f9cc-417a-a6c7-3b5d7ee6fa6g"));
        assert!(!looks_like_uuid("6739a715-f9cc-417a-a6c7-3b5d7ee6fa689"));
    }

    #[test]
    fn errors_name_the_file_and_errno() {
        let r = read_small_text(Path::new("/proc/clockcarry-does-not-exist"));
        match r {
            Err(e @ HostError::Io { .. }) => {
                assert_eq!(e.errno(), Some(libc::ENOENT));
                let text = e.to_string();
                assert!(text.contains("/proc/clockcarry-does-not-exist"), "{text}");
                assert!(text.contains(&format!("errno {}", libc::ENOENT)), "{text}");
            }
            other => panic!("expected Io error, got {other:?}"),
        }
    }

    #[test]
    fn zero_khz_is_refused() {
        assert!(matches!(sample(1, 0), Err(HostError::ZeroTscKhz)));
        assert!(matches!(identity(0), Err(HostError::ZeroTscKhz)));
    }
}
