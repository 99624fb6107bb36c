//! The single-node topology of the dataplane tests, the demo and the bench:
//!
//! ```text
//!  client 198.18.0.2 ──┐                       ┌── rs1 198.19.0.21
//!                      ├─ br-front ─ lb ─ br-back ┼── rs2 198.19.0.22
//!  rtr 198.18.0.254 ───┘  (front0 .11) (back0 .11,  └── rs3 198.19.0.23
//!   └── 198.19.0.254 ─── br-back        gateway .1)
//! ```
//!
//! The node `lb` has two NICs. NAT real servers route through the node's
//! back gateway address (198.19.0.1, added by the balancer); DR real servers
//! hold the VIP on `lo` (arp_ignore=1, arp_announce=2) and route through
//! `rtr`, so their replies reach the client without passing the node.
//!
//! Host-side veths have TSO/GSO off: a real wire never carries frames
//! larger than the MTU. Transmit checksum offload stays on unless
//! `checksum_offload` is false, so frames reach the node with partial
//! checksums, as they do from veth peers.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::topo::{Host, Proc, Testbed, wait_until, workspace_bin};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LB_FRONT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
pub const LB_BACK: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const RTR_FRONT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const RTR_BACK: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);

/// Address of real server `i` (0-based): 198.19.0.21, .22, ...
pub fn rs_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 21 + i as u8)
}

#[derive(Clone, Debug)]
pub struct Options {
    pub real_servers: usize,
    /// Indices of real servers set up for direct routing.
    pub dr: Vec<usize>,
    pub checksum_offload: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            real_servers: 3,
            dr: Vec::new(),
            checksum_offload: true,
        }
    }
}

pub struct SingleNode {
    pub tb: Testbed,
    pub client: Host,
    pub lb: Host,
    pub rtr: Host,
    pub rs: Vec<Host>,
}

fn wire_like(h: &Host, ifname: &str, offload: bool) -> Result<()> {
    h.run(&[
        "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
    ])?;
    if !offload {
        h.run(&["ethtool", "-K", ifname, "tx", "off"])?;
    }
    Ok(())
}

impl SingleNode {
    pub fn new(tag: &str, opts: &Options) -> Result<SingleNode> {
        let tb = Testbed::new(tag)?;
        let front = tb.bridge("front")?;
        let back = tb.bridge("back")?;
        let client = tb.host("client")?;
        tb.link(&client, "front0", &front, &[&format!("{CLIENT}/24")])?;
        wire_like(&client, "front0", opts.checksum_offload)?;
        let rtr = tb.host("rtr")?;
        tb.link(&rtr, "front0", &front, &[&format!("{RTR_FRONT}/24")])?;
        tb.link(&rtr, "back0", &back, &[&format!("{RTR_BACK}/24")])?;
        rtr.sysctl("net.ipv4.ip_forward", "1")?;
        for i in ["front0", "back0"] {
            wire_like(&rtr, i, opts.checksum_offload)?;
        }
        let lb = tb.host("lb")?;
        tb.link(&lb, "front0", &front, &[&format!("{LB_FRONT}/24")])?;
        tb.link(&lb, "back0", &back, &[&format!("{LB_BACK}/24")])?;
        for i in ["front0", "back0"] {
            wire_like(&lb, i, opts.checksum_offload)?;
        }
        let mut rs = Vec::new();
        for i in 0..opts.real_servers {
            let h = tb.host(&format!("rs{}", i + 1))?;
            tb.link(&h, "eth0", &back, &[&format!("{}/24", rs_addr(i))])?;
            wire_like(&h, "eth0", opts.checksum_offload)?;
            // Servers in tests must not reject a reused client port (BENCH.md: TIME_WAIT trap).
            h.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
            if opts.dr.contains(&i) {
                make_dr(&h)?;
            } else {
                h.run(&["ip", "route", "add", "default", "via", &GATEWAY.to_string()])?;
            }
            rs.push(h);
        }
        Ok(SingleNode {
            tb,
            client,
            lb,
            rtr,
            rs,
        })
    }

    pub fn dir(&self) -> &Path {
        self.tb.dir()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir().join("lb.sock")
    }

