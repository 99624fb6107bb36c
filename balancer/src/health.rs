//! Health checks: is a backend fit for new flows, and how fast does it
//! answer.
//!
//! Three layers, as everywhere in this project:
//! - [`Health`]: the pure rise/fall hysteresis, one `step(outcome, now)`
//!   per finished check, returning the transition if any. Time is a
//!   parameter; the transition table is below and every cell is tested.
//! - [`probe`]: one check over the network (TCP connect, or HTTP GET with
//!   an expected status and optional body substring), bounded by the
//!   check's timeout; [`judge_http`] is its pure half.
//! - [`run`]: the driver, a tokio task per backend on the control-plane
//!   runtime: probe every `interval`, step the state machine, publish to
//!   the backend's [`BackendHealth`] in [`crate::Stats`], which the
//!   dataplane reads without locks (and `balancer status` shows).
//!
//! Transition table (`rise` / `fall` successes / failures in a row):
//!
//! | state | success | failure |
//! | --- | --- | --- |
//! | `Up { failures: f }` | `Up { 0 }` | `f + 1 >= fall` ? `Down { 0 }`, *went down* : `Up { f + 1 }` |
//! | `Down { successes: s }` | `s + 1 >= rise` ? `Up { 0 }`, *went up* : `Down { s + 1 }` | `Down { 0 }` |
//!
//! A backend starts `Up` (traffic flows before the first check, as with
//! keepalived's default) and so leaves within `fall` checks of failing,
//! returning after `rise` successes in a row.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The weight of a new RTT sample in the average: 1/4 (TCP's SRTT uses
/// 1/8; health checks are rarer, so the average may move faster).
pub const RTT_GAIN_DIV: u64 = 4;

/// Longest HTTP response head and body read by a check.
pub const MAX_HTTP_RESPONSE: usize = 64 * 1024;

/// What a check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection is accepted (then closed at once).
    Tcp,
    /// `GET path` over HTTP/1.0; the status must be `expect_status` and,
    /// if given, the body must contain `expect_body`.
    Http {
        path: String,
        expect_status: u16,
        expect_body: Option<String>,
    },
}

/// What to do with a backend's existing connections when it goes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// Let them run (they may still work, or time out on their own).
    Keep,
    /// Reset them: the next client packet of a TCP connection is answered
    /// with a RST, UDP flows are forgotten.
    Reset,
}

impl OnDown {
    pub const ALL: [OnDown; 2] = [OnDown::Keep, OnDown::Reset];

    pub const fn as_str(self) -> &'static str {
        match self {
            OnDown::Keep => "keep",
            OnDown::Reset => "reset",
        }
    }
}

/// A service's health check settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// Port to check instead of the backend's own.
    pub port: Option<u16>,
    pub interval: Duration,
    /// Per check; not longer than `interval`.
    pub timeout: Duration,
    /// Successes in a row to come back up.
    pub rise: u32,
    /// Failures in a row to go down.
    pub fall: u32,
    pub on_down: OnDown,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            probe: Probe::Tcp,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            on_down: OnDown::Keep,
        }
    }
}

/// Why a check failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ProbeError {
    #[error("connection refused")]
    Refused,
    #[error("timed out")]
    Timeout,
    #[error("network error")]
    Io,
    #[error("not an HTTP response")]
    BadResponse,
    #[error("unexpected HTTP status {0}")]
    Status(u16),
    #[error("body lacks the expected text")]
    Body,
}

/// The result of one check, as the state machine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success { rtt: Duration },
    Failure(ProbeError),
}

/// Hysteresis state, with the count toward the next transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up { failures: u32 },
    Down { successes: u32 },
}

impl State {
    pub const fn is_up(self) -> bool {
        matches!(self, State::Up { .. })
    }

    pub const fn name(self) -> &'static str {
        match self {
            State::Up { .. } => "up",
            State::Down { .. } => "down",
        }
    }
}

