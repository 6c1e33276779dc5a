//! Host time stamps for probe reports: one (rdtsc, CLOCK_TAI, rdtsc)
//! bracket, cheap enough to take at every report exit.

use clockcarry::host;
use serde::{Deserialize, Serialize};

/// A host instant: CLOCK_TAI and the host TSC (bracket midpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub tai_ns: u64,
    pub host_tsc: u64,
    /// Bracket width, cycles.
    pub width_cycles: u64,
}

/// Brackets per stamp (the narrowest is kept: a preempted or cold one is
/// microseconds wide).
const TRIES: u32 = 3;

/// Takes one stamp; `None` when CLOCK_TAI cannot be read.
pub fn now() -> Option<Stamp> {
    let mut best: Option<Stamp> = None;
    for _ in 0..TRIES {
        let before = host::read_host_tsc();
        let tai_ns = host::tai_now_ns().ok()?;
        let after = host::read_host_tsc();
        let s = Stamp {
            tai_ns,
            host_tsc: before + after.saturating_sub(before) / 2,
            width_cycles: after.saturating_sub(before),
        };
        if best.is_none_or(|b| s.width_cycles < b.width_cycles) {
            best = Some(s);
        }
    }
    best
}

/// CLOCK_TAI now, ns (0 if unreadable).
pub fn tai_ns() -> u64 {
    host::tai_now_ns().unwrap_or(0)
}

/// CLOCK_REALTIME now, ns (0 if unreadable).
pub fn realtime_ns() -> u64 {
    host::realtime_now_ns().unwrap_or(0)
}

/// Nanoseconds since `since` (saturating).
pub fn elapsed_ns(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
