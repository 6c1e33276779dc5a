//! The KVM layer: probe, capture and apply a VM's clock on kvm-ioctls file
//! descriptors (`VmFd`, `VcpuFd`), the way a Rust VMM links it.
//!
//! - [`probe`] / [`KvmProbe`]: what the running kernel offers (KVM_CAP_ADJUST_CLOCK
//!   as a flag set, the TSC offset attribute **and whether writes to it take
//!   effect**, TSC scaling, KVM_GET_TSC_KHZ, KVMCLOCK_CTRL, CLOCK_GUEST).
//! - [`capture`]: the VM's clock as a [`crate::VmClock`] (offsets, rate, a
//!   KVM_GET_CLOCK sample, the PVTI and where it came from). Touches no clock.
//! - [`apply`] / [`apply_with`]: a [`crate::Plan`] onto a VM, in the order
//!   frequency -> all offsets back to back -> KVM_SET_CLOCK_GUEST or a
//!   calibrated KVM_SET_CLOCK -> KVMCLOCK_CTRL -> read-back verification;
//!   any failure puts the previous frequency, offsets and clock back.
//!   [`apply_request`] does the same for an [`ApplyRequest`], what a
//!   `PUT vm.clock` body asks (`follow_pvti`, a raw `set_clock`, or leaving
//!   kvm-clock alone); `apply_with` is it on the plan's request.
//! - [`sys`]: the ioctls kvm-ioctls lacks on x86-64, each one small function.
//! - [`guest`] and [`selftest`]: a tiny real-mode guest that enables
//!   kvm-clock and reports its TSC over port I/O, and the same-host round trip
//!   built on it (used by the tests, `examples/kvm-roundtrip.rs` and the
//!   benchmark).
//!
//! The library never writes MSR_IA32_TSC: the guest TSC is restored through
//! the vCPU TSC offset attribute only (see docs/kvm.md for why).

pub mod apply;
pub mod calibrate;
pub mod caps;
pub mod capture;
pub mod guest;
pub mod ops;
pub mod outcome;
pub mod selftest;
pub mod sys;

pub use crate::request::{ApplyRequest, ClockRequest, FollowVia, CLOCK_GUEST_MAX_ERROR_NS};
pub use apply::{
    apply, apply_request, apply_request_from, apply_with, ApplyOptions, Previous,
    DEFAULT_SET_CLOCK_TRIES,
};
pub use caps::{probe, KvmProbe, OffsetWriteTest};
pub use capture::{capture, capture_with, kvmclock_msr, read_pvti_consistent, PvtiReader};
pub use ops::{ClockOps, KvmOps};
pub use outcome::{
    ApplyError, ApplyReport, ApplyStep, KvmclockOutcome, Refusal, RollbackReport, StepRecord,
};
pub use sys::PvclockVcpuTimeInfo;

/// Why a KVM operation failed. Every variant names the ioctl (and the vCPU,
/// when it was a vCPU ioctl) and the errno the kernel returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvmError {
    /// An ioctl returned an error.
    #[error("{ioctl}{}: errno {errno} ({})", on_vcpu(*.vcpu), strerror(*.errno))]
    Ioctl {
        ioctl: &'static str,
        /// The vCPU index (position in the slice the caller passed).
        vcpu: Option<u32>,
        errno: i32,
    },
    /// An ioctl succeeded but answered something impossible.
    #[error("{ioctl}{}: unexpected answer: {reason}", on_vcpu(*.vcpu))]
    BadAnswer {
        ioctl: &'static str,
        vcpu: Option<u32>,
        reason: String,
    },
    /// A TSC offset read back differs from the value just written.
    #[error(
        "vCPU {vcpu}: KVM_GET_DEVICE_ATTR(TSC_OFFSET) reads {read_back_cycles} after \
         KVM_SET_DEVICE_ATTR wrote {wanted_cycles}"
    )]
    OffsetMismatch {
        vcpu: u32,
        wanted_cycles: i64,
        read_back_cycles: i64,
    },
    /// The caller passed no vCPU, or an index beyond the ones it passed.
    #[error("vCPU index {vcpu} out of range (the VM has {count} vCPUs)")]
    NoSuchVcpu { vcpu: usize, count: usize },
}

impl KvmError {
    /// The errno behind an ioctl failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KvmError::Ioctl { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The ioctl that failed, when one did.
    pub fn ioctl(&self) -> Option<&'static str> {
        match self {
            KvmError::Ioctl { ioctl, .. } | KvmError::BadAnswer { ioctl, .. } => Some(ioctl),
            _ => None,
        }
    }

    /// The same error, attributed to vCPU `index`.
    pub fn on_vcpu(self, index: usize) -> KvmError {
        let vcpu = u32::try_from(index).ok();
        match self {
            KvmError::Ioctl { ioctl, errno, .. } => KvmError::Ioctl { ioctl, vcpu, errno },
            KvmError::BadAnswer { ioctl, reason, .. } => KvmError::BadAnswer {
                ioctl,
                vcpu,
                reason,
            },
            other => other,
        }
    }

    pub(crate) fn ioctl_errno(ioctl: &'static str, errno: i32) -> KvmError {
        KvmError::Ioctl {
            ioctl,
            vcpu: None,
            errno,
        }
    }

    pub(crate) fn from_errno(ioctl: &'static str, e: vmm_sys_util::errno::Error) -> KvmError {
        KvmError::ioctl_errno(ioctl, e.errno())
    }
}

fn on_vcpu(vcpu: Option<u32>) -> String {
    vcpu.map_or_else(String::new, |v| format!(" on vCPU {v}"))
}

/// "Invalid argument" for 22: the OS text without std's " (os error 22)".
fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.split_once(" (os error") {
        Some((msg, _)) => msg.to_string(),
        None => text,
    }
}

/// The errno of the last failed libc call.
pub(crate) fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Elapsed ns since `start`, saturating.
pub(crate) fn elapsed_ns(start: std::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
