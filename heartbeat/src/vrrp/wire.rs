//! VRRPv3 advertisement format (RFC 5798 §5) for IPv4. The IPv4 header
//! around it is read and written with `rewrite::ipv4` and the checksums come
//! from `rewrite::checksum`: one owner per format in the workspace.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       IPvX Address(es)                        |
//! ```
//!
//! Raw byte indexing of VRRP messages happens only in this file.

use std::net::Ipv4Addr;

use rewrite::ipv4::{Ipv4Packet, Ipv4Repr};
use rewrite::{Checksum, checksum};

/// IP protocol number of VRRP (RFC 5798 §5.1.1.4).
pub const IP_PROTO_VRRP: u8 = rewrite::flow::proto::VRRP;
/// The VRRP IPv4 multicast group (RFC 5798 §5.1.1.2).
pub const VRRP_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// TTL every advertisement is sent with and must arrive with (RFC 5798 §5.1.1.3).
pub const VRRP_TTL: u8 = 255;
/// Version 3 (RFC 5798 §5.2.1).
pub const VRRP_VERSION: u8 = 3;
/// Type 1: ADVERTISEMENT, the only type defined (RFC 5798 §5.2.2).
pub const VRRP_TYPE_ADVERTISEMENT: u8 = 1;
/// Fixed header length before the address list.
pub const HEADER_LEN: usize = 8;

/// Why a buffer is not a VRRPv3 advertisement. `Copy`, allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated packet")]
    Truncated,
    #[error("not IPv4 or bad IPv4 header")]
    BadIpHeader,
    #[error("IP protocol is not VRRP")]
    NotVrrp,
    #[error("IPv4 fragment")]
    Fragment,
    #[error("VRRP version {0} is not 3")]
    BadVersion(u8),
    #[error("VRRP type {0} is not ADVERTISEMENT")]
    BadType(u8),
    #[error("VRRP checksum mismatch")]
    BadChecksum,
}

mod field {
    use std::ops::Range;
    /// Version (high nibble) and Type (low nibble), RFC 5798 §5.2.1-5.2.2.
    pub const VER_TYPE: usize = 0;
    /// Virtual Router Identifier, 1..255, RFC 5798 §5.2.3.
    pub const VRID: usize = 1;
    /// Priority: 255 address owner, 1..254 backups, 0 = master stops, §5.2.4.
    pub const PRIORITY: usize = 2;
    /// Count IPvX Addr, §5.2.5.
    pub const COUNT: usize = 3;
    /// 4 reserved bits (§5.2.6, sent as zero, ignored) + 12-bit Max Adver
    /// Int in centiseconds (§5.2.7).
    pub const RSVD_MAX_ADVER: Range<usize> = 4..6;
    /// Checksum over the VRRP message and the IP pseudo-header, §5.2.8.
    pub const CHECKSUM: Range<usize> = 6..8;
    /// IPv4 address list, §5.2.9.
    pub const ADDRESSES: usize = 8;
}

