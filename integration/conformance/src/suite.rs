//! The checks, in the one order a single restored, paused VM allows: every
//! paused check first (GET, refusals, the kernel's refusal, good PUTs), then
//! `vm.resume`, then the running ones, then `vm.pause` and the PUT after the
//! vCPUs ran. docs/conformance.md says what each asserts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clockcarry::model::{Pvti, RunState, VmClock};
use clockcarry::pvclock::{guest_tsc, pvclock_read};
use clockcarry::vmclock_api::{
    self, ClockPut, FollowPvti, KvmClockPut, PutApplied, PutFailure, PutOutcome, VM_CLOCK_ENDPOINT,
};
use serde_json::{json, Value};

use crate::http::{self, clip_text, Answer};

/// The window a `follow_pvti` PUT asks for: kvm-clock at most this far
/// above the line, ns.
pub const MAX_ERROR_NS: u64 = 50;
/// What the suite's own reading of kvm-clock (a later `GET`'s KVM_GET_CLOCK
/// pair) may lie beyond the window's top, ns: pair rounding and a master
/// clock re-anchored between the PUT and the GET.
pub const VERIFY_TOLERANCE_NS: i64 = 10;
/// What the suite's reading may lie below the window's bottom, ns: a later
/// pair rounds through KVM's line and the PVTI's, 1 ns each way.
pub const PAIR_ROUNDING_NS: i64 = 1;
/// How far kvm-clock may leave the window after `vm.resume`, ns, either
/// way: a master clock re-anchored as the vCPUs enter drifts by the host
/// clocksource's rate against the PVTI's (well under 1 ppm) for the ms
/// between the PUT and the GET. A resume that applies its own clock moves
/// it by hundreds of ns (Cloud Hypervisor v53's realtime catch-up) to the
/// whole blackout (a saved clock set back).
pub const RESUME_TOLERANCE_NS: i64 = 100;
/// Below the line a KVM_SET_CLOCK_GUEST may land, ns (the kernel's rounding).
pub const CLOCK_GUEST_BELOW_NS: i64 = 1;
/// How far the offsets are moved to see them move, cycles.
pub const OFFSET_STEP_CYCLES: i64 = 1_000_000_000;
/// `follow_pvti` PUTs tried when the VMM honestly reports a missed window.
pub const FOLLOW_ATTEMPTS: u32 = 3;
/// The reason of every check that needs effective TSC offsets, where the
/// host ignores offset writes.
pub const INERT_OFFSETS: &str = "TSC offsets are inert on this host";
/// Budget of one API call, connect to the last byte of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The refusal cases, by check name: one defect each on an otherwise valid
/// body.
pub const REFUSALS: [&str; 13] = [
    "malformed-json",
    "unknown-field",
    "unknown-nested-field",
    "wrong-type",
    "offsets-one-short",
    "offsets-one-long",
    "offsets-empty",
    "tsc-khz-0",
    "follow-pvti-mul-0",
    "follow-pvti-shift-40",
    "set-clock-flags-2",
    "set-clock-realtime-flag-realtime-0",
    "no-body",
];

/// Every check, in order (the refusals are `refuse/<name>`).
pub fn check_ids() -> Vec<String> {
    let mut ids = vec!["get-paused".to_string()];
    ids.extend(REFUSALS.iter().map(|r| format!("refuse/{r}")));
    ids.extend(
        [
            "kernel-refusal",
            "put-offsets-kvmclock-null",
            "offsets-move",
            "put-follow-pvti",
            "follow-pvti-verified",
            "put-again-before-resume",
            "resume",
            "get-running",
            "resume-kept-kvmclock",
            "put-running-wrong-state",
            "pause",
            "put-after-run-wrong-state",
        ]
        .map(String::from),
    );
    ids
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub id: String,
    pub verdict: Verdict,
    /// One line.
    pub reason: String,
    pub duration_us: u64,
}

/// A check that did not fail: passed or skipped, with its reason and what
/// later checks need from it.
struct Done<T> {
    skip: bool,
    reason: String,
    value: T,
}

type Step<T> = Result<Done<T>, String>;

fn pass<T>(reason: impl Into<String>, value: T) -> Step<T> {
    Ok(Done {
        skip: false,
        reason: reason.into(),
        value,
    })
}

fn skip<T>(reason: impl Into<String>, value: T) -> Step<T> {
    Ok(Done {
        skip: true,
        reason: reason.into(),
        value,
    })
}

/// The line followed and how, for the checks after `put-follow-pvti`.
#[derive(Debug, Clone, Copy)]
struct Followed {
    line: Pvti,
    /// Lowest error accepted, ns (-1 for CLOCK_GUEST, else 0).
    low_ns: i64,
}

impl Followed {
    /// Where the suite's own reading may put kvm-clock, ns.
    fn verify_window(&self) -> (i64, i64) {
        (
            self.low_ns.saturating_sub(PAIR_ROUNDING_NS),
            window_top_ns(VERIFY_TOLERANCE_NS),
        )
    }
}

