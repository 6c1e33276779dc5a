//! The VMM's HTTP API, in Cloud Hypervisor's style: root `/api/v1`, PUT
//! actions answer 204, GETs 200 with JSON, errors a JSON array of strings
//! (the error chain, outermost first) with CH's status codes:
//!
//! | case | status |
//! |---|---|
//! | unknown path | 404 `["Not Found"]` |
//! | method other than GET/PUT | 400, no body |
//! | GET on a PUT action, PUT on a GET endpoint, missing or unexpected body | 400 `["Bad Request"]` |
//! | malformed JSON | 400 `["Failed to deserialize JSON", detail]` |
//! | no VM for vm.info / vm.clock | 404 `["Error from API", ..., "VM is not created"]` |
//! | wrong state, failed action | 500 `["Error from API", ...]` |
//! | vm.clock body that cannot be applied (offset count, zero rate) | 400 `["Error from API", ...]` |
//!
//! The `vm.clock` PUT body is the library's `clockcarry::vmclock_api::ClockPut`
//! ([`parse_clock_put`], [`check_clock_put`]).

use std::path::Path;
use std::thread::JoinHandle;

use kvm_ioctls::Kvm;
use serde::Deserialize;

use crate::clockapi::{self, ClockApiError, ClockPut, ProbedKvm};
use crate::elf::PvhImage;
use crate::http::{Request, Response};
use crate::migration::{self, Channel, Header, MemoryTransfer};
use crate::state::{self, VmConfig};
use crate::vm::{MemorySource, RestoreClock, Vm, VmError, VmOptions, VmState};
use clockcarry::vmclock_api::{PutFailure, PutOutcome};

/// Root of every endpoint.
pub const API_ROOT: &str = "/api/v1";

/// `vm.snapshot` body.
#[derive(Debug, Deserialize)]
struct SnapshotBody {
    destination_url: String,
}

/// `vm.restore` body (Cloud Hypervisor's fields; `prefault` etc. accepted
/// and ignored).
#[derive(Debug, Deserialize)]
struct RestoreBody {
    source_url: String,
    #[serde(default)]
    resume: bool,
    /// The armed clock (the extension): applied after the state is loaded,
    /// before the first vCPU run; its `arm` checks are required.
    #[serde(default)]
    clock: Option<ClockPut>,
}

/// `vm.send-migration` body.
#[derive(Debug, Deserialize)]
struct SendBody {
    destination_url: String,
    #[serde(default)]
    local: bool,
}

/// `vm.receive-migration` body; `resume: false` is the extension.
#[derive(Debug, Deserialize)]
struct ReceiveBody {
    receiver_url: String,
    #[serde(default)]
    resume: Option<bool>,
    /// The armed clock, as in [`RestoreBody`].
    #[serde(default)]
    clock: Option<ClockPut>,
}

/// A failed API call: its status and error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    /// Cloud Hypervisor's error chain, outermost message first.
    pub chain: Vec<String>,
    /// `PUT vm.clock` only: the typed failure sent instead of the bare chain.
    pub clock: Option<PutFailure>,
}

impl ApiFailure {
    fn api(status: u16, action: &str, cause: impl ToString) -> ApiFailure {
        ApiFailure {
            status,
            chain: vec!["Error from API".into(), action.into(), cause.to_string()],
            clock: None,
        }
    }

    fn bad_request() -> ApiFailure {
        ApiFailure {
            status: 400,
            chain: vec!["Bad Request".into()],
            clock: None,
        }
    }

    /// The same failure as a typed `PUT vm.clock` reply: its outcome (400:
    /// refused; else the VM's state), the chain as its messages.
    fn into_clock(self) -> ApiFailure {
        if self.clock.is_some() {
            return self;
        }
        let outcome = if self.status == 400 {
            PutOutcome::Refused
        } else {
            PutOutcome::WrongState
        };
        let clock = PutFailure::untouched(outcome, self.chain.clone());
        ApiFailure {
            clock: Some(clock),
            ..self
        }
    }

