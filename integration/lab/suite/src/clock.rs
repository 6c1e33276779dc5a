//! The clock harness of the two-host lab: it makes the two lab hosts look
//! like two NTP-synchronised hosts (B's clock set to A's over the lab
//! network, the TAI offset set, adjtimex saying "synchronised" with a small
//! maxerror), or like a badly configured NTP (B stepped while adjtimex keeps
//! claiming a small error). The truth it is checked against comes from the
//! shared-memory TSC pair ([`crate::tscpair`]): both lab kernels count the
//! same outer TSC, so their clocks' true offset follows from D.

use std::io;

use serde::Serialize;
use serde_json::json;

use crate::control::Control;

/// TAI - UTC the harness sets (since 2017).
pub const TAI_OFFSET_S: i32 = 37;

/// adjtimex maxerror and esterror the harness claims while "synchronised", µs.
pub const CLAIMED_MAXERROR_US: i64 = 100;
pub const CLAIMED_ESTERROR_US: i64 = 20;

fn adjtimex(tx: &mut libc::timex) -> io::Result<i32> {
    // SAFETY: adjtimex reads and writes the one struct passed by pointer.
    let rc = unsafe { libc::adjtimex(tx) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn zero_timex() -> libc::timex {
    // SAFETY: timex is plain C data for which all zeroes is a valid value
    // (modes 0 = read only).
    unsafe { std::mem::zeroed() }
}

/// What adjtimex says now.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Status {
    pub synchronised: bool,
    pub maxerror_us: i64,
    pub esterror_us: i64,
    pub tai_offset_s: i32,
}

pub fn status() -> io::Result<Status> {
    let mut tx = zero_timex();
    let state = adjtimex(&mut tx)?;
    Ok(Status {
        synchronised: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        maxerror_us: tx.maxerror,
        esterror_us: tx.esterror,
        tai_offset_s: tx.tai,
    })
}

/// Sets the kernel's TAI offset (CLOCK_TAI = CLOCK_REALTIME + it).
pub fn set_tai_offset(seconds: i32) -> io::Result<()> {
    let mut tx = zero_timex();
    tx.modes = libc::ADJ_TAI;
    tx.constant = libc::c_long::from(seconds);
    adjtimex(&mut tx).map(|_| ())
}

/// Clears STA_UNSYNC and sets maxerror/esterror, as an NTP daemon does after
/// an update. The kernel grows maxerror by 500 µs every second after that,
/// so callers repeat it before each measurement that relies on it.
pub fn mark_synchronised(maxerror_us: i64, esterror_us: i64) -> io::Result<()> {
    let mut tx = zero_timex();
    adjtimex(&mut tx)?;
    let status = tx.status & !libc::STA_UNSYNC;
    let mut tx = zero_timex();
    tx.modes = libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
    tx.status = status;
    tx.maxerror = maxerror_us;
    tx.esterror = esterror_us;
    adjtimex(&mut tx).map(|_| ())
}

/// Steps CLOCK_REALTIME (and with it CLOCK_TAI) by `delta_ns`, atomically
/// (ADJ_SETOFFSET).
pub fn step_ns(delta_ns: i64) -> io::Result<()> {
    let mut tx = zero_timex();
    tx.modes = libc::ADJ_SETOFFSET | libc::ADJ_NANO;
    // tv_usec holds ns under ADJ_NANO and must be in [0, 1e9).
    tx.time.tv_sec = delta_ns.div_euclid(1_000_000_000);
    tx.time.tv_usec = delta_ns.rem_euclid(1_000_000_000);
    adjtimex(&mut tx).map(|_| ())
}

/// A tight (host TSC, CLOCK_TAI) pair: the narrowest of `tries` brackets.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct TscTai {
    pub tsc: u64,
    pub tai_ns: u64,
    pub width_cycles: u64,
}

pub fn tsc_tai(tries: u32) -> io::Result<TscTai> {
    let mut best: Option<TscTai> = None;
    for _ in 0..tries.max(1) {
        let t0 = clockcarry::host::read_host_tsc();
        let tai = clockcarry::host::tai_now_ns().map_err(io::Error::other)?;
        let t1 = clockcarry::host::read_host_tsc();
        let width = t1.saturating_sub(t0);
        let pair = TscTai {
            tsc: t0 + width / 2,
            tai_ns: tai,
            width_cycles: width,
        };
        if best.is_none_or(|b| width < b.width_cycles) {
            best = Some(pair);
        }
    }
    best.ok_or_else(|| io::Error::other("no sample"))
}

