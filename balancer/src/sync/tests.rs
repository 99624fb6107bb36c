use super::*;

use crate::conntrack::Timeouts;
use proptest::prelude::*;
use rewrite::flow::proto;

const KEY: &[u8] = b"cluster sync key";
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const RS1: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const RS2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Wall clock of the tests: sequences start here.
const T0_US: u64 = 1_700_000_000_000_000;

fn key(n: u32) -> FlowKey {
    let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + n);
    FlowKey::new(proto::TCP, client, 40000 + (n % 1000) as u16, VIP, 80)
}

fn nat(n: u32) -> NewConn {
    NewConn {
        key: key(n),
        service: 0,
        backend: 1,
        backend_addr: RS1,
        backend_port: 8080,
        method: Method::Nat,
        client_mac: MAC,
        isn: None,
    }
}

fn sc(n: u32, state: ConnState) -> SyncConn {
    SyncConn {
        conn: nat(n),
        state,
        age_ms: n * 10,
    }
}

fn table() -> ConnTable {
    ConnTable::new(1024, Timeouts::default()).expect("table")
}

fn dgram(sender: u32, sequence: u64, message: Message) -> Vec<u8> {
    encode(
        &Datagram {
            sender,
            sequence,
            message,
        },
        KEY,
    )
    .expect("encode")
}

fn receiver() -> SyncReceiver {
    SyncReceiver::new(1, &[1, 2, 3], KEY, None)
}

fn snapshot(t: &ConnTable) -> Vec<Entry> {
    t.iter().map(|(_, e)| *e).collect()
}

// ---- codec ----

#[test]
fn every_message_round_trips() {
    let messages = vec![
        Message::Conns(vec![
            sc(1, ConnState::Established),
            sc(2, ConnState::SynRecv),
        ]),
        Message::Conns(vec![]),
        Message::Deletes(vec![key(1), key(2), key(3)]),
        Message::BulkRequest {
            request: 7,
            cursor: 99,
        },
        Message::BulkPage {
            request: 7,
            cursor: 0,
            next: Some(40),
            conns: vec![sc(5, ConnState::FinWait)],
        },
        Message::BulkPage {
            request: 7,
            cursor: 40,
            next: None,
            conns: vec![],
        },
        Message::Announce {
            epoch: 42,
            nodes: vec![Node::new(1, 1, true), Node::new(2, 3, false)],
        },
        Message::Leave,
    ];
    for (i, m) in messages.into_iter().enumerate() {
        let d = Datagram {
            sender: 2,
            sequence: T0_US + i as u64,
            message: m,
        };
        let b = encode(&d, KEY).expect("encode");
        assert!(b.len() <= MAX_DATAGRAM);
        assert_eq!(decode(&b, KEY), Ok(d));
    }
}

#[test]
fn header_and_conn_record_layout() {
    let b = dgram(
        0x0102_0304,
        0x1112_1314_1516_1718,
        Message::Conns(vec![sc(3, ConnState::Established)]),
    );
    assert_eq!(b.len(), HEADER_LEN + CONN_LEN + MAC_LEN);
    assert_eq!(&b[0..4], b"LBS1");
    assert_eq!(b[4], 1, "version");
    assert_eq!(b[5], 1, "type conns");
    assert_eq!(&b[6..8], &[0, 1], "count");
    assert_eq!(&b[8..12], &[1, 2, 3, 4], "sender");
    assert_eq!(&b[12..16], &[0; 4], "reserved");
    assert_eq!(
        &b[16..24],
        &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
    );
    let r = &b[HEADER_LEN..HEADER_LEN + CONN_LEN];
    assert_eq!(r[0], proto::TCP);
    assert_eq!(r[1], ConnState::Established as u8);
    assert_eq!(r[2], 0, "nat");
    assert_eq!(r[3], 0);
    assert_eq!(&r[4..8], &[198, 18, 1, 3], "client");
    assert_eq!(&r[8..10], &40003u16.to_be_bytes());
    assert_eq!(&r[10..14], &[198, 18, 0, 100], "vip");
    assert_eq!(&r[14..16], &80u16.to_be_bytes());
    assert_eq!(&r[16..20], &[198, 19, 0, 11], "backend");
    assert_eq!(&r[20..22], &8080u16.to_be_bytes());
    assert_eq!(&r[22..24], &[0, 0], "service");
    assert_eq!(&r[24..26], &[0, 1], "backend index");
    assert_eq!(&r[26..32], &MAC);
    assert_eq!(&r[32..36], &30u32.to_be_bytes(), "age");
    assert_eq!(
        &b[b.len() - MAC_LEN..],
        &heartbeat::member::sign(KEY, &b[..b.len() - MAC_LEN])
    );
}

