//! One balancer node with two NICs in namespaces, real TCP/UDP clients and
//! servers: NAT, DR and local service, as an operator runs them.
//!
//! Needs root, `nft`, `ethtool`, `ss` (scripts/deps) and the workspace
//! binaries built (`cargo build --workspace`, which `scripts/test` does).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use netns_tests::client::{HttpConn, http_get, udp_request};
use netns_tests::single::{CLIENT, MIXED_SERVICES, Options, SingleNode, VIP};

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

/// Direct routing: the real server holds the VIP on lo and answers the
/// client itself (through the router); responses of many segments arrive
/// whole, and the server saw the client's address.
#[test]
fn dr_serves_http_of_several_sizes_and_a_long_connection() -> Result<()> {
    let t = SingleNode::new(
        "dr",
        &Options {
            dr: vec![2],
            ..Options::default()
        },
    )?;
    let _srv = t.start_servers(8080, &[81])?;
    let _local = t.start_local_service(80)?;
    let cfg = t.write_config(MIXED_SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    let (replies, long) = t.client.in_ns(|| -> Result<_> {
        let mut v = Vec::new();
        for size in [0usize, 1400, 1500, 100_000, 2_000_000] {
            v.push((size, http_get(SingleNode::vip(81), size, T)?));
        }
        let mut c = HttpConn::connect(SingleNode::vip(81), T)?;
        let mut long = Vec::new();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            long.push(c.get(20_000, false)?);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((v, long))
    })??;
    for (size, r) in &replies {
        ensure!(
            r.status == 200 && r.body_len == *size && r.body_ok,
            "size {size}: {r:?}"
        );
        ensure!(r.server == "rs3", "DR answered by {}", r.server);
        ensure!(
            r.peer.starts_with(&format!("{CLIENT}:")),
            "DR server saw {}",
            r.peer
        );
    }
    ensure!(
        long.len() > 30 && long.iter().all(|r| r.server == "rs3" && r.body_ok),
        "long DR connection: {long:?}"
    );
    Ok(())
}

/// Local service and NAT servers in one service by weight 1:1:2: over 400
/// short connections each backend's share is within ±5% of its weight, and
/// the node's own service answers for the VIP.
#[test]
fn weighted_shares_over_local_and_nat_backends() -> Result<()> {
    let t = SingleNode::new("weights", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let _local = t.start_local_service(80)?;
    let cfg = t.write_config(MIXED_SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    const N: usize = 400;
    let servers = t.client.in_ns(|| -> Result<Vec<String>> {
        (0..N)
            .map(|i| Ok(http_get(SingleNode::vip(80), i % 3000, T)?.server))
            .collect()
    })??;
    let mut count: HashMap<String, usize> = HashMap::new();
    for s in &servers {
        *count.entry(s.clone()).or_default() += 1;
    }
    for (name, weight) in [("lb", 1.0), ("rs1", 1.0), ("rs2", 2.0)] {
        let share = *count.get(name).unwrap_or(&0) as f64 / N as f64;
        let want = weight / 4.0;
        ensure!(
            (share - want).abs() <= 0.05,
            "{name}: share {share:.3}, weight share {want:.3} ({count:?})"
        );
    }
    // The status counters saw every connection.
    let st = t.status()?;
    let web = &st["services"][0];
    let total: u64 = (0..3)
        .map(|b| web["backends"][b]["conns_total"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        total == N as u64,
        "status counted {total} connections, the client made {N}: {web}"
    );
    Ok(())
}

/// What the node's kernel must never do for VIP traffic: answer a SYN to a
/// port without a service with a RST, or a UDP datagram with an ICMP port
/// unreachable. A capture on the client shows nothing from the VIP, and the
/// node counts the drops.
#[test]
fn kernel_sends_no_rst_or_icmp_for_vip_traffic() -> Result<()> {
    let t = SingleNode::new("quiet", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(nat_services())?;
    let _lb = t.start_balancer(&cfg)?;
    let pcap = t.dir().join("client.pcap");
    let mut cap = t.client.spawn(&[
        "tcpdump",
        "-i",
        "front0",
        "-U",
        "-w",
        &pcap.to_string_lossy(),
        "ip",
    ])?;
    std::thread::sleep(Duration::from_millis(700));
    let before = t.status()?;
    let (refused, udp_answered, ok) = t.client.in_ns(|| {
        let refused =
            std::net::TcpStream::connect_timeout(&SingleNode::vip(9999), Duration::from_secs(2))
                .is_ok();
        let udp_answered =
            udp_request(SingleNode::vip(9999), b"anyone?", Duration::from_secs(1)).is_ok();
        // Keep-alive, so that the client closes first: a server that
        // closes first keeps no TIME_WAIT here (tcp_max_tw_buckets = 0) and
        // answers the client's late FIN with a RST, which the node rightly
        // passes on from the VIP and the capture below would blame on it.
        let ok = HttpConn::connect(SingleNode::vip(80), T)
            .and_then(|mut c| c.get(1000, false))
            .map(|r| r.body_ok)
            .unwrap_or(false);
        (refused, udp_answered, ok)
    })?;
    std::thread::sleep(Duration::from_millis(300));
    cap.signal(nix::sys::signal::Signal::SIGINT)?;
    cap.wait_timeout(Duration::from_secs(3))?;
    ensure!(
        !refused && !udp_answered,
        "something answered for a port without a service"
    );
    ensure!(ok, "the service itself did not work");
    let bad = t.client.run(&[
        "tcpdump",
        "-nr",
        &pcap.to_string_lossy(),
        "src host 198.18.0.100 and ((tcp[tcpflags] & tcp-rst != 0) or icmp)",
    ])?;
    ensure!(
        bad.trim().is_empty(),
        "the node sent RST or ICMP for the VIP:\n{bad}"
    );
    let all = t.client.run(&[
        "tcpdump",
        "-nr",
        &pcap.to_string_lossy(),
        "src host 198.18.0.100",
    ])?;
    ensure!(
        all.lines().count() >= 5,
        "capture saw too little from the VIP to mean anything:\n{all}"
    );
    let after = t.status()?;
    let d = drop_delta(&before, &after, "no_service");
    ensure!(
        d >= 2,
        "no_service drops counted {d}, expected at least 2 (SYN retries add more)"
    );
    Ok(())
}

fn drop_count(st: &serde_json::Value, reason: &str) -> u64 {
    st["drops"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["reason"] == reason))
        .and_then(|d| d["count"].as_u64())
        .unwrap_or(0)
}

fn drop_delta(a: &serde_json::Value, b: &serde_json::Value, reason: &str) -> u64 {
    drop_count(b, reason) - drop_count(a, reason)
}

/// Idle connections expire at their configured timeouts: a UDP flow and an
/// established TCP connection leave the table, and a segment on the
/// forgotten TCP connection is dropped as `no_conn`.
#[test]
fn idle_connections_expire() -> Result<()> {
    let t = SingleNode::new("expiry", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(&format!(
        "[conntrack]\ntcp_established = \"2s\"\nudp = \"2s\"\nexpire_interval = \"50ms\"\n{}",
        nat_services()
    ))?;
    let _lb = t.start_balancer(&cfg)?;
    let conn = t.client.in_ns(|| -> Result<HttpConn> {
        udp_request(SingleNode::vip(53), b"x", T)?;
        let mut c = HttpConn::connect(SingleNode::vip(80), T)?;
        c.get(100, false)?;
        Ok(c)
    })??;
    let conns = |st: &serde_json::Value, svc: usize, gauge: &str| -> u64 {
        st["services"][svc][gauge].as_u64().unwrap_or(u64::MAX)
    };
    let st = t.status()?;
    ensure!(
        conns(&st, 0, "conns_active") == 1,
        "TCP connection not active: {}",
        st["services"][0]
    );
    ensure!(
        conns(&st, 1, "conns_inactive") == 1,
        "UDP flow not tracked: {}",
        st["services"][1]
    );
    std::thread::sleep(Duration::from_millis(3000));
    let st = t.status()?;
    ensure!(
        conns(&st, 0, "conns_active") == 0,
        "TCP connection did not expire: {}",
        st["services"][0]
    );
    ensure!(
        conns(&st, 1, "conns_inactive") == 0,
        "UDP flow did not expire: {}",
        st["services"][1]
    );
    let before = drop_count(&st, "no_conn");
    let r = t.client.in_ns(move || {
        let mut conn = conn;
        conn.get(100, false).is_ok()
    })?;
    // The client's connect timeout is 5 s; the request must fail (the node forgot the flow).
    ensure!(!r, "a request on an expired connection still went through");
    let after = drop_count(&t.status()?, "no_conn");
    ensure!(
        after > before,
        "segments of the expired connection were not counted as no_conn"
    );
    Ok(())
}

/// The status counters equal what the test sent: packets, bytes and
/// connections of a UDP service, both directions.
#[test]
fn status_counters_equal_the_traffic_sent() -> Result<()> {
    let t = SingleNode::new("counters", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(nat_services())?;
    let _lb = t.start_balancer(&cfg)?;
    const N: usize = 10;
    let reply_lens = t.client.in_ns(|| -> Result<Vec<usize>> {
        let mut lens = Vec::new();
        for i in 0..N {
            let payload = vec![b'a' + i as u8; 100];
            let (name, peer, echoed) = udp_request(SingleNode::vip(53), &payload, T)?;
            ensure!(echoed, "not echoed");
            lens.push(name.len() + 1 + peer.len() + 1 + payload.len());
        }
        Ok(lens)
    })??;
    let st = t.status()?;
    let c = &st["services"][1];
    let get = |k: &str| c[k].as_u64().unwrap_or(u64::MAX);
    ensure!(
        get("pkts_in") == N as u64,
        "pkts_in {} != {N}",
        get("pkts_in")
    );
    ensure!(
        get("bytes_in") == (N * (20 + 8 + 100)) as u64,
        "bytes_in {}",
        get("bytes_in")
    );
    ensure!(
        get("pkts_out") == N as u64,
        "pkts_out {} != {N}",
        get("pkts_out")
    );
    let want_out: usize = reply_lens.iter().map(|l| 28 + l).sum();
    ensure!(
        get("bytes_out") == want_out as u64,
        "bytes_out {} != {want_out}",
        get("bytes_out")
    );
    ensure!(
        get("conns_total") == N as u64,
        "conns_total {} != {N}",
        get("conns_total")
    );
    Ok(())
}
