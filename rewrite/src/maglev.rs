//! The bucket table: which cluster node owns which flows.
//!
//! A flow's bucket is `flow_hash % size` (the hash of [`crate::flow`]); each
//! bucket has at most one owner, a node id. Every node of a cluster builds
//! the table from the same input and gets the same table, so that each frame
//! on the shared cluster MAC is processed by exactly one node.
//!
//! # Input
//!
//! The *universe*: every configured node, each with a stable `u32` id, a
//! weight and whether it is live ([`Node`]), plus [`TableParams`] (a 128-bit
//! seed and a prime size). The order of the input does not matter (it is
//! sorted by id); duplicate ids are refused.
//!
//! # The rule: owner = first live node of the bucket's preference chain
//!
//! Plain Maglev (Eisenbud et al., NSDI 2016, §3.4) builds the table from the
//! live set alone. It balances well but is only *nearly* minimally
//! disruptive: when a node leaves, a few buckets of other nodes move too
//! (measured by `plain_maglev_moves_other_nodes_buckets`: 10 equal nodes,
//! size 65537, one leaves: up to 167 buckets, 0.25 % of the table, change
//! hands between survivors, besides the leaver's 6554). The issue asks for
//! more: "when a node leaves, only its buckets move; when it comes back,
//! only the buckets it gets move".
//!
//! Both hold exactly for any rule of the form *each bucket has a fixed
//! preference order over all configured nodes, and its owner is the first
//! live node in that order*: a leaver's absence changes the first live node
//! only of the buckets it owned, and a joiner's presence changes it only
//! where the joiner comes first. So the table is built from such chains, and
//! the chains are made of Maglev tables so that the result stays balanced:
//!
//! 1. Level 0: a weighted Maglev populate of all `size` buckets over every
//!    configured node with a positive weight, live or not. With every node
//!    live this *is* the Maglev table of the live set.
//! 2. The buckets level 0 gives to a dead node `d` form a smaller table of
//!    their own, populated (Maglev again, permutations keyed by the chain so
//!    far) over the configured nodes other than `d`. Its dead owners recurse
//!    in the same way, each level excluding the dead nodes of the chain that
//!    led to it.
//!
//! The chain of a bucket (level-0 owner, then its owner in the sub-table of
//! that node, and so on) depends only on the universe, never on who is
//! live; liveness only says where along the chain to stop. Hence:
//!
//! - **Pure function of (params, universe with weights, live set)**: no
//!   history, no previous table. A node that restarts, or a whole cluster
//!   that reboots, computes the same table as one that watched every change.
//!   This is chosen over "keep the previous table and refill the leaver's
//!   buckets", which meets the move rule too but makes the table depend on
//!   the order of past events: two nodes that saw a different history (a
//!   partition, a restart) would disagree with no way to tell from the member
//!   set, and a cold start would not reproduce the table.
//! - **Only the leaver's buckets move; only the joiner's buckets move**:
//!   exactly, for any weights (tests and a proptest over random universes).
//! - **Balance**: each live node's share of buckets is its share of the live
//!   weight. Level 0 is Maglev's near-exact split; a dead node's buckets are
//!   split among the others in proportion to weight, which composed over the
//!   levels gives every live node `w / sum(live w)` (Luce's choice axiom), and
//!   each level is again a Maglev populate, so the error is a few buckets per
//!   level, not a sampling error. Tests hold every node within ±5 % of its
//!   weight for several sizes, weights and failure patterns.
//! - **Weights** are part of the universe: changing a node's weight rebuilds
//!   the chains (like any Maglev table, a weight change moves buckets among
//!   all nodes). Weight 0 means "owns nothing", except when every live node
//!   has weight 0: then all weights count as 1, so that no bucket is left
//!   without an owner while any member is live.
//!
//! Cost: building is `O(size * log size)` for level 0 plus the same for each
//! sub-table, and sub-tables hold only the dead nodes' buckets (a few ms for
//! 65537 buckets). Lookup is a modulo and an array read, no allocation.
//!
//! # Epoch
//!
//! A table carries an `epoch: u64`, the version of the membership it was
//! built from; the cluster state machine (balancer `cluster`) decides it.
//! The table does not interpret it.

use crate::flow::FlowHasher;

/// A cluster node's stable identifier.
pub type NodeId = u32;