#[test]
fn full_batches_fit_one_datagram_and_one_more_record_does_not() {
    assert_eq!(
        (MAX_CONNS, MAX_PAGE_CONNS, MAX_DELETES, MAX_ANNOUNCE_NODES),
        (37, 37, 84, 167)
    );
    let conns: Vec<SyncConn> = (0..MAX_CONNS as u32)
        .map(|n| sc(n, ConnState::Established))
        .collect();
    let b = dgram(2, T0_US, Message::Conns(conns.clone()));
    assert!(b.len() <= MAX_DATAGRAM, "{}", b.len());
    let dels: Vec<FlowKey> = (0..MAX_DELETES as u32).map(key).collect();
    assert!(dgram(2, T0_US, Message::Deletes(dels)).len() <= MAX_DATAGRAM);
    let nodes: Vec<Node> = (0..MAX_ANNOUNCE_NODES as u32)
        .map(|i| Node::new(i, 1, true))
        .collect();
    assert!(dgram(2, T0_US, Message::Announce { epoch: 1, nodes }).len() <= MAX_DATAGRAM);
    let mut more = conns;
    more.push(sc(999, ConnState::None));
    let d = Datagram {
        sender: 2,
        sequence: 1,
        message: Message::Conns(more),
    };
    assert_eq!(
        encode(&d, KEY),
        Err(EncodeError::TooManyRecords { count: 38, max: 37 })
    );
}

#[test]
fn truncated_tampered_and_garbage_datagrams_are_refused() {
    let b = dgram(
        2,
        T0_US,
        Message::Conns(vec![sc(1, ConnState::Established)]),
    );
    for n in 0..b.len() {
        assert!(decode(&b[..n], KEY).is_err(), "truncated to {n}");
    }
    for i in 0..b.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = b.clone();
            t[i] ^= bit;
            assert!(decode(&t, KEY).is_err(), "byte {i} bit {bit:#x}");
        }
    }
    assert_eq!(decode(&b, b"wrong key"), Err(SyncRefusal::BadMac));
    assert_eq!(decode(&[0u8; 10], KEY), Err(SyncRefusal::Truncated));
    assert_eq!(decode(&[0x55u8; 200], KEY), Err(SyncRefusal::BadMagic));
    assert_eq!(
        decode(&vec![0u8; MAX_DATAGRAM + 1], KEY),
        Err(SyncRefusal::Truncated)
    );
    let mut extra = b.clone();
    extra.insert(HEADER_LEN, 0);
    assert!(decode(&extra, KEY).is_err());
}

/// Re-signs a hand-made body, so that the checks after the tag are reached.
fn signed(mut body: Vec<u8>) -> Vec<u8> {
    let tag = heartbeat::member::sign(KEY, &body);
    body.extend_from_slice(&tag);
    body
}

