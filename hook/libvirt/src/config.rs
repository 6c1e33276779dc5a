//! The host configuration, `/etc/clockcarry/libvirt.conf`: `key = value`
//! lines, `#` comments, strict (unknown or repeated keys, bad values and
//! oversized files are errors naming the line). A missing file means all
//! defaults.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::LibvirtError;

/// Default path of the host configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/clockcarry/libvirt.conf";
/// Environment variable naming another host configuration file.
pub const CONFIG_ENV: &str = "CLOCKCARRY_LIBVIRT_CONFIG";

/// The host configuration's path: `$CLOCKCARRY_LIBVIRT_CONFIG` when set and
/// not empty, else [`DEFAULT_CONFIG_PATH`]. As for the default path, a file
/// that does not exist means all defaults.
pub fn config_path() -> PathBuf {
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from)
}
/// Default directory of resync reports.
pub const DEFAULT_REPORT_DIR: &str = "/var/lib/clockcarry/libvirt/reports";
/// Default virsh.
pub const DEFAULT_VIRSH: &str = "/usr/bin/virsh";
/// Default libvirt connection URI.
pub const DEFAULT_URI: &str = "qemu:///system";
/// Default directory where libvirt's QEMU driver keeps `NAME.pid`.
pub const DEFAULT_QEMU_RUN_DIR: &str = "/run/libvirt/qemu";
/// Largest configuration file accepted, in bytes.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// What to do for a domain after a blackout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Nothing.
    Off,
    /// Set the guest's wall clock from host time through the guest agent.
    Resync,
}

impl Policy {
    /// `off` or `resync`.
    pub fn parse(text: &str) -> Option<Policy> {
        match text {
            "off" => Some(Policy::Off),
            "resync" => Some(Policy::Resync),
            _ => None,
        }
    }

    /// The policy as written in the config and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Off => "off",
            Policy::Resync => "resync",
        }
    }
}

/// How the helper sets the guest clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetMethod {
    /// `virsh domtime UUID --time S`, started `latency` before host time
    /// reaches second `S`, so the guest is set to a whole second at about
    /// that second (sub-second error instead of `--now`'s truncation).
    Aligned,
    /// `virsh domtime UUID --now`: virsh sends its `time(NULL)`, whole
    /// seconds, so the guest lands 0 to 1 s behind.
    Now,
    /// `virsh domtime UUID --sync`: the guest reads its own RTC (whole
    /// seconds, and only right if the domain's RTC follows host UTC).
    Sync,
}

impl SetMethod {
    fn parse(text: &str) -> Option<SetMethod> {
        match text {
            "aligned" => Some(SetMethod::Aligned),
            "now" => Some(SetMethod::Now),
            "sync" => Some(SetMethod::Sync),
            _ => None,
        }
    }

    /// The method as written in the config and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SetMethod::Aligned => "aligned",
            SetMethod::Now => "now",
            SetMethod::Sync => "sync",
        }
    }
}

/// The host configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `policy`: for domains whose metadata sets none. Default `off`.
    pub policy: Policy,
    /// `report_dir`: where resync reports go.
    pub report_dir: PathBuf,
    /// `virsh`: absolute path of virsh.
    pub virsh: PathBuf,
    /// `uri`: libvirt connection URI given to virsh.
    pub uri: String,
    /// `set_method`: aligned | now | sync.
    pub set_method: SetMethod,
    /// `retry_interval_ms`: pause between tries (100..=60000). Default 1000.
    pub retry_interval_ms: u32,
    /// `agent_timeout_s`: how long to keep trying the agent once the
    /// domain runs (1..=3600). Default 60.
    pub agent_timeout_s: u32,
    /// `run_wait_s`: how long to wait for the domain to run after
    /// `started begin` (an incoming migration ends only when its data has
    /// arrived; 1..=86400). Default 3600.
    pub run_wait_s: u32,
    /// `command_timeout_s`: longest a single virsh run may take (1..=600).
    /// Default 30.
    pub command_timeout_s: u32,
    /// `qemu_run_dir`: libvirt's QEMU state directory (`NAME.pid`).
    pub qemu_run_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            policy: Policy::Off,
            report_dir: PathBuf::from(DEFAULT_REPORT_DIR),
            virsh: PathBuf::from(DEFAULT_VIRSH),
            uri: DEFAULT_URI.to_owned(),
            set_method: SetMethod::Aligned,
            retry_interval_ms: 1000,
            agent_timeout_s: 60,
            run_wait_s: 3600,
            command_timeout_s: 30,
            qemu_run_dir: PathBuf::from(DEFAULT_QEMU_RUN_DIR),
        }
    }
}

