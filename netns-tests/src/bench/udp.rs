//! UDP load of our own: a closed loop of N outstanding request/response
//! exchanges for a fixed duration (run it inside the client namespace with
//! `Host::in_ns`), and an opener of many UDP flows from a raw socket for
//! the memory figure.
//!
//! The real servers answer with `testsrv`, which echoes each datagram after
//! `<name> <peer> `: the request's sequence number comes back as the last
//! 8 bytes of the answer.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// What happened to the requests of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    /// Answered while still outstanding.
    pub answered: u64,
    /// Not answered within the timeout (the slot moved on).
    pub lost: u64,
    /// Answers that came after their request had been given up.
    pub late: u64,
    pub send_errors: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    /// When the outstanding request was sent; `None` when the slot is idle.
    sent_at: Option<Instant>,
}

/// Bookkeeping of N request slots, each with at most one request
/// outstanding. Pure: the caller passes the time and does the I/O.
#[derive(Debug)]
pub struct Window {
    slots: Vec<Slot>,
    next_seq: u64,
    timeout: Duration,
    pub counts: Counts,
}

impl Window {
    pub fn new(n: usize, timeout: Duration) -> Window {
        Window {
            slots: vec![
                Slot {
                    seq: 0,
                    sent_at: None
                };
                n
            ],
            next_seq: 1,
            timeout,
            counts: Counts::default(),
        }
    }

    /// A new request goes out on slot `i` at `now`: its sequence number.
    pub fn start(&mut self, i: usize, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots[i] = Slot {
            seq,
            sent_at: Some(now),
        };
        self.counts.sent += 1;
        seq
    }

    /// An answer carrying `seq` arrived on slot `i`: its round-trip time if
    /// it answers the outstanding request (the slot becomes idle).
    pub fn on_answer(&mut self, i: usize, seq: u64, now: Instant) -> Option<Duration> {
        let slot = &mut self.slots[i];
        match slot.sent_at {
            Some(t) if slot.seq == seq => {
                slot.sent_at = None;
                self.counts.answered += 1;
                Some(now.saturating_duration_since(t))
            }
            _ => {
                self.counts.late += 1;
                None
            }
        }
    }

    /// Gives up requests older than the timeout (counted lost, slot idle).
    pub fn expire(&mut self, now: Instant) {
        for s in &mut self.slots {
            if let Some(t) = s.sent_at
                && now.saturating_duration_since(t) >= self.timeout
            {
                s.sent_at = None;
                self.counts.lost += 1;
            }
        }
    }

    pub fn is_idle(&self, i: usize) -> bool {
        self.slots[i].sent_at.is_none()
    }
}

