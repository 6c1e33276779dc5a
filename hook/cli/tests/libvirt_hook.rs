//! libvirt hook behaviour: the hook sequence and its state, the resync
//! helper against a simulated guest agent, reports, install/uninstall and
//! the detached launch.

use std::cell::Cell;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clockcarry_libvirt::config::{Config, SetMethod};
use clockcarry_libvirt::report::{write_report, ResyncReport, NOT_PRESERVED};
use clockcarry_libvirt::resync::{
    estimate, parse_domtime, run_resync, standing_in, Clock, Guest, Outcome, Reading, Standing,
};
use clockcarry_libvirt::spawn::spawn_detached;
use clockcarry_libvirt::state::{classify, QemuCmdline, StateDir};
use clockcarry_libvirt::{
    hook_main, install, uninstall, DomainName, DomainState, DomainUuid, HookEnv, InstallMode,
    InstallOptions, Launcher, ResyncRequest, Trigger,
};

const WEB_UUID: &str = "1c97934c-11eb-4ae7-ae15-dbedb0b05918";
const S: u64 = 1_000_000_000;

fn data(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../libvirt/tests/data/libvirt")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tempdir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "clockcarry-libvirt-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A hook environment in a temp dir, recording helper launches.
struct Fixture {
    root: PathBuf,
    env: HookEnv,
    launched: Arc<Mutex<Vec<ResyncRequest>>>,
}

impl Fixture {
    fn new(config: &str) -> Fixture {
        let root = tempdir("hook");
        let launched = Arc::new(Mutex::new(Vec::new()));
        std::fs::create_dir_all(root.join("qemu")).unwrap();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("libvirt.conf"),
            format!(
                "qemu_run_dir = {}\nreport_dir = {}\n{config}",
                root.join("qemu").display(),
                root.join("reports").display()
            ),
        )
        .unwrap();
        let env = HookEnv {
            config_path: root.join("libvirt.conf"),
            state_dir: root.join("run/clockcarry/libvirt"),
            proc_root: root.join("proc"),
            launcher: Launcher::Record(launched.clone()),
        };
        Fixture {
            root,
            env,
            launched,
        }
    }

    fn call(&self, name: &str, op: &str, sub: &str, xml: &str) -> i32 {
        let argv: Vec<OsString> = [name, op, sub, "-"].iter().map(OsString::from).collect();
        hook_main(&argv, &mut xml.as_bytes(), &self.env)
    }

    /// Simulates libvirt's QEMU process for `name`: a pid file and a
    /// /proc/PID/cmdline.
    fn qemu(&self, name: &str, pid: u32, args: &[&str]) {
        std::fs::write(
            self.root.join("qemu").join(format!("{name}.pid")),
            format!("{pid}\n"),
        )
        .unwrap();
        let dir = self.root.join("proc").join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let mut raw = Vec::new();
        for a in args {
            raw.extend_from_slice(a.as_bytes());
            raw.push(0);
        }
        std::fs::write(dir.join("cmdline"), raw).unwrap();
    }

    fn launched(&self) -> Vec<ResyncRequest> {
        self.launched.lock().unwrap().clone()
    }

    fn state(&self) -> Option<DomainState> {
        StateDir::open(&self.env.state_dir)
            .unwrap()
            .load(&DomainUuid::parse(WEB_UUID).unwrap())
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn web(op: &str) -> String {
    data(&format!("libvirt9-web-01.prod-{op}.xml"))
}

fn qemu_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![
        "/usr/bin/qemu-system-x86_64",
        "-name",
        "guest=web-01.prod",
        "-uuid",
        WEB_UUID,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn managedsave_then_start_launches_a_restore_resync() {
    let f = Fixture::new("");
    // Running domain saved: stopped end, release end.
    assert_eq!(
        f.call("web-01.prod", "stopped", "end", &web("stopped-end")),
        0
    );
    assert_eq!(
        f.call("web-01.prod", "release", "end", &web("release-end")),
        0
    );
    let st = f.state().unwrap();
    assert!(st.last_stop_ns.is_some());
    assert!(f.launched().is_empty());
    std::thread::sleep(Duration::from_millis(20));
    // virsh start with a managed save image.
    assert_eq!(
        f.call("web-01.prod", "restore", "begin", &web("restore-begin")),
        0
    );
    assert_eq!(
        f.state().unwrap().pending.unwrap().kind,
        clockcarry_libvirt::state::PendingKind::Restore
    );
    assert_eq!(
        f.call("web-01.prod", "prepare", "begin", &web("prepare-begin")),
        0
    );
    assert_eq!(
        f.call("web-01.prod", "start", "begin", &web("prepare-begin")),
        0
    );
    f.qemu(
        "web-01.prod",
        4242,
        &qemu_args(&["-incoming", "defer", "-S"]),
    );
    assert!(f.launched().is_empty());
    assert_eq!(
        f.call("web-01.prod", "started", "begin", &web("started-begin")),
        0
    );
    let l = f.launched();
    assert_eq!(l.len(), 1);
    let r = &l[0];
    assert_eq!(r.trigger, Trigger::Restore);
    assert_eq!(r.uuid.as_str(), WEB_UUID);
    assert_eq!(r.name.as_str(), "web-01.prod");
    assert!(r.blackout_lower_bound_ns.unwrap() >= 20_000_000);
    assert!(r.config_path.is_absolute() && r.state_dir.is_absolute());
    let st = f.state().unwrap();
    assert_eq!(st.pending, None);
    assert_eq!(st.resync.as_ref().unwrap().generation, r.generation);
    // The request survives the trip through the helper's argv.
    assert_eq!(&ResyncRequest::from_args(&r.to_args()).unwrap(), r);
    // Permissions: dir 0700, files 0600.
    let dir = std::fs::metadata(&f.env.state_dir).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o700);
    for e in std::fs::read_dir(&f.env.state_dir).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            e.metadata().unwrap().mode() & 0o777,
            0o600,
            "{:?}",
            e.file_name()
        );
    }
    let log = std::fs::read_to_string(f.env.state_dir.join("hook.log")).unwrap();
    assert!(
        log.contains("restore begin seen; QEMU has -incoming; restore: resync recorded"),
        "{log}"
    );
    // The helper reads this before every poll: it is current...
    let uuid = DomainUuid::parse(WEB_UUID).unwrap();
    let load = || StateDir::open(&f.env.state_dir).unwrap().load(&uuid);
    assert_eq!(standing_in(load(), r.generation), Standing::Current);
    assert_eq!(standing_in(load(), r.generation + 1), Standing::Superseded);
    // ...until the domain stops.
    assert_eq!(
        f.call("web-01.prod", "stopped", "end", &web("stopped-end")),
        0
    );
    assert_eq!(f.state().unwrap().resync, None);
    assert!(matches!(
        standing_in(load(), r.generation),
        Standing::Stopped(why) if why.contains("stopped end -")
    ));
    assert!(std::fs::read_to_string(f.env.state_dir.join("hook.log"))
        .unwrap()
        .contains(&format!(
            "resync helper (generation {}) told to stop",
            r.generation
        )));
    assert!(matches!(standing_in(Ok(None), 1), Standing::Stopped(_)));
}

