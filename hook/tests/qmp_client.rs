//! QMP client conformance against a scripted QEMU (tests/support/fake_qmp.rs):
//! the greeting and capabilities negotiation, commands matched by id with
//! events interleaved, error classes, a stock QEMU without the series'
//! commands, and hostile answers (oversized, not JSON, too deep, wrong id,
//! silence, a closed connection), each ending in an error that names what
//! went wrong, within the time asked.

#[path = "support/fake_qmp.rs"]
mod fake_qmp;

use std::time::{Duration, Instant};

use clockcarry::model::{PvtiSource, RunState};
use clockcarry::qmp::clock::{self, QmpSetOutcome};
use clockcarry::qmp::{QmpError, QmpOptions, QmpSession};
use clockcarry::vmclock_api::{ClockPut, FollowPvti, KvmClockPut, PutOutcome, SetClockPut};
use fake_qmp::{commands, greeting, guest_clock, line, patched_then, FakeQmp, Step};
use serde_json::{json, Value};

fn opts(timeout_ms: u64) -> QmpOptions {
    QmpOptions {
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(timeout_ms),
        ..QmpOptions::default()
    }
}

#[test]
fn negotiates_and_reads_the_guest_clock_between_events() {
    let event = |name: &str| {
        Step::Send(
            json!({"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}),
        )
    };
    let fake = FakeQmp::start(
        "good",
        patched_then(vec![
            event("STOP"),
            Step::Custom(
                "x-query-guest-clock",
                Box::new(|req: &Value| {
                    // An event between the command and its answer.
                    let mut b = line(&json!({"event": "RTC_CHANGE", "data": {"offset": 0}}));
                    b.extend(line(&json!({"return": guest_clock(true), "id": req["id"]})));
                    b
                }),
            ),
        ]),
    );
    let mut s = QmpSession::connect(&fake.socket, opts(2000)).expect("connect");
    assert_eq!(
        s.greeting().version(),
        "7.2.0 (Debian 1:7.2+dfsg-7+deb12u18)"
    );
    assert_eq!(s.greeting().capabilities, vec!["oob".to_string()]);
    let (vm, extras) = clock::query(&mut s).expect("query");
    assert_eq!(vm.state, RunState::Paused);
    assert_eq!(vm.tsc_khz, 2_000_000);
    assert_eq!(vm.offsets(), vec![-123_456_789, -123_456_789]);
    assert_eq!(vm.kvmclock.host_tsc, 138_242_420_139_004);
    assert_eq!(vm.pvti.expect("pvti").tsc_to_system_mul, 2_147_483_648);
    assert_eq!(vm.pvti_source, Some(PvtiSource::GuestMemory));
    assert!(vm.capabilities.tsc_offset_effective);
    assert!(extras.settable);
    assert_eq!(extras.last_set, None);
    assert_eq!(s.events(), ["STOP".to_string(), "RTC_CHANGE".to_string()]);
    drop(s);
    let requests = fake.finish().expect("script");
    // No capability enabled; every command carries a distinct id.
    assert_eq!(requests[0], json!({"execute": "qmp_capabilities", "id": 1}));
    let ids: Vec<_> = requests.iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, vec![json!(1), json!(2), json!(3)]);
}

#[test]
fn a_stock_qemu_is_refused_naming_the_missing_command() {
    let fake = FakeQmp::start(
        "stock",
        vec![
            Step::Send(greeting()),
            Step::Reply("qmp_capabilities", json!({})),
            Step::Reply("query-commands", commands(&[])),
        ],
    );
    let mut s = QmpSession::connect(&fake.socket, opts(2000)).expect("connect");
    let err = clock::query(&mut s).expect_err("stock QEMU");
    assert!(matches!(err, QmpError::MissingCommand { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("x-query-guest-clock"), "{text}");
    assert!(text.contains("7.2.0"), "{text}");
    assert!(!err.request_sent());
}

#[test]
fn error_answers_keep_their_class_and_text() {
    let fake = FakeQmp::start(
        "class",
        patched_then(vec![Step::Error(
            "x-query-guest-clock",
            "GenericError",
            "this VM has no kvmclock device",
        )]),
    );
    let mut s = QmpSession::connect(&fake.socket, opts(2000)).expect("connect");
    match clock::query(&mut s).expect_err("error answer") {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "x-query-guest-clock");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "this VM has no kvmclock device");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_set_is_typed_by_the_outcome_qemu_recorded() {
    for (outcome, step, want) in [
        ("wrong-state", None, PutOutcome::WrongState),
        ("refused", None, PutOutcome::Refused),
        ("rolled-back", Some("kvmclock"), PutOutcome::RolledBack),
        (
            "rollback-incomplete",
            Some("offsets"),
            PutOutcome::RollbackIncomplete,
        ),
    ] {
        let mut after = guest_clock(false);
        after["last-set"] = json!(outcome);
        if let Some(st) = step {
            after["last-set-failed-step"] = json!(st);
        }
        let fake = FakeQmp::start(
            &format!("set-{outcome}"),
            patched_then(vec![
                Step::Error("x-set-guest-clock", "GenericError", "it failed"),
                Step::Reply("x-query-guest-clock", after),
            ]),
        );
        let mut s = QmpSession::connect(&fake.socket, opts(2000)).expect("connect");
        let put = ClockPut {
            tsc_khz: None,
            tsc_offsets: vec![1, 1],
            kvmclock: None,
            arm: None,
        };
        let failed = clock::set(&mut s, &put).expect_err("set fails");
        let f = failed.failure.as_ref().expect("typed outcome");
        assert_eq!(f.outcome, want, "{outcome}");
        assert_eq!(f.failed_step.as_deref(), step);
        assert!(f.messages[0].contains("it failed"));
        assert!(failed.error.request_sent());
    }
}

#[test]
fn set_arguments_are_the_series_names() {
    let follow = ClockPut {
        tsc_khz: Some(2_000_000),
        tsc_offsets: vec![-5, -5],
        kvmclock: Some(KvmClockPut::FollowPvti(FollowPvti {
            tsc_timestamp: 10,
            system_time: 20,
            tsc_to_system_mul: 30,
            tsc_shift: -1,
            flags: 1,
            max_error_ns: 50,
        })),
        arm: None,
    };
    assert_eq!(
        clock::set_arguments(&follow).expect("follow"),
        json!({"tsc-khz": 2_000_000, "tsc-offsets": [-5, -5],
               "kvmclock": {"method": "follow-pvti", "tsc-timestamp": 10, "system-time": 20,
                            "tsc-to-system-mul": 30, "tsc-shift": -1, "flags": 1,
                            "max-error-ns": 50}})
    );
    let raw = ClockPut {
        tsc_khz: None,
        tsc_offsets: vec![7],
        kvmclock: Some(KvmClockPut::SetClock(SetClockPut {
            clock: 1,
            realtime: 2,
            flags: 4,
        })),
        arm: None,
    };
    assert_eq!(
        clock::set_arguments(&raw).expect("raw"),
        json!({"tsc-offsets": [7], "kvmclock": {"method": "set-clock", "clock": 1, "realtime": 2, "flags": 4}})
    );
}

#[test]
fn a_set_answer_is_checked_against_the_request() {
    let put = ClockPut {
        tsc_khz: None,
        tsc_offsets: vec![3, 3],
        kvmclock: None,
        arm: None,
    };
    let good = json!({"kvmclock-request": "follow-pvti", "kvmclock-method": "set-clock",
                      "kvmclock-error-ns": 21, "kvmclock-within-target": true, "kvmclock-tries": 2,
                      "tsc-offsets-applied": [3, 3], "tsc-offsets-read-back": [3, 3],
                      "tsc-offsets-effective": true, "refused": []});
    let answer = clock::parse_set_result(&good, &put).expect("good");
    let reply = answer.reply.expect("typed");
    assert_eq!(reply.kvmclock_method, "set_clock");
    assert_eq!(reply.kvmclock_request, "follow_pvti");
    assert_eq!(reply.kvmclock_error_ns, Some(21));
    let mut other = good.clone();
    other["tsc-offsets-applied"] = json!([3, 4]);
    let e = clock::parse_set_result(&other, &put).expect_err("not what was sent");
    assert!(e.contains("tsc-offsets-applied"), "{e}");
    let mut short = good;
    short["tsc-offsets-read-back"] = json!([3]);
    assert!(clock::parse_set_result(&short, &put).is_err());
}

#[test]
fn bad_values_in_a_query_answer_are_refused_naming_the_field() {
    let mut zero = guest_clock(true);
    zero["tsc-khz"] = json!(0);
    let mut missing = guest_clock(true);
    missing.as_object_mut().expect("object").remove("vcpus");
    let mut typed = guest_clock(true);
    typed["vcpus"][1]["tsc-offset"] = json!("-1");
    let mut lonely = guest_clock(true);
    lonely
        .as_object_mut()
        .expect("object")
        .remove("pvti-source");
    for (what, v, field) in [
        ("rate 0", zero, "tsc_khz"),
        ("no vcpus", missing, "vcpus"),
        ("offset a string", typed, "vcpus[1].tsc-offset"),
        ("pvti without source", lonely, "pvti-source"),
    ] {
        let e = clock::parse_guest_clock(&v).expect_err(what);
        assert!(e.contains(field), "{what}: {e}");
    }
    // Members a later QEMU adds are ignored.
    let mut newer = guest_clock(true);
    newer["x-future"] = json!({"anything": 1});
    assert!(clock::parse_guest_clock(&newer).is_ok());
    // An armed body has no QMP form.
    let armed = ClockPut {
        tsc_khz: None,
        tsc_offsets: vec![0],
        kvmclock: None,
        arm: Some(clockcarry::vmclock_api::arm::ArmCheck {
            planned_host_tsc: 1,
            planned_tai_ns: 1,
            valid_for_ns: 1,
            vcpu_count: 1,
            capture_guest_tsc: 1,
            elapsed_at_plan_ns: 0,
            error_bound_ns: 0,
        }),
    };
    assert!(clock::set_arguments(&armed).is_err());
    let _ = QmpSetOutcome::Applied;
}

/// Connects and runs x-query-guest-clock against `steps` after the
/// patched start; the error and how long it took.
fn query_error(
    tag: &str,
    steps: Vec<Step>,
    timeout_ms: u64,
    max_bytes: usize,
) -> (QmpError, Duration) {
    let fake = FakeQmp::start(tag, patched_then(steps));
    let options = QmpOptions {
        max_message_bytes: max_bytes,
        max_events: 8,
        ..opts(timeout_ms)
    };
    let mut s = QmpSession::connect(&fake.socket, options).expect("connect");
    let t0 = Instant::now();
    let err = clock::query(&mut s).expect_err(tag);
    (err, t0.elapsed())
}

#[test]
fn malformed_answers_end_in_named_errors() {
    // Larger than the limit, with no end in sight.
    let (e, _) = query_error(
        "big",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|_: &Value| {
                let mut b = b"{\"return\": \"".to_vec();
                b.extend(std::iter::repeat_n(b'a', 300_000));
                b
            }),
        )],
        5000,
        64 * 1024,
    );
    assert!(
        matches!(e, QmpError::Protocol { .. }) && e.to_string().contains("longer than 65536"),
        "{e}"
    );

    // Not JSON.
    let (e, _) = query_error(
        "garbage",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|_: &Value| b"{\"return\": nope}\r\n".to_vec()),
        )],
        2000,
        1 << 20,
    );
    assert!(e.to_string().contains("not JSON"), "{e}");

    // Not an object at all.
    let (e, _) = query_error(
        "array",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|_: &Value| b"[1, 2]\r\n".to_vec()),
        )],
        2000,
        1 << 20,
    );
    assert!(e.to_string().contains("do not start a JSON object"), "{e}");

    // Nested beyond any answer's need.
    let (e, _) = query_error(
        "deep",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|req: &Value| {
                let mut b = format!("{{\"id\": {}, \"return\": ", req["id"]).into_bytes();
                b.extend(std::iter::repeat_n(b'[', 10_000));
                b.extend(std::iter::repeat_n(b']', 10_000));
                b.extend(b"}\r\n");
                b
            }),
        )],
        2000,
        1 << 20,
    );
    assert!(e.to_string().contains("not JSON"), "{e}");
}

