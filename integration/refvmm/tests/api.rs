//! API conformance of the reference VMM: every endpoint, every wrong state,
//! Cloud Hypervisor's status codes and error form (a JSON array of strings).
//! Needs /dev/kvm (prints "SKIP: <reason>" without it).

mod common;

use std::time::Duration;

use clockcarry::vmclock_api::{parse_put_failure, PutOutcome};
use common::*;

const NOT_RUNNING: &str = "VM is not running";

#[test]
fn routing_and_methods() {
    require_kvm!();
    let dir = tempdir("routing");
    let vmm = start(&dir, "empty", &[]);
    // Unknown paths.
    for path in ["vm.nope", "vmm.nope"] {
        let (s, b) = call(&vmm, "GET", path, None);
        assert_eq!((s, messages(&b)), (404, vec!["Not Found".to_string()]));
    }
    let r = clockcarry_refvmm::http::request(
        &vmm.socket,
        "GET",
        "/other/vmm.ping",
        None,
        Duration::from_secs(5),
    )
    .expect("transport");
    assert_eq!(r.status, 404);
    // Methods other than GET/PUT: 400, no body.
    for m in ["POST", "DELETE", "PATCH"] {
        let (s, b) = call(&vmm, m, "vm.pause", None);
        assert_eq!((s, b.as_str()), (400, ""), "{m}");
    }
    // vmm.ping.
    let (s, b) = call(&vmm, "GET", "vmm.ping", None);
    assert_eq!(s, 200);
    let ping: serde_json::Value = serde_json::from_str(&b).expect("json");
    assert!(ping["version"].is_string() && ping["pid"].is_u64());
    // GET on PUT actions and PUT on GET endpoints: 400 ["Bad Request"].
    for ep in [
        "vm.pause",
        "vm.resume",
        "vm.snapshot",
        "vm.restore",
        "vm.send-migration",
        "vm.receive-migration",
        "vmm.shutdown",
    ] {
        let (s, b) = call(&vmm, "GET", ep, None);
        assert_eq!(
            (s, messages(&b)),
            (400, vec!["Bad Request".to_string()]),
            "GET {ep}"
        );
    }
    for ep in ["vmm.ping", "vm.info"] {
        let (s, b) = call(&vmm, "PUT", ep, None);
        assert_eq!(
            (s, messages(&b)),
            (400, vec!["Bad Request".to_string()]),
            "PUT {ep}"
        );
    }
    vmm.shutdown();
}

#[test]
fn without_a_vm() {
    require_kvm!();
    let dir = tempdir("novm");
    let vmm = start(&dir, "empty", &[]);
    expect_error(&vmm, "GET", "vm.info", None, 404, "VM is not created");
    expect_error(&vmm, "GET", "vm.clock", None, 404, "VM is not created");
    let body = r#"{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":null}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.clock",
        Some(body),
        404,
        "VM is not created",
    );
    expect_error(&vmm, "PUT", "vm.pause", None, 500, NOT_RUNNING);
    expect_error(&vmm, "PUT", "vm.resume", None, 500, NOT_RUNNING);
    let snap = r#"{"destination_url":"file:///tmp/refvmm-never"}"#;
    expect_error(&vmm, "PUT", "vm.snapshot", Some(snap), 500, NOT_RUNNING);
    let send = r#"{"destination_url":"unix:/tmp/refvmm-never.sock"}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.send-migration",
        Some(send),
        500,
        NOT_RUNNING,
    );
    // Bodies that cannot be used.
    expect_error(
        &vmm,
        "PUT",
        "vm.restore",
        Some("{nope"),
        400,
        "Failed to deserialize JSON",
    );
    expect_error(&vmm, "PUT", "vm.restore", None, 400, "Bad Request");
    let missing = r#"{"source_url":"file:///nonexistent/dir"}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.restore",
        Some(missing),
        500,
        "could not be restored",
    );
    let relative = r#"{"source_url":"file://relative"}"#;
    expect_error(&vmm, "PUT", "vm.restore", Some(relative), 500, "file:///");
    // An address this host does not have cannot be bound.
    let remote = r#"{"receiver_url":"tcp:192.0.2.1:6000"}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.receive-migration",
        Some(remote),
        500,
        "binding the receiver socket",
    );
    let multicast = r#"{"receiver_url":"tcp:224.0.0.1:6000"}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.receive-migration",
        Some(multicast),
        500,
        "multicast",
    );
    vmm.shutdown();
}

