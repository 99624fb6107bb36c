//! Membership heartbeats: each node sends, every interval, an authenticated
//! message {node id, priority, weight, load, config digest, epoch, sequence};
//! a node is dead after 3 missed intervals. Pure: time is a parameter.
//!
//! # Wire format (big endian, 84 bytes)
//! | off | len | field |
//! |-----|-----|-------|
//! | 0   | 4   | magic `HBM1` |
//! | 4   | 4   | node id |
//! | 8   | 1   | priority |
//! | 9   | 1   | reserved, zero |
//! | 10  | 2   | weight |
//! | 12  | 2   | load (permille) |
//! | 14  | 2   | interval (ms, the sender's) |
//! | 16  | 16  | config digest (first 16 bytes of SHA-256 of the config) |
//! | 32  | 8   | epoch (bucket-table epoch the sender holds) |
//! | 40  | 8   | sequence |
//! | 48  | 32  | HMAC-SHA256(key, bytes 0..48) |
//! | 80  | 4   | reserved, zero (covered by nothing; must be zero) |
//!
//! # Sequence numbers across restarts
//! `sequence = max(previous + 1, unix time in microseconds)`. While a node
//! runs the value grows by at least one per message; after a restart it
//! starts at the current wall-clock time in µs, which is larger than any
//! value sent before (a node never sends a million messages per second, so
//! the counter never runs ahead of the clock) provided the clock did not go
//! back across the restart. Receivers accept only a sequence strictly
//! greater than the last accepted one from that node, so replays are
//! refused. A receiver that restarted knows no history and would accept a
//! replay once; `max_age` (optional, needs NTP on the nodes) closes that by
//! refusing messages whose sequence is older than the receiver's wall clock
//! minus `max_age`.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const MAGIC: [u8; 4] = *b"HBM1";
pub const MSG_LEN: usize = 84;
const MAC_AT: usize = 48;

/// One heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Heartbeat {
    pub node_id: u32,
    pub priority: u8,
    pub weight: u16,
    pub load: u16,
    pub interval_ms: u16,
    pub config_digest: [u8; 16],
    pub epoch: u64,
    pub sequence: u64,
}

/// Why a heartbeat was refused. `Copy`; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    Truncated,
    BadMagic,
    BadMac,
    Replay,
    Stale,
    UnknownNode,
    FromSelf,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Truncated,
        Refusal::BadMagic,
        Refusal::BadMac,
        Refusal::Replay,
        Refusal::Stale,
        Refusal::UnknownNode,
        Refusal::FromSelf,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Truncated => "truncated",
            Refusal::BadMagic => "bad_magic",
            Refusal::BadMac => "auth",
            Refusal::Replay => "replay",
            Refusal::Stale => "stale",
            Refusal::UnknownNode => "unknown_node",
            Refusal::FromSelf => "from_self",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Length of the HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

fn mac_of(key: &[u8], body: &[u8]) -> Option<HmacSha256> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).ok()?;
    m.update(body);
    Some(m)
}

/// HMAC-SHA256(`key`, `body`): the authentication of every cluster message
/// (membership heartbeats here, connection sync in the balancer).
pub fn sign(key: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
    let mut out = [0u8; MAC_LEN];
    // HMAC accepts keys of any length, so this cannot fail.
    if let Some(m) = mac_of(key, body) {
        out.copy_from_slice(&m.finalize().into_bytes());
    }
    out
}

/// Checks `tag` against HMAC-SHA256(`key`, `body`) in constant time.
pub fn verify(key: &[u8], body: &[u8], tag: &[u8]) -> bool {
    mac_of(key, body).is_some_and(|m| m.verify_slice(tag).is_ok())
}

/// The receiver's replay check, per sender (see the module docs): a sequence
/// must be strictly greater than the last accepted one from the same sender,
/// and, with `max_age`, not older than the receiver's wall clock minus
/// `max_age`. Shared by membership heartbeats and connection sync.
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    max_age: Option<Duration>,
    last: BTreeMap<u32, u64>,
}

impl ReplayGuard {
    pub fn new(max_age: Option<Duration>) -> Self {
        ReplayGuard {
            max_age,
            last: BTreeMap::new(),
        }
    }

