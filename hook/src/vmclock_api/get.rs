//! The `GET vm.clock` answer on the wire ([`VmClockAnswer`]) and its
//! explicit conversion to and from the library's [`VmClock`]. The wire has
//! types of its own so that a change to the API can never change what a
//! sidecar (format v1, [`crate::sidecar`]) holds: the model types are the
//! sidecar's, and the API reaches them only through the conversions here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::text::{clip, quote_bytes};
use super::InvalidField;
use crate::model::{
    Capabilities, KvmClockSample, Pvti, PvtiSource, RunState, TscScaling, VcpuOffset, VmClock,
};
use crate::validate;

/// `state`: the VM's vCPUs run or are paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateAnswer {
    Running,
    Paused,
}

/// One `vcpus[]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuAnswer {
    pub id: u32,
    pub tsc_offset: i64,
}

/// `kvmclock`: one KVM_GET_CLOCK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmClockAnswer {
    pub clock: u64,
    pub flags: u32,
    pub realtime: u64,
    pub host_tsc: u64,
}

/// `pvti`: the guest-visible TSC-to-ns line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvtiAnswer {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
}

/// `pvti_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PvtiSourceAnswer {
    KernelClockGuest,
    GuestMemory,
    Derived,
}

/// `tsc_scaling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingAnswer {
    pub ratio: u64,
    pub frac_bits: u8,
}

/// `capabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesAnswer {
    /// The TSC offset attribute exists and writes to it take effect.
    pub tsc_offset: bool,
    pub clock_guest: bool,
    pub tsc_scaling: bool,
    pub adjust_clock: u32,
}

/// The `GET vm.clock` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmClockAnswer {
    pub state: StateAnswer,
    pub tsc_khz: u32,
    pub vcpus: Vec<VcpuAnswer>,
    pub kvmclock: KvmClockAnswer,
    pub pvti: Option<PvtiAnswer>,
    #[serde(default)]
    pub pvti_source: Option<PvtiSourceAnswer>,
    #[serde(default)]
    pub tsc_scaling: Option<ScalingAnswer>,
    pub capabilities: CapabilitiesAnswer,
}

impl From<VmClockAnswer> for VmClock {
    fn from(a: VmClockAnswer) -> VmClock {
        VmClock {
            state: match a.state {
                StateAnswer::Running => RunState::Running,
                StateAnswer::Paused => RunState::Paused,
            },
            tsc_khz: a.tsc_khz,
            vcpus: a
                .vcpus
                .iter()
                .map(|v| VcpuOffset {
                    id: v.id,
                    tsc_offset: v.tsc_offset,
                })
                .collect(),
            kvmclock: KvmClockSample {
                clock_ns: a.kvmclock.clock,
                flags: a.kvmclock.flags,
                realtime_ns: a.kvmclock.realtime,
                host_tsc: a.kvmclock.host_tsc,
            },
            pvti: a.pvti.map(|p| Pvti {
                tsc_timestamp: p.tsc_timestamp,
                system_time: p.system_time,
                tsc_to_system_mul: p.tsc_to_system_mul,
                tsc_shift: p.tsc_shift,
                flags: p.flags,
            }),
            pvti_source: a.pvti_source.map(|s| match s {
                PvtiSourceAnswer::KernelClockGuest => PvtiSource::KernelClockGuest,
                PvtiSourceAnswer::GuestMemory => PvtiSource::GuestMemory,
                PvtiSourceAnswer::Derived => PvtiSource::Derived,
            }),
            tsc_scaling: a.tsc_scaling.map(|s| TscScaling {
                ratio: s.ratio,
                frac_bits: s.frac_bits,
            }),
            capabilities: Capabilities {
                tsc_offset_effective: a.capabilities.tsc_offset,
                clock_guest: a.capabilities.clock_guest,
                tsc_scaling: a.capabilities.tsc_scaling,
                adjust_clock: a.capabilities.adjust_clock,
            },
        }
    }
}

