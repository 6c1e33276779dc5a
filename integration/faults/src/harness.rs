//! The fixture every suite shares: one probe VM captured and snapshotted
//! once; per round a new reference VMM restores it Paused. Helpers to run
//! `clockcarry restore`, read the VM's offsets, resume it and check what the
//! probe saw.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::http;
use crate::util::{describe, median, ms, now_ns, sleep_ms, Proc};

pub const VM_ID: &str = "faultvm";
/// `--inject-failure`: a backwards report in a probe log (anywhere).
pub const INJECT_BACKWARDS: u8 = 1;
/// `--inject-failure`: one vCPU's offset moved after the fault (where
/// offsets take effect).
pub const INJECT_OFFSETS: u8 = 2;

/// Most calibration samples kept.
pub const SAMPLES: usize = 64;
const API: Duration = Duration::from_secs(15);

/// Where the two programs are and what the fixture is.
pub struct Env {
    pub clockcarry: PathBuf,
    pub refvmm: PathBuf,
    pub work: PathBuf,
    pub sidecar: PathBuf,
    /// The HMAC key the sidecar is sealed with (mode 0600).
    pub key: PathBuf,
    pub snapshot: PathBuf,
    pub src_log: PathBuf,
    pub cpus: u32,
    /// How long a resumed VM runs before its probe log is checked, ms.
    pub probe_ms: u64,
    /// How long a VMM may take to come up (the lab is slow), ms.
    pub start_timeout_ms: u64,
    pub verbose: bool,
    pub keep: bool,
    /// Offsets inert here (and why): the old/new check is skipped.
    pub inert: Option<String>,
    /// The typical restore: the median of the calibration runs before each
    /// suite (so it follows this machine's load from suite to suite).
    pub calib: Cell<Calib>,
    pub samples: RefCell<VecDeque<[u64; 4]>>,
    /// `--inject-failure`: what is still to inject in the current suite
    /// ([`INJECT_BACKWARDS`], [`INJECT_OFFSETS`]).
    pub inject: Cell<u8>,
    /// The env label in summaries: `host` or `lab`.
    pub label: String,
}

/// The typical `clockcarry restore`, measured on this machine first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Calib {
    /// spawn -> exit, median, ns.
    pub exit_ns: u64,
    /// spawn -> `main` (the report's started_monotonic_raw_ns).
    pub main_ns: u64,
    /// spawn -> PUT sent (answered minus its round trip) / answered.
    pub put_start_ns: u64,
    pub put_end_ns: u64,
    pub runs: usize,
}

impl Calib {
    pub fn put_ns(&self) -> u64 {
        self.put_end_ns.saturating_sub(self.put_start_ns)
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "restore_exit_us": self.exit_ns / 1000,
            "main_us": self.main_ns / 1000,
            "put_window_us": [self.put_start_ns / 1000, self.put_end_ns / 1000],
            "samples": self.runs,
        })
    }
}

