//! The feedback session's wire format: NECP-style messages over TCP
//! (default port [`PORT`], NECP's), every one authenticated with
//! HMAC-SHA256 over a shared key and carrying a strictly increasing
//! sequence number. Pure: no I/O, no clock (the caller passes the sequence
//! and, for the replay check, its wall clock).
//!
//! # Frame (big endian)
//! | off | len | field |
//! |-----|-----|-------|
//! | 0   | 4   | magic `NECP` |
//! | 4   | 1   | version, [`VERSION`] |
//! | 5   | 1   | type ([`Kind`]: 1 INIT .. 9 LEVEL) |
//! | 6   | 2   | body length n, at most [`MAX_BODY`] |
//! | 8   | 4   | sender: the agent's server address (IPv4 as u32); 0 from the master |
//! | 12  | 8   | sequence: `max(previous + 1, unix µs)` ([`heartbeat::member::SequenceGen`]) |
//! | 20  | n   | body, by type (below) |
//! | 20+n| 32  | HMAC-SHA256(key, bytes 0..20+n) ([`heartbeat::member::sign`]) |
//!
//! # Bodies
//! | type | dir | body |
//! |------|-----|------|
//! | INIT (1) | agent -> master | name length (1), name (UTF-8, 1..=32 bytes) |
//! | INIT ACK (2) | master -> agent | keepalive interval ms (4), keepalive timeout ms (4), missed keepalives that fail the server (1) |
//! | START (3) | agent -> master | count c (1, 1..=[`MAX_SERVICES`]), c x {protocol number (1: 6 tcp, 17 udp), port (2), forward (1: 1 nat, 2 dr)} |
//! | START ACK (4) | master -> agent | count c (1), c x result (1: [`StartResult`]), in START's order |
//! | KEEPALIVE (5) | master -> agent | keepalive id (4) |
//! | KEEPALIVE ACK (6) | agent -> master | echoed keepalive id (4), count c (1), c x health (1: 0..=100), in START's order |
//! | STOP (7) | agent -> master | empty |
//! | STOP ACK (8) | master -> agent | empty |
//! | LEVEL (9) | agent -> master | count c (1), c x load level (1: 0 unloaded, 1 loaded, 2 saturated), in START's order; sent only when a level changes |
//!
//! A frame is refused (and counted by [`Refusal`]) when any check fails:
//! magic, version, type, length, the MAC (checked before the body is
//! parsed: an unauthenticated body is never interpreted), the body's
//! layout, and the replay guard. The MAC covers the sender and the
//! sequence, so neither can be changed without the key.

use std::net::Ipv4Addr;

use heartbeat::member::{MAC_LEN, ReplayGuard, sign, verify};

use crate::config::{Forward, Protocol};

/// NECP's TCP port.
pub const PORT: u16 = 3262;
pub const MAGIC: [u8; 4] = *b"NECP";
pub const VERSION: u8 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 20;
/// Longest body accepted.
pub const MAX_BODY: usize = 512;
/// Services one agent may offer.
pub const MAX_SERVICES: usize = 32;
/// Longest agent name.
pub const MAX_NAME: usize = 32;
/// Largest health value (perfect health, NECP).
pub const MAX_HEALTH: u8 = 100;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const KIND: usize = 5;
    pub const LEN: Range<usize> = 6..8;
    pub const SENDER: Range<usize> = 8..12;
    pub const SEQUENCE: Range<usize> = 12..20;
}

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Init = 1,
    InitAck = 2,
    Start = 3,
    StartAck = 4,
    Keepalive = 5,
    KeepaliveAck = 6,
    Stop = 7,
    StopAck = 8,
    Level = 9,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Init,
            2 => Kind::InitAck,
            3 => Kind::Start,
            4 => Kind::StartAck,
            5 => Kind::Keepalive,
            6 => Kind::KeepaliveAck,
            7 => Kind::Stop,
            8 => Kind::StopAck,
            9 => Kind::Level,
            _ => return None,
        })
    }

    /// The NECP name, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Init => "INIT",
            Kind::InitAck => "INIT ACK",
            Kind::Start => "START",
            Kind::StartAck => "START ACK",
            Kind::Keepalive => "KEEPALIVE",
            Kind::KeepaliveAck => "KEEPALIVE ACK",
            Kind::Stop => "STOP",
            Kind::StopAck => "STOP ACK",
            Kind::Level => "LEVEL",
        }
    }
}

