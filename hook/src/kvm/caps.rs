//! What the running kernel lets a VMM do with the clock. Probe, never assume.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;

use super::guest::TestVm;
use super::sys::{self, KVM_CAP_ADJUST_CLOCK, KVM_CAP_GET_TSC_KHZ, KVM_CAP_KVMCLOCK_CTRL};
use super::sys::{KVM_CAP_TSC_CONTROL, KVM_CAP_VCPU_ATTRIBUTES, KVM_CAP_VM_TSC_CONTROL};
use super::KvmError;
use crate::model::{Capabilities, KVM_CLOCK_TSC_STABLE};

/// How far the write test moves the offset: 1 s at 1 GHz, far beyond any
/// TSC drift between the writes and the read-back.
pub const OFFSET_TEST_STEP_CYCLES: i64 = 1_000_000_000;

/// The TSC offset write test, done on a scratch VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OffsetWriteTest {
    pub before_cycles: i64,
    pub wrote_cycles: i64,
    pub read_back_cycles: i64,
    /// The original offset was written back successfully.
    pub restored: bool,
}

/// KVM_CAP_ADJUST_CLOCK read as an int (a VM ioctl, no vCPU touched): the
/// KVM_CLOCK_* flags KVM_GET_CLOCK can report, 0 when it is absent.
pub fn adjust_clock_flags(vm: &VmFd) -> u32 {
    u32::try_from(vm.check_extension_raw(KVM_CAP_ADJUST_CLOCK as libc::c_ulong)).unwrap_or(0)
}

/// Everything the probe found, more than [`Capabilities`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmProbe {
    /// KVM_CAP_ADJUST_CLOCK read as an int: the KVM_CLOCK_* flags
    /// KVM_GET_CLOCK can report (14 on >= 5.16, 2 before).
    pub adjust_clock_flags: u32,
    /// KVM_CAP_VCPU_ATTRIBUTES.
    pub vcpu_attributes: bool,
    /// KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET).
    pub tsc_offset_attr: bool,
    /// Whether offset writes take effect (write, read back, on a scratch
    /// VM); `None` when it could not be tested.
    pub tsc_offset_effective: Option<bool>,
    pub tsc_offset_test: Option<OffsetWriteTest>,
    /// KVM_CAP_TSC_CONTROL (60).
    pub tsc_control: bool,
    /// KVM_CAP_VM_TSC_CONTROL (214).
    pub vm_tsc_control: bool,
    /// KVM_CAP_GET_TSC_KHZ (61).
    pub get_tsc_khz_cap: bool,
    /// KVM_GET_TSC_KHZ on the given vCPU.
    pub vcpu_tsc_khz: Option<u32>,
    /// KVM_GET_TSC_KHZ on the given VM (VM_TSC_CONTROL kernels).
    pub vm_tsc_khz: Option<u32>,
    /// KVM_CAP_KVMCLOCK_CTRL (76).
    pub kvmclock_ctrl: bool,
    /// KVM_GET_CLOCK_GUEST answered on a vCPU that has run in master-clock mode.
    pub clock_guest: bool,
    /// The errno of that try when it failed (EINVAL / ENOTTY = absent).
    pub clock_guest_errno: Option<i32>,
    /// KVM_GET_CLOCK flags on the VM the CLOCK_GUEST try ran on (14 = master
    /// clock; without TSC_STABLE an EINVAL proves nothing).
    pub clock_guest_try_flags: u32,
    /// A scratch VM could be created and run (needed for the offset test
    /// and a trustworthy CLOCK_GUEST try).
    pub scratch_vm: bool,
    /// What went wrong or looked odd while probing.
    pub notes: Vec<String>,
}

