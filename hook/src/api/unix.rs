//! A ureq 3 connector that speaks HTTP/1.1 over a Unix stream socket.
//!
//! ureq's transport layer (`ureq::unversioned::transport`) lets an agent be
//! built from a [`Connector`] that produces [`Transport`]s and a
//! [`Resolver`]. Here the connector ignores the URI's host and connects to a
//! fixed socket path; the resolver answers a placeholder address without any
//! name lookup (a real lookup of `localhost` would cost time inside the
//! blackout, and could spawn a thread).
//!
//! The connect honours a timeout of its own: the socket is opened
//! non-blocking, and while the listener's backlog is full (`EAGAIN`) the
//! connect is retried until the deadline. Reads and writes honour ureq's
//! timeouts through `SO_RCVTIMEO` / `SO_SNDTIMEO`.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration as StdDuration, Instant as StdInstant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};
use ureq::{Error, Timeout};

/// Pause between connect attempts while the listener's backlog is full.
const BACKLOG_RETRY: StdDuration = StdDuration::from_micros(200);

/// Connects every request of an agent to one Unix socket.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
    connect_timeout: StdDuration,
}

impl UnixConnector {
    /// A connector for the socket at `path`; a connect that cannot complete
    /// within `connect_timeout` fails with `Timeout::Connect`.
    pub fn new(path: impl Into<PathBuf>, connect_timeout: StdDuration) -> UnixConnector {
        UnixConnector {
            path: path.into(),
            connect_timeout,
        }
    }
}

impl Connector<()> for UnixConnector {
    type Out = UnixTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Self::Out>, Error> {
        // The tighter of ureq's own budget and the connect timeout.
        let budget = match details.timeout.not_zero() {
            Some(d) => (*d).min(self.connect_timeout),
            None => self.connect_timeout,
        };
        let stream = connect_with_timeout(&self.path, budget)?;
        let config = details.config;
        let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
        let transport = UnixTransport {
            stream: Arc::new(Sock(stream)),
            buffers,
            timeout_read: None,
            timeout_write: None,
        };
        (details.register_shutdown)(transport.shutdown_handle())?;
        Ok(Some(transport))
    }
}

/// `connect(2)` on a non-blocking `AF_UNIX` stream socket, retried while the
/// backlog is full, then switched back to blocking mode.
fn connect_with_timeout(path: &Path, budget: StdDuration) -> Result<UnixStream, Error> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Leave room for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path is empty, contains NUL or is longer than {} bytes",
                addr.sun_path.len().saturating_sub(1)
            ),
        )));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src.to_ne_bytes()[0] as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(Error::Io(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let deadline = StdInstant::now() + budget;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the call.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Backlog full (Linux answers EAGAIN for AF_UNIX): retry.
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => {
                if StdInstant::now() >= deadline {
                    return Err(Error::Timeout(Timeout::Connect));
                }
                std::thread::sleep(BACKLOG_RETRY);
            }
            _ => return Err(Error::Io(err)),
        }
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false).map_err(Error::Io)?;
    Ok(stream)
}

/// One HTTP/1.1 connection over a Unix stream socket.
pub struct UnixTransport {
    stream: Arc<Sock>,
    buffers: LazyBuffers,
    timeout_read: Option<StdDuration>,
    timeout_write: Option<StdDuration>,
}

impl std::fmt::Debug for UnixTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixTransport").finish_non_exhaustive()
    }
}

/// The socket, shared (weakly) with ureq's shutdown machinery.
struct Sock(UnixStream);

impl ShutdownHandle for Sock {
    fn shutdown(&self) {
        // An error means the socket is already shut down or closed.
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

impl UnixTransport {
    fn shutdown_handle(&self) -> Weak<dyn ShutdownHandle> {
        let strong: Arc<dyn ShutdownHandle> = Arc::clone(&self.stream) as Arc<dyn ShutdownHandle>;
        Arc::downgrade(&strong)
    }
}

/// Applies ureq's next timeout to the socket only when it changed.
fn update_timeout(
    timeout: NextTimeout,
    previous: &mut Option<StdDuration>,
    set: impl FnOnce(Option<StdDuration>) -> io::Result<()>,
) -> Result<(), Error> {
    if timeout.after.is_zero() {
        return Err(Error::Timeout(timeout.reason));
    }
    let wanted = timeout.not_zero().map(|d| *d);
    if wanted != *previous {
        set(wanted).map_err(Error::Io)?;
        *previous = wanted;
    }
    Ok(())
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Transport for UnixTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let timeout = timeout.for_write();
        let stream = Arc::clone(&self.stream);
        update_timeout(timeout, &mut self.timeout_write, |d| {
            stream.0.set_write_timeout(d)
        })?;
        let output = self.buffers.output();
        let chunk = output.get(..amount).ok_or_else(|| {
            Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "transmit amount beyond the output buffer",
            ))
        })?;
        match (&self.stream.0).write_all(chunk) {
            Ok(()) => Ok(()),
            Err(e) if timed_out(&e) => Err(Error::Timeout(timeout.reason)),
            Err(e) => Err(Error::Io(e)),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let timeout = timeout.for_read();
        let stream = Arc::clone(&self.stream);
        update_timeout(timeout, &mut self.timeout_read, |d| {
            stream.0.set_read_timeout(d)
        })?;
        let input = self.buffers.input_append_buf();
        let amount = loop {
            match (&self.stream.0).read(input) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if timed_out(&e) => return Err(Error::Timeout(timeout.reason)),
                Err(e) => return Err(Error::Io(e)),
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        // Connections are never pooled by this client (max_idle_connections
        // is 0), so a transport is asked only while in use. Probe anyway:
        // a non-blocking read that would block means open and idle.
        let stream = &self.stream.0;
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 1];
        let open = matches!(
            (&*stream).read(&mut buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        );
        stream.set_nonblocking(false).is_ok() && open
    }
}

/// A resolver that resolves nothing: the connector ignores the address.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoResolver;

impl Resolver for NoResolver {
    fn resolve(
        &self,
        _uri: &Uri,
        _config: &Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, Error> {
        let mut addrs = self.empty();
        addrs.push(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80)));
        Ok(addrs)
    }
}
