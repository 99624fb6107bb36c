//! Property tests: our views against etherparse 0.21, incremental checksums
//! against full recomputation, and no panic on any input.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{LinkExtSlice, LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use proptest::prelude::*;
use rewrite::build::{FrameBuilder, quote};
use rewrite::icmp::IcmpRepr;
use rewrite::nat::{self, RewriteError};
use rewrite::{Kind, L4, MacAddr, Parsed, TcpFlags, checksum, parse};

#[derive(Clone, Debug)]
enum L4Spec {
    Tcp {
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        checksum: bool,
    },
    /// An ICMP error quoting `quote_len` bytes of a TCP (or UDP) packet
    /// sent the other way.
    IcmpError {
        msg_type: u8,
        code: u8,
        inner_tcp: bool,
        quote_len: usize,
    },
    Echo {
        ident: u16,
        seq: u16,
    },
}

#[derive(Clone, Debug)]
struct Spec {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    ident: u16,
    options: Vec<u8>,
    l4: L4Spec,
    payload: Vec<u8>,
}

fn sock() -> impl Strategy<Value = SocketAddrV4> {
    (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddrV4::new(Ipv4Addr::from_bits(a), p))
}

fn tcp_udp() -> BoxedStrategy<L4Spec> {
    prop_oneof![
        (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(flags, seq, ack)| L4Spec::Tcp {
            flags,
            seq,
            ack
        }),
        any::<bool>().prop_map(|checksum| L4Spec::Udp { checksum }),
    ]
    .boxed()
}

fn icmp_error() -> BoxedStrategy<L4Spec> {
    (
        prop::sample::select(vec![3u8, 4, 5, 11, 12]),
        0u8..16,
        any::<bool>(),
        28usize..120,
    )
        .prop_map(|(msg_type, code, inner_tcp, quote_len)| L4Spec::IcmpError {
            msg_type,
            code,
            inner_tcp,
            quote_len,
        })
        .boxed()
}

fn any_l4() -> BoxedStrategy<L4Spec> {
    prop_oneof![
        2 => tcp_udp(),
        1 => icmp_error(),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(ident, seq)| L4Spec::Echo { ident, seq }),
    ]
    .boxed()
}

fn spec() -> impl Strategy<Value = Spec> {
    spec_with(any_l4())
}

fn spec_with(l4: BoxedStrategy<L4Spec>) -> impl Strategy<Value = Spec> {
    (
        any::<[u8; 6]>(),
        any::<[u8; 6]>(),
        prop::option::of(0u16..4096),
        sock(),
        sock(),
        any::<u8>(),
        any::<u16>(),
        // Up to 10 option words (IHL 15).
        (0usize..=10).prop_flat_map(|n| prop::collection::vec(any::<u8>(), n * 4)),
        l4,
        prop::collection::vec(any::<u8>(), 0..120),
    )
        .prop_map(
            |(src_mac, dst_mac, vlan, src, dst, ttl, ident, options, l4, payload)| Spec {
                src_mac,
                dst_mac,
                vlan,
                src,
                dst,
                ttl,
                ident,
                options,
                l4,
                payload,
            },
        )
}

/// The builder for `s` with its transport addresses replaced.
fn builder(s: &Spec, src: SocketAddrV4, dst: SocketAddrV4) -> FrameBuilder {
    let b = match s.l4 {
        L4Spec::Tcp { flags, seq, ack } => FrameBuilder::tcp(src, dst)
            .flags(TcpFlags(flags))
            .seq_ack(seq, ack),
        L4Spec::Udp { checksum } => FrameBuilder::udp(src, dst).udp_checksum(checksum),
        L4Spec::IcmpError { msg_type, code, .. } => {
            let repr = IcmpRepr::Other {
                msg_type,
                code,
                rest: [0, 0, 0x05, 0xdc],
            };
            FrameBuilder::icmp(*src.ip(), *dst.ip(), repr)
        }
        L4Spec::Echo { ident, seq } => FrameBuilder::icmp(
            *src.ip(),
            *dst.ip(),
            IcmpRepr::EchoRequest { ident, seq_no: seq },
        ),
    };
    let b = b
        .macs(MacAddr(s.src_mac), MacAddr(s.dst_mac))
        .ttl(s.ttl)
        .ident(s.ident)
        .ip_options(&s.options);
    let b = match s.vlan {
        Some(v) => b.vlan(v),
        None => b,
    };
    b.payload(&s.payload)
}

