//! clockcarry: keep a KVM guest's clock continuous across pause/resume,
//! live update, live migration and snapshot/restore.
//!
//! Three layers, each usable alone:
//! - model and planner (pure, no I/O): [`model`], [`pvclock`], [`plan`],
//!   [`sidecar`], and the [`sim`] of hosts and KVM used to prove the planner;
//!   [`hostconf`], the host configuration that makes sidecar keys mandatory;
//!   [`armed`], the same plan made before the blackout for the VMM to apply;
//! - [`host`]: CLOCK_TAI, adjtimex, (TSC, TAI) brackets, host identity;
//! - [`peer`]: the inter-host TAI offset measured over TCP (estimator,
//!   authenticated exchange, the sidecar carried to the destination);
//! - [`qmp`] (feature `qmp`): QEMU's monitor protocol and the guest-clock
//!   commands of the qemu-patch series;
//! - `kvm` (feature `kvm`): capture and apply on kvm-ioctls file descriptors.
//!
//! A VMM links this crate with `default-features = false` (plus `kvm`): no
//! CLI or HTTP dependency comes along.

#[cfg(feature = "http")]
pub mod api;
pub mod armed;
pub mod fsio;
pub mod host;
pub mod hostconf;
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
pub mod model;
pub mod peer;
pub mod plan;
pub mod pvclock;
#[cfg(feature = "qmp")]
pub mod qmp;
pub mod request;
pub mod sidecar;
pub mod timefmt;
#[cfg(any(feature = "http", feature = "qmp"))]
mod unixsock;
pub mod validate;
pub mod vmclock_api;

pub use plan::{plan, Destination, ErrorBound, KvmClockAction, Plan, PlanError, PlanMode};

pub use model::*;