    /// The HTTP answer: the status and the chain as a JSON array of strings,
    /// or the typed `PUT vm.clock` failure.
    pub fn response(self) -> Response {
        match &self.clock {
            Some(f) => match serde_json::to_string(f) {
                Ok(body) => Response::json(self.status, body),
                Err(_) => Response::error(self.status, &self.chain),
            },
            None => Response::error(self.status, &self.chain),
        }
    }
}

/// The action named in `vm.clock` PUT errors, as Cloud Hypervisor would.
pub const CLOCK_PUT_ACTION: &str = "The VM clock could not be set";

/// Reads a `PUT vm.clock` body as the API does (no VM or /dev/kvm needed):
/// the library's [`ClockPut`], strictly. No body: 400 `["Bad Request"]`;
/// malformed JSON, an unknown field at any level, a wrong type, two
/// `kvmclock` forms: 400 `["Failed to deserialize JSON", detail]`.
pub fn parse_clock_put(body: &Option<Vec<u8>>) -> Result<ClockPut, ApiFailure> {
    parse_body(body)
}

/// The checks of a parsed `PUT vm.clock` body against a VM of `vcpus`
/// vCPUs, answered as the API does: 400 `["Error from API", CLOCK_PUT_ACTION,
/// reason]` (the API runs them after the state checks, which answer 500).
pub fn check_clock_put(body: &ClockPut, vcpus: u32) -> Result<(), ApiFailure> {
    clockapi::check_body(body, vcpus).map_err(clock_failure)
}

fn clock_failure(e: ClockApiError) -> ApiFailure {
    let outcome = e.outcome();
    let mut failure = match &e {
        ClockApiError::BadRequest(m) => ApiFailure::api(400, CLOCK_PUT_ACTION, m),
        e => ApiFailure::api(500, CLOCK_PUT_ACTION, e),
    };
    let (failed_step, rollback) = match e {
        ClockApiError::Failed { step, rollback, .. } => (step, rollback),
        _ => (None, None),
    };
    failure.clock = Some(PutFailure {
        outcome,
        messages: failure.chain.clone(),
        failed_step,
        rollback,
    });
    failure
}

type ApiResult = Result<Response, ApiFailure>;

fn parse_body<'a, T: Deserialize<'a>>(body: &'a Option<Vec<u8>>) -> Result<T, ApiFailure> {
    let Some(bytes) = body else {
        return Err(ApiFailure::bad_request());
    };
    serde_json::from_slice(bytes).map_err(|e| ApiFailure {
        status: 400,
        chain: vec!["Failed to deserialize JSON".into(), e.to_string()],
        clock: None,
    })
}

fn no_body(body: &Option<Vec<u8>>) -> Result<(), ApiFailure> {
    match body {
        Some(_) => Err(ApiFailure::bad_request()),
        None => Ok(()),
    }
}

enum Owner {
    None,
    Owned(Box<Vm>),
    Migrating(JoinHandle<(Box<Vm>, Result<(), String>)>),
}

/// What the VMM boots at start, if anything (`--kernel`).
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub config: VmConfig,
    pub image: PvhImage,
}

/// The VMM: at most one VM, and the API on it.
pub struct Vmm {
    kvm: Kvm,
    opts: VmOptions,
    owner: Owner,
    probed: Option<ProbedKvm>,
    /// Set when the process should exit (after vmm.shutdown or a
    /// successful outgoing migration).
    pub exit_code: Option<i32>,
}

impl Vmm {
    /// A VMM with no VM, or with `boot` booted.
    pub fn new(opts: VmOptions, boot: Option<&BootSpec>) -> Result<Vmm, String> {
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        let owner = match boot {
            Some(b) => Owner::Owned(Box::new(
                Vm::boot(&kvm, b.config.clone(), &b.image, &opts).map_err(|e| e.to_string())?,
            )),
            None => Owner::None,
        };
        Ok(Vmm {
            kvm,
            opts,
            owner,
            probed: None,
            exit_code: None,
        })
    }

