//! The lab's side of the test guest: readings bracketed by host TSC reads on
//! any vCPU, the stock save/restore a VMM does today, and small KVM helpers.

use clockcarry::host::read_host_tsc;
use clockcarry::kvm::guest::{TestVm, CODE_GPA, PORT_TSC_HIGH, PORT_TSC_LOW, PVTI_GPA};
use clockcarry::kvm::{read_pvti_consistent, sys};
use clockcarry::model::{KvmClockSample, Pvti, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

/// MSR_IA32_TSC: what VMMs save and write back today.
pub const MSR_IA32_TSC: u32 = 0x10;
/// Most exits one report may take.
const MAX_EXITS: u32 = 64;

/// One guest TSC report, with the host TSC read just before the vCPU
/// entered and just after it left: the guest's `rdtsc` happened in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    pub vcpu: usize,
    pub guest_tsc: u64,
    /// The PVTI in guest memory at that exit (shared by every vCPU here).
    pub pvti: Option<Pvti>,
    /// kvm-clock the guest computes from `guest_tsc` and `pvti`, ns.
    pub kvmclock_ns: Option<u64>,
    pub host_tsc_before: u64,
    pub host_tsc_after: u64,
}

impl Reading {
    /// True when the guest TSC equals host TSC + `offset` at some instant
    /// inside the bracket: the offset really is in effect.
    pub fn matches_offset(&self, offset_cycles: i64) -> bool {
        let host = self.guest_tsc.wrapping_sub(offset_cycles as u64);
        (self.host_tsc_before..=self.host_tsc_after).contains(&host)
    }
}

/// Points a non-boot vCPU at the program (each vCPU starts it once: it
/// enables kvm-clock on that vCPU, then reports its TSC in a loop).
pub fn start_ap(vcpu: &VcpuFd) -> Result<(), String> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// Runs vCPU `index` of `vm` until its guest has reported one TSC value.
/// A non-boot vCPU must have been [`start_ap`]ed.
pub fn report(vm: &mut TestVm, index: usize) -> Result<Reading, String> {
    let before = read_host_tsc();
    let guest_tsc = {
        let vcpu = vm
            .vcpus
            .get_mut(index)
            .ok_or_else(|| format!("no vCPU {index}"))?;
        run_until_report(vcpu)?
    };
    let after = read_host_tsc();
    let pvti = read_pvti_consistent(&|gpa| vm.memory().read_32(gpa), PVTI_GPA)
        .filter(|p| p.tsc_to_system_mul != 0);
    Ok(Reading {
        vcpu: index,
        guest_tsc,
        pvti,
        kvmclock_ns: pvti.map(|p| clockcarry::pvclock::pvclock_read(&p, guest_tsc)),
        host_tsc_before: before,
        host_tsc_after: after,
    })
}

fn run_until_report(vcpu: &mut VcpuFd) -> Result<u64, String> {
    let mut low: Option<u32> = None;
    let mut last = String::from("none");
    for _ in 0..MAX_EXITS {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(PORT_TSC_LOW, data) => low = Some(le_u32(data)),
            VcpuExit::IoOut(PORT_TSC_HIGH, data) => {
                if let Some(low) = low {
                    return Ok((u64::from(le_u32(data)) << 32) | u64::from(low));
                }
            }
            other => last = format!("{other:?}"),
        }
    }
    Err(format!(
        "no TSC report within {MAX_EXITS} exits (last: {last})"
    ))
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

/// Every vCPU's TSC offset (KVM_GET_DEVICE_ATTR).
pub fn offsets(vm: &TestVm) -> Result<Vec<i64>, String> {
    vm.vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| sys::get_tsc_offset(v).map_err(|e| format!("vCPU {i}: {e}")))
        .collect()
}

/// KVM_GET_CLOCK says TSC_STABLE: KVM's master clock is on.
pub fn master_clock(vm: &TestVm) -> Result<bool, String> {
    let s = sys::get_clock(&vm.vm).map_err(|e| e.to_string())?;
    Ok(s.flags & KVM_CLOCK_TSC_STABLE != 0)
}

/// A PVTI line at guest TSC `tsc`, ns, extended below `tsc_timestamp`:
/// the library's one line evaluation.
pub use clockcarry::pvclock::line_at_ns as line_at;

/// What a stock VMM saves of the clock: each vCPU's MSR_IA32_TSC
/// (KVM_GET_MSRS) and one KVM_GET_CLOCK (QEMU, Firecracker, Cloud Hypervisor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockSave {
    pub tsc_msr: Vec<u64>,
    pub clock: KvmClockSample,
}

/// How a stock VMM puts kvm-clock back after writing MSR_IA32_TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockClock {
    /// KVM_SET_CLOCK(saved clock), flags 0: kvm-clock resumes where it
    /// stopped (QEMU on migration, Firecracker's default).
    Frozen,
    /// KVM_SET_CLOCK(saved clock, saved realtime, KVM_CLOCK_REALTIME): KVM
    /// adds the UTC time since (Cloud Hypervisor v53, Firecracker with
    /// `clock_realtime`).
    Realtime,
}

impl StockClock {
    pub fn describe(self) -> &'static str {
        match self {
            StockClock::Frozen => "stock: MSR_IA32_TSC write + KVM_SET_CLOCK(saved clock)",
            StockClock::Realtime => {
                "stock: MSR_IA32_TSC write + KVM_SET_CLOCK(saved clock, KVM_CLOCK_REALTIME)"
            }
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            StockClock::Frozen => "msr-tsc+set-clock",
            StockClock::Realtime => "msr-tsc+set-clock-realtime",
        }
    }
}

/// The stock save, from a running VM.
pub fn stock_save(vm: &TestVm) -> Result<StockSave, String> {
    let mut tsc_msr = Vec::new();
    for (i, v) in vm.vcpus.iter().enumerate() {
        let value = sys::get_msr(v, MSR_IA32_TSC)
            .map_err(|e| format!("vCPU {i}: {e}"))?
            .ok_or_else(|| format!("vCPU {i}: KVM_GET_MSRS did not report MSR_IA32_TSC"))?;
        tsc_msr.push(value);
    }
    let clock = sys::get_clock(&vm.vm).map_err(|e| e.to_string())?;
    Ok(StockSave { tsc_msr, clock })
}

/// The stock restore, as VMMs do it today (labelled as the baseline: the
/// clockcarry library itself never writes MSR_IA32_TSC): each vCPU's saved
/// MSR_IA32_TSC written back with a host-initiated KVM_SET_MSRS, then
/// KVM_SET_CLOCK, before any vCPU runs.
pub fn stock_restore(vm: &TestVm, save: &StockSave, clock: StockClock) -> Result<(), String> {
    for (i, (vcpu, value)) in vm.vcpus.iter().zip(&save.tsc_msr).enumerate() {
        set_msr(vcpu, MSR_IA32_TSC, *value).map_err(|e| format!("vCPU {i}: {e}"))?;
    }
    let (realtime, flags) = match clock {
        StockClock::Frozen => (0, 0),
        StockClock::Realtime => (save.clock.realtime_ns, KVM_CLOCK_REALTIME),
    };
    sys::set_clock(&vm.vm, save.clock.clock_ns, realtime, flags).map_err(|e| e.to_string())
}

fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) -> Result<(), String> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|e| format!("cannot build the MSR list: {e:?}"))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(n) => Err(format!("KVM_SET_MSRS({index:#x}) set {n} of 1")),
        Err(e) => Err(format!("KVM_SET_MSRS({index:#x}): {e}")),
    }
}
