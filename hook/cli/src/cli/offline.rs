//! `clockcarry plan`: the restore plan from a sidecar and a recorded
//! destination measurement, offline (no VMM, no host measurement).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::report::{self, KvmClockReport, PlanSummary, VcpuCorrection};
use clap::Args;
use clockcarry::model::{HostIdentity, HostSample, OffsetEstimate, RunState, VmClock};
use clockcarry::plan::{self, Destination, Plan};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::common::{self, plan_error, print_json, print_text};
use super::exit::{CliError, CliResult, Exit, EXIT_STATUS_HELP};
use super::units::human_ns;
use super::PolicyArgs;

/// Largest destination file read, bytes.
const MAX_DESTINATION_BYTES: u64 = 1 << 20;

const LONG_ABOUT: &str = "\
Plan a restore offline, from a sidecar and a recorded destination.

DESCRIPTION
    Runs the same planner as `clockcarry restore`, on the sidecar and a
    destination measurement read from a JSON file instead of a live VMM and
    host: to rehearse a runbook, review a decision, or test policy limits.
    Nothing is sent anywhere.

    The destination file is the `destination` object of a
    `clockcarry restore --dry-run --json` report (a whole report is accepted
    too): {\"identity\": host identity, \"sample\": (TSC, TAI) sample,
    \"vm\": the GET vm.clock answer, \"vm_id\": optional,
    \"offset_estimate\": optional}. See docs/cli.md.

    Prints the plan (mode, elapsed time, offsets per vCPU, kvm-clock action,
    error bound) for people, or as JSON with --json. Refusals exit 2 or 3
    as restore would.";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    clockcarry restore --api-socket /run/ch.sock --vm web-1 --dry-run --json > dst.json
    clockcarry plan -i web-1.sidecar.json --destination dst.json --max-elapsed 30s --json"
    )
}

/// Plan a restore offline, from a sidecar and a recorded destination.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct PlanArgs {
    /// The sidecar.
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// The destination measurement (JSON).
    #[arg(short, long, value_name = "FILE")]
    destination: PathBuf,
    /// The VM the sidecar must belong to.
    #[arg(long, value_name = "ID")]
    vm: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Only accept sidecars sealed with this HMAC key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// The destination file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationFile {
    identity: HostIdentity,
    sample: HostSample,
    vm: VmClock,
    #[serde(default)]
    vm_id: Option<String>,
    #[serde(default)]
    offset_estimate: Option<OffsetEstimate>,
}

#[derive(Serialize)]
struct PlanOutput {
    summary: PlanSummary,
    vcpus: Vec<VcpuCorrection>,
    kvmclock: KvmClockReport,
    plan: Plan,
}

fn read_destination(path: &Path) -> CliResult<Destination> {
    let bad =
        |why: String| CliError::bad_input(format!("destination file {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_DESTINATION_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_DESTINATION_BYTES {
        return Err(bad(format!("larger than {MAX_DESTINATION_BYTES} bytes")));
    }
    let mut value: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    // A whole restore report: take its destination.
    if let Some(inner) = value.get_mut("destination") {
        value = inner.take();
    }
    if !value.is_object() {
        return Err(bad(
            "not a JSON object (or a report without a destination)".into()
        ));
    }
    let file: DestinationFile = serde_path_to_error::deserialize(value)
        .map_err(|e| bad(format!("field `{}`: {}", e.path(), e.inner())))?;
    clockcarry::api::validate_vm_clock(&file.vm).map_err(|e| bad(format!("vm: {e}")))?;
    Ok(Destination {
        identity: file.identity,
        sample: file.sample,
        vm: file.vm,
        vm_id: file.vm_id,
        offset_estimate: file.offset_estimate,
    })
}

pub fn run(args: &PlanArgs) -> CliResult<Exit> {
    let key = common::load_key(args.key.as_deref())?;
    let sidecar = common::read_sidecar(&args.input, key.as_ref())?;
    let mut dst = read_destination(&args.destination)?;
    if let Some(vm) = &args.vm {
        dst.vm_id = Some(vm.clone());
    }
    if dst.vm.state != RunState::Paused {
        log::warn!(
            "the recorded destination VM was {:?}: restore would refuse it",
            dst.vm.state
        );
    }
    let policy = args.policy.policy();
    let plan = plan::plan(&sidecar.body, &dst, &policy).map_err(|e| plan_error(&e))?;
    let summary = PlanSummary::new(&sidecar.body, &dst, &plan);
    if let Some(max_ns) = policy.max_elapsed_ns {
        if summary.sidecar_age_ns > max_ns {
            return Err(CliError::new(
                Exit::Refused,
                format!(
                    "refused: the sidecar is {} old at the destination sample, more than \
                     --max-elapsed {}",
                    human_ns(summary.sidecar_age_ns),
                    human_ns(max_ns)
                ),
            ));
        }
    }
    let out = PlanOutput {
        vcpus: report::corrections(&sidecar.body, &dst.vm, &plan),
        kvmclock: KvmClockReport::new(&plan, policy.max_kvmclock_error_ns),
        summary,
        plan,
    };
    if args.json {
        print_json(&out)?;
    } else {
        let rep = super::report::RestoreReport {
            outcome: super::report::Outcome::DryRun,
            exit_code: 0,
            error: None,
            advice: None,
            vm_id: Some(sidecar.body.vm.id.clone()),
            sidecar: args.input.display().to_string(),
            api_socket: String::new(),
            on_failure: policy.on_failure,
            vm_untouched: Some(true),
            summary: Some(out.summary),
            vcpus: out.vcpus,
            kvmclock: Some(out.kvmclock),
            verification: None,
            warnings: Vec::new(),
            timings: Default::default(),
            vmm_answer: None,
            vmm_failure: None,
            plan: None,
            destination: None,
        };
        print_text(&super::restore::human(&rep).replacen(
            "dry run for VM",
            "offline plan for VM",
            1,
        ));
    }
    Ok(Exit::Ok)
}
