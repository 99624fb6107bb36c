//! The two ends of a feedback session as pure state machines: one
//! `step(event, now) -> actions` each, time as a parameter (`now` is the
//! driver's monotonic clock as a [`Duration`]), no I/O. The drivers
//! ([`super::master`], [`crate::agent`]) read and write the socket, sample
//! load, and perform the actions. Every transition goes through one
//! `set_state` that logs `state=A=>B`.
//!
//! # Master (one per agent connection)
//!
//! | state | INIT | START | KEEPALIVE ACK | LEVEL | STOP | tick |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | AWAIT-INIT | send INIT ACK -> AWAIT-START | refused | refused | refused | send STOP ACK, close | handshake timeout: close |
//! | AWAIT-START | refused | send START ACK; something accepted: *joined* -> RUNNING (first KEEPALIVE due now), else close | refused | refused | send STOP ACK, close | handshake timeout: close |
//! | RUNNING | refused | refused | id outstanding: *health*, missed = 0; else refused | *levels* | *left (stopped)*, send STOP ACK, close | KEEPALIVE due: send it, answer due by now + timeout; answer overdue: missed + 1, at `max_missed` *left (failed)* and close, else send another KEEPALIVE |
//! | CLOSED | refused | refused | refused | refused | refused | nothing |
//!
//! "refused" is [`Refusal::OutOfOrder`]: counted by the driver, changes
//! nothing. NECP: three unanswered KEEPALIVEs in a row fail the server.
//!
//! # Agent (one per process, across connections)
//!
//! | state | connected | connect failed / closed | INIT ACK | START ACK | KEEPALIVE | STOP ACK | tick | shutdown |
//! | --- | --- | --- | --- | --- | --- | --- | --- | --- |
//! | IDLE | - | - | - | - | - | - | retry due: connect -> CONNECTING | exit |
//! | CONNECTING | send INIT -> AWAIT-INIT-ACK | back off -> IDLE | - | - | - | - | - | exit |
//! | AWAIT-INIT-ACK | - | back off -> IDLE | send START -> AWAIT-START-ACK | refused | refused | refused | handshake timeout: close, back off | close, exit |
//! | AWAIT-START-ACK | - | back off -> IDLE | refused | accepted any: send LEVEL, backoff reset -> RUNNING; none: close, back off | refused | refused | handshake timeout: close, back off | send STOP -> STOPPING |
//! | RUNNING | - | back off -> IDLE | refused | refused | send KEEPALIVE ACK (health per service), master deadline renewed | refused | master silent past `max_missed` x (interval + timeout): close, back off | send STOP -> STOPPING |
//! | STOPPING | - | exit | refused | refused | refused | close, exit | stop timeout: close, exit | - |
//!
//! A load sample in any state updates the health answered to the next
//! KEEPALIVE; a level change is sent (LEVEL) at once when RUNNING, and the
//! current levels are sent on entering RUNNING (the master knows nothing
//! before). Back-off doubles from `reconnect_min` to `reconnect_max`.

use std::fmt;
use std::time::Duration;

use super::levels::{Level, LevelTracker, Marks};
use super::necp::{Body, Offer, Refusal, StartResult};

// ---------------------------------------------------------------------------
// Master
// ---------------------------------------------------------------------------

/// Keepalive parameters the master announces in INIT ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveParams {
    pub interval: Duration,
    /// How long an answer may take.
    pub timeout: Duration,
    /// Unanswered keepalives in a row that fail the server (NECP: 3).
    pub max_missed: u8,
}

impl Default for KeepaliveParams {
    fn default() -> Self {
        KeepaliveParams {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_missed: 3,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The agent said STOP.
    Stopped,
    /// `max_missed` keepalives unanswered.
    Failed,
    /// INIT / START did not arrive in time.
    HandshakeTimeout,
    /// START offered nothing the master accepted.
    NothingAccepted,
}

/// What the master's driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterAction {
    Send(Body),
    /// START answered: `results` in the START's order.
    Joined {
        results: Vec<StartResult>,
    },
    /// Health per offered service (START order).
    Health(Vec<u8>),
    /// Load levels per offered service (START order).
    Levels(Vec<Level>),
    /// The server leaves its services (drain; the driver keeps existing
    /// connections).
    Left(CloseReason),
    Close(CloseReason),
}

/// Master session events (bodies the driver decoded and authenticated;
/// START carries the master's answer computed by the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterEvent {
    Init { name: String },
    Start { results: Vec<StartResult> },
    KeepaliveAck { id: u32, health: Vec<u8> },
    Level(Vec<Level>),
    Stop,
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterState {
    AwaitInit {
        since: Duration,
    },
    AwaitStart {
        since: Duration,
    },
    Running {
        /// Services offered (START order), to check list lengths.
        offered: usize,
        /// When the next keepalive is due (no answer outstanding).
        next_keepalive: Duration,
        /// The first id of the unanswered streak and the current answer
        /// deadline; `None`: nothing outstanding.
        outstanding: Option<(u32, Duration)>,
        missed: u8,
        next_id: u32,
    },
    Closed(CloseReason),
}

impl MasterState {
    pub const fn name(&self) -> &'static str {
        match self {
            MasterState::AwaitInit { .. } => "AWAIT-INIT",
            MasterState::AwaitStart { .. } => "AWAIT-START",
            MasterState::Running { .. } => "RUNNING",
            MasterState::Closed(_) => "CLOSED",
        }
    }
}