/// The suite against one API socket.
pub struct Suite<'a> {
    socket: PathBuf,
    on_result: &'a mut dyn FnMut(&CheckResult),
    results: Vec<CheckResult>,
}

impl<'a> Suite<'a> {
    pub fn new(socket: &Path, on_result: &'a mut dyn FnMut(&CheckResult)) -> Suite<'a> {
        Suite {
            socket: socket.to_path_buf(),
            on_result,
            results: Vec::new(),
        }
    }

    /// Runs every check; the results, in order.
    pub fn run(mut self) -> Vec<CheckResult> {
        let Some(base) = self.run_check("get-paused", |s| s.get_paused()) else {
            self.not_run("a paused GET vm.clock is what every other check starts from");
            return self.results;
        };
        for name in REFUSALS {
            let body = refusal_body(name, &base);
            self.run_check(&format!("refuse/{name}"), |s| s.refusal(&base, body));
        }
        self.run_check("kernel-refusal", |s| s.kernel_refusal(&base));
        self.run_check("put-offsets-kvmclock-null", |s| {
            s.put_offsets_as_read(&base)
        });
        self.run_check("offsets-move", |s| s.offsets_move(&base));
        let followed = self
            .run_check("put-follow-pvti", |s| s.follow_pvti(&base))
            .flatten();
        self.run_check("follow-pvti-verified", |s| {
            s.follow_verified(&base, followed)
        });
        self.run_check("put-again-before-resume", |s| s.put_again(&base, followed));
        if self.run_check("resume", |s| s.resume()).is_none() {
            self.not_run("vm.resume failed: the running checks need a running VM");
            return self.results;
        }
        let Some(running) = self.run_check("get-running", |s| s.get_running(&base)) else {
            self.not_run("GET vm.clock while running failed");
            return self.results;
        };
        self.run_check("resume-kept-kvmclock", |s| {
            s.resume_kept_kvmclock(&running, followed)
        });
        self.run_check("put-running-wrong-state", |s| {
            s.wrong_state(&running, "a PUT while running")
        });
        let Some(paused) = self.run_check("pause", |s| s.pause()) else {
            self.not_run("vm.pause failed");
            return self.results;
        };
        self.run_check("put-after-run-wrong-state", |s| {
            s.wrong_state(&paused, "a PUT after the vCPUs ran")
        });
        self.results
    }

    fn run_check<T>(&mut self, id: &str, f: impl FnOnce(&mut Self) -> Step<T>) -> Option<T> {
        let started = Instant::now();
        let step = f(self);
        let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (verdict, reason, value) = match step {
            Ok(done) if done.skip => (Verdict::Skip, done.reason, Some(done.value)),
            Ok(done) => (Verdict::Pass, done.reason, Some(done.value)),
            Err(reason) => (Verdict::Fail, reason, None),
        };
        self.record(CheckResult {
            id: id.to_string(),
            verdict,
            reason,
            duration_us,
        });
        value
    }

    fn record(&mut self, result: CheckResult) {
        (self.on_result)(&result);
        self.results.push(result);
    }

    /// Every check not run yet fails, saying why it did not run.
    fn not_run(&mut self, why: &str) {
        let done: Vec<String> = self.results.iter().map(|r| r.id.clone()).collect();
        for id in check_ids().into_iter().filter(|id| !done.contains(id)) {
            self.record(CheckResult {
                id,
                verdict: Verdict::Fail,
                reason: format!("not run: {why}"),
                duration_us: 0,
            });
        }
    }

    // ---- the API ---------------------------------------------------------

    fn call(&self, method: &str, endpoint: &str, body: Option<&[u8]>) -> Result<Answer, String> {
        http::request(&self.socket, method, endpoint, body, REQUEST_TIMEOUT)
    }

    fn put_raw(&self, body: Option<&[u8]>) -> Result<Answer, String> {
        self.call("PUT", VM_CLOCK_ENDPOINT, body)
    }

    fn put(&self, body: &ClockPut) -> Result<Answer, String> {
        let bytes =
            serde_json::to_vec(body).map_err(|e| format!("cannot encode the PUT body: {e}"))?;
        self.put_raw(Some(&bytes))
    }

    /// GET vm.clock, 200 and accepted by the client's own parser and
    /// validator.
    fn get_clock(&self) -> Result<VmClock, String> {
        let a = self.call("GET", VM_CLOCK_ENDPOINT, None)?;
        if a.status != 200 {
            return Err(format!(
                "GET vm.clock: HTTP {} (expected 200): {}",
                a.status,
                a.body_text()
            ));
        }
        let value: Value = serde_json::from_slice(&a.body).map_err(|e| {
            format!(
                "GET vm.clock: the body is not JSON ({e}): {}",
                a.body_text()
            )
        })?;
        if value.get("capabilities").is_none_or(|c| !c.is_object()) {
            return Err("GET vm.clock: field `capabilities` is missing or not an object".into());
        }
        vmclock_api::parse_vm_clock(&a.body)
            .map_err(|e| format!("GET vm.clock: refused by the validator (parse_vm_clock): {e}"))
    }

    /// A 2xx action without a body (`vm.pause`, `vm.resume`).
    fn action(&self, endpoint: &str) -> Result<u16, String> {
        let a = self.call("PUT", &format!("/api/v1/{endpoint}"), None)?;
        if (200..300).contains(&a.status) {
            Ok(a.status)
        } else {
            Err(format!(
                "PUT {endpoint}: HTTP {} (expected 2xx): {}",
                a.status,
                a.body_text()
            ))
        }
    }

    /// A GET shows the VM as `before` in everything a refused or wrongly
    /// stated PUT must not change: state, rate, offsets, and (paused) the
    /// PVTI.
    fn untouched(&self, before: &VmClock, by: &str) -> Result<VmClock, String> {
        let now = self.get_clock().map_err(|e| format!("after {by}: {e}"))?;
        let mut changed = Vec::new();
        if now.state != before.state {
            changed.push(format!("state {:?} -> {:?}", before.state, now.state));
        }
        if now.tsc_khz != before.tsc_khz {
            changed.push(format!("tsc_khz {} -> {} kHz", before.tsc_khz, now.tsc_khz));
        }
        if now.offsets() != before.offsets() {
            changed.push(format!(
                "tsc_offsets {:?} -> {:?} cycles",
                before.offsets(),
                now.offsets()
            ));
        }
        if before.state == RunState::Paused && now.pvti != before.pvti {
            changed.push(format!("pvti {:?} -> {:?}", before.pvti, now.pvti));
        }
        if changed.is_empty() {
            Ok(now)
        } else {
            Err(format!("{by} changed the VM: {}", changed.join("; ")))
        }
    }

    // ---- the checks ------------------------------------------------------

    fn get_paused(&mut self) -> Step<VmClock> {
        let clock = self.get_clock()?;
        if clock.state != RunState::Paused {
            return Err(format!(
                "field `state` is {:?}; the suite needs a VM restored or received paused, \
                 its vCPUs not run since",
                clock.state
            ));
        }
        let c = clock.capabilities;
        let pvti = match clock.pvti_source {
            Some(s) => format!("pvti from {}", json_name(&s)),
            None => "no pvti".to_string(),
        };
        pass(
            format!(
                "200, accepted by parse_vm_clock, state Paused, {} vCPUs, tsc_khz {}, {pvti}, \
                 capabilities tsc_offset={} clock_guest={} tsc_scaling={} adjust_clock={}",
                clock.vcpus.len(),
                clock.tsc_khz,
                c.tsc_offset_effective,
                c.clock_guest,
                c.tsc_scaling,
                c.adjust_clock
            ),
            clock,
        )
    }

    fn refusal(&mut self, base: &VmClock, body: Option<Vec<u8>>) -> Step<()> {
        let a = self.put_raw(body.as_deref())?;
        let f = expect_failure(&a, 400, PutOutcome::Refused)?;
        untouched_failure(&f)?;
        self.untouched(base, "the refused PUT")?;
        pass(
            format!(
                "400 refused{}, rollback null; state, rate, offsets, PVTI unchanged",
                last_message(&f)
            ),
            (),
        )
    }

    fn kernel_refusal(&mut self, base: &VmClock) -> Step<()> {
        let khz = (base.tsc_khz / 2).max(1);
        let body = as_read(base, Some(khz), None);
        let a = self.put(&body)?;
        if (200..300).contains(&a.status) {
            // Accepted: put the VM's rate back before saying so.
            let back = as_read(base, Some(base.tsc_khz), None);
            let b = self.put(&back)?;
            expect_applied(&b).map_err(|e| {
                format!(
                    "tsc_khz {khz} was accepted; putting {} kHz back failed: {e}",
                    base.tsc_khz
                )
            })?;
            let now = self.get_clock()?;
            if now.tsc_khz != base.tsc_khz {
                return Err(format!(
                    "tsc_khz {khz} was accepted and {} kHz put back, but GET shows tsc_khz {}",
                    base.tsc_khz, now.tsc_khz
                ));
            }
            let why = if base.capabilities.tsc_scaling {
                "the host has TSC scaling, so KVM_SET_TSC_KHZ takes any rate"
            } else {
                "no portable kernel refusal on this host"
            };
            return skip(
                format!(
                    "HTTP {}: the VMM and kernel accepted tsc_khz {khz} (half the VM's {} kHz): \
                     {why}; rate put back to {} kHz",
                    a.status, base.tsc_khz, base.tsc_khz
                ),
                (),
            );
        }
        if a.status == 400 {
            let f = expect_failure(&a, 400, PutOutcome::Refused)?;
            untouched_failure(&f)?;
            self.untouched(base, "the refused PUT")?;
            return skip(
                format!(
                    "the VMM refused tsc_khz {khz} itself (400 refused{}) before calling the \
                     kernel; VM untouched",
                    last_message(&f)
                ),
                (),
            );
        }
        let f = expect_failure(&a, 500, PutOutcome::RolledBack)?;
        let step = f
            .failed_step
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or("field `failed_step` is null or empty in a rolled_back failure")?;
        let rollback = f
            .rollback
            .as_ref()
            .ok_or("field `rollback` is null in a rolled_back failure")?;
        if !rollback.complete {
            return Err(format!(
                "outcome rolled_back but field `rollback.complete` is false (steps: {})",
                rollback_steps(&f)
            ));
        }
        if let Some(bad) = rollback.steps.iter().find(|s| !s.ok) {
            return Err(format!(
                "rollback.complete is true but step `{}` says ok false: {}",
                bad.step,
                clip_text(&bad.detail)
            ));
        }
        self.untouched(base, "the rolled-back PUT")?;
        pass(
            format!(
                "tsc_khz {khz}: 500 rolled_back at step `{step}`{}, rollback complete ({}); \
                 VM untouched",
                last_message(&f),
                rollback_steps(&f)
            ),
            (),
        )
    }

    fn put_offsets_as_read(&mut self, base: &VmClock) -> Step<()> {
        let written = base.offsets();
        let a = self.put(&as_read(base, None, None))?;
        let r = expect_applied(&a)?;
        check_applied(&r, base, &written, "none")?;
        self.shows(base, &written)?;
        pass(
            format!(
                "200 applied, kvmclock_method none, offsets {written:?} read back and shown by \
                 GET, tsc_offsets_effective {}",
                r.tsc_offsets_effective
            ),
            (),
        )
    }

    /// GET: still paused, these offsets, the rate unchanged.
    fn shows(&self, base: &VmClock, offsets: &[i64]) -> Result<VmClock, String> {
        let now = self.get_clock()?;
        if now.state != RunState::Paused {
            return Err(format!(
                "GET after the PUT: state {:?}, not Paused",
                now.state
            ));
        }
        if now.offsets() != offsets {
            return Err(format!(
                "GET after the PUT shows tsc_offsets {:?}, {offsets:?} were written",
                now.offsets()
            ));
        }
        if now.tsc_khz != base.tsc_khz {
            return Err(format!(
                "GET after the PUT shows tsc_khz {}, was {} (tsc_khz null asked for no change)",
                now.tsc_khz, base.tsc_khz
            ));
        }
        Ok(now)
    }

    fn offsets_move(&mut self, base: &VmClock) -> Step<()> {
        let old = base.offsets();
        let moved: Vec<i64> = old
            .iter()
            .map(|o| o.wrapping_add(OFFSET_STEP_CYCLES))
            .collect();
        let mut body = as_read(base, None, None);
        body.tsc_offsets = moved.clone();
        let a = self.put(&body)?;
        let verdict = self.judge_move(base, &a, &old, &moved);
        // The old offsets back, whatever happened.
        let back = self.put(&as_read(base, None, None)).and_then(|b| {
            expect_applied(&b)?;
            self.shows(base, &old)
        });
        if let Err(e) = back {
            return Err(format!(
                "putting the old offsets back failed: {e} (the move itself: {})",
                match &verdict {
                    Ok(d) => d.reason.clone(),
                    Err(e) => e.clone(),
                }
            ));
        }
        verdict
    }

    fn judge_move(&self, base: &VmClock, a: &Answer, old: &[i64], moved: &[i64]) -> Step<()> {
        let r = expect_applied(a)?;
        if r.tsc_offsets_applied != moved {
            return Err(format!(
                "field `tsc_offsets_applied` is {:?}, {moved:?} were written",
                r.tsc_offsets_applied
            ));
        }
        let now = self.get_clock()?;
        let read_back = r.tsc_offsets_read_back.as_slice();
        let shown = now.offsets();
        let effective_cap = base.capabilities.tsc_offset_effective;
        if read_back == moved && shown == moved {
            if !effective_cap {
                return Err(format!(
                    "capabilities.tsc_offset is false but a +{OFFSET_STEP_CYCLES}-cycle write \
                     read back as written and GET shows it: the capability is wrong"
                ));
            }
            if !r.tsc_offsets_effective {
                return Err("the offsets moved but field `tsc_offsets_effective` is false".into());
            }
            return pass(
                format!(
                    "+{OFFSET_STEP_CYCLES} cycles on every vCPU: read back, shown by GET, \
                     tsc_offsets_effective true; old offsets put back"
                ),
                (),
            );
        }
        if read_back == old && shown == old {
            if effective_cap {
                return Err(format!(
                    "capabilities.tsc_offset is true but a +{OFFSET_STEP_CYCLES}-cycle write \
                     read back unchanged ({old:?})"
                ));
            }
            if r.tsc_offsets_effective {
                return Err(
                    "the offsets did not move but field `tsc_offsets_effective` is true".into(),
                );
            }
            return skip(
                format!(
                    "{INERT_OFFSETS} (capabilities.tsc_offset false; a +{OFFSET_STEP_CYCLES}-cycle \
                     write answered 200, read back unchanged, tsc_offsets_effective false)"
                ),
                (),
            );
        }
        Err(format!(
            "a +{OFFSET_STEP_CYCLES}-cycle write of {moved:?}: read back {read_back:?}, GET \
             shows {shown:?}, neither the written nor the old {old:?}"
        ))
    }

    fn follow_pvti(&mut self, base: &VmClock) -> Step<Option<Followed>> {
        let Some(line) = base.pvti else {
            return skip(
                "GET vm.clock gives no PVTI (pvti null): the guest has no kvm-clock line to \
                 follow",
                None,
            );
        };
        let follow = FollowPvti {
            tsc_timestamp: line.tsc_timestamp,
            system_time: line.system_time,
            tsc_to_system_mul: line.tsc_to_system_mul,
            tsc_shift: line.tsc_shift,
            flags: line.flags,
            max_error_ns: MAX_ERROR_NS,
        };
        let body = as_read(base, None, Some(KvmClockPut::FollowPvti(follow)));
        let written = base.offsets();
        let mut misses = Vec::new();
        for attempt in 1..=FOLLOW_ATTEMPTS {
            let a = self.put(&body)?;
            let r = expect_applied(&a)?;
            check_applied(&r, base, &written, "follow_pvti")?;
            let low_ns = match r.kvmclock_method.as_str() {
                "clock_guest" => -CLOCK_GUEST_BELOW_NS,
                "set_clock" => 0,
                other => {
                    return Err(format!(
                        "field `kvmclock_method` is {other:?} for follow_pvti; expected \
                         clock_guest or set_clock"
                    ))
                }
            };
            let error_ns = r
                .kvmclock_error_ns
                .ok_or("field `kvmclock_error_ns` is null for follow_pvti")?;
            let within = r
                .kvmclock_within_target
                .ok_or("field `kvmclock_within_target` is null for follow_pvti")?;
            let in_window = (low_ns..=window_top_ns(0)).contains(&error_ns);
            if within != in_window {
                return Err(format!(
                    "field `kvmclock_within_target` is {within} but kvmclock_error_ns {error_ns} \
                     ns is {} the window [{low_ns}, {MAX_ERROR_NS}] ns",
                    if in_window { "inside" } else { "outside" }
                ));
            }
            if in_window {
                let retried = if misses.is_empty() {
                    String::new()
                } else {
                    format!(" on attempt {attempt} (missed before: {misses:?} ns, reported)")
                };
                return pass(
                    format!(
                        "200 applied via {}, kvmclock_error_ns {error_ns} ns in [{low_ns}, \
                         {MAX_ERROR_NS}], within_target true, {} tries{retried}",
                        r.kvmclock_method, r.kvmclock_tries
                    ),
                    Some(Followed { line, low_ns }),
                );
            }
            misses.push(error_ns);
        }
        Err(format!(
            "the VMM missed the window [0, {MAX_ERROR_NS}] ns on {FOLLOW_ATTEMPTS} PUTs: \
             kvmclock_error_ns {misses:?} (reported honestly, within_target false)"
        ))
    }

    /// Where kvm-clock lies relative to the followed line by a GET's
    /// KVM_GET_CLOCK pair: `Ok(None)` when the pair has no host TSC.
    fn measured_error(
        &self,
        base: &VmClock,
        f: &Followed,
    ) -> Result<(VmClock, Option<i64>), String> {
        let now = self.shows(base, &base.offsets())?;
        if !now.kvmclock.has_host_tsc() {
            return Ok((now, None));
        }
        let e = kvmclock_error_ns(&now, &f.line)
            .ok_or("kvm-clock minus the line at the GET's pair does not fit in i64 ns")?;
        Ok((now, Some(e)))
    }

    fn follow_verified(&mut self, base: &VmClock, followed: Option<Followed>) -> Step<()> {
        let Some(f) = followed else {
            return skip("no line was followed (see put-follow-pvti)", ());
        };
        let (now, error) = self.measured_error(base, &f)?;
        let Some(error_ns) = error else {
            return skip(
                format!(
                    "the GET's KVM_GET_CLOCK sample carries no host TSC (kvmclock.flags {}): \
                     kvm-clock cannot be placed on the line from outside",
                    now.kvmclock.flags
                ),
                (),
            );
        };
        let (low, top) = f.verify_window();
        if !(low..=top).contains(&error_ns) {
            return Err(format!(
                "a GET's KVM_GET_CLOCK pair puts kvm-clock {error_ns} ns from the followed line, \
                 outside [{low}, {top}] ns (the window, {PAIR_ROUNDING_NS} ns of rounding below, \
                 {VERIFY_TOLERANCE_NS} ns above)"
            ));
        }
        pass(
            format!(
                "a GET's KVM_GET_CLOCK pair puts kvm-clock {error_ns} ns above the line, in \
                 [{low}, {top}] ns; offsets as written"
            ),
            (),
        )
    }

    fn put_again(&mut self, base: &VmClock, followed: Option<Followed>) -> Step<()> {
        let written = base.offsets();
        let a = self.put(&as_read(base, None, None))?;
        let r = expect_applied(&a)?;
        check_applied(&r, base, &written, "none")?;
        let Some(f) = followed else {
            self.shows(base, &written)?;
            return pass(
                "200 applied, kvmclock_method none (no followed line to re-check)",
                (),
            );
        };
        let (_, error) = self.measured_error(base, &f)?;
        match error {
            Some(e) if (f.verify_window().0..=f.verify_window().1).contains(&e) => pass(
                format!("200 applied, kvmclock_method none; kvm-clock left alone, {e} ns above the line"),
                (),
            ),
            Some(e) => Err(format!(
                "a kvmclock:null PUT moved kvm-clock: now {e} ns from the followed line"
            )),
            None => pass(
                "200 applied, kvmclock_method none (no host TSC in the GET's pair to re-check \
                 kvm-clock)",
                (),
            ),
        }
    }

    fn resume(&mut self) -> Step<()> {
        let status = self.action("vm.resume")?;
        pass(format!("PUT vm.resume: HTTP {status}"), ())
    }

    fn get_running(&mut self, base: &VmClock) -> Step<VmClock> {
        let now = self.get_clock()?;
        if now.state != RunState::Running {
            return Err(format!(
                "field `state` is {:?} after vm.resume, expected Running",
                now.state
            ));
        }
        if now.offsets() != base.offsets() {
            return Err(format!(
                "vm.resume changed the offsets: {:?} written, GET shows {:?} cycles",
                base.offsets(),
                now.offsets()
            ));
        }
        pass(
            "200, accepted by parse_vm_clock, state Running, offsets as written",
            now,
        )
    }

    fn resume_kept_kvmclock(&mut self, running: &VmClock, followed: Option<Followed>) -> Step<()> {
        let Some(f) = followed else {
            return skip("no line was followed (see put-follow-pvti)", ());
        };
        if !running.kvmclock.has_host_tsc() {
            return skip(
                format!(
                    "the running GET's KVM_GET_CLOCK sample carries no host TSC (kvmclock.flags \
                     {}): kvm-clock cannot be placed on the line from outside",
                    running.kvmclock.flags
                ),
                (),
            );
        }
        let e = kvmclock_error_ns(running, &f.line)
            .ok_or("kvm-clock minus the line at the GET's pair does not fit in i64 ns")?;
        let (low, top) = (
            f.low_ns.saturating_sub(RESUME_TOLERANCE_NS),
            window_top_ns(RESUME_TOLERANCE_NS),
        );
        if !(low..=top).contains(&e) {
            return Err(format!(
                "after vm.resume kvm-clock is {e} ns from the followed line, outside [{low}, \
                 {top}] ns: the resume applied a clock of its own over the PUT"
            ));
        }
        pass(
            format!(
                "kvm-clock {e} ns above the followed line after vm.resume, in [{low}, {top}] ns: \
                 the resume applied no clock of its own"
            ),
            (),
        )
    }

    fn wrong_state(&mut self, before: &VmClock, by: &str) -> Step<()> {
        let a = self.put(&as_read(before, None, None))?;
        let f = expect_failure(&a, 500, PutOutcome::WrongState)?;
        untouched_failure(&f)?;
        self.untouched(before, by)?;
        pass(
            format!(
                "500 wrong_state{}, rollback null; VM untouched ({:?})",
                last_message(&f),
                before.state
            ),
            (),
        )
    }

    fn pause(&mut self) -> Step<VmClock> {
        let status = self.action("vm.pause")?;
        let now = self.get_clock()?;
        if now.state != RunState::Paused {
            return Err(format!(
                "PUT vm.pause: HTTP {status}, but GET shows state {:?}",
                now.state
            ));
        }
        pass(
            format!("PUT vm.pause: HTTP {status}; GET shows Paused"),
            now,
        )
    }
}

/// kvm-clock minus `line` at `vm`'s KVM_GET_CLOCK pair, ns: the guest TSC
/// there is the pair's host TSC (scaled) plus vCPU 0's offset as read.
/// `None` without a host TSC in the pair, without a vCPU, or when the
/// difference does not fit in i64.
fn kvmclock_error_ns(vm: &VmClock, line: &Pvti) -> Option<i64> {
    if !vm.kvmclock.has_host_tsc() {
        return None;
    }
    let offset_cycles = vm.vcpus.first()?.tsc_offset;
    let tsc = guest_tsc(vm.kvmclock.host_tsc, vm.tsc_scaling, offset_cycles);
    let expected_ns = pvclock_read(line, tsc);
    i64::try_from(i128::from(vm.kvmclock.clock_ns) - i128::from(expected_ns)).ok()
}

/// The top of the window accepted, ns: `max_error_ns` plus `tolerance_ns`.
fn window_top_ns(tolerance_ns: i64) -> i64 {
    i64::try_from(MAX_ERROR_NS)
        .unwrap_or(i64::MAX)
        .saturating_add(tolerance_ns)
}

/// The VM's offsets as read, the rate and kvm-clock as given.
fn as_read(base: &VmClock, tsc_khz: Option<u32>, kvmclock: Option<KvmClockPut>) -> ClockPut {
    ClockPut {
        tsc_khz,
        tsc_offsets: base.offsets(),
        kvmclock,
        arm: None,
    }
}

/// The checks every 200 PutApplied must pass: what was asked, the offsets
/// written and read back, `tsc_offsets_effective` against the capability.
fn check_applied(
    r: &PutApplied,
    base: &VmClock,
    written: &[i64],
    request: &str,
) -> Result<(), String> {
    if r.kvmclock_request != request {
        return Err(format!(
            "field `kvmclock_request` is {:?}, the body asked for {request}",
            r.kvmclock_request
        ));
    }
    if request == "none" {
        if r.kvmclock_method != "none" {
            return Err(format!(
                "field `kvmclock_method` is {:?} for kvmclock null, expected none",
                r.kvmclock_method
            ));
        }
        if r.kvmclock_error_ns.is_some() || r.kvmclock_within_target.is_some() {
            return Err(
                "fields `kvmclock_error_ns` / `kvmclock_within_target` are set for kvmclock \
                 null (follow_pvti only)"
                    .into(),
            );
        }
    }
    if r.tsc_khz_set.is_some() {
        return Err(format!(
            "field `tsc_khz_set` is {:?} for tsc_khz null",
            r.tsc_khz_set
        ));
    }
    if r.tsc_offsets_applied != written {
        return Err(format!(
            "field `tsc_offsets_applied` is {:?}, {written:?} were written",
            r.tsc_offsets_applied
        ));
    }
    if r.tsc_offsets_read_back != written {
        return Err(format!(
            "field `tsc_offsets_read_back` is {:?}, {written:?} were written (the VM's own \
             offsets: equal even where offsets are inert)",
            r.tsc_offsets_read_back
        ));
    }
    let cap = base.capabilities.tsc_offset_effective;
    if r.tsc_offsets_effective != cap {
        return Err(format!(
            "field `tsc_offsets_effective` is {} but capabilities.tsc_offset is {cap} and the \
             offsets read back as written",
            r.tsc_offsets_effective
        ));
    }
    Ok(())
}

/// A 200 whose body is a PutApplied (outcome applied).
fn expect_applied(a: &Answer) -> Result<PutApplied, String> {
    if a.status != 200 {
        let typed = vmclock_api::parse_put_failure(&a.body)
            .map(|f| format!(" ({}{})", outcome_name(f.outcome), last_message(&f)))
            .unwrap_or_default();
        return Err(format!(
            "HTTP {}{typed} (expected 200 applied): {}",
            a.status,
            a.body_text()
        ));
    }
    match vmclock_api::parse_put_applied(&a.body) {
        Ok((Some(r), _)) => Ok(r),
        Ok((None, _)) => Err("HTTP 200 without a body: a PutApplied reply is required".into()),
        Err(e) => Err(format!("HTTP 200 but not a PutApplied: {e}")),
    }
}

/// A typed PutFailure with this status and outcome.
fn expect_failure(a: &Answer, status: u16, outcome: PutOutcome) -> Result<PutFailure, String> {
    let typed = vmclock_api::parse_put_failure(&a.body);
    if a.status != status {
        let said = typed
            .as_ref()
            .map(|f| format!(" outcome {}", outcome_name(f.outcome)))
            .unwrap_or_default();
        return Err(format!(
            "HTTP {}{said} (expected {status} {}): {}",
            a.status,
            outcome_name(outcome),
            a.body_text()
        ));
    }
    let Some(f) = typed else {
        return Err(format!(
            "HTTP {}: the body is not a typed PutFailure (outcome, messages, failed_step, \
             rollback): {}",
            a.status,
            a.body_text()
        ));
    };
    if f.outcome != outcome {
        return Err(format!(
            "field `outcome` is {}, expected {} with HTTP {status}",
            outcome_name(f.outcome),
            outcome_name(outcome)
        ));
    }
    Ok(f)
}

/// A failure that touched nothing names no step and no rollback.
fn untouched_failure(f: &PutFailure) -> Result<(), String> {
    if let Some(step) = &f.failed_step {
        return Err(format!(
            "field `failed_step` is {step:?} in a {} failure, expected null",
            outcome_name(f.outcome)
        ));
    }
    if f.rollback.is_some() {
        return Err(format!(
            "field `rollback` is set in a {} failure, expected null",
            outcome_name(f.outcome)
        ));
    }
    Ok(())
}

fn outcome_name(o: PutOutcome) -> String {
    json_name(&o)
}

/// A unit variant's JSON spelling (`rolled_back`, `guest_memory`).
fn json_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("(unprintable: {e})"),
    }
}

