//! Sidecar authentication made host-wide (issue 11, defect 6): a host
//! configuration that names the key makes it mandatory for every command
//! that reads or writes sidecars, `--key` or not; key files and sidecars
//! that others could read (keys) or write (both) are refused, not warned
//! about. Every file lives in the test's temp dir (the sandbox's
//! `CLOCKCARRY_CONFIG` is `<dir>/clockcarry.conf`).

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cli_support::{run, sample_vm, FakeVmm, TempDir};
use clockcarry::model::RunState;
use clockcarry::sidecar::{Sidecar, SidecarKey};

const KEY_A: &[u8] = b"clockcarry-auth-test-key-A-not-secret";
const KEY_B: &[u8] = b"clockcarry-auth-test-key-B-not-secret";

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write_private(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).expect("write");
    chmod(p, 0o600);
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The host configuration the sandboxed binary reads.
fn host_config(dir: &TempDir, text: &str) {
    let p = dir.join("clockcarry.conf");
    std::fs::write(&p, text).expect("config");
    chmod(&p, 0o644);
}

struct Setup {
    dir: TempDir,
    vmm: FakeVmm,
    key_a: PathBuf,
    key_b: PathBuf,
}

/// A running 2-vCPU VM and two private key files; no host configuration.
fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let vmm = FakeVmm::start(dir.path(), sample_vm(2, RunState::Running));
    let key_a = dir.join("a.key");
    let key_b = dir.join("b.key");
    write_private(&key_a, KEY_A);
    write_private(&key_b, KEY_B);
    host_config(&dir, "");
    Setup {
        dir,
        vmm,
        key_a,
        key_b,
    }
}

impl Setup {
    fn run(&self, args: &[&str]) -> cli_support::Run {
        run(self.dir.path(), args)
    }

    fn capture(&self, out: &Path, extra: &[&str]) -> cli_support::Run {
        self.vmm.with(|st| st.vm.state = RunState::Running);
        let o = s(out);
        let mut a = vec![
            "capture",
            "--api-socket",
            self.vmm.socket_str(),
            "--vm",
            "vm1",
            "-o",
            &o,
        ];
        a.extend_from_slice(extra);
        let r = self.run(&a);
        self.vmm.with(|st| st.vm.state = RunState::Paused);
        r
    }

    fn restore(&self, input: &Path, extra: &[&str]) -> cli_support::Run {
        let i = s(input);
        let mut a = vec![
            "restore",
            "--api-socket",
            self.vmm.socket_str(),
            "-i",
            &i,
            "--dry-run",
        ];
        a.extend_from_slice(extra);
        self.run(&a)
    }
}

/// `sidecar` with one offset moved and its digest recomputed: what someone
/// who can edit the file produces. With `keep_hmac` the old HMAC stays.
fn tampered(sidecar: &Path, out: &Path, keep_hmac: bool) {
    let sc = Sidecar::read_from(sidecar, None).expect("read");
    let mut body = sc.body.clone();
    body.vm_clock.vcpus[0].tsc_offset += 1_000_000;
    let mut forged = Sidecar::seal(body, None).expect("seal");
    if keep_hmac {
        forged.integrity.hmac_sha256 = sc.integrity.hmac_sha256.clone();
        forged.integrity.key_id = sc.integrity.key_id.clone();
    }
    write_private(out, &forged.to_json_pretty());
}

