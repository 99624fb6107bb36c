//! The connection table: one entry per flow this node has scheduled, so that
//! every later packet of the flow goes to the same backend, and replies from a
//! NAT backend find their way back to the client.
//!
//! Pure logic, like `rewrite`: no I/O, no clock. Every call that needs the
//! time takes `now_ms`, monotonic milliseconds owned by the caller. If the
//! caller's clock ever steps back, the table keeps using the latest time it
//! was given (so its expiry lists stay ordered); it never panics.
//!
//! # Layout and cost
//!
//! - A slab `Vec<Slot>` of `max_entries` slots, allocated once, with a free
//!   list threaded through the vacant slots. An entry is named by a [`ConnId`]
//!   (slot index + generation), so an id kept past the entry's removal is
//!   recognised as stale instead of reaching the slot's next tenant.
//! - Two hash maps from [`FlowKey`] to slot index, seeded per table with
//!   `foldhash` (5-tuples are chosen by whoever sends us packets): `forward`
//!   (client -> VIP:vport, as received) and `reply` (backend:port ->
//!   client:cport, only for NAT entries, whose replies pass through us).
//!   Both reserve room for `2 * max_entries` at construction: hashbrown
//!   rehashes in place (no allocation) when it runs out of never-used slots
//!   while at most half full, and grows otherwise; with twice the room the
//!   table is never more than half full, so the maps never allocate after
//!   construction however entries churn (`maps_never_grow_under_churn`).
//! - Expiry: one intrusive doubly linked list per state, in last-seen order.
//!   Every entry of a list has the same timeout, so the list is also in expiry
//!   order and the expired entries are exactly a prefix of it. A packet moves
//!   its entry to the tail of its (new) state's list, O(1); [`ConnTable::expire`]
//!   pops expired heads, O(1) each, and looks at no entry that is not due: no
//!   scan, no timing-wheel granularity, exact to the millisecond. The
//!   expiry time is not stored but computed as `last_seen_ms + timeout(state)`,
//!   so [`ConnTable::set_timeouts`] applies at once to every entry and keeps
//!   each list ordered.
//!
//! # TCP state
//!
//! The states and the transition table follow IPVS
//! (`net/netfilter/ipvs/ip_vs_proto_tcp.c`, `tcp_states[]`), whose names
//! are from the server's side: the balancer stands in for it. The full table
//! is documented on [`ConnState::step`]. As in IPVS, only ESTABLISHED counts
//! as an *active* connection ([`ConnState::is_active`]).

use core::fmt;
use core::net::Ipv4Addr;
use std::collections::HashMap;
use std::time::Duration;

use foldhash::fast::RandomState;
use rewrite::flow::{FlowKey, proto};
use serde::{Deserialize, Serialize};

/// How packets of a connection reach the backend.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Destination address and port rewritten; replies pass back through a
    /// balancer and are rewritten back.
    Nat,
    /// Direct routing: only the destination MAC is rewritten; the backend
    /// answers the client directly, so only the client's direction is seen.
    Dr,
    /// Served by this node's own stack, which answers the client directly.
    Local,
}

impl Method {
    /// Whether the table only ever sees the client's side of the flow (IPVS's
    /// `IP_VS_CONN_F_NOOUTPUT`), which selects the input-only TCP table.
    pub const fn is_input_only(self) -> bool {
        !matches!(self, Method::Nat)
    }

    pub const ALL: [Method; 3] = [Method::Nat, Method::Dr, Method::Local];

    /// The name in config files and status output.
    pub const fn as_str(self) -> &'static str {
        self.name()
    }

    /// The name `ipvsadm -L` shows for the method.
    pub const fn ipvs_name(self) -> &'static str {
        match self {
            Method::Nat => "Masq",
            Method::Dr => "Route",
            Method::Local => "Local",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Method::Nat => "nat",
            Method::Dr => "dr",
            Method::Local => "local",
        }
    }
}

impl core::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown value `{s}`, expected one of nat, dr, local"))
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which end sent a packet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dir {
    /// Client -> VIP:vport (IPVS: input).
    FromClient,
    /// Backend -> client, a reply through us (NAT only; IPVS: output).
    FromBackend,
}

/// The TCP flags byte (byte 13 of the TCP header), as received: the
/// packet views' type, so the dataplane hands it over as parsed.
pub use rewrite::tcp::TcpFlags;

/// What a TCP segment means to the state machine. Precedence, as in IPVS's
/// `tcp_state_idx()`: RST, then SYN, then FIN, then ACK; we split SYN into a
/// bare SYN and a SYN+ACK, which IPVS does not.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TcpInput {
    Syn,
    SynAck,
    Fin,
    Ack,
    Rst,
}

