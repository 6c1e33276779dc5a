//! `clockcarry capture`: GET vm.clock, pair it with this host's (TSC, TAI)
//! instant and identity, seal and write the sidecar.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use clap::Args;
use clockcarry::model::RunState;
use clockcarry::sidecar::{check_replaceable, Sidecar, SidecarBody, SidecarError};
use serde::Serialize;

use super::common::{self, print_json, print_report};
use super::exit::{CliError, CliResult, Exit, EXIT_STATUS_HELP};
use super::hostinfo::{self, HostRate};
use super::units::human_ns;
use super::ApiArgs;

const LONG_ABOUT: &str = "\
Capture a VM's clock into a sidecar file.

DESCRIPTION
    Reads the VM's clock with GET /api/v1/vm.clock on the VMM's API socket
    (per-vCPU TSC offsets, TSC rate, a KVM_GET_CLOCK sample, the PVTI and
    the capabilities), checks every field of the answer, pairs it with this
    host's (TSC, CLOCK_TAI) instant (narrowest of 16 brackets), the clock's
    quality (adjtimex) and the host's identity, and writes the sidecar
    atomically (temporary file, fsync, rename, fsync of the directory) with
    mode 0600. With --key, or the key_file of the host configuration
    (/etc/clockcarry/clockcarry.conf, or $CLOCKCARRY_CONFIG), the sidecar is
    sealed with HMAC-SHA256. A key file others could read or write is
    refused (exit 2).

    Run it on the source host before the VM pauses (before send-migration or
    snapshot). The VM may be running: reading offsets touches no clock.

    Without -o the sidecar goes to $CLOCKCARRY_STATE_DIR/<VM>.sidecar.json
    (default /var/lib/clockcarry); the VM id must then be 1 to 128 characters
    of [A-Za-z0-9._-], not starting with '.'. -o - writes the sidecar to
    stdout (the summary then goes to stderr; --json cannot be combined with
    it). An existing target that is not a regular file (a device, a FIFO, a
    directory, a symbolic link) is refused, never replaced (exit 2).

    The host TSC rate comes from --host-tsc-khz, else a per-boot cache in
    $CLOCKCARRY_RUN_DIR (default /run/clockcarry), else KVM_GET_TSC_KHZ, else
    sysfs or a 50 ms calibration.

    With --peer HOST:PORT (the destination, running `clockcarry serve`),
    the two hosts' CLOCK_TAI offset is measured just before the sidecar is
    sealed: --peer-rounds request/answer rounds (default 8), the one with
    the shortest round trip kept, its bound half that round trip plus the
    clock reads; past those, one more round every 2 ms while the bound is
    above --peer-goal (default 100us), up to --peer-max-rounds (default 64).
    The estimate goes into the sidecar's offset_estimate
    (sealed with the rest); restore then corrects by it instead of trusting
    both hosts' clocks. --send-sidecar also sends the sealed sidecar to the
    destination, which validates and stores it in its state directory (no
    shared storage needed). The exchange is authenticated with the sidecar
    key, which is then required (--insecure-no-key runs it without one,
    unless the host configuration names a key). A failed measurement exits
    10 before anything is written; a sidecar the destination refuses exits
    10 after the local copy was written (the message says where).";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    clockcarry capture --api-socket /run/ch.sock --vm web-1
    clockcarry capture --api-socket /run/ch.sock --vm web-1 -o /shared/web-1.json \\
        --key /etc/clockcarry/sidecar.key --json
    clockcarry capture --api-socket /run/ch.sock --vm web-1 --peer 192.0.2.20:7487 \\
        --send-sidecar --key /etc/clockcarry/sidecar.key"
    )
}

/// Capture a VM's clock into a sidecar file.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct CaptureArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The VM's id (UUID or name), recorded in the sidecar.
    #[arg(long, value_name = "ID")]
    vm: String,
    /// Where to write the sidecar, `-` for stdout [default: $CLOCKCARRY_STATE_DIR/<ID>.sidecar.json].
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Seal with HMAC-SHA256 under this key file (at least 16 bytes, private)
    /// [default: key_file of the host configuration, if any].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// This host's TSC rate in kHz, when known better than clockcarry finds it.
    #[arg(long, value_name = "KHZ", value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    host_tsc_khz: Option<u32>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    peer: PeerArgs,
}

