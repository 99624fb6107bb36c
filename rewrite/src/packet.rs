//! The one entry point the dataplane calls per frame: [`parse`].
//!
//! It validates the frame once (Ethernet, one optional 802.1Q tag, ARP or
//! IPv4 with its header checksum, the TCP / UDP / ICMP header, the datagram
//! quoted by an ICMP error) and returns a small `Copy` summary, or the
//! reason to drop the frame. Transport checksums are *not* verified: a frame
//! read from a veth may carry a partial checksum (see
//! [`crate::nat::complete_checksum`]), and the rewrites keep a bad checksum
//! bad, so that the receiver still drops it.

use core::net::Ipv4Addr;

use crate::WireError;
use crate::arp::{ArpPacket, ArpRepr};
use crate::ethernet::{EthernetFrame, MacAddr, ethertype};
use crate::flow::{FlowKey, proto};
use crate::icmp::IcmpPacket;
use crate::ipv4::Ipv4Packet;
use crate::tcp::{TcpFlags, TcpPacket};
use crate::udp::UdpPacket;

/// Summary of a frame that passed [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Parsed {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    /// The 802.1Q VLAN id, if the frame is tagged.
    pub vlan: Option<u16>,
    /// Offset of the ARP or IPv4 header in the frame (14, or 18 if tagged).
    pub l3_offset: usize,
    pub kind: Kind,
}

/// What the frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Arp(ArpRepr),
    Ipv4 {
        /// IPv4 header length in bytes (20..=60).
        header_len: usize,
        /// IPv4 total length; the frame may be longer (Ethernet padding).
        total_len: usize,
        ttl: u8,
        proto: u8,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// MF set or offset non-zero. Fragments are not looked into:
        /// `l4` is [`L4::Other`] and [`Parsed::flow_key`] is `None`.
        fragment: bool,
        /// IHL > 5.
        has_options: bool,
        l4: L4,
    },
}

/// The transport header, as far as the dataplane needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: TcpFlags,
        /// The sequence number (a SYN's is the connection's initial one).
        seq: u32,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// An ICMP error (destination unreachable, source quench, redirect, time
    /// exceeded, parameter problem) and the flow of the datagram it quotes,
    /// as that datagram was sent. Ports are zero unless the quoted datagram
    /// is TCP or UDP and not a non-first fragment.
    IcmpError {
        icmp_type: u8,
        code: u8,
        inner: FlowKey,
    },
    /// Any other ICMP message (echo request / reply, ...).
    IcmpOther {
        icmp_type: u8,
        code: u8,
    },
    /// Another protocol, or a fragment.
    Other,
}

impl Parsed {
    /// The flow this frame belongs to, oriented the way the frame travels.
    ///
    /// - TCP / UDP: the frame's own 5-tuple.
    /// - ICMP error: the quoted flow *reversed*. An error travels back to the
    ///   sender of the quoted datagram, so an error about a packet
    ///   `VIP:80 -> client:5555` yields `client:5555 -> VIP:80`: the same key
    ///   as the client's own packets, and the same connection-table lookup.
    /// - Other ICMP and other protocols: addresses, ports zero.
    /// - ARP and IPv4 fragments: `None` (no ports to steer a fragment by:
    ///   without reassembly the dataplane cannot send all fragments of a
    ///   datagram to the same place).
    pub fn flow_key(&self) -> Option<FlowKey> {
        match self.kind {
            Kind::Arp(_) => None,
            Kind::Ipv4 { fragment: true, .. } => None,
            Kind::Ipv4 {
                proto,
                src,
                dst,
                l4,
                ..
            } => Some(match l4 {
                L4::Tcp {
                    src_port, dst_port, ..
                }
                | L4::Udp { src_port, dst_port } => {
                    FlowKey::new(proto, src, src_port, dst, dst_port)
                }
                L4::IcmpError { inner, .. } => inner.reversed(),
                L4::IcmpOther { .. } | L4::Other => FlowKey::new(proto, src, 0, dst, 0),
            }),
        }
    }

