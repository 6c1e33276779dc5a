//! The ground truth of the two-host lab: D = TSC_B - TSC_A, measured through
//! the shared ivshmem page, never through the network clockcarry uses.
//!
//! Under QEMU TCG each lab host's TSC is the outer machine's TSC plus a
//! constant of its QEMU process, so D is a constant. Each host writes its
//! own TSC into its slot in a loop and reads the other's slot between two
//! reads of its own TSC. A value the other host wrote was its TSC at some
//! moment before the read, so
//!
//! - on B: D <= tB_after - a_seen (A's TSC only grew since it wrote a_seen);
//! - on A: D >= b_seen - tA_after.
//!
//! Each side keeps its tightest bound over many samples (a single read can
//! be stale by ~150 ms when a vCPU stalls), then both publish them on the
//! page: D lies in [lower, upper], and the width is the precision.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::shm::Shm;

/// Which lab host this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    A,
    B,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "a" | "A" => Some(Role::A),
            "b" | "B" => Some(Role::B),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::A => "a",
            Role::B => "b",
        }
    }

    /// First word of this role's block on the page.
    fn base(self) -> usize {
        match self {
            Role::A => 8,
            Role::B => 16,
        }
    }

    fn other(self) -> Role {
        match self {
            Role::A => Role::B,
            Role::B => Role::A,
        }
    }
}

// Word layout of a role's block (each block on its own 64-byte line).
const TSC: usize = 0;
const HELLO: usize = 1;
const RESULT: usize = 2;
const SAMPLES: usize = 3;
const DONE: usize = 4;

/// A measurement of D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pair {
    /// The measurement's number (both hosts use the same).
    pub epoch: u64,
    /// D >= lower_cycles (from A's samples).
    pub lower_cycles: i64,
    /// D <= upper_cycles (from B's samples).
    pub upper_cycles: i64,
    /// The middle of the bracket.
    pub d_cycles: i64,
    /// upper - lower.
    pub width_cycles: u64,
    /// Loop iterations on A and B.
    pub samples_a: u64,
    pub samples_b: u64,
}

impl Pair {
    /// Half the width: |D - d_cycles| <= this.
    pub fn half_width_cycles(&self) -> u64 {
        self.width_cycles.div_ceil(2)
    }

    /// Whether two measurements can be of the same constant D (their
    /// brackets overlap).
    pub fn agrees_with(&self, other: &Pair) -> bool {
        self.lower_cycles <= other.upper_cycles && other.lower_cycles <= self.upper_cycles
    }
}

fn tsc() -> u64 {
    clockcarry::host::read_host_tsc()
}

/// Waits until `word` of the other role reads `epoch`, keeping our own TSC
/// slot fresh meanwhile.
fn wait_for(shm: &Shm, role: Role, word: usize, epoch: u64, until: Instant) -> Result<(), String> {
    let theirs = role.other().base() + word;
    let mine = role.base() + TSC;
    while shm.load(theirs) != epoch {
        if Instant::now() > until {
            return Err(format!(
                "host {} did not reach step {word} of measurement {epoch} in time (its word reads {})",
                role.other().name(),
                shm.load(theirs)
            ));
        }
        shm.store(mine, tsc());
        std::hint::spin_loop();
    }
    Ok(())
}

