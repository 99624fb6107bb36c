//! The standard drill topology (DESIGN.md §7):
//!
//! ```text
//!  client 198.18.0.2-.5 ──┐                                  ┌── rs1 198.19.0.21
//!                         ├─ br-front ─ lb1 ─┬─ br-back ─────┼── rs2 198.19.0.22
//!                         │   (.11 .12 .13)  lb2             ├── rs3 198.19.0.23
//!                         └──────────────── (lb3) ┘          └── rs4 198.19.0.24
//! ```
//!
//! Every node `lbN` has `front0` (198.18.0.1N) and `back0` (198.19.0.1N).
//! Real servers run `testsrv` on port 8080 and route through the back
//! gateway 198.19.0.1 (held by whichever peer implements it; the keepalived
//! baseline masquerades instead, so it needs none). Bridges live in the
//! testbed's `sw` namespace. A drill builds a fresh `Cluster` (nothing
//! carried over from the previous drill: no ARP entries, no conntrack) and
//! the testbed removes everything on drop.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::topo::{Bridge, Host, Proc, Testbed, wait_until, workspace_bin};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP_PORT: u16 = 80;
pub const RS_PORT: u16 = 8080;
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Client addresses on the front segment; the load generator spreads its
/// connections over them (more distinct flows, no port exhaustion).
pub const CLIENTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 0, 2),
    Ipv4Addr::new(198, 18, 0, 3),
    Ipv4Addr::new(198, 18, 0, 4),
    Ipv4Addr::new(198, 18, 0, 5),
];

/// Front address of node `i` (0-based): 198.18.0.11, .12, .13.
pub fn node_front(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + i as u8)
}

/// Back address of node `i` (0-based): 198.19.0.11, .12, .13.
pub fn node_back(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 11 + i as u8)
}

/// Address of real server `i` (0-based): 198.19.0.21, ...
pub fn rs_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 21 + i as u8)
}

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
    pub front: Bridge,
    pub back: Bridge,
    pub tb: Testbed,
}

/// Frames as on a real wire: no segmentation offloads on the veths (transmit
/// checksum offload stays on, as between veth peers).
fn wire_like(h: &Host, ifname: &str) -> Result<()> {
    h.run(&[
        "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
    ])
    .map(|_| ())
}

impl Cluster {
    /// Builds the topology with `nodes` balancer nodes and `real_servers`
    /// real servers, and starts `testsrv` on every real server.
    pub fn new(tag: &str, nodes: usize, real_servers: usize) -> Result<Cluster> {
        let tb = Testbed::new(tag)?;
        let front = tb.bridge("front")?;
        let back = tb.bridge("back")?;
        let client = tb.host("client")?;
        let addrs: Vec<String> = CLIENTS.iter().map(|a| format!("{a}/24")).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        tb.link(&client, "front0", &front, &addrs)?;
        wire_like(&client, "front0")?;
        // Many short connections from few addresses: let ports be reused
        // as soon as the client side allows it.
        client.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        let mut lbs = Vec::new();
        for i in 0..nodes {
            let h = tb.host(&format!("lb{}", i + 1))?;
            tb.link(&h, "front0", &front, &[&format!("{}/24", node_front(i))])?;
            tb.link(&h, "back0", &back, &[&format!("{}/24", node_back(i))])?;
            for ifname in ["front0", "back0"] {
                wire_like(&h, ifname)?;
            }
            lbs.push(h);
        }
        let mut rs = Vec::new();
        for i in 0..real_servers {
            let h = tb.host(&format!("rs{}", i + 1))?;
            tb.link(&h, "eth0", &back, &[&format!("{}/24", rs_addr(i))])?;
            wire_like(&h, "eth0")?;
            // BENCH.md, TIME_WAIT trap: a reused client port must not be refused.
            h.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
            h.run(&["ip", "route", "add", "default", "via", &GATEWAY.to_string()])?;
            rs.push(h);
        }
        let mut c = Cluster {
            servers: Vec::new(),
            client,
            nodes: lbs,
            rs,
            front,
            back,
            tb,
        };
        c.start_servers()?;
        Ok(c)
    }

    fn start_servers(&mut self) -> Result<()> {
        let bin = workspace_bin("testsrv")?;
        let bin = bin.to_string_lossy().into_owned();
        let listen = format!("0.0.0.0:{RS_PORT}");
        for (i, h) in self.rs.iter().enumerate() {
            let name = format!("rs{}", i + 1);
            let log = self.tb.dir().join(format!("{name}.log"));
            let p = h.spawn_logged(&[&bin, "--name", &name, "--tcp", &listen], Some(&log))?;
            self.servers.push(p);
        }
        for h in &self.rs {
            wait_listening(h, RS_PORT)?;
        }
        Ok(())
    }

    /// The bridge ports of every node (front and back), for partitions.
    pub fn node_ports(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for h in &self.nodes {
            v.push(self.tb.port(h, "front0")?);
            v.push(self.tb.port(h, "back0")?);
        }
        Ok(v)
    }

    /// Partitions the nodes from each other but not from the client or the
    /// real servers: their bridge ports become *isolated* (an isolated port
    /// talks only to non-isolated ports), on both segments. Nothing else
    /// changes: no carrier loss, ARP and service traffic flow as before, but
    /// VRRP adverts, membership heartbeats and connection sync between nodes
    /// are lost.
    pub fn partition(&self, on: bool) -> Result<()> {
        let state = if on { "on" } else { "off" };
        for p in self.node_ports()? {
            self.tb
                .switch()
                .run(&["bridge", "link", "set", "dev", &p, "isolated", state])?;
        }
        Ok(())
    }

    /// Stops the real servers (before the testbed goes).
    pub fn stop_servers(&mut self) {
        self.servers.clear();
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

/// One HTTP request from the client namespace (any client address); Ok with
/// the `X-Server` name when it was answered.
pub fn probe(client: &Host, timeout: Duration) -> Result<String> {
    let r = client.in_ns(move || {
        crate::drill::load::one_request(CLIENTS[0], vip(), timeout)
    })?;
    r.map_err(|e| anyhow::anyhow!("probe failed: {e:?}"))
        .context("probe request to the VIP")
}
