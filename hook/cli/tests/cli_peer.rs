//! `clockcarry serve` and `clockcarry capture --peer` as real processes
//! over 127.0.0.1: the estimate in the sealed sidecar, the sidecar carried
//! to the destination, and every refusal (no key, key mandatory by host
//! configuration, wrong key, a silent peer, a tampered or replayed
//! message, bad arguments) with an exit code and a message naming it.

mod cli_support;
#[path = "../../tests/support/proxy.rs"]
mod proxy;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli_support::{cmd, run, sample_vm, FakeVmm, TempDir};
use clockcarry::model::RunState;
use proxy::{Action, Proxy};

const KEY_A: &[u8] = b"clockcarry-peer-cli-key-A-not-secret";
const KEY_B: &[u8] = b"clockcarry-peer-cli-key-B-not-secret";

fn write_private(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

struct Setup {
    dir: TempDir,
    vmm: FakeVmm,
    key_a: PathBuf,
    key_b: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let vmm = FakeVmm::start(dir.path(), sample_vm(2, RunState::Running));
    let key_a = dir.join("a.key");
    let key_b = dir.join("b.key");
    write_private(&key_a, KEY_A);
    write_private(&key_b, KEY_B);
    Setup {
        dir,
        vmm,
        key_a,
        key_b,
    }
}

/// A `clockcarry serve` process and the address it printed.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Path, args: &[&str]) -> Server {
        let mut child = cmd(dir)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve printed {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    /// Waits (at most 10 s) for a `--once` server's exit code and stderr.
    fn wait(mut self) -> (i32, String) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ =
                    std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err);
                return (status.code().unwrap_or(-1), err);
            }
            assert!(t.elapsed() < Duration::from_secs(10), "serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Setup {
    fn capture(&self, peer: &str, extra: &[&str]) -> cli_support::Run {
        let out = s(&self.dir.join("local.sidecar.json"));
        let mut a = vec![
            "capture",
            "--api-socket",
            self.vmm.socket_str(),
            "--vm",
            "web-1",
            "-o",
            &out,
            "--peer",
            peer,
        ];
        a.extend_from_slice(extra);
        run(self.dir.path(), &a)
    }
}

#[test]
fn capture_measures_the_offset_and_sends_the_sidecar() {
    let st = setup("peer-ok");
    let ka = s(&st.key_a);
    let server = Server::start(st.dir.path(), &["--key", &ka, "--once"]);
    let r = st.capture(
        &server.addr.to_string(),
        &["--key", &ka, "--send-sidecar", "--json"],
    );
    r.expect(0);
    let j = r.json();
    let e = &j["offset_estimate"];
    // 8 rounds back to back, then more while the bound is above the default
    // goal, up to the default maximum of 64: how many depends on the machine.
    let rounds = e["rounds"].as_u64().unwrap();
    assert!((8..=64).contains(&rounds), "{e}");
    let offset = e["offset_ns"].as_i64().unwrap();
    let bound = e["bound_ns"].as_u64().unwrap();
    assert!(offset.unsigned_abs() <= bound, "{e}");
    assert!(e["best_round_trip_ns"].as_u64().unwrap() > 0);
    assert!(e["sidecar_stored"].is_string(), "{e}");
    let (code, err) = server.wait();
    assert_eq!(code, 0, "{err}");

    // The destination's copy is the sealed sidecar with the estimate in it.
    let stored = st.dir.join("state/web-1.sidecar.json");
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let local = std::fs::read(st.dir.join("local.sidecar.json")).unwrap();
    assert_eq!(std::fs::read(&stored).unwrap(), local);
    let r = run(
        st.dir.path(),
        &["inspect", &s(&stored), "--key", &ka, "--json"],
    );
    r.expect(0);
    let sc = &r.json()["sidecar"]["offset_estimate"];
    assert_eq!(sc["offset_ns"].as_i64(), Some(offset));
    assert_eq!(sc["rounds"].as_u64(), Some(rounds));
    assert!(sc["measured_tai_ns"].as_u64().unwrap() > 0);
}

#[test]
fn the_human_summary_shows_the_estimate() {
    let st = setup("peer-human");
    let ka = s(&st.key_a);
    let server = Server::start(st.dir.path(), &["--key", &ka, "--once"]);
    st.capture(
        &server.addr.to_string(),
        // A fixed count: on a loaded machine the default goal would add rounds.
        &["--key", &ka, "--peer-rounds", "3", "--peer-max-rounds", "3"],
    )
    .expect(0)
    .stdout_has("peer offset")
    .stdout_has("3 rounds");
}

#[test]
fn no_key_without_the_explicit_flag_is_refused() {
    let st = setup("peer-nokey");
    let r = st.capture("127.0.0.1:9", &[]);
    r.expect(2).stderr_has("--insecure-no-key");
    assert!(!st.dir.join("local.sidecar.json").exists());
    run(
        st.dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--once"],
    )
    .expect(2)
    .stderr_has("--insecure-no-key");

    // With the flag on both sides it runs, unauthenticated.
    let server = Server::start(st.dir.path(), &["--insecure-no-key", "--once"]);
    st.capture(&server.addr.to_string(), &["--insecure-no-key"])
        .expect(0)
        .stderr_has("WITHOUT authentication");
    assert_eq!(server.wait().0, 0);
}

