//! Bucket ownership while the membership changes: the cluster state machine.
//!
//! Pure: fed with events at literal times (`now_ms`, the caller's monotonic
//! clock), it returns actions for the driver and keeps the bucket table the
//! dataplane must use ([`Cluster::table`]). The table itself is
//! [`rewrite::maglev`]: a pure function of the configured nodes, their
//! weights and which of them are live, in which a leaving node's buckets are
//! the only ones that move, and a joining node's buckets the only ones that
//! move back.
//!
//! # Inputs
//!
//! - [`Event::Membership`]: the live peers from the heartbeat (`Membership`),
//!   each with the weight and the epoch it advertises in its heartbeats.
//! - [`Event::Master`]: whether this node is the VRRP master of the front
//!   instance (the active MAC holder).
//! - [`Event::Announce`], [`Event::Leave`]: from peers, over connection sync
//!   (authenticated there).
//! - [`Event::BulkDone`], [`Event::BulkFailed`]: the bulk pull ended.
//! - [`Event::Shutdown`] (SIGTERM), [`Event::Tick`] (at [`Cluster::next_deadline`]).
//!
//! # Protocol
//!
//! **Epochs and the master.** A *commit* is (epoch, origin, nodes): the
//! configured nodes with weight and live flag. The table of a commit is the
//! same on every node. Only the VRRP master makes commits: when the set it
//! wants (itself, and every peer it hears that advertises a non-zero epoch
//! and has not said `Leave`; dead nodes keep their last weight) differs from
//! the commit in force, it commits `epoch = highest epoch seen + 1`, and it
//! announces its commit every heartbeat interval, so that a lost datagram
//! or a node that just started learns it within one interval. Every node
//! adopts an announcement whose (epoch, origin) is above its own; after a
//! split brain heals, both sides so settle on the same commit, and the one
//! master left recommits if its wanted set differs. Each node puts the epoch
//! of its commit in its heartbeats, so that disagreement is visible.
//!
//! **Leaves are local and immediate.** A node does not wait for the master to
//! give up a dead peer: as soon as its heartbeat says a peer is dead (or
//! advertises epoch 0, or said `Leave`), it builds the table of the current
//! commit with that peer not live. Since only the leaver's buckets move, two
//! nodes that notice the death at different times never own a bucket twice;
//! the leaver's buckets are owned by none only until each survivor has
//! noticed (the heartbeat's 3 intervals, then the skew between nodes' timers,
//! under one interval). The master's next commit says the same.
//!
//! **Joins go through the master and a hand-over guard.** A node that
//! starts or restarts is *pending*: it advertises epoch 0 and owns nothing.
//! It waits until it hears a peer that advertises a non-zero epoch (at most
//! `startup_wait`), pulls that peer's connection table (bulk sync; another
//! peer if it fails), and only then advertises the epoch it has seen. The
//! master then commits a set that includes it. On adopting a commit, a node
//! gives up the buckets it loses at once, but takes buckets from a node that
//! is live in the new commit only `handover_guard` later, by which time the
//! previous owner has adopted the same announcement (one multicast datagram:
//! the skew is the delivery and processing time). So a moving bucket is
//! owned by none for at most `handover_guard` and by two never, unless an
//! announcement is lost on the way to the old owner, who then gives the
//! bucket up at the next announcement, within one interval.
//!
//! **Graceful stop.** On `Shutdown` a node sends `Leave` (after flushing its
//! sync batches), gives up all its buckets at once and advertises epoch 0;
//! peers take its buckets on receipt. Nothing is owned twice and the gap is
//! one datagram. It then lingers `leave_linger` (answering bulk pulls) and
//! reports [`Phase::Stopped`].
//!
//! **Cold start.** Nobody advertises a non-zero epoch; after `startup_wait`
//! every node is ready and advertises epoch 1, and the VRRP master commits
//! epoch 2 with all of them.
//!
//! # Phases
//!
//! | phase | on | next | actions |
//! |-------|----|------|---------|
//! | Starting | a live peer advertises epoch > 0 | Syncing | StartBulk(peer) |
//! | Starting | `startup_wait` passed, no such peer | Active | SetHeartbeatEpoch |
//! | Syncing | BulkDone | Active | SetHeartbeatEpoch |
//! | Syncing | BulkFailed, another ready peer | Syncing | StartBulk(other) |
//! | Syncing | BulkFailed, none left | Active | SetHeartbeatEpoch |
//! | Starting, Syncing, Active | Shutdown | Leaving | SendLeave, SetHeartbeatEpoch(0), Install |
//! | Leaving | `leave_linger` passed | Stopped | |

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rewrite::maglev::{self, BucketTable, Node, NodeId, TableError, TableParams};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the cluster needs from the config (see the report for the keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub self_id: NodeId,
    /// Every configured node with its weight (ours included). A peer's
    /// advertised weight replaces its configured one while it is live.
    pub nodes: Vec<(NodeId, u16)>,
    pub params: TableParams,
    /// The heartbeat interval.
    pub interval: Duration,
    /// How long a starting node listens for ready peers before it decides it
    /// is alone (default 4 intervals: the dead time plus one).
    pub startup_wait: Duration,
    /// Delay before taking buckets from a node that is still live (default
    /// a fifth of the interval).
    pub handover_guard: Duration,
    /// How long a leaving node stays after `Leave` (default 2 intervals).
    pub leave_linger: Duration,
}

