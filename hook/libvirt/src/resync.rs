//! The detached resync helper: waits until the domain runs and its guest
//! agent answers, sets the guest's wall clock from host time through
//! `virsh domtime` (argv, no shell), measures the guest clock before and
//! after, and writes a report.
//!
//! The logic ([`run_resync`]) works on two small traits, [`Guest`] (the
//! agent through virsh) and [`Clock`] (host time, sleeping), so tests drive
//! it with a simulated guest.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::args::{DomainName, DomainUuid};
use super::config::{Config, SetMethod};
use super::report::{
    rfc3339_ns, BlackoutReport, OffsetReport, ResyncReport, NOT_PRESERVED, REPORT_FORMAT,
};
use super::state::Trigger;
use super::LibvirtError;

const NS: i128 = 1_000_000_000;
/// Errors kept in a report.
const MAX_ERRORS: usize = 8;
/// Largest virsh output read, in bytes.
const MAX_OUTPUT_BYTES: u64 = 64 * 1024;
/// Guest-time reads before the set (the first included).
const BEFORE_READINGS: u32 = 3;
/// Verification: most readings.
const VERIFY_MAX_READINGS: u32 = 100;
/// Verification: longest time spent, ns.
const VERIFY_MAX_NS: u64 = 3_000_000_000;
/// Aligned set: extra lead so the helper is never late for its second, ns.
const ALIGN_MARGIN_NS: u64 = 50_000_000;
/// Aligned set: the latency estimate is clamped to this, ns.
const ALIGN_MAX_LATENCY_NS: u64 = 2_000_000_000;

/// What the hook passes to the helper (as command-line arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncRequest {
    pub uuid: DomainUuid,
    pub name: DomainName,
    pub trigger: Trigger,
    /// CLOCK_REALTIME of `started begin`, ns.
    pub started_at_ns: u64,
    pub blackout_lower_bound_ns: Option<u64>,
    pub generation: u64,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
}

impl ResyncRequest {
    /// The helper's arguments (after [`super::RESYNC_ARG`]).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--uuid".into(),
            self.uuid.as_str().into(),
            "--name".into(),
            self.name.as_str().into(),
            "--trigger".into(),
            self.trigger.as_str().into(),
            "--started-at-ns".into(),
            self.started_at_ns.to_string().into(),
            "--generation".into(),
            self.generation.to_string().into(),
            "--config".into(),
            self.config_path.clone().into_os_string(),
            "--state-dir".into(),
            self.state_dir.clone().into_os_string(),
        ];
        if let Some(b) = self.blackout_lower_bound_ns {
            v.push("--blackout-lower-bound-ns".into());
            v.push(b.to_string().into());
        }
        v
    }

    /// Parses what [`ResyncRequest::to_args`] produced. Every option is
    /// required once, except `--blackout-lower-bound-ns` (optional).
    pub fn from_args(args: &[OsString]) -> Result<ResyncRequest, LibvirtError> {
        let usage = |m: String| LibvirtError::Usage(format!("resync helper: {m}"));
        let mut uuid = None;
        let mut name = None;
        let mut trigger = None;
        let mut started = None;
        let mut generation = None;
        let mut config = None;
        let mut state_dir = None;
        let mut blackout = None;
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| usage(format!("{} needs a value", key.to_string_lossy())))?;
            let text = || {
                value
                    .to_str()
                    .ok_or_else(|| usage(format!("{} is not UTF-8", key.to_string_lossy())))
            };
            let num = || -> Result<u64, LibvirtError> {
                let t = text()?;
                if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(usage(format!("{} is not a number", key.to_string_lossy())));
                }
                t.parse()
                    .map_err(|_| usage(format!("{} is out of range", key.to_string_lossy())))
            };
            let slot_set = |slot: &mut Option<_>, v| -> Result<(), LibvirtError> {
                if slot.is_some() {
                    return Err(usage(format!("{} given twice", key.to_string_lossy())));
                }
                *slot = Some(v);
                Ok(())
            };
            match key.to_str().unwrap_or("") {
                "--uuid" => {
                    let v = DomainUuid::parse(text()?)?;
                    if uuid.replace(v).is_some() {
                        return Err(usage("--uuid given twice".into()));
                    }
                }
                "--name" => {
                    let v = DomainName::parse(value)?;
                    if name.replace(v).is_some() {
                        return Err(usage("--name given twice".into()));
                    }
                }
                "--trigger" => {
                    let v =
                        Trigger::parse(text()?).ok_or_else(|| usage("unknown --trigger".into()))?;
                    if trigger.replace(v).is_some() {
                        return Err(usage("--trigger given twice".into()));
                    }
                }
                "--started-at-ns" => slot_set(&mut started, num()?)?,
                "--generation" => slot_set(&mut generation, num()?)?,
                "--blackout-lower-bound-ns" => slot_set(&mut blackout, num()?)?,
                "--config" | "--state-dir" => {
                    let p = PathBuf::from(value);
                    if !p.is_absolute() {
                        return Err(usage(format!("{} must be absolute", key.to_string_lossy())));
                    }
                    let slot = if key == "--config" {
                        &mut config
                    } else {
                        &mut state_dir
                    };
                    if slot.replace(p).is_some() {
                        return Err(usage(format!("{} given twice", key.to_string_lossy())));
                    }
                }
                other => return Err(usage(format!("unknown option {other:?}"))),
            }
        }
        let missing = |what: &str| usage(format!("{what} is required"));
        Ok(ResyncRequest {
            uuid: uuid.ok_or_else(|| missing("--uuid"))?,
            name: name.ok_or_else(|| missing("--name"))?,
            trigger: trigger.ok_or_else(|| missing("--trigger"))?,
            started_at_ns: started.ok_or_else(|| missing("--started-at-ns"))?,
            blackout_lower_bound_ns: blackout,
            generation: generation.ok_or_else(|| missing("--generation"))?,
            config_path: config.ok_or_else(|| missing("--config"))?,
            state_dir: state_dir.ok_or_else(|| missing("--state-dir"))?,
        })
    }
}

