//! Counters: written by the dataplane threads, read by the control socket.
//!
//! Lock-free and allocation-free on the packet path: every counter is an
//! `AtomicU64` updated with `Relaxed` ordering (counters are independent;
//! a snapshot is a set of individually exact values, not a consistent cut).
//! Services and backends are indexed exactly like [`Config::services`] and
//! [`Service::backends`](crate::config::Service::backends).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Forward, Protocol};
use crate::health::BackendHealth;

fn yes() -> bool {
    true
}

/// Why the dataplane dropped a frame. Every dropped frame bumps exactly one
/// of these. To add a reason: a variant (before `OtherProto` is fine,
/// order is only display order), its name in `as_str`, and `ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Shorter than an Ethernet header plus the smallest header we need.
    Runt,
    /// Captured length (snaplen) smaller than the frame length.
    Truncated,
    /// EtherType neither IPv4 nor ARP.
    NotIpv4,
    /// 802.1Q / 802.1ad tagged frame.
    VlanTagged,
    /// IPv4 version or IHL invalid.
    BadIpHeader,
    BadIpChecksum,
    /// IPv4 total length larger than the frame or smaller than the header.
    BadTotalLength,
    /// A fragment (MF set or offset non-zero): not reassembled.
    Fragment,
    /// TCP/UDP header short or with an invalid data offset.
    BadL4Header,
    /// An ICMP error whose embedded header does not match a flow or parse.
    BadIcmpError,
    /// To a VIP port that has no service.
    NoService,
    /// A non-SYN TCP segment for a flow not in the connection table.
    NoConn,
    /// The connection table is full.
    TableFull,
    /// The service has no backend with weight > 0 (or none reachable).
    NoBackend,
    /// The backend's MAC is not resolved yet.
    NoNeighbor,
    /// The flow hashes into another cluster node's bucket.
    NotOurBucket,
    /// The transmit ring was full.
    TxFull,
    /// An IP protocol other than TCP, UDP or ICMP.
    OtherProto,
    /// An impossible TCP flag combination (SYN+FIN, SYN+RST, none).
    BadTcpFlags,
    /// A new flow refused by load shedding (TCP: answered with a RST).
    Shed,
    /// A new flow refused at the service's connection limit (TCP: RST).
    ConnLimit,
    /// The kernel found the receive ring full (the dataplane fell behind);
    /// read from PACKET_STATISTICS.
    RxRingFull,
    /// A copy of the SYN that opened a finished connection
    /// ([`crate::conntrack::ClientLookup::StaleSyn`]).
    StaleSyn,
}

impl DropReason {
    /// Every reason, in display order; `ALL[r.index()] == r`.
    pub const ALL: [DropReason; 23] = [
        DropReason::Runt,
        DropReason::Truncated,
        DropReason::NotIpv4,
        DropReason::VlanTagged,
        DropReason::BadIpHeader,
        DropReason::BadIpChecksum,
        DropReason::BadTotalLength,
        DropReason::Fragment,
        DropReason::BadL4Header,
        DropReason::BadIcmpError,
        DropReason::NoService,
        DropReason::NoConn,
        DropReason::TableFull,
        DropReason::NoBackend,
        DropReason::NoNeighbor,
        DropReason::NotOurBucket,
        DropReason::TxFull,
        DropReason::OtherProto,
        DropReason::BadTcpFlags,
        DropReason::Shed,
        DropReason::ConnLimit,
        DropReason::RxRingFull,
        DropReason::StaleSyn,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::Truncated => "truncated",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::BadIpChecksum => "bad_ip_checksum",
            DropReason::BadTotalLength => "bad_total_length",
            DropReason::Fragment => "fragment",
            DropReason::BadL4Header => "bad_l4_header",
            DropReason::BadIcmpError => "bad_icmp_error",
            DropReason::NoService => "no_service",
            DropReason::NoConn => "no_conn",
            DropReason::TableFull => "table_full",
            DropReason::NoBackend => "no_backend",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::NotOurBucket => "not_our_bucket",
            DropReason::TxFull => "tx_full",
            DropReason::OtherProto => "other_proto",
            DropReason::BadTcpFlags => "bad_tcp_flags",
            DropReason::Shed => "shed",
            DropReason::ConnLimit => "conn_limit",
            DropReason::RxRingFull => "rx_ring_full",
            DropReason::StaleSyn => "stale_syn",
        }
    }

    /// Index into the drop counter array (its position in [`Self::ALL`]).
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    pub fn from_name(name: &str) -> Option<DropReason> {
        Self::ALL.iter().copied().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The node's network devices, for frame totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Nic {
    Front,
    Back,
    /// The TUN device of locally served flows.
    Tun,
}

