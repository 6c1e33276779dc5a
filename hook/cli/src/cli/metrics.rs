//! Prometheus metrics for node_exporter's textfile collector: with
//! `$CLOCKCARRY_METRICS_DIR` set, every `capture`, `restore` and `arm` of a
//! VM rewrites `<dir>/clockcarry_<VM>.prom` (atomically, mode 0644, so the
//! collector never reads half a file) with the last run of each operation
//! on that VM and counters of runs and failures (docs/metrics.md).
//!
//! The counters live in `<dir>/.clockcarry_<VM>.state.json` (mode 0600;
//! the collector reads only `*.prom`); a read-modify-write holds an `flock`
//! on `<dir>/.clockcarry_<VM>.lock`, so two runs never lose a count. A
//! metrics failure is logged and never changes the command's exit status.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::exit::Exit;

/// The directory the `.prom` files go to (unset or empty: no metrics).
pub const METRICS_DIR_ENV: &str = "CLOCKCARRY_METRICS_DIR";

/// Largest state file read, bytes.
const MAX_STATE_BYTES: usize = 1 << 20;

/// The last run of one operation on one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    /// When it ended, Unix time in seconds.
    pub timestamp_s: f64,
    pub exit_code: u8,
    /// `restore`: the outcome (`applied`, `refused`, ...).
    pub outcome: Option<String>,
    /// `restore` / `arm`: `same-host` or `cross-host`.
    pub mode: Option<String>,
    /// The plan's error bound on the guest TSC, ns.
    pub error_bound_ns: Option<u64>,
    /// `restore`: kvm-clock's error against the source line, verified, ns.
    pub kvmclock_error_ns: Option<i64>,
    /// `restore`: start to the PUT's answer, what it added to the blackout, ns.
    pub blackout_added_ns: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// By operation.
    last: BTreeMap<String, LastRun>,
    runs_total: BTreeMap<String, u64>,
    /// By `operation/exit_code`.
    failures_total: BTreeMap<String, u64>,
}

/// What the running command has learnt about its VM, for [`finish`].
static PENDING: Mutex<Option<(String, LastRun)>> = Mutex::new(None);

/// Records (or updates) what this run will report for VM `vm`.
pub fn note(vm: &str, f: impl FnOnce(&mut LastRun)) {
    if let Ok(mut p) = PENDING.lock() {
        let entry = p.get_or_insert_with(|| (vm.to_string(), LastRun::default()));
        entry.0 = vm.to_string();
        f(&mut entry.1);
    }
}

/// Writes this run's metrics when `$CLOCKCARRY_METRICS_DIR` is set and a
/// VM was noted; logs (never fails) otherwise.
///
/// Also logs one structured line per operation (`key=value` pairs, for
/// journald and log search), whether metrics are written or not.
pub fn finish(operation: &str, exit: Exit) {
    let Some((vm, mut run)) = PENDING.lock().ok().and_then(|mut p| p.take()) else {
        log::debug!("metrics: no VM known for this {operation}: nothing written");
        return;
    };
    run.exit_code = exit.code();
    run.timestamp_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    log::info!("{}", log_line(operation, &vm, &run));
    let Some(dir) = std::env::var_os(METRICS_DIR_ENV).filter(|d| !d.is_empty()) else {
        return;
    };
    if let Err(e) = write(Path::new(&dir), &vm, operation, run) {
        log::warn!("metrics: {e}");
    }
}

/// `operation=restore vm="web-1" exit_code=0 outcome=applied ...`: the
/// fields that are known, the VM id quoted (it may hold spaces).
fn log_line(operation: &str, vm: &str, run: &LastRun) -> String {
    let mut s = format!(
        "operation={operation} vm={vm:?} exit_code={}",
        run.exit_code
    );
    let mut field = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            let _ = write!(s, " {k}={v}");
        }
    };
    field("outcome", run.outcome.clone());
    field("mode", run.mode.clone());
    field("error_bound_ns", run.error_bound_ns.map(|v| v.to_string()));
    field(
        "kvmclock_error_ns",
        run.kvmclock_error_ns.map(|v| v.to_string()),
    );
    field(
        "blackout_added_ns",
        run.blackout_added_ns.map(|v| v.to_string()),
    );
    s
}

/// A file name part for `vm`: the id itself when it is a safe file name.
fn file_stem(vm: &str) -> Result<String, String> {
    super::common::check_path_vm_id(vm)
        .map(|()| format!("clockcarry_{vm}"))
        .map_err(|e| format!("no metrics file for VM {vm:?}: {}", e.message))
}

