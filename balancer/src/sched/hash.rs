//! The source-hashing algorithms: a consistent hash ring (`sh`) and a
//! Maglev lookup table (`mh`). Both map the flow's `source_hash` (the
//! client address hashed with the project's one `FlowHasher`), so a client
//! keeps its backend without a persistence table, and both place backends
//! by their stable `key`, so every node with the same seed and backends
//! builds the same structure.
//!
//! Both rebuild lazily, on the first pick after what they depend on
//! changed (the backend keys for the ring; the eligible set and weights
//! for Maglev); the vectors keep their capacity, so rebuilding allocates
//! only when the set grows beyond its largest size so far.

use rewrite::FlowHasher;

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind};

/// Points per backend on the `sh` ring.
pub const RING_POINTS: u16 = 100;

/// Size of the `mh` lookup table: a prime (the Maglev permutation needs it),
/// IPVS's default (`CONFIG_IP_VS_MH_TAB_INDEX` 12). It must stay much
/// larger than the backend count (Maglev's paper: M > 100 N) for the
/// shares to follow the weights.
pub const MAGLEV_TABLE_SIZE: usize = 4093;

/// A cheap fingerprint of a sequence of (key, value) pairs, to notice that
/// a table must be rebuilt without keeping a copy of the input.
fn fingerprint(items: impl Iterator<Item = (u64, u64)>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (a, b) in items {
        for v in [a, b] {
            h ^= v;
            h = h.wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
    }
    h
}

/// Source hashing on a consistent ring (the L7 seed's "IP hash"): every
/// backend owns [`RING_POINTS`] points at `hash(key, i)`; a flow goes to
/// the owner of the first point at or after its source hash, wrapping
/// around, skipping points of backends that are not eligible. When a
/// backend goes down only its clients move (to the owners of the next
/// points, spread over the others), and they come back when it returns.
/// Weights count only as 0 (drained): every backend has the same number of
/// points.
#[derive(Clone, Debug)]
pub struct SourceHashRing {
    hasher: FlowHasher,
    /// (point, backend index), sorted.
    ring: Vec<(u64, u32)>,
    /// Fingerprint of the backend keys the ring was built from.
    built_for: Option<u64>,
}

impl SourceHashRing {
    pub fn new(hasher: FlowHasher) -> Self {
        SourceHashRing {
            hasher,
            ring: Vec::new(),
            built_for: None,
        }
    }

    fn rebuild(&mut self, backends: &[BackendState]) {
        self.ring.clear();
        for (i, b) in backends.iter().enumerate() {
            let mut bytes = [0u8; 10];
            bytes[..8].copy_from_slice(&b.key.to_le_bytes());
            for p in 0..RING_POINTS {
                bytes[8..].copy_from_slice(&p.to_le_bytes());
                self.ring.push((self.hasher.hash_bytes(&bytes), i as u32));
            }
        }
        self.ring.sort_unstable();
    }
}

impl Algorithm for SourceHashRing {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Sh
    }

    fn pick(&mut self, backends: &[BackendState], flow: &Flow, _: &mut SchedRng) -> Option<usize> {
        let fp = fingerprint(backends.iter().map(|b| (b.key, 0)));
        if self.built_for != Some(fp) {
            self.rebuild(backends);
            self.built_for = Some(fp);
        }
        let n = self.ring.len();
        if n == 0 {
            return None;
        }
        let start = self.ring.partition_point(|&(p, _)| p < flow.source_hash);
        (0..n)
            .map(|k| self.ring[(start + k) % n].1 as usize)
            .find(|&i| backends.get(i).is_some_and(BackendState::is_eligible))
    }

    fn reset(&mut self) {
        self.ring.clear();
        self.built_for = None;
    }
}