impl KvmProbe {
    /// The probe as the model's [`Capabilities`]: `tsc_offset` only when the
    /// attribute exists **and** writes were seen to take effect.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            tsc_offset_effective: self.tsc_offset_attr && self.tsc_offset_effective == Some(true),
            clock_guest: self.clock_guest,
            tsc_scaling: self.tsc_control || self.vm_tsc_control,
            adjust_clock: self.adjust_clock_flags,
        }
    }

    /// Probes `vm` / `vcpu` (read-only: extensions, rates) and a scratch VM
    /// made from `kvm` (the offset write test and the CLOCK_GUEST try, after
    /// one KVM_RUN so KVM is in master-clock mode). Never fails: what cannot
    /// be probed is reported absent, with a note. Costs a few ms.
    pub fn run(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> KvmProbe {
        let mut p = KvmProbe::cheap(vm, vcpu);
        match TestVm::new(kvm, 1) {
            Ok(mut scratch) => {
                p.offset_write_test(&scratch.vcpus[0]);
                match scratch.run_report() {
                    Ok(_) => {
                        p.scratch_vm = true;
                        p.try_clock_guest(&scratch.vm, &scratch.vcpus[0]);
                    }
                    Err(e) => {
                        p.notes.push(format!("scratch VM did not run: {e}"));
                        p.try_clock_guest(vm, vcpu);
                    }
                }
            }
            Err(e) => {
                p.notes.push(format!("no scratch VM: {e}"));
                p.try_clock_guest(vm, vcpu);
            }
        }
        p
    }

    /// The part of the probe that needs no scratch VM and writes nothing:
    /// `tsc_offset_effective` stays `None` and CLOCK_GUEST is not tried.
    pub fn cheap(vm: &VmFd, vcpu: &VcpuFd) -> KvmProbe {
        let cap = |c: u64| vm.check_extension_raw(c as libc::c_ulong);
        let mut notes = Vec::new();
        let tsc_offset_attr = match sys::has_tsc_offset_attr(vcpu) {
            Ok(b) => b,
            Err(e) => {
                notes.push(e.to_string());
                false
            }
        };
        let vcpu_tsc_khz = sys::vcpu_get_tsc_khz(vcpu)
            .map_err(|e| notes.push(e.to_string()))
            .ok();
        let vm_tsc_control = cap(KVM_CAP_VM_TSC_CONTROL) > 0;
        let vm_tsc_khz = if vm_tsc_control {
            sys::vm_get_tsc_khz(vm)
                .map_err(|e| notes.push(e.to_string()))
                .ok()
        } else {
            None
        };
        KvmProbe {
            adjust_clock_flags: u32::try_from(cap(KVM_CAP_ADJUST_CLOCK)).unwrap_or(0),
            vcpu_attributes: cap(KVM_CAP_VCPU_ATTRIBUTES) > 0,
            tsc_offset_attr,
            tsc_offset_effective: None,
            tsc_offset_test: None,
            tsc_control: cap(KVM_CAP_TSC_CONTROL) > 0,
            vm_tsc_control,
            get_tsc_khz_cap: cap(KVM_CAP_GET_TSC_KHZ) > 0,
            vcpu_tsc_khz,
            vm_tsc_khz,
            kvmclock_ctrl: cap(KVM_CAP_KVMCLOCK_CTRL) > 0,
            clock_guest: false,
            clock_guest_errno: None,
            clock_guest_try_flags: 0,
            scratch_vm: false,
            notes,
        }
    }

    /// Read the offset, write it + 1e9, read back, compare, restore.
    fn offset_write_test(&mut self, vcpu: &VcpuFd) {
        if !self.tsc_offset_attr {
            return;
        }
        let result = (|| -> Result<OffsetWriteTest, KvmError> {
            let before_cycles = sys::get_tsc_offset(vcpu)?;
            let wrote_cycles = before_cycles.wrapping_add(OFFSET_TEST_STEP_CYCLES);
            sys::set_tsc_offset(vcpu, wrote_cycles)?;
            let read_back_cycles = sys::get_tsc_offset(vcpu)?;
            let restored = sys::set_tsc_offset(vcpu, before_cycles).is_ok();
            Ok(OffsetWriteTest {
                before_cycles,
                wrote_cycles,
                read_back_cycles,
                restored,
            })
        })();
        match result {
            Ok(t) => {
                self.tsc_offset_effective = Some(t.read_back_cycles == t.wrote_cycles);
                if t.read_back_cycles != t.wrote_cycles {
                    self.notes.push(format!(
                        "TSC offset writes are inert: wrote {}, read back {}",
                        t.wrote_cycles, t.read_back_cycles
                    ));
                }
                self.tsc_offset_test = Some(t);
            }
            Err(e) => self.notes.push(format!("TSC offset write test: {e}")),
        }
    }

    fn try_clock_guest(&mut self, vm: &VmFd, vcpu: &VcpuFd) {
        self.clock_guest_try_flags = sys::get_clock(vm).map(|s| s.flags).unwrap_or(0);
        match sys::get_clock_guest(vcpu) {
            Ok(_) => {
                self.clock_guest = true;
                self.clock_guest_errno = None;
            }
            Err(e) => {
                self.clock_guest = false;
                self.clock_guest_errno = e.errno();
                let absent = matches!(e.errno(), Some(libc::EINVAL) | Some(libc::ENOTTY));
                if !absent {
                    self.notes.push(format!("CLOCK_GUEST probe: {e}"));
                } else if self.clock_guest_try_flags & KVM_CLOCK_TSC_STABLE == 0 {
                    self.notes.push(
                        "CLOCK_GUEST tried outside master-clock mode: EINVAL is ambiguous"
                            .to_string(),
                    );
                }
            }
        }
    }
}

/// [`KvmProbe::run`] as the model's [`Capabilities`].
pub fn probe(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Capabilities {
    KvmProbe::run(kvm, vm, vcpu).capabilities()
}
