//! Connection sync between cluster nodes: the wire format, the batching
//! sender, the receiver that applies peers' entries to the [`ConnTable`], and
//! the bulk pull of a joining node.
//!
//! Pure, like the connection table: no sockets, no clock. Times are
//! parameters: `now_ms` (monotonic milliseconds, the table's clock) and
//! `unix_micros` (wall clock, for sequence numbers). The driver sends each
//! datagram the sender returns over UDP to the sync group or unicast peers,
//! and hands each received datagram to [`SyncReceiver::receive`].
//!
//! # What is sent
//!
//! The node that schedules a flow (the owner of its bucket) sends the entry
//! when it is created and whenever its TCP state changes, and a deletion when
//! it ends (expiry, RST, port reuse). Every node therefore holds every
//! connection of the cluster, so that whichever node takes over a bucket
//! forwards its established flows to the same backend. A joining node first
//! pulls the whole table page by page ([`BulkPull`], answered by
//! [`bulk_page`]), while it already receives the live stream.
//!
//! # Authentication and replay (shared with membership heartbeats)
//!
//! Every datagram ends with HMAC-SHA256(key, everything before the tag)
//! ([`heartbeat::member::sign`]) and carries the sender's sequence number
//! from a [`SequenceGen`] (`max(previous + 1, unix µs)`, so it grows across
//! restarts). The receiver refuses, counts and otherwise ignores a datagram
//! whose tag does not verify, whose sequence is not above the last one
//! accepted from that sender ([`ReplayGuard`]), which comes from an unknown
//! node or from itself, or which is malformed in any way. Nothing is applied
//! from a refused datagram: decoding and every check happen before the first
//! table change.
//!
//! # Wire format (big endian; at most [`MAX_DATAGRAM`] = 1400 bytes)
//!
//! Header, 24 bytes:
//!
//! | off | len | field |
//! |-----|-----|-------|
//! | 0   | 4   | magic `LBS1` |
//! | 4   | 1   | version, 1 |
//! | 5   | 1   | type: 1 conns, 2 deletes, 3 bulk request, 4 bulk page, 5 announce, 6 leave |
//! | 6   | 2   | record count |
//! | 8   | 4   | sender node id |
//! | 12  | 4   | reserved, zero |
//! | 16  | 8   | sequence |
//!
//! Then a fixed part per type, `count` records, and the 32-byte tag. The
//! total length must be exactly header + fixed part + count x record size +
//! 32.
//!
//! | type | fixed part | record |
//! |------|------------|--------|
//! | conns | none | conn, 36 bytes (at most 37) |
//! | deletes | none | flow key, 16 bytes (at most 84) |
//! | bulk request | request id (4), cursor (4) | none |
//! | bulk page | request id (4), cursor (4), next cursor (4; `0xffffffff` = last page) | conn, 36 bytes (at most 37) |
//! | announce | epoch (8) | node, 8 bytes (at most 167) |
//! | leave | none | none |
//!
//! Conn record, 36 bytes:
//!
//! | off | len | field |
//! |-----|-----|-------|
//! | 0   | 1   | IP protocol |
//! | 1   | 1   | state ([`ConnState`] as `u8`: 0 NONE .. 7 CLOSE, 8 UDP) |
//! | 2   | 1   | method: 0 nat, 1 dr, 2 local |
//! | 3   | 1   | reserved, zero |
//! | 4   | 4   | client address (the flow's source) |
//! | 8   | 2   | client port |
//! | 10  | 4   | VIP (the flow's destination) |
//! | 14  | 2   | VIP port |
//! | 16  | 4   | backend address |
//! | 20  | 2   | backend port |
//! | 22  | 2   | service index |
//! | 24  | 2   | backend index within the service |
//! | 26  | 6   | client MAC (next hop toward the client) |
//! | 32  | 4   | age: ms since the sender last saw a packet (saturating) |
//!
//! Flow key record, 16 bytes: the 13 bytes of [`FlowKey::to_bytes`]
//! (protocol, source, source port, destination, destination port), then 3
//! zero bytes.
//!
//! Node record (announce), 8 bytes: node id (4), weight (2), flags (1: bit 0
//! live, others zero), reserved zero (1).
//!
//! Service and backend indexes refer to the running config, which must be
//! the same on every node (the lead checks this with the config digest).

use core::net::Ipv4Addr;
use std::collections::BTreeMap;
use std::time::Duration;

use heartbeat::member::{self, MAC_LEN, ReplayGuard, SequenceGen};
use rewrite::flow::FlowKey;
use rewrite::maglev::Node;