/// The guest agent, as the helper uses it.
pub trait Guest {
    /// The domain's state as virsh names it (`running`, `paused`,
    /// `shut off`, ...). An error whose text says the domain does not
    /// exist ends the wait.
    fn domstate(&mut self) -> Result<String, String>;
    /// The guest's wall clock, whole seconds since the epoch (truncated).
    fn get_time(&mut self) -> Result<i64, String>;
    /// Sets the guest clock. `at_second` is the whole second to set for
    /// [`SetMethod::Aligned`] (ignored otherwise).
    fn set_time(&mut self, method: SetMethod, at_second: i64) -> Result<(), String>;
    /// The argv that [`Guest::set_time`] runs (for the report).
    fn set_argv(&self, method: SetMethod, at_second: i64) -> Vec<String>;
}

/// Host time and sleeping.
pub trait Clock {
    /// CLOCK_REALTIME, ns.
    fn now_ns(&self) -> u64;
    fn sleep_ns(&self, ns: u64);
}

/// The real host clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        super::now_ns()
    }
    fn sleep_ns(&self, ns: u64) {
        std::thread::sleep(Duration::from_nanos(ns));
    }
}

/// [`Guest`] through `virsh -c URI ... UUID` (the UUID, not the name: it
/// is always a plain token, and virsh looks it up exactly).
pub struct VirshGuest {
    pub virsh: PathBuf,
    pub uri: String,
    pub uuid: DomainUuid,
    pub timeout: Duration,
}

impl VirshGuest {
    fn argv(&self, tail: &[&str]) -> Vec<String> {
        let mut v = vec![
            self.virsh.display().to_string(),
            "-c".to_owned(),
            self.uri.clone(),
        ];
        v.push(tail[0].to_owned());
        v.push(self.uuid.as_str().to_owned());
        v.extend(tail[1..].iter().map(|s| (*s).to_owned()));
        v
    }

