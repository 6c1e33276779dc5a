//! The offset exchange's messages: line-delimited JSON over TCP, each line
//! length-capped, every message bound to its session, its direction and
//! its place in the sequence, and authenticated with the sidecar key.
//!
//! A line is one [`Envelope`]:
//!
//! ```text
//! {"v":1,"dir":"source-to-destination","nonce_s":"<64 hex>","nonce_d":"<64 hex>"|null,
//!  "seq":3,"msg":{"type":"ping","round":2},"mac":"<64 hex>"|null}
//! ```
//!
//! `mac` = HMAC-SHA256(key, [`MAC_DOMAIN`] || v || dir || nonce_s ||
//! nonce_d || seq || msg), every part length-prefixed or fixed-width, `msg`
//! as its canonical JSON (re-serialised after a strict parse, like the
//! sidecar's digest, so every field the receiver acts on is covered).
//! Receivers check, in order: size, JSON, version, direction, nonces (the
//! session), the key ids of a hello, the MAC, the sequence number. See
//! docs/offset-exchange.md.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::Mac;
use serde::{Deserialize, Serialize};

use super::PeerError;
use crate::sidecar::key::{ct_eq, hex_lower, parse_hex_32};
use crate::sidecar::{SidecarKey, MAX_SIDECAR_BYTES};

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest line of any message but a sidecar, bytes (newline included).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Longest line carrying a sidecar: the sidecar as a JSON string (at most
/// twice its size once escaped) and the envelope.
pub const MAX_SIDECAR_MESSAGE_BYTES: usize = 2 * MAX_SIDECAR_BYTES + MAX_MESSAGE_BYTES;
/// Size of each side's nonce, bytes.
pub const NONCE_BYTES: usize = 32;
/// Domain separation of the messages' MACs.
pub const MAC_DOMAIN: &[u8] = b"clockcarry-offset-exchange\0";
/// Longest error text a peer may send, bytes.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;

/// Who sends a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The source host (`capture --peer`) to the destination (`serve`).
    SourceToDestination,
    /// The destination to the source.
    DestinationToSource,
}

impl Direction {
    /// The label in `dir`, covered by the MAC.
    pub fn label(self) -> &'static str {
        match self {
            Direction::SourceToDestination => "source-to-destination",
            Direction::DestinationToSource => "destination-to-source",
        }
    }

    fn reverse(self) -> Direction {
        match self {
            Direction::SourceToDestination => Direction::DestinationToSource,
            Direction::DestinationToSource => Direction::SourceToDestination,
        }
    }
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Body {
    /// Source, seq 0: opens a session with its nonce.
    Hello { key_id: Option<String> },
    /// Destination, seq 0: its nonce (in the envelope) and key id.
    Welcome { key_id: Option<String> },
    /// Source: round `round` of the measurement.
    Ping { round: u32 },
    /// Destination: when the ping arrived and when this answer left, on
    /// its CLOCK_TAI, and its clock-read uncertainty.
    Pong {
        round: u32,
        t2_tai_ns: u64,
        t3_tai_ns: u64,
        read_uncertainty_ns: u64,
    },
    /// Source: the sealed sidecar of VM `vm_id`, its exact bytes as text.
    Sidecar { vm_id: String, sidecar: String },
    /// Destination: the sidecar was validated and written.
    Stored { vm_id: String, sha256: String },
    /// Source: the session is over.
    Done,
    /// Destination: acknowledges `Done`.
    Bye,
    /// Either side: why it ends the session.
    Error { message: String },
}

impl Body {
    /// The message's type, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "hello",
            Body::Welcome { .. } => "welcome",
            Body::Ping { .. } => "ping",
            Body::Pong { .. } => "pong",
            Body::Sidecar { .. } => "sidecar",
            Body::Stored { .. } => "stored",
            Body::Done => "done",
            Body::Bye => "bye",
            Body::Error { .. } => "error",
        }
    }
}

/// One line on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u32,
    pub dir: String,
    pub nonce_s: String,
    /// `None` only in the source's hello (the destination has not chosen
    /// its nonce yet).
    pub nonce_d: Option<String>,
    pub seq: u64,
    pub msg: Body,
    /// `None` only in a session without a key (`--insecure-no-key`).
    pub mac: Option<String>,
}

/// One side's view of a session: both nonces, the key, both sequences.
#[derive(Debug)]
pub struct Session {
    sends: Direction,
    nonce_s: Option<[u8; NONCE_BYTES]>,
    nonce_d: Option<[u8; NONCE_BYTES]>,
    key: Option<SidecarKey>,
    send_seq: u64,
    recv_seq: u64,
}

/// Fresh random bytes from the kernel (`/dev/urandom`).
pub fn random_nonce() -> Result<[u8; NONCE_BYTES], PeerError> {
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut nonce))
        .map_err(|source| PeerError::Io {
            what: "reading /dev/urandom for a nonce",
            source,
        })?;
    Ok(nonce)
}

