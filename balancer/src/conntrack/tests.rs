use super::*;

use std::collections::BTreeMap;

use proptest::prelude::*;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const RS1: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

const S: TcpFlags = TcpFlags::SYN;
const SA: TcpFlags = TcpFlags::SYN_ACK;
const A: TcpFlags = TcpFlags::ACK;
const FA: TcpFlags = TcpFlags::FIN_ACK;
const R: TcpFlags = TcpFlags::RST;

fn client(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + n)
}

fn tcp_key(n: u32, port: u16) -> FlowKey {
    FlowKey::new(proto::TCP, client(n), port, VIP, 80)
}

fn nat(key: FlowKey) -> NewConn {
    NewConn {
        key,
        service: 0,
        backend: 1,
        backend_addr: RS1,
        backend_port: 8080,
        method: Method::Nat,
        client_mac: MAC,
        isn: None,
    }
}

/// The sequence number of the client segments looked up (not the ISN of
/// any entry, unless a test says so).
const SEQ: u32 = 7_000;

fn dr(key: FlowKey) -> NewConn {
    NewConn {
        backend_addr: key.dst,
        backend_port: key.dst_port,
        method: Method::Dr,
        ..nat(key)
    }
}

fn table(max: usize) -> ConnTable {
    ConnTable::new(max, Timeouts::default()).expect("table")
}

fn state(t: &ConnTable, id: ConnId) -> ConnState {
    t.get(id).expect("entry").state
}

// ---- the transition table ----

/// Every cell of the three tables, written out as in the doc comment of
/// `ConnState::step`, so that an edit of the tables shows here.
#[test]
fn transition_tables_match_the_documented_tables() {
    let parse = |s: &str| match s {
        "NO" => NO,
        "SR" => SR,
        "ES" => ES,
        "FW" => FW,
        "CW" => CW,
        "LA" => LA,
        "TW" => TW,
        "CL" => CL,
        _ => panic!("bad cell {s}"),
    };
    // rows SYN, SYN+ACK, ACK, FIN, RST; columns NO SR ES FW CW LA TW CL
    let tables: [(Dir, bool, &str); 3] = [
        (
            Dir::FromClient,
            false,
            "SR SR ES SR SR SR SR SR
             NO SR ES FW CW LA TW CL
             ES ES ES FW CW CL TW CL
             CL TW CW TW CW LA TW CL
             CL CL CL CL CL CL CL CL",
        ),
        (
            Dir::FromBackend,
            false,
            "NO SR ES FW CW LA TW CL
             SR SR ES FW CW LA TW CL
             ES ES ES FW CW LA TW CL
             TW TW FW FW LA LA TW CL
             CL CL CL CL CL CL CL CL",
        ),
        (
            Dir::FromClient,
            true,
            "SR SR ES SR SR SR SR SR
             NO SR ES FW CW LA TW CL
             ES ES ES FW CW CL TW CL
             CL TW FW FW CW LA TW CL
             CL CL CL CL CL CL CL CL",
        ),
    ];
    let inputs = [
        TcpInput::Syn,
        TcpInput::SynAck,
        TcpInput::Ack,
        TcpInput::Fin,
        TcpInput::Rst,
    ];
    for (dir, input_only, text) in tables {
        for (input, line) in inputs.iter().zip(text.lines()) {
            for (from, cell) in ConnState::TCP.iter().zip(line.split_whitespace()) {
                assert_eq!(
                    from.step(dir, input_only, *input),
                    parse(cell),
                    "{dir:?} input_only={input_only} {input:?} on {from}"
                );
            }
        }
    }
}

#[test]
fn backend_packets_step_the_same_whatever_the_method() {
    for s in ConnState::TCP {
        for i in TcpInput::ALL {
            assert_eq!(
                s.step(Dir::FromBackend, true, i),
                s.step(Dir::FromBackend, false, i)
            );
        }
    }
}

#[test]
fn rst_closes_every_tcp_state_from_either_side() {
    for s in ConnState::TCP {
        for (dir, io) in [
            (Dir::FromClient, false),
            (Dir::FromBackend, false),
            (Dir::FromClient, true),
        ] {
            assert_eq!(
                s.step(dir, io, TcpInput::Rst),
                ConnState::Close,
                "{s} {dir:?} {io}"
            );
        }
    }
}

#[test]
fn udp_state_ignores_every_input() {
    for i in TcpInput::ALL {
        assert_eq!(
            ConnState::Udp.step(Dir::FromClient, false, i),
            ConnState::Udp
        );
        assert_eq!(
            ConnState::Udp.step(Dir::FromBackend, true, i),
            ConnState::Udp
        );
    }
}

