//! The clock state types every part of clockcarry speaks.
//!
//! Field names carry their unit (`_ns`, `_khz`, `_cycles`, `host_tsc`,
//! `tai_`). Where a type mirrors a kernel structure (the pvclock page, the
//! kvm_clock_data sample) the JSON names are the kernel's, and the unit is
//! stated on the field. These types are plain data: every check lives in the
//! sidecar validator and the planner.

use serde::{Deserialize, Serialize};

/// `KVM_CLOCK_TSC_STABLE`: KVM is in master-clock mode.
pub const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// `KVM_CLOCK_REALTIME`: `realtime` is valid (GET) / honour it (SET).
pub const KVM_CLOCK_REALTIME: u32 = 4;
/// `KVM_CLOCK_HOST_TSC`: `host_tsc` is valid (GET).
pub const KVM_CLOCK_HOST_TSC: u32 = 8;
/// pvclock flag bit 0: the TSC is stable across vCPUs.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1;
/// pvclock flag bit 1: the host stopped the guest (watchdog may forgive).
pub const PVCLOCK_GUEST_STOPPED: u8 = 2;

/// Whether a leap second is pending at the end of the current UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LeapPending {
    #[default]
    None,
    Insert,
    Delete,
}

/// The host clock's own view of its quality (read-only `adjtimex`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockQuality {
    /// False when adjtimex says TIME_ERROR or STA_UNSYNC.
    pub synchronised: bool,
    /// Kernel's maximum error bound, in ns (adjtimex reports µs).
    pub maxerror_ns: u64,
    /// Kernel's estimated error, in ns (adjtimex reports µs).
    pub esterror_ns: u64,
    pub leap_pending: LeapPending,
}

/// One instant on a host, read as an atomic pair: the host TSC and
/// CLOCK_TAI, taken as the narrowest `(rdtsc, clock_gettime, rdtsc)` bracket.
///
/// Invariant: the true TAI time at which the TSC read `host_tsc` lies within
/// `tai_ns ± uncertainty_ns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSample {
    /// Host TSC, in cycles (the counter KVM reads as `host_tsc`).
    pub host_tsc: u64,
    /// CLOCK_TAI at that instant, ns since the epoch.
    pub tai_ns: u64,
    /// CLOCK_REALTIME at the same instant (`tai_ns - tai_offset_s`), ns.
    pub realtime_ns: u64,
    /// TAI - UTC in seconds used for `realtime_ns` (0 = the kernel does not know).
    pub tai_offset_s: i32,
    /// Half the bracket width converted to ns: the pair's uncertainty.
    pub uncertainty_ns: u64,
    pub quality: ClockQuality,
}

/// The TSC flags the host's CPU advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TscFlags {
    pub constant_tsc: bool,
    pub nonstop_tsc: bool,
    pub tsc_known_freq: bool,
}

/// Who the host is: decides same-host versus cross-host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostIdentity {
    pub hostname: String,
    /// `/proc/sys/kernel/random/boot_id`: changes on every boot.
    pub boot_id: String,
    pub kernel_release: String,
    /// Host TSC rate in kHz (as KVM sees it).
    pub tsc_khz: u32,
    pub tsc_flags: TscFlags,
    /// The current clocksource (`tsc`, `kvm-clock`, `hpet`, ...).
    pub clocksource: String,
}

/// Whether the VM's vCPUs were running or paused when it was sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Paused,
}

/// Hardware TSC scaling: `guest = (host * ratio) >> frac_bits + offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TscScaling {
    pub ratio: u64,
    /// 48 on Intel VMX, 32 on AMD SVM.
    pub frac_bits: u8,
}

