//! The four suites. Each round: a new VMM restores the snapshot Paused; the
//! offsets before and the plan's (`--dry-run --json`) are read; the fault;
//! the offsets after; a rerun of `clockcarry restore` (exit 0, offsets the
//! plan's); resume, let the probe run, check its log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    classify, clock_put, get_clock, resume_and_check, Env, Offsets, Vmm, INJECT_OFFSETS,
};
use crate::proxy::{Event, Phase, Proxy, Trigger};
use crate::util::{kill9, ms, now_ns, sleep_until, Proc, Rng};

const WAIT: Duration = Duration::from_secs(30);
const CLOCK: &str = "/api/v1/vm.clock";

/// Counts for one suite, printed as one JSON line.
pub struct Summary {
    pub suite: &'static str,
    fields: Vec<(String, Value)>,
    pub pass: bool,
    pub t0: u64,
}

impl Summary {
    fn new(suite: &'static str) -> Summary {
        Summary {
            suite,
            fields: Vec::new(),
            pass: true,
            t0: now_ns(),
        }
    }

    fn set(&mut self, k: &str, v: Value) {
        self.fields.push((k.to_string(), v));
    }

    /// `{"suite":..., fields in order..., "duration_s":..., "pass":...}`
    pub fn line(&self, env: &Env) -> String {
        let mut parts = vec![
            format!("\"suite\":{}", json!(self.suite)),
            format!("\"env\":{}", json!(env.label)),
        ];
        for (k, v) in &self.fields {
            parts.push(format!("{}:{}", json!(k), v));
        }
        let secs = (now_ns() - self.t0) as f64 / 1e9;
        parts.push(format!("\"duration_s\":{:.1}", secs));
        parts.push(format!("\"pass\":{}", self.pass));
        format!("{{{}}}", parts.join(","))
    }
}

#[derive(Default)]
struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add(&mut self, k: impl Into<String>) {
        *self.0.entry(k.into()).or_default() += 1;
    }
    fn get(&self, k: &str) -> u64 {
        self.0.get(k).copied().unwrap_or(0)
    }
    fn json(&self) -> Value {
        json!(self.0)
    }
}

/// The counters every suite has.
#[derive(Default)]
struct Common {
    rounds: u64,
    offsets: Tally,
    backwards: u64,
    rerun_ok: u64,
    put_applied: u64,
    /// put_applied means something (the VM outlives the fault).
    track_put: bool,
    errors: u64,
    failures: Vec<String>,
}

impl Common {
    fn fail(&mut self, round: u32, what: String) {
        eprintln!("faults: FAIL round {round}: {what}");
        if self.failures.len() < 10 {
            self.failures.push(format!("round {round}: {what}"));
        }
    }

    fn offsets_json(&self, s: &mut Summary, env: &Env) {
        let checked = env.inert.is_none();
        let n = |k: &str| {
            if checked {
                json!(self.offsets.get(k))
            } else {
                Value::Null
            }
        };
        s.set("all_old", n("all old"));
        s.set("all_new", n("all new"));
        s.set("inconsistent", json!(self.offsets.get("INCONSISTENT")));
        if checked && self.offsets.get("not checked") > 0 {
            s.set(
                "offsets_not_distinct",
                json!(self.offsets.get("not checked")),
            );
        }
    }

    fn finish(&self, s: &mut Summary, env: &Env, mut skipped: Vec<String>) {
        s.set("backwards", json!(self.backwards));
        s.set("rerun_ok", json!(self.rerun_ok));
        if self.track_put {
            s.set("put_applied", json!(self.put_applied));
        }
        if self.errors > 0 {
            s.set("round_errors", json!(self.errors));
        }
        if env.inert.is_some() {
            skipped.insert(
                0,
                "offset_consistency: TSC offsets are inert on this host".into(),
            );
        }
        s.set("skipped_checks", json!(skipped));
        s.set("calibration", env.calib.get().json());
        if !self.failures.is_empty() {
            s.set("failures", json!(self.failures));
        }
        s.pass = s.pass
            && self.errors == 0
            && self.backwards == 0
            && self.offsets.get("INCONSISTENT") == 0
            && self.rerun_ok == self.rounds;
    }
}