impl Session {
    /// The source's side, with its fresh nonce.
    pub fn source(key: Option<SidecarKey>) -> Result<Session, PeerError> {
        Ok(Session {
            sends: Direction::SourceToDestination,
            nonce_s: Some(random_nonce()?),
            nonce_d: None,
            key,
            send_seq: 0,
            recv_seq: 0,
        })
    }

    /// The destination's side, with its fresh nonce (the source's arrives
    /// with its hello).
    pub fn destination(key: Option<SidecarKey>) -> Result<Session, PeerError> {
        Ok(Session {
            sends: Direction::DestinationToSource,
            nonce_s: None,
            nonce_d: Some(random_nonce()?),
            key,
            send_seq: 0,
            recv_seq: 0,
        })
    }

    /// The id of this side's key, if it has one.
    pub fn key_id(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.id().to_string())
    }

    /// The next message as a line (newline included), sealed.
    pub fn seal(&mut self, msg: Body) -> Result<Vec<u8>, PeerError> {
        let nonce_s = self.nonce_s.ok_or(PeerError::Protocol {
            reason: "no session nonce yet".into(),
        })?;
        let mac = match &self.key {
            Some(key) => Some(hex_lower(&mac_of(
                key,
                self.sends,
                &nonce_s,
                self.nonce_d.as_ref(),
                self.send_seq,
                &msg,
            )?)),
            None => None,
        };
        let envelope = Envelope {
            v: PROTOCOL_VERSION,
            dir: self.sends.label().to_string(),
            nonce_s: hex_lower(&nonce_s),
            nonce_d: self.nonce_d.as_ref().map(|n| hex_lower(n)),
            seq: self.send_seq,
            msg,
            mac,
        };
        let mut line = serde_json::to_vec(&envelope).map_err(|e| PeerError::Protocol {
            reason: format!("cannot encode a message: {e}"),
        })?;
        line.push(b'\n');
        self.send_seq = self.send_seq.saturating_add(1);
        Ok(line)
    }

    /// Checks one received line and returns what it says.
    pub fn open(&mut self, line: &[u8]) -> Result<Body, PeerError> {
        let envelope: Envelope =
            serde_json::from_slice(line).map_err(|e| PeerError::Malformed {
                reason: clip(&e.to_string()),
            })?;
        if envelope.v != PROTOCOL_VERSION {
            return Err(PeerError::Version { got: envelope.v });
        }
        let expected = self.sends.reverse();
        if envelope.dir != expected.label() {
            return Err(PeerError::Direction {
                got: clip(&envelope.dir),
                expected: expected.label(),
            });
        }
        self.bind_nonces(&envelope)?;
        if let Body::Hello { key_id } | Body::Welcome { key_id } = &envelope.msg {
            if *key_id != self.key_id() {
                return Err(PeerError::KeyMismatch {
                    ours: self.key_id(),
                    theirs: key_id.as_deref().map(clip),
                });
            }
        }
        if let Err(e) = self.verify_mac(&envelope) {
            if let Body::Error { message } = &envelope.msg {
                return Err(PeerError::PeerRefused {
                    message: clip(message),
                    authenticated: false,
                });
            }
            return Err(e);
        }
        if envelope.seq != self.recv_seq {
            return Err(PeerError::Sequence {
                expected: self.recv_seq,
                got: envelope.seq,
            });
        }
        self.recv_seq = self.recv_seq.saturating_add(1);
        if let Body::Error { message } = envelope.msg {
            return Err(PeerError::PeerRefused {
                message: clip(&message),
                authenticated: self.key.is_some(),
            });
        }
        Ok(envelope.msg)
    }

    /// The envelope's nonces must be this session's; the first message
    /// from the other side brings its nonce.
    fn bind_nonces(&mut self, envelope: &Envelope) -> Result<(), PeerError> {
        let nonce_s = parse_nonce("nonce_s", Some(&envelope.nonce_s))?;
        let nonce_d = match &envelope.nonce_d {
            Some(text) => Some(parse_nonce("nonce_d", Some(text))?),
            None => None,
        };
        match self.nonce_s {
            None => self.nonce_s = Some(nonce_s),
            Some(ours) if ct_eq(&ours, &nonce_s) => {}
            Some(_) => return Err(PeerError::OtherSession { field: "nonce_s" }),
        }
        match (self.nonce_d, nonce_d) {
            // The source's hello: the destination's nonce is not chosen yet.
            (Some(_), None)
                if self.recv_seq == 0 && self.sends == Direction::DestinationToSource =>
            {
                Ok(())
            }
            (None, Some(theirs)) if self.sends == Direction::SourceToDestination => {
                self.nonce_d = Some(theirs);
                Ok(())
            }
            (Some(ours), Some(theirs)) if ct_eq(&ours, &theirs) => Ok(()),
            _ => Err(PeerError::OtherSession { field: "nonce_d" }),
        }
    }

    fn verify_mac(&self, envelope: &Envelope) -> Result<(), PeerError> {
        let Some(key) = &self.key else {
            if envelope.mac.is_some() {
                return Err(PeerError::KeyMismatch {
                    ours: None,
                    theirs: Some("(the peer authenticates its messages)".into()),
                });
            }
            return Ok(());
        };
        let text = envelope.mac.as_deref().ok_or(PeerError::MacMissing {
            kind: envelope.msg.kind(),
        })?;
        let stated = parse_hex_32(text).ok_or(PeerError::MacMismatch {
            kind: envelope.msg.kind(),
            seq: envelope.seq,
        })?;
        let nonce_s = self
            .nonce_s
            .ok_or(PeerError::OtherSession { field: "nonce_s" })?;
        let nonce_d = if envelope.nonce_d.is_some() {
            self.nonce_d
        } else {
            None
        };
        let actual = mac_of(
            key,
            self.sends.reverse(),
            &nonce_s,
            nonce_d.as_ref(),
            envelope.seq,
            &envelope.msg,
        )?;
        if !ct_eq(&stated, &actual) {
            return Err(PeerError::MacMismatch {
                kind: envelope.msg.kind(),
                seq: envelope.seq,
            });
        }
        Ok(())
    }
}

