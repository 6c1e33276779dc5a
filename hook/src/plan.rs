//! The restore planner: sidecar + destination measurement + policy -> plan.
//!
//! Pure and cheap (no I/O, no allocation beyond the offsets), so a VMM can
//! call it in-process between state load and vCPU start. The math is in
//! docs/design.md; in short, with `S(h)` the scaled host TSC at host TSC `h`:
//!
//! - guest TSC at capture, vCPU i: `G_i = S_src(h_src) + off_i` (mod 2^64);
//! - advance `A = elapsed_tai_ns * guest_khz / 10^6` (0 under freeze), raised
//!   if needed so no vCPU reads lower than the destination VM already does;
//! - new offset `off'_i = off_i + (S_src(h_src) + A - S_dst(h_dst))`: one
//!   delta for every vCPU, so their differences are kept bit for bit;
//! - kvm-clock follows the source PVTI line (exact with CLOCK_GUEST).

use serde::Serialize;

use crate::model::{
    Capabilities, ClockPolicy, HostIdentity, HostSample, OffsetEstimate, Policy, Pvti, PvtiSource,
    TscScaling, VmClock,
};
use crate::pvclock::{derive_pvti, guest_tsc, line_at_ns, ns_to_cycles, scale_tsc};
use crate::sidecar::{SidecarBody, SidecarError};

/// How far a PVTI derived from a KVM_GET_CLOCK pair is lifted above the
/// pair's point: the most re-anchoring can lose to truncation, in ns.
pub const DERIVED_LINE_LIFT_NS: u64 = 2;

/// How far the kvm-clock line in the destination VM's memory may lie from
/// the sidecar's line, at the memory line's anchor, for the two to count as
/// one VM's line: re-anchoring rounds by a few ns, and a master-clock update
/// between capture and pause re-anchors to CLOCK_MONOTONIC (see
/// [`VM_LINE_DRIFT_PPM`]). Two VMs' lines lie apart by the difference of
/// their vCPU-creation delays, typically tens of µs or more.
pub const VM_LINE_TOLERANCE_NS: u64 = 2_000;

/// The most CLOCK_MONOTONIC can drift from the fixed kvm-clock rate between
/// two anchors of the line (the kernel's NTP frequency limit, 500 ppm).
pub const VM_LINE_DRIFT_PPM: u64 = 500;

/// Slack on how far the destination VM's TSC may be ahead of the capture,
/// beyond the sidecar's age and the TAI error bound, ns.
pub const VM_STATE_SLACK_NS: u64 = 1_000_000;

/// Everything measured on the destination just before planning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub identity: HostIdentity,
    /// A (host TSC, TAI) pair taken on the destination host.
    pub sample: HostSample,
    /// The restored VM's clock as the destination VMM reports it now.
    pub vm: VmClock,
    /// The VM the caller means; refused when it differs from the sidecar's.
    pub vm_id: Option<String>,
    /// A measured (destination - source) TAI offset, if one was measured.
    pub offset_estimate: Option<OffsetEstimate>,
}

/// How the destination relates to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanMode {
    /// Same host, same boot, host TSC not reset: offsets copied exactly.
    SameHost,
    /// Another host (or a reboot): offsets recomputed from elapsed TAI.
    CrossHost,
}

/// What to do with kvm-clock once the offsets are in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmClockAction {
    /// KVM_SET_CLOCK_GUEST with the source PVTI: the line is restored exactly.
    ClockGuest { pvti: Pvti },
    /// KVM_SET_CLOCK aimed at the source line and corrected next to the
    /// ioctls until kvm-clock lies within `[0, max_error_ns]` above `pvti`
    /// (see `crate::request`): never below it.
    SetClock { pvti: Pvti, max_error_ns: u64 },
}

impl KvmClockAction {
    /// The TSC-to-ns line kvm-clock must follow after the restore.
    pub fn pvti(&self) -> &Pvti {
        match self {
            KvmClockAction::ClockGuest { pvti } | KvmClockAction::SetClock { pvti, .. } => pvti,
        }
    }
}

