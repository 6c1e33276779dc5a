//! The KVM layer on this machine's /dev/kvm, checked from the guest's side.
//!
//! Every test prints `SKIP: <reason>` and returns when /dev/kvm is absent or
//! cannot be opened (a skip is not a pass: read the output). Tests that
//! need TSC offset writes to take effect print
//! `SKIP: TSC offsets are inert on this host` where the probe finds them
//! inert (kvm_pvm). Run with `-- --nocapture` to see the figures.
#![cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use clockcarry::kvm::guest::{GuestReading, TestVm};
use clockcarry::kvm::selftest::{run_destination, run_source, same_host_roundtrip, SourceCapture};
use clockcarry::kvm::{
    apply, apply_with, capture, sys, ApplyError, ApplyOptions, ApplyStep, ClockOps, KvmError,
    KvmOps, KvmProbe,
};
use clockcarry::model::{
    ClockPolicy, KvmClockSample, Policy, Pvti, PvtiSource, RunState, KVM_CLOCK_HOST_TSC,
    KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE,
};
use clockcarry::plan::{ErrorBound, KvmClockAction, Plan, PlanMode};
use clockcarry::pvclock::{cycles_to_ns, derive_pvti, pvclock_read};
use clockcarry::sidecar::{Sidecar, SidecarBody};
use kvm_ioctls::{Kvm, VcpuFd};

/// The acceptance bound of the round trip's kvm-clock step, ns.
const MAX_STEP_NS: i64 = 1000;
/// The goal.
const GOAL_STEP_NS: i64 = 50;
const CHILD_ENV: &str = "CLOCKCARRY_KVM_TEST_CHILD_DIR";

/// Timing-sensitive tests run one at a time.
static KVM_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    KVM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_kvm() -> Option<Kvm> {
    match TestVm::open_kvm() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            println!("SKIP: /dev/kvm cannot be used: {e}");
            None
        }
    }
}

fn probe(kvm: &Kvm) -> KvmProbe {
    let vm = TestVm::new(kvm, 1).expect("a 1-vCPU VM for the probe");
    KvmProbe::run(kvm, &vm.vm, &vm.vcpus[0])
}

/// False (with a SKIP line) when KVM is not in master-clock mode after a run:
/// the round trip cannot be verified there.
fn master_clock_or_skip(vm: &TestVm) -> bool {
    let flags = sys::get_clock(&vm.vm).map(|s| s.flags).unwrap_or(0);
    if flags & KVM_CLOCK_HOST_TSC == 0 {
        println!("SKIP: KVM_GET_CLOCK flags {flags} after a run: not in master-clock mode");
        return false;
    }
    true
}

#[test]
fn probe_reports_what_the_kernel_offers() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let p = probe(&kvm);
    println!(
        "probe: {}",
        serde_json::to_string_pretty(&p).expect("probe serialises")
    );
    println!(
        "tsc_offsets_effective = {} (inert: {})",
        p.capabilities().tsc_offset_effective,
        (p.tsc_offset_effective == Some(false))
    );
    assert!(p.adjust_clock_flags & KVM_CLOCK_TSC_STABLE != 0, "{p:?}");
    assert!(p.scratch_vm, "scratch VM did not run: {:?}", p.notes);
    if p.get_tsc_khz_cap {
        assert!(p.vcpu_tsc_khz.is_some_and(|k| k > 0), "{p:?}");
    }
    if p.tsc_offset_attr {
        let t = p.tsc_offset_test.expect("offset write test done");
        assert!(t.restored, "{t:?}");
        assert_eq!(
            p.tsc_offset_effective,
            Some(t.read_back_cycles == t.wrote_cycles)
        );
    }
    if !p.clock_guest {
        println!(
            "KVM_GET_CLOCK_GUEST absent (errno {:?}; tried with KVM_GET_CLOCK flags {})",
            p.clock_guest_errno, p.clock_guest_try_flags
        );
    }
    assert_eq!(p.capabilities().adjust_clock, p.adjust_clock_flags);
}

