//! GET / PUT /api/v1/vm.clock, as the design brief defines them, on the
//! library's KVM layer (`clockcarry::kvm::{capture, apply_request}`).
//!
//! PUT body:
//!
//! ```text
//! { "tsc_khz": u32 | null, "tsc_offsets": [i64, one per vCPU],
//!   "kvmclock": {"follow_pvti": {pvti fields, "max_error_ns"}}
//!             | {"set_clock": {"clock", "realtime", "flags"}} | null }
//! ```
//!
//! The body's types are the library's own (`clockcarry::vmclock_api`:
//! [`ClockPut`], [`KvmClockPut`], [`FollowPvti`], [`SetClockPut`]), the same
//! ones the `clockcarry` client serialises, unknown fields refused. The
//! answers are the library's typed replies too: [`PutApplied`] (in
//! [`PutReply`], with the apply report) and, on failure, a [`PutFailure`]
//! with the outcome and the rollback, per step.
//!
//! Applied by the library (`clockcarry::kvm::apply_request` on the body's
//! `ApplyRequest`) in the order frequency -> offsets -> clock ->
//! KVMCLOCK_CTRL, with rollback of the offsets on failure. `follow_pvti`
//! becomes KVM_SET_CLOCK_GUEST where the kernel has it, else a KVM_SET_CLOCK
//! aimed at the line and corrected by the library's loop; `set_clock` is one
//! raw KVM_SET_CLOCK; `null` leaves kvm-clock alone.

use clockcarry::kvm::{
    apply_request_from, capture, ApplyError, ApplyOptions, ApplyReport, ApplyRequest, KvmOps,
    KvmProbe, Previous,
};
use clockcarry::model::{Capabilities, RunState, VmClock, KVM_CLOCK_REALTIME};
use clockcarry::request::RequestError;
use clockcarry::vmclock_api::arm::{self, ArmNow};
use clockcarry::vmclock_api::{PutApplied, PutOutcome, RollbackOutcome};
use kvm_ioctls::Kvm;
use serde::Serialize;

pub use clockcarry::vmclock_api::{ClockPut, FollowPvti, KvmClockPut, SetClockPut};

use crate::vm::{Vm, VmState};

/// The answer to a successful PUT (the body of the 200): the library's
/// typed reply, and this VMM's full apply report beside it.
#[derive(Debug, Clone, Serialize)]
pub struct PutReply {
    #[serde(flatten)]
    pub applied: PutApplied,
    /// The library's full apply report.
    pub report: ApplyReport,
}

/// Why a vm.clock call failed, with the HTTP status Cloud Hypervisor would
/// use for it.
#[derive(Debug, thiserror::Error)]
pub enum ClockApiError {
    /// 400: the body is well-formed JSON but cannot be applied.
    #[error("{0}")]
    BadRequest(String),
    /// 500: the VM is in the wrong state.
    #[error("{0}")]
    WrongState(String),
    /// 500: a KVM call failed; `rollback` says what was put back.
    #[error("{message}")]
    Failed {
        message: String,
        step: Option<String>,
        rollback: Option<RollbackOutcome>,
    },
}

impl ClockApiError {
    /// The outcome a client decides on.
    pub fn outcome(&self) -> PutOutcome {
        match self {
            ClockApiError::BadRequest(_) => PutOutcome::Refused,
            ClockApiError::WrongState(_) => PutOutcome::WrongState,
            ClockApiError::Failed { rollback, .. } => match rollback {
                Some(r) if !r.complete => PutOutcome::RollbackIncomplete,
                _ => PutOutcome::RolledBack,
            },
        }
    }
}

/// The capabilities of this kernel, probed once per process.
#[derive(Debug, Clone)]
pub struct ProbedKvm {
    /// `None` only for a VM without vCPUs (never created).
    pub probe: Option<KvmProbe>,
    pub caps: Capabilities,
}

impl ProbedKvm {
    /// Probes with the VM's boot vCPU (parked for a few ms when Running)
    /// and a scratch VM.
    pub fn run(kvm: &Kvm, vm: &Vm) -> ProbedKvm {
        let probe = vm.with_vcpus(|fd, vcpus| vcpus.first().map(|v| KvmProbe::run(kvm, fd, v)));
        let caps = probe
            .as_ref()
            .map(KvmProbe::capabilities)
            .unwrap_or_default();
        ProbedKvm { probe, caps }
    }