/// One `KVM_GET_CLOCK` answer (struct kvm_clock_data).
///
/// Invariant when `flags` has REALTIME|HOST_TSC: `clock` is kvm-clock at the
/// host TSC value `host_tsc`, and `realtime` is CLOCK_REALTIME at that same
/// TSC read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmClockSample {
    /// kvm-clock, ns.
    #[serde(rename = "clock")]
    pub clock_ns: u64,
    pub flags: u32,
    /// CLOCK_REALTIME, ns since the epoch (valid with KVM_CLOCK_REALTIME).
    #[serde(rename = "realtime")]
    pub realtime_ns: u64,
    /// Host TSC, cycles (valid with KVM_CLOCK_HOST_TSC).
    pub host_tsc: u64,
}

impl KvmClockSample {
    /// True when the sample carries an atomic (clock, host_tsc) pair.
    pub fn has_host_tsc(&self) -> bool {
        self.flags & KVM_CLOCK_HOST_TSC != 0
    }
}

/// struct pvclock_vcpu_time_info, the guest-visible TSC-to-ns line.
///
/// kvm-clock(tsc) = system_time + ((tsc - tsc_timestamp) scaled by
/// 2^tsc_shift * tsc_to_system_mul / 2^32); see [`crate::pvclock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pvti {
    /// Guest TSC, cycles, at which the line passes through `system_time`.
    pub tsc_timestamp: u64,
    /// kvm-clock, ns, at `tsc_timestamp`.
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
}

/// Where a captured PVTI came from, from most to least direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PvtiSource {
    /// `KVM_GET_CLOCK_GUEST` on the boot vCPU: the kernel's own copy.
    KernelClockGuest,
    /// Read from guest memory at the page MSR_KVM_SYSTEM_TIME_NEW names.
    GuestMemory,
    /// Computed from the KVM_GET_CLOCK pair, the offset and the rate, the
    /// way KVM computes it (exact line, re-anchored point).
    Derived,
}

/// What the running kernel lets a VMM do with the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// The vCPU TSC offset attribute exists **and writes take effect**
    /// (`tsc_offset` in sidecar v1 and on the wire).
    #[serde(rename = "tsc_offset")]
    pub tsc_offset_effective: bool,
    /// KVM_{GET,SET}_CLOCK_GUEST answered.
    pub clock_guest: bool,
    /// Hardware TSC scaling (KVM_CAP_TSC_CONTROL).
    pub tsc_scaling: bool,
    /// KVM_CAP_ADJUST_CLOCK as a flag set (14 on >= 5.16).
    pub adjust_clock: u32,
}

/// One vCPU's TSC offset (KVM stores it as u64 two's complement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuOffset {
    pub id: u32,
    /// Guest TSC minus (scaled) host TSC, cycles.
    pub tsc_offset: i64,
}

/// A VM's clock as the hypervisor reports it (the `GET vm.clock` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmClock {
    pub state: RunState,
    /// Guest TSC rate, kHz (KVM_GET_TSC_KHZ).
    pub tsc_khz: u32,
    pub vcpus: Vec<VcpuOffset>,
    pub kvmclock: KvmClockSample,
    pub pvti: Option<Pvti>,
    #[serde(default)]
    pub pvti_source: Option<PvtiSource>,
    /// Known scaling ratio; `None` means "not reported".
    #[serde(default)]
    pub tsc_scaling: Option<TscScaling>,
    pub capabilities: Capabilities,
}

impl VmClock {
    /// The offsets in vCPU order.
    pub fn offsets(&self) -> Vec<i64> {
        self.vcpus.iter().map(|v| v.tsc_offset).collect()
    }
}

/// An estimate of (destination TAI - source TAI) measured between the two
/// hosts, NTP-style over the migration network (`crate::peer`).
///
/// The three measurement fields are optional and written only when set, so
/// a sidecar without them keeps its exact bytes (and digest); a reader
/// older than them refuses a sidecar that carries them (unknown field)
/// rather than plan without the drift term they enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OffsetEstimate {
    /// Destination clock minus source clock, ns.
    pub offset_ns: i64,
    /// |true offset - offset_ns| <= bound_ns at the measurement instant
    /// (half the best round trip plus the clock-read uncertainties).
    pub bound_ns: u64,
    /// When it was measured, CLOCK_TAI ns on the source's clock; the
    /// planner widens the bound by the drift since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_tai_ns: Option<u64>,
    /// Rounds exchanged (the best one was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u32>,
    /// Round trip of the best round, less the peer's processing time, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_delay_ns: Option<u64>,
}

