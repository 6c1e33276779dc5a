//! `fault-suite`: fault injection against the reference VMM with a probe
//! guest (docs/faults.md). Run by `integration/faults/run`, on this host or
//! inside the KVM lab.
//!
//! stdout: one JSON line per suite. stderr: what it does, every failure.
//! Exit 0 when every suite passed, 1 when one failed, 2 for a usage error,
//! 3 when the fixture could not be built.

mod harness;
mod http;
mod proxy;
mod suites;
mod util;

use std::path::PathBuf;

use harness::{mkdir, Env};
use util::Rng;

const USAGE: &str = "\
fault-suite: clockcarry restore under faults, against the reference VMM

USAGE:
    fault-suite [OPTIONS]

OPTIONS:
    --suite NAME        kill-restore | kill-vmm | socket-removed | race | all
                        (repeatable; default all)
    --rounds N          rounds per suite (defaults: kill-restore 60, kill-vmm 50,
                        socket-removed 52, race 50)
    --seed N            random seed (default: from the clock; printed)
    --cpus N            vCPUs of the probe VM (default 2)
    --probe-ms N        how long each restored VM runs before its probe log is
                        checked (default 40)
    --calibration-runs N  restores timed before the first suite (default 10;
                        half as many before each later one)
    --start-timeout-ms N  how long a VMM may take to answer (default 10000)
    --env LABEL         label in the summaries: host (default) or lab
    --bin-dir DIR       where clockcarry and clockcarry-refvmm are (default:
                        next to this program)
    --work DIR          work directory (default: $TMPDIR/clockcarry-faults.PID)
    --deadline-s N      give up (kill everything, exit 3) after N s (default
                        0: never); a step taking over 20 s is reported
    --inject-failure    self-test: in each suite's first rounds, append a
                        backwards report to a probe log and (where offsets
                        take effect) move one vCPU's offset after the fault;
                        every suite must then fail
    --keep              keep the work directory and every round's files
    -v                  one line per round on stderr
";

struct Args {
    suites: Vec<String>,
    rounds: Option<u32>,
    seed: Option<u64>,
    cpus: u32,
    probe_ms: u64,
    calib_runs: usize,
    start_timeout_ms: u64,
    label: String,
    bin_dir: Option<PathBuf>,
    work: Option<PathBuf>,
    keep: bool,
    verbose: bool,
    deadline_s: u64,
    inject: bool,
}

const ALL: [&str; 4] = ["kill-restore", "kill-vmm", "socket-removed", "race"];

