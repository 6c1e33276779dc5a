//! Apply a [`Plan`] (or an [`ApplyRequest`], what a `PUT vm.clock` asks) to
//! a VM: frequency -> all offsets back to back -> KVM_SET_CLOCK_GUEST, a
//! calibrated KVM_SET_CLOCK, one raw KVM_SET_CLOCK or nothing ->
//! KVMCLOCK_CTRL on each vCPU -> read every offset back. On any failure the
//! previous frequency, offsets and kvm-clock are put back and the error
//! names the step.
//!
//! The ioctls sit behind the narrow [`ClockOps`] trait (one real
//! implementation, [`KvmOps`], on kvm-ioctls fds), so ordering and rollback
//! can be tested with a fault-injecting implementation.

use std::borrow::Borrow;
use std::fmt;
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};
use serde::Serialize;

use super::caps::KvmProbe;
use super::{elapsed_ns, sys, KvmError};
use crate::model::{KvmClockSample, Pvti, TscScaling, KVM_CLOCK_REALTIME};
use crate::plan::{KvmClockAction, Plan};
use crate::pvclock::{guest_tsc, scale_delta};
use crate::vmclock_api::{ClockPut, KvmClockPut};

/// KVM_SET_CLOCK tries of the calibration loop unless told otherwise.
pub const DEFAULT_SET_CLOCK_TRIES: u32 = 8;
/// |error| accepted after KVM_SET_CLOCK_GUEST, ns: the line is installed
/// exactly; KVM_GET_CLOCK's own conversion may truncate differently by 1 ns.
pub const CLOCK_GUEST_MAX_ERROR_NS: u64 = 1;
/// Highest guest TSC rate a plan may ask for, kHz (100 GHz).
pub const MAX_PLAN_TSC_KHZ: u32 = 100_000_000;

/// The clock ioctls apply needs, on vCPU indices `0..vcpu_count()`.
///
/// Errors must name the ioctl and errno ([`KvmError::Ioctl`]); apply
/// attributes them to the vCPU.
pub trait ClockOps {
    fn vcpu_count(&self) -> usize;
    /// KVM_GET_TSC_KHZ (vCPU).
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, KvmError>;
    /// KVM_SET_TSC_KHZ (vCPU).
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), KvmError>;
    /// KVM_GET_DEVICE_ATTR(TSC_OFFSET).
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, KvmError>;
    /// KVM_SET_DEVICE_ATTR(TSC_OFFSET).
    fn set_tsc_offset(&mut self, vcpu: usize, offset_cycles: i64) -> Result<(), KvmError>;
    /// KVM_GET_CLOCK.
    fn get_clock(&mut self) -> Result<KvmClockSample, KvmError>;
    /// KVM_SET_CLOCK.
    fn set_clock(&mut self, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError>;
    /// KVM_SET_CLOCK_GUEST (vCPU).
    fn set_clock_guest(&mut self, vcpu: usize, pvti: &Pvti) -> Result<(), KvmError>;
    /// KVM_KVMCLOCK_CTRL (vCPU).
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), KvmError>;
    /// The host TSC now (the counter KVM_GET_CLOCK reports as `host_tsc`).
    fn host_tsc(&mut self) -> u64 {
        crate::host::read_host_tsc()
    }
    /// A (host TSC, CLOCK_REALTIME ns) pair taken together: the narrowest of
    /// a few [`ClockOps::host_tsc`] brackets around a realtime read. `None`
    /// when CLOCK_REALTIME cannot be read.
    fn realtime_pair(&mut self) -> Option<(u64, u64)> {
        let mut best: Option<(u64, u64, u64)> = None;
        for _ in 0..8 {
            let a = self.host_tsc();
            let rt = crate::host::realtime_now_ns().ok()?;
            let b = self.host_tsc();
            let width = b.saturating_sub(a);
            if best.is_none_or(|(w, _, _)| width < w) {
                best = Some((width, a.saturating_add(width / 2), rt));
            }
        }
        best.map(|(_, tsc, rt)| (tsc, rt))
    }
}

/// What a `PUT vm.clock` asks of the VM (see docs/kvm.md and the design's
/// "The VMM clock API"): [`apply_request`] runs it; [`apply_with`] turns a
/// [`Plan`] into one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyRequest {
    /// Set the guest TSC rate first (`None`: leave it).
    pub tsc_khz: Option<u32>,
    /// One offset per vCPU, in vCPU order.
    pub tsc_offsets: Vec<i64>,
    pub kvmclock: ClockRequest,
}

