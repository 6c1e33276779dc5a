//! Helpers for the `clockcarry` command tests: running the binary, temp
//! dirs, a tiny fake VMM speaking the vm.clock API over a Unix socket, and
//! locating the reference VMM.
//!
//! The fake VMM answers `GET /api/v1/vm.clock` with a VM of the shape the
//! design brief fixes, and applies `PUT /api/v1/vm.clock` the way the
//! reference VMM does (offsets, rate, kvm-clock following the line, an
//! answer like `clockcarry-refvmm`'s), or misbehaves on request: refuse,
//! fail and roll back, apply wrong offsets, hang, close. One request at a
//! time, one connection per request, like Cloud Hypervisor's API thread.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use clockcarry::model::{
    Capabilities, KvmClockSample, Pvti, PvtiSource, RunState, VcpuOffset, VmClock,
};
use clockcarry::pvclock::{derive_pvti, guest_tsc, pvclock_read};
use clockcarry::vmclock_api::{PutFailure, PutOutcome, RollbackOutcome, RollbackStep};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_clockcarry");

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("clockcarry-cli-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The result of one `clockcarry` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
    #[track_caller]
    pub fn expect(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "exit {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }
    #[track_caller]
    pub fn stdout_has(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}:\n{}",
            self.stdout
        );
        self
    }
}

pub fn finish(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every environment variable through which the binary finds a path it
/// reads or writes, and where [`sandbox`] points it under the test's temp
/// dir. `environment_variables_are_all_sandboxed` (tests/cli.rs) fails when
/// the code reads a `CLOCKCARRY_*` variable missing here.
pub const SANDBOX_ENV: &[(&str, &str)] = &[
    ("CLOCKCARRY_RUN_DIR", "run"),
    ("CLOCKCARRY_STATE_DIR", "state"),
    ("CLOCKCARRY_LIBVIRT_CONFIG", "libvirt.conf"),
    ("CLOCKCARRY_CONFIG", "clockcarry.conf"),
    ("CLOCKCARRY_METRICS_DIR", "metrics"),
];

/// Points every path the binary would otherwise take from the host (the
/// rate cache, the sidecar state directory, the host configuration, the
/// libvirt hook's state and configuration) into `env_dir`, so a test never
/// writes (or reads) the real `/run/clockcarry`, `/var/lib/clockcarry` or
/// `/etc/clockcarry`. The host configuration `env_dir/clockcarry.conf` is
/// created empty (no key required) unless the test wrote one: a
/// configuration named by `CLOCKCARRY_CONFIG` must exist.
pub fn sandbox<'a>(c: &'a mut Command, env_dir: &Path) -> &'a mut Command {
    let conf = env_dir.join("clockcarry.conf");
    let _ = std::fs::create_dir_all(env_dir.join("metrics"));
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&conf);
    for (var, name) in SANDBOX_ENV {
        c.env(var, env_dir.join(name));
    }
    c
}

/// A command for the binary with logs on stderr, sandboxed ([`sandbox`]).
pub fn cmd(env_dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    sandbox(&mut c, env_dir).arg("--log-target").arg("stderr");
    c
}

/// Runs `clockcarry <args>` with [`cmd`].
pub fn run(env_dir: &Path, args: &[&str]) -> Run {
    finish(cmd(env_dir).args(args).output().expect("run clockcarry"))
}

/// The host TSC rate the tests give fake VMs (measured once).
pub fn host_khz() -> u32 {
    static KHZ: Mutex<Option<u32>> = Mutex::new(None);
    let mut g = KHZ.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = *g {
        return k;
    }
    let k = clockcarry::host::host_tsc_khz().expect("host TSC rate").khz;
    *g = Some(k);
    k
}

