//! The compared paths on the one bench topology, and how each is brought
//! up and taken down on the node namespace `lb`.
//!
//! ```text
//!  client ──front── rtr ──back── rs3 (direct: 198.19.0.23:80, routed by rtr)
//!  client ──front── lb  ──back── rs1 rs2 :8080   (nat: our node; nft: kernel DNAT)
//!                   lb  ──back── rs3 rs4 :80     (dr: our node, VIP on their lo)
//! ```
//!
//! `nat` and `dr` run `balancer run` on `lb`; `nft` uses the same `lb`
//! namespace with the balancer stopped (SIGTERM: it undoes its host setup)
//! and puts the VIP, the back gateway alias, IP forwarding and an nftables
//! DNAT table there instead, removed again afterwards. Only one of them is
//! up at a time.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use netns_tests::single::{GATEWAY, SingleNode, VIP, rs_addr};
use netns_tests::topo::{Host, Proc};

/// The service port on the VIP (TCP and UDP), and of the DR real servers.
pub const SERVICE_PORT: u16 = 80;
/// The port of the NAT real servers (nginx TCP, testsrv UDP).
pub const NAT_PORT: u16 = 8080;
/// Real servers by index: rs1, rs2 are NAT backends; rs3, rs4 are DR
/// backends, and rs3 is also the direct path's server.
pub const NAT_RS: [usize; 2] = [0, 1];
pub const DR_RS: [usize; 2] = [2, 3];
pub const DIRECT_RS: usize = 2;
/// Connection-table size of the node in every bench config.
pub const MAX_ENTRIES: usize = 131_072;
/// The nftables table of the `nft` path.
const NFT_TABLE: &str = "bench_nft";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    Direct,
    Nat,
    Dr,
    Nft,
}

impl PathKind {
    pub const ALL: [PathKind; 4] = [PathKind::Direct, PathKind::Nat, PathKind::Dr, PathKind::Nft];

