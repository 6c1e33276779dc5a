//! Same-host round trip on /dev/kvm: capture VM A, plan, apply to a fresh VM
//! B, and measure from B's guest how far kvm-clock stepped across the switch.
//!
//!     cargo run --release -p clockcarry --example kvm-roundtrip -- --json
//!
//! Options: `--json` (one JSON object on stdout), `--runs N` (N round trips;
//! the headline `kvmclock_step_ns` is then the one of largest magnitude and
//! `monotonic` holds only if every run was), `--vcpus N` (default 2),
//! `--max-error-ns N` (the KVM_SET_CLOCK loop's target, default 50; 0 makes
//! it use every try, to see where it settles).
//! Exit status: 0 on success, 1 when a round trip failed, 2 when /dev/kvm
//! cannot be used.

use std::process::ExitCode;

use clockcarry::kvm::guest::TestVm;
use clockcarry::kvm::selftest::{same_host_roundtrip, RoundtripOutcome};
use clockcarry::kvm::KvmProbe;
use clockcarry::Policy;
use serde_json::json;

struct Args {
    json: bool,
    runs: u32,
    vcpus: u32,
    max_error_ns: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        json: false,
        runs: 1,
        vcpus: 2,
        max_error_ns: Policy::default().max_kvmclock_error_ns,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<u32, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .ok_or(format!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--json" => args.json = true,
            "--runs" => args.runs = number("--runs")?,
            "--vcpus" => args.vcpus = number("--vcpus")?,
            "--max-error-ns" => {
                args.max_error_ns = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--max-error-ns needs a number")?
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kvm-roundtrip: {e}");
            return ExitCode::from(2);
        }
    };
    let kvm = match TestVm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kvm-roundtrip: {e}");
            return ExitCode::from(2);
        }
    };
    // Probe once per process, on a VM of our own.
    let probe = match TestVm::new(&kvm, 1) {
        Ok(vm) => KvmProbe::run(&kvm, &vm.vm, &vm.vcpus[0]),
        Err(e) => {
            eprintln!("kvm-roundtrip: {e}");
            return ExitCode::from(2);
        }
    };
    let policy = Policy {
        max_kvmclock_error_ns: args.max_error_ns,
        ..Policy::default()
    };
    let mut outcomes: Vec<RoundtripOutcome> = Vec::new();
    for run in 0..args.runs {
        match same_host_roundtrip(&kvm, args.vcpus, &probe, &policy) {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("kvm-roundtrip: run {run}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let Some(worst) = outcomes
        .iter()
        .max_by_key(|o| o.kvmclock_step_ns.unsigned_abs())
    else {
        return ExitCode::from(1);
    };
    let monotonic = outcomes.iter().all(|o| o.monotonic);
    let steps: Vec<i64> = outcomes.iter().map(|o| o.kvmclock_step_ns).collect();
    let caps = probe.capabilities();
    let kvmclock = worst.apply.kvmclock.as_ref();
    let refused_ctrl: Vec<u32> = worst.apply.refused.iter().filter_map(|r| r.vcpu).collect();

    if args.json {
        let out = json!({
            "kvmclock_step_ns": worst.kvmclock_step_ns,
            "monotonic": monotonic,
            "tsc_offsets_effective": caps.tsc_offset_effective,
            "clock_guest": caps.clock_guest,
            "adjust_clock_flags": caps.adjust_clock,
            "runs": outcomes.len(),
            "vcpus": args.vcpus,
            "steps_ns": steps,
            "plan_mode": worst.plan_mode,
            "kvmclock_method": kvmclock.map(|k| k.method),
            "set_clock_tries": kvmclock.map(|k| k.tries),
            "set_clock_error_ns": kvmclock.and_then(|k| k.error_ns),
            "set_clock_try_errors_ns": kvmclock.map(|k| k.try_errors_ns.clone()),
            "apply_total_ns": worst.apply.total_ns,
            "kvmclock_ctrl_refused_vcpus": refused_ctrl,
            "apply_tsc_offsets_effective": worst.apply.tsc_offsets_effective,
            "probe": probe,
        });
        println!("{out}");
    } else {
        println!(
            "kvm-roundtrip: {} run(s), {} vCPUs",
            outcomes.len(),
            args.vcpus
        );
        println!(
            "  probe: adjust_clock flags {}, TSC offset attr {}, offset writes effective {:?}, \
             clock_guest {} (errno {:?}), TSC scaling {}, KVMCLOCK_CTRL {}",
            probe.adjust_clock_flags,
            probe.tsc_offset_attr,
            probe.tsc_offset_effective,
            probe.clock_guest,
            probe.clock_guest_errno,
            caps.tsc_scaling,
            probe.kvmclock_ctrl
        );
        for note in &probe.notes {
            println!("  probe note: {note}");
        }
        for (i, o) in outcomes.iter().enumerate() {
            let k = o.apply.kvmclock.as_ref();
            println!(
                "  run {i}: step {:+} ns, monotonic {}, {:?} plan, {} {} tries, errors {:?} ns, apply {} us",
                o.kvmclock_step_ns,
                o.monotonic,
                o.plan_mode,
                k.map_or("-", |k| k.method),
                k.map_or(0, |k| k.tries),
                k.map(|k| &k.try_errors_ns),
                o.apply.total_ns / 1000
            );
        }
        println!(
            "  worst step {:+} ns (acceptance <= 1000, goal 50); monotonic {}; \
             TSC offsets effective {}",
            worst.kvmclock_step_ns, monotonic, caps.tsc_offset_effective
        );
    }
    ExitCode::SUCCESS
}
