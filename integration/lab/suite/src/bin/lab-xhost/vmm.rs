//! The reference VMM and the clockcarry command on one lab host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clockcarry_refvmm::demo::vmmproc::VmmProcess;
use serde_json::Value;

/// VM id in the sidecars.
pub const VM_ID: &str = "lab-xhost";

/// The programs run on a host.
#[derive(Debug, Clone)]
pub struct Tools {
    pub refvmm: PathBuf,
    pub clockcarry: PathBuf,
    /// The sidecar key both hosts hold: it seals the sidecar and
    /// authenticates the offset exchange. `None`: the exchange runs keyless
    /// (`--insecure-no-key`) and sidecars are unsealed.
    pub key: Option<PathBuf>,
}

impl Tools {
    /// `--key FILE`, or `--insecure-no-key` where `keyless` names the
    /// flag (the exchange's commands), or nothing.
    pub fn key_args(&self, keyless: bool) -> Vec<String> {
        match &self.key {
            Some(k) => vec!["--key".into(), k.display().to_string()],
            None if keyless => vec!["--insecure-no-key".into()],
            None => Vec::new(),
        }
    }
}

/// The probe VM boots with its TSC at an hour (a VM that has been up a
/// while: KVM ignores a host-initiated TSC write within 1 s of what it
/// expects, which would hide the stock freeze).
pub const BOOT_TSC_S: u64 = 3_600;

/// VMM options for a mode: stock is the ch-v53 baseline (TSC restored by MSR
/// write), clockcarry the same with the vm.clock extension.
pub fn mode_args(mode: &str) -> Vec<String> {
    let mut v = vec!["--baseline".to_string(), "ch-v53".to_string()];
    if mode != "stock" {
        v.push("--clock-extension".into());
    }
    v
}

pub fn start(
    tools: &Tools,
    dir: &Path,
    name: &str,
    mode: &str,
    extra: &[String],
) -> Result<VmmProcess, String> {
    let mut args = mode_args(mode);
    args.extend([
        "--probe-log".into(),
        dir.join(format!("{name}.jsonl")).display().to_string(),
        "--serial".into(),
        dir.join(format!("{name}.serial")).display().to_string(),
    ]);
    args.extend_from_slice(extra);
    VmmProcess::start(&tools.refvmm, &[], dir, name, &args)
}

/// The VMM's pid (vmm.ping), to find its VM in KVM's debugfs.
pub fn pid(vmm: &VmmProcess) -> Result<u32, String> {
    let body = vmm.ok("GET", "vmm.ping", None)?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("vmm.ping: {e}"))?;
    v.get("pid")
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| format!("vmm.ping without a pid: {body}"))
}

const DEBUGFS_KVM: &str = "/sys/kernel/debug/kvm";

/// Every vCPU's TSC offset as KVM holds it
/// (`/sys/kernel/debug/kvm/<pid>-<fd>/vcpu<N>/tsc-offset`), read without
/// the VMM: the VM of `pid` with `vcpus` vCPUs.
pub fn debugfs_offsets(pid: u32, vcpus: u32) -> Result<Vec<i64>, String> {
    let prefix = format!("{pid}-");
    let mut found = Vec::new();
    for e in std::fs::read_dir(DEBUGFS_KVM).map_err(|e| format!("{DEBUGFS_KVM}: {e}"))? {
        let dir = e.map_err(|e| e.to_string())?.path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && dir.join(format!("vcpu{}", vcpus - 1)).is_dir() {
            found.push(dir);
        }
    }
    let [dir] = found.as_slice() else {
        return Err(format!(
            "{} VMs of pid {pid} with {vcpus} vCPUs in {DEBUGFS_KVM}",
            found.len()
        ));
    };
    (0..vcpus)
        .map(|i| {
            let p = dir.join(format!("vcpu{i}/tsc-offset"));
            std::fs::read_to_string(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .trim()
                .parse::<i64>()
                .map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}

/// KVM_GET_CLOCK's TSC_STABLE (master clock) through GET vm.clock.
pub fn master_clock(vmm: &VmmProcess) -> Result<bool, String> {
    let body = vmm.ok("GET", "vm.clock", None)?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("vm.clock: {e}"))?;
    let flags = v
        .pointer("/kvmclock/flags")
        .and_then(Value::as_u64)
        .ok_or("vm.clock without kvmclock.flags")?;
    Ok(flags & 2 != 0)
}

/// Runs the clockcarry command; its stdout.
pub fn clockcarry(tools: &Tools, args: &[&str]) -> Result<String, String> {
    clockcarry_env(tools, args, &[])
}

/// [`clockcarry`] with these environment variables set.
pub fn clockcarry_env(
    tools: &Tools,
    args: &[&str],
    env: &[(&str, &Path)],
) -> Result<String, String> {
    let out = Command::new(&tools.clockcarry)
        .args(["--log-target", "stderr"])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", tools.clockcarry.display()))?;
    if !out.status.success() {
        return Err(format!(
            "clockcarry {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this clockcarry has `serve` and `capture --peer` (the measured
/// inter-host offset); the reason when not.
pub fn measured_support(tools: &Tools) -> Result<(), String> {
    let serve = Command::new(&tools.clockcarry)
        .args(["serve", "--help"])
        .output()
        .map_err(|e| e.to_string())?;
    if !serve.status.success() {
        return Err("`clockcarry serve` does not exist in this build".into());
    }
    let capture = Command::new(&tools.clockcarry)
        .args(["capture", "--help"])
        .output()
        .map_err(|e| e.to_string())?;
    if !String::from_utf8_lossy(&capture.stdout).contains("--peer") {
        return Err("`clockcarry capture` has no --peer in this build".into());
    }
    Ok(())
}

/// Whether something listens on TCP `port` here (/proc/net/tcp, LISTEN).
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
        })
    })
}

/// Waits until `port` listens, up to `timeout`.
pub fn wait_listening(port: u16, timeout: Duration) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if listening(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Finds `key` anywhere in a JSON value (first match, depth first).
pub fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}
