//! Round robin and smooth weighted round robin.

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind};

/// Round robin over eligible backends (IPVS `ip_vs_rr.c`): each pick takes
/// the next eligible backend after the one picked last, wrapping around.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    /// Index picked last; `None` after a reset (start from index 0).
    last: Option<usize>,
}

impl RoundRobin {
    pub const fn new() -> Self {
        RoundRobin { last: None }
    }
}

impl Algorithm for RoundRobin {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Rr
    }

    fn pick(
        &mut self,
        backends: &[BackendState],
        _flow: &Flow,
        _rng: &mut SchedRng,
    ) -> Option<usize> {
        let n = backends.len();
        let start = match self.last {
            Some(last) if last < n => last + 1,
            _ => 0,
        };
        let chosen = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| backends.get(i).is_some_and(BackendState::is_eligible))?;
        self.last = Some(chosen);
        Some(chosen)
    }

    fn reset(&mut self) {
        self.last = None;
    }
}

/// Smooth weighted round robin, the algorithm of nginx
/// (`ngx_http_upstream_get_peer()` in `ngx_http_upstream_round_robin.c`,
/// introduced in nginx 1.3.1 / commit "Upstream: smooth weighted
/// round-robin balancing"), chosen over IPVS's interleaved gcd / max-weight
/// stepping (`ip_vs_wrr.c`) because IPVS sends runs of consecutive flows to
/// the heaviest backends (weights 5:1:1 cycle as `a a a a a b c`) where this
/// interleaves them (`a a b a c a a`): after any number of picks, every
/// backend has had its weighted share to within less than one pick.
///
/// Each eligible backend has a running `current` weight. Every pick adds
/// each backend's weight to its `current`, chooses the largest `current`
/// (the lowest index on ties) and subtracts the total eligible weight from
/// the chosen one. Over every `W = sum of weights` consecutive picks from a
/// fresh state each backend is chosen exactly `weight` times and the state
/// returns to all zeros, so the sequence is periodic with period `W`.
///
/// Weight or availability changes restart the cycle from zero (like IPVS's
/// `ip_vs_wrr_dest_changed()`): the new weights hold exactly from the next
/// pick on, and a backend that comes back carries no credit or debt from
/// before. Cost: O(backends) per pick, 16 bytes of state per backend in a
/// `Vec` reallocated only when the slice's length changes.
#[derive(Clone, Debug, Default)]
pub struct Wrr {
    state: Vec<WrrPeer>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WrrPeer {
    current: i64,
    /// The effective weight this `current` was accumulated with (0 when not
    /// eligible), to notice changes.
    weight: u32,
}

impl Wrr {
    pub const fn new() -> Self {
        Wrr { state: Vec::new() }
    }
}

impl Algorithm for Wrr {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Wrr
    }

    fn pick(
        &mut self,
        backends: &[BackendState],
        _flow: &Flow,
        _rng: &mut SchedRng,
    ) -> Option<usize> {
        if self.state.len() != backends.len() {
            self.state.clear();
            self.state.resize(backends.len(), WrrPeer::default());
        }
        let effective = |b: &BackendState| if b.is_eligible() { b.weight } else { 0 };
        if self
            .state
            .iter()
            .zip(backends)
            .any(|(p, b)| p.weight != effective(b))
        {
            for (p, b) in self.state.iter_mut().zip(backends) {
                *p = WrrPeer {
                    current: 0,
                    weight: effective(b),
                };
            }
        }
        // Weights are u32 and there are fewer than 2^32 backends, so the total
        // and every `current` (bounded by the total in absolute value) fit in
        // an i64; saturating arithmetic anyway, to never panic.
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_current = i64::MIN;
        for (i, p) in self.state.iter_mut().enumerate() {
            if p.weight == 0 {
                continue;
            }
            let w = i64::from(p.weight);
            p.current = p.current.saturating_add(w);
            total = total.saturating_add(w);
            if p.current > best_current {
                best_current = p.current;
                best = Some(i);
            }
        }
        let chosen = best?;
        if let Some(p) = self.state.get_mut(chosen) {
            p.current = p.current.saturating_sub(total);
        }
        Some(chosen)
    }