fn last_message(f: &PutFailure) -> String {
    match f.messages.last() {
        Some(m) => format!(" ({:?})", clip_text(m)),
        None => String::new(),
    }
}

fn rollback_steps(f: &PutFailure) -> String {
    let steps: Vec<String> = f
        .rollback
        .iter()
        .flat_map(|r| r.steps.iter())
        .map(|s| format!("{} {}", s.step, if s.ok { "ok" } else { "FAILED" }))
        .collect();
    if steps.is_empty() {
        "nothing to undo".into()
    } else {
        steps.join(", ")
    }
}

/// One refusal case's body (`None`: no body at all).
fn refusal_body(name: &str, base: &VmClock) -> Option<Vec<u8>> {
    let offsets = base.offsets();
    let n = offsets.len();
    let line = base.pvti.unwrap_or_else(|| synthetic_line(base.tsc_khz));
    let follow = |mul: u32, shift: i8| {
        json!({"follow_pvti": {
            "tsc_timestamp": line.tsc_timestamp, "system_time": line.system_time,
            "tsc_to_system_mul": mul, "tsc_shift": shift, "flags": line.flags,
            "max_error_ns": MAX_ERROR_NS}})
    };
    let set_clock = |flags: u32| json!({"set_clock": {"clock": base.kvmclock.clock_ns, "realtime": 0, "flags": flags}});
    let body = |tsc_khz: Value, offsets: Value, kvmclock: Value| json!({"tsc_khz": tsc_khz, "tsc_offsets": offsets, "kvmclock": kvmclock});
    let valid_follow = follow(line.tsc_to_system_mul, line.tsc_shift);
    let value = match name {
        "malformed-json" => return Some(b"{\"tsc_khz\":".to_vec()),
        "no-body" => return None,
        "unknown-field" => {
            let mut v = body(Value::Null, json!(offsets), Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("unexpected".into(), json!(1));
            }
            v
        }
        "unknown-nested-field" => {
            let mut k = valid_follow;
            if let Some(o) = k.get_mut("follow_pvti").and_then(Value::as_object_mut) {
                o.insert("unexpected".into(), json!(1));
            }
            body(Value::Null, json!(offsets), k)
        }
        "wrong-type" => body(json!("fast"), json!(offsets), Value::Null),
        "offsets-one-short" => body(
            Value::Null,
            json!(offsets.get(..n.saturating_sub(1)).unwrap_or_default()),
            Value::Null,
        ),
        "offsets-one-long" => {
            let mut long = offsets.clone();
            long.push(offsets.first().copied().unwrap_or(0));
            body(Value::Null, json!(long), Value::Null)
        }
        "offsets-empty" => body(Value::Null, json!([]), Value::Null),
        "tsc-khz-0" => body(json!(0), json!(offsets), Value::Null),
        "follow-pvti-mul-0" => body(Value::Null, json!(offsets), follow(0, line.tsc_shift)),
        "follow-pvti-shift-40" => body(
            Value::Null,
            json!(offsets),
            follow(line.tsc_to_system_mul, 40),
        ),
        "set-clock-flags-2" => body(Value::Null, json!(offsets), set_clock(2)),
        "set-clock-realtime-flag-realtime-0" => body(Value::Null, json!(offsets), set_clock(4)),
        _ => Value::Null,
    };
    Some(value.to_string().into_bytes())
}