use crate::conntrack::{ConnState, ConnTable, Dir, Entry, Method, NewConn, TcpFlags};

pub const MAGIC: [u8; 4] = *b"LBS1";
pub const VERSION: u8 = 1;
/// The largest datagram sent or accepted: fits a 1500-byte MTU with IPv4,
/// UDP and room for tunnels.
pub const MAX_DATAGRAM: usize = 1400;
pub const HEADER_LEN: usize = 24;
pub const CONN_LEN: usize = 36;
pub const KEY_LEN: usize = 16;
pub const NODE_LEN: usize = 8;
const BULK_REQUEST_FIXED: usize = 8;
const BULK_PAGE_FIXED: usize = 12;
const ANNOUNCE_FIXED: usize = 8;
/// Room for records in a datagram without a fixed part.
const ROOM: usize = MAX_DATAGRAM - HEADER_LEN - MAC_LEN;
/// Conn records per datagram (37).
pub const MAX_CONNS: usize = ROOM / CONN_LEN;
/// Conn records per bulk page (37).
pub const MAX_PAGE_CONNS: usize = (ROOM - BULK_PAGE_FIXED) / CONN_LEN;
/// Deletions per datagram (84).
pub const MAX_DELETES: usize = ROOM / KEY_LEN;
/// Nodes per announcement (167): the largest cluster the protocol carries.
pub const MAX_ANNOUNCE_NODES: usize = (ROOM - ANNOUNCE_FIXED) / NODE_LEN;
/// "No next page" in a bulk page.
const LAST_PAGE: u32 = u32::MAX;

mod ty {
    pub const CONNS: u8 = 1;
    pub const DELETES: u8 = 2;
    pub const BULK_REQUEST: u8 = 3;
    pub const BULK_PAGE: u8 = 4;
    pub const ANNOUNCE: u8 = 5;
    pub const LEAVE: u8 = 6;
}

/// One connection as synced: what the scheduler decided, its TCP state and
/// how long ago the sender last saw a packet of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncConn {
    pub conn: NewConn,
    pub state: ConnState,
    pub age_ms: u32,
}

impl SyncConn {
    /// The record for a table entry at `now_ms`.
    pub fn of_entry(e: &Entry, now_ms: u64) -> SyncConn {
        SyncConn {
            conn: NewConn {
                key: e.key,
                service: e.service,
                backend: e.backend,
                backend_addr: e.backend_addr,
                backend_port: e.backend_port,
                method: e.method,
                client_mac: e.client_mac,
                // Not on the wire: on a peer's copy any SYN after the end of
                // the connection is a reuse, as in IPVS.
                isn: None,
            },
            state: e.state,
            age_ms: u32::try_from(now_ms.saturating_sub(e.last_seen_ms)).unwrap_or(u32::MAX),
        }
    }
}

/// The content of a datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// New or changed connections.
    Conns(Vec<SyncConn>),
    /// Ended connections, by client key.
    Deletes(Vec<FlowKey>),
    /// "Send me your table from slab index `cursor` on" (a joining node).
    BulkRequest { request: u32, cursor: u32 },
    /// One page of the answer: entries from `cursor`, and where the next page
    /// starts (`None`: this was the last).
    BulkPage {
        request: u32,
        cursor: u32,
        next: Option<u32>,
        conns: Vec<SyncConn>,
    },
    /// The bucket-table membership the sender (the VRRP master) commits:
    /// see the `cluster` module.
    Announce { epoch: u64, nodes: Vec<Node> },
    /// The sender is stopping: take its buckets now (see `cluster`).
    Leave,
}

/// A decoded, authenticated datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub sender: u32,
    pub sequence: u64,
    pub message: Message,
}

/// Why a datagram could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{count} records, more than the {max} that fit one datagram")]
    TooManyRecords { count: usize, max: usize },
}

/// Why a received datagram was refused. `Copy`; each has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SyncRefusal {
    #[error("shorter than a header and tag, or longer than {MAX_DATAGRAM} bytes")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unknown version")]
    BadVersion,
    #[error("HMAC does not verify")]
    BadMac,
    #[error("unknown message type")]
    BadType,
    #[error("length does not match the type and record count")]
    BadLength,
    #[error("a reserved field is not zero or a field is out of range")]
    BadRecord,
    #[error("sequence not above the last accepted from this sender")]
    Replay,
    #[error("sequence older than the allowed age")]
    Stale,
    #[error("sender is not a configured node")]
    UnknownNode,
    #[error("sent by this node")]
    FromSelf,
}

