//! Crafted frames on the wire: a client injects malformed and unwanted
//! frames at the node's front NIC through an AF_PACKET socket, and the
//! running balancer drops each one under its named reason in `status`,
//! exactly as many times as it was sent, forwards what is only unusual
//! (IP options), and keeps serving real requests afterwards.
//!
//! Needs root, `ethtool`, `ss`, and the workspace binaries built
//! (`cargo build --workspace`).

use std::collections::BTreeMap;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netns_tests::client::{http_get, udp_request};
use netns_tests::single::{CLIENT, Options, SingleNode, VIP};
use netns_tests::topo::wait_until;
use rewrite::build::FrameBuilder;
use rewrite::ethernet::MacAddr;
use rewrite::tcp::TcpFlags;

const T: Duration = Duration::from_secs(5);
/// Copies of each bad frame.
const N: u64 = 3;
/// MTU of the client's and the node's front links in this test: jumbo
/// frames longer than a ring slot (2048 bytes) reach the dataplane cut.
const JUMBO_MTU: u32 = 4000;

const SERVICES: &str = r#"
[[service]]
name = "web"
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
name = "dns"
vip = "198.18.0.100"
port = 53
protocol = "udp"

[[service.backend]]
name = "rs1"
address = "198.19.0.21"
port = 8080
forward = "nat"
"#;

fn mac(s: &str) -> Result<MacAddr> {
    let b: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    ensure!(b.len() == 6, "bad MAC {s}");
    Ok(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
}

fn drop_count(st: &serde_json::Value, reason: &str) -> u64 {
    st["drops"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["reason"] == reason))
        .and_then(|d| d["count"].as_u64())
        .unwrap_or(0)
}

