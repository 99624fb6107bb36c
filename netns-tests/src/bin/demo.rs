//! `demo`: one balancer node in network namespaces, serving a VIP by NAT,
//! by DR and with its own local service, under real HTTP and UDP traffic.
//! Prints what it proved and the node's `balancer status`, then removes
//! everything it made. Needs root and the workspace binaries built.
//!
//! `cargo build --workspace && sudo target/debug/demo [--flows N]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use netns_tests::client::{HttpConn, http_get, udp_request};
use netns_tests::single::{CLIENT, MIXED_SERVICES, Options, SingleNode};
use netns_tests::topo::workspace_bin;

/// The tests' mixed services plus a UDP echo service by NAT.
const ECHO_SERVICE: &str = r#"
[[service]]
name = "echo"
vip = "198.18.0.100"
port = 53
protocol = "udp"
scheduler = "rr"

[[service.backend]]
name = "rs1"
address = "198.19.0.21"
port = 8080
forward = "nat"

[[service.backend]]
name = "rs2"
address = "198.19.0.22"
port = 8080
forward = "nat"
"#;

fn main() -> Result<()> {
    let mut flows = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--flows" => flows = args.next().context("--flows N")?.parse()?,
            "-h" | "--help" => {
                println!(
                    "demo [--flows N]: one balancer node in namespaces (NAT, DR, local); prints what it proved"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let t = SingleNode::new(
        "demo",
        &Options {
            dr: vec![2],
            ..Options::default()
        },
    )?;
    println!(
        "topology: client {CLIENT} | node lb (front0 198.18.0.11, back0 198.19.0.11) | rs1..rs3 198.19.0.21-23 (rs3 DR)"
    );
    let _srv = t.start_servers(8080, &[81])?;
    let _local = t.start_local_service(80)?;
    let cfg = t.write_config(&format!("{MIXED_SERVICES}{ECHO_SERVICE}"))?;
    let _lb = t.start_balancer(&cfg)?;
    println!("balancer running with {}", cfg.display());
    let setup = t.lb.run(&[
        &workspace_bin("balancer")?.to_string_lossy(),
        "setup",
        "-c",
        &cfg.to_string_lossy(),
    ])?;
    println!("\nhost setup (balancer setup -c ...):\n{setup}");

    let t0 = Instant::now();
    let (shares, dr, long, udp) = t.client.in_ns(move || -> Result<_> {
        let mut shares: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..flows {
            let r = http_get(
                SingleNode::vip(80),
                (i * 997) % 50_000,
                Duration::from_secs(5),
            )?;
            ensure!(r.status == 200 && r.body_ok, "bad response {r:?}");
            *shares.entry(r.server).or_default() += 1;
        }
        let dr = http_get(SingleNode::vip(81), 1_000_000, Duration::from_secs(5))?;
        let mut c = HttpConn::connect(SingleNode::vip(80), Duration::from_secs(5))?;
        let mut long = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            long.push(c.get(10_000, false)?.server);
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut udp = Vec::new();
        for i in 0..6 {
            udp.push(
                udp_request(
                    SingleNode::vip(53),
                    format!("hello {i}").as_bytes(),
                    Duration::from_secs(2),
                )?
                .0,
            );
        }
        Ok((shares, dr, long, udp))
    })??;
    let elapsed = t0.elapsed();

    println!("proved:");
    println!(
        "  {flows} short HTTP connections to 198.18.0.100:80 (weights local 1, rs1 1, rs2 2), all answered whole:"
    );
    for (name, n) in &shares {
        println!(
            "    {name:6} {n:5}  ({:.1}%)",
            100.0 * *n as f64 / flows as f64
        );
    }
    println!(
        "  DR: 1 MB from {} via 198.18.0.100:81 ({} bytes, intact: {}), the server answering the client directly",
        dr.server, dr.body_len, dr.body_ok
    );
    let same = long.iter().all(|s| *s == long[0]);
    println!(
        "  a keep-alive connection made {} requests over 3 s, all to {} (sticky: {same})",
        long.len(),
        long[0]
    );
    println!("  UDP 198.18.0.100:53 answered by {udp:?} (round robin)");
    println!("  traffic took {:.1} s", elapsed.as_secs_f64());
    let status = t.lb.run(&[
        &workspace_bin("balancer")?.to_string_lossy(),
        "status",
        "-s",
        &t.control_socket().to_string_lossy(),
    ])?;
    println!("\nbalancer status:\n{status}");
    ensure!(same, "the long-lived connection moved");
    println!("demo done; namespaces removed.");
    Ok(())
}