#[test]
fn running_vm_refuses_what_needs_a_pause() {
    require_kvm!();
    let dir = tempdir("running");
    let vmm = boot(&dir, "src", &[]);
    assert_eq!(state(&vmm), "Running");
    let c = clock(&vmm);
    assert_eq!(c.state, clockcarry::RunState::Running);
    assert_eq!(c.vcpus.len(), 2);
    expect_error(&vmm, "PUT", "vm.resume", None, 500, "Running to Running");
    let snap = format!(
        r#"{{"destination_url":"file://{}"}}"#,
        dir.join("s").display()
    );
    expect_error(
        &vmm,
        "PUT",
        "vm.snapshot",
        Some(&snap),
        500,
        "while VM is running",
    );
    let restore = r#"{"source_url":"file:///tmp/x"}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.restore",
        Some(restore),
        500,
        "already created",
    );
    let receive = r#"{"receiver_url":"unix:/tmp/refvmm-never.sock"}"#;
    expect_error(
        &vmm,
        "PUT",
        "vm.receive-migration",
        Some(receive),
        500,
        "already created",
    );
    // A body on a body-less action.
    expect_error(&vmm, "PUT", "vm.pause", Some("{}"), 400, "Bad Request");
    // PUT vm.clock while running: refused, VM untouched and still running.
    let before = reports(&vmm);
    expect_error(
        &vmm,
        "PUT",
        "vm.clock",
        Some(&follow_body(&c, 2)),
        500,
        "not paused",
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(state(&vmm), "Running");
    assert!(reports(&vmm) > before, "the guest keeps reporting");
    assert_eq!(info(&vmm)["clockcarry"]["clock_put"], false);
    // Pause twice, resume twice.
    assert_eq!(call(&vmm, "PUT", "vm.pause", None).0, 204);
    expect_error(&vmm, "PUT", "vm.pause", None, 500, "Paused to Paused");
    assert_eq!(clock(&vmm).state, clockcarry::RunState::Paused);
    // Paused in place: the vCPUs have run, so no PUT.
    expect_error(
        &vmm,
        "PUT",
        "vm.clock",
        Some(&follow_body(&c, 2)),
        500,
        "have run",
    );
    assert_eq!(call(&vmm, "PUT", "vm.resume", None).0, 204);
    assert_eq!(state(&vmm), "Running");
    vmm.shutdown();
}

