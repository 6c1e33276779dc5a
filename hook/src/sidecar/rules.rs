//! The semantic rules every sidecar body meets: format and version, text
//! fields, counts and limits, and the VM clock's rules through the one
//! validator ([`crate::validate`]).

use sha2::{Digest, Sha256};

use super::format::clip;
use super::key::hex_lower;
use super::{
    Result, SidecarBody, SidecarError, VmIdentity, FORMAT, MAX_HOST_STRING_BYTES, MAX_TAI_OFFSET_S,
    MAX_UNCERTAINTY_NS, MAX_VCPUS, MAX_VM_ID_BYTES, VERSION,
};
use crate::model::{HostIdentity, HostSample, OffsetEstimate, VmClock};
use crate::peer::estimate::MAX_ROUNDS;
use crate::validate;

impl SidecarBody {
    /// A version-1 body for `vm_id`; fills `format`, `version`,
    /// `vm.vcpu_count` (from `vm_clock.vcpus`) and `created_by`.
    pub fn new(
        vm_id: impl Into<String>,
        host: HostIdentity,
        capture: HostSample,
        vm_clock: VmClock,
    ) -> SidecarBody {
        SidecarBody {
            format: FORMAT.to_string(),
            version: VERSION,
            vm: VmIdentity {
                id: vm_id.into(),
                vcpu_count: u32::try_from(vm_clock.vcpus.len()).unwrap_or(u32::MAX),
            },
            source_host: host,
            capture,
            vm_clock,
            offset_estimate: None,
            created_by: concat!("clockcarry ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// The bytes the digest and the HMAC cover: `serde_json::to_vec(self)`.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| SidecarError::invalid(".", e.to_string()))
    }

    /// SHA-256 of [`Self::canonical_bytes`], lowercase hex.
    pub fn sha256_hex(&self) -> Result<String> {
        Ok(hex_lower(&Sha256::digest(self.canonical_bytes()?)))
    }

    /// The semantic rules every sidecar must meet (the parser applies them
    /// after the integrity checks; [`Sidecar::seal`] before sealing).
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(SidecarError::UnknownFormat(clip(&self.format)));
        }
        if self.version != VERSION {
            return Err(SidecarError::UnknownVersion(u64::from(self.version)));
        }
        check_text("vm.id", &self.vm.id, true, MAX_VM_ID_BYTES)?;

        let count = self.vm.vcpu_count;
        if count == 0 || count > MAX_VCPUS {
            return Err(SidecarError::invalid(
                "vm.vcpu_count",
                format!("is {count}; a VM has 1 to {MAX_VCPUS} vCPUs"),
            ));
        }
        let listed = self.vm_clock.vcpus.len();
        if usize::try_from(count).ok() != Some(listed) {
            return Err(SidecarError::invalid(
                "vm.vcpu_count",
                format!("is {count} but vm_clock.vcpus lists {listed} TSC offsets"),
            ));
        }
        let host = &self.source_host;
        check_text(
            "source_host.hostname",
            &host.hostname,
            true,
            MAX_HOST_STRING_BYTES,
        )?;
        check_text(
            "source_host.boot_id",
            &host.boot_id,
            true,
            MAX_HOST_STRING_BYTES,
        )?;
        check_text(
            "source_host.kernel_release",
            &host.kernel_release,
            false,
            MAX_HOST_STRING_BYTES,
        )?;
        check_text(
            "source_host.clocksource",
            &host.clocksource,
            false,
            MAX_HOST_STRING_BYTES,
        )?;
        check_tsc_khz("source_host.tsc_khz", host.tsc_khz)?;

        let cap = &self.capture;
        if cap.tai_ns == 0 {
            return Err(SidecarError::invalid(
                "capture.tai_ns",
                "is 0: the capture instant is missing",
            ));
        }
        if cap.uncertainty_ns > MAX_UNCERTAINTY_NS {
            return Err(SidecarError::invalid(
                "capture.uncertainty_ns",
                format!(
                    "is {} ns; at most {MAX_UNCERTAINTY_NS} ns (1 s) is accepted",
                    cap.uncertainty_ns
                ),
            ));
        }
        if !(0..=MAX_TAI_OFFSET_S).contains(&cap.tai_offset_s) {
            return Err(SidecarError::invalid(
                "capture.tai_offset_s",
                format!(
                    "is {} s; TAI - UTC lies in 0..={MAX_TAI_OFFSET_S} s",
                    cap.tai_offset_s
                ),
            ));
        }

        // The VM clock's rules are the one validator's (shared with the API
        // client, the apply layer and the VMMs).
        validate::vm_clock(&self.vm_clock)
            .map_err(|e| e.under("vm_clock"))
            .map_err(|e| SidecarError::invalid(e.field, e.reason))?;
        check_offset_estimate(self.offset_estimate.as_ref())?;
        check_text("created_by", &self.created_by, true, MAX_HOST_STRING_BYTES)?;
        Ok(())
    }

    /// Refuses a capture later than `now_tai_ns + error_bound_ns` (a clock
    /// on one of the hosts is wrong, or the file is not what it says).
    pub fn check_capture_not_in_future(&self, now_tai_ns: u64, error_bound_ns: u64) -> Result<()> {
        let capture = self.capture.tai_ns;
        if capture > now_tai_ns.saturating_add(error_bound_ns) {
            return Err(SidecarError::CaptureInFuture {
                ahead_ns: capture.saturating_sub(now_tai_ns),
                bound_ns: error_bound_ns,
            });
        }
        Ok(())
    }
}

/// A measured estimate's optional fields: a measurement instant, and 1 to
/// [`MAX_ROUNDS`] rounds.
fn check_offset_estimate(estimate: Option<&OffsetEstimate>) -> Result<()> {
    let Some(e) = estimate else {
        return Ok(());
    };
    if e.measured_tai_ns == Some(0) {
        return Err(SidecarError::invalid(
            "offset_estimate.measured_tai_ns",
            "is 0: the measurement instant is missing",
        ));
    }
    if let Some(rounds) = e.rounds {
        if rounds == 0 || rounds > MAX_ROUNDS {
            return Err(SidecarError::invalid(
                "offset_estimate.rounds",
                format!("is {rounds}; an exchange has 1 to {MAX_ROUNDS} rounds"),
            ));
        }
    }
    Ok(())
}

fn check_text(field: &str, s: &str, required: bool, max_bytes: usize) -> Result<()> {
    if required && s.is_empty() {
        return Err(SidecarError::invalid(field, "is empty"));
    }
    if s.len() > max_bytes {
        return Err(SidecarError::invalid(
            field,
            format!(
                "is {} bytes long; at most {max_bytes} are accepted",
                s.len()
            ),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(SidecarError::invalid(field, "contains control characters"));
    }
    Ok(())
}

fn check_tsc_khz(field: &str, khz: u32) -> Result<()> {
    validate::tsc_khz(field, khz).map_err(|e| SidecarError::invalid(e.field, e.reason))
}