/// A read/write view of a VRRPv3 message (the IP payload).
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checks; use [`Packet::new_checked`] on input.
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer after checking that the fixed header and the address
    /// list it announces fit, so that no accessor can panic afterwards.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Packet { buffer };
        p.check_len()?;
        Ok(p)
    }

    fn check_len(&self) -> Result<(), WireError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b.len() < HEADER_LEN + 4 * usize::from(b[field::COUNT]) {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TYPE] >> 4
    }
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TYPE] & 0x0f
    }
    pub fn vrid(&self) -> u8 {
        self.buffer.as_ref()[field::VRID]
    }
    pub fn priority(&self) -> u8 {
        self.buffer.as_ref()[field::PRIORITY]
    }
    pub fn addr_count(&self) -> u8 {
        self.buffer.as_ref()[field::COUNT]
    }
    /// Max Adver Int in centiseconds (12 bits; the reserved nibble masked off).
    pub fn max_adver_int(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::RSVD_MAX_ADVER];
        u16::from_be_bytes([b[0], b[1]]) & 0x0fff
    }
    pub fn checksum(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::CHECKSUM];
        u16::from_be_bytes([b[0], b[1]])
    }
    /// The `i`th address; `None` past `addr_count()`.
    pub fn address(&self, i: usize) -> Option<Ipv4Addr> {
        if i >= usize::from(self.addr_count()) {
            return None;
        }
        let o = field::ADDRESSES + 4 * i;
        let b = self.buffer.as_ref();
        Some(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]))
    }
    /// Length of the message as announced (header + addresses); bytes after
    /// it in the buffer are not covered by the checksum.
    pub fn message_len(&self) -> usize {
        HEADER_LEN + 4 * usize::from(self.addr_count())
    }
    /// Verifies the checksum with the IPv4 pseudo-header (RFC 5798 §5.2.8;
    /// unlike VRRPv2, v3 includes the pseudo-header).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let msg = &self.buffer.as_ref()[..self.message_len()];
        let Ok(len) = u16::try_from(msg.len()) else {
            return false;
        };
        let sum = checksum::combine(&[
            checksum::pseudo_header(src, dst, IP_PROTO_VRRP, len),
            checksum::data(msg),
        ]);
        sum == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version_type(&mut self, version: u8, msg_type: u8) {
        self.buffer.as_mut()[field::VER_TYPE] = (version << 4) | (msg_type & 0x0f);
    }
    pub fn set_vrid(&mut self, v: u8) {
        self.buffer.as_mut()[field::VRID] = v;
    }
    pub fn set_priority(&mut self, v: u8) {
        self.buffer.as_mut()[field::PRIORITY] = v;
    }
    pub fn set_addr_count(&mut self, v: u8) {
        self.buffer.as_mut()[field::COUNT] = v;
    }
    /// Sets Max Adver Int (centiseconds, 12 bits) with the reserved bits zero.
    pub fn set_max_adver_int(&mut self, cs: u16) {
        self.buffer.as_mut()[field::RSVD_MAX_ADVER].copy_from_slice(&(cs & 0x0fff).to_be_bytes());
    }
    pub fn set_checksum(&mut self, v: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&v.to_be_bytes());
    }
    /// Sets the `i`th address; ignored past `addr_count()`.
    pub fn set_address(&mut self, i: usize, a: Ipv4Addr) {
        if i < usize::from(self.addr_count()) {
            let o = field::ADDRESSES + 4 * i;
            self.buffer.as_mut()[o..o + 4].copy_from_slice(&a.octets());
        }
    }
    /// Computes and stores the checksum (RFC 5798 §5.2.8).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let len = self.message_len();
        let msg = &self.buffer.as_ref()[..len];
        let sum = checksum::combine(&[
            checksum::pseudo_header(src, dst, IP_PROTO_VRRP, len as u16),
            checksum::data(msg),
        ]);
        self.set_checksum(!sum);
    }
}

/// Most addresses one advertisement can carry in a 1500-byte frame
/// (RFC 5798 §5.2.5 bounds by MTU; the count field allows 255).
pub const MAX_ADDRESSES: usize = 255;

/// A parsed VRRPv3 advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repr {
    pub vrid: u8,
    pub priority: u8,
    /// Centiseconds, 1..4095 (§5.2.7).
    pub max_adver_int: u16,
    pub addresses: Vec<Ipv4Addr>,
}

impl Repr {
    /// Parses a message that arrived from `src` to `dst`: version, type and
    /// checksum are checked here (RFC 5798 §7.1 items on the message itself);
    /// the router-specific checks live in `state::validate`.
    pub fn parse<T: AsRef<[u8]>>(
        packet: &Packet<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<Repr, WireError> {
        packet.check_len()?;
        if packet.version() != VRRP_VERSION {
            return Err(WireError::BadVersion(packet.version()));
        }
        if packet.msg_type() != VRRP_TYPE_ADVERTISEMENT {
            return Err(WireError::BadType(packet.msg_type()));
        }
        if !packet.verify_checksum(src, dst) {
            return Err(WireError::BadChecksum);
        }
        let addresses = (0..usize::from(packet.addr_count()))
            .filter_map(|i| packet.address(i))
            .collect();
        Ok(Repr {
            vrid: packet.vrid(),
            priority: packet.priority(),
            max_adver_int: packet.max_adver_int(),
            addresses,
        })
    }

    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + 4 * self.addresses.len().min(MAX_ADDRESSES)
    }

