//! What today's VMMs do to the guest clocks, reproduced on our fds.
//!
//! Each baseline is a handful of calls at four moments: pause, resume,
//! snapshot (which kvm-clock value is saved) and restore/receive (TSC and
//! kvm-clock put back). Facts: ../shared/reference/cloud-hypervisor-v53.md
//! and kvm-clock-facts.md.
//!
//! | baseline | pause | resume | snapshot clock | restore |
//! |---|---|---|---|---|
//! | ch-v53 | KVMCLOCK_CTRL, save GET_CLOCK (realtime filled) | SET_CLOCK(saved) with REALTIME | the pause value | MSR_IA32_TSC from the state, vCPU 0's offset copied to all |
//! | qemu | save GET_CLOCK | SET_CLOCK(saved, flags 0), KVMCLOCK_CTRL | the pause value | MSR_IA32_TSC from the state |
//! | firecracker | KVMCLOCK_CTRL | nothing | GET_CLOCK at snapshot | MSR_IA32_TSC, SET_CLOCK(saved, flags 0) |
//!
//! The MSR_IA32_TSC writes live here, in the reference VMM only: they
//! reproduce stock behaviour. The clockcarry library never writes it.

use std::fmt;
use std::str::FromStr;

use clockcarry::kvm::sys;
use clockcarry::model::{KvmClockSample, KVM_CLOCK_REALTIME};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::stamp;

/// The stock VMM whose clock handling is reproduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Baseline {
    #[default]
    #[serde(rename = "ch-v53")]
    ChV53,
    #[serde(rename = "qemu")]
    Qemu,
    #[serde(rename = "firecracker")]
    Firecracker,
}

impl Baseline {
    pub const ALL: [Baseline; 3] = [Baseline::ChV53, Baseline::Qemu, Baseline::Firecracker];

    pub fn name(&self) -> &'static str {
        match self {
            Baseline::ChV53 => "ch-v53",
            Baseline::Qemu => "qemu",
            Baseline::Firecracker => "firecracker",
        }
    }
}

impl fmt::Display for Baseline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Baseline {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Baseline::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown baseline {s:?} (ch-v53, qemu, firecracker)"))
    }
}

/// A clock operation that failed (names the ioctl).
pub type ClockError = clockcarry::kvm::KvmError;

/// KVMCLOCK_CTRL on every vCPU; EINVAL (no kvm-clock page yet) is ignored,
/// as Cloud Hypervisor and QEMU do.
pub fn notify_paused(vcpus: &[&VcpuFd]) -> Result<(), ClockError> {
    for (i, v) in vcpus.iter().enumerate() {
        match sys::kvmclock_ctrl(v) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e.on_vcpu(i)),
        }
    }
    Ok(())
}

/// KVM_GET_CLOCK with `realtime` filled from the host wall clock when KVM
/// did not (Cloud Hypervisor's `with_realtime_filled`).
pub fn clock_with_realtime(vm: &VmFd) -> Result<KvmClockSample, ClockError> {
    let mut c = sys::get_clock(vm)?;
    if c.flags & KVM_CLOCK_REALTIME == 0 {
        c.realtime_ns = stamp::realtime_ns();
        c.flags |= KVM_CLOCK_REALTIME;
    }
    Ok(c)
}

impl Baseline {
    /// At pause (vCPUs parked): the clock to keep for resume and snapshot.
    pub fn on_pause(
        &self,
        vm: &VmFd,
        vcpus: &[&VcpuFd],
    ) -> Result<Option<KvmClockSample>, ClockError> {
        match self {
            Baseline::ChV53 => {
                notify_paused(vcpus)?;
                clock_with_realtime(vm).map(Some)
            }
            Baseline::Qemu => sys::get_clock(vm).map(Some),
            Baseline::Firecracker => {
                notify_paused(vcpus)?;
                Ok(None)
            }
        }
    }

    /// At resume (vCPUs still parked), with the clock kept at pause or
    /// restore.
    pub fn on_resume(
        &self,
        vm: &VmFd,
        vcpus: &[&VcpuFd],
        saved: Option<&KvmClockSample>,
    ) -> Result<(), ClockError> {
        match (self, saved) {
            (Baseline::ChV53, Some(c)) => sys::set_clock(vm, c.clock_ns, c.realtime_ns, c.flags),
            (Baseline::Qemu, Some(c)) => {
                sys::set_clock(vm, c.clock_ns, 0, 0)?;
                notify_paused(vcpus)
            }
            _ => Ok(()),
        }
    }

    /// The kvm-clock value a snapshot or migration carries.
    pub fn snapshot_clock(
        &self,
        vm: &VmFd,
        saved: Option<&KvmClockSample>,
    ) -> Result<Option<KvmClockSample>, ClockError> {
        match self {
            Baseline::ChV53 | Baseline::Qemu => match saved {
                Some(c) => Ok(Some(*c)),
                None => clock_with_realtime(vm).map(Some),
            },
            Baseline::Firecracker => sys::get_clock(vm).map(Some),
        }
    }

    /// After the vCPU states (MSR_IA32_TSC included) were written on
    /// restore or receive. Returns notes on what was tolerated.
    pub fn on_restore(
        &self,
        vm: &VmFd,
        vcpus: &[&VcpuFd],
        saved: Option<&KvmClockSample>,
    ) -> Result<Vec<String>, ClockError> {
        let mut notes = Vec::new();
        match self {
            Baseline::ChV53 => {
                // PR #8437: copy vCPU 0's TSC offset to all so the master
                // clock engages (a warning on failure, as upstream).
                if let Some(first) = vcpus.first() {
                    match sys::get_tsc_offset(first) {
                        Ok(offset) => {
                            for (i, v) in vcpus.iter().enumerate().skip(1) {
                                if let Err(e) = sys::set_tsc_offset(v, offset) {
                                    notes.push(format!("vCPU {i}: {e}"));
                                }
                            }
                        }
                        Err(e) => notes.push(format!("TSC offset of vCPU 0: {e}")),
                    }
                }
            }
            Baseline::Qemu => {}
            Baseline::Firecracker => {
                if let Some(c) = saved {
                    sys::set_clock(vm, c.clock_ns, 0, 0)?;
                }
            }
        }
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Baseline::ALL {
            assert_eq!(b.name().parse::<Baseline>(), Ok(b));
            assert_eq!(
                serde_json::to_string(&b).expect("json"),
                format!("\"{}\"", b.name())
            );
        }
        assert!("vmware".parse::<Baseline>().is_err());
    }
}
