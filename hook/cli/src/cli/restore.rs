//! `clockcarry restore`: sidecar + GET vm.clock (Paused) + this host's
//! instant -> plan -> PUT vm.clock -> verifying GET -> report.
//!
//! This runs inside the VM's blackout: nothing here sleeps, calibrates or
//! looks a name up, and the host TSC rate comes from a per-boot cache after
//! the first run (see hostinfo.rs).

use std::path::PathBuf;
use std::time::Instant;

use super::report::{
    self, KvmClockReport, Outcome, PlanSummary, RestoreReport, Timings, Verification,
};
use clap::Args;
use clockcarry::api::{ClockPut, PutOutcome};
use clockcarry::host;
use clockcarry::model::{ClockPolicy, OnFailure, Policy, RunState, VmClock};
use clockcarry::plan::{self, Destination, Plan, PlanMode};
use clockcarry::sidecar::Sidecar;

use super::common::{self, plan_error, print_json, print_report};
use super::exit::{CliError, CliResult, Exit, EXIT_STATUS_HELP};
use super::hostinfo;
use super::lock;
use super::units::{human_ns, human_ns_signed};
use super::vmm::{Vmm, VmmError};
use super::{ApiArgs, PolicyArgs};

const LONG_ABOUT: &str = "\
Restore a paused VM's clock from a sidecar, before its vCPUs run.

DESCRIPTION
    Reads and verifies the sidecar (digest, and HMAC with --key), reads the
    VM's clock with GET /api/v1/vm.clock and refuses unless the VM is Paused,
    measures this host's (TSC, TAI) instant, and plans: on the same host and
    boot the captured offsets are copied bit for bit; elsewhere each vCPU's
    TSC is placed where it would be had the VM kept running (capture value +
    elapsed TAI time x guest rate; freeze: the capture value), and kvm-clock
    is made to follow the source's TSC-to-ns line (PVTI). The plan is sent
    in one PUT /api/v1/vm.clock (TSC rate, all offsets, kvm-clock line with
    --max-kvmclock-error as the VMM's target), then read back with a second
    GET: the offsets must equal what was written, unless the VMM reports TSC
    offsets inert on this host (capabilities.tsc_offset = false), which is
    reported as a warning. The report gives the mode, the elapsed time used,
    the clamp of a negative elapsed time and the floor, every vCPU's
    correction, the kvm-clock method
    and the error reached, and the error bound with its parts.

    Refusals (exit 2, 3, 4) leave the VM untouched. With --on-failure abort
    (default) the message says not to resume the VM; with vmm-default it says
    the VMM's default clock handling stays in effect. --max-elapsed applies
    in every mode (same-host and freeze included). --dry-run plans and
    reports without sending anything.

    Give the sidecar with -i, or --vm alone for
    $CLOCKCARRY_STATE_DIR/<VM>.sidecar.json. With --vm the sidecar must
    belong to that VM.";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    Snapshot/restore on Cloud Hypervisor:
        ch-remote --api-socket /run/ch.sock restore source_url=file:///snap,resume=false
        clockcarry restore --api-socket /run/ch.sock -i /var/lib/clockcarry/web-1.sidecar.json \\
            --vm web-1 --max-elapsed 1h --require-sync
        ch-remote --api-socket /run/ch.sock resume

    Rehearse without touching the VM, as JSON:
        clockcarry restore --api-socket /run/ch.sock --vm web-1 --dry-run --json"
    )
}

/// Restore a paused VM's clock from a sidecar, before its vCPUs run.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct RestoreArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The sidecar written by `clockcarry capture`.
    #[arg(short, long, value_name = "FILE", required_unless_present = "vm")]
    pub input: Option<PathBuf>,
    /// The VM being restored: the sidecar must be this VM's (and, without
    /// -i, is read from the default path).
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Only accept sidecars sealed with this HMAC key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Plan and report, send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Exit 9 (applied, precision degraded) when kvm-clock lands further
    /// from the source line than --max-kvmclock-error; without it such a run
    /// exits 0 with outcome `applied_degraded` and a warning.
    #[arg(long)]
    pub enforce_kvmclock_error: bool,
    /// Print the report as JSON on stdout (also on failure).
    #[arg(long)]
    pub json: bool,
    /// This host's TSC rate in kHz, when known better than clockcarry finds it.
    #[arg(long, value_name = "KHZ", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub host_tsc_khz: Option<u32>,
}

