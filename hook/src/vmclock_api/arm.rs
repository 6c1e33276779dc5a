//! The armed clock: a `PUT vm.clock` body planned on the destination
//! *before* the VM's final blackout, carried in `vm.restore` or
//! `vm.receive-migration` (`clock`) and applied by the VMM between loading
//! the VM's state and the first vCPU run (docs/armed.md).
//!
//! Why it may be planned early: with equal guest and host TSC rates a TSC
//! offset is a constant (the target guest TSC minus the host TSC is the
//! same whenever it is applied), and the kvm-clock line does not depend on
//! when it is installed. What the planner could not see then (the VM's
//! saved state) the VMM checks at apply, with [`check`]: the body's own
//! age and origin ([`ArmCheck::planned_host_tsc`] / `planned_tai_ns` and
//! `valid_for_ns` against this host's clocks now), the VM's shape (vCPU
//! count), and the VM's identity and the floor through the TSC the saved
//! state holds: it must lie at or after the capture and within the time
//! since capture, and no vCPU may be put below it.

use serde::{Deserialize, Serialize};

use crate::peer::estimate::ppm_of_ns;
use crate::plan::ppm_apart;
use crate::pvclock::ns_to_cycles;

/// Longest validity an armed body may claim: 1 hour.
pub const MAX_VALID_FOR_NS: u64 = 3_600_000_000_000;
/// How far this host's TSC and TAI may disagree about the time since the
/// plan before the body is taken for another host's (or a stepped clock's):
/// 1 ms plus [`ORIGIN_PPM`] of that time.
pub const ORIGIN_SLACK_NS: u64 = 1_000_000;
/// See [`ORIGIN_SLACK_NS`]: NTP's 500 ppm slew limit.
pub const ORIGIN_PPM: u64 = 500;
/// Added to the identity window: what the capture-to-pause time may add
/// beyond the plan's elapsed time and bound (a capture runs shortly before
/// the pause), 1 s.
pub const IDENTITY_SLACK_NS: u64 = 1_000_000_000;

/// What an armed body must still be true of when the VMM applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmCheck {
    /// The destination's host TSC of the (TSC, TAI) pair the plan was made
    /// from, cycles.
    pub planned_host_tsc: u64,
    /// The destination's CLOCK_TAI of that pair, ns.
    pub planned_tai_ns: u64,
    /// Refuse when more than this has passed since `planned_tai_ns`, ns
    /// (1 ..= [`MAX_VALID_FOR_NS`]).
    pub valid_for_ns: u64,
    /// The VM's vCPU count.
    pub vcpu_count: u32,
    /// vCPU 0's guest TSC at the capture, cycles: the saved state's TSC
    /// cannot be below it (the capture precedes the pause).
    pub capture_guest_tsc: u64,
    /// The plan's elapsed time from the capture to `planned_tai_ns`, ns.
    pub elapsed_at_plan_ns: u64,
    /// The plan's error bound on the guest TSC, ns.
    pub error_bound_ns: u64,
}

/// This host and VM at the moment of the apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmNow {
    pub host_tsc: u64,
    pub tai_ns: u64,
    /// The host TSC rate, kHz.
    pub host_khz: u32,
    /// The guest TSC rate the VM runs at, kHz.
    pub guest_khz: u32,
}

