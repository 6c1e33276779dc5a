//! The libvirt hook's inputs other than the domain XML, on arbitrary bytes
//! split at NUL into arguments (not necessarily UTF-8):
//! - `HookArgs::parse` (libvirt's `NAME OP SUBOP EXTRA`), on the first four
//!   arguments and on all of them;
//! - `ResyncRequest::from_args` (the resync helper's options);
//! - `DomainName::parse`, `DomainUuid::parse` and `Trigger::parse` on each
//!   argument;
//! - `QemuCmdline::parse` on the raw bytes (a `/proc/PID/cmdline`);
//! - `Config::parse` on the bytes as text (`libvirt.conf`).
//!
//! Properties beyond "no panic":
//! - accepted hook arguments keep `NAME`, `OP` and `SUBOP` as given, and
//!   `EXTRA` unless it is `-` or empty;
//! - an accepted name has 1 to 255 bytes, no `/` and no control character,
//!   and `as_path_component` gives it only when `path_component_ok` does;
//! - an accepted UUID is 36 lowercase characters, dashes at 8, 13, 18, 23;
//! - a `Trigger` parses back from its own spelling;
//! - a parsed resync request, turned back into arguments, parses equal.

#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use clockcarry_libvirt::args::path_component_ok;
use clockcarry_libvirt::{
    Config, DomainName, DomainUuid, HookArgs, QemuCmdline, ResyncRequest, SubOp, Trigger,
};
use libfuzzer_sys::fuzz_target;

fn check_name(name: &DomainName) {
    let s = name.as_str();
    assert!(!s.is_empty() && s.len() <= 255, "name of {} bytes", s.len());
    assert!(
        !s.contains('/') && !s.chars().any(char::is_control),
        "{s:?}"
    );
    assert_eq!(name.as_path_component().is_some(), path_component_ok(s));
    if let Some(c) = name.as_path_component() {
        assert!(c != "." && c != ".." && !c.contains('/'), "{c:?}");
    }
    let _ = name.to_string();
}

fn check_uuid(uuid: &DomainUuid) {
    let s = uuid.as_str();
    assert_eq!(s.len(), 36, "{s:?}");
    for (i, b) in s.bytes().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            assert_eq!(b, b'-', "{s:?}");
        } else {
            assert!(b.is_ascii_digit() || (b'a'..=b'f').contains(&b), "{s:?}");
        }
    }
}

fn check_hook_args(args: &[OsString]) {
    match HookArgs::parse(args) {
        Ok(parsed) => {
            assert_eq!(args.len(), 4);
            check_name(&parsed.name);
            assert_eq!(parsed.name.as_str().as_bytes(), args[0].as_bytes());
            assert_eq!(parsed.op.as_str().as_bytes(), args[1].as_bytes());
            assert_eq!(parsed.subop.as_str().as_bytes(), args[2].as_bytes());
            let extra = args[3].as_bytes();
            match &parsed.extra {
                None => assert!(extra == b"-" || extra.is_empty()),
                Some(e) => assert_eq!(e.as_bytes(), extra),
            }
            if matches!(parsed.subop, SubOp::None) {
                assert_eq!(args[2].as_bytes(), b"-");
            }
            let _ = parsed.stdout_is_xml();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = data
        .split(|b| *b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();

    check_hook_args(&args[..args.len().min(4)]);
    check_hook_args(&args);

    for arg in &args {
        if let Ok(name) = DomainName::parse(arg) {
            check_name(&name);
            assert_eq!(name.as_str().as_bytes(), arg.as_bytes());
        }
        if let Some(text) = arg.to_str() {
            if let Ok(uuid) = DomainUuid::parse(text) {
                check_uuid(&uuid);
                assert_eq!(uuid.as_str(), text.trim().to_ascii_lowercase());
            }
            if let Some(trigger) = Trigger::parse(text) {
                assert_eq!(trigger.as_str(), text);
                assert_eq!(Trigger::parse(trigger.as_str()), Some(trigger));
            }
        }
    }

    match ResyncRequest::from_args(&args) {
        Ok(request) => {
            check_uuid(&request.uuid);
            check_name(&request.name);
            assert!(request.config_path.is_absolute() && request.state_dir.is_absolute());
            let again = ResyncRequest::from_args(&request.to_args())
                .expect("a request's own arguments parse");
            assert_eq!(again, request);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    let cmdline = QemuCmdline::parse(data);
    if let Some(uuid) = &cmdline.uuid {
        assert!(!uuid.bytes().any(|b| b.is_ascii_uppercase()), "{uuid:?}");
    }

    if let Ok(text) = std::str::from_utf8(data) {
        match Config::parse(text) {
            Ok(config) => {
                let _ = format!("{config:?}");
            }
            Err((line, msg)) => {
                assert!(line >= 1, "error on line {line}: {msg}");
            }
        }
    }
});
