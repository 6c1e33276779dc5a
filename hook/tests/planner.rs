//! The planner, proven over simulated hosts: a VM is created on host A,
//! captured while running, paused, restored on host B (or A) the stock way,
//! planned and applied; then the guest's own TSC and kvm-clock are read.

use clockcarry::model::{ClockPolicy, Policy, RunState};
use clockcarry::plan::{plan, Destination, KvmClockAction, PlanError, PlanMode};
use clockcarry::pvclock::{ns_to_cycles, pvclock_read};
use clockcarry::sidecar::SidecarBody;
#[path = "support/sim.rs"]
mod sim;

use proptest::prelude::*;
use sim::{SimHost, SimVm};

/// One migration of a simulated VM.
#[derive(Debug, Clone)]
struct Scenario {
    vcpus: usize,
    guest_khz: u32,
    src_base: u64,
    dst_base: u64,
    /// Per-vCPU TSC differences at creation.
    skews: Vec<u64>,
    src_tai_error_ns: i64,
    dst_tai_error_ns: i64,
    src_bracket_ns: u64,
    dst_bracket_ns: u64,
    src_bracket_err: i64,
    dst_bracket_err: i64,
    /// Whether each host's maxerror covers its TAI error (honest hosts).
    honest: bool,
    same_host: bool,
    src_clock_guest: bool,
    dst_clock_guest: bool,
    freeze: bool,
    /// True-time steps: run before capture, capture->pause, pause->restore,
    /// restore->sample, sample->apply, apply->guest read.
    run_ns: u64,
    capture_to_pause_ns: u64,
    blackout_ns: u64,
    restore_to_sample_ns: u64,
    sample_to_apply_ns: u64,
    apply_to_read_ns: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (
            1usize..=8,
            1_000_000u32..=5_000_000,
            0u64..(1 << 60),
            0u64..(1 << 60),
        ),
        (
            proptest::collection::vec(0u64..1_000_000, 8),
            -50_000_000i64..50_000_000,
            -50_000_000i64..50_000_000,
            0u64..20_000,
            0u64..20_000,
            any::<i64>(),
            any::<i64>(),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            1_000u64..100_000_000_000,
            0u64..5_000_000_000,
            0u64..100_000_000_000,
            0u64..100_000_000,
            0u64..10_000_000,
            0u64..1_000_000,
        ),
    )
        .prop_map(|(a, b, c, d)| Scenario {
            vcpus: a.0,
            guest_khz: a.1,
            src_base: a.2,
            dst_base: a.3,
            skews: b.0,
            src_tai_error_ns: b.1,
            dst_tai_error_ns: b.2,
            src_bracket_ns: b.3,
            dst_bracket_ns: b.4,
            src_bracket_err: b.5,
            dst_bracket_err: b.6,
            honest: c.0,
            same_host: c.1,
            src_clock_guest: c.2,
            dst_clock_guest: c.3,
            freeze: c.4 && c.5,
            run_ns: d.0,
            capture_to_pause_ns: d.1,
            blackout_ns: d.2,
            restore_to_sample_ns: d.3,
            sample_to_apply_ns: d.4,
            apply_to_read_ns: d.5,
        })
}

struct Outcome {
    src_vm: SimVm,
    dst_vm: SimVm,
    result: Result<clockcarry::plan::Plan, PlanError>,
    t_capture: u64,
    t_pause: u64,
    t_sample: u64,
    t_read: u64,
}

/// One side of the migration: name, boot id, TSC base, TAI error, bracket,
/// CLOCK_GUEST support.
struct Side<'a>(&'a str, &'a str, u64, i64, u64, bool);

fn host(sc: &Scenario, side: Side) -> SimHost {
    let Side(name, boot, base, tai_err, bracket, clock_guest) = side;
    let mut h = SimHost::new(name, boot, sc.guest_khz, base);
    h.tai_error_ns = tai_err;
    h.bracket_ns = bracket;
    h.quality.maxerror_ns = if sc.honest { tai_err.unsigned_abs() } else { 0 };
    h.quality.esterror_ns = h.quality.maxerror_ns / 2;
    h.clock_guest = clock_guest;
    h
}

