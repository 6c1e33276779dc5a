//! `clockcarry-conformance`: one conformance suite for the vm.clock API,
//! run against any VMM's API socket (docs/conformance.md).
//!
//! Exit status: 0 when no check failed (skips allowed), 1 when one did, 2
//! when the suite could not start (bad arguments, the reference VMM would
//! not boot, snapshot or restore).

mod boot;
mod http;
mod suite;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use suite::{CheckResult, Suite, Verdict};

/// Checks a VMM's vm.clock API against the one contract (GET and PUT
/// /api/v1/vm.clock: typed replies, refusals, rollback, states).
#[derive(Debug, Parser)]
#[command(name = "clockcarry-conformance", version)]
struct Args {
    /// The API socket of a VM restored or received PAUSED whose vCPUs have
    /// not run since. The suite resumes and pauses it again: use a
    /// throwaway VM.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "boot_refvmm",
        conflicts_with = "boot_refvmm"
    )]
    api_socket: Option<PathBuf>,
    /// Prepare the VM with this reference VMM binary: boot the embedded
    /// probe guest, run it ~100 ms, pause, snapshot, restore it paused in a
    /// second process, and check that one.
    #[arg(long, value_name = "BIN")]
    boot_refvmm: Option<PathBuf>,
    /// vCPUs of the VM booted with --boot-refvmm (1 to 8).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: u32,
    /// One JSON object per check and a summary object on stdout; the plain
    /// closing line goes to stderr.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let (socket, target, _restored) = match (&args.api_socket, &args.boot_refvmm) {
        (Some(socket), _) => (socket.clone(), "api-socket".to_string(), None),
        (None, Some(bin)) => match boot::restored_refvmm(bin, args.cpus) {
            Ok(r) => {
                let what = format!(
                    "reference VMM {} ({} vCPUs, probe run {} ms, snapshot, restored paused; \
                     setup {} ms)",
                    bin.display(),
                    r.cpus,
                    boot::RUN_BEFORE_SNAPSHOT_MS,
                    r.setup_ms
                );
                (r.socket.clone(), what, Some(r))
            }
            Err(e) => {
                eprintln!("clockcarry-conformance: cannot prepare the VM: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => {
            eprintln!("clockcarry-conformance: give --api-socket PATH or --boot-refvmm BIN");
            return ExitCode::from(2);
        }
    };
    let version = vmm_version(&socket);
    if args.json {
        println!(
            "{}",
            json!({"suite": "clockcarry-conformance", "socket": socket.display().to_string(),
                   "target": target, "vmm": version})
        );
    } else {
        println!(
            "clockcarry-conformance {}: vm.clock API on {} ({target}; vmm.ping: {version})",
            env!("CARGO_PKG_VERSION"),
            socket.display()
        );
    }
    let json_mode = args.json;
    let mut print = |r: &CheckResult| print_result(r, json_mode);
    let checks_started = Instant::now();
    let results = Suite::new(&socket, &mut print).run();
    let checks_ms = u64::try_from(checks_started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let count = |v: Verdict| results.iter().filter(|r| r.verdict == v).count();
    let (passed, failed, skipped) = (
        count(Verdict::Pass),
        count(Verdict::Fail),
        count(Verdict::Skip),
    );
    let closing = format!("conformance: {passed} passed, {failed} failed, {skipped} skipped");
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if json_mode {
        println!(
            "{}",
            json!({"summary": {"checks": results.len(), "passed": passed, "failed": failed,
                               "skipped": skipped, "checks_ms": checks_ms,
                               "duration_ms": elapsed_ms}})
        );
        eprintln!("{closing}");
    } else {
        println!("time: checks {checks_ms} ms, in all {elapsed_ms} ms");
        println!("{closing}");
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_result(r: &CheckResult, json_mode: bool) {
    if json_mode {
        let result = match r.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Skip => "skip",
        };
        println!(
            "{}",
            json!({"check": r.id, "result": result, "reason": r.reason,
                   "duration_us": r.duration_us})
        );
    } else {
        println!("{:<44} {}: {}", r.id, r.verdict.word(), r.reason);
    }
}

/// What the VMM says it is (vmm.ping's `build_version`/`version`), for the
/// header; never a check.
fn vmm_version(socket: &std::path::Path) -> String {
    let answer = http::request(
        socket,
        "GET",
        "/api/v1/vmm.ping",
        None,
        Duration::from_secs(5),
    );
    match answer {
        Ok(a) if a.status == 200 => match serde_json::from_slice::<Value>(&a.body) {
            Ok(v) => v
                .get("build_version")
                .or_else(|| v.get("version"))
                .and_then(Value::as_str)
                .map(http::clip_text)
                .unwrap_or_else(|| "no build_version".into()),
            Err(_) => "not JSON".into(),
        },
        Ok(a) => format!("HTTP {}", a.status),
        Err(e) => e,
    }
}
