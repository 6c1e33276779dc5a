//! Kernel structures (kvm_regs, kvm_sregs, ...) as hex strings in saved
//! state. They are plain integer structs: every byte pattern is a valid value.

/// The bytes of a plain-old-data kernel structure, as lower-case hex.
///
/// Only for kvm-bindings structs made of integers and integer arrays.
pub fn to_hex<T: Copy>(value: &T) -> String {
    let size = std::mem::size_of::<T>();
    // SAFETY: `value` is a valid reference to `size` bytes; the kvm-bindings
    // structs used here are repr(C) integer aggregates, and any padding is
    // zeroed by the kernel or by Default.
    let bytes = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size) };
    let mut s = String::with_capacity(size * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The structure whose bytes `hex` spells; `None` unless it has exactly
/// `size_of::<T>()` bytes of valid hex.
pub fn from_hex<T: Copy + Default>(hex: &str) -> Option<T> {
    let size = std::mem::size_of::<T>();
    if hex.len() != size * 2 {
        return None;
    }
    let mut bytes = Vec::with_capacity(size);
    for i in (0..hex.len()).step_by(2) {
        bytes.push(u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?);
    }
    let mut value = T::default();
    // SAFETY: `bytes` has exactly size_of::<T>() bytes and T is an integer
    // aggregate for which every byte pattern is valid.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut value as *mut T).cast::<u8>(), size);
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn round_trip() {
        let regs = kvm_regs {
            rip: 0x10_0000,
            rbx: 7,
            rflags: 2,
            ..Default::default()
        };
        let hex = to_hex(&regs);
        let back: kvm_regs = from_hex(&hex).expect("same size");
        assert_eq!(back.rip, 0x10_0000);
        assert_eq!(back.rbx, 7);
        assert!(from_hex::<kvm_regs>(&hex[2..]).is_none());
        assert!(from_hex::<kvm_regs>(&hex.replace('0', "g")).is_none());
        assert!(from_hex::<kvm_regs>("é").is_none());
    }
}