fn ns_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn monotonic_raw() -> u64 {
    host::monotonic_raw_now_ns().unwrap_or(0)
}

/// What the operator should do after a failure with `exit`.
fn advice(exit: Exit, on_failure: OnFailure, vm: &str) -> String {
    match (exit, on_failure) {
        (Exit::Busy, _) => format!(
            "this run sent nothing to {vm}: another capture or restore of it is running; wait \
             for that one and act on its result (rerun only if it failed)"
        ),
        (Exit::Degraded, _) => format!(
            "the clock of {vm} was applied and verified, but kvm-clock missed the \
             --max-kvmclock-error target; resuming is safe (the report's bound includes the \
             error reached), or restore the VM state again and rerun for a better result"
        ),
        (Exit::Unknown, _) => format!(
            "do NOT resume {vm}: its clock state is unknown; read it with GET /api/v1/vm.clock, \
             then restore the VM state again and rerun clockcarry restore"
        ),
        (Exit::RolledBack, OnFailure::Abort) => format!(
            "the previous TSC offsets are back in place; do not resume {vm} yet: its clock was \
             not carried over. Fix the cause and run clockcarry restore again"
        ),
        (Exit::RolledBack, OnFailure::VmmDefault) => format!(
            "the previous TSC offsets are back in place; the VMM's default clock handling stays \
             in effect for {vm}: resuming is safe, but its TSC and kvm-clock will not be continuous"
        ),
        (_, OnFailure::Abort) => format!(
            "{vm} was not touched; do not resume it yet: its clock was not carried over (on \
             resume the VMM would apply its own default). Fix the cause and run clockcarry \
             restore again, or pass --on-failure vmm-default to accept the VMM's default"
        ),
        (_, OnFailure::VmmDefault) => format!(
            "{vm} was not touched: the VMM's default clock handling stays in effect; resuming \
             is safe, but its TSC and kvm-clock will not be continuous"
        ),
    }
}

/// What this run tells the metrics file (written when the command ends).
fn note_metrics(rep: &RestoreReport) {
    let Some(vm) = rep.vm_id.as_deref() else {
        return;
    };
    super::metrics::note(vm, |m| {
        m.outcome = serde_json::to_value(rep.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        m.mode = rep.summary.as_ref().map(|s| mode_name(s.mode).to_string());
        m.error_bound_ns = rep.summary.as_ref().map(|s| s.error_bound.total_ns);
        m.kvmclock_error_ns = rep
            .kvmclock
            .as_ref()
            .and_then(|k| k.verified_error_ns.or(k.vmm_error_ns));
        m.blackout_added_ns = rep.timings.to_put_answered_ns;
    });
}

/// `same-host` / `cross-host`, as the JSON says it.
pub fn mode_name(mode: PlanMode) -> &'static str {
    match mode {
        PlanMode::SameHost => "same-host",
        PlanMode::CrossHost => "cross-host",
    }
}

/// What a VM that is not paused means for its clock.
fn running_next(state: RunState, vm: Option<&str>) -> String {
    let vm = vm.map_or_else(|| "the VM".to_string(), |id| format!("VM {id}"));
    format!(
        "{vm} is {state:?}: its vCPUs have run since its state was restored, on the VMM's own \
         clock handling, so its clock can no longer be carried (the guest has already read the \
         TSC and kvm-clock the VMM gave it; other values now would make them jump under it). \
         Nothing was sent. Leave it running with the VMM's clocks, or restore it again with \
         resume=false and run clockcarry restore before resuming it"
    )
}

/// What a VMM's "the vCPUs have run since the restore" refusal means.
fn in_place_next(vm: Option<&str>) -> String {
    let vm = vm.map_or_else(|| "the VM".to_string(), |id| format!("VM {id}"));
    format!(
        "{vm} was not touched. Its vCPUs have run since it was last restored or received, so \
         it was paused in place, or resumed after a restore: paused in place (pause, then \
         resume, in the same VMM), its TSC and kvm-clock never stopped counting and nothing \
         needs restoring: resume it. If it was restored or received and resumed since, its \
         clock can no longer be carried: leave it on the VMM's clocks, or restore it again \
         with resume=false and run clockcarry restore before resuming"
    )
}

