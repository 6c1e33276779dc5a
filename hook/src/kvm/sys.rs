//! Raw ioctls kvm-ioctls 0.25 lacks on x86-64, and the pvclock page type.
//!
//! Each ioctl lives in one small function with its SAFETY justification and
//! returns a [`KvmError`] naming the ioctl and the errno. kvm-ioctls has no
//! vCPU device-attribute calls on x86-64 (they are aarch64-only), no
//! KVM_{GET,SET}_CLOCK_GUEST, no VM-level KVM_GET_TSC_KHZ, and its vCPU
//! `get_tsc_khz` reports the wrong errno; those are here.
//!
//! KVM_{GET,SET}_CLOCK_GUEST (0xd7 / 0xd6) come from a kernel series that is
//! not in mainline: their numbers may change, so they stay behind
//! [`get_clock_guest`] and [`set_clock_guest`] only.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs, KVMIO, KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use super::{last_errno, KvmError};
use crate::model::{KvmClockSample, Pvti};

ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
ioctl_iow_nr!(KVM_SET_CLOCK_GUEST, KVMIO, 0xd6, PvclockVcpuTimeInfo);
ioctl_ior_nr!(KVM_GET_CLOCK_GUEST, KVMIO, 0xd7, PvclockVcpuTimeInfo);
ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);

/// MSR_KVM_SYSTEM_TIME_NEW: bit 0 enables kvm-clock, the rest is the guest
/// physical address of the vCPU's PVTI.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// KVM_CAP_ADJUST_CLOCK: the KVM_CLOCK_* flags KVM_GET_CLOCK can report.
pub const KVM_CAP_ADJUST_CLOCK: u64 = 39;
/// KVM_CAP_TSC_CONTROL: KVM_SET_TSC_KHZ works on vCPUs (hardware scaling).
pub const KVM_CAP_TSC_CONTROL: u64 = 60;
/// KVM_CAP_GET_TSC_KHZ.
pub const KVM_CAP_GET_TSC_KHZ: u64 = 61;
/// KVM_CAP_KVMCLOCK_CTRL.
pub const KVM_CAP_KVMCLOCK_CTRL: u64 = 76;
/// KVM_CAP_VCPU_ATTRIBUTES: vCPU KVM_{GET,SET,HAS}_DEVICE_ATTR exist.
pub const KVM_CAP_VCPU_ATTRIBUTES: u64 = 127;
/// KVM_CAP_VM_TSC_CONTROL: KVM_SET_TSC_KHZ works on the VM fd.
pub const KVM_CAP_VM_TSC_CONTROL: u64 = 214;

/// `struct pvclock_vcpu_time_info`, exactly as the kernel and the guest lay
/// it out (packed, 32 bytes, little endian on x86-64).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PvclockVcpuTimeInfo {
    /// Odd while the writer updates the page.
    pub version: u32,
    pub pad0: u32,
    /// Guest TSC, cycles.
    pub tsc_timestamp: u64,
    /// kvm-clock at `tsc_timestamp`, ns.
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
    pub pad: [u8; 2],
}

const _: () = assert!(size_of::<PvclockVcpuTimeInfo>() == 32);

impl PvclockVcpuTimeInfo {
    /// Parses the 32 bytes of a pvclock page (little endian).
    pub fn from_bytes(b: &[u8; 32]) -> PvclockVcpuTimeInfo {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        PvclockVcpuTimeInfo {
            version: u32_at(0),
            pad0: u32_at(4),
            tsc_timestamp: u64_at(8),
            system_time: u64_at(16),
            tsc_to_system_mul: u32_at(24),
            tsc_shift: i8::from_le_bytes([b[28]]),
            flags: b[29],
            pad: [b[30], b[31]],
        }
    }

    /// The 32 bytes of this pvclock page (little endian).
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        // Copy the packed fields out first: no reference to a packed field.
        let (version, pad0, tsc_timestamp, system_time, mul) = (
            self.version,
            self.pad0,
            self.tsc_timestamp,
            self.system_time,
            self.tsc_to_system_mul,
        );
        b[0..4].copy_from_slice(&version.to_le_bytes());
        b[4..8].copy_from_slice(&pad0.to_le_bytes());
        b[8..16].copy_from_slice(&tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&system_time.to_le_bytes());
        b[24..28].copy_from_slice(&mul.to_le_bytes());
        b[28] = self.tsc_shift.to_le_bytes()[0];
        b[29] = self.flags;
        b[30..32].copy_from_slice(&{ self.pad });
        b
    }
}

impl From<PvclockVcpuTimeInfo> for Pvti {
    fn from(p: PvclockVcpuTimeInfo) -> Pvti {
        Pvti {
            tsc_timestamp: p.tsc_timestamp,
            system_time: p.system_time,
            tsc_to_system_mul: p.tsc_to_system_mul,
            tsc_shift: p.tsc_shift,
            flags: p.flags,
        }
    }
}

