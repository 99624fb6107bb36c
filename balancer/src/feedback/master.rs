//! The feedback master: a tokio task on the node's control-plane runtime.
//! It accepts agents (within `[feedback]`'s allowed networks and
//! `max_agents`), runs one [`MasterSession`] per connection, and turns
//! what the agents report into scheduler weights in [`Stats`] (which the
//! dataplane reads on its housekeeping tick). Services with
//! `[service.autoscale]` are evaluated every tick of [`AUTOSCALE_TICK`].
//!
//! Weights: a joined server gets [`INITIAL_WEIGHT`] until its first
//! keepalive answer, then the smoothed health ([`Smoother`]); it leaves
//! with weight 0 (drain: existing connections finish) on STOP, on
//! `max_missed` unanswered keepalives, and on scale-down. An operator's
//! `balancer drain` wins: the master writes a weight only with a
//! compare-and-swap from the value it wrote last; when it finds 0 instead,
//! it leaves the weight alone until the operator undrains.
//!
//! A connection that closes without STOP (a killed agent) is not a leave
//! by itself: the session keeps sending keepalives into the void and fails
//! after `max_missed` of them, as NECP says.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heartbeat::member::SequenceGen;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::autoscale::{Autoscaler, Decision, ServerView};
use super::levels::Level;
use super::necp::{self, Body, Gate, Offer, Refusal, StartResult};
use super::session::{
    CloseReason, KeepaliveParams, MasterAction, MasterEvent, MasterSession, MasterState,
};
use super::smooth::{INITIAL_WEIGHT, Smoother};
use crate::config::{Config, Feedback, Forward};
use crate::stats::Stats;

/// How often autoscale rules are evaluated.
pub const AUTOSCALE_TICK: Duration = Duration::from_millis(200);
/// Decisions kept for status.
const DECISIONS_KEPT: usize = 64;

/// The running master, for `balancer status` (one per process).
static CURRENT: OnceLock<Arc<Master>> = OnceLock::new();

/// Microseconds since the Unix epoch (sequence numbers, replay age).
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A server slot held by a session.
#[derive(Debug)]
struct Member {
    session: u64,
    agent: String,
    address: Ipv4Addr,
    smoother: Smoother,
    health: Option<u8>,
    level: Option<Level>,
    /// The weight this master last wrote.
    written: u32,
    retiring: bool,
}

#[derive(Debug, Default)]
struct PoolState {
    gate: Gate,
    agents: u32,
    next_session: u64,
    /// (service, backend) -> holder.
    members: HashMap<(usize, usize), Member>,
    /// (service, address) retired by scale-down until its session ends.
    retired: HashSet<(usize, Ipv4Addr)>,
    decisions: VecDeque<DecisionRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Milliseconds since the master started.
    pub at_ms: u64,
    pub service: String,
    pub decision: String,
}

/// What `balancer status` shows of feedback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackSnapshot {
    pub listen: String,
    pub agents: u32,
    pub servers: Vec<MemberSnapshot>,
    pub refused: Vec<(String, u64)>,
    pub decisions: Vec<DecisionRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSnapshot {
    pub service: String,
    pub backend: String,
    pub agent: String,
    pub address: Ipv4Addr,
    pub health: Option<u8>,
    pub level: Option<Level>,
    pub weight: u32,
    pub retiring: bool,
}

/// Decisions `balancer status` prints (all of them are in `--json`).
const DECISIONS_SHOWN: usize = 8;