/// A restored VM and what a restore should do to it.
struct Round {
    vmm: Vmm,
    old: Vec<i64>,
    planned: Vec<i64>,
}

fn begin(env: &Env, sock: &Path, log: &Path, name: &str) -> Result<Round, String> {
    let mut vmm = env.restored(sock, log, name)?;
    let r = (|| {
        let old = get_clock(sock)?.offsets;
        let planned = env.planned(sock)?;
        Ok::<_, String>((old, planned))
    })();
    match r {
        Ok((old, planned)) => Ok(Round { vmm, old, planned }),
        Err(e) => {
            env.shutdown(&mut vmm);
            Err(e)
        }
    }
}

/// The offsets now, judged against the PUT flag too: a PUT applied with
/// the old offsets in place, or new offsets without a PUT, is inconsistent.
fn judge(env: &Env, r: &Round, sock: &Path) -> Result<(Offsets, bool, String), String> {
    if env.inject.get() & INJECT_OFFSETS != 0 && env.inert.is_none() {
        // Half of a PUT: vCPU 0's offset one cycle off the plan's.
        env.inject.set(env.inject.get() & !INJECT_OFFSETS);
        let mut o = r.planned.clone();
        o[0] = o[0].wrapping_add(1);
        let list: Vec<String> = o.iter().map(|x| x.to_string()).collect();
        let body = format!(
            "{{\"tsc_khz\":null,\"tsc_offsets\":[{}],\"kvmclock\":null}}",
            list.join(",")
        );
        crate::harness::put(sock, "vm.clock", Some(&body))?;
        eprintln!(
            "faults: INJECTED FAILURE: offsets set to {o:?} (plan {:?})",
            r.planned
        );
    }
    let now = get_clock(sock)?;
    let applied = clock_put(sock)?;
    let mut off = classify(env, &r.old, &r.planned, &now.offsets);
    let mut note = String::new();
    if (off == Offsets::AllOld && applied) || (off == Offsets::AllNew && !applied) {
        note = format!("offsets {} but clock_put {applied}", off.name());
        off = Offsets::Inconsistent;
    }
    if off == Offsets::Inconsistent && note.is_empty() {
        note = format!(
            "old {:?} planned {:?} now {:?}",
            r.old, r.planned, now.offsets
        );
    }
    if now.state != "Paused" {
        note = format!("VM {} after the fault; {note}", now.state);
        off = Offsets::Inconsistent;
    }
    Ok((off, applied, note))
}

/// `clockcarry restore` again: must exit 0 and leave the plan's offsets.
fn rerun(env: &Env, sock: &Path, planned: &[i64]) -> Result<u64, String> {
    let (code, _, p) = env.run_restore(sock, "rerun")?;
    let took = p.t_exit.unwrap_or(p.t_spawn) - p.t_spawn;
    if code != 0 {
        return Err(format!("rerun exited {code}: {}", p.stderr_tail()));
    }
    if env.inert.is_none() {
        let now = get_clock(sock)?.offsets;
        if now != planned {
            return Err(format!(
                "rerun exited 0 but offsets are {now:?}, plan {planned:?}"
            ));
        }
    }
    Ok(took)
}

/// Rerun, resume, probe: updates the counters; returns a short note.
fn finish_round(
    env: &Env,
    c: &mut Common,
    i: u32,
    r: &mut Round,
    sock: &Path,
    logs: &[&Path],
) -> String {
    let rr = rerun(env, sock, &r.planned);
    match &rr {
        Ok(_) => c.rerun_ok += 1,
        Err(e) => c.fail(i, e.clone()),
    }
    let probe = resume_and_check(env, &mut r.vmm, logs);
    let back = probe.backwards(env.cpus);
    if back {
        c.backwards += 1;
        c.fail(
            i,
            format!(
                "guest clocks: monotonic {} / analyze {:?}, reports after {:?} {}",
                probe.monotonic, probe.analyze_monotonic, probe.after, probe.detail
            ),
        );
    }
    if !env.keep && rr.is_ok() && !back {
        for l in logs {
            let _ = std::fs::remove_file(l);
        }
    }
    format!(
        "rerun {}, probe {} ({} reports after)",
        match &rr {
            Ok(t) => format!("ok in {}", ms(*t)),
            Err(_) => "FAILED".into(),
        },
        if back {
            "BACKWARDS/SILENT"
        } else {
            "monotonic"
        },
        probe.after.values().sum::<usize>()
    )
}

