//! clockcarry's two moments in the demo: capture before the pause, restore
//! before the resume. By default through the `clockcarry` command (the
//! binary next to the demo's own, or `--clockcarry-bin PATH`): `clockcarry
//! capture` and `clockcarry restore --json`, each its own process, exactly
//! what an operator runs. With `--in-process` the demo does the same through
//! the library (GET vm.clock -> sidecar -> plan -> PUT vm.clock) instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clockcarry::host;
use clockcarry::model::{Policy, VmClock};
use clockcarry::plan::{plan, Destination, PlanMode};
use clockcarry::sidecar::{Sidecar, SidecarBody};
use serde_json::Value;

use super::progress;
use super::vmmproc::{DemoError, VmmProcess};
use clockcarry::vmclock_api::{parse_vm_clock, ClockPut};

/// VM id written into the demo's sidecars.
pub const VM_ID: &str = "clockcarry-demo";

/// Name of the `clockcarry` binary looked for next to the demo's own.
pub const BINARY_NAME: &str = "clockcarry";

/// How clockcarry is invoked.
#[derive(Debug, Clone)]
pub enum Carry {
    /// The library, inside the demo process (`--in-process`).
    InProcess,
    /// The `clockcarry` command at this path.
    Binary(PathBuf),
}

/// What a clockcarry restore reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// `same-host` or `cross-host`.
    pub plan_mode: Option<String>,
    /// The plan's error bound on the guest TSC (`summary.error_bound.total_ns`):
    /// both (TSC, TAI) brackets, both hosts' clock errors and the rate
    /// uncertainty over the elapsed time; 0 for a same-host plan, which
    /// copies the offsets.
    pub plan_bound_ns: Option<u64>,
    /// The kvm-clock error the VMM reported for its PUT.
    pub put_kvmclock_error_ns: Option<i64>,
    /// Start of the restore to the PUT's answer: what it adds to the
    /// blackout (`timings.to_put_answered_ns` of the command); `None` for
    /// an armed clock, where nothing runs inside the blackout.
    pub restore_ns: Option<u64>,
}

/// Where an armed clock goes: the request that restores the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmedFor<'a> {
    /// `vm.restore` from this `source_url`.
    Restore(&'a str),
    /// `vm.receive-migration` on this `receiver_url`.
    Receive(&'a str),
}

/// An armed clock, planned before the pause.
#[derive(Debug, Clone)]
pub struct ArmedRequest {
    /// The whole request body, `clock` included (`resume: true`).
    pub body: String,
    pub plan_mode: Option<String>,
    pub plan_bound_ns: Option<u64>,
}

/// The request body around an armed `clock`.
fn wrap(target: ArmedFor<'_>, clock: &ClockPut) -> Result<String, DemoError> {
    let v = match target {
        ArmedFor::Restore(url) => {
            serde_json::json!({"source_url": url, "resume": true, "clock": clock})
        }
        ArmedFor::Receive(url) => {
            serde_json::json!({"receiver_url": url, "resume": true, "clock": clock})
        }
    };
    serde_json::to_string(&v).map_err(|e| e.to_string())
}

impl Carry {
    /// The `clockcarry` binary next to `exe` (target/<profile>/ for the
    /// demo built by cargo), if it is there.
    pub fn next_to(exe: &Path) -> Option<PathBuf> {
        let bin = exe.parent()?.join(BINARY_NAME);
        bin.is_file().then_some(bin)
    }

    /// One line saying which clockcarry the clockcarry rows run.
    pub fn describe(&self) -> String {
        match self {
            Carry::Binary(bin) => {
                let version = Command::new(bin)
                    .arg("--version")
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "version unknown".into());
                format!(
                    "the clockcarry command {} ({version}): `clockcarry capture`, `clockcarry arm` and \
                     `clockcarry restore`, each its own process",
                    bin.display()
                )
            }
            Carry::InProcess => {
                "the clockcarry library inside the demo process (--in-process), not the \
                 clockcarry command"
                    .into()
            }
        }
    }

    /// The row's `clockcarry` field: the binary's path, or `in-process`.
    pub fn label(&self) -> String {
        match self {
            Carry::Binary(bin) => bin.display().to_string(),
            Carry::InProcess => "in-process".into(),
        }
    }
}

fn get_clock(vmm: &VmmProcess) -> Result<VmClock, DemoError> {
    let body = vmm.ok("GET", "vm.clock", None)?;
    parse_vm_clock(body.as_bytes()).map_err(|e| format!("{}: GET vm.clock answer: {e}", vmm.name))
}

