//! The armed clock's apply-time checks (`vmclock_api::arm::check`): a body
//! planned for this VM on this host a moment ago passes; each way it can be
//! wrong is refused, naming the field.

use clockcarry::vmclock_api::arm::{check, ArmCheck, ArmNow, ArmRefusal, MAX_VALID_FOR_NS};

const KHZ: u32 = 2_000_000;
/// Cycles per ms at KHZ.
const MS: u64 = 2_000_000;

/// A VM captured at guest TSC 10^12, planned 100 ms after the capture
/// on a host whose TSC then read 5 * 10^12; the state saved 50 ms after
/// the capture; applied 20 ms after the plan.
struct Case {
    arm: ArmCheck,
    offsets: Vec<i64>,
    now: ArmNow,
    saved: Vec<Option<u64>>,
}

fn case(vcpus: usize) -> Case {
    let capture_guest_tsc: u64 = 1_000_000_000_000;
    let planned_host_tsc: u64 = 5_000_000_000_000;
    let planned_tai_ns: u64 = 1_800_000_000_000_000_000;
    // At the plan the guest should read capture + 100 ms.
    let target_at_plan = capture_guest_tsc + 100 * MS;
    let offset = target_at_plan as i64 - planned_host_tsc as i64;
    Case {
        arm: ArmCheck {
            planned_host_tsc,
            planned_tai_ns,
            valid_for_ns: 60_000_000_000,
            vcpu_count: vcpus as u32,
            capture_guest_tsc,
            elapsed_at_plan_ns: 100_000_000,
            error_bound_ns: 1_000_000,
        },
        offsets: vec![offset; vcpus],
        now: ArmNow {
            host_tsc: planned_host_tsc + 20 * MS,
            tai_ns: planned_tai_ns + 20_000_000,
            host_khz: KHZ,
            guest_khz: KHZ,
        },
        saved: vec![Some(capture_guest_tsc + 50 * MS); vcpus],
    }
}

fn run(c: &Case) -> Result<(), ArmRefusal> {
    check(&c.arm, &c.offsets, Some(KHZ), &c.now, &c.saved)
}

fn refused(c: &Case, field: &str) -> ArmRefusal {
    let err = run(c).expect_err("must be refused");
    assert!(
        err.to_string().contains(field),
        "{err} does not name {field}"
    );
    err
}

#[test]
fn a_fresh_body_for_this_vm_passes() {
    for vcpus in [1, 8, 64] {
        run(&case(vcpus)).unwrap();
    }
    // Rate given as null (keep the VM's) passes too.
    let c = case(2);
    check(&c.arm, &c.offsets, None, &c.now, &c.saved).unwrap();
}

#[test]
fn a_stale_body_is_refused() {
    let mut c = case(1);
    c.now.tai_ns += 60_000_000_000;
    c.now.host_tsc += 60_000 * MS;
    assert!(matches!(
        refused(&c, "arm.planned_tai_ns"),
        ArmRefusal::Stale { .. }
    ));
}

#[test]
fn a_validity_out_of_range_is_refused() {
    for v in [0, MAX_VALID_FOR_NS + 1] {
        let mut c = case(1);
        c.arm.valid_for_ns = v;
        refused(&c, "arm.valid_for_ns");
    }
}

/// Another host's pair: its TSC and TAI do not advance together here.
#[test]
fn a_pair_from_another_host_is_refused() {
    let mut c = case(1);
    c.now.host_tsc = c.arm.planned_host_tsc - 1;
    assert!(matches!(
        refused(&c, "arm.planned_host_tsc"),
        ArmRefusal::HostTscBehind { .. }
    ));
    let mut c = case(1);
    c.now.host_tsc = c.arm.planned_host_tsc + 900 * MS; // 900 ms of TSC, 20 ms of TAI
    assert!(matches!(
        refused(&c, "arm.planned_host_tsc"),
        ArmRefusal::OriginMismatch { .. }
    ));
    let mut c = case(1);
    c.now.tai_ns = c.arm.planned_tai_ns - 2_000_000;
    assert!(matches!(
        refused(&c, "arm.planned_tai_ns"),
        ArmRefusal::PlannedInFuture { .. }
    ));
}

#[test]
fn another_vms_shape_is_refused() {
    let mut c = case(4);
    c.arm.vcpu_count = 2;
    refused(&c, "arm.vcpu_count");
    let mut c = case(4);
    c.offsets.pop();
    refused(&c, "tsc_offsets");
}

/// The identity check: the saved state's TSC must lie after the capture
/// and within the time since it.
#[test]
fn another_vms_state_is_refused() {
    let mut c = case(1);
    c.saved[0] = Some(c.arm.capture_guest_tsc - 1);
    assert!(matches!(
        refused(&c, "arm.capture_guest_tsc"),
        ArmRefusal::StateBeforeCapture { behind_cycles: 1 }
    ));
    let mut c = case(1);
    // A VM that has run an hour longer than this one.
    c.saved[0] = Some(c.arm.capture_guest_tsc + 3_600_000 * MS);
    assert!(matches!(
        refused(&c, "arm.capture_guest_tsc"),
        ArmRefusal::StateTooFarAhead { .. }
    ));
    let mut c = case(2);
    c.saved[1] = None;
    refused(&c, "saved state has no TSC for vCPU 1");
}

/// A vCPU whose saved TSC is past where the body would put it: the guest
/// clock would go backwards.
#[test]
fn a_body_that_would_send_a_vcpu_backwards_is_refused() {
    let mut c = case(3);
    // Pretend the saved TSC of vCPU 2 is 200 ms past the capture (within the
    // identity window is irrelevant: only vCPU 0 is used for identity).
    c.saved[2] = Some(c.arm.capture_guest_tsc + 200 * MS);
    let err = refused(&c, "tsc_offsets[2]");
    match err {
        ArmRefusal::BelowSavedTsc { vcpu, by_cycles } => {
            assert_eq!(vcpu, 2);
            // The body puts it at capture + 120 ms.
            assert_eq!(by_cycles, 80 * MS);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_changed_or_scaled_rate_is_refused() {
    let c = case(1);
    let err = check(&c.arm, &c.offsets, Some(KHZ + 1), &c.now, &c.saved).unwrap_err();
    assert!(matches!(err, ArmRefusal::RateChange { .. }), "{err}");
    let mut c = case(1);
    c.now.guest_khz = KHZ / 2;
    let err = check(&c.arm, &c.offsets, None, &c.now, &c.saved).unwrap_err();
    assert!(matches!(err, ArmRefusal::Scaled { .. }), "{err}");
}

/// Extreme inputs give a refusal or a pass, never a panic.
#[test]
fn extreme_inputs_do_not_panic() {
    for v in [0u64, 1, u64::MAX / 2, u64::MAX] {
        let mut c = case(2);
        c.arm.planned_host_tsc = v;
        c.arm.planned_tai_ns = v;
        c.arm.capture_guest_tsc = v;
        c.arm.elapsed_at_plan_ns = v;
        c.arm.error_bound_ns = v;
        c.now.host_tsc = v.wrapping_add(7);
        c.now.tai_ns = v.wrapping_sub(3);
        c.now.host_khz = if v == 0 { 0 } else { KHZ };
        c.offsets = vec![i64::MIN, i64::MAX];
        c.saved = vec![Some(v), Some(u64::MAX)];
        let _ = run(&c);
    }
}
