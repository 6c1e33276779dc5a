//! One (scenario, mode) run on both hosts. A leads every step over the
//! control connection; B answers. Message order of a run:
//!
//! A `run` -> clocks (sync, B's step) -> true clock offset -> B `ready`
//! (destination VMM up, receiver listening) -> A captures (clockcarry modes)
//! and sends the sidecar -> live: send-migration / snapshot: snapshot, wait,
//! the snapshot's files -> B restores (clockcarry restore), resumes -> B
//! `result` (offsets, master clock, restore report) and its probe log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clockcarry_lab::clock;
use clockcarry_lab::tscpair::{Pair, Role};
use clockcarry_refvmm::demo::vmmproc::VmmProcess;
use serde_json::{json, Value};

use crate::row::{self, Row};
use crate::vmm::{self, VM_ID};
use crate::{Ctx, Options};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clocks {
    /// As the lab hosts booted: up to a second apart, unsynchronised.
    AsBooted,
    /// lab-clock's sync: B set to A's, both marked synchronised.
    Synced,
    /// Synced, then B stepped by this many ns, still claiming synchronised.
    Step(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Live,
    Snapshot,
}

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub clocks: Clocks,
    pub kind: Kind,
    pub vcpus: u32,
}

/// The offset exchange in the measured mode: at least PEER_ROUNDS, then
/// more (spaced) while the bound is above PEER_GOAL, up to PEER_MAX_ROUNDS.
/// The lab network's round trips (an emulated NIC on a shared 2-core
/// machine) vary from 0.6 to several ms, for whole stretches of a run on a
/// busy machine, and the bound is half the best one.
const PEER_ROUNDS: u32 = 16;
const PEER_MAX_ROUNDS: u32 = 256;
const PEER_GOAL: &str = "300us";
const B_ADDR: &str = "169.254.77.2";
const SERVE_PORT: u16 = 7702;
const WARMUP: Duration = Duration::from_millis(1000);
const AFTER: Duration = Duration::from_millis(1000);
/// The armed mode: see [`crate::peer_measured`].
const ARMED: &str = "clockcarry-armed";

fn io(e: std::io::Error) -> String {
    format!("control: {e}")
}

fn clocks_json(c: Clocks) -> Value {
    match c {
        Clocks::AsBooted => json!({"as_booted": true}),
        Clocks::Synced => json!({"synced": true}),
        Clocks::Step(ns) => json!({"step_ns": ns}),
    }
}

fn clocks_from(v: &Value) -> Clocks {
    if let Some(ns) = v.get("step_ns").and_then(Value::as_i64) {
        Clocks::Step(ns)
    } else if v.get("synced").is_some() {
        Clocks::Synced
    } else {
        Clocks::AsBooted
    }
}

/// Both sides: set the clocks up, then the true offset (A gets it).
fn setup_clocks(ctx: &mut Ctx, clocks: Clocks, d: &Pair) -> Result<Option<(i64, u64)>, String> {
    let lead = ctx.role == Role::A;
    if clocks != Clocks::AsBooted {
        clock::sync(&mut ctx.ctl, lead, 16).map_err(io)?;
    }
    if let (Clocks::Step(ns), false) = (clocks, lead) {
        clock::step_ns(ns).map_err(|e| format!("step: {e}"))?;
    }
    if clocks != Clocks::AsBooted {
        remark()?;
    }
    clock::true_offset(&mut ctx.ctl, lead, d, ctx.khz).map_err(io)
}

/// "NTP updated a moment ago": the kernel grows maxerror by 500 us a
/// second, so each host re-marks itself right before clockcarry reads it.
fn remark() -> Result<(), String> {
    clock::mark_synchronised(clock::CLAIMED_MAXERROR_US, clock::CLAIMED_ESTERROR_US)
        .map_err(|e| format!("adjtimex: {e}"))
}

