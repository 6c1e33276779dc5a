//! The `clockcarry` command against the reference VMM (`clockcarry-refvmm`,
//! integration/refvmm) on this machine's /dev/kvm: capture from a running
//! VM, pause, snapshot, restore it paused in a second VMM process, then
//! `clockcarry restore` and every error path, each checked for its message,
//! its exit code and that the VM was left untouched (vm.info's
//! `clockcarry.clock_put` still false, offsets, rate and state unchanged).
//!
//! Needs root (/dev/kvm) and the reference VMM binary: `$CLOCKCARRY_REFVMM`,
//! or target/<profile>/clockcarry-refvmm (built on demand). Otherwise each
//! test prints `SKIP: <reason>`.

mod cli_support;

use std::path::{Path, PathBuf};

use cli_support::{refvmm_binary, refvmm_skip_reason, run, RefVmm, TempDir};
use clockcarry::model::RunState;
use clockcarry::sidecar::Sidecar;
use serde_json::Value;

/// `clockcarry capture` of VM `vm1` in `vmm` into `dir/vm1.sidecar.json`
/// (which it answers), exit 0.
fn capture_vm1(dir: &TempDir, vmm: &RefVmm) -> String {
    let sidecar = dir.join("vm1.sidecar.json").display().to_string();
    run(
        dir.path(),
        &[
            "capture",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "vm1",
            "-o",
            &sidecar,
        ],
    )
    .expect(0);
    sidecar
}

/// A VM captured while running in one VMM, snapshotted, and restored paused
/// (vm.restore with resume=false) in a second one.
struct Restored {
    dir: TempDir,
    vmm: RefVmm,
    sidecar: String,
}

fn skip() -> Option<String> {
    refvmm_skip_reason()
}

fn restored(tag: &str, capture_extra: &[&str]) -> Restored {
    restored_with(tag, capture_extra, &[])
}

/// [`restored`], the destination VMM started with `dst_args`.
fn restored_with(tag: &str, capture_extra: &[&str], dst_args: &[&str]) -> Restored {
    let bin: PathBuf = refvmm_binary().expect("refvmm binary");
    let dir = TempDir::new(tag);
    let src = RefVmm::spawn(
        &bin,
        dir.path(),
        "src",
        &["--kernel", "probe", "--cpus", "2"],
    )
    .expect("start source VMM");
    // Let the probe guest enable kvm-clock (its PVTI is then filled).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let sidecar = dir.join("vm1.sidecar.json").display().to_string();
    let mut args = vec![
        "capture",
        "--api-socket",
        src.socket_str(),
        "--vm",
        "vm1",
        "-o",
        &sidecar,
    ];
    args.extend_from_slice(capture_extra);
    run(dir.path(), &args).expect(0);
    src.put_ok("/api/v1/vm.pause", None);
    let snap = dir.join("snap");
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    src.put_ok("/api/v1/vm.snapshot", Some(&body));
    drop(src);
    let vmm = RefVmm::spawn(&bin, dir.path(), "dst", dst_args).expect("start destination VMM");
    let body = format!(
        r#"{{"source_url":"file://{}","resume":false}}"#,
        snap.display()
    );
    vmm.put_ok("/api/v1/vm.restore", Some(&body));
    Restored { dir, vmm, sidecar }
}

impl Restored {
    fn restore(&self, extra: &[&str]) -> cli_support::Run {
        let mut args = vec![
            "restore",
            "--api-socket",
            self.vmm.socket_str(),
            "-i",
            &self.sidecar,
        ];
        args.extend_from_slice(extra);
        run(self.dir.path(), &args)
    }

    /// What "untouched" compares: offsets, rate, state, and whether a clock
    /// PUT was ever applied.
    fn fingerprint(&self) -> (Vec<i64>, u32, RunState, Value) {
        let c = self.vmm.clock();
        let info = self.vmm.info();
        (
            c.offsets(),
            c.tsc_khz,
            c.state,
            info["clockcarry"]["clock_put"].clone(),
        )
    }
}

