//! The same-host round trip on real /dev/kvm, checked from the guest's side.
//!
//! VM A runs the [`super::guest`] program and reports; A is captured
//! (state Running) with a host (TSC, TAI) sample into a [`SidecarBody`]. A
//! fresh VM B with the same vCPU count runs once (so KVM is in master-clock
//! mode), is measured, planned for with [`crate::plan::plan`], applied with
//! [`super::apply_with`], and runs again. From B's first report after the
//! apply: `step = B's PVTI at B's guest TSC - A's PVTI at that same TSC`, and
//! `monotonic = A's last kvm-clock reading <= B's first`.
//!
//! The two halves are separate functions so the sidecar can cross into
//! another process between them.

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::apply::{apply_with, ApplyOptions};
use super::caps::KvmProbe;
use super::capture::capture;
use super::guest::{GuestError, GuestReading, TestVm};
use super::ops::KvmOps;
use super::outcome::{ApplyError, ApplyReport};
use super::KvmError;
use crate::host::{self, HostError};
use crate::model::{Policy, Pvti, RunState};
use crate::plan::{plan, Destination, PlanError, PlanMode};
use crate::sidecar::SidecarBody;

/// Brackets per host sample.
const SAMPLE_TRIES: u32 = 16;

/// Why the round trip could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    #[error("kvm: {0}")]
    Kvm(#[from] KvmError),
    #[error("host: {0}")]
    Host(#[from] HostError),
    #[error("plan: {0}")]
    Plan(#[from] PlanError),
    #[error("apply: {0}")]
    Apply(#[from] ApplyError),
    #[error("{0}")]
    Check(String),
}

/// What the source side hands to the destination side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCapture {
    pub sidecar: SidecarBody,
    /// A's last report before the capture (the PVTI its guest used).
    pub last_reading: GuestReading,
}

/// The round trip's result, as the example prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoundtripOutcome {
    /// B's kvm-clock minus A's line at B's first guest TSC after apply, ns.
    pub kvmclock_step_ns: i64,
    /// A's last kvm-clock reading <= B's first.
    pub monotonic: bool,
    pub plan_mode: PlanMode,
    pub source_pvti: Pvti,
    pub destination_pvti: Pvti,
    pub last_source: GuestReading,
    pub first_destination: GuestReading,
    /// The apply report (kvm-clock error per try, timings, refusals).
    pub apply: ApplyReport,
}

/// Runs VM A for `reports` reports and captures it.
pub fn run_source(
    kvm: &Kvm,
    vcpu_count: u32,
    reports: u32,
    probe: &KvmProbe,
) -> Result<(TestVm, SourceCapture), SelftestError> {
    let mut a = TestVm::new(kvm, vcpu_count)?;
    let mut last = a.run_report()?;
    for _ in 1..reports.max(2) {
        last = a.run_report()?;
    }
    if last.pvti.is_none() {
        return Err(SelftestError::Check(
            "VM A's guest has no PVTI after its reports".into(),
        ));
    }
    let caps = probe.capabilities();
    let reader = |gpa: u64| a.memory().read_32(gpa);
    let vm_clock = capture(&a.vm, &a.vcpus, &caps, Some(&reader), RunState::Running)?;
    let sample = host::sample(SAMPLE_TRIES, vm_clock.tsc_khz)?;
    let identity = host::identity(vm_clock.tsc_khz)?;
    let sidecar = SidecarBody::new("clockcarry-selftest-a", identity, sample, vm_clock);
    Ok((
        a,
        SourceCapture {
            sidecar,
            last_reading: last,
        },
    ))
}

/// A fresh VM B, run once, planned for, applied to, and run again.
pub fn run_destination(
    kvm: &Kvm,
    source: &SourceCapture,
    probe: &KvmProbe,
    policy: &Policy,
) -> Result<RoundtripOutcome, SelftestError> {
    let vcpu_count = source.sidecar.vm.vcpu_count;
    let mut b = TestVm::new(kvm, vcpu_count)?;
    // One KVM_RUN: KVM_GET_CLOCK reports flags 14 (master clock) from now on.
    b.run_report()?;
    let caps = probe.capabilities();
    let reader = |gpa: u64| b.memory().read_32(gpa);
    let vm = capture(&b.vm, &b.vcpus, &caps, Some(&reader), RunState::Paused)?;
    let sample = host::sample(SAMPLE_TRIES, vm.tsc_khz)?;
    let identity = host::identity(vm.tsc_khz)?;
    let dst = Destination {
        identity,
        sample,
        vm,
        vm_id: None,
        offset_estimate: None,
    };
    // B is a fresh VM that ran, not one loaded with A's state: its memory
    // holds its own kvm-clock line, so the restored-state check cannot apply.
    let policy = Policy {
        verify_vm_state: false,
        ..policy.clone()
    };
    let plan = plan(&source.sidecar, &dst, &policy)?;
    let options = ApplyOptions::from_probe(probe);
    let report = apply_with(&mut KvmOps::new(&b.vm, &b.vcpus), &plan, &options)?;
    let first = b.run_report()?;
    outcome(source, first, plan.mode, report)
}

fn outcome(
    source: &SourceCapture,
    first: GuestReading,
    plan_mode: PlanMode,
    apply: ApplyReport,
) -> Result<RoundtripOutcome, SelftestError> {
    let last = source.last_reading;
    let (Some(source_pvti), Some(last_ns)) = (last.pvti, last.kvmclock_ns) else {
        return Err(SelftestError::Check("VM A's reading has no PVTI".into()));
    };
    let (Some(destination_pvti), Some(first_ns)) = (first.pvti, first.kvmclock_ns) else {
        return Err(SelftestError::Check(
            "VM B's guest has no PVTI after apply".into(),
        ));
    };
    let a_at_same_tsc = crate::pvclock::line_at_ns(&source_pvti, first.guest_tsc);
    let step = i128::from(first_ns) - a_at_same_tsc;
    Ok(RoundtripOutcome {
        kvmclock_step_ns: i64::try_from(step).unwrap_or(i64::MAX),
        monotonic: last_ns <= first_ns,
        plan_mode,
        source_pvti,
        destination_pvti,
        last_source: last,
        first_destination: first,
        apply,
    })
}

/// Both halves in one process.
pub fn same_host_roundtrip(
    kvm: &Kvm,
    vcpu_count: u32,
    probe: &KvmProbe,
    policy: &Policy,
) -> Result<RoundtripOutcome, SelftestError> {
    let (_a, source) = run_source(kvm, vcpu_count, 3, probe)?;
    run_destination(kvm, &source, probe, policy)
}
