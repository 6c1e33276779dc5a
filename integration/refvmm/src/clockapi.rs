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
//! answer ([`PutReply`]) carries the members the client's
//! `vmclock_api::PutAnswer` reads: `kvmclock_error_ns`, `kvmclock_method`,
//! `tsc_offsets_effective`, `refused`.
//!
//! Applied by the library (`clockcarry::kvm::apply_request` on the body's
//! `ApplyRequest`) in the order frequency -> offsets -> clock ->
//! KVMCLOCK_CTRL, with rollback of the offsets on failure. `follow_pvti`
//! becomes KVM_SET_CLOCK_GUEST where the kernel has it, else a KVM_SET_CLOCK
//! aimed at the line and corrected by the library's loop; `set_clock` is one
//! raw KVM_SET_CLOCK; `null` leaves kvm-clock alone.

use clockcarry::kvm::{
    apply_request, capture, ApplyError, ApplyOptions, ApplyReport, ApplyRequest, KvmOps, KvmProbe,
};
use clockcarry::model::{Capabilities, RunState, VmClock, KVM_CLOCK_REALTIME};
use kvm_ioctls::Kvm;
use serde::Serialize;

pub use clockcarry::vmclock_api::{ClockPut, FollowPvti, KvmClockPut, SetClockPut};

use crate::vm::{Vm, VmState};

/// The answer to a successful PUT (the body of the 200; the client sees it
/// as `clockcarry::vmclock_api::PutAnswer::body`).
#[derive(Debug, Clone, Serialize)]
pub struct PutReply {
    /// What was asked and done: `follow_pvti`, `set_clock` or `none`.
    pub kvmclock_request: &'static str,
    /// How kvm-clock was set: `clock_guest`, `set_clock` or `none`.
    pub kvmclock_method: &'static str,
    /// kvm-clock minus the requested line after the last call, ns
    /// (follow_pvti only; KVM_GET_CLOCK's pair).
    pub kvmclock_error_ns: Option<i64>,
    pub kvmclock_tries: u32,
    pub tsc_khz_set: Option<u32>,
    pub tsc_offsets_applied: Vec<i64>,
    pub tsc_offsets_read_back: Vec<i64>,
    /// False where the kernel ignores offset writes (this machine's kvm_pvm).
    pub tsc_offsets_effective: bool,
    /// Calls the kernel refused that were tolerated.
    pub refused: Vec<String>,
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
    /// 500: a KVM call failed (offsets rolled back).
    #[error("{0}")]
    Failed(String),
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
        .map_err(|e| ClockApiError::Failed(format!("capture: {e}")))
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
/// they fail): one offset per vCPU, a non-zero rate, a non-zero multiplier,
/// `set_clock` flags 0 or KVM_CLOCK_REALTIME.
pub fn check_body(body: &ClockPut, vcpus: u32) -> Result<(), ClockApiError> {
    let n = usize::try_from(vcpus).unwrap_or(0);
    if body.tsc_offsets.len() != n {
        return Err(ClockApiError::BadRequest(format!(
            "tsc_offsets has {} entries, the VM has {n} vCPUs",
            body.tsc_offsets.len()
        )));
    }
    if body.tsc_khz == Some(0) {
        return Err(ClockApiError::BadRequest("tsc_khz is 0".into()));
    }
    match body.kvmclock {
        Some(KvmClockPut::FollowPvti(f)) if f.tsc_to_system_mul == 0 => Err(
            ClockApiError::BadRequest("kvmclock.follow_pvti.tsc_to_system_mul is 0".into()),
        ),
        Some(KvmClockPut::SetClock(s)) if s.flags & !KVM_CLOCK_REALTIME != 0 => {
            Err(ClockApiError::BadRequest(format!(
                "kvmclock.set_clock.flags {:#x}: only 0 or KVM_CLOCK_REALTIME (4)",
                s.flags
            )))
        }
        _ => Ok(()),
    }
}

fn describe_apply_error(e: &ApplyError) -> String {
    e.to_string()
}

/// PUT vm.clock: applies the body through the library. On success the VM
/// will resume without the baseline's clock. On failure the library has put
/// the previous offsets back.
pub fn put(vm: &mut Vm, probed: &ProbedKvm, body: &ClockPut) -> Result<PutReply, ClockApiError> {
    check_put(vm, body)?;
    // follow_pvti -> CLOCK_GUEST or the calibrated SET_CLOCK, set_clock ->
    // one raw KVM_SET_CLOCK, null -> no clock call: the library's contract.
    let request = ApplyRequest::from(body);
    let options = probed.apply_options();
    let result =
        vm.with_vcpus(|fd, vcpus| apply_request(&mut KvmOps::new(fd, vcpus), &request, &options));
    let report = result.map_err(|e| match e {
        ApplyError::VcpuCountMismatch { .. } | ApplyError::InvalidPlan { .. } => {
            ClockApiError::BadRequest(describe_apply_error(&e))
        }
        ApplyError::Failed { .. } => ClockApiError::Failed(describe_apply_error(&e)),
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
    Ok(PutReply {
        kvmclock_request: match body.kvmclock {
            Some(KvmClockPut::FollowPvti(_)) => "follow_pvti",
            Some(KvmClockPut::SetClock(_)) => "set_clock",
            None => "none",
        },
        kvmclock_method: method,
        kvmclock_error_ns: error,
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
        report,
    })
}