impl SyncRefusal {
    pub const ALL: [SyncRefusal; 11] = [
        SyncRefusal::Truncated,
        SyncRefusal::BadMagic,
        SyncRefusal::BadVersion,
        SyncRefusal::BadMac,
        SyncRefusal::BadType,
        SyncRefusal::BadLength,
        SyncRefusal::BadRecord,
        SyncRefusal::Replay,
        SyncRefusal::Stale,
        SyncRefusal::UnknownNode,
        SyncRefusal::FromSelf,
    ];

    /// The counter name (metrics label).
    pub const fn name(self) -> &'static str {
        match self {
            SyncRefusal::Truncated => "truncated",
            SyncRefusal::BadMagic => "bad_magic",
            SyncRefusal::BadVersion => "bad_version",
            SyncRefusal::BadMac => "auth",
            SyncRefusal::BadType => "bad_type",
            SyncRefusal::BadLength => "bad_length",
            SyncRefusal::BadRecord => "bad_record",
            SyncRefusal::Replay => "replay",
            SyncRefusal::Stale => "stale",
            SyncRefusal::UnknownNode => "unknown_node",
            SyncRefusal::FromSelf => "from_self",
        }
    }
}

// ---- encoding ----

fn method_code(m: Method) -> u8 {
    match m {
        Method::Nat => 0,
        Method::Dr => 1,
        Method::Local => 2,
    }
}

fn method_of(c: u8) -> Option<Method> {
    match c {
        0 => Some(Method::Nat),
        1 => Some(Method::Dr),
        2 => Some(Method::Local),
        _ => None,
    }
}

fn state_of(c: u8) -> Option<ConnState> {
    ConnState::ALL.into_iter().find(|s| *s as u8 == c)
}

fn put_conn(out: &mut Vec<u8>, c: &SyncConn) {
    let k = &c.conn.key;
    out.push(k.proto);
    out.push(c.state as u8);
    out.push(method_code(c.conn.method));
    out.push(0);
    out.extend_from_slice(&k.src.octets());
    out.extend_from_slice(&k.src_port.to_be_bytes());
    out.extend_from_slice(&k.dst.octets());
    out.extend_from_slice(&k.dst_port.to_be_bytes());
    out.extend_from_slice(&c.conn.backend_addr.octets());
    out.extend_from_slice(&c.conn.backend_port.to_be_bytes());
    out.extend_from_slice(&c.conn.service.to_be_bytes());
    out.extend_from_slice(&c.conn.backend.to_be_bytes());
    out.extend_from_slice(&c.conn.client_mac);
    out.extend_from_slice(&c.age_ms.to_be_bytes());
}

fn put_key(out: &mut Vec<u8>, k: &FlowKey) {
    out.extend_from_slice(&k.to_bytes());
    out.extend_from_slice(&[0, 0, 0]);
}

fn put_node(out: &mut Vec<u8>, n: &Node) {
    out.extend_from_slice(&n.id.to_be_bytes());
    out.extend_from_slice(&n.weight.to_be_bytes());
    out.push(u8::from(n.live));
    out.push(0);
}

fn check_count(count: usize, max: usize) -> Result<u16, EncodeError> {
    if count > max {
        return Err(EncodeError::TooManyRecords { count, max });
    }
    // max < 2^16 for every type.
    Ok(count as u16)
}

/// Serialises and authenticates a datagram with `key`. Fails only when the
/// message has more records than one datagram holds (see the `MAX_*`
/// constants); the result is then at most [`MAX_DATAGRAM`] bytes.
pub fn encode(d: &Datagram, key: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let (t, count) = match &d.message {
        Message::Conns(c) => (ty::CONNS, check_count(c.len(), MAX_CONNS)?),
        Message::Deletes(k) => (ty::DELETES, check_count(k.len(), MAX_DELETES)?),
        Message::BulkRequest { .. } => (ty::BULK_REQUEST, 0),
        Message::BulkPage { conns, .. } => {
            (ty::BULK_PAGE, check_count(conns.len(), MAX_PAGE_CONNS)?)
        }
        Message::Announce { nodes, .. } => {
            (ty::ANNOUNCE, check_count(nodes.len(), MAX_ANNOUNCE_NODES)?)
        }
        Message::Leave => (ty::LEAVE, 0),
    };
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(t);
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&d.sender.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&d.sequence.to_be_bytes());
    match &d.message {
        Message::Conns(c) => c.iter().for_each(|c| put_conn(&mut out, c)),
        Message::Deletes(k) => k.iter().for_each(|k| put_key(&mut out, k)),
        Message::BulkRequest { request, cursor } => {
            out.extend_from_slice(&request.to_be_bytes());
            out.extend_from_slice(&cursor.to_be_bytes());
        }
        Message::BulkPage {
            request,
            cursor,
            next,
            conns,
        } => {
            out.extend_from_slice(&request.to_be_bytes());
            out.extend_from_slice(&cursor.to_be_bytes());
            out.extend_from_slice(&next.unwrap_or(LAST_PAGE).to_be_bytes());
            conns.iter().for_each(|c| put_conn(&mut out, c));
        }
        Message::Announce { epoch, nodes } => {
            out.extend_from_slice(&epoch.to_be_bytes());
            nodes.iter().for_each(|n| put_node(&mut out, n));
        }
        Message::Leave => {}
    }
    let tag = member::sign(key, &out);
    out.extend_from_slice(&tag);
    Ok(out)
}

