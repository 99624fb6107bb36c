//! One balancer node with two NICs in namespaces, real TCP/UDP clients and
//! servers: NAT, DR and local service, as an operator runs them.
//!
//! Needs root, `nft`, `ethtool`, `ss` (scripts/deps) and the workspace
//! binaries built (`cargo build --workspace`, which `scripts/test` does).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use netns_tests::client::{HttpConn, http_get, udp_request};
use netns_tests::single::{CLIENT, Options, SingleNode, VIP};

const T: Duration = Duration::from_secs(5);

fn nat_services() -> &'static str {
    r#"
[[service]]
name = "web"
vip = "198.18.0.100"
port = 80
protocol = "tcp"
scheduler = "wrr"

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
name = "dns"
vip = "198.18.0.100"
port = 53
protocol = "udp"
scheduler = "rr"

[[service.backend]]
address = "198.19.0.21"
port = 8080
forward = "nat"

[[service.backend]]
address = "198.19.0.22"
port = 8080
forward = "nat"
"#
}

/// Requests of several sizes through the VIP by NAT: every response is
/// whole, comes from a real server, and the server saw the client's own
/// address (NAT keeps the source).
#[test]
fn nat_serves_http_of_several_sizes_and_udp() -> Result<()> {
    let t = SingleNode::new("nat-sizes", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(nat_services())?;
    let _lb = t.start_balancer(&cfg)?;
    let replies = t.client.in_ns(|| -> Result<Vec<_>> {
        let mut v = Vec::new();
        for size in [0usize, 100, 1400, 1500, 10_000, 200_000, 2_000_000] {
            v.push((size, http_get(SingleNode::vip(80), size, T)?));
        }
        Ok(v)
    })??;
    for (size, r) in &replies {
        ensure!(
            r.status == 200 && r.body_len == *size && r.body_ok,
            "size {size}: {r:?}"
        );
        ensure!(
            r.server == "rs1" || r.server == "rs2",
            "size {size} answered by {}",
            r.server
        );
        ensure!(
            r.peer.starts_with(&format!("{CLIENT}:")),
            "server saw {} not the client",
            r.peer
        );
    }
    let udp = t.client.in_ns(|| -> Result<Vec<_>> {
        (0..4)
            .map(|i| udp_request(SingleNode::vip(53), format!("ping {i}").as_bytes(), T))
            .collect()
    })??;
    let names: Vec<&str> = udp.iter().map(|(n, _, _)| n.as_str()).collect();
    for (name, peer, echoed) in &udp {
        ensure!(*echoed, "UDP payload not echoed by {name}");
        ensure!(
            peer.starts_with(&format!("{CLIENT}:")),
            "UDP server saw {peer}"
        );
    }
    // rr over two servers: four datagrams from four source ports alternate.
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in &names {
        *count.entry(n).or_default() += 1;
    }
    ensure!(
        count.get("rs1") == Some(&2) && count.get("rs2") == Some(&2),
        "rr UDP shares: {count:?}"
    );
    Ok(())
}

/// A keep-alive connection exchanging requests for several seconds stays
/// on one server and never breaks.
#[test]
fn nat_long_lived_connection_keeps_its_server() -> Result<()> {
    let t = SingleNode::new("nat-long", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(nat_services())?;
    let _lb = t.start_balancer(&cfg)?;
    let servers = t.client.in_ns(|| -> Result<Vec<String>> {
        let mut c = HttpConn::connect(SingleNode::vip(80), T)?;
        let mut seen = Vec::new();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            let r = c.get(5000, false)?;
            ensure!(r.status == 200 && r.body_ok, "bad reply {r:?}");
            seen.push(r.server);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(seen)
    })??;
    ensure!(servers.len() > 40, "only {} requests in 4 s", servers.len());
    ensure!(
        servers.iter().all(|s| *s == servers[0]),
        "connection moved between servers: {servers:?}"
    );
    let _ = VIP;
    Ok(())
}
