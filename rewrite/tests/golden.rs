//! Golden frame tables (Katran's habit): each row is a name, an input frame
//! built by the builder, an operation, and the expected verdict and output
//! bytes. Expected outputs are built *from scratch* with the rewritten
//! fields, so every NAT row also checks that the incremental checksum update
//! equals a full recomputation.
//!
//! The runner parses the input like the dataplane does; a parse error is a
//! drop (output = input). Otherwise it applies the operation; a refused
//! rewrite leaves the frame unchanged.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddrV4};

use rewrite::build::{FrameBuilder, arp_frame, quote};
use rewrite::icmp::{IcmpRepr, unreach_code};
use rewrite::nat::{self, RewriteError};
use rewrite::{ArpOp, ArpRepr, FlowKey, MacAddr, ParseError, Parsed, TcpFlags, arp, parse};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const VIP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const RS_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const BACK_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);

const CLIENT: SocketAddrV4 = SocketAddrV4::new(CLIENT_IP, 40000);
const VIP: SocketAddrV4 = SocketAddrV4::new(VIP_IP, 80);
const RS: SocketAddrV4 = SocketAddrV4::new(RS_IP, 8080);
const CLIENT_DNS: SocketAddrV4 = SocketAddrV4::new(CLIENT_IP, 5353);
const VIP_DNS: SocketAddrV4 = SocketAddrV4::new(VIP_IP, 53);
const RS_DNS: SocketAddrV4 = SocketAddrV4::new(RS_IP, 5300);