/// A load level (the DVS paper's LVL_UNLOADED / LOADED / SATURATED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Unloaded = 0,
    Loaded = 1,
    Saturated = 2,
}

impl Level {
    pub fn from_u8(v: u8) -> Option<Level> {
        Some(match v {
            0 => Level::Unloaded,
            1 => Level::Loaded,
            2 => Level::Saturated,
            _ => return None,
        })
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Unloaded => "UNLOADED",
            Level::Loaded => "LOADED",
            Level::Saturated => "SATURATED",
        }
    }
}

/// One service an agent offers in START.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Offer {
    pub protocol: Protocol,
    pub port: u16,
    pub forward: Forward,
}

/// The master's answer to one offered service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartResult {
    /// The server serves the service now.
    Accepted = 0,
    /// No service of the balancer matches protocol, port and method.
    NoSuchService = 1,
    /// The server is neither a configured backend nor in a pool network.
    NotAllowed = 2,
    /// The pool already holds `max_servers`.
    PoolFull = 3,
    /// Retired by autoscaling (scale-down): it may not rejoin until its
    /// agent stops.
    Retired = 4,
}

impl StartResult {
    pub fn from_u8(v: u8) -> Option<StartResult> {
        Some(match v {
            0 => StartResult::Accepted,
            1 => StartResult::NoSuchService,
            2 => StartResult::NotAllowed,
            3 => StartResult::PoolFull,
            4 => StartResult::Retired,
            _ => return None,
        })
    }
}

/// A message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Init {
        name: String,
    },
    InitAck {
        keepalive_interval_ms: u32,
        keepalive_timeout_ms: u32,
        max_missed: u8,
    },
    Start {
        offers: Vec<Offer>,
    },
    StartAck {
        results: Vec<StartResult>,
    },
    Keepalive {
        id: u32,
    },
    KeepaliveAck {
        id: u32,
        health: Vec<u8>,
    },
    Stop,
    StopAck,
    Level {
        levels: Vec<Level>,
    },
}

impl Body {
    pub fn kind(&self) -> Kind {
        match self {
            Body::Init { .. } => Kind::Init,
            Body::InitAck { .. } => Kind::InitAck,
            Body::Start { .. } => Kind::Start,
            Body::StartAck { .. } => Kind::StartAck,
            Body::Keepalive { .. } => Kind::Keepalive,
            Body::KeepaliveAck { .. } => Kind::KeepaliveAck,
            Body::Stop => Kind::Stop,
            Body::StopAck => Kind::StopAck,
            Body::Level { .. } => Kind::Level,
        }
    }
}

/// A whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The agent's server address as u32; 0 from the master.
    pub sender: u32,
    pub sequence: u64,
    pub body: Body,
}

/// Why a frame was refused. `Copy`; the master counts each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("truncated frame")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version")]
    BadVersion,
    #[error("unknown message type")]
    BadType,
    #[error("body longer than allowed")]
    TooLong,
    #[error("authentication failed")]
    BadMac,
    #[error("malformed body")]
    BadBody,
    #[error("replayed or old sequence number")]
    Replay,
    #[error("sequence older than max_age")]
    Stale,
    #[error("sender is not the session's agent")]
    WrongSender,
    #[error("agent not allowed")]
    UnknownAgent,
    #[error("message not valid in the session's state")]
    OutOfOrder,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::Truncated,
        Refusal::BadMagic,
        Refusal::BadVersion,
        Refusal::BadType,
        Refusal::TooLong,
        Refusal::BadMac,
        Refusal::BadBody,
        Refusal::Replay,
        Refusal::Stale,
        Refusal::WrongSender,
        Refusal::UnknownAgent,
        Refusal::OutOfOrder,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::Truncated => "truncated",
            Refusal::BadMagic => "bad_magic",
            Refusal::BadVersion => "bad_version",
            Refusal::BadType => "bad_type",
            Refusal::TooLong => "too_long",
            Refusal::BadMac => "auth",
            Refusal::BadBody => "bad_body",
            Refusal::Replay => "replay",
            Refusal::Stale => "stale",
            Refusal::WrongSender => "wrong_sender",
            Refusal::UnknownAgent => "unknown_agent",
            Refusal::OutOfOrder => "out_of_order",
        }
    }
    pub fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The IPv4 address as the sender field carries it.
pub fn sender_of(addr: Ipv4Addr) -> u32 {
    u32::from(addr)
}

