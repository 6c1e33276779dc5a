//! The NTP-style estimator of (destination TAI - source TAI).
//!
//! One round: the source reads its clock (`t1`) and sends; the destination
//! reads its clock on receipt (`t2`) and again just before it answers
//! (`t3`); the source reads its clock on receipt of the answer (`t4`).
//! With `theta` the true offset (destination minus source) and reads
//! that follow the send and receive they describe in program order:
//!
//! ```text
//! offset = ((t2 - t1) + (t3 - t4)) / 2 = theta + (d_out - d_back) / 2
//! delay  = (t4 - t1) - (t3 - t2)        = d_out + d_back
//! ```
//!
//! so `|offset - theta| <= delay / 2` whatever the asymmetry of the two
//! paths. Each read may be off its instant by its host's read uncertainty
//! `u`: that moves the offset by at most `u_src + u_dst` and hides at most
//! `2 (u_src + u_dst)` of delay, so a round's bound is
//!
//! ```text
//! bound = ceil(delay / 2) + 2 (u_src + u_dst) + 1 (the halving's rounding)
//!       + (t4 - t1) x IN_ROUND_DRIFT_PPM / 10^6 (the clocks' rates within the round)
//! ```
//!
//! Of several rounds the one with the smallest delay is kept (a queued or
//! delayed message only widens its own round's bound). Every round's
//! interval `offset ± bound` must overlap the kept one's (widened by the
//! clocks' drift between the two rounds); otherwise a clock stepped during
//! the exchange and the whole estimate is refused. A round whose stamps
//! run backwards (negative delay, `t4 < t1` or `t3 < t2`) is a clock read
//! error: the estimate is refused, naming the round.
//!
//! Pure and total: any input gives an estimate or an [`EstimateError`].

use serde::{Deserialize, Serialize};

use crate::model::OffsetEstimate;

/// Rounds exchanged at least, unless the caller asks otherwise.
pub const DEFAULT_ROUNDS: u32 = 8;
/// Rounds exchanged at most, unless the caller asks otherwise: the
/// exchange goes on past [`DEFAULT_ROUNDS`] only while the bound is above
/// its goal.
pub const DEFAULT_MAX_ROUNDS: u32 = 64;
/// Most rounds one exchange may have (the destination answers no more).
pub const MAX_ROUNDS: u32 = 256;
/// Most two host clocks' rates may differ within a round, ppm: both at the
/// kernel's 500 ppm frequency limit, in opposite directions.
pub const IN_ROUND_DRIFT_PPM: u64 = 1_000;
/// Longest time, on the source's clock, an exchange's rounds may lie apart:
/// the rounds of one exchange take milliseconds, and rounds further apart
/// than this mean the source's clock stepped (or the stamps are not this
/// exchange's), whatever their intervals say.
pub const MAX_ROUNDS_SPAN_NS: u64 = 600_000_000_000;

/// One round's four timestamps (CLOCK_TAI, ns) and each host's clock-read
/// uncertainty (ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Source clock just before the request was sent.
    pub t1_src_send_tai_ns: u64,
    /// Destination clock just after the request arrived.
    pub t2_dst_recv_tai_ns: u64,
    /// Destination clock just before the answer was sent.
    pub t3_dst_send_tai_ns: u64,
    /// Source clock just after the answer arrived.
    pub t4_src_recv_tai_ns: u64,
    pub src_read_uncertainty_ns: u64,
    pub dst_read_uncertainty_ns: u64,
}

/// Why a round's stamps cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    #[error("the source's answer stamp t4 is {by_ns} ns before its send stamp t1")]
    SourceBackwards { by_ns: u64 },
    #[error("the destination's send stamp t3 is {by_ns} ns before its receive stamp t2")]
    DestinationBackwards { by_ns: u64 },
    #[error(
        "the destination held the request {held_ns} ns, longer than the {round_trip_ns} ns round \
         trip (negative delay)"
    )]
    NegativeDelay { round_trip_ns: u64, held_ns: u64 },
}

