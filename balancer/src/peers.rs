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
    me: u32,
    params: TableParams,
    cluster: Cluster,
    exec_rx: Option<mpsc::UnboundedReceiver<Exec>>,
    vips: Vec<Ipv4Addr>,
    universe: Vec<u32>,
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
pub fn view_of(
    status: &NodeStatus,
    cluster: &Cluster,
    params: &TableParams,
    universe: &[u32],
    version: u64,
) -> Result<ClusterView, rewrite::maglev::TableError> {
    let me = status.node_id;
    let mac_holder = status
        .instance(&cluster.front_instance)
        .is_some_and(|i| i.state == State::Master);
    let live = status.live.clone();
    let nodes: Vec<Node> = universe
        .iter()
        .map(|&id| {
            let weight = status
                .members
                .iter()
                .find(|m| m.node_id == id)
                .and_then(|m| m.last.as_ref())
                .map_or(1, |h| h.weight.max(1));
            Node::new(id, weight, live.contains(&id))
        })
        .collect();
    let table = BucketTable::build(params, &nodes, version)?;
    Ok(ClusterView {
        me,
        mac_holder,
        answer_mac: cluster.cluster_mac,
        table,
        live,
        version,
    })
}

impl Peers {
    /// Starts the embedded heartbeat (its sockets and protocol thread).
    pub fn start(config: &Config, cluster: &Cluster) -> Result<Peers, PeersError> {
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
        let first = view_of(&status, cluster, &params, &universe, 1)?;
        Ok(Peers {
            handle,
            shared: Arc::new(ArcSwap::from_pointee(first)),
            me: hb.node_id,
            params,
            cluster: cluster.clone(),
            exec_rx: Some(exec_rx),
            vips: config.vips(),
            universe,
        })
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
        let mut status: watch::Receiver<Arc<NodeStatus>> = self.handle.status.clone();
        let mut version = 1u64;
        let mut last = (Vec::new(), false);
        loop {
            let st = status.borrow_and_update().clone();
            let holder = st
                .instance(&self.cluster.front_instance)
                .is_some_and(|i| i.state == State::Master);
            if (st.live.clone(), holder) != last {
                version += 1;
                match view_of(&st, &self.cluster, &self.params, &self.universe, version) {
                    Ok(v) => {
                        tracing::info!(live = ?v.live, mac_holder = holder, "cluster view changed");
                        self.shared.store(Arc::new(v));
                        last = (st.live.clone(), holder);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot build the bucket table"),
                }
            }
            if st.stopped || status.changed().await.is_err() {
                break;
            }
        }
    }
}
