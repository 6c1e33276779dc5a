//! The vm.clock API's wire types, shared by the client (`api`, feature
//! `http`) and by any VMM implementing the endpoint. No HTTP dependency: a
//! VMM links these with `default-features = false`.
//!
//! - [`get`]: the `GET` answer ([`VmClockAnswer`]), its explicit conversion
//!   to the library's [`crate::model::VmClock`], and its checks
//!   ([`parse_vm_clock`]);
//! - [`put`]: the `PUT` body ([`ClockPut`]) and its conversions to and from
//!   the one request form;
//! - [`reply`]: the typed `PUT` answers ([`PutApplied`], [`PutFailure`]);
//! - [`arm`]: the armed clock's checks, made by the VMM at apply;
//! - [`text`]: a VMM's error text, clipped for printing.

pub mod arm;
pub mod get;
pub mod put;
pub mod reply;
pub mod text;

pub use crate::validate::{FieldError as InvalidField, MAX_TSC_KHZ, MAX_VCPUS};
pub use get::*;
pub use put::*;
pub use reply::*;
pub use text::error_messages;

/// The endpoint, under the VMM's API root.
pub const VM_CLOCK_ENDPOINT: &str = "/api/v1/vm.clock";