#[test]
fn refvmm_capture_restore_verify_resume() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let r = restored("rv-ok", &[]);
    let sc = Sidecar::read_from(Path::new(&r.sidecar), None).expect("sidecar");
    assert_eq!(sc.body.vm.vcpu_count, 2);
    assert!(sc.body.vm_clock.pvti.is_some(), "no PVTI captured");
    assert_eq!(r.vmm.info()["clockcarry"]["clock_put"], false);

    let out = r.restore(&["--json", "--vm", "vm1"]);
    out.expect(0);
    let j = out.json();
    assert_eq!(j["outcome"], "applied");
    assert_eq!(j["summary"]["mode"], "same-host");
    let effective = j["verification"]["tsc_offsets_effective"] == true;
    if effective {
        assert_eq!(j["verification"]["offsets_match"], true);
    } else {
        println!("SKIP: offset verification (TSC offsets are inert on this host)");
        assert!(j["warnings"].to_string().contains("INERT"));
    }
    // kvm-clock follows the source line within the target, as the VMM
    // reports and as clockcarry verifies from the KVM_GET_CLOCK pair.
    let vmm_err = j["kvmclock"]["vmm_error_ns"].as_i64().expect("VMM error");
    let verified = j["kvmclock"]["verified_error_ns"]
        .as_i64()
        .expect("verified");
    // The window is [0, 50] above the line: never below it.
    assert!((0..=50).contains(&vmm_err), "VMM error {vmm_err} ns");
    assert!(
        (-1..=100).contains(&verified),
        "verified error {verified} ns"
    );
    assert_eq!(r.vmm.info()["clockcarry"]["clock_put"], true);

    // PUT is allowed again while still paused: a second restore works.
    r.restore(&[])
        .expect(0)
        .stdout_has("restored the clock of VM vm1");

    // The VM resumes and runs.
    r.vmm.put_ok("/api/v1/vm.resume", None);
    assert_eq!(r.vmm.clock().state, RunState::Running);

    // inspect and an offline plan of the same sidecar.
    run(r.dir.path(), &["inspect", &r.sidecar])
        .expect(0)
        .stdout_has("vm1, 2 vCPU(s)");
}

#[test]
fn refvmm_dry_run_and_offline_plan() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let r = restored("rv-dry", &[]);
    let before = r.fingerprint();
    let out = r.restore(&["--dry-run", "--json"]);
    out.expect(0);
    assert_eq!(r.fingerprint(), before);
    let dst = r.dir.join("dst.json");
    std::fs::write(&dst, out.stdout.as_bytes()).expect("write");
    let p = run(
        r.dir.path(),
        &[
            "plan",
            "-i",
            &r.sidecar,
            "--destination",
            dst.to_str().unwrap_or(""),
            "--json",
        ],
    );
    p.expect(0);
    assert_eq!(
        p.json()["plan"]["tsc_offsets"],
        out.json()["plan"]["tsc_offsets"]
    );
}

