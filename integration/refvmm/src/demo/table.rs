//! The demo's command line and its output: a table for people, one JSON
//! line per row with `--json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::carry::Carry;
use super::{row_passes, run_all, Mode, Options, Row, Scenario, LAB_ENV, VMM_SUBCOMMAND};

pub const USAGE: &str = "\
clockcarry-demo: what a guest sees of its clocks across pause/resume,
snapshot/restore and live update, under today's VMMs and with clockcarry.

USAGE:
    integration/demo/run [OPTIONS]      (as root: /dev/kvm; builds, then runs
                                         target/release/clockcarry-demo)
    clockcarry-demo [OPTIONS]

OPTIONS:
    --json                      one JSON object per row, nothing else on stdout
    --vcpus N                   vCPUs of the probe guest (default 2)
    --scenarios LIST            pause-resume,snapshot-restore,local-migration
    --modes LIST                ch-v53,qemu,firecracker,clockcarry,clockcarry-armed
    --pause-ms N                pause/resume blackout (default 2000)
    --snapshot-wait-ms N        wait between snapshot and restore (default 3000)
    --migration-blackout-ms N   the migrating source holds its state back N ms (default 1000)
    --clockcarry-bin PATH       the clockcarry command to run (default: the
                                `clockcarry` next to this program, e.g.
                                target/release/clockcarry)
    --in-process                use the clockcarry library inside this process
                                instead of the clockcarry command
    --env NAME                  the env field of each row (default host); `lab`
                                adds the checks only real TSC offsets pass
                                (run it in the KVM lab: docs/demo.md)
    --workdir DIR               where logs, snapshots and sockets go
    --keep                      keep the work directory
    --sequential                one run at a time (default: modes side by side)
    -v, --verbose               each run's steps on stderr as they happen
    --timeout-s N               give up after N s: say where each unfinished run
                                was, kill its processes, exit 3 (default 300)

BENCHMARK:
    --bench-blackout            instead of the table: the blackout each way of
                                restoring the clock gives (stock, restore,
                                armed), a snapshot live update per rep, from the
                                VMMs' own pause/resume stamps (docs/armed.md)
    --bench-vcpus LIST          vCPU counts (default 1,8,64; 1 to 64)
    --reps N                    reps per mode and count (default 30)
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

/// `--bench-vcpus LIST`: counts from 1 to the probe's slots.
fn vcpu_list(v: &str) -> Result<Vec<u32>, String> {
    v.split(',')
        .map(|n| {
            n.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=crate::probe::MAX_VCPUS).contains(n))
        })
        .collect::<Option<Vec<u32>>>()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| {
            format!(
                "--bench-vcpus {v:?}: a list of counts from 1 to {}",
                crate::probe::MAX_VCPUS
            )
        })
}

/// `--reps N`: 1 to 10000.
fn rep_count(v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| format!("--reps {v:?}: 1 to 10000"))
}