/// The offset exchange with the destination.
#[derive(Args, Debug)]
pub struct PeerArgs {
    /// Measure the TAI offset to the destination's `clockcarry serve` at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_peer)]
    peer: Option<String>,
    /// Rounds of the measurement always run, back to back, 1 to 256.
    #[arg(long, value_name = "N", default_value_t = clockcarry::peer::estimate::DEFAULT_ROUNDS,
          value_parser = clap::value_parser!(u32).range(1..=256), requires = "peer")]
    peer_rounds: u32,
    /// Rounds run at most: past --peer-rounds, one more every 2 ms while the
    /// bound is above --peer-goal, --peer-rounds to 256.
    #[arg(long, value_name = "N", default_value_t = clockcarry::peer::estimate::DEFAULT_MAX_ROUNDS,
          value_parser = clap::value_parser!(u32).range(1..=256), requires = "peer")]
    peer_max_rounds: u32,
    /// The offset bound at which the measurement stops adding rounds (the
    /// default is met in the first rounds on a LAN: 50 to 200 us round trips).
    #[arg(long, value_name = "DUR", default_value = "100us",
          value_parser = parse_goal, requires = "peer")]
    peer_goal: u64,
    /// Also send the sealed sidecar to the destination, which stores it.
    #[arg(long, requires = "peer")]
    send_sidecar: bool,
    /// Give up on the destination when it takes longer than this to connect or answer.
    #[arg(long, value_name = "DUR", default_value = "2s",
          value_parser = super::serve::parse_timeout, requires = "peer")]
    peer_timeout: u64,
    /// Run the exchange without a key (unauthenticated). Refused when the
    /// host configuration names a key.
    #[arg(long, requires = "peer", conflicts_with = "key")]
    insecure_no_key: bool,
}

/// A bound goal of 1 ns to 1 s.
fn parse_goal(s: &str) -> Result<u64, String> {
    let ns = super::units::parse_duration_ns(s)?;
    if !(1..=1_000_000_000).contains(&ns) {
        return Err(format!("{s:?}: give 1ns to 1s"));
    }
    Ok(ns)
}

/// `HOST:PORT` with a port of 1 to 65535 (resolved when used).
fn parse_peer(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    if host.is_empty() || host.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{s:?}: the host is empty or has spaces"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("{s:?}: the port must be 1 to 65535")),
    }
}

/// What the exchange measured, for the summary.
#[derive(Serialize)]
struct PeerSummary {
    peer: String,
    offset_ns: i64,
    bound_ns: u64,
    best_round_trip_ns: u64,
    rounds: u32,
    sidecar_stored: Option<String>,
}

