//! Migration between two reference VMMs over a Unix socket or loopback TCP.
//!
//! Wire format (sender -> receiver), then one status byte back:
//!
//! 1. `CCMIGR01` (8 bytes);
//! 2. a little-endian u64 length and that many bytes of JSON [`Header`]
//!    (the [`VmSnapshot`] and how memory travels);
//! 3. memory: `inline` = all guest RAM, raw; `fd` (local migration, Unix
//!    socket only) = one byte carrying the memfd as SCM_RIGHTS;
//! 4. receiver -> sender: `0` = restored, or `1` + u32 length + message.
//!
//! TCP is refused for non-loopback addresses: this VMM is a test tool.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::state::VmSnapshot;

const MAGIC: &[u8; 8] = b"CCMIGR01";
/// Largest header accepted, bytes.
const MAX_HEADER_BYTES: u64 = 4 << 20;

/// Where a migration goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Parses `unix:/path` or `tcp:127.0.0.1:PORT` (loopback only).
pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    if let Some(path) = url.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!("{url:?}: empty socket path"));
        }
        return Ok(Endpoint::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = url.strip_prefix("tcp:") {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("{url:?}: not HOST:PORT with a numeric host ({e})"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{url:?}: only loopback addresses are accepted by the reference VMM"
            ));
        }
        return Ok(Endpoint::Tcp(addr));
    }
    Err(format!("{url:?}: expected unix:PATH or tcp:HOST:PORT"))
}

/// How guest memory travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryTransfer {
    Inline,
    Fd,
}

/// The JSON header of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub snapshot: VmSnapshot,
    pub memory: MemoryTransfer,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    Url(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { what, source }
}

/// A connected migration stream.
pub enum Channel {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Channel {
    fn rw(&mut self) -> &mut dyn ReadWrite {
        match self {
            Channel::Unix(s) => s,
            Channel::Tcp(s) => s,
        }
    }

    /// Connects to the destination.
    pub fn connect(endpoint: &Endpoint) -> Result<Channel, MigrationError> {
        match endpoint {
            Endpoint::Unix(p) => UnixStream::connect(p)
                .map(Channel::Unix)
                .map_err(io("connecting to the destination")),
            Endpoint::Tcp(a) => TcpStream::connect(a)
                .map(Channel::Tcp)
                .map_err(io("connecting to the destination")),
        }
    }

    /// Listens at `endpoint` and accepts one sender.
    pub fn accept(endpoint: &Endpoint) -> Result<Channel, MigrationError> {
        match endpoint {
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let listener = UnixListener::bind(p).map_err(io("binding the receiver socket"))?;
                let (s, _) = listener.accept().map_err(io("accepting the sender"))?;
                let _ = std::fs::remove_file(p);
                Ok(Channel::Unix(s))
            }
            Endpoint::Tcp(a) => {
                let listener = TcpListener::bind(a).map_err(io("binding the receiver socket"))?;
                let (s, _) = listener.accept().map_err(io("accepting the sender"))?;
                Ok(Channel::Tcp(s))
            }
        }
    }