/// Why no estimate can be made from a set of rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    #[error("no round to estimate from")]
    NoRounds,
    #[error("{count} rounds, more than the {MAX_ROUNDS} an exchange may have")]
    TooManyRounds { count: usize },
    #[error("round {round}: a clock read error: {error}")]
    BadRound { round: usize, error: SampleError },
    #[error(
        "round {round} places the offset {apart_ns} ns from round {best} (the best), more than \
         their bounds allow ({allowed_ns} ns): a clock stepped during the exchange"
    )]
    Inconsistent {
        round: usize,
        best: usize,
        apart_ns: u128,
        allowed_ns: u128,
    },
    #[error(
        "round {round} lies {between_ns} ns from round {best} (the best) on the source's clock, \
         more than the {MAX_ROUNDS_SPAN_NS} ns one exchange may span: the source's clock stepped"
    )]
    TooFarApart {
        round: usize,
        best: usize,
        between_ns: u64,
    },
    #[error("the offset {offset_ns} ns or its bound does not fit in 64 bits")]
    OutOfRange { offset_ns: i128 },
}

/// One round's offset, delay and bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundFigures {
    /// floor(((t2 - t1) + (t3 - t4)) / 2), ns.
    pub offset_ns: i128,
    /// (t4 - t1) - (t3 - t2), ns.
    pub delay_ns: u64,
    /// |offset_ns - true offset| <= bound_ns.
    pub bound_ns: u64,
    /// (t1 + t4) / 2 on the source's clock, ns.
    pub midpoint_src_tai_ns: u64,
}

/// The estimate of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Estimate {
    /// Destination clock minus source clock, ns.
    pub offset_ns: i64,
    /// |true offset - offset_ns| <= bound_ns at `measured_src_tai_ns`.
    pub bound_ns: u64,
    /// The kept round's delay, ns.
    pub best_delay_ns: u64,
    /// Index of the kept round.
    pub best_round: u32,
    /// Rounds the estimate was made from.
    pub rounds: u32,
    /// The kept round's midpoint on the source's clock, ns.
    pub measured_src_tai_ns: u64,
}

impl Estimate {
    /// The estimate as the sidecar and the planner carry it.
    pub fn to_offset_estimate(&self) -> OffsetEstimate {
        OffsetEstimate {
            offset_ns: self.offset_ns,
            bound_ns: self.bound_ns,
            measured_tai_ns: Some(self.measured_src_tai_ns),
            rounds: Some(self.rounds),
            best_delay_ns: Some(self.best_delay_ns),
        }
    }
}

fn to_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// `ns x ppm / 10^6`, rounded up, saturating.
pub fn ppm_of_ns(ns: u128, ppm: u64) -> u128 {
    ns.saturating_mul(u128::from(ppm)).div_ceil(1_000_000)
}

impl Sample {
    /// This round's offset, delay and bound, or why its stamps are unusable.
    pub fn figures(&self) -> Result<RoundFigures, SampleError> {
        let (t1, t2) = (self.t1_src_send_tai_ns, self.t2_dst_recv_tai_ns);
        let (t3, t4) = (self.t3_dst_send_tai_ns, self.t4_src_recv_tai_ns);
        let round_trip_ns = t4.checked_sub(t1).ok_or(SampleError::SourceBackwards {
            by_ns: t1.saturating_sub(t4),
        })?;
        let held_ns = t3
            .checked_sub(t2)
            .ok_or(SampleError::DestinationBackwards {
                by_ns: t2.saturating_sub(t3),
            })?;
        let delay_ns = round_trip_ns
            .checked_sub(held_ns)
            .ok_or(SampleError::NegativeDelay {
                round_trip_ns,
                held_ns,
            })?;
        let sum = (i128::from(t2) - i128::from(t1)) + (i128::from(t3) - i128::from(t4));
        let reads = u128::from(self.src_read_uncertainty_ns)
            .saturating_add(u128::from(self.dst_read_uncertainty_ns))
            .saturating_mul(2);
        let bound = u128::from(delay_ns)
            .div_ceil(2)
            .saturating_add(reads)
            .saturating_add(1)
            .saturating_add(ppm_of_ns(u128::from(round_trip_ns), IN_ROUND_DRIFT_PPM));
        let midpoint = (u128::from(t1) + u128::from(t4)) / 2;
        Ok(RoundFigures {
            offset_ns: sum.div_euclid(2),
            delay_ns,
            bound_ns: to_u64(bound),
            midpoint_src_tai_ns: to_u64(midpoint),
        })
    }
}

