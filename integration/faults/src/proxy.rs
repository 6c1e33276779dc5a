//! A recording proxy in front of the VMM's API socket.
//!
//! `clockcarry restore --api-socket PROXY` talks to the VMM through it. Per
//! connection it notes who connected (SO_PEERCRED pid), the request, and
//! the instants it was received, forwarded, answered and the answer passed
//! on; a [`Trigger`] fires at one of those instants, so a fault (a kill, a
//! removed socket) can be placed inside a given request, not only at a
//! random time. It changes nothing in the bytes: one request per
//! connection, forwarded whole; the VMM's answer forwarded whole once it
//! is complete. If the VMM's side breaks before a complete answer, the
//! client's connection is closed without one (what a dead VMM gives).
//!
//! [`Proxy::close_listener`] makes it behave like a dead VMM for new
//! connections: the listening socket is shut down and closed, its file left
//! in place, so a connect is refused (ECONNREFUSED), as after a VMM's death.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http;
use crate::util::now_ns;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The whole request arrived from the client.
    RequestReceived,
    /// ... and was written to the VMM.
    RequestForwarded,
    /// The VMM's whole answer arrived.
    AnswerReceived,
    /// ... and was written to the client.
    AnswerForwarded,
    /// The VMM's side broke before a whole answer (the client gets none).
    UpstreamLost,
    /// The VMM's socket refused the connection.
    UpstreamRefused,
    /// The client went away before its request was complete, or before its
    /// answer could be written.
    ClientLost,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub t: u64,
    pub conn: u32,
    /// The client's pid (SO_PEERCRED), 0 if unknown.
    pub pid: i32,
    pub phase: Phase,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
}

/// Fires once, at the `nth` (1-based) event of `phase` for `method path`:
/// sends the event's instant on `tx`.
#[derive(Debug)]
pub struct Trigger {
    pub method: &'static str,
    pub path: &'static str,
    pub phase: Phase,
    pub nth: u32,
    pub tx: Sender<u64>,
    seen: u32,
}

impl Trigger {
    pub fn new(
        method: &'static str,
        path: &'static str,
        phase: Phase,
        nth: u32,
        tx: Sender<u64>,
    ) -> Trigger {
        Trigger {
            method,
            path,
            phase,
            nth,
            tx,
            seen: 0,
        }
    }
}

struct Shared {
    upstream: PathBuf,
    events: Mutex<Vec<Event>>,
    trigger: Mutex<Option<Trigger>>,
    closed: AtomicBool,
    listen_fd: i32,
}

impl Shared {
    fn note(
        &self,
        conn: u32,
        pid: i32,
        phase: Phase,
        method: &str,
        path: &str,
        status: Option<u16>,
    ) {
        let t = now_ns();
        if let Ok(mut g) = self.trigger.lock() {
            let fire = match g.as_mut() {
                Some(tr) if tr.phase == phase && tr.method == method && tr.path == path => {
                    tr.seen += 1;
                    tr.seen == tr.nth
                }
                _ => false,
            };
            if fire {
                if let Some(tr) = g.take() {
                    let _ = tr.tx.send(t);
                }
            }
        }
        if let Ok(mut e) = self.events.lock() {
            e.push(Event {
                t,
                conn,
                pid,
                phase,
                method: method.to_string(),
                path: path.to_string(),
                status,
            });
        }
    }
}

