//! Files: atomic writes that only ever replace a regular file, and bounded
//! reads of files only this user or root could have written. Used for
//! sidecars, the libvirt hook's state and reports, and the rate cache; its
//! errors name the file, not what it holds.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("I/O on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is {size} bytes, more than the limit of {max} bytes", path.display())]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{what} {} {reason}: refused", path.display())]
    Untrusted {
        /// "key file", "sidecar", "host configuration".
        what: &'static str,
        path: PathBuf,
        /// Who else could read or write it, and how (mode, owner, directory).
        reason: String,
    },
    #[error("{} is {kind}, not a regular file: refusing to replace it", path.display())]
    NotRegularFile {
        path: PathBuf,
        /// What is there: "a directory", "a symbolic link", "a FIFO", ...
        kind: &'static str,
    },
}

impl FileError {
    fn io(path: &Path, source: io::Error) -> Self {
        FileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result of every file operation here.
pub type FileResult<T> = std::result::Result<T, FileError>;

/// Reads a file, refusing one over `max_bytes` without reading it whole
/// (its size is checked first, and the read stops one byte past the limit
/// for files whose size is not known in advance).
pub fn read_bounded(path: &Path, max_bytes: usize) -> FileResult<Vec<u8>> {
    let file = File::open(path).map_err(|e| FileError::io(path, e))?;
    let meta = file.metadata().map_err(|e| FileError::io(path, e))?;
    read_open(path, file, &meta, max_bytes)
}

/// [`read_bounded`], for a file (`what`: "sidecar", ...) that only this
/// user or root could have written: the opened file must be owned by the
/// effective user or root and not writable by group or others, and a
/// regular file must sit in a directory nobody else could replace it in
/// ([`check_parent_dir`]). Otherwise [`FileError::Untrusted`], naming the
/// reason. (A pipe such as `/dev/stdin` has no directory entry to replace:
/// only its owner and mode are checked.)
pub fn read_trusted(what: &'static str, path: &Path, max_bytes: usize) -> FileResult<Vec<u8>> {
    let file = File::open(path).map_err(|e| FileError::io(path, e))?;
    let meta = file.metadata().map_err(|e| FileError::io(path, e))?;
    check_owner_and_mode(what, path, &meta, 0o022)?;
    if meta.is_file() {
        check_parent_dir(what, path)?;
    }
    read_open(path, file, &meta, max_bytes)
}

/// The effective user id.
fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Refuses ([`FileError::Untrusted`]) a file, described by `meta` (best
/// taken from the opened file, so no symlink or rename stands in between),
/// that is owned by someone other than the effective user or root, or has
/// any of the permission bits `forbidden` (`0o022`: writable by group or
/// others; `0o066`: readable or writable by them).
pub fn check_owner_and_mode(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
    forbidden: u32,
) -> FileResult<()> {
    use std::os::unix::fs::MetadataExt;
    let untrusted = |reason: String| FileError::Untrusted {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(untrusted(format!(
            "is owned by uid {}, not by this user (uid {me}) or root",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & forbidden != 0 {
        let how = if forbidden & 0o044 != 0 {
            "readable or writable"
        } else {
            "writable"
        };
        return Err(untrusted(format!(
            "is {how} by group or others (mode {mode:04o})"
        )));
    }
    Ok(())
}

/// Refuses ([`FileError::Untrusted`]) a file whose directory (that of
/// its canonical path, symlinks resolved) would let someone other than the
/// effective user or root replace it: a directory owned by another user,
/// or one writable by group or others without the sticky bit (with it, as
/// on `/tmp`, only a file's owner may rename or remove it). Directories
/// further up are not examined.
pub fn check_parent_dir(what: &'static str, path: &Path) -> FileResult<()> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(path).map_err(|e| FileError::io(path, e))?;
    let Some(dir) = real.parent() else {
        return Ok(());
    };
    let meta = std::fs::metadata(dir).map_err(|e| FileError::io(dir, e))?;
    let untrusted = |reason: String| FileError::Untrusted {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let me = euid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(untrusted(format!(
            "is in directory {}, owned by uid {} (not this user, uid {me}, nor root), who could have replaced it",
            dir.display(),
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(untrusted(format!(
            "is in directory {}, writable by group or others without the sticky bit \
             (mode {mode:04o}): anyone could have replaced it",
            dir.display()
        )));
    }
    Ok(())
}

/// Reads an opened file within `max_bytes`.
fn read_open(
    path: &Path,
    file: File,
    meta: &std::fs::Metadata,
    max_bytes: usize,
) -> FileResult<Vec<u8>> {
    let max = u64::try_from(max_bytes).unwrap_or(u64::MAX);
    let too_large = |size: u64| FileError::TooLarge {
        path: path.to_path_buf(),
        size,
        max,
    };
    if meta.is_file() && meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(max_bytes));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| FileError::io(path, e))?;
    if bytes.len() > max_bytes {
        return Err(too_large(u64::try_from(bytes.len()).unwrap_or(u64::MAX)));
    }
    Ok(bytes)
}

/// What a file type is, for messages: "a regular file", "a directory", "a
/// symbolic link", "a FIFO", "a socket", "a character device", "a block
/// device".
pub fn file_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "a file of unknown type"
    }
}

/// Whether an atomic write may put a file at `path`: nothing is there, or
/// a regular file is. Anything else (a directory, a device such as
/// `/dev/full`, a FIFO, a socket, a symbolic link, dangling or not: the
/// path is examined with `lstat`, never followed) is
/// [`FileError::NotRegularFile`], since a rename would replace it.
pub fn check_replaceable(path: &Path) -> FileResult<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(meta) => Err(FileError::NotRegularFile {
            path: path.to_path_buf(),
            kind: file_kind(&meta.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FileError::io(path, e)),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
/// Temp names tried before giving up (each collision is a leftover file).
const TEMP_ATTEMPTS: u32 = 64;

/// The first stage of an atomic write: the new content, complete and
/// fsynced, in a temp file next to the target. [`StagedFile::commit`]
/// renames it over the target; dropping it uncommitted removes it, and a
/// crash before the commit leaves the target as it was. Only a missing
/// target or a regular file is ever replaced ([`check_replaceable`], at
/// both stages).
#[derive(Debug)]
pub struct StagedFile {
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Creates `.<filename>.tmp-<pid>-<counter>` in the target's directory
    /// (O_CREAT|O_EXCL, mode 0600; an existing name is skipped, never
    /// overwritten), writes `bytes` and fsyncs it. Refuses first, with
    /// [`FileError::NotRegularFile`], a target that exists and is not a
    /// regular file.
    pub fn create(path: &Path, bytes: &[u8]) -> FileResult<StagedFile> {
        let name = path.file_name().ok_or_else(|| {
            FileError::io(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
            )
        })?;
        check_replaceable(path)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let pid = std::process::id();
        for _ in 0..TEMP_ATTEMPTS {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut temp_name = OsString::from(".");
            temp_name.push(name);
            temp_name.push(format!(".tmp-{pid}-{n}"));
            let temp = dir.join(temp_name);
            let file = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(FileError::io(&temp, e)),
            };
            let staged = StagedFile {
                temp,
                target: path.to_path_buf(),
                dir,
                committed: false,
            };
            // On error `staged` drops here and removes the temp file.
            staged.fill(file, bytes)?;
            return Ok(staged);
        }
        Err(FileError::io(
            path,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "no free temporary file name next to the target",
            ),
        ))
    }

    fn fill(&self, mut file: File, bytes: &[u8]) -> FileResult<()> {
        let err = |e| FileError::io(&self.temp, e);
        // The umask may have removed bits but never adds any: make it 0600.
        file.set_permissions(Permissions::from_mode(0o600))
            .map_err(err)?;
        file.write_all(bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(())
    }

    /// The temp file holding the staged content.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The file the commit will replace.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temp file over the target, then fsyncs the directory so
    /// the rename itself is durable. The target is checked again first
    /// ([`check_replaceable`]): something that appeared there since
    /// [`StagedFile::create`] and is not a regular file is left alone (the
    /// temp file is removed).
    pub fn commit(mut self) -> FileResult<()> {
        check_replaceable(&self.target)?;
        std::fs::rename(&self.temp, &self.target).map_err(|e| FileError::io(&self.target, e))?;
        self.committed = true;
        let dir = File::open(&self.dir).map_err(|e| FileError::io(&self.dir, e))?;
        dir.sync_all().map_err(|e| FileError::io(&self.dir, e))?;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` atomically: [`StagedFile::create`] then
/// [`StagedFile::commit`]. Readers see the old file or the new one, never a
/// mix, and after a crash the target is one of the two. A target that is
/// not a regular file (a device, a directory, a FIFO, a socket, a symbolic
/// link) is refused, never replaced: [`FileError::NotRegularFile`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> FileResult<()> {
    StagedFile::create(path, bytes)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Its errors name the file, not what it holds: a libvirt state file's
    /// failure must not read "sidecar".
    #[test]
    fn errors_name_the_file_only() {
        let path = Path::new("/nonexistent-clockcarry-dir/state.json");
        let err = write_atomic(path, b"{}").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("I/O on /nonexistent-clockcarry-dir/"),
            "{text}"
        );
        assert!(!text.contains("sidecar"), "{text}");
        let err = read_bounded(Path::new("/dev/zero"), 16).unwrap_err();
        assert!(matches!(err, FileError::TooLarge { max: 16, .. }), "{err}");
    }
}