/// A transition reported by [`Health::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// One backend's health: state, RTT average, and when it last changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    state: State,
    rise: u32,
    fall: u32,
    rtt_avg_us: Option<u64>,
    /// When the state last changed (ms on the caller's clock).
    since_ms: u64,
}

impl Health {
    /// Up, with `rise` and `fall` of at least 1.
    pub fn new(rise: u32, fall: u32, now_ms: u64) -> Health {
        Health {
            state: State::Up { failures: 0 },
            rise: rise.max(1),
            fall: fall.max(1),
            rtt_avg_us: None,
            since_ms: now_ms,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_up(&self) -> bool {
        self.state.is_up()
    }

    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// Average RTT of successful checks, in microseconds.
    pub fn rtt_avg_us(&self) -> Option<u64> {
        self.rtt_avg_us
    }

    /// A check finished at `now_ms` with `outcome`.
    pub fn step(&mut self, outcome: Outcome, now_ms: u64) -> Option<Transition> {
        if let Outcome::Success { rtt } = outcome {
            let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
            self.rtt_avg_us = Some(match self.rtt_avg_us {
                None => sample,
                // avg += (sample - avg) / 4, in integers, both signs.
                Some(avg) if sample >= avg => avg + (sample - avg) / RTT_GAIN_DIV,
                Some(avg) => avg - (avg - sample) / RTT_GAIN_DIV,
            });
        }
        let ok = matches!(outcome, Outcome::Success { .. });
        let (next, transition) = match (self.state, ok) {
            (State::Up { .. }, true) => (State::Up { failures: 0 }, None),
            (State::Up { failures }, false) if failures + 1 >= self.fall => {
                (State::Down { successes: 0 }, Some(Transition::WentDown))
            }
            (State::Up { failures }, false) => (
                State::Up {
                    failures: failures + 1,
                },
                None,
            ),
            (State::Down { successes }, true) if successes + 1 >= self.rise => {
                (State::Up { failures: 0 }, Some(Transition::WentUp))
            }
            (State::Down { successes }, true) => (
                State::Down {
                    successes: successes + 1,
                },
                None,
            ),
            (State::Down { .. }, false) => (State::Down { successes: 0 }, None),
        };
        self.set_state(next, transition, now_ms);
        transition
    }

    /// The one place the state changes; transitions are logged by the
    /// driver, which knows the backend's name.
    fn set_state(&mut self, next: State, transition: Option<Transition>, now_ms: u64) {
        if transition.is_some() {
            self.since_ms = now_ms;
        }
        self.state = next;
    }
}

/// Judges a raw HTTP response (head and as much body as was read).
pub fn judge_http(
    response: &[u8],
    expect_status: u16,
    expect_body: Option<&str>,
) -> Result<(), ProbeError> {
    let line_end = response
        .windows(2)
        .position(|w| w == b"\r\n")
        .or_else(|| response.iter().position(|&b| b == b'\n'))
        .ok_or(ProbeError::BadResponse)?;
    let line = std::str::from_utf8(&response[..line_end]).map_err(|_| ProbeError::BadResponse)?;
    let mut parts = line.split_whitespace();
    let version = parts.next().ok_or(ProbeError::BadResponse)?;
    if !version.starts_with("HTTP/") {
        return Err(ProbeError::BadResponse);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ProbeError::BadResponse)?;
    if status != expect_status {
        return Err(ProbeError::Status(status));
    }
    if let Some(want) = expect_body {
        let body_start = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .or_else(|| {
                response
                    .windows(2)
                    .position(|w| w == b"\n\n")
                    .map(|i| i + 2)
            })
            .ok_or(ProbeError::Body)?;
        let body = &response[body_start..];
        if !want.is_empty() && !body.windows(want.len()).any(|w| w == want.as_bytes()) {
            return Err(ProbeError::Body);
        }
    }
    Ok(())
}

fn io_error(e: &std::io::Error) -> ProbeError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ProbeError::Refused,
        std::io::ErrorKind::TimedOut => ProbeError::Timeout,
        _ => ProbeError::Io,
    }
}

