//! ICMP for IPv4 (RFC 792), with the datagram quoted by error messages.
//!
//! ```text
//! | type | code | checksum (2) | rest of header (4) | data ...
//! ```
//!
//! Error messages (destination unreachable, source quench, redirect, time
//! exceeded, parameter problem) quote "the internet header plus the first 64
//! bits of the original datagram's data" (RFC 792; RFC 1812 §4.3.2.3 lets
//! routers quote more, and Linux quotes up to 576 bytes in all). The
//! quote is what ties an error to a flow.

use core::net::Ipv4Addr;

use crate::ipv4::Ipv4Packet;
use crate::{Checksum, WireError, be16, checksum, put16};

mod field {
    use crate::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const REST: Field = 4..8;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    /// RFC 1191 §4: next-hop MTU in the second half of "unused".
    pub const NEXT_HOP_MTU: Field = 6..8;
    pub const POINTER: usize = 4;
    pub const GATEWAY: Field = 4..8;
}

pub const HEADER_LEN: usize = 8;
/// Bytes of the original transport header every error quotes (RFC 792).
pub const QUOTED_L4_LEN: usize = 8;

/// ICMP message types (RFC 792 and the IANA registry).
pub mod msg_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DST_UNREACHABLE: u8 = 3;
    pub const SOURCE_QUENCH: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAM_PROBLEM: u8 = 12;
}

/// Destination-unreachable codes (RFC 792, RFC 1812 §5.2.7.1).
pub mod unreach_code {
    pub const NET: u8 = 0;
    pub const HOST: u8 = 1;
    pub const PROTOCOL: u8 = 2;
    pub const PORT: u8 = 3;
    /// "Fragmentation needed and DF set", the PMTUD signal (RFC 1191).
    pub const FRAG_NEEDED: u8 = 4;
    pub const ADMIN_PROHIBITED: u8 = 13;
}

/// True for the types that quote an offending datagram.
pub const fn is_error_type(t: u8) -> bool {
    matches!(
        t,
        msg_type::DST_UNREACHABLE
            | msg_type::SOURCE_QUENCH
            | msg_type::REDIRECT
            | msg_type::TIME_EXCEEDED
            | msg_type::PARAM_PROBLEM
    )
}

/// A view of an ICMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

/// The datagram quoted by an ICMP error: its IPv4 header and the first 8
/// bytes of its transport header (ports for TCP and UDP; for UDP also the
/// checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted<'a> {
    pub ip: Ipv4Packet<&'a [u8]>,
    pub l4: [u8; QUOTED_L4_LEN],
}

impl Quoted<'_> {
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.l4[0], self.l4[1]])
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.l4[2], self.l4[3]])
    }
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// `buffer` is the whole message (the IP payload). Errors:
    /// [`WireError::Truncated`] under 8 bytes.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(IcmpPacket { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn is_error(&self) -> bool {
        is_error_type(self.msg_type())
    }

    /// The 4 bytes after the checksum.
    pub fn rest_of_header(&self) -> [u8; 4] {
        let b = self.buffer.as_ref();
        [
            b[field::REST.start],
            b[field::REST.start + 1],
            b[field::REST.start + 2],
            b[field::REST.start + 3],
        ]
    }

    pub fn echo_ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ECHO_IDENT)
    }

    pub fn echo_seq_no(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ECHO_SEQNO)
    }

    /// Destination unreachable / fragmentation needed: the next-hop MTU
    /// (RFC 1191 §4; zero from pre-RFC 1191 routers).
    pub fn next_hop_mtu(&self) -> u16 {
        be16(self.buffer.as_ref(), field::NEXT_HOP_MTU)
    }

    /// Parameter problem: the octet that was wrong.
    pub fn pointer(&self) -> u8 {
        self.buffer.as_ref()[field::POINTER]
    }

    /// Redirect: the gateway to use.
    pub fn gateway(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        let g = field::GATEWAY.start;
        Ipv4Addr::new(b[g], b[g + 1], b[g + 2], b[g + 3])
    }

    /// The data after the 8-byte header (the quote, for errors).
    pub fn data(&self) -> &[u8] {
        self.buffer.as_ref().get(HEADER_LEN..).unwrap_or(&[])
    }

    /// The quoted datagram of an error message. Errors:
    /// [`WireError::Truncated`] when the quote is shorter than its IPv4
    /// header plus 8 bytes (RFC 792's minimum);
    /// [`WireError::BadVersion`] / [`WireError::BadHeaderLength`] for a
    /// quote that is not an IPv4 header. The type is not checked here.
    pub fn quoted(&self) -> Result<Quoted<'_>, WireError> {
        let ip = Ipv4Packet::new_checked_quoted(self.data())?;
        let hl = ip.header_len();
        let l4 = self
            .data()
            .get(hl..hl + QUOTED_L4_LEN)
            .ok_or(WireError::Truncated)?;
        let mut q = [0u8; QUOTED_L4_LEN];
        q.copy_from_slice(l4);
        Ok(Quoted { ip, l4: q })
    }

    /// The checksum over the whole message verifies (RFC 792).
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Computes the checksum over the whole message and writes it.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = !checksum::data(self.buffer.as_ref());
        self.set_checksum(c);
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        self.buffer
            .as_mut()
            .get_mut(HEADER_LEN..)
            .unwrap_or(&mut [])
    }
}