#[test]
fn plain_start_launches_nothing() {
    let f = Fixture::new("");
    f.call("web-01.prod", "prepare", "begin", &web("prepare-begin"));
    f.call("web-01.prod", "start", "begin", &web("prepare-begin"));
    f.qemu("web-01.prod", 4243, &qemu_args(&["-S"]));
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    assert!(f.launched().is_empty());
    // Also when QEMU's command line cannot be read.
    let g = Fixture::new("");
    g.call("web-01.prod", "started", "begin", &web("started-begin"));
    assert!(g.launched().is_empty());
    // Reconnect and attach never launch.
    g.call("web-01.prod", "reconnect", "begin", &web("started-begin"));
    g.call("web-01.prod", "attach", "begin", &web("started-begin"));
    assert!(g.launched().is_empty());
}

#[test]
fn incoming_migration_and_snapshot_revert() {
    let f = Fixture::new("");
    f.call("web-01.prod", "stopped", "end", &web("stopped-end"));
    f.call("web-01.prod", "migrate", "begin", &web("restore-begin"));
    f.call("web-01.prod", "prepare", "begin", &web("prepare-begin"));
    f.qemu("web-01.prod", 5000, &qemu_args(&["-incoming", "defer"]));
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    let l = f.launched();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].trigger, Trigger::IncomingMigration);
    // The source's stop is elsewhere: no blackout from this host's clock.
    assert_eq!(l[0].blackout_lower_bound_ns, None);

    // Snapshot revert that started a new QEMU: only -loadvm tells.
    f.call("web-01.prod", "stopped", "end", &web("stopped-end"));
    f.call("web-01.prod", "prepare", "begin", &web("prepare-begin"));
    f.qemu("web-01.prod", 5001, &qemu_args(&["-loadvm", "snap1", "-S"]));
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    let l = f.launched();
    assert_eq!(l.len(), 2);
    assert_eq!(l[1].trigger, Trigger::SnapshotRevert);

    // -incoming without a marker (hook installed mid-flow).
    f.qemu("web-01.prod", 5002, &qemu_args(&["-incoming", "defer"]));
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    assert_eq!(f.launched()[2].trigger, Trigger::Incoming);
}

#[test]
fn stale_markers_and_foreign_pidfiles_are_not_believed() {
    let f = Fixture::new("");
    // A restore that failed before QEMU ran leaves its marker behind ...
    f.call("web-01.prod", "restore", "begin", &web("restore-begin"));
    // ... and a later cold boot must not count as a restore.
    f.qemu("web-01.prod", 6000, &qemu_args(&["-S"]));
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    assert!(f.launched().is_empty());
    assert_eq!(f.state().unwrap().pending, None);

    // A pid file pointing at another domain's QEMU: its -loadvm is ignored.
    f.qemu(
        "web-01.prod",
        6001,
        &[
            "/usr/bin/qemu-system-x86_64",
            "-uuid",
            "00000000-0000-4000-8000-000000000000",
            "-loadvm",
            "s",
        ],
    );
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    assert!(f.launched().is_empty());
}