impl ClusterConfig {
    /// A config with the default timers.
    pub fn new(
        self_id: NodeId,
        nodes: Vec<(NodeId, u16)>,
        params: TableParams,
        interval: Duration,
    ) -> Self {
        ClusterConfig {
            self_id,
            nodes,
            params,
            interval,
            startup_wait: interval * 4,
            handover_guard: interval / 5,
            leave_linger: interval * 2,
        }
    }
}

/// Why a [`Cluster`] could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("this node's id {0} is not among the configured nodes")]
    SelfNotConfigured(NodeId),
    #[error("{0} nodes, more than the {max} an announcement carries", max = crate::sync::MAX_ANNOUNCE_NODES)]
    TooManyNodes(usize),
    #[error(transparent)]
    Table(#[from] TableError),
}

/// A live peer as the heartbeat reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub id: NodeId,
    pub weight: u16,
    /// The epoch it advertises; 0 while it is pending (starting, syncing,
    /// leaving).
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The live peers (ourselves excluded), after every membership change
    /// and whenever an advertised epoch or weight changes.
    Membership(Vec<PeerView>),
    /// This node is (or is no longer) the VRRP master of the front instance.
    Master(bool),
    Announce {
        from: NodeId,
        epoch: u64,
        nodes: Vec<Node>,
    },
    Leave {
        from: NodeId,
    },
    BulkDone,
    BulkFailed,
    Shutdown,
    Tick,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Swap the dataplane to this table.
    Install(Arc<BucketTable>),
    /// Advertise this epoch in membership heartbeats
    /// (`heartbeat::driver::Command::SetEpoch`).
    SetHeartbeatEpoch(u64),
    /// Send `sync::Message::Announce` to every peer.
    Announce { epoch: u64, nodes: Vec<Node> },
    /// Pull the connection table of `peer` (`sync::BulkPull::start`).
    StartBulk { peer: NodeId },
    /// Flush the sync sender, then send `sync::Message::Leave`.
    SendLeave,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Listening for ready peers until `until`.
    Starting {
        until: u64,
    },
    /// Pulling the connection table from `peer`.
    Syncing {
        peer: NodeId,
    },
    Active,
    /// Stopping; gone at `until`.
    Leaving {
        until: u64,
    },
    Stopped,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Starting { .. } => "STARTING",
            Phase::Syncing { .. } => "SYNCING",
            Phase::Active => "ACTIVE",
            Phase::Leaving { .. } => "LEAVING",
            Phase::Stopped => "STOPPED",
        })
    }
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    pub commits: u64,
    pub adopted: u64,
    /// Announcements below the commit in force.
    pub announce_old: u64,
    /// Announcements whose node list is not the configured one.
    pub announce_refused: u64,
    pub installs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Commit {
    epoch: u64,
    origin: NodeId,
    nodes: Vec<Node>,
}