    /// Runs virsh with `args` (no shell, clean environment, C locale),
    /// killing it after the timeout. Returns stdout on exit status 0,
    /// otherwise stderr (or a description) as the error.
    fn run(&self, argv: &[String]) -> Result<String, String> {
        let mut child = Command::new(&self.virsh)
            .args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.virsh.display()))?;
        let start = std::time::Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if start.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} timed out after {} s",
                        argv[3..].join(" "),
                        self.timeout.as_secs()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(format!("waiting for virsh: {e}")),
            }
        };
        let read = |r: Option<&mut dyn Read>| {
            let mut s = Vec::new();
            if let Some(r) = r {
                let _ = r.take(MAX_OUTPUT_BYTES).read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).trim().to_owned()
        };
        let out = read(child.stdout.as_mut().map(|s| s as &mut dyn Read));
        let err = read(child.stderr.as_mut().map(|s| s as &mut dyn Read));
        if status.success() {
            Ok(out)
        } else {
            Err(if err.is_empty() {
                format!("{} failed ({status})", argv[3..].join(" "))
            } else {
                super::args::clip(&err.replace('\n', " "), 300)
            })
        }
    }
}

impl Guest for VirshGuest {
    fn domstate(&mut self) -> Result<String, String> {
        self.run(&self.argv(&["domstate"]))
    }

    fn get_time(&mut self) -> Result<i64, String> {
        let out = self.run(&self.argv(&["domtime"]))?;
        parse_domtime(&out).ok_or_else(|| {
            format!(
                "unexpected virsh domtime output {:?}",
                super::args::clip(&out, 80)
            )
        })
    }

    fn set_time(&mut self, method: SetMethod, at_second: i64) -> Result<(), String> {
        self.run(&self.set_argv(method, at_second)).map(|_| ())
    }

    fn set_argv(&self, method: SetMethod, at_second: i64) -> Vec<String> {
        match method {
            SetMethod::Aligned => {
                let s = at_second.to_string();
                self.argv(&["domtime", "--time", &s])
            }
            SetMethod::Now => self.argv(&["domtime", "--now"]),
            SetMethod::Sync => self.argv(&["domtime", "--sync"]),
        }
    }
}

/// Parses `virsh domtime` output: `Time: 1795754624`.
pub fn parse_domtime(out: &str) -> Option<i64> {
    let rest = out.trim().strip_prefix("Time:")?.trim();
    if rest.is_empty() || rest.len() > 19 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// One guest-time reading: the guest said `guest_s` (truncated seconds)
/// somewhere between host times `before_ns` and `after_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub before_ns: u64,
    pub guest_s: i64,
    pub after_ns: u64,
}

impl Reading {
    /// The interval [lo, hi] of (guest - host) in ns this reading allows:
    /// guest time in [G, G+1) s at a host time in [before, after].
    pub fn interval(&self) -> (i128, i128) {
        let g = i128::from(self.guest_s) * NS;
        (
            g - i128::from(self.after_ns),
            g + NS - i128::from(self.before_ns),
        )
    }
}

/// The offset interval (guest - host, ns) the readings allow, `None`
/// without readings.
///
/// With a guest second boundary between two consecutive readings (the
/// guest said G, then G+1), the boundary fell between the first reading's
/// start and the second's end: the offset is pinned to that window, about
/// two round trips wide, whatever the guest clock's rate (a TCG guest's
/// clock can run a few percent slow). The last such boundary is used.
/// Without one, the intersection of the readings' intervals (a window
/// under a second); readings that contradict each other (the guest clock
/// stepped) fall back to the last reading alone.
pub fn estimate(readings: &[Reading]) -> Option<(i128, i128)> {
    let last = readings.last()?;
    let edge = readings
        .windows(2)
        .rev()
        .find(|w| w[1].guest_s.checked_sub(w[0].guest_s) == Some(1));
    if let Some(w) = edge {
        let g = i128::from(w[1].guest_s) * NS;
        return Some((
            g - i128::from(w[1].after_ns),
            g - i128::from(w[0].before_ns),
        ));
    }
    let (mut lo, mut hi) = (i128::MIN, i128::MAX);
    for r in readings {
        let (a, b) = r.interval();
        lo = lo.max(a);
        hi = hi.min(b);
    }
    Some(if lo <= hi { (lo, hi) } else { last.interval() })
}

/// Whether the readings include a guest second boundary.
fn has_edge(readings: &[Reading]) -> bool {
    readings
        .windows(2)
        .any(|w| w[1].guest_s.checked_sub(w[0].guest_s) == Some(1))
}

fn offset_report(readings: &[Reading]) -> Option<OffsetReport> {
    let (lo, hi) = estimate(readings)?;
    Some(OffsetReport {
        offset_s: ns_to_s((lo + hi) / 2),
        uncertainty_s: ns_to_s((hi - lo) / 2),
        readings: u32::try_from(readings.len()).unwrap_or(u32::MAX),
    })
}

