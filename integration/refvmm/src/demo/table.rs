//! The demo's command line and its output: a table for people, one JSON
//! line per row with `--json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::carry::Carry;
use super::{row_passes, run_all, Mode, Options, Row, Scenario, VMM_SUBCOMMAND};

pub const USAGE: &str = "\
clockcarry-demo: what a guest sees of its clocks across pause/resume,
snapshot/restore and live update, under today's VMMs and with clockcarry.

USAGE:
    cargo run --release --bin clockcarry-demo -- [OPTIONS]      (as root: /dev/kvm)

OPTIONS:
    --json                      one JSON object per row, nothing else on stdout
    --vcpus N                   vCPUs of the probe guest (default 2)
    --scenarios LIST            pause-resume,snapshot-restore,local-migration
    --modes LIST                ch-v53,qemu,firecracker,clockcarry
    --pause-ms N                pause/resume blackout (default 2000)
    --snapshot-wait-ms N        wait between snapshot and restore (default 3000)
    --migration-blackout-ms N   the migrating source holds its state back N ms (default 1000)
    --clockcarry-bin PATH       run `PATH capture` / `PATH restore` instead of
                                the library in-process
    --env NAME                  the env field of each row (default host)
    --workdir DIR               where logs, snapshots and sockets go
    --keep                      keep the work directory
    --sequential                one run at a time (default: modes side by side)
";

fn list<T: Copy>(
    text: &str,
    all: &[T],
    name: impl Fn(&T) -> &'static str,
) -> Result<Vec<T>, String> {
    text.split(',')
        .map(|w| {
            all.iter()
                .find(|x| name(x) == w)
                .copied()
                .ok_or_else(|| format!("unknown name {w:?}"))
        })
        .collect()
}

fn ms(text: &str, flag: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{flag}: {text:?} is not a number of milliseconds"))
}

/// Parses the demo's arguments. `None` = help was asked for.
pub fn parse(args: Vec<String>) -> Result<Option<Options>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let mut o = Options {
        json: false,
        env: "host".into(),
        vcpus: 2,
        scenarios: Scenario::ALL.to_vec(),
        modes: Mode::ALL.to_vec(),
        pause: Duration::from_millis(2000),
        snapshot_wait: Duration::from_millis(3000),
        migration_blackout: Duration::from_millis(1000),
        carry: Carry::InProcess,
        workdir: std::env::temp_dir().join(format!("clockcarry-demo-{}", std::process::id())),
        keep: false,
        sequential: false,
        vmm: (exe, vec![VMM_SUBCOMMAND.to_string()]),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--json" => o.json = true,
            "--keep" => o.keep = true,
            "--sequential" => o.sequential = true,
            "--env" => o.env = val()?,
            "--vcpus" => {
                let v = val()?;
                o.vcpus = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=crate::probe::MAX_VCPUS).contains(n))
                    .ok_or_else(|| format!("--vcpus {v}: 1 to 8"))?;
            }
            "--scenarios" => o.scenarios = list(&val()?, &Scenario::ALL, Scenario::name)?,
            "--modes" => o.modes = list(&val()?, &Mode::ALL, Mode::name)?,
            "--pause-ms" => o.pause = ms(&val()?, &a)?,
            "--snapshot-wait-ms" => o.snapshot_wait = ms(&val()?, &a)?,
            "--migration-blackout-ms" => o.migration_blackout = ms(&val()?, &a)?,
            "--clockcarry-bin" => o.carry = Carry::Binary(PathBuf::from(val()?)),
            "--workdir" => o.workdir = PathBuf::from(val()?),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(Some(o))
}

/// ns as a signed human quantity: `+689 ns`, `-1.52 us`, `+2.001 s`.
pub fn human(ns: i64) -> String {
    let sign = if ns < 0 { "-" } else { "+" };
    let a = ns.unsigned_abs() as f64;
    if a < 1e3 {
        format!("{sign}{a:.0} ns")
    } else if a < 1e6 {
        format!("{sign}{:.2} us", a / 1e3)
    } else if a < 1e9 {
        format!("{sign}{:.2} ms", a / 1e6)
    } else {
        format!("{sign}{:.3} s", a / 1e9)
    }
}

fn cell(v: Option<i64>) -> String {
    v.map_or("-".into(), human)
}