/// The closed-loop UDP load: `outstanding` sockets (one flow each), each
/// with one request in flight, for `duration`.
#[derive(Debug, Clone, Copy)]
pub struct UdpLoad {
    pub target: SocketAddrV4,
    pub outstanding: usize,
    pub duration: Duration,
    /// A request unanswered after this long is lost and replaced.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UdpResult {
    pub counts: Counts,
    /// Answered requests per second (each is two packets through the path).
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

const REQUEST: [u8; 24] = *b"bench-udp-req:\0\0\0\0\0\0\0\0\0\0";

fn send(sock: &UdpSocket, seq: u64) -> bool {
    let mut req = REQUEST;
    let n = req.len();
    req[n - 8..].copy_from_slice(&seq.to_be_bytes());
    sock.send(&req).is_ok()
}

impl UdpLoad {
    /// Runs the load from the calling thread's namespace.
    pub fn run(&self) -> Result<UdpResult> {
        let socks = (0..self.outstanding)
            .map(|_| -> Result<UdpSocket> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(SocketAddr::V4(self.target))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()
            .context("opening the UDP load sockets")?;
        let mut win = Window::new(socks.len(), self.timeout);
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
        let mut buf = [0u8; 2048];
        let start = Instant::now();
        let deadline = start + self.duration;
        let mut ready = Vec::with_capacity(socks.len());
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            win.expire(now);
            for (i, s) in socks.iter().enumerate() {
                if win.is_idle(i) {
                    let seq = win.start(i, now);
                    if !send(s, seq) {
                        // Leave it outstanding: it is lost at the timeout like a dropped one.
                        win.counts.send_errors += 1;
                    }
                }
            }
            {
                let mut fds: Vec<PollFd> = socks
                    .iter()
                    .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                    .collect();
                // Wake at least every 5 ms to expire lost requests.
                poll(&mut fds, PollTimeout::from(5u8)).context("poll")?;
                ready.clear();
                ready.extend(
                    fds.iter()
                        .enumerate()
                        .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                        .map(|(i, _)| i),
                );
            }
            for &i in &ready {
                loop {
                    match socks[i].recv(&mut buf) {
                        Ok(n) if n >= 8 => {
                            let mut seq = [0u8; 8];
                            seq.copy_from_slice(&buf[n - 8..n]);
                            let now = Instant::now();
                            if let Some(rtt) = win.on_answer(i, u64::from_be_bytes(seq), now) {
                                hist.saturating_record(rtt.as_micros().max(1) as u64);
                            }
                        }
                        Ok(_) => win.counts.late += 1,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // ECONNREFUSED from an ICMP error: the request is lost.
                        Err(_) => break,
                    }
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok(UdpResult {
            counts: win.counts,
            rps: win.counts.answered as f64 / elapsed,
            p50_us: hist.value_at_quantile(0.5) as f64,
            p99_us: hist.value_at_quantile(0.99) as f64,
        })
    }
}

/// Source address and port of flow `i` when flows are spread over
/// `sources`, each with the ports 1024..=65535.
pub fn flow_source(sources: &[Ipv4Addr], i: usize) -> SocketAddrV4 {
    const PORTS: usize = 65536 - 1024;
    SocketAddrV4::new(
        sources[(i / PORTS) % sources.len()],
        (1024 + i % PORTS) as u16,
    )
}

/// How many distinct flows [`flow_source`] can make from `sources`.
pub fn flow_capacity(sources: &[Ipv4Addr]) -> usize {
    sources.len() * (65536 - 1024)
}

/// Sends one UDP datagram per flow, flows `0..count`, to `dst` from a raw
/// socket (IP header ours, sources spread as by [`flow_source`]), at about
/// `rate` datagrams per second. Returns the number sent. Runs in the
/// calling thread's namespace.
pub fn open_flows(sources: &[Ipv4Addr], dst: SocketAddrV4, count: usize, rate: u64) -> Result<u64> {
    use rewrite::build::FrameBuilder;
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    // IPPROTO_RAW implies IP_HDRINCL: we write the IP header ourselves.
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("raw socket")?;
    let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    let start = Instant::now();
    let mut sent = 0u64;
    for i in 0..count {
        let frame = FrameBuilder::udp(flow_source(sources, i), dst)
            .payload(b"bench-flow")
            .build();
        // Strip the Ethernet header: the raw socket takes the IP packet.
        let packet = frame
            .get(14..)
            .context("built frame shorter than Ethernet")?;
        let mut tries = 0;
        loop {
            match sock.send_to(packet, &to) {
                Ok(_) => break,
                // Socket buffer full: give the qdisc a moment.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e).context("raw send"),
            }
        }
        sent += 1;
        if sent.is_multiple_of(256) {
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_to_the_outstanding_request_frees_the_slot_with_its_rtt() {
        let t0 = Instant::now();
        let mut w = Window::new(2, Duration::from_millis(100));
        let seq = w.start(0, t0);
        assert!(!w.is_idle(0));
        let rtt = w.on_answer(0, seq, t0 + Duration::from_micros(250));
        assert_eq!(rtt, Some(Duration::from_micros(250)));
        assert!(w.is_idle(0));
        assert_eq!(w.counts.answered, 1);
    }

    #[test]
    fn an_unanswered_request_is_lost_at_the_timeout_and_its_answer_is_late() {
        let t0 = Instant::now();
        let mut w = Window::new(1, Duration::from_millis(100));
        let seq = w.start(0, t0);
        w.expire(t0 + Duration::from_millis(99));
        assert!(!w.is_idle(0), "expired before the timeout");
        w.expire(t0 + Duration::from_millis(100));
        assert!(w.is_idle(0));
        assert_eq!(w.counts.lost, 1);
        let next = w.start(0, t0 + Duration::from_millis(100));
        assert_eq!(w.on_answer(0, seq, t0 + Duration::from_millis(101)), None);
        assert_eq!(w.counts.late, 1);
        assert!(
            !w.is_idle(0),
            "a late answer must not free the new request's slot"
        );
        assert!(
            w.on_answer(0, next, t0 + Duration::from_millis(102))
                .is_some()
        );
        assert_eq!(
            w.counts,
            Counts {
                sent: 2,
                answered: 1,
                lost: 1,
                late: 1,
                send_errors: 0
            }
        );
    }

    #[test]
    fn flows_use_every_port_of_a_source_before_the_next_source() {
        let srcs = [Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)];
        assert_eq!(flow_source(&srcs, 0), SocketAddrV4::new(srcs[0], 1024));
        assert_eq!(flow_source(&srcs, 64511), SocketAddrV4::new(srcs[0], 65535));
        assert_eq!(flow_source(&srcs, 64512), SocketAddrV4::new(srcs[1], 1024));
        assert_eq!(flow_capacity(&srcs), 129_024);
    }
}
