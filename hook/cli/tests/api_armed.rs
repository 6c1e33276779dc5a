//! `ApiClient::put_armed`, the request that carries an armed clock, against
//! one-shot VMMs: a 200 with the typed reply is success; a 204, or a 200
//! without the reply, means the VMM did not apply the clock (a VMM that does
//! not know `clock`) and is an error saying so; a typed 400 is a refusal
//! carrying the VMM's outcome.

mod cli_support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use cli_support::TempDir;
use clockcarry::api::{ApiClient, ApiError, ApiOptions, ArmedRequest, PutOutcome};

/// Answers one request on `path` with `answer` (status line, headers and
/// body); returns the request it read.
fn one_shot(path: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
    let l = std::os::unix::net::UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then the body Content-Length announces.
        loop {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "request ended early");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length: ")
                            .or(l.strip_prefix("Content-Length: "))
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    break;
                }
            }
        }
        s.write_all(answer.as_bytes()).expect("answer");
        String::from_utf8_lossy(&got).to_string()
    })
}

fn client(path: &Path) -> ApiClient {
    ApiClient::new(
        path,
        ApiOptions {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
        },
    )
}

const BODY: &[u8] = br#"{"receiver_url":"tcp:0.0.0.0:6000","resume":true,"clock":{}}"#;

#[test]
fn a_typed_200_is_the_clock_applied() {
    let dir = TempDir::new("armed-200");
    let path = dir.join("vmm.sock");
    let reply = r#"{"outcome":"applied","kvmclock_request":"follow_pvti","kvmclock_method":"set_clock","kvmclock_error_ns":12,"kvmclock_within_target":true,"kvmclock_tries":2,"tsc_khz_set":null,"tsc_offsets_applied":[5],"tsc_offsets_read_back":[],"tsc_offsets_effective":true,"refused":[]}"#;
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        )
        .into_boxed_str(),
    );
    let server = one_shot(&path, answer);
    let a = client(&path)
        .put_armed(ArmedRequest::ReceiveMigration, BODY)
        .expect("applied");
    assert_eq!(a.status, 200);
    assert_eq!(a.kvmclock_error_ns(), Some(12));
    let request = server.join().expect("server");
    assert!(
        request.starts_with("PUT /api/v1/vm.receive-migration "),
        "{request}"
    );
    assert!(
        request.ends_with(std::str::from_utf8(BODY).unwrap()),
        "{request}"
    );
}

#[test]
fn a_204_means_the_vmm_did_not_apply_the_clock() {
    let dir = TempDir::new("armed-204");
    let path = dir.join("vmm.sock");
    let server = one_shot(
        &path,
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let err = client(&path)
        .put_armed(ArmedRequest::Restore, BODY)
        .expect_err("a 204 is not the armed clock applied");
    let text = err.to_string();
    assert!(
        text.contains("did not report the armed clock applied"),
        "{text}"
    );
    assert!(text.contains("vm.restore"), "{text}");
    server.join().expect("server");
}

#[test]
fn a_typed_400_is_a_refusal_with_its_outcome() {
    let dir = TempDir::new("armed-400");
    let path = dir.join("vmm.sock");
    let server = one_shot(
        &path,
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 120\r\nConnection: close\r\n\r\n{\"outcome\":\"refused\",\"messages\":[\"armed clock refused: arm.planned_tai_ns: the armed clock is stale: planned 9 ns ago\"]}",
    );
    let err = client(&path)
        .put_armed(ArmedRequest::Restore, BODY)
        .expect_err("refused");
    match &err {
        ApiError::Vmm {
            status, failure, ..
        } => {
            assert_eq!(*status, 400);
            let f = failure.as_ref().expect("typed failure");
            assert_eq!(f.outcome, PutOutcome::Refused);
            assert!(f.messages[0].contains("arm.planned_tai_ns"), "{f:?}");
        }
        other => panic!("expected the VMM's answer, got {other}"),
    }
    server.join().expect("server");
}