// ---- decoding ----

/// A bounds-checked reader: every read is `Option`, so no input can panic.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.at.checked_add(N)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        s.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_be_bytes)
    }

    fn addr(&mut self) -> Option<Ipv4Addr> {
        self.bytes::<4>().map(Ipv4Addr::from)
    }
}

fn read_conn(r: &mut Reader<'_>) -> Result<SyncConn, SyncRefusal> {
    let bad = SyncRefusal::BadLength;
    let proto = r.u8().ok_or(bad)?;
    let state = r.u8().ok_or(bad)?;
    let method = r.u8().ok_or(bad)?;
    let reserved = r.u8().ok_or(bad)?;
    let src = r.addr().ok_or(bad)?;
    let src_port = r.u16().ok_or(bad)?;
    let dst = r.addr().ok_or(bad)?;
    let dst_port = r.u16().ok_or(bad)?;
    let backend_addr = r.addr().ok_or(bad)?;
    let backend_port = r.u16().ok_or(bad)?;
    let service = r.u16().ok_or(bad)?;
    let backend = r.u16().ok_or(bad)?;
    let client_mac = r.bytes::<6>().ok_or(bad)?;
    let age_ms = r.u32().ok_or(bad)?;
    let (Some(state), Some(method), 0) = (state_of(state), method_of(method), reserved) else {
        return Err(SyncRefusal::BadRecord);
    };
    Ok(SyncConn {
        conn: NewConn {
            key: FlowKey::new(proto, src, src_port, dst, dst_port),
            service,
            backend,
            backend_addr,
            backend_port,
            method,
            client_mac,
            isn: None,
        },
        state,
        age_ms,
    })
}

fn read_key(r: &mut Reader<'_>) -> Result<FlowKey, SyncRefusal> {
    let bad = SyncRefusal::BadLength;
    let proto = r.u8().ok_or(bad)?;
    let src = r.addr().ok_or(bad)?;
    let src_port = r.u16().ok_or(bad)?;
    let dst = r.addr().ok_or(bad)?;
    let dst_port = r.u16().ok_or(bad)?;
    if r.bytes::<3>().ok_or(bad)? != [0, 0, 0] {
        return Err(SyncRefusal::BadRecord);
    }
    Ok(FlowKey::new(proto, src, src_port, dst, dst_port))
}

fn read_node(r: &mut Reader<'_>) -> Result<Node, SyncRefusal> {
    let bad = SyncRefusal::BadLength;
    let id = r.u32().ok_or(bad)?;
    let weight = r.u16().ok_or(bad)?;
    let flags = r.u8().ok_or(bad)?;
    let reserved = r.u8().ok_or(bad)?;
    if flags & !1 != 0 || reserved != 0 {
        return Err(SyncRefusal::BadRecord);
    }
    Ok(Node::new(id, weight, flags & 1 == 1))
}