/// Parses the demo's arguments. `None` = help was asked for.
pub fn parse(args: Vec<String>) -> Result<Option<Options>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let mut bin: Option<PathBuf> = None;
    let mut in_process = false;
    let mut bench = false;
    let mut bench_vcpus = super::bench::DEFAULT_VCPUS.to_vec();
    let mut reps = super::bench::DEFAULT_REPS;
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
        verbose: false,
        timeout: Duration::from_secs(300),
        vmm: (exe.clone(), vec![VMM_SUBCOMMAND.to_string()]),
        bench: None,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--json" => o.json = true,
            "--keep" => o.keep = true,
            "--sequential" => o.sequential = true,
            "-v" | "--verbose" => o.verbose = true,
            "--timeout-s" => {
                let v = val()?;
                o.timeout = v
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("--timeout-s {v:?}: a number of seconds above 0"))?;
            }
            "--env" => o.env = val()?,
            "--vcpus" => {
                let v = val()?;
                o.vcpus = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=crate::probe::MAX_VCPUS).contains(n))
                    .ok_or_else(|| format!("--vcpus {v}: 1 to {}", crate::probe::MAX_VCPUS))?;
            }
            "--scenarios" => o.scenarios = list(&val()?, &Scenario::ALL, Scenario::name)?,
            "--modes" => o.modes = list(&val()?, &Mode::ALL, Mode::name)?,
            "--pause-ms" => o.pause = ms(&val()?, &a)?,
            "--snapshot-wait-ms" => o.snapshot_wait = ms(&val()?, &a)?,
            "--migration-blackout-ms" => o.migration_blackout = ms(&val()?, &a)?,
            "--clockcarry-bin" => bin = Some(PathBuf::from(val()?)),
            "--in-process" => in_process = true,
            "--bench-blackout" => bench = true,
            "--bench-vcpus" => bench_vcpus = vcpu_list(&val()?)?,
            "--reps" => reps = rep_count(&val()?)?,
            "--workdir" => o.workdir = PathBuf::from(val()?),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    o.carry = match (bin, in_process) {
        (Some(_), true) => {
            return Err("--clockcarry-bin and --in-process exclude each other".into())
        }
        (Some(b), false) if b.is_file() => Carry::Binary(b),
        (Some(b), false) => {
            return Err(format!("--clockcarry-bin {}: no such file", b.display()));
        }
        (None, true) => Carry::InProcess,
        (None, false) => match Carry::next_to(&exe) {
            Some(b) => Carry::Binary(b),
            None if !o.modes.iter().any(Mode::is_clockcarry) => Carry::InProcess,
            None => {
                return Err(format!(
                    "no `{}` command next to {}: build it (`cargo build --release -p \
                     clockcarry`, or run integration/demo/run, which builds both), name one \
                     with --clockcarry-bin PATH, or use --in-process",
                    super::carry::BINARY_NAME,
                    exe.display()
                ))
            }
        },
    };
    if bench {
        o.bench = Some((bench_vcpus, reps));
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
pub fn render(rows: &[Row], vcpus: u32, env: &str, carry: &str) -> String {
    let kvm = if env == LAB_ENV {
        "the KVM lab's /dev/kvm (real TSC offsets)".to_string()
    } else {
        format!("this host's /dev/kvm (env {env})")
    };
    let mut out = format!(
        "clockcarry demo: the guest's own view of its clocks across a blackout\n\
         (probe guest, {vcpus} vCPUs, {kvm}; errors are against host CLOCK_TAI, \
         \"kept running\" = 0)\n\
         clockcarry rows: {carry}\n\n"
    );
    out.push_str(&format!(
        "{:<17} {:<16} {:>10} {:>12} {:>16} {:>17} {:>10}\n",
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
            Some(e) => format!("{:<17} {:<16} RUN FAILED: {e}\n", r.scenario, r.mode),
            None => format!(
                "{:<17} {:<16} {:>10} {:>12} {:>16} {:>17} {:>10}\n",
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
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.pass).collect();
    out.push('\n');
    if failed.is_empty() {
        out.push_str(&format!("checks: PASS ({} rows)\n", rows.len()));
    } else {
        out.push_str(&format!(
            "checks: FAIL ({} of {} rows)\n",
            failed.len(),
            rows.len()
        ));
        for r in failed {
            for c in &r.failed_checks {
                out.push_str(&format!("  FAIL {} / {}: {c}\n", r.scenario, r.mode));
            }
        }
    }
    out.push_str(&tsc_rule_summary(rows));
    out.push_str(
        "TSC error: guest TSC minus what it would read had the VM kept running.\n\
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

/// What the TSC rule said: for each clockcarry row where it applies, the
/// error against its bound; or why it does not apply.
fn tsc_rule_summary(rows: &[Row]) -> String {
    let cc: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            (r.mode == Mode::Clockcarry.name() || r.mode == Mode::ClockcarryArmed.name())
                && r.error.is_none()
        })
        .collect();
    if cc.is_empty() {
        return String::new();
    }
    if !cc.iter().any(|r| r.tsc_offsets_effective == Some(true)) {
        return "TSC rule (|TSC error| <= plan bound + measurement bound): not applicable, \
                TSC offsets are inert here\n\n"
            .into();
    }
    let mut out = String::from(
        "TSC rule (|TSC error| <= plan bound + measurement bound, clockcarry rows):\n",
    );
    for r in cc {
        let ns = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v} ns"));
        out.push_str(&format!(
            "  {:<17} {:>12} vs {:>10} (plan {}{}, measurement {})  {}\n",
            r.scenario,
            cell(r.tsc_error_ns),
            ns(r.tsc_bound_ns),
            ns(r.plan_bound_ns
                .or((r.scenario == Scenario::PauseResume.name()).then_some(0))),
            r.plan_mode
                .as_deref()
                .map_or(String::new(), |m| format!(" {m}")),
            ns(r.measure_bound_ns),
            if r.failed_checks.iter().any(|c| c.starts_with("|TSC error|")) {
                "FAIL"
            } else {
                "pass"
            }
        ));
    }
    out.push('\n');
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
    if let Some((vcpus, reps)) = opts.bench.clone() {
        return bench_main(&opts, &vcpus, reps);
    }
    let started = Instant::now();
    let carry = if opts.modes.iter().any(Mode::is_clockcarry) {
        opts.carry.describe()
    } else {
        "none (no clockcarry mode asked for)".to_string()
    };
    // Which clockcarry the rows run: on stderr always (stdout is JSON only
    // with --json), in the table's header too.
    eprintln!("clockcarry-demo: clockcarry rows run {carry}");
    if !opts.json {
        eprintln!(
            "running {} scenarios x {} modes{} ...",
            opts.scenarios.len(),
            opts.modes.len(),
            if opts.env == LAB_ENV {
                " (lab checks on)"
            } else {
                ""
            }
        );
    }
    super::progress::set_verbose(opts.verbose);
    super::progress::watchdog(opts.timeout);
    // With --json each scenario's rows go out as soon as they are measured.
    let rows = run_all(&opts, |r| {
        if opts.json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
            let _ = std::io::Write::flush(&mut std::io::stdout());
        }
    });
    if !opts.json {
        print!("{}", render(&rows, opts.vcpus, &opts.env, &carry));
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
        eprintln!(
            "clockcarry-demo: PASS: all {} rows passed their checks",
            rows.len()
        );
        0
    } else {
        for r in &failed {
            eprintln!(
                "clockcarry-demo: FAIL {} / {}: {}",
                r.scenario,
                r.mode,
                r.failed_checks.join("; ")
            );
        }
        eprintln!(
            "clockcarry-demo: FAIL: {} of {} rows failed their checks",
            failed.len(),
            rows.len()
        );
        1
    }
}

/// `--bench-blackout`: rows as JSON lines or a table; exit 1 when a rep
/// failed (a missed target is printed, not an exit status: it is a figure
/// of the machine).
fn bench_main(opts: &Options, vcpus: &[u32], reps: u32) -> i32 {
    eprintln!(
        "clockcarry-demo: blackout benchmark, vCPUs {vcpus:?}, {reps} reps; clockcarry runs {}",
        opts.carry.describe()
    );
    super::progress::set_verbose(opts.verbose);
    let rows = super::bench::run(opts, vcpus, reps, |r| {
        if opts.json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
            let _ = std::io::Write::flush(&mut std::io::stdout());
        }
    });
    if !opts.json {
        print!("{}", super::bench::render(&rows, reps));
    }
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&opts.workdir);
    }
    for r in rows.iter().filter(|r| r.target_met == Some(false)) {
        eprintln!(
            "clockcarry-demo: !!! TARGET MISSED {} at {} vCPUs: clock added p50 {:?} ns, target {:?} ns !!!",
            r.mode, r.vcpus, r.added_clock_p50_ns, r.target_added_clock_p50_ns
        );
    }
    let failed: usize = rows.iter().map(|r| r.failures).sum();
    if failed > 0 {
        eprintln!("clockcarry-demo: FAIL: {failed} reps failed");
        return 1;
    }
    0
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

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_lists() {
        let o = parse(args(&[
            "--modes",
            "qemu,clockcarry",
            "--scenarios",
            "pause-resume",
            "--in-process",
        ]))
        .expect("ok")
        .expect("options");
        assert_eq!(o.modes.len(), 2);
        assert_eq!(o.scenarios, vec![Scenario::PauseResume]);
        assert!(parse(args(&["--modes", "vmware"])).is_err());
        assert!(parse(args(&["--vcpus", "0"])).is_err());
    }

    #[test]
    fn parses_the_benchmark() {
        let o = parse(args(&[
            "--bench-blackout",
            "--bench-vcpus",
            "1, 64",
            "--reps",
            "3",
            "--in-process",
        ]))
        .expect("ok")
        .expect("options");
        assert_eq!(o.bench, Some((vec![1, 64], 3)));
        let o = parse(args(&["--in-process"]))
            .expect("ok")
            .expect("options");
        assert_eq!(o.bench, None);
        for bad in [
            &["--bench-vcpus", "0"][..],
            &["--bench-vcpus", "1,65"],
            &["--bench-vcpus", ""],
            &["--reps", "0"],
            &["--reps", "x"],
        ] {
            assert!(parse(args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn which_clockcarry_runs() {
        // The test executable has no `clockcarry` next to it (target/*/deps/).
        let exe = std::env::current_exe().expect("own path");
        assert!(Carry::next_to(&exe).is_none());
        // No fallback to the library without --in-process...
        let e = parse(vec![]).expect_err("no clockcarry binary");
        assert!(
            e.contains("--in-process") && e.contains("--clockcarry-bin"),
            "{e}"
        );
        // ... unless no clockcarry row is asked for.
        let o = parse(args(&["--modes", "qemu"]))
            .expect("ok")
            .expect("options");
        assert!(matches!(o.carry, Carry::InProcess));
        let o = parse(args(&["--in-process"]))
            .expect("ok")
            .expect("options");
        assert!(matches!(o.carry, Carry::InProcess));
        // An explicit binary must exist; it and --in-process exclude each other.
        let here = exe.display().to_string();
        let o = parse(args(&["--clockcarry-bin", &here]))
            .expect("ok")
            .expect("options");
        assert!(matches!(&o.carry, Carry::Binary(b) if *b == exe));
        assert!(parse(args(&["--clockcarry-bin", "/nonexistent/clockcarry"])).is_err());
        assert!(parse(args(&["--clockcarry-bin", &here, "--in-process"])).is_err());
        // Next to the demo: the file named `clockcarry` in the same directory.
        let dir = std::env::temp_dir().join(format!("demo-next-to-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("clockcarry"), b"").expect("file");
        let found = Carry::next_to(&dir.join("clockcarry-demo"));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, Some(dir.join("clockcarry")));
    }
}
