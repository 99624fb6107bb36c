//! TCP headers (RFC 9293 §3.1).
//!
//! ```text
//! | src port (2) | dst port (2) | seq (4) | ack (4) |
//! | data offset (4 bits) reserved (4 bits) | flags (8) | window (2) |
//! | checksum (2) | urgent pointer (2) | options ... | data ...
//! ```

use core::fmt;
use core::net::Ipv4Addr;

use crate::flow::proto;
use crate::{Checksum, WireError, be16, be32, checksum, put16, put32};

mod field {
    use crate::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ_NUM: Field = 4..8;
    pub const ACK_NUM: Field = 8..12;
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WIN_SIZE: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
}

/// Header length without options.
pub const HEADER_LEN: usize = 20;
/// Offset of the checksum field in the header (used by ICMP quotes).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// The eight flag bits of byte 13.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);
    pub const ECE: TcpFlags = TcpFlags(0x40);
    pub const CWR: TcpFlags = TcpFlags(0x80);
    pub const SYN_ACK: TcpFlags = TcpFlags(0x12);
    pub const FIN_ACK: TcpFlags = TcpFlags(0x11);
    pub const RST_ACK: TcpFlags = TcpFlags(0x14);
    /// No flag: also what the connection table gets for UDP.
    pub const NONE: TcpFlags = TcpFlags(0);

    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }

    pub const fn syn(self) -> bool {
        self.contains(Self::SYN)
    }

    pub const fn ack(self) -> bool {
        self.contains(Self::ACK)
    }

    pub const fn rst(self) -> bool {
        self.contains(Self::RST)
    }

    pub const fn fin(self) -> bool {
        self.contains(Self::FIN)
    }
}

impl core::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        self.union(rhs)
    }
}

impl fmt::Debug for TcpFlags {
    /// tcpdump's letters: `S`, `F`, `R`, `P`, `.` for ACK, `U`, `E`, `W`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (0x02, 'S'),
            (0x01, 'F'),
            (0x04, 'R'),
            (0x08, 'P'),
            (0x20, 'U'),
            (0x40, 'E'),
            (0x80, 'W'),
            (0x10, '.'),
        ];
        write!(f, "TcpFlags[")?;
        for (bit, c) in names {
            if self.0 & bit != 0 {
                write!(f, "{c}")?;
            }
        }
        write!(f, "]")
    }
}

/// A view of a TCP segment (header and data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// `buffer` is the whole segment (the IP payload). Errors:
    /// [`WireError::Truncated`] under 20 bytes; [`WireError::BadDataOffset`]
    /// for a data offset below 5 or past the segment.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let hl = usize::from(b[field::DATA_OFF] >> 4) * 4;
        if hl < HEADER_LEN || hl > b.len() {
            return Err(WireError::BadDataOffset);
        }
        Ok(TcpPacket { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    pub fn seq_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ_NUM)
    }

    pub fn ack_number(&self) -> u32 {
        be32(self.buffer.as_ref(), field::ACK_NUM)
    }

    /// Header length in bytes (data offset * 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.buffer.as_ref()[field::FLAGS])
    }

    pub fn window_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::WIN_SIZE)
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn urgent_at(&self) -> u16 {
        be16(self.buffer.as_ref(), field::URGENT)
    }

    pub fn options(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(HEADER_LEN..self.header_len())
            .unwrap_or(&[])
    }

    pub fn payload(&self) -> &[u8] {
        self.buffer.as_ref().get(self.header_len()..).unwrap_or(&[])
    }

    /// The checksum over the IPv4 pseudo-header and the whole segment
    /// verifies (RFC 9293 §3.1).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        segment_sum(self.buffer.as_ref(), src, dst) == Some(0xffff)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, p);
    }

    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, p);
    }

    pub fn set_seq_number(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::SEQ_NUM, v);
    }

    pub fn set_ack_number(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::ACK_NUM, v);
    }

    pub fn set_flags(&mut self, f: TcpFlags) {
        self.buffer.as_mut()[field::FLAGS] = f.0;
    }

    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Computes the checksum from scratch and writes it. A segment longer
    /// than 65535 bytes cannot be summed and is left alone.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        if let Some(s) = segment_sum(self.buffer.as_ref(), src, dst) {
            self.set_checksum(!s);
        }
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        self.buffer.as_mut().get_mut(hl..).unwrap_or(&mut [])
    }
}

/// The one's-complement sum of pseudo-header and segment (None when the
/// segment does not fit the pseudo-header's 16-bit length).
pub(crate) fn segment_sum(seg: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Option<u16> {
    let len = u16::try_from(seg.len()).ok()?;
    Some(checksum::combine(&[
        checksum::pseudo_header(src, dst, proto::TCP, len),
        checksum::data(seg),
    ]))
}

/// A TCP header without options, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub window: u16,
    pub urgent: u16,
}

