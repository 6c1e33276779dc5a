//! Benchmark of `kvm::apply` on /dev/kvm for VMs of 1, 8, 64 and 255 vCPUs.
//!
//!     cargo run --release -p clockcarry --example kvm-bench
//!
//! For each size: a VM with 64 KiB of memory whose vCPU 0 runs once (so KVM
//! is in master-clock mode and vCPU 0 has a kvm-clock page), a same-host
//! plan made by the planner from a capture of that VM, then `apply_with`
//! timed over many iterations (after a few warm-up calls). Prints
//! microseconds per call and per vCPU (median and p99), the median of each
//! step, and the KVM_SET_CLOCK tries.
//!
//! Options: `--iterations N` (default 200; 255-vCPU VMs use N/4),
//! `--vcpus 1,8,64,255`, `--json` (one JSON object).

use std::process::ExitCode;
use std::time::Instant;

use clockcarry::kvm::guest::TestVm;
use clockcarry::kvm::{apply_with, capture, ApplyOptions, ApplyReport, KvmOps, KvmProbe};
use clockcarry::model::{Policy, RunState};
use clockcarry::plan::{plan, Destination, Plan};
use clockcarry::sidecar::SidecarBody;
use kvm_ioctls::Kvm;
use serde::Serialize;

const WARMUP: u32 = 5;
const STEPS: [&str; 5] = [
    "read_offsets",
    "offsets",
    "set_clock",
    "kvmclock_ctrl",
    "verify",
];