impl FeedbackSnapshot {
    /// The feedback part of `balancer status`.
    pub fn render_into(&self, out: &mut String) -> std::fmt::Result {
        use std::fmt::Write;
        writeln!(out)?;
        writeln!(
            out,
            "Feedback master {}: {} agent session(s)",
            self.listen, self.agents
        )?;
        if self.servers.is_empty() {
            writeln!(out, "  no agent serves any backend")?;
        } else {
            writeln!(
                out,
                "  {:<12} {:<18} {:<12} {:<15} {:>6} {:<10} {:>6}",
                "Service", "Backend", "Agent", "Address", "Health", "Level", "Weight"
            )?;
        }
        for m in &self.servers {
            writeln!(
                out,
                "  {:<12} {:<18} {:<12} {:<15} {:>6} {:<10} {:>6}{}",
                m.service,
                m.backend,
                m.agent,
                m.address,
                m.health.map_or("-".into(), |h| h.to_string()),
                m.level.map_or("-", |l| l.as_str()),
                m.weight,
                if m.retiring { " retiring" } else { "" }
            )?;
        }
        let refused: Vec<String> = self
            .refused
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !refused.is_empty() {
            writeln!(out, "  refused messages: {}", refused.join(", "))?;
        }
        if !self.decisions.is_empty() {
            writeln!(
                out,
                "  autoscale decisions (last {} of {}):",
                self.decisions.len().min(DECISIONS_SHOWN),
                self.decisions.len()
            )?;
            let skip = self.decisions.len().saturating_sub(DECISIONS_SHOWN);
            for d in self.decisions.iter().skip(skip) {
                writeln!(
                    out,
                    "    +{:>9.1}s {:<12} {}",
                    d.at_ms as f64 / 1000.0,
                    d.service,
                    d.decision
                )?;
            }
        }
        Ok(())
    }
}

/// Shared by the listener, the sessions and the autoscaler.
#[derive(Debug)]
pub struct Master {
    config: Arc<Config>,
    fb: Feedback,
    stats: Arc<Stats>,
    state: Mutex<PoolState>,
    refused: [AtomicU64; Refusal::ALL.len()],
    started: Instant,
}

/// The snapshot of the running master, if any.
pub fn snapshot() -> Option<FeedbackSnapshot> {
    CURRENT.get().map(|m| m.snapshot())
}

impl Master {
    pub fn new(config: Arc<Config>, stats: Arc<Stats>) -> Option<Arc<Master>> {
        let fb = config.feedback.clone()?;
        Some(Arc::new(Master {
            state: Mutex::new(PoolState {
                gate: Gate::new(fb.max_age),
                ..PoolState::default()
            }),
            config,
            fb,
            stats,
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
            started: Instant::now(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic elsewhere must not stop feedback: take the data as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, r: Refusal, peer: Ipv4Addr) {
        let n = self.refused[r.index()].fetch_add(1, Relaxed) + 1;
        // Logged at a limited rate: the first few, then every 100th.
        if n <= 5 || n.is_multiple_of(100) {
            tracing::warn!(%peer, reason = r.name(), count = n, "feedback message refused");
        }
    }

    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r.index()].load(Relaxed)
    }

    pub fn snapshot(&self) -> FeedbackSnapshot {
        let st = self.lock();
        let mut servers: Vec<MemberSnapshot> = st
            .members
            .iter()
            .map(|(&(si, bi), m)| MemberSnapshot {
                service: self.config.services[si].name.clone(),
                backend: self.config.services[si].backends[bi].name.clone(),
                agent: m.agent.clone(),
                address: m.address,
                health: m.health,
                level: m.level,
                weight: self.stats.service(si).backend(bi).weight.load(Relaxed),
                retiring: m.retiring,
            })
            .collect();
        servers.sort_by(|a, b| (&a.service, &a.backend).cmp(&(&b.service, &b.backend)));
        FeedbackSnapshot {
            listen: self.fb.listen.to_string(),
            agents: st.agents,
            servers,
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.name().to_owned(), self.refused(*r)))
                .collect(),
            decisions: st.decisions.iter().cloned().collect(),
        }
    }

