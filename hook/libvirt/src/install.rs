//! `clockcarry libvirt install` / `uninstall`: put the binary where libvirt
//! runs QEMU hooks (`/etc/libvirt/hooks/qemu.d/clockcarry`, root-owned,
//! mode 0755), or take it away. libvirtd reads its hooks at start and on
//! SIGHUP; neither command signals or restarts it: the operator reloads.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::Config;
use super::LibvirtError;

/// libvirt's QEMU hook directory (libvirt >= 6.5.0).
pub const DEFAULT_HOOKS_DIR: &str = "/etc/libvirt/hooks/qemu.d";
/// The installed hook's file name.
pub const HOOK_NAME: &str = "clockcarry";
/// What the operator is told to do after install/uninstall.
pub const RELOAD_HINT: &str = "reload libvirtd so it rereads its hooks: \
    `systemctl reload libvirtd` (or `virtqemud` with the modular daemons), \
    or `kill -HUP $(cat /run/libvirtd.pid)`; running domains are not affected";

/// How the hook is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallMode {
    /// A copy of the binary (default): later changes to the source binary
    /// do not change the hook until the next install.
    Copy,
    /// A symlink to the binary, which must be root-owned and writable by
    /// root only.
    Symlink,
}

/// Options of [`super::install`] and [`super::uninstall`].
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Default [`DEFAULT_HOOKS_DIR`].
    pub hooks_dir: PathBuf,
    /// The binary to install. Default: the running executable.
    pub source: Option<PathBuf>,
    pub mode: InstallMode,
    /// Owner given to the hook (default root, 0:0). `None`: leave as
    /// created (tests as non-root).
    pub owner: Option<(u32, u32)>,
    /// The host configuration, checked before installing. Default
    /// [`super::config::config_path`].
    pub config_path: PathBuf,
    /// Replace a hook already there that is not an earlier clockcarry.
    pub force: bool,
}

impl Default for InstallOptions {
    fn default() -> InstallOptions {
        InstallOptions {
            hooks_dir: PathBuf::from(DEFAULT_HOOKS_DIR),
            source: None,
            mode: InstallMode::Copy,
            owner: Some((0, 0)),
            config_path: super::config::config_path(),
            force: false,
        }
    }
}

/// What install/uninstall did, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallOutcome {
    /// The hook's path.
    pub path: PathBuf,
    /// One line per action taken or noticed.
    pub messages: Vec<String>,
}

/// The marker every clockcarry binary contains (used to recognise an
/// earlier install before replacing it).
const MARKER: &[u8] = b"clockcarry-libvirt-resync";