#[test]
fn the_host_key_seals_and_is_required_without_key() {
    let st = setup("host-key");
    let ka = SidecarKey::from_bytes(KEY_A).expect("key");
    host_config(
        &st.dir,
        &format!(
            "# the sidecar key of this host\nkey_file = {}\n",
            st.key_a.display()
        ),
    );
    // capture without --key seals with the host's key.
    let good = st.dir.join("good.json");
    st.capture(&good, &[]).expect(0);
    let sc = Sidecar::read_from(&good, Some(&ka)).expect("sealed with the host key");
    assert_eq!(sc.integrity.key_id.as_deref(), Some(ka.id()));

    // Every reader checks it without --key.
    let dry = st.restore(&good, &["--json"]);
    dry.expect(0);
    let dst = st.dir.join("dst.json");
    write_private(&dst, dry.json()["destination"].to_string().as_bytes());
    let j = st.run(&["inspect", &s(&good), "--json"]);
    j.expect(0);
    assert_eq!(j.json()["integrity"]["hmac"], "verified");

    // Tampered and re-digested, HMAC dropped: refused everywhere.
    let bare = st.dir.join("bare.json");
    tampered(&good, &bare, false);
    st.restore(&bare, &[])
        .expect(2)
        .stderr_has("integrity.hmac_sha256")
        .stderr_has("unauthenticated");
    st.run(&["inspect", &s(&bare)])
        .expect(2)
        .stderr_has("unauthenticated");
    st.run(&["plan", "-i", &s(&bare), "--destination", &s(&dst)])
        .expect(2)
        .stderr_has("unauthenticated");
    // Tampered, re-digested, old HMAC kept: refused.
    let forged = st.dir.join("forged.json");
    tampered(&good, &forged, true);
    st.restore(&forged, &[])
        .expect(2)
        .stderr_has("integrity.hmac_sha256");
    st.run(&["inspect", &s(&forged)])
        .expect(2)
        .stderr_has("integrity.hmac_sha256");

    // An explicit --key is used instead (still mandatory): a sidecar
    // sealed with B passes with --key B only.
    let with_b = st.dir.join("b.json");
    st.capture(&with_b, &["--key", &s(&st.key_b)]).expect(0);
    st.restore(&with_b, &["--key", &s(&st.key_b)]).expect(0);
    st.restore(&with_b, &[])
        .expect(2)
        .stderr_has("integrity.key_id");
    st.restore(&bare, &["--key", &s(&st.key_b)]).expect(2);
    assert_eq!(st.vmm.puts(), 0);
}

#[test]
fn key_files_others_could_read_write_or_own_are_refused() {
    let st = setup("key-modes");
    let good = st.dir.join("good.json");
    st.capture(&good, &["--key", &s(&st.key_a)]).expect(0);
    let key = s(&st.key_a);
    for mode in [0o640, 0o604, 0o620, 0o602, 0o666] {
        chmod(&st.key_a, mode);
        st.run(&["inspect", &s(&good), "--key", &key])
            .expect(2)
            .stderr_has(&key)
            .stderr_has("group or others");
        st.capture(&st.dir.join("new.json"), &["--key", &key])
            .expect(2)
            .stderr_has("group or others");
    }
    // Through the host configuration alike.
    host_config(&st.dir, &format!("key_file = {key}\n"));
    st.run(&["inspect", &s(&good)])
        .expect(2)
        .stderr_has(&key)
        .stderr_has("group or others");
    chmod(&st.key_a, 0o600);
    st.run(&["inspect", &s(&good)]).expect(0);
    if euid() == 0 {
        std::os::unix::fs::chown(&st.key_a, Some(65534), None).expect("chown");
        st.run(&["inspect", &s(&good)])
            .expect(2)
            .stderr_has("owned by uid 65534");
        st.run(&["inspect", &s(&good), "--key", &key])
            .expect(2)
            .stderr_has("owned by uid 65534");
    } else {
        println!("SKIP (owner case): not root");
    }
    assert!(!st.dir.join("new.json").exists());
    assert_eq!(
        st.vmm.with(|v| v.gets),
        1,
        "refused before the VMM is asked"
    );
}