#[test]
fn fresh_vm_reports_master_clock_only_after_a_run() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let mut vm = TestVm::new(&kvm, 1).expect("VM");
    let before = sys::get_clock(&vm.vm).expect("KVM_GET_CLOCK");
    vm.run_report().expect("guest reports");
    let after = sys::get_clock(&vm.vm).expect("KVM_GET_CLOCK");
    println!(
        "KVM_GET_CLOCK flags: fresh VM {}, after one run {}",
        before.flags, after.flags
    );
    if !master_clock_or_skip(&vm) {
        return;
    }
    assert_eq!(
        after.flags,
        KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC
    );
    assert!(after.realtime_ns > 0 && after.host_tsc > 0);
}

#[test]
fn capture_reads_the_guest_pvti_and_agrees_with_the_clock_pair() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let p = probe(&kvm);
    let caps = p.capabilities();
    let mut vm = TestVm::new(&kvm, 3).expect("VM");
    vm.run_report().expect("report");
    let reading = vm.run_report().expect("report");
    if !master_clock_or_skip(&vm) {
        return;
    }
    let reader = |gpa: u64| vm.memory().read_32(gpa);
    let clock =
        capture(&vm.vm, &vm.vcpus, &caps, Some(&reader), RunState::Running).expect("capture");
    println!("capture: {}", serde_json::to_string(&clock).expect("json"));
    assert_eq!(clock.vcpus.len(), 3);
    assert_eq!(clock.capabilities, caps);
    assert!(clock.tsc_khz > 0);
    let expected_source = if caps.clock_guest {
        PvtiSource::KernelClockGuest
    } else {
        PvtiSource::GuestMemory
    };
    assert_eq!(clock.pvti_source, Some(expected_source));
    let pvti = clock.pvti.expect("PVTI captured");
    if expected_source == PvtiSource::GuestMemory {
        assert_eq!(Some(pvti), reading.pvti, "the page the guest used");
    }

    // The KVM_GET_CLOCK pair lies on the guest's line: the PVTI the planner
    // would derive from it agrees with the page.
    let derived = derive_pvti(
        clock.kvmclock.clock_ns,
        clock.kvmclock.host_tsc,
        clock.vcpus[0].tsc_offset,
        None,
        clock.tsc_khz,
    )
    .expect("derived PVTI");
    assert_eq!(
        (derived.tsc_to_system_mul, derived.tsc_shift),
        (pvti.tsc_to_system_mul, pvti.tsc_shift),
        "KVM's scale for {} kHz",
        clock.tsc_khz
    );
    let at = clock.kvmclock.host_tsc;
    let diff = i128::from(pvclock_read(&derived, at)) - i128::from(pvclock_read(&pvti, at));
    println!("derived line - guest line at the GET_CLOCK TSC: {diff} ns");
    assert!(
        diff.abs() <= 10,
        "derived and guest lines differ by {diff} ns"
    );

    // Without a reader (and without CLOCK_GUEST) there is no PVTI: the
    // planner derives it.
    if !caps.clock_guest {
        let bare = capture(&vm.vm, &vm.vcpus, &caps, None, RunState::Paused).expect("capture");
        assert_eq!((bare.pvti, bare.pvti_source), (None, None));
    }
    // What capture produces is a valid sidecar.
    let sample = clockcarry::host::sample(16, clock.tsc_khz).expect("host sample");
    let identity = clockcarry::host::identity(clock.tsc_khz).expect("identity");
    Sidecar::seal(
        SidecarBody::new("capture-test", identity, sample, clock),
        None,
    )
    .expect("valid sidecar");
}

fn check_step(what: &str, step_ns: i64, monotonic: bool) {
    println!("{what}: kvmclock_step_ns = {step_ns}, monotonic = {monotonic}");
    if step_ns.abs() > GOAL_STEP_NS {
        println!("{what}: note: |step| above the {GOAL_STEP_NS} ns goal");
    }
    assert!(
        step_ns.abs() <= MAX_STEP_NS,
        "{what}: step {step_ns} ns beyond {MAX_STEP_NS} ns"
    );
    assert!(
        monotonic,
        "{what}: kvm-clock went backwards across the switch"
    );
}

