//! Schedulers: which backend of a service gets a new flow.
//!
//! Pure and deterministic: an [`Algorithm`] sees the service's backends as a
//! slice of [`BackendState`] (the caller's order, which must stay stable
//! while the set is unchanged), the new [`Flow`] (its hashes, computed with
//! `rewrite::FlowHasher`, the one hash of the project) and a seeded
//! [`SchedRng`] passed in by the caller, and returns an index into that
//! slice. It reads no clock and draws no randomness of its own, so every
//! sequence of picks is reproducible from the inputs and the seed.
//!
//! A backend is eligible when `available` (health checks pass, not
//! removed), `weight > 0` (weight 0 = drained, as in IPVS: existing
//! connections stay, new ones go elsewhere), not a standby ("sorry")
//! server, and below its connection limit if it has one. No eligible
//! backend: `None`; the service's [`policy`](policy::ServicePolicy) then
//! tries the sorry server or refuses the flow.
//!
//! When backends are added, removed or reordered, call
//! [`Algorithm::reset`]; weight and availability changes need no call (the
//! algorithms notice them), and a slice whose length changed is handled
//! without panicking even if `reset` was forgotten.
//!
//! | kind | picks | state |
//! | --- | --- | --- |
//! | `rr` | next eligible after the last pick | last index |
//! | `wrr` | smooth weighted round robin (nginx) | `current` per backend |
//! | `lc` | least `256 * active + inactive` (IPVS) | none |
//! | `wlc` | least `(256 * active + inactive) / weight` | none |
//! | `sed` | least `(active + 1) / weight` | none |
//! | `nq` | an idle backend, else as `sed` | none |
//! | `sh` | source address on a consistent ring, 100 points per backend | ring |
//! | `mh` | source address through a Maglev table | table |
//! | `lrt` | least health-check RTT / weight | none |
//! | `fns` | first backend below its high-water mark | none |
//! | `p2c` | the less loaded of two random eligible backends | none |

use core::fmt;
use core::str::FromStr;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

mod fns;
mod hash;
mod least;
mod p2c;
pub mod policy;
mod rr;

pub use fns::FirstNonSaturated;
pub use hash::{MAGLEV_TABLE_SIZE, Maglev, RING_POINTS, SourceHashRing};
pub use least::{
    LeastConn, LeastResponseTime, NeverQueue, ShortestExpectedDelay, WeightedLeastConn,
};
pub use p2c::TwoChoices;
pub use rr::{RoundRobin, Wrr};

/// The random generator schedulers and shedding draw from: a portable,
/// seedable generator (the same seed gives the same sequence on every
/// platform and release of `rand`), owned by the caller.
pub type SchedRng = rand::rngs::Xoshiro256PlusPlus;

/// A [`SchedRng`] from a seed (tests, and drivers that pick a seed).
pub fn rng_from_seed(seed: u64) -> SchedRng {
    SchedRng::seed_from_u64(seed)
}

/// A seed from the operating system's randomness (through std's
/// `RandomState`), for drivers: pure code takes its seed as a parameter.
pub fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}

/// A uniform draw in `[0, 1)` with 53 bits of precision.
#[inline]
pub fn unit_f64(rng: &mut SchedRng) -> f64 {
    use rand::Rng as _;
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform draw in `0..n` (`n > 0`), by Lemire's multiply-shift: the
/// bias is below `n / 2^64`, negligible for backend counts.
#[inline]
pub fn below(rng: &mut SchedRng, n: usize) -> usize {
    use rand::Rng as _;
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// What an algorithm needs to know about one backend.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BackendState {
    /// Stable identity of the backend for the hashing algorithms (the hash
    /// of its name): ring points and Maglev preferences follow the backend,
    /// not its position, so that removing one backend from the config does
    /// not move the flows of the others.
    pub key: u64,
    /// 0 = drained: never chosen for new flows.
    pub weight: u32,
    /// Established TCP connections (IPVS ActiveConn).
    pub active_conns: u32,
    /// Other connections: TCP opening or closing, UDP (IPVS InActConn).
    pub inactive_conns: u32,
    /// Health checks pass (or none are configured) and not removed.
    pub available: bool,
    /// The sorry server: only used when no other backend is eligible.
    pub standby: bool,
    /// Connection limit (active + inactive); 0 = none. At the limit the
    /// backend is not eligible (IPVS's upper threshold).
    pub max_conns: u32,
    /// `fns`: the backend is saturated from this many connections on;
    /// 0 = never saturated.
    pub high_water: u32,
    /// Average health-check round trip in microseconds; 0 = not measured.
    pub rtt_us: u32,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            key: 0,
            weight: 1,
            active_conns: 0,
            inactive_conns: 0,
            available: true,
            standby: false,
            max_conns: 0,
            high_water: 0,
            rtt_us: 0,
        }
    }
}