/// How the fake VMM answers a PUT.
#[derive(Debug, Clone)]
pub enum PutBehavior {
    /// Apply it, like the reference VMM.
    Apply,
    /// Answer `status` with a typed failure (400: `refused`, else
    /// `wrong_state`) carrying these strings, change nothing.
    Refuse(u16, Vec<String>),
    /// Answer `status` with these strings as a bare JSON array (a VMM without
    /// typed failures), change nothing.
    RefuseUntyped(u16, Vec<String>),
    /// Apply the offsets, yet answer `status` with these strings as a bare
    /// JSON array (a VMM that failed half way and says so only in words).
    ChangeUntyped(u16, Vec<String>),
    /// Answer 500 with a typed `rolled_back` failure, change nothing.
    FailRolledBack,
    /// Answer 500 with a typed `rollback_incomplete` failure, change nothing.
    FailRollbackIncomplete,
    /// Answer 200 but store other offsets than asked (+1 cycle); a later
    /// PUT is applied normally (so a rollback works).
    ApplyWrongOnce,
    /// Never answer within `ms` milliseconds (then close).
    Hang(u64),
    /// Close the connection without answering.
    Close,
}

/// What the fake VMM holds and records.
pub struct FakeState {
    pub vm: VmClock,
    /// kvm-clock line after a PUT (None: derived from the initial clock).
    pub line: Option<Pvti>,
    pub put: PutBehavior,
    pub put_bodies: Vec<Value>,
    pub gets: u32,
    /// A fixed GET body instead of the VM (to test answer checking).
    pub get_override: Option<(u16, String)>,
    /// How far above (+) or below (-) the asked line a `follow_pvti` lands,
    /// ns, as a VMM whose calibration loop missed its target.
    pub kvmclock_miss_ns: i64,
}

pub struct FakeVmm {
    pub socket: PathBuf,
    pub state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A VM of `vcpus` vCPUs at the host rate, kvm-clock on a line through
/// (now, 5 s of uptime), offsets as a VM booted 10 s ago has them.
pub fn sample_vm(vcpus: u32, state: RunState) -> VmClock {
    let khz = host_khz();
    let host_tsc = clockcarry::host::read_host_tsc();
    let offset = -(host_tsc as i64) + i64::from(khz) * 10_000;
    let clock_ns = 5_000_000_000u64;
    let pvti = derive_pvti(clock_ns, host_tsc, offset, None, khz).expect("pvti");
    VmClock {
        state,
        tsc_khz: khz,
        vcpus: (0..vcpus)
            .map(|id| VcpuOffset {
                id,
                tsc_offset: offset,
            })
            .collect(),
        kvmclock: KvmClockSample {
            clock_ns,
            flags: 14,
            realtime_ns: clockcarry::host::realtime_now_ns().unwrap_or(1),
            host_tsc,
        },
        pvti: Some(pvti),
        pvti_source: Some(PvtiSource::GuestMemory),
        tsc_scaling: None,
        capabilities: Capabilities {
            tsc_offset_effective: true,
            clock_guest: false,
            tsc_scaling: false,
            adjust_clock: 14,
        },
    }
}

impl FakeState {
    /// The VM as a GET answers it now: a fresh KVM_GET_CLOCK pair on the
    /// current line.
    fn snapshot(&mut self) -> VmClock {
        let mut vm = self.vm.clone();
        let line = self.line.or(vm.pvti).unwrap_or(Pvti {
            tsc_timestamp: 0,
            system_time: 0,
            tsc_to_system_mul: 1 << 31,
            tsc_shift: 0,
            flags: 1,
        });
        let host_tsc = clockcarry::host::read_host_tsc();
        let offset = vm.vcpus.first().map_or(0, |v| v.tsc_offset);
        vm.kvmclock.host_tsc = host_tsc;
        vm.kvmclock.clock_ns = pvclock_read(&line, guest_tsc(host_tsc, None, offset));
        vm.kvmclock.realtime_ns = clockcarry::host::realtime_now_ns().unwrap_or(1);
        if self.line.is_some() {
            vm.pvti = Some(line);
        }
        vm
    }