#[test]
fn answers_out_of_turn_or_missing_end_in_named_errors() {
    // An answer for another id.
    let (e, _) = query_error(
        "id",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|_: &Value| line(&json!({"return": guest_clock(true), "id": 999}))),
        )],
        2000,
        1 << 20,
    );
    assert!(e.to_string().contains("id 999"), "{e}");

    // Neither return nor error.
    let (e, _) = query_error(
        "empty",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|req: &Value| line(&json!({"id": req["id"]}))),
        )],
        2000,
        1 << 20,
    );
    assert!(e.to_string().contains("neither"), "{e}");

    // An event storm instead of the answer.
    let (e, _) = query_error(
        "storm",
        vec![Step::Custom(
            "x-query-guest-clock",
            Box::new(|_: &Value| {
                (0..20)
                    .flat_map(|_| line(&json!({"event": "RTC_CHANGE"})))
                    .collect()
            }),
        )],
        2000,
        1 << 20,
    );
    assert!(e.to_string().contains("more than 8 events"), "{e}");

    // Silence: the command timeout, not longer.
    let (e, took) = query_error(
        "silent",
        vec![Step::Swallow("x-query-guest-clock")],
        300,
        1 << 20,
    );
    assert!(
        matches!(
            e,
            QmpError::Timeout {
                request_sent: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Closed half way through the answer.
    let (e, _) = query_error(
        "closed",
        vec![
            Step::Custom(
                "x-query-guest-clock",
                Box::new(|_: &Value| b"{\"return\": {\"state\"".to_vec()),
            ),
            Step::Close,
        ],
        2000,
        1 << 20,
    );
    assert!(
        matches!(
            e,
            QmpError::Closed {
                request_sent: true,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn answers_split_anyhow_or_pretty_printed_are_read() {
    let fake = FakeQmp::start(
        "split",
        vec![
            Step::Raw(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 1, \"minor\": 2, ".to_vec()),
            Step::Sleep(Duration::from_millis(30)),
            Step::Raw(b"\"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\r\n".to_vec()),
            Step::Reply("qmp_capabilities", json!({})),
            Step::Reply("query-commands", commands(&["x-query-guest-clock"])),
            Step::Custom(
                "x-query-guest-clock",
                Box::new(|req: &Value| {
                    serde_json::to_string_pretty(
                        &json!({"return": guest_clock(false), "id": req["id"]}),
                    )
                    .expect("pretty")
                    .into_bytes()
                }),
            ),
        ],
    );
    let mut s = QmpSession::connect(&fake.socket, opts(2000)).expect("connect");
    assert_eq!(s.greeting().version(), "7.2.1");
    let (vm, extras) = clock::query(&mut s).expect("pretty answer");
    assert_eq!(vm.vcpus.len(), 2);
    assert!(!extras.settable);
}

#[test]
fn a_monitor_that_is_not_qmp_or_never_greets() {
    let fake = FakeQmp::start(
        "hmp",
        vec![Step::Raw(
            b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ".to_vec(),
        )],
    );
    let e = QmpSession::connect(&fake.socket, opts(1000)).expect_err("HMP");
    assert!(e.to_string().contains("do not start a JSON object"), "{e}");

    let fake = FakeQmp::start("nogreet", vec![Step::Send(json!({"hello": 1}))]);
    let e = QmpSession::connect(&fake.socket, opts(1000)).expect_err("not a greeting");
    assert!(e.to_string().contains("HMP monitor"), "{e}");

    let fake = FakeQmp::start("mute", vec![Step::Sleep(Duration::from_secs(3))]);
    let t0 = Instant::now();
    let e = QmpSession::connect(&fake.socket, opts(300)).expect_err("mute");
    assert!(
        matches!(
            e,
            QmpError::Timeout {
                greeting: true,
                request_sent: false,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("another client"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    let fake = FakeQmp::start(
        "caps",
        vec![
            Step::Send(greeting()),
            Step::Error("qmp_capabilities", "CommandNotFound", "no"),
        ],
    );
    let e = QmpSession::connect(&fake.socket, opts(1000)).expect_err("caps refused");
    assert!(
        matches!(e, QmpError::Command { ref class, .. } if class == "CommandNotFound"),
        "{e:?}"
    );
}

#[test]
fn sockets_that_are_not_there() {
    let dir = std::env::temp_dir().join(format!("clockcarry-qmp-paths-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let e = QmpSession::connect(&dir.join("none.sock"), opts(500)).expect_err("missing");
    assert!(matches!(e, QmpError::SocketMissing { .. }), "{e:?}");
    let file = dir.join("file");
    std::fs::write(&file, b"x").expect("file");
    let e = QmpSession::connect(&file, opts(500)).expect_err("file");
    assert!(matches!(e, QmpError::NotASocket { .. }), "{e:?}");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let e = QmpSession::connect(&stale, opts(500)).expect_err("stale");
    assert!(matches!(e, QmpError::ConnectionRefused { .. }), "{e:?}");
    assert!(!e.request_sent());
    let _ = std::fs::remove_dir_all(&dir);
}
