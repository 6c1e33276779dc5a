//! The destination's side of the exchange: answer the measurement rounds
//! with its CLOCK_TAI, and validate and store the sidecar the source sends.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::estimate::MAX_ROUNDS;
use super::wire::{clip, Body, Conn, Session, MAX_MESSAGE_BYTES, MAX_SIDECAR_MESSAGE_BYTES};
use super::PeerError;
use crate::fsio;
use crate::host::{tai_now_ns, CLOCK_RESOLUTION_NS};
use crate::sidecar::{Sidecar, SidecarKey};

/// Longest VM id that names a sidecar file, bytes.
pub const MAX_FILE_VM_ID_BYTES: usize = 128;

/// How the destination answers.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// For each message from the source.
    pub timeout: Duration,
    /// The sidecar key; `None` only for an explicitly insecure server.
    pub key: Option<SidecarKey>,
    /// Where received sidecars go (`<dir>/<VM id>.sidecar.json`); `None`
    /// refuses them.
    pub state_dir: Option<PathBuf>,
}

/// A sidecar received, validated and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSidecar {
    pub vm_id: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// What one session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    pub peer: Option<SocketAddr>,
    pub rounds: u32,
    pub stored: Option<StoredSidecar>,
}

/// Checks a VM id that names a file: 1 to 128 bytes of `[A-Za-z0-9._-]`,
/// not starting with `.`, no `..`.
pub fn check_file_vm_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_FILE_VM_ID_BYTES {
        return Err(format!("it must be 1 to {MAX_FILE_VM_ID_BYTES} bytes long"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("it contains {c:?}"));
    }
    if id.starts_with('.') || id.contains("..") {
        return Err("it starts with '.' or contains '..'".into());
    }
    Ok(())
}

/// Validates a received sidecar with the sidecar parser (digest, the HMAC
/// under `key` when there is one, every rule) and writes its exact bytes
/// atomically, mode 0600, to `<dir>/<vm_id>.sidecar.json`.
pub fn store_sidecar(
    dir: &Path,
    vm_id: &str,
    bytes: &[u8],
    key: Option<&SidecarKey>,
) -> Result<StoredSidecar, PeerError> {
    check_file_vm_id(vm_id).map_err(|reason| PeerError::VmId {
        vm_id: clip(vm_id),
        reason,
    })?;
    let sidecar = Sidecar::parse(bytes, key).map_err(|source| PeerError::SidecarRefused {
        vm_id: vm_id.to_string(),
        source,
    })?;
    if sidecar.body.vm.id != vm_id {
        return Err(PeerError::VmMismatch {
            sidecar: clip(&sidecar.body.vm.id),
            message: vm_id.to_string(),
        });
    }
    let path = dir.join(format!("{vm_id}.sidecar.json"));
    fsio::write_atomic(&path, bytes).map_err(|source| PeerError::Store {
        path: path.clone(),
        source,
    })?;
    Ok(StoredSidecar {
        vm_id: vm_id.to_string(),
        path,
        sha256: sidecar.integrity.sha256,
    })
}

/// One session on an accepted connection. On a failure after the hello,
/// the source is told why (best effort) before the connection closes.
pub fn serve_one(stream: TcpStream, opts: &ServerOptions) -> Result<SessionReport, PeerError> {
    let peer = stream.peer_addr().ok();
    let mut conn = Conn::new(stream, opts.timeout)?;
    let mut session = Session::destination(opts.key.clone())?;
    let mut report = SessionReport {
        peer,
        rounds: 0,
        stored: None,
    };
    let result = run(&mut conn, &mut session, opts, &mut report);
    if let Err(e) = &result {
        let told = !matches!(
            e,
            PeerError::Closed { .. } | PeerError::PeerRefused { .. } | PeerError::Timeout { .. }
        );
        if told {
            if let Ok(line) = session.seal(Body::Error {
                message: clip(&e.to_string()),
            }) {
                let _ = conn.write_line(&line);
            }
        }
    }
    result.map(|()| report)
}

fn run(
    conn: &mut Conn,
    session: &mut Session,
    opts: &ServerOptions,
    report: &mut SessionReport,
) -> Result<(), PeerError> {
    let hello = conn.read_line(MAX_MESSAGE_BYTES, "the hello")?;
    match session.open(&hello)? {
        Body::Hello { .. } => {}
        other => {
            return Err(PeerError::Unexpected {
                expected: "hello",
                got: other.kind().to_string(),
            })
        }
    }
    let key_id = session.key_id();
    conn.write_line(&session.seal(Body::Welcome { key_id })?)?;
    // Real-time only for the rounds of an authenticated source: dropped at
    // the first message that is not the next ping, and after MAX_ROUNDS.
    let mut realtime = super::sched::enter_logged("destination");
    loop {
        let line = conn.read_line(MAX_SIDECAR_MESSAGE_BYTES, "the next message")?;
        let t2_tai_ns = tai_now_ns()?;
        let body = session.open(&line)?;
        if !matches!(body, Body::Ping { .. }) || report.rounds.saturating_add(1) >= MAX_ROUNDS {
            drop(realtime.take());
        }
        let answer = match body {
            Body::Ping { round } if round == report.rounds && round < MAX_ROUNDS => {
                report.rounds = report.rounds.saturating_add(1);
                let t3_tai_ns = tai_now_ns()?;
                Body::Pong {
                    round,
                    t2_tai_ns,
                    t3_tai_ns,
                    read_uncertainty_ns: CLOCK_RESOLUTION_NS,
                }
            }
            Body::Sidecar { vm_id, sidecar } if report.stored.is_none() => {
                let dir = opts
                    .state_dir
                    .as_deref()
                    .ok_or(PeerError::SidecarsNotAccepted)?;
                let stored = store_sidecar(dir, &vm_id, sidecar.as_bytes(), opts.key.as_ref())?;
                let sha256 = stored.sha256.clone();
                report.stored = Some(stored);
                Body::Stored { vm_id, sha256 }
            }
            Body::Done => {
                conn.write_line(&session.seal(Body::Bye)?)?;
                return Ok(());
            }
            other => {
                return Err(PeerError::Unexpected {
                    expected: "ping (next round), sidecar or done",
                    got: match other {
                        Body::Ping { round } => format!("a ping for round {round}"),
                        o => o.kind().to_string(),
                    },
                })
            }
        };
        conn.write_line(&session.seal(answer)?)?;
    }
}
