//! The inter-host TAI offset, measured at migration time: an NTP-style
//! estimator ([`estimate`]) and, over TCP, an exchange authenticated with
//! the sidecar key that can also carry the sealed sidecar to the
//! destination. See docs/offset-exchange.md.

pub mod estimate;

pub use estimate::{estimate, Estimate, EstimateError, Sample, SampleError};
