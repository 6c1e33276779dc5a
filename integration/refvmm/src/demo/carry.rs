//! clockcarry's two moments in the demo: capture before the pause, restore
//! before the resume. In-process through the library (GET vm.clock ->
//! sidecar -> plan -> PUT vm.clock), or through the `clockcarry` binary
//! (`--clockcarry-bin`).

use std::path::{Path, PathBuf};
use std::process::Command;

use clockcarry::host;
use clockcarry::model::{Policy, VmClock};
use clockcarry::plan::{plan, Destination};
use clockcarry::sidecar::{Sidecar, SidecarBody};

use super::vmmproc::{DemoError, VmmProcess};
use crate::clockapi::{ClockPut, FollowPvti, KvmClockPut};

/// VM id written into the demo's sidecars.
pub const VM_ID: &str = "clockcarry-demo";

/// How clockcarry is invoked.
#[derive(Debug, Clone)]
pub enum Carry {
    InProcess,
    Binary(PathBuf),
}

fn get_clock(vmm: &VmmProcess) -> Result<VmClock, DemoError> {
    let body = vmm.ok("GET", "vm.clock", None)?;
    serde_json::from_str(&body).map_err(|e| format!("{}: GET vm.clock answer: {e}", vmm.name))
}

fn run_bin(bin: &Path, args: &[&str]) -> Result<String, DemoError> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
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
    /// VM. Returns the kvm-clock error the VMM reported, if any.
    pub fn restore(&self, vmm: &VmmProcess, sidecar: &Path) -> Result<Option<i64>, DemoError> {
        match self {
            Carry::Binary(bin) => {
                let socket = vmm.socket.display().to_string();
                let input = sidecar.display().to_string();
                run_bin(bin, &["restore", "--api-socket", &socket, "-i", &input]).map(|_| None)
            }
            Carry::InProcess => {
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
                let pvti = *p.kvmclock.pvti();
                let put = ClockPut {
                    tsc_khz: p.tsc_khz,
                    tsc_offsets: p.tsc_offsets.clone(),
                    kvmclock: Some(KvmClockPut::FollowPvti(FollowPvti {
                        tsc_timestamp: pvti.tsc_timestamp,
                        system_time: pvti.system_time,
                        tsc_to_system_mul: pvti.tsc_to_system_mul,
                        tsc_shift: pvti.tsc_shift,
                        flags: pvti.flags,
                        max_error_ns: policy.max_kvmclock_error_ns,
                    })),
                };
                let body = serde_json::to_string(&put).map_err(|e| e.to_string())?;
                let answer = vmm.ok("PUT", "vm.clock", Some(&body))?;
                let v: serde_json::Value =
                    serde_json::from_str(&answer).map_err(|e| format!("PUT answer: {e}"))?;
                Ok(v.get("kvmclock_error_ns")
                    .and_then(serde_json::Value::as_i64))
            }
        }
    }
}
