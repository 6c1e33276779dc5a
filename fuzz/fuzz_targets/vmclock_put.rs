//! A `PUT /api/v1/vm.clock` body, as the reference VMM reads it
//! (`clockcarry_refvmm::api::parse_clock_put`, then `check_clock_put`
//! against the VM's vCPU count) and as the library applies it
//! (`ApplyRequest::from(&ClockPut)`, then `kvm::apply_request`) on a
//! simulated KVM: a `ClockOps` with a kvm-clock model, optional inert
//! offsets, and one injected ioctl failure (once or from then on).
//!
//! Input: a 16-byte header (below), then the JSON body. Missing header bytes
//! read as 0.
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | vCPUs of the VM: `b % 9` (0 = none, refused up front) |
//! | 1 | bits: 1 clock_guest, 2 set_clock_realtime, 4 `options.tsc_offsets_effective` false, 8 the simulated offsets are inert, 16 KVM_GET_CLOCK has no host TSC, 32 no realtime pair, 64 options.tsc_scaling (AMD, ratio 1.0) |
//! | 2 | `max_set_clock_tries`: `b % 17` |
//! | 3 | the ClockOps call that fails (1-based; 0 = none) |
//! | 4 | its errno: bits 0-1 pick EINVAL, EIO, EBUSY, EFAULT; bit 7: every later call fails too |
//! | 5 | kvm-clock bias of each KVM_SET_CLOCK, ns (i8) |
//! | 6-7 | host TSC cycles per ClockOps call (u16 LE) |
//! | 8-15 | seed of the initial offsets (i64 LE; vCPU i starts at seed * (i + 1)) |
//!
//! Properties beyond "no panic":
//! - a parsed body, re-encoded, parses back equal, and is the wire form
//!   (`ClockPut::from_request`) of the request made from it;
//! - the reference VMM's checks refuse exactly the bodies the library's
//!   `ApplyRequest::validate` refuses (one validator), and `apply_request`
//!   refuses up front exactly those;
//! - the library calls `ClockOps` only on vCPU indices `0..vcpu_count()`;
//! - a request refused up front (`VcpuCountMismatch`, `InvalidPlan`) wrote
//!   nothing;
//! - a successful apply left the requested offsets (unless the simulated
//!   offsets are inert) and rate in place, reports the previous offsets and
//!   the read-back, and calls the offsets effective exactly when the
//!   read-back matches and the options do not say offsets are inert;
//! - a failed apply whose rollback reports no failure left every offset and
//!   rate as it was before.

#![no_main]

use clockcarry::kvm::{apply_request, ApplyError, ApplyOptions, ApplyRequest, ClockOps, KvmError};
use clockcarry::model::{
    KvmClockSample, Pvti, TscScaling, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE,
};
use clockcarry::pvclock::{guest_tsc, pvclock_read};
use clockcarry::vmclock_api::ClockPut;
use clockcarry_refvmm::api::{check_clock_put, parse_clock_put};
use libfuzzer_sys::fuzz_target;

/// CLOCK_REALTIME of the simulated host at host TSC 0, ns (2026).
const REALTIME_BASE_NS: u64 = 1_780_000_000_000_000_000;
/// Initial guest TSC rate of every simulated vCPU, kHz.
const INITIAL_KHZ: u32 = 2_445_411;
const HEADER_BYTES: usize = 16;

/// A KVM VM whose clock ioctls are modelled in memory.
///
/// Invariants: `offsets.len() == khz.len() == vcpu_count()`; kvm-clock is the
/// line through (`clock_host_tsc`, `clock_ns`) at 1 ns per host cycle until
/// a KVM_SET_CLOCK_GUEST installs `guest_line`; CLOCK_REALTIME is
/// `REALTIME_BASE_NS` plus the host TSC.
struct SimKvm {
    offsets: Vec<i64>,
    khz: Vec<u32>,
    inert_offsets: bool,
    host_tsc: u64,
    tsc_step: u64,
    clock_ns: u64,
    clock_host_tsc: u64,
    guest_line: Option<Pvti>,
    no_host_tsc: bool,
    no_realtime: bool,
    bias_ns: i64,
    scaling: Option<TscScaling>,
    /// ClockOps calls made so far (host_tsc and realtime_pair excepted).
    calls: u32,
    fail_at: u32,
    fail_after: bool,
    errno: i32,
    /// Successful calls that changed the VM.
    writes: u32,
}

impl SimKvm {
    fn tick(&mut self) -> u64 {
        self.host_tsc = self.host_tsc.wrapping_add(self.tsc_step);
        self.host_tsc
    }