fn outcome_of(exit: Exit) -> Outcome {
    match exit {
        Exit::Ok => Outcome::Applied,
        Exit::Vmm => Outcome::VmmError,
        Exit::RolledBack => Outcome::RolledBack,
        Exit::Unknown => Outcome::Unknown,
        Exit::Busy => Outcome::Busy,
        Exit::Degraded => Outcome::AppliedDegraded,
        _ => Outcome::Refused,
    }
}

/// One restore, step by step; `rep` collects what is known so far.
struct Restore<'a> {
    args: &'a RestoreArgs,
    policy: Policy,
    started: Instant,
    rep: RestoreReport,
}

pub fn run(args: &RestoreArgs) -> CliResult<Exit> {
    let (started, started_raw) = super::started();
    let parse_ns = ns_since(started);
    let policy = args.policy.policy();
    let mut r = Restore {
        args,
        policy: policy.clone(),
        started,
        rep: RestoreReport {
            outcome: Outcome::Refused,
            exit_code: 0,
            error: None,
            advice: None,
            vm_id: args.vm.clone(),
            sidecar: String::new(),
            api_socket: args.api.socket().display().to_string(),
            on_failure: policy.on_failure,
            vm_untouched: Some(true),
            summary: None,
            vcpus: Vec::new(),
            kvmclock: None,
            verification: None,
            warnings: Vec::new(),
            timings: Timings {
                started_monotonic_raw_ns: started_raw,
                parse_ns,
                ..Timings::default()
            },
            vmm_answer: None,
            vmm_failure: None,
            plan: None,
            destination: None,
        },
    };
    let result = r.restore();
    r.rep.timings.total_ns = ns_since(started);
    match result {
        Ok(()) => {
            r.rep.exit_code = Exit::Ok.code();
            note_metrics(&r.rep);
            if args.json {
                print_json(&r.rep)?;
            } else {
                print_report(&human(&r.rep));
            }
            Ok(Exit::Ok)
        }
        Err(err) => {
            let vm = r
                .rep
                .vm_id
                .clone()
                .map_or_else(|| "the VM".to_string(), |id| format!("VM {id}"));
            // A refusal that knows the VM's situation better says it itself.
            let next = err
                .next
                .clone()
                .unwrap_or_else(|| advice(err.exit, policy.on_failure, &vm));
            r.rep.outcome = outcome_of(err.exit);
            r.rep.exit_code = err.exit.code();
            note_metrics(&r.rep);
            r.rep.error = Some(err.message.clone());
            r.rep.advice = Some(match &err.hint {
                Some(h) => format!("{h}; {next}"),
                None => next.clone(),
            });
            if args.json {
                print_json(&r.rep)?;
            } else if r.rep.summary.is_some() {
                // Show what was planned: it explains the failure.
                print_report(&human(&r.rep));
            }
            Err(CliError {
                next: Some(next),
                ..err
            })
        }
    }
}

