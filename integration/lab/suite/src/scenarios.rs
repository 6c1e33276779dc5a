//! The lab scenarios. Every restore is measured the same way, from the
//! guest's side and exactly:
//!
//! - the source VM A runs the test guest, is captured (clockcarry's
//!   [`capture`] into a sidecar, and the stock save of MSR_IA32_TSC +
//!   KVM_GET_CLOCK), and goes away;
//! - after the blackout a fresh VM is restored (clockcarry's plan + apply, or
//!   the stock MSR write + KVM_SET_CLOCK) and every vCPU reports its TSC,
//!   each report bracketed by host TSC reads;
//! - the lab is one host, so the ideal is known exactly: had A kept running,
//!   its guest TSC would read `host TSC + A's offset`. Hence
//!   `tsc_error_cycles = offset now - A's offset` (read back with
//!   KVM_GET_DEVICE_ATTR, and confirmed by checking that each guest report
//!   equals host TSC + that offset inside its bracket), and
//!   `kvmclock_error_ns = guest kvm-clock - A's PVTI line at the ideal TSC`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clockcarry::host;
use clockcarry::kvm::guest::TestVm;
use clockcarry::kvm::{apply_with, capture, sys, ApplyOptions, ApplyReport, KvmOps, KvmProbe};
use clockcarry::model::{Capabilities, Policy, Pvti, RunState};
use clockcarry::plan::{plan, Destination, Plan, PlanMode};
use clockcarry::pvclock::cycles_to_ns;
use clockcarry::sidecar::{Sidecar, SidecarBody};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::vm::{self, Reading, StockClock, StockSave};

/// Scenario names, in the order they run.
pub const ALL: &[&str] = &["same-host", "four-vcpus", "save-restore"];

/// (rdtsc, CLOCK_TAI, rdtsc) brackets per host sample.
const SAMPLE_TRIES: u32 = 16;
/// Reports of the source guest before capture.
const SOURCE_REPORTS: u32 = 3;
/// How far kvm-clock may sit from the source line at the guest's own TSC
/// after a clockcarry restore here, ns. KVM 6.1 has no KVM_SET_CLOCK_GUEST,
/// so kvm-clock is placed with the calibrated KVM_SET_CLOCK; see docs/lab.md
/// for the figures measured under QEMU TCG.
const KVMCLOCK_TOLERANCE_NS: i64 = 1_000;
/// The source guest's TSC when it starts, in seconds of its own rate: it
/// looks like a VM that has been up for an hour. (A fresh VM's TSC starts
/// near 0, and KVM 6.1 treats a host write of MSR_IA32_TSC that lands
/// within 1 s of what it expects as a "synchronisation" and ignores the
/// value: the stock baseline would measure that heuristic instead of the
/// plain freeze every long-running VM gets.)
const SOURCE_UPTIME_S: u64 = 3_600;
/// Rounding allowance of the cross-host TSC bound, cycles (the bracket
/// midpoint and the ns-to-cycles conversion each truncate once).
const ROUNDING_CYCLES: u64 = 2;

#[derive(Debug, Clone)]
pub struct Options {
    pub inject_failure: bool,
    pub only: Option<Vec<String>>,
    pub blackout_ms: u64,
    pub save_wait_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inject_failure: false,
            only: None,
            blackout_ms: 1_000,
            save_wait_ms: 5_000,
        }
    }
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

