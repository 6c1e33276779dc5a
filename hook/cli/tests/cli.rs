//! The `clockcarry` command against a fake VMM that speaks the vm.clock API
//! (tests/cli_support): every subcommand, every documented exit status, and
//! every restore error path, each checked for its message, its exit code
//! and that the VM was left untouched (no PUT reached the VMM, offsets
//! unchanged on a GET). The same paths against the reference VMM are in
//! tests/cli_refvmm.rs.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cli_support::{run, sample_vm, FakeVmm, PutBehavior, TempDir};
use clockcarry::model::RunState;
use clockcarry::sidecar::{Sidecar, SidecarKey};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::geteuid;
use serde_json::Value;

const KEY_A: &[u8] = b"clockcarry-cli-test-key-A-not-secret";
const KEY_B: &[u8] = b"clockcarry-cli-test-key-B-not-secret";

/// A temp dir, a fake VMM with a running 2-vCPU VM, and a sidecar captured
/// from it (then the VM is paused, as after a restore with resume=false).
struct Setup {
    dir: TempDir,
    vmm: FakeVmm,
    sidecar: String,
}

fn setup(tag: &str) -> Setup {
    setup_with(tag, 2, &[])
}

fn setup_with(tag: &str, vcpus: u32, extra: &[&str]) -> Setup {
    let dir = TempDir::new(tag);
    let vmm = FakeVmm::start(dir.path(), sample_vm(vcpus, RunState::Running));
    let sidecar = dir.join("vm1.json").display().to_string();
    let mut args = vec![
        "capture",
        "--api-socket",
        vmm.socket_str(),
        "--vm",
        "vm1",
        "-o",
        &sidecar,
    ];
    args.extend_from_slice(extra);
    run(dir.path(), &args).expect(0);
    vmm.with(|s| s.vm.state = RunState::Paused);
    Setup { dir, vmm, sidecar }
}

fn restore(s: &Setup, extra: &[&str]) -> cli_support::Run {
    let mut args = vec![
        "restore",
        "--api-socket",
        s.vmm.socket_str(),
        "-i",
        &s.sidecar,
    ];
    args.extend_from_slice(extra);
    run(s.dir.path(), &args)
}

/// The VM was not touched: no PUT reached the VMM and a GET still shows
/// the offsets it had.
#[track_caller]
fn untouched(s: &Setup, offsets_before: &[i64]) {
    assert_eq!(s.vmm.puts(), 0, "a PUT reached the VMM");
    assert_eq!(s.vmm.offsets(), offsets_before, "offsets changed");
}

fn write_key(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("key");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p.display().to_string()
}

// ------------------------------------------------------------------ help

#[test]
fn help_reads_like_a_man_page_for_every_subcommand() {
    let dir = TempDir::new("help");
    for sub in [
        "capture",
        "restore",
        "plan",
        "inspect",
        "check",
        "bench-restore",
        "serve",
    ] {
        let r = run(dir.path(), &[sub, "--help"]);
        r.expect(0);
        for section in ["DESCRIPTION", "EXIT STATUS", "EXAMPLES", "Usage:"] {
            r.stdout_has(section);
        }
        r.stdout_has("3  refused by policy");
    }
    run(dir.path(), &["--help"])
        .expect(0)
        .stdout_has("EXIT STATUS");
    run(dir.path(), &["--version"])
        .expect(0)
        .stdout_has("clockcarry");
}

#[test]
fn bad_arguments_exit_2() {
    let dir = TempDir::new("args");
    run(dir.path(), &[]).expect(2);
    run(dir.path(), &["frobnicate"]).expect(2);
    run(dir.path(), &["restore", "--api-socket", "/x"]).expect(2);
    for bad in ["5", "1.5s", "-1s", "10 m", "99999999999999999999h"] {
        let arg = format!("--max-elapsed={bad}");
        run(
            dir.path(),
            &["restore", "--api-socket", "/x", "-i", "/y", &arg],
        )
        .expect(2)
        .stderr_has("--max-elapsed");
    }
    run(
        dir.path(),
        &[
            "restore",
            "--api-socket",
            "/x",
            "-i",
            "/y",
            "--policy",
            "sometimes",
        ],
    )
    .expect(2);
}

// --------------------------------------------------------------- capture

#[test]
fn capture_writes_a_valid_private_sidecar() {
    let s = setup("capture");
    let meta = std::fs::metadata(&s.sidecar).expect("sidecar written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let sc = Sidecar::read_from(Path::new(&s.sidecar), None).expect("valid sidecar");
    assert_eq!(sc.body.vm.id, "vm1");
    assert_eq!(sc.body.vm.vcpu_count, 2);
    assert_eq!(sc.body.vm_clock.offsets(), s.vmm.offsets());
    assert_eq!(sc.body.vm_clock.state, RunState::Running);
    assert!(sc.body.capture.tai_ns > 0);
    assert!(sc.integrity.hmac_sha256.is_none());

    // JSON summary, and a sealed capture.
    let key = write_key(&s.dir, "a.key", KEY_A);
    let out = s.dir.join("sealed.json").display().to_string();
    let r = run(
        s.dir.path(),
        &[
            "capture",
            "--api-socket",
            s.vmm.socket_str(),
            "--vm",
            "vm1",
            "-o",
            &out,
            "--key",
            &key,
            "--json",
        ],
    );
    r.expect(0);
    let j = r.json();
    assert_eq!(j["vm_id"], "vm1");
    assert_eq!(j["vcpu_count"], 2);
    assert!(j["key_id"].is_string());
    let k = SidecarKey::from_bytes(KEY_A).expect("key");
    Sidecar::read_from(Path::new(&out), Some(&k)).expect("sealed with key A");
}

#[test]
fn capture_default_path_and_vm_id_checks() {
    let dir = TempDir::new("capture-path");
    let vmm = FakeVmm::start(dir.path(), sample_vm(1, RunState::Running));
    run(
        dir.path(),
        &["capture", "--api-socket", vmm.socket_str(), "--vm", "web-1"],
    )
    .expect(0)
    .stdout_has("web-1.sidecar.json");
    let path = dir.join("state").join("web-1.sidecar.json");
    assert!(path.is_file());
    // Ids that cannot name a file are refused before anything is read.
    for bad in ["../etc/passwd", "a/b", "..", ".hidden", "a b", ""] {
        run(
            dir.path(),
            &["capture", "--api-socket", vmm.socket_str(), "--vm", bad],
        )
        .expect(2);
    }
    assert_eq!(
        vmm.with(|s| s.gets),
        1,
        "refused ids must not reach the VMM"
    );
    // With -o any sane id is fine.
    let out = dir.join("x.json").display().to_string();
    run(
        dir.path(),
        &[
            "capture",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "a b/c",
            "-o",
            &out,
        ],
    )
    .expect(0);
}

/// lstat: (file type bits, inode, device number) of what is at `p`.
fn lstat_id(p: &Path) -> (u32, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).expect("lstat");
    (m.mode() & libc::S_IFMT, m.ino(), m.rdev())
}

