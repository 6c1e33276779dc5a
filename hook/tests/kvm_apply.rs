//! Ordering, rollback and input checking of `kvm::apply_with`, against an
//! in-memory model of KVM's clock ioctls with fault injection (no /dev/kvm
//! needed). The model: host TSC at 1 GHz advancing 1000 cycles per call,
//! KVM_SET_CLOCK with a realtime bias of 450 ns on the first call and 100 ns
//! after (the shape measured on this project's machines).
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

use clockcarry::kvm::{
    apply_request, apply_request_from, apply_with, ApplyError, ApplyOptions, ApplyRequest,
    ApplyStep, ClockOps, ClockRequest, FollowVia, KvmError, KvmclockOutcome, Previous,
    DEFAULT_SET_CLOCK_TRIES,
};
use clockcarry::model::{
    ClockPolicy, KvmClockSample, Pvti, PvtiSource, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME,
    KVM_CLOCK_TSC_STABLE,
};
use clockcarry::plan::{ErrorBound, KvmClockAction, Plan, PlanMode};
use clockcarry::pvclock::{pvclock_read, time_scale_for_khz};
use clockcarry::vmclock_api::ClockPut;
use proptest::prelude::*;

const KHZ: u32 = 1_000_000;
const REALTIME_BASE_NS: u64 = 1_795_749_100_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    GetKhz(usize),
    SetKhz(usize, u32),
    GetOffset(usize),
    SetOffset(usize, i64),
    GetClock,
    SetClock(u64, u64, u32),
    SetClockGuest(usize),
    Ctrl(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    SetKhz,
    SetOffset,
    GetOffset,
    SetClock,
    SetClockGuest,
    Ctrl,
}

struct FakeKvm {
    khz: Vec<u32>,
    offsets: Vec<i64>,
    /// kvm-clock = host_tsc (1 GHz) + kvmclock_offset_ns.
    kvmclock_offset_ns: i128,
    host_tsc: u64,
    set_clock_calls: u32,
    log: Vec<Call>,
    /// Fail `op` on this vCPU (vCPU 0 for VM ops) with `errno`, once.
    fault: Option<(Op, usize, i32)>,
    /// Keep failing after the first time (the rollback's retry fails too).
    fault_persists: bool,
    /// Offset writes are accepted and ignored (like kvm_pvm).
    inert_offsets: bool,
    /// Offset writes on this vCPU are ignored.
    drop_offset_writes_on: Option<usize>,
    /// KVM_SET_CLOCK's in-kernel bias on every call, ns, in place of the
    /// measured 450 then 100 (negative: kvm-clock lands below the aim).
    set_clock_bias_ns: Option<i64>,
    /// KVM_SET_CLOCK's bias call by call (the last one repeats), in place
    /// of `set_clock_bias_ns`: a host that preempts one call.
    set_clock_biases_ns: Vec<i64>,
}

