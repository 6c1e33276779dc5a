//! Starting the resync helper so that libvirtd never waits for it: double
//! fork, `setsid`, stdio on `/dev/null`, every other descriptor closed,
//! then `execve` of the same binary with the hidden argument
//! [`super::RESYNC_ARG`]. The hook waits only for the short-lived middle
//! child (so no zombie is left) and returns at once.
//!
//! libvirt reads the hook's stdout and stderr until end of file: a helper
//! that kept either pipe open would hold `started begin` (and with it the
//! domain start) until the helper ended. Hence `/dev/null`.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The environment the helper runs with (libvirt gives hooks a minimal one
/// too).
const HELPER_ENV: [&str; 2] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"];

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

/// Runs `exe` with `args` (argv[0] = `exe`) fully detached from the caller.
/// Returns once the helper's middle process has exited: `Ok` means the
/// grandchild was forked (whether its `execve` then succeeded is only seen
/// in its own log: a failed exec exits 127 silently).
pub fn spawn_detached(exe: &Path, args: &[OsString]) -> io::Result<()> {
    // Everything the children need is prepared before fork: between fork
    // and exec only async-signal-safe calls are made, no allocation.
    let exe_c = cstring(exe.as_os_str().as_bytes())?;
    let mut argv_c = vec![exe_c.clone()];
    for a in args {
        argv_c.push(cstring(a.as_bytes())?);
    }
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let env_c: Vec<CString> = HELPER_ENV
        .iter()
        .map(|e| cstring(e.as_bytes()))
        .collect::<io::Result<_>>()?;
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let devnull_fd = std::os::unix::io::AsRawFd::as_raw_fd(&devnull);
    let root = cstring(b"/")?;

    // SAFETY: fork has no preconditions; the hook process is single
    // threaded, and the children only call async-signal-safe functions
    // (setsid, fork, dup2, close, chdir, umask, execve, _exit) on data
    // prepared above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Middle child: new session, fork the helper, exit.
        // SAFETY: see above; nothing here returns to Rust code.
        unsafe {
            libc::setsid();
            let pid2 = libc::fork();
            if pid2 < 0 {
                libc::_exit(1);
            }
            if pid2 > 0 {
                libc::_exit(0);
            }
            libc::dup2(devnull_fd, 0);
            libc::dup2(devnull_fd, 1);
            libc::dup2(devnull_fd, 2);
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }
            libc::chdir(root.as_ptr());
            libc::umask(0o077);
            libc::execve(exe_c.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waiting for our own child; status points to a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the helper's middle process failed (wait status {status:#x})"
        )))
    }
}
