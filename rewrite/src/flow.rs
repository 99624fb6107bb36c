//! The flow key and the one seeded flow hash.
//!
//! Every part of the project that maps a flow to something (the bucket that
//! decides which node owns it, the source-hash schedulers, connection sync)
//! hashes the same key with this hasher, so that all nodes agree. The hash is
//! SipHash-1-3 with an explicit 128-bit key: never `std`'s `DefaultHasher`,
//! whose algorithm may change between compiler releases.

use core::hash::Hasher as _;
use core::net::Ipv4Addr;

use siphasher::sip::SipHasher13;

/// IP protocol numbers the balancer handles (IANA "Assigned Internet Protocol Numbers").
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const VRRP: u8 = 112;
}

/// A transport flow as seen in one direction: protocol, source and destination
/// address and port. For ICMP the ports are zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub dst: Ipv4Addr,
    pub dst_port: u16,
}

impl FlowKey {
    pub const fn new(
        proto: u8,
        src: Ipv4Addr,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
    ) -> Self {
        FlowKey {
            proto,
            src,
            src_port,
            dst,
            dst_port,
        }
    }

    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }

    /// A canonical byte encoding (network order), the input of [`FlowHasher`].
    pub fn to_bytes(&self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[0] = self.proto;
        b[1..5].copy_from_slice(&self.src.octets());
        b[5..7].copy_from_slice(&self.src_port.to_be_bytes());
        b[7..11].copy_from_slice(&self.dst.octets());
        b[11..13].copy_from_slice(&self.dst_port.to_be_bytes());
        b
    }
}

impl core::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let p = match self.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            _ => "ip",
        };
        write!(
            f,
            "{p} {}:{} -> {}:{}",
            self.src, self.src_port, self.dst, self.dst_port
        )
    }
}

/// The seeded flow hash. Nodes of one cluster must use the same seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHasher {
    k0: u64,
    k1: u64,
}

impl FlowHasher {
    pub const fn new(seed: [u8; 16]) -> Self {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            a[i] = seed[i];
            b[i] = seed[8 + i];
            i += 1;
        }
        FlowHasher {
            k0: u64::from_le_bytes(a),
            k1: u64::from_le_bytes(b),
        }
    }

    /// Hash of a flow as the client sent it (client -> VIP direction).
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hash_bytes(&key.to_bytes())
    }

    /// Hash of a client address alone (source-address affinity, source hash).
    pub fn hash_addr(&self, addr: Ipv4Addr) -> u64 {
        self.hash_bytes(&addr.octets())
    }

    pub fn hash_bytes(&self, bytes: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(bytes);
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_twice_is_identity() {
        let k = FlowKey::new(
            proto::TCP,
            Ipv4Addr::new(198, 18, 0, 2),
            40000,
            Ipv4Addr::new(198, 18, 0, 100),
            80,
        );
        assert_eq!(k.reversed().reversed(), k);
        assert_ne!(k.reversed(), k);
    }

    #[test]
    fn hash_depends_on_seed_and_is_stable() {
        let k = FlowKey::new(
            proto::UDP,
            Ipv4Addr::new(1, 2, 3, 4),
            1,
            Ipv4Addr::new(5, 6, 7, 8),
            2,
        );
        let a = FlowHasher::new([7; 16]);
        let b = FlowHasher::new([8; 16]);
        assert_eq!(a.hash(&k), FlowHasher::new([7; 16]).hash(&k));
        assert_ne!(a.hash(&k), b.hash(&k));
    }
}
