//! In-place rewrites of whole Ethernet frames: NAT (addresses and ports,
//! checksums fixed incrementally per RFC 1624), DR (MAC addresses), ICMP
//! errors about NATed flows, and the completion of partial checksums.
//!
//! Every function takes the frame and the [`Parsed`] summary that
//! [`crate::parse`] returned for it, re-checks the lengths it relies on
//! (a summary of another frame cannot make it panic or write out of
//! bounds), and either rewrites the frame completely or returns an error
//! with the frame untouched. No allocation, no panic.
//!
//! Incremental updates keep a wrong checksum wrong (RFC 1624 §2): a frame
//! that arrived corrupted is still dropped by its receiver. The exception is
//! a frame whose transport checksum is *partial* (read from a veth with
//! TP_STATUS_CSUMNOTREADY): there the field is not a checksum yet and must
//! be completed with [`complete_checksum`] before any rewrite.

use core::net::Ipv4Addr;

use crate::checksum::{self, udp_nonzero, update_addr, update16};
use crate::ethernet::{EthernetFrame, MacAddr};
use crate::flow::proto;
use crate::icmp::{IcmpPacket, QUOTED_L4_LEN};
use crate::ipv4::Ipv4Packet;
use crate::packet::{Kind, L4, Parsed};
use crate::tcp::{self, TcpPacket};
use crate::udp::{self, UdpPacket};

/// Why a rewrite was refused. The frame is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RewriteError {
    /// [`set_macs`]: the frame is shorter than an Ethernet header.
    #[error("frame shorter than an Ethernet header")]
    Truncated,
    /// The summary is ARP, not IPv4.
    #[error("not an IPv4 frame")]
    NotIpv4,
    /// NAT asked for a frame that is not TCP or UDP.
    #[error("not a TCP or UDP frame")]
    NotTcpOrUdp,
    /// An ICMP-error rewrite asked for a frame that is not one.
    #[error("not an ICMP error")]
    NotIcmpError,
    /// IPv4 fragments carry no (or not all of the) transport header.
    #[error("IPv4 fragment")]
    Fragment,
    /// The frame does not match its summary (shorter, or another protocol):
    /// a caller bug, never a property of the traffic.
    #[error("frame does not match its parse summary")]
    FrameMismatch,
    /// The ICMP error's checksum is wrong: rewriting it would launder a
    /// corrupted message, because its checksum is recomputed.
    #[error("ICMP checksum does not verify")]
    BadIcmpChecksum,
    /// [`complete_checksum`] on a protocol whose checksum it does not know.
    #[error("checksum completion not supported for this protocol")]
    ChecksumUnsupported,
}

impl RewriteError {
    pub const ALL: [RewriteError; 8] = [
        RewriteError::Truncated,
        RewriteError::NotIpv4,
        RewriteError::NotTcpOrUdp,
        RewriteError::NotIcmpError,
        RewriteError::Fragment,
        RewriteError::FrameMismatch,
        RewriteError::BadIcmpChecksum,
        RewriteError::ChecksumUnsupported,
    ];

