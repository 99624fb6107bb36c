//! `balancer-agent`: runs on a real server, keeps a feedback session with
//! the master (the balancer node), answers its keepalives with the health
//! of each offered service, reports load levels when they change, and says
//! STOP on SIGINT / SIGTERM so the master drains the server first.
//!
//! The driver below performs what [`AgentSession`] decides; all decisions
//! (handshake, back-off, master silence, levels) are in the pure session.

pub mod config;
pub mod plugins;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heartbeat::member::SequenceGen;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::feedback::necp::{self, Gate, Message};
use crate::feedback::session::{AgentAction, AgentEvent, AgentParams, AgentSession};
use config::AgentConfig;
use plugins::Sampler;

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Runs the agent until SIGINT / SIGTERM (and the STOP exchange) ends it.
pub async fn run(cfg: AgentConfig) -> std::io::Result<()> {
    let params = AgentParams {
        name: cfg.name.clone(),
        offers: cfg.services.iter().map(|s| s.offer).collect(),
        marks: cfg.services.iter().map(|s| s.marks).collect(),
        reconnect_min: cfg.reconnect_min,
        reconnect_max: cfg.reconnect_max,
        handshake_timeout: cfg.handshake_timeout,
        stop_timeout: cfg.stop_timeout,
    };
    let key = cfg.key.as_bytes().to_vec();
    let t0 = Instant::now();
    let mut session = AgentSession::new(params, Duration::ZERO);
    let mut samplers: Vec<Sampler> = cfg
        .services
        .iter()
        .map(|s| Sampler::new(s.plugin.clone()))
        .collect();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sample_tick = tokio::time::interval(cfg.sample_interval);
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<(TcpStream, u32)> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut seq = SequenceGen::default();
    // The master's messages: sender 0, sequences strictly increasing.
    let mut gate = Gate::default();
    let mut queue: VecDeque<AgentEvent> = VecDeque::new();
    tracing::info!(agent = %cfg.name, master = %cfg.master, "agent starting");
    loop {
        if queue.is_empty() {
            match necp::take_frame(&mut buf) {
                Ok(Some(frame)) => match gate.receive(&frame, &key, Some(0), unix_micros()) {
                    Ok(m) => queue.push_back(AgentEvent::Received(m.body)),
                    Err(r) => tracing::warn!(reason = r.name(), "message from the master refused"),
                },
                Ok(None) => {}
                Err(r) => {
                    tracing::warn!(
                        reason = r.name(),
                        "unreadable stream from the master: closing"
                    );
                    conn = None;
                    buf.clear();
                    queue.push_back(AgentEvent::Disconnected);
                }
            }
        }
        if queue.is_empty() {
            let now = t0.elapsed();
            let wait = session
                .poll_at()
                .map_or(Duration::from_secs(3600), |at| at.saturating_sub(now));
            let ev = tokio::select! {
                _ = term.recv() => AgentEvent::Shutdown,
                _ = int.recv() => AgentEvent::Shutdown,
                _ = sample_tick.tick() => {
                    let mut loads = Vec::with_capacity(samplers.len());
                    for s in &mut samplers {
                        loads.push(s.sample(cfg.sample_interval).await);
                    }
                    AgentEvent::Sample(loads)
                }
                r = async {
                    match conn.as_mut() {
                        Some((s, _)) => s.read_buf(&mut buf).await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    Ok(n) if n > 0 => continue,
                    _ => {
                        conn = None;
                        buf.clear();
                        tracing::info!("connection to the master closed");
                        AgentEvent::Disconnected
                    }
                },
                _ = tokio::time::sleep(wait) => AgentEvent::Tick,
            };
            queue.push_back(ev);
        }
        let Some(ev) = queue.pop_front() else {
            continue;
        };
        let actions = match session.step(ev, t0.elapsed()) {
            Ok(a) => a,
            Err(r) => {
                tracing::warn!(reason = r.name(), state = %session.state(), "message refused");
                continue;
            }
        };
        for a in actions {
            match a {
                AgentAction::Connect => {
                    let attempt = tokio::time::timeout(
                        cfg.handshake_timeout,
                        TcpStream::connect(SocketAddr::V4(cfg.master)),
                    )
                    .await;
                    match attempt {
                        Ok(Ok(s)) => {
                            buf.clear();
                            let local = match s.local_addr() {
                                Ok(SocketAddr::V4(a)) => *a.ip(),
                                _ => Ipv4Addr::UNSPECIFIED,
                            };
                            let _ = s.set_nodelay(true);
                            tracing::info!(master = %cfg.master, %local, "connected");
                            conn = Some((s, necp::sender_of(local)));
                            queue.push_back(AgentEvent::Connected);
                        }
                        Ok(Err(e)) => {
                            tracing::info!(master = %cfg.master, error = %e, "cannot connect");
                            queue.push_back(AgentEvent::Disconnected);
                        }
                        Err(_) => {
                            tracing::info!(master = %cfg.master, "connect timed out");
                            queue.push_back(AgentEvent::Disconnected);
                        }
                    }
                }
                AgentAction::Send(body) => {
                    if let Some((s, sender)) = conn.as_mut() {
                        let frame = Message {
                            sender: *sender,
                            sequence: seq.next(unix_micros()),
                            body,
                        }
                        .encode(&key);
                        if s.write_all(&frame).await.is_err() {
                            conn = None;
                            queue.push_back(AgentEvent::Disconnected);
                        }
                    }
                }
                AgentAction::Close => {
                    if let Some((mut s, _)) = conn.take() {
                        let _ = s.shutdown().await;
                    }
                }
                AgentAction::Joined(results) => {
                    tracing::info!(?results, "START answered");
                }
                AgentAction::Exit => {
                    tracing::info!("agent stopped");
                    return Ok(());
                }
            }
        }
    }
}