impl FakeKvm {
    fn new(n: usize) -> FakeKvm {
        FakeKvm {
            khz: vec![KHZ; n],
            offsets: (0..n).map(|i| -1_000 * i as i64).collect(),
            kvmclock_offset_ns: -5_000,
            host_tsc: 10_000_000_000,
            set_clock_calls: 0,
            log: Vec::new(),
            fault: None,
            fault_persists: false,
            inert_offsets: false,
            drop_offset_writes_on: None,
            set_clock_bias_ns: None,
            set_clock_biases_ns: Vec::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.host_tsc += 1000;
        self.host_tsc
    }

    fn fail(&mut self, op: Op, vcpu: usize, ioctl: &'static str) -> Result<(), KvmError> {
        match self.fault {
            Some((o, v, errno)) if o == op && v == vcpu => {
                if !self.fault_persists {
                    self.fault = None;
                }
                Err(KvmError::Ioctl {
                    ioctl,
                    vcpu: None,
                    errno,
                })
            }
            _ => Ok(()),
        }
    }

    fn kvmclock_at(&self, host_tsc: u64) -> u64 {
        (i128::from(host_tsc) + self.kvmclock_offset_ns).max(0) as u64
    }
}

impl ClockOps for FakeKvm {
    fn vcpu_count(&self) -> usize {
        self.offsets.len()
    }
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, KvmError> {
        self.tick();
        self.log.push(Call::GetKhz(vcpu));
        Ok(self.khz[vcpu])
    }
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), KvmError> {
        self.tick();
        self.log.push(Call::SetKhz(vcpu, khz));
        self.fail(Op::SetKhz, vcpu, "KVM_SET_TSC_KHZ")?;
        self.khz[vcpu] = khz;
        Ok(())
    }
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, KvmError> {
        self.tick();
        self.log.push(Call::GetOffset(vcpu));
        self.fail(Op::GetOffset, vcpu, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)")?;
        Ok(self.offsets[vcpu])
    }
    fn set_tsc_offset(&mut self, vcpu: usize, offset_cycles: i64) -> Result<(), KvmError> {
        self.tick();
        self.log.push(Call::SetOffset(vcpu, offset_cycles));
        self.fail(Op::SetOffset, vcpu, "KVM_SET_DEVICE_ATTR(TSC_OFFSET)")?;
        if !self.inert_offsets && self.drop_offset_writes_on != Some(vcpu) {
            self.offsets[vcpu] = offset_cycles;
        }
        Ok(())
    }
    fn get_clock(&mut self) -> Result<KvmClockSample, KvmError> {
        let h = self.tick();
        self.log.push(Call::GetClock);
        Ok(KvmClockSample {
            clock_ns: self.kvmclock_at(h),
            flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
            realtime_ns: REALTIME_BASE_NS + h,
            host_tsc: h,
        })
    }
    fn set_clock(&mut self, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError> {
        let call = usize::try_from(self.set_clock_calls).unwrap_or(usize::MAX);
        let bias = match self.set_clock_biases_ns.last() {
            Some(last) => *self.set_clock_biases_ns.get(call).unwrap_or(last),
            None => self
                .set_clock_bias_ns
                .unwrap_or(if self.set_clock_calls == 0 { 450 } else { 100 }),
        };
        if flags & KVM_CLOCK_REALTIME == 0 && !self.set_clock_biases_ns.is_empty() {
            // Without a realtime reference the kernel's snapshot comes
            // `bias` late (1 ns a tick).
            self.host_tsc = self.host_tsc.saturating_add(bias.unsigned_abs());
        }
        let snapshot = self.tick();
        self.log.push(Call::SetClock(clock_ns, realtime_ns, flags));
        self.fail(Op::SetClock, 0, "KVM_SET_CLOCK")?;
        self.set_clock_calls += 1;
        let mut clock = i128::from(clock_ns);
        if flags & KVM_CLOCK_REALTIME != 0 {
            let now_real = i128::from(REALTIME_BASE_NS + snapshot) + i128::from(bias);
            if now_real > i128::from(realtime_ns) {
                clock += now_real - i128::from(realtime_ns);
            }
        }
        self.kvmclock_offset_ns = clock - i128::from(snapshot);
        Ok(())
    }
    fn set_clock_guest(&mut self, vcpu: usize, pvti: &Pvti) -> Result<(), KvmError> {
        let h = self.tick();
        self.log.push(Call::SetClockGuest(vcpu));
        self.fail(Op::SetClockGuest, vcpu, "KVM_SET_CLOCK_GUEST")?;
        let guest = (h as i128 + i128::from(self.offsets[0])) as u64;
        self.kvmclock_offset_ns = i128::from(pvclock_read(pvti, guest)) - i128::from(h);
        Ok(())
    }
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), KvmError> {
        self.tick();
        self.log.push(Call::Ctrl(vcpu));
        self.fail(Op::Ctrl, vcpu, "KVM_KVMCLOCK_CTRL")
    }
    fn host_tsc(&mut self) -> u64 {
        self.tick()
    }
    /// The fake's own (host TSC, realtime) pair: its realtime is the
    /// host TSC (1 GHz) past a fixed base.
    fn realtime_pair(&mut self) -> Option<(u64, u64)> {
        let h = self.tick();
        Some((h, REALTIME_BASE_NS + h))
    }
}

/// The source line: kvm-clock 1 ms at guest TSC 9e9, 1 GHz.
fn source_pvti() -> Pvti {
    let (tsc_shift, tsc_to_system_mul) = time_scale_for_khz(KHZ).expect("1 GHz scale");
    Pvti {
        tsc_timestamp: 9_000_000_000,
        system_time: 1_000_000,
        tsc_to_system_mul,
        tsc_shift,
        flags: 1,
    }
}

fn plan_for(kvm: &FakeKvm, delta: i64, action: &str) -> Plan {
    let pvti = source_pvti();
    let offsets: Vec<i64> = kvm.offsets.iter().map(|o| o + delta).collect();
    let dst_host_tsc = kvm.host_tsc;
    let guest_tsc_target = (dst_host_tsc as i128 + i128::from(offsets[0])) as u64;
    let kvmclock = match action {
        "clock_guest" => KvmClockAction::ClockGuest { pvti },
        _ => KvmClockAction::SetClock {
            pvti,
            max_error_ns: 50,
        },
    };
    Plan {
        mode: PlanMode::CrossHost,
        policy: ClockPolicy::KeepRunning,
        tsc_khz: None,
        tsc_offsets: offsets,
        kvmclock,
        pvti_source: PvtiSource::Derived,
        elapsed_ns: 0,
        clamped_negative_elapsed_ns: 0,
        advance_cycles: 0,
        floor_cycles: 0,
        guest_tsc_at_capture: 0,
        guest_tsc_target,
        destination_host_tsc: dst_host_tsc,
        error_bound: ErrorBound::default(),
        notes: Vec::new(),
    }
}