impl Nic {
    pub const ALL: [Nic; 3] = [Nic::Front, Nic::Back, Nic::Tun];

    pub const fn as_str(self) -> &'static str {
        match self {
            Nic::Front => "front",
            Nic::Back => "back",
            Nic::Tun => "tun",
        }
    }

    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Whether a connection counts as active (TCP established, like IPVS
/// ActiveConn) or inactive (any other TCP state, and UDP, like InActConn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnGauge {
    Active,
    Inactive,
}

/// The traffic counters kept for each service and each backend.
#[derive(Debug, Default)]
pub struct Counters {
    /// Gauge: connections in an active state now.
    pub conns_active: AtomicU64,
    /// Gauge: connections in another state now.
    pub conns_inactive: AtomicU64,
    /// Connections scheduled since start.
    pub conns_total: AtomicU64,
    /// Client -> backend direction.
    pub pkts_in: AtomicU64,
    /// Replies (backend -> client) that went through the node.
    pub pkts_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Counters {
    #[inline]
    fn gauge(&self, g: ConnGauge) -> &AtomicU64 {
        match g {
            ConnGauge::Active => &self.conns_active,
            ConnGauge::Inactive => &self.conns_inactive,
        }
    }

    #[inline]
    fn conn_new(&self, g: ConnGauge) {
        self.conns_total.fetch_add(1, Relaxed);
        self.gauge(g).fetch_add(1, Relaxed);
    }

    #[inline]
    fn conn_moved(&self, from: ConnGauge, to: ConnGauge) {
        if from != to {
            dec(self.gauge(from));
            self.gauge(to).fetch_add(1, Relaxed);
        }
    }

    #[inline]
    fn conn_gone(&self, g: ConnGauge) {
        dec(self.gauge(g));
    }

    #[inline]
    fn record_in(&self, bytes: u64) {
        self.pkts_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes, Relaxed);
    }

    #[inline]
    fn record_out(&self, bytes: u64) {
        self.pkts_out.fetch_add(1, Relaxed);
        self.bytes_out.fetch_add(bytes, Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            conns_active: self.conns_active.load(Relaxed),
            conns_inactive: self.conns_inactive.load(Relaxed),
            conns_total: self.conns_total.load(Relaxed),
            pkts_in: self.pkts_in.load(Relaxed),
            pkts_out: self.pkts_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }
}

/// Decrements a gauge, saturating at zero: a bookkeeping slip in the
/// dataplane must show as a wrong gauge, not as 2^64-1 connections.
#[inline]
fn dec(gauge: &AtomicU64) {
    let _ = gauge.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
}

/// Per-backend counters and what `status` shows about the backend.
#[derive(Debug)]
pub struct BackendStats {
    pub counters: Counters,
    /// The weight in use: the config's, later changed by feedback, reload
    /// or `balancer drain` (0). The dataplane reads it on its housekeeping
    /// tick.
    pub weight: AtomicU32,
    /// Health as the checker last published it (up when unchecked).
    pub health: BackendHealth,
    /// The weight in the config, which `balancer undrain` restores.
    configured_weight: u32,
    name: String,
    address: Option<Ipv4Addr>,
    port: u16,
    forward: Forward,
}

/// Per-service counters, its backends, and service-level events.
#[derive(Debug)]
pub struct ServiceStats {
    /// Sum over the service's backends, kept separately so that it needs
    /// no summing at snapshot time and survives backend removal.
    pub counters: Counters,
    /// New flows refused because no backend was available.
    pub no_backend: AtomicU64,
    /// New flows refused because the connection table was full.
    pub conn_table_full: AtomicU64,
    /// New flows refused by load shedding.
    pub shed: AtomicU64,
    /// New flows refused at the service's `max_conns`.
    pub conn_limit: AtomicU64,
    /// TCP resets the dataplane sent for refused or reset flows.
    pub resets_sent: AtomicU64,
    /// Gauge: live persistence entries (published about once a second).
    pub persistent: AtomicU64,
    backends: Box<[BackendStats]>,
    name: String,
    vip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    scheduler: &'static str,
}

impl ServiceStats {
    #[inline]
    pub fn backend(&self, i: usize) -> &BackendStats {
        &self.backends[i]
    }