fn run_dir(workdir: &Path, scenario: &str, mode: &str) -> Result<PathBuf, String> {
    let dir = workdir.join(format!("{scenario}-{mode}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// A's side of a run; the checked row.
pub fn lead(
    ctx: &mut Ctx,
    opts: &Options,
    sc: &Scenario,
    mode: &str,
    index: u16,
    d: &Pair,
    skip: Option<String>,
) -> Result<Row, String> {
    let mut row = Row {
        env: "lab2",
        scenario: sc.name.into(),
        mode: mode.into(),
        vcpus: sc.vcpus,
        d_cycles: Some(d.d_cycles),
        tsc_khz: Some(ctx.khz),
        ..Row::default()
    };
    if let Some(why) = skip {
        row.skipped = Some(why);
        row.pass = true;
        return Ok(row);
    }
    let port = 7710u16.saturating_add(index % 200);
    ctx.ctl
        .send(
            &json!({"step": "run", "scenario": sc.name, "mode": mode, "vcpus": sc.vcpus,
                      "clocks": clocks_json(sc.clocks), "snapshot": sc.kind == Kind::Snapshot,
                      "port": port}),
        )
        .map_err(io)?;
    eprintln!("lab-xhost: {} / {mode}", sc.name);
    let injected = setup_clocks(ctx, sc.clocks, d)?;
    row.injected_offset_ns = injected.map(|o| o.0);
    let dir = run_dir(&ctx.workdir, sc.name, mode)?;
    let off_a = source(ctx, opts, sc, mode, port, &dir)?;
    let result = ctx.ctl.expect("result").map_err(io)?;
    ctx.ctl.recv_file(&dir.join("dst.jsonl")).map_err(io)?;
    fill(&mut row, ctx, &dir, &off_a, &result, d);
    let step = matches!(sc.clocks, Clocks::Step(_));
    row.failed_checks = row::check(&row, step);
    row.targets_missed = row::targets_missed(&row);
    row.pass = row.failed_checks.is_empty();
    Ok(row)
}

fn fill(row: &mut Row, ctx: &Ctx, dir: &Path, off_a: &[i64], result: &Value, d: &Pair) {
    let off_b: Vec<i64> = result
        .get("offsets")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    if let Some(e) = result.get("failure").and_then(Value::as_str) {
        row.error = Some(format!("host B: {e}"));
        return;
    }
    row.master_clock = result.get("master_clock").and_then(Value::as_bool);
    row.error_bound_ns = result
        .pointer("/restore/summary/error_bound/total_ns")
        .and_then(Value::as_u64);
    row.unmeasured_offset_ns = result
        .pointer("/restore/summary/error_bound/unmeasured_offset_ns")
        .and_then(Value::as_u64);
    row.plan_mode = result
        .pointer("/restore/summary/mode")
        .and_then(Value::as_str)
        .map(str::to_string);
    if crate::peer_measured(&row.mode) {
        let notes = result
            .pointer("/restore/summary/notes")
            .and_then(Value::as_array);
        row.clocks_disagree_noted = notes.map(|n| {
            n.iter()
                .filter_map(Value::as_str)
                .any(|t| t.contains("measured offset") && t.contains("synchronised"))
        });
    }
    row.restore_kvmclock_error_ns = result
        .pointer("/restore/kvmclock/vmm_error_ns")
        .and_then(Value::as_i64);
    let half_ns = clockcarry::host::cycles_to_ns_ceil(d.half_width_cycles(), ctx.khz);
    row.truth_bound_ns = half_ns;
    if let Ok(text) = std::fs::read_to_string(dir.join("sidecar.json")) {
        if let Some(est) = serde_json::from_str::<Value>(&text)
            .ok()
            .as_ref()
            .and_then(|v| vmm::find_key(v, "offset_estimate"))
        {
            row.offset_estimate_ns = est.get("offset_ns").and_then(Value::as_i64);
            row.offset_bound_ns = est.get("bound_ns").and_then(Value::as_u64);
            row.peer_rounds = est
                .get("rounds")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok());
            row.best_round_trip_ns = est.get("best_delay_ns").and_then(Value::as_u64);
        }
    }
    if off_b.len() != off_a.len() {
        row.error = Some(format!(
            "{} offsets on A, {} on B",
            off_a.len(),
            off_b.len()
        ));
        return;
    }
    row::fill_tsc_error(row, off_a, &off_b, d.d_cycles, ctx.khz);
    if let Err(e) = row::fill_from_logs(
        row,
        &dir.join("src.jsonl"),
        &dir.join("dst.jsonl"),
        (off_a, &off_b),
        d.d_cycles,
        ctx.khz,
    ) {
        row.error = Some(e);
    }
}

/// A: the source VM, capture, migration or snapshot; A's offsets.
fn source(
    ctx: &mut Ctx,
    opts: &Options,
    sc: &Scenario,
    mode: &str,
    port: u16,
    dir: &Path,
) -> Result<Vec<i64>, String> {
    ctx.ctl.expect("ready").map_err(io)?;
    let mut extra = vec![
        "--kernel".into(),
        "probe".into(),
        "--cpus".into(),
        sc.vcpus.to_string(),
        "--boot-tsc-s".into(),
        vmm::BOOT_TSC_S.to_string(),
    ];
    if sc.kind == Kind::Live {
        extra.extend([
            "--migration-delay-ms".into(),
            opts.migration_delay_ms.to_string(),
        ]);
    }
    let mut src = vmm::start(&ctx.tools, dir, "src", mode, &extra)?;
    std::thread::sleep(WARMUP);
    let pid = vmm::pid(&src)?;
    if sc.clocks != Clocks::AsBooted {
        remark()?;
    }
    if mode != "stock" {
        capture(ctx, &src, mode, dir)?;
        ctx.ctl
            .send_file("sidecar", &dir.join("sidecar.json"))
            .map_err(io)?;
    }
    if mode == ARMED {
        // B has armed its VMM (or, for a snapshot, will at the restore).
        ctx.ctl.expect("armed").map_err(io)?;
    }
    let off_a = vmm::debugfs_offsets(pid, sc.vcpus)?;
    match sc.kind {
        Kind::Live => {
            let url = format!("tcp:{B_ADDR}:{port}");
            src.ok(
                "PUT",
                "vm.send-migration",
                Some(&json!({"destination_url": url}).to_string()),
            )?;
            if !src.wait_exit(Duration::from_secs(60)) {
                return Err("src: still running 60 s after send-migration".into());
            }
        }
        Kind::Snapshot => {
            let snap = dir.join("snapshot");
            src.ok("PUT", "vm.pause", None)?;
            let url = format!("file://{}", snap.display());
            src.ok(
                "PUT",
                "vm.snapshot",
                Some(&json!({"destination_url": url}).to_string()),
            )?;
            src.shutdown();
            std::thread::sleep(Duration::from_millis(opts.snapshot_wait_ms));
            send_dir(ctx, &snap)?;
        }
    }
    Ok(off_a)
}

fn capture(ctx: &Ctx, src: &VmmProcess, mode: &str, dir: &Path) -> Result<(), String> {
    let socket = src.socket.display().to_string();
    let out = dir.join("sidecar.json").display().to_string();
    let peer = format!("{B_ADDR}:{SERVE_PORT}");
    let mut args: Vec<String> = [
        "capture",
        "--api-socket",
        &socket,
        "--vm",
        VM_ID,
        "-o",
        &out,
    ]
    .map(str::to_string)
    .to_vec();
    let measured = crate::peer_measured(mode);
    if measured {
        args.extend(["--peer".to_string(), peer]);
        if mode == ARMED {
            // Stored by B's serve, where `arm --vm` reads it.
            args.push("--send-sidecar".into());
        }
        args.extend(["--peer-rounds".to_string(), PEER_ROUNDS.to_string()]);
        args.extend(["--peer-max-rounds".to_string(), PEER_MAX_ROUNDS.to_string()]);
        args.extend(["--peer-goal".to_string(), PEER_GOAL.to_string()]);
    }
    args.extend(ctx.tools.key_args(measured));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    vmm::clockcarry(&ctx.tools, &args).map(|_| ())
}

fn send_dir(ctx: &mut Ctx, dir: &Path) -> Result<(), String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        if e.file_type().map_err(|e| e.to_string())?.is_file() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    ctx.ctl
        .send(&json!({"step": "snapshot", "files": names}))
        .map_err(io)?;
    for n in &names {
        ctx.ctl.send_file(n, &dir.join(n)).map_err(io)?;
    }
    Ok(())
}

/// B's side of a run.
pub fn follow(ctx: &mut Ctx, msg: &Value, d: &Pair) -> Result<(), String> {
    let scenario = msg
        .get("scenario")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let mode = msg
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("stock")
        .to_string();
    let vcpus = msg
        .get("vcpus")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(1);
    let clocks = clocks_from(msg.get("clocks").unwrap_or(&Value::Null));
    let snapshot = msg
        .get("snapshot")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let port = msg
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or("run without a port")?;
    setup_clocks(ctx, clocks, d)?;
    let dir = run_dir(&ctx.workdir, &scenario, &mode)?;
    let outcome = destination(ctx, &mode, vcpus, clocks, snapshot, port, &dir);
    let reply = match &outcome {
        Ok(v) => v.clone(),
        Err(e) => json!({"step": "result", "failure": e}),
    };
    ctx.ctl.send(&reply).map_err(io)?;
    let log = dir.join("dst.jsonl");
    if !log.exists() {
        std::fs::write(&log, b"").map_err(|e| e.to_string())?;
    }
    ctx.ctl.send_file("dst.jsonl", &log).map_err(io)
}

struct Serve(Option<std::process::Child>);

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn destination(
    ctx: &mut Ctx,
    mode: &str,
    vcpus: u32,
    clocks: Clocks,
    snapshot: bool,
    port: u16,
    dir: &Path,
) -> Result<Value, String> {
    let dst = vmm::start(&ctx.tools, dir, "dst", mode, &[])?;
    let state_dir = dir.join("state");
    let _serve = if crate::peer_measured(mode) {
        start_serve(ctx, &state_dir)?
    } else {
        Serve(None)
    };
    let armed = mode == ARMED;
    let resume = mode == "stock";
    let receiver_url = format!("tcp:{B_ADDR}:{port}");
    // vm.receive-migration with `body` in a thread, once it listens.
    let receive_with = |body: String| {
        let socket = dst.socket.clone();
        let h = std::thread::spawn(move || {
            clockcarry_refvmm::http::request(
                &socket,
                "PUT",
                "/api/v1/vm.receive-migration",
                Some(&body),
                Duration::from_secs(120),
            )
        });
        if vmm::wait_listening(port, Duration::from_secs(20)) {
            Ok(h)
        } else {
            Err(format!("the receiver does not listen on {port}"))
        }
    };
    let mut receive = None;
    if !snapshot && !armed {
        let body = json!({"receiver_url": receiver_url, "resume": resume}).to_string();
        receive = Some(receive_with(body)?);
    }
    ctx.ctl.send(&json!({"step": "ready"})).map_err(io)?;
    if mode != "stock" {
        ctx.ctl.recv_file(&dir.join("sidecar.json")).map_err(io)?;
    }
    let mut report = Value::Null;
    if armed {
        if clocks != Clocks::AsBooted {
            remark()?;
        }
        if !snapshot {
            let (body, arm) = arm(ctx, dir, &state_dir, ArmFor::Receive(&receiver_url))?;
            report = arm;
            receive = Some(receive_with(body)?);
        }
        ctx.ctl.send(&json!({"step": "armed"})).map_err(io)?;
    }
    let applied = match receive {
        Some(h) => {
            let r = h
                .join()
                .map_err(|_| "receive thread panicked".to_string())?
                .map_err(|e| format!("receive-migration: {e}"))?;
            let want = if armed { 200 } else { 204 };
            if r.status != want {
                return Err(format!("receive-migration: HTTP {} {}", r.status, r.body));
            }
            r.body
        }
        None => {
            let (applied, arm) = restore_snapshot(ctx, &dst, dir, armed.then_some(&state_dir))?;
            if let Some(a) = arm {
                report = a;
            }
            applied
        }
    };
    if armed {
        report = armed_report(report, &applied)?;
    } else if mode != "stock" {
        if clocks != Clocks::AsBooted {
            remark()?;
        }
        report = clockcarry_restore(ctx, &dst, dir)?;
    }
    if !armed && (mode != "stock" || snapshot) {
        dst.ok("PUT", "vm.resume", None)?;
    }
    std::thread::sleep(AFTER);
    let offsets = vmm::debugfs_offsets(vmm::pid(&dst)?, vcpus)?;
    let master = vmm::master_clock(&dst)?;
    dst.shutdown();
    Ok(json!({"step": "result", "offsets": offsets, "master_clock": master, "restore": report}))
}

/// B: `clockcarry serve --once`, storing a pushed sidecar in `state_dir`.
fn start_serve(ctx: &Ctx, state_dir: &Path) -> Result<Serve, String> {
    std::fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let listen = format!("{B_ADDR}:{SERVE_PORT}");
    let child = std::process::Command::new(&ctx.tools.clockcarry)
        .args([
            "--log-target",
            "stderr",
            "serve",
            "--listen",
            &listen,
            "--once",
        ])
        .args(ctx.tools.key_args(true))
        .env("CLOCKCARRY_STATE_DIR", state_dir)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("clockcarry serve: {e}"))?;
    let serve = Serve(Some(child));
    if !vmm::wait_listening(SERVE_PORT, Duration::from_secs(20)) {
        return Err("clockcarry serve does not listen".into());
    }
    Ok(serve)
}

