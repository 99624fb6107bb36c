//! ARP for the virtual addresses: who answers with which MAC (a pure
//! decision on the instance state), gratuitous ARP frames and their schedule,
//! and an AF_PACKET responder that is a separate component so the balancer's
//! dataplane, which owns its own AF_PACKET socket on the front NIC, can
//! answer from the same decision instead.

use std::net::Ipv4Addr;
use std::time::Duration;

use rewrite::ethernet::{MIN_FRAME_LEN, ethertype};
use rewrite::{ArpOp, ArpPacket, ArpRepr, EthernetFrame, MacAddr, WireError};

use crate::vrrp::state::State;

pub type Mac = [u8; 6];
pub const BROADCAST: Mac = [0xff; 6];
pub const ETHERTYPE_ARP: u16 = ethertype::ARP;

/// Which MAC the VIPs are announced and answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArpMac {
    /// The interface's own MAC; the kernel answers ARP (the alias is local).
    #[default]
    Interface,
    /// The VRRP virtual MAC 00:00:5e:00:01:VRID (RFC 5798 §7.3).
    VirtualRouter,
    /// A configured MAC, e.g. the cluster multicast MAC of multicast mode.
    Fixed(Mac),
}

/// RFC 5798 §7.3: the IPv4 virtual router MAC.
pub fn vrrp_virtual_mac(vrid: u8) -> Mac {
    [0x00, 0x00, 0x5e, 0x00, 0x01, vrid]
}

impl ArpMac {
    pub fn resolve(self, vrid: u8, interface_mac: Mac) -> Mac {
        match self {
            ArpMac::Interface => interface_mac,
            ArpMac::VirtualRouter => vrrp_virtual_mac(vrid),
            ArpMac::Fixed(m) => m,
        }
    }
    /// Whether user space must answer ARP (the kernel would use its own MAC).
    pub fn needs_responder(self) -> bool {
        self != ArpMac::Interface
    }
}

/// What the ARP decision needs to know about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpView {
    pub state: State,
    pub vrid: u8,
    pub addresses: Vec<Ipv4Addr>,
    pub mac: Mac,
}

/// Should this node answer an ARP request for `target`, and with which MAC?
/// Only the master of an instance holding `target` answers (RFC 5798 §6.4.3:
/// "MUST respond to ARP requests for the IPv4 address(es)"; backups "MUST
/// NOT respond", §6.4.2).
pub fn arp_answer(views: &[ArpView], target: Ipv4Addr) -> Option<Mac> {
    views
        .iter()
        .find(|v| v.state == State::Master && v.addresses.contains(&target))
        .map(|v| v.mac)
}

/// An Ethernet frame carrying an Ethernet/IPv4 ARP packet, parsed with
/// `rewrite`'s views (the workspace's one owner of the ARP format); `None`
/// for anything else.
pub fn parse_arp_frame(f: &[u8]) -> Option<ArpRepr> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() != ethertype::ARP {
        return None;
    }
    let p = ArpPacket::new_checked(eth.payload()).ok()?;
    Some(ArpRepr::parse(&p))
}

/// A gratuitous ARP (a broadcast request for our own address, RFC 5227
/// §3 "ARP Announcement"), announcing `vip` at `mac`. The Ethernet source is
/// the interface MAC: a multicast cluster MAC is not a valid source address.
pub fn gratuitous_arp(vip: Ipv4Addr, mac: Mac, interface_mac: Mac) -> Result<Vec<u8>, WireError> {
    let mut f = vec![0u8; MIN_FRAME_LEN];
    let n = rewrite::arp::write_gratuitous(&mut f, vip, MacAddr(mac), MacAddr(interface_mac))?;
    f.truncate(n);
    Ok(f)
}

/// The reply to `req` saying `req.target_ip` is at `mac`, sent to the
/// requester from the interface MAC.
pub fn arp_reply(req: &ArpRepr, mac: Mac, interface_mac: Mac) -> Result<Vec<u8>, WireError> {
    let mut f = vec![0u8; MIN_FRAME_LEN];
    let n = rewrite::arp::write_reply(&mut f, req, MacAddr(mac), MacAddr(interface_mac))?;
    f.truncate(n);
    Ok(f)
}