/// For ICMP errors: the quoted packet (sent from `q_src` to `q_dst`).
fn icmp_quote(s: &Spec, q_src: SocketAddrV4, q_dst: SocketAddrV4) -> Vec<u8> {
    match s.l4 {
        L4Spec::IcmpError {
            inner_tcp,
            quote_len,
            ..
        } => {
            let inner = if inner_tcp {
                FrameBuilder::tcp(q_src, q_dst)
            } else {
                FrameBuilder::udp(q_src, q_dst)
            };
            quote(&inner.payload(&s.payload).build(), quote_len)
        }
        _ => Vec::new(),
    }
}

fn build(s: &Spec) -> Vec<u8> {
    match s.l4 {
        // An error from src to dst about a packet dst -> (some peer).
        L4Spec::IcmpError { .. } => builder(s, s.src, s.dst)
            .payload(&icmp_quote(s, s.dst, peer(s)))
            .build(),
        _ => builder(s, s.src, s.dst).build(),
    }
}

/// The other end of the quoted flow of an ICMP error.
fn peer(s: &Spec) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from_bits(s.src.ip().to_bits() ^ 0x0101_0101),
        s.src.port() ^ 0x5555,
    )
}

fn ipv4_fields(p: &Parsed) -> (usize, usize, u8, u8, Ipv4Addr, Ipv4Addr, bool, bool, L4) {
    match p.kind {
        Kind::Ipv4 {
            header_len,
            total_len,
            ttl,
            proto,
            src,
            dst,
            fragment,
            has_options,
            l4,
        } => (
            header_len,
            total_len,
            ttl,
            proto,
            src,
            dst,
            fragment,
            has_options,
            l4,
        ),
        Kind::Arp(_) => panic!("ARP"),
    }
}

