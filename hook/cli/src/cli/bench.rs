//! `clockcarry bench-restore`: the blackout `clockcarry restore` adds,
//! measured from outside over many runs.
//!
//! Each run re-executes this binary as `clockcarry restore ... --json` and
//! takes CLOCK_MONOTONIC_RAW just before the spawn; the child reports the
//! CLOCK_MONOTONIC_RAW instant its PUT was answered. The difference is the
//! blackout the tool adds: process creation, exec, dynamic linking, sidecar,
//! GET, host sample, plan, PUT. The verifying GET and the report come after
//! the VMM has its clock and are reported separately (`exit_ns`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::Args;
use clockcarry::host;
use serde::Serialize;
use serde_json::Value;

use super::common::{print_json, print_text};
use super::exit::{CliError, CliResult, Exit, EXIT_STATUS_HELP};
use super::units::human_ns;
use super::{ApiArgs, PolicyArgs};

const LONG_ABOUT: &str = "\
Measure the blackout `clockcarry restore` adds, over many runs.

DESCRIPTION
    Runs `clockcarry restore --json` (this very binary, re-executed) --runs
    times against the VMM at --api-socket with the sidecar -i, after
    --warmup runs that are not counted (the first run after a boot also
    finds and caches the host TSC rate). The VM must be Paused and must
    accept repeated PUT /api/v1/vm.clock while paused (the reference VMM
    does: a PUT is allowed until the vCPUs run).

    For each run the blackout is CLOCK_MONOTONIC_RAW from just before the
    spawn to the instant the child's PUT was answered (the child reports
    it). Prints the median, p99 (nearest rank: for 50 runs, the largest),
    minimum, maximum and mean, the same for the part spent inside the
    process (from main to the PUT answered) and for the whole run (spawn to
    exit). Any failed run stops the benchmark with that run's error.";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    clockcarry bench-restore --api-socket /run/refvmm.sock -i web-1.sidecar.json --runs 50 --json"
    )
}

/// Measure the blackout `clockcarry restore` adds, over many runs.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct BenchArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The sidecar to restore from, every run.
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// The VM the sidecar must belong to.
    #[arg(long, value_name = "ID")]
    vm: Option<String>,
    /// Runs measured.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    runs: u32,
    /// Runs before the measured ones, not counted.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=1000))]
    warmup: u32,
    #[command(flatten)]
    policy: PolicyArgs,
    /// HMAC key for the sidecar.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Order statistics of a set of durations, ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub median: u64,
    pub p99: u64,
    pub min: u64,
    pub max: u64,
    pub mean: u64,
}

/// Median (mean of the two middle values for an even count), p99 (nearest
/// rank), min, max, mean; `None` for no values.
pub fn stats(values: &[u64]) -> Option<Stats> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    let min = *v.first()?;
    let max = *v.last()?;
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        let (a, b) = (u128::from(v[n / 2 - 1]), u128::from(v[n / 2]));
        u64::try_from((a + b) / 2).unwrap_or(u64::MAX)
    };
    // Nearest rank: the ceil(0.99 n)-th smallest value.
    let rank = (n * 99).div_ceil(100).max(1);
    let p99 = v[rank - 1];
    let sum: u128 = v.iter().map(|x| u128::from(*x)).sum();
    let mean = u64::try_from(sum / n as u128).unwrap_or(u64::MAX);
    Some(Stats {
        median,
        p99,
        min,
        max,
        mean,
    })
}

#[derive(Serialize)]
struct BenchOutput {
    runs: u32,
    warmup: u32,
    binary: String,
    api_socket: String,
    sidecar: String,
    mode: Option<Value>,
    /// Spawn to PUT answered: the blackout restore adds.
    blackout_ns: Stats,
    /// main() to PUT answered.
    in_process_ns: Stats,
    /// Spawn to exit (includes the verifying GET and the report).
    exit_ns: Stats,
    /// Median of each step inside the process (the child's `timings`).
    steps_median_ns: serde_json::Map<String, Value>,
    /// The first warm-up run's blackout, when there was one.
    first_run_blackout_ns: Option<u64>,
    samples_blackout_ns: Vec<u64>,
}

struct RunResult {
    blackout_ns: u64,
    in_process_ns: u64,
    exit_ns: u64,
    mode: Option<Value>,
    /// The child's own step timings (`timings.*_ns`).
    steps: Vec<(String, u64)>,
}

/// The steps of a restore whose medians the benchmark reports.
const STEPS: [&str; 7] = [
    "parse_ns",
    "read_sidecar_ns",
    "get_ns",
    "host_ns",
    "plan_ns",
    "put_ns",
    "verify_ns",
];

fn now_raw() -> CliResult<u64> {
    host::monotonic_raw_now_ns()
        .map_err(|e| CliError::internal(format!("CLOCK_MONOTONIC_RAW: {e}")))
}