impl TcpInput {
    pub const ALL: [TcpInput; 5] = [
        TcpInput::Syn,
        TcpInput::SynAck,
        TcpInput::Ack,
        TcpInput::Fin,
        TcpInput::Rst,
    ];

    /// `None` for a segment without SYN, FIN, RST or ACK: it refreshes the
    /// entry but changes no state (IPVS: `tcp_state_idx() == -1`).
    pub const fn classify(flags: TcpFlags) -> Option<TcpInput> {
        if flags.contains(TcpFlags::RST) {
            Some(TcpInput::Rst)
        } else if flags.contains(TcpFlags::SYN_ACK) {
            Some(TcpInput::SynAck)
        } else if flags.contains(TcpFlags::SYN) {
            Some(TcpInput::Syn)
        } else if flags.contains(TcpFlags::FIN) {
            Some(TcpInput::Fin)
        } else if flags.contains(TcpFlags::ACK) {
            Some(TcpInput::Ack)
        } else {
            None
        }
    }

    /// A segment that opens a new connection: a SYN without ACK (or RST).
    pub const fn is_new_conn(flags: TcpFlags) -> bool {
        matches!(Self::classify(flags), Some(TcpInput::Syn))
    }

    const fn row(self) -> usize {
        match self {
            TcpInput::Syn => 0,
            TcpInput::SynAck => 1,
            TcpInput::Ack => 2,
            TcpInput::Fin => 3,
            TcpInput::Rst => 4,
        }
    }
}

/// State of a connection. TCP entries use the first eight; every other
/// protocol uses [`ConnState::Udp`] alone.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
#[repr(u8)]
pub enum ConnState {
    /// Created without a SYN seen (a mid-stream pickup, or a synced entry).
    None = 0,
    /// The client's SYN seen, the handshake not complete.
    SynRecv = 1,
    Established = 2,
    /// The backend closed first (its FIN seen), or, input-only, the client
    /// sent its FIN (we will never see the backend's).
    FinWait = 3,
    /// The client closed first (its FIN seen); the backend has not.
    CloseWait = 4,
    /// Both FINs seen, the client's first; waiting for its last ACK.
    LastAck = 5,
    TimeWait = 6,
    Close = 7,
    /// Any non-TCP flow: one state, the UDP timeout.
    Udp = 8,
}

/// Number of states, and of expiry lists.
const N_STATES: usize = 9;

use ConnState::{
    Close as CL, CloseWait as CW, Established as ES, FinWait as FW, LastAck as LA, None as NO,
    SynRecv as SR, TimeWait as TW,
};

// The transition tables, indexed [TcpInput::row()][state as usize] for the
// eight TCP states. See `ConnState::step` for the commented version.
//                               NO  SR  ES  FW  CW  LA  TW  CL
const FROM_CLIENT: [[ConnState; 8]; 5] = [
    /* SYN     */ [SR, SR, ES, SR, SR, SR, SR, SR],
    /* SYN+ACK */ [NO, SR, ES, FW, CW, LA, TW, CL],
    /* ACK     */ [ES, ES, ES, FW, CW, CL, TW, CL],
    /* FIN     */ [CL, TW, CW, TW, CW, LA, TW, CL],
    /* RST     */ [CL, CL, CL, CL, CL, CL, CL, CL],
];
const FROM_BACKEND: [[ConnState; 8]; 5] = [
    /* SYN     */ [NO, SR, ES, FW, CW, LA, TW, CL],
    /* SYN+ACK */ [SR, SR, ES, FW, CW, LA, TW, CL],
    /* ACK     */ [ES, ES, ES, FW, CW, LA, TW, CL],
    /* FIN     */ [TW, TW, FW, FW, LA, LA, TW, CL],
    /* RST     */ [CL, CL, CL, CL, CL, CL, CL, CL],
];
const INPUT_ONLY: [[ConnState; 8]; 5] = [
    /* SYN     */ [SR, SR, ES, SR, SR, SR, SR, SR],
    /* SYN+ACK */ [NO, SR, ES, FW, CW, LA, TW, CL],
    /* ACK     */ [ES, ES, ES, FW, CW, CL, TW, CL],
    /* FIN     */ [CL, TW, FW, FW, CW, LA, TW, CL],
    /* RST     */ [CL, CL, CL, CL, CL, CL, CL, CL],
];