#[test]
fn capture_never_replaces_what_is_not_a_regular_file() {
    let dir = TempDir::new("not-regular");
    let vmm = FakeVmm::start(dir.path(), sample_vm(1, RunState::Running));
    let precious = dir.join("precious.json");
    std::fs::write(&precious, b"precious").expect("write");
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let subdir = dir.join("subdir");
    std::fs::create_dir(&subdir).expect("mkdir");
    let link = dir.join("link.json");
    std::os::unix::fs::symlink(&precious, &link).expect("symlink");
    let dangling = dir.join("dangling.json");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).expect("symlink");
    let mut cases = vec![
        (fifo, "a FIFO"),
        (subdir, "a directory"),
        (link, "a symbolic link"),
        (dangling, "a symbolic link"),
    ];
    if geteuid().is_root() {
        // What `mknod /tmp/n c 1 3` makes: the machine's /dev/null.
        let dev = dir.join("null-device");
        mknod(
            &dev,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .expect("mknod");
        cases.push((dev, "a character device"));
    } else {
        println!("SKIP (device case): not root");
    }
    for (path, kind) in &cases {
        let before = lstat_id(path);
        let out = path.display().to_string();
        run(
            dir.path(),
            &[
                "capture",
                "--api-socket",
                vmm.socket_str(),
                "--vm",
                "v",
                "-o",
                &out,
            ],
        )
        .expect(2)
        .stderr_has(&out)
        .stderr_has(kind);
        assert_eq!(lstat_id(path), before, "{out} was replaced");
    }
    assert_eq!(vmm.with(|s| s.gets), 0, "refused before the VMM is asked");
    assert_eq!(std::fs::read(&precious).expect("read"), b"precious");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
}

