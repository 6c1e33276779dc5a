//! The side-by-side demo: the same blackouts under each stock baseline and
//! with clockcarry, measured from inside the guest by the probe.
//!
//! Scenarios: `pause-resume` (in place, 2 s), `snapshot-restore` (snapshot,
//! 3 s, restore in a new VMM process), `local-migration` (live update to a
//! second VMM process over a Unix socket, guest memory passed as a memfd,
//! ~1 s blackout). Modes: `ch-v53`, `qemu`, `firecracker` (the reference
//! VMM reproducing them) and `clockcarry` (the reference VMM with the
//! vm.clock extension; capture while running before the pause, plan + PUT
//! vm.clock while the restored VM is paused, then resume).

pub mod carry;
pub mod table;
pub mod vmmproc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::analysis;
use crate::baseline::Baseline;
use crate::probelog;
use carry::Carry;
use vmmproc::{DemoError, VmmProcess};

/// The hidden first argument with which the demo runs itself as a VMM.
pub const VMM_SUBCOMMAND: &str = "__vmm";

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
    Clockcarry,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Stock(Baseline::ChV53),
        Mode::Stock(Baseline::Qemu),
        Mode::Stock(Baseline::Firecracker),
        Mode::Clockcarry,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Stock(b) => b.name(),
            Mode::Clockcarry => "clockcarry",
        }
    }

    /// VMM options for this mode: clockcarry runs on the ch-v53 baseline
    /// with the extension (what the patched Cloud Hypervisor is).
    fn vmm_args(&self) -> Vec<String> {
        match self {
            Mode::Stock(b) => vec!["--baseline".into(), b.name().into()],
            Mode::Clockcarry => vec![
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
    /// Program and leading arguments that start a reference VMM.
    pub vmm: (PathBuf, Vec<String>),
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
}

const WARMUP: Duration = Duration::from_millis(400);
const AFTER: Duration = Duration::from_millis(400);

struct Run<'a> {
    opts: &'a Options,
    mode: Mode,
    dir: PathBuf,
    offsets_effective: Option<bool>,
    put_error: Option<i64>,
}

impl Run<'_> {
    fn start(&self, name: &str, boot: bool, extra: &[String]) -> Result<VmmProcess, DemoError> {
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
            ]);
        }
        let (program, prefix) = &self.opts.vmm;
        VmmProcess::start(program, prefix, &self.dir, name, &args)
    }

    /// Warms up, then notes whether TSC offsets take effect here.
    fn warm_up(&mut self, vmm: &VmmProcess) {
        std::thread::sleep(WARMUP);
        self.offsets_effective = vmm
            .ok("GET", "vm.clock", None)
            .ok()
            .and_then(|b| serde_json::from_str::<clockcarry::VmClock>(&b).ok())
            .map(|c| c.capabilities.tsc_offset);
    }

    fn sidecar(&self) -> PathBuf {
        self.dir.join("sidecar.json")
    }

    fn capture(&self, vmm: &VmmProcess) -> Result<(), DemoError> {
        if self.mode == Mode::Clockcarry {
            self.opts.carry.capture(vmm, &self.sidecar())?;
        }
        Ok(())
    }

    fn restore(&mut self, vmm: &VmmProcess) -> Result<(), DemoError> {
        if self.mode == Mode::Clockcarry {
            self.put_error = self.opts.carry.restore(vmm, &self.sidecar())?;
        }
        Ok(())
    }

    fn pause_resume(&mut self) -> Result<(), DemoError> {
        let src = self.start("src", true, &[])?;
        self.warm_up(&src);
        src.ok("PUT", "vm.pause", None)?;
        std::thread::sleep(self.opts.pause);
        src.ok("PUT", "vm.resume", None)?;
        std::thread::sleep(AFTER);
        src.shutdown();
        Ok(())
    }

    fn snapshot_restore(&mut self) -> Result<(), DemoError> {
        let src = self.start("src", true, &[])?;
        self.warm_up(&src);
        self.capture(&src)?;
        src.ok("PUT", "vm.pause", None)?;
        let url = format!("file://{}", self.dir.join("snapshot").display());
        src.ok(
            "PUT",
            "vm.snapshot",
            Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
        )?;
        src.shutdown();
        std::thread::sleep(self.opts.snapshot_wait);
        let dst = self.start("dst", false, &[])?;
        dst.ok(
            "PUT",
            "vm.restore",
            Some(&format!(r#"{{"source_url":"{url}","resume":false}}"#)),
        )?;
        self.restore(&dst)?;
        dst.ok("PUT", "vm.resume", None)?;
        std::thread::sleep(AFTER);
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
        let resume = if self.mode == Mode::Clockcarry {
            r#","resume":false"#
        } else {
            ""
        };
        let receive = {
            let socket = dst.socket.clone();
            let body = format!(r#"{{"receiver_url":"{url}"{resume}}}"#);
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
        let received = receive
            .join()
            .map_err(|_| "receive thread panicked".to_string())?
            .map_err(|e| format!("dst: receive-migration: {e}"))?;
        if received.status != 204 {
            return Err(format!(
                "dst: receive-migration: HTTP {} {}",
                received.status, received.body
            ));
        }
        if self.mode == Mode::Clockcarry {
            self.restore(&dst)?;
            dst.ok("PUT", "vm.resume", None)?;
        }
        // The source VMM exits once it has noticed the migration completed.
        if !src.wait_exit(Duration::from_secs(10)) {
            return Err("src: still running after the migration".into());
        }
        std::thread::sleep(AFTER);
        dst.shutdown();
        Ok(())
    }
}

fn run_one(opts: &Options, scenario: Scenario, mode: Mode) -> Row {
    let dir = opts
        .workdir
        .join(format!("{}-{}", scenario.name(), mode.name()));
    let mut row = Row {
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
    };
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        row.error = Some(format!("{}: {e}", dir.display()));
        return row;
    }
    let mut run = Run {
        opts,
        mode,
        dir: dir.clone(),
        offsets_effective: None,
        put_error: None,
    };
    let result = match scenario {
        Scenario::PauseResume => run.pause_resume(),
        Scenario::SnapshotRestore => run.snapshot_restore(),
        Scenario::LocalMigration => run.local_migration(),
    };
    row.tsc_offsets_effective = run.offsets_effective;
    row.put_kvmclock_error_ns = run.put_error;
    if let Err(e) = result {
        row.error = Some(e);
        return row;
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
        }
        None => row.error = Some("no usable probe reports".into()),
    }
    row
}

/// Runs every (scenario, mode); the modes of a scenario run side by side.
pub fn run_all(opts: &Options) -> Vec<Row> {
    let mut rows = Vec::new();
    for &scenario in &opts.scenarios {
        if opts.sequential {
            rows.extend(opts.modes.iter().map(|&m| run_one(opts, scenario, m)));
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
                        let mut r = run_one_failed(opts, scenario, m);
                        r.error = Some("run panicked".into());
                        r
                    })
                })
                .collect()
        });
        rows.extend(results);
    }
    rows
}

fn run_one_failed(opts: &Options, scenario: Scenario, mode: Mode) -> Row {
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
    }
}

/// The acceptance rule for clockcarry rows: |kvm-clock error| <= 1000 ns
/// and monotonic. Stock rows only need to have run.
pub fn row_passes(row: &Row) -> bool {
    if row.error.is_some() {
        return false;
    }
    match row.mode {
        "clockcarry" => {
            row.monotonic == Some(true)
                && row
                    .kvmclock_error_ns
                    .is_some_and(|e| e.unsigned_abs() <= 1000)
        }
        _ => true,
    }
}