/// The default table size: prime, 100 x 655 nodes.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// The smallest table accepted.
pub const MIN_TABLE_SIZE: u32 = 7;
/// The largest table accepted (16 Mi buckets, 32 MiB of owners).
pub const MAX_TABLE_SIZE: u32 = 1 << 24;
/// The most nodes a universe may have (owners are stored as `u16` indexes).
pub const MAX_NODES: usize = 4096;

/// "No owner" in the owners array.
const NONE: u16 = u16::MAX;

/// One configured node as the table sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub id: NodeId,
    pub weight: u16,
    pub live: bool,
}

impl Node {
    pub const fn new(id: NodeId, weight: u16, live: bool) -> Self {
        Node { id, weight, live }
    }
}

/// Why a table could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TableError {
    /// Maglev permutations need a prime size.
    #[error("table size {0} is not prime")]
    SizeNotPrime(u32),
    #[error("table size {0} is below the minimum of {MIN_TABLE_SIZE}")]
    SizeTooSmall(u32),
    #[error("table size {0} is above the maximum of {MAX_TABLE_SIZE}")]
    SizeTooLarge(u32),
    #[error("{0} nodes, above the maximum of {MAX_NODES}")]
    TooManyNodes(usize),
    #[error("node id {0} given twice")]
    DuplicateNode(NodeId),
}

/// What every node must agree on besides the universe: the seed of the
/// permutations and the table size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableParams {
    seed: [u8; 16],
    size: u32,
}

impl TableParams {
    /// Checks that `size` is a prime within [`MIN_TABLE_SIZE`],
    /// [`MAX_TABLE_SIZE`]. The seed may be the flow-hash seed: the
    /// permutations hash other inputs than flows (a tag byte keeps them apart).
    pub fn new(seed: [u8; 16], size: u32) -> Result<Self, TableError> {
        if size < MIN_TABLE_SIZE {
            return Err(TableError::SizeTooSmall(size));
        }
        if size > MAX_TABLE_SIZE {
            return Err(TableError::SizeTooLarge(size));
        }
        if !is_prime(size) {
            return Err(TableError::SizeNotPrime(size));
        }
        Ok(TableParams { seed, size })
    }

    pub const fn size(&self) -> u32 {
        self.size
    }

    pub const fn seed(&self) -> [u8; 16] {
        self.seed
    }
}

/// Trial division: sizes are at most 2^24, so at most 2048 divisions.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// A built table. Cheap to share (`Arc`), immutable; lookups never allocate.
#[derive(Clone, PartialEq, Eq)]
pub struct BucketTable {
    epoch: u64,
    params: TableParams,
    /// The universe it was built from, sorted by id.
    nodes: Box<[Node]>,
    /// Per bucket: index into `nodes`, or [`NONE`].
    owners: Box<[u16]>,
}

impl core::fmt::Debug for BucketTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BucketTable")
            .field("epoch", &self.epoch)
            .field("size", &self.params.size)
            .field("nodes", &self.nodes)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

/// One bucket that changes hands between two tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Move {
    pub bucket: u32,
    pub from: Option<NodeId>,
    pub to: Option<NodeId>,
}

impl BucketTable {
    /// A table where no bucket has an owner (before the first membership).
    pub fn empty(params: &TableParams, epoch: u64) -> Self {
        BucketTable {
            epoch,
            params: *params,
            nodes: Box::new([]),
            owners: vec![NONE; params.size as usize].into_boxed_slice(),
        }
    }