    /// Writes the message with its checksum for `src` -> `dst`.
    /// `packet` must be at least `buffer_len()` long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        packet: &mut Packet<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) {
        let n = self.addresses.len().min(MAX_ADDRESSES);
        packet.set_version_type(VRRP_VERSION, VRRP_TYPE_ADVERTISEMENT);
        packet.set_vrid(self.vrid);
        packet.set_priority(self.priority);
        packet.set_addr_count(n as u8);
        packet.set_max_adver_int(self.max_adver_int);
        for (i, a) in self.addresses.iter().take(n).enumerate() {
            packet.set_address(i, *a);
        }
        packet.fill_checksum(src, dst);
    }

    /// The message as bytes (convenience for the driver).
    pub fn to_bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut buf = vec![0u8; self.buffer_len()];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        self.emit(&mut p, src, dst);
        buf
    }
}

/// The IPv4 facts the per-instance checks of RFC 5798 §7.1 need (source,
/// destination, TTL), taken from `rewrite::ipv4`'s parse. A plain `Copy`
/// value so that the state machine's events do not borrow the receive
/// buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
}

impl From<&Ipv4Repr<'_>> for Ipv4Info {
    fn from(r: &Ipv4Repr<'_>) -> Self {
        Ipv4Info {
            src: r.src,
            dst: r.dst,
            ttl: r.ttl,
        }
    }
}

/// Parses a datagram as a raw IPv4 socket delivers it (header included):
/// the IPv4 header through `rewrite::ipv4` (lengths, version, header
/// checksum), then the VRRP message ([`Repr::parse`]: completeness, version,
/// type, checksum with the pseudo-header).
pub fn parse_ipv4_advert(buf: &[u8]) -> Result<(Ipv4Info, Repr), WireError> {
    let p = Ipv4Packet::new_checked(buf).map_err(|e| match e {
        // For a raw socket a total length past the buffer means the
        // datagram was cut short.
        rewrite::WireError::Truncated | rewrite::WireError::BadTotalLength => WireError::Truncated,
        _ => WireError::BadIpHeader,
    })?;
    let ip = Ipv4Repr::parse(&p, Checksum::Check).map_err(|_| WireError::BadIpHeader)?;
    if ip.protocol != IP_PROTO_VRRP {
        return Err(WireError::NotVrrp);
    }
    // The kernel reassembles before raw delivery; a fragment here is forged.
    if ip.more_frags || ip.frag_offset != 0 {
        return Err(WireError::Fragment);
    }
    let v = Packet::new_checked(p.payload())?;
    let repr = Repr::parse(&v, ip.src, ip.dst)?;
    Ok((Ipv4Info::from(&ip), repr))
}

