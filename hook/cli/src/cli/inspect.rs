//! `clockcarry inspect`: verify a sidecar and show what it says.

use std::path::PathBuf;

use clap::Args;
use clockcarry::host;
use clockcarry::sidecar::Sidecar;
use serde::Serialize;

use super::common::{self, print_json, print_text};
use super::exit::{CliResult, Exit, EXIT_STATUS_HELP};
use super::units::{human_ns, utc_timestamp};

const LONG_ABOUT: &str = "\
Verify a sidecar and show what it says.

DESCRIPTION
    Reads the sidecar with every check `clockcarry restore` applies (size,
    JSON, format and version, strict fields, SHA-256 digest, HMAC with --key,
    semantic rules) and prints its content: the VM, the capture instant in
    UTC and TAI with its uncertainty and age, the source host and its clock
    quality, the guest TSC rate and every vCPU's offset, the kvm-clock sample
    and PVTI, the capabilities and the integrity block.

    The key is --key, else the key_file of the host configuration
    (/etc/clockcarry/clockcarry.conf, or $CLOCKCARRY_CONFIG); with a key only
    files sealed with it pass. With no key at all, a sidecar that carries an
    HMAC is accepted on its digest alone (and says so). A sidecar others
    could have written (another owner, group/other-writable, in a directory
    others may write without the sticky bit) is refused. Exits 0 when the
    sidecar is valid, 2 otherwise, naming the field or the reason.";

fn after_help() -> String {
    format!(
        "{EXIT_STATUS_HELP}

EXAMPLES
    clockcarry inspect /var/lib/clockcarry/web-1.sidecar.json
    clockcarry inspect web-1.sidecar.json --key /etc/clockcarry/sidecar.key --json"
    )
}

/// Verify a sidecar and show what it says.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT, after_long_help = after_help())]
pub struct InspectArgs {
    /// The sidecar.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Verify the HMAC with this key (and refuse files without one)
    /// [default: key_file of the host configuration, if any].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct IntegrityView<'a> {
    sha256: &'a str,
    /// `verified`, `not_checked` (HMAC present, no key given) or `absent`.
    hmac: &'static str,
    key_id: Option<&'a str>,
}

#[derive(Serialize)]
struct InspectOutput<'a> {
    file: String,
    valid: bool,
    integrity: IntegrityView<'a>,
    /// TAI time since capture on this host's clock, ns (negative: in the future).
    age_ns: Option<i128>,
    sidecar: &'a Sidecar,
}