    /// Writes `w` unless an operator drained the backend (see module docs).
    fn publish(&self, si: usize, bi: usize, m: &mut Member, w: u32) {
        let atom = &self.stats.service(si).backend(bi).weight;
        match atom.compare_exchange(m.written, w, Relaxed, Relaxed) {
            Ok(_) => m.written = w,
            Err(0) => {
                tracing::debug!(backend = %self.config.services[si].backends[bi].name, "drained by the operator: weight left at 0");
                return;
            }
            Err(_) => {
                atom.store(w, Relaxed);
                m.written = w;
            }
        }
        self.stats.backends_changed();
    }

    /// Where an offer from `peer` fits: the (service, backend) slots, or
    /// why none.
    fn place(
        &self,
        st: &PoolState,
        peer: Ipv4Addr,
        o: &Offer,
    ) -> Result<Vec<(usize, usize)>, StartResult> {
        let mut why = StartResult::NoSuchService;
        let mut slots = Vec::new();
        for (si, s) in self.config.services.iter().enumerate() {
            if s.protocol != o.protocol {
                continue;
            }
            let port_ok = |forward: Forward, port: u16| {
                forward == o.forward
                    && if forward == Forward::Nat {
                        port == o.port
                    } else {
                        s.port == o.port
                    }
            };
            let first_slot = s.pool.as_ref().map_or(s.backends.len(), |p| p.first_slot);
            if let Some(bi) = s.backends[..first_slot]
                .iter()
                .position(|b| b.address == Some(peer) && port_ok(b.forward, b.port))
            {
                slots.push((si, bi));
                continue;
            }
            let Some(pool) = &s.pool else {
                if s.backends.iter().any(|b| port_ok(b.forward, b.port)) {
                    why = why.max_by(StartResult::NotAllowed);
                }
                continue;
            };
            if !port_ok(pool.forward, pool.port) {
                continue;
            }
            let Some(bi) =
                (first_slot..s.backends.len()).find(|&bi| s.backends[bi].address == Some(peer))
            else {
                why = why.max_by(StartResult::NotAllowed);
                continue;
            };
            if st.retired.contains(&(si, peer)) {
                why = why.max_by(StartResult::Retired);
                continue;
            }
            let held = st
                .members
                .keys()
                .filter(|&&(s2, b2)| s2 == si && b2 >= first_slot && b2 != bi)
                .count() as u32;
            if held >= pool.max_servers {
                why = why.max_by(StartResult::PoolFull);
                continue;
            }
            slots.push((si, bi));
        }
        if slots.is_empty() {
            Err(why)
        } else {
            Ok(slots)
        }
    }

    /// START: place every offer, take the slots for `session`.
    fn join(
        &self,
        session: u64,
        agent: &str,
        peer: Ipv4Addr,
        offers: &[Offer],
    ) -> (Vec<StartResult>, Vec<Vec<(usize, usize)>>) {
        let mut st = self.lock();
        let mut results = Vec::with_capacity(offers.len());
        let mut placed = Vec::with_capacity(offers.len());
        for o in offers {
            match self.place(&st, peer, o) {
                Ok(slots) => {
                    for &(si, bi) in &slots {
                        let written = self.stats.service(si).backend(bi).weight.load(Relaxed);
                        let mut m = Member {
                            session,
                            agent: agent.to_owned(),
                            address: peer,
                            smoother: Smoother::new(self.fb.alpha),
                            health: None,
                            level: None,
                            written,
                            retiring: false,
                        };
                        self.publish(si, bi, &mut m, INITIAL_WEIGHT);
                        tracing::info!(agent, %peer, service = %self.config.services[si].name, backend = %self.config.services[si].backends[bi].name, weight = m.written, "server joined");
                        st.members.insert((si, bi), m);
                    }
                    results.push(StartResult::Accepted);
                    placed.push(slots);
                }
                Err(why) => {
                    tracing::info!(agent, %peer, offer = ?o, result = ?why, "offer refused");
                    results.push(why);
                    placed.push(Vec::new());
                }
            }
        }
        (results, placed)
    }

