//! `clockcarry check`: is this host ready to capture and restore clocks?

use clap::Args;
use clockcarry::host;
use clockcarry::model::LeapPending;
use serde::Serialize;

use super::common::{print_json, print_text};
use super::exit::{CliResult, Exit, EXIT_STATUS_HELP};
use super::hostinfo;
use super::units::human_ns;

/// maxerror above which `check` warns when no --max-clock-error is given.
const DEFAULT_MAXERROR_WARN_NS: u64 = 100_000_000;
/// Sample uncertainty above which `check` warns.
const UNCERTAINTY_WARN_NS: u64 = 1_000;

const LONG_ABOUT: &str = "\
Check that this host is ready to capture and restore guest clocks.

DESCRIPTION
    Reads the host's clock state and capabilities, changes nothing, and
    prints one line per check with pass, warn, fail, info or skip:

    tai_offset        the kernel knows TAI - UTC (adjtimex tai != 0); without
                      it CLOCK_TAI is UTC and hosts may disagree by 37 s  [fail]
    synchronised      adjtimex reports the clock synchronised             [fail]
    maxerror          adjtimex maximum error; above --max-clock-error     [fail]
                      (default: warn above 100 ms)
    leap_pending      a leap second is pending today                      [warn]
    constant_tsc,     the CPU's TSC runs at a constant rate and does not
    nonstop_tsc       stop in idle states                                 [fail]
    clocksource       timekeeping runs on the TSC                         [warn]
    host_tsc_khz      the host TSC rate and where it came from            [info]
    sample            uncertainty of a (TSC, TAI) pair                    [warn]
    kvm.*             with /dev/kvm accessible (root) and feature kvm: a
                      scratch VM is created to probe KVM_CAP_ADJUST_CLOCK,
                      the TSC offset attribute and whether writes to it take
                      effect (inert offsets: fail), KVM_SET_CLOCK_GUEST, TSC
                      scaling, KVMCLOCK_CTRL and KVM_GET_TSC_KHZ.

    Exits 0 when no check failed, 7 otherwise.";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    clockcarry check
    clockcarry check --max-clock-error 10ms --json"
    )
}

/// Check that this host is ready to capture and restore guest clocks.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct CheckArgs {
    /// Fail when the host clock's maxerror exceeds this.
    #[arg(long, value_name = "DUR", value_parser = super::parse_dur)]
    max_clock_error: Option<u64>,
    /// Skip the KVM probe.
    #[arg(long)]
    no_kvm: bool,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Pass,
    Warn,
    Fail,
    Info,
    Skip,
}

#[derive(Debug, Serialize)]
struct Item {
    name: &'static str,
    status: Status,
    value: String,
    detail: String,
}

#[derive(Serialize)]
struct CheckOutput {
    ready: bool,
    checks: Vec<Item>,
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    kvm_probe: Option<clockcarry::kvm::KvmProbe>,
}

