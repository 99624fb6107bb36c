//! Bi-active cluster in namespaces: every node receives the VIP's frames on
//! the cluster MAC and serves only the flows of its buckets.

use std::time::Duration;

use anyhow::{Result, ensure};
use netns_tests::client::http_get;
use netns_tests::cluster::ClusterBed;
use netns_tests::single::SingleNode;

const T: Duration = Duration::from_secs(5);

const NAT: &str = r#"
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
forward = "nat"
node = 1

[[service.backend]]
name = "rs2"
address = "198.19.0.22"
port = 8080
forward = "nat"
node = 2
"#;

fn conns_total(st: &serde_json::Value) -> u64 {
    st["services"][0]["conns_total"].as_u64().unwrap_or(0)
}

/// Two nodes share the flows by their buckets: each is answered once, each
/// node serves about half (equal weights) through its own sub-cluster.
#[test]
fn two_nodes_share_flows_by_bucket_and_none_is_served_twice() -> Result<()> {
    let c = ClusterBed::new("cl-share", 2, 2, "100ms")?;
    let _srv = c.start_servers(8080)?;
    let cfg1 = c.write_configs(1, NAT)?;
    let cfg2 = c.write_configs(2, NAT)?;
    let _n1 = c.start_node(1, &cfg1)?;
    let _n2 = c.start_node(2, &cfg2)?;
    std::thread::sleep(Duration::from_millis(1500));
    const N: usize = 400;
    let servers = c.client.in_ns(|| -> Result<Vec<String>> {
        (0..N)
            .map(|_| Ok(http_get(SingleNode::vip(80), 1000, T)?.server))
            .collect()
    })??;
    let on1 = servers.iter().filter(|s| *s == "rs1").count();
    let (s1, s2) = (c.status(1)?, c.status(2)?);
    let (t1, t2) = (conns_total(&s1), conns_total(&s2));
    ensure!(
        t1 + t2 == N as u64,
        "nodes counted {t1} + {t2} connections for {N} flows"
    );
    ensure!(
        on1 as u64 == t1,
        "rs1 served {on1}, lb1 scheduled {t1}: flows left their node's sub-cluster"
    );
    let share = t1 as f64 / N as f64;
    ensure!(
        (share - 0.5).abs() <= 0.05,
        "lb1's share {share:.3}, expected 0.5 ± 0.05"
    );
    Ok(())
}