pub fn mkdir(p: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// A reference VMM process and its socket.
pub struct Vmm {
    pub proc: Proc,
    pub sock: PathBuf,
}

impl Vmm {
    pub fn pid(&self) -> i32 {
        self.proc.pid
    }
}

/// The VM's clock as GET vm.clock gives it.
#[derive(Debug, Clone)]
pub struct Clock {
    pub state: String,
    pub offsets: Vec<i64>,
    pub tsc_offset_cap: bool,
}

pub fn get_clock(sock: &Path) -> Result<Clock, String> {
    let a = http::call(sock, "GET", "/api/v1/vm.clock", None, API)?;
    if a.status != 200 {
        return Err(format!("GET vm.clock: HTTP {}: {}", a.status, a.body));
    }
    let v: Value = serde_json::from_str(&a.body).map_err(|e| format!("GET vm.clock: {e}"))?;
    let offsets = v["vcpus"]
        .as_array()
        .ok_or("GET vm.clock: no vcpus")?
        .iter()
        .map(|c| {
            c["tsc_offset"]
                .as_i64()
                .ok_or("GET vm.clock: bad tsc_offset")
        })
        .collect::<Result<Vec<i64>, _>>()?;
    Ok(Clock {
        state: v["state"].as_str().unwrap_or("").to_string(),
        offsets,
        tsc_offset_cap: v["capabilities"]["tsc_offset"].as_bool().unwrap_or(false),
    })
}

/// `clockcarry.clock_put` of vm.info: a PUT vm.clock was applied.
pub fn clock_put(sock: &Path) -> Result<bool, String> {
    let a = http::call(sock, "GET", "/api/v1/vm.info", None, API)?;
    if a.status != 200 {
        return Err(format!("GET vm.info: HTTP {}", a.status));
    }
    let v: Value = serde_json::from_str(&a.body).map_err(|e| format!("vm.info: {e}"))?;
    v["clockcarry"]["clock_put"]
        .as_bool()
        .ok_or_else(|| "vm.info: no clockcarry.clock_put".to_string())
}

pub fn put(sock: &Path, what: &str, body: Option<&str>) -> Result<http::Answer, String> {
    let a = http::call(sock, "PUT", &format!("/api/v1/{what}"), body, API)?;
    if a.status >= 300 {
        return Err(format!("PUT {what}: HTTP {}: {}", a.status, a.body));
    }
    Ok(a)
}

impl Env {
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    pub fn log(&self, msg: &str) {
        if self.verbose {
            eprintln!("faults: {msg}");
        }
    }

    /// Starts a VMM on `sock`; with `boot`, the probe guest boots now.
    pub fn start_vmm(
        &self,
        sock: &Path,
        log: &Path,
        name: &str,
        boot: bool,
    ) -> Result<Vmm, String> {
        let mut cmd = Command::new(&self.refvmm);
        cmd.arg("--api-socket").arg(sock);
        cmd.arg("--probe-log").arg(log).arg("--name").arg(name);
        if boot {
            cmd.args(["--kernel", "probe", "--cpus", &self.cpus.to_string()]);
            // A VM up for an hour: KVM ignores a host TSC write within 1 s of
            // the value it expects, which would hide the stock restore's
            // freeze, and with it the difference between old and new offsets.
            cmd.args(["--boot-tsc-s", "3600"]);
        }
        let mut proc = Proc::spawn(
            cmd,
            &self.path(&format!("{name}.vmm.out")),
            &self.path(&format!("{name}.vmm.err")),
        )?;
        let end = now_ns() + self.start_timeout_ms * 1_000_000;
        loop {
            if let Some(st) = proc.poll() {
                return Err(format!(
                    "the VMM {name} exited at start ({}): {}",
                    describe(&st).0,
                    proc.stderr_tail()
                ));
            }
            if http::call(sock, "GET", "/api/v1/vmm.ping", None, API)
                .map(|a| a.status == 200)
                .unwrap_or(false)
            {
                break;
            }
            if now_ns() > end {
                return Err(format!("the VMM {name} did not answer vmm.ping"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Vmm {
            proc,
            sock: sock.to_path_buf(),
        })
    }

    /// A new VMM with the snapshot restored Paused (vCPUs not run: PUT
    /// vm.clock allowed, repeatedly). Its probe log is truncated first.
    pub fn restored(&self, sock: &Path, log: &Path, name: &str) -> Result<Vmm, String> {
        let _ = std::fs::remove_file(log);
        let vmm = self.start_vmm(sock, log, name, false)?;
        let body = format!(
            "{{\"source_url\":\"file://{}\",\"resume\":false}}",
            self.snapshot.display()
        );
        put(sock, "vm.restore", Some(&body))?;
        Ok(vmm)
    }

    /// vmm.shutdown, then SIGKILL if it lingers; reaped either way.
    pub fn shutdown(&self, vmm: &mut Vmm) {
        if vmm.proc.poll().is_none() {
            let _ = put(&vmm.sock, "vmm.shutdown", None);
            if vmm.proc.wait_for(Duration::from_secs(5)).is_none() {
                eprintln!(
                    "faults: VMM {} did not exit after vmm.shutdown; killing it",
                    vmm.pid()
                );
                vmm.proc.kill();
                if vmm.proc.wait_for(Duration::from_secs(10)).is_none() {
                    eprintln!(
                        "faults: VMM {} did not die after SIGKILL (stuck in the kernel?)",
                        vmm.pid()
                    );
                }
            }
        }
    }

    /// `clockcarry restore` on `sock`, not started yet.
    pub fn restore_cmd(&self, sock: &Path, dry_run: bool) -> Command {
        let mut cmd = Command::new(&self.clockcarry);
        cmd.args(["--log-target", "stderr", "-q", "restore", "--api-socket"]);
        cmd.arg(sock)
            .arg("-i")
            .arg(&self.sidecar)
            .arg("--key")
            .arg(&self.key);
        cmd.args(["--vm", VM_ID, "--json"]);
        if dry_run {
            cmd.arg("--dry-run");
        }
        cmd
    }

    pub fn spawn_restore(&self, sock: &Path, tag: &str) -> Result<Proc, String> {
        Proc::spawn(
            self.restore_cmd(sock, false),
            &self.path(&format!("{tag}.out.json")),
            &self.path(&format!("{tag}.err")),
        )
    }

    /// The offsets the plan means to write (`--dry-run --json`).
    pub fn planned(&self, sock: &Path) -> Result<Vec<i64>, String> {
        let mut p = Proc::spawn(
            self.restore_cmd(sock, true),
            &self.path("dry.out.json"),
            &self.path("dry.err"),
        )?;
        let st = p
            .wait_for(Duration::from_secs(30))
            .ok_or("restore --dry-run did not finish")?;
        if st.code() != Some(0) {
            return Err(format!(
                "restore --dry-run: {}: {}",
                describe(&st).0,
                p.stderr_tail()
            ));
        }
        let v: Value =
            serde_json::from_str(&p.stdout()).map_err(|e| format!("dry-run report: {e}"))?;
        v["vcpus"]
            .as_array()
            .ok_or("dry-run report: no vcpus")?
            .iter()
            .map(|c| {
                c["new_offset"]
                    .as_i64()
                    .ok_or_else(|| "dry-run: no new_offset".to_string())
            })
            .collect()
    }

    /// Runs `clockcarry restore` to the end: its exit code (or 128+signal)
    /// and report.
    pub fn run_restore(&self, sock: &Path, tag: &str) -> Result<(i32, Value, Proc), String> {
        let mut p = self.spawn_restore(sock, tag)?;
        let st = match p.wait_for(Duration::from_secs(30)) {
            Some(st) => st,
            None => {
                p.kill();
                return Err("clockcarry restore did not finish within 30 s".into());
            }
        };
        let v = serde_json::from_str(&p.stdout()).unwrap_or(Value::Null);
        Ok((describe(&st).1, v, p))
    }

    /// Takes a finished, unkilled restore's timing into the calibration.
    pub fn observe(&self, p: &Proc, report: &Value) -> bool {
        let t = &report["timings"];
        let (Some(start), Some(ans), Some(put_ns), Some(exit)) = (
            t["started_monotonic_raw_ns"].as_u64(),
            t["put_answered_monotonic_raw_ns"].as_u64(),
            t["put_ns"].as_u64(),
            p.t_exit,
        ) else {
            return false;
        };
        let t0 = p.t_spawn;
        let sample = [
            exit.saturating_sub(t0),
            start.saturating_sub(t0),
            ans.saturating_sub(put_ns).saturating_sub(t0),
            ans.saturating_sub(t0),
        ];
        let mut q = self.samples.borrow_mut();
        q.push_back(sample);
        while q.len() > SAMPLES {
            q.pop_front();
        }
        let col = |k: usize| median(&q.iter().map(|s| s[k]).collect::<Vec<u64>>());
        self.calib.set(Calib {
            exit_ns: col(0),
            main_ns: col(1),
            put_start_ns: col(2),
            put_end_ns: col(3),
            runs: q.len(),
        });
        true
    }

    /// Measures the typical restore as a round meets it: each of `n` runs
    /// on a new VMM that restored the snapshot, after the round's GET and
    /// dry run, waited for without polling. (A restore of a VM that already
    /// had a PUT is not the same: on this machine it took half as long.)
    /// With `warm_up`, one more run first, not counted (first-touch costs).
    pub fn calibrate(&self, n: usize, warm_up: bool) -> Result<(), String> {
        let sock = self.path("calib.sock");
        let log = self.path("calib.jsonl");
        self.samples.borrow_mut().clear();
        for i in 0..n + usize::from(warm_up) {
            crate::util::step(format!("calibration run {i}"));
            let mut vmm = self.restored(&sock, &log, "calib")?;
            let res = (|| {
                get_clock(&sock)?;
                self.planned(&sock)?;
                let mut p = self.spawn_restore(&sock, "calib")?;
                let st = p.wait().ok_or("calibration restore: wait failed")?;
                if st.code() != Some(0) {
                    return Err(format!(
                        "calibration restore failed ({}): {}",
                        describe(&st).0,
                        p.stderr_tail()
                    ));
                }
                let v: Value = serde_json::from_str(&p.stdout()).map_err(|e| e.to_string())?;
                Ok((p, v))
            })();
            self.shutdown(&mut vmm);
            let (p, v) = res?;
            if (i > 0 || !warm_up) && !self.observe(&p, &v) {
                return Err("calibration: the report has no timings".into());
            }
        }
        let _ = std::fs::remove_file(&log);
        let c = self.calib.get();
        eprintln!(
            "faults: a clockcarry restore here (median of {n}, each on a new VMM): spawn -> exit {}, \
             main at {}, PUT from {} to {} after the spawn",
            ms(c.exit_ns),
            ms(c.main_ns),
            ms(c.put_start_ns),
            ms(c.put_end_ns)
        );
        Ok(())
    }

    /// Builds the fixture: boots the probe VM, captures it running, pauses
    /// and snapshots it; then finds out whether offsets take effect here.
    pub fn setup(&mut self) -> Result<(), String> {
        let sock = self.path("src.sock");
        let mut src = self.start_vmm(&sock, &self.src_log.clone(), "src", true)?;
        // Let the probe enable kvm-clock and report for a while.
        wait_lines(&self.src_log, 200, self.start_timeout_ms)?;
        let mut cap = Command::new(&self.clockcarry);
        cap.args(["--log-target", "stderr", "-q", "capture", "--api-socket"]);
        cap.arg(&sock)
            .args(["--vm", VM_ID, "-o"])
            .arg(&self.sidecar);
        cap.arg("--key").arg(&self.key);
        let mut p = Proc::spawn(cap, &self.path("capture.out"), &self.path("capture.err"))?;
        let st = p.wait().ok_or("capture: wait failed")?;
        if st.code() != Some(0) {
            return Err(format!(
                "clockcarry capture: {}: {}",
                describe(&st).0,
                p.stderr_tail()
            ));
        }
        let lines = count_lines(&self.src_log);
        wait_lines(&self.src_log, lines + 200, self.start_timeout_ms)?;
        put(&sock, "vm.pause", None)?;
        let body = format!(
            "{{\"destination_url\":\"file://{}\"}}",
            self.snapshot.display()
        );
        put(&sock, "vm.snapshot", Some(&body))?;
        self.shutdown(&mut src);
        eprintln!(
            "faults: fixture: {} vCPUs, captured running, snapshot in {} ({} probe reports before it)",
            self.cpus,
            self.snapshot.display(),
            count_lines(&self.src_log)
        );
        self.detect_inert()
    }

    /// Offsets inert? The VMM's capability, and a write read back on a
    /// restored VM (+1e9 cycles on every vCPU, no kvm-clock change).
    fn detect_inert(&mut self) -> Result<(), String> {
        let sock = self.path("inert.sock");
        let mut vmm = self.restored(&sock, &self.path("inert.jsonl"), "inert")?;
        let res = (|| {
            let before = get_clock(&sock)?;
            let moved: Vec<String> = before
                .offsets
                .iter()
                .map(|o| o.wrapping_add(1_000_000_000).to_string())
                .collect();
            let body = format!(
                "{{\"tsc_khz\":null,\"tsc_offsets\":[{}],\"kvmclock\":null}}",
                moved.join(",")
            );
            put(&sock, "vm.clock", Some(&body))?;
            let after = get_clock(&sock)?;
            let effective = after
                .offsets
                .iter()
                .zip(&before.offsets)
                .all(|(a, b)| a.wrapping_sub(*b) == 1_000_000_000);
            Ok::<_, String>((
                before.tsc_offset_cap,
                effective,
                before.offsets,
                after.offsets,
            ))
        })();
        self.shutdown(&mut vmm);
        let _ = std::fs::remove_file(self.path("inert.jsonl"));
        let (cap, effective, b, a) = res?;
        self.inert = match (cap, effective) {
            (true, true) => None,
            (false, false) => Some(format!(
                "capabilities.tsc_offset false; +1e9 cycles written, read back {a:?} (before {b:?})"
            )),
            (c, e) => Some(format!(
                "capabilities.tsc_offset {c} but a write {} (before {b:?}, after {a:?}): \
                 treated as inert",
                if e {
                    "took effect"
                } else {
                    "did not take effect"
                }
            )),
        };
        match &self.inert {
            None => eprintln!("faults: TSC offsets take effect here (write read back): offset consistency is checked"),
            Some(why) => {
                eprintln!("faults: ************************************************************************");
                eprintln!("faults: SKIP: TSC offsets are inert on this host; offset consistency checked only in the KVM lab");
                eprintln!("faults:       ({why})");
                eprintln!("faults: ************************************************************************");
            }
        }
        Ok(())
    }
}

pub fn count_lines(p: &Path) -> usize {
    std::fs::read(p)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

fn wait_lines(p: &Path, n: usize, timeout_ms: u64) -> Result<(), String> {
    let end = now_ns() + timeout_ms * 1_000_000;
    while count_lines(p) < n {
        if now_ns() > end {
            return Err(format!(
                "the probe wrote {} reports to {}, {n} expected",
                count_lines(p),
                p.display()
            ));
        }
        sleep_ms(5);
    }
    Ok(())
}

/// The offsets after a fault, against those before and the plan's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offsets {
    AllOld,
    AllNew,
    Inconsistent,
    /// Not checked: offsets inert here, or old = new.
    Skipped,
}

impl Offsets {
    pub fn name(self) -> &'static str {
        match self {
            Offsets::AllOld => "all old",
            Offsets::AllNew => "all new",
            Offsets::Inconsistent => "INCONSISTENT",
            Offsets::Skipped => "not checked",
        }
    }
}

pub fn classify(env: &Env, old: &[i64], new: &[i64], now: &[i64]) -> Offsets {
    if env.inert.is_some() || old == new {
        Offsets::Skipped
    } else if now == old {
        Offsets::AllOld
    } else if now == new {
        Offsets::AllNew
    } else {
        Offsets::Inconsistent
    }
}

/// What the guest saw after the final resume.
#[derive(Debug, Clone, Default)]
pub struct ProbeCheck {
    /// Our own check: TSC and kvm-clock never decreased, per vCPU, over the
    /// source log and every log after it, in TAI order.
    pub monotonic: bool,
    /// `clockcarry-refvmm analyze --json`'s `monotonic` (None: it failed).
    pub analyze_monotonic: Option<bool>,
    /// Reports after the restore, per vCPU.
    pub after: BTreeMap<u64, usize>,
    pub detail: String,
}

impl ProbeCheck {
    /// Fails when a clock went backwards, or when the guest did not report
    /// on every vCPU (nothing checked).
    pub fn backwards(&self, cpus: u32) -> bool {
        !self.monotonic
            || self.analyze_monotonic != Some(true)
            || self.after.len() < cpus as usize
            || self.after.values().any(|&n| n < 2)
    }
}

/// Resumes the VM, lets the probe run, shuts the VMM down and checks the
/// logs (the source's, then `logs`).
pub fn resume_and_check(env: &Env, vmm: &mut Vmm, logs: &[&Path]) -> ProbeCheck {
    let resumed = put(&vmm.sock, "vm.resume", None);
    if let Err(e) = &resumed {
        env.shutdown(vmm);
        return ProbeCheck {
            detail: format!("resume failed: {e}"),
            ..ProbeCheck::default()
        };
    }
    crate::util::step("the probe runs");
    sleep_ms(env.probe_ms);
    env.shutdown(vmm);
    if env.inject.get() & INJECT_BACKWARDS != 0 {
        if let Some(last) = logs.last() {
            inject_backwards(last);
        }
        env.inject.set(env.inject.get() & !INJECT_BACKWARDS);
    }
    check_logs(env, logs)
}

/// `--inject-failure`: appends a copy of the log's last report, one
/// microsecond later by TAI and 10^9 cycles earlier by TSC: a guest clock
/// that went backwards, which the check must catch.
fn inject_backwards(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(mut v) = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
    else {
        eprintln!(
            "faults: INJECTED FAILURE not possible: {} is empty",
            log.display()
        );
        return;
    };
    let tsc = v["tsc"].as_u64().unwrap_or(0);
    let tai = v["tai_ns"].as_u64().unwrap_or(0);
    v["tsc"] = Value::from(tsc.saturating_sub(1_000_000_000));
    v["tai_ns"] = Value::from(tai + 1000);
    v["seq"] = Value::from(v["seq"].as_u64().unwrap_or(0) + 1);
    let line = format!("{v}\n");
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    eprintln!(
        "faults: INJECTED FAILURE: a report with the TSC 10^9 cycles back appended to {}",
        log.display()
    );
}

/// One report: (TAI, index of its log, TSC, kvm-clock).
type Point = (u64, usize, u64, Option<u64>);

pub fn check_logs(env: &Env, logs: &[&Path]) -> ProbeCheck {
    let mut all: Vec<&Path> = vec![&env.src_log];
    all.extend_from_slice(logs);
    let mut out = ProbeCheck::default();
    // vcpu -> its reports
    let mut per: BTreeMap<u64, Vec<Point>> = BTreeMap::new();
    for (i, p) in all.iter().enumerate() {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let (Some(vcpu), Some(tsc), Some(tai)) =
                (v["vcpu"].as_u64(), v["tsc"].as_u64(), v["tai_ns"].as_u64())
            else {
                continue;
            };
            per.entry(vcpu)
                .or_default()
                .push((tai, i, tsc, v["kvmclock_ns"].as_u64()));
            if i > 0 {
                *out.after.entry(vcpu).or_default() += 1;
            }
        }
    }
    out.monotonic = true;
    let mut problems = Vec::new();
    for (vcpu, ps) in per.iter_mut() {
        ps.sort_by_key(|p| (p.0, p.1));
        let mut last_kc: Option<u64> = None;
        for w in ps.windows(2) {
            if w[1].2 < w[0].2 {
                out.monotonic = false;
                problems.push(format!(
                    "vCPU {vcpu}: TSC {} -> {} (log {} -> {})",
                    w[0].2, w[1].2, w[0].1, w[1].1
                ));
            }
        }
        for p in ps.iter() {
            if let Some(kc) = p.3 {
                if let Some(l) = last_kc {
                    if kc < l {
                        out.monotonic = false;
                        problems.push(format!("vCPU {vcpu}: kvm-clock {l} -> {kc} ns"));
                    }
                }
                last_kc = Some(kc);
            }
        }
    }
    crate::util::step("clockcarry-refvmm analyze");
    let mut cmd = Command::new(&env.refvmm);
    cmd.args(["analyze", "--json"]);
    for p in &all {
        if p.exists() {
            cmd.arg(p);
        }
    }
    match cmd.output() {
        Ok(o) if o.status.success() => {
            out.analyze_monotonic = serde_json::from_slice::<Value>(&o.stdout)
                .ok()
                .and_then(|v| v["monotonic"].as_bool());
        }
        Ok(o) => problems.push(format!(
            "analyze failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => problems.push(format!("analyze: {e}")),
    }
    problems.truncate(4);
    out.detail = problems.join("; ");
    out
}