/// The cluster state machine. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    cfg: ClusterConfig,
    phase: Phase,
    master: bool,
    peers: BTreeMap<NodeId, PeerView>,
    /// Peers that said `Leave`, and whether they have advertised epoch 0
    /// since (then a non-zero epoch means they are back).
    left: BTreeMap<NodeId, bool>,
    commit: Option<Commit>,
    max_epoch: u64,
    advertised: u64,
    next_announce: u64,
    bulk_tried: BTreeSet<NodeId>,
    /// The input of the last table built, to build only on change.
    built_from: Option<(u64, Vec<Node>)>,
    /// The table of the current view (the dataplane's once the guard ends).
    target: Arc<BucketTable>,
    /// What the dataplane uses now.
    installed: Arc<BucketTable>,
    /// End of the hand-over guard, when `installed` becomes `target`.
    guard_until: Option<u64>,
    /// The buckets held back until `guard_until`.
    guarded: BTreeSet<u32>,
    pub stats: ClusterStats,
}

impl Cluster {
    /// A node that starts at `now_ms`: pending, owning nothing.
    pub fn new(cfg: ClusterConfig, now_ms: u64) -> Result<Cluster, ClusterError> {
        if !cfg.nodes.iter().any(|&(id, _)| id == cfg.self_id) {
            return Err(ClusterError::SelfNotConfigured(cfg.self_id));
        }
        if cfg.nodes.len() > crate::sync::MAX_ANNOUNCE_NODES {
            return Err(ClusterError::TooManyNodes(cfg.nodes.len()));
        }
        let probe: Vec<Node> = cfg
            .nodes
            .iter()
            .map(|&(id, w)| Node::new(id, w, false))
            .collect();
        BucketTable::build(&cfg.params, &probe, 0)?;
        let empty = Arc::new(BucketTable::empty(&cfg.params, 0));
        Ok(Cluster {
            phase: Phase::Starting {
                until: now_ms.saturating_add(ms(cfg.startup_wait)),
            },
            cfg,
            master: false,
            peers: BTreeMap::new(),
            left: BTreeMap::new(),
            commit: None,
            max_epoch: 0,
            advertised: 0,
            next_announce: 0,
            bulk_tried: BTreeSet::new(),
            built_from: None,
            target: empty.clone(),
            installed: empty,
            guard_until: None,
            guarded: BTreeSet::new(),
            stats: ClusterStats::default(),
        })
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The table the dataplane must use now.
    pub fn table(&self) -> &Arc<BucketTable> {
        &self.installed
    }

    /// The epoch of the commit in force (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.commit.as_ref().map_or(0, |c| c.epoch)
    }

    /// Whether this node owns the flow (the dataplane's accept check).
    pub fn owns(&self, flow_hash: u64) -> bool {
        self.installed.lookup(flow_hash) == Some(self.cfg.self_id)
    }

    /// How many buckets this node owns now (status output).
    pub fn owned(&self) -> u32 {
        self.installed
            .counts()
            .iter()
            .find(|c| c.0 == self.cfg.self_id)
            .map_or(0, |c| c.1)
    }

