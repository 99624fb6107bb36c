//! IPv4 headers (RFC 791 §3.1), options recognised, fragments recognised.
//!
//! ```text
//! | ver 4 | IHL | DSCP/ECN | total length (2) |
//! | identification (2) | flags (3) fragment offset (13) |
//! | TTL | protocol | header checksum (2) |
//! | source (4) | destination (4) | options (IHL*4 - 20) ...
//! ```

use core::net::Ipv4Addr;

use crate::{Checksum, WireError, be16, checksum, put16};

mod field {
    use crate::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    /// Flags: reserved, DF (0x4000), MF (0x2000); offset in 8-byte units.
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC_ADDR: Field = 12..16;
    pub const DST_ADDR: Field = 16..20;
}

/// Header length without options.
pub const HEADER_LEN: usize = 20;
/// Header length with 40 bytes of options (IHL 15).
pub const MAX_HEADER_LEN: usize = 60;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Validates a whole datagram: at least 20 bytes
    /// ([`WireError::Truncated`]), version 4 ([`WireError::BadVersion`]),
    /// 5 <= IHL and the header within the buffer
    /// ([`WireError::BadHeaderLength`]), header length <= total length <=
    /// buffer length ([`WireError::BadTotalLength`]). A buffer longer than
    /// the total length is fine: Ethernet pads short frames to 60 bytes
    /// (RFC 894), and [`Self::payload`] stops at the total length.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Ipv4Packet { buffer };
        p.check_header(false)?;
        let total = usize::from(p.total_len());
        if total < p.header_len() || total > p.buffer.as_ref().len() {
            return Err(WireError::BadTotalLength);
        }
        Ok(p)
    }

    /// Validates only the header, for the datagram quoted inside an ICMP
    /// error (RFC 792: the header plus at least 8 bytes; the total length
    /// there describes the original datagram, not the quote). A header cut
    /// short is [`WireError::Truncated`]; the version and IHL are checked as
    /// in [`Self::new_checked`].
    pub fn new_checked_quoted(buffer: T) -> Result<Self, WireError> {
        let p = Ipv4Packet { buffer };
        p.check_header(true)?;
        Ok(p)
    }

    fn check_header(&self, quoted: bool) -> Result<(), WireError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let hl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if hl < HEADER_LEN {
            return Err(WireError::BadHeaderLength);
        }
        if hl > b.len() {
            return Err(if quoted {
                WireError::Truncated
            } else {
                WireError::BadHeaderLength
            });
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL * 4), 20..=60.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn has_options(&self) -> bool {
        self.header_len() > HEADER_LEN
    }

    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    pub fn dont_frag(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK) << 3
    }

    /// A fragment: more fragments follow, or not the first one (RFC 791
    /// §3.2). Only the first fragment carries the transport header.
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        addr(self.buffer.as_ref(), field::SRC_ADDR.start)
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        addr(self.buffer.as_ref(), field::DST_ADDR.start)
    }

    /// The option bytes (empty without options).
    pub fn options(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(HEADER_LEN..self.header_len())
            .unwrap_or(&[])
    }

    /// The payload, up to the total length (Ethernet padding excluded). In a
    /// quoted view, what the quote holds.
    pub fn payload(&self) -> &[u8] {
        let (start, end) = self.payload_range();
        self.buffer.as_ref().get(start..end).unwrap_or(&[])
    }

    fn payload_range(&self) -> (usize, usize) {
        let len = self.buffer.as_ref().len();
        let hl = self.header_len();
        (hl, usize::from(self.total_len()).min(len).max(hl))
    }

    /// The header checksum verifies (RFC 791 §3.1, RFC 1071).
    pub fn verify_checksum(&self) -> bool {
        let hdr = self.buffer.as_ref().get(..self.header_len()).unwrap_or(&[]);
        checksum::data(hdr) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&a.octets());
    }

    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&a.octets());
    }

    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Computes the header checksum from scratch and writes it.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = !checksum::data(self.buffer.as_ref().get(..self.header_len()).unwrap_or(&[]));
        self.set_checksum(c);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = self.payload_range();
        self.buffer.as_mut().get_mut(start..end).unwrap_or(&mut [])
    }
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// An IPv4 header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Repr<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Length of the payload (total length minus header length).
    pub payload_len: u16,
    pub ttl: u8,
    pub dscp_ecn: u8,
    pub ident: u16,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// In bytes; a multiple of 8.
    pub frag_offset: u16,
    /// Raw option bytes: a multiple of 4, at most 40.
    pub options: &'a [u8],
}