/// The table, with a note on what this host can show.
pub fn render(rows: &[Row], vcpus: u32) -> String {
    let mut out = format!(
        "clockcarry demo: the guest's own view of its clocks across a blackout\n\
         (probe guest, {vcpus} vCPUs, this host's /dev/kvm; errors are against host \
         CLOCK_TAI, \"kept running\" = 0)\n\n"
    );
    out.push_str(&format!(
        "{:<17} {:<12} {:>10} {:>12} {:>16} {:>17} {:>10}\n",
        "scenario",
        "mode",
        "blackout",
        "TSC error",
        "kvm-clock error",
        "kvm-clock vs TSC",
        "monotonic"
    ));
    for r in rows {
        let line = match &r.error {
            Some(e) => format!("{:<17} {:<12} FAILED: {e}\n", r.scenario, r.mode),
            None => format!(
                "{:<17} {:<12} {:>10} {:>12} {:>16} {:>17} {:>10}\n",
                r.scenario,
                r.mode,
                r.blackout_ns
                    .map_or("-".into(), |b| format!("{:.3} s", b as f64 / 1e9)),
                cell(r.tsc_error_ns),
                cell(r.kvmclock_error_ns),
                cell(r.disagreement_ns),
                r.monotonic.map_or("-", |m| if m { "yes" } else { "NO" }),
            ),
        };
        out.push_str(&line);
    }
    out.push_str(
        "\nTSC error: guest TSC minus what it would read had the VM kept running.\n\
         kvm-clock error: guest kvm-clock minus the same (what the guest's clock_gettime sees).\n\
         kvm-clock vs TSC: the new PVTI minus the old one at the same TSC (a step of the\n\
         TSC-to-kvm-clock line; exact, no timing noise).\n",
    );
    if rows.iter().any(|r| r.tsc_offsets_effective == Some(false)) {
        out.push_str(
            "\nNOTE: TSC offsets are inert on this host (tsc_offsets_effective false: writes to\n\
             the vCPU TSC offset and host-initiated MSR_IA32_TSC writes change nothing), so\n\
             the guest TSC keeps running whatever a VMM does: the stock VMMs' TSC freeze over\n\
             a restore does not show here. It shows in the KVM lab (integration/lab), where\n\
             offsets are real.\n",
        );
    }
    out
}

/// The demo's `main`; returns the exit code (1 when a clockcarry row
/// misses the acceptance rule or a run failed).
pub fn main_with(args: Vec<String>) -> i32 {
    if args.first().map(String::as_str) == Some(VMM_SUBCOMMAND) {
        return crate::cli::main_with(args.into_iter().skip(1).collect());
    }
    let opts = match parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("clockcarry-demo: {e}");
            return 2;
        }
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("clockcarry-demo: /dev/kvm: {e} (run as root on a host with KVM)");
        return 2;
    }
    let started = Instant::now();
    if !opts.json {
        eprintln!(
            "running {} scenarios x {} modes ...",
            opts.scenarios.len(),
            opts.modes.len()
        );
    }
    let rows = run_all(&opts);
    if opts.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
    } else {
        print!("{}", render(&rows, opts.vcpus));
        println!(
            "\n{} runs in {:.1} s; work directory {}{}",
            rows.len(),
            started.elapsed().as_secs_f64(),
            opts.workdir.display(),
            if opts.keep { " (kept)" } else { " (removed)" }
        );
    }
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&opts.workdir);
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !row_passes(r)).collect();
    if failed.is_empty() {
        0
    } else {
        for r in failed {
            eprintln!(
                "clockcarry-demo: {} / {} does not pass{}",
                r.scenario,
                r.mode,
                r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
            );
        }
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(689), "+689 ns");
        assert_eq!(human(-1520), "-1.52 us");
        assert_eq!(human(2_001_000_000), "+2.001 s");
        assert_eq!(human(i64::MIN).chars().next(), Some('-'));
    }

    #[test]
    fn parses_lists() {
        let o = parse(vec![
            "--modes".into(),
            "qemu,clockcarry".into(),
            "--scenarios".into(),
            "pause-resume".into(),
        ])
        .expect("ok")
        .expect("options");
        assert_eq!(o.modes.len(), 2);
        assert_eq!(o.scenarios, vec![Scenario::PauseResume]);
        assert!(parse(vec!["--modes".into(), "vmware".into()]).is_err());
        assert!(parse(vec!["--vcpus".into(), "0".into()]).is_err());
    }
}