    /// Counts a call and fails it when the fault schedule says so.
    fn enter(&mut self, ioctl: &'static str) -> Result<(), KvmError> {
        self.calls = self.calls.saturating_add(1);
        let fails = self.fail_at != 0
            && (self.calls == self.fail_at || (self.fail_after && self.calls > self.fail_at));
        if fails {
            return Err(KvmError::Ioctl {
                ioctl,
                vcpu: None,
                errno: self.errno,
            });
        }
        Ok(())
    }

    fn vcpu(&self, vcpu: usize) -> usize {
        assert!(
            vcpu < self.offsets.len(),
            "ClockOps called on vCPU {vcpu} of {}",
            self.offsets.len()
        );
        vcpu
    }

    fn realtime_at(host_tsc: u64) -> u64 {
        REALTIME_BASE_NS.wrapping_add(host_tsc)
    }
}

impl ClockOps for SimKvm {
    fn vcpu_count(&self) -> usize {
        self.offsets.len()
    }
    fn get_tsc_khz(&mut self, vcpu: usize) -> Result<u32, KvmError> {
        let i = self.vcpu(vcpu);
        self.enter("KVM_GET_TSC_KHZ")?;
        Ok(self.khz[i])
    }
    fn set_tsc_khz(&mut self, vcpu: usize, khz: u32) -> Result<(), KvmError> {
        let i = self.vcpu(vcpu);
        self.enter("KVM_SET_TSC_KHZ")?;
        self.khz[i] = khz;
        self.writes += 1;
        Ok(())
    }
    fn get_tsc_offset(&mut self, vcpu: usize) -> Result<i64, KvmError> {
        let i = self.vcpu(vcpu);
        self.enter("KVM_GET_DEVICE_ATTR")?;
        Ok(self.offsets[i])
    }
    fn set_tsc_offset(&mut self, vcpu: usize, offset_cycles: i64) -> Result<(), KvmError> {
        let i = self.vcpu(vcpu);
        self.enter("KVM_SET_DEVICE_ATTR")?;
        if !self.inert_offsets {
            self.offsets[i] = offset_cycles;
        }
        self.writes += 1;
        Ok(())
    }
    fn get_clock(&mut self) -> Result<KvmClockSample, KvmError> {
        self.enter("KVM_GET_CLOCK")?;
        let h = self.tick();
        let clock_ns = match &self.guest_line {
            Some(pvti) => pvclock_read(pvti, guest_tsc(h, self.scaling, self.offsets[0])),
            None => self
                .clock_ns
                .wrapping_add(h.wrapping_sub(self.clock_host_tsc)),
        };
        let mut flags = KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME;
        if !self.no_host_tsc {
            flags |= KVM_CLOCK_HOST_TSC;
        }
        Ok(KvmClockSample {
            clock_ns,
            flags,
            realtime_ns: SimKvm::realtime_at(h),
            host_tsc: h,
        })
    }
    fn set_clock(&mut self, clock_ns: u64, realtime_ns: u64, flags: u32) -> Result<(), KvmError> {
        self.enter("KVM_SET_CLOCK")?;
        let h = self.tick();
        let mut ns = i128::from(clock_ns) + i128::from(self.bias_ns);
        if flags & KVM_CLOCK_REALTIME != 0 {
            // KVM adds the realtime elapsed since `realtime_ns`.
            ns += i128::from(SimKvm::realtime_at(h)) - i128::from(realtime_ns);
        }
        self.clock_ns = u64::try_from(ns.max(0)).unwrap_or(u64::MAX);
        self.clock_host_tsc = h;
        self.guest_line = None;
        self.writes += 1;
        Ok(())
    }
    fn set_clock_guest(&mut self, vcpu: usize, pvti: &Pvti) -> Result<(), KvmError> {
        self.vcpu(vcpu);
        self.enter("KVM_SET_CLOCK_GUEST")?;
        self.guest_line = Some(*pvti);
        self.writes += 1;
        Ok(())
    }
    fn kvmclock_ctrl(&mut self, vcpu: usize) -> Result<(), KvmError> {
        self.vcpu(vcpu);
        self.enter("KVM_KVMCLOCK_CTRL")
    }
    fn host_tsc(&mut self) -> u64 {
        self.tick()
    }
    fn realtime_pair(&mut self) -> Option<(u64, u64)> {
        if self.no_realtime {
            return None;
        }
        let h = self.tick();
        Some((h, SimKvm::realtime_at(h)))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER_BYTES];
    let taken = data.len().min(HEADER_BYTES);
    header[..taken].copy_from_slice(&data[..taken]);
    let body = &data[taken..];

