//! Fuzzes `rewrite::parse` and every rewrite on arbitrary bytes.
//!
//! Input: a control byte, 6 bytes of rewrite arguments (an IPv4 address and
//! a port), then the frame. Control bit 0 fills the IPv4 header checksum and
//! bit 1 the ICMP checksum before parsing, so that the fuzzer gets past the
//! checksum checks and into the transport and ICMP-quote code. Checked
//! beyond "no panic": a refused rewrite leaves the frame unchanged and never
//! claims that the frame does not match its own summary, and a frame that
//! parsed still parses after a rewrite.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use rewrite::nat::{self, RewriteError};
use rewrite::{EthernetFrame, IcmpPacket, Ipv4Packet, Kind, MacAddr, Parsed, arp, parse};

fn rewrite_op(
    op: usize,
    f: &mut [u8],
    p: &Parsed,
    addr: Ipv4Addr,
    port: u16,
) -> Result<(), RewriteError> {
    match op {
        0 => nat::nat_forward(f, p, addr, port),
        1 => nat::nat_reverse(f, p, addr, port),
        2 => nat::icmp_error_forward(f, p, addr, port),
        3 => nat::icmp_error_reverse(f, p, addr, port),
        4 => nat::complete_checksum(f, p),
        _ => nat::set_macs(
            f,
            MacAddr::new(2, 0, 0, 0, 0, 1),
            MacAddr::new(2, 0, 0, 0, 0, 2),
        ),
    }
}

/// Fills the IPv4 (and ICMP) checksums of whatever looks like one.
fn fix_checksums(frame: &mut [u8], ip: bool, icmp: bool) {
    let Ok(mut eth) = EthernetFrame::new_checked(&mut *frame) else {
        return;
    };
    let Ok(mut p) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    if icmp && p.protocol() == 1 {
        if let Ok(mut i) = IcmpPacket::new_checked(p.payload_mut()) {
            i.fill_checksum();
        }
    }
    if ip {
        p.fill_checksum();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[ctl, a, b, c, d, p0, p1], rest)) = data.split_first_chunk::<7>() else {
        let _ = parse(data);
        return;
    };
    let addr = Ipv4Addr::new(a, b, c, d);
    let port = u16::from_be_bytes([p0, p1]);
    let mut owned = rest.to_vec();
    fix_checksums(&mut owned, ctl & 1 != 0, ctl & 2 != 0);
    let frame = &owned[..];
    let Ok(p) = parse(frame) else { return };
    let _ = p.flow_key();
    let _ = (p.l4_offset(), p.l3_end());
    if let Kind::Arp(req) = p.kind {
        let mut out = [0u8; 60];
        let _ = arp::write_reply(&mut out, &req, p.dst_mac, p.src_mac);
        let _ = arp::write_gratuitous(&mut out, req.target_ip, p.dst_mac, p.src_mac);
    }
    for op in 0..6 {
        let mut f = frame.to_vec();
        match rewrite_op(op, &mut f, &p, addr, port) {
            Ok(()) => assert!(parse(&f).is_ok(), "op {op} broke a frame that parsed"),
            Err(e) => {
                assert_eq!(f, frame, "op {op} refused but changed the frame");
                // With the frame's own summary, a rewrite may refuse the
                // kind of frame, never disagree with parse about it.
                assert_ne!(
                    e,
                    RewriteError::FrameMismatch,
                    "op {op}: parse and rewrite disagree"
                );
            }
        }
    }
    // The offload path: complete, then NAT the completed frame.
    let mut f = frame.to_vec();
    if nat::complete_checksum(&mut f, &p).is_ok() {
        let completed = f.clone();
        match nat::nat_forward(&mut f, &p, addr, port) {
            Ok(()) => assert!(
                parse(&f).is_ok(),
                "complete + NAT broke a frame that parsed"
            ),
            Err(_) => assert_eq!(f, completed, "NAT refused but changed the frame"),
        }
    }
});
