//! The VMM API client's connect phase (issue 11, defect 8): against a
//! socket whose owner never accepts, or whose backlog is full, a request
//! gives up after the connect timeout, not after the whole request's
//! timeout; a VMM that takes the request and is merely slow to answer is
//! still waited for.

mod cli_support;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use cli_support::{run, TempDir};
use clockcarry::api::{ApiClient, ApiError, ApiOptions, ClockPut};
use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

const CONNECT: Duration = Duration::from_millis(200);
const REQUEST: Duration = Duration::from_secs(10);
/// Well under REQUEST: a wait bounded by CONNECT ends long before.
const BOUND: Duration = Duration::from_secs(3);

/// A listening Unix socket at `path` with this `listen(2)` backlog, which
/// nobody ever accepts from (std's listener has a backlog of its own
/// choosing).
fn listener(path: &Path, backlog: i32) -> OwnedFd {
    let owned = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = UnixAddr::new(path).expect("socket path");
    bind(owned.as_raw_fd(), &addr).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    listen(&owned, Backlog::new(backlog).expect("backlog")).expect("listen");
    owned
}

fn client(path: &Path) -> ApiClient {
    ApiClient::new(
        path,
        ApiOptions {
            connect_timeout: CONNECT,
            request_timeout: REQUEST,
        },
    )
}

#[track_caller]
fn connect_timeout(err: &ApiError, elapsed: Duration) {
    assert!(
        elapsed < BOUND,
        "waited {elapsed:?} (connect timeout {CONNECT:?}, request timeout {REQUEST:?}): {err}"
    );
    assert!(
        elapsed >= CONNECT - Duration::from_millis(20),
        "{elapsed:?}"
    );
    match err {
        ApiError::Timeout {
            stage, timeout_ms, ..
        } => {
            assert!(stage.starts_with("connecting"), "{err}");
            assert_eq!(*timeout_ms, 200, "{err}");
        }
        other => panic!("not a connect timeout: {other}"),
    }
}

#[test]
fn a_listener_that_never_accepts_costs_the_connect_timeout() {
    let dir = TempDir::new("never-accepts");
    let path = dir.join("vmm.sock");
    let _l = listener(&path, 16);
    let t = Instant::now();
    let err = client(&path).get_vm_clock().expect_err("nobody answers");
    connect_timeout(&err, t.elapsed());

    // A PUT alike; its bytes sit unread in the socket, where a VMM that
    // wakes up could still read them: it may have been sent.
    let put = ClockPut {
        tsc_khz: None,
        tsc_offsets: vec![1, 2],
        kvmclock: None,
        arm: None,
    };
    let t = Instant::now();
    let err = client(&path)
        .put_vm_clock(&put)
        .expect_err("nobody answers");
    connect_timeout(&err, t.elapsed());
    assert!(err.request_sent(), "{err}");
}

/// A non-blocking `connect(2)` to `path`: the connected socket, or the
/// error (`EAGAIN` once the listener's backlog is full).
fn try_connect(path: &Path) -> std::io::Result<OwnedFd> {
    let owned = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = UnixAddr::new(path).expect("socket path");
    connect(owned.as_raw_fd(), &addr)?;
    Ok(owned)
}

#[test]
fn a_full_backlog_costs_the_connect_timeout() {
    let dir = TempDir::new("backlog");
    let path = dir.join("vmm.sock");
    let _l = listener(&path, 0);
    // Fill the backlog with connections that are never accepted.
    let mut held = Vec::new();
    loop {
        match try_connect(&path) {
            Ok(fd) => held.push(fd),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(held.len() < 64, "the backlog never filled");
    }
    let t = Instant::now();
    let err = client(&path).get_vm_clock().expect_err("backlog full");
    connect_timeout(&err, t.elapsed());
    assert!(!err.request_sent(), "{err}");
}

#[test]
fn a_vmm_that_takes_the_request_is_waited_for_beyond_the_connect_timeout() {
    let dir = TempDir::new("slow");
    let path = dir.join("vmm.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "request ended early");
            got.extend_from_slice(&buf[..n]);
        }
        // Four connect timeouts before the answer.
        std::thread::sleep(Duration::from_millis(800));
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .expect("answer");
    });
    let t = Instant::now();
    client(&path).ping().expect("a slow answer is an answer");
    assert!(t.elapsed() >= Duration::from_millis(800));
    server.join().expect("server");
}

/// The command line as the issue reports it.
#[test]
fn capture_with_connect_timeout_against_a_listener_that_never_accepts() {
    let dir = TempDir::new("cli-never-accepts");
    let path = dir.join("vmm.sock");
    let _l = listener(&path, 16);
    let out = dir.join("x.json").display().to_string();
    let t = Instant::now();
    run(
        dir.path(),
        &[
            "capture",
            "--api-socket",
            &path.display().to_string(),
            "--vm",
            "v",
            "-o",
            &out,
            "--connect-timeout",
            "200ms",
            "--api-timeout",
            "10s",
        ],
    )
    .expect(4)
    .stderr_has("within 200 ms")
    .stderr_has("connecting");
    assert!(t.elapsed() < BOUND, "{:?}", t.elapsed());
}
