//! Sidecar v1: round trips, every refusal, fuzzing, atomic writes, schema.
//!
//! Fixtures live in `tests/data/sidecar/`. After an intended format change,
//! regenerate them with `CLOCKCARRY_BLESS=1 cargo test -p clockcarry --test
//! sidecar fixtures` and paste `example-v1-hmac.json` into docs/sidecar.md.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clockcarry::model::{
    Capabilities, ClockQuality, HostIdentity, HostSample, KvmClockSample, LeapPending,
    OffsetEstimate, Pvti, PvtiSource, RunState, TscFlags, TscScaling, VcpuOffset, VmClock,
};
use clockcarry::sidecar::{
    read_bounded, write_atomic, Sidecar, SidecarBody, SidecarError, SidecarKey, StagedFile, FORMAT,
    MAX_SIDECAR_BYTES, VERSION,
};
use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- helpers

const TSC_KHZ: u32 = 2_445_411;
const OFFSET: i64 = -26_566_304_618;
const HOST_TSC: u64 = 26_708_009_702;
const REALTIME_NS: u64 = 1_795_749_100_360_527_731;
const TAI_OFFSET_S: i32 = 37;
const TAI_NS: u64 = REALTIME_NS + 37_000_000_000;
const KEY_A: &[u8] = b"clockcarry-test-key-A-not-secret";
const KEY_B: &[u8] = b"clockcarry-test-key-B-not-secret";

fn host() -> HostIdentity {
    HostIdentity {
        hostname: "lab-a.example.net".into(),
        boot_id: "4f0d1c2e-9a7b-4c59-8a51-3b1f6f0e2d71".into(),
        kernel_release: "6.12.0-clockcarry".into(),
        tsc_khz: TSC_KHZ,
        tsc_flags: TscFlags {
            constant_tsc: true,
            nonstop_tsc: true,
            tsc_known_freq: true,
        },
        clocksource: "tsc".into(),
    }
}

fn capture() -> HostSample {
    HostSample {
        host_tsc: HOST_TSC,
        tai_ns: TAI_NS,
        realtime_ns: REALTIME_NS,
        tai_offset_s: TAI_OFFSET_S,
        uncertainty_ns: 18,
        quality: ClockQuality {
            synchronised: true,
            maxerror_ns: 1_500_000,
            esterror_ns: 120_000,
            leap_pending: LeapPending::None,
        },
    }
}

fn vm_clock(vcpus: u32) -> VmClock {
    // The guest TSC at the KVM_GET_CLOCK host_tsc is HOST_TSC + OFFSET; the
    // PVTI passes through (that TSC, that kvm-clock), as a derived PVTI does.
    let guest_tsc = HOST_TSC.wrapping_add_signed(OFFSET);
    VmClock {
        state: RunState::Running,
        tsc_khz: TSC_KHZ,
        vcpus: (0..vcpus)
            .map(|id| VcpuOffset {
                id,
                tsc_offset: OFFSET,
            })
            .collect(),
        kvmclock: KvmClockSample {
            clock_ns: 211_451_127,
            flags: 14,
            realtime_ns: REALTIME_NS,
            host_tsc: HOST_TSC,
        },
        pvti: Some(Pvti {
            tsc_timestamp: guest_tsc,
            system_time: 211_451_127,
            tsc_to_system_mul: 3_512_675_207,
            tsc_shift: -1,
            flags: 1,
        }),
        pvti_source: Some(PvtiSource::Derived),
        tsc_scaling: None,
        capabilities: Capabilities {
            tsc_offset_effective: true,
            clock_guest: false,
            tsc_scaling: false,
            adjust_clock: 14,
        },
    }
}

/// The realistic 2-vCPU body every test starts from.
fn body() -> SidecarBody {
    body_with(2)
}

fn body_with(vcpus: u32) -> SidecarBody {
    let mut b = SidecarBody::new(
        "3f2b8c1e-5d47-4a0e-9c61-0b7e2d9f4a18",
        host(),
        capture(),
        vm_clock(vcpus),
    );
    // Fixed so the checked-in fixtures do not change with the crate version.
    b.created_by = "clockcarry 0.1.0".into();
    b
}

fn key_a() -> SidecarKey {
    SidecarKey::from_bytes(KEY_A).unwrap()
}

fn key_b() -> SidecarKey {
    SidecarKey::from_bytes(KEY_B).unwrap()
}

fn sealed(key: Option<&SidecarKey>) -> Sidecar {
    Sidecar::seal(body(), key).unwrap()
}

fn bytes_of(key: Option<&SidecarKey>) -> Vec<u8> {
    sealed(key).to_json_pretty()
}

fn value_of(key: Option<&SidecarKey>) -> Value {
    serde_json::from_slice(&bytes_of(key)).unwrap()
}

fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

/// Seals `body` without validating it (to build files the validator must
/// refuse): the digest is right, so only the semantic check can trip.
fn seal_unchecked(body: SidecarBody) -> Vec<u8> {
    let sha256 = body.sha256_hex().unwrap();
    Sidecar {
        body,
        integrity: clockcarry::sidecar::Integrity {
            sha256,
            hmac_sha256: None,
            key_id: None,
        },
    }
    .to_json_pretty()
}

/// Recomputes the digest of an edited document that still parses as a body.
fn reseal_value(mut v: Value) -> Vec<u8> {
    let mut body = v.clone();
    body.as_object_mut().unwrap().remove("integrity");
    let body: SidecarBody = serde_json::from_value(body).unwrap();
    v["integrity"]["sha256"] = json!(body.sha256_hex().unwrap());
    to_bytes(&v)
}

/// The error's message names its field, when it has one.
fn assert_names_field(err: &SidecarError, field: &str) {
    assert_eq!(err.field(), Some(field), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(field), "message {msg:?} does not name {field}");
}

fn parse_err(bytes: &[u8], key: Option<&SidecarKey>) -> SidecarError {
    match Sidecar::parse(bytes, key) {
        Ok(s) => panic!("parsed, but must be refused: {s:?}"),
        Err(e) => e,
    }
}

/// A fresh empty directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "clockcarry-sidecar-test-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sidecar")
}

// ------------------------------------------------------------- round trips

#[test]
fn round_trip_without_key() {
    let s = sealed(None);
    assert_eq!(s.body.format, FORMAT);
    assert_eq!(s.body.version, VERSION);
    assert_eq!(s.body.vm.vcpu_count, 2);
    assert_eq!(s.integrity.hmac_sha256, None);
    assert_eq!(s.integrity.key_id, None);
    let parsed = Sidecar::parse(&s.to_json_pretty(), None).unwrap();
    assert_eq!(parsed, s);
}

#[test]
fn round_trip_with_key() {
    let key = key_a();
    let s = sealed(Some(&key));
    assert_eq!(s.integrity.key_id.as_deref(), Some(key.id()));
    assert_eq!(s.integrity.hmac_sha256.as_ref().map(String::len), Some(64));
    let bytes = s.to_json_pretty();
    assert_eq!(Sidecar::parse(&bytes, Some(&key)).unwrap(), s);
    // Without a key it is accepted on its digest (a warning is logged).
    assert_eq!(Sidecar::parse(&bytes, None).unwrap(), s);
}

