//! The side-by-side demo: the same blackouts under each stock baseline and
//! with clockcarry, measured from inside the guest by the probe.
//!
//! Scenarios: `pause-resume` (in place, 2 s), `snapshot-restore` (snapshot,
//! 3 s, restore in a new VMM process), `local-migration` (live update to a
//! second VMM process over a Unix socket, guest memory passed as a memfd,
//! ~1 s blackout). Modes: `ch-v53`, `qemu`, `firecracker` (the reference
//! VMM reproducing them) and `clockcarry` (the reference VMM with the
//! vm.clock extension; capture while running before the pause, plan + PUT
//! vm.clock while the restored VM is paused, then resume), through the
//! `clockcarry` command by default ([`carry`]).
//!
//! Every row is checked ([`check_row`]); `--env lab` adds the checks that
//! only a host with real TSC offsets can pass.

pub mod bench;
pub mod carry;
pub mod progress;
pub mod table;
pub mod vmmproc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::analysis;
use crate::baseline::Baseline;
use crate::probelog;
use carry::{ArmedFor, Carry, RestoreOutcome};
use vmmproc::{DemoError, VmmProcess};

/// The hidden first argument with which the demo runs itself as a VMM.
pub const VMM_SUBCOMMAND: &str = "__vmm";

/// The probe VMs boot with their TSC at this many seconds (`--boot-tsc-s`):
/// VMs that have been up an hour. A fresh VM's TSC starts near 0, and KVM
/// treats a host-initiated MSR_IA32_TSC write within 1 s of what it expects
/// as a synchronisation and ignores its value: the stock restores would
/// show that heuristic instead of the TSC freeze. Inert where offsets are.
pub const BOOT_TSC_S: u64 = 3_600;

/// The `env` that turns on the lab checks.
pub const LAB_ENV: &str = "lab";

/// The acceptance bound on clockcarry's kvm-clock error, ns.
pub const KVMCLOCK_LIMIT_NS: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    PauseResume,
    SnapshotRestore,
    LocalMigration,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [
        Scenario::PauseResume,
        Scenario::SnapshotRestore,
        Scenario::LocalMigration,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::PauseResume => "pause-resume",
            Scenario::SnapshotRestore => "snapshot-restore",
            Scenario::LocalMigration => "local-migration",
        }
    }
}

/// A baseline, or clockcarry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Stock(Baseline),
    /// Plan and PUT vm.clock inside the blackout (`clockcarry restore`).
    Clockcarry,
    /// Planned before the pause (`clockcarry arm`), applied by the VMM in
    /// vm.restore / vm.receive-migration before the first vCPU run.
    ClockcarryArmed,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Stock(Baseline::ChV53),
        Mode::Stock(Baseline::Qemu),
        Mode::Stock(Baseline::Firecracker),
        Mode::Clockcarry,
        Mode::ClockcarryArmed,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Stock(b) => b.name(),
            Mode::Clockcarry => "clockcarry",
            Mode::ClockcarryArmed => "clockcarry-armed",
        }
    }

    /// Either clockcarry mode: the rows held to clockcarry's checks.
    pub fn is_clockcarry(&self) -> bool {
        matches!(self, Mode::Clockcarry | Mode::ClockcarryArmed)
    }

    /// VMM options for this mode: clockcarry runs on the ch-v53 baseline
    /// with the extension (what the patched Cloud Hypervisor is).
    fn vmm_args(&self) -> Vec<String> {
        match self {
            Mode::Stock(b) => vec!["--baseline".into(), b.name().into()],
            Mode::Clockcarry | Mode::ClockcarryArmed => vec![
                "--baseline".into(),
                "ch-v53".into(),
                "--clock-extension".into(),
            ],
        }
    }
}

