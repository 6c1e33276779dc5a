//! `connect(2)` to a Unix stream socket within a time budget, shared by the
//! VMM API client ([`crate::api`]) and the QMP client ([`crate::qmp`]).
//!
//! A blocking connect to a listener whose backlog is full waits without
//! bound; here the socket is non-blocking while connecting, `EAGAIN` (what
//! Linux answers for a full `AF_UNIX` backlog) is retried until the
//! deadline, and the stream is handed back in blocking mode.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pause between connect attempts while the listener's backlog is full.
const BACKLOG_RETRY: Duration = Duration::from_micros(200);

/// Room in `sockaddr_un.sun_path` (108 bytes on Linux), terminating NUL
/// included.
const SUN_PATH_LEN: usize =
    std::mem::size_of::<libc::sockaddr_un>() - std::mem::offset_of!(libc::sockaddr_un, sun_path);

/// Connects to the stream socket at `path`, giving up after `budget` with
/// an error of kind [`io::ErrorKind::TimedOut`]. Other failures keep their
/// `errno` (`ENOENT`, `EACCES`, `ECONNREFUSED`, `ENOTSOCK`...); a path that
/// cannot be a socket address is [`io::ErrorKind::InvalidInput`].
pub fn connect(path: &Path, budget: Duration) -> io::Result<UnixStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path is empty, contains NUL or is longer than {} bytes",
                SUN_PATH_LEN.saturating_sub(1)
            ),
        ));
    }
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let owned = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io::Error::from)?;
    let deadline = Instant::now() + budget;
    loop {
        match connect(owned.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            // Backlog full (Linux answers EAGAIN for AF_UNIX): retry.
            Err(Errno::EAGAIN | Errno::EINPROGRESS) => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the listener's backlog stayed full",
                    ));
                }
                std::thread::sleep(BACKLOG_RETRY);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Why a connect to a socket path failed, where the path is to blame: the
/// one reading of `errno` both clients share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathFailure {
    /// Nothing at the path (`ENOENT`, `ENOTDIR`).
    Missing,
    /// `EACCES`.
    Denied,
    /// Something that is not a socket (`ENOTSOCK`, or refused on a
    /// non-socket).
    NotASocket,
    /// A socket nobody listens on (`ECONNREFUSED`).
    Refused,
}

/// The [`PathFailure`] `e` means for `path`, `None` for any other error.
pub fn path_failure(path: &Path, e: &io::Error) -> Option<PathFailure> {
    match e.kind() {
        io::ErrorKind::NotFound => Some(PathFailure::Missing),
        io::ErrorKind::PermissionDenied => Some(PathFailure::Denied),
        io::ErrorKind::ConnectionRefused => Some(if is_non_socket(path) {
            PathFailure::NotASocket
        } else {
            PathFailure::Refused
        }),
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => Some(PathFailure::Missing),
        _ if e.raw_os_error() == Some(libc::ENOTSOCK) => Some(PathFailure::NotASocket),
        _ => None,
    }
}

/// True when `path` exists and is not a socket.
fn is_non_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| !m.file_type().is_socket())
        .unwrap_or(false)
}
