//! The drill's HTTP load generator. It runs inside the client namespace
//! (call [`run`] from [`crate::topo::Host::in_ns`]) and does two things:
//!
//! - **New connections at a fixed rate** (open loop, as `httperf --rate`
//!   in BENCH.md): request `i` is due at `t0 + i / rate` whatever happened
//!   to the earlier ones, one `GET` per connection (`Connection: close`),
//!   one deadline for connect + request + response. Each request is timed
//!   and its outcome kept; a request that cannot be sent because too many
//!   are in flight is kept as failed (`not_sent`), never silently skipped.
//! - **Long-lived keep-alive connections**, opened before the fault, each
//!   sending a request every `long_every`; each records who served it
//!   (`X-Server`) and when and how it broke.
//!
//! Bounded: the number of requests is `rate x duration`, every socket has
//! a deadline, and [`run`] returns after the last deadline.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fail {
    /// No answer to the SYN before the deadline.
    ConnectTimeout,
    /// The SYN was answered by a RST.
    Refused,
    /// A RST on an established connection.
    Reset,
    /// Connected, but the response did not arrive before the deadline.
    Timeout,
    /// The peer closed before a complete response.
    Closed,
    /// An answer that is not `HTTP/1.1 200` with a body.
    BadResponse,
    /// ICMP unreachable (no ARP answer, no route).
    Unreachable,
    /// Too many requests in flight: not sent at its time.
    NotSent,
    /// Anything else (socket errors on our side).
    Other,
}

impl Fail {
    pub fn name(self) -> &'static str {
        match self {
            Fail::ConnectTimeout => "connect_timeout",
            Fail::Refused => "refused",
            Fail::Reset => "reset",
            Fail::Timeout => "timeout",
            Fail::Closed => "closed",
            Fail::BadResponse => "bad_response",
            Fail::Unreachable => "unreachable",
            Fail::NotSent => "not_sent",
            Fail::Other => "other",
        }
    }

    fn of_connect(e: &std::io::Error) -> Fail {
        match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Fail::ConnectTimeout,
            ErrorKind::ConnectionRefused => Fail::Refused,
            ErrorKind::ConnectionReset => Fail::Reset,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Fail::Unreachable,
            _ => Fail::Other,
        }
    }

    fn of_io(e: &std::io::Error) -> Fail {
        match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Fail::Timeout,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Fail::Reset,
            ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe => Fail::Closed,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Fail::Unreachable,
            _ => Fail::Other,
        }
    }
}

/// What the load generator does.
#[derive(Clone, Debug)]
pub struct Spec {
    pub target: SocketAddrV4,
    /// Source addresses, used in turn.
    pub sources: Vec<Ipv4Addr>,
    /// New connections per second.
    pub rate: f64,
    /// How long new connections are started.
    pub duration: Duration,
    /// Deadline of one request (connect + request + response).
    pub timeout: Duration,
    /// Bound on requests in flight; beyond it a request is `not_sent`.
    pub max_inflight: usize,
    /// Number of long-lived connections.
    pub long_lived: usize,
    /// When (after t0) the long-lived connections are opened.
    pub long_open: Duration,
    /// Period of requests on a long-lived connection.
    pub long_every: Duration,
    /// A long-lived connection whose request gets no answer within this is
    /// broken (TCP would go on retransmitting; the service is gone for it).
    pub long_timeout: Duration,
}

/// One short request.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Since t0.
    pub start: Duration,
    pub end: Duration,
    /// The answering server's name, or why it failed.
    pub result: Result<String, Fail>,
}

/// One long-lived connection.
#[derive(Clone, Debug, Serialize)]
pub struct LongConn {
    pub source: String,
    /// `X-Server` of its first answer (a real server `rsN` or a node `lbN`).
    pub server: Option<String>,
    /// Requests answered.
    pub answered: u32,
    /// Since t0, when the request that failed was sent.
    #[serde(skip)]
    pub broke: Option<Duration>,
    pub error: Option<Fail>,
    /// Longest answer time seen (a stall that the connection survived).
    #[serde(skip)]
    pub worst: Duration,
}

/// Everything a load run saw.
#[derive(Debug, Default)]
pub struct Run {
    /// Sorted by start.
    pub samples: Vec<Sample>,
    pub long: Vec<LongConn>,
}

const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n";
const REQUEST_KEEP: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";