fn write(dir: &Path, vm: &str, operation: &str, run: LastRun) -> Result<(), String> {
    let stem = file_stem(vm)?;
    let lock_path = dir.join(format!(".{stem}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no pointer involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "{}: flock: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let state_path = dir.join(format!(".{stem}.state.json"));
    let mut state = read_state(&state_path);
    *state.runs_total.entry(operation.to_string()).or_default() += 1;
    if run.exit_code != 0 {
        *state
            .failures_total
            .entry(format!("{operation}/{}", run.exit_code))
            .or_default() += 1;
    }
    state.last.insert(operation.to_string(), run);
    let json = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
    clockcarry::fsio::write_atomic(&state_path, &json).map_err(|e| e.to_string())?;
    let prom = dir.join(format!("{stem}.prom"));
    let staged = clockcarry::fsio::StagedFile::create(&prom, render(vm, &state).as_bytes())
        .map_err(|e| e.to_string())?;
    std::fs::set_permissions(staged.temp_path(), std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("{}: {e}", staged.temp_path().display()))?;
    staged.commit().map_err(|e| e.to_string())?;
    drop(lock);
    Ok(())
}

/// The state, or a fresh one when it is missing or unreadable (logged).
fn read_state(path: &Path) -> State {
    match clockcarry::fsio::read_bounded(path, MAX_STATE_BYTES) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            log::warn!("metrics: {}: {e}: counters start again", path.display());
            State::default()
        }),
        Err(_) => State::default(),
    }
}

/// A label value in the exposition format: `\`, `"` and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One metric family: name, type, help, and its samples' extra labels
/// (after `vm`) with their values.
type Family = (&'static str, &'static str, &'static str, Vec<(String, f64)>);

/// The `.prom` text: one HELP and TYPE per family, then its samples.
fn render(vm: &str, state: &State) -> String {
    let vm = label(vm);
    let mut out = String::new();
    let families = last_run_families(state)
        .into_iter()
        .chain(counter_families(state));
    for (name, kind, help, samples) in families {
        if samples.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{vm=\"{vm}\"{labels}}} {value}");
        }
    }
    out
}

/// The gauges of the last run of each operation.
fn last_run_families(state: &State) -> Vec<Family> {
    let per_op = |f: &dyn Fn(&LastRun) -> Option<f64>| -> Vec<(String, f64)> {
        state
            .last
            .iter()
            .filter_map(|(op, r)| f(r).map(|v| (format!(",operation=\"{}\"", label(op)), v)))
            .collect()
    };
    let restore = state.last.get("restore");
    let only = |v: Option<f64>| v.map(|v| vec![(String::new(), v)]).unwrap_or_default();
    vec![
        (
            "clockcarry_last_run_timestamp_seconds",
            "gauge",
            "When the last run of the operation on this VM ended, Unix time.",
            per_op(&|r| Some(r.timestamp_s)),
        ),
        (
            "clockcarry_last_run_success",
            "gauge",
            "1 when the last run of the operation exited 0, else 0.",
            per_op(&|r| Some(if r.exit_code == 0 { 1.0 } else { 0.0 })),
        ),
        (
            "clockcarry_last_run_exit_code",
            "gauge",
            "The exit status of the last run of the operation (docs/cli.md).",
            per_op(&|r| Some(f64::from(r.exit_code))),
        ),
        (
            "clockcarry_last_run_error_bound_seconds",
            "gauge",
            "The plan's error bound on the guest TSC in the last run.",
            per_op(&|r| r.error_bound_ns.map(ns_to_s)),
        ),
        (
            "clockcarry_last_restore_kvmclock_error_seconds",
            "gauge",
            "kvm-clock against the source line after the last restore, verified.",
            only(
                restore
                    .and_then(|r| r.kvmclock_error_ns)
                    .map(|e| e as f64 / 1e9),
            ),
        ),
        (
            "clockcarry_last_restore_blackout_added_seconds",
            "gauge",
            "What the last restore added to the blackout: its start to the PUT's answer.",
            only(restore.and_then(|r| r.blackout_added_ns).map(ns_to_s)),
        ),
        (
            "clockcarry_last_run_info",
            "gauge",
            "The last run's outcome and plan mode, as labels (value 1).",
            state
                .last
                .iter()
                .map(|(op, r)| {
                    let labels = format!(
                        ",operation=\"{}\",outcome=\"{}\",mode=\"{}\"",
                        label(op),
                        label(r.outcome.as_deref().unwrap_or("")),
                        label(r.mode.as_deref().unwrap_or(""))
                    );
                    (labels, 1.0)
                })
                .collect(),
        ),
    ]
}

/// The counters of runs and failures.
fn counter_families(state: &State) -> Vec<Family> {
    vec![
        (
            "clockcarry_runs_total",
            "counter",
            "Runs of the operation on this VM.",
            state
                .runs_total
                .iter()
                .map(|(op, n)| (format!(",operation=\"{}\"", label(op)), *n as f64))
                .collect(),
        ),
        (
            "clockcarry_failures_total",
            "counter",
            "Runs of the operation on this VM that exited non-zero, by exit status.",
            state
                .failures_total
                .iter()
                .map(|(key, n)| {
                    let (op, code) = key.split_once('/').unwrap_or((key.as_str(), ""));
                    let labels =
                        format!(",operation=\"{}\",exit_code=\"{}\"", label(op), label(code));
                    (labels, *n as f64)
                })
                .collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_has_the_known_fields_only() {
        let run = LastRun {
            exit_code: 3,
            outcome: Some("refused".into()),
            error_bound_ns: Some(0),
            ..LastRun::default()
        };
        assert_eq!(
            log_line("restore", "web 1", &run),
            "operation=restore vm=\"web 1\" exit_code=3 outcome=refused error_bound_ns=0"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_vm_id_that_cannot_name_a_file_gets_none() {
        assert!(file_stem("../etc").is_err());
        assert_eq!(file_stem("web-1").unwrap(), "clockcarry_web-1");
    }
}