    pub fn backends(&self) -> &[BackendStats] {
        &self.backends
    }
}

/// Frame totals of one device.
#[derive(Debug, Default)]
pub struct NicStats {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
}

/// All of the node's counters. Share as `Arc<Stats>`.
#[derive(Debug)]
pub struct Stats {
    services: Box<[ServiceStats]>,
    drops: [AtomicU64; DropReason::COUNT],
    nics: [NicStats; 3],
    nic_names: [String; 3],
    /// ARP replies for the VIPs sent by the dataplane.
    pub arp_replies: AtomicU64,
    /// Director mode: client frames the MAC holder passed to the node
    /// owning their flow.
    pub passed: AtomicU64,
    /// Cluster mode: what this node knows of the cluster (published by the
    /// control plane on every change).
    pub cluster: arc_swap::ArcSwapOption<ClusterStatus>,
    /// Bumped after a backend's weight or health changes, so the
    /// dataplane takes the change on its next poll round (one atomic load
    /// per round) instead of its housekeeping tick.
    backends_version: AtomicU64,
    node: String,
}

/// The cluster as one node sees it, for `balancer status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub node_id: u32,
    /// This node answers ARP for the VIPs (VRRP master of the front instance).
    pub mac_holder: bool,
    /// Live members.
    pub live: Vec<u32>,
    /// Buckets owned per node id (every bucket of the table).
    pub buckets: Vec<(u32, u32)>,
    /// Buckets with no owner.
    pub unowned: u32,
    /// Changes of the view since start.
    pub version: u64,
}

impl Stats {
    /// Zeroed counters shaped like `config`: one entry per service and
    /// backend, in config order.
    pub fn new(config: &Config) -> Stats {
        let services = config
            .services
            .iter()
            .map(|s| ServiceStats {
                counters: Counters::default(),
                no_backend: AtomicU64::new(0),
                conn_table_full: AtomicU64::new(0),
                shed: AtomicU64::new(0),
                conn_limit: AtomicU64::new(0),
                resets_sent: AtomicU64::new(0),
                persistent: AtomicU64::new(0),
                backends: s
                    .backends
                    .iter()
                    .map(|b| BackendStats {
                        counters: Counters::default(),
                        weight: AtomicU32::new(u32::from(b.weight)),
                        health: BackendHealth::default(),
                        configured_weight: u32::from(b.weight),
                        name: b.name.clone(),
                        address: b.address,
                        port: b.port,
                        forward: b.forward,
                    })
                    .collect(),
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                scheduler: s.scheduler.as_str(),
            })
            .collect();
        Stats {
            services,
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            nics: std::array::from_fn(|_| NicStats::default()),
            nic_names: [
                config.node.front.clone(),
                config.node.back.clone(),
                config.node.local_tun.clone(),
            ],
            arp_replies: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            cluster: arc_swap::ArcSwapOption::empty(),
            backends_version: AtomicU64::new(0),
            node: config.node.name.clone(),
        }
    }

    /// Service `i` in config order. Panics if out of range (the dataplane
    /// only holds indices it got from the same config).
    #[inline]
    pub fn service(&self, i: usize) -> &ServiceStats {
        &self.services[i]
    }

    pub fn services(&self) -> &[ServiceStats] {
        &self.services
    }

    #[inline]
    pub fn nic(&self, nic: Nic) -> &NicStats {
        &self.nics[nic.index()]
    }

    #[inline]
    pub fn drop_counter(&self, reason: DropReason) -> &AtomicU64 {
        &self.drops[reason.index()]
    }

