//! Where a domain is in libvirt's hook sequence, kept between hook calls in
//! a small state directory (default `/run/clockcarry/libvirt`, mode 0700;
//! one `<uuid>.json` per domain, mode 0600, written atomically). `/run` is
//! a tmpfs: a host reboot forgets everything, which is right, since a
//! domain's last stop before a reboot says nothing about its next start.
//!
//! The sequences (libvirt 9, see docs/libvirt.md):
//!
//! | flow                         | hook calls before the guest runs                       |
//! |------------------------------|--------------------------------------------------------|
//! | plain start                  | prepare, start, started                                |
//! | restore / managedsave start  | restore begin (XML filter), prepare, start, started     |
//! | incoming live migration      | migrate begin (XML filter), prepare, start, started     |
//! | snapshot revert (new QEMU)   | prepare, start, started (QEMU has `-loadvm`)           |
//! | save / managedsave / stop    | stopped end, release end (after QEMU is gone)          |
//!
//! `restore begin` and `migrate begin` leave a *pending* marker; `started
//! begin` consumes it, cross-checked with QEMU's command line (`-incoming`,
//! `-loadvm`, `-uuid`) when that can be read, so a marker left by a failed
//! restore never turns a later cold boot into a "restore".

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::args::{DomainName, DomainUuid};
use super::LibvirtError;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/clockcarry/libvirt";
/// Environment variable naming clockcarry's per-boot directory (the same
/// variable the command's host rate cache follows); the hook's state
/// directory is its `libvirt` subdirectory.
pub const RUN_DIR_ENV: &str = "CLOCKCARRY_RUN_DIR";

/// The hook's state directory: `$CLOCKCARRY_RUN_DIR/libvirt` when the
/// variable is set and not empty, else [`DEFAULT_STATE_DIR`]. (libvirt runs
/// hooks with a minimal environment of its own, so the installed hook
/// always gets the default; the variable is for tests and by-hand runs.)
pub fn state_dir() -> PathBuf {
    match std::env::var_os(RUN_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(run) => PathBuf::from(run).join("libvirt"),
        None => PathBuf::from(DEFAULT_STATE_DIR),
    }
}
/// Largest state file read, in bytes.
pub const MAX_STATE_BYTES: u64 = 64 * 1024;
/// A pending marker older than this is stale (a restore of a very large
/// image reaches `started begin` well within it).
pub const PENDING_MAX_AGE_NS: u64 = 6 * 3600 * 1_000_000_000;
/// Largest QEMU command line read, in bytes.
pub const MAX_CMDLINE_BYTES: u64 = 1 << 20;
/// The hook log is rotated (to `hook.log.1`) past this size.
pub const MAX_LOG_BYTES: u64 = 1 << 20;

/// What `restore begin` / `migrate begin` announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingKind {
    Restore,
    Migrate,
}

/// A pending marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub kind: PendingKind,
    /// CLOCK_REALTIME of the hook call, ns.
    pub at_ns: u64,
}

/// The helper last launched for a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncRecord {
    /// Unique per launch; a helper that finds another generation here has
    /// been superseded and stops.
    pub generation: u64,
    pub trigger: Trigger,
    pub launched_at_ns: u64,
}

/// One domain's state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainState {
    pub version: u32,
    pub uuid: String,
    pub name: String,
    pub pending: Option<Pending>,
    /// CLOCK_REALTIME of the last `stopped end`, ns.
    pub last_stop_ns: Option<u64>,
    /// `EXTRA` of the last `release end` (libvirt >= 10.5.0: the reason).
    pub last_release_reason: Option<String>,
    pub last_event: Option<String>,
    /// The helper launched at the last `started begin`, until the domain
    /// stops: `stopped end` and `release end` clear it, which tells a helper
    /// still running to stop (see `resync::standing_in`).
    pub resync: Option<ResyncRecord>,
}

impl DomainState {
    /// A fresh state for a domain.
    pub fn new(uuid: &DomainUuid, name: &DomainName) -> DomainState {
        DomainState {
            version: 1,
            uuid: uuid.as_str().to_owned(),
            name: name.as_str().to_owned(),
            pending: None,
            last_stop_ns: None,
            last_release_reason: None,
            last_event: None,
            resync: None,
        }
    }
}

