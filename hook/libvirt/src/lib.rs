//! The libvirt QEMU hook (feature `libvirt`).
//!
//! QEMU offers no outside control of a guest's TSC or kvm-clock, and
//! libvirt's hooks fall where they fall (on an incoming migration all of
//! them run before the state arrives). So for QEMU domains clockcarry does
//! what a hook can: it follows each domain through the hook sequence, and
//! when a guest comes back from a blackout (restore, managedsave start,
//! incoming migration, snapshot revert) it starts a detached helper that
//! sets the guest's wall clock from host time through qemu-guest-agent as
//! soon as the guest runs, and writes a report saying what was done and that
//! the TSC and kvm-clock were not preserved.
//!
//! Entry points:
//! - [`hook_main`]: what libvirt runs (`NAME OP SUBOP EXTRA`, domain XML on
//!   stdin). Never prints anything (libvirt reads stdout as replacement XML
//!   for `migrate begin` and `restore begin`; empty keeps it) and never
//!   fails a domain operation because of clockcarry: it exits 0 except for
//!   a malformed command line (exit 2), which libvirt never produces.
//! - [`resync_main`]: the helper, re-executed with [`RESYNC_ARG`].
//! - [`install`] / [`uninstall`].
//! - [`dispatch`]: for `main`, selects the hook or the helper from argv.
//!
//! Per-domain opt-in: `<metadata><clockcarry:clock
//! xmlns:clockcarry="https://clockcarry.dev/libvirt/1" policy="resync"/>`;
//! host default in `/etc/clockcarry/libvirt.conf` (`policy = off|resync`).
//! See docs/libvirt.md.

pub mod args;
mod command;
pub mod config;
pub mod domain_xml;
mod install;
pub mod report;
pub mod resync;
pub mod spawn;
pub mod state;

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use args::{DomainName, DomainUuid, HookArgs, Op, SubOp};
pub use command::{command_main, USAGE};
pub use config::{Config, Policy, SetMethod};
pub use domain_xml::{parse_domain_xml, DomainInfo};
pub use install::{InstallMode, InstallOptions, InstallOutcome, DEFAULT_HOOKS_DIR, HOOK_NAME};
pub use report::ResyncReport;
pub use resync::ResyncRequest;
pub use state::{Classification, DomainState, QemuCmdline, Trigger};

/// The hidden first argument that makes the binary the resync helper.
pub const RESYNC_ARG: &str = "__clockcarry-libvirt-resync";

/// Exit status for a malformed command line.
pub const EXIT_USAGE: i32 = 2;

