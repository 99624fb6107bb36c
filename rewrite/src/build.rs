//! A frame builder for tests (feature `builder`; always on in this crate's
//! own tests). It allocates and panics on nonsense input (`# Panics`): test
//! support, never the packet path.
//!
//! ```
//! # #[cfg(feature = "builder")] {
//! use core::net::{Ipv4Addr, SocketAddrV4};
//! use rewrite::build::FrameBuilder;
//! let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);
//! let vip = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 80);
//! let frame = FrameBuilder::tcp(client, vip).payload(b"GET /").build();
//! assert!(rewrite::parse(&frame).is_ok());
//! # }
//! ```

use core::net::{Ipv4Addr, SocketAddrV4};

use crate::Checksum;
use crate::arp::ArpRepr;
use crate::ethernet::{EthernetRepr, MacAddr, ethertype};
use crate::flow::proto;
use crate::icmp::IcmpRepr;
use crate::ipv4::Ipv4Repr;
use crate::nat::partial_checksum_value;
use crate::tcp::{TcpFlags, TcpRepr};
use crate::udp::UdpRepr;

/// Default source MAC of built frames.
pub const SRC_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
/// Default destination MAC of built frames.
pub const DST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

#[derive(Clone, Debug)]
enum L4Spec {
    Tcp(TcpRepr),
    Udp { repr: UdpRepr, checksum: bool },
    Icmp(IcmpRepr),
    Raw(u8),
}

/// Builds one Ethernet + IPv4 + TCP/UDP/ICMP frame with correct checksums.
#[derive(Clone, Debug)]
pub struct FrameBuilder {
    src_mac: MacAddr,
    dst_mac: MacAddr,
    vlan: Option<u16>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    ident: u16,
    dont_frag: bool,
    more_frags: bool,
    frag_offset: u16,
    options: Vec<u8>,
    l4: L4Spec,
    payload: Vec<u8>,
    partial: bool,
    ip_checksum: bool,
}