    /// Builds the table of a universe (see the module docs). `nodes` in any
    /// order; ids must be distinct.
    pub fn build(params: &TableParams, nodes: &[Node], epoch: u64) -> Result<Self, TableError> {
        if nodes.len() > MAX_NODES {
            return Err(TableError::TooManyNodes(nodes.len()));
        }
        let mut sorted: Vec<Node> = nodes.to_vec();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if let [a, b] = w
                && a.id == b.id
            {
                return Err(TableError::DuplicateNode(a.id));
            }
        }
        let owners = build_owners(params, &sorted);
        Ok(BucketTable {
            epoch,
            params: *params,
            nodes: sorted.into_boxed_slice(),
            owners: owners.into_boxed_slice(),
        })
    }

    pub const fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The same owners under another epoch.
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    pub const fn params(&self) -> &TableParams {
        &self.params
    }

    pub const fn size(&self) -> u32 {
        self.params.size
    }

    /// The universe the table was built from, sorted by id.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The bucket of a flow hash.
    #[inline]
    pub fn bucket_of(&self, flow_hash: u64) -> u32 {
        // size >= MIN_TABLE_SIZE > 0, and the remainder fits u32.
        (flow_hash % u64::from(self.params.size)) as u32
    }

    /// The owner of a flow: the dataplane's accept check.
    #[inline]
    pub fn lookup(&self, flow_hash: u64) -> Option<NodeId> {
        self.owner_of_bucket(self.bucket_of(flow_hash))
    }

    /// The owner of bucket `bucket`; `None` if it has none or is out of range.
    #[inline]
    pub fn owner_of_bucket(&self, bucket: u32) -> Option<NodeId> {
        let i = *self.owners.get(bucket as usize)?;
        self.nodes.get(usize::from(i)).map(|n| n.id)
    }

    /// Buckets per node id, for every node of the universe (zero included),
    /// sorted by id.
    pub fn counts(&self) -> Vec<(NodeId, u32)> {
        let mut c = vec![0u32; self.nodes.len()];
        for &o in self.owners.iter() {
            if let Some(x) = c.get_mut(usize::from(o)) {
                *x += 1;
            }
        }
        self.nodes.iter().map(|n| n.id).zip(c).collect()
    }

    /// Buckets with no owner.
    pub fn unowned(&self) -> u32 {
        self.owners.iter().filter(|&&o| o == NONE).count() as u32
    }

    /// A copy in which `buckets` have no owner (a hand-over in progress: see
    /// the balancer's cluster module). Out-of-range buckets are ignored.
    pub fn without_owner(&self, buckets: impl IntoIterator<Item = u32>) -> Self {
        let mut t = self.clone();
        for b in buckets {
            if let Some(o) = t.owners.get_mut(b as usize) {
                *o = NONE;
            }
        }
        t
    }
}

/// What changed from `old` to `new` (Katran's "compute, then apply"): every
/// bucket whose owner differs, in bucket order. Tables of different sizes
/// are compared index by index, a bucket missing from one side having no
/// owner there.
pub fn diff(old: &BucketTable, new: &BucketTable) -> Vec<Move> {
    let n = old.size().max(new.size());
    (0..n)
        .filter_map(|bucket| {
            let from = old.owner_of_bucket(bucket);
            let to = new.owner_of_bucket(bucket);
            (from != to).then_some(Move { bucket, from, to })
        })
        .collect()
}

/// Hash tags: keep the inputs of the different hashes apart.
const TAG_OFFSET: u8 = 0x01;
const TAG_SKIP: u8 = 0x02;
const TAG_CHAIN: u8 = 0x04;

fn node_hash(h: &FlowHasher, tag: u8, chain: u64, id: NodeId) -> u64 {
    let mut b = [0u8; 13];
    b[0] = tag;
    b[1..9].copy_from_slice(&chain.to_be_bytes());
    b[9..13].copy_from_slice(&id.to_be_bytes());
    h.hash_bytes(&b)
}

/// One sub-table to populate: the buckets (table indexes) it holds, the
/// dead nodes of the chain that led to it (excluded from its candidates) and
/// the chain key that keys its permutations.
struct Job {
    buckets: Vec<u32>,
    excluded: Vec<u16>,
    chain: u64,
}

/// What [`populate`] needs about the universe.
struct Universe<'a> {
    hasher: FlowHasher,
    nodes: &'a [Node],
    /// Effective weight per node index.
    weights: Vec<u32>,
    /// Indexes of the nodes with a positive weight, in id order.
    candidates: Vec<u16>,
    max_weight: u32,
}