fn connect(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream, Fail> {
    let s =
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(|_| Fail::Other)?;
    s.bind(&SocketAddrV4::new(src, 0).into())
        .map_err(|_| Fail::Other)?;
    s.connect_timeout(&dst.into(), timeout)
        .map_err(|e| Fail::of_connect(&e))?;
    let s: TcpStream = s.into();
    s.set_nodelay(true).map_err(|_| Fail::Other)?;
    Ok(s)
}

fn remaining(deadline: Instant) -> Result<Duration, Fail> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Fail::Timeout)
    } else {
        Ok(left)
    }
}

/// Reads one HTTP response (status line, headers, `Content-Length` body)
/// before `deadline`; returns its `X-Server`.
fn read_response<R: BufRead>(r: &mut R, s: &TcpStream, deadline: Instant) -> Result<String, Fail> {
    let mut line = String::new();
    let read_line = |r: &mut R, line: &mut String| -> Result<(), Fail> {
        line.clear();
        s.set_read_timeout(Some(remaining(deadline)?))
            .map_err(|_| Fail::Other)?;
        match r.read_line(line) {
            Ok(0) => Err(Fail::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(Fail::of_io(&e)),
        }
    };
    read_line(r, &mut line)?;
    if line.split_whitespace().nth(1) != Some("200") {
        return Err(Fail::BadResponse);
    }
    let (mut len, mut server) = (0usize, String::new());
    loop {
        read_line(r, &mut line)?;
        if line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().map_err(|_| Fail::BadResponse)?;
            } else if k.eq_ignore_ascii_case("x-server") {
                server = v.to_string();
            }
        }
    }
    let mut body = vec![0u8; len];
    s.set_read_timeout(Some(remaining(deadline)?))
        .map_err(|_| Fail::Other)?;
    r.read_exact(&mut body).map_err(|e| Fail::of_io(&e))?;
    if server.is_empty() {
        server = "?".into();
    }
    Ok(server)
}

/// One request on a new connection from `src`, answered within `timeout`.
/// Returns the `X-Server` of the answer.
pub fn one_request(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> Result<String, Fail> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(src, dst, timeout)?;
    s.set_write_timeout(Some(remaining(deadline)?))
        .map_err(|_| Fail::Other)?;
    s.write_all(REQUEST_CLOSE).map_err(|e| Fail::of_io(&e))?;
    let mut r = BufReader::new(s.try_clone().map_err(|_| Fail::Other)?);
    read_response(&mut r, &s, deadline)
}

fn long_lived(
    spec: Arc<Spec>,
    src: Ipv4Addr,
    t0: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
) -> LongConn {
    let mut c = LongConn {
        source: src.to_string(),
        server: None,
        answered: 0,
        broke: None,
        error: None,
        worst: Duration::ZERO,
    };
    let opened = Instant::now();
    let s = match connect(src, spec.target, spec.long_timeout) {
        Ok(s) => s,
        Err(e) => {
            c.broke = Some(opened - t0);
            c.error = Some(e);
            return c;
        }
    };
    if let Ok(a) = s.local_addr() {
        c.source = a.to_string();
    }
    let Ok(rd) = s.try_clone() else {
        c.error = Some(Fail::Other);
        return c;
    };
    let mut r = BufReader::new(rd);
    let mut w = &s;
    let mut next = Instant::now();
    while next < end && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let sent = Instant::now();
        let deadline = sent + spec.long_timeout;
        let res = w
            .write_all(REQUEST_KEEP)
            .map_err(|e| Fail::of_io(&e))
            .and_then(|_| read_response(&mut r, &s, deadline));
        match res {
            Ok(server) => {
                c.worst = c.worst.max(sent.elapsed());
                c.answered += 1;
                match &c.server {
                    None => c.server = Some(server),
                    Some(prev) if *prev != server => {
                        // A different server answered mid-connection: the
                        // connection is no longer the one it was.
                        c.broke = Some(sent - t0);
                        c.error = Some(Fail::BadResponse);
                        return c;
                    }
                    Some(_) => {}
                }
            }
            Err(e) => {
                c.broke = Some(sent - t0);
                c.error = Some(e);
                return c;
            }
        }
        next += spec.long_every;
    }
    c
}

