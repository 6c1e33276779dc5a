//! What the guest saw across a blackout, from its own reports.
//!
//! For each vCPU the blackout is the largest gap between consecutive reports
//! (by host TAI stamp; by guest TSC for unstamped serial logs). With `a` the
//! last report before it and `b` the first after it:
//!
//! - `blackout_ns` = TAI(b) - TAI(a);
//! - `tsc_jump_ns` = the TSC advance a -> b in ns, through a's line;
//! - `kvmclock_jump_ns` = kvm-clock(b) - kvm-clock(a), each from its own PVTI;
//! - `disagreement_ns` = b's PVTI minus a's PVTI, both at b's TSC: how far
//!   kvm-clock left the TSC-to-ns line the guest had (exact, no timing noise);
//! - `tsc_error_ns` / `kvmclock_error_ns` = how far each counter is from
//!   "kept running" against host TAI: the change of (counter - TAI) across
//!   the blackout, over [`WINDOW`] reports on each side. The TAI of a guest
//!   read is its exit stamp minus the exit latency, which the host TSC gives
//!   exactly when the log carries the vCPU's TSC offset (latency = host TSC
//!   at the exit - (guest TSC - offset)); each side is then the median.
//!   Without offsets, each side is the maximum (the report that reached the
//!   host fastest: a minimum-delay filter);
//! - `tsc_error_bound_ns`: how far `tsc_error_ns` itself can be off (exact
//!   read times only): each side's median report is placed on the TAI
//!   timeline within half its stamp's (rdtsc, TAI, rdtsc) bracket, and the
//!   host rate, measured between two narrow stamps, is uncertain by half
//!   their widths over its span, which "kept running" extrapolates across
//!   the blackout; plus 2 ns of rounding;
//! - `monotonic`: neither the TSC nor kvm-clock ever decreased on any vCPU.

use std::path::PathBuf;

use clockcarry::model::Pvti;
use clockcarry::pvclock::rate_hz_from_scale;
use serde::Serialize;

use crate::probelog::{self, LoggedReport};

/// Reports on each side of the blackout used by the minimum-delay filter.
pub const WINDOW: usize = 256;

/// One vCPU across the blackout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuAnalysis {
    pub vcpu: u32,
    pub reports: usize,
    /// Which VMM process reported before and after the blackout.
    pub before_vm: String,
    pub after_vm: String,
    pub blackout_ns: Option<i64>,
    pub tsc_jump_ns: i64,
    pub kvmclock_jump_ns: i64,
    pub disagreement_ns: i64,
    pub tsc_error_ns: Option<i64>,
    pub kvmclock_error_ns: Option<i64>,
    /// Bound of the measurement error of `tsc_error_ns`, ns (`None` without
    /// exact read times).
    pub tsc_error_bound_ns: Option<u64>,
    pub monotonic: bool,
    /// PVTI before and after.
    pub pvti_before: Pvti,
    pub pvti_after: Pvti,
}

/// All vCPUs, and the row the demo prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Analysis {
    pub vcpus: Vec<VcpuAnalysis>,
    /// vCPU 0's blackout and jumps; the worst |error| over the vCPUs.
    pub blackout_ns: Option<i64>,
    pub tsc_jump_ns: i64,
    pub kvmclock_jump_ns: i64,
    pub disagreement_ns: i64,
    pub tsc_error_ns: Option<i64>,
    pub kvmclock_error_ns: Option<i64>,
    /// The largest measurement bound over the vCPUs (`None` if a vCPU has none).
    pub tsc_error_bound_ns: Option<u64>,
    pub monotonic: bool,
}