#[test]
fn same_host_roundtrip_keeps_kvmclock_on_the_source_line() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let p = probe(&kvm);
    {
        let mut vm = TestVm::new(&kvm, 1).expect("VM");
        vm.run_report().expect("report");
        if !master_clock_or_skip(&vm) {
            return;
        }
    }
    let o = same_host_roundtrip(&kvm, 4, &p, &Policy::default()).expect("round trip");
    println!(
        "apply: {}",
        serde_json::to_string(&o.apply).expect("report serialises")
    );
    assert_eq!(o.plan_mode, PlanMode::SameHost);
    let k = o.apply.kvmclock.as_ref().expect("kvmclock outcome");
    assert_eq!(
        k.method,
        if p.clock_guest {
            "clock_guest"
        } else {
            "set_clock"
        }
    );
    // vCPUs 1..3 never enabled kvm-clock: KVMCLOCK_CTRL refused there only.
    let refused: Vec<u32> = o.apply.refused.iter().filter_map(|r| r.vcpu).collect();
    assert_eq!(refused, vec![1, 2, 3]);
    assert_eq!(
        o.apply.tsc_offsets_effective,
        p.tsc_offset_effective != Some(false)
    );
    // KVM_GET_CLOCK's verdict and the guest's agree.
    if let Some(err) = k.error_ns {
        println!(
            "apply's own error {err} ns vs guest-side step {} ns",
            o.kvmclock_step_ns
        );
        assert!(
            (err - o.kvmclock_step_ns).abs() <= 20,
            "{err} vs {}",
            o.kvmclock_step_ns
        );
    }
    // The guest saw KVMCLOCK_CTRL's PVCLOCK_GUEST_STOPPED.
    println!("destination PVTI flags {:#x}", o.destination_pvti.flags);
    check_step("same host", o.kvmclock_step_ns, o.monotonic);
}

#[derive(serde::Deserialize, serde::Serialize)]
struct ChildResult {
    pid: u32,
    kvmclock_step_ns: i64,
    monotonic: bool,
    plan_mode: String,
}

fn child_destination(dir: &Path) {
    let kvm = TestVm::open_kvm().expect("the parent could open /dev/kvm");
    let sidecar = Sidecar::read_from(&dir.join("a.sidecar.json"), None).expect("sidecar");
    let reading: GuestReading =
        serde_json::from_slice(&std::fs::read(dir.join("a.reading.json")).expect("reading file"))
            .expect("reading JSON");
    let p = probe(&kvm);
    let source = SourceCapture {
        sidecar: sidecar.body,
        last_reading: reading,
    };
    let o = run_destination(&kvm, &source, &p, &Policy::default()).expect("destination");
    let result = ChildResult {
        pid: std::process::id(),
        kvmclock_step_ns: o.kvmclock_step_ns,
        monotonic: o.monotonic,
        plan_mode: format!("{:?}", o.plan_mode),
    };
    println!(
        "CHILD-RESULT {}",
        serde_json::to_string(&result).expect("json")
    );
}

#[test]
fn roundtrip_across_processes() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child_destination(Path::new(&dir));
        return;
    }
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let p = probe(&kvm);
    let (a, source) = run_source(&kvm, 2, 3, &p).expect("source");
    if !master_clock_or_skip(&a) {
        return;
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("clockcarry-kvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    Sidecar::seal(source.sidecar.clone(), None)
        .expect("seal")
        .write_to(&dir.join("a.sidecar.json"))
        .expect("write sidecar");
    std::fs::write(
        dir.join("a.reading.json"),
        serde_json::to_vec(&source.last_reading).expect("json"),
    )
    .expect("write reading");
    // KVM fds are close-on-exec: the child shares none of them.
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "roundtrip_across_processes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .output()
        .expect("spawn child");
    let _ = std::fs::remove_dir_all(&dir);
    drop(a);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, json)| json))
        .unwrap_or_else(|| panic!("no CHILD-RESULT in:\n{stdout}"));
    let r: ChildResult = serde_json::from_str(line).expect("child JSON");
    assert_ne!(r.pid, std::process::id());
    assert_eq!(r.plan_mode, "SameHost");
    check_step("across processes", r.kvmclock_step_ns, r.monotonic);
}

