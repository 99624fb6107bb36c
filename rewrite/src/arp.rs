//! ARP for Ethernet / IPv4 (RFC 826), and the two frames the active MAC
//! holder sends: the reply for the VIP and the gratuitous announcement.
//!
//! ```text
//! | htype 1 (2) | ptype 0x0800 (2) | hlen 6 | plen 4 | oper (2) |
//! | sender hw (6) | sender ip (4) | target hw (6) | target ip (4) |
//! ```

use core::net::Ipv4Addr;

use crate::ethernet::{self, EthernetRepr, MacAddr, ethertype};
use crate::{WireError, be16, put16};

mod field {
    use crate::Field;
    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// ARP hardware type for Ethernet (RFC 826; IANA "Hardware Types").
pub const HTYPE_ETHERNET: u16 = 1;

/// The ARP operation (RFC 826 `ar$op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArpOp {
    Request,
    Reply,
    /// RARP, InARP, ...: reported, never answered.
    Other(u16),
}

impl From<u16> for ArpOp {
    fn from(v: u16) -> Self {
        match v {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            o => ArpOp::Other(o),
        }
    }
}

impl From<ArpOp> for u16 {
    fn from(op: ArpOp) -> u16 {
        match op {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
            ArpOp::Other(o) => o,
        }
    }
}

/// A view of an ARP packet for Ethernet / IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Errors: [`WireError::Truncated`] under 28 bytes;
    /// [`WireError::Unsupported`] unless hardware Ethernet (1, length 6) and
    /// protocol IPv4 (0x0800, length 4).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        if be16(b, field::HTYPE) != HTYPE_ETHERNET
            || be16(b, field::PTYPE) != ethertype::IPV4
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(WireError::Unsupported);
        }
        Ok(ArpPacket { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn operation(&self) -> ArpOp {
        ArpOp::from(be16(self.buffer.as_ref(), field::OPER))
    }

    pub fn sender_mac(&self) -> MacAddr {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::SHA]);
        MacAddr(m)
    }

    pub fn sender_ip(&self) -> Ipv4Addr {
        ip(&self.buffer.as_ref()[field::SPA])
    }

    pub fn target_mac(&self) -> MacAddr {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::THA]);
        MacAddr(m)
    }

    pub fn target_ip(&self) -> Ipv4Addr {
        ip(&self.buffer.as_ref()[field::TPA])
    }
}

fn ip(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// An Ethernet / IPv4 ARP packet, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ArpRepr {
    pub op: ArpOp,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

impl ArpRepr {
    pub fn parse<T: AsRef<[u8]>>(p: &ArpPacket<T>) -> Self {
        ArpRepr {
            op: p.operation(),
            sender_mac: p.sender_mac(),
            sender_ip: p.sender_ip(),
            target_mac: p.target_mac(),
            target_ip: p.target_ip(),
        }
    }

    pub const fn buffer_len(&self) -> usize {
        PACKET_LEN
    }

    /// Writes the 28-byte packet at the start of `buf`; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let b = buf.get_mut(..PACKET_LEN).ok_or(WireError::BufferTooSmall)?;
        put16(b, field::HTYPE, HTYPE_ETHERNET);
        put16(b, field::PTYPE, ethertype::IPV4);
        b[field::HLEN] = 6;
        b[field::PLEN] = 4;
        put16(b, field::OPER, self.op.into());
        b[field::SHA].copy_from_slice(&self.sender_mac.0);
        b[field::SPA].copy_from_slice(&self.sender_ip.octets());
        b[field::THA].copy_from_slice(&self.target_mac.0);
        b[field::TPA].copy_from_slice(&self.target_ip.octets());
        Ok(PACKET_LEN)
    }

    /// The reply to this request that claims `target_ip` is at `answer_mac`
    /// (RFC 826 "Packet Reception": swap sender and target, set our address
    /// as sender, opcode reply).
    pub fn reply(&self, answer_mac: MacAddr) -> ArpRepr {
        ArpRepr {
            op: ArpOp::Reply,
            sender_mac: answer_mac,
            sender_ip: self.target_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        }
    }
}

