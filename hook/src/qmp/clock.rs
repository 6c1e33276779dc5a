//! `x-query-guest-clock` / `x-set-guest-clock` (the qemu-patch series) as
//! the library's [`VmClock`] and [`ClockPut`].
//!
//! QMP names are kebab-case and its optional members are absent rather
//! than `null`; apart from that the two commands carry exactly what `GET` /
//! `PUT vm.clock` carry, and an answer goes through the same
//! [`validate_vm_clock`] checks. Unknown members are ignored, as QMP asks of
//! clients (QEMU adds members in later versions).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{QmpError, QmpSession};
use crate::model::{Capabilities, KvmClockSample, Pvti, PvtiSource, RunState, VcpuOffset, VmClock};
use crate::vmclock_api::text::clip;
use crate::vmclock_api::{
    validate_vm_clock, ClockPut, KvmClockPut, PutAnswer, PutApplied, PutFailure, PutOutcome,
};

/// The read command.
pub const QUERY_COMMAND: &str = "x-query-guest-clock";
/// The write command.
pub const SET_COMMAND: &str = "x-set-guest-clock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum QmpState {
    Running,
    Paused,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QmpVcpu {
    id: u32,
    tsc_offset: i64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QmpKvmclock {
    clock: u64,
    flags: u32,
    realtime: u64,
    host_tsc: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QmpPvti {
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum QmpPvtiSource {
    KernelClockGuest,
    GuestMemory,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QmpCapabilities {
    tsc_offset: bool,
    clock_guest: bool,
    tsc_scaling: bool,
    adjust_clock: u32,
}

/// `GuestClockSetOutcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpSetOutcome {
    Applied,
    Refused,
    WrongState,
    RolledBack,
    RollbackIncomplete,
}

impl From<QmpSetOutcome> for PutOutcome {
    fn from(o: QmpSetOutcome) -> PutOutcome {
        match o {
            QmpSetOutcome::Applied => PutOutcome::Applied,
            QmpSetOutcome::Refused => PutOutcome::Refused,
            QmpSetOutcome::WrongState => PutOutcome::WrongState,
            QmpSetOutcome::RolledBack => PutOutcome::RolledBack,
            QmpSetOutcome::RollbackIncomplete => PutOutcome::RollbackIncomplete,
        }
    }
}

/// `GuestClock`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QmpGuestClock {
    state: QmpState,
    tsc_khz: u32,
    vcpus: Vec<QmpVcpu>,
    kvmclock: QmpKvmclock,
    #[serde(default)]
    pvti: Option<QmpPvti>,
    #[serde(default)]
    pvti_source: Option<QmpPvtiSource>,
    capabilities: QmpCapabilities,
    settable: bool,
    #[serde(default)]
    last_set: Option<QmpSetOutcome>,
    #[serde(default)]
    last_set_failed_step: Option<String>,
}

/// What `x-query-guest-clock` said beyond the [`VmClock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryExtras {
    /// `x-set-guest-clock` is allowed now.
    pub settable: bool,
    /// How the last `x-set-guest-clock` ended.
    pub last_set: Option<QmpSetOutcome>,
    pub last_set_failed_step: Option<String>,
}

/// Parses and checks an `x-query-guest-clock` answer (its `return`).
pub fn parse_guest_clock(value: &Value) -> Result<(VmClock, QueryExtras), String> {
    let answer: QmpGuestClock = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| format!("`{}` {}", e.path(), clip(&e.inner().to_string())))?;
    if answer.pvti.is_some() != answer.pvti_source.is_some() {
        return Err("`pvti` and `pvti-source` must come together".into());
    }
    let clock = VmClock {
        state: match answer.state {
            QmpState::Running => RunState::Running,
            QmpState::Paused => RunState::Paused,
        },
        tsc_khz: answer.tsc_khz,
        vcpus: answer
            .vcpus
            .iter()
            .map(|v| VcpuOffset {
                id: v.id,
                tsc_offset: v.tsc_offset,
            })
            .collect(),
        kvmclock: KvmClockSample {
            clock_ns: answer.kvmclock.clock,
            flags: answer.kvmclock.flags,
            realtime_ns: answer.kvmclock.realtime,
            host_tsc: answer.kvmclock.host_tsc,
        },
        pvti: answer.pvti.map(|p| Pvti {
            tsc_timestamp: p.tsc_timestamp,
            system_time: p.system_time,
            tsc_to_system_mul: p.tsc_to_system_mul,
            tsc_shift: p.tsc_shift,
            flags: p.flags,
        }),
        pvti_source: answer.pvti_source.map(|s| match s {
            QmpPvtiSource::KernelClockGuest => PvtiSource::KernelClockGuest,
            QmpPvtiSource::GuestMemory => PvtiSource::GuestMemory,
        }),
        tsc_scaling: None,
        capabilities: Capabilities {
            tsc_offset_effective: answer.capabilities.tsc_offset,
            clock_guest: answer.capabilities.clock_guest,
            tsc_scaling: answer.capabilities.tsc_scaling,
            adjust_clock: answer.capabilities.adjust_clock,
        },
    };
    validate_vm_clock(&clock).map_err(|e| e.to_string())?;
    let extras = QueryExtras {
        settable: answer.settable,
        last_set: answer.last_set,
        last_set_failed_step: answer.last_set_failed_step.as_deref().map(clip),
    };
    Ok((clock, extras))
}

/// `x-query-guest-clock` on an open session.
pub fn query(session: &mut QmpSession) -> Result<(VmClock, QueryExtras), QmpError> {
    session.require(QUERY_COMMAND)?;
    let value = session.execute(QUERY_COMMAND, None)?;
    parse_guest_clock(&value).map_err(|reason| QmpError::BadAnswer {
        command: QUERY_COMMAND.into(),
        reason,
    })
}

