//! The offset exchange over 127.0.0.1 (hook/src/peer/): a real server and
//! client, a proxy that delays, duplicates, replays or alters lines, and
//! every refusal naming its cause. Both ends share one clock here, so the
//! true offset is 0 and every estimate must lie within its bound of 0.

#[path = "support/proxy.rs"]
mod proxy;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clockcarry::model::{
    Capabilities, ClockQuality, HostIdentity, HostSample, KvmClockSample, LeapPending, RunState,
    TscFlags, VcpuOffset, VmClock,
};
use clockcarry::peer::estimate::MAX_ROUNDS;
use clockcarry::peer::wire::{Body, Conn, Session, MAX_MESSAGE_BYTES};
use clockcarry::peer::{
    serve_one, ClientOptions, PeerClient, PeerError, RoundPlan, ServerOptions, SessionReport,
};
use clockcarry::sidecar::{Sidecar, SidecarBody, SidecarKey};
use proxy::{Action, Proxy};

const KEY_A: &[u8] = b"offset-exchange-test-key-A-not-secret";
const KEY_B: &[u8] = b"offset-exchange-test-key-B-not-secret";

fn key(bytes: &[u8]) -> Option<SidecarKey> {
    Some(SidecarKey::from_bytes(bytes).unwrap())
}

type Served = mpsc::Receiver<Result<SessionReport, PeerError>>;

/// A server answering `sessions` connections, one after another.
fn server(opts: ServerOptions, sessions: usize) -> (SocketAddr, Served) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..sessions {
            let (stream, _) = listener.accept().unwrap();
            let _ = tx.send(serve_one(stream, &opts));
        }
    });
    (addr, rx)
}

fn server_opts(k: Option<SidecarKey>) -> ServerOptions {
    ServerOptions {
        timeout: Duration::from_secs(5),
        key: k,
        state_dir: None,
    }
}

fn client_opts(k: Option<SidecarKey>) -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
        key: k,
    }
}

fn served(rx: &Served) -> Result<SessionReport, PeerError> {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("server ended")
}

#[test]
fn an_exchange_measures_zero_within_its_bound() {
    let (addr, rx) = server(server_opts(key(KEY_A)), 1);
    let mut c = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let (samples, e) = c.measure(8).unwrap();
    c.finish().unwrap();
    assert_eq!(samples.len(), 8);
    assert_eq!(e.rounds, 8);
    assert!(e.offset_ns.unsigned_abs() <= e.bound_ns, "{e:?}");
    assert!(e.bound_ns < 50_000_000, "loopback bound {e:?}");
    assert_eq!(served(&rx).unwrap().rounds, 8);
}

/// Requests held 40 ms on the way out, answers not: the estimate is off by
/// about 20 ms, and its bound covers it.
#[test]
fn asymmetric_delay_stays_within_the_bound() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let rule = |to_server: bool, idx: usize, _: &[u8]| {
        if to_server && idx > 0 {
            Action::Delay(Duration::from_millis(40))
        } else {
            Action::Forward
        }
    };
    let p = Proxy::start(addr, Arc::new(rule));
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let (_, e) = c.measure(3).unwrap();
    c.finish().unwrap();
    assert!(e.offset_ns > 15_000_000, "{e:?}");
    assert!(e.offset_ns.unsigned_abs() <= e.bound_ns, "{e:?}");
}

/// One round's answer held 300 ms (a queued message): the other rounds
/// keep the bound tight.
#[test]
fn a_delayed_round_is_outvoted() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let rule = |to_server: bool, idx: usize, _: &[u8]| {
        if !to_server && idx == 2 {
            Action::Delay(Duration::from_millis(300))
        } else {
            Action::Forward
        }
    };
    let p = Proxy::start(addr, Arc::new(rule));
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let (samples, e) = c.measure(6).unwrap();
    c.finish().unwrap();
    let slow = samples[1].figures().unwrap();
    assert!(slow.delay_ns >= 300_000_000, "{slow:?}");
    assert!(e.best_delay_ns < 100_000_000, "{e:?}");
    assert!(e.offset_ns.unsigned_abs() <= e.bound_ns, "{e:?}");
}