fn records<T>(
    r: &mut Reader<'_>,
    count: usize,
    read: impl Fn(&mut Reader<'_>) -> Result<T, SyncRefusal>,
) -> Result<Vec<T>, SyncRefusal> {
    (0..count).map(|_| read(r)).collect()
}

/// Checks length, magic, version and the tag (constant time), then the
/// layout of the type, then reads. Replay and sender checks are the
/// receiver's ([`SyncReceiver`]).
pub fn decode(b: &[u8], key: &[u8]) -> Result<Datagram, SyncRefusal> {
    if b.len() < HEADER_LEN + MAC_LEN || b.len() > MAX_DATAGRAM {
        return Err(SyncRefusal::Truncated);
    }
    let body_len = b.len() - MAC_LEN;
    let (body, tag) = b.split_at(body_len);
    let mut r = Reader::new(body);
    if r.bytes::<4>() != Some(MAGIC) {
        return Err(SyncRefusal::BadMagic);
    }
    if r.u8() != Some(VERSION) {
        return Err(SyncRefusal::BadVersion);
    }
    if !member::verify(key, body, tag) {
        return Err(SyncRefusal::BadMac);
    }
    let bad = SyncRefusal::BadLength;
    let t = r.u8().ok_or(bad)?;
    let count = usize::from(r.u16().ok_or(bad)?);
    let sender = r.u32().ok_or(bad)?;
    let reserved = r.u32().ok_or(bad)?;
    let sequence = r.u64().ok_or(bad)?;
    if reserved != 0 {
        return Err(SyncRefusal::BadRecord);
    }
    let (fixed, record) = match t {
        ty::CONNS => (0, CONN_LEN),
        ty::DELETES => (0, KEY_LEN),
        ty::BULK_REQUEST => (BULK_REQUEST_FIXED, 0),
        ty::BULK_PAGE => (BULK_PAGE_FIXED, CONN_LEN),
        ty::ANNOUNCE => (ANNOUNCE_FIXED, NODE_LEN),
        ty::LEAVE => (0, 0),
        _ => return Err(SyncRefusal::BadType),
    };
    if body_len != HEADER_LEN + fixed + count * record || (record == 0 && count != 0) {
        return Err(SyncRefusal::BadLength);
    }
    let message = match t {
        ty::CONNS => Message::Conns(records(&mut r, count, read_conn)?),
        ty::DELETES => Message::Deletes(records(&mut r, count, read_key)?),
        ty::BULK_REQUEST => Message::BulkRequest {
            request: r.u32().ok_or(bad)?,
            cursor: r.u32().ok_or(bad)?,
        },
        ty::BULK_PAGE => {
            let request = r.u32().ok_or(bad)?;
            let cursor = r.u32().ok_or(bad)?;
            let next = r.u32().ok_or(bad)?;
            Message::BulkPage {
                request,
                cursor,
                next: (next != LAST_PAGE).then_some(next),
                conns: records(&mut r, count, read_conn)?,
            }
        }
        ty::ANNOUNCE => Message::Announce {
            epoch: r.u64().ok_or(bad)?,
            nodes: records(&mut r, count, read_node)?,
        },
        _ => Message::Leave,
    };
    Ok(Datagram {
        sender,
        sequence,
        message,
    })
}

// ---- sender ----

/// Counters of a [`SyncSender`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub datagrams: u64,
    pub conns: u64,
    pub deletes: u64,
}

/// Batches of one kind of record, oldest first; only the last is open.
#[derive(Debug)]
struct Queue<T> {
    /// (time of the batch's first change, records)
    batches: Vec<(u64, Vec<T>)>,
    max: usize,
}

impl<T> Queue<T> {
    const fn new(max: usize) -> Self {
        Queue {
            batches: Vec::new(),
            max,
        }
    }

    fn push(&mut self, item: T, now_ms: u64) {
        match self.batches.last_mut() {
            Some((_, b)) if b.len() < self.max => b.push(item),
            _ => self.batches.push((now_ms, vec![item])),
        }
    }

    fn find_mut(&mut self, f: impl Fn(&T) -> bool) -> Option<&mut T> {
        self.batches
            .iter_mut()
            .flat_map(|(_, b)| b.iter_mut())
            .find(|x| f(x))
    }

    fn retain(&mut self, f: impl Fn(&T) -> bool) {
        for (_, b) in &mut self.batches {
            b.retain(&f);
        }
        self.batches.retain(|(_, b)| !b.is_empty());
    }

    /// A batch can leave now whatever the time.
    fn ready(&self) -> bool {
        self.batches.len() > 1
            || self
                .batches
                .last()
                .is_some_and(|(_, b)| b.len() >= self.max)
    }

    fn deadline(&self, delay: u64) -> Option<u64> {
        self.batches.first().map(|(t, _)| t.saturating_add(delay))
    }

