//! Ethernet II frames (IEEE 802.3 §3.2.6 with the EtherType interpretation),
//! with one IEEE 802.1Q tag recognised.
//!
//! ```text
//! untagged: | dst (6) | src (6) | ethertype (2) | payload ...
//! tagged:   | dst (6) | src (6) | 0x8100 (2) | TCI (2) | ethertype (2) | payload ...
//! ```
//!
//! Only one tag is understood. A double-tagged (QinQ, 0x88a8 or a second
//! 0x8100) frame reports the outer tag and the inner TPID as its payload
//! ethertype, which [`crate::packet::parse`] refuses as unsupported.

use core::fmt;
use core::str::FromStr;

use crate::{Field, WireError, be16, put16};

/// EtherType values (IEEE "EtherType" registry).
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    /// IEEE 802.1Q customer VLAN tag.
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
    /// IEEE 802.1ad service VLAN tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88a8;
}

/// Length of an untagged Ethernet header.
pub const HEADER_LEN: usize = 14;
/// Length of an Ethernet header with one 802.1Q tag.
pub const VLAN_HEADER_LEN: usize = 18;
/// Minimum frame length without the FCS (IEEE 802.3 §4.4.2: 64 with FCS).
pub const MIN_FRAME_LEN: usize = 60;

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    pub const fn new(a: u8, b: u8, c: u8, d: u8, e: u8, f: u8) -> Self {
        MacAddr([a, b, c, d, e, f])
    }

    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// The I/G bit, the least significant bit of the first octet (IEEE
    /// 802-2014 §8.2): set for group (multicast and broadcast) addresses.
    /// A cluster MAC is multicast; a frame's *source* must never be.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub const fn is_broadcast(&self) -> bool {
        let o = self.0;
        o[0] & o[1] & o[2] & o[3] & o[4] & o[5] == 0xff
    }

    pub const fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    /// The U/L bit: a locally administered address.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// A MAC address string that is not six two-digit hex octets separated by
/// `:` (or all by `-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address: expected six two-digit hex octets like 01:00:5e:00:01:01")]
pub struct MacParseError;

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() != 17 {
            return Err(MacParseError);
        }
        let sep = b[2];
        if sep != b':' && sep != b'-' {
            return Err(MacParseError);
        }
        let mut out = [0u8; 6];
        for (i, o) in out.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && b[at - 1] != sep {
                return Err(MacParseError);
            }
            *o = (hex(b[at])? << 4) | hex(b[at + 1])?;
        }
        Ok(MacAddr(out))
    }
}

fn hex(c: u8) -> Result<u8, MacParseError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(MacParseError),
    }
}

mod field {
    use crate::Field;
    pub const DESTINATION: Field = 0..6;
    pub const SOURCE: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    /// 802.1Q: PCP (3) | DEI (1) | VID (12).
    pub const TCI: Field = 14..16;
    pub const INNER_ETHERTYPE: Field = 16..18;
}

/// A view of an Ethernet II frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Checks that the buffer holds the whole header (18 bytes when the
    /// outer ethertype is 802.1Q). Errors: [`WireError::Truncated`].
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if be16(b, field::ETHERTYPE) == ethertype::VLAN && b.len() < VLAN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(EthernetFrame { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst_addr(&self) -> MacAddr {
        mac(self.buffer.as_ref(), field::DESTINATION)
    }

    pub fn src_addr(&self) -> MacAddr {
        mac(self.buffer.as_ref(), field::SOURCE)
    }

    /// The ethertype right after the addresses (0x8100 on a tagged frame).
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    pub fn is_vlan_tagged(&self) -> bool {
        self.ethertype() == ethertype::VLAN
    }

    /// The whole 802.1Q tag control information, if tagged.
    pub fn vlan_tci(&self) -> Option<u16> {
        self.is_vlan_tagged()
            .then(|| be16(self.buffer.as_ref(), field::TCI))
    }

    /// The 12-bit VLAN id, if tagged (0 means "priority tag only").
    pub fn vlan_id(&self) -> Option<u16> {
        self.vlan_tci().map(|tci| tci & 0x0fff)
    }

    /// The ethertype of the payload (after the tag, if any).
    pub fn payload_ethertype(&self) -> u16 {
        if self.is_vlan_tagged() {
            be16(self.buffer.as_ref(), field::INNER_ETHERTYPE)
        } else {
            self.ethertype()
        }
    }

    /// 14, or 18 with an 802.1Q tag: the offset of the payload.
    pub fn header_len(&self) -> usize {
        if self.is_vlan_tagged() {
            VLAN_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Everything after the header, including any Ethernet padding.
    pub fn payload(&self) -> &[u8] {
        self.buffer.as_ref().get(self.header_len()..).unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_addr(&mut self, addr: MacAddr) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&addr.0);
    }

    pub fn set_src_addr(&mut self, addr: MacAddr) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&addr.0);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        self.buffer.as_mut().get_mut(hl..).unwrap_or(&mut [])
    }
}

fn mac(b: &[u8], f: Field) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[f]);
    MacAddr(m)
}

/// The Ethernet header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EthernetRepr {
    pub src: MacAddr,
    pub dst: MacAddr,
    /// 802.1Q VLAN id (PCP and DEI are not kept: emitted as zero).
    pub vlan: Option<u16>,
    /// The payload's ethertype.
    pub ethertype: u16,
}

