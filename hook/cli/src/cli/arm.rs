//! `clockcarry arm`: on the destination, before the VM's final blackout,
//! verify the sidecar, measure this host, plan, and write the armed clock
//! body the VMM applies itself between loading the VM's state and its first
//! vCPU run (docs/armed.md). Nothing is sent to a VMM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use clockcarry::api::{ApiClient, ApiError, ApiOptions, ArmedRequest};
use clockcarry::armed::{plan_armed, ArmPlanError, Armed};
use clockcarry::plan::{ErrorBound, PlanMode};
use clockcarry::vmclock_api::{ClockPut, PutOutcome};
use serde::Serialize;

use super::common::{self, plan_error, print_json, print_report};
use super::exit::{CliError, CliResult, Exit, EXIT_STATUS_HELP};
use super::hostinfo;
use super::units::human_ns;
use super::PolicyArgs;

/// Longest URL accepted for --for-restore / --for-receive, bytes.
const MAX_URL_BYTES: usize = 4096;

const LONG_ABOUT: &str = "\
Plan the clock restore before the blackout, for the VMM to apply itself.

DESCRIPTION
    Run on the destination after `clockcarry capture` on the source and
    before the VM pauses. Reads and verifies the sidecar (digest, and HMAC
    with --key), takes this host's (TSC, TAI) instant and plans exactly as
    `clockcarry restore` would, for a VM that keeps running (freeze cannot
    be armed: its offsets depend on the moment of the apply). The result is
    the `clock` member of vm.restore / vm.receive-migration: the PUT
    vm.clock body plus `arm`, the checks the VMM makes before it applies
    it (planned on this host, not older than --valid-for, the VM's vCPU
    count, the saved state's TSC consistent with the capture, no vCPU
    below its saved TSC). Restoring the clock then adds nothing to the
    blackout: no process runs inside it.

    Writes the body to -o FILE (mode 0600, atomically). With --for-restore
    URL or --for-receive URL the file holds the whole request body instead
    ({\"source_url\"|\"receiver_url\": URL, \"resume\": true, \"clock\": ...};
    --no-resume for resume=false). The report goes to stdout (--json for
    JSON, with the body in it). Refusals exit 2 or 3 and write nothing.

    With --api-socket PATH (and --for-restore or --for-receive) arm sends
    the request itself and waits for the VMM's answer (--send-timeout,
    default 30m: a receive-migration is answered once the migration has
    completed): 200 with the typed reply is success, a VMM answering 204 or
    without that reply did not apply the clock (exit 4), a refusal (the
    field named, the VM restored and paused) exits 3.

    Give the sidecar with -i, or --vm alone for
    $CLOCKCARRY_STATE_DIR/<VM>.sidecar.json (where `serve` stores a sidecar
    the source sent).";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    Live migration with a VMM that takes an armed clock (source, then destination):
        clockcarry capture --api-socket /run/vmm.sock --vm web-1 --peer dst:7300 --key k --send-sidecar
        clockcarry arm --vm web-1 --key k --for-receive tcp:0.0.0.0:6000 -o /run/web-1.receive.json
        curl --unix-socket /run/vmm-dst.sock -X PUT --data @/run/web-1.receive.json \\
            http://localhost/api/v1/vm.receive-migration
        (on the source) send-migration tcp:dst:6000

SEE ALSO
    docs/armed.md, docs/cli.md"
    )
}

/// Plan the clock restore before the blackout, for the VMM to apply itself.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct ArmArgs {
    /// The sidecar written by `clockcarry capture`.
    #[arg(short, long, value_name = "FILE", required_unless_present = "vm")]
    pub input: Option<PathBuf>,
    /// The VM being armed: the sidecar must be this VM's (and, without -i,
    /// is read from the default path).
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Only accept sidecars sealed with this HMAC key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The VMM refuses the body when more than this has passed since it was
    /// planned (1ns to 1h).
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = super::parse_dur)]
    pub valid_for: u64,
    /// Where to write the body (or the whole request with --for-*).
    #[arg(
        short,
        long,
        value_name = "FILE",
        required_unless_present = "api_socket"
    )]
    pub out: Option<PathBuf>,
    /// Send the request (--for-restore / --for-receive) to this VMM API
    /// socket and wait for its answer.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// With --api-socket: give up waiting for the answer after this long.
    #[arg(long, value_name = "DUR", default_value = "30m", value_parser = super::parse_dur)]
    pub send_timeout: u64,
    /// Write a vm.restore body with this source_url.
    #[arg(long, value_name = "URL", conflicts_with = "for_receive")]
    pub for_restore: Option<String>,
    /// Write a vm.receive-migration body with this receiver_url.
    #[arg(long, value_name = "URL")]
    pub for_receive: Option<String>,
    /// With --for-*: resume=false (the VM stays paused after the apply).
    #[arg(long)]
    pub no_resume: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// This host's TSC rate in kHz, when known better than clockcarry finds it.
    #[arg(long, value_name = "KHZ", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub host_tsc_khz: Option<u32>,
}