    /// The batches due: every closed or full one, and the open one if it has
    /// waited `delay` (or if `all`).
    fn take(&mut self, now_ms: u64, delay: u64, all: bool) -> Vec<Vec<T>> {
        let due = |i: usize, (t, b): &(u64, Vec<T>), n: usize| {
            all || i + 1 < n || b.len() >= self.max || now_ms >= t.saturating_add(delay)
        };
        let n = self.batches.len();
        let k = self
            .batches
            .iter()
            .enumerate()
            .take_while(|(i, x)| due(*i, x, n))
            .count();
        self.batches.drain(..k).map(|(_, b)| b).collect()
    }
}

/// Batches this node's connection changes into datagrams.
///
/// A change waits at most `max_delay` (so that changes made close together
/// share a datagram), and a full batch goes out at the next
/// [`SyncSender::poll`]. A key changed twice before its batch leaves is sent
/// once, with its latest value; a deletion cancels a pending upsert of the
/// same key and the other way round, so the receiver never sees them in the
/// wrong order.
#[derive(Debug)]
pub struct SyncSender {
    node_id: u32,
    key: Vec<u8>,
    seq: SequenceGen,
    max_delay_ms: u64,
    conns: Queue<SyncConn>,
    deletes: Queue<FlowKey>,
    pub stats: SenderStats,
}

impl SyncSender {
    pub fn new(node_id: u32, key: &[u8], max_delay: Duration) -> Self {
        SyncSender {
            node_id,
            key: key.to_vec(),
            seq: SequenceGen::default(),
            max_delay_ms: u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX),
            conns: Queue::new(MAX_CONNS),
            deletes: Queue::new(MAX_DELETES),
            stats: SenderStats::default(),
        }
    }

    /// Queues a new or changed entry. Returns whether a full batch is ready
    /// (poll now rather than at the deadline).
    pub fn push_conn(&mut self, entry: &Entry, now_ms: u64) -> bool {
        let c = SyncConn::of_entry(entry, now_ms);
        self.deletes.retain(|k| *k != c.conn.key);
        match self.conns.find_mut(|x| x.conn.key == c.conn.key) {
            Some(slot) => *slot = c,
            None => self.conns.push(c, now_ms),
        }
        self.ready()
    }

    /// Queues a deletion. Returns whether a full batch is ready.
    pub fn push_delete(&mut self, key: FlowKey, now_ms: u64) -> bool {
        self.conns.retain(|c| c.conn.key != key);
        if self.deletes.find_mut(|k| *k == key).is_none() {
            self.deletes.push(key, now_ms);
        }
        self.ready()
    }

    fn ready(&self) -> bool {
        self.conns.ready() || self.deletes.ready()
    }

    /// When [`SyncSender::poll`] has something to send, at the latest.
    pub fn next_deadline(&self) -> Option<u64> {
        let d = self.max_delay_ms;
        [self.conns.deadline(d), self.deletes.deadline(d)]
            .into_iter()
            .flatten()
            .min()
    }

    /// The datagrams due at `now_ms`: every full batch, and the partial ones
    /// whose oldest change has waited `max_delay`. Deletions go after the
    /// upserts.
    pub fn poll(&mut self, now_ms: u64, unix_micros: u64) -> Vec<Vec<u8>> {
        self.take(now_ms, unix_micros, false)
    }

    /// Everything pending, now (before a graceful stop or a `Leave`).
    pub fn flush(&mut self, now_ms: u64, unix_micros: u64) -> Vec<Vec<u8>> {
        self.take(now_ms, unix_micros, true)
    }

    fn take(&mut self, now_ms: u64, unix_micros: u64, all: bool) -> Vec<Vec<u8>> {
        let d = self.max_delay_ms;
        let mut out = Vec::new();
        for batch in self.conns.take(now_ms, d, all) {
            self.stats.conns += batch.len() as u64;
            out.extend(self.seal(Message::Conns(batch), unix_micros));
        }
        for batch in self.deletes.take(now_ms, d, all) {
            self.stats.deletes += batch.len() as u64;
            out.extend(self.seal(Message::Deletes(batch), unix_micros));
        }
        out
    }

    /// Encodes a control message (announce, leave, bulk request or page)
    /// with this sender's sequence. `None` only if it has too many records.
    pub fn seal(&mut self, message: Message, unix_micros: u64) -> Option<Vec<u8>> {
        let d = Datagram {
            sender: self.node_id,
            sequence: self.seq.next(unix_micros),
            message,
        };
        let b = encode(&d, &self.key).ok()?;
        self.stats.datagrams += 1;
        Some(b)
    }
}

// ---- bulk sync ----