#[test]
fn flags_classify_with_ipvs_precedence() {
    assert_eq!(TcpInput::classify(TcpFlags::NONE), None);
    assert_eq!(TcpInput::classify(TcpFlags::PSH), None);
    assert_eq!(TcpInput::classify(S), Some(TcpInput::Syn));
    assert_eq!(TcpInput::classify(SA), Some(TcpInput::SynAck));
    assert_eq!(TcpInput::classify(A), Some(TcpInput::Ack));
    assert_eq!(TcpInput::classify(TcpFlags(0x18)), Some(TcpInput::Ack)); // PSH+ACK
    assert_eq!(TcpInput::classify(FA), Some(TcpInput::Fin));
    assert_eq!(TcpInput::classify(TcpFlags::FIN), Some(TcpInput::Fin));
    assert_eq!(TcpInput::classify(TcpFlags::RST_ACK), Some(TcpInput::Rst));
    assert_eq!(TcpInput::classify(TcpFlags(0x03)), Some(TcpInput::Syn)); // SYN+FIN: SYN wins
    assert_eq!(TcpInput::classify(TcpFlags(0x06)), Some(TcpInput::Rst)); // SYN+RST: RST wins
    assert!(TcpInput::is_new_conn(S));
    assert!(!TcpInput::is_new_conn(SA));
    assert!(!TcpInput::is_new_conn(TcpFlags(0x06)));
}

#[test]
fn only_established_is_active() {
    for s in ConnState::ALL {
        assert_eq!(s.is_active(), s == ConnState::Established, "{s}");
    }
    let t = Transition { from: SR, to: ES };
    assert!(t.changed() && t.activated() && !t.deactivated());
    let t = Transition { from: ES, to: CW };
    assert!(t.changed() && !t.activated() && t.deactivated());
    let t = Transition { from: ES, to: ES };
    assert!(!t.changed() && !t.activated() && !t.deactivated());
}

// ---- lifecycles through the table, at literal times ----

#[test]
fn nat_handshake_and_client_first_close() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = t.insert(nat(k), S, 1000).expect("insert");
    assert_eq!(state(&t, id), SR);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 1000 + 60_000);

    let tr = t.update(id, Dir::FromBackend, SA, 1001).expect("live");
    assert_eq!(tr, Transition { from: SR, to: SR });
    let tr = t.update(id, Dir::FromClient, A, 1002).expect("live");
    assert!(tr.activated());
    assert_eq!(state(&t, id), ES);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 1002 + 900_000);

    // Data both ways keeps it established and refreshes it.
    assert!(
        !t.update(id, Dir::FromBackend, TcpFlags(0x18), 5000)
            .expect("live")
            .changed()
    );
    assert_eq!(t.get(id).expect("e").last_seen_ms, 5000);

    let tr = t.update(id, Dir::FromClient, FA, 6000).expect("live");
    assert!(tr.deactivated());
    assert_eq!(state(&t, id), CW);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 6000 + 60_000);
    t.update(id, Dir::FromBackend, A, 6001);
    assert_eq!(state(&t, id), CW);
    t.update(id, Dir::FromBackend, FA, 6002);
    assert_eq!(state(&t, id), LA);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 6002 + 30_000);
    t.update(id, Dir::FromClient, A, 6003);
    assert_eq!(state(&t, id), CL);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 6003 + 10_000);
}

#[test]
fn nat_backend_first_close_ends_in_time_wait() {
    let mut t = table(8);
    let id = t.insert(nat(tcp_key(1, 40000)), S, 0).expect("insert");
    t.update(id, Dir::FromBackend, SA, 1);
    t.update(id, Dir::FromClient, A, 2);
    t.update(id, Dir::FromBackend, FA, 10);
    assert_eq!(state(&t, id), FW);
    t.update(id, Dir::FromClient, A, 11);
    assert_eq!(state(&t, id), FW);
    t.update(id, Dir::FromClient, FA, 12);
    assert_eq!(state(&t, id), TW);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 12 + 120_000);
    t.update(id, Dir::FromBackend, A, 13);
    assert_eq!(state(&t, id), TW);
}

#[test]
fn dr_lifecycle_from_client_flags_only() {
    let mut t = table(8);
    let id = t.insert(dr(tcp_key(1, 40000)), S, 0).expect("insert");
    assert_eq!(state(&t, id), SR);
    t.update(id, Dir::FromClient, S, 1000); // retransmitted SYN
    assert_eq!(state(&t, id), SR);
    let tr = t.update(id, Dir::FromClient, A, 1001).expect("live");
    assert!(tr.activated());
    t.update(id, Dir::FromClient, FA, 2000);
    assert_eq!(state(&t, id), FW);
    t.update(id, Dir::FromClient, A, 2001); // ACK of the server's FIN
    assert_eq!(state(&t, id), FW);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 2001 + 120_000);
}

#[test]
fn rst_during_handshake_closes() {
    let mut t = table(8);
    let id = t.insert(nat(tcp_key(1, 1)), S, 0).expect("insert");
    t.update(id, Dir::FromBackend, TcpFlags::RST_ACK, 5);
    assert_eq!(state(&t, id), CL);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 5 + 10_000);
}

#[test]
fn first_packet_flags_set_the_initial_state() {
    let mut t = table(8);
    let syn = t.insert(nat(tcp_key(1, 1)), S, 0).expect("insert");
    let ack = t.insert(nat(tcp_key(1, 2)), A, 0).expect("insert");
    let fin = t.insert(nat(tcp_key(1, 3)), FA, 0).expect("insert");
    let bare = t
        .insert(nat(tcp_key(1, 4)), TcpFlags::NONE, 0)
        .expect("insert");
    let udp_key = FlowKey::new(proto::UDP, client(1), 5, VIP, 53);
    let udp = t.insert(nat(udp_key), S, 0).expect("insert");
    assert_eq!(state(&t, syn), SR);
    assert_eq!(state(&t, ack), ES); // mid-stream pickup, e.g. after a failover
    assert_eq!(state(&t, fin), CL);
    assert_eq!(state(&t, bare), NO);
    assert_eq!(t.expires_ms(t.get(bare).expect("e")), 2000);
    assert_eq!(state(&t, udp), ConnState::Udp);
    assert_eq!(t.expires_ms(t.get(udp).expect("e")), 300_000);
}