    pub const fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Nat => "nat",
            PathKind::Dr => "dr",
            PathKind::Nft => "nft",
        }
    }

    /// Whether the path is our balancer (CPU per packet is measured).
    pub const fn is_ours(self) -> bool {
        matches!(self, PathKind::Nat | PathKind::Dr)
    }

    /// Where the client sends (TCP and UDP alike).
    pub fn target(self) -> SocketAddrV4 {
        match self {
            PathKind::Direct => SocketAddrV4::new(rs_addr(DIRECT_RS), SERVICE_PORT),
            _ => SocketAddrV4::new(VIP, SERVICE_PORT),
        }
    }

    /// One line on what the path is, for the report.
    pub fn describe(self) -> String {
        let rs = |idx: &[usize], port: u16| {
            idx.iter()
                .map(|&i| format!("rs{}={}:{port}", i + 1, rs_addr(i)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            PathKind::Direct => format!(
                "client -> rtr -> rs{} {} (one server, kernel routing)",
                DIRECT_RS + 1,
                self.target()
            ),
            PathKind::Nat => format!("balancer run, NAT rr -> {}", rs(&NAT_RS, NAT_PORT)),
            PathKind::Dr => format!("balancer run, DR rr -> {}", rs(&DR_RS, SERVICE_PORT)),
            PathKind::Nft => format!(
                "kernel nftables on lb (balancer stopped): dnat to numgen inc mod 2 -> {}",
                rs(&NAT_RS, NAT_PORT)
            ),
        }
    }
}

impl std::str::FromStr for PathKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PathKind::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown path `{s}`, expected direct, nat, dr or nft"))
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `[conntrack]` and `[[service]]` tables of the node's config for an
/// our-balancer path: TCP and UDP services on VIP:80, rr over two backends.
pub fn services_toml(path: PathKind) -> Result<String> {
    let (idx, port, forward) = match path {
        PathKind::Nat => (NAT_RS, Some(NAT_PORT), "nat"),
        PathKind::Dr => (DR_RS, None, "dr"),
        other => bail!("{other} is not a path of our balancer"),
    };
    let mut s = format!("[conntrack]\nmax_entries = {MAX_ENTRIES}\n");
    for proto in ["tcp", "udp"] {
        s.push_str(&format!(
            "\n[[service]]\nname = \"bench-{proto}\"\nvip = \"{VIP}\"\nport = {SERVICE_PORT}\n\
             protocol = \"{proto}\"\nscheduler = \"rr\"\n"
        ));
        for i in idx {
            s.push_str(&format!(
                "\n[[service.backend]]\nname = \"rs{}\"\naddress = \"{}\"\nforward = \"{forward}\"\n",
                i + 1,
                rs_addr(i)
            ));
            if let Some(p) = port {
                s.push_str(&format!("port = {p}\n"));
            }
        }
    }
    Ok(s)
}

/// The nftables ruleset of the `nft` path (BENCH.md's baseline).
pub fn nft_ruleset() -> String {
    let [a, b] = NAT_RS.map(rs_addr);
    let mut rules = String::new();
    for proto in ["tcp", "udp"] {
        rules.push_str(&format!(
            "\t\tip daddr {VIP} {proto} dport {SERVICE_PORT} dnat to numgen inc mod 2 map {{ 0 : {a}, 1 : {b} }} : {NAT_PORT}\n"
        ));
    }
    format!(
        "table ip {NFT_TABLE} {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{rules}\t}}\n}}\n"
    )
}

/// A path that is up.
pub struct Up {
    pub path: PathKind,
    /// `balancer run` for our paths.
    pub balancer: Option<Proc>,
}

impl Up {
    pub fn balancer_pid(&self) -> Option<i32> {
        self.balancer.as_ref().and_then(Proc::pid)
    }
}

/// Brings `path` up on the node and waits until an HTTP request and a UDP
/// request through it are answered.
pub fn bring_up(bed: &SingleNode, path: PathKind) -> Result<Up> {
    let up = match path {
        PathKind::Direct => Up {
            path,
            balancer: None,
        },
        PathKind::Nat | PathKind::Dr => {
            let config = bed.write_config(&services_toml(path)?)?;
            let proc = bed.start_balancer(&config)?;
            Up {
                path,
                balancer: Some(proc),
            }
        }
        PathKind::Nft => {
            assert_node_clean(&bed.lb)?;
            let lb = &bed.lb;
            lb.run(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "front0"])?;
            lb.run(&[
                "ip",
                "addr",
                "add",
                &format!("{GATEWAY}/24"),
                "dev",
                "back0",
            ])?;
            lb.sysctl("net.ipv4.ip_forward", "1")?;
            let file = bed.dir().join("bench-nft.nft");
            std::fs::write(&file, nft_ruleset())?;
            lb.run(&["nft", "-f", &file.to_string_lossy()])?;
            Up {
                path,
                balancer: None,
            }
        }
    };
    wait_answering(&bed.client, path.target(), Duration::from_secs(10))
        .with_context(|| format!("path {path} does not answer"))?;
    Ok(up)
}

/// Takes a path down and checks the node is back to its bare state.
pub fn tear_down(bed: &SingleNode, mut up: Up) -> Result<()> {
    match up.path {
        PathKind::Direct => {}
        PathKind::Nat | PathKind::Dr => {
            let mut proc = up.balancer.take().context("our path without a balancer")?;
            proc.signal(Signal::SIGTERM)?;
            if proc.wait_timeout(Duration::from_secs(10))?.is_none() {
                bail!(
                    "balancer did not exit within 10 s of SIGTERM (log: {})",
                    bed.dir().join("balancer.log").display()
                );
            }
            assert_node_clean(&bed.lb).context("after the balancer exited")?;
        }
        PathKind::Nft => {
            let lb = &bed.lb;
            lb.run(&["nft", "delete", "table", "ip", NFT_TABLE])?;
            lb.run(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "front0"])?;
            lb.run(&[
                "ip",
                "addr",
                "del",
                &format!("{GATEWAY}/24"),
                "dev",
                "back0",
            ])?;
            lb.sysctl("net.ipv4.ip_forward", "0")?;
        }
    }
    Ok(())
}