/// The error bound of a plan, built from its parts (all in ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct ErrorBound {
    pub source_bracket_ns: u64,
    pub destination_bracket_ns: u64,
    /// Source maxerror (adjtimex), or 0 when an offset estimate replaces it.
    pub source_clock_ns: u64,
    pub destination_clock_ns: u64,
    /// Bound of the measured inter-host offset, when one was given.
    pub offset_estimate_ns: u64,
    /// Without a measured offset, between readings of two different clocks
    /// (another host or another boot): how far the hosts may disagree
    /// beyond their claimed maxerrors ([`Policy::unmeasured_offset_ns`]).
    pub unmeasured_offset_ns: u64,
    /// How far the clocks may have drifted since the offset was measured:
    /// `offset_drift_ppm` of the time from the measurement to the capture
    /// and to this sample ([`offset_drift_ns`]).
    pub offset_drift_ns: u64,
    /// Rate uncertainty times the elapsed time.
    pub rate_error_ns: u64,
    /// Sum of the above: |guest TSC placed - ideal| in time.
    pub total_ns: u64,
    /// `total_ns` at the guest rate, rounded up.
    pub tsc_cycles: u64,
    /// A-priori error of kvm-clock against the source line (0 with CLOCK_GUEST).
    pub kvmclock_ns: u64,
}

/// A restore plan: what to write, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub mode: PlanMode,
    pub policy: ClockPolicy,
    /// Set the guest TSC rate first (only when it differs from the VM's now).
    pub tsc_khz: Option<u32>,
    /// One offset per vCPU, in vCPU order.
    pub tsc_offsets: Vec<i64>,
    pub kvmclock: KvmClockAction,
    pub pvti_source: PvtiSource,
    /// TAI time since capture that the plan used, ns (0 under freeze).
    pub elapsed_ns: u64,
    /// How far the destination's TAI was behind the source's (clamped), ns.
    pub clamped_negative_elapsed_ns: u64,
    /// Guest TSC advance over the capture value, cycles, for every vCPU.
    pub advance_cycles: u64,
    /// Part of `advance_cycles` added so no vCPU reads below the destination
    /// VM's current TSC (the last value the guest can have seen).
    pub floor_cycles: u64,
    /// vCPU 0's guest TSC at capture.
    pub guest_tsc_at_capture: u64,
    /// vCPU 0's guest TSC, at the destination sample, once applied.
    pub guest_tsc_target: u64,
    /// The destination host TSC the offsets are relative to.
    pub destination_host_tsc: u64,
    pub error_bound: ErrorBound,
    /// Human-readable remarks on choices made (clamps, floors, rates).
    pub notes: Vec<String>,
}

/// Why no plan can be made. Each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("sidecar: {0}")]
    Sidecar(#[from] SidecarError),
    #[error("sidecar is for VM {sidecar:?}, not {destination:?}")]
    VmMismatch {
        sidecar: String,
        destination: String,
    },
    #[error(
        "{field}: the destination VM's own state contradicts this sidecar: {reason}; it is \
         another VM's sidecar, one older than the state the VM was restored from, or the hosts' \
         clocks disagree by more than they admit"
    )]
    NotThisVm { field: &'static str, reason: String },
    #[error("vCPU count: sidecar has {sidecar}, destination VM has {destination}")]
    VcpuCountMismatch { sidecar: usize, destination: usize },
    #[error("{field}: {reason}")]
    BadInput { field: &'static str, reason: String },
    #[error(
        "guest TSC rate {guest_khz} kHz differs from destination host {host_khz} kHz by {ppm} ppm \
         (tolerance {tolerance_ppm} ppm) and the destination cannot scale the TSC"
    )]
    RateMismatch {
        guest_khz: u32,
        host_khz: u32,
        ppm: u64,
        tolerance_ppm: u32,
    },
    #[error(
        "guest TSC rate {guest_khz} kHz needs TSC scaling on {host}, but its scaling ratio is not \
         known (field {field})"
    )]
    ScalingUnknown {
        guest_khz: u32,
        host: &'static str,
        field: &'static str,
    },
    #[error("{host} host clock is not synchronised (policy requires it)")]
    NotSynchronised { host: &'static str },
    #[error("{host} host clock maxerror {maxerror_ns} ns exceeds the limit {max_ns} ns")]
    ClockErrorTooLarge {
        host: &'static str,
        maxerror_ns: u64,
        max_ns: u64,
    },
    #[error("elapsed time since capture {elapsed_ns} ns exceeds the limit {max_ns} ns")]
    ElapsedTooLong { elapsed_ns: u64, max_ns: u64 },
    #[error(
        "capture.tai_ns is {ahead_ns} ns in the destination's future, beyond the error bound \
         {bound_ns} ns: the hosts' clocks disagree"
    )]
    CaptureInFuture { ahead_ns: u64, bound_ns: u64 },
    #[error(
        "vm_clock.pvti: no PVTI captured and the kvmclock sample has no host_tsc (flags {flags}): \
         the TSC-to-kvm-clock line is unknown"
    )]
    NoPvti { flags: u32 },
    #[error(
        "offset_estimate.offset_ns: the measured offset between the hosts, {offset_ns} ns, exceeds \
         the {allowed_ns} ns their adjtimex figures allow (both maxerrors, the estimate's bound \
         and its drift) although both claim to be synchronised: one of them is wrong (policy \
         requires synchronised clocks)"
    )]
    ClocksDisagree { offset_ns: i64, allowed_ns: u64 },
    #[error("arithmetic out of range in {what}")]
    Overflow { what: &'static str },
}