/// What to do with kvm-clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockRequest {
    /// Make kvm-clock follow `pvti` (`follow_pvti`), by the means `via` says;
    /// a calibrated KVM_SET_CLOCK stops within `max_error_ns`.
    Follow {
        pvti: Pvti,
        max_error_ns: u64,
        via: FollowVia,
    },
    /// One KVM_SET_CLOCK as given (`set_clock`): no line to verify.
    Raw {
        clock_ns: u64,
        realtime_ns: u64,
        flags: u32,
    },
    /// Leave kvm-clock alone (`"kvmclock": null`): no clock call at all.
    Leave,
}

/// How [`ClockRequest::Follow`] sets the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FollowVia {
    /// KVM_SET_CLOCK_GUEST when [`ApplyOptions::clock_guest`] says the kernel
    /// has it, else KVM_SET_CLOCK aimed at the line (at a fresh (host TSC,
    /// realtime) pair when [`ApplyOptions::set_clock_realtime`]) and corrected
    /// in the calibration loop. What a `PUT vm.clock` `follow_pvti` means.
    #[default]
    Best,
    /// KVM_SET_CLOCK_GUEST (a plan's [`KvmClockAction::ClockGuest`]).
    ClockGuest,
    /// The calibrated KVM_SET_CLOCK from this first aim (a plan's
    /// [`KvmClockAction::SetClock`], aimed by the planner).
    SetClock {
        clock_ns: u64,
        realtime_ns: u64,
        flags: u32,
    },
}

impl From<&Plan> for ApplyRequest {
    fn from(plan: &Plan) -> Self {
        let kvmclock = match plan.kvmclock {
            KvmClockAction::ClockGuest { pvti } => ClockRequest::Follow {
                pvti,
                max_error_ns: CLOCK_GUEST_MAX_ERROR_NS,
                via: FollowVia::ClockGuest,
            },
            KvmClockAction::SetClock {
                clock_ns,
                realtime_ns,
                flags,
                pvti,
                max_error_ns,
            } => ClockRequest::Follow {
                pvti,
                max_error_ns,
                via: FollowVia::SetClock {
                    clock_ns,
                    realtime_ns,
                    flags,
                },
            },
        };
        ApplyRequest {
            tsc_khz: plan.tsc_khz,
            tsc_offsets: plan.tsc_offsets.clone(),
            kvmclock,
        }
    }
}

/// A `PUT vm.clock` body as a request: `follow_pvti` -> [`FollowVia::Best`],
/// `set_clock` -> [`ClockRequest::Raw`], `null` -> [`ClockRequest::Leave`].
impl From<&ClockPut> for ApplyRequest {
    fn from(body: &ClockPut) -> Self {
        let kvmclock = match body.kvmclock {
            Some(KvmClockPut::FollowPvti(f)) => ClockRequest::Follow {
                pvti: f.pvti(),
                max_error_ns: f.max_error_ns,
                via: FollowVia::Best,
            },
            Some(KvmClockPut::SetClock(s)) => ClockRequest::Raw {
                clock_ns: s.clock,
                realtime_ns: s.realtime,
                flags: s.flags,
            },
            None => ClockRequest::Leave,
        };
        ApplyRequest {
            tsc_khz: body.tsc_khz,
            tsc_offsets: body.tsc_offsets.clone(),
            kvmclock,
        }
    }
}

/// [`ClockOps`] on a kvm-ioctls VM and its vCPUs (`&[VcpuFd]` or `&[&VcpuFd]`).
pub struct KvmOps<'a, V: Borrow<VcpuFd>> {
    vm: &'a VmFd,
    vcpus: &'a [V],
}

impl<'a, V: Borrow<VcpuFd>> KvmOps<'a, V> {
    pub fn new(vm: &'a VmFd, vcpus: &'a [V]) -> Self {
        KvmOps { vm, vcpus }
    }

    fn vcpu(&self, index: usize) -> Result<&VcpuFd, KvmError> {
        self.vcpus
            .get(index)
            .map(Borrow::borrow)
            .ok_or(KvmError::NoSuchVcpu {
                vcpu: index,
                count: self.vcpus.len(),
            })
    }
}