fn failed(e: &ApplyError) -> (ApplyStep, &KvmError) {
    match e {
        ApplyError::Failed { step, source, .. } => (*step, source),
        other => panic!("expected a step failure, got {other}"),
    }
}

#[test]
fn order_is_frequency_offsets_clock_ctrl_verify() {
    let mut kvm = FakeKvm::new(4);
    let mut plan = plan_for(&kvm, 7_000, "set_clock");
    plan.tsc_khz = Some(KHZ + 100);
    let report = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect("apply");
    let log = &kvm.log;
    let pos = |c: &Call| log.iter().position(|x| x == c).expect("call present");
    let last_khz = pos(&Call::SetKhz(3, KHZ + 100));
    let first_off = pos(&Call::SetOffset(0, plan.tsc_offsets[0]));
    // Offsets back to back: four SetOffset calls in a row.
    for i in 0..4 {
        assert_eq!(log[first_off + i], Call::SetOffset(i, plan.tsc_offsets[i]));
    }
    let first_set_clock = log
        .iter()
        .position(|c| matches!(c, Call::SetClock(..)))
        .expect("set clock");
    let first_ctrl = pos(&Call::Ctrl(0));
    let last_get = log
        .iter()
        .rposition(|c| matches!(c, Call::GetOffset(_)))
        .expect("verify");
    assert!(last_khz < first_off && first_off < first_set_clock);
    assert!(first_set_clock < first_ctrl && first_ctrl < last_get);
    assert!(!log[first_ctrl..]
        .iter()
        .any(|c| matches!(c, Call::SetClock(..))));
    assert_eq!(report.frequency_set_khz, Some(KHZ + 100));
    assert!(report.tsc_offsets_effective);
    assert_eq!(report.offsets_read_back, plan.tsc_offsets);
    let names: Vec<&str> = report.steps.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "read_offsets",
            "frequency",
            "offsets",
            "set_clock",
            "kvmclock_ctrl",
            "verify"
        ]
    );
}

#[test]
fn frequency_untouched_when_equal() {
    let mut kvm = FakeKvm::new(2);
    let mut plan = plan_for(&kvm, 0, "set_clock");
    plan.tsc_khz = Some(KHZ);
    let report = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect("apply");
    assert!(!kvm.log.iter().any(|c| matches!(c, Call::SetKhz(..))));
    assert_eq!(report.frequency_set_khz, None);
}

#[test]
fn calibration_loop_reaches_50_ns() {
    let mut kvm = FakeKvm::new(2);
    let plan = plan_for(&kvm, 123_456, "set_clock");
    let report = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect("apply");
    let k = report.kvmclock.expect("kvmclock outcome");
    println!("tries {} errors {:?}", k.tries, k.try_errors_ns);
    assert_eq!(k.method, "set_clock");
    assert!(k.within_max_error, "{k:?}");
    assert!(k.tries <= 4, "{k:?}");
    // The model's truth agrees with the report.
    let h = kvm.host_tsc;
    let guest = (h as i128 + i128::from(plan.tsc_offsets[0])) as u64;
    let truth = kvm.kvmclock_at(h) as i128 - i128::from(pvclock_read(&source_pvti(), guest));
    assert!(truth.abs() <= 50, "truth {truth}");
}

#[test]
fn fault_on_vcpu_2_of_4_leaves_every_offset_as_it_was() {
    let mut kvm = FakeKvm::new(4);
    let before = kvm.offsets.clone();
    let clock_before = kvm.kvmclock_offset_ns;
    kvm.fault = Some((Op::SetOffset, 2, libc::EIO));
    let plan = plan_for(&kvm, 1_000_000_000, "set_clock");
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    let (step, source) = failed(&err);
    assert_eq!(step, ApplyStep::Offset { vcpu: 2 });
    assert_eq!(source.errno(), Some(libc::EIO));
    let text = err.to_string();
    assert!(
        text.contains("KVM_SET_DEVICE_ATTR(TSC_OFFSET) on vCPU 2"),
        "{text}"
    );
    assert_eq!(kvm.offsets, before);
    assert_eq!(kvm.kvmclock_offset_ns, clock_before, "clock untouched");
    assert!(!kvm.log.iter().any(|c| matches!(c, Call::SetClock(..))));
    let rb = err.rollback().expect("rollback report");
    assert_eq!(rb.offsets_restored_vcpus, 3);
    assert!(rb.failures.is_empty());
    assert_eq!(rb.clock_restored, None);
}