#[test]
fn authenticated_but_malformed_datagrams_are_refused_by_reason() {
    let good = dgram(
        2,
        T0_US,
        Message::Conns(vec![sc(1, ConnState::Established)]),
    );
    let body = good[..good.len() - MAC_LEN].to_vec();
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = body.clone();
        f(&mut b);
        decode(&signed(b), KEY)
    };
    assert_eq!(edit(&|b| b[4] = 2), Err(SyncRefusal::BadVersion));
    assert_eq!(edit(&|b| b[5] = 9), Err(SyncRefusal::BadType));
    assert_eq!(edit(&|b| b[7] = 2), Err(SyncRefusal::BadLength));
    assert_eq!(edit(&|b| b[12] = 1), Err(SyncRefusal::BadRecord));
    assert_eq!(
        edit(&|b| b[HEADER_LEN + 1] = 9),
        Err(SyncRefusal::BadRecord),
        "state"
    );
    assert_eq!(
        edit(&|b| b[HEADER_LEN + 2] = 3),
        Err(SyncRefusal::BadRecord),
        "method"
    );
    assert_eq!(
        edit(&|b| b[HEADER_LEN + 3] = 1),
        Err(SyncRefusal::BadRecord),
        "reserved"
    );
    assert_eq!(
        edit(&|b| b.truncate(HEADER_LEN + 10)),
        Err(SyncRefusal::BadLength)
    );
    let leave = dgram(2, T0_US, Message::Leave);
    let mut b = leave[..leave.len() - MAC_LEN].to_vec();
    b[7] = 1;
    assert_eq!(
        decode(&signed(b), KEY),
        Err(SyncRefusal::BadLength),
        "leave with records"
    );
    let ann = dgram(
        2,
        T0_US,
        Message::Announce {
            epoch: 1,
            nodes: vec![Node::new(1, 1, true)],
        },
    );
    let mut b = ann[..ann.len() - MAC_LEN].to_vec();
    let flags = HEADER_LEN + ANNOUNCE_FIXED + 6;
    b[flags] = 2;
    assert_eq!(
        decode(&signed(b), KEY),
        Err(SyncRefusal::BadRecord),
        "node flags"
    );
}

fn arb_conn() -> impl Strategy<Value = SyncConn> {
    (
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<(u16, u16)>(),
        0usize..3,
        0usize..9,
        any::<[u8; 6]>(),
        any::<u32>(),
        prop_oneof![Just(proto::TCP), Just(proto::UDP), any::<u8>()],
    )
        .prop_map(
            |(c, cp, vp, b, bp, (svc, be), m, s, mac, age, p)| SyncConn {
                conn: NewConn {
                    key: FlowKey::new(p, Ipv4Addr::from(c), cp, VIP, vp),
                    service: svc,
                    backend: be,
                    backend_addr: Ipv4Addr::from(b),
                    backend_port: bp,
                    method: Method::ALL[m],
                    client_mac: mac,
                    isn: None,
                },
                state: ConnState::ALL[s],
                age_ms: age,
            },
        )
}

proptest! {
    #[test]
    fn random_batches_round_trip(
        conns in prop::collection::vec(arb_conn(), 0..=MAX_CONNS),
        sender in any::<u32>(),
        seq in any::<u64>(),
    ) {
        let d = Datagram { sender, sequence: seq, message: Message::Conns(conns) };
        let b = encode(&d, KEY).expect("fits");
        prop_assert!(b.len() <= MAX_DATAGRAM);
        prop_assert_eq!(decode(&b, KEY), Ok(d));
    }

    #[test]
    fn random_bytes_never_panic_and_never_apply(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
        let mut r = receiver();
        let mut t = table();
        prop_assert!(r.receive(&bytes, &mut t, 0, T0_US).is_err());
        prop_assert!(t.is_empty());
    }
}

// ---- receiver ----

#[test]
fn receiver_inserts_updates_refreshes_and_deletes() {
    let mut r = receiver();
    let mut t = table();
    let m = Message::Conns(vec![
        sc(1, ConnState::SynRecv),
        sc(2, ConnState::Established),
    ]);
    assert_eq!(
        r.receive(&dgram(2, T0_US, m), &mut t, 1000, T0_US),
        Ok(Received::Applied)
    );
    assert_eq!(t.len(), 2);
    let e1 = *t.get(t.lookup(&key(1)).expect("1")).expect("e");
    assert_eq!(
        (e1.state, e1.backend_addr, e1.method),
        (ConnState::SynRecv, RS1, Method::Nat)
    );
    // State change, then a move to another backend, then the same again.
    let mut moved = sc(1, ConnState::Established);
    moved.conn.backend_addr = RS2;
    let m = Message::Conns(vec![sc(1, ConnState::Established)]);
    r.receive(&dgram(2, T0_US + 1, m), &mut t, 2000, T0_US)
        .expect("ok");
    assert_eq!(
        t.get(t.lookup(&key(1)).expect("1")).expect("e").state,
        ConnState::Established
    );
    r.receive(
        &dgram(3, T0_US, Message::Conns(vec![moved])),
        &mut t,
        3000,
        T0_US,
    )
    .expect("ok");
    assert_eq!(
        t.get(t.lookup(&key(1)).expect("1"))
            .expect("e")
            .backend_addr,
        RS2
    );
    r.receive(
        &dgram(3, T0_US + 1, Message::Conns(vec![moved])),
        &mut t,
        4000,
        T0_US,
    )
    .expect("ok");
    assert_eq!(
        r.stats,
        ApplyStats {
            inserted: 2,
            updated: 2,
            refreshed: 1,
            ..ApplyStats::default()
        }
    );
    let m = Message::Deletes(vec![key(1), key(77)]);
    r.receive(&dgram(2, T0_US + 2, m), &mut t, 5000, T0_US)
        .expect("ok");
    assert_eq!(t.len(), 1);
    assert!(t.lookup(&key(1)).is_none());
    assert_eq!((r.stats.removed, r.stats.missing), (1, 1));
}

