//! The armed plan (`armed::plan_armed`), over simulated hosts: planned on
//! the destination while the VM still runs on the source, applied after
//! the blackout to the stock-restored VM, the guest's TSC must be where it
//! would have been had the VM never stopped (within the plan's bound), the
//! VMM's apply-time checks (`arm::check`) must pass, and kvm-clock must
//! follow the source line. Then each refusal.

use clockcarry::armed::{plan_armed, ArmPlanError, DEFAULT_VALID_FOR_NS};
use clockcarry::model::{ClockPolicy, Policy, RunState};
use clockcarry::plan::{PlanError, PlanMode};
use clockcarry::pvclock::ns_to_cycles;
use clockcarry::sidecar::SidecarBody;
use clockcarry::vmclock_api::arm::{check, ArmNow, ArmRefusal};
#[path = "support/sim.rs"]
mod sim;

use proptest::prelude::*;
use sim::{SimHost, SimVm};

const VM: &str = "vm-1";

#[derive(Debug, Clone)]
struct Case {
    vcpus: usize,
    guest_khz: u32,
    same_host: bool,
    dst_base: u64,
    /// Destination CLOCK_TAI minus true time (the source's is exact).
    dst_tai_error_ns: i64,
    capture_to_plan_ns: u64,
    plan_to_pause_ns: u64,
    blackout_ns: u64,
    apply_to_read_ns: u64,
}

struct Done {
    src_vm: SimVm,
    dst_vm: SimVm,
    t_capture: u64,
    t_read: u64,
    bound_ns: u64,
    mode: PlanMode,
    kvmclock_src_ns: u64,
}

/// Why [`run`] did not get to a running destination guest.
#[derive(Debug)]
enum Refused {
    /// `arm::check`'s floor: the plan puts a vCPU `by_cycles` below its
    /// saved TSC (the plan's error bound was `bound_ns`).
    Backwards {
        by_cycles: u64,
        bound_ns: u64,
    },
    Other(String),
}

impl From<String> for Refused {
    fn from(s: String) -> Refused {
        Refused::Other(s)
    }
}

impl From<&str> for Refused {
    fn from(s: &str) -> Refused {
        Refused::Other(s.to_string())
    }
}