impl<V: Borrow<VcpuFd>> ClockOps for KvmOps<'_, V> {
    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, KvmError> {
        sys::vcpu_get_tsc_khz(self.vcpu(vcpu)?)
    }
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), KvmError> {
        sys::vcpu_set_tsc_khz(self.vcpu(vcpu)?, khz)
    }
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, KvmError> {
        sys::get_tsc_offset(self.vcpu(vcpu)?)
    }
    fn set_tsc_offset(&mut self, vcpu: usize, offset_cycles: i64) -> Result<(), KvmError> {
        sys::set_tsc_offset(self.vcpu(vcpu)?, offset_cycles)
    }
    fn get_clock(&mut self) -> Result<KvmClockSample, KvmError> {
        sys::get_clock(self.vm)
    }
    fn set_clock(&mut self, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError> {
        sys::set_clock(self.vm, clock_ns, realtime_ns, flags)
    }
    fn set_clock_guest(&mut self, vcpu: usize, pvti: &Pvti) -> Result<(), KvmError> {
        sys::set_clock_guest(self.vcpu(vcpu)?, &(*pvti).into())
    }
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), KvmError> {
        sys::kvmclock_ctrl(self.vcpu(vcpu)?)
    }
}

/// Knobs of [`apply_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Most KVM_SET_CLOCK calls of the calibration loop (0 counts as 1).
    pub max_set_clock_tries: u32,
    /// The destination's TSC scaling, to turn KVM_GET_CLOCK's host TSC into
    /// guest TSC when verifying kvm-clock (`None` = unscaled).
    pub tsc_scaling: Option<TscScaling>,
    /// The probe found TSC offset writes inert ([`KvmProbe::tsc_offsets_inert`]):
    /// a read-back equal to the previous offsets is then reported as
    /// `tsc_offsets_effective: false` instead of failing the apply.
    pub tsc_offsets_inert: bool,
    /// KVM_SET_CLOCK_GUEST works here ([`KvmProbe::clock_guest`]): a
    /// [`FollowVia::Best`] request uses it.
    pub clock_guest: bool,
    /// KVM_SET_CLOCK takes KVM_CLOCK_REALTIME here (KVM_CAP_ADJUST_CLOCK):
    /// a [`FollowVia::Best`] request without CLOCK_GUEST aims at a (host TSC,
    /// realtime) pair.
    pub set_clock_realtime: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_set_clock_tries: DEFAULT_SET_CLOCK_TRIES,
            tsc_scaling: None,
            tsc_offsets_inert: false,
            clock_guest: false,
            set_clock_realtime: false,
        }
    }
}

impl ApplyOptions {
    /// Defaults, with what the probe found about offset writes, CLOCK_GUEST
    /// and KVM_CLOCK_REALTIME.
    pub fn from_probe(probe: &KvmProbe) -> Self {
        ApplyOptions {
            tsc_offsets_inert: probe.tsc_offsets_inert(),
            clock_guest: probe.clock_guest,
            set_clock_realtime: probe.adjust_clock_flags & KVM_CLOCK_REALTIME != 0,
            ..ApplyOptions::default()
        }
    }
}

/// The step of [`apply`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyStep {
    /// KVM_GET/SET_TSC_KHZ.
    Frequency,
    /// Reading or writing the TSC offset of this vCPU.
    Offset {
        vcpu: u32,
    },
    ClockGuest,
    SetClock,
    KvmclockCtrl,
    /// Reading the offsets back, or finding them different from the plan.
    Verify,
}

impl fmt::Display for ApplyStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyStep::Frequency => f.write_str("frequency"),
            ApplyStep::Offset { vcpu } => write!(f, "TSC offset of vCPU {vcpu}"),
            ApplyStep::ClockGuest => f.write_str("KVM_SET_CLOCK_GUEST"),
            ApplyStep::SetClock => f.write_str("KVM_SET_CLOCK"),
            ApplyStep::KvmclockCtrl => f.write_str("KVMCLOCK_CTRL"),
            ApplyStep::Verify => f.write_str("verify"),
        }
    }
}

/// One step done, and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// `read_offsets`, `frequency`, `offsets`, `clock_guest`, `set_clock`,
    /// `kvmclock_ctrl`, `verify`.
    pub name: &'static str,
    pub duration_ns: u64,
}

/// A call the kernel refused that apply tolerates (KVMCLOCK_CTRL's EINVAL
/// on a vCPU without a kvm-clock page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub step: ApplyStep,
    pub vcpu: Option<u32>,
    pub ioctl: &'static str,
    pub errno: i32,
}