#[test]
fn insert_with_state_coerces_the_state_to_the_protocol() {
    let mut t = table(8);
    let a = t
        .insert_with_state(nat(tcp_key(1, 1)), ES, 0)
        .expect("insert");
    let b = t
        .insert_with_state(nat(tcp_key(1, 2)), ConnState::Udp, 0)
        .expect("insert");
    let udp_key = FlowKey::new(proto::UDP, client(1), 5, VIP, 53);
    let c = t.insert_with_state(nat(udp_key), ES, 0).expect("insert");
    assert_eq!(
        (state(&t, a), state(&t, b), state(&t, c)),
        (ES, NO, ConnState::Udp)
    );
}

#[test]
fn udp_packets_refresh_the_udp_timeout() {
    let mut t = table(8);
    let k = FlowKey::new(proto::UDP, client(1), 5000, VIP, 53);
    let id = t.insert(nat(k), TcpFlags::NONE, 100).expect("insert");
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 300_100);
    t.update(id, Dir::FromBackend, TcpFlags::NONE, 200_000);
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 500_000);
    assert_eq!(t.expire(499_999, usize::MAX, |_| {}), 0);
    assert_eq!(t.expire(500_000, usize::MAX, |_| {}), 1);
}

// ---- port reuse ----

/// Segments applied in order to one entry.
type Path<'a> = &'a [(Dir, TcpFlags)];

fn reach(t: &mut ConnTable, conn: NewConn, path: Path<'_>) -> ConnId {
    let id = t.insert(conn, S, 0).expect("insert");
    for (i, (d, f)) in path.iter().enumerate() {
        t.update(id, *d, *f, i as u64 + 1);
    }
    id
}

#[test]
fn syn_on_time_wait_is_a_reuse_and_reschedules() {
    use Dir::{FromBackend as B, FromClient as C};
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = reach(&mut t, nat(k), &[(B, SA), (C, A), (B, FA), (C, FA)]);
    assert_eq!(state(&t, id), TW);
    assert_eq!(t.lookup_client(&k, S, SEQ), ClientLookup::Reused(id));
    // Anything but a bare SYN belongs to the old connection.
    assert_eq!(t.lookup_client(&k, A, SEQ), ClientLookup::Existing(id));
    assert_eq!(t.lookup_client(&k, SA, SEQ), ClientLookup::Existing(id));
    assert_eq!(
        t.lookup_client(&k, TcpFlags(0x06), SEQ),
        ClientLookup::Existing(id)
    );

    // The caller's reschedule: remove, insert anew (another backend).
    let old = t.remove(id).expect("removed");
    assert_eq!(old.state, TW);
    let new = t
        .insert(
            NewConn {
                backend: 2,
                ..nat(k)
            },
            S,
            500,
        )
        .expect("insert");
    assert_eq!(t.lookup_client(&k, S, SEQ), ClientLookup::Existing(new));
    assert_eq!(t.get(new).expect("e").backend, 2);
    assert_eq!(state(&t, new), SR);
    assert_eq!(t.get(id), None);
    assert_eq!(t.len(), 1);
}

/// A SYN that is a copy of the one that opened a finished connection (a
/// late duplicate, or the copy a leaving peer passes on) is not a new
/// connection: it is stale. A SYN with a new initial sequence number is a
/// reuse as before; on a live connection a copy is just part of it.
#[test]
fn copy_of_the_opening_syn_on_time_wait_is_stale() {
    use Dir::{FromBackend as B, FromClient as C};
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let opened = NewConn {
        isn: Some(1_000),
        ..nat(k)
    };
    let id = reach(&mut t, opened, &[(B, SA), (C, A), (B, FA), (C, FA)]);
    assert_eq!(state(&t, id), TW);
    assert_eq!(t.get(id).expect("e").isn, 1_000);
    assert_eq!(t.lookup_client(&k, S, 1_000), ClientLookup::StaleSyn(id));
    assert_eq!(t.lookup_client(&k, A, 1_000), ClientLookup::Existing(id));
    assert_eq!(t.lookup_client(&k, S, 1_001), ClientLookup::Reused(id));
    assert_eq!(t.lookup_client(&k, S, SEQ), ClientLookup::Reused(id));

    let k = tcp_key(2, 40000);
    let opened = NewConn {
        isn: Some(1_000),
        ..nat(k)
    };
    let id = reach(&mut t, opened, &[(B, SA), (C, A)]);
    assert_eq!(state(&t, id), ES);
    assert_eq!(t.lookup_client(&k, S, 1_000), ClientLookup::Existing(id));
}

#[test]
fn syn_on_close_is_a_reuse() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = reach(&mut t, nat(k), &[(Dir::FromClient, R)]);
    assert_eq!(state(&t, id), CL);
    assert_eq!(t.lookup_client(&k, S, SEQ), ClientLookup::Reused(id));
}

