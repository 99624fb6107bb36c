//! The VRRPv3 state machine of RFC 5798 §6.4, plus keepalived's FAULT state,
//! as a pure function of (event, now). The library never reads the clock:
//! `now` is the time since the driver started, and the driver sleeps until
//! [`Instance::next_deadline`].
//!
//! # Timers and units
//! Intervals travel on the wire in centiseconds (§5.2.7). Master_Down_Interval
//! (§6.1) = 3 * Master_Adver_Interval + Skew_Time, Skew_Time =
//! ((256 - Priority) * Master_Adver_Interval) / 256. We evaluate that formula
//! in **microseconds, truncating**, exactly as keepalived does
//! (`VRRP_TIMER_SKEW` on µs), not in whole centiseconds as the RFC's unit
//! suggests: at 10 cs adverts a centisecond truncation would lose up to
//! 9.99 ms of skew and two routers of different make would time out in a
//! different order. Example: priority 100, 100 cs -> skew 609 375 µs,
//! master-down 3 609 375 µs; priority 200, 10 cs -> 321 875 µs.
//!
//! # Transition table
//! (S = send advert, A+ = add addresses, A- = remove addresses,
//! G = gratuitous ARP, MD = Master_Down_Timer, AT = Adver_Timer)
//!
//! | state  | event                                   | -> state | actions |
//! |--------|-----------------------------------------|----------|---------|
//! | Init   | Startup, priority 255                   | Master   | S A+ G, AT |
//! | Init   | Startup, priority < 255                 | Backup   | MD = Master_Down_Interval |
//! | Init   | Startup while faulted                   | Fault    | - |
//! | Init   | any other event                         | Init     | - (priority/fault remembered) |
//! | Backup | Timer, MD expired                       | Master   | S A+ G, AT |
//! | Backup | Advert priority 0                       | Backup   | MD = Skew_Time (§6.4.2) |
//! | Backup | Advert, !preempt or prio >= ours        | Backup   | Master_Adver_Interval = its, MD reset |
//! | Backup | Advert, preempt and prio < ours         | Backup   | discard (our MD will fire) |
//! | Backup | Shutdown                                | Init     | - |
//! | Backup | Fault(on) / Sync(Fault on)              | Fault    | - |
//! | Backup | Sync(Master) (a group member won)       | Master   | S A+ G, AT |
//! | Backup | Priority(p)                             | Backup   | used from the next MD reset |
//! | Master | Timer, AT expired                       | Master   | S, AT |
//! | Master | Advert priority 0                       | Master   | S, AT reset (§6.4.3) |
//! | Master | Advert prio > ours, or = and src IP > ours | Backup | A-, MD = Master_Down_Interval |
//! | Master | Advert lower (or equal, lower IP)       | Master   | discard |
//! | Master | Shutdown                                | Init     | S(priority 0) A- |
//! | Master | Fault(on) / Sync(Fault on)              | Fault    | S(priority 0) A- |
//! | Master | Sync(Backup) (a group member lost)      | Backup   | A-, MD reset |
//! | Master | Priority(p), p != current               | Master   | S (new priority at once), AT |
//! | Fault  | Fault(off) and no group fault, prio 255 | Master   | S A+ G, AT |
//! | Fault  | Fault(off) and no group fault           | Backup   | MD = Master_Down_Interval |
//! | Fault  | Advert / Timer / Sync(Master|Backup)    | Fault    | - (adverts counted, ignored) |
//! | Fault  | Shutdown                                | Init     | - |
//!
//! Adverts are validated first (§7.1, [`Instance::validate`]); a dropped one
//! only bumps its counter. The owner (priority 255) discards every advert for
//! its VRID (§7.1). Preempt delay (keepalived's `preempt_delay`): for that
//! long after Startup (or leaving Fault) a backup behaves as nopreempt.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::wire::{Ipv4Info, Repr, VRRP_TTL};

/// The states of §6.4 plus FAULT (keepalived; a tracked interface or
/// script says this router must not serve).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum State {
    Initialize,
    Backup,
    Master,
    Fault,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Initialize => "Initialize",
            State::Backup => "Backup",
            State::Master => "Master",
            State::Fault => "Fault",
        })
    }
}

impl State {
    /// keepalived's notify word for the state (`MASTER`, `BACKUP`, `FAULT`).
    pub fn notify_word(self) -> &'static str {
        match self {
            State::Initialize => "STOP",
            State::Backup => "BACKUP",
            State::Master => "MASTER",
            State::Fault => "FAULT",
        }
    }
}