fn run(sc: &Scenario) -> Outcome {
    let src_host = host(
        sc,
        Side(
            "a",
            "boot-a",
            sc.src_base,
            sc.src_tai_error_ns,
            sc.src_bracket_ns,
            sc.src_clock_guest,
        ),
    );
    let dst_host = if sc.same_host {
        let mut h = src_host.clone();
        h.clock_guest = sc.dst_clock_guest;
        h
    } else {
        host(
            sc,
            Side(
                "b",
                "boot-b",
                sc.dst_base,
                sc.dst_tai_error_ns,
                sc.dst_bracket_ns,
                sc.dst_clock_guest,
            ),
        )
    };
    let t_create = 1_000_000_000u64;
    let initial: Vec<u64> = (0..sc.vcpus).map(|i| 1_000_000 + sc.skews[i]).collect();
    let src_vm = SimVm::create(&src_host, t_create, sc.guest_khz, &initial).expect("source VM");

    let t_capture = t_create + sc.run_ns;
    let vm_clock = src_vm.vm_clock(t_capture, RunState::Running);
    let capture = src_host.sample(t_capture, sc.src_bracket_err);
    let body = SidecarBody::new("vm-1", src_host.identity.clone(), capture, vm_clock);

    // The VMM pauses later, snapshots the TSC (MSR) and the kvm-clock, and
    // restores them the stock way on the destination.
    let t_pause = t_capture + sc.capture_to_pause_ns;
    let saved_tsc: Vec<u64> = (0..sc.vcpus)
        .map(|i| src_vm.guest_tsc(i, t_pause))
        .collect();
    let saved_clock = src_vm.kvmclock_ns(0, t_pause);
    let t_restore = t_pause + sc.blackout_ns;
    let mut dst_vm =
        SimVm::stock_restore(&dst_host, t_restore, sc.guest_khz, &saved_tsc, saved_clock)
            .expect("dst VM");

    let t_sample = t_restore + sc.restore_to_sample_ns;
    let dst = Destination {
        identity: dst_host.identity.clone(),
        sample: dst_host.sample(t_sample, sc.dst_bracket_err),
        vm: dst_vm.vm_clock(t_sample, RunState::Paused),
        vm_id: Some("vm-1".into()),
        offset_estimate: None,
    };
    let policy = Policy {
        clock: if sc.freeze {
            ClockPolicy::Freeze
        } else {
            ClockPolicy::KeepRunning
        },
        ..Policy::default()
    };
    let result = plan(&body, &dst, &policy);
    let t_apply = t_sample + sc.sample_to_apply_ns;
    if let Ok(p) = &result {
        dst_vm.apply(p, t_apply).expect("apply in the simulation");
    }
    Outcome {
        src_vm,
        dst_vm,
        result,
        t_capture,
        t_pause,
        t_sample,
        t_read: t_apply + sc.apply_to_read_ns,
    }
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(1000)
}

