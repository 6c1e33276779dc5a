//! The suite against a fake VMM in this test (a Unix-socket HTTP server
//! with the vm.clock API and no KVM): conformant, it passes every check;
//! with one flaw at a time, exactly the checks that flaw breaks fail and
//! the suite exits 1. So the suite can fail, and says where. No /dev/kvm
//! needed.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use clockcarry::model::Pvti;
use clockcarry::pvclock::pvclock_read;
use clockcarry::request::ApplyRequest;
use clockcarry::vmclock_api::{
    ClockPut, KvmClockPut, PutApplied, PutFailure, PutOutcome, RollbackOutcome, RollbackStep,
};
use serde_json::{json, Value};

const SUITE: &str = env!("CARGO_BIN_EXE_clockcarry-conformance");
const INERT: &str = "TSC offsets are inert on this host";
const VCPUS: usize = 2;
const TSC_KHZ: u32 = 2_600_000;
/// How far above a followed line the fake puts kvm-clock, ns.
const FAKE_ERROR_NS: u64 = 20;
const REFUSALS: [&str; 13] = [
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
];

/// What the fake gets wrong.
#[derive(Debug, Clone, Copy, Default)]
struct Flaws {
    /// Every failure answered CH-style, a bare JSON array of strings.
    untyped_failures: bool,
    /// PUT vm.clock accepted while the VM runs.
    accepts_put_while_running: bool,
    /// vm.resume sets a saved clock over the PUT's (kvm-clock 1 ms back).
    resume_sets_its_clock: bool,
    /// Offset writes ignored, but capabilities.tsc_offset says true.
    claims_inert_offsets_effective: bool,
    /// Offset writes ignored, and said so (a host like this project's).
    inert_offsets: bool,
    /// A follow_pvti PUT lands 200 ns below the line and says within target.
    lands_below_the_line: bool,
}

struct Fake {
    flaws: Flaws,
    running: bool,
    ran: bool,
    offsets: Vec<i64>,
    /// The line kvm-clock follows since a follow_pvti PUT.
    followed: Option<Pvti>,
    /// kvm-clock moved off the line by the fake's flaws, ns.
    shift_ns: i64,
    host_tsc: u64,
}

const PVTI: Pvti = Pvti {
    tsc_timestamp: 6_427_244_366_695,
    system_time: 5_308_040,
    tsc_to_system_mul: 3_303_820_996,
    tsc_shift: -1,
    flags: 0,
};

impl Fake {
    fn effective_offsets(&self) -> bool {
        !self.flaws.inert_offsets && !self.flaws.claims_inert_offsets_effective
    }

    fn get(&mut self) -> (u16, String) {
        self.host_tsc += 1_000_000;
        let kvmclock = match self.followed {
            Some(line) => {
                let tsc = self
                    .host_tsc
                    .wrapping_add(self.offsets.first().copied().unwrap_or(0) as u64);
                let clock = pvclock_read(&line, tsc) + FAKE_ERROR_NS;
                json!({"clock": clock.saturating_add_signed(self.shift_ns), "flags": 14,
                       "realtime": 1_796_191_100_085_511_564u64, "host_tsc": self.host_tsc})
            }
            None => json!({"clock": 32_410_637u64, "flags": 0, "realtime": 0, "host_tsc": 0}),
        };
        let vcpus: Vec<Value> = self
            .offsets
            .iter()
            .enumerate()
            .map(|(i, o)| json!({"id": i, "tsc_offset": o}))
            .collect();
        let body = json!({
            "state": if self.running { "Running" } else { "Paused" },
            "tsc_khz": TSC_KHZ, "vcpus": vcpus, "kvmclock": kvmclock,
            "pvti": {"tsc_timestamp": PVTI.tsc_timestamp, "system_time": PVTI.system_time,
                     "tsc_to_system_mul": PVTI.tsc_to_system_mul, "tsc_shift": PVTI.tsc_shift,
                     "flags": PVTI.flags},
            "pvti_source": "guest_memory", "tsc_scaling": null,
            "capabilities": {"tsc_offset": !self.flaws.inert_offsets, "clock_guest": false,
                             "tsc_scaling": false, "adjust_clock": 14}});
        (200, body.to_string())
    }

    fn failure(&self, f: PutFailure) -> (u16, String) {
        let status = f.status();
        if self.flaws.untyped_failures {
            return (status, json!(f.messages).to_string());
        }
        (status, serde_json::to_string(&f).unwrap())
    }