impl Config {
    /// Reads `path`; a file that does not exist yields the defaults.
    pub fn load(path: &Path) -> Result<Config, LibvirtError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(LibvirtError::io(path, e)),
        };
        let limit = u64::try_from(MAX_CONFIG_BYTES).unwrap_or(u64::MAX);
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| LibvirtError::io(path, e))?;
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(LibvirtError::Config {
                path: path.to_path_buf(),
                line: 0,
                message: format!("larger than {MAX_CONFIG_BYTES} bytes"),
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| LibvirtError::Config {
            path: path.to_path_buf(),
            line: 0,
            message: "not UTF-8".into(),
        })?;
        Config::parse(&text).map_err(|(line, message)| LibvirtError::Config {
            path: path.to_path_buf(),
            line,
            message,
        })
    }

    /// Parses configuration text. Errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<Config, (u32, String)> {
        let mut cfg = Config::default();
        let mut seen: Vec<&str> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = u32::try_from(idx).unwrap_or(u32::MAX).saturating_add(1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |m: String| (line_no, m);
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err("expected key = value".into()))?;
            let key = key.trim();
            let value = value.trim();
            if seen.contains(&key) {
                return Err(err(format!("{key} is set twice")));
            }
            match key {
                "policy" => {
                    cfg.policy = Policy::parse(value).ok_or_else(|| {
                        err(format!("policy {value:?} is not one of: off, resync"))
                    })?
                }
                "report_dir" => cfg.report_dir = absolute_path(value).map_err(err)?,
                "virsh" => cfg.virsh = absolute_path(value).map_err(err)?,
                "qemu_run_dir" => cfg.qemu_run_dir = absolute_path(value).map_err(err)?,
                "uri" => {
                    if value.is_empty()
                        || value.len() > 255
                        || !value.bytes().all(|b| b.is_ascii_graphic())
                        || !value.contains(":/")
                    {
                        return Err(err(format!("uri {value:?} is not a libvirt URI")));
                    }
                    cfg.uri = value.to_owned();
                }
                "set_method" => {
                    cfg.set_method = SetMethod::parse(value).ok_or_else(|| {
                        err(format!(
                            "set_method {value:?} is not one of: aligned, now, sync"
                        ))
                    })?
                }
                "retry_interval_ms" => {
                    cfg.retry_interval_ms = bounded(value, 100, 60_000).map_err(err)?
                }
                "agent_timeout_s" => cfg.agent_timeout_s = bounded(value, 1, 3600).map_err(err)?,
                "run_wait_s" => cfg.run_wait_s = bounded(value, 1, 86_400).map_err(err)?,
                "command_timeout_s" => {
                    cfg.command_timeout_s = bounded(value, 1, 600).map_err(err)?
                }
                other => {
                    return Err(err(format!(
                        "unknown key {:?} (known: policy, report_dir, virsh, uri, set_method, \
                         retry_interval_ms, agent_timeout_s, run_wait_s, command_timeout_s, \
                         qemu_run_dir)",
                        super::args::clip(other, 40)
                    )))
                }
            }
            seen.push(key);
        }
        Ok(cfg)
    }
}

fn absolute_path(value: &str) -> Result<PathBuf, String> {
    if !value.starts_with('/')
        || value.len() > 4096
        || value.chars().any(char::is_control)
        || value.split('/').any(|c| c == "..")
    {
        return Err(format!(
            "{:?} is not an absolute path without '..'",
            super::args::clip(value, 80)
        ));
    }
    Ok(PathBuf::from(value))
}

fn bounded(value: &str, min: u32, max: u32) -> Result<u32, String> {
    let n: u32 =
        if !value.is_empty() && value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()) {
            value
                .parse()
                .map_err(|_| format!("{value:?} is not a number"))?
        } else {
            return Err(format!(
                "{:?} is not a number",
                super::args::clip(value, 40)
            ));
        };
    if n < min || n > max {
        return Err(format!("{n} is outside {min}..={max}"));
    }
    Ok(n)
}