    fn reset(&mut self) {
        self.state.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    // ---- rr ----

    #[test]
    fn rr_cycles_in_order() {
        let b = [up(1), up(1), up(1)];
        let mut s = RoundRobin::new();
        assert_eq!(picks(&mut s, &b, 7), [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn rr_ignores_weights_and_skips_drained_and_unavailable() {
        let b = [up(5), up(0), down(3), up(1)];
        let mut s = RoundRobin::new();
        assert_eq!(picks(&mut s, &b, 6), [0, 3, 0, 3, 0, 3]);
    }

    #[test]
    fn rr_none_when_nothing_is_eligible() {
        let mut s = RoundRobin::new();
        assert_eq!(pick1(&mut s, &[], 0), None);
        assert_eq!(pick1(&mut s, &[up(0), down(1)], 0), None);
        // and recovers once something is
        assert_eq!(pick1(&mut s, &[up(0), up(1)], 0), Some(1));
    }

    #[test]
    fn rr_continues_after_the_last_pick_when_backends_change() {
        let mut s = RoundRobin::new();
        let b = [up(1), up(1), up(1), up(1)];
        assert_eq!(picks(&mut s, &b, 2), [0, 1]);
        // backend 2 drained: 1 -> 3 -> 0 -> 1
        let b2 = [up(1), up(1), up(0), up(1)];
        assert_eq!(picks(&mut s, &b2, 3), [3, 0, 1]);
        // the set shrank below the last index without a reset: no panic
        let mut s = RoundRobin::new();
        assert_eq!(picks(&mut s, &b, 4), [0, 1, 2, 3]);
        assert_eq!(picks(&mut s, &b[..2], 3), [0, 1, 0]);
        s.reset();
        assert_eq!(picks(&mut s, &b, 1), [0]);
    }

    #[test]
    fn rr_distribution_is_exact() {
        let b = [up(1), up(2), down(1), up(3), up(0)];
        let mut s = RoundRobin::new();
        assert_eq!(counts(&mut s, &b, 9999), [3333, 3333, 0, 3333, 0]);
    }

    // ---- wrr ----

    #[test]
    fn wrr_exact_sequences() {
        let mut s = Wrr::new();
        assert_eq!(
            picks(&mut s, &[up(5), up(1)], 12),
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]
        );
        let mut s = Wrr::new();
        assert_eq!(picks(&mut s, &[up(1), up(2), up(3)], 6), [2, 1, 0, 2, 1, 2]);
        let mut s = Wrr::new();
        // nginx's own example: weights 5, 1, 1 -> a a b a c a a
        assert_eq!(
            picks(&mut s, &[up(5), up(1), up(1)], 7),
            [0, 0, 1, 0, 2, 0, 0]
        );
        let mut s = Wrr::new();
        assert_eq!(picks(&mut s, &[up(1), up(1), up(1)], 4), [0, 1, 2, 0]);
        let mut s = Wrr::new();
        assert_eq!(picks(&mut s, &[up(7)], 3), [0, 0, 0]);
    }

    #[test]
    fn wrr_distribution_equals_weights_over_whole_cycles() {
        let cases: [(&[BackendState], &[usize]); 4] = [
            (&[up(1), up(2), up(3)], &[1, 2, 3]),
            (&[up(5), up(1)], &[5, 1]),
            (&[up(1), up(0), up(2), down(4), up(3)], &[1, 0, 2, 0, 3]),
            (&[down(9), up(4), up(0), up(1), up(7)], &[0, 4, 0, 1, 7]),
        ];
        for (b, w) in cases {
            let total: usize = w.iter().sum();
            let n = 10_000 / total * total;
            let mut s = Wrr::new();
            let got = counts(&mut s, b, n);
            let want: Vec<usize> = w.iter().map(|x| x * n / total).collect();
            assert_eq!(got, want, "weights {w:?}");
            // ... and every single cycle is exact, not just the sum.
            let seq = picks(&mut s, b, total * 3);
            for cycle in seq.chunks(total) {
                for (i, wi) in w.iter().enumerate() {
                    assert_eq!(
                        cycle.iter().filter(|&&x| x == i).count(),
                        *wi,
                        "weights {w:?} cycle {cycle:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn wrr_is_smooth() {
        // After every prefix of k picks, each backend has had its share
        // k * w / W within less than one pick: no backend gets ahead in a
        // burst. IPVS's interleaved wrr fails this for 5:1:1 (its cycle is
        // a a a a a b c: 5 picks of a where 3.6 are due).
        let cases: [&[u32]; 7] = [
            &[5, 1],
            &[5, 1, 1],
            &[1, 2, 3],
            &[100, 1, 1],
            &[3, 3, 3],
            &[10, 7, 3, 1],
            &[1, 1000],
        ];
        for w in cases {
            let b: Vec<_> = w.iter().map(|&x| up(x)).collect();
            let total: u32 = w.iter().sum();
            let mut s = Wrr::new();
            let mut count = vec![0u64; w.len()];
            for k in 1..=u64::from(total) * 3 {
                count[pick1(&mut s, &b, 0).expect("eligible")] += 1;
                for (i, &wi) in w.iter().enumerate() {
                    // |count - k * w / W| < 1, in integers
                    let lhs = (count[i] * u64::from(total)).abs_diff(k * u64::from(wi));
                    assert!(
                        lhs < u64::from(total),
                        "weights {w:?}: backend {i} has {} after {k}",
                        count[i]
                    );
                }
            }
        }
        // The same for the interleaving itself: 5:1:1 never picks a three
        // times in a row within a cycle.
        let mut s = Wrr::new();
        let seq = picks(&mut s, &[up(5), up(1), up(1)], 7);
        assert_eq!(longest_run(&seq), 2);
    }

    #[test]
    fn wrr_none_when_nothing_is_eligible() {
        let mut s = Wrr::new();
        assert_eq!(pick1(&mut s, &[], 0), None);
        assert_eq!(pick1(&mut s, &[up(0), down(5), up(0)], 0), None);
        assert_eq!(pick1(&mut s, &[up(0), down(5), up(2)], 0), Some(2));
    }

    #[test]
    fn wrr_weight_change_mid_stream_starts_a_new_exact_cycle() {
        let mut s = Wrr::new();
        let before = [up(1), up(1)];
        assert_eq!(picks(&mut s, &before, 3), [0, 1, 0]);
        let after = [up(1), up(3)];
        // a fresh cycle of 1:3 (from zero: 1 -> (1,-1), tie -> 0, 1, 1)
        let seq = picks(&mut s, &after, 8);
        assert_eq!(seq, [1, 0, 1, 1, 1, 0, 1, 1]);
        // draining backend 1 sends everything to 0 at once
        assert_eq!(picks(&mut s, &[up(1), up(0)], 3), [0, 0, 0]);
        // and it comes back without a burst of pent-up credit
        let seq = picks(&mut s, &after, 4);
        assert_eq!(seq, [1, 0, 1, 1]);
    }

    #[test]
    fn wrr_backend_going_down_and_up_carries_no_credit() {
        let mut s = Wrr::new();
        let b = [up(3), up(3), up(3)];
        picks(&mut s, &b, 2);
        let b_down = [up(3), down(3), up(3)];
        let seq = picks(&mut s, &b_down, 6);
        assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 0);
        assert_eq!(counts(&mut s, &b, 9), [3, 3, 3]);
    }

    #[test]
    fn wrr_handles_set_size_changes_without_reset() {
        let mut s = Wrr::new();
        picks(&mut s, &[up(1), up(2), up(3)], 4);
        assert_eq!(picks(&mut s, &[up(2), up(1)], 3), [0, 1, 0]);
        assert_eq!(
            counts(&mut s, &[up(1), up(1), up(1), up(1)], 8),
            [2, 2, 2, 2]
        );
        s.reset();
        assert_eq!(picks(&mut s, &[up(5), up(1)], 4), [0, 0, 0, 1]);
    }

    #[test]
    fn wrr_huge_weights_do_not_overflow() {
        let mut s = Wrr::new();
        let b = [up(u32::MAX), up(u32::MAX), up(1)];
        let c = counts(&mut s, &b, 1000);
        assert_eq!(c[0] + c[1], 1000);
        assert!(c[0].abs_diff(c[1]) <= 1);
    }

    #[test]
    fn rr_and_wrr_ignore_active_conns_and_flow_hash() {
        for k in [SchedulerKind::Rr, SchedulerKind::Wrr] {
            let b1 = [up(1), up(2)];
            let b2 = [
                BackendState {
                    active_conns: 1000,
                    ..up(1)
                },
                up(2),
            ];
            let h = rewrite::FlowHasher::new([0; 16]);
            let (mut s1, mut s2) = (k.algorithm(h), k.algorithm(h));
            let a: Vec<_> = (0..12).map(|i| pick1(s1.as_mut(), &b1, i)).collect();
            let b: Vec<_> = (0..12).map(|i| pick1(s2.as_mut(), &b2, i * 7919)).collect();
            assert_eq!(a, b, "{k}");
        }
    }
}