/// A line at the VM's rate through (0, 0), for refusal bodies where the VM
/// gives no PVTI (each is refused for another field before it is used).
fn synthetic_line(tsc_khz: u32) -> Pvti {
    let (tsc_shift, tsc_to_system_mul) =
        clockcarry::pvclock::time_scale_for_khz(tsc_khz).unwrap_or((0, 1 << 31));
    Pvti {
        tsc_timestamp: 0,
        system_time: 0,
        tsc_to_system_mul,
        tsc_shift,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clockcarry::model::{Capabilities, KvmClockSample, VcpuOffset};
    use clockcarry::request::ApplyRequest;

    fn vm() -> VmClock {
        VmClock {
            state: RunState::Paused,
            tsc_khz: 2_600_000,
            vcpus: vec![
                VcpuOffset {
                    id: 0,
                    tsc_offset: 7,
                },
                VcpuOffset {
                    id: 1,
                    tsc_offset: 7,
                },
            ],
            kvmclock: KvmClockSample {
                clock_ns: 32_410_637,
                flags: 0,
                realtime_ns: 0,
                host_tsc: 0,
            },
            pvti: Some(synthetic_line(2_600_000)),
            pvti_source: Some(clockcarry::model::PvtiSource::GuestMemory),
            tsc_scaling: None,
            capabilities: Capabilities::default(),
        }
    }

    /// Each refusal body has its one defect: the syntactic ones do not
    /// parse as a ClockPut, the others parse and break exactly a rule of
    /// the library's request check.
    #[test]
    fn each_refusal_body_has_one_defect() {
        let base = vm();
        assert_eq!(check_ids().len(), 26);
        for name in REFUSALS {
            let Some(body) = refusal_body(name, &base) else {
                assert_eq!(name, "no-body");
                continue;
            };
            let parsed = serde_json::from_slice::<ClockPut>(&body);
            match name {
                "malformed-json" | "unknown-field" | "unknown-nested-field" | "wrong-type" => {
                    assert!(parsed.is_err(), "{name} parses")
                }
                _ => {
                    let put = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(
                        ApplyRequest::from(&put).validate(2).is_err(),
                        "{name} passes the request check"
                    );
                }
            }
        }
        // The valid body they are cut from passes both.
        let good = serde_json::to_vec(&as_read(&base, None, None)).unwrap();
        let put: ClockPut = serde_json::from_slice(&good).unwrap();
        assert!(ApplyRequest::from(&put).validate(2).is_ok());
    }
}