fn parse_nonce(field: &'static str, text: Option<&String>) -> Result<[u8; 32], PeerError> {
    text.and_then(|t| parse_hex_32(t))
        .ok_or(PeerError::Malformed {
            reason: format!("`{field}` is not 64 lowercase hex digits"),
        })
}

/// HMAC-SHA256 over the message's parts, each fixed-width or length-prefixed.
fn mac_of(
    key: &SidecarKey,
    dir: Direction,
    nonce_s: &[u8; NONCE_BYTES],
    nonce_d: Option<&[u8; NONCE_BYTES]>,
    seq: u64,
    msg: &Body,
) -> Result<[u8; 32], PeerError> {
    let body = serde_json::to_vec(msg).map_err(|e| PeerError::Protocol {
        reason: format!("cannot encode a message: {e}"),
    })?;
    let mut mac = key.mac().map_err(|e| PeerError::Protocol {
        reason: e.to_string(),
    })?;
    let mut part = |bytes: &[u8]| {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        mac.update(&len.to_be_bytes());
        mac.update(bytes);
    };
    part(MAC_DOMAIN);
    part(&PROTOCOL_VERSION.to_be_bytes());
    part(dir.label().as_bytes());
    part(nonce_s);
    part(nonce_d.map_or(&[][..], |n| &n[..]));
    part(&seq.to_be_bytes());
    part(&body);
    Ok(mac.finalize().into_bytes().into())
}

/// At most [`MAX_ERROR_TEXT_BYTES`] of `s`, cut on a character boundary,
/// control characters replaced.
pub fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR_TEXT_BYTES);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end)
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A TCP connection read and written line by line, every read and write
/// bounded by `timeout`.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    pub fn new(stream: TcpStream, timeout: Duration) -> Result<Conn, PeerError> {
        let io = |source| PeerError::Io {
            what: "setting up the connection",
            source,
        };
        stream.set_nodelay(true).map_err(io)?;
        stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(io)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            timeout,
        })
    }

    /// The next line (without its newline), at most `max_bytes` long,
    /// complete within the timeout.
    pub fn read_line(
        &mut self,
        max_bytes: usize,
        waiting_for: &'static str,
    ) -> Result<Vec<u8>, PeerError> {
        let deadline = Instant::now() + self.timeout;
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                if at >= max_bytes {
                    return Err(PeerError::TooLong { max_bytes });
                }
                let mut line: Vec<u8> = self.buf.drain(..=at).collect();
                line.pop();
                return Ok(line);
            }
            if self.buf.len() >= max_bytes {
                return Err(PeerError::TooLong { max_bytes });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PeerError::Timeout {
                    waiting_for,
                    after_ms: ms(self.timeout),
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| PeerError::Io {
                    what: "setting the read timeout",
                    source,
                })?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(PeerError::Closed { waiting_for }),
                Ok(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(PeerError::Timeout {
                        waiting_for,
                        after_ms: ms(self.timeout),
                    })
                }
                Err(source) => {
                    return Err(PeerError::Io {
                        what: "reading from the peer",
                        source,
                    })
                }
            }
        }
    }

    /// Writes one line (newline included) within the timeout.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), PeerError> {
        self.stream
            .write_all(line)
            .and_then(|()| self.stream.flush())
            .map_err(|source| {
                if is_timeout(&source) {
                    PeerError::Timeout {
                        waiting_for: "the peer to take a message",
                        after_ms: ms(self.timeout),
                    }
                } else {
                    PeerError::Io {
                        what: "writing to the peer",
                        source,
                    }
                }
            })
    }
}
