//! A tiny guest for probes, tests and benchmarks: 16-bit real mode code that
//! enables kvm-clock and reports its TSC over port I/O.
//!
//! Layout of the 64 KiB of guest memory (guest physical = offset):
//!
//! | gpa      | what |
//! |----------|------|
//! | 0x1000   | the program ([`clock_reporter_program`]) |
//! | 0x2000   | vCPU 0's PVTI (32 bytes, filled by KVM) |
//!
//! The program: `wrmsr MSR_KVM_SYSTEM_TIME_NEW = 0x2000 | 1`, then forever
//! `rdtsc; out 0x80, eax; mov eax, edx; out 0x84, eax`. Each `out` exits to
//! the host, so the host paces the guest: one [`TestVm::run_report`] is one
//! guest TSC reading, and the host reads the PVTI the guest would use for it
//! out of guest memory at that moment. Only vCPU 0 runs; the other vCPUs
//! exist so that offsets and apply can be exercised on several.

use std::ptr::NonNull;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::capture::read_pvti_consistent;
use super::last_errno;
use crate::model::Pvti;
use crate::pvclock::pvclock_read;

/// Size of the guest's memory, bytes.
pub const GUEST_MEMORY_BYTES: usize = 0x1_0000;
/// Where the program is loaded and vCPU 0 starts (CS = 0, IP = this).
pub const CODE_GPA: u64 = 0x1000;
/// Where vCPU 0's PVTI lives.
pub const PVTI_GPA: u64 = 0x2000;
/// Port receiving the low 32 bits of the TSC.
pub const PORT_TSC_LOW: u16 = 0x80;
/// Port receiving the high 32 bits of the TSC.
pub const PORT_TSC_HIGH: u16 = 0x84;
/// Most VM exits [`TestVm::run_report`] accepts before giving up.
const MAX_EXITS_PER_REPORT: u32 = 64;

/// The guest program, hand-assembled, for a PVTI at `pvti_gpa` (below 4 GiB).
pub fn clock_reporter_program(pvti_gpa: u32) -> Vec<u8> {
    let msr = 0x4b56_4d01u32.to_le_bytes();
    let enable = (pvti_gpa | 1).to_le_bytes();
    let mut code = Vec::with_capacity(30);
    // 0x00: 66 B9 imm32      mov ecx, MSR_KVM_SYSTEM_TIME_NEW
    code.extend_from_slice(&[0x66, 0xB9]);
    code.extend_from_slice(&msr);
    // 0x06: 66 B8 imm32      mov eax, pvti_gpa | 1 (enable)
    code.extend_from_slice(&[0x66, 0xB8]);
    code.extend_from_slice(&enable);
    // 0x0C: 66 31 D2         xor edx, edx (high half of the MSR value)
    code.extend_from_slice(&[0x66, 0x31, 0xD2]);
    // 0x0F: 0F 30            wrmsr
    code.extend_from_slice(&[0x0F, 0x30]);
    // 0x11: 0F 31            loop: rdtsc (edx:eax = guest TSC)
    code.extend_from_slice(&[0x0F, 0x31]);
    // 0x13: 66 E7 80         out 0x80, eax (low half; exits to the host)
    code.extend_from_slice(&[0x66, 0xE7, PORT_TSC_LOW as u8]);
    // 0x16: 66 89 D0         mov eax, edx
    code.extend_from_slice(&[0x66, 0x89, 0xD0]);
    // 0x19: 66 E7 84         out 0x84, eax (high half; exits to the host)
    code.extend_from_slice(&[0x66, 0xE7, PORT_TSC_HIGH as u8]);
    // 0x1C: EB F3            jmp loop (0x1E - 13 = 0x11)
    code.extend_from_slice(&[0xEB, 0xF3]);
    code
}

/// Why the test guest could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(String),
    #[error("{op} failed: {errno}")]
    Kvm { op: &'static str, errno: String },
    #[error("mmap of {size_bytes} bytes of guest memory failed: errno {errno}")]
    Mmap { size_bytes: usize, errno: i32 },
    #[error("guest memory access at gpa {gpa:#x} (+{len}) is out of bounds")]
    OutOfBounds { gpa: u64, len: usize },
    #[error("the guest did not report within {exits} exits (last exit: {last})")]
    NoReport { exits: u32, last: String },
}

fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> GuestError {
    move |e| GuestError::Kvm {
        op,
        errno: e.to_string(),
    }
}

/// Anonymous, page-aligned host memory backing a guest.
#[derive(Debug)]
pub struct GuestMemory {
    addr: NonNull<u8>,
    size_bytes: usize,
}

// SAFETY: the mapping is owned by this value alone; access goes through
// bounds-checked volatile reads and writes.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    /// Maps `size_bytes` of zeroed memory.
    pub fn new(size_bytes: usize) -> Result<GuestMemory, GuestError> {
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GuestError::Mmap {
                size_bytes,
                errno: last_errno(),
            });
        }
        let addr = NonNull::new(ptr.cast::<u8>()).ok_or(GuestError::Mmap {
            size_bytes,
            errno: 0,
        })?;
        Ok(GuestMemory { addr, size_bytes })
    }

    /// Host virtual address of guest physical address 0.
    pub fn host_addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }

    fn range(&self, gpa: u64, len: usize) -> Result<usize, GuestError> {
        let start = usize::try_from(gpa).map_err(|_| GuestError::OutOfBounds { gpa, len })?;
        match start.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(start),
            _ => Err(GuestError::OutOfBounds { gpa, len }),
        }
    }

    /// Reads `buf.len()` bytes at `gpa` (volatile: the guest may write them).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let start = self.range(gpa, buf.len())?;
        for (i, byte) in buf.iter_mut().enumerate() {
            // SAFETY: start + i < size_bytes (checked above) and the mapping lives as long as self.
            *byte = unsafe { self.addr.as_ptr().add(start + i).read_volatile() };
        }
        Ok(())
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        let start = self.range(gpa, data.len())?;
        for (i, byte) in data.iter().enumerate() {
            // SAFETY: start + i < size_bytes (checked above) and the mapping lives as long as self.
            unsafe { self.addr.as_ptr().add(start + i).write_volatile(*byte) };
        }
        Ok(())
    }

    /// The 32 bytes at `gpa`, or `None` out of bounds: a PVTI reader for
    /// [`super::capture`].
    pub fn read_32(&self, gpa: u64) -> Option<[u8; 32]> {
        let mut b = [0u8; 32];
        self.read(gpa, &mut b).ok().map(|_| b)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: addr/size_bytes are exactly what mmap returned; nothing uses them afterwards.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.size_bytes);
        }
    }
}