impl<'a> Ipv4Repr<'a> {
    /// With [`Checksum::Check`], a header whose checksum does not verify is
    /// [`WireError::BadChecksum`].
    /// The options borrow from the packet's buffer, not from the view.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(
        p: &Ipv4Packet<&'a T>,
        cs: Checksum,
    ) -> Result<Self, WireError> {
        if cs == Checksum::Check && !p.verify_checksum() {
            return Err(WireError::BadChecksum);
        }
        let buf: &'a [u8] = T::as_ref(p.buffer);
        let options = buf.get(HEADER_LEN..p.header_len()).unwrap_or(&[]);
        Ok(Ipv4Repr {
            src: p.src_addr(),
            dst: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: p.total_len().saturating_sub(p.header_len() as u16),
            ttl: p.ttl(),
            dscp_ecn: p.dscp_ecn(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
            more_frags: p.more_frags(),
            frag_offset: p.frag_offset(),
            options,
        })
    }

    /// The header length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.options.len()
    }

    /// Writes the header (not the payload) at the start of `buf`; returns
    /// the header length. With [`Checksum::Check`] the checksum is filled,
    /// else left zero.
    pub fn emit(&self, buf: &mut [u8], cs: Checksum) -> Result<usize, WireError> {
        if self.options.len() > MAX_HEADER_LEN - HEADER_LEN || !self.options.len().is_multiple_of(4)
        {
            return Err(WireError::BadOptionsLength);
        }
        if !self.frag_offset.is_multiple_of(8) {
            return Err(WireError::BadFragmentOffset);
        }
        let hl = self.buffer_len();
        let total = u16::try_from(hl + usize::from(self.payload_len))
            .map_err(|_| WireError::BadTotalLength)?;
        let b = buf.get_mut(..hl).ok_or(WireError::BufferTooSmall)?;
        b[field::VER_IHL] = 0x40 | (hl / 4) as u8;
        b[field::DSCP_ECN] = self.dscp_ecn;
        put16(b, field::LENGTH, total);
        put16(b, field::IDENT, self.ident);
        let flags =
            if self.dont_frag { FLAG_DF } else { 0 } | if self.more_frags { FLAG_MF } else { 0 };
        put16(b, field::FLG_OFF, flags | (self.frag_offset >> 3));
        b[field::TTL] = self.ttl;
        b[field::PROTOCOL] = self.protocol;
        put16(b, field::CHECKSUM, 0);
        b[field::SRC_ADDR].copy_from_slice(&self.src.octets());
        b[field::DST_ADDR].copy_from_slice(&self.dst.octets());
        b[HEADER_LEN..hl].copy_from_slice(self.options);
        if cs == Checksum::Check {
            put16(b, field::CHECKSUM, !checksum::data(b));
        }
        Ok(hl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real UDP datagram header (192.168.0.1 -> 192.168.0.199, total 115,
    // DF, TTL 64, checksum 0xb861), followed here by 95 payload bytes.
    static HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn datagram() -> [u8; 115] {
        let mut b = [0x5a; 115];
        b[..20].copy_from_slice(&HEADER);
        b
    }

    // A header with a Router Alert option (RFC 2113: 94 04 00 00), IHL 6,
    // as IGMPv3 reports are sent: 10.0.0.1 -> 224.0.0.22, proto 2, TTL 1.
    // Checksum left zero here; the test fills it.
    static WITH_OPTIONS: [u8; 24] = [
        0x46, 0xc0, 0x00, 0x18, 0x00, 0x00, 0x40, 0x00, 0x01, 0x02, 0x00, 0x00, 0x0a, 0x00, 0x00,
        0x01, 0xe0, 0x00, 0x00, 0x16, 0x94, 0x04, 0x00, 0x00,
    ];

    fn repr() -> Ipv4Repr<'static> {
        Ipv4Repr {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: 17,
            payload_len: 95,
            ttl: 64,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: true,
            more_frags: false,
            frag_offset: 0,
            options: &[],
        }
    }

    #[test]
    fn test_parse() {
        let b = datagram();
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 115);
        assert!(p.dont_frag() && !p.more_frags() && !p.is_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.checksum(), 0xb861);
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 95);
        assert_eq!(Ipv4Repr::parse(&p, Checksum::Check).unwrap(), repr());
    }

    #[test]
    fn test_emit() {
        let mut out = [0u8; 20];
        assert_eq!(repr().emit(&mut out, Checksum::Check).unwrap(), 20);
        assert_eq!(out, HEADER);
        let mut out = [0u8; 20];
        repr().emit(&mut out, Checksum::Ignore).unwrap();
        assert_eq!(&out[10..12], &[0, 0]);
        assert_eq!(
            repr().emit(&mut [0u8; 19], Checksum::Check),
            Err(WireError::BufferTooSmall)
        );
    }

    #[test]
    fn test_options() {
        let mut b = WITH_OPTIONS;
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert!(p.has_options());
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.options(), &[0x94, 0x04, 0x00, 0x00]);
        assert_eq!(p.payload(), &[] as &[u8]);
        let r =
            Ipv4Repr::parse(&Ipv4Packet::new_checked(&b[..]).unwrap(), Checksum::Check).unwrap();
        let mut out = [0u8; 24];
        assert_eq!(r.emit(&mut out, Checksum::Check).unwrap(), 24);
        assert_eq!(out, b);
        let bad = Ipv4Repr {
            options: &[1, 2, 3],
            ..r
        };
        assert_eq!(
            bad.emit(&mut out, Checksum::Check),
            Err(WireError::BadOptionsLength)
        );
    }

    #[test]
    fn padding_after_total_length_is_allowed_and_excluded() {
        let mut b = [0u8; 60];
        b[..24].copy_from_slice(&WITH_OPTIONS);
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload().len(), 0);
        let d = datagram();
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        assert_eq!(p.payload().len(), 95);
    }

    #[test]
    fn test_rejects() {
        let d = datagram();
        assert_eq!(
            Ipv4Packet::new_checked(&d[..19]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            Ipv4Packet::new_checked(&d[..114]).unwrap_err(),
            WireError::BadTotalLength
        );
        let mut v6 = d;
        v6[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]).unwrap_err(),
            WireError::BadVersion
        );
        let mut ihl4 = d;
        ihl4[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&ihl4[..]).unwrap_err(),
            WireError::BadHeaderLength
        );
        let mut ihl15 = d;
        ihl15[0] = 0x4f;
        assert_eq!(
            Ipv4Packet::new_checked(&ihl15[..40]).unwrap_err(),
            WireError::BadHeaderLength
        );
        assert_eq!(
            Ipv4Packet::new_checked_quoted(&ihl15[..40]).unwrap_err(),
            WireError::Truncated
        );
        let mut short_total = d;
        short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(
            Ipv4Packet::new_checked(&short_total[..]).unwrap_err(),
            WireError::BadTotalLength
        );
        let mut bad_sum = d;
        bad_sum[11] ^= 1;
        let p = Ipv4Packet::new_checked(&bad_sum[..]).unwrap();
        assert!(!p.verify_checksum());
        assert_eq!(
            Ipv4Repr::parse(&p, Checksum::Check),
            Err(WireError::BadChecksum)
        );
        assert!(Ipv4Repr::parse(&p, Checksum::Ignore).is_ok());
    }

    #[test]
    fn quoted_view_allows_total_length_past_the_quote() {
        let d = datagram();
        let p = Ipv4Packet::new_checked_quoted(&d[..28]).unwrap();
        assert_eq!(p.total_len(), 115);
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn test_fragments() {
        let mut d = datagram();
        d[6] = 0x20; // MF, offset 0
        d[7] = 0;
        assert!(Ipv4Packet::new_checked(&d[..]).unwrap().is_fragment());
        d[6] = 0x00; // offset 185 * 8
        d[7] = 185;
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        assert!(p.is_fragment());
        assert_eq!(p.frag_offset(), 1480);
        let r = Ipv4Repr {
            frag_offset: 1481,
            ..repr()
        };
        assert_eq!(
            r.emit(&mut [0u8; 20], Checksum::Check),
            Err(WireError::BadFragmentOffset)
        );
    }

    #[test]
    fn test_setters() {
        let mut d = datagram();
        let mut p = Ipv4Packet::new_checked(&mut d[..]).unwrap();
        p.set_src_addr(Ipv4Addr::new(10, 0, 0, 1));
        p.set_dst_addr(Ipv4Addr::new(10, 0, 0, 2));
        p.set_ttl(3);
        assert!(!p.verify_checksum());
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(
            (p.src_addr(), p.dst_addr(), p.ttl()),
            (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 3)
        );
    }
}
