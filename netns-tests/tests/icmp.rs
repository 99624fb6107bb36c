//! ICMP errors about a NAT flow reach the right end, rewritten, with real
//! kernels at both ends judging them: a kernel only ties an error to a
//! socket (or a route) by the quoted addresses and ports, so an error that
//! arrives unrewritten is silently ignored and these tests fail.
//!
//! Needs root, `ethtool`, `ss`, and the workspace binaries built
//! (`cargo build --workspace`).

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netns_tests::single::{CLIENT, Options, SingleNode, VIP, rs_addr};
use netns_tests::topo::wait_until;
use rewrite::build::{FrameBuilder, quote};
use rewrite::icmp::{IcmpRepr, unreach_code};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const T: Duration = Duration::from_secs(5);

const SERVICES: &str = r#"
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

[[service]]
name = "closed"
vip = "198.18.0.100"
port = 54
protocol = "udp"

[[service.backend]]
name = "rs1"
address = "198.19.0.21"
port = 9
forward = "nat"
"#;

fn one_server(tag: &str) -> Result<SingleNode> {
    SingleNode::new(
        tag,
        &Options {
            real_servers: 1,
            ..Options::default()
        },
    )
}

/// The ICMP message (no IP header) of a built frame.
fn icmp_message(frame: &[u8]) -> Vec<u8> {
    frame[14 + 20..].to_vec()
}

/// Sends an ICMP message to `dst` from a raw socket of the calling
/// thread's namespace; the kernel adds the IP header.
fn send_icmp(dst: Ipv4Addr, msg: &[u8]) -> Result<()> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    let n = s.send_to(msg, &SockAddr::from(SocketAddrV4::new(dst, 0)))?;
    ensure!(n == msg.len(), "short send");
    Ok(())
}

/// A client UDP socket connected to VIP:`port` that has had one answer
/// through the node (so the flow exists and every ARP entry is warm).
fn connected_client(port: u16) -> Result<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(T))?;
    s.connect(SocketAddr::from((VIP, port)))?;
    s.send(b"probe")?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).context("no answer through the VIP")?;
    ensure!(buf[..n].ends_with(b"probe"), "odd answer");
    Ok(s)
}

/// (a) A real server's kernel answers a datagram to a closed port with a
/// port unreachable; the node rewrites it (outer source VIP, quoted
/// destination VIP:54), and the client's *connected* socket reports
/// `ConnectionRefused`. Unrewritten, the client's kernel would not match
/// it to the socket and `recv` would time out.
#[test]
fn port_unreachable_from_a_real_server_refuses_the_clients_socket() -> Result<()> {
    let t = one_server("icmp-refused")?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    let kinds = t.client.in_ns(|| -> Result<Vec<ErrorKind>> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(SocketAddr::from((VIP, 54)))?;
        let mut kinds = Vec::new();
        let mut buf = [0u8; 256];
        // The server's kernel rate-limits its errors and the first datagram
        // may wait for ARP: a few tries.
        for _ in 0..3 {
            s.send(b"anyone at 54?")?;
            match s.recv(&mut buf) {
                Ok(_) => bail!("a closed port answered"),
                Err(e) => kinds.push(e.kind()),
            }
            if kinds.last() == Some(&ErrorKind::ConnectionRefused) {
                break;
            }
        }
        Ok(kinds)
    })??;
    ensure!(
        kinds.last() == Some(&ErrorKind::ConnectionRefused),
        "the client's socket never saw the port unreachable: {kinds:?}"
    );
    let st = t.status()?;
    ensure!(
        st["services"][1]["pkts_out"].as_u64() >= Some(1),
        "the error did not pass the service's reverse path: {}",
        st["services"][1]
    );
    Ok(())
}

/// (b) "Fragmentation needed" from a real server about a datagram of a NAT
/// flow: sent from the server's namespace with a raw socket, quoting the
/// datagram as the server received it (client:port -> rs1:8080). Rewritten
/// by the node, it teaches the client's kernel a path MTU of 1280 toward
/// the VIP: the route cache shows it, and so does `IP_MTU` on the
/// connected socket.
#[test]
fn frag_needed_from_a_real_server_lowers_the_clients_path_mtu_to_the_vip() -> Result<()> {
    let t = one_server("icmp-pmtu")?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    let sock = t.client.in_ns(|| connected_client(53))??;
    let port = sock.local_addr()?.port();
    let route = || t.client.run(&["ip", "route", "get", &VIP.to_string()]);
    let before = route()?;
    ensure!(
        !before.contains("mtu 1280"),
        "path MTU already lowered: {before}"
    );
    // What rs1 received: client:port -> rs1:8080, "probe".
    let received = FrameBuilder::udp(
        SocketAddrV4::new(CLIENT, port),
        SocketAddrV4::new(rs_addr(0), 8080),
    )
    .payload(b"probe")
    .build();
    let err = FrameBuilder::icmp(
        rs_addr(0),
        CLIENT,
        IcmpRepr::DstUnreachable {
            code: unreach_code::FRAG_NEEDED,
            next_hop_mtu: 1280,
        },
    )
    .payload(&quote(&received, 28))
    .build();
    let msg = icmp_message(&err);
    t.rs[0].in_ns(move || send_icmp(CLIENT, &msg))??;
    let mut last = String::new();
    let learned = wait_until(T, &mut || {
        last = route().unwrap_or_default();
        last.contains("mtu 1280")
    });
    ensure!(
        learned,
        "the client did not learn the path MTU: {last}\nstatus: {}",
        t.status()?["drops"]
    );
    ensure!(
        ip_mtu(&sock)? == 1280,
        "IP_MTU of the connected socket is {}",
        ip_mtu(&sock)?
    );
    Ok(())
}