#[test]
fn known_previous_offsets_skip_the_read_and_are_what_a_rollback_puts_back() {
    let mut kvm = FakeKvm::new(4);
    // What the VMM says is in place (vCPU 0's, as a stock restore leaves it).
    let known = vec![kvm.offsets[0]; 4];
    let req = request(&kvm, 1_000_000_000, ClockRequest::Leave);
    let options = ApplyOptions {
        read_back: false,
        ..ApplyOptions::default()
    };
    let report =
        apply_request_from(&mut kvm, &req, &options, Previous::Known(&known)).expect("apply");
    // No read before the first write; the one read after the writes is
    // the offset kvm-clock is aimed with.
    let first_write = kvm
        .log
        .iter()
        .position(|c| matches!(c, Call::SetOffset(..)))
        .expect("writes");
    assert!(!kvm.log[..first_write]
        .iter()
        .any(|c| matches!(c, Call::GetOffset(_))));
    let reads = kvm.log.iter().filter(|c| matches!(c, Call::GetOffset(_)));
    assert_eq!(reads.count(), 1, "{:?}", kvm.log);
    assert_eq!(report.previous_offsets, known);
    assert!(!report.steps.iter().any(|s| s.name == "read_offsets"));

    // A failure on vCPU 2 puts the known offsets back on 0..=2.
    let mut kvm = FakeKvm::new(4);
    kvm.fault = Some((Op::SetOffset, 2, libc::EIO));
    let untouched = kvm.offsets[3];
    let req = request(&kvm, 1_000_000_000, ClockRequest::Leave);
    let err = apply_request_from(&mut kvm, &req, &options, Previous::Known(&known))
        .expect_err("must fail");
    assert_eq!(failed(&err).0, ApplyStep::Offset { vcpu: 2 });
    assert_eq!(kvm.offsets[..3], known[..3]);
    assert_eq!(kvm.offsets[3], untouched);
    assert_eq!(err.rollback().expect("rollback").offsets_restored_vcpus, 3);
}

#[test]
fn known_previous_offsets_of_the_wrong_length_are_refused_before_any_call() {
    let mut kvm = FakeKvm::new(4);
    let req = request(&kvm, 0, ClockRequest::Leave);
    let err = apply_request_from(
        &mut kvm,
        &req,
        &ApplyOptions::default(),
        Previous::Known(&[0; 3]),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("previous_offsets"), "{err}");
    assert!(kvm.log.is_empty(), "{:?}", kvm.log);
}

#[test]
fn persistent_fault_is_reported_by_the_rollback() {
    let mut kvm = FakeKvm::new(4);
    let before = kvm.offsets.clone();
    kvm.fault = Some((Op::SetOffset, 2, libc::EIO));
    kvm.fault_persists = true;
    let plan = plan_for(&kvm, 1_000_000_000, "set_clock");
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    // vCPU 2's write never happened, 0 and 1 were put back.
    assert_eq!(kvm.offsets, before);
    let rb = err.rollback().expect("rollback");
    assert_eq!(rb.offsets_restored_vcpus, 2);
    assert_eq!(rb.failures.len(), 1);
    assert!(err.to_string().contains("rollback left undone"), "{err}");
}

#[test]
fn fault_after_the_clock_restores_frequency_offsets_and_clock() {
    let mut kvm = FakeKvm::new(4);
    let before = kvm.offsets.clone();
    kvm.fault = Some((Op::Ctrl, 1, libc::EFAULT));
    let mut plan = plan_for(&kvm, 5_000, "set_clock");
    plan.tsc_khz = Some(KHZ + 1);
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    let (step, source) = failed(&err);
    assert_eq!(step, ApplyStep::KvmclockCtrl);
    assert!(source.to_string().contains("on vCPU 1"), "{source}");
    assert_eq!(kvm.offsets, before);
    assert_eq!(kvm.khz, vec![KHZ; 4]);
    let rb = err.rollback().expect("rollback");
    assert_eq!(rb.clock_restored, Some(true));
    assert_eq!(rb.frequency_restored_vcpus, 4);
    // The restore re-aims at the old sample with KVM_CLOCK_REALTIME.
    assert!(matches!(
        kvm.log.last(),
        Some(Call::SetClock(_, _, KVM_CLOCK_REALTIME))
    ));
}

#[test]
fn fault_in_frequency_restores_only_what_was_set() {
    let mut kvm = FakeKvm::new(4);
    kvm.fault = Some((Op::SetKhz, 2, libc::EINVAL));
    let mut plan = plan_for(&kvm, 5_000, "set_clock");
    plan.tsc_khz = Some(2 * KHZ);
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    assert_eq!(failed(&err).0, ApplyStep::Frequency);
    assert_eq!(kvm.khz, vec![KHZ; 4]);
    assert!(!kvm.log.iter().any(|c| matches!(c, Call::SetOffset(..))));
    // vCPUs 0 and 1 were set, 2 failed (and is written back too: a failed
    // call may have half-applied).
    assert_eq!(err.rollback().map(|r| r.frequency_restored_vcpus), Some(3));
}

