//! Exit codes and the one error type every subcommand returns.

use std::fmt;
use std::process::ExitCode;

/// The exit statuses of `clockcarry`, documented in docs/cli.md and in every
/// subcommand's `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Done (for `check`: the host is ready).
    Ok = 0,
    /// Internal failure: the host's clocks or identity could not be read,
    /// or an output could not be written.
    Internal = 1,
    /// Bad input: command line, sidecar (unreadable, corrupt, altered, wrong
    /// key, another VM's), destination file, key file.
    BadInput = 2,
    /// Refused by policy: VM not paused, sidecar too old, clocks not
    /// synchronised or too imprecise, TSC rate the host cannot run, capture
    /// in the future. The VM was not touched.
    Refused = 3,
    /// VMM / API error: socket missing, permission denied, no answer, the
    /// VMM refused the request or answered something unacceptable. The VM
    /// was not changed.
    Vmm = 4,
    /// The apply failed and the previous TSC offsets are back in place.
    RolledBack = 5,
    /// The apply's outcome is unknown (no answer to the PUT, or a
    /// verification and rollback that failed): do not resume the VM.
    Unknown = 6,
    /// `check`: the host is not ready (at least one check failed).
    NotReady = 7,
    /// Another clockcarry operation on the same VM holds its lock; nothing
    /// was sent to the VM. Retry once that one has finished.
    Busy = 8,
    /// `restore --enforce-kvmclock-error`: applied and verified, but
    /// kvm-clock missed the target; resuming is safe.
    Degraded = 9,
    /// `capture --peer` / `serve`: the offset exchange with the other host
    /// failed (unreachable, no answer within the timeout, refused, not
    /// authenticated, the sidecar refused there). `capture` wrote nothing
    /// unless the message says so.
    Peer = 10,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// A short name used in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Internal => "internal",
            Exit::BadInput => "bad_input",
            Exit::Refused => "refused",
            Exit::Vmm => "vmm_error",
            Exit::RolledBack => "rolled_back",
            Exit::Unknown => "unknown_state",
            Exit::NotReady => "not_ready",
            Exit::Busy => "busy",
            Exit::Degraded => "applied_degraded",
            Exit::Peer => "peer_error",
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// The text of the EXIT STATUS section shared by every `--help`.
pub const EXIT_STATUS_HELP: &str = "\
EXIT STATUS
    0  done (check: the host is ready)
    1  internal failure: host clocks or identity unreadable, output not written
    2  bad input: arguments, sidecar (corrupt, altered, wrong key, other VM), files
    3  refused by policy: VM not paused, sidecar too old, clocks unsynchronised
       or too imprecise, TSC rate mismatch; the VM was not touched
    4  VMM/API error: socket missing, permission denied, no answer, the VMM
       refused the request; the VM was not changed
    5  apply failed; the previous offsets are back in place
    6  apply outcome unknown: do not resume the VM
    7  check: the host is not ready
    8  busy: another capture or restore of this VM is running; nothing was
       sent to the VM
    9  restore --enforce-kvmclock-error: applied, but kvm-clock missed the
       target (precision degraded); resuming is safe
   10  capture --peer, serve: the offset exchange with the other host failed
       (unreachable, timeout, refused, not authenticated)";

/// A failure of a subcommand: the exit status and what to tell the operator.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    /// Why, or how to fix the cause: printed after the message.
    pub hint: Option<String>,
    /// What to do with the VM now: printed on its own line after the hint.
    pub next: Option<String>,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        CliError {
            exit,
            message: message.into(),
            hint: None,
            next: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> CliError {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_next(mut self, next: impl Into<String>) -> CliError {
        self.next = Some(next.into());
        self
    }

    pub fn bad_input(message: impl Into<String>) -> CliError {
        CliError::new(Exit::BadInput, message)
    }

    pub fn internal(message: impl Into<String>) -> CliError {
        CliError::new(Exit::Internal, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        if let Some(next) = &self.next {
            write!(f, "\n  next: {next}")?;
        }
        Ok(())
    }
}

pub type CliResult<T> = Result<T, CliError>;
