//! Schedulers: which backend of a service gets a new flow.
//!
//! Pure and deterministic: a scheduler sees the service's backends as a slice
//! of [`BackendView`] (the caller's order, which must stay stable while the
//! set is unchanged) and the flow's hash (`rewrite::FlowHasher`, the one hash
//! of the project, for the hashing schedulers), and returns an index into
//! that slice. It reads no clock and draws no randomness of its own; a
//! scheduler that needs either will take it as an argument.
//!
//! A backend is eligible when `available` (health checks pass, not removed)
//! and `weight > 0` (weight 0 = drained, as in IPVS: existing connections
//! stay, new ones go elsewhere). No eligible backend: `None`, and the caller
//! drops or answers the packet.
//!
//! When backends are added, removed or reordered, call
//! [`Scheduler::reset`]; weight and availability changes need no call (the
//! schedulers notice them), and a slice whose length changed is handled
//! without panicking even if `reset` was forgotten.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a scheduler needs to know about one backend.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct BackendView {
    /// 0 = drained: never chosen for new flows.
    pub weight: u32,
    pub active_conns: u32,
    pub available: bool,
}

impl BackendView {
    pub const fn is_eligible(&self) -> bool {
        self.available && self.weight > 0
    }
}

/// The scheduler of a service, by its `ipvsadm` name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Round robin over eligible backends, weights ignored beyond 0.
    Rr,
    /// Weighted round robin, smooth (see [`Wrr`]).
    Wrr,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 2] = [SchedulerKind::Rr, SchedulerKind::Wrr];

    pub const fn name(self) -> &'static str {
        match self {
            SchedulerKind::Rr => "rr",
            SchedulerKind::Wrr => "wrr",
        }
    }

    /// A fresh scheduler of this kind.
    /// The name in config files and status output.
    pub const fn as_str(self) -> &'static str {
        self.name()
    }

    pub fn build(self) -> Box<dyn Scheduler> {
        match self {
            SchedulerKind::Rr => Box::new(RoundRobin::new()),
            SchedulerKind::Wrr => Box::new(Wrr::new()),
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown scheduler name (from the CLI or the control socket; config
/// files go through serde, which reports the same names).
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("unknown scheduler {0:?} (known: rr, wrr)")]
pub struct UnknownScheduler(pub String);

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownScheduler(s.to_owned()))
    }
}

/// A scheduling algorithm with whatever state it keeps between picks.
///
/// `pick` runs once per new flow on the packet path: it must not allocate
/// except when the backend set changed size, and must not panic on any
/// input (empty slice, all drained, huge weights, a slice longer or shorter
/// than last time).
pub trait Scheduler: fmt::Debug + Send {
    fn kind(&self) -> SchedulerKind;

    /// Index into `backends` of the backend for a new flow, or `None` if no
    /// backend is eligible. `flow_hash` is the flow's `FlowHasher` hash;
    /// schedulers that do not hash ignore it.
    fn pick(&mut self, backends: &[BackendView], flow_hash: u64) -> Option<usize>;

    /// Forget the position in the rotation: the backend set was replaced.
    fn reset(&mut self);
}

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

impl Scheduler for RoundRobin {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Rr
    }

    fn pick(&mut self, backends: &[BackendView], _flow_hash: u64) -> Option<usize> {
        let n = backends.len();
        let start = match self.last {
            Some(last) if last < n => last + 1,
            _ => 0,
        };
        let chosen = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| backends.get(i).is_some_and(BackendView::is_eligible))?;
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

impl Scheduler for Wrr {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Wrr
    }

    fn pick(&mut self, backends: &[BackendView], _flow_hash: u64) -> Option<usize> {
        if self.state.len() != backends.len() {
            self.state.clear();
            self.state.resize(backends.len(), WrrPeer::default());
        }
        let effective = |b: &BackendView| if b.is_eligible() { b.weight } else { 0 };
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
    use super::*;

    fn up(weight: u32) -> BackendView {
        BackendView {
            weight,
            active_conns: 0,
            available: true,
        }
    }

    fn down(weight: u32) -> BackendView {
        BackendView {
            weight,
            active_conns: 0,
            available: false,
        }
    }

    fn picks(s: &mut dyn Scheduler, b: &[BackendView], n: usize) -> Vec<usize> {
        (0..n)
            .map(|i| s.pick(b, i as u64).expect("eligible backend"))
            .collect()
    }

    fn counts(s: &mut dyn Scheduler, b: &[BackendView], n: usize) -> Vec<usize> {
        let mut c = vec![0; b.len()];
        for i in picks(s, b, n) {
            c[i] += 1;
        }
        c
    }

    /// Longest run of the same backend in a sequence.
    fn longest_run(seq: &[usize]) -> usize {
        seq.chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn kind_names_round_trip_through_str_and_serde() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>(), Ok(k));
            assert_eq!(k.to_string(), k.name());
            assert_eq!(k.build().kind(), k);
        }
        assert_eq!(
            "WRR".parse::<SchedulerKind>(),
            Err(UnknownScheduler("WRR".into()))
        );
        #[derive(Deserialize)]
        struct Svc {
            scheduler: SchedulerKind,
        }
        let v: Svc = toml_like("wrr");
        assert_eq!(v.scheduler, SchedulerKind::Wrr);

        fn toml_like(name: &str) -> Svc {
            use serde::de::IntoDeserializer;
            use serde::de::value::{Error, MapDeserializer};
            let map = [("scheduler", name)]
                .into_iter()
                .map(|(k, v)| (k, v.into_deserializer()));
            let de: MapDeserializer<'_, _, Error> = MapDeserializer::new(map);
            Svc::deserialize(de).expect("known name")
        }
    }

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
        assert_eq!(s.pick(&[], 0), None);
        assert_eq!(s.pick(&[up(0), down(1)], 0), None);
        // and recovers once something is
        assert_eq!(s.pick(&[up(0), up(1)], 0), Some(1));
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
        let cases: [(&[BackendView], &[usize]); 4] = [
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
                count[s.pick(&b, 0).expect("eligible")] += 1;
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
        assert_eq!(s.pick(&[], 0), None);
        assert_eq!(s.pick(&[up(0), down(5), up(0)], 0), None);
        assert_eq!(s.pick(&[up(0), down(5), up(2)], 0), Some(2));
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
    fn schedulers_ignore_active_conns_and_flow_hash() {
        for k in SchedulerKind::ALL {
            let b1 = [up(1), up(2)];
            let b2 = [
                BackendView {
                    active_conns: 1000,
                    ..up(1)
                },
                up(2),
            ];
            let (mut s1, mut s2) = (k.build(), k.build());
            let a: Vec<_> = (0..12).map(|i| s1.pick(&b1, i)).collect();
            let b: Vec<_> = (0..12).map(|i| s2.pick(&b2, i * 7919)).collect();
            assert_eq!(a, b, "{k}");
        }
    }
}