#[test]
fn new_fills_the_header() {
    let b = SidecarBody::new("vm", host(), capture(), vm_clock(3));
    assert_eq!(b.format, "clockcarry-sidecar");
    assert_eq!(b.version, 1);
    assert_eq!(b.vm.vcpu_count, 3);
    assert_eq!(b.offset_estimate, None);
    assert_eq!(
        b.created_by,
        format!("clockcarry {}", env!("CARGO_PKG_VERSION"))
    );
    b.validate().unwrap();
}

#[test]
fn digest_is_sha256_of_the_compact_body() {
    let s = sealed(None);
    let canonical = serde_json::to_vec(&s.body).unwrap();
    assert_eq!(s.body.canonical_bytes().unwrap(), canonical);
    let want: String = Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(s.integrity.sha256, want);
}

#[test]
fn layout_and_whitespace_do_not_matter() {
    // Minified, and with the keys in another order: same content, accepted.
    let v = value_of(Some(&key_a()));
    let compact = serde_json::to_vec(&v).unwrap(); // sorted keys, no spaces
    let s = Sidecar::parse(&compact, Some(&key_a())).unwrap();
    assert_eq!(s, sealed(Some(&key_a())));
}

#[test]
fn optional_fields_may_be_omitted() {
    let mut v = value_of(None);
    let obj = v.as_object_mut().unwrap();
    obj.remove("offset_estimate");
    obj["vm_clock"]
        .as_object_mut()
        .unwrap()
        .remove("tsc_scaling");
    obj["integrity"]
        .as_object_mut()
        .unwrap()
        .remove("hmac_sha256");
    obj["integrity"].as_object_mut().unwrap().remove("key_id");
    assert_eq!(Sidecar::parse(&to_bytes(&v), None).unwrap(), sealed(None));

    // A sidecar without a PVTI may leave out both PVTI fields.
    let mut b = body();
    b.vm_clock.pvti = None;
    b.vm_clock.pvti_source = None;
    let s = Sidecar::seal(b, None).unwrap();
    let mut v: Value = serde_json::from_slice(&s.to_json_pretty()).unwrap();
    let clock = v["vm_clock"].as_object_mut().unwrap();
    clock.remove("pvti");
    clock.remove("pvti_source");
    assert_eq!(Sidecar::parse(&to_bytes(&v), None).unwrap(), s);
}

#[test]
fn offset_estimate_round_trips() {
    let mut b = body();
    b.offset_estimate = Some(OffsetEstimate {
        offset_ns: -1_234_567,
        bound_ns: 85_000,
        ..OffsetEstimate::default()
    });
    let s = Sidecar::seal(b, None).unwrap();
    assert_eq!(Sidecar::parse(&s.to_json_pretty(), None).unwrap(), s);
}

/// An estimate without the measurement fields (as written before they
/// existed) reads, and is written back without them: same bytes, same
/// digest. With them, each is covered by the digest and checked.
#[test]
fn offset_estimate_measurement_fields_are_optional_and_checked() {
    let mut b = body();
    b.offset_estimate = Some(OffsetEstimate {
        offset_ns: 12,
        bound_ns: 34,
        ..OffsetEstimate::default()
    });
    let s = Sidecar::seal(b.clone(), None).unwrap();
    let text = String::from_utf8(s.to_json_pretty()).unwrap();
    assert!(!text.contains("measured_tai_ns"), "{text}");
    assert!(
        text.contains("\"offset_estimate\": {\n    \"offset_ns\": 12,\n    \"bound_ns\": 34\n  }")
    );
    assert_eq!(Sidecar::parse(text.as_bytes(), None).unwrap(), s);

    let measured = OffsetEstimate {
        measured_tai_ns: Some(1_795_749_137_000_000_000),
        rounds: Some(8),
        best_delay_ns: Some(61_000),
        ..b.offset_estimate.unwrap()
    };
    b.offset_estimate = Some(measured);
    let m = Sidecar::seal(b.clone(), None).unwrap();
    assert_ne!(m.integrity.sha256, s.integrity.sha256);
    assert_eq!(Sidecar::parse(&m.to_json_pretty(), None).unwrap(), m);

    for (bad, field) in [
        (
            OffsetEstimate {
                rounds: Some(0),
                ..measured
            },
            "offset_estimate.rounds",
        ),
        (
            OffsetEstimate {
                rounds: Some(clockcarry::peer::estimate::MAX_ROUNDS + 1),
                ..measured
            },
            "offset_estimate.rounds",
        ),
        (
            OffsetEstimate {
                measured_tai_ns: Some(0),
                ..measured
            },
            "offset_estimate.measured_tai_ns",
        ),
    ] {
        b.offset_estimate = Some(bad);
        let err = Sidecar::seal(b.clone(), None).unwrap_err();
        assert_eq!(err.field(), Some(field), "{err}");
    }
}

#[test]
fn output_is_pretty_flat_and_ordered() {
    let text = String::from_utf8(bytes_of(Some(&key_a()))).unwrap();
    assert!(text.starts_with("{\n  \"format\": \"clockcarry-sidecar\",\n  \"version\": 1,\n"));
    assert!(text.ends_with("}\n"));
    let at = |k: &str| text.find(&format!("\n  \"{k}\":")).unwrap();
    let order = [
        "format",
        "version",
        "vm",
        "source_host",
        "capture",
        "vm_clock",
        "offset_estimate",
        "created_by",
        "integrity",
    ];
    for w in order.windows(2) {
        assert!(at(w[0]) < at(w[1]), "{} before {}", w[0], w[1]);
    }
}

#[test]
fn a_255_vcpu_sidecar_is_small() {
    let s = Sidecar::seal(body_with(255), Some(&key_a())).unwrap();
    let bytes = s.to_json_pretty();
    assert!(bytes.len() < 24 * 1024, "{} bytes", bytes.len());
    assert_eq!(Sidecar::parse(&bytes, Some(&key_a())).unwrap(), s);
}

// ------------------------------------------------------------ each fault

#[test]
fn truncated() {
    let bytes = bytes_of(None);
    let err = parse_err(&bytes[..bytes.len() / 2], None);
    assert_eq!(err, SidecarError::Truncated);
    assert_eq!(err.field(), None);
    assert!(err.to_string().contains("truncated"));
    assert_eq!(parse_err(b"", None), SidecarError::Truncated);
    assert_eq!(parse_err(b"  \n", None), SidecarError::Truncated);
}