    /// A frame was dropped for `reason`.
    #[inline]
    pub fn record_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Relaxed);
    }

    /// A client -> backend packet of `bytes` (IP length) was forwarded.
    #[inline]
    pub fn record_in(&self, svc: usize, be: usize, bytes: u64) {
        let s = &self.services[svc];
        s.counters.record_in(bytes);
        s.backends[be].counters.record_in(bytes);
    }

    /// A reply packet of `bytes` was forwarded back to the client.
    #[inline]
    pub fn record_out(&self, svc: usize, be: usize, bytes: u64) {
        let s = &self.services[svc];
        s.counters.record_out(bytes);
        s.backends[be].counters.record_out(bytes);
    }

    /// A new connection was scheduled to backend `be`.
    #[inline]
    pub fn conn_new(&self, svc: usize, be: usize, gauge: ConnGauge) {
        let s = &self.services[svc];
        s.counters.conn_new(gauge);
        s.backends[be].counters.conn_new(gauge);
    }

    /// A connection moved between active and inactive (no-op if equal).
    #[inline]
    pub fn conn_moved(&self, svc: usize, be: usize, from: ConnGauge, to: ConnGauge) {
        let s = &self.services[svc];
        s.counters.conn_moved(from, to);
        s.backends[be].counters.conn_moved(from, to);
    }

    /// A connection left the table (expired or closed).
    #[inline]
    pub fn conn_gone(&self, svc: usize, be: usize, gauge: ConnGauge) {
        let s = &self.services[svc];
        s.counters.conn_gone(gauge);
        s.backends[be].counters.conn_gone(gauge);
    }

    /// A new flow for service `svc` found no backend: bumps the service's
    /// `no_backend` and the `no_backend` drop reason.
    #[inline]
    pub fn record_no_backend(&self, svc: usize) {
        self.services[svc].no_backend.fetch_add(1, Relaxed);
        self.record_drop(DropReason::NoBackend);
    }

    /// A new flow for service `svc` was refused by shedding.
    #[inline]
    pub fn record_shed(&self, svc: usize) {
        self.services[svc].shed.fetch_add(1, Relaxed);
        self.record_drop(DropReason::Shed);
    }

    /// A new flow for service `svc` was refused at its connection limit.
    #[inline]
    pub fn record_conn_limit(&self, svc: usize) {
        self.services[svc].conn_limit.fetch_add(1, Relaxed);
        self.record_drop(DropReason::ConnLimit);
    }

    /// A TCP reset was sent for a flow of service `svc`.
    #[inline]
    pub fn record_reset(&self, svc: usize) {
        self.services[svc].resets_sent.fetch_add(1, Relaxed);
    }

    /// A new flow for service `svc` found the connection table full: bumps
    /// the service's `conn_table_full` and the `table_full` drop reason.
    #[inline]
    pub fn record_table_full(&self, svc: usize) {
        self.services[svc].conn_table_full.fetch_add(1, Relaxed);
        self.record_drop(DropReason::TableFull);
    }

    /// `balancer drain` (`drain = true`: weight 0, no new flows, existing
    /// ones finish) or `undrain` (the configured weight again) of the
    /// backends named `backend`, in `service` or in every service. Returns
    /// the `service/backend` names changed; empty if none matched.
    pub fn drain(&self, service: Option<&str>, backend: &str, drain: bool) -> Vec<String> {
        let mut changed = Vec::new();
        for s in self.services.iter() {
            if service.is_some_and(|n| n != s.name) {
                continue;
            }
            for b in s.backends.iter().filter(|b| b.name == backend) {
                let w = if drain { 0 } else { b.configured_weight };
                b.weight.store(w, Relaxed);
                changed.push(format!("{}/{}", s.name, b.name));
            }
        }
        self.backends_changed();
        changed
    }

    /// Says that a backend's weight or health was written (after the
    /// write: the release pairs with [`Stats::backends_version`]'s acquire).
    pub fn backends_changed(&self) {
        self.backends_version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes of backend weights and health so far.
    pub fn backends_version(&self) -> u64 {
        self.backends_version
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The control-socket payload: every counter with the names and
    /// settings needed to print it.
    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            node: self.node.clone(),
            services: self
                .services
                .iter()
                .map(|s| ServiceSnapshot {
                    name: s.name.clone(),
                    vip: s.vip,
                    port: s.port,
                    protocol: s.protocol,
                    scheduler: s.scheduler.to_owned(),
                    counters: s.counters.snapshot(),
                    no_backend: s.no_backend.load(Relaxed),
                    conn_table_full: s.conn_table_full.load(Relaxed),
                    shed: s.shed.load(Relaxed),
                    conn_limit: s.conn_limit.load(Relaxed),
                    resets_sent: s.resets_sent.load(Relaxed),
                    persistent: s.persistent.load(Relaxed),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendSnapshot {
                            name: b.name.clone(),
                            address: b.address,
                            port: b.port,
                            weight: b.weight.load(Relaxed),
                            forward: b.forward,
                            up: b.health.is_up(),
                            rtt_us: b.health.rtt_us(),
                            counters: b.counters.snapshot(),
                        })
                        .collect(),
                })
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|r| DropCount {
                    reason: r.as_str().to_owned(),
                    count: self.drops[r.index()].load(Relaxed),
                })
                .collect(),
            nics: Nic::ALL
                .iter()
                .map(|n| NicSnapshot {
                    role: n.as_str().to_owned(),
                    name: self.nic_names[n.index()].clone(),
                    rx_frames: self.nics[n.index()].rx_frames.load(Relaxed),
                    tx_frames: self.nics[n.index()].tx_frames.load(Relaxed),
                })
                .collect(),
            arp_replies: self.arp_replies.load(Relaxed),
            passed: self.passed.load(Relaxed),
            cluster: self.cluster.load_full().map(|c| (*c).clone()),
            feedback: None,
        }
    }
}