fn build_owners(params: &TableParams, nodes: &[Node]) -> Vec<u16> {
    let size = params.size as usize;
    let mut owners = vec![NONE; size];
    if !nodes.iter().any(|n| n.live) {
        return owners;
    }
    // Every live node has weight 0: count all weights as 1 (module docs).
    let uniform = !nodes.iter().any(|n| n.live && n.weight > 0);
    let weights: Vec<u32> = nodes
        .iter()
        .map(|n| if uniform { 1 } else { u32::from(n.weight) })
        .collect();
    let candidates: Vec<u16> = (0..nodes.len())
        .filter(|&i| weights.get(i).is_some_and(|&w| w > 0))
        .map(|i| i as u16)
        .collect();
    let u = Universe {
        hasher: FlowHasher::new(params.seed),
        nodes,
        max_weight: weights.iter().copied().max().unwrap_or(1).max(1),
        weights,
        candidates,
    };
    let mut jobs = vec![Job {
        buckets: (0..params.size).collect(),
        excluded: Vec::new(),
        chain: 0,
    }];
    let mut slots: Vec<u16> = Vec::new();
    while let Some(job) = jobs.pop() {
        populate(&u, &job, &mut slots);
        // Live owners keep their buckets; a dead owner's buckets form the
        // next level, without it.
        let mut dead: Vec<(u16, Vec<u32>)> = Vec::new();
        for (&bucket, &owner) in job.buckets.iter().zip(slots.iter()) {
            let Some(node) = nodes.get(usize::from(owner)) else {
                continue;
            };
            if node.live {
                if let Some(o) = owners.get_mut(bucket as usize) {
                    *o = owner;
                }
            } else {
                match dead.iter_mut().find(|(d, _)| *d == owner) {
                    Some((_, v)) => v.push(bucket),
                    None => dead.push((owner, vec![bucket])),
                }
            }
        }
        for (d, buckets) in dead {
            let Some(dead_node) = nodes.get(usize::from(d)) else {
                continue;
            };
            let mut excluded = job.excluded.clone();
            excluded.push(d);
            if excluded.len() >= u.candidates.len() {
                continue;
            }
            let chain = node_hash(&u.hasher, TAG_CHAIN, job.chain, dead_node.id);
            jobs.push(Job {
                buckets,
                excluded,
                chain,
            });
        }
    }
    owners
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// SplitMix64's finaliser: a cheap, fixed mix for the starting credits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weighted Maglev populate of `job.buckets.len()` slots over the
/// candidates not excluded by the job, into `slots` (node indexes).
///
/// Each candidate walks its own permutation of the slots,
/// `offset + j * skip (mod m)`, and takes the next free one when its turn
/// comes. Turns are weighted as in Katran's `MaglevHashV2`: every round each
/// candidate adds its weight to a credit and takes a slot whenever the
/// credit reaches the largest weight, so a node of weight 2 takes twice as
/// many slots as one of weight 1. Rounds visit the candidates in id order
/// starting at a point given by the chain key, and each starts with a credit
/// mixed from (chain, id), so that small sub-tables do not always favour the
/// same ids. A walker (and its two SipHashes) is made only when its turn
/// first comes: a sub-table of one bucket costs a few steps, not one per
/// configured node.
fn populate(u: &Universe<'_>, job: &Job, slots: &mut Vec<u16>) {
    let m = job.buckets.len();
    slots.clear();
    slots.resize(m, NONE);
    let n = u.candidates.len();
    if m == 0 || n == 0 {
        return;
    }
    struct Walker {
        node: u16,
        weight: u32,
        credit: u32,
        /// Offset and skip, computed at the walker's first slot.
        perm: Option<(u64, u64)>,
        next: u64,
    }
    let m64 = m as u64;
    let start = (job.chain % n as u64) as usize;
    let mut walkers: Vec<Walker> = Vec::new();
    let mut visited = 0usize;
    let mut filled = 0usize;
    let mut round = 0usize;
    loop {
        // Round 0 meets the candidates one by one (lazily); later rounds
        // go over the walkers made in round 0.
        let count = if round == 0 { n } else { walkers.len() };
        for k in 0..count {
            let wi = if round == 0 {
                let Some(&c) = u.candidates.get((start + k) % n) else {
                    continue;
                };
                visited += 1;
                if job.excluded.contains(&c) {
                    continue;
                }
                let (Some(node), Some(&weight)) =
                    (u.nodes.get(usize::from(c)), u.weights.get(usize::from(c)))
                else {
                    continue;
                };
                let credit = (mix(job.chain ^ u64::from(node.id)) % u64::from(u.max_weight)) as u32;
                walkers.push(Walker {
                    node: c,
                    weight,
                    credit,
                    perm: None,
                    next: 0,
                });
                walkers.len() - 1
            } else {
                k
            };
            let Some(w) = walkers.get_mut(wi) else {
                continue;
            };
            w.credit += w.weight;
            if w.credit < u.max_weight {
                continue;
            }
            w.credit -= u.max_weight;
            let (offset, skip) = *w.perm.get_or_insert_with(|| {
                let id = u.nodes.get(usize::from(w.node)).map_or(0, |x| x.id);
                let offset = node_hash(&u.hasher, TAG_OFFSET, job.chain, id) % m64;
                let skip = if m64 == 1 {
                    0
                } else {
                    let mut s = node_hash(&u.hasher, TAG_SKIP, job.chain, id) % (m64 - 1) + 1;
                    // A full permutation needs gcd(skip, m) = 1 (always so at
                    // level 0, whose size is prime); s = 1 ends the search.
                    while gcd(s, m64) != 1 {
                        s = s % (m64 - 1) + 1;
                    }
                    s
                };
                (offset, skip)
            });
            // The permutation visits every slot within m steps and one is
            // free (filled < m), so this ends within m iterations.
            for _ in 0..m {
                let pos = ((offset + w.next * skip) % m64) as usize;
                w.next += 1;
                if let Some(s) = slots.get_mut(pos)
                    && *s == NONE
                {
                    *s = w.node;
                    filled += 1;
                    break;
                }
            }
            if filled >= m {
                return;
            }
        }
        if round == 0 && visited == n && walkers.is_empty() {
            // Every candidate excluded: cannot happen (the caller keeps one).
            return;
        }
        round += 1;
    }
}

/// Plain Maglev over the live nodes only (no chains): for comparison in
/// tests and measurements. Not used by the cluster.
#[cfg(test)]
fn plain_maglev(params: &TableParams, nodes: &[Node]) -> BucketTable {
    let live: Vec<Node> = nodes.iter().copied().filter(|n| n.live).collect();
    BucketTable::build(params, &live, 0).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEED: [u8; 16] = *b"maglev-test-seed";

    fn params(size: u32) -> TableParams {
        TableParams::new(SEED, size).expect("prime")
    }

    fn universe(weights: &[u16]) -> Vec<Node> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Node::new(i as u32 + 1, w, true))
            .collect()
    }

    fn with_dead(nodes: &[Node], dead: &[NodeId]) -> Vec<Node> {
        nodes
            .iter()
            .map(|n| Node {
                live: n.live && !dead.contains(&n.id),
                ..*n
            })
            .collect()
    }

    fn build(size: u32, nodes: &[Node]) -> BucketTable {
        BucketTable::build(&params(size), nodes, 1).expect("build")
    }

    /// Every live node within ±5 % of its weight's share; dead ones own nothing.
    fn assert_shares(t: &BucketTable, what: &str) {
        let live_w: u64 = t
            .nodes()
            .iter()
            .filter(|n| n.live)
            .map(|n| u64::from(n.weight))
            .sum();
        assert_eq!(t.unowned(), 0, "{what}: unowned buckets");
        for (id, count) in t.counts() {
            let n = t.nodes().iter().find(|n| n.id == id).expect("node");
            if !n.live || n.weight == 0 {
                assert_eq!(count, 0, "{what}: node {id} owns {count}");
                continue;
            }
            let expect = f64::from(t.size()) * f64::from(n.weight) / live_w as f64;
            let err = (f64::from(count) - expect).abs() / expect;
            assert!(
                err <= 0.05,
                "{what}: node {id} weight {} owns {count}, expected {expect:.0} ({:.1} %)",
                n.weight,
                err * 100.0
            );
        }
    }

    #[test]
    fn params_refuse_bad_sizes() {
        assert_eq!(
            TableParams::new(SEED, 1000),
            Err(TableError::SizeNotPrime(1000))
        );
        assert_eq!(TableParams::new(SEED, 5), Err(TableError::SizeTooSmall(5)));
        assert_eq!(
            TableParams::new(SEED, MAX_TABLE_SIZE + 1),
            Err(TableError::SizeTooLarge(MAX_TABLE_SIZE + 1))
        );
        assert!(TableParams::new(SEED, 1021).is_ok());
        assert!(TableParams::new(SEED, DEFAULT_TABLE_SIZE).is_ok());
        assert!(is_prime(2) && is_prime(7) && is_prime(65537) && !is_prime(65535));
        assert!(!is_prime(0) && !is_prime(1) && !is_prime(9));
    }

    #[test]
    fn build_refuses_duplicate_ids_and_too_many_nodes() {
        let nodes = [Node::new(3, 1, true), Node::new(3, 2, false)];
        assert_eq!(
            BucketTable::build(&params(1021), &nodes, 0),
            Err(TableError::DuplicateNode(3))
        );
        let many: Vec<Node> = (0..=MAX_NODES as u32)
            .map(|i| Node::new(i, 1, true))
            .collect();
        assert_eq!(
            BucketTable::build(&params(1021), &many, 0),
            Err(TableError::TooManyNodes(MAX_NODES + 1))
        );
    }

    #[test]
    fn golden_first_32_buckets() {
        let nodes = [
            Node::new(10, 1, true),
            Node::new(20, 2, true),
            Node::new(30, 1, true),
        ];
        let t = build(1021, &nodes);
        let first: Vec<u32> = (0..32)
            .map(|b| t.owner_of_bucket(b).expect("owned"))
            .collect();
        assert_eq!(first, GOLDEN, "the table changed: every node must agree");
    }

    const GOLDEN: [u32; 32] = [
        20, 20, 20, 10, 30, 10, 30, 10, 20, 30, 30, 10, 10, 30, 30, 20, //
        10, 10, 30, 30, 20, 10, 20, 30, 20, 20, 20, 20, 20, 20, 20, 20,
    ];

    #[test]
    fn input_order_and_repetition_do_not_matter() {
        let nodes = universe(&[1, 3, 2, 1, 5]);
        let a = build(4099, &nodes);
        let mut rev = nodes.clone();
        rev.reverse();
        let b = build(4099, &rev);
        assert_eq!(a, b);
        assert_eq!(a, build(4099, &nodes));
        let other = BucketTable::build(&TableParams::new([1; 16], 4099).expect("p"), &nodes, 1)
            .expect("build");
        assert_ne!(a.owners, other.owners, "the seed keys the table");
    }

    #[test]
    fn every_node_gets_its_weight_share() {
        let weight_sets: [&[u16]; 6] = [
            &[1, 1],
            &[1, 2],
            &[1, 1, 1, 1, 1],
            &[3, 1, 2, 5],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            &[100, 100, 200, 50],
        ];
        for size in [1021, 4099, 65537] {
            for ws in weight_sets {
                let t = build(size, &universe(ws));
                assert_shares(&t, &format!("size {size} weights {ws:?}"));
            }
        }
    }

    #[test]
    fn weight_zero_owns_nothing_unless_every_live_node_has_zero() {
        let t = build(1021, &[Node::new(1, 0, true), Node::new(2, 1, true)]);
        assert_eq!(t.counts(), vec![(1, 0), (2, 1021)]);
        let t = build(
            1021,
            &[
                Node::new(1, 0, true),
                Node::new(2, 0, true),
                Node::new(3, 1, false),
            ],
        );
        assert_eq!(t.unowned(), 0);
        assert!(
            t.counts()
                .iter()
                .all(|&(id, c)| if id == 3 { c == 0 } else { c > 400 })
        );
    }

    #[test]
    fn no_live_node_means_no_owner_and_any_live_node_owns_all() {
        let nodes = with_dead(&universe(&[1, 1, 1]), &[1, 2, 3]);
        let t = build(1021, &nodes);
        assert_eq!(t.unowned(), 1021);
        assert_eq!(t.lookup(12345), None);
        let t = build(1021, &with_dead(&universe(&[1, 1, 1]), &[1, 3]));
        assert_eq!(t.counts(), vec![(1, 0), (2, 1021), (3, 0)]);
        let e = BucketTable::empty(&params(1021), 0);
        assert_eq!(e.unowned(), 1021);
    }

    #[test]
    fn lookup_is_the_owner_of_hash_mod_size() {
        let t = build(1021, &universe(&[1, 2]));
        for h in [0u64, 1, 1020, 1021, u64::MAX, 0xdead_beef] {
            assert_eq!(t.lookup(h), t.owner_of_bucket((h % 1021) as u32));
        }
        assert_eq!(t.owner_of_bucket(1021), None);
    }

    #[test]
    fn a_leaving_node_moves_only_its_buckets_and_shares_stay_fair() {
        for (size, ws) in [
            (1021u32, &[1u16, 1, 1][..]),
            (4099, &[1, 2, 3, 1]),
            (65537, &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
        ] {
            let all = universe(ws);
            let before = build(size, &all);
            for leaver in all.iter().map(|n| n.id) {
                let after = build(size, &with_dead(&all, &[leaver]));
                let moves = diff(&before, &after);
                assert!(moves.iter().all(|m| m.from == Some(leaver)), "size {size}");
                let owned = before.counts().iter().find(|c| c.0 == leaver).map(|c| c.1);
                assert_eq!(Some(moves.len() as u32), owned, "all of its buckets move");
                assert_shares(&after, &format!("size {size} {ws:?} without {leaver}"));
                // Coming back moves exactly the same buckets back.
                let back = diff(&after, &before);
                assert!(back.iter().all(|m| m.to == Some(leaver)));
                assert_eq!(back.len(), moves.len());
            }
        }
    }

    #[test]
    fn several_dead_nodes_keep_shares_fair() {
        let all = universe(&[1, 2, 1, 3, 1, 2, 1, 1]);
        for dead in [
            &[1u32, 2][..],
            &[2, 4, 6],
            &[1, 3, 5, 7],
            &[1, 2, 3, 4, 5, 6],
        ] {
            let t = build(65537, &with_dead(&all, dead));
            assert_shares(&t, &format!("dead {dead:?}"));
        }
    }

    #[test]
    fn large_universe_with_most_nodes_dead_stays_fair() {
        // 200 configured nodes, 150 of them dead: chains up to 151 deep.
        let mut all = universe(&[1; 200]);
        for n in all.iter_mut().skip(50) {
            n.live = false;
        }
        let t = build(65537, &all);
        assert_shares(&t, "200 nodes, 150 dead");
    }

    #[test]
    fn plain_maglev_moves_other_nodes_buckets() {
        // The measurement quoted in the module docs: plain Maglev over the
        // live set moves some buckets between survivors when a node leaves.
        let all = universe(&[1; 10]);
        let p = params(65537);
        let before = plain_maglev(&p, &all);
        let mut worst = 0usize;
        for leaver in 1..=10u32 {
            let after = plain_maglev(&p, &with_dead(&all, &[leaver]));
            let others = diff(&before, &after)
                .iter()
                .filter(|m| m.from != Some(leaver))
                .count();
            worst = worst.max(others);
        }
        let frac = worst as f64 / 65537.0;
        eprintln!(
            "plain maglev: up to {worst} other buckets move ({:.2} %)",
            frac * 100.0
        );
        assert!(worst > 0, "plain Maglev is not strictly minimal");
        assert!(frac < 0.02);
    }

    #[test]
    fn without_owner_clears_only_the_given_buckets() {
        let t = build(1021, &universe(&[1, 1]));
        let c = t.without_owner([0, 5, 5000]);
        assert_eq!(c.owner_of_bucket(0), None);
        assert_eq!(c.owner_of_bucket(5), None);
        assert_eq!(diff(&t, &c).len(), 2);
        assert_eq!(t.clone().with_epoch(9).epoch(), 9);
    }

    #[test]
    fn diff_lists_changes_in_bucket_order() {
        let a = build(1021, &universe(&[1, 1]));
        let b = build(1021, &with_dead(&universe(&[1, 1]), &[2]));
        let d = diff(&a, &b);
        assert!(d.windows(2).all(|w| w[0].bucket < w[1].bucket));
        assert!(d.iter().all(|m| m.from == Some(2) && m.to == Some(1)));
        assert!(diff(&a, &a).is_empty());
        let small = build(1031, &universe(&[1, 1]));
        assert!(!diff(&a, &small).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// For random universes and live sets: a leave moves only the
        /// leaver's buckets, a join only the joiner's, nothing is unowned.
        #[test]
        fn leave_and_join_move_only_that_nodes_buckets(
            weights in prop::collection::vec(0u16..5, 1..9),
            live_bits in any::<u16>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let nodes: Vec<Node> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Node::new(i as u32 * 7 + 3, w, live_bits & (1 << i) != 0))
                .collect();
            let k = flip.index(nodes.len());
            let mut other = nodes.clone();
            other[k].live = !other[k].live;
            let id = nodes[k].id;
            let a = build(1021, &nodes);
            let b = build(1021, &other);
            for m in diff(&a, &b) {
                if nodes[k].live {
                    prop_assert_eq!(m.from, Some(id));
                } else {
                    prop_assert_eq!(m.to, Some(id));
                }
            }
            for t in [&a, &b] {
                let any_live = t.nodes().iter().any(|n| n.live);
                prop_assert_eq!(t.unowned() == 0, any_live);
            }
        }
    }
}