fn parse() -> Result<Args, String> {
    let mut a = Args {
        suites: vec![],
        rounds: None,
        seed: None,
        cpus: 2,
        probe_ms: 40,
        calib_runs: 10,
        start_timeout_ms: 10_000,
        label: "host".into(),
        bin_dir: None,
        work: None,
        keep: false,
        verbose: false,
        deadline_s: 0,
        inject: false,
    };
    let mut it = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(f: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or(format!("{f} needs a value"))?;
        v.parse().map_err(|_| format!("{f}: {v:?} is not a number"))
    }
    while let Some(f) = it.next() {
        match f.as_str() {
            "--suite" => {
                let v = it.next().ok_or("--suite needs a name")?;
                if v == "all" {
                    a.suites.extend(ALL.iter().map(|s| s.to_string()));
                } else if ALL.contains(&v.as_str()) {
                    a.suites.push(v);
                } else {
                    return Err(format!("unknown suite {v:?}"));
                }
            }
            "--rounds" => a.rounds = Some(num(&f, it.next())?),
            "--seed" => a.seed = Some(num(&f, it.next())?),
            "--cpus" => a.cpus = num(&f, it.next())?,
            "--probe-ms" => a.probe_ms = num(&f, it.next())?,
            "--calibration-runs" => a.calib_runs = num(&f, it.next())?,
            "--start-timeout-ms" => a.start_timeout_ms = num(&f, it.next())?,
            "--env" => a.label = it.next().ok_or("--env needs a label")?,
            "--bin-dir" => a.bin_dir = Some(it.next().ok_or("--bin-dir needs a path")?.into()),
            "--work" => a.work = Some(it.next().ok_or("--work needs a path")?.into()),
            "--deadline-s" => a.deadline_s = num(&f, it.next())?,
            "--keep" => a.keep = true,
            "--inject-failure" => a.inject = true,
            "-v" | "--verbose" => a.verbose = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.suites.is_empty() {
        a.suites = ALL.iter().map(|s| s.to_string()).collect();
    }
    a.suites.dedup();
    if !(1..=8).contains(&a.cpus) {
        return Err("--cpus: 1 to 8".into());
    }
    if a.rounds == Some(0) || a.calib_runs == 0 {
        return Err("--rounds and --calibration-runs must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fault-suite: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let work = args.work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("clockcarry-faults.{}", std::process::id()))
    });
    util::watchdog(20, args.deadline_s);
    let seed = args
        .seed
        .unwrap_or_else(|| util::now_ns() ^ u64::from(std::process::id()));
    let mut env = Env {
        clockcarry: bin_dir.join("clockcarry"),
        refvmm: bin_dir.join("clockcarry-refvmm"),
        sidecar: work.join("vm.sidecar.json"),
        key: work.join("sidecar.key"),
        snapshot: work.join("snapshot"),
        src_log: work.join("src.jsonl"),
        work,
        cpus: args.cpus,
        probe_ms: args.probe_ms,
        start_timeout_ms: args.start_timeout_ms,
        verbose: args.verbose,
        keep: args.keep,
        inert: None,
        inject: Default::default(),
        calib: Default::default(),
        samples: Default::default(),
        label: args.label.clone(),
    };
    let code = run(&args, &mut env, seed);
    if !args.keep && code != 3 {
        let _ = std::fs::remove_dir_all(&env.work);
    } else {
        eprintln!("faults: work directory kept: {}", env.work.display());
    }
    std::process::exit(code);
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn run(args: &Args, env: &mut Env, seed: u64) -> i32 {
    for p in [&env.clockcarry, &env.refvmm] {
        if !p.is_file() {
            eprintln!("fault-suite: {} not found (--bin-dir)", p.display());
            return 3;
        }
    }
    let _ = std::fs::remove_dir_all(&env.work);
    let run_dir = env.work.join("run");
    let state_dir = env.work.join("state");
    for d in [&env.work, &run_dir, &state_dir] {
        if let Err(e) = mkdir(d) {
            eprintln!("fault-suite: {e}");
            return 3;
        }
    }
    // clockcarry's per-boot cache and per-VM locks live here, not in /run;
    // its host configuration is an empty one here, not /etc's; the sidecar
    // is sealed with a key of this run.
    let conf = env.work.join("clockcarry.conf");
    let mut key = [0u8; 32];
    let keyed = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .and_then(|()| write_private(&env.key, &key))
        .and_then(|()| write_private(&conf, b"# fault-suite: no host settings\n"));
    if let Err(e) = keyed {
        eprintln!("fault-suite: writing the key and configuration: {e}");
        return 3;
    }
    std::env::set_var("CLOCKCARRY_RUN_DIR", &run_dir);
    std::env::set_var("CLOCKCARRY_STATE_DIR", &state_dir);
    std::env::set_var("CLOCKCARRY_CONFIG", &conf);
    eprintln!(
        "faults: seed {seed}; suites {}; binaries {} and {}",
        args.suites.join(", "),
        env.clockcarry.display(),
        env.refvmm.display()
    );
    let t0 = util::now_ns();
    if let Err(e) = env
        .setup()
        .and_then(|()| env.calibrate(args.calib_runs, true))
    {
        eprintln!("fault-suite: the fixture failed: {e}");
        return 3;
    }
    eprintln!(
        "faults: fixture and calibration took {:.1} s",
        (util::now_ns() - t0) as f64 / 1e9
    );
    let mut failed = Vec::new();
    for (k, name) in args.suites.iter().enumerate() {
        let mut rng = Rng::new(seed.wrapping_add(k as u64 * 0x1000_0001));
        // Again before each later suite: the load of this machine changes.
        if k > 0 {
            if let Err(e) = env.calibrate(args.calib_runs.div_ceil(2), false) {
                eprintln!("fault-suite: calibration before {name} failed: {e}");
                failed.push("calibration");
                continue;
            }
        }
        if args.inject {
            env.inject
                .set(harness::INJECT_BACKWARDS | harness::INJECT_OFFSETS);
        }
        let s = match name.as_str() {
            "kill-restore" => suites::kill_restore(env, args.rounds.unwrap_or(60), &mut rng),
            "kill-vmm" => suites::kill_vmm(env, args.rounds.unwrap_or(50), &mut rng),
            "socket-removed" => suites::socket_removed(env, args.rounds.unwrap_or(52), &mut rng),
            _ => suites::race(env, args.rounds.unwrap_or(50), &mut rng),
        };
        let mut line = s.line(env);
        // The seed, so a failing run can be repeated.
        line.insert_str(line.len() - 1, &format!(",\"seed\":{seed}"));
        println!("{line}");
        eprintln!(
            "faults: suite {} {}",
            s.suite,
            if s.pass { "PASSED" } else { "FAILED" }
        );
        if !s.pass {
            failed.push(s.suite);
        }
    }
    if failed.is_empty() {
        eprintln!("faults: all suites passed");
        0
    } else {
        eprintln!("faults: FAILED: {}", failed.join(", "));
        1
    }
}
