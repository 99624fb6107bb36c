//! The cluster topology: a client on the front bridge, nodes `lb1..lbN`
//! (front0 + back0 each), and real servers on the back bridge, each in the
//! sub-cluster of one node (its default route is that node's back gateway,
//! a heartbeat instance that moves to a survivor when the node fails).
//!
//! ```text
//!  client 198.18.0.2 ─┐                 ┌─ rs1 198.19.0.21 (gw .1 = lb1's)
//!                     ├ br-front ─ lbK ─ br-back ┤
//!                     │  (front0 .1K,    back0 .1K)  └─ rs2 198.19.0.22 (gw .2 = lb2's)
//! ```
//!
//! VIP 198.18.0.100 on every node; cluster MAC 01:00:5e:7f:00:64; VRRP
//! front instance VRID 51 (lb1 highest), back gateway 198.19.0.K on VRID 60+K
//! (lbK highest for its own); membership and connection sync on front0.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::single::{CLIENT, RTR_BACK, RTR_FRONT, VIP, wait_listening};
use crate::topo::{Host, Proc, Testbed, wait_until, workspace_bin};

/// `[[service]]` `web`: TCP 80 on the VIP, wrr, over `backends` (each the
/// keys of one `[[service.backend]]` table).
pub fn web_service(backends: &[String]) -> String {
    let mut s = format!(
        "\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\nscheduler = \"wrr\"\n"
    );
    for b in backends {
        s += &format!("\n[[service.backend]]\n{b}");
    }
    s
}

/// The keys of real server `rs{k}` ([`rs_addr`]`(k - 1)`) in node `node`'s
/// sub-cluster, by `forward`, on `port` (none: the service's).
pub fn rs_backend(k: usize, port: Option<u16>, forward: &str, node: usize) -> String {
    let port = port.map(|p| format!("port = {p}\n")).unwrap_or_default();
    format!(
        "name = \"rs{k}\"\naddress = \"{}\"\n{port}forward = \"{forward}\"\nnode = {node}\n",
        rs_addr(k - 1)
    )
}

/// `web` over rs1 (node 1's sub-cluster) and rs2 (node 2's) by `forward`
/// (`"nat"`: to port 8080; `"dr"`).
pub fn sub_cluster_services(forward: &str) -> String {
    let port = (forward == "nat").then_some(8080);
    let backends: Vec<String> = (1..=2).map(|k| rs_backend(k, port, forward, k)).collect();
    web_service(&backends)
}

/// `web` by NAT over the two sub-clusters, the cluster tests' usual service.
pub fn nat_services() -> String {
    sub_cluster_services("nat")
}

pub const CLUSTER_MAC: &str = "01:00:5e:7f:00:64";
/// Director mode: the VRRP virtual MAC of the front instance (VRID 51).
pub const DIRECTOR_MAC: &str = "00:00:5e:00:01:33";
pub const KEY: &str = "drill-shared-key-0123456789abcdef";

pub fn node_front(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + k as u8)
}
pub fn node_back(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + k as u8)
}
/// Back gateway of node k's sub-cluster.
pub fn gateway(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, k as u8)
}
pub fn rs_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 21 + i as u8)
}

/// The heartbeat script every instance of a node tracks (weight 0: failing
/// faults the instance): the front router answers a ping on the front NIC.
/// A node whose front link is cut silently (carrier up) gives up its back
/// gateways then, so that the peer that took its buckets gets the replies
/// of the connections it continues, as keepalived operators track their
/// gateway with a `vrrp_script`.
pub fn front_check() -> String {
    format!(
        "\n[[script]]\nname = \"front_path\"\n\
         command = [\"ping\", \"-c\", \"1\", \"-W\", \"1\", \"-I\", \"front0\", \"{RTR_FRONT}\"]\n\
         interval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n"
    )
}

pub struct ClusterBed {
    pub tb: Testbed,
    pub client: Host,
    /// lb1.. (index 0 is node id 1).
    pub nodes: Vec<Host>,
    /// Real servers; server i belongs to node `i % nodes + 1`.
    pub rs: Vec<Host>,
    /// A router between the segments (front .254, back .254): the way
    /// back to the client for DR real servers (see [`ClusterBed::make_dr`]).
    pub rtr: Host,
    pub advert: String,
    /// Director mode instead of multicast mode (set before writing configs).
    pub director: bool,
}

