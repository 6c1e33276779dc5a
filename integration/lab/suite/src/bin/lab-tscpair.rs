//! lab-tscpair: the two-host lab's TSC ground truth, D = TSC_B - TSC_A,
//! measured through the shared ivshmem page (no network). Run it on both
//! lab hosts at about the same time with the same arguments:
//!
//!     lab-tscpair --role a|b [--duration-ms N] [--repeat K] [--gap-ms N]
//!
//! Each measurement samples for `--duration-ms` (default 2000); A prints one
//! JSON line per measurement on stdout (B on stderr). With `--repeat K` the
//! K brackets must overlap (D constant), else the exit status is 1.

use std::process::ExitCode;
use std::time::Duration;

use clockcarry_lab::shm::Shm;
use clockcarry_lab::tscpair::{self, Role};

fn usage() -> ExitCode {
    eprintln!("usage: lab-tscpair --role a|b [--duration-ms N] [--repeat K] [--gap-ms N]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut role = None;
    let mut duration_ms: u64 = 2000;
    let mut repeat: u64 = 1;
    let mut gap_ms: u64 = 0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v) {
            ("--role", Some(v)) => role = Role::parse(&v),
            ("--duration-ms", Some(v)) => match v.parse() {
                Ok(n) => duration_ms = n,
                Err(_) => return usage(),
            },
            ("--repeat", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => repeat = n,
                _ => return usage(),
            },
            ("--gap-ms", Some(v)) => match v.parse() {
                Ok(n) => gap_ms = n,
                Err(_) => return usage(),
            },
            _ => return usage(),
        }
    }
    let Some(role) = role else { return usage() };
    let shm = match Shm::open() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lab-tscpair: {e}");
            return ExitCode::from(1);
        }
    };
    let khz = clockcarry::host::host_tsc_khz().map(|t| t.khz).unwrap_or(0);
    let mut pairs: Vec<tscpair::Pair> = Vec::new();
    for epoch in 1..=repeat {
        let pair = match tscpair::measure(
            &shm,
            role,
            epoch,
            Duration::from_millis(duration_ms),
            Duration::from_secs(120),
        ) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("lab-tscpair: {e}");
                return ExitCode::from(1);
            }
        };
        let width_ns = clockcarry::host::cycles_to_ns_ceil(pair.width_cycles, khz);
        let line = serde_json::json!({
            "tool": "lab-tscpair", "role": role.name(), "epoch": pair.epoch,
            "d_cycles": pair.d_cycles, "lower_cycles": pair.lower_cycles,
            "upper_cycles": pair.upper_cycles, "width_cycles": pair.width_cycles,
            "width_ns": width_ns, "samples_a": pair.samples_a, "samples_b": pair.samples_b,
            "tsc_khz": khz, "duration_ms": duration_ms,
        });
        if role == Role::A {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
        pairs.push(pair);
        std::thread::sleep(Duration::from_millis(gap_ms));
    }
    let mut ok = true;
    for p in &pairs[1..] {
        if !p.agrees_with(&pairs[0]) {
            eprintln!(
                "lab-tscpair: D moved: measurement {} [{}, {}] vs 1 [{}, {}]",
                p.epoch,
                p.lower_cycles,
                p.upper_cycles,
                pairs[0].lower_cycles,
                pairs[0].upper_cycles
            );
            ok = false;
        }
    }
    if let (Some(first), Some(last)) = (pairs.first(), pairs.last()) {
        eprintln!(
            "lab-tscpair: {} measurement(s); D = {} cycles (width {}) first, {} (width {}) last; {}",
            pairs.len(),
            first.d_cycles,
            first.width_cycles,
            last.d_cycles,
            last.width_cycles,
            if ok { "constant" } else { "NOT constant" }
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