    /// Writes the node's config: the `[node]` table of this topology followed
    /// by `services` (TOML `[[service]]` tables). Returns its path.
    pub fn write_config(&self, services: &str) -> Result<PathBuf> {
        let path = self.dir().join("lb.toml");
        let text = format!(
            "[node]\nname = \"lb\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"{GATEWAY}/24\"\n\
             local_tun = \"lbtun0\"\ncontrol_socket = \"{}\"\n\n{services}",
            self.control_socket().display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts `testsrv` on every real server (TCP and UDP on `port`, plus
    /// TCP on `extra_tcp`), named rs1, rs2, ..., and waits until they listen.
    pub fn start_servers(&self, port: u16, extra_tcp: &[u16]) -> Result<Vec<Proc>> {
        let bin = workspace_bin("testsrv")?;
        let mut procs = Vec::new();
        for (i, h) in self.rs.iter().enumerate() {
            let name = format!("rs{}", i + 1);
            let mut argv = vec![
                bin.to_string_lossy().into_owned(),
                "--name".into(),
                name.clone(),
                "--tcp".into(),
                format!("0.0.0.0:{port}"),
                "--udp".into(),
                format!("0.0.0.0:{port}"),
            ];
            for p in extra_tcp {
                argv.push("--tcp".into());
                argv.push(format!("0.0.0.0:{p}"));
            }
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            procs.push(h.spawn_logged(&args, Some(&self.dir().join(format!("{name}.log"))))?);
            wait_listening(h, port)?;
        }
        Ok(procs)
    }

    /// Starts the node's own local service (`testsrv --name lb`) on `port`.
    pub fn start_local_service(&self, port: u16) -> Result<Proc> {
        let bin = workspace_bin("testsrv")?;
        let b = bin.to_string_lossy();
        let tcp = format!("0.0.0.0:{port}");
        let p = self.lb.spawn_logged(
            &[&b, "--name", "lb", "--tcp", &tcp, "--udp", &tcp],
            Some(&self.dir().join("lb-local.log")),
        )?;
        wait_listening(&self.lb, port)?;
        Ok(p)
    }

    /// Starts `balancer run -c config` on the node and waits for its control
    /// socket. `RUST_LOG` is passed through.
    pub fn start_balancer(&self, config: &Path) -> Result<Proc> {
        let bin = workspace_bin("balancer")?;
        let sock = self.control_socket();
        let _ = std::fs::remove_file(&sock);
        let mut p = self.lb.spawn_logged(
            &[
                &bin.to_string_lossy(),
                "run",
                "-c",
                &config.to_string_lossy(),
            ],
            Some(&self.dir().join("balancer.log")),
        )?;
        if !wait_until(Duration::from_secs(10), &mut || sock.exists()) {
            let log = std::fs::read_to_string(self.dir().join("balancer.log")).unwrap_or_default();
            p.kill();
            bail!("balancer did not come up:\n{log}");
        }
        Ok(p)
    }

    /// `balancer status --json` on the node, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let bin = workspace_bin("balancer")?;
        let out = self.lb.run(&[
            &bin.to_string_lossy(),
            "status",
            "--json",
            "-s",
            &self.control_socket().to_string_lossy(),
        ])?;
        serde_json::from_str(&out).context("status output is not JSON")
    }

    pub fn vip(port: u16) -> SocketAddr {
        SocketAddr::from((VIP, port))
    }
}

/// Sets a real server up for direct routing: the VIP on `lo` (never
/// answered by ARP) and its default route through the router `rtr`, so
/// replies reach the client without passing a balancer.
pub fn make_dr(h: &Host) -> Result<()> {
    h.run(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    h.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
    h.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    h.run(&[
        "ip",
        "route",
        "replace",
        "default",
        "via",
        &RTR_BACK.to_string(),
    ])?;
    Ok(())
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

/// Services of the single-node tests and the demo: `web` TCP 80 by weight
/// over the node's local service (1), rs1 and rs2 by NAT (1 and 2), and
/// `web-dr` TCP 81 by DR to rs3.
pub const MIXED_SERVICES: &str = r#"
[[service]]
name = "web"
vip = "198.18.0.100"
port = 80
protocol = "tcp"
scheduler = "wrr"

[[service.backend]]
name = "local"
forward = "local"
weight = 1

[[service.backend]]
name = "rs1"
address = "198.19.0.21"
port = 8080
weight = 1
forward = "nat"

[[service.backend]]
name = "rs2"
address = "198.19.0.22"
port = 8080
weight = 2
forward = "nat"

[[service]]
name = "web-dr"
vip = "198.18.0.100"
port = 81
protocol = "tcp"
scheduler = "rr"

[[service.backend]]
name = "rs3"
address = "198.19.0.23"
forward = "dr"
"#;