    fn refused(&self, why: &str) -> (u16, String) {
        self.failure(PutFailure::untouched(
            PutOutcome::Refused,
            vec!["Error from API".into(), why.into()],
        ))
    }

    fn put(&mut self, body: Option<&[u8]>) -> (u16, String) {
        let Some(bytes) = body else {
            return self.refused("Bad Request");
        };
        let put: ClockPut = match serde_json::from_slice(bytes) {
            Ok(p) => p,
            Err(e) => return self.refused(&e.to_string()),
        };
        let wrong_state = if self.running && !self.flaws.accepts_put_while_running {
            Some("VM is not paused")
        } else if self.ran && !self.running {
            Some("the vCPUs have run")
        } else {
            None
        };
        if let Some(why) = wrong_state {
            return self.failure(PutFailure::untouched(
                PutOutcome::WrongState,
                vec![why.into()],
            ));
        }
        if let Err(e) = ApplyRequest::from(&put).validate(VCPUS) {
            return self.refused(&e.to_string());
        }
        if put.tsc_khz.is_some_and(|k| k != TSC_KHZ) {
            return self.failure(PutFailure {
                outcome: PutOutcome::RolledBack,
                messages: vec!["KVM_SET_TSC_KHZ on vCPU 0: errno 22".into()],
                failed_step: Some("frequency".into()),
                rollback: Some(RollbackOutcome {
                    complete: true,
                    steps: vec![RollbackStep {
                        step: "frequency".into(),
                        ok: true,
                        detail: "rate restored on 1 vCPUs".into(),
                    }],
                }),
            });
        }
        let moves = self.effective_offsets();
        if moves {
            self.offsets = put.tsc_offsets.clone();
        }
        let (request, method, error, within) = match put.kvmclock {
            Some(KvmClockPut::FollowPvti(f)) => {
                self.followed = Some(f.pvti());
                let mut error = FAKE_ERROR_NS as i64;
                if self.flaws.lands_below_the_line {
                    self.shift_ns = -200;
                    error = -180;
                }
                ("follow_pvti", "set_clock", Some(error), Some(true))
            }
            Some(KvmClockPut::SetClock(_)) => ("set_clock", "set_clock", None, None),
            None => ("none", "none", None, None),
        };
        let reply = PutApplied {
            outcome: PutOutcome::Applied,
            kvmclock_request: request.into(),
            kvmclock_method: method.into(),
            kvmclock_error_ns: error,
            kvmclock_within_target: within,
            kvmclock_tries: u32::from(error.is_some()),
            tsc_khz_set: None,
            tsc_offsets_applied: put.tsc_offsets.clone(),
            tsc_offsets_read_back: self.offsets.clone(),
            // As a VMM trusting its capability probe reports it.
            tsc_offsets_effective: !self.flaws.inert_offsets && self.offsets == put.tsc_offsets,
            refused: vec![],
        };
        (200, serde_json::to_string(&reply).unwrap())
    }

    fn handle(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
        let chain = |m: &str| json!(["Error from API", m]).to_string();
        match (method, path) {
            ("GET", "/api/v1/vmm.ping") => (200, json!({"build_version": "fake"}).to_string()),
            ("GET", "/api/v1/vm.clock") => self.get(),
            ("PUT", "/api/v1/vm.clock") => self.put(body),
            ("PUT", "/api/v1/vm.resume") if !self.running => {
                self.running = true;
                self.ran = true;
                if self.flaws.resume_sets_its_clock {
                    self.shift_ns -= 1_000_000;
                }
                (204, String::new())
            }
            ("PUT", "/api/v1/vm.pause") if self.running => {
                self.running = false;
                (204, String::new())
            }
            ("PUT", "/api/v1/vm.resume" | "/api/v1/vm.pause") => (500, chain("wrong state")),
            _ => (404, json!(["Not Found"]).to_string()),
        }
    }
}

fn serve(stream: &mut UnixStream, fake: &Mutex<Fake>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let (head_len, content_length) = loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return;
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while got.len() < head_len + content_length {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got[..head_len]).to_string();
    let mut first = head.split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let body = got.get(head_len..head_len + content_length).unwrap_or(&[]);
    let body = (!body.is_empty()).then_some(body);
    let (status, answer) = fake.lock().unwrap().handle(method, path, body);
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{answer}",
        answer.len()
    );
}

