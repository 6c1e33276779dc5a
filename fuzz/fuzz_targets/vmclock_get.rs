//! What the vm.clock client accepts from a VMM: a `GET /api/v1/vm.clock`
//! body through `vmclock_api::parse_vm_clock`, and the same bytes as a
//! `PUT` success answer (`parse_put_applied`, then `PutAnswer`'s
//! accessors), as a `PUT` failure answer (`parse_put_failure`) and as a
//! VMM error body (`error_messages`).
//!
//! Properties beyond "no panic":
//! - an accepted clock passes `validate_vm_clock` and has what its doc
//!   promises: 1 to `MAX_VCPUS` vCPUs with distinct ids, a TSC rate of 1 to
//!   `MAX_TSC_KHZ` kHz, a PVTI source exactly when there is a PVTI;
//! - an accepted clock, encoded as a VMM sends it (`vm_clock_json`), is
//!   accepted again as the same clock;
//! - an accepted success answer is `applied`, or empty only for a blank
//!   body, and re-encoded parses back equal;
//! - an accepted failure answer is never `applied`, is answered with 400
//!   exactly when `refused`, and re-encoded parses back equal.

#![no_main]

use clockcarry::vmclock_api::{
    error_messages, parse_put_applied, parse_put_failure, parse_vm_clock, validate_vm_clock,
    vm_clock_json, PutAnswer, PutOutcome, MAX_TSC_KHZ, MAX_VCPUS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_vm_clock(data) {
        Ok(clock) => {
            validate_vm_clock(&clock).expect("an accepted clock validates");
            let n = clock.vcpus.len();
            assert!(n >= 1 && n <= MAX_VCPUS as usize, "{n} vCPUs accepted");
            let mut ids: Vec<u32> = clock.vcpus.iter().map(|v| v.id).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), n, "duplicate vCPU ids accepted");
            assert!(clock.tsc_khz >= 1 && clock.tsc_khz <= MAX_TSC_KHZ);
            assert_eq!(clock.pvti.is_some(), clock.pvti_source.is_some());
            assert_eq!(clock.offsets().len(), n);
            let json = vm_clock_json(&clock).expect("a VmClock encodes");
            let again = parse_vm_clock(json.as_bytes()).expect("a re-encoded clock is accepted");
            assert_eq!(again, clock);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    match parse_put_applied(data) {
        Ok((reply, body)) => {
            match &reply {
                Some(r) => {
                    assert_eq!(r.outcome, PutOutcome::Applied);
                    let json = serde_json::to_vec(r).expect("a PutApplied encodes");
                    let (again, _) = parse_put_applied(&json).expect("a re-encoded reply parses");
                    assert_eq!(again.as_ref(), Some(r));
                }
                None => {
                    assert!(data.iter().all(u8::is_ascii_whitespace));
                    assert!(body.is_none());
                }
            }
            let answer = PutAnswer {
                status: 200,
                reply,
                body,
            };
            let _ = answer.kvmclock_error_ns();
            let _ = answer.kvmclock_method();
            let _ = answer.tsc_offsets_effective();
            let _ = answer.refused();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    if let Some(failure) = parse_put_failure(data) {
        assert_ne!(failure.outcome, PutOutcome::Applied);
        assert_eq!(
            failure.status() == 400,
            failure.outcome == PutOutcome::Refused
        );
        let json = serde_json::to_vec(&failure).expect("a PutFailure encodes");
        assert_eq!(parse_put_failure(&json).as_ref(), Some(&failure));
    }

    let _ = error_messages(data);
});