fn item(
    name: &'static str,
    status: Status,
    value: impl Into<String>,
    detail: impl Into<String>,
) -> Item {
    Item {
        name,
        status,
        value: value.into(),
        detail: detail.into(),
    }
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn host_checks(args: &CheckArgs, items: &mut Vec<Item>) {
    match host::clock_quality() {
        Ok((q, tai)) => {
            items.push(if tai > 0 {
                item(
                    "tai_offset",
                    Status::Pass,
                    format!("{tai} s"),
                    "CLOCK_TAI = UTC + offset",
                )
            } else {
                item(
                    "tai_offset",
                    Status::Fail,
                    "0 (unset)",
                    "the kernel does not know TAI - UTC: CLOCK_TAI equals UTC, leap seconds leak \
                     in and hosts that set it disagree by 37 s; set it (chrony leapsectz, ntpd \
                     leapfile, ptp4l)",
                )
            });
            items.push(if q.synchronised {
                item(
                    "synchronised",
                    Status::Pass,
                    "yes",
                    "adjtimex: TIME_OK, no STA_UNSYNC",
                )
            } else {
                item(
                    "synchronised",
                    Status::Fail,
                    "no",
                    "adjtimex reports the clock unsynchronised: cross-host restores use its \
                     maxerror (16 s when unsynchronised) and --require-sync refuses",
                )
            });
            let (status, detail) = match args.max_clock_error {
                Some(max) if q.maxerror_ns > max => (
                    Status::Fail,
                    format!("above --max-clock-error {}", human_ns(max)),
                ),
                Some(max) => (
                    Status::Pass,
                    format!("within --max-clock-error {}", human_ns(max)),
                ),
                None if q.maxerror_ns > DEFAULT_MAXERROR_WARN_NS => (
                    Status::Warn,
                    "above 100 ms: cross-host error bounds will be that wide".to_string(),
                ),
                None => (Status::Pass, "adjtimex maximum error".to_string()),
            };
            items.push(item("maxerror", status, human_ns(q.maxerror_ns), detail));
            items.push(match q.leap_pending {
                LeapPending::None => item("leap_pending", Status::Pass, "none", ""),
                other => item(
                    "leap_pending",
                    Status::Warn,
                    format!("{other:?}"),
                    "a leap second is due at the end of the UTC day: avoid migrating across it",
                ),
            });
        }
        Err(e) => items.push(item("adjtimex", Status::Fail, "error", e.to_string())),
    }
    match host::tsc_flags() {
        Ok(f) => {
            for (name, set) in [
                ("constant_tsc", f.constant_tsc),
                ("nonstop_tsc", f.nonstop_tsc),
            ] {
                items.push(if set {
                    item(name, Status::Pass, "yes", "")
                } else {
                    item(
                        name,
                        Status::Fail,
                        "no",
                        "without a constant, non-stop TSC guest TSC arithmetic is meaningless",
                    )
                });
            }
            items.push(item(
                "tsc_known_freq",
                Status::Info,
                if f.tsc_known_freq { "yes" } else { "no" },
                "the kernel took the TSC rate from CPUID rather than calibrating it",
            ));
        }
        Err(e) => items.push(item("tsc_flags", Status::Fail, "error", e.to_string())),
    }
    match host::clocksource() {
        Ok(cs) if cs == "tsc" => items.push(item("clocksource", Status::Pass, cs, "")),
        Ok(cs) => items.push(item(
            "clocksource",
            Status::Warn,
            cs,
            "timekeeping is not on the TSC: (TSC, TAI) pairs are looser",
        )),
        Err(e) => items.push(item("clocksource", Status::Warn, "error", e.to_string())),
    }
    let rate = host::boot_id()
        .map_err(|e| e.to_string())
        .and_then(|id| hostinfo::host_rate(None, &id).map_err(|e| e.to_string()));
    match rate {
        Ok(r) => {
            items.push(item(
                "host_tsc_khz",
                Status::Info,
                format!("{} kHz", r.khz),
                format!(
                    "{:?}{}, ± {} kHz",
                    r.source,
                    if r.cached { " (cached)" } else { "" },
                    r.uncertainty_khz
                ),
            ));
            match host::sample(host::DEFAULT_TRIES, r.khz) {
                Ok(s) => items.push(item(
                    "sample",
                    if s.uncertainty_ns > UNCERTAINTY_WARN_NS {
                        Status::Warn
                    } else {
                        Status::Pass
                    },
                    format!("± {}", human_ns(s.uncertainty_ns)),
                    "narrowest of 16 (rdtsc, CLOCK_TAI, rdtsc) brackets",
                )),
                Err(e) => items.push(item("sample", Status::Fail, "error", e.to_string())),
            }
        }
        Err(e) => items.push(item("host_tsc_khz", Status::Fail, "error", e)),
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn kvm_checks(items: &mut Vec<Item>) -> Option<clockcarry::kvm::KvmProbe> {
    use clockcarry::kvm::guest::TestVm;
    use clockcarry::kvm::KvmProbe;
    use clockcarry::model::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME};

    if !std::path::Path::new("/dev/kvm").exists() {
        items.push(item(
            "kvm",
            Status::Skip,
            "absent",
            "no /dev/kvm on this host",
        ));
        return None;
    }
    let kvm = match TestVm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            items.push(item(
                "kvm",
                Status::Skip,
                "not accessible",
                format!("{e} (run as root to probe KVM)"),
            ));
            return None;
        }
    };
    let vm = match TestVm::new(&kvm, 1) {
        Ok(v) => v,
        Err(e) => {
            items.push(item("kvm", Status::Fail, "no VM", e.to_string()));
            return None;
        }
    };
    let Some(vcpu) = vm.vcpus.first() else {
        items.push(item("kvm", Status::Fail, "no vCPU", ""));
        return None;
    };
    let p = KvmProbe::run(&kvm, &vm.vm, vcpu);
    let want = KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    items.push(item(
        "kvm.adjust_clock",
        if p.adjust_clock_flags & want == want {
            Status::Pass
        } else {
            Status::Warn
        },
        p.adjust_clock_flags.to_string(),
        "KVM_CAP_ADJUST_CLOCK: REALTIME (4) and HOST_TSC (8) let kvm-clock be aimed and verified",
    ));
    items.push(item(
        "kvm.tsc_offset_attr",
        if p.tsc_offset_attr {
            Status::Pass
        } else {
            Status::Fail
        },
        if p.tsc_offset_attr { "yes" } else { "no" },
        "the vCPU TSC offset attribute (KVM_VCPU_TSC_OFFSET)",
    ));
    items.push(match p.tsc_offset_effective {
        Some(true) => item(
            "kvm.tsc_offsets_effective",
            Status::Pass,
            "yes",
            "a written offset reads back",
        ),
        Some(false) => item(
            "kvm.tsc_offsets_effective",
            Status::Fail,
            "no",
            "TSC offset writes are INERT on this host: restore cannot move the guest TSC \
             (only kvm-clock is restored)",
        ),
        None => item(
            "kvm.tsc_offsets_effective",
            Status::Warn,
            "unknown",
            "the offset write test could not run",
        ),
    });
    items.push(item(
        "kvm.clock_guest",
        if p.clock_guest {
            Status::Pass
        } else {
            Status::Info
        },
        if p.clock_guest { "yes" } else { "no" },
        if p.clock_guest {
            "KVM_SET_CLOCK_GUEST restores the PVTI exactly"
        } else {
            "no KVM_SET_CLOCK_GUEST: kvm-clock is set with a calibrated KVM_SET_CLOCK"
        },
    ));
    items.push(item(
        "kvm.tsc_scaling",
        Status::Info,
        if p.tsc_control || p.vm_tsc_control {
            "yes"
        } else {
            "no"
        },
        "without scaling a guest can only move to hosts within 250 ppm of its TSC rate",
    ));
    items.push(item(
        "kvm.kvmclock_ctrl",
        if p.kvmclock_ctrl {
            Status::Pass
        } else {
            Status::Warn
        },
        if p.kvmclock_ctrl { "yes" } else { "no" },
        "KVMCLOCK_CTRL tells the guest's watchdog it was stopped",
    ));
    items.push(item(
        "kvm.tsc_khz",
        Status::Info,
        p.vcpu_tsc_khz
            .map_or_else(|| "unknown".to_string(), |k| format!("{k} kHz")),
        "KVM_GET_TSC_KHZ on a new vCPU",
    ));
    for note in &p.notes {
        log::debug!("KVM probe: {note}");
    }
    Some(p)
}

pub fn run(args: &CheckArgs) -> CliResult<Exit> {
    let mut items = Vec::new();
    host_checks(args, &mut items);
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    let kvm_probe = if args.no_kvm {
        items.push(item("kvm", Status::Skip, "skipped", "--no-kvm"));
        None
    } else {
        kvm_checks(&mut items)
    };
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    items.push(item(
        "kvm",
        Status::Skip,
        "not built",
        "clockcarry was built without feature kvm",
    ));
    let ready = items.iter().all(|i| i.status != Status::Fail);
    let out = CheckOutput {
        ready,
        checks: items,
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        kvm_probe,
    };
    if args.json {
        print_json(&out)?;
    } else {
        let mut text = String::new();
        for i in &out.checks {
            let status = match i.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Info => "info",
                Status::Skip => "skip",
            };
            text.push_str(&format!(
                "{status:<5} {:<26} {:<16} {}\n",
                i.name, i.value, i.detail
            ));
        }
        text.push_str(if ready {
            "host ready\n"
        } else {
            "host NOT ready: see FAIL lines\n"
        });
        print_text(&text);
    }
    Ok(if ready { Exit::Ok } else { Exit::NotReady })
}