#[test]
fn clock_put_rules_after_restore() {
    require_kvm!();
    let dir = tempdir("put");
    let src = boot(&dir, "src", &[]);
    let captured = clock(&src);
    let url = snapshot(&src, &dir);
    src.shutdown();
    let dst = start(&dir, "dst", &[]);
    let (s, b) = call(
        &dst,
        "PUT",
        "vm.restore",
        Some(&format!(r#"{{"source_url":"{url}"}}"#)),
    );
    assert_eq!(s, 204, "{b}");
    assert_eq!(state(&dst), "Paused");
    assert_eq!(info(&dst)["clockcarry"]["restore_pending"], true);
    let untouched = clock(&dst);

    // Refused, VM untouched: malformed JSON, unknown fields, wrong types,
    // the wrong number of offsets, a zero rate, bad flags.
    let bad = [
        ("{\"tsc_khz\":", 400, "Failed to deserialize JSON"),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0],"kvmclock":null,"x":1}"#,
            400,
            "Failed to deserialize JSON",
        ),
        (
            r#"{"tsc_khz":"fast","tsc_offsets":[0,0],"kvmclock":null}"#,
            400,
            "Failed to deserialize JSON",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":null}"#,
            400,
            "tsc_offsets has 1 entries",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0,0],"kvmclock":null}"#,
            400,
            "tsc_offsets has 3 entries",
        ),
        (
            r#"{"tsc_khz":0,"tsc_offsets":[0,0],"kvmclock":null}"#,
            400,
            "`tsc_khz` is 0",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0],"kvmclock":{"set_clock":{"clock":1,"realtime":0,"flags":2}}}"#,
            400,
            "flags",
        ),
    ];
    for (body, status, needle) in bad {
        expect_error(&dst, "PUT", "vm.clock", Some(body), status, needle);
        // The same refusal, typed: outcome `refused`, nothing rolled back.
        let (_, b) = call(&dst, "PUT", "vm.clock", Some(body));
        let typed = parse_put_failure(b.as_bytes()).unwrap_or_else(|| panic!("untyped: {b}"));
        assert_eq!(typed.outcome, PutOutcome::Refused, "{b}");
        assert!(typed.rollback.is_none(), "{b}");
    }
    expect_error(&dst, "PUT", "vm.clock", None, 400, "Bad Request");
    assert_eq!(info(&dst)["clockcarry"]["clock_put"], false);
    assert_eq!(clock(&dst).offsets(), untouched.offsets());
    assert_eq!(state(&dst), "Paused");

    // A good PUT: follow the captured line.
    let (s, b) = call(&dst, "PUT", "vm.clock", Some(&follow_body(&captured, 2)));
    assert_eq!(s, 200, "{b}");
    let answer: serde_json::Value = serde_json::from_str(&b).expect("json");
    assert_eq!(answer["outcome"], "applied");
    assert_eq!(answer["kvmclock_request"], "follow_pvti");
    let err = answer["kvmclock_error_ns"]
        .as_i64()
        .expect("error reported");
    assert!(err.unsigned_abs() <= 1000, "kvm-clock error {err} ns");
    assert_eq!(
        answer["tsc_offsets_applied"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(answer["refused"].is_array());
    assert_eq!(info(&dst)["clockcarry"]["clock_put"], true);
    // Still paused; a second PUT before resume is allowed (kvm-clock left alone).
    let keep = r#"{"tsc_khz":null,"tsc_offsets":[0,0],"kvmclock":null}"#;
    let (s, b) = call(&dst, "PUT", "vm.clock", Some(keep));
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(r#""kvmclock_method":"none""#), "{b}");
    assert_eq!(call(&dst, "PUT", "vm.resume", None).0, 204);
    expect_error(&dst, "PUT", "vm.clock", Some(keep), 500, "not paused");
    let (_, b) = call(&dst, "PUT", "vm.clock", Some(keep));
    let typed = parse_put_failure(b.as_bytes()).unwrap_or_else(|| panic!("untyped: {b}"));
    assert_eq!(typed.outcome, PutOutcome::WrongState, "{b}");
    assert_eq!(call(&dst, "PUT", "vm.pause", None).0, 204);
    expect_error(&dst, "PUT", "vm.clock", Some(keep), 500, "have run");
    let (_, b) = call(&dst, "PUT", "vm.clock", Some(keep));
    assert_eq!(
        parse_put_failure(b.as_bytes()).map(|f| f.outcome),
        Some(PutOutcome::WrongState),
        "{b}"
    );
    dst.shutdown();
}

#[test]
fn raw_set_clock_and_restore_with_resume() {
    require_kvm!();
    let dir = tempdir("raw");
    let src = boot(&dir, "src", &["--baseline", "qemu"]);
    let url = snapshot(&src, &dir);
    src.shutdown();
    let dst = start(&dir, "dst", &["--baseline", "qemu"]);
    let body = format!(r#"{{"source_url":"{url}","resume":false,"prefault":false}}"#);
    assert_eq!(call(&dst, "PUT", "vm.restore", Some(&body)).0, 204);
    let now = clock(&dst);
    let raw = serde_json::json!({
        "tsc_khz": now.tsc_khz,
        "tsc_offsets": now.offsets(),
        "kvmclock": {"set_clock": {"clock": now.kvmclock.clock_ns, "realtime": 0, "flags": 0}}
    })
    .to_string();
    let (s, b) = call(&dst, "PUT", "vm.clock", Some(&raw));
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(r#""kvmclock_method":"set_clock""#), "{b}");
    assert_eq!(call(&dst, "PUT", "vm.resume", None).0, 204);
    dst.shutdown();

    // restore with resume=true runs at once.
    let again = start(&dir, "again", &[]);
    let body = format!(r#"{{"source_url":"{url}","resume":true}}"#);
    assert_eq!(call(&again, "PUT", "vm.restore", Some(&body)).0, 204);
    assert_eq!(state(&again), "Running");
    again.shutdown();
}

fn migrate(
    dir: &std::path::Path,
    url: &str,
    local: bool,
    resume: Option<bool>,
) -> (VmmProcess, VmmProcess) {
    let mut src = boot(dir, "src", &[]);
    let dst = start(dir, "dst", &[]);
    let body = match resume {
        Some(r) => format!(r#"{{"receiver_url":"{url}","resume":{r}}}"#),
        None => format!(r#"{{"receiver_url":"{url}"}}"#),
    };
    let socket = dst.socket.clone();
    let receiver = std::thread::spawn(move || {
        clockcarry_refvmm::http::request(
            &socket,
            "PUT",
            "/api/v1/vm.receive-migration",
            Some(&body),
            Duration::from_secs(30),
        )
    });
    // Let the receiver bind, then send (retrying while it is not there yet).
    let send = format!(r#"{{"destination_url":"{url}","local":{local}}}"#);
    std::thread::sleep(Duration::from_millis(200));
    let (s, b) = call(&src, "PUT", "vm.send-migration", Some(&send));
    assert_eq!(s, 204, "{b}");
    let r = receiver.join().expect("thread").expect("transport");
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        src.wait_exit(Duration::from_secs(10)),
        "source exits after migrating"
    );
    (src, dst)
}

#[test]
fn local_migration_over_unix_socket() {
    require_kvm!();
    let dir = tempdir("local");
    let url = format!("unix:{}", dir.join("mig.sock").display());
    let (_src, dst) = migrate(&dir, &url, true, None);
    // The source was running: the destination resumes on Complete.
    assert_eq!(state(&dst), "Running");
    let before = reports(&dst);
    std::thread::sleep(Duration::from_millis(100));
    assert!(reports(&dst) > before, "the guest runs on the destination");
    dst.shutdown();
}

#[test]
fn tcp_migration_stays_paused_with_resume_false() {
    require_kvm!();
    let dir = tempdir("tcp");
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let url = format!("tcp:127.0.0.1:{port}");
    let (_src, dst) = migrate(&dir, &url, false, Some(false));
    assert_eq!(state(&dst), "Paused");
    assert_eq!(info(&dst)["clockcarry"]["restore_pending"], true);
    assert_eq!(call(&dst, "PUT", "vm.resume", None).0, 204);
    assert_eq!(state(&dst), "Running");
    dst.shutdown();
}

#[test]
fn send_migration_refusals_leave_the_vm_running() {
    require_kvm!();
    let dir = tempdir("sendbad");
    let vmm = boot(&dir, "src", &[]);
    for (body, needle) in [
        (r#"{"destination_url":"tcp:0.0.0.0:6000"}"#, "unspecified"),
        (r#"{"destination_url":"tcp:10.0.0.1:0"}"#, "port 0"),
        (r#"{"destination_url":"ftp://x"}"#, "expected unix:PATH"),
        (
            r#"{"destination_url":"tcp:127.0.0.1:1","local":true}"#,
            "unix: destination",
        ),
    ] {
        expect_error(&vmm, "PUT", "vm.send-migration", Some(body), 500, needle);
    }
    // Nobody listens: the worker fails and the VM runs again.
    let nobody = format!(
        r#"{{"destination_url":"unix:{}"}}"#,
        dir.join("nobody.sock").display()
    );
    assert_eq!(call(&vmm, "PUT", "vm.send-migration", Some(&nobody)).0, 204);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&vmm), "Running");
    vmm.shutdown();
}

/// The typed failure replies of `PUT vm.clock` on the reference VMM, with
/// the `--fault-put` knob: a failed offset write the library rolls back
/// (500 `rolled_back`, rollback complete, offsets as before) and one whose
/// rollback fails too (500 `rollback_incomplete`, rollback not complete).
#[test]
fn clock_put_failures_are_typed() {
    require_kvm!();
    let dir = tempdir("put-faults");
    let src = boot(&dir, "src", &[]);
    let url = snapshot(&src, &dir);
    src.shutdown();
    let body = r#"{"tsc_khz":null,"tsc_offsets":[123,123],"kvmclock":null}"#;
    for (name, spec, outcome, complete) in [
        ("rb", "offset:1", PutOutcome::RolledBack, true),
        (
            "inc",
            "offset:1:rollback",
            PutOutcome::RollbackIncomplete,
            false,
        ),
    ] {
        let dst = start(&dir, name, &["--fault-put", spec]);
        let (s, b) = call(
            &dst,
            "PUT",
            "vm.restore",
            Some(&format!(r#"{{"source_url":"{url}"}}"#)),
        );
        assert_eq!(s, 204, "{b}");
        let before = clock(&dst).offsets();
        let (s, b) = call(&dst, "PUT", "vm.clock", Some(body));
        assert_eq!(s, 500, "{spec}: {b}");
        let f = parse_put_failure(b.as_bytes()).unwrap_or_else(|| panic!("untyped: {b}"));
        assert_eq!(f.outcome, outcome, "{spec}: {b}");
        assert!(
            f.failed_step
                .as_deref()
                .is_some_and(|s| s.contains("vCPU 1")),
            "{spec}: {b}"
        );
        let rollback = f
            .rollback
            .unwrap_or_else(|| panic!("{spec}: no rollback: {b}"));
        assert_eq!(rollback.complete, complete, "{spec}: {b}");
        if complete {
            assert_eq!(clock(&dst).offsets(), before, "{spec}: offsets changed");
        }
        assert_eq!(info(&dst)["clockcarry"]["clock_put"], false, "{spec}");
        dst.shutdown();
    }
}

/// An armed body as `clockcarry arm` would build it for a VM that keeps
/// its source offsets on this same host (the guest TSC runs on as if never
/// paused): planned now, captured at `capture_guest_tsc`.
fn armed_body(offsets: &[i64], capture_guest_tsc: u64, vcpus: u32, valid_for_ns: u64) -> String {
    serde_json::json!({
        "tsc_khz": null,
        "tsc_offsets": offsets,
        "kvmclock": null,
        "arm": {
            "planned_host_tsc": clockcarry::host::read_host_tsc(),
            "planned_tai_ns": clockcarry::host::tai_now_ns().expect("CLOCK_TAI"),
            "valid_for_ns": valid_for_ns,
            "vcpu_count": vcpus,
            "capture_guest_tsc": capture_guest_tsc,
            "elapsed_at_plan_ns": 30_000_000_000u64,
            "error_bound_ns": 0,
        }
    })
    .to_string()
}

#[test]
fn armed_restore_applies_before_the_first_run_or_refuses_naming_the_field() {
    require_kvm!();
    let dir = tempdir("armed");
    let src = boot(&dir, "src", &[]);
    let before = clock(&src);
    let capture_guest_tsc = clockcarry::host::read_host_tsc()
        .wrapping_add(before.offsets()[0] as u64)
        .saturating_sub(1_000_000);
    let offsets = before.offsets();
    let url = snapshot(&src, &dir);
    src.shutdown();
    let restore = |clock: &str, resume: bool| {
        format!(r#"{{"source_url":"{url}","resume":{resume},"clock":{clock}}}"#)
    };

    // Refused (wrong vCPU count): 400, typed, the VM restored and paused,
    // still open to a (good) armed PUT vm.clock.
    let dst = start(&dir, "dst", &[]);
    let bad = armed_body(&offsets, capture_guest_tsc, 3, 60_000_000_000);
    let (s, b) = call(&dst, "PUT", "vm.restore", Some(&restore(&bad, true)));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("arm.vcpu_count"), "{b}");
    let typed = parse_put_failure(b.as_bytes()).unwrap_or_else(|| panic!("untyped: {b}"));
    assert_eq!(typed.outcome, PutOutcome::Refused, "{b}");
    assert_eq!(state(&dst), "Paused");
    assert_eq!(info(&dst)["clockcarry"]["restore_pending"], true);
    // The refused clock left the VM as a stock restore does: the
    // baseline's restore-time clock handling ran after the refusal.
    assert!(
        info(&dst)["clockcarry"]["restore_clock_ns"].as_u64() > Some(0),
        "{}",
        info(&dst)
    );
    let good = armed_body(&offsets, capture_guest_tsc, 2, 60_000_000_000);
    let (s, b) = call(&dst, "PUT", "vm.clock", Some(&good));
    assert_eq!(s, 200, "{b}");
    assert_eq!(call(&dst, "PUT", "vm.resume", None).0, 204);
    dst.shutdown();

    // Stale, a rate this VM was not restored at, and without its checks:
    // refused the same way.
    let other_rate = armed_body(&offsets, capture_guest_tsc, 2, 60_000_000_000)
        .replace(r#""tsc_khz":null"#, r#""tsc_khz":1234567"#);
    assert!(other_rate.contains("1234567"), "{other_rate}");
    for (clock, field) in [
        (
            armed_body(&offsets, capture_guest_tsc, 2, 1),
            "arm.planned_tai_ns",
        ),
        (other_rate, "tsc_khz 1234567"),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0],"kvmclock":null}"#.to_string(),
            "clock.arm",
        ),
    ] {
        let dst = start(&dir, "refused", &[]);
        std::thread::sleep(Duration::from_millis(5));
        let (s, b) = call(&dst, "PUT", "vm.restore", Some(&restore(&clock, true)));
        assert_eq!(s, 400, "{b}");
        assert!(b.contains(field), "{field}: {b}");
        assert_eq!(state(&dst), "Paused");
        assert_eq!(info(&dst)["clockcarry"]["clock_put"], false, "{field}");
        dst.shutdown();
    }

    // Applied and resumed in the one call: 200 with the typed reply, no
    // read-back inside the blackout, the VMM's pause/resume stamps.
    let dst = start(&dir, "armed", &[]);
    let good = armed_body(&offsets, capture_guest_tsc, 2, 60_000_000_000);
    let (s, b) = call(&dst, "PUT", "vm.restore", Some(&restore(&good, true)));
    assert_eq!(s, 200, "{b}");
    let reply: serde_json::Value = serde_json::from_str(&b).expect("reply JSON");
    assert_eq!(reply["outcome"], "applied", "{b}");
    assert_eq!(reply["tsc_offsets_applied"], serde_json::json!(offsets));
    assert_eq!(reply["tsc_offsets_read_back"], serde_json::json!([]), "{b}");
    assert_eq!(state(&dst), "Running");
    assert!(info(&dst)["clockcarry"]["resumed_tai_ns"]
        .as_u64()
        .is_some());
    // The armed clock replaced the baseline's restore-time handling.
    assert_eq!(info(&dst)["clockcarry"]["restore_clock_ns"], 0);
    assert!(info(&dst)["clockcarry"]["armed_clock_ns"].as_u64() > Some(0));
    dst.shutdown();
}