#[test]
fn not_json() {
    let err = parse_err(b"{\n  \"format\": clockcarry-sidecar\n}", None);
    match &err {
        SidecarError::NotJson { line, column, .. } => {
            assert_eq!(*line, 2);
            assert!(*column > 0);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("line 2"), "{err}");
    // Trailing garbage after a complete sidecar is not JSON either.
    let mut bytes = bytes_of(None);
    bytes.extend_from_slice(b"}");
    assert!(matches!(
        parse_err(&bytes, None),
        SidecarError::NotJson { .. }
    ));
}

#[test]
fn root_must_be_an_object() {
    for doc in [&b"[]"[..], b"1", b"\"clockcarry-sidecar\"", b"null"] {
        let err = parse_err(doc, None);
        assert!(matches!(err, SidecarError::WrongType { .. }), "{err:?}");
        assert_eq!(err.field(), Some("."));
    }
}

#[test]
fn unknown_version() {
    let mut v = value_of(None);
    v["version"] = json!(2);
    let err = parse_err(&to_bytes(&v), None);
    assert_eq!(err, SidecarError::UnknownVersion(2));
    assert_names_field(&err, "version");
    assert!(err.to_string().contains('2'));

    v["version"] = json!(0);
    assert_eq!(
        parse_err(&to_bytes(&v), None),
        SidecarError::UnknownVersion(0)
    );
    v["version"] = json!("1");
    let err = parse_err(&to_bytes(&v), None);
    assert!(matches!(err, SidecarError::WrongType { .. }), "{err:?}");
    assert_names_field(&err, "version");
    v.as_object_mut().unwrap().remove("version");
    let err = parse_err(&to_bytes(&v), None);
    assert_eq!(
        err,
        SidecarError::MissingField {
            field: "version".into()
        }
    );
}

#[test]
fn unknown_format() {
    let mut v = value_of(None);
    v["format"] = json!("some-other-sidecar");
    let err = parse_err(&to_bytes(&v), None);
    assert_eq!(
        err,
        SidecarError::UnknownFormat("some-other-sidecar".into())
    );
    assert_names_field(&err, "format");
    // The format is judged before the version.
    v["version"] = json!(7);
    assert!(matches!(
        parse_err(&to_bytes(&v), None),
        SidecarError::UnknownFormat(_)
    ));
}

#[test]
fn missing_field() {
    let mut v = value_of(None);
    v["vm_clock"]["kvmclock"]
        .as_object_mut()
        .unwrap()
        .remove("clock");
    let err = parse_err(&to_bytes(&v), None);
    assert_eq!(
        err,
        SidecarError::MissingField {
            field: "vm_clock.kvmclock.clock".into()
        }
    );
    assert_names_field(&err, "vm_clock.kvmclock.clock");

    let mut v = value_of(None);
    v.as_object_mut().unwrap().remove("integrity");
    let err = parse_err(&to_bytes(&v), None);
    assert_names_field(&err, "integrity");
    assert!(matches!(err, SidecarError::MissingField { .. }));

    let mut v = value_of(None);
    v["integrity"].as_object_mut().unwrap().remove("sha256");
    let err = parse_err(&to_bytes(&v), None);
    assert!(matches!(err, SidecarError::MissingField { .. }));
    assert_names_field(&err, "integrity.sha256");

    let mut v = value_of(None);
    v.as_object_mut().unwrap().remove("vm");
    let err = parse_err(&to_bytes(&v), None);
    assert!(matches!(err, SidecarError::MissingField { .. }));
    assert_names_field(&err, "vm");
}

#[test]
fn wrong_type() {
    let mut v = value_of(None);
    v["vm_clock"]["tsc_khz"] = json!("2445411");
    let err = parse_err(&to_bytes(&v), None);
    assert!(matches!(err, SidecarError::WrongType { .. }), "{err:?}");
    assert_names_field(&err, "vm_clock.tsc_khz");

    // Out of range for the type, a float, a negative, an unknown enum value.
    let cases = [
        (
            "/vm_clock/tsc_khz",
            json!(4_294_967_296u64),
            "vm_clock.tsc_khz",
        ),
        ("/capture/tai_ns", json!(1.5), "capture.tai_ns"),
        ("/capture/host_tsc", json!(-1), "capture.host_tsc"),
        ("/vm_clock/state", json!("Stopped"), "vm_clock.state"),
        (
            "/vm_clock/vcpus/1/tsc_offset",
            json!("x"),
            "vm_clock.vcpus[1].tsc_offset",
        ),
        (
            "/vm_clock/pvti/tsc_shift",
            json!(200),
            "vm_clock.pvti.tsc_shift",
        ),
        (
            "/capture/quality/leap_pending",
            json!("maybe"),
            "capture.quality.leap_pending",
        ),
        ("/vm_clock/vcpus", json!({}), "vm_clock.vcpus"),
        ("/integrity/sha256", json!(7), "integrity.sha256"),
    ];
    for (pointer, bad, field) in cases {
        let mut v = value_of(None);
        *v.pointer_mut(pointer).unwrap() = bad;
        let err = parse_err(&to_bytes(&v), None);
        assert!(
            matches!(err, SidecarError::WrongType { .. }),
            "{pointer}: {err:?}"
        );
        assert_names_field(&err, field);
    }
}

#[test]
fn unknown_field() {
    let cases = [
        ("", "colour", "colour"),
        ("/vm_clock/kvmclock", "extra", "vm_clock.kvmclock.extra"),
        ("/vm_clock/vcpus/0", "apic", "vm_clock.vcpus[0].apic"),
        ("/integrity", "sha512", "integrity.sha512"),
    ];
    for (pointer, name, field) in cases {
        let mut v = value_of(None);
        v.pointer_mut(pointer)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert(name.into(), json!(1));
        let err = parse_err(&to_bytes(&v), None);
        assert_eq!(
            err,
            SidecarError::UnknownField {
                field: field.into()
            },
            "{pointer}"
        );
        assert_names_field(&err, field);
    }
}

#[test]
fn vcpu_count_disagrees_with_offsets() {
    let mut b = body();
    b.vm.vcpu_count = 3;
    // The writer refuses it...
    let err = Sidecar::seal(b.clone(), None).unwrap_err();
    assert_names_field(&err, "vm.vcpu_count");
    // ...and so does the reader, even with a correct digest.
    let err = parse_err(&seal_unchecked(b), None);
    assert!(matches!(err, SidecarError::Invalid { .. }), "{err:?}");
    assert_names_field(&err, "vm.vcpu_count");
    assert!(err.to_string().contains("lists 2"), "{err}");

    // Dropping an offset from the file is caught the same way.
    let mut v = value_of(None);
    v["vm_clock"]["vcpus"].as_array_mut().unwrap().pop();
    let err = parse_err(&reseal_value(v), None);
    assert_names_field(&err, "vm.vcpu_count");
}

#[test]
fn zero_tsc_rate() {
    let mut b = body();
    b.vm_clock.tsc_khz = 0;
    let err = parse_err(&seal_unchecked(b), None);
    assert!(matches!(err, SidecarError::Invalid { .. }), "{err:?}");
    assert_names_field(&err, "vm_clock.tsc_khz");
    assert!(err.to_string().contains("is 0 kHz"), "{err}");

    let mut b = body();
    b.source_host.tsc_khz = 0;
    let err = parse_err(&seal_unchecked(b), None);
    assert_names_field(&err, "source_host.tsc_khz");
    assert!(err.to_string().contains("is 0 kHz"), "{err}");
}

#[test]
fn capture_in_the_future() {
    let b = body();
    let now = TAI_NS - 10_000_000_000; // the reader's clock is 10 s behind
    let err = b.check_capture_not_in_future(now, 1_000_000).unwrap_err();
    assert_eq!(
        err,
        SidecarError::CaptureInFuture {
            ahead_ns: 10_000_000_000,
            bound_ns: 1_000_000
        }
    );
    assert_names_field(&err, "capture.tai_ns");
    // Within the bound, at the bound exactly, and in the past: accepted.
    b.check_capture_not_in_future(now, 10_000_000_000).unwrap();
    b.check_capture_not_in_future(TAI_NS, 0).unwrap();
    b.check_capture_not_in_future(TAI_NS + 1, 0).unwrap();
    b.check_capture_not_in_future(u64::MAX, u64::MAX).unwrap();
    assert!(b.check_capture_not_in_future(0, 0).is_err());
    assert!(b.check_capture_not_in_future(TAI_NS - 1, 0).is_err());
}

#[test]
fn bad_digest() {
    let text = String::from_utf8(bytes_of(None)).unwrap();
    let edited = text.replacen("-26566304618", "-26566304617", 1);
    assert_ne!(edited, text);
    let err = parse_err(edited.as_bytes(), None);
    assert_eq!(err, SidecarError::DigestMismatch);
    assert_names_field(&err, "integrity.sha256");

    // A malformed digest is named as such.
    let mut v = value_of(None);
    let upper = v["integrity"]["sha256"].as_str().unwrap().to_uppercase();
    v["integrity"]["sha256"] = json!(upper);
    let err = parse_err(&to_bytes(&v), None);
    assert!(matches!(err, SidecarError::Invalid { .. }), "{err:?}");
    assert_names_field(&err, "integrity.sha256");
}

#[test]
fn bad_hmac() {
    let key = key_a();
    let mut v = value_of(Some(&key));
    let mac = v["integrity"]["hmac_sha256"].as_str().unwrap().to_string();
    let flipped: String = mac
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 10 {
                if c == '0' {
                    '1'
                } else {
                    '0'
                }
            } else {
                c
            }
        })
        .collect();
    v["integrity"]["hmac_sha256"] = json!(flipped);
    let err = parse_err(&to_bytes(&v), Some(&key));
    assert_eq!(err, SidecarError::HmacMismatch);
    assert_names_field(&err, "integrity.hmac_sha256");
}