#[test]
fn classification_table() {
    let uuid = DomainUuid::parse(WEB_UUID).unwrap();
    let name = DomainName::parse(std::ffi::OsStr::new("web-01.prod")).unwrap();
    let now = 1_000_000 * S;
    let mut st = DomainState::new(&uuid, &name);
    let cmd = |inc: bool, load: bool| QemuCmdline {
        incoming: inc,
        loadvm: load,
        uuid: Some(WEB_UUID.into()),
    };
    assert_eq!(classify(&st, None, &uuid, now).trigger, None);
    assert_eq!(
        classify(&st, Some(&cmd(false, false)), &uuid, now).trigger,
        None
    );
    assert_eq!(
        classify(&st, Some(&cmd(true, false)), &uuid, now).trigger,
        Some(Trigger::Incoming)
    );
    assert_eq!(
        classify(&st, Some(&cmd(true, true)), &uuid, now).trigger,
        Some(Trigger::SnapshotRevert)
    );
    st.pending = Some(clockcarry_libvirt::state::Pending {
        kind: clockcarry_libvirt::state::PendingKind::Restore,
        at_ns: now - 10 * S,
    });
    st.last_stop_ns = Some(now - 30 * S);
    let c = classify(&st, Some(&cmd(true, false)), &uuid, now);
    assert_eq!(c.trigger, Some(Trigger::Restore));
    assert_eq!(c.blackout_lower_bound_ns, Some(30 * S));
    assert_eq!(
        classify(&st, None, &uuid, now).trigger,
        Some(Trigger::Restore)
    );
    assert_eq!(
        classify(&st, Some(&cmd(false, false)), &uuid, now).trigger,
        None
    );
    // A marker from the future or older than 6 h is stale.
    st.pending.as_mut().unwrap().at_ns = now + S;
    assert_eq!(classify(&st, None, &uuid, now).trigger, None);
    st.pending.as_mut().unwrap().at_ns = now - 7 * 3600 * S;
    assert_eq!(classify(&st, None, &uuid, now).trigger, None);
    // A last stop in the future gives no blackout.
    st.pending.as_mut().unwrap().at_ns = now;
    st.last_stop_ns = Some(now + S);
    assert_eq!(
        classify(&st, None, &uuid, now).blackout_lower_bound_ns,
        None
    );
    // Command line parsing.
    let raw = b"qemu\0-uuid\0ABCDEF00-0000-4000-8000-000000000000\0-incoming\0defer\0-loadvm\0x\0";
    let c = QemuCmdline::parse(raw);
    assert!(c.incoming && c.loadvm);
    assert_eq!(
        c.uuid.as_deref(),
        Some("abcdef00-0000-4000-8000-000000000000")
    );
    assert_eq!(QemuCmdline::parse(b""), QemuCmdline::default());
    assert_eq!(QemuCmdline::parse(b"-uuid").uuid, None);
}

#[test]
fn policy_sources() {
    let no_meta = {
        let xml = web("started-begin");
        let start = xml.find("  <metadata>").unwrap();
        let end = xml.find("</metadata>\n").unwrap() + "</metadata>\n".len();
        format!("{}{}", &xml[..start], &xml[end..])
    };
    let meta_off = web("started-begin").replace(r#"policy="resync""#, r#"policy="off""#);
    let incoming = qemu_args(&["-incoming", "defer"]);

    // No metadata, host default off: nothing, and no state written.
    let f = Fixture::new("");
    f.qemu("web-01.prod", 7000, &incoming);
    f.call("web-01.prod", "restore", "begin", &no_meta);
    f.call("web-01.prod", "started", "begin", &no_meta);
    assert!(f.launched().is_empty());
    assert!(!f.env.state_dir.join(format!("{WEB_UUID}.json")).exists());

    // No metadata, host default resync: acts.
    let f = Fixture::new("policy = resync\n");
    f.qemu("web-01.prod", 7001, &incoming);
    f.call("web-01.prod", "restore", "begin", &no_meta);
    f.call("web-01.prod", "started", "begin", &no_meta);
    assert_eq!(f.launched().len(), 1);

    // Metadata off beats host default resync.
    let f = Fixture::new("policy = resync\n");
    f.qemu("web-01.prod", 7002, &incoming);
    f.call("web-01.prod", "restore", "begin", &meta_off);
    f.call("web-01.prod", "started", "begin", &meta_off);
    assert!(f.launched().is_empty());

    // A broken host config: nothing happens, the hook still exits 0.
    let f = Fixture::new("policy = sometimes\n");
    f.qemu("web-01.prod", 7003, &incoming);
    assert_eq!(
        f.call("web-01.prod", "restore", "begin", &web("restore-begin")),
        0
    );
    assert_eq!(
        f.call("web-01.prod", "started", "begin", &web("started-begin")),
        0
    );
    assert!(f.launched().is_empty());
    let log = std::fs::read_to_string(f.env.state_dir.join("hook.log")).unwrap();
    assert!(log.contains("libvirt.conf:3: policy"), "{log}");
}

#[test]
fn hostile_input_leaves_no_trace_and_never_fails_the_domain() {
    let f = Fixture::new("policy = resync\n");
    let xml = web("started-begin");
    // Argument name differs from the XML's.
    assert_eq!(f.call("other", "started", "begin", &xml), 0);
    // Names libvirt would refuse.
    assert_eq!(f.call("../../../etc/x", "started", "begin", &xml), 0);
    assert_eq!(f.call("", "started", "begin", &xml), 0);
    // Hostile XML.
    for h in [
        "hostile-billion-laughs.xml",
        "hostile-external-entity.xml",
        "hostile-name-traversal.xml",
        "hostile-uuid-traversal.xml",
    ] {
        assert_eq!(f.call("laughs", "restore", "begin", &data(h)), 0, "{h}");
        assert_eq!(f.call("uuid-evil", "started", "begin", &data(h)), 0, "{h}");
    }
    // Oversized XML on stdin.
    let big = format!("{xml}{}", " ".repeat(1 << 20));
    assert_eq!(f.call("web-01.prod", "started", "begin", &big), 0);
    // Wrong argument count: usage error (libvirt never does this).
    let argv: Vec<OsString> = ["web-01.prod", "started"]
        .iter()
        .map(OsString::from)
        .collect();
    assert_eq!(hook_main(&argv, &mut xml.as_bytes(), &f.env), 2);
    // Unknown operations from a future libvirt: ignored, 0.
    assert_eq!(f.call("web-01.prod", "hibernate", "begin", &xml), 0);
    assert!(f.launched().is_empty());
    // Only the log was written; nothing outside the state dir.
    let names: Vec<String> = std::fs::read_dir(&f.env.state_dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(names.iter().all(|n| n == "hook.log"), "{names:?}");
    assert!(!Path::new("/tmp/clockcarry-pwn").exists());
    let mut top: Vec<String> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["libvirt.conf", "proc", "qemu", "run"]);
}

#[test]
fn corrupt_state_starts_afresh() {
    let f = Fixture::new("");
    std::fs::create_dir_all(&f.env.state_dir).unwrap();
    let p = f.env.state_dir.join(format!("{WEB_UUID}.json"));
    std::fs::write(&p, b"{ not json").unwrap();
    f.qemu("web-01.prod", 8000, &qemu_args(&["-incoming", "defer"]));
    f.call("web-01.prod", "restore", "begin", &web("restore-begin"));
    f.call("web-01.prod", "started", "begin", &web("started-begin"));
    assert_eq!(f.launched().len(), 1);
    assert!(f.state().is_some());
    // A state dir with group/other bits is tightened.
    std::fs::set_permissions(&f.env.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    f.call("web-01.prod", "stopped", "end", &web("stopped-end"));
    assert_eq!(
        std::fs::metadata(&f.env.state_dir).unwrap().mode() & 0o777,
        0o700
    );
}

// ------------------------------------------------------- the resync helper

/// Host clock for the simulation: advances only when told.
struct SimClock {
    now: Cell<u64>,
}

impl Clock for SimClock {
    fn now_ns(&self) -> u64 {
        self.now.get()
    }
    fn sleep_ns(&self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }
}

impl SimClock {
    fn advance(&self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }
}

/// A guest whose wall clock is `offset` off the host's, with an agent that
/// answers from `agent_at` on, a domain running from `running_at` on, and
/// virsh calls costing `cost` ns each (the agent acts half way).
struct SimGuest<'a> {
    clock: &'a SimClock,
    offset: i128,
    running_at: u64,
    agent_at: u64,
    gone_at: Option<u64>,
    set_fails: u32,
    cost: u64,
    calls: Vec<String>,
}

impl SimGuest<'_> {
    fn guest_ns(&self) -> i128 {
        i128::from(self.clock.now_ns()) + self.offset
    }
}

