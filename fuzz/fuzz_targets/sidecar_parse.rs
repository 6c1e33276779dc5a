//! The sidecar parser, `Sidecar::parse`, on arbitrary bytes: without a key,
//! with the test key, and on the same document re-sealed with a correct
//! digest (and HMAC), so that inputs get past the integrity checks to the
//! strict structure and the semantic rules.
//!
//! Properties beyond "no panic":
//! - a file accepted with the key is accepted without it, as the same sidecar;
//! - a file accepted without the key is refused with the key only by an HMAC
//!   check (the semantic rules run after the integrity checks);
//! - an accepted sidecar passes `SidecarBody::validate`, its digest is the
//!   one `Sidecar::seal` computes, and its pretty JSON parses back equal;
//! - a re-sealed document is refused exactly when `validate` refuses its
//!   body, with the same error: the digest covers what the parser reads.

#![no_main]

use std::sync::OnceLock;

use clockcarry::sidecar::{Sidecar, SidecarBody, SidecarError, SidecarKey, MAX_SIDECAR_BYTES};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use sha2::Sha256;

/// The public test key of `hook/tests/data/sidecar/test.key` (without its
/// trailing newline); `example-v1-hmac.json` is sealed with it.
const TEST_KEY: &[u8] = b"clockcarry-test-key-A-not-secret";

fn key() -> &'static SidecarKey {
    static KEY: OnceLock<SidecarKey> = OnceLock::new();
    KEY.get_or_init(|| SidecarKey::from_bytes(TEST_KEY).expect("the test key is 32 bytes"))
}

/// True for the errors only the HMAC checks produce.
fn is_hmac_error(e: &SidecarError) -> bool {
    matches!(
        e,
        SidecarError::HmacMissing | SidecarError::HmacMismatch | SidecarError::KeyIdMismatch { .. }
    )
}

/// Every error renders and names its field without panicking.
fn touch(result: &Result<Sidecar, SidecarError>) {
    if let Err(e) = result {
        let _ = e.to_string();
        let _ = e.field();
    }
}

/// What holds for every sidecar the parser accepts.
fn check_accepted(sidecar: &Sidecar) {
    sidecar
        .body
        .validate()
        .expect("an accepted sidecar passes validate");
    let sealed = Sidecar::seal(sidecar.body.clone(), None).expect("an accepted body seals");
    assert_eq!(sealed.integrity.sha256, sidecar.integrity.sha256);
    let again = Sidecar::parse(&sidecar.to_json_pretty(), None)
        .expect("an accepted sidecar's pretty JSON parses");
    assert_eq!(&again, sidecar);
}

/// The document with its `integrity` replaced by a correct one for the body
/// it holds (HMAC and key id with the test key when `with_hmac`), and that
/// body; `None` when the document is not an object or its body does not
/// deserialise.
fn reseal(data: &[u8], with_hmac: bool) -> Option<(Vec<u8>, SidecarBody)> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(data) else {
        return None;
    };
    map.remove("integrity");
    let body: SidecarBody = serde_json::from_value(Value::Object(map.clone())).ok()?;
    let canonical = body.canonical_bytes().ok()?;
    let mut integrity = Map::new();
    integrity.insert("sha256".into(), Value::String(body.sha256_hex().ok()?));
    if with_hmac {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(TEST_KEY).ok()?;
        mac.update(&canonical);
        let tag = mac.finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        integrity.insert("hmac_sha256".into(), Value::String(hex));
        integrity.insert("key_id".into(), Value::String(key().id().to_string()));
    }
    map.insert("integrity".into(), Value::Object(integrity));
    let bytes = serde_json::to_vec(&Value::Object(map)).ok()?;
    Some((bytes, body))
}

fuzz_target!(|data: &[u8]| {
    let plain = Sidecar::parse(data, None);
    let keyed = Sidecar::parse(data, Some(key()));
    touch(&plain);
    touch(&keyed);
    if let Ok(sidecar) = &keyed {
        assert_eq!(plain.as_ref().ok(), Some(sidecar));
    }
    if let Ok(sidecar) = &plain {
        check_accepted(sidecar);
        if let Err(e) = &keyed {
            assert!(
                is_hmac_error(e),
                "accepted without the key, refused with it by {e:?}"
            );
        }
    }

    // Half the inputs are re-sealed with an HMAC, half with a digest only.
    let with_hmac = data.first().is_some_and(|b| b & 1 == 1);
    if let Some((bytes, body)) = reseal(data, with_hmac) {
        if bytes.len() > MAX_SIDECAR_BYTES {
            return;
        }
        let want = body.validate().err();
        let key_arg = with_hmac.then(key);
        let got = Sidecar::parse(&bytes, key_arg);
        touch(&got);
        assert_eq!(
            got.as_ref().err(),
            want.as_ref(),
            "re-sealed: {}",
            String::from_utf8_lossy(&bytes)
        );
        if let Ok(sidecar) = &got {
            assert_eq!(sidecar.body, body);
            check_accepted(sidecar);
            if with_hmac {
                let sealed = Sidecar::seal(body, Some(key())).expect("an accepted body seals");
                assert_eq!(sealed.integrity, sidecar.integrity);
            }
        }
    }
});
