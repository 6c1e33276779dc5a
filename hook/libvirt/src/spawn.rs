//! Starting the resync helper so that libvirtd never waits for it: double
//! fork, `setsid`, stdio on `/dev/null`, every other descriptor closed,
//! then `execve` of the same binary with the hidden argument
//! [`super::RESYNC_ARG`]. The hook waits only for the short-lived middle
//! child (so no zombie is left) and returns at once.
//!
//! libvirt reads the hook's stdout and stderr until end of file: a helper
//! that kept either pipe open would hold `started begin` (and with it the
//! domain start) until the helper ended. Hence `/dev/null`.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid, ForkResult};

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
    let root = cstring(b"/")?;

    // SAFETY: the hook is single threaded, and until execve the children make
    // only async-signal-safe calls (setsid, fork, dup2, chdir, umask, close,
    // execve, _exit) on data prepared above, allocating nothing.
    let middle = match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Child => {
            middle_child(&devnull, &root, &exe_c, &argv_p, &env_p);
        }
        ForkResult::Parent { child } => child,
    };
    let status = loop {
        match waitpid(middle, None) {
            Ok(status) => break status,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if matches!(status, WaitStatus::Exited(_, 0)) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the helper's middle process failed (wait status {})",
            raw_wait_status(status)
        )))
    }
}

/// The middle child: a new session, then fork the helper and exit, so the
/// helper is reparented away from the hook. Never returns.
fn middle_child(
    devnull: &File,
    root: &CStr,
    exe: &CStr,
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
) -> ! {
    let _ = setsid();
    // Raw libc for _exit (nix has none): it ends the process at once, with
    // no atexit handler and no unwinding into the hook's code.
    // SAFETY: as for the first fork (fork copies only the calling thread).
    unsafe {
        match fork() {
            Ok(ForkResult::Child) => {}
            Ok(ForkResult::Parent { .. }) => libc::_exit(0),
            Err(_) => libc::_exit(1),
        }
    }
    // The helper: stdio on /dev/null, no other descriptor, cwd /, then exec.
    let _ = dup2_stdin(devnull);
    let _ = dup2_stdout(devnull);
    let _ = dup2_stderr(devnull);
    let _ = chdir(root);
    umask(Mode::from_bits_truncate(0o077));
    // Raw libc: nix has no close_range, its close wants an owned descriptor,
    // and its execve allocates the argv/envp arrays (not async-signal-safe).
    // SAFETY: closes only descriptors this process inherited; argv and env
    // are NULL-terminated arrays of pointers into live CStrings.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        libc::execve(exe.as_ptr(), argv.as_ptr(), env.as_ptr());
        libc::_exit(127)
    }
}

/// The wait(2) status word behind `status`, as the error message has always
/// shown it: exit code << 8, or the signal number (| 0x80 with a core).
fn raw_wait_status(status: WaitStatus) -> String {
    let raw = match status {
        WaitStatus::Exited(_, code) => code << 8,
        WaitStatus::Signaled(_, signal, core) => signal as i32 | if core { 0x80 } else { 0 },
        other => return format!("{other:?}"),
    };
    format!("{raw:#x}")
}