impl From<Pvti> for PvclockVcpuTimeInfo {
    fn from(p: Pvti) -> PvclockVcpuTimeInfo {
        PvclockVcpuTimeInfo {
            version: 0,
            pad0: 0,
            tsc_timestamp: p.tsc_timestamp,
            system_time: p.system_time,
            tsc_to_system_mul: p.tsc_to_system_mul,
            tsc_shift: p.tsc_shift,
            flags: p.flags,
            pad: [0; 2],
        }
    }
}

/// The `kvm_device_attr` naming the vCPU TSC offset, pointing at `value`.
fn tsc_offset_attr(value: *const u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: value as u64,
    }
}

fn check(ioctl: &'static str, ret: i32) -> Result<i32, KvmError> {
    if ret < 0 {
        Err(KvmError::ioctl_errno(ioctl, last_errno()))
    } else {
        Ok(ret)
    }
}

/// KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET): `Ok(false)`
/// when the kernel answers ENXIO (no such attribute) or ENOTTY (no vCPU
/// attributes at all).
pub fn has_tsc_offset_attr(vcpu: &VcpuFd) -> Result<bool, KvmError> {
    let attr = tsc_offset_attr(std::ptr::null());
    // SAFETY: `attr` is a valid kvm_device_attr the kernel only reads; HAS ignores `addr`.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_HAS_DEVICE_ATTR(), &attr) };
    match check("KVM_HAS_DEVICE_ATTR(TSC_OFFSET)", ret) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.errno(), Some(libc::ENXIO) | Some(libc::ENOTTY)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// KVM_GET_DEVICE_ATTR(TSC_OFFSET): the vCPU's TSC offset (KVM stores it as
/// u64 two's complement; returned signed).
pub fn get_tsc_offset(vcpu: &VcpuFd) -> Result<i64, KvmError> {
    let mut value: u64 = 0;
    let attr = tsc_offset_attr(&mut value as *mut u64);
    // SAFETY: `attr` is valid; its `addr` points at `value`, a live u64 the kernel writes 8 bytes to.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    check("KVM_GET_DEVICE_ATTR(TSC_OFFSET)", ret)?;
    Ok(value as i64)
}

/// KVM_SET_DEVICE_ATTR(TSC_OFFSET): sets the vCPU's TSC offset exactly (no
/// synchronisation heuristic on this path).
pub fn set_tsc_offset(vcpu: &VcpuFd, offset_cycles: i64) -> Result<(), KvmError> {
    let value = offset_cycles as u64;
    let attr = tsc_offset_attr(&value as *const u64);
    // SAFETY: `attr` is valid; its `addr` points at `value`, a live u64 the kernel reads 8 bytes from.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    check("KVM_SET_DEVICE_ATTR(TSC_OFFSET)", ret).map(|_| ())
}

/// KVM_GET_CLOCK_GUEST (0xd7, vCPU): the kernel's own copy of the PVTI.
/// EINVAL means "absent, or not in master-clock mode"; ENOTTY "absent".
pub fn get_clock_guest(vcpu: &VcpuFd) -> Result<PvclockVcpuTimeInfo, KvmError> {
    let mut pvti = PvclockVcpuTimeInfo::default();
    // SAFETY: `pvti` is a writable 32-byte struct, the size encoded in the ioctl number.
    let ret = unsafe { ioctl_with_mut_ref(vcpu, KVM_GET_CLOCK_GUEST(), &mut pvti) };
    check("KVM_GET_CLOCK_GUEST", ret)?;
    Ok(pvti)
}

/// KVM_SET_CLOCK_GUEST (0xd6, vCPU): installs `pvti` as the VM's kvm-clock
/// line. Needs the guest TSC (offsets, frequency) restored first.
pub fn set_clock_guest(vcpu: &VcpuFd, pvti: &PvclockVcpuTimeInfo) -> Result<(), KvmError> {
    // SAFETY: `pvti` is a readable 32-byte struct, the size encoded in the ioctl number.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_CLOCK_GUEST(), pvti) };
    check("KVM_SET_CLOCK_GUEST", ret).map(|_| ())
}

/// KVM_GET_TSC_KHZ on a vCPU, with the errno of the failure (kvm-ioctls'
/// version reports the return value instead).
pub fn vcpu_get_tsc_khz(vcpu: &VcpuFd) -> Result<u32, KvmError> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and touches no user memory.
    let ret = unsafe { ioctl(vcpu, KVM_GET_TSC_KHZ()) };
    let khz = check("KVM_GET_TSC_KHZ", ret)?;
    u32::try_from(khz).map_err(|_| KvmError::BadAnswer {
        ioctl: "KVM_GET_TSC_KHZ",
        vcpu: None,
        reason: format!("{khz} kHz"),
    })
}