impl Restore<'_> {
    fn restore(&mut self) -> CliResult<()> {
        let args = self.args;
        let t = Instant::now();
        let path = common::sidecar_path(args.input.as_deref(), args.vm.as_deref())?;
        self.rep.sidecar = path.display().to_string();
        let key = common::load_key(args.key.as_deref())?;
        let sidecar = common::read_sidecar(&path, key.as_ref())?;
        let body = &sidecar.body;
        common::check_sidecar_vm(&path, &sidecar, args.vm.as_deref())?;
        self.rep.vm_id = Some(body.vm.id.clone());
        self.rep.timings.read_sidecar_ns = ns_since(t);

        // One restore (or capture) per VM at a time, held until this process
        // exits: a second one must not undo what this one applies. A dry run
        // sends nothing and needs none.
        let _lock = if args.dry_run {
            None
        } else {
            Some(lock::lock_vm(args.api.socket(), "restore")?)
        };
        let t = Instant::now();
        let client = args.api.vmm();
        let before = client.get_vm_clock().map_err(|e| common::vmm_error(&e))?;
        self.rep.timings.get_ns = ns_since(t);
        if before.state != RunState::Paused {
            return Err(CliError::new(
                Exit::Refused,
                format!(
                    "refused: the VM is {:?}; clockcarry restore acts only on a paused VM \
                     whose vCPUs have not run since its state was restored",
                    before.state
                ),
            )
            .with_hint(
                "restore or receive the VM with resume=false, run clockcarry restore, then resume",
            )
            .with_next(running_next(before.state, self.rep.vm_id.as_deref())));
        }
        check_vcpu_layout(&sidecar, &before)?;

        let t = Instant::now();
        let (identity, rate) = hostinfo::identity(args.host_tsc_khz)?;
        if rate.cached {
            log::debug!("host TSC rate {} kHz from the per-boot cache", rate.khz);
        }
        let sample = hostinfo::sample(rate.khz)?;
        self.rep.timings.host_ns = ns_since(t);

        let t = Instant::now();
        let dst = Destination {
            identity,
            sample,
            vm: before.clone(),
            vm_id: Some(body.vm.id.clone()),
            offset_estimate: None,
        };
        let planned = plan::plan(body, &dst, &self.policy);
        self.rep.destination = Some(dst.clone());
        let plan = planned.map_err(|e| plan_error(&e))?;
        self.rep.timings.plan_ns = ns_since(t);
        let uses_tai = plan.mode == PlanMode::CrossHost && plan.policy == ClockPolicy::KeepRunning;
        for w in hostinfo::host_warnings(&dst.identity, &dst.sample, uses_tai) {
            self.warn(w);
        }
        let summary = PlanSummary::new(body, &dst, &plan);
        self.rep.vcpus = report::corrections(body, &before, &plan);
        self.rep.kvmclock = Some(KvmClockReport::new(
            &plan,
            self.policy.max_kvmclock_error_ns,
        ));
        self.rep.summary = Some(summary);
        self.rep.plan = Some(plan.clone());
        if !before.capabilities.tsc_offset_effective {
            self.warn(
                "TSC OFFSETS ARE INERT ON THIS HOST (the VMM reports capabilities.tsc_offset = \
                 false): the guest TSC will NOT be moved; only kvm-clock is restored"
                    .to_string(),
            );
        }
        if self.args.dry_run {
            self.rep.outcome = Outcome::DryRun;
            return Ok(());
        }

        self.apply(&client, &before, &plan)
    }

    fn warn(&mut self, text: String) {
        log::warn!("{text}");
        self.rep.warnings.push(text);
    }

    /// PUT, classify a failure, verify, roll back a mismatch.
    fn apply(&mut self, client: &Vmm, before: &VmClock, plan: &Plan) -> CliResult<()> {
        let put = ClockPut::from_plan(plan);
        let t = Instant::now();
        let answer = client.put_vm_clock(&put);
        self.rep.timings.put_ns = Some(ns_since(t));
        self.rep.timings.put_answered_monotonic_raw_ns = Some(monotonic_raw());
        self.rep.timings.to_put_answered_ns = Some(ns_since(self.started));
        let answer = match answer {
            Ok(a) => a,
            Err(e) => return Err(self.put_failed(client, before, &e)),
        };
        self.rep.vm_untouched = Some(false);
        self.rep.vmm_answer = answer.body.clone();
        if let Some(k) = self.rep.kvmclock.as_mut() {
            k.vmm_error_ns = answer.kvmclock_error_ns();
            k.vmm_method = answer.kvmclock_method();
        }
        for refused in answer.refused() {
            self.warn(format!(
                "the kernel refused a step the VMM tolerated: {refused}"
            ));
        }
        if answer.tsc_offsets_effective() == Some(false) && before.capabilities.tsc_offset_effective
        {
            self.warn("the VMM reports the TSC offsets did not take effect".to_string());
        }

        let t = Instant::now();
        let after = client.get_vm_clock().map_err(|e| {
            CliError::new(
                Exit::Unknown,
                format!("the VMM accepted the clock, but reading it back failed: {e}"),
            )
        })?;
        self.rep.timings.verify_ns = Some(ns_since(t));
        let verification = verify(before, &after, plan);
        if let Some(k) = self.rep.kvmclock.as_mut() {
            k.verified_error_ns =
                clockcarry::pvclock::kvmclock_error_ns(&after, plan.kvmclock.pvti());
        }
        if !verification.still_paused {
            self.warn(format!(
                "the VM is {:?} after the restore: someone resumed it meanwhile",
                after.state
            ));
        }
        let ok = verification.offsets_match && verification.tsc_khz_matches;
        let mismatched = verification.mismatched_vcpus.clone();
        self.rep.verification = Some(verification);
        if !ok {
            return Err(self.roll_back(client, before, plan, &mismatched));
        }
        let missed = self.rep.kvmclock.as_mut().and_then(KvmClockReport::settle);
        if let (Some(k), Some(summary)) = (&self.rep.kvmclock, self.rep.summary.as_mut()) {
            // The summary's bound is the one scripts read: it must hold.
            summary.error_bound.kvmclock_ns = k.bound_ns;
        }
        if let (Some(err), Some(k)) = (missed, self.rep.kvmclock.clone()) {
            let place = if err < 0 {
                format!("{} below the source line", human_ns(err.unsigned_abs()))
            } else {
                format!("{} above the source line", human_ns(err.unsigned_abs()))
            };
            let text = format!(
                "PRECISION DEGRADED: kvm-clock is {place} (target: 0 to {} above it); the \
                 kvm-clock bound reported is {}",
                human_ns(k.max_error_ns),
                human_ns(k.bound_ns)
            );
            self.warn(text.clone());
            if self.args.enforce_kvmclock_error {
                self.rep.vm_untouched = Some(false);
                return Err(CliError::new(Exit::Degraded, text));
            }
            self.rep.outcome = Outcome::AppliedDegraded;
            log::info!(
                "restored VM {} ({:?}) with kvm-clock precision degraded",
                self.rep.vm_id.as_deref().unwrap_or("?"),
                plan.mode
            );
            return Ok(());
        }
        self.rep.outcome = Outcome::Applied;
        log::info!(
            "restored VM {} ({:?}, elapsed {}) in {}",
            self.rep.vm_id.as_deref().unwrap_or("?"),
            plan.mode,
            human_ns(plan.elapsed_ns),
            human_ns(self.rep.timings.to_put_answered_ns.unwrap_or(0))
        );
        Ok(())
    }

    /// The PUT failed: find out from a GET whether anything changed.
    fn put_failed(&mut self, client: &Vmm, before: &VmClock, e: &VmmError) -> CliError {
        if !e.request_sent() {
            return common::vmm_error(e);
        }
        let now = client.get_vm_clock();
        let unchanged = match &now {
            Ok(vm) => vm.offsets() == before.offsets() && vm.tsc_khz == before.tsc_khz,
            Err(_) => false,
        };
        let seen = match &now {
            Ok(_) if unchanged => "a GET shows the offsets unchanged".to_string(),
            Ok(_) => "a GET shows the offsets CHANGED".to_string(),
            Err(ge) => format!("the state could not be read back: {ge}"),
        };
        self.rep.vm_untouched = now.as_ref().ok().map(|_| unchanged);
        // Decided on the VMM's typed outcome and the read-back, never on
        // the error's text.
        let failure = e.put_failure();
        if let Some(f) = failure {
            self.rep.vmm_failure = Some(f.clone());
        }
        let (exit, what) = match (e, failure.map(|f| f.outcome)) {
            (_, Some(PutOutcome::RollbackIncomplete)) => (
                Exit::Unknown,
                "the VMM failed to apply the clock and could not roll back",
            ),
            (_, Some(PutOutcome::RolledBack)) if unchanged => (
                Exit::RolledBack,
                "the VMM failed to apply the clock; its rollback is complete",
            ),
            (_, Some(PutOutcome::RolledBack)) => (
                Exit::Unknown,
                "the VMM says its rollback is complete, but the read-back disagrees",
            ),
            (_, Some(PutOutcome::Refused | PutOutcome::WrongState)) if unchanged => {
                (Exit::Vmm, "the VMM refused the clock")
            }
            (e, None) if e.answered() && unchanged => (
                Exit::Vmm,
                "the VMM refused the clock (no typed reply; the read-back shows nothing changed)",
            ),
            _ => (Exit::Unknown, "PUT vm.clock failed"),
        };
        let err = CliError::new(exit, format!("{what}: {e}; {seen}"));
        match failure.map(|f| f.outcome) {
            // The vCPUs ran since any restore: an in-place pause, whose
            // clocks never stopped counting, or a restored VM resumed since.
            Some(PutOutcome::WrongState) if unchanged => {
                err.with_next(in_place_next(self.rep.vm_id.as_deref()))
            }
            _ => err,
        }
    }

    /// The read-back differs from the plan: put the previous offsets back.
    fn roll_back(
        &mut self,
        client: &Vmm,
        before: &VmClock,
        plan: &Plan,
        mismatched: &[u32],
    ) -> CliError {
        let what = format!(
            "verification failed: vCPU(s) {mismatched:?} read back other offsets than written{}",
            if self
                .rep
                .verification
                .as_ref()
                .is_some_and(|v| !v.tsc_khz_matches)
            {
                ", and the TSC rate differs"
            } else {
                ""
            }
        );
        let undo = ClockPut {
            tsc_khz: plan.tsc_khz.map(|_| before.tsc_khz),
            tsc_offsets: before.offsets(),
            kvmclock: None,
            arm: None,
        };
        let restored = client
            .put_vm_clock(&undo)
            .map_err(|e| e.to_string())
            .and_then(|_| client.get_vm_clock().map_err(|e| e.to_string()))
            .and_then(|vm| {
                if vm.offsets() == before.offsets() {
                    Ok(())
                } else {
                    Err("the offsets still differ".to_string())
                }
            });
        match restored {
            Ok(()) => {
                self.rep.vm_untouched = Some(false);
                CliError::new(
                    Exit::RolledBack,
                    format!(
                        "{what}; the previous offsets were written back (kvm-clock stays as \
                         the failed apply set it)"
                    ),
                )
            }
            Err(e) => CliError::new(Exit::Unknown, format!("{what}; rollback failed: {e}")),
        }
    }
}