/// One JSON line per restore. The first eight fields are the lab's
/// contract (docs/lab.md); the rest explain them.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub env: &'static str,
    pub scenario: String,
    /// `clockcarry` or `stock`.
    pub mode: &'static str,
    /// Host time from the source's capture to the restored guest's first
    /// report, ns (host TSC delta at the host's rate).
    pub blackout_ns: u64,
    /// Restored guest TSC minus the ideal (kept running), cycles; the vCPU
    /// with the largest error.
    pub tsc_error_cycles: i64,
    /// Restored guest kvm-clock minus the source line at the ideal TSC, ns.
    pub kvmclock_error_ns: i64,
    /// KVM_GET_CLOCK reports TSC_STABLE after the restored VM ran.
    pub master_clock: bool,
    /// Neither the guest TSC nor kvm-clock read lower than the source's
    /// last report.
    pub monotonic: bool,
    /// What restored the clock.
    pub restore: &'static str,
    /// The guest's own view across the switch: its first TSC report after
    /// the restore minus its last before the capture, cycles...
    pub guest_tsc_step_cycles: i64,
    /// ...and the same for the kvm-clock it computes, ns.
    pub guest_kvmclock_step_ns: i64,
    pub vcpus: usize,
    /// All vCPUs have the same TSC offset after the restore.
    pub offsets_equal: bool,
    /// Every vCPU's guest report equals host TSC + its offset read back.
    pub offsets_observed: bool,
    /// Restored kvm-clock minus the source line at the guest's own TSC, ns:
    /// how far kvm-clock disagrees with the guest's TSC.
    pub kvmclock_vs_tsc_ns: i64,
    /// The planner's mode (clockcarry rows).
    pub plan_mode: Option<PlanMode>,
    /// The elapsed TAI time the plan used, ns (clockcarry rows).
    pub plan_elapsed_ns: Option<u64>,
    /// The bound `tsc_error_cycles` is checked against (cross-host rows).
    pub tsc_bound_cycles: Option<u64>,
    /// kvm-clock error the apply measured with KVM_GET_CLOCK, ns.
    pub apply_kvmclock_error_ns: Option<i64>,
    pub tsc_khz: u32,
    pub pass: bool,
    pub failed_checks: Vec<String>,
}

/// The lab: /dev/kvm whose TSC offset writes take effect.
pub struct Lab {
    pub kvm: Kvm,
    pub probe: KvmProbe,
    pub caps: Capabilities,
}

impl Lab {
    pub fn open() -> Result<Lab, String> {
        let kvm = TestVm::open_kvm().map_err(|e| e.to_string())?;
        let scratch = TestVm::new(&kvm, 1).map_err(|e| format!("probe VM: {e}"))?;
        let probe = KvmProbe::run(&kvm, &scratch.vm, &scratch.vcpus[0]);
        drop(scratch);
        let caps = probe.capabilities();
        if probe.tsc_offset_effective != Some(true) {
            return Err(format!(
                "TSC offset writes do not take effect on this KVM (probe: {}): this is not \
                 a lab; run it with integration/lab/run",
                serde_json::to_string(&probe).unwrap_or_default()
            ));
        }
        Ok(Lab { kvm, probe, caps })
    }
}

/// What the source side hands to the restore side (in memory, or through
/// files for the save/restore scenario).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub sidecar: SidecarBody,
    /// The source guest's last report before capture.
    pub last: Reading,
    /// What a stock VMM would have saved at the same moment.
    pub stock: StockSave,
}

impl Source {
    fn pvti(&self) -> Result<Pvti, String> {
        self.sidecar
            .vm_clock
            .pvti
            .or(self.last.pvti)
            .ok_or_else(|| "the source has no PVTI".to_string())
    }

    fn khz(&self) -> u32 {
        self.sidecar.vm_clock.tsc_khz
    }
}

/// Runs VM A with `vcpus` vCPUs, captures it; A is returned so the caller
/// decides when it goes away.
fn run_source(lab: &Lab, vcpus: u32, id: &str) -> Result<(TestVm, Source), String> {
    let mut a = TestVm::new(&lab.kvm, vcpus).map_err(|e| format!("VM A: {e}"))?;
    age(&a, lab.probe.vcpu_tsc_khz.unwrap_or(0))?;
    let mut last = vm::report(&mut a, 0)?;
    for _ in 1..SOURCE_REPORTS {
        last = vm::report(&mut a, 0)?;
    }
    if last.pvti.is_none() {
        return Err("VM A's guest has no PVTI after its reports".into());
    }
    let reader = |gpa: u64| a.memory().read_32(gpa);
    let vm_clock = capture(&a.vm, &a.vcpus, &lab.caps, Some(&reader), RunState::Running)
        .map_err(|e| format!("capture: {e}"))?;
    let stock = vm::stock_save(&a)?;
    let sample = host::sample(SAMPLE_TRIES, vm_clock.tsc_khz).map_err(|e| e.to_string())?;
    let identity = host::identity(vm_clock.tsc_khz).map_err(|e| e.to_string())?;
    let sidecar = SidecarBody::new(id, identity, sample, vm_clock);
    Ok((
        a,
        Source {
            sidecar,
            last,
            stock,
        },
    ))
}