/// `getsockopt(IP_MTU)`: the path MTU the kernel holds for a connected
/// socket's destination.
fn ip_mtu(s: &UdpSocket) -> Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    ensure!(r == 0, "IP_MTU: {}", std::io::Error::last_os_error());
    Ok(v)
}

/// (c) An ICMP error from the client about a reply of a NAT flow (the
/// client says VIP:53 -> client:port was unreachable) reaches the real
/// server with the outer destination and the quoted source rewritten to
/// the server's own address and port, so that it names a packet the server
/// sent.
#[test]
fn icmp_error_from_the_client_reaches_the_real_server_rewritten() -> Result<()> {
    let t = one_server("icmp-to-rs")?;
    let _srv = t.start_servers(8080, &[])?;
    let cfg = t.write_config(SERVICES)?;
    let _lb = t.start_balancer(&cfg)?;
    let sock = t.client.in_ns(|| connected_client(53))??;
    let port = sock.local_addr()?.port();
    let rs1 = rs_addr(0);
    // A raw ICMP socket on rs1 sees every ICMP message rs1 receives.
    let (ready_tx, ready_rx) = mpsc::channel();
    let seen = t.rs[0].spawn_in_ns(move || -> Result<Vec<Vec<u8>>> {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let start = Instant::now();
        let mut buf = [0u8; 2048];
        while start.elapsed() < T {
            match (&s).read(&mut buf) {
                Ok(n) => {
                    let p = buf[..n].to_vec();
                    let done = is_error_about(&p, rs1, 8080, port);
                    got.push(p);
                    if done {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(got)
    });
    ready_rx.recv_timeout(T).context("raw socket on rs1")?;
    // What the client received: VIP:53 -> client:port.
    let received = FrameBuilder::udp(SocketAddrV4::new(VIP, 53), SocketAddrV4::new(CLIENT, port))
        .payload(b"rs1 198.18.0.2:00000 probe")
        .build();
    let err = FrameBuilder::icmp(
        CLIENT,
        VIP,
        IcmpRepr::DstUnreachable {
            code: unreach_code::PORT,
            next_hop_mtu: 0,
        },
    )
    .payload(&quote(&received, 28))
    .build();
    let msg = icmp_message(&err);
    t.client.in_ns(move || send_icmp(VIP, &msg))??;
    let got = seen
        .join()
        .map_err(|_| anyhow::anyhow!("rs1 thread panicked"))???;
    ensure!(
        got.iter().any(|p| is_error_about(p, rs1, 8080, port)),
        "rs1 saw no rewritten error among {} ICMP messages: {:02x?}\nstatus drops: {}",
        got.len(),
        got,
        t.status()?["drops"]
    );
    drop(sock);
    Ok(())
}

/// An IPv4 packet (as a raw socket reads it) that is an ICMP destination
/// unreachable from the client to `rs`, quoting UDP `rs:rs_port ->
/// client:cport`, with a valid ICMP checksum.
fn is_error_about(p: &[u8], rs: Ipv4Addr, rs_port: u16, cport: u16) -> bool {
    parse_unreachable(p).is_ok_and(|k| k == (CLIENT, rs, rs, rs_port, CLIENT, cport))
}

/// (outer src, outer dst, quoted src, quoted sport, quoted dst, quoted dport).
type ErrorKey = (Ipv4Addr, Ipv4Addr, Ipv4Addr, u16, Ipv4Addr, u16);

/// Reads outer IPv4 + ICMP destination unreachable + quoted IPv4/UDP
/// (independently of `rewrite`), checking the ICMP checksum.
fn parse_unreachable(p: &[u8]) -> Result<ErrorKey> {
    let ihl = usize::from(p.first().context("empty")? & 0x0f) * 4;
    ensure!(p.len() >= ihl + 8 + 28 && p[9] == 1, "not ICMP");
    let icmp = &p[ihl..];
    ensure!(icmp[0] == 3, "not unreachable");
    let mut sum: u32 = icmp
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ensure!(sum == 0xffff, "bad ICMP checksum");
    let q = &icmp[8..];
    let qihl = usize::from(q[0] & 0x0f) * 4;
    ensure!(q.len() >= qihl + 8 && q[9] == 17, "quote not UDP");
    let a = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Ok((
        a(&p[12..16]),
        a(&p[16..20]),
        a(&q[12..16]),
        port(&q[qihl..]),
        a(&q[16..20]),
        port(&q[qihl + 2..]),
    ))
}