    /// Checks on an outgoing migration; returns true when it has finished.
    pub fn poll_migration(&mut self) {
        let finished = matches!(&self.owner, Owner::Migrating(h) if h.is_finished());
        if !finished {
            return;
        }
        if let Owner::Migrating(h) = std::mem::replace(&mut self.owner, Owner::None) {
            match h.join() {
                Ok((_vm, Ok(()))) => {
                    // As Cloud Hypervisor: the source is done once the
                    // destination has the VM.
                    eprintln!("refvmm: migration complete, exiting");
                    self.exit_code = Some(0);
                }
                Ok((vm, Err(e))) => {
                    eprintln!("refvmm: migration failed: {e}");
                    self.owner = Owner::Owned(vm);
                }
                Err(_) => {
                    eprintln!("refvmm: migration worker panicked");
                    self.exit_code = Some(1);
                }
            }
        }
    }

    fn vm_mut(&mut self, action: &str) -> Result<&mut Vm, ApiFailure> {
        match &mut self.owner {
            Owner::Owned(vm) => Ok(vm),
            Owner::Migrating(_) => Err(ApiFailure::api(
                500,
                action,
                "VM is currently migrating and can't be modified",
            )),
            Owner::None => Err(ApiFailure::api(500, action, "VM is not running")),
        }
    }

    fn vm_or_404(&mut self, action: &str) -> Result<&mut Vm, ApiFailure> {
        match &mut self.owner {
            Owner::None => Err(ApiFailure::api(404, action, "VM is not created")),
            _ => self.vm_mut(action),
        }
    }

    fn no_vm(&self, action: &str, exists: &str) -> Result<(), ApiFailure> {
        match &self.owner {
            Owner::None => Ok(()),
            Owner::Migrating(_) => Err(ApiFailure::api(
                500,
                action,
                "VM is currently migrating and can't be modified",
            )),
            Owner::Owned(_) => Err(ApiFailure::api(500, action, exists)),
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, req: &Request) -> Response {
        self.poll_migration();
        let Some(endpoint) = req.path.strip_prefix(API_ROOT) else {
            return Response::error(404, &["Not Found".into()]);
        };
        let get = match req.method.as_str() {
            "GET" => true,
            "PUT" => false,
            _ => {
                return Response {
                    status: 400,
                    body: None,
                }
            }
        };
        let result = match (endpoint, get) {
            ("/vmm.ping", true) => Ok(self.ping()),
            ("/vmm.shutdown", false) => {
                self.exit_code = Some(0);
                Ok(Response {
                    status: 200,
                    body: None,
                })
            }
            ("/vm.info", true) => self.info(),
            ("/vm.pause", false) => no_body(&req.body).and_then(|_| self.pause()),
            ("/vm.resume", false) => no_body(&req.body).and_then(|_| self.resume()),
            ("/vm.snapshot", false) => parse_body(&req.body).and_then(|b| self.snapshot(b)),
            ("/vm.restore", false) => parse_body(&req.body).and_then(|b| self.restore(b)),
            ("/vm.send-migration", false) => parse_body(&req.body).and_then(|b| self.send(b)),
            ("/vm.receive-migration", false) => parse_body(&req.body).and_then(|b| self.receive(b)),
            ("/vm.clock", true) => self.clock_get(),
            ("/vm.clock", false) => parse_clock_put(&req.body)
                .and_then(|b| self.clock_put(&b))
                .map_err(ApiFailure::into_clock),
            (
                "/vmm.ping"
                | "/vmm.shutdown"
                | "/vm.info"
                | "/vm.pause"
                | "/vm.resume"
                | "/vm.snapshot"
                | "/vm.restore"
                | "/vm.send-migration"
                | "/vm.receive-migration",
                _,
            ) => Err(ApiFailure::bad_request()),
            _ => return Response::error(404, &["Not Found".into()]),
        };
        result.unwrap_or_else(ApiFailure::response)
    }

    fn ping(&self) -> Response {
        let body = serde_json::json!({
            "build_version": concat!("clockcarry-refvmm ", env!("CARGO_PKG_VERSION")),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "features": ["kvm", "vm_clock"],
        });
        Response::json(200, body.to_string())
    }

    fn info(&mut self) -> ApiResult {
        let vm = self.vm_or_404("The VM info is not available")?;
        Ok(Response::json(200, vm.info().to_string()))
    }

    fn pause(&mut self) -> ApiResult {
        let action = "The VM could not be paused";
        let vm = self.vm_mut(action)?;
        vm.pause()
            .map_err(|e| chain(action, "Cannot pause VM", &e))?;
        Ok(Response::no_content())
    }

    fn resume(&mut self) -> ApiResult {
        let action = "The VM could not resume";
        let vm = self.vm_mut(action)?;
        vm.resume()
            .map_err(|e| chain(action, "Cannot resume VM", &e))?;
        Ok(Response::no_content())
    }

    fn snapshot(&mut self, body: SnapshotBody) -> ApiResult {
        let action = "The VM could not be snapshotted";
        let dir = state::dir_from_url(&body.destination_url)
            .map_err(|e| ApiFailure::api(500, action, e))?;
        let vm = self.vm_mut(action)?;
        if vm.state() != VmState::Paused {
            return Err(ApiFailure::api(
                500,
                action,
                "Trying to snapshot while VM is running",
            ));
        }
        let snap = vm
            .snapshot_state()
            .map_err(|e| chain(action, "Cannot snapshot VM", &e))?;
        let mut mem = snap
            .write_dir(&dir)
            .map_err(|e| ApiFailure::api(500, action, e))?;
        vm.ram()
            .save_to(&mut mem)
            .and_then(|_| std::io::Write::flush(&mut mem))
            .map_err(|e| ApiFailure::api(500, action, format!("writing memory: {e}")))?;
        Ok(Response::no_content())
    }

    fn restore(&mut self, body: RestoreBody) -> ApiResult {
        let action = "The VM could not be restored";
        self.no_vm(action, "VM is already created")?;
        let dir =
            state::dir_from_url(&body.source_url).map_err(|e| ApiFailure::api(500, action, e))?;
        let (snap, mut mem) =
            state::VmSnapshot::read_dir(&dir).map_err(|e| ApiFailure::api(500, action, e))?;
        if mem.metadata().map(|m| m.len()).unwrap_or(0) != snap.config.memory_bytes {
            return Err(ApiFailure::api(
                500,
                action,
                "memory.bin does not match the VM's memory size",
            ));
        }
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut mem);
        let vm = Vm::restore(
            &self.kvm,
            &snap,
            MemorySource::Copy(&mut reader),
            &self.opts,
            restore_clock(body.clock.as_ref()),
        )
        .map_err(|e| chain(action, "Cannot restore VM", &e))?;
        self.finish_restore(vm, action, body.resume, body.clock.as_ref())
    }

