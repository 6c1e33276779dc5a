//! The vm.clock API's wire types, shared by the client (`api`, feature
//! `http`) and by any VMM implementing the endpoint: the `PUT` body
//! ([`ClockPut`]), its answer ([`PutAnswer`]), and the checks on a `GET`
//! answer ([`validate_vm_clock`], [`parse_vm_clock`]). No HTTP dependency:
//! a VMM links these with `default-features = false`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Pvti, VmClock};
use crate::plan::Plan;
use crate::request::{ApplyRequest, ClockRequest, FollowVia};
use crate::validate;
pub use crate::validate::{FieldError as InvalidField, MAX_TSC_KHZ, MAX_VCPUS};

/// The endpoint, under the VMM's API root.
pub const VM_CLOCK_ENDPOINT: &str = "/api/v1/vm.clock";
/// Longest piece of a response quoted back in an error, in bytes.
const MAX_QUOTED_BYTES: usize = 300;

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

/// How a `PUT vm.clock` ended, as the VMM states it in its reply: the one
/// thing a client decides on (never the reply's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutOutcome {
    /// Everything asked was applied (200, [`PutApplied`]).
    Applied,
    /// The body cannot be applied to this VM; nothing was touched (400).
    Refused,
    /// The VM is not in a state that takes a clock (running, or its vCPUs
    /// ran since the restore); nothing was touched (500).
    WrongState,
    /// A step failed and everything done before it was put back (500).
    RolledBack,
    /// A step failed and putting things back failed too: the clock state
    /// is unknown (500). Do not resume the VM.
    RollbackIncomplete,
}

/// The answer to a `PUT vm.clock` that applied (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutApplied {
    /// [`PutOutcome::Applied`].
    pub outcome: PutOutcome,
    /// What was asked: `follow_pvti`, `set_clock` or `none`.
    pub kvmclock_request: String,
    /// How kvm-clock was set: `clock_guest`, `set_clock` or `none`.
    pub kvmclock_method: String,
    /// kvm-clock minus the requested line after the last call, ns, from
    /// KVM_GET_CLOCK's pair (`follow_pvti` only).
    pub kvmclock_error_ns: Option<i64>,
    /// The error lies in the request's window `[0, max_error_ns]` above the
    /// line (`follow_pvti` only).
    pub kvmclock_within_target: Option<bool>,
    pub kvmclock_tries: u32,
    /// The TSC rate set (`None`: unchanged).
    pub tsc_khz_set: Option<u32>,
    pub tsc_offsets_applied: Vec<i64>,
    pub tsc_offsets_read_back: Vec<i64>,
    /// False where the kernel ignores offset writes.
    pub tsc_offsets_effective: bool,
    /// Calls the kernel refused that were tolerated (e.g. KVMCLOCK_CTRL's
    /// EINVAL), one line each.
    pub refused: Vec<String>,
}

/// One step of a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackStep {
    /// `frequency`, `offsets` or `kvmclock`.
    pub step: String,
    /// The step's previous state is back.
    pub ok: bool,
    /// What was put back, or why it could not be.
    pub detail: String,
}

/// What the VMM did to undo a failed apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOutcome {
    /// Every step that had changed something is back as it was.
    pub complete: bool,
    pub steps: Vec<RollbackStep>,
}

/// The answer to a `PUT vm.clock` that did not apply (HTTP 4xx/5xx): the
/// outcome, Cloud Hypervisor's error chain for people, the step that failed
/// and the rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFailure {
    pub outcome: PutOutcome,
    /// The error chain, outermost first (for people; never parsed).
    pub messages: Vec<String>,
    /// The step that failed (`rolled_back` / `rollback_incomplete`).
    pub failed_step: Option<String>,
    /// What was undone (`rolled_back` / `rollback_incomplete`).
    pub rollback: Option<RollbackOutcome>,
}

impl PutFailure {
    /// A failure that touched nothing.
    pub fn untouched(outcome: PutOutcome, messages: Vec<String>) -> PutFailure {
        PutFailure {
            outcome,
            messages,
            failed_step: None,
            rollback: None,
        }
    }

    /// The status a VMM answers it with: 400 for a refused body, 500 else.
    pub fn status(&self) -> u16 {
        match self.outcome {
            PutOutcome::Refused => 400,
            _ => 500,
        }
    }
}

/// The apply's rollback report as the wire's, per step.
#[cfg(feature = "kvm")]
impl From<&crate::kvm::RollbackReport> for RollbackOutcome {
    fn from(r: &crate::kvm::RollbackReport) -> RollbackOutcome {
        let mut steps = Vec::new();
        if r.frequency_restored_vcpus > 0 {
            steps.push(RollbackStep {
                step: "frequency".into(),
                ok: true,
                detail: format!("rate restored on {} vCPUs", r.frequency_restored_vcpus),
            });
        }
        if r.offsets_restored_vcpus > 0 {
            steps.push(RollbackStep {
                step: "offsets".into(),
                ok: true,
                detail: format!("offsets restored on {} vCPUs", r.offsets_restored_vcpus),
            });
        }
        if let Some(ok) = r.clock_restored {
            steps.push(RollbackStep {
                step: "kvmclock".into(),
                ok,
                detail: if ok {
                    "kvm-clock set back to its previous reading".into()
                } else {
                    "kvm-clock could not be set back".into()
                },
            });
        }
        for f in &r.failures {
            steps.push(RollbackStep {
                step: "failure".into(),
                ok: false,
                detail: clip(f),
            });
        }
        RollbackOutcome {
            complete: r.failures.is_empty(),
            steps,
        }
    }
}