/// What `arm` did.
#[derive(Debug, Serialize)]
struct ArmReport {
    vm_id: String,
    sidecar: String,
    /// The file written, if any.
    out: Option<String>,
    /// `clock`, or `vm.restore` / `vm.receive-migration`.
    wrote: &'static str,
    /// With --api-socket: the VMM's answer.
    sent: Option<Sent>,
    mode: PlanMode,
    /// The plan's time from the capture to this host's sample, ns.
    elapsed_ns: u64,
    error_bound_ns: u64,
    /// The bound's parts, as `restore --json` reports them.
    error_bound: ErrorBound,
    planned_tai_ns: u64,
    valid_for_ns: u64,
    /// `planned_tai_ns + valid_for_ns`.
    valid_until_tai_ns: u64,
    vcpus: usize,
    notes: Vec<String>,
    clock: ClockPut,
}

/// What the VMM answered to the request `arm` sent.
#[derive(Debug, Serialize)]
struct Sent {
    api_socket: String,
    endpoint: &'static str,
    status: u16,
    /// The kvm-clock error the VMM reports for the applied clock, ns.
    kvmclock_error_ns: Option<i64>,
    /// The answer's JSON body as it came.
    answer: Option<serde_json::Value>,
}

/// The request wrapped around the body, with `--for-*`.
#[derive(Serialize)]
struct RestoreRequest<'a> {
    source_url: &'a str,
    resume: bool,
    clock: &'a ClockPut,
}

#[derive(Serialize)]
struct ReceiveRequest<'a> {
    receiver_url: &'a str,
    resume: bool,
    clock: &'a ClockPut,
}

