//! Connection sync on the dataplane thread: the [`crate::sync`] codec and
//! batching over a UDP socket on the front segment.
//!
//! The thread that owns the connection table also sends and applies sync
//! datagrams, so the table needs no lock: each poll round it sends due
//! batches, applies what peers sent, answers bulk requests from joining
//! nodes, and drives its own bulk pull when it is the one joining. The socket
//! is non-blocking; one `recvfrom` per round finds nothing most of the time.
//!
//! What is synced: NAT and DR entries (created, state changed, reused port
//! removed). Locally served flows are not: a peer cannot continue them (the
//! socket lives in this node's kernel); they are lost when this node dies.
//! Expiry is not synced: every node expires its copies on its own clock.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::conntrack::{ConnTable, Entry, Method};
use crate::sync::{BulkPull, PullStep, Received, SyncReceiver, SyncSender, bulk_page};

/// Requests from the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncCommand {
    /// Pull the whole table from this peer before owning buckets.
    Pull(u32),
    /// No peer to pull from: ready at once.
    Ready,
}

/// Sync endpoint of one node.
pub struct SyncIo {
    sock: UdpSocket,
    dest: SocketAddrV4,
    sender: SyncSender,
    receiver: SyncReceiver,
    pull: Option<BulkPull>,
    next_request: u32,
    commands: mpsc::Receiver<SyncCommand>,
    ready: watch::Sender<bool>,
    buf: Box<[u8; 2048]>,
}

impl std::fmt::Debug for SyncIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncIo")
            .field("dest", &self.dest)
            .finish_non_exhaustive()
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Bulk pull: resend a page request after this long, this many times.
const PULL_TIMEOUT: Duration = Duration::from_millis(200);
const PULL_RETRIES: u32 = 5;
/// Most datagrams read per poll round.
const RECV_BUDGET: usize = 64;

impl SyncIo {
    /// Opens the sync socket on the front NIC (`front_addr` is the node's
    /// own address there) and joins the sync group.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        node_id: u32,
        peers: &[u32],
        key: &[u8],
        front: &str,
        front_addr: Ipv4Addr,
        group: Ipv4Addr,
        port: u16,
        commands: mpsc::Receiver<SyncCommand>,
        ready: watch::Sender<bool>,
    ) -> io::Result<SyncIo> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.bind_device(Some(front.as_bytes()))?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
        s.join_multicast_v4(&group, &front_addr)?;
        s.set_multicast_if_v4(&front_addr)?;
        s.set_multicast_loop_v4(false)?;
        s.set_multicast_ttl_v4(1)?;
        s.set_nonblocking(true)?;
        s.set_send_buffer_size(4 << 20)?;
        s.set_recv_buffer_size(4 << 20)?;
        Ok(SyncIo {
            sock: s.into(),
            dest: SocketAddrV4::new(group, port),
            // Zero delay: every poll round sends what the round queued (one
            // datagram per round, batching the round's changes).
            sender: SyncSender::new(node_id, key, Duration::ZERO),
            receiver: SyncReceiver::new(node_id, peers, key, None),
            pull: None,
            next_request: 1,
            commands,
            ready,
            buf: Box::new([0; 2048]),
        })
    }

    /// A connection was created or changed state on this node.
    pub fn conn_changed(&mut self, e: &Entry, now_ms: u64) {
        if e.method != Method::Local {
            self.sender.push_conn(e, now_ms);
        }
    }

    /// A connection was removed because its port was reused.
    pub fn conn_removed(&mut self, e: &Entry, now_ms: u64) {
        if e.method != Method::Local {
            self.sender.push_delete(e.key, now_ms);
        }
    }

    fn send(&self, bytes: &[u8]) {
        if let Err(e) = self.sock.send_to(bytes, self.dest) {
            tracing::debug!(error = %e, "sync send failed");
        }
    }

    /// One poll round: commands, received datagrams, due batches, the pull.
    pub fn poll(&mut self, conns: &mut ConnTable, now_ms: u64) {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                SyncCommand::Ready => {
                    let _ = self.ready.send(true);
                }
                SyncCommand::Pull(peer) => {
                    let request = self.next_request;
                    self.next_request = self.next_request.wrapping_add(1);
                    let (pull, msg) =
                        BulkPull::start(peer, request, now_ms, PULL_TIMEOUT, PULL_RETRIES);
                    self.pull = Some(pull);
                    if let Some(b) = self.sender.seal(msg, unix_micros()) {
                        self.send(&b);
                    }
                    tracing::info!(peer, "pulling the connection table");
                }
            }
        }
        for _ in 0..RECV_BUDGET {
            let n = match self.sock.recv(&mut self.buf[..]) {
                Ok(n) => n,
                Err(_) => break,
            };
            let bytes = &self.buf[..n];
            match self.receiver.receive(bytes, conns, now_ms, unix_micros()) {
                Ok(Received::BulkRequest {
                    request, cursor, ..
                }) => {
                    let page = bulk_page(conns, request, cursor, now_ms);
                    if let Some(b) = self.sender.seal(page, unix_micros()) {
                        self.send(&b);
                    }
                }
                Ok(Received::BulkPage {
                    from,
                    request,
                    cursor,
                    next,
                }) => {
                    if let Some(pull) = &mut self.pull {
                        let step = pull.on_page(from, request, cursor, next, now_ms);
                        self.pull_step(step);
                    }
                }
                Ok(_) => {}
                Err(r) => tracing::debug!(reason = r.name(), "sync datagram refused"),
            }
        }
        for b in self.sender.poll(now_ms, unix_micros()) {
            self.send(&b);
        }
        if let Some(pull) = &mut self.pull {
            let step = pull.poll(now_ms);
            self.pull_step(step);
        }
    }

    fn pull_step(&mut self, step: PullStep) {
        match step {
            PullStep::Wait => {}
            PullStep::Send(msg) => {
                if let Some(b) = self.sender.seal(msg, unix_micros()) {
                    self.send(&b);
                }
            }
            PullStep::Done => {
                tracing::info!("connection table pulled");
                self.pull = None;
                let _ = self.ready.send(true);
            }
            PullStep::Failed => {
                // Better to own buckets without the peer's flows than never.
                tracing::warn!("bulk pull failed; taking buckets without the peer's table");
                self.pull = None;
                let _ = self.ready.send(true);
            }
        }
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    /// Sends what is still queued (before leaving).
    pub fn flush(&mut self, now_ms: u64) {
        for b in self.sender.flush(now_ms, unix_micros()) {
            self.send(&b);
        }
    }
}
