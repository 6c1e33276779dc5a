//! pvclock and TSC arithmetic, bit-exact with the guest and with KVM.
//!
//! Every function here is total: no input panics. Products are taken in
//! u128; where the kernel's C would truncate or wrap, the same truncation or
//! wrap is done on purpose and said so.

use crate::model::{Pvti, TscScaling, VmClock};

/// Nanoseconds per second.
pub const NSEC_PER_SEC: u64 = 1_000_000_000;

/// The guest's kvm-clock reading at guest TSC `tsc_cycles` through `pvti`.
///
/// Bit-exact with Linux's `__pvclock_read_cycles`: the delta wraps modulo
/// 2^64 (a TSC below `tsc_timestamp` gives the guest's huge value, as the
/// guest would compute it), a shift of 64 or more gives 0 (undefined in C, 0
/// in every KVM-produced PVTI since |shift| <= 32), the 96-bit product is
/// taken in u128 and the sum wraps.
pub fn pvclock_read(pvti: &Pvti, tsc_cycles: u64) -> u64 {
    let delta = tsc_cycles.wrapping_sub(pvti.tsc_timestamp);
    pvti.system_time
        .wrapping_add(scale_delta(delta, pvti.tsc_to_system_mul, pvti.tsc_shift))
}

/// The line through `pvti` at `tsc_cycles`, on both sides of its anchor:
/// what [`pvclock_read`] gives at or past `tsc_timestamp`, and the line
/// extended backwards below it (where the guest's formula would wrap). For
/// comparing lines and placing floors, not for what a guest reads.
pub fn line_at_ns(pvti: &Pvti, tsc_cycles: u64) -> i128 {
    let base = i128::from(pvti.system_time);
    if tsc_cycles >= pvti.tsc_timestamp {
        let delta = tsc_cycles - pvti.tsc_timestamp;
        base + i128::from(scale_delta(delta, pvti.tsc_to_system_mul, pvti.tsc_shift))
    } else {
        let delta = pvti.tsc_timestamp - tsc_cycles;
        base - i128::from(scale_delta(delta, pvti.tsc_to_system_mul, pvti.tsc_shift))
    }
}

/// `pvclock_scale_delta`: shift, then `(delta * mul) >> 32`.
pub fn scale_delta(delta_cycles: u64, mul: u32, shift: i8) -> u64 {
    let shifted = if shift >= 0 {
        delta_cycles.checked_shl(shift as u32).unwrap_or(0)
    } else {
        delta_cycles
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    };
    // A u64 times a u32, shifted right by 32, fits in 64 bits.
    ((u128::from(shifted) * u128::from(mul)) >> 32) as u64
}

