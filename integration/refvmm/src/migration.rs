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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

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
        memory_fd: Option<&OwnedFd>,
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

const FD_SPACE: usize = 64;

fn send_fd(sock: &UnixStream, fd: &OwnedFd) -> Result<(), MigrationError> {
    let mut byte = [b'M'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut space = [0u8; FD_SPACE];
    // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: msg_control points at FD_SPACE >= CMSG_SPACE(4) writable bytes,
    // so the first header and its 4 data bytes lie inside `space`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(MigrationError::Protocol("no room for the fd".into()));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd.as_raw_fd());
    }
    // SAFETY: `msg` and everything it points to live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n != 1 {
        return Err(MigrationError::Io {
            what: "sending the memory fd",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn recv_fd(sock: &UnixStream) -> Result<OwnedFd, MigrationError> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut space = [0u8; FD_SPACE];
    // SAFETY: msghdr is plain data; all-zero is valid before we fill it.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = FD_SPACE;
    // SAFETY: `msg` points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n != 1 {
        return Err(MigrationError::Io {
            what: "receiving the memory fd",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel filled msg_control (within FD_SPACE); CMSG_* walk
    // it within msg_controllen.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(MigrationError::Protocol("no memory fd received".into()));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        if fd < 0 {
            return Err(MigrationError::Protocol("invalid memory fd".into()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
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
}
