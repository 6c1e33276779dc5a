//! A simulation of hosts and of KVM's clock arithmetic, for proving the
//! planner without hardware (test support: not part of the library). A
//! simulated VM implements the KVM layer's `ClockOps`, so a plan is applied
//! by the library's own apply, not by a re-implementation of it.
//!
//! True time `t_ns` is the simulation's own (ns since the simulated boot of
//! the world). A host has a TSC base and rate, and a CLOCK_TAI that may be
//! off from true time by `tai_error_ns`. A VM on a host has per-vCPU offsets,
//! optional TSC scaling and a PVTI, evolved the way KVM evolves them:
//! KVM_SET_CLOCK re-derives the PVTI at "now", KVM_SET_CLOCK_GUEST installs
//! one exactly, an MSR_IA32_TSC write becomes an offset at the instant of the
//! write (the stock VMMs' path, modelled only to compare against).

use clockcarry::kvm::{apply_with, ApplyOptions, ClockOps, KvmError};
use clockcarry::model::{
    Capabilities, ClockQuality, HostIdentity, HostSample, KvmClockSample, Pvti, PvtiSource,
    RunState, TscFlags, TscScaling, VcpuOffset, VmClock, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME,
    KVM_CLOCK_TSC_STABLE, PVCLOCK_TSC_STABLE_BIT,
};
use clockcarry::plan::Plan;
use clockcarry::pvclock::{
    guest_tsc, ns_to_cycles, offset_for, pvclock_read, scale_tsc, time_scale_for_khz,
};

/// TAI at the simulation's true time 0 (an instant in 2026), ns.
pub const TAI_EPOCH_NS: u64 = 1_795_749_100_000_000_000;
/// TAI - UTC used by simulated hosts, s.
pub const TAI_OFFSET_S: i32 = 37;

/// A simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimHost {
    pub identity: HostIdentity,
    /// Host TSC at true time 0.
    pub tsc_base: u64,
    /// This host's CLOCK_TAI minus true time, ns.
    pub tai_error_ns: i64,
    /// Half-width of this host's (TSC, TAI) brackets, ns.
    pub bracket_ns: u64,
    pub quality: ClockQuality,
    /// Fraction bits of hardware TSC scaling, when the host can scale.
    pub scaling_frac_bits: Option<u8>,
    /// Whether this host's KVM has KVM_{GET,SET}_CLOCK_GUEST.
    pub clock_guest: bool,
}

impl SimHost {
    /// A synchronised host with a stable TSC.
    pub fn new(name: &str, boot_id: &str, tsc_khz: u32, tsc_base: u64) -> SimHost {
        SimHost {
            identity: HostIdentity {
                hostname: name.to_string(),
                boot_id: boot_id.to_string(),
                kernel_release: "6.12.0-sim".to_string(),
                tsc_khz,
                tsc_flags: TscFlags {
                    constant_tsc: true,
                    nonstop_tsc: true,
                    tsc_known_freq: true,
                },
                clocksource: "tsc".to_string(),
            },
            tsc_base,
            tai_error_ns: 0,
            bracket_ns: 0,
            quality: ClockQuality {
                synchronised: true,
                maxerror_ns: 0,
                esterror_ns: 0,
                leap_pending: clockcarry::model::LeapPending::None,
            },
            scaling_frac_bits: None,
            clock_guest: false,
        }
    }

    /// The host TSC at true time `t_ns`.
    pub fn host_tsc(&self, t_ns: u64) -> u64 {
        self.tsc_base
            .wrapping_add(ns_to_cycles(t_ns, self.identity.tsc_khz))
    }

    /// What this host's CLOCK_TAI reads at true time `t_ns`.
    pub fn tai_ns(&self, t_ns: u64) -> u64 {
        let tai = i128::from(TAI_EPOCH_NS) + i128::from(t_ns) + i128::from(self.tai_error_ns);
        u64::try_from(tai.max(0)).unwrap_or(u64::MAX)
    }