/// Why the VMM refused an armed body. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArmRefusal {
    #[error("arm.valid_for_ns {valid_for_ns}: must be 1 ..= {MAX_VALID_FOR_NS}")]
    BadValidity { valid_for_ns: u64 },
    #[error(
        "arm.planned_tai_ns: the armed clock is stale: planned {age_ns} ns ago, valid for {valid_for_ns} ns"
    )]
    Stale { age_ns: u64, valid_for_ns: u64 },
    #[error("arm.planned_tai_ns: planned {ahead_ns} ns in this host's future (CLOCK_TAI went back, or another host's pair)")]
    PlannedInFuture { ahead_ns: u64 },
    #[error("arm.planned_host_tsc: this host's TSC ({now}) is below the planned pair's ({planned}): planned on another host or before a reboot")]
    HostTscBehind { planned: u64, now: u64 },
    #[error("arm.planned_host_tsc: this host's TSC counts {tsc_ns} ns since the plan, its TAI {tai_ns} ns (more than {slack_ns} ns apart): planned on another host, or the clock was stepped")]
    OriginMismatch {
        tsc_ns: u64,
        tai_ns: u64,
        slack_ns: u64,
    },
    #[error("arm.vcpu_count {armed}: the VM has {vm} vCPUs")]
    VcpuCount { armed: u32, vm: u32 },
    #[error("tsc_offsets: {offsets} offsets for {vm} vCPUs")]
    OffsetCount { offsets: usize, vm: u32 },
    #[error("tsc_khz {armed}: the armed clock must run the guest at the rate it was restored at ({vm} kHz); re-plan with the VM's own rate")]
    RateChange { armed: u32, vm: u32 },
    #[error("arm.host: guest rate {guest_khz} kHz on a {host_khz} kHz host: an armed clock needs unscaled TSC (rates within 250 ppm)")]
    Scaled { guest_khz: u32, host_khz: u32 },
    #[error("arm.capture_guest_tsc: the saved state's TSC of vCPU 0 is {behind_cycles} cycles before the capture: not the VM the clock was planned for (or an older state)")]
    StateBeforeCapture { behind_cycles: u64 },
    #[error("arm.capture_guest_tsc: the saved state's TSC of vCPU 0 is {ahead_cycles} cycles past the capture, more than the {allowed_cycles} the time since capture allows: not the VM the clock was planned for")]
    StateTooFarAhead {
        ahead_cycles: u64,
        allowed_cycles: u64,
    },
    #[error("tsc_offsets[{vcpu}]: the armed clock puts vCPU {vcpu} {by_cycles} cycles below the TSC its saved state holds: it would go backwards")]
    BelowSavedTsc { vcpu: usize, by_cycles: u64 },
    #[error("the VM's saved state has no TSC for vCPU {vcpu}: its identity cannot be checked")]
    NoSavedTsc { vcpu: usize },
}

/// KVM runs a guest unscaled within this much of the host rate.
const UNSCALED_PPM: u64 = 250;

fn ppm_of(ns: u64, ppm: u64) -> u64 {
    u64::try_from(ppm_of_ns(u128::from(ns), ppm)).unwrap_or(u64::MAX)
}

/// `cycles` at `khz` in ns, saturating.
fn cycles_ns(cycles: u64, khz: u32) -> u64 {
    crate::pvclock::cycles_to_ns(cycles, khz).unwrap_or(u64::MAX)
}

/// Checks an armed body against this host now and the VM's saved state:
/// `saved_tsc[i]` is vCPU i's guest TSC as the loaded state holds it
/// (`MSR_IA32_TSC`), `offsets` / `tsc_khz` the body's. Pure; never panics.
pub fn check(
    arm: &ArmCheck,
    offsets: &[i64],
    tsc_khz: Option<u32>,
    now: &ArmNow,
    saved_tsc: &[Option<u64>],
) -> Result<(), ArmRefusal> {
    if arm.valid_for_ns == 0 || arm.valid_for_ns > MAX_VALID_FOR_NS {
        return Err(ArmRefusal::BadValidity {
            valid_for_ns: arm.valid_for_ns,
        });
    }
    let vm_vcpus = u32::try_from(saved_tsc.len()).unwrap_or(u32::MAX);
    if arm.vcpu_count != vm_vcpus {
        return Err(ArmRefusal::VcpuCount {
            armed: arm.vcpu_count,
            vm: vm_vcpus,
        });
    }
    if offsets.len() != saved_tsc.len() {
        return Err(ArmRefusal::OffsetCount {
            offsets: offsets.len(),
            vm: vm_vcpus,
        });
    }
    check_age(arm, now)?;
    if let Some(khz) = tsc_khz {
        if khz != now.guest_khz {
            return Err(ArmRefusal::RateChange {
                armed: khz,
                vm: now.guest_khz,
            });
        }
    }
    if now.host_khz == 0 || ppm_apart(now.guest_khz, now.host_khz) > UNSCALED_PPM {
        return Err(ArmRefusal::Scaled {
            guest_khz: now.guest_khz,
            host_khz: now.host_khz,
        });
    }
    check_identity(arm, now, saved_tsc)?;
    for (vcpu, (offset, saved)) in offsets.iter().zip(saved_tsc).enumerate() {
        let saved = saved.ok_or(ArmRefusal::NoSavedTsc { vcpu })?;
        let new_tsc = now.host_tsc.wrapping_add(*offset as u64);
        // Signed distance on the 2^64 circle: negative = below the saved TSC.
        let ahead = new_tsc.wrapping_sub(saved) as i64;
        if ahead < 0 {
            return Err(ArmRefusal::BelowSavedTsc {
                vcpu,
                by_cycles: ahead.unsigned_abs(),
            });
        }
    }
    Ok(())
}

