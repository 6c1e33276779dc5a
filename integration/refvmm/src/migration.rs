//! Migration between two reference VMMs over a Unix socket or TCP.
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
//! TCP takes numeric addresses only (no name lookup). The sender needs a
//! unicast address; the receiver binds the address given (`0.0.0.0` or
//! `[::]` for every interface). There is no encryption or authentication:
//! this VMM is a test tool, for loopback and closed lab networks.

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

/// Which side of a migration a URL is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `vm.send-migration`: the address to connect to.
    Send,
    /// `vm.receive-migration`: the address to bind.
    Receive,
}

/// How long the sender tries to connect to the destination.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses `unix:/path` or `tcp:ADDR:PORT` (`tcp:[V6]:PORT`), numeric
/// addresses only, port not 0. A sender's address must be unicast and
/// specified; a receiver's may be unspecified (bind every interface) but not
/// multicast or broadcast.
pub fn parse_url(url: &str, direction: Direction) -> Result<Endpoint, String> {
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
        if addr.port() == 0 {
            return Err(format!("{url:?}: port 0"));
        }
        let ip = addr.ip();
        let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_multicast() || broadcast {
            return Err(format!(
                "{url:?}: a multicast or broadcast address cannot carry a migration"
            ));
        }
        if ip.is_unspecified() && direction == Direction::Send {
            return Err(format!(
                "{url:?}: an unspecified address ({ip}) is not a destination"
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
            Endpoint::Tcp(a) => TcpStream::connect_timeout(a, CONNECT_TIMEOUT)
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
        use Direction::{Receive, Send};
        for d in [Send, Receive] {
            assert_eq!(
                parse_url("unix:/tmp/m.sock", d),
                Ok(Endpoint::Unix("/tmp/m.sock".into()))
            );
            assert_eq!(
                parse_url("tcp:127.0.0.1:6000", d),
                Ok(Endpoint::Tcp("127.0.0.1:6000".parse().expect("addr")))
            );
            // A lab network address, both ways.
            assert_eq!(
                parse_url("tcp:169.254.77.2:6000", d),
                Ok(Endpoint::Tcp("169.254.77.2:6000".parse().expect("addr")))
            );
            assert_eq!(
                parse_url("tcp:[fe80::2]:6000", d),
                Ok(Endpoint::Tcp("[fe80::2]:6000".parse().expect("addr")))
            );
            assert!(parse_url("tcp:192.168.1.2:6000", d).is_ok());
            // Refused either way: names, port 0, no port, multicast,
            // broadcast, junk.
            for bad in [
                "tcp:localhost:6000",
                "tcp:169.254.77.2:0",
                "tcp:169.254.77.2",
                "tcp:224.0.0.1:6000",
                "tcp:[ff02::1]:6000",
                "tcp:255.255.255.255:6000",
                "tcp:169.254.77.2:99999",
                "tcp:",
                "unix:",
                "file:///x",
            ] {
                assert!(parse_url(bad, d).is_err(), "{bad} ({d:?})");
            }
        }
        // The receiver may bind every interface; nobody can send there.
        assert!(parse_url("tcp:0.0.0.0:6000", Receive).is_ok());
        assert!(parse_url("tcp:[::]:6000", Receive).is_ok());
        let e = parse_url("tcp:0.0.0.0:6000", Send).expect_err("unspecified");
        assert!(e.contains("unspecified"), "{e}");
        assert!(parse_url("tcp:[::]:6000", Send).is_err());
    }

    #[test]
    fn tcp_between_addresses_other_than_loopback_works() {
        // Any local non-loopback address will do; skip where there is none.
        let Some(ip) = local_non_loopback_ipv4() else {
            eprintln!("SKIP: no non-loopback IPv4 address here");
            return;
        };
        let listener = TcpListener::bind((ip, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = format!("tcp:{ip}:{port}");
        let rx = parse_url(&url, Direction::Receive).expect("receive url");
        let tx = parse_url(&url, Direction::Send).expect("send url");
        let receiver = std::thread::spawn(move || {
            let mut ch = Channel::accept(&rx).expect("accept");
            let mut b = [0u8; 4];
            ch.reader().read_exact(&mut b).expect("read");
            b
        });
        let mut sent = None;
        for _ in 0..200 {
            if let Ok(ch) = Channel::connect(&tx) {
                sent = Some(ch);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut ch = sent.expect("connect");
        ch.rw().write_all(b"ping").expect("write");
        assert_eq!(&receiver.join().expect("join"), b"ping");
    }

    fn local_non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
        // The source address of a route to a TEST-NET address (no packet is sent).
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect("192.0.2.1:9").ok()?;
        match s.local_addr().ok()?.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => Some(v4),
            _ => None,
        }
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
