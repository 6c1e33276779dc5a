//! What an apply asks of a VM's clock: the one form every path reaches the
//! KVM layer in. A [`Plan`] becomes a request with [`ApplyRequest::from_plan`]
//! (in process), a `PUT vm.clock` body becomes one through
//! `vmclock_api` (over the API), and the wire body of a plan is the
//! request's projection (`ClockPut::from_request`): one conversion, so what
//! a plan asks is the same whether a VMM applies it in process or through
//! the API.
//!
//! kvm-clock's window: a request to follow a line is met when kvm-clock,
//! measured with KVM_GET_CLOCK's (clock, host_tsc) pair, lies between the
//! line and `max_error_ns` **above** it. Never below: a kvm-clock landing
//! under the source line could read less than the guest saw before the
//! blackout.

use crate::model::Pvti;
use crate::plan::{KvmClockAction, Plan};
use crate::validate::{self, FieldError};

/// |error| accepted after KVM_SET_CLOCK_GUEST, ns: the line is installed
/// exactly; KVM_GET_CLOCK's own conversion may truncate differently by 1 ns.
pub const CLOCK_GUEST_MAX_ERROR_NS: u64 = 1;

/// One apply: rate, offsets, kvm-clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyRequest {
    /// Set the guest TSC rate first (`None`: leave it).
    pub tsc_khz: Option<u32>,
    /// One offset per vCPU, in vCPU order.
    pub tsc_offsets: Vec<i64>,
    pub kvmclock: ClockRequest,
}

/// What to do with kvm-clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockRequest {
    /// Make kvm-clock follow `pvti`, by the means `via` says, landing within
    /// `[0, max_error_ns]` above the line (see the module doc).
    Follow {
        pvti: Pvti,
        max_error_ns: u64,
        via: FollowVia,
    },
    /// One KVM_SET_CLOCK as given (`set_clock`): no line to verify.
    Raw {
        clock_ns: u64,
        realtime_ns: u64,
        flags: u32,
    },
    /// Leave kvm-clock alone (`"kvmclock": null`): no clock call at all.
    Leave,
}

/// How [`ClockRequest::Follow`] sets the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FollowVia {
    /// KVM_SET_CLOCK_GUEST when the kernel has it, else the calibrated
    /// KVM_SET_CLOCK: what a `PUT vm.clock` `follow_pvti` means.
    #[default]
    Best,
    /// KVM_SET_CLOCK_GUEST (the plan found the destination has it).
    ClockGuest,
    /// The calibrated KVM_SET_CLOCK (the plan found no CLOCK_GUEST).
    SetClock,
}

/// Why a request cannot be applied to a VM; nothing was touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the request has {request} TSC offsets but the VM has {vm} vCPUs")]
    VcpuCountMismatch { request: usize, vm: usize },
    #[error(transparent)]
    Invalid(#[from] FieldError),
}

impl ApplyRequest {
    /// The request that applies `plan`: its rate, its offsets, kvm-clock on
    /// its line (exact with CLOCK_GUEST; else within `[0, max_error_ns]`
    /// above it, the plan's target).
    pub fn from_plan(plan: &Plan) -> ApplyRequest {
        let kvmclock = match plan.kvmclock {
            KvmClockAction::ClockGuest { pvti } => ClockRequest::Follow {
                pvti,
                max_error_ns: CLOCK_GUEST_MAX_ERROR_NS,
                via: FollowVia::ClockGuest,
            },
            KvmClockAction::SetClock {
                pvti, max_error_ns, ..
            } => ClockRequest::Follow {
                pvti,
                max_error_ns,
                via: FollowVia::SetClock,
            },
        };
        ApplyRequest {
            tsc_khz: plan.tsc_khz,
            tsc_offsets: plan.tsc_offsets.clone(),
            kvmclock,
        }
    }

    /// Everything that can be refused before the VM is touched: one offset
    /// per vCPU, a rate KVM can take, a line KVM can produce, raw flags.
    pub fn validate(&self, vcpu_count: usize) -> Result<(), RequestError> {
        if vcpu_count == 0 || self.tsc_offsets.len() != vcpu_count {
            return Err(RequestError::VcpuCountMismatch {
                request: self.tsc_offsets.len(),
                vm: vcpu_count,
            });
        }
        if let Some(khz) = self.tsc_khz {
            validate::tsc_khz("tsc_khz", khz)?;
        }
        match self.kvmclock {
            ClockRequest::Follow { pvti, .. } => {
                validate::pvti(&pvti).map_err(|e| e.under("kvmclock.follow_pvti"))?;
            }
            ClockRequest::Raw {
                flags, realtime_ns, ..
            } => validate::set_clock(flags, realtime_ns)
                .map_err(|e| e.under("kvmclock.set_clock"))?,
            ClockRequest::Leave => {}
        }
        Ok(())
    }
}
