//! A small `log` backend: stderr on a terminal, syslog otherwise.
//!
//! `auto` (the default) writes to stderr when stderr is a terminal, and
//! otherwise sends RFC 3164 datagrams to `/dev/log` (journald and every
//! syslog daemon listen there), facility `daemon`, tag `clockcarry[pid]`.
//! When `/dev/log` cannot be reached it falls back to stderr. `stderr`,
//! `syslog` and `both` force a target. Each record is one line: newlines and
//! other control characters are replaced.

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The syslog socket.
pub const DEV_LOG: &str = "/dev/log";
/// syslog facility `daemon` (3), shifted.
const FACILITY_DAEMON: u8 = 3 << 3;
/// Longest message sent in one datagram, in bytes.
const MAX_DATAGRAM_BYTES: usize = 2048;

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// stderr on a terminal, else syslog (/dev/log), else stderr.
    Auto,
    Stderr,
    Syslog,
    Both,
}

/// Log target of records that must not be repeated on stderr (the final
/// error, which is printed there directly).
pub const SYSLOG_ONLY: &str = "clockcarry::syslog_only";

struct Logger {
    level: LevelFilter,
    stderr: bool,
    syslog: Option<Mutex<UnixDatagram>>,
    tag: String,
}

fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The record's text on one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = one_line(&record.args().to_string());
        if self.stderr && record.target() != SYSLOG_ONLY {
            let label = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            // A closed stderr must not stop the tool.
            let _ = writeln!(std::io::stderr().lock(), "clockcarry: {label}: {text}");
        }
        if let Some(sock) = &self.syslog {
            let pri = FACILITY_DAEMON | severity(record.level());
            let mut line = format!("<{pri}>{}: {text}", self.tag);
            if line.len() > MAX_DATAGRAM_BYTES {
                let mut end = MAX_DATAGRAM_BYTES;
                while end > 0 && !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
            }
            if let Ok(sock) = sock.lock() {
                let _ = sock.send(line.as_bytes());
            }
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

fn connect_syslog() -> Option<UnixDatagram> {
    let sock = UnixDatagram::unbound().ok()?;
    sock.connect(DEV_LOG).ok()?;
    // Never block the restore on a stuck syslog daemon.
    sock.set_nonblocking(true).ok()?;
    Some(sock)
}

/// Installs the logger once; later calls do nothing.
pub fn init(level: LevelFilter, target: LogTarget) {
    let (stderr, syslog) = match target {
        LogTarget::Stderr => (true, None),
        LogTarget::Syslog => {
            let s = connect_syslog();
            (s.is_none(), s)
        }
        LogTarget::Both => (true, connect_syslog()),
        LogTarget::Auto => {
            if std::io::stderr().is_terminal() {
                (true, None)
            } else {
                let s = connect_syslog();
                (s.is_none(), s)
            }
        }
    };
    let logger = Logger {
        level,
        stderr,
        syslog: syslog.map(Mutex::new),
        tag: format!("clockcarry[{}]", std::process::id()),
    };
    // Installed once per process: leaking it is how `log` keeps a logger.
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_line() {
        assert_eq!(one_line("a\nb\tc"), "a b c");
        assert_eq!(severity(Level::Error), 3);
        assert_eq!(FACILITY_DAEMON | severity(Level::Warn), 28);
    }
}
