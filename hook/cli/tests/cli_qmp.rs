//! `clockcarry capture` / `restore --qmp-socket` against a scripted QEMU
//! (hook/tests/support/fake_qmp.rs): what the CLI sends over QMP, the
//! sidecar it writes, and its exits for a stock QEMU and for a refusal
//! QEMU typed.

mod cli_support;
#[path = "../../tests/support/fake_qmp.rs"]
mod fake_qmp;

use std::sync::{Arc, Mutex};

use cli_support::{host_khz, run, TempDir};
use fake_qmp::{commands, greeting, guest_clock, line, patched_then, FakeQmp, Step};
use serde_json::{json, Value};

/// The fake VM at this host's TSC rate (restore refuses a rate the host
/// cannot run), running or paused.
fn vm(running: bool, settable: bool) -> Value {
    let mut v = guest_clock(settable);
    v["tsc-khz"] = json!(host_khz());
    if running {
        v["state"] = json!("running");
    }
    v
}

fn capture(dir: &TempDir, fake: &FakeQmp) -> cli_support::Run {
    let sidecar = dir.join("vm1.sidecar.json").display().to_string();
    run(
        dir.path(),
        &[
            "capture",
            "--qmp-socket",
            fake.socket.to_str().expect("utf-8"),
            "--vm",
            "vm1",
            "-o",
            &sidecar,
        ],
    )
}

/// A sidecar of the fake VM in `dir`, captured from a running QEMU.
fn captured(dir: &TempDir, tag: &str) {
    let src = FakeQmp::start(
        &format!("cli-{tag}-src"),
        patched_then(vec![Step::Reply("x-query-guest-clock", vm(true, false))]),
    );
    capture(dir, &src).expect(0);
    src.finish().expect("source script");
}

/// `clockcarry restore --qmp-socket` of that sidecar against `fake`.
fn restore(dir: &TempDir, fake: &FakeQmp, extra: &[&str]) -> cli_support::Run {
    let sidecar = dir.join("vm1.sidecar.json").display().to_string();
    let socket = fake.socket.display().to_string();
    let mut args = vec![
        "restore",
        "--qmp-socket",
        &socket,
        "--vm",
        "vm1",
        "-i",
        &sidecar,
    ];
    args.extend_from_slice(extra);
    run(dir.path(), &args)
}

#[test]
fn capture_over_qmp_writes_the_vms_clock() {
    let dir = TempDir::new("qmp-capture");
    let fake = FakeQmp::start(
        "cli-capture",
        patched_then(vec![Step::Reply("x-query-guest-clock", vm(true, false))]),
    );
    capture(&dir, &fake).expect(0);
    let requests = fake.finish().expect("script");
    let names: Vec<_> = requests.iter().map(|r| r["execute"].clone()).collect();
    assert_eq!(
        names,
        vec![
            json!("qmp_capabilities"),
            json!("query-commands"),
            json!("x-query-guest-clock")
        ]
    );
    let sidecar: Value =
        serde_json::from_slice(&std::fs::read(dir.join("vm1.sidecar.json")).expect("sidecar"))
            .expect("JSON");
    let text = sidecar.to_string();
    assert!(text.contains("-123456789"), "the offsets QEMU gave: {text}");
    assert!(
        text.contains("138241147376000"),
        "the PVTI QEMU gave: {text}"
    );
}

#[test]
fn a_stock_qemu_is_refused_naming_the_command_and_nothing_is_written() {
    let dir = TempDir::new("qmp-stock");
    let fake = FakeQmp::start(
        "cli-stock",
        vec![
            Step::Send(greeting()),
            Step::Reply("qmp_capabilities", json!({})),
            Step::Reply("query-commands", commands(&[])),
        ],
    );
    capture(&dir, &fake)
        .expect(4)
        .stderr_has("no QMP command x-query-guest-clock")
        .stderr_has("qemu-patch");
    assert!(!dir.join("vm1.sidecar.json").exists());
}

#[test]
fn restore_over_qmp_sets_the_captured_clock() {
    let dir = TempDir::new("qmp-restore");
    captured(&dir, "restore");

    // The destination: paused, settable; it applies what it is sent and
    // shows it in the read-back.
    let applied: Arc<Mutex<Option<Value>>> = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&applied);
    let shown = Arc::clone(&applied);
    let dst = FakeQmp::start(
        "cli-restore-dst",
        patched_then(vec![
            Step::Reply("x-query-guest-clock", vm(false, true)),
            Step::Custom(
                "x-set-guest-clock",
                Box::new(move |req: &Value| {
                    let offsets = req["arguments"]["tsc-offsets"].clone();
                    *seen.lock().expect("lock") = Some(offsets.clone());
                    line(&json!({"id": req["id"], "return": {
                        "kvmclock-request": "follow-pvti", "kvmclock-method": "set-clock",
                        "kvmclock-error-ns": 20, "kvmclock-within-target": true, "kvmclock-tries": 1,
                        "tsc-offsets-applied": offsets, "tsc-offsets-read-back": offsets,
                        "tsc-offsets-effective": true, "refused": []}}))
                }),
            ),
            Step::Custom(
                "x-query-guest-clock",
                Box::new(move |req: &Value| {
                    let mut after = vm(false, false);
                    let offsets = shown.lock().expect("lock").clone().expect("set first");
                    for (i, o) in offsets.as_array().expect("array").iter().enumerate() {
                        after["vcpus"][i]["tsc-offset"] = o.clone();
                    }
                    after["last-set"] = json!("applied");
                    line(&json!({"id": req["id"], "return": after}))
                }),
            ),
        ]),
    );
    let out = restore(&dir, &dst, &["--json"]);
    let requests = dst.finish().expect("destination script");
    assert!(
        out.code == 0 || out.code == 7,
        "exit {}: {}",
        out.code,
        out.stderr
    );
    let set = requests
        .iter()
        .find(|r| r["execute"] == "x-set-guest-clock")
        .expect("x-set-guest-clock sent");
    // One QMP session for the whole restore.
    assert_eq!(
        requests
            .iter()
            .filter(|r| r["execute"] == "qmp_capabilities")
            .count(),
        1
    );
    // Same host: the captured offsets, bit for bit, and kvm-clock on the
    // sidecar's line.
    assert_eq!(
        set["arguments"]["tsc-offsets"],
        json!([-123_456_789, -123_456_789])
    );
    assert_eq!(set["arguments"]["kvmclock"]["method"], json!("follow-pvti"));
    assert_eq!(
        set["arguments"]["kvmclock"]["tsc-timestamp"],
        json!(138_241_147_376_000_u64)
    );
}

#[test]
fn a_refusal_qemu_typed_as_wrong_state_says_nothing_needs_restoring() {
    let dir = TempDir::new("qmp-wrong");
    captured(&dir, "wrong");
    let mut after = vm(false, false);
    after["last-set"] = json!("wrong-state");
    let dst = FakeQmp::start(
        "cli-wrong-dst",
        patched_then(vec![
            Step::Reply("x-query-guest-clock", vm(false, false)),
            Step::Error(
                "x-set-guest-clock",
                "GenericError",
                "the guest clock can be set only while ...",
            ),
            Step::Reply("x-query-guest-clock", after.clone()),
            Step::Reply("x-query-guest-clock", after),
        ]),
    );
    restore(&dir, &dst, &[])
        .expect(4)
        .stderr_has("nothing needs restoring");
}
