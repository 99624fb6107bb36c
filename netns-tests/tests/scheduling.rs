//! Scheduling, health checks, persistence, shedding and drain with real
//! traffic through one node (issue 5). Namespaced: needs root, `nft`,
//! `ethtool`, `ss`, and the workspace binaries built (`cargo build
//! --workspace`).
//!
//! No timing assertions: waits are bounded (generous) polls, and the times
//! they took are printed, not judged.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netns_tests::client::{HttpConn, Reply};
use netns_tests::single::{Options, SingleNode, wait_listening};
use netns_tests::topo::{Proc, wait_until, workspace_bin};

const T: Duration = Duration::from_secs(5);

/// One service on port 80, NAT to rs1..rs3 on 8080, with `keys` (scheduler,
/// tables) after its header and `backend_keys[i]` in backend i.
fn service(keys: &str, backend_keys: [&str; 3]) -> String {
    let mut s = format!(
        "[conntrack]\ntcp_time_wait = \"1s\"\ntcp_close = \"1s\"\ntcp_fin_wait = \"2s\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n{keys}\n"
    );
    for (i, extra) in backend_keys.iter().enumerate() {
        s.push_str(&format!(
            "[[service.backend]]\nname = \"rs{n}\"\naddress = \"198.19.0.2{n}\"\nport = 8080\nforward = \"nat\"\n{extra}\n",
            n = i + 1
        ));
    }
    s
}

/// One request on a fresh connection from `src` (any if `None`).
fn get_from(src: Option<Ipv4Addr>) -> Result<Reply> {
    let vip = SingleNode::vip(80);
    match src {
        None => netns_tests::client::http_get(vip, 100, T),
        Some(ip) => {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
            sock.connect_timeout(&vip.into(), T)
                .with_context(|| format!("connect from {ip}"))?;
            let stream: std::net::TcpStream = sock.into();
            let mut c = HttpConn::from_stream(stream, T)?;
            c.get(100, true)
        }
    }
}

/// `n` sequential requests from the client; the answering servers' names.
fn servers(t: &SingleNode, n: usize, src: Option<Ipv4Addr>) -> Result<Vec<String>> {
    t.client.in_ns(move || -> Result<Vec<String>> {
        (0..n)
            .map(|_| {
                let r = get_from(src)?;
                ensure!(r.status == 200 && r.body_ok, "bad reply {r:?}");
                Ok(r.server)
            })
            .collect()
    })?
}

fn tally(names: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

fn start(t: &SingleNode, services: &str) -> Result<(Vec<Proc>, Proc)> {
    let srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(services)?;
    let lb = t.start_balancer(&cfg)?;
    Ok((srv, lb))
}

/// Starts `testsrv` again on real server `i` (0-based).
fn restart_server(t: &SingleNode, i: usize) -> Result<Proc> {
    let bin = workspace_bin("testsrv")?;
    let name = format!("rs{}", i + 1);
    let p = t.rs[i].spawn(&[
        &bin.to_string_lossy(),
        "--name",
        &name,
        "--tcp",
        "0.0.0.0:8080",
    ])?;
    wait_listening(&t.rs[i], 8080)?;
    Ok(p)
}

/// The `up` flag of backend `i` of service 0 in `balancer status`.
fn backend_up(t: &SingleNode, i: usize) -> Result<bool> {
    let s = t.status()?;
    s["services"][0]["backends"][i]["up"]
        .as_bool()
        .context("no `up` in status")
}

fn service_counter(t: &SingleNode, key: &str) -> Result<u64> {
    t.status()?["services"][0][key]
        .as_u64()
        .with_context(|| format!("no `{key}` in status"))
}

/// Polls until backend `i` is `up` (or not) in status, up to `limit`, then
/// gives the dataplane a housekeeping tick (100 ms) to read it; returns
/// how long status took.
fn wait_backend(t: &SingleNode, i: usize, up: bool, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    if wait_until(limit, &mut || backend_up(t, i).is_ok_and(|u| u == up)) {
        let took = start.elapsed();
        std::thread::sleep(Duration::from_millis(300));
        Ok(took)
    } else {
        bail!(
            "backend {i} not {} within {limit:?}",
            if up { "up" } else { "down" }
        )
    }
}

/// rr, wrr and the connection-counting and random schedulers with
/// sequential requests: rr and wrr exactly (30 and 60 requests); lc, wlc
/// and p2c give every server a share (closed connections linger as
/// inactive ones, which they count, so they rotate); sed and nq count
/// active connections only, so with every server idle at each request sed
/// sends all to the heaviest (weights 1:1:3) and nq all to the first; fns
/// with marks of 2 and held connections packs rs1, then rs2, then rs3.
#[test]
fn schedulers_distribute_real_flows_as_configured() -> Result<()> {
    let t = SingleNode::new("sched-dist", &Options::default())?;
    let srv = t.start_servers(8080, &[])?;
    let mut lb: Option<Proc> = None;
    let mut run =
        |scheduler: &str, weights: [&str; 3], n: usize| -> Result<HashMap<String, usize>> {
            drop(lb.take());
            let cfg = t.write_config(&service(&format!("scheduler = \"{scheduler}\""), weights))?;
            lb = Some(t.start_balancer(&cfg)?);
            let got = tally(&servers(&t, n, None)?);
            println!("{scheduler}: {got:?}");
            Ok(got)
        };
    let c = |m: &HashMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);

    let rr = run("rr", ["", "", ""], 30)?;
    ensure!(
        (c(&rr, "rs1"), c(&rr, "rs2"), c(&rr, "rs3")) == (10, 10, 10),
        "rr {rr:?}"
    );
    let wrr = run("wrr", ["weight = 1", "weight = 2", "weight = 3"], 60)?;
    ensure!(
        (c(&wrr, "rs1"), c(&wrr, "rs2"), c(&wrr, "rs3")) == (10, 20, 30),
        "wrr {wrr:?}"
    );
    for s in ["lc", "wlc", "p2c"] {
        let got = run(s, ["", "", ""], 30)?;
        for rs in ["rs1", "rs2", "rs3"] {
            ensure!(
                c(&got, rs) >= 3,
                "{s}: {rs} got {} of 30: {got:?}",
                c(&got, rs)
            );
        }
    }
    let sed = run("sed", ["", "", "weight = 3"], 20)?;
    ensure!(c(&sed, "rs3") == 20, "sed {sed:?}");
    let nq = run("nq", ["", "", "weight = 3"], 20)?;
    ensure!(c(&nq, "rs1") == 20, "nq {nq:?}");

    drop(lb.take());
    let cfg = t.write_config(&service(
        "scheduler = \"fns\"",
        ["high_water = 2", "high_water = 2", "high_water = 2"],
    ))?;
    let _lb = t.start_balancer(&cfg)?;
    let order = t.client.in_ns(|| -> Result<Vec<String>> {
        let mut held = Vec::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            let mut c = HttpConn::connect(SingleNode::vip(80), T)?;
            let r = c.get(10, false)?;
            order.push(r.server);
            held.push(c);
        }
        Ok(order)
    })??;
    println!("fns: {order:?}");
    ensure!(
        order == ["rs1", "rs1", "rs2", "rs2", "rs3", "rs3"],
        "fns packing {order:?}"
    );
    drop(srv);
    Ok(())
}