/// Writes a complete, untagged Ethernet frame: the ARP reply to `request`
/// saying that `request.target_ip` is at `answer_mac`. Returns the frame
/// length (60: padded to the Ethernet minimum, as a NIC would).
///
/// `answer_mac` goes into the ARP payload and may be the multicast cluster
/// MAC; `eth_src` is the Ethernet source and must be the sending NIC's own
/// unicast address, because a multicast source address is invalid on
/// Ethernet (the kernel's CLUSTERIP does the same). The frame goes to the
/// requester's hardware address.
///
/// Errors: [`WireError::BufferTooSmall`] under 60 bytes.
pub fn write_reply(
    buf: &mut [u8],
    request: &ArpRepr,
    answer_mac: MacAddr,
    eth_src: MacAddr,
) -> Result<usize, WireError> {
    let eth = EthernetRepr {
        src: eth_src,
        dst: request.sender_mac,
        vlan: None,
        ethertype: ethertype::ARP,
    };
    write_frame(buf, &eth, &request.reply(answer_mac))
}

/// Writes a broadcast ARP request frame for `request` (its sender MAC is
/// also the Ethernet source) into `buf`; returns the frame length.
pub fn write_request(buf: &mut [u8], request: &ArpRepr) -> Result<usize, WireError> {
    let eth = EthernetRepr {
        src: request.sender_mac,
        dst: MacAddr::BROADCAST,
        vlan: None,
        ethertype: ethertype::ARP,
    };
    write_frame(buf, &eth, request)
}

/// Writes a complete, untagged, broadcast gratuitous ARP frame announcing
/// that `ip` is at `mac`; returns the frame length (60).
///
/// It is an ARP *request* with sender and target IP both `ip` and a zero
/// target hardware address: the "ARP Announcement" of RFC 5227 §2.3, which
/// every Linux and switch updates its cache from (keepalived sends the
/// same). `eth_src` as in [`write_reply`].
pub fn write_gratuitous(
    buf: &mut [u8],
    ip: Ipv4Addr,
    mac: MacAddr,
    eth_src: MacAddr,
) -> Result<usize, WireError> {
    let eth = EthernetRepr {
        src: eth_src,
        dst: MacAddr::BROADCAST,
        vlan: None,
        ethertype: ethertype::ARP,
    };
    let arp = ArpRepr {
        op: ArpOp::Request,
        sender_mac: mac,
        sender_ip: ip,
        target_mac: MacAddr::ZERO,
        target_ip: ip,
    };
    write_frame(buf, &eth, &arp)
}

