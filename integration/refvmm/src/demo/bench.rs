//! `--bench-blackout`: what restoring the clock adds to a blackout.
//!
//! One rep of one mode is a live update as a snapshot: the source VMM runs
//! the probe with N vCPUs, the destination VMM is already running (no VM),
//! the source pauses and snapshots, the destination restores and resumes.
//! The blackout is the destination VMM's resume stamp minus the source
//! VMM's pause stamp (`vm.info` `clockcarry.resumed_tai_ns` -
//! `paused_tai_ns`, both CLOCK_TAI on this host), so it counts exactly the
//! time the guest stood still. Modes, interleaved rep by rep:
//!
//! - `stock`: vm.restore with `resume: true`, the VMM's own clock handling;
//! - `restore`: capture before the pause; vm.restore `resume: false`, then
//!   `clockcarry restore` (a process: GET, sample, plan, PUT), vm.resume;
//! - `armed`: capture and `clockcarry arm` before the pause; vm.restore
//!   with the armed `clock` and `resume: true`.
//!
//! `added_p50_ns` of a mode is its median blackout minus stock's at the
//! same vCPU count, in the same run: end to end, so it carries the
//! milliseconds by which KVM VM creation and the snapshot vary rep by rep.
//! What the clock itself costs is timed where it runs, inside the same
//! blackout: `clock_*_ns` is the destination's whole clock handling (the
//! baseline's at restore and at resume, `vm.info` `restore_clock_ns` /
//! `resume_clock_ns`, plus the armed clock's `armed_clock_ns`, or the
//! `clockcarry restore` command from its start to its PUT's answer), and
//! `added_clock_p50_ns` that median minus stock's: the part of
//! `added_p50_ns` that is the clock's, without the noise. The armed clock
//! replaces the baseline's restore-time handling (for ch-v53 vCPU 0's
//! offset copied to all), so its `restore_clock_ns` is 0.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::carry::ArmedFor;
use super::vmmproc::{DemoError, VmmProcess};
use super::{progress, Options, BOOT_TSC_S};

/// vCPU counts measured by default.
pub const DEFAULT_VCPUS: [u32; 3] = [1, 8, 64];
/// Reps per (mode, vCPU count) by default.
pub const DEFAULT_REPS: u32 = 30;
/// How long the source runs before the capture (kvm-clock enabled).
const WARMUP: Duration = Duration::from_millis(150);

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    Stock,
    Restore,
    Armed,
}

impl BenchMode {
    pub const ALL: [BenchMode; 3] = [BenchMode::Stock, BenchMode::Restore, BenchMode::Armed];

    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Stock => "stock",
            BenchMode::Restore => "restore",
            BenchMode::Armed => "armed",
        }
    }

    /// The target on what the armed clock adds to the blackout, judged on
    /// `added_clock_p50_ns` (<= 100 us at up to 8 vCPUs, <= 500 us beyond);
    /// `None` for the others.
    pub fn target_ns(self, vcpus: u32) -> Option<u64> {
        match self {
            BenchMode::Armed if vcpus <= 8 => Some(100_000),
            BenchMode::Armed => Some(500_000),
            _ => None,
        }
    }
}

/// One (mode, vCPU count) of the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub bench: &'static str,
    pub mode: &'static str,
    pub vcpus: u32,
    pub reps: usize,
    pub failures: usize,
    /// The first failure's message, if any.
    pub first_error: Option<String>,
    pub blackout_min_ns: Option<u64>,
    pub blackout_p50_ns: Option<u64>,
    pub blackout_p90_ns: Option<u64>,
    pub blackout_max_ns: Option<u64>,
    /// This mode's median blackout minus stock's (same vCPUs, same run).
    pub added_p50_ns: Option<i64>,
    /// The 90th percentile's difference, likewise.
    pub added_p90_ns: Option<i64>,
    /// The destination's clock handling inside the blackout (see the
    /// module), every rep.
    pub clock_p50_ns: Option<u64>,
    pub clock_p90_ns: Option<u64>,
    pub clock_max_ns: Option<u64>,
    /// The armed clock's own `armed_clock_ns` (checks and apply), armed only.
    pub armed_clock_p50_ns: Option<u64>,
    /// `clock_p50_ns` minus stock's: what this mode's clock adds.
    pub added_clock_p50_ns: Option<i64>,
    /// The target on `added_clock_p50_ns` ([`BenchMode::target_ns`]).
    pub target_added_clock_p50_ns: Option<u64>,
    /// No rep failed and `added_clock_p50_ns <= target`; `None` without a
    /// target.
    pub target_met: Option<bool>,
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn stamp(vmm: &VmmProcess, field: &str) -> Result<u64, DemoError> {
    let info = vmm.ok("GET", "vm.info", None)?;
    let v: serde_json::Value =
        serde_json::from_str(&info).map_err(|e| format!("{}: vm.info: {e}", vmm.name))?;
    v["clockcarry"][field]
        .as_u64()
        .ok_or_else(|| format!("{}: vm.info has no clockcarry.{field}", vmm.name))
}

