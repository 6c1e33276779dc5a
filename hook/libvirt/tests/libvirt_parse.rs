//! libvirt hook input parsing: argv, domain XML (real libvirt 9 samples and
//! hostile ones), the host configuration.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use clockcarry_libvirt::config::{Config, SetMethod};
use clockcarry_libvirt::domain_xml::{read_xml, MAX_XML_BYTES};
use clockcarry_libvirt::{
    is_hook_invocation, parse_domain_xml, DomainName, DomainUuid, HookArgs, LibvirtError, Op,
    Policy, SubOp,
};
use proptest::prelude::*;

fn data(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/libvirt")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

const WEB_UUID: &str = "1c97934c-11eb-4ae7-ae15-dbedb0b05918";
const REAL_SAMPLES: [&str; 5] = [
    "libvirt9-web-01.prod-prepare-begin.xml",
    "libvirt9-web-01.prod-restore-begin.xml",
    "libvirt9-web-01.prod-started-begin.xml",
    "libvirt9-web-01.prod-stopped-end.xml",
    "libvirt9-web-01.prod-release-end.xml",
];

// ---------------------------------------------------------------- argv

#[test]
fn argv_every_libvirt_call() {
    let cases: [(&str, &str, Op, SubOp); 11] = [
        ("prepare", "begin", Op::Prepare, SubOp::Begin),
        ("start", "begin", Op::Start, SubOp::Begin),
        ("started", "begin", Op::Started, SubOp::Begin),
        ("stopped", "end", Op::Stopped, SubOp::End),
        ("release", "end", Op::Release, SubOp::End),
        ("migrate", "begin", Op::Migrate, SubOp::Begin),
        ("restore", "begin", Op::Restore, SubOp::Begin),
        ("reconnect", "begin", Op::Reconnect, SubOp::Begin),
        ("attach", "begin", Op::Attach, SubOp::Begin),
        ("started", "-", Op::Started, SubOp::None),
        (
            "frobnicate",
            "later",
            Op::Other("frobnicate".into()),
            SubOp::Other("later".into()),
        ),
    ];
    for (op, sub, want_op, want_sub) in cases {
        let a = HookArgs::parse(&os(&["web-01.prod", op, sub, "-"])).unwrap();
        assert_eq!(a.name.as_str(), "web-01.prod");
        assert_eq!(a.op, want_op);
        assert_eq!(a.subop, want_sub);
        assert_eq!(a.extra, None);
        assert_eq!(a.op.as_str(), op);
        assert_eq!(a.subop.as_str(), sub);
        assert_eq!(
            a.stdout_is_xml(),
            matches!((op, sub), ("migrate", "begin") | ("restore", "begin"))
        );
    }
    // libvirt >= 10.5.0 passes the shutoff reason on release end.
    let a = HookArgs::parse(&os(&["vm", "release", "end", "from snapshot"])).unwrap();
    assert_eq!(a.extra.as_deref(), Some("from snapshot"));
}

#[test]
fn argv_wrong_shape_is_a_usage_error() {
    for v in [
        vec![],
        vec!["vm"],
        vec!["vm", "started", "begin"],
        vec!["vm", "started", "begin", "-", "extra"],
        vec!["vm", "", "begin", "-"],
        vec!["vm", "sta rted", "begin", "-"],
        vec!["vm", "started", "begin\n", "-"],
        vec!["vm", "started", "begin", "a\tb"],
    ] {
        match HookArgs::parse(&os(&v)) {
            Err(LibvirtError::Usage(_)) => {}
            other => panic!("{v:?}: {other:?}"),
        }
    }
    let long = "x".repeat(300);
    assert!(matches!(
        HookArgs::parse(&os(&["vm", &long, "begin", "-"])),
        Err(LibvirtError::Usage(_))
    ));
    assert!(matches!(
        HookArgs::parse(&os(&["vm", "started", "begin", &long])),
        Err(LibvirtError::Usage(_))
    ));
}

#[test]
fn hostile_names_refused() {
    let long = "a".repeat(256);
    for bad in [
        "",
        "a/b",
        "../../etc/passwd",
        "/abs",
        "x\ny",
        "tab\there",
        "nul\u{7f}",
        &long,
    ] {
        let err = DomainName::parse(std::ffi::OsStr::new(bad)).unwrap_err();
        assert!(
            matches!(err, LibvirtError::BadName { .. }),
            "{bad:?}: {err:?}"
        );
        assert!(matches!(
            HookArgs::parse(&os(&[bad, "started", "begin", "-"])),
            Err(LibvirtError::BadName { .. })
        ));
    }
    let non_utf8 = OsString::from_vec(vec![b'v', 0xff, b'm']);
    assert!(DomainName::parse(&non_utf8).is_err());
    // 255 bytes is fine.
    assert!(DomainName::parse(std::ffi::OsStr::new(&"a".repeat(255))).is_ok());
}

#[test]
fn names_become_paths_only_through_the_allow_list() {
    let ok = ["web-01.prod", "db_02", "a+b:c@d", "X", "vm.."];
    for n in ok {
        let name = DomainName::parse(std::ffi::OsStr::new(n)).unwrap();
        assert_eq!(name.as_path_component(), Some(n), "{n}");
    }
    // Accepted as names (libvirt allows them) but never used in a path.
    let no_path = [
        "..",
        ".",
        ".hidden",
        "-rf",
        "my vm",
        "日本語",
        "a*b",
        "a\\b",
        "$(reboot)",
        "`id`",
        "a'b\"",
    ];
    for n in no_path {
        let name = DomainName::parse(std::ffi::OsStr::new(n)).unwrap();
        assert_eq!(name.as_path_component(), None, "{n}");
    }
    // Display escapes whatever the name holds.
    let name = DomainName::parse(std::ffi::OsStr::new("a\"b")).unwrap();
    assert_eq!(name.to_string(), "\"a\\\"b\"");
}

#[test]
fn uuids() {
    let u = DomainUuid::parse("5F0C2E8A-3B1D-4C6E-9A7B-2D4E6F8A0B1C").unwrap();
    assert_eq!(u.as_str(), "5f0c2e8a-3b1d-4c6e-9a7b-2d4e6f8a0b1c");
    assert_eq!(
        DomainUuid::parse(&format!("  {WEB_UUID}\n"))
            .unwrap()
            .as_str(),
        WEB_UUID
    );
    for bad in [
        "",
        "1c97934c11eb4ae7ae15dbedb0b05918",
        "1c97934c-11eb-4ae7-ae15-dbedb0b0591",
        "1c97934c-11eb-4ae7-ae15-dbedb0b059188",
        "1c97934c-11eb-4ae7-ae15_dbedb0b05918",
        "1c97934g-11eb-4ae7-ae15-dbedb0b05918",
        "../../../../tmp/clockcarry-pwn-xxxxx",
        "1c97934c-11eb-4ae7-ae15-dbedb0b0591é",
    ] {
        assert!(DomainUuid::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn hook_paths_are_recognised() {
    for p in [
        "/etc/libvirt/hooks/qemu.d/clockcarry",
        "/etc/libvirt/hooks/qemu.d/50-anything",
        "/etc/libvirt/hooks/qemu",
        "/usr/local/etc/libvirt/hooks/qemu.d/clockcarry",
    ] {
        assert!(is_hook_invocation(std::ffi::OsStr::new(p)), "{p}");
    }
    for p in [
        "clockcarry",
        "/usr/bin/clockcarry",
        "./target/debug/clockcarry",
        "/etc/libvirt/hooks/network.d/clockcarry",
        "/etc/libvirt/qemu.d/clockcarry",
        "qemu.d/clockcarry",
        "/etc/libvirt/hooks/lxc",
    ] {
        assert!(!is_hook_invocation(std::ffi::OsStr::new(p)), "{p}");
    }
    // Not a hook, no hidden argument: main goes on with its own parsing.
    assert_eq!(
        clockcarry_libvirt::dispatch(&os(&["/usr/bin/clockcarry", "--help"])),
        None
    );
    assert_eq!(clockcarry_libvirt::dispatch(&[]), None);
}

// ---------------------------------------------------------------- XML

#[test]
fn real_libvirt9_samples() {
    for f in REAL_SAMPLES {
        let info = parse_domain_xml(&data(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(info.name.as_str(), "web-01.prod", "{f}");
        assert_eq!(info.uuid.as_str(), WEB_UUID, "{f}");
        assert_eq!(info.domain_type, "qemu", "{f}");
        assert_eq!(info.policy, Some(Policy::Resync), "{f}");
    }
}

#[test]
fn kvm_sample_without_our_metadata() {
    let info = parse_domain_xml(&data("kvm-db-02-started-begin.xml")).unwrap();
    assert_eq!(info.name.as_str(), "db-02");
    assert_eq!(info.uuid.as_str(), "5f0c2e8a-3b1d-4c6e-9a7b-2d4e6f8a0b1c");
    assert_eq!(info.domain_type, "kvm");
    assert_eq!(info.policy, None);
}

fn started() -> String {
    data("libvirt9-web-01.prod-started-begin.xml")
}

const OUR_LINE: &str =
    r#"<clockcarry:clock xmlns:clockcarry="https://clockcarry.dev/libvirt/1" policy="resync"/>"#;

fn with_metadata_line(line: &str) -> String {
    let xml = started();
    assert!(xml.contains(OUR_LINE));
    xml.replace(OUR_LINE, line)
}

#[test]
fn metadata_variants() {
    // No <metadata> at all.
    let xml = started();
    let start = xml.find("  <metadata>").unwrap();
    let end = xml.find("</metadata>\n").unwrap() + "</metadata>\n".len();
    let bare = format!("{}{}", &xml[..start], &xml[end..]);
    assert_eq!(parse_domain_xml(&bare).unwrap().policy, None);
    // Metadata without our element.
    assert_eq!(
        parse_domain_xml(&with_metadata_line("")).unwrap().policy,
        None
    );
    // policy off.
    let off = with_metadata_line(&OUR_LINE.replace("resync", "off"));
    assert_eq!(parse_domain_xml(&off).unwrap().policy, Some(Policy::Off));
    // Any prefix, or a default namespace: the namespace decides.
    for line in [
        r#"<cc:clock xmlns:cc="https://clockcarry.dev/libvirt/1" policy="resync"/>"#,
        r#"<clock xmlns="https://clockcarry.dev/libvirt/1" policy="resync"></clock>"#,
        r#"<clockcarry:clock xmlns:clockcarry='https://clockcarry.dev/libvirt/1' policy='resync' future='x'><clockcarry:note>hi</clockcarry:note></clockcarry:clock>"#,
    ] {
        assert_eq!(
            parse_domain_xml(&with_metadata_line(line)).unwrap().policy,
            Some(Policy::Resync),
            "{line}"
        );
    }
    // Same local name in another namespace, or no namespace: not ours.
    for line in [
        r#"<clockcarry:clock xmlns:clockcarry="https://clockcarry.dev/libvirt/2" policy="resync"/>"#,
        r#"<x:clock xmlns:x="http://example.com/clock" policy="resync"/>"#,
        r#"<x:policy xmlns:x="https://clockcarry.dev/libvirt/1">resync</x:policy>"#,
    ] {
        assert_eq!(
            parse_domain_xml(&with_metadata_line(line)).unwrap().policy,
            None,
            "{line}"
        );
    }
    // Ours but wrong: refused (the hook then does nothing).
    for line in [
        &OUR_LINE.replace("resync", "RESYNC"),
        &OUR_LINE.replace("resync", ""),
        &OUR_LINE.replace(r#" policy="resync""#, ""),
        &format!("{OUR_LINE}{OUR_LINE}"),
    ] {
        assert!(
            matches!(
                parse_domain_xml(&with_metadata_line(line)),
                Err(LibvirtError::Xml(_))
            ),
            "{line}"
        );
    }
}

#[test]
fn structural_errors() {
    let xml = started();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("not xml at all".into(), "text"),
        (
            xml.replacen("<domain type='qemu' id='8'>", "<dom type='qemu'>", 1)
                .replacen("</domain>", "</dom>", 1),
            "root",
        ),
        (
            xml.replacen(
                "<domain type='qemu' id='8'>",
                "<domain xmlns='urn:x' type='qemu'>",
                1,
            ),
            "namespaced root",
        ),
        (
            xml.replacen("  <name>web-01.prod</name>\n", "", 1),
            "no name",
        ),
        (
            xml.replacen(&format!("  <uuid>{WEB_UUID}</uuid>\n"), "", 1),
            "no uuid",
        ),
        (
            xml.replacen(
                "  <name>web-01.prod</name>\n",
                "  <name>web-01.prod</name>\n  <name>other</name>\n",
                1,
            ),
            "two names",
        ),
        (
            xml.replacen("  <metadata>", "  <metadata/>\n  <metadata>", 1),
            "two metadata",
        ),
        (
            xml.replacen("type='qemu'", "type='qemu kvm'", 1),
            "odd type",
        ),
        (xml.replacen("</domain>", "", 1), "truncated"),
        (xml.replacen(WEB_UUID, "not-a-uuid", 1), "bad uuid"),
    ];
    for (doc, what) in cases {
        assert!(parse_domain_xml(&doc).is_err(), "{what}");
    }
}

#[test]
fn hostile_samples_refused() {
    for f in [
        "hostile-billion-laughs.xml",
        "hostile-external-entity.xml",
        "hostile-name-traversal.xml",
        "hostile-uuid-traversal.xml",
    ] {
        let err = parse_domain_xml(&data(f)).unwrap_err();
        match f {
            "hostile-name-traversal.xml" => {
                assert!(matches!(err, LibvirtError::BadName { .. }), "{f}: {err}")
            }
            "hostile-uuid-traversal.xml" => {
                assert!(matches!(err, LibvirtError::BadUuid { .. }), "{f}: {err}")
            }
            _ => assert!(matches!(err, LibvirtError::Xml(_)), "{f}: {err}"),
        }
    }
    // Control characters smuggled in through character references.
    let xml = started().replace("<name>web-01.prod</name>", "<name>web&#10;01</name>");
    assert!(matches!(
        parse_domain_xml(&xml),
        Err(LibvirtError::BadName { .. })
    ));
    // A 300-byte name.
    let xml = started().replace(
        "<name>web-01.prod</name>",
        &format!("<name>{}</name>", "n".repeat(300)),
    );
    assert!(matches!(
        parse_domain_xml(&xml),
        Err(LibvirtError::BadName { .. })
    ));
}

#[test]
fn oversized_input() {
    // A valid domain padded past 1 MiB with a comment.
    let xml = started();
    let pad = MAX_XML_BYTES - xml.len() + 1;
    let big = xml.replacen(
        "<metadata>",
        &format!("<!--{}--><metadata>", "x".repeat(pad)),
        1,
    );
    assert!(big.len() > MAX_XML_BYTES);
    assert!(parse_domain_xml(&big).is_err());
    let err = read_xml(&mut big.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    // An endless stream is cut one byte past the limit.
    let mut endless = std::io::repeat(b'<');
    assert!(read_xml(&mut endless).is_err());
    // Just under the limit is read and parsed.
    let fits = xml.replacen(
        "<metadata>",
        &format!("<!--{}--><metadata>", "x".repeat(pad - 100)),
        1,
    );
    assert!(fits.len() <= MAX_XML_BYTES);
    assert_eq!(read_xml(&mut fits.as_bytes()).unwrap().len(), fits.len());
    assert!(parse_domain_xml(&fits).is_ok());
    // Too many nodes within the byte limit.
    let many = xml.replacen(
        "<metadata>",
        &format!("{}<metadata>", "<x/>".repeat(150_000)),
        1,
    );
    assert!(many.len() < MAX_XML_BYTES);
    assert!(parse_domain_xml(&many).is_err());
    // Not UTF-8.
    let mut bytes = xml.into_bytes();
    bytes[20] = 0xff;
    assert!(read_xml(&mut bytes.as_slice()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn xml_parser_never_panics(s in ".{0,400}") {
        let _ = parse_domain_xml(&s);
    }

    #[test]
    fn mutated_samples_never_panic(pos in 0usize..3900, byte in any::<u8>()) {
        let mut bytes = started().into_bytes();
        let i = pos % bytes.len();
        bytes[i] = byte;
        if let Ok(s) = String::from_utf8(bytes) {
            let _ = parse_domain_xml(&s);
        }
    }

    #[test]
    fn argv_never_panics(v in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6)) {
        let args: Vec<OsString> = v.into_iter().map(OsString::from_vec).collect();
        if let Ok(a) = HookArgs::parse(&args) {
            if let Some(c) = a.name.as_path_component() {
                prop_assert!(!c.contains('/') && c != "." && c != "..");
            }
        }
    }
}

// ---------------------------------------------------------------- config

#[test]
fn config_full() {
    let text = "\
# clockcarry libvirt hook
policy = resync
report_dir = /srv/reports
virsh=/usr/local/bin/virsh
uri = qemu+ssh://root@host/system
set_method = now

retry_interval_ms = 500
agent_timeout_s = 120
run_wait_s = 7200
command_timeout_s = 10
qemu_run_dir = /var/run/libvirt/qemu
";
    let c = Config::parse(text).unwrap();
    assert_eq!(c.policy, Policy::Resync);
    assert_eq!(c.report_dir, PathBuf::from("/srv/reports"));
    assert_eq!(c.virsh, PathBuf::from("/usr/local/bin/virsh"));
    assert_eq!(c.uri, "qemu+ssh://root@host/system");
    assert_eq!(c.set_method, SetMethod::Now);
    assert_eq!(c.retry_interval_ms, 500);
    assert_eq!(c.agent_timeout_s, 120);
    assert_eq!(c.run_wait_s, 7200);
    assert_eq!(c.command_timeout_s, 10);
    assert_eq!(c.qemu_run_dir, PathBuf::from("/var/run/libvirt/qemu"));
    let d = Config::parse("").unwrap();
    assert_eq!(d, Config::default());
    assert_eq!(d.policy, Policy::Off);
    assert_eq!(d.set_method, SetMethod::Aligned);
    assert_eq!(d.uri, "qemu:///system");
    assert_eq!(d.virsh, PathBuf::from("/usr/bin/virsh"));
}

#[test]
fn config_strict() {
    let bad = [
        ("policy = maybe", 1),
        ("policy = resync\npolicy = off", 2),
        ("polcy = resync", 1),
        ("just words", 1),
        ("report_dir = relative/dir", 1),
        ("report_dir = /var/../etc", 1),
        ("virsh = virsh", 1),
        ("uri = ", 1),
        ("uri = not a uri", 1),
        ("set_method = fast", 1),
        ("retry_interval_ms = 10", 1),
        ("retry_interval_ms = -5", 1),
        ("agent_timeout_s = 99999999999", 1),
        ("run_wait_s = 0", 1),
        ("# ok\n\ncommand_timeout_s = 1e3", 3),
    ];
    for (text, line) in bad {
        let (l, msg) = Config::parse(text).unwrap_err();
        assert_eq!(l, line, "{text:?}: {msg}");
    }
}

#[test]
fn config_files() {
    let dir = tempdir();
    // Missing: defaults.
    assert_eq!(
        Config::load(&dir.join("none.conf")).unwrap(),
        Config::default()
    );
    let p = dir.join("libvirt.conf");
    std::fs::write(&p, "policy = resync\n").unwrap();
    assert_eq!(Config::load(&p).unwrap().policy, Policy::Resync);
    std::fs::write(&p, "policy = resync\nbogus = 1\n").unwrap();
    let err = Config::load(&p).unwrap_err().to_string();
    assert!(err.contains("libvirt.conf:2:"), "{err}");
    std::fs::write(&p, "#".repeat(70_000)).unwrap();
    assert!(Config::load(&p).is_err());
    std::fs::write(&p, [b'p', 0xff, b'\n']).unwrap();
    assert!(Config::load(&p).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "clockcarry-libvirt-parse-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn shipped_examples_parse() {
    // hook/libvirt -> the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The example config spells out the defaults.
    let c = Config::load(&root.join("examples/libvirt/libvirt.conf")).unwrap();
    assert_eq!(c, Config::default());
    // The metadata snippet, put where libvirt keeps it, opts the domain in.
    let snippet = std::fs::read_to_string(root.join("examples/libvirt/metadata.xml")).unwrap();
    let element = snippet
        .lines()
        .find(|l| l.starts_with("<clockcarry:clock"))
        .unwrap();
    let xml = started().replace(OUR_LINE, &element.replace("resync", "off"));
    assert_eq!(parse_domain_xml(&xml).unwrap().policy, Some(Policy::Off));
    let xml = started().replace(OUR_LINE, element);
    assert_eq!(parse_domain_xml(&xml).unwrap().policy, Some(Policy::Resync));
    // The integration test's domain template, filled in.
    let tpl = std::fs::read_to_string(root.join("integration/libvirt/domain.xml.in")).unwrap();
    let xml = tpl
        .replace("@NAME@", "clockcarry-it-1")
        .replace("@POLICY@", "resync")
        .replace("@KERNEL@", "/k")
        .replace("@INITRD@", "/i")
        .replace("@SERIAL_LOG@", "/s")
        .replace("<name>", &format!("<uuid>{WEB_UUID}</uuid>\n  <name>"));
    let info = parse_domain_xml(&xml).unwrap();
    assert_eq!(info.policy, Some(Policy::Resync));
    assert_eq!(info.domain_type, "qemu");
}
