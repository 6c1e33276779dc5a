//! vCPU threads: run the guest, serve its port I/O, and park on request.
//!
//! Parking is how every VM-wide operation gets the vCPUs out of KVM_RUN:
//! the controller sets `park`, kicks each thread with a signal (KVM_RUN
//! returns EINTR) and waits until all are parked. A parked thread holds no
//! lock, so the controller can then use every vCPU fd. Parking touches no
//! clock; what a *pause* does to clocks is the VM's business ([`crate::vm`]).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::Killable;

use crate::memory::GuestRam;
use crate::probe::{GuestReport, RECORD_BYTES, REF_MAGIC, REPORT_PORT};
use crate::probelog::{LoggedReport, ProbeLog};
use crate::stamp;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// POST / debug port.
pub const DEBUG_PORT: u16 = 0x80;

/// What the vCPU threads share about the guest's devices.
#[derive(Debug)]
pub struct IoContext {
    pub ram: Arc<GuestRam>,
    /// Label stamped on every report (`--name`).
    pub name: String,
    pub log: Option<Arc<ProbeLog>>,
    pub serial: Option<Mutex<File>>,
    /// Do not answer the probe's magic: it then reports as text on COM1.
    pub text_mode: bool,
    /// Pause between reports of one vCPU (the host paces the guest).
    pub report_interval: Duration,
    pub reports: AtomicU64,
    pub last_debug_byte: AtomicU64,
}

#[derive(Debug, Default)]
struct Ctl {
    park: bool,
    exit: bool,
    parked: usize,
    /// Threads that stopped running the guest (fatal exit) or returned.
    dead: usize,
    errors: Vec<String>,
}

/// The park/unpark protocol shared by the controller and the vCPU threads.
#[derive(Debug, Default)]
pub struct RunControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

fn lock(ctl: &Mutex<Ctl>) -> MutexGuard<'_, Ctl> {
    ctl.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vCPU: its fd (locked by its thread while in KVM_RUN) and its thread.
#[derive(Debug)]
pub struct Vcpu {
    pub fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    /// Locks the fd (only without deadlock while the vCPUs are parked).
    pub fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            eprintln!("refvmm: cannot install the vCPU kick handler: {e}");
        }
    });
}

/// The vCPU threads of one VM. They start parked.
#[derive(Debug)]
pub struct Runner {
    pub vcpus: Vec<Vcpu>,
    control: Arc<RunControl>,
}

impl Runner {
    /// Spawns one parked thread per fd.
    pub fn start(fds: Vec<VcpuFd>, io: Arc<IoContext>) -> std::io::Result<Runner> {
        install_kick_handler();
        let control = Arc::new(RunControl::default());
        lock(&control.ctl).park = true;
        let mut vcpus = Vec::new();
        for (index, fd) in fds.into_iter().enumerate() {
            let fd = Arc::new(Mutex::new(fd));
            let (f, c, i) = (fd.clone(), control.clone(), io.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(index, &f, &c, &i))?;
            vcpus.push(Vcpu {
                fd,
                thread: Some(thread),
            });
        }
        let runner = Runner { vcpus, control };
        runner.wait_parked();
        Ok(runner)
    }

    fn wait_parked(&self) {
        let n = self.vcpus.len();
        let mut c = lock(&self.control.ctl);
        let mut last_kick = Instant::now() - Duration::from_secs(1);
        while c.parked + c.dead < n {
            if last_kick.elapsed() >= Duration::from_millis(1) {
                // Re-kick until parked: a signal that lands just before
                // KVM_RUN is entered is otherwise lost.
                for v in &self.vcpus {
                    if let Some(t) = &v.thread {
                        // pthread_kill on a thread of ours (not yet joined)
                        // with a signal whose handler is installed.
                        let _ = t.kill(kick_signal());
                    }
                }
                last_kick = Instant::now();
            }
            let (g, _) = self
                .control
                .cv
                .wait_timeout(c, Duration::from_micros(500))
                .unwrap_or_else(|p| p.into_inner());
            c = g;
        }
    }

    /// Parks every vCPU thread (no clock is touched).
    pub fn park(&self) {
        lock(&self.control.ctl).park = true;
        self.control.cv.notify_all();
        self.wait_parked();
    }

    /// Lets the vCPU threads run the guest.
    pub fn unpark(&self) {
        lock(&self.control.ctl).park = false;
        self.control.cv.notify_all();
    }

    pub fn is_parked(&self) -> bool {
        lock(&self.control.ctl).park
    }

    /// Fatal guest exits seen so far.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.control.ctl).errors.clone()
    }

    /// Locks every vCPU fd. Call only while parked.
    pub fn lock_all(&self) -> Vec<MutexGuard<'_, VcpuFd>> {
        self.vcpus.iter().map(Vcpu::lock).collect()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        {
            let mut c = lock(&self.control.ctl);
            c.exit = true;
            c.park = true;
        }
        self.control.cv.notify_all();
        self.wait_parked();
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
    }
}