/// The minimum-delay estimate of `samples`, checked for consistency.
pub fn estimate(samples: &[Sample]) -> Result<Estimate, EstimateError> {
    if samples.is_empty() {
        return Err(EstimateError::NoRounds);
    }
    if samples.len() > usize::try_from(MAX_ROUNDS).unwrap_or(usize::MAX) {
        return Err(EstimateError::TooManyRounds {
            count: samples.len(),
        });
    }
    let figures = samples
        .iter()
        .enumerate()
        .map(|(round, s)| {
            s.figures()
                .map_err(|error| EstimateError::BadRound { round, error })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (best, kept) = figures
        .iter()
        .enumerate()
        .min_by_key(|(_, f)| (f.delay_ns, f.bound_ns))
        .ok_or(EstimateError::NoRounds)?;
    for (round, f) in figures.iter().enumerate() {
        check_overlap(round, f, best, kept)?;
    }
    let offset_ns = i64::try_from(kept.offset_ns).map_err(|_| EstimateError::OutOfRange {
        offset_ns: kept.offset_ns,
    })?;
    Ok(Estimate {
        offset_ns,
        bound_ns: kept.bound_ns,
        best_delay_ns: kept.delay_ns,
        best_round: u32::try_from(best).unwrap_or(u32::MAX),
        rounds: u32::try_from(figures.len()).unwrap_or(u32::MAX),
        measured_src_tai_ns: kept.midpoint_src_tai_ns,
    })
}

/// Round `round`'s interval must overlap the kept one's, widened by the
/// clocks' drift between the two rounds.
fn check_overlap(
    round: usize,
    f: &RoundFigures,
    best: usize,
    kept: &RoundFigures,
) -> Result<(), EstimateError> {
    let apart_ns = f.offset_ns.abs_diff(kept.offset_ns);
    let between_ns = f.midpoint_src_tai_ns.abs_diff(kept.midpoint_src_tai_ns);
    if between_ns > MAX_ROUNDS_SPAN_NS {
        return Err(EstimateError::TooFarApart {
            round,
            best,
            between_ns,
        });
    }
    let allowed_ns = u128::from(f.bound_ns)
        .saturating_add(u128::from(kept.bound_ns))
        .saturating_add(ppm_of_ns(u128::from(between_ns), IN_ROUND_DRIFT_PPM));
    if apart_ns > allowed_ns {
        return Err(EstimateError::Inconsistent {
            round,
            best,
            apart_ns,
            allowed_ns,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t1: u64, t2: u64, t3: u64, t4: u64) -> Sample {
        Sample {
            t1_src_send_tai_ns: t1,
            t2_dst_recv_tai_ns: t2,
            t3_dst_send_tai_ns: t3,
            t4_src_recv_tai_ns: t4,
            src_read_uncertainty_ns: 0,
            dst_read_uncertainty_ns: 0,
        }
    }

    #[test]
    fn symmetric_round() {
        // theta = +1000, 100 ns each way, 50 ns held.
        let f = sample(10_000, 11_100, 11_150, 10_250).figures().unwrap();
        assert_eq!(f.offset_ns, 1_000);
        assert_eq!(f.delay_ns, 200);
        assert_eq!(f.bound_ns, 100 + 1 + 1);
    }

    #[test]
    fn backwards_stamps_are_typed() {
        assert!(matches!(
            sample(10, 0, 0, 5).figures(),
            Err(SampleError::SourceBackwards { by_ns: 5 })
        ));
        assert!(matches!(
            sample(0, 10, 5, 20).figures(),
            Err(SampleError::DestinationBackwards { by_ns: 5 })
        ));
        assert!(matches!(
            sample(0, 10, 50, 20).figures(),
            Err(SampleError::NegativeDelay { .. })
        ));
    }
}