/// The events as one line: `conn:METHOD path phase[status]@+us` from the
/// first event.
pub fn describe(events: &[Event]) -> String {
    let t0 = events.first().map_or(0, |e| e.t);
    events
        .iter()
        .map(|e| {
            let st = e.status.map_or(String::new(), |s| format!(" {s}"));
            format!(
                "{}:{} {} {:?}{st}@+{}us",
                e.conn,
                e.method,
                e.path.rsplit('/').next().unwrap_or(""),
                e.phase,
                (e.t - t0) / 1000
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A handle that can close the listener from any thread (the kill actor).
#[derive(Clone)]
pub struct Closer(Arc<Shared>);

impl Closer {
    /// New connections are refused from now on, as by a dead VMM.
    pub fn close_listener(&self) {
        if !self.0.closed.swap(true, Ordering::SeqCst) {
            // SAFETY: shutdown(2) on the listening socket the accept thread
            // owns; it stays open (and valid) until that thread sees `closed`.
            unsafe { libc::shutdown(self.0.listen_fd, libc::SHUT_RDWR) };
        }
    }
}

pub struct Proxy {
    pub path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn peer_pid(s: &UnixStream) -> i32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt with a ucred-sized buffer on a connected socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        cred.pid
    } else {
        0
    }
}

fn serve_conn(sh: &Shared, conn: u32, mut client: UnixStream) {
    let pid = peer_pid(&client);
    let t = Some(Duration::from_secs(30));
    let _ = client.set_read_timeout(t);
    let _ = client.set_write_timeout(t);
    let (req, method, path) = match http::read_request(&mut client) {
        Ok(r) => r,
        Err(_) => {
            sh.note(conn, pid, Phase::ClientLost, "", "", None);
            return;
        }
    };
    sh.note(conn, pid, Phase::RequestReceived, &method, &path, None);
    let mut up = match UnixStream::connect(&sh.upstream) {
        Ok(u) => u,
        Err(_) => {
            sh.note(conn, pid, Phase::UpstreamRefused, &method, &path, None);
            return; // the client's connection closes without an answer
        }
    };
    let _ = up.set_read_timeout(t);
    let _ = up.set_write_timeout(t);
    use std::io::{Read, Write};
    if up.write_all(&req).is_err() {
        sh.note(conn, pid, Phase::UpstreamLost, &method, &path, None);
        return;
    }
    sh.note(conn, pid, Phase::RequestForwarded, &method, &path, None);
    let mut raw = Vec::new();
    let read = up.read_to_end(&mut raw);
    let answer = http::parse_response(&raw);
    let Some(answer) = answer.filter(|_| read.is_ok()) else {
        sh.note(conn, pid, Phase::UpstreamLost, &method, &path, None);
        return;
    };
    sh.note(
        conn,
        pid,
        Phase::AnswerReceived,
        &method,
        &path,
        Some(answer.status),
    );
    if client.write_all(&raw).is_err() {
        sh.note(
            conn,
            pid,
            Phase::ClientLost,
            &method,
            &path,
            Some(answer.status),
        );
        return;
    }
    let _ = client.flush();
    sh.note(
        conn,
        pid,
        Phase::AnswerForwarded,
        &method,
        &path,
        Some(answer.status),
    );
}

impl Proxy {
    /// Listens on `path` (replacing a stale file) and forwards to `upstream`.
    pub fn start(path: &Path, upstream: &Path) -> Result<Proxy, String> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(|e| format!("proxy bind {}: {e}", path.display()))?;
        let shared = Arc::new(Shared {
            upstream: upstream.to_path_buf(),
            events: Mutex::new(Vec::new()),
            trigger: Mutex::new(None),
            closed: AtomicBool::new(false),
            listen_fd: listener.as_raw_fd(),
        });
        let sh = shared.clone();
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("proxy: {e}"))?;
        let thread = std::thread::spawn(move || {
            let next = AtomicU32::new(0);
            let mut workers = Vec::new();
            while !sh.closed.load(Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                if sh.closed.load(Ordering::SeqCst) {
                    break; // anything still queued is dropped: closed without an answer
                }
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let conn = next.fetch_add(1, Ordering::Relaxed);
                        let sh2 = sh.clone();
                        workers.push(std::thread::spawn(move || serve_conn(&sh2, conn, s)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            drop(listener);
            for w in workers {
                let _ = w.join();
            }
        });
        Ok(Proxy {
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    pub fn set_trigger(&self, t: Trigger) {
        if let Ok(mut g) = self.shared.trigger.lock() {
            *g = Some(t);
        }
    }

    pub fn clear_trigger(&self) {
        if let Ok(mut g) = self.shared.trigger.lock() {
            *g = None;
        }
    }

    pub fn closer(&self) -> Closer {
        Closer(self.shared.clone())
    }

    pub fn events(&self) -> Vec<Event> {
        self.shared
            .events
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Stops listening, waits for the connections in flight, removes the path.
    pub fn stop(mut self) -> Vec<Event> {
        self.closer().close_listener();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        self.events()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.closer().close_listener();
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
