//! Pieces shared by the subcommands: keys, sidecars, VM ids and paths,
//! error mapping, output.
//!
//! Keys and sidecars go through [`load_key`] and [`read_sidecar`] only,
//! which apply the host configuration ([`clockcarry::hostconf`]): when it
//! names a key, that key is used, and required, by every command that
//! reads or writes sidecars, `--key` or not.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clockcarry::hostconf::HostConfig;
use clockcarry::plan::PlanError;
use clockcarry::sidecar::{self, Sidecar, SidecarError, SidecarKey};
use serde::Serialize;

use super::exit::{CliError, CliResult, Exit};

/// Environment variable naming the sidecar directory.
pub const STATE_DIR_ENV: &str = "CLOCKCARRY_STATE_DIR";
/// Default sidecar directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/clockcarry";
/// Longest VM id accepted in a path, bytes.
pub const MAX_PATH_VM_ID_BYTES: usize = 128;

/// The host configuration, read once per process (`None`: there is none).
/// Exit 2 when it exists but cannot be used: a broken host policy is never
/// silently ignored.
pub fn host_config() -> CliResult<Option<&'static HostConfig>> {
    static HOST: OnceLock<Result<Option<HostConfig>, String>> = OnceLock::new();
    match HOST.get_or_init(|| HostConfig::load().map_err(|e| e.to_string())) {
        Ok(cfg) => Ok(cfg.as_ref()),
        Err(msg) => Err(CliError::bad_input(msg.clone()).with_hint(
            "fix the host configuration (docs/cli.md, \"Host configuration\"), or point \
             CLOCKCARRY_CONFIG at the right file",
        )),
    }
}

/// The sidecar key: `--key` when given, else the host configuration's
/// `key_file`, else none. Either way a key that is loaded is mandatory:
/// sidecars are sealed with it and only sidecars it authenticates are
/// read. Exit 2 on any problem, the host configuration's included (also
/// with `--key`), and for a key file others could read or write or that
/// belongs to another user ([`SidecarKey::from_file`]).
pub fn load_key(path: Option<&Path>) -> CliResult<Option<SidecarKey>> {
    let host = host_config()?;
    let (path, from_host) = match (path, host.and_then(|h| h.key_file.as_deref())) {
        (Some(p), _) => (p, None),
        (None, Some(p)) => (p, host.map(|h| h.path.as_path())),
        (None, None) => return Ok(None),
    };
    SidecarKey::from_file(path).map(Some).map_err(|e| {
        let origin = from_host.map_or_else(String::new, |c| {
            format!(" (key_file of the host configuration {})", c.display())
        });
        match e {
            SidecarError::Untrusted { .. } => CliError::bad_input(format!("sidecar {e}{origin}"))
                .with_hint(format!(
                    "a key others can read or write is no secret: make {} private \
                     (owned by this user or root, chmod 600), or generate a new one",
                    path.display()
                )),
            _ => CliError::bad_input(format!("sidecar key {}{origin}: {e}", path.display())),
        }
    })
}

/// The key of an offset exchange (`capture --peer`, `serve`): the one
/// [`load_key`] finds, which is then mandatory; without one only with
/// `--insecure-no-key`, and never when the host configuration names a key.
pub fn peer_key(path: Option<&Path>, insecure: bool) -> CliResult<Option<SidecarKey>> {
    let key = load_key(path)?;
    match (key, insecure) {
        (Some(_), true) => {
            let conf = host_config()?.map_or_else(
                || "the host configuration".to_string(),
                |h| h.path.display().to_string(),
            );
            Err(CliError::bad_input(format!(
                "--insecure-no-key: {conf} names a key_file, so the key is mandatory on this host"
            ))
            .with_hint("drop --insecure-no-key: the exchange is authenticated with that key"))
        }
        (Some(k), false) => Ok(Some(k)),
        (None, true) => {
            log::warn!(
                "the offset exchange runs WITHOUT authentication (--insecure-no-key): anyone on \
                 the path can alter the measured offset"
            );
            Ok(None)
        }
        (None, false) => Err(CliError::bad_input(
            "the offset exchange is authenticated with the sidecar key, and none is in use",
        )
        .with_hint(
            "give --key FILE (the same key on both hosts) or key_file in the host \
             configuration; --insecure-no-key runs it unauthenticated",
        )),
    }
}

