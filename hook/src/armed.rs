//! Planning an armed clock: the whole `PUT vm.clock` body made on the
//! destination from the sidecar and one (host TSC, TAI) sample, before the
//! VM's final blackout, with the [`ArmCheck`] the VMM tests it against at
//! apply (docs/armed.md).
//!
//! Invariant that makes this sound: the destination guest runs unscaled
//! (guest rate within [`Policy::rate_tolerance_ppm`] of the host's, no
//! scaling asked for), so each planned offset is a constant: the guest TSC
//! it gives at any later host TSC `h` is the target at the sample plus
//! `h - sample.host_tsc`, which is where a VM that had kept running would
//! be. Freeze cannot be armed (its target depends on the moment of the
//! apply), nor can a plan that sets another rate.
//!
//! The destination VM does not exist yet, so the planner is given one made
//! from the sidecar: the captured vCPUs and rate, each vCPU held at its
//! capture TSC (no floor from it) and no kvm-clock line in memory. The
//! checks that need the real restored state (identity, the TSC floor) are
//! the VMM's, at apply, through [`ArmCheck`].

use crate::model::{
    Capabilities, ClockPolicy, HostIdentity, HostSample, KvmClockSample, Policy, RunState,
    VcpuOffset, VmClock,
};
use crate::plan::{self, Destination, Plan, PlanError};
use crate::sidecar::SidecarBody;
use crate::vmclock_api::arm::{ArmCheck, MAX_VALID_FOR_NS};
use crate::vmclock_api::ClockPut;

/// Default validity of an armed body: 10 minutes from its sample.
pub const DEFAULT_VALID_FOR_NS: u64 = 600_000_000_000;

/// An armed clock: the plan it came from and the body to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Armed {
    pub plan: Plan,
    /// `ClockPut::from_plan(&plan)` with `arm` set.
    pub put: ClockPut,
}

/// Why no armed body can be made. Nothing was sent anywhere.
#[derive(Debug, thiserror::Error)]
pub enum ArmPlanError {
    #[error(
        "policy freeze cannot be armed: a frozen guest's offsets depend on the moment they are \
         applied; use clockcarry restore inside the blackout"
    )]
    Freeze,
    #[error("valid_for_ns {valid_for_ns}: must be 1 ..= {MAX_VALID_FOR_NS}")]
    Validity { valid_for_ns: u64 },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// The destination VM as the planner sees it before it exists: the
/// sidecar's vCPUs and rate, each held at its capture TSC (so the planner's
/// floor adds nothing; the VMM applies the real floor), no line in memory.
pub fn destination_before_restore(
    sidecar: &SidecarBody,
    identity: HostIdentity,
    sample: HostSample,
    vm_id: Option<String>,
) -> Destination {
    let src = &sidecar.vm_clock;
    // Unscaled on both sides: held TSC = sample + offset = the capture TSC.
    let shift = sidecar.capture.host_tsc.wrapping_sub(sample.host_tsc);
    let vcpus = src
        .vcpus
        .iter()
        .map(|v| VcpuOffset {
            id: v.id,
            tsc_offset: (v.tsc_offset as u64).wrapping_add(shift) as i64,
        })
        .collect();
    let vm = VmClock {
        state: RunState::Paused,
        tsc_khz: src.tsc_khz,
        vcpus,
        kvmclock: KvmClockSample {
            clock_ns: 0,
            flags: 0,
            realtime_ns: 0,
            host_tsc: 0,
        },
        pvti: None,
        pvti_source: None,
        tsc_scaling: None,
        // What the body says does not depend on these: `follow_pvti` lets
        // the VMM pick CLOCK_GUEST or the calibrated SET_CLOCK itself, and
        // without scaling a rate beyond the tolerance is refused.
        capabilities: Capabilities {
            tsc_offset_effective: true,
            clock_guest: false,
            tsc_scaling: false,
            adjust_clock: 0,
        },
    };
    Destination {
        identity,
        sample,
        vm,
        vm_id,
        offset_estimate: None,
    }
}

/// Plans the armed body for the VM in `sidecar` onto this host, from the
/// destination's `identity` and `sample` taken now, valid for
/// `valid_for_ns` after the sample. `policy.verify_vm_state` is ignored
/// (there is no restored state yet; the VMM checks it through the body).
/// Pure; never panics.
pub fn plan_armed(
    sidecar: &SidecarBody,
    identity: HostIdentity,
    sample: HostSample,
    vm_id: Option<String>,
    policy: &Policy,
    valid_for_ns: u64,
) -> Result<Armed, ArmPlanError> {
    if policy.clock == ClockPolicy::Freeze {
        return Err(ArmPlanError::Freeze);
    }
    if valid_for_ns == 0 || valid_for_ns > MAX_VALID_FOR_NS {
        return Err(ArmPlanError::Validity { valid_for_ns });
    }
    let dst = destination_before_restore(sidecar, identity, sample, vm_id);
    let policy = Policy {
        verify_vm_state: false,
        ..policy.clone()
    };
    // The VM given to the planner runs at the guest rate already, so the
    // plan never sets a rate: beyond the tolerance it is refused instead.
    let plan = plan::plan(sidecar, &dst, &policy)?;
    // The identity window needs the real time since the capture, which a
    // same-host plan does not use (its elapsed_ns is 0).
    let since_capture_ns = dst.sample.tai_ns.saturating_sub(sidecar.capture.tai_ns);
    let mut put = ClockPut::from_plan(&plan);
    put.arm = Some(ArmCheck {
        planned_host_tsc: dst.sample.host_tsc,
        planned_tai_ns: dst.sample.tai_ns,
        valid_for_ns,
        vcpu_count: u32::try_from(plan.tsc_offsets.len()).unwrap_or(u32::MAX),
        capture_guest_tsc: plan.guest_tsc_at_capture,
        elapsed_at_plan_ns: plan.elapsed_ns.max(since_capture_ns),
        error_bound_ns: plan.error_bound.total_ns,
    });
    Ok(Armed { plan, put })
}