/// Plan a restore of the VM captured in `sidecar` onto `dst` under `policy`.
///
/// Never panics; every refusal is a [`PlanError`] naming the field or rule.
#[allow(clippy::too_many_lines)] // older than the lint; split before extending
pub fn plan(sidecar: &SidecarBody, dst: &Destination, policy: &Policy) -> Result<Plan, PlanError> {
    sidecar.validate()?;
    check_destination(sidecar, dst)?;
    let src = &sidecar.vm_clock;
    let guest_khz = src.tsc_khz;
    let mut notes = Vec::new();

    let same_host = one_clock(sidecar, dst) && dst.sample.host_tsc >= sidecar.capture.host_tsc;
    let mode = if same_host {
        PlanMode::SameHost
    } else {
        PlanMode::CrossHost
    };

    let src_scaling = source_scaling(sidecar, policy)?;
    let (dst_scaling, tsc_khz) = destination_rate(guest_khz, dst, policy, &mut notes)?;
    let (source_pvti, pvti_source) = source_line(src, src_scaling)?;

    // Clock quality and elapsed time only matter when the TAI clocks are used.
    let uses_tai = mode == PlanMode::CrossHost && policy.clock == ClockPolicy::KeepRunning;
    if uses_tai {
        check_quality(sidecar, dst, policy)?;
    }
    // How far the two TAI readings can be from the truth. A capture later
    // than the destination's clock beyond this is refused in every mode: a
    // future-dated sidecar would otherwise pass any age limit with age 0.
    let tai_bound = tai_error_bound(sidecar, dst, policy);
    if uses_tai {
        check_estimate(sidecar, dst, policy, &tai_bound, &mut notes)?;
    }
    let (age_ns, behind_ns) = elapsed(sidecar, dst, tai_bound.total_ns)?;
    let mut bound = if uses_tai {
        tai_bound
    } else {
        ErrorBound::default()
    };
    let (elapsed_ns, clamped_negative_elapsed_ns) = if uses_tai {
        (age_ns, behind_ns)
    } else {
        (0, 0)
    };
    if let Some(max_ns) = policy.max_elapsed_ns {
        // A sidecar's age limit holds in every mode, even where the plan
        // itself does not use the elapsed time.
        if age_ns > max_ns {
            return Err(PlanError::ElapsedTooLong {
                elapsed_ns: age_ns,
                max_ns,
            });
        }
    }
    if uses_tai {
        if clamped_negative_elapsed_ns > 0 {
            notes.push(format!(
                "destination TAI was {clamped_negative_elapsed_ns} ns behind the capture: elapsed clamped to 0"
            ));
        }
        bound.rate_error_ns = rate_error_ns(sidecar, elapsed_ns);
        bound.total_ns = bound.total_ns.saturating_add(bound.rate_error_ns);
    }
    if let (true, Some(max_ns)) = (uses_tai, policy.max_clock_error_ns) {
        if bound.total_ns > max_ns {
            return Err(PlanError::ClockErrorTooLarge {
                host: "combined",
                maxerror_ns: bound.total_ns,
                max_ns,
            });
        }
    }
    bound.tsc_cycles = ns_to_cycles_ceil(bound.total_ns, guest_khz);

    let src_offsets = src.offsets();
    let s_src = scale_tsc(sidecar.capture.host_tsc, src_scaling);
    let s_dst = scale_tsc(dst.sample.host_tsc, dst_scaling);
    let first_offset = *src_offsets.first().ok_or(PlanError::BadInput {
        field: "vm_clock.vcpus",
        reason: "no vCPU".into(),
    })?;
    let guest_tsc_at_capture = s_src.wrapping_add(first_offset as u64);

    if policy.verify_vm_state {
        let window_ns = age_ns
            .saturating_add(tai_bound.total_ns)
            .saturating_add(rate_error_ns(sidecar, age_ns))
            .saturating_add(VM_STATE_SLACK_NS);
        check_vm_state(
            &source_pvti,
            guest_tsc_at_capture,
            dst,
            s_dst,
            window_ns,
            guest_khz,
        )?;
    }

    // Same host, same boot, keep-running: the captured offsets are still
    // right, bit for bit (advance = the host TSC's own progress). Otherwise
    // one delta for every vCPU from the elapsed time (0 under freeze).
    let copy = mode == PlanMode::SameHost && policy.clock == ClockPolicy::KeepRunning;
    let base_advance = if copy {
        s_dst.wrapping_sub(s_src)
    } else if policy.clock == ClockPolicy::KeepRunning {
        ns_to_cycles(elapsed_ns, guest_khz)
    } else {
        0
    };
    // Nothing goes backwards, in every mode: no vCPU below the TSC the
    // destination VM holds now (the last value its guest can have seen)...
    let mut floor = floor_cycles(&src_offsets, s_src, &dst.vm.offsets(), s_dst, base_advance);
    // ...and kvm-clock at the new TSC not below what the VM's own line (the
    // PVTI in its memory) gives at that held TSC.
    let held_first = dst.vm.offsets().first().copied().unwrap_or(first_offset);
    let held_tsc = s_dst.wrapping_add(held_first as u64);
    let target_with = |floor: u64| {
        s_src
            .wrapping_add(base_advance)
            .wrapping_add(floor)
            .wrapping_add(first_offset as u64)
    };
    if let Some(held_ns) = held_kvmclock_ns(dst, held_tsc) {
        let planned_ns = line_at_ns(&source_pvti, target_with(floor));
        if planned_ns < held_ns {
            // The lines agree to VM_LINE_TOLERANCE_NS (check_vm_state), so
            // this is a few µs of cycles at most. The shortfall is turned into
            // cycles at the guest rate, and checked on the line itself: a
            // line whose slope is not the guest rate's (a sidecar's own PVTI)
            // may need more, so the extra doubles until the floor holds.
            let short_ns = u64::try_from(held_ns - planned_ns).unwrap_or(u64::MAX);
            let mut extra = ns_to_cycles_ceil(short_ns, guest_khz).saturating_add(1);
            let mut reached = false;
            for _ in 0..64 {
                if line_at_ns(&source_pvti, target_with(floor.saturating_add(extra))) >= held_ns {
                    reached = true;
                    break;
                }
                extra = extra.saturating_mul(2);
            }
            floor = floor.saturating_add(extra);
            if !reached || floor == u64::MAX {
                return Err(PlanError::Overflow {
                    what: "floor_cycles (kvm-clock floor)",
                });
            }
        }
    }
    if floor > 0 {
        notes.push(format!(
            "advanced a further {floor} cycles so no vCPU reads below the TSC and kvm-clock the \
             destination VM holds"
        ));
    }
    let advance_cycles = if copy {
        base_advance.wrapping_add(floor)
    } else {
        base_advance.checked_add(floor).ok_or(PlanError::Overflow {
            what: "advance_cycles",
        })?
    };
    let delta = s_src.wrapping_add(advance_cycles).wrapping_sub(s_dst);
    let tsc_offsets: Vec<i64> = src_offsets
        .iter()
        .map(|off| (*off as u64).wrapping_add(delta) as i64)
        .collect();
    let floor_cycles = floor;

    let new_first = tsc_offsets.first().copied().unwrap_or(first_offset);
    let guest_tsc_target = guest_tsc(dst.sample.host_tsc, dst_scaling, new_first);
    let kvmclock = kvmclock_action(&source_pvti, &dst.vm.capabilities, policy);
    if let KvmClockAction::SetClock { max_error_ns, .. } = kvmclock {
        // The calibration's window: kvm-clock lands in [0, max] above the line.
        bound.kvmclock_ns = max_error_ns;
    }
    if pvti_source == PvtiSource::Derived {
        bound.kvmclock_ns = bound.kvmclock_ns.saturating_add(DERIVED_LINE_LIFT_NS);
    }

    Ok(Plan {
        mode,
        policy: policy.clock,
        tsc_khz,
        tsc_offsets,
        kvmclock,
        pvti_source,
        elapsed_ns,
        clamped_negative_elapsed_ns,
        advance_cycles,
        floor_cycles,
        guest_tsc_at_capture,
        guest_tsc_target,
        destination_host_tsc: dst.sample.host_tsc,
        error_bound: bound,
        notes,
    })
}

