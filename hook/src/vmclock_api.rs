//! The vm.clock API's wire types, shared by the client (`api`, feature
//! `http`) and by any VMM implementing the endpoint: the `PUT` body
//! ([`ClockPut`]), its answer ([`PutAnswer`]), and the checks on a `GET`
//! answer ([`validate_vm_clock`], [`parse_vm_clock`]). No HTTP dependency:
//! a VMM links these with `default-features = false`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Pvti, VmClock};
use crate::plan::{KvmClockAction, Plan};
use crate::sidecar::{MAX_TSC_KHZ, MAX_VCPUS};

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
    /// The body that applies `plan`: its rate, its offsets, and kvm-clock
    /// following the plan's line (whether the plan chose CLOCK_GUEST or a
    /// calibrated SET_CLOCK, the VMM picks the ioctl and runs the loop).
    pub fn from_plan(plan: &Plan, max_error_ns: u64) -> ClockPut {
        let pvti = plan.kvmclock.pvti();
        let max_error_ns = match plan.kvmclock {
            KvmClockAction::SetClock { max_error_ns, .. } => max_error_ns,
            KvmClockAction::ClockGuest { .. } => max_error_ns,
        };
        ClockPut {
            tsc_khz: plan.tsc_khz,
            tsc_offsets: plan.tsc_offsets.clone(),
            kvmclock: Some(KvmClockPut::FollowPvti(FollowPvti {
                tsc_timestamp: pvti.tsc_timestamp,
                system_time: pvti.system_time,
                tsc_to_system_mul: pvti.tsc_to_system_mul,
                tsc_shift: pvti.tsc_shift,
                flags: pvti.flags,
                max_error_ns,
            })),
        }
    }
}

/// What the VMM answered to a successful `PUT vm.clock`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PutAnswer {
    pub status: u16,
    /// The answer's JSON body (`None` for an empty body, e.g. 204).
    pub body: Option<Value>,
}

impl PutAnswer {
    /// The kvm-clock error the VMM says it reached, in ns, if it says so.
    /// Looks for `kvmclock_error_ns`, then `kvmclock.error_ns`, then
    /// `kvmclock.outcome.error_ns`.
    pub fn kvmclock_error_ns(&self) -> Option<i64> {
        let body = self.body.as_ref()?;
        let paths: [&[&str]; 4] = [
            &["kvmclock_error_ns"],
            &["kvmclock", "error_ns"],
            &["kvmclock", "outcome", "error_ns"],
            &["kvmclock", "error_reached_ns"],
        ];
        paths.iter().find_map(|path| {
            let mut v = body;
            for key in *path {
                v = v.get(key)?;
            }
            v.as_i64()
        })
    }

    /// How the VMM says it set kvm-clock (`clock_guest`, `set_clock`,
    /// `none`): `kvmclock_method`, else `kvmclock.method`.
    pub fn kvmclock_method(&self) -> Option<String> {
        let body = self.body.as_ref()?;
        body.get("kvmclock_method")
            .or_else(|| body.get("kvmclock").and_then(|k| k.get("method")))
            .and_then(Value::as_str)
            .map(clip)
    }

    /// Whether the VMM says the offsets took effect (`tsc_offsets_effective`).
    pub fn tsc_offsets_effective(&self) -> Option<bool> {
        self.body
            .as_ref()?
            .get("tsc_offsets_effective")
            .and_then(Value::as_bool)
    }

    /// Strings the VMM lists as refused by the kernel (`refused`), if any.
    pub fn refused(&self) -> Vec<String> {
        let Some(list) = self.body.as_ref().and_then(|b| b.get("refused")) else {
            return Vec::new();
        };
        match list {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => clip(s),
                    other => clip(&other.to_string()),
                })
                .collect(),
            Value::Null => Vec::new(),
            other => vec![clip(&other.to_string())],
        }
    }
}

/// A field of a `GET vm.clock` answer that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {reason}")]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The semantic checks on a `GET vm.clock` answer (types are checked by
/// parsing): 1 to [`MAX_VCPUS`] vCPUs with unique ids, a TSC rate of 1 kHz
/// to [`MAX_TSC_KHZ`], a PVTI with a non-zero multiplier and a shift KVM can
/// produce, a PVTI source exactly when there is a PVTI, a sane scaling ratio.
pub fn validate_vm_clock(clock: &VmClock) -> Result<(), InvalidField> {
    let count = clock.vcpus.len();
    if count == 0 {
        return Err(invalid("vcpus", "is empty: a VM has at least one vCPU"));
    }
    if count > usize::try_from(MAX_VCPUS).unwrap_or(usize::MAX) {
        return Err(invalid(
            "vcpus",
            format!("lists {count} vCPUs; at most {MAX_VCPUS} are accepted"),
        ));
    }
    let mut ids: Vec<u32> = clock.vcpus.iter().map(|v| v.id).collect();
    ids.sort_unstable();
    if let Some(dup) = ids.windows(2).find_map(|w| match w {
        [a, b] if a == b => Some(*a),
        _ => None,
    }) {
        return Err(invalid(
            "vcpus",
            format!("lists vCPU id {dup} more than once"),
        ));
    }
    if clock.tsc_khz == 0 {
        return Err(invalid("tsc_khz", "is 0: a TSC rate of zero is impossible"));
    }
    if clock.tsc_khz > MAX_TSC_KHZ {
        return Err(invalid(
            "tsc_khz",
            format!(
                "is {} kHz; at most {MAX_TSC_KHZ} kHz is accepted",
                clock.tsc_khz
            ),
        ));
    }
    if let Some(pvti) = &clock.pvti {
        if pvti.tsc_to_system_mul == 0 {
            return Err(invalid(
                "pvti.tsc_to_system_mul",
                "is 0: the TSC-to-ns line would be flat",
            ));
        }
        if !(-32..=32).contains(&pvti.tsc_shift) {
            return Err(invalid(
                "pvti.tsc_shift",
                format!("is {}; KVM produces shifts in -32..=32", pvti.tsc_shift),
            ));
        }
    }
    match (clock.pvti.is_some(), clock.pvti_source.is_some()) {
        (true, false) => {
            return Err(invalid(
                "pvti_source",
                "is absent although pvti is present: the VMM must say where the PVTI came from",
            ))
        }
        (false, true) => return Err(invalid("pvti_source", "is present although pvti is absent")),
        _ => {}
    }
    if let Some(scaling) = &clock.tsc_scaling {
        if scaling.frac_bits != 32 && scaling.frac_bits != 48 {
            return Err(invalid(
                "tsc_scaling.frac_bits",
                format!(
                    "is {}; hardware uses 48 (Intel VMX) or 32 (AMD SVM)",
                    scaling.frac_bits
                ),
            ));
        }
        if scaling.ratio == 0 {
            return Err(invalid("tsc_scaling.ratio", "is 0"));
        }
    }
    Ok(())
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