impl ConnState {
    pub const ALL: [ConnState; N_STATES] = [NO, SR, ES, FW, CW, LA, TW, CL, ConnState::Udp];
    pub const TCP: [ConnState; 8] = [NO, SR, ES, FW, CW, LA, TW, CL];

    /// The name IPVS prints (`ipvsadm -lnc`).
    pub const fn name(self) -> &'static str {
        match self {
            ConnState::None => "NONE",
            ConnState::SynRecv => "SYN_RECV",
            ConnState::Established => "ESTABLISHED",
            ConnState::FinWait => "FIN_WAIT",
            ConnState::CloseWait => "CLOSE_WAIT",
            ConnState::LastAck => "LAST_ACK",
            ConnState::TimeWait => "TIME_WAIT",
            ConnState::Close => "CLOSE",
            ConnState::Udp => "UDP",
        }
    }

    /// IPVS counts a connection as active while ESTABLISHED and as inactive
    /// otherwise (`set_tcp_state()`, `IP_VS_CONN_F_INACTIVE`); UDP entries
    /// are inactive too (`ipvsadm` shows them under InActConn).
    pub const fn is_active(self) -> bool {
        matches!(self, ConnState::Established)
    }

    /// The pure TCP transition function.
    ///
    /// `input_only` selects the table for flows of which only the client's
    /// direction is seen (DR and local: [`Method::is_input_only`]); `dir` is
    /// then always [`Dir::FromClient`]. [`ConnState::Udp`] maps to itself.
    ///
    /// Rows are inputs, columns the current state, cells the next state.
    /// Cells marked `*` differ from IPVS's `tcp_states[]`, for the reason
    /// given below each table.
    ///
    /// From the client, NAT (IPVS INPUT):
    ///
    /// | input   | NONE | SYN_RECV | ESTAB | FIN_WAIT  | CLOSE_WAIT | LAST_ACK | TIME_WAIT | CLOSE    |
    /// |---------|------|----------|-------|-----------|------------|----------|-----------|----------|
    /// | SYN     | SR   | SR       | ES    | SR        | SR         | SR       | SR        | SR       |
    /// | SYN+ACK | NO*  | SR*      | ES    | FW*       | CW*        | LA*      | TW*       | CL*      |
    /// | ACK     | ES   | ES       | ES    | FW        | CW         | CL       | TW        | CL       |
    /// | FIN     | CL   | TW       | CW    | TW        | CW         | LA       | TW        | CL       |
    /// | RST     | CL   | CL*      | CL    | CL        | CL         | CL*      | CL        | CL       |
    ///
    /// From the backend, NAT (IPVS OUTPUT; IPVS's SYN_SENT, for connections
    /// the *backend* opens, has no use in a balancer):
    ///
    /// | input   | NONE | SYN_RECV | ESTAB | FIN_WAIT  | CLOSE_WAIT | LAST_ACK | TIME_WAIT | CLOSE    |
    /// |---------|------|----------|-------|-----------|------------|----------|-----------|----------|
    /// | SYN     | NO*  | SR       | ES    | FW*       | CW*        | LA*      | TW*       | CL*      |
    /// | SYN+ACK | SR*  | SR       | ES    | FW*       | CW*        | LA*      | TW*       | CL*      |
    /// | ACK     | ES   | ES       | ES    | FW        | CW         | LA       | TW        | CL       |
    /// | FIN     | TW   | TW       | FW    | FW        | LA*        | LA       | TW        | CL       |
    /// | RST     | CL   | CL       | CL    | CL        | CL         | CL       | CL*       | CL       |
    ///
    /// Input-only, from the client (DR, local; IPVS INPUT-ONLY):
    ///
    /// | input   | NONE | SYN_RECV | ESTAB | FIN_WAIT  | CLOSE_WAIT | LAST_ACK | TIME_WAIT | CLOSE    |
    /// |---------|------|----------|-------|-----------|------------|----------|-----------|----------|
    /// | SYN     | SR   | SR       | ES    | SR        | SR         | SR       | SR        | SR       |
    /// | SYN+ACK | NO*  | SR*      | ES    | FW*       | CW*        | LA*      | TW*       | CL*      |
    /// | ACK     | ES   | ES       | ES    | FW        | CW         | CL       | TW        | CL       |
    /// | FIN     | CL   | TW       | FW    | FW        | CW         | LA       | TW        | CL       |
    /// | RST     | CL   | CL*      | CL    | CL        | CL         | CL*      | CL        | CL       |
    ///
    /// Why the differences:
    /// - SYN and SYN+ACK are one input in IPVS. We split them: a SYN+ACK from
    ///   the client, or a bare SYN from the backend, is not part of a
    ///   connection the client opened and changes nothing; a SYN+ACK from the
    ///   backend moves NONE to SYN_RECV (the client's SYN was missed) and
    ///   leaves every later state alone (a late retransmission), where IPVS
    ///   would go to SYN_SENT.
    /// - RST always closes. IPVS ignores a client RST in SYN_RECV and
    ///   LAST_ACK and a backend RST in TIME_WAIT; CLOSE holds the entry for 10 s
    ///   instead of 60 s / 30 s / 120 s, which frees the slot sooner.
    /// - CLOSE_WAIT + FIN from the backend goes to LAST_ACK (IPVS: TIME_WAIT):
    ///   the client closed first, so it is the client that will sit in
    ///   TIME_WAIT; what we wait for is its last ACK, which moves LAST_ACK to
    ///   CLOSE as in IPVS.
    ///
    /// With only the client's side seen, an input-only flow closes as
    /// ESTABLISHED -(client FIN)-> FIN_WAIT, where it stays until it expires
    /// (FIN_WAIT timeout) or the client reuses the port
    /// ([`Entry::reused_by`]).
    ///
    /// A SYN on TIME_WAIT or CLOSE goes to SYN_RECV here as in IPVS, but the
    /// caller should have asked [`ConnTable::lookup_client`] first, which
    /// reports that case as a port reuse to be scheduled anew.
    pub const fn step(self, dir: Dir, input_only: bool, input: TcpInput) -> ConnState {
        let col = self as usize;
        if col >= 8 {
            return self;
        }
        let table = match (dir, input_only) {
            (Dir::FromBackend, _) => &FROM_BACKEND,
            (Dir::FromClient, false) => &FROM_CLIENT,
            (Dir::FromClient, true) => &INPUT_ONLY,
        };
        table[input.row()][col]
    }
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Idle timeouts per state, like IPVS's `tcp_timeouts[]` / `udp_timeouts[]`
/// (`ipvsadm --set tcp tcpfin udp` sets three of them). The defaults are
/// mainline IPVS's (`net/netfilter/ipvs/ip_vs_proto_tcp.c`,
/// `ip_vs_proto_udp.c`), including SYN_RECV = 60 s (`1*60*HZ`); the 30 s
/// SYN_RECV seen in some trees is from out-of-tree forks that also shorten
/// ESTABLISHED to 90 s, not from the kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Timeouts {
    /// NONE (a TCP entry created without a SYN): 2 s.
    pub none: Duration,
    pub syn_recv: Duration,
    pub established: Duration,
    pub fin_wait: Duration,
    pub close_wait: Duration,
    pub last_ack: Duration,
    pub time_wait: Duration,
    pub close: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            none: Duration::from_secs(2),
            syn_recv: Duration::from_secs(60),
            established: Duration::from_secs(900),
            fin_wait: Duration::from_secs(120),
            close_wait: Duration::from_secs(60),
            last_ack: Duration::from_secs(30),
            time_wait: Duration::from_secs(120),
            close: Duration::from_secs(10),
            udp: Duration::from_secs(300),
        }
    }
}