/// The first ten answers held 20 ms (a busy stretch of the network): a
/// fixed four rounds all fall in it, the adaptive plan waits it out and
/// stops as soon as its goal is met.
#[test]
fn a_slow_stretch_is_waited_out_until_the_goal() {
    let slow_answers = |to_server: bool, idx: usize, _: &[u8]| {
        if !to_server && (1..=10).contains(&idx) {
            Action::Delay(Duration::from_millis(20))
        } else {
            Action::Forward
        }
    };
    let (addr, _rx) = server(server_opts(key(KEY_A)), 2);
    let p = Proxy::start(addr, Arc::new(slow_answers));
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let (_, fixed) = c.measure(4).unwrap();
    c.finish().unwrap();
    assert!(fixed.bound_ns >= 10_000_000, "{fixed:?}");

    let p = Proxy::start(addr, Arc::new(slow_answers));
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let plan = RoundPlan {
        min_rounds: 4,
        max_rounds: 64,
        goal_bound_ns: 5_000_000,
        spacing: Duration::from_millis(1),
    };
    let (samples, e) = c.measure_until(&plan).unwrap();
    c.finish().unwrap();
    assert!(e.bound_ns <= 5_000_000, "{e:?}");
    assert!(e.offset_ns.unsigned_abs() <= e.bound_ns, "{e:?}");
    // Rounds 0 to 9 were slow; the plan stopped at the first fast one
    // that met the goal, not at its maximum.
    assert!(
        samples.len() > 10 && samples.len() < 64,
        "{} rounds",
        samples.len()
    );
    assert_eq!(e.rounds as usize, samples.len());
    let last = samples[samples.len() - 1].figures().unwrap();
    assert!(last.bound_ns <= 5_000_000, "{last:?}");
}

/// A goal no round can meet: exactly `max_rounds`, and the destination
/// answered each of them.
#[test]
fn an_unmet_goal_stops_at_the_maximum() {
    let (addr, rx) = server(server_opts(key(KEY_A)), 1);
    let mut c = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let plan = RoundPlan {
        min_rounds: 2,
        max_rounds: 9,
        goal_bound_ns: 0,
        spacing: Duration::ZERO,
    };
    let (samples, e) = c.measure_until(&plan).unwrap();
    c.finish().unwrap();
    assert_eq!((samples.len(), e.rounds), (9, 9));
    assert_eq!(served(&rx).unwrap().rounds, 9);
}

#[test]
fn a_plan_outside_the_limits_is_refused_before_any_round() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let mut c = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    for (min_rounds, max_rounds) in [(0, 4), (5, 4), (1, MAX_ROUNDS + 1)] {
        let plan = RoundPlan {
            min_rounds,
            max_rounds,
            goal_bound_ns: 0,
            spacing: Duration::ZERO,
        };
        let err = c.measure_until(&plan).unwrap_err();
        assert!(matches!(err, PeerError::Protocol { .. }), "{err}");
    }
    // Nothing was sent: the session is still at round 0.
    let (_, e) = c.measure(1).unwrap();
    assert_eq!(e.rounds, 1);
    c.finish().unwrap();
}

#[test]
fn an_answer_later_than_the_timeout_is_an_error_in_bounded_time() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let rule = |to_server: bool, idx: usize, _: &[u8]| {
        if !to_server && idx == 1 {
            Action::Delay(Duration::from_millis(1500))
        } else {
            Action::Forward
        }
    };
    let p = Proxy::start(addr, Arc::new(rule));
    let opts = ClientOptions {
        timeout: Duration::from_millis(300),
        ..client_opts(key(KEY_A))
    };
    let mut c = PeerClient::connect(&p.addr.to_string(), &opts).unwrap();
    let t = Instant::now();
    let err = c.measure(4).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    assert!(matches!(err, PeerError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("no answer within 300 ms"), "{err}");
}

/// A peer that accepts the connection and never says a word.
#[test]
fn a_silent_peer_is_a_timeout_not_a_hang() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _held = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(s);
    });
    let opts = ClientOptions {
        timeout: Duration::from_millis(250),
        ..client_opts(key(KEY_A))
    };
    let t = Instant::now();
    let err = PeerClient::connect(&addr.to_string(), &opts).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(err.to_string().contains("no answer within 250 ms"), "{err}");
    assert!(err.to_string().contains("welcome"), "{err}");
}

#[test]
fn a_duplicated_message_is_refused_by_its_sequence_number() {
    let (addr, rx) = server(server_opts(key(KEY_A)), 1);
    let rule = |to_server: bool, idx: usize, _: &[u8]| {
        if to_server && idx == 2 {
            Action::Duplicate
        } else {
            Action::Forward
        }
    };
    let p = Proxy::start(addr, Arc::new(rule));
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let _ = c.measure(4);
    let err = served(&rx).unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::Sequence {
                expected: 3,
                got: 2
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("replayed, duplicated"), "{err}");
}