impl StatusSnapshot {
    /// The text `balancer status` prints, laid out like
    /// `ipvsadm -Ln --stats` (plus the forward method, weight and
    /// connection gauges of `ipvsadm -Ln`): services and their backends,
    /// then drops by reason (only non-zero ones unless `all_drops`), then
    /// frame totals.
    pub fn render(&self, all_drops: bool) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = self.render_into(&mut out, all_drops);
        out
    }

    fn render_into(&self, out: &mut String, all_drops: bool) -> std::fmt::Result {
        use std::fmt::Write;
        fn counters(out: &mut String, c: &CounterSnapshot) -> std::fmt::Result {
            write!(
                out,
                " {:>10} {:>9} {:>10} {:>10} {:>10} {:>12} {:>12}",
                c.conns_active,
                c.conns_inactive,
                c.conns_total,
                c.pkts_in,
                c.pkts_out,
                c.bytes_in,
                c.bytes_out
            )
        }
        writeln!(out, "balancer node {}", self.node)?;
        writeln!(
            out,
            "{:<4} {:<24} {:<7} {:>6} {:>10} {:>9} {:>10} {:>10} {:>10} {:>12} {:>12}  Name",
            "Prot",
            "LocalAddress:Port Sched",
            "Forward",
            "Weight",
            "ActiveConn",
            "InActConn",
            "Conns",
            "InPkts",
            "OutPkts",
            "InBytes",
            "OutBytes"
        )?;
        writeln!(out, "  -> RemoteAddress:Port")?;
        for s in &self.services {
            let local = format!("{}:{} {}", s.vip, s.port, s.scheduler);
            write!(
                out,
                "{:<4} {:<24} {:<7} {:>6}",
                s.protocol.as_str().to_uppercase(),
                local,
                "",
                ""
            )?;
            counters(out, &s.counters)?;
            writeln!(out, "  {}", s.name)?;
            for b in &s.backends {
                let remote = match b.address {
                    Some(a) => format!("{a}:{}", b.port),
                    None => format!("local:{}", b.port),
                };
                write!(
                    out,
                    "  -> {:<24} {:<7} {:>6}",
                    remote,
                    b.forward.ipvs_name(),
                    b.weight
                )?;
                counters(out, &b.counters)?;
                write!(out, "  {}", b.name)?;
                if !b.up {
                    write!(out, " [down]")?;
                }
                if b.rtt_us != 0 {
                    write!(out, " rtt {:.1}ms", f64::from(b.rtt_us) / 1000.0)?;
                }
                writeln!(out)?;
            }
            if all_drops
                || s.no_backend != 0
                || s.conn_table_full != 0
                || s.shed != 0
                || s.conn_limit != 0
            {
                writeln!(
                    out,
                    "  refused new flows: no_backend {}, conn_table_full {}, shed {}, conn_limit {}; resets sent {}",
                    s.no_backend, s.conn_table_full, s.shed, s.conn_limit, s.resets_sent
                )?;
            }
            if s.persistent != 0 {
                writeln!(out, "  persistent clients: {}", s.persistent)?;
            }
        }
        writeln!(out)?;
        writeln!(out, "Drops{}", if all_drops { "" } else { " (non-zero)" })?;
        let shown: Vec<&DropCount> = self
            .drops
            .iter()
            .filter(|d| all_drops || d.count != 0)
            .collect();
        if shown.is_empty() {
            writeln!(out, "  none")?;
        }
        for d in shown {
            writeln!(out, "  {:<20} {:>12}", d.reason, d.count)?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "Frames       {:<16} {:>12} {:>12}",
            "Device", "Received", "Sent"
        )?;
        for n in &self.nics {
            writeln!(
                out,
                "  {:<10} {:<16} {:>12} {:>12}",
                n.role, n.name, n.rx_frames, n.tx_frames
            )?;
        }
        writeln!(out, "ARP replies sent: {}", self.arp_replies)?;
        if let Some(c) = &self.cluster {
            let buckets: Vec<String> = c
                .buckets
                .iter()
                .map(|(id, n)| format!("{id}:{n}"))
                .collect();
            writeln!(
                out,
                "Cluster: node {}, MAC holder {}, live {:?}, buckets {} (unowned {}), view {}",
                c.node_id,
                if c.mac_holder { "yes" } else { "no" },
                c.live,
                buckets.join(" "),
                c.unowned,
                c.version
            )?;
        }
        if let Some(f) = &self.feedback {
            f.render_into(out)?;
        }
        Ok(())
    }
}

