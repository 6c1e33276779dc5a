//! Apply an [`ApplyRequest`] (what a [`Plan`] or a `PUT vm.clock` asks) to
//! a VM: every offset read for a rollback (unless the caller knows them,
//! [`Previous::Known`]) -> frequency -> all offsets back to back ->
//! kvm-clock (KVM_SET_CLOCK_GUEST, the calibrated KVM_SET_CLOCK of
//! [`super::calibrate`], one raw KVM_SET_CLOCK, or nothing) ->
//! KVMCLOCK_CTRL on each vCPU -> read every offset back (unless
//! [`ApplyOptions::read_back`] is off). On any failure
//! the previous frequency, offsets and kvm-clock are put back and the error
//! names the step and says what the rollback did.
//!
//! The ioctls sit behind [`ClockOps`] (module [`super::ops`]).

use std::borrow::Borrow;
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};

use super::calibrate::set_kvmclock;
use super::caps::KvmProbe;
use super::ops::{ClockOps, KvmOps};
use super::outcome::{ApplyError, ApplyReport, ApplyStep, Refusal, RollbackReport, StepRecord};
use super::{elapsed_ns, KvmError};
use crate::model::{KvmClockSample, TscScaling, KVM_CLOCK_REALTIME};
use crate::plan::Plan;
use crate::request::{ApplyRequest, RequestError};

/// KVM_SET_CLOCK tries of the calibration loop unless told otherwise.
pub const DEFAULT_SET_CLOCK_TRIES: u32 = 8;

/// Knobs of [`apply_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Most KVM_SET_CLOCK calls of the calibration loop (0 counts as 1).
    pub max_set_clock_tries: u32,
    /// The destination's TSC scaling, to turn KVM_GET_CLOCK's host TSC into
    /// guest TSC when verifying kvm-clock (`None` = unscaled).
    pub tsc_scaling: Option<TscScaling>,
    /// TSC offset writes take effect (false where the probe saw them change
    /// nothing, [`KvmProbe::tsc_offset_effective`]): when false,
    /// a read-back equal to the previous offsets is reported as
    /// `tsc_offsets_effective: false` instead of failing the apply.
    pub tsc_offsets_effective: bool,
    /// KVM_SET_CLOCK_GUEST works here ([`KvmProbe::clock_guest`]): a
    /// [`FollowVia::Best`] request uses it.
    pub clock_guest: bool,
    /// KVM_SET_CLOCK takes KVM_CLOCK_REALTIME here (KVM_CAP_ADJUST_CLOCK):
    /// a [`FollowVia::Best`] request without CLOCK_GUEST aims at a (host TSC,
    /// realtime) pair.
    pub set_clock_realtime: bool,
    /// Read every offset back before returning (the `verify` step). An
    /// armed apply inside the blackout turns it off and verifies after the
    /// resume instead; the report's `offsets_read_back` is then empty.
    pub read_back: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_set_clock_tries: DEFAULT_SET_CLOCK_TRIES,
            tsc_scaling: None,
            tsc_offsets_effective: true,
            clock_guest: false,
            set_clock_realtime: false,
            read_back: true,
        }
    }
}

