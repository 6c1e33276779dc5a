//! The planner with a measured inter-host offset: the drift term for the
//! time since the measurement (a policy knob), and the check that the
//! measured offset agrees with what both hosts' adjtimex figures allow.
//! Simulated hosts and VMs (hook/tests/support/sim.rs).

use clockcarry::model::{OffsetEstimate, Policy, RunState, DEFAULT_OFFSET_DRIFT_PPM};
use clockcarry::plan::{plan, Destination, PlanError, PlanMode};
use clockcarry::pvclock::guest_tsc;
use clockcarry::sidecar::SidecarBody;
#[allow(dead_code)]
#[path = "support/sim.rs"]
mod sim;

use sim::{SimHost, SimVm};

const KHZ: u32 = 2_445_411;
const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

/// VM captured on host a at `t_capture`, sampled on host b at `t_sample`
/// (true time); b's TAI runs `b_error_ns` off a's. The estimate's
/// `measured_tai_ns` is given in true time.
fn migrate(
    t_capture: u64,
    t_sample: u64,
    b_error_ns: i64,
    estimate: Option<OffsetEstimate>,
) -> (SidecarBody, Destination, SimVm, SimHost) {
    let mut a = SimHost::new("a", "boot-a", KHZ, 1 << 40);
    let mut b = SimHost::new("b", "boot-b", KHZ, 1 << 41);
    a.quality.maxerror_ns = MS;
    b.quality.maxerror_ns = MS;
    b.tai_error_ns = b_error_ns;
    let vm = SimVm::create(&a, S, KHZ, &[5 * S, 5 * S]).unwrap();
    let mut body = SidecarBody::new(
        "vm-1",
        a.identity.clone(),
        a.sample(t_capture, 0),
        vm.vm_clock(t_capture, RunState::Running),
    );
    // The estimate's instant is given in true time: on a's clock here.
    body.offset_estimate = estimate.map(|e| OffsetEstimate {
        measured_tai_ns: e.measured_tai_ns.map(|t| a.tai_ns(t)),
        ..e
    });
    let fresh = SimVm::create(&b, t_sample - S, KHZ, &[0, 0]).unwrap();
    let dst = Destination {
        identity: b.identity.clone(),
        sample: b.sample(t_sample, 0),
        vm: fresh.vm_clock(t_sample, RunState::Paused),
        vm_id: Some("vm-1".into()),
        offset_estimate: None,
    };
    (body, dst, vm, b)
}

fn measured(offset_ns: i64, bound_ns: u64, at_tai_ns: Option<u64>) -> Option<OffsetEstimate> {
    Some(OffsetEstimate {
        offset_ns,
        bound_ns,
        measured_tai_ns: at_tai_ns,
        rounds: Some(8),
        best_delay_ns: Some(2 * bound_ns),
    })
}

fn policy(ppm: u32) -> Policy {
    Policy {
        offset_drift_ppm: ppm,
        verify_vm_state: false,
        ..Policy::default()
    }
}

#[test]
fn the_default_drift_is_20_ppm() {
    assert_eq!(DEFAULT_OFFSET_DRIFT_PPM, 20);
    assert_eq!(Policy::default().offset_drift_ppm, 20);
    let old: Policy = serde_json::from_value(serde_json::json!({
        "clock": "keep-running", "max_elapsed_ns": null, "require_sync": false,
        "max_clock_error_ns": null, "on_failure": "abort", "rate_tolerance_ppm": 250,
        "max_kvmclock_error_ns": 50
    }))
    .unwrap();
    assert_eq!(old.offset_drift_ppm, 20);
}

/// Measured at the capture (10 s), sampled 100 s later: 20 ppm of 100 s.
#[test]
fn the_bound_grows_with_the_time_since_the_measurement() {
    let (body, dst, _, _) = migrate(10 * S, 110 * S, 0, measured(0, 40_000, Some(10 * S)));
    let p = plan(&body, &dst, &policy(20)).unwrap();
    assert_eq!(p.mode, PlanMode::CrossHost);
    let b = p.error_bound;
    assert_eq!(b.offset_drift_ns, 2 * MS);
    assert_eq!(b.offset_estimate_ns, 40_000);
    assert_eq!(b.source_clock_ns, 0);
    assert_eq!(
        b.total_ns,
        b.source_bracket_ns
            + b.destination_bracket_ns
            + b.offset_estimate_ns
            + b.offset_drift_ns
            + b.rate_error_ns
    );

    // Measured 10 s before the capture: 20 ppm of (110 + 10) s.
    let (body, dst, _, _) = migrate(10 * S, 110 * S, 0, measured(0, 40_000, Some(S / 1000)));
    let drift = plan(&body, &dst, &policy(20))
        .unwrap()
        .error_bound
        .offset_drift_ns;
    let span = (110 * S - S / 1000) + (10 * S - S / 1000);
    assert_eq!(drift, span.div_ceil(50_000));
}