/// kvm-clock on the destination VM's own line (the PVTI in its memory, what
/// its guest last used) at guest TSC `held_tsc`; `None` when the VMM did not
/// read the line from guest memory.
fn held_kvmclock_ns(dst: &Destination, held_tsc: u64) -> Option<i128> {
    match (dst.vm.pvti, dst.vm.pvti_source) {
        (Some(pvti), Some(PvtiSource::GuestMemory)) if pvti.tsc_to_system_mul != 0 => {
            Some(line_at_ns(&pvti, held_tsc))
        }
        _ => None,
    }
}

/// The restored VM's own state must be one this sidecar can precede:
///
/// - the kvm-clock line in its memory (what its guest last used, loaded
///   with its state) is the sidecar's line: same scale, and the sidecar's
///   line passes the memory line's anchor within [`VM_LINE_TOLERANCE_NS`]
///   plus [`VM_LINE_DRIFT_PPM`] of the time between the two anchors;
/// - its TSC is not ahead of the capture by more than `window_ns` (the
///   sidecar's age, the TAI error bound and slack) at the guest rate: a VM
///   restored from a state saved after this capture holds at most the
///   capture value plus the time between capture and pause.
fn check_vm_state(
    source_pvti: &Pvti,
    guest_tsc_at_capture: u64,
    dst: &Destination,
    s_dst: u64,
    window_ns: u64,
    guest_khz: u32,
) -> Result<(), PlanError> {
    if let (Some(mem), Some(PvtiSource::GuestMemory)) = (dst.vm.pvti, dst.vm.pvti_source) {
        if dst.vm.tsc_khz == guest_khz
            && (mem.tsc_to_system_mul != source_pvti.tsc_to_system_mul
                || mem.tsc_shift != source_pvti.tsc_shift)
        {
            return Err(PlanError::NotThisVm {
                field: "vm_clock.pvti",
                reason: format!(
                    "the kvm-clock scale in the VM's memory (mul {}, shift {}) differs from the \
                     sidecar's (mul {}, shift {}) at the same TSC rate",
                    mem.tsc_to_system_mul,
                    mem.tsc_shift,
                    source_pvti.tsc_to_system_mul,
                    source_pvti.tsc_shift
                ),
            });
        }
        let apart_ns = line_at_ns(source_pvti, mem.tsc_timestamp) - i128::from(mem.system_time);
        let anchors_apart_cycles = mem.tsc_timestamp.abs_diff(source_pvti.tsc_timestamp);
        let anchors_apart_ns =
            crate::pvclock::cycles_to_ns(anchors_apart_cycles, guest_khz).unwrap_or(u64::MAX);
        let drift_ns =
            u64::try_from(u128::from(anchors_apart_ns) * u128::from(VM_LINE_DRIFT_PPM) / 1_000_000)
                .unwrap_or(u64::MAX);
        let tolerance_ns = VM_LINE_TOLERANCE_NS.saturating_add(drift_ns);
        if apart_ns.unsigned_abs() > u128::from(tolerance_ns) {
            return Err(PlanError::NotThisVm {
                field: "vm_clock.pvti",
                reason: format!(
                    "the kvm-clock line in the VM's memory lies {apart_ns} ns from the \
                     sidecar's (tolerance {tolerance_ns} ns): the VM never ran on this line"
                ),
            });
        }
    }
    let held_first = dst.vm.offsets().first().copied().unwrap_or(0);
    let held_tsc = s_dst.wrapping_add(held_first as u64);
    // Signed distance on the 2^64 circle: positive = the VM is ahead.
    let ahead_cycles = held_tsc.wrapping_sub(guest_tsc_at_capture) as i64;
    let allowed_cycles = ns_to_cycles_ceil(window_ns, guest_khz);
    if let Ok(ahead) = u64::try_from(ahead_cycles) {
        if ahead > allowed_cycles {
            return Err(PlanError::NotThisVm {
                field: "vm_clock.vcpus[0].tsc_offset",
                reason: format!(
                    "the VM's TSC is {ahead} cycles past the capture, more than the {allowed_cycles} \
                     cycles ({window_ns} ns) since capture that the sidecar allows"
                ),
            });
        }
    }
    Ok(())
}