/// An offset exchange failure as a CLI error (exit 10).
pub fn peer_error(context: &str, err: &clockcarry::peer::PeerError) -> CliError {
    CliError::new(Exit::Peer, format!("{context}: {err}"))
}

/// The exit status and hint for a sidecar that cannot be used.
pub fn sidecar_error(path: &Path, err: &SidecarError) -> CliError {
    let hint = match err {
        SidecarError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Some("check the path; capture writes it with `clockcarry capture ... -o FILE`")
        }
        SidecarError::DigestMismatch => {
            Some("the file was altered or damaged after capture: capture again")
        }
        SidecarError::HmacMismatch | SidecarError::KeyIdMismatch { .. } => {
            Some("use the --key the source used, or capture again with this key")
        }
        SidecarError::HmacMissing => Some(
            "a sidecar key is in use (--key, or key_file in the host configuration), so \
             unauthenticated sidecars are refused: capture again with that key",
        ),
        SidecarError::Untrusted { .. } => Some(
            "someone else could have written or replaced it: keep sidecars in a private \
             directory (the default state directory is 0700), owned by this user or root and \
             writable by nobody else; if you know where this one came from, copy it there",
        ),
        _ => None,
    };
    let e = match err {
        // The message names the file already.
        SidecarError::Untrusted { .. } => CliError::bad_input(err.to_string()),
        _ => CliError::bad_input(format!("sidecar {}: {err}", path.display())),
    };
    match hint {
        Some(h) => e.with_hint(h),
        None => e,
    }
}

/// Reads and verifies a sidecar: refused when someone other than this user
/// or root could have written it ([`sidecar::read_trusted`]), and checked
/// with `key`, or when `key` is `None` with the key [`load_key`] finds
/// (the host configuration's), so no caller can read a sidecar
/// unauthenticated while the host requires a key.
pub fn read_sidecar(path: &Path, key: Option<&SidecarKey>) -> CliResult<Sidecar> {
    let loaded;
    let key = match key {
        Some(k) => Some(k),
        None => {
            loaded = load_key(None)?;
            loaded.as_ref()
        }
    };
    let bytes = sidecar::read_trusted(path).map_err(|e| sidecar_error(path, &e))?;
    Sidecar::parse(&bytes, key).map_err(|e| sidecar_error(path, &e))
}

