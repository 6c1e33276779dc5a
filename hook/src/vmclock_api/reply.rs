//! The typed answers to `PUT vm.clock`: [`PutApplied`] (200) and
//! [`PutFailure`] (every 4xx/5xx), with the [`PutOutcome`] a client decides
//! on. A VMM emits them, a client reads them; neither parses the other's
//! error text.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::text::{clip, quote_bytes};
use super::InvalidField;

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
        .map_err(|e| InvalidField::new(".", format!("is not JSON ({e}): {}", quote_bytes(body))))?;
    let reply: PutApplied = serde_path_to_error::deserialize(value.clone()).map_err(|err| {
        InvalidField::new(
            err.path().to_string(),
            format!("is not acceptable: {}", clip(&err.inner().to_string())),
        )
    })?;
    if reply.outcome != PutOutcome::Applied {
        return Err(InvalidField::new(
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
