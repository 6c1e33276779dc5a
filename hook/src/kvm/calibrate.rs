//! kvm-clock onto a line: KVM_SET_CLOCK_GUEST where the kernel has it,
//! else KVM_SET_CLOCK aimed at the middle of the window `[0, max_error_ns]`
//! above the line and corrected in a short loop, each try verified with
//! KVM_GET_CLOCK's (clock, host_tsc) pair (which equals the guest-visible
//! PVTI). The loop lives next to the ioctls: a round trip through another
//! process per try would add more error than it removes.

use std::time::Instant;

use super::apply::{ApplyOptions, StepError, Undo};
use super::ops::ClockOps;
use super::outcome::{ApplyStep, KvmclockOutcome};
use super::KvmError;
use crate::model::{KvmClockSample, Pvti, TscScaling, KVM_CLOCK_REALTIME};
use crate::pvclock::{guest_tsc, line_at_ns};
use crate::request::{ApplyRequest, ClockRequest, FollowVia, CLOCK_GUEST_MAX_ERROR_NS};

/// The kvm-clock step of [`run_steps`]: the step and what it did (`None`
/// for [`ClockRequest::Leave`], which makes no call).
pub(super) fn set_kvmclock<O: ClockOps + ?Sized>(
    ops: &mut O,
    request: &ApplyRequest,
    options: &ApplyOptions,
    offset0: i64,
    undo: &mut Undo,
) -> Result<Option<(ApplyStep, KvmclockOutcome)>, StepError> {
    let (pvti, max_error_ns, via) = match request.kvmclock {
        ClockRequest::Leave => return Ok(None),
        ClockRequest::Raw {
            clock_ns,
            realtime_ns,
            flags,
        } => {
            let step = ApplyStep::SetClock;
            let before = ops.get_clock().map_err(|e| (step, e))?;
            undo.clock = Some((before, Instant::now()));
            ops.set_clock(clock_ns, realtime_ns, flags)
                .map_err(|e| (step, e))?;
            undo.clock_set = true;
            // No line to verify against.
            let outcome = KvmclockOutcome {
                method: "set_clock",
                error_ns: None,
                tries: 1,
                try_errors_ns: Vec::new(),
                max_error_ns: u64::MAX,
                within_max_error: false,
                aimed_with_offset_cycles: offset0,
            };
            return Ok(Some((step, outcome)));
        }
        ClockRequest::Follow {
            pvti,
            max_error_ns,
            via,
        } => (pvti, max_error_ns, via),
    };
    let clock_guest = match via {
        FollowVia::ClockGuest => true,
        FollowVia::Best => options.clock_guest,
        FollowVia::SetClock => false,
    };
    let step = if clock_guest {
        ApplyStep::ClockGuest
    } else {
        ApplyStep::SetClock
    };
    let before = ops.get_clock().map_err(|e| (step, e))?;
    undo.clock = Some((before, Instant::now()));
    if clock_guest {
        ops.set_clock_guest(0, &pvti)
            .map_err(|e| (step, e.on_vcpu(0)))?;
        undo.clock_set = true;
        let sample = ops.get_clock().map_err(|e| (step, e))?;
        let error_ns = clock_error_ns(&sample, &pvti, options.tsc_scaling, offset0);
        let outcome = KvmclockOutcome {
            method: "clock_guest",
            error_ns,
            tries: 1,
            try_errors_ns: error_ns.into_iter().collect(),
            // Exact up to the truncation of KVM's two scale computations.
            max_error_ns: CLOCK_GUEST_MAX_ERROR_NS,
            within_max_error: error_ns
                .is_some_and(|e| e.unsigned_abs() <= CLOCK_GUEST_MAX_ERROR_NS),
            aimed_with_offset_cycles: offset0,
        };
        return Ok(Some((step, outcome)));
    }
    // Aim at the middle of the window above the line, at a (host TSC,
    // realtime) pair taken now with the guest TSC the kernel really uses;
    // without KVM_CLOCK_REALTIME the loop aims at the line at the TSC of
    // each call.
    let lift_ns = i128::from(max_error_ns / 2);
    let (clock_ns, realtime_ns, flags) = match options
        .set_clock_realtime
        .then(|| ops.realtime_pair())
        .flatten()
    {
        Some((host_tsc, realtime_ns)) => {
            let tsc = guest_tsc(host_tsc, options.tsc_scaling, offset0);
            let aim = u64::try_from((line_at_ns(&pvti, tsc) + lift_ns).max(0)).unwrap_or(u64::MAX);
            (aim, realtime_ns, KVM_CLOCK_REALTIME)
        }
        None => (0, 0, 0),
    };
    let aim = Aim {
        pvti,
        clock_ns,
        realtime_ns,
        flags,
        max_error_ns,
        offset0,
        scaling: options.tsc_scaling,
        max_tries: options.max_set_clock_tries.max(1),
    };
    let outcome = set_clock_calibrated(ops, &aim, undo).map_err(|e| (step, e))?;
    Ok(Some((step, outcome)))
}