#[derive(Serialize)]
struct CaptureSummary<'a> {
    sidecar: String,
    vm_id: &'a str,
    vcpu_count: usize,
    state: RunState,
    guest_tsc_khz: u32,
    host: &'a str,
    host_tsc_khz: u32,
    host_rate: HostRate,
    capture_tai_ns: u64,
    uncertainty_ns: u64,
    synchronised: bool,
    maxerror_ns: u64,
    pvti_source: Option<clockcarry::model::PvtiSource>,
    tsc_offsets_effective: bool,
    sha256: &'a str,
    key_id: Option<&'a str>,
    offset_estimate: Option<PeerSummary>,
    warnings: Vec<String>,
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
pub fn run(args: &CaptureArgs) -> CliResult<Exit> {
    // Everything about the input first: nothing is read from the VMM with
    // an id or key that cannot be used.
    if args.vm.is_empty() || args.vm.chars().any(char::is_control) || args.vm.len() > 1024 {
        return Err(CliError::bad_input(
            "--vm must be 1 to 1024 bytes without control characters",
        ));
    }
    super::metrics::note(&args.vm, |_| {});
    let to_stdout = args.output.as_deref() == Some(Path::new("-"));
    if to_stdout && args.json {
        return Err(CliError::bad_input(
            "-o - writes the sidecar to stdout, where --json would print the summary",
        )
        .with_hint("drop --json, or give -o a file"));
    }
    let (output, default_path) = match &args.output {
        Some(p) => (p.clone(), false),
        None => (common::default_sidecar_path(&args.vm)?, true),
    };
    if !to_stdout {
        check_replaceable(&output).map_err(|e| write_error(&output, e))?;
    }
    let key = common::load_key(args.key.as_deref())?;
    let peer_key = match &args.peer.peer {
        Some(_) => common::peer_key(args.key.as_deref(), args.peer.insecure_no_key)?,
        None => None,
    };

    // Not while a restore of the same VM is under way: its half-applied
    // state is nothing to carry. Held until this process exits.
    let _lock = super::lock::lock_vm(args.api.socket(), "capture")?;
    let vmm = args.api.vmm();
    let vm_clock = vmm.get_vm_clock().map_err(|e| common::vmm_error(&e))?;
    let (identity, rate) = hostinfo::identity(args.host_tsc_khz)?;
    let sample = hostinfo::sample(rate.khz)?;

    // A capture may be restored anywhere: every host check applies.
    let mut warnings = hostinfo::host_warnings(&identity, &sample, true);
    if !vm_clock.capabilities.tsc_offset_effective {
        warnings.push(
            "the VMM reports TSC offsets inert on this host (capabilities.tsc_offset = false)"
                .to_string(),
        );
    }
    if vm_clock.pvti.is_none() && !vm_clock.kvmclock.has_host_tsc() {
        warnings.push(format!(
            "no PVTI and no host_tsc in the kvm-clock sample (flags {}): restore will refuse; \
             capture again once the guest has enabled kvm-clock",
            vm_clock.kvmclock.flags
        ));
    }
    for w in &warnings {
        log::warn!("{w}");
    }

    let mut body = SidecarBody::new(args.vm.clone(), identity, sample, vm_clock);
    let mut peer = match &args.peer.peer {
        Some(addr) => Some(measure(addr, &args.peer, peer_key)?),
        None => None,
    };
    if let Some((_, summary)) = &peer {
        body.offset_estimate = Some(summary.estimate.to_offset_estimate());
    }
    let sidecar = Sidecar::seal(body, key.as_ref())
        .map_err(|e| CliError::internal(format!("the capture cannot be sealed: {e}")))?;
    if to_stdout {
        let mut out = std::io::stdout().lock();
        out.write_all(&sidecar.to_json_pretty())
            .and_then(|()| out.flush())
            .map_err(|e| CliError::internal(format!("cannot write the sidecar to stdout: {e}")))?;
    } else if default_path {
        if let Some(dir) = output.parent() {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| {
                        CliError::internal(format!("cannot create {}: {e}", dir.display()))
                    })?;
            }
        }
    }
    if !to_stdout {
        sidecar
            .write_to(&output)
            .map_err(|e| write_error(&output, e))?;
    }
    let mut peer_summary = None;
    if let Some((client, measured)) = peer.take() {
        peer_summary = Some(finish_peer(
            client, measured, args, &sidecar, &output, to_stdout,
        )?);
    }
    let shown = if to_stdout {
        "stdout".to_string()
    } else {
        output.display().to_string()
    };
    let b = &sidecar.body;
    log::info!(
        "captured VM {:?} ({} vCPUs) to {shown}",
        b.vm.id,
        b.vm.vcpu_count
    );

    let summary = CaptureSummary {
        sidecar: shown,
        vm_id: &b.vm.id,
        vcpu_count: b.vm_clock.vcpus.len(),
        state: b.vm_clock.state,
        guest_tsc_khz: b.vm_clock.tsc_khz,
        host: &b.source_host.hostname,
        host_tsc_khz: b.source_host.tsc_khz,
        host_rate: rate,
        capture_tai_ns: b.capture.tai_ns,
        uncertainty_ns: b.capture.uncertainty_ns,
        synchronised: b.capture.quality.synchronised,
        maxerror_ns: b.capture.quality.maxerror_ns,
        pvti_source: b.vm_clock.pvti_source,
        tsc_offsets_effective: b.vm_clock.capabilities.tsc_offset_effective,
        sha256: &sidecar.integrity.sha256,
        key_id: sidecar.integrity.key_id.as_deref(),
        offset_estimate: peer_summary,
        warnings,
    };
    if args.json {
        print_json(&summary)?;
    } else if to_stdout {
        // stdout holds the sidecar.
        let _ = std::io::stderr()
            .lock()
            .write_all(human(&summary).as_bytes());
    } else {
        print_report(&human(&summary));
    }
    Ok(Exit::Ok)
}

/// The estimate of an exchange and where it was measured.
struct Measured {
    addr: String,
    estimate: clockcarry::peer::Estimate,
}

/// Connects to the destination and measures the offset (exit 10 on failure).
fn measure(
    addr: &str,
    args: &PeerArgs,
    key: Option<clockcarry::sidecar::SidecarKey>,
) -> CliResult<(clockcarry::peer::PeerClient, Measured)> {
    let plan = clockcarry::peer::RoundPlan {
        min_rounds: args.peer_rounds,
        max_rounds: args.peer_max_rounds,
        goal_bound_ns: args.peer_goal,
        spacing: clockcarry::peer::client::DEFAULT_SPACING,
    };
    plan.validate()
        .map_err(|e| CliError::bad_input(format!("--peer-rounds / --peer-max-rounds: {e}")))?;
    let timeout = std::time::Duration::from_nanos(args.peer_timeout);
    let opts = clockcarry::peer::ClientOptions {
        connect_timeout: timeout,
        timeout,
        key,
    };
    let context = format!("offset exchange with {addr}; no sidecar written");
    let mut client = clockcarry::peer::PeerClient::connect(addr, &opts)
        .map_err(|e| common::peer_error(&context, &e))?;
    let (_, estimate) = client
        .measure_until(&plan)
        .map_err(|e| common::peer_error(&context, &e))?;
    log::info!(
        "offset to {addr}: {} ns ± {} ns (best round trip {} ns of {} rounds)",
        estimate.offset_ns,
        estimate.bound_ns,
        estimate.best_delay_ns,
        estimate.rounds
    );
    let measured = Measured {
        addr: addr.to_string(),
        estimate,
    };
    Ok((client, measured))
}