    fn health(&self, session: u64, placed: &[Vec<(usize, usize)>], health: &[u8]) {
        let mut st = self.lock();
        for (slots, &h) in placed.iter().zip(health) {
            for key in slots {
                let Some(m) = st.members.get_mut(key).filter(|m| m.session == session) else {
                    continue;
                };
                m.health = Some(h);
                let w = m.smoother.update(h);
                if !m.retiring {
                    self.publish(key.0, key.1, m, w);
                }
            }
        }
    }

    fn levels(&self, session: u64, placed: &[Vec<(usize, usize)>], levels: &[Level]) {
        let mut st = self.lock();
        for (slots, &l) in placed.iter().zip(levels) {
            for key in slots {
                if let Some(m) = st.members.get_mut(key).filter(|m| m.session == session) {
                    if m.level != Some(l) {
                        tracing::info!(agent = %m.agent, backend = %self.config.services[key.0].backends[key.1].name, level = l.as_str(), "load level");
                    }
                    m.level = Some(l);
                }
            }
        }
    }

    /// The session's servers leave: weight 0, slots and retirements freed.
    fn leave(&self, session: u64, placed: &[Vec<(usize, usize)>], why: CloseReason) {
        let mut st = self.lock();
        for key in placed.iter().flatten() {
            if let Some(mut m) = st.members.remove(key) {
                if m.session != session {
                    st.members.insert(*key, m);
                    continue;
                }
                self.publish(key.0, key.1, &mut m, 0);
                st.retired.remove(&(key.0, m.address));
                tracing::info!(agent = %m.agent, backend = %self.config.services[key.0].backends[key.1].name, reason = ?why, "server left (drained)");
            }
        }
    }

    fn record(&self, st: &mut PoolState, si: usize, decision: String) {
        let service = self.config.services[si].name.clone();
        tracing::info!(service = %service, decision = %decision, "autoscale");
        if st.decisions.len() == DECISIONS_KEPT {
            st.decisions.pop_front();
        }
        st.decisions.push_back(DecisionRecord {
            at_ms: self.started.elapsed().as_millis() as u64,
            service,
            decision,
        });
    }

    /// One autoscale round over every service with rules.
    fn autoscale(
        &self,
        scalers: &mut [(usize, Autoscaler, Option<super::autoscale::Hold>)],
        now: Duration,
    ) {
        for (si, scaler, last_hold) in scalers.iter_mut() {
            let si = *si;
            let svc = &self.config.services[si];
            let Some(rules) = &svc.autoscale else {
                continue;
            };
            let mut st = self.lock();
            let views: Vec<ServerView> = st
                .members
                .iter()
                .filter(|(k, m)| k.0 == si && !m.retiring)
                .map(|(&(_, bi), m)| {
                    let c = &self.stats.service(si).backend(bi).counters;
                    ServerView {
                        name: svc.backends[bi].name.clone(),
                        level: m.level,
                        conns: c.conns_active.load(Relaxed) + c.conns_inactive.load(Relaxed),
                    }
                })
                .collect();
            let step = scaler.step(now, &views);
            if step.held != *last_hold {
                if let Some(h) = step.held {
                    self.record(&mut st, si, h.as_str().to_owned());
                }
                *last_hold = step.held;
            }
            let Some(d) = step.decision else { continue };
            let mut env = vec![
                ("BALANCER_SERVICE".to_owned(), svc.name.clone()),
                ("BALANCER_VIP".to_owned(), svc.vip.to_string()),
                ("BALANCER_PORT".to_owned(), svc.port.to_string()),
            ];
            let argv = match &d {
                Decision::ScaleUp { servers, target } => {
                    self.record(
                        &mut st,
                        si,
                        format!(
                            "scale-up: all {servers} servers saturated for {:?}: target {target}",
                            rules.rules.start_period
                        ),
                    );
                    env.push(("BALANCER_ACTION".into(), "scale-up".into()));
                    env.push(("BALANCER_SERVERS".into(), servers.to_string()));
                    env.push(("BALANCER_TARGET".into(), target.to_string()));
                    rules.scale_up.clone()
                }
                Decision::ScaleDown {
                    server,
                    servers,
                    target,
                } => {
                    let found = st
                        .members
                        .iter_mut()
                        .find(|(k, _)| k.0 == si && svc.backends[k.1].name == *server);
                    let Some((&(_, bi), m)) = found else { continue };
                    m.retiring = true;
                    let addr = m.address;
                    self.publish(si, bi, m, 0);
                    st.retired.insert((si, addr));
                    self.record(
                        &mut st,
                        si,
                        format!(
                            "scale-down: {server} idle for {:?}: drained, target {target}",
                            rules.rules.shutdown_period
                        ),
                    );
                    env.push(("BALANCER_ACTION".into(), "scale-down".into()));
                    env.push(("BALANCER_SERVERS".into(), servers.to_string()));
                    env.push(("BALANCER_TARGET".into(), target.to_string()));
                    env.push(("BALANCER_SERVER".into(), server.clone()));
                    env.push(("BALANCER_SERVER_ADDRESS".into(), addr.to_string()));
                    rules.scale_down.clone()
                }
            };
            drop(st);
            spawn_command(argv, env);
        }
    }
}