enum Next {
    Run,
    Sleep(Duration),
    Stop(String),
}

fn vcpu_thread(index: usize, fd: &Mutex<VcpuFd>, control: &RunControl, io: &IoContext) {
    let mut nap = None;
    // The vCPU's TSC offset, read again after every park (offsets only
    // change while parked): it lets the analysis place each guest TSC read
    // on the host's timeline exactly.
    let mut offset: Option<Option<i64>> = None;
    loop {
        {
            let mut c = lock(&control.ctl);
            if let Some(d) = nap.take() {
                if !c.park && !c.exit {
                    c = control
                        .cv
                        .wait_timeout(c, d)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            if c.park && !c.exit {
                drop(c);
                complete_pending_exit(fd);
                c = lock(&control.ctl);
            }
            if c.park && !c.exit {
                c.parked += 1;
                control.cv.notify_all();
                while c.park && !c.exit {
                    c = control.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                }
                c.parked -= 1;
                offset = None;
            }
            if c.exit {
                c.dead += 1;
                control.cv.notify_all();
                return;
            }
        }
        let next = {
            let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
            let tsc_offset =
                *offset.get_or_insert_with(|| clockcarry::kvm::sys::get_tsc_offset(&vcpu).ok());
            match vcpu.run() {
                Ok(exit) => handle_exit(exit, io, tsc_offset),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Run,
                Err(e) => Next::Stop(format!("vCPU {index}: KVM_RUN: {e}")),
            }
        };
        match next {
            Next::Run => {}
            Next::Sleep(d) => nap = Some(d),
            Next::Stop(why) => {
                let mut c = lock(&control.ctl);
                c.errors.push(why);
                c.dead += 1;
                control.cv.notify_all();
                while !c.exit {
                    c = control.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                }
                return;
            }
        }
    }
}

/// Finishes the exit the vCPU is still inside before it parks, as Cloud
/// Hypervisor does before a pause: after a port I/O exit KVM completes the
/// instruction (an `in`'s value into RAX, RIP past it) only on the next
/// KVM_RUN. KVM_RUN with `immediate_exit` set does just that and returns
/// EINTR without entering the guest (no clock is touched). Without it a
/// snapshot would save RIP on the `out` of the probe's last report and the
/// restored guest would execute it again (kernels that advance RIP at the
/// exit, like this project's kvm_pvm, show no difference).
fn complete_pending_exit(fd: &Mutex<VcpuFd>) {
    let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

fn handle_exit(exit: VcpuExit<'_>, io: &IoContext, tsc_offset: Option<i64>) -> Next {
    match exit {
        VcpuExit::IoOut(REPORT_PORT, data) => {
            let stamp = stamp::now();
            let gpa = u64::from(le_u32(data));
            let mut record = [0u8; RECORD_BYTES];
            if io.ram.read(gpa, &mut record).is_ok() {
                if let Some(report) = GuestReport::from_record(&record) {
                    io.reports.fetch_add(1, Ordering::Relaxed);
                    if let Some(log) = &io.log {
                        let mut line = LoggedReport::new(&io.name, &report, stamp);
                        line.tsc_offset = tsc_offset;
                        log.write(&line);
                    }
                }
            }
            Next::Sleep(io.report_interval)
        }
        VcpuExit::IoIn(REPORT_PORT, data) => {
            let magic = if io.text_mode { 0 } else { REF_MAGIC };
            for (d, s) in data.iter_mut().zip(magic.to_le_bytes()) {
                *d = s;
            }
            Next::Run
        }
        VcpuExit::IoOut(COM1, data) => {
            if let Some(serial) = &io.serial {
                if let Ok(mut f) = serial.lock() {
                    let _ = f.write_all(data);
                }
            }
            Next::Run
        }
        VcpuExit::IoIn(port, data) => {
            // COM1's line status register: transmitter empty. Else all ones.
            let value = if port == COM1 + 5 { 0x60 } else { 0xff };
            data.fill(value);
            Next::Run
        }
        VcpuExit::IoOut(DEBUG_PORT, data) => {
            if let Some(b) = data.first() {
                io.last_debug_byte.store(u64::from(*b), Ordering::Relaxed);
            }
            Next::Run
        }
        VcpuExit::IoOut(..) => Next::Run,
        // No interrupt can wake a halted vCPU here: look again later.
        VcpuExit::Hlt => Next::Sleep(Duration::from_millis(10)),
        VcpuExit::Intr => Next::Run,
        other => Next::Stop(format!("unexpected exit {other:?}")),
    }
}
