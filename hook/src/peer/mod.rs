//! The inter-host TAI offset, measured at migration time: an NTP-style
//! estimator ([`estimate`]) and, over TCP, an exchange authenticated with
//! the sidecar key ([`wire`], [`client`], [`server`]) that can also carry
//! the sealed sidecar to the destination. See docs/offset-exchange.md.
//!
//! The source (`clockcarry capture --peer`) is the client, the destination
//! (`clockcarry serve`) the server. Every read and write is bounded by a
//! timeout and every line by a size; every failure is a [`PeerError`]
//! naming what failed.

pub mod client;
pub mod estimate;
pub mod sched;
pub mod server;
pub mod wire;

use std::io;
use std::path::PathBuf;

pub use client::{ClientOptions, PeerClient, RoundPlan};
pub use estimate::{estimate, Estimate, EstimateError, Sample, SampleError};
pub use server::{serve_one, ServerOptions, SessionReport, StoredSidecar};

use crate::fsio::FileError;
use crate::host::HostError;
use crate::sidecar::SidecarError;

/// Why an exchange failed. Each message names the cause.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("no connection to {addr} within {after_ms} ms")]
    ConnectTimeout { addr: String, after_ms: u64 },
    #[error("no answer within {after_ms} ms (waiting for {waiting_for})")]
    Timeout {
        waiting_for: &'static str,
        after_ms: u64,
    },
    #[error("the peer closed the connection (waiting for {waiting_for})")]
    Closed { waiting_for: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a message is longer than the limit of {max_bytes} bytes")]
    TooLong { max_bytes: usize },
    #[error("a message is not a protocol message: {reason}")]
    Malformed { reason: String },
    #[error("a message speaks protocol version {got}; this clockcarry speaks version 1")]
    Version { got: u32 },
    #[error(
        "a message is labelled {got:?}, expected {expected:?}: a message reflected back or \
         meant for the other side"
    )]
    Direction { got: String, expected: &'static str },
    #[error(
        "a message belongs to another session (its `{field}` is not this session's): replayed \
         from an earlier exchange"
    )]
    OtherSession { field: &'static str },
    #[error(
        "the two hosts use different keys: this side's key id is {}, the peer's {}",
        ours.as_deref().unwrap_or("none (no key)"),
        theirs.as_deref().unwrap_or("none (no key)")
    )]
    KeyMismatch {
        ours: Option<String>,
        theirs: Option<String>,
    },
    #[error("the {kind} message carries no MAC, but this side has a key: unauthenticated")]
    MacMissing { kind: &'static str },
    #[error(
        "the MAC of the {kind} message (seq {seq}) does not verify: the message was altered in \
         transit, or sealed with another key"
    )]
    MacMismatch { kind: &'static str, seq: u64 },
    #[error(
        "message seq {got}, expected {expected}: a replayed, duplicated, reordered or dropped \
         message"
    )]
    Sequence { expected: u64, got: u64 },
    #[error("expected a {expected} message, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the peer refused: {message}{}", if *authenticated { "" } else { " (unauthenticated message, as received)" })]
    PeerRefused {
        message: String,
        authenticated: bool,
    },
    #[error("{reason}")]
    Protocol { reason: String },
    #[error("the offset estimate: {0}")]
    Estimate(#[from] EstimateError),
    #[error("reading this host's clock: {0}")]
    Clock(#[from] HostError),
    #[error("the sidecar received for VM {vm_id:?}: {source}")]
    SidecarRefused {
        vm_id: String,
        #[source]
        source: SidecarError,
    },
    #[error("the sidecar received: VM id {vm_id:?} cannot name a file: {reason}")]
    VmId { vm_id: String, reason: String },
    #[error("the sidecar received is for VM {sidecar:?}, but the message names VM {message:?}")]
    VmMismatch { sidecar: String, message: String },
    #[error("this server does not accept sidecars")]
    SidecarsNotAccepted,
    #[error("writing the sidecar {}: {source}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: FileError,
    },
}