impl Guest for SimGuest<'_> {
    fn domstate(&mut self) -> Result<String, String> {
        self.calls.push("domstate".into());
        self.clock.advance(self.cost);
        if self.gone_at.is_some_and(|g| self.clock.now_ns() >= g) {
            return Err("error: failed to get domain 'x'".into());
        }
        Ok(if self.clock.now_ns() >= self.running_at {
            "running"
        } else {
            "paused"
        }
        .into())
    }
    fn get_time(&mut self) -> Result<i64, String> {
        self.calls.push("get".into());
        self.clock.advance(self.cost / 2);
        let r = if self.clock.now_ns() >= self.agent_at {
            Ok(i64::try_from(self.guest_ns().div_euclid(1_000_000_000)).unwrap())
        } else {
            Err("error: Guest agent is not responding: QEMU guest agent is not connected".into())
        };
        self.clock.advance(self.cost - self.cost / 2);
        r
    }
    fn set_time(&mut self, method: SetMethod, at_second: i64) -> Result<(), String> {
        self.calls
            .push(format!("set {} {at_second}", method.as_str()));
        self.clock.advance(self.cost / 2);
        if self.set_fails > 0 {
            self.set_fails -= 1;
            self.clock.advance(self.cost - self.cost / 2);
            return Err("error: internal error: unable to execute QEMU agent command".into());
        }
        let host = i128::from(self.clock.now_ns());
        let target = match method {
            SetMethod::Aligned => i128::from(at_second) * 1_000_000_000,
            // virsh --now sends time(NULL): whole seconds.
            SetMethod::Now => host.div_euclid(1_000_000_000) * 1_000_000_000,
            SetMethod::Sync => host.div_euclid(1_000_000_000) * 1_000_000_000,
        };
        self.offset = target - host;
        self.clock.advance(self.cost - self.cost / 2);
        Ok(())
    }
    fn set_argv(&self, method: SetMethod, at_second: i64) -> Vec<String> {
        vec![
            "virsh".into(),
            "domtime".into(),
            method.as_str().into(),
            at_second.to_string(),
        ]
    }
}

fn request(trigger: Trigger, started: u64) -> ResyncRequest {
    ResyncRequest {
        uuid: DomainUuid::parse(WEB_UUID).unwrap(),
        name: DomainName::parse(std::ffi::OsStr::new("web-01.prod")).unwrap(),
        trigger,
        started_at_ns: started,
        blackout_lower_bound_ns: Some(18_795_809_000),
        generation: started,
        config_path: "/etc/clockcarry/libvirt.conf".into(),
        state_dir: "/run/clockcarry/libvirt".into(),
    }
}