#[test]
fn synced_nat_entry_gets_its_reply_key() {
    let mut r = receiver();
    let mut t = table();
    r.receive(
        &dgram(
            2,
            T0_US,
            Message::Conns(vec![sc(4, ConnState::Established)]),
        ),
        &mut t,
        0,
        T0_US,
    )
    .expect("ok");
    let reply = FlowKey::new(proto::TCP, RS1, 8080, key(4).src, key(4).src_port);
    assert_eq!(t.lookup_reply(&reply), t.lookup(&key(4)));
}

#[test]
fn forged_replayed_and_foreign_datagrams_change_nothing_and_are_counted() {
    let mut r = SyncReceiver::new(1, &[1, 2, 3], KEY, Some(Duration::from_secs(30)));
    let mut t = table();
    let m = || Message::Conns(vec![sc(1, ConnState::Established)]);
    r.receive(&dgram(2, T0_US, m()), &mut t, 0, T0_US)
        .expect("fresh");
    let before = snapshot(&t);
    let forged = encode(
        &Datagram {
            sender: 2,
            sequence: T0_US + 5,
            message: Message::Deletes(vec![key(1)]),
        },
        b"attacker key",
    )
    .expect("encode");
    let cases: Vec<(Vec<u8>, SyncRefusal)> = vec![
        (
            dgram(2, T0_US, Message::Deletes(vec![key(1)])),
            SyncRefusal::Replay,
        ),
        (
            dgram(2, T0_US - 1, Message::Deletes(vec![key(1)])),
            SyncRefusal::Replay,
        ),
        (forged, SyncRefusal::BadMac),
        (
            dgram(9, T0_US + 1, Message::Deletes(vec![key(1)])),
            SyncRefusal::UnknownNode,
        ),
        (
            dgram(1, T0_US + 1, Message::Deletes(vec![key(1)])),
            SyncRefusal::FromSelf,
        ),
        (
            dgram(3, 1, Message::Deletes(vec![key(1)])),
            SyncRefusal::Stale,
        ),
        (vec![0x55; 100], SyncRefusal::BadMagic),
        (vec![1, 2, 3], SyncRefusal::Truncated),
    ];
    let mut expect: BTreeMap<&str, u64> = BTreeMap::new();
    for (bytes, why) in cases {
        assert_eq!(r.receive(&bytes, &mut t, 10, T0_US), Err(why));
        *expect.entry(why.name()).or_insert(0) += 1;
        assert_eq!(r.refused[why.name()], expect[why.name()], "{why:?}");
    }
    assert_eq!(snapshot(&t), before);
    // The sender's next sequence is still accepted.
    r.receive(
        &dgram(2, T0_US + 1, Message::Deletes(vec![key(1)])),
        &mut t,
        20,
        T0_US,
    )
    .expect("next");
    assert!(t.is_empty());
}