impl EthernetRepr {
    pub fn parse<T: AsRef<[u8]>>(frame: &EthernetFrame<T>) -> Self {
        EthernetRepr {
            src: frame.src_addr(),
            dst: frame.dst_addr(),
            vlan: frame.vlan_id(),
            ethertype: frame.payload_ethertype(),
        }
    }

    pub const fn buffer_len(&self) -> usize {
        if self.vlan.is_some() {
            VLAN_HEADER_LEN
        } else {
            HEADER_LEN
        }
    }

    /// Writes the header at the start of `buf`; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let len = self.buffer_len();
        let b = buf.get_mut(..len).ok_or(WireError::BufferTooSmall)?;
        b[field::DESTINATION].copy_from_slice(&self.dst.0);
        b[field::SOURCE].copy_from_slice(&self.src.0);
        match self.vlan {
            Some(vid) => {
                put16(b, field::ETHERTYPE, ethertype::VLAN);
                put16(b, field::TCI, vid & 0x0fff);
                put16(b, field::INNER_ETHERTYPE, self.ethertype);
            }
            None => put16(b, field::ETHERTYPE, self.ethertype),
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real broadcast ARP request header (first 14 bytes of a capture).
    static UNTAGGED: [u8; 16] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x0c, 0x29, 0x3e, 0x5c, 0x9b, 0x08, 0x06, 0x00,
        0x01,
    ];

    // 802.1Q tag VID 100 PCP 3 carrying IPv4.
    static TAGGED: [u8; 20] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x81, 0x00, 0x60,
        0x64, 0x08, 0x00, 0x45, 0x00,
    ];

    #[test]
    fn test_parse_untagged() {
        let f = EthernetFrame::new_checked(&UNTAGGED[..]).unwrap();
        assert_eq!(f.dst_addr(), MacAddr::BROADCAST);
        assert_eq!(
            f.src_addr(),
            MacAddr::new(0x00, 0x0c, 0x29, 0x3e, 0x5c, 0x9b)
        );
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert_eq!(f.vlan_id(), None);
        assert_eq!(f.header_len(), 14);
        assert_eq!(f.payload(), &[0x00, 0x01]);
    }

    #[test]
    fn test_parse_tagged() {
        let f = EthernetFrame::new_checked(&TAGGED[..]).unwrap();
        assert_eq!(f.vlan_tci(), Some(0x6064));
        assert_eq!(f.vlan_id(), Some(100));
        assert_eq!(f.payload_ethertype(), ethertype::IPV4);
        assert_eq!(f.header_len(), 18);
        assert_eq!(f.payload(), &[0x45, 0x00]);
    }

    #[test]
    fn test_truncated() {
        assert_eq!(
            EthernetFrame::new_checked(&UNTAGGED[..13]).unwrap_err(),
            WireError::Truncated
        );
        assert!(EthernetFrame::new_checked(&UNTAGGED[..14]).is_ok());
        assert_eq!(
            EthernetFrame::new_checked(&TAGGED[..17]).unwrap_err(),
            WireError::Truncated
        );
    }

    #[test]
    fn test_emit_roundtrip() {
        let f = EthernetFrame::new_checked(&TAGGED[..]).unwrap();
        let r = EthernetRepr::parse(&f);
        let mut out = [0u8; 18];
        assert_eq!(r.emit(&mut out).unwrap(), 18);
        // PCP is not kept by the repr.
        let mut want = [0u8; 18];
        want.copy_from_slice(&TAGGED[..18]);
        want[14] = 0x00;
        assert_eq!(out, want);
        assert_eq!(
            r.emit(&mut [0u8; 17]).unwrap_err(),
            WireError::BufferTooSmall
        );
    }

    #[test]
    fn test_setters() {
        let mut buf = UNTAGGED;
        let mut f = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        f.set_dst_addr(MacAddr::new(1, 2, 3, 4, 5, 6));
        f.set_src_addr(MacAddr::new(7, 8, 9, 10, 11, 12));
        assert_eq!(&buf[..12], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn mac_display_and_parse_roundtrip() {
        let m = MacAddr::new(0x01, 0x00, 0x5e, 0x7f, 0xab, 0xcd);
        assert_eq!(m.to_string(), "01:00:5e:7f:ab:cd");
        assert_eq!("01:00:5e:7f:ab:cd".parse::<MacAddr>().unwrap(), m);
        assert_eq!("01-00-5E-7F-AB-CD".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "01:00:5e:7f:ab",
            "01:00:5e:7f:ab:cd:",
            "01:00-5e:7f:ab:cd",
            "0g:00:5e:7f:ab:cd",
            "1:0:5e:7f:ab:cd:0",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacParseError), "{bad:?}");
        }
    }

    #[test]
    fn mac_multicast_and_broadcast() {
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(MacAddr::BROADCAST.is_broadcast());
        assert!(MacAddr::new(0x01, 0x00, 0x5e, 0, 0, 1).is_multicast());
        assert!(!MacAddr::new(0x01, 0x00, 0x5e, 0, 0, 1).is_broadcast());
        assert!(MacAddr::new(0x02, 0, 0, 0, 0, 1).is_unicast());
        assert!(MacAddr::new(0x02, 0, 0, 0, 0, 1).is_local());
    }
}
