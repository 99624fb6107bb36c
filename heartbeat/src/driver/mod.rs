//! The driver: performs what the pure machines decide.
//!
//! # Threads
//! - **protocol thread** (`hb-proto`, one OS thread, no async runtime): owns
//!   the VRRP and membership sockets, the state machines, the gratuitous-ARP
//!   schedules and the link checks; it sleeps in `poll(2)` until the earliest
//!   deadline. Nothing else runs on it, so a busy runtime or a slow netlink
//!   call cannot delay an advert. If allowed (root, `node.realtime = true`),
//!   it switches itself to SCHED_FIFO priority 10, so a CPU-bound process on
//!   the same core cannot starve it either; otherwise it logs and stays at
//!   normal priority.
//! - **exec** ([`exec::run`], a tokio task): netlink alias changes and
//!   notify scripts, in order.
//! - **scripts** ([`run_scripts`], tokio tasks): tracked scripts.
//! - **ARP responder** (optional, own thread): only for a non-interface ARP
//!   MAC; the balancer replaces it with its dataplane and [`NodeStatus::arp_answer`].
//!   The standalone daemon also keeps the kernel from answering for those
//!   VIPs with the interface MAC ([`kernel_arp`]).
//!
//! The state stream is a `tokio::sync::watch` of [`NodeStatus`]; `borrow()`
//! is usable from plain threads too.

pub mod exec;
pub mod kernel_arp;
pub mod sock;

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use socket2::Socket;
use tokio::sync::watch;

use crate::arp::{self, ArpMac, ArpView, GarpSchedule, Mac};
use crate::config::{Config, Notify};
use crate::member::{Heartbeat, Member, Membership, SequenceGen};
use crate::vrrp::group::{Router, Tracked, effective_priority};
use crate::vrrp::state::{
    Action, DropCounters, Event, Instance, InstanceConfig, State, parse_ip_packet,
};
use crate::vrrp::wire::{Repr, VRRP_GROUP_V4, emit_ipv4_advert};
use exec::{Alias, Exec};

/// One instance as the balancer and `heartbeat status` see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceStatus {
    pub name: String,
    pub interface: String,
    pub vrid: u8,
    pub state: State,
    pub priority: u8,
    pub base_priority: u8,
    pub master: Option<Ipv4Addr>,
    pub addresses: Vec<Ipv4Addr>,
    /// The MAC the VIPs are announced with.
    pub arp_mac: String,
    #[serde(skip)]
    pub arp_mac_bytes: Mac,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub transitions: u64,
    /// Largest gap between two received adverts within one state, in µs
    /// ([`Instance::max_advert_gap`]); 0 until two have arrived.
    pub max_advert_gap_us: u64,
    pub drops: BTreeMap<String, u64>,
}

/// The whole node: what the state stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct NodeStatus {
    pub node_id: u32,
    pub node_name: String,
    pub instances: Vec<InstanceStatus>,
    /// Drops before an instance was found (wire errors, other VRIDs).
    pub interface_drops: BTreeMap<String, BTreeMap<String, u64>>,
    pub members: Vec<Member>,
    /// Live node ids including ours (empty without membership).
    pub live: Vec<u32>,
    pub member_refused: BTreeMap<String, u64>,
    /// Set once the protocol thread has shut down.
    pub stopped: bool,
}

impl NodeStatus {
    pub fn arp_views(&self) -> Vec<ArpView> {
        self.instances
            .iter()
            .map(|i| ArpView {
                state: i.state,
                vrid: i.vrid,
                addresses: i.addresses.clone(),
                mac: i.arp_mac_bytes,
            })
            .collect()
    }
    /// Should this node answer ARP for `target`, and with which MAC.
    pub fn arp_answer(&self, target: Ipv4Addr) -> Option<Mac> {
        arp::arp_answer(&self.arp_views(), target)
    }
    pub fn instance(&self, name: &str) -> Option<&InstanceStatus> {
        self.instances.iter().find(|i| i.name == name)
    }
}

/// Commands into the protocol thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Shutdown,
    ScriptResult {
        script: usize,
        ok: bool,
    },
    /// Load (permille) reported in membership heartbeats.
    SetLoad(u16),
    /// Bucket-table epoch reported in membership heartbeats.
    SetEpoch(u64),
    /// Weight reported in membership heartbeats; sent at once. Weight 0
    /// says "leaving": peers stop counting this node as an owner of flows
    /// without waiting for the dead interval.
    SetWeight(u16),
}

