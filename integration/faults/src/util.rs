//! Clocks, a seeded random generator, child processes with a kill switch.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// CLOCK_MONOTONIC_RAW, ns: the clock `clockcarry restore --json` stamps its
/// start and its PUT answer with, so the two can be compared.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `now_ns() >= t` (short sleeps are hrtimers: tens of µs late).
pub fn sleep_until(t: u64) {
    let now = now_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// What the program is doing now, and since when (for the watchdog).
static STEP: Mutex<(String, u64)> = Mutex::new((String::new(), 0));
/// Children not reaped yet (killed if the watchdog gives up).
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

pub fn step(what: impl Into<String>) {
    if let Ok(mut g) = STEP.lock() {
        *g = (what.into(), now_ns());
    }
}

/// Reports a step that takes longer than `warn_s`; after `deadline_s` of
/// the whole run, kills every child and exits 3 (a hung fault suite must
/// fail, not hang CI).
pub fn watchdog(warn_s: u64, deadline_s: u64) {
    let start = now_ns();
    std::thread::spawn(move || {
        let mut warned_at = 0;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let (what, since) = STEP.lock().map(|g| g.clone()).unwrap_or_default();
            let now = now_ns();
            let stuck = (now - since) / 1_000_000_000;
            if stuck >= warn_s && since != warned_at {
                eprintln!("faults: WATCHDOG: {stuck} s at: {what}; {}", processes());
                warned_at = since;
            }
            if deadline_s > 0 && now - start > deadline_s * 1_000_000_000 {
                eprintln!("faults: WATCHDOG: the run exceeded {deadline_s} s, at: {what} (for {stuck} s); giving up");
                if let Ok(c) = CHILDREN.lock() {
                    for &pid in c.iter() {
                        kill9(pid);
                    }
                }
                std::process::exit(3);
            }
        }
    });
}

/// This program's threads and its children: `pid comm state wchan`.
fn processes() -> String {
    let show = |dir: &str| {
        let stat = std::fs::read_to_string(format!("{dir}/stat")).unwrap_or_default();
        let wchan = std::fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
        // pid (comm) state ...
        let (head, rest) = stat.split_once(") ").unwrap_or((&stat, ""));
        format!("{head}) {} {wchan}", rest.split(' ').next().unwrap_or("?"))
    };
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for t in rd.flatten() {
            out.push(show(&t.path().display().to_string()));
        }
    }
    if let Ok(c) = CHILDREN.lock() {
        for pid in c.iter() {
            out.push(format!("child {}", show(&format!("/proc/{pid}"))));
        }
    }
    out.join("; ")
}

/// xorshift64*: reproducible from the seed the summary prints.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo + 1)
        }
    }
}

pub fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

pub fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

/// SIGKILL to `pid`; false if it failed (no such process).
pub fn kill9(pid: i32) -> bool {
    // SAFETY: kill(2) on a pid this program spawned and has not reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

/// `exit N` or `signal N`, and a number for tallies (128 + signal).
pub fn describe(st: &ExitStatus) -> (String, i32) {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => (format!("exit {c}"), c),
        (None, Some(s)) => (format!("signal {s}"), 128 + s),
        _ => ("unknown".into(), -1),
    }
}

/// A child whose stdout and stderr go to files (no pipe can fill up while
/// it is timed or killed). Killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub pid: i32,
    /// `now_ns()` just before the spawn.
    pub t_spawn: u64,
    /// `now_ns()` when the exit was noticed.
    pub t_exit: Option<u64>,
    pub status: Option<ExitStatus>,
    pub out: PathBuf,
    pub err: PathBuf,
    /// Program and first argument, for messages.
    pub name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, out: &Path, err: &Path) -> Result<Proc, String> {
        let o = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let e = File::create(err).map_err(|e| format!("{}: {e}", err.display()))?;
        cmd.stdin(Stdio::null()).stdout(o).stderr(e);
        let prog = Path::new(cmd.get_program())
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match cmd
            .get_args()
            .find(|a| !a.to_string_lossy().starts_with('-'))
        {
            Some(a) if !prog.contains("refvmm") => format!("{prog} {}", a.to_string_lossy()),
            _ => prog,
        };
        step(format!("starting {name}"));
        let t_spawn = now_ns();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
        if let Ok(mut c) = CHILDREN.lock() {
            c.push(child.id() as i32);
        }
        Ok(Proc {
            pid: child.id() as i32,
            child,
            t_spawn,
            t_exit: None,
            status: None,
            out: out.to_path_buf(),
            err: err.to_path_buf(),
            name,
        })
    }

    fn reaped(&mut self, st: ExitStatus) {
        self.t_exit = Some(now_ns());
        self.status = Some(st);
        if let Ok(mut c) = CHILDREN.lock() {
            c.retain(|&p| p != self.pid);
        }
    }

    /// The exit status if it has exited (reaps it).
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.reaped(st);
            }
        }
        self.status
    }

    /// Blocks until it exits (exact exit instant).
    pub fn wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            step(format!("waiting for {} (pid {})", self.name, self.pid));
            if let Ok(st) = self.child.wait() {
                self.reaped(st);
            }
        }
        self.status
    }

    /// Waits up to `d`; `None` if it is still running.
    ///
    /// It sleeps on a pidfd (woken by the exit itself), not in a polling
    /// loop: frequent wake-ups would slow the child down where a context
    /// switch is expensive (the KVM lab under TCG: twice as slow with a
    /// 100 µs poll).
    pub fn wait_for(&mut self, d: Duration) -> Option<ExitStatus> {
        step(format!("waiting for {} (pid {})", self.name, self.pid));
        let end = now_ns() + d.as_nanos() as u64;
        // SAFETY: pidfd_open(2) on our own unreaped child; the fd is closed below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) } as i32;
        let mut backoff = 100u64;
        let st = loop {
            if let Some(st) = self.poll() {
                break Some(st);
            }
            let now = now_ns();
            if now >= end {
                break None;
            }
            if pidfd >= 0 {
                let ms = ((end - now) / 1_000_000).clamp(1, 1000) as i32;
                let mut pfd = libc::pollfd {
                    fd: pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            } else {
                std::thread::sleep(Duration::from_micros(backoff));
                backoff = (backoff * 2).min(5000);
            }
        };
        if pidfd >= 0 {
            // SAFETY: closing the pidfd opened above.
            unsafe { libc::close(pidfd) };
        }
        st
    }

    /// SIGKILL unless it has already exited and been reaped; true if sent.
    /// (An exited but unreaped child is a zombie: the signal is harmless and
    /// its pid cannot have been reused.)
    pub fn kill(&mut self) -> bool {
        if self.poll().is_some() {
            return false;
        }
        kill9(self.pid)
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The last line of stderr, for messages.
    pub fn stderr_tail(&self) -> String {
        let s = self.stderr();
        let last = s
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>();
        format!("{}: {last}", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            // Bounded: a process stuck in the kernel must not hang the suite.
            let _ = self.wait_for(Duration::from_secs(5));
        }
    }
}