/// An ICMP header, parsed (the data, e.g. the quote, is not part of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IcmpRepr {
    EchoRequest {
        ident: u16,
        seq_no: u16,
    },
    EchoReply {
        ident: u16,
        seq_no: u16,
    },
    /// Code [`unreach_code::FRAG_NEEDED`] carries the next-hop MTU.
    DstUnreachable {
        code: u8,
        next_hop_mtu: u16,
    },
    SourceQuench,
    Redirect {
        code: u8,
        gateway: Ipv4Addr,
    },
    TimeExceeded {
        code: u8,
    },
    ParamProblem {
        code: u8,
        pointer: u8,
    },
    Other {
        msg_type: u8,
        code: u8,
        rest: [u8; 4],
    },
}

impl IcmpRepr {
    /// With [`Checksum::Check`] a checksum that does not verify is
    /// [`WireError::BadChecksum`].
    pub fn parse<T: AsRef<[u8]>>(p: &IcmpPacket<T>, cs: Checksum) -> Result<Self, WireError> {
        if cs == Checksum::Check && !p.verify_checksum() {
            return Err(WireError::BadChecksum);
        }
        let code = p.code();
        Ok(match p.msg_type() {
            msg_type::ECHO_REQUEST if code == 0 => IcmpRepr::EchoRequest {
                ident: p.echo_ident(),
                seq_no: p.echo_seq_no(),
            },
            msg_type::ECHO_REPLY if code == 0 => IcmpRepr::EchoReply {
                ident: p.echo_ident(),
                seq_no: p.echo_seq_no(),
            },
            msg_type::DST_UNREACHABLE => IcmpRepr::DstUnreachable {
                code,
                next_hop_mtu: p.next_hop_mtu(),
            },
            msg_type::SOURCE_QUENCH if code == 0 => IcmpRepr::SourceQuench,
            msg_type::REDIRECT => IcmpRepr::Redirect {
                code,
                gateway: p.gateway(),
            },
            msg_type::TIME_EXCEEDED => IcmpRepr::TimeExceeded { code },
            msg_type::PARAM_PROBLEM => IcmpRepr::ParamProblem {
                code,
                pointer: p.pointer(),
            },
            t => IcmpRepr::Other {
                msg_type: t,
                code,
                rest: p.rest_of_header(),
            },
        })
    }