/// Keep the guest's clocks counting through the blackout, or freeze them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClockPolicy {
    #[default]
    KeepRunning,
    Freeze,
}

/// What the caller should do when the plan cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Leave the VM paused and fail.
    #[default]
    Abort,
    /// Leave the VM as the VMM itself would have left it.
    VmmDefault,
}

/// The operator's rules for a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub clock: ClockPolicy,
    /// Refuse when the TAI time since capture exceeds this.
    pub max_elapsed_ns: Option<u64>,
    /// Refuse when either host's clock is not synchronised.
    pub require_sync: bool,
    /// Refuse when the plan's error bound exceeds this.
    pub max_clock_error_ns: Option<u64>,
    pub on_failure: OnFailure,
    /// Rate difference KVM accepts without scaling (KVM: 250 ppm).
    pub rate_tolerance_ppm: u32,
    /// Target for the KVM_SET_CLOCK calibration loop.
    pub max_kvmclock_error_ns: u64,
    /// Refuse a sidecar the destination VM's own restored state contradicts
    /// (its kvm-clock line in guest memory, its TSC ahead of anything this
    /// sidecar allows): another VM's sidecar, or one older than a restore.
    /// Off only for callers whose destination VM is not a restored one.
    #[serde(default = "default_true")]
    pub verify_vm_state: bool,
    /// How fast either host's clock may gain or lose on true time, ppm,
    /// between an offset measurement and its use: the bound of a measured
    /// offset grows by this much of the time since it was measured
    /// ([`DEFAULT_OFFSET_DRIFT_PPM`]; docs/offset-exchange.md).
    #[serde(default = "default_offset_drift_ppm")]
    pub offset_drift_ppm: u32,
    /// How far apart the two hosts' TAI clocks may be beyond what their
    /// adjtimex maxerrors claim, when the offset between them was not
    /// measured and the two readings come from different clocks (another
    /// host, or another boot): a cross-host plan's bound includes it
    /// ([`DEFAULT_UNMEASURED_OFFSET_NS`]; 0 trusts the claims).
    #[serde(default = "default_unmeasured_offset_ns")]
    pub unmeasured_offset_ns: u64,
}

/// Default of [`Policy::unmeasured_offset_ns`]: ntpd's step threshold. A
/// daemon that calls its clock synchronised slews, not steps, any error
/// below 128 ms, and its maxerror is a claim nothing on the destination
/// checks; a host whose daemon is misconfigured (another server, a stepped
/// clock) can claim a small maxerror while being off by that much
/// (docs/crosshost.md, "The error budget").
pub const DEFAULT_UNMEASURED_OFFSET_NS: u64 = 128_000_000;

fn default_unmeasured_offset_ns() -> u64 {
    DEFAULT_UNMEASURED_OFFSET_NS
}

/// Default of [`Policy::offset_drift_ppm`]: an NTP- or PTP-disciplined
/// clock holds its frequency to about 1 ppm; 20 ppm also covers a clock
/// whose discipline lapsed minutes ago (temperature, a fresh boot).
pub const DEFAULT_OFFSET_DRIFT_PPM: u32 = 20;

fn default_true() -> bool {
    true
}

fn default_offset_drift_ppm() -> u32 {
    DEFAULT_OFFSET_DRIFT_PPM
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            clock: ClockPolicy::KeepRunning,
            max_elapsed_ns: None,
            require_sync: false,
            max_clock_error_ns: None,
            on_failure: OnFailure::Abort,
            rate_tolerance_ppm: 250,
            max_kvmclock_error_ns: 50,
            verify_vm_state: true,
            offset_drift_ppm: DEFAULT_OFFSET_DRIFT_PPM,
            unmeasured_offset_ns: DEFAULT_UNMEASURED_OFFSET_NS,
        }
    }
}