/// B: `clockcarry restore --json` on the paused VM; its report.
fn clockcarry_restore(ctx: &Ctx, dst: &VmmProcess, dir: &Path) -> Result<Value, String> {
    let socket = dst.socket.display().to_string();
    let input = dir.join("sidecar.json").display().to_string();
    let mut args: Vec<String> = ["restore", "--api-socket", &socket, "-i", &input, "--json"]
        .map(str::to_string)
        .to_vec();
    args.extend(ctx.tools.key_args(false));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = vmm::clockcarry(&ctx.tools, &args)?;
    serde_json::from_str(&out).map_err(|e| format!("restore --json: {e}"))
}

/// What the armed request is for.
enum ArmFor<'a> {
    Receive(&'a str),
    Restore(&'a str),
}

/// B: `clockcarry arm --vm` on the sidecar B's serve stored; the request
/// body it wrote and its report.
fn arm(
    ctx: &Ctx,
    dir: &Path,
    state_dir: &Path,
    url: ArmFor<'_>,
) -> Result<(String, Value), String> {
    let out = dir.join("armed-request.json");
    let (flag, url) = match url {
        ArmFor::Receive(u) => ("--for-receive", u),
        ArmFor::Restore(u) => ("--for-restore", u),
    };
    let out_s = out.display().to_string();
    let mut args: Vec<String> = ["arm", "--vm", VM_ID, flag, url, "-o", &out_s, "--json"]
        .map(str::to_string)
        .to_vec();
    args.extend(ctx.tools.key_args(false));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = vmm::clockcarry_env(&ctx.tools, &args, &[("CLOCKCARRY_STATE_DIR", state_dir)])?;
    let report = serde_json::from_str(&stdout).map_err(|e| format!("arm --json: {e}"))?;
    let body = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok((body, report))
}

/// The armed row's report in the shape the rows read from `restore --json`
/// (`summary.error_bound`, `summary.mode`, `summary.notes`,
/// `kvmclock.vmm_error_ns`): the plan from `arm`'s report, the kvm-clock
/// error from the VMM's 200 answer.
fn armed_report(arm: Value, applied: &str) -> Result<Value, String> {
    let reply: Value =
        serde_json::from_str(applied).map_err(|e| format!("the armed reply: {e}: {applied}"))?;
    if reply.get("outcome").and_then(Value::as_str) != Some("applied") {
        return Err(format!("the armed clock was not applied: {applied}"));
    }
    Ok(json!({
        "summary": {
            "error_bound": arm.get("error_bound").cloned().unwrap_or(Value::Null),
            "mode": arm.get("mode").cloned().unwrap_or(Value::Null),
            "notes": arm.get("notes").cloned().unwrap_or(Value::Null),
        },
        "kvmclock": {"vmm_error_ns": reply.get("kvmclock_error_ns").cloned().unwrap_or(Value::Null)},
        "arm": arm,
    }))
}

/// B: the snapshot's files, then vm.restore (armed: with the clock armed
/// right before it); the answer's body and, armed, `arm`'s report.
fn restore_snapshot(
    ctx: &mut Ctx,
    dst: &VmmProcess,
    dir: &Path,
    armed_from: Option<&PathBuf>,
) -> Result<(String, Option<Value>), String> {
    let msg = ctx.ctl.expect("snapshot").map_err(io)?;
    let snap = dir.join("snapshot");
    std::fs::create_dir_all(&snap).map_err(|e| e.to_string())?;
    let files = msg
        .get("files")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for f in files {
        let name = f.as_str().unwrap_or("");
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("snapshot file name {name:?}"));
        }
        ctx.ctl.recv_file(&snap.join(name)).map_err(io)?;
    }
    let url = format!("file://{}", snap.display());
    match armed_from {
        Some(state_dir) => {
            let (body, report) = arm(ctx, dir, state_dir, ArmFor::Restore(&url))?;
            let applied = dst.ok("PUT", "vm.restore", Some(&body))?;
            Ok((applied, Some(report)))
        }
        None => {
            dst.ok(
                "PUT",
                "vm.restore",
                Some(&json!({"source_url": url, "resume": false}).to_string()),
            )?;
            Ok((String::new(), None))
        }
    }
}