/// Starts a fake VMM with `flaws`; its socket.
fn start(name: &str, flaws: Flaws) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "clockcarry-conformance-fake-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let fake = Arc::new(Mutex::new(Fake {
        flaws,
        running: false,
        ran: false,
        offsets: vec![0; VCPUS],
        followed: None,
        shift_ns: 0,
        host_tsc: 6_440_628_838_717,
    }));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            serve(&mut stream, &fake);
        }
    });
    socket
}

/// Runs the suite on `socket` (`--json`): exit code and (check, result,
/// reason) per check.
fn run(socket: &PathBuf) -> (i32, Vec<(String, String, String)>) {
    let out = Command::new(SUITE)
        .arg("--api-socket")
        .arg(socket)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let checks = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("check").is_some())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            (s("check"), s("result"), s("reason"))
        })
        .collect();
    (out.status.code().unwrap_or(-1), checks)
}

fn failed(checks: &[(String, String, String)]) -> BTreeSet<String> {
    checks
        .iter()
        .filter(|(_, r, _)| r == "fail")
        .map(|(c, _, _)| c.clone())
        .collect()
}

fn expect_only_failures(name: &str, flaws: Flaws, expected: &[&str]) {
    let (code, checks) = run(&start(name, flaws));
    assert_eq!(checks.len(), 26, "{checks:?}");
    let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(failed(&checks), want, "{checks:#?}");
    assert_eq!(code, 1, "the suite exits 1 on a failure");
}

#[test]
fn a_conformant_fake_passes_every_check() {
    let (code, checks) = run(&start("good", Flaws::default()));
    assert_eq!(checks.len(), 26);
    for (c, r, why) in &checks {
        assert_eq!(r, "pass", "{c}: {why}");
    }
    assert_eq!(code, 0);
}

#[test]
fn inert_offsets_skip_loudly_and_pass_nothing_silently() {
    let flaws = Flaws {
        inert_offsets: true,
        ..Flaws::default()
    };
    let (code, checks) = run(&start("inert", flaws));
    let skipped: Vec<_> = checks.iter().filter(|(_, r, _)| r == "skip").collect();
    assert_eq!(skipped.len(), 1, "{checks:#?}");
    assert_eq!(skipped[0].0, "offsets-move");
    assert!(skipped[0].2.starts_with(INERT), "{}", skipped[0].2);
    assert!(failed(&checks).is_empty(), "{checks:#?}");
    assert_eq!(code, 0);
}

#[test]
fn untyped_failures_fail_every_refusal_and_wrong_state() {
    let flaws = Flaws {
        untyped_failures: true,
        ..Flaws::default()
    };
    let mut expected: Vec<&str> = REFUSALS.to_vec();
    expected.extend([
        "kernel-refusal",
        "put-running-wrong-state",
        "put-after-run-wrong-state",
    ]);
    expect_only_failures("untyped", flaws, &expected);
}

#[test]
fn accepting_a_put_while_running_fails() {
    let flaws = Flaws {
        accepts_put_while_running: true,
        ..Flaws::default()
    };
    expect_only_failures("running", flaws, &["put-running-wrong-state"]);
}

#[test]
fn a_resume_that_sets_its_own_clock_fails() {
    let flaws = Flaws {
        resume_sets_its_clock: true,
        ..Flaws::default()
    };
    expect_only_failures("resume", flaws, &["resume-kept-kvmclock"]);
}

#[test]
fn a_capability_that_lies_about_offsets_fails() {
    let flaws = Flaws {
        claims_inert_offsets_effective: true,
        ..Flaws::default()
    };
    expect_only_failures("caps", flaws, &["offsets-move"]);
}

#[test]
fn kvm_clock_below_the_line_fails() {
    let flaws = Flaws {
        lands_below_the_line: true,
        ..Flaws::default()
    };
    expect_only_failures("below", flaws, &["put-follow-pvti"]);
}

#[test]
fn a_missing_socket_fails_every_check() {
    let (code, checks) = run(&PathBuf::from("/nonexistent/clockcarry-conformance.sock"));
    assert_eq!(checks.len(), 26);
    assert_eq!(failed(&checks).len(), 26);
    assert!(checks[0].2.contains("cannot connect"), "{}", checks[0].2);
    assert_eq!(code, 1);
}