fn run(c: &Case) -> Result<Done, Refused> {
    let src_host = SimHost::new("a", "boot-a", c.guest_khz, 7_000_000_000_000);
    let mut dst_host = if c.same_host {
        src_host.clone()
    } else {
        SimHost::new("b", "boot-b", c.guest_khz, c.dst_base)
    };
    if !c.same_host {
        dst_host.tai_error_ns = c.dst_tai_error_ns;
        dst_host.quality.maxerror_ns = c.dst_tai_error_ns.unsigned_abs();
    }
    let t_create = 1_000_000_000u64;
    let initial: Vec<u64> = (0..c.vcpus).map(|i| 1_000_000 + 97 * i as u64).collect();
    let src_vm = SimVm::create(&src_host, t_create, c.guest_khz, &initial).ok_or("src VM")?;
    let t_capture = t_create + 3_000_000_000;
    let body = SidecarBody::new(
        VM,
        src_host.identity.clone(),
        src_host.sample(t_capture, 0),
        src_vm.vm_clock(t_capture, RunState::Running),
    );

    // Armed on the destination while the VM still runs on the source.
    let t_plan = t_capture + c.capture_to_plan_ns;
    let armed = plan_armed(
        &body,
        dst_host.identity.clone(),
        dst_host.sample(t_plan, 0),
        Some(VM.into()),
        &Policy::default(),
        DEFAULT_VALID_FOR_NS,
    )
    .map_err(|e| e.to_string())?;
    let arm = armed.put.arm.ok_or("no arm in the body")?;

    // Paused, state saved, blackout, restored the stock way, armed clock
    // checked and applied at once.
    let t_pause = t_plan + c.plan_to_pause_ns;
    let saved: Vec<u64> = (0..c.vcpus).map(|i| src_vm.guest_tsc(i, t_pause)).collect();
    let t_apply = t_pause + c.blackout_ns;
    let mut dst_vm = SimVm::stock_restore(
        &dst_host,
        t_apply,
        c.guest_khz,
        &saved,
        src_vm.kvmclock_ns(0, t_pause),
    )
    .ok_or("dst VM")?;
    let now = ArmNow {
        host_tsc: dst_host.host_tsc(t_apply),
        tai_ns: dst_host.tai_ns(t_apply),
        host_khz: dst_host.identity.tsc_khz,
        guest_khz: c.guest_khz,
    };
    let saved_opt: Vec<Option<u64>> = saved.iter().copied().map(Some).collect();
    check(
        &arm,
        &armed.put.tsc_offsets,
        armed.put.tsc_khz,
        &now,
        &saved_opt,
    )
    .map_err(|e| match e {
        // A destination clock behind by more than the time since the
        // capture plans the guest below the TSC its saved state holds: the
        // VMM refuses rather than send the guest backwards.
        ArmRefusal::BelowSavedTsc { by_cycles, .. } => Refused::Backwards {
            by_cycles,
            bound_ns: armed.plan.error_bound.total_ns,
        },
        e => Refused::Other(format!("the VMM refused: {e}")),
    })?;
    dst_vm
        .apply(&armed.plan, t_apply)
        .map_err(|e| e.to_string())?;
    let t_read = t_apply + c.apply_to_read_ns;
    Ok(Done {
        kvmclock_src_ns: src_vm.kvmclock_ns(0, t_read),
        src_vm,
        dst_vm,
        t_capture,
        t_read,
        bound_ns: armed.plan.error_bound.total_ns,
        mode: armed.plan.mode,
    })
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=8,
        prop_oneof![Just(2_000_000u32), Just(2_599_997), 1_000_000u32..4_000_000],
        any::<bool>(),
        0u64..(1 << 50),
        -50_000_000i64..50_000_000,
        0u64..120_000_000_000,
        0u64..60_000_000_000,
        0u64..30_000_000_000,
        0u64..10_000_000_000,
    )
        .prop_map(|t| Case {
            vcpus: t.0,
            guest_khz: t.1,
            same_host: t.2,
            dst_base: t.3,
            dst_tai_error_ns: t.4,
            capture_to_plan_ns: t.5,
            plan_to_pause_ns: t.6,
            blackout_ns: t.7,
            apply_to_read_ns: t.8,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Each vCPU's TSC at the read is its capture value plus the true time
    /// since, within the plan's bound (0 on the same host), the vCPUs'
    /// differences are kept, and kvm-clock follows the source line; or,
    /// where a destination clock behind plans the guest below its saved
    /// TSC, the VMM refuses (within the bound, cross-host only).
    #[test]
    fn the_armed_guest_runs_on_as_if_it_never_stopped(c in case()) {
        let d = match run(&c) {
            Ok(d) => d,
            // Only a destination clock behind (an error the bound counts)
            // can plan the guest below its saved TSC, by no more than the
            // bound; then the VMM refuses and the VM stays as stock left it.
            Err(Refused::Backwards { by_cycles, bound_ns }) => {
                prop_assert!(!c.same_host && c.dst_tai_error_ns < 0, "{:?}", c);
                prop_assert!(by_cycles <= ns_to_cycles(bound_ns, c.guest_khz) + 2,
                    "{} cycles below, bound {} ns ({:?})", by_cycles, bound_ns, c);
                return Ok(());
            }
            Err(Refused::Other(e)) => return Err(TestCaseError::fail(e)),
        };
        prop_assert_eq!(d.mode, if c.same_host { PlanMode::SameHost } else { PlanMode::CrossHost });
        let elapsed = d.t_read - d.t_capture;
        for i in 0..c.vcpus {
            let ideal = d.src_vm.guest_tsc(i, d.t_capture)
                .wrapping_add(ns_to_cycles(elapsed, c.guest_khz));
            let got = d.dst_vm.guest_tsc(i, d.t_read);
            let err = got.wrapping_sub(ideal) as i64;
            // One cycle of rounding per conversion, the bound's own rounding.
            let allowed = ns_to_cycles(d.bound_ns, c.guest_khz) + 2;
            prop_assert!(err.unsigned_abs() <= allowed,
                "vCPU {} error {} cycles, bound {} cycles ({:?})", i, err, allowed, c);
            prop_assert_eq!(
                got.wrapping_sub(d.dst_vm.guest_tsc(0, d.t_read)),
                d.src_vm.guest_tsc(i, d.t_read).wrapping_sub(d.src_vm.guest_tsc(0, d.t_read)));
        }
        if c.same_host {
            prop_assert_eq!(d.bound_ns, 0);
        }
        // kvm-clock against the never-stopped source VM: off by the TSC's
        // error (within the bound) plus the calibration's window (50 ns
        // above the line by default) and a few ns of rounding.
        let kvm_err = i128::from(d.dst_vm.kvmclock_ns(0, d.t_read)) - i128::from(d.kvmclock_src_ns);
        prop_assert!(kvm_err.unsigned_abs() <= u128::from(d.bound_ns) + 60,
            "kvm-clock {} ns off ({:?})", kvm_err, c);
    }
}

fn fixed(same_host: bool) -> Case {
    Case {
        vcpus: 4,
        guest_khz: 2_000_000,
        same_host,
        dst_base: 123_456_789_000,
        dst_tai_error_ns: 2_000_000,
        capture_to_plan_ns: 200_000_000,
        plan_to_pause_ns: 500_000_000,
        blackout_ns: 1_000_000_000,
        apply_to_read_ns: 1_000_000_000,
    }
}

#[test]
fn fixed_cases_pass_on_both_paths() {
    for same in [true, false] {
        let d = run(&fixed(same)).expect("fixed case");
        assert_eq!(d.mode == PlanMode::SameHost, same);
    }
}

fn one_host() -> (SidecarBody, SimHost, SimVm) {
    let host = SimHost::new("a", "boot-a", 2_000_000, 1 << 40);
    let vm = SimVm::create(&host, 1_000_000_000, 2_000_000, &[5_000_000, 5_000_000]).unwrap();
    let t = 2_000_000_000;
    let body = SidecarBody::new(
        VM,
        host.identity.clone(),
        host.sample(t, 0),
        vm.vm_clock(t, RunState::Running),
    );
    (body, host, vm)
}

#[test]
fn freeze_cannot_be_armed() {
    let (body, host, _) = one_host();
    let policy = Policy {
        clock: ClockPolicy::Freeze,
        ..Policy::default()
    };
    let err = plan_armed(
        &body,
        host.identity.clone(),
        host.sample(3_000_000_000, 0),
        None,
        &policy,
        DEFAULT_VALID_FOR_NS,
    )
    .unwrap_err();
    assert!(matches!(err, ArmPlanError::Freeze), "{err}");
    assert!(err.to_string().contains("freeze"), "{err}");
}

#[test]
fn a_validity_outside_the_limits_is_refused() {
    let (body, host, _) = one_host();
    for v in [0, clockcarry::vmclock_api::arm::MAX_VALID_FOR_NS + 1] {
        let err = plan_armed(
            &body,
            host.identity.clone(),
            host.sample(3_000_000_000, 0),
            None,
            &Policy::default(),
            v,
        )
        .unwrap_err();
        assert!(err.to_string().contains("valid_for_ns"), "{err}");
    }
}

#[test]
fn another_vms_sidecar_and_a_rate_the_host_cannot_run_are_refused() {
    let (body, host, _) = one_host();
    let sample = host.sample(3_000_000_000, 0);
    let err = plan_armed(
        &body,
        host.identity.clone(),
        sample.clone(),
        Some("vm-2".into()),
        &Policy::default(),
        DEFAULT_VALID_FOR_NS,
    )
    .unwrap_err();
    assert!(
        matches!(err, ArmPlanError::Plan(PlanError::VmMismatch { .. })),
        "{err}"
    );
    // A destination host 1 % faster: KVM would scale, the offset would not
    // be a constant.
    let mut other = SimHost::new("b", "boot-b", 2_020_000, 1 << 41);
    other.quality.maxerror_ns = 1_000;
    let err = plan_armed(
        &body,
        other.identity.clone(),
        other.sample(3_000_000_000, 0),
        None,
        &Policy::default(),
        DEFAULT_VALID_FOR_NS,
    )
    .unwrap_err();
    assert!(
        matches!(err, ArmPlanError::Plan(PlanError::RateMismatch { .. })),
        "{err}"
    );
}

/// A body armed for one VM, offered with another VM's saved state (a TSC
/// far from the capture): the VMM's check refuses it, naming the field.
#[test]
fn the_vmm_refuses_the_body_for_another_vms_state() {
    let (body, host, vm) = one_host();
    let t_plan = 3_000_000_000;
    let armed = plan_armed(
        &body,
        host.identity.clone(),
        host.sample(t_plan, 0),
        Some(VM.into()),
        &Policy::default(),
        DEFAULT_VALID_FOR_NS,
    )
    .unwrap();
    let arm = armed.put.arm.unwrap();
    let t_apply = t_plan + 1_000_000_000;
    let now = ArmNow {
        host_tsc: host.host_tsc(t_apply),
        tai_ns: host.tai_ns(t_apply),
        host_khz: 2_000_000,
        guest_khz: 2_000_000,
    };
    let this_vm: Vec<Option<u64>> = (0..2).map(|i| Some(vm.guest_tsc(i, t_plan))).collect();
    check(
        &arm,
        &armed.put.tsc_offsets,
        armed.put.tsc_khz,
        &now,
        &this_vm,
    )
    .unwrap();
    let other_vm = vec![Some(vm.guest_tsc(0, t_plan) + 3_600 * 2_000_000_000); 2];
    let err = check(
        &arm,
        &armed.put.tsc_offsets,
        armed.put.tsc_khz,
        &now,
        &other_vm,
    )
    .unwrap_err();
    assert!(matches!(err, ArmRefusal::StateTooFarAhead { .. }), "{err}");
    assert!(err.to_string().contains("arm.capture_guest_tsc"), "{err}");
}
