//! What happens to each frame: the packet walk of DESIGN §3 for one node.
//!
//! The engine is I/O-free: the driver hands it received frames with their
//! metadata and the current time, and it writes what must be sent through an
//! [`Output`]. That keeps it testable with literal frames and times, and
//! keeps the forwarding path free of allocation, locks and syscalls of its
//! own (counters are relaxed atomics).
//!
//! Front NIC (clients):
//! - ARP requests for a VIP are answered with the node's answer MAC (the
//!   kernel is kept off them by the ingress filter); other ARP is the
//!   kernel's.
//! - IPv4 to a VIP: fragments are dropped (no reassembly: later fragments
//!   carry no ports); TCP/UDP to a service port go through the connection
//!   table, new flows (a bare SYN, or any UDP datagram) are scheduled; an
//!   ICMP error about a flow follows that flow; other ICMP (echo) goes to
//!   the node's own stack, which answers for the VIP; anything else is
//!   dropped. IPv4 not to a VIP is the kernel's.
//! - Frames with a partial checksum (veth offload) are completed before
//!   they are rewritten or handed on: the receiver of our copy has no
//!   offload metadata and would drop it.
//!
//! Back NIC (real servers):
//! - ARP teaches the neighbour table (backends' MACs). A frame for a
//!   neighbour whose MAC is not known yet waits for it (at most three per
//!   address and 64 in all, for a second: [`HoldQueue`]) while the node
//!   asks; the ARP answer releases it. Beyond that it is dropped
//!   (`no_neighbor`).
//! - TCP/UDP matching a NAT connection's reply key is rewritten back to
//!   VIP:vport and sent to the client's next hop on the front; ICMP errors
//!   about a NAT flow likewise. Traffic to the node's own back addresses
//!   (health checks, the kernel's) is left to the kernel; anything else is
//!   dropped and counted.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use foldhash::fast::RandomState;
use rewrite::arp::{ArpOp, ArpRepr};
use rewrite::ethernet::MacAddr;
use rewrite::flow::{FlowHasher, FlowKey, proto};
use rewrite::nat::{self, RewriteError};
use rewrite::packet::{self, Kind, L4, ParseError, Parsed};

use crate::config::{Config, Forward};
use crate::conntrack::{
    ClientLookup, ConnTable, ConntrackError, Dir, Entry, Method, NewConn, TcpFlags, TcpInput,
    Timeouts,
};
use crate::dataplane::hold::{HoldQueue, Segment};
use crate::dataplane::neigh::Neighbors;
use crate::dataplane::ring::RxMeta;
use crate::dataplane::syncio::SyncIo;
use crate::dataplane::view::{ClusterView, SharedView};
use crate::health::OnDown;
use crate::persist::PersistTable;
use crate::sched::policy::{Decision, Refusal, ServicePolicy};
use crate::sched::{BackendState, SchedRng, rng_from_seed};
use crate::stats::{ConnGauge, DropReason, Nic, Stats};

/// Where the engine sends frames. Each returns false when the frame could
/// not be queued (the engine counts `tx_full`).
pub trait Output {
    /// An Ethernet frame out of the front NIC.
    fn to_front(&mut self, frame: &[u8]) -> bool;
    /// An Ethernet frame out of the back NIC.
    fn to_back(&mut self, frame: &[u8]) -> bool;
    /// An IPv4 packet into the node's own stack (the TUN device).
    fn to_local(&mut self, packet: &[u8]) -> bool;
}

/// The node's own link-layer facts the engine needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interfaces {
    pub front_mac: MacAddr,
    pub back_mac: MacAddr,
    /// Sender address of our ARP requests on the back segment.
    pub back_addr: Ipv4Addr,
    /// The MAC that ARP replies for the VIPs give (the front MAC on a single
    /// node; the cluster MAC in a cluster).
    pub answer_mac: MacAddr,
    /// The node's own front address (sender of its ARP requests there).
    pub front_addr: Ipv4Addr,
    /// The front subnet and router: next hops toward clients of flows a
    /// director passed to this node (director mode).
    pub front_net: Option<ipnet::Ipv4Net>,
    pub front_router: Option<Ipv4Addr>,
}

#[derive(Debug)]
struct BackendRt {
    addr: Ipv4Addr,
    port: u16,
    method: Method,
    /// Sub-cluster (cluster node id) of the real server, if attached to one.
    node: Option<u32>,
    /// The cluster lets this node use the real server's sub-cluster.
    sub_ok: bool,
    /// Health checks pass (as last read from the stats board).
    health_up: bool,
}

#[derive(Debug)]
struct ServiceRt {
    /// Limits, shedding, persistence, the algorithm, the sorry server.
    policy: ServicePolicy,
    on_down: OnDown,
    backends: Vec<BackendRt>,
    /// What the policy sees of each backend: config (weight, limits),
    /// health, cluster availability and the connection gauges.
    views: Vec<BackendState>,
}

/// Gratuitous ARPs sent for each VIP at start, one a second.
const GARP_COUNT: u32 = 3;
/// Longest time between two sends of a busy connection's entry.
const SYNC_REFRESH_MAX_MS: u64 = 60_000;

/// How often a busy, unchanged entry is sent again: a third of the
/// shortest idle timeout a synced copy lives by (so a peer's copy never
/// expires while the connection is in use), at most a minute.
fn sync_refresh_ms(c: &crate::config::Conntrack) -> u64 {
    let shortest = c.tcp_established.min(c.udp).as_millis() as u64;
    (shortest / 3).clamp(1, SYNC_REFRESH_MAX_MS)
}

/// Expired entries removed per housekeeping call at most, so that expiry
/// never stalls forwarding.
const EXPIRE_BUDGET: usize = 20_000;