/// Every checksum of the frame, checked with etherparse's own routines:
/// IPv4 header, TCP / UDP (zero allowed for UDP), ICMP.
fn checksums_verify_with_etherparse(frame: &[u8]) -> Result<(), String> {
    let sp = SlicedPacket::from_ethernet(frame).map_err(|e| format!("etherparse: {e:?}"))?;
    let Some(NetSlice::Ipv4(ip)) = &sp.net else {
        return Err("not IPv4".into());
    };
    let h = ip.header().to_header();
    if h.calc_header_checksum() != h.header_checksum {
        return Err("IPv4 header checksum".into());
    }
    let (s, d) = (h.source, h.destination);
    match &sp.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4_raw(s, d, t.payload())
                .unwrap();
            if want != t.checksum() {
                return Err(format!(
                    "TCP checksum {:#06x}, want {want:#06x}",
                    t.checksum()
                ));
            }
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4_raw(s, d, u.payload())
                    .unwrap();
                if want != u.checksum() {
                    return Err(format!(
                        "UDP checksum {:#06x}, want {want:#06x}",
                        u.checksum()
                    ));
                }
            }
        }
        Some(TransportSlice::Icmpv4(i)) => {
            if checksum::data(i.slice()) != 0xffff {
                return Err("ICMP checksum".into());
            }
        }
        _ => return Err("no transport".into()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_agrees_with_etherparse(s in spec()) {
        let f = build(&s);
        let p = parse(&f).unwrap();
        let e = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(LinkSlice::Ethernet2(eth)) = &e.link else { panic!("no Ethernet") };
        prop_assert_eq!(p.src_mac.0, eth.source());
        prop_assert_eq!(p.dst_mac.0, eth.destination());
        let e_vlan = e.link_exts.iter().find_map(|x| match x {
            LinkExtSlice::Vlan(v) => Some(v.vlan_identifier().value()),
            _ => None,
        });
        prop_assert_eq!(p.vlan, e_vlan);
        let Some(NetSlice::Ipv4(ip)) = &e.net else { panic!("no IPv4") };
        let h = ip.header();
        let (hl, tl, ttl, proto, src, dst, fragment, has_options, l4) = ipv4_fields(&p);
        prop_assert_eq!(hl, usize::from(h.ihl()) * 4);
        prop_assert_eq!(tl, usize::from(h.total_len()));
        prop_assert_eq!(ttl, h.ttl());
        prop_assert_eq!(proto, h.protocol().0);
        prop_assert_eq!(src, h.source_addr());
        prop_assert_eq!(dst, h.destination_addr());
        prop_assert_eq!(fragment, h.is_fragmenting_payload());
        prop_assert_eq!(has_options, !h.options().is_empty());
        prop_assert_eq!(p.l3_offset + hl + ip.payload().payload.len(), p.l3_offset + tl);
        match (l4, &e.transport) {
            (L4::Tcp { src_port, dst_port, flags, seq }, Some(TransportSlice::Tcp(t))) => {
                prop_assert_eq!(seq, t.sequence_number());
                prop_assert_eq!(src_port, t.source_port());
                prop_assert_eq!(dst_port, t.destination_port());
                prop_assert_eq!(flags.syn(), t.syn());
                prop_assert_eq!(flags.ack(), t.ack());
                prop_assert_eq!(flags.fin(), t.fin());
                prop_assert_eq!(flags.rst(), t.rst());
                prop_assert_eq!(flags.contains(TcpFlags::CWR), t.cwr());
                prop_assert_eq!(flags.contains(TcpFlags::ECE), t.ece());
            }
            (L4::Udp { src_port, dst_port }, Some(TransportSlice::Udp(u))) => {
                prop_assert_eq!(src_port, u.source_port());
                prop_assert_eq!(dst_port, u.destination_port());
            }
            (L4::IcmpError { icmp_type, code, inner }, Some(TransportSlice::Icmpv4(i))) => {
                prop_assert_eq!(icmp_type, i.type_u8());
                prop_assert_eq!(code, i.code_u8());
                // The quoted datagram, parsed by etherparse as a packet of
                // its own (lax: it is cut short).
                let q = etherparse::LaxSlicedPacket::from_ip(i.payload()).unwrap();
                let Some(etherparse::LaxNetSlice::Ipv4(qip)) = &q.net else { panic!("quote not IPv4") };
                prop_assert_eq!(inner.src, qip.header().source_addr());
                prop_assert_eq!(inner.dst, qip.header().destination_addr());
                prop_assert_eq!(inner.proto, qip.header().protocol().0);
                let qp = qip.payload().payload;
                prop_assert_eq!(inner.src_port, u16::from_be_bytes([qp[0], qp[1]]));
                prop_assert_eq!(inner.dst_port, u16::from_be_bytes([qp[2], qp[3]]));
                prop_assert_eq!(p.flow_key(), Some(inner.reversed()));
            }
            (L4::IcmpOther { icmp_type, code }, Some(TransportSlice::Icmpv4(i))) => {
                prop_assert_eq!(icmp_type, i.type_u8());
                prop_assert_eq!(code, i.code_u8());
            }
            (ours, theirs) => prop_assert!(false, "ours {:?}, etherparse {:?}", ours, theirs),
        }
    }

    #[test]
    fn nat_checksums_verify_and_equal_a_full_recompute(s in spec_with(tcp_udp()), to in sock(), forward in any::<bool>()) {
        let mut f = build(&s);
        let p = parse(&f).unwrap();
        let (want, res) = if forward {
            (builder(&s, s.src, to).build(), nat::nat_forward(&mut f, &p, *to.ip(), to.port()))
        } else {
            (builder(&s, to, s.dst).build(), nat::nat_reverse(&mut f, &p, *to.ip(), to.port()))
        };
        prop_assert_eq!(res, Ok(()));
        if let Err(e) = checksums_verify_with_etherparse(&f) {
            prop_assert!(false, "{}", e);
        }
        // The builder computes every checksum from scratch.
        prop_assert_eq!(f, want);
    }

    #[test]
    fn icmp_error_rewrites_equal_a_full_recompute(s in spec_with(icmp_error()), to in sock(), forward in any::<bool>()) {
        // A quote that ends inside the TCP checksum (1 of its 2 bytes): that
        // byte cannot be updated (the carry from the missing byte is
        // unknown) and stays as it was, unlike in a from-scratch build.
        prop_assume!(!matches!(s.l4, L4Spec::IcmpError { inner_tcp: true, quote_len: 37, .. }));
        let mut f = build(&s);
        let p = parse(&f).unwrap();
        // `build` made an error src -> dst quoting dst -> peer.
        let want = if forward {
            // Outer dst and quoted src become `to`.
            builder(&s, s.src, to).payload(&icmp_quote(&s, to, peer(&s))).build()
        } else {
            // Outer src and quoted dst become `to`.
            builder(&s, to, s.dst).payload(&icmp_quote(&s, s.dst, to)).build()
        };
        let res = if forward {
            nat::icmp_error_forward(&mut f, &p, *to.ip(), to.port())
        } else {
            nat::icmp_error_reverse(&mut f, &p, *to.ip(), to.port())
        };
        prop_assert_eq!(res, Ok(()));
        if let Err(e) = checksums_verify_with_etherparse(&f) {
            prop_assert!(false, "{}", e);
        }
        prop_assert_eq!(f, want);
    }

    #[test]
    fn partial_then_complete_equals_full(s in spec_with(tcp_udp())) {
        prop_assume!(!matches!(s.l4, L4Spec::Udp { checksum: false }));
        let mut f = builder(&s, s.src, s.dst).partial_checksum().build();
        let p = parse(&f).unwrap();
        nat::complete_checksum(&mut f, &p).unwrap();
        prop_assert_eq!(f, build(&s));
    }

    #[test]
    fn update16_equals_full_recompute(
        mut data in prop::collection::vec(any::<u8>(), 2..200),
        at in any::<prop::sample::Index>(),
        new in any::<u16>(),
    ) {
        if data.len() % 2 == 1 { data.pop(); }
        let i = at.index(data.len() / 2) * 2;
        let before = !checksum::data(&data);
        let old = u16::from_be_bytes([data[i], data[i + 1]]);
        data[i..i + 2].copy_from_slice(&new.to_be_bytes());
        // All-zero data sums to +0, a value no real header has (RFC 1624 §3
        // assumes the sum is never +0): only then do the two differ.
        prop_assume!(data.iter().any(|&b| b != 0));
        prop_assert_eq!(checksum::update16(before, old, new), !checksum::data(&data));
    }

    #[test]
    fn update_addr_equals_full_recompute(
        mut data in prop::collection::vec(any::<u8>(), 4..200),
        at in any::<prop::sample::Index>(),
        new in any::<u32>(),
    ) {
        while data.len() % 2 == 1 { data.pop(); }
        prop_assume!(data.len() >= 4);
        let i = at.index((data.len() - 4) / 2 + 1) * 2;
        let before = !checksum::data(&data);
        let old = u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        data[i..i + 4].copy_from_slice(&new.to_be_bytes());
        prop_assume!(data.iter().any(|&b| b != 0));
        prop_assert_eq!(
            checksum::update_addr(before, Ipv4Addr::from_bits(old), Ipv4Addr::from_bits(new)),
            !checksum::data(&data)
        );
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), other in spec()) {
        exercise(bytes, &other);
    }

    #[test]
    fn mutated_frames_never_panic(
        s in spec(),
        other in spec(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        cut_it in any::<bool>(),
        extra in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut f = build(&s);
        for (i, v) in flips {
            let i = i.index(f.len());
            f[i] = v;
        }
        if cut_it {
            let n = cut.index(f.len() + 1);
            f.truncate(n);
        }
        f.extend_from_slice(&extra);
        exercise(f, &other);
    }
}