/// Sets every vCPU of a new VM (back to back, one offset) so its guest TSC
/// reads [`SOURCE_UPTIME_S`] seconds now.
fn age(vm: &TestVm, khz: u32) -> Result<(), String> {
    if khz == 0 {
        return Err("KVM_GET_TSC_KHZ gave no rate".into());
    }
    let uptime = clockcarry::pvclock::ns_to_cycles(SOURCE_UPTIME_S * 1_000_000_000, khz);
    let offset = uptime.wrapping_sub(host::read_host_tsc()) as i64;
    for (i, v) in vm.vcpus.iter().enumerate() {
        sys::set_tsc_offset(v, offset).map_err(|e| format!("vCPU {i}: {e}"))?;
    }
    Ok(())
}

/// What was measured on a restored VM.
struct Measured {
    offsets: Vec<i64>,
    readings: Vec<Reading>,
    master_clock: bool,
}

/// Runs every vCPU of the restored VM once (non-boot vCPUs start the
/// program now), then reads offsets and KVM_GET_CLOCK.
fn measure(b: &mut TestVm) -> Result<Measured, String> {
    let n = b.vcpus.len();
    for i in 1..n {
        vm::start_ap(&b.vcpus[i]).map_err(|e| format!("vCPU {i}: {e}"))?;
    }
    let mut readings = Vec::with_capacity(n);
    for i in 0..n {
        readings.push(vm::report(b, i)?);
    }
    Ok(Measured {
        offsets: vm::offsets(b)?,
        readings,
        master_clock: vm::master_clock(b)?,
    })
}

/// Collects checks for one row.
struct Checks {
    label: String,
    failed: Vec<String>,
}

impl Checks {
    fn new(label: String) -> Checks {
        Checks {
            label,
            failed: Vec::new(),
        }
    }

    fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            eprintln!("  ok   {}: {name}", self.label);
        } else {
            eprintln!("  FAIL {}: {name}: {}", self.label, detail());
            self.failed.push(name.to_string());
        }
    }
}

struct RowInput<'a> {
    scenario: &'a str,
    mode: &'static str,
    restore: &'static str,
    src: &'a Source,
    m: &'a Measured,
    plan: Option<&'a Plan>,
    apply: Option<&'a ApplyReport>,
}

/// The row's figures (checks are added by the caller).
fn figures(input: &RowInput<'_>) -> Result<Row, String> {
    let src = input.src;
    let m = input.m;
    let khz = src.khz();
    let src_offsets = src.sidecar.vm_clock.offsets();
    if src_offsets.len() != m.offsets.len() {
        return Err("vCPU count changed across the restore".into());
    }
    let tsc_error_cycles = m
        .offsets
        .iter()
        .zip(&src_offsets)
        .map(|(now, then)| now.wrapping_sub(*then))
        .max_by_key(|e| e.unsigned_abs())
        .unwrap_or(0);
    let r0 = m.readings[0];
    let (Some(k0), Some(last_k)) = (r0.kvmclock_ns, src.last.kvmclock_ns) else {
        return Err("a guest report has no kvm-clock (PVTI not filled)".into());
    };
    let source_line = src.pvti()?;
    let ideal_tsc = r0
        .guest_tsc
        .wrapping_sub(m.offsets[0] as u64)
        .wrapping_add(src_offsets[0] as u64);
    let clamp = |v: i128| i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX });
    let kvmclock_error_ns = clamp(i128::from(k0) - vm::line_at(&source_line, ideal_tsc));
    let kvmclock_vs_tsc_ns = clamp(i128::from(k0) - vm::line_at(&source_line, r0.guest_tsc));
    let blackout_cycles = r0
        .host_tsc_before
        .saturating_sub(src.sidecar.capture.host_tsc);
    Ok(Row {
        env: "lab",
        scenario: input.scenario.to_string(),
        mode: input.mode,
        blackout_ns: cycles_to_ns(blackout_cycles, khz).unwrap_or(0),
        tsc_error_cycles,
        kvmclock_error_ns,
        master_clock: m.master_clock,
        monotonic: r0.guest_tsc >= src.last.guest_tsc && k0 >= last_k,
        restore: input.restore,
        guest_tsc_step_cycles: r0.guest_tsc.wrapping_sub(src.last.guest_tsc) as i64,
        guest_kvmclock_step_ns: clamp(i128::from(k0) - i128::from(last_k)),
        vcpus: m.offsets.len(),
        offsets_equal: m.offsets.windows(2).all(|w| w[0] == w[1]),
        offsets_observed: m
            .readings
            .iter()
            .all(|r| r.matches_offset(m.offsets[r.vcpu])),
        kvmclock_vs_tsc_ns,
        plan_mode: input.plan.map(|p| p.mode),
        plan_elapsed_ns: input.plan.map(|p| p.elapsed_ns),
        tsc_bound_cycles: None,
        apply_kvmclock_error_ns: input
            .apply
            .and_then(|a| a.kvmclock.as_ref())
            .and_then(|k| k.error_ns),
        tsc_khz: khz,
        pass: true,
        failed_checks: Vec::new(),
    })
}

