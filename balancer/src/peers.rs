//! Cluster mode of `balancer run`: the embedded heartbeat (one process per
//! node) and what it means for the dataplane.
//!
//! The heartbeat library runs its protocol on its own thread (adverts on
//! time whatever the rest of the node does). This module follows its state
//! stream on the control-plane runtime and publishes a [`ClusterView`] to
//! the dataplane: whether this node is the active MAC holder (master of the
//! front instance) and the bucket table built from the live members and
//! their weights.
//!
//! Address management is split: the VIPs are local addresses on every node
//! (each serves its own share of locally served flows), so the node's setup
//! plan owns them and the heartbeat's alias changes for them are ignored;
//! the back gateway addresses move with the heartbeat's instances.

use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use heartbeat::driver::exec::Exec;
use heartbeat::driver::{Handle, NodeStatus};
use heartbeat::vrrp::state::State;
use rewrite::maglev::{BucketTable, Node, TableParams};
use tokio::sync::{mpsc, watch};

use crate::config::{Cluster, Config};
use crate::dataplane::syncio::SyncCommand;
use crate::dataplane::view::{ClusterView, SharedView};

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("{0}")]
    HeartbeatConfig(String),
    #[error("heartbeat: {0}")]
    Start(String),
    #[error("cluster: heartbeat {file} has no instance named `{name}` (cluster.front_instance)")]
    NoFrontInstance { file: String, name: String },
    #[error("cluster: bucket table: {0}")]
    Table(#[from] rewrite::maglev::TableError),
}

/// The running heartbeat of a cluster node.
pub struct Peers {
    pub handle: Handle,
    pub shared: SharedView,
    /// Wakes the dataplane on every published view.
    pub wake: Arc<crate::dataplane::view::Wake>,
    /// The view version the dataplane works with (it writes, we read).
    pub applied: crate::dataplane::view::AppliedVersion,
    stats: Arc<crate::stats::Stats>,
    me: u32,
    params: TableParams,
    cluster: Cluster,
    exec_rx: Option<mpsc::UnboundedReceiver<Exec>>,
    /// The heartbeat's config, for its tracked scripts (run by [`Peers::run`]).
    heartbeat: heartbeat::config::Config,
    vips: Vec<Ipv4Addr>,
    universe: Vec<u32>,
    drain: watch::Receiver<bool>,
    drain_tx: watch::Sender<bool>,
    /// The dataplane says when this node holds the cluster's connections
    /// (bulk pull done, or nobody to pull from).
    ready: watch::Receiver<bool>,
    sync_cmd: std::sync::mpsc::Sender<SyncCommand>,
    dataplane_ends: Option<(std::sync::mpsc::Receiver<SyncCommand>, watch::Sender<bool>)>,
    /// Membership interval: how long to listen for peers before deciding
    /// whom to pull the table from.
    interval: std::time::Duration,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// Builds the view for a heartbeat status. Pure: the same status gives the
/// same view on every node (the table depends on the member set only).
///
/// A member whose last heartbeat carries weight 0 is leaving (SIGTERM): it
/// owns no bucket any more, though it is still live (it still holds its
/// back gateway and reverse-NATs the replies of its flows until it stops).
/// `me_owns` says this node itself may own buckets (ready, not leaving).
pub fn view_of(
    status: &NodeStatus,
    cluster: &Cluster,
    params: &TableParams,
    universe: &[u32],
    me_owns: bool,
    leaving: bool,
    version: u64,
) -> Result<ClusterView, rewrite::maglev::TableError> {
    let me = status.node_id;
    let mac_holder = status
        .instance(&cluster.front_instance)
        .is_some_and(|i| i.state == State::Master);
    let live = status.live.clone();
    let nodes: Vec<Node> = owners(status, universe, me_owns)
        .into_iter()
        .map(|(id, weight, owns)| Node::new(id, weight, owns))
        .collect();
    let table = BucketTable::build(params, &nodes, version)?;
    let peer_addrs = status
        .members
        .iter()
        .filter(|m| m.alive)
        .filter_map(|m| m.addr.map(|a| (m.node_id, a)))
        .collect();
    let held = status
        .instances
        .iter()
        .filter(|i| i.state == State::Master)
        .flat_map(|i| i.addresses.iter().copied())
        .collect();
    Ok(ClusterView {
        me,
        mac_holder,
        gateways: cluster.gateways.clone(),
        held,
        answer_mac: cluster.cluster_mac,
        director: cluster.mode == crate::config::ClusterMode::Director,
        leaving,
        peer_addrs,
        table,
        live,
        version,
    })
}

/// Per configured node: id, weight, and whether it may own buckets now.
///
/// A peer owns buckets while it is live, its weight is not 0 (leaving) and
/// its epoch is not 0 (still pulling the connection table after a start).
/// `me_owns` says the same of this node.
fn owners(status: &NodeStatus, universe: &[u32], me_owns: bool) -> Vec<(u32, u16, bool)> {
    universe
        .iter()
        .map(|&id| {
            let last = status
                .members
                .iter()
                .find(|m| m.node_id == id)
                .and_then(|m| m.last.as_ref());
            let weight = last.map_or(1, |h| h.weight.max(1));
            let owns = if id == status.node_id {
                me_owns
            } else {
                status.live.contains(&id) && last.is_some_and(|h| h.weight != 0 && h.epoch != 0)
            };
            (id, weight, owns)
        })
        .collect()
}

impl Peers {
    /// Starts the embedded heartbeat (its sockets and protocol thread).
    pub fn start(
        config: &Config,
        cluster: &Cluster,
        stats: Arc<crate::stats::Stats>,
    ) -> Result<Peers, PeersError> {
        let hb = heartbeat::config::Config::load(&cluster.heartbeat)
            .map_err(|e| PeersError::HeartbeatConfig(e.to_string()))?;
        if !hb
            .instances
            .iter()
            .any(|i| i.name == cluster.front_instance)
        {
            return Err(PeersError::NoFrontInstance {
                file: cluster.heartbeat.display().to_string(),
                name: cluster.front_instance.clone(),
            });
        }
        let mut universe: Vec<u32> = hb
            .membership
            .as_ref()
            .map(|m| m.nodes.clone())
            .unwrap_or_default();
        if !universe.contains(&hb.node_id) {
            universe.push(hb.node_id);
        }
        universe.sort_unstable();
        let params = TableParams::new(config.node.flow_hash_seed, cluster.buckets)?;
        let (handle, exec_rx) =
            heartbeat::driver::start(&hb).map_err(|e| PeersError::Start(e.to_string()))?;
        let status = handle.status.borrow().clone();
        let first = view_of(&status, cluster, &params, &universe, false, false, 1)?;
        let (drain_tx, drain) = watch::channel(false);
        let (ready_tx, ready) = watch::channel(false);
        let (sync_cmd, cmd_rx) = std::sync::mpsc::channel();
        let interval = hb
            .membership
            .as_ref()
            .map_or(std::time::Duration::from_secs(1), |m| m.interval);
        Ok(Peers {
            handle,
            stats,
            shared: Arc::new(ArcSwap::from_pointee(first)),
            applied: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            wake: Arc::new(
                crate::dataplane::view::Wake::new()
                    .map_err(|e| PeersError::Start(format!("eventfd: {e}")))?,
            ),
            me: hb.node_id,
            params,
            cluster: cluster.clone(),
            exec_rx: Some(exec_rx),
            heartbeat: hb,
            vips: config.vips(),
            universe,
            drain,
            drain_tx,
            ready,
            sync_cmd,
            dataplane_ends: Some((cmd_rx, ready_tx)),
            interval,
        })
    }