    /// Sends the header and memory (`memory_fd` for local, else `write_memory`).
    pub fn send(
        &mut self,
        header: &Header,
        memory_fd: Option<BorrowedFd<'_>>,
        write_memory: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), MigrationError> {
        let json = serde_json::to_vec(header)
            .map_err(|e| MigrationError::Protocol(format!("header: {e}")))?;
        let s = self.rw();
        s.write_all(MAGIC).map_err(io("sending the header"))?;
        s.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io("sending the header"))?;
        s.write_all(&json).map_err(io("sending the header"))?;
        match (header.memory, memory_fd, &*self) {
            (MemoryTransfer::Fd, Some(fd), Channel::Unix(sock)) => send_fd(sock, fd)?,
            (MemoryTransfer::Inline, _, _) => {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, self.rw());
                write_memory(&mut w).map_err(io("sending guest memory"))?;
                w.flush().map_err(io("sending guest memory"))?;
            }
            _ => {
                return Err(MigrationError::Protocol(
                    "local migration needs a unix: URL".into(),
                ))
            }
        }
        let mut status = [0u8; 1];
        self.rw()
            .read_exact(&mut status)
            .map_err(io("waiting for the destination"))?;
        if status[0] == 0 {
            return Ok(());
        }
        let mut len = [0u8; 4];
        let s = self.rw();
        s.read_exact(&mut len).map_err(io("reading the refusal"))?;
        let len = u32::from_le_bytes(len).min(64 * 1024);
        let mut msg = vec![0u8; usize::try_from(len).unwrap_or(0)];
        s.read_exact(&mut msg).map_err(io("reading the refusal"))?;
        Err(MigrationError::Refused(
            String::from_utf8_lossy(&msg).into_owned(),
        ))
    }

    /// Reads the header; then the caller takes the memory with
    /// [`Channel::receive_fd`] or [`Channel::reader`] and answers with
    /// [`Channel::answer`].
    pub fn receive_header(&mut self) -> Result<Header, MigrationError> {
        let s = self.rw();
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic).map_err(io("reading the header"))?;
        if &magic != MAGIC {
            return Err(MigrationError::Protocol("bad magic".into()));
        }
        let mut len = [0u8; 8];
        s.read_exact(&mut len).map_err(io("reading the header"))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER_BYTES {
            return Err(MigrationError::Protocol(format!("header of {len} bytes")));
        }
        let mut json = vec![0u8; usize::try_from(len).unwrap_or(0)];
        s.read_exact(&mut json).map_err(io("reading the header"))?;
        let header: Header = serde_json::from_slice(&json)
            .map_err(|e| MigrationError::Protocol(format!("header: {e}")))?;
        header
            .snapshot
            .validate()
            .map_err(MigrationError::Protocol)?;
        Ok(header)
    }

    /// The stream, to read inline memory from.
    pub fn reader(&mut self) -> &mut dyn Read {
        self.rw()
    }

    /// Receives the memfd of a local migration.
    pub fn receive_fd(&mut self) -> Result<OwnedFd, MigrationError> {
        match self {
            Channel::Unix(s) => recv_fd(s),
            Channel::Tcp(_) => Err(MigrationError::Protocol(
                "a memory fd cannot travel over TCP".into(),
            )),
        }
    }

    /// Tells the sender whether the VM was restored.
    pub fn answer(&mut self, result: &Result<(), String>) -> Result<(), MigrationError> {
        let s = self.rw();
        match result {
            Ok(()) => s.write_all(&[0]),
            Err(msg) => {
                let bytes = msg.as_bytes();
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                s.write_all(&[1])
                    .and_then(|_| s.write_all(&len.to_le_bytes()))
                    .and_then(|_| s.write_all(bytes))
            }
        }
        .map_err(io("answering the sender"))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The one data byte that carries the memfd.
const FD_BYTE: u8 = b'M';

fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>) -> Result<(), MigrationError> {
    let byte = [FD_BYTE];
    let fds = [fd.as_raw_fd()];
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&byte)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
    match sent {
        Ok(1) => Ok(()),
        Ok(n) => Err(MigrationError::Protocol(format!(
            "sending the memory fd: {n} bytes sent"
        ))),
        Err(e) => Err(MigrationError::Io {
            what: "sending the memory fd",
            source: e.into(),
        }),
    }
}

fn recv_fd(sock: &UnixStream) -> Result<OwnedFd, MigrationError> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    // Room for a few descriptors: extra ones a sender passed are closed
    // here rather than the message truncated.
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| MigrationError::Io {
        what: "receiving the memory fd",
        source: e.into(),
    })?;
    let bytes = msg.bytes;
    // A truncated control message (more descriptors than `space` holds) is
    // an error here (ENOBUFS).
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg
        .cmsgs()
        .map_err(|e| MigrationError::Protocol(format!("the memory fd's control message: {e}")))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process for this message; nothing else owns it.
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if bytes != 1 {
        return Err(MigrationError::Io {
            what: "receiving the memory fd",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    // The first descriptor is the memory; any others are closed on drop.
    received
        .into_iter()
        .next()
        .ok_or_else(|| MigrationError::Protocol("no memory fd received".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("unix:/tmp/m.sock"),
            Ok(Endpoint::Unix("/tmp/m.sock".into()))
        );
        assert!(matches!(
            parse_url("tcp:127.0.0.1:6000"),
            Ok(Endpoint::Tcp(_))
        ));
        assert!(parse_url("tcp:192.168.1.2:6000").is_err());
        assert!(parse_url("tcp:localhost:6000").is_err());
        assert!(parse_url("unix:").is_err());
        assert!(parse_url("file:///x").is_err());
    }

    #[test]
    fn fd_passing() {
        let (a, b) = UnixStream::pair().expect("pair");
        let ram = crate::memory::GuestRam::new(4096).expect("memfd");
        ram.write(8, &[7]).expect("write");
        send_fd(&a, ram.fd()).expect("send");
        let fd = recv_fd(&b).expect("recv");
        let again = crate::memory::GuestRam::from_fd(fd, 4096).expect("map");
        let mut x = [0u8; 1];
        again.read(8, &mut x).expect("read");
        assert_eq!(x, [7]);
    }

    #[test]
    fn a_byte_without_an_fd_is_refused() {
        let (mut a, b) = UnixStream::pair().expect("pair");
        a.write_all(&[FD_BYTE]).expect("write");
        assert!(matches!(recv_fd(&b), Err(MigrationError::Protocol(_))));
        drop(a);
        assert!(matches!(recv_fd(&b), Err(MigrationError::Io { .. })));
    }

    #[test]
    fn the_first_of_several_fds_is_the_memory() {
        let (a, b) = UnixStream::pair().expect("pair");
        let ram = crate::memory::GuestRam::new(4096).expect("memfd");
        ram.write(8, &[5]).expect("write");
        let other = crate::memory::GuestRam::new(4096).expect("memfd");
        let fds = [ram.fd().as_raw_fd(), other.fd().as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&[FD_BYTE])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        let fd = recv_fd(&b).expect("recv");
        let again = crate::memory::GuestRam::from_fd(fd, 4096).expect("map");
        let mut x = [0u8; 1];
        again.read(8, &mut x).expect("read");
        assert_eq!(x, [5]);
    }
}