/// Runs an autoscale command without waiting for it; its exit is logged.
fn spawn_command(argv: Vec<String>, env: Vec<(String, String)>) {
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).envs(env).stdin(std::process::Stdio::null());
    match cmd.spawn() {
        Ok(mut child) => {
            let program = program.clone();
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(st) if st.success() => tracing::info!(%program, "autoscale command done"),
                    Ok(st) => tracing::warn!(%program, status = %st, "autoscale command failed"),
                    Err(e) => tracing::warn!(%program, error = %e, "autoscale command lost"),
                }
            });
        }
        Err(e) => tracing::error!(program = %program, error = %e, "cannot run autoscale command"),
    }
}

trait MaxBy {
    fn max_by(self, other: Self) -> Self;
}

impl MaxBy for StartResult {
    /// The more specific refusal: NoSuchService < NotAllowed < PoolFull, Retired.
    fn max_by(self, other: Self) -> Self {
        if (other as u8) > (self as u8) {
            other
        } else {
            self
        }
    }
}

/// Runs the master until the runtime stops: the listener, a task per
/// agent, and the autoscaler.
pub async fn run(master: Arc<Master>) {
    let _ = CURRENT.set(master.clone());
    let listener = match TcpListener::bind(master.fb.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %master.fb.listen, error = %e, "feedback master cannot listen");
            return;
        }
    };
    tracing::info!(listen = %master.fb.listen, "feedback master listening");
    let mut scalers: Vec<_> = master
        .config
        .services
        .iter()
        .enumerate()
        .filter_map(|(si, s)| {
            s.autoscale
                .as_ref()
                .map(|a| (si, Autoscaler::new(a.rules), None))
        })
        .collect();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(AUTOSCALE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let (stream, peer) = match acc {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "feedback accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let SocketAddr::V4(peer) = peer else { continue };
                let ip = *peer.ip();
                if !master.fb.allow.iter().any(|n| n.contains(&ip)) {
                    master.refuse(Refusal::UnknownAgent, ip);
                    continue;
                }
                let session = {
                    let mut st = master.lock();
                    if st.agents >= master.fb.max_agents {
                        drop(st);
                        master.refuse(Refusal::UnknownAgent, ip);
                        continue;
                    }
                    st.agents += 1;
                    st.next_session += 1;
                    st.next_session
                };
                let m = master.clone();
                tokio::spawn(async move {
                    serve_agent(&m, stream, ip, session).await;
                    m.lock().agents -= 1;
                });
            }
            _ = tick.tick() => {
                if !scalers.is_empty() {
                    master.autoscale(&mut scalers, t0.elapsed());
                }
            }
        }
    }
}