fn round_log(env: &Env, tag: &str) -> PathBuf {
    env.path(&format!("{tag}.jsonl"))
}

fn report_of(p: &Proc) -> Value {
    serde_json::from_str(&p.stdout()).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------

/// (a) `kill -9` of `clockcarry restore` at a random moment. Rounds cycle
/// through three ways of choosing it:
/// - `uniform`: 0 ..= the typical spawn -> exit time, on the VMM's own
///   socket;
/// - `put_window`: around the typical PUT (calibrated; margin the larger of
///   the PUT time, 200 µs and 10 % of the run), on the VMM's own socket;
/// - `on_put`: through the recording proxy, 0 ..= the typical PUT time after
///   the PUT request arrived: the PUT is in flight (or just answered).
///
/// Where the kill landed is read from evidence, not from the calibration:
/// through the proxy exactly (PUT not yet sent / sent, no answer yet /
/// answered / the process had exited); on the direct socket from whether
/// the VMM applied a PUT.
pub fn kill_restore(env: &Env, rounds: u32, rng: &mut Rng) -> Summary {
    let mut s = Summary::new("kill-restore");
    let mut c = Common {
        track_put: true,
        ..Common::default()
    };
    let (mut landed, mut modes, mut outcomes) =
        (Tally::default(), Tally::default(), Tally::default());
    let sock = env.path("dst.sock");
    let px = env.path("proxy.sock");
    const MODES: [&str; 3] = ["uniform", "put_window", "on_put"];
    for i in 0..rounds {
        c.rounds += 1;
        let tag = format!("kill-restore-{i}");
        crate::util::step(format!("kill-restore round {i}"));
        let cal = env.calib.get();
        let log = round_log(env, &tag);
        let mut r = match begin(env, &sock, &log, &tag) {
            Ok(r) => r,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("setup: {e}"));
                continue;
            }
        };
        let mode = MODES[i as usize % 3];
        modes.add(mode);
        let delay = match mode {
            "uniform" => rng.range(0, cal.exit_ns),
            "put_window" => {
                let m = cal.put_ns().max(200_000).max(cal.exit_ns / 10);
                rng.range(cal.put_start_ns.saturating_sub(m), cal.put_end_ns + m)
            }
            _ => rng.range(0, cal.put_ns()),
        };
        let mut proxy = None;
        let spawned = if mode == "on_put" {
            match Proxy::start(&px, &sock) {
                Ok(p) => {
                    let sp = env.spawn_restore(&px, &tag);
                    proxy = Some(p);
                    sp
                }
                Err(e) => Err(e),
            }
        } else {
            env.spawn_restore(&sock, &tag)
        };
        let mut p = match spawned {
            Ok(p) => p,
            Err(e) => {
                c.errors += 1;
                c.fail(i, e);
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        let (killed, t_kill) = if let Some(px) = proxy.as_ref() {
            // Kill when the PUT has arrived (+ delay); if it never does,
            // the restore ran to its end without one.
            let (tx, rx) = mpsc::channel::<u64>();
            px.set_trigger(Trigger::new("PUT", CLOCK, Phase::RequestReceived, 1, tx));
            let mut killed = (false, 0);
            let end = now_ns() + WAIT.as_nanos() as u64;
            while now_ns() < end {
                if let Ok(t) = rx.recv_timeout(Duration::from_millis(20)) {
                    sleep_until(t + delay);
                    killed = (p.kill(), now_ns());
                    break;
                }
                if p.poll().is_some() {
                    break;
                }
            }
            px.clear_trigger();
            killed
        } else {
            sleep_until(p.t_spawn + delay);
            (p.kill(), now_ns())
        };
        let st = p.wait_for(WAIT);
        let how = match &st {
            Some(st) => crate::util::describe(st).0,
            None => "did not exit".into(),
        };
        if !killed && st.and_then(|s| s.code()) != Some(0) {
            c.fail(
                i,
                format!(
                    "restore finished before the kill with {how}: {}",
                    p.stderr_tail()
                ),
            );
        }
        let how = if killed {
            how
        } else {
            format!("{how} before the kill")
        };
        outcomes.add(if killed { "killed" } else { "finished" });
        let events = proxy.take().map(|p| p.stop());
        let (off, applied, note) = match judge(env, &r, &sock) {
            Ok(j) => j,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("after the kill: {e}"));
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        let land = match (&events, killed) {
            (_, false) => "after_exit",
            (Some(ev), true) => {
                let before = |ph: Phase, m: &str| {
                    ev.iter()
                        .any(|e| e.phase == ph && e.method == m && e.path == CLOCK && e.t <= t_kill)
                };
                if !before(Phase::RequestReceived, "PUT") {
                    "before_put"
                } else if !before(Phase::AnswerForwarded, "PUT") {
                    "during_put"
                } else {
                    "after_put"
                }
            }
            (None, true) if applied => "put_applied",
            (None, true) => "put_not_applied",
        };
        landed.add(format!(
            "{}{land}",
            if events.is_some() { "" } else { "direct_" }
        ));
        c.offsets.add(off.name());
        if applied {
            c.put_applied += 1;
        }
        if off == Offsets::Inconsistent {
            c.fail(i, format!("offsets inconsistent: {note}"));
        }
        let tail = finish_round(env, &mut c, i, &mut r, &sock, &[&log]);
        env.log(&format!(
            "kill-restore {}/{rounds}: {mode} +{}, {land}, {how}; offsets {}, PUT {}; {tail}",
            i + 1,
            ms(delay),
            off.name(),
            if applied { "applied" } else { "not applied" }
        ));
    }
    s.set("rounds", json!(c.rounds));
    c.offsets_json(&mut s, env);
    s.set("killed", landed.json());
    s.set("delay_modes", modes.json());
    s.set("restore_status", outcomes.json());
    c.finish(&mut s, env, vec![]);
    s
}

// ---------------------------------------------------------------------------

struct Facts {
    put_sent: bool,
    put_answered: bool,
    verify_answered: bool,
}

fn facts(events: &[Event]) -> Facts {
    let put_ans = events
        .iter()
        .find(|e| e.method == "PUT" && e.path == CLOCK && e.phase == Phase::AnswerForwarded)
        .map(|e| e.t);
    Facts {
        put_sent: events
            .iter()
            .any(|e| e.method == "PUT" && e.path == CLOCK && e.phase == Phase::RequestReceived),
        put_answered: put_ans.is_some(),
        verify_answered: put_ans.is_some_and(|t0| {
            events.iter().any(|e| {
                e.method == "GET"
                    && e.path == CLOCK
                    && e.phase == Phase::AnswerForwarded
                    && e.t > t0
            })
        }),
    }
}

/// (b) The VMM SIGKILLed during the PUT: half the rounds through the
/// recording proxy, killed a random 0 ..= 1/3 x PUT time after the PUT was
/// handed to the VMM; half on the VMM's own socket at a random moment from
/// the restore's `main` to just past its typical PUT. Then a new VMM
/// restores the snapshot and the rerun must succeed there.
pub fn kill_vmm(env: &Env, rounds: u32, rng: &mut Rng) -> Summary {
    let mut s = Summary::new("kill-vmm");
    let mut c = Common {
        track_put: false,
        ..Common::default()
    };
    let (mut codes, mut landed, mut modes) = (Tally::default(), Tally::default(), Tally::default());
    let (mut false_success, mut wrong_exit, mut hung, mut not_fired) = (0u64, 0u64, 0u64, 0u64);
    let sock = env.path("dst.sock");
    let px = env.path("proxy.sock");
    for i in 0..rounds {
        c.rounds += 1;
        let tag = format!("kill-vmm-{i}");
        crate::util::step(format!("kill-vmm round {i}"));
        let cal = env.calib.get();
        let log = round_log(env, &tag);
        let mut r = match begin(env, &sock, &log, &tag) {
            Ok(r) => r,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("setup: {e}"));
                continue;
            }
        };
        let on_put = i % 2 == 0;
        modes.add(if on_put { "on_put" } else { "timed" });
        let vmm_pid = r.vmm.pid();
        let mut proxy = None;
        let mut actor = None;
        let delay;
        let spawned = if on_put {
            let p = match Proxy::start(&px, &sock) {
                Ok(p) => p,
                Err(e) => {
                    c.errors += 1;
                    c.fail(i, e);
                    env.shutdown(&mut r.vmm);
                    continue;
                }
            };
            // The PUT's round trip as the client sees it includes its
            // encoding and the answer's; the VMM's apply is its first part.
            delay = rng.range(0, (cal.put_ns() / 3).max(50_000));
            let (tx, rx) = mpsc::channel::<u64>();
            p.set_trigger(Trigger::new("PUT", CLOCK, Phase::RequestForwarded, 1, tx));
            let closer = p.closer();
            actor = Some(std::thread::spawn(move || {
                let t = rx.recv_timeout(WAIT).ok()?;
                sleep_until(t + delay);
                kill9(vmm_pid);
                closer.close_listener();
                Some(now_ns() - t)
            }));
            let sp = env.spawn_restore(&px, &tag);
            proxy = Some(p);
            sp
        } else {
            // From main (before that the VMM is not asked anything) to
            // just past the typical PUT.
            let m = cal.put_ns().max(300_000);
            delay = rng.range(cal.main_ns, cal.put_end_ns + m);
            env.spawn_restore(&sock, &tag)
        };
        let mut p = match spawned {
            Ok(p) => p,
            Err(e) => {
                c.errors += 1;
                c.fail(i, e);
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        if !on_put {
            sleep_until(p.t_spawn + delay);
            let alive = p.poll().is_none();
            r.vmm.proc.kill();
            landed.add(if alive { "timed" } else { "timed_after_exit" });
        }
        let st = p.wait_for(WAIT);
        if st.is_none() {
            hung += 1;
            c.fail(i, "clockcarry restore hung after the VMM was killed".into());
            p.kill();
        }
        let code = st.map(|s| crate::util::describe(&s).1).unwrap_or(-1);
        codes.add(code.to_string());
        let mut fired = true;
        if let Some(a) = actor {
            if let Some(px) = proxy.as_ref() {
                px.clear_trigger();
            }
            fired = a.join().ok().flatten().is_some();
        }
        if !fired {
            not_fired += 1;
            c.fail(
                i,
                format!("no PUT reached the VMM (restore {code}): nothing killed"),
            );
            r.vmm.proc.kill();
        }
        if r.vmm.proc.wait_for(WAIT).is_none() {
            c.errors += 1;
            c.fail(
                i,
                format!("the VMM (pid {vmm_pid}) did not die after SIGKILL"),
            );
            continue;
        }
        let mut note = String::new();
        if let Some(px) = proxy.take() {
            let events = px.stop();
            let f = facts(&events);
            landed.add(if !f.put_answered {
                "during_put"
            } else if !f.verify_answered {
                "after_put_before_verify"
            } else {
                "after_verify"
            });
            let expected = if f.verify_answered { 0 } else { 6 };
            if code == 0 && !f.verify_answered {
                false_success += 1;
                c.fail(
                    i,
                    "restore exited 0 although its verification was never answered".into(),
                );
            } else if fired && code != expected {
                wrong_exit += 1;
                c.fail(
                    i,
                    format!(
                        "restore exited {code}, expected {expected} (PUT sent {}, answered {}, verified {}; {}): {}",
                        f.put_sent,
                        f.put_answered,
                        f.verify_answered,
                        crate::proxy::describe(&events),
                        p.stderr_tail()
                    ),
                );
            }
            note = format!("killed {} after the PUT reached it", ms(delay));
        }
        // The VM died with its VMM: restore it again in a new one.
        let log2 = round_log(env, &format!("{tag}-again"));
        let mut r2 = match begin(env, &sock, &log2, &format!("{tag}-again")) {
            Ok(r2) => r2,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("restoring the snapshot in a new VMM: {e}"));
                continue;
            }
        };
        if r2.planned != r.planned {
            env.log(&format!(
                "kill-vmm {i}: plan changed {:?} -> {:?}",
                r.planned, r2.planned
            ));
        }
        let tail = finish_round(env, &mut c, i, &mut r2, &sock, &[&log, &log2]);
        env.log(&format!(
            "kill-vmm {}/{rounds}: {} {}, restore exited {code}; {tail}",
            i + 1,
            if on_put { "on-put" } else { "timed" },
            if note.is_empty() {
                format!("kill at {}", ms(delay))
            } else {
                note
            },
        ));
    }
    s.set("rounds", json!(c.rounds));
    s.set("vmm_killed", json!(c.rounds - not_fired));
    s.set("all_old", Value::Null);
    s.set("all_new", Value::Null);
    s.set("inconsistent", Value::Null);
    s.set("modes", modes.json());
    s.set("killed", landed.json());
    s.set("restore_exit_codes", codes.json());
    s.set("false_success", json!(false_success));
    s.set("wrong_exit", json!(wrong_exit));
    s.set("hung", json!(hung));
    s.pass = false_success == 0 && wrong_exit == 0 && hung == 0 && not_fired == 0;
    c.finish(
        &mut s,
        env,
        vec!["offset_consistency: the VM dies with its VMM (the rerun's VM is checked for the plan's offsets instead)".into()],
    );
    s
}