/// Maglev hashing (Eisenbud et al., NSDI 2016, §3.4) of the source, with
/// IPVS's weighting (`ip_vs_mh.c`): each eligible backend has a permutation
/// of the table slots, `(offset + j * skip) mod M`, from two hashes of its
/// key; backends take turns claiming their next free preferred slot, a
/// backend of weight w taking w / gcd(weights) turns per round, until the
/// table is full. A flow goes to `table[source_hash mod M]`: O(1) per pick.
///
/// The table covers eligible backends only and is rebuilt when that set or
/// a weight changes; Maglev's construction keeps most slots with their
/// owner across such a rebuild, so few clients of the other backends move
/// (not strictly none, unlike the ring).
#[derive(Clone, Debug)]
pub struct Maglev {
    hasher: FlowHasher,
    size: usize,
    table: Vec<u32>,
    /// Per eligible backend while building: (index, offset, skip, next j, turns).
    build: Vec<(u32, u64, u64, u64, u64)>,
    built_for: Option<u64>,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Maglev {
    /// A table of `size` slots; `size` should be a prime (see
    /// [`MAGLEV_TABLE_SIZE`]); it is raised to 2 if smaller.
    pub fn new(hasher: FlowHasher, size: usize) -> Self {
        Maglev {
            hasher,
            size: size.max(2),
            table: Vec::new(),
            build: Vec::new(),
            built_for: None,
        }
    }

    /// The table: backend index per slot (`u32::MAX` = none eligible).
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    fn rebuild(&mut self, backends: &[BackendState]) {
        let m = self.size as u64;
        self.table.clear();
        self.table.resize(self.size, u32::MAX);
        self.build.clear();
        let g = backends
            .iter()
            .filter(|b| b.is_eligible())
            .fold(0, |g, b| gcd(g, u64::from(b.weight)));
        for (i, b) in backends.iter().enumerate() {
            if !b.is_eligible() {
                continue;
            }
            let key = b.key.to_le_bytes();
            let mut tagged = [0u8; 9];
            tagged[..8].copy_from_slice(&key);
            tagged[8] = b'o';
            let offset = self.hasher.hash_bytes(&tagged) % m;
            tagged[8] = b's';
            let skip = self.hasher.hash_bytes(&tagged) % (m - 1) + 1;
            let turns = u64::from(b.weight) / g.max(1);
            self.build.push((i as u32, offset, skip, 0, turns));
        }
        if self.build.is_empty() {
            return;
        }
        let mut filled = 0usize;
        'fill: loop {
            for e in self.build.iter_mut() {
                let (index, offset, skip, next, turns) = e;
                for _ in 0..*turns {
                    // Each backend's permutation visits every slot once in
                    // M steps (M prime, 0 < skip < M), so this terminates.
                    loop {
                        let slot = ((*offset + *next * *skip) % m) as usize;
                        *next += 1;
                        if self.table[slot] == u32::MAX {
                            self.table[slot] = *index;
                            break;
                        }
                    }
                    filled += 1;
                    if filled == self.size {
                        break 'fill;
                    }
                }
            }
        }
    }
}

