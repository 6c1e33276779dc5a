//! One VM: guest RAM, vCPUs running the probe, its state machine (Running /
//! Paused) and the stock clock behaviour of its baseline at pause, resume,
//! snapshot and restore.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clockcarry::model::KvmClockSample;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;

use crate::baseline::{Baseline, ClockError};
use crate::cpu::{self, CpuError};
use crate::elf::PvhImage;
use crate::memory::{GuestRam, MemoryError};
use crate::probelog::ProbeLog;
use crate::runner::{IoContext, Runner};
use crate::stamp;
use crate::state::{VmConfig, VmSnapshot, FORMAT, VERSION};

/// How the VMM treats clocks and where the probe's output goes.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub baseline: Baseline,
    /// The vm.clock extension's in-place pause/resume: no clock touched.
    pub clock_extension: bool,
    /// Label on every probe report.
    pub name: String,
    pub log: Option<Arc<ProbeLog>>,
    /// COM1 output file (truncated when the VM is created, as CH does).
    pub serial: Option<PathBuf>,
    /// Make the probe report as text on COM1 (as under other VMMs).
    pub text_mode: bool,
    pub report_interval: Duration,
    /// Test knob: an outgoing migration waits this long between pausing the
    /// source and sending its state (a slow link; the demo's blackout).
    pub migration_delay: Duration,
    /// At boot, set every vCPU's TSC to this many seconds of its rate before
    /// it first runs (one offset for all): a VM that has been up a while.
    /// 0 leaves KVM's fresh TSC (near 0).
    pub boot_tsc_s: u64,
    /// Test knob: make `PUT vm.clock` fail part way (and, if asked, its
    /// rollback too), to test the typed failure replies.
    pub fault_put: Option<crate::clockapi::FaultPut>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            baseline: Baseline::ChV53,
            clock_extension: false,
            name: "vm".into(),
            log: None,
            serial: None,
            text_mode: false,
            report_interval: Duration::from_micros(500),
            migration_delay: Duration::ZERO,
            boot_tsc_s: 0,
            fault_put: None,
        }
    }
}

/// Cloud Hypervisor's VM states (those this VMM reaches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    Running,
    Paused,
}

/// Why a VM operation failed (messages in Cloud Hypervisor's words).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM state transition: {0:?} to {1:?}")]
    InvalidStateTransition(VmState, VmState),
    #[error("VM is not paused")]
    NotPaused,
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Cpu(#[from] CpuError),
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    #[error("guest clock: {0}")]
    Clock(#[from] ClockError),
    #[error("image: {0}")]
    Image(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("saved state: {0}")]
    State(String),
}

fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Where a restored VM's memory comes from.
pub enum MemorySource<'a> {
    /// Copy from a file or stream of exactly the RAM size.
    Copy(&'a mut dyn Read),
    /// Map this memfd (local migration).
    Fd(OwnedFd),
}

/// What a restore does with the baseline's restore-time clock handling
/// (for ch-v53: vCPU 0's TSC offset copied to every vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreClock {
    /// Run it as the stock VMM does.
    Baseline,
    /// An armed clock comes with the request and replaces it: it is left
    /// for [`Vm::finish_deferred_restore_clock`], which runs it only when
    /// the armed clock is refused or fails (the VM is then exactly as a
    /// stock restore leaves it).
    Deferred,
}

/// A VM and its vCPU threads. Fields drop in order: threads first, then
/// the VM fd, then the memory.
pub struct Vm {
    runner: Runner,
    vm_fd: VmFd,
    io: Arc<IoContext>,
    ram: Arc<GuestRam>,
    config: VmConfig,
    baseline: Baseline,
    clock_extension: bool,
    msrs: Vec<u32>,
    state: VmState,
    /// The clock the baseline applies on resume (saved at pause or restore).
    saved_clock: Option<KvmClockSample>,
    /// Restored or received, and the vCPUs have not run since.
    restore_pending: bool,
    /// A vm.clock PUT since the restore: resume applies no clock.
    clock_put: bool,
    /// Each vCPU's guest TSC as the restored state held it (an armed
    /// clock's identity and floor check); empty for a booted VM.
    restored_tsc: Vec<Option<u64>>,
    /// vCPU 0's TSC rate as the restore set it (the saved state's), kHz;
    /// `None` for a booted VM or a state that carried no rate.
    restored_tsc_khz: Option<u32>,
    /// Host CLOCK_TAI at the last pause and at the last resume (just before
    /// the vCPUs were released), ns: the blackout as the VMM sees it.
    paused_tai_ns: Option<u64>,
    resumed_tai_ns: Option<u64>,
    /// How long the last armed clock took inside the blackout (checks and
    /// apply, from the state loaded to the clock in place), ns.
    armed_clock_ns: Option<u64>,
    /// The baseline's restore-time clock handling was deferred
    /// ([`RestoreClock::Deferred`]) and has not run.
    restore_clock_deferred: bool,
    /// How long the baseline's clock handling took inside the last
    /// blackout, at restore and at resume, ns (0 when it made no call).
    restore_clock_ns: Option<u64>,
    resume_clock_ns: Option<u64>,
    notes: Vec<String>,
}