    /// Offset of the transport header in the frame (IPv4 only).
    pub fn l4_offset(&self) -> Option<usize> {
        match self.kind {
            Kind::Ipv4 { header_len, .. } => Some(self.l3_offset + header_len),
            Kind::Arp(_) => None,
        }
    }

    /// End of the IPv4 datagram in the frame (what follows is padding).
    pub fn l3_end(&self) -> Option<usize> {
        match self.kind {
            Kind::Ipv4 { total_len, .. } => Some(self.l3_offset + total_len),
            Kind::Arp(_) => None,
        }
    }
}

/// Why [`parse`] refused a frame. The dataplane counts drops by
/// [`ParseError::as_str`]; the names are stable (metrics labels).
///
/// Frames read from an AF_PACKET socket are copies: the kernel has its own
/// and (for VIP traffic) is kept off it by the ingress filter, so "drop"
/// below means "do not forward, count".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// Shorter than an Ethernet header (14 bytes, 18 with an 802.1Q tag): a
    /// runt. Drop and count.
    #[error("frame shorter than its Ethernet header")]
    Truncated,
    /// Neither IPv4 nor ARP (IPv6, LLDP, a second VLAN tag, ...). Not the
    /// balancer's: ignore and count.
    #[error("ethertype neither IPv4 nor ARP")]
    UnsupportedEthertype,
    /// ARP shorter than 28 bytes. Drop and count.
    #[error("ARP packet truncated")]
    ArpTruncated,
    /// ARP for other than Ethernet / IPv4. Ignore and count.
    #[error("ARP for other than Ethernet/IPv4")]
    ArpUnsupported,
    /// IPv4 payload shorter than 20 bytes. Drop and count.
    #[error("IPv4 header truncated")]
    Ipv4Truncated,
    /// Version field is not 4 behind an IPv4 ethertype. Drop and count.
    #[error("IP version is not 4")]
    BadVersion,
    /// IHL below 5, or the header longer than the frame. Drop and count
    /// (RFC 1812 §5.2.2: a router must discard it).
    #[error("bad IPv4 header length")]
    BadHeaderLength,
    /// Total length below the header length, or longer than the frame
    /// (a frame longer than the total length is padding and fine). Drop and
    /// count (RFC 1812 §5.2.2).
    #[error("bad IPv4 total length")]
    BadTotalLength,
    /// The IPv4 header checksum does not verify. Drop and count (RFC 1812
    /// §5.2.2: a router must verify it and discard on failure).
    #[error("bad IPv4 header checksum")]
    BadIpChecksum,
    /// TCP segment shorter than 20 bytes: no ports. Drop and count.
    #[error("TCP header truncated")]
    TcpTruncated,
    /// TCP data offset below 5 or past the segment. Drop and count.
    #[error("bad TCP data offset")]
    BadTcpDataOffset,
    /// UDP datagram shorter than 8 bytes. Drop and count.
    #[error("UDP header truncated")]
    UdpTruncated,
    /// UDP length field below 8 or past the IP payload. Drop and count.
    #[error("bad UDP length")]
    BadUdpLength,
    /// ICMP message shorter than its 8-byte header. Drop and count.
    #[error("ICMP header truncated")]
    IcmpTruncated,
    /// ICMP error whose quote is shorter than an IPv4 header plus 8 bytes
    /// (RFC 792 / RFC 1122 §3.2.2 require both): it cannot be tied to a
    /// flow. Drop and count.
    #[error("ICMP error quotes less than an IPv4 header plus 8 bytes")]
    IcmpErrorTruncated,
    /// ICMP error whose quote is not an IPv4 header (bad version or IHL).
    /// Drop and count.
    #[error("ICMP error quotes something that is not an IPv4 header")]
    IcmpErrorMalformed,
}