#[test]
fn syn_on_live_states_is_not_a_reuse() {
    use Dir::{FromBackend as B, FromClient as C};
    let mut t = table(16);
    let paths: [Path<'_>; 5] = [
        &[],
        &[(C, A)],
        &[(C, A), (C, FA)],
        &[(C, A), (B, FA)],
        &[(C, A), (C, FA), (B, FA)],
    ];
    for (i, p) in paths.iter().enumerate() {
        let k = tcp_key(2, i as u16);
        let id = reach(&mut t, nat(k), p);
        assert!(matches!(state(&t, id), SR | ES | CW | FW | LA));
        assert_eq!(
            t.lookup_client(&k, S, SEQ),
            ClientLookup::Existing(id),
            "{}",
            state(&t, id)
        );
    }
    assert_eq!(t.lookup_client(&tcp_key(9, 9), S, SEQ), ClientLookup::New);
}

#[test]
fn syn_on_input_only_fin_wait_is_a_reuse() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = reach(
        &mut t,
        dr(k),
        &[
            (Dir::FromClient, A),
            (Dir::FromClient, FA),
            (Dir::FromClient, A),
        ],
    );
    assert_eq!(state(&t, id), FW);
    assert_eq!(t.lookup_client(&k, S, SEQ), ClientLookup::Reused(id));
    assert_eq!(t.lookup_client(&k, A, SEQ), ClientLookup::Existing(id));
}

#[test]
fn udp_is_never_a_reuse() {
    let mut t = table(8);
    let k = FlowKey::new(proto::UDP, client(1), 5000, VIP, 53);
    let id = t.insert(nat(k), TcpFlags::NONE, 0).expect("insert");
    assert_eq!(t.lookup_client(&k, S, SEQ), ClientLookup::Existing(id));
}

// ---- lookups, NAT replies, removal ----

#[test]
fn nat_reply_key_finds_the_entry() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = t.insert(nat(k), S, 0).expect("insert");
    let reply = FlowKey::new(proto::TCP, RS1, 8080, client(1), 40000);
    assert_eq!(t.get(id).expect("e").reply_key(), Some(reply));
    assert_eq!(t.lookup_reply(&reply), Some(id));
    assert_eq!(t.lookup(&k), Some(id));
    // Neither key works in the other map.
    assert_eq!(t.lookup(&reply), None);
    assert_eq!(t.lookup_reply(&k), None);
    assert_eq!(
        t.lookup_reply(&FlowKey {
            src_port: 8081,
            ..reply
        }),
        None
    );
}

#[test]
fn dr_and_local_entries_have_no_reply_key() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = t.insert(dr(k), S, 0).expect("insert");
    let l = t
        .insert(
            NewConn {
                method: Method::Local,
                ..dr(tcp_key(1, 40001))
            },
            S,
            0,
        )
        .expect("insert");
    assert_eq!(t.get(id).expect("e").reply_key(), None);
    assert_eq!(t.get(l).expect("e").reply_key(), None);
    assert_eq!(t.reply.len(), 0);
    assert_eq!(t.lookup_reply(&k.reversed()), None);
}

#[test]
fn duplicate_and_reply_conflicts_are_refused_without_change() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = t.insert(nat(k), S, 0).expect("insert");
    assert_eq!(t.insert(nat(k), S, 1), Err(ConntrackError::Exists));
    // Same client port to another vport, NATed onto the same backend port:
    // replies would be ambiguous.
    let k2 = FlowKey { dst_port: 81, ..k };
    assert_eq!(t.insert(nat(k2), S, 1), Err(ConntrackError::ReplyKeyInUse));
    // ... but fine by DR, or to another backend port.
    t.insert(dr(k2), S, 1).expect("dr");
    let k3 = FlowKey { dst_port: 82, ..k };
    t.insert(
        NewConn {
            backend_port: 8081,
            ..nat(k3)
        },
        S,
        1,
    )
    .expect("other port");
    assert_eq!(t.len(), 3);
    assert_eq!(t.get(id).expect("e").last_seen_ms, 0);
}

#[test]
fn remove_clears_both_indexes_and_stales_the_id() {
    let mut t = table(2);
    let k = tcp_key(1, 40000);
    let id = t.insert(nat(k), S, 0).expect("insert");
    let reply = t.get(id).expect("e").reply_key().expect("nat");
    let e = t.remove(id).expect("removed");
    assert_eq!(e.key, k);
    assert_eq!(
        (t.lookup(&k), t.lookup_reply(&reply), t.len()),
        (None, None, 0)
    );
    assert_eq!(t.remove(id), None);
    // The slot is reused by the next insert; the old id must not reach it.
    let id2 = t.insert(nat(tcp_key(2, 1)), S, 5).expect("insert");
    assert_eq!(id2.index(), id.index());
    assert_ne!(id2, id);
    assert_eq!(t.get(id), None);
    assert_eq!(t.update(id, Dir::FromClient, A, 6), None);
    assert_eq!(t.remove(id), None);
    assert_eq!(state(&t, id2), SR);
    assert_eq!(t.next_expiry_ms(), Some(60_005));
}