/// The demo's options.
#[derive(Debug, Clone)]
pub struct Options {
    pub json: bool,
    pub env: String,
    pub vcpus: u32,
    pub scenarios: Vec<Scenario>,
    pub modes: Vec<Mode>,
    pub pause: Duration,
    pub snapshot_wait: Duration,
    pub migration_blackout: Duration,
    pub carry: Carry,
    pub workdir: PathBuf,
    pub keep: bool,
    pub sequential: bool,
    /// Each run's steps on stderr as they happen.
    pub verbose: bool,
    /// The watchdog ends the demo after this long ([`progress::watchdog`]).
    pub timeout: Duration,
    /// Program and leading arguments that start a reference VMM.
    pub vmm: (PathBuf, Vec<String>),
    /// `--bench-blackout`: the vCPU counts and reps ([`bench`]).
    pub bench: Option<(Vec<u32>, u32)>,
}

/// One row of the table (and of `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub env: String,
    pub scenario: &'static str,
    pub mode: &'static str,
    pub blackout_ns: Option<i64>,
    pub tsc_jump_ns: Option<i64>,
    pub kvmclock_jump_ns: Option<i64>,
    pub tsc_error_ns: Option<i64>,
    pub kvmclock_error_ns: Option<i64>,
    pub disagreement_ns: Option<i64>,
    pub monotonic: Option<bool>,
    pub tsc_offsets_effective: Option<bool>,
    pub vcpus: u32,
    /// The error the VMM reported for its PUT vm.clock (clockcarry rows).
    pub put_kvmclock_error_ns: Option<i64>,
    pub error: Option<String>,
    /// clockcarry rows: the `clockcarry` binary run, or `in-process`.
    pub clockcarry: Option<String>,
    /// clockcarry rows after a restore: `same-host` / `cross-host`.
    pub plan_mode: Option<String>,
    /// clockcarry rows: the plan's error bound on the guest TSC, ns (0 for
    /// a same-host plan, which copies the offsets, and for an in-place
    /// pause, where nothing is touched).
    pub plan_bound_ns: Option<u64>,
    /// How far `tsc_error_ns` itself can be off: the probe stamps' brackets
    /// and the measured host rate ([`analysis`]), ns.
    pub measure_bound_ns: Option<u64>,
    /// clockcarry rows: `plan_bound_ns + measure_bound_ns`, what
    /// |tsc_error_ns| must stay within where TSC offsets take effect.
    pub tsc_bound_ns: Option<u64>,
    /// clockcarry rows: restore start to the PUT's answer, ns (what it adds
    /// to the blackout).
    pub restore_ns: Option<u64>,
    /// The source's TSC offsets while it ran, and the destination's after
    /// the resume (`GET vm.clock`), cycles.
    pub src_offsets: Option<Vec<i64>>,
    pub dst_offsets: Option<Vec<i64>>,
    /// clockcarry rows of a same-host plan where offsets take effect: the
    /// destination's offsets equal the source's bit for bit (a same-host
    /// plan copies them: 0 cycles of TSC error, not just within the
    /// probe's measurement bound).
    pub offsets_bit_exact: Option<bool>,
    /// Every check of [`check_row`] passed.
    pub pass: bool,
    pub failed_checks: Vec<String>,
}

const WARMUP: Duration = Duration::from_millis(400);
const AFTER: Duration = Duration::from_millis(400);

struct Run<'a> {
    opts: &'a Options,
    /// `scenario/mode`, for [`progress`].
    key: String,
    mode: Mode,
    dir: PathBuf,
    offsets_effective: Option<bool>,
    restored: Option<RestoreOutcome>,
    src_offsets: Option<Vec<i64>>,
    dst_offsets: Option<Vec<i64>>,
}