#[test]
fn capture_to_stdout_with_dash() {
    let dir = TempDir::new("stdout");
    let vmm = FakeVmm::start(dir.path(), sample_vm(2, RunState::Running));
    let key = write_key(&dir, "a.key", KEY_A);
    let capture = |extra: &[&str]| {
        let mut c = cli_support::cmd(dir.path());
        // A file named "-" would land here, inside the sandbox.
        c.current_dir(dir.path()).args([
            "capture",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "vm1",
            "-o",
            "-",
        ]);
        c.args(extra);
        let out = c.output().expect("run clockcarry");
        (
            out.status.code(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = capture(&["--key", &key]);
    assert_eq!(code, Some(0), "{stderr}");
    let k = SidecarKey::from_bytes(KEY_A).expect("key");
    let sc = Sidecar::parse(&stdout, Some(&k)).expect("stdout is the sealed sidecar");
    assert_eq!(sc.body.vm.id, "vm1");
    assert!(stderr.contains("captured VM vm1"), "{stderr}");
    assert!(!dir.join("-").exists(), "a file named - was written");
    // The JSON summary would share stdout with the sidecar.
    let (code, stdout, stderr) = capture(&["--json"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.contains("-o -"), "{stderr}");
}

#[test]
fn capture_refuses_a_bad_vmm_answer_naming_the_field() {
    let dir = TempDir::new("capture-bad");
    let vmm = FakeVmm::start(dir.path(), sample_vm(1, RunState::Running));
    let out = dir.join("x.json").display().to_string();
    let args = [
        "capture",
        "--api-socket",
        vmm.socket_str(),
        "--vm",
        "v",
        "-o",
        &out,
    ];
    let good: Value = serde_json::to_value(sample_vm(1, RunState::Running)).expect("json");
    let cases: Vec<(Value, &str)> = vec![
        (Value::String("not an object".into()), "not a JSON object"),
        (
            {
                let mut v = good.clone();
                v["tsc_khz"] = 0.into();
                v
            },
            "tsc_khz",
        ),
        (
            {
                let mut v = good.clone();
                v["vcpus"] = Value::Array(vec![]);
                v
            },
            "vcpus",
        ),
        (
            {
                let mut v = good.clone();
                v["vcpus"][0]["tsc_offset"] = "12".into();
                v
            },
            "vcpus[0].tsc_offset",
        ),
        (
            {
                let mut v = good.clone();
                v["state"] = "Sleeping".into();
                v
            },
            "state",
        ),
        (
            {
                let mut v = good.clone();
                v.as_object_mut().map(|o| o.remove("capabilities"));
                v
            },
            "capabilities",
        ),
    ];
    for (body, field) in cases {
        vmm.with(|s| s.get_override = Some((200, body.to_string())));
        run(dir.path(), &args).expect(4).stderr_has(field);
        assert!(!Path::new(&out).exists());
    }
    vmm.with(|s| s.get_override = Some((200, "{garbage".into())));
    run(dir.path(), &args).expect(4).stderr_has("not JSON");
    vmm.with(|s| s.get_override = Some((500, r#"["Error from API","VM is not created"]"#.into())));
    run(dir.path(), &args)
        .expect(4)
        .stderr_has("HTTP 500")
        .stderr_has("Error from API: VM is not created");
}

#[test]
fn socket_errors_are_named() {
    let dir = TempDir::new("sockets");
    let out = dir.join("x.json").display().to_string();
    let missing = dir.join("nope.sock").display().to_string();
    run(
        dir.path(),
        &["capture", "--api-socket", &missing, "--vm", "v", "-o", &out],
    )
    .expect(4)
    .stderr_has("does not exist");
    // A regular file is not a socket.
    let file = dir.join("file").display().to_string();
    std::fs::write(&file, b"").expect("file");
    run(
        dir.path(),
        &["capture", "--api-socket", &file, "--vm", "v", "-o", &out],
    )
    .expect(4)
    .stderr_has("not a Unix socket");
    // A socket nobody listens on.
    let dead = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
    run(
        dir.path(),
        &[
            "capture",
            "--api-socket",
            dead.to_str().unwrap_or(""),
            "--vm",
            "v",
            "-o",
            &out,
        ],
    )
    .expect(4)
    .stderr_has("connection refused");
}

#[test]
fn permission_denied_is_named() {
    // Root passes any permission check: run the binary as nobody.
    let dir = TempDir::new("perm");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let vmm = FakeVmm::start(dir.path(), sample_vm(1, RunState::Running));
    std::fs::set_permissions(&vmm.socket, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let is_root = geteuid().is_root();
    let setpriv = Path::new("/usr/bin/setpriv");
    if !is_root || !setpriv.is_file() {
        if is_root {
            println!("SKIP: setpriv not installed");
            return;
        }
        let r = run(
            dir.path(),
            &[
                "capture",
                "--api-socket",
                vmm.socket_str(),
                "--vm",
                "v",
                "-o",
                &dir.join("x.json").display().to_string(),
            ],
        );
        r.expect(4).stderr_has("permission denied");
        return;
    }
    // The binary must be reachable by nobody.
    let reachable = std::process::Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            cli_support::BIN,
            "--version",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !reachable {
        println!("SKIP: the test binary is not executable by nobody");
        return;
    }
    // nobody's own run directory, so that the per-VM lock can be taken and
    // the socket's permission is what fails.
    let run_nobody = dir.join("run-nobody");
    std::fs::create_dir(&run_nobody).expect("mkdir run-nobody");
    std::os::unix::fs::chown(&run_nobody, Some(65534), Some(65534)).expect("chown run-nobody");
    let out = std::process::Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            cli_support::BIN,
            "--log-target",
            "stderr",
            "capture",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "v",
            "-o",
            "/nonexistent/x.json",
        ])
        .env("CLOCKCARRY_RUN_DIR", dir.join("run-nobody"))
        .env("CLOCKCARRY_CONFIG", {
            let conf = dir.join("clockcarry.conf");
            std::fs::write(&conf, b"").expect("empty host configuration");
            conf
        })
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert_eq!(vmm.with(|s| s.gets), 0);
}

// --------------------------------------------------------------- restore

#[test]
fn restore_same_host_copies_the_offsets_and_verifies() {
    let s = setup("restore-ok");
    let captured = s.vmm.offsets();
    // The restored VM's TSC stands where a stock VMM puts it: at its value
    // when the VM paused, here 1 s of cycles behind where it would be had
    // it kept running.
    let frozen = captured[0] - i64::from(cli_support::host_khz()) * 1000;
    s.vmm.with(|st| {
        for v in &mut st.vm.vcpus {
            v.tsc_offset = frozen;
        }
    });
    let r = restore(&s, &["--json", "--vm", "vm1"]);
    r.expect(0);
    let j = r.json();
    assert_eq!(j["outcome"], "applied");
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["summary"]["mode"], "same-host");
    assert_eq!(j["vm_untouched"], false);
    assert_eq!(j["verification"]["offsets_match"], true);
    assert_eq!(j["vcpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(j["vcpus"][0]["destination_offset"], frozen);
    assert!(j["timings"]["to_put_answered_ns"].as_u64().unwrap_or(0) > 0);
    assert!(j["kvmclock"]["verified_error_ns"].is_i64());
    // One PUT with the captured offsets and a follow_pvti line.
    assert_eq!(s.vmm.puts(), 1);
    let put = s.vmm.with(|st| st.put_bodies[0].clone());
    let sent: Vec<i64> = put["tsc_offsets"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    assert_eq!(sent, captured);
    assert!(put["kvmclock"]["follow_pvti"]["tsc_to_system_mul"].is_u64());
    assert_eq!(put["kvmclock"]["follow_pvti"]["max_error_ns"], 50);
    assert!(put["tsc_khz"].is_null());
    assert_eq!(s.vmm.offsets(), captured);

    // The human report says what happened.
    let r = restore(&s, &[]);
    r.expect(0)
        .stdout_has("restored the clock of VM vm1")
        .stdout_has("same-host")
        .stdout_has("vCPU 1")
        .stdout_has("error bound")
        .stdout_has("blackout added");
}

#[test]
fn restore_dry_run_sends_nothing_and_feeds_plan() {
    let s = setup("dry-run");
    let before = s.vmm.offsets();
    let r = restore(&s, &["--dry-run", "--json"]);
    r.expect(0);
    untouched(&s, &before);
    let j = r.json();
    assert_eq!(j["outcome"], "dry_run");
    assert!(j["plan"]["tsc_offsets"].is_array());
    // The report's destination replays offline.
    let dst = s.dir.join("dst.json");
    std::fs::write(&dst, r.stdout.as_bytes()).expect("write");
    let dst = dst.display().to_string();
    let p = run(
        s.dir.path(),
        &["plan", "-i", &s.sidecar, "--destination", &dst, "--json"],
    );
    p.expect(0);
    let pj = p.json();
    assert_eq!(pj["plan"]["tsc_offsets"], j["plan"]["tsc_offsets"]);
    assert_eq!(pj["summary"]["mode"], "same-host");
    run(
        s.dir.path(),
        &["plan", "-i", &s.sidecar, "--destination", &dst],
    )
    .expect(0)
    .stdout_has("offline plan for VM vm1");
    // A destination file that is not one.
    std::fs::write(s.dir.join("bad.json"), b"{\"identity\": 3}").expect("write");
    let bad = s.dir.join("bad.json").display().to_string();
    run(
        s.dir.path(),
        &["plan", "-i", &s.sidecar, "--destination", &bad],
    )
    .expect(2)
    .stderr_has("identity");
    untouched(&s, &before);
}

#[test]
fn restore_refuses_a_corrupt_sidecar() {
    let s = setup("corrupt");
    let before = s.vmm.offsets();
    let gets = s.vmm.with(|st| st.gets);
    let text = std::fs::read_to_string(&s.sidecar).expect("read");
    // One digit of an offset changed: the digest no longer matches.
    let first = before[0].to_string();
    let altered = text.replacen(&first, &(before[0] + 1).to_string(), 1);
    assert_ne!(altered, text);
    std::fs::write(&s.sidecar, altered).expect("write");
    restore(&s, &[])
        .expect(2)
        .stderr_has("integrity.sha256")
        .stderr_has("do not resume");
    // Truncated, and not JSON at all.
    std::fs::write(&s.sidecar, &text[..text.len() / 2]).expect("write");
    restore(&s, &[]).expect(2).stderr_has("truncated");
    std::fs::write(&s.sidecar, b"\x00\x01binary").expect("write");
    restore(&s, &[]).expect(2).stderr_has("not JSON");
    // Missing.
    std::fs::remove_file(&s.sidecar).expect("rm");
    restore(&s, &[]).expect(2).stderr_has("No such file");
    untouched(&s, &before);
    assert_eq!(
        s.vmm.with(|st| st.gets),
        gets,
        "bad sidecars are refused before any GET"
    );
}

#[test]
fn restore_refuses_another_vms_sidecar() {
    let s = setup("other-vm");
    let before = s.vmm.offsets();
    let r = restore(&s, &["--vm", "vm2", "--json"]);
    r.expect(2).stderr_has("is for VM \"vm1\", not \"vm2\"");
    let j = r.json();
    assert_eq!(j["outcome"], "refused");
    assert_eq!(j["vm_untouched"], true);
    untouched(&s, &before);
    // A sidecar of a VM with another vCPU count.
    let other = TempDir::new("other-vm-4");
    let vmm4 = FakeVmm::start(other.path(), sample_vm(4, RunState::Running));
    let sc4 = other.join("vm4.json").display().to_string();
    run(
        other.path(),
        &[
            "capture",
            "--api-socket",
            vmm4.socket_str(),
            "--vm",
            "vm4",
            "-o",
            &sc4,
        ],
    )
    .expect(0);
    run(
        s.dir.path(),
        &["restore", "--api-socket", s.vmm.socket_str(), "-i", &sc4],
    )
    .expect(2)
    .stderr_has("4 vCPUs, the VM has 2");
    untouched(&s, &before);
}

#[test]
fn restore_refuses_a_stale_sidecar() {
    let s = setup("stale");
    let before = s.vmm.offsets();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let r = restore(&s, &["--max-elapsed", "1ms"]);
    r.expect(3)
        .stderr_has("--max-elapsed")
        .stderr_has("old")
        // What to do next on a line of its own, never glued to a hint.
        .stderr_has("\n  next: VM vm1 was not touched");
    assert!(!r.stderr.contains("hint: next:"), "{}", r.stderr);
    untouched(&s, &before);
    restore(&s, &["--max-elapsed", "1h", "--dry-run"]).expect(0);
}

#[test]
fn restore_refuses_a_key_mismatch() {
    let s = setup_with("keys", 2, &[]);
    let before = s.vmm.offsets();
    let key_a = write_key(&s.dir, "a.key", KEY_A);
    let key_b = write_key(&s.dir, "b.key", KEY_B);
    // Unsealed sidecar, key configured: refused.
    restore(&s, &["--key", &key_a])
        .expect(2)
        .stderr_has("unauthenticated");
    // Sealed with A, restored with B: refused.
    let sealed = s.dir.join("sealed.json").display().to_string();
    s.vmm.with(|st| st.vm.state = RunState::Running);
    run(
        s.dir.path(),
        &[
            "capture",
            "--api-socket",
            s.vmm.socket_str(),
            "--vm",
            "vm1",
            "-o",
            &sealed,
            "--key",
            &key_a,
        ],
    )
    .expect(0);
    s.vmm.with(|st| st.vm.state = RunState::Paused);
    run(
        s.dir.path(),
        &[
            "restore",
            "--api-socket",
            s.vmm.socket_str(),
            "-i",
            &sealed,
            "--key",
            &key_b,
        ],
    )
    .expect(2)
    .stderr_has("integrity.key_id")
    .stderr_has("--key");
    // A short key file.
    let short = write_key(&s.dir, "short.key", b"too short");
    run(
        s.dir.path(),
        &[
            "restore",
            "--api-socket",
            s.vmm.socket_str(),
            "-i",
            &sealed,
            "--key",
            &short,
        ],
    )
    .expect(2)
    .stderr_has("at least 16");
    untouched(&s, &before);
    run(
        s.dir.path(),
        &[
            "restore",
            "--api-socket",
            s.vmm.socket_str(),
            "-i",
            &sealed,
            "--key",
            &key_a,
        ],
    )
    .expect(0);
}

#[test]
fn restore_refuses_a_running_vm() {
    let s = setup("running");
    s.vmm.with(|st| st.vm.state = RunState::Running);
    let before = s.vmm.offsets();
    let r = restore(&s, &["--json"]);
    r.expect(3)
        .stderr_has("the VM is Running")
        .stderr_has("can no longer be carried")
        .stderr_has("\n  hint: restore or receive the VM with resume=false")
        .stderr_has("\n  next: VM vm1 is Running");
    assert!(!r.stderr.contains("do not resume"), "{}", r.stderr);
    assert_eq!(r.json()["vm_untouched"], true);
    untouched(&s, &before);
    restore(&s, &["--on-failure", "vmm-default"])
        .expect(3)
        .stderr_has("can no longer be carried");
    untouched(&s, &before);
}

#[test]
fn restore_when_the_socket_is_gone() {
    let mut s = setup("gone");
    let before = s.vmm.offsets();
    s.vmm.stop();
    restore(&s, &[])
        .expect(4)
        .stderr_has("does not exist")
        .stderr_has("was not touched");
    assert_eq!(s.vmm.puts(), 0);
    assert_eq!(s.vmm.offsets(), before);
}

#[test]
fn restore_when_the_vmm_refuses_the_put() {
    let s = setup("refuse");
    let before = s.vmm.offsets();
    s.vmm.with(|st| {
        st.put = PutBehavior::Refuse(
            400,
            vec![
                "Error from API".into(),
                "tsc_offsets has 2 entries, the VM has 3 vCPUs".into(),
            ],
        )
    });
    let r = restore(&s, &["--json"]);
    r.expect(4)
        .stderr_has("the VMM refused the clock")
        .stderr_has("Error from API: tsc_offsets has 2 entries")
        .stderr_has("offsets unchanged");
    assert_eq!(r.json()["outcome"], "vmm_error");
    assert_eq!(r.json()["vm_untouched"], true);
    assert_eq!(s.vmm.offsets(), before, "VM changed");
    // Cloud Hypervisor style 500 for a state refusal: still exit 4.
    s.vmm.with(|st| {
        st.put = PutBehavior::Refuse(
            500,
            vec!["the vCPUs have run since the VM was restored or received".into()],
        )
    });
    restore(&s, &[]).expect(4).stderr_has("vCPUs have run");
    assert_eq!(s.vmm.offsets(), before, "VM changed");
}

#[test]
fn restore_when_the_vmm_fails_and_rolls_back() {
    let s = setup("rollback");
    let before = s.vmm.offsets();
    s.vmm.with(|st| st.put = PutBehavior::FailRolledBack);
    let r = restore(&s, &["--json"]);
    r.expect(5).stderr_has("rollback is complete");
    assert_eq!(r.json()["outcome"], "rolled_back");
    assert_eq!(r.json()["vmm_failure"]["outcome"], "rolled_back");
    assert_eq!(r.json()["vmm_failure"]["rollback"]["complete"], true);
    assert_eq!(s.vmm.offsets(), before);
}

/// The VMM's typed `rollback_incomplete`: exit 6 (do not resume), whatever
/// a read-back shows.
#[test]
fn restore_when_the_vmm_cannot_roll_back() {
    let s = setup("incomplete");
    s.vmm
        .with(|st| st.put = PutBehavior::FailRollbackIncomplete);
    let r = restore(&s, &["--json"]);
    r.expect(6).stderr_has("could not roll back");
    assert_eq!(r.json()["outcome"], "unknown");
    assert_eq!(r.json()["vmm_failure"]["rollback"]["complete"], false);
}

/// No error text is parsed: an untyped error whose words say "rolled back"
/// or "ROLLBACK INCOMPLETE" is a refusal when the read-back shows nothing
/// changed (exit 4), and unknown when it shows a change (exit 6).
#[test]
fn restore_never_decides_on_error_text() {
    let s = setup("untyped");
    let before = s.vmm.offsets();
    for words in [
        "apply failed; rolled back (2 offsets)",
        "ROLLBACK INCOMPLETE: errno 5",
    ] {
        s.vmm.with(|st| {
            st.put = PutBehavior::RefuseUntyped(500, vec!["Error from API".into(), words.into()])
        });
        let r = restore(&s, &["--json"]);
        r.expect(4).stderr_has("no typed reply");
        assert_eq!(r.json()["outcome"], "vmm_error");
        assert!(r.json()["vmm_failure"].is_null());
        assert_eq!(s.vmm.offsets(), before);
    }
    // The same words, but the PUT did change the offsets: unknown (6).
    let frozen = before[0] - i64::from(cli_support::host_khz()) * 1000;
    s.vmm.with(|st| {
        st.put = PutBehavior::ChangeUntyped(500, vec!["rolled back".into()]);
        for v in &mut st.vm.vcpus {
            v.tsc_offset = frozen;
        }
    });
    let r = restore(&s, &["--json"]);
    r.expect(6).stderr_has("CHANGED");
    assert_eq!(r.json()["outcome"], "unknown");
}

#[test]
fn restore_rolls_back_a_wrong_read_back() {
    let s = setup("wrong");
    let frozen = s.vmm.offsets()[0] - i64::from(cli_support::host_khz()) * 1000;
    s.vmm.with(|st| {
        for v in &mut st.vm.vcpus {
            v.tsc_offset = frozen;
        }
        st.put = PutBehavior::ApplyWrongOnce;
    });
    let r = restore(&s, &["--json"]);
    r.expect(5)
        .stderr_has("verification failed")
        .stderr_has("written back");
    assert_eq!(s.vmm.puts(), 2, "the apply and the rollback");
    let undo = s.vmm.with(|st| st.put_bodies[1].clone());
    assert_eq!(undo["tsc_offsets"], serde_json::json!([frozen, frozen]));
    assert!(undo["kvmclock"].is_null());
    assert_eq!(s.vmm.offsets(), vec![frozen, frozen]);
}

#[test]
fn restore_without_an_answer_is_unknown() {
    let s = setup("hang");
    s.vmm.with(|st| st.put = PutBehavior::Hang(1500));
    restore(&s, &["--api-timeout", "300ms"])
        .expect(6)
        .stderr_has("no answer within 300 ms")
        .stderr_has("do NOT resume");
    let s = setup("close");
    s.vmm.with(|st| st.put = PutBehavior::Close);
    restore(&s, &[]).expect(6).stderr_has("PUT vm.clock failed");
}

#[test]
fn restore_says_loudly_when_offsets_are_inert() {
    let s = setup("inert");
    s.vmm
        .with(|st| st.vm.capabilities.tsc_offset_effective = false);
    let r = restore(&s, &["--json"]);
    r.expect(0);
    let j = r.json();
    assert_eq!(j["verification"]["tsc_offsets_effective"], false);
    let warnings = j["warnings"].to_string();
    assert!(warnings.contains("INERT"), "{warnings}");
    restore(&s, &[])
        .expect(0)
        .stdout_has("TSC OFFSETS ARE INERT")
        .stdout_has("NOT checked");
}

/// A sidecar from "another host": the same capture resealed with another
/// boot id and hostname.
fn cross_host_sidecar(s: &Setup) -> String {
    cross_host_sidecar_with(s, "cross.json", |_| {})
}

/// The same, with `edit` applied to the body before it is resealed to `name`.
fn cross_host_sidecar_with(
    s: &Setup,
    name: &str,
    edit: impl FnOnce(&mut clockcarry::sidecar::SidecarBody),
) -> String {
    let mut sc = Sidecar::read_from(Path::new(&s.sidecar), None).expect("read");
    sc.body.source_host.boot_id = "00000000-1111-2222-3333-444444444444".into();
    sc.body.source_host.hostname = "elsewhere.example".into();
    edit(&mut sc.body);
    let sealed = Sidecar::seal(sc.body, None).expect("seal");
    let p = s.dir.join(name);
    sealed.write_to(&p).expect("write");
    p.display().to_string()
}

#[test]
fn restore_cross_host_uses_elapsed_time_and_policy() {
    let s = setup("cross");
    let cross = cross_host_sidecar(&s);
    let before = s.vmm.offsets();
    let base = [
        "restore",
        "--api-socket",
        s.vmm.socket_str(),
        "-i",
        cross.as_str(),
    ];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        run(s.dir.path(), &a)
    };
    let r = with(&["--dry-run", "--json"]);
    r.expect(0);
    let j = r.json();
    assert_eq!(j["summary"]["mode"], "cross-host");
    assert!(j["summary"]["elapsed_ns"].as_u64().unwrap_or(0) > 0);
    assert!(
        j["summary"]["error_bound"]["total_ns"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    // Freeze: no elapsed time.
    let j = with(&["--dry-run", "--json", "--policy", "freeze"]).json();
    assert_eq!(j["summary"]["elapsed_ns"], 0);
    // Policy refusals (exit 3), VM untouched.
    let host_synced = clockcarry::host::clock_quality()
        .map(|(q, _)| q.synchronised)
        .unwrap_or(false);
    if !host_synced {
        with(&["--require-sync"])
            .expect(3)
            .stderr_has("not synchronised");
        with(&["--max-clock-error", "1ms"])
            .expect(3)
            .stderr_has("maxerror");
    } else {
        println!("SKIP: --require-sync refusal (this host is synchronised)");
    }
    std::thread::sleep(std::time::Duration::from_millis(3));
    with(&["--max-elapsed", "1ms"])
        .expect(3)
        .stderr_has("exceeds the limit");
    untouched(&s, &before);
    // And applied.
    with(&[]).expect(0).stdout_has("cross-host");
}

/// A cross-host sidecar whose offset was measured 2 s before the capture:
/// the drift term is `--offset-drift-ppm` of that time and more, and a
/// value out of range is refused naming the flag.
#[test]
fn restore_offset_drift_ppm_sets_the_drift_term() {
    let s = setup("drift");
    let input = cross_host_sidecar_with(&s, "measured.json", |body| {
        body.offset_estimate = Some(clockcarry::model::OffsetEstimate {
            offset_ns: 0,
            bound_ns: 300_000,
            measured_tai_ns: Some(body.capture.tai_ns - 2_000_000_000),
            rounds: Some(8),
            best_delay_ns: Some(600_000),
        });
    });
    let drift = |ppm: &str| {
        let r = run(
            s.dir.path(),
            &[
                "restore",
                "--api-socket",
                s.vmm.socket_str(),
                "-i",
                &input,
                "--dry-run",
                "--json",
                "--offset-drift-ppm",
                ppm,
            ],
        );
        r.expect(0);
        let b = &r.json()["summary"]["error_bound"];
        assert_eq!(b["offset_estimate_ns"], 300_000, "{b}");
        b["offset_drift_ns"].as_u64().unwrap_or(u64::MAX)
    };
    // 2 s before the capture, and the capture before the restore: at least
    // 2 x 2 s worth of ppm (measurement -> capture, measurement -> restore).
    let at_20 = drift("20");
    assert!((80_000..90_000).contains(&at_20), "20 ppm: {at_20} ns");
    let at_100 = drift("100");
    assert!((400_000..450_000).contains(&at_100), "100 ppm: {at_100} ns");
    assert_eq!(drift("0"), 0);
    run(
        s.dir.path(),
        &[
            "restore",
            "--api-socket",
            s.vmm.socket_str(),
            "-i",
            &input,
            "--offset-drift-ppm",
            "10001",
        ],
    )
    .expect(2)
    .stderr_has("--offset-drift-ppm");
}

// ------------------------------------------------------- inspect / check

#[test]
fn inspect_shows_and_checks_a_sidecar() {
    let s = setup("inspect");
    let r = run(s.dir.path(), &["inspect", &s.sidecar]);
    r.expect(0)
        .stdout_has("valid")
        .stdout_has("vm1, 2 vCPU(s)")
        .stdout_has("vCPU 1")
        .stdout_has("captured")
        .stdout_has("HMAC absent");
    let j = run(s.dir.path(), &["inspect", &s.sidecar, "--json"]).json();
    assert_eq!(j["valid"], true);
    assert_eq!(j["integrity"]["hmac"], "absent");
    assert_eq!(j["sidecar"]["vm"]["id"], "vm1");
    let key = write_key(&s.dir, "a.key", KEY_A);
    run(s.dir.path(), &["inspect", &s.sidecar, "--key", &key])
        .expect(2)
        .stderr_has("unauthenticated");
    let text = std::fs::read_to_string(&s.sidecar).expect("read");
    std::fs::write(
        &s.sidecar,
        text.replace("\"vcpu_count\": 2", "\"vcpu_count\": \"2\""),
    )
    .expect("write");
    run(s.dir.path(), &["inspect", &s.sidecar])
        .expect(2)
        .stderr_has("vm.vcpu_count");
}

#[test]
fn check_reports_every_item() {
    let dir = TempDir::new("check");
    let r = run(dir.path(), &["check", "--json", "--no-kvm"]);
    assert!(r.code == 0 || r.code == 7, "exit {}: {}", r.code, r.stderr);
    let j = r.json();
    let names: Vec<String> = j["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for n in [
        "tai_offset",
        "synchronised",
        "maxerror",
        "leap_pending",
        "constant_tsc",
        "nonstop_tsc",
        "clocksource",
        "host_tsc_khz",
        "sample",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}: {names:?}");
    }
    assert_eq!(j["ready"], r.code == 0);
    let r = run(dir.path(), &["check", "--max-clock-error", "1ns"]);
    r.expect(7).stdout_has("FAIL  maxerror");
}

#[test]
fn check_probes_kvm_when_it_can() {
    let dir = TempDir::new("check-kvm");
    if std::fs::File::open("/dev/kvm").is_err() {
        println!("SKIP: /dev/kvm not accessible");
        return;
    }
    let r = run(dir.path(), &["check", "--json"]);
    let j = r.json();
    let text = j["checks"].to_string();
    assert!(text.contains("kvm.tsc_offsets_effective"), "{text}");
    assert!(j["kvm_probe"].is_object());
}

// ----------------------------------------------------------------- bench

#[test]
fn bench_restore_reports_order_statistics() {
    let s = setup("bench");
    let r = run(
        s.dir.path(),
        &[
            "bench-restore",
            "--api-socket",
            s.vmm.socket_str(),
            "-i",
            &s.sidecar,
            "--runs",
            "5",
            "--json",
        ],
    );
    r.expect(0);
    let j = r.json();
    assert_eq!(j["runs"], 5);
    assert_eq!(j["samples_blackout_ns"].as_array().map(Vec::len), Some(5));
    let med = j["blackout_ns"]["median"].as_u64().unwrap_or(0);
    assert!(med > 0 && med <= j["blackout_ns"]["p99"].as_u64().unwrap_or(0));
    assert_eq!(s.vmm.puts(), 6, "warm-up + 5 runs");
    // A failing run stops the benchmark with its code.
    s.vmm.with(|st| st.vm.state = RunState::Running);
    run(
        s.dir.path(),
        &[
            "bench-restore",
            "--api-socket",
            s.vmm.socket_str(),
            "-i",
            &s.sidecar,
            "--runs",
            "2",
        ],
    )
    .expect(3)
    .stderr_has("restore run failed");
}

// ------------------------------------------------------- logs / dispatch

#[test]
fn logs_go_to_stderr_when_asked() {
    let s = setup("logs");
    let r = restore(&s, &["-v", "--dry-run"]);
    r.expect(0).stderr_has("clockcarry: debug:");
    let r = restore(&s, &["-q", "--dry-run"]);
    r.expect(0);
    assert!(!r.stderr.contains("debug"), "{}", r.stderr);
}

#[test]
fn libvirt_hook_name_does_not_reach_the_cli() {
    let dir = TempDir::new("argv0");
    let hooks = dir.join("hooks").join("qemu.d");
    std::fs::create_dir_all(&hooks).expect("mkdir");
    let link = hooks.join("50-clockcarry");
    std::os::unix::fs::symlink(cli_support::BIN, &link).expect("symlink");
    let out = cli_support::sandbox(&mut std::process::Command::new(&link), dir.path())
        .args(["vm1", "prepare", "begin", "-"])
        .output()
        .expect("run hook");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("libvirt hook"), "{stderr}");
    // What the hook logs (here: no XML on stdin) lands in the sandbox's
    // state directory, not in the host's /run/clockcarry/libvirt.
    let log = std::fs::read_to_string(dir.join("run").join("libvirt").join("hook.log"))
        .expect("the hook logged into $CLOCKCARRY_RUN_DIR/libvirt");
    assert!(log.contains("no domain XML on stdin"), "{log}");
}

/// Every `CLOCKCARRY_*` variable the code reads names a path on the host;
/// each must be pointed into the test's temp dir by `cli_support::sandbox`,
/// or some test would read or write the real one.
#[test]
fn environment_variables_are_all_sandboxed() {
    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    // The command, the library and the libvirt hook read the environment.
    let mut files = Vec::new();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["src", "../src", "../libvirt/src"] {
        sources(&manifest.join(dir), &mut files);
    }
    let mut found = std::collections::BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("\"CLOCKCARRY_") {
            let tail = &rest[at + 1..];
            let end = tail.find('"').unwrap_or(tail.len());
            found.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    assert!(found.contains("CLOCKCARRY_STATE_DIR"), "{found:?}");
    let sandboxed: Vec<&str> = cli_support::SANDBOX_ENV.iter().map(|(v, _)| *v).collect();
    let missing: Vec<&String> = found
        .iter()
        .filter(|v| !sandboxed.contains(&v.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the code but not sandboxed by the tests: {missing:?}"
    );
}

#[test]
fn host_rate_cache_is_per_boot_and_private() {
    let dir = TempDir::new("cache");
    let vmm = FakeVmm::start(dir.path(), sample_vm(1, RunState::Running));
    let out = dir.join("x.json").display().to_string();
    let capture = |extra: &[&str]| {
        let mut a = vec![
            "capture",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "v",
            "-o",
            &out,
            "--json",
        ];
        a.extend_from_slice(extra);
        run(dir.path(), &a)
    };
    let first = capture(&[]);
    first.expect(0);
    assert_eq!(first.json()["host_rate"]["cached"], false);
    let cache = dir.join("run").join("host-tsc-khz.json");
    let entry: Value =
        serde_json::from_slice(&std::fs::read(&cache).expect("cache")).expect("json");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(entry["boot_id"], boot_id.trim());
    assert!(entry["kernel_release"].is_string());
    assert_eq!(capture(&[]).json()["host_rate"]["cached"], true);
    // Another boot's entry is not used (and is replaced).
    let mut other = entry.clone();
    other["boot_id"] = "00000000-0000-0000-0000-000000000000".into();
    other["khz"] = 1.into();
    std::fs::write(&cache, other.to_string()).expect("write");
    let j = capture(&[]).json();
    assert_eq!(j["host_rate"]["cached"], false);
    assert_eq!(j["host_tsc_khz"], entry["khz"]);
    // A cache others may write is not trusted.
    std::fs::write(
        &cache,
        other
            .to_string()
            .replace("00000000-0000-0000-0000-000000000000", boot_id.trim()),
    )
    .expect("write");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let j = capture(&[]).json();
    assert_eq!(j["host_rate"]["cached"], false);
    assert_eq!(j["host_tsc_khz"], entry["khz"]);
    // The command line wins.
    let j = capture(&["--host-tsc-khz", "2000000"]).json();
    assert_eq!(j["host_tsc_khz"], 2_000_000);
    assert_eq!(j["host_rate"]["source"], "command_line");
}

#[test]
fn capture_to_an_unwritable_place_exits_1_and_restore_finds_the_default_path() {
    let dir = TempDir::new("exit1");
    let vmm = FakeVmm::start(dir.path(), sample_vm(1, RunState::Running));
    run(
        dir.path(),
        &[
            "capture",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "v",
            "-o",
            "/nonexistent-dir/x.json",
        ],
    )
    .expect(1)
    .stderr_has("cannot write the sidecar");
    // Default path both ways.
    run(
        dir.path(),
        &["capture", "--api-socket", vmm.socket_str(), "--vm", "web-2"],
    )
    .expect(0);
    let mode = std::fs::metadata(dir.join("state"))
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    vmm.with(|s| s.vm.state = RunState::Paused);
    let r = run(
        dir.path(),
        &[
            "restore",
            "--api-socket",
            vmm.socket_str(),
            "--vm",
            "web-2",
            "--json",
        ],
    );
    r.expect(0);
    assert!(r.json()["sidecar"]
        .as_str()
        .unwrap_or("")
        .ends_with("state/web-2.sidecar.json"));
    run(
        dir.path(),
        &["restore", "--api-socket", vmm.socket_str(), "--vm", "web-3"],
    )
    .expect(2)
    .stderr_has("web-3.sidecar.json");
}

/// `-q`: errors only. capture and restore print no report (before: the
/// report was printed whatever -q said); --json is still printed; an error
/// still reaches stderr.
#[test]
fn quiet_silences_the_reports_but_not_json_or_errors() {
    let s = setup("quiet");
    let out = s.dir.join("q.json").display().to_string();
    let r = run(
        s.dir.path(),
        &[
            "-q",
            "capture",
            "--api-socket",
            s.vmm.socket_str(),
            "--vm",
            "vm1",
            "-o",
            &out,
        ],
    );
    r.expect(0);
    assert_eq!(r.stdout, "", "capture -q printed a report");
    s.vmm.with(|st| st.vm.state = RunState::Paused);
    let r = restore(&s, &["-q", "--dry-run"]);
    r.expect(0);
    assert_eq!(r.stdout, "", "restore -q printed a report");
    let r = restore(&s, &["-q", "--dry-run", "--json"]);
    r.expect(0);
    assert_eq!(r.json()["outcome"], "dry_run");
    let r = restore(&s, &["-q", "--max-elapsed", "1ns"]);
    r.expect(3).stderr_has("--max-elapsed");
    // Without -q the report is there; on the same host its TSC advance
    // says why the offsets do not change (before: "N cycles" beside "+0").
    let r = restore(&s, &["--dry-run"]);
    r.expect(0)
        .stdout_has("dry run")
        .stdout_has("the host TSC's own: the captured offsets are kept");
}

/// The parser the metrics are checked with: Debian's python3 with the
/// Prometheus project's own client library (python3-prometheus-client),
/// `text_string_to_metric_families`. Prints each sample as JSON.
const PROM_PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

fn parse_prom(text: &str) -> Result<Vec<Value>, String> {
    use std::io::Write;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", PROM_PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("/usr/bin/python3: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("parser JSON"))
}

/// With CLOCKCARRY_METRICS_DIR, capture and restore (one applied, one
/// refused) leave clockcarry_vm1.prom, mode 0644, which the Prometheus
/// client's own parser reads: the last run of each operation, its outcome,
/// bound and kvm-clock error, and counters of runs and failures by exit code.
#[test]
fn metrics_are_written_in_the_exposition_format() {
    let probe = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.parser"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        println!(
            "SKIP: no /usr/bin/python3 with prometheus_client (apt-get install \
             python3-prometheus-client; .ci/run installs it)"
        );
        return;
    }
    let s = setup("metrics");
    // Its own directory: the sandbox's metrics/ already has setup's capture.
    let dir = s.dir.join("metrics-here");
    std::fs::create_dir_all(&dir).unwrap();
    let with_metrics = |args: &[&str]| {
        cli_support::finish(
            cli_support::cmd(s.dir.path())
                .env("CLOCKCARRY_METRICS_DIR", &dir)
                .args(args)
                .output()
                .expect("run"),
        )
    };
    let out = s.dir.join("m.json").display().to_string();
    s.vmm.with(|st| st.vm.state = RunState::Running);
    with_metrics(&[
        "capture",
        "--api-socket",
        s.vmm.socket_str(),
        "--vm",
        "vm1",
        "-o",
        &out,
    ])
    .expect(0);
    s.vmm.with(|st| st.vm.state = RunState::Paused);
    let restore_args = |extra: &[&'static str]| {
        let mut a = vec![
            "restore".to_string(),
            "--api-socket".into(),
            s.vmm.socket_str().to_string(),
            "-i".into(),
            out.clone(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let refused = restore_args(&["--max-elapsed", "1ns"]);
    let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
    with_metrics(&refused).expect(3);
    let applied = restore_args(&[]);
    let applied: Vec<&str> = applied.iter().map(String::as_str).collect();
    let r = with_metrics(&applied);
    r.expect(0)
        .stderr_has("operation=restore vm=\"vm1\" exit_code=0 outcome=applied mode=same-host");

    check_metrics_file(&dir.join("clockcarry_vm1.prom"));
}

/// The file of [`metrics_are_written_in_the_exposition_format`]: one
/// capture, a refused (exit 3) and an applied restore, read by the parser.
fn check_metrics_file(prom: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let text = std::fs::read_to_string(prom).unwrap();
    let samples = parse_prom(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let find = |name: &str, op: &str| -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s["name"] == name
                    && s["labels"]["vm"] == "vm1"
                    && (op.is_empty() || s["labels"]["operation"] == op)
            })
            .and_then(|s| s["value"].as_f64())
    };
    assert_eq!(
        find("clockcarry_runs_total", "restore"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        find("clockcarry_runs_total", "capture"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(find("clockcarry_last_run_success", "restore"), Some(1.0));
    assert_eq!(find("clockcarry_last_run_exit_code", "capture"), Some(0.0));
    assert_eq!(
        find("clockcarry_last_run_error_bound_seconds", "restore"),
        Some(0.0)
    );
    let kvm = find("clockcarry_last_restore_kvmclock_error_seconds", "").expect("kvm-clock");
    assert!(kvm.abs() < 1e-6, "{kvm}");
    let added = find("clockcarry_last_restore_blackout_added_seconds", "").expect("added");
    assert!(added > 0.0 && added < 10.0, "{added}");
    let failures: Vec<&Value> = samples
        .iter()
        .filter(|s| s["name"] == "clockcarry_failures_total")
        .collect();
    assert_eq!(failures.len(), 1, "{text}");
    assert_eq!(failures[0]["labels"]["exit_code"], "3");
    assert_eq!(failures[0]["labels"]["operation"], "restore");
    assert_eq!(failures[0]["value"].as_f64(), Some(1.0));
    // Counters are typed as such; the file names no other VM.
    assert!(samples
        .iter()
        .filter(|s| s["family"] == "clockcarry_runs")
        .all(|s| s["type"] == "counter"));
    assert!(samples.iter().all(|s| s["labels"]["vm"] == "vm1"));
    let ts = find("clockcarry_last_run_timestamp_seconds", "restore").unwrap();
    assert!(ts > 1.7e9, "{ts}");
}
