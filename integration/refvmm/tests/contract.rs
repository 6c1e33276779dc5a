//! The vm.clock contract between the `clockcarry` client and the reference
//! VMM, without /dev/kvm. Both sides use the library's wire types
//! (`clockcarry::vmclock_api`), so what is tested here is the VMM's side of
//! the wire: the bodies the client builds get through the VMM's parsing and
//! checks; bodies a client must not send are refused with Cloud
//! Hypervisor's status and error form, and the client reads those errors
//! and the VMM's answer the way they are meant.

use clockcarry::model::Pvti;
use clockcarry::plan::{ErrorBound, KvmClockAction, Plan, PlanMode};
use clockcarry::vmclock_api::{
    error_messages, parse_put_applied, parse_put_failure, ClockPut, FollowPvti, KvmClockPut,
    PutAnswer, PutApplied, PutOutcome, SetClockPut,
};
use clockcarry::{ClockPolicy, PvtiSource};
use clockcarry_refvmm::api::{check_clock_put, parse_clock_put, ApiFailure, CLOCK_PUT_ACTION};
use clockcarry_refvmm::clockapi::PutReply;

fn parse(json: &str) -> Result<ClockPut, ApiFailure> {
    parse_clock_put(&Some(json.as_bytes().to_vec()))
}

/// The error chain as the client reads it off the wire.
fn wire_chain(f: ApiFailure) -> (u16, Vec<String>) {
    let r = f.response();
    let body = r.body.unwrap_or_default();
    (r.status, error_messages(body.as_bytes()))
}

fn plan(offsets: Vec<i64>) -> Plan {
    let pvti = Pvti {
        tsc_timestamp: 26_708_009_702,
        system_time: 211_451_127,
        tsc_to_system_mul: 3_512_675_207,
        tsc_shift: -1,
        flags: 1,
    };
    Plan {
        mode: PlanMode::CrossHost,
        policy: ClockPolicy::KeepRunning,
        tsc_khz: Some(2_445_411),
        tsc_offsets: offsets,
        kvmclock: KvmClockAction::SetClock {
            pvti,
            max_error_ns: 50,
        },
        pvti_source: PvtiSource::Derived,
        elapsed_ns: 0,
        clamped_negative_elapsed_ns: 0,
        advance_cycles: 0,
        floor_cycles: 0,
        guest_tsc_at_capture: 0,
        guest_tsc_target: 0,
        destination_host_tsc: 0,
        error_bound: ErrorBound::default(),
        notes: Vec::new(),
    }
}

#[test]
fn the_clients_bodies_pass_the_vmms_parsing_and_checks() {
    // What `clockcarry restore` sends (ClockPut::from_plan), and the other
    // two kvmclock forms (its rollback sends `"kvmclock": null`).
    let bodies = [
        ClockPut::from_plan(&plan(vec![-26_566_304_618, -26_566_304_618])),
        ClockPut {
            tsc_khz: None,
            tsc_offsets: vec![0, 0],
            kvmclock: Some(KvmClockPut::SetClock(SetClockPut {
                clock: 5,
                realtime: 6,
                flags: 4,
            })),
            arm: None,
        },
        ClockPut {
            tsc_khz: None,
            tsc_offsets: vec![7, 7],
            kvmclock: None,
            arm: None,
        },
    ];
    for sent in bodies {
        let json = serde_json::to_string(&sent).expect("serialise");
        let got = parse(&json).unwrap_or_else(|f| panic!("{json}: refused {f:?}"));
        assert_eq!(got, sent, "{json}");
        check_clock_put(&got, 2).unwrap_or_else(|f| panic!("{json}: refused {f:?}"));
    }
    // The design brief's example body, written by hand.
    let brief = r#"{ "tsc_khz": 2445411, "tsc_offsets": [-26566304618],
        "kvmclock": { "follow_pvti": { "tsc_timestamp": 1, "system_time": 2,
          "tsc_to_system_mul": 3512675207, "tsc_shift": -1, "flags": 1,
          "max_error_ns": 50 } } }"#;
    let got = parse(brief).expect("the brief's body parses");
    assert!(matches!(
        got.kvmclock,
        Some(KvmClockPut::FollowPvti(FollowPvti {
            max_error_ns: 50,
            tsc_shift: -1,
            ..
        }))
    ));
    check_clock_put(&got, 1).expect("one vCPU, one offset");
}

