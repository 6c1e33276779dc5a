//! The restore planner, `clockcarry::plan::plan(&SidecarBody, &Destination,
//! &Policy)`, on structured input: local mirror types derive `Arbitrary` and
//! are turned into the library's types. Most fields can be any value; the
//! mirrors also offer the values that make plans succeed (matching host
//! names, common TSC rates, exact scaling ratios, a destination TSC and TAI
//! relative to the capture, destination VMs that are fresh or restored from
//! the saved TSC), so that the properties below are reached often.
//!
//! Properties, each stated in docs/design.md, checked on every plan returned:
//! - one offset per vCPU, all shifted by the same delta: the differences
//!   between vCPUs are kept bit for bit;
//! - same-host when boot id and host name match and the host TSC did not go
//!   back, else cross-host;
//! - every vCPU's TSC at the destination sample reads its capture value
//!   plus `advance_cycles`; same-host keep-running advances by the host
//!   TSC's progress plus the floor (no floor: offsets copied bit for bit),
//!   uses no elapsed time and has a zero bound; freeze advances by the floor
//!   only, with a zero bound; keep-running cross-host advances by
//!   `floor(elapsed_ns * k / 10^6)` plus the floor, so the advance never
//!   falls below the elapsed time at the guest rate;
//! - elapsed time is TAI_dst - TAI_src - estimate, a negative value clamped
//!   to 0 only within the error bound (as `clamped_negative_elapsed_ns`);
//! - in every mode a capture later than the destination's TAI beyond the
//!   brackets and clock errors (or the estimate's bound) is refused, and the
//!   age limit holds;
//! - no vCPU is placed below the destination VM's current TSC, and kvm-clock
//!   not below what the VM's own line (a PVTI read from its memory) gives at
//!   the TSC it holds (floors; checked outside same-host copies, whose
//!   advance wraps);
//! - the rate is set exactly when the destination VM's differs; a guest rate
//!   beyond the tolerance needs a scaling destination that reports its ratio;
//! - kvm-clock follows the captured PVTI, or the derived line lifted by
//!   `DERIVED_LINE_LIFT_NS`: CLOCK_GUEST when the destination has it, else
//!   the calibrated KVM_SET_CLOCK with the policy's window; the bound's
//!   parts add up as documented;
//! - the policy's sync, clock error and age limits hold, and the VM id;
//! - a sidecar `validate` refuses is refused, and planning is deterministic.

#![no_main]

use arbitrary::Arbitrary;
use clockcarry::model::{
    Capabilities, ClockPolicy, ClockQuality, HostIdentity, HostSample, KvmClockSample, LeapPending,
    OffsetEstimate, OnFailure, Policy, Pvti, PvtiSource, RunState, TscFlags, TscScaling,
    VcpuOffset, VmClock,
};
use clockcarry::plan::{
    plan, Destination, ErrorBound, KvmClockAction, Plan, PlanMode, DERIVED_LINE_LIFT_NS,
};
use clockcarry::pvclock::{
    derive_pvti, guest_tsc, pvclock_read, scale_delta, scale_tsc, scaling_ratio,
};
use clockcarry::sidecar::SidecarBody;
use libfuzzer_sys::fuzz_target;

/// TSC rates seen on real hosts and in the design's golden vectors, kHz.
const COMMON_KHZ: [u32; 6] = [
    2_445_411, 2_445_410, 3_000_000, 2_500_000, 1_500_000, 1_000_000,
];
/// KVM_CAP_ADJUST_CLOCK on Linux >= 5.16: TSC_STABLE | REALTIME | HOST_TSC.
const ADJUST_CLOCK_FLAGS: u32 = 14;

/// One of two fixed strings, or any string.
#[derive(Arbitrary, Debug)]
enum Text {
    First,
    Second,
    Raw(String),
}

impl Text {
    fn pick(&self, first: &str, second: &str) -> String {
        match self {
            Text::First => first.to_string(),
            Text::Second => second.to_string(),
            Text::Raw(s) => s.clone(),
        }
    }
}

/// A TSC rate: a common one, one near it, or any.
#[derive(Arbitrary, Debug)]
enum Khz {
    Common(u8),
    Near(u8, i16),
    Raw(u32),
}

impl Khz {
    fn khz(&self) -> u32 {
        let common = |i: &u8| COMMON_KHZ[usize::from(*i) % COMMON_KHZ.len()];
        match self {
            Khz::Common(i) => common(i),
            Khz::Near(i, d) => common(i).saturating_add_signed(i32::from(*d)),
            Khz::Raw(k) => *k,
        }
    }
}