impl ParseError {
    /// Every variant, in declaration order (to pre-register counters).
    pub const ALL: [ParseError; 16] = [
        ParseError::Truncated,
        ParseError::UnsupportedEthertype,
        ParseError::ArpTruncated,
        ParseError::ArpUnsupported,
        ParseError::Ipv4Truncated,
        ParseError::BadVersion,
        ParseError::BadHeaderLength,
        ParseError::BadTotalLength,
        ParseError::BadIpChecksum,
        ParseError::TcpTruncated,
        ParseError::BadTcpDataOffset,
        ParseError::UdpTruncated,
        ParseError::BadUdpLength,
        ParseError::IcmpTruncated,
        ParseError::IcmpErrorTruncated,
        ParseError::IcmpErrorMalformed,
    ];

    /// A stable snake_case name, for counters and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::UnsupportedEthertype => "unsupported_ethertype",
            ParseError::ArpTruncated => "arp_truncated",
            ParseError::ArpUnsupported => "arp_unsupported",
            ParseError::Ipv4Truncated => "ipv4_truncated",
            ParseError::BadVersion => "bad_version",
            ParseError::BadHeaderLength => "bad_header_length",
            ParseError::BadTotalLength => "bad_total_length",
            ParseError::BadIpChecksum => "bad_ip_checksum",
            ParseError::TcpTruncated => "tcp_truncated",
            ParseError::BadTcpDataOffset => "bad_tcp_data_offset",
            ParseError::UdpTruncated => "udp_truncated",
            ParseError::BadUdpLength => "bad_udp_length",
            ParseError::IcmpTruncated => "icmp_truncated",
            ParseError::IcmpErrorTruncated => "icmp_error_truncated",
            ParseError::IcmpErrorMalformed => "icmp_error_malformed",
        }
    }
}

/// Parses one Ethernet frame (without FCS). Never panics, never allocates.
pub fn parse(frame: &[u8]) -> Result<Parsed, ParseError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| ParseError::Truncated)?;
    let kind = match eth.payload_ethertype() {
        ethertype::IPV4 => parse_ipv4(eth.payload())?,
        ethertype::ARP => {
            let arp = ArpPacket::new_checked(eth.payload()).map_err(|e| match e {
                WireError::Truncated => ParseError::ArpTruncated,
                _ => ParseError::ArpUnsupported,
            })?;
            Kind::Arp(ArpRepr::parse(&arp))
        }
        _ => return Err(ParseError::UnsupportedEthertype),
    };
    Ok(Parsed {
        src_mac: eth.src_addr(),
        dst_mac: eth.dst_addr(),
        vlan: eth.vlan_id(),
        l3_offset: eth.header_len(),
        kind,
    })
}

fn parse_ipv4(b: &[u8]) -> Result<Kind, ParseError> {
    let ip = Ipv4Packet::new_checked(b).map_err(|e| match e {
        WireError::Truncated => ParseError::Ipv4Truncated,
        WireError::BadVersion => ParseError::BadVersion,
        WireError::BadHeaderLength => ParseError::BadHeaderLength,
        _ => ParseError::BadTotalLength,
    })?;
    if !ip.verify_checksum() {
        return Err(ParseError::BadIpChecksum);
    }
    let fragment = ip.is_fragment();
    let l4 = if fragment {
        L4::Other
    } else {
        match ip.protocol() {
            proto::TCP => {
                let t = TcpPacket::new_checked(ip.payload()).map_err(|e| match e {
                    WireError::Truncated => ParseError::TcpTruncated,
                    _ => ParseError::BadTcpDataOffset,
                })?;
                L4::Tcp {
                    src_port: t.src_port(),
                    dst_port: t.dst_port(),
                    flags: t.flags(),
                    seq: t.seq_number(),
                }
            }
            proto::UDP => {
                let u = UdpPacket::new_checked(ip.payload()).map_err(|e| match e {
                    WireError::Truncated => ParseError::UdpTruncated,
                    _ => ParseError::BadUdpLength,
                })?;
                L4::Udp {
                    src_port: u.src_port(),
                    dst_port: u.dst_port(),
                }
            }
            proto::ICMP => parse_icmp(ip.payload())?,
            _ => L4::Other,
        }
    };
    Ok(Kind::Ipv4 {
        header_len: ip.header_len(),
        total_len: usize::from(ip.total_len()),
        ttl: ip.ttl(),
        proto: ip.protocol(),
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        fragment,
        has_options: ip.has_options(),
        l4,
    })
}