impl TcpRepr {
    /// Options are not kept. With [`Checksum::Check`] a checksum that does
    /// not verify is [`WireError::BadChecksum`].
    pub fn parse<T: AsRef<[u8]>>(
        p: &TcpPacket<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        cs: Checksum,
    ) -> Result<Self, WireError> {
        if cs == Checksum::Check && !p.verify_checksum(src, dst) {
            return Err(WireError::BadChecksum);
        }
        Ok(TcpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            seq: p.seq_number(),
            ack: p.ack_number(),
            flags: p.flags(),
            window: p.window_len(),
            urgent: p.urgent_at(),
        })
    }

    /// The header length (20: no options).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// `segment` is the whole segment with the data already in place after
    /// the first 20 bytes; this writes the header and, with
    /// [`Checksum::Check`], the checksum over the segment. Returns the header
    /// length.
    pub fn emit(
        &self,
        segment: &mut [u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        cs: Checksum,
    ) -> Result<usize, WireError> {
        if segment.len() > usize::from(u16::MAX) {
            return Err(WireError::BadLength);
        }
        let b = segment
            .get_mut(..HEADER_LEN)
            .ok_or(WireError::BufferTooSmall)?;
        put16(b, field::SRC_PORT, self.src_port);
        put16(b, field::DST_PORT, self.dst_port);
        put32(b, field::SEQ_NUM, self.seq);
        put32(b, field::ACK_NUM, self.ack);
        b[field::DATA_OFF] = ((HEADER_LEN / 4) as u8) << 4;
        b[field::FLAGS] = self.flags.0;
        put16(b, field::WIN_SIZE, self.window);
        put16(b, field::CHECKSUM, 0);
        put16(b, field::URGENT, self.urgent);
        if cs == Checksum::Check {
            let mut p = TcpPacket { buffer: segment };
            p.fill_checksum(src, dst);
        }
        Ok(HEADER_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

    /// The captured Linux SYN (see `captures`): MSS, SACK-permitted,
    /// timestamps, NOP, window scale 10.
    fn syn() -> [u8; 40] {
        let mut b = [0u8; 40];
        b.copy_from_slice(&crate::captures::TCP_SYN[34..]);
        b
    }

    #[test]
    fn test_parse_syn_with_options() {
        let b = syn();
        let p = TcpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.src_port(), 38922);
        assert_eq!(p.dst_port(), 80);
        assert_eq!(p.seq_number(), 3_360_807_021);
        assert_eq!(p.ack_number(), 0);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), TcpFlags::SYN);
        assert_eq!(p.window_len(), 64240);
        assert_eq!(p.checksum(), 0x32fa);
        assert_eq!(p.options().len(), 20);
        assert_eq!(p.options()[..4], [0x02, 0x04, 0x05, 0xb4]);
        assert_eq!(p.options()[16..], [0x01, 0x03, 0x03, 0x0a]);
        assert!(p.payload().is_empty());
        assert!(p.verify_checksum(SRC, DST));
        assert!(!p.verify_checksum(SRC, Ipv4Addr::new(198, 18, 0, 101)));
    }

    #[test]
    fn test_parse_data_segment() {
        let b = &crate::captures::TCP_GET[34..];
        let p = TcpPacket::new_checked(b).unwrap();
        assert_eq!(p.flags(), TcpFlags::PSH | TcpFlags::ACK);
        assert_eq!(p.header_len(), 32);
        assert_eq!(p.payload(), b"GET / HTTP/1.0\r\n\r\n");
        assert!(p.verify_checksum(SRC, DST));
    }

    #[test]
    fn test_emit_and_roundtrip() {
        let r = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            seq: 1,
            ack: 2,
            flags: TcpFlags::ACK | TcpFlags::PSH,
            window: 512,
            urgent: 0,
        };
        let mut seg = [0u8; 25];
        seg[20..].copy_from_slice(b"hello");
        assert_eq!(r.emit(&mut seg, SRC, DST, Checksum::Check).unwrap(), 20);
        let p = TcpPacket::new_checked(&seg[..]).unwrap();
        assert!(p.verify_checksum(SRC, DST));
        assert_eq!(p.payload(), b"hello");
        assert_eq!(TcpRepr::parse(&p, SRC, DST, Checksum::Check).unwrap(), r);
        assert_eq!(
            r.emit(&mut [0u8; 19], SRC, DST, Checksum::Check),
            Err(WireError::BufferTooSmall)
        );
    }

    #[test]
    fn test_rejects() {
        let syn = syn();
        assert_eq!(
            TcpPacket::new_checked(&syn[..19]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            TcpPacket::new_checked(&syn[..39]).unwrap_err(),
            WireError::BadDataOffset
        );
        let mut b = syn;
        b[12] = 0x40;
        assert_eq!(
            TcpPacket::new_checked(&b[..]).unwrap_err(),
            WireError::BadDataOffset
        );
        b[12] = 0x50;
        let p = TcpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(
            p.payload().len(),
            20,
            "options become data under a smaller data offset"
        );
        assert_eq!(
            TcpRepr::parse(&p, SRC, DST, Checksum::Check),
            Err(WireError::BadChecksum)
        );
    }

    #[test]
    fn test_setters_and_fill() {
        let mut b = syn();
        let mut p = TcpPacket::new_checked(&mut b[..]).unwrap();
        p.set_src_port(1);
        p.set_dst_port(2);
        assert!(!p.verify_checksum(SRC, DST));
        p.fill_checksum(SRC, DST);
        assert!(p.verify_checksum(SRC, DST));
        p.set_src_port(38922);
        p.set_dst_port(80);
        p.fill_checksum(SRC, DST);
        assert_eq!(p.checksum(), 0x32fa);
    }

    #[test]
    fn flags_debug_like_tcpdump() {
        assert_eq!(
            format!("{:?}", TcpFlags::SYN | TcpFlags::ACK),
            "TcpFlags[S.]"
        );
    }
}