/// Sends commands to the protocol thread and wakes it.
#[derive(Debug, Clone)]
pub struct Commander {
    tx: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
}

impl Commander {
    pub fn send(&self, c: Command) {
        if self.tx.send(c).is_ok() {
            let _ = nix::unistd::write(&*self.wake, &[1u8]);
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Handle {
    pub status: watch::Receiver<Arc<NodeStatus>>,
    pub commander: Commander,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// Shuts down (priority 0, aliases removed, stop notify queued) and
    /// waits for the protocol thread.
    pub fn shutdown(mut self) {
        self.commander.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("interface {0}: {1}")]
    Interface(String, io::Error),
    #[error("socket on {0}: {1}")]
    Socket(String, io::Error),
    #[error("thread: {0}")]
    Thread(io::Error),
}

struct Iface {
    name: String,
    index: u32,
    mac: Mac,
    primary: Ipv4Addr,
    vrrp: Socket,
    garp: Socket,
    drops: DropCounters,
}

struct InstCtx {
    iface: usize,
    aliases: Vec<Alias>,
    garp: GarpSchedule,
    mac: Mac,
    notify: Notify,
    track_ifaces: Vec<String>,
    scripts: Vec<usize>,
    base: u8,
    peers: Vec<Ipv4Addr>,
}

struct MemberCtx {
    sock: Socket,
    table: Membership,
    seq: SequenceGen,
    key: Vec<u8>,
    dests: Vec<Ipv4Addr>,
    port: u16,
    interval: Duration,
    next_send: Duration,
    weight: u16,
    load: u16,
    epoch: u64,
    digest: [u8; 16],
}

struct Proto {
    start: Instant,
    node_id: u32,
    node_name: String,
    router: Router,
    ctx: Vec<InstCtx>,
    ifaces: Vec<Iface>,
    groups: Vec<(String, Vec<usize>, Notify, Option<State>)>,
    scripts_ok: Vec<bool>,
    scripts_weight: Vec<i32>,
    member: Option<MemberCtx>,
    exec: tokio::sync::mpsc::UnboundedSender<Exec>,
    status: watch::Sender<Arc<NodeStatus>>,
    cmd: mpsc::Receiver<Command>,
    wake_rx: OwnedFd,
    ip_ident: u16,
    next_link_check: Duration,
    next_publish: Duration,
    dirty: bool,
}

const LINK_CHECK: Duration = Duration::from_millis(50);
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// The members' announced weights (a change of weight, e.g. to 0 when a
/// node leaves, changes who owns flows and is published at once).
fn weights(table: &Membership) -> Vec<(u32, Option<(u16, u64)>)> {
    table
        .members()
        .map(|m| (m.node_id, m.last.as_ref().map(|h| (h.weight, h.epoch))))
        .collect()
}

/// Starts a node: opens every socket (errors here are configuration or
/// permission problems), then runs the protocol thread. The caller must
/// drive the returned [`Exec`] receiver with [`exec::run`] on a tokio
/// runtime, and may start [`run_scripts`].
pub fn start(
    cfg: &Config,
) -> Result<(Handle, tokio::sync::mpsc::UnboundedReceiver<Exec>), StartError> {
    let mut ifaces: Vec<Iface> = Vec::new();
    let mut ctx = Vec::new();
    let mut instances = Vec::new();
    let mut label_n: BTreeMap<String, usize> = BTreeMap::new();
    for ic in &cfg.instances {
        let fi = match ifaces.iter().position(|f| f.name == ic.interface) {
            Some(i) => i,
            None => {
                let e = |x| StartError::Interface(ic.interface.clone(), x);
                let index = sock::ifindex(&ic.interface).map_err(e)?;
                let mac = sock::interface_mac(&ic.interface)
                    .map_err(|x| StartError::Interface(ic.interface.clone(), x))?;
                let primary = match ic.primary {
                    Some(p) => p,
                    None => sock::interface_ipv4(&ic.interface)
                        .map_err(|x| StartError::Interface(ic.interface.clone(), x))?,
                };
                let vrrp = sock::vrrp_socket(&ic.interface, index, primary)
                    .map_err(|x| StartError::Socket(ic.interface.clone(), x))?;
                let garp = sock::packet_socket(index, arp::ETHERTYPE_ARP)
                    .map_err(|x| StartError::Socket(ic.interface.clone(), x))?;
                // The GARP socket only sends; keep its receive queue empty.
                let _ = garp.set_recv_buffer_size(0);
                ifaces.push(Iface {
                    name: ic.interface.clone(),
                    index,
                    mac,
                    primary,
                    vrrp,
                    garp,
                    drops: DropCounters::default(),
                });
                ifaces.len() - 1
            }
        };
        let f = &ifaces[fi];
        let aliases = ic
            .virtual_addresses
            .iter()
            .map(|(a, p)| {
                let n = label_n.entry(ic.interface.clone()).or_insert(0);
                let label = format!("{}:{}", ic.interface, *n);
                *n += 1;
                Alias {
                    addr: *a,
                    prefix: *p,
                    label,
                }
            })
            .collect();
        instances.push(Instance::new(InstanceConfig {
            name: ic.name.clone(),
            vrid: ic.vrid,
            priority: ic.priority,
            advert_interval_cs: ic.advert_interval_cs,
            preempt: ic.preempt,
            preempt_delay: ic.preempt_delay,
            primary: f.primary,
            addresses: ic.virtual_addresses.iter().map(|(a, _)| *a).collect(),
            unicast_peers: ic.unicast_peers.clone(),
        }));
        ctx.push(InstCtx {
            iface: fi,
            aliases,
            garp: GarpSchedule::new(ic.garp),
            mac: ic.arp_mac.resolve(ic.vrid, f.mac),
            notify: ic.notify.clone(),
            track_ifaces: ic.track_interfaces.clone(),
            scripts: ic.track_scripts.clone(),
            base: ic.priority,
            peers: ic.unicast_peers.clone(),
        });
    }
    let member = match &cfg.membership {
        None => None,
        Some(m) => {
            let e = |x| StartError::Interface(m.interface.clone(), x);
            let index = sock::ifindex(&m.interface).map_err(e)?;
            let primary = sock::interface_ipv4(&m.interface)
                .map_err(|x| StartError::Interface(m.interface.clone(), x))?;
            let sock = sock::member_socket(&m.interface, index, primary, m.port, m.group)
                .map_err(|x| StartError::Socket(m.interface.clone(), x))?;
            let mut dests: Vec<Ipv4Addr> = m.group.into_iter().collect();
            dests.extend(m.peers.iter().filter(|p| **p != primary));
            Some(MemberCtx {
                sock,
                table: Membership::new(cfg.node_id, &m.nodes, m.interval, m.max_age),
                seq: SequenceGen::default(),
                key: m.key.clone(),
                dests,
                port: m.port,
                interval: m.interval,
                next_send: Duration::ZERO,
                weight: m.weight,
                load: 0,
                epoch: 0,
                digest: cfg.digest,
            })
        }
    };
    let groups_idx: Vec<Vec<usize>> = cfg.sync_groups.iter().map(|g| g.members.clone()).collect();
    let groups = cfg
        .sync_groups
        .iter()
        .map(|g| (g.name.clone(), g.members.clone(), g.notify.clone(), None))
        .collect();
    let (exec_tx, exec_rx) = tokio::sync::mpsc::unbounded_channel();
    let (status_tx, status_rx) = watch::channel(Arc::new(NodeStatus::default()));
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (wake_rx, wake_tx) = nix::unistd::pipe().map_err(|e| StartError::Thread(e.into()))?;
    set_nonblocking(&wake_rx).map_err(StartError::Thread)?;
    set_nonblocking(&wake_tx).map_err(StartError::Thread)?;
    let realtime = cfg.realtime;
    let mut p = Proto {
        start: Instant::now(),
        node_id: cfg.node_id,
        node_name: cfg.node_name.clone(),
        router: Router::new(instances, groups_idx),
        ctx,
        ifaces,
        groups,
        scripts_ok: vec![true; cfg.scripts.len()],
        scripts_weight: cfg.scripts.iter().map(|s| s.weight).collect(),
        member,
        exec: exec_tx,
        status: status_tx,
        cmd: cmd_rx,
        wake_rx,
        ip_ident: 0,
        next_link_check: Duration::ZERO,
        next_publish: Duration::ZERO,
        dirty: true,
    };
    p.publish(false);
    let thread = std::thread::Builder::new()
        .name("hb-proto".into())
        .spawn(move || {
            if realtime {
                if sock::try_realtime(10) {
                    tracing::info!("protocol thread runs SCHED_FIFO 10");
                } else {
                    tracing::warn!("SCHED_FIFO refused; protocol thread at normal priority");
                }
            }
            p.run();
        })
        .map_err(StartError::Thread)?;
    Ok((
        Handle {
            status: status_rx,
            commander: Commander {
                tx: cmd_tx,
                wake: Arc::new(wake_tx),
            },
            thread: Some(thread),
        },
        exec_rx,
    ))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Proto {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn run(&mut self) {
        let now = self.now();
        self.check_links(now, true);
        let acts = self.router.step_all(Event::Startup, now);
        self.perform(acts, now);
        let mut buf = vec![0u8; 65536];
        loop {
            let now = self.now();
            if now >= self.next_link_check {
                self.check_links(now, false);
            }
            let acts = self.router.step_all(Event::Timer, now);
            self.perform(acts, now);
            self.send_garps(now);
            self.membership_tick(now);
            if self.dirty && now >= self.next_publish {
                self.publish(false);
            }
            let timeout = self.poll_timeout(self.now());
            self.wait(timeout);
            let now = self.now();
            for fi in 0..self.ifaces.len() {
                self.drain_vrrp(fi, &mut buf, now);
            }
            self.drain_member(&mut buf, now);
            if self.dirty && self.next_publish == Duration::ZERO {
                self.publish(false);
            }
            while let Ok(c) = self.cmd.try_recv() {
                match c {
                    Command::Shutdown => {
                        self.shutdown();
                        return;
                    }
                    Command::ScriptResult { script, ok } => {
                        if let Some(s) = self.scripts_ok.get_mut(script) {
                            *s = ok;
                        }
                        self.apply_tracking(now, false);
                    }
                    Command::SetLoad(l) => {
                        if let Some(m) = &mut self.member {
                            m.load = l;
                        }
                    }
                    Command::SetEpoch(e) => {
                        if let Some(m) = &mut self.member {
                            m.epoch = e;
                            m.next_send = Duration::ZERO;
                        }
                    }
                    Command::SetWeight(w) => {
                        if let Some(m) = &mut self.member {
                            m.weight = w;
                            m.next_send = Duration::ZERO;
                        }
                    }
                }
            }
        }
    }

    fn shutdown(&mut self) {
        let now = self.now();
        let acts = self.router.step_all(Event::Shutdown, now);
        self.perform(acts, now);
        let _ = self.exec.send(Exec::Done);
        self.publish(true);
        tracing::info!("protocol thread stopped");
    }

    fn poll_timeout(&self, now: Duration) -> Duration {
        let mut d = self.next_link_check;
        let mut consider = |x: Option<Duration>| {
            if let Some(x) = x {
                d = d.min(x);
            }
        };
        consider(self.router.next_deadline());
        for c in &self.ctx {
            consider(c.garp.next_deadline());
        }
        if let Some(m) = &self.member {
            consider(Some(m.next_send));
            consider(m.table.next_deadline());
        }
        if self.dirty {
            consider(Some(self.next_publish));
        }
        d.saturating_sub(now)
    }

    fn wait(&mut self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut push = |fd: i32| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
        };
        push(self.wake_rx.as_raw_fd());
        for f in &self.ifaces {
            push(f.vrrp.as_raw_fd());
        }
        if let Some(m) = &self.member {
            push(m.sock.as_raw_fd());
        }
        // Round up so that we never wake just before a deadline.
        let ms = timeout.as_micros().div_ceil(1000).min(60_000) as i32;
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let mut b = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake_rx, &mut b), Ok(n) if n > 0) {}
    }

    fn drain_vrrp(&mut self, fi: usize, buf: &mut [u8], now: Duration) {
        for _ in 0..256 {
            let n = match sock::recv_from(&self.ifaces[fi].vrrp, buf) {
                Ok(Some((n, _))) => n,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vrrp receive failed");
                    return;
                }
            };
            let (ip, repr) = match parse_ip_packet(&buf[..n]) {
                Ok(x) => x,
                Err(r) => {
                    self.ifaces[fi].drops.bump(r);
                    self.dirty = true;
                    continue;
                }
            };
            let target = (0..self.ctx.len()).find(|&i| {
                self.ctx[i].iface == fi && self.router.instances[i].config().vrid == repr.vrid
            });
            match target {
                Some(i) => {
                    let acts = self.router.step(i, Event::Advert { ip, repr }, now);
                    self.perform(acts, now);
                }
                None => self.ifaces[fi]
                    .drops
                    .bump(crate::vrrp::state::DropReason::WrongVrid),
            }
            self.dirty = true;
        }
    }

