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
    TscScaling, VmClock, KVM_CLOCK_REALTIME,
};
use crate::pvclock::{derive_pvti, guest_tsc, ns_to_cycles, pvclock_read, scale_tsc};
use crate::sidecar::{SidecarBody, SidecarError};

/// How far a PVTI derived from a KVM_GET_CLOCK pair is lifted above the
/// pair's point: the most re-anchoring can lose to truncation, in ns.
pub const DERIVED_LINE_LIFT_NS: u64 = 2;

/// What KVM_SET_CLOCK loses to truncation besides the anchor: its new PVTI is
/// re-anchored (up to 2 ns, as for a derived line) and its realtime catch-up
/// counts ns while the TSC counts cycles (1 ns), in ns.
pub const SET_CLOCK_ROUNDING_NS: u64 = 3;

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
    /// KVM_SET_CLOCK aimed at the source line: kvm-clock should read
    /// `clock_ns` at CLOCK_REALTIME `realtime_ns` (honoured when `flags` has
    /// KVM_CLOCK_REALTIME). `pvti` is the line to verify and correct against.
    SetClock {
        clock_ns: u64,
        realtime_ns: u64,
        flags: u32,
        pvti: Pvti,
        max_error_ns: u64,
    },
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
    /// Rate uncertainty times the elapsed time.
    pub rate_ns: u64,
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
    pub tai_skew_ns: u64,
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
    #[error("arithmetic out of range in {what}")]
    Overflow { what: &'static str },
}