/// The node holds no nftables table and neither the VIP nor the back
/// gateway address: the balancer undid its setup, the nft path is gone.
fn assert_node_clean(lb: &Host) -> Result<()> {
    let tables = lb.run(&["nft", "list", "tables"])?;
    if !tables.trim().is_empty() {
        bail!("nftables tables left on the node: {tables}");
    }
    let addrs = lb.run(&["ip", "-4", "-o", "addr", "show"])?;
    for a in [VIP.to_string(), GATEWAY.to_string()] {
        if addrs.contains(&format!("inet {a}/")) {
            bail!("address {a} left on the node: {addrs}");
        }
    }
    Ok(())
}

/// One HTTP/1.0 GET of the bench file; Ok when a 200 with the whole body
/// came back.
fn http_probe(target: SocketAddrV4) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("GET {} HTTP/1.0\r\n\r\n", super::servers::FILE).as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    if !text.starts_with("HTTP/1.1 200") || !text.ends_with("0123456789") {
        bail!("unexpected answer: {text}");
    }
    Ok(())
}

fn udp_probe(target: SocketAddrV4) -> Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.connect(SocketAddr::V4(target))?;
    s.send(b"bench-probe")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    if !buf[..n].ends_with(b"bench-probe") {
        bail!("unexpected UDP answer");
    }
    Ok(())
}

/// Retries an HTTP and a UDP request from the client until both are
/// answered (the first packets may wait for neighbour resolution).
pub fn wait_answering(client: &Host, target: SocketAddrV4, timeout: Duration) -> Result<()> {
    client.in_ns(move || -> Result<()> {
        let deadline = Instant::now() + timeout;
        for (name, probe) in [
            ("HTTP", http_probe as fn(SocketAddrV4) -> Result<()>),
            ("UDP", udp_probe),
        ] {
            loop {
                match probe(target) {
                    Ok(()) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => return Err(e.context(format!("{name} to {target}"))),
                }
            }
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_config_is_valid_with_two_nat_backends_on_8080_per_protocol() {
        let bed_like = format!(
            "[node]\nname = \"lb\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"{GATEWAY}/24\"\n\n{}",
            services_toml(PathKind::Nat).expect("nat")
        );
        let c = balancer::Config::parse(&bed_like, "bench-nat.toml").expect("valid");
        assert_eq!(c.conntrack.max_entries, MAX_ENTRIES);
        assert_eq!(c.services.len(), 2);
        for s in &c.services {
            assert_eq!(s.backends.len(), 2);
            assert!(s.backends.iter().all(|b| b.port == NAT_PORT));
        }
    }

    #[test]
    fn dr_config_is_valid_with_backends_on_the_service_port() {
        let text = format!(
            "[node]\nname = \"lb\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"{GATEWAY}/24\"\n\n{}",
            services_toml(PathKind::Dr).expect("dr")
        );
        let c = balancer::Config::parse(&text, "bench-dr.toml").expect("valid");
        assert!(
            c.services
                .iter()
                .all(|s| s.backends.iter().all(|b| b.port == SERVICE_PORT))
        );
    }

    #[test]
    fn nft_ruleset_maps_tcp_and_udp_to_the_nat_servers() {
        let r = nft_ruleset();
        assert!(r.contains(
            "tcp dport 80 dnat to numgen inc mod 2 map { 0 : 198.19.0.21, 1 : 198.19.0.22 } : 8080"
        ));
        assert!(r.contains("udp dport 80 dnat"));
    }

    #[test]
    fn path_names_round_trip() {
        for p in PathKind::ALL {
            assert_eq!(p.as_str().parse::<PathKind>(), Ok(p));
        }
        assert!("haproxy".parse::<PathKind>().is_err());
    }
}