fn parse_icmp(b: &[u8]) -> Result<L4, ParseError> {
    let icmp = IcmpPacket::new_checked(b).map_err(|_| ParseError::IcmpTruncated)?;
    let (icmp_type, code) = (icmp.msg_type(), icmp.code());
    if !icmp.is_error() {
        return Ok(L4::IcmpOther { icmp_type, code });
    }
    let q = icmp.quoted().map_err(|e| match e {
        WireError::Truncated => ParseError::IcmpErrorTruncated,
        _ => ParseError::IcmpErrorMalformed,
    })?;
    let p = q.ip.protocol();
    // The 8 quoted bytes are a transport header only in a first fragment.
    let has_ports = matches!(p, proto::TCP | proto::UDP) && q.ip.frag_offset() == 0;
    let (sp, dp) = if has_ports {
        (q.src_port(), q.dst_port())
    } else {
        (0, 0)
    };
    let inner = FlowKey::new(p, q.ip.src_addr(), sp, q.ip.dst_addr(), dp);
    Ok(L4::IcmpError {
        icmp_type,
        code,
        inner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_all_is_complete() {
        let mut names: Vec<&str> = ParseError::ALL.iter().map(|e| e.as_str()).collect();
        for n in &names {
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{n}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ParseError::ALL.len());
        // A new variant must be added to ALL: this match fails to compile
        // otherwise, and the index check keeps ALL in declaration order.
        for (i, e) in ParseError::ALL.iter().enumerate() {
            let idx = match e {
                ParseError::Truncated => 0,
                ParseError::UnsupportedEthertype => 1,
                ParseError::ArpTruncated => 2,
                ParseError::ArpUnsupported => 3,
                ParseError::Ipv4Truncated => 4,
                ParseError::BadVersion => 5,
                ParseError::BadHeaderLength => 6,
                ParseError::BadTotalLength => 7,
                ParseError::BadIpChecksum => 8,
                ParseError::TcpTruncated => 9,
                ParseError::BadTcpDataOffset => 10,
                ParseError::UdpTruncated => 11,
                ParseError::BadUdpLength => 12,
                ParseError::IcmpTruncated => 13,
                ParseError::IcmpErrorTruncated => 14,
                ParseError::IcmpErrorMalformed => 15,
            };
            assert_eq!(i, idx);
        }
    }

    #[test]
    fn empty_and_short_frames_are_runts() {
        for n in 0..14 {
            assert_eq!(parse(&[0u8; 14][..n]), Err(ParseError::Truncated));
        }
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;
    use crate::arp::ArpOp;
    use crate::captures::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const CLIENT_MAC: MacAddr = MacAddr([0x96, 0xbb, 0x46, 0x5d, 0x7f, 0x0c]);
    const SERVER_MAC: MacAddr = MacAddr([0x16, 0xf4, 0x05, 0x1d, 0xbd, 0x77]);

    fn ipv4(frame: &[u8]) -> (Parsed, usize, usize, u8, bool, bool, L4) {
        let p = parse(frame).unwrap();
        match p.kind {
            Kind::Ipv4 {
                header_len,
                total_len,
                proto,
                fragment,
                has_options,
                l4,
                src,
                dst,
                ttl,
            } => {
                assert_eq!(ttl, 64);
                assert!(src == CLIENT || src == SERVER);
                assert!(dst == CLIENT || dst == SERVER);
                (p, header_len, total_len, proto, fragment, has_options, l4)
            }
            Kind::Arp(_) => panic!("not IPv4"),
        }
    }

    #[test]
    fn test_parse_tcp_syn() {
        let (p, hl, tl, pr, frag, opts, l4) = ipv4(&TCP_SYN);
        assert_eq!(
            (p.src_mac, p.dst_mac, p.vlan, p.l3_offset),
            (CLIENT_MAC, SERVER_MAC, None, 14)
        );
        assert_eq!((hl, tl, pr, frag, opts), (20, 60, 6, false, false));
        assert_eq!(
            l4,
            L4::Tcp {
                src_port: 38922,
                dst_port: 80,
                flags: TcpFlags::SYN,
                seq: 3_360_807_021 // tcpdump: seq 3360807021
            }
        );
        assert_eq!(
            p.flow_key(),
            Some(FlowKey::new(6, CLIENT, 38922, SERVER, 80))
        );
        assert_eq!((p.l4_offset(), p.l3_end()), (Some(34), Some(74)));
    }

    #[test]
    fn test_parse_udp() {
        let (p, _, tl, _, _, _, l4) = ipv4(&UDP_DNS_QUERY);
        assert_eq!(tl, 57);
        assert_eq!(
            l4,
            L4::Udp {
                src_port: 41214,
                dst_port: 53
            }
        );
        assert_eq!(
            p.flow_key(),
            Some(FlowKey::new(17, CLIENT, 41214, SERVER, 53))
        );
    }

    #[test]
    fn test_parse_icmp_error_keys_the_quoted_flow_reversed() {
        let (p, _, _, _, _, _, l4) = ipv4(&ICMP_PORT_UNREACH);
        let inner = FlowKey::new(17, CLIENT, 41214, SERVER, 9999);
        assert_eq!(
            l4,
            L4::IcmpError {
                icmp_type: 3,
                code: 3,
                inner
            }
        );
        // The error travels server -> client, like replies of that flow.
        assert_eq!(p.flow_key(), Some(inner.reversed()));
    }

    #[test]
    fn test_parse_icmp_echo() {
        let (p, _, _, _, _, _, l4) = ipv4(&ICMP_ECHO_REQUEST);
        assert_eq!(
            l4,
            L4::IcmpOther {
                icmp_type: 8,
                code: 0
            }
        );
        assert_eq!(p.flow_key(), Some(FlowKey::new(1, CLIENT, 0, SERVER, 0)));
    }

    #[test]
    fn test_parse_arp() {
        let p = parse(&ARP_REQUEST).unwrap();
        assert_eq!(p.dst_mac, MacAddr::BROADCAST);
        assert_eq!(p.flow_key(), None);
        assert_eq!(p.l4_offset(), None);
        match p.kind {
            Kind::Arp(a) => {
                assert_eq!(
                    (a.op, a.sender_ip, a.target_ip),
                    (ArpOp::Request, CLIENT, SERVER)
                );
            }
            Kind::Ipv4 { .. } => panic!("not ARP"),
        }
    }

    #[test]
    fn partial_checksums_do_not_stop_parse() {
        // Transport checksums are not verified by parse (see module docs).
        assert!(parse(&TCP_SYN_PARTIAL).is_ok());
        assert!(parse(&UDP_DNS_PARTIAL).is_ok());
    }

    #[test]
    fn every_truncation_of_a_real_frame_is_an_error_or_padding_free() {
        for f in [
            &TCP_SYN[..],
            &TCP_GET,
            &UDP_DNS_QUERY,
            &ICMP_PORT_UNREACH,
            &ICMP_ECHO_REQUEST,
            &ARP_REQUEST,
        ] {
            for n in 0..f.len() {
                assert!(
                    parse(&f[..n]).is_err(),
                    "prefix {n} of a {}-byte frame",
                    f.len()
                );
            }
            assert!(parse(f).is_ok());
        }
    }

    #[test]
    fn ethernet_padding_is_accepted() {
        let mut padded = [0u8; 60];
        padded[..47].copy_from_slice(&UDP_DNS_QUERY[..47]);
        // A 5-byte UDP payload frame padded to 60: rewrite the lengths.
        padded[16..18].copy_from_slice(&33u16.to_be_bytes());
        padded[38..40].copy_from_slice(&13u16.to_be_bytes());
        let mut ip = Ipv4Packet::new_checked(&mut padded[14..47]).unwrap();
        ip.fill_checksum();
        let p = parse(&padded).unwrap();
        assert_eq!(p.l3_end(), Some(47));
    }
}