fn open_serial(path: &Option<PathBuf>) -> Result<Option<Mutex<File>>, VmError> {
    path.as_ref()
        .map(|p| {
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)
                .map(Mutex::new)
                .map_err(|source| VmError::Io {
                    what: format!("serial file {}", p.display()),
                    source,
                })
        })
        .transpose()
}

struct Parts {
    vm_fd: VmFd,
    fds: Vec<VcpuFd>,
    msrs: Vec<u32>,
}

fn create(kvm: &Kvm, ram: &GuestRam, vcpus: u32) -> Result<Parts, VmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region is a live mapping that outlives the VM fd (the Vm
    // drops its threads and VM fd before its memory).
    unsafe { vm_fd.set_user_memory_region(region) }
        .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    let mut fds = Vec::new();
    for i in 0..vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(i))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        cpu::set_cpuid(kvm, &fd, i)?;
        fds.push(fd);
    }
    Ok(Parts {
        vm_fd,
        fds,
        msrs: cpu::supported_msrs(kvm),
    })
}

/// Sets every vCPU (back to back, one offset) so its TSC reads `seconds`
/// of its rate now (`--boot-tsc-s`). Without it a fresh VM's TSC starts near
/// 0, and KVM (6.1 at least) treats a host-initiated MSR_IA32_TSC write
/// that lands within 1 s of the TSC it expects as a "synchronisation" and
/// ignores its value: a stock restore of a VM snapshotted less than a
/// second after boot would show that heuristic instead of the TSC freeze
/// every VM that has been up longer gets. Where offsets are inert (kvm_pvm)
/// the writes change nothing.
fn age_tsc(fds: &[VcpuFd], seconds: u64) -> Result<(), VmError> {
    let Some(first) = fds.first() else {
        return Ok(());
    };
    let khz = clockcarry::kvm::sys::vcpu_get_tsc_khz(first)?;
    let target = clockcarry::pvclock::ns_to_cycles(seconds.saturating_mul(1_000_000_000), khz);
    let offset = target.wrapping_sub(clockcarry::host::read_host_tsc()) as i64;
    for (i, fd) in fds.iter().enumerate() {
        clockcarry::kvm::sys::set_tsc_offset(fd, offset).map_err(|e| e.on_vcpu(i))?;
    }
    Ok(())
}

impl Vm {
    fn assemble(
        parts: Parts,
        ram: Arc<GuestRam>,
        config: VmConfig,
        opts: &VmOptions,
        state: VmState,
    ) -> Result<Vm, VmError> {
        let io = Arc::new(IoContext {
            ram: ram.clone(),
            name: opts.name.clone(),
            log: opts.log.clone(),
            serial: open_serial(&opts.serial)?,
            text_mode: opts.text_mode,
            report_interval: opts.report_interval,
            reports: AtomicU64::new(0),
            last_debug_byte: AtomicU64::new(0),
        });
        let runner = Runner::start(parts.fds, io.clone()).map_err(|source| VmError::Io {
            what: "spawning vCPU threads".into(),
            source,
        })?;
        Ok(Vm {
            runner,
            vm_fd: parts.vm_fd,
            io,
            ram,
            config,
            baseline: opts.baseline,
            clock_extension: opts.clock_extension,
            msrs: parts.msrs,
            state,
            saved_clock: None,
            restore_pending: false,
            clock_put: false,
            restored_tsc: Vec::new(),
            restored_tsc_khz: None,
            paused_tai_ns: None,
            resumed_tai_ns: None,
            armed_clock_ns: None,
            restore_clock_deferred: false,
            restore_clock_ns: None,
            resume_clock_ns: None,
            notes: Vec::new(),
        })
    }

