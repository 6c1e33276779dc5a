//! What each run of the demo is doing, and the processes it started: for
//! `--verbose` (one line per step on stderr), and for the watchdog that
//! ends a demo that hangs (`--timeout-s`), saying where each unfinished run
//! was and killing the processes it started, instead of leaving a CI job
//! (or the KVM lab's own timeout) to kill it silently.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Exit status of a demo the watchdog ended.
pub const TIMED_OUT: i32 = 3;

static VERBOSE: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct State {
    /// Run -> (its last step, when it began).
    steps: BTreeMap<String, (String, Instant)>,
    /// Processes started and not yet reaped.
    children: BTreeSet<u32>,
}

fn state() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Prints every step on stderr from now on.
pub fn set_verbose(on: bool) {
    let _ = started();
    VERBOSE.store(on, Ordering::Relaxed);
}

/// `run` begins `step`.
pub fn note(run: &str, step: &str) {
    let now = Instant::now();
    if VERBOSE.load(Ordering::Relaxed) {
        eprintln!(
            "[{:>8.3} s] {run}: {step}",
            now.duration_since(started()).as_secs_f64()
        );
    }
    state()
        .steps
        .insert(run.to_string(), (step.to_string(), now));
}

/// `run` has finished.
pub fn done(run: &str) {
    note(run, "done");
    state().steps.remove(run);
}

/// A process was started.
pub fn add_child(pid: u32) {
    state().children.insert(pid);
}

/// A process was reaped.
pub fn remove_child(pid: u32) {
    state().children.remove(&pid);
}

/// Ends the demo after `timeout`: prints each unfinished run's last step,
/// SIGKILLs every process it started, exits with [`TIMED_OUT`].
pub fn watchdog(timeout: Duration) {
    let _ = started();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(timeout);
            let s = state();
            eprintln!(
                "clockcarry-demo: TIMEOUT: still running after {} s (--timeout-s); unfinished runs:",
                timeout.as_secs()
            );
            for (run, (step, since)) in &s.steps {
                eprintln!(
                    "  {run}: {step} (for {:.1} s)",
                    since.elapsed().as_secs_f64()
                );
            }
            for pid in &s.children {
                if let Ok(pid) = i32::try_from(*pid) {
                    // A child of ours that was not reaped.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            eprintln!(
                "clockcarry-demo: FAIL: timed out; killed {} processes",
                s.children.len()
            );
            std::process::exit(TIMED_OUT);
        });
    if let Err(e) = spawned {
        eprintln!("clockcarry-demo: no watchdog: {e}");
    }
}
