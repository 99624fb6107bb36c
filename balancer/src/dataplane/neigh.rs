//! The dataplane's own neighbour table for the back segment.
//!
//! NAT and DR rewrite the destination MAC to the real server's, so the
//! dataplane must know it without asking the kernel per packet. It learns
//! MACs from ARP replies and requests seen on the back NIC, asks (ARP
//! request) for the backends it does not know or whose entry is getting old,
//! and forgets entries not refreshed for `stale_after`. Pure: time is a
//! parameter; the driver sends the requests this returns.

use std::collections::HashMap;
use std::net::Ipv4Addr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    mac: [u8; 6],
    seen_ms: u64,
}

/// Neighbour entries for a fixed set of addresses of interest (the
/// backends); other addresses are not stored, so the table cannot be filled
/// by a flood of ARP from the segment.
#[derive(Debug)]
pub struct Neighbors {
    wanted: Vec<Ipv4Addr>,
    entries: HashMap<Ipv4Addr, Entry>,
    last_request_ms: HashMap<Ipv4Addr, u64>,
    /// Re-ask after this long without hearing from the neighbour.
    pub refresh_ms: u64,
    /// Forget after this long.
    pub stale_ms: u64,
    /// Minimum gap between two requests for the same address.
    pub retry_ms: u64,
}

impl Neighbors {
    pub fn new(wanted: impl IntoIterator<Item = Ipv4Addr>) -> Neighbors {
        let mut wanted: Vec<Ipv4Addr> = wanted.into_iter().collect();
        wanted.sort();
        wanted.dedup();
        Neighbors {
            entries: HashMap::with_capacity(wanted.len()),
            last_request_ms: HashMap::with_capacity(wanted.len()),
            wanted,
            refresh_ms: 30_000,
            stale_ms: 90_000,
            retry_ms: 1_000,
        }
    }

    /// Adds an address of interest (bounded: at most 4096 are tracked).
    pub fn want(&mut self, ip: Ipv4Addr) {
        if let Err(i) = self.wanted.binary_search(&ip)
            && self.wanted.len() < 4096
        {
            self.wanted.insert(i, ip);
        }
    }

    /// Replaces the addresses of interest (entries of others are dropped).
    pub fn set_wanted(&mut self, wanted: impl IntoIterator<Item = Ipv4Addr>) {
        let mut w: Vec<Ipv4Addr> = wanted.into_iter().collect();
        w.sort();
        w.dedup();
        self.entries.retain(|ip, _| w.binary_search(ip).is_ok());
        self.last_request_ms
            .retain(|ip, _| w.binary_search(ip).is_ok());
        self.wanted = w;
    }

    /// The MAC of `ip`, if known and not stale.
    pub fn lookup(&self, ip: Ipv4Addr, now_ms: u64) -> Option<[u8; 6]> {
        self.entries
            .get(&ip)
            .filter(|e| now_ms.saturating_sub(e.seen_ms) < self.stale_ms)
            .map(|e| e.mac)
    }

    /// Records that `ip` is at `mac` (from an ARP packet on the segment).
    /// Returns true if it is one we track.
    pub fn learn(&mut self, ip: Ipv4Addr, mac: [u8; 6], now_ms: u64) -> bool {
        if self.wanted.binary_search(&ip).is_err() || mac == [0; 6] || mac[0] & 1 == 1 {
            return false;
        }
        self.entries.insert(
            ip,
            Entry {
                mac,
                seen_ms: now_ms,
            },
        );
        true
    }

    /// Whether to ask for `ip` now (a frame waits for it): yes unless it was
    /// asked within `retry_ms`; marks it as asked.
    pub fn ask_now(&mut self, ip: Ipv4Addr, now_ms: u64) -> bool {
        if self.wanted.binary_search(&ip).is_err()
            || self
                .last_request_ms
                .get(&ip)
                .is_some_and(|t| now_ms.saturating_sub(*t) < self.retry_ms)
        {
            return false;
        }
        self.last_request_ms.insert(ip, now_ms);
        true
    }

    /// Addresses to send an ARP request for now (unknown or due for refresh,
    /// and not asked within `retry_ms`); marks them as asked.
    pub fn due_requests(&mut self, now_ms: u64, out: &mut Vec<Ipv4Addr>) {
        out.clear();
        for ip in &self.wanted {
            let fresh = self
                .entries
                .get(ip)
                .is_some_and(|e| now_ms.saturating_sub(e.seen_ms) < self.refresh_ms);
            if fresh {
                continue;
            }
            let asked = self
                .last_request_ms
                .get(ip)
                .is_some_and(|t| now_ms.saturating_sub(*t) < self.retry_ms);
            if !asked {
                self.last_request_ms.insert(*ip, now_ms);
                out.push(*ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
    const B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn unknown_backends_are_requested_once_per_retry_interval() {
        let mut n = Neighbors::new([A, B]);
        let mut out = Vec::new();
        n.due_requests(0, &mut out);
        assert_eq!(out, vec![A, B]);
        n.due_requests(999, &mut out);
        assert!(out.is_empty());
        n.due_requests(1000, &mut out);
        assert_eq!(out, vec![A, B]);
    }

    #[test]
    fn learned_entry_is_used_refreshed_and_forgotten_when_stale() {
        let mut n = Neighbors::new([A]);
        assert!(n.learn(A, MAC, 100));
        assert_eq!(n.lookup(A, 100), Some(MAC));
        let mut out = Vec::new();
        n.due_requests(100 + 29_999, &mut out);
        assert!(out.is_empty(), "fresh entry re-requested");
        n.due_requests(100 + 30_000, &mut out);
        assert_eq!(out, vec![A]);
        assert_eq!(n.lookup(A, 100 + 89_999), Some(MAC));
        assert_eq!(n.lookup(A, 100 + 90_000), None);
    }

    #[test]
    fn a_waiting_frame_asks_once_per_retry_interval() {
        let mut n = Neighbors::new([A]);
        assert!(n.ask_now(A, 0));
        assert!(!n.ask_now(A, 999));
        let mut out = Vec::new();
        n.due_requests(500, &mut out);
        assert!(out.is_empty(), "housekeeping must not ask again so soon");
        assert!(n.ask_now(A, 1000));
        assert!(!n.ask_now(B, 0), "not an address of interest");
    }

    #[test]
    fn addresses_not_tracked_and_bogus_macs_are_not_learned() {
        let mut n = Neighbors::new([A]);
        assert!(!n.learn(B, MAC, 0));
        assert!(!n.learn(A, [0; 6], 0));
        assert!(!n.learn(A, [1, 0, 0x5e, 0, 0, 1], 0));
        assert_eq!(n.lookup(B, 0), None);
        assert_eq!(n.lookup(A, 0), None);
    }
}
