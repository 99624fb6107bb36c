//! What the control plane tells the dataplane about the cluster: published
//! as a whole with `arc-swap`, read by the dataplane once per poll round
//! (never per packet, never under a lock).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rewrite::ethernet::MacAddr;
use rewrite::maglev::BucketTable;

/// The cluster as this node sees it now.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This node's id (the heartbeat's `node.id`).
    pub me: u32,
    /// This node is the active MAC holder: it answers ARP for the VIPs.
    pub mac_holder: bool,
    /// The MAC ARP replies for the VIPs give (the cluster MAC).
    pub answer_mac: MacAddr,
    /// Which node owns each bucket of flows.
    pub table: BucketTable,
    /// Live members (including this node when it is up).
    pub live: Vec<u32>,
    /// This node is leaving (SIGTERM): it owns no bucket and passes frames
    /// of its former buckets to their new owners until it stops.
    pub leaving: bool,
    /// Director mode: the MAC holder receives every VIP frame on a unicast
    /// MAC and passes other nodes' flows to them on the front segment.
    pub director: bool,
    /// Front addresses of the live peers (where their heartbeats come from).
    pub peer_addrs: Vec<(u32, std::net::Ipv4Addr)>,
    /// Each sub-cluster's gateway (config) and the addresses this node's
    /// heartbeat holds now (instances it is master of).
    pub gateways: Vec<(u32, std::net::Ipv4Addr)>,
    pub held: Vec<std::net::Ipv4Addr>,
    /// Bumped on every change; the dataplane refreshes derived state when
    /// it moves.
    pub version: u64,
}

impl ClusterView {
    /// Whether this node processes the flow with this hash.
    pub fn owns(&self, flow_hash: u64) -> bool {
        self.table.lookup(flow_hash) == Some(self.me)
    }

    /// The front address of the node owning this flow, when another node
    /// owns it and its address is known.
    pub fn owner_addr(&self, flow_hash: u64) -> Option<std::net::Ipv4Addr> {
        let owner = self.table.lookup(flow_hash)?;
        self.peer_addrs
            .iter()
            .find(|(id, _)| *id == owner && owner != self.me)
            .map(|(_, a)| *a)
    }

    /// Whether a real server of `node`'s sub-cluster may get new flows from
    /// this node: its own, those of any node, and those of dead nodes (whose
    /// back gateway this node's heartbeat has taken over).
    pub fn may_use_subcluster(&self, node: Option<u32>) -> bool {
        let Some(n) = node else { return true };
        match self.gateways.iter().find(|(id, _)| *id == n) {
            // Replies of that sub-cluster come to whoever holds its gateway.
            Some((_, gw)) => self.held.contains(gw),
            None => n == self.me || !self.live.contains(&n),
        }
    }
}

/// The shared cell the control plane writes and the dataplane reads.
pub type SharedView = Arc<ArcSwap<ClusterView>>;

/// The version of the view the dataplane works with (it stores it when it
/// picks a view up), so that the control plane knows when a change is in
/// effect: a leaving node announces its leave only once its dataplane has
/// stopped scheduling (see [`crate::peers::Drainer::leave`]).
pub type AppliedVersion = Arc<std::sync::atomic::AtomicU64>;

/// Wakes the dataplane when a new view is published, so that a node taking
/// over buckets (a peer leaving) starts serving them at once rather than at
/// the end of an idle poll.
#[derive(Debug)]
pub struct Wake {
    fd: std::os::fd::OwnedFd,
}

impl Wake {
    pub fn new() -> std::io::Result<Wake> {
        // SAFETY: plain eventfd(2); the descriptor is owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        Ok(Wake {
            fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) },
        })
    }

    /// Called by the control plane after publishing a view.
    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                one.as_ptr().cast(),
                8,
            )
        };
    }

    /// Resets the event (the dataplane, when poll says it fired).
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from our non-blocking eventfd.
        unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                buf.as_mut_ptr().cast(),
                8,
            )
        };
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}