impl Timeouts {
    pub const fn for_state(&self, state: ConnState) -> Duration {
        match state {
            ConnState::None => self.none,
            ConnState::SynRecv => self.syn_recv,
            ConnState::Established => self.established,
            ConnState::FinWait => self.fin_wait,
            ConnState::CloseWait => self.close_wait,
            ConnState::LastAck => self.last_ack,
            ConnState::TimeWait => self.time_wait,
            ConnState::Close => self.close,
            ConnState::Udp => self.udp,
        }
    }

    /// Milliseconds per state, saturating (a timeout of 584 million years is
    /// as good as forever).
    fn to_ms(self) -> [u64; N_STATES] {
        ConnState::ALL.map(|s| u64::try_from(self.for_state(s).as_millis()).unwrap_or(u64::MAX))
    }
}

/// Why the table refused something. `Copy` and allocation-free: the packet
/// path counts these and drops the packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("connection table full")]
    TableFull,
    #[error("flow already in the connection table")]
    Exists,
    /// Another NAT entry already expects replies on the same
    /// backend:port -> client:cport (the same client port to two VIPs or
    /// vports mapped onto one backend port); the caller may pick another
    /// backend or drop.
    #[error("reply flow already used by another connection")]
    ReplyKeyInUse,
    #[error("max_entries {0} is above the limit of {MAX_CAPACITY}")]
    CapacityTooLarge(usize),
}

