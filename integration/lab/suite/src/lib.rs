//! Shared parts of the two-host lab's tools (docs/lab.md, "Two lab hosts"):
//! the ivshmem page both lab hosts map ([`shm`]), the TSC difference measured
//! through it ([`tscpair`]), the clock harness ([`clock`]) and the control
//! connection between the hosts ([`control`]).

pub mod clock;
pub mod control;
pub mod shm;
pub mod tscpair;