proptest! {
    #![proptest_config(config())]

    /// Honest hosts always get a plan, and the guest's clocks never go back.
    #[test]
    fn no_counter_goes_backwards(sc in scenario()) {
        let sc = Scenario { honest: true, ..sc };
        let o = run(&sc);
        let plan = o.result.as_ref().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for i in 0..sc.vcpus {
            let last_tsc = o.src_vm.guest_tsc(i, o.t_pause);
            let first_tsc = o.dst_vm.guest_tsc(i, o.t_read);
            prop_assert!(first_tsc >= last_tsc, "vCPU {i} TSC {last_tsc} -> {first_tsc}, plan {plan:?}");
            let last_ns = o.src_vm.kvmclock_ns(i, o.t_pause);
            let first_ns = o.dst_vm.kvmclock_ns(i, o.t_read);
            prop_assert!(first_ns >= last_ns, "vCPU {i} kvm-clock {last_ns} -> {first_ns}");
        }
    }

    /// Same host: offsets bit-identical (keep-running).
    #[test]
    fn same_host_offsets_bit_identical(sc in scenario()) {
        let sc = Scenario { same_host: true, freeze: false, ..sc };
        let o = run(&sc);
        let plan = o.result.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(plan.mode, PlanMode::SameHost);
        prop_assert_eq!(&plan.tsc_offsets, &o.src_vm.offsets);
        prop_assert_eq!(plan.error_bound.tsc_cycles, 0);
    }

    /// Cross host: guest TSC within (TAI disagreement + brackets) x rate of
    /// where it would be had the VM kept running on the source.
    #[test]
    fn cross_host_tsc_error_bounded(sc in scenario()) {
        let sc = Scenario { same_host: false, freeze: false, honest: true, ..sc };
        let o = run(&sc);
        let plan = o.result.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(plan.mode, PlanMode::CrossHost);
        let disagreement = sc.dst_tai_error_ns.abs_diff(sc.src_tai_error_ns);
        let brackets = sc.src_bracket_err.clamp(-(sc.src_bracket_ns as i64), sc.src_bracket_ns as i64).unsigned_abs()
            + sc.dst_bracket_err.clamp(-(sc.dst_bracket_ns as i64), sc.dst_bracket_ns as i64).unsigned_abs();
        // +2 cycles: one floor in the planner's ns->cycles, one in the sim's.
        let allowed = ns_to_cycles(disagreement + brackets, sc.guest_khz) + 2;
        for i in 0..sc.vcpus {
            let ideal = o.src_vm.guest_tsc(i, o.t_sample);
            let placed = o.dst_vm.guest_tsc(i, o.t_sample);
            let err = placed.abs_diff(ideal);
            prop_assert!(err <= allowed, "vCPU {i}: error {err} cycles > {allowed}");
            prop_assert!(err <= plan.error_bound.tsc_cycles + 2,
                "vCPU {i}: error {err} cycles beyond the plan's own bound {:?}", plan.error_bound);
        }
    }

    /// With CLOCK_GUEST, kvm-clock at the new guest TSC is the source PVTI's
    /// value (within 1 ns; here exactly, as the line is installed as is).
    #[test]
    fn clock_guest_follows_source_line(sc in scenario()) {
        let sc = Scenario { dst_clock_guest: true, src_clock_guest: true, honest: true, ..sc };
        let o = run(&sc);
        let plan = o.result.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let source_pvti = match plan.kvmclock {
            KvmClockAction::ClockGuest { pvti } => pvti,
            other => return Err(TestCaseError::fail(format!("expected clock_guest, got {other:?}"))),
        };
        prop_assert_eq!(source_pvti, o.src_vm.pvti);
        for i in 0..sc.vcpus {
            let tsc = o.dst_vm.guest_tsc(i, o.t_read);
            let expect = pvclock_read(&o.src_vm.vcpu_pvti(i), tsc);
            let got = o.dst_vm.kvmclock_ns(i, o.t_read);
            prop_assert!(expect.abs_diff(got) <= 1, "vCPU {i}: {got} vs {expect}");
        }
    }

    /// One delta for every vCPU: their differences survive any plan.
    #[test]
    fn inter_vcpu_differences_preserved(sc in scenario()) {
        let o = run(&Scenario { honest: true, ..sc.clone() });
        let plan = o.result.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let before = &o.src_vm.offsets;
        for i in 1..sc.vcpus {
            let was = (before[i] as u64).wrapping_sub(before[0] as u64);
            let now = (plan.tsc_offsets[i] as u64).wrapping_sub(plan.tsc_offsets[0] as u64);
            prop_assert_eq!(was, now);
        }
    }

    /// Freeze: the guest TSC resumes where the guest left it (at most the
    /// time the destination VM already ran), and kvm-clock with it, on the same line.
    #[test]
    fn freeze_is_consistent(sc in scenario()) {
        let sc = Scenario { freeze: true, honest: true, ..sc };
        let o = run(&sc);
        let plan = o.result.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(plan.elapsed_ns, 0);
        let at_pause = o.src_vm.guest_tsc(0, o.t_pause);
        let placed = o.dst_vm.guest_tsc(0, o.t_sample);
        let restore_run = ns_to_cycles(sc.restore_to_sample_ns, sc.guest_khz) + 2;
        prop_assert!(placed >= at_pause && placed - at_pause <= restore_run,
            "freeze placed {placed}, paused at {at_pause}");
        let line = plan.kvmclock.pvti();
        let tsc = o.dst_vm.guest_tsc(0, o.t_read);
        let on_line = pvclock_read(line, tsc);
        let got = o.dst_vm.kvmclock_ns(0, o.t_read);
        prop_assert!(got >= on_line && got - on_line <= plan.error_bound.kvmclock_ns + 1,
            "kvm-clock {got} vs line {on_line}, bound {:?}", plan.error_bound);
    }

    /// Dishonest clocks (maxerror below the real error): a plan is refused
    /// or it still never goes backwards.
    #[test]
    fn dishonest_clocks_refused_or_monotonic(sc in scenario()) {
        let sc = Scenario { honest: false, same_host: false, ..sc };
        let o = run(&sc);
        match &o.result {
            Err(PlanError::CaptureInFuture { .. }) => {}
            // The restored VM's TSC is past anything the (lying) clocks
            // allow since the capture: the restored-state check refuses.
            Err(PlanError::NotThisVm { field: "vm_clock.vcpus[0].tsc_offset", .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("unexpected refusal {e}"))),
            Ok(_) => {
                for i in 0..sc.vcpus {
                    prop_assert!(o.dst_vm.guest_tsc(i, o.t_read) >= o.src_vm.guest_tsc(i, o.t_pause));
                }
            }
        }
        let _ = o.t_capture;
    }
}