#[test]
fn refvmm_error_paths_leave_the_vm_untouched() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let key_a = b"clockcarry-cli-test-key-A-not-secret";
    let key_b = b"clockcarry-cli-test-key-B-not-secret";
    let r = restored("rv-err", &[]);
    let before = r.fingerprint();
    assert_eq!(before.3, false);

    // Corrupt sidecar.
    let good = std::fs::read_to_string(&r.sidecar).expect("read");
    let bad = r.dir.join("corrupt.json");
    std::fs::write(&bad, good.replacen("\"vm1\"", "\"vm2\"", 1)).expect("write");
    run(
        r.dir.path(),
        &[
            "restore",
            "--api-socket",
            r.vmm.socket_str(),
            "-i",
            bad.to_str().unwrap_or(""),
        ],
    )
    .expect(2)
    .stderr_has("integrity.sha256")
    .stderr_has("was not touched");
    assert_eq!(r.fingerprint(), before);

    // Another VM's sidecar.
    r.restore(&["--vm", "vm2"])
        .expect(2)
        .stderr_has("is for VM \"vm1\", not \"vm2\"");
    assert_eq!(r.fingerprint(), before);

    // Stale beyond --max-elapsed.
    std::thread::sleep(std::time::Duration::from_millis(5));
    r.restore(&["--max-elapsed", "1ms"])
        .expect(3)
        .stderr_has("--max-elapsed");
    assert_eq!(r.fingerprint(), before);

    // Key mismatch: an unsealed sidecar with a key, and one sealed with A
    // restored with B.
    let ka = r.dir.join("a.key");
    let kb = r.dir.join("b.key");
    std::fs::write(&ka, key_a).expect("key");
    std::fs::write(&kb, key_b).expect("key");
    for k in [&ka, &kb] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    r.restore(&["--key", kb.to_str().unwrap_or("")])
        .expect(2)
        .stderr_has("unauthenticated");
    let mut sc = Sidecar::read_from(Path::new(&r.sidecar), None).expect("read");
    sc.body.created_by = "clockcarry test".into();
    let key = clockcarry::sidecar::SidecarKey::from_bytes(key_a).expect("key");
    let sealed = r.dir.join("sealed.json");
    Sidecar::seal(sc.body, Some(&key))
        .expect("seal")
        .write_to(&sealed)
        .expect("write");
    run(
        r.dir.path(),
        &[
            "restore",
            "--api-socket",
            r.vmm.socket_str(),
            "-i",
            sealed.to_str().unwrap_or(""),
            "--key",
            kb.to_str().unwrap_or(""),
        ],
    )
    .expect(2)
    .stderr_has("integrity.key_id");
    assert_eq!(r.fingerprint(), before);

    // The VMM refusing the PUT: resume and pause again, so the vCPUs have
    // run since the restore. GET says Paused; the PUT is refused.
    r.vmm.put_ok("/api/v1/vm.resume", None);
    std::thread::sleep(std::time::Duration::from_millis(20));
    r.vmm.put_ok("/api/v1/vm.pause", None);
    let paused = r.fingerprint();
    let out = r.restore(&["--json"]);
    out.expect(4)
        .stderr_has("the VMM refused the clock")
        .stderr_has("HTTP 500")
        .stderr_has("vCPUs have run");
    assert_eq!(out.json()["vm_untouched"], true);
    assert_eq!(r.fingerprint(), paused);

    // VM running: refused before any PUT.
    r.vmm.put_ok("/api/v1/vm.resume", None);
    let running = r.fingerprint();
    r.restore(&[]).expect(3).stderr_has("the VM is Running");
    assert_eq!(r.fingerprint(), running);

    // Socket gone.
    let Restored {
        dir,
        mut vmm,
        sidecar,
    } = r;
    vmm.kill();
    run(
        dir.path(),
        &["restore", "--api-socket", vmm.socket_str(), "-i", &sidecar],
    )
    .expect(4)
    .stderr_has("does not exist");
}

#[test]
fn refvmm_bench_restore() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let r = restored("rv-bench", &[]);
    let out = run(
        r.dir.path(),
        &[
            "bench-restore",
            "--api-socket",
            r.vmm.socket_str(),
            "-i",
            &r.sidecar,
            "--runs",
            "10",
            "--json",
        ],
    );
    out.expect(0);
    let j = out.json();
    let median = j["blackout_ns"]["median"].as_u64().unwrap_or(0);
    println!(
        "restore blackout against the reference VMM (test profile): median {} µs, p99 {} µs",
        median / 1000,
        j["blackout_ns"]["p99"].as_u64().unwrap_or(0) / 1000
    );
    assert!(median > 0);
}

