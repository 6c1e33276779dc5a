//! The narrow trait between the apply/capture policy and the ioctls:
//! [`ClockOps`], with its one real implementation [`KvmOps`] on kvm-ioctls
//! fds. Ordering, rollback and capture are tested through fault-injecting
//! implementations of the same trait (hook/tests/kvm_apply.rs, the
//! simulation in the test support).

use std::borrow::Borrow;

use kvm_ioctls::{VcpuFd, VmFd};

use super::{sys, KvmError};
use crate::model::{KvmClockSample, Pvti};

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
    /// KVM_GET_CLOCK_GUEST (vCPU): the kernel's copy of the PVTI. Without an
    /// implementation, the kernel is taken not to have it.
    fn get_clock_guest(&mut self, vcpu: usize) -> Result<Pvti, KvmError> {
        Err(KvmError::Ioctl {
            ioctl: "KVM_GET_CLOCK_GUEST",
            vcpu: u32::try_from(vcpu).ok(),
            errno: libc::ENOTTY,
        })
    }
    /// MSR_KVM_SYSTEM_TIME_NEW of `vcpu`: `Some(gpa)` of its PVTI when the
    /// guest enabled kvm-clock. Without an implementation, `None`.
    fn kvmclock_msr(&mut self, _vcpu: usize) -> Result<Option<u64>, KvmError> {
        Ok(None)
    }
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
    fn get_clock_guest(&mut self, vcpu: usize) -> Result<Pvti, KvmError> {
        sys::get_clock_guest(self.vcpu(vcpu)?).map(Pvti::from)
    }
    fn kvmclock_msr(&mut self, vcpu: usize) -> Result<Option<u64>, KvmError> {
        super::capture::kvmclock_msr(self.vcpu(vcpu)?)
    }
}