fn ns_to_s(ns: i128) -> f64 {
    // Offsets here are at most years: exact enough in f64 after rounding
    // to the microsecond.
    let us = ns / 1000;
    (us as f64) / 1e6
}

fn ms(ns: u64) -> f64 {
    ns_to_s(i128::from(ns) * 1000)
}

/// Whether the helper is still wanted, as the hook's state file says
/// (asked before every poll and every try).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// This helper's generation is the domain's latest: carry on.
    Current,
    /// A newer helper for the same domain took over: stop, no report.
    Superseded,
    /// The domain stopped (libvirt's `stopped end` or `release end` came
    /// after this helper was launched), or its state is gone: stop, with a
    /// `domain-gone` report giving the reason.
    Stopped(String),
}

/// How the helper ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The clock was set (and verified when a reading afterwards worked).
    Synced,
    /// The agent never answered, or every set failed, within the bounds.
    Timeout,
    /// The domain stopped or vanished (e.g. a failed migration): virsh
    /// said so, or the hook recorded its stop ([`Standing::Stopped`]).
    DomainGone,
    /// A newer helper for the same domain took over.
    Superseded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Synced => "synced",
            Outcome::Timeout => "timeout",
            Outcome::DomainGone => "domain-gone",
            Outcome::Superseded => "superseded",
        }
    }
}