    /// Creates a VM, loads `image`, and starts it (Running).
    pub fn boot(
        kvm: &Kvm,
        config: VmConfig,
        image: &PvhImage,
        opts: &VmOptions,
    ) -> Result<Vm, VmError> {
        let ram = Arc::new(GuestRam::new(config.memory_bytes)?);
        if image.end() > ram.size() {
            return Err(VmError::Image(format!(
                "the image ends at {:#x}, beyond the {} bytes of RAM",
                image.end(),
                ram.size()
            )));
        }
        for seg in &image.segments {
            ram.write(seg.paddr, &seg.data)?;
        }
        ram.write(cpu::START_INFO_GPA, &cpu::start_info_bytes())?;
        let parts = create(kvm, &ram, config.vcpus)?;
        for (i, fd) in parts.fds.iter().enumerate() {
            cpu::set_boot_registers(fd, u32::try_from(i).unwrap_or(0), image.entry)?;
        }
        if opts.boot_tsc_s > 0 {
            age_tsc(&parts.fds, opts.boot_tsc_s)?;
        }
        let vm = Vm::assemble(parts, ram, config, opts, VmState::Running)?;
        vm.runner.unpark();
        Ok(vm)
    }

    /// Rebuilds a VM from saved state, the way the stock VMM does (TSC from
    /// the saved MSR value, the baseline's clock handling unless `clock`
    /// defers it). It stays Paused.
    pub fn restore(
        kvm: &Kvm,
        snap: &VmSnapshot,
        memory: MemorySource<'_>,
        opts: &VmOptions,
        clock: RestoreClock,
    ) -> Result<Vm, VmError> {
        snap.validate().map_err(VmError::State)?;
        let ram = match memory {
            MemorySource::Copy(input) => {
                let ram = GuestRam::new(snap.config.memory_bytes)?;
                ram.load_from(input).map_err(|source| VmError::Io {
                    what: "reading guest memory".into(),
                    source,
                })?;
                ram
            }
            MemorySource::Fd(fd) => GuestRam::from_fd(fd, snap.config.memory_bytes)?,
        };
        let ram = Arc::new(ram);
        let parts = create(kvm, &ram, snap.config.vcpus)?;
        for (fd, state) in parts.fds.iter().zip(&snap.vcpus) {
            cpu::restore(fd, state)?;
        }
        let mut vm = Vm::assemble(parts, ram, snap.config.clone(), opts, VmState::Paused)?;
        vm.saved_clock = snap.clock;
        vm.restore_pending = true;
        vm.restored_tsc = snap.vcpus.iter().map(cpu::VcpuState::tsc).collect();
        vm.restored_tsc_khz = snap.vcpus.first().map(|v| v.tsc_khz).filter(|k| *k != 0);
        vm.restore_clock_deferred = true;
        if clock == RestoreClock::Baseline {
            vm.finish_deferred_restore_clock()?;
        }
        Ok(vm)
    }

    /// Runs the baseline's restore-time clock handling if it was deferred
    /// and has not run (a no-op otherwise); timed in `restore_clock_ns`.
    pub fn finish_deferred_restore_clock(&mut self) -> Result<(), VmError> {
        if !self.restore_clock_deferred {
            return Ok(());
        }
        self.restore_clock_deferred = false;
        let (baseline, saved) = (self.baseline, self.saved_clock);
        let t = std::time::Instant::now();
        let notes = self.with_vcpus(|vm, vcpus| baseline.on_restore(vm, vcpus, saved.as_ref()))?;
        self.restore_clock_ns = Some(stamp::elapsed_ns(t));
        self.notes.extend(notes);
        Ok(())
    }