impl fmt::Display for MasterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The master's end of one agent connection.
#[derive(Debug, Clone)]
pub struct MasterSession {
    params: KeepaliveParams,
    handshake_timeout: Duration,
    state: MasterState,
    /// The agent's name (from INIT), for logs.
    name: String,
}

impl MasterSession {
    pub fn new(params: KeepaliveParams, handshake_timeout: Duration, now: Duration) -> Self {
        MasterSession {
            params,
            handshake_timeout,
            state: MasterState::AwaitInit { since: now },
            name: String::new(),
        }
    }

    pub fn state(&self) -> &MasterState {
        &self.state
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_state(&mut self, next: MasterState) {
        if self.state.name() != next.name() {
            tracing::debug!(agent = %self.name, "state={}=>{}", self.state, next);
        }
        self.state = next;
    }

    fn close(&mut self, reason: CloseReason, out: &mut Vec<MasterAction>) {
        out.push(MasterAction::Close(reason));
        self.set_state(MasterState::Closed(reason));
    }

    /// When the driver must call `step(Tick, ..)` next.
    pub fn poll_at(&self) -> Option<Duration> {
        match &self.state {
            MasterState::AwaitInit { since } | MasterState::AwaitStart { since } => {
                Some(*since + self.handshake_timeout)
            }
            MasterState::Running {
                next_keepalive,
                outstanding,
                ..
            } => Some(outstanding.map_or(*next_keepalive, |(_, d)| d)),
            MasterState::Closed(_) => None,
        }
    }

    /// One event. `Err` refuses it (out of order, or a list whose length
    /// does not match START) and changes nothing.
    pub fn step(&mut self, ev: MasterEvent, now: Duration) -> Result<Vec<MasterAction>, Refusal> {
        let mut out = Vec::new();
        let p = self.params;
        match (&mut self.state, ev) {
            (MasterState::Closed(_), MasterEvent::Tick) => {}
            (MasterState::Closed(_), _) => return Err(Refusal::OutOfOrder),
            (MasterState::AwaitInit { .. }, MasterEvent::Init { name }) => {
                self.name = name;
                out.push(MasterAction::Send(Body::InitAck {
                    keepalive_interval_ms: p.interval.as_millis().clamp(1, u128::from(u32::MAX))
                        as u32,
                    keepalive_timeout_ms: p.timeout.as_millis().clamp(1, u128::from(u32::MAX))
                        as u32,
                    max_missed: p.max_missed.max(1),
                }));
                self.set_state(MasterState::AwaitStart { since: now });
            }
            (MasterState::AwaitStart { .. }, MasterEvent::Start { results }) => {
                let any = results.contains(&StartResult::Accepted);
                out.push(MasterAction::Send(Body::StartAck {
                    results: results.clone(),
                }));
                let offered = results.len();
                out.push(MasterAction::Joined { results });
                if any {
                    self.set_state(MasterState::Running {
                        offered,
                        next_keepalive: now,
                        outstanding: None,
                        missed: 0,
                        next_id: 1,
                    });
                } else {
                    self.close(CloseReason::NothingAccepted, &mut out);
                }
            }
            (
                MasterState::AwaitInit { since } | MasterState::AwaitStart { since },
                MasterEvent::Tick,
            ) => {
                if now >= *since + self.handshake_timeout {
                    self.close(CloseReason::HandshakeTimeout, &mut out);
                }
            }
            (MasterState::AwaitInit { .. } | MasterState::AwaitStart { .. }, MasterEvent::Stop) => {
                out.push(MasterAction::Send(Body::StopAck));
                self.close(CloseReason::Stopped, &mut out);
            }
            (MasterState::Running { .. }, MasterEvent::Stop) => {
                out.push(MasterAction::Left(CloseReason::Stopped));
                out.push(MasterAction::Send(Body::StopAck));
                self.close(CloseReason::Stopped, &mut out);
            }
            (
                MasterState::Running {
                    offered,
                    outstanding,
                    missed,
                    next_id,
                    ..
                },
                MasterEvent::KeepaliveAck { id, health },
            ) => {
                if health.len() != *offered {
                    return Err(Refusal::BadBody);
                }
                // An answer to any keepalive of the unanswered streak counts
                // (a late answer to the first is still an answer).
                match outstanding {
                    Some((first, _)) if (*first..*next_id).contains(&id) => {
                        *outstanding = None;
                        *missed = 0;
                        out.push(MasterAction::Health(health));
                    }
                    _ => return Err(Refusal::OutOfOrder),
                }
            }
            (MasterState::Running { offered, .. }, MasterEvent::Level(levels)) => {
                if levels.len() != *offered {
                    return Err(Refusal::BadBody);
                }
                out.push(MasterAction::Levels(levels));
            }
            (
                MasterState::Running {
                    next_keepalive,
                    outstanding,
                    missed,
                    next_id,
                    ..
                },
                MasterEvent::Tick,
            ) => match outstanding {
                Some((_, deadline)) if now >= *deadline => {
                    *missed += 1;
                    if *missed >= p.max_missed.max(1) {
                        tracing::info!(agent = %self.name, missed = *missed, "keepalives unanswered: server failed");
                        out.push(MasterAction::Left(CloseReason::Failed));
                        self.close(CloseReason::Failed, &mut out);
                    } else {
                        let id = *next_id;
                        *next_id = next_id.wrapping_add(1);
                        if let Some((_, d)) = outstanding {
                            *d = now + p.timeout;
                        }
                        *next_keepalive = now + p.interval;
                        out.push(MasterAction::Send(Body::Keepalive { id }));
                    }
                }
                Some(_) => {}
                None => {
                    if now >= *next_keepalive {
                        let id = *next_id;
                        *next_id = next_id.wrapping_add(1);
                        *outstanding = Some((id, now + p.timeout));
                        *next_keepalive = now + p.interval;
                        out.push(MasterAction::Send(Body::Keepalive { id }));
                    }
                }
            },
            _ => return Err(Refusal::OutOfOrder),
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------

/// The agent's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentParams {
    pub name: String,
    pub offers: Vec<Offer>,
    /// Watermarks per offer (START order).
    pub marks: Vec<Marks>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub handshake_timeout: Duration,
    /// How long to wait for STOP ACK on shutdown.
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    Idle {
        retry_at: Duration,
    },
    Connecting,
    AwaitInitAck {
        since: Duration,
    },
    AwaitStartAck {
        since: Duration,
        keepalive: KeepaliveParams,
    },
    Running {
        keepalive: KeepaliveParams,
        /// The master is taken as gone when no KEEPALIVE arrived by then.
        master_deadline: Duration,
    },
    Stopping {
        deadline: Duration,
    },
    Done,
}

impl AgentState {
    pub const fn name(&self) -> &'static str {
        match self {
            AgentState::Idle { .. } => "IDLE",
            AgentState::Connecting => "CONNECTING",
            AgentState::AwaitInitAck { .. } => "AWAIT-INIT-ACK",
            AgentState::AwaitStartAck { .. } => "AWAIT-START-ACK",
            AgentState::Running { .. } => "RUNNING",
            AgentState::Stopping { .. } => "STOPPING",
            AgentState::Done => "DONE",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Tick,
    Connected,
    /// The connection attempt failed, or the connection closed.
    Disconnected,
    Received(Body),
    /// Loads in percent per offer (START order), from the plugins.
    Sample(Vec<u8>),
    /// SIGINT / SIGTERM.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    Connect,
    Send(Body),
    /// Close the connection.
    Close,
    /// The master answered START.
    Joined(Vec<StartResult>),
    /// Leave the process.
    Exit,
}

/// The agent's session, kept across connections.
#[derive(Debug, Clone)]
pub struct AgentSession {
    p: AgentParams,
    state: AgentState,
    backoff: Duration,
    trackers: Vec<LevelTracker>,
    /// Health per offer, answered to KEEPALIVE (100 before any sample).
    health: Vec<u8>,
    /// Levels the master was last told.
    last_sent: Vec<Option<Level>>,
}

impl AgentSession {
    /// Starts IDLE with the first connection attempt due at `now`.
    pub fn new(p: AgentParams, now: Duration) -> Self {
        let n = p.offers.len();
        let trackers = (0..n)
            .map(|i| LevelTracker::new(p.marks.get(i).copied().unwrap_or_default()))
            .collect();
        AgentSession {
            backoff: p.reconnect_min,
            p,
            state: AgentState::Idle { retry_at: now },
            trackers,
            health: vec![100; n],
            last_sent: vec![None; n],
        }
    }

    pub fn state(&self) -> &AgentState {
        &self.state
    }

    pub fn health(&self) -> &[u8] {
        &self.health
    }

    pub fn levels(&self) -> Vec<Option<Level>> {
        self.trackers.iter().map(|t| t.level()).collect()
    }

    fn set_state(&mut self, next: AgentState) {
        if self.state.name() != next.name() {
            tracing::info!(agent = %self.p.name, "state={}=>{}", self.state, next);
        }
        self.state = next;
    }

    /// IDLE until now + backoff; the backoff doubles up to the maximum.
    fn back_off(&mut self, now: Duration) {
        let retry_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(self.p.reconnect_max);
        self.set_state(AgentState::Idle { retry_at });
    }

    fn current_levels(&self) -> Vec<Level> {
        self.trackers
            .iter()
            .map(|t| t.level().unwrap_or(Level::Unloaded))
            .collect()
    }

    /// When the driver must call `step(Tick, ..)` next.
    pub fn poll_at(&self) -> Option<Duration> {
        match &self.state {
            AgentState::Idle { retry_at } => Some(*retry_at),
            AgentState::AwaitInitAck { since } | AgentState::AwaitStartAck { since, .. } => {
                Some(*since + self.p.handshake_timeout)
            }
            AgentState::Running {
                master_deadline, ..
            } => Some(*master_deadline),
            AgentState::Stopping { deadline } => Some(*deadline),
            AgentState::Connecting | AgentState::Done => None,
        }
    }

    fn master_deadline(k: KeepaliveParams, now: Duration) -> Duration {
        now + (k.interval + k.timeout) * u32::from(k.max_missed.max(1))
    }

    // Each arm is one cell of the transition table; a guard would move the
    // deadline checks away from the state they belong to.
    #[allow(clippy::collapsible_match)]
    pub fn step(&mut self, ev: AgentEvent, now: Duration) -> Result<Vec<AgentAction>, Refusal> {
        let mut out = Vec::new();
        if let AgentEvent::Sample(loads) = &ev {
            for (i, t) in self.trackers.iter_mut().enumerate() {
                let load = loads.get(i).copied().unwrap_or(0).min(100);
                self.health[i] = 100 - load;
                if t.update(load).is_some() {
                    tracing::info!(agent = %self.p.name, service = i, load, level = t.level().map_or("", |l| l.as_str()), "load level changed");
                }
            }
            let changed = self
                .trackers
                .iter()
                .zip(self.last_sent.iter())
                .any(|(t, s)| t.level() != *s);
            if changed && matches!(self.state, AgentState::Running { .. }) {
                self.last_sent = self.trackers.iter().map(|t| t.level()).collect();
                out.push(AgentAction::Send(Body::Level {
                    levels: self.current_levels(),
                }));
            }
            return Ok(out);
        }
        match (&mut self.state, ev) {
            (AgentState::Done, _) => {}
            (AgentState::Stopping { .. }, AgentEvent::Received(Body::StopAck))
            | (AgentState::Stopping { .. }, AgentEvent::Disconnected) => {
                out.push(AgentAction::Close);
                out.push(AgentAction::Exit);
                self.set_state(AgentState::Done);
            }
            (AgentState::Stopping { deadline }, AgentEvent::Tick) => {
                if now >= *deadline {
                    out.push(AgentAction::Close);
                    out.push(AgentAction::Exit);
                    self.set_state(AgentState::Done);
                }
            }
            (AgentState::Stopping { .. }, AgentEvent::Received(_)) => {
                return Err(Refusal::OutOfOrder);
            }
            (AgentState::Stopping { .. }, _) => {}
            (AgentState::Idle { .. } | AgentState::Connecting, AgentEvent::Shutdown) => {
                out.push(AgentAction::Exit);
                self.set_state(AgentState::Done);
            }
            (AgentState::AwaitInitAck { .. }, AgentEvent::Shutdown) => {
                out.push(AgentAction::Close);
                out.push(AgentAction::Exit);
                self.set_state(AgentState::Done);
            }
            (
                AgentState::AwaitStartAck { .. } | AgentState::Running { .. },
                AgentEvent::Shutdown,
            ) => {
                out.push(AgentAction::Send(Body::Stop));
                let deadline = now + self.p.stop_timeout;
                self.set_state(AgentState::Stopping { deadline });
            }
            (AgentState::Idle { retry_at }, AgentEvent::Tick) => {
                if now >= *retry_at {
                    out.push(AgentAction::Connect);
                    self.set_state(AgentState::Connecting);
                }
            }
            (AgentState::Connecting, AgentEvent::Connected) => {
                out.push(AgentAction::Send(Body::Init {
                    name: self.p.name.clone(),
                }));
                self.set_state(AgentState::AwaitInitAck { since: now });
            }
            (
                AgentState::Connecting
                | AgentState::AwaitInitAck { .. }
                | AgentState::AwaitStartAck { .. }
                | AgentState::Running { .. },
                AgentEvent::Disconnected,
            ) => {
                self.back_off(now);
            }
            (
                AgentState::AwaitInitAck { .. },
                AgentEvent::Received(Body::InitAck {
                    keepalive_interval_ms,
                    keepalive_timeout_ms,
                    max_missed,
                }),
            ) => {
                let keepalive = KeepaliveParams {
                    interval: Duration::from_millis(u64::from(keepalive_interval_ms)),
                    timeout: Duration::from_millis(u64::from(keepalive_timeout_ms)),
                    max_missed,
                };
                out.push(AgentAction::Send(Body::Start {
                    offers: self.p.offers.clone(),
                }));
                self.set_state(AgentState::AwaitStartAck {
                    since: now,
                    keepalive,
                });
            }
            (
                AgentState::AwaitStartAck { keepalive, .. },
                AgentEvent::Received(Body::StartAck { results }),
            ) => {
                if results.len() != self.p.offers.len() {
                    return Err(Refusal::BadBody);
                }
                let k = *keepalive;
                let any = results.contains(&StartResult::Accepted);
                out.push(AgentAction::Joined(results));
                if any {
                    self.backoff = self.p.reconnect_min;
                    self.last_sent = self.trackers.iter().map(|t| t.level()).collect();
                    out.push(AgentAction::Send(Body::Level {
                        levels: self.current_levels(),
                    }));
                    self.set_state(AgentState::Running {
                        keepalive: k,
                        master_deadline: Self::master_deadline(k, now),
                    });
                } else {
                    out.push(AgentAction::Close);
                    self.back_off(now);
                }
            }
            (
                AgentState::AwaitInitAck { since } | AgentState::AwaitStartAck { since, .. },
                AgentEvent::Tick,
            ) => {
                if now >= *since + self.p.handshake_timeout {
                    out.push(AgentAction::Close);
                    self.back_off(now);
                }
            }
            (
                AgentState::Running {
                    keepalive,
                    master_deadline,
                },
                AgentEvent::Received(Body::Keepalive { id }),
            ) => {
                *master_deadline = Self::master_deadline(*keepalive, now);
                out.push(AgentAction::Send(Body::KeepaliveAck {
                    id,
                    health: self.health.clone(),
                }));
            }
            (
                AgentState::Running {
                    master_deadline, ..
                },
                AgentEvent::Tick,
            ) => {
                if now >= *master_deadline {
                    tracing::warn!(agent = %self.p.name, "no KEEPALIVE from the master: reconnecting");
                    out.push(AgentAction::Close);
                    self.back_off(now);
                }
            }
            (_, AgentEvent::Received(_)) => return Err(Refusal::OutOfOrder),
            _ => {}
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Forward, Protocol};

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn ka() -> KeepaliveParams {
        KeepaliveParams {
            interval: ms(1000),
            timeout: ms(500),
            max_missed: 3,
        }
    }

    fn master_running(now: Duration) -> MasterSession {
        let mut m = MasterSession::new(ka(), ms(5000), now);
        m.step(MasterEvent::Init { name: "rs1".into() }, now)
            .expect("init");
        m.step(
            MasterEvent::Start {
                results: vec![StartResult::Accepted, StartResult::NoSuchService],
            },
            now,
        )
        .expect("start");
        m
    }

    fn sent_keepalive(a: &[MasterAction]) -> Option<u32> {
        a.iter().find_map(|x| match x {
            MasterAction::Send(Body::Keepalive { id }) => Some(*id),
            _ => None,
        })
    }

    #[test]
    fn master_answers_init_with_its_keepalive_parameters() {
        let mut m = MasterSession::new(ka(), ms(5000), ms(0));
        let a = m
            .step(MasterEvent::Init { name: "rs1".into() }, ms(10))
            .expect("ok");
        assert_eq!(
            a,
            vec![MasterAction::Send(Body::InitAck {
                keepalive_interval_ms: 1000,
                keepalive_timeout_ms: 500,
                max_missed: 3
            })]
        );
        assert_eq!(m.state().name(), "AWAIT-START");
        assert_eq!(m.name(), "rs1");
    }

    #[test]
    fn master_start_with_an_accepted_service_joins_and_keepalives_at_once() {
        let mut m = MasterSession::new(ka(), ms(5000), ms(0));
        m.step(MasterEvent::Init { name: "rs1".into() }, ms(0))
            .expect("ok");
        let results = vec![StartResult::Accepted];
        let a = m
            .step(
                MasterEvent::Start {
                    results: results.clone(),
                },
                ms(100),
            )
            .expect("ok");
        assert_eq!(
            a,
            vec![
                MasterAction::Send(Body::StartAck {
                    results: results.clone()
                }),
                MasterAction::Joined { results }
            ]
        );
        assert_eq!(m.poll_at(), Some(ms(100)));
        let a = m.step(MasterEvent::Tick, ms(100)).expect("ok");
        assert_eq!(sent_keepalive(&a), Some(1));
    }

    #[test]
    fn master_start_with_nothing_accepted_closes() {
        let mut m = MasterSession::new(ka(), ms(5000), ms(0));
        m.step(MasterEvent::Init { name: "rs1".into() }, ms(0))
            .expect("ok");
        let a = m
            .step(
                MasterEvent::Start {
                    results: vec![StartResult::PoolFull],
                },
                ms(0),
            )
            .expect("ok");
        assert_eq!(
            a.last(),
            Some(&MasterAction::Close(CloseReason::NothingAccepted))
        );
        assert_eq!(
            m.state(),
            &MasterState::Closed(CloseReason::NothingAccepted)
        );
    }

    #[test]
    fn master_refuses_out_of_order_messages_and_changes_nothing() {
        let mut m = MasterSession::new(ka(), ms(5000), ms(0));
        let before = m.state().clone();
        for ev in [
            MasterEvent::Start {
                results: vec![StartResult::Accepted],
            },
            MasterEvent::KeepaliveAck {
                id: 1,
                health: vec![1],
            },
            MasterEvent::Level(vec![Level::Loaded]),
        ] {
            assert_eq!(m.step(ev, ms(1)), Err(Refusal::OutOfOrder));
            assert_eq!(m.state(), &before);
        }
        let mut r = master_running(ms(0));
        let before = r.state().clone();
        assert_eq!(
            r.step(MasterEvent::Init { name: "x".into() }, ms(1)),
            Err(Refusal::OutOfOrder)
        );
        assert_eq!(
            r.step(
                MasterEvent::Start {
                    results: vec![StartResult::Accepted]
                },
                ms(1)
            ),
            Err(Refusal::OutOfOrder)
        );
        // No keepalive outstanding: an answer is out of order.
        assert_eq!(
            r.step(
                MasterEvent::KeepaliveAck {
                    id: 1,
                    health: vec![1, 1]
                },
                ms(1)
            ),
            Err(Refusal::OutOfOrder)
        );
        assert_eq!(r.state(), &before);
    }

    #[test]
    fn master_handshake_times_out_in_both_handshake_states() {
        let mut m = MasterSession::new(ka(), ms(5000), ms(0));
        assert_eq!(m.step(MasterEvent::Tick, ms(4999)).expect("ok"), vec![]);
        assert_eq!(
            m.step(MasterEvent::Tick, ms(5000)).expect("ok"),
            vec![MasterAction::Close(CloseReason::HandshakeTimeout)]
        );
        let mut m = MasterSession::new(ka(), ms(5000), ms(0));
        m.step(MasterEvent::Init { name: "a".into() }, ms(3000))
            .expect("ok");
        assert_eq!(m.step(MasterEvent::Tick, ms(7999)).expect("ok"), vec![]);
        assert_eq!(
            m.step(MasterEvent::Tick, ms(8000)).expect("ok"),
            vec![MasterAction::Close(CloseReason::HandshakeTimeout)]
        );
    }

    #[test]
    fn master_stop_before_start_is_acknowledged_without_leaving() {
        for init in [false, true] {
            let mut m = MasterSession::new(ka(), ms(5000), ms(0));
            if init {
                m.step(MasterEvent::Init { name: "a".into() }, ms(0))
                    .expect("ok");
            }
            assert_eq!(
                m.step(MasterEvent::Stop, ms(1)).expect("ok"),
                vec![
                    MasterAction::Send(Body::StopAck),
                    MasterAction::Close(CloseReason::Stopped)
                ]
            );
        }
    }

    #[test]
    fn master_keepalive_answer_gives_health_and_next_keepalive_after_interval() {
        let mut m = master_running(ms(0));
        let id = sent_keepalive(&m.step(MasterEvent::Tick, ms(0)).expect("ok")).expect("ka");
        let a = m
            .step(
                MasterEvent::KeepaliveAck {
                    id,
                    health: vec![70, 100],
                },
                ms(20),
            )
            .expect("ok");
        assert_eq!(a, vec![MasterAction::Health(vec![70, 100])]);
        assert_eq!(m.poll_at(), Some(ms(1000)));
        assert_eq!(m.step(MasterEvent::Tick, ms(999)).expect("ok"), vec![]);
        assert_eq!(
            sent_keepalive(&m.step(MasterEvent::Tick, ms(1000)).expect("ok")),
            Some(id + 1)
        );
    }

    #[test]
    fn master_refuses_health_list_of_the_wrong_length() {
        let mut m = master_running(ms(0));
        let id = sent_keepalive(&m.step(MasterEvent::Tick, ms(0)).expect("ok")).expect("ka");
        assert_eq!(
            m.step(
                MasterEvent::KeepaliveAck {
                    id,
                    health: vec![70]
                },
                ms(1)
            ),
            Err(Refusal::BadBody)
        );
        assert_eq!(
            m.step(MasterEvent::Level(vec![Level::Loaded]), ms(1)),
            Err(Refusal::BadBody)
        );
        assert_eq!(
            m.step(
                MasterEvent::Level(vec![Level::Loaded, Level::Saturated]),
                ms(1)
            )
            .expect("ok"),
            vec![MasterAction::Levels(vec![Level::Loaded, Level::Saturated])]
        );
    }

    #[test]
    fn three_unanswered_keepalives_fail_the_server() {
        let mut m = master_running(ms(0));
        assert_eq!(
            sent_keepalive(&m.step(MasterEvent::Tick, ms(0)).expect("ok")),
            Some(1)
        );
        // First timeout at 500: missed 1, another keepalive.
        assert_eq!(m.step(MasterEvent::Tick, ms(499)).expect("ok"), vec![]);
        assert_eq!(
            sent_keepalive(&m.step(MasterEvent::Tick, ms(500)).expect("ok")),
            Some(2)
        );
        assert_eq!(
            sent_keepalive(&m.step(MasterEvent::Tick, ms(1000)).expect("ok")),
            Some(3)
        );
        let a = m.step(MasterEvent::Tick, ms(1500)).expect("ok");
        assert_eq!(
            a,
            vec![
                MasterAction::Left(CloseReason::Failed),
                MasterAction::Close(CloseReason::Failed)
            ]
        );
        assert_eq!(m.poll_at(), None);
    }

    #[test]
    fn a_late_answer_to_an_earlier_keepalive_of_the_streak_counts() {
        let mut m = master_running(ms(0));
        m.step(MasterEvent::Tick, ms(0)).expect("ok");
        m.step(MasterEvent::Tick, ms(500)).expect("ok"); // id 2, missed 1
        let a = m
            .step(
                MasterEvent::KeepaliveAck {
                    id: 1,
                    health: vec![50, 50],
                },
                ms(600),
            )
            .expect("ok");
        assert_eq!(a, vec![MasterAction::Health(vec![50, 50])]);
        // The miss count started over: three more timeouts are needed.
        m.step(MasterEvent::Tick, ms(1500)).expect("ok");
        m.step(MasterEvent::Tick, ms(2000)).expect("ok");
        m.step(MasterEvent::Tick, ms(2500)).expect("ok");
        assert!(matches!(m.state(), MasterState::Running { .. }));
        // An id from before the streak is out of order.
        assert_eq!(
            m.step(
                MasterEvent::KeepaliveAck {
                    id: 1,
                    health: vec![50, 50]
                },
                ms(2600)
            ),
            Err(Refusal::OutOfOrder)
        );
        m.step(MasterEvent::Tick, ms(3000)).expect("ok");
        assert_eq!(
            m.state(),
            &MasterState::Closed(CloseReason::Failed),
            "keepalives 3, 4, 5 unanswered"
        );
    }

    #[test]
    fn master_stop_while_running_leaves_then_acknowledges() {
        let mut m = master_running(ms(0));
        assert_eq!(
            m.step(MasterEvent::Stop, ms(10)).expect("ok"),
            vec![
                MasterAction::Left(CloseReason::Stopped),
                MasterAction::Send(Body::StopAck),
                MasterAction::Close(CloseReason::Stopped)
            ]
        );
        assert_eq!(m.step(MasterEvent::Stop, ms(11)), Err(Refusal::OutOfOrder));
        assert_eq!(m.step(MasterEvent::Tick, ms(11)).expect("ok"), vec![]);
    }

    // --- agent ---

    fn params() -> AgentParams {
        AgentParams {
            name: "rs1".into(),
            offers: vec![Offer {
                protocol: Protocol::Tcp,
                port: 80,
                forward: Forward::Dr,
            }],
            marks: vec![Marks::default()],
            reconnect_min: ms(500),
            reconnect_max: ms(4000),
            handshake_timeout: ms(3000),
            stop_timeout: ms(1000),
        }
    }

    fn init_ack() -> Body {
        Body::InitAck {
            keepalive_interval_ms: 1000,
            keepalive_timeout_ms: 500,
            max_missed: 3,
        }
    }

    fn agent_running(now: Duration) -> AgentSession {
        let mut a = AgentSession::new(params(), now);
        a.step(AgentEvent::Tick, now).expect("ok");
        a.step(AgentEvent::Connected, now).expect("ok");
        a.step(AgentEvent::Received(init_ack()), now).expect("ok");
        a.step(
            AgentEvent::Received(Body::StartAck {
                results: vec![StartResult::Accepted],
            }),
            now,
        )
        .expect("ok");
        a
    }

    #[test]
    fn agent_handshake_sends_init_then_start_then_its_levels() {
        let mut a = AgentSession::new(params(), ms(0));
        assert_eq!(
            a.step(AgentEvent::Tick, ms(0)).expect("ok"),
            vec![AgentAction::Connect]
        );
        assert_eq!(
            a.step(AgentEvent::Connected, ms(5)).expect("ok"),
            vec![AgentAction::Send(Body::Init { name: "rs1".into() })]
        );
        assert_eq!(
            a.step(AgentEvent::Received(init_ack()), ms(6)).expect("ok"),
            vec![AgentAction::Send(Body::Start {
                offers: params().offers
            })]
        );
        a.step(AgentEvent::Sample(vec![90]), ms(7)).expect("ok");
        let out = a
            .step(
                AgentEvent::Received(Body::StartAck {
                    results: vec![StartResult::Accepted],
                }),
                ms(8),
            )
            .expect("ok");
        assert_eq!(
            out,
            vec![
                AgentAction::Joined(vec![StartResult::Accepted]),
                AgentAction::Send(Body::Level {
                    levels: vec![Level::Saturated]
                })
            ]
        );
        assert_eq!(a.state().name(), "RUNNING");
    }

    #[test]
    fn agent_answers_keepalive_with_the_last_sampled_health() {
        let mut a = agent_running(ms(0));
        a.step(AgentEvent::Sample(vec![35]), ms(100)).expect("ok");
        assert_eq!(
            a.step(AgentEvent::Received(Body::Keepalive { id: 9 }), ms(200))
                .expect("ok"),
            vec![AgentAction::Send(Body::KeepaliveAck {
                id: 9,
                health: vec![65]
            })]
        );
    }

    #[test]
    fn agent_reports_levels_only_on_change() {
        let mut a = agent_running(ms(0));
        let first = a.step(AgentEvent::Sample(vec![50]), ms(1)).expect("ok");
        assert_eq!(
            first,
            vec![AgentAction::Send(Body::Level {
                levels: vec![Level::Loaded]
            })]
        );
        assert_eq!(
            a.step(AgentEvent::Sample(vec![60]), ms(2)).expect("ok"),
            vec![]
        );
        assert_eq!(
            a.step(AgentEvent::Sample(vec![40]), ms(3)).expect("ok"),
            vec![]
        );
        assert_eq!(
            a.step(AgentEvent::Sample(vec![99]), ms(4)).expect("ok"),
            vec![AgentAction::Send(Body::Level {
                levels: vec![Level::Saturated]
            })]
        );
    }

    #[test]
    fn agent_samples_while_disconnected_are_not_sent() {
        let mut a = AgentSession::new(params(), ms(0));
        assert_eq!(
            a.step(AgentEvent::Sample(vec![99]), ms(1)).expect("ok"),
            vec![]
        );
        assert_eq!(a.health(), &[1]);
    }

    #[test]
    fn agent_backs_off_doubling_up_to_the_maximum_and_resets_after_start() {
        let mut a = AgentSession::new(params(), ms(0));
        let mut now = ms(0);
        let mut waits = Vec::new();
        for _ in 0..5 {
            assert_eq!(
                a.step(AgentEvent::Tick, now).expect("ok"),
                vec![AgentAction::Connect]
            );
            a.step(AgentEvent::Disconnected, now).expect("ok");
            let at = a.poll_at().expect("idle");
            waits.push((at - now).as_millis());
            assert_eq!(a.step(AgentEvent::Tick, at - ms(1)).expect("ok"), vec![]);
            now = at;
        }
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 4000]);
        // A successful START resets the back-off.
        a.step(AgentEvent::Tick, now).expect("ok");
        a.step(AgentEvent::Connected, now).expect("ok");
        a.step(AgentEvent::Received(init_ack()), now).expect("ok");
        a.step(
            AgentEvent::Received(Body::StartAck {
                results: vec![StartResult::Accepted],
            }),
            now,
        )
        .expect("ok");
        a.step(AgentEvent::Disconnected, now).expect("ok");
        assert_eq!(a.poll_at(), Some(now + ms(500)));
    }

    #[test]
    fn agent_refused_everywhere_closes_and_backs_off() {
        let mut a = AgentSession::new(params(), ms(0));
        a.step(AgentEvent::Tick, ms(0)).expect("ok");
        a.step(AgentEvent::Connected, ms(0)).expect("ok");
        a.step(AgentEvent::Received(init_ack()), ms(0)).expect("ok");
        let out = a
            .step(
                AgentEvent::Received(Body::StartAck {
                    results: vec![StartResult::PoolFull],
                }),
                ms(10),
            )
            .expect("ok");
        assert_eq!(
            out,
            vec![
                AgentAction::Joined(vec![StartResult::PoolFull]),
                AgentAction::Close
            ]
        );
        assert_eq!(a.state(), &AgentState::Idle { retry_at: ms(510) });
    }

    #[test]
    fn agent_reconnects_when_the_master_goes_silent() {
        let mut a = agent_running(ms(0));
        // Deadline: 3 x (1000 + 500) after the last keepalive.
        a.step(AgentEvent::Received(Body::Keepalive { id: 1 }), ms(1000))
            .expect("ok");
        assert_eq!(a.poll_at(), Some(ms(5500)));
        assert_eq!(a.step(AgentEvent::Tick, ms(5499)).expect("ok"), vec![]);
        assert_eq!(
            a.step(AgentEvent::Tick, ms(5500)).expect("ok"),
            vec![AgentAction::Close]
        );
        assert_eq!(a.state().name(), "IDLE");
    }

    #[test]
    fn agent_handshake_timeout_closes_and_backs_off() {
        let mut a = AgentSession::new(params(), ms(0));
        a.step(AgentEvent::Tick, ms(0)).expect("ok");
        a.step(AgentEvent::Connected, ms(0)).expect("ok");
        assert_eq!(a.step(AgentEvent::Tick, ms(2999)).expect("ok"), vec![]);
        assert_eq!(
            a.step(AgentEvent::Tick, ms(3000)).expect("ok"),
            vec![AgentAction::Close]
        );
        assert_eq!(a.state().name(), "IDLE");
    }

    #[test]
    fn agent_shutdown_sends_stop_and_exits_on_stop_ack() {
        let mut a = agent_running(ms(0));
        assert_eq!(
            a.step(AgentEvent::Shutdown, ms(10)).expect("ok"),
            vec![AgentAction::Send(Body::Stop)]
        );
        assert_eq!(
            a.step(AgentEvent::Received(Body::Keepalive { id: 3 }), ms(11)),
            Err(Refusal::OutOfOrder)
        );
        assert_eq!(
            a.step(AgentEvent::Received(Body::StopAck), ms(20))
                .expect("ok"),
            vec![AgentAction::Close, AgentAction::Exit]
        );
        assert_eq!(a.state(), &AgentState::Done);
    }

    #[test]
    fn agent_shutdown_without_stop_ack_exits_at_the_stop_timeout() {
        let mut a = agent_running(ms(0));
        a.step(AgentEvent::Shutdown, ms(10)).expect("ok");
        assert_eq!(a.step(AgentEvent::Tick, ms(1009)).expect("ok"), vec![]);
        assert_eq!(
            a.step(AgentEvent::Tick, ms(1010)).expect("ok"),
            vec![AgentAction::Close, AgentAction::Exit]
        );
    }

    #[test]
    fn agent_shutdown_while_idle_or_in_init_exits_at_once() {
        let mut a = AgentSession::new(params(), ms(0));
        assert_eq!(
            a.step(AgentEvent::Shutdown, ms(0)).expect("ok"),
            vec![AgentAction::Exit]
        );
        let mut a = AgentSession::new(params(), ms(0));
        a.step(AgentEvent::Tick, ms(0)).expect("ok");
        a.step(AgentEvent::Connected, ms(0)).expect("ok");
        assert_eq!(
            a.step(AgentEvent::Shutdown, ms(0)).expect("ok"),
            vec![AgentAction::Close, AgentAction::Exit]
        );
    }

    #[test]
    fn agent_refuses_messages_out_of_order() {
        let mut a = AgentSession::new(params(), ms(0));
        a.step(AgentEvent::Tick, ms(0)).expect("ok");
        a.step(AgentEvent::Connected, ms(0)).expect("ok");
        for b in [
            Body::Keepalive { id: 1 },
            Body::StartAck {
                results: vec![StartResult::Accepted],
            },
            Body::StopAck,
        ] {
            assert_eq!(
                a.step(AgentEvent::Received(b), ms(1)),
                Err(Refusal::OutOfOrder)
            );
        }
        assert_eq!(a.state().name(), "AWAIT-INIT-ACK");
        let mut r = agent_running(ms(0));
        assert_eq!(
            r.step(AgentEvent::Received(init_ack()), ms(1)),
            Err(Refusal::OutOfOrder)
        );
    }
}