/// Plan a restore of the VM captured in `sidecar` onto `dst` under `policy`.
///
/// Never panics; every refusal is a [`PlanError`] naming the field or rule.
pub fn plan(sidecar: &SidecarBody, dst: &Destination, policy: &Policy) -> Result<Plan, PlanError> {
    sidecar.validate()?;
    check_destination(sidecar, dst)?;
    let src = &sidecar.vm_clock;
    let guest_khz = src.tsc_khz;
    let mut notes = Vec::new();

    let same_host = sidecar.source_host.boot_id == dst.identity.boot_id
        && sidecar.source_host.hostname == dst.identity.hostname
        && dst.sample.host_tsc >= sidecar.capture.host_tsc;
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
    let mut bound = if uses_tai {
        tai_error_bound(sidecar, dst)
    } else {
        ErrorBound::default()
    };
    let (elapsed_ns, tai_skew_ns) = if uses_tai {
        elapsed(sidecar, dst, bound.total_ns)?
    } else {
        (0, 0)
    };
    if let Some(max_ns) = policy.max_elapsed_ns {
        // A sidecar's age limit holds in every mode, even where the plan
        // itself does not use the elapsed time.
        let age_ns = if uses_tai {
            elapsed_ns
        } else {
            dst.sample.tai_ns.saturating_sub(sidecar.capture.tai_ns)
        };
        if age_ns > max_ns {
            return Err(PlanError::ElapsedTooLong {
                elapsed_ns: age_ns,
                max_ns,
            });
        }
    }
    if uses_tai {
        if tai_skew_ns > 0 {
            notes.push(format!(
                "destination TAI was {tai_skew_ns} ns behind the capture: elapsed clamped to 0"
            ));
        }
        bound.rate_ns = rate_error_ns(sidecar, elapsed_ns);
        bound.total_ns = bound.total_ns.saturating_add(bound.rate_ns);
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

    let (tsc_offsets, advance_cycles, floor_cycles) =
        if mode == PlanMode::SameHost && policy.clock == ClockPolicy::KeepRunning {
            // Same host, same boot: the offsets are still right, bit for bit.
            let advance = s_dst.wrapping_sub(s_src);
            (src_offsets, advance, 0)
        } else {
            let base_advance = if policy.clock == ClockPolicy::KeepRunning {
                ns_to_cycles(elapsed_ns, guest_khz)
            } else {
                0
            };
            let floor = floor_cycles(&src_offsets, s_src, &dst.vm.offsets(), s_dst, base_advance);
            if floor > 0 {
                notes.push(format!(
                    "advanced a further {floor} cycles so no vCPU reads below the destination \
                     VM's current TSC"
                ));
            }
            let advance = base_advance.checked_add(floor).ok_or(PlanError::Overflow {
                what: "advance_cycles",
            })?;
            let delta = s_src.wrapping_add(advance).wrapping_sub(s_dst);
            let offsets = src_offsets
                .iter()
                .map(|off| (*off as u64).wrapping_add(delta) as i64)
                .collect();
            (offsets, advance, floor)
        };

    let new_first = tsc_offsets.first().copied().unwrap_or(first_offset);
    let guest_tsc_target = guest_tsc(dst.sample.host_tsc, dst_scaling, new_first);
    let kvmclock = kvmclock_action(
        &source_pvti,
        &dst.vm.capabilities,
        guest_tsc_target,
        &dst.sample,
        policy,
    );
    if let KvmClockAction::SetClock { .. } = kvmclock {
        bound.kvmclock_ns = dst
            .sample
            .uncertainty_ns
            .saturating_add(SET_CLOCK_ROUNDING_NS)
            .saturating_mul(2);
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
        tai_skew_ns,
        advance_cycles,
        floor_cycles,
        guest_tsc_at_capture,
        guest_tsc_target,
        destination_host_tsc: dst.sample.host_tsc,
        error_bound: bound,
        notes,
    })
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
fn ppm_apart(a_khz: u32, b_khz: u32) -> u64 {
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

/// Brackets and host clock errors (the rate term is added once elapsed is known).
fn tai_error_bound(sidecar: &SidecarBody, dst: &Destination) -> ErrorBound {
    let mut bound = ErrorBound {
        source_bracket_ns: sidecar.capture.uncertainty_ns,
        destination_bracket_ns: dst.sample.uncertainty_ns,
        ..ErrorBound::default()
    };
    match dst.offset_estimate.or(sidecar.offset_estimate) {
        Some(estimate) => bound.offset_estimate_ns = estimate.bound_ns,
        None => {
            bound.source_clock_ns = sidecar.capture.quality.maxerror_ns;
            bound.destination_clock_ns = dst.sample.quality.maxerror_ns;
        }
    }
    bound.total_ns = [
        bound.source_bracket_ns,
        bound.destination_bracket_ns,
        bound.source_clock_ns,
        bound.destination_clock_ns,
        bound.offset_estimate_ns,
    ]
    .iter()
    .fold(0u64, |acc, ns| acc.saturating_add(*ns));
    bound
}

/// (elapsed, skew): TAI time since capture, never negative; a negative
/// value within the error bound is clamped to 0 and returned as skew.
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

/// Aim KVM_SET_CLOCK at the line. The realtime anchor is known only to
/// ±uncertainty, so the aim is raised by that much: kvm-clock then lands 0 to
/// 2 x uncertainty above the line, never below it (nothing goes backwards).
fn kvmclock_action(
    pvti: &Pvti,
    caps: &Capabilities,
    guest_tsc_target: u64,
    sample: &HostSample,
    policy: &Policy,
) -> KvmClockAction {
    if caps.clock_guest {
        return KvmClockAction::ClockGuest { pvti: *pvti };
    }
    let flags = if caps.adjust_clock & KVM_CLOCK_REALTIME != 0 {
        KVM_CLOCK_REALTIME
    } else {
        0
    };
    KvmClockAction::SetClock {
        clock_ns: pvclock_read(pvti, guest_tsc_target)
            .saturating_add(sample.uncertainty_ns)
            .saturating_add(SET_CLOCK_ROUNDING_NS),
        realtime_ns: sample.realtime_ns,
        flags,
        pvti: *pvti,
        max_error_ns: policy.max_kvmclock_error_ns,
    }
}