/// The vCPUs of the sidecar and of the VM must be the same ids, in order.
fn check_vcpu_layout(sidecar: &Sidecar, vm: &VmClock) -> CliResult<()> {
    let src: Vec<u32> = sidecar.body.vm_clock.vcpus.iter().map(|v| v.id).collect();
    let dst: Vec<u32> = vm.vcpus.iter().map(|v| v.id).collect();
    if src.len() != dst.len() {
        return Err(CliError::bad_input(format!(
            "the sidecar has {} vCPUs, the VM has {}",
            src.len(),
            dst.len()
        ))
        .with_hint("this sidecar was captured from another VM: give the right -i"));
    }
    if src != dst {
        return Err(CliError::bad_input(format!(
            "the sidecar's vCPU ids {src:?} differ from the VM's {dst:?}"
        )));
    }
    Ok(())
}

/// Compares the read-back with the plan.
fn verify(before: &VmClock, after: &VmClock, plan: &Plan) -> Verification {
    let effective =
        after.capabilities.tsc_offset_effective && before.capabilities.tsc_offset_effective;
    let mismatched_vcpus: Vec<u32> = if effective {
        after
            .vcpus
            .iter()
            .zip(plan.tsc_offsets.iter())
            .filter(|(v, want)| v.tsc_offset != **want)
            .map(|(v, _)| v.id)
            .chain(
                // A vCPU missing from the answer is a mismatch too.
                plan.tsc_offsets
                    .iter()
                    .enumerate()
                    .skip(after.vcpus.len())
                    .filter_map(|(i, _)| u32::try_from(i).ok()),
            )
            .collect()
    } else {
        Vec::new()
    };
    Verification {
        offsets_match: mismatched_vcpus.is_empty(),
        mismatched_vcpus,
        tsc_offsets_effective: effective,
        tsc_khz_matches: plan.tsc_khz.is_none_or(|k| after.tsc_khz == k),
        still_paused: after.state == RunState::Paused,
    }
}