fn write_frame(buf: &mut [u8], eth: &EthernetRepr, arp: &ArpRepr) -> Result<usize, WireError> {
    let out = buf
        .get_mut(..ethernet::MIN_FRAME_LEN)
        .ok_or(WireError::BufferTooSmall)?;
    let hl = eth.emit(out)?;
    let al = arp.emit(&mut out[hl..])?;
    out[hl + al..].fill(0);
    Ok(ethernet::MIN_FRAME_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ethernet::EthernetFrame;

    // A real ARP request (Ethernet payload of a capture): who has
    // 192.168.1.1? tell 192.168.1.100 (00:0c:29:3e:5c:9b).
    static REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x00, 0x0c, 0x29, 0x3e, 0x5c, 0x9b, 0xc0,
        0xa8, 0x01, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xa8, 0x01, 0x01,
    ];

    fn request_repr() -> ArpRepr {
        ArpRepr {
            op: ArpOp::Request,
            sender_mac: MacAddr::new(0x00, 0x0c, 0x29, 0x3e, 0x5c, 0x9b),
            sender_ip: Ipv4Addr::new(192, 168, 1, 100),
            target_mac: MacAddr::ZERO,
            target_ip: Ipv4Addr::new(192, 168, 1, 1),
        }
    }

    #[test]
    fn test_parse() {
        let p = ArpPacket::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(ArpRepr::parse(&p), request_repr());
    }

    #[test]
    fn test_emit() {
        let mut out = [0u8; 28];
        assert_eq!(request_repr().emit(&mut out).unwrap(), 28);
        assert_eq!(out, REQUEST);
        assert_eq!(
            request_repr().emit(&mut [0u8; 27]).unwrap_err(),
            WireError::BufferTooSmall
        );
    }

    #[test]
    fn test_parse_captured_request_and_reply() {
        use crate::captures::{ARP_REPLY, ARP_REQUEST};
        let client = MacAddr::new(0x96, 0xbb, 0x46, 0x5d, 0x7f, 0x0c);
        let server = MacAddr::new(0x16, 0xf4, 0x05, 0x1d, 0xbd, 0x77);
        let (c_ip, s_ip) = (Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 100));
        let req = ArpRepr::parse(&ArpPacket::new_checked(&ARP_REQUEST[14..]).unwrap());
        assert_eq!(
            req,
            ArpRepr {
                op: ArpOp::Request,
                sender_mac: client,
                sender_ip: c_ip,
                target_mac: MacAddr::ZERO,
                target_ip: s_ip
            }
        );
        let rep = ArpRepr::parse(&ArpPacket::new_checked(&ARP_REPLY[14..]).unwrap());
        assert_eq!(rep, req.reply(server));
        // Our reply frame is the kernel's, plus padding to 60 bytes.
        let mut buf = [0u8; 60];
        assert_eq!(write_reply(&mut buf, &req, server, server).unwrap(), 60);
        assert_eq!(&buf[..42], &ARP_REPLY[..]);
    }

    #[test]
    fn test_rejects_truncated_and_non_ethernet_ipv4() {
        assert_eq!(
            ArpPacket::new_checked(&REQUEST[..27]).unwrap_err(),
            WireError::Truncated
        );
        for (i, v) in [(1, 0x06u8), (3, 0x01), (4, 8), (5, 16)] {
            let mut b = REQUEST;
            b[i] = v;
            assert_eq!(
                ArpPacket::new_checked(&b[..]).unwrap_err(),
                WireError::Unsupported,
                "byte {i}"
            );
        }
    }

    #[test]
    fn reply_frame_answers_with_cluster_mac_from_own_nic() {
        let cluster = MacAddr::new(0x01, 0x00, 0x5e, 0x01, 0x02, 0x03);
        let nic = MacAddr::new(0x02, 0, 0, 0, 0, 0x0a);
        let mut buf = [0xaa; 64];
        let n = write_reply(&mut buf, &request_repr(), cluster, nic).unwrap();
        assert_eq!(n, 60);
        let eth = EthernetFrame::new_checked(&buf[..n]).unwrap();
        assert_eq!(eth.dst_addr(), request_repr().sender_mac);
        assert_eq!(eth.src_addr(), nic);
        assert_eq!(eth.ethertype(), ethertype::ARP);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap());
        assert_eq!(
            arp,
            ArpRepr {
                op: ArpOp::Reply,
                sender_mac: cluster,
                sender_ip: Ipv4Addr::new(192, 168, 1, 1),
                target_mac: request_repr().sender_mac,
                target_ip: Ipv4Addr::new(192, 168, 1, 100),
            }
        );
        assert!(buf[42..60].iter().all(|&b| b == 0), "padding is zeroed");
        assert_eq!(buf[60], 0xaa, "nothing written past the frame");
        assert_eq!(
            write_reply(&mut [0u8; 59], &request_repr(), cluster, nic),
            Err(WireError::BufferTooSmall)
        );
    }

    #[test]
    fn gratuitous_frame_is_rfc5227_announcement() {
        let vip = Ipv4Addr::new(198, 18, 0, 100);
        let mac = MacAddr::new(0x01, 0x00, 0x5e, 0x01, 0x02, 0x03);
        let nic = MacAddr::new(0x02, 0, 0, 0, 0, 0x0a);
        let mut buf = [0u8; 60];
        assert_eq!(write_gratuitous(&mut buf, vip, mac, nic).unwrap(), 60);
        let want_hdr = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x06,
        ];
        assert_eq!(&buf[..14], &want_hdr);
        let want_arp = [
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x01, 0x00, 0x5e, 0x01, 0x02, 0x03,
            198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 198, 18, 0, 100,
        ];
        assert_eq!(&buf[14..42], &want_arp);
    }
}