    /// After a restore or a received migration: the armed clock if one
    /// came (200 with its typed reply; refused or failed: the VM stays
    /// restored and paused, the typed failure is the answer), then the
    /// resume if asked (204 without a clock).
    fn finish_restore(
        &mut self,
        mut vm: Vm,
        action: &str,
        resume: bool,
        clock: Option<&ClockPut>,
    ) -> ApiResult {
        let applied = match clock {
            Some(body) => {
                match timed(|| clockapi::put(&mut vm, clockapi::PutMode::Armed, body, None)) {
                    (Ok(reply), ns) => {
                        vm.set_armed_clock_ns(ns);
                        vm.drop_deferred_restore_clock();
                        Some(reply)
                    }
                    (Err(e), _) => {
                        // Refused or rolled back: the VM becomes what a
                        // stock restore leaves, and stays paused.
                        let stock = vm.finish_deferred_restore_clock();
                        self.owner = Owner::Owned(Box::new(vm));
                        let mut failure = clock_failure(e);
                        if let Err(b) = stock {
                            let m = format!("then the baseline's restore clock failed too: {b}");
                            failure.chain.push(m.clone());
                            if let Some(c) = failure.clock.as_mut() {
                                c.messages.push(m);
                            }
                        }
                        return Err(failure);
                    }
                }
            }
            None => None,
        };
        let resumed = if resume {
            vm.resume()
                .map_err(|e| chain(action, "Cannot resume VM", &e))
        } else {
            Ok(())
        };
        self.owner = Owner::Owned(Box::new(vm));
        resumed?;
        match applied {
            Some(reply) => {
                let json =
                    serde_json::to_string(&reply).map_err(|e| ApiFailure::api(500, action, e))?;
                Ok(Response::json(200, json))
            }
            None => Ok(Response::no_content()),
        }
    }

