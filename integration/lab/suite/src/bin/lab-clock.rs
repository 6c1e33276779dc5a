//! lab-clock: the two-host lab's clock harness, standing for two
//! NTP-synchronised hosts (or a badly configured one). Run on both hosts:
//!
//!     lab-clock --role a|b [--peer ADDR] [--rounds N] [--step-ms MS]
//!
//! A listens for B on the lab network (port 7701). Both set the TAI offset
//! (37 s); B sets its clock to A's from the minimum-delay round of `--rounds`
//! (default 16) timestamped round trips; both mark themselves synchronised
//! (adjtimex: STA_UNSYNC cleared, maxerror 100 us, esterror 20 us). With
//! `--step-ms MS` B then steps its clock by MS ms (negative: back) and keeps
//! claiming synchronised, as a badly configured NTP would. The true offset
//! before and after comes from the shared-memory TSC pair (lab-tscpair's
//! ground truth); A prints one JSON line with it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clockcarry_lab::clock;
use clockcarry_lab::control::Control;
use clockcarry_lab::shm::Shm;
use clockcarry_lab::tscpair::{self, Role};

const PORT: u16 = 7701;

fn usage() -> ExitCode {
    eprintln!("usage: lab-clock --role a|b [--peer ADDR] [--rounds N] [--step-ms MS]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut role = None;
    let mut peer = "169.254.77.1".to_string();
    let mut rounds: u32 = 16;
    let mut step_ms: i64 = 0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else { return usage() };
        let ok = match a.as_str() {
            "--role" => {
                role = Role::parse(&v);
                role.is_some()
            }
            "--peer" => {
                peer = v;
                true
            }
            "--rounds" => v.parse().map(|n| rounds = n).is_ok(),
            "--step-ms" => v.parse().map(|n| step_ms = n).is_ok(),
            _ => false,
        };
        if !ok {
            return usage();
        }
    }
    let Some(role) = role else { return usage() };
    match run(role, &peer, rounds, step_ms) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab-clock: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(role: Role, peer: &str, rounds: u32, step_ms: i64) -> Result<(), String> {
    let lead = role == Role::A;
    let mut ctl = if lead {
        Control::accept(SocketAddr::from(([0, 0, 0, 0], PORT)))
    } else {
        let addr: SocketAddr = format!("{peer}:{PORT}")
            .parse()
            .map_err(|e| format!("--peer {peer}: {e}"))?;
        Control::connect(addr, Duration::from_secs(120))
    }
    .map_err(|e| format!("control connection: {e}"))?;
    let shm = Shm::open().map_err(|e| format!("ivshmem: {e}"))?;
    let khz = clockcarry::host::host_tsc_khz()
        .map_err(|e| format!("TSC rate: {e}"))?
        .khz;
    let d = tscpair::measure_with(&mut ctl, &shm, role, Duration::from_secs(2), 4)?;
    let io = |e: std::io::Error| e.to_string();
    let before = clock::true_offset(&mut ctl, lead, &d, khz).map_err(io)?;
    let ex = clock::sync(&mut ctl, lead, rounds).map_err(io)?;
    let after_sync = clock::true_offset(&mut ctl, lead, &d, khz).map_err(io)?;
    if !lead && step_ms != 0 {
        let step_ns = step_ms
            .checked_mul(1_000_000)
            .ok_or("--step-ms too large")?;
        clock::step_ns(step_ns).map_err(io)?;
        clock::mark_synchronised(clock::CLAIMED_MAXERROR_US, clock::CLAIMED_ESTERROR_US)
            .map_err(io)?;
    }
    let after_step = clock::true_offset(&mut ctl, lead, &d, khz).map_err(io)?;
    let status = clock::status().map_err(io)?;
    if lead {
        ctl.send(&serde_json::json!({"step": "status?"}))
            .map_err(io)?;
        let b = ctl.expect("status").map_err(io)?;
        let line = serde_json::json!({
            "tool": "lab-clock",
            "d_cycles": d.d_cycles, "d_width_cycles": d.width_cycles,
            "offset_before_ns": before.map(|o| o.0),
            "offset_after_sync_ns": after_sync.map(|o| o.0),
            "offset_after_step_ns": after_step.map(|o| o.0),
            "truth_bound_ns": after_step.map(|o| o.1),
            "step_ms": step_ms,
            "exchange": b.get("exchange"),
            "a": status, "b": b.get("status"),
        });
        println!("{line}");
    } else {
        ctl.expect("status?").map_err(io)?;
        ctl.send(&serde_json::json!({"step": "status", "status": status, "exchange": ex}))
            .map_err(io)?;
        eprintln!("lab-clock: B synced ({ex:?}), status {status:?}");
    }
    Ok(())
}