/// How kvm-clock was set and how close it came to the plan's line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmclockOutcome {
    /// `clock_guest` or `set_clock`.
    pub method: &'static str,
    /// kvm-clock minus the plan's PVTI line, at the same instant, after the
    /// last call (KVM_GET_CLOCK's (clock, host_tsc) pair), ns. `None` when
    /// KVM_GET_CLOCK gave no host_tsc (not in master-clock mode).
    pub error_ns: Option<i64>,
    /// KVM_SET_CLOCK calls made (1 for CLOCK_GUEST).
    pub tries: u32,
    /// The error after each call, ns.
    pub try_errors_ns: Vec<i64>,
    /// The target of the loop (the plan's `max_error_ns`;
    /// [`CLOCK_GUEST_MAX_ERROR_NS`] for CLOCK_GUEST).
    pub max_error_ns: u64,
    /// `|error_ns| <= max_error_ns`.
    pub within_max_error: bool,
    /// vCPU 0's offset read back after the offsets step: the guest TSC the
    /// line was aimed at (differs from the plan where offsets are inert).
    pub aimed_with_offset_cycles: i64,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ApplyReport {
    pub steps: Vec<StepRecord>,
    /// The TSC rate set on every vCPU (`None`: unchanged).
    pub frequency_set_khz: Option<u32>,
    /// Each vCPU's offset before apply.
    pub previous_offsets: Vec<i64>,
    /// Each vCPU's offset read back at the end.
    pub offsets_read_back: Vec<i64>,
    /// The plan's offsets are in effect (false when the probe found offset
    /// writes inert, even if the values happen to match).
    pub tsc_offsets_effective: bool,
    pub kvmclock: Option<KvmclockOutcome>,
    /// Calls the kernel refused that apply tolerated.
    pub refused: Vec<Refusal>,
    pub total_ns: u64,
}

impl ApplyReport {
    /// Duration of the step named `name`, ns.
    pub fn step_ns(&self, name: &str) -> Option<u64> {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.duration_ns)
    }
}

/// What the rollback after a failure did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RollbackReport {
    /// vCPUs whose previous TSC rate was written back.
    pub frequency_restored_vcpus: u32,
    /// vCPUs whose previous offset was written back.
    pub offsets_restored_vcpus: u32,
    /// kvm-clock was re-aimed at its previous line (`None`: it was not touched).
    pub clock_restored: Option<bool>,
    /// Rollback calls that failed.
    pub failures: Vec<String>,
}

impl fmt::Display for RollbackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures.is_empty() {
            write!(
                f,
                "rolled back ({} offsets, {} frequencies{})",
                self.offsets_restored_vcpus,
                self.frequency_restored_vcpus,
                if self.clock_restored.is_some() {
                    ", kvm-clock"
                } else {
                    ""
                }
            )
        } else {
            write!(f, "ROLLBACK INCOMPLETE: {}", self.failures.join("; "))
        }
    }
}

/// Why [`apply`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the plan has {plan} TSC offsets but the VM has {vm} vCPUs; nothing was touched")]
    VcpuCountMismatch { plan: usize, vm: usize },
    #[error("plan field {field} refused: {reason}; nothing was touched")]
    InvalidPlan { field: &'static str, reason: String },
    #[error("apply failed at {step}: {source}; {rollback}")]
    Failed {
        step: ApplyStep,
        source: KvmError,
        rollback: RollbackReport,
        /// What had been done before the failure.
        report: Box<ApplyReport>,
    },
}