impl BackendState {
    /// Active plus inactive connections.
    #[inline]
    pub const fn conns(&self) -> u32 {
        self.active_conns.saturating_add(self.inactive_conns)
    }

    /// At its connection limit.
    #[inline]
    pub const fn is_full(&self) -> bool {
        self.max_conns != 0 && self.conns() >= self.max_conns
    }

    /// May be given a new flow by an algorithm.
    #[inline]
    pub const fn is_eligible(&self) -> bool {
        self.available && self.weight > 0 && !self.standby && !self.is_full()
    }

    /// IPVS's connection overhead: an active connection weighs 256
    /// inactive ones (`ip_vs_dest_conn_overhead()`).
    #[inline]
    pub const fn overhead(&self) -> u64 {
        ((self.active_conns as u64) << 8) + self.inactive_conns as u64
    }
}

/// The new flow as the algorithms see it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Flow {
    /// `FlowHasher::hash` of the 5-tuple.
    pub hash: u64,
    /// `FlowHasher::hash_addr` of the client address (after the service's
    /// persistence netmask, if any): what `sh` and `mh` map.
    pub source_hash: u64,
}

impl Flow {
    pub const fn new(hash: u64, source_hash: u64) -> Flow {
        Flow { hash, source_hash }
    }
}

/// A scheduling algorithm with whatever state it keeps between picks.
///
/// `pick` runs once per new flow on the packet path: it must not allocate
/// except when the backend set changed (size, or for the hashing
/// algorithms the set of eligible backends), and must not panic on any
/// input (empty slice, all drained, huge weights, a slice longer or shorter
/// than last time).
pub trait Algorithm: fmt::Debug + Send {
    fn kind(&self) -> SchedulerKind;

    /// Index into `backends` of the backend for a new flow, or `None` if no
    /// backend is eligible.
    fn pick(&mut self, backends: &[BackendState], flow: &Flow, rng: &mut SchedRng)
    -> Option<usize>;

    /// Forget positions and tables: the backend set was replaced.
    fn reset(&mut self);
}