// ---- arbitrary inputs: the planner is total ----

use clockcarry::model::{
    Capabilities, ClockQuality, HostIdentity, HostSample, KvmClockSample, LeapPending,
    OffsetEstimate, Pvti, PvtiSource, TscFlags, TscScaling, VcpuOffset, VmClock,
};

/// Half arbitrary, half plausible rates, so both validation and the
/// arithmetic behind it see arbitrary values.
fn khz() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), 1u32..=100_000_000]
}

fn any_quality() -> impl Strategy<Value = ClockQuality> {
    (any::<bool>(), any::<u64>(), any::<u64>()).prop_map(|(s, m, e)| ClockQuality {
        synchronised: s,
        maxerror_ns: m,
        esterror_ns: e,
        leap_pending: LeapPending::None,
    })
}

fn any_sample() -> impl Strategy<Value = HostSample> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<i32>(),
        any::<u64>(),
        any_quality(),
    )
        .prop_map(|(tsc, tai, rt, off, unc, q)| HostSample {
            host_tsc: tsc,
            tai_ns: tai,
            realtime_ns: rt,
            tai_offset_s: off,
            uncertainty_ns: unc,
            quality: q,
        })
}

fn any_identity(boot: &'static str) -> impl Strategy<Value = HostIdentity> {
    (khz(), any::<bool>()).prop_map(move |(khz, host_a)| HostIdentity {
        hostname: if host_a { "a".into() } else { "b".into() },
        boot_id: boot.into(),
        kernel_release: "6.1".into(),
        tsc_khz: khz,
        tsc_flags: TscFlags::default(),
        clocksource: "tsc".into(),
    })
}

fn any_vm_clock() -> impl Strategy<Value = VmClock> {
    (
        khz(),
        proptest::collection::vec(any::<i64>(), 0..5),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>()),
        proptest::option::of((
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<i8>(),
            any::<u8>(),
        )),
        proptest::option::of((
            any::<u64>(),
            prop_oneof![Just(32u8), Just(48u8), any::<u8>()],
        )),
        (any::<bool>(), any::<bool>(), any::<u32>()),
    )
        .prop_map(|(khz, offs, k, pvti, scaling, caps)| VmClock {
            state: RunState::Paused,
            tsc_khz: khz,
            vcpus: offs
                .iter()
                .enumerate()
                .map(|(i, o)| VcpuOffset {
                    id: i as u32,
                    tsc_offset: *o,
                })
                .collect(),
            kvmclock: KvmClockSample {
                clock_ns: k.0,
                flags: k.1,
                realtime_ns: k.2,
                host_tsc: k.3,
            },
            pvti: pvti.map(|p| Pvti {
                tsc_timestamp: p.0,
                system_time: p.1,
                tsc_to_system_mul: p.2,
                tsc_shift: p.3,
                flags: p.4,
            }),
            pvti_source: pvti.map(|_| PvtiSource::GuestMemory),
            tsc_scaling: scaling.map(|(ratio, frac_bits)| TscScaling { ratio, frac_bits }),
            capabilities: Capabilities {
                tsc_offset_effective: true,
                clock_guest: caps.0,
                tsc_scaling: caps.1,
                adjust_clock: caps.2,
            },
        })
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary u64/i64 values anywhere in the inputs: a plan or a typed
    /// error, never a panic; and a plan always has one offset per vCPU.
    #[test]
    fn planner_is_total(
        src_id in any_identity("boot-a"),
        capture in any_sample(),
        src_vm in any_vm_clock(),
        dst_id in prop_oneof![any_identity("boot-a"), any_identity("boot-b")],
        dst_sample in any_sample(),
        dst_vm in any_vm_clock(),
        estimate in proptest::option::of((any::<i64>(), any::<u64>())),
        freeze in any::<bool>(),
        max_elapsed in proptest::option::of(any::<u64>()),
        max_err in proptest::option::of(any::<u64>()),
        tolerance in any::<u32>(),
    ) {
        let body = SidecarBody::new("vm", src_id, capture, src_vm);
        let dst = Destination {
            identity: dst_id,
            sample: dst_sample,
            vm: dst_vm,
            vm_id: None,
            offset_estimate: estimate.map(|(o, b)| OffsetEstimate { offset_ns: o, bound_ns: b, ..OffsetEstimate::default() }),
        };
        let policy = Policy {
            clock: if freeze { ClockPolicy::Freeze } else { ClockPolicy::KeepRunning },
            max_elapsed_ns: max_elapsed,
            max_clock_error_ns: max_err,
            rate_tolerance_ppm: tolerance,
            ..Policy::default()
        };
        if let Ok(p) = plan(&body, &dst, &policy) {
            prop_assert_eq!(p.tsc_offsets.len(), body.vm_clock.vcpus.len());
        }
    }
}