fn check_destination(sidecar: &SidecarBody, dst: &Destination) -> Result<(), PlanError> {
    if let Some(id) = &dst.vm_id {
        if *id != sidecar.vm.id {
            return Err(PlanError::VmMismatch {
                sidecar: sidecar.vm.id.clone(),
                destination: id.clone(),
            });
        }
    }
    let (want, have) = (sidecar.vm_clock.vcpus.len(), dst.vm.vcpus.len());
    if want != have {
        return Err(PlanError::VcpuCountMismatch {
            sidecar: want,
            destination: have,
        });
    }
    if dst.identity.tsc_khz == 0 {
        return Err(PlanError::BadInput {
            field: "destination.identity.tsc_khz",
            reason: "0 kHz".into(),
        });
    }
    if dst.sample.tai_ns == 0 {
        return Err(PlanError::BadInput {
            field: "destination.sample.tai_ns",
            reason: "0 (CLOCK_TAI not read)".into(),
        });
    }
    Ok(())
}

/// |a - b| in parts per million of `b`, rounded up.
pub(crate) fn ppm_apart(a_khz: u32, b_khz: u32) -> u64 {
    let diff = u128::from(a_khz.abs_diff(b_khz)) * 1_000_000;
    let ppm = diff.div_ceil(u128::from(b_khz.max(1)));
    u64::try_from(ppm).unwrap_or(u64::MAX)
}