#[test]
fn kvmclock_ctrl_einval_is_recorded_not_fatal() {
    let mut kvm = FakeKvm::new(3);
    kvm.fault = Some((Op::Ctrl, 2, libc::EINVAL));
    let plan = plan_for(&kvm, 0, "set_clock");
    let report = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect("apply");
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].vcpu, Some(2));
    assert_eq!(report.refused[0].errno, libc::EINVAL);
    assert_eq!(report.refused[0].ioctl, "KVM_KVMCLOCK_CTRL");
}

#[test]
fn offsets_that_do_not_stick_fail_verify_and_roll_back() {
    let mut kvm = FakeKvm::new(4);
    let before = kvm.offsets.clone();
    kvm.drop_offset_writes_on = Some(3);
    let plan = plan_for(&kvm, 9_999, "set_clock");
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    let (step, source) = failed(&err);
    assert_eq!(step, ApplyStep::Verify);
    assert!(
        matches!(source, KvmError::OffsetMismatch { vcpu: 3, .. }),
        "{source}"
    );
    assert_eq!(kvm.offsets, before);
    assert_eq!(err.rollback().and_then(|r| r.clock_restored), Some(true));
}

#[test]
fn inert_offsets_are_reported_when_the_probe_said_so() {
    let plan_delta = 1_000_000;
    // Without the probe's word: a failure.
    let mut kvm = FakeKvm::new(2);
    kvm.inert_offsets = true;
    let plan = plan_for(&kvm, plan_delta, "set_clock");
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    assert_eq!(failed(&err).0, ApplyStep::Verify);
    // With it: success, reported as not effective, kvm-clock aimed at the
    // TSC the guest really has.
    let mut kvm = FakeKvm::new(2);
    kvm.inert_offsets = true;
    let before = kvm.offsets.clone();
    let plan = plan_for(&kvm, plan_delta, "set_clock");
    let options = ApplyOptions {
        tsc_offsets_effective: false,
        ..ApplyOptions::default()
    };
    let report = apply_with(&mut kvm, &plan, &options).expect("apply");
    assert!(!report.tsc_offsets_effective);
    assert_eq!(report.offsets_read_back, before);
    let k = report.kvmclock.expect("outcome");
    assert_eq!(k.aimed_with_offset_cycles, before[0]);
    assert!(k.within_max_error, "{k:?}");
}

#[test]
fn clock_guest_path_and_its_failure() {
    let mut kvm = FakeKvm::new(2);
    let plan = plan_for(&kvm, 0, "clock_guest");
    let report = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect("apply");
    assert!(kvm.log.contains(&Call::SetClockGuest(0)));
    assert!(!kvm.log.iter().any(|c| matches!(c, Call::SetClock(..))));
    let k = report.kvmclock.expect("outcome");
    assert_eq!(k.method, "clock_guest");
    // The fake installs the line exactly; the GET_CLOCK pair shows 0 to a
    // few ns of mul/shift truncation.
    assert!(k.error_ns.is_some_and(|e| e.abs() <= 2), "{k:?}");

    let mut kvm = FakeKvm::new(2);
    let before = kvm.offsets.clone();
    kvm.fault = Some((Op::SetClockGuest, 0, libc::ERANGE));
    let plan = plan_for(&kvm, 77, "clock_guest");
    let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err("must fail");
    assert_eq!(failed(&err).0, ApplyStep::ClockGuest);
    assert_eq!(kvm.offsets, before);
    assert_eq!(err.rollback().and_then(|r| r.clock_restored), None);
}