/// Why a received packet was dropped. `Copy`; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than its IPv4 header or VRRP message claims (§7.1).
    Truncated,
    /// Not a well-formed IPv4 header.
    BadIpHeader,
    /// TTL != 255: "MUST verify that the IP TTL is 255" (§7.1) -- the packet
    /// was routed, so it is not from our segment.
    TtlNot255,
    /// "MUST verify the VRRP version is 3" (§7.1).
    BadVersion,
    /// Type is not ADVERTISEMENT (§5.2.2: others MUST be discarded).
    BadType,
    /// "MUST verify the VRRP checksum" (§7.1).
    BadChecksum,
    /// VRID not configured on this interface (§7.1). Not an error: another
    /// router group's traffic. Counted apart from the bad ones.
    WrongVrid,
    /// Address count or list differs from ours and the sender is not the
    /// owner: "the receiver MUST drop the packet" (§7.1).
    AddressMismatch,
    /// Our own advert looped back (source = our primary address).
    FromSelf,
    /// Unicast peers are configured and the source is not one of them.
    NotPeer,
    /// Max Adver Int of 0 (§5.2.7 allows 1..4095 cs).
    BadInterval,
    /// We own the addresses (priority 255): owner discards all adverts (§7.1).
    LocalOwner,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Truncated,
        DropReason::BadIpHeader,
        DropReason::TtlNot255,
        DropReason::BadVersion,
        DropReason::BadType,
        DropReason::BadChecksum,
        DropReason::WrongVrid,
        DropReason::AddressMismatch,
        DropReason::FromSelf,
        DropReason::NotPeer,
        DropReason::BadInterval,
        DropReason::LocalOwner,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::TtlNot255 => "ttl_not_255",
            DropReason::BadVersion => "bad_version",
            DropReason::BadType => "bad_type",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::WrongVrid => "wrong_vrid",
            DropReason::AddressMismatch => "address_mismatch",
            DropReason::FromSelf => "from_self",
            DropReason::NotPeer => "not_peer",
            DropReason::BadInterval => "bad_interval",
            DropReason::LocalOwner => "local_owner",
        }
    }

    /// True for traffic that is simply not addressed to us (another VRID,
    /// our own loopback), as opposed to a malformed or hostile packet.
    pub fn is_not_for_us(self) -> bool {
        matches!(
            self,
            DropReason::WrongVrid | DropReason::FromSelf | DropReason::LocalOwner
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<super::wire::WireError> for DropReason {
    fn from(e: super::wire::WireError) -> Self {
        use super::wire::WireError as W;
        match e {
            W::Truncated => DropReason::Truncated,
            W::BadIpHeader | W::NotVrrp | W::Fragment => DropReason::BadIpHeader,
            W::BadVersion(_) => DropReason::BadVersion,
            W::BadType(_) => DropReason::BadType,
            W::BadChecksum => DropReason::BadChecksum,
        }
    }
}

/// Drop counters by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    pub fn bump(&mut self, r: DropReason) {
        self.0[r.index()] += 1;
    }
    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r.index()]
    }
    /// Sum of the drops that indicate a bad or hostile packet.
    pub fn bad_total(&self) -> u64 {
        DropReason::ALL
            .iter()
            .filter(|r| !r.is_not_for_us())
            .map(|r| self.get(*r))
            .sum()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (r.name(), self.get(*r)))
    }
}

/// Parses a packet as a raw IPv4 socket delivers it (IP header included)
/// into its IPv4 facts and VRRP message: the instance-independent checks of
/// §7.1 (completeness, version, type, checksum), each failure mapped to its
/// drop reason. TTL and the rest are checked per instance by
/// [`Instance::validate`].
pub fn parse_ip_packet(buf: &[u8]) -> Result<(Ipv4Info, Repr), DropReason> {
    Ok(super::wire::parse_ipv4_advert(buf)?)
}

/// Static configuration of one VRRP instance (already validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    pub name: String,
    /// Virtual Router Identifier 1..255 (§5.2.3).
    pub vrid: u8,
    /// Configured priority 1..255; 255 = the address owner (§5.2.4).
    pub priority: u8,
    /// Advertisement_Interval in centiseconds, 1..4095 (§6.1).
    pub advert_interval_cs: u16,
    /// Preempt_Mode (§6.1).
    pub preempt: bool,
    /// keepalived's preempt_delay: no preemption this long after startup.
    pub preempt_delay: Duration,
    /// Our primary address on the interface: advert source, tie breaker
    /// (§6.4.3), and loopback filter.
    pub primary: Ipv4Addr,
    /// The virtual addresses (the advert's address list, §5.2.9).
    pub addresses: Vec<Ipv4Addr>,
    /// Unicast peers; empty = multicast, adverts from anyone on the segment.
    pub unicast_peers: Vec<Ipv4Addr>,
}

/// Inputs to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Startup,
    Shutdown,
    /// The driver's timer fired; expired timers at `now` are processed.
    Timer,
    /// An advert arrived (already parsed by [`parse_ip_packet`]).
    Advert {
        ip: Ipv4Info,
        repr: Repr,
    },
    /// Own fault conditions (tracked interface down, weight-0 script failed).
    Fault(bool),
    /// New effective priority (base + tracked weights), already clamped.
    Priority(u8),
    /// Sync group forcing.
    Sync(SyncEvent),
}

/// What a sync group tells its other members when one changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEvent {
    /// Some member is (or no longer is) in Fault.
    Fault(bool),
    /// A member became Master: all members go Master.
    Master,
    /// A member left Master for Backup: all members go Backup.
    Backup,
}

/// What the driver must do. The machine decides, the driver performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send an advert with this priority (0 on shutdown, §6.4.3).
    SendAdvert { priority: u8 },
    /// Add the virtual addresses to the interface.
    AddAddresses,
    /// Remove the virtual addresses.
    RemoveAddresses,
    /// Start the gratuitous ARP schedule (§6.4.1: "broadcast a gratuitous ARP
    /// request containing the virtual router MAC address for each IP address").
    GratuitousArp,
    /// Stop periodic gratuitous ARP refresh.
    StopGratuitousArp,
    /// The state changed: notify scripts, publish to subscribers.
    StateChanged { from: State, to: State },
}

pub type Actions = Vec<Action>;

/// Skew_Time in µs for a priority and Master_Adver_Interval in cs (§6.1).
pub fn skew_time(priority: u8, master_adver_interval_cs: u16) -> Duration {
    let us = (256 - u64::from(priority)) * u64::from(master_adver_interval_cs) * 10_000 / 256;
    Duration::from_micros(us)
}

/// Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time (§6.1).
pub fn master_down_interval(priority: u8, master_adver_interval_cs: u16) -> Duration {
    cs(master_adver_interval_cs) * 3 + skew_time(priority, master_adver_interval_cs)
}

