//! Bi-active cluster, flow by flow: which flows move when a node leaves,
//! and DR connections continued by the node that takes over (issue 4).
//! Namespaced: needs root and the workspace binaries built.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netns_tests::client::{HttpConn, exercise, open_long};
use netns_tests::cluster::{ClusterBed, nat_services, sub_cluster_services, web_service};
use netns_tests::single::{CLIENT, SingleNode};
use netns_tests::topo::wait_until;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(5);

/// Every node serves its flows itself: the answer names the node.
fn local_service() -> String {
    web_service(&["name = \"local\"\nforward = \"local\"\n".to_string()])
}

/// One request from the client's source port `port` on a fresh
/// connection; the answering server.
fn get_from_port(port: u16) -> Result<String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(CLIENT, port)).into())?;
    sock.connect_timeout(&SingleNode::vip(80).into(), T)
        .with_context(|| format!("connect from port {port}"))?;
    let stream: std::net::TcpStream = sock.into();
    let mut rest = stream.try_clone()?;
    let mut c = HttpConn::from_stream(stream, T)?;
    let r = c.get(100, true)?;
    ensure!(r.status == 200 && r.body_ok, "bad reply {r:?}");
    // Close after the server (its FIN first): the client then keeps no
    // TIME_WAIT, and the next round can connect from this port again
    // (closing first failed that connect now and then, EADDRNOTAVAIL).
    let _ = std::io::Read::read_to_end(&mut rest, &mut Vec::new());
    Ok(r.server)
}

/// The node answering each flow of `ports` (a flow = the client's address
/// and one source port).
fn owners(c: &ClusterBed, ports: Vec<u16>) -> Result<HashMap<u16, String>> {
    c.client.in_ns(move || -> Result<HashMap<u16, String>> {
        ports
            .into_iter()
            .map(|p| Ok((p, get_from_port(p)?)))
            .collect()
    })?
}

/// Three nodes, each serving its own flows: when one leaves, exactly its
/// flows move (spread over the other two) and no other flow changes node.
#[test]
fn three_nodes_only_the_leavers_flows_move() -> Result<()> {
    let c = ClusterBed::new("cl-move", 3, 0, "100ms")?;
    let _local = c.start_local_services(80)?;
    let mut nodes = Vec::new();
    for k in 1..=3 {
        let cfg = c.write_configs(k, &local_service())?;
        nodes.push(c.start_node(k, &cfg)?);
    }
    // Ready when every node owns buckets in every node's table (a
    // starting node owns none until it has pulled the connection table).
    let split = |k: usize| {
        c.status(k).is_ok_and(|s| {
            s["cluster"]["buckets"]
                .as_array()
                .is_some_and(|b| b.len() == 3 && b.iter().all(|x| x[1].as_u64() > Some(0)))
        })
    };
    ensure!(
        wait_until(Duration::from_secs(10), &mut || (1..=3).all(split)),
        "the three nodes never split the buckets"
    );
    const N: u16 = 600;
    let ports: Vec<u16> = (0..N).map(|i| 30000 + i).collect();
    let before = owners(&c, ports.clone())?;
    let count = |m: &HashMap<u16, String>, n: &str| m.values().filter(|s| *s == n).count();
    for n in ["lb1", "lb2", "lb3"] {
        let share = count(&before, n) as f64 / f64::from(N);
        ensure!(
            (share - 1.0 / 3.0).abs() <= 0.05,
            "{n}'s share {share:.3}, expected 1/3 ± 0.05: {:?}",
            ["lb1", "lb2", "lb3"].map(|x| count(&before, x))
        );
    }

    // lb3 leaves (SIGTERM: it hands its buckets over, then goes).
    nodes[2].signal(Signal::SIGTERM)?;
    nodes[2]
        .wait_timeout(Duration::from_secs(10))?
        .context("lb3 did not stop")?;
    ensure!(
        wait_until(Duration::from_secs(5), &mut || {
            c.status(1)
                .is_ok_and(|s| s["cluster"]["live"].as_array().map(Vec::len) == Some(2))
        }),
        "lb1 still counts lb3 live"
    );
    let after = owners(&c, ports)?;
    let mut moved_from_others = Vec::new();
    let mut moved = 0usize;
    let mut to = HashMap::new();
    for (p, was) in &before {
        let now = &after[p];
        if was == "lb3" {
            moved += 1;
            *to.entry(now.clone()).or_insert(0usize) += 1;
        } else if now != was {
            moved_from_others.push((*p, was.clone(), now.clone()));
        }
    }
    let fraction = moved as f64 / f64::from(N);
    println!(
        "FIGURE cluster leave: {moved} of {N} flows moved ({fraction:.3}; lb3's share), to {to:?}; \
         {} other flows changed node",
        moved_from_others.len()
    );
    ensure!(
        moved_from_others.is_empty(),
        "flows of the staying nodes moved: {moved_from_others:?}"
    );
    ensure!(
        !to.contains_key("lb3"),
        "flows still answered by the stopped node"
    );
    // The leaver's flows spread over both survivors (Maglev preference
    // lists): neither takes less than a third of them.
    for n in ["lb1", "lb2"] {
        let got = to.get(n).copied().unwrap_or(0);
        ensure!(
            got * 3 >= moved,
            "{n} took {got} of lb3's {moved} flows: {to:?}"
        );
    }
    Ok(())
}