fn wire_like(h: &Host, ifname: &str) -> Result<()> {
    h.run(&[
        "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
    ])
    .map(|_| ())
}

impl ClusterBed {
    pub fn new(tag: &str, nodes: usize, servers: usize, advert: &str) -> Result<ClusterBed> {
        let tb = Testbed::new(tag)?;
        let front = tb.bridge("front")?;
        let back = tb.bridge("back")?;
        let client = tb.host("client")?;
        tb.link(&client, "front0", &front, &[&format!("{CLIENT}/24")])?;
        wire_like(&client, "front0")?;
        let rtr = tb.host("rtr")?;
        tb.link(&rtr, "front0", &front, &[&format!("{RTR_FRONT}/24")])?;
        tb.link(&rtr, "back0", &back, &[&format!("{RTR_BACK}/24")])?;
        rtr.sysctl("net.ipv4.ip_forward", "1")?;
        wire_like(&rtr, "front0")?;
        wire_like(&rtr, "back0")?;
        let mut hosts = Vec::new();
        for k in 1..=nodes {
            let h = tb.host(&format!("lb{k}"))?;
            tb.link(&h, "front0", &front, &[&format!("{}/24", node_front(k))])?;
            tb.link(&h, "back0", &back, &[&format!("{}/24", node_back(k))])?;
            wire_like(&h, "front0")?;
            wire_like(&h, "back0")?;
            hosts.push(h);
        }
        let mut rs = Vec::new();
        for i in 0..servers {
            let h = tb.host(&format!("rs{}", i + 1))?;
            tb.link(&h, "eth0", &back, &[&format!("{}/24", rs_addr(i))])?;
            wire_like(&h, "eth0")?;
            h.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
            let owner = i % nodes + 1;
            h.run(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &gateway(owner).to_string(),
            ])?;
            rs.push(h);
        }
        Ok(ClusterBed {
            tb,
            client,
            nodes: hosts,
            rs,
            rtr,
            advert: advert.to_string(),
            director: false,
        })
    }

    pub fn dir(&self) -> &Path {
        self.tb.dir()
    }

    /// Sets real server `i` up for direct routing ([`crate::single::make_dr`]).
    pub fn make_dr(&self, i: usize) -> Result<()> {
        crate::single::make_dr(&self.rs[i])
    }

    pub fn socket(&self, k: usize) -> PathBuf {
        self.dir().join(format!("lb{k}.sock"))
    }

    /// Node k's heartbeat config: front instance (lb1 highest), one back
    /// gateway instance per node (its own highest), membership, and the
    /// front path check every instance tracks ([`front_check`]).
    /// `[cluster.gateways]`: each node's sub-cluster gateway.
    fn gateways_toml(&self) -> String {
        let mut t = String::from("\n[cluster.gateways]\n");
        for k in 1..=self.nodes.len() {
            t += &format!("\"{k}\" = \"{}\"\n", gateway(k));
        }
        t
    }

    fn mac(&self) -> &'static str {
        if self.director {
            DIRECTOR_MAC
        } else {
            CLUSTER_MAC
        }
    }

    fn heartbeat_toml(&self, k: usize) -> String {
        let n = self.nodes.len();
        let ids: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        let mut s = format!(
            "[node]\nid = {k}\nname = \"lb{k}\"\n\n[control]\nsocket = \"{}\"\n\n\
             [[instance]]\nname = \"front\"\ninterface = \"front0\"\nvrid = 51\npriority = {}\n\
             advert_interval = \"{}\"\npreempt = true\nvirtual_addresses = [\"{VIP}/32\"]\narp_mac = \"{}\"\n\
             garp = {{ repeat = 3, interval = \"10ms\" }}\ntrack_scripts = [\"front_path\"]\n",
            self.dir().join(format!("hb{k}.sock")).display(),
            250 - 50 * k,
            self.advert,
            self.mac()
        );
        for g in 1..=n {
            s += &format!(
                "\n[[instance]]\nname = \"gw{g}\"\ninterface = \"back0\"\nvrid = {}\npriority = {}\n\
                 advert_interval = \"{}\"\npreempt = true\nvirtual_addresses = [\"{}/24\"]\n\
                 track_scripts = [\"front_path\"]\n",
                60 + g,
                if g == k { 200 } else { 100 - k },
                self.advert,
                gateway(g)
            );
        }
        s += &front_check();
        s += &format!(
            "\n[membership]\ninterface = \"front0\"\ngroup = \"239.255.77.77\"\nport = 7788\nnodes = [{}]\n\
             interval = \"{}\"\nkey = \"{KEY}\"\n",
            ids.join(", "),
            self.advert
        );
        s
    }

    /// Writes node k's configs (node + heartbeat) with `services`.
    pub fn write_configs(&self, k: usize, services: &str) -> Result<PathBuf> {
        let hb = self.dir().join(format!("lb{k}-heartbeat.toml"));
        std::fs::write(&hb, self.heartbeat_toml(k))?;
        let path = self.dir().join(format!("lb{k}.toml"));
        let text = format!(
            "[node]\nname = \"lb{k}\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"{}/24\"\n\
             local_tun = \"lbtun0\"\ncontrol_socket = \"{}\"\n\n\
             [cluster]\nheartbeat = \"lb{k}-heartbeat.toml\"\ncluster_mac = \"{}\"\nmode = \"{}\"\nbuckets = 1021\n\
             sync_key = \"{KEY}\"\n{}\n{services}",
            gateway(k),
            self.socket(k).display(),
            self.mac(),
            if self.director {
                "director"
            } else {
                "multicast"
            },
            self.gateways_toml()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts `testsrv` on every real server (TCP and UDP on `port`).
    pub fn start_servers(&self, port: u16) -> Result<Vec<Proc>> {
        let bin = workspace_bin("testsrv")?;
        let b = bin.to_string_lossy();
        let a = format!("0.0.0.0:{port}");
        let mut v = Vec::new();
        for (i, h) in self.rs.iter().enumerate() {
            let name = format!("rs{}", i + 1);
            v.push(h.spawn_logged(
                &[&b, "--name", &name, "--tcp", &a, "--udp", &a],
                Some(&self.dir().join(format!("{name}.log"))),
            )?);
            wait_listening(h, port)?;
        }
        Ok(v)
    }

    /// Starts the local service (`testsrv --name lbK`) on every node.
    pub fn start_local_services(&self, port: u16) -> Result<Vec<Proc>> {
        let bin = workspace_bin("testsrv")?;
        let b = bin.to_string_lossy();
        let a = format!("0.0.0.0:{port}");
        let mut v = Vec::new();
        for (k, h) in self.nodes.iter().enumerate() {
            let name = format!("lb{}", k + 1);
            v.push(h.spawn_logged(
                &[&b, "--name", &name, "--tcp", &a],
                Some(&self.dir().join(format!("{name}-local.log"))),
            )?);
            wait_listening(h, port)?;
        }
        Ok(v)
    }

    /// Starts `balancer run` on node k (1-based) and waits for its socket.
    pub fn start_node(&self, k: usize, config: &Path) -> Result<Proc> {
        let bin = workspace_bin("balancer")?;
        let sock = self.socket(k);
        let _ = std::fs::remove_file(&sock);
        let log = self.dir().join(format!("lb{k}.log"));
        let mut p = self.nodes[k - 1].spawn_logged(
            &[
                &bin.to_string_lossy(),
                "run",
                "-c",
                &config.to_string_lossy(),
            ],
            Some(&log),
        )?;
        if !wait_until(Duration::from_secs(10), &mut || sock.exists()) {
            p.kill();
            bail!(
                "lb{k} did not come up:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(p)
    }

    /// `balancer status --json` of node k.
    pub fn status(&self, k: usize) -> Result<serde_json::Value> {
        let bin = workspace_bin("balancer")?;
        let out = self.nodes[k - 1].run(&[
            &bin.to_string_lossy(),
            "status",
            "--json",
            "-s",
            &self.socket(k).to_string_lossy(),
        ])?;
        Ok(serde_json::from_str(&out)?)
    }
}