/// What one rep measured, ns.
struct Rep {
    blackout_ns: u64,
    /// The destination's whole clock handling inside the blackout.
    clock_ns: u64,
    /// The armed clock's own time (armed only).
    armed_clock_ns: Option<u64>,
}

/// One rep: the blackout the guest saw and the clock's share of it.
fn one(opts: &Options, mode: BenchMode, vcpus: u32, dir: &Path) -> Result<Rep, DemoError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (program, prefix) = &opts.vmm;
    let mut base: Vec<String> = vec!["--baseline".into(), "ch-v53".into()];
    if mode != BenchMode::Stock {
        base.push("--clock-extension".into());
    }
    let mut src_args = base.clone();
    src_args.extend([
        "--kernel".into(),
        "probe".into(),
        "--cpus".into(),
        vcpus.to_string(),
        "--boot-tsc-s".into(),
        BOOT_TSC_S.to_string(),
    ]);
    let src = VmmProcess::start(program, prefix, dir, "src", &src_args)?;
    // Started before the pause: its process start is not in the blackout.
    let dst = VmmProcess::start(program, prefix, dir, "dst", &base)?;
    std::thread::sleep(WARMUP);
    let sidecar = dir.join("sidecar.json");
    let url = format!("file://{}", dir.join("snapshot").display());
    if mode != BenchMode::Stock {
        opts.carry.capture(&src, &sidecar)?;
    }
    let armed = if mode == BenchMode::Armed {
        Some(opts.carry.arm(&sidecar, ArmedFor::Restore(&url), dir)?)
    } else {
        None
    };
    src.ok("PUT", "vm.pause", None)?;
    src.ok(
        "PUT",
        "vm.snapshot",
        Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
    )?;
    let (mut command_ns, mut armed_clock_ns) = (0, None);
    match (mode, armed) {
        (BenchMode::Armed, Some(a)) => {
            dst.ok("PUT", "vm.restore", Some(&a.body))?;
            armed_clock_ns = Some(stamp(&dst, "armed_clock_ns")?);
        }
        (BenchMode::Restore, _) => {
            dst.ok(
                "PUT",
                "vm.restore",
                Some(&format!(r#"{{"source_url":"{url}","resume":false}}"#)),
            )?;
            command_ns = opts
                .carry
                .restore(&dst, &sidecar)?
                .restore_ns
                .ok_or("clockcarry restore reported no timing")?;
            dst.ok("PUT", "vm.resume", None)?;
        }
        _ => {
            dst.ok(
                "PUT",
                "vm.restore",
                Some(&format!(r#"{{"source_url":"{url}","resume":true}}"#)),
            )?;
        }
    }
    let resumed = stamp(&dst, "resumed_tai_ns")?;
    let paused = stamp(&src, "paused_tai_ns")?;
    let clock_ns = [
        stamp(&dst, "restore_clock_ns")?,
        stamp(&dst, "resume_clock_ns")?,
        command_ns,
        armed_clock_ns.unwrap_or(0),
    ]
    .iter()
    .fold(0u64, |a, b| a.saturating_add(*b));
    src.shutdown();
    dst.shutdown();
    let _ = std::fs::remove_dir_all(dir);
    let blackout = resumed
        .checked_sub(paused)
        .ok_or_else(|| format!("resumed {resumed} before paused {paused}"))?;
    Ok(Rep {
        blackout_ns: blackout,
        clock_ns,
        armed_clock_ns,
    })
}

/// One mode's reps: blackouts, clock shares, failures.
#[derive(Default)]
struct Samples {
    blackout_ns: Vec<u64>,
    clock_ns: Vec<u64>,
    armed_clock_ns: Vec<u64>,
    errors: Vec<String>,
}

fn row(mode: BenchMode, vcpus: u32, s: Samples) -> BenchRow {
    let (mut ns, mut clock, errors) = (s.blackout_ns, s.clock_ns, s.errors);
    let mut armed = s.armed_clock_ns;
    ns.sort_unstable();
    clock.sort_unstable();
    armed.sort_unstable();
    BenchRow {
        bench: "blackout",
        mode: mode.name(),
        vcpus,
        reps: ns.len(),
        failures: errors.len(),
        first_error: errors.first().cloned(),
        blackout_min_ns: ns.first().copied(),
        blackout_p50_ns: quantile(&ns, 0.5),
        blackout_p90_ns: quantile(&ns, 0.9),
        blackout_max_ns: ns.last().copied(),
        added_p50_ns: None,
        added_p90_ns: None,
        clock_p50_ns: quantile(&clock, 0.5),
        clock_p90_ns: quantile(&clock, 0.9),
        clock_max_ns: clock.last().copied(),
        armed_clock_p50_ns: quantile(&armed, 0.5),
        added_clock_p50_ns: None,
        target_added_clock_p50_ns: mode.target_ns(vcpus),
        target_met: None,
    }
}

fn diff(a: Option<u64>, b: Option<u64>) -> Option<i64> {
    let (a, b) = (i128::from(a?), i128::from(b?));
    i64::try_from(a - b).ok()
}

/// Runs the benchmark; `emit` sees each vCPU count's rows once complete.
pub fn run(
    opts: &Options,
    vcpu_counts: &[u32],
    reps: u32,
    mut emit: impl FnMut(&BenchRow),
) -> Vec<BenchRow> {
    let mut rows = Vec::new();
    for &vcpus in vcpu_counts {
        let mut samples: Vec<Samples> = BenchMode::ALL.iter().map(|_| Samples::default()).collect();
        for rep in 0..reps {
            for (i, &mode) in BenchMode::ALL.iter().enumerate() {
                let key = format!("bench/{vcpus}/{}", mode.name());
                progress::note(&key, &format!("rep {rep}"));
                let dir = opts.workdir.join(format!("bench-{vcpus}-{}", mode.name()));
                let s = &mut samples[i];
                match one(opts, mode, vcpus, &dir) {
                    Ok(r) => {
                        s.blackout_ns.push(r.blackout_ns);
                        s.clock_ns.push(r.clock_ns);
                        s.armed_clock_ns.extend(r.armed_clock_ns);
                    }
                    Err(e) => s.errors.push(format!("rep {rep}: {e}")),
                }
                progress::done(&key);
            }
        }
        let mut these: Vec<BenchRow> = BenchMode::ALL
            .iter()
            .zip(samples)
            .map(|(&m, s)| row(m, vcpus, s))
            .collect();
        let (stock_p50, stock_p90) = (these[0].blackout_p50_ns, these[0].blackout_p90_ns);
        let stock_clock_p50 = these[0].clock_p50_ns;
        for r in &mut these {
            r.added_p50_ns = diff(r.blackout_p50_ns, stock_p50);
            r.added_p90_ns = diff(r.blackout_p90_ns, stock_p90);
            r.added_clock_p50_ns = diff(r.clock_p50_ns, stock_clock_p50);
            r.target_met = r.target_added_clock_p50_ns.map(|t| {
                r.failures == 0
                    && r.added_clock_p50_ns
                        .is_some_and(|c| c <= i64::try_from(t).unwrap_or(i64::MAX))
            });
        }
        these.iter().for_each(&mut emit);
        rows.extend(these);
    }
    rows
}

/// The table for people.
pub fn render(rows: &[BenchRow], reps: u32) -> String {
    let us = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.1} us", v as f64 / 1e3));
    let sus = |v: Option<i64>| v.map_or("-".into(), |v| format!("{:+.1} us", v as f64 / 1e3));
    let mut out =
        format!(
        "clockcarry blackout benchmark: live update as a snapshot on this host, {reps} reps per \
         row,\nblackout = destination VMM's resume stamp - source VMM's pause stamp (CLOCK_TAI)\n\
         clock = the destination's clock handling inside it (baseline + clockcarry)\n\n\
         {:<8} {:>5} {:>5} {:>12} {:>12} {:>12} {:>13} {:>13} {:>11} {:>11} {:>13}  target\n",
        "mode", "vCPUs", "fail", "min", "p50", "p90", "added p50", "added p90", "clock p50",
        "clock p90", "clock added"
    );
    for r in rows {
        let target = match (r.target_added_clock_p50_ns, r.target_met) {
            (Some(t), Some(true)) => format!("<= {} us: met", t / 1000),
            (Some(t), _) => format!("<= {} us: MISSED", t / 1000),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<8} {:>5} {:>5} {:>12} {:>12} {:>12} {:>13} {:>13} {:>11} {:>11} {:>13}  {target}\n",
            r.mode,
            r.vcpus,
            r.failures,
            us(r.blackout_min_ns),
            us(r.blackout_p50_ns),
            us(r.blackout_p90_ns),
            sus(r.added_p50_ns),
            sus(r.added_p90_ns),
            us(r.clock_p50_ns),
            us(r.clock_p90_ns),
            sus(r.added_clock_p50_ns),
        ));
        if let Some(e) = &r.first_error {
            out.push_str(&format!("         first failure: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(quantile(&v, 0.5), Some(5));
        assert_eq!(quantile(&v, 0.9), Some(9));
        assert_eq!(quantile(&v, 1.0), Some(10));
        assert_eq!(quantile(&v, 0.0), Some(1));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[7], 0.9), Some(7));
    }

    #[test]
    fn targets_only_for_armed() {
        assert_eq!(BenchMode::Armed.target_ns(1), Some(100_000));
        assert_eq!(BenchMode::Armed.target_ns(8), Some(100_000));
        assert_eq!(BenchMode::Armed.target_ns(64), Some(500_000));
        assert_eq!(BenchMode::Restore.target_ns(8), None);
    }
}
