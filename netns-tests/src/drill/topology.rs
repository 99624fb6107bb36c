//! The standard drill topology (DESIGN.md §7), built on the harness's
//! cluster bed ([`crate::cluster::ClusterBed`]) so that ours runs exactly as
//! the cluster tests run it:
//!
//! ```text
//!  client 198.18.0.2-.5 ──┐                               ┌── rs1 198.19.0.21
//!                         ├─ br-front ─ lbK ─ br-back ────┼── rs2 198.19.0.22
//!                         │  (front0 .1K)   (back0 .1K)   ├── rs3 198.19.0.23
//!                         │                               └── rs4 198.19.0.24
//! ```
//!
//! Real servers run `testsrv` on port 8080; server i belongs to the
//! sub-cluster of node `i % nodes + 1` and routes through its back gateway
//! 198.19.0.K (ours moves it with failures; the keepalived baseline
//! masquerades instead, so it needs none). Bridges live in the testbed's
//! `sw` namespace. A drill builds a fresh `Cluster` (nothing carried over
//! from the previous drill: no ARP entries, no conntrack) and the testbed
//! removes everything on drop.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::cluster::ClusterBed;
use crate::topo::{Host, Proc, Testbed, wait_until};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP_PORT: u16 = 80;
pub const RS_PORT: u16 = 8080;
/// Client addresses on the front segment; the load generator spreads its
/// connections over them (more distinct flows, no port exhaustion). The
/// first is the cluster bed's own client address.
pub const CLIENTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 2),
    Ipv4Addr::new(198, 18, 0, 3),
    Ipv4Addr::new(198, 18, 0, 4),
    Ipv4Addr::new(198, 18, 0, 5),
];

pub use crate::cluster::rs_addr;

pub fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

/// The namespaces of one drill.
pub struct Cluster {
    /// Declared first: dropped (processes killed) before the testbed.
    pub servers: Vec<Proc>,
    pub client: Host,
    pub nodes: Vec<Host>,
    pub rs: Vec<Host>,
    pub bed: ClusterBed,
}

impl Cluster {
    /// Builds the topology with `nodes` balancer nodes and `real_servers`
    /// real servers (`advert`: the heartbeat interval ours is configured
    /// with, `100ms`), and starts `testsrv` on every real server.
    pub fn new(tag: &str, nodes: usize, real_servers: usize, advert: &str) -> Result<Cluster> {
        let bed = ClusterBed::new(tag, nodes, real_servers, advert)?;
        let client = bed.client.clone();
        for a in &CLIENTS[1..] {
            client.run(&["ip", "addr", "add", &format!("{a}/24"), "dev", "front0"])?;
        }
        // Many short connections: the widest port range.
        client.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        let servers = bed.start_servers(RS_PORT)?;
        Ok(Cluster {
            servers,
            client,
            nodes: bed.nodes.clone(),
            rs: bed.rs.clone(),
            bed,
        })
    }

    pub fn tb(&self) -> &Testbed {
        &self.bed.tb
    }

    /// Partitions the nodes from each other but not from the client or the
    /// real servers: their bridge ports become *isolated* (an isolated port
    /// talks only to non-isolated ports, [`Testbed::isolate`]), on both
    /// segments. Nothing else changes: no carrier loss, ARP and service
    /// traffic flow as before, but VRRP adverts, membership heartbeats and
    /// connection sync between nodes are lost.
    pub fn partition(&self, on: bool) -> Result<()> {
        for h in &self.nodes {
            for ifname in ["front0", "back0"] {
                self.tb().isolate(h, ifname, on)?;
            }
        }
        Ok(())
    }
}

/// Waits until something listens on TCP `port` in `host`.
pub fn wait_listening(host: &Host, port: u16) -> Result<()> {
    let pat = format!(":{port} ");
    if wait_until(Duration::from_secs(5), &mut || {
        host.run(&["ss", "-Hltn"])
            .map(|s| s.contains(&pat))
            .unwrap_or(false)
    }) {
        Ok(())
    } else {
        bail!("nothing listens on port {port} in {}", host.ns())
    }
}

/// True when `host` holds `addr` on `ifname`.
pub fn has_addr(host: &Host, ifname: &str, addr: Ipv4Addr) -> bool {
    host.run(&["ip", "-4", "-o", "addr", "show", "dev", ifname])
        .map(|s| s.contains(&format!("inet {addr}/")))
        .unwrap_or(false)
}

/// `n` requests from the client namespace, spread over every client
/// address; Ok when all were answered.
pub fn probe_all(client: &Host, n: usize, timeout: Duration) -> Result<()> {
    let failed = client.in_ns(move || {
        (0..n)
            .filter_map(|k| {
                let src = CLIENTS[k % CLIENTS.len()];
                crate::drill::load::one_request(src, vip(), timeout)
                    .err()
                    .map(|e| format!("{src}: {}", e.name()))
            })
            .collect::<Vec<_>>()
    })?;
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {n} probes failed: {}",
            failed.len(),
            failed.join(", ")
        )
    }
}
