//! `clockcarry libvirt ...`: the subcommand's own small argument parser, so
//! the CLI only has to hand over the words after `libvirt`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use super::{HookEnv, InstallMode, InstallOptions, EXIT_USAGE};

/// Help text of `clockcarry libvirt`.
pub const USAGE: &str = "\
usage: clockcarry libvirt <command>

  hook NAME OP SUBOP EXTRA    run as libvirt's QEMU hook (domain XML on stdin)
  install [--hooks-dir DIR] [--symlink] [--force] [--config PATH]
                              place this binary as DIR/clockcarry
                              (default /etc/libvirt/hooks/qemu.d), mode 0755,
                              root-owned; then reload libvirtd yourself
  uninstall [--hooks-dir DIR] [--force]
                              remove it
  resync ARGS...              the detached resync helper (started by the hook)

Per-domain opt-in: <metadata><clockcarry:clock
xmlns:clockcarry=\"https://clockcarry.dev/libvirt/1\" policy=\"resync\"/></metadata>
Host default: /etc/clockcarry/libvirt.conf (policy = off|resync). See docs/libvirt.md.
";

/// Runs `clockcarry libvirt ARGS`; `args` are the words after `libvirt`.
/// Returns the exit status.
pub fn command_main(args: &[OsString]) -> i32 {
    let Some(cmd) = args.first().and_then(|a| a.to_str()) else {
        eprint!("{USAGE}");
        return EXIT_USAGE;
    };
    let rest = &args[1..];
    match cmd {
        "hook" => {
            let env = HookEnv::system();
            super::hook_main(rest, &mut std::io::stdin().lock(), &env)
        }
        "resync" => super::resync_main(rest),
        "install" | "uninstall" => {
            let opts = match install_options(rest, cmd == "install") {
                Ok(o) => o,
                Err(m) => {
                    eprintln!("clockcarry libvirt {cmd}: {m}\n\n{USAGE}");
                    return EXIT_USAGE;
                }
            };
            let result = if cmd == "install" {
                super::install(&opts)
            } else {
                super::uninstall(&opts)
            };
            match result {
                Ok(outcome) => {
                    let mut out = std::io::stdout().lock();
                    for m in &outcome.messages {
                        let _ = writeln!(out, "{m}");
                    }
                    0
                }
                Err(e) => {
                    eprintln!("clockcarry libvirt {cmd}: {e}");
                    1
                }
            }
        }
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            0
        }
        other => {
            eprintln!("clockcarry libvirt: unknown command {other:?}\n\n{USAGE}");
            EXIT_USAGE
        }
    }
}

fn install_options(args: &[OsString], install: bool) -> Result<InstallOptions, String> {
    let mut opts = InstallOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| -> Result<PathBuf, String> {
            let v = it.next().ok_or_else(|| format!("{what} needs a value"))?;
            Ok(PathBuf::from(v))
        };
        match a.to_str().unwrap_or("") {
            "--hooks-dir" => opts.hooks_dir = value("--hooks-dir")?,
            "--config" if install => opts.config_path = value("--config")?,
            "--symlink" if install => opts.mode = InstallMode::Symlink,
            "--force" => opts.force = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}