/// Gratuitous ARP timing (keepalived's names): `repeat` ARPs per burst
/// (`garp_master_repeat`), `interval` between them (`garp_interval`), a
/// second burst `master_delay` after becoming master (`garp_master_delay`,
/// zero = none), and a burst of `refresh_repeat` every `refresh` while master
/// (`garp_master_refresh`, zero = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GarpConfig {
    pub repeat: u32,
    pub interval: Duration,
    pub master_delay: Duration,
    pub refresh: Duration,
    pub refresh_repeat: u32,
}

impl Default for GarpConfig {
    fn default() -> Self {
        GarpConfig {
            repeat: 5,
            interval: Duration::ZERO,
            master_delay: Duration::from_secs(5),
            refresh: Duration::ZERO,
            refresh_repeat: 1,
        }
    }
}

/// The pure gratuitous-ARP schedule of one instance.
#[derive(Debug, Clone, Default)]
pub struct GarpSchedule {
    cfg: GarpConfig,
    /// Pending sends (sorted times).
    pending: Vec<Duration>,
    next_refresh: Option<Duration>,
}

impl GarpSchedule {
    pub fn new(cfg: GarpConfig) -> Self {
        GarpSchedule {
            cfg,
            pending: Vec::new(),
            next_refresh: None,
        }
    }

    fn burst(&mut self, at: Duration, n: u32) {
        for k in 0..n {
            self.pending.push(at + self.cfg.interval * k);
        }
        self.pending.sort();
    }

    /// Became master at `now`.
    pub fn start(&mut self, now: Duration) {
        self.pending.clear();
        self.burst(now, self.cfg.repeat);
        if !self.cfg.master_delay.is_zero() {
            self.burst(now + self.cfg.master_delay, self.cfg.repeat);
        }
        self.next_refresh = (!self.cfg.refresh.is_zero()).then(|| now + self.cfg.refresh);
    }

    pub fn stop(&mut self) {
        self.pending.clear();
        self.next_refresh = None;
    }

    /// How many ARPs (per address) are due at `now`; they are consumed.
    pub fn due(&mut self, now: Duration) -> u32 {
        if let Some(r) = self.next_refresh.filter(|r| *r <= now) {
            self.burst(r, self.cfg.refresh_repeat);
            self.next_refresh = Some(r + self.cfg.refresh);
        }
        let n = self.pending.iter().take_while(|t| **t <= now).count();
        self.pending.drain(..n);
        n as u32
    }

    pub fn next_deadline(&self) -> Option<Duration> {
        match (self.pending.first().copied(), self.next_refresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Blocking AF_PACKET ARP responder for one interface. It answers requests
/// for which `decide(target)` returns a MAC. Runs on its own thread until
/// `stop` is set. The balancer skips this and calls [`arp_answer`] from its
/// own dataplane.
pub struct ArpResponder {
    sock: socket2::Socket,
    ifindex: u32,
    interface_mac: Mac,
}

impl std::fmt::Debug for ArpResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArpResponder")
            .field("ifindex", &self.ifindex)
            .finish()
    }
}

impl ArpResponder {
    pub fn open(ifindex: u32, interface_mac: Mac) -> std::io::Result<ArpResponder> {
        let sock = crate::driver::sock::packet_socket(ifindex, ETHERTYPE_ARP)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(ArpResponder {
            sock,
            ifindex,
            interface_mac,
        })
    }