#[test]
fn edited_and_redigested_is_caught_by_the_hmac() {
    // Whoever can edit the file can recompute a plain SHA-256: the HMAC is
    // what stops them.
    let key = key_a();
    let mut v = value_of(Some(&key));
    v["vm_clock"]["vcpus"][0]["tsc_offset"] = json!(0);
    let bytes = reseal_value(v);
    assert_eq!(parse_err(&bytes, Some(&key)), SidecarError::HmacMismatch);
}

#[test]
fn key_id_mismatch() {
    let (a, b) = (key_a(), key_b());
    assert_ne!(a.id(), b.id());
    let err = parse_err(&bytes_of(Some(&a)), Some(&b));
    assert_eq!(
        err,
        SidecarError::KeyIdMismatch {
            file: a.id().into(),
            configured: b.id().into()
        }
    );
    assert_names_field(&err, "integrity.key_id");
    assert!(err.to_string().contains(a.id()) && err.to_string().contains(b.id()));
}

#[test]
fn no_hmac_while_a_key_is_configured() {
    let err = parse_err(&bytes_of(None), Some(&key_a()));
    assert_eq!(err, SidecarError::HmacMissing);
    assert_names_field(&err, "integrity.hmac_sha256");
    // Stripping the HMAC from a sealed file does not get around the key.
    let mut v = value_of(Some(&key_a()));
    v["integrity"]["hmac_sha256"] = Value::Null;
    v["integrity"]["key_id"] = Value::Null;
    assert_eq!(
        parse_err(&to_bytes(&v), Some(&key_a())),
        SidecarError::HmacMissing
    );
}

#[test]
fn hmac_and_key_id_come_together() {
    let mut v = value_of(Some(&key_a()));
    v["integrity"]["key_id"] = Value::Null;
    let err = parse_err(&to_bytes(&v), None);
    assert_names_field(&err, "integrity.key_id");
    let mut v = value_of(Some(&key_a()));
    v["integrity"]["hmac_sha256"] = Value::Null;
    let err = parse_err(&to_bytes(&v), None);
    assert_names_field(&err, "integrity.hmac_sha256");
    let mut v = value_of(Some(&key_a()));
    v["integrity"]["key_id"] = json!("ABCDEF0123456789");
    let err = parse_err(&to_bytes(&v), Some(&key_a()));
    assert!(matches!(err, SidecarError::Invalid { .. }), "{err:?}");
    assert_names_field(&err, "integrity.key_id");
}

#[test]
fn oversized_via_parse() {
    let mut bytes = bytes_of(None);
    bytes.resize(MAX_SIDECAR_BYTES + 1, b' ');
    let err = parse_err(&bytes, None);
    assert_eq!(
        err,
        SidecarError::TooLarge {
            size: (MAX_SIDECAR_BYTES + 1) as u64,
            max: MAX_SIDECAR_BYTES as u64
        }
    );
    assert_eq!(err.field(), None);
    // Exactly at the limit is size-accepted (and here parses: trailing
    // whitespace is allowed).
    bytes.truncate(MAX_SIDECAR_BYTES);
    Sidecar::parse(&bytes, None).unwrap();
}

#[test]
fn oversized_via_read_bounded() {
    let dir = TempDir::new("oversized");
    let path = dir.path().join("big.json");
    let mut bytes = bytes_of(None);
    bytes.resize(MAX_SIDECAR_BYTES + 1, b' ');
    fs::write(&path, &bytes).unwrap();
    let err = read_bounded(&path).unwrap_err();
    assert_eq!(
        err,
        SidecarError::TooLarge {
            size: (MAX_SIDECAR_BYTES + 1) as u64,
            max: MAX_SIDECAR_BYTES as u64
        }
    );
    assert!(matches!(
        Sidecar::read_from(&path, None),
        Err(SidecarError::TooLarge { .. })
    ));

    // A sparse 1 TiB file is refused from its size, without reading it.
    let huge = dir.path().join("huge.json");
    fs::File::create(&huge).unwrap().set_len(1 << 40).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(
        read_bounded(&huge).unwrap_err(),
        SidecarError::TooLarge {
            size: 1 << 40,
            max: MAX_SIDECAR_BYTES as u64
        }
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(1));

    // At the limit it reads.
    bytes.truncate(MAX_SIDECAR_BYTES);
    fs::write(&path, &bytes).unwrap();
    assert_eq!(read_bounded(&path).unwrap().len(), MAX_SIDECAR_BYTES);

    // A missing file is an I/O error naming the path.
    let missing = dir.path().join("missing.json");
    let err = read_bounded(&missing).unwrap_err();
    assert!(matches!(err, SidecarError::Io { .. }));
    assert!(err.to_string().contains("missing.json"));
}