type RewriteOp = dyn Fn(&mut [u8], &Parsed) -> Result<(), RewriteError>;

/// Parse, then every rewrite: with the frame's own summary and with the
/// summary of another frame (a caller bug must not panic either). When
/// parse and a rewrite succeed, the result must still parse.
fn exercise(frame: Vec<u8>, other: &Spec) {
    let other_frame = build(other);
    let other_p = parse(&other_frame).unwrap();
    let own = parse(&frame);
    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
    let ops: [&RewriteOp; 6] = [
        &|f, p| nat::nat_forward(f, p, A, 8080),
        &|f, p| nat::nat_reverse(f, p, A, 80),
        &|f, p| nat::icmp_error_forward(f, p, A, 8080),
        &|f, p| nat::icmp_error_reverse(f, p, A, 80),
        &|f, p| nat::complete_checksum(f, p),
        &|f, _| {
            nat::set_macs(
                f,
                MacAddr::new(2, 0, 0, 0, 0, 1),
                MacAddr::new(2, 0, 0, 0, 0, 2),
            )
        },
    ];
    for op in ops {
        if let Ok(p) = &own {
            let mut f = frame.clone();
            match op(&mut f, p) {
                Ok(()) => assert!(parse(&f).is_ok(), "a rewrite broke a frame that parsed"),
                Err(e) => {
                    assert_eq!(f, frame, "a refused rewrite changed the frame");
                    assert_ne!(e, RewriteError::FrameMismatch, "parse and rewrite disagree");
                }
            }
        }
        let mut f = frame.clone();
        if op(&mut f, &other_p).is_err() {
            assert_eq!(f, frame, "a refused rewrite changed the frame");
        }
    }
    // Prefixes of every length, too.
    for n in 0..frame.len().min(80) {
        let _ = parse(&frame[..n]);
    }
}
