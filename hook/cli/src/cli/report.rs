//! The restore report: what `clockcarry restore` decided and did, in one
//! serialisable value (the `--json` output).
//!
//! Pure data plus the arithmetic that summarises a plan per vCPU; no I/O.

use serde::Serialize;

use clockcarry::model::{ClockPolicy, OnFailure, Pvti, PvtiSource, VmClock};
use clockcarry::plan::{Destination, ErrorBound, KvmClockAction, Plan, PlanMode};
use clockcarry::sidecar::SidecarBody;

/// How a restore ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The plan was applied and verified.
    Applied,
    /// Applied and verified, but kvm-clock landed further from the source
    /// line than the target (`--max-kvmclock-error`); the reported bound
    /// includes what was reached.
    AppliedDegraded,
    /// `--dry-run`: planned, nothing sent.
    DryRun,
    /// Refused before anything was sent (policy, input or VMM state).
    Refused,
    /// The VMM could not be used; nothing was changed.
    VmmError,
    /// The apply failed and the previous offsets are back.
    RolledBack,
    /// Nobody knows what the VM's clock is now.
    Unknown,
    /// Another clockcarry operation on the VM held its lock; nothing sent.
    Busy,
}

/// One vCPU's TSC offset: captured, found on the destination, written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VcpuCorrection {
    pub id: u32,
    /// In the sidecar (source VM at capture), cycles.
    pub captured_offset: i64,
    /// On the destination VM before the restore, cycles.
    pub destination_offset: i64,
    /// What the plan writes, cycles.
    pub new_offset: i64,
    /// `new_offset - captured_offset` (mod 2^64, signed): the same for every
    /// vCPU, so their differences are kept.
    pub delta_from_capture_cycles: i64,
    /// `new_offset - destination_offset` (mod 2^64, signed).
    pub change_cycles: i64,
}

/// The per-vCPU view of a plan. vCPUs are paired by position.
pub fn corrections(
    sidecar: &SidecarBody,
    destination: &VmClock,
    plan: &Plan,
) -> Vec<VcpuCorrection> {
    sidecar
        .vm_clock
        .vcpus
        .iter()
        .zip(destination.vcpus.iter())
        .zip(plan.tsc_offsets.iter())
        .map(|((src, dst), new)| VcpuCorrection {
            id: src.id,
            captured_offset: src.tsc_offset,
            destination_offset: dst.tsc_offset,
            new_offset: *new,
            delta_from_capture_cycles: new.wrapping_sub(src.tsc_offset),
            change_cycles: new.wrapping_sub(dst.tsc_offset),
        })
        .collect()
}

/// The plan's decisions, flat, for people and dashboards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanSummary {
    pub mode: PlanMode,
    pub policy: ClockPolicy,
    pub source_host: String,
    pub destination_host: String,
    /// TAI time since capture that the plan used, ns (0 same-host / freeze).
    pub elapsed_ns: u64,
    /// TAI time between capture and the destination sample, ns (saturating):
    /// the sidecar's age whatever the mode.
    pub sidecar_age_ns: u64,
    pub clamped_negative_elapsed_ns: u64,
    pub advance_cycles: u64,
    pub floor_cycles: u64,
    /// The guest TSC rate, kHz.
    pub guest_tsc_khz: u32,
    /// The rate the plan sets (`None`: the VM already runs at it).
    pub set_tsc_khz: Option<u32>,
    pub destination_host_tsc_khz: u32,
    pub guest_tsc_at_capture: u64,
    pub guest_tsc_target: u64,
    pub error_bound: ErrorBound,
    pub notes: Vec<String>,
}

impl PlanSummary {
    pub fn new(sidecar: &SidecarBody, dst: &Destination, plan: &Plan) -> PlanSummary {
        PlanSummary {
            mode: plan.mode,
            policy: plan.policy,
            source_host: sidecar.source_host.hostname.clone(),
            destination_host: dst.identity.hostname.clone(),
            elapsed_ns: plan.elapsed_ns,
            sidecar_age_ns: dst.sample.tai_ns.saturating_sub(sidecar.capture.tai_ns),
            clamped_negative_elapsed_ns: plan.clamped_negative_elapsed_ns,
            advance_cycles: plan.advance_cycles,
            floor_cycles: plan.floor_cycles,
            guest_tsc_khz: sidecar.vm_clock.tsc_khz,
            set_tsc_khz: plan.tsc_khz,
            destination_host_tsc_khz: dst.identity.tsc_khz,
            guest_tsc_at_capture: plan.guest_tsc_at_capture,
            guest_tsc_target: plan.guest_tsc_target,
            error_bound: plan.error_bound,
            notes: plan.notes.clone(),
        }
    }
}