async fn serve_agent(master: &Arc<Master>, mut stream: TcpStream, peer: Ipv4Addr, session: u64) {
    let fb = &master.fb;
    let key = fb.key.as_bytes();
    let t0 = Instant::now();
    let mut s = MasterSession::new(
        KeepaliveParams {
            interval: fb.keepalive_interval,
            timeout: fb.keepalive_timeout,
            max_missed: fb.max_missed,
        },
        fb.handshake_timeout,
        Duration::ZERO,
    );
    let mut seq = SequenceGen::default();
    let mut placed: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut connected = true;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let sender = necp::sender_of(peer);
    tracing::info!(%peer, session, "agent connected");
    loop {
        let now = t0.elapsed();
        let wait = s
            .poll_at()
            .map_or(Duration::from_secs(3600), |at| at.saturating_sub(now));
        // A whole frame already buffered goes first; reading is cancel-safe
        // (`read_buf`), so a timer firing mid-frame loses nothing.
        let event = match necp::take_frame(&mut buf) {
            Err(r) => {
                master.refuse(r, peer);
                connected = false;
                buf.clear();
                None
            }
            Ok(Some(frame)) => {
                let got = master
                    .lock()
                    .gate
                    .receive(&frame, key, Some(sender), unix_micros());
                match got {
                    Ok(m) => Some(m.body),
                    Err(r) => {
                        master.refuse(r, peer);
                        continue;
                    }
                }
            }
            Ok(None) if connected => {
                tokio::select! {
                    r = stream.read_buf(&mut buf) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            tracing::info!(%peer, session, state = %s.state(), "agent connection closed");
                            connected = false;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep(wait) => None,
                }
            }
            Ok(None) => {
                if matches!(
                    s.state(),
                    MasterState::AwaitInit { .. } | MasterState::AwaitStart { .. }
                ) {
                    break;
                }
                tokio::time::sleep(wait).await;
                None
            }
        };
        let now = t0.elapsed();
        let ev = match event {
            None => MasterEvent::Tick,
            Some(Body::Init { name }) => MasterEvent::Init { name },
            Some(Body::Start { offers }) => {
                if !matches!(s.state(), MasterState::AwaitStart { .. }) {
                    master.refuse(Refusal::OutOfOrder, peer);
                    continue;
                }
                let (results, p) = master.join(session, s.name(), peer, &offers);
                placed = p;
                MasterEvent::Start { results }
            }
            Some(Body::KeepaliveAck { id, health }) => MasterEvent::KeepaliveAck { id, health },
            Some(Body::Level { levels }) => MasterEvent::Level(levels),
            Some(Body::Stop) => MasterEvent::Stop,
            Some(_) => {
                master.refuse(Refusal::OutOfOrder, peer);
                continue;
            }
        };
        let actions = match s.step(ev, now) {
            Ok(a) => a,
            Err(r) => {
                master.refuse(r, peer);
                continue;
            }
        };
        let mut close = false;
        for a in actions {
            match a {
                MasterAction::Send(body) => {
                    if connected {
                        let frame = necp::Message {
                            sender: 0,
                            sequence: seq.next(unix_micros()),
                            body,
                        }
                        .encode(key);
                        if stream.write_all(&frame).await.is_err() {
                            connected = false;
                        }
                    }
                }
                MasterAction::Joined { .. } => {}
                MasterAction::Health(h) => master.health(session, &placed, &h),
                MasterAction::Levels(l) => master.levels(session, &placed, &l),
                MasterAction::Left(why) => master.leave(session, &placed, why),
                MasterAction::Close(why) => {
                    tracing::info!(%peer, session, reason = ?why, "agent session closed");
                    close = true;
                }
            }
        }
        if close {
            break;
        }
    }
    // A session that ends for any other reason still frees its slots.
    master.leave(session, &placed, CloseReason::Failed);
    let _ = stream.shutdown().await;
}