#[test]
fn table_full_is_an_error_and_loses_nothing() {
    let mut t = table(3);
    let ids: Vec<_> = (0..3)
        .map(|i| t.insert(nat(tcp_key(i, 1)), S, 0).expect("insert"))
        .collect();
    assert_eq!(
        t.insert(nat(tcp_key(9, 1)), S, 1),
        Err(ConntrackError::TableFull)
    );
    assert_eq!(
        t.insert(dr(tcp_key(9, 2)), A, 1),
        Err(ConntrackError::TableFull)
    );
    assert_eq!(t.len(), 3);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(t.lookup(&tcp_key(i as u32, 1)), Some(*id));
        assert!(
            t.lookup_reply(&t.get(*id).expect("e").reply_key().expect("nat"))
                .is_some()
        );
    }
    assert_eq!(t.lookup(&tcp_key(9, 1)), None);
    t.remove(ids[1]);
    t.insert(nat(tcp_key(9, 1)), S, 2).expect("room again");
}

#[test]
fn zero_capacity_table_refuses_everything() {
    let mut t = table(0);
    assert_eq!(
        t.insert(nat(tcp_key(1, 1)), S, 0),
        Err(ConntrackError::TableFull)
    );
    assert_eq!(t.expire(u64::MAX, usize::MAX, |_| {}), 0);
    assert_eq!(t.next_expiry_ms(), None);
}

#[test]
fn oversized_capacity_is_refused() {
    assert_eq!(
        ConnTable::new(MAX_CAPACITY + 1, Timeouts::default()).err(),
        Some(ConntrackError::CapacityTooLarge(MAX_CAPACITY + 1))
    );
}

#[test]
fn iter_lists_every_entry_with_its_id() {
    let mut t = table(8);
    let a = t.insert(nat(tcp_key(1, 1)), S, 0).expect("insert");
    let b = t.insert(nat(tcp_key(2, 1)), S, 0).expect("insert");
    let c = t.insert(nat(tcp_key(3, 1)), S, 0).expect("insert");
    t.remove(b);
    let got: Vec<_> = t.iter().map(|(id, e)| (id, e.key)).collect();
    assert_eq!(got, vec![(a, tcp_key(1, 1)), (c, tcp_key(3, 1))]);
}

// ---- expiry ----

#[test]
fn entry_is_alive_one_ms_before_expiry_and_gone_at_it() {
    let mut t = table(8);
    let k = tcp_key(1, 40000);
    let id = t.insert(nat(k), S, 1000).expect("insert");
    t.update(id, Dir::FromClient, A, 2000);
    let due = 2000 + 900_000;
    assert_eq!(t.next_expiry_ms(), Some(due));
    assert_eq!(t.expire(due - 1, usize::MAX, |_| panic!("too early")), 0);
    assert_eq!(t.lookup(&k), Some(id));
    let mut seen = Vec::new();
    assert_eq!(
        t.expire(due, usize::MAX, |e| seen.push((e.key, e.state))),
        1
    );
    assert_eq!(seen, vec![(k, ES)]);
    assert_eq!(t.lookup(&k), None);
    assert_eq!(
        t.lookup_reply(&FlowKey::new(proto::TCP, RS1, 8080, client(1), 40000)),
        None
    );
    assert_eq!(t.get(id), None);
    assert!(t.is_empty());
    assert_eq!(t.next_expiry_ms(), None);
}