/// The true clock offset CLOCK_TAI(B) - CLOCK_TAI(A) from one pair on each
/// host and D = TSC_B - TSC_A, with its bound: B's pair is moved onto A's
/// timeline through D, then A's clock is extrapolated to it at `khz`.
pub fn true_offset_ns(
    a: &TscTai,
    b: &TscTai,
    d_cycles: i64,
    d_half_width_cycles: u64,
    khz: u32,
) -> (i64, u64) {
    let khz = i128::from(khz.max(1));
    let dt_cycles = i128::from(b.tsc) - i128::from(d_cycles) - i128::from(a.tsc);
    let dt_ns = dt_cycles * 1_000_000 / khz;
    let offset = i128::from(b.tai_ns) - i128::from(a.tai_ns) - dt_ns;
    let cycles_bound = i128::from(d_half_width_cycles)
        + i128::from(a.width_cycles.div_ceil(2))
        + i128::from(b.width_cycles.div_ceil(2));
    // The rate is known to a few ppm over the pairs' distance; +2 ns rounding.
    let rate_ns = dt_ns.abs() * 10 / 1_000_000;
    let bound = cycles_bound * 1_000_000 / khz + rate_ns + 2;
    (
        i64::try_from(offset).unwrap_or(i64::MAX),
        u64::try_from(bound).unwrap_or(u64::MAX),
    )
}

/// A's side of a sync: answers `rounds` time requests with its CLOCK_TAI.
pub fn serve_time(ctl: &mut Control, rounds: u32) -> io::Result<()> {
    for _ in 0..rounds {
        ctl.expect("time?")?;
        let tai = clockcarry::host::tai_now_ns().map_err(io::Error::other)?;
        ctl.send(&json!({"step": "time", "tai_ns": tai}))?;
    }
    Ok(())
}

/// The result of B's timestamp exchange with A.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Exchange {
    /// CLOCK_TAI(A) - CLOCK_TAI(B) from the round with the smallest delay, ns.
    pub offset_ns: i64,
    /// That round's round trip, ns (half of it bounds the offset's error).
    pub best_delay_ns: u64,
    pub rounds: u32,
}

/// B's side: `rounds` timestamped round trips, the minimum-delay one kept.
pub fn exchange(ctl: &mut Control, rounds: u32) -> io::Result<Exchange> {
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..rounds {
        let t1 = clockcarry::host::tai_now_ns().map_err(io::Error::other)?;
        ctl.send(&json!({"step": "time?"}))?;
        let msg = ctl.expect("time")?;
        let t3 = clockcarry::host::tai_now_ns().map_err(io::Error::other)?;
        let t2 = msg
            .get("tai_ns")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| io::Error::other("time answer without tai_ns"))?;
        let delay = t3.saturating_sub(t1);
        let mid = (i128::from(t1) + i128::from(t3)) / 2;
        let offset = i64::try_from(i128::from(t2) - mid).unwrap_or(i64::MAX);
        if best.is_none_or(|(d, _)| delay < d) {
            best = Some((delay, offset));
        }
    }
    let (best_delay_ns, offset_ns) = best.ok_or_else(|| io::Error::other("no round"))?;
    Ok(Exchange {
        offset_ns,
        best_delay_ns,
        rounds,
    })
}

/// Both sides of "make the two hosts look NTP-synchronised": the TAI offset
/// on both, B's clock stepped onto A's (min-delay exchange), both marked
/// synchronised. Returns B's exchange (B) or None (A).
pub fn sync(ctl: &mut Control, lead: bool, rounds: u32) -> io::Result<Option<Exchange>> {
    set_tai_offset(TAI_OFFSET_S)?;
    if lead {
        ctl.send(&json!({"step": "sync"}))?;
        serve_time(ctl, rounds)?;
        ctl.expect("synced")?;
        mark_synchronised(CLAIMED_MAXERROR_US, CLAIMED_ESTERROR_US)?;
        return Ok(None);
    }
    ctl.expect("sync")?;
    let ex = exchange(ctl, rounds)?;
    step_ns(ex.offset_ns)?;
    mark_synchronised(CLAIMED_MAXERROR_US, CLAIMED_ESTERROR_US)?;
    ctl.send(
        &json!({"step": "synced", "offset_ns": ex.offset_ns, "best_delay_ns": ex.best_delay_ns}),
    )?;
    Ok(Some(ex))
}

/// The true CLOCK_TAI(B) - CLOCK_TAI(A) now, from a (TSC, TAI) pair on each
/// host (B's sent to A over `ctl`) and D. A gets `Some((offset, bound))`,
/// B `None`.
pub fn true_offset(
    ctl: &mut Control,
    lead: bool,
    pair: &crate::tscpair::Pair,
    khz: u32,
) -> io::Result<Option<(i64, u64)>> {
    if lead {
        ctl.send(&json!({"step": "pair?"}))?;
        let msg = ctl.expect("pair")?;
        let a = tsc_tai(16)?;
        let b: TscTai = serde_json::from_value(msg.get("pair").cloned().unwrap_or_default())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        return Ok(Some(true_offset_ns(
            &a,
            &b,
            pair.d_cycles,
            pair.half_width_cycles(),
            khz,
        )));
    }
    ctl.expect("pair?")?;
    let b = tsc_tai(16)?;
    ctl.send(&json!({"step": "pair", "pair": b}))?;
    Ok(None)
}