/// The per-node forwarding state. Owned by the dataplane thread.
pub struct Engine {
    ifs: Interfaces,
    services: Vec<ServiceRt>,
    by_addr: HashMap<(Ipv4Addr, u16, u8), u16, RandomState>,
    vips: Vec<Ipv4Addr>,
    /// The node's own back addresses: traffic to them is the kernel's.
    back_local: Vec<Ipv4Addr>,
    conns: ConnTable,
    neigh: Neighbors,
    /// Director mode: the peers' front MACs.
    front_neigh: Neighbors,
    stats: Arc<Stats>,
    /// The [`Stats::backends_version`] last taken into the views.
    backends_seen: u64,
    /// Frames waiting for a neighbour's MAC (see [`HoldQueue`]).
    hold: HoldQueue,
    /// An entry unchanged for this long is sent to the peers again on its
    /// next client packet ([`Engine::resync_if_due`]).
    sync_refresh_ms: u64,
    hasher: FlowHasher,
    due: Vec<Ipv4Addr>,
    garps_sent: u32,
    next_garp_ms: u64,
    scratch: [u8; 64],
    /// Cluster mode: the published view, and the copy this thread uses
    /// (refreshed once per poll round by [`Engine::refresh`]).
    shared: Option<SharedView>,
    view: Option<Arc<ClusterView>>,
    /// Where the dataplane says which view version it works with, and the
    /// version picked up but not yet said (see [`Engine::poll_sync`]).
    applied: Option<crate::dataplane::view::AppliedVersion>,
    unsaid: Option<u64>,
    /// Source-address affinity of every service with persistence.
    persist: PersistTable,
    /// Draws of p2c and exponential shedding (seeded by the driver).
    rng: SchedRng,
    next_persist_publish_ms: u64,
    /// Cluster mode: connection sync with the peers.
    sync: Option<SyncIo>,
}

/// Persistence entries per service with persistence (the table is shared).
const PERSIST_SLOTS_PER_SERVICE: usize = 1 << 16;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("ifs", &self.ifs)
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
}

fn gauge(e: &Entry) -> ConnGauge {
    if e.state.is_active() {
        ConnGauge::Active
    } else {
        ConnGauge::Inactive
    }
}

/// The drop counter for a frame the parser refused.
pub fn drop_reason(e: ParseError) -> DropReason {
    match e {
        ParseError::Truncated => DropReason::Runt,
        ParseError::UnsupportedEthertype | ParseError::ArpUnsupported => DropReason::NotIpv4,
        ParseError::ArpTruncated => DropReason::Runt,
        ParseError::Ipv4Truncated | ParseError::BadVersion | ParseError::BadHeaderLength => {
            DropReason::BadIpHeader
        }
        ParseError::BadTotalLength => DropReason::BadTotalLength,
        ParseError::BadIpChecksum => DropReason::BadIpChecksum,
        ParseError::TcpTruncated
        | ParseError::BadTcpDataOffset
        | ParseError::UdpTruncated
        | ParseError::BadUdpLength
        | ParseError::IcmpTruncated => DropReason::BadL4Header,
        ParseError::IcmpErrorTruncated | ParseError::IcmpErrorMalformed => DropReason::BadIcmpError,
    }
}

fn rewrite_drop(e: RewriteError) -> DropReason {
    match e {
        RewriteError::BadIcmpChecksum | RewriteError::NotIcmpError => DropReason::BadIcmpError,
        RewriteError::Fragment => DropReason::Fragment,
        _ => DropReason::BadL4Header,
    }
}

impl Engine {
    /// Builds the engine for `config`. `back_local` are the node's own
    /// addresses on the back NIC.
    pub fn new(
        config: &Config,
        ifs: Interfaces,
        back_local: Vec<Ipv4Addr>,
        stats: Arc<Stats>,
    ) -> Result<Engine, ConntrackError> {
        let c = &config.conntrack;
        let timeouts = Timeouts {
            syn_recv: c.tcp_syn_recv,
            established: c.tcp_established,
            fin_wait: c.tcp_fin_wait,
            close_wait: c.tcp_close_wait,
            last_ack: c.tcp_last_ack,
            time_wait: c.tcp_time_wait,
            close: c.tcp_close,
            udp: c.udp,
            ..Timeouts::default()
        };
        let conns = ConnTable::new(c.max_entries, timeouts)?;
        let mut by_addr = HashMap::with_hasher(RandomState::default());
        let mut vips = Vec::new();
        let mut services = Vec::new();
        let mut wanted = Vec::new();
        let hasher = FlowHasher::new(config.node.flow_hash_seed);
        let mut persist_slots = 0;
        for (i, s) in config.services.iter().enumerate() {
            by_addr.insert((s.vip, s.port, s.protocol.number()), i as u16);
            if !vips.contains(&s.vip) {
                vips.push(s.vip);
            }
            let backends: Vec<BackendRt> = s
                .backends
                .iter()
                .map(|b| BackendRt {
                    addr: b.address.unwrap_or(s.vip),
                    port: if b.forward == Forward::Nat {
                        b.port
                    } else {
                        s.port
                    },
                    method: b.forward,
                    node: b.node,
                    sub_ok: true,
                    health_up: true,
                })
                .collect();
            wanted.extend(
                backends
                    .iter()
                    .filter(|b| b.method != Method::Local)
                    .map(|b| b.addr),
            );
            let views = s
                .backends
                .iter()
                .map(|b| BackendState {
                    key: hasher.hash_bytes(b.name.as_bytes()),
                    weight: u32::from(b.weight),
                    active_conns: 0,
                    inactive_conns: 0,
                    available: true,
                    standby: b.sorry,
                    max_conns: b.max_conns,
                    high_water: b.high_water,
                    rtt_us: 0,
                })
                .collect();
            if s.persistence.is_some() {
                persist_slots += PERSIST_SLOTS_PER_SERVICE;
            }
            services.push(ServiceRt {
                policy: ServicePolicy::new(i as u16, s.scheduler, hasher)
                    .with_persistence(s.persistence)
                    .with_max_conns(s.max_conns)
                    .with_shedding(s.shedding),
                on_down: s.health.as_ref().map_or(OnDown::Keep, |h| h.on_down),
                backends,
                views,
            });
        }
        Ok(Engine {
            ifs,
            services,
            by_addr,
            vips,
            back_local,
            conns,
            neigh: Neighbors::new(wanted),
            front_neigh: Neighbors::new([]),
            stats,
            hasher,
            due: Vec::new(),
            garps_sent: 0,
            next_garp_ms: 0,
            scratch: [0; 64],
            shared: None,
            backends_seen: 0,
            hold: HoldQueue::new(),
            sync_refresh_ms: sync_refresh_ms(c),
            view: None,
            applied: None,
            unsaid: None,
            persist: PersistTable::new(persist_slots, hasher),
            rng: rng_from_seed(0),
            next_persist_publish_ms: 0,
            sync: None,
        })
    }