/// Builds a complete IPv4 packet carrying a VRRP advertisement: TTL 255
/// (§5.1.1.3), TOS 0xc0 (internetwork control, as keepalived sends), DF
/// clear, header checksum filled.
pub fn emit_ipv4_advert(
    repr: &Repr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
) -> Result<Vec<u8>, rewrite::WireError> {
    let payload = repr.to_bytes(src, dst);
    let ip = Ipv4Repr {
        src,
        dst,
        protocol: IP_PROTO_VRRP,
        payload_len: u16::try_from(payload.len())
            .map_err(|_| rewrite::WireError::BadTotalLength)?,
        ttl: VRRP_TTL,
        dscp_ecn: 0xc0,
        ident,
        dont_frag: false,
        more_frags: false,
        frag_offset: 0,
        options: &[],
    };
    let mut b = vec![0u8; ip.buffer_len() + payload.len()];
    let hl = ip.emit(&mut b, Checksum::Check)?;
    b[hl..].copy_from_slice(&payload);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from keepalived 2.2.7 (VRRPv3) in a namespace; see
    // tests/data/README.md. Ethernet frames: 14 bytes of Ethernet header first.
    static KA_VRID51: &[u8] = include_bytes!("../../tests/data/ka-vrid51-prio150-100cs-2addr.bin");
    static KA_VRID52: &[u8] = include_bytes!("../../tests/data/ka-vrid52-prio200-10cs.bin");
    static KA_VRID51_STOP: &[u8] = include_bytes!("../../tests/data/ka-vrid51-prio0-shutdown.bin");
    static KA_VRID52_STOP: &[u8] = include_bytes!("../../tests/data/ka-vrid52-prio0-shutdown.bin");

    fn ip_of(frame: &[u8]) -> &[u8] {
        &frame[14..]
    }

    /// The IPv4 facts (through `rewrite::ipv4`) and the VRRP payload.
    fn ip_parts(frame: &[u8]) -> (Ipv4Info, u8, &[u8]) {
        let p = Ipv4Packet::new_checked(ip_of(frame)).expect("ipv4");
        let r = Ipv4Repr::parse(&p, Checksum::Check).expect("ipv4 checksum");
        let payload = &ip_of(frame)[p.header_len()..usize::from(p.total_len())];
        (Ipv4Info::from(&r), r.protocol, payload)
    }

    fn parse_frame(frame: &[u8]) -> (Ipv4Info, Result<Repr, WireError>) {
        let (ip, _, payload) = ip_parts(frame);
        let p = Packet::new_checked(payload).expect("len");
        (ip, Repr::parse(&p, ip.src, ip.dst))
    }

    #[test]
    fn test_parse_keepalived_two_addresses_one_second() {
        let (ip, r) = parse_frame(KA_VRID51);
        assert_eq!(ip.ttl, 255);
        assert_eq!(ip_parts(KA_VRID51).1, IP_PROTO_VRRP);
        assert_eq!(ip.dst, VRRP_GROUP_V4);
        assert_eq!(ip.src, Ipv4Addr::new(198, 18, 0, 21));
        assert_eq!(
            r.expect("valid"),
            Repr {
                vrid: 51,
                priority: 150,
                max_adver_int: 100,
                addresses: vec![
                    Ipv4Addr::new(198, 18, 0, 100),
                    Ipv4Addr::new(198, 18, 0, 101)
                ],
            }
        );
    }

    #[test]
    fn test_parse_keepalived_100ms() {
        let (_, r) = parse_frame(KA_VRID52);
        let r = r.expect("valid");
        assert_eq!((r.vrid, r.priority, r.max_adver_int), (52, 200, 10));
        assert_eq!(r.addresses, vec![Ipv4Addr::new(198, 18, 0, 102)]);
    }

    #[test]
    fn test_parse_keepalived_shutdown_priority_zero() {
        for f in [KA_VRID51_STOP, KA_VRID52_STOP] {
            let (_, r) = parse_frame(f);
            assert_eq!(r.expect("valid").priority, 0);
        }
    }

    #[test]
    fn test_emit_matches_keepalived_bytes() {
        // Our emitter must produce keepalived's VRRP bytes exactly (same
        // fields -> same checksum), which proves the pseudo-header handling.
        for f in [KA_VRID51, KA_VRID52, KA_VRID51_STOP, KA_VRID52_STOP] {
            let (ip, r) = parse_frame(f);
            let r = r.expect("valid");
            assert_eq!(r.to_bytes(ip.src, ip.dst), ip_parts(f).2);
        }
    }

    #[test]
    fn test_emit_ipv4_matches_keepalived_header_except_ident() {
        let (ip, r) = parse_frame(KA_VRID51);
        let ident = u16::from_be_bytes([ip_of(KA_VRID51)[4], ip_of(KA_VRID51)[5]]);
        let ours = emit_ipv4_advert(&r.expect("valid"), ip.src, ip.dst, ident).expect("emit");
        assert_eq!(ours, ip_of(KA_VRID51));
    }

    #[test]
    fn test_checksum_without_pseudo_header_is_rejected() {
        // A VRRPv2-style checksum (message only) must fail the v3 check.
        let (ip, _) = parse_frame(KA_VRID52);
        let mut msg = ip_parts(KA_VRID52).2.to_vec();
        msg[6] = 0;
        msg[7] = 0;
        let c = !checksum::data(&msg);
        let mut p = Packet::new_unchecked(&mut msg[..]);
        p.set_checksum(c);
        assert_eq!(Repr::parse(&p, ip.src, ip.dst), Err(WireError::BadChecksum));
    }

    #[test]
    fn test_checksum_depends_on_source_address() {
        let (ip, _) = parse_frame(KA_VRID52);
        let p = Packet::new_checked(ip_parts(KA_VRID52).2).expect("len");
        assert_eq!(
            Repr::parse(&p, Ipv4Addr::new(198, 18, 0, 22), ip.dst),
            Err(WireError::BadChecksum)
        );
    }

    #[test]
    fn test_truncated_and_count_overrun() {
        assert_eq!(
            Packet::new_checked(&[0x31u8, 1, 100][..]).err(),
            Some(WireError::Truncated)
        );
        // Count says 3 addresses, only one present.
        let b = [0x31u8, 1, 100, 3, 0, 100, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            Packet::new_checked(&b[..]).err(),
            Some(WireError::Truncated)
        );
    }

    #[test]
    fn test_bad_version_and_type() {
        let r = Repr {
            vrid: 7,
            priority: 100,
            max_adver_int: 100,
            addresses: vec![],
        };
        let (s, d) = (Ipv4Addr::new(198, 18, 0, 1), VRRP_GROUP_V4);
        let mut b = r.to_bytes(s, d);
        b[0] = 0x21;
        let p = Packet::new_checked(&b[..]).expect("len");
        assert_eq!(Repr::parse(&p, s, d), Err(WireError::BadVersion(2)));
        b[0] = 0x32;
        let p = Packet::new_checked(&b[..]).expect("len");
        assert_eq!(Repr::parse(&p, s, d), Err(WireError::BadType(2)));
    }

    #[test]
    fn test_reserved_bits_ignored_on_read_zero_on_write() {
        let r = Repr {
            vrid: 9,
            priority: 1,
            max_adver_int: 0x0fff,
            addresses: vec![],
        };
        let (s, d) = (Ipv4Addr::new(198, 18, 0, 1), VRRP_GROUP_V4);
        let b = r.to_bytes(s, d);
        assert_eq!(b[4] & 0xf0, 0);
        let mut b2 = b.clone();
        b2[4] |= 0xf0;
        let p = Packet::new_unchecked(&b2[..]);
        assert_eq!(p.max_adver_int(), 0x0fff);
    }

    #[test]
    fn test_parse_ipv4_advert_whole_keepalived_packets() {
        for f in [KA_VRID51, KA_VRID52, KA_VRID51_STOP, KA_VRID52_STOP] {
            let (ip, r) = parse_ipv4_advert(ip_of(f)).expect("valid");
            assert_eq!(ip, parse_frame(f).0);
            assert_eq!(Ok(r), parse_frame(f).1);
        }
    }

    #[test]
    fn test_parse_ipv4_advert_rejects_garbage_without_panic() {
        assert_eq!(parse_ipv4_advert(&[]), Err(WireError::Truncated));
        assert_eq!(parse_ipv4_advert(&[0x65; 20]), Err(WireError::BadIpHeader));
        let ip = ip_of(KA_VRID51);
        // A bad IPv4 header checksum.
        let mut b = ip.to_vec();
        b[10] ^= 0xff;
        assert_eq!(parse_ipv4_advert(&b), Err(WireError::BadIpHeader));
        // Another protocol (header checksum fixed up).
        let mut b = ip.to_vec();
        b[9] = 17;
        Ipv4Packet::new_checked(&mut b[..])
            .expect("ipv4")
            .fill_checksum();
        assert_eq!(parse_ipv4_advert(&b), Err(WireError::NotVrrp));
        // A forged fragment.
        let mut b = ip.to_vec();
        b[6] = 0x20; // MF
        Ipv4Packet::new_checked(&mut b[..])
            .expect("ipv4")
            .fill_checksum();
        assert_eq!(parse_ipv4_advert(&b), Err(WireError::Fragment));
        // Every prefix of a real packet parses or errors, never panics; a
        // cut inside the datagram is Truncated.
        for n in 0..ip.len() {
            assert!(parse_ipv4_advert(&ip[..n]).is_err(), "{n}");
        }
    }
}
