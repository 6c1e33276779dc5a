//! The `clockcarry` command line: argument parsing, subcommands, report
//! printing, logging and exit codes. See docs/cli.md.

mod arm;
mod bench;
mod capture;
mod check;
mod common;
mod exit;
mod hostinfo;
mod inspect;
mod lock;
mod logger;
mod metrics;
mod offline;
mod report;
mod restore;
mod serve;
mod units;
mod vmm;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use log::LevelFilter;

pub use exit::{CliError, Exit};

use exit::EXIT_STATUS_HELP;

const ABOUT: &str =
    "Keep a KVM guest's clocks (TSC and kvm-clock) continuous across pause/resume, \
live update, live migration and snapshot/restore";

const LONG_ABOUT: &str = "\
Keep a KVM guest's clocks (TSC and kvm-clock) continuous across pause/resume,
live update, live migration and snapshot/restore.

DESCRIPTION
    Before the VM pauses on the source, `clockcarry capture` reads the VM's clock
    through the VMM's vm.clock API and writes it, with this host's (TSC, TAI)
    instant, to a sidecar file. On the destination, once the VM state is
    restored and before any vCPU runs, `clockcarry restore` plans new TSC
    offsets and the kvm-clock line from the sidecar and a fresh measurement,
    applies them with one PUT, verifies them and reports what it did.
    `plan`, `inspect` and `check` help rehearse and diagnose;
    `bench-restore` measures the blackout `restore` adds. `arm` plans the
    restore on the destination before the blackout, for a VMM that applies
    it itself before the first vCPU run (docs/armed.md). `serve` on the
    destination answers `capture --peer`: it measures the two hosts' TAI
    offset into the sidecar and can receive the sidecar itself.

    Logs go to stderr on a terminal and to syslog (/dev/log) otherwise.";

fn after_help_main() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    Live migration with Cloud Hypervisor (the receive first: it waits for the sender):
        clockcarry capture --api-socket /run/ch.sock --vm web-1 -o /shared/web-1.json
        ch-remote --api-socket /run/ch-dst.sock receive-migration ...,resume=false &
        ch-remote --api-socket /run/ch.sock send-migration ...
        clockcarry restore --api-socket /run/ch-dst.sock -i /shared/web-1.json --vm web-1
        ch-remote --api-socket /run/ch-dst.sock resume

SEE ALSO
    docs/cli.md, docs/runbooks.md, docs/design.md, docs/sidecar.md"
    )
}

/// Global options.
#[derive(Parser, Debug)]
#[command(
    name = "clockcarry",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = after_help_main(),
    propagate_version = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Logging")]
    verbose: u8,
    /// Errors only: no log below error, and no human report on stdout from
    /// capture, restore and arm (--json output is still printed).
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Logging"
    )]
    quiet: bool,
    /// Where logs go: auto = stderr on a terminal, else syslog (/dev/log), else stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = logger::LogTarget::Auto,
        value_name = "TARGET",
        help_heading = "Logging"
    )]
    log_target: logger::LogTarget,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Capture(capture::CaptureArgs),
    Restore(restore::RestoreArgs),
    Arm(arm::ArmArgs),
    Plan(offline::PlanArgs),
    Inspect(inspect::InspectArgs),
    Check(check::CheckArgs),
    BenchRestore(bench::BenchArgs),
    Serve(serve::ServeArgs),
    /// The libvirt QEMU hook: install | uninstall | hook | resync (see docs/libvirt.md).
    #[command(disable_help_flag = true)]
    Libvirt {
        /// `install [--hooks-dir DIR] [--symlink] [--force] [--config PATH]`,
        /// `uninstall`, `hook NAME OP SUBOP EXTRA`, `help`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
}

/// How to reach the VMM: Cloud Hypervisor's API socket or QEMU's QMP
/// socket (QEMU with the qemu-patch series), exactly one of them.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// The VMM's API socket (Cloud Hypervisor's --api-socket).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "qmp_socket",
        conflicts_with = "qmp_socket"
    )]
    pub api_socket: Option<PathBuf>,
    /// QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off), for a QEMU
    /// built with qemu-patch/ (a stock QEMU is refused, naming the missing
    /// command).
    #[arg(long, value_name = "PATH")]
    pub qmp_socket: Option<PathBuf>,
    /// Give up connecting after this long.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_dur)]
    pub connect_timeout: u64,
    /// Give up on a request (connect, send, answer) after this long.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_dur)]
    pub api_timeout: u64,
}