    fn apply_options(&self) -> ApplyOptions {
        ApplyOptions {
            // follow_pvti: CLOCK_GUEST and KVM_CLOCK_REALTIME as probed.
            clock_guest: self.caps.clock_guest,
            set_clock_realtime: self.caps.adjust_clock & KVM_CLOCK_REALTIME != 0,
            ..self
                .probe
                .as_ref()
                .map(ApplyOptions::from_probe)
                .unwrap_or_default()
        }
    }
}

fn run_state(s: VmState) -> RunState {
    match s {
        VmState::Running => RunState::Running,
        VmState::Paused => RunState::Paused,
    }
}

/// GET vm.clock: reads only (vCPUs parked for a moment when Running).
pub fn get(vm: &Vm, probed: &ProbedKvm) -> Result<VmClock, ClockApiError> {
    let state = run_state(vm.state());
    let ram = vm.ram();
    let reader = |gpa: u64| ram.read_32(gpa);
    vm.with_vcpus(|fd, vcpus| capture(fd, vcpus, &probed.caps, Some(&reader), state))
        .map_err(|e| ClockApiError::Failed {
            message: format!("capture: {e}"),
            step: None,
            rollback: None,
        })
}

/// Checks a PUT against the VM before anything is touched: its state, then
/// the body ([`check_body`]).
pub fn check_put(vm: &Vm, body: &ClockPut) -> Result<(), ClockApiError> {
    if vm.state() != VmState::Paused {
        return Err(ClockApiError::WrongState(
            "VM is not paused: vm.clock PUT is only accepted while Paused".into(),
        ));
    }
    if !vm.restore_pending() {
        return Err(ClockApiError::WrongState(
            "the vCPUs have run since the VM was restored or received: vm.clock PUT is only \
             accepted before the first resume"
                .into(),
        ));
    }
    check_body(body, vm.config().vcpus)
}

/// The checks on a PUT body that need only the VM's vCPU count (400 when
/// they fail): the library's one set of request rules
/// ([`ApplyRequest::validate`]).
pub fn check_body(body: &ClockPut, vcpus: u32) -> Result<(), ClockApiError> {
    let n = usize::try_from(vcpus).unwrap_or(0);
    ApplyRequest::from(body).validate(n).map_err(|e| match e {
        RequestError::VcpuCountMismatch { request, vm } => ClockApiError::BadRequest(format!(
            "tsc_offsets has {request} entries, the VM has {vm} vCPUs"
        )),
        RequestError::Invalid(f) => ClockApiError::BadRequest(f.to_string()),
    })
}

/// How a body is applied: a plain PUT with the process's full probe and
/// the read-back; an armed one with only the probe's ioctl-free part and
/// no read-back, so that inside the blackout only the rate, the offsets,
/// the kvm-clock line and KVMCLOCK_CTRL run (docs/armed.md). A body that
/// carries `arm` is applied armed in either mode; `Armed` requires it.
pub enum PutMode<'a> {
    Probed(&'a ProbedKvm),
    Armed,
}

/// What an armed clock is applied with once its checks passed.
pub struct ArmedApply {
    pub options: ApplyOptions,
    /// What a failed apply puts back on every vCPU: vCPU 0's offset as the
    /// state was loaded (what the ch-v53 restore would have copied to all),
    /// so that no second pass of vCPU ioctls reads them first.
    pub previous_offsets: Vec<i64>,
}