pub fn run(args: &InspectArgs) -> CliResult<Exit> {
    let key = common::load_key(args.key.as_deref())?;
    let sidecar = common::read_sidecar(&args.file, key.as_ref())?;
    let hmac = match (&sidecar.integrity.hmac_sha256, &key) {
        (Some(_), Some(_)) => "verified",
        (Some(_), None) => "not_checked",
        (None, _) => "absent",
    };
    let age_ns = host::tai_now_ns()
        .ok()
        .map(|now| i128::from(now) - i128::from(sidecar.body.capture.tai_ns));
    let out = InspectOutput {
        file: args.file.display().to_string(),
        valid: true,
        integrity: IntegrityView {
            sha256: &sidecar.integrity.sha256,
            hmac,
            key_id: sidecar.integrity.key_id.as_deref(),
        },
        age_ns,
        sidecar: &sidecar,
    };
    if args.json {
        print_json(&out)?;
    } else {
        print_text(&human(&out));
    }
    Ok(Exit::Ok)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn human(o: &InspectOutput) -> String {
    let b = &o.sidecar.body;
    let mut out = format!(
        "sidecar {}: valid (sha256 ok; HMAC {})\n",
        o.file,
        match (o.integrity.hmac, o.integrity.key_id) {
            ("verified", Some(id)) => format!("verified, key {id}"),
            ("not_checked", Some(id)) => format!("present (key {id}), NOT checked: no --key"),
            _ => "absent".to_string(),
        }
    );
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<14} {v}\n"));
    line(
        &mut out,
        "VM",
        format!(
            "{}, {} vCPU(s), {:?} at capture",
            b.vm.id, b.vm.vcpu_count, b.vm_clock.state
        ),
    );
    let age = match o.age_ns {
        Some(a) if a >= 0 => format!(", {} ago", human_ns(u64::try_from(a).unwrap_or(u64::MAX))),
        Some(a) => format!(
            ", {} IN THE FUTURE of this host's clock",
            human_ns(u64::try_from(-a).unwrap_or(u64::MAX))
        ),
        None => String::new(),
    };
    let c = &b.capture;
    line(
        &mut out,
        "captured",
        format!(
            "{} (UTC), TAI {} ns, ± {}{age}",
            utc_timestamp(c.realtime_ns),
            c.tai_ns,
            human_ns(c.uncertainty_ns)
        ),
    );
    line(
        &mut out,
        "",
        format!("host TSC {}, TAI - UTC {} s", c.host_tsc, c.tai_offset_s),
    );
    let h = &b.source_host;
    line(
        &mut out,
        "source host",
        format!(
            "{} (boot {}, kernel {}, clocksource {})",
            h.hostname, h.boot_id, h.kernel_release, h.clocksource
        ),
    );
    line(
        &mut out,
        "",
        format!(
            "TSC {} kHz, constant_tsc {}, nonstop_tsc {}, tsc_known_freq {}",
            h.tsc_khz,
            yes(h.tsc_flags.constant_tsc),
            yes(h.tsc_flags.nonstop_tsc),
            yes(h.tsc_flags.tsc_known_freq)
        ),
    );
    let q = &c.quality;
    line(
        &mut out,
        "host clock",
        format!(
            "{}, maxerror {}, esterror {}, leap {:?}",
            if q.synchronised {
                "synchronised"
            } else {
                "NOT synchronised"
            },
            human_ns(q.maxerror_ns),
            human_ns(q.esterror_ns),
            q.leap_pending
        ),
    );
    let v = &b.vm_clock;
    line(
        &mut out,
        "guest TSC",
        format!(
            "{} kHz, scaling {}",
            v.tsc_khz,
            match v.tsc_scaling {
                Some(s) => format!("ratio {} ({} fraction bits)", s.ratio, s.frac_bits),
                None => "not reported".to_string(),
            }
        ),
    );
    for cpu in &v.vcpus {
        line(
            &mut out,
            &format!("vCPU {}", cpu.id),
            format!("offset {} cycles", cpu.tsc_offset),
        );
    }
    let k = &v.kvmclock;
    line(
        &mut out,
        "kvm-clock",
        format!(
            "{} ns, flags {}, realtime {}, host_tsc {}",
            k.clock_ns, k.flags, k.realtime_ns, k.host_tsc
        ),
    );
    line(
        &mut out,
        "PVTI",
        match (&v.pvti, v.pvti_source) {
            (Some(p), src) => format!(
                "tsc_timestamp {}, system_time {}, mul {}, shift {}, flags {} ({})",
                p.tsc_timestamp,
                p.system_time,
                p.tsc_to_system_mul,
                p.tsc_shift,
                p.flags,
                src.map_or_else(|| "?".to_string(), |s| format!("{s:?}"))
            ),
            (None, _) => "none (restore derives it from the kvm-clock pair)".to_string(),
        },
    );
    let caps = &v.capabilities;
    line(
        &mut out,
        "capabilities",
        format!(
            "tsc_offset {}, clock_guest {}, tsc_scaling {}, adjust_clock {}",
            yes(caps.tsc_offset_effective),
            yes(caps.clock_guest),
            yes(caps.tsc_scaling),
            caps.adjust_clock
        ),
    );
    if let Some(e) = &b.offset_estimate {
        line(
            &mut out,
            "offset est.",
            format!("{} ns ± {} ns", e.offset_ns, e.bound_ns),
        );
    }
    line(&mut out, "created by", b.created_by.clone());
    line(&mut out, "sha256", o.integrity.sha256.to_string());
    out
}