/// Runs the helper's logic and returns the report (not yet written).
/// `standing` says whether the helper is still wanted ([`Standing`]); it
/// is asked before every domain-state poll and every agent try, so a
/// superseded helper, or one whose domain stopped, ends within one
/// `retry_interval_ms` (plus at most one virsh run) rather than at its
/// deadline.
#[allow(clippy::too_many_lines)] // older than the lint; split before extending
pub fn run_resync(
    req: &ResyncRequest,
    cfg: &Config,
    guest: &mut dyn Guest,
    clock: &dyn Clock,
    standing: &mut dyn FnMut() -> Standing,
) -> (Outcome, ResyncReport) {
    let interval_ns = u64::from(cfg.retry_interval_ms) * 1_000_000;
    let mut rep = ResyncReport {
        format: REPORT_FORMAT.to_owned(),
        version: 1,
        domain: req.name.as_str().to_owned(),
        uuid: req.uuid.as_str().to_owned(),
        trigger: req.trigger.as_str().to_owned(),
        outcome: String::new(),
        started_begin_at: rfc3339_ns(req.started_at_ns),
        finished_at: String::new(),
        blackout: req.blackout_lower_bound_ns.map(|b| BlackoutReport {
            lower_bound_s: ns_to_s(i128::from(b)),
            basis: "started begin minus the last stopped end on this host; \
                    the guest paused before that stop and resumed after started begin"
                .to_owned(),
        }),
        method: format!("virsh domtime ({})", cfg.set_method.as_str()),
        set_command: None,
        wait_running_s: None,
        offset_before: None,
        offset_after: None,
        correction_s: None,
        agent_latency_ms: None,
        set_lead_ms: None,
        set_latency_ms: None,
        attempts: 0,
        errors: Vec::new(),
        tsc_and_kvm_clock: "not preserved".to_owned(),
        note: NOT_PRESERVED.to_owned(),
    };
    let push_err = |rep: &mut ResyncReport, e: String| {
        if rep.errors.last() != Some(&e) {
            if rep.errors.len() == MAX_ERRORS {
                rep.errors.remove(0);
            }
            rep.errors.push(e);
        }
    };
    let finish = |mut rep: ResyncReport, outcome: Outcome, clock: &dyn Clock| {
        rep.outcome = outcome.as_str().to_owned();
        rep.finished_at = rfc3339_ns(clock.now_ns());
        (outcome, rep)
    };

    // 1. Wait until the domain runs.
    let run_deadline = clock
        .now_ns()
        .saturating_add(u64::from(cfg.run_wait_s) * 1_000_000_000);
    loop {
        match standing() {
            Standing::Current => {}
            Standing::Superseded => return finish(rep, Outcome::Superseded, clock),
            Standing::Stopped(why) => {
                push_err(&mut rep, why);
                return finish(rep, Outcome::DomainGone, clock);
            }
        }
        match guest.domstate() {
            Ok(s) if s == "running" => break,
            Ok(s) if s == "shut off" || s == "crashed" => {
                push_err(&mut rep, format!("domain state {s}"));
                return finish(rep, Outcome::DomainGone, clock);
            }
            Ok(_) => {}
            Err(e) => {
                let gone = e.contains("failed to get domain") || e.contains("Domain not found");
                push_err(&mut rep, e);
                if gone {
                    return finish(rep, Outcome::DomainGone, clock);
                }
            }
        }
        if clock.now_ns() >= run_deadline {
            push_err(
                &mut rep,
                format!("domain not running after {} s", cfg.run_wait_s),
            );
            return finish(rep, Outcome::Timeout, clock);
        }
        clock.sleep_ns(interval_ns);
    }
    let running_at = clock.now_ns();
    rep.wait_running_s = Some(ns_to_s(
        i128::from(running_at) - i128::from(req.started_at_ns),
    ));

    // 2. Read the guest clock, then set it; retry both until the deadline.
    let agent_deadline = running_at.saturating_add(u64::from(cfg.agent_timeout_s) * 1_000_000_000);
    let before = loop {
        match standing() {
            Standing::Current => {}
            Standing::Superseded => return finish(rep, Outcome::Superseded, clock),
            Standing::Stopped(why) => {
                push_err(&mut rep, why);
                return finish(rep, Outcome::DomainGone, clock);
            }
        }
        rep.attempts = rep.attempts.saturating_add(1);
        let t0 = clock.now_ns();
        let got = guest.get_time();
        let t1 = clock.now_ns();
        match got {
            Ok(g) => {
                let mut readings = vec![Reading {
                    before_ns: t0,
                    guest_s: g,
                    after_ns: t1,
                }];
                if rep.agent_latency_ms.is_none() {
                    rep.agent_latency_ms = Some(ms(t1.saturating_sub(t0)));
                }
                // A few more reads: the first one after a restore is often
                // slow, and the fastest round trip is the best lead for an
                // aligned set (and a narrower "before" interval).
                for _ in 1..BEFORE_READINGS {
                    rep.attempts = rep.attempts.saturating_add(1);
                    let t0 = clock.now_ns();
                    let got = guest.get_time();
                    let t1 = clock.now_ns();
                    match got {
                        Ok(g) => readings.push(Reading {
                            before_ns: t0,
                            guest_s: g,
                            after_ns: t1,
                        }),
                        Err(e) => push_err(&mut rep, format!("get: {e}")),
                    }
                }
                let latency = readings
                    .iter()
                    .map(|r| r.after_ns.saturating_sub(r.before_ns))
                    .min()
                    .unwrap_or(0);
                let at_second = if cfg.set_method == SetMethod::Aligned {
                    // Start virsh `latency` (the fastest read's round trip)
                    // before host time reaches a whole second S, asking for
                    // S: the agent sets S at about S.
                    let lead = latency.min(ALIGN_MAX_LATENCY_NS);
                    rep.set_lead_ms = Some(ms(lead));
                    let now = clock.now_ns();
                    let s = now.saturating_add(lead).saturating_add(ALIGN_MARGIN_NS)
                        / 1_000_000_000
                        + 1;
                    let launch = s.saturating_mul(1_000_000_000).saturating_sub(lead);
                    if launch > now {
                        clock.sleep_ns(launch - now);
                    }
                    i64::try_from(s).unwrap_or(i64::MAX)
                } else {
                    0
                };
                rep.attempts = rep.attempts.saturating_add(1);
                let s0 = clock.now_ns();
                let set = guest.set_time(cfg.set_method, at_second);
                let s1 = clock.now_ns();
                match set {
                    Ok(()) => {
                        rep.set_latency_ms = Some(ms(s1.saturating_sub(s0)));
                        rep.set_command = Some(guest.set_argv(cfg.set_method, at_second));
                        break readings;
                    }
                    Err(e) => push_err(&mut rep, format!("set: {e}")),
                }
            }
            Err(e) => push_err(&mut rep, format!("get: {e}")),
        }
        if clock.now_ns() >= agent_deadline {
            push_err(
                &mut rep,
                format!(
                    "guest agent: no successful set within {} s",
                    cfg.agent_timeout_s
                ),
            );
            return finish(rep, Outcome::Timeout, clock);
        }
        clock.sleep_ns(interval_ns);
    };
    rep.offset_before = offset_report(&before);

    // 3. Verify: read until a guest second boundary pins the offset.
    let verify_start = clock.now_ns();
    let mut after: Vec<Reading> = Vec::new();
    let mut failures = 0u32;
    while u32::try_from(after.len()).unwrap_or(u32::MAX) < VERIFY_MAX_READINGS
        && clock.now_ns().saturating_sub(verify_start) < VERIFY_MAX_NS
        && failures < 3
        && !has_edge(&after)
    {
        rep.attempts = rep.attempts.saturating_add(1);
        let t0 = clock.now_ns();
        let got = guest.get_time();
        let t1 = clock.now_ns();
        match got {
            Ok(g) => after.push(Reading {
                before_ns: t0,
                guest_s: g,
                after_ns: t1,
            }),
            Err(e) => {
                failures += 1;
                push_err(&mut rep, format!("verify: {e}"));
            }
        }
    }
    rep.offset_after = offset_report(&after);
    if let (Some(b), Some(a)) = (&rep.offset_before, &rep.offset_after) {
        rep.correction_s = Some(((a.offset_s - b.offset_s) * 1e6).round() / 1e6);
    }
    finish(rep, Outcome::Synced, clock)
}

