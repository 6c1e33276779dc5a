//! A QMP client (QEMU's monitor protocol: JSON objects over a Unix stream
//! socket), and the guest-clock commands of the qemu-patch series on top.
//!
//! Feature `qmp`. [`session`] is the protocol: the greeting, the
//! capabilities negotiation, commands matched to their answers by `id`,
//! asynchronous events set aside, and limits on everything QEMU sends (a
//! message's size, the events before an answer, the time). [`clock`] maps
//! `x-query-guest-clock` / `x-set-guest-clock` (docs/qemu.md) to the same
//! [`crate::model::VmClock`] and [`crate::vmclock_api::ClockPut`] the Cloud
//! Hypervisor API carries, and checks an answer exactly as a `GET vm.clock`
//! one is checked.
//!
//! Every failure is a [`QmpError`] that names the stage and what to do;
//! [`QmpError::request_sent`] tells whether QEMU may have seen a command.

pub mod clock;
pub mod session;

use std::path::PathBuf;
use std::time::Duration;

pub use session::{Greeting, QmpSession};

/// Largest message accepted from QEMU, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Most events accepted while waiting for one answer.
pub const DEFAULT_MAX_EVENTS: usize = 256;
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default budget for the greeting and for each command's answer.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmpOptions {
    pub connect_timeout: Duration,
    /// From sending a command (or connecting, for the greeting) to its
    /// answer's last byte.
    pub command_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_events: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_events: DEFAULT_MAX_EVENTS,
        }
    }
}

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "QMP socket {} does not exist: is QEMU running, with -qmp unix:{},server=on,wait=off?",
        path.display(), path.display()
    )]
    SocketMissing { path: PathBuf },
    #[error("permission denied on QMP socket {}: run clockcarry as root or as QEMU's user", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("{} is not a Unix socket: give QEMU's -qmp unix: path", path.display())]
    NotASocket { path: PathBuf },
    #[error("nobody listens on QMP socket {} (connection refused): QEMU has exited", path.display())]
    ConnectionRefused { path: PathBuf },
    #[error("QMP socket {}: cannot connect: {msg}", path.display())]
    Connect { path: PathBuf, msg: String },
    #[error("QMP {stage}: no answer within {timeout_ms} ms{}", busy_hint(*.greeting))]
    Timeout {
        stage: String,
        timeout_ms: u64,
        /// The wait was for the greeting: another client may hold the
        /// monitor (QEMU serves one client per QMP socket at a time).
        greeting: bool,
        request_sent: bool,
    },
    #[error("QMP {stage}: QEMU closed the connection")]
    Closed { stage: String, request_sent: bool },
    #[error("QMP {stage}: I/O error: {msg}")]
    Io {
        stage: String,
        msg: String,
        request_sent: bool,
    },
    #[error("QMP {stage}: unacceptable message from QEMU: {reason}")]
    Protocol {
        stage: String,
        reason: String,
        request_sent: bool,
    },
    #[error("QMP {command} failed ({class}): {desc}")]
    Command {
        command: String,
        /// QMP's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        desc: String,
    },
    #[error(
        "QEMU {version} has no QMP command {command}: it is a QEMU without the \
         qemu-patch series (qemu-patch/README.md), whose guest clock clockcarry cannot carry"
    )]
    MissingCommand { command: String, version: String },
    #[error("QMP {command}: unacceptable answer: {reason}")]
    BadAnswer { command: String, reason: String },
}

fn busy_hint(greeting: bool) -> &'static str {
    if greeting {
        " (QEMU serves one client per QMP socket: is another client connected?)"
    } else {
        ""
    }
}

impl QmpError {
    /// Whether QEMU may have received (and acted on) the command.
    pub fn request_sent(&self) -> bool {
        match self {
            QmpError::SocketMissing { .. }
            | QmpError::PermissionDenied { .. }
            | QmpError::NotASocket { .. }
            | QmpError::ConnectionRefused { .. }
            | QmpError::Connect { .. }
            | QmpError::MissingCommand { .. } => false,
            QmpError::Timeout { request_sent, .. }
            | QmpError::Closed { request_sent, .. }
            | QmpError::Io { request_sent, .. }
            | QmpError::Protocol { request_sent, .. } => *request_sent,
            QmpError::Command { .. } | QmpError::BadAnswer { .. } => true,
        }
    }

    /// QEMU answered the command (with an error or with something
    /// unacceptable), as opposed to a transport failure.
    pub fn answered(&self) -> bool {
        matches!(self, QmpError::Command { .. } | QmpError::BadAnswer { .. })
    }
}