fn cs(v: u16) -> Duration {
    Duration::from_millis(u64::from(v) * 10)
}

/// One VRRP instance.
#[derive(Debug, Clone)]
pub struct Instance {
    cfg: InstanceConfig,
    state: State,
    /// Effective priority (configured + tracking weights).
    priority: u8,
    /// Master_Adver_Interval (§6.1), cs: learned from the master's adverts.
    master_adver_interval_cs: u16,
    master_down_timer: Option<Duration>,
    adver_timer: Option<Duration>,
    /// When preempt delay ends (set at Startup / leaving Fault).
    preempt_after: Duration,
    own_fault: bool,
    group_fault: bool,
    /// Source of the last accepted advert (the master we follow).
    master_ip: Option<Ipv4Addr>,
    master_priority: u8,
    pub drops: DropCounters,
    pub adverts_received: u64,
    pub adverts_sent: u64,
    pub transitions: u64,
    /// Arrival of the last accepted advert since the last state change: the
    /// baseline of [`Instance::max_advert_gap`].
    last_advert_at: Option<Duration>,
    /// Largest time between two consecutive accepted adverts within one
    /// state. A backup takes over when it reaches Master_Down_Interval
    /// (§6.4.2), so how close a segment comes to that (a loaded sender, a
    /// lossy link) is what an operator wants to watch before a false
    /// failover happens. Gaps across a state change are not counted (the
    /// `transitions` counter covers those).
    pub max_advert_gap: Duration,
}

impl Instance {
    pub fn new(cfg: InstanceConfig) -> Instance {
        Instance {
            priority: cfg.priority,
            master_adver_interval_cs: cfg.advert_interval_cs,
            cfg,
            state: State::Initialize,
            master_down_timer: None,
            adver_timer: None,
            preempt_after: Duration::ZERO,
            own_fault: false,
            group_fault: false,
            master_ip: None,
            master_priority: 0,
            drops: DropCounters::default(),
            adverts_received: 0,
            adverts_sent: 0,
            transitions: 0,
            last_advert_at: None,
            max_advert_gap: Duration::ZERO,
        }
    }

    pub fn config(&self) -> &InstanceConfig {
        &self.cfg
    }
    pub fn state(&self) -> State {
        self.state
    }
    pub fn priority(&self) -> u8 {
        self.priority
    }
    pub fn master_ip(&self) -> Option<Ipv4Addr> {
        match self.state {
            State::Master => Some(self.cfg.primary),
            State::Backup => self.master_ip,
            _ => None,
        }
    }
    pub fn master_adver_interval_cs(&self) -> u16 {
        self.master_adver_interval_cs
    }
    pub fn is_faulted(&self) -> bool {
        self.own_fault || self.group_fault
    }
    /// Faulted by its own tracking (not by its sync group).
    pub fn own_fault(&self) -> bool {
        self.own_fault
    }
    pub fn group_fault(&self) -> bool {
        self.group_fault
    }