/// Checks a VM id that will become part of a path: 1 to 128 bytes of
/// `[A-Za-z0-9._-]`, not starting with `.` (so neither `.`, `..` nor a
/// hidden file), no `..` anywhere.
pub fn check_path_vm_id(id: &str) -> CliResult<()> {
    let bad = |why: &str| {
        CliError::bad_input(format!("VM id {id:?} cannot name a file: {why}"))
            .with_hint("give -o/-i with a path, or use an id of letters, digits, '.', '_' and '-'")
    };
    if id.is_empty() {
        return Err(bad("it is empty"));
    }
    if id.len() > MAX_PATH_VM_ID_BYTES {
        return Err(bad(&format!(
            "it is longer than {MAX_PATH_VM_ID_BYTES} bytes"
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(bad(&format!("it contains {c:?}")));
    }
    if id.starts_with('.') || id.contains("..") {
        return Err(bad("it starts with '.' or contains '..'"));
    }
    Ok(())
}

/// `$CLOCKCARRY_STATE_DIR` or `/var/lib/clockcarry`.
pub fn state_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
}

/// The sidecar `-i` names, else `--vm`'s at [`default_sidecar_path`].
pub fn sidecar_path(input: Option<&Path>, vm: Option<&str>) -> CliResult<PathBuf> {
    match (input, vm) {
        (Some(p), _) => Ok(p.to_path_buf()),
        (None, Some(vm)) => default_sidecar_path(vm),
        (None, None) => Err(CliError::bad_input("give the sidecar with -i, or --vm")),
    }
}

/// With `--vm`, the sidecar at `path` must be that VM's.
pub fn check_sidecar_vm(path: &Path, sidecar: &Sidecar, vm: Option<&str>) -> CliResult<()> {
    match vm {
        Some(vm) if vm != sidecar.body.vm.id => Err(CliError::bad_input(format!(
            "sidecar {} is for VM {:?}, not {vm:?}",
            path.display(),
            sidecar.body.vm.id
        ))
        .with_hint("this sidecar belongs to another VM: give the right -i")),
        _ => Ok(()),
    }
}

/// The default sidecar path of a VM: `<state dir>/<id>.sidecar.json`.
pub fn default_sidecar_path(id: &str) -> CliResult<PathBuf> {
    check_path_vm_id(id)?;
    Ok(state_dir().join(format!("{id}.sidecar.json")))
}

/// The exit status of a planner refusal.
pub fn plan_exit(err: &PlanError) -> Exit {
    match err {
        PlanError::Sidecar(_)
        | PlanError::VmMismatch { .. }
        | PlanError::NotThisVm { .. }
        | PlanError::VcpuCountMismatch { .. }
        | PlanError::BadInput { .. }
        | PlanError::Overflow { .. } => Exit::BadInput,
        _ => Exit::Refused,
    }
}

/// A hint for a planner refusal, when there is a useful one.
pub fn plan_hint(err: &PlanError) -> Option<&'static str> {
    match err {
        PlanError::VmMismatch { .. } => Some("this sidecar belongs to another VM: give the right -i"),
        PlanError::NotThisVm { .. } => Some(
            "give the sidecar captured from this VM after the state it was restored from; if you \
             are certain it is, --skip-vm-check plans without this check",
        ),
        PlanError::VcpuCountMismatch { .. } => {
            Some("this sidecar was captured from a VM with another vCPU count: give the right -i")
        }
        PlanError::ElapsedTooLong { .. } => {
            Some("the sidecar is older than --max-elapsed: capture again, or raise the limit")
        }
        PlanError::NotSynchronised { .. } => {
            Some("synchronise the host clocks (chrony/ntpd/ptp), or drop --require-sync")
        }
        PlanError::ClockErrorTooLarge { .. } => {
            Some("wait for the host clocks to settle, or raise --max-clock-error")
        }
        PlanError::RateMismatch { .. } | PlanError::ScalingUnknown { .. } => Some(
            "restore on a host with the same TSC rate, or one with TSC scaling that reports its ratio",
        ),
        PlanError::ClocksDisagree { .. } => Some(
            "a host clock that claims to be synchronised is not: check its time source; the \
             measured offset is trusted without --require-sync",
        ),
        PlanError::CaptureInFuture { .. } => {
            Some("the hosts' clocks disagree by more than they admit: check time synchronisation")
        }
        _ => None,
    }
}

/// A planner refusal as a CLI error.
pub fn plan_error(err: &PlanError) -> CliError {
    let e = CliError::new(plan_exit(err), format!("refused: {err}"));
    match plan_hint(err) {
        Some(h) => e.with_hint(h),
        None => e,
    }
}

/// A failure of either VMM (API or QMP) as a CLI error (exit 4).
pub fn vmm_error(err: &super::vmm::VmmError) -> CliError {
    CliError::new(Exit::Vmm, err.to_string())
}

/// Writes `value` as pretty JSON to stdout, with a newline. A closed
/// stdout is not an error worth a panic.
pub fn print_json<T: Serialize>(value: &T) -> CliResult<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::internal(format!("cannot encode JSON output: {e}")))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    Ok(())
}

/// `-q` was given: [`print_report`] prints nothing.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records `-q` for [`print_report`].
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// The human report of an operation (capture, restore, arm): on stdout,
/// unless `-q` asked for errors only. (`--json` output and the reports of
/// the commands whose output is their purpose, such as `check` and
/// `inspect`, go through [`print_json`] / [`print_text`] regardless.)
pub fn print_report(text: &str) {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        print_text(text);
    }
}

/// Writes text to stdout; a closed stdout is ignored.
pub fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_for_paths() {
        for ok in [
            "web-1",
            "4f0d1c2e-9a7b-4c59-8a51-3b1f6f0e2d71",
            "a.b_c",
            "A",
        ] {
            assert!(check_path_vm_id(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a..b",
            ".hidden",
            "a b",
            "é",
            "a\0b",
            long.as_str(),
        ] {
            let err = check_path_vm_id(bad).expect_err(bad);
            assert_eq!(err.exit, Exit::BadInput);
        }
    }
}