impl Algorithm for Maglev {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Mh
    }

    fn pick(&mut self, backends: &[BackendState], flow: &Flow, _: &mut SchedRng) -> Option<usize> {
        let fp = fingerprint(backends.iter().map(|b| {
            (
                b.key,
                if b.is_eligible() {
                    u64::from(b.weight)
                } else {
                    0
                },
            )
        }));
        if self.built_for != Some(fp) {
            self.rebuild(backends);
            self.built_for = Some(fp);
        }
        let slot = (flow.source_hash % self.size as u64) as usize;
        let i = *self.table.get(slot)? as usize;
        backends.get(i).filter(|b| b.is_eligible()).map(|_| i)
    }

    fn reset(&mut self) {
        self.table.clear();
        self.built_for = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Flow, rng_from_seed};
    use super::*;

    const SOURCES: u64 = 20_000;

    fn hasher() -> FlowHasher {
        FlowHasher::new(*b"test-flow-hasher")
    }

    /// The backend of each of `SOURCES` client addresses.
    fn assign(s: &mut dyn Algorithm, b: &[BackendState]) -> Vec<usize> {
        let h = hasher();
        let mut rng = rng_from_seed(0);
        (0..SOURCES)
            .map(|i| {
                let src = h.hash_addr(std::net::Ipv4Addr::from(0xc612_0000 + i as u32));
                s.pick(b, &Flow::new(0, src), &mut rng).expect("eligible")
            })
            .collect()
    }

    fn shares(a: &[usize], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n];
        for &i in a {
            c[i] += 1.0 / a.len() as f64;
        }
        c
    }

    /// With 100 points per backend a backend's share has a relative
    /// standard deviation near 1/sqrt(100) = 10%: every share of 10
    /// backends within 40% of 1/10.
    #[test]
    fn sh_spreads_sources_over_the_ring() {
        let b = keyed(10);
        let a = assign(&mut SourceHashRing::new(hasher()), &b);
        for (i, s) in shares(&a, 10).iter().enumerate() {
            assert!((s - 0.1).abs() < 0.04, "backend {i}: {s}");
        }
    }

    /// A backend going down moves its own clients and only them: the
    /// moved fraction is its share, about 1/N; they return when it comes
    /// back.
    #[test]
    fn sh_moves_only_the_clients_of_a_backend_that_leaves() {
        let mut s = SourceHashRing::new(hasher());
        let mut b = keyed(10);
        let before = assign(&mut s, &b);
        b[3].available = false;
        let after = assign(&mut s, &b);
        let moved: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert!(moved.iter().all(|&i| before[i] == 3));
        assert_eq!(moved.len(), before.iter().filter(|&&x| x == 3).count());
        let f = moved.len() as f64 / SOURCES as f64;
        assert!((f - 0.1).abs() < 0.04, "moved {f}");
        // its clients spread over several others, not onto one neighbour
        let mut to: Vec<usize> = moved.iter().map(|&i| after[i]).collect();
        to.sort_unstable();
        to.dedup();
        assert!(to.len() >= 5, "moved onto {to:?}");
        b[3].available = true;
        assert_eq!(assign(&mut s, &b), before);
    }

    /// Removing a backend from the config (the slice shrinks, indices
    /// shift) moves only its clients as well: the ring follows keys.
    #[test]
    fn sh_follows_backend_keys_not_positions() {
        let mut s = SourceHashRing::new(hasher());
        let b = keyed(6);
        let before = assign(&mut s, &b);
        let mut fewer = b.clone();
        fewer.remove(2);
        let after = assign(&mut s, &fewer);
        for (x, y) in before.iter().zip(&after) {
            if *x != 2 {
                let old_key = b[*x].key;
                assert_eq!(fewer[*y].key, old_key);
            }
        }
    }

    #[test]
    fn sh_and_mh_are_the_same_on_every_node_with_the_same_seed() {
        let b = keyed(7);
        for make in [
            |h| Box::new(SourceHashRing::new(h)) as Box<dyn Algorithm>,
            |h| Box::new(Maglev::new(h, MAGLEV_TABLE_SIZE)) as Box<dyn Algorithm>,
        ] {
            let a1 = assign(make(hasher()).as_mut(), &b);
            let a2 = assign(make(hasher()).as_mut(), &b);
            assert_eq!(a1, a2);
            let other = assign(make(FlowHasher::new([1; 16])).as_mut(), &b);
            assert_ne!(a1, other, "the seed places the backends");
        }
    }

    #[test]
    fn mh_table_shares_follow_weights() {
        let mut b = keyed(3);
        for (x, w) in b.iter_mut().zip([1, 2, 3]) {
            x.weight = w;
        }
        let mut s = Maglev::new(hasher(), MAGLEV_TABLE_SIZE);
        s.pick(&b, &Flow::default(), &mut rng_from_seed(0));
        let t = s.table();
        assert!(t.iter().all(|&i| i < 3), "table fully populated");
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let f = t.iter().filter(|&&x| x as usize == i).count() as f64 / t.len() as f64;
            assert!((f - w / 6.0).abs() < 0.01, "backend {i}: {f}");
        }
        // equal weights: within 1% of 1/N
        let b = keyed(10);
        s.pick(&b, &Flow::default(), &mut rng_from_seed(0));
        for i in 0..10u32 {
            let f = s.table().iter().filter(|&&x| x == i).count() as f64 / 4093.0;
            assert!((f - 0.1).abs() < 0.01, "backend {i}: {f}");
        }
    }

    /// Maglev's disruption: the leaving backend's clients move (about 1/N
    /// of all), and only a small fraction (< 2% here) of the others'.
    #[test]
    fn mh_moves_few_other_clients_when_a_backend_leaves() {
        let mut s = Maglev::new(hasher(), MAGLEV_TABLE_SIZE);
        let mut b = keyed(10);
        let before = assign(&mut s, &b);
        b[6].available = false;
        let after = assign(&mut s, &b);
        let own = before.iter().filter(|&&x| x == 6).count();
        assert!(before.iter().zip(&after).all(|(x, y)| *x != 6 || *y != 6));
        let others_moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| **x != 6 && x != y)
            .count();
        let f_own = own as f64 / SOURCES as f64;
        let f_other = others_moved as f64 / (SOURCES as usize - own) as f64;
        assert!((f_own - 0.1).abs() < 0.02, "own {f_own}");
        assert!(f_other < 0.02, "others moved {f_other}");
        b[6].available = true;
        assert_eq!(assign(&mut s, &b), before, "the same table again");
    }

    #[test]
    fn mh_tiny_table_and_huge_weights_terminate() {
        let mut b = keyed(3);
        b[0].weight = u32::MAX;
        b[1].weight = 1;
        let mut s = Maglev::new(hasher(), 7);
        let got = s.pick(&b, &Flow::new(0, 5), &mut rng_from_seed(0));
        assert!(got.is_some());
        assert!(s.table().iter().all(|&i| i < 3));
    }
}