/// The armed clock's apply-time checks (`clockcarry::vmclock_api::arm`)
/// against this host now and the VM's restored state: 400 when refused.
/// One vCPU ioctl (vCPU 0's TSC offset; its rate too when the saved state
/// had none); the rest is VM ioctls and the saved state.
pub fn check_armed(vm: &Vm, body: &ClockPut) -> Result<ArmedApply, ClockApiError> {
    let Some(arm) = &body.arm else {
        return Err(ClockApiError::BadRequest(
            "clock.arm: an armed clock carries its checks (planned pair, validity, vCPU count, \
             capture TSC); plan it with `clockcarry arm`"
                .into(),
        ));
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| ClockApiError::Failed {
        message: format!("armed clock: {what}: {e}"),
        step: None,
        rollback: None,
    };
    let known_khz = vm.restored_tsc_khz();
    let (guest_khz, offset0) = vm.with_vcpus(|_, vcpus| match vcpus.first() {
        Some(v0) => Ok((
            known_khz.map_or_else(|| clockcarry::kvm::sys::vcpu_get_tsc_khz(v0), Ok),
            clockcarry::kvm::sys::get_tsc_offset(v0),
        )),
        None => Err(ClockApiError::BadRequest("the VM has no vCPUs".into())),
    })?;
    let guest_khz = guest_khz.map_err(|e| failed("the guest TSC rate", &e))?;
    let offset0 = offset0.map_err(|e| failed("vCPU 0's TSC offset", &e))?;
    let host_khz = match clockcarry::kvm::sys::vm_get_tsc_khz(vm.vm_fd()) {
        Ok(khz) => khz,
        Err(_) => {
            clockcarry::host::host_tsc_khz()
                .map_err(|e| failed("the host TSC rate", &e))?
                .khz
        }
    };
    let now = ArmNow {
        host_tsc: clockcarry::host::read_host_tsc(),
        tai_ns: clockcarry::host::tai_now_ns().map_err(|e| failed("CLOCK_TAI", &e))?,
        host_khz,
        guest_khz,
    };
    arm::check(
        arm,
        &body.tsc_offsets,
        body.tsc_khz,
        &now,
        vm.restored_tsc(),
    )
    .map_err(|e| ClockApiError::BadRequest(format!("armed clock refused: {e}")))?;
    let adjust_clock = clockcarry::kvm::caps::adjust_clock_flags(vm.vm_fd());
    Ok(ArmedApply {
        options: ApplyOptions {
            // No scratch-VM probe inside the blackout: offsets are taken to
            // take effect (the offset read after the writes aims kvm-clock
            // where they do not), CLOCK_GUEST unused, REALTIME as the
            // capability says.
            set_clock_realtime: adjust_clock & KVM_CLOCK_REALTIME != 0,
            read_back: false,
            ..ApplyOptions::default()
        },
        previous_offsets: vec![offset0; body.tsc_offsets.len()],
    })
}

/// PUT vm.clock, or the `clock` of vm.restore / vm.receive-migration:
/// applies the body through the library. On success the VM will resume
/// without the baseline's clock. On failure the library has put the
/// previous offsets back; a refused armed body touched nothing.
pub fn put(
    vm: &mut Vm,
    mode: PutMode<'_>,
    body: &ClockPut,
    fault: Option<FaultPut>,
) -> Result<PutReply, ClockApiError> {
    check_put(vm, body)?;
    let (options, known) = match (mode, &body.arm) {
        (PutMode::Probed(probed), None) => (probed.apply_options(), None),
        _ => {
            let a = check_armed(vm, body)?;
            (a.options, Some(a.previous_offsets))
        }
    };
    let previous = known.as_deref().map_or(Previous::Read, Previous::Known);
    // follow_pvti -> CLOCK_GUEST or the calibrated SET_CLOCK, set_clock ->
    // one raw KVM_SET_CLOCK, null -> no clock call: the library's contract.
    let request = ApplyRequest::from(body);
    let result = vm.with_vcpus(|fd, vcpus| {
        let mut ops = FaultyOps {
            inner: KvmOps::new(fd, vcpus),
            fault,
            failed: false,
        };
        apply_request_from(&mut ops, &request, &options, previous)
    });
    let report = result.map_err(|e| match &e {
        ApplyError::VcpuCountMismatch { .. } | ApplyError::InvalidPlan { .. } => {
            ClockApiError::BadRequest(e.to_string())
        }
        ApplyError::Failed { step, rollback, .. } => ClockApiError::Failed {
            message: e.to_string(),
            step: Some(step.to_string()),
            rollback: Some(RollbackOutcome::from(rollback)),
        },
    })?;
    vm.mark_clock_put();
    let (method, error, tries) = match (&body.kvmclock, &report.kvmclock) {
        (None, _) => ("none", None, 0),
        (Some(KvmClockPut::SetClock(_)), o) => {
            ("set_clock", None, o.as_ref().map_or(0, |o| o.tries))
        }
        (Some(KvmClockPut::FollowPvti(_)), Some(o)) => (o.method, o.error_ns, o.tries),
        (Some(KvmClockPut::FollowPvti(_)), None) => ("none", None, 0),
    };
    let within = report
        .kvmclock
        .as_ref()
        .filter(|_| matches!(body.kvmclock, Some(KvmClockPut::FollowPvti(_))))
        .map(|o| o.within_max_error);
    Ok(PutReply {
        applied: PutApplied {
            outcome: PutOutcome::Applied,
            kvmclock_request: match body.kvmclock {
                Some(KvmClockPut::FollowPvti(_)) => "follow_pvti",
                Some(KvmClockPut::SetClock(_)) => "set_clock",
                None => "none",
            }
            .into(),
            kvmclock_method: method.into(),
            kvmclock_error_ns: error,
            kvmclock_within_target: within,
            kvmclock_tries: tries,
            tsc_khz_set: report.frequency_set_khz,
            tsc_offsets_applied: body.tsc_offsets.clone(),
            tsc_offsets_read_back: report.offsets_read_back.clone(),
            tsc_offsets_effective: report.tsc_offsets_effective,
            refused: report
                .refused
                .iter()
                .map(|r| {
                    let vcpu = r.vcpu.map_or(String::new(), |v| format!(" on vCPU {v}"));
                    format!("{}{vcpu}: errno {}", r.ioctl, r.errno)
                })
                .collect(),
        },
        report,
    })
}

/// The `--fault-put` test knob: fail the TSC offset write of vCPU `vcpu`
/// (the library then rolls back), and with `rollback_fails` every offset
/// write after that failure too (the rollback is left undone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPut {
    pub vcpu: usize,
    pub rollback_fails: bool,
}

