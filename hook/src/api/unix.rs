//! A ureq 3 connector that speaks HTTP/1.1 over a Unix stream socket.
//!
//! ureq's transport layer (`ureq::unversioned::transport`) lets an agent be
//! built from a [`Connector`] that produces [`Transport`]s and a
//! [`Resolver`]. Here the connector ignores the URI's host and connects to a
//! fixed socket path; the resolver answers a placeholder address without any
//! name lookup (a real lookup of `localhost` would cost time inside the
//! blackout, and could spawn a thread).
//!
//! The connect phase honours a timeout of its own, measured from the
//! moment the connect starts, and ends only once the VMM has *taken* the
//! connection:
//!
//! - the socket is opened non-blocking, and while the listener's backlog is
//!   full (`EAGAIN`) the connect is retried until the deadline;
//! - a Unix stream connect succeeds as soon as the connection is queued on
//!   the listener, whether or not anybody ever calls `accept(2)`, and
//!   nothing on the client's side changes when someone does. So until the
//!   VMM has read some of the request (the socket's unread output,
//!   `SIOCOUTQ`, shrinks) or answered, the wait is bounded by the same
//!   deadline; a VMM that accepts nothing (stopped, or its API thread
//!   stuck) costs the connect timeout, not the whole request's.
//!
//! A connect phase that runs out before the request was written is
//! `Timeout::Connect` (nothing was sent). One that runs out after is a
//! [`NotAccepted`] I/O error: the request lies unread in the socket, where
//! a VMM that wakes up and accepts could still read it, so it counts as
//! sent. Once the VMM has taken the request, reads and writes honour
//! ureq's timeouts through `SO_RCVTIMEO` / `SO_SNDTIMEO`.

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

/// Longest single wait for readability while watching whether the VMM
/// takes the request (an answer ends the wait at once).
const TAKEN_POLL: StdDuration = StdDuration::from_millis(1);

/// The VMM did not take the connection within the connect timeout after
/// the request was written to it: nobody accepted it, or nobody read it.
/// Carried inside an `io::Error` of kind `TimedOut` (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAccepted {
    /// The connect timeout that ran out.
    pub connect_timeout: StdDuration,
}

impl std::fmt::Display for NotAccepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the VMM did not take the connection within {} ms: the request lies unread in the socket",
            self.connect_timeout.as_millis()
        )
    }
}

impl std::error::Error for NotAccepted {}

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
        // The connect phase, until the VMM takes the request, ends by the
        // connect timeout from now.
        let deadline = StdInstant::now() + self.connect_timeout;
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
            pending: Some(Pending {
                deadline,
                connect_timeout: self.connect_timeout,
                unread_after_write: None,
            }),
        };
        (details.register_shutdown)(transport.shutdown_handle())?;
        Ok(Some(transport))
    }
}

/// [`crate::unixsock::connect`] with its timeout as ureq's.
fn connect_with_timeout(path: &Path, budget: StdDuration) -> Result<UnixStream, Error> {
    crate::unixsock::connect(path, budget).map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            Error::Timeout(Timeout::Connect)
        } else {
            Error::Io(e)
        }
    })
}

/// One HTTP/1.1 connection over a Unix stream socket.
///
/// Invariant: `pending` is `Some` exactly until the VMM has been seen to
/// take the connection (read some of the request, or answer); while it is,
/// no read or write waits past its deadline.
pub struct UnixTransport {
    stream: Arc<Sock>,
    buffers: LazyBuffers,
    timeout_read: Option<StdDuration>,
    timeout_write: Option<StdDuration>,
    pending: Option<Pending>,
}

/// The connect phase, while the VMM has not yet taken the connection.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When the connect timeout, counted from the connect, runs out.
    deadline: StdInstant,
    connect_timeout: StdDuration,
    /// Unread bytes in the socket right after the last write: once fewer
    /// remain, the VMM has read some (`None`: nothing written yet).
    unread_after_write: Option<usize>,
}