    /// Whether `sequence` from `sender` may be accepted; changes nothing.
    /// [`Refusal::Stale`] is checked before [`Refusal::Replay`].
    pub fn check(&self, sender: u32, sequence: u64, unix_micros: u64) -> Result<(), Refusal> {
        if let Some(max) = self.max_age {
            let floor = unix_micros.saturating_sub(max.as_micros() as u64);
            if sequence < floor {
                return Err(Refusal::Stale);
            }
        }
        if self.last.get(&sender).is_some_and(|&l| sequence <= l) {
            return Err(Refusal::Replay);
        }
        Ok(())
    }

    /// Records `sequence` as the last accepted from `sender` (call only after
    /// the message passed every other check).
    pub fn accept(&mut self, sender: u32, sequence: u64) {
        let l = self.last.entry(sender).or_insert(0);
        *l = (*l).max(sequence);
    }

    /// The last accepted sequence from `sender`.
    pub fn last(&self, sender: u32) -> Option<u64> {
        self.last.get(&sender).copied()
    }
}

impl Heartbeat {
    /// Serialises and authenticates with `key`.
    pub fn encode(&self, key: &[u8]) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.node_id.to_be_bytes());
        b[8] = self.priority;
        b[10..12].copy_from_slice(&self.weight.to_be_bytes());
        b[12..14].copy_from_slice(&self.load.to_be_bytes());
        b[14..16].copy_from_slice(&self.interval_ms.to_be_bytes());
        b[16..32].copy_from_slice(&self.config_digest);
        b[32..40].copy_from_slice(&self.epoch.to_be_bytes());
        b[40..48].copy_from_slice(&self.sequence.to_be_bytes());
        let tag = sign(key, &b[..MAC_AT]);
        b[MAC_AT..MAC_AT + MAC_LEN].copy_from_slice(&tag);
        b
    }

    /// Checks length, magic and the HMAC (constant time), then reads.
    pub fn decode(b: &[u8], key: &[u8]) -> Result<Heartbeat, Refusal> {
        if b.len() != MSG_LEN {
            return Err(Refusal::Truncated);
        }
        if b[0..4] != MAGIC {
            return Err(Refusal::BadMagic);
        }
        if !verify(key, &b[..MAC_AT], &b[MAC_AT..MAC_AT + MAC_LEN]) {
            return Err(Refusal::BadMac);
        }
        let u16at = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
        let u64at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_be_bytes(x)
        };
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&b[16..32]);
        Ok(Heartbeat {
            node_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            priority: b[8],
            weight: u16at(10),
            load: u16at(12),
            interval_ms: u16at(14),
            config_digest: digest,
            epoch: u64at(32),
            sequence: u64at(40),
        })
    }
}

/// The sender's sequence generator (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct SequenceGen {
    last: u64,
}

impl SequenceGen {
    pub fn next(&mut self, unix_micros: u64) -> u64 {
        self.last = unix_micros.max(self.last.saturating_add(1));
        self.last
    }
}

/// What we know about one peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub node_id: u32,
    pub alive: bool,
    pub last: Option<Heartbeat>,
    /// Monotonic time of the last accepted heartbeat.
    #[serde(skip)]
    pub last_seen: Option<Duration>,
    pub accepted: u64,
    /// Source address of the last accepted heartbeat (director mode passes
    /// flows to a node at this address's MAC).
    pub addr: Option<std::net::Ipv4Addr>,
}

/// A change in the live set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberEvent {
    Up(u32),
    Down(u32),
}

/// The membership table. Only configured node ids are accepted.
#[derive(Debug, Clone)]
pub struct Membership {
    self_id: u32,
    interval: Duration,
    /// Dead after this many missed intervals (3).
    pub dead_after: u32,
    guard: ReplayGuard,
    members: BTreeMap<u32, Member>,
    pub refused: BTreeMap<&'static str, u64>,
}

