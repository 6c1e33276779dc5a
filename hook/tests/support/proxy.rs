//! A TCP proxy for the offset exchange's tests: forwards line by line
//! between a client and an upstream server and, on request, delays,
//! duplicates, replaces or drops a line, or records every line.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Every line seen: (towards the server?, line).
pub type Seen = Arc<Mutex<Vec<(bool, Vec<u8>)>>>;

/// What to do with one line.
#[derive(Debug, Clone)]
pub enum Action {
    Forward,
    /// Wait this long, then forward.
    Delay(Duration),
    /// Forward it twice.
    Duplicate,
    /// Forward this line instead (newline added).
    Replace(Vec<u8>),
    Drop,
}

/// Decides per line: (towards the server?, index of the line in that
/// direction, the line without its newline).
pub type Rule = dyn Fn(bool, usize, &[u8]) -> Action + Send + Sync;

pub struct Proxy {
    pub addr: SocketAddr,
    pub seen: Seen,
}

impl Proxy {
    /// Proxies connections to `upstream` (one after another) under `rule`.
    pub fn start(upstream: SocketAddr, rule: Arc<Rule>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (r1, r2) = (Arc::clone(&rule), Arc::clone(&rule));
                let (k1, k2) = (Arc::clone(&seen2), Arc::clone(&seen2));
                thread::spawn(move || pump(client, server, true, r1, k1));
                thread::spawn(move || pump(s2, c2, false, r2, k2));
            }
        });
        Proxy { addr, seen }
    }

    /// The lines seen so far in one direction.
    pub fn lines(&self, to_server: bool) -> Vec<Vec<u8>> {
        let g = self.seen.lock().unwrap();
        g.iter()
            .filter(|(d, _)| *d == to_server)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

fn pump(from: TcpStream, mut to: TcpStream, to_server: bool, rule: Arc<Rule>, seen: Seen) {
    let mut reader = BufReader::new(from);
    let mut idx = 0usize;
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(_) => {}
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        seen.lock().unwrap().push((to_server, line.clone()));
        let out: Vec<Vec<u8>> = match rule(to_server, idx, &line) {
            Action::Forward => vec![line],
            Action::Delay(d) => {
                thread::sleep(d);
                vec![line]
            }
            Action::Duplicate => vec![line.clone(), line],
            Action::Replace(other) => vec![other],
            Action::Drop => vec![],
        };
        idx += 1;
        for mut l in out {
            l.push(b'\n');
            if to.write_all(&l).is_err() {
                return;
            }
        }
    }
}