#[test]
fn control_messages_are_handed_to_the_caller() {
    let mut r = receiver();
    let mut t = table();
    let nodes = vec![Node::new(1, 1, true), Node::new(2, 1, true)];
    let a = dgram(
        2,
        T0_US,
        Message::Announce {
            epoch: 5,
            nodes: nodes.clone(),
        },
    );
    assert_eq!(
        r.receive(&a, &mut t, 0, T0_US),
        Ok(Received::Announce {
            from: 2,
            epoch: 5,
            nodes
        })
    );
    assert_eq!(
        r.receive(&dgram(2, T0_US + 1, Message::Leave), &mut t, 0, T0_US),
        Ok(Received::Leave { from: 2 })
    );
    let q = Message::BulkRequest {
        request: 3,
        cursor: 0,
    };
    assert_eq!(
        r.receive(&dgram(3, T0_US, q), &mut t, 0, T0_US),
        Ok(Received::BulkRequest {
            from: 3,
            request: 3,
            cursor: 0
        })
    );
    assert!(t.is_empty());
}

// ---- sender: batching at literal times ----

fn entry(n: u32, state: ConnState, last_seen_ms: u64) -> Entry {
    let c = nat(n);
    Entry {
        key: c.key,
        backend_addr: c.backend_addr,
        backend_port: c.backend_port,
        service: c.service,
        backend: c.backend,
        method: c.method,
        state,
        client_mac: c.client_mac,
        last_seen_ms,
        synced_ms: last_seen_ms as u32,
        isn: 0,
    }
}

fn decoded(bytes: &[Vec<u8>]) -> Vec<Message> {
    bytes
        .iter()
        .map(|b| decode(b, KEY).expect("decodes").message)
        .collect()
}

#[test]
fn partial_batch_leaves_after_max_delay() {
    let mut s = SyncSender::new(2, KEY, Duration::from_millis(10));
    assert_eq!(s.next_deadline(), None);
    assert!(!s.push_conn(&entry(1, ConnState::SynRecv, 1000), 1000));
    assert!(!s.push_conn(&entry(2, ConnState::SynRecv, 1005), 1005));
    assert_eq!(s.next_deadline(), Some(1010));
    assert!(s.poll(1009, T0_US).is_empty());
    let out = s.poll(1010, T0_US);
    assert_eq!(
        decoded(&out),
        vec![Message::Conns(vec![
            SyncConn::of_entry(&entry(1, ConnState::SynRecv, 1000), 1000),
            SyncConn::of_entry(&entry(2, ConnState::SynRecv, 1005), 1005),
        ])]
    );
    assert_eq!(s.next_deadline(), None);
    assert!(s.poll(2000, T0_US).is_empty());
    assert_eq!(
        s.stats,
        SenderStats {
            datagrams: 1,
            conns: 2,
            deletes: 0
        }
    );
}

#[test]
fn full_batch_is_ready_at_once_and_the_rest_waits() {
    let mut s = SyncSender::new(2, KEY, Duration::from_millis(10));
    for n in 0..MAX_CONNS as u32 - 1 {
        assert!(!s.push_conn(&entry(n, ConnState::Established, 0), 0));
    }
    assert!(
        s.push_conn(&entry(100, ConnState::Established, 3), 3),
        "37th fills it"
    );
    assert!(s.push_conn(&entry(101, ConnState::Established, 4), 4));
    let out = s.poll(4, T0_US);
    assert_eq!(out.len(), 1);
    assert!(matches!(&decoded(&out)[0], Message::Conns(c) if c.len() == MAX_CONNS));
    // The 38th started a batch at 4: due at 14.
    assert_eq!(s.next_deadline(), Some(14));
    assert!(s.poll(13, T0_US).is_empty());
    assert_eq!(s.poll(14, T0_US).len(), 1);
}

#[test]
fn repeated_key_is_sent_once_with_its_latest_state_and_delete_cancels_upsert() {
    let mut s = SyncSender::new(2, KEY, Duration::from_millis(10));
    s.push_conn(&entry(1, ConnState::SynRecv, 0), 0);
    s.push_conn(&entry(1, ConnState::Established, 2), 2);
    s.push_conn(&entry(2, ConnState::Established, 2), 2);
    s.push_delete(key(2), 3);
    assert_eq!(s.next_deadline(), Some(10));
    let out = decoded(&s.poll(13, T0_US));
    assert_eq!(
        out,
        vec![
            Message::Conns(vec![SyncConn::of_entry(
                &entry(1, ConnState::Established, 2),
                2
            )]),
            Message::Deletes(vec![key(2)]),
        ]
    );
    // An upsert after a pending delete cancels the delete.
    s.push_delete(key(3), 20);
    s.push_conn(&entry(3, ConnState::SynRecv, 21), 21);
    assert_eq!(
        decoded(&s.flush(21, T0_US)),
        vec![Message::Conns(vec![SyncConn::of_entry(
            &entry(3, ConnState::SynRecv, 21),
            21
        )])]
    );
}