/// Everything that can go wrong in the libvirt hook.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("domain name {name:?} refused: {why}")]
    BadName { name: String, why: &'static str },
    #[error("domain UUID {uuid:?} is not a UUID")]
    BadUuid { uuid: String },
    #[error("{0}")]
    Xml(String),
    #[error("{}:{line}: {message}", path.display())]
    Config {
        path: PathBuf,
        line: u32,
        message: String,
    },
    #[error("state: {0}")]
    State(String),
    #[error("install: {0}")]
    Install(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LibvirtError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> LibvirtError {
        LibvirtError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How the hook starts the resync helper.
#[derive(Clone, Debug)]
pub enum Launcher {
    /// Double fork + setsid + exec of `exe RESYNC_ARG ...`.
    Detached { exe: PathBuf },
    /// Record the requests instead (tests).
    Record(Arc<Mutex<Vec<ResyncRequest>>>),
    /// Start nothing; the reason is logged.
    Disabled(String),
}

/// Where the hook finds its configuration and keeps its state.
#[derive(Clone, Debug)]
pub struct HookEnv {
    /// Default [`config::config_path`]: `$CLOCKCARRY_LIBVIRT_CONFIG`, else
    /// [`config::DEFAULT_CONFIG_PATH`].
    pub config_path: PathBuf,
    /// Default [`state::state_dir`]: `$CLOCKCARRY_RUN_DIR/libvirt`, else
    /// [`state::DEFAULT_STATE_DIR`].
    pub state_dir: PathBuf,
    /// Where `PID/cmdline` is read; default `/proc`.
    pub proc_root: PathBuf,
    pub launcher: Launcher,
}

impl HookEnv {
    /// The installed hook's environment: the configuration and state
    /// paths from [`config::config_path`] and [`state::state_dir`] (the
    /// defaults unless `CLOCKCARRY_LIBVIRT_CONFIG` / `CLOCKCARRY_RUN_DIR`
    /// say otherwise), helper = this executable.
    pub fn system() -> HookEnv {
        let launcher = match std::env::current_exe() {
            Ok(exe) => Launcher::Detached { exe },
            Err(e) => Launcher::Disabled(format!("cannot find the running executable: {e}")),
        };
        HookEnv {
            config_path: config::config_path(),
            state_dir: state::state_dir(),
            proc_root: PathBuf::from("/proc"),
            launcher,
        }
    }
}

/// CLOCK_REALTIME in ns (0 if the clock cannot be read).
pub(crate) fn now_ns() -> u64 {
    clockcarry::host::realtime_now_ns().unwrap_or(0)
}

/// The hook: `argv` holds the arguments after the program name (`NAME OP
/// SUBOP EXTRA`), `stdin` the domain XML. Returns the exit status: 0, or
/// [`EXIT_USAGE`] for a malformed command line. Writes nothing to stdout.
pub fn hook_main(argv: &[OsString], stdin: &mut dyn Read, env: &HookEnv) -> i32 {
    let args = match HookArgs::parse(argv) {
        Ok(a) => a,
        Err(LibvirtError::Usage(m)) => {
            eprintln!("clockcarry libvirt hook: {m}");
            return EXIT_USAGE;
        }
        Err(e) => {
            // A name libvirt accepted but we do not: leave the domain alone.
            eprintln!("clockcarry libvirt hook: {e}; doing nothing");
            log_best_effort(env, &format!("hook: {e}; doing nothing"));
            return 0;
        }
    };
    match run_hook(&args, stdin, env) {
        Ok(()) => 0,
        Err(e) => {
            let line = format!(
                "hook {} {} {}: {e}; doing nothing",
                args.name,
                args.op.as_str(),
                args.subop.as_str()
            );
            eprintln!("clockcarry libvirt {line}");
            log_best_effort(env, &line);
            0
        }
    }
}

fn log_best_effort(env: &HookEnv, line: &str) {
    if let Ok(dir) = state::StateDir::open(&env.state_dir) {
        dir.log(line);
    }
}

fn run_hook(args: &HookArgs, stdin: &mut dyn Read, env: &HookEnv) -> Result<(), LibvirtError> {
    // Read (and so drain) the XML first, whatever the operation.
    let xml = domain_xml::read_xml(stdin)?;
    if xml.trim().is_empty() {
        // libvirt always sends the XML: someone ran the hook by hand.
        return Err(LibvirtError::Xml("no domain XML on stdin".into()));
    }
    let relevant = matches!(
        (&args.op, &args.subop),
        (Op::Migrate, SubOp::Begin)
            | (Op::Restore, SubOp::Begin)
            | (Op::Started, SubOp::Begin)
            | (Op::Stopped, SubOp::End)
            | (Op::Release, SubOp::End)
    );
    if !relevant {
        return Ok(());
    }
    let info = parse_domain_xml(&xml)?;
    if info.name != args.name {
        return Err(LibvirtError::Xml(format!(
            "the XML names domain {}, the arguments {}",
            info.name, args.name
        )));
    }
    let cfg = Config::load(&env.config_path)?;
    let policy = info.policy.unwrap_or(cfg.policy);
    if policy == Policy::Off {
        return Ok(());
    }
    let dir = state::StateDir::open(&env.state_dir)?;
    let mut st = match dir.load(&info.uuid) {
        Ok(Some(s)) => s,
        Ok(None) => DomainState::new(&info.uuid, &info.name),
        Err(e) => {
            dir.log(&format!("{}: {e}; starting afresh", info.uuid));
            DomainState::new(&info.uuid, &info.name)
        }
    };
    st.name = info.name.as_str().to_owned();
    let now = now_ns();
    let event = format!(
        "{} {} {}",
        args.op.as_str(),
        args.subop.as_str(),
        args.extra.as_deref().unwrap_or("-")
    );
    st.last_event = Some(event.clone());
    let mut note = String::new();
    match (&args.op, &args.subop) {
        (Op::Migrate, SubOp::Begin) => {
            st.pending = Some(state::Pending {
                kind: state::PendingKind::Migrate,
                at_ns: now,
            })
        }
        (Op::Restore, SubOp::Begin) => {
            st.pending = Some(state::Pending {
                kind: state::PendingKind::Restore,
                at_ns: now,
            })
        }
        (Op::Stopped, SubOp::End) => {
            st.pending = None;
            st.last_stop_ns = Some(now);
            note = stop_helper(&mut st);
        }
        (Op::Release, SubOp::End) => {
            st.last_release_reason = args.extra.clone();
            note = stop_helper(&mut st);
        }
        (Op::Started, SubOp::Begin) => {
            let cmdline = state::read_qemu_cmdline(&cfg.qemu_run_dir, &env.proc_root, &info.name);
            let c = state::classify(&st, cmdline.as_ref(), &info.uuid, now);
            st.pending = None;
            note = format!(": {}", c.basis);
            if let Some(trigger) = c.trigger {
                let req = ResyncRequest {
                    uuid: info.uuid.clone(),
                    name: info.name.clone(),
                    trigger,
                    started_at_ns: now,
                    blackout_lower_bound_ns: c.blackout_lower_bound_ns,
                    generation: now,
                    config_path: absolute(&env.config_path),
                    state_dir: absolute(&env.state_dir),
                };
                st.resync = Some(state::ResyncRecord {
                    generation: req.generation,
                    trigger,
                    launched_at_ns: now,
                });
                // The record goes to disk before the helper can look at it.
                dir.store(&st)?;
                note.push_str(&format!("; {}: ", trigger.as_str()));
                note.push_str(&launch(&env.launcher, &req));
            }
        }
        _ => {}
    }
    dir.store(&st)?;
    dir.log(&format!("hook {} {} {event}{note}", info.uuid, info.name));
    Ok(())
}

/// The domain is down: a resync helper still waiting for it has nothing
/// left to do. Clearing the record is what tells it so (it reads the state
/// before every poll, [`resync::standing_in`]). Returns the log note.
fn stop_helper(st: &mut DomainState) -> String {
    match st.resync.take() {
        Some(r) => format!(": resync helper (generation {}) told to stop", r.generation),
        None => String::new(),
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn launch(launcher: &Launcher, req: &ResyncRequest) -> String {
    match launcher {
        Launcher::Detached { exe } => {
            let mut args: Vec<OsString> = vec![RESYNC_ARG.into()];
            args.extend(req.to_args());
            match spawn::spawn_detached(exe, &args) {
                Ok(()) => format!("resync helper started ({})", exe.display()),
                Err(e) => format!("starting the resync helper failed: {e}"),
            }
        }
        Launcher::Record(list) => match list.lock() {
            Ok(mut v) => {
                v.push(req.clone());
                "resync recorded".to_owned()
            }
            Err(_) => "resync record lock poisoned".to_owned(),
        },
        Launcher::Disabled(why) => format!("resync helper not started: {why}"),
    }
}

/// The resync helper: `args` are the arguments after [`RESYNC_ARG`].
/// Returns 0 when the guest clock was set, 1 when it could not be (the
/// report says why), 2 for malformed arguments.
pub fn resync_main(args: &[OsString]) -> i32 {
    match resync::helper(args) {
        Ok(code) => code,
        Err(LibvirtError::Usage(m)) => {
            eprintln!("clockcarry: {m}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("clockcarry libvirt resync: {e}");
            1
        }
    }
}

/// Places the hook (see [`InstallOptions`]).
pub fn install(opts: &InstallOptions) -> Result<InstallOutcome, LibvirtError> {
    install::install(opts)
}

/// Removes the hook (see [`InstallOptions`]).
pub fn uninstall(opts: &InstallOptions) -> Result<InstallOutcome, LibvirtError> {
    install::uninstall(opts)
}

/// Whether `argv0` is a libvirt hook path: `.../hooks/qemu.d/ANY` or
/// `.../hooks/qemu` (libvirt runs hooks by absolute path).
pub fn is_hook_invocation(argv0: &std::ffi::OsStr) -> bool {
    let path = Path::new(argv0);
    let parent = path.parent();
    let parent_name = parent.and_then(Path::file_name);
    let grandparent_name = parent.and_then(Path::parent).and_then(Path::file_name);
    match (path.file_name(), parent_name, grandparent_name) {
        (Some(_), Some(p), Some(g)) if p == "qemu.d" && g == "hooks" => true,
        (Some(f), Some(p), _) if f == "qemu" && p == "hooks" => true,
        _ => false,
    }
}

/// For `main`, before any other argument parsing: runs the helper when
/// `argv[1]` is [`RESYNC_ARG`], or the hook when the program was run as a
/// libvirt hook ([`is_hook_invocation`]), and returns its exit status;
/// `None` otherwise. `argv` is the full command line, program name first.
pub fn dispatch(argv: &[OsString]) -> Option<i32> {
    let argv0 = argv.first()?;
    if argv.get(1).is_some_and(|a| a == RESYNC_ARG) {
        return Some(resync_main(&argv[2..]));
    }
    if is_hook_invocation(argv0) {
        let env = HookEnv::system();
        return Some(hook_main(&argv[1..], &mut std::io::stdin().lock(), &env));
    }
    None
}