    /// Seeds the generator of p2c and exponential shedding (the driver
    /// passes a random seed; tests a literal one).
    pub fn with_seed(mut self, seed: u64) -> Engine {
        self.rng = rng_from_seed(seed);
        self
    }

    /// Reads what the control plane publishes per backend (health, RTT,
    /// weight: drain and feedback) into the scheduling state. Called on
    /// the housekeeping tick: O(backends), no allocation, no lock.
    pub fn refresh_backends(&mut self) {
        for (si, s) in self.services.iter_mut().enumerate() {
            let stats = self.stats.service(si);
            for (bi, (b, v)) in s.backends.iter_mut().zip(s.views.iter_mut()).enumerate() {
                let st = stats.backend(bi);
                b.health_up = st.health.is_up();
                v.available = b.sub_ok && b.health_up;
                v.rtt_us = st.health.rtt_us();
                v.weight = st.weight.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Cluster mode: follow the view the control plane publishes. Flows of
    /// buckets other nodes own are dropped (`not_our_bucket`); ARP for the
    /// VIPs is answered only while this node is the MAC holder. The engine
    /// stores the version of every view it works with in `applied`.
    pub fn with_cluster(
        mut self,
        shared: SharedView,
        applied: crate::dataplane::view::AppliedVersion,
    ) -> Engine {
        self.shared = Some(shared);
        self.applied = Some(applied);
        self.refresh();
        self
    }

    /// Cluster mode: send new and changed connections to the peers and
    /// apply theirs.
    pub fn with_sync(mut self, sync: SyncIo) -> Engine {
        self.sync = Some(sync);
        self
    }

    fn synced(&mut self, id: crate::conntrack::ConnId, now_ms: u64) {
        if let (Some(s), Some(e)) = (&mut self.sync, self.conns.get(id)) {
            s.conn_changed(e, now_ms);
            self.conns.mark_synced(id, now_ms);
        }
    }

    /// Sends an unchanged entry again when its peers' copy is due for a
    /// refresh: a peer's copy ages from the last send, so a connection
    /// that stays busy in one state (a long download) would otherwise
    /// expire on the peers while it lives here.
    fn resync_if_due(&mut self, id: crate::conntrack::ConnId, now_ms: u64) {
        if self.sync.is_some()
            && self
                .conns
                .get(id)
                .is_some_and(|e| u64::from(e.since_synced_ms(now_ms)) >= self.sync_refresh_ms)
        {
            self.synced(id, now_ms);
        }
    }

    /// Picks up changed backend weights and health, and a newly published
    /// cluster view (cheap when nothing changed: two atomic loads). Call
    /// once per poll round.
    pub fn refresh(&mut self) {
        let version = self.stats.backends_version();
        if version != self.backends_seen {
            self.backends_seen = version;
            self.refresh_backends();
        }
        let Some(shared) = &self.shared else { return };
        let current = shared.load();
        if self
            .view
            .as_ref()
            .is_some_and(|v| v.version == current.version)
        {
            return;
        }
        let view = arc_swap::Guard::into_inner(current);
        {
            let hops = [self.ifs.front_router].into_iter().flatten();
            self.front_neigh
                .set_wanted(view.peer_addrs.iter().map(|(_, a)| *a).chain(hops));
        }
        for s in &mut self.services {
            for (b, v) in s.backends.iter_mut().zip(s.views.iter_mut()) {
                b.sub_ok = view.may_use_subcluster(b.node);
                v.available = b.sub_ok && b.health_up;
            }
        }
        self.unsaid = Some(view.version);
        self.view = Some(view);
    }

    pub fn connections(&self) -> &ConnTable {
        &self.conns
    }

    /// Cluster mode: whether this node processes the flow (counts
    /// `not_our_bucket` when not). Always true on a single node.
    ///
    /// Director mode: only frames to this node's own MAC (passed by the MAC
    /// holder) or, on the MAC holder, to the cluster's unicast MAC are
    /// looked at; the holder passes the flows of other nodes' buckets to
    /// their owner by rewriting the destination MAC (DR between balancers),
    /// with the checksum completed first (the owner gets no offload mark).
    fn take(
        &mut self,
        key: &FlowKey,
        frame: &mut [u8],
        p: &Parsed,
        meta: RxMeta,
        now_ms: u64,
        out: &mut dyn Output,
    ) -> bool {
        let Some(v) = &self.view else { return true };
        if v.director
            && p.dst_mac != self.ifs.front_mac
            && !(v.mac_holder && p.dst_mac == v.answer_mac)
        {
            return false; // flooded copy of a frame for another node
        }
        if p.dst_mac == self.ifs.front_mac {
            return true; // passed to this node by a peer: it decided
        }
        let hash = self.hasher.hash(key);
        if v.owns(hash) {
            return true;
        }
        // Leaving (SIGTERM): this node stopped scheduling before it told the
        // peers (one scheduler per flow at every moment), so until their
        // takeover only this node sees its former buckets' frames. Pass
        // them to the new owner, which serves what a peer passes it
        // whatever its own table says, until this node stops: the peers'
        // takeover cannot be seen from here. Once the owner has taken over
        // it also gets the multicast copy: a duplicate, which TCP ignores
        // and which finds the same connection entry on the same node.
        if !(v.director && v.mac_holder || v.leaving) {
            self.drop(DropReason::NotOurBucket);
            return false;
        }
        let Some(owner) = v.owner_addr(hash) else {
            self.drop(DropReason::NoNeighbor);
            return false;
        };
        let mac = self.front_neigh.lookup(owner, now_ms);
        if meta.csum_not_ready
            && matches!(
                p.kind,
                Kind::Ipv4 {
                    l4: L4::Tcp { .. } | L4::Udp { .. },
                    ..
                }
            )
            && let Err(err) = nat::complete_checksum(frame, p)
        {
            self.drop(rewrite_drop(err));
            return false;
        }
        if !self.send_or_hold(Segment::Front, owner, mac, frame, p, now_ms, out) {
            return false;
        }
        self.stats
            .passed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        false
    }

    fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.vips.contains(&ip)
    }

    fn drop(&self, r: DropReason) {
        self.stats.record_drop(r);
    }

    fn send_front(&self, out: &mut dyn Output, frame: &[u8]) {
        if out.to_front(frame) {
            self.stats
                .nic(Nic::Front)
                .tx_frames
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.drop(DropReason::TxFull);
        }
    }

    fn send_back(&self, out: &mut dyn Output, frame: &[u8]) {
        if out.to_back(frame) {
            self.stats
                .nic(Nic::Back)
                .tx_frames
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.drop(DropReason::TxFull);
        }
    }

    fn send_on(&self, segment: Segment, out: &mut dyn Output, frame: &[u8]) {
        match segment {
            Segment::Front => self.send_front(out, frame),
            Segment::Back => self.send_back(out, frame),
        }
    }

    fn send_local(&self, out: &mut dyn Output, packet: &[u8]) {
        if out.to_local(packet) {
            self.stats
                .nic(Nic::Tun)
                .tx_frames
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.drop(DropReason::TxFull);
        }
    }

    /// Common checks of a received frame: truncation by the ring, VLAN tags,
    /// the parser. `None` means dropped and counted.
    fn accept(&self, nic: Nic, frame: &[u8], meta: RxMeta) -> Option<Parsed> {
        self.stats
            .nic(nic)
            .rx_frames
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if meta.len > frame.len() {
            self.drop(DropReason::Truncated);
            return None;
        }
        if meta.vlan_tagged {
            self.drop(DropReason::VlanTagged);
            return None;
        }
        match packet::parse(frame) {
            Ok(p) if p.vlan.is_some() => {
                self.drop(DropReason::VlanTagged);
                None
            }
            Ok(p) => Some(p),
            Err(e) => {
                self.drop(drop_reason(e));
                None
            }
        }
    }

    /// A frame received on the front NIC.
    pub fn on_front(&mut self, frame: &mut [u8], meta: RxMeta, now_ms: u64, out: &mut dyn Output) {
        let Some(p) = self.accept(Nic::Front, frame, meta) else {
            return;
        };
        match p.kind {
            Kind::Arp(a) => self.front_arp(&a, now_ms, out),
            Kind::Ipv4 {
                dst, fragment, l4, ..
            } => {
                if !self.is_vip(dst) {
                    return; // the kernel's (the node's own front address)
                }
                if fragment {
                    self.drop(DropReason::Fragment);
                    return;
                }
                if let Some(key) = p.flow_key()
                    && !self.take(&key, frame, &p, meta, now_ms, out)
                {
                    return;
                }
                match l4 {
                    L4::Tcp { .. } | L4::Udp { .. } => {
                        self.client_packet(frame, &p, meta, now_ms, out)
                    }
                    L4::IcmpError { .. } => self.client_icmp_error(frame, &p, now_ms, out),
                    L4::IcmpOther { .. } => {
                        // Echo and friends: the node's own stack answers for
                        // the VIP (in a cluster, the node owning the "flow").
                        if let Some(ip) = ip_packet(frame, &p) {
                            self.send_local(out, ip);
                        }
                    }
                    L4::Other => self.drop(DropReason::OtherProto),
                }
            }
        }
    }

    fn front_arp(&mut self, a: &ArpRepr, now_ms: u64, out: &mut dyn Output) {
        // Cluster mode: every node learns the front segment's MACs (the
        // clients' ARP for the VIP is broadcast), so replies of flows a peer
        // passed know their next hop from the first packet.
        if self.view.is_some() && self.ifs.front_net.is_some_and(|n| n.contains(&a.sender_ip)) {
            self.front_neigh.want(a.sender_ip);
        }
        if self.front_neigh.learn(a.sender_ip, a.sender_mac.0, now_ms) {
            self.release_held(Segment::Front, a.sender_ip, a.sender_mac.0, out);
        }
        if a.op != ArpOp::Request || !self.is_vip(a.target_ip) {
            return;
        }
        let answer = match &self.view {
            None => self.ifs.answer_mac,
            Some(v) if v.mac_holder => v.answer_mac,
            Some(_) => return, // another node is the MAC holder
        };
        let mut buf = [0u8; 64];
        if let Ok(n) = rewrite::arp::write_reply(&mut buf, a, answer, self.ifs.front_mac) {
            self.send_front(out, &buf[..n]);
            self.stats
                .arp_replies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn client_packet(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        meta: RxMeta,
        now_ms: u64,
        out: &mut dyn Output,
    ) {
        let Some(key) = p.flow_key() else { return };
        let Some(&svc) = self.by_addr.get(&(key.dst, key.dst_port, key.proto)) else {
            self.drop(DropReason::NoService);
            return;
        };
        let (flags, seq) = match p.kind {
            Kind::Ipv4 {
                l4: L4::Tcp { flags, seq, .. },
                ..
            } => (flags, seq),
            _ => (TcpFlags::NONE, 0),
        };
        // The client's ISN, kept by an entry scheduled on this SYN.
        let isn = TcpInput::is_new_conn(flags).then_some(seq);
        let id = match self.conns.lookup_client(&key, flags, seq) {
            ClientLookup::Existing(id) => {
                if self.reset_if_backend_down(id, frame, p, out) {
                    return;
                }
                if let Some(t) = self.conns.update(id, Dir::FromClient, flags, now_ms)
                    && let Some(e) = self.conns.get(id)
                {
                    self.settle(e.service, e.backend, t.activated(), t.deactivated());
                    if t.changed() {
                        self.synced(id, now_ms);
                    } else {
                        self.resync_if_due(id, now_ms);
                    }
                }
                id
            }
            ClientLookup::StaleSyn(_) => return self.drop(DropReason::StaleSyn),
            ClientLookup::Reused(old) => {
                if let Some(e) = self.conns.remove(old) {
                    self.stats
                        .conn_gone(e.service as usize, e.backend as usize, gauge(&e));
                    self.unview(&e);
                    if let Some(s) = &mut self.sync {
                        s.conn_removed(&e, now_ms);
                    }
                }
                match self.new_conn(svc, key, flags, isn, p, now_ms) {
                    Admit::Conn(id) => id,
                    Admit::Dropped => return,
                    Admit::Refused => return self.refuse(svc, frame, p, out),
                }
            }
            ClientLookup::New => match self.new_conn(svc, key, flags, isn, p, now_ms) {
                Admit::Conn(id) => id,
                Admit::Dropped => return,
                Admit::Refused => return self.refuse(svc, frame, p, out),
            },
        };
        if let Some(pc) = self.services[usize::from(svc)].policy.persistence {
            // Traffic keeps the client's affinity alive.
            self.persist
                .refresh(svc, pc.mask(key.src), now_ms, pc.timeout_ms);
        }
        let Some(e) = self.conns.get(id).copied() else {
            return;
        };
        if meta.csum_not_ready
            && let Err(err) = nat::complete_checksum(frame, p)
        {
            self.drop(rewrite_drop(err));
            return;
        }
        let bytes = ip_len(p);
        self.stats
            .record_in(e.service as usize, e.backend as usize, bytes);
        match e.method {
            Method::Local => {
                if let Some(ip) = ip_packet(frame, p) {
                    self.send_local(out, ip);
                }
            }
            Method::Nat => {
                if let Err(err) = nat::nat_forward(frame, p, e.backend_addr, e.backend_port) {
                    self.drop(rewrite_drop(err));
                    return;
                }
                self.send_to_backend(frame, p, e.backend_addr, now_ms, out);
            }
            Method::Dr => self.send_to_backend(frame, p, e.backend_addr, now_ms, out),
        }
    }

    /// Sends a (rewritten) frame to a backend on the back segment.
    fn send_to_backend(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        addr: Ipv4Addr,
        now_ms: u64,
        out: &mut dyn Output,
    ) {
        let mac = self.neigh.lookup(addr, now_ms);
        self.send_or_hold(Segment::Back, addr, mac, frame, p, now_ms, out);
    }

    /// Sends a rewritten frame from `segment`'s NIC to the neighbour `ip`,
    /// with its MAC (`mac`, looked up by the caller), or holds it until that
    /// MAC is learned ([`Engine::hold_for`]). False, counted `runt`, when
    /// the frame has no room for the MACs.
    #[allow(clippy::too_many_arguments)]
    fn send_or_hold(
        &mut self,
        segment: Segment,
        ip: Ipv4Addr,
        mac: Option<[u8; 6]>,
        frame: &mut [u8],
        p: &Parsed,
        now_ms: u64,
        out: &mut dyn Output,
    ) -> bool {
        let src = match segment {
            Segment::Front => self.ifs.front_mac,
            Segment::Back => self.ifs.back_mac,
        };
        if nat::set_macs(frame, src, MacAddr(mac.unwrap_or([0; 6]))).is_err() {
            self.drop(DropReason::Runt);
            return false;
        }
        let end = p.l3_end().unwrap_or(frame.len()).min(frame.len());
        match mac {
            Some(_) => self.send_on(segment, out, &frame[..end]),
            None => self.hold_for(segment, ip, &frame[..end], now_ms, out),
        }
        true
    }

    /// Holds a frame (complete but for its destination MAC) until `ip`'s
    /// MAC on `segment` is learned, and asks for it at once; counts
    /// `no_neighbor` when the queue cannot take it.
    fn hold_for(
        &mut self,
        segment: Segment,
        ip: Ipv4Addr,
        frame: &[u8],
        now_ms: u64,
        out: &mut dyn Output,
    ) {
        if self.hold.hold(segment, ip, frame, now_ms).is_err() {
            self.drop(DropReason::NoNeighbor);
            return;
        }
        let (table, nic) = match segment {
            Segment::Back => (&mut self.neigh, Nic::Back),
            Segment::Front => (&mut self.front_neigh, Nic::Front),
        };
        table.want(ip);
        if table.ask_now(ip, now_ms) {
            self.arp_request(nic, ip, out);
        }
    }

    /// Sends one ARP request for `ip` from the node's address on `nic`.
    fn arp_request(&mut self, nic: Nic, ip: Ipv4Addr, out: &mut dyn Output) {
        let (sender_mac, sender_ip) = match nic {
            Nic::Front => (self.ifs.front_mac, self.ifs.front_addr),
            _ => (self.ifs.back_mac, self.ifs.back_addr),
        };
        let req = ArpRepr {
            op: ArpOp::Request,
            sender_mac,
            sender_ip,
            target_mac: MacAddr([0; 6]),
            target_ip: ip,
        };
        if let Ok(n) = rewrite::arp::write_request(&mut self.scratch, &req) {
            let f = self.scratch;
            match nic {
                Nic::Front => self.send_front(out, &f[..n]),
                _ => self.send_back(out, &f[..n]),
            }
        }
    }

    /// A neighbour's MAC was learned: its held frames leave.
    fn release_held(&mut self, segment: Segment, ip: Ipv4Addr, mac: [u8; 6], out: &mut dyn Output) {
        if self.hold.is_empty() {
            return;
        }
        let mut q = std::mem::replace(&mut self.hold, HoldQueue::empty());
        q.release(segment, ip, mac, |f| self.send_on(segment, out, f));
        self.hold = q;
    }

    /// Schedules a new flow and records it (`isn`: the client's, if this
    /// is its SYN).
    fn new_conn(
        &mut self,
        svc: u16,
        key: FlowKey,
        flags: TcpFlags,
        isn: Option<u32>,
        p: &Parsed,
        now_ms: u64,
    ) -> Admit {
        if key.proto == proto::TCP {
            let f = flags.0;
            let syn = f & 0x02 != 0;
            if syn && f & 0x05 != 0 {
                // SYN with FIN or RST: never a valid opening.
                self.drop(DropReason::BadTcpFlags);
                return Admit::Dropped;
            }
            if !syn || f & 0x10 != 0 {
                // Not a bare SYN: a segment of a flow we do not know (or
                // forgot). IPVS drops these too.
                self.drop(DropReason::NoConn);
                return Admit::Dropped;
            }
        }
        let s = &mut self.services[svc as usize];
        let hash = self.hasher.hash(&key);
        let decision = s.policy.decide(
            &s.views,
            key.src,
            hash,
            &mut self.persist,
            now_ms,
            &mut self.rng,
        );
        let be = match decision {
            Decision::Backend { index, .. } => index,
            Decision::Refuse(Refusal::NoBackend) => {
                // Dropped, not reset: no backend is often a moment (a
                // cluster hand-over, a restart); the client's SYN
                // retransmission may find one.
                self.stats.record_no_backend(svc as usize);
                return Admit::Dropped;
            }
            Decision::Refuse(Refusal::BackendsFull) => {
                self.stats.record_conn_limit(svc as usize);
                return Admit::Refused;
            }
            Decision::Refuse(Refusal::Shed) => {
                self.stats.record_shed(svc as usize);
                return Admit::Refused;
            }
            Decision::Refuse(Refusal::ServiceFull) => {
                self.stats.record_conn_limit(svc as usize);
                return Admit::Refused;
            }
        };
        let b = &s.backends[be];
        let nc = NewConn {
            key,
            service: svc,
            backend: be as u16,
            backend_addr: b.addr,
            backend_port: if b.method == Method::Nat {
                b.port
            } else {
                key.dst_port
            },
            method: b.method,
            client_mac: self.client_mac_of(p, key.src, now_ms),
            isn,
        };
        match self.conns.insert(nc, flags, now_ms) {
            Ok(id) => {
                if let Some(e) = self.conns.get(id) {
                    let g = gauge(e);
                    self.stats.conn_new(svc as usize, be, g);
                    count(&mut self.services[svc as usize].views[be], g, 1);
                }
                self.synced(id, now_ms);
                Admit::Conn(id)
            }
            Err(ConntrackError::TableFull) => {
                // Also counts the `table_full` drop.
                self.stats.record_table_full(svc as usize);
                Admit::Dropped
            }
            Err(_) => {
                self.drop(DropReason::NoConn);
                Admit::Dropped
            }
        }
    }

    /// The next hop toward a client: itself when on the front subnet, else
    /// the front router.
    fn next_hop(&self, client: Ipv4Addr) -> Option<Ipv4Addr> {
        match self.ifs.front_net {
            Some(net) if net.contains(&client) => Some(client),
            _ => self.ifs.front_router,
        }
    }

    /// The MAC replies of a new flow go to: the source MAC of its frame, or,
    /// for a frame a director passed (its source is the director's MAC, not
    /// the client's next hop), the next hop's MAC from the front neighbour
    /// table (zero while unknown: resolved when the first reply comes).
    fn client_mac_of(&mut self, p: &Parsed, client: Ipv4Addr, now_ms: u64) -> [u8; 6] {
        let passed = self.view.as_ref().is_some_and(|v| {
            v.peer_addrs
                .iter()
                .any(|(_, a)| self.front_neigh.lookup(*a, now_ms) == Some(p.src_mac.0))
        });
        if !passed {
            return p.src_mac.0;
        }
        let Some(hop) = self.next_hop(client) else {
            return [0; 6];
        };
        match self.front_neigh.lookup(hop, now_ms) {
            Some(m) => m,
            None => {
                self.front_neigh.want(hop);
                [0; 6]
            }
        }
    }

    /// A refused new flow: TCP gets a reset from the VIP at once (the
    /// client fails fast instead of retransmitting its SYN), UDP nothing.
    fn refuse(&mut self, svc: u16, frame: &mut [u8], p: &Parsed, out: &mut dyn Output) {
        if let Ok(n) = rewrite::reply::tcp_reset(frame, p, self.ifs.front_mac) {
            self.send_front(out, &frame[..n]);
            self.stats.record_reset(svc as usize);
        }
    }

    /// `on_down = reset`: a client packet of a connection whose backend's
    /// health checks fail removes the connection; a TCP segment is answered
    /// with a reset, a UDP datagram dropped (the flow's next datagram is
    /// scheduled afresh). Returns whether the packet was consumed.
    fn reset_if_backend_down(
        &mut self,
        id: crate::conntrack::ConnId,
        frame: &mut [u8],
        p: &Parsed,
        out: &mut dyn Output,
    ) -> bool {
        let Some(e) = self.conns.get(id).copied() else {
            return false;
        };
        let s = &self.services[usize::from(e.service)];
        if s.on_down != OnDown::Reset || s.backends[usize::from(e.backend)].health_up {
            return false;
        }
        if let Some(e) = self.conns.remove(id) {
            self.stats
                .conn_gone(e.service as usize, e.backend as usize, gauge(&e));
            self.unview(&e);
        }
        self.refuse(e.service, frame, p, out);
        true
    }

    fn settle(&mut self, svc: u16, be: u16, activated: bool, deactivated: bool) {
        let view = &mut self.services[svc as usize].views[be as usize];
        if activated {
            count(view, ConnGauge::Inactive, -1);
            count(view, ConnGauge::Active, 1);
            self.stats.conn_moved(
                svc as usize,
                be as usize,
                ConnGauge::Inactive,
                ConnGauge::Active,
            );
        } else if deactivated {
            count(view, ConnGauge::Active, -1);
            count(view, ConnGauge::Inactive, 1);
            self.stats.conn_moved(
                svc as usize,
                be as usize,
                ConnGauge::Active,
                ConnGauge::Inactive,
            );
        }
    }

    fn unview(&mut self, e: &Entry) {
        let v = &mut self.services[e.service as usize].views[e.backend as usize];
        count(v, gauge(e), -1);
    }

    /// An ICMP error from the client side about a packet we sent it
    /// (VIP:vport -> client): it follows the flow to its backend.
    fn client_icmp_error(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        now_ms: u64,
        out: &mut dyn Output,
    ) {
        let Some(key) = p.flow_key() else { return };
        let Some(id) = self.conns.lookup(&key) else {
            self.drop(DropReason::NoConn);
            return;
        };
        let Some(e) = self.conns.get(id).copied() else {
            return;
        };
        match e.method {
            Method::Local => {
                if let Some(ip) = ip_packet(frame, p) {
                    self.send_local(out, ip);
                }
            }
            Method::Nat => {
                if let Err(err) = nat::icmp_error_forward(frame, p, e.backend_addr, e.backend_port)
                {
                    self.drop(rewrite_drop(err));
                    return;
                }
                self.send_to_backend(frame, p, e.backend_addr, now_ms, out);
            }
            Method::Dr => self.send_to_backend(frame, p, e.backend_addr, now_ms, out),
        }
    }

    /// A frame received on the back NIC.
    pub fn on_back(&mut self, frame: &mut [u8], meta: RxMeta, now_ms: u64, out: &mut dyn Output) {
        let Some(p) = self.accept(Nic::Back, frame, meta) else {
            return;
        };
        match p.kind {
            Kind::Arp(a) => {
                if self.neigh.learn(a.sender_ip, a.sender_mac.0, now_ms) {
                    self.release_held(Segment::Back, a.sender_ip, a.sender_mac.0, out);
                }
            }
            Kind::Ipv4 {
                dst, fragment, l4, ..
            } => {
                if self.back_local.contains(&dst) || dst.is_multicast() || dst.is_broadcast() {
                    return; // the kernel's
                }
                if fragment {
                    self.drop(DropReason::Fragment);
                    return;
                }
                let Some(key) = p.flow_key() else { return };
                let Some(id) = self.conns.lookup_reply(&key) else {
                    self.drop(DropReason::NoConn);
                    return;
                };
                match l4 {
                    L4::Tcp { flags, .. } => {
                        if let Some(t) = self.conns.update(id, Dir::FromBackend, flags, now_ms)
                            && let Some(e) = self.conns.get(id)
                        {
                            let (s, b) = (e.service, e.backend);
                            self.settle(s, b, t.activated(), t.deactivated());
                            if t.changed() {
                                self.synced(id, now_ms);
                            }
                        }
                    }
                    L4::Udp { .. } => {
                        self.conns
                            .update(id, Dir::FromBackend, TcpFlags::NONE, now_ms);
                    }
                    _ => {}
                }
                let Some(e) = self.conns.get(id).copied() else {
                    return;
                };
                if meta.csum_not_ready
                    && matches!(l4, L4::Tcp { .. } | L4::Udp { .. })
                    && let Err(err) = nat::complete_checksum(frame, &p)
                {
                    self.drop(rewrite_drop(err));
                    return;
                }
                let r = match l4 {
                    L4::Tcp { .. } | L4::Udp { .. } => {
                        nat::nat_reverse(frame, &p, e.key.dst, e.key.dst_port)
                    }
                    L4::IcmpError { .. } => {
                        nat::icmp_error_reverse(frame, &p, e.key.dst, e.key.dst_port)
                    }
                    _ => {
                        self.drop(DropReason::OtherProto);
                        return;
                    }
                };
                if let Err(err) = r {
                    self.drop(rewrite_drop(err));
                    return;
                }
                // A flow passed by the director has no client MAC: the next
                // hop toward the client, resolved on the front segment (the
                // reply waits for it if unknown).
                let (client_mac, hop) = if e.client_mac == [0; 6] {
                    let hop = self.next_hop(e.key.src);
                    (hop.and_then(|h| self.front_neigh.lookup(h, now_ms)), hop)
                } else {
                    (Some(e.client_mac), None)
                };
                let (service, backend) = (e.service as usize, e.backend as usize);
                if client_mac.is_none() && hop.is_none() {
                    return self.drop(DropReason::NoNeighbor);
                }
                let to = hop.unwrap_or(e.key.src);
                if self.send_or_hold(Segment::Front, to, client_mac, frame, &p, now_ms, out) {
                    self.stats.record_out(service, backend, ip_len(&p));
                }
            }
        }
    }

    /// ARP requests for the neighbours of interest that are unknown or due
    /// for a refresh (each at most once per retry interval), on both
    /// segments.
    fn ask_neighbors(&mut self, now_ms: u64, out: &mut dyn Output) {
        let mut due = std::mem::take(&mut self.due);
        self.neigh.due_requests(now_ms, &mut due);
        for ip in &due {
            self.arp_request(Nic::Back, *ip, out);
        }
        // Director mode: the peers' front MACs, to pass them their flows.
        self.front_neigh.due_requests(now_ms, &mut due);
        for ip in &due {
            self.arp_request(Nic::Front, *ip, out);
        }
        self.due = due;
    }

    /// Periodic work: connection expiry, ARP for backends, gratuitous ARP
    /// for the VIPs at start. Call every few tens of milliseconds.
    /// Cluster mode: sends due sync batches and applies the peers'. Call
    /// every poll round (sync latency is what a takeover can lose).
    ///
    /// Then says which view this thread works with (see
    /// [`Engine::with_cluster`]), once the connections it scheduled under
    /// the previous one are sent: a leaving node announces its leave when
    /// its dataplane has said so, and a peer taking over its buckets must
    /// know every flow it scheduled before the first frame the peer serves.
    /// (The driver calls [`Engine::refresh`], then this, then reads frames.)
    pub fn poll_sync(&mut self, now_ms: u64) {
        if let Some(s) = &mut self.sync {
            s.poll(&mut self.conns, now_ms);
        }
        if let Some(version) = self.unsaid.take() {
            if let Some(s) = &mut self.sync {
                s.flush(now_ms);
            }
            if let Some(a) = &self.applied {
                a.store(version, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// The sync socket, to wake the dataplane when a peer sends.
    pub fn sync_fd(&self) -> Option<std::os::fd::RawFd> {
        self.sync.as_ref().map(SyncIo::fd)
    }

    pub fn housekeeping(&mut self, now_ms: u64, out: &mut dyn Output) {
        let stats = &self.stats;
        let services = &mut self.services;
        self.conns.expire(now_ms, EXPIRE_BUDGET, |e| {
            stats.conn_gone(e.service as usize, e.backend as usize, gauge(e));
            let v = &mut services[e.service as usize].views[e.backend as usize];
            count(v, gauge(e), -1);
        });
        self.refresh_backends();
        if now_ms >= self.next_persist_publish_ms {
            // About once a second: live affinity entries per service, for
            // `balancer status` (a scan of the table, off the packet path).
            self.next_persist_publish_ms = now_ms + 1000;
            for (si, s) in self.services.iter().enumerate() {
                if s.policy.persistence.is_some() {
                    let n = self
                        .persist
                        .entries(now_ms)
                        .filter(|x| usize::from(x.service) == si)
                        .count();
                    self.stats
                        .service(si)
                        .persistent
                        .store(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let expired = self.hold.expire(now_ms);
        if expired > 0 {
            self.stats
                .drop_counter(DropReason::NoNeighbor)
                .fetch_add(expired as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.ask_neighbors(now_ms, out);
        // In a cluster the heartbeat announces the VIPs when this node
        // becomes the MAC holder.
        if self.shared.is_none() && self.garps_sent < GARP_COUNT && now_ms >= self.next_garp_ms {
            self.garps_sent += 1;
            self.next_garp_ms = now_ms + 1000;
            for i in 0..self.vips.len() {
                let vip = self.vips[i];
                if let Ok(n) = rewrite::arp::write_gratuitous(
                    &mut self.scratch,
                    vip,
                    self.ifs.answer_mac,
                    self.ifs.front_mac,
                ) {
                    let f = self.scratch;
                    self.send_front(out, &f[..n]);
                }
            }
        }
    }
}

/// What became of a new flow.
enum Admit {
    Conn(crate::conntrack::ConnId),
    /// Not a valid opening: dropped and counted.
    Dropped,
    /// Refused by the service's limits or shedding: counted, and answered
    /// with a TCP reset.
    Refused,
}

/// Adds `delta` to the view's gauge `g`, saturating at zero.
fn count(v: &mut BackendState, g: ConnGauge, delta: i32) {
    let slot = match g {
        ConnGauge::Active => &mut v.active_conns,
        ConnGauge::Inactive => &mut v.inactive_conns,
    };
    *slot = slot.saturating_add_signed(delta);
}

/// The IPv4 datagram of a frame (no Ethernet header, no padding).
fn ip_packet<'a>(frame: &'a [u8], p: &Parsed) -> Option<&'a [u8]> {
    frame.get(p.l3_offset..p.l3_end()?)
}

fn ip_len(p: &Parsed) -> u64 {
    match p.kind {
        Kind::Ipv4 { total_len, .. } => total_len as u64,
        Kind::Arp(_) => 0,
    }
}