fn all_drops(st: &serde_json::Value) -> BTreeMap<String, u64> {
    st["drops"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| Some((d["reason"].as_str()?.to_string(), d["count"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends each frame as it is out of `ifname` of the calling thread's
/// namespace, through an AF_PACKET socket (a TX ring slot is too small for
/// the jumbo frame, and one syscall per frame is fine here).
fn send_frames(ifname: &str, frames: &[Vec<u8>]) -> Result<()> {
    let idx = balancer::dataplane::ring::ifindex(ifname)?;
    // SAFETY: socket(2) with constant arguments; the result is checked and
    // owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = i32::try_from(idx)?;
    sll.sll_halen = 6;
    for f in frames {
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
        // SAFETY: the buffer and the address are valid for their lengths.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        ensure!(
            r == f.len() as isize,
            "sendto of a {}-byte frame: {}",
            f.len(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sends `frames` out of the client's front0.
fn inject(t: &SingleNode, frames: Vec<Vec<u8>>) -> Result<()> {
    t.client.in_ns(move || send_frames("front0", &frames))?
}

/// One kind of bad frame: its name, the frame, and the drop reason it must
/// be counted under.
struct Bad {
    what: &'static str,
    frame: Vec<u8>,
    reason: &'static str,
}

fn bad_frames(cmac: MacAddr, lbmac: MacAddr) -> Vec<Bad> {
    let c = |port| SocketAddrV4::new(CLIENT, port);
    let vip = |port| SocketAddrV4::new(VIP, port);
    let syn = |sport, dport| {
        FrameBuilder::tcp(c(sport), vip(dport))
            .flags(TcpFlags::SYN)
            .macs(cmac, lbmac)
    };
    let mut v = Vec::new();
    // An ARP packet cut to 10 bytes: shorter than any ARP for IPv4.
    let mut runt = FrameBuilder::udp(c(1), vip(53)).macs(cmac, lbmac).build();
    runt[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    runt.truncate(24);
    v.push(Bad {
        what: "runt ARP",
        frame: runt,
        reason: "runt",
    });
    // IPv4 cut inside its header.
    let mut cut = syn(41000, 80).build();
    cut.truncate(14 + 12);
    v.push(Bad {
        what: "IPv4 header cut at 12 bytes",
        frame: cut,
        reason: "bad_ip_header",
    });
    // Total length past the end of the frame (the header checksum fixed,
    // so that only the length is wrong).
    let mut long = syn(41001, 80).build();
    let tl = u16::from_be_bytes([long[16], long[17]]) + 100;
    long[16..18].copy_from_slice(&tl.to_be_bytes());
    fix_ip_checksum(&mut long);
    v.push(Bad {
        what: "total length 100 bytes past the frame",
        frame: long,
        reason: "bad_total_length",
    });
    v.push(Bad {
        what: "bad IPv4 header checksum",
        frame: syn(41002, 80).no_ip_checksum().build(),
        reason: "bad_ip_checksum",
    });
    v.push(Bad {
        what: "first fragment of a UDP datagram",
        frame: FrameBuilder::udp(c(41003), vip(53))
            .payload(&[7; 64])
            .fragment(true, 0)
            .macs(cmac, lbmac)
            .build(),
        reason: "fragment",
    });
    v.push(Bad {
        what: "802.1Q-tagged SYN",
        frame: syn(41004, 80).vlan(7).build(),
        reason: "vlan_tagged",
    });
    let mut v6 = syn(41005, 80).build();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    v.push(Bad {
        what: "IPv6 ethertype",
        frame: v6,
        reason: "not_ipv4",
    });
    let mut exp = syn(41006, 80).build();
    exp[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    v.push(Bad {
        what: "local experimental ethertype 0x88b5",
        frame: exp,
        reason: "not_ipv4",
    });
    v.push(Bad {
        what: "ACK for a flow the node never saw",
        frame: syn(41007, 80).flags(TcpFlags::ACK).build(),
        reason: "no_conn",
    });
    v.push(Bad {
        what: "SYN to a VIP port without a service",
        frame: syn(41008, 9999).build(),
        reason: "no_service",
    });
    v.push(Bad {
        what: "SYN+FIN",
        frame: syn(41009, 80)
            .flags(TcpFlags::SYN.union(TcpFlags::FIN))
            .build(),
        reason: "bad_tcp_flags",
    });
    v.push(Bad {
        what: "a 3000-byte frame, longer than a ring slot",
        frame: FrameBuilder::udp(c(41010), vip(53))
            .payload(&[9; 2958])
            .macs(cmac, lbmac)
            .build(),
        reason: "truncated",
    });
    v
}

/// Writes the IPv4 header checksum of an untagged frame from scratch.
fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    f[24..26].copy_from_slice(&[0, 0]);
    let mut sum: u32 = f[14..14 + ihl]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Raises the MTU of the client's and the node's front links (both veth
/// ends and the bridge ports between them) so that a frame longer than a
/// ring slot can reach the node at all.
fn jumbo_front(t: &SingleNode) -> Result<()> {
    let mtu = JUMBO_MTU.to_string();
    for h in [&t.client, &t.lb] {
        let port = t.tb.port(h, "front0")?;
        t.tb.switch()
            .run(&["ip", "link", "set", &port, "mtu", &mtu])?;
        h.run(&["ip", "link", "set", "front0", "mtu", &mtu])?;
    }
    Ok(())
}

#[test]
fn bad_frames_are_dropped_by_reason_and_the_node_keeps_serving() -> Result<()> {
    let t = SingleNode::new("bad-input", &Options::default())?;
    jumbo_front(&t)?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(SERVICES)?;
    let mut lb = t.start_balancer(&cfg)?;
    // The node works before anything bad arrives (and has learned its
    // backends' MACs).
    let r = t
        .client
        .in_ns(|| http_get(SingleNode::vip(80), 1000, T))??;
    ensure!(r.status == 200 && r.body_ok, "before: {r:?}");
    std::thread::sleep(Duration::from_millis(300));

    let cmac = mac(&t.client.mac("front0")?)?;
    let lbmac = mac(&t.lb.mac("front0")?)?;
    let bad = bad_frames(cmac, lbmac);
    let before = t.status()?;
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    let mut frames = Vec::new();
    for b in &bad {
        *want.entry(b.reason.to_string()).or_default() += N;
        for _ in 0..N {
            frames.push(b.frame.clone());
        }
    }
    inject(&t, frames)?;
    let reached = wait_until(T, &mut || {
        t.status()
            .map(|st| {
                want.iter()
                    .all(|(r, n)| drop_count(&st, r) >= drop_count(&before, r) + n)
            })
            .unwrap_or(false)
    });
    // Anything late would show up here too.
    std::thread::sleep(Duration::from_millis(300));
    let after = t.status()?;
    let (b, a) = (all_drops(&before), all_drops(&after));
    let mut problems = Vec::new();
    for (reason, count) in &a {
        let d = count - b.get(reason).copied().unwrap_or(0);
        let w = want.get(reason).copied().unwrap_or(0);
        if d != w {
            let kinds: Vec<&str> = bad
                .iter()
                .filter(|x| x.reason == reason)
                .map(|x| x.what)
                .collect();
            problems.push(format!(
                "{reason}: rose by {d}, expected {w} (from {kinds:?})"
            ));
        }
    }
    for r in want.keys() {
        if !a.contains_key(r) {
            problems.push(format!("{r}: not in status at all"));
        }
    }
    ensure!(
        reached && problems.is_empty(),
        "drop counters after {} bad frames:\n{}",
        want.values().sum::<u64>(),
        problems.join("\n")
    );

    // Still serving: short and long responses, UDP, and the process lives.
    let ok = t.client.in_ns(|| -> Result<()> {
        for size in [0usize, 1400, 100_000] {
            let r = http_get(SingleNode::vip(80), size, T)?;
            ensure!(r.status == 200 && r.body_len == size && r.body_ok, "{r:?}");
        }
        let (_, _, echoed) = udp_request(SingleNode::vip(53), b"still there?", T)?;
        ensure!(echoed, "UDP not echoed");
        Ok(())
    })?;
    ok.context("the node stopped serving after the bad frames")?;
    ensure!(lb.is_running(), "the balancer exited");
    Ok(())
}

/// IP options are unusual, not wrong: a datagram with a Record Route
/// option is forwarded (the service counts it, no drop counter moves) and
/// its answer comes back.
#[test]
fn a_datagram_with_ip_options_is_forwarded_not_dropped() -> Result<()> {
    let t = SingleNode::new("ip-options", &Options::default())?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    // Learn the backends' MACs and the client's ARP entry for the VIP.
    t.client
        .in_ns(|| udp_request(SingleNode::vip(53), b"warm up", T))??;
    std::thread::sleep(Duration::from_millis(200));
    let cmac = mac(&t.client.mac("front0")?)?;
    let lbmac = mac(&t.lb.mac("front0")?)?;
    let before = t.status()?;
    let answers = t.client.in_ns(move || -> Result<Vec<String>> {
        // The client's own socket receives the answers.
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(T))?;
        let port = sock.local_addr()?.port();
        let frames: Vec<Vec<u8>> = (0..N)
            .map(|i| {
                FrameBuilder::udp(SocketAddrV4::new(CLIENT, port), SocketAddrV4::new(VIP, 53))
                    // Record Route (RFC 791 §3.1): type 7, length 7, pointer 4,
                    // room for one address.
                    .ip_options(&[7, 7, 4, 0, 0, 0, 0])
                    .payload(format!("with options {i}").as_bytes())
                    .macs(cmac, lbmac)
                    .build()
            })
            .collect();
        send_frames("front0", &frames)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for _ in 0..N {
            let (n, from) = sock.recv_from(&mut buf).context("no answer")?;
            ensure!(
                from == std::net::SocketAddr::from((VIP, 53)),
                "answer from {from}"
            );
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        Ok(got)
    })??;
    for a in &answers {
        ensure!(
            a.starts_with("rs1 ") && a.contains("with options"),
            "answer {a:?}"
        );
    }
    let after = t.status()?;
    let dns = |st: &serde_json::Value, k: &str| st["services"][1][k].as_u64().unwrap_or(0);
    ensure!(
        dns(&after, "pkts_in") - dns(&before, "pkts_in") == N,
        "the service counted {} datagrams in, {N} were sent",
        dns(&after, "pkts_in") - dns(&before, "pkts_in")
    );
    ensure!(
        dns(&after, "pkts_out") - dns(&before, "pkts_out") == N,
        "the service counted {} answers out",
        dns(&after, "pkts_out") - dns(&before, "pkts_out")
    );
    ensure!(
        all_drops(&before) == all_drops(&after),
        "drops moved: {:?} -> {:?}",
        all_drops(&before),
        all_drops(&after)
    );
    Ok(())
}