/// The scaling that turned the source host TSC into guest TSC.
fn source_scaling(sidecar: &SidecarBody, policy: &Policy) -> Result<Option<TscScaling>, PlanError> {
    let src = &sidecar.vm_clock;
    if src.tsc_scaling.is_some() {
        return Ok(src.tsc_scaling);
    }
    let host_khz = sidecar.source_host.tsc_khz;
    if ppm_apart(src.tsc_khz, host_khz) > u64::from(policy.rate_tolerance_ppm) {
        return Err(PlanError::ScalingUnknown {
            guest_khz: src.tsc_khz,
            host: "the source",
            field: "vm_clock.tsc_scaling",
        });
    }
    Ok(None)
}

/// The destination's scaling and the frequency to set, or a refusal.
fn destination_rate(
    guest_khz: u32,
    dst: &Destination,
    policy: &Policy,
    notes: &mut Vec<String>,
) -> Result<(Option<TscScaling>, Option<u32>), PlanError> {
    let host_khz = dst.identity.tsc_khz;
    let ppm = ppm_apart(guest_khz, host_khz);
    let set_khz = (dst.vm.tsc_khz != guest_khz).then_some(guest_khz);
    if ppm <= u64::from(policy.rate_tolerance_ppm) {
        if ppm > 0 {
            notes.push(format!(
                "guest rate {guest_khz} kHz within {ppm} ppm of the host's {host_khz} kHz: \
                 KVM runs it unscaled"
            ));
        }
        return Ok((dst.vm.tsc_scaling, set_khz));
    }
    if !dst.vm.capabilities.tsc_scaling {
        return Err(PlanError::RateMismatch {
            guest_khz,
            host_khz,
            ppm,
            tolerance_ppm: policy.rate_tolerance_ppm,
        });
    }
    match (dst.vm.tsc_scaling, set_khz) {
        (Some(scaling), None) => Ok((Some(scaling), None)),
        _ => Err(PlanError::ScalingUnknown {
            guest_khz,
            host: "the destination",
            field: "destination.vm.tsc_scaling",
        }),
    }
}

/// The source TSC-to-kvm-clock line: captured, or derived from the
/// KVM_GET_CLOCK pair the way KVM computes it.
fn source_line(
    src: &VmClock,
    scaling: Option<TscScaling>,
) -> Result<(Pvti, PvtiSource), PlanError> {
    if let Some(pvti) = src.pvti {
        return Ok((pvti, src.pvti_source.unwrap_or(PvtiSource::Derived)));
    }
    if !src.kvmclock.has_host_tsc() {
        return Err(PlanError::NoPvti {
            flags: src.kvmclock.flags,
        });
    }
    let offset = src.vcpus.first().map(|v| v.tsc_offset).unwrap_or(0);
    let pvti = derive_pvti(
        src.kvmclock.clock_ns,
        src.kvmclock.host_tsc,
        offset,
        scaling,
        src.tsc_khz,
    )
    .ok_or(PlanError::BadInput {
        field: "vm_clock.tsc_khz",
        reason: "no kvm-clock scale for this rate".into(),
    })?;
    // Re-anchoring the line at the sample point truncates twice (the shift
    // and the 32-bit fraction): the derived line lies 0 to 2 ns below the
    // guest's. Lift it so kvm-clock never reads below what the guest saw.
    let pvti = Pvti {
        system_time: pvti.system_time.saturating_add(DERIVED_LINE_LIFT_NS),
        ..pvti
    };
    Ok((pvti, PvtiSource::Derived))
}