/// Every rule of `validate()`: (name, edit, field the error names).
type Edit = fn(&mut SidecarBody);

#[allow(clippy::too_many_lines)] // older than the lint; split before extending
fn invalid_bodies() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        (
            "vcpu_count 3 for 2 offsets",
            |b| b.vm.vcpu_count = 3,
            "vm.vcpu_count",
        ),
        (
            "no vcpus",
            |b| {
                b.vm.vcpu_count = 0;
                b.vm_clock.vcpus.clear();
            },
            "vm.vcpu_count",
        ),
        (
            "1025 vcpus",
            |b| {
                b.vm_clock.vcpus = (0..1025)
                    .map(|id| VcpuOffset { id, tsc_offset: 0 })
                    .collect();
                b.vm.vcpu_count = 1025;
            },
            "vm.vcpu_count",
        ),
        (
            "duplicate vcpu id",
            |b| b.vm_clock.vcpus[1].id = 0,
            "vm_clock.vcpus[1].id",
        ),
        (
            "guest tsc 0",
            |b| b.vm_clock.tsc_khz = 0,
            "vm_clock.tsc_khz",
        ),
        (
            "guest tsc 100 GHz + 1",
            |b| b.vm_clock.tsc_khz = 100_000_001,
            "vm_clock.tsc_khz",
        ),
        (
            "host tsc 0",
            |b| b.source_host.tsc_khz = 0,
            "source_host.tsc_khz",
        ),
        (
            "host tsc too fast",
            |b| b.source_host.tsc_khz = u32::MAX,
            "source_host.tsc_khz",
        ),
        ("tai 0", |b| b.capture.tai_ns = 0, "capture.tai_ns"),
        (
            "uncertainty > 1 s",
            |b| b.capture.uncertainty_ns = 1_000_000_001,
            "capture.uncertainty_ns",
        ),
        (
            "tai offset -1",
            |b| b.capture.tai_offset_s = -1,
            "capture.tai_offset_s",
        ),
        (
            "tai offset 1001",
            |b| b.capture.tai_offset_s = 1001,
            "capture.tai_offset_s",
        ),
        (
            "pvti mul 0",
            |b| {
                if let Some(p) = b.vm_clock.pvti.as_mut() {
                    p.tsc_to_system_mul = 0;
                }
            },
            "vm_clock.pvti.tsc_to_system_mul",
        ),
        (
            "pvti shift 33",
            |b| {
                if let Some(p) = b.vm_clock.pvti.as_mut() {
                    p.tsc_shift = 33;
                }
            },
            "vm_clock.pvti.tsc_shift",
        ),
        (
            "pvti shift -33",
            |b| {
                if let Some(p) = b.vm_clock.pvti.as_mut() {
                    p.tsc_shift = -33;
                }
            },
            "vm_clock.pvti.tsc_shift",
        ),
        (
            "pvti without source",
            |b| b.vm_clock.pvti_source = None,
            "vm_clock.pvti_source",
        ),
        (
            "source without pvti",
            |b| b.vm_clock.pvti = None,
            "vm_clock.pvti_source",
        ),
        (
            "frac_bits 40",
            |b| {
                b.vm_clock.tsc_scaling = Some(TscScaling {
                    ratio: 1 << 40,
                    frac_bits: 40,
                })
            },
            "vm_clock.tsc_scaling.frac_bits",
        ),
        (
            "ratio 0",
            |b| {
                b.vm_clock.tsc_scaling = Some(TscScaling {
                    ratio: 0,
                    frac_bits: 48,
                })
            },
            "vm_clock.tsc_scaling.ratio",
        ),
        (
            "empty hostname",
            |b| b.source_host.hostname.clear(),
            "source_host.hostname",
        ),
        (
            "256-byte hostname",
            |b| b.source_host.hostname = "h".repeat(256),
            "source_host.hostname",
        ),
        (
            "empty boot id",
            |b| b.source_host.boot_id.clear(),
            "source_host.boot_id",
        ),
        (
            "boot id with newline",
            |b| b.source_host.boot_id.push('\n'),
            "source_host.boot_id",
        ),
        (
            "vm id with ESC",
            |b| b.vm.id = "vm\u{1b}[31m".into(),
            "vm.id",
        ),
        ("empty vm id", |b| b.vm.id.clear(), "vm.id"),
        (
            "kernel release with NUL",
            |b| b.source_host.kernel_release.push('\0'),
            "source_host.kernel_release",
        ),
        (
            "clocksource with DEL",
            |b| b.source_host.clocksource.push('\u{7f}'),
            "source_host.clocksource",
        ),
        ("created_by empty", |b| b.created_by.clear(), "created_by"),
        ("format", |b| b.format = "x".into(), "format"),
        ("version", |b| b.version = 2, "version"),
    ]
}

#[test]
fn every_validation_rule_refuses_with_its_field() {
    for (name, edit, field) in invalid_bodies() {
        let mut b = body();
        edit(&mut b);
        let err = b.validate().expect_err(name);
        assert_names_field(&err, field);
        assert_eq!(Sidecar::seal(b.clone(), None).unwrap_err(), err, "{name}");
        let parsed = parse_err(&seal_unchecked(b), None);
        assert_eq!(parsed.field(), Some(field), "{name}: {parsed:?}");
    }
}