const CLIENT_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
const CLUSTER_MAC: MacAddr = MacAddr([0x01, 0x00, 0x5e, 0x12, 0x00, 0x64]);
const LB_FRONT_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x01, 0x01]);
const LB_BACK_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x02, 0x01]);
const RS_MAC: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x02, 0x11]);

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Parse only.
    Parse,
    NatForward(Ipv4Addr, u16),
    NatReverse(Ipv4Addr, u16),
    SetMacs(MacAddr, MacAddr),
    /// NAT forward, then the MACs for the back segment.
    NatForwardAndMacs(Ipv4Addr, u16, MacAddr, MacAddr),
    IcmpErrorForward(Ipv4Addr, u16),
    IcmpErrorReverse(Ipv4Addr, u16),
    /// complete_checksum, then nat_forward (a frame read with
    /// TP_STATUS_CSUMNOTREADY).
    CompleteThenNatForward(Ipv4Addr, u16),
    /// Answer an ARP request with (cluster MAC in the payload, NIC MAC as
    /// Ethernet source).
    ArpReply(MacAddr, MacAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Parsed and rewritten (or just parsed, for `Op::Parse`), with what
    /// the dataplane would key the frame by and its VLAN / fragment marks.
    Ok {
        flow: Option<FlowKey>,
        vlan: Option<u16>,
        fragment: bool,
    },
    /// Dropped by parse, counted under this name.
    Drop(&'static str),
    /// Parsed, but the rewrite refused.
    Refused(&'static str),
}

struct Row {
    name: &'static str,
    input: Vec<u8>,
    op: Op,
    verdict: Verdict,
    /// `None`: the output must equal the input.
    output: Option<Vec<u8>>,
}

fn ok(flow: Option<FlowKey>) -> Verdict {
    Verdict::Ok {
        flow,
        vlan: None,
        fragment: false,
    }
}

fn tcp_key(src: SocketAddrV4, dst: SocketAddrV4) -> Option<FlowKey> {
    Some(FlowKey::new(
        6,
        *src.ip(),
        src.port(),
        *dst.ip(),
        dst.port(),
    ))
}

fn udp_key(src: SocketAddrV4, dst: SocketAddrV4) -> Option<FlowKey> {
    Some(FlowKey::new(
        17,
        *src.ip(),
        src.port(),
        *dst.ip(),
        dst.port(),
    ))
}

/// Applies `f` to the frame and, when `refill` is set, recomputes the IPv4
/// header checksum, so that the intended defect is the one parse sees.
fn mutate(mut frame: Vec<u8>, refill: bool, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut frame);
    if refill {
        let hl = usize::from(frame[14] & 0x0f) * 4;
        frame[24] = 0;
        frame[25] = 0;
        let c = !rewrite::checksum::data(&frame[14..14 + hl]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
    }
    frame
}

fn rows() -> Vec<Row> {
    let get = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";
    let dns =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    let frag_needed = IcmpRepr::DstUnreachable {
        code: unreach_code::FRAG_NEEDED,
        next_hop_mtu: 1400,
    };
    let port_unreach = IcmpRepr::DstUnreachable {
        code: unreach_code::PORT,
        next_hop_mtu: 0,
    };

    // The client's segment before and after NAT, the server's reply
    // before and after reverse NAT.
    let to_vip = FrameBuilder::tcp(CLIENT, VIP)
        .payload(get)
        .macs(CLIENT_MAC, CLUSTER_MAC);
    let to_rs = FrameBuilder::tcp(CLIENT, RS)
        .payload(get)
        .macs(CLIENT_MAC, CLUSTER_MAC);
    let reply_rs = FrameBuilder::tcp(RS, CLIENT)
        .flags(TcpFlags::SYN | TcpFlags::ACK)
        .seq_ack(77, 2);
    let reply_vip = FrameBuilder::tcp(VIP, CLIENT)
        .flags(TcpFlags::SYN | TcpFlags::ACK)
        .seq_ack(77, 2);

    let mut rows = vec![
        // --- NAT ---
        Row {
            name: "nat_forward_tcp",
            input: to_vip.build(),
            op: Op::NatForward(RS_IP, 8080),
            verdict: ok(tcp_key(CLIENT, VIP)),
            output: Some(to_rs.build()),
        },
        Row {
            name: "nat_reverse_tcp",
            input: reply_rs.build(),
            op: Op::NatReverse(VIP_IP, 80),
            verdict: ok(tcp_key(RS, CLIENT)),
            output: Some(reply_vip.build()),
        },
        Row {
            name: "nat_forward_udp",
            input: FrameBuilder::udp(CLIENT_DNS, VIP_DNS).payload(dns).build(),
            op: Op::NatForward(RS_IP, 5300),
            verdict: ok(udp_key(CLIENT_DNS, VIP_DNS)),
            output: Some(FrameBuilder::udp(CLIENT_DNS, RS_DNS).payload(dns).build()),
        },
        Row {
            name: "nat_reverse_udp",
            input: FrameBuilder::udp(RS_DNS, CLIENT_DNS).payload(dns).build(),
            op: Op::NatReverse(VIP_IP, 53),
            verdict: ok(udp_key(RS_DNS, CLIENT_DNS)),
            output: Some(FrameBuilder::udp(VIP_DNS, CLIENT_DNS).payload(dns).build()),
        },
        Row {
            name: "nat_forward_udp_checksum_zero_stays_zero",
            input: FrameBuilder::udp(CLIENT_DNS, VIP_DNS)
                .udp_checksum(false)
                .payload(dns)
                .build(),
            op: Op::NatForward(RS_IP, 5300),
            verdict: ok(udp_key(CLIENT_DNS, VIP_DNS)),
            output: Some(
                FrameBuilder::udp(CLIENT_DNS, RS_DNS)
                    .udp_checksum(false)
                    .payload(dns)
                    .build(),
            ),
        },
        Row {
            name: "nat_reverse_udp_checksum_zero_stays_zero",
            input: FrameBuilder::udp(RS_DNS, CLIENT_DNS)
                .udp_checksum(false)
                .payload(dns)
                .build(),
            op: Op::NatReverse(VIP_IP, 53),
            verdict: ok(udp_key(RS_DNS, CLIENT_DNS)),
            output: Some(
                FrameBuilder::udp(VIP_DNS, CLIENT_DNS)
                    .udp_checksum(false)
                    .payload(dns)
                    .build(),
            ),
        },
        Row {
            // Record Route (RFC 791 §3.1, type 7) with room for 2 addresses
            // and a Router Alert: IHL 9; the options travel unchanged.
            name: "nat_forward_tcp_with_ip_options",
            input: to_vip
                .clone()
                .ip_options(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0x94, 4, 0, 0])
                .build(),
            op: Op::NatForward(RS_IP, 8080),
            verdict: ok(tcp_key(CLIENT, VIP)),
            output: Some(
                to_rs
                    .clone()
                    .ip_options(&[7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0x94, 4, 0, 0])
                    .build(),
            ),
        },
        Row {
            name: "nat_forward_tcp_in_vlan",
            input: to_vip.clone().vlan(100).build(),
            op: Op::NatForward(RS_IP, 8080),
            verdict: Verdict::Ok {
                flow: tcp_key(CLIENT, VIP),
                vlan: Some(100),
                fragment: false,
            },
            output: Some(to_rs.clone().vlan(100).build()),
        },
        Row {
            name: "nat_forward_then_macs_for_back_segment",
            input: to_vip.build(),
            op: Op::NatForwardAndMacs(RS_IP, 8080, LB_BACK_MAC, RS_MAC),
            verdict: ok(tcp_key(CLIENT, VIP)),
            output: Some(to_rs.clone().macs(LB_BACK_MAC, RS_MAC).build()),
        },
        // --- DR ---
        Row {
            name: "dr_rewrites_only_macs",
            input: to_vip.build(),
            op: Op::SetMacs(LB_BACK_MAC, RS_MAC),
            verdict: ok(tcp_key(CLIENT, VIP)),
            output: Some(to_vip.clone().macs(LB_BACK_MAC, RS_MAC).build()),
        },
        // --- ICMP errors ---
        Row {
            // The real server cannot take the client's 1500-byte segment
            // (sent to it after NAT); its frag-needed, quoting the minimum
            // (header + 8 bytes), must reach the client from the VIP about
            // client -> VIP:80, or PMTU discovery blackholes.
            name: "icmp_frag_needed_from_real_server",
            input: FrameBuilder::icmp(RS_IP, CLIENT_IP, frag_needed)
                .payload(&quote(&to_rs.build(), 28))
                .build(),
            op: Op::IcmpErrorReverse(VIP_IP, 80),
            verdict: ok(tcp_key(RS, CLIENT)),
            output: Some(
                FrameBuilder::icmp(VIP_IP, CLIENT_IP, frag_needed)
                    .payload(&quote(&to_vip.build(), 28))
                    .build(),
            ),
        },
        Row {
            // A back-side router quoting 68 bytes: the quoted TCP checksum
            // is present and is updated too.
            name: "icmp_frag_needed_long_quote_from_back_router",
            input: FrameBuilder::icmp(BACK_ROUTER_IP, CLIENT_IP, frag_needed)
                .payload(&quote(&to_rs.build(), 68))
                .build(),
            op: Op::IcmpErrorReverse(VIP_IP, 80),
            verdict: ok(tcp_key(RS, CLIENT)),
            output: Some(
                FrameBuilder::icmp(VIP_IP, CLIENT_IP, frag_needed)
                    .payload(&quote(&to_vip.build(), 68))
                    .build(),
            ),
        },
        Row {
            // The client's port unreachable about our (reverse-NATed) UDP
            // reply VIP:53 -> client:5353 goes to the real server as an error
            // about its own rs:5300 -> client:5353, quoted UDP checksum fixed.
            name: "icmp_port_unreachable_from_client_side",
            input: FrameBuilder::icmp(CLIENT_IP, VIP_IP, port_unreach)
                .payload(&quote(
                    &FrameBuilder::udp(VIP_DNS, CLIENT_DNS).payload(dns).build(),
                    1000,
                ))
                .build(),
            op: Op::IcmpErrorForward(RS_IP, 5300),
            verdict: ok(udp_key(CLIENT_DNS, VIP_DNS)),
            output: Some(
                FrameBuilder::icmp(CLIENT_IP, RS_IP, port_unreach)
                    .payload(&quote(
                        &FrameBuilder::udp(RS_DNS, CLIENT_DNS).payload(dns).build(),
                        1000,
                    ))
                    .build(),
            ),
        },
        Row {
            // A front router's time exceeded about our reply VIP:80 ->
            // client, quoting the RFC 792 minimum.
            name: "icmp_time_exceeded_from_front_router",
            input: FrameBuilder::icmp(ROUTER_IP, VIP_IP, IcmpRepr::TimeExceeded { code: 0 })
                .payload(&quote(&reply_vip.build(), 28))
                .build(),
            op: Op::IcmpErrorForward(RS_IP, 8080),
            verdict: ok(tcp_key(CLIENT, VIP)),
            output: Some(
                FrameBuilder::icmp(ROUTER_IP, RS_IP, IcmpRepr::TimeExceeded { code: 0 })
                    .payload(&quote(&reply_rs.build(), 28))
                    .build(),
            ),
        },
        Row {
            name: "icmp_error_with_bad_checksum_refused",
            input: mutate(
                FrameBuilder::icmp(RS_IP, CLIENT_IP, frag_needed)
                    .payload(&quote(&to_rs.build(), 28))
                    .build(),
                false,
                |f| f[36] ^= 0x01,
            ),
            op: Op::IcmpErrorReverse(VIP_IP, 80),
            verdict: Verdict::Refused(RewriteError::BadIcmpChecksum.as_str()),
            output: None,
        },
        // --- checksum offload ---
        Row {
            name: "partial_checksum_completed_then_nat_tcp",
            input: to_vip.clone().partial_checksum().build(),
            op: Op::CompleteThenNatForward(RS_IP, 8080),
            verdict: ok(tcp_key(CLIENT, VIP)),
            output: Some(to_rs.build()),
        },
        Row {
            name: "partial_checksum_completed_then_nat_udp",
            input: FrameBuilder::udp(CLIENT_DNS, VIP_DNS)
                .payload(dns)
                .partial_checksum()
                .build(),
            op: Op::CompleteThenNatForward(RS_IP, 5300),
            verdict: ok(udp_key(CLIENT_DNS, VIP_DNS)),
            output: Some(FrameBuilder::udp(CLIENT_DNS, RS_DNS).payload(dns).build()),
        },
        // --- ARP ---
        Row {
            name: "arp_request_for_vip_answered_with_cluster_mac",
            input: arp_frame(
                CLIENT_MAC,
                MacAddr::BROADCAST,
                &ArpRepr {
                    op: ArpOp::Request,
                    sender_mac: CLIENT_MAC,
                    sender_ip: CLIENT_IP,
                    target_mac: MacAddr::ZERO,
                    target_ip: VIP_IP,
                },
            ),
            op: Op::ArpReply(CLUSTER_MAC, LB_FRONT_MAC),
            verdict: ok(None),
            output: Some({
                let mut f = arp_frame(
                    LB_FRONT_MAC,
                    CLIENT_MAC,
                    &ArpRepr {
                        op: ArpOp::Reply,
                        sender_mac: CLUSTER_MAC,
                        sender_ip: VIP_IP,
                        target_mac: CLIENT_MAC,
                        target_ip: CLIENT_IP,
                    },
                );
                f.resize(60, 0);
                f
            }),
        },
        // --- parsed, but not rewritable ---
        Row {
            name: "first_fragment_recognised_and_not_natted",
            input: to_vip.clone().fragment(true, 0).build(),
            op: Op::NatForward(RS_IP, 8080),
            verdict: Verdict::Refused(RewriteError::Fragment.as_str()),
            output: None,
        },
        Row {
            name: "later_fragment_has_no_flow_key",
            input: FrameBuilder::ip(CLIENT_IP, VIP_IP, 6)
                .fragment(false, 1480)
                .payload(&[0xab; 100])
                .build(),
            op: Op::Parse,
            verdict: Verdict::Ok {
                flow: None,
                vlan: None,
                fragment: true,
            },
            output: None,
        },
        Row {
            name: "vlan_priority_tag_parsed",
            input: FrameBuilder::udp(CLIENT_DNS, VIP_DNS)
                .vlan(0)
                .payload(dns)
                .build(),
            op: Op::Parse,
            verdict: Verdict::Ok {
                flow: udp_key(CLIENT_DNS, VIP_DNS),
                vlan: Some(0),
                fragment: false,
            },
            output: None,
        },
        // --- every ParseError ---
        Row {
            name: "runt",
            input: to_vip.build()[..13].to_vec(),
            op: Op::Parse,
            verdict: Verdict::Drop("truncated"),
            output: None,
        },
        Row {
            name: "vlan_tag_cut_short",
            input: to_vip.clone().vlan(7).build()[..16].to_vec(),
            op: Op::Parse,
            verdict: Verdict::Drop("truncated"),
            output: None,
        },
        Row {
            name: "ipv6_ethertype",
            input: mutate(to_vip.build(), false, |f| {
                f[12..14].copy_from_slice(&[0x86, 0xdd])
            }),
            op: Op::Parse,
            verdict: Verdict::Drop("unsupported_ethertype"),
            output: None,
        },
        Row {
            name: "qinq_double_tag",
            input: mutate(to_vip.clone().vlan(7).build(), false, |f| {
                f[16..18].copy_from_slice(&[0x81, 0x00])
            }),
            op: Op::Parse,
            verdict: Verdict::Drop("unsupported_ethertype"),
            output: None,
        },
        Row {
            name: "arp_truncated",
            input: mutate(
                arp_frame(CLIENT_MAC, MacAddr::BROADCAST, &arp_request()),
                false,
                |f| f.truncate(41),
            ),
            op: Op::Parse,
            verdict: Verdict::Drop("arp_truncated"),
            output: None,
        },
        Row {
            name: "arp_not_ethernet_ipv4",
            input: mutate(
                arp_frame(CLIENT_MAC, MacAddr::BROADCAST, &arp_request()),
                false,
                |f| f[15] = 6,
            ),
            op: Op::Parse,
            verdict: Verdict::Drop("arp_unsupported"),
            output: None,
        },
        Row {
            name: "ipv4_header_cut_short",
            input: to_vip.build()[..14 + 19].to_vec(),
            op: Op::Parse,
            verdict: Verdict::Drop("ipv4_truncated"),
            output: None,
        },
        Row {
            name: "version_6_behind_ipv4_ethertype",
            input: mutate(to_vip.build(), true, |f| f[14] = 0x65),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_version"),
            output: None,
        },
        Row {
            name: "ihl_below_5",
            input: mutate(to_vip.build(), false, |f| f[14] = 0x44),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_header_length"),
            output: None,
        },
        Row {
            name: "ihl_past_the_frame",
            input: mutate(
                FrameBuilder::ip(CLIENT_IP, VIP_IP, 99).build(),
                false,
                |f| f[14] = 0x4f,
            ),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_header_length"),
            output: None,
        },
        Row {
            name: "total_length_past_the_frame",
            input: mutate(to_vip.build(), true, |f| f.truncate(f.len() - 1)),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_total_length"),
            output: None,
        },
        Row {
            name: "total_length_below_header_length",
            input: mutate(to_vip.build(), true, |f| {
                f[16..18].copy_from_slice(&19u16.to_be_bytes())
            }),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_total_length"),
            output: None,
        },
        Row {
            name: "bad_ip_checksum",
            input: to_vip.clone().no_ip_checksum().build(),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_ip_checksum"),
            output: None,
        },
        Row {
            name: "tcp_header_cut_short",
            input: FrameBuilder::ip(CLIENT_IP, VIP_IP, 6)
                .payload(&to_vip.build()[34..53])
                .build(),
            op: Op::Parse,
            verdict: Verdict::Drop("tcp_truncated"),
            output: None,
        },
        Row {
            name: "tcp_data_offset_below_5",
            input: mutate(to_vip.build(), false, |f| f[46] = 0x40),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_tcp_data_offset"),
            output: None,
        },
        Row {
            name: "tcp_data_offset_beyond_segment",
            input: mutate(FrameBuilder::tcp(CLIENT, VIP).build(), false, |f| {
                f[46] = 0x60
            }),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_tcp_data_offset"),
            output: None,
        },
        Row {
            name: "udp_header_cut_short",
            input: FrameBuilder::ip(CLIENT_IP, VIP_IP, 17)
                .payload(&[0, 53, 0, 53, 0, 8, 0])
                .build(),
            op: Op::Parse,
            verdict: Verdict::Drop("udp_truncated"),
            output: None,
        },
        Row {
            name: "udp_length_past_datagram",
            input: mutate(
                FrameBuilder::udp(CLIENT_DNS, VIP_DNS).payload(dns).build(),
                false,
                |f| f[39] += 1,
            ),
            op: Op::Parse,
            verdict: Verdict::Drop("bad_udp_length"),
            output: None,
        },
        Row {
            name: "icmp_header_cut_short",
            input: FrameBuilder::ip(ROUTER_IP, VIP_IP, 1)
                .payload(&[3, 4, 0, 0])
                .build(),
            op: Op::Parse,
            verdict: Verdict::Drop("icmp_truncated"),
            output: None,
        },
        Row {
            name: "icmp_error_quoting_only_an_ip_header",
            input: FrameBuilder::icmp(ROUTER_IP, VIP_IP, frag_needed)
                .payload(&quote(&reply_vip.build(), 20))
                .build(),
            op: Op::Parse,
            verdict: Verdict::Drop("icmp_error_truncated"),
            output: None,
        },
        Row {
            name: "icmp_error_quoting_7_transport_bytes",
            input: FrameBuilder::icmp(ROUTER_IP, VIP_IP, frag_needed)
                .payload(&quote(&reply_vip.build(), 27))
                .build(),
            op: Op::Parse,
            verdict: Verdict::Drop("icmp_error_truncated"),
            output: None,
        },
        Row {
            name: "icmp_error_quoting_non_ipv4",
            input: FrameBuilder::icmp(ROUTER_IP, VIP_IP, frag_needed)
                .payload(&mutate(quote(&reply_vip.build(), 28), false, |q| {
                    q[0] = 0x60
                }))
                .build(),
            op: Op::Parse,
            verdict: Verdict::Drop("icmp_error_malformed"),
            output: None,
        },
    ];
    // Ethernet padding: a short frame padded to 60 bytes NATs like any other
    // and the padding is left alone.
    let small = FrameBuilder::udp(CLIENT_DNS, VIP_DNS).payload(b"x");
    let pad = |mut f: Vec<u8>| {
        f.resize(60, 0);
        f
    };
    rows.push(Row {
        name: "nat_forward_udp_with_ethernet_padding",
        input: pad(small.build()),
        op: Op::NatForward(RS_IP, 5300),
        verdict: ok(udp_key(CLIENT_DNS, VIP_DNS)),
        output: Some(pad(FrameBuilder::udp(CLIENT_DNS, RS_DNS)
            .payload(b"x")
            .build())),
    });
    rows
}

fn arp_request() -> ArpRepr {
    ArpRepr {
        op: ArpOp::Request,
        sender_mac: CLIENT_MAC,
        sender_ip: CLIENT_IP,
        target_mac: MacAddr::ZERO,
        target_ip: VIP_IP,
    }
}

fn verdict_of(p: &Parsed) -> Verdict {
    let fragment = matches!(p.kind, rewrite::Kind::Ipv4 { fragment: true, .. });
    Verdict::Ok {
        flow: p.flow_key(),
        vlan: p.vlan,
        fragment,
    }
}

/// Runs one row the way the dataplane would.
fn run(row: &Row) -> (Verdict, Vec<u8>) {
    let mut frame = row.input.clone();
    let p = match parse(&frame) {
        Ok(p) => p,
        Err(e) => return (Verdict::Drop(e.as_str()), frame),
    };
    let res: Result<(), RewriteError> = match row.op {
        Op::Parse => Ok(()),
        Op::NatForward(a, port) => nat::nat_forward(&mut frame, &p, a, port),
        Op::NatReverse(a, port) => nat::nat_reverse(&mut frame, &p, a, port),
        Op::SetMacs(s, d) => nat::set_macs(&mut frame, s, d),
        Op::NatForwardAndMacs(a, port, s, d) => {
            nat::nat_forward(&mut frame, &p, a, port).and_then(|()| nat::set_macs(&mut frame, s, d))
        }
        Op::IcmpErrorForward(a, port) => nat::icmp_error_forward(&mut frame, &p, a, port),
        Op::IcmpErrorReverse(a, port) => nat::icmp_error_reverse(&mut frame, &p, a, port),
        Op::CompleteThenNatForward(a, port) => nat::complete_checksum(&mut frame, &p)
            .and_then(|()| nat::nat_forward(&mut frame, &p, a, port)),
        Op::ArpReply(answer, nic) => match p.kind {
            rewrite::Kind::Arp(req) => {
                let mut out = [0u8; 64];
                let n = arp::write_reply(&mut out, &req, answer, nic).unwrap();
                frame = out[..n].to_vec();
                Ok(())
            }
            rewrite::Kind::Ipv4 { .. } => Err(RewriteError::NotIpv4),
        },
    };
    match res {
        Ok(()) => (verdict_of(&p), frame),
        Err(e) => (Verdict::Refused(e.as_str()), frame),
    }
}

fn hex_diff(got: &[u8], want: &[u8]) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let from = first.saturating_sub(4);
    let show = |b: &[u8]| {
        b.iter()
            .skip(from)
            .take(16)
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "lengths {} / {}, first difference at byte {first}\n      got  @{from}: {}\n      want @{from}: {}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    )
}

#[test]
fn golden_frames() {
    let rows = rows();
    let mut failures = Vec::new();
    for row in &rows {
        let (verdict, out) = run(row);
        if verdict != row.verdict {
            failures.push(format!(
                "{}: verdict {verdict:?}, want {:?}",
                row.name, row.verdict
            ));
            continue;
        }
        let want = row.output.as_ref().unwrap_or(&row.input);
        if &out != want {
            failures.push(format!(
                "{}: output differs: {}",
                row.name,
                hex_diff(&out, want)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_rows_cover_every_parse_error() {
    let rows = rows();
    for e in ParseError::ALL {
        assert!(
            rows.iter().any(|r| r.verdict == Verdict::Drop(e.as_str())),
            "no golden row drops a frame as {}",
            e.as_str()
        );
    }
}

#[test]
fn golden_row_names_are_unique() {
    let rows = rows();
    let mut names: Vec<_> = rows.iter().map(|r| r.name).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n);
}

#[test]
fn golden_rewrites_are_not_identities() {
    // A row whose expected output equals its input proves nothing about
    // the rewrite: every rewriting row must change the frame.
    for row in rows() {
        if let (Some(out), Verdict::Ok { .. }) = (&row.output, &row.verdict) {
            assert_ne!(out, &row.input, "{}", row.name);
        }
    }
}