fn sim<'a>(clock: &'a SimClock, offset_s: f64) -> SimGuest<'a> {
    let t = clock.now_ns();
    SimGuest {
        clock,
        offset: (offset_s * 1e9) as i128,
        running_at: t + 700_000_000,
        agent_at: t + 2_300_000_000,
        gone_at: None,
        set_fails: 0,
        cost: 40_000_000,
        calls: Vec::new(),
    }
}

#[test]
fn resync_after_restore_aligned() {
    let clock = SimClock {
        now: Cell::new(1_795_754_645_054_107_657),
    };
    let req = request(Trigger::Restore, clock.now_ns());
    let mut guest = sim(&clock, -21.18);
    let cfg = Config::default();
    let (outcome, rep) = run_resync(&req, &cfg, &mut guest, &clock, &mut || Standing::Current);
    assert_eq!(outcome, Outcome::Synced);
    assert_eq!(rep.outcome, "synced");
    assert_eq!(rep.trigger, "restore");
    assert_eq!(rep.note, NOT_PRESERVED);
    let before = rep.offset_before.as_ref().unwrap();
    assert!(
        (before.offset_s + 21.18).abs() <= before.uncertainty_s + 1e-6,
        "{before:?}"
    );
    let after = rep.offset_after.as_ref().unwrap();
    // The simulated set lands cost/2 after launch; aligned on the read's
    // full round trip (cost) the guest ends cost/2 = 20 ms ahead, which
    // the verification interval must contain.
    assert!(
        (after.offset_s - 0.02).abs() <= after.uncertainty_s + 1e-6,
        "{after:?}"
    );
    assert!(after.uncertainty_s <= 0.1, "{after:?}");
    assert!((rep.correction_s.unwrap() - 21.18).abs() < 0.6, "{rep:?}");
    assert_eq!(rep.agent_latency_ms, Some(40.0));
    assert!(rep.wait_running_s.unwrap() >= 0.7);
    // Agent unreachable until 2.3 s: failed reads retried each second.
    assert!(rep.errors.iter().any(|e| e.contains("not connected")));
    assert!(rep.attempts >= 3);
    assert!(guest.calls.iter().any(|c| c.starts_with("set aligned ")));
    assert_eq!(rep.set_command.as_ref().unwrap()[2], "aligned");
}

#[test]
fn resync_now_method_lands_within_a_second_behind() {
    let clock = SimClock {
        now: Cell::new(1_795_754_645_554_107_657),
    };
    let req = request(Trigger::IncomingMigration, clock.now_ns());
    let mut guest = sim(&clock, -40.0);
    let cfg = Config {
        set_method: SetMethod::Now,
        ..Config::default()
    };
    let (outcome, rep) = run_resync(&req, &cfg, &mut guest, &clock, &mut || Standing::Current);
    assert_eq!(outcome, Outcome::Synced);
    let after = rep.offset_after.unwrap();
    assert!(after.offset_s <= 0.0 && after.offset_s > -1.0, "{after:?}");
}

#[test]
fn resync_gives_up_within_bounds() {
    // Agent never answers: timeout after agent_timeout_s.
    let clock = SimClock {
        now: Cell::new(1_000 * S),
    };
    let req = request(Trigger::Restore, clock.now_ns());
    let mut guest = sim(&clock, -5.0);
    guest.agent_at = u64::MAX;
    let cfg = Config {
        agent_timeout_s: 10,
        ..Config::default()
    };
    let (outcome, rep) = run_resync(&req, &cfg, &mut guest, &clock, &mut || Standing::Current);
    assert_eq!(outcome, Outcome::Timeout);
    assert!(rep.offset_before.is_none() && rep.offset_after.is_none());
    let elapsed = clock.now_ns() - 1_000 * S;
    assert!((10 * S..13 * S).contains(&elapsed), "{elapsed}");
    assert!((9..=12).contains(&rep.attempts), "{}", rep.attempts);
    assert!(rep.errors.len() <= 8);

    // Domain never runs: timeout after run_wait_s.
    let clock = SimClock {
        now: Cell::new(1_000 * S),
    };
    let mut guest = sim(&clock, -5.0);
    guest.running_at = u64::MAX;
    let cfg = Config {
        run_wait_s: 30,
        ..Config::default()
    };
    let (outcome, _) = run_resync(&req, &cfg, &mut guest, &clock, &mut || Standing::Current);
    assert_eq!(outcome, Outcome::Timeout);
    assert!(clock.now_ns() - 1_000 * S < 32 * S);

    // Domain disappears (failed incoming migration).
    let clock = SimClock {
        now: Cell::new(1_000 * S),
    };
    let mut guest = sim(&clock, -5.0);
    guest.running_at = u64::MAX;
    guest.gone_at = Some(1_003 * S);
    let (outcome, rep) = run_resync(&req, &Config::default(), &mut guest, &clock, &mut || {
        Standing::Current
    });
    assert_eq!(outcome, Outcome::DomainGone);
    assert_eq!(rep.outcome, "domain-gone");

    // Superseded by a newer helper.
    let clock = SimClock {
        now: Cell::new(1_000 * S),
    };
    let mut guest = sim(&clock, -5.0);
    let mut n = 0;
    let (outcome, _) = run_resync(&req, &Config::default(), &mut guest, &clock, &mut || {
        n += 1;
        if n < 3 {
            Standing::Current
        } else {
            Standing::Superseded
        }
    });
    assert_eq!(outcome, Outcome::Superseded);

    // The domain stops while the helper waits for it to run (virsh cannot
    // tell: here it never answers at all): the helper ends at its next
    // poll, long before run_wait_s.
    let clock = SimClock {
        now: Cell::new(1_000 * S),
    };
    let mut guest = sim(&clock, -5.0);
    guest.running_at = u64::MAX;
    let mut n = 0;
    let (outcome, rep) = run_resync(&req, &Config::default(), &mut guest, &clock, &mut || {
        n += 1;
        if n < 4 {
            Standing::Current
        } else {
            Standing::Stopped("the domain stopped".into())
        }
    });
    assert_eq!(outcome, Outcome::DomainGone);
    assert_eq!(rep.outcome, "domain-gone");
    assert_eq!(
        rep.errors.last().map(String::as_str),
        Some("the domain stopped")
    );
    assert!(clock.now_ns() - 1_000 * S < 4 * S);

    // Sets that fail twice, then work.
    let clock = SimClock {
        now: Cell::new(1_000 * S),
    };
    let mut guest = sim(&clock, -5.0);
    guest.set_fails = 2;
    let (outcome, rep) = run_resync(&req, &Config::default(), &mut guest, &clock, &mut || {
        Standing::Current
    });
    assert_eq!(outcome, Outcome::Synced);
    assert_eq!(
        rep.errors.iter().filter(|e| e.starts_with("set:")).count(),
        1,
        "{:?}",
        rep.errors
    );
    let after = rep.offset_after.unwrap();
    assert!(
        (after.offset_s - 0.02).abs() <= after.uncertainty_s + 1e-6,
        "{after:?}"
    );
}

