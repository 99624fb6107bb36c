//! The Internet checksum: full computation (RFC 1071) and incremental update
//! (RFC 1624).
//!
//! Conventions (smoltcp's): [`data`], [`pseudo_header`] and [`combine`]
//! return a one's-complement *sum*, folded to 16 bits but not inverted; the
//! value written into a header is `!combine(&[...])`. A buffer that includes
//! a correct checksum field sums to `0xffff`.
//!
//! All functions are pure and total: no input panics.

use core::net::Ipv4Addr;

/// Folds a wide accumulator to 16 bits with end-around carry (RFC 1071 §4.1).
/// A non-zero input never folds to zero.
#[inline]
pub const fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, an odd last
/// byte padded with zero (RFC 1071 §4.1). Not inverted.
pub fn data(bytes: &[u8]) -> u16 {
    // Summing 32-bit words and folding later gives the same result as
    // summing 16-bit words, because 2^16 = 1 modulo 0xffff (RFC 1071 §2(B)).
    let mut acc: u64 = 0;
    let mut words = bytes.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    match *words.remainder() {
        [a] => acc += u64::from(a) << 8,
        [a, b] => acc += u64::from(u16::from_be_bytes([a, b])),
        [a, b, c] => acc += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        _ => {}
    }
    fold(acc)
}

/// One's-complement sum of several partial sums. Not inverted.
pub fn combine(sums: &[u16]) -> u16 {
    fold(sums.iter().map(|&s| u64::from(s)).sum())
}

/// Sum of the IPv4 pseudo-header used by TCP (RFC 9293 §3.1) and UDP
/// (RFC 768): source, destination, zero + protocol, transport length.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> u16 {
    let (s, d) = (src.to_bits(), dst.to_bits());
    fold(
        u64::from(s >> 16)
            + u64::from(s & 0xffff)
            + u64::from(d >> 16)
            + u64::from(d & 0xffff)
            + u64::from(proto)
            + u64::from(len),
    )
}

/// The checksum field value for a message whose sums are `sums`
/// (`!combine(sums)`).
pub fn finish(sums: &[u16]) -> u16 {
    !combine(sums)
}

/// RFC 1624 §3, eqn. 3: the new checksum field after a 16-bit word of the
/// covered data changed from `old` to `new`:
///
/// ```text
/// HC' = ~(~HC + ~m + m')
/// ```
///
/// `csum` is the checksum *field* (HC, inverted). Unlike eqn. 2 this never
/// produces the `0x0000`/`0xffff` discrepancy described in RFC 1624 §4: the
/// result equals a full recomputation whenever the input did. The word must
/// sit at an even offset of the covered data (true of every address, port
/// and pseudo-header field this crate updates).
#[inline]
pub const fn update16(csum: u16, old: u16, new: u16) -> u16 {
    !fold((!csum) as u64 + (!old) as u64 + new as u64)
}

/// RFC 1624 eqn. 3 for a 32-bit field (two adjacent 16-bit words), e.g. an
/// IPv4 address inside the header or the TCP/UDP pseudo-header.
#[inline]
pub const fn update32(csum: u16, old: u32, new: u32) -> u16 {
    !fold(
        (!csum) as u64
            + (!(old >> 16) & 0xffff) as u64
            + (!old & 0xffff) as u64
            + (new >> 16) as u64
            + (new & 0xffff) as u64,
    )
}

/// [`update32`] for an IPv4 address.
#[inline]
pub const fn update_addr(csum: u16, old: Ipv4Addr, new: Ipv4Addr) -> u16 {
    update32(csum, old.to_bits(), new.to_bits())
}

/// A UDP checksum field after an update: RFC 768 transmits a computed zero
/// as all ones, because zero in the field means "no checksum".
#[inline]
pub const fn udp_nonzero(csum: u16) -> u16 {
    if csum == 0 { 0xffff } else { csum }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_matches_rfc1071_numerical_example() {
        // RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(data(&b), 0xddf2);
        assert_eq!(finish(&[data(&b)]), 0x220d);
    }

    #[test]
    fn data_pads_odd_length_and_handles_every_remainder() {
        assert_eq!(data(&[]), 0);
        assert_eq!(data(&[0xab]), 0xab00);
        assert_eq!(data(&[0xab, 0xcd]), 0xabcd);
        assert_eq!(data(&[0xab, 0xcd, 0x01]), 0xaccd);
        assert_eq!(
            data(&[0xab, 0xcd, 0x01, 0x02, 0x03]),
            fold(0xabcd + 0x0102 + 0x0300)
        );
        // Many ones-words: carries wrap around.
        assert_eq!(data(&[0xff; 1000]), 0xffff);
    }

    #[test]
    fn data_of_real_ipv4_header_with_its_checksum_is_all_ones() {
        // A real header (the classic 192.168.0.1 -> 192.168.0.199 UDP one),
        // checksum 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(data(&h), 0xffff);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(finish(&[data(&z)]), 0xb861);
    }

    #[test]
    fn update16_follows_rfc1624_section4_example() {
        // RFC 1624 §4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 gives HC' =
        // 0x0000 (eqn. 2 would wrongly give 0xffff).
        assert_eq!(update16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn update32_equals_two_update16() {
        let c = 0x1234;
        let (old, new) = (0xc0a8_0001u32, 0x0a00_0005u32);
        let two = update16(
            update16(c, (old >> 16) as u16, (new >> 16) as u16),
            old as u16,
            new as u16,
        );
        assert_eq!(update32(c, old, new), two);
    }

    #[test]
    fn update_to_same_value_keeps_checksum() {
        assert_eq!(update16(0xabcd, 0x1111, 0x1111), 0xabcd);
        let a = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(update_addr(0x4321, a, a), 0x4321);
    }

    #[test]
    fn pseudo_header_matches_manual_sum() {
        let s = Ipv4Addr::new(192, 168, 0, 1);
        let d = Ipv4Addr::new(192, 168, 0, 199);
        assert_eq!(
            pseudo_header(s, d, 17, 0x5f),
            fold(0xc0a8 + 0x0001 + 0xc0a8 + 0x00c7 + 17 + 0x5f)
        );
    }

    #[test]
    fn udp_zero_is_sent_as_all_ones() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }
}
