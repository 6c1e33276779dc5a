//! Command line of `clockcarry-refvmm` (hand-parsed: no CLI dependency).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{self, BootSpec, Vmm};
use crate::baseline::Baseline;
use crate::elf;
use crate::probe::{MAX_VCPUS, PROBE_ELF};
use crate::probelog::ProbeLog;
use crate::state::VmConfig;
use crate::vm::VmOptions;

pub const USAGE: &str = "\
clockcarry-refvmm: a reference KVM VMM speaking Cloud Hypervisor's HTTP API,
with the vm.clock extension, for the clockcarry probe guest.

USAGE:
    clockcarry-refvmm --api-socket PATH [OPTIONS]
    clockcarry-refvmm probe-elf --out PATH
    clockcarry-refvmm analyze [--json] LOG...

OPTIONS:
    --api-socket PATH        Unix socket of the HTTP API (root /api/v1)
    --kernel probe|PATH      boot this PVH ELF now (`probe`: the embedded probe
                             guest); without it the VMM waits for vm.restore or
                             vm.receive-migration
    --cpus N                 vCPUs, 1 to 64 (default 1)
    --memory-mib N           guest RAM in MiB (default 4)
    --baseline NAME          stock clock behaviour: ch-v53 (default), qemu,
                             firecracker
    --clock-extension        the vm.clock extension's in-place pause/resume:
                             no clock is touched
    --name NAME              label of this VMM's probe reports (default vm)
    --probe-log PATH         append the probe's reports, stamped with host
                             CLOCK_TAI, as JSON lines
    --probe-log-max-mib N    rotate the probe log to PATH.1 at N MiB, so it
                             never holds much more than 2N MiB (default 64)
    --serial PATH            COM1 output file (truncated at VM creation)
    --probe-text             do not answer the probe's magic: it reports as
                             text on COM1, as under other VMMs
    --report-interval-us N   host pause between reports of a vCPU (default 500)
    --fault-put offset:N[:rollback]
                             test knob: PUT vm.clock fails writing vCPU N's TSC
                             offset (and with :rollback, every rollback write
                             fails too): the typed rolled_back and
                             rollback_incomplete replies
    --migration-delay-ms N   test knob: an outgoing migration waits N ms between
                             pausing the source and sending (a slow link)
    --boot-tsc-s N           with --kernel: start every vCPU's TSC at N seconds
                             of its rate (a VM up for a while; default 0)
";

/// Largest `--boot-tsc-s`: ten years.
const MAX_BOOT_TSC_S: u64 = 10 * 365 * 86_400;

/// What `main` should do.
#[derive(Debug)]
pub enum Command {
    Serve {
        socket: PathBuf,
        boot: Option<Box<BootSpec>>,
        options: VmOptions,
    },
    ProbeElf {
        out: PathBuf,
    },
    Analyze {
        json: bool,
        logs: Vec<PathBuf>,
    },
    Help,
}

fn value(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
    args.next().ok_or_else(|| format!("{flag} needs a value"))
}

fn number<T: std::str::FromStr>(text: &str, flag: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: {text:?} is not a valid number"))
}