/// Real KVM ops that fail KVM_SET_DEVICE_ATTR(TSC_OFFSET) once on one vCPU.
struct FailOnVcpu<'a> {
    inner: KvmOps<'a, VcpuFd>,
    vcpu: usize,
    fired: bool,
}

impl ClockOps for FailOnVcpu<'_> {
    fn vcpu_count(&self) -> usize {
        self.inner.vcpu_count()
    }
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, KvmError> {
        self.inner.get_tsc_khz(vcpu)
    }
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), KvmError> {
        self.inner.set_tsc_khz(vcpu, khz)
    }
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, KvmError> {
        self.inner.get_tsc_offset(vcpu)
    }
    fn set_tsc_offset(&mut self, vcpu: usize, offset_cycles: i64) -> Result<(), KvmError> {
        if vcpu == self.vcpu && !self.fired {
            self.fired = true;
            return Err(KvmError::Ioctl {
                ioctl: "KVM_SET_DEVICE_ATTR(TSC_OFFSET)",
                vcpu: None,
                errno: libc::EIO,
            });
        }
        self.inner.set_tsc_offset(vcpu, offset_cycles)
    }
    fn get_clock(&mut self) -> Result<KvmClockSample, KvmError> {
        self.inner.get_clock()
    }
    fn set_clock(&mut self, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError> {
        self.inner.set_clock(clock_ns, realtime_ns, flags)
    }
    fn set_clock_guest(&mut self, vcpu: usize, pvti: &Pvti) -> Result<(), KvmError> {
        self.inner.set_clock_guest(vcpu, pvti)
    }
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), KvmError> {
        self.inner.kvmclock_ctrl(vcpu)
    }
}

/// A plan for `vm` itself: offsets moved by `delta_cycles`, kvm-clock kept
/// on its own line (derived from a KVM_GET_CLOCK pair).
fn self_plan(vm: &TestVm, delta_cycles: i64) -> Plan {
    let caps = clockcarry::model::Capabilities::default();
    let clock = capture(&vm.vm, &vm.vcpus, &caps, None, RunState::Paused).expect("capture");
    let offset0 = clock.vcpus[0].tsc_offset;
    let pvti = derive_pvti(
        clock.kvmclock.clock_ns,
        clock.kvmclock.host_tsc,
        offset0,
        None,
        clock.tsc_khz,
    )
    .expect("line");
    let offsets: Vec<i64> = clock
        .offsets()
        .iter()
        .map(|o| o.wrapping_add(delta_cycles))
        .collect();
    let host_tsc = clockcarry::host::read_host_tsc();
    let guest_tsc_target = host_tsc.wrapping_add(offsets[0] as u64);
    Plan {
        mode: PlanMode::SameHost,
        policy: ClockPolicy::KeepRunning,
        tsc_khz: None,
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
        guest_tsc_at_capture: guest_tsc_target,
        guest_tsc_target,
        destination_host_tsc: host_tsc,
        error_bound: ErrorBound::default(),
        notes: Vec::new(),
    }
}

#[test]
fn fault_on_vcpu_2_of_4_rolls_back_through_real_ioctls() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let p = probe(&kvm);
    let mut vm = TestVm::new(&kvm, 4).expect("VM");
    vm.run_report().expect("report");
    let before: Vec<i64> = vm
        .vcpus
        .iter()
        .map(|v| sys::get_tsc_offset(v).expect("offset"))
        .collect();
    let plan = self_plan(&vm, 1_000_000_000);
    let mut ops = FailOnVcpu {
        inner: KvmOps::new(&vm.vm, &vm.vcpus),
        vcpu: 2,
        fired: false,
    };
    let err = apply_with(&mut ops, &plan, &ApplyOptions::from_probe(&p)).expect_err("fault");
    println!("{err}");
    assert_eq!(err.step(), Some(ApplyStep::Offset { vcpu: 2 }));
    let rb = err.rollback().expect("rollback");
    assert_eq!(rb.offsets_restored_vcpus, 3);
    assert!(rb.failures.is_empty(), "{rb:?}");
    assert_eq!(rb.clock_restored, None);
    let after: Vec<i64> = vm
        .vcpus
        .iter()
        .map(|v| sys::get_tsc_offset(v).expect("offset"))
        .collect();
    assert_eq!(after, before);
    if p.tsc_offset_effective == Some(false) {
        println!(
            "SKIP: TSC offsets are inert on this host: equal offsets prove nothing here \
             (tests/kvm_apply.rs checks the values on a model)"
        );
    }
}