    /// The armed clock replaced the deferred restore-time handling.
    pub fn drop_deferred_restore_clock(&mut self) {
        self.restore_clock_deferred = false;
        self.restore_clock_ns = Some(0);
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Restored or received and not run since (a vm.clock PUT is allowed).
    pub fn restore_pending(&self) -> bool {
        self.restore_pending
    }

    /// Each vCPU's guest TSC in the restored state (empty when booted).
    pub fn restored_tsc(&self) -> &[Option<u64>] {
        &self.restored_tsc
    }

    /// vCPU 0's TSC rate as the restore set it (`cpu::restore` makes every
    /// vCPU run at its saved rate), kHz.
    pub fn restored_tsc_khz(&self) -> Option<u32> {
        self.restored_tsc_khz
    }

    /// A vm.clock PUT was applied: resume must not apply a clock.
    pub fn mark_clock_put(&mut self) {
        self.clock_put = true;
    }

    /// Runs `f` on the VM and its vCPU fds with the vCPUs parked: briefly
    /// when Running (no clock is touched), as they are when Paused.
    pub fn with_vcpus<R>(&self, f: impl FnOnce(&VmFd, &[&VcpuFd]) -> R) -> R {
        let was_running = !self.runner.is_parked();
        if was_running {
            self.runner.park();
        }
        let result = {
            let guards = self.runner.lock_all();
            let refs: Vec<&VcpuFd> = guards.iter().map(|g| &**g).collect();
            f(&self.vm_fd, &refs)
        };
        if was_running {
            self.runner.unpark();
        }
        result
    }

    /// vm.pause: park the vCPUs, then the baseline's pause.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::InvalidStateTransition(self.state, VmState::Paused));
        }
        self.runner.park();
        let baseline = self.baseline;
        let saved = self.with_vcpus(|vm, vcpus| baseline.on_pause(vm, vcpus));
        match saved {
            Ok(saved) => {
                self.saved_clock = saved;
                self.state = VmState::Paused;
                self.paused_tai_ns = Some(stamp::tai_ns());
                Ok(())
            }
            Err(e) => {
                self.runner.unpark();
                Err(e.into())
            }
        }
    }

    /// vm.resume: the baseline's clock (unless a PUT replaced it, or the
    /// extension's in-place resume applies), then the vCPUs run.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::InvalidStateTransition(
                self.state,
                VmState::Running,
            ));
        }
        let in_place = !self.restore_pending;
        let skip = self.clock_put || (in_place && self.clock_extension);
        // A deferred restore-time clock that nothing replaced runs now.
        self.finish_deferred_restore_clock()?;
        let t = std::time::Instant::now();
        if !skip {
            let (baseline, saved) = (self.baseline, self.saved_clock);
            self.with_vcpus(|vm, vcpus| baseline.on_resume(vm, vcpus, saved.as_ref()))?;
        }
        self.resume_clock_ns = Some(stamp::elapsed_ns(t));
        self.restore_pending = false;
        self.clock_put = false;
        self.state = VmState::Running;
        self.resumed_tai_ns = Some(stamp::tai_ns());
        self.runner.unpark();
        Ok(())
    }

    /// The saved state (vCPUs parked for the read), without memory.
    pub fn snapshot_state(&self) -> Result<VmSnapshot, VmError> {
        let (baseline, saved, msrs) = (self.baseline, self.saved_clock, &self.msrs);
        let (vcpus, clock) = self.with_vcpus(|vm, fds| -> Result<_, VmError> {
            let mut states = Vec::new();
            for (i, fd) in fds.iter().enumerate() {
                states.push(cpu::save(fd, u32::try_from(i).unwrap_or(0), msrs)?);
            }
            let clock = baseline.snapshot_clock(vm, saved.as_ref())?;
            Ok((states, clock))
        })?;
        Ok(VmSnapshot {
            format: FORMAT.into(),
            version: VERSION,
            config: self.config.clone(),
            vcpus,
            clock,
            taken_tai_ns: stamp::tai_ns(),
            paused: self.state == VmState::Paused,
        })
    }

    /// Records the time the last armed clock took (vm.info shows it).
    pub fn set_armed_clock_ns(&mut self, ns: u64) {
        self.armed_clock_ns = Some(ns);
    }

    /// Probe reports received so far.
    pub fn reports(&self) -> u64 {
        self.io.reports.load(Ordering::Relaxed)
    }

    /// What the vm.info extension block shows.
    pub fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "config": {
                "cpus": { "boot_vcpus": self.config.vcpus, "max_vcpus": self.config.vcpus },
                "memory": { "size": self.config.memory_bytes },
                "payload": { "kernel": self.config.kernel },
            },
            "state": self.state,
            "memory_actual_size": self.config.memory_bytes,
            "device_tree": null,
            "clockcarry": {
                "baseline": self.baseline,
                "clock_extension": self.clock_extension,
                "restore_pending": self.restore_pending,
                "clock_put": self.clock_put,
                "paused_tai_ns": self.paused_tai_ns,
                "resumed_tai_ns": self.resumed_tai_ns,
                "armed_clock_ns": self.armed_clock_ns,
                "restore_clock_ns": self.restore_clock_ns,
                "resume_clock_ns": self.resume_clock_ns,
                "probe_reports": self.reports(),
                "last_debug_port_byte": self.io.last_debug_byte.load(Ordering::Relaxed),
                "vcpu_errors": self.runner.errors(),
                "notes": self.notes,
            }
        })
    }
}