    pub fn run(
        &self,
        decide: impl Fn(Ipv4Addr) -> Option<Mac>,
        stop: &std::sync::atomic::AtomicBool,
    ) {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "arp responder receive failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // SAFETY: recv initialised the first n bytes.
            let frame: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            let Some(req) = parse_arp_frame(frame) else {
                continue;
            };
            if req.op != ArpOp::Request || req.sender_ip == req.target_ip {
                continue; // replies and other nodes' gratuitous ARPs
            }
            if let Some(mac) = decide(req.target_ip) {
                let sent = arp_reply(&req, mac, self.interface_mac)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                    .and_then(|reply| {
                        crate::driver::sock::send_frame(
                            &self.sock,
                            self.ifindex,
                            req.sender_mac.0,
                            &reply,
                        )
                    });
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "arp reply send failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const IFMAC: Mac = [2, 0, 0, 0, 0, 0x11];

    #[test]
    fn only_master_answers_with_its_mac() {
        let mut v = vec![ArpView {
            state: State::Backup,
            vrid: 51,
            addresses: vec![VIP],
            mac: vrrp_virtual_mac(51),
        }];
        assert_eq!(arp_answer(&v, VIP), None);
        v[0].state = State::Master;
        assert_eq!(arp_answer(&v, VIP), Some([0, 0, 0x5e, 0, 1, 51]));
        assert_eq!(arp_answer(&v, Ipv4Addr::new(198, 18, 0, 101)), None);
        v[0].state = State::Fault;
        assert_eq!(arp_answer(&v, VIP), None);
    }

    #[test]
    fn arp_mac_modes_resolve() {
        let cluster = [0x01, 0x00, 0x5e, 0x7f, 0x00, 0x64];
        assert_eq!(ArpMac::Interface.resolve(7, IFMAC), IFMAC);
        assert_eq!(
            ArpMac::VirtualRouter.resolve(7, IFMAC),
            [0, 0, 0x5e, 0, 1, 7]
        );
        assert_eq!(ArpMac::Fixed(cluster).resolve(7, IFMAC), cluster);
        assert!(!ArpMac::Interface.needs_responder());
        assert!(ArpMac::Fixed(cluster).needs_responder());
    }

    #[test]
    fn gratuitous_arp_round_trips() {
        let f = gratuitous_arp(VIP, [0, 0, 0x5e, 0, 1, 51], IFMAC).expect("frame");
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(&f[6..12], &IFMAC);
        let r = parse_arp_frame(&f).expect("arp");
        assert_eq!((r.op, r.sender_ip, r.target_ip), (ArpOp::Request, VIP, VIP));
        assert_eq!(r.sender_mac, MacAddr([0, 0, 0x5e, 0, 1, 51]));
    }

    #[test]
    fn reply_answers_the_requester() {
        let req = ArpRepr {
            op: ArpOp::Request,
            sender_mac: MacAddr([2, 0, 0, 0, 0, 0x99]),
            sender_ip: Ipv4Addr::new(198, 18, 0, 2),
            target_mac: MacAddr::ZERO,
            target_ip: VIP,
        };
        let f = arp_reply(&req, [1, 0, 0x5e, 1, 2, 3], IFMAC).expect("frame");
        // To the requester, from the interface MAC, padded to 60 bytes.
        assert_eq!(f.len(), 60);
        assert_eq!((&f[0..6], &f[6..12]), (&req.sender_mac.0[..], &IFMAC[..]));
        let rep = parse_arp_frame(&f).expect("arp");
        assert_eq!(rep.op, ArpOp::Reply);
        assert_eq!(
            (rep.sender_ip, rep.sender_mac),
            (VIP, MacAddr([1, 0, 0x5e, 1, 2, 3]))
        );
        assert_eq!(
            (rep.target_ip, rep.target_mac),
            (req.sender_ip, req.sender_mac)
        );
    }

    #[test]
    fn parse_rejects_non_arp_and_short_frames() {
        assert_eq!(parse_arp_frame(&[0u8; 10]), None);
        let mut f = gratuitous_arp(VIP, IFMAC, IFMAC).expect("frame");
        f[12] = 0x08;
        f[13] = 0x00;
        assert_eq!(parse_arp_frame(&f), None);
        let mut f = gratuitous_arp(VIP, IFMAC, IFMAC).expect("frame");
        f[18] = 16; // hlen
        assert_eq!(parse_arp_frame(&f), None);
        let f = gratuitous_arp(VIP, IFMAC, IFMAC).expect("frame");
        assert_eq!(parse_arp_frame(&f[..40]), None);
    }

    #[test]
    fn garp_schedule_bursts_delay_and_refresh() {
        let ms = Duration::from_millis;
        let mut s = GarpSchedule::new(GarpConfig {
            repeat: 3,
            interval: ms(10),
            master_delay: ms(1000),
            refresh: ms(5000),
            refresh_repeat: 2,
        });
        assert_eq!(s.next_deadline(), None);
        s.start(ms(100));
        assert_eq!(s.due(ms(100)), 1);
        assert_eq!(s.next_deadline(), Some(ms(110)));
        assert_eq!(s.due(ms(125)), 2);
        assert_eq!(s.next_deadline(), Some(ms(1100)));
        assert_eq!(s.due(ms(1200)), 3);
        assert_eq!(s.next_deadline(), Some(ms(5100)));
        assert_eq!(s.due(ms(5100)), 1);
        assert_eq!(s.due(ms(5110)), 1);
        assert_eq!(s.next_deadline(), Some(ms(10_100)));
        s.stop();
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.due(ms(20_000)), 0);
    }
}