impl Membership {
    pub fn new(self_id: u32, peers: &[u32], interval: Duration, max_age: Option<Duration>) -> Self {
        let members = peers
            .iter()
            .filter(|&&p| p != self_id)
            .map(|&p| {
                (
                    p,
                    Member {
                        node_id: p,
                        alive: false,
                        last: None,
                        last_seen: None,
                        accepted: 0,
                        addr: None,
                    },
                )
            })
            .collect();
        let refused = Refusal::ALL.iter().map(|r| (r.name(), 0)).collect();
        Membership {
            self_id,
            interval,
            dead_after: 3,
            guard: ReplayGuard::new(max_age),
            members,
            refused,
        }
    }

    fn refuse(&mut self, r: Refusal) -> Result<Option<MemberEvent>, Refusal> {
        *self.refused.entry(r.name()).or_insert(0) += 1;
        Err(r)
    }

    /// Handles one received datagram at monotonic `now` and wall clock
    /// `unix_micros`. A refused message changes nothing but its counter.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        key: &[u8],
        now: Duration,
        unix_micros: u64,
    ) -> Result<Option<MemberEvent>, Refusal> {
        let hb = match Heartbeat::decode(bytes, key) {
            Ok(h) => h,
            Err(r) => return self.refuse(r),
        };
        if hb.node_id == self.self_id {
            return self.refuse(Refusal::FromSelf);
        }
        if let Err(r) = self.guard.check(hb.node_id, hb.sequence, unix_micros) {
            return self.refuse(r);
        }
        let Some(m) = self.members.get_mut(&hb.node_id) else {
            return self.refuse(Refusal::UnknownNode);
        };
        self.guard.accept(hb.node_id, hb.sequence);
        let was = m.alive;
        m.alive = true;
        m.last = Some(hb);
        m.last_seen = Some(now);
        m.accepted += 1;
        Ok((!was).then_some(MemberEvent::Up(hb.node_id)))
    }

    /// Marks peers dead whose last heartbeat is older than `dead_after`
    /// intervals (their own advertised interval if they sent one).
    pub fn expire(&mut self, now: Duration) -> Vec<MemberEvent> {
        let mut ev = Vec::new();
        for m in self.members.values_mut() {
            if !m.alive {
                continue;
            }
            let iv = m
                .last
                .map(|h| Duration::from_millis(u64::from(h.interval_ms)))
                .filter(|d| !d.is_zero())
                .unwrap_or(self.interval);
            if m.last_seen.is_some_and(|t| now >= t + iv * self.dead_after) {
                m.alive = false;
                ev.push(MemberEvent::Down(m.node_id));
            }
        }
        ev
    }

    /// The next time `expire` could change anything.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.members
            .values()
            .filter(|m| m.alive)
            .filter_map(|m| {
                let iv = m
                    .last
                    .map(|h| Duration::from_millis(u64::from(h.interval_ms)))
                    .unwrap_or(self.interval);
                m.last_seen.map(|t| t + iv * self.dead_after)
            })
            .min()
    }

    /// Records where a member's accepted heartbeat came from.
    pub fn note_addr(&mut self, node_id: u32, addr: std::net::Ipv4Addr) {
        if let Some(m) = self.members.get_mut(&node_id) {
            m.addr = Some(addr);
        }
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Live node ids including ourselves, sorted.
    pub fn live(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .members
            .values()
            .filter(|m| m.alive)
            .map(|m| m.node_id)
            .collect();
        v.push(self.self_id);
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"shared secret";
    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
    fn hb(node: u32, seq: u64) -> Heartbeat {
        Heartbeat {
            node_id: node,
            priority: 100,
            weight: 10,
            load: 250,
            interval_ms: 100,
            config_digest: [7; 16],
            epoch: 3,
            sequence: seq,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let h = hb(2, 1_700_000_000_000_000);
        assert_eq!(Heartbeat::decode(&h.encode(KEY), KEY), Ok(h));
    }

    #[test]
    fn wrong_key_and_tampering_refused() {
        let b = hb(2, 1).encode(KEY);
        assert_eq!(Heartbeat::decode(&b, b"other"), Err(Refusal::BadMac));
        for i in 0..MAC_AT + 32 {
            let mut t = b;
            t[i] ^= 0x01;
            assert!(Heartbeat::decode(&t, KEY).is_err(), "byte {i}");
        }
        assert_eq!(Heartbeat::decode(&b[..80], KEY), Err(Refusal::Truncated));
    }

    #[test]
    fn sequence_grows_and_survives_restart() {
        let mut g = SequenceGen::default();
        assert_eq!(g.next(1000), 1000);
        assert_eq!(g.next(1000), 1001);
        assert_eq!(g.next(999), 1002);
        // Restarted a second later: fresh generator, still larger.
        let mut g2 = SequenceGen::default();
        assert!(g2.next(1_001_000) > 1002);
    }

    #[test]
    fn sign_verify_and_replay_guard_are_reusable() {
        let tag = sign(KEY, b"body");
        assert!(verify(KEY, b"body", &tag));
        assert!(!verify(KEY, b"bodY", &tag));
        assert!(!verify(b"other", b"body", &tag));
        assert!(!verify(KEY, b"body", &tag[..31]));
        let mut g = ReplayGuard::new(Some(Duration::from_secs(1)));
        let now_us = 10_000_000;
        assert_eq!(g.check(7, now_us, now_us), Ok(()));
        g.accept(7, now_us);
        assert_eq!(g.check(7, now_us, now_us), Err(Refusal::Replay));
        assert_eq!(g.check(8, now_us, now_us), Ok(()), "per sender");
        assert_eq!(g.check(7, 1, now_us), Err(Refusal::Stale));
        assert_eq!(g.check(7, now_us + 1, now_us), Ok(()));
        assert_eq!(g.last(7), Some(now_us));
    }

    #[test]
    fn live_then_dead_after_three_missed_intervals() {
        let mut m = Membership::new(1, &[1, 2, 3], ms(100), None);
        assert_eq!(
            m.receive(&hb(2, 10).encode(KEY), KEY, ms(0), 0),
            Ok(Some(MemberEvent::Up(2)))
        );
        assert_eq!(m.receive(&hb(2, 11).encode(KEY), KEY, ms(100), 0), Ok(None));
        assert_eq!(m.live(), vec![1, 2]);
        assert_eq!(m.next_deadline(), Some(ms(400)));
        assert!(m.expire(ms(399)).is_empty());
        assert_eq!(m.expire(ms(400)), vec![MemberEvent::Down(2)]);
        assert_eq!(m.live(), vec![1]);
        // Back with a new, larger sequence (restart).
        assert_eq!(
            m.receive(&hb(2, 5_000).encode(KEY), KEY, ms(900), 0),
            Ok(Some(MemberEvent::Up(2)))
        );
    }

    #[test]
    fn refused_messages_change_nothing_and_are_counted() {
        let mut m = Membership::new(1, &[1, 2], ms(100), Some(Duration::from_secs(30)));
        let now_us = 100_000_000;
        m.receive(&hb(2, now_us).encode(KEY), KEY, ms(0), now_us)
            .expect("fresh");
        let before: Vec<Member> = m.members().cloned().collect();
        let cases: Vec<(Vec<u8>, Refusal)> = vec![
            (hb(2, now_us).encode(KEY).to_vec(), Refusal::Replay),
            (hb(2, now_us - 1).encode(KEY).to_vec(), Refusal::Replay),
            (hb(2, now_us + 1).encode(b"wrong").to_vec(), Refusal::BadMac),
            (hb(9, now_us + 1).encode(KEY).to_vec(), Refusal::UnknownNode),
            (hb(1, now_us + 1).encode(KEY).to_vec(), Refusal::FromSelf),
            (hb(2, 1).encode(KEY).to_vec(), Refusal::Stale),
            (vec![0x55; 84], Refusal::BadMagic),
            (vec![1, 2, 3], Refusal::Truncated),
        ];
        let mut expect: BTreeMap<&str, u64> = BTreeMap::new();
        for (bytes, why) in cases {
            assert_eq!(m.receive(&bytes, KEY, ms(50), now_us), Err(why));
            *expect.entry(why.name()).or_insert(0) += 1;
            assert_eq!(m.refused[why.name()], expect[why.name()], "{why:?}");
        }
        let after: Vec<Member> = m.members().cloned().collect();
        assert_eq!(before, after);
    }
}