fn emit(mut row: Row, checks: Checks) -> bool {
    row.pass = checks.failed.is_empty();
    row.failed_checks = checks.failed;
    match serde_json::to_string(&row) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("lab-suite: cannot serialise a row: {e}");
            return false;
        }
    }
    eprintln!(
        "{} {}/{}: blackout {:.3} s, TSC error {} cycles, kvm-clock error {} ns, \
         kvm-clock vs TSC {} ns, master clock {}, monotonic {}",
        if row.pass { "PASS" } else { "FAIL" },
        row.scenario,
        row.restore,
        row.blackout_ns as f64 / 1e9,
        row.tsc_error_cycles,
        row.kvmclock_error_ns,
        row.kvmclock_vs_tsc_ns,
        row.master_clock,
        row.monotonic
    );
    row.pass
}

/// Another boot_id for the "destination": the planner then takes the
/// cross-host path (elapsed TAI x rate), on a host where the truth is known.
fn other_boot_id(boot_id: &str) -> String {
    let mut chars: Vec<char> = boot_id.chars().collect();
    if let Some(last) = chars.last_mut() {
        *last = if *last == '0' { '1' } else { '0' };
    }
    chars.into_iter().collect()
}

/// A fresh VM restored by clockcarry: run once (a fresh VM is not in
/// master-clock mode until a vCPU has run; that report is discarded),
/// captured, planned for, applied to.
fn restore_clockcarry(
    lab: &Lab,
    src: &Source,
    cross_host: bool,
    inject_failure: bool,
) -> Result<(TestVm, Plan, ApplyReport), String> {
    let mut b = TestVm::new(&lab.kvm, src.sidecar.vm.vcpu_count).map_err(|e| e.to_string())?;
    vm::report(&mut b, 0)?;
    let reader = |gpa: u64| b.memory().read_32(gpa);
    let vm_clock = capture(&b.vm, &b.vcpus, &lab.caps, Some(&reader), RunState::Paused)
        .map_err(|e| format!("destination capture: {e}"))?;
    let sample = host::sample(SAMPLE_TRIES, vm_clock.tsc_khz).map_err(|e| e.to_string())?;
    let mut identity = host::identity(vm_clock.tsc_khz).map_err(|e| e.to_string())?;
    if cross_host {
        identity.boot_id = other_boot_id(&identity.boot_id);
    }
    let dst = Destination {
        identity,
        sample,
        vm: vm_clock,
        vm_id: None,
        offset_estimate: None,
    };
    // The destination is a fresh VM that ran once, not one restored from the
    // source's state: its memory holds its own kvm-clock line, not the
    // source's, so the restored-state check does not apply.
    let policy = Policy {
        verify_vm_state: false,
        ..Policy::default()
    };
    let plan = plan(&src.sidecar, &dst, &policy).map_err(|e| format!("plan: {e}"))?;
    let report = apply_with(
        &mut KvmOps::new(&b.vm, &b.vcpus),
        &plan,
        &ApplyOptions::from_probe(&lab.probe),
    )
    .map_err(|e| format!("apply: {e}"))?;
    if inject_failure {
        // --inject-failure: one cycle off on vCPU 0, after apply verified.
        let off = plan.tsc_offsets[0].wrapping_add(1);
        sys::set_tsc_offset(&b.vcpus[0], off).map_err(|e| e.to_string())?;
        eprintln!("  INJECTED FAILURE: vCPU 0's TSC offset moved by +1 cycle after apply");
    }
    Ok((b, plan, report))
}