/// Sends the sidecar when asked, ends the session (exit 10 on failure).
fn finish_peer(
    mut client: clockcarry::peer::PeerClient,
    m: Measured,
    args: &CaptureArgs,
    sidecar: &Sidecar,
    output: &Path,
    to_stdout: bool,
) -> CliResult<PeerSummary> {
    let written = if to_stdout {
        "the sidecar went to stdout".to_string()
    } else {
        format!("the sidecar was written to {}", output.display())
    };
    let context = format!("offset exchange with {}; {written}", m.addr);
    let mut stored = None;
    if args.peer.send_sidecar {
        let ack = client
            .send_sidecar(&args.vm, &sidecar.to_json_pretty())
            .map_err(|e| common::peer_error(&format!("{context}, not stored there"), &e))?;
        stored = Some(ack.sha256);
    }
    client
        .finish()
        .map_err(|e| common::peer_error(&context, &e))?;
    Ok(PeerSummary {
        peer: m.addr,
        offset_ns: m.estimate.offset_ns,
        bound_ns: m.estimate.bound_ns,
        best_round_trip_ns: m.estimate.best_delay_ns,
        rounds: m.estimate.rounds,
        sidecar_stored: stored,
    })
}

/// A sidecar that could not be written: exit 2 when the target is not a
/// regular file (it is never replaced), else exit 1.
fn write_error(path: &Path, err: SidecarError) -> CliError {
    match err {
        SidecarError::NotRegularFile { .. } => {
            CliError::bad_input(format!("cannot write the sidecar: {err}")).with_hint(format!(
                "give -o a regular file or a new name ({} is left as it is), or -o - for stdout",
                path.display()
            ))
        }
        _ => CliError::internal(format!("cannot write the sidecar: {err}"))
            .with_hint("check the directory exists and is writable, or give another -o"),
    }
}

fn human(s: &CaptureSummary) -> String {
    let mut out = format!(
        "captured VM {} ({} vCPU{}, {:?}) to {}\n",
        s.vm_id,
        s.vcpu_count,
        if s.vcpu_count == 1 { "" } else { "s" },
        s.state,
        s.sidecar
    );
    out.push_str(&format!(
        "  host          {}, TSC {} kHz ({:?}{})\n",
        s.host,
        s.host_tsc_khz,
        s.host_rate.source,
        if s.host_rate.cached { ", cached" } else { "" }
    ));
    out.push_str(&format!(
        "  instant       TAI {} ns ± {}\n",
        s.capture_tai_ns,
        human_ns(s.uncertainty_ns)
    ));
    out.push_str(&format!(
        "  host clock    {}, maxerror {}\n",
        if s.synchronised {
            "synchronised"
        } else {
            "NOT synchronised"
        },
        human_ns(s.maxerror_ns)
    ));
    out.push_str(&format!(
        "  guest         TSC {} kHz, PVTI {}\n",
        s.guest_tsc_khz,
        match s.pvti_source {
            Some(src) => format!("{src:?}"),
            None => "none (derived at restore)".to_string(),
        }
    ));
    out.push_str(&format!(
        "  integrity     sha256 {}{}\n",
        s.sha256.get(..16).unwrap_or(s.sha256),
        match s.key_id {
            Some(id) => format!("…, HMAC key {id}"),
            None => "…, no HMAC".to_string(),
        }
    ));
    if let Some(p) = &s.offset_estimate {
        out.push_str(&format!(
            "  peer offset   {} ± {} to {} (best round trip {}, {} rounds){}\n",
            super::units::human_ns_signed(p.offset_ns),
            human_ns(p.bound_ns),
            p.peer,
            human_ns(p.best_round_trip_ns),
            p.rounds,
            if p.sidecar_stored.is_some() {
                ", sidecar stored there"
            } else {
                ""
            }
        ));
    }
    for w in &s.warnings {
        out.push_str(&format!("  WARNING       {w}\n"));
    }
    out
}