impl ApplyOptions {
    /// Defaults, with what the probe found about offset writes, CLOCK_GUEST
    /// and KVM_CLOCK_REALTIME.
    pub fn from_probe(probe: &KvmProbe) -> Self {
        ApplyOptions {
            tsc_offsets_effective: probe.tsc_offset_effective != Some(false),
            clock_guest: probe.clock_guest,
            set_clock_realtime: probe.adjust_clock_flags & KVM_CLOCK_REALTIME != 0,
            ..ApplyOptions::default()
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
pub(super) struct Undo {
    /// Previous TSC rate of vCPUs `0..len` that were set.
    pub(super) khz: Vec<u32>,
    pub(super) khz_set: usize,
    pub(super) offsets: Vec<i64>,
    pub(super) offsets_written: usize,
    /// The clock before it was set, and when it was read.
    pub(super) clock: Option<(KvmClockSample, Instant)>,
    pub(super) clock_set: bool,
}

/// Applies `plan` through `ops`: [`apply_request`] on the plan's request
/// (its CLOCK_GUEST or calibrated SET_CLOCK, from the planner's aim).
pub fn apply_with<O: ClockOps + ?Sized>(
    ops: &mut O,
    plan: &Plan,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    apply_request(ops, &ApplyRequest::from_plan(plan), options)
}

/// The offsets a rollback puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous<'a> {
    /// Read every vCPU's offset before the first write (one vCPU ioctl
    /// each, about 4.4 us on a PVM host).
    Read,
    /// The caller knows what is in place (a VMM that has just loaded the
    /// state, docs/armed.md): no read; a failed apply puts these back. One
    /// per vCPU.
    Known(&'a [i64]),
}

/// Applies `request` through `ops`, reading the offsets a rollback needs
/// ([`apply_request_from`] with [`Previous::Read`]).
pub fn apply_request<O: ClockOps + ?Sized>(
    ops: &mut O,
    request: &ApplyRequest,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    apply_request_from(ops, request, options, Previous::Read)
}

/// Applies `request` through `ops`, a rollback putting back `previous`.
/// Never panics; see the module doc for the order and docs/kvm.md for the
/// rollback semantics.
pub fn apply_request_from<O: ClockOps + ?Sized>(
    ops: &mut O,
    request: &ApplyRequest,
    options: &ApplyOptions,
    previous: Previous<'_>,
) -> Result<ApplyReport, ApplyError> {
    let start = Instant::now();
    if let Previous::Known(offsets) = previous {
        if offsets.len() != ops.vcpu_count() {
            return Err(ApplyError::InvalidPlan {
                field: "previous_offsets".into(),
                reason: format!("{} offsets for {} vCPUs", offsets.len(), ops.vcpu_count()),
            });
        }
    }
    request.validate(ops.vcpu_count()).map_err(|e| match e {
        RequestError::VcpuCountMismatch { request, vm } => {
            ApplyError::VcpuCountMismatch { plan: request, vm }
        }
        RequestError::Invalid(f) => ApplyError::InvalidPlan {
            field: f.field,
            reason: f.reason,
        },
    })?;
    let mut report = ApplyReport::default();
    let mut undo = Undo::default();
    let result = run_steps(ops, request, options, previous, &mut report, &mut undo);
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

pub(super) type StepError = (ApplyStep, KvmError);

fn vcpu_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

fn run_steps<O: ClockOps + ?Sized>(
    ops: &mut O,
    plan: &ApplyRequest,
    options: &ApplyOptions,
    previous: Previous<'_>,
    report: &mut ApplyReport,
    undo: &mut Undo,
) -> Result<(), StepError> {
    let n = plan.tsc_offsets.len();
    let offset_step = |i: usize| ApplyStep::Offset { vcpu: vcpu_u32(i) };

    remember_offsets(ops, n, previous, report, undo)?;

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

    if !options.read_back {
        report.tsc_offsets_effective = options.tsc_offsets_effective;
        return Ok(());
    }

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
    let accepted = matches_plan || (!options.tsc_offsets_effective && unchanged);
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
    report.tsc_offsets_effective = matches_plan && options.tsc_offsets_effective;
    record(report, "verify", t);
    Ok(())
}

/// Every current offset, for the rollback: read, or as the caller knows them.
fn remember_offsets<O: ClockOps + ?Sized>(
    ops: &mut O,
    n: usize,
    previous: Previous<'_>,
    report: &mut ApplyReport,
    undo: &mut Undo,
) -> Result<(), StepError> {
    match previous {
        Previous::Known(offsets) => undo.offsets.extend_from_slice(offsets),
        Previous::Read => {
            let t = Instant::now();
            for i in 0..n {
                let off = ops
                    .get_tsc_offset(i)
                    .map_err(|e| (ApplyStep::Offset { vcpu: vcpu_u32(i) }, e.on_vcpu(i)))?;
                undo.offsets.push(off);
            }
            record(report, "read_offsets", t);
        }
    }
    report.previous_offsets.clone_from(&undo.offsets);
    Ok(())
}

pub(super) fn record(report: &mut ApplyReport, name: &'static str, since: Instant) {
    report.steps.push(StepRecord {
        name,
        duration_ns: elapsed_ns(since),
    });
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