impl ApiArgs {
    /// The socket given, whichever kind: what the per-VM lock and the
    /// reports are keyed on.
    pub fn socket(&self) -> &std::path::Path {
        match (&self.api_socket, &self.qmp_socket) {
            (Some(p), _) | (None, Some(p)) => p,
            // clap requires one of the two.
            (None, None) => std::path::Path::new(""),
        }
    }

    /// The client of the VMM given.
    pub fn vmm(&self) -> vmm::Vmm {
        let connect_timeout = std::time::Duration::from_nanos(self.connect_timeout);
        let request_timeout = std::time::Duration::from_nanos(self.api_timeout);
        match &self.qmp_socket {
            Some(path) => vmm::Vmm::qmp(
                path,
                clockcarry::qmp::QmpOptions {
                    connect_timeout,
                    command_timeout: request_timeout,
                    ..clockcarry::qmp::QmpOptions::default()
                },
            ),
            None => vmm::Vmm::Api(self.client()),
        }
    }

    /// The Cloud Hypervisor API client (`--api-socket`).
    pub fn client(&self) -> clockcarry::api::ApiClient {
        let options = clockcarry::api::ApiOptions {
            connect_timeout: std::time::Duration::from_nanos(self.connect_timeout),
            request_timeout: std::time::Duration::from_nanos(self.api_timeout),
        };
        clockcarry::api::ApiClient::new(self.socket(), options)
    }
}

/// Clock policy on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// The guest's clocks count through the blackout (elapsed TAI time).
    KeepRunning,
    /// The guest's clocks resume from their capture values.
    Freeze,
}

/// What to do when the restore cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailureArg {
    /// Tell the operator not to resume the VM.
    Abort,
    /// Leave the VMM's own clock handling in effect (resuming is safe).
    VmmDefault,
}

/// The restore policy knobs.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// keep-running: the guest TSC and kvm-clock count through the blackout;
    /// freeze: they resume from their capture values.
    #[arg(long, value_enum, default_value_t = PolicyArg::KeepRunning, value_name = "POLICY")]
    pub policy: PolicyArg,
    /// Refuse a sidecar older than this (TAI time since capture), e.g. 10m.
    #[arg(long, value_name = "DUR", value_parser = parse_dur)]
    pub max_elapsed: Option<u64>,
    /// Refuse unless both hosts' clocks are synchronised (adjtimex), when
    /// the plan uses them (cross-host, keep-running).
    #[arg(long)]
    pub require_sync: bool,
    /// Refuse when a host's maxerror, or the plan's total error bound,
    /// exceeds this (cross-host, keep-running), e.g. 5ms.
    #[arg(long, value_name = "DUR", value_parser = parse_dur)]
    pub max_clock_error: Option<u64>,
    /// The kvm-clock error the VMM's KVM_SET_CLOCK loop aims for.
    #[arg(long, value_name = "DUR", default_value = "50ns", value_parser = parse_dur)]
    pub max_kvmclock_error: u64,
    /// abort: on failure, say not to resume; vmm-default: on failure, the
    /// VMM's default clock handling stays in effect (resume is safe).
    #[arg(long, value_enum, default_value_t = OnFailureArg::Abort, value_name = "WHAT")]
    pub on_failure: OnFailureArg,
    /// Plan without checking the sidecar against the VM's own restored
    /// state (its kvm-clock line in memory, its TSC): only for a sidecar you
    /// know is this VM's, on a VMM that does not load the VM's state.
    #[arg(long)]
    pub skip_vm_check: bool,
    /// How fast two synchronised hosts' clocks may drift apart, in ppm: the
    /// bound of a measured offset (capture --peer) grows by this much of the
    /// time from the measurement to the restore. 0 to 10000.
    #[arg(long, value_name = "PPM", default_value_t = clockcarry::model::DEFAULT_OFFSET_DRIFT_PPM,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub offset_drift_ppm: u32,
    /// Without a measured offset (capture --peer), how far apart the two
    /// hosts' clocks may be beyond their adjtimex maxerrors: added to a
    /// cross-host plan's error bound between two clocks (another host or
    /// another boot); 0s trusts the hosts' claims.
    #[arg(long, value_name = "DUR", default_value = "128ms", value_parser = parse_dur)]
    pub unmeasured_offset: u64,
}

