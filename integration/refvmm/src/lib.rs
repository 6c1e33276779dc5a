//! clockcarry's reference VMM: a small KVM VMM that runs the probe guest,
//! speaks Cloud Hypervisor's HTTP API (plus the vm.clock extension), and
//! reproduces the clock handling of today's VMMs (`ch-v53`, `qemu`,
//! `firecracker`) so that clockcarry can be shown against them, side by
//! side, from the guest's own view. See docs/refvmm.md and docs/demo.md.
//!
//! Modules, one job each:
//! - guest side: [`probe`] (the embedded probe and its reports), [`elf`]
//!   (PVH loader), [`memory`] (memfd RAM), [`cpu`] (registers, CPUID, saved
//!   state), [`runner`] (vCPU threads, port I/O, park/unpark);
//! - the VM: [`vm`] (state machine), [`baseline`] (stock clock behaviour),
//!   [`state`] (snapshot format), [`migration`] (wire protocol);
//! - the API: [`http`] (HTTP/1.1 on a Unix socket), [`api`] (Cloud
//!   Hypervisor's endpoints), [`clockapi`] (GET/PUT vm.clock on the library);
//! - measuring: [`stamp`] (host TAI stamps), [`probelog`] (JSON lines),
//!   [`analysis`] (jumps, errors, monotonicity);
//! - [`demo`]: the side-by-side demo; [`cli`]: the VMM's command line.

pub mod analysis;
pub mod api;
pub mod baseline;
pub mod cli;
pub mod clockapi;
pub mod cpu;
pub mod demo;
pub mod elf;
pub mod http;
pub mod memory;
pub mod migration;
pub mod pod;
pub mod probe;
pub mod probelog;
pub mod runner;
pub mod stamp;
pub mod state;
pub mod vm;