/// Largest `max_entries` accepted: 16 Mi entries, about 3.7 GB with the maps
/// (see [`ConnTable::new`]); slot indexes are `u32`.
pub const MAX_CAPACITY: usize = 1 << 24;

/// Names an entry: slot index and the slot's generation, so an id kept after
/// its entry was removed is stale rather than pointing at a newer entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ConnId {
    index: u32,
    generation: u32,
}

impl ConnId {
    pub const fn index(self) -> u32 {
        self.index
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.index, self.generation)
    }
}

/// What the scheduler decided for a new flow.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NewConn {
    /// The flow as the client sent it: client -> VIP:vport.
    pub key: FlowKey,
    /// Index of the service in the running config.
    pub service: u16,
    /// Index of the backend within the service.
    pub backend: u16,
    /// Where packets go: the backend's address and port for NAT; the VIP and
    /// vport (the key's destination) for DR and local.
    pub backend_addr: Ipv4Addr,
    pub backend_port: u16,
    pub method: Method,
    /// Source MAC of the client's frame: the next hop toward the client, for
    /// sending NAT replies back.
    pub client_mac: [u8; 6],
    /// The client's initial sequence number, when the flow was scheduled on
    /// its SYN (see [`Entry::reused_by`]).
    pub isn: Option<u32>,
}

/// One connection. Handed out by reference only: the table owns the state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry {
    /// Client -> VIP:vport, as received.
    pub key: FlowKey,
    pub backend_addr: Ipv4Addr,
    pub backend_port: u16,
    pub service: u16,
    pub backend: u16,
    pub method: Method,
    pub state: ConnState,
    pub client_mac: [u8; 6],
    /// Time of the last packet (or of insertion), in the caller's clock.
    pub last_seen_ms: u64,
    /// When this node last sent the entry to its peers (connection sync),
    /// or was inserted, as the low 32 bits of the caller's clock (see
    /// [`Entry::since_synced_ms`]; [`ConnTable::mark_synced`]).
    pub synced_ms: u32,
    /// The client's initial sequence number if this node scheduled the flow
    /// on its SYN, else 0 (an ISN of 0 is taken as unknown: such a
    /// connection's copies count as port reuse, as they did before).
    /// Plain `u32` rather than `Option`: the entry stays 48 bytes.
    pub isn: u32,
}

impl Entry {
    /// Milliseconds since the entry was last sent to the peers (exact for
    /// intervals under 49 days: the stamp wraps).
    pub const fn since_synced_ms(&self, now_ms: u64) -> u32 {
        (now_ms as u32).wrapping_sub(self.synced_ms)
    }

    /// The key replies arrive with, backend:port -> client:cport, for NAT
    /// entries; `None` for DR and local, whose replies bypass us.
    pub const fn reply_key(&self) -> Option<FlowKey> {
        match self.method {
            Method::Nat => Some(FlowKey::new(
                self.key.proto,
                self.backend_addr,
                self.backend_port,
                self.key.src,
                self.key.src_port,
            )),
            Method::Dr | Method::Local => None,
        }
    }

    /// Whether a client segment with `flags` opens a new connection on the
    /// port of this one, which is over: a bare SYN on TIME_WAIT or CLOSE, or,
    /// for input-only flows, on FIN_WAIT (where they end: see
    /// [`ConnState::step`]). This is IPVS's `is_new_conn_expected()` with
    /// `conn_reuse_mode` bit 2 set. The caller removes the old entry and
    /// schedules the SYN like a new flow, so that a port reused after a
    /// backend was drained does not stick to it.
    pub const fn reused_by(&self, flags: TcpFlags) -> bool {
        self.key.proto == proto::TCP
            && TcpInput::is_new_conn(flags)
            && match self.state {
                ConnState::TimeWait | ConnState::Close => true,
                ConnState::FinWait => self.method.is_input_only(),
                _ => false,
            }
    }
}

/// A state change (or none: `from == to`) caused by a packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Transition {
    pub from: ConnState,
    pub to: ConnState,
}

impl Transition {
    pub const fn changed(self) -> bool {
        self.from as u8 != self.to as u8
    }

    /// The entry just became active: count it as an active connection of its
    /// backend (and no longer as an inactive one).
    pub const fn activated(self) -> bool {
        !self.from.is_active() && self.to.is_active()
    }

    /// The entry just stopped being active.
    pub const fn deactivated(self) -> bool {
        self.from.is_active() && !self.to.is_active()
    }
}