impl FrameBuilder {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4Spec) -> Self {
        FrameBuilder {
            src_mac: SRC_MAC,
            dst_mac: DST_MAC,
            vlan: None,
            src,
            dst,
            ttl: 64,
            ident: 0x1234,
            dont_frag: true,
            more_frags: false,
            frag_offset: 0,
            options: Vec::new(),
            l4,
            payload: Vec::new(),
            partial: false,
            ip_checksum: true,
        }
    }

    /// A TCP segment, flags ACK, seq 1, ack 1, window 502.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        let repr = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            seq: 1,
            ack: 1,
            flags: TcpFlags::ACK,
            window: 502,
            urgent: 0,
        };
        Self::new(*src.ip(), *dst.ip(), L4Spec::Tcp(repr))
    }

    /// A UDP datagram with a checksum.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        let repr = UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        };
        Self::new(
            *src.ip(),
            *dst.ip(),
            L4Spec::Udp {
                repr,
                checksum: true,
            },
        )
    }

    /// An ICMP message; for an error, put the quote in [`Self::payload`]
    /// (see [`quote`]).
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, repr: IcmpRepr) -> Self {
        Self::new(src, dst, L4Spec::Icmp(repr))
    }

    /// Another IP protocol; the payload is the whole IP payload.
    pub fn ip(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Self::new(src, dst, L4Spec::Raw(protocol))
    }

    pub fn macs(mut self, src: MacAddr, dst: MacAddr) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid);
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn ident(mut self, ident: u16) -> Self {
        self.ident = ident;
        self
    }

    pub fn dont_frag(mut self, df: bool) -> Self {
        self.dont_frag = df;
        self
    }

    /// Makes the datagram a fragment (`offset` in bytes, multiple of 8).
    pub fn fragment(mut self, more_frags: bool, offset: u16) -> Self {
        self.more_frags = more_frags;
        self.frag_offset = offset;
        self.dont_frag = false;
        self
    }

    /// IPv4 options, padded with zeros (End of Option List) to 4 bytes.
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0);
        }
        self
    }

    /// TCP only.
    pub fn flags(mut self, flags: TcpFlags) -> Self {
        if let L4Spec::Tcp(r) = &mut self.l4 {
            r.flags = flags;
        }
        self
    }

    /// TCP only.
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Self {
        if let L4Spec::Tcp(r) = &mut self.l4 {
            r.seq = seq;
            r.ack = ack;
        }
        self
    }

    /// UDP only: `false` sends checksum zero ("none").
    pub fn udp_checksum(mut self, on: bool) -> Self {
        if let L4Spec::Udp { checksum, .. } = &mut self.l4 {
            *checksum = on;
        }
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// TCP / UDP: put in the checksum field what Linux leaves there for
    /// `CHECKSUM_PARTIAL` (the pseudo-header sum, not inverted).
    pub fn partial_checksum(mut self) -> Self {
        self.partial = true;
        self
    }

    /// Leave the IPv4 header checksum zero (a bad checksum).
    pub fn no_ip_checksum(mut self) -> Self {
        self.ip_checksum = false;
        self
    }

    /// # Panics
    /// On options longer than 40 bytes, an offset not a multiple of 8, or a
    /// datagram over 65535 bytes.
    pub fn build(&self) -> Vec<u8> {
        let l4_hdr = match self.l4 {
            L4Spec::Tcp(_) => crate::tcp::HEADER_LEN,
            L4Spec::Udp { .. } => crate::udp::HEADER_LEN,
            L4Spec::Icmp(_) => crate::icmp::HEADER_LEN,
            L4Spec::Raw(_) => 0,
        };
        let l4_len = l4_hdr + self.payload.len();
        let eth = EthernetRepr {
            src: self.src_mac,
            dst: self.dst_mac,
            vlan: self.vlan,
            ethertype: ethertype::IPV4,
        };
        let protocol = match self.l4 {
            L4Spec::Tcp(_) => proto::TCP,
            L4Spec::Udp { .. } => proto::UDP,
            L4Spec::Icmp(_) => proto::ICMP,
            L4Spec::Raw(p) => p,
        };
        let ip = Ipv4Repr {
            src: self.src,
            dst: self.dst,
            protocol,
            payload_len: u16::try_from(l4_len).expect("payload fits an IPv4 datagram"),
            ttl: self.ttl,
            dscp_ecn: 0,
            ident: self.ident,
            dont_frag: self.dont_frag,
            more_frags: self.more_frags,
            frag_offset: self.frag_offset,
            options: &self.options,
        };
        let l3 = eth.buffer_len();
        let l4 = l3 + ip.buffer_len();
        let mut f = vec![0u8; l4 + l4_len];
        eth.emit(&mut f).expect("buffer sized for the header");
        let ip_cs = if self.ip_checksum {
            Checksum::Check
        } else {
            Checksum::Ignore
        };
        ip.emit(&mut f[l3..], ip_cs).expect("valid IPv4 header");
        f[l4 + l4_hdr..].copy_from_slice(&self.payload);
        let seg = &mut f[l4..];
        let seg_len = u16::try_from(seg.len()).expect("segment fits");
        match self.l4 {
            L4Spec::Tcp(r) => {
                r.emit(seg, self.src, self.dst, Checksum::Check)
                    .expect("TCP header");
                if self.partial {
                    let p = partial_checksum_value(self.src, self.dst, proto::TCP, seg_len);
                    seg[crate::tcp::CHECKSUM_OFFSET..][..2].copy_from_slice(&p.to_be_bytes());
                }
            }
            L4Spec::Udp { repr, checksum } => {
                let cs = if checksum {
                    Checksum::Check
                } else {
                    Checksum::Ignore
                };
                repr.emit(seg, self.src, self.dst, cs).expect("UDP header");
                if self.partial {
                    let p = partial_checksum_value(self.src, self.dst, proto::UDP, seg_len);
                    seg[crate::udp::CHECKSUM_OFFSET..][..2].copy_from_slice(&p.to_be_bytes());
                }
            }
            L4Spec::Icmp(r) => {
                r.emit(seg, Checksum::Check).expect("ICMP header");
            }
            L4Spec::Raw(_) => {}
        }
        f
    }
}

/// The IPv4 datagram inside a built (untagged or tagged) frame, up to its
/// total length.
///
/// # Panics
/// If `frame` is not Ethernet + IPv4.
pub fn l3(frame: &[u8]) -> &[u8] {
    let eth = crate::ethernet::EthernetFrame::new_checked(frame).expect("Ethernet frame");
    let hl = eth.header_len();
    let ip = crate::ipv4::Ipv4Packet::new_checked(&frame[hl..]).expect("IPv4 packet");
    &frame[hl..hl + usize::from(ip.total_len())]
}

/// The first `len` bytes of the datagram in `frame`: what an ICMP error
/// quotes (RFC 792: at least the header plus 8 bytes).
pub fn quote(frame: &[u8], len: usize) -> Vec<u8> {
    let d = l3(frame);
    d[..len.min(d.len())].to_vec()
}

/// An untagged ARP frame (42 bytes, no padding).
pub fn arp_frame(src_mac: MacAddr, dst_mac: MacAddr, repr: &ArpRepr) -> Vec<u8> {
    let eth = EthernetRepr {
        src: src_mac,
        dst: dst_mac,
        vlan: None,
        ethertype: ethertype::ARP,
    };
    let mut f = vec![0u8; eth.buffer_len() + repr.buffer_len()];
    let hl = eth.emit(&mut f).expect("sized");
    repr.emit(&mut f[hl..]).expect("sized");
    f
}