    fn drain_member(&mut self, buf: &mut [u8], now: Duration) {
        let Some(m) = &mut self.member else { return };
        for _ in 0..256 {
            match sock::recv_from(&m.sock, buf) {
                Ok(Some((n, src))) => {
                    let before = weights(&m.table);
                    match m.table.receive(&buf[..n], &m.key, now, unix_micros()) {
                        Ok(Some(ev)) => {
                            tracing::info!(?ev, "membership");
                            // Who owns flows depends on it: publish now.
                            self.next_publish = Duration::ZERO;
                        }
                        Ok(None) => {
                            if weights(&m.table) != before {
                                self.next_publish = Duration::ZERO;
                            }
                        }
                        Err(r) => tracing::debug!(reason = r.name(), "heartbeat refused"),
                    }
                    // Accepted (the sequence moved): note where it came from.
                    if let (Some(src), Ok(hb)) = (src, Heartbeat::decode(&buf[..n], &m.key))
                        && m.table
                            .members()
                            .any(|x| x.last.as_ref().is_some_and(|l| l.sequence == hb.sequence))
                    {
                        m.table.note_addr(hb.node_id, src);
                    }
                    self.dirty = true;
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "membership receive failed");
                    return;
                }
            }
        }
    }

    fn membership_tick(&mut self, now: Duration) {
        let prio = self.router.instances.first().map_or(0, |i| i.priority());
        let Some(m) = &mut self.member else { return };
        for ev in m.table.expire(now) {
            tracing::info!(?ev, "membership");
            self.dirty = true;
            self.next_publish = Duration::ZERO;
        }
        if now < m.next_send {
            return;
        }
        let hb = Heartbeat {
            node_id: self.node_id,
            priority: prio,
            weight: m.weight,
            load: m.load,
            interval_ms: m.interval.as_millis().min(u128::from(u16::MAX)) as u16,
            config_digest: m.digest,
            epoch: m.epoch,
            sequence: m.seq.next(unix_micros()),
        };
        let bytes = hb.encode(&m.key);
        for d in &m.dests {
            let to = socket2::SockAddr::from(std::net::SocketAddrV4::new(*d, m.port));
            if let Err(e) = m.sock.send_to(&bytes, &to) {
                tracing::debug!(error = %e, dst = %d, "heartbeat send failed");
            }
        }
        m.next_send = now + m.interval;
    }

    /// Link state -> fault, and tracking -> priority.
    fn check_links(&mut self, now: Duration, force: bool) {
        self.next_link_check = now + LINK_CHECK;
        self.apply_tracking(now, force);
    }

    fn apply_tracking(&mut self, now: Duration, force: bool) {
        let mut running: BTreeMap<String, bool> = BTreeMap::new();
        let mut up = |n: &str| {
            *running
                .entry(n.to_string())
                .or_insert_with(|| sock::interface_running(n))
        };
        for i in 0..self.ctx.len() {
            let c = &self.ctx[i];
            let mut tracked = vec![Tracked {
                weight: 0,
                ok: up(&self.ifaces[c.iface].name),
            }];
            tracked.extend(c.track_ifaces.iter().map(|n| Tracked {
                weight: 0,
                ok: up(n),
            }));
            tracked.extend(c.scripts.iter().map(|&s| Tracked {
                weight: self.scripts_weight.get(s).copied().unwrap_or(0),
                ok: self.scripts_ok.get(s).copied().unwrap_or(true),
            }));
            let (prio, fault) = effective_priority(c.base, &tracked);
            let inst = &self.router.instances[i];
            if force || inst.own_fault() != fault {
                if inst.own_fault() != fault {
                    tracing::info!(instance = %inst.config().name, fault, "tracking");
                }
                let acts = self.router.step(i, Event::Fault(fault), now);
                self.perform(acts, now);
            }
            if self.router.instances[i].priority() != prio {
                let acts = self.router.step(i, Event::Priority(prio), now);
                self.perform(acts, now);
                self.dirty = true;
            }
        }
    }

    fn perform(&mut self, acts: Vec<(usize, Action)>, now: Duration) {
        for (i, a) in acts {
            let c = &mut self.ctx[i];
            let inst = &self.router.instances[i];
            let f = &self.ifaces[c.iface];
            match a {
                Action::SendAdvert { priority } => {
                    let ic = inst.config();
                    let repr = Repr {
                        vrid: ic.vrid,
                        priority,
                        max_adver_int: ic.advert_interval_cs,
                        addresses: ic.addresses.clone(),
                    };
                    let dests: Vec<Ipv4Addr> = if c.peers.is_empty() {
                        vec![VRRP_GROUP_V4]
                    } else {
                        c.peers.clone()
                    };
                    for d in dests {
                        self.ip_ident = self.ip_ident.wrapping_add(1);
                        let sent = emit_ipv4_advert(&repr, f.primary, d, self.ip_ident)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                            .and_then(|pkt| sock::send_ip(&f.vrrp, &pkt, d));
                        if let Err(e) = sent {
                            tracing::debug!(instance = %ic.name, error = %e, "advert send failed");
                        }
                    }
                }
                Action::AddAddresses => {
                    let _ = self.exec.send(Exec::AddAliases {
                        ifindex: f.index,
                        aliases: c.aliases.clone(),
                    });
                }
                Action::RemoveAddresses => {
                    let _ = self.exec.send(Exec::RemoveAliases {
                        ifindex: f.index,
                        aliases: c.aliases.clone(),
                    });
                }
                Action::GratuitousArp => c.garp.start(now),
                Action::StopGratuitousArp => c.garp.stop(),
                Action::StateChanged { to, .. } => {
                    let _ = self.exec.send(Exec::Notify {
                        notify: c.notify.clone(),
                        kind: "INSTANCE",
                        name: inst.config().name.clone(),
                        state: to,
                        priority: inst.priority(),
                    });
                    self.dirty = true;
                    self.next_publish = Duration::ZERO;
                }
            }
        }
        self.group_notify();
        self.send_garps(now);
        if self.dirty && now >= self.next_publish {
            self.publish(false);
        }
    }

    /// A sync group's notify runs when all its members agree on a new state.
    fn group_notify(&mut self) {
        for (name, members, notify, last) in &mut self.groups {
            let Some(&first) = members.first() else {
                continue;
            };
            let s = self.router.instances[first].state();
            if members
                .iter()
                .all(|&m| self.router.instances[m].state() == s)
                && *last != Some(s)
            {
                *last = Some(s);
                let prio = self.router.instances[first].priority();
                let _ = self.exec.send(Exec::Notify {
                    notify: notify.clone(),
                    kind: "GROUP",
                    name: name.clone(),
                    state: s,
                    priority: prio,
                });
            }
        }
    }

    fn send_garps(&mut self, now: Duration) {
        for c in &mut self.ctx {
            let n = c.garp.due(now);
            if n == 0 {
                continue;
            }
            let f = &self.ifaces[c.iface];
            for _ in 0..n {
                for a in &c.aliases {
                    let sent = arp::gratuitous_arp(a.addr, c.mac, f.mac)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                        .and_then(|frame| {
                            sock::send_frame(&f.garp, f.index, arp::BROADCAST, &frame)
                        });
                    if let Err(e) = sent {
                        tracing::debug!(error = %e, "gratuitous arp send failed");
                    }
                }
            }
        }
    }

    fn publish(&mut self, stopped: bool) {
        let instances = self
            .router
            .instances
            .iter()
            .zip(&self.ctx)
            .map(|(i, c)| InstanceStatus {
                name: i.config().name.clone(),
                interface: self.ifaces[c.iface].name.clone(),
                vrid: i.config().vrid,
                state: i.state(),
                priority: i.priority(),
                base_priority: c.base,
                master: i.master_ip(),
                addresses: i.config().addresses.clone(),
                arp_mac: fmt_mac(c.mac),
                arp_mac_bytes: c.mac,
                adverts_sent: i.adverts_sent,
                adverts_received: i.adverts_received,
                transitions: i.transitions,
                max_advert_gap_us: u64::try_from(i.max_advert_gap.as_micros()).unwrap_or(u64::MAX),
                drops: i
                    .drops
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            })
            .collect();
        let interface_drops = self
            .ifaces
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    f.drops
                        .iter()
                        .filter(|(_, v)| *v > 0)
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
            })
            .collect();
        let (members, live, member_refused) = match &self.member {
            Some(m) => (
                m.table.members().cloned().collect(),
                m.table.live(),
                m.table
                    .refused
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            ),
            None => (Vec::new(), Vec::new(), BTreeMap::new()),
        };
        let s = NodeStatus {
            node_id: self.node_id,
            node_name: self.node_name.clone(),
            instances,
            interface_drops,
            members,
            live,
            member_refused,
            stopped,
        };
        self.status.send_replace(Arc::new(s));
        self.dirty = false;
        self.next_publish = self.now() + PUBLISH_EVERY;
    }
}