    /// What this host's CLOCK_REALTIME reads at true time `t_ns`.
    pub fn realtime_ns(&self, t_ns: u64) -> u64 {
        self.tai_ns(t_ns)
            .saturating_sub(u64::from(TAI_OFFSET_S.unsigned_abs()) * 1_000_000_000)
    }

    /// A (TSC, TAI) sample at `t_ns` whose TAI is off by `bracket_error_ns`
    /// (clamped to this host's ±bracket_ns) beyond the host's own TAI error.
    pub fn sample(&self, t_ns: u64, bracket_error_ns: i64) -> HostSample {
        let limit = i64::try_from(self.bracket_ns).unwrap_or(i64::MAX);
        let err = bracket_error_ns.clamp(-limit, limit);
        let tai = i128::from(self.tai_ns(t_ns)) + i128::from(err);
        let tai_ns = u64::try_from(tai.max(0)).unwrap_or(u64::MAX);
        HostSample {
            host_tsc: self.host_tsc(t_ns),
            tai_ns,
            realtime_ns: tai_ns
                .saturating_sub(u64::from(TAI_OFFSET_S.unsigned_abs()) * 1_000_000_000),
            tai_offset_s: TAI_OFFSET_S,
            uncertainty_ns: self.bracket_ns,
            quality: self.quality.clone(),
        }
    }

    /// The capabilities a VM on this host reports.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            tsc_offset_effective: true,
            clock_guest: self.clock_guest,
            tsc_scaling: self.scaling_frac_bits.is_some(),
            adjust_clock: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
        }
    }
}

/// Why a simulated KVM call failed, as the kernel would refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The library's apply refused or failed on the simulated VM.
    #[error("apply: {0}")]
    Apply(String),
}

/// A simulated VM on a simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimVm {
    pub host: SimHost,
    pub tsc_khz: u32,
    pub scaling: Option<TscScaling>,
    pub offsets: Vec<i64>,
    /// vCPU 0's PVTI; vCPU i's is the same line shifted by its offset.
    pub pvti: Pvti,
}

impl SimVm {
    /// A VM created at `t_ns` whose vCPUs' TSCs read `initial_tsc[i]` then,
    /// with kvm-clock starting at 0 (as KVM creates it).
    pub fn create(host: &SimHost, t_ns: u64, guest_khz: u32, initial_tsc: &[u64]) -> Option<SimVm> {
        let scaling = if guest_khz == host.identity.tsc_khz {
            None
        } else {
            let frac_bits = host.scaling_frac_bits?;
            clockcarry::pvclock::scaling_ratio(guest_khz, host.identity.tsc_khz, frac_bits)
        };
        let host_tsc = host.host_tsc(t_ns);
        let offsets: Vec<i64> = initial_tsc
            .iter()
            .map(|g| offset_for(*g, host_tsc, scaling))
            .collect();
        let mut vm = SimVm {
            host: host.clone(),
            tsc_khz: guest_khz,
            scaling,
            offsets,
            pvti: Pvti {
                tsc_timestamp: 0,
                system_time: 0,
                tsc_to_system_mul: 0,
                tsc_shift: 0,
                flags: 0,
            },
        };
        vm.rederive_pvti(t_ns, 0);
        Some(vm)
    }

    /// The rate KVM derives the PVTI scale from: the (scaled) host rate.
    fn pvti_khz(&self) -> u32 {
        match self.scaling {
            None => self.host.identity.tsc_khz,
            Some(s) => u32::try_from(scale_tsc(u64::from(self.host.identity.tsc_khz), Some(s)))
                .unwrap_or(u32::MAX),
        }
    }