/// What the domain's state file says about the helper of `generation`:
/// its record is the current one; another generation's (superseded); none,
/// because `stopped end` / `release end` cleared it, or no state file at
/// all (stopped). A state file that cannot be read says nothing: carry on
/// (the helper's own deadlines still bound it).
pub fn standing_in(
    state: Result<Option<super::state::DomainState>, LibvirtError>,
    generation: u64,
) -> Standing {
    match state {
        Ok(Some(s)) => match s.resync {
            Some(r) if r.generation == generation => Standing::Current,
            Some(_) => Standing::Superseded,
            None => Standing::Stopped(format!(
                "the domain stopped before it ran (libvirt's stopped end or release end; \
                 last hook call: {})",
                s.last_event.as_deref().unwrap_or("unknown")
            )),
        },
        Ok(None) => Standing::Stopped("the domain's hook state is gone".to_owned()),
        Err(_) => Standing::Current,
    }
}

/// The helper's entry (see [`super::resync_main`]).
pub(crate) fn helper(args: &[OsString]) -> Result<i32, LibvirtError> {
    let req = ResyncRequest::from_args(args)?;
    let state = super::state::StateDir::open(&req.state_dir)?;
    let cfg = match Config::load(&req.config_path) {
        Ok(c) => c,
        Err(e) => {
            state.log(&format!("resync {}: {e}", req.uuid));
            return Err(e);
        }
    };
    state.log(&format!(
        "resync {} {}: helper started (trigger {}, generation {})",
        req.uuid,
        req.name,
        req.trigger.as_str(),
        req.generation
    ));
    let mut guest = VirshGuest {
        virsh: cfg.virsh.clone(),
        uri: cfg.uri.clone(),
        uuid: req.uuid.clone(),
        timeout: Duration::from_secs(u64::from(cfg.command_timeout_s)),
    };
    let mut standing = || standing_in(state.load(&req.uuid), req.generation);
    let (outcome, report) = run_resync(&req, &cfg, &mut guest, &SystemClock, &mut standing);
    if outcome == Outcome::Superseded {
        state.log(&format!(
            "resync {}: superseded by a newer helper; no report",
            req.uuid
        ));
        return Ok(0);
    }
    match super::report::write_report(&cfg.report_dir, &report, super::now_ns()) {
        Ok(path) => state.log(&format!(
            "resync {}: {} (before {:?} s, after {:?} s); report {}",
            req.uuid,
            outcome.as_str(),
            report.offset_before.as_ref().map(|o| o.offset_s),
            report.offset_after.as_ref().map(|o| o.offset_s),
            path.display()
        )),
        Err(e) => {
            state.log(&format!("resync {}: writing the report: {e}", req.uuid));
            return Err(e);
        }
    }
    Ok(if outcome == Outcome::Synced { 0 } else { 1 })
}