/// A duration or error in ns: small, or any.
#[derive(Arbitrary, Debug)]
enum Ns {
    Small(u16),
    Micros(u32),
    Raw(u64),
}

impl Ns {
    fn ns(&self) -> u64 {
        match self {
            Ns::Small(n) => u64::from(*n),
            Ns::Micros(us) => u64::from(*us) * 1000,
            Ns::Raw(n) => *n,
        }
    }
}

/// A destination counter relative to the source's value, or any value.
#[derive(Arbitrary, Debug)]
enum Rel {
    Same,
    After(u32),
    AfterMs(u32),
    Before(u32),
    Raw(u64),
}

impl Rel {
    fn from(&self, base: u64) -> u64 {
        match self {
            Rel::Same => base,
            Rel::After(d) => base.wrapping_add(u64::from(*d)),
            Rel::AfterMs(ms) => base.wrapping_add(u64::from(*ms) * 1_000_000),
            Rel::Before(d) => base.wrapping_sub(u64::from(*d)),
            Rel::Raw(v) => *v,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct QualityIn {
    synchronised: bool,
    maxerror: Ns,
    esterror: Ns,
    leap: u8,
}

impl QualityIn {
    fn quality(&self) -> ClockQuality {
        ClockQuality {
            synchronised: self.synchronised,
            maxerror_ns: self.maxerror.ns(),
            esterror_ns: self.esterror.ns(),
            leap_pending: match self.leap % 3 {
                0 => LeapPending::None,
                1 => LeapPending::Insert,
                _ => LeapPending::Delete,
            },
        }
    }
}

/// Hardware TSC scaling: none, the exact ratio KVM would use, or any.
#[derive(Arbitrary, Debug)]
enum ScalingIn {
    None,
    Exact { intel: bool },
    Raw { ratio: u64, frac_bits: u8 },
}

impl ScalingIn {
    fn scaling(&self, guest_khz: u32, host_khz: u32) -> Option<TscScaling> {
        match self {
            ScalingIn::None => None,
            ScalingIn::Exact { intel } => {
                scaling_ratio(guest_khz, host_khz, if *intel { 48 } else { 32 })
            }
            ScalingIn::Raw { ratio, frac_bits } => Some(TscScaling {
                ratio: *ratio,
                frac_bits: *frac_bits,
            }),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct CapsIn {
    tsc_offset: bool,
    clock_guest: bool,
    tsc_scaling: bool,
    adjust_clock: Option<u32>,
}

impl CapsIn {
    fn caps(&self) -> Capabilities {
        Capabilities {
            tsc_offset_effective: self.tsc_offset,
            clock_guest: self.clock_guest,
            tsc_scaling: self.tsc_scaling,
            adjust_clock: self.adjust_clock.unwrap_or(ADJUST_CLOCK_FLAGS),
        }
    }
}

/// The captured PVTI: none (the planner derives one), a KVM-like one for
/// the guest rate, or any; its source matches unless `source` says not.
#[derive(Arbitrary, Debug)]
enum PvtiIn {
    None,
    LikeKvm {
        source: u8,
    },
    Raw {
        tsc_timestamp: u64,
        system_time: u64,
        mul: u32,
        shift: i8,
        flags: u8,
        source: u8,
    },
}

fn pvti_source(selector: u8) -> Option<PvtiSource> {
    match selector % 4 {
        0 => Some(PvtiSource::KernelClockGuest),
        1 => Some(PvtiSource::GuestMemory),
        2 => Some(PvtiSource::Derived),
        _ => None,
    }
}

#[derive(Arbitrary, Debug)]
struct VcpuIn {
    /// `None`: the vCPU's index.
    id: Option<u32>,
    tsc_offset: i64,
}

#[derive(Arbitrary, Debug)]
struct KvmClockIn {
    clock: u64,
    /// `None`: TSC_STABLE | REALTIME | HOST_TSC.
    flags: Option<u32>,
    /// `None`: the capture's host TSC.
    host_tsc: Option<u64>,
}

#[derive(Arbitrary, Debug)]
struct SourceIn {
    vm_id: Text,
    /// `None`: the number of vCPUs listed.
    vcpu_count: Option<u32>,
    vcpus: Vec<VcpuIn>,
    paused: bool,
    hostname: Text,
    boot_id: Text,
    kernel_release: Text,
    clocksource: Text,
    host_khz: Khz,
    /// `None`: the host's rate.
    guest_khz: Option<Khz>,
    tsc_flags: (bool, bool, bool),
    host_tsc: u64,
    tai_ns: u64,
    /// `None`: 37 s.
    tai_offset_s: Option<i32>,
    uncertainty: Ns,
    quality: QualityIn,
    pvti: PvtiIn,
    kvmclock: KvmClockIn,
    scaling: ScalingIn,
    caps: CapsIn,
    offset_estimate: Option<EstimateIn>,
    /// `None`: what `SidecarBody::new` writes.
    created_by: Option<String>,
}

/// The destination VM's offsets now.
#[derive(Arbitrary, Debug)]
enum DstOffsetsIn {
    /// A fresh VM: its guest TSC starts near 0.
    Fresh,
    /// Restored by a stock VMM from the saved TSC, `ahead` cycles on.
    Saved {
        ahead: i64,
    },
    Raw(Vec<i64>),
}

/// The PVTI the destination VMM reports for the restored VM.
#[derive(Arbitrary, Debug)]
enum DstPvtiIn {
    None,
    /// The sidecar's line (captured, else derived), re-anchored `reanchor`
    /// cycles later and moved by `shift_ns`.
    SourceLine {
        reanchor: u32,
        shift_ns: i16,
        source: u8,
    },
    Raw {
        tsc_timestamp: u64,
        system_time: u64,
        mul: u32,
        shift: i8,
        flags: u8,
        source: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct DestinationIn {
    hostname: Text,
    boot_id: Text,
    /// `None`: the source host's rate.
    host_khz: Option<Khz>,
    host_tsc: Rel,
    tai_ns: Rel,
    uncertainty: Ns,
    quality: QualityIn,
    /// `None`: the guest rate.
    vm_khz: Option<Khz>,
    /// `None`: as many as the sidecar.
    vm_vcpus: Option<u8>,
    vm_offsets: DstOffsetsIn,
    vm_pvti: DstPvtiIn,
    scaling: ScalingIn,
    caps: CapsIn,
    vm_id: Option<Text>,
    offset_estimate: Option<EstimateIn>,
}

#[derive(Arbitrary, Debug)]
struct PolicyIn {
    freeze: bool,
    max_elapsed_ns: Option<u64>,
    require_sync: bool,
    max_clock_error_ns: Option<u64>,
    vmm_default: bool,
    /// `None`: 250 ppm.
    rate_tolerance_ppm: Option<u32>,
    max_kvmclock_error_ns: u64,
    /// Check the destination VM's own state against the sidecar.
    verify_vm_state: bool,
    /// `None`: 20 ppm.
    offset_drift_ppm: Option<u32>,
    /// `None`: the default allowance, 128 ms.
    unmeasured_offset_ns: Option<u64>,
}

#[derive(Arbitrary, Debug)]
struct Case {
    source: SourceIn,
    destination: DestinationIn,
    policy: PolicyIn,
}

/// A measured inter-host offset, with the optional measurement fields.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct EstimateIn {
    offset_ns: i64,
    bound_ns: u64,
    measured_tai_ns: Option<u64>,
    rounds: Option<u32>,
    best_delay_ns: Option<u64>,
}

fn estimate(e: &Option<EstimateIn>) -> Option<OffsetEstimate> {
    e.map(|e| OffsetEstimate {
        offset_ns: e.offset_ns,
        bound_ns: e.bound_ns,
        measured_tai_ns: e.measured_tai_ns,
        rounds: e.rounds,
        best_delay_ns: e.best_delay_ns,
    })
}

/// The drift term the design states: `ppm` of the time from the
/// measurement to the capture plus from the measurement to the destination
/// sample (on the source's clock), rounded up; the capture instant when the
/// estimate does not say when it was measured.
fn drift_ns(sc: &SidecarBody, dst: &Destination, e: &OffsetEstimate, ppm: u32) -> u64 {
    let capture = i128::from(sc.capture.tai_ns);
    let measured = e.measured_tai_ns.map_or(capture, i128::from);
    let sample = i128::from(dst.sample.tai_ns) - i128::from(e.offset_ns);
    let span = (sample - measured).unsigned_abs() + (capture - measured).unsigned_abs();
    sat(span.saturating_mul(u128::from(ppm)).div_ceil(1_000_000))
}

fn build(case: &Case) -> (SidecarBody, Destination, Policy) {
    let s = &case.source;
    let host_khz = s.host_khz.khz();
    let guest_khz = s.guest_khz.as_ref().map_or(host_khz, Khz::khz);
    let src_scaling = s.scaling.scaling(guest_khz, host_khz);
    let vcpus: Vec<VcpuOffset> = s
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| VcpuOffset {
            id: v.id.unwrap_or(u32::try_from(i).unwrap_or(u32::MAX)),
            tsc_offset: v.tsc_offset,
        })
        .collect();
    let offset0 = vcpus.first().map_or(0, |v| v.tsc_offset);
    let kvmclock = KvmClockSample {
        clock_ns: s.kvmclock.clock,
        flags: s.kvmclock.flags.unwrap_or(ADJUST_CLOCK_FLAGS),
        realtime_ns: s.tai_ns.wrapping_sub(37_000_000_000),
        host_tsc: s.kvmclock.host_tsc.unwrap_or(s.host_tsc),
    };
    let (pvti, source) = match &s.pvti {
        PvtiIn::None => (None, None),
        PvtiIn::LikeKvm { source } => (
            derive_pvti(
                kvmclock.clock_ns,
                kvmclock.host_tsc,
                offset0,
                src_scaling,
                guest_khz,
            ),
            pvti_source(*source),
        ),
        PvtiIn::Raw {
            tsc_timestamp,
            system_time,
            mul,
            shift,
            flags,
            source,
        } => (
            Some(Pvti {
                tsc_timestamp: *tsc_timestamp,
                system_time: *system_time,
                tsc_to_system_mul: *mul,
                tsc_shift: *shift,
                flags: *flags,
            }),
            pvti_source(*source),
        ),
    };
    let vm_clock = VmClock {
        state: if s.paused {
            RunState::Paused
        } else {
            RunState::Running
        },
        tsc_khz: guest_khz,
        vcpus,
        kvmclock,
        pvti,
        pvti_source: source,
        tsc_scaling: src_scaling,
        capabilities: s.caps.caps(),
    };
    let tai_offset_s = s.tai_offset_s.unwrap_or(37);
    let capture = HostSample {
        host_tsc: s.host_tsc,
        tai_ns: s.tai_ns,
        realtime_ns: s
            .tai_ns
            .wrapping_sub((i64::from(tai_offset_s) * 1_000_000_000) as u64),
        tai_offset_s,
        uncertainty_ns: s.uncertainty.ns(),
        quality: s.quality.quality(),
    };
    let identity = HostIdentity {
        hostname: s.hostname.pick("host-a", "host-b"),
        boot_id: s.boot_id.pick("boot-1", "boot-2"),
        kernel_release: s.kernel_release.pick("6.12.0", ""),
        tsc_khz: host_khz,
        tsc_flags: TscFlags {
            constant_tsc: s.tsc_flags.0,
            nonstop_tsc: s.tsc_flags.1,
            tsc_known_freq: s.tsc_flags.2,
        },
        clocksource: s.clocksource.pick("tsc", "kvm-clock"),
    };
    let mut body = SidecarBody::new(s.vm_id.pick("vm-1", "vm-2"), identity, capture, vm_clock);
    if let Some(n) = s.vcpu_count {
        body.vm.vcpu_count = n;
    }
    if let Some(c) = &s.created_by {
        body.created_by = c.clone();
    }
    body.offset_estimate = estimate(&s.offset_estimate);

    let d = &case.destination;
    let dst_host_khz = d.host_khz.as_ref().map_or(host_khz, Khz::khz);
    let dst_vm_khz = d.vm_khz.as_ref().map_or(guest_khz, Khz::khz);
    let dst_scaling = d.scaling.scaling(guest_khz, dst_host_khz);
    let dst_host_tsc = d.host_tsc.from(s.host_tsc);
    let n = d.vm_vcpus.map_or(body.vm_clock.vcpus.len(), usize::from);
    let s_src = scale_tsc(s.host_tsc, src_scaling);
    let s_dst = scale_tsc(dst_host_tsc, dst_scaling);
    let src_offsets = body.vm_clock.offsets();
    let dst_offsets: Vec<i64> = (0..n)
        .map(|i| match &d.vm_offsets {
            DstOffsetsIn::Fresh => 0u64.wrapping_sub(s_dst) as i64,
            DstOffsetsIn::Saved { ahead } => {
                let src = src_offsets.get(i).copied().unwrap_or(0);
                s_src
                    .wrapping_add(src as u64)
                    .wrapping_add(*ahead as u64)
                    .wrapping_sub(s_dst) as i64
            }
            DstOffsetsIn::Raw(v) => v.get(i).copied().unwrap_or(0),
        })
        .collect();
    let source_line = body.vm_clock.pvti.or_else(|| {
        derive_pvti(
            body.vm_clock.kvmclock.clock_ns,
            body.vm_clock.kvmclock.host_tsc,
            offset0,
            src_scaling,
            guest_khz,
        )
    });
    let (dst_pvti, dst_pvti_source) = match &d.vm_pvti {
        DstPvtiIn::None => (None, None),
        DstPvtiIn::SourceLine {
            reanchor,
            shift_ns,
            source,
        } => match source_line {
            Some(line) => {
                let at = line.tsc_timestamp.wrapping_add(u64::from(*reanchor));
                let pvti = Pvti {
                    tsc_timestamp: at,
                    system_time: pvclock_read(&line, at).wrapping_add(*shift_ns as u64),
                    ..line
                };
                (Some(pvti), pvti_source(*source))
            }
            None => (None, None),
        },
        DstPvtiIn::Raw {
            tsc_timestamp,
            system_time,
            mul,
            shift,
            flags,
            source,
        } => (
            Some(Pvti {
                tsc_timestamp: *tsc_timestamp,
                system_time: *system_time,
                tsc_to_system_mul: *mul,
                tsc_shift: *shift,
                flags: *flags,
            }),
            pvti_source(*source),
        ),
    };
    let dst_vm = VmClock {
        state: RunState::Paused,
        tsc_khz: dst_vm_khz,
        vcpus: dst_offsets
            .iter()
            .enumerate()
            .map(|(i, off)| VcpuOffset {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                tsc_offset: *off,
            })
            .collect(),
        kvmclock: KvmClockSample {
            clock_ns: 0,
            flags: ADJUST_CLOCK_FLAGS,
            realtime_ns: 0,
            host_tsc: dst_host_tsc,
        },
        pvti: dst_pvti,
        pvti_source: dst_pvti_source,
        tsc_scaling: dst_scaling,
        capabilities: d.caps.caps(),
    };
    let dst_tai = d.tai_ns.from(s.tai_ns);
    let destination = Destination {
        identity: HostIdentity {
            hostname: d.hostname.pick("host-a", "host-b"),
            boot_id: d.boot_id.pick("boot-1", "boot-2"),
            kernel_release: "6.12.0".into(),
            tsc_khz: dst_host_khz,
            tsc_flags: TscFlags::default(),
            clocksource: "tsc".into(),
        },
        sample: HostSample {
            host_tsc: dst_host_tsc,
            tai_ns: dst_tai,
            realtime_ns: dst_tai.wrapping_sub(37_000_000_000),
            tai_offset_s: 37,
            uncertainty_ns: d.uncertainty.ns(),
            quality: d.quality.quality(),
        },
        vm: dst_vm,
        vm_id: d.vm_id.as_ref().map(|t| t.pick("vm-1", "vm-2")),
        offset_estimate: estimate(&d.offset_estimate),
    };

    (body, destination, policy(&case.policy))
}

/// The policy `p` describes.
fn policy(p: &PolicyIn) -> Policy {
    Policy {
        clock: if p.freeze {
            ClockPolicy::Freeze
        } else {
            ClockPolicy::KeepRunning
        },
        max_elapsed_ns: p.max_elapsed_ns,
        require_sync: p.require_sync,
        max_clock_error_ns: p.max_clock_error_ns,
        on_failure: if p.vmm_default {
            OnFailure::VmmDefault
        } else {
            OnFailure::Abort
        },
        rate_tolerance_ppm: p.rate_tolerance_ppm.unwrap_or(250),
        max_kvmclock_error_ns: p.max_kvmclock_error_ns,
        verify_vm_state: p.verify_vm_state,
        offset_drift_ppm: p.offset_drift_ppm.unwrap_or(20),
        unmeasured_offset_ns: p
            .unmeasured_offset_ns
            .unwrap_or(clockcarry::model::DEFAULT_UNMEASURED_OFFSET_NS),
    }
}

/// |a - b| in ppm of `b`, rounded up (the design's rate comparison).
fn ppm_apart(a: u32, b: u32) -> u128 {
    (u128::from(a.abs_diff(b)) * 1_000_000).div_ceil(u128::from(b.max(1)))
}

fn sat(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The line through `pvti` at `tsc_cycles`, extended below its anchor
/// (where the guest's own formula would wrap), ns.
fn line_at(pvti: &Pvti, tsc_cycles: u64) -> i128 {
    let base = i128::from(pvti.system_time);
    let d = |delta| i128::from(scale_delta(delta, pvti.tsc_to_system_mul, pvti.tsc_shift));
    if tsc_cycles >= pvti.tsc_timestamp {
        base + d(tsc_cycles - pvti.tsc_timestamp)
    } else {
        base - d(pvti.tsc_timestamp - tsc_cycles)
    }
}

fn check_plan(sc: &SidecarBody, dst: &Destination, policy: &Policy, p: &Plan) {
    let src = &sc.vm_clock;
    let k = src.tsc_khz;
    let src_offsets = src.offsets();
    let n = src_offsets.len();

    // One offset per vCPU, one delta for all of them.
    assert_eq!(p.tsc_offsets.len(), n);
    assert!(n >= 1);
    let delta = (p.tsc_offsets[0] as u64).wrapping_sub(src_offsets[0] as u64);
    for (new, old) in p.tsc_offsets.iter().zip(&src_offsets) {
        assert_eq!(
            (*new as u64).wrapping_sub(*old as u64),
            delta,
            "the offsets moved by different amounts"
        );
    }

    // Mode.
    let same_host = sc.source_host.boot_id == dst.identity.boot_id
        && sc.source_host.hostname == dst.identity.hostname
        && dst.sample.host_tsc >= sc.capture.host_tsc;
    assert_eq!(
        p.mode,
        if same_host {
            PlanMode::SameHost
        } else {
            PlanMode::CrossHost
        }
    );
    assert_eq!(p.policy, policy.clock);
    let keep_running = policy.clock == ClockPolicy::KeepRunning;
    let copy = same_host && keep_running;
    let uses_tai = !same_host && keep_running;

    // The scalings the TSC values are computed with: the captured one, and
    // the one the destination VM reports.
    let src_scaling = src.tsc_scaling;
    let dst_scaling = dst.vm.tsc_scaling;
    let s_src = scale_tsc(sc.capture.host_tsc, src_scaling);
    let s_dst = scale_tsc(dst.sample.host_tsc, dst_scaling);
    let captured = |i: usize| guest_tsc(sc.capture.host_tsc, src_scaling, src_offsets[i]);
    assert_eq!(p.guest_tsc_at_capture, captured(0));
    assert_eq!(
        p.guest_tsc_target,
        guest_tsc(dst.sample.host_tsc, dst_scaling, p.tsc_offsets[0])
    );
    assert_eq!(p.destination_host_tsc, dst.sample.host_tsc);

    // Every vCPU reads its capture value plus the advance, in every mode.
    for i in 0..n {
        let placed = guest_tsc(dst.sample.host_tsc, dst_scaling, p.tsc_offsets[i]);
        assert_eq!(
            placed,
            captured(i).wrapping_add(p.advance_cycles),
            "vCPU {i} not at capture + advance"
        );
    }
    if copy {
        // The host TSC's own progress, plus the floor: with no floor the
        // offsets are copied bit for bit.
        assert_eq!(
            p.advance_cycles,
            s_dst.wrapping_sub(s_src).wrapping_add(p.floor_cycles)
        );
        if p.floor_cycles == 0 {
            assert_eq!(p.tsc_offsets, src_offsets, "same host: offsets copied");
        }
        assert_eq!(p.error_bound.total_ns, 0);
    } else {
        // Floors: no vCPU below the destination VM's current TSC.
        for (i, off) in dst.vm.offsets().iter().enumerate().take(n) {
            let current = guest_tsc(dst.sample.host_tsc, dst_scaling, *off);
            let ahead = current.wrapping_sub(captured(i)) as i64;
            if ahead > 0 {
                assert!(
                    p.advance_cycles >= ahead as u64,
                    "vCPU {i}: advance {} below the destination's current TSC ({ahead} ahead)",
                    p.advance_cycles
                );
            }
        }
        if keep_running {
            let base = u128::from(p.elapsed_ns) * u128::from(k) / 1_000_000;
            if let Ok(base) = u64::try_from(base) {
                assert_eq!(
                    u128::from(p.advance_cycles),
                    u128::from(base) + u128::from(p.floor_cycles),
                    "advance is not elapsed x rate + floor"
                );
            }
            assert!(p.advance_cycles >= p.floor_cycles);
        } else {
            assert_eq!(
                p.advance_cycles, p.floor_cycles,
                "freeze advances by the floor only"
            );
            assert_eq!(p.error_bound.total_ns, 0);
        }
    }
    if !uses_tai {
        assert_eq!(p.elapsed_ns, 0);
        assert_eq!(p.clamped_negative_elapsed_ns, 0);
    }

    // Age, elapsed time and a capture in the future, where which offset
    // estimate applies is clear (at most one is given).
    let estimates = [dst.offset_estimate, sc.offset_estimate];
    let given: Vec<&OffsetEstimate> = estimates.iter().flatten().collect();
    // The estimate that applies (the destination's first), its drift term,
    // and the agreement of the two hosts' adjtimex figures with it.
    if let (Some(e), true) = (dst.offset_estimate.or(sc.offset_estimate), uses_tai) {
        let drift = drift_ns(sc, dst, &e, policy.offset_drift_ppm);
        assert_eq!(p.error_bound.offset_estimate_ns, e.bound_ns);
        assert_eq!(p.error_bound.offset_drift_ns, drift, "drift term");
        let (sq, dq) = (&sc.capture.quality, &dst.sample.quality);
        let allowed = sq
            .maxerror_ns
            .saturating_add(dq.maxerror_ns)
            .saturating_add(e.bound_ns)
            .saturating_add(drift);
        if policy.require_sync && sq.synchronised && dq.synchronised {
            assert!(
                e.offset_ns.unsigned_abs() <= allowed,
                "an offset of {} ns beyond the {allowed} ns both synchronised hosts allow \
                 accepted under require_sync",
                e.offset_ns
            );
        }
    }
    // Between two clocks, without an estimate: the policy's allowance.
    let two_clocks = sc.source_host.boot_id != dst.identity.boot_id
        || sc.source_host.hostname != dst.identity.hostname;
    let unmeasured_ns = if given.is_empty() && two_clocks {
        policy.unmeasured_offset_ns
    } else {
        0
    };
    if uses_tai {
        assert_eq!(
            p.error_bound.unmeasured_offset_ns, unmeasured_ns,
            "the allowance for an unmeasured offset"
        );
    }
    if given.len() <= 1 {
        let correction = given.first().map_or(0, |e| i128::from(e.offset_ns));
        let raw = i128::from(dst.sample.tai_ns) - correction - i128::from(sc.capture.tai_ns);
        // Both counters saturate at u64::MAX.
        let clamp = |v: i128| u64::try_from(v).unwrap_or(u64::MAX);
        let clock_ns = match given.first() {
            Some(e) => e
                .bound_ns
                .saturating_add(drift_ns(sc, dst, e, policy.offset_drift_ppm)),
            None => sc
                .capture
                .quality
                .maxerror_ns
                .saturating_add(dst.sample.quality.maxerror_ns)
                .saturating_add(unmeasured_ns),
        };
        let tai_bound = sc
            .capture
            .uncertainty_ns
            .saturating_add(dst.sample.uncertainty_ns)
            .saturating_add(clock_ns);
        let age = if raw >= 0 { clamp(raw) } else { 0 };
        if raw < 0 {
            let ahead = clamp(-raw);
            assert!(
                ahead <= tai_bound,
                "a capture {ahead} ns in the future accepted (bound {tai_bound} ns)"
            );
        }
        if uses_tai {
            assert_eq!(p.elapsed_ns, age);
            assert_eq!(
                p.clamped_negative_elapsed_ns,
                if raw < 0 { clamp(-raw) } else { 0 }
            );
        }
        if let (Some(max), true) = (policy.max_elapsed_ns, uses_tai || given.is_empty()) {
            assert!(
                age <= max,
                "a sidecar {age} ns old accepted with limit {max}"
            );
        }
    }
    if uses_tai {
        assert!(
            p.clamped_negative_elapsed_ns <= p.error_bound.total_ns,
            "skew {} clamped beyond the bound {}",
            p.clamped_negative_elapsed_ns,
            p.error_bound.total_ns
        );
        if p.elapsed_ns > 0 {
            assert_eq!(p.clamped_negative_elapsed_ns, 0);
        }
    }

    // Rates.
    let tolerance = u128::from(policy.rate_tolerance_ppm);
    assert_eq!(p.tsc_khz, (dst.vm.tsc_khz != k).then_some(k));
    if ppm_apart(k, dst.identity.tsc_khz) > tolerance {
        assert!(
            dst.vm.capabilities.tsc_scaling,
            "unscaled beyond the tolerance"
        );
        assert!(dst.vm.tsc_scaling.is_some(), "scaled without a known ratio");
    }

    // kvm-clock and its line.
    let line = match src.pvti {
        Some(pvti) => {
            assert_eq!(Some(p.pvti_source), src.pvti_source);
            pvti
        }
        None => {
            assert_eq!(p.pvti_source, PvtiSource::Derived);
            let derived = derive_pvti(
                src.kvmclock.clock_ns,
                src.kvmclock.host_tsc,
                src_offsets[0],
                src_scaling,
                k,
            )
            .expect("a plan without a PVTI derives one");
            Pvti {
                system_time: derived.system_time.saturating_add(DERIVED_LINE_LIFT_NS),
                ..derived
            }
        }
    };
    assert_eq!(*p.kvmclock.pvti(), line);
    let mut kvmclock_ns = 0u64;
    match p.kvmclock {
        KvmClockAction::ClockGuest { .. } => {
            assert!(dst.vm.capabilities.clock_guest);
        }
        KvmClockAction::SetClock { max_error_ns, .. } => {
            assert!(!dst.vm.capabilities.clock_guest);
            assert_eq!(max_error_ns, policy.max_kvmclock_error_ns);
            // The calibration's window, [0, max] above the line.
            kvmclock_ns = max_error_ns;
        }
    }
    if p.pvti_source == PvtiSource::Derived {
        kvmclock_ns = kvmclock_ns.saturating_add(DERIVED_LINE_LIFT_NS);
    }

    // kvm-clock floor: at the new TSC, not below what the VM's own line (a
    // PVTI read from its memory) gives at the TSC it holds, in every mode
    // but the same-host copy (whose advance wraps by design). Not checked
    // when the floor saturated at u64::MAX: the plan then wraps (see
    // docs/fuzzing.md, "Findings").
    if let (Some(mem), Some(PvtiSource::GuestMemory)) = (dst.vm.pvti, dst.vm.pvti_source) {
        if mem.tsc_to_system_mul != 0 && !copy && p.floor_cycles < u64::MAX {
            let held = guest_tsc(dst.sample.host_tsc, dst_scaling, dst.vm.offsets()[0]);
            let held_ns = line_at(&mem, held);
            let planned_ns = line_at(&line, p.guest_tsc_target);
            assert!(
                planned_ns >= held_ns,
                "kvm-clock placed at {planned_ns} ns, below the {held_ns} ns the VM holds"
            );
        }
    }

    // The error bound.
    let b = &p.error_bound;
    assert_eq!(b.kvmclock_ns, kvmclock_ns);
    let parts = [
        b.source_bracket_ns,
        b.destination_bracket_ns,
        b.source_clock_ns,
        b.destination_clock_ns,
        b.unmeasured_offset_ns,
        b.offset_estimate_ns,
        b.offset_drift_ns,
        b.rate_error_ns,
    ];
    assert_eq!(
        b.total_ns,
        parts.iter().fold(0u64, |acc, x| acc.saturating_add(*x)),
        "the bound's total is not the sum of its parts"
    );
    assert_eq!(
        b.tsc_cycles,
        sat((u128::from(b.total_ns) * u128::from(k)).div_ceil(1_000_000))
    );
    if !uses_tai {
        let zero = ErrorBound {
            kvmclock_ns: b.kvmclock_ns,
            ..ErrorBound::default()
        };
        assert_eq!(*b, zero, "same-host and freeze plans have no TSC bound");
    }

    // Policy limits.
    if uses_tai {
        for q in [&sc.capture.quality, &dst.sample.quality] {
            if policy.require_sync {
                assert!(q.synchronised, "an unsynchronised host accepted");
            }
            if let Some(max) = policy.max_clock_error_ns {
                assert!(q.maxerror_ns <= max, "maxerror beyond the limit accepted");
            }
        }
        if let Some(max) = policy.max_clock_error_ns {
            assert!(b.total_ns <= max, "bound beyond the limit accepted");
        }
    }
    if let Some(id) = &dst.vm_id {
        assert_eq!(*id, sc.vm.id);
    }
}

fuzz_target!(|case: Case| {
    let (sidecar, destination, policy) = build(&case);
    let first = plan(&sidecar, &destination, &policy);
    let second = plan(&sidecar, &destination, &policy);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "planning is not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("planning is not deterministic"),
    }
    match &first {
        Ok(p) => {
            sidecar
                .validate()
                .expect("a plan from a sidecar validate refuses");
            check_plan(&sidecar, &destination, &policy, p);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