// ---- refusals, each naming its rule ----

fn simple() -> (SidecarBody, Destination) {
    let a = SimHost::new("a", "boot-a", 2_445_411, 1 << 40);
    let mut b = SimHost::new("b", "boot-b", 2_445_411, 1 << 41);
    b.quality.maxerror_ns = 1_000;
    let vm = SimVm::create(&a, 1_000, 2_445_411, &[5_000, 5_000]).unwrap();
    let body = SidecarBody::new(
        "vm-1",
        a.identity.clone(),
        a.sample(2_000_000, 0),
        vm.vm_clock(2_000_000, RunState::Running),
    );
    let dvm = SimVm::create(&b, 3_000_000_000, 2_445_411, &[0, 0]).unwrap();
    let dst = Destination {
        identity: b.identity.clone(),
        sample: b.sample(3_000_000_000, 0),
        vm: dvm.vm_clock(3_000_000_000, RunState::Paused),
        vm_id: Some("vm-1".into()),
        offset_estimate: None,
    };
    (body, dst)
}

#[test]
fn refuses_another_vm() {
    let (body, mut dst) = simple();
    dst.vm_id = Some("vm-2".into());
    let err = plan(&body, &dst, &Policy::default()).unwrap_err();
    assert!(matches!(err, PlanError::VmMismatch { .. }), "{err}");
    assert!(err.to_string().contains("vm-2"));
}

#[test]
fn refuses_wrong_vcpu_count() {
    let (body, mut dst) = simple();
    dst.vm.vcpus.pop();
    let err = plan(&body, &dst, &Policy::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::VcpuCountMismatch {
                sidecar: 2,
                destination: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn refuses_rate_beyond_tolerance_without_scaling() {
    let (body, mut dst) = simple();
    dst.identity.tsc_khz = 2_445_411 + 2_445_411 / 1000; // ~1000 ppm
    let err = plan(&body, &dst, &Policy::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::RateMismatch {
                tolerance_ppm: 250,
                ..
            }
        ),
        "{err}"
    );
    // Within 250 ppm: accepted, and the note says it runs unscaled.
    dst.identity.tsc_khz = 2_445_411 + 300;
    let ok = plan(&body, &dst, &Policy::default()).unwrap();
    assert!(
        ok.notes.iter().any(|n| n.contains("unscaled")),
        "{:?}",
        ok.notes
    );
}

#[test]
fn refuses_stale_beyond_max_elapsed() {
    let (body, dst) = simple();
    let policy = Policy {
        max_elapsed_ns: Some(1_000_000_000),
        ..Policy::default()
    };
    let err = plan(&body, &dst, &policy).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::ElapsedTooLong {
                max_ns: 1_000_000_000,
                ..
            }
        ),
        "{err}"
    );
}