#[test]
fn offset_intervals() {
    // Guest said 100 between host 99.2 and 99.3: offset in [0.7, 1.8].
    let r = Reading {
        before_ns: 99_200_000_000,
        guest_s: 100,
        after_ns: 99_300_000_000,
    };
    assert_eq!(r.interval(), (700_000_000, 1_800_000_000));
    // The next second seen between 99.5 and 99.6 allows [1.4, 2.5]: the
    // boundary fell between the two readings, which pins [1.4, 1.8].
    let r2 = Reading {
        before_ns: 99_500_000_000,
        guest_s: 101,
        after_ns: 99_600_000_000,
    };
    assert_eq!(estimate(&[r, r2]), Some((1_400_000_000, 1_800_000_000)));
    // Inconsistent (the clock stepped): the last reading alone.
    let r3 = Reading {
        before_ns: 99_700_000_000,
        guest_s: 50,
        after_ns: 99_800_000_000,
    };
    assert_eq!(estimate(&[r, r3]), Some(r3.interval()));
    assert_eq!(estimate(&[]), None);
    // A guest clock running 5 % slow: the intervals of readings a second
    // apart contradict each other, the boundary pair still pins it.
    let slow: Vec<Reading> = (0..30u64)
        .map(|i| {
            let host = 200_000_000_000 + i * 50_000_000;
            let guest = 500_000_000_000 + (i * 50_000_000) * 95 / 100 + 960_000_000;
            Reading {
                before_ns: host,
                guest_s: i64::try_from(guest / 1_000_000_000).unwrap(),
                after_ns: host + 30_000_000,
            }
        })
        .collect();
    let (lo, hi) = estimate(&slow).unwrap();
    assert!(hi - lo <= 80_000_000, "{lo} {hi}");
    // The last boundary (guest 502 s) fell at host 201.0947 s: the offset
    // was then 300.9053 s (it shrinks as the slow guest falls behind).
    assert!(lo <= 300_905_300_000 && hi >= 300_905_300_000, "{lo} {hi}");
    assert_eq!(parse_domtime("Time: 1795754624\n"), Some(1_795_754_624));
    assert_eq!(parse_domtime("Time:1"), Some(1));
    for bad in [
        "",
        "Time:",
        "Time: -5",
        "Zeit: 1",
        "Time: 12x",
        "Time: 99999999999999999999",
    ] {
        assert_eq!(parse_domtime(bad), None, "{bad}");
    }
}

#[test]
fn request_args_refused_when_malformed() {
    let good = request(Trigger::Restore, 5 * S).to_args();
    assert!(ResyncRequest::from_args(&good).is_ok());
    let mut cases: Vec<Vec<OsString>> = Vec::new();
    cases.push(good[..good.len() - 1].to_vec());
    let mut dup = good.clone();
    dup.extend(good[..2].iter().cloned());
    cases.push(dup);
    for (i, v) in [
        (1, "not-a-uuid"),
        (3, "a/b"),
        (5, "reboot"),
        (7, "12x"),
        (11, "relative"),
    ] {
        let mut c = good.clone();
        c[i] = v.into();
        cases.push(c);
    }
    let mut unknown = good.clone();
    unknown.push("--shell".into());
    unknown.push("x".into());
    cases.push(unknown);
    for c in cases {
        assert!(ResyncRequest::from_args(&c).is_err(), "{c:?}");
    }
    assert_eq!(clockcarry_libvirt::resync_main(&["--bogus".into()]), 2);
}