/// What the VMM answered to a successful `PUT vm.clock`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PutAnswer {
    pub status: u16,
    /// The typed reply (`None` for an empty body, e.g. 204, from a VMM that
    /// reports nothing).
    pub reply: Option<PutApplied>,
    /// The answer's JSON body as it came.
    pub body: Option<Value>,
}

impl PutAnswer {
    /// The kvm-clock error the VMM says it reached, in ns.
    pub fn kvmclock_error_ns(&self) -> Option<i64> {
        self.reply.as_ref()?.kvmclock_error_ns
    }

    /// How the VMM says it set kvm-clock (`clock_guest`, `set_clock`, `none`).
    pub fn kvmclock_method(&self) -> Option<String> {
        self.reply.as_ref().map(|r| clip(&r.kvmclock_method))
    }

    /// Whether the VMM says the offsets took effect.
    pub fn tsc_offsets_effective(&self) -> Option<bool> {
        self.reply.as_ref().map(|r| r.tsc_offsets_effective)
    }

    /// Calls the VMM says the kernel refused (and it tolerated).
    pub fn refused(&self) -> Vec<String> {
        self.reply
            .as_ref()
            .map(|r| r.refused.iter().map(|s| clip(s)).collect())
            .unwrap_or_default()
    }
}

/// Parses a 2xx `PUT vm.clock` body: empty (a VMM reporting nothing) or a
/// [`PutApplied`] whose outcome is `applied`.
pub fn parse_put_applied(body: &[u8]) -> Result<(Option<PutApplied>, Option<Value>), InvalidField> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((None, None));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(".", format!("is not JSON ({e}): {}", quote_bytes(body))))?;
    let reply: PutApplied = serde_path_to_error::deserialize(value.clone()).map_err(|err| {
        invalid(
            err.path().to_string(),
            format!("is not acceptable: {}", clip(&err.inner().to_string())),
        )
    })?;
    if reply.outcome != PutOutcome::Applied {
        return Err(invalid(
            "outcome",
            format!("is {:?} in a success answer", reply.outcome),
        ));
    }
    Ok((Some(reply), Some(value)))
}

/// Parses a non-2xx `PUT vm.clock` body as a [`PutFailure`]; `None` when it
/// is not one (a VMM without typed failures, or an error from its HTTP
/// layer), which a client must treat as "unknown what happened" unless a
/// read-back shows nothing changed.
pub fn parse_put_failure(body: &[u8]) -> Option<PutFailure> {
    let failure: PutFailure = serde_json::from_slice(body).ok()?;
    (failure.outcome != PutOutcome::Applied).then_some(failure)
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidField {
    InvalidField::new(field, reason)
}

/// The semantic checks on a `GET vm.clock` answer (types are checked by
/// parsing): the VM clock rules of [`crate::validate::vm_clock`].
pub fn validate_vm_clock(clock: &VmClock) -> Result<(), InvalidField> {
    validate::vm_clock(clock)
}

/// Parses and checks a `GET vm.clock` body.
pub fn parse_vm_clock(body: &[u8]) -> Result<VmClock, InvalidField> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(".", format!("is not JSON ({e}): {}", quote_bytes(body))))?;
    if !value.is_object() {
        return Err(invalid(".", "is not a JSON object"));
    }
    let clock: VmClock = serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { ".".to_string() } else { path };
        invalid(
            field,
            format!("is not acceptable: {}", clip(&err.inner().to_string())),
        )
    })?;
    validate_vm_clock(&clock)?;
    Ok(clock)
}

/// The error strings of a VMM error body: a JSON array of strings (Cloud
/// Hypervisor), a JSON string, or else the text itself (clipped).
pub fn error_messages(body: &[u8]) -> Vec<String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    if let Some(f) = parse_put_failure(body) {
        return f.messages.iter().map(|m| clip(m)).collect();
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => clip(s),
                other => clip(&other.to_string()),
            })
            .collect(),
        Ok(Value::String(s)) => vec![clip(&s)],
        Ok(other) => vec![clip(&other.to_string())],
        Err(_) => vec![quote_bytes(body)],
    }
}

/// At most [`MAX_QUOTED_BYTES`] of `s`, cut on a character boundary, with
/// control characters replaced.
pub(crate) fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_QUOTED_BYTES);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    let head: String = s
        .get(..end)
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if end < s.len() {
        format!("{head}...")
    } else {
        head
    }
}

pub(crate) fn quote_bytes(body: &[u8]) -> String {
    format!("{:?}", clip(&String::from_utf8_lossy(body)))
}