// ---------------------------------------------------------------------------

/// (c) The API socket removed while `clockcarry restore` runs: a quarter of
/// the rounds unlink the VMM's own socket at a random moment (a hard link
/// keeps it for the checks); the others unlink the proxy's socket, which
/// the restore uses, as a given request arrives (its first GET, its PUT,
/// its verifying GET): that request completes, the next connect fails.
pub fn socket_removed(env: &Env, rounds: u32, rng: &mut Rng) -> Summary {
    let mut s = Summary::new("socket-removed");
    let mut c = Common {
        track_put: true,
        ..Common::default()
    };
    let (mut codes, mut landed) = (Tally::default(), Tally::default());
    let (mut false_success, mut false_untouched) = (0u64, 0u64);
    let sock = env.path("dst.sock");
    let keep = env.path("dst.sock.keep");
    let px = env.path("proxy.sock");
    const MODES: [&str; 4] = ["timed", "in_get", "in_put", "in_verify"];
    for i in 0..rounds {
        c.rounds += 1;
        let tag = format!("socket-removed-{i}");
        crate::util::step(format!("socket-removed round {i}"));
        let cal = env.calib.get();
        let log = round_log(env, &tag);
        let mut r = match begin(env, &sock, &log, &tag) {
            Ok(r) => r,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("setup: {e}"));
                continue;
            }
        };
        let mode = MODES[i as usize % 4];
        let mut proxy = None;
        let mut actor = None;
        let delay;
        let spawned = if mode == "timed" {
            let _ = std::fs::remove_file(&keep);
            if let Err(e) = std::fs::hard_link(&sock, &keep) {
                c.errors += 1;
                c.fail(i, format!("link {}: {e}", keep.display()));
                env.shutdown(&mut r.vmm);
                continue;
            }
            delay = rng.range(0, cal.exit_ns);
            env.spawn_restore(&sock, &tag)
        } else {
            let p = match Proxy::start(&px, &sock) {
                Ok(p) => p,
                Err(e) => {
                    c.errors += 1;
                    c.fail(i, e);
                    env.shutdown(&mut r.vmm);
                    continue;
                }
            };
            let (method, nth) = match mode {
                "in_get" => ("GET", 1),
                "in_put" => ("PUT", 1),
                _ => ("GET", 2),
            };
            delay = rng.range(0, 50_000);
            let (tx, rx) = mpsc::channel::<u64>();
            p.set_trigger(Trigger::new(method, CLOCK, Phase::RequestReceived, nth, tx));
            let path = px.clone();
            actor = Some(std::thread::spawn(move || {
                let t = rx.recv_timeout(WAIT).ok()?;
                sleep_until(t + delay);
                std::fs::remove_file(&path).ok()
            }));
            let sp = env.spawn_restore(&px, &tag);
            proxy = Some(p);
            sp
        };
        let mut p = match spawned {
            Ok(p) => p,
            Err(e) => {
                c.errors += 1;
                c.fail(i, e);
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        if mode == "timed" {
            sleep_until(p.t_spawn + delay);
            let alive = p.poll().is_none();
            let _ = std::fs::remove_file(&sock);
            landed.add(if alive { "timed" } else { "timed_after_exit" });
        }
        let st = p.wait_for(WAIT);
        if st.is_none() {
            c.fail(
                i,
                "clockcarry restore hung after its socket was removed".into(),
            );
            p.kill();
        }
        let code = st.map(|s| crate::util::describe(&s).1).unwrap_or(-1);
        codes.add(code.to_string());
        if mode == "timed" {
            // Put the VMM's socket back for the checks.
            if let Err(e) = std::fs::rename(&keep, &sock) {
                c.errors += 1;
                c.fail(i, format!("putting the socket back: {e}"));
                r.vmm.proc.kill();
                continue;
            }
        } else {
            if let Some(px) = proxy.as_ref() {
                px.clear_trigger();
            }
            let removed = actor.and_then(|a| a.join().ok().flatten()).is_some();
            landed.add(if removed {
                mode.to_string()
            } else {
                format!("{mode}_not_reached")
            });
            drop(proxy.take().map(|p| p.stop()));
        }
        let report = report_of(&p);
        let (off, applied, note) = match judge(env, &r, &sock) {
            Ok(j) => j,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("after the fault: {e}"));
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        c.offsets.add(off.name());
        if applied {
            c.put_applied += 1;
        }
        if off == Offsets::Inconsistent {
            c.fail(i, format!("offsets inconsistent: {note}"));
        }
        let untouched_claim =
            report["vm_untouched"].as_bool() == Some(true) || matches!(code, 2..=4 | 8);
        if code == 0 && !applied {
            false_success += 1;
            c.fail(i, "restore exited 0 but no PUT was applied".into());
        }
        if untouched_claim && applied {
            false_untouched += 1;
            c.fail(
                i,
                format!(
                    "restore exited {code} saying the VM was untouched, but its PUT was applied"
                ),
            );
        }
        let tail = finish_round(env, &mut c, i, &mut r, &sock, &[&log]);
        env.log(&format!(
            "socket-removed {}/{rounds}: {mode} (+{}), restore exited {code}; offsets {}, PUT {}; {tail}",
            i + 1,
            ms(delay),
            off.name(),
            if applied { "applied" } else { "not applied" }
        ));
    }
    let _ = std::fs::remove_file(&keep);
    s.set("rounds", json!(c.rounds));
    c.offsets_json(&mut s, env);
    s.set("removed", landed.json());
    s.set("restore_exit_codes", codes.json());
    s.set("false_success", json!(false_success));
    s.set("false_untouched", json!(false_untouched));
    s.pass = false_success == 0 && false_untouched == 0;
    c.finish(&mut s, env, vec![]);
    s
}