/// Issue 11, defect 1: VM a restored paused from its snapshot must refuse
/// the sidecar of VM b (same vCPU count, booted later, no `--vm`): b's
/// kvm-clock line is not the one in a's memory. Before the check, the
/// restore exited 0 and a's kvm-clock went back by the difference of the
/// two VMs' ages.
#[test]
fn refvmm_refuses_another_vms_sidecar() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let bin: PathBuf = refvmm_binary().expect("refvmm binary");
    let r = restored("rv-other", &[]);
    let b = RefVmm::spawn(
        &bin,
        r.dir.path(),
        "b",
        &["--kernel", "probe", "--cpus", "2"],
    )
    .expect("start VM b");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let other = r.dir.join("b.sidecar.json").display().to_string();
    run(
        r.dir.path(),
        &[
            "capture",
            "--api-socket",
            b.socket_str(),
            "--vm",
            "b",
            "-o",
            &other,
        ],
    )
    .expect(0);
    let before = r.fingerprint();
    let out = run(
        r.dir.path(),
        &[
            "restore",
            "--api-socket",
            r.vmm.socket_str(),
            "-i",
            &other,
            "--json",
        ],
    );
    out.expect(2).stderr_has("contradicts this sidecar");
    assert_eq!(out.json()["outcome"], "refused");
    assert_eq!(r.fingerprint(), before, "the VM was touched");
    // Its own sidecar still restores.
    r.restore(&[]).expect(0);
}

/// The reference VMM's typed failures read by the command: a failed offset
/// write the VMM rolled back is exit 5, one whose rollback failed is exit 6
/// (`--fault-put`, the reference VMM's test knob).
#[test]
fn refvmm_typed_failures_pick_the_exit_code() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    for (tag, spec, code, outcome) in [
        ("rv-rb", "offset:1", 5, "rolled_back"),
        ("rv-inc", "offset:1:rollback", 6, "rollback_incomplete"),
    ] {
        let r = restored_with(tag, &[], &["--fault-put", spec]);
        let out = r.restore(&["--json"]);
        out.expect(code);
        assert_eq!(out.json()["vmm_failure"]["outcome"], outcome, "{spec}");
    }
}

/// `clockcarry arm` before the pause, its vm.restore body sent as written:
/// the VMM applies the clock before the first vCPU run and resumes (200,
/// typed reply); the same body offered to other VMs' states is refused
/// (400, naming the field: `tsc_offsets` for a 3-vCPU VM, and where TSC
/// offsets take effect `arm.capture_guest_tsc` for a 2-vCPU VM whose TSC
/// booted an hour ahead) and those VMs stay paused. Refusals of the command
/// itself write nothing.
#[test]
fn refvmm_arm_then_restore_with_the_armed_body() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let bin: PathBuf = refvmm_binary().expect("refvmm binary");
    let dir = TempDir::new("rv-arm");
    let boot = |name: &str, extra: &[&str]| {
        let mut args = vec!["--kernel", "probe"];
        args.extend_from_slice(extra);
        RefVmm::spawn(&bin, dir.path(), name, &args).expect("start VMM")
    };
    let src = boot("src", &["--cpus", "2"]);
    let others = [
        (boot("three", &["--cpus", "3"]), "tsc_offsets"),
        (
            boot("ahead", &["--cpus", "2", "--boot-tsc-s", "3600"]),
            "arm.capture_guest_tsc",
        ),
    ];
    let effective = src.clock().capabilities.tsc_offset_effective;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let sidecar = capture_vm1(&dir, &src);
    let snap = dir.join("snap");
    let url = format!("file://{}", snap.display());
    let armed = dir.join("restore.json").display().to_string();

    arm_refusals_write_nothing(&dir, &sidecar, &armed);

    let r = run(
        dir.path(),
        &[
            "arm",
            "-i",
            &sidecar,
            "--vm",
            "vm1",
            "--for-restore",
            &url,
            "-o",
            &armed,
            "--json",
        ],
    );
    r.expect(0);
    let rep = r.json();
    assert_eq!(
        (&rep["mode"], &rep["wrote"], &rep["vcpus"]),
        (&"same-host".into(), &"vm.restore".into(), &2.into())
    );
    let body = std::fs::read_to_string(&armed).unwrap();
    let request: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(request["source_url"], url.as_str());
    assert_eq!(request["resume"], true);
    assert_eq!(request["clock"], rep["clock"]);
    assert_eq!(request["clock"]["arm"]["vcpu_count"], 2);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&armed).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Other VMs' states under this VM's armed clock: refused, paused.
    for (other, field) in others {
        if field == "arm.capture_guest_tsc" && !effective {
            println!(
                "SKIP ({field}): TSC offsets are inert on this host, every VM's TSC is the \
                 host's, so a VM booted an hour ahead is not"
            );
            continue;
        }
        refused_for_another_state(&bin, &dir, other, field, &body, &url);
    }

    applied_and_resumed(&bin, &dir, src, &body, &url);
}