/// The scheduler of a service, by its `ipvsadm` name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Round robin over eligible backends, weights ignored beyond 0.
    Rr,
    /// Weighted round robin, smooth (see [`Wrr`]).
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
    /// Source hash on a consistent ring.
    Sh,
    /// Maglev hash of the source.
    Mh,
    /// Least response time (health-check RTT).
    Lrt,
    /// First non-saturated.
    Fns,
    /// Power of two random choices.
    P2c,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 11] = [
        SchedulerKind::Rr,
        SchedulerKind::Wrr,
        SchedulerKind::Lc,
        SchedulerKind::Wlc,
        SchedulerKind::Sed,
        SchedulerKind::Nq,
        SchedulerKind::Sh,
        SchedulerKind::Mh,
        SchedulerKind::Lrt,
        SchedulerKind::Fns,
        SchedulerKind::P2c,
    ];

    /// The name in config files and status output.
    pub const fn name(self) -> &'static str {
        match self {
            SchedulerKind::Rr => "rr",
            SchedulerKind::Wrr => "wrr",
            SchedulerKind::Lc => "lc",
            SchedulerKind::Wlc => "wlc",
            SchedulerKind::Sed => "sed",
            SchedulerKind::Nq => "nq",
            SchedulerKind::Sh => "sh",
            SchedulerKind::Mh => "mh",
            SchedulerKind::Lrt => "lrt",
            SchedulerKind::Fns => "fns",
            SchedulerKind::P2c => "p2c",
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.name()
    }

    /// Whether the algorithm maps the flow's source (so that it gives
    /// affinity without a persistence table).
    pub const fn is_hashing(self) -> bool {
        matches!(self, SchedulerKind::Sh | SchedulerKind::Mh)
    }

    /// A fresh algorithm of this kind. `hasher` places the ring points and
    /// Maglev preferences of `sh` and `mh`: nodes of a cluster use the
    /// cluster's flow hash seed and so build identical tables.
    pub fn algorithm(self, hasher: rewrite::FlowHasher) -> Box<dyn Algorithm> {
        match self {
            SchedulerKind::Rr => Box::new(RoundRobin::new()),
            SchedulerKind::Wrr => Box::new(Wrr::new()),
            SchedulerKind::Lc => Box::new(LeastConn),
            SchedulerKind::Wlc => Box::new(WeightedLeastConn),
            SchedulerKind::Sed => Box::new(ShortestExpectedDelay),
            SchedulerKind::Nq => Box::new(NeverQueue),
            SchedulerKind::Sh => Box::new(SourceHashRing::new(hasher)),
            SchedulerKind::Mh => Box::new(Maglev::new(hasher, MAGLEV_TABLE_SIZE)),
            SchedulerKind::Lrt => Box::new(LeastResponseTime),
            SchedulerKind::Fns => Box::new(FirstNonSaturated),
            SchedulerKind::P2c => Box::new(TwoChoices),
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
#[error("unknown scheduler {0:?} (known: rr, wrr, lc, wlc, sed, nq, sh, mh, lrt, fns, p2c)")]
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

/// The eligible backend minimising `cost`, compared exactly as fractions
/// `num / den` by cross-multiplication (`a/b < c/d` iff `a*d < c*b`, all
/// in u128 so no product overflows); the lowest index wins ties. Backends
/// whose `den` is 0 are skipped.
#[inline]
pub(crate) fn min_ratio(
    backends: &[BackendState],
    mut cost: impl FnMut(&BackendState) -> (u64, u64),
) -> Option<usize> {
    let mut best: Option<(usize, u64, u64)> = None;
    for (i, b) in backends.iter().enumerate() {
        if !b.is_eligible() {
            continue;
        }
        let (num, den) = cost(b);
        if den == 0 {
            continue;
        }
        match best {
            Some((_, bn, bd))
                if u128::from(num) * u128::from(bd) >= u128::from(bn) * u128::from(den) => {}
            _ => best = Some((i, num, den)),
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
pub(crate) mod testkit {
    //! Helpers shared by the algorithms' tests.
    use super::*;

    pub fn up(weight: u32) -> BackendState {
        BackendState {
            weight,
            ..BackendState::default()
        }
    }

    pub fn down(weight: u32) -> BackendState {
        BackendState {
            weight,
            available: false,
            ..BackendState::default()
        }
    }

    /// `n` backends of weight 1 with distinct keys.
    pub fn keyed(n: usize) -> Vec<BackendState> {
        (0..n)
            .map(|i| BackendState {
                key: 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(i as u64 + 1),
                ..up(1)
            })
            .collect()
    }

    pub fn pick1(s: &mut dyn Algorithm, b: &[BackendState], hash: u64) -> Option<usize> {
        let mut rng = rng_from_seed(1);
        s.pick(b, &Flow::new(hash, hash), &mut rng)
    }

    pub fn picks(s: &mut dyn Algorithm, b: &[BackendState], n: usize) -> Vec<usize> {
        let mut rng = rng_from_seed(1);
        (0..n)
            .map(|i| {
                s.pick(b, &Flow::new(i as u64, i as u64), &mut rng)
                    .expect("eligible backend")
            })
            .collect()
    }

    pub fn counts(s: &mut dyn Algorithm, b: &[BackendState], n: usize) -> Vec<usize> {
        let mut c = vec![0; b.len()];
        for i in picks(s, b, n) {
            c[i] += 1;
        }
        c
    }

    /// Longest run of the same backend in a sequence.
    pub fn longest_run(seq: &[usize]) -> usize {
        seq.chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;

    #[test]
    fn kind_names_round_trip_through_str_and_serde() {
        let hasher = rewrite::FlowHasher::new([3; 16]);
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>(), Ok(k));
            assert_eq!(k.to_string(), k.name());
            assert_eq!(k.algorithm(hasher).kind(), k);
        }
        assert_eq!(
            "WRR".parse::<SchedulerKind>(),
            Err(UnknownScheduler("WRR".into()))
        );
        #[derive(Deserialize)]
        struct Svc {
            scheduler: SchedulerKind,
        }
        for k in SchedulerKind::ALL {
            let v: Svc = toml::from_str(&format!("scheduler = \"{k}\"")).expect("known name");
            assert_eq!(v.scheduler, k);
        }
    }

    #[test]
    fn every_algorithm_survives_empty_all_ineligible_and_changing_sets() {
        let hasher = rewrite::FlowHasher::new([3; 16]);
        let mut rng = rng_from_seed(9);
        for k in SchedulerKind::ALL {
            let mut s = k.algorithm(hasher);
            let f = Flow::new(5, 6);
            assert_eq!(s.pick(&[], &f, &mut rng), None, "{k}");
            let none = [
                down(1),
                up(0),
                BackendState {
                    standby: true,
                    ..up(1)
                },
                BackendState {
                    max_conns: 2,
                    active_conns: 1,
                    inactive_conns: 1,
                    ..up(1)
                },
            ];
            assert_eq!(s.pick(&none, &f, &mut rng), None, "{k}");
            let mut b = keyed(5);
            b[2].weight = u32::MAX;
            b[3].active_conns = u32::MAX;
            b[3].inactive_conns = u32::MAX;
            b[4].rtt_us = u32::MAX;
            for n in [5, 2, 4, 1, 5] {
                for h in 0..50u64 {
                    let got = s.pick(&b[..n], &Flow::new(h, h * 31), &mut rng);
                    let i = got.expect("an eligible backend");
                    assert!(i < n && b[i].is_eligible(), "{k}: {i} of {n}");
                }
            }
            s.reset();
            assert!(s.pick(&b, &f, &mut rng).is_some(), "{k}");
        }
    }

    #[test]
    fn eligibility_combines_health_weight_standby_and_limit() {
        assert!(up(1).is_eligible());
        assert!(!down(1).is_eligible());
        assert!(!up(0).is_eligible());
        let mut b = up(1);
        b.max_conns = 3;
        b.active_conns = 2;
        assert!(b.is_eligible());
        b.inactive_conns = 1;
        assert!(b.is_full() && !b.is_eligible());
        b.max_conns = 0;
        assert!(b.is_eligible(), "0 = no limit");
    }

    #[test]
    fn min_ratio_compares_exact_fractions_and_prefers_the_first_on_ties() {
        let b = [up(3), up(2), up(6)];
        // costs 1/3, 1/2, 2/6 = 1/3: tie between 0 and 2 -> 0
        let costs = [(1, 3), (1, 2), (2, 6)];
        let mut i = 0;
        let got = min_ratio(&b, |_| {
            i += 1;
            costs[i - 1]
        });
        assert_eq!(got, Some(0));
        let big = [up(1), up(1)];
        let got = min_ratio(&big, |b| {
            if b.weight == 1 {
                (u64::MAX, u64::MAX - 1)
            } else {
                (0, 1)
            }
        });
        assert_eq!(got, Some(0));
    }

    #[test]
    fn uniform_helpers_stay_in_range_and_are_reproducible() {
        let mut a = rng_from_seed(42);
        let mut b = rng_from_seed(42);
        for n in [1usize, 2, 3, 7, 1000] {
            for _ in 0..200 {
                let x = below(&mut a, n);
                assert!(x < n);
                assert_eq!(x, below(&mut b, n));
                let u = unit_f64(&mut a);
                assert!((0.0..1.0).contains(&u));
                assert_eq!(u, unit_f64(&mut b));
            }
        }
    }
}
