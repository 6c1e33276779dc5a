//! The offset exchange's wire format, `peer::wire::Session::open`, on
//! arbitrary lines from the network, and the estimator on arbitrary rounds.
//!
//! Properties beyond "no panic":
//! - in a keyed session past its handshake, no line the fuzzer makes is
//!   accepted by either side (it cannot know the session's fresh nonces or
//!   the key, so an accepted line would be a forgery);
//! - a message body that parses is sealed by one side and opened by the
//!   other as the same body, keyed and keyless (the MAC covers what the
//!   receiver reads);
//! - an estimate, when one is made, has a bound at least half the best
//!   round trip and an offset within the intervals the rounds allow.

#![no_main]

use std::sync::OnceLock;

use clockcarry::peer::estimate::{IN_ROUND_DRIFT_PPM, MAX_ROUNDS_SPAN_NS};
use clockcarry::peer::wire::{Body, Session};
use clockcarry::peer::{estimate, Sample};
use clockcarry::sidecar::SidecarKey;
use libfuzzer_sys::fuzz_target;

/// The public test key of `hook/tests/data/sidecar/test.key`.
const TEST_KEY: &[u8] = b"clockcarry-test-key-A-not-secret";

fn key() -> SidecarKey {
    static KEY: OnceLock<SidecarKey> = OnceLock::new();
    KEY.get_or_init(|| SidecarKey::from_bytes(TEST_KEY).expect("the test key is 32 bytes"))
        .clone()
}

/// A source and a destination session past hello and welcome.
fn handshake(keyed: bool) -> (Session, Session) {
    let k = || keyed.then(key);
    let mut src = Session::source(k()).expect("source session");
    let mut dst = Session::destination(k()).expect("destination session");
    let key_id = src.key_id();
    let hello = src.seal(Body::Hello { key_id }).expect("seal hello");
    dst.open(&hello).expect("open hello");
    let key_id = dst.key_id();
    let welcome = dst.seal(Body::Welcome { key_id }).expect("seal welcome");
    src.open(&welcome).expect("open welcome");
    (src, dst)
}

fn lines(data: &[u8]) {
    // A fresh destination's first line: a hello from anyone.
    for keyed in [false, true] {
        let mut fresh = Session::destination(keyed.then(key)).expect("destination session");
        let _ = fresh.open(data);
    }
    // Past the handshake, keyed: nothing forged is accepted.
    let (mut src, mut dst) = handshake(true);
    if let Ok(body) = dst.open(data) {
        panic!("the destination accepted a forged line: {body:?}");
    }
    if let Ok(body) = src.open(data) {
        panic!("the source accepted a forged line: {body:?}");
    }
    // Keyless: anything may be accepted, nothing may panic.
    let (mut src, mut dst) = handshake(false);
    let _ = dst.open(data);
    let _ = src.open(data);
    // A body that parses goes through seal and open unchanged.
    if let Ok(body) = serde_json::from_slice::<Body>(data) {
        for keyed in [false, true] {
            let (mut src, mut dst) = handshake(keyed);
            let line = src.seal(body.clone()).expect("seal");
            // Error bodies end the session by design; a hello or welcome
            // naming another key than the receiver's is a key mismatch.
            let refusable = match &body {
                Body::Error { .. } => true,
                Body::Hello { key_id } | Body::Welcome { key_id } => *key_id != dst.key_id(),
                _ => false,
            };
            match dst.open(&line) {
                Ok(got) => assert_eq!(got, body, "a body changed on its way"),
                Err(e) => assert!(refusable, "a sealed {} was refused: {e}", body.kind()),
            }
        }
    }
}

fn rounds(data: &[u8]) {
    let samples: Vec<Sample> = data
        .chunks_exact(48)
        .take(70)
        .map(|c| {
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&c[i * 8..i * 8 + 8]);
                u64::from_le_bytes(b)
            };
            Sample {
                t1_src_send_tai_ns: word(0),
                t2_dst_recv_tai_ns: word(1),
                t3_dst_send_tai_ns: word(2),
                t4_src_recv_tai_ns: word(3),
                // Read uncertainties up to about 1 ms.
                src_read_uncertainty_ns: word(4) % 1_048_576,
                dst_read_uncertainty_ns: word(5) % 1_048_576,
            }
        })
        .collect();
    let Ok(e) = estimate(&samples) else {
        return;
    };
    // The best round's delay, as the rounds state it.
    let best = samples
        .iter()
        .filter_map(|s| {
            let rtt = i128::from(s.t4_src_recv_tai_ns) - i128::from(s.t1_src_send_tai_ns);
            let held = i128::from(s.t3_dst_send_tai_ns) - i128::from(s.t2_dst_recv_tai_ns);
            (rtt >= 0 && held >= 0 && rtt >= held).then_some(rtt - held)
        })
        .min();
    if let Some(delay) = best {
        assert!(
            i128::from(e.bound_ns) * 2 >= delay,
            "bound {} ns below half the best delay {delay} ns",
            e.bound_ns
        );
    }
    // Every round lies within one exchange's span of the others.
    let mids: Vec<i128> = samples
        .iter()
        .map(|s| (i128::from(s.t1_src_send_tai_ns) + i128::from(s.t4_src_recv_tai_ns)) / 2)
        .collect();
    let (lo_mid, hi_mid) = (
        mids.iter().copied().min().unwrap_or(0),
        mids.iter().copied().max().unwrap_or(0),
    );
    assert!(
        hi_mid - lo_mid <= 2 * i128::from(MAX_ROUNDS_SPAN_NS),
        "rounds {} ns apart accepted",
        hi_mid - lo_mid
    );
    // The offset lies within what every accepted round allows: for a round,
    // the true offset is within [t2 - t4, t3 - t1] widened by the reads and
    // by the clocks' drift between it and the kept round (at most the span
    // of the rounds, at IN_ROUND_DRIFT_PPM).
    let drift = ((hi_mid - lo_mid) * i128::from(IN_ROUND_DRIFT_PPM)) / 1_000_000 + 1;
    for s in &samples {
        let lo = i128::from(s.t2_dst_recv_tai_ns) - i128::from(s.t4_src_recv_tai_ns);
        let hi = i128::from(s.t3_dst_send_tai_ns) - i128::from(s.t1_src_send_tai_ns);
        // The clocks' rates within the round (IN_ROUND_DRIFT_PPM of its
        // round trip) and the halving's rounding widen it too.
        let rtt = (i128::from(s.t4_src_recv_tai_ns) - i128::from(s.t1_src_send_tai_ns)).max(0);
        let in_round = (rtt * i128::from(IN_ROUND_DRIFT_PPM) + 999_999) / 1_000_000 + 2;
        let slack = i128::from(s.src_read_uncertainty_ns)
            + i128::from(s.dst_read_uncertainty_ns)
            + drift
            + in_round;
        let off = i128::from(e.offset_ns);
        let bound = i128::from(e.bound_ns);
        assert!(
            off + bound >= lo - slack && off - bound <= hi + slack,
            "estimate {off} +- {bound} ns outside a round's interval [{lo}, {hi}] +- {slack}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => rounds(rest),
        Some((_, rest)) => lines(rest),
        None => {}
    }
});