/// One page of this node's table for a bulk request: entries from slab
/// index `cursor` on, at most [`MAX_PAGE_CONNS`]. Entries inserted behind
/// the cursor while the requester pages through reach it by the live stream,
/// which it receives meanwhile. Costs one pass over the slots before
/// `cursor` (a scan, no allocation beyond the page).
pub fn bulk_page(table: &ConnTable, request: u32, cursor: u32, now_ms: u64) -> Message {
    let mut conns = Vec::with_capacity(MAX_PAGE_CONNS);
    let mut next = None;
    for (id, e) in table.iter().filter(|(id, _)| id.index() >= cursor) {
        if conns.len() == MAX_PAGE_CONNS {
            next = Some(id.index());
            break;
        }
        conns.push(SyncConn::of_entry(e, now_ms));
    }
    Message::BulkPage {
        request,
        cursor,
        next,
        conns,
    }
}

/// What a [`BulkPull`] wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullStep {
    /// Nothing to do now.
    Wait,
    /// Send this request to the peer.
    Send(Message),
    /// The last page arrived: the table is complete.
    Done,
    /// The peer did not answer after every retry: pull from another peer.
    Failed,
}

/// The requester's side of a bulk sync: asks one peer for its table page by
/// page, resending a request that is not answered within `timeout`, and
/// giving up after `retries` resends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkPull {
    pub peer: u32,
    pub request: u32,
    cursor: u32,
    deadline: u64,
    timeout_ms: u64,
    retries_left: u32,
    retries: u32,
    finished: bool,
    pub pages: u64,
}

impl BulkPull {
    /// Starts a pull; send the returned request. `request` should differ
    /// between pulls (the driver may use its sequence generator's low bits).
    pub fn start(
        peer: u32,
        request: u32,
        now_ms: u64,
        timeout: Duration,
        retries: u32,
    ) -> (Self, Message) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let p = BulkPull {
            peer,
            request,
            cursor: 0,
            deadline: now_ms.saturating_add(timeout_ms),
            timeout_ms,
            retries_left: retries,
            retries,
            finished: false,
            pages: 0,
        };
        let m = p.request_message();
        (p, m)
    }

    fn request_message(&self) -> Message {
        Message::BulkRequest {
            request: self.request,
            cursor: self.cursor,
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        (!self.finished).then_some(self.deadline)
    }

    /// A page arrived (already applied by the receiver). Pages of another
    /// pull, from another peer or for another cursor are ignored.
    pub fn on_page(
        &mut self,
        from: u32,
        request: u32,
        cursor: u32,
        next: Option<u32>,
        now_ms: u64,
    ) -> PullStep {
        if self.finished || from != self.peer || request != self.request || cursor != self.cursor {
            return PullStep::Wait;
        }
        self.pages += 1;
        match next {
            None => {
                self.finished = true;
                PullStep::Done
            }
            Some(n) => {
                self.cursor = n;
                self.deadline = now_ms.saturating_add(self.timeout_ms);
                self.retries_left = self.retries;
                PullStep::Send(self.request_message())
            }
        }
    }

    /// Resends on timeout, or gives up.
    pub fn poll(&mut self, now_ms: u64) -> PullStep {
        if self.finished || now_ms < self.deadline {
            return PullStep::Wait;
        }
        if self.retries_left == 0 {
            self.finished = true;
            return PullStep::Failed;
        }
        self.retries_left -= 1;
        self.deadline = now_ms.saturating_add(self.timeout_ms);
        PullStep::Send(self.request_message())
    }
}

// ---- receiver ----

/// Counters of a [`SyncReceiver`]'s changes to the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// New entries.
    pub inserted: u64,
    /// Entries replaced (another state, backend or method).
    pub updated: u64,
    /// Identical entries whose expiry was refreshed.
    pub refreshed: u64,
    pub removed: u64,
    /// Deletions of keys we did not have.
    pub missing: u64,
    /// Entries the table refused (full, reply key taken by another entry).
    pub failed: u64,
}

/// What an accepted datagram asks of the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Entries applied to the table (conns, deletes).
    Applied,
    /// A peer wants our table: answer with [`bulk_page`] through the sender.
    BulkRequest {
        from: u32,
        request: u32,
        cursor: u32,
    },
    /// A page was applied; feed it to the [`BulkPull`].
    BulkPage {
        from: u32,
        request: u32,
        cursor: u32,
        next: Option<u32>,
    },
    /// For the cluster state machine.
    Announce {
        from: u32,
        epoch: u64,
        nodes: Vec<Node>,
    },
    /// For the cluster state machine.
    Leave { from: u32 },
}