fn check_quality(
    sidecar: &SidecarBody,
    dst: &Destination,
    policy: &Policy,
) -> Result<(), PlanError> {
    let hosts = [
        ("source", &sidecar.capture.quality),
        ("destination", &dst.sample.quality),
    ];
    for (host, quality) in hosts {
        if policy.require_sync && !quality.synchronised {
            return Err(PlanError::NotSynchronised { host });
        }
        if let Some(max_ns) = policy.max_clock_error_ns {
            if quality.maxerror_ns > max_ns {
                return Err(PlanError::ClockErrorTooLarge {
                    host,
                    maxerror_ns: quality.maxerror_ns,
                    max_ns,
                });
            }
        }
    }
    Ok(())
}

/// The measured offset must agree with what both hosts' adjtimex figures
/// allow when both claim to be synchronised: a note when it does not, and
/// a refusal ([`PlanError::ClocksDisagree`]) under `require_sync`.
fn check_estimate(
    sidecar: &SidecarBody,
    dst: &Destination,
    policy: &Policy,
    bound: &ErrorBound,
    notes: &mut Vec<String>,
) -> Result<(), PlanError> {
    let Some(estimate) = dst.offset_estimate.or(sidecar.offset_estimate) else {
        return Ok(());
    };
    let (src_q, dst_q) = (&sidecar.capture.quality, &dst.sample.quality);
    if !(src_q.synchronised && dst_q.synchronised) {
        return Ok(());
    }
    let allowed_ns = src_q
        .maxerror_ns
        .saturating_add(dst_q.maxerror_ns)
        .saturating_add(bound.offset_estimate_ns)
        .saturating_add(bound.offset_drift_ns);
    if estimate.offset_ns.unsigned_abs() <= allowed_ns {
        return Ok(());
    }
    if policy.require_sync {
        return Err(PlanError::ClocksDisagree {
            offset_ns: estimate.offset_ns,
            allowed_ns,
        });
    }
    notes.push(format!(
        "the measured offset between the hosts, {} ns, exceeds the {allowed_ns} ns their \
         adjtimex figures allow although both claim to be synchronised: one host clock is wrong; \
         the plan corrects by the measured offset",
        estimate.offset_ns
    ));
    Ok(())
}

