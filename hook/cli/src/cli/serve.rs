//! `clockcarry serve`: the destination's side of the offset exchange.
//! Answers `capture --peer` with this host's CLOCK_TAI, and validates and
//! stores the sidecar it may send.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clockcarry::peer::{serve_one, ServerOptions, SessionReport};

use super::common::{self, peer_error};
use super::exit::{CliError, CliResult, Exit, EXIT_STATUS_HELP};

const LONG_ABOUT: &str = "\
Answer offset exchanges from source hosts (the destination's side).

DESCRIPTION
    Listens on --listen (TCP) for `clockcarry capture --peer` on a source
    host. Each session measures the two hosts' CLOCK_TAI offset in rounds
    (the source stamps each request and answer; this host stamps their
    arrival and departure) and may carry the source's sealed sidecar, which
    is validated with every check restore applies (digest, HMAC under the
    key, every rule) and written atomically with mode 0600 to
    $CLOCKCARRY_STATE_DIR/<VM>.sidecar.json (default /var/lib/clockcarry),
    the VM id checked before it names a file.

    Every message is authenticated with HMAC-SHA256 under the sidecar key:
    --key, else the key_file of the host configuration. Without a key the
    server runs only with --insecure-no-key, and never when the host
    configuration names one. Sessions from another key, replayed, reordered
    or altered messages are refused, the reason logged and sent back.

    Each message must arrive within --timeout; sessions are served one
    after another. The address it listens on is printed first (port 0 picks
    a free port). With --once it exits after one session: 0 when it
    succeeded, 10 when it failed.";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    dst$ clockcarry serve --listen 192.0.2.20:7487 --key /etc/clockcarry/sidecar.key
    src$ clockcarry capture --api-socket /run/ch.sock --vm web-1 \\
             --peer 192.0.2.20:7487 --send-sidecar --key /etc/clockcarry/sidecar.key"
    )
}

/// Answer offset exchanges from source hosts (the destination's side).
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct ServeArgs {
    /// Address and port to listen on, e.g. 192.0.2.20:7487 or [::]:7487
    /// (port 0: any free port, printed).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Authenticate with this key file (the one the sources use)
    /// [default: key_file of the host configuration, if any].
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_key")]
    key: Option<PathBuf>,
    /// Run without a key: nothing is authenticated. Refused when the host
    /// configuration names a key.
    #[arg(long)]
    insecure_no_key: bool,
    /// Serve one session, then exit with its result.
    #[arg(long)]
    once: bool,
    /// Give up on a session when a message takes longer than this.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_timeout)]
    timeout: u64,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not IP:PORT (an IPv4 address or a bracketed IPv6 one, a port 0 to 65535)")
    })
}

/// A duration from 1 ms to 1 h.
pub fn parse_timeout(s: &str) -> Result<u64, String> {
    let ns = super::units::parse_duration_ns(s)?;
    if !(1_000_000..=3_600_000_000_000).contains(&ns) {
        return Err(format!("{s:?}: give 1ms to 1h"));
    }
    Ok(ns)
}

pub fn run(args: &ServeArgs) -> CliResult<Exit> {
    let key = common::peer_key(args.key.as_deref(), args.insecure_no_key)?;
    let state_dir = common::state_dir();
    if !state_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|e| {
                CliError::internal(format!("cannot create {}: {e}", state_dir.display()))
            })?;
    }
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| CliError::internal(format!("cannot listen on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::internal(format!("cannot read the listening address: {e}")))?;
    say(&format!("listening on {local}"));
    log::info!("serving offset exchanges on {local}");
    let opts = ServerOptions {
        timeout: Duration::from_nanos(args.timeout),
        key,
        state_dir: Some(state_dir),
    };
    loop {
        let (stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(e) if args.once => {
                return Err(CliError::internal(format!("accepting a connection: {e}")))
            }
            Err(e) => {
                log::warn!("accepting a connection: {e}");
                continue;
            }
        };
        match serve_one(stream, &opts) {
            Ok(report) => say(&session_line(from, &report)),
            Err(e) if args.once => return Err(peer_error(&format!("session from {from}"), &e)),
            Err(e) => log::error!("session from {from}: {e}"),
        }
        if args.once {
            return Ok(Exit::Ok);
        }
    }
}

fn session_line(from: SocketAddr, r: &SessionReport) -> String {
    let stored = match &r.stored {
        Some(s) => format!(
            ", sidecar of VM {} stored at {} (sha256 {})",
            s.vm_id,
            s.path.display(),
            s.sha256.get(..16).unwrap_or(&s.sha256)
        ),
        None => String::new(),
    };
    format!("session from {from}: {} rounds{stored}", r.rounds)
}

/// One line on stdout, flushed (a script waits for the address).
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