#[test]
fn every_state_expires_at_its_own_timeout() {
    use Dir::{FromBackend as B, FromClient as C};
    let paths: [(Path<'_>, ConnState, u64); 8] = [
        (&[], SR, 60_000),
        (&[(C, A)], ES, 900_000),
        (&[(C, A), (B, FA)], FW, 120_000),
        (&[(C, A), (C, FA)], CW, 60_000),
        (&[(C, A), (C, FA), (B, FA)], LA, 30_000),
        (&[(C, A), (B, FA), (C, FA)], TW, 120_000),
        (&[(C, R)], CL, 10_000),
        (&[(C, SA)], SR, 60_000),
    ];
    for (path, want, timeout) in paths {
        let mut t = table(2);
        let id = t.insert(nat(tcp_key(1, 1)), S, 10).expect("insert");
        for (d, f) in path {
            t.update(id, *d, *f, 100);
        }
        assert_eq!(state(&t, id), want);
        let last = if path.is_empty() { 10 } else { 100 };
        assert_eq!(
            t.expire(last + timeout - 1, usize::MAX, |_| {}),
            0,
            "{want}"
        );
        assert_eq!(t.expire(last + timeout, usize::MAX, |_| {}), 1, "{want}");
    }
    let mut t = table(2);
    t.insert(nat(tcp_key(1, 1)), TcpFlags::NONE, 10)
        .expect("insert");
    assert_eq!(t.expire(2009, usize::MAX, |_| {}), 0);
    assert_eq!(t.expire(2010, usize::MAX, |_| {}), 1);
}

#[test]
fn traffic_postpones_expiry() {
    let mut t = table(8);
    let id = t.insert(nat(tcp_key(1, 1)), A, 0).expect("insert");
    t.update(id, Dir::FromClient, A, 899_999);
    assert_eq!(t.expire(900_000, usize::MAX, |_| {}), 0);
    assert_eq!(t.expire(1_799_998, usize::MAX, |_| {}), 0);
    assert_eq!(t.expire(1_799_999, usize::MAX, |_| {}), 1);
}

#[test]
fn state_change_moves_the_deadline_both_ways() {
    let mut t = table(8);
    // Established entries ahead of it in their list must not hold back one
    // that moved to a short-timeout state.
    let long = t.insert(nat(tcp_key(1, 1)), A, 0).expect("insert");
    let short = t.insert(nat(tcp_key(2, 1)), A, 0).expect("insert");
    t.update(short, Dir::FromClient, R, 50);
    let mut gone = Vec::new();
    assert_eq!(t.expire(10_049, usize::MAX, |e| gone.push(e.key)), 0);
    assert_eq!(t.expire(10_050, usize::MAX, |e| gone.push(e.key)), 1);
    assert_eq!(gone, vec![tcp_key(2, 1)]);
    assert!(t.get(long).is_some());
}

#[test]
fn expire_removes_at_most_max_per_call_oldest_first() {
    let mut t = table(16);
    for i in 0..10 {
        t.insert(nat(tcp_key(i, 1)), S, u64::from(i))
            .expect("insert");
    }
    let mut order = Vec::new();
    let now = 60_000 + 100;
    assert_eq!(t.expire(now, 3, |e| order.push(e.last_seen_ms)), 3);
    assert_eq!(t.len(), 7);
    assert_eq!(t.expire(now, 3, |e| order.push(e.last_seen_ms)), 3);
    assert_eq!(t.expire(now, 3, |e| order.push(e.last_seen_ms)), 3);
    assert_eq!(t.expire(now, 3, |e| order.push(e.last_seen_ms)), 1);
    assert_eq!(t.expire(now, 3, |e| order.push(e.last_seen_ms)), 0);
    assert_eq!(order, (0..10).collect::<Vec<u64>>());
    assert_eq!(t.expire(now, 0, |_| {}), 0);
}

#[test]
fn expire_budget_rotates_over_states() {
    let mut t = table(64);
    // 20 expired SYN_RECV entries and 1 expired CLOSE entry.
    for i in 0..20 {
        t.insert(nat(tcp_key(i, 1)), S, 0).expect("insert");
    }
    let c = t.insert(nat(tcp_key(99, 1)), S, 0).expect("insert");
    t.update(c, Dir::FromClient, R, 0);
    let mut closed_at = None;
    for call in 0..11 {
        t.expire(100_000, 2, |e| {
            if e.state == CL {
                closed_at = Some(call);
            }
        });
    }
    // Whichever list the cursor starts from, CLOSE gets its turn early.
    assert!(closed_at.is_some_and(|c| c <= 1), "{closed_at:?}");
    assert!(t.is_empty());
}

#[test]
fn set_timeouts_applies_to_existing_entries() {
    let mut t = table(8);
    let id = t.insert(nat(tcp_key(1, 1)), A, 1000).expect("insert");
    t.set_timeouts(Timeouts {
        established: Duration::from_secs(5),
        ..Timeouts::default()
    });
    assert_eq!(t.timeouts().established, Duration::from_secs(5));
    assert_eq!(t.expires_ms(t.get(id).expect("e")), 6000);
    assert_eq!(t.expire(5999, usize::MAX, |_| {}), 0);
    assert_eq!(t.expire(6000, usize::MAX, |_| {}), 1);
}

#[test]
fn huge_timeouts_saturate_instead_of_overflowing() {
    let forever = Duration::from_secs(u64::MAX);
    let mut t = ConnTable::new(
        2,
        Timeouts {
            syn_recv: forever,
            ..Timeouts::default()
        },
    )
    .expect("t");
    let id = t
        .insert(nat(tcp_key(1, 1)), S, u64::MAX - 5)
        .expect("insert");
    assert_eq!(t.expires_ms(t.get(id).expect("e")), u64::MAX);
    assert_eq!(t.expire(u64::MAX - 1, usize::MAX, |_| {}), 0);
}

#[test]
fn clock_going_back_is_clamped() {
    let mut t = table(8);
    let a = t.insert(nat(tcp_key(1, 1)), S, 10_000).expect("insert");
    let b = t.insert(nat(tcp_key(2, 1)), S, 5_000).expect("insert"); // clock stepped back
    assert_eq!(t.get(b).expect("e").last_seen_ms, 10_000);
    t.update(a, Dir::FromClient, S, 1);
    assert_eq!(t.get(a).expect("e").last_seen_ms, 10_000);
    assert_eq!(t.expire(70_000, usize::MAX, |_| {}), 2);
}

// ---- memory ----

#[test]
fn entry_and_slot_stay_small() {
    // 48 and 56 bytes today (x86_64). A slot is what each of max_entries costs
    // in the slab, plus about 4 x 21 bytes of map buckets (see ConnTable::new).
    assert!(
        size_of::<Entry>() <= 48,
        "Entry is {} bytes",
        size_of::<Entry>()
    );
    assert!(
        size_of::<Slot>() <= 64,
        "Slot is {} bytes",
        size_of::<Slot>()
    );
    assert!(size_of::<Entry>() < 128);
}

#[test]
fn hundred_thousand_entries_fit() {
    let n = 100_000u32;
    let mut t = table(n as usize);
    let (fwd_cap, rep_cap) = (t.forward.capacity(), t.reply.capacity());
    for i in 0..n {
        let k = FlowKey::new(
            proto::TCP,
            client(i / 50_000),
            (i % 50_000) as u16 + 1024,
            VIP,
            80,
        );
        t.insert(nat(k), S, u64::from(i)).expect("insert");
    }
    assert_eq!(t.len(), n as usize);
    assert_eq!(
        t.insert(nat(tcp_key(999, 1)), S, 0),
        Err(ConntrackError::TableFull)
    );
    let k = FlowKey::new(proto::TCP, client(1), 1024 + 7, VIP, 80);
    let id = t.lookup(&k).expect("present");
    assert_eq!(
        t.lookup_reply(&t.get(id).expect("e").reply_key().expect("nat")),
        Some(id)
    );
    assert_eq!(
        (t.forward.capacity(), t.reply.capacity()),
        (fwd_cap, rep_cap)
    );
    assert_eq!(t.expire(u64::MAX, usize::MAX, |_| {}), n as usize);
    assert!(t.is_empty() && t.forward.is_empty() && t.reply.is_empty());
}

#[test]
fn maps_never_grow_under_churn() {
    // 896 is the worst case for hashbrown's power-of-two rounding: with room
    // for only max_entries its maps would sit at 7/8 load and grow as soon as
    // tombstones used up their spare slots. `capacity()` is items plus the
    // never-used slots left, so it drops with tombstones and returns after an
    // in-place rehash; only a reallocation can raise it above the start.
    let n = 896usize;
    let mut t = table(n);
    let caps = (t.forward.capacity(), t.reply.capacity(), t.slots.capacity());
    let mut ids = std::collections::VecDeque::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut full = 0;
    for step in 0..40_000u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = FlowKey::new(
            proto::TCP,
            Ipv4Addr::from(rng as u32),
            (rng >> 32) as u16,
            VIP,
            80,
        );
        match t.insert(nat(k), S, step) {
            Ok(id) => ids.push_back(id),
            Err(ConntrackError::TableFull) => {
                full += 1;
                let at = (rng >> 48) as usize % ids.len();
                if let Some(id) = ids.swap_remove_back(at) {
                    t.remove(id).expect("live");
                }
            }
            Err(e) => assert!(matches!(
                e,
                ConntrackError::Exists | ConntrackError::ReplyKeyInUse
            )),
        }
        assert!(
            t.forward.capacity() <= caps.0,
            "forward map grew at step {step}"
        );
        assert!(
            t.reply.capacity() <= caps.1,
            "reply map grew at step {step}"
        );
    }
    assert!(full > 10_000, "the churn must run at full table ({full})");
    assert_eq!(t.len(), ids.len());
    assert_eq!(t.slots.capacity(), caps.2);
}