impl FaultPut {
    /// `offset:N` or `offset:N:rollback`.
    pub fn parse(spec: &str) -> Result<FaultPut, String> {
        let bad = || format!("--fault-put {spec:?}: expected offset:N or offset:N:rollback");
        let mut parts = spec.split(':');
        if parts.next() != Some("offset") {
            return Err(bad());
        }
        let vcpu = parts
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(bad)?;
        let rollback_fails = match parts.next() {
            None => false,
            Some("rollback") => true,
            Some(_) => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(FaultPut {
            vcpu,
            rollback_fails,
        })
    }
}

/// [`KvmOps`] with the `--fault-put` knob applied (no fault: a pass-through).
struct FaultyOps<'a, V: std::borrow::Borrow<kvm_ioctls::VcpuFd>> {
    inner: KvmOps<'a, V>,
    fault: Option<FaultPut>,
    failed: bool,
}

impl<V: std::borrow::Borrow<kvm_ioctls::VcpuFd>> FaultyOps<'_, V> {
    fn injected(vcpu: usize) -> clockcarry::kvm::KvmError {
        clockcarry::kvm::KvmError::Ioctl {
            ioctl: "KVM_SET_DEVICE_ATTR(TSC_OFFSET) [--fault-put]",
            vcpu: u32::try_from(vcpu).ok(),
            errno: libc::EIO,
        }
    }
}

impl<V: std::borrow::Borrow<kvm_ioctls::VcpuFd>> clockcarry::kvm::ClockOps for FaultyOps<'_, V> {
    fn vcpu_count(&self) -> usize {
        self.inner.vcpu_count()
    }
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, clockcarry::kvm::KvmError> {
        self.inner.get_tsc_khz(vcpu)
    }
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), clockcarry::kvm::KvmError> {
        self.inner.set_tsc_khz(vcpu, khz)
    }
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, clockcarry::kvm::KvmError> {
        self.inner.get_tsc_offset(vcpu)
    }
    fn set_tsc_offset(
        &mut self,
        vcpu: usize,
        offset: i64,
    ) -> Result<(), clockcarry::kvm::KvmError> {
        if let Some(f) = self.fault {
            if (!self.failed && vcpu == f.vcpu) || (self.failed && f.rollback_fails) {
                self.failed = true;
                return Err(Self::injected(vcpu));
            }
        }
        self.inner.set_tsc_offset(vcpu, offset)
    }
    fn get_clock(
        &mut self,
    ) -> Result<clockcarry::model::KvmClockSample, clockcarry::kvm::KvmError> {
        self.inner.get_clock()
    }
    fn set_clock(
        &mut self,
        clock_ns: u64,
        realtime_ns: u64,
        flags: u32,
    ) -> Result<(), clockcarry::kvm::KvmError> {
        self.inner.set_clock(clock_ns, realtime_ns, flags)
    }
    fn set_clock_guest(
        &mut self,
        vcpu: usize,
        pvti: &clockcarry::model::Pvti,
    ) -> Result<(), clockcarry::kvm::KvmError> {
        self.inner.set_clock_guest(vcpu, pvti)
    }
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), clockcarry::kvm::KvmError> {
        self.inner.kvmclock_ctrl(vcpu)
    }
    fn get_clock_guest(
        &mut self,
        vcpu: usize,
    ) -> Result<clockcarry::model::Pvti, clockcarry::kvm::KvmError> {
        self.inner.get_clock_guest(vcpu)
    }
    fn kvmclock_msr(&mut self, vcpu: usize) -> Result<Option<u64>, clockcarry::kvm::KvmError> {
        self.inner.kvmclock_msr(vcpu)
    }
}