impl From<&VmClock> for VmClockAnswer {
    fn from(c: &VmClock) -> VmClockAnswer {
        VmClockAnswer {
            state: match c.state {
                RunState::Running => StateAnswer::Running,
                RunState::Paused => StateAnswer::Paused,
            },
            tsc_khz: c.tsc_khz,
            vcpus: c
                .vcpus
                .iter()
                .map(|v| VcpuAnswer {
                    id: v.id,
                    tsc_offset: v.tsc_offset,
                })
                .collect(),
            kvmclock: KvmClockAnswer {
                clock: c.kvmclock.clock_ns,
                flags: c.kvmclock.flags,
                realtime: c.kvmclock.realtime_ns,
                host_tsc: c.kvmclock.host_tsc,
            },
            pvti: c.pvti.map(|p| PvtiAnswer {
                tsc_timestamp: p.tsc_timestamp,
                system_time: p.system_time,
                tsc_to_system_mul: p.tsc_to_system_mul,
                tsc_shift: p.tsc_shift,
                flags: p.flags,
            }),
            pvti_source: c.pvti_source.map(|s| match s {
                PvtiSource::KernelClockGuest => PvtiSourceAnswer::KernelClockGuest,
                PvtiSource::GuestMemory => PvtiSourceAnswer::GuestMemory,
                PvtiSource::Derived => PvtiSourceAnswer::Derived,
            }),
            tsc_scaling: c.tsc_scaling.map(|s| ScalingAnswer {
                ratio: s.ratio,
                frac_bits: s.frac_bits,
            }),
            capabilities: CapabilitiesAnswer {
                tsc_offset: c.capabilities.tsc_offset_effective,
                clock_guest: c.capabilities.clock_guest,
                tsc_scaling: c.capabilities.tsc_scaling,
                adjust_clock: c.capabilities.adjust_clock,
            },
        }
    }
}

/// The `GET vm.clock` body a VMM sends for `clock`.
pub fn vm_clock_json(clock: &VmClock) -> Result<String, serde_json::Error> {
    serde_json::to_string(&VmClockAnswer::from(clock))
}

/// The semantic checks on a `GET vm.clock` answer (types are checked by
/// parsing): the VM clock rules of [`crate::validate::vm_clock`].
pub fn validate_vm_clock(clock: &VmClock) -> Result<(), InvalidField> {
    validate::vm_clock(clock)
}

/// Parses and checks a `GET vm.clock` body.
pub fn parse_vm_clock(body: &[u8]) -> Result<VmClock, InvalidField> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| InvalidField::new(".", format!("is not JSON ({e}): {}", quote_bytes(body))))?;
    if !value.is_object() {
        return Err(InvalidField::new(".", "is not a JSON object"));
    }
    let answer: VmClockAnswer = serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { ".".to_string() } else { path };
        InvalidField::new(
            field,
            format!("is not acceptable: {}", clip(&err.inner().to_string())),
        )
    })?;
    let clock = VmClock::from(answer);
    validate_vm_clock(&clock)?;
    Ok(clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KVM_CLOCK_HOST_TSC;

    /// The conversions lose nothing, both ways.
    #[test]
    fn answer_and_model_convert_losslessly() {
        let clock = VmClock {
            state: RunState::Paused,
            tsc_khz: 2_445_411,
            vcpus: vec![
                VcpuOffset {
                    id: 0,
                    tsc_offset: -5,
                },
                VcpuOffset {
                    id: 1,
                    tsc_offset: i64::MIN,
                },
            ],
            kvmclock: KvmClockSample {
                clock_ns: 1,
                flags: KVM_CLOCK_HOST_TSC,
                realtime_ns: 2,
                host_tsc: 3,
            },
            pvti: Some(Pvti {
                tsc_timestamp: 4,
                system_time: 5,
                tsc_to_system_mul: 6,
                tsc_shift: -1,
                flags: 1,
            }),
            pvti_source: Some(PvtiSource::GuestMemory),
            tsc_scaling: Some(TscScaling {
                ratio: 7,
                frac_bits: 48,
            }),
            capabilities: Capabilities {
                tsc_offset_effective: true,
                clock_guest: false,
                tsc_scaling: true,
                adjust_clock: 14,
            },
        };
        let answer = VmClockAnswer::from(&clock);
        assert_eq!(VmClock::from(answer), clock);
        let text = vm_clock_json(&clock).unwrap();
        assert_eq!(parse_vm_clock(text.as_bytes()).unwrap(), clock);
        assert!(text.contains(r#""tsc_offset":true"#), "{text}");
    }
}