#[test]
fn validation_boundaries_are_accepted() {
    let edits: Vec<(&str, Edit)> = vec![
        ("1 vcpu", |b| {
            b.vm_clock.vcpus.truncate(1);
            b.vm.vcpu_count = 1;
        }),
        ("1024 vcpus", |b| {
            b.vm_clock.vcpus = (0..1024)
                .map(|id| VcpuOffset { id, tsc_offset: -1 })
                .collect();
            b.vm.vcpu_count = 1024;
        }),
        ("sparse vcpu ids", |b| b.vm_clock.vcpus[1].id = 4000),
        ("tsc 1 kHz", |b| b.vm_clock.tsc_khz = 1),
        ("tsc 100 GHz", |b| b.source_host.tsc_khz = 100_000_000),
        ("uncertainty 1 s", |b| {
            b.capture.uncertainty_ns = 1_000_000_000
        }),
        ("tai offset 0", |b| b.capture.tai_offset_s = 0),
        ("tai offset 1000", |b| b.capture.tai_offset_s = 1000),
        ("shift -32", |b| {
            if let Some(p) = b.vm_clock.pvti.as_mut() {
                p.tsc_shift = -32;
            }
        }),
        ("shift 32", |b| {
            if let Some(p) = b.vm_clock.pvti.as_mut() {
                p.tsc_shift = 32;
            }
        }),
        ("no pvti", |b| {
            b.vm_clock.pvti = None;
            b.vm_clock.pvti_source = None;
        }),
        ("amd scaling", |b| {
            b.vm_clock.tsc_scaling = Some(TscScaling {
                ratio: 1 << 32,
                frac_bits: 32,
            })
        }),
        ("255-byte hostname", |b| {
            b.source_host.hostname = "h".repeat(255)
        }),
        ("unicode vm name", |b| b.vm.id = "vm-é-ü".into()),
        ("empty kernel release", |b| {
            b.source_host.kernel_release.clear()
        }),
        ("paused", |b| b.vm_clock.state = RunState::Paused),
        ("negative offsets", |b| {
            b.vm_clock.vcpus[0].tsc_offset = i64::MIN
        }),
    ];
    for (name, edit) in edits {
        let mut b = body();
        edit(&mut b);
        b.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = Sidecar::seal(b, None).unwrap();
        assert_eq!(
            Sidecar::parse(&s.to_json_pretty(), None).unwrap(),
            s,
            "{name}"
        );
    }
}

// ----------------------------------------------------------------- keys

#[test]
fn key_from_file() {
    let dir = TempDir::new("keys");
    let path = dir.path().join("key");
    fs::write(&path, [KEY_A, b"\n"].concat()).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let k = SidecarKey::from_file(&path).unwrap();
    assert_eq!(k.id(), key_a().id());
    assert_eq!(k.id().len(), 16);
    assert!(k
        .id()
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));

    // Only one trailing newline is stripped.
    fs::write(&path, [KEY_A, b"\n\n"].concat()).unwrap();
    assert_ne!(SidecarKey::from_file(&path).unwrap().id(), key_a().id());

    // Too short: 15 bytes plus a newline.
    fs::write(&path, b"0123456789abcde\n").unwrap();
    let err = SidecarKey::from_file(&path).unwrap_err();
    assert!(matches!(err, SidecarError::Key(_)), "{err:?}");
    assert!(err.to_string().contains("15 bytes"), "{err}");
    assert!(matches!(
        SidecarKey::from_bytes(b"short"),
        Err(SidecarError::Key(_))
    ));
    assert!(matches!(
        SidecarKey::from_file(&dir.path().join("absent")),
        Err(SidecarError::Io { .. })
    ));

    // Debug output never shows the key.
    assert!(!format!("{k:?}").contains("key-A"));
}

#[test]
fn checked_in_key_matches_fixture() {
    // A checkout leaves it world-readable: read it through a private copy.
    let dir = TempDir::new("checked-in-key");
    let path = dir.path().join("test.key");
    fs::copy(data_dir().join("test.key"), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let k = SidecarKey::from_file(&path).unwrap();
    assert_eq!(k.id(), key_a().id());
}

#[test]
fn key_files_others_may_read_or_write_are_refused() {
    let dir = TempDir::new("key-modes");
    let path = dir.path().join("key");
    fs::write(&path, KEY_A).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = SidecarKey::from_file(&path).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("group or others"), "{mode:o}: {text}");
    }
    // Execute bits give nothing away.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(SidecarKey::from_file(&path).unwrap().id(), key_a().id());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    assert_eq!(SidecarKey::from_file(&path).unwrap().id(), key_a().id());
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let text = SidecarKey::from_file(&path).unwrap_err().to_string();
        assert!(text.contains("owned by uid 65534"), "{text}");
    }
}

// -------------------------------------------------------------- fixtures

/// The checked-in examples are byte for byte what the code writes, and
/// still parse: a change to the format (or to field order, which changes
/// every digest) shows up here first.
#[test]
fn fixtures() {
    let cases = [
        ("example-v1.json", None),
        ("example-v1-hmac.json", Some(key_a())),
    ];
    for (name, key) in cases {
        let path = data_dir().join(name);
        let written = sealed(key.as_ref()).to_json_pretty();
        if std::env::var_os("CLOCKCARRY_BLESS").is_some() {
            write_atomic(&path, &written).unwrap();
        }
        let on_disk = fs::read(&path).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&on_disk),
            String::from_utf8_lossy(&written),
            "{name} differs; rerun with CLOCKCARRY_BLESS=1 if the change is intended"
        );
        let s = Sidecar::read_from(&path, key.as_ref()).unwrap();
        assert_eq!(s, sealed(key.as_ref()));
    }
}

// ------------------------------------------------------------ atomic write

#[test]
fn written_files_are_mode_0600() {
    let dir = TempDir::new("mode");
    let path = dir.path().join("vm.sidecar.json");
    // Even over an existing world-readable file.
    fs::write(&path, b"old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    sealed(None).write_to(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "{mode:o}");
    assert_eq!(Sidecar::read_from(&path, None).unwrap(), sealed(None));
    assert_eq!(dir.entries(), vec!["vm.sidecar.json".to_string()]);
}

#[test]
fn atomic_writes_never_replace_what_is_not_a_regular_file() {
    let dir = TempDir::new("not-regular");
    let precious = dir.path().join("precious");
    fs::write(&precious, b"precious").unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let dangling = dir.path().join("dangling.json");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for (path, kind) in [
        (&link, "a symbolic link"),
        (&dangling, "a symbolic link"),
        (&sub, "a directory"),
        (&fifo, "a FIFO"),
    ] {
        let err = write_atomic(path, b"new").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("is {kind}, not a regular file")),
            "{text}"
        );
        assert!(fs::symlink_metadata(path).is_ok());
    }
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&precious).unwrap(), b"precious");
    // A regular file is replaced as before; a missing one is created.
    write_atomic(&precious, b"new").unwrap();
    assert_eq!(fs::read(&precious).unwrap(), b"new");
    write_atomic(&dir.path().join("fresh"), b"x").unwrap();
    assert_eq!(
        dir.entries(),
        vec![
            "dangling.json",
            "fifo",
            "fresh",
            "link.json",
            "precious",
            "sub"
        ]
    );
}

#[test]
fn crash_between_write_and_rename_keeps_the_old_file() {
    let dir = TempDir::new("crash");
    let path = dir.path().join("vm.json");
    let v1 = sealed(None);
    let mut b2 = body();
    b2.vm_clock.vcpus[0].tsc_offset = 42;
    let v2 = Sidecar::seal(b2, None).unwrap();
    v1.write_to(&path).unwrap();

    // Stage v2: the temp file is complete and private, the target untouched.
    let staged = StagedFile::create(&path, &v2.to_json_pretty()).unwrap();
    let temp = staged.temp_path().to_path_buf();
    assert_eq!(staged.target(), path.as_path());
    let temp_name = temp.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        temp_name.starts_with(&format!(".vm.json.tmp-{}-", std::process::id())),
        "{temp_name}"
    );
    assert_eq!(temp.parent(), path.parent());
    assert_eq!(fs::read(&temp).unwrap(), v2.to_json_pretty());
    assert_eq!(
        fs::metadata(&temp).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    assert_eq!(Sidecar::read_from(&path, None).unwrap(), v1);

    // The process dies here: nothing runs, not even Drop.
    std::mem::forget(staged);
    assert!(temp.exists());
    assert_eq!(Sidecar::read_from(&path, None).unwrap(), v1);

    // The next write succeeds and leaves the leftover alone.
    v2.write_to(&path).unwrap();
    assert_eq!(Sidecar::read_from(&path, None).unwrap(), v2);
    assert_eq!(fs::read(&temp).unwrap(), v2.to_json_pretty());
    assert_eq!(dir.entries(), vec![temp_name, "vm.json".to_string()]);
}