pub fn fmt_mac(m: Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Runs the tracked scripts (keepalived `vrrp_script`): each every
/// `interval`, killed after `timeout` (a timeout is a failure), with
/// rise/fall hysteresis; changes go to the protocol thread.
pub async fn run_scripts(cfg: &Config, cmd: Commander) {
    let mut tasks = Vec::new();
    for (idx, s) in cfg.scripts.iter().cloned().enumerate() {
        let cmd = cmd.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut streak) = (true, 0u32);
            loop {
                let mut c = tokio::process::Command::new(&s.command[0]);
                c.args(&s.command[1..]).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).kill_on_drop(true);
                let res = match c.spawn() {
                    Ok(mut child) => matches!(tokio::time::timeout(s.timeout, child.wait()).await, Ok(Ok(st)) if st.success()),
                    Err(e) => {
                        tracing::warn!(script = %s.name, error = %e, "script failed to start");
                        false
                    }
                };
                if res == ok {
                    streak = 0;
                } else {
                    streak += 1;
                    let need = if res { s.rise } else { s.fall };
                    if streak >= need {
                        ok = res;
                        streak = 0;
                        tracing::info!(script = %s.name, ok, "script state");
                        cmd.send(Command::ScriptResult { script: idx, ok });
                    }
                }
                tokio::time::sleep(s.interval).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Starts the standalone ARP responder threads for interfaces whose
/// instances use a non-interface MAC. They answer from the state stream.
pub fn start_arp_responders(
    cfg: &Config,
    status: watch::Receiver<Arc<NodeStatus>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut ifs: Vec<&str> = cfg
        .instances
        .iter()
        .filter(|i| i.arp_mac != ArpMac::Interface)
        .map(|i| i.interface.as_str())
        .collect();
    ifs.dedup();
    let mut out = Vec::new();
    for name in ifs {
        let (Ok(index), Ok(mac)) = (sock::ifindex(name), sock::interface_mac(name)) else {
            tracing::warn!(interface = name, "arp responder: no such interface");
            continue;
        };
        let r = match arp::ArpResponder::open(index, mac) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(interface = name, error = %e, "arp responder socket");
                continue;
            }
        };
        let st = status.clone();
        let stop = stop.clone();
        let ifname = name.to_string();
        let spawned = std::thread::Builder::new()
            .name("hb-arp".into())
            .spawn(move || {
                r.run(
                    |t| {
                        let s = st.borrow();
                        // Only instances on this interface.
                        let views: Vec<ArpView> = s
                            .instances
                            .iter()
                            .filter(|i| i.interface == ifname)
                            .map(|i| ArpView {
                                state: i.state,
                                vrid: i.vrid,
                                addresses: i.addresses.clone(),
                                mac: i.arp_mac_bytes,
                            })
                            .collect();
                        arp::arp_answer(&views, t)
                    },
                    &stop,
                )
            });
        match spawned {
            Ok(h) => out.push(h),
            Err(e) => tracing::warn!(error = %e, "arp responder thread"),
        }
    }
    out
}
