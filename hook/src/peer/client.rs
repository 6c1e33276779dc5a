//! The source's side of the exchange: connect, hello, the measurement
//! rounds, optionally the sidecar, done.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::estimate::{estimate, Estimate, Sample, MAX_ROUNDS};
use super::wire::{Body, Conn, Session, MAX_MESSAGE_BYTES};
use super::PeerError;
use crate::host::{tai_now_ns, CLOCK_RESOLUTION_NS};
use crate::sidecar::SidecarKey;

/// How to reach the destination and how long to wait for it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// For the TCP connection (all addresses the name resolves to).
    pub connect_timeout: Duration,
    /// For each answer.
    pub timeout: Duration,
    /// The sidecar key; `None` only for an explicitly insecure exchange.
    pub key: Option<SidecarKey>,
}

/// How many rounds an exchange runs. A shared or busy network delays some
/// rounds by whole scheduler slices; spaced rounds sample other moments,
/// and the bound is half the best round trip, so more rounds only tighten
/// it. On a quiet LAN the goal is met within `min_rounds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundPlan {
    /// Rounds always run, back to back (at least 1).
    pub min_rounds: u32,
    /// Rounds run at most (`min_rounds` to [`MAX_ROUNDS`]).
    pub max_rounds: u32,
    /// Past `min_rounds`, stop as soon as the bound is at most this, ns.
    pub goal_bound_ns: u64,
    /// The pause before each round past `min_rounds`.
    pub spacing: Duration,
}

/// The pause between the extra rounds of a [`RoundPlan`] by default.
pub const DEFAULT_SPACING: Duration = Duration::from_millis(2);

impl RoundPlan {
    /// Exactly `rounds` rounds.
    pub fn fixed(rounds: u32) -> RoundPlan {
        RoundPlan {
            min_rounds: rounds,
            max_rounds: rounds,
            goal_bound_ns: u64::MAX,
            spacing: Duration::ZERO,
        }
    }

    /// Refuses rounds outside 1 to [`MAX_ROUNDS`] and a maximum below the
    /// minimum, before anything is sent.
    pub fn validate(&self) -> Result<(), PeerError> {
        let bad = |reason: String| Err(PeerError::Protocol { reason });
        if self.min_rounds == 0 || self.min_rounds > MAX_ROUNDS {
            return bad(format!(
                "{} rounds: an exchange has 1 to {MAX_ROUNDS}",
                self.min_rounds
            ));
        }
        if self.max_rounds < self.min_rounds || self.max_rounds > MAX_ROUNDS {
            return bad(format!(
                "at most {} rounds: give {} to {MAX_ROUNDS} (not fewer than the rounds always run)",
                self.max_rounds, self.min_rounds
            ));
        }
        Ok(())
    }
}

/// An open, authenticated session with the destination.
#[derive(Debug)]
pub struct PeerClient {
    conn: Conn,
    session: Session,
    /// The address connected to.
    pub peer_addr: SocketAddr,
}

/// The destination's acknowledgement of a sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub vm_id: String,
    pub sha256: String,
}

/// `HOST:PORT` to socket addresses; the port must be 1 to 65535.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>, PeerError> {
    let bad = |reason: String| PeerError::Address {
        addr: super::wire::clip(addr),
        reason,
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT".into()))?;
    if host.is_empty() {
        return Err(bad("the host is empty".into()));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad(format!("port {port:?} is not 1 to 65535"))),
    }
    let found: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve: {e}")))?
        .collect();
    if found.is_empty() {
        return Err(bad("resolves to no address".into()));
    }
    Ok(found)
}

fn connect(addr: &str, timeout: Duration) -> Result<(TcpStream, SocketAddr), PeerError> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for a in resolve(addr)? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => return Ok((s, a)),
            Err(e) => last = Some(e),
        }
    }
    let after_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    Err(match last {
        Some(e) if !matches!(e.kind(), std::io::ErrorKind::TimedOut) => PeerError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        },
        _ => PeerError::ConnectTimeout {
            addr: addr.to_string(),
            after_ms,
        },
    })
}