/// sh and mh map client addresses: every request from one address reaches
/// one server, and several addresses reach more than one server.
#[test]
fn source_hashing_keeps_each_client_address_on_one_server() -> Result<()> {
    let t = SingleNode::new("sched-hash", &Options::default())?;
    // Extra client addresses, clear of the node (.11) and the router (.254).
    let srcs: Vec<Ipv4Addr> = (30..42).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
    for ip in &srcs {
        t.client
            .run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "front0"])?;
    }
    let srv = t.start_servers(8080, &[])?;
    for scheduler in ["sh", "mh"] {
        let cfg = t.write_config(&service(
            &format!("scheduler = \"{scheduler}\""),
            ["", "", ""],
        ))?;
        let lb = t.start_balancer(&cfg)?;
        let mut used = Vec::new();
        for ip in &srcs {
            let got = tally(&servers(&t, 4, Some(*ip))?);
            ensure!(got.len() == 1, "{scheduler}: {ip} reached {got:?}");
            used.extend(got.into_keys());
        }
        used.sort();
        used.dedup();
        println!("{scheduler}: 12 client addresses on {used:?}");
        ensure!(used.len() >= 2, "{scheduler}: all clients on {used:?}");
        drop(lb);
    }
    drop(srv);
    Ok(())
}

/// Health checks every 300 ms, fall 3, rise 2: a server whose service
/// stops goes down and gets no new flows; started again, it comes back
/// and gets flows again.
#[test]
fn failed_server_is_skipped_and_returns_after_rise() -> Result<()> {
    let t = SingleNode::new("sched-health", &Options::default())?;
    let health = "scheduler = \"rr\"\n[service.health]\ncheck = \"http\"\npath = \"/health\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 3\n";
    let (mut srv, _lb) = start(&t, &service(health, ["", "", ""]))?;
    let before = tally(&servers(&t, 9, None)?);
    ensure!(before.len() == 3, "all three serve before: {before:?}");
    srv[1].kill();
    let took = wait_backend(&t, 1, false, Duration::from_secs(15))?;
    println!("rs2 marked down {took:?} after its service stopped (fall x interval = 900ms)");
    let during = tally(&servers(&t, 12, None)?);
    ensure!(
        !during.contains_key("rs2"),
        "rs2 got flows while down: {during:?}"
    );
    ensure!(during.len() == 2, "{during:?}");
    let _again = restart_server(&t, 1)?;
    let took = wait_backend(&t, 1, true, Duration::from_secs(15))?;
    println!("rs2 marked up {took:?} after its service came back (rise x interval = 600ms)");
    let after = tally(&servers(&t, 9, None)?);
    ensure!(after.contains_key("rs2"), "rs2 back: {after:?}");
    Ok(())
}