/// One check of `target`, bounded by `timeout`. Returns the time from the
/// start of the connect to the end of the answer (TCP: the connect).
pub async fn probe(
    target: SocketAddrV4,
    probe: &Probe,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let start = tokio::time::Instant::now();
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| io_error(&e))?;
        match probe {
            Probe::Tcp => Ok(()),
            Probe::Http {
                path,
                expect_status,
                expect_body,
            } => {
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: balancer-health\r\nConnection: close\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|e| io_error(&e))?;
                let mut buf = Vec::with_capacity(1024);
                (&mut stream)
                    .take(MAX_HTTP_RESPONSE as u64)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(|e| io_error(&e))?;
                judge_http(&buf, *expect_status, expect_body.as_deref())
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout),
    }
}

/// What the dataplane reads about one backend, written by the health task
/// (lock-free: relaxed atomics, each value on its own; the dataplane copies
/// them into its scheduler state on its housekeeping tick).
#[derive(Debug)]
pub struct BackendHealth {
    up: AtomicBool,
    /// Average RTT in microseconds, saturated to u32; 0 = not measured.
    rtt_us: AtomicU32,
    /// Times it went down: the dataplane notices a change (and resets the
    /// backend's connections when `on_down = reset`) even if it went down
    /// and up again between two of its reads.
    downs: AtomicU32,
    /// Checks that failed, in all.
    failures: AtomicU32,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth {
            up: AtomicBool::new(true),
            rtt_us: AtomicU32::new(0),
            downs: AtomicU32::new(0),
            failures: AtomicU32::new(0),
        }
    }
}

impl BackendHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn rtt_us(&self) -> u32 {
        self.rtt_us.load(Relaxed)
    }

    pub fn downs(&self) -> u32 {
        self.downs.load(Relaxed)
    }

    pub fn failures(&self) -> u32 {
        self.failures.load(Relaxed)
    }

    /// Publishes the state after a check.
    pub fn publish(&self, health: &Health, outcome: Outcome, transition: Option<Transition>) {
        if let Some(rtt) = health.rtt_avg_us() {
            self.rtt_us
                .store(u32::try_from(rtt).unwrap_or(u32::MAX).max(1), Relaxed);
        }
        if matches!(outcome, Outcome::Failure(_)) {
            self.failures.fetch_add(1, Relaxed);
        }
        if transition == Some(Transition::WentDown) {
            self.downs.fetch_add(1, Relaxed);
        }
        self.up.store(health.is_up(), Relaxed);
    }
}

/// One backend to check.
#[derive(Clone, Debug)]
pub struct Target {
    pub service: usize,
    pub backend: usize,
    /// For logs.
    pub name: String,
    pub addr: SocketAddrV4,
    pub check: HealthCheck,
}

/// The backends of `config` that have health checks, with the address to
/// check: the backend's address (the node's own loopback for `local`) and
/// the check's port or the backend's.
pub fn targets(config: &crate::Config) -> Vec<Target> {
    let mut v = Vec::new();
    for (si, s) in config.services.iter().enumerate() {
        let Some(check) = &s.health else { continue };
        for (bi, b) in s.backends.iter().enumerate() {
            let ip = b.address.unwrap_or(Ipv4Addr::LOCALHOST);
            let port = check.port.unwrap_or(b.port);
            v.push(Target {
                service: si,
                backend: bi,
                name: format!("{}/{}", s.name, b.name),
                addr: SocketAddrV4::new(ip, port),
                check: check.clone(),
            });
        }
    }
    v
}

