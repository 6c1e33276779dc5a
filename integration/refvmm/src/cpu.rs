//! vCPU setup (CPUID, 32-bit flat protected mode at the PVH entry) and the
//! architectural state a snapshot or migration carries.

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::pod;

/// MSR_IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// MSRs a snapshot carries (those the kernel lists), in this order. The TSC
/// is among them: restoring it is what stock VMMs do.
pub const SAVED_MSRS: [u32; 8] = [
    MSR_IA32_TSC,
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x4b56_4d00, // KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // KVM_SYSTEM_TIME_NEW
];

/// Guest physical address of the (empty) PVH start_info block.
pub const START_INFO_GPA: u64 = 0x6000;
/// hvm_start_info magic.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;

/// A failed vCPU ioctl.
#[derive(Debug, thiserror::Error)]
#[error("{op} on vCPU {vcpu}: {source}")]
pub struct CpuError {
    pub op: &'static str,
    pub vcpu: u32,
    pub source: vmm_sys_util::errno::Error,
}

fn err(op: &'static str, vcpu: u32) -> impl FnOnce(vmm_sys_util::errno::Error) -> CpuError {
    move |source| CpuError { op, vcpu, source }
}

/// CPUID as KVM supports it, with this vCPU's APIC ID (the probe derives its
/// index from CPUID.1:EBX[31:24]).
pub fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd, index: u32) -> Result<(), CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_SUPPORTED_CPUID", index))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(err("KVM_SET_CPUID2", index))
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// PVH entry state: 32-bit protected mode, flat segments, paging off,
/// interrupts off, `eip = entry`, `ebx = start_info`.
pub fn set_boot_registers(vcpu: &VcpuFd, index: u32, entry: u32) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS", index))?;
    sregs.cs = flat(0x10, 0xb);
    let data = flat(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(err("KVM_SET_SREGS", index))?;
    let regs = kvm_regs {
        rip: u64::from(entry),
        rbx: START_INFO_GPA,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS", index))
}

/// The bytes of an empty `hvm_start_info` (magic, version 1, nothing else).
pub fn start_info_bytes() -> [u8; 56] {
    let mut b = [0u8; 56];
    b[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b
}

/// One MSR's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// A vCPU's saved state. Kernel structures are hex (see [`pod`]); the MSRs
/// are listed, MSR_IA32_TSC first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub tsc_khz: u32,
    pub regs: String,
    pub sregs: String,
    pub fpu: String,
    pub events: String,
    pub mp_state: u32,
    pub msrs: Vec<MsrValue>,
}

impl VcpuState {
    /// The saved guest TSC (MSR_IA32_TSC), if it was saved.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
    }
}

/// The MSRs of [`SAVED_MSRS`] this kernel lists.
pub fn supported_msrs(kvm: &Kvm) -> Vec<u32> {
    let listed = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    SAVED_MSRS
        .iter()
        .copied()
        .filter(|m| listed.contains(m))
        .collect()
}

fn msr_list(indices: &[u32], vcpu: u32) -> Result<Msrs, CpuError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| CpuError {
        op: "building the MSR list",
        vcpu,
        source: vmm_sys_util::errno::Error::new(libc::E2BIG),
    })
}

/// Reads a vCPU's state (the vCPU must not be running).
pub fn save(vcpu: &VcpuFd, id: u32, msrs: &[u32]) -> Result<VcpuState, CpuError> {
    let regs = vcpu.get_regs().map_err(err("KVM_GET_REGS", id))?;
    let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS", id))?;
    let fpu = vcpu.get_fpu().map_err(err("KVM_GET_FPU", id))?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(err("KVM_GET_VCPU_EVENTS", id))?;
    let mp_state = vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE", id))?;
    let tsc_khz = vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ", id))?;
    let mut list = msr_list(msrs, id)?;
    let read = vcpu.get_msrs(&mut list).map_err(err("KVM_GET_MSRS", id))?;
    let msrs = list
        .as_slice()
        .iter()
        .take(read)
        .map(|e| MsrValue {
            index: e.index,
            data: e.data,
        })
        .collect();
    Ok(VcpuState {
        id,
        tsc_khz,
        regs: pod::to_hex(&regs),
        sregs: pod::to_hex(&sregs),
        fpu: pod::to_hex(&fpu),
        events: pod::to_hex(&events),
        mp_state: mp_state.mp_state,
        msrs,
    })
}

fn decode<T: Copy>(hex: &str, what: &'static str, id: u32) -> Result<T, CpuError>
where
    pod::Pod<T>: vm_memory::ByteValued,
{
    pod::from_hex(hex).ok_or(CpuError {
        op: what,
        vcpu: id,
        source: vmm_sys_util::errno::Error::new(libc::EINVAL),
    })
}

/// Writes a saved state into a fresh vCPU the way stock VMMs do: the TSC
/// rate, registers, then the MSRs **including MSR_IA32_TSC** (a
/// host-initiated write: the guest TSC resumes from the saved value).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), CpuError> {
    let id = state.id;
    let regs: kvm_regs = decode(&state.regs, "decoding saved regs", id)?;
    let sregs: kvm_sregs = decode(&state.sregs, "decoding saved sregs", id)?;
    let fpu: kvm_fpu = decode(&state.fpu, "decoding saved fpu", id)?;
    let events: kvm_vcpu_events = decode(&state.events, "decoding saved events", id)?;
    if state.tsc_khz != 0 {
        let current = vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ", id))?;
        if current != state.tsc_khz {
            vcpu.set_tsc_khz(state.tsc_khz)
                .map_err(err("KVM_SET_TSC_KHZ", id))?;
        }
    }
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS", id))?;
    vcpu.set_sregs(&sregs).map_err(err("KVM_SET_SREGS", id))?;
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU", id))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError {
        op: "building the MSR list",
        vcpu: id,
        source: vmm_sys_util::errno::Error::new(libc::E2BIG),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS", id))?;
    if written != entries.len() {
        return Err(CpuError {
            op: "KVM_SET_MSRS (not all written)",
            vcpu: id,
            source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_vcpu_events(&events)
        .map_err(err("KVM_SET_VCPU_EVENTS", id))?;
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(err("KVM_SET_MP_STATE", id))
}