/// KVM_GET_TSC_KHZ on the VM fd (KVM_CAP_VM_TSC_CONTROL kernels): the rate
/// new vCPUs get.
pub fn vm_get_tsc_khz(vm: &VmFd) -> Result<u32, KvmError> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and touches no user memory.
    let ret = unsafe { ioctl(vm, KVM_GET_TSC_KHZ()) };
    let khz = check("KVM_GET_TSC_KHZ(VM)", ret)?;
    u32::try_from(khz).map_err(|_| KvmError::BadAnswer {
        ioctl: "KVM_GET_TSC_KHZ(VM)",
        vcpu: None,
        reason: format!("{khz} kHz"),
    })
}

/// KVM_SET_TSC_KHZ on a vCPU (argument by value).
pub fn vcpu_set_tsc_khz(vcpu: &VcpuFd, khz: u32) -> Result<(), KvmError> {
    // SAFETY: KVM_SET_TSC_KHZ takes its argument by value and touches no user memory.
    let ret = unsafe { ioctl_with_val(vcpu, KVM_SET_TSC_KHZ(), libc::c_ulong::from(khz)) };
    check("KVM_SET_TSC_KHZ", ret).map(|_| ())
}

/// KVM_KVMCLOCK_CTRL: tells the guest it was stopped (PVCLOCK_GUEST_STOPPED).
/// EINVAL when the guest has no kvm-clock page.
pub fn kvmclock_ctrl(vcpu: &VcpuFd) -> Result<(), KvmError> {
    // SAFETY: KVM_KVMCLOCK_CTRL takes no argument and touches no user memory.
    let ret = unsafe { ioctl(vcpu, KVM_KVMCLOCK_CTRL()) };
    check("KVM_KVMCLOCK_CTRL", ret).map(|_| ())
}

/// KVM_GET_CLOCK as a [`KvmClockSample`].
pub fn get_clock(vm: &VmFd) -> Result<KvmClockSample, KvmError> {
    let data = vm
        .get_clock()
        .map_err(|e| KvmError::from_errno("KVM_GET_CLOCK", e))?;
    Ok(KvmClockSample {
        clock_ns: data.clock,
        flags: data.flags,
        realtime_ns: data.realtime,
        host_tsc: data.host_tsc,
    })
}

/// KVM_SET_CLOCK: kvm-clock reads `clock_ns` now (with `KVM_CLOCK_REALTIME`
/// in `flags`: at CLOCK_REALTIME `realtime_ns`, forward only).
pub fn set_clock(vm: &VmFd, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError> {
    let data = kvm_clock_data {
        clock: clock_ns,
        flags,
        realtime: realtime_ns,
        ..Default::default()
    };
    vm.set_clock(&data)
        .map_err(|e| KvmError::from_errno("KVM_SET_CLOCK", e))
}

/// KVM_GET_MSRS of one MSR: `None` when KVM does not report it.
pub fn get_msr(vcpu: &VcpuFd, index: u32) -> Result<Option<u64>, KvmError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .map_err(|e| KvmError::BadAnswer {
        ioctl: "KVM_GET_MSRS",
        vcpu: None,
        reason: format!("cannot build the MSR list: {e:?}"),
    })?;
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(|e| KvmError::from_errno("KVM_GET_MSRS", e))?;
    if read != 1 {
        return Ok(None);
    }
    Ok(msrs.as_slice().first().map(|e| e.data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(KVM_SET_DEVICE_ATTR(), 0x4018_AEE1);
        assert_eq!(KVM_GET_DEVICE_ATTR(), 0x4018_AEE2);
        assert_eq!(KVM_HAS_DEVICE_ATTR(), 0x4018_AEE3);
        assert_eq!(KVM_SET_CLOCK_GUEST(), 0x4020_AED6);
        assert_eq!(KVM_GET_CLOCK_GUEST(), 0x8020_AED7);
        assert_eq!(KVM_SET_TSC_KHZ(), 0xAEA2);
        assert_eq!(KVM_GET_TSC_KHZ(), 0xAEA3);
        assert_eq!(KVM_KVMCLOCK_CTRL(), 0xAEAD);
    }

    #[test]
    fn pvti_bytes_round_trip() {
        let p = PvclockVcpuTimeInfo {
            version: 7,
            pad0: 0,
            tsc_timestamp: 0x0102_0304_0506_0708,
            system_time: 0x1112_1314_1516_1718,
            tsc_to_system_mul: 3_512_676_643,
            tsc_shift: -1,
            flags: 3,
            pad: [0, 0],
        };
        let b = p.to_bytes();
        assert_eq!(&b[0..4], &[7, 0, 0, 0]);
        assert_eq!(b[8], 0x08);
        assert_eq!(b[28], 0xff);
        assert_eq!(b[29], 3);
        assert_eq!(PvclockVcpuTimeInfo::from_bytes(&b), p);
        let model: Pvti = p.into();
        assert_eq!(model.tsc_shift, -1);
        assert_eq!(model.tsc_to_system_mul, 3_512_676_643);
        let back: PvclockVcpuTimeInfo = model.into();
        assert_eq!({ back.system_time }, 0x1112_1314_1516_1718);
        assert_eq!({ back.version }, 0);
    }
}