    /// KVM's master-clock update: the line re-anchored at `t_ns` so that
    /// kvm-clock reads `clock_ns` there.
    pub fn rederive_pvti(&mut self, t_ns: u64, clock_ns: u64) {
        let (tsc_shift, tsc_to_system_mul) = time_scale_for_khz(self.pvti_khz()).unwrap_or((0, 0));
        self.pvti = Pvti {
            tsc_timestamp: self.guest_tsc(0, t_ns),
            system_time: clock_ns,
            tsc_to_system_mul,
            tsc_shift,
            flags: PVCLOCK_TSC_STABLE_BIT,
        };
    }

    /// vCPU `vcpu`'s guest TSC at true time `t_ns`.
    pub fn guest_tsc(&self, vcpu: usize, t_ns: u64) -> u64 {
        let offset = self.offsets.get(vcpu).copied().unwrap_or(0);
        guest_tsc(self.host.host_tsc(t_ns), self.scaling, offset)
    }

    /// vCPU `vcpu`'s PVTI (the VM line shifted by its offset difference).
    pub fn vcpu_pvti(&self, vcpu: usize) -> Pvti {
        let first = self.offsets.first().copied().unwrap_or(0);
        let mine = self.offsets.get(vcpu).copied().unwrap_or(first);
        let mut pvti = self.pvti;
        pvti.tsc_timestamp = pvti
            .tsc_timestamp
            .wrapping_add((mine as u64).wrapping_sub(first as u64));
        pvti
    }

    /// kvm-clock as the guest computes it on `vcpu` at true time `t_ns`.
    pub fn kvmclock_ns(&self, vcpu: usize, t_ns: u64) -> u64 {
        pvclock_read(&self.vcpu_pvti(vcpu), self.guest_tsc(vcpu, t_ns))
    }

    /// KVM_GET_CLOCK at `t_ns` (master-clock mode: all flags, one TSC read).
    pub fn get_clock(&self, t_ns: u64) -> KvmClockSample {
        KvmClockSample {
            clock_ns: self.kvmclock_ns(0, t_ns),
            flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
            realtime_ns: self.host.realtime_ns(t_ns),
            host_tsc: self.host.host_tsc(t_ns),
        }
    }

    /// What `GET vm.clock` returns at `t_ns`. The PVTI comes from the kernel
    /// only when the host has CLOCK_GUEST; otherwise it is left to be derived.
    pub fn vm_clock(&self, t_ns: u64, state: RunState) -> VmClock {
        VmClock {
            state,
            tsc_khz: self.tsc_khz,
            vcpus: self
                .offsets
                .iter()
                .enumerate()
                .map(|(id, off)| VcpuOffset {
                    id: u32::try_from(id).unwrap_or(u32::MAX),
                    tsc_offset: *off,
                })
                .collect(),
            kvmclock: self.get_clock(t_ns),
            pvti: self.host.clock_guest.then_some(self.pvti),
            pvti_source: self
                .host
                .clock_guest
                .then_some(PvtiSource::KernelClockGuest),
            tsc_scaling: self.scaling,
            capabilities: self.host.capabilities(),
        }
    }

    /// The stock restore path: a new VM on `host` whose vCPUs get the saved
    /// TSC values through host-initiated MSR_IA32_TSC writes at `t_ns` (the
    /// TSC freezes over the blackout), and kvm-clock set to `clock_ns`.
    pub fn stock_restore(
        host: &SimHost,
        t_ns: u64,
        guest_khz: u32,
        saved_tsc: &[u64],
        clock_ns: u64,
    ) -> Option<SimVm> {
        let mut vm = SimVm::create(host, t_ns, guest_khz, saved_tsc)?;
        vm.rederive_pvti(t_ns, clock_ns);
        Some(vm)
    }

    /// Apply a plan at true time `t_ns` through the library's own apply
    /// ([`clockcarry::kvm::apply_with`]) on this VM's [`SimOps`]: the same
    /// steps, order, calibration loop and rollback as on real KVM.
    pub fn apply(&mut self, plan: &Plan, t_ns: u64) -> Result<(), SimError> {
        let options = ApplyOptions {
            tsc_scaling: self.scaling,
            clock_guest: self.host.clock_guest,
            set_clock_realtime: true,
            ..ApplyOptions::default()
        };
        apply_with(&mut SimOps { vm: self, t_ns }, plan, &options)
            .map(|_| ())
            .map_err(|e| SimError::Apply(e.to_string()))
    }
}

