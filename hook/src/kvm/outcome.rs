//! What an apply did ([`ApplyReport`]), the step it failed at
//! ([`ApplyStep`]), what its rollback put back ([`RollbackReport`]) and why
//! it failed ([`ApplyError`]). Data only; the steps are in [`super::apply`].

use std::fmt;

use serde::Serialize;

use super::KvmError;

/// The step of [`apply`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyStep {
    /// KVM_GET/SET_TSC_KHZ.
    Frequency,
    /// Reading or writing the TSC offset of this vCPU.
    Offset {
        vcpu: u32,
    },
    ClockGuest,
    SetClock,
    KvmclockCtrl,
    /// Reading the offsets back, or finding them different from the plan.
    Verify,
}

impl fmt::Display for ApplyStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyStep::Frequency => f.write_str("frequency"),
            ApplyStep::Offset { vcpu } => write!(f, "TSC offset of vCPU {vcpu}"),
            ApplyStep::ClockGuest => f.write_str("KVM_SET_CLOCK_GUEST"),
            ApplyStep::SetClock => f.write_str("KVM_SET_CLOCK"),
            ApplyStep::KvmclockCtrl => f.write_str("KVMCLOCK_CTRL"),
            ApplyStep::Verify => f.write_str("verify"),
        }
    }
}

/// One step done, and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// `read_offsets`, `frequency`, `offsets`, `clock_guest`, `set_clock`,
    /// `kvmclock_ctrl`, `verify`.
    pub name: &'static str,
    pub duration_ns: u64,
}

/// A call the kernel refused that apply tolerates (KVMCLOCK_CTRL's EINVAL
/// on a vCPU without a kvm-clock page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub step: ApplyStep,
    pub vcpu: Option<u32>,
    pub ioctl: &'static str,
    pub errno: i32,
}

/// How kvm-clock was set and how close it came to the plan's line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmclockOutcome {
    /// `clock_guest` or `set_clock`.
    pub method: &'static str,
    /// kvm-clock minus the plan's PVTI line, at the same instant, after the
    /// last call (KVM_GET_CLOCK's (clock, host_tsc) pair), ns. `None` when
    /// KVM_GET_CLOCK gave no host_tsc (not in master-clock mode).
    pub error_ns: Option<i64>,
    /// KVM_SET_CLOCK calls made (1 for CLOCK_GUEST).
    pub tries: u32,
    /// The error after each call, ns.
    pub try_errors_ns: Vec<i64>,
    /// The target of the loop (the plan's `max_error_ns`;
    /// [`CLOCK_GUEST_MAX_ERROR_NS`] for CLOCK_GUEST).
    pub max_error_ns: u64,
    /// `|error_ns| <= max_error_ns`.
    pub within_max_error: bool,
    /// vCPU 0's offset read back after the offsets step: the guest TSC the
    /// line was aimed at (differs from the plan where offsets are inert).
    pub aimed_with_offset_cycles: i64,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ApplyReport {
    pub steps: Vec<StepRecord>,
    /// The TSC rate set on every vCPU (`None`: unchanged).
    pub frequency_set_khz: Option<u32>,
    /// Each vCPU's offset before apply.
    pub previous_offsets: Vec<i64>,
    /// Each vCPU's offset read back at the end.
    pub offsets_read_back: Vec<i64>,
    /// The plan's offsets are in effect (false when the probe found offset
    /// writes inert, even if the values happen to match).
    pub tsc_offsets_effective: bool,
    pub kvmclock: Option<KvmclockOutcome>,
    /// Calls the kernel refused that apply tolerated.
    pub refused: Vec<Refusal>,
    pub total_ns: u64,
}

impl ApplyReport {
    /// Duration of the step named `name`, ns.
    pub fn step_ns(&self, name: &str) -> Option<u64> {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.duration_ns)
    }
}

/// What the rollback after a failure did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RollbackReport {
    /// vCPUs whose previous TSC rate was written back.
    pub frequency_restored_vcpus: u32,
    /// vCPUs whose previous offset was written back.
    pub offsets_restored_vcpus: u32,
    /// kvm-clock was re-aimed at its previous line (`None`: it was not touched).
    pub clock_restored: Option<bool>,
    /// Rollback calls that failed.
    pub failures: Vec<String>,
}

impl fmt::Display for RollbackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures.is_empty() {
            write!(
                f,
                "rollback complete ({} offsets, {} frequencies{})",
                self.offsets_restored_vcpus,
                self.frequency_restored_vcpus,
                if self.clock_restored.is_some() {
                    ", kvm-clock"
                } else {
                    ""
                }
            )
        } else {
            write!(f, "rollback left undone: {}", self.failures.join("; "))
        }
    }
}

/// Why [`apply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the plan has {plan} TSC offsets but the VM has {vm} vCPUs; nothing was touched")]
    VcpuCountMismatch { plan: usize, vm: usize },
    #[error("request field {field} refused: {reason}; nothing was touched")]
    InvalidPlan { field: String, reason: String },
    #[error("apply failed at {step}: {source}; {rollback}")]
    Failed {
        step: ApplyStep,
        source: KvmError,
        rollback: RollbackReport,
        /// What had been done before the failure.
        report: Box<ApplyReport>,
    },
}

impl ApplyError {
    /// The failing step (`None` when the plan was refused up front).
    pub fn step(&self) -> Option<ApplyStep> {
        match self {
            ApplyError::Failed { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// The rollback report (`None` when nothing was touched).
    pub fn rollback(&self) -> Option<&RollbackReport> {
        match self {
            ApplyError::Failed { rollback, .. } => Some(rollback),
            _ => None,
        }
    }
}