fn run_bin(bin: &Path, args: &[&str]) -> Result<String, DemoError> {
    // Logs on stderr (kept for the error message), never to syslog.
    let child = Command::new(bin)
        .args(["--log-target", "stderr"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let pid = child.id();
    progress::add_child(pid);
    let out = child.wait_with_output();
    progress::remove_child(pid);
    let out = out.map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {}: {} {}",
            bin.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Carry {
    /// Plans the armed clock for the VM in `sidecar` on this host now
    /// (`clockcarry arm`, or `armed::plan_armed` in process), for the
    /// request `target`; `work` is where the command writes its file.
    pub fn arm(
        &self,
        sidecar: &Path,
        target: ArmedFor<'_>,
        work: &Path,
    ) -> Result<ArmedRequest, DemoError> {
        match self {
            Carry::Binary(bin) => {
                let input = sidecar.display().to_string();
                let out = work.join("armed.json").display().to_string();
                let (flag, url) = match target {
                    ArmedFor::Restore(u) => ("--for-restore", u),
                    ArmedFor::Receive(u) => ("--for-receive", u),
                };
                let report = run_bin(bin, &["arm", "-i", &input, flag, url, "-o", &out, "--json"])?;
                let report: Value = serde_json::from_str(&report)
                    .map_err(|e| format!("clockcarry arm --json: {e}"))?;
                let body = std::fs::read_to_string(&out).map_err(|e| format!("{out}: {e}"))?;
                Ok(ArmedRequest {
                    body,
                    plan_mode: report["mode"].as_str().map(str::to_string),
                    plan_bound_ns: report["error_bound_ns"].as_u64(),
                })
            }
            Carry::InProcess => {
                let source = Sidecar::read_from(sidecar, None)
                    .map_err(|e| format!("sidecar: {e}"))?
                    .body;
                let khz = source.vm_clock.tsc_khz;
                let identity = host::identity(khz).map_err(|e| format!("host identity: {e}"))?;
                let sample = host::sample(host::DEFAULT_TRIES, identity.tsc_khz)
                    .map_err(|e| format!("host sample: {e}"))?;
                let armed = clockcarry::armed::plan_armed(
                    &source,
                    identity,
                    sample,
                    Some(VM_ID.into()),
                    &Policy::default(),
                    clockcarry::armed::DEFAULT_VALID_FOR_NS,
                )
                .map_err(|e| format!("arm: {e}"))?;
                Ok(ArmedRequest {
                    body: wrap(target, &armed.put)?,
                    plan_mode: Some(mode_name(armed.plan.mode).into()),
                    plan_bound_ns: Some(armed.plan.error_bound.total_ns),
                })
            }
        }
    }

    /// Captures the VM (running) into the sidecar file `sidecar`.
    pub fn capture(&self, vmm: &VmmProcess, sidecar: &Path) -> Result<(), DemoError> {
        match self {
            Carry::Binary(bin) => {
                let socket = vmm.socket.display().to_string();
                let out = sidecar.display().to_string();
                run_bin(
                    bin,
                    &[
                        "capture",
                        "--api-socket",
                        &socket,
                        "--vm",
                        VM_ID,
                        "-o",
                        &out,
                    ],
                )
                .map(|_| ())
            }
            Carry::InProcess => {
                let clock = get_clock(vmm)?;
                let sample = host::sample(host::DEFAULT_TRIES, clock.tsc_khz)
                    .map_err(|e| format!("host sample: {e}"))?;
                let identity =
                    host::identity(clock.tsc_khz).map_err(|e| format!("host identity: {e}"))?;
                let body = SidecarBody::new(VM_ID, identity, sample, clock);
                let sealed = Sidecar::seal(body, None).map_err(|e| format!("sidecar: {e}"))?;
                sealed
                    .write_to(sidecar)
                    .map_err(|e| format!("sidecar: {e}"))
            }
        }
    }

    /// Plans from `sidecar` and PUTs the result into the (paused, restored)
    /// VM.
    pub fn restore(&self, vmm: &VmmProcess, sidecar: &Path) -> Result<RestoreOutcome, DemoError> {
        match self {
            Carry::Binary(bin) => {
                let socket = vmm.socket.display().to_string();
                let input = sidecar.display().to_string();
                let out = run_bin(
                    bin,
                    &["restore", "--api-socket", &socket, "-i", &input, "--json"],
                )?;
                let report: Value = serde_json::from_str(&out)
                    .map_err(|e| format!("clockcarry restore --json: {e}"))?;
                let at = |path: &str| report.pointer(path).cloned().unwrap_or(Value::Null);
                Ok(RestoreOutcome {
                    plan_mode: at("/summary/mode").as_str().map(str::to_string),
                    plan_bound_ns: at("/summary/error_bound/total_ns").as_u64(),
                    put_kvmclock_error_ns: at("/kvmclock/vmm_error_ns").as_i64(),
                    restore_ns: at("/timings/to_put_answered_ns").as_u64(),
                })
            }
            Carry::InProcess => {
                let started = std::time::Instant::now();
                let source = Sidecar::read_from(sidecar, None)
                    .map_err(|e| format!("sidecar: {e}"))?
                    .body;
                let clock = get_clock(vmm)?;
                let sample = host::sample(host::DEFAULT_TRIES, clock.tsc_khz)
                    .map_err(|e| format!("host sample: {e}"))?;
                let identity =
                    host::identity(clock.tsc_khz).map_err(|e| format!("host identity: {e}"))?;
                let policy = Policy::default();
                let destination = Destination {
                    identity,
                    sample,
                    vm: clock,
                    vm_id: Some(VM_ID.into()),
                    offset_estimate: None,
                };
                let p = plan(&source, &destination, &policy).map_err(|e| format!("plan: {e}"))?;
                let put = ClockPut::from_plan(&p);
                let body = serde_json::to_string(&put).map_err(|e| e.to_string())?;
                let answer = vmm.ok("PUT", "vm.clock", Some(&body))?;
                let restore_ns = u64::try_from(started.elapsed().as_nanos()).ok();
                let v: Value =
                    serde_json::from_str(&answer).map_err(|e| format!("PUT answer: {e}"))?;
                Ok(RestoreOutcome {
                    plan_mode: Some(mode_name(p.mode).into()),
                    plan_bound_ns: Some(p.error_bound.total_ns),
                    put_kvmclock_error_ns: v.get("kvmclock_error_ns").and_then(Value::as_i64),
                    restore_ns,
                })
            }
        }
    }
}

fn mode_name(mode: PlanMode) -> &'static str {
    match mode {
        PlanMode::SameHost => "same-host",
        PlanMode::CrossHost => "cross-host",
    }
}
