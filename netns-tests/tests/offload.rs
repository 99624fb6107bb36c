//! Checksum offload on and off: with transmit offload on (the veth
//! default) the node reads client and server frames whose TCP/UDP checksum
//! is only partial and must complete it before rewriting or handing the
//! packet on; with it off every frame carries a full checksum. NAT, DR and
//! the local service each serve HTTP (up to 1 MB) and UDP either way.
//! (`tests/ring.rs` proves the ring reports the partial mark.)
//!
//! Needs root, `ethtool`, `ss`, and the workspace binaries built
//! (`cargo build --workspace`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netns_tests::client::{http_get, udp_request};
use netns_tests::single::{CLIENT, Options, SingleNode, VIP};
use netns_tests::topo::{Host, Proc, wait_until, workspace_bin};

const T: Duration = Duration::from_secs(10);

/// Ports: TCP 80 NAT, 81 DR, 82 local; UDP 53 NAT, 5353 DR, 5454 local.
const SERVICES: &str = r#"
[[service]]
name = "web-nat"
vip = "198.18.0.100"
port = 80
protocol = "tcp"
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

[[service]]
name = "web-dr"
vip = "198.18.0.100"
port = 81
protocol = "tcp"

[[service.backend]]
name = "rs3"
address = "198.19.0.23"
forward = "dr"

[[service]]
name = "web-local"
vip = "198.18.0.100"
port = 82
protocol = "tcp"

[[service.backend]]
name = "self"
forward = "local"

[[service]]
name = "udp-nat"
vip = "198.18.0.100"
port = 53
protocol = "udp"

[[service.backend]]
name = "rs1"
address = "198.19.0.21"
port = 8080
forward = "nat"

[[service]]
name = "udp-dr"
vip = "198.18.0.100"
port = 5353
protocol = "udp"

[[service.backend]]
name = "rs3"
address = "198.19.0.23"
forward = "dr"

[[service]]
name = "udp-local"
vip = "198.18.0.100"
port = 5454
protocol = "udp"

[[service.backend]]
name = "self"
forward = "local"
"#;

const HTTP_SIZES: [usize; 5] = [0, 1400, 1500, 65_536, 1_000_000];
const UDP_SIZES: [usize; 3] = [1, 512, 1400];

/// A UDP responder bound to the VIP itself, so that its answers leave from
/// the VIP (an unconnected socket on 0.0.0.0 would answer from the host's
/// primary address, which a connected client ignores).
fn udp_on_vip(t: &SingleNode, h: &Host, name: &str, port: u16) -> Result<Proc> {
    let bin = workspace_bin("testsrv")?;
    let addr = format!("{VIP}:{port}");
    let p = h.spawn_logged(
        &[&bin.to_string_lossy(), "--name", name, "--udp", &addr],
        Some(&t.dir().join(format!("{name}-udp.log"))),
    )?;
    let pat = format!("{addr} ");
    if !wait_until(Duration::from_secs(5), &mut || {
        h.run(&["ss", "-Hlun"])
            .map(|s| s.contains(&pat))
            .unwrap_or(false)
    }) {
        bail!("nothing listens on UDP {addr} in {}", h.ns());
    }
    Ok(p)
}

fn drops(st: &serde_json::Value) -> BTreeMap<String, u64> {
    st["drops"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| Some((d["reason"].as_str()?.to_string(), d["count"].as_u64()?)))
                .filter(|(_, c)| *c > 0)
                .collect()
        })
        .unwrap_or_default()
}

fn serve_everything(tag: &str, checksum_offload: bool) -> Result<()> {
    let t = SingleNode::new(
        tag,
        &Options {
            dr: vec![2],
            checksum_offload,
            ..Options::default()
        },
    )?;
    let _srv = t.start_servers(8080, &[81])?;
    let _local = t.start_local_service(82)?;
    let cfg = t.write_config(SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    // After the balancer: it is what puts the VIP on the node.
    let _dr_udp = udp_on_vip(&t, &t.rs[2], "rs3", 5353)?;
    let _local_udp = udp_on_vip(&t, &t.lb, "lb", 5454)?;
    let report = t.client.in_ns(move || -> Result<Vec<String>> {
        let mut bad = Vec::new();
        for (method, port, servers) in [
            ("nat", 80u16, &["rs1", "rs2"][..]),
            ("dr", 81, &["rs3"][..]),
            ("local", 82, &["lb"][..]),
        ] {
            let failed = bad.len();
            for size in HTTP_SIZES {
                match http_get(SingleNode::vip(port), size, T) {
                    Ok(r)
                        if r.status == 200
                            && r.body_len == size
                            && r.body_ok
                            && servers.contains(&r.server.as_str())
                            && r.peer.starts_with(&format!("{CLIENT}:")) => {}
                    Ok(r) => bad.push(format!("{method} HTTP {size}: {r:?}")),
                    Err(e) => bad.push(format!("{method} HTTP {size}: {e:#}")),
                }
                // The first failure of a method says enough (and each costs a timeout).
                if bad.len() > failed {
                    break;
                }
            }
        }
        for (method, port, server) in [
            ("nat", 53u16, "rs1"),
            ("dr", 5353, "rs3"),
            ("local", 5454, "lb"),
        ] {
            let failed = bad.len();
            for size in UDP_SIZES {
                let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
                match udp_request(SingleNode::vip(port), &payload, T) {
                    Ok((name, peer, true))
                        if name == server && peer.starts_with(&format!("{CLIENT}:")) => {}
                    Ok(r) => bad.push(format!("{method} UDP {size}: {r:?}")),
                    Err(e) => bad.push(format!("{method} UDP {size}: {e:#}")),
                }
                if bad.len() > failed {
                    break;
                }
            }
        }
        Ok(bad)
    })??;
    let st = t.status()?;
    ensure!(
        report.is_empty(),
        "checksum offload {}: {} failures:\n{}\ndrops: {:?}",
        if checksum_offload { "on" } else { "off" },
        report.len(),
        report.join("\n"),
        drops(&st)
    );
    // Every service saw its traffic through the dataplane (not around it).
    for (i, want) in [
        HTTP_SIZES.len(),
        HTTP_SIZES.len(),
        HTTP_SIZES.len(),
        UDP_SIZES.len(),
        UDP_SIZES.len(),
        UDP_SIZES.len(),
    ]
    .into_iter()
    .enumerate()
    {
        let s = &st["services"][i];
        let total = s["conns_total"].as_u64().context("conns_total")?;
        ensure!(
            total == want as u64,
            "service {} scheduled {total} flows, the client made {want}",
            s["name"]
        );
    }
    // Nothing was refused for its headers or checksums.
    let d = drops(&st);
    for reason in ["bad_l4_header", "bad_icmp_error", "bad_ip_checksum", "runt"] {
        ensure!(!d.contains_key(reason), "{reason} drops: {d:?}");
    }
    Ok(())
}

#[test]
fn nat_dr_and_local_serve_http_and_udp_with_checksum_offload_on() -> Result<()> {
    serve_everything("offload-on", true)
}

#[test]
fn nat_dr_and_local_serve_http_and_udp_with_checksum_offload_off() -> Result<()> {
    serve_everything("offload-off", false)
}
