//! Durations on the command line (`500ms`, `2s`, `10m`, `1h30m`) and the
//! human forms of durations and instants in reports.

/// ns per unit, for every unit accepted in a duration.
const UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("min", 60_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// Parses a duration into ns: one or more `<integer><unit>` parts, units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`/`min`, `h`, `d`; e.g. `500ms`, `2s`,
/// `10m`, `1h30m`. A bare number is refused (say the unit). The sum must fit
/// in u64 ns (about 584 years).
pub fn parse_duration_ns(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration: write e.g. 500ms, 2s, 10m or 1h".into());
    }
    let mut rest = s;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .char_indices()
            .find(|(_, c)| !c.is_ascii_digit())
            .map_or(rest.len(), |(i, _)| i);
        if digits == 0 {
            return Err(format!(
                "{text:?}: expected a number at {rest:?} (write e.g. 500ms, 2s, 10m or 1h)"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let value: u64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number} is too large"))?;
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit())
            .map_or(after.len(), |(i, _)| i);
        let (unit, tail) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(format!(
                "{text:?}: {number} has no unit (ns, us, ms, s, m, h, d)"
            ));
        }
        let per = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, ns)| *ns)
            .ok_or_else(|| format!("{text:?}: unknown unit {unit:?} (ns, us, ms, s, m, h, d)"))?;
        let part = value
            .checked_mul(per)
            .ok_or_else(|| format!("{text:?}: too long (more than 584 years)"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{text:?}: too long (more than 584 years)"))?;
        rest = tail;
    }
    Ok(total)
}

/// A duration in ns, for people: `0 ns`, `812 ns`, `3.402 µs`, `1.500 ms`,
/// `12.345678901 s`, `2 h 03 m 04 s`.
pub fn human_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{}.{:03} µs", ns / 1_000, ns % 1_000),
        1_000_000..=999_999_999 => format!("{}.{:03} ms", ns / 1_000_000, (ns / 1_000) % 1_000),
        1_000_000_000..=3_599_999_999_999 => {
            format!("{}.{:09} s", ns / 1_000_000_000, ns % 1_000_000_000)
        }
        _ => {
            let s = ns / 1_000_000_000;
            format!("{} h {:02} m {:02} s", s / 3600, (s / 60) % 60, s % 60)
        }
    }
}

/// A signed duration in ns, for people (`-1.500 µs`).
pub fn human_ns_signed(ns: i64) -> String {
    if ns < 0 {
        format!("-{}", human_ns(ns.unsigned_abs()))
    } else {
        human_ns(ns.unsigned_abs())
    }
}

/// ns since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` (proleptic
/// Gregorian, no leap seconds: the form of CLOCK_REALTIME).
pub fn utc_timestamp(epoch_ns: u64) -> String {
    clockcarry::timefmt::rfc3339_ns(epoch_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ns("500ms"), Ok(500_000_000));
        assert_eq!(parse_duration_ns("2s"), Ok(2_000_000_000));
        assert_eq!(parse_duration_ns("10m"), Ok(600_000_000_000));
        assert_eq!(parse_duration_ns("10min"), Ok(600_000_000_000));
        assert_eq!(parse_duration_ns("1h"), Ok(3_600_000_000_000));
        assert_eq!(parse_duration_ns("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse_duration_ns("50ns"), Ok(50));
        assert_eq!(parse_duration_ns("3us"), Ok(3_000));
        assert_eq!(parse_duration_ns("3µs"), Ok(3_000));
        assert_eq!(parse_duration_ns(" 1d "), Ok(86_400_000_000_000));
        assert_eq!(parse_duration_ns("0s"), Ok(0));
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "1x",
            "1s2",
            "99999999999999999999s",
            "600000d",
            "1 s",
            "ms5",
        ] {
            assert!(parse_duration_ns(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration_ns("18446744073709551615ns").is_ok());
        assert!(parse_duration_ns("18446744073709551615ns1ns").is_err());
    }

    #[test]
    fn human_forms() {
        assert_eq!(human_ns(0), "0 ns");
        assert_eq!(human_ns(999), "999 ns");
        assert_eq!(human_ns(3_402), "3.402 µs");
        assert_eq!(human_ns(1_500_000), "1.500 ms");
        assert_eq!(human_ns(12_345_678_901), "12.345678901 s");
        assert_eq!(human_ns(7_384_000_000_000), "2 h 03 m 04 s");
        assert_eq!(human_ns_signed(-1_500), "-1.500 µs");
        assert!(!human_ns(u64::MAX).is_empty());
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            utc_timestamp(1_795_749_100_360_527_731),
            "2026-11-27T03:11:40.360527731Z"
        );
        assert_eq!(
            utc_timestamp(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert!(!utc_timestamp(u64::MAX).is_empty());
    }
}