/// The KVM clock ioctls on a simulated VM, all at one instant `t_ns` (the
/// simulation's calls take no time).
pub struct SimOps<'a> {
    pub vm: &'a mut SimVm,
    pub t_ns: u64,
}

impl SimOps<'_> {
    fn vcpu(&self, vcpu: usize, ioctl: &'static str) -> Result<(), KvmError> {
        if vcpu < self.vm.offsets.len() {
            Ok(())
        } else {
            Err(einval(ioctl, vcpu))
        }
    }
}

fn einval(ioctl: &'static str, vcpu: usize) -> KvmError {
    KvmError::Ioctl {
        ioctl,
        vcpu: u32::try_from(vcpu).ok(),
        errno: libc::EINVAL,
    }
}

impl ClockOps for SimOps<'_> {
    fn vcpu_count(&self) -> usize {
        self.vm.offsets.len()
    }
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, KvmError> {
        self.vcpu(vcpu, "KVM_GET_TSC_KHZ")?;
        Ok(self.vm.tsc_khz)
    }
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), KvmError> {
        self.vcpu(vcpu, "KVM_SET_TSC_KHZ")?;
        if khz != self.vm.host.identity.tsc_khz && self.vm.host.scaling_frac_bits.is_none() {
            return Err(einval("KVM_SET_TSC_KHZ", vcpu));
        }
        self.vm.tsc_khz = khz;
        Ok(())
    }
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, KvmError> {
        self.vcpu(vcpu, "KVM_GET_DEVICE_ATTR")?;
        Ok(self.vm.offsets[vcpu])
    }
    fn set_tsc_offset(&mut self, vcpu: usize, offset_cycles: i64) -> Result<(), KvmError> {
        self.vcpu(vcpu, "KVM_SET_DEVICE_ATTR")?;
        self.vm.offsets[vcpu] = offset_cycles;
        Ok(())
    }
    fn get_clock(&mut self) -> Result<KvmClockSample, KvmError> {
        Ok(self.vm.get_clock(self.t_ns))
    }
    /// KVM's master-clock update at "now": the line re-anchored so kvm-clock
    /// reads `clock_ns` (plus the realtime since `realtime_ns`) there.
    fn set_clock(&mut self, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError> {
        let mut now_clock = clock_ns;
        if flags & KVM_CLOCK_REALTIME != 0 {
            let since = self
                .vm
                .host
                .realtime_ns(self.t_ns)
                .saturating_sub(realtime_ns);
            now_clock = now_clock.saturating_add(since);
        }
        self.vm.rederive_pvti(self.t_ns, now_clock);
        Ok(())
    }
    fn set_clock_guest(&mut self, vcpu: usize, pvti: &Pvti) -> Result<(), KvmError> {
        self.vcpu(vcpu, "KVM_SET_CLOCK_GUEST")?;
        if !self.vm.host.clock_guest || pvti.tsc_timestamp > self.vm.guest_tsc(0, self.t_ns) {
            return Err(einval("KVM_SET_CLOCK_GUEST", vcpu));
        }
        self.vm.pvti = *pvti;
        Ok(())
    }
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), KvmError> {
        self.vcpu(vcpu, "KVM_KVMCLOCK_CTRL")
    }
    fn host_tsc(&mut self) -> u64 {
        self.vm.host.host_tsc(self.t_ns)
    }
    fn realtime_pair(&mut self) -> Option<(u64, u64)> {
        Some((
            self.vm.host.host_tsc(self.t_ns),
            self.vm.host.realtime_ns(self.t_ns),
        ))
    }
}