/// The body's pair is this host's and recent: TAI and TSC both moved
/// forward since, by the same time within the slack, and no more than
/// `valid_for_ns`.
fn check_age(arm: &ArmCheck, now: &ArmNow) -> Result<(), ArmRefusal> {
    let age_ns = match now.tai_ns.checked_sub(arm.planned_tai_ns) {
        Some(age) => age,
        None => {
            let ahead_ns = arm.planned_tai_ns - now.tai_ns;
            if ahead_ns > ORIGIN_SLACK_NS {
                return Err(ArmRefusal::PlannedInFuture { ahead_ns });
            }
            0
        }
    };
    if age_ns > arm.valid_for_ns {
        return Err(ArmRefusal::Stale {
            age_ns,
            valid_for_ns: arm.valid_for_ns,
        });
    }
    let cycles =
        now.host_tsc
            .checked_sub(arm.planned_host_tsc)
            .ok_or(ArmRefusal::HostTscBehind {
                planned: arm.planned_host_tsc,
                now: now.host_tsc,
            })?;
    let tsc_ns = cycles_ns(cycles, now.host_khz);
    let slack_ns = ORIGIN_SLACK_NS.saturating_add(ppm_of(age_ns.max(tsc_ns), ORIGIN_PPM));
    if tsc_ns.abs_diff(age_ns) > slack_ns {
        return Err(ArmRefusal::OriginMismatch {
            tsc_ns,
            tai_ns: age_ns,
            slack_ns,
        });
    }
    Ok(())
}

/// The saved state is this VM's, saved after the capture: vCPU 0's saved
/// TSC lies in `[capture, capture + (elapsed + age + bound + slack) at the
/// guest rate]`.
fn check_identity(
    arm: &ArmCheck,
    now: &ArmNow,
    saved_tsc: &[Option<u64>],
) -> Result<(), ArmRefusal> {
    let saved0 = saved_tsc
        .first()
        .copied()
        .flatten()
        .ok_or(ArmRefusal::NoSavedTsc { vcpu: 0 })?;
    let ahead = saved0.wrapping_sub(arm.capture_guest_tsc) as i64;
    if ahead < 0 {
        return Err(ArmRefusal::StateBeforeCapture {
            behind_cycles: ahead.unsigned_abs(),
        });
    }
    let age_ns = now.tai_ns.saturating_sub(arm.planned_tai_ns);
    let window_ns = arm
        .elapsed_at_plan_ns
        .saturating_add(age_ns)
        .saturating_add(arm.error_bound_ns)
        .saturating_add(IDENTITY_SLACK_NS);
    let allowed_cycles = ns_to_cycles(window_ns, now.guest_khz);
    let ahead_cycles = ahead.unsigned_abs();
    if ahead_cycles > allowed_cycles {
        return Err(ArmRefusal::StateTooFarAhead {
            ahead_cycles,
            allowed_cycles,
        });
    }
    Ok(())
}