#[test]
fn bad_plans_are_refused_before_any_call() {
    let kvm = FakeKvm::new(4);
    let good = plan_for(&kvm, 0, "set_clock");
    let mut cases: Vec<(Plan, &str)> = Vec::new();
    let mut p = good.clone();
    p.tsc_offsets.pop();
    cases.push((p, "count"));
    let mut p = good.clone();
    p.tsc_khz = Some(0);
    cases.push((p, "tsc_khz"));
    let mut p = good.clone();
    p.tsc_khz = Some(u32::MAX);
    cases.push((p, "tsc_khz"));
    let mut bad_pvti = source_pvti();
    bad_pvti.tsc_to_system_mul = 0;
    let mut p = good.clone();
    p.kvmclock = KvmClockAction::ClockGuest { pvti: bad_pvti };
    cases.push((p, "kvmclock.follow_pvti.tsc_to_system_mul"));
    let mut bad_pvti = source_pvti();
    bad_pvti.tsc_shift = 40;
    let mut p = good.clone();
    p.kvmclock = KvmClockAction::ClockGuest { pvti: bad_pvti };
    cases.push((p, "kvmclock.follow_pvti.tsc_shift"));
    // A plan's SetClock aim is not passed on (the apply aims at a fresh
    // pair itself), so only a raw request's flags are refused: see
    // `raw_makes_exactly_one_set_clock_as_given`.
    for (plan, what) in cases {
        let mut kvm = FakeKvm::new(4);
        let err = apply_with(&mut kvm, &plan, &ApplyOptions::default()).expect_err(what);
        match (&err, what) {
            (ApplyError::VcpuCountMismatch { plan: 3, vm: 4 }, "count") => {}
            (ApplyError::InvalidPlan { field, .. }, w) if *field == w => {}
            _ => panic!("{what}: unexpected {err}"),
        }
        assert!(err.to_string().contains("nothing was touched"), "{err}");
        assert!(kvm.log.is_empty(), "{what}: calls made: {:?}", kvm.log);
    }
    // No vCPU at all.
    let mut empty = FakeKvm::new(0);
    let mut p = good;
    p.tsc_offsets.clear();
    assert!(matches!(
        apply_with(&mut empty, &p, &ApplyOptions::default()),
        Err(ApplyError::VcpuCountMismatch { plan: 0, vm: 0 })
    ));
}

fn request(kvm: &FakeKvm, delta: i64, kvmclock: ClockRequest) -> ApplyRequest {
    ApplyRequest {
        tsc_khz: None,
        tsc_offsets: kvm.offsets.iter().map(|o| o + delta).collect(),
        kvmclock,
    }
}

fn set_clock_calls(kvm: &FakeKvm) -> Vec<&Call> {
    kvm.log
        .iter()
        .filter(|c| matches!(c, Call::SetClock(..) | Call::SetClockGuest(_)))
        .collect()
}

#[test]
fn leave_makes_no_clock_call() {
    let mut kvm = FakeKvm::new(3);
    let clock_before = kvm.kvmclock_offset_ns;
    let req = request(&kvm, 4_000, ClockRequest::Leave);
    let report = apply_request(&mut kvm, &req, &ApplyOptions::default()).expect("apply");
    assert!(set_clock_calls(&kvm).is_empty(), "{:?}", kvm.log);
    assert!(!kvm.log.contains(&Call::GetClock), "{:?}", kvm.log);
    assert_eq!(kvm.kvmclock_offset_ns, clock_before);
    assert_eq!(report.kvmclock, None);
    assert_eq!(report.offsets_read_back, req.tsc_offsets);
    // KVMCLOCK_CTRL still tells each guest it was stopped.
    assert!((0..3).all(|i| kvm.log.contains(&Call::Ctrl(i))));
    let names: Vec<&str> = report.steps.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["read_offsets", "offsets", "kvmclock_ctrl", "verify"]
    );

    // A failure after it rolls back the offsets and leaves the clock alone.
    let mut kvm = FakeKvm::new(3);
    let before = kvm.offsets.clone();
    kvm.fault = Some((Op::Ctrl, 1, libc::EIO));
    let req = request(&kvm, 4_000, ClockRequest::Leave);
    let err = apply_request(&mut kvm, &req, &ApplyOptions::default()).expect_err("must fail");
    assert_eq!(failed(&err).0, ApplyStep::KvmclockCtrl);
    assert_eq!(kvm.offsets, before);
    assert!(set_clock_calls(&kvm).is_empty(), "{:?}", kvm.log);
    assert_eq!(err.rollback().and_then(|r| r.clock_restored), None);
}

#[test]
fn raw_makes_exactly_one_set_clock_as_given() {
    for flags in [0, KVM_CLOCK_REALTIME] {
        let mut kvm = FakeKvm::new(2);
        let realtime_ns = if flags == 0 { 0 } else { REALTIME_BASE_NS };
        let req = request(
            &kvm,
            0,
            ClockRequest::Raw {
                clock_ns: 123_456_789,
                realtime_ns,
                flags,
            },
        );
        let report = apply_request(&mut kvm, &req, &ApplyOptions::default()).expect("apply");
        assert_eq!(
            set_clock_calls(&kvm),
            [&Call::SetClock(123_456_789, realtime_ns, flags)],
            "{:?}",
            kvm.log
        );
        let k = report.kvmclock.as_ref().expect("outcome");
        assert_eq!((k.method, k.tries, k.error_ns), ("set_clock", 1, None));
        assert!(report.step_ns("set_clock").is_some());
    }

    // Refused flags: nothing touched.
    let mut kvm = FakeKvm::new(2);
    let req = request(
        &kvm,
        0,
        ClockRequest::Raw {
            clock_ns: 1,
            realtime_ns: 1,
            flags: KVM_CLOCK_HOST_TSC,
        },
    );
    let err = apply_request(&mut kvm, &req, &ApplyOptions::default()).expect_err("refused");
    assert!(
        matches!(
            err,
            ApplyError::InvalidPlan { ref field, .. } if field == "kvmclock.set_clock.flags"
        ),
        "{err}"
    );
    assert!(kvm.log.is_empty());

    // A failing raw call rolls back the offsets; the clock was not set.
    let mut kvm = FakeKvm::new(2);
    let before = kvm.offsets.clone();
    kvm.fault = Some((Op::SetClock, 0, libc::EINVAL));
    let req = request(
        &kvm,
        500,
        ClockRequest::Raw {
            clock_ns: 1,
            realtime_ns: 0,
            flags: 0,
        },
    );
    let err = apply_request(&mut kvm, &req, &ApplyOptions::default()).expect_err("must fail");
    assert_eq!(failed(&err).0, ApplyStep::SetClock);
    assert_eq!(kvm.offsets, before);
    assert_eq!(set_clock_calls(&kvm).len(), 1, "{:?}", kvm.log);
}

