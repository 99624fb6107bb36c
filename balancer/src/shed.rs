//! Load shedding: whether a service refuses a new flow because of how many
//! connections it has (the L7 seed's `sim_conn_threshold`, at layer 4).
//!
//! - `hard`: refuse when the service already has `threshold` connections
//!   or more, so it never holds more than `threshold`.
//! - `exponential`: refuse with probability `1 - e^(-K (c - t))` where `c`
//!   is the connection count before this flow and `t` the threshold (0 at
//!   or below the threshold, 26% one above with the default K = 0.3, 95%
//!   ten above): shedding ramps up instead of cutting off.
//!
//! The draw comes from the caller's seeded [`SchedRng`]; the function is
//! pure and allocation-free (it runs per new flow on the packet path).

use crate::sched::{SchedRng, unit_f64};

/// Default steepness of exponential shedding (the seed's heuristic).
pub const DEFAULT_K: f64 = 0.3;

/// How a service sheds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    /// Refuse at and above the threshold.
    Hard,
    /// Refuse with probability `1 - e^(-k (c - t))` above the threshold.
    Exponential { k: f64 },
}

/// A service's shedding rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shedding {
    /// Connections (active + inactive) of the service from which shedding
    /// starts.
    pub threshold: u32,
    pub strategy: Strategy,
}

/// `k` is finite (config validation refuses NaN and infinities), so
/// equality is an equivalence and the config that holds it can be `Eq`.
impl Eq for Strategy {}
impl Eq for Shedding {}

impl Shedding {
    /// The probability that a new flow is refused when the service has
    /// `conns` connections.
    pub fn refuse_probability(&self, conns: u32) -> f64 {
        match self.strategy {
            Strategy::Hard => {
                if conns >= self.threshold {
                    1.0
                } else {
                    0.0
                }
            }
            Strategy::Exponential { k } => {
                if conns <= self.threshold {
                    0.0
                } else {
                    let excess = f64::from(conns - self.threshold);
                    // -expm1(-x) = 1 - e^(-x), exact for small x.
                    (-(-k * excess).exp_m1()).clamp(0.0, 1.0)
                }
            }
        }
    }

    /// Whether to refuse a new flow arriving when the service has `conns`
    /// connections. Draws from `rng` only when the outcome is uncertain,
    /// so hard shedding and the region below the threshold consume no
    /// randomness.
    pub fn refuse(&self, conns: u32, rng: &mut SchedRng) -> bool {
        let p = self.refuse_probability(conns);
        if p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            unit_f64(rng) < p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::rng_from_seed;

    fn exp(threshold: u32, k: f64) -> Shedding {
        Shedding {
            threshold,
            strategy: Strategy::Exponential { k },
        }
    }

    #[test]
    fn hard_refuses_from_the_threshold_on() {
        let s = Shedding {
            threshold: 5,
            strategy: Strategy::Hard,
        };
        let mut rng = rng_from_seed(1);
        let refused: Vec<bool> = (0..8).map(|c| s.refuse(c, &mut rng)).collect();
        assert_eq!(
            refused,
            [false, false, false, false, false, true, true, true]
        );
        // and drew nothing
        assert_eq!(rng, rng_from_seed(1));
    }

    #[test]
    fn exponential_probability_is_the_seed_formula() {
        let s = exp(10, 0.3);
        for c in 0..=10 {
            assert_eq!(s.refuse_probability(c), 0.0, "c = {c}");
        }
        for c in 11..60u32 {
            let want = 1.0 - (-0.3 * f64::from(c - 10)).exp();
            assert!((s.refuse_probability(c) - want).abs() < 1e-12, "c = {c}");
        }
        assert!((s.refuse_probability(11) - 0.259_181_779_9).abs() < 1e-9);
        assert!(s.refuse_probability(u32::MAX) <= 1.0);
        assert_eq!(exp(0, 1e9).refuse_probability(1), 1.0);
    }

    /// Refusal frequency against the formula: at each excess of 1..=8
    /// connections, 20 000 seeded draws fall within 0.015 of
    /// 1 - e^(-0.3 x) (more than 4 standard deviations, sqrt(p(1-p)/n) <=
    /// 0.0036).
    #[test]
    fn exponential_refusals_match_the_probability_statistically() {
        let s = exp(20, DEFAULT_K);
        let mut rng = rng_from_seed(2024);
        for excess in 1..=8u32 {
            let n = 20_000;
            let refused = (0..n).filter(|_| s.refuse(20 + excess, &mut rng)).count();
            let f = refused as f64 / f64::from(n);
            let p = 1.0 - (-0.3 * f64::from(excess)).exp();
            assert!((f - p).abs() < 0.015, "excess {excess}: {f} vs {p}");
        }
    }

    #[test]
    fn exponential_is_deterministic_given_the_seed() {
        let s = exp(3, 0.5);
        let run = |seed| {
            let mut rng = rng_from_seed(seed);
            (0..100)
                .map(|i| s.refuse(3 + i % 5, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }
}