// ---------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Racer {
    requests: u64,
    puts: u64,
    first: Option<u64>,
    last: Option<u64>,
}

fn racer(events: &[Event], pid: i32) -> Racer {
    let mut r = Racer::default();
    for e in events.iter().filter(|e| e.pid == pid) {
        if e.phase == Phase::RequestReceived {
            r.requests += 1;
            if e.method == "PUT" {
                r.puts += 1;
            }
            r.first = Some(r.first.map_or(e.t, |f| f.min(e.t)));
        }
        r.last = Some(r.last.map_or(e.t, |l| l.max(e.t)));
    }
    r
}

/// (d) Two `clockcarry restore` on one VM, the second started a random
/// 0 ..= (typical PUT start - typical start of main) after the first, both through one
/// recording proxy (one socket path: one lock), which tells whose requests
/// reached the VMM. With the per-VM lock the loser exits 8 (busy) having
/// sent nothing; two restores whose requests interleave are the failure
/// the lock exists to prevent.
pub fn race(env: &Env, rounds: u32, rng: &mut Rng) -> Summary {
    let mut s = Summary::new("race");
    let mut c = Common {
        track_put: true,
        ..Common::default()
    };
    let (mut kinds, mut loser_codes) = (Tally::default(), Tally::default());
    let mut loser_requests = 0u64;
    let sock = env.path("dst.sock");
    let px = env.path("proxy.sock");
    for i in 0..rounds {
        c.rounds += 1;
        let tag = format!("race-{i}");
        crate::util::step(format!("race round {i}"));
        let cal = env.calib.get();
        let log = round_log(env, &tag);
        let mut r = match begin(env, &sock, &log, &tag) {
            Ok(r) => r,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("setup: {e}"));
                continue;
            }
        };
        let proxy = match Proxy::start(&px, &sock) {
            Ok(p) => p,
            Err(e) => {
                c.errors += 1;
                c.fail(i, e);
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        // B starts 0 ..= (A's typical PUT - its main) after A: B's own lock
        // attempt then comes while A holds the lock, mostly (the lock is
        // taken early and held to the exit); some rounds do not contend.
        let stagger = rng.range(0, cal.put_start_ns.saturating_sub(cal.main_ns));
        let a = env.spawn_restore(&px, &format!("{tag}-a"));
        let b = a.as_ref().ok().map(|a| {
            sleep_until(a.t_spawn + stagger);
            env.spawn_restore(&px, &format!("{tag}-b"))
        });
        let (mut a, mut b) = match (a, b) {
            (Ok(a), Some(Ok(b))) => (a, b),
            (Err(e), _) | (_, Some(Err(e))) => {
                c.errors += 1;
                c.fail(i, e);
                env.shutdown(&mut r.vmm);
                continue;
            }
            _ => unreachable!(),
        };
        let ca = a
            .wait_for(WAIT)
            .map(|s| crate::util::describe(&s).1)
            .unwrap_or(-1);
        let cb = b
            .wait_for(WAIT)
            .map(|s| crate::util::describe(&s).1)
            .unwrap_or(-1);
        let events = proxy.stop();
        let (ra, rb) = (racer(&events, a.pid), racer(&events, b.pid));
        let kind = match (ca, cb) {
            (0, 8) | (8, 0) => {
                let (loser, lp) = if ca == 8 { (&ra, &a) } else { (&rb, &b) };
                loser_requests += loser.requests;
                let rep = report_of(lp);
                if loser.puts > 0 {
                    "loser_put"
                } else if rep["vm_untouched"].as_bool() == Some(false) {
                    "loser_claims_touched"
                } else {
                    "one_busy"
                }
            }
            (0, 0) => {
                let overlap = match (ra.first, ra.last, rb.first, rb.last) {
                    (Some(af), Some(al), Some(bf), Some(bl)) => af <= bl && bf <= al,
                    _ => true,
                };
                if overlap {
                    "interleaved"
                } else {
                    "serialized"
                }
            }
            _ => "other",
        };
        kinds.add(kind);
        if ca != 0 {
            loser_codes.add(ca.to_string());
        }
        if cb != 0 {
            loser_codes.add(cb.to_string());
        }
        if !matches!(kind, "one_busy" | "serialized") {
            c.fail(
                i,
                format!(
                    "race: {kind}: exits {ca} and {cb}; requests {}+{}, PUTs {}+{}",
                    ra.requests, rb.requests, ra.puts, rb.puts
                ),
            );
        }
        let (off, applied, note) = match judge(env, &r, &sock) {
            Ok(j) => j,
            Err(e) => {
                c.errors += 1;
                c.fail(i, format!("after the race: {e}"));
                env.shutdown(&mut r.vmm);
                continue;
            }
        };
        let mut off = off;
        if off == Offsets::AllOld && (ca == 0 || cb == 0) {
            off = Offsets::Inconsistent;
        }
        c.offsets.add(off.name());
        if applied {
            c.put_applied += 1;
        }
        if off == Offsets::Inconsistent {
            c.fail(i, format!("offsets inconsistent after the race: {note}"));
        }
        let tail = finish_round(env, &mut c, i, &mut r, &sock, &[&log]);
        env.log(&format!(
            "race {}/{rounds}: stagger {}, exits {ca}/{cb}, {kind}; offsets {}; {tail}",
            i + 1,
            ms(stagger),
            off.name()
        ));
    }
    s.set("rounds", json!(c.rounds));
    for k in [
        "one_busy",
        "serialized",
        "interleaved",
        "loser_put",
        "loser_claims_touched",
        "other",
    ] {
        s.set(k, json!(kinds.get(k)));
    }
    s.set("nonzero_exit_codes", loser_codes.json());
    s.set("loser_requests", json!(loser_requests));
    c.offsets_json(&mut s, env);
    let bad = c.rounds - kinds.get("one_busy") - kinds.get("serialized");
    s.pass = bad == 0 && kinds.get("one_busy") > 0;
    c.finish(&mut s, env, vec![]);
    s
}
