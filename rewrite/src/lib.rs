//! Packet formats and rewrites for the balancer's dataplane.
//!
//! This crate is the project's `wire/` (in the smoltcp sense): no I/O, no
//! clock, no async, no allocation on the packet path and no panic on any
//! input.
//!
//! - One zero-copy view per format ([`EthernetFrame`], [`ArpPacket`],
//!   [`Ipv4Packet`], [`TcpPacket`], [`UdpPacket`], [`IcmpPacket`]): a
//!   `new_checked()` validates the lengths once, so that no accessor can
//!   panic afterwards; getters need `AsRef<[u8]>`, setters `AsMut<[u8]>`.
//!   Each format has a `Repr` with `parse` / `emit` / `buffer_len`.
//! - [`checksum`]: the Internet checksum (RFC 1071) and RFC 1624 incremental
//!   updates.
//! - [`packet::parse`]: the one entry point the dataplane calls per frame; it
//!   returns a small `Copy` summary ([`Parsed`]) or the reason to drop
//!   ([`ParseError`]).
//! - [`nat`]: in-place NAT / DR rewrites of a whole frame, checksums fixed
//!   incrementally, and [`nat::complete_checksum`] for frames that carry a
//!   partial (offloaded) checksum.
//! - [`reply`]: the balancer's own answers (a TCP reset for a refused flow),
//!   built in place from the received frame.
//! - [`flow`]: the flow key and the seeded flow hash.
//! - [`maglev`]: the bucket table (which cluster node owns which flows).
//! - `build` (feature `builder`, and in this crate's tests): a frame builder
//!   for tests.
#![forbid(unsafe_code)]

pub mod arp;
#[cfg(any(test, feature = "builder"))]
pub mod build;
#[cfg(test)]
mod captures;
pub mod checksum;
pub mod ethernet;
pub mod flow;
pub mod icmp;
pub mod ipv4;
pub mod maglev;
pub mod nat;
pub mod packet;
pub mod reply;
pub mod tcp;
pub mod udp;

pub use arp::{ArpOp, ArpPacket, ArpRepr};
pub use ethernet::{EthernetFrame, EthernetRepr, MacAddr};
pub use flow::{FlowHasher, FlowKey};
pub use icmp::{IcmpPacket, IcmpRepr};
pub use ipv4::{Ipv4Packet, Ipv4Repr};
pub use maglev::{BucketTable, NodeId, TableParams};
pub use nat::RewriteError;
pub use packet::{Kind, L4, ParseError, Parsed, parse};
pub use tcp::{TcpFlags, TcpPacket, TcpRepr};
pub use udp::{UdpPacket, UdpRepr};

/// Why a view or a `Repr` refused a buffer. `Copy` and allocation-free: it is
/// returned on the packet path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the fixed part of the header.
    #[error("buffer shorter than the header")]
    Truncated,
    /// IPv4: the version field is not 4.
    #[error("IP version is not 4")]
    BadVersion,
    /// IPv4: IHL below 5 or pointing past the buffer.
    #[error("bad IPv4 header length (IHL)")]
    BadHeaderLength,
    /// IPv4: total length below the header length or past the buffer.
    #[error("bad IPv4 total length")]
    BadTotalLength,
    /// A header checksum did not verify (only when asked to verify).
    #[error("bad checksum")]
    BadChecksum,
    /// TCP: data offset below 5 or pointing past the segment.
    #[error("bad TCP data offset")]
    BadDataOffset,
    /// UDP: length field below 8 or past the datagram; or a length that does
    /// not fit the 16-bit field when emitting.
    #[error("bad length field")]
    BadLength,
    /// IPv4: a fragment offset that is not a multiple of 8 (emit).
    #[error("fragment offset not a multiple of 8")]
    BadFragmentOffset,
    /// IPv4: options longer than 40 bytes or not a multiple of 4 (emit).
    #[error("IPv4 options not a multiple of 4 bytes or longer than 40")]
    BadOptionsLength,
    /// ARP for something other than Ethernet / IPv4.
    #[error("ARP for other than Ethernet/IPv4")]
    Unsupported,
    /// `emit`: the output buffer is too small.
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// Whether `parse` verifies a checksum and `emit` fills it in (smoltcp's
/// habit: checksum work is a parameter, never hidden).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Checksum {
    /// `parse` verifies, `emit` computes and fills.
    #[default]
    Check,
    /// `parse` does not look, `emit` leaves zero (for UDP: "no checksum").
    Ignore,
}

/// A fixed field: a byte range inside a header.
pub(crate) type Field = core::ops::Range<usize>;

// Byte access used by the views. The views check lengths in `new_checked`,
// so that these indexings cannot go out of bounds afterwards.
#[inline]
pub(crate) fn be16(b: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([b[f.start], b[f.start + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], f: Field) -> u32 {
    u32::from_be_bytes([b[f.start], b[f.start + 1], b[f.start + 2], b[f.start + 3]])
}

#[inline]
pub(crate) fn put16(b: &mut [u8], f: Field, v: u16) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub(crate) fn put32(b: &mut [u8], f: Field, v: u32) {
    b[f].copy_from_slice(&v.to_be_bytes());
}
