//! Kernel structures (kvm_regs, kvm_sregs, kvm_fpu, kvm_vcpu_events) as hex
//! strings in saved state, through vm-memory's [`ByteValued`] view of their
//! bytes.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events};
use vm_memory::ByteValued;

/// A kvm-bindings structure as plain old data. `ByteValued` is vm-memory's
/// and the structures are kvm-bindings', so the impl needs a local type:
/// the wrapper Firecracker and Cloud Hypervisor use for `boot_params` and
/// the like. Only the structures listed below have it.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Pod<T>(pub T);

macro_rules! kvm_pod {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: a repr(C) kvm-bindings struct of integers and integer arrays whose pad bytes are explicit fields (its size is the sum of its fields'): no padding, no pointer, every byte pattern valid.
        unsafe impl ByteValued for Pod<$t> {}
    )*};
}

kvm_pod!(kvm_regs, kvm_sregs, kvm_fpu, kvm_vcpu_events);

/// The bytes of a kernel structure, as lower-case hex.
pub fn to_hex<T: Copy>(value: &T) -> String
where
    Pod<T>: ByteValued,
{
    let pod = Pod(*value);
    let bytes = pod.as_slice();
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The structure whose bytes `hex` spells; `None` unless it has exactly
/// `size_of::<T>()` bytes of valid hex.
pub fn from_hex<T: Copy>(hex: &str) -> Option<T>
where
    Pod<T>: ByteValued,
{
    let mut pod = Pod::<T>::zeroed();
    let bytes = pod.as_mut_slice();
    if hex.len() != bytes.len() * 2 {
        return None;
    }
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(pod.0)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn every_saved_struct_round_trips() {
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x10;
        sregs.cs.g = 1;
        sregs.cr0 = 0x11;
        let back: kvm_sregs = from_hex(&to_hex(&sregs)).expect("sregs");
        assert_eq!((back.cs.selector, back.cs.g, back.cr0), (0x10, 1, 0x11));
        let mut xmm = [[0u8; 16]; 16];
        xmm[15][15] = 0xab;
        let fpu = kvm_fpu {
            mxcsr: 0x1f80,
            xmm,
            ..Default::default()
        };
        let back: kvm_fpu = from_hex(&to_hex(&fpu)).expect("fpu");
        assert_eq!((back.mxcsr, back.xmm[15][15]), (0x1f80, 0xab));
        let mut events = kvm_vcpu_events {
            exception_payload: u64::MAX,
            ..Default::default()
        };
        events.nmi.masked = 1;
        let hex = to_hex(&events);
        assert_eq!(hex.len(), 2 * 64);
        let back: kvm_vcpu_events = from_hex(&hex).expect("events");
        assert_eq!((back.exception_payload, back.nmi.masked), (u64::MAX, 1));
    }
}