// ---- model-based: random operations against a BTreeMap ----

#[derive(Clone, Debug)]
enum Op {
    Insert {
        key: usize,
        backend: usize,
        method: usize,
        flags: u8,
        dt: u64,
    },
    Update {
        key: usize,
        from_backend: bool,
        flags: u8,
        dt: u64,
    },
    Remove {
        key: usize,
    },
    Expire {
        dt: u64,
        max: usize,
    },
}

#[derive(Clone, Copy, Debug)]
struct Model {
    backend_addr: Ipv4Addr,
    method: Method,
    state: ConnState,
    last_seen: u64,
}

/// 2 protocols x 3 clients x 2 ports x 2 vports: enough overlap for reply
/// conflicts (a client port to both vports) and duplicates.
fn model_key(i: usize) -> FlowKey {
    let p = if i & 1 == 0 { proto::TCP } else { proto::UDP };
    FlowKey::new(
        p,
        client((i >> 1) as u32 % 3),
        1000 + ((i >> 3) & 1) as u16,
        VIP,
        80 + ((i >> 4) & 1) as u16,
    )
}
const MODEL_KEYS: usize = 32;

fn op() -> impl Strategy<Value = Op> {
    let flags = prop::sample::select(vec![0u8, 0x02, 0x12, 0x10, 0x11, 0x04, 0x18]);
    prop_oneof![
        4 => (0..MODEL_KEYS, 0..2usize, 0..3usize, flags.clone(), 0..20u64)
            .prop_map(|(key, backend, method, flags, dt)| Op::Insert { key, backend, method, flags, dt }),
        4 => (0..MODEL_KEYS, any::<bool>(), flags, 0..20u64)
            .prop_map(|(key, from_backend, flags, dt)| Op::Update { key, from_backend, flags, dt }),
        1 => (0..MODEL_KEYS).prop_map(|key| Op::Remove { key }),
        2 => (0..40u64, prop_oneof![Just(usize::MAX), 0..4usize]).prop_map(|(dt, max)| Op::Expire { dt, max }),
    ]
}

fn model_timeouts() -> Timeouts {
    let ms = Duration::from_millis;
    Timeouts {
        none: ms(3),
        syn_recv: ms(11),
        established: ms(30),
        fin_wait: ms(13),
        close_wait: ms(7),
        last_ack: ms(5),
        time_wait: ms(17),
        close: ms(2),
        udp: ms(23),
    }
}

fn model_reply(k: &FlowKey, m: &Model) -> Option<FlowKey> {
    (m.method == Method::Nat)
        .then(|| FlowKey::new(k.proto, m.backend_addr, 8080, k.src, k.src_port))
}

