//! The `clockcarry` command.
//!
//! One binary, two entry points chosen by how it was invoked (argv[0]),
//! before any argument parsing:
//!
//! - as a libvirt QEMU hook (installed as `/etc/libvirt/hooks/qemu` or
//!   under `/etc/libvirt/hooks/qemu.d/`): libvirt passes
//!   `<domain> <operation> <sub-operation> <extra>` and the domain XML on
//!   stdin, which clap must never see;
//! - otherwise the `clockcarry` command line (cli/).

mod cli;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

/// How the binary was invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invocation {
    /// The `clockcarry` command line.
    Command,
    /// A libvirt QEMU hook.
    LibvirtHook,
}

/// Decides the entry point from argv[0]: a file named `qemu` in a `hooks`
/// directory, or any file in a `qemu.d` directory under `hooks`, is the
/// libvirt hook.
fn invocation(argv0: Option<&OsString>) -> Invocation {
    let Some(path) = argv0.map(Path::new) else {
        return Invocation::Command;
    };
    let parent = path.parent();
    let parent_name = parent.and_then(Path::file_name);
    let grandparent_name = parent.and_then(Path::parent).and_then(Path::file_name);
    let name = path.file_name();
    let is_hooks = |n: Option<&std::ffi::OsStr>| n.is_some_and(|n| n == "hooks");
    if name.is_some_and(|n| n == "qemu") && is_hooks(parent_name) {
        return Invocation::LibvirtHook;
    }
    if parent_name.is_some_and(|n| n == "qemu.d") && is_hooks(grandparent_name) {
        return Invocation::LibvirtHook;
    }
    Invocation::Command
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // The hook's detached resync helper re-executes this binary from
    // wherever it lives (a symlinked hook resolves to the real path).
    if args
        .get(1)
        .is_some_and(|a| a == clockcarry_libvirt::RESYNC_ARG)
    {
        return libvirt_entry(&args);
    }
    match invocation(args.first()) {
        Invocation::LibvirtHook => libvirt_entry(&args),
        Invocation::Command => cli::run(args),
    }
}

/// The libvirt entry points (docs/libvirt.md): the resync helper when the
/// first argument is the hidden [`clockcarry_libvirt::RESYNC_ARG`], else
/// the hook (`NAME OP SUBOP EXTRA`, domain XML on stdin; never prints to
/// stdout, exits 0 unless the command line is malformed).
fn libvirt_entry(args: &[OsString]) -> ExitCode {
    use clockcarry_libvirt as libvirt;
    let code = match args.get(1) {
        Some(a) if a == libvirt::RESYNC_ARG => libvirt::resync_main(&args[2..]),
        _ => libvirt::hook_main(
            args.get(1..).unwrap_or_default(),
            &mut std::io::stdin().lock(),
            &libvirt::HookEnv::system(),
        ),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(s: &str) -> Invocation {
        invocation(Some(&OsString::from(s)))
    }

    #[test]
    fn argv0_dispatch() {
        assert_eq!(inv("clockcarry"), Invocation::Command);
        assert_eq!(inv("/usr/bin/clockcarry"), Invocation::Command);
        assert_eq!(inv("/etc/libvirt/hooks/qemu"), Invocation::LibvirtHook);
        assert_eq!(
            inv("/etc/libvirt/hooks/qemu.d/50-clockcarry"),
            Invocation::LibvirtHook
        );
        assert_eq!(inv("/tmp/qemu"), Invocation::Command);
        assert_eq!(inv("/tmp/qemu.d/x"), Invocation::Command);
        assert_eq!(invocation(None), Invocation::Command);
    }
}