fn one_run(exe: &PathBuf, argv: &[String]) -> CliResult<RunResult> {
    let t0 = now_raw()?;
    let child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::internal(format!("cannot run {}: {e}", exe.display())))?;
    let out = child
        .wait_with_output()
        .map_err(|e| CliError::internal(format!("waiting for {}: {e}", exe.display())))?;
    let t_exit = now_raw()?;
    let report: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    let code = out.status.code();
    if code != Some(0) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let exit = match code {
            Some(3) => Exit::Refused,
            Some(2) => Exit::BadInput,
            Some(5) => Exit::RolledBack,
            Some(6) => Exit::Unknown,
            Some(4) => Exit::Vmm,
            _ => Exit::Internal,
        };
        return Err(CliError::new(
            exit,
            format!(
                "a restore run failed (exit {}): {}",
                code.map_or_else(|| "by signal".to_string(), |c| c.to_string()),
                stderr.trim()
            ),
        ));
    }
    let report = report
        .ok_or_else(|| CliError::internal("a restore run printed no JSON report".to_string()))?;
    let timings = report.get("timings");
    let get = |k: &str| timings.and_then(|t| t.get(k)).and_then(Value::as_u64);
    let answered = get("put_answered_monotonic_raw_ns").ok_or_else(|| {
        CliError::internal("a restore run reported no PUT time (was it a dry run?)".to_string())
    })?;
    Ok(RunResult {
        blackout_ns: answered.saturating_sub(t0),
        in_process_ns: get("to_put_answered_ns").unwrap_or(0),
        exit_ns: t_exit.saturating_sub(t0),
        mode: report.get("summary").and_then(|s| s.get("mode")).cloned(),
        steps: STEPS
            .iter()
            .map(|k| (k.to_string(), get(k).unwrap_or(0)))
            .collect(),
    })
}

/// The flag naming the VMM's socket in the `restore` command line.
fn socket_flag(api: &ApiArgs) -> &'static str {
    if api.qmp_socket.is_some() {
        "--qmp-socket"
    } else {
        "--api-socket"
    }
}

pub fn run(args: &BenchArgs) -> CliResult<Exit> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::internal(format!("cannot find this binary: {e}")))?;
    let mut argv = vec![
        "restore".to_string(),
        "--json".to_string(),
        "--quiet".to_string(),
        "--log-target".to_string(),
        "stderr".to_string(),
        socket_flag(&args.api).to_string(),
        args.api.socket().display().to_string(),
        "--connect-timeout".to_string(),
        format!("{}ns", args.api.connect_timeout),
        "--api-timeout".to_string(),
        format!("{}ns", args.api.api_timeout),
        "-i".to_string(),
        args.input.display().to_string(),
    ];
    if let Some(vm) = &args.vm {
        argv.push("--vm".into());
        argv.push(vm.clone());
    }
    if let Some(k) = &args.key {
        argv.push("--key".into());
        argv.push(k.display().to_string());
    }
    argv.extend(args.policy.to_args());

    let mut first = None;
    for i in 0..args.warmup {
        let r = one_run(&exe, &argv)?;
        if i == 0 {
            first = Some(r.blackout_ns);
        }
    }
    let mut results = Vec::new();
    for _ in 0..args.runs {
        results.push(one_run(&exe, &argv)?);
    }
    let pick = |f: fn(&RunResult) -> u64| -> Vec<u64> { results.iter().map(f).collect() };
    let blackout = pick(|r| r.blackout_ns);
    let none = || CliError::internal("no run measured");
    let out = BenchOutput {
        runs: args.runs,
        warmup: args.warmup,
        binary: exe.display().to_string(),
        api_socket: args.api.socket().display().to_string(),
        sidecar: args.input.display().to_string(),
        mode: results.first().and_then(|r| r.mode.clone()),
        blackout_ns: stats(&blackout).ok_or_else(none)?,
        in_process_ns: stats(&pick(|r| r.in_process_ns)).ok_or_else(none)?,
        exit_ns: stats(&pick(|r| r.exit_ns)).ok_or_else(none)?,
        steps_median_ns: STEPS
            .iter()
            .map(|k| {
                let v: Vec<u64> = results
                    .iter()
                    .filter_map(|r| r.steps.iter().find(|(n, _)| n == k).map(|(_, ns)| *ns))
                    .collect();
                (
                    k.to_string(),
                    Value::from(stats(&v).map_or(0, |s| s.median)),
                )
            })
            .collect(),
        first_run_blackout_ns: first,
        samples_blackout_ns: blackout,
    };
    if args.json {
        print_json(&out)?;
    } else {
        let row = |name: &str, s: &Stats| {
            format!(
                "  {name:<28} median {:>12}  p99 {:>12}  min {:>12}  max {:>12}\n",
                human_ns(s.median),
                human_ns(s.p99),
                human_ns(s.min),
                human_ns(s.max)
            )
        };
        let mut text = format!(
            "clockcarry restore, {} runs (+{} warm-up) against {}\n",
            out.runs, out.warmup, out.api_socket
        );
        text.push_str(&row("spawn -> PUT answered", &out.blackout_ns));
        text.push_str(&row("main() -> PUT answered", &out.in_process_ns));
        text.push_str(&row("spawn -> exit", &out.exit_ns));
        let steps: Vec<String> = out
            .steps_median_ns
            .iter()
            .map(|(k, v)| {
                format!(
                    "{} {}",
                    k.trim_end_matches("_ns"),
                    human_ns(v.as_u64().unwrap_or(0))
                )
            })
            .collect();
        text.push_str(&format!("  step medians: {}\n", steps.join(", ")));
        print_text(&text);
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_statistics() {
        assert_eq!(stats(&[]), None);
        let s = stats(&[5]).unwrap_or(Stats {
            median: 0,
            p99: 0,
            min: 0,
            max: 0,
            mean: 0,
        });
        assert_eq!((s.median, s.p99, s.min, s.max, s.mean), (5, 5, 5, 5, 5));
        let v: Vec<u64> = (1..=50).rev().collect();
        let s = stats(&v).unwrap_or(Stats {
            median: 0,
            p99: 0,
            min: 0,
            max: 0,
            mean: 0,
        });
        assert_eq!((s.median, s.p99, s.min, s.max), (25, 50, 1, 50));
        let v: Vec<u64> = (1..=200).collect();
        assert_eq!(stats(&v).map(|s| s.p99), Some(198));
        assert_eq!(
            stats(&[u64::MAX, u64::MAX]).map(|s| s.median),
            Some(u64::MAX)
        );
    }
}