fn check(t: &ConnTable, model: &BTreeMap<FlowKey, Model>) {
    assert_eq!(t.len(), model.len());
    assert_eq!(t.forward.len(), model.len());
    assert_eq!(t.iter().count(), model.len());
    let replies: Vec<_> = model
        .iter()
        .filter_map(|(k, m)| model_reply(k, m))
        .collect();
    assert_eq!(t.reply.len(), replies.len());
    for i in 0..MODEL_KEYS {
        let k = model_key(i);
        match (model.get(&k), t.lookup(&k)) {
            (None, None) => {}
            (Some(m), Some(id)) => {
                let e = t.get(id).expect("id from lookup is live");
                assert_eq!(
                    (e.key, e.state, e.last_seen_ms, e.method),
                    (k, m.state, m.last_seen, m.method)
                );
                assert_eq!(e.backend_addr, m.backend_addr);
                if let Some(rk) = model_reply(&k, m) {
                    assert_eq!(t.lookup_reply(&rk), Some(id));
                }
            }
            (m, id) => panic!("model {m:?} vs table {id:?} for {k}"),
        }
    }
    // Every expiry list holds exactly the entries of its state, in order.
    let mut linked = 0;
    for (s, list) in t.lists.iter().enumerate() {
        let mut at = list.head;
        let mut prev = NIL;
        let mut last = 0;
        while at != NIL {
            let slot = &t.slots[at as usize];
            let e = slot.entry.as_ref().expect("linked slot is occupied");
            assert_eq!(e.state as usize, s);
            assert_eq!(slot.prev, prev);
            assert!(e.last_seen_ms >= last);
            last = e.last_seen_ms;
            prev = at;
            at = slot.next;
            linked += 1;
        }
        assert_eq!(list.tail, prev);
    }
    assert_eq!(linked, model.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_a_simple_model(ops in prop::collection::vec(op(), 1..120)) {
        const CAP: usize = 10;
        let to = model_timeouts();
        let mut t = ConnTable::new(CAP, to).expect("table");
        let mut model: BTreeMap<FlowKey, Model> = BTreeMap::new();
        let mut now = 0u64;
        let timeout = |s: ConnState| u64::try_from(to.for_state(s).as_millis()).expect("small");
        for op in ops {
            match op {
                Op::Insert { key, backend, method, flags, dt } => {
                    now += dt;
                    let k = model_key(key);
                    let method = [Method::Nat, Method::Dr, Method::Local][method];
                    let backend_addr = if method == Method::Nat { [RS1, client(7)][backend] } else { VIP };
                    let conn = NewConn { key: k, service: 0, backend: backend as u16, backend_addr, backend_port: 8080, method, client_mac: MAC, isn: None };
                    let state = if k.proto != proto::TCP {
                        ConnState::Udp
                    } else {
                        TcpInput::classify(TcpFlags(flags)).map_or(NO, |i| NO.step(Dir::FromClient, method.is_input_only(), i))
                    };
                    let m = Model { backend_addr, method, state, last_seen: now };
                    let reply = model_reply(&k, &m);
                    let expect = if model.contains_key(&k) {
                        Err(ConntrackError::Exists)
                    } else if reply.is_some() && model.iter().any(|(k2, m2)| model_reply(k2, m2) == reply) {
                        Err(ConntrackError::ReplyKeyInUse)
                    } else if model.len() == CAP {
                        Err(ConntrackError::TableFull)
                    } else {
                        Ok(())
                    };
                    let got = t.insert(conn, TcpFlags(flags), now);
                    prop_assert_eq!(got.map(|_| ()), expect);
                    if expect.is_ok() {
                        model.insert(k, m);
                    }
                }
                Op::Update { key, from_backend, flags, dt } => {
                    now += dt;
                    let k = model_key(key);
                    let dir = if from_backend { Dir::FromBackend } else { Dir::FromClient };
                    let id = t.lookup(&k);
                    prop_assert_eq!(id.is_some(), model.contains_key(&k));
                    if let (Some(id), Some(m)) = (id, model.get_mut(&k)) {
                        let to_state = TcpInput::classify(TcpFlags(flags)).map_or(m.state, |i| m.state.step(dir, m.method.is_input_only(), i));
                        let tr = t.update(id, dir, TcpFlags(flags), now);
                        prop_assert_eq!(tr, Some(Transition { from: m.state, to: to_state }));
                        m.state = to_state;
                        m.last_seen = now;
                    }
                }
                Op::Remove { key } => {
                    let k = model_key(key);
                    let got = t.lookup(&k).and_then(|id| t.remove(id));
                    prop_assert_eq!(got.map(|e| e.key), model.remove(&k).map(|_| k));
                }
                Op::Expire { dt, max } => {
                    now += dt;
                    let due: Vec<FlowKey> = model.iter().filter(|(_, m)| m.last_seen + timeout(m.state) <= now).map(|(k, _)| *k).collect();
                    let mut gone = Vec::new();
                    let n = t.expire(now, max, |e| gone.push(e.key));
                    prop_assert_eq!(n, due.len().min(max));
                    prop_assert_eq!(gone.len(), n);
                    for k in gone {
                        prop_assert!(due.contains(&k), "{} expired early", k);
                        model.remove(&k);
                    }
                }
            }
            check(&t, &model);
        }
    }
}
