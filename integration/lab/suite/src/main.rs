//! lab-suite: clockcarry on a kernel KVM whose TSC offsets are real.
//!
//! Runs inside the KVM lab (integration/lab/run boots it; docs/lab.md). Each
//! scenario prints one JSON line per restore method on stdout; checks and
//! progress go to stderr; the exit status is 0 only when every check passed.
//!
//!     lab-suite [--inject-failure] [--only same-host,four-vcpus,save-restore]
//!               [--blackout-ms N] [--save-wait-ms N]
//!
//! Internal steps of the save/restore scenario (run as separate processes):
//!
//!     lab-suite save --out FILE
//!     lab-suite restore --from FILE [--inject-failure]

mod scenarios;
mod vm;

use std::process::ExitCode;

/// Exit status for a usage error; an error that stopped the suite exits
/// 101; otherwise the status is the number of failed rows (at most 100).
const EXIT_USAGE: u8 = 102;
const EXIT_ERROR: u8 = 101;

fn usage() -> ExitCode {
    eprintln!(
        "usage: lab-suite [--inject-failure] [--only LIST] [--blackout-ms N] [--save-wait-ms N]\n\
         \x20      lab-suite save --out FILE\n\
         \x20      lab-suite restore --from FILE [--inject-failure]\n\
         scenarios: {}",
        scenarios::ALL.join(",")
    );
    ExitCode::from(EXIT_USAGE)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = scenarios::Options::default();
    let mut sub: Option<String> = None;
    let mut path: Option<String> = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next().ok_or_else(|| {
                eprintln!("lab-suite: {name} needs a value");
            })
        };
        match arg.as_str() {
            "save" | "restore" if sub.is_none() => sub = Some(arg),
            "--inject-failure" => opts.inject_failure = true,
            "--only" => match value("--only") {
                Ok(v) => opts.only = Some(v.split(',').map(str::to_owned).collect()),
                Err(()) => return usage(),
            },
            "--blackout-ms" | "--save-wait-ms" => {
                let Ok(Ok(ms)) = value(&arg).map(|v| v.parse::<u64>()) else {
                    return usage();
                };
                if arg == "--blackout-ms" {
                    opts.blackout_ms = ms;
                } else {
                    opts.save_wait_ms = ms;
                }
            }
            "--out" | "--from" => match value(&arg) {
                Ok(v) => path = Some(v),
                Err(()) => return usage(),
            },
            "-h" | "--help" => return usage(),
            other => {
                eprintln!("lab-suite: unknown argument {other}");
                return usage();
            }
        }
    }
    if let Some(only) = &opts.only {
        if let Some(bad) = only.iter().find(|s| !scenarios::ALL.contains(&s.as_str())) {
            eprintln!("lab-suite: unknown scenario {bad}");
            return usage();
        }
    }
    let result = match (sub.as_deref(), path) {
        (None, None) => scenarios::run_all(&opts),
        (Some("save"), Some(out)) => scenarios::save_child(&out),
        (Some("restore"), Some(from)) => scenarios::restore_child(&from, &opts),
        _ => return usage(),
    };
    match result {
        Ok(failed) => ExitCode::from(u8::try_from(failed.min(100)).unwrap_or(100)),
        Err(e) => {
            eprintln!("lab-suite: error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