    pub fn msg_type(&self) -> u8 {
        match *self {
            IcmpRepr::EchoRequest { .. } => msg_type::ECHO_REQUEST,
            IcmpRepr::EchoReply { .. } => msg_type::ECHO_REPLY,
            IcmpRepr::DstUnreachable { .. } => msg_type::DST_UNREACHABLE,
            IcmpRepr::SourceQuench => msg_type::SOURCE_QUENCH,
            IcmpRepr::Redirect { .. } => msg_type::REDIRECT,
            IcmpRepr::TimeExceeded { .. } => msg_type::TIME_EXCEEDED,
            IcmpRepr::ParamProblem { .. } => msg_type::PARAM_PROBLEM,
            IcmpRepr::Other { msg_type, .. } => msg_type,
        }
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// `message` is the whole message with the data in place after the
    /// first 8 bytes: writes the header and, with [`Checksum::Check`], the
    /// checksum over the message.
    pub fn emit(&self, message: &mut [u8], cs: Checksum) -> Result<usize, WireError> {
        let b = message
            .get_mut(..HEADER_LEN)
            .ok_or(WireError::BufferTooSmall)?;
        let (t, code, rest): (u8, u8, [u8; 4]) = match *self {
            IcmpRepr::EchoRequest { ident, seq_no } => {
                (msg_type::ECHO_REQUEST, 0, be_pair(ident, seq_no))
            }
            IcmpRepr::EchoReply { ident, seq_no } => {
                (msg_type::ECHO_REPLY, 0, be_pair(ident, seq_no))
            }
            IcmpRepr::DstUnreachable { code, next_hop_mtu } => {
                (msg_type::DST_UNREACHABLE, code, be_pair(0, next_hop_mtu))
            }
            IcmpRepr::SourceQuench => (msg_type::SOURCE_QUENCH, 0, [0; 4]),
            IcmpRepr::Redirect { code, gateway } => (msg_type::REDIRECT, code, gateway.octets()),
            IcmpRepr::TimeExceeded { code } => (msg_type::TIME_EXCEEDED, code, [0; 4]),
            IcmpRepr::ParamProblem { code, pointer } => {
                (msg_type::PARAM_PROBLEM, code, [pointer, 0, 0, 0])
            }
            IcmpRepr::Other {
                msg_type,
                code,
                rest,
            } => (msg_type, code, rest),
        };
        b[field::TYPE] = t;
        b[field::CODE] = code;
        put16(b, field::CHECKSUM, 0);
        b[field::REST].copy_from_slice(&rest);
        if cs == Checksum::Check {
            IcmpPacket { buffer: message }.fill_checksum();
        }
        Ok(HEADER_LEN)
    }
}

fn be_pair(a: u16, b: u16) -> [u8; 4] {
    let (a, b) = (a.to_be_bytes(), b.to_be_bytes());
    [a[0], a[1], b[0], b[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    // A "fragmentation needed" (RFC 1191) written by hand: MTU 1400, quoting
    // 198.18.0.2:40000 -> 198.18.0.100:80 (TCP); checksums left zero.
    static FRAG_NEEDED: [u8; 36] = [
        0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0x05, 0x78, // type 3 code 4, MTU 1400
        0x45, 0x00, 0x05, 0xdc, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 0xc6, 0x12, 0x00,
        0x02, 0xc6, 0x12, 0x00, 0x64, // quoted header 198.18.0.2 -> 198.18.0.100, TCP
        0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x00, 0x01, // 40000 -> 80, seq 1
    ];

    #[test]
    fn test_parse_error_and_quote() {
        let mut b = FRAG_NEEDED;
        IcmpPacket::new_checked(&mut b[..]).unwrap().fill_checksum();
        let p = IcmpPacket::new_checked(&b[..]).unwrap();
        assert!(p.is_error());
        assert!(p.verify_checksum());
        assert_eq!(
            IcmpRepr::parse(&p, Checksum::Check).unwrap(),
            IcmpRepr::DstUnreachable {
                code: 4,
                next_hop_mtu: 1400
            }
        );
        let q = p.quoted().unwrap();
        assert_eq!(q.ip.src_addr(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(q.ip.dst_addr(), Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(q.ip.protocol(), 6);
        assert_eq!((q.src_port(), q.dst_port()), (40000, 80));
    }

    #[test]
    fn test_parse_captured_port_unreachable() {
        // Linux's answer to a UDP datagram for a closed port (see `captures`).
        let p = IcmpPacket::new_checked(&crate::captures::ICMP_PORT_UNREACH[34..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(
            IcmpRepr::parse(&p, Checksum::Check).unwrap(),
            IcmpRepr::DstUnreachable {
                code: 3,
                next_hop_mtu: 0
            }
        );
        let q = p.quoted().unwrap();
        assert_eq!(
            (q.ip.src_addr(), q.ip.dst_addr()),
            (Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 100))
        );
        assert_eq!(q.ip.protocol(), 17);
        assert!(q.ip.verify_checksum());
        assert_eq!((q.src_port(), q.dst_port()), (41214, 9999));
        // Linux quotes the whole datagram here: header, UDP header, "hello".
        assert_eq!(&p.data()[28..], b"hello");
    }

    #[test]
    fn test_parse_captured_echo_request() {
        let p = IcmpPacket::new_checked(&crate::captures::ICMP_ECHO_REQUEST[34..]).unwrap();
        assert!(!p.is_error());
        assert_eq!(
            IcmpRepr::parse(&p, Checksum::Check).unwrap(),
            IcmpRepr::EchoRequest {
                ident: 17181,
                seq_no: 1
            }
        );
        assert_eq!(p.data().len(), 56);
    }

    #[test]
    fn test_quote_truncated_or_malformed() {
        let p = IcmpPacket::new_checked(&FRAG_NEEDED[..35]).unwrap();
        assert_eq!(p.quoted().unwrap_err(), WireError::Truncated);
        let p = IcmpPacket::new_checked(&FRAG_NEEDED[..27]).unwrap();
        assert_eq!(p.quoted().unwrap_err(), WireError::Truncated);
        let mut b = FRAG_NEEDED;
        b[8] = 0x65;
        assert_eq!(
            IcmpPacket::new_checked(&b[..])
                .unwrap()
                .quoted()
                .unwrap_err(),
            WireError::BadVersion
        );
        b[8] = 0x43;
        assert_eq!(
            IcmpPacket::new_checked(&b[..])
                .unwrap()
                .quoted()
                .unwrap_err(),
            WireError::BadHeaderLength
        );
        b[8] = 0x46; // options claimed: header 24 bytes, then only 4 of the 8 bytes
        assert_eq!(
            IcmpPacket::new_checked(&b[..])
                .unwrap()
                .quoted()
                .unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            IcmpPacket::new_checked(&FRAG_NEEDED[..7]).unwrap_err(),
            WireError::Truncated
        );
    }

    #[test]
    fn test_emit_roundtrip_every_kind() {
        let kinds = [
            IcmpRepr::EchoRequest {
                ident: 1,
                seq_no: 2,
            },
            IcmpRepr::EchoReply {
                ident: 3,
                seq_no: 4,
            },
            IcmpRepr::DstUnreachable {
                code: 3,
                next_hop_mtu: 0,
            },
            IcmpRepr::SourceQuench,
            IcmpRepr::Redirect {
                code: 1,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
            },
            IcmpRepr::TimeExceeded { code: 0 },
            IcmpRepr::ParamProblem {
                code: 0,
                pointer: 9,
            },
            IcmpRepr::Other {
                msg_type: 13,
                code: 0,
                rest: [1, 2, 3, 4],
            },
        ];
        for k in kinds {
            let mut b = [0u8; 12];
            b[8..].copy_from_slice(b"data");
            assert_eq!(k.emit(&mut b, Checksum::Check).unwrap(), 8);
            let p = IcmpPacket::new_checked(&b[..]).unwrap();
            assert!(p.verify_checksum());
            assert_eq!(IcmpRepr::parse(&p, Checksum::Check).unwrap(), k);
            assert_eq!(p.msg_type(), k.msg_type());
            assert_eq!(p.is_error(), is_error_type(k.msg_type()));
            assert_eq!(p.data(), b"data");
        }
    }

    #[test]
    fn bad_checksum_detected() {
        let mut b = [0u8; 8];
        IcmpRepr::EchoRequest {
            ident: 1,
            seq_no: 1,
        }
        .emit(&mut b, Checksum::Check)
        .unwrap();
        b[7] ^= 0x10;
        let p = IcmpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(
            IcmpRepr::parse(&p, Checksum::Check),
            Err(WireError::BadChecksum)
        );
    }
}