/// `clockcarry arm`'s own refusals (freeze, another VM's id, a validity
/// over 1 h): exit 2 naming the cause, and no file written.
fn arm_refusals_write_nothing(dir: &TempDir, sidecar: &str, armed: &str) {
    let r = run(
        dir.path(),
        &["arm", "-i", sidecar, "--policy", "freeze", "-o", armed],
    );
    r.expect(2).stderr_has("freeze");
    let r = run(
        dir.path(),
        &["arm", "-i", sidecar, "--vm", "vm2", "-o", armed],
    );
    r.expect(2).stderr_has("vm2");
    let r = run(
        dir.path(),
        &["arm", "-i", sidecar, "--valid-for", "2h", "-o", armed],
    );
    r.expect(2).stderr_has("valid_for_ns");
    assert!(!Path::new(armed).exists(), "a refused arm wrote its file");
}

/// `other` (a running VM) snapshotted and restored with `body`, armed for
/// another VM: 400 naming `field`, the VM restored, paused, untouched.
fn refused_for_another_state(
    bin: &Path,
    dir: &TempDir,
    other: RefVmm,
    field: &str,
    body: &str,
    url: &str,
) {
    let name = field.replace('.', "-");
    other.put_ok("/api/v1/vm.pause", None);
    let other_snap = dir.join(&format!("snap-{name}"));
    other.put_ok(
        "/api/v1/vm.snapshot",
        Some(&format!(
            r#"{{"destination_url":"file://{}"}}"#,
            other_snap.display()
        )),
    );
    drop(other);
    let wrong = RefVmm::spawn(bin, dir.path(), &format!("wrong-{name}"), &[]).expect("VMM");
    let wrong_body = body.replace(
        &format!("\"{url}\""),
        &format!("\"file://{}\"", other_snap.display()),
    );
    let (status, answer) = wrong.api("PUT", "/api/v1/vm.restore", Some(&wrong_body));
    assert_eq!(status, 400, "{field}: {answer}");
    assert!(answer.contains(field), "{field}: {answer}");
    assert_eq!(wrong.clock().state, RunState::Paused);
    assert_eq!(wrong.info()["clockcarry"]["clock_put"], false);
}

