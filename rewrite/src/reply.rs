//! Answers the balancer sends on its own: a TCP reset for a flow it refuses
//! (shedding, connection limits, no backend) or whose backend was reset.
//!
//! Like the NAT rewrites, in place and allocation-free: the received frame
//! becomes the reply (its buffer is at least as long, since the reply has
//! no options and no payload), so the dataplane answers without a buffer
//! of its own.

use core::net::Ipv4Addr;

use crate::Checksum;
use crate::ethernet::{EthernetFrame, MacAddr};
use crate::flow::proto;
use crate::ipv4::{self, Ipv4Packet, Ipv4Repr};
use crate::packet::{Kind, L4, Parsed};
use crate::tcp::{self, TcpFlags, TcpPacket, TcpRepr};

/// TTL of the balancer's own replies (Linux's default).
pub const REPLY_TTL: u8 = 64;

/// Why no reset was built. `Copy`, allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ReplyError {
    #[error("not a TCP segment")]
    NotTcp,
    #[error("IPv4 fragment")]
    Fragment,
    /// RFC 9293 §3.10.7.1: a reset is never answered with a reset.
    #[error("the segment is itself a reset")]
    IsReset,
    /// The frame does not match its summary (a caller bug).
    #[error("frame does not match its parse summary")]
    FrameMismatch,
}

