//! The probe guest on this machine's /dev/kvm: port mode (JSON log stamped
//! with host TAI) and text mode (COM1 lines, as under other VMMs), and the
//! stock baselines' clock behaviour seen from the guest.

mod common;

use std::time::Duration;

use clockcarry_refvmm::analysis;
use clockcarry_refvmm::probe::GuestReport;
use clockcarry_refvmm::probelog;
use common::*;

#[test]
fn port_mode_reports_every_vcpu_stamped() {
    require_kvm!();
    let dir = tempdir("port");
    let vmm = boot(&dir, "vm", &["--cpus", "3", "--serial", "/dev/null"]);
    std::thread::sleep(Duration::from_millis(200));
    vmm.shutdown();
    let log = probelog::read_logs(&[dir.join("vm.jsonl").as_path()]).expect("log");
    for vcpu in 0..2u32 {
        let mine: Vec<_> = log.iter().filter(|r| r.vcpu == vcpu).collect();
        assert!(mine.len() > 20, "vCPU {vcpu}: {} reports", mine.len());
        assert!(mine
            .iter()
            .all(|r| r.tai_ns.is_some() && r.host_tsc.is_some()));
        assert!(mine.iter().skip(1).all(|r| r.pvti.tsc_to_system_mul != 0));
        assert!(mine.windows(2).all(|w| w[1].seq > w[0].seq));
    }
}

#[test]
fn text_mode_prints_parseable_lines_on_com1() {
    require_kvm!();
    let dir = tempdir("text");
    let serial = dir.join("serial.txt");
    let vmm = boot(
        &dir,
        "vm",
        &["--probe-text", "--serial", &serial.display().to_string()],
    );
    std::thread::sleep(Duration::from_millis(300));
    vmm.shutdown();
    let text = std::fs::read_to_string(&serial).expect("serial file");
    assert!(
        text.contains("clockcarry-probe 1 vcpu 00 text"),
        "{text:.200}"
    );
    let reports: Vec<GuestReport> = text
        .lines()
        .filter_map(GuestReport::from_text_line)
        .collect();
    assert!(reports.len() >= 4, "{} text reports", reports.len());
    assert!(reports.iter().any(|r| r.vcpu == 1));
    assert!(reports.iter().skip(2).all(|r| r.kvmclock_ns().is_some()));
}

/// In-place pause/resume per baseline, from the guest's side.
fn pause_resume(baseline: &str, extension: bool) -> analysis::Analysis {
    let dir = tempdir(&format!("pr-{baseline}-{extension}"));
    let mut args = vec!["--baseline", baseline];
    if extension {
        args.push("--clock-extension");
    }
    let vmm = boot(&dir, "vm", &args);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(call(&vmm, "PUT", "vm.pause", None).0, 204);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(call(&vmm, "PUT", "vm.resume", None).0, 204);
    std::thread::sleep(Duration::from_millis(200));
    vmm.shutdown();
    let log = probelog::read_logs(&[dir.join("vm.jsonl").as_path()]).expect("log");
    analysis::analyse(&log).expect("analysis")
}

#[test]
fn baselines_in_place() {
    require_kvm!();
    // QEMU puts kvm-clock back to its pause value: it loses the pause.
    let qemu = pause_resume("qemu", false);
    let blackout = qemu.blackout_ns.expect("stamped");
    assert!(blackout > 400_000_000);
    assert!(qemu.disagreement_ns < -(blackout * 9 / 10), "{qemu:?}");
    // The extension touches nothing: the line is the same, bit for bit.
    let ext = pause_resume("ch-v53", true);
    assert_eq!(ext.disagreement_ns, 0, "{ext:?}");
    assert!(ext.monotonic);
    let err = ext.kvmclock_error_ns.expect("stamped");
    assert!(err.unsigned_abs() < 1000, "kvm-clock error {err} ns");
}