/// Checks and applies peers' datagrams to a [`ConnTable`].
#[derive(Debug)]
pub struct SyncReceiver {
    self_id: u32,
    peers: Vec<u32>,
    key: Vec<u8>,
    guard: ReplayGuard,
    /// Refused datagrams per [`SyncRefusal::name`].
    pub refused: BTreeMap<&'static str, u64>,
    pub stats: ApplyStats,
}

impl SyncReceiver {
    /// `peers`: the configured node ids (ours may be among them).
    /// `max_age`: as for membership heartbeats (needs NTP).
    pub fn new(self_id: u32, peers: &[u32], key: &[u8], max_age: Option<Duration>) -> Self {
        SyncReceiver {
            self_id,
            peers: peers.iter().copied().filter(|&p| p != self_id).collect(),
            key: key.to_vec(),
            guard: ReplayGuard::new(max_age),
            refused: SyncRefusal::ALL.iter().map(|r| (r.name(), 0)).collect(),
            stats: ApplyStats::default(),
        }
    }

    fn refuse(&mut self, r: SyncRefusal) -> SyncRefusal {
        *self.refused.entry(r.name()).or_insert(0) += 1;
        r
    }

    /// Checks one datagram and applies it to `table` at `now_ms`. A refused
    /// datagram changes nothing but its counter.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        table: &mut ConnTable,
        now_ms: u64,
        unix_micros: u64,
    ) -> Result<Received, SyncRefusal> {
        let d = decode(bytes, &self.key).map_err(|r| self.refuse(r))?;
        if d.sender == self.self_id {
            return Err(self.refuse(SyncRefusal::FromSelf));
        }
        if !self.peers.contains(&d.sender) {
            return Err(self.refuse(SyncRefusal::UnknownNode));
        }
        if let Err(r) = self.guard.check(d.sender, d.sequence, unix_micros) {
            let r = match r {
                member::Refusal::Stale => SyncRefusal::Stale,
                _ => SyncRefusal::Replay,
            };
            return Err(self.refuse(r));
        }
        self.guard.accept(d.sender, d.sequence);
        let from = d.sender;
        Ok(match d.message {
            Message::Conns(conns) => {
                for c in &conns {
                    self.apply_conn(table, c, now_ms);
                }
                Received::Applied
            }
            Message::Deletes(keys) => {
                for k in &keys {
                    match table.lookup(k).and_then(|id| table.remove(id)) {
                        Some(_) => self.stats.removed += 1,
                        None => self.stats.missing += 1,
                    }
                }
                Received::Applied
            }
            Message::BulkRequest { request, cursor } => Received::BulkRequest {
                from,
                request,
                cursor,
            },
            Message::BulkPage {
                request,
                cursor,
                next,
                conns,
            } => {
                for c in &conns {
                    self.apply_conn(table, c, now_ms);
                }
                Received::BulkPage {
                    from,
                    request,
                    cursor,
                    next,
                }
            }
            Message::Announce { epoch, nodes } => Received::Announce { from, epoch, nodes },
            Message::Leave => Received::Leave { from },
        })
    }

    /// Last writer wins: the sender is the owner of the flow's bucket, the
    /// only node that sees its packets.
    fn apply_conn(&mut self, table: &mut ConnTable, c: &SyncConn, now_ms: u64) {
        // The table clamps a time before its clock to its clock.
        let seen = now_ms.saturating_sub(u64::from(c.age_ms));
        if let Some(id) = table.lookup(&c.conn.key) {
            let same = table.get(id).is_some_and(|e| {
                SyncConn::of_entry(e, now_ms).conn == c.conn && e.state == coerce(c)
            });
            if same {
                table.update(id, Dir::FromClient, TcpFlags::NONE, seen);
                self.stats.refreshed += 1;
                return;
            }
            table.remove(id);
            match table.insert_with_state(c.conn, c.state, seen) {
                Ok(_) => self.stats.updated += 1,
                Err(_) => self.stats.failed += 1,
            }
            return;
        }
        match table.insert_with_state(c.conn, c.state, seen) {
            Ok(_) => self.stats.inserted += 1,
            Err(_) => self.stats.failed += 1,
        }
    }
}

/// The state the table stores for a synced record (see
/// [`ConnTable::insert_with_state`]).
fn coerce(c: &SyncConn) -> ConnState {
    match (c.conn.key.proto == rewrite::flow::proto::TCP, c.state) {
        (false, _) => ConnState::Udp,
        (true, ConnState::Udp) => ConnState::None,
        (true, s) => s,
    }
}

#[cfg(test)]
mod tests;