#[test]
fn follow_picks_clock_guest_when_the_options_say_so() {
    let follow = ClockRequest::Follow {
        pvti: source_pvti(),
        max_error_ns: 50,
        via: FollowVia::Best,
    };
    let mut kvm = FakeKvm::new(2);
    let req = request(&kvm, 1_000, follow);
    let options = ApplyOptions {
        clock_guest: true,
        ..ApplyOptions::default()
    };
    let report = apply_request(&mut kvm, &req, &options).expect("apply");
    assert_eq!(set_clock_calls(&kvm), [&Call::SetClockGuest(0)]);
    assert_eq!(report.kvmclock.expect("outcome").method, "clock_guest");

    // Without it (and without KVM_CLOCK_REALTIME): the calibrated loop,
    // aimed at the line at the TSC of each call.
    let mut kvm = FakeKvm::new(2);
    let req = request(&kvm, 1_000, follow);
    let report = apply_request(&mut kvm, &req, &ApplyOptions::default()).expect("apply");
    let k = report.kvmclock.expect("outcome");
    assert_eq!(k.method, "set_clock");
    assert!(k.within_max_error, "{k:?}");
    assert!(!kvm.log.iter().any(|c| matches!(c, Call::SetClockGuest(_))));
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::SetKhz),
        Just(Op::SetOffset),
        Just(Op::GetOffset),
        Just(Op::SetClock),
        Just(Op::SetClockGuest),
        Just(Op::Ctrl),
    ]
}

proptest! {
    /// Whatever the plan and wherever one fault strikes: no panic, and
    /// either success or every offset and rate exactly as before.
    #[test]
    fn any_single_fault_leaves_offsets_as_they_were(
        n in 1usize..8,
        delta in any::<i64>(),
        khz in prop::option::of(0u32..200_000_000),
        op in op_strategy(),
        vcpu in 0usize..8,
        errno in prop_oneof![Just(libc::EINVAL), Just(libc::EIO), Just(libc::EFAULT)],
        clock_guest in any::<bool>(),
    ) {
        let mut kvm = FakeKvm::new(n);
        let before = (kvm.offsets.clone(), kvm.khz.clone());
        kvm.fault = Some((op, vcpu, errno));
        let mut plan = plan_for(&kvm, delta, if clock_guest { "clock_guest" } else { "set_clock" });
        plan.tsc_khz = khz;
        match apply_with(&mut kvm, &plan, &ApplyOptions::default()) {
            Ok(report) => {
                prop_assert_eq!(&report.offsets_read_back, &plan.tsc_offsets);
            }
            Err(e) => {
                prop_assert_eq!(&(kvm.offsets.clone(), kvm.khz.clone()), &before, "{}", e);
            }
        }
    }
}

/// The window is [0, max] above the line (issue 16): a kernel whose
/// KVM_SET_CLOCK lands 40 ns low used to be accepted at -40 ns (|err| <= 50),
/// a kvm-clock below the source line. The loop must re-aim until it lands at
/// or above the line, through the API's `follow_pvti` request as in process.
#[test]
fn kvmclock_never_lands_below_the_line() {
    for bias_ns in [-40i64, -10, -49] {
        let mut kvm = FakeKvm::new(2);
        kvm.set_clock_bias_ns = Some(bias_ns);
        let put = ClockPut::from_request(&request(
            &kvm,
            4_000,
            ClockRequest::Follow {
                pvti: source_pvti(),
                max_error_ns: 50,
                via: FollowVia::Best,
            },
        ));
        let req = ApplyRequest::from(&put);
        let options = ApplyOptions {
            set_clock_realtime: true,
            ..ApplyOptions::default()
        };
        let report = apply_request(&mut kvm, &req, &options).expect("applied");
        let k = report.kvmclock.expect("kvm-clock set");
        let err = k.error_ns.expect("measured");
        assert!(
            (0..=50).contains(&err),
            "bias {bias_ns}: landed {err} ns off the line"
        );
        assert!(k.within_max_error, "bias {bias_ns}: {k:?}");
        assert!(k
            .try_errors_ns
            .iter()
            .take(k.try_errors_ns.len() - 1)
            .all(|e| !(0..=50).contains(e)));
    }
}

