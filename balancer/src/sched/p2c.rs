//! The power of two random choices (Mitzenmacher): draw two distinct
//! eligible backends at random and take the less loaded one.

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind, below};

/// Two random choices. Load is the shortest-expected-delay cost including
/// inactive connections, `(256 * (active + 1) + inactive) / weight`, so
/// that weights count and an idle heavy backend beats an idle light one;
/// on equal cost the first drawn wins. The draws come from the caller's
/// generator: the same seed and inputs give the same picks. O(backends)
/// per pick, no state.
#[derive(Clone, Copy, Debug, Default)]
pub struct TwoChoices;

/// Index of the `k`-th eligible backend.
fn nth_eligible(backends: &[BackendState], k: usize) -> Option<usize> {
    backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.is_eligible())
        .nth(k)
        .map(|(i, _)| i)
}

impl Algorithm for TwoChoices {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::P2c
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, rng: &mut SchedRng) -> Option<usize> {
        let n = backends.iter().filter(|b| b.is_eligible()).count();
        match n {
            0 => None,
            1 => nth_eligible(backends, 0),
            _ => {
                let a = below(rng, n);
                let mut c = below(rng, n - 1);
                if c >= a {
                    c += 1;
                }
                let (ia, ic) = (nth_eligible(backends, a)?, nth_eligible(backends, c)?);
                let cost =
                    |b: &BackendState| (u128::from(b.overhead() + 256), u128::from(b.weight));
                let ((na, da), (nc, dc)) = (cost(&backends[ia]), cost(&backends[ic]));
                Some(if nc * da < na * dc { ic } else { ia })
            }
        }
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::super::least::sim::{run, share};
    use super::super::testkit::*;
    use super::super::{Flow, rng_from_seed};
    use super::*;

    fn seq(seed: u64, b: &[BackendState], n: usize) -> Vec<usize> {
        let mut rng = rng_from_seed(seed);
        (0..n)
            .map(|_| {
                TwoChoices
                    .pick(b, &Flow::default(), &mut rng)
                    .expect("eligible")
            })
            .collect()
    }

    #[test]
    fn p2c_is_deterministic_given_the_seed() {
        let b = [up(1), up(1), up(1), up(1), up(1)];
        assert_eq!(seq(7, &b, 200), seq(7, &b, 200));
        assert_ne!(seq(7, &b, 200), seq(8, &b, 200));
    }

    /// Idle equal backends: both draws are uniform, the first wins the
    /// tie, so each of 4 backends gets 1/4 (tolerance 0.02 over 20 000
    /// picks: 6 standard deviations).
    #[test]
    fn p2c_spreads_uniformly_over_equal_idle_backends_and_skips_ineligible() {
        let b = [up(1), down(1), up(1), up(0), up(1), up(1)];
        let s = seq(3, &b, 20_000);
        for (i, bi) in b.iter().enumerate() {
            let f = s.iter().filter(|&&x| x == i).count() as f64 / 20_000.0;
            if bi.is_eligible() {
                assert!((f - 0.25).abs() < 0.02, "backend {i}: {f}");
            } else {
                assert_eq!(f, 0.0, "backend {i}");
            }
        }
    }

    /// One idle backend among three busy ones is chosen exactly when it is
    /// one of the two drawn: probability 1 - (3/4)(2/3) = 1/2.
    #[test]
    fn p2c_takes_the_idle_backend_whenever_it_is_drawn() {
        let busy = BackendState {
            active_conns: 100,
            ..up(1)
        };
        let b = [busy, up(1), busy, busy];
        let s = seq(5, &b, 20_000);
        let f = s.iter().filter(|&&x| x == 1).count() as f64 / 20_000.0;
        assert!((f - 0.5).abs() < 0.02, "idle share {f}");
    }

    #[test]
    fn p2c_with_one_eligible_backend_needs_no_draw() {
        let b = [down(1), up(1)];
        assert_eq!(seq(1, &b, 3), [1, 1, 1]);
    }

    /// With connections of random length, the weights 1:3 show in the
    /// shares (near 1/4, 3/4; p2c balances less tightly than wlc, tolerance
    /// 0.05).
    #[test]
    fn p2c_shares_follow_weights_under_load() {
        let mut rng = rng_from_seed(21);
        let mut b = [up(1), up(3)];
        let got = run(&mut TwoChoices, &mut b, 40_000, &mut rng, |_, r| {
            1 + below(r, 40) as u64
        });
        let light = share(&got, 0);
        assert!((light - 0.25).abs() < 0.05, "p2c light share {light}");
    }
}