impl ApplyError {
    /// The failing step (`None` when the plan was refused up front).
    pub fn step(&self) -> Option<ApplyStep> {
        match self {
            ApplyError::Failed { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// The rollback report (`None` when nothing was touched).
    pub fn rollback(&self) -> Option<&RollbackReport> {
        match self {
            ApplyError::Failed { rollback, .. } => Some(rollback),
            _ => None,
        }
    }
}

/// Applies `plan` to `vm` / `vcpus` with [`ApplyOptions::default`] (offset
/// writes expected to take effect; an inert read-back fails the apply).
pub fn apply<V: Borrow<VcpuFd>>(
    vm: &VmFd,
    vcpus: &[V],
    plan: &Plan,
) -> Result<ApplyReport, ApplyError> {
    apply_with(&mut KvmOps::new(vm, vcpus), plan, &ApplyOptions::default())
}

/// What has been changed so far, to undo on failure.
#[derive(Default)]
struct Undo {
    /// Previous TSC rate of vCPUs `0..len` that were set.
    khz: Vec<u32>,
    khz_set: usize,
    offsets: Vec<i64>,
    offsets_written: usize,
    /// The clock before it was set, and when it was read.
    clock: Option<(KvmClockSample, Instant)>,
    clock_set: bool,
}

/// Applies `plan` through `ops`: [`apply_request`] on the plan's request
/// (its CLOCK_GUEST or calibrated SET_CLOCK, from the planner's aim).
pub fn apply_with<O: ClockOps + ?Sized>(
    ops: &mut O,
    plan: &Plan,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    apply_request(ops, &ApplyRequest::from(plan), options)
}

/// Applies `request` through `ops`. Never panics; see the module doc for the
/// order and docs/kvm.md for the rollback semantics.
pub fn apply_request<O: ClockOps + ?Sized>(
    ops: &mut O,
    request: &ApplyRequest,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let start = Instant::now();
    let n = ops.vcpu_count();
    validate(request, n)?;
    let mut report = ApplyReport::default();
    let mut undo = Undo::default();
    let result = run_steps(ops, request, options, &mut report, &mut undo);
    report.total_ns = elapsed_ns(start);
    match result {
        Ok(()) => Ok(report),
        Err((step, source)) => {
            let rollback = roll_back(ops, &undo);
            Err(ApplyError::Failed {
                step,
                source,
                rollback,
                report: Box::new(report),
            })
        }
    }
}

fn invalid(field: &'static str, reason: String) -> ApplyError {
    ApplyError::InvalidPlan { field, reason }
}

fn check_pvti(pvti: &Pvti) -> Result<(), ApplyError> {
    if pvti.tsc_to_system_mul == 0 {
        return Err(invalid(
            "kvmclock.pvti.tsc_to_system_mul",
            "is 0: the line would be flat".into(),
        ));
    }
    if !(-32..=32).contains(&pvti.tsc_shift) {
        return Err(invalid(
            "kvmclock.pvti.tsc_shift",
            format!("is {}; KVM produces -32..=32", pvti.tsc_shift),
        ));
    }
    Ok(())
}

/// Everything that can be refused without touching the VM.
fn validate(plan: &ApplyRequest, vcpu_count: usize) -> Result<(), ApplyError> {
    if vcpu_count == 0 || plan.tsc_offsets.len() != vcpu_count {
        return Err(ApplyError::VcpuCountMismatch {
            plan: plan.tsc_offsets.len(),
            vm: vcpu_count,
        });
    }
    if let Some(khz) = plan.tsc_khz {
        if khz == 0 || khz > MAX_PLAN_TSC_KHZ {
            return Err(invalid(
                "tsc_khz",
                format!("is {khz} kHz; 1..={MAX_PLAN_TSC_KHZ} kHz is accepted"),
            ));
        }
    }
    let set_clock = match plan.kvmclock {
        ClockRequest::Follow { pvti, via, .. } => {
            check_pvti(&pvti)?;
            match via {
                FollowVia::SetClock {
                    flags, realtime_ns, ..
                } => Some((flags, realtime_ns)),
                FollowVia::Best | FollowVia::ClockGuest => None,
            }
        }
        ClockRequest::Raw {
            flags, realtime_ns, ..
        } => Some((flags, realtime_ns)),
        ClockRequest::Leave => None,
    };
    if let Some((flags, realtime_ns)) = set_clock {
        if flags & !KVM_CLOCK_REALTIME != 0 {
            return Err(invalid(
                "kvmclock.set_clock.flags",
                format!("is {flags:#x}; only 0 or KVM_CLOCK_REALTIME (4) may be passed"),
            ));
        }
        if flags & KVM_CLOCK_REALTIME != 0 && realtime_ns == 0 {
            return Err(invalid(
                "kvmclock.set_clock.realtime_ns",
                "is 0 with KVM_CLOCK_REALTIME".into(),
            ));
        }
    }
    Ok(())
}

type StepError = (ApplyStep, KvmError);

fn vcpu_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

fn run_steps<O: ClockOps + ?Sized>(
    ops: &mut O,
    plan: &ApplyRequest,
    options: &ApplyOptions,
    report: &mut ApplyReport,
    undo: &mut Undo,
) -> Result<(), StepError> {
    let n = plan.tsc_offsets.len();
    let offset_step = |i: usize| ApplyStep::Offset { vcpu: vcpu_u32(i) };

    // Remember every current offset.
    let t = Instant::now();
    for i in 0..n {
        let off = ops
            .get_tsc_offset(i)
            .map_err(|e| (offset_step(i), e.on_vcpu(i)))?;
        undo.offsets.push(off);
    }
    report.previous_offsets.clone_from(&undo.offsets);
    record(report, "read_offsets", t);

    // Frequency, only when asked and different.
    if let Some(khz) = plan.tsc_khz {
        let t = Instant::now();
        let f = ApplyStep::Frequency;
        let current = ops.get_tsc_khz(0).map_err(|e| (f, e.on_vcpu(0)))?;
        if current != khz {
            for i in 0..n {
                let prev = ops.get_tsc_khz(i).map_err(|e| (f, e.on_vcpu(i)))?;
                undo.khz.push(prev);
            }
            for i in 0..n {
                // Counted before the call: a failed call may have half-applied.
                undo.khz_set = i + 1;
                ops.set_tsc_khz(i, khz).map_err(|e| (f, e.on_vcpu(i)))?;
            }
            report.frequency_set_khz = Some(khz);
        }
        record(report, "frequency", t);
    }

    // All offsets, back to back: one KVM TSC generation, master clock kept.
    let t = Instant::now();
    for (i, off) in plan.tsc_offsets.iter().enumerate() {
        undo.offsets_written = i + 1;
        ops.set_tsc_offset(i, *off)
            .map_err(|e| (offset_step(i), e.on_vcpu(i)))?;
    }
    // The guest TSC kvm-clock must be aimed at: what the kernel really uses.
    let offset0 = ops
        .get_tsc_offset(0)
        .map_err(|e| (offset_step(0), e.on_vcpu(0)))?;
    record(report, "offsets", t);

    // kvm-clock.
    let t = Instant::now();
    if let Some((step, outcome)) = set_kvmclock(ops, plan, options, offset0, undo)? {
        report.kvmclock = Some(outcome);
        record(
            report,
            match step {
                ApplyStep::ClockGuest => "clock_guest",
                _ => "set_clock",
            },
            t,
        );
    }

    // Tell each vCPU's guest it was stopped.
    let t = Instant::now();
    for i in 0..n {
        match ops.kvmclock_ctrl(i) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EINVAL) => report.refused.push(Refusal {
                step: ApplyStep::KvmclockCtrl,
                vcpu: Some(vcpu_u32(i)),
                ioctl: e.ioctl().unwrap_or("KVM_KVMCLOCK_CTRL"),
                errno: libc::EINVAL,
            }),
            Err(e) => return Err((ApplyStep::KvmclockCtrl, e.on_vcpu(i))),
        }
    }
    record(report, "kvmclock_ctrl", t);

    // Read every offset back.
    let t = Instant::now();
    for i in 0..n {
        let off = ops
            .get_tsc_offset(i)
            .map_err(|e| (ApplyStep::Verify, e.on_vcpu(i)))?;
        report.offsets_read_back.push(off);
    }
    let matches_plan = report.offsets_read_back == plan.tsc_offsets;
    let unchanged = report.offsets_read_back == undo.offsets;
    // Inert offsets (the probe said so) read back as they were: reported, not failed.
    let accepted = matches_plan || (options.tsc_offsets_inert && unchanged);
    if !accepted {
        let (i, (wanted, got)) = plan
            .tsc_offsets
            .iter()
            .zip(&report.offsets_read_back)
            .enumerate()
            .find(|(_, (w, g))| w != g)
            .unwrap_or((0, (&0, &0)));
        return Err((
            ApplyStep::Verify,
            KvmError::OffsetMismatch {
                vcpu: vcpu_u32(i),
                wanted_cycles: *wanted,
                read_back_cycles: *got,
            },
        ));
    }
    report.tsc_offsets_effective = matches_plan && !options.tsc_offsets_inert;
    record(report, "verify", t);
    Ok(())
}

/// The kvm-clock step of [`run_steps`]: the step and what it did (`None`
/// for [`ClockRequest::Leave`], which makes no call).
fn set_kvmclock<O: ClockOps + ?Sized>(
    ops: &mut O,
    request: &ApplyRequest,
    options: &ApplyOptions,
    offset0: i64,
    undo: &mut Undo,
) -> Result<Option<(ApplyStep, KvmclockOutcome)>, StepError> {
    let (pvti, max_error_ns, via) = match request.kvmclock {
        ClockRequest::Leave => return Ok(None),
        ClockRequest::Raw {
            clock_ns,
            realtime_ns,
            flags,
        } => {
            let step = ApplyStep::SetClock;
            let before = ops.get_clock().map_err(|e| (step, e))?;
            undo.clock = Some((before, Instant::now()));
            ops.set_clock(clock_ns, realtime_ns, flags)
                .map_err(|e| (step, e))?;
            undo.clock_set = true;
            // No line to verify against.
            let outcome = KvmclockOutcome {
                method: "set_clock",
                error_ns: None,
                tries: 1,
                try_errors_ns: Vec::new(),
                max_error_ns: u64::MAX,
                within_max_error: false,
                aimed_with_offset_cycles: offset0,
            };
            return Ok(Some((step, outcome)));
        }
        ClockRequest::Follow {
            pvti,
            max_error_ns,
            via,
        } => (pvti, max_error_ns, via),
    };
    let clock_guest = match via {
        FollowVia::ClockGuest => true,
        FollowVia::Best => options.clock_guest,
        FollowVia::SetClock { .. } => false,
    };
    let step = if clock_guest {
        ApplyStep::ClockGuest
    } else {
        ApplyStep::SetClock
    };
    let before = ops.get_clock().map_err(|e| (step, e))?;
    undo.clock = Some((before, Instant::now()));
    if clock_guest {
        ops.set_clock_guest(0, &pvti)
            .map_err(|e| (step, e.on_vcpu(0)))?;
        undo.clock_set = true;
        let sample = ops.get_clock().map_err(|e| (step, e))?;
        let error_ns = clock_error_ns(&sample, &pvti, options.tsc_scaling, offset0);
        let outcome = KvmclockOutcome {
            method: "clock_guest",
            error_ns,
            tries: 1,
            try_errors_ns: error_ns.into_iter().collect(),
            // Exact up to the truncation of KVM's two scale computations.
            max_error_ns: CLOCK_GUEST_MAX_ERROR_NS,
            within_max_error: error_ns
                .is_some_and(|e| e.unsigned_abs() <= CLOCK_GUEST_MAX_ERROR_NS),
            aimed_with_offset_cycles: offset0,
        };
        return Ok(Some((step, outcome)));
    }
    let (clock_ns, realtime_ns, flags) = match via {
        FollowVia::SetClock {
            clock_ns,
            realtime_ns,
            flags,
        } => (clock_ns, realtime_ns, flags),
        // Aim at the line at a (host TSC, realtime) pair taken now, with the
        // guest TSC the kernel really uses; without KVM_CLOCK_REALTIME the
        // loop aims at the line at the TSC of each call.
        FollowVia::Best | FollowVia::ClockGuest => match options
            .set_clock_realtime
            .then(|| ops.realtime_pair())
            .flatten()
        {
            Some((host_tsc, realtime_ns)) => {
                let tsc = guest_tsc(host_tsc, options.tsc_scaling, offset0);
                let aim = u64::try_from(line_at(&pvti, tsc).max(0)).unwrap_or(u64::MAX);
                (aim, realtime_ns, KVM_CLOCK_REALTIME)
            }
            None => (0, 0, 0),
        },
    };
    let aim = Aim {
        pvti,
        clock_ns,
        realtime_ns,
        flags,
        max_error_ns,
        offset0,
        scaling: options.tsc_scaling,
        max_tries: options.max_set_clock_tries.max(1),
    };
    let outcome = set_clock_calibrated(ops, &aim, undo).map_err(|e| (step, e))?;
    Ok(Some((step, outcome)))
}

fn record(report: &mut ApplyReport, name: &'static str, since: Instant) {
    report.steps.push(StepRecord {
        name,
        duration_ns: elapsed_ns(since),
    });
}

/// The plan's PVTI line at guest TSC `tsc_cycles`, ns, extended backwards
/// below `tsc_timestamp` (where the guest's own formula would wrap).
pub(crate) fn line_at(pvti: &Pvti, tsc_cycles: u64) -> i128 {
    let base = i128::from(pvti.system_time);
    if tsc_cycles >= pvti.tsc_timestamp {
        let d = scale_delta(
            tsc_cycles - pvti.tsc_timestamp,
            pvti.tsc_to_system_mul,
            pvti.tsc_shift,
        );
        base + i128::from(d)
    } else {
        let d = scale_delta(
            pvti.tsc_timestamp - tsc_cycles,
            pvti.tsc_to_system_mul,
            pvti.tsc_shift,
        );
        base - i128::from(d)
    }
}

fn saturate_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// kvm-clock minus the line, from a KVM_GET_CLOCK pair; `None` without host_tsc.
fn clock_error_ns(
    sample: &KvmClockSample,
    pvti: &Pvti,
    scaling: Option<TscScaling>,
    offset0: i64,
) -> Option<i64> {
    if !sample.has_host_tsc() {
        return None;
    }
    let tsc = guest_tsc(sample.host_tsc, scaling, offset0);
    Some(saturate_i64(
        i128::from(sample.clock_ns) - line_at(pvti, tsc),
    ))
}

/// What the calibration loop aims at.
struct Aim {
    pvti: Pvti,
    clock_ns: u64,
    realtime_ns: u64,
    flags: u32,
    max_error_ns: u64,
    offset0: i64,
    scaling: Option<TscScaling>,
    max_tries: u32,
}

/// KVM_SET_CLOCK aimed at the line, verified with KVM_GET_CLOCK's pair and
/// re-aimed: each call's error is the kernel's own bias (time between its
/// master-clock snapshot and its realtime read) minus the correction used;
/// the next call subtracts the bias just measured. Stops within
/// `max_error_ns` or after `max_tries`.
fn set_clock_calibrated<O: ClockOps + ?Sized>(
    ops: &mut O,
    aim: &Aim,
    undo: &mut Undo,
) -> Result<KvmclockOutcome, KvmError> {
    let realtime = aim.flags & KVM_CLOCK_REALTIME != 0;
    let mut correction_ns: i128 = 0;
    let mut outcome = KvmclockOutcome {
        method: "set_clock",
        error_ns: None,
        tries: 0,
        try_errors_ns: Vec::new(),
        max_error_ns: aim.max_error_ns,
        within_max_error: false,
        aimed_with_offset_cycles: aim.offset0,
    };
    for _ in 0..aim.max_tries {
        let base_ns = if realtime {
            // "clock_ns at realtime_ns": the kernel adds the realtime since.
            i128::from(aim.clock_ns)
        } else {
            // No realtime reference: aim at the line at the TSC now.
            let host_tsc = ops.host_tsc();
            line_at(&aim.pvti, guest_tsc(host_tsc, aim.scaling, aim.offset0))
        };
        let target = u64::try_from((base_ns - correction_ns).max(0)).unwrap_or(u64::MAX);
        let (realtime_ns, flags) = if realtime {
            (aim.realtime_ns, KVM_CLOCK_REALTIME)
        } else {
            (0, 0)
        };
        outcome.tries += 1;
        ops.set_clock(target, realtime_ns, flags)?;
        undo.clock_set = true;
        let sample = ops.get_clock()?;
        let Some(err) = clock_error_ns(&sample, &aim.pvti, aim.scaling, aim.offset0) else {
            // Not in master-clock mode: nothing to verify against.
            break;
        };
        outcome.error_ns = Some(err);
        outcome.try_errors_ns.push(err);
        if err.unsigned_abs() <= aim.max_error_ns {
            break;
        }
        correction_ns += i128::from(err);
    }
    outcome.within_max_error = outcome
        .error_ns
        .is_some_and(|e| e.unsigned_abs() <= aim.max_error_ns);
    Ok(outcome)
}

/// Puts back frequency, offsets, then kvm-clock (in apply's own order, so
/// KVM_SET_CLOCK re-derives the PVTI from the restored TSC).
fn roll_back<O: ClockOps + ?Sized>(ops: &mut O, undo: &Undo) -> RollbackReport {
    let mut r = RollbackReport::default();
    for (i, khz) in undo.khz.iter().enumerate().take(undo.khz_set) {
        match ops.set_tsc_khz(i, *khz) {
            Ok(()) => r.frequency_restored_vcpus += 1,
            Err(e) => r.failures.push(e.on_vcpu(i).to_string()),
        }
    }
    for (i, off) in undo.offsets.iter().enumerate().take(undo.offsets_written) {
        match ops.set_tsc_offset(i, *off) {
            Ok(()) => r.offsets_restored_vcpus += 1,
            Err(e) => r.failures.push(e.on_vcpu(i).to_string()),
        }
    }
    if let (true, Some((before, read_at))) = (undo.clock_set, undo.clock) {
        let result = if before.flags & KVM_CLOCK_REALTIME != 0 {
            ops.set_clock(before.clock_ns, before.realtime_ns, KVM_CLOCK_REALTIME)
        } else {
            let since = elapsed_ns(read_at);
            ops.set_clock(before.clock_ns.saturating_add(since), 0, 0)
        };
        match result {
            Ok(()) => r.clock_restored = Some(true),
            Err(e) => {
                r.clock_restored = Some(false);
                r.failures.push(e.to_string());
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_extends_backwards() {
        let pvti = Pvti {
            tsc_timestamp: 3_000,
            system_time: 10_000,
            tsc_to_system_mul: 0xAAAA_AAAA,
            tsc_shift: -1,
            flags: 1,
        };
        // 3 GHz: 3000 cycles are 999 ns (truncation), either side.
        assert_eq!(line_at(&pvti, 6_000), 10_999);
        assert_eq!(line_at(&pvti, 0), 10_000 - 999);
        assert_eq!(line_at(&pvti, 3_000), 10_000);
    }
}