/// Parses the arguments (without the program name).
#[allow(clippy::too_many_lines)] // older than the lint; split before extending
pub fn parse(args: Vec<String>) -> Result<Command, String> {
    let mut it = args.into_iter();
    let mut first = it.next();
    match first.as_deref() {
        None | Some("-h") | Some("--help") => return Ok(Command::Help),
        Some("probe-elf") => {
            let mut out = None;
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--out" => out = Some(PathBuf::from(value(&mut it, "--out")?)),
                    other => return Err(format!("unknown argument {other:?}")),
                }
            }
            return Ok(Command::ProbeElf {
                out: out.ok_or("probe-elf needs --out PATH")?,
            });
        }
        Some("analyze") => {
            let (mut json, mut logs) = (false, Vec::new());
            for a in it {
                match a.as_str() {
                    "--json" => json = true,
                    _ => logs.push(PathBuf::from(a)),
                }
            }
            if logs.is_empty() {
                return Err("analyze needs at least one log".into());
            }
            return Ok(Command::Analyze { json, logs });
        }
        _ => {}
    }
    let mut socket = None;
    let mut kernel: Option<String> = None;
    let (mut cpus, mut memory_mib) = (1u32, 4u64);
    let mut log_max_mib: u64 = crate::probelog::DEFAULT_MAX_BYTES >> 20;
    let mut options = VmOptions::default();
    let mut log_path = None;
    while let Some(a) = first.take().or_else(|| it.next()) {
        match a.as_str() {
            "--api-socket" => socket = Some(PathBuf::from(value(&mut it, &a)?)),
            "--kernel" => kernel = Some(value(&mut it, &a)?),
            "--cpus" => cpus = number(&value(&mut it, &a)?, &a)?,
            "--memory-mib" => memory_mib = number(&value(&mut it, &a)?, &a)?,
            "--baseline" => options.baseline = value(&mut it, &a)?.parse::<Baseline>()?,
            "--clock-extension" => options.clock_extension = true,
            "--name" => options.name = value(&mut it, &a)?,
            "--probe-log" => log_path = Some(PathBuf::from(value(&mut it, &a)?)),
            "--probe-log-max-mib" => log_max_mib = number(&value(&mut it, &a)?, &a)?,
            "--serial" => options.serial = Some(PathBuf::from(value(&mut it, &a)?)),
            "--probe-text" => options.text_mode = true,
            "--report-interval-us" => {
                let us: u64 = number(&value(&mut it, &a)?, &a)?;
                options.report_interval = Duration::from_micros(us);
            }
            "--migration-delay-ms" => {
                let ms: u64 = number(&value(&mut it, &a)?, &a)?;
                options.migration_delay = Duration::from_millis(ms);
            }
            "--boot-tsc-s" => options.boot_tsc_s = number(&value(&mut it, &a)?, &a)?,
            "--fault-put" => {
                let spec = value(&mut it, &a)?;
                options.fault_put = Some(crate::clockapi::FaultPut::parse(&spec)?);
            }
            "-h" | "--help" => return Ok(Command::Help),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if options.boot_tsc_s > MAX_BOOT_TSC_S {
        return Err(format!(
            "--boot-tsc-s {}: at most {MAX_BOOT_TSC_S} (ten years)",
            options.boot_tsc_s
        ));
    }
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(format!("--cpus {cpus}: 1 to {MAX_VCPUS}"));
    }
    if !(2..=1024).contains(&memory_mib) {
        return Err(format!("--memory-mib {memory_mib}: 2 to 1024"));
    }
    if !(1..=65_536).contains(&log_max_mib) {
        return Err(format!("--probe-log-max-mib {log_max_mib}: 1 to 65536"));
    }
    if let Some(p) = log_path {
        let log = ProbeLog::open_bounded(&p, log_max_mib << 20)
            .map_err(|e| format!("--probe-log {}: {e}", p.display()))?;
        options.log = Some(Arc::new(log));
    }
    let boot = match kernel {
        None => None,
        Some(k) => {
            let bytes = if k == "probe" {
                PROBE_ELF.to_vec()
            } else {
                std::fs::read(&k).map_err(|e| format!("--kernel {k}: {e}"))?
            };
            let image = elf::parse(&bytes).map_err(|e| format!("--kernel {k}: {e}"))?;
            Some(Box::new(BootSpec {
                config: VmConfig {
                    vcpus: cpus,
                    memory_bytes: memory_mib << 20,
                    kernel: k,
                },
                image,
            }))
        }
    };
    Ok(Command::Serve {
        socket: socket.ok_or("--api-socket PATH is required (see --help)")?,
        boot,
        options,
    })
}

/// Runs a parsed command; returns the exit code.
pub fn run(cmd: Command) -> i32 {
    match cmd {
        Command::Help => {
            print!("{USAGE}");
            0
        }
        Command::ProbeElf { out } => match std::fs::write(&out, PROBE_ELF) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("clockcarry-refvmm: {}: {e}", out.display());
                1
            }
        },
        Command::Analyze { json, logs } => crate::analysis::run_cli(json, &logs),
        Command::Serve {
            socket,
            boot,
            options,
        } => {
            let mut vmm = match Vmm::new(options, boot.as_deref()) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("clockcarry-refvmm: {e}");
                    return 1;
                }
            };
            match api::serve(&mut vmm, &socket) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("clockcarry-refvmm: API socket {}: {e}", socket.display());
                    1
                }
            }
        }
    }
}

/// `main` of the VMM binary (and of the demo's `__vmm` re-exec).
pub fn main_with(args: Vec<String>) -> i32 {
    match parse(args) {
        Ok(cmd) => run(cmd),
        Err(e) => {
            eprintln!("clockcarry-refvmm: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_serve() {
        let cmd = parse(args(
            "--api-socket /tmp/s --kernel probe --cpus 2 --baseline qemu --clock-extension",
        ))
        .expect("parses");
        let Command::Serve { boot, options, .. } = cmd else {
            panic!("serve expected");
        };
        assert_eq!(boot.expect("boot").config.vcpus, 2);
        assert_eq!(options.baseline, Baseline::Qemu);
        assert!(options.clock_extension);
    }

    #[test]
    fn refuses_bad_arguments() {
        assert!(parse(args("--api-socket /tmp/s --cpus 65")).is_err());
        assert!(parse(args("--api-socket /tmp/s --cpus 0")).is_err());
        assert!(parse(args("--api-socket /tmp/s --probe-log-max-mib 0")).is_err());
        assert!(parse(args("--api-socket /tmp/s --cpus x")).is_err());
        assert!(parse(args("--api-socket /tmp/s --baseline vmware")).is_err());
        assert!(parse(args("--cpus 1")).is_err());
        assert!(parse(args("--api-socket")).is_err());
        assert!(parse(args("analyze")).is_err());
        assert!(matches!(parse(args("--help")), Ok(Command::Help)));
    }
}