/// The age limit holds for same-host and freeze plans too, which do not use
/// the elapsed time otherwise.
#[test]
fn max_elapsed_holds_in_every_mode() {
    let (body, mut dst) = simple();
    dst.identity = body.source_host.clone();
    let policy = Policy {
        max_elapsed_ns: Some(1_000_000_000),
        ..Policy::default()
    };
    let err = plan(&body, &dst, &policy).unwrap_err();
    assert!(matches!(err, PlanError::ElapsedTooLong { .. }), "{err}");
    let (body, dst) = simple();
    let freeze = Policy {
        clock: ClockPolicy::Freeze,
        ..policy
    };
    let err = plan(&body, &dst, &freeze).unwrap_err();
    assert!(matches!(err, PlanError::ElapsedTooLong { .. }), "{err}");
}

#[test]
fn refuses_unsynchronised_when_required() {
    let (body, mut dst) = simple();
    dst.sample.quality.synchronised = false;
    let policy = Policy {
        require_sync: true,
        ..Policy::default()
    };
    let err = plan(&body, &dst, &policy).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::NotSynchronised {
                host: "destination"
            }
        ),
        "{err}"
    );
    let policy = Policy {
        max_clock_error_ns: Some(500),
        ..Policy::default()
    };
    let err = plan(&body, &dst, &policy).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::ClockErrorTooLarge {
                host: "destination",
                maxerror_ns: 1_000,
                ..
            }
        ),
        "{err}"
    );
}

/// A capture later than the destination's clock by more than the bound is
/// refused. Between two unmeasured clocks the bound includes the allowance
/// for their disagreement (128 ms by default): a capture 10 ms ahead is
/// then a disagreement the bound admits, clamped to 0 elapsed, and refused
/// only when the operator trusts the hosts' claims.
#[test]
fn refuses_capture_in_the_future() {
    let (mut body, dst) = simple();
    body.capture.tai_ns = dst.sample.tai_ns + 10_000_000;
    let trusting = Policy {
        unmeasured_offset_ns: 0,
        ..Policy::default()
    };
    let err = plan(&body, &dst, &trusting).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::CaptureInFuture {
                ahead_ns: 10_000_000,
                bound_ns: 1_000
            }
        ),
        "{err}"
    );
    let p = plan(&body, &dst, &Policy::default()).expect("10 ms ahead is within 128 ms");
    assert_eq!(p.clamped_negative_elapsed_ns, 10_000_000);
    assert_eq!(p.elapsed_ns, 0);
    assert_eq!(p.error_bound.unmeasured_offset_ns, 128_000_000);

    body.capture.tai_ns = dst.sample.tai_ns + 200_000_000;
    let err = plan(&body, &dst, &Policy::default()).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::CaptureInFuture {
                ahead_ns: 200_000_000,
                bound_ns: 128_001_000
            }
        ),
        "{err}"
    );
}

/// The allowance for an unmeasured offset applies between two clocks only:
/// not with a measured offset, not for one boot's clock read twice.
#[test]
fn the_unmeasured_allowance_is_for_two_unmeasured_clocks_only() {
    let (body, dst) = simple();
    let p = plan(&body, &dst, &Policy::default()).expect("plan");
    assert_eq!(p.mode, PlanMode::CrossHost);
    assert_eq!(p.error_bound.unmeasured_offset_ns, 128_000_000);
    assert!(p.error_bound.total_ns >= 128_000_000, "{:?}", p.error_bound);
    let custom = Policy {
        unmeasured_offset_ns: 5_000_000,
        ..Policy::default()
    };
    let q = plan(&body, &dst, &custom).expect("plan");
    assert_eq!(
        p.error_bound.total_ns - q.error_bound.total_ns,
        128_000_000 - 5_000_000
    );
    // Another hostname but the same boot id still means two clocks.
    let mut same_boot = dst.clone();
    same_boot.identity.boot_id = body.source_host.boot_id.clone();
    let r = plan(&body, &same_boot, &Policy::default()).expect("plan");
    assert_eq!(r.error_bound.unmeasured_offset_ns, 128_000_000);
}

#[test]
fn refuses_unknown_line() {
    let (mut body, dst) = simple();
    body.vm_clock.pvti = None;
    body.vm_clock.pvti_source = None;
    body.vm_clock.kvmclock.flags = 0;
    let err = plan(&body, &dst, &Policy::default()).unwrap_err();
    assert!(matches!(err, PlanError::NoPvti { flags: 0 }), "{err}");
}