impl Pending {
    fn not_accepted(&self) -> Error {
        Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            NotAccepted {
                connect_timeout: self.connect_timeout,
            },
        ))
    }
}

/// Bytes written to `stream` that its peer has not read yet (`SIOCOUTQ`).
fn unread_output(stream: &UnixStream) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // Raw libc: nix has no wrapper for SIOCOUTQ, and its ioctl macros would
    // only generate an `unsafe fn` around this same call.
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int through the pointer,
    // which points at `n` for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            stream.as_raw_fd(),
            libc::TIOCOUTQ,
            &mut n as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Waits up to `wait` for `stream` to become readable (an answer, or the
/// peer closing). True when it is.
fn readable_within(stream: &UnixStream, wait: StdDuration) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    // Round up so a sub-millisecond remainder still waits.
    let timeout =
        PollTimeout::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, timeout) {
            Ok(n) => {
                let [pfd] = &fds;
                // Any revents bit counts, including one nix has no name for.
                return Ok(n > 0 && pfd.any().unwrap_or(true));
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
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
        // While the VMM has not taken the connection, a write (which waits
        // only when the unread request fills the socket) ends by the
        // connect deadline.
        let mut next = timeout;
        let mut bounded_by_connect = false;
        if let Some(p) = &self.pending {
            let left = p.deadline.saturating_duration_since(StdInstant::now());
            if left.is_zero() {
                return Err(match p.unread_after_write {
                    Some(_) => p.not_accepted(),
                    None => Error::Timeout(Timeout::Connect),
                });
            }
            if next.not_zero().is_none_or(|d| left < *d) {
                next = NextTimeout {
                    after: left.into(),
                    ..timeout
                };
                bounded_by_connect = true;
            }
        }
        update_timeout(next, &mut self.timeout_write, |d| {
            stream.0.set_write_timeout(d)
        })?;
        let output = self.buffers.output();
        let chunk = output.get(..amount).ok_or_else(|| {
            Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "transmit amount beyond the output buffer",
            ))
        })?;
        let written = (&self.stream.0).write_all(chunk);
        if let Some(p) = &mut self.pending {
            // Something may have gone out even when the write failed.
            p.unread_after_write = Some(unread_output(&self.stream.0).unwrap_or(usize::MAX));
        }
        match written {
            Ok(()) => Ok(()),
            Err(e) if timed_out(&e) && bounded_by_connect => Err(self
                .pending
                .as_ref()
                .map_or(Error::Timeout(timeout.reason), Pending::not_accepted)),
            Err(e) if timed_out(&e) => Err(Error::Timeout(timeout.reason)),
            Err(e) => Err(Error::Io(e)),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.await_taken(timeout)?;
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

impl UnixTransport {
    /// While the connection is pending, waits until the VMM takes it: it
    /// has read some of the request (fewer unread bytes than right after
    /// the last write, or none), or there is something to read (an answer,
    /// or the peer closed). Fails with [`NotAccepted`] at the connect
    /// deadline, or with ureq's own timeout if that comes first.
    fn await_taken(&mut self, timeout: NextTimeout) -> Result<(), Error> {
        let Some(p) = self.pending else {
            return Ok(());
        };
        let started = StdInstant::now();
        let ureq_left = timeout.not_zero().map(|d| *d);
        let stream = &self.stream.0;
        loop {
            let unread = unread_output(stream).map_err(Error::Io)?;
            let taken = unread == 0 || p.unread_after_write.is_some_and(|after| unread < after);
            if taken {
                break;
            }
            let now = StdInstant::now();
            if ureq_left.is_some_and(|d| now.duration_since(started) >= d) {
                return Err(Error::Timeout(timeout.reason));
            }
            let left = p.deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(p.not_accepted());
            }
            if readable_within(stream, left.min(TAKEN_POLL)).map_err(Error::Io)? {
                break;
            }
        }
        self.pending = None;
        Ok(())
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