fn saturate_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// kvm-clock minus the line, from a KVM_GET_CLOCK pair; `None` without host_tsc.
fn clock_error_ns(
    sample: &KvmClockSample,
    pvti: &Pvti,
    scaling: Option<TscScaling>,
    offset0: i64,
) -> Option<i64> {
    if !sample.has_host_tsc() {
        return None;
    }
    let tsc = guest_tsc(sample.host_tsc, scaling, offset0);
    Some(saturate_i64(
        i128::from(sample.clock_ns) - line_at_ns(pvti, tsc),
    ))
}

/// What the calibration loop aims at.
struct Aim {
    pvti: Pvti,
    clock_ns: u64,
    realtime_ns: u64,
    flags: u32,
    max_error_ns: u64,
    offset0: i64,
    scaling: Option<TscScaling>,
    max_tries: u32,
}

/// kvm-clock minus the line lies in the window `[0, max_error_ns]`: at or
/// above the line, never below it.
pub fn in_window(error_ns: i64, max_error_ns: u64) -> bool {
    error_ns >= 0 && error_ns.unsigned_abs() <= max_error_ns
}

/// KVM_SET_CLOCK aimed at the window's middle, verified with KVM_GET_CLOCK's
/// pair and re-aimed. Each call lands at `mid - correction + bias`; a
/// delay the host adds to one call must not make the next one land below
/// the line.
///
/// - With KVM_CLOCK_REALTIME the bias is a constant plus the time between
///   the kernel's master-clock snapshot and its realtime read: a delay only
///   raises it. The correction is the smallest bias seen (the least-delayed
///   call): a preempted call lands high, and the next one is aimed as if it
///   had not happened. (Following the last bias, the next call landed below
///   the line by the delay, and a loop ending there at `max_tries` stayed
///   below it.)
/// - Without it the delay between our TSC read and the snapshot lowers the
///   bias: the late call itself lands low (nothing can aim for a delay not
///   yet seen). The correction is the last bias: the call after it then
///   lands high by the same delay and the one after that back in the
///   window. (The smallest bias would keep every later call high by the
///   largest delay seen, the first, cold, call's included.)
///
/// Stops inside `[0, max_error_ns]` or after `max_tries`.
fn set_clock_calibrated<O: ClockOps + ?Sized>(
    ops: &mut O,
    aim: &Aim,
    undo: &mut Undo,
) -> Result<KvmclockOutcome, KvmError> {
    let realtime = aim.flags & KVM_CLOCK_REALTIME != 0;
    let mut correction_ns: i128 = 0;
    let mut outcome = KvmclockOutcome {
        method: "set_clock",
        error_ns: None,
        tries: 0,
        try_errors_ns: Vec::new(),
        max_error_ns: aim.max_error_ns,
        within_max_error: false,
        aimed_with_offset_cycles: aim.offset0,
    };
    for _ in 0..aim.max_tries {
        let base_ns = if realtime {
            // "clock_ns at realtime_ns": the kernel adds the realtime since.
            i128::from(aim.clock_ns)
        } else {
            // No realtime reference: aim at the window's middle at the TSC now.
            let host_tsc = ops.host_tsc();
            line_at_ns(&aim.pvti, guest_tsc(host_tsc, aim.scaling, aim.offset0))
                + i128::from(aim.max_error_ns / 2)
        };
        let target = u64::try_from((base_ns - correction_ns).max(0)).unwrap_or(u64::MAX);
        let (realtime_ns, flags) = if realtime {
            (aim.realtime_ns, KVM_CLOCK_REALTIME)
        } else {
            (0, 0)
        };
        outcome.tries += 1;
        ops.set_clock(target, realtime_ns, flags)?;
        undo.clock_set = true;
        let sample = ops.get_clock()?;
        let Some(err) = clock_error_ns(&sample, &aim.pvti, aim.scaling, aim.offset0) else {
            // Not in master-clock mode: nothing to verify against.
            break;
        };
        outcome.error_ns = Some(err);
        outcome.try_errors_ns.push(err);
        if in_window(err, aim.max_error_ns) {
            break;
        }
        // This call's bias; re-aim with the smallest one seen (realtime) or
        // with this one.
        let bias_ns = i128::from(err) - i128::from(aim.max_error_ns / 2) + correction_ns;
        correction_ns = if realtime && outcome.tries > 1 {
            correction_ns.min(bias_ns)
        } else {
            bias_ns
        };
    }
    outcome.within_max_error = outcome
        .error_ns
        .is_some_and(|e| in_window(e, aim.max_error_ns));
    Ok(outcome)
}