/// Connection sync with direct routing: long-lived DR connections owned by
/// a node survive its SIGKILL (the survivor knows each one's real server
/// from the synced entry and keeps sending the client's segments there).
#[test]
fn long_lived_dr_connections_survive_sigkill_of_their_node() -> Result<()> {
    let c = ClusterBed::new("cl-dr", 2, 2, "100ms")?;
    for i in 0..2 {
        c.make_dr(i)?;
    }
    let _srv = c.start_servers(80)?;
    let mut nodes = Vec::new();
    for k in 1..=2 {
        let cfg = c.write_configs(k, &sub_cluster_services("dr"))?;
        nodes.push(c.start_node(k, &cfg)?);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let mut conns = c.client.in_ns(|| open_long(SingleNode::vip(80), 12, T))??;
    let lb1_status = c.status(1)?;
    let on_lb1 = lb1_status["services"][0]["conns_active"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        on_lb1 > 0 && on_lb1 < 12,
        "lb1 holds {on_lb1} of 12 connections: not a mix"
    );
    // The sync datagrams leave within a poll round.
    std::thread::sleep(Duration::from_millis(200));
    nodes[0].signal(Signal::SIGKILL)?;
    let broken = c.client.in_ns(move || {
        exercise(
            &mut conns,
            Duration::from_secs(4),
            Duration::from_millis(100),
            2000,
        )
    })?;
    println!(
        "FIGURE cluster SIGKILL: {} of 12 long-lived DR connections broken ({on_lb1} were on the killed node)",
        broken.len()
    );
    ensure!(broken.is_empty(), "DR connections broken: {broken:?}");
    Ok(())
}

/// A busy connection that lives longer than the idle timeout keeps its
/// copy on the peers fresh (the owner sends its entry again while traffic
/// flows): after 5 s of requests with a 3 s established timeout, the
/// owner's SIGKILL still breaks none of them.
#[test]
fn busy_connections_older_than_the_idle_timeout_survive_sigkill() -> Result<()> {
    let c = ClusterBed::new("cl-fresh", 2, 2, "100ms")?;
    let _srv = c.start_servers(8080)?;
    let mut nodes = Vec::new();
    for k in 1..=2 {
        let cfg = c.write_configs(
            k,
            &format!("[conntrack]\ntcp_established = \"3s\"\n{}", nat_services()),
        )?;
        nodes.push(c.start_node(k, &cfg)?);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let every = Duration::from_millis(200);
    let mut conns = c.client.in_ns(|| open_long(SingleNode::vip(80), 8, T))??;
    let on_rs1 = conns.iter().filter(|(_, s)| s == "rs1").count();
    ensure!(on_rs1 > 0, "no connection on lb1's sub-cluster");
    // Busy for longer than the established timeout.
    let (conns, early) = c.client.in_ns(move || {
        let b = exercise(&mut conns, Duration::from_secs(5), every, 200);
        (conns, b)
    })?;
    ensure!(early.is_empty(), "broken before any fault: {early:?}");
    nodes[0].signal(Signal::SIGKILL)?;
    let broken = c.client.in_ns(move || {
        let mut conns = conns;
        exercise(&mut conns, Duration::from_secs(3), every, 200)
    })?;
    println!(
        "FIGURE cluster sync refresh: {} of 8 connections broken by SIGKILL after 5 s busy with a 3 s idle timeout ({on_rs1} on the killed node)",
        broken.len()
    );
    ensure!(broken.is_empty(), "connections broken: {broken:?}");
    Ok(())
}