/// Persistence keeps a client on one server across connections under rr,
/// and moves it when that server fails its checks.
#[test]
fn persistence_keeps_a_client_while_healthy_and_moves_it_when_not() -> Result<()> {
    let t = SingleNode::new("sched-persist", &Options::default())?;
    let keys = "scheduler = \"rr\"\n[service.persistence]\ntimeout = \"30s\"\n[service.health]\ncheck = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nfall = 2\n";
    let (mut srv, _lb) = start(&t, &service(keys, ["", "", ""]))?;
    let first = servers(&t, 8, None)?;
    ensure!(
        first.iter().all(|s| *s == first[0]),
        "not sticky: {first:?}"
    );
    ensure!(service_counter(&t, "persistent")? <= 1);
    let i: usize = first[0][2..].parse::<usize>()? - 1;
    srv[i].kill();
    wait_backend(&t, i, false, Duration::from_secs(15))?;
    let moved = servers(&t, 8, None)?;
    ensure!(
        moved[0] != first[0],
        "still on the failed server: {moved:?}"
    );
    ensure!(
        moved.iter().all(|s| *s == moved[0]),
        "not sticky after the move: {moved:?}"
    );
    println!("client moved {} -> {}", first[0], moved[0]);
    Ok(())
}

/// Hard shedding at 3 connections: with 3 connections held open, a new
/// connection is refused at once with a RST (ECONNREFUSED, not a timeout)
/// while the held ones keep answering; status counts it.
#[test]
fn shedding_answers_rsts_beyond_the_threshold() -> Result<()> {
    let t = SingleNode::new("sched-shed", &Options::default())?;
    let keys = "scheduler = \"rr\"\n[service.shed]\nstrategy = \"hard\"\nthreshold = 3\n";
    let (_srv, _lb) = start(&t, &service(keys, ["", "", ""]))?;
    let (refused, latencies) = t
        .client
        .in_ns(|| -> Result<(Vec<String>, Vec<Duration>)> {
            let mut held: Vec<HttpConn> = (0..3)
                .map(|_| HttpConn::connect(SingleNode::vip(80), T))
                .collect::<Result<_>>()?;
            for c in &mut held {
                ensure!(c.get(10, false)?.status == 200);
            }
            let mut refused = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                match std::net::TcpStream::connect_timeout(&SingleNode::vip(80), T) {
                    Ok(_) => bail!("a 4th connection was accepted"),
                    Err(e) => {
                        refused.push(format!("{:?} after {:?}", e.kind(), started.elapsed()));
                        ensure!(
                            e.kind() == std::io::ErrorKind::ConnectionRefused,
                            "expected a RST, got {e}"
                        );
                    }
                }
            }
            let mut latencies = Vec::new();
            for c in &mut held {
                let started = Instant::now();
                ensure!(c.get(1000, false)?.status == 200, "held connection broken");
                latencies.push(started.elapsed());
            }
            Ok((refused, latencies))
        })??;
    println!("refused: {refused:?}; held connections answered in {latencies:?}");
    ensure!(service_counter(&t, "shed")? >= 5, "shed not counted");
    ensure!(
        service_counter(&t, "resets_sent")? >= 5,
        "resets not counted"
    );
    Ok(())
}

/// `balancer drain rs2`: new flows skip rs2, a connection already on rs2
/// keeps working; `undrain` brings it back.
#[test]
fn drain_stops_new_flows_and_lets_existing_ones_finish() -> Result<()> {
    let t = SingleNode::new("sched-drain", &Options::default())?;
    let (_srv, _lb) = start(&t, &service("scheduler = \"rr\"", ["", "", ""]))?;
    let mut on_rs2 = t.client.in_ns(|| -> Result<HttpConn> {
        for _ in 0..3 {
            let mut c = HttpConn::connect(SingleNode::vip(80), T)?;
            if c.get(10, false)?.server == "rs2" {
                return Ok(c);
            }
        }
        bail!("no connection reached rs2 in 3 rr picks")
    })??;
    let bin = workspace_bin("balancer")?;
    let sock = t.control_socket();
    let out = t.lb.run(&[
        &bin.to_string_lossy(),
        "drain",
        "rs2",
        "-s",
        &sock.to_string_lossy(),
    ])?;
    ensure!(out.contains("drained web/rs2"), "{out}");
    // The dataplane reads weights on its housekeeping tick (100 ms).
    std::thread::sleep(Duration::from_millis(300));
    let during = tally(&servers(&t, 12, None)?);
    ensure!(
        !during.contains_key("rs2"),
        "rs2 got new flows while drained: {during:?}"
    );
    let r = t
        .client
        .in_ns(move || -> Result<Reply> { on_rs2.get(100, false) })??;
    ensure!(
        r.server == "rs2" && r.status == 200,
        "existing connection: {r:?}"
    );
    t.lb.run(&[
        &bin.to_string_lossy(),
        "undrain",
        "rs2",
        "-s",
        &sock.to_string_lossy(),
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let after = tally(&servers(&t, 6, None)?);
    ensure!(after.contains_key("rs2"), "rs2 after undrain: {after:?}");
    Ok(())
}