/// The counters of a service or backend at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub conns_active: u64,
    pub conns_inactive: u64,
    pub conns_total: u64,
    pub pkts_in: u64,
    pub pkts_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What `balancer status` receives. Names are strings where a newer server
/// may send values an older client does not know (scheduler, drop reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub node: String,
    pub services: Vec<ServiceSnapshot>,
    /// Every drop reason, zero or not, in [`DropReason::ALL`] order.
    pub drops: Vec<DropCount>,
    pub nics: Vec<NicSnapshot>,
    pub arp_replies: u64,
    /// Director mode: frames passed to the owning node.
    #[serde(default)]
    pub passed: u64,
    /// Cluster mode: members, bucket owners, MAC holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// With `[feedback]`: agents, their health and levels, refused
    /// messages, autoscale decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<crate::feedback::master::FeedbackSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: String,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    pub no_backend: u64,
    pub conn_table_full: u64,
    #[serde(default)]
    pub shed: u64,
    #[serde(default)]
    pub conn_limit: u64,
    #[serde(default)]
    pub resets_sent: u64,
    /// Live persistence entries.
    #[serde(default)]
    pub persistent: u64,
    pub backends: Vec<BackendSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSnapshot {
    pub name: String,
    /// `None` for the local backend.
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub weight: u32,
    pub forward: Forward,
    /// Health checks pass (true when none are configured).
    #[serde(default = "yes")]
    pub up: bool,
    /// Health-check RTT average in microseconds; 0 = not measured.
    #[serde(default)]
    pub rtt_us: u32,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub reason: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSnapshot {
    /// `front`, `back` or `tun`.
    pub role: String,
    /// The device name from the config.
    pub name: String,
    pub rx_frames: u64,
    pub tx_frames: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[node]
name = "lb1"
front = "front0"
back = "back0"
back_gateway = "198.19.0.1/24"

[[service]]
name = "web"
vip = "198.18.0.100"
port = 80
scheduler = "wrr"

[[service.backend]]
address = "198.19.0.21"
port = 8080
weight = 3
forward = "nat"

[[service.backend]]
forward = "local"

[[service]]
name = "dns"
vip = "198.18.0.100"
port = 53
protocol = "udp"

[[service.backend]]
address = "198.19.0.22"
forward = "dr"
"#;

    fn stats() -> Stats {
        Stats::new(&Config::parse(CONFIG, "test.toml").expect("test config is valid"))
    }

    #[test]
    fn drop_reason_index_matches_position_in_all() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
            assert_eq!(DropReason::from_name(r.as_str()), Some(*r));
        }
        let mut names: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT, "names are unique");
    }

    #[test]
    fn stats_are_shaped_like_the_config() {
        let s = stats();
        assert_eq!(s.services().len(), 2);
        assert_eq!(s.service(0).backends().len(), 2);
        assert_eq!(s.service(1).backends().len(), 1);
        let snap = s.snapshot();
        assert_eq!(snap.node, "lb1");
        assert_eq!(snap.services[0].backends[0].name, "198.19.0.21:8080");
        assert_eq!(snap.services[0].backends[0].weight, 3);
        assert_eq!(snap.services[0].backends[1].name, "local");
        assert_eq!(snap.services[0].backends[1].address, None);
        assert_eq!(snap.services[1].protocol, Protocol::Udp);
        assert_eq!(snap.services[1].scheduler, "wrr");
        assert_eq!(snap.drops.len(), DropReason::COUNT);
        assert_eq!(snap.nics[2].name, "lbtun0");
    }

    #[test]
    fn packets_count_on_service_and_backend() {
        let s = stats();
        s.record_in(0, 1, 60);
        s.record_in(0, 1, 1500);
        s.record_out(0, 1, 40);
        s.record_in(0, 0, 100);
        let snap = s.snapshot();
        let svc = &snap.services[0];
        assert_eq!((svc.counters.pkts_in, svc.counters.bytes_in), (3, 1660));
        assert_eq!((svc.counters.pkts_out, svc.counters.bytes_out), (1, 40));
        assert_eq!(svc.backends[1].counters.pkts_in, 2);
        assert_eq!(svc.backends[0].counters.bytes_in, 100);
        assert_eq!(snap.services[1].counters, CounterSnapshot::default());
    }

    #[test]
    fn connection_gauges_follow_state_changes_and_never_underflow() {
        let s = stats();
        s.conn_new(1, 0, ConnGauge::Inactive);
        s.conn_moved(1, 0, ConnGauge::Inactive, ConnGauge::Active);
        s.conn_new(1, 0, ConnGauge::Inactive);
        let c = s.snapshot().services[1].backends[0].counters;
        assert_eq!((c.conns_active, c.conns_inactive, c.conns_total), (1, 1, 2));
        s.conn_gone(1, 0, ConnGauge::Active);
        s.conn_gone(1, 0, ConnGauge::Active);
        let c = s.snapshot().services[1].counters;
        assert_eq!((c.conns_active, c.conns_inactive, c.conns_total), (0, 1, 2));
    }

    #[test]
    fn no_backend_and_table_full_count_on_service_and_as_drops() {
        let s = stats();
        s.record_no_backend(1);
        s.record_table_full(0);
        s.record_table_full(0);
        s.record_drop(DropReason::Runt);
        s.nic(Nic::Front).rx_frames.fetch_add(4, Relaxed);
        let snap = s.snapshot();
        assert_eq!(snap.services[1].no_backend, 1);
        assert_eq!(snap.services[0].conn_table_full, 2);
        let drop = |name: &str| {
            snap.drops
                .iter()
                .find(|d| d.reason == name)
                .map(|d| d.count)
        };
        assert_eq!(drop("no_backend"), Some(1));
        assert_eq!(drop("table_full"), Some(2));
        assert_eq!(drop("runt"), Some(1));
        assert_eq!(drop("fragment"), Some(0));
        assert_eq!(snap.nics[0].rx_frames, 4);
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let s = stats();
        s.record_in(0, 0, 10);
        let snap = s.snapshot();
        let text = serde_json::to_string(&snap).expect("serializes");
        let back: StatusSnapshot = serde_json::from_str(&text).expect("deserializes");
        assert_eq!(back, snap);
    }
}
