//! One clockcarry operation per VM at a time.
//!
//! `restore` and `capture` hold an exclusive `flock` on a lock file named
//! after the VM's API socket (the one handle every command has for a VM)
//! for as long as they talk to the VMM. A second command on the same VM does
//! not wait: it exits with [`Exit::Busy`] before sending anything, so it can
//! never undo what the first one applied. The kernel drops the lock when the
//! holder exits, `kill -9` included, so a crashed run never blocks the next.
//!
//! Lock files live in `$CLOCKCARRY_RUN_DIR/lock/` (default
//! `/run/clockcarry/lock/`), a directory owned by the running user and
//! writable by nobody else; the file name is the SHA-256 of the socket's
//! canonical path, so no name from outside reaches the file system.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::exit::{CliError, CliResult, Exit};
use super::hostinfo::run_dir;

/// Largest holder note read back from a lock file, bytes.
const MAX_NOTE_BYTES: u64 = 512;

/// A held per-VM lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct VmLock {
    _file: Flock<File>,
}

/// The path that identifies the VM: the socket's canonical path when it
/// exists, else the path as given, made absolute.
fn vm_key(api_socket: &Path) -> PathBuf {
    fs::canonicalize(api_socket).unwrap_or_else(|_| {
        if api_socket.is_absolute() {
            api_socket.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(api_socket))
                .unwrap_or_else(|_| api_socket.to_path_buf())
        }
    })
}

/// The lock file for the VM behind `api_socket`.
pub fn lock_path(api_socket: &Path) -> PathBuf {
    let key = vm_key(api_socket);
    let digest = Sha256::digest(key.as_os_str().as_encoded_bytes());
    let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    run_dir().join("lock").join(format!("{name}.lock"))
}

/// Creates the lock directory if needed and checks that nobody else can
/// write to it (else another user could hold every lock, or plant links).
fn lock_dir(dir: &Path) -> CliResult<()> {
    let internal =
        |what: String| CliError::internal(format!("lock directory {}: {what}", dir.display()));
    if let Some(parent) = dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| internal(format!("cannot create its parent: {e}")))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(internal(format!("cannot create it: {e}"))),
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| internal(e.to_string()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        return Err(internal(format!(
            "not a directory owned by uid {euid} and writable by it alone (uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        ))
        .with_hint("remove it, or point CLOCKCARRY_RUN_DIR at a private directory"));
    }
    Ok(())
}

/// Takes the VM's lock without waiting. `op` names the operation for the
/// holder note ("restore", "capture").
///
/// Exit 8 (busy) when another clockcarry holds it; exit 1 when the lock
/// cannot be set up. Nothing has been sent to the VMM either way.
pub fn lock_vm(api_socket: &Path, op: &str) -> CliResult<VmLock> {
    let path = lock_path(api_socket);
    let dir = path.parent().unwrap_or(Path::new("/"));
    lock_dir(dir)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| CliError::internal(format!("lock file {}: {e}", path.display())))?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((file, Errno::EWOULDBLOCK)) => {
            let mut note = String::new();
            let _ = (&file).take(MAX_NOTE_BYTES).read_to_string(&mut note);
            let holder = note.lines().next().unwrap_or("").trim().to_string();
            return Err(CliError::new(
                Exit::Busy,
                format!(
                    "another clockcarry operation holds the lock of the VM at {} ({}); \
                     nothing was sent to the VM",
                    api_socket.display(),
                    if holder.is_empty() {
                        "holder unknown".to_string()
                    } else {
                        holder
                    }
                ),
            )
            .with_hint(
                "one capture or restore per VM at a time: wait for the other one to finish and \
                 read its result before running another",
            ));
        }
        Err((_, errno)) => {
            return Err(CliError::internal(format!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::from(errno)
            )));
        }
    };
    // The note is for the operator only; failing to write it changes nothing.
    let note = format!(
        "{op} by pid {} on {}\n",
        std::process::id(),
        vm_key(api_socket).display()
    );
    let _ = file.set_len(0);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.write_all(note.as_bytes());
    log::debug!("holding {} ({})", path.display(), note.trim_end());
    Ok(VmLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_digests_of_the_socket_path() {
        let a = lock_path(Path::new("/run/vm-a.sock"));
        let b = lock_path(Path::new("/run/vm-b.sock"));
        assert_ne!(a, b);
        let name = a.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert_eq!(name.len(), 64 + ".lock".len(), "{name}");
        assert!(name
            .trim_end_matches(".lock")
            .bytes()
            .all(|c| c.is_ascii_hexdigit()));
    }
}