/// Measures D together with the other host (which must call this with the
/// same `epoch` at about the same time): both meet on the page, sample for
/// `duration`, publish their bounds and read each other's.
pub fn measure(
    shm: &Shm,
    role: Role,
    epoch: u64,
    duration: Duration,
    timeout: Duration,
) -> Result<Pair, String> {
    if epoch == 0 {
        return Err("measurement number 0 is reserved".into());
    }
    let until = Instant::now() + timeout;
    let mine = role.base();
    let theirs = role.other().base();
    shm.store(mine + HELLO, epoch);
    wait_for(shm, role, HELLO, epoch, until)?;

    // A keeps the largest lower bound, B the smallest upper bound.
    let mut best: Option<i128> = None;
    let mut samples: u64 = 0;
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let before = tsc();
        shm.store(mine + TSC, before);
        let seen = shm.load(theirs + TSC);
        let after = tsc();
        samples = samples.saturating_add(1);
        if seen == 0 {
            continue;
        }
        let bound = match role {
            Role::A => i128::from(seen) - i128::from(after),
            Role::B => i128::from(after) - i128::from(seen),
        };
        best = Some(match (best, role) {
            (None, _) => bound,
            (Some(b), Role::A) => b.max(bound),
            (Some(b), Role::B) => b.min(bound),
        });
    }
    let best = best.ok_or_else(|| format!("host {} never wrote its TSC", role.other().name()))?;
    let best = i64::try_from(best).map_err(|_| format!("bound {best} out of range"))?;
    shm.store(mine + RESULT, best as u64);
    shm.store(mine + SAMPLES, samples);
    shm.store(mine + DONE, epoch);
    wait_for(shm, role, DONE, epoch, until)?;
    let their_best = shm.load(theirs + RESULT) as i64;
    let their_samples = shm.load(theirs + SAMPLES);
    let (lower, upper, samples_a, samples_b) = match role {
        Role::A => (best, their_best, samples, their_samples),
        Role::B => (their_best, best, their_samples, samples),
    };
    if lower > upper {
        return Err(format!(
            "inconsistent bracket: D >= {lower} (A) but D <= {upper} (B): the two TSCs do not \
             differ by a constant"
        ));
    }
    let width = i128::from(upper) - i128::from(lower);
    let mid = i128::from(lower) + width / 2;
    Ok(Pair {
        epoch,
        lower_cycles: lower,
        upper_cycles: upper,
        d_cycles: i64::try_from(mid).map_err(|_| "D out of range".to_string())?,
        width_cycles: u64::try_from(width).unwrap_or(u64::MAX),
        samples_a,
        samples_b,
    })
}

/// The next unused measurement number on the page (both roles' words read):
/// the leader picks it and tells the other host, so a measurement never
/// meets a finished one of an earlier run of a tool in the same boot.
pub fn next_epoch(shm: &Shm) -> u64 {
    [Role::A, Role::B]
        .iter()
        .flat_map(|r| [shm.load(r.base() + HELLO), shm.load(r.base() + DONE)])
        .max()
        .unwrap_or(0)
        .saturating_add(1)
}

/// Brackets wider than this are measured again (one QEMU was descheduled
/// for most of the window on the shared machine).
pub const NARROW_CYCLES: u64 = 2_000;

/// Measures D with the other host, agreeing on the measurement numbers over
/// `ctl` (A leads): up to `tries` windows of `duration`, stopping at the
/// first narrower than [`NARROW_CYCLES`]. All windows bound the same
/// constant, so the result is their intersection.
pub fn measure_with(
    ctl: &mut crate::control::Control,
    shm: &Shm,
    role: Role,
    duration: Duration,
    tries: u32,
) -> Result<Pair, String> {
    let mut acc: Option<Pair> = None;
    for _ in 0..tries.max(1) {
        let epoch = match role {
            Role::A => {
                let e = next_epoch(shm);
                ctl.send(&serde_json::json!({"step": "tscpair", "epoch": e}))
                    .map_err(|e| format!("control: {e}"))?;
                e
            }
            Role::B => ctl
                .expect("tscpair")
                .map_err(|e| format!("control: {e}"))?
                .get("epoch")
                .and_then(serde_json::Value::as_u64)
                .ok_or("control: tscpair without an epoch")?,
        };
        let p = measure(shm, role, epoch, duration, Duration::from_secs(60))?;
        let merged = match acc {
            None => p,
            Some(a) => {
                let lower = a.lower_cycles.max(p.lower_cycles);
                let upper = a.upper_cycles.min(p.upper_cycles);
                if lower > upper {
                    return Err(format!(
                        "D moved between windows: [{}, {}] then [{}, {}]",
                        a.lower_cycles, a.upper_cycles, p.lower_cycles, p.upper_cycles
                    ));
                }
                let width = i128::from(upper) - i128::from(lower);
                Pair {
                    epoch: p.epoch,
                    lower_cycles: lower,
                    upper_cycles: upper,
                    d_cycles: i64::try_from(i128::from(lower) + width / 2).unwrap_or(lower),
                    width_cycles: u64::try_from(width).unwrap_or(u64::MAX),
                    samples_a: a.samples_a.saturating_add(p.samples_a),
                    samples_b: a.samples_b.saturating_add(p.samples_b),
                }
            }
        };
        acc = Some(merged);
        if merged.width_cycles <= NARROW_CYCLES {
            break;
        }
    }
    acc.ok_or_else(|| "no measurement".into())
}