#[test]
fn malformed_bodies_are_refused_as_cloud_hypervisor_does() {
    let follow = r#"{"tsc_timestamp":1,"system_time":2,"tsc_to_system_mul":3,"tsc_shift":0,"flags":1,"max_error_ns":50}"#;
    let refused = [
        // Unknown fields, at every level.
        r#"{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":null,"x":1}"#.to_string(),
        format!(
            r#"{{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":{{"follow_pvti":{}}}}}"#,
            follow.replace("\"flags\"", "\"extra\":0,\"flags\"")
        ),
        r#"{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":{"set_clock":{"clock":1,"realtime":0,"flags":4,"x":0}}}"#
            .to_string(),
        // An unknown kvmclock form, two forms at once.
        r#"{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":{"step":{}}}"#.to_string(),
        format!(
            r#"{{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":{{"follow_pvti":{follow},"set_clock":{{"clock":1,"realtime":0,"flags":4}}}}}}"#
        ),
        // Missing members, wrong types, out-of-range numbers.
        r#"{"tsc_khz":null,"kvmclock":null}"#.to_string(),
        r#"{"tsc_khz":"fast","tsc_offsets":[0],"kvmclock":null}"#.to_string(),
        r#"{"tsc_khz":null,"tsc_offsets":[1.5],"kvmclock":null}"#.to_string(),
        r#"{"tsc_khz":null,"tsc_offsets":[9223372036854775808],"kvmclock":null}"#.to_string(),
        r#"{"tsc_khz":-1,"tsc_offsets":[0],"kvmclock":null}"#.to_string(),
        format!(
            r#"{{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":{{"follow_pvti":{}}}}}"#,
            follow.replace("\"tsc_shift\":0", "\"tsc_shift\":300")
        ),
        // Not JSON, not an object.
        r#"{"tsc_khz":"#.to_string(),
        "[]".to_string(),
    ];
    for body in &refused {
        let f = parse(body).expect_err(body);
        let (status, chain) = wire_chain(f);
        assert_eq!(status, 400, "{body}");
        assert_eq!(chain.len(), 2, "{body}: {chain:?}");
        assert_eq!(chain[0], "Failed to deserialize JSON", "{body}");
        assert!(!chain[1].is_empty(), "{body}: the detail names the problem");
    }
    // No body at all.
    let (status, chain) = wire_chain(parse_clock_put(&None).expect_err("no body"));
    assert_eq!((status, chain), (400, vec!["Bad Request".to_string()]));
}

#[test]
fn bodies_that_do_not_fit_the_vm_are_refused_with_the_reason() {
    let cases = [
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0],"kvmclock":null}"#,
            "tsc_offsets has 1 entries, the VM has 2 vCPUs",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0,0],"kvmclock":null}"#,
            "tsc_offsets has 3 entries, the VM has 2 vCPUs",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[],"kvmclock":null}"#,
            "tsc_offsets has 0 entries, the VM has 2 vCPUs",
        ),
        (
            r#"{"tsc_khz":0,"tsc_offsets":[0,0],"kvmclock":null}"#,
            "field `tsc_khz` is 0 kHz",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0],"kvmclock":{"follow_pvti":{"tsc_timestamp":1,"system_time":2,"tsc_to_system_mul":0,"tsc_shift":0,"flags":1,"max_error_ns":50}}}"#,
            "field `kvmclock.follow_pvti.tsc_to_system_mul` is 0",
        ),
        (
            r#"{"tsc_khz":null,"tsc_offsets":[0,0],"kvmclock":{"set_clock":{"clock":1,"realtime":0,"flags":2}}}"#,
            "field `kvmclock.set_clock.flags` is 0x2",
        ),
    ];
    for (body, reason) in cases {
        let put = parse(body).unwrap_or_else(|f| panic!("{body}: {f:?}"));
        let f = check_clock_put(&put, 2).expect_err(body);
        let wire = f.clone().response().body.unwrap_or_default();
        let typed = parse_put_failure(wire.as_bytes()).expect("a typed failure");
        assert_eq!(typed.outcome, PutOutcome::Refused, "{body}");
        assert!(typed.rollback.is_none(), "{body}: nothing was touched");
        let (status, chain) = wire_chain(f);
        assert_eq!(status, 400, "{body}");
        assert_eq!(chain.len(), 3, "{body}: {chain:?}");
        assert_eq!(chain[0], "Error from API", "{body}");
        assert_eq!(chain[1], CLOCK_PUT_ACTION, "{body}");
        assert!(chain[2].starts_with(reason), "{body}: {chain:?}");
    }
}

#[test]
fn the_client_reads_the_vmms_answer() {
    let reply = PutReply {
        applied: PutApplied {
            outcome: PutOutcome::Applied,
            kvmclock_request: "follow_pvti".into(),
            kvmclock_method: "set_clock".into(),
            kvmclock_error_ns: Some(4),
            kvmclock_within_target: Some(true),
            kvmclock_tries: 2,
            tsc_khz_set: None,
            tsc_offsets_applied: vec![0, 0],
            tsc_offsets_read_back: vec![0, 0],
            tsc_offsets_effective: false,
            refused: vec!["KVM_KVMCLOCK_CTRL on vCPU 1: errno 22".into()],
        },
        report: Default::default(),
    };
    let bytes = serde_json::to_vec(&reply).expect("serialise");
    let (typed, body) = parse_put_applied(&bytes).expect("the client reads the reply");
    assert_eq!(typed.as_ref(), Some(&reply.applied));
    let answer = PutAnswer {
        status: 200,
        reply: typed,
        body,
    };
    assert_eq!(answer.kvmclock_error_ns(), Some(4));
    assert_eq!(answer.kvmclock_method().as_deref(), Some("set_clock"));
    assert_eq!(answer.tsc_offsets_effective(), Some(false));
    assert_eq!(
        answer.refused(),
        vec!["KVM_KVMCLOCK_CTRL on vCPU 1: errno 22".to_string()]
    );
}