#[test]
fn offsets_take_effect_in_the_guest() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let p = probe(&kvm);
    if !p.capabilities().tsc_offset_effective {
        println!("SKIP: TSC offsets are inert on this host");
        return;
    }
    let mut vm = TestVm::new(&kvm, 2).expect("VM");
    let r0 = vm.run_report().expect("report");
    let delta: i64 = 10_000_000_000;
    let plan = self_plan(&vm, delta);
    let report = apply_with(
        &mut KvmOps::new(&vm.vm, &vm.vcpus),
        &plan,
        &ApplyOptions::from_probe(&p),
    )
    .expect("apply");
    assert!(report.tsc_offsets_effective);
    let host_before = clockcarry::host::read_host_tsc();
    let r1 = vm.run_report().expect("report");
    let host_after = clockcarry::host::read_host_tsc();
    let off = plan.tsc_offsets[0];
    assert!(r1.guest_tsc >= host_before.wrapping_add(off as u64));
    assert!(r1.guest_tsc <= host_after.wrapping_add(off as u64));
    assert!(r1.guest_tsc > r0.guest_tsc);
    let k = report.kvmclock.expect("kvmclock");
    println!(
        "offsets moved by {delta}; kvm-clock error {:?} ns",
        k.error_ns
    );
}

#[test]
fn bad_plans_are_refused_on_a_real_vm_without_touching_it() {
    let _g = lock();
    let Some(kvm) = open_kvm() else { return };
    let mut vm = TestVm::new(&kvm, 2).expect("VM");
    vm.run_report().expect("report");
    let good = self_plan(&vm, 0);
    let before = sys::get_clock(&vm.vm).expect("clock");

    let mut short = good.clone();
    short.tsc_offsets.truncate(1);
    assert!(matches!(
        apply(&vm.vm, &vm.vcpus, &short),
        Err(ApplyError::VcpuCountMismatch { plan: 1, vm: 2 })
    ));
    let mut zero_khz = good.clone();
    zero_khz.tsc_khz = Some(0);
    assert!(matches!(
        apply(&vm.vm, &vm.vcpus, &zero_khz),
        Err(ApplyError::InvalidPlan { ref field, .. }) if field == "tsc_khz"
    ));
    let mut flat = good.clone();
    if let KvmClockAction::SetClock { pvti, .. } = &mut flat.kvmclock {
        pvti.tsc_to_system_mul = 0;
    }
    assert!(matches!(
        apply(&vm.vm, &vm.vcpus, &flat),
        Err(ApplyError::InvalidPlan { .. })
    ));
    let no_vcpus: [&VcpuFd; 0] = [];
    assert!(matches!(
        apply(&vm.vm, &no_vcpus, &good),
        Err(ApplyError::VcpuCountMismatch { plan: 2, vm: 0 })
    ));
    // kvm-clock still on its line: no KVM_SET_CLOCK happened.
    let after = sys::get_clock(&vm.vm).expect("clock");
    let khz = sys::vcpu_get_tsc_khz(&vm.vcpus[0]).expect("tsc khz");
    let elapsed_ns =
        cycles_to_ns(after.host_tsc.wrapping_sub(before.host_tsc), khz).expect("elapsed");
    let drift = i128::from(after.clock_ns) - i128::from(before.clock_ns) - i128::from(elapsed_ns);
    assert!(
        drift.abs() <= 10,
        "kvm-clock moved off its line by {drift} ns"
    );
    // And `apply` with `&[&VcpuFd]` works too.
    let refs: Vec<&VcpuFd> = vm.vcpus.iter().collect();
    let report = apply(&vm.vm, &refs, &good);
    match report {
        Ok(r) => println!(
            "self-apply: kvm-clock error {:?}",
            r.kvmclock.and_then(|k| k.error_ns)
        ),
        Err(e) => panic!("self-apply of an unchanged plan failed: {e}"),
    }
}