/// A worked example, computed by hand: 3 s of TAI at 2 445 411 kHz is
/// 7 336 233 000 cycles of advance over the capture value.
#[test]
fn cross_host_worked_example() {
    let a = SimHost::new("a", "boot-a", 2_445_411, 1_000_000_000_000);
    let b = SimHost::new("b", "boot-b", 2_445_411, 7_000_000_000_000);
    let vm = SimVm::create(&a, 0, 2_445_411, &[100, 200]).unwrap();
    // Capture at t = 1 s: guest TSCs are 100 + 2 445 411 000 and 200 + that.
    let body = SidecarBody::new(
        "vm-1",
        a.identity.clone(),
        a.sample(1_000_000_000, 0),
        vm.vm_clock(1_000_000_000, RunState::Running),
    );
    let dvm = SimVm::create(&b, 4_000_000_000, 2_445_411, &[0, 0]).unwrap();
    let dst = Destination {
        identity: b.identity.clone(),
        sample: b.sample(4_000_000_000, 0),
        vm: dvm.vm_clock(4_000_000_000, RunState::Paused),
        vm_id: None,
        offset_estimate: None,
    };
    let p = plan(&body, &dst, &Policy::default()).unwrap();
    assert_eq!(p.mode, PlanMode::CrossHost);
    assert_eq!(p.elapsed_ns, 3_000_000_000);
    assert_eq!(p.advance_cycles, 7_336_233_000);
    assert_eq!(p.guest_tsc_at_capture, 100 + 2_445_411_000);
    // Destination host TSC at t = 4 s: 7e12 + 9 781 644 000.
    let dst_host_tsc: u64 = 7_000_000_000_000 + 9_781_644_000;
    assert_eq!(p.destination_host_tsc, dst_host_tsc);
    let want0 = (100u64 + 2_445_411_000 + 7_336_233_000) as i64 - dst_host_tsc as i64;
    assert_eq!(p.tsc_offsets, vec![want0, want0 + 100]);
    assert_eq!(p.floor_cycles, 0);
}

/// Destination with hardware scaling: the guest keeps its 3 GHz on a
/// 2.5 GHz host, and its TSC lands where it would have been.
#[test]
fn cross_host_with_scaling() {
    let a = SimHost::new("a", "boot-a", 3_000_000, 1 << 44);
    let mut b = SimHost::new("b", "boot-b", 2_500_000, 1 << 45);
    b.scaling_frac_bits = Some(48);
    let vm = SimVm::create(&a, 0, 3_000_000, &[1_000, 1_500]).unwrap();
    let t_capture = 2_000_000_000;
    let body = SidecarBody::new(
        "vm-1",
        a.identity.clone(),
        a.sample(t_capture, 0),
        vm.vm_clock(t_capture, RunState::Running),
    );
    let t_restore = 7_000_000_000;
    let mut dvm = SimVm::stock_restore(
        &b,
        t_restore,
        3_000_000,
        &[
            vm.guest_tsc(0, t_restore - 1),
            vm.guest_tsc(1, t_restore - 1),
        ],
        0,
    )
    .unwrap();
    assert!(dvm.scaling.is_some());
    let dst = Destination {
        identity: b.identity.clone(),
        sample: b.sample(t_restore, 0),
        vm: dvm.vm_clock(t_restore, RunState::Paused),
        vm_id: None,
        offset_estimate: None,
    };
    let p = plan(&body, &dst, &Policy::default()).unwrap();
    assert_eq!(p.tsc_khz, None, "the VMM already set 3 GHz");
    dvm.apply(&p, t_restore + 10).unwrap();
    for i in 0..2 {
        let ideal = vm.guest_tsc(i, t_restore);
        let placed = dvm.guest_tsc(i, t_restore);
        assert!(ideal.abs_diff(placed) <= 2, "vCPU {i}: {placed} vs {ideal}");
    }
    // Without scaling on the destination the same restore is refused.
    let mut dst2 = dst.clone();
    dst2.vm.capabilities.tsc_scaling = false;
    assert!(matches!(
        plan(&body, &dst2, &Policy::default()),
        Err(PlanError::RateMismatch { .. })
    ));
}