    let vcpus = usize::from(header[0] % 9);
    let bits = header[1];
    let put: ClockPut = match parse_clock_put(&Some(body.to_vec())) {
        Ok(put) => put,
        Err(e) => {
            let _ = e.response();
            return;
        }
    };
    let bytes = serde_json::to_vec(&put).expect("a ClockPut serialises");
    let again = parse_clock_put(&Some(bytes)).expect("a re-encoded body parses");
    assert_eq!(again, put);
    let vmm_accepts = match check_clock_put(&put, u32::try_from(vcpus).unwrap_or(u32::MAX)) {
        Ok(()) => true,
        Err(e) => {
            let _ = e.response();
            false
        }
    };

    let seed = i64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let initial: Vec<i64> = (1..=vcpus).map(|i| seed.wrapping_mul(i as i64)).collect();
    let scaling = (bits & 64 != 0).then_some(TscScaling {
        ratio: 1 << 32,
        frac_bits: 32,
    });
    let mut kvm = SimKvm {
        offsets: initial.clone(),
        khz: vec![INITIAL_KHZ; vcpus],
        inert_offsets: bits & 8 != 0,
        host_tsc: 1 << 40,
        tsc_step: u64::from(u16::from_le_bytes([header[6], header[7]])),
        clock_ns: 1_000_000_000,
        clock_host_tsc: 1 << 40,
        guest_line: None,
        no_host_tsc: bits & 16 != 0,
        no_realtime: bits & 32 != 0,
        bias_ns: i64::from(header[5] as i8),
        scaling,
        calls: 0,
        fail_at: u32::from(header[3]),
        fail_after: header[4] & 0x80 != 0,
        errno: [
            libc_errno::EINVAL,
            libc_errno::EIO,
            libc_errno::EBUSY,
            libc_errno::EFAULT,
        ][usize::from(header[4] & 3)],
        writes: 0,
    };
    let options = ApplyOptions {
        max_set_clock_tries: u32::from(header[2] % 17),
        tsc_scaling: scaling,
        tsc_offsets_effective: bits & 4 == 0,
        clock_guest: bits & 1 != 0,
        set_clock_realtime: bits & 2 != 0,
        read_back: true,
    };
    let request = ApplyRequest::from(&put);
    assert_eq!(request.tsc_offsets, put.tsc_offsets);
    assert_eq!(request.tsc_khz, put.tsc_khz);
    assert_eq!(
        ClockPut::from_request(&request),
        put,
        "the body is the request's wire form"
    );
    // One validator: the VMM refuses exactly what the library refuses up front.
    assert_eq!(request.validate(vcpus).is_ok(), vmm_accepts);

    match apply_request(&mut kvm, &request, &options) {
        Ok(report) => {
            assert!(vmm_accepts, "the library applied what the VMM refuses");
            assert_eq!(report.previous_offsets, initial);
            assert_eq!(report.offsets_read_back, kvm.offsets);
            if !kvm.inert_offsets {
                assert_eq!(kvm.offsets, request.tsc_offsets);
            }
            if let Some(khz) = request.tsc_khz {
                assert!(
                    kvm.khz.iter().all(|k| *k == khz),
                    "{:?} after asking {khz}",
                    kvm.khz
                );
            }
            let matches = report.offsets_read_back == request.tsc_offsets;
            assert_eq!(
                report.tsc_offsets_effective,
                matches && options.tsc_offsets_effective
            );
        }
        Err(e) => {
            let _ = e.to_string();
            match &e {
                ApplyError::VcpuCountMismatch { .. } | ApplyError::InvalidPlan { .. } => {
                    assert_eq!(kvm.writes, 0, "refused up front, yet {} writes", kvm.writes);
                    assert!(
                        !vmm_accepts,
                        "the VMM accepts what the library refuses: {e}"
                    );
                }
                ApplyError::Failed { rollback, .. } => {
                    if rollback.failures.is_empty() {
                        assert_eq!(kvm.offsets, initial, "after {e}");
                        assert!(kvm.khz.iter().all(|k| *k == INITIAL_KHZ), "after {e}");
                    }
                }
            }
        }
    }
});

/// The errnos the simulated ioctls fail with (Linux x86-64 values).
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EBUSY: i32 = 16;
    pub const EFAULT: i32 = 14;
    pub const EINVAL: i32 = 22;
}
