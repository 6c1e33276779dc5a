//! Helpers of the reference VMM's integration tests: start VMM processes,
//! call their API, skip without /dev/kvm.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use clockcarry_refvmm::demo::vmmproc::VmmProcess;
use serde_json::Value;

/// `Some(reason)` when /dev/kvm cannot be used here.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

/// Returns early from a test (printing SKIP) when /dev/kvm is unusable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(reason) = common::kvm_unavailable() {
            println!("SKIP: {reason}");
            return;
        }
    };
}

/// A fresh directory for one test, removed when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("refvmm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

pub fn vmm_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clockcarry-refvmm"))
}

/// Starts a VMM in `dir` named `name` with extra arguments.
pub fn start(dir: &Path, name: &str, args: &[&str]) -> VmmProcess {
    let mut all: Vec<String> = vec![
        "--probe-log".into(),
        dir.join(format!("{name}.jsonl")).display().to_string(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    VmmProcess::start(&vmm_binary(), &[], dir, name, &all).expect("VMM starts")
}

/// Starts a VMM that boots the probe.
pub fn boot(dir: &Path, name: &str, extra: &[&str]) -> VmmProcess {
    let mut args = vec!["--kernel", "probe", "--cpus", "2"];
    args.extend_from_slice(extra);
    let vmm = start(dir, name, &args);
    std::thread::sleep(Duration::from_millis(100));
    vmm
}

/// (status, body) of one call.
pub fn call(vmm: &VmmProcess, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let r = vmm.call(method, endpoint, body).expect("transport");
    (r.status, r.body)
}

/// The error strings of a CH-style error body (a JSON array of strings), or
/// of a typed `PUT vm.clock` failure (its `messages`).
pub fn messages(body: &str) -> Vec<String> {
    if let Some(f) = clockcarry::vmclock_api::parse_put_failure(body.as_bytes()) {
        return f.messages;
    }
    serde_json::from_str(body).unwrap_or_else(|e| panic!("error body {body:?}: {e}"))
}

/// Asserts status and that the error chain mentions `needle`.
pub fn expect_error(
    vmm: &VmmProcess,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    status: u16,
    needle: &str,
) {
    let (s, b) = call(vmm, method, endpoint, body);
    assert_eq!(s, status, "{method} {endpoint}: body {b}");
    let m = messages(&b);
    assert!(
        m.iter().any(|x| x.contains(needle)),
        "{method} {endpoint}: {m:?} lacks {needle:?}"
    );
}

pub fn info(vmm: &VmmProcess) -> Value {
    let (s, b) = call(vmm, "GET", "vm.info", None);
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).expect("vm.info JSON")
}

pub fn state(vmm: &VmmProcess) -> String {
    info(vmm)["state"].as_str().unwrap_or("").to_string()
}

/// GET vm.clock, read and checked as the `clockcarry` client does.
pub fn clock(vmm: &VmmProcess) -> clockcarry::VmClock {
    let (s, b) = call(vmm, "GET", "vm.clock", None);
    assert_eq!(s, 200, "{b}");
    clockcarry::vmclock_api::parse_vm_clock(b.as_bytes())
        .unwrap_or_else(|e| panic!("vm.clock answer refused by the client's checks: {e}: {b}"))
}

/// Probe reports received so far.
pub fn reports(vmm: &VmmProcess) -> u64 {
    info(vmm)["clockcarry"]["probe_reports"]
        .as_u64()
        .unwrap_or(0)
}

/// Pauses, snapshots into `dir/snap`, returns the file:// URL.
pub fn snapshot(vmm: &VmmProcess, dir: &Path) -> String {
    assert_eq!(call(vmm, "PUT", "vm.pause", None).0, 204);
    let url = format!("file://{}", dir.join("snap").display());
    let body = format!(r#"{{"destination_url":"{url}"}}"#);
    let (s, b) = call(vmm, "PUT", "vm.snapshot", Some(&body));
    assert_eq!(s, 204, "{b}");
    url
}

/// A PUT vm.clock body following the captured line with `n` offsets.
pub fn follow_body(c: &clockcarry::VmClock, n: usize) -> String {
    let p = c.pvti.expect("PVTI captured");
    let offsets: Vec<i64> = (0..n)
        .map(|i| c.vcpus.get(i).map_or(0, |v| v.tsc_offset))
        .collect();
    serde_json::json!({
        "tsc_khz": null,
        "tsc_offsets": offsets,
        "kvmclock": {"follow_pvti": {
            "tsc_timestamp": p.tsc_timestamp, "system_time": p.system_time,
            "tsc_to_system_mul": p.tsc_to_system_mul, "tsc_shift": p.tsc_shift,
            "flags": p.flags, "max_error_ns": 50}}
    })
    .to_string()
}