/// Answer of [`ConnTable::lookup_client`] for a packet from a client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClientLookup {
    /// No entry: schedule the flow.
    New,
    /// Forward by this entry, then [`ConnTable::update`] it.
    Existing(ConnId),
    /// The client reused the port of a finished connection
    /// ([`Entry::reused_by`]): [`ConnTable::remove`] this entry (settling
    /// its counters), then schedule the packet as a new flow.
    Reused(ConnId),
    /// A SYN on a finished connection with the sequence number of the SYN
    /// that opened it: a copy of that SYN, not a new connection (a late
    /// duplicate, or the copy a leaving peer passes on after this node, the
    /// new owner, got the multicast one and the whole connection ran).
    /// Drop it: scheduled afresh it would reach another real server, whose
    /// SYN-ACK the client answers with a reset.
    StaleSyn(ConnId),
}

/// End of a list.
const NIL: u32 = u32::MAX;

struct Slot {
    entry: Option<Entry>,
    generation: u32,
    /// Neighbours in the entry's state list; `next` links the free list
    /// while the slot is vacant.
    prev: u32,
    next: u32,
}

#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY_LIST: List = List {
    head: NIL,
    tail: NIL,
};

/// The bounded connection table. See the module documentation.
pub struct ConnTable {
    slots: Vec<Slot>,
    free_head: u32,
    len: usize,
    forward: HashMap<FlowKey, u32, RandomState>,
    reply: HashMap<FlowKey, u32, RandomState>,
    /// One list per state, in last-seen (and so expiry) order.
    lists: [List; N_STATES],
    timeouts: Timeouts,
    timeout_ms: [u64; N_STATES],
    /// The latest `now_ms` seen: time never goes back inside the table.
    clock_ms: u64,
    /// The list `expire` starts from, rotated so that a flood of expiries in
    /// one state does not starve the others when `max` is reached.
    expire_cursor: usize,
}