/// The clockcarry row of a scenario, with its checks.
#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn clockcarry_row(
    lab: &Lab,
    scenario: &str,
    src: &Source,
    cross_host: bool,
    inject_failure: bool,
) -> Result<bool, String> {
    let (mut b, plan, report) = restore_clockcarry(lab, src, cross_host, inject_failure)?;
    let m = measure(&mut b)?;
    let restore = if cross_host {
        "clockcarry: cross-host plan (elapsed TAI x rate) + apply"
    } else {
        "clockcarry: same-host plan + apply"
    };
    let mut row = figures(&RowInput {
        scenario,
        mode: "clockcarry",
        restore,
        src,
        m: &m,
        plan: Some(&plan),
        apply: Some(&report),
    })?;
    let mut c = Checks::new(format!("{scenario}/clockcarry"));
    let want_mode = if cross_host {
        PlanMode::CrossHost
    } else {
        PlanMode::SameHost
    };
    c.check("plan mode", plan.mode == want_mode, || {
        format!("{:?}, expected {want_mode:?}", plan.mode)
    });
    c.check(
        "apply says the offsets are in effect",
        report.tsc_offsets_effective,
        || format!("offsets read back {:?}", report.offsets_read_back),
    );
    if cross_host {
        let b = &plan.error_bound;
        let bound_ns = b
            .source_bracket_ns
            .saturating_add(b.destination_bracket_ns)
            .saturating_add(b.rate_error_ns);
        let bound_cycles = clockcarry::pvclock::ns_to_cycles(bound_ns, src.khz())
            .saturating_add(1)
            .saturating_add(ROUNDING_CYCLES);
        row.tsc_bound_cycles = Some(bound_cycles);
        c.check(
            "guest TSC advanced by elapsed TAI x rate within the bracket error",
            row.tsc_error_cycles.unsigned_abs() <= bound_cycles,
            || {
                format!(
                    "error {} cycles, bound {bound_cycles} cycles (brackets {} + {} ns, rate {} ns)",
                    row.tsc_error_cycles,
                    b.source_bracket_ns,
                    b.destination_bracket_ns,
                    b.rate_error_ns
                )
            },
        );
        c.check(
            "kvm-clock within the bound of the ideal",
            row.kvmclock_error_ns.unsigned_abs()
                <= bound_ns.saturating_add(KVMCLOCK_TOLERANCE_NS as u64),
            || format!("{} ns", row.kvmclock_error_ns),
        );
    } else {
        c.check(
            "guest TSC advanced by exactly the host TSC delta (0 cycles)",
            row.tsc_error_cycles == 0,
            || {
                format!(
                    "error {} cycles (offsets now {:?})",
                    row.tsc_error_cycles, m.offsets
                )
            },
        );
    }
    c.check(
        "every vCPU's guest TSC = host TSC + its offset",
        row.offsets_observed,
        || format!("{:?} with offsets {:?}", m.readings, m.offsets),
    );
    c.check("all vCPU offsets equal", row.offsets_equal, || {
        format!("{:?}", m.offsets)
    });
    c.check(
        "master clock on (TSC_STABLE)",
        row.master_clock,
        String::new,
    );
    c.check("monotonic", row.monotonic, || {
        format!(
            "last source report {:?}, first {:?}",
            src.last, m.readings[0]
        )
    });
    c.check(
        "kvm-clock follows the source line at the guest's TSC",
        row.kvmclock_vs_tsc_ns.abs() <= KVMCLOCK_TOLERANCE_NS,
        || {
            format!(
                "{} ns (tolerance {KVMCLOCK_TOLERANCE_NS} ns; apply measured {:?})",
                row.kvmclock_vs_tsc_ns,
                report.kvmclock.as_ref().map(|k| &k.try_errors_ns)
            )
        },
    );
    Ok(emit(row, c))
}