/// What was asked of kvm-clock and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmClockReport {
    /// The plan's choice: `clock_guest` or `set_clock`.
    pub planned: &'static str,
    /// The line kvm-clock must follow (the source PVTI).
    pub line: Pvti,
    pub line_source: PvtiSource,
    /// The target of the VMM's correction loop, ns.
    pub max_error_ns: u64,
    /// The plan's a-priori error of kvm-clock against the line, ns.
    pub a_priori_bound_ns: u64,
    /// The method the VMM says it used.
    pub vmm_method: Option<String>,
    /// The error the VMM says it reached, ns.
    pub vmm_error_ns: Option<i64>,
    /// kvm-clock minus the line, from the verification `GET`'s
    /// (clock, host_tsc) pair and the offsets read back, ns.
    pub verified_error_ns: Option<i64>,
    /// The error reached lies in the window `[0, max_error_ns]` above the
    /// line (`None`: not measured).
    pub within_target: Option<bool>,
    /// The bound that holds after the apply: the a-priori bound, widened to
    /// what was reached when that is larger, ns.
    pub bound_ns: u64,
}

impl KvmClockReport {
    pub fn new(plan: &Plan, max_error_ns: u64) -> KvmClockReport {
        let planned = match plan.kvmclock {
            KvmClockAction::ClockGuest { .. } => "clock_guest",
            KvmClockAction::SetClock { .. } => "set_clock",
        };
        KvmClockReport {
            planned,
            line: *plan.kvmclock.pvti(),
            line_source: plan.pvti_source,
            max_error_ns,
            a_priori_bound_ns: plan.error_bound.kvmclock_ns,
            vmm_method: None,
            vmm_error_ns: None,
            verified_error_ns: None,
            within_target: None,
            bound_ns: plan.error_bound.kvmclock_ns,
        }
    }

    /// Records the error reached (the verified one, else the VMM's) and
    /// widens the bound to it: a bound the apply broke is never reported.
    /// Returns the error reached when it misses the target.
    pub fn settle(&mut self) -> Option<i64> {
        let reached = self.verified_error_ns.or(self.vmm_error_ns)?;
        // The verification pair is exact; one more ns for the guest's rounding.
        let held_ns = reached.unsigned_abs().saturating_add(1);
        self.bound_ns = self.a_priori_bound_ns.max(held_ns);
        // The target is the window [0, max] above the line (docs/design.md):
        // a landing below it misses, however close.
        let max = i64::try_from(self.max_error_ns.max(1)).unwrap_or(i64::MAX);
        let within = (0..=max).contains(&reached);
        self.within_target = Some(within);
        (!within).then_some(reached)
    }
}

/// What the verification `GET` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Every offset read back equals what was written.
    pub offsets_match: bool,
    /// vCPU ids whose offset differs.
    pub mismatched_vcpus: Vec<u32>,
    /// The VMM says offset writes take effect (capabilities.tsc_offset).
    pub tsc_offsets_effective: bool,
    /// The rate read back equals the plan's (true when none was set).
    pub tsc_khz_matches: bool,
    /// The VM is still paused.
    pub still_paused: bool,
}

/// Where the time of a restore went, ns, from the start of the command
/// line's handling (`started`, before argument parsing); the
/// `*_monotonic_raw_ns` values are CLOCK_MONOTONIC_RAW, comparable across
/// processes (the benchmark uses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Timings {
    pub started_monotonic_raw_ns: u64,
    pub put_answered_monotonic_raw_ns: Option<u64>,
    /// Argument parsing and logger set-up.
    pub parse_ns: u64,
    pub read_sidecar_ns: u64,
    pub get_ns: u64,
    pub host_ns: u64,
    pub plan_ns: u64,
    pub put_ns: Option<u64>,
    /// From `started` to the PUT's answer.
    pub to_put_answered_ns: Option<u64>,
    pub verify_ns: Option<u64>,
    pub total_ns: u64,
}

/// Everything `clockcarry restore` says about one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestoreReport {
    pub outcome: Outcome,
    pub exit_code: u8,
    /// The error, when the outcome is not `applied` / `dry_run`.
    pub error: Option<String>,
    /// What the operator should do now (always set on failure).
    pub advice: Option<String>,
    pub vm_id: Option<String>,
    pub sidecar: String,
    pub api_socket: String,
    pub on_failure: OnFailure,
    /// The VM's clock was provably not changed by this run.
    pub vm_untouched: Option<bool>,
    pub summary: Option<PlanSummary>,
    pub vcpus: Vec<VcpuCorrection>,
    pub kvmclock: Option<KvmClockReport>,
    pub verification: Option<Verification>,
    /// Loud remarks: inert offsets, a VM resumed under us, refusals.
    pub warnings: Vec<String>,
    pub timings: Timings,
    /// The VMM's answer to the PUT, as it came.
    pub vmm_answer: Option<serde_json::Value>,
    /// The VMM's typed failure of the PUT, when it gave one.
    pub vmm_failure: Option<clockcarry::vmclock_api::PutFailure>,
    pub plan: Option<Plan>,
    /// The destination measurement, reusable with `clockcarry plan`.
    pub destination: Option<Destination>,
}