fn sat(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// The line at `tsc`, extended below `tsc_timestamp` (no wrap), ns: the
/// library's one line evaluation.
pub use clockcarry::pvclock::line_at_ns as line_at;

struct Point {
    vm: String,
    tsc: u64,
    pvti: Pvti,
    kvmclock: i128,
    tai: Option<u64>,
    host_tsc: Option<u64>,
    stamp_width: Option<u64>,
    /// TAI at the guest's TSC read (exit stamp minus exact latency), ns.
    tai_read: Option<i128>,
}

/// Longest exit latency believed, s fraction (10 ms): beyond it the offset
/// in the log cannot be the one in force.
const MAX_LATENCY_DIVISOR: u64 = 100;

fn tai_at_read(r: &LoggedReport, pvti: &Pvti) -> Option<i128> {
    let (tai, host_tsc, offset) = (r.tai_ns?, r.host_tsc?, r.tsc_offset?);
    let hz = rate_hz_from_scale(pvti.tsc_to_system_mul, pvti.tsc_shift)?;
    let host_at_read = r.tsc.wrapping_sub(offset as u64);
    let latency = host_tsc.wrapping_sub(host_at_read);
    if latency > hz / MAX_LATENCY_DIVISOR {
        return None;
    }
    let latency_ns = i128::from(latency) * 1_000_000_000 / i128::from(hz.max(1));
    Some(i128::from(tai) - latency_ns)
}

fn points(reports: &[&LoggedReport]) -> Vec<Point> {
    reports
        .iter()
        .filter_map(|r| {
            let pvti = r.pvti.line()?;
            Some(Point {
                vm: r.vm.clone(),
                tsc: r.tsc,
                pvti,
                kvmclock: line_at(&pvti, r.tsc),
                tai: r.tai_ns,
                host_tsc: r.host_tsc,
                stamp_width: r.stamp_width,
                tai_read: tai_at_read(r, &pvti),
            })
        })
        .collect()
}

/// Index of the first report after the largest gap.
fn largest_gap(ps: &[Point]) -> Option<usize> {
    let stamped = ps.iter().all(|p| p.tai.is_some());
    (1..ps.len()).max_by_key(|&i| {
        if stamped {
            i128::from(ps[i].tai.unwrap_or(0)) - i128::from(ps[i - 1].tai.unwrap_or(0))
        } else {
            i128::from(ps[i].tsc) - i128::from(ps[i - 1].tsc)
        }
    })
}

/// (value - TAI) on one side of the blackout: the median with exact read
/// times, else the maximum over exit stamps (minimum-delay filter).
fn best_offset(side: &[Point], value: impl Fn(&Point) -> i128) -> Option<i128> {
    let exact: Option<Vec<i128>> = side.iter().map(|p| Some(value(p) - p.tai_read?)).collect();
    if let Some(mut v) = exact.filter(|v| !v.is_empty()) {
        v.sort_unstable();
        return v.get(v.len() / 2).copied();
    }
    side.iter()
        .map(|p| Some(value(p) - i128::from(p.tai?)))
        .collect::<Option<Vec<i128>>>()?
        .into_iter()
        .max()
}

/// Widest stamp bracket trusted for the rate, cycles (~1 us).
const MAX_RATE_STAMP_WIDTH: u64 = 3000;

/// The host TSC rate against TAI over a whole log: `dh` cycles in `dt` ns,
/// between two exit stamps whose widths add up to `widths` cycles.
#[derive(Debug, Clone, Copy)]
struct Rate {
    dh: i128,
    dt: i128,
    widths: u64,
}

/// The host rate from the first and last narrow exit stamps (one host: the
/// stamps' own pairs).
fn host_rate(ps: &[Point]) -> Option<Rate> {
    let mut stamped = ps.iter().filter_map(|p| {
        let w = p.stamp_width.filter(|&w| w <= MAX_RATE_STAMP_WIDTH)?;
        Some((p.host_tsc?, p.tai?, w))
    });
    let first = stamped.next()?;
    let last = stamped.next_back()?;
    let dh = i128::from(last.0) - i128::from(first.0);
    let dt = i128::from(last.1) - i128::from(first.1);
    (dt >= 100_000_000 && dh > 0).then_some(Rate {
        dh,
        dt,
        widths: first.2 + last.2,
    })
}

fn median(mut v: Vec<i128>) -> Option<i128> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// The median of `(value, stamp width, TAI)` by value, with its report's
/// stamp width and TAI.
fn median_with(mut v: Vec<(i128, Option<u64>, i128)>) -> Option<(i128, Option<u64>, i128)> {
    v.sort_unstable_by_key(|x| x.0);
    v.get(v.len() / 2).copied()
}

/// Fewest reports with an exact read time a side of the blackout needs.
const MIN_EXACT: usize = 16;

/// `v` if it holds at least [`MIN_EXACT`] values. Reports without an exact
/// read time (an exit more than 10 ms after the guest's read: its thread was
/// descheduled) are left out of the medians; the others stay exact.
fn exact_only<T>(v: Vec<T>) -> Option<Vec<T>> {
    (v.len() >= MIN_EXACT).then_some(v)
}

/// `ceil(a / b)` for a >= 0, b > 0.
fn ceil_div(a: i128, b: i128) -> i128 {
    (a + b - 1) / b
}

/// What [`exact_errors`] found, ns.
struct Exact {
    tsc_error: i64,
    kvmclock_error: i64,
    /// Bound of the measurement error of `tsc_error` (`None`: a median
    /// report has no stamp width).
    tsc_bound: Option<u64>,
}

/// (TSC error, kvm-clock error) in ns with exact read times: "kept
/// running" is the TSC continuing at the host's measured rate against TAI
/// from where it was (the pre-blackout median), and kvm-clock continuing on
/// the old line at that TSC.
fn exact_errors(pre: &[Point], post: &[Point], line: &Pvti, rate: Rate) -> Option<Exact> {
    let Rate { dh, dt, widths } = rate;
    // tsc * dt - tai * dh: (TSC in ns at the host rate - TAI) times dh.
    let res = |p: &Point| {
        let tai = p.tai_read?;
        Some((i128::from(p.tsc) * dt - tai * dh, p.stamp_width, tai))
    };
    let (pre_res, pre_w, pre_tai) = median_with(exact_only(pre.iter().filter_map(res).collect())?)?;
    let (post_res, post_w, post_tai) =
        median_with(exact_only(post.iter().filter_map(res).collect())?)?;
    // Each median report's TAI is right within half its bracket (cycles at
    // the host rate, dt/dh ns per cycle); the rate within half the widths
    // of the two stamps it comes from, over dh cycles, extrapolated over
    // the TAI between the two medians.
    let tsc_bound = pre_w.zip(post_w).and_then(|(a, b)| {
        let stamps = ceil_div(i128::from(a + b) * dt, 2 * dh);
        let span = (post_tai - pre_tai).abs();
        let rate = ceil_div(i128::from(widths) * span, 2 * dh);
        u64::try_from(stamps + rate + 2).ok()
    });
    let ideal_tsc = |p: &Point| u64::try_from((pre_res + p.tai_read? * dh) / dt).ok();
    let kres = |p: &Point| Some(p.kvmclock - line_at(line, ideal_tsc(p)?));
    let kc_pre = median(exact_only(pre.iter().filter_map(kres).collect())?)?;
    let kc_post = median(exact_only(post.iter().filter_map(kres).collect())?)?;
    Some(Exact {
        tsc_error: sat((post_res - pre_res) / dh),
        kvmclock_error: sat(kc_post - kc_pre),
        tsc_bound,
    })
}

fn analyse_vcpu(vcpu: u32, mut ps: Vec<Point>) -> Option<VcpuAnalysis> {
    if ps.iter().all(|p| p.tai.is_some()) {
        ps.sort_by_key(|p| p.tai.unwrap_or(0));
    }
    let monotonic = ps
        .windows(2)
        .all(|w| w[1].tsc >= w[0].tsc && w[1].kvmclock >= w[0].kvmclock);
    let split = largest_gap(&ps)?;
    let (a, b) = (&ps[split - 1], &ps[split]);
    let line = a.pvti;
    let pre = &ps[split.saturating_sub(WINDOW)..split];
    let post = &ps[split..(split + WINDOW).min(ps.len())];
    let (tsc_err, kc_err, tsc_bound) =
        match host_rate(&ps).and_then(|r| exact_errors(pre, post, &line, r)) {
            Some(e) => (Some(e.tsc_error), Some(e.kvmclock_error), e.tsc_bound),
            None => (
                best_offset(post, |p| line_at(&line, p.tsc))
                    .zip(best_offset(pre, |p| line_at(&line, p.tsc)))
                    .map(|(after, before)| sat(after - before)),
                best_offset(post, |p| p.kvmclock)
                    .zip(best_offset(pre, |p| p.kvmclock))
                    .map(|(after, before)| sat(after - before)),
                None,
            ),
        };
    Some(VcpuAnalysis {
        vcpu,
        reports: ps.len(),
        before_vm: a.vm.clone(),
        after_vm: b.vm.clone(),
        blackout_ns: a
            .tai
            .zip(b.tai)
            .map(|(x, y)| sat(i128::from(y) - i128::from(x))),
        tsc_jump_ns: sat(line_at(&line, b.tsc) - line_at(&line, a.tsc)),
        kvmclock_jump_ns: sat(b.kvmclock - a.kvmclock),
        disagreement_ns: sat(line_at(&b.pvti, b.tsc) - line_at(&line, b.tsc)),
        tsc_error_ns: tsc_err,
        kvmclock_error_ns: kc_err,
        tsc_error_bound_ns: tsc_bound,
        monotonic,
        pvti_before: a.pvti,
        pvti_after: b.pvti,
    })
}

fn worst(values: impl Iterator<Item = Option<i64>>) -> Option<i64> {
    values
        .collect::<Option<Vec<i64>>>()?
        .into_iter()
        .max_by_key(|v| v.unsigned_abs())
}

/// Analyses the reports of one run (one or more VMM processes).
pub fn analyse(reports: &[LoggedReport]) -> Option<Analysis> {
    let mut ids: Vec<u32> = reports.iter().map(|r| r.vcpu).collect();
    ids.sort_unstable();
    ids.dedup();
    let vcpus: Vec<VcpuAnalysis> = ids
        .iter()
        .filter_map(|&id| {
            let mine: Vec<&LoggedReport> = reports.iter().filter(|r| r.vcpu == id).collect();
            analyse_vcpu(id, points(&mine))
        })
        .collect();
    let first = vcpus.first()?;
    Some(Analysis {
        blackout_ns: first.blackout_ns,
        tsc_jump_ns: first.tsc_jump_ns,
        kvmclock_jump_ns: first.kvmclock_jump_ns,
        disagreement_ns: worst(vcpus.iter().map(|v| Some(v.disagreement_ns))).unwrap_or(0),
        tsc_error_ns: worst(vcpus.iter().map(|v| v.tsc_error_ns)),
        kvmclock_error_ns: worst(vcpus.iter().map(|v| v.kvmclock_error_ns)),
        tsc_error_bound_ns: vcpus
            .iter()
            .map(|v| v.tsc_error_bound_ns)
            .collect::<Option<Vec<u64>>>()
            .and_then(|b| b.into_iter().max()),
        monotonic: vcpus.iter().all(|v| v.monotonic),
        vcpus,
    })
}

/// `clockcarry-refvmm analyze [--json] LOG...` (JSON probe logs, or serial
/// files with the probe's text lines).
pub fn run_cli(json: bool, logs: &[PathBuf]) -> i32 {
    let mut reports = Vec::new();
    for path in logs {
        let read = match probelog::read_logs(&[path.as_path()]) {
            Ok(r) if !r.is_empty() => Ok(r),
            _ => probelog::read_serial(path, &path.display().to_string()),
        };
        match read {
            Ok(r) => reports.extend(r),
            Err(e) => {
                eprintln!("analyze: {}: {e}", path.display());
                return 1;
            }
        }
    }
    let Some(a) = analyse(&reports) else {
        eprintln!("analyze: no usable reports (need at least two per vCPU)");
        return 1;
    };
    if json {
        println!("{}", serde_json::to_string(&a).unwrap_or_default());
        return 0;
    }
    let opt = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    println!("vcpu  reports  blackout_ns  tsc_jump_ns  kvmclock_jump_ns  disagreement_ns  tsc_error_ns  tsc_error_bound_ns  kvmclock_error_ns  monotonic");
    for v in &a.vcpus {
        println!(
            "{:>4}  {:>7}  {:>11}  {:>11}  {:>16}  {:>15}  {:>12}  {:>18}  {:>17}  {}",
            v.vcpu,
            v.reports,
            opt(v.blackout_ns),
            v.tsc_jump_ns,
            v.kvmclock_jump_ns,
            v.disagreement_ns,
            opt(v.tsc_error_ns),
            v.tsc_error_bound_ns
                .map_or("-".to_string(), |b| b.to_string()),
            opt(v.kvmclock_error_ns),
            v.monotonic
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ReportedPvti;

    const KHZ_MUL: u32 = 0x8000_0000; // 2 GHz: shift 0, mul 1/2 -> 0.5 ns per cycle
    fn pvti(ts: u64, st: u64) -> ReportedPvti {
        ReportedPvti {
            version: 2,
            tsc_timestamp: ts,
            system_time: st,
            tsc_to_system_mul: KHZ_MUL,
            tsc_shift: 0,
            flags: 1,
        }
    }

    fn report(vm: &str, tsc: u64, p: ReportedPvti, tai: u64) -> LoggedReport {
        let r = crate::probe::GuestReport {
            vcpu: 0,
            seq: 0,
            tsc,
            pvti: p,
        };
        let mut l = LoggedReport::new(vm, &r, None);
        l.tai_ns = Some(tai);
        l
    }

    /// A guest whose TSC runs at 2 GHz against TAI (1 ns = 2 cycles), with
    /// a 1 s blackout after which kvm-clock is set back by `step_ns`.
    fn run(step_ns: u64, freeze: bool) -> Vec<LoggedReport> {
        let mut out = Vec::new();
        let before = pvti(0, 1_000);
        for i in 0..10u64 {
            let tai = 10_000_000 + i * 1000;
            out.push(report("src", (tai - 10_000_000) * 2, before, tai));
        }
        let gap = 1_000_000_000u64;
        let after_tsc0 = if freeze { 20_000 } else { (9_000 + gap) * 2 };
        let after = pvti(after_tsc0, (1_000 + after_tsc0 / 2).saturating_sub(step_ns));
        for i in 0..10u64 {
            let tai = 10_009_000 + gap + i * 1000;
            out.push(report("dst", after_tsc0 + i * 2000, after, tai));
        }
        out
    }

    #[test]
    fn continuous_run_has_no_error() {
        let a = analyse(&run(0, false)).expect("analysis");
        assert_eq!(a.blackout_ns, Some(1_000_000_000));
        assert_eq!(a.tsc_error_ns, Some(0));
        assert_eq!(a.kvmclock_error_ns, Some(0));
        assert_eq!(a.disagreement_ns, 0);
        assert!(a.monotonic);
        assert_eq!(a.vcpus[0].before_vm, "src");
        assert_eq!(a.vcpus[0].after_vm, "dst");
    }

    #[test]
    fn a_kvmclock_step_shows_as_error_and_disagreement() {
        let a = analyse(&run(500, false)).expect("analysis");
        assert_eq!(a.disagreement_ns, -500);
        assert_eq!(a.kvmclock_error_ns, Some(-500));
        assert_eq!(a.tsc_error_ns, Some(0));
        assert!(!a.monotonic || a.kvmclock_jump_ns > 0);
    }

    #[test]
    fn a_frozen_tsc_shows_as_tsc_error() {
        let a = analyse(&run(0, true)).expect("analysis");
        assert!(a.tsc_error_ns.expect("stamped") < -999_000_000);
        assert!(!a.monotonic || a.tsc_jump_ns >= 0);
    }

    /// Stamped reports as the reference VMM logs them: host TSC at 2 GHz
    /// against TAI, the guest's read `latency` cycles before the exit stamp,
    /// 40 reports 1 ms apart, a 1 s blackout, 40 more. After it the offset
    /// is `offset + step` cycles.
    fn stamped(step: i64, slow_exit: bool) -> Vec<LoggedReport> {
        let (t0, h0, offset) = (1_000_000_000_000u64, 5_000_000_000u64, 7_000_000_000i64);
        let mut out = Vec::new();
        let mut push = |vm: &str, tai: u64, off: i64, latency: u64| {
            let host_exit = h0 + 2 * (tai - t0);
            let tsc = (host_exit - latency).wrapping_add(off as u64);
            let mut l = report(vm, tsc, pvti(0, 0), tai);
            l.host_tsc = Some(host_exit);
            l.tsc_offset = Some(off);
            l.stamp_width = Some(100);
            out.push(l);
        };
        for i in 0..40u64 {
            push("src", t0 + i * 1_000_000, offset, 200);
        }
        let after = t0 + 39 * 1_000_000 + 1_000_000_000;
        for i in 0..40u64 {
            // One exit 30 ms after the guest's read (a descheduled thread):
            // no exact read time; it must be left out, not spoil the side.
            let latency = if slow_exit && i == 5 { 60_000_000 } else { 200 };
            push("dst", after + i * 1_000_000, offset + step, latency);
        }
        out
    }

    #[test]
    fn exact_read_times_give_exact_errors_and_a_bound() {
        let a = analyse(&stamped(0, true)).expect("analysis");
        assert_eq!(a.tsc_error_ns, Some(0));
        assert_eq!(a.kvmclock_error_ns, Some(0));
        // Half of two 100-cycle stamps at 2 GHz (50 ns) + the rate, from two
        // 100-cycle stamps over 1.078 s, across the 1.04 s between the
        // medians (~49 ns) + 2 ns of rounding.
        let bound = a.tsc_error_bound_ns.expect("bound");
        assert!((95..=110).contains(&bound), "{bound}");
        // A TSC frozen over the blackout (the offset moved back by it).
        let a = analyse(&stamped(-2_000_000_000, false)).expect("analysis");
        assert_eq!(a.tsc_error_ns, Some(-1_000_000_000));
        // Unstamped logs have no bound.
        assert_eq!(analyse(&run(0, false)).expect("a").tsc_error_bound_ns, None);
    }

    #[test]
    fn too_few_reports() {
        assert!(analyse(&[]).is_none());
        let one = run(0, false).into_iter().take(1).collect::<Vec<_>>();
        assert!(analyse(&one).is_none());
    }
}