#[test]
fn a_key_mandatory_by_host_configuration_cannot_be_skipped() {
    let st = setup("peer-hostconf");
    let conf = st.dir.join("clockcarry.conf");
    std::fs::write(&conf, format!("key_file = {}\n", s(&st.key_a))).unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    st.capture("127.0.0.1:9", &["--insecure-no-key"])
        .expect(2)
        .stderr_has("the key is mandatory on this host");
    run(
        st.dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--insecure-no-key"],
    )
    .expect(2)
    .stderr_has("the key is mandatory on this host");

    // The configured key is used by both without --key.
    let server = Server::start(st.dir.path(), &["--once"]);
    st.capture(&server.addr.to_string(), &[]).expect(0);
    assert_eq!(server.wait().0, 0);
}

#[test]
fn a_wrong_key_fails_on_both_sides_with_exit_10() {
    let st = setup("peer-wrongkey");
    let server = Server::start(st.dir.path(), &["--key", &s(&st.key_b), "--once"]);
    let r = st.capture(&server.addr.to_string(), &["--key", &s(&st.key_a)]);
    r.expect(10)
        .stderr_has("different keys")
        .stderr_has("no sidecar written");
    assert!(!st.dir.join("local.sidecar.json").exists());
    let (code, err) = server.wait();
    assert_eq!(code, 10, "{err}");
    assert!(err.contains("different keys"), "{err}");
}

#[test]
fn a_peer_that_never_answers_is_exit_10_within_the_timeout() {
    let st = setup("peer-silent");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Instant::now();
    let r = st.capture(
        &addr.to_string(),
        &["--key", &s(&st.key_a), "--peer-timeout", "300ms"],
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    r.expect(10).stderr_has("no answer within 300 ms");
    assert!(!st.dir.join("local.sidecar.json").exists());
    drop(listener);
}

#[test]
fn a_tampered_answer_is_exit_10_naming_the_mac() {
    let st = setup("peer-tamper");
    let ka = s(&st.key_a);
    let server = Server::start(st.dir.path(), &["--key", &ka, "--once"]);
    let rule = |to_server: bool, idx: usize, line: &[u8]| {
        let t = String::from_utf8_lossy(line).into_owned();
        if !to_server && idx == 2 {
            Action::Replace(
                t.replacen("\"read_uncertainty_ns\":1", "\"read_uncertainty_ns\":0", 1)
                    .into_bytes(),
            )
        } else {
            Action::Forward
        }
    };
    let p = Proxy::start(server.addr, Arc::new(rule));
    st.capture(&p.addr.to_string(), &["--key", &ka])
        .expect(10)
        .stderr_has("altered in transit");
}

/// A ping recorded from one exchange, replayed into the next one.
#[test]
fn a_message_replayed_from_an_earlier_exchange_is_refused() {
    let st = setup("peer-replay");
    let ka = s(&st.key_a);
    let server = Server::start(st.dir.path(), &["--key", &ka]);
    let recorded: Arc<std::sync::Mutex<Option<Vec<u8>>>> = Arc::default();
    let rec = Arc::clone(&recorded);
    let rule = move |to_server: bool, idx: usize, line: &[u8]| {
        let mut g = rec.lock().unwrap();
        if !to_server || idx != 1 {
            return Action::Forward;
        }
        match g.as_ref() {
            None => {
                *g = Some(line.to_vec());
                Action::Forward
            }
            Some(old) => Action::Replace(old.clone()),
        }
    };
    let p = Proxy::start(server.addr, Arc::new(rule));
    st.capture(&p.addr.to_string(), &["--key", &ka]).expect(0);
    st.capture(&p.addr.to_string(), &["--key", &ka])
        .expect(10)
        .stderr_has("another session");
}

#[test]
fn peer_arguments_are_validated_naming_the_argument() {
    let st = setup("peer-args");
    let ka = s(&st.key_a);
    for (args, name) in [
        (vec!["--peer-rounds", "0"], "--peer-rounds"),
        (vec!["--peer-rounds", "257"], "--peer-rounds"),
        (vec!["--peer-max-rounds", "257"], "--peer-max-rounds"),
        (
            vec!["--peer-rounds", "9", "--peer-max-rounds", "8"],
            "--peer-max-rounds",
        ),
        (vec!["--peer-goal", "0ns"], "--peer-goal"),
        (vec!["--peer-goal", "2s"], "--peer-goal"),
        (vec!["--peer-timeout", "5"], "--peer-timeout"),
    ] {
        let mut a = vec!["--key", ka.as_str()];
        a.extend(args);
        st.capture("127.0.0.1:7487", &a).expect(2).stderr_has(name);
    }
    for bad in [
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        ":7487",
        "a b:1",
    ] {
        st.capture(bad, &["--key", &ka])
            .expect(2)
            .stderr_has("--peer");
    }
    let out = s(&st.dir.join("x.json"));
    run(
        st.dir.path(),
        &[
            "capture",
            "--api-socket",
            st.vmm.socket_str(),
            "--vm",
            "web-1",
            "-o",
            &out,
            "--send-sidecar",
        ],
    )
    .expect(2)
    .stderr_has("--peer");
    for bad in ["127.0.0.1", "localhost:80", "1.2.3:4", "127.0.0.1:65536"] {
        run(st.dir.path(), &["serve", "--listen", bad, "--key", &ka])
            .expect(2)
            .stderr_has("--listen");
    }
    run(
        st.dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--key",
            &ka,
            "--timeout",
            "0s",
        ],
    )
    .expect(2)
    .stderr_has("--timeout");
}