    /// A stable snake_case name, for counters and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            RewriteError::Truncated => "truncated",
            RewriteError::NotIpv4 => "not_ipv4",
            RewriteError::NotTcpOrUdp => "not_tcp_or_udp",
            RewriteError::NotIcmpError => "not_icmp_error",
            RewriteError::Fragment => "fragment",
            RewriteError::FrameMismatch => "frame_mismatch",
            RewriteError::BadIcmpChecksum => "bad_icmp_checksum",
            RewriteError::ChecksumUnsupported => "checksum_unsupported",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

impl Side {
    fn opposite(self) -> Side {
        match self {
            Side::Src => Side::Dst,
            Side::Dst => Side::Src,
        }
    }
}

/// Client -> real server: destination `VIP:vport` becomes
/// `new_dst:new_dst_port`. Fixes the IPv4 header checksum and the TCP / UDP
/// checksum (pseudo-header address and port) incrementally, RFC 1624 eqn. 3.
/// A UDP checksum of zero ("none") stays zero. MACs are not touched: call
/// [`set_macs`] too.
pub fn nat_forward(
    frame: &mut [u8],
    parsed: &Parsed,
    new_dst: Ipv4Addr,
    new_dst_port: u16,
) -> Result<(), RewriteError> {
    nat(frame, parsed, Side::Dst, new_dst, new_dst_port)
}

/// Real server -> client: source `rs:port` becomes `new_src:new_src_port`
/// (the VIP and its port). Checksums as in [`nat_forward`].
pub fn nat_reverse(
    frame: &mut [u8],
    parsed: &Parsed,
    new_src: Ipv4Addr,
    new_src_port: u16,
) -> Result<(), RewriteError> {
    nat(frame, parsed, Side::Src, new_src, new_src_port)
}

fn nat(
    frame: &mut [u8],
    parsed: &Parsed,
    side: Side,
    addr: Ipv4Addr,
    port: u16,
) -> Result<(), RewriteError> {
    let proto = match parsed.kind {
        Kind::Arp(_) => return Err(RewriteError::NotIpv4),
        Kind::Ipv4 { fragment: true, .. } => return Err(RewriteError::Fragment),
        Kind::Ipv4 {
            proto,
            l4: L4::Tcp { .. } | L4::Udp { .. },
            ..
        } => proto,
        Kind::Ipv4 { .. } => return Err(RewriteError::NotTcpOrUdp),
    };
    let mut ip = ip_view(frame, parsed.l3_offset, proto)?;
    let old_addr = match side {
        Side::Src => ip.src_addr(),
        Side::Dst => ip.dst_addr(),
    };
    // Transport first: its checks can still fail, and nothing is written
    // before they pass.
    match proto {
        proto::TCP => {
            let mut t = TcpPacket::new_checked(ip.payload_mut())
                .map_err(|_| RewriteError::FrameMismatch)?;
            let old_port = match side {
                Side::Src => t.src_port(),
                Side::Dst => t.dst_port(),
            };
            match side {
                Side::Src => t.set_src_port(port),
                Side::Dst => t.set_dst_port(port),
            }
            // The TCP checksum covers the pseudo-header address and the port.
            t.set_checksum(update16(
                update_addr(t.checksum(), old_addr, addr),
                old_port,
                port,
            ));
        }
        proto::UDP => {
            let mut u = UdpPacket::new_checked(ip.payload_mut())
                .map_err(|_| RewriteError::FrameMismatch)?;
            let old_port = match side {
                Side::Src => u.src_port(),
                Side::Dst => u.dst_port(),
            };
            match side {
                Side::Src => u.set_src_port(port),
                Side::Dst => u.set_dst_port(port),
            }
            // RFC 768: zero means the sender computed no checksum; keep it so.
            if u.checksum() != 0 {
                u.set_checksum(udp_nonzero(update16(
                    update_addr(u.checksum(), old_addr, addr),
                    old_port,
                    port,
                )));
            }
        }
        _ => return Err(RewriteError::FrameMismatch),
    }
    set_addr(&mut ip, side, old_addr, addr);
    Ok(())
}

/// The DR rewrite (and the last step after NAT): sets the Ethernet source
/// and destination. A VLAN tag, if any, is kept.
pub fn set_macs(frame: &mut [u8], src: MacAddr, dst: MacAddr) -> Result<(), RewriteError> {
    let mut eth = EthernetFrame::new_checked(frame).map_err(|_| RewriteError::Truncated)?;
    eth.set_src_addr(src);
    eth.set_dst_addr(dst);
    Ok(())
}

/// An ICMP error travelling client side -> real server, about a packet
/// `VIP:vport -> client:cport` that this balancer sent (a reverse-NATed
/// reply), e.g. a router's "fragmentation needed" or the client's "port
/// unreachable". Outer destination `VIP` becomes `new_dst`; the quoted
/// packet's *source* `VIP:vport` becomes `new_dst:new_dst_port`, so that the
/// real server recognises its own packet. The arguments are those of
/// [`nat_forward`] for the same flow: [`Parsed::flow_key`] of this error is
/// the client's `client:cport -> VIP:vport`.
///
/// Fixed: the outer IPv4 checksum (incremental), the quoted IPv4 header
/// checksum (incremental), the quoted UDP checksum (in the 8 quoted bytes;
/// incremental, zero kept zero), the quoted TCP checksum when the quote is
/// long enough to hold it (see below), and the ICMP checksum (verified
/// first, then recomputed over the message).
///
/// The quoted TCP checksum is at bytes 16..18 of the TCP header, past the 8
/// bytes RFC 792 guarantees. When a sender quotes more (RFC 1812 §4.3.2.3;
/// Linux quotes up to 576 bytes) it is updated like the others; when it is
/// not there (or only one of its bytes is), nothing can be done and nothing
/// needs to be: receivers match
/// an error to a socket by the quoted addresses and ports (RFC 1122 §3.2.2,
/// Linux `tcp_v4_err`) and never verify a quoted transport checksum.
pub fn icmp_error_forward(
    frame: &mut [u8],
    parsed: &Parsed,
    new_dst: Ipv4Addr,
    new_dst_port: u16,
) -> Result<(), RewriteError> {
    icmp_error(frame, parsed, Side::Dst, new_dst, new_dst_port)
}

/// An ICMP error travelling real-server side -> client, about a packet
/// `client:cport -> rs:port` (a forward-NATed packet), e.g. the real server's
/// "port unreachable" or a back-side router's "fragmentation needed". Outer
/// source becomes `new_src` (the VIP: the client knows no other address);
/// the quoted packet's *destination* `rs:port` becomes
/// `new_src:new_src_port`, what the client sent to. The arguments are those
/// of [`nat_reverse`] for the same flow ([`Parsed::flow_key`] of this error
/// is `rs:port -> client:cport`, the reply direction). Checksums as in
/// [`icmp_error_forward`]. This is what IPVS does (`ip_vs_nat_icmp`).
pub fn icmp_error_reverse(
    frame: &mut [u8],
    parsed: &Parsed,
    new_src: Ipv4Addr,
    new_src_port: u16,
) -> Result<(), RewriteError> {
    icmp_error(frame, parsed, Side::Src, new_src, new_src_port)
}

fn icmp_error(
    frame: &mut [u8],
    parsed: &Parsed,
    outer: Side,
    addr: Ipv4Addr,
    port: u16,
) -> Result<(), RewriteError> {
    match parsed.kind {
        Kind::Arp(_) => return Err(RewriteError::NotIpv4),
        Kind::Ipv4 { fragment: true, .. } => return Err(RewriteError::Fragment),
        Kind::Ipv4 {
            l4: L4::IcmpError { .. },
            ..
        } => {}
        Kind::Ipv4 { .. } => return Err(RewriteError::NotIcmpError),
    }
    let mut ip = ip_view(frame, parsed.l3_offset, proto::ICMP)?;
    let old_outer = match outer {
        Side::Src => ip.src_addr(),
        Side::Dst => ip.dst_addr(),
    };
    {
        let mut icmp =
            IcmpPacket::new_checked(ip.payload_mut()).map_err(|_| RewriteError::FrameMismatch)?;
        if !icmp.is_error() {
            return Err(RewriteError::FrameMismatch);
        }
        if !icmp.verify_checksum() {
            return Err(RewriteError::BadIcmpChecksum);
        }
        // The quoted packet travelled the other way: its field on the
        // opposite side is the one that names us.
        rewrite_quote(icmp.data_mut(), outer.opposite(), addr, port)?;
        icmp.fill_checksum();
    }
    set_addr(&mut ip, outer, old_outer, addr);
    Ok(())
}

fn rewrite_quote(
    quote: &mut [u8],
    side: Side,
    addr: Ipv4Addr,
    port: u16,
) -> Result<(), RewriteError> {
    // The quote's own length, not the quoted total length: parse accepted
    // the error on the same test (a quoted total length may be anything).
    let quote_len = quote.len();
    let mut qip =
        Ipv4Packet::new_checked_quoted(&mut *quote).map_err(|_| RewriteError::FrameMismatch)?;
    let hl = qip.header_len();
    let qproto = qip.protocol();
    // Only a first fragment's 8 bytes are a transport header.
    let ports = matches!(qproto, proto::TCP | proto::UDP) && qip.frag_offset() == 0;
    if quote_len < hl + QUOTED_L4_LEN {
        return Err(RewriteError::FrameMismatch);
    }
    let old_addr = match side {
        Side::Src => qip.src_addr(),
        Side::Dst => qip.dst_addr(),
    };
    set_addr(&mut qip, side, old_addr, addr);
    if !ports {
        return Ok(());
    }
    let l4 = quote.get_mut(hl..).ok_or(RewriteError::FrameMismatch)?;
    let at = match side {
        Side::Src => 0,
        Side::Dst => 2,
    };
    let old_port = u16::from_be_bytes([l4[at], l4[at + 1]]);
    l4[at..at + 2].copy_from_slice(&port.to_be_bytes());
    let cs_at = if qproto == proto::UDP {
        udp::CHECKSUM_OFFSET
    } else {
        tcp::CHECKSUM_OFFSET
    };
    if let Some(cs) = l4.get_mut(cs_at..cs_at + 2) {
        let old = u16::from_be_bytes([cs[0], cs[1]]);
        let new = if qproto == proto::UDP {
            if old == 0 {
                0
            } else {
                udp_nonzero(update16(update_addr(old, old_addr, addr), old_port, port))
            }
        } else {
            update16(update_addr(old, old_addr, addr), old_port, port)
        };
        cs.copy_from_slice(&new.to_be_bytes());
    }
    Ok(())
}

/// Computes the full transport checksum of a frame whose checksum field is
/// *partial*, so that later incremental updates are valid.
///
/// Linux hands a locally generated TCP or UDP packet to a device with
/// `CHECKSUM_PARTIAL` when the device (veth, lo, most NICs) offers TX
/// checksum offload; an AF_PACKET reader sees it with `TP_STATUS_CSUMNOTREADY`
/// (`skbuff.h`: "the driver is required to checksum the packet as seen by
/// hard_start_xmit() from skb->csum_start up to the end, and to record the
/// checksum at offset skb->csum_start + skb->csum_offset"). The stack has
/// put the folded pseudo-header sum, *not* inverted, into the field
/// (`__tcp_v4_send_check`: `th->check = ~tcp_v4_check(len, saddr, daddr,
/// 0)`; `udp4_hwcsum` likewise).
///
/// What this relies on: only that `csum_start` is the TCP / UDP header and
/// `csum_offset` its checksum field, which holds for every TCP and UDP
/// packet over IPv4 that Linux sends. The field's old content is ignored: the
/// checksum is computed from scratch over pseudo-header and segment, the
/// same as the device would (a test checks both agree). The IPv4 header
/// checksum is always computed in software, and parse has verified it.
///
/// UDP: a zero field means "no checksum" (a partial field never is zero,
/// since the pseudo-header sum of a real packet is not) and is kept; a
/// computed zero is sent as `0xffff`. ICMP is recomputed over the message.
/// Other protocols: [`RewriteError::ChecksumUnsupported`]. Fragments:
/// [`RewriteError::Fragment`] (Linux completes the checksum before it
/// fragments).
pub fn complete_checksum(frame: &mut [u8], parsed: &Parsed) -> Result<(), RewriteError> {
    let (proto, l4) = match parsed.kind {
        Kind::Arp(_) => return Err(RewriteError::NotIpv4),
        Kind::Ipv4 { fragment: true, .. } => return Err(RewriteError::Fragment),
        Kind::Ipv4 { proto, l4, .. } => (proto, l4),
    };
    let mut ip = ip_view(frame, parsed.l3_offset, proto)?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    match l4 {
        L4::Tcp { .. } => {
            let mut t = TcpPacket::new_checked(ip.payload_mut())
                .map_err(|_| RewriteError::FrameMismatch)?;
            t.fill_checksum(src, dst);
        }
        L4::Udp { .. } => {
            let mut u = UdpPacket::new_checked(ip.payload_mut())
                .map_err(|_| RewriteError::FrameMismatch)?;
            if u.checksum() != 0 {
                u.fill_checksum(src, dst);
            }
        }
        L4::IcmpError { .. } | L4::IcmpOther { .. } => {
            let mut i = IcmpPacket::new_checked(ip.payload_mut())
                .map_err(|_| RewriteError::FrameMismatch)?;
            i.fill_checksum();
        }
        L4::Other => return Err(RewriteError::ChecksumUnsupported),
    }
    Ok(())
}

/// The IPv4 view at `l3`, checked, carrying `proto`.
fn ip_view(frame: &mut [u8], l3: usize, proto: u8) -> Result<Ipv4Packet<&mut [u8]>, RewriteError> {
    let b = frame.get_mut(l3..).ok_or(RewriteError::FrameMismatch)?;
    let ip = Ipv4Packet::new_checked(b).map_err(|_| RewriteError::FrameMismatch)?;
    if ip.protocol() != proto {
        return Err(RewriteError::FrameMismatch);
    }
    Ok(ip)
}

/// Writes an address and updates the header checksum (RFC 1624 eqn. 3).
fn set_addr<T: AsRef<[u8]> + AsMut<[u8]>>(
    ip: &mut Ipv4Packet<T>,
    side: Side,
    old: Ipv4Addr,
    new: Ipv4Addr,
) {
    match side {
        Side::Src => ip.set_src_addr(new),
        Side::Dst => ip.set_dst_addr(new),
    }
    ip.set_checksum(update_addr(ip.checksum(), old, new));
}

/// The sum a partial checksum field holds (pseudo-header only, folded, not
/// inverted), as Linux writes it for `CHECKSUM_PARTIAL`. For tests and
/// tools that fabricate such frames.
pub fn partial_checksum_value(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: u16) -> u16 {
    checksum::pseudo_header(src, dst, proto, l4_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlowKey;
    use crate::captures::*;
    use crate::packet::parse;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const RS: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);

    /// IPv4 header and transport checksum of a frame, and whether both
    /// verify with a full computation.
    fn verify(frame: &[u8]) -> bool {
        let p = parse(frame).unwrap();
        let ip = Ipv4Packet::new_checked(&frame[p.l3_offset..]).unwrap();
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        ip.verify_checksum()
            && match ip.protocol() {
                proto::TCP => TcpPacket::new_checked(ip.payload())
                    .unwrap()
                    .verify_checksum(s, d),
                proto::UDP => UdpPacket::new_checked(ip.payload())
                    .unwrap()
                    .verify_checksum(s, d),
                proto::ICMP => IcmpPacket::new_checked(ip.payload())
                    .unwrap()
                    .verify_checksum(),
                _ => true,
            }
    }

    #[test]
    fn nat_forward_on_captured_segment_keeps_checksums_valid() {
        let mut f = TCP_GET;
        let p = parse(&f).unwrap();
        nat_forward(&mut f, &p, RS, 8080).unwrap();
        let q = parse(&f).unwrap();
        assert_eq!(
            q.flow_key().unwrap(),
            FlowKey::new(6, Ipv4Addr::new(198, 18, 0, 2), 38922, RS, 8080)
        );
        assert!(verify(&f));
        // A source rewrite of the same frame keeps them valid too.
        let mut back = f;
        nat_reverse(&mut back, &q, VIP, 80).unwrap();
        // Rewriting the destination back restores the captured bytes.
        let mut undo = f;
        nat_forward(&mut undo, &q, VIP, 80).unwrap();
        assert_eq!(
            undo, TCP_GET,
            "forward then inverse forward is the identity"
        );
        assert!(verify(&back));
    }

    #[test]
    fn nat_reverse_on_captured_udp() {
        let mut f = UDP_DNS_QUERY;
        let p = parse(&f).unwrap();
        nat_reverse(&mut f, &p, Ipv4Addr::new(203, 0, 113, 9), 5353).unwrap();
        assert!(verify(&f));
        let q = parse(&f).unwrap();
        assert_eq!(q.flow_key().unwrap().src, Ipv4Addr::new(203, 0, 113, 9));
        assert_eq!(q.flow_key().unwrap().src_port, 5353);
    }

    #[test]
    fn complete_checksum_matches_the_kernel_on_captured_partial_frames() {
        // tcpdump said "cksum 0x8cb9 (incorrect -> 0xc0a1)".
        let mut f = TCP_SYN_PARTIAL;
        assert_eq!(&f[50..52], &[0x8c, 0xb9]);
        assert!(!verify(&f));
        let p = parse(&f).unwrap();
        complete_checksum(&mut f, &p).unwrap();
        assert_eq!(&f[50..52], &[0xc0, 0xa1]);
        assert!(verify(&f));
        // "bad udp cksum 0x8cc1 -> 0xf043!"
        let mut f = UDP_DNS_PARTIAL;
        assert_eq!(&f[40..42], &[0x8c, 0xc1]);
        let p = parse(&f).unwrap();
        complete_checksum(&mut f, &p).unwrap();
        assert_eq!(&f[40..42], &[0xf0, 0x43]);
        assert!(verify(&f));
    }

    #[test]
    fn partial_field_is_the_pseudo_header_sum_as_linux_documents() {
        // What we rely on, checked on the kernel's own output: the field
        // holds the folded, non-inverted pseudo-header sum, and the device's
        // algorithm (sum from csum_start to the end, invert, store) gives
        // the same as our from-scratch completion.
        for (f, proto, cs_at) in [
            (&TCP_SYN_PARTIAL[..], proto::TCP, 50),
            (&UDP_DNS_PARTIAL[..], proto::UDP, 40),
        ] {
            let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
            let l4_len = ip.payload().len() as u16;
            let pseudo = partial_checksum_value(ip.src_addr(), ip.dst_addr(), proto, l4_len);
            assert_eq!(u16::from_be_bytes([f[cs_at], f[cs_at + 1]]), pseudo);
            let device = !checksum::data(ip.payload());
            let mut full = f.to_vec();
            complete_checksum(&mut full, &parse(f).unwrap()).unwrap();
            assert_eq!(u16::from_be_bytes([full[cs_at], full[cs_at + 1]]), device);
        }
    }

    #[test]
    fn incremental_update_on_a_partial_frame_is_wrong_without_completion() {
        // The reason complete_checksum exists.
        let mut raw = TCP_SYN_PARTIAL;
        let p = parse(&raw).unwrap();
        nat_forward(&mut raw, &p, RS, 8080).unwrap();
        assert!(!verify(&raw), "NAT of a partial checksum yields garbage");
        let mut fixed = TCP_SYN_PARTIAL;
        complete_checksum(&mut fixed, &p).unwrap();
        nat_forward(&mut fixed, &p, RS, 8080).unwrap();
        assert!(verify(&fixed));
    }

    #[test]
    fn icmp_error_reverse_on_captured_port_unreachable() {
        // Pretend 198.18.0.100 is a real server behind VIP 203.0.113.1:53:
        // its "port unreachable" about client -> rs:9999 must reach the
        // client as coming from the VIP about client -> VIP:53.
        let vip = Ipv4Addr::new(203, 0, 113, 1);
        let mut f = ICMP_PORT_UNREACH;
        let p = parse(&f).unwrap();
        icmp_error_reverse(&mut f, &p, vip, 53).unwrap();
        assert!(verify(&f));
        let q = parse(&f).unwrap();
        match q.kind {
            Kind::Ipv4 {
                src,
                l4: L4::IcmpError { inner, .. },
                ..
            } => {
                assert_eq!(src, vip);
                assert_eq!(
                    inner,
                    FlowKey::new(17, Ipv4Addr::new(198, 18, 0, 2), 41214, vip, 53)
                );
            }
            k => panic!("{k:?}"),
        }
        let icmp = IcmpPacket::new_checked(&f[34..]).unwrap();
        let quoted = icmp.quoted().unwrap();
        assert!(quoted.ip.verify_checksum());
        // Linux quoted the whole datagram: the quoted UDP checksum verifies too.
        let udp = UdpPacket::new_checked(quoted.ip.payload()).unwrap();
        assert!(udp.verify_checksum(quoted.ip.src_addr(), quoted.ip.dst_addr()));
    }

    #[test]
    fn wrong_kinds_are_refused_and_the_frame_is_untouched() {
        let v = RS;
        let mut arp = ARP_REQUEST;
        let pa = parse(&arp).unwrap();
        assert_eq!(nat_forward(&mut arp, &pa, v, 1), Err(RewriteError::NotIpv4));
        assert_eq!(complete_checksum(&mut arp, &pa), Err(RewriteError::NotIpv4));
        assert_eq!(
            icmp_error_forward(&mut arp, &pa, v, 1),
            Err(RewriteError::NotIpv4)
        );
        let mut echo = ICMP_ECHO_REQUEST;
        let pe = parse(&echo).unwrap();
        assert_eq!(
            nat_forward(&mut echo, &pe, v, 1),
            Err(RewriteError::NotTcpOrUdp)
        );
        assert_eq!(
            icmp_error_reverse(&mut echo, &pe, v, 1),
            Err(RewriteError::NotIcmpError)
        );
        assert_eq!(echo, ICMP_ECHO_REQUEST);
        let mut tcp = TCP_GET;
        let pt = parse(&tcp).unwrap();
        assert_eq!(
            icmp_error_forward(&mut tcp, &pt, v, 1),
            Err(RewriteError::NotIcmpError)
        );
        // A summary of another frame: refused, never a panic.
        assert_eq!(
            nat_forward(&mut tcp, &pe, v, 1),
            Err(RewriteError::NotTcpOrUdp)
        );
        let pu = parse(&UDP_DNS_QUERY).unwrap();
        assert_eq!(
            nat_forward(&mut tcp, &pu, v, 1),
            Err(RewriteError::FrameMismatch)
        );
        assert_eq!(
            nat_forward(&mut tcp[..40], &pt, v, 1),
            Err(RewriteError::FrameMismatch)
        );
        assert_eq!(tcp, TCP_GET);
    }

    #[test]
    fn quoted_total_length_shorter_than_the_quote_is_still_rewritten() {
        // parse accepts an error whose quoted header claims a total length
        // of 20 (the quote still holds 8 more bytes); the rewrite must too.
        let mut f = ICMP_PORT_UNREACH;
        f[44..46].copy_from_slice(&20u16.to_be_bytes());
        f[52..54].fill(0);
        let c = !checksum::data(&f[42..62]);
        f[52..54].copy_from_slice(&c.to_be_bytes());
        IcmpPacket::new_checked(&mut f[34..])
            .unwrap()
            .fill_checksum();
        let p = parse(&f).unwrap();
        icmp_error_reverse(&mut f, &p, VIP, 53).unwrap();
        assert!(verify(&f));
        assert_eq!(&f[64..66], &53u16.to_be_bytes());
    }

    #[test]
    fn bad_icmp_checksum_is_not_laundered() {
        let mut f = ICMP_PORT_UNREACH;
        f[74] ^= 0xff; // last quoted payload byte
        let p = parse(&f).unwrap();
        let before = f;
        assert_eq!(
            icmp_error_reverse(&mut f, &p, VIP, 53),
            Err(RewriteError::BadIcmpChecksum)
        );
        assert_eq!(f, before);
    }

    #[test]
    fn set_macs_rewrites_only_the_addresses() {
        let mut f = TCP_GET;
        let (s, d) = (
            MacAddr::new(2, 0, 0, 0, 0, 0xa),
            MacAddr::new(2, 0, 0, 0, 0, 0xb),
        );
        set_macs(&mut f, s, d).unwrap();
        assert_eq!(&f[..12], &[2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa]);
        assert_eq!(&f[12..], &TCP_GET[12..]);
        assert_eq!(set_macs(&mut f[..13], s, d), Err(RewriteError::Truncated));
    }

    #[test]
    fn rewrite_error_names_are_unique() {
        let mut n: Vec<_> = RewriteError::ALL.iter().map(|e| e.as_str()).collect();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), RewriteError::ALL.len());
    }
}