fn check_url(flag: &str, url: &str) -> CliResult<()> {
    if url.is_empty() || url.len() > MAX_URL_BYTES || url.chars().any(char::is_control) {
        return Err(CliError::bad_input(format!(
            "{flag}: a URL of 1 to {MAX_URL_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn arm_error(err: &ArmPlanError) -> CliError {
    match err {
        ArmPlanError::Plan(e) => plan_error(e),
        other => CliError::bad_input(format!("refused: {other}")),
    }
}

pub fn run(args: &ArmArgs) -> CliResult<Exit> {
    for (flag, url) in [
        ("--for-restore", &args.for_restore),
        ("--for-receive", &args.for_receive),
    ] {
        if let Some(u) = url {
            check_url(flag, u)?;
        }
    }
    if args.no_resume && args.for_restore.is_none() && args.for_receive.is_none() {
        return Err(CliError::bad_input(
            "--no-resume: only with --for-restore or --for-receive (the body alone has no resume)",
        ));
    }
    let send_to =
        match (&args.api_socket, &args.for_restore, &args.for_receive) {
            (None, _, _) => None,
            (Some(_), None, None) => return Err(CliError::bad_input(
                "--api-socket: give --for-restore URL or --for-receive URL (the request to send)",
            )),
            (Some(p), Some(_), _) => Some((p, ArmedRequest::Restore)),
            (Some(p), None, Some(_)) => Some((p, ArmedRequest::ReceiveMigration)),
        };
    let path = common::sidecar_path(args.input.as_deref(), args.vm.as_deref())?;
    if let Some(vm) = &args.vm {
        super::metrics::note(vm, |_| {});
    }
    let key = common::load_key(args.key.as_deref())?;
    let sidecar = common::read_sidecar(&path, key.as_ref())?;
    let body = &sidecar.body;
    super::metrics::note(&body.vm.id, |_| {});
    common::check_sidecar_vm(&path, &sidecar, args.vm.as_deref())?;
    let (identity, rate) = hostinfo::identity(args.host_tsc_khz)?;
    let sample = hostinfo::sample(rate.khz)?;
    let policy = args.policy.policy();
    let Armed { plan, put } = plan_armed(
        body,
        identity,
        sample.clone(),
        Some(body.vm.id.clone()),
        &policy,
        args.valid_for,
    )
    .map_err(|e| arm_error(&e))?;
    super::metrics::note(&body.vm.id, |m| {
        m.mode = Some(super::restore::mode_name(plan.mode).to_string());
        m.error_bound_ns = Some(plan.error_bound.total_ns);
    });

    let resume = !args.no_resume;
    let (wrote, bytes) = match (&args.for_restore, &args.for_receive) {
        (Some(url), _) => (
            "vm.restore",
            serde_json::to_vec_pretty(&RestoreRequest {
                source_url: url,
                resume,
                clock: &put,
            }),
        ),
        (None, Some(url)) => (
            "vm.receive-migration",
            serde_json::to_vec_pretty(&ReceiveRequest {
                receiver_url: url,
                resume,
                clock: &put,
            }),
        ),
        (None, None) => ("clock", serde_json::to_vec_pretty(&put)),
    };
    let bytes = bytes.map_err(|e| CliError::internal(format!("cannot encode the body: {e}")))?;
    if let Some(out) = &args.out {
        clockcarry::fsio::write_atomic(out, &bytes).map_err(|e| {
            CliError::new(Exit::Internal, format!("cannot write the armed body: {e}"))
        })?;
    }
    let sent = match send_to {
        Some((socket, which)) => Some(send(socket, which, &bytes, args.send_timeout)?),
        None => None,
    };

    let rep = ArmReport {
        vm_id: body.vm.id.clone(),
        sidecar: path.display().to_string(),
        out: args.out.as_ref().map(|p| p.display().to_string()),
        wrote,
        sent,
        mode: plan.mode,
        elapsed_ns: plan.elapsed_ns,
        error_bound_ns: plan.error_bound.total_ns,
        error_bound: plan.error_bound,
        planned_tai_ns: sample.tai_ns,
        valid_for_ns: args.valid_for,
        valid_until_tai_ns: sample.tai_ns.saturating_add(args.valid_for),
        vcpus: plan.tsc_offsets.len(),
        notes: plan.notes.clone(),
        clock: put,
    };
    if args.json {
        print_json(&rep)?;
    } else {
        print_report(&human(&rep));
    }
    Ok(Exit::Ok)
}

/// Sends the armed request and reads the VMM's typed answer.
fn send(socket: &Path, which: ArmedRequest, body: &[u8], timeout_ns: u64) -> CliResult<Sent> {
    let client = ApiClient::new(
        socket,
        ApiOptions {
            request_timeout: Duration::from_nanos(timeout_ns),
            ..ApiOptions::default()
        },
    );
    let endpoint = which.endpoint();
    match client.put_armed(which, body) {
        Ok(answer) => Ok(Sent {
            api_socket: socket.display().to_string(),
            endpoint,
            status: answer.status,
            kvmclock_error_ns: answer.kvmclock_error_ns(),
            answer: answer.body,
        }),
        Err(e) => {
            let outcome = match &e {
                ApiError::Vmm { failure, .. } => failure.as_ref().map(|f| f.outcome),
                _ => None,
            };
            let (exit, next) = match outcome {
                Some(PutOutcome::Refused) => (
                    Exit::Refused,
                    "the VMM refused the armed clock and left the VM restored and paused: run \
                     `clockcarry restore`, or resume with the VMM's own clock",
                ),
                _ if !e.request_sent() => (Exit::Vmm, "nothing reached the VMM"),
                _ => (
                    Exit::Vmm,
                    "check the VM's state (GET vm.info, GET vm.clock) before resuming it",
                ),
            };
            Err(CliError::new(exit, format!("{endpoint}: {e}")).with_hint(next))
        }
    }
}

fn human(rep: &ArmReport) -> String {
    let mode = match rep.mode {
        PlanMode::SameHost => "same host: the captured offsets, copied",
        PlanMode::CrossHost => "cross-host: capture value + elapsed TAI time",
    };
    let mut s = format!(
        "armed VM {}: {} vCPUs, {mode}\n  \
         planned       {} after the capture, error bound {}\n  \
         valid for     {} (the VMM refuses it after that, or on another host)\n  \
         wrote         {} ({})\n",
        rep.vm_id,
        rep.vcpus,
        human_ns(rep.elapsed_ns),
        human_ns(rep.error_bound_ns),
        human_ns(rep.valid_for_ns),
        rep.out.as_deref().unwrap_or("-"),
        rep.wrote,
    );
    for n in &rep.notes {
        s.push_str(&format!("  note          {n}\n"));
    }
    match &rep.sent {
        Some(sent) => {
            let err = sent
                .kvmclock_error_ns
                .map_or_else(|| "not reported".to_string(), |e| format!("{e} ns"));
            s.push_str(&format!(
                "  sent          {} to {}: HTTP {}, the clock applied, kvm-clock error {err}\n",
                sent.endpoint, sent.api_socket, sent.status
            ));
        }
        None => s.push_str(
            "next: pause and move the VM; the VMM applies this clock before its first vCPU run \
             (or refuses it, naming the field, and leaves the VM paused)\n",
        ),
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_validity_is_the_librarys() {
        assert_eq!(
            super::super::parse_dur("10m"),
            Ok(clockcarry::armed::DEFAULT_VALID_FOR_NS)
        );
    }
}