/// An answer altered in transit (its t2 changed): the MAC says so.
#[test]
fn a_tampered_message_is_refused_by_its_mac() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let rule = |to_server: bool, idx: usize, line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        if !to_server && idx == 1 {
            let at = text.find("\"t2_tai_ns\":").unwrap() + 12;
            let mut t = text.into_owned();
            let digit = t.as_bytes()[at + 3];
            let new = if digit == b'9' { "8" } else { "9" };
            t.replace_range(at + 3..at + 4, new);
            Action::Replace(t.into_bytes())
        } else {
            Action::Forward
        }
    };
    let p = Proxy::start(addr, Arc::new(rule));
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let err = c.measure(3).unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::MacMismatch {
                kind: "pong",
                seq: 1
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("altered in transit"), "{err}");
}

/// A ping recorded in one session, replayed into the next: the nonces
/// give it away.
#[test]
fn a_message_replayed_from_an_earlier_session_is_refused() {
    let (addr, rx) = server(server_opts(key(KEY_A)), 2);
    let p = Proxy::start(
        addr,
        Arc::new(|_: bool, _: usize, _: &[u8]| Action::Forward),
    );
    let mut c = PeerClient::connect(&p.addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    c.measure(2).unwrap();
    c.finish().unwrap();
    served(&rx).unwrap();
    let old_ping = p.lines(true)[1].clone();
    assert!(String::from_utf8_lossy(&old_ping).contains("\"ping\""));

    let stream = TcpStream::connect(addr).unwrap();
    let mut conn = Conn::new(stream, Duration::from_secs(5)).unwrap();
    let mut session = Session::source(key(KEY_A)).unwrap();
    let hello = session
        .seal(Body::Hello {
            key_id: session.key_id(),
        })
        .unwrap();
    conn.write_line(&hello).unwrap();
    let welcome = conn.read_line(MAX_MESSAGE_BYTES, "welcome").unwrap();
    assert!(matches!(session.open(&welcome), Ok(Body::Welcome { .. })));
    let mut replay = old_ping;
    replay.push(b'\n');
    conn.write_line(&replay).unwrap();
    let err = served(&rx).unwrap_err();
    assert!(matches!(err, PeerError::OtherSession { .. }), "{err}");
    assert!(err.to_string().contains("another session"), "{err}");
    // The source is told why.
    let told = conn.read_line(MAX_MESSAGE_BYTES, "error").unwrap();
    let told = session.open(&told).unwrap_err();
    assert!(told.to_string().contains("another session"), "{told}");
}

#[test]
fn different_keys_are_named_on_both_sides() {
    let (addr, rx) = server(server_opts(key(KEY_B)), 1);
    let err = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap_err();
    assert!(err.to_string().contains("different keys"), "{err}");
    let a = SidecarKey::from_bytes(KEY_A).unwrap();
    assert!(err.to_string().contains(a.id()), "{err}");
    let served = served(&rx).unwrap_err();
    assert!(matches!(served, PeerError::KeyMismatch { .. }), "{served}");
}

#[test]
fn a_keyless_side_meets_a_keyed_one_and_is_refused() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let err = PeerClient::connect(&addr.to_string(), &client_opts(None)).unwrap_err();
    assert!(err.to_string().contains("different keys"), "{err}");
    assert!(err.to_string().contains("none (no key)"), "{err}");

    let (addr, _rx) = server(server_opts(None), 1);
    let err = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap_err();
    assert!(err.to_string().contains("different keys"), "{err}");
}

#[test]
fn without_keys_on_either_side_the_exchange_runs() {
    let (addr, rx) = server(server_opts(None), 1);
    let mut c = PeerClient::connect(&addr.to_string(), &client_opts(None)).unwrap();
    let (_, e) = c.measure(2).unwrap();
    c.finish().unwrap();
    assert!(e.offset_ns.unsigned_abs() <= e.bound_ns);
    served(&rx).unwrap();
}

#[test]
fn a_closed_port_and_bad_addresses_are_named() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = PeerClient::connect(&format!("127.0.0.1:{port}"), &client_opts(None)).unwrap_err();
    assert!(
        err.to_string().contains("cannot connect to 127.0.0.1"),
        "{err}"
    );
    for bad in [
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        ":80",
        "127.0.0.1:x",
    ] {
        let err = PeerClient::connect(bad, &client_opts(None)).unwrap_err();
        assert!(matches!(err, PeerError::Address { .. }), "{bad}: {err}");
    }
}