fn forward_code(f: Forward) -> u8 {
    match f {
        Forward::Nat => 1,
        Forward::Dr => 2,
        Forward::Local => 3,
    }
}

fn forward_from(v: u8) -> Option<Forward> {
    match v {
        1 => Some(Forward::Nat),
        2 => Some(Forward::Dr),
        _ => None,
    }
}

fn protocol_from(v: u8) -> Option<Protocol> {
    Protocol::ALL.into_iter().find(|p| p.number() == v)
}

fn emit_body(body: &Body, out: &mut Vec<u8>) {
    match body {
        Body::Init { name } => {
            let n = &name.as_bytes()[..name.len().min(MAX_NAME)];
            out.push(n.len() as u8);
            out.extend_from_slice(n);
        }
        Body::InitAck {
            keepalive_interval_ms,
            keepalive_timeout_ms,
            max_missed,
        } => {
            out.extend_from_slice(&keepalive_interval_ms.to_be_bytes());
            out.extend_from_slice(&keepalive_timeout_ms.to_be_bytes());
            out.push(*max_missed);
        }
        Body::Start { offers } => {
            let offers = &offers[..offers.len().min(MAX_SERVICES)];
            out.push(offers.len() as u8);
            for o in offers {
                out.push(o.protocol.number());
                out.extend_from_slice(&o.port.to_be_bytes());
                out.push(forward_code(o.forward));
            }
        }
        Body::StartAck { results } => {
            let results = &results[..results.len().min(MAX_SERVICES)];
            out.push(results.len() as u8);
            out.extend(results.iter().map(|r| *r as u8));
        }
        Body::Keepalive { id } => out.extend_from_slice(&id.to_be_bytes()),
        Body::KeepaliveAck { id, health } => {
            out.extend_from_slice(&id.to_be_bytes());
            let health = &health[..health.len().min(MAX_SERVICES)];
            out.push(health.len() as u8);
            out.extend(health.iter().map(|h| (*h).min(MAX_HEALTH)));
        }
        Body::Stop | Body::StopAck => {}
        Body::Level { levels } => {
            let levels = &levels[..levels.len().min(MAX_SERVICES)];
            out.push(levels.len() as u8);
            out.extend(levels.iter().map(|l| *l as u8));
        }
    }
}

impl Message {
    /// The signed frame. Lists longer than [`MAX_SERVICES`] and names
    /// longer than [`MAX_NAME`] are cut (the parser would refuse them).
    pub fn encode(&self, key: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + 64 + MAC_LEN);
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(self.body.kind() as u8);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.sender.to_be_bytes());
        b.extend_from_slice(&self.sequence.to_be_bytes());
        emit_body(&self.body, &mut b);
        let n = (b.len() - HEADER_LEN) as u16;
        b[field::LEN].copy_from_slice(&n.to_be_bytes());
        let tag = sign(key, &b);
        b.extend_from_slice(&tag);
        b
    }
}

/// Checks a frame header (the first [`HEADER_LEN`] bytes) and returns the
/// number of bytes that follow it (body and MAC): what a stream reader
/// reads next.
pub fn frame_rest(header: &[u8]) -> Result<usize, Refusal> {
    if header.len() < HEADER_LEN {
        return Err(Refusal::Truncated);
    }
    if header[field::MAGIC] != MAGIC {
        return Err(Refusal::BadMagic);
    }
    if header[field::VERSION] != VERSION {
        return Err(Refusal::BadVersion);
    }
    if Kind::from_u8(header[field::KIND]).is_none() {
        return Err(Refusal::BadType);
    }
    let n = usize::from(u16::from_be_bytes([header[6], header[7]]));
    if n > MAX_BODY {
        return Err(Refusal::TooLong);
    }
    Ok(n + MAC_LEN)
}

/// Takes the first whole frame off a stream buffer: `Ok(None)` while more
/// bytes are needed, `Err` when the header is unusable (the stream cannot
/// be resynchronised and must be closed). Lets drivers read with a
/// cancel-safe `read_buf` and cut frames here.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, Refusal> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let n = HEADER_LEN + frame_rest(&buf[..HEADER_LEN])?;
    if buf.len() < n {
        return Ok(None);
    }
    let rest = buf.split_off(n);
    Ok(Some(std::mem::replace(buf, rest)))
}