/// The `x-set-guest-clock` arguments for `put`. An armed clock (`put.arm`)
/// has no QMP form: the series applies a clock only through this command.
pub fn set_arguments(put: &ClockPut) -> Result<Value, String> {
    if put.arm.is_some() {
        return Err("an armed clock (`arm`) has no QMP form in the qemu-patch series".into());
    }
    let mut args = serde_json::json!({ "tsc-offsets": put.tsc_offsets });
    if let Some(khz) = put.tsc_khz {
        args["tsc-khz"] = Value::from(khz);
    }
    match put.kvmclock {
        None => {}
        Some(KvmClockPut::FollowPvti(f)) => {
            args["kvmclock"] = serde_json::json!({
                "method": "follow-pvti",
                "tsc-timestamp": f.tsc_timestamp,
                "system-time": f.system_time,
                "tsc-to-system-mul": f.tsc_to_system_mul,
                "tsc-shift": f.tsc_shift,
                "flags": f.flags,
                "max-error-ns": f.max_error_ns,
            });
        }
        Some(KvmClockPut::SetClock(c)) => {
            args["kvmclock"] = serde_json::json!({
                "method": "set-clock",
                "clock": c.clock,
                "realtime": c.realtime,
                "flags": c.flags,
            });
        }
    }
    Ok(args)
}

/// `GuestClockSetResult`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct QmpSetResult {
    kvmclock_request: String,
    kvmclock_method: String,
    #[serde(default)]
    kvmclock_error_ns: Option<i64>,
    #[serde(default)]
    kvmclock_within_target: Option<bool>,
    kvmclock_tries: u32,
    #[serde(default)]
    tsc_khz_set: Option<u32>,
    tsc_offsets_applied: Vec<i64>,
    tsc_offsets_read_back: Vec<i64>,
    tsc_offsets_effective: bool,
    refused: Vec<String>,
}

/// The API's names for what the series spells in kebab-case.
fn api_name(qmp: &str) -> String {
    clip(&qmp.replace('-', "_"))
}

/// Parses an `x-set-guest-clock` answer (its `return`) as the API's
/// [`PutAnswer`], checked against the request.
pub fn parse_set_result(value: &Value, put: &ClockPut) -> Result<PutAnswer, String> {
    let r: QmpSetResult = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| format!("`{}` {}", e.path(), clip(&e.inner().to_string())))?;
    if r.tsc_offsets_applied != put.tsc_offsets {
        return Err("`tsc-offsets-applied` differs from the offsets sent".into());
    }
    if r.tsc_offsets_read_back.len() != put.tsc_offsets.len() {
        return Err(format!(
            "`tsc-offsets-read-back` has {} entries for {} vCPUs",
            r.tsc_offsets_read_back.len(),
            put.tsc_offsets.len()
        ));
    }
    let applied = PutApplied {
        outcome: PutOutcome::Applied,
        kvmclock_request: api_name(&r.kvmclock_request),
        kvmclock_method: api_name(&r.kvmclock_method),
        kvmclock_error_ns: r.kvmclock_error_ns,
        kvmclock_within_target: r.kvmclock_within_target,
        kvmclock_tries: r.kvmclock_tries,
        tsc_khz_set: r.tsc_khz_set,
        tsc_offsets_applied: r.tsc_offsets_applied,
        tsc_offsets_read_back: r.tsc_offsets_read_back,
        tsc_offsets_effective: r.tsc_offsets_effective,
        refused: r.refused.iter().map(|s| clip(s)).collect(),
    };
    Ok(PutAnswer {
        status: 200,
        reply: Some(applied),
        body: Some(value.clone()),
    })
}

/// How an `x-set-guest-clock` failed.
#[derive(Debug)]
pub struct SetFailure {
    pub error: QmpError,
    /// The outcome QEMU recorded (`x-query-guest-clock`'s `last-set`, read
    /// right after the error), when it could be read.
    pub failure: Option<PutFailure>,
}

/// `x-set-guest-clock` on an open session. On an error answer the outcome
/// is read back from `x-query-guest-clock` (`last-set`), so that the
/// decision rests on QEMU's typed outcome, never on its error text.
pub fn set(session: &mut QmpSession, put: &ClockPut) -> Result<PutAnswer, Box<SetFailure>> {
    let fail = |error: QmpError| {
        Box::new(SetFailure {
            error,
            failure: None,
        })
    };
    session.require(SET_COMMAND).map_err(fail)?;
    let args = set_arguments(put).map_err(|reason| {
        fail(QmpError::BadAnswer {
            command: SET_COMMAND.into(),
            reason,
        })
    })?;
    match session.execute(SET_COMMAND, Some(args)) {
        Ok(value) => parse_set_result(&value, put).map_err(|reason| {
            fail(QmpError::BadAnswer {
                command: SET_COMMAND.into(),
                reason,
            })
        }),
        Err(error @ QmpError::Command { .. }) => {
            let desc = error.to_string();
            let failure = query(session).ok().and_then(|(_, extras)| {
                extras
                    .last_set
                    .filter(|o| *o != QmpSetOutcome::Applied)
                    .map(|o| PutFailure {
                        outcome: o.into(),
                        messages: vec![desc.clone()],
                        failed_step: extras.last_set_failed_step.clone(),
                        rollback: None,
                    })
            });
            Err(Box::new(SetFailure { error, failure }))
        }
        Err(error) => Err(fail(error)),
    }
}