    /// The configured node ids.
    pub fn universe(&self) -> &[u32] {
        &self.universe
    }

    pub fn me(&self) -> u32 {
        self.me
    }

    /// The dataplane's ends of the sync control channels (once).
    pub fn take_dataplane_ends(
        &mut self,
    ) -> Option<(std::sync::mpsc::Receiver<SyncCommand>, watch::Sender<bool>)> {
        self.dataplane_ends.take()
    }

    /// Leaves the cluster's ownership gracefully: stops owning, then
    /// announces weight 0 to the peers (they take this node's buckets).
    pub fn drainer(&self) -> Drainer {
        Drainer {
            commander: self.handle.commander.clone(),
            tx: self.drain_tx.clone(),
            shared: self.shared.clone(),
            applied: self.applied.clone(),
        }
    }

    /// Runs on the control-plane runtime until the heartbeat stops: performs
    /// the heartbeat's actions (minus the VIP aliases, which the node's setup
    /// owns) and republishes the view on every change.
    pub async fn run(mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(mut exec_rx) = self.exec_rx.take() {
            let vips = self.vips.clone();
            tokio::spawn(async move {
                while let Some(e) = exec_rx.recv().await {
                    let e = match e {
                        Exec::AddAliases { ifindex, aliases } => {
                            let aliases: Vec<_> = aliases
                                .into_iter()
                                .filter(|a| !vips.contains(&a.addr))
                                .collect();
                            if aliases.is_empty() {
                                continue;
                            }
                            Exec::AddAliases { ifindex, aliases }
                        }
                        Exec::RemoveAliases { ifindex, aliases } => {
                            let aliases: Vec<_> = aliases
                                .into_iter()
                                .filter(|a| !vips.contains(&a.addr))
                                .collect();
                            if aliases.is_empty() {
                                continue;
                            }
                            Exec::RemoveAliases { ifindex, aliases }
                        }
                        other => other,
                    };
                    if tx.send(e).is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(heartbeat::driver::exec::run(rx));
        }
        // Tracked scripts, as `heartbeat run` runs them: e.g. a check of the
        // front path that faults the gateway instances of a node whose front
        // link is cut silently, so that a peer takes its gateway (the
        // replies of the connections the peer took over then reach it).
        if !self.heartbeat.scripts.is_empty() {
            let cfg = self.heartbeat.clone();
            let cmd = self.handle.commander.clone();
            tokio::spawn(async move { heartbeat::driver::run_scripts(&cfg, cmd).await });
        }
        let mut status: watch::Receiver<Arc<NodeStatus>> = self.handle.status.clone();
        // Joining: listen for peers a few intervals, then pull the table
        // from one that owns buckets (or be ready at once if none does).
        {
            let status = status.clone();
            let cmd = self.sync_cmd.clone();
            let me = self.me;
            let wait = self.interval * 4;
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let st = status.borrow().clone();
                let peer = st
                    .members
                    .iter()
                    .filter(|m| m.node_id != me && st.live.contains(&m.node_id))
                    .filter(|m| {
                        m.last
                            .as_ref()
                            .is_some_and(|h| h.epoch != 0 && h.weight != 0)
                    })
                    .map(|m| m.node_id)
                    .min();
                let _ = cmd.send(match peer {
                    Some(p) => SyncCommand::Pull(p),
                    None => SyncCommand::Ready,
                });
            });
        }
        let commander = self.handle.commander.clone();
        let mut version = 1u64;
        let mut last = None;
        let mut announced = false;
        loop {
            let st = status.borrow_and_update().clone();
            let ready = *self.ready.borrow_and_update();
            if ready && !announced {
                // Epoch 1: "I hold the connections, count me as an owner".
                commander.send(heartbeat::driver::Command::SetEpoch(1));
                announced = true;
            }
            let leaving = *self.drain.borrow_and_update();
            let me_owns = ready && !leaving;
            let holder = st
                .instance(&self.cluster.front_instance)
                .is_some_and(|i| i.state == State::Master);
            let addrs: Vec<_> = st.members.iter().map(|m| (m.node_id, m.addr)).collect();
            let held: Vec<_> = st
                .instances
                .iter()
                .map(|i| i.state == State::Master)
                .collect();
            let now = (
                owners(&st, &self.universe, me_owns),
                st.live.clone(),
                holder,
                addrs,
                held,
            );
            if last.as_ref() != Some(&now) {
                version += 1;
                match view_of(
                    &st,
                    &self.cluster,
                    &self.params,
                    &self.universe,
                    me_owns,
                    leaving,
                    version,
                ) {
                    Ok(v) => {
                        self.stats
                            .cluster
                            .store(Some(Arc::new(crate::stats::ClusterStatus {
                                node_id: v.me,
                                mac_holder: v.mac_holder,
                                live: v.live.clone(),
                                buckets: v.table.counts(),
                                unowned: v.table.unowned(),
                                version: v.version,
                            })));
                        tracing::info!(live = ?v.live, owners = ?now.0, mac_holder = holder, "cluster view changed");
                        self.shared.store(Arc::new(v));
                        self.wake.notify();
                        last = Some(now);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot build the bucket table"),
                }
            }
            if st.stopped {
                break;
            }
            tokio::select! {
                r = status.changed() => if r.is_err() { break },
                r = self.drain.changed() => if r.is_err() { break },
                r = self.ready.changed() => if r.is_err() { break },
            }
        }
    }
}

/// Starts a graceful leave (see [`Peers::drainer`]).
#[derive(Debug, Clone)]
pub struct Drainer {
    commander: heartbeat::driver::Commander,
    tx: watch::Sender<bool>,
    shared: SharedView,
    applied: crate::dataplane::view::AppliedVersion,
}

impl Drainer {
    /// Stops owning buckets, waits until the dataplane works with that view
    /// and has sent the peers every connection it scheduled before (at
    /// most `bound`; meanwhile it passes its former buckets' frames to
    /// their new owner, so waiting loses nothing), then announces weight 0:
    /// the peers take the buckets when the announcement arrives.
    ///
    /// The order is what keeps every flow with one scheduler. Were the
    /// announcement first, a peer would own the buckets from its arrival (a
    /// LAN round trip) while this node still did: a SYN in between would
    /// be scheduled by both, to real servers of different sub-clusters,
    /// and the client's ACK of one server's SYN-ACK could reach the other,
    /// which answers with a reset the client accepts (RFC 9293 §3.10.7.3:
    /// an unacceptable ACK in SYN-RECEIVED gets `<SEQ=SEG.ACK><CTL=RST>`).
    /// In this order the frames of the buckets in between reach only this
    /// node, which passes them to their new owner (see the engine).
    pub async fn leave(&self, bound: std::time::Duration) {
        let _ = self.tx.send(true);
        let t = tokio::time::Instant::now();
        loop {
            let v = self.shared.load();
            if v.leaving && self.applied.load(std::sync::atomic::Ordering::Acquire) >= v.version {
                break;
            }
            if t.elapsed() >= bound {
                tracing::warn!(
                    waited_ms = t.elapsed().as_millis() as u64,
                    "leaving: the dataplane has not taken up the leaving view; announcing anyway"
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        self.commander
            .send(heartbeat::driver::Command::SetWeight(0));
    }
}