#[test]
fn sender_sequences_grow_and_a_receiver_accepts_them_in_order() {
    let mut s = SyncSender::new(2, KEY, Duration::from_millis(10));
    let mut r = receiver();
    let mut t = table();
    let mut seqs = Vec::new();
    for n in 0..5u32 {
        s.push_conn(&entry(n, ConnState::Established, 0), u64::from(n) * 20);
        for b in s.poll(u64::from(n) * 20 + 10, T0_US) {
            seqs.push(decode(&b, KEY).expect("d").sequence);
            r.receive(&b, &mut t, 0, T0_US).expect("accepted");
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(t.len(), 5);
}

// ---- bulk sync ----

#[test]
fn bulk_pull_copies_a_table_page_by_page() {
    let mut src = ConnTable::new(200, Timeouts::default()).expect("t");
    for n in 0..100u32 {
        src.insert_with_state(nat(n), ConnState::Established, 0)
            .expect("insert");
    }
    let mut answerer = SyncSender::new(2, KEY, Duration::from_millis(10));
    let mut dst = table();
    let mut r = receiver();
    let (mut pull, mut req) = BulkPull::start(2, 77, 0, Duration::from_millis(200), 2);
    let mut pages = 0;
    loop {
        let Message::BulkRequest { request, cursor } = req else {
            panic!("request expected");
        };
        let page = answerer
            .seal(bulk_page(&src, request, cursor, 50), T0_US)
            .expect("page");
        assert!(page.len() <= MAX_DATAGRAM);
        pages += 1;
        let Ok(Received::BulkPage {
            from,
            request,
            cursor,
            next,
        }) = r.receive(&page, &mut dst, 60, T0_US)
        else {
            panic!("page expected");
        };
        match pull.on_page(from, request, cursor, next, 60) {
            PullStep::Send(m) => req = m,
            PullStep::Done => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pages, 3, "100 entries, 37 per page");
    assert_eq!(dst.len(), 100);
    for (_, e) in src.iter() {
        let id = dst.lookup(&e.key).expect("copied");
        assert_eq!(dst.get(id).expect("e").backend_addr, e.backend_addr);
    }
    assert_eq!(
        pull.poll(10_000),
        PullStep::Wait,
        "finished pulls stay quiet"
    );
}

#[test]
fn bulk_pull_resends_then_fails_and_ignores_foreign_pages() {
    let (mut p, first) = BulkPull::start(2, 5, 1000, Duration::from_millis(100), 1);
    assert_eq!(
        first,
        Message::BulkRequest {
            request: 5,
            cursor: 0
        }
    );
    assert_eq!(p.next_deadline(), Some(1100));
    assert_eq!(p.poll(1099), PullStep::Wait);
    assert_eq!(p.poll(1100), PullStep::Send(first.clone()));
    assert_eq!(p.on_page(3, 5, 0, None, 1150), PullStep::Wait, "other peer");
    assert_eq!(
        p.on_page(2, 6, 0, None, 1150),
        PullStep::Wait,
        "other request"
    );
    assert_eq!(
        p.on_page(2, 5, 9, None, 1150),
        PullStep::Wait,
        "other cursor"
    );
    assert_eq!(p.poll(1199), PullStep::Wait);
    assert_eq!(p.poll(1200), PullStep::Failed);
    assert_eq!(p.next_deadline(), None);
}

#[test]
fn bulk_page_of_an_empty_table_is_the_last() {
    let t = table();
    assert_eq!(
        bulk_page(&t, 1, 0, 0),
        Message::BulkPage {
            request: 1,
            cursor: 0,
            next: None,
            conns: vec![]
        }
    );
}
