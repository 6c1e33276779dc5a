//! The `PUT vm.clock` body ([`ClockPut`]) and its conversions to and from
//! the one [`ApplyRequest`] form.

use serde::{Deserialize, Serialize};

use crate::model::Pvti;
use crate::plan::Plan;
use crate::request::{ApplyRequest, ClockRequest, FollowVia};

/// The `kvmclock` member of a `PUT vm.clock` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmClockPut {
    /// Make kvm-clock follow this TSC-to-ns line: KVM_SET_CLOCK_GUEST where
    /// the kernel has it, else KVM_SET_CLOCK corrected in a loop inside the
    /// VMM until within `max_error_ns`.
    FollowPvti(FollowPvti),
    /// The raw KVM_SET_CLOCK.
    SetClock(SetClockPut),
}

/// The line kvm-clock must follow, and the error the VMM may stop at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowPvti {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
    pub max_error_ns: u64,
}

impl FollowPvti {
    /// The line as a [`Pvti`].
    pub fn pvti(&self) -> Pvti {
        Pvti {
            tsc_timestamp: self.tsc_timestamp,
            system_time: self.system_time,
            tsc_to_system_mul: self.tsc_to_system_mul,
            tsc_shift: self.tsc_shift,
            flags: self.flags,
        }
    }
}

/// `KVM_SET_CLOCK` as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetClockPut {
    pub clock: u64,
    pub realtime: u64,
    pub flags: u32,
}

/// The `PUT vm.clock` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockPut {
    /// Set the guest TSC rate first (`null`: leave it).
    pub tsc_khz: Option<u32>,
    /// One offset per vCPU, in vCPU order.
    pub tsc_offsets: Vec<i64>,
    /// What to do with kvm-clock (`null`: leave it to the VMM).
    pub kvmclock: Option<KvmClockPut>,
    /// An armed clock's checks ([`super::arm`]): required in the `clock` of
    /// `vm.restore` / `vm.receive-migration`, optional in a `PUT vm.clock`
    /// (checked when present). Absent from the JSON when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<super::arm::ArmCheck>,
}

impl ClockPut {
    /// The body that applies `plan`: the projection of the plan's one
    /// request ([`ApplyRequest::from_plan`]), so a VMM reached through the
    /// API is asked exactly what an in-process apply does. Whether the plan
    /// chose CLOCK_GUEST or the calibrated SET_CLOCK, the body says
    /// `follow_pvti` and the VMM picks the ioctl for its kernel.
    pub fn from_plan(plan: &Plan) -> ClockPut {
        ClockPut::from_request(&ApplyRequest::from_plan(plan))
    }

    /// The wire form of a request.
    pub fn from_request(request: &ApplyRequest) -> ClockPut {
        let kvmclock = match request.kvmclock {
            ClockRequest::Follow {
                pvti, max_error_ns, ..
            } => Some(KvmClockPut::FollowPvti(FollowPvti {
                tsc_timestamp: pvti.tsc_timestamp,
                system_time: pvti.system_time,
                tsc_to_system_mul: pvti.tsc_to_system_mul,
                tsc_shift: pvti.tsc_shift,
                flags: pvti.flags,
                max_error_ns,
            })),
            ClockRequest::Raw {
                clock_ns,
                realtime_ns,
                flags,
            } => Some(KvmClockPut::SetClock(SetClockPut {
                clock: clock_ns,
                realtime: realtime_ns,
                flags,
            })),
            ClockRequest::Leave => None,
        };
        ClockPut {
            tsc_khz: request.tsc_khz,
            tsc_offsets: request.tsc_offsets.clone(),
            kvmclock,
            arm: None,
        }
    }
}

/// A `PUT vm.clock` body as a request: `follow_pvti` -> [`FollowVia::Best`]
/// (the VMM's kernel decides the ioctl), `set_clock` ->
/// [`ClockRequest::Raw`], `null` -> [`ClockRequest::Leave`].
impl From<&ClockPut> for ApplyRequest {
    fn from(body: &ClockPut) -> Self {
        let kvmclock = match body.kvmclock {
            Some(KvmClockPut::FollowPvti(f)) => ClockRequest::Follow {
                pvti: f.pvti(),
                max_error_ns: f.max_error_ns,
                via: FollowVia::Best,
            },
            Some(KvmClockPut::SetClock(s)) => ClockRequest::Raw {
                clock_ns: s.clock,
                realtime_ns: s.realtime,
                flags: s.flags,
            },
            None => ClockRequest::Leave,
        };
        ApplyRequest {
            tsc_khz: body.tsc_khz,
            tsc_offsets: body.tsc_offsets.clone(),
            kvmclock,
        }
    }
}
