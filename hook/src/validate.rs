//! The rules for a valid VM clock, in one place: what the sidecar reader,
//! the vm.clock API client, the apply layer and any VMM implementing the API
//! check, with one error type that names the field.
//!
//! Field paths are relative to the value checked (`tsc_khz`,
//! `vcpus[2].id`, `pvti.tsc_shift`); a caller checking a part of a larger
//! document puts its own prefix in front with [`FieldError::under`].

use crate::model::{Pvti, TscScaling, VcpuOffset, VmClock, KVM_CLOCK_REALTIME};

/// Most vCPUs a VM clock may list (KVM_MAX_VCPUS on x86-64).
pub const MAX_VCPUS: u32 = 1024;
/// Highest TSC rate accepted, kHz (100 GHz).
pub const MAX_TSC_KHZ: u32 = 100_000_000;
/// The shifts KVM's `kvm_get_time_scale` can produce.
pub const PVTI_SHIFT_RANGE: std::ops::RangeInclusive<i8> = -32..=32;

/// A value that breaks a rule: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {reason}")]
pub struct FieldError {
    /// The path of the field, e.g. `vcpus[1].id`.
    pub field: String,
    /// What is wrong with it, starting with a verb ("is 0: ...").
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error, its field under `prefix` (`vm_clock` + `tsc_khz` =
    /// `vm_clock.tsc_khz`).
    #[must_use]
    pub fn under(self, prefix: &str) -> FieldError {
        let field = if prefix.is_empty() {
            self.field
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        FieldError { field, ..self }
    }
}

type Result<T> = std::result::Result<T, FieldError>;

/// A TSC rate: 1 kHz to [`MAX_TSC_KHZ`].
pub fn tsc_khz(field: &str, khz: u32) -> Result<()> {
    if khz == 0 {
        return Err(FieldError::new(
            field,
            "is 0 kHz: a TSC rate of zero is impossible (the rate was not read)",
        ));
    }
    if khz > MAX_TSC_KHZ {
        return Err(FieldError::new(
            field,
            format!("is {khz} kHz; at most {MAX_TSC_KHZ} kHz (100 GHz) is accepted"),
        ));
    }
    Ok(())
}

/// A PVTI line: a non-zero multiplier and a shift KVM can produce.
pub fn pvti(p: &Pvti) -> Result<()> {
    if p.tsc_to_system_mul == 0 {
        return Err(FieldError::new(
            "tsc_to_system_mul",
            "is 0: the TSC-to-ns line would be flat",
        ));
    }
    if !PVTI_SHIFT_RANGE.contains(&p.tsc_shift) {
        return Err(FieldError::new(
            "tsc_shift",
            format!("is {}; KVM produces shifts in -32..=32", p.tsc_shift),
        ));
    }
    Ok(())
}

/// A hardware scaling ratio: 48 (Intel VMX) or 32 (AMD SVM) fraction bits,
/// and not 0.
pub fn scaling(s: &TscScaling) -> Result<()> {
    if s.frac_bits != 32 && s.frac_bits != 48 {
        return Err(FieldError::new(
            "frac_bits",
            format!(
                "is {}; hardware uses 48 (Intel VMX) or 32 (AMD SVM)",
                s.frac_bits
            ),
        ));
    }
    if s.ratio == 0 {
        return Err(FieldError::new(
            "ratio",
            "is 0: the guest TSC would stand still",
        ));
    }
    Ok(())
}

/// 1 to [`MAX_VCPUS`] vCPUs, each id once (the second occurrence is named).
pub fn vcpus(list: &[VcpuOffset]) -> Result<()> {
    let count = list.len();
    if count == 0 {
        return Err(FieldError::new(
            "vcpus",
            "is empty: a VM has at least one vCPU",
        ));
    }
    if count > usize::try_from(MAX_VCPUS).unwrap_or(usize::MAX) {
        return Err(FieldError::new(
            "vcpus",
            format!("lists {count} vCPUs; at most {MAX_VCPUS} are accepted"),
        ));
    }
    let mut seen: Vec<(u32, usize)> = list.iter().enumerate().map(|(i, v)| (v.id, i)).collect();
    seen.sort_unstable();
    if let Some(at) = seen.windows(2).find_map(|w| match w {
        [(a, _), (b, j)] if a == b => Some(*j),
        _ => None,
    }) {
        let id = list.get(at).map_or(0, |v| v.id);
        return Err(FieldError::new(
            format!("vcpus[{at}].id"),
            format!("vCPU id {id} appears more than once"),
        ));
    }
    Ok(())
}

/// A VM clock: its vCPUs, its rate, its PVTI and where it came from (both
/// or neither), its scaling ratio.
pub fn vm_clock(clock: &VmClock) -> Result<()> {
    vcpus(&clock.vcpus)?;
    tsc_khz("tsc_khz", clock.tsc_khz)?;
    if let Some(p) = &clock.pvti {
        pvti(p).map_err(|e| e.under("pvti"))?;
    }
    match (clock.pvti.is_some(), clock.pvti_source.is_some()) {
        (true, false) => {
            return Err(FieldError::new(
                "pvti_source",
                "is absent but pvti is present: say where the PVTI came from",
            ))
        }
        (false, true) => {
            return Err(FieldError::new(
                "pvti_source",
                "is present but pvti is absent",
            ))
        }
        _ => {}
    }
    if let Some(s) = &clock.tsc_scaling {
        scaling(s).map_err(|e| e.under("tsc_scaling"))?;
    }
    Ok(())
}

/// A raw KVM_SET_CLOCK's flags and anchor: only KVM_CLOCK_REALTIME may be
/// passed, and with it a realtime instant.
pub fn set_clock(flags: u32, realtime_ns: u64) -> Result<()> {
    if flags & !KVM_CLOCK_REALTIME != 0 {
        return Err(FieldError::new(
            "flags",
            format!("is {flags:#x}; only 0 or KVM_CLOCK_REALTIME (4) may be passed"),
        ));
    }
    if flags & KVM_CLOCK_REALTIME != 0 && realtime_ns == 0 {
        return Err(FieldError::new(
            "realtime",
            "is 0 with KVM_CLOCK_REALTIME: the anchor instant is missing",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: u32) -> VcpuOffset {
        VcpuOffset { id, tsc_offset: 0 }
    }

    #[test]
    fn duplicate_ids_name_the_second_occurrence() {
        let err = vcpus(&[v(0), v(1), v(0)]).unwrap_err();
        assert_eq!(err.field, "vcpus[2].id");
        assert!(vcpus(&[v(0), v(1), v(2)]).is_ok());
        assert_eq!(vcpus(&[]).unwrap_err().field, "vcpus");
    }

    #[test]
    fn prefixes_compose() {
        let e = FieldError::new("tsc_shift", "x")
            .under("pvti")
            .under("vm_clock");
        assert_eq!(e.field, "vm_clock.pvti.tsc_shift");
        assert_eq!(
            FieldError::new("[0]", "x").under("tsc_offsets").field,
            "tsc_offsets[0]"
        );
    }

    #[test]
    fn rates_and_lines() {
        assert!(tsc_khz("k", 0).is_err());
        assert!(tsc_khz("k", MAX_TSC_KHZ + 1).is_err());
        assert!(tsc_khz("k", 2_445_411).is_ok());
        let mut p = Pvti {
            tsc_timestamp: 0,
            system_time: 0,
            tsc_to_system_mul: 0,
            tsc_shift: 0,
            flags: 0,
        };
        assert_eq!(pvti(&p).unwrap_err().field, "tsc_to_system_mul");
        p.tsc_to_system_mul = 1;
        p.tsc_shift = 33;
        assert_eq!(pvti(&p).unwrap_err().field, "tsc_shift");
        assert!(set_clock(8, 1).is_err());
        assert!(set_clock(KVM_CLOCK_REALTIME, 0).is_err());
        assert!(set_clock(KVM_CLOCK_REALTIME, 1).is_ok());
    }
}