/// How far the two clocks may have drifted apart since `estimate` was
/// measured: `ppm` of the time from the measurement to the capture plus
/// from the measurement to the destination's sample, both on the source's
/// clock. An estimate without `measured_tai_ns` counts as measured at the
/// capture.
pub fn offset_drift_ns(
    sidecar: &SidecarBody,
    dst: &Destination,
    estimate: &OffsetEstimate,
    ppm: u32,
) -> u64 {
    let capture = i128::from(sidecar.capture.tai_ns);
    let measured = estimate.measured_tai_ns.map_or(capture, i128::from);
    let sample = i128::from(dst.sample.tai_ns) - i128::from(estimate.offset_ns);
    let span_ns = sample
        .abs_diff(measured)
        .saturating_add(capture.abs_diff(measured));
    let ns = crate::peer::estimate::ppm_of_ns(span_ns, u64::from(ppm));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The capture and the destination's sample read one clock: the same host
/// (hostname) in the same boot (boot_id).
fn one_clock(sidecar: &SidecarBody, dst: &Destination) -> bool {
    sidecar.source_host.boot_id == dst.identity.boot_id
        && sidecar.source_host.hostname == dst.identity.hostname
}

/// Brackets and host clock errors, or the measured offset's bound and
/// drift (the rate term is added once elapsed is known).
fn tai_error_bound(sidecar: &SidecarBody, dst: &Destination, policy: &Policy) -> ErrorBound {
    let mut bound = ErrorBound {
        source_bracket_ns: sidecar.capture.uncertainty_ns,
        destination_bracket_ns: dst.sample.uncertainty_ns,
        ..ErrorBound::default()
    };
    match dst.offset_estimate.or(sidecar.offset_estimate) {
        Some(estimate) => {
            bound.offset_estimate_ns = estimate.bound_ns;
            bound.offset_drift_ns =
                offset_drift_ns(sidecar, dst, &estimate, policy.offset_drift_ppm);
        }
        None => {
            bound.source_clock_ns = sidecar.capture.quality.maxerror_ns;
            bound.destination_clock_ns = dst.sample.quality.maxerror_ns;
            // One boot's clock read twice needs no allowance; two clocks
            // agree only as far as someone measured.
            if !one_clock(sidecar, dst) {
                bound.unmeasured_offset_ns = policy.unmeasured_offset_ns;
            }
        }
    }
    bound.total_ns = [
        bound.source_bracket_ns,
        bound.destination_bracket_ns,
        bound.source_clock_ns,
        bound.destination_clock_ns,
        bound.unmeasured_offset_ns,
        bound.offset_estimate_ns,
        bound.offset_drift_ns,
    ]
    .iter()
    .fold(0u64, |acc, ns| acc.saturating_add(*ns));
    bound
}

/// (elapsed, clamped): TAI time since capture, never negative; a negative
/// value within the error bound is clamped to 0 and its size returned.
fn elapsed(
    sidecar: &SidecarBody,
    dst: &Destination,
    bound_ns: u64,
) -> Result<(u64, u64), PlanError> {
    let correction_ns = dst
        .offset_estimate
        .or(sidecar.offset_estimate)
        .map_or(0, |e| i128::from(e.offset_ns));
    let raw_ns = i128::from(dst.sample.tai_ns) - correction_ns - i128::from(sidecar.capture.tai_ns);
    if raw_ns >= 0 {
        let elapsed_ns = u64::try_from(raw_ns).unwrap_or(u64::MAX);
        return Ok((elapsed_ns, 0));
    }
    let ahead_ns = u64::try_from(-raw_ns).unwrap_or(u64::MAX);
    if ahead_ns > bound_ns {
        return Err(PlanError::CaptureInFuture { ahead_ns, bound_ns });
    }
    Ok((0, ahead_ns))
}

/// Rate uncertainty x elapsed: the guest rate is known to 1 kHz, and an
/// unscaled guest really ticks at the source host's rate.
fn rate_error_ns(sidecar: &SidecarBody, elapsed_ns: u64) -> u64 {
    let guest_khz = sidecar.vm_clock.tsc_khz;
    let mut uncertainty_khz: u64 = 1;
    if sidecar.vm_clock.tsc_scaling.is_none() {
        uncertainty_khz += u64::from(guest_khz.abs_diff(sidecar.source_host.tsc_khz));
    }
    let ns = (u128::from(elapsed_ns) * u128::from(uncertainty_khz))
        .div_ceil(u128::from(guest_khz.max(1)));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn ns_to_cycles_ceil(ns: u64, khz: u32) -> u64 {
    let cycles = (u128::from(ns) * u128::from(khz)).div_ceil(1_000_000);
    u64::try_from(cycles).unwrap_or(u64::MAX)
}

/// Extra cycles beyond `advance` needed so that every vCPU's new TSC is at
/// least what the destination VM's vCPU reads now. A destination TSC below
/// the capture value (a fresh VM, or one restored from the capture) needs none.
fn floor_cycles(
    src_offsets: &[i64],
    s_src: u64,
    dst_offsets: &[i64],
    s_dst: u64,
    advance: u64,
) -> u64 {
    src_offsets
        .iter()
        .zip(dst_offsets)
        .map(|(src_off, dst_off)| {
            let captured = s_src.wrapping_add(*src_off as u64);
            let current = s_dst.wrapping_add(*dst_off as u64);
            // Signed distance on the 2^64 circle: positive = the VM is ahead.
            let ahead = current.wrapping_sub(captured) as i64;
            u64::try_from(ahead).unwrap_or(0).saturating_sub(advance)
        })
        .max()
        .unwrap_or(0)
}

/// kvm-clock onto the source line: installed exactly where the kernel has
/// KVM_SET_CLOCK_GUEST, else the calibrated KVM_SET_CLOCK with the policy's
/// window.
fn kvmclock_action(pvti: &Pvti, caps: &Capabilities, policy: &Policy) -> KvmClockAction {
    if caps.clock_guest {
        return KvmClockAction::ClockGuest { pvti: *pvti };
    }
    KvmClockAction::SetClock {
        pvti: *pvti,
        max_error_ns: policy.max_kvmclock_error_ns,
    }
}