impl Run<'_> {
    fn step(&self, what: &str) {
        progress::note(&self.key, what);
    }

    fn start(&self, name: &str, boot: bool, extra: &[String]) -> Result<VmmProcess, DemoError> {
        self.step(&format!("start VMM {name}"));
        let mut args = self.mode.vmm_args();
        args.extend([
            "--probe-log".to_string(),
            self.dir.join(format!("{name}.jsonl")).display().to_string(),
            "--serial".to_string(),
            self.dir
                .join(format!("{name}.serial"))
                .display()
                .to_string(),
        ]);
        args.extend_from_slice(extra);
        if boot {
            args.extend([
                "--kernel".into(),
                "probe".into(),
                "--cpus".into(),
                self.opts.vcpus.to_string(),
                "--boot-tsc-s".into(),
                BOOT_TSC_S.to_string(),
            ]);
        }
        let (program, prefix) = &self.opts.vmm;
        VmmProcess::start(program, prefix, &self.dir, name, &args)
    }

    /// Warms up, then notes whether TSC offsets take effect here and the
    /// source's offsets.
    fn warm_up(&mut self, vmm: &VmmProcess) {
        self.step("warm up, GET vm.clock");
        std::thread::sleep(WARMUP);
        let clock = vm_clock(vmm);
        self.offsets_effective = clock.as_ref().map(|c| c.capabilities.tsc_offset_effective);
        self.src_offsets = clock.map(|c| c.offsets());
    }

    /// The destination's offsets after the resume.
    fn note_dst_offsets(&mut self, vmm: &VmmProcess) {
        self.dst_offsets = vm_clock(vmm).map(|c| c.offsets());
    }

    fn sidecar(&self) -> PathBuf {
        self.dir.join("sidecar.json")
    }

    fn capture(&self, vmm: &VmmProcess) -> Result<(), DemoError> {
        if self.mode.is_clockcarry() {
            self.step("clockcarry capture");
            self.opts.carry.capture(vmm, &self.sidecar())?;
        }
        Ok(())
    }

    fn restore(&mut self, vmm: &VmmProcess) -> Result<(), DemoError> {
        if self.mode == Mode::Clockcarry {
            self.step("clockcarry restore");
            self.restored = Some(self.opts.carry.restore(vmm, &self.sidecar())?);
        }
        Ok(())
    }

    /// Armed mode: `clockcarry arm` before the pause; the request body
    /// (with `clock`, `resume: true`) to restore or receive the VM with.
    fn arm(&mut self, target: ArmedFor<'_>) -> Result<Option<String>, DemoError> {
        if self.mode != Mode::ClockcarryArmed {
            return Ok(None);
        }
        self.step("clockcarry arm");
        let armed = self.opts.carry.arm(&self.sidecar(), target, &self.dir)?;
        self.restored = Some(RestoreOutcome {
            plan_mode: armed.plan_mode,
            plan_bound_ns: armed.plan_bound_ns,
            put_kvmclock_error_ns: None,
            restore_ns: None,
        });
        Ok(Some(armed.body))
    }

    /// The VMM's 200 answer to an armed request: its kvm-clock error.
    fn armed_applied(&mut self, answer: &str) -> Result<(), DemoError> {
        let v: serde_json::Value =
            serde_json::from_str(answer).map_err(|e| format!("armed answer: {e}: {answer}"))?;
        if v["outcome"] != "applied" {
            return Err(format!("armed clock not applied: {answer}"));
        }
        if let Some(r) = self.restored.as_mut() {
            r.put_kvmclock_error_ns = v["kvmclock_error_ns"].as_i64();
        }
        Ok(())
    }

    fn pause_resume(&mut self) -> Result<(), DemoError> {
        let src = self.start("src", true, &[])?;
        self.warm_up(&src);
        self.step("vm.pause, blackout");
        src.ok("PUT", "vm.pause", None)?;
        std::thread::sleep(self.opts.pause);
        self.step("vm.resume");
        src.ok("PUT", "vm.resume", None)?;
        std::thread::sleep(AFTER);
        self.step("shut down");
        src.shutdown();
        Ok(())
    }

    fn snapshot_restore(&mut self) -> Result<(), DemoError> {
        let src = self.start("src", true, &[])?;
        self.warm_up(&src);
        self.capture(&src)?;
        let url = format!("file://{}", self.dir.join("snapshot").display());
        let armed = self.arm(ArmedFor::Restore(&url))?;
        self.step("vm.pause, vm.snapshot");
        src.ok("PUT", "vm.pause", None)?;
        src.ok(
            "PUT",
            "vm.snapshot",
            Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
        )?;
        self.step("shut down src, wait");
        src.shutdown();
        std::thread::sleep(self.opts.snapshot_wait);
        let dst = self.start("dst", false, &[])?;
        if let Some(body) = armed {
            self.step("vm.restore with the armed clock, resume");
            let answer = dst.ok("PUT", "vm.restore", Some(&body))?;
            self.armed_applied(&answer)?;
        } else {
            self.step("vm.restore (paused)");
            dst.ok(
                "PUT",
                "vm.restore",
                Some(&format!(r#"{{"source_url":"{url}","resume":false}}"#)),
            )?;
            self.restore(&dst)?;
            self.step("vm.resume");
            dst.ok("PUT", "vm.resume", None)?;
        }
        std::thread::sleep(AFTER);
        self.note_dst_offsets(&dst);
        self.step("shut down");
        dst.shutdown();
        Ok(())
    }

    fn local_migration(&mut self) -> Result<(), DemoError> {
        // A live update as Cloud Hypervisor does it: the source runs until
        // send-migration pauses it; the state then takes `--migration-
        // blackout-ms` to arrive (the source VMM's slow-link knob: a local
        // migration of 4 MiB alone takes milliseconds); memory travels as a
        // memfd. Stock modes resume on Complete; clockcarry receives with
        // `resume: false`, restores the clock, then resumes.
        let delay = self.opts.migration_blackout.as_millis().to_string();
        let mut src = self.start("src", true, &["--migration-delay-ms".into(), delay])?;
        let dst = self.start("dst", false, &[])?;
        self.warm_up(&src);
        self.capture(&src)?;
        let channel = self.dir.join("migration.sock");
        let url = format!("unix:{}", channel.display());
        let armed = self.arm(ArmedFor::Receive(&url))?;
        let resume = if self.mode == Mode::Clockcarry {
            r#","resume":false"#
        } else {
            ""
        };
        self.step("vm.receive-migration, vm.send-migration");
        let receive = {
            let socket = dst.socket.clone();
            let body = armed
                .clone()
                .unwrap_or_else(|| format!(r#"{{"receiver_url":"{url}"{resume}}}"#));
            std::thread::spawn(move || {
                crate::http::request(
                    &socket,
                    "PUT",
                    "/api/v1/vm.receive-migration",
                    Some(&body),
                    Duration::from_secs(60),
                )
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !channel.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        src.ok(
            "PUT",
            "vm.send-migration",
            Some(&format!(r#"{{"destination_url":"{url}","local":true}}"#)),
        )?;
        self.step("wait for vm.receive-migration");
        let received = receive
            .join()
            .map_err(|_| "receive thread panicked".to_string())?
            .map_err(|e| format!("dst: receive-migration: {e}"))?;
        let want = if armed.is_some() { 200 } else { 204 };
        if received.status != want {
            return Err(format!(
                "dst: receive-migration: HTTP {} {}",
                received.status, received.body
            ));
        }
        if armed.is_some() {
            self.armed_applied(&received.body)?;
        }
        if self.mode == Mode::Clockcarry {
            self.restore(&dst)?;
            self.step("vm.resume");
            dst.ok("PUT", "vm.resume", None)?;
        }
        // The source VMM exits once it has noticed the migration completed.
        self.step("wait for the source VMM to exit");
        if !src.wait_exit(Duration::from_secs(10)) {
            return Err("src: still running after the migration".into());
        }
        std::thread::sleep(AFTER);
        self.note_dst_offsets(&dst);
        self.step("shut down");
        dst.shutdown();
        Ok(())
    }
}

/// `GET vm.clock`, parsed; `None` when the VMM has none to give.
fn vm_clock(vmm: &VmmProcess) -> Option<clockcarry::VmClock> {
    vmm.ok("GET", "vm.clock", None)
        .ok()
        .and_then(|b| serde_json::from_str::<clockcarry::VmClock>(&b).ok())
}

fn run_one(opts: &Options, scenario: Scenario, mode: Mode) -> Row {
    let mut row = run_measured(opts, scenario, mode);
    progress::done(&format!("{}/{}", scenario.name(), mode.name()));
    row.failed_checks = check_row(&row, &opts.env);
    row.pass = row.failed_checks.is_empty();
    row
}

fn empty_row(opts: &Options, scenario: Scenario, mode: Mode) -> Row {
    Row {
        env: opts.env.clone(),
        scenario: scenario.name(),
        mode: mode.name(),
        blackout_ns: None,
        tsc_jump_ns: None,
        kvmclock_jump_ns: None,
        tsc_error_ns: None,
        kvmclock_error_ns: None,
        disagreement_ns: None,
        monotonic: None,
        tsc_offsets_effective: None,
        vcpus: opts.vcpus,
        put_kvmclock_error_ns: None,
        error: None,
        clockcarry: mode.is_clockcarry().then(|| opts.carry.label()),
        plan_mode: None,
        plan_bound_ns: None,
        measure_bound_ns: None,
        tsc_bound_ns: None,
        restore_ns: None,
        src_offsets: None,
        dst_offsets: None,
        offsets_bit_exact: None,
        pass: false,
        failed_checks: Vec::new(),
    }
}

fn run_measured(opts: &Options, scenario: Scenario, mode: Mode) -> Row {
    let dir = opts
        .workdir
        .join(format!("{}-{}", scenario.name(), mode.name()));
    let mut row = empty_row(opts, scenario, mode);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        row.error = Some(format!("{}: {e}", dir.display()));
        return row;
    }
    let mut run = Run {
        opts,
        key: format!("{}/{}", scenario.name(), mode.name()),
        mode,
        dir: dir.clone(),
        offsets_effective: None,
        restored: None,
        src_offsets: None,
        dst_offsets: None,
    };
    let result = match scenario {
        Scenario::PauseResume => run.pause_resume(),
        Scenario::SnapshotRestore => run.snapshot_restore(),
        Scenario::LocalMigration => run.local_migration(),
    };
    run.step("analyse the probe logs");
    row.tsc_offsets_effective = run.offsets_effective;
    row.src_offsets = run.src_offsets.take();
    row.dst_offsets = run.dst_offsets.take();
    if let Some(r) = &run.restored {
        row.put_kvmclock_error_ns = r.put_kvmclock_error_ns;
        row.plan_mode.clone_from(&r.plan_mode);
        row.plan_bound_ns = r.plan_bound_ns;
        row.restore_ns = r.restore_ns;
    }
    if let Err(e) = result {
        row.error = Some(e);
        return row;
    }
    let same_host = row.plan_mode.as_deref() == Some("same-host");
    if mode.is_clockcarry() && same_host && row.tsc_offsets_effective == Some(true) {
        row.offsets_bit_exact =
            Some(row.src_offsets.is_some() && row.src_offsets == row.dst_offsets);
    }
    let logs = [dir.join("src.jsonl"), dir.join("dst.jsonl")];
    let paths: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
    match probelog::read_logs(&paths)
        .ok()
        .and_then(|r| analysis::analyse(&r))
    {
        Some(a) => {
            row.blackout_ns = a.blackout_ns;
            row.tsc_jump_ns = Some(a.tsc_jump_ns);
            row.kvmclock_jump_ns = Some(a.kvmclock_jump_ns);
            row.tsc_error_ns = a.tsc_error_ns;
            row.kvmclock_error_ns = a.kvmclock_error_ns;
            row.disagreement_ns = Some(a.disagreement_ns);
            row.monotonic = Some(a.monotonic);
            row.measure_bound_ns = a.tsc_error_bound_ns;
            if mode.is_clockcarry() {
                // In place nothing is touched: the plan's share is 0.
                let plan = match scenario {
                    Scenario::PauseResume => Some(0),
                    _ => row.plan_bound_ns,
                };
                row.tsc_bound_ns = plan
                    .zip(a.tsc_error_bound_ns)
                    .map(|(p, m)| p.saturating_add(m));
            }
        }
        None => row.error = Some("no usable probe reports".into()),
    }
    row
}

/// Runs every (scenario, mode); the modes of a scenario run side by side.
/// `emit` sees each scenario's rows as soon as they are complete.
pub fn run_all(opts: &Options, mut emit: impl FnMut(&Row)) -> Vec<Row> {
    let mut rows = Vec::new();
    for &scenario in &opts.scenarios {
        if opts.sequential {
            for &m in &opts.modes {
                let row = run_one(opts, scenario, m);
                emit(&row);
                rows.push(row);
            }
            continue;
        }
        let results: Vec<Row> = std::thread::scope(|s| {
            let handles: Vec<_> = opts
                .modes
                .iter()
                .map(|&m| s.spawn(move || run_one(opts, scenario, m)))
                .collect();
            handles
                .into_iter()
                .zip(&opts.modes)
                .map(|(h, &m)| {
                    h.join().unwrap_or_else(|_| {
                        let mut r = empty_row(opts, scenario, m);
                        r.error = Some("run panicked".into());
                        r.failed_checks = vec!["the run panicked".into()];
                        r
                    })
                })
                .collect()
        });
        results.iter().for_each(&mut emit);
        rows.extend(results);
    }
    rows
}

/// The checks on a row; the names of those that failed (empty: pass).
///
/// - Every row: the run completed and was measured.
/// - clockcarry rows: |kvm-clock error| <= [`KVMCLOCK_LIMIT_NS`] and both
///   counters monotonic; where TSC offsets take effect (the KVM lab) also
///   |TSC error| <= `tsc_bound_ns`, the plan's bracket error plus the
///   measurement's own (on a host whose offsets are inert the guest TSC is
///   the host's whatever anyone writes, so the rule says nothing there).
/// - `--env lab` only: TSC offsets must take effect (else the host is not a
///   lab), and the stock rows of `snapshot-restore` and `local-migration`
///   must show the TSC freeze (the guest TSC lost at least half the
///   blackout): the baselines reproduce today's VMMs.
pub fn check_row(row: &Row, env: &str) -> Vec<String> {
    let mut failed = Vec::new();
    if let Some(e) = &row.error {
        failed.push(format!("the run failed: {e}"));
        return failed;
    }
    let lab = env == LAB_ENV;
    if lab && row.tsc_offsets_effective != Some(true) {
        failed.push(format!(
            "TSC offsets take effect (a lab): tsc_offsets_effective is {:?}",
            row.tsc_offsets_effective
        ));
    }
    if row.mode == Mode::Clockcarry.name() || row.mode == Mode::ClockcarryArmed.name() {
        if row.monotonic != Some(true) {
            failed.push("monotonic: a counter went backwards".into());
        }
        match row.kvmclock_error_ns {
            Some(e) if e.unsigned_abs() <= KVMCLOCK_LIMIT_NS => {}
            e => failed.push(format!(
                "|kvm-clock error| <= {KVMCLOCK_LIMIT_NS} ns: {e:?} ns"
            )),
        }
        if row.offsets_bit_exact == Some(false) {
            failed.push(format!(
                "a same-host plan copies the offsets bit for bit: source {:?}, destination {:?}",
                row.src_offsets, row.dst_offsets
            ));
        }
        if row.tsc_offsets_effective == Some(true) {
            match (row.tsc_error_ns, row.tsc_bound_ns) {
                (Some(e), Some(b)) if e.unsigned_abs() <= b => {}
                (Some(e), Some(b)) => failed.push(format!(
                    "|TSC error| within the bracket error: {e} ns, bound {b} ns \
                     (plan {:?} + measurement {:?})",
                    row.plan_bound_ns, row.measure_bound_ns
                )),
                (e, b) => failed.push(format!(
                    "|TSC error| within the bracket error: error {e:?}, bound {b:?} \
                     (plan {:?}, measurement {:?}; the measurement needs exact read times)",
                    row.plan_bound_ns, row.measure_bound_ns
                )),
            }
        }
    } else if lab && row.scenario != Scenario::PauseResume.name() {
        match (row.tsc_error_ns, row.blackout_ns) {
            (Some(e), Some(b)) if e <= -(b / 2) => {}
            (e, b) => failed.push(format!(
                "the stock restore freezes the TSC (error <= -blackout/2): error {e:?} ns, \
                 blackout {b:?} ns"
            )),
        }
    }
    if row.tsc_error_ns.is_none() || row.kvmclock_error_ns.is_none() {
        failed.push("measured: no TSC / kvm-clock error from the probe log".into());
    }
    failed
}

/// Whether a row passes [`check_row`].
pub fn row_passes(row: &Row) -> bool {
    row.pass
}