#[test]
fn reports_are_never_overwritten() {
    let dir = tempdir("reports").join("reports");
    let clock = SimClock {
        now: Cell::new(1_795_754_645 * S),
    };
    let req = request(Trigger::Restore, clock.now_ns());
    let mut guest = sim(&clock, -3.0);
    let (_, rep): (Outcome, ResyncReport) =
        run_resync(&req, &Config::default(), &mut guest, &clock, &mut || {
            Standing::Current
        });
    let at = 1_795_754_655 * S;
    let p1 = write_report(&dir, &rep, at).unwrap();
    let p2 = write_report(&dir, &rep, at).unwrap();
    assert_eq!(
        p1.file_name().unwrap(),
        format!("{WEB_UUID}-20261127T044415Z.json").as_str()
    );
    assert_eq!(
        p2.file_name().unwrap(),
        format!("{WEB_UUID}-20261127T044415Z-2.json").as_str()
    );
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    for p in [&p1, &p2] {
        assert_eq!(std::fs::metadata(p).unwrap().mode() & 0o777, 0o600);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        assert_eq!(v["note"], NOT_PRESERVED);
        assert_eq!(v["uuid"], WEB_UUID);
        assert_eq!(v["domain"], "web-01.prod");
        assert_eq!(v["outcome"], "synced");
        assert!(v["correction_s"].as_f64().unwrap() > 2.0);
        assert!(v["agent_latency_ms"].as_f64().is_some());
        assert!(v["blackout"]["lower_bound_s"].as_f64().is_some());
    }
    // Only the two reports remain (no temp files).
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

// -------------------------------------------------------- install, spawn

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[test]
fn install_and_uninstall() {
    let root = tempdir("install");
    let hooks = root.join("hooks/qemu.d");
    // The test binary links the libvirt module, so it carries the marker
    // an installed clockcarry is recognised by.
    let me = std::env::current_exe().unwrap();
    let owner = if euid() == 0 { Some((0, 0)) } else { None };
    let opts = InstallOptions {
        hooks_dir: hooks.clone(),
        source: Some(me.clone()),
        mode: InstallMode::Copy,
        owner,
        config_path: root.join("absent.conf"),
        force: false,
    };
    let out = install(&opts).unwrap();
    let hook = hooks.join("clockcarry");
    assert_eq!(out.path, hook);
    let meta = std::fs::symlink_metadata(&hook).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o755);
    if euid() == 0 {
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
    }
    assert_eq!(meta.len(), std::fs::metadata(&me).unwrap().len());
    assert!(out.messages.iter().any(|m| m.contains("reload libvirtd")));
    assert!(out
        .messages
        .iter()
        .any(|m| m.contains("absent, defaults used")));
    // Reinstall replaces our own hook.
    install(&opts).unwrap();
    // Symlink mode.
    let link = InstallOptions {
        mode: InstallMode::Symlink,
        owner: None,
        ..opts.clone()
    };
    install(&link).unwrap();
    assert!(std::fs::symlink_metadata(&hook)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_link(&hook).unwrap(),
        std::fs::canonicalize(&me).unwrap()
    );
    uninstall(&opts).unwrap();
    assert!(!hook.exists());
    // Nothing there: fine.
    assert!(uninstall(&opts).unwrap().messages[0].contains("not installed"));
    // A foreign hook with our name is neither replaced nor removed without force.
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    assert!(install(&opts).is_err());
    assert!(uninstall(&opts).is_err());
    assert_eq!(
        std::fs::read_to_string(&hook).unwrap(),
        "#!/bin/sh\nexit 0\n"
    );
    install(&InstallOptions {
        force: true,
        ..opts.clone()
    })
    .unwrap();
    uninstall(&opts).unwrap();
    // What is neither a file nor a symlink is never replaced, even with
    // --force.
    let sock = std::os::unix::net::UnixListener::bind(&hook).unwrap();
    let err = install(&InstallOptions {
        force: true,
        ..opts.clone()
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("{} is a socket", hook.display())),
        "{err}"
    );
    {
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&hook)
            .unwrap()
            .file_type()
            .is_socket());
    }
    drop(sock);
    std::fs::remove_file(&hook).unwrap();
    // An invalid config stops the install.
    std::fs::write(root.join("bad.conf"), "policy = yes\n").unwrap();
    assert!(install(&InstallOptions {
        config_path: root.join("bad.conf"),
        ..opts.clone()
    })
    .is_err());
    assert!(!hook.exists());
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(&hooks).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn detached_helper_does_not_hold_the_hook() {
    let dir = tempdir("spawn");
    let pidfile = dir.join("pid");
    // The "helper" writes its pid, then becomes `sleep` with the
    // descriptors it was started with, and outlives the call by far.
    let script = format!(
        "echo $$ > {0}.tmp; mv {0}.tmp {0}; exec sleep 5",
        pidfile.display()
    );
    let t = Instant::now();
    spawn_detached(Path::new("/bin/sh"), &["-c".into(), script.into()]).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pid = None;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&pidfile) {
            let p: u32 = text.trim().parse().unwrap();
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                pid = Some(p);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = pid.expect("helper did not start");
    // stdin, stdout and stderr on /dev/null and no other descriptor:
    // nothing of the hook's (libvirt's pipes) is left open.
    let mut fds: Vec<(String, PathBuf)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_link(e.path()).unwrap(),
            )
        })
        .collect();
    fds.sort();
    let null = PathBuf::from("/dev/null");
    assert_eq!(
        fds,
        vec![
            ("0".into(), null.clone()),
            ("1".into(), null.clone()),
            ("2".into(), null)
        ]
    );
    // Its own session, not ours; its parent is not us (double fork).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ppid: i32 = fields[1].parse().unwrap();
    let sid: i32 = fields[3].parse().unwrap();
    let my_pid = nix::unistd::getpid().as_raw();
    let my_sid = nix::unistd::getsid(None).expect("getsid").as_raw();
    assert_ne!(sid, my_sid);
    assert_ne!(ppid, my_pid);
    // The helper this test started.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------- the binary itself