/// A stock row: fresh VM, MSR_IA32_TSC written back, KVM_SET_CLOCK, run.
/// The check is that the baseline behaves as documented: the TSC lost the
/// blackout (it froze), and kvm-clock froze with it or ran on without it.
fn stock_row(lab: &Lab, scenario: &str, src: &Source, clock: StockClock) -> Result<bool, String> {
    let mut c_vm = TestVm::new(&lab.kvm, src.sidecar.vm.vcpu_count).map_err(|e| e.to_string())?;
    vm::stock_restore(&c_vm, &src.stock, clock)?;
    let m = measure(&mut c_vm)?;
    let row = figures(&RowInput {
        scenario,
        mode: "stock",
        restore: clock.describe(),
        src,
        m: &m,
        plan: None,
        apply: None,
    })?;
    let mut c = Checks::new(format!("{scenario}/{}", clock.tag()));
    let blackout_cycles = clockcarry::pvclock::ns_to_cycles(row.blackout_ns, src.khz());
    let half_blackout_ns = i64::try_from(row.blackout_ns / 2).unwrap_or(i64::MAX);
    c.check(
        "the stock TSC froze over the blackout",
        row.tsc_error_cycles.unsigned_abs() >= blackout_cycles / 2 && row.tsc_error_cycles < 0,
        || {
            format!(
                "error {} cycles over a blackout of {blackout_cycles} cycles",
                row.tsc_error_cycles
            )
        },
    );
    match clock {
        StockClock::Frozen => c.check(
            "the stock kvm-clock froze with it",
            row.kvmclock_error_ns <= -half_blackout_ns,
            || format!("{} ns", row.kvmclock_error_ns),
        ),
        StockClock::Realtime => c.check(
            "the stock kvm-clock ran on without the TSC",
            row.kvmclock_vs_tsc_ns >= half_blackout_ns,
            || format!("{} ns", row.kvmclock_vs_tsc_ns),
        ),
    }
    Ok(emit(row, c))
}

/// One blackout, restored three ways: clockcarry, and both stock baselines.
fn restore_all(
    lab: &Lab,
    scenario: &str,
    src: &Source,
    cross_host: bool,
    inject_failure: bool,
) -> Result<usize, String> {
    let mut failed = 0;
    if !clockcarry_row(lab, scenario, src, cross_host, inject_failure)? {
        failed += 1;
    }
    for clock in [StockClock::Frozen, StockClock::Realtime] {
        if !stock_row(lab, scenario, src, clock)? {
            failed += 1;
        }
    }
    Ok(failed)
}