impl PolicyArgs {
    pub fn policy(&self) -> clockcarry::model::Policy {
        use clockcarry::model::{ClockPolicy, OnFailure, Policy};
        Policy {
            clock: match self.policy {
                PolicyArg::KeepRunning => ClockPolicy::KeepRunning,
                PolicyArg::Freeze => ClockPolicy::Freeze,
            },
            max_elapsed_ns: self.max_elapsed,
            require_sync: self.require_sync,
            max_clock_error_ns: self.max_clock_error,
            on_failure: match self.on_failure {
                OnFailureArg::Abort => OnFailure::Abort,
                OnFailureArg::VmmDefault => OnFailure::VmmDefault,
            },
            max_kvmclock_error_ns: self.max_kvmclock_error,
            verify_vm_state: !self.skip_vm_check,
            offset_drift_ppm: self.offset_drift_ppm,
            unmeasured_offset_ns: self.unmeasured_offset,
            ..Policy::default()
        }
    }

    /// The same options as command-line words (for re-executing restore).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--policy".to_string(),
            match self.policy {
                PolicyArg::KeepRunning => "keep-running",
                PolicyArg::Freeze => "freeze",
            }
            .to_string(),
            "--max-kvmclock-error".to_string(),
            format!("{}ns", self.max_kvmclock_error),
            "--on-failure".to_string(),
            match self.on_failure {
                OnFailureArg::Abort => "abort",
                OnFailureArg::VmmDefault => "vmm-default",
            }
            .to_string(),
        ];
        if let Some(ns) = self.max_elapsed {
            v.push("--max-elapsed".into());
            v.push(format!("{ns}ns"));
        }
        if self.require_sync {
            v.push("--require-sync".into());
        }
        if let Some(ns) = self.max_clock_error {
            v.push("--max-clock-error".into());
            v.push(format!("{ns}ns"));
        }
        if self.skip_vm_check {
            v.push("--skip-vm-check".into());
        }
        v.push("--offset-drift-ppm".into());
        v.push(self.offset_drift_ppm.to_string());
        v.push("--unmeasured-offset".into());
        v.push(format!("{}ns", self.unmeasured_offset));
        v
    }
}

fn parse_dur(s: &str) -> Result<u64, String> {
    units::parse_duration_ns(s)
}

/// When `run` was entered: (monotonic instant, CLOCK_MONOTONIC_RAW ns).
static STARTED: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();

/// The instant the command line started being handled (before parsing).
pub fn started() -> (std::time::Instant, u64) {
    *STARTED.get_or_init(|| {
        (
            std::time::Instant::now(),
            clockcarry::host::monotonic_raw_now_ns().unwrap_or(0),
        )
    })
}

/// Runs the `clockcarry` command on `args` (argv, program name first).
pub fn run(args: Vec<OsString>) -> ExitCode {
    let _ = started();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => Exit::Ok,
                _ => Exit::BadInput,
            };
            // Printing help to a closed pipe must not panic.
            let _ = e.print();
            if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                return Exit::BadInput.into();
            }
            return code.into();
        }
    };
    let level = if cli.quiet {
        LevelFilter::Error
    } else {
        match cli.verbose {
            0 => LevelFilter::Info,
            1 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        }
    };
    logger::init(level, cli.log_target);
    common::set_quiet(cli.quiet);
    let operation = match &cli.command {
        Command::Capture(_) => Some("capture"),
        Command::Restore(_) => Some("restore"),
        Command::Arm(_) => Some("arm"),
        _ => None,
    };
    let result = match cli.command {
        Command::Capture(a) => capture::run(&a),
        Command::Restore(a) => restore::run(&a),
        Command::Arm(a) => arm::run(&a),
        Command::Plan(a) => offline::run(&a),
        Command::Inspect(a) => inspect::run(&a),
        Command::Check(a) => check::run(&a),
        Command::BenchRestore(a) => bench::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Libvirt { args } => return libvirt_command(&args),
    };
    if let Some(op) = operation {
        metrics::finish(op, result.as_ref().map_or_else(|e| e.exit, |x| *x));
    }
    match result {
        Ok(exit) => exit.into(),
        Err(err) => {
            report_error(&err);
            err.exit.into()
        }
    }
}

/// `clockcarry libvirt ...`: the libvirt module parses its own words.
fn libvirt_command(args: &[OsString]) -> ExitCode {
    let code = clockcarry_libvirt::command_main(args);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Prints a failure on stderr (always, with its hint on its own line) and
/// sends it to syslog when the logger writes there.
fn report_error(err: &CliError) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "clockcarry: error: {err}");
    log::error!(target: logger::SYSLOG_ONLY, "{err}");
}