/// The `clockcarry` binary, as installed: hook by path, helper by hidden
/// argument, `clockcarry libvirt ...`.
mod binary {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    const BIN: &str = env!("CARGO_BIN_EXE_clockcarry");

    #[test]
    fn installed_hook_prints_nothing_and_exits_0() {
        let root = tempdir("bin");
        let hooks = root.join("hooks/qemu.d");
        let out = Command::new(BIN)
            .args(["libvirt", "install", "--hooks-dir"])
            .arg(&hooks)
            .args(["--config"])
            .arg(root.join("absent.conf"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("reload libvirtd"), "{text}");
        let hook = hooks.join("clockcarry");
        // policy off: the hook leaves no state on this machine.
        let xml = data("libvirt9-web-01.prod-restore-begin.xml")
            .replace(r#"policy="resync""#, r#"policy="off""#);
        for (op, sub) in [
            ("migrate", "begin"),
            ("restore", "begin"),
            ("prepare", "begin"),
            ("started", "begin"),
        ] {
            let mut child = Command::new(&hook)
                .env("CLOCKCARRY_RUN_DIR", root.join("run"))
                .env("CLOCKCARRY_LIBVIRT_CONFIG", root.join("absent.conf"))
                .args(["web-01.prod", op, sub, "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(xml.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(0), "{op} {sub}: {out:?}");
            // libvirt reads stdout of migrate/restore begin as new XML.
            assert!(out.stdout.is_empty(), "{op} {sub}: {out:?}");
        }
        // Not even a state directory (the sandboxed one stands for
        // /run/clockcarry/libvirt).
        assert!(!root.join("run").exists());
        let out = Command::new(BIN)
            .args(["libvirt", "uninstall", "--hooks-dir"])
            .arg(&hooks)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(!hook.exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The helper outlives nothing: once libvirt says the domain stopped
    /// (`stopped end`, `release end`), a helper still waiting for it to run
    /// ends at its next poll, with a report, instead of polling for up to
    /// `run_wait_s` (1 h). virsh is missing here, so only the hook's word
    /// can end the wait.
    #[test]
    fn the_helper_stops_when_the_domain_stops() {
        let f =
            Fixture::new("virsh = /nonexistent/clockcarry-test/virsh\nretry_interval_ms = 100\n");
        assert_eq!(
            f.call("web-01.prod", "restore", "begin", &web("restore-begin")),
            0
        );
        f.qemu("web-01.prod", 4343, &qemu_args(&["-incoming", "defer"]));
        assert_eq!(
            f.call("web-01.prod", "started", "begin", &web("started-begin")),
            0
        );
        let req = f.launched().pop().expect("a helper was asked for");
        let mut child = Command::new(BIN)
            .arg(clockcarry_libvirt::RESYNC_ARG)
            .args(req.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let log = f.env.state_dir.join("hook.log");
        let t = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("helper started")
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "helper never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the helper gave up while the domain was still starting"
        );
        // The domain stops (a failed restore, a destroy).
        assert_eq!(
            f.call("web-01.prod", "stopped", "end", &web("stopped-end")),
            0
        );
        assert_eq!(
            f.call("web-01.prod", "release", "end", &web("release-end")),
            0
        );
        let stopped = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if stopped.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the helper was still polling {:?} after stopped end",
                    stopped.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "{:?}",
            stopped.elapsed()
        );
        assert_eq!(status.code(), Some(1), "not synced");
        let reports: Vec<PathBuf> = std::fs::read_dir(f.root.join("reports"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(reports.len(), 1, "{reports:?}");
        let rep: ResyncReport =
            serde_json::from_str(&std::fs::read_to_string(&reports[0]).unwrap()).unwrap();
        assert_eq!(rep.outcome, "domain-gone");
        assert!(
            rep.errors.iter().any(|e| e.contains("stopped end")),
            "{:?}",
            rep.errors
        );
        assert!(std::fs::read_to_string(&log)
            .unwrap()
            .contains("domain-gone"));
    }

    #[test]
    fn subcommand_and_hidden_helper_argument() {
        let root = tempdir("helper-arg");
        let run = |args: &[&str]| {
            Command::new(BIN)
                .env("CLOCKCARRY_RUN_DIR", root.join("run"))
                .env("CLOCKCARRY_LIBVIRT_CONFIG", root.join("absent.conf"))
                .args(args)
                .output()
                .unwrap()
        };
        let out = run(&["libvirt", "help"]);
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("install"));
        assert_eq!(run(&["libvirt"]).status.code(), Some(2));
        assert_eq!(run(&["libvirt", "frobnicate"]).status.code(), Some(2));
        assert_eq!(
            run(&["libvirt", "hook", "vm", "started"]).status.code(),
            Some(2)
        );
        // The helper's hidden argument is taken before clap sees anything.
        let out = run(&[clockcarry_libvirt::RESYNC_ARG, "--uuid"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("resync helper"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
