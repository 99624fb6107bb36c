//! Internet checksum (RFC 1071) helpers.
//!
//! The `rewrite` crate is to own these for the whole workspace; until its
//! checksum module lands on main this private copy serves the VRRP and IPv4
//! code here. When it lands, this module becomes a re-export and is deleted.

use std::net::Ipv4Addr;

/// One's complement sum of `data` folded to 16 bits (not complemented).
/// An odd trailing byte is padded with zero (RFC 1071 §4.1).
pub fn data(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    fold(sum)
}

/// Adds partial sums.
pub fn combine(parts: &[u16]) -> u16 {
    fold(parts.iter().map(|&p| u32::from(p)).sum())
}

/// Partial sum of the IPv4 pseudo-header (RFC 768; RFC 5798 §5.2.8 points at
/// it for VRRPv3): source, destination, zero, protocol, upper-layer length.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
    let s = src.octets();
    let d = dst.octets();
    let mut buf = [0u8; 12];
    buf[0..4].copy_from_slice(&s);
    buf[4..8].copy_from_slice(&d);
    buf[9] = protocol;
    buf[10..12].copy_from_slice(&length.to_be_bytes());
    data(&buf)
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071 §3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            data(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(data(&[0x01]), 0x0100);
        assert_eq!(data(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn combine_folds_carry() {
        assert_eq!(combine(&[0xffff, 0x0001]), 0x0001);
    }
}