#[test]
fn dropping_a_staged_file_removes_it() {
    let dir = TempDir::new("drop");
    let path = dir.path().join("vm.json");
    let v1 = sealed(None);
    v1.write_to(&path).unwrap();
    let staged = StagedFile::create(&path, b"half a sidecar").unwrap();
    let temp = staged.temp_path().to_path_buf();
    assert!(temp.exists());
    drop(staged);
    assert!(!temp.exists());
    assert_eq!(Sidecar::read_from(&path, None).unwrap(), v1);
    assert_eq!(dir.entries(), vec!["vm.json".to_string()]);

    // Commit of a staged file: the new content, no temp file left.
    let staged = StagedFile::create(&path, b"new").unwrap();
    staged.commit().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(dir.entries(), vec!["vm.json".to_string()]);
}

#[test]
fn leftover_temp_files_are_never_clobbered() {
    let dir = TempDir::new("leftover");
    let path = dir.path().join("vm.json");
    // Leftovers of this very process id (names a later write may pick: they
    // must be skipped, not overwritten) and of another process.
    let pid = std::process::id();
    let mut leftovers = Vec::new();
    for n in 0..48u32 {
        leftovers.push(dir.path().join(format!(".vm.json.tmp-{pid}-{n}")));
    }
    leftovers.push(dir.path().join(".vm.json.tmp-1-0"));
    for (i, p) in leftovers.iter().enumerate() {
        fs::write(p, format!("leftover {i}")).unwrap();
    }
    for round in 0..3 {
        let mut b = body();
        b.vm_clock.vcpus[0].tsc_offset = round;
        let s = Sidecar::seal(b, None).unwrap();
        s.write_to(&path).unwrap();
        assert_eq!(Sidecar::read_from(&path, None).unwrap(), s);
    }
    for (i, p) in leftovers.iter().enumerate() {
        assert_eq!(fs::read_to_string(p).unwrap(), format!("leftover {i}"));
    }
    assert_eq!(dir.entries().len(), leftovers.len() + 1);
}

#[test]
fn write_errors_name_the_path() {
    let dir = TempDir::new("errors");
    let path = dir.path().join("no/such/dir/vm.json");
    let err = write_atomic(&path, b"x").unwrap_err();
    assert!(matches!(err, SidecarError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
    assert!(matches!(
        write_atomic(Path::new("/"), b"x"),
        Err(SidecarError::Io { .. })
    ));
}

// --------------------------------------------------------------- proptest

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        // Bytes that keep the text JSON-like, so more mutants get past the
        // syntax check and exercise the later checks.
        (
            any::<usize>(),
            prop::sample::select(b"0123456789-abcdef\" ,:{}[]enul".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Replace(i, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::Flip(i, bit) => bytes[i % len] ^= 1 << bit,
        Mutation::Replace(i, b) => bytes[i % len] = b,
        Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
        Mutation::Delete(i) => {
            bytes.remove(i % len);
        }
    }
}

fn digest_matches(s: &Sidecar) -> bool {
    s.body.sha256_hex().unwrap() == s.integrity.sha256
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Sidecar::parse(&bytes, None);
        let _ = Sidecar::parse(&bytes, Some(&key_a()));
    }

    #[test]
    fn arbitrary_json_like_text_never_panics(text in r#"[{}\[\]",:0-9a-z_. -]{0,400}"#) {
        let _ = Sidecar::parse(text.as_bytes(), None);
    }

    #[test]
    fn arbitrary_values_in_a_valid_sidecar_never_panic(
        field in prop::sample::select(vec![
            "/vm/vcpu_count", "/vm/id", "/vm_clock/tsc_khz", "/vm_clock/vcpus",
            "/vm_clock/pvti", "/vm_clock/pvti/tsc_shift", "/capture/tai_ns",
            "/capture/tai_offset_s", "/integrity", "/integrity/sha256", "/version",
            "/format", "/vm_clock/tsc_scaling", "/offset_estimate", "/source_host/hostname",
        ]),
        value in prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,40}".prop_map(Value::from),
            Just(json!([])),
            Just(json!({})),
            Just(json!({"ratio": 1, "frac_bits": 48})),
        ],
    ) {
        let mut v = value_of(None);
        *v.pointer_mut(field).unwrap() = value;
        if let Ok(s) = Sidecar::parse(&to_bytes(&v), None) {
            prop_assert!(digest_matches(&s));
        }
    }

    #[test]
    fn mutated_sidecars_never_panic_nor_pass_with_a_wrong_digest(
        muts in prop::collection::vec(mutation(), 1..4),
        keyed in any::<bool>(),
    ) {
        let key = key_a();
        let key = keyed.then_some(&key);
        let original = sealed(key);
        let mut bytes = original.to_json_pretty();
        for m in &muts {
            apply(&mut bytes, m);
        }
        if let Ok(s) = Sidecar::parse(&bytes, key) {
            prop_assert!(digest_matches(&s));
            // What the digest protects is what was written.
            prop_assert_eq!(&s.body, &original.body);
            if keyed {
                prop_assert_eq!(&s.integrity, &original.integrity);
            }
        }
    }
}

// ------------------------------------------------------------------ schema

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/sidecar-v1.schema.json");
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).unwrap()
}

fn schema_errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn schema_is_valid_draft_2020_12() {
    let s = schema();
    jsonschema::draft202012::meta::validate(&s).unwrap();
    assert_eq!(
        s["$schema"],
        json!("https://json-schema.org/draft/2020-12/schema")
    );
}

/// Every object in the schema forbids additional properties, and every
/// property says what it is and in which unit.
#[test]
fn schema_is_closed_and_described() {
    fn walk(node: &Value, at: &str) {
        match node {
            Value::Object(m) => {
                if m.contains_key("properties")
                    && !at.ends_with("/if")
                    && !at.ends_with("/then")
                    && !at.ends_with("/else")
                {
                    assert_eq!(m.get("additionalProperties"), Some(&json!(false)), "{at}");
                }
                if let Some(Value::Object(props)) = m.get("properties") {
                    if !at.ends_with("/if") && !at.ends_with("/then") && !at.ends_with("/else") {
                        for (name, p) in props {
                            let d = p.get("description").and_then(Value::as_str);
                            assert!(
                                d.is_some_and(|d| !d.is_empty()),
                                "{at}/{name} has no description"
                            );
                        }
                    }
                }
                for (k, v) in m {
                    walk(v, &format!("{at}/{k}"));
                }
            }
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| walk(v, &format!("{at}/{i}"))),
            _ => {}
        }
    }
    walk(&schema(), "#");
}