/// A calibrated follow of the source line on a fake kernel whose
/// KVM_SET_CLOCK calls have these biases (with or without
/// KVM_CLOCK_REALTIME): the kvm-clock outcome.
fn follow_with_biases(biases_ns: &[i64], realtime: bool, max_tries: u32) -> KvmclockOutcome {
    let mut kvm = FakeKvm::new(2);
    kvm.set_clock_biases_ns = biases_ns.to_vec();
    let req = request(
        &kvm,
        4_000,
        ClockRequest::Follow {
            pvti: source_pvti(),
            max_error_ns: 50,
            via: FollowVia::SetClock,
        },
    );
    let options = ApplyOptions {
        set_clock_realtime: realtime,
        max_set_clock_tries: max_tries,
        ..ApplyOptions::default()
    };
    let report = apply_request(&mut kvm, &req, &options).expect("applied");
    report.kvmclock.expect("kvm-clock set")
}

/// One preempted KVM_SET_CLOCK (its realtime read 5 us late) must not
/// push the next call below the line: the loop corrects with the bias of
/// the least-delayed call, not the last one. With the last one's bias the
/// third call landed 4975 ns below the line and, at a limit of 3 tries,
/// stayed there.
#[test]
fn a_preempted_set_clock_does_not_push_the_next_below_the_line() {
    for (biases_ns, max_tries) in [
        (vec![100i64, 5_100, 100], 3u32),
        (vec![100, 5_100, 100, 9_100, 100], 5),
        (vec![100, 300, 5_100, 100], 4),
    ] {
        let k = follow_with_biases(&biases_ns, true, max_tries);
        let err = k.error_ns.expect("measured");
        assert!(
            (0..=50).contains(&err) && k.within_max_error,
            "biases {biases_ns:?}: landed {err} ns off the line, tries {:?}",
            k.try_errors_ns
        );
        // No try after the first lands below the line: the preempted
        // call lands high, the ones after it back in the window.
        assert!(
            k.try_errors_ns.iter().all(|e| *e >= 0),
            "biases {biases_ns:?}: tries {:?}",
            k.try_errors_ns
        );
    }
}

/// Without KVM_CLOCK_REALTIME a preempted call's snapshot comes late and
/// that call lands below its aim; the call after it must land above the
/// line (never below), and the loop must come back into the window.
#[test]
fn without_realtime_a_preempted_set_clock_keeps_the_next_above_the_line() {
    for biases_ns in [vec![5_100i64, 100, 100], vec![100, 5_100, 100, 100]] {
        let k = follow_with_biases(&biases_ns, false, DEFAULT_SET_CLOCK_TRIES);
        let errs = &k.try_errors_ns;
        let late = biases_ns
            .iter()
            .position(|b| *b > 1_000)
            .expect("a late call");
        assert!(errs.len() > late, "biases {biases_ns:?}: tries {errs:?}");
        assert!(errs[late] < 0, "the late call lands low: {errs:?}");
        assert!(
            errs.iter().skip(late + 1).all(|e| *e >= 0),
            "biases {biases_ns:?}: a try after the late one below the line: {errs:?}"
        );
        assert!(k.within_max_error, "back in the window: {errs:?}");
    }
}

/// Capture goes through the same ops: a fault on a vCPU's offset read is
/// named, and nothing is written.
#[test]
fn capture_through_the_ops_names_a_faulting_vcpu() {
    let mut kvm = FakeKvm::new(3);
    kvm.fault = Some((Op::GetOffset, 2, libc::EIO));
    let caps = clockcarry::model::Capabilities::default();
    let err =
        clockcarry::kvm::capture_with(&mut kvm, &caps, None, clockcarry::model::RunState::Paused)
            .expect_err("the fault surfaces");
    let text = err.to_string();
    assert!(text.contains("vCPU 2"), "{text}");
    assert!(kvm
        .log
        .iter()
        .all(|c| !matches!(c, Call::SetOffset(..) | Call::SetClock(..))));
    let mut kvm = FakeKvm::new(3);
    let vm =
        clockcarry::kvm::capture_with(&mut kvm, &caps, None, clockcarry::model::RunState::Paused)
            .expect("captured");
    assert_eq!(vm.offsets(), kvm.offsets);
    assert_eq!(vm.tsc_khz, KHZ);
}