/// The driver: checks every target on its interval until `shutdown`
/// resolves, publishing to each backend's [`BackendHealth`] in `stats`. Runs on the control-plane runtime; the
/// checks of different backends run concurrently, each backend's checks
/// one after another (a check never overlaps the next one of the same
/// backend, since `timeout <= interval`).
pub async fn run(
    targets: Vec<Target>,
    stats: Arc<crate::Stats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let t0 = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in targets {
        let stats = Arc::clone(&stats);
        tasks.spawn(async move {
            let mut health = Health::new(t.check.rise, t.check.fall, 0);
            let mut ticks = tokio::time::interval(t.check.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let outcome = match probe(t.addr, &t.check.probe, t.check.timeout).await {
                    Ok(rtt) => Outcome::Success { rtt },
                    Err(e) => Outcome::Failure(e),
                };
                let now_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
                let before = health.state();
                let transition = health.step(outcome, now_ms);
                if let Some(tr) = transition {
                    tracing::warn!(
                        backend = %t.name, addr = %t.addr,
                        "health state={}=>{} ({:?}; last check: {:?})",
                        before.name(), health.state().name(), tr, outcome
                    );
                } else if let Outcome::Failure(e) = outcome {
                    tracing::debug!(backend = %t.name, error = %e, "health check failed");
                }
                if let Some(s) = stats.services().get(t.service)
                    && let Some(b) = s.backends().get(t.backend)
                {
                    b.health.publish(&health, outcome, transition);
                    if transition.is_some() {
                        stats.backends_changed();
                    }
                }
            }
        });
    }
    shutdown.await;
    tasks.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ms: u64) -> Outcome {
        Outcome::Success {
            rtt: Duration::from_millis(ms),
        }
    }

    const FAIL: Outcome = Outcome::Failure(ProbeError::Refused);

    /// Every cell of the transition table.
    #[test]
    fn transition_table() {
        let (rise, fall) = (2, 3);
        let at = |state| Health {
            state,
            ..Health::new(rise, fall, 0)
        };
        let cases = [
            (
                State::Up { failures: 0 },
                ok(1),
                State::Up { failures: 0 },
                None,
            ),
            (
                State::Up { failures: 2 },
                ok(1),
                State::Up { failures: 0 },
                None,
            ),
            (
                State::Up { failures: 0 },
                FAIL,
                State::Up { failures: 1 },
                None,
            ),
            (
                State::Up { failures: 1 },
                FAIL,
                State::Up { failures: 2 },
                None,
            ),
            (
                State::Up { failures: 2 },
                FAIL,
                State::Down { successes: 0 },
                Some(Transition::WentDown),
            ),
            (
                State::Down { successes: 0 },
                ok(1),
                State::Down { successes: 1 },
                None,
            ),
            (
                State::Down { successes: 1 },
                ok(1),
                State::Up { failures: 0 },
                Some(Transition::WentUp),
            ),
            (
                State::Down { successes: 1 },
                FAIL,
                State::Down { successes: 0 },
                None,
            ),
            (
                State::Down { successes: 0 },
                FAIL,
                State::Down { successes: 0 },
                None,
            ),
        ];
        for (from, outcome, to, transition) in cases {
            let mut h = at(from);
            assert_eq!(h.step(outcome, 5), transition, "{from:?} + {outcome:?}");
            assert_eq!(h.state(), to, "{from:?} + {outcome:?}");
        }
    }

    /// Checks every 1000 ms, fall 3, rise 2: the server stops answering
    /// after the check at t=2000; the checks at 3000, 4000 fail, the one
    /// at 5000 takes it down (fall x interval after the last success); it
    /// answers again from 8000 and is up at the second success, 9000.
    #[test]
    fn hysteresis_at_literal_times() {
        let mut h = Health::new(2, 3, 0);
        let mut log = Vec::new();
        for t in (1000..=11_000).step_by(1000) {
            let answering = !(2500..8000).contains(&t);
            let o = if answering { ok(2) } else { FAIL };
            if let Some(tr) = h.step(o, t) {
                log.push((t, tr));
            }
        }
        assert_eq!(
            log,
            [(5000, Transition::WentDown), (9000, Transition::WentUp)]
        );
        assert_eq!(h.since_ms(), 9000);
        assert!(h.is_up());
    }

    #[test]
    fn a_single_failure_or_success_does_not_flap() {
        let mut h = Health::new(3, 2, 0);
        let seq = [
            FAIL,
            ok(1),
            FAIL,
            ok(1),
            FAIL,
            FAIL,
            ok(1),
            ok(1),
            FAIL,
            ok(1),
            ok(1),
            ok(1),
        ];
        let got: Vec<_> = seq
            .iter()
            .enumerate()
            .filter_map(|(i, o)| h.step(*o, i as u64).map(|t| (i, t)))
            .collect();
        assert_eq!(got, [(5, Transition::WentDown), (11, Transition::WentUp)]);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_check() {
        let mut h = Health::new(1, 1, 0);
        assert_eq!(h.step(FAIL, 1), Some(Transition::WentDown));
        assert_eq!(h.step(ok(1), 2), Some(Transition::WentUp));
        // zero is treated as one
        let mut h = Health::new(0, 0, 0);
        assert_eq!(h.step(FAIL, 1), Some(Transition::WentDown));
    }

    #[test]
    fn rtt_average_moves_a_quarter_of_the_way_and_ignores_failures() {
        let mut h = Health::new(1, 5, 0);
        assert_eq!(h.rtt_avg_us(), None);
        h.step(ok(8), 1);
        assert_eq!(h.rtt_avg_us(), Some(8000));
        h.step(ok(16), 2);
        assert_eq!(h.rtt_avg_us(), Some(10_000));
        h.step(FAIL, 3);
        assert_eq!(h.rtt_avg_us(), Some(10_000));
        h.step(ok(2), 4);
        assert_eq!(h.rtt_avg_us(), Some(8000));
    }

    #[test]
    fn board_publishes_state_rtt_and_down_count() {
        let b = BackendHealth::default();
        assert!(b.is_up() && b.rtt_us() == 0);
        let mut h = Health::new(1, 1, 0);
        let o = ok(3);
        let t = h.step(o, 1);
        b.publish(&h, o, t);
        assert_eq!((b.is_up(), b.rtt_us(), b.downs()), (true, 3000, 0));
        let t = h.step(FAIL, 2);
        b.publish(&h, FAIL, t);
        assert_eq!((b.is_up(), b.downs(), b.failures()), (false, 1, 1));
    }

    #[test]
    fn judge_http_checks_status_and_body() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nall ok\n";
        assert_eq!(judge_http(r, 200, None), Ok(()));
        assert_eq!(judge_http(r, 200, Some("ok")), Ok(()));
        assert_eq!(judge_http(r, 200, Some("fine")), Err(ProbeError::Body));
        assert_eq!(judge_http(r, 204, None), Err(ProbeError::Status(200)));
        let r = b"HTTP/1.0 503 Service Unavailable\r\n\r\n";
        assert_eq!(judge_http(r, 200, None), Err(ProbeError::Status(503)));
        assert_eq!(
            judge_http(b"SSH-2.0-OpenSSH\r\n", 200, None),
            Err(ProbeError::BadResponse)
        );
        assert_eq!(judge_http(b"", 200, None), Err(ProbeError::BadResponse));
        assert_eq!(
            judge_http(b"HTTP/1.1 200 OK\r\n", 200, Some("x")),
            Err(ProbeError::Body)
        );
        // "ok" in a header does not count as the body
        let r = b"HTTP/1.1 200 OK\r\nX: ok\r\n\r\nnope";
        assert_eq!(judge_http(r, 200, Some("ok")), Err(ProbeError::Body));
    }

    #[tokio::test]
    async fn probes_a_real_listener_and_a_closed_port() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let Ok(std::net::SocketAddr::V4(addr)) = l.local_addr() else {
            panic!("v4 listener");
        };
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhealthy").await;
            }
        });
        let t = Duration::from_secs(5);
        assert!(probe(addr, &Probe::Tcp, t).await.is_ok());
        let http = Probe::Http {
            path: "/health".into(),
            expect_status: 200,
            expect_body: Some("healthy".into()),
        };
        assert!(probe(addr, &http, t).await.is_ok());
        let _ = server.await;
        // the listener is gone: refused
        assert_eq!(probe(addr, &Probe::Tcp, t).await, Err(ProbeError::Refused));
    }
}