/// This VM's state restored with its armed `body`: 200, the typed reply,
/// running, and (where offsets take effect) the body's offsets in place.
fn applied_and_resumed(bin: &Path, dir: &TempDir, src: RefVmm, body: &str, url: &str) {
    let request: Value = serde_json::from_str(body).unwrap();
    // This VM: applied before the first run, resumed, the offsets the body's.
    src.put_ok("/api/v1/vm.pause", None);
    src.put_ok(
        "/api/v1/vm.snapshot",
        Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
    );
    drop(src);
    let dst = RefVmm::spawn(bin, dir.path(), "dst", &[]).expect("VMM");
    let (status, answer) = dst.api("PUT", "/api/v1/vm.restore", Some(body));
    assert_eq!(status, 200, "{answer}");
    let reply: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(reply["outcome"], "applied", "{reply}");
    let after = dst.clock();
    assert_eq!(after.state, RunState::Running);
    if after.capabilities.tsc_offset_effective {
        let want: Vec<i64> = request["clock"]["tsc_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(after.offsets(), want);
    } else {
        println!("SKIP (offsets only): TSC offsets are inert on this host");
    }
}

/// `clockcarry arm --api-socket` sends the vm.restore itself: 200, the
/// report's `sent` with the VMM's typed answer, the VM running without a
/// file written; a body gone stale before the VMM sees it (`--valid-for
/// 1ns`) is refused by the VMM, exit 3 naming the field, and that VM is
/// left restored and paused.
#[test]
fn refvmm_arm_sends_the_request_itself() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let bin: PathBuf = refvmm_binary().expect("refvmm binary");
    let dir = TempDir::new("rv-arm-send");
    let src = RefVmm::spawn(
        &bin,
        dir.path(),
        "src",
        &["--kernel", "probe", "--cpus", "2"],
    )
    .expect("start VMM");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let sidecar = capture_vm1(&dir, &src);
    let snap = dir.join("snap");
    let url = format!("file://{}", snap.display());
    src.put_ok("/api/v1/vm.pause", None);
    src.put_ok(
        "/api/v1/vm.snapshot",
        Some(&format!(r#"{{"destination_url":"{url}"}}"#)),
    );
    drop(src);
    let arm = |vmm: &RefVmm, extra: &[&str]| {
        let mut args = vec![
            "arm",
            "-i",
            &sidecar,
            "--vm",
            "vm1",
            "--for-restore",
            &url,
            "--api-socket",
            vmm.socket_str(),
            "--json",
        ];
        args.extend_from_slice(extra);
        run(dir.path(), &args)
    };

    let stale = RefVmm::spawn(&bin, dir.path(), "stale", &[]).expect("VMM");
    arm(&stale, &["--valid-for", "1ns"])
        .expect(3)
        .stderr_has("arm.planned_tai_ns")
        .stderr_has("restored and paused");
    assert_eq!(stale.clock().state, RunState::Paused);
    assert_eq!(stale.info()["clockcarry"]["clock_put"], false);
    drop(stale);

    let dst = RefVmm::spawn(&bin, dir.path(), "dst", &[]).expect("VMM");
    let r = arm(&dst, &[]);
    r.expect(0);
    let rep = r.json();
    assert_eq!(rep["sent"]["status"], 200, "{rep}");
    assert_eq!(rep["sent"]["endpoint"], "/api/v1/vm.restore");
    assert_eq!(rep["sent"]["answer"]["outcome"], "applied", "{rep}");
    assert_eq!(rep["out"], Value::Null);
    assert_eq!(dst.clock().state, RunState::Running);
    assert!(dst.info()["clockcarry"]["armed_clock_ns"].as_u64() > Some(0));
}

/// An in-place pause (capture, pause, restore without any snapshot): the
/// VMM refuses the PUT (its vCPUs have run), restore exits 4 and says the
/// VM needs no restore, not "fix the cause" (before: the generic advice).
#[test]
fn refvmm_restore_after_an_in_place_pause_says_none_is_needed() {
    if let Some(why) = skip() {
        println!("SKIP: {why}");
        return;
    }
    let bin: PathBuf = refvmm_binary().expect("refvmm binary");
    let dir = TempDir::new("rv-inplace");
    let vmm = RefVmm::spawn(
        &bin,
        dir.path(),
        "vm",
        &["--kernel", "probe", "--cpus", "2", "--clock-extension"],
    )
    .expect("VMM");
    let sidecar = capture_vm1(&dir, &vmm);
    vmm.put_ok("/api/v1/vm.pause", None);
    let r = run(
        dir.path(),
        &["restore", "--api-socket", vmm.socket_str(), "-i", &sidecar],
    );
    r.expect(4)
        .stderr_has("\n  next: VM vm1 was not touched")
        .stderr_has("paused in place")
        .stderr_has("nothing needs restoring: resume it");
    assert!(!r.stderr.contains("Fix the cause"), "{}", r.stderr);
    assert_eq!(vmm.info()["clockcarry"]["clock_put"], false);
}