/// KVM's `kvm_get_time_scale(scaled_hz, base_hz)`: the (shift, mul) with
/// which `base_hz` ticks convert to `scaled_hz` units. KVM calls it with
/// `(NSEC_PER_SEC, tsc_khz * 1000)`.
///
/// Returns `None` for inputs on which the kernel's loops would not end or
/// its division would fault (`base_hz == 0`, `scaled_hz == 0`).
pub fn kvm_get_time_scale(scaled_hz: u64, base_hz: u64) -> Option<(i8, u32)> {
    if scaled_hz == 0 || base_hz == 0 {
        return None;
    }
    let mut shift: i32 = 0;
    let mut tps64 = base_hz;
    let mut scaled64 = scaled_hz;
    while tps64 > scaled64.saturating_mul(2) || tps64 & 0xffff_ffff_0000_0000 != 0 {
        tps64 >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps64 as u32;
    while u64::from(tps32) <= scaled64 || scaled64 & 0xffff_ffff_0000_0000 != 0 {
        if scaled64 & 0xffff_ffff_0000_0000 != 0 || tps32 & 0x8000_0000 != 0 {
            scaled64 >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
        if tps32 == 0 || scaled64 == 0 || !(-64..=64).contains(&shift) {
            return None;
        }
    }
    // div_frac: (dividend << 32) / divisor, dividend taken as u32 like the kernel.
    let mul = ((u64::from(scaled64 as u32) << 32) / u64::from(tps32)) as u32;
    Some((i8::try_from(shift).ok()?, mul))
}

/// (shift, mul) KVM puts in the PVTI for a TSC of `tsc_khz`.
pub fn time_scale_for_khz(tsc_khz: u32) -> Option<(i8, u32)> {
    kvm_get_time_scale(NSEC_PER_SEC, u64::from(tsc_khz) * 1000)
}

/// The TSC rate, in Hz, implied by a PVTI's (mul, shift): the inverse of
/// [`kvm_get_time_scale`], floor-rounded. `None` when mul is 0.
pub fn rate_hz_from_scale(mul: u32, shift: i8) -> Option<u64> {
    if mul == 0 {
        return None;
    }
    let hz = (u128::from(NSEC_PER_SEC) << 32) / u128::from(mul);
    let hz = if shift >= 0 {
        hz.checked_shr(u32::from(shift.unsigned_abs()))?
    } else {
        hz.checked_shl(u32::from(shift.unsigned_abs()))?
    };
    u64::try_from(hz).ok()
}

/// Guest cycles for `host_tsc` under `scaling` (KVM's `kvm_scale_tsc`,
/// `mul_u64_u64_shr`, truncated to 64 bits as the kernel does).
/// No scaling = identity.
pub fn scale_tsc(host_tsc: u64, scaling: Option<TscScaling>) -> u64 {
    match scaling {
        None => host_tsc,
        Some(s) => {
            let product = u128::from(host_tsc) * u128::from(s.ratio);
            product.checked_shr(u32::from(s.frac_bits)).unwrap_or(0) as u64
        }
    }
}

/// The ratio KVM programs for a guest of `guest_khz` on a host of `host_khz`
/// (`mul_u64_u32_div(1 << frac_bits, guest_khz, host_khz)`). `None` when it
/// does not fit or an input is zero.
pub fn scaling_ratio(guest_khz: u32, host_khz: u32, frac_bits: u8) -> Option<TscScaling> {
    if host_khz == 0 || guest_khz == 0 || frac_bits > 63 {
        return None;
    }
    let ratio = (1u128 << frac_bits) * u128::from(guest_khz) / u128::from(host_khz);
    let ratio = u64::try_from(ratio).ok().filter(|r| *r != 0)?;
    Some(TscScaling { ratio, frac_bits })
}

/// The guest TSC a vCPU reads at host TSC `host_tsc`: scaled host TSC plus
/// the offset, modulo 2^64 (the hardware's own wrap).
pub fn guest_tsc(host_tsc: u64, scaling: Option<TscScaling>, offset_cycles: i64) -> u64 {
    scale_tsc(host_tsc, scaling).wrapping_add(offset_cycles as u64)
}

/// The offset that makes a vCPU read `guest_tsc` at host TSC `host_tsc`.
pub fn offset_for(guest_tsc: u64, host_tsc: u64, scaling: Option<TscScaling>) -> i64 {
    guest_tsc.wrapping_sub(scale_tsc(host_tsc, scaling)) as i64
}

/// Cycles in `ns` at `khz`, rounded down: `ns * khz / 10^6` in u128,
/// saturating at u64::MAX.
pub fn ns_to_cycles(ns: u64, khz: u32) -> u64 {
    let cycles = u128::from(ns) * u128::from(khz) / 1_000_000;
    u64::try_from(cycles).unwrap_or(u64::MAX)
}

/// Nanoseconds in `cycles` at `khz`, rounded down: `cycles * 10^6 / khz` in
/// u128, saturating at u64::MAX. `None` when `khz` is 0.
pub fn cycles_to_ns(cycles: u64, khz: u32) -> Option<u64> {
    if khz == 0 {
        return None;
    }
    let ns = u128::from(cycles) * 1_000_000 / u128::from(khz);
    Some(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// The PVTI KVM would give a guest in master-clock mode, derived from one
/// KVM_GET_CLOCK pair: kvm-clock `clock_ns` at host TSC `host_tsc`, the
/// vCPU's offset and scaling, and the guest TSC rate. The result passes
/// through (guest TSC at `host_tsc`, `clock_ns`) with KVM's (mul, shift).
pub fn derive_pvti(
    clock_ns: u64,
    host_tsc: u64,
    offset_cycles: i64,
    scaling: Option<TscScaling>,
    guest_khz: u32,
) -> Option<Pvti> {
    let (tsc_shift, tsc_to_system_mul) = time_scale_for_khz(guest_khz)?;
    Some(Pvti {
        tsc_timestamp: guest_tsc(host_tsc, scaling, offset_cycles),
        system_time: clock_ns,
        tsc_to_system_mul,
        tsc_shift,
        flags: crate::model::PVCLOCK_TSC_STABLE_BIT,
    })
}

/// kvm-clock minus `line`, in ns, at the instant of `vm`'s KVM_GET_CLOCK
/// pair: the guest TSC there is the pair's host TSC (scaled) plus vCPU 0's
/// offset *as read back*. `None` without a host TSC in the pair, without a
/// vCPU, or when the difference does not fit in i64.
pub fn kvmclock_error_ns(vm: &VmClock, line: &Pvti) -> Option<i64> {
    if !vm.kvmclock.has_host_tsc() {
        return None;
    }
    let offset = vm.vcpus.first()?.tsc_offset;
    let tsc = guest_tsc(vm.kvmclock.host_tsc, vm.tsc_scaling, offset);
    let expected = pvclock_read(line, tsc);
    i64::try_from(i128::from(vm.kvmclock.clock_ns) - i128::from(expected)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden vectors worked out by hand from the kernel's algorithm, not by
    // this code: 3 GHz halves once to 1.5e9 (shift -1), then
    // mul = 2^32 * 1e9 / 1.5e9 = 2^32 * 2/3 = 0xAAAAAAAA.
    #[test]
    fn time_scale_golden_vectors() {
        assert_eq!(time_scale_for_khz(3_000_000), Some((-1, 0xAAAA_AAAA)));
        assert_eq!(time_scale_for_khz(2_500_000), Some((-1, 0xCCCC_CCCC)));
        assert_eq!(time_scale_for_khz(1_500_000), Some((0, 0xAAAA_AAAA)));
        // Seen in real PVTIs on this project's machines.
        assert_eq!(time_scale_for_khz(2_445_410), Some((-1, 3_512_676_643)));
        assert_eq!(time_scale_for_khz(2_445_411), Some((-1, 3_512_675_207)));
    }

    #[test]
    fn time_scale_refuses_zero() {
        assert_eq!(kvm_get_time_scale(0, 1), None);
        assert_eq!(kvm_get_time_scale(1, 0), None);
        assert_eq!(time_scale_for_khz(0), None);
    }

    #[test]
    fn pvclock_read_one_second() {
        // 3 GHz: 3e9 cycles are 1 s, minus the truncation of 0xAAAAAAAA.
        let pvti = Pvti {
            tsc_timestamp: 1_000,
            system_time: 5,
            tsc_to_system_mul: 0xAAAA_AAAA,
            tsc_shift: -1,
            flags: 1,
        };
        let ns = pvclock_read(&pvti, 1_000 + 3_000_000_000);
        // (1.5e9 * 0xAAAAAAAA) >> 32 = 999_999_999 (0xAAAAAAAA < 2^33/3).
        assert_eq!(ns, 5 + 999_999_999);
        assert_eq!(pvclock_read(&pvti, 1_000), 5);
    }

    #[test]
    fn rate_inverse_golden() {
        assert_eq!(rate_hz_from_scale(0xAAAA_AAAA, -1), Some(3_000_000_000));
        assert_eq!(rate_hz_from_scale(0, -1), None);
    }

    #[test]
    fn scaling_identity_and_half() {
        let half = scaling_ratio(1_000_000, 2_000_000, 48).unwrap();
        assert_eq!(half.ratio, 1 << 47);
        assert_eq!(scale_tsc(1_000, Some(half)), 500);
        let amd = scaling_ratio(2_000_000, 2_000_000, 32).unwrap();
        assert_eq!(scale_tsc(u64::MAX, Some(amd)), u64::MAX);
        assert_eq!(scaling_ratio(1, 0, 32), None);
    }

    #[test]
    fn ns_cycles_round_down() {
        assert_eq!(ns_to_cycles(1_000_000_000, 2_445_411), 2_445_411_000);
        assert_eq!(ns_to_cycles(1, 2_445_411), 2);
        assert_eq!(cycles_to_ns(3, 2_000_000), Some(1));
        assert_eq!(cycles_to_ns(1, 0), None);
        assert_eq!(ns_to_cycles(u64::MAX, u32::MAX), u64::MAX);
    }

    #[test]
    fn offsets_round_trip() {
        let off = offset_for(100, 1_000, None);
        assert_eq!(off, -900);
        assert_eq!(guest_tsc(1_000, None, off), 100);
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;
    use crate::model::{Capabilities, KvmClockSample, RunState, VcpuOffset, VmClock};

    #[test]
    fn kvmclock_error_from_the_pair() {
        let line = Pvti {
            tsc_timestamp: 1_000,
            system_time: 5_000,
            tsc_to_system_mul: 1 << 31, // 0.5 ns per cycle at shift 0
            tsc_shift: 0,
            flags: 1,
        };
        let mut vm = VmClock {
            state: RunState::Paused,
            tsc_khz: 2_000_000,
            vcpus: vec![VcpuOffset {
                id: 0,
                tsc_offset: 100,
            }],
            kvmclock: KvmClockSample {
                clock_ns: 5_000 + 550 + 7,
                flags: 14,
                realtime_ns: 0,
                host_tsc: 2_000,
            },
            pvti: None,
            pvti_source: None,
            tsc_scaling: None,
            capabilities: Capabilities::default(),
        };
        // guest TSC 2100: 1100 cycles past the anchor = 550 ns.
        assert_eq!(kvmclock_error_ns(&vm, &line), Some(7));
        vm.kvmclock.flags = 6;
        assert_eq!(kvmclock_error_ns(&vm, &line), None);
    }
}