fn written_variants() -> Vec<(&'static str, Vec<u8>)> {
    let key = key_a();
    let mut out = vec![
        ("plain", sealed(None).to_json_pretty()),
        ("hmac", sealed(Some(&key)).to_json_pretty()),
        (
            "1 vcpu",
            Sidecar::seal(body_with(1), None).unwrap().to_json_pretty(),
        ),
        (
            "255 vcpus",
            Sidecar::seal(body_with(255), Some(&key))
                .unwrap()
                .to_json_pretty(),
        ),
        (
            "1024 vcpus",
            Sidecar::seal(body_with(1024), None)
                .unwrap()
                .to_json_pretty(),
        ),
    ];
    let mut b = body();
    b.vm_clock.pvti = None;
    b.vm_clock.pvti_source = None;
    b.vm_clock.state = RunState::Paused;
    out.push((
        "no pvti, paused",
        Sidecar::seal(b, None).unwrap().to_json_pretty(),
    ));
    let mut b = body();
    b.vm_clock.tsc_scaling = Some(TscScaling {
        ratio: 0x0001_0d2c_0000_0000,
        frac_bits: 48,
    });
    b.vm_clock.pvti_source = Some(PvtiSource::KernelClockGuest);
    b.vm_clock.capabilities.tsc_scaling = true;
    b.vm_clock.capabilities.clock_guest = true;
    out.push((
        "scaling",
        Sidecar::seal(b, Some(&key)).unwrap().to_json_pretty(),
    ));
    let mut b = body();
    b.vm_clock.tsc_scaling = Some(TscScaling {
        ratio: 1 << 32,
        frac_bits: 32,
    });
    b.vm_clock.pvti_source = Some(PvtiSource::GuestMemory);
    b.offset_estimate = Some(OffsetEstimate {
        offset_ns: i64::MIN,
        bound_ns: u64::MAX,
        measured_tai_ns: Some(u64::MAX),
        rounds: Some(64),
        best_delay_ns: Some(u64::MAX),
    });
    b.capture.quality.leap_pending = LeapPending::Insert;
    b.capture.quality.synchronised = false;
    b.capture.host_tsc = u64::MAX;
    b.vm_clock.vcpus[1].tsc_offset = i64::MAX;
    out.push(("extremes", Sidecar::seal(b, None).unwrap().to_json_pretty()));
    let mut b = body();
    b.capture.quality.leap_pending = LeapPending::Delete;
    b.vm.id = "web-01".into();
    out.push(("named vm", Sidecar::seal(b, None).unwrap().to_json_pretty()));
    out
}

#[test]
fn every_written_sidecar_matches_the_schema() {
    let v = validator();
    for (name, bytes) in written_variants() {
        let doc: Value = serde_json::from_slice(&bytes).unwrap();
        let errors = schema_errors(&v, &doc);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
    for fixture in ["example-v1.json", "example-v1-hmac.json"] {
        let doc: Value =
            serde_json::from_slice(&fs::read(data_dir().join(fixture)).unwrap()).unwrap();
        assert!(v.is_valid(&doc), "{fixture}");
    }
}

/// An edit of a sidecar's JSON document.
type DocEdit = fn(&mut Value);

#[test]
fn schema_rejects_invalid_documents() {
    let v = validator();
    let edits: Vec<(&str, DocEdit)> = vec![
        ("missing clock", |d| {
            d["vm_clock"]["kvmclock"]
                .as_object_mut()
                .unwrap()
                .remove("clock");
        }),
        ("missing integrity", |d| {
            d.as_object_mut().unwrap().remove("integrity");
        }),
        ("state Stopped", |d| {
            d["vm_clock"]["state"] = json!("Stopped")
        }),
        ("pvti_source magic", |d| {
            d["vm_clock"]["pvti_source"] = json!("magic")
        }),
        ("leap maybe", |d| {
            d["capture"]["quality"]["leap_pending"] = json!("maybe")
        }),
        ("unknown top-level field", |d| d["colour"] = json!("blue")),
        ("unknown nested field", |d| {
            d["vm_clock"]["kvmclock"]["extra"] = json!(1)
        }),
        ("unknown integrity field", |d| {
            d["integrity"]["sha512"] = json!("00")
        }),
        ("version 2", |d| d["version"] = json!(2)),
        ("other format", |d| d["format"] = json!("other")),
        ("tsc_khz string", |d| {
            d["vm_clock"]["tsc_khz"] = json!("2445411")
        }),
        ("tsc_khz float", |d| {
            d["vm_clock"]["tsc_khz"] = json!(2445411.5)
        }),
        ("offset beyond i64", |d| {
            d["vm_clock"]["vcpus"][0]["tsc_offset"] = json!(u64::MAX)
        }),
        ("upper-case digest", |d| {
            let s = d["integrity"]["sha256"].as_str().unwrap().to_uppercase();
            d["integrity"]["sha256"] = json!(s);
        }),
        ("short digest", |d| d["integrity"]["sha256"] = json!("abc")),
        ("hmac without key id", |d| {
            d["integrity"]["hmac_sha256"] = json!("0".repeat(64));
        }),
        ("key id without hmac", |d| {
            d["integrity"]["key_id"] = json!("0123456789abcdef")
        }),
        ("pvti without source", |d| {
            d["vm_clock"]["pvti_source"] = Value::Null
        }),
        ("source without pvti", |d| {
            d["vm_clock"]["pvti"] = Value::Null
        }),
        ("empty vcpus", |d| d["vm_clock"]["vcpus"] = json!([])),
        ("frac_bits 40", |d| {
            d["vm_clock"]["tsc_scaling"] = json!({"ratio": 1, "frac_bits": 40})
        }),
    ];
    for (name, edit) in edits {
        let mut doc = value_of(None);
        edit(&mut doc);
        assert!(!v.is_valid(&doc), "schema accepts {name}");
    }
}

/// The rules of `validate()` that a schema can state are stated by the
/// schema too: every such invalid body is refused by both.
#[test]
fn schema_agrees_with_validate() {
    let v = validator();
    // Cross-field or byte-length rules a schema cannot state.
    let schema_cannot = ["vcpu_count 3 for 2 offsets", "duplicate vcpu id"];
    for (name, edit, _) in invalid_bodies() {
        if schema_cannot.contains(&name) {
            continue;
        }
        let mut b = body();
        edit(&mut b);
        let doc: Value = serde_json::from_slice(&seal_unchecked(b)).unwrap();
        assert!(!v.is_valid(&doc), "schema accepts {name}");
    }
}
