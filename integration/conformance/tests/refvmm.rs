//! The suite against the reference VMM (`--boot-refvmm`, the binary built
//! from this workspace): every check passes; a skip is allowed only for
//! the checks that need effective TSC offsets, on hosts that ignore offset
//! writes, and it must say so. Needs /dev/kvm (prints "SKIP: <reason>"
//! without it).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const SUITE: &str = env!("CARGO_BIN_EXE_clockcarry-conformance");
const INERT: &str = "TSC offsets are inert on this host";

/// The checks, in order: a check that disappears or moves fails this test.
const CHECKS: [&str; 26] = [
    "get-paused",
    "refuse/malformed-json",
    "refuse/unknown-field",
    "refuse/unknown-nested-field",
    "refuse/wrong-type",
    "refuse/offsets-one-short",
    "refuse/offsets-one-long",
    "refuse/offsets-empty",
    "refuse/tsc-khz-0",
    "refuse/follow-pvti-mul-0",
    "refuse/follow-pvti-shift-40",
    "refuse/set-clock-flags-2",
    "refuse/set-clock-realtime-flag-realtime-0",
    "refuse/no-body",
    "kernel-refusal",
    "put-offsets-kvmclock-null",
    "offsets-move",
    "put-follow-pvti",
    "follow-pvti-verified",
    "put-again-before-resume",
    "resume",
    "get-running",
    "resume-kept-kvmclock",
    "put-running-wrong-state",
    "pause",
    "put-after-run-wrong-state",
];

/// The checks that need TSC offset writes to take effect.
const NEED_EFFECTIVE_OFFSETS: [&str; 1] = ["offsets-move"];

fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!(
            "/dev/kvm: {e} (the reference VMM needs it, as root here)"
        )),
    }
}

/// The reference VMM binary: `CLOCKCARRY_REFVMM`, else built from this
/// workspace into the profile directory this test's suite binary is in
/// (cargo does nothing when it is fresh).
fn refvmm_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CLOCKCARRY_REFVMM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("CLOCKCARRY_REFVMM={} is not a file", p.display()))
        };
    }
    let dir = Path::new(SUITE).parent().ok_or("no target directory")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .ok_or("no workspace")?;
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(workspace).args([
        "build",
        "--quiet",
        "-p",
        "clockcarry-refvmm",
        "--bin",
        "clockcarry-refvmm",
    ]);
    if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        build.arg("--release");
    }
    let out = build.output().map_err(|e| format!("cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build -p clockcarry-refvmm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let candidate = dir.join("clockcarry-refvmm");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!("{} not found after building", candidate.display()))
    }
}

#[test]
fn every_check_passes_against_the_reference_vmm() {
    if let Some(reason) = kvm_unavailable() {
        println!("SKIP: {reason}");
        return;
    }
    let refvmm = refvmm_binary().unwrap_or_else(|e| panic!("the reference VMM: {e}"));

    // JSON: every check by name.
    let out = Command::new(SUITE)
        .arg("--boot-refvmm")
        .arg(&refvmm)
        .arg("--json")
        .output()
        .expect("the suite runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let checks: Vec<&Value> = lines.iter().filter(|l| l.get("check").is_some()).collect();
    let ids: Vec<&str> = checks
        .iter()
        .map(|c| c["check"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, CHECKS, "the checks, in order");
    for c in &checks {
        let id = c["check"].as_str().unwrap_or("");
        let reason = c["reason"].as_str().unwrap_or("");
        match c["result"].as_str() {
            Some("pass") => {}
            Some("skip") => {
                assert!(
                    NEED_EFFECTIVE_OFFSETS.contains(&id) && reason.starts_with(INERT),
                    "only the effective-offset checks may skip, saying {INERT:?}: {id}: {reason}"
                );
                println!("SKIP: {reason} ({id})");
            }
            other => panic!("{id}: {other:?}: {reason}"),
        }
    }
    let summary = lines
        .iter()
        .find_map(|l| l.get("summary"))
        .expect("a summary line");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["checks"], CHECKS.len(), "{summary}");
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(
        stderr.contains(&format!(
            "conformance: {} passed, 0 failed, {} skipped",
            summary["passed"], summary["skipped"]
        )),
        "the plain closing line on stderr: {stderr}"
    );

    // Text, with one vCPU: PASS/SKIP lines and the closing line on stdout.
    let out = Command::new(SUITE)
        .arg("--boot-refvmm")
        .arg(&refvmm)
        .args(["--cpus", "1"])
        .output()
        .expect("the suite runs");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "exit status {:?}: {text}", out.status);
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.starts_with("conformance: ") && last.contains(" 0 failed"),
        "{last}"
    );
    for id in CHECKS {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}"));
        assert!(
            line.contains(" PASS: ") || line.contains(&format!(" SKIP: {INERT}")),
            "{line}"
        );
    }
}
