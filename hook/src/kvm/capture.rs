//! Capture a VM's clock from its file descriptors. Reads only: no clock,
//! offset or MSR is written.

use std::borrow::Borrow;

use kvm_ioctls::{VcpuFd, VmFd};

use super::ops::{ClockOps, KvmOps};
use super::sys::{self, PvclockVcpuTimeInfo, MSR_KVM_SYSTEM_TIME_NEW};
use super::KvmError;
use crate::model::{Capabilities, Pvti, PvtiSource, RunState, VcpuOffset, VmClock};

/// Reads the 32 bytes of guest memory at a guest physical address, or `None`
/// when the address is not backed. The VMM passes one built on its memory
/// map (e.g. vm-memory's `GuestMemoryMmap::read_slice`).
pub type PvtiReader<'a> = &'a dyn Fn(u64) -> Option<[u8; 32]>;

/// Reads through `reader` under the pvclock version protocol.
const PVTI_READ_TRIES: u32 = 16;

/// A consistent PVTI at `gpa` under the pvclock version protocol: the
/// version is even (no update in progress) and unchanged across the read;
/// retried up to 16 times. `None` when the reader fails or no stable copy
/// was seen.
pub fn read_pvti_consistent(reader: PvtiReader<'_>, gpa: u64) -> Option<Pvti> {
    for _ in 0..PVTI_READ_TRIES {
        let first = PvclockVcpuTimeInfo::from_bytes(&reader(gpa)?);
        let version = first.version;
        if version & 1 != 0 {
            std::hint::spin_loop();
            continue;
        }
        let again = PvclockVcpuTimeInfo::from_bytes(&reader(gpa)?);
        if again == first {
            return Some(first.into());
        }
    }
    None
}

/// MSR_KVM_SYSTEM_TIME_NEW of `vcpu`: `Some(gpa)` of its PVTI when the guest
/// enabled kvm-clock (bit 0), `None` otherwise.
pub fn kvmclock_msr(vcpu: &VcpuFd) -> Result<Option<u64>, KvmError> {
    let value = sys::get_msr(vcpu, MSR_KVM_SYSTEM_TIME_NEW)?;
    Ok(value.filter(|v| v & 1 == 1).map(|v| v & !1))
}

/// The VM's clock as the hypervisor sees it now.
///
/// - `tsc_khz` from KVM_GET_TSC_KHZ on vCPU 0; one TSC offset per vCPU
///   (KVM_GET_DEVICE_ATTR), ids = positions in `vcpus`;
/// - one KVM_GET_CLOCK sample;
/// - the PVTI: KVM_GET_CLOCK_GUEST on vCPU 0 when `capabilities.clock_guest`
///   (source `kernel_clock_guest`); else, when `pvti_reader` is given and
///   vCPU 0's MSR_KVM_SYSTEM_TIME_NEW is enabled, the page it names read
///   under the version protocol (source `guest_memory`); else none, and the
///   planner derives it from the KVM_GET_CLOCK pair.
///
/// `capabilities` is copied into the result: probe once per process with
/// [`super::probe`] (it needs a scratch VM) and pass the answer to every
/// capture. `tsc_scaling` is left unreported (`None`): KVM does not expose
/// the ratio; a VMM that set a frequency fills it in.
///
/// vCPU ioctls wait for a vCPU that is inside KVM_RUN: capture from the vCPU
/// threads, or after kicking them out (a running VM's vCPUs are parked for
/// the duration; no clock is touched).
pub fn capture<V: Borrow<VcpuFd>>(
    vm: &VmFd,
    vcpus: &[V],
    capabilities: &Capabilities,
    pvti_reader: Option<PvtiReader<'_>>,
    state: RunState,
) -> Result<VmClock, KvmError> {
    capture_with(
        &mut KvmOps::new(vm, vcpus),
        capabilities,
        pvti_reader,
        state,
    )
}

/// [`capture`] through any [`ClockOps`]: the same reads, in the same order,
/// so a fault-injecting implementation can test it. Reads only.
pub fn capture_with<O: ClockOps + ?Sized>(
    ops: &mut O,
    capabilities: &Capabilities,
    pvti_reader: Option<PvtiReader<'_>>,
    state: RunState,
) -> Result<VmClock, KvmError> {
    let n = ops.vcpu_count();
    if n == 0 {
        return Err(KvmError::NoSuchVcpu { vcpu: 0, count: 0 });
    }
    let tsc_khz = ops.get_tsc_khz(0).map_err(|e| e.on_vcpu(0))?;
    let mut offsets = Vec::with_capacity(n);
    for i in 0..n {
        let tsc_offset = ops.get_tsc_offset(i).map_err(|e| e.on_vcpu(i))?;
        offsets.push(VcpuOffset {
            id: u32::try_from(i).unwrap_or(u32::MAX),
            tsc_offset,
        });
    }
    let kvmclock = ops.get_clock()?;

    let mut pvti = None;
    if capabilities.clock_guest {
        match ops.get_clock_guest(0) {
            Ok(p) => pvti = Some((p, PvtiSource::KernelClockGuest)),
            Err(e) => log::warn!("capture: {e}; falling back to guest memory"),
        }
    }
    if let (None, Some(reader)) = (pvti, pvti_reader) {
        if let Some(gpa) = ops.kvmclock_msr(0).map_err(|e| e.on_vcpu(0))? {
            pvti = read_pvti_consistent(reader, gpa)
                .filter(|p| p.tsc_to_system_mul != 0)
                .map(|p| (p, PvtiSource::GuestMemory));
        }
    }
    Ok(VmClock {
        state,
        tsc_khz,
        vcpus: offsets,
        kvmclock,
        pvti: pvti.map(|(p, _)| p),
        pvti_source: pvti.map(|(_, s)| s),
        tsc_scaling: None,
        capabilities: *capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn page(version: u32) -> [u8; 32] {
        PvclockVcpuTimeInfo {
            version,
            tsc_timestamp: 100,
            system_time: 200,
            tsc_to_system_mul: 3,
            tsc_shift: -1,
            flags: 1,
            ..Default::default()
        }
        .to_bytes()
    }

    #[test]
    fn version_protocol_waits_for_even_and_stable() {
        // Odd, odd, then even twice: accepted on the third read pair.
        let calls = Cell::new(0u32);
        let reader = |_gpa: u64| {
            calls.set(calls.get() + 1);
            Some(page(if calls.get() <= 2 { 5 } else { 6 }))
        };
        let p = read_pvti_consistent(&reader, 0x2000).expect("stable copy");
        assert_eq!(p.system_time, 200);
        assert_eq!(calls.get(), 4);
    }

    #[test]
    fn version_protocol_gives_up() {
        let calls = Cell::new(0u32);
        // The version changes between every read: never stable.
        let reader = |_gpa: u64| {
            calls.set(calls.get() + 2);
            Some(page(calls.get()))
        };
        assert_eq!(read_pvti_consistent(&reader, 0), None);
        assert_eq!(read_pvti_consistent(&|_| None, 0), None);
    }
}