fn is_clockcarry(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: a FIFO behind a symlink must not hang the install.
    let Ok(file) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return false;
    };
    let mut bytes = Vec::new();
    if file.take(256 << 20).read_to_end(&mut bytes).is_err() {
        return false;
    }
    bytes.windows(MARKER.len()).any(|w| w == MARKER)
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
pub(crate) fn install(opts: &InstallOptions) -> Result<InstallOutcome, LibvirtError> {
    let mut messages = Vec::new();
    let cfg = Config::load(&opts.config_path)?;
    messages.push(format!(
        "config {}: {} (host default policy {})",
        opts.config_path.display(),
        if opts.config_path.exists() {
            "valid"
        } else {
            "absent, defaults used"
        },
        cfg.policy.as_str()
    ));
    let source = match &opts.source {
        Some(s) => s.clone(),
        None => {
            std::env::current_exe().map_err(|e| LibvirtError::io(Path::new("/proc/self/exe"), e))?
        }
    };
    let source = fs::canonicalize(&source).map_err(|e| LibvirtError::io(&source, e))?;
    let meta = fs::metadata(&source).map_err(|e| LibvirtError::io(&source, e))?;
    if !meta.is_file() {
        return Err(LibvirtError::Install(format!(
            "{} is not a regular file",
            source.display()
        )));
    }
    fs::create_dir_all(&opts.hooks_dir).map_err(|e| LibvirtError::io(&opts.hooks_dir, e))?;
    let target = opts.hooks_dir.join(HOOK_NAME);
    if source == target {
        return Err(LibvirtError::Install(format!(
            "{} is already the installed hook; run install from the binary you want installed",
            target.display()
        )));
    }
    if let Ok(existing) = fs::symlink_metadata(&target) {
        // The rename below would replace whatever is there: only a regular
        // file or a symlink (what install itself places) may be, even with
        // --force.
        let ft = existing.file_type();
        if !ft.is_file() && !ft.is_symlink() {
            return Err(LibvirtError::Install(format!(
                "{} is {}, not a regular file or a symlink: refusing to replace it",
                target.display(),
                clockcarry::fsio::file_kind(&ft)
            )));
        }
        let ours = is_clockcarry(&target);
        if !ours && !opts.force {
            return Err(LibvirtError::Install(format!(
                "{} exists and is not a clockcarry hook; move it away or use --force",
                target.display()
            )));
        }
        messages.push(format!("replacing {}", target.display()));
    }
    let temp = opts
        .hooks_dir
        .join(format!(".{HOOK_NAME}.new-{}", std::process::id()));
    let _ = fs::remove_file(&temp);
    let result = (|| -> Result<(), LibvirtError> {
        match opts.mode {
            InstallMode::Copy => {
                fs::copy(&source, &temp).map_err(|e| LibvirtError::io(&temp, e))?;
                if let Some((uid, gid)) = opts.owner {
                    std::os::unix::fs::chown(&temp, Some(uid), Some(gid))
                        .map_err(|e| LibvirtError::io(&temp, e))?;
                }
                fs::set_permissions(&temp, fs::Permissions::from_mode(0o755))
                    .map_err(|e| LibvirtError::io(&temp, e))?;
                fs::File::open(&temp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| LibvirtError::io(&temp, e))?;
            }
            InstallMode::Symlink => {
                if let Some((uid, _)) = opts.owner {
                    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
                        return Err(LibvirtError::Install(format!(
                            "{} must be owned by uid {uid} and writable by its owner only \
                             to be linked as a root hook (or install a copy)",
                            source.display()
                        )));
                    }
                }
                std::os::unix::fs::symlink(&source, &temp)
                    .map_err(|e| LibvirtError::io(&temp, e))?;
            }
        }
        fs::rename(&temp, &target).map_err(|e| LibvirtError::io(&target, e))?;
        if let Ok(d) = fs::File::open(&opts.hooks_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result?;
    messages.push(match opts.mode {
        InstallMode::Copy => format!(
            "installed {} (copy of {}, mode 0755)",
            target.display(),
            source.display()
        ),
        InstallMode::Symlink => format!("installed {} -> {}", target.display(), source.display()),
    });
    messages.push(RELOAD_HINT.to_owned());
    Ok(InstallOutcome {
        path: target,
        messages,
    })
}

pub(crate) fn uninstall(opts: &InstallOptions) -> Result<InstallOutcome, LibvirtError> {
    let target = opts.hooks_dir.join(HOOK_NAME);
    let mut messages = Vec::new();
    match fs::symlink_metadata(&target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            messages.push(format!(
                "{} is not installed; nothing to do",
                target.display()
            ));
            return Ok(InstallOutcome {
                path: target,
                messages,
            });
        }
        Err(e) => return Err(LibvirtError::io(&target, e)),
        Ok(_) => {
            let ours = is_clockcarry(&target);
            if !ours && !opts.force {
                return Err(LibvirtError::Install(format!(
                    "{} is not a clockcarry hook; not removing it without --force",
                    target.display()
                )));
            }
        }
    }
    fs::remove_file(&target).map_err(|e| LibvirtError::io(&target, e))?;
    messages.push(format!("removed {}", target.display()));
    messages.push(
        "state (/run/clockcarry/libvirt), reports and /etc/clockcarry/libvirt.conf are left in place"
            .to_owned(),
    );
    messages.push(RELOAD_HINT.to_owned());
    Ok(InstallOutcome {
        path: target,
        messages,
    })
}