#[test]
fn the_drift_is_a_policy_knob() {
    let (body, dst, _, _) = migrate(10 * S, 60 * S, 0, measured(0, 40_000, Some(10 * S)));
    let at = |ppm| {
        plan(&body, &dst, &policy(ppm))
            .unwrap()
            .error_bound
            .offset_drift_ns
    };
    assert_eq!(at(0), 0);
    assert_eq!(at(20), MS);
    assert_eq!(at(100), 5 * MS);
}

/// An estimate written without the measurement fields counts as measured
/// at the capture.
#[test]
fn an_estimate_without_its_instant_counts_from_the_capture() {
    let old = Some(OffsetEstimate {
        offset_ns: 0,
        bound_ns: 40_000,
        ..OffsetEstimate::default()
    });
    let (body, dst, _, _) = migrate(10 * S, 60 * S, 0, old);
    assert_eq!(
        plan(&body, &dst, &policy(20))
            .unwrap()
            .error_bound
            .offset_drift_ns,
        MS
    );
}

/// b's TAI is 30 ms ahead although both hosts claim 1 ms maxerror: the
/// measured offset corrects it, and the guest TSC lands within the bound.
#[test]
fn a_measured_offset_corrects_a_wrong_clock_within_the_bound() {
    let err = 30 * MS as i64;
    let t_sample = 40 * S;
    let (body, dst, vm, b) = migrate(
        10 * S,
        t_sample,
        err,
        measured(err + 20_000, 50_000, Some(10 * S)),
    );
    let p = plan(&body, &dst, &policy(20)).unwrap();
    let placed = guest_tsc(b.host_tsc(t_sample), None, p.tsc_offsets[0]);
    let ideal = vm.guest_tsc(0, t_sample);
    let off = placed.abs_diff(ideal);
    assert!(
        off <= p.error_bound.tsc_cycles,
        "{off} > {:?}",
        p.error_bound
    );
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("one host clock is wrong")),
        "{:?}",
        p.notes
    );
}

#[test]
fn a_disagreeing_offset_is_refused_under_require_sync() {
    let err = 30 * MS as i64;
    let (body, dst, _, _) = migrate(10 * S, 40 * S, err, measured(err, 50_000, Some(10 * S)));
    let strict = Policy {
        require_sync: true,
        ..policy(20)
    };
    let e = plan(&body, &dst, &strict).unwrap_err();
    match &e {
        PlanError::ClocksDisagree {
            offset_ns,
            allowed_ns,
        } => {
            assert_eq!(*offset_ns, err);
            // 2 x 1 ms maxerror + 50 µs bound + 20 ppm of 30 s.
            assert_eq!(*allowed_ns, 2 * MS + 50_000 + 600_000);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("offset_estimate.offset_ns"), "{e}");
    assert!(e.to_string().contains("claim to be synchronised"), "{e}");
}

#[test]
fn an_agreeing_offset_gives_no_note() {
    let err = MS as i64;
    let (body, dst, _, _) = migrate(10 * S, 40 * S, err, measured(err, 50_000, Some(10 * S)));
    let strict = Policy {
        require_sync: true,
        ..policy(20)
    };
    let p = plan(&body, &dst, &strict).unwrap();
    assert!(
        !p.notes.iter().any(|n| n.contains("wrong")),
        "{:?}",
        p.notes
    );
}

/// A host that says it is not synchronised makes no claim to check.
#[test]
fn an_unsynchronised_host_is_not_checked_against_the_offset() {
    let err = 30 * MS as i64;
    let (body, mut dst, _, _) = migrate(10 * S, 40 * S, err, measured(err, 50_000, Some(10 * S)));
    dst.sample.quality.synchronised = false;
    let p = plan(&body, &dst, &policy(20)).unwrap();
    assert!(
        !p.notes.iter().any(|n| n.contains("wrong")),
        "{:?}",
        p.notes
    );
}