#[derive(Serialize)]
struct Row {
    vcpus: u32,
    iterations: usize,
    median_us: f64,
    p99_us: f64,
    median_per_vcpu_us: f64,
    p99_per_vcpu_us: f64,
    /// Median duration of each step, µs.
    steps_median_us: Vec<(&'static str, f64)>,
    set_clock_tries_median: u32,
    set_clock_tries_max: u32,
    /// |kvm-clock error| after apply, ns: median and max.
    kvmclock_error_median_ns: u64,
    kvmclock_error_max_ns: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn same_host_plan(vm: &TestVm, probe: &KvmProbe) -> Result<Plan, String> {
    let caps = probe.capabilities();
    let reader = |gpa: u64| vm.memory().read_32(gpa);
    let src = capture(&vm.vm, &vm.vcpus, &caps, Some(&reader), RunState::Running)
        .map_err(|e| e.to_string())?;
    let khz = src.tsc_khz;
    let sample = clockcarry::host::sample(16, khz).map_err(|e| e.to_string())?;
    let identity = clockcarry::host::identity(khz).map_err(|e| e.to_string())?;
    let sidecar = SidecarBody::new("bench", identity.clone(), sample, src);
    let now = capture(&vm.vm, &vm.vcpus, &caps, Some(&reader), RunState::Paused)
        .map_err(|e| e.to_string())?;
    let dst = Destination {
        identity,
        sample: clockcarry::host::sample(16, khz).map_err(|e| e.to_string())?,
        vm: now,
        vm_id: None,
        offset_estimate: None,
    };
    plan(&sidecar, &dst, &Policy::default()).map_err(|e| e.to_string())
}

fn bench(kvm: &Kvm, probe: &KvmProbe, vcpus: u32, iterations: u32) -> Result<Row, String> {
    let mut vm = TestVm::new(kvm, vcpus).map_err(|e| e.to_string())?;
    vm.run_report().map_err(|e| e.to_string())?;
    let plan = same_host_plan(&vm, probe)?;
    let options = ApplyOptions::from_probe(probe);
    let mut ops = KvmOps::new(&vm.vm, &vm.vcpus);
    let mut totals = Vec::new();
    let mut reports: Vec<ApplyReport> = Vec::new();
    for i in 0..WARMUP + iterations {
        let t = Instant::now();
        let report = apply_with(&mut ops, &plan, &options).map_err(|e| e.to_string())?;
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if i >= WARMUP {
            totals.push(ns);
            reports.push(report);
        }
    }
    totals.sort_unstable();
    let n = f64::from(vcpus);
    let median = percentile(&totals, 0.5);
    let p99 = percentile(&totals, 0.99);
    let steps_median_us = STEPS
        .iter()
        .map(|name| {
            let mut v: Vec<u64> = reports.iter().filter_map(|r| r.step_ns(name)).collect();
            v.sort_unstable();
            (*name, us(percentile(&v, 0.5)))
        })
        .collect();
    let mut tries: Vec<u32> = reports
        .iter()
        .filter_map(|r| r.kvmclock.as_ref().map(|k| k.tries))
        .collect();
    tries.sort_unstable();
    let mut errors: Vec<u64> = reports
        .iter()
        .filter_map(|r| r.kvmclock.as_ref().and_then(|k| k.error_ns))
        .map(i64::unsigned_abs)
        .collect();
    errors.sort_unstable();
    Ok(Row {
        vcpus,
        iterations: totals.len(),
        median_us: us(median),
        p99_us: us(p99),
        median_per_vcpu_us: us(median) / n,
        p99_per_vcpu_us: us(p99) / n,
        steps_median_us,
        set_clock_tries_median: tries.get(tries.len() / 2).copied().unwrap_or(0),
        set_clock_tries_max: tries.last().copied().unwrap_or(0),
        kvmclock_error_median_ns: percentile(&errors, 0.5),
        kvmclock_error_max_ns: errors.last().copied().unwrap_or(0),
    })
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn main() -> ExitCode {
    let mut iterations: u32 = 200;
    let mut sizes: Vec<u32> = vec![1, 8, 64, 255];
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--iterations" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => iterations = n,
                _ => {
                    eprintln!("kvm-bench: --iterations needs a positive number");
                    return ExitCode::from(2);
                }
            },
            "--vcpus" => {
                let list: Option<Vec<u32>> = args
                    .next()
                    .map(|v| v.split(',').map(|s| s.parse().ok()).collect())
                    .unwrap_or(None);
                match list {
                    Some(l) if !l.is_empty() && l.iter().all(|n| *n > 0) => sizes = l,
                    _ => {
                        eprintln!("kvm-bench: --vcpus needs a list like 1,8,64,255");
                        return ExitCode::from(2);
                    }
                }
            }
            other => {
                eprintln!("kvm-bench: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let kvm = match TestVm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kvm-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let probe = match TestVm::new(&kvm, 1) {
        Ok(vm) => KvmProbe::run(&kvm, &vm.vm, &vm.vcpus[0]),
        Err(e) => {
            eprintln!("kvm-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let max_vcpus = kvm.get_max_vcpus();
    let mut rows = Vec::new();
    for n in sizes {
        if usize::try_from(n).map_or(true, |n| n > max_vcpus) {
            eprintln!("kvm-bench: {n} vCPUs is above this KVM's limit of {max_vcpus}; skipped");
            continue;
        }
        let iters = if n > 64 {
            (iterations / 4).max(1)
        } else {
            iterations
        };
        match bench(&kvm, &probe, n, iters) {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("kvm-bench: {n} vCPUs: {e}");
                return ExitCode::from(1);
            }
        }
    }
    if json {
        let out = serde_json::json!({
            "tsc_offsets_effective": probe.capabilities().tsc_offset_effective,
            "clock_guest": probe.clock_guest,
            "rows": rows,
        });
        println!("{out}");
        return ExitCode::SUCCESS;
    }
    println!(
        "apply() on /dev/kvm (offset writes effective: {}, CLOCK_GUEST: {})",
        probe.capabilities().tsc_offset_effective,
        probe.clock_guest
    );
    println!(
        "| vCPUs | iterations | median µs/call | p99 µs/call | median µs/vCPU | p99 µs/vCPU | \
         read_offsets | offsets | set_clock | kvmclock_ctrl | verify | SET_CLOCK tries (median/max) | |kvm-clock error| ns (median/max) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let step = |name: &str| {
            r.steps_median_us
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, v)| *v)
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} | {}/{} |",
            r.vcpus,
            r.iterations,
            r.median_us,
            r.p99_us,
            r.median_per_vcpu_us,
            r.p99_per_vcpu_us,
            step("read_offsets"),
            step("offsets"),
            step("set_clock"),
            step("kvmclock_ctrl"),
            step("verify"),
            r.set_clock_tries_median,
            r.set_clock_tries_max,
            r.kvmclock_error_median_ns,
            r.kvmclock_error_max_ns,
        );
    }
    ExitCode::SUCCESS
}
