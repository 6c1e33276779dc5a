//! What one clock ioctl costs on this host, vCPU ioctls against VM ioctls:
//! the figure the armed clock's budget inside the blackout is made of
//! (docs/armed.md, "What it adds to the blackout").
//!
//!     cargo run --release -p clockcarry --example vcpu-ioctl-cost [-- --vcpus 8,64 --reps 50]
//!
//! For each size: a VM whose vCPU 0 ran once, then each pass timed `reps`
//! times (median printed): every vCPU's KVM_GET_DEVICE_ATTR(TSC_OFFSET),
//! KVM_SET_DEVICE_ATTR(TSC_OFFSET) (the offset it has), KVM_KVMCLOCK_CTRL,
//! KVM_GET_TSC_KHZ, the same vCPU's offset read `n` times, the three
//! per-vCPU ioctls grouped per vCPU and as three passes; and the VM ioctls
//! KVM_GET_CLOCK, KVM_GET_CLOCK + KVM_SET_CLOCK, KVM_GET_TSC_KHZ.

use std::process::ExitCode;
use std::time::Instant;

use clockcarry::kvm::guest::TestVm;
use clockcarry::kvm::sys;
use clockcarry::kvm::KvmError;

/// Median ns of `reps` runs of `f`, and per item of `per`.
fn time(label: &str, per: usize, reps: usize, mut f: impl FnMut() -> Result<(), KvmError>) {
    let mut v: Vec<u128> = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        if let Err(e) = f() {
            println!("{label:44} failed: {e}");
            return;
        }
        v.push(t.elapsed().as_nanos());
    }
    v.sort_unstable();
    let median = v.get(v.len() / 2).copied().unwrap_or(0);
    let each = median / u128::try_from(per.max(1)).unwrap_or(1);
    println!("{label:44} {median:>9} ns   {each:>6} ns each");
}

fn parse_args() -> Result<(Vec<u32>, usize), String> {
    let (mut sizes, mut reps) = (vec![1, 8, 64], 50usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--vcpus" => {
                sizes = v
                    .split(',')
                    .map(|s| s.parse().map_err(|_| format!("--vcpus {v}")))
                    .collect::<Result<_, _>>()?;
            }
            "--reps" => reps = v.parse().map_err(|_| format!("--reps {v}"))?,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok((sizes, reps.max(1)))
}

fn main() -> ExitCode {
    let (sizes, reps) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vcpu-ioctl-cost: {e} (--vcpus 1,8,64 --reps 50)");
            return ExitCode::from(2);
        }
    };
    let kvm = match TestVm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("vcpu-ioctl-cost: {e}");
            return ExitCode::from(2);
        }
    };
    for n in sizes {
        let mut vm = match TestVm::new(&kvm, n) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("vcpu-ioctl-cost: a {n}-vCPU VM: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = vm.run_report() {
            eprintln!("vcpu-ioctl-cost: running vCPU 0: {e}");
            return ExitCode::from(1);
        }
        let offsets: Result<Vec<i64>, KvmError> =
            vm.vcpus.iter().map(sys::get_tsc_offset).collect();
        let offsets = match offsets {
            Ok(o) => o,
            Err(e) => {
                eprintln!("vcpu-ioctl-cost: {e}");
                return ExitCode::from(1);
            }
        };
        let k = vm.vcpus.len();
        let ctrl = |v| match sys::kvmclock_ctrl(v) {
            Err(e) if e.errno() != Some(libc::EINVAL) => Err(e),
            _ => Ok(()),
        };
        println!("{n} vCPUs, median of {reps}:");
        time("get TSC offset, every vCPU", k, reps, || {
            vm.vcpus
                .iter()
                .try_for_each(|v| sys::get_tsc_offset(v).map(drop))
        });
        time("set TSC offset, every vCPU", k, reps, || {
            vm.vcpus
                .iter()
                .zip(&offsets)
                .try_for_each(|(v, o)| sys::set_tsc_offset(v, *o))
        });
        time("KVMCLOCK_CTRL, every vCPU", k, reps, || {
            vm.vcpus.iter().try_for_each(ctrl)
        });
        time("KVM_GET_TSC_KHZ, every vCPU", k, reps, || {
            vm.vcpus
                .iter()
                .try_for_each(|v| sys::vcpu_get_tsc_khz(v).map(drop))
        });
        time("get TSC offset of vCPU 0, n times", k, reps, || {
            vm.vcpus
                .iter()
                .try_for_each(|_| sys::get_tsc_offset(&vm.vcpus[0]).map(drop))
        });
        time("get + set + CTRL grouped per vCPU", k, reps, || {
            vm.vcpus.iter().zip(&offsets).try_for_each(|(v, o)| {
                sys::get_tsc_offset(v)?;
                sys::set_tsc_offset(v, *o)?;
                ctrl(v)
            })
        });
        time("get; set; CTRL as three passes", k, reps, || {
            vm.vcpus
                .iter()
                .try_for_each(|v| sys::get_tsc_offset(v).map(drop))?;
            vm.vcpus
                .iter()
                .zip(&offsets)
                .try_for_each(|(v, o)| sys::set_tsc_offset(v, *o))?;
            vm.vcpus.iter().try_for_each(ctrl)
        });
        time("KVM_GET_CLOCK (VM)", 1, reps, || {
            sys::get_clock(&vm.vm).map(drop)
        });
        time("KVM_GET_CLOCK + KVM_SET_CLOCK (VM)", 1, reps, || {
            let c = sys::get_clock(&vm.vm)?;
            sys::set_clock(&vm.vm, c.clock_ns, 0, 0)
        });
        time("KVM_GET_TSC_KHZ (VM)", 1, reps, || {
            sys::vm_get_tsc_khz(&vm.vm).map(drop)
        });
    }
    ExitCode::SUCCESS
}
