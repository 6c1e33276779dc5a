//! QEMU in the KVM lab, where TSC offsets are real: stock QEMU against QEMU
//! with qemu-patch driven by clockcarry, on stop/cont, migration to a file
//! and local live migration, with the probe guest (integration/qemu/run is
//! the same on a host's own KVM; docs/qemu.md).
//!
//! Per row: the probe analysis across the blackout (`clockcarry-refvmm
//! analyze`: TSC jump, kvm-clock jump, their disagreement, monotonic), the
//! blackout as this lab host's CLOCK_MONOTONIC saw it (from `stop` to the
//! destination's `cont`), and for the patched QEMU the destination's TSC
//! offsets against the source's, read from KVM through
//! `x-query-guest-clock`: on one host the host TSC runs on across QEMU
//! processes, so equal offsets are a TSC error of exactly 0 cycles.
//!
//! Usage: lab-qemu --stock QEMU --patched QEMU --clockcarry BIN --refvmm BIN
//!                 --firmware DIR [--firmware DIR] [--work DIR]
//!                 [--scenarios pause-resume,snapshot-restore,local-migration]
//! One JSON line per row on stdout; exit 1 when a row fails its assertion.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clockcarry::qmp::{QmpOptions, QmpSession};
use serde_json::{json, Value};

struct Args {
    stock: PathBuf,
    patched: PathBuf,
    clockcarry: PathBuf,
    refvmm: PathBuf,
    firmware: Vec<PathBuf>,
    work: PathBuf,
    scenarios: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut stock, mut patched, mut cc, mut refvmm) = (None, None, None, None);
    let mut firmware = Vec::new();
    let mut work = PathBuf::from("/tmp/lab-qemu");
    let mut scenarios: Vec<String> = ["pause-resume", "snapshot-restore", "local-migration"]
        .map(String::from)
        .to_vec();
    while let Some(a) = it.next() {
        let mut v = || {
            it.next()
                .map(PathBuf::from)
                .ok_or(format!("{a} needs a value"))
        };
        match a.as_str() {
            "--stock" => stock = Some(v()?),
            "--patched" => patched = Some(v()?),
            "--clockcarry" => cc = Some(v()?),
            "--refvmm" => refvmm = Some(v()?),
            "--firmware" => firmware.push(v()?),
            "--work" => work = v()?,
            "--scenarios" => {
                scenarios = v()?
                    .display()
                    .to_string()
                    .split(',')
                    .map(String::from)
                    .collect();
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        stock: stock.ok_or("--stock is required")?,
        patched: patched.ok_or("--patched is required")?,
        clockcarry: cc.ok_or("--clockcarry is required")?,
        refvmm: refvmm.ok_or("--refvmm is required")?,
        firmware,
        work,
        scenarios,
    })
}

/// One QEMU process: the harness's QMP socket and clockcarry's.
struct Qemu {
    child: Child,
    qmp: QmpSession,
    cc_socket: PathBuf,
    serial: PathBuf,
}