#[test]
fn sidecars_others_could_have_written_are_refused() {
    let st = setup("planted");
    // Where `restore --vm` looks: $CLOCKCARRY_STATE_DIR/vm1.sidecar.json.
    let state = st.dir.join("state");
    std::fs::create_dir(&state).expect("mkdir");
    chmod(&state, 0o700);
    let planted = state.join("vm1.sidecar.json");
    st.capture(&planted, &[]).expect(0);
    let restore_vm = || {
        st.run(&[
            "restore",
            "--api-socket",
            st.vmm.socket_str(),
            "--vm",
            "vm1",
            "--dry-run",
        ])
    };
    restore_vm().expect(0);
    chmod(&planted, 0o666);
    restore_vm()
        .expect(2)
        .stderr_has(&s(&planted))
        .stderr_has("writable by group or others");
    chmod(&planted, 0o620);
    restore_vm()
        .expect(2)
        .stderr_has("writable by group or others");
    if euid() == 0 {
        // What the issue planted: owned by nobody, mode 0666; and nobody's
        // even at 0600.
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).expect("chown");
        chmod(&planted, 0o666);
        restore_vm().expect(2).stderr_has(&s(&planted));
        chmod(&planted, 0o600);
        restore_vm().expect(2).stderr_has("owned by uid 65534");
        std::os::unix::fs::chown(&planted, Some(0), Some(0)).expect("chown");
    } else {
        println!("SKIP (owner case): not root");
    }
    chmod(&planted, 0o600);
    restore_vm().expect(0);

    // A directory others may write without the sticky bit: they could
    // have replaced the file. With the sticky bit (as /tmp) they cannot.
    let shared = st.dir.join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    let inside = shared.join("vm1.json");
    st.capture(&inside, &[]).expect(0);
    chmod(&shared, 0o777);
    st.restore(&inside, &[])
        .expect(2)
        .stderr_has(&s(&shared))
        .stderr_has("sticky");
    st.run(&["inspect", &s(&inside)]).expect(2);
    chmod(&shared, 0o1777);
    st.restore(&inside, &[]).expect(0);
    chmod(&shared, 0o755);
    assert_eq!(st.vmm.puts(), 0);
}

#[test]
fn the_host_configuration_is_strict() {
    let st = setup("config");
    let good = st.dir.join("good.json");
    st.capture(&good, &[]).expect(0);
    let key = s(&st.key_a);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("key_file = {key}\nkeyfile = {key}\n"),
            vec!["line 2", "keyfile", "unknown"],
        ),
        (
            format!("key_file = {key}\n\nkey_file = {key}\n"),
            vec!["line 3", "key_file", "twice"],
        ),
        (
            "key_file = a.key\n".to_string(),
            vec!["line 1", "key_file", "absolute"],
        ),
        ("key_file\n".to_string(), vec!["line 1", "key = value"]),
        ("key_file =\n".to_string(), vec!["line 1", "key_file"]),
        (
            format!("key_file = {}\n", st.dir.join("missing.key").display()),
            vec!["missing.key"],
        ),
    ];
    let conf = s(&st.dir.join("clockcarry.conf"));
    let new = st.dir.join("new.json");
    for (text, needles) in &cases {
        host_config(&st.dir, text);
        for args in [
            vec!["inspect", good.to_str().unwrap_or("")],
            vec![
                "capture",
                "--api-socket",
                st.vmm.socket_str(),
                "--vm",
                "vm1",
                "-o",
                new.to_str().unwrap_or(""),
            ],
        ] {
            let r = st.run(&args);
            r.expect(2);
            for n in needles {
                r.stderr_has(n);
            }
        }
        if !text.contains("missing.key") {
            st.run(&["inspect", &s(&good)]).stderr_has(&conf);
        }
    }
    assert_eq!(
        st.vmm.with(|v| v.gets),
        1,
        "refused before the VMM is asked"
    );
    assert!(!new.exists());
    // A configuration others may write is refused.
    host_config(&st.dir, &format!("key_file = {key}\n"));
    chmod(&st.dir.join("clockcarry.conf"), 0o666);
    st.run(&["inspect", &s(&good)])
        .expect(2)
        .stderr_has(&conf)
        .stderr_has("writable by group or others");
    // CLOCKCARRY_CONFIG naming a file that does not exist is an error, not
    // "no configuration".
    let out = cli_support::cmd(st.dir.path())
        .env("CLOCKCARRY_CONFIG", st.dir.join("typo.conf"))
        .args(["inspect", &s(&good)])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("typo.conf"), "{stderr}");
    // Comments and blank lines are fine; the good configuration works.
    host_config(
        &st.dir,
        &format!("# clockcarry\n\n   # indented comment\nkey_file = {key}\n"),
    );
    let j = st.run(&["inspect", &s(&good), "--json"]);
    // `good` was captured without a key: now refused.
    j.expect(2).stderr_has("unauthenticated");
}