/// Why the guest's clock is behind when it runs again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Restore from a save image (`virsh restore`, managedsave start).
    Restore,
    /// Incoming live migration.
    IncomingMigration,
    /// Snapshot revert that started a new QEMU (`-loadvm`).
    SnapshotRevert,
    /// QEMU started with `-incoming`, but no restore/migrate hook call was
    /// seen (e.g. the hook was installed in between).
    Incoming,
}

impl Trigger {
    /// As written in reports and helper arguments.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Restore => "restore",
            Trigger::IncomingMigration => "incoming-migration",
            Trigger::SnapshotRevert => "snapshot-revert",
            Trigger::Incoming => "incoming",
        }
    }

    /// The inverse of [`Trigger::as_str`].
    pub fn parse(text: &str) -> Option<Trigger> {
        match text {
            "restore" => Some(Trigger::Restore),
            "incoming-migration" => Some(Trigger::IncomingMigration),
            "snapshot-revert" => Some(Trigger::SnapshotRevert),
            "incoming" => Some(Trigger::Incoming),
            _ => None,
        }
    }
}

/// What QEMU's command line says, when it could be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuCmdline {
    pub incoming: bool,
    pub loadvm: bool,
    /// The value after `-uuid`, lowercase.
    pub uuid: Option<String>,
}

impl QemuCmdline {
    /// Parses `/proc/PID/cmdline` (NUL-separated arguments).
    pub fn parse(raw: &[u8]) -> QemuCmdline {
        let mut out = QemuCmdline::default();
        let mut args = raw.split(|b| *b == 0);
        while let Some(arg) = args.next() {
            match arg {
                b"-incoming" => out.incoming = true,
                b"-loadvm" => out.loadvm = true,
                b"-uuid" => {
                    out.uuid = args
                        .next()
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(str::to_ascii_lowercase)
                }
                _ => {}
            }
        }
        out
    }
}

/// The classification `started begin` makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    /// `None`: a cold boot (or nothing known): nothing to resync.
    pub trigger: Option<Trigger>,
    /// Lower bound of the blackout, ns: `started begin` minus the last
    /// `stopped end` (restore only; the guest was paused before that stop
    /// and resumes after this call, so the real blackout is longer).
    pub blackout_lower_bound_ns: Option<u64>,
    /// How the decision was made, for the log.
    pub basis: String,
}

