//! UTC timestamps for reports and logs, from CLOCK_REALTIME nanoseconds.
//! Proleptic Gregorian, no leap seconds (the form of CLOCK_REALTIME); no
//! dependency, total on every u64.

/// `YYYYmmddTHHMMSS` (UTC) of a CLOCK_REALTIME value in ns, with `Z`.
pub fn compact_stamp(ns: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ns / 1_000_000_000);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-27T04:38:00.123456789Z`.
pub fn rfc3339_ns(ns: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ns / 1_000_000_000);
    let frac = ns % 1_000_000_000;
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:09}Z")
}

/// Seconds since the epoch to (year, month, day, hour, minute, second),
/// proleptic Gregorian (Howard Hinnant's days-to-civil).
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Shift the epoch to 0000-03-01; all values stay non-negative.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(mo <= 2);
    (y, mo, d, h, mi, s)
}