/// Runs the load from the calling thread's namespace, starting at `t0`
/// (which may be in the future). `stop` ends the long-lived connections
/// early. Returns when every request has finished or hit its deadline.
pub fn run(spec: Spec, t0: Instant, stop: Arc<AtomicBool>) -> Run {
    let spec = Arc::new(spec);
    let n = (spec.rate * spec.duration.as_secs_f64()).round() as usize;
    let end = t0 + spec.duration;
    let (tx, rx) = mpsc::channel::<Sample>();
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut long_threads = Vec::new();
    let mut long_opened = spec.long_lived == 0;
    let mut not_sent = Vec::new();
    let mut workers = Vec::new();
    for i in 0..n {
        let due = t0 + Duration::from_secs_f64(i as f64 / spec.rate);
        if !long_opened && due >= t0 + spec.long_open {
            long_opened = true;
            for k in 0..spec.long_lived {
                let (spec, stop) = (spec.clone(), stop.clone());
                let src = spec.sources[k % spec.sources.len()];
                long_threads.push(
                    std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || long_lived(spec, src, t0, end, stop)),
                );
            }
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if inflight.load(Ordering::Relaxed) >= spec.max_inflight {
            let at = Instant::now() - t0;
            not_sent.push(Sample {
                start: at,
                end: at,
                result: Err(Fail::NotSent),
            });
            continue;
        }
        inflight.fetch_add(1, Ordering::Relaxed);
        let (tx, spec, busy) = (tx.clone(), spec.clone(), inflight.clone());
        let src = spec.sources[i % spec.sources.len()];
        let h = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let start = Instant::now();
                let result = one_request(src, spec.target, spec.timeout);
                let _ = tx.send(Sample {
                    start: start - t0,
                    end: Instant::now() - t0,
                    result,
                });
                busy.fetch_sub(1, Ordering::Relaxed);
            });
        match h {
            Ok(h) => workers.push(h),
            Err(_) => {
                inflight.fetch_sub(1, Ordering::Relaxed);
                let at = Instant::now() - t0;
                not_sent.push(Sample {
                    start: at,
                    end: at,
                    result: Err(Fail::NotSent),
                });
            }
        }
        // Reap finished workers now and then so their handles do not pile up.
        if workers.len() > 256 {
            workers.retain(|h| !h.is_finished());
        }
    }
    drop(tx);
    let mut samples: Vec<Sample> = rx.iter().collect();
    for h in workers {
        let _ = h.join();
    }
    samples.extend(not_sent);
    samples.sort_by_key(|s| s.start);
    let long = long_threads
        .into_iter()
        .filter_map(|h| h.ok())
        .filter_map(|h| h.join().ok())
        .collect();
    Run { samples, long }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A loopback server answering like testsrv; runs until the test ends.
    fn server() -> SocketAddrV4 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = match l.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound v4"),
        };
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().expect("clone"));
                    let mut w = s;
                    loop {
                        let mut close = false;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line.to_ascii_lowercase().contains("connection: close") {
                                close = true;
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let _ = w.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Server: rs9\r\n\r\nabc",
                        );
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn fixed_rate_load_counts_every_request_and_long_lived_ones_survive() {
        let target = server();
        let spec = Spec {
            target,
            sources: vec![Ipv4Addr::LOCALHOST],
            rate: 100.0,
            duration: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            max_inflight: 100,
            long_lived: 2,
            long_open: Duration::from_millis(50),
            long_every: Duration::from_millis(100),
            long_timeout: Duration::from_secs(1),
        };
        let run = run(spec, Instant::now(), Arc::new(AtomicBool::new(false)));
        assert_eq!(run.samples.len(), 50);
        assert!(run.samples.iter().all(|s| s.result.as_deref() == Ok("rs9")));
        assert!(run.samples.windows(2).all(|w| w[0].start <= w[1].start));
        assert_eq!(run.long.len(), 2);
        for c in &run.long {
            assert_eq!(c.server.as_deref(), Some("rs9"));
            assert!(c.broke.is_none(), "{c:?}");
            assert!(c.answered >= 2, "{c:?}");
        }
    }

    #[test]
    fn refused_connections_are_counted_as_refused() {
        // A port nothing listens on: the SYN is answered by a RST.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let r = one_request(
            Ipv4Addr::LOCALHOST,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            Duration::from_millis(500),
        );
        assert_eq!(r, Err(Fail::Refused));
    }
}