/// What the guest reported once: its TSC, and the PVTI it would use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReading {
    /// The guest's rdtsc, cycles.
    pub guest_tsc: u64,
    /// vCPU 0's PVTI read from guest memory at that exit (`None` while KVM
    /// has not filled it).
    pub pvti: Option<Pvti>,
    /// kvm-clock the guest computes from them, ns.
    pub kvmclock_ns: Option<u64>,
}

/// A VM running [`clock_reporter_program`] on vCPU 0.
///
/// Field order matters: vCPUs and the VM are closed before the memory is
/// unmapped.
pub struct TestVm {
    pub vcpus: Vec<VcpuFd>,
    pub vm: VmFd,
    memory: GuestMemory,
    reports: u64,
}

impl TestVm {
    /// Opens `/dev/kvm`, mapping "absent" and "not permitted" to a message
    /// a test can print as its SKIP reason.
    pub fn open_kvm() -> Result<Kvm, GuestError> {
        Kvm::new().map_err(|e| GuestError::OpenKvm(e.to_string()))
    }

    /// A VM with `vcpu_count` vCPUs (at least 1), 64 KiB of memory, and the
    /// clock reporter loaded; vCPU 0 starts at [`CODE_GPA`] in real mode.
    pub fn new(kvm: &Kvm, vcpu_count: u32) -> Result<TestVm, GuestError> {
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let memory = GuestMemory::new(GUEST_MEMORY_BYTES)?;
        memory.write(CODE_GPA, &clock_reporter_program(PVTI_GPA as u32))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: GUEST_MEMORY_BYTES as u64,
            userspace_addr: memory.host_addr(),
        };
        // SAFETY: the region is a live mapping owned by the returned TestVm,
        // which closes the VM (field order) before unmapping it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vcpus = Vec::new();
        for id in 0..vcpu_count.max(1) {
            vcpus.push(
                vm.create_vcpu(u64::from(id))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let boot = &vcpus[0];
        let mut sregs = boot.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        boot.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = boot.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        boot.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(TestVm {
            vcpus,
            vm,
            memory,
            reports: 0,
        })
    }

    /// Runs vCPU 0 until the guest has reported one TSC value, then reads
    /// the PVTI it would use for it.
    pub fn run_report(&mut self) -> Result<GuestReading, GuestError> {
        let (mut low, mut last) = (None, String::from("none"));
        let vcpu = &mut self.vcpus[0];
        for _ in 0..MAX_EXITS_PER_REPORT {
            match vcpu.run().map_err(kvm_err("KVM_RUN"))? {
                VcpuExit::IoOut(PORT_TSC_LOW, data) => low = Some(le_u32(data)),
                VcpuExit::IoOut(PORT_TSC_HIGH, data) => {
                    if let Some(low) = low {
                        let guest_tsc = (u64::from(le_u32(data)) << 32) | u64::from(low);
                        self.reports += 1;
                        let pvti = read_pvti_consistent(&|gpa| self.memory.read_32(gpa), PVTI_GPA)
                            .filter(|p| p.tsc_to_system_mul != 0);
                        return Ok(GuestReading {
                            guest_tsc,
                            pvti,
                            kvmclock_ns: pvti.map(|p| pvclock_read(&p, guest_tsc)),
                        });
                    }
                }
                other => last = format!("{other:?}"),
            }
        }
        Err(GuestError::NoReport {
            exits: MAX_EXITS_PER_REPORT,
            last,
        })
    }

    /// The guest's memory (a PVTI reader for capture: `|gpa| vm.memory().read_32(gpa)`).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Reports received so far.
    pub fn reports(&self) -> u64 {
        self.reports
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(data) {
        *dst = *src;
    }
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_layout() {
        let code = clock_reporter_program(0x2000);
        assert_eq!(code.len(), 30);
        // The loop starts at 0x11 with rdtsc; the jmp lands there.
        assert_eq!(&code[0x11..0x13], &[0x0F, 0x31]);
        let next_ip = code.len() as i64;
        let rel = i64::from(code[0x1D] as i8);
        assert_eq!(next_ip + rel, 0x11);
        assert_eq!(&code[0x08..0x0C], &0x2001u32.to_le_bytes());
    }

    #[test]
    fn memory_bounds() {
        let mem = GuestMemory::new(4096).expect("mmap 4 KiB");
        assert!(mem.write(4090, &[1; 6]).is_ok());
        assert!(mem.write(4091, &[1; 6]).is_err());
        assert!(mem.read_32(u64::MAX).is_none());
        let mut b = [0u8; 2];
        mem.read(4094, &mut b).expect("in bounds");
        assert_eq!(b, [1, 1]);
    }
}