    fn apply(&mut self, body: &Value, wrong: bool) -> Result<Value, (u16, Vec<String>)> {
        let offsets: Vec<i64> = body
            .get("tsc_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .ok_or((400, vec!["tsc_offsets missing".to_string()]))?;
        if offsets.len() != self.vm.vcpus.len() {
            return Err((
                400,
                vec![format!(
                    "tsc_offsets has {} entries, the VM has {} vCPUs",
                    offsets.len(),
                    self.vm.vcpus.len()
                )],
            ));
        }
        if self.vm.state != RunState::Paused {
            return Err((
                500,
                vec!["VM is not paused: vm.clock PUT is only accepted while Paused".into()],
            ));
        }
        if self.vm.capabilities.tsc_offset_effective {
            for (v, o) in self.vm.vcpus.iter_mut().zip(&offsets) {
                v.tsc_offset = if wrong { o.wrapping_add(1) } else { *o };
            }
        }
        if let Some(k) = body.get("tsc_khz").and_then(Value::as_u64) {
            self.vm.tsc_khz = u32::try_from(k).unwrap_or(0);
        }
        let follow = body.get("kvmclock").and_then(|k| k.get("follow_pvti"));
        if let Some(f) = follow {
            let g = |k: &str| f.get(k).and_then(Value::as_i64).unwrap_or(0);
            self.line = Some(Pvti {
                tsc_timestamp: f.get("tsc_timestamp").and_then(Value::as_u64).unwrap_or(0),
                system_time: f
                    .get("system_time")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .wrapping_add_signed(self.kvmclock_miss_ns),
                tsc_to_system_mul: u32::try_from(g("tsc_to_system_mul")).unwrap_or(1),
                tsc_shift: i8::try_from(g("tsc_shift")).unwrap_or(0),
                flags: u8::try_from(g("flags")).unwrap_or(0),
            });
        }
        let within = follow.map(|f| {
            let max = f.get("max_error_ns").and_then(Value::as_i64).unwrap_or(0);
            (0..=max).contains(&self.kvmclock_miss_ns)
        });
        Ok(json!({
            "outcome": "applied",
            "kvmclock_within_target": within,
            "kvmclock_request": if follow.is_some() { "follow_pvti" } else { "none" },
            "kvmclock_method": if follow.is_some() { "set_clock" } else { "none" },
            "kvmclock_error_ns": if follow.is_some() { json!(self.kvmclock_miss_ns) } else { Value::Null },
            "kvmclock_tries": 1,
            "tsc_khz_set": body.get("tsc_khz").cloned().unwrap_or(Value::Null),
            "tsc_offsets_applied": offsets,
            "tsc_offsets_read_back": self.vm.vcpus.iter().map(|v| v.tsc_offset).collect::<Vec<_>>(),
            "tsc_offsets_effective": self.vm.capabilities.tsc_offset_effective,
            "refused": [],
        }))
    }
}

fn respond(stream: &mut UnixStream, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(text.as_bytes());
}

/// Reads once, retrying when a signal interrupts the read.
fn read_some(stream: &mut UnixStream, chunk: &mut [u8]) -> Result<usize, String> {
    loop {
        match stream.read(chunk) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Reads one request: (method, path, body). `Err` says why the connection
/// is closed unanswered, so that a test which sees the VMM close on it can
/// tell why.
fn read_request(stream: &mut UnixStream) -> Result<(String, String, Vec<u8>), String> {
    // Generous: it only bounds a test whose client never finishes its
    // request. This machine's clock has been seen to jump 11 s at once;
    // with 5 s, such a jump between a PUT's head and its body closed the
    // connection on a healthy client (EPIPE on the body, a failed test).
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err(format!("EOF after {} bytes of the head", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return Err("head over 1 MiB".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path)) = (first.next(), first.next()) else {
        return Err(format!("bad request line in {head:?}"));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = read_some(stream, &mut chunk)?;
        if n == 0 {
            return Err(format!("EOF after {} of {len} body bytes", body.len()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((method, path, body))
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn serve_one(state: &Arc<Mutex<FakeState>>, mut stream: UnixStream) {
    let (method, path, body) = match read_request(&mut stream) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("fake VMM: closing a connection unanswered: {why}");
            return;
        }
    };
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    match (method.as_str(), path.as_str()) {
        ("GET", "/api/v1/vmm.ping") => respond(&mut stream, 200, r#"{"version":"fake"}"#),
        ("GET", "/api/v1/vm.clock") => {
            st.gets += 1;
            if let Some((status, text)) = st.get_override.clone() {
                respond(&mut stream, status, &text);
                return;
            }
            let vm = st.snapshot();
            let text = clockcarry::vmclock_api::vm_clock_json(&vm).unwrap_or_default();
            respond(&mut stream, 200, &text);
        }
        ("PUT", "/api/v1/vm.clock") => {
            let value: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    respond(
                        &mut stream,
                        400,
                        &json!([format!("bad JSON: {e}")]).to_string(),
                    );
                    return;
                }
            };
            st.put_bodies.push(value.clone());
            match st.put.clone() {
                PutBehavior::Apply | PutBehavior::ApplyWrongOnce => {
                    let wrong = matches!(st.put, PutBehavior::ApplyWrongOnce);
                    if wrong {
                        st.put = PutBehavior::Apply;
                    }
                    match st.apply(&value, wrong) {
                        Ok(answer) => respond(&mut stream, 200, &answer.to_string()),
                        Err((status, msgs)) => {
                            let outcome = if status == 400 {
                                PutOutcome::Refused
                            } else {
                                PutOutcome::WrongState
                            };
                            let f = PutFailure::untouched(outcome, msgs);
                            respond(&mut stream, status, &json!(f).to_string())
                        }
                    }
                }
                PutBehavior::Refuse(status, msgs) => {
                    let outcome = if status == 400 {
                        PutOutcome::Refused
                    } else {
                        PutOutcome::WrongState
                    };
                    let f = PutFailure::untouched(outcome, msgs);
                    respond(&mut stream, status, &json!(f).to_string())
                }
                PutBehavior::RefuseUntyped(status, msgs) => {
                    respond(&mut stream, status, &json!(msgs).to_string())
                }
                PutBehavior::ChangeUntyped(status, msgs) => {
                    let _ = st.apply(&value, false);
                    respond(&mut stream, status, &json!(msgs).to_string())
                }
                PutBehavior::FailRolledBack | PutBehavior::FailRollbackIncomplete => {
                    let complete = matches!(st.put, PutBehavior::FailRolledBack);
                    let mut steps = vec![RollbackStep {
                        step: "offsets".into(),
                        ok: true,
                        detail: "offsets restored on 1 vCPUs".into(),
                    }];
                    if !complete {
                        steps.push(RollbackStep {
                            step: "failure".into(),
                            ok: false,
                            detail: "KVM_SET_DEVICE_ATTR on vCPU 0: errno 5".into(),
                        });
                    }
                    let f = PutFailure {
                        outcome: if complete {
                            PutOutcome::RolledBack
                        } else {
                            PutOutcome::RollbackIncomplete
                        },
                        messages: vec![
                            "Error from API".into(),
                            "The VM clock could not be set".into(),
                            "KVM_SET_DEVICE_ATTR on vCPU 1: errno 5 (Input/output error)".into(),
                        ],
                        failed_step: Some("TSC offset of vCPU 1".into()),
                        rollback: Some(RollbackOutcome { complete, steps }),
                    };
                    respond(&mut stream, 500, &json!(f).to_string())
                }
                PutBehavior::Hang(ms) => {
                    drop(st);
                    std::thread::sleep(Duration::from_millis(ms));
                }
                PutBehavior::Close => {}
            }
        }
        _ => respond(
            &mut stream,
            404,
            &json!([format!("no route for {method} {path}")]).to_string(),
        ),
    }
}

impl FakeVmm {
    /// Starts serving `vm` on `<dir>/api.sock`.
    pub fn start(dir: &Path, vm: VmClock) -> FakeVmm {
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind fake VMM socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(FakeState {
            vm,
            line: None,
            put: PutBehavior::Apply,
            put_bodies: Vec::new(),
            gets: 0,
            get_override: None,
            kvmclock_miss_ns: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        serve_one(&st, stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        FakeVmm {
            socket,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn socket_str(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn offsets(&self) -> Vec<i64> {
        self.with(|s| s.vm.offsets())
    }

    pub fn puts(&self) -> usize {
        self.with(|s| s.put_bodies.len())
    }

    /// Stops serving and removes the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds the reference VMM binary: `$CLOCKCARRY_REFVMM`, else
/// `target/<profile>/clockcarry-refvmm` (built with `cargo build -p
/// clockcarry-refvmm` when the package exists and the binary does not).
/// `Err` carries the SKIP reason.
pub fn refvmm_binary() -> Result<PathBuf, String> {
    // Once per test binary: the tests run in parallel.
    static FOUND: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut g = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = g.as_ref() {
        return r.clone();
    }
    let r = find_refvmm();
    *g = Some(r.clone());
    r
}

fn find_refvmm() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CLOCKCARRY_REFVMM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("CLOCKCARRY_REFVMM={} is not a file", p.display()))
        };
    }
    // BIN is target/<profile>/clockcarry.
    let dir = Path::new(BIN).parent().ok_or("no target dir")?;
    let candidate = dir.join("clockcarry-refvmm");
    if candidate.is_file() {
        return Ok(candidate);
    }
    // hook/cli -> the workspace root.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .ok_or("no workspace")?;
    let manifest = workspace.join("integration/refvmm/Cargo.toml");
    if !manifest.is_file() {
        return Err("the reference VMM (integration/refvmm) does not exist yet".into());
    }
    let members = std::fs::read_to_string(workspace.join("Cargo.toml")).unwrap_or_default();
    if !members.contains("integration/refvmm") {
        return Err("integration/refvmm is not a workspace member yet".into());
    }
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(workspace).args([
        "build",
        "-p",
        "clockcarry-refvmm",
        "--bin",
        "clockcarry-refvmm",
    ]);
    if profile == "release" {
        build.arg("--release");
    }
    let out = build.output().map_err(|e| format!("cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build -p clockcarry-refvmm failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!("{} not found after building", candidate.display()))
    }
}

/// One HTTP/1.1 request on a Unix socket: (status, body). For driving a
/// VMM's other endpoints (pause, snapshot, restore) from tests.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&out[..i]).to_string();
                    let len: usize = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse().ok())
                        .unwrap_or(0);
                    if out.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            Err(e) => panic!("read {}: {e}", socket.display()),
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A `clockcarry-refvmm` process serving `<dir>/<name>.sock`, killed on drop.
pub struct RefVmm {
    child: std::process::Child,
    pub socket: PathBuf,
}

impl RefVmm {
    /// Starts the reference VMM with `args` and waits until it answers
    /// vmm.ping (5 s at most).
    pub fn spawn(bin: &Path, dir: &Path, name: &str, args: &[&str]) -> Result<RefVmm, String> {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut vmm = RefVmm { child, socket };
        for _ in 0..500 {
            if let Ok(Some(status)) = vmm.child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                return Err(format!("clockcarry-refvmm exited ({status}): {log}"));
            }
            if UnixStream::connect(&vmm.socket).is_ok() {
                let (status, _) = vmm.api("GET", "/api/v1/vmm.ping", None);
                if status == 200 {
                    return Ok(vmm);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm.kill();
        Err("clockcarry-refvmm did not answer vmm.ping within 5 s".into())
    }

    pub fn socket_str(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.socket, method, path, body)
    }

    /// PUT `path` with `body`, expecting a 2xx.
    #[track_caller]
    pub fn put_ok(&self, path: &str, body: Option<&str>) {
        let (status, text) = self.api("PUT", path, body);
        assert!(
            (200..300).contains(&status),
            "PUT {path}: HTTP {status}: {text}"
        );
    }

    /// `GET vm.clock`, parsed.
    pub fn clock(&self) -> VmClock {
        let (status, text) = self.api("GET", "/api/v1/vm.clock", None);
        assert_eq!(status, 200, "GET vm.clock: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("vm.clock answer: {e}: {text}"))
    }

    /// `GET vm.info`, parsed.
    pub fn info(&self) -> Value {
        let (status, text) = self.api("GET", "/api/v1/vm.info", None);
        assert_eq!(status, 200, "GET vm.info: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for RefVmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why tests against the reference VMM cannot run here, if they cannot.
pub fn refvmm_skip_reason() -> Option<String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is not accessible".into());
    }
    refvmm_binary().err()
}