// ---- the sidecar carried to the destination ----

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("clockcarry-peer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn body(vm: &str) -> SidecarBody {
    let quality = ClockQuality {
        synchronised: true,
        maxerror_ns: 1_000_000,
        esterror_ns: 1_000,
        leap_pending: LeapPending::None,
    };
    SidecarBody::new(
        vm,
        HostIdentity {
            hostname: "src".into(),
            boot_id: "boot".into(),
            kernel_release: "6.12".into(),
            tsc_khz: 2_445_411,
            tsc_flags: TscFlags::default(),
            clocksource: "tsc".into(),
        },
        HostSample {
            host_tsc: 1 << 40,
            tai_ns: 1_795_749_137_360_527_731,
            realtime_ns: 1_795_749_100_360_527_731,
            tai_offset_s: 37,
            uncertainty_ns: 20,
            quality,
        },
        VmClock {
            state: RunState::Running,
            tsc_khz: 2_445_411,
            vcpus: vec![VcpuOffset {
                id: 0,
                tsc_offset: -5,
            }],
            kvmclock: KvmClockSample {
                clock_ns: 1_000,
                flags: 14,
                realtime_ns: 1_795_749_100_360_527_731,
                host_tsc: 1 << 40,
            },
            pvti: None,
            pvti_source: None,
            tsc_scaling: None,
            capabilities: Capabilities::default(),
        },
    )
}

fn sealed(vm: &str, k: Option<&SidecarKey>) -> Vec<u8> {
    Sidecar::seal(body(vm), k).unwrap().to_json_pretty()
}

fn send(
    dir: &Dir,
    k: &[u8],
    vm: &str,
    bytes: &[u8],
) -> (Result<(), PeerError>, Result<SessionReport, PeerError>) {
    let opts = ServerOptions {
        state_dir: Some(dir.0.clone()),
        ..server_opts(key(k))
    };
    let (addr, rx) = server(opts, 1);
    let mut c = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let sent = c
        .send_sidecar(vm, bytes)
        .map(|_| ())
        .and_then(|()| c.finish());
    (sent, served(&rx))
}

#[test]
fn a_sidecar_is_validated_and_stored_0600() {
    let dir = Dir::new("store");
    let a = key(KEY_A);
    let bytes = sealed("web-1", a.as_ref());
    let (sent, report) = send(&dir, KEY_A, "web-1", &bytes);
    sent.unwrap();
    let stored = report.unwrap().stored.unwrap();
    assert_eq!(stored.path, dir.0.join("web-1.sidecar.json"));
    assert_eq!(std::fs::read(&stored.path).unwrap(), bytes);
    let mode = std::fs::metadata(&stored.path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    Sidecar::read_from_trusted(&stored.path, a.as_ref()).unwrap();
}

#[test]
fn a_sidecar_the_destination_would_refuse_is_not_stored() {
    let dir = Dir::new("refuse");
    let a = key(KEY_A);
    let good = sealed("web-1", a.as_ref());
    let unsealed = sealed("web-1", None);
    let altered = String::from_utf8(good.clone())
        .unwrap()
        .replace("\"tsc_offset\": -5", "\"tsc_offset\": -6")
        .into_bytes();
    let cases: [(&str, &[u8], &str); 4] = [
        ("../web-1", &good, "cannot name a file"),
        ("web-2", &good, "names VM \"web-2\""),
        ("web-1", &unsealed, "hmac_sha256"),
        ("web-1", &altered, "integrity.sha256"),
    ];
    for (vm, bytes, why) in cases {
        let (sent, report) = send(&dir, KEY_A, vm, bytes);
        let err = report.unwrap_err();
        assert!(err.to_string().contains(why), "{vm}: {err}");
        let told = sent.unwrap_err();
        assert!(told.to_string().contains(why), "{vm}: {told}");
        assert!(
            matches!(
                told,
                PeerError::PeerRefused {
                    authenticated: true,
                    ..
                }
            ),
            "{told}"
        );
    }
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn a_server_without_a_state_dir_refuses_sidecars() {
    let (addr, _rx) = server(server_opts(key(KEY_A)), 1);
    let mut c = PeerClient::connect(&addr.to_string(), &client_opts(key(KEY_A))).unwrap();
    let err = c
        .send_sidecar("web-1", &sealed("web-1", key(KEY_A).as_ref()))
        .unwrap_err();
    assert!(
        err.to_string().contains("does not accept sidecars"),
        "{err}"
    );
}