/// The report for people.
#[allow(clippy::too_many_lines)] // older than the lint; split before extending
pub fn human(rep: &RestoreReport) -> String {
    let mut out = String::new();
    let vm = rep.vm_id.as_deref().unwrap_or("?");
    let head = match rep.outcome {
        Outcome::Applied => format!("restored the clock of VM {vm}"),
        Outcome::AppliedDegraded => {
            format!("restored the clock of VM {vm}, kvm-clock precision DEGRADED")
        }
        Outcome::DryRun => format!("dry run for VM {vm}: planned, nothing sent"),
        _ => format!("VM {vm}: NOT restored"),
    };
    out.push_str(&head);
    out.push('\n');
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<15} {v}\n"));
    if let Some(s) = &rep.summary {
        line(
            &mut out,
            "mode",
            match s.mode {
                PlanMode::SameHost => format!("same-host ({})", s.destination_host),
                PlanMode::CrossHost => {
                    format!("cross-host ({} -> {})", s.source_host, s.destination_host)
                }
            },
        );
        line(
            &mut out,
            "policy",
            match s.policy {
                ClockPolicy::KeepRunning => "keep-running".to_string(),
                ClockPolicy::Freeze => "freeze".to_string(),
            },
        );
        line(
            &mut out,
            "elapsed used",
            format!(
                "{} (sidecar age {}, negative elapsed clamped {})",
                human_ns(s.elapsed_ns),
                human_ns(s.sidecar_age_ns),
                human_ns(s.clamped_negative_elapsed_ns)
            ),
        );
        line(
            &mut out,
            "TSC advance",
            match s.mode {
                // The offsets are copied: the guest TSC has advanced with
                // the host's since the capture, not by anything written.
                PlanMode::SameHost => format!(
                    "{} cycles since the capture, the host TSC's own: the captured offsets \
                     are kept as they are (floor {} cycles)",
                    s.advance_cycles, s.floor_cycles
                ),
                PlanMode::CrossHost => format!(
                    "{} cycles over the capture value, on every vCPU (floor {} cycles)",
                    s.advance_cycles, s.floor_cycles
                ),
            },
        );
        line(
            &mut out,
            "TSC rate",
            match s.set_tsc_khz {
                Some(k) => format!("{k} kHz (set; host {} kHz)", s.destination_host_tsc_khz),
                None => format!(
                    "{} kHz (unchanged; host {} kHz)",
                    s.guest_tsc_khz, s.destination_host_tsc_khz
                ),
            },
        );
    }
    for v in &rep.vcpus {
        line(
            &mut out,
            &format!("vCPU {}", v.id),
            format!(
                "offset {} -> {} ({:+} cycles; {:+} from capture)",
                v.destination_offset, v.new_offset, v.change_cycles, v.delta_from_capture_cycles
            ),
        );
    }
    if let Some(k) = &rep.kvmclock {
        let reached = match (k.vmm_error_ns, k.verified_error_ns) {
            (_, Some(v)) => format!(", error {} (verified)", human_ns_signed(v)),
            (Some(e), None) => format!(", error {} (VMM)", human_ns_signed(e)),
            (None, None) => String::new(),
        };
        line(
            &mut out,
            "kvm-clock",
            format!(
                "follow source PVTI ({:?}) via {}{}, target {}",
                k.line_source,
                k.vmm_method.as_deref().unwrap_or(k.planned),
                reached,
                human_ns(k.max_error_ns)
            ),
        );
    }
    if let Some(s) = &rep.summary {
        let b = &s.error_bound;
        line(
            &mut out,
            "error bound",
            format!(
                "{} = brackets {} + {}, host clocks {} + {}, unmeasured offset {}, offset \
                 estimate {} + drift {}, rate {} ({} cycles); kvm-clock {}",
                human_ns(b.total_ns),
                human_ns(b.source_bracket_ns),
                human_ns(b.destination_bracket_ns),
                human_ns(b.source_clock_ns),
                human_ns(b.destination_clock_ns),
                human_ns(b.unmeasured_offset_ns),
                human_ns(b.offset_estimate_ns),
                human_ns(b.offset_drift_ns),
                human_ns(b.rate_error_ns),
                b.tsc_cycles,
                human_ns(b.kvmclock_ns)
            ),
        );
        for n in &s.notes {
            line(&mut out, "note", n.clone());
        }
    }
    if let Some(v) = &rep.verification {
        line(
            &mut out,
            "verified",
            if !v.tsc_offsets_effective {
                "offsets NOT checked (inert on this host)".to_string()
            } else if v.offsets_match {
                "offsets read back as written".to_string()
            } else {
                format!("offsets DIFFER on vCPU(s) {:?}", v.mismatched_vcpus)
            },
        );
    }
    if let Some(ns) = rep.timings.to_put_answered_ns {
        line(
            &mut out,
            "blackout added",
            format!("{} (start to PUT answered)", human_ns(ns)),
        );
    }
    for w in &rep.warnings {
        line(&mut out, "WARNING", w.clone());
    }
    out
}