impl Qemu {
    fn start(
        a: &Args,
        bin: &Path,
        probe: &Path,
        name: &str,
        incoming: Option<&str>,
    ) -> Result<Qemu, String> {
        let qmp_path = a.work.join(format!("{name}.qmp"));
        let cc_socket = a.work.join(format!("{name}.cc.qmp"));
        let serial = a.work.join(format!("{name}.serial"));
        let mut c = Command::new(bin);
        for fw in &a.firmware {
            c.arg("-L").arg(fw);
        }
        c.args([
            "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "64", "-machine", "pc",
        ])
        .args(["-nographic", "-nodefaults", "-no-user-config", "-kernel"])
        .arg(probe)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", cc_socket.display()));
        if let Some(uri) = incoming {
            c.args(["-incoming", uri, "-S"]);
        }
        let log = std::fs::File::create(a.work.join(format!("{name}.stderr")))
            .map_err(|e| e.to_string())?;
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let options = QmpOptions {
            command_timeout: Duration::from_secs(120),
            ..QmpOptions::default()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let qmp = loop {
            match QmpSession::connect(&qmp_path, options) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("{name}: QMP: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        while !cc_socket.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Qemu {
            child,
            qmp,
            cc_socket,
            serial,
        })
    }

    fn cmd(&mut self, name: &str, args: Option<Value>) -> Result<Value, String> {
        self.qmp.execute(name, args).map_err(|e| e.to_string())
    }

    fn status(&mut self) -> Result<String, String> {
        Ok(self.cmd("query-status", None)?["status"]
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    fn wait(
        &mut self,
        what: &str,
        f: impl Fn(&mut Qemu) -> Result<bool, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if f(self)? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("timed out waiting for {what}"))
    }

    fn offsets(&mut self) -> Result<Vec<i64>, String> {
        let v = self.cmd("x-query-guest-clock", None)?;
        Ok(v["vcpus"]
            .as_array()
            .ok_or("no vcpus")?
            .iter()
            .filter_map(|c| c["tsc-offset"].as_i64())
            .collect())
    }

    fn quit(mut self) {
        let _ = self.qmp.execute("quit", None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    /// No QEMU outlives its row (a probe vCPU spins the lab's one CPU).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outgoing migration completed; an error once it failed.
fn migrated(q: &mut Qemu) -> Result<bool, String> {
    let status = q.cmd("query-migrate", None)?["status"].clone();
    match status.as_str() {
        Some("completed") => Ok(true),
        Some(s @ ("failed" | "cancelled")) => Err(format!("the migration {s}")),
        _ => Ok(false),
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| {
            b.split(|c| *c == b'\n')
                .filter(|l| l.starts_with(b"CC "))
                .count()
        })
        .unwrap_or(0)
}

fn wait_lines(path: &Path, n: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while lines(path) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "{} has {} of {n} probe lines",
                path.display(),
                lines(path)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn clockcarry(a: &Args, args: &[&str]) -> Result<(), String> {
    let out = Command::new(&a.clockcarry)
        .args(args)
        .env("CLOCKCARRY_STATE_DIR", &a.work)
        .env("CLOCKCARRY_RUN_DIR", &a.work)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "clockcarry {} exited {:?}: {}",
            args[0],
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One (scenario, mode): the serial files, the host-side blackout, and the
/// source and destination offsets where the patched QEMU gives them.
fn scenario(a: &Args, probe: &Path, name: &str, mode: &str) -> Result<Value, String> {
    let patched = mode != "qemu";
    let run_cc = mode == "qemu-clockcarry";
    let bin = if patched { &a.patched } else { &a.stock };
    let tag = format!("{name}-{mode}");
    let sidecar = a.work.join(format!("{tag}.sidecar.json"));
    let sidecar_s = sidecar.display().to_string();
    let mut src = Qemu::start(a, bin, probe, &format!("{tag}-a"), None)?;
    if src.status()? != "running" {
        src.cmd("cont", None)?;
    }
    wait_lines(&src.serial, 40)?;
    let src_offsets = if patched { Some(src.offsets()?) } else { None };
    let (files, host_gap, dst_offsets) = if name == "pause-resume" {
        let t0 = Instant::now();
        src.cmd("stop", None)?;
        std::thread::sleep(Duration::from_secs(2));
        src.cmd("cont", None)?;
        let gap = t0.elapsed();
        let n = lines(&src.serial);
        wait_lines(&src.serial, n + 40)?;
        let after = if patched { Some(src.offsets()?) } else { None };
        let serial = src.serial.clone();
        src.quit();
        (vec![serial], gap, after)
    } else {
        if run_cc {
            clockcarry(
                a,
                &[
                    "capture",
                    "--qmp-socket",
                    &src.cc_socket.display().to_string(),
                    "--vm",
                    &tag,
                    "-o",
                    &sidecar_s,
                    "-q",
                ],
            )?;
        }
        let t0 = Instant::now();
        let dst = if name == "snapshot-restore" {
            let state = a.work.join(format!("{tag}.state"));
            src.cmd("stop", None)?;
            src.cmd(
                "migrate",
                Some(json!({"uri": format!("exec:cat > {}", state.display())})),
            )?;
            src.wait("migration", migrated)?;
            let s = src.serial.clone();
            src.quit();
            std::thread::sleep(Duration::from_secs(5));
            let d = Qemu::start(
                a,
                bin,
                probe,
                &format!("{tag}-b"),
                Some(&format!("exec:cat {}", state.display())),
            )?;
            return finish(a, name, mode, s, d, t0, src_offsets, &tag, &sidecar_s);
        } else {
            // A Unix socket: the lab's loopback interface may be down.
            let uri = format!("unix:{}", a.work.join(format!("{tag}.migrate")).display());
            let d = Qemu::start(a, bin, probe, &format!("{tag}-b"), Some(&uri))?;
            src.cmd("migrate", Some(json!({ "uri": uri })))?;
            src.wait("migration", migrated)?;
            d
        };
        let s = src.serial.clone();
        src.quit();
        return finish(a, name, mode, s, dst, t0, src_offsets, &tag, &sidecar_s);
    };
    row(a, name, mode, &files, host_gap, src_offsets, dst_offsets)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    a: &Args,
    name: &str,
    mode: &str,
    src_serial: PathBuf,
    mut dst: Qemu,
    t0: Instant,
    src_offsets: Option<Vec<i64>>,
    tag: &str,
    sidecar: &str,
) -> Result<Value, String> {
    dst.wait("the incoming state", |q| Ok(q.status()? == "paused"))?;
    if mode == "qemu-clockcarry" {
        clockcarry(
            a,
            &[
                "restore",
                "--qmp-socket",
                &dst.cc_socket.display().to_string(),
                "--vm",
                tag,
                "-i",
                sidecar,
                "-q",
            ],
        )?;
    }
    let dst_offsets = if mode == "qemu" {
        None
    } else {
        Some(dst.offsets()?)
    };
    dst.cmd("cont", None)?;
    let gap = t0.elapsed();
    wait_lines(&dst.serial, 40)?;
    let files = vec![src_serial, dst.serial.clone()];
    dst.quit();
    row(a, name, mode, &files, gap, src_offsets, dst_offsets)
}

fn row(
    a: &Args,
    name: &str,
    mode: &str,
    files: &[PathBuf],
    host_gap: Duration,
    src_offsets: Option<Vec<i64>>,
    dst_offsets: Option<Vec<i64>>,
) -> Result<Value, String> {
    let out = Command::new(&a.refvmm)
        .arg("analyze")
        .arg("--json")
        .args(files)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("analyze: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let j: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let host_gap_ns = u64::try_from(host_gap.as_nanos()).unwrap_or(u64::MAX);
    let tsc_jump = j["tsc_jump_ns"].as_i64().unwrap_or(0);
    let kvm_err = j["disagreement_ns"].as_i64().unwrap_or(i64::MAX);
    let monotonic = j["monotonic"].as_bool().unwrap_or(false);
    // On one host the TSC runs on across QEMU processes: the offset
    // difference is the TSC error, in cycles, exactly.
    let tsc_error_cycles = match (&src_offsets, &dst_offsets) {
        (Some(s), Some(d)) if s.len() == d.len() && !s.is_empty() => Some(d[0].wrapping_sub(s[0])),
        _ => None,
    };
    let pass = match mode {
        "qemu-clockcarry" => {
            monotonic
                && kvm_err.abs() <= 1000
                && (name == "pause-resume" || tsc_error_cycles == Some(0))
        }
        // Stock and the series alone lose the blackout on a load: the TSC
        // jump is far below the host's gap (frozen).
        _ if name == "snapshot-restore" => monotonic && (tsc_jump as u64) < host_gap_ns / 2,
        // Stock stop/cont rewinds kvm-clock by the pause.
        "qemu" if name == "pause-resume" => monotonic && kvm_err <= -1_500_000_000,
        _ => monotonic,
    };
    Ok(json!({
        "env": "lab", "scenario": name, "mode": mode,
        "host_blackout_ns": host_gap_ns, "tsc_jump_ns": tsc_jump,
        "kvmclock_jump_ns": j["kvmclock_jump_ns"], "kvmclock_error_ns": kvm_err,
        "tsc_error_cycles": tsc_error_cycles,
        "src_offsets": src_offsets, "dst_offsets": dst_offsets,
        "monotonic": monotonic, "pass": pass,
    }))
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lab-qemu: {e}");
            std::process::exit(2);
        }
    };
    let _ = std::fs::remove_dir_all(&a.work);
    if let Err(e) = std::fs::create_dir_all(&a.work) {
        eprintln!("lab-qemu: {}: {e}", a.work.display());
        std::process::exit(1);
    }
    let probe = a.work.join("probe.elf");
    let ok = Command::new(&a.refvmm)
        .args(["probe-elf", "--out"])
        .arg(&probe)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("lab-qemu: cannot write the probe ELF");
        std::process::exit(1);
    }
    let mut failed = 0;
    for name in a.scenarios.iter().map(String::as_str) {
        let modes: &[&str] = if name == "pause-resume" {
            &["qemu", "qemu-clockcarry"]
        } else {
            &["qemu", "qemu-patched", "qemu-clockcarry"]
        };
        for mode in modes {
            match scenario(&a, &probe, name, mode) {
                Ok(r) => {
                    if r["pass"] != json!(true) {
                        failed += 1;
                    }
                    println!("{r}");
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("lab-qemu: {name} {mode}: {e}");
                }
            }
        }
    }
    eprintln!("lab-qemu: {failed} failed");
    std::process::exit(i32::from(failed > 0));
}