/// Parses and authenticates one whole frame. Does not look at sequence
/// numbers: see [`Gate`].
pub fn decode(frame: &[u8], key: &[u8]) -> Result<Message, Refusal> {
    let rest = frame_rest(frame)?;
    if frame.len() != HEADER_LEN + rest {
        return Err(Refusal::Truncated);
    }
    let mac_at = frame.len() - MAC_LEN;
    if !verify(key, &frame[..mac_at], &frame[mac_at..]) {
        return Err(Refusal::BadMac);
    }
    let kind = Kind::from_u8(frame[field::KIND]).ok_or(Refusal::BadType)?;
    let mut s4 = [0u8; 4];
    s4.copy_from_slice(&frame[field::SENDER]);
    let mut s8 = [0u8; 8];
    s8.copy_from_slice(&frame[field::SEQUENCE]);
    let body = parse_body(kind, &frame[HEADER_LEN..mac_at]).ok_or(Refusal::BadBody)?;
    Ok(Message {
        sender: u32::from_be_bytes(s4),
        sequence: u64::from_be_bytes(s8),
        body,
    })
}

/// A bounds-checked reader over a body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A count byte 1..=MAX_SERVICES (0 allowed if `zero_ok`).
    fn count(&mut self, zero_ok: bool) -> Option<usize> {
        let c = usize::from(self.u8()?);
        (c <= MAX_SERVICES && (zero_ok || c > 0)).then_some(c)
    }
    fn end(self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

fn parse_body(kind: Kind, b: &[u8]) -> Option<Body> {
    let mut c = Cursor(b);
    let body = match kind {
        Kind::Init => {
            let n = usize::from(c.u8()?);
            if n == 0 || n > MAX_NAME {
                return None;
            }
            let name = std::str::from_utf8(c.take(n)?).ok()?.to_owned();
            Body::Init { name }
        }
        Kind::InitAck => Body::InitAck {
            keepalive_interval_ms: c.u32().filter(|v| *v > 0)?,
            keepalive_timeout_ms: c.u32().filter(|v| *v > 0)?,
            max_missed: c.u8().filter(|v| *v > 0)?,
        },
        Kind::Start => {
            let n = c.count(false)?;
            let mut offers = Vec::with_capacity(n);
            for _ in 0..n {
                let protocol = protocol_from(c.u8()?)?;
                let port = c.u16().filter(|p| *p != 0)?;
                let forward = forward_from(c.u8()?)?;
                offers.push(Offer {
                    protocol,
                    port,
                    forward,
                });
            }
            Body::Start { offers }
        }
        Kind::StartAck => {
            let n = c.count(false)?;
            let mut results = Vec::with_capacity(n);
            for _ in 0..n {
                results.push(StartResult::from_u8(c.u8()?)?);
            }
            Body::StartAck { results }
        }
        Kind::Keepalive => Body::Keepalive { id: c.u32()? },
        Kind::KeepaliveAck => {
            let id = c.u32()?;
            let n = c.count(false)?;
            let health = c.take(n)?.to_vec();
            if health.iter().any(|h| *h > MAX_HEALTH) {
                return None;
            }
            Body::KeepaliveAck { id, health }
        }
        Kind::Stop => Body::Stop,
        Kind::StopAck => Body::StopAck,
        Kind::Level => {
            let n = c.count(false)?;
            let mut levels = Vec::with_capacity(n);
            for _ in 0..n {
                levels.push(Level::from_u8(c.u8()?)?);
            }
            Body::Level { levels }
        }
    };
    c.end()?;
    Some(body)
}

/// A receiver's authentication and replay check, in one place for master
/// and agent: decode (magic .. MAC .. body), then the sequence must be
/// strictly above the last accepted one from the same sender (and, with
/// `max_age`, not older than the receiver's wall clock minus `max_age`),
/// and the sender must be `expect_sender` when given. Only a message that
/// passes every check moves the guard; a refused one changes nothing.
#[derive(Debug, Default)]
pub struct Gate {
    guard: ReplayGuard,
}

impl Gate {
    pub fn new(max_age: Option<std::time::Duration>) -> Gate {
        Gate {
            guard: ReplayGuard::new(max_age),
        }
    }

    pub fn receive(
        &mut self,
        frame: &[u8],
        key: &[u8],
        expect_sender: Option<u32>,
        unix_micros: u64,
    ) -> Result<Message, Refusal> {
        let m = decode(frame, key)?;
        if expect_sender.is_some_and(|s| s != m.sender) {
            return Err(Refusal::WrongSender);
        }
        self.guard
            .check(m.sender, m.sequence, unix_micros)
            .map_err(|r| match r {
                heartbeat::member::Refusal::Stale => Refusal::Stale,
                _ => Refusal::Replay,
            })?;
        self.guard.accept(m.sender, m.sequence);
        Ok(m)
    }

    /// The last sequence accepted from `sender`.
    pub fn last(&self, sender: u32) -> Option<u64> {
        self.guard.last(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"feedback-test-key";

    fn all_bodies() -> Vec<Body> {
        vec![
            Body::Init { name: "rs1".into() },
            Body::InitAck {
                keepalive_interval_ms: 1000,
                keepalive_timeout_ms: 500,
                max_missed: 3,
            },
            Body::Start {
                offers: vec![
                    Offer {
                        protocol: Protocol::Tcp,
                        port: 80,
                        forward: Forward::Dr,
                    },
                    Offer {
                        protocol: Protocol::Udp,
                        port: 53,
                        forward: Forward::Nat,
                    },
                ],
            },
            Body::StartAck {
                results: vec![StartResult::Accepted, StartResult::PoolFull],
            },
            Body::Keepalive { id: 7 },
            Body::KeepaliveAck {
                id: 7,
                health: vec![100, 0],
            },
            Body::Stop,
            Body::StopAck,
            Body::Level {
                levels: vec![Level::Saturated, Level::Unloaded],
            },
        ]
    }

    #[test]
    fn test_emit_keepalive_ack_layout() {
        let m = Message {
            sender: sender_of(Ipv4Addr::new(198, 19, 0, 21)),
            sequence: 0x0102_0304_0506_0708,
            body: Body::KeepaliveAck {
                id: 0x0a0b_0c0d,
                health: vec![55, 100],
            },
        };
        let f = m.encode(KEY);
        let expect_head: [u8; 27] = [
            b'N', b'E', b'C', b'P', 1, 6, 0, 7, 198, 19, 0, 21, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b,
            0x0c, 0x0d, 2, 55, 100,
        ];
        assert_eq!(&f[..27], &expect_head);
        assert_eq!(f.len(), 27 + MAC_LEN);
        assert_eq!(&f[27..], &sign(KEY, &f[..27]));
    }

    #[test]
    fn test_parse_every_body_round_trips() {
        for (i, body) in all_bodies().into_iter().enumerate() {
            let m = Message {
                sender: 42,
                sequence: 1000 + i as u64,
                body,
            };
            let f = m.encode(KEY);
            assert_eq!(frame_rest(&f[..HEADER_LEN]), Ok(f.len() - HEADER_LEN));
            assert_eq!(decode(&f, KEY), Ok(m));
        }
    }

    #[test]
    fn forged_frame_is_refused_before_its_body_is_read() {
        let f = Message {
            sender: 1,
            sequence: 5,
            body: Body::Stop,
        }
        .encode(b"another key");
        assert_eq!(decode(&f, KEY), Err(Refusal::BadMac));
        let mut g = Gate::default();
        assert_eq!(g.receive(&f, KEY, None, 0), Err(Refusal::BadMac));
        assert_eq!(g.last(1), None, "a refused frame moves nothing");
    }

    #[test]
    fn flipped_bit_anywhere_is_refused() {
        let f = Message {
            sender: 9,
            sequence: 77,
            body: Body::KeepaliveAck {
                id: 3,
                health: vec![10],
            },
        }
        .encode(KEY);
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                assert!(decode(&g, KEY).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn header_checks_name_their_reason() {
        let f = Message {
            sender: 9,
            sequence: 77,
            body: Body::Stop,
        }
        .encode(KEY);
        let mut bad = f.clone();
        bad[0] = b'X';
        assert_eq!(frame_rest(&bad), Err(Refusal::BadMagic));
        let mut bad = f.clone();
        bad[4] = 2;
        assert_eq!(frame_rest(&bad), Err(Refusal::BadVersion));
        let mut bad = f.clone();
        bad[5] = 0;
        assert_eq!(frame_rest(&bad), Err(Refusal::BadType));
        let mut bad = f.clone();
        bad[6..8].copy_from_slice(&(MAX_BODY as u16 + 1).to_be_bytes());
        assert_eq!(frame_rest(&bad), Err(Refusal::TooLong));
        assert_eq!(frame_rest(&f[..10]), Err(Refusal::Truncated));
        assert_eq!(decode(&f[..f.len() - 1], KEY), Err(Refusal::Truncated));
    }

    #[test]
    fn authenticated_but_malformed_bodies_are_refused() {
        // Signed with the right key, so only the body check can refuse.
        let raw = |kind: u8, body: &[u8]| {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC);
            b.push(VERSION);
            b.push(kind);
            b.extend_from_slice(&(body.len() as u16).to_be_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&1u64.to_be_bytes());
            b.extend_from_slice(body);
            let t = sign(KEY, &b);
            b.extend_from_slice(&t);
            b
        };
        let cases: &[(u8, &[u8], &str)] = &[
            (1, &[0], "empty name"),
            (1, &[2, 0xff, 0xfe], "name not UTF-8"),
            (2, &[0, 0, 0, 0, 0, 0, 1, 0, 3], "zero interval"),
            (3, &[0], "START without services"),
            (3, &[1, 6, 0, 0, 2], "port 0"),
            (3, &[1, 1, 0, 80, 2], "protocol ICMP"),
            (3, &[1, 6, 0, 80, 3], "forward local"),
            (3, &[33], "too many services"),
            (4, &[1, 9], "unknown result"),
            (6, &[0, 0, 0, 1, 1, 101], "health above 100"),
            (7, &[0], "STOP with a body"),
            (9, &[1, 3], "unknown level"),
            (5, &[0, 0, 1], "short keepalive"),
        ];
        for (kind, body, what) in cases {
            assert_eq!(
                decode(&raw(*kind, body), KEY),
                Err(Refusal::BadBody),
                "{what}"
            );
        }
    }

    #[test]
    fn gate_refuses_replays_and_old_sequences_and_wrong_senders() {
        let mut g = Gate::default();
        let m = |seq: u64, sender: u32| {
            Message {
                sender,
                sequence: seq,
                body: Body::Stop,
            }
            .encode(KEY)
        };
        assert!(g.receive(&m(10, 5), KEY, Some(5), 0).is_ok());
        assert_eq!(g.receive(&m(10, 5), KEY, Some(5), 0), Err(Refusal::Replay));
        assert_eq!(g.receive(&m(9, 5), KEY, Some(5), 0), Err(Refusal::Replay));
        assert_eq!(
            g.receive(&m(11, 6), KEY, Some(5), 0),
            Err(Refusal::WrongSender)
        );
        assert!(g.receive(&m(11, 5), KEY, Some(5), 0).is_ok());
        assert_eq!(g.last(5), Some(11));
        let mut aged = Gate::new(Some(std::time::Duration::from_secs(1)));
        assert_eq!(
            aged.receive(&m(1, 5), KEY, None, 5_000_000),
            Err(Refusal::Stale)
        );
        assert!(aged.receive(&m(4_500_000, 5), KEY, None, 5_000_000).is_ok());
    }

    #[test]
    fn take_frame_cuts_whole_frames_from_a_stream() {
        let a = Message {
            sender: 1,
            sequence: 1,
            body: Body::Stop,
        }
        .encode(KEY);
        let b = Message {
            sender: 1,
            sequence: 2,
            body: Body::Keepalive { id: 4 },
        }
        .encode(KEY);
        let mut buf = Vec::new();
        buf.extend_from_slice(&a);
        buf.extend_from_slice(&b[..5]);
        assert_eq!(take_frame(&mut buf), Ok(Some(a.clone())));
        assert_eq!(take_frame(&mut buf), Ok(None));
        buf.extend_from_slice(&b[5..]);
        assert_eq!(take_frame(&mut buf), Ok(Some(b)));
        assert!(buf.is_empty());
        let mut bad = b"XXXXXXXXXXXXXXXXXXXXXXXX".to_vec();
        assert_eq!(take_frame(&mut bad), Err(Refusal::BadMagic));
    }

    proptest! {
        #[test]
        fn random_bytes_never_pass_and_never_move_the_gate(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut g = Gate::default();
            prop_assert!(g.receive(&bytes, KEY, None, 0).is_err());
            prop_assert_eq!(g.last(u32::from_be_bytes([bytes.get(8).copied().unwrap_or(0), bytes.get(9).copied().unwrap_or(0), bytes.get(10).copied().unwrap_or(0), bytes.get(11).copied().unwrap_or(0)])), None);
        }

        #[test]
        fn random_header_then_valid_magic_never_panics(kind in 0u8..12, len in 0u16..600, tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC);
            b.push(VERSION);
            b.push(kind);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&[0; 12]);
            b.extend_from_slice(&tail);
            let _ = frame_rest(&b);
            prop_assert!(decode(&b, KEY).is_err());
        }
    }
}