impl fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnTable")
            .field("len", &self.len)
            .field("capacity", &self.slots.len())
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl ConnTable {
    /// A table for at most `max_entries` connections, all memory allocated
    /// now (x86_64): a 56-byte slot per entry for the slab, and for each of
    /// the two maps `2 * max_entries * 8 / 7` buckets rounded up to a power
    /// of two, 21 bytes each: 150 to 250 bytes per entry in all, 17 MB for
    /// 100 000 entries, 235 MB for 1 Mi.
    pub fn new(max_entries: usize, timeouts: Timeouts) -> Result<ConnTable, ConntrackError> {
        if max_entries > MAX_CAPACITY {
            return Err(ConntrackError::CapacityTooLarge(max_entries));
        }
        let mut slots = Vec::with_capacity(max_entries);
        for i in 0..max_entries {
            // i < MAX_CAPACITY < u32::MAX
            let next = if i + 1 < max_entries {
                (i + 1) as u32
            } else {
                NIL
            };
            slots.push(Slot {
                entry: None,
                generation: 0,
                prev: NIL,
                next,
            });
        }
        let reserve = max_entries.saturating_mul(2);
        Ok(ConnTable {
            slots,
            free_head: if max_entries > 0 { 0 } else { NIL },
            len: 0,
            forward: HashMap::with_capacity_and_hasher(reserve, RandomState::default()),
            reply: HashMap::with_capacity_and_hasher(reserve, RandomState::default()),
            lists: [EMPTY_LIST; N_STATES],
            timeouts,
            timeout_ms: timeouts.to_ms(),
            clock_ms: 0,
            expire_cursor: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `max_entries`.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// New timeouts apply at once to every entry, expiry being computed as
    /// last-seen + timeout of the current state (IPVS applies them at each
    /// entry's next packet).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
        self.timeout_ms = timeouts.to_ms();
    }

    /// When `entry` expires if no packet refreshes it: it is removed by the
    /// first [`ConnTable::expire`] with `now_ms >=` this.
    pub fn expires_ms(&self, entry: &Entry) -> u64 {
        entry
            .last_seen_ms
            .saturating_add(self.timeout_ms[entry.state as usize])
    }

    /// The earliest expiry of any entry, for the caller to sleep until.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.lists
            .iter()
            .filter_map(|l| self.entry_at(l.head))
            .map(|e| self.expires_ms(e))
            .min()
    }

    /// The entry of a client -> VIP:vport flow.
    pub fn lookup(&self, key: &FlowKey) -> Option<ConnId> {
        self.forward.get(key).map(|&i| self.id_of(i))
    }

    /// The NAT entry a reply backend:port -> client:cport belongs to.
    pub fn lookup_reply(&self, key: &FlowKey) -> Option<ConnId> {
        self.reply.get(key).map(|&i| self.id_of(i))
    }

    /// Looks up a client packet (its TCP flags and sequence number) and tells
    /// whether it reuses the port of a finished connection. Changes nothing.
    pub fn lookup_client(&self, key: &FlowKey, flags: TcpFlags, seq: u32) -> ClientLookup {
        let Some(&index) = self.forward.get(key) else {
            return ClientLookup::New;
        };
        let id = self.id_of(index);
        match self.entry_at(index) {
            Some(e) if e.reused_by(flags) => {
                if e.isn != 0 && e.isn == seq {
                    ClientLookup::StaleSyn(id)
                } else {
                    ClientLookup::Reused(id)
                }
            }
            Some(_) => ClientLookup::Existing(id),
            // Unreachable while the maps and slab agree; treat as a miss.
            None => ClientLookup::New,
        }
    }

    /// Records that the entry was sent to the peers at `now_ms`.
    pub fn mark_synced(&mut self, id: ConnId, now_ms: u64) {
        if let Some(slot) = self.slots.get_mut(id.index as usize)
            && slot.generation == id.generation
            && let Some(e) = slot.entry.as_mut()
        {
            e.synced_ms = now_ms as u32;
        }
    }

    pub fn get(&self, id: ConnId) -> Option<&Entry> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_ref()
    }

    /// Every entry, in slab order, for status output (not for the packet path).
    pub fn iter(&self) -> impl Iterator<Item = (ConnId, &Entry)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let e = s.entry.as_ref()?;
            Some((
                ConnId {
                    index: i as u32,
                    generation: s.generation,
                },
                e,
            ))
        })
    }

    /// Adds a flow scheduled on its first packet, whose flags set the initial
    /// TCP state (NONE stepped by that packet: a SYN gives SYN_RECV, a
    /// mid-stream ACK ESTABLISHED). Non-TCP flows get [`ConnState::Udp`].
    ///
    /// Fails, changing nothing, if the key is present, if a NAT entry's reply
    /// key is taken, or if the table is full.
    pub fn insert(
        &mut self,
        conn: NewConn,
        flags: TcpFlags,
        now_ms: u64,
    ) -> Result<ConnId, ConntrackError> {
        let state = match TcpInput::classify(flags) {
            Some(input) => {
                ConnState::None.step(Dir::FromClient, conn.method.is_input_only(), input)
            }
            None => ConnState::None,
        };
        self.insert_with_state(conn, state, now_ms)
    }

    /// Adds a flow in a given state (connection sync). The state is coerced
    /// to the protocol: `Udp` for non-TCP, and `Udp` on TCP becomes NONE.
    pub fn insert_with_state(
        &mut self,
        conn: NewConn,
        state: ConnState,
        now_ms: u64,
    ) -> Result<ConnId, ConntrackError> {
        let now = self.advance_clock(now_ms);
        let state = match (conn.key.proto == proto::TCP, state) {
            (false, _) => ConnState::Udp,
            (true, ConnState::Udp) => ConnState::None,
            (true, s) => s,
        };
        let entry = Entry {
            key: conn.key,
            backend_addr: conn.backend_addr,
            backend_port: conn.backend_port,
            service: conn.service,
            backend: conn.backend,
            method: conn.method,
            state,
            client_mac: conn.client_mac,
            last_seen_ms: now,
            synced_ms: now as u32,
            isn: conn.isn.unwrap_or(0),
        };
        if self.forward.contains_key(&entry.key) {
            return Err(ConntrackError::Exists);
        }
        let reply_key = entry.reply_key();
        if let Some(rk) = reply_key
            && self.reply.contains_key(&rk)
        {
            return Err(ConntrackError::ReplyKeyInUse);
        }
        let index = self.free_head;
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return Err(ConntrackError::TableFull);
        };
        self.free_head = slot.next;
        slot.entry = Some(entry);
        slot.prev = NIL;
        slot.next = NIL;
        let id = ConnId {
            index,
            generation: slot.generation,
        };
        self.forward.insert(entry.key, index);
        if let Some(rk) = reply_key {
            self.reply.insert(rk, index);
        }
        self.len += 1;
        self.link_tail(state as usize, index);
        Ok(id)
    }

    /// Accounts a packet of an existing entry: steps its TCP state (see
    /// [`ConnState::step`]) and refreshes its expiry. `None` if `id` is stale.
    pub fn update(
        &mut self,
        id: ConnId,
        dir: Dir,
        flags: TcpFlags,
        now_ms: u64,
    ) -> Option<Transition> {
        let now = self.advance_clock(now_ms);
        let index = id.index;
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let entry = slot.entry.as_mut()?;
        let from = entry.state;
        let to = match TcpInput::classify(flags) {
            Some(input) => from.step(dir, entry.method.is_input_only(), input),
            None => from,
        };
        let transition = Transition { from, to };
        if to != from {
            tracing::trace!(conn = %id, flow = %entry.key, ?dir, "state={from}=>{to}");
        }
        if to == from && entry.last_seen_ms == now {
            // Same list, same position in last-seen order: nothing to move.
            return Some(transition);
        }
        entry.state = to;
        entry.last_seen_ms = now;
        self.unlink(from as usize, index);
        self.link_tail(to as usize, index);
        Some(transition)
    }

    /// Removes an entry, returning it; `None` if `id` is stale.
    pub fn remove(&mut self, id: ConnId) -> Option<Entry> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation || slot.entry.is_none() {
            return None;
        }
        self.remove_index(id.index)
    }

    /// Removes at most `max` entries whose expiry is `<= now_ms`, calling
    /// `on_expired` with each before it is dropped, and returns how many.
    /// Work is O(`max`) plus one look at each state list's head: entries that
    /// are not due are never visited. Called periodically by the dataplane
    /// with a small `max`, so that a burst of expiries is spread over calls.
    pub fn expire(&mut self, now_ms: u64, max: usize, mut on_expired: impl FnMut(&Entry)) -> usize {
        let now = self.advance_clock(now_ms);
        let mut removed = 0;
        for k in 0..N_STATES {
            let list = (self.expire_cursor + k) % N_STATES;
            let timeout = self.timeout_ms[list];
            loop {
                if removed >= max {
                    // Start after this list next time, fair to the others.
                    self.expire_cursor = (list + 1) % N_STATES;
                    return removed;
                }
                let head = self.lists[list].head;
                let Some(e) = self.entry_at(head) else { break };
                if e.last_seen_ms.saturating_add(timeout) > now {
                    break;
                }
                if let Some(entry) = self.remove_index(head) {
                    on_expired(&entry);
                    removed += 1;
                } else {
                    break;
                }
            }
        }
        removed
    }

    fn advance_clock(&mut self, now_ms: u64) -> u64 {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.clock_ms
    }

    fn id_of(&self, index: u32) -> ConnId {
        let generation = self.slots.get(index as usize).map_or(0, |s| s.generation);
        ConnId { index, generation }
    }

    fn entry_at(&self, index: u32) -> Option<&Entry> {
        self.slots.get(index as usize)?.entry.as_ref()
    }

    fn remove_index(&mut self, index: u32) -> Option<Entry> {
        let entry = self.slots.get_mut(index as usize)?.entry.take()?;
        self.unlink(entry.state as usize, index);
        self.forward.remove(&entry.key);
        if let Some(rk) = entry.reply_key() {
            self.reply.remove(&rk);
        }
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.generation = slot.generation.wrapping_add(1);
            slot.prev = NIL;
            slot.next = self.free_head;
            self.free_head = index;
        }
        self.len = self.len.saturating_sub(1);
        Some(entry)
    }

    /// Appends slot `index` to the list of state `list`.
    fn link_tail(&mut self, list: usize, index: u32) {
        let Some(l) = self.lists.get_mut(list) else {
            return;
        };
        let old_tail = core::mem::replace(&mut l.tail, index);
        if old_tail == NIL {
            l.head = index;
        } else if let Some(t) = self.slots.get_mut(old_tail as usize) {
            t.next = index;
        }
        if let Some(s) = self.slots.get_mut(index as usize) {
            s.prev = old_tail;
            s.next = NIL;
        }
    }

    /// Takes slot `index` out of the list of state `list`.
    fn unlink(&mut self, list: usize, index: u32) {
        let Some(s) = self.slots.get(index as usize) else {
            return;
        };
        let (prev, next) = (s.prev, s.next);
        if prev != NIL {
            if let Some(p) = self.slots.get_mut(prev as usize) {
                p.next = next;
            }
        } else if let Some(l) = self.lists.get_mut(list) {
            l.head = next;
        }
        if next != NIL {
            if let Some(n) = self.slots.get_mut(next as usize) {
                n.prev = prev;
            }
        } else if let Some(l) = self.lists.get_mut(list) {
            l.tail = prev;
        }
    }
}

#[cfg(test)]
mod tests;
