//! UDP headers (RFC 768).
//!
//! ```text
//! | src port (2) | dst port (2) | length (2) | checksum (2) | data ...
//! ```
//!
//! Over IPv4 a checksum field of zero means "no checksum" (RFC 768); a
//! computed zero is sent as `0xffff`.

use core::net::Ipv4Addr;

use crate::flow::proto;
use crate::{Checksum, WireError, be16, checksum, put16};

mod field {
    use crate::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field in the header (used by ICMP quotes).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// A view of a UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// `buffer` is the IP payload. Errors: [`WireError::Truncated`] under 8
    /// bytes; [`WireError::BadLength`] when the length field is below 8 or
    /// past the buffer. A length below the buffer is accepted (the bytes
    /// after it are not part of the datagram, as Linux's `udp_rcv` trims).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = usize::from(be16(b, field::LENGTH));
        if len < HEADER_LEN || len > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(UdpPacket { buffer })
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

    /// The length field: header and data.
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Never true for a checked view (the length is at least 8).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The datagram, header included, up to the length field.
    fn datagram(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .get(..usize::from(self.len()))
            .unwrap_or(&[])
    }

    pub fn payload(&self) -> &[u8] {
        self.datagram().get(HEADER_LEN..).unwrap_or(&[])
    }

    /// True if the checksum verifies or is zero ("none", RFC 768).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        self.checksum() == 0 || datagram_sum(self.datagram(), src, dst) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, p);
    }

    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, p);
    }

    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Computes the checksum from scratch and writes it (a computed zero is
    /// written as `0xffff`).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let s = datagram_sum(self.datagram(), src, dst);
        self.set_checksum(checksum::udp_nonzero(!s));
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = usize::from(self.len());
        self.buffer
            .as_mut()
            .get_mut(HEADER_LEN..len)
            .unwrap_or(&mut [])
    }
}

/// Sum of pseudo-header and datagram; the datagram is at most 65535 bytes
/// because its length came from the 16-bit length field.
pub(crate) fn datagram_sum(dgram: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> u16 {
    let len = u16::try_from(dgram.len()).unwrap_or(u16::MAX);
    checksum::combine(&[
        checksum::pseudo_header(src, dst, proto::UDP, len),
        checksum::data(dgram),
    ])
}

/// A UDP header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpRepr {
    pub src_port: u16,
    pub dst_port: u16,
}

impl UdpRepr {
    /// With [`Checksum::Check`] a non-zero checksum that does not verify is
    /// [`WireError::BadChecksum`].
    pub fn parse<T: AsRef<[u8]>>(
        p: &UdpPacket<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        cs: Checksum,
    ) -> Result<Self, WireError> {
        if cs == Checksum::Check && !p.verify_checksum(src, dst) {
            return Err(WireError::BadChecksum);
        }
        Ok(UdpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
        })
    }

    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// `datagram` is the whole datagram with the data in place after the
    /// first 8 bytes: writes the header with length `datagram.len()` and,
    /// with [`Checksum::Check`], the checksum (else zero: "no checksum").
    pub fn emit(
        &self,
        datagram: &mut [u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        cs: Checksum,
    ) -> Result<usize, WireError> {
        let len = u16::try_from(datagram.len()).map_err(|_| WireError::BadLength)?;
        let b = datagram
            .get_mut(..HEADER_LEN)
            .ok_or(WireError::BufferTooSmall)?;
        put16(b, field::SRC_PORT, self.src_port);
        put16(b, field::DST_PORT, self.dst_port);
        put16(b, field::LENGTH, len);
        put16(b, field::CHECKSUM, 0);
        if cs == Checksum::Check {
            let mut p = UdpPacket { buffer: datagram };
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

    /// The captured DNS query (see `captures`): 198.18.0.2:41214 ->
    /// 198.18.0.100:53, checksum 0xf043.
    fn dns() -> [u8; 37] {
        let mut b = [0u8; 37];
        b.copy_from_slice(&crate::captures::UDP_DNS_QUERY[34..]);
        b
    }

    #[test]
    fn test_parse() {
        let b = dns();
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.src_port(), 41214);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.len(), 37);
        assert_eq!(p.payload().len(), 29);
        assert_eq!(p.checksum(), 0xf043);
        assert!(p.verify_checksum(SRC, DST));
        assert!(!p.verify_checksum(SRC, Ipv4Addr::new(198, 18, 0, 101)));
        let mut none = b;
        none[6..8].fill(0);
        assert!(
            UdpPacket::new_checked(&none[..])
                .unwrap()
                .verify_checksum(SRC, Ipv4Addr::new(1, 1, 1, 1)),
            "zero means none"
        );
    }

    #[test]
    fn test_fill_and_verify() {
        let mut b = dns();
        b[6..8].fill(0);
        let mut p = UdpPacket::new_checked(&mut b[..]).unwrap();
        p.fill_checksum(SRC, DST);
        assert_eq!(p.checksum(), 0xf043);
    }

    #[test]
    fn test_emit() {
        let mut b = [0u8; 37];
        b[8..].copy_from_slice(&dns()[8..]);
        let r = UdpRepr {
            src_port: 41214,
            dst_port: 53,
        };
        assert_eq!(r.emit(&mut b, SRC, DST, Checksum::Check).unwrap(), 8);
        assert_eq!(b, dns());
        r.emit(&mut b, SRC, DST, Checksum::Ignore).unwrap();
        assert_eq!(&b[6..8], &[0, 0]);
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(UdpRepr::parse(&p, SRC, DST, Checksum::Check).unwrap(), r);
    }

    #[test]
    fn test_rejects_and_trims() {
        let dns = dns();
        assert_eq!(
            UdpPacket::new_checked(&dns[..7]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            UdpPacket::new_checked(&dns[..36]).unwrap_err(),
            WireError::BadLength
        );
        let mut b = dns;
        b[5] = 7;
        assert_eq!(
            UdpPacket::new_checked(&b[..]).unwrap_err(),
            WireError::BadLength
        );
        b[5] = 9;
        let p = UdpPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.payload(), &[0x12]);
    }

    #[test]
    fn computed_zero_is_sent_as_all_ones() {
        // Choose the last payload word so that the sum is 0xffff: the
        // computed checksum is then 0 and must be sent as 0xffff.
        let mut b = [0u8; 10];
        UdpRepr {
            src_port: 1,
            dst_port: 2,
        }
        .emit(&mut b, SRC, DST, Checksum::Ignore)
        .unwrap();
        let s = datagram_sum(&b, SRC, DST);
        b[8..10].copy_from_slice(&(!s).to_be_bytes());
        let mut p = UdpPacket::new_checked(&mut b[..]).unwrap();
        p.fill_checksum(SRC, DST);
        assert_eq!(p.checksum(), 0xffff);
        assert!(p.verify_checksum(SRC, DST));
    }
}