    /// The earliest time at which `step(Event::Timer, ..)` has work.
    pub fn next_deadline(&self) -> Option<Duration> {
        match (self.master_down_timer, self.adver_timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn master_down(&self) -> Duration {
        master_down_interval(self.priority, self.master_adver_interval_cs)
    }

    fn preempting(&self, now: Duration) -> bool {
        self.cfg.preempt && now >= self.preempt_after
    }

    /// §7.1 checks that depend on this instance. Wire-level ones (version,
    /// completeness, checksum) were done by [`parse_ip_packet`].
    pub fn validate(&self, ip: &Ipv4Info, repr: &Repr) -> Result<(), DropReason> {
        // "MUST verify that the IP TTL is 255."
        if ip.ttl != VRRP_TTL {
            return Err(DropReason::TtlNot255);
        }
        // "MUST verify that the VRID is configured on the receiving interface"
        if repr.vrid != self.cfg.vrid {
            return Err(DropReason::WrongVrid);
        }
        if ip.src == self.cfg.primary {
            return Err(DropReason::FromSelf);
        }
        if !self.cfg.unicast_peers.is_empty() && !self.cfg.unicast_peers.contains(&ip.src) {
            return Err(DropReason::NotPeer);
        }
        // "... and the local router is not the IPvX address owner"
        if self.cfg.priority == 255 {
            return Err(DropReason::LocalOwner);
        }
        if repr.max_adver_int == 0 {
            return Err(DropReason::BadInterval);
        }
        // "MAY verify that Count IPvX Addr and the list ... match"; "If the
        // packet was not generated by the address owner ... MUST drop".
        if repr.priority != 255 && !same_set(&repr.addresses, &self.cfg.addresses) {
            return Err(DropReason::AddressMismatch);
        }
        Ok(())
    }

    /// The one place a state changes; logs `state=A=>B`.
    fn set_state(&mut self, to: State, actions: &mut Actions) {
        let from = self.state;
        if from == to {
            return;
        }
        tracing::info!(instance = %self.cfg.name, vrid = self.cfg.vrid, priority = self.priority, "state={from}=>{to}");
        self.state = to;
        self.transitions += 1;
        self.last_advert_at = None;
        actions.push(Action::StateChanged { from, to });
    }

    fn become_master(&mut self, now: Duration, a: &mut Actions) {
        self.master_down_timer = None;
        a.push(Action::SendAdvert {
            priority: self.priority,
        });
        self.adverts_sent += 1;
        a.push(Action::AddAddresses);
        a.push(Action::GratuitousArp);
        self.adver_timer = Some(now + cs(self.cfg.advert_interval_cs));
        self.master_ip = None;
        self.set_state(State::Master, a);
    }

    fn become_backup(&mut self, now: Duration, a: &mut Actions) {
        let was_master = self.state == State::Master;
        self.adver_timer = None;
        if was_master {
            a.push(Action::StopGratuitousArp);
            a.push(Action::RemoveAddresses);
        }
        self.master_down_timer = Some(now + self.master_down());
        self.set_state(State::Backup, a);
    }

    /// Leaves Master/Backup for Initialize or Fault: priority 0 if master.
    fn leave(&mut self, to: State, a: &mut Actions) {
        if self.state == State::Master {
            a.push(Action::SendAdvert { priority: 0 });
            self.adverts_sent += 1;
            a.push(Action::StopGratuitousArp);
            a.push(Action::RemoveAddresses);
        }
        self.adver_timer = None;
        self.master_down_timer = None;
        self.master_ip = None;
        self.set_state(to, a);
    }

    /// §6.4.1 entry from Initialize (and from Fault on recovery).
    fn start(&mut self, now: Duration, a: &mut Actions) {
        self.preempt_after = now + self.cfg.preempt_delay;
        self.master_adver_interval_cs = self.cfg.advert_interval_cs;
        if self.is_faulted() {
            self.set_state(State::Fault, a);
        } else if self.priority == 255 {
            self.become_master(now, a);
        } else {
            self.become_backup(now, a);
        }
    }

    /// The machine: one event at `now`, returns what the driver must do.
    pub fn step(&mut self, event: Event, now: Duration) -> Actions {
        let mut a = Actions::new();
        match event {
            Event::Startup => {
                if self.state == State::Initialize {
                    self.start(now, &mut a);
                }
            }
            Event::Shutdown => {
                if self.state != State::Initialize {
                    self.leave(State::Initialize, &mut a);
                }
            }
            Event::Timer => self.on_timer(now, &mut a),
            Event::Advert { ip, repr } => {
                if let Err(r) = self.validate(&ip, &repr) {
                    self.drops.bump(r);
                    tracing::debug!(instance = %self.cfg.name, reason = r.name(), src = %ip.src, "advert dropped");
                    return a;
                }
                self.adverts_received += 1;
                if let Some(last) = self.last_advert_at {
                    self.max_advert_gap = self.max_advert_gap.max(now.saturating_sub(last));
                }
                self.on_advert(ip.src, repr.priority, repr.max_adver_int, now, &mut a);
                // After the step: an advert that changed the state is the
                // first of the new state.
                self.last_advert_at = Some(now);
            }
            Event::Fault(on) => {
                self.own_fault = on;
                self.on_fault_change(now, &mut a);
            }
            Event::Sync(SyncEvent::Fault(on)) => {
                self.group_fault = on;
                self.on_fault_change(now, &mut a);
            }
            Event::Sync(SyncEvent::Master) => {
                if self.state == State::Backup {
                    self.become_master(now, &mut a);
                }
            }
            Event::Sync(SyncEvent::Backup) => {
                if self.state == State::Master {
                    self.become_backup(now, &mut a);
                }
            }
            Event::Priority(p) => {
                // The owner keeps 255 (keepalived does not track owners);
                // others stay within 1..254 so that 0 keeps meaning "stop".
                let p = if self.cfg.priority == 255 {
                    255
                } else {
                    p.clamp(1, 254)
                };
                let changed = p != self.priority;
                self.priority = p;
                if changed && self.state == State::Master {
                    // Tell the backups now rather than at the next tick, so
                    // a preempting backup can take over without delay.
                    a.push(Action::SendAdvert { priority: p });
                    self.adverts_sent += 1;
                    self.adver_timer = Some(now + cs(self.cfg.advert_interval_cs));
                }
            }
        }
        a
    }

    fn on_fault_change(&mut self, now: Duration, a: &mut Actions) {
        match (self.state, self.is_faulted()) {
            (State::Backup | State::Master, true) => self.leave(State::Fault, a),
            (State::Fault, false) => self.start(now, a),
            _ => {}
        }
    }

    fn on_timer(&mut self, now: Duration, a: &mut Actions) {
        match self.state {
            State::Backup => {
                if self.master_down_timer.is_some_and(|t| t <= now) {
                    self.become_master(now, a);
                }
            }
            State::Master => {
                if let Some(t) = self.adver_timer.filter(|t| *t <= now) {
                    a.push(Action::SendAdvert {
                        priority: self.priority,
                    });
                    self.adverts_sent += 1;
                    let iv = cs(self.cfg.advert_interval_cs);
                    // Keep the cadence if we were only a little late.
                    let next = t + iv;
                    self.adver_timer = Some(if next > now { next } else { now + iv });
                }
            }
            State::Initialize | State::Fault => {}
        }
    }

    fn on_advert(
        &mut self,
        src: Ipv4Addr,
        prio: u8,
        interval: u16,
        now: Duration,
        a: &mut Actions,
    ) {
        match self.state {
            State::Backup => {
                if prio == 0 {
                    // §6.4.2: "Set the Master_Down_Timer to Skew_Time".
                    self.master_down_timer =
                        Some(now + skew_time(self.priority, self.master_adver_interval_cs));
                } else if !self.preempting(now) || prio >= self.priority {
                    self.master_adver_interval_cs = interval;
                    self.master_down_timer = Some(now + self.master_down());
                    self.master_ip = Some(src);
                    self.master_priority = prio;
                }
                // else: preempt and lower priority: discard; MD will fire.
            }
            State::Master => {
                if prio == 0 {
                    // §6.4.3: answer at once so the backups re-learn us.
                    a.push(Action::SendAdvert {
                        priority: self.priority,
                    });
                    self.adverts_sent += 1;
                    self.adver_timer = Some(now + cs(self.cfg.advert_interval_cs));
                } else if prio > self.priority
                    || (prio == self.priority && u32::from(src) > u32::from(self.cfg.primary))
                {
                    self.master_adver_interval_cs = interval;
                    self.master_ip = Some(src);
                    self.master_priority = prio;
                    self.become_backup(now, a);
                }
            }
            State::Initialize | State::Fault => {}
        }
    }
}

fn same_set(a: &[Ipv4Addr], b: &[Ipv4Addr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

#[cfg(test)]
mod tests {
    use super::super::wire::VRRP_GROUP_V4;
    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
    const LOWER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
    const HIGHER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    fn cfg(priority: u8, interval_cs: u16, preempt: bool) -> InstanceConfig {
        InstanceConfig {
            name: "front".into(),
            vrid: 51,
            priority,
            advert_interval_cs: interval_cs,
            preempt,
            preempt_delay: Duration::ZERO,
            primary: ME,
            addresses: vec![VIP],
            unicast_peers: vec![],
        }
    }

    fn advert_from(src: Ipv4Addr, priority: u8, interval_cs: u16) -> Event {
        Event::Advert {
            ip: Ipv4Info {
                src,
                dst: VRRP_GROUP_V4,
                ttl: 255,
            },
            repr: Repr {
                vrid: 51,
                priority,
                max_adver_int: interval_cs,
                addresses: vec![VIP],
            },
        }
    }

    fn started(priority: u8, interval_cs: u16, preempt: bool) -> Instance {
        let mut i = Instance::new(cfg(priority, interval_cs, preempt));
        i.step(Event::Startup, Duration::ZERO);
        i
    }

    fn master(priority: u8) -> Instance {
        let mut i = started(priority, 100, true);
        let a = i.step(Event::Timer, master_down_interval(priority, 100));
        assert_eq!(i.state(), State::Master, "{a:?}");
        i
    }

    fn changed(a: &Actions) -> Option<(State, State)> {
        a.iter().find_map(|x| match x {
            Action::StateChanged { from, to } => Some((*from, *to)),
            _ => None,
        })
    }

    #[test]
    fn skew_and_master_down_at_literal_values() {
        assert_eq!(skew_time(100, 100), us(609_375));
        assert_eq!(master_down_interval(100, 100), us(3_609_375));
        assert_eq!(master_down_interval(150, 100), us(3_414_062));
        assert_eq!(master_down_interval(200, 10), us(321_875));
        assert_eq!(master_down_interval(254, 1), us(30_078));
        assert_eq!(skew_time(255, 100), us(3_906));
        assert_eq!(skew_time(1, 4095), us(40_790_039));
    }

    #[test]
    fn init_startup_owner_becomes_master_at_once() {
        let mut i = Instance::new(cfg(255, 100, true));
        let a = i.step(Event::Startup, ms(0));
        assert_eq!(i.state(), State::Master);
        assert_eq!(
            a,
            vec![
                Action::SendAdvert { priority: 255 },
                Action::AddAddresses,
                Action::GratuitousArp,
                Action::StateChanged {
                    from: State::Initialize,
                    to: State::Master
                }
            ]
        );
        assert_eq!(i.next_deadline(), Some(ms(1000)));
    }

    #[test]
    fn init_startup_non_owner_becomes_backup_with_master_down_timer() {
        let mut i = Instance::new(cfg(100, 100, true));
        let a = i.step(Event::Startup, ms(5));
        assert_eq!(i.state(), State::Backup);
        assert_eq!(
            a,
            vec![Action::StateChanged {
                from: State::Initialize,
                to: State::Backup
            }]
        );
        assert_eq!(i.next_deadline(), Some(ms(5) + us(3_609_375)));
    }

    #[test]
    fn init_startup_while_faulted_goes_to_fault() {
        let mut i = Instance::new(cfg(100, 100, true));
        assert!(i.step(Event::Fault(true), ms(0)).is_empty());
        i.step(Event::Startup, ms(0));
        assert_eq!(i.state(), State::Fault);
        assert_eq!(i.next_deadline(), None);
    }

    #[test]
    fn init_ignores_adverts_timers_and_sync() {
        let mut i = Instance::new(cfg(100, 100, true));
        assert!(i.step(advert_from(HIGHER_IP, 200, 100), ms(1)).is_empty());
        assert!(i.step(Event::Timer, ms(10_000)).is_empty());
        assert!(
            i.step(Event::Sync(SyncEvent::Master), ms(10_000))
                .is_empty()
        );
        assert!(i.step(Event::Shutdown, ms(10_000)).is_empty());
        assert_eq!(i.state(), State::Initialize);
    }

    #[test]
    fn backup_becomes_master_after_master_down_interval() {
        let mut i = started(100, 100, true);
        assert!(i.step(Event::Timer, us(3_609_374)).is_empty());
        assert_eq!(i.state(), State::Backup);
        let a = i.step(Event::Timer, us(3_609_375));
        assert_eq!(i.state(), State::Master);
        assert_eq!(a[0], Action::SendAdvert { priority: 100 });
        assert!(a.contains(&Action::AddAddresses) && a.contains(&Action::GratuitousArp));
        assert_eq!(changed(&a), Some((State::Backup, State::Master)));
        assert_eq!(i.next_deadline(), Some(us(3_609_375) + ms(1000)));
    }

    #[test]
    fn backup_advert_resets_master_down_timer_and_learns_interval() {
        let mut i = started(100, 100, true);
        // A master advertising every 10 cs: our down interval follows it.
        assert!(i.step(advert_from(HIGHER_IP, 200, 10), ms(500)).is_empty());
        assert_eq!(i.master_adver_interval_cs(), 10);
        assert_eq!(
            i.next_deadline(),
            Some(ms(500) + master_down_interval(100, 10))
        );
        assert_eq!(i.master_ip(), Some(HIGHER_IP));
        i.step(Event::Timer, ms(500) + master_down_interval(100, 10));
        assert_eq!(i.state(), State::Master);
    }

    #[test]
    fn backup_priority_zero_advert_takes_over_after_skew_time() {
        let mut i = started(100, 100, true);
        i.step(advert_from(HIGHER_IP, 200, 100), ms(1000));
        i.step(advert_from(HIGHER_IP, 0, 100), ms(1500));
        assert_eq!(i.next_deadline(), Some(ms(1500) + us(609_375)));
        i.step(Event::Timer, ms(1500) + us(609_374));
        assert_eq!(i.state(), State::Backup);
        i.step(Event::Timer, ms(1500) + us(609_375));
        assert_eq!(i.state(), State::Master);
    }

    #[test]
    fn backup_preempt_discards_lower_priority_advert() {
        let mut i = started(150, 100, true);
        i.step(advert_from(HIGHER_IP, 100, 100), ms(3000));
        // Not reset: the original timer still fires.
        assert_eq!(i.next_deadline(), Some(master_down_interval(150, 100)));
        assert_eq!(i.master_ip(), None);
        i.step(Event::Timer, master_down_interval(150, 100));
        assert_eq!(i.state(), State::Master);
    }

    #[test]
    fn backup_nopreempt_accepts_lower_priority_master() {
        let mut i = started(150, 100, false);
        i.step(advert_from(HIGHER_IP, 100, 100), ms(3000));
        assert_eq!(
            i.next_deadline(),
            Some(ms(3000) + master_down_interval(150, 100))
        );
        i.step(Event::Timer, master_down_interval(150, 100));
        assert_eq!(i.state(), State::Backup);
    }

    #[test]
    fn backup_preempt_delay_behaves_as_nopreempt_until_it_ends() {
        let mut c = cfg(150, 100, true);
        c.preempt_delay = ms(10_000);
        let mut i = Instance::new(c);
        i.step(Event::Startup, ms(0));
        // During the delay the lower-priority master is followed.
        for t in (1000..=9000).step_by(1000) {
            i.step(advert_from(HIGHER_IP, 100, 100), ms(t));
            i.step(Event::Timer, ms(t));
        }
        assert_eq!(i.state(), State::Backup);
        assert_eq!(
            i.next_deadline(),
            Some(ms(9000) + master_down_interval(150, 100))
        );
        // After it, lower adverts are discarded and we take over.
        i.step(advert_from(HIGHER_IP, 100, 100), ms(10_000));
        i.step(Event::Timer, ms(9000) + master_down_interval(150, 100));
        assert_eq!(i.state(), State::Master);
    }

    #[test]
    fn backup_shutdown_goes_to_initialize_without_advert() {
        let mut i = started(100, 100, true);
        let a = i.step(Event::Shutdown, ms(10));
        assert_eq!(
            a,
            vec![Action::StateChanged {
                from: State::Backup,
                to: State::Initialize
            }]
        );
        assert_eq!(i.next_deadline(), None);
    }

    #[test]
    fn backup_fault_and_sync_fault_go_to_fault() {
        let mut i = started(100, 100, true);
        let a = i.step(Event::Fault(true), ms(10));
        assert_eq!(
            a,
            vec![Action::StateChanged {
                from: State::Backup,
                to: State::Fault
            }]
        );
        let mut j = started(100, 100, true);
        j.step(Event::Sync(SyncEvent::Fault(true)), ms(10));
        assert_eq!(j.state(), State::Fault);
    }

    #[test]
    fn backup_sync_master_follows_group() {
        let mut i = started(100, 100, true);
        let a = i.step(Event::Sync(SyncEvent::Master), ms(10));
        assert_eq!(i.state(), State::Master);
        assert!(a.contains(&Action::AddAddresses));
        // Sync(Backup) in Backup does nothing.
        let mut j = started(100, 100, true);
        assert!(j.step(Event::Sync(SyncEvent::Backup), ms(10)).is_empty());
    }

    #[test]
    fn backup_priority_change_used_at_next_reset() {
        let mut i = started(100, 100, true);
        assert!(i.step(Event::Priority(200), ms(10)).is_empty());
        i.step(advert_from(HIGHER_IP, 250, 100), ms(1000));
        assert_eq!(
            i.next_deadline(),
            Some(ms(1000) + master_down_interval(200, 100))
        );
    }

    #[test]
    fn master_sends_advert_every_interval() {
        let mut i = master(100);
        let t0 = master_down_interval(100, 100);
        assert!(i.step(Event::Timer, t0 + ms(999)).is_empty());
        assert_eq!(
            i.step(Event::Timer, t0 + ms(1000)),
            vec![Action::SendAdvert { priority: 100 }]
        );
        // A late tick keeps the cadence.
        assert_eq!(i.step(Event::Timer, t0 + ms(2030)).len(), 1);
        assert_eq!(i.next_deadline(), Some(t0 + ms(3000)));
    }

    #[test]
    fn master_answers_priority_zero_advert_at_once() {
        let mut i = master(100);
        let a = i.step(advert_from(HIGHER_IP, 0, 100), ms(5000));
        assert_eq!(a, vec![Action::SendAdvert { priority: 100 }]);
        assert_eq!(i.next_deadline(), Some(ms(6000)));
        assert_eq!(i.state(), State::Master);
    }

    #[test]
    fn master_yields_to_higher_priority() {
        let mut i = master(100);
        let a = i.step(advert_from(LOWER_IP, 101, 10), ms(5000));
        assert_eq!(i.state(), State::Backup);
        assert_eq!(
            a,
            vec![
                Action::StopGratuitousArp,
                Action::RemoveAddresses,
                Action::StateChanged {
                    from: State::Master,
                    to: State::Backup
                }
            ]
        );
        assert_eq!(
            i.next_deadline(),
            Some(ms(5000) + master_down_interval(100, 10))
        );
    }

    #[test]
    fn master_equal_priority_higher_address_wins() {
        let mut i = master(100);
        assert!(i.step(advert_from(LOWER_IP, 100, 100), ms(5000)).is_empty());
        assert_eq!(i.state(), State::Master);
        i.step(advert_from(HIGHER_IP, 100, 100), ms(5001));
        assert_eq!(i.state(), State::Backup);
    }

    #[test]
    fn master_discards_lower_priority() {
        let mut i = master(100);
        assert!(i.step(advert_from(HIGHER_IP, 99, 100), ms(5000)).is_empty());
        assert_eq!(i.state(), State::Master);
    }

    #[test]
    fn master_shutdown_sends_priority_zero_and_removes_addresses() {
        let mut i = master(100);
        let a = i.step(Event::Shutdown, ms(5000));
        assert_eq!(
            a,
            vec![
                Action::SendAdvert { priority: 0 },
                Action::StopGratuitousArp,
                Action::RemoveAddresses,
                Action::StateChanged {
                    from: State::Master,
                    to: State::Initialize
                }
            ]
        );
        assert_eq!(i.next_deadline(), None);
    }

    #[test]
    fn master_fault_sends_priority_zero_and_goes_to_fault() {
        let mut i = master(100);
        let a = i.step(Event::Fault(true), ms(5000));
        assert_eq!(a[0], Action::SendAdvert { priority: 0 });
        assert_eq!(changed(&a), Some((State::Master, State::Fault)));
        let mut j = master(100);
        j.step(Event::Sync(SyncEvent::Fault(true)), ms(5000));
        assert_eq!(j.state(), State::Fault);
    }

    #[test]
    fn master_sync_backup_moves_to_backup() {
        let mut i = master(100);
        let a = i.step(Event::Sync(SyncEvent::Backup), ms(5000));
        assert!(a.contains(&Action::RemoveAddresses));
        assert_eq!(i.state(), State::Backup);
        assert!(
            i.step(Event::Sync(SyncEvent::Master), ms(5001))
                .contains(&Action::AddAddresses)
        );
    }

    #[test]
    fn master_priority_change_advertised_at_once() {
        let mut i = master(100);
        assert_eq!(
            i.step(Event::Priority(80), ms(5000)),
            vec![Action::SendAdvert { priority: 80 }]
        );
        assert!(i.step(Event::Priority(80), ms(5001)).is_empty());
        // Clamped to 1..254 for non-owners.
        assert_eq!(
            i.step(Event::Priority(0), ms(5002)),
            vec![Action::SendAdvert { priority: 1 }]
        );
        assert_eq!(
            i.step(Event::Priority(255), ms(5003)),
            vec![Action::SendAdvert { priority: 254 }]
        );
    }

    #[test]
    fn owner_priority_is_not_tracked() {
        let mut i = Instance::new(cfg(255, 100, true));
        i.step(Event::Startup, ms(0));
        assert!(i.step(Event::Priority(10), ms(1)).is_empty());
        assert_eq!(i.priority(), 255);
    }

    #[test]
    fn fault_cleared_returns_to_backup_or_owner_master() {
        let mut i = started(100, 100, true);
        i.step(Event::Fault(true), ms(10));
        let a = i.step(Event::Fault(false), ms(20));
        assert_eq!(changed(&a), Some((State::Fault, State::Backup)));
        assert_eq!(
            i.next_deadline(),
            Some(ms(20) + master_down_interval(100, 100))
        );
        let mut o = Instance::new(cfg(255, 100, true));
        o.step(Event::Startup, ms(0));
        o.step(Event::Fault(true), ms(10));
        o.step(Event::Fault(false), ms(20));
        assert_eq!(o.state(), State::Master);
    }

    #[test]
    fn fault_needs_both_own_and_group_clear() {
        let mut i = started(100, 100, true);
        i.step(Event::Fault(true), ms(10));
        i.step(Event::Sync(SyncEvent::Fault(true)), ms(11));
        i.step(Event::Fault(false), ms(12));
        assert_eq!(i.state(), State::Fault);
        i.step(Event::Sync(SyncEvent::Fault(false)), ms(13));
        assert_eq!(i.state(), State::Backup);
    }

    #[test]
    fn fault_ignores_adverts_timers_sync_and_shutdown_goes_to_init() {
        let mut i = started(100, 100, true);
        i.step(Event::Fault(true), ms(10));
        assert!(i.step(advert_from(HIGHER_IP, 0, 100), ms(11)).is_empty());
        assert!(i.step(Event::Timer, ms(100_000)).is_empty());
        assert!(
            i.step(Event::Sync(SyncEvent::Master), ms(100_001))
                .is_empty()
        );
        assert!(
            i.step(Event::Sync(SyncEvent::Backup), ms(100_001))
                .is_empty()
        );
        assert_eq!(i.state(), State::Fault);
        let a = i.step(Event::Shutdown, ms(100_002));
        assert_eq!(
            a,
            vec![Action::StateChanged {
                from: State::Fault,
                to: State::Initialize
            }]
        );
    }

    fn with_ip(ev: Event, f: impl FnOnce(&mut Ipv4Info, &mut Repr)) -> Event {
        match ev {
            Event::Advert { mut ip, mut repr } => {
                f(&mut ip, &mut repr);
                Event::Advert { ip, repr }
            }
            e => e,
        }
    }

    #[test]
    fn invalid_adverts_are_counted_and_change_nothing() {
        let cases: Vec<(Event, DropReason)> = vec![
            (
                with_ip(advert_from(HIGHER_IP, 0, 100), |ip, _| ip.ttl = 254),
                DropReason::TtlNot255,
            ),
            (
                with_ip(advert_from(HIGHER_IP, 0, 100), |_, r| r.vrid = 52),
                DropReason::WrongVrid,
            ),
            (advert_from(ME, 0, 100), DropReason::FromSelf),
            (
                with_ip(advert_from(HIGHER_IP, 0, 100), |_, r| r.max_adver_int = 0),
                DropReason::BadInterval,
            ),
            (
                with_ip(advert_from(HIGHER_IP, 200, 100), |_, r| {
                    r.addresses.push(ME)
                }),
                DropReason::AddressMismatch,
            ),
            (
                with_ip(advert_from(HIGHER_IP, 200, 100), |_, r| {
                    r.addresses = vec![ME]
                }),
                DropReason::AddressMismatch,
            ),
        ];
        for (ev, reason) in cases {
            // Priority-0 adverts would move a valid backup's timer; prove
            // they did not.
            let mut i = started(100, 100, true);
            let before = i.next_deadline();
            assert!(i.step(ev, ms(700)).is_empty());
            assert_eq!(i.drops.get(reason), 1, "{reason:?}");
            assert_eq!(i.next_deadline(), before);
            assert_eq!(i.state(), State::Backup);
            assert_eq!(i.adverts_received, 0);
        }
    }

    #[test]
    fn owner_accepts_mismatched_list_only_from_owner_sender() {
        let mut i = started(100, 100, true);
        let ev = with_ip(advert_from(HIGHER_IP, 255, 100), |_, r| {
            r.addresses = vec![ME]
        });
        i.step(ev, ms(700));
        assert_eq!(i.adverts_received, 1);
        let mut o = Instance::new(cfg(255, 100, true));
        o.step(Event::Startup, ms(0));
        o.step(advert_from(HIGHER_IP, 255, 100), ms(1));
        assert_eq!(o.drops.get(DropReason::LocalOwner), 1);
        assert_eq!(o.state(), State::Master);
    }

    #[test]
    fn unicast_peer_list_refuses_other_sources() {
        let mut c = cfg(100, 100, true);
        c.unicast_peers = vec![LOWER_IP];
        let mut i = Instance::new(c);
        i.step(Event::Startup, ms(0));
        i.step(advert_from(HIGHER_IP, 0, 100), ms(10));
        assert_eq!(i.drops.get(DropReason::NotPeer), 1);
        i.step(advert_from(LOWER_IP, 200, 100), ms(10));
        assert_eq!(i.master_ip(), Some(LOWER_IP));
    }

    #[test]
    fn parse_ip_packet_maps_wire_errors() {
        assert_eq!(parse_ip_packet(&[]).err(), Some(DropReason::Truncated));
        let r = Repr {
            vrid: 51,
            priority: 100,
            max_adver_int: 100,
            addresses: vec![VIP],
        };
        let mut b = super::super::wire::emit_ipv4_advert(&r, ME, VRRP_GROUP_V4, 1).expect("emit");
        assert!(parse_ip_packet(&b).is_ok());
        b[20 + 7] ^= 1;
        assert_eq!(parse_ip_packet(&b).err(), Some(DropReason::BadChecksum));
        b[20] = 0x21;
        assert_eq!(parse_ip_packet(&b).err(), Some(DropReason::BadVersion));
        b[9] = 17; // also breaks the IPv4 header checksum
        assert_eq!(parse_ip_packet(&b).err(), Some(DropReason::BadIpHeader));
    }

    #[test]
    fn max_advert_gap_tracks_the_largest_gap_within_one_state() {
        let mut i = started(100, 100, true);
        assert_eq!(i.max_advert_gap, Duration::ZERO);
        i.step(advert_from(HIGHER_IP, 200, 100), ms(700));
        assert_eq!(i.max_advert_gap, Duration::ZERO, "one advert is no gap");
        i.step(advert_from(HIGHER_IP, 200, 100), ms(1700));
        i.step(advert_from(HIGHER_IP, 200, 100), ms(3000));
        i.step(advert_from(HIGHER_IP, 200, 100), ms(3900));
        assert_eq!(i.max_advert_gap, ms(1300));
        // Dropped adverts do not count.
        i.step(
            with_ip(advert_from(HIGHER_IP, 200, 100), |ip, _| ip.ttl = 1),
            ms(4000),
        );
        assert_eq!(i.max_advert_gap, ms(1300));
        // Master-down fires: the silence that caused it is a transition, not
        // a gap; the first advert after it starts a new baseline.
        let t = ms(3900) + master_down_interval(100, 100);
        i.step(Event::Timer, t);
        assert_eq!(i.state(), State::Master);
        i.step(advert_from(LOWER_IP, 50, 100), t + ms(5000));
        assert_eq!(i.max_advert_gap, ms(1300));
        i.step(advert_from(LOWER_IP, 50, 100), t + ms(5100));
        assert_eq!(i.max_advert_gap, ms(1300));
    }

    #[test]
    fn counters_split_bad_from_not_for_us() {
        let mut c = DropCounters::default();
        c.bump(DropReason::WrongVrid);
        c.bump(DropReason::BadChecksum);
        assert_eq!(c.bad_total(), 1);
        assert_eq!(c.iter().count(), DropReason::ALL.len());
    }
}