    fn send(&mut self, body: SendBody) -> ApiResult {
        let action = "Error dispatching the migration worker";
        let endpoint = migration::parse_url(&body.destination_url, migration::Direction::Send)
            .map_err(|e| ApiFailure::api(500, action, e))?;
        if body.local && !matches!(endpoint, migration::Endpoint::Unix(_)) {
            return Err(ApiFailure::api(
                500,
                action,
                "Local migration requires a unix: destination",
            ));
        }
        self.vm_mut(action)?;
        let Owner::Owned(mut vm) = std::mem::replace(&mut self.owner, Owner::None) else {
            return Err(ApiFailure::api(500, action, "VM is not running"));
        };
        let local = body.local;
        let delay = self.opts.migration_delay;
        let worker = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let result = send_vm(&mut vm, &endpoint, local, delay);
                (vm, result)
            });
        match worker {
            Ok(h) => {
                self.owner = Owner::Migrating(h);
                Ok(Response::no_content())
            }
            Err(e) => Err(ApiFailure::api(500, action, e)),
        }
    }

    fn receive(&mut self, body: ReceiveBody) -> ApiResult {
        let action = "Error receiving migration";
        self.no_vm(
            action,
            "Can't receive a migration when a VM is already created",
        )?;
        let endpoint = migration::parse_url(&body.receiver_url, migration::Direction::Receive)
            .map_err(|e| ApiFailure::api(500, action, e))?;
        let mut channel =
            Channel::accept(&endpoint).map_err(|e| ApiFailure::api(500, action, e))?;
        let header = channel
            .receive_header()
            .map_err(|e| ApiFailure::api(500, action, e))?;
        let restored = match header.memory {
            MemoryTransfer::Fd => channel
                .receive_fd()
                .map_err(|e| e.to_string())
                .and_then(|fd| {
                    Vm::restore(
                        &self.kvm,
                        &header.snapshot,
                        MemorySource::Fd(fd),
                        &self.opts,
                        restore_clock(body.clock.as_ref()),
                    )
                    .map_err(|e| e.to_string())
                }),
            MemoryTransfer::Inline => Vm::restore(
                &self.kvm,
                &header.snapshot,
                MemorySource::Copy(channel.reader()),
                &self.opts,
                restore_clock(body.clock.as_ref()),
            )
            .map_err(|e| e.to_string()),
        };
        let answer = restored.as_ref().map(|_| ()).map_err(String::clone);
        let sent = channel.answer(&answer);
        let vm = restored
            .map_err(|e| ApiFailure::api(500, action, format!("Migration was aborted: {e}")))?;
        sent.map_err(|e| ApiFailure::api(500, action, e))?;
        // Complete: resume unless the source was paused (CompletePaused) or
        // the caller asked to stay paused (the extension's resume: false).
        let resume = !header.snapshot.paused && body.resume.unwrap_or(true);
        self.finish_restore(vm, action, resume, body.clock.as_ref())
    }

    fn probed(&mut self) -> Option<&ProbedKvm> {
        if self.probed.is_none() {
            if let Owner::Owned(vm) = &self.owner {
                self.probed = Some(ProbedKvm::run(&self.kvm, vm));
            }
        }
        self.probed.as_ref()
    }

    fn clock_get(&mut self) -> ApiResult {
        let action = "The VM clock is not available";
        self.vm_or_404(action)?;
        let probed = self.probed().cloned();
        let (Owner::Owned(vm), Some(probed)) = (&self.owner, probed) else {
            return Err(ApiFailure::api(500, action, "VM is not running"));
        };
        let clock = clockapi::get(vm, &probed).map_err(|e| ApiFailure::api(500, action, e))?;
        let body = clockcarry::vmclock_api::vm_clock_json(&clock)
            .map_err(|e| ApiFailure::api(500, action, e))?;
        Ok(Response::json(200, body))
    }

    fn clock_put(&mut self, body: &ClockPut) -> ApiResult {
        let action = CLOCK_PUT_ACTION;
        self.vm_or_404(action)?;
        // An armed body runs without the full probe (a scratch VM, ms).
        let probed = match body.arm {
            Some(_) => None,
            None => self.probed().cloned(),
        };
        let Owner::Owned(vm) = &mut self.owner else {
            return Err(ApiFailure::api(500, action, "VM is not running"));
        };
        let mode = match &probed {
            Some(p) => clockapi::PutMode::Probed(p),
            None => clockapi::PutMode::Armed,
        };
        let reply = clockapi::put(vm, mode, body, self.opts.fault_put).map_err(clock_failure)?;
        let json = serde_json::to_string(&reply).map_err(|e| ApiFailure::api(500, action, e))?;
        Ok(Response::json(200, json))
    }
}