    /// When to send [`Event::Tick`] at the latest.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut d: Option<u64> = None;
        let mut at = |t: u64| d = Some(d.map_or(t, |x| x.min(t)));
        match self.phase {
            Phase::Starting { until } | Phase::Leaving { until } => at(until),
            _ => {}
        }
        if let Some(g) = self.guard_until {
            at(g);
        }
        if self.announces() {
            at(self.next_announce);
        }
        d
    }

    fn announces(&self) -> bool {
        self.master && self.phase == Phase::Active && self.commit.is_some()
    }

    /// Handles one event at `now_ms`.
    pub fn step(&mut self, event: Event, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Membership(peers) => {
                self.peers = peers
                    .into_iter()
                    .filter(|p| p.id != self.cfg.self_id)
                    .map(|p| (p.id, p))
                    .collect();
                self.max_epoch = self
                    .peers
                    .values()
                    .map(|p| p.epoch)
                    .fold(self.max_epoch, u64::max);
                let peers = &self.peers;
                self.left.retain(|id, seen_zero| match peers.get(id) {
                    None => false,
                    Some(p) if p.epoch == 0 => {
                        *seen_zero = true;
                        true
                    }
                    Some(_) => !*seen_zero,
                });
            }
            Event::Master(m) => {
                if m && !self.master {
                    // Announce at once on becoming master.
                    self.next_announce = now_ms;
                }
                self.master = m;
            }
            Event::Announce { from, epoch, nodes } => self.on_announce(from, epoch, nodes),
            Event::Leave { from } => {
                if from != self.cfg.self_id {
                    self.left.insert(from, false);
                }
            }
            Event::BulkDone => {
                if matches!(self.phase, Phase::Syncing { .. }) {
                    self.set_phase(Phase::Active);
                }
            }
            Event::BulkFailed => {
                if let Phase::Syncing { peer } = self.phase {
                    self.bulk_tried.insert(peer);
                    match self.bulk_source() {
                        Some(p) => {
                            self.set_phase(Phase::Syncing { peer: p });
                            out.push(Action::StartBulk { peer: p });
                        }
                        None => self.set_phase(Phase::Active),
                    }
                }
            }
            Event::Shutdown => {
                if !matches!(self.phase, Phase::Leaving { .. } | Phase::Stopped) {
                    self.set_phase(Phase::Leaving {
                        until: now_ms.saturating_add(ms(self.cfg.leave_linger)),
                    });
                    out.push(Action::SendLeave);
                }
            }
            Event::Tick => {}
        }
        self.advance(now_ms, &mut out);
        out
    }

    /// Time-driven transitions, the master's duty, the heartbeat epoch and
    /// the table: run after every event.
    fn advance(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Starting { until } => {
                if let Some(p) = self.bulk_source() {
                    self.set_phase(Phase::Syncing { peer: p });
                    out.push(Action::StartBulk { peer: p });
                } else if now_ms >= until {
                    self.set_phase(Phase::Active);
                }
            }
            Phase::Leaving { until } if now_ms >= until => self.set_phase(Phase::Stopped),
            _ => {}
        }
        if self.master && self.phase == Phase::Active {
            self.master_duty(now_ms, out);
        }
        let adv = match self.phase {
            Phase::Active => self
                .commit
                .as_ref()
                .map_or(self.max_epoch.max(1), |c| c.epoch),
            _ => 0,
        };
        if adv != self.advertised {
            self.advertised = adv;
            out.push(Action::SetHeartbeatEpoch(adv));
        }
        self.update_table(now_ms, out);
    }

    fn set_phase(&mut self, to: Phase) {
        if to != self.phase {
            tracing::info!(node = self.cfg.self_id, "phase={}=>{}", self.phase, to);
            self.phase = to;
        }
    }

    /// A ready peer to pull from: the highest advertised epoch, then the
    /// lowest id, among those not tried yet.
    fn bulk_source(&self) -> Option<NodeId> {
        self.peers
            .values()
            .filter(|p| p.epoch > 0 && !self.left.contains_key(&p.id))
            .filter(|p| !self.bulk_tried.contains(&p.id))
            .max_by_key(|p| (p.epoch, core::cmp::Reverse(p.id)))
            .map(|p| p.id)
    }

    /// A peer is usable: heard, ready, not leaving.
    fn peer_ready(&self, id: NodeId) -> bool {
        self.peers.get(&id).is_some_and(|p| p.epoch > 0) && !self.left.contains_key(&id)
    }

    fn weight_of(&self, id: NodeId) -> u16 {
        let configured = self.cfg.nodes.iter().find(|n| n.0 == id).map_or(1, |n| n.1);
        if id == self.cfg.self_id {
            return configured;
        }
        if let Some(p) = self.peers.get(&id) {
            return p.weight;
        }
        // Dead: keep the weight of the commit in force, so that a death
        // moves only the dead node's buckets.
        self.commit
            .as_ref()
            .and_then(|c| c.nodes.iter().find(|n| n.id == id))
            .map_or(configured, |n| n.weight)
    }

    /// The set the master wants committed.
    fn wanted(&self) -> Vec<Node> {
        let mut v: Vec<Node> = self
            .cfg
            .nodes
            .iter()
            .map(|&(id, _)| {
                let live = id == self.cfg.self_id || self.peer_ready(id);
                Node::new(id, self.weight_of(id), live)
            })
            .collect();
        v.sort_unstable();
        v
    }

    fn master_duty(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let wanted = self.wanted();
        let current = self
            .commit
            .as_ref()
            .filter(|c| c.origin == self.cfg.self_id && c.nodes == wanted);
        if current.is_none() {
            let epoch = self.max_epoch.max(self.epoch()).saturating_add(1);
            tracing::info!(node = self.cfg.self_id, epoch, "commit");
            self.commit = Some(Commit {
                epoch,
                origin: self.cfg.self_id,
                nodes: wanted,
            });
            self.max_epoch = epoch;
            self.stats.commits += 1;
            self.next_announce = now_ms;
        }
        if now_ms >= self.next_announce
            && let Some(c) = &self.commit
        {
            out.push(Action::Announce {
                epoch: c.epoch,
                nodes: c.nodes.clone(),
            });
            self.next_announce = now_ms.saturating_add(ms(self.cfg.interval));
        }
    }

    fn on_announce(&mut self, from: NodeId, epoch: u64, mut nodes: Vec<Node>) {
        nodes.sort_unstable();
        let configured: BTreeSet<NodeId> = self.cfg.nodes.iter().map(|n| n.0).collect();
        let announced: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        if announced.len() != configured.len()
            || !announced.iter().copied().eq(configured.iter().copied())
        {
            self.stats.announce_refused += 1;
            tracing::warn!(from, epoch, "announcement for another node set refused");
            return;
        }
        self.max_epoch = self.max_epoch.max(epoch);
        let newer = self
            .commit
            .as_ref()
            .is_none_or(|c| (epoch, from) > (c.epoch, c.origin));
        if !newer {
            self.stats.announce_old += 1;
            return;
        }
        self.commit = Some(Commit {
            epoch,
            origin: from,
            nodes,
        });
        self.stats.adopted += 1;
    }

    /// The commit's nodes as this node sees them now: a node is live if the
    /// commit says so and we still hear it ready (ourselves: if active).
    fn view(&self) -> Vec<Node> {
        let Some(c) = &self.commit else {
            return Vec::new();
        };
        c.nodes
            .iter()
            .map(|n| {
                let here = if n.id == self.cfg.self_id {
                    self.phase == Phase::Active
                } else {
                    self.peer_ready(n.id)
                };
                Node {
                    live: n.live && here,
                    ..*n
                }
            })
            .collect()
    }

    fn update_table(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let epoch = self.epoch();
        let view = self.view();
        let input = (epoch, view);
        if self.built_from.as_ref() != Some(&input) {
            let target = if input.1.is_empty() {
                BucketTable::empty(&self.cfg.params, epoch)
            } else {
                match BucketTable::build(&self.cfg.params, &input.1, epoch) {
                    Ok(t) => t,
                    // The node set was checked in `new` and in `on_announce`.
                    Err(e) => {
                        tracing::error!(error = %e, "bucket table");
                        return;
                    }
                }
            };
            self.built_from = Some(input);
            let me = self.cfg.self_id;
            // Buckets we gain from a node still live in the new view wait
            // for the guard (so do those still waiting from an earlier
            // change); everything else applies now.
            let live: BTreeSet<NodeId> = target
                .nodes()
                .iter()
                .filter(|n| n.live)
                .map(|n| n.id)
                .collect();
            let fresh: BTreeSet<u32> = maglev::diff(&self.target, &target)
                .into_iter()
                .filter(|m| m.to == Some(me))
                .filter(|m| m.from.is_some_and(|f| f != me && live.contains(&f)))
                .map(|m| m.bucket)
                .collect();
            let waiting = self
                .guarded
                .iter()
                .copied()
                .filter(|&b| target.owner_of_bucket(b) == Some(me));
            let guarded: BTreeSet<u32> = fresh.iter().copied().chain(waiting).collect();
            self.target = Arc::new(target);
            if guarded.is_empty() || self.cfg.handover_guard.is_zero() {
                self.guard_until = None;
                self.guarded.clear();
                self.install(self.target.clone(), out);
            } else {
                if !fresh.is_empty() || self.guard_until.is_none() {
                    self.guard_until = Some(now_ms.saturating_add(ms(self.cfg.handover_guard)));
                }
                self.install(
                    Arc::new(self.target.without_owner(guarded.iter().copied())),
                    out,
                );
                self.guarded = guarded;
            }
        } else if let Some(g) = self.guard_until
            && now_ms >= g
        {
            self.guard_until = None;
            self.guarded.clear();
            self.install(self.target.clone(), out);
        }
    }

    fn install(&mut self, table: Arc<BucketTable>, out: &mut Vec<Action>) {
        if *table == *self.installed {
            return;
        }
        self.installed = table.clone();
        self.stats.installs += 1;
        out.push(Action::Install(table));
    }
}

#[cfg(test)]
mod tests;