/// Same host, one process: capture, the source VM goes away, blackout,
/// restore into fresh VMs.
fn same_host(lab: &Lab, scenario: &str, vcpus: u32, opts: &Options) -> Result<usize, String> {
    eprintln!(
        "== {scenario}: {vcpus} vCPU(s), same host, {} ms blackout",
        opts.blackout_ms
    );
    let (a, src) = run_source(lab, vcpus, &format!("lab-{scenario}"))?;
    let captured = Instant::now();
    drop(a);
    sleep_until(captured + Duration::from_millis(opts.blackout_ms));
    // The failure injection sits in the first scenario only.
    let inject = opts.inject_failure && scenario == "same-host";
    restore_all(lab, scenario, &src, false, inject)
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

fn lab_file(sidecar: &Path) -> PathBuf {
    let mut name = sidecar.as_os_str().to_owned();
    name.push(".lab.json");
    PathBuf::from(name)
}

/// The lab's extras next to the sidecar: the source guest's last report and
/// the stock save.
#[derive(Serialize, Deserialize)]
struct SavedExtras {
    last: Reading,
    stock: StockSave,
}

/// `lab-suite save --out FILE`: VM A runs, is captured into a sealed sidecar
/// at FILE (clockcarry's own writer), and the process exits (A goes away).
pub fn save_child(out: &str) -> Result<usize, String> {
    let lab = Lab::open()?;
    let (a, src) = run_source(&lab, 1, "lab-save-restore")?;
    drop(a);
    let path = Path::new(out);
    Sidecar::seal(src.sidecar, None)
        .and_then(|s| s.write_to(path))
        .map_err(|e| format!("writing the sidecar: {e}"))?;
    let extras = SavedExtras {
        last: src.last,
        stock: src.stock,
    };
    let bytes = serde_json::to_vec(&extras).map_err(|e| e.to_string())?;
    std::fs::write(lab_file(path), bytes).map_err(|e| e.to_string())?;
    eprintln!("  saved {out}");
    Ok(0)
}

/// `lab-suite restore --from FILE`: a new process reads the sidecar and
/// restores it into fresh VMs. The plan is given a destination whose
/// boot_id differs (everything else is this host's), so the planner takes
/// its cross-host path: elapsed CLOCK_TAI x rate, on a host where the ideal
/// is still known exactly.
pub fn restore_child(from: &str, opts: &Options) -> Result<usize, String> {
    let lab = Lab::open()?;
    let path = Path::new(from);
    let sidecar = Sidecar::read_from(path, None).map_err(|e| format!("reading {from}: {e}"))?;
    let bytes = std::fs::read(lab_file(path)).map_err(|e| e.to_string())?;
    let extras: SavedExtras = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let src = Source {
        sidecar: sidecar.body,
        last: extras.last,
        stock: extras.stock,
    };
    restore_all(&lab, "save-restore", &src, true, opts.inject_failure)
}

fn child(args: &[&str]) -> Result<std::process::ExitStatus, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(&exe)
        .args(args)
        .status()
        .map_err(|e| format!("running {} {}: {e}", exe.display(), args.join(" ")))
}

pub fn run_all(opts: &Options) -> Result<usize, String> {
    let lab = Lab::open()?;
    eprintln!(
        "lab-suite: kernel {}, KVM TSC {} kHz, capabilities {}",
        host::kernel_release().unwrap_or_default(),
        lab.probe.vcpu_tsc_khz.unwrap_or(0),
        serde_json::to_string(&lab.caps).unwrap_or_default()
    );
    let mut failed = 0usize;
    let mut total = 0usize;

    // The save half first: the other scenarios run during its wait.
    let dir = std::env::temp_dir().join(format!("lab-suite-{}", std::process::id()));
    let sidecar = dir.join("vm.sidecar.json");
    let mut saved_tai_ns = None;
    if opts.wants("save-restore") {
        eprintln!(
            "== save-restore: save to a file (process 1), wait {} ms, restore (process 2)",
            opts.save_wait_ms
        );
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = sidecar.to_str().ok_or("temp path is not UTF-8")?;
        let status = child(&["save", "--out", path])?;
        if !status.success() {
            return Err(format!("the save process failed: {status}"));
        }
        let saved = Sidecar::read_from(&sidecar, None).map_err(|e| e.to_string())?;
        saved_tai_ns = Some(saved.body.capture.tai_ns);
    }

    for (scenario, vcpus) in [("same-host", 1), ("four-vcpus", 4)] {
        if opts.wants(scenario) {
            failed += same_host(&lab, scenario, vcpus, opts)?;
            total += 3;
        }
    }

    if let Some(tai_ns) = saved_tai_ns {
        let until = tai_ns.saturating_add(opts.save_wait_ms.saturating_mul(1_000_000));
        loop {
            let now = host::tai_now_ns().map_err(|e| e.to_string())?;
            if now >= until {
                break;
            }
            std::thread::sleep(Duration::from_nanos((until - now).min(100_000_000)));
        }
        eprintln!("== save-restore: restoring in a new process");
        let path = sidecar.to_str().ok_or("temp path is not UTF-8")?;
        let status = child(&["restore", "--from", path])?;
        total += 3;
        match status.code() {
            Some(n @ 0..=100) => failed += n as usize,
            _ => return Err(format!("the restore process failed: {status}")),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    eprintln!("lab-suite: {} passed, {} failed", total - failed, failed);
    Ok(failed)
}