impl PeerClient {
    /// Connects to `addr` (`HOST:PORT`) and opens a session: hello with
    /// this side's nonce, welcome with the destination's.
    pub fn connect(addr: &str, opts: &ClientOptions) -> Result<PeerClient, PeerError> {
        let (stream, peer_addr) = connect(addr, opts.connect_timeout)?;
        let conn = Conn::new(stream, opts.timeout)?;
        let session = Session::source(opts.key.clone())?;
        let mut client = PeerClient {
            conn,
            session,
            peer_addr,
        };
        let key_id = client.session.key_id();
        match client.call(Body::Hello { key_id }, "the welcome")? {
            Body::Welcome { .. } => Ok(client),
            other => Err(unexpected("welcome", &other)),
        }
    }

    fn call(&mut self, msg: Body, waiting_for: &'static str) -> Result<Body, PeerError> {
        let line = self.session.seal(msg)?;
        self.conn.write_line(&line)?;
        let answer = self.conn.read_line(MAX_MESSAGE_BYTES, waiting_for)?;
        self.session.open(&answer)
    }

    /// Exactly `rounds` measurement rounds (1 to [`MAX_ROUNDS`]) and their
    /// estimate.
    pub fn measure(&mut self, rounds: u32) -> Result<(Vec<Sample>, Estimate), PeerError> {
        self.measure_until(&RoundPlan::fixed(rounds))
    }

    /// The rounds `plan` asks for and their estimate: `min_rounds` back to
    /// back, then one more every `spacing` while the estimate's bound is
    /// above `goal_bound_ns`, up to `max_rounds`. Every estimate along the
    /// way is checked whole, so a clock stepped at any round is refused.
    pub fn measure_until(
        &mut self,
        plan: &RoundPlan,
    ) -> Result<(Vec<Sample>, Estimate), PeerError> {
        plan.validate()?;
        let mut samples = Vec::new();
        let realtime = super::sched::enter_logged("source");
        for round in 0..plan.min_rounds {
            samples.push(self.round(round)?);
        }
        let mut e = estimate(&samples)?;
        let mut round = plan.min_rounds;
        while e.bound_ns > plan.goal_bound_ns && round < plan.max_rounds {
            std::thread::sleep(plan.spacing);
            samples.push(self.round(round)?);
            e = estimate(&samples)?;
            round = round.saturating_add(1);
        }
        drop(realtime);
        Ok((samples, e))
    }

    fn round(&mut self, round: u32) -> Result<Sample, PeerError> {
        let line = self.session.seal(Body::Ping { round })?;
        let t1 = tai_now_ns()?;
        self.conn.write_line(&line)?;
        let answer = self.conn.read_line(MAX_MESSAGE_BYTES, "a pong")?;
        let t4 = tai_now_ns()?;
        match self.session.open(&answer)? {
            Body::Pong {
                round: r,
                t2_tai_ns,
                t3_tai_ns,
                read_uncertainty_ns,
            } if r == round => Ok(Sample {
                t1_src_send_tai_ns: t1,
                t2_dst_recv_tai_ns: t2_tai_ns,
                t3_dst_send_tai_ns: t3_tai_ns,
                t4_src_recv_tai_ns: t4,
                src_read_uncertainty_ns: CLOCK_RESOLUTION_NS,
                dst_read_uncertainty_ns: read_uncertainty_ns,
            }),
            other => Err(unexpected("pong for this round", &other)),
        }
    }

    /// Sends VM `vm_id`'s sealed sidecar (its exact bytes, UTF-8 JSON);
    /// the destination validates and stores it.
    pub fn send_sidecar(&mut self, vm_id: &str, sidecar: &[u8]) -> Result<Stored, PeerError> {
        let text = String::from_utf8(sidecar.to_vec()).map_err(|_| PeerError::Protocol {
            reason: "the sidecar is not UTF-8".into(),
        })?;
        let msg = Body::Sidecar {
            vm_id: vm_id.to_string(),
            sidecar: text,
        };
        match self.call(msg, "the sidecar's acknowledgement")? {
            Body::Stored { vm_id: id, sha256 } if id == vm_id => Ok(Stored { vm_id: id, sha256 }),
            other => Err(unexpected("stored", &other)),
        }
    }

    /// Ends the session: done, bye.
    pub fn finish(mut self) -> Result<(), PeerError> {
        match self.call(Body::Done, "the goodbye")? {
            Body::Bye => Ok(()),
            other => Err(unexpected("bye", &other)),
        }
    }
}

fn unexpected(expected: &'static str, got: &Body) -> PeerError {
    PeerError::Unexpected {
        expected,
        got: match got {
            Body::Pong { round, .. } => format!("a pong for round {round}"),
            other => other.kind().to_string(),
        },
    }
}