/// Decides at `started begin` whether the guest comes back from a blackout.
pub fn classify(
    state: &DomainState,
    cmdline: Option<&QemuCmdline>,
    uuid: &DomainUuid,
    now_ns: u64,
) -> Classification {
    let pending = state
        .pending
        .as_ref()
        .filter(|p| p.at_ns <= now_ns && now_ns - p.at_ns <= PENDING_MAX_AGE_NS)
        .map(|p| p.kind);
    let cmdline = cmdline.filter(|c| c.uuid.as_deref() == Some(uuid.as_str()));
    let (trigger, basis) = match (cmdline, pending) {
        (Some(c), _) if c.loadvm => (
            Some(Trigger::SnapshotRevert),
            "QEMU was started with -loadvm".to_owned(),
        ),
        (Some(c), Some(PendingKind::Restore)) if c.incoming => (
            Some(Trigger::Restore),
            "restore begin seen; QEMU has -incoming".to_owned(),
        ),
        (Some(c), Some(PendingKind::Migrate)) if c.incoming => (
            Some(Trigger::IncomingMigration),
            "migrate begin seen; QEMU has -incoming".to_owned(),
        ),
        (Some(c), None) if c.incoming => (
            Some(Trigger::Incoming),
            "QEMU has -incoming but no restore/migrate hook call was seen".to_owned(),
        ),
        (Some(_), Some(kind)) => (
            None,
            format!(
                "stale {} marker ignored: QEMU has no -incoming (plain start)",
                match kind {
                    PendingKind::Restore => "restore",
                    PendingKind::Migrate => "migrate",
                }
            ),
        ),
        (Some(_), None) => (None, "plain start (QEMU command line)".to_owned()),
        (None, Some(PendingKind::Restore)) => (
            Some(Trigger::Restore),
            "restore begin seen (QEMU command line not readable)".to_owned(),
        ),
        (None, Some(PendingKind::Migrate)) => (
            Some(Trigger::IncomingMigration),
            "migrate begin seen (QEMU command line not readable)".to_owned(),
        ),
        (None, None) => (
            None,
            "plain start (no marker; QEMU command line not readable)".to_owned(),
        ),
    };
    let blackout_lower_bound_ns = match trigger {
        Some(Trigger::Restore) => state
            .last_stop_ns
            .filter(|&stop| stop <= now_ns)
            .map(|stop| now_ns - stop),
        _ => None,
    };
    Classification {
        trigger,
        blackout_lower_bound_ns,
        basis,
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed, mode 0700) the state directory. An
    /// existing one must be a real directory (not a symlink) owned by the
    /// effective user; group/other bits are removed.
    pub fn open(dir: &Path) -> Result<StateDir, LibvirtError> {
        secure_dir(dir, 0o700)?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, uuid: &DomainUuid) -> PathBuf {
        // A DomainUuid is 36 characters of [0-9a-f-]: a safe file name.
        self.dir.join(format!("{}.json", uuid.as_str()))
    }

    /// Reads a domain's state. Missing: `None`. Unreadable, oversized or
    /// malformed: an error (the caller logs it and starts afresh).
    pub fn load(&self, uuid: &DomainUuid) -> Result<Option<DomainState>, LibvirtError> {
        let path = self.file(uuid);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LibvirtError::io(&path, e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| LibvirtError::io(&path, e))?;
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_STATE_BYTES {
            return Err(LibvirtError::State(format!(
                "{} is larger than {MAX_STATE_BYTES} bytes",
                path.display()
            )));
        }
        let state: DomainState = serde_json::from_slice(&bytes)
            .map_err(|e| LibvirtError::State(format!("{}: {e}", path.display())))?;
        if state.version != 1 || state.uuid != uuid.as_str() {
            return Err(LibvirtError::State(format!(
                "{}: wrong version or uuid",
                path.display()
            )));
        }
        Ok(Some(state))
    }

    /// Writes a domain's state atomically (mode 0600).
    pub fn store(&self, state: &DomainState) -> Result<(), LibvirtError> {
        let uuid = DomainUuid::parse(&state.uuid)?;
        let path = self.file(&uuid);
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| LibvirtError::State(format!("serialising state: {e}")))?;
        clockcarry::fsio::write_atomic(&path, &bytes)
            .map_err(|e| LibvirtError::State(format!("{}: {e}", path.display())))
    }

    /// Appends one line to `hook.log` (rotated to `hook.log.1` past
    /// [`MAX_LOG_BYTES`]). Best effort: errors are ignored.
    pub fn log(&self, line: &str) {
        let path = self.dir.join("hook.log");
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if meta.len() > MAX_LOG_BYTES {
                let _ = fs::rename(&path, self.dir.join("hook.log.1"));
            }
        }
        if let Ok(mut f) = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            let stamp = super::report::rfc3339_ns(super::now_ns());
            let _ = writeln!(f, "{stamp} [{}] {line}", std::process::id());
        }
    }
}

/// Creates `dir` (and missing parents, mode 0755) and makes sure `dir`
/// itself is a directory, not a symlink, owned by the effective user, with
/// no permission bits outside `mode`.
pub fn secure_dir(dir: &Path, mode: u32) -> Result<(), LibvirtError> {
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| LibvirtError::io(parent, e))?;
        }
    }
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(LibvirtError::io(dir, e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| LibvirtError::io(dir, e))?;
    if !meta.file_type().is_dir() {
        return Err(LibvirtError::State(format!(
            "{} is not a directory (or is a symlink)",
            dir.display()
        )));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(LibvirtError::State(format!(
            "{} is owned by uid {}, not {euid}",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o7777 & !mode != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(|e| LibvirtError::io(dir, e))?;
    }
    Ok(())
}

/// Reads QEMU's command line for a domain: `QEMU_RUN_DIR/NAME.pid`, then
/// `PROC/PID/cmdline`. `None` when the name is not path-safe
/// ([`DomainName::as_path_component`]) or anything is missing or odd.
pub fn read_qemu_cmdline(
    qemu_run_dir: &Path,
    proc_root: &Path,
    name: &DomainName,
) -> Option<QemuCmdline> {
    let component = name.as_path_component()?;
    let pid_path = qemu_run_dir.join(format!("{component}.pid"));
    let mut text = String::new();
    File::open(pid_path)
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    if pid <= 1 {
        return None;
    }
    let mut raw = Vec::new();
    File::open(proc_root.join(pid.to_string()).join("cmdline"))
        .ok()?
        .take(MAX_CMDLINE_BYTES)
        .read_to_end(&mut raw)
        .ok()?;
    Some(QemuCmdline::parse(&raw))
}