fn chain(action: &str, middle: &str, e: &VmError) -> ApiFailure {
    ApiFailure {
        status: 500,
        chain: vec![
            "Error from API".into(),
            action.into(),
            middle.into(),
            e.to_string(),
        ],
        clock: None,
    }
}

/// The migration worker: pause if running (the baseline's pause), send the
/// state and memory, wait for the destination. On failure a VM that was
/// running is resumed.
fn send_vm(
    vm: &mut Vm,
    endpoint: &migration::Endpoint,
    local: bool,
    delay: std::time::Duration,
) -> Result<(), String> {
    let was_running = vm.state() == VmState::Running;
    if was_running {
        vm.pause().map_err(|e| e.to_string())?;
    }
    let result = (|| -> Result<(), String> {
        let mut snapshot = vm.snapshot_state().map_err(|e| e.to_string())?;
        snapshot.paused = !was_running;
        std::thread::sleep(delay);
        let header = Header {
            snapshot,
            memory: if local {
                MemoryTransfer::Fd
            } else {
                MemoryTransfer::Inline
            },
        };
        let mut channel = Channel::connect(endpoint).map_err(|e| e.to_string())?;
        let ram = vm.ram();
        channel
            .send(&header, Some(ram.fd()), &mut |w| ram.save_to(w))
            .map_err(|e| e.to_string())
    })();
    if result.is_err() && was_running {
        let _ = vm.resume();
    }
    result
}

/// Serves the API on `socket` until vmm.shutdown or a completed outgoing
/// migration. One request at a time, as Cloud Hypervisor.
pub fn serve(vmm: &mut Vmm, socket: &Path) -> std::io::Result<i32> {
    use std::os::unix::net::UnixListener;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    loop {
        vmm.poll_migration();
        if let Some(code) = vmm.exit_code {
            let _ = std::fs::remove_file(socket);
            return Ok(code);
        }
        if !wait_readable(&listener, 50) {
            continue;
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false)?;
                let timeout = Some(std::time::Duration::from_secs(10));
                stream.set_read_timeout(timeout)?;
                stream.set_write_timeout(timeout)?;
                let response = match crate::http::read_request(&mut stream) {
                    Ok(req) => vmm.handle(&req),
                    Err(crate::http::HttpError::Io(_)) => continue,
                    Err(crate::http::HttpError::TooLarge(_)) => Response {
                        status: 413,
                        body: None,
                    },
                    Err(e) => Response::error(400, &[e.to_string()]),
                };
                let _ = std::io::Write::write_all(&mut stream, &response.to_bytes());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits up to `timeout_ms` for a connection on `listener`.
fn wait_readable(listener: &std::os::unix::net::UnixListener, timeout_ms: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}

/// An armed clock in the request replaces the baseline's restore-time
/// clock handling (run later only if the armed clock does not apply).
fn restore_clock(clock: Option<&ClockPut>) -> RestoreClock {
    match clock {
        Some(_) => RestoreClock::Deferred,
        None => RestoreClock::Baseline,
    }
}

/// `f()` and how long it took, ns.
fn timed<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let t = std::time::Instant::now();
    let v = f();
    (v, crate::stamp::elapsed_ns(t))
}