/// Turns the received TCP segment in `frame` (summarised by `parsed`) into
/// the reset that refuses it, in place; returns the reply's length (the
/// frame's first bytes; the rest is to be ignored).
///
/// Reset generation (RFC 9293 §3.10.7.1, as RFC 793 "Reset Generation"):
/// if the segment carries an ACK, the reset is `<SEQ=SEG.ACK><CTL=RST>`;
/// otherwise (a SYN, for a refused new flow) it is
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, where SEG.LEN counts the
/// payload and one for each of SYN and FIN. Addresses and ports are
/// swapped (the reply comes from the VIP and service port the client
/// addressed), the Ethernet destination is the segment's source and the
/// Ethernet source `src_mac` (the node's own unicast front MAC: in a
/// cluster the segment was addressed to the multicast cluster MAC, which
/// cannot be a source). IPv4: no options, TTL [`REPLY_TTL`], DF, ident 0;
/// TCP: no options, window 0; both checksums computed in full.
pub fn tcp_reset(frame: &mut [u8], parsed: &Parsed, src_mac: MacAddr) -> Result<usize, ReplyError> {
    let Kind::Ipv4 {
        header_len,
        total_len,
        src,
        dst,
        fragment,
        l4,
        ..
    } = parsed.kind
    else {
        return Err(ReplyError::NotTcp);
    };
    if fragment {
        return Err(ReplyError::Fragment);
    }
    let L4::Tcp {
        src_port, dst_port, ..
    } = l4
    else {
        return Err(ReplyError::NotTcp);
    };
    let l3 = parsed.l3_offset;
    let l4_at = l3 + header_len;
    let end = l3 + total_len;
    let seg = frame.get(l4_at..end).ok_or(ReplyError::FrameMismatch)?;
    let t = TcpPacket::new_checked(seg).map_err(|_| ReplyError::FrameMismatch)?;
    let flags = t.flags();
    if flags.contains(TcpFlags::RST) {
        return Err(ReplyError::IsReset);
    }
    let payload_len = u32::try_from(t.payload().len()).map_err(|_| ReplyError::FrameMismatch)?;
    let seg_len = payload_len
        + u32::from(flags.contains(TcpFlags::SYN))
        + u32::from(flags.contains(TcpFlags::FIN));
    let (seq, ack, reply_flags) = if flags.contains(TcpFlags::ACK) {
        (t.ack_number(), 0, TcpFlags::RST)
    } else {
        (
            0,
            t.seq_number().wrapping_add(seg_len),
            TcpFlags::RST.union(TcpFlags::ACK),
        )
    };
    let reply_len = l3 + ipv4::HEADER_LEN + tcp::HEADER_LEN;
    if frame.len() < reply_len || end < reply_len {
        return Err(ReplyError::FrameMismatch);
    }
    let client_mac = parsed.src_mac;
    let mut eth = EthernetFrame::new_checked(&mut *frame).map_err(|_| ReplyError::FrameMismatch)?;
    eth.set_dst_addr(client_mac);
    eth.set_src_addr(src_mac);
    let (reply_src, reply_dst): (Ipv4Addr, Ipv4Addr) = (dst, src);
    let ip = Ipv4Repr {
        src: reply_src,
        dst: reply_dst,
        protocol: proto::TCP,
        payload_len: tcp::HEADER_LEN as u16,
        ttl: REPLY_TTL,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: true,
        more_frags: false,
        frag_offset: 0,
        options: &[],
    };
    let header = frame
        .get_mut(l3..l3 + ipv4::HEADER_LEN)
        .ok_or(ReplyError::FrameMismatch)?;
    ip.emit(header, Checksum::Check)
        .map_err(|_| ReplyError::FrameMismatch)?;
    let rst = TcpRepr {
        src_port: dst_port,
        dst_port: src_port,
        seq,
        ack,
        flags: reply_flags,
        window: 0,
        urgent: 0,
    };
    let segment = frame
        .get_mut(l3 + ipv4::HEADER_LEN..reply_len)
        .ok_or(ReplyError::FrameMismatch)?;
    rst.emit(segment, reply_src, reply_dst, Checksum::Check)
        .map_err(|_| ReplyError::FrameMismatch)?;
    // The view checks what was written: a reply that does not parse as
    // IPv4 would be a bug here, never sent.
    Ipv4Packet::new_checked(&frame[l3..reply_len]).map_err(|_| ReplyError::FrameMismatch)?;
    Ok(reply_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::captures;
    use crate::packet::parse;

    const NODE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);

    /// The reset for the captured Linux SYN 198.18.0.2:38922 -> VIP:80
    /// (seq 3360807021, options): RST+ACK from VIP:80, seq 0, ack
    /// 3360807022, no options. Checked field by field by etherparse in
    /// `reset_of_syn_parses_independently`.
    const SYN_RESET: [u8; 54] = [
        // Ethernet: to the client's MAC, from the node's
        0x96, 0xbb, 0x46, 0x5d, 0x7f, 0x0c, 0x02, 0x00, 0x00, 0x00, 0x00, 0x11, 0x08, 0x00,
        // IPv4: 20 bytes, total 40, ident 0, DF, TTL 64, TCP, VIP -> client
        0x45, 0x00, 0x00, 0x28, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xae, 0x45, 0xc6, 0x12, 0x00,
        0x64, 0xc6, 0x12, 0x00, 0x02,
        // TCP: 80 -> 38922, seq 0, ack 0xc851d86e, offset 5, RST+ACK, win 0
        0x00, 0x50, 0x98, 0x0a, 0x00, 0x00, 0x00, 0x00, 0xc8, 0x51, 0xd8, 0x6e, 0x50, 0x14, 0x00,
        0x00, 0xea, 0x2a, 0x00, 0x00,
    ];

    fn reset_of(frame: &[u8]) -> Result<Vec<u8>, ReplyError> {
        let mut f = frame.to_vec();
        let p = parse(&f).expect("captured frame parses");
        let n = tcp_reset(&mut f, &p, NODE_MAC)?;
        f.truncate(n);
        Ok(f)
    }

    #[test]
    fn reset_of_syn_is_golden() {
        assert_eq!(reset_of(&captures::TCP_SYN).expect("a reset"), SYN_RESET);
    }

    #[test]
    fn reset_of_syn_parses_independently() {
        let f = reset_of(&captures::TCP_SYN).expect("a reset");
        let p = etherparse::SlicedPacket::from_ethernet(&f).expect("etherparse");
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4")
        };
        let h = ip.header();
        assert_eq!(h.source_addr(), Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(h.destination_addr(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
        let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP")
        };
        assert_eq!((t.source_port(), t.destination_port()), (80, 38922));
        assert!(t.rst() && t.ack() && !t.syn());
        assert_eq!(
            (t.sequence_number(), t.acknowledgment_number()),
            (0, 3_360_807_022)
        );
        let sum = t
            .to_header()
            .calc_checksum_ipv4_raw(h.source(), h.destination(), &[])
            .expect("checksum");
        assert_eq!(sum, t.checksum());
    }

    /// A segment with ACK (a data segment of a connection whose backend
    /// was reset) gets `<SEQ=SEG.ACK><CTL=RST>`.
    #[test]
    fn reset_of_acked_segment_takes_its_ack_as_sequence() {
        let f = reset_of(&captures::TCP_GET).expect("a reset");
        let p = parse(&f).expect("reply parses");
        let Kind::Ipv4 {
            l4: L4::Tcp { flags, .. },
            total_len,
            ..
        } = p.kind
        else {
            panic!("tcp")
        };
        assert_eq!(flags, TcpFlags::RST);
        assert_eq!(total_len, 40);
        let t = TcpPacket::new_checked(&f[34..]).expect("tcp");
        // TCP_GET: ack 0x2c2d2156
        assert_eq!((t.seq_number(), t.ack_number()), (0x2c2d_2156, 0));
        assert!(t.verify_checksum(Ipv4Addr::new(198, 18, 0, 100), Ipv4Addr::new(198, 18, 0, 2)));
    }

    /// SEG.LEN counts the payload and FIN: a FIN without ACK carrying 18
    /// bytes is acknowledged at seq + 19.
    #[test]
    fn reset_acknowledges_payload_and_fin() {
        let mut f = captures::TCP_GET.to_vec();
        // clear ACK and PSH, set FIN; fix the TCP checksum afterwards is not
        // needed: parse does not verify it.
        f[47] = 0x01;
        let p = parse(&f).expect("parses");
        let n = tcp_reset(&mut f, &p, NODE_MAC).expect("a reset");
        let t = TcpPacket::new_checked(&f[34..n]).expect("tcp");
        assert_eq!(t.ack_number(), 0xc851_d86e + 18 + 1);
        assert_eq!(t.flags(), TcpFlags::RST.union(TcpFlags::ACK));
    }

    #[test]
    fn refuses_resets_udp_and_fragments() {
        let mut f = captures::TCP_SYN.to_vec();
        f[47] = 0x04; // RST
        assert_eq!(reset_of(&f), Err(ReplyError::IsReset));
        assert_eq!(reset_of(&captures::UDP_DNS_QUERY), Err(ReplyError::NotTcp));
        assert_eq!(reset_of(&captures::ARP_REQUEST), Err(ReplyError::NotTcp));
        let mut frag = captures::TCP_SYN.to_vec();
        frag[20] |= 0x20; // MF
        // the header checksum no longer matches: parse refuses before us,
        // so build the summary by hand.
        let mut p = parse(&captures::TCP_SYN).expect("parses");
        if let Kind::Ipv4 { fragment, .. } = &mut p.kind {
            *fragment = true;
        }
        assert_eq!(
            tcp_reset(&mut frag, &p, NODE_MAC),
            Err(ReplyError::Fragment)
        );
    }

    #[test]
    fn a_summary_longer_than_the_frame_is_refused_not_a_panic() {
        let p = parse(&captures::TCP_SYN).expect("parses");
        let mut short = captures::TCP_SYN[..50].to_vec();
        assert_eq!(
            tcp_reset(&mut short, &p, NODE_MAC),
            Err(ReplyError::FrameMismatch)
        );
    }
}
