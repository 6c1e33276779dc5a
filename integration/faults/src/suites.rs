//! The four suites. Each round: a new VMM restores the snapshot Paused; the
//! offsets before and the plan's (`--dry-run --json`) are read; the fault;
//! the offsets after; a rerun of `clockcarry restore` (exit 0, offsets the
//! plan's); resume, let the probe run, check its log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    classify, clock_put, get_clock, resume_and_check, Calib, Env, Offsets, Vmm, INJECT_OFFSETS,
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

/// `clockcarry restore` again: must exit 0 and leave the offsets its own
/// plan chose (its report's `vcpus[].new_offset`). That plan is the round's
/// unless the fault left a vCPU ahead of it: the planner's floor then moves
/// every vCPU up so none goes backwards (seen with `--inject-failure`).
fn rerun(env: &Env, sock: &Path, planned: &[i64]) -> Result<u64, String> {
    let (code, report, p) = env.run_restore(sock, "rerun")?;
    let took = p.t_exit.unwrap_or(p.t_spawn) - p.t_spawn;
    if code != 0 {
        return Err(format!("rerun exited {code}: {}", p.stderr_tail()));
    }
    if env.inert.is_none() {
        let own: Option<Vec<i64>> = report["vcpus"]
            .as_array()
            .and_then(|v| v.iter().map(|c| c["new_offset"].as_i64()).collect());
        let own = own.ok_or("rerun exited 0 but its report has no vcpus[].new_offset")?;
        let now = get_clock(sock)?.offsets;
        if now != own {
            return Err(format!(
                "rerun exited 0 but offsets are {now:?}, its plan {own:?}"
            ));
        }
        if own != planned {
            env.log(&format!(
                "rerun planned {own:?}, the round's plan was {planned:?}"
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

/// The VMM's own socket, and the proxy's.
fn dst(env: &Env) -> PathBuf {
    env.path("dst.sock")
}

fn pxy(env: &Env) -> PathBuf {
    env.path("proxy.sock")
}

/// Runs the rounds; a round that returns `Err` could not be carried out (a
/// round error: the suite fails). Its VMM, if any, is killed when dropped.
fn run_rounds<S>(
    env: &Env,
    name: &str,
    rounds: u32,
    c: &mut Common,
    st: &mut S,
    rng: &mut Rng,
    round: fn(&Env, &mut Common, &mut S, u32, &mut Rng) -> Result<(), String>,
) {
    for i in 0..rounds {
        c.rounds += 1;
        crate::util::step(format!("{name} round {i}"));
        if let Err(e) = round(env, c, st, i, rng) {
            c.errors += 1;
            c.fail(i, e);
        }
    }
}

/// Judges the offsets and counts them; `expect_applied`: a restore claims
/// to have applied the plan, so all old is inconsistent too.
fn record_offsets(
    env: &Env,
    c: &mut Common,
    i: u32,
    r: &Round,
    expect_applied: bool,
) -> Result<(Offsets, bool), String> {
    let (mut off, applied, mut note) = judge(env, r, &dst(env))?;
    if off == Offsets::AllOld && expect_applied {
        off = Offsets::Inconsistent;
        note = format!("a restore exited 0 but the offsets are the old ones; {note}");
    }
    c.offsets.add(off.name());
    if applied {
        c.put_applied += 1;
    }
    if off == Offsets::Inconsistent {
        c.fail(i, format!("offsets inconsistent: {note}"));
    }
    Ok((off, applied))
}

/// `clockcarry restore` on the VMM's socket, or through a new proxy.
fn spawn_via(env: &Env, proxied: bool, tag: &str) -> Result<(Proc, Option<Proxy>), String> {
    if !proxied {
        return Ok((env.spawn_restore(&dst(env), tag)?, None));
    }
    let px = Proxy::start(&pxy(env), &dst(env))?;
    let p = env.spawn_restore(&pxy(env), tag)?;
    Ok((p, Some(px)))
}

fn exit_code(st: Option<std::process::ExitStatus>) -> i32 {
    st.map(|s| crate::util::describe(&s).1).unwrap_or(-1)
}

fn applied_word(applied: bool) -> &'static str {
    if applied {
        "applied"
    } else {
        "not applied"
    }
}

// ---------------------------------------------------------------------------

#[derive(Default)]
struct KillRestore {
    landed: Tally,
    modes: Tally,
    outcomes: Tally,
}

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
    let mut st = KillRestore::default();
    run_rounds(
        env,
        "kill-restore",
        rounds,
        &mut c,
        &mut st,
        rng,
        kill_restore_round,
    );
    s.set("rounds", json!(c.rounds));
    c.offsets_json(&mut s, env);
    s.set("killed", st.landed.json());
    s.set("delay_modes", st.modes.json());
    s.set("restore_status", st.outcomes.json());
    c.finish(&mut s, env, vec![]);
    s
}

const KILL_MODES: [&str; 3] = ["uniform", "put_window", "on_put"];

fn kill_delay(mode: &str, cal: &Calib, rng: &mut Rng) -> u64 {
    match mode {
        "uniform" => rng.range(0, cal.exit_ns),
        "put_window" => {
            let m = cal.put_ns().max(200_000).max(cal.exit_ns / 10);
            rng.range(cal.put_start_ns.saturating_sub(m), cal.put_end_ns + m)
        }
        _ => rng.range(0, cal.put_ns()),
    }
}

/// Kills `p` `delay` after its spawn, or, with `proxy`, `delay` after its
/// PUT arrived there (not at all if it exits first). (killed, instant).
fn kill_at(p: &mut Proc, proxy: Option<&Proxy>, delay: u64) -> (bool, u64) {
    let Some(px) = proxy else {
        sleep_until(p.t_spawn + delay);
        return (p.kill(), now_ns());
    };
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
}

fn kill_landing(events: Option<&[Event]>, killed: bool, t_kill: u64, applied: bool) -> String {
    let land = match (events, killed) {
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
    format!("{}{land}", if events.is_some() { "" } else { "direct_" })
}

fn kill_restore_round(
    env: &Env,
    c: &mut Common,
    st: &mut KillRestore,
    i: u32,
    rng: &mut Rng,
) -> Result<(), String> {
    let cal = env.calib.get();
    let tag = format!("kill-restore-{i}");
    let log = round_log(env, &tag);
    let mut r = begin(env, &dst(env), &log, &tag)?;
    let mode = KILL_MODES[i as usize % KILL_MODES.len()];
    st.modes.add(mode);
    let delay = kill_delay(mode, &cal, rng);
    let (mut p, proxy) = spawn_via(env, mode == "on_put", &tag)?;
    let (killed, t_kill) = kill_at(&mut p, proxy.as_ref(), delay);
    let status = p.wait_for(WAIT);
    let mut how = match &status {
        Some(s) => crate::util::describe(s).0,
        None => "did not exit".into(),
    };
    if !killed {
        if exit_code(status) != 0 {
            c.fail(
                i,
                format!(
                    "restore finished before the kill with {how}: {}",
                    p.stderr_tail()
                ),
            );
        }
        how.push_str(" before the kill");
    }
    st.outcomes.add(if killed { "killed" } else { "finished" });
    let events = proxy.map(Proxy::stop);
    let (off, applied) = record_offsets(env, c, i, &r, false)?;
    let land = kill_landing(events.as_deref(), killed, t_kill, applied);
    st.landed.add(land.clone());
    let tail = finish_round(env, c, i, &mut r, &dst(env), &[&log]);
    env.log(&format!(
        "kill-restore {}: {mode} +{}, {land}, {how}; offsets {}, PUT {}; {tail}",
        i + 1,
        ms(delay),
        off.name(),
        applied_word(applied)
    ));
    Ok(())
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

#[derive(Default)]
struct KillVmm {
    codes: Tally,
    landed: Tally,
    modes: Tally,
    false_success: u64,
    wrong_exit: u64,
    hung: u64,
    not_fired: u64,
}

/// (b) The VMM SIGKILLed during the PUT: half the rounds through the
/// recording proxy, killed a random 0 ..= 1/3 x PUT time after the PUT was
/// handed to the VMM; half on the VMM's own socket at a random moment from
/// the restore's `main` to just past its typical PUT. Then a new VMM
/// restores the snapshot and the rerun must succeed there.
pub fn kill_vmm(env: &Env, rounds: u32, rng: &mut Rng) -> Summary {
    let mut s = Summary::new("kill-vmm");
    let mut c = Common::default();
    let mut st = KillVmm::default();
    run_rounds(
        env,
        "kill-vmm",
        rounds,
        &mut c,
        &mut st,
        rng,
        kill_vmm_round,
    );
    s.set("rounds", json!(c.rounds));
    s.set("vmm_killed", json!(c.rounds - st.not_fired));
    s.set("all_old", Value::Null);
    s.set("all_new", Value::Null);
    s.set("inconsistent", Value::Null);
    s.set("modes", st.modes.json());
    s.set("killed", st.landed.json());
    s.set("restore_exit_codes", st.codes.json());
    s.set("false_success", json!(st.false_success));
    s.set("wrong_exit", json!(st.wrong_exit));
    s.set("hung", json!(st.hung));
    s.pass = st.false_success == 0 && st.wrong_exit == 0 && st.hung == 0 && st.not_fired == 0;
    let skipped = "offset_consistency: the VM dies with its VMM (the rerun's VM is checked \
                   for the plan's offsets instead)";
    c.finish(&mut s, env, vec![skipped.into()]);
    s
}

/// Through a new proxy: a restore, and an actor that SIGKILLs the VMM
/// `delay` after the restore's PUT was handed to it, then makes the proxy
/// refuse connections like a dead VMM's socket.
fn arm_vmm_kill(
    env: &Env,
    tag: &str,
    vmm_pid: i32,
    delay: u64,
) -> Result<(Proc, Proxy, JoinHandle<Option<u64>>), String> {
    let px = Proxy::start(&pxy(env), &dst(env))?;
    let (tx, rx) = mpsc::channel::<u64>();
    px.set_trigger(Trigger::new("PUT", CLOCK, Phase::RequestForwarded, 1, tx));
    let closer = px.closer();
    let actor = std::thread::spawn(move || {
        let t = rx.recv_timeout(WAIT).ok()?;
        sleep_until(t + delay);
        kill9(vmm_pid);
        closer.close_listener();
        Some(now_ns() - t)
    });
    let p = env.spawn_restore(&pxy(env), tag)?;
    Ok((p, px, actor))
}

/// What the restore's exit must be, given what the proxy saw.
fn judge_vmm_kill(st: &mut KillVmm, c: &mut Common, i: u32, events: &[Event], code: i32, p: &Proc) {
    let f = facts(events);
    st.landed.add(if !f.put_answered {
        "during_put"
    } else if !f.verify_answered {
        "after_put_before_verify"
    } else {
        "after_verify"
    });
    let expected = if f.verify_answered { 0 } else { 6 };
    if code == 0 && !f.verify_answered {
        st.false_success += 1;
        c.fail(
            i,
            "restore exited 0 although its verification was never answered".into(),
        );
    } else if code != expected {
        st.wrong_exit += 1;
        c.fail(
            i,
            format!(
                "restore exited {code}, expected {expected} (PUT sent {}, answered {}, \
                 verified {}; {}): {}",
                f.put_sent,
                f.put_answered,
                f.verify_answered,
                crate::proxy::describe(events),
                p.stderr_tail()
            ),
        );
    }
}

fn kill_vmm_round(
    env: &Env,
    c: &mut Common,
    st: &mut KillVmm,
    i: u32,
    rng: &mut Rng,
) -> Result<(), String> {
    let cal = env.calib.get();
    let tag = format!("kill-vmm-{i}");
    let log = round_log(env, &tag);
    let mut r = begin(env, &dst(env), &log, &tag)?;
    let on_put = i % 2 == 0;
    st.modes.add(if on_put { "on_put" } else { "timed" });
    let vmm_pid = r.vmm.pid();
    let (mut p, proxy, actor, delay) = if on_put {
        // The PUT's round trip as the client sees it includes its encoding
        // and the answer's; the VMM's apply is its first part.
        let delay = rng.range(0, (cal.put_ns() / 3).max(50_000));
        let (p, px, actor) = arm_vmm_kill(env, &tag, vmm_pid, delay)?;
        (p, Some(px), Some(actor), delay)
    } else {
        // From main (before it the VMM is asked nothing) to past the PUT.
        let delay = rng.range(cal.main_ns, cal.put_end_ns + cal.put_ns().max(300_000));
        let mut p = env.spawn_restore(&dst(env), &tag)?;
        sleep_until(p.t_spawn + delay);
        let alive = p.poll().is_none();
        r.vmm.proc.kill();
        st.landed
            .add(if alive { "timed" } else { "timed_after_exit" });
        (p, None, None, delay)
    };
    let status = p.wait_for(WAIT);
    if status.is_none() {
        st.hung += 1;
        c.fail(i, "clockcarry restore hung after the VMM was killed".into());
        p.kill();
    }
    let code = exit_code(status);
    st.codes.add(code.to_string());
    if let (Some(px), Some(a)) = (proxy.as_ref(), actor) {
        px.clear_trigger();
        if a.join().ok().flatten().is_none() {
            st.not_fired += 1;
            c.fail(
                i,
                format!("no PUT reached the VMM (restore {code}): nothing killed"),
            );
            r.vmm.proc.kill();
        }
    }
    if r.vmm.proc.wait_for(WAIT).is_none() {
        return Err(format!("the VMM (pid {vmm_pid}) did not die after SIGKILL"));
    }
    if let Some(px) = proxy {
        judge_vmm_kill(st, c, i, &px.stop(), code, &p);
    }
    // The VM died with its VMM: restore it again in a new one.
    let tag2 = format!("{tag}-again");
    let log2 = round_log(env, &tag2);
    let mut r2 = begin(env, &dst(env), &log2, &tag2)
        .map_err(|e| format!("restoring the snapshot in a new VMM: {e}"))?;
    let tail = finish_round(env, c, i, &mut r2, &dst(env), &[&log, &log2]);
    env.log(&format!(
        "kill-vmm {}: {} +{}, restore exited {code}; {tail}",
        i + 1,
        if on_put {
            "after the PUT reached it"
        } else {
            "after the spawn"
        },
        ms(delay)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------

#[derive(Default)]
struct SocketRemoved {
    codes: Tally,
    landed: Tally,
    false_success: u64,
    false_untouched: u64,
}

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
    let mut st = SocketRemoved::default();
    run_rounds(
        env,
        "socket-removed",
        rounds,
        &mut c,
        &mut st,
        rng,
        socket_removed_round,
    );
    let _ = std::fs::remove_file(env.path("dst.sock.keep"));
    s.set("rounds", json!(c.rounds));
    c.offsets_json(&mut s, env);
    s.set("removed", st.landed.json());
    s.set("restore_exit_codes", st.codes.json());
    s.set("false_success", json!(st.false_success));
    s.set("false_untouched", json!(st.false_untouched));
    s.pass = st.false_success == 0 && st.false_untouched == 0;
    c.finish(&mut s, env, vec![]);
    s
}

const REMOVE_MODES: [&str; 4] = ["timed", "in_get", "in_put", "in_verify"];

/// A restore whose API socket will go: `timed`, the VMM's own (kept by a
/// hard link) at `delay` after the spawn (done by the caller); else the
/// proxy's, by an actor, `delay` after the request `mode` names arrived.
type Removal = (Proc, Option<Proxy>, Option<JoinHandle<Option<()>>>);

fn arm_removal(env: &Env, mode: &str, tag: &str, delay: u64) -> Result<Removal, String> {
    if mode == "timed" {
        let keep = env.path("dst.sock.keep");
        let _ = std::fs::remove_file(&keep);
        std::fs::hard_link(dst(env), &keep).map_err(|e| format!("link {}: {e}", keep.display()))?;
        return Ok((env.spawn_restore(&dst(env), tag)?, None, None));
    }
    let px = Proxy::start(&pxy(env), &dst(env))?;
    let (method, nth) = match mode {
        "in_get" => ("GET", 1),
        "in_put" => ("PUT", 1),
        _ => ("GET", 2),
    };
    let (tx, rx) = mpsc::channel::<u64>();
    px.set_trigger(Trigger::new(method, CLOCK, Phase::RequestReceived, nth, tx));
    let path = pxy(env);
    let actor = std::thread::spawn(move || {
        let t = rx.recv_timeout(WAIT).ok()?;
        sleep_until(t + delay);
        std::fs::remove_file(&path).ok()
    });
    let p = env.spawn_restore(&pxy(env), tag)?;
    Ok((p, Some(px), Some(actor)))
}

fn socket_removed_round(
    env: &Env,
    c: &mut Common,
    st: &mut SocketRemoved,
    i: u32,
    rng: &mut Rng,
) -> Result<(), String> {
    let cal = env.calib.get();
    let tag = format!("socket-removed-{i}");
    let log = round_log(env, &tag);
    let mut r = begin(env, &dst(env), &log, &tag)?;
    let mode = REMOVE_MODES[i as usize % REMOVE_MODES.len()];
    let delay = if mode == "timed" {
        rng.range(0, cal.exit_ns)
    } else {
        rng.range(0, 50_000)
    };
    let (mut p, proxy, actor) = arm_removal(env, mode, &tag, delay)?;
    if mode == "timed" {
        sleep_until(p.t_spawn + delay);
        let alive = p.poll().is_none();
        let _ = std::fs::remove_file(dst(env));
        st.landed
            .add(if alive { "timed" } else { "timed_after_exit" });
    }
    let status = p.wait_for(WAIT);
    if status.is_none() {
        c.fail(
            i,
            "clockcarry restore hung after its socket was removed".into(),
        );
        p.kill();
    }
    let code = exit_code(status);
    st.codes.add(code.to_string());
    if let Some(px) = proxy {
        px.clear_trigger();
        let removed = actor.and_then(|a| a.join().ok().flatten()).is_some();
        st.landed.add(if removed {
            mode.to_string()
        } else {
            format!("{mode}_not_reached")
        });
        px.stop();
    } else {
        // Put the VMM's socket back for the checks.
        std::fs::rename(env.path("dst.sock.keep"), dst(env))
            .map_err(|e| format!("putting the socket back: {e}"))?;
    }
    let (off, applied) = record_offsets(env, c, i, &r, false)?;
    let untouched_claim =
        report_of(&p)["vm_untouched"].as_bool() == Some(true) || matches!(code, 2..=4 | 8);
    if code == 0 && !applied {
        st.false_success += 1;
        c.fail(i, "restore exited 0 but no PUT was applied".into());
    }
    if untouched_claim && applied {
        st.false_untouched += 1;
        c.fail(
            i,
            format!("restore exited {code} saying the VM was untouched, but its PUT was applied"),
        );
    }
    let tail = finish_round(env, c, i, &mut r, &dst(env), &[&log]);
    env.log(&format!(
        "socket-removed {}: {mode} +{}, restore exited {code}; offsets {}, PUT {}; {tail}",
        i + 1,
        ms(delay),
        off.name(),
        applied_word(applied)
    ));
    Ok(())
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

#[derive(Default)]
struct Race {
    kinds: Tally,
    loser_codes: Tally,
    loser_requests: u64,
}

const RACE_KINDS: [&str; 6] = [
    "one_busy",
    "serialized",
    "interleaved",
    "loser_put",
    "loser_claims_touched",
    "other",
];

/// (d) Two `clockcarry restore` on one VM, the second started a random
/// 0 ..= (typical PUT start - typical start of main) after the first, both
/// through one recording proxy (one socket path: one lock), which tells
/// whose requests reached the VMM. With the per-VM lock the loser exits 8
/// (busy) having sent nothing; two restores whose requests interleave are
/// the failure the lock exists to prevent.
pub fn race(env: &Env, rounds: u32, rng: &mut Rng) -> Summary {
    let mut s = Summary::new("race");
    let mut c = Common {
        track_put: true,
        ..Common::default()
    };
    let mut st = Race::default();
    run_rounds(env, "race", rounds, &mut c, &mut st, rng, race_round);
    s.set("rounds", json!(c.rounds));
    for k in RACE_KINDS {
        s.set(k, json!(st.kinds.get(k)));
    }
    s.set("nonzero_exit_codes", st.loser_codes.json());
    s.set("loser_requests", json!(st.loser_requests));
    c.offsets_json(&mut s, env);
    let good = st.kinds.get("one_busy") + st.kinds.get("serialized");
    s.pass = good == c.rounds && st.kinds.get("one_busy") > 0;
    c.finish(&mut s, env, vec![]);
    s
}

/// One round's outcome from the two exits and the proxy's record.
fn race_kind(
    st: &mut Race,
    codes: (i32, i32),
    racers: (&Racer, &Racer),
    loser_report: Value,
) -> &'static str {
    let (ra, rb) = racers;
    match codes {
        (0, 8) | (8, 0) => {
            let loser = if codes.0 == 8 { ra } else { rb };
            st.loser_requests += loser.requests;
            if loser.puts > 0 {
                "loser_put"
            } else if loser_report["vm_untouched"].as_bool() == Some(false) {
                "loser_claims_touched"
            } else {
                "one_busy"
            }
        }
        (0, 0) => match (ra.first, ra.last, rb.first, rb.last) {
            (Some(af), Some(al), Some(bf), Some(bl)) if al < bf || bl < af => "serialized",
            _ => "interleaved",
        },
        _ => "other",
    }
}

fn race_round(
    env: &Env,
    c: &mut Common,
    st: &mut Race,
    i: u32,
    rng: &mut Rng,
) -> Result<(), String> {
    let cal = env.calib.get();
    let tag = format!("race-{i}");
    let log = round_log(env, &tag);
    let mut r = begin(env, &dst(env), &log, &tag)?;
    let proxy = Proxy::start(&pxy(env), &dst(env))?;
    // B starts 0 ..= (A's typical PUT - its main) after A: B's own lock
    // attempt then comes while A holds the lock, mostly (the lock is taken
    // early and held to the exit); some rounds do not contend.
    let stagger = rng.range(0, cal.put_start_ns.saturating_sub(cal.main_ns));
    let mut a = env.spawn_restore(&pxy(env), &format!("{tag}-a"))?;
    sleep_until(a.t_spawn + stagger);
    let mut b = env.spawn_restore(&pxy(env), &format!("{tag}-b"))?;
    let (ca, cb) = (exit_code(a.wait_for(WAIT)), exit_code(b.wait_for(WAIT)));
    let events = proxy.stop();
    let (ra, rb) = (racer(&events, a.pid), racer(&events, b.pid));
    let loser_report = report_of(if ca == 8 { &a } else { &b });
    let kind = race_kind(st, (ca, cb), (&ra, &rb), loser_report);
    st.kinds.add(kind);
    for code in [ca, cb].into_iter().filter(|&c| c != 0) {
        st.loser_codes.add(code.to_string());
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
    let (off, _) = record_offsets(env, c, i, &r, ca == 0 || cb == 0)?;
    let tail = finish_round(env, c, i, &mut r, &dst(env), &[&log]);
    env.log(&format!(
        "race {}: stagger {}, exits {ca}/{cb}, {kind}; offsets {}; {tail}",
        i + 1,
        ms(stagger),
        off.name()
    ));
    Ok(())
}
