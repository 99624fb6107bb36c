//! Persistence: source-address affinity (IPVS `-p`, the L7 seed's sticky
//! sessions at layer 4). A client address, masked by the service's
//! netmask, is remembered with the backend its first flow got; later flows
//! from it go to the same backend until the entry has seen no traffic for
//! the timeout. An entry never sends a flow to a backend that is not
//! eligible (down, drained, full): the caller checks and [`forget`]s it,
//! and the flow is scheduled afresh.
//!
//! The table is fixed-size and allocated once: a set-associative array
//! (each key may live in one of [`WAYS`] consecutive slots after its hash),
//! so lookups, inserts and refreshes never allocate and take a bounded
//! time on the packet path. When all ways of a set are live, the entry
//! closest to expiry is evicted (its client loses affinity early, which is
//! counted). Time is a parameter (`now_ms`), as everywhere in pure logic.
//!
//! [`forget`]: PersistTable::forget

use std::net::Ipv4Addr;

use rewrite::FlowHasher;

/// Slots a key may occupy.
pub const WAYS: usize = 8;

/// A service's persistence settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Persistence {
    /// An entry expires this long after the last traffic that refreshed it.
    pub timeout_ms: u64,
    /// Applied to the client address: clients of one /24 (255.255.255.0)
    /// share a backend.
    pub netmask: Ipv4Addr,
}

impl Persistence {
    /// The client address as the table keys it.
    pub fn mask(&self, client: Ipv4Addr) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(client) & u32::from(self.netmask))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    /// 0 = empty; else the absolute expiry time.
    expires_ms: u64,
    client: u32,
    service: u16,
    backend: u16,
}

/// A live entry, for status output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PersistEntry {
    pub service: u16,
    /// The masked client address.
    pub client: Ipv4Addr,
    pub backend: u16,
    /// Milliseconds until it expires unless refreshed.
    pub expires_in_ms: u64,
}

/// What [`PersistTable::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A free or expired slot, or the key's own slot.
    Stored,
    /// All ways were live: the entry nearest expiry was replaced.
    Evicted,
    /// The table has no slot at all (capacity 0).
    NoRoom,
}

/// The affinity table of a node (all services share it).
#[derive(Clone)]
pub struct PersistTable {
    slots: Box<[Slot]>,
    hasher: FlowHasher,
}

impl std::fmt::Debug for PersistTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistTable")
            .field("capacity", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl PersistTable {
    /// A table of `capacity` slots (24 bytes each), allocated now.
    pub fn new(capacity: usize, hasher: FlowHasher) -> PersistTable {
        PersistTable {
            slots: vec![Slot::default(); capacity].into_boxed_slice(),
            hasher,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The slot indices a key may occupy.
    fn ways(&self, service: u16, client: Ipv4Addr) -> impl Iterator<Item = usize> + use<> {
        let n = self.slots.len();
        let mut bytes = [0u8; 6];
        bytes[..4].copy_from_slice(&client.octets());
        bytes[4..].copy_from_slice(&service.to_be_bytes());
        let start = if n == 0 {
            0
        } else {
            (self.hasher.hash_bytes(&bytes) % n as u64) as usize
        };
        (0..WAYS.min(n)).map(move |k| (start + k) % n)
    }

    fn find(&self, service: u16, client: Ipv4Addr, now_ms: u64) -> Option<usize> {
        let c = u32::from(client);
        self.ways(service, client).find(|&i| {
            let s = &self.slots[i];
            s.expires_ms > now_ms && s.client == c && s.service == service
        })
    }

    /// The backend remembered for `client` (already masked), if its entry
    /// is live. Does not refresh it.
    pub fn lookup(&self, service: u16, client: Ipv4Addr, now_ms: u64) -> Option<u16> {
        self.find(service, client, now_ms)
            .map(|i| self.slots[i].backend)
    }

    /// Extends a live entry to `now_ms + timeout_ms` (traffic was seen).
    /// Returns whether there was one.
    pub fn refresh(
        &mut self,
        service: u16,
        client: Ipv4Addr,
        now_ms: u64,
        timeout_ms: u64,
    ) -> bool {
        match self.find(service, client, now_ms) {
            Some(i) => {
                let s = &mut self.slots[i];
                s.expires_ms = s.expires_ms.max(now_ms.saturating_add(timeout_ms.max(1)));
                true
            }
            None => false,
        }
    }

    /// Remembers `backend` for `client` until `now_ms + timeout_ms`,
    /// replacing any entry of the same key.
    pub fn insert(
        &mut self,
        service: u16,
        client: Ipv4Addr,
        backend: u16,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Inserted {
        let c = u32::from(client);
        let new = Slot {
            expires_ms: now_ms.saturating_add(timeout_ms.max(1)),
            client: c,
            service,
            backend,
        };
        let mut free = None;
        let mut oldest: Option<usize> = None;
        for i in self.ways(service, client) {
            let s = self.slots[i];
            if s.expires_ms > now_ms && s.client == c && s.service == service {
                self.slots[i] = new;
                return Inserted::Stored;
            }
            if s.expires_ms <= now_ms {
                free.get_or_insert(i);
            } else if oldest.is_none_or(|o| s.expires_ms < self.slots[o].expires_ms) {
                oldest = Some(i);
            }
        }
        match (free, oldest) {
            (Some(i), _) => {
                self.slots[i] = new;
                Inserted::Stored
            }
            (None, Some(i)) => {
                self.slots[i] = new;
                Inserted::Evicted
            }
            (None, None) => Inserted::NoRoom,
        }
    }

    /// Drops the entry of `client`, if any.
    pub fn forget(&mut self, service: u16, client: Ipv4Addr) {
        let c = u32::from(client);
        for i in self.ways(service, client) {
            let s = &mut self.slots[i];
            if s.client == c && s.service == service {
                s.expires_ms = 0;
            }
        }
    }

    /// Drops every entry pointing at `backend` of `service` (the backend
    /// was removed or failed with connections reset). O(capacity): for
    /// control events, not per packet.
    pub fn forget_backend(&mut self, service: u16, backend: u16) -> usize {
        let mut n = 0;
        for s in self.slots.iter_mut() {
            if s.expires_ms != 0 && s.service == service && s.backend == backend {
                s.expires_ms = 0;
                n += 1;
            }
        }
        n
    }

    /// Live entries, in slot order, with their time left.
    pub fn entries(&self, now_ms: u64) -> impl Iterator<Item = PersistEntry> + '_ {
        self.slots
            .iter()
            .filter(move |s| s.expires_ms > now_ms)
            .map(move |s| PersistEntry {
                service: s.service,
                client: Ipv4Addr::from(s.client),
                backend: s.backend,
                expires_in_ms: s.expires_ms - now_ms,
            })
    }

    /// Number of live entries (O(capacity)).
    pub fn live(&self, now_ms: u64) -> usize {
        self.slots.iter().filter(|s| s.expires_ms > now_ms).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cap: usize) -> PersistTable {
        PersistTable::new(cap, FlowHasher::new([5; 16]))
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, last)
    }

    #[test]
    fn an_entry_lives_for_the_timeout_after_its_last_refresh() {
        let mut t = table(64);
        assert_eq!(t.insert(0, ip(2), 3, 1000, 300), Inserted::Stored);
        assert_eq!(t.lookup(0, ip(2), 1000), Some(3));
        assert_eq!(t.lookup(0, ip(2), 1299), Some(3));
        assert_eq!(t.lookup(0, ip(2), 1300), None, "expired at 1000 + 300");
        t.insert(0, ip(2), 3, 2000, 300);
        assert!(t.refresh(0, ip(2), 2200, 300));
        assert_eq!(t.lookup(0, ip(2), 2499), Some(3), "refreshed at 2200");
        assert_eq!(t.lookup(0, ip(2), 2500), None);
        assert!(
            !t.refresh(0, ip(2), 2500, 300),
            "an expired entry stays gone"
        );
    }

    #[test]
    fn keys_are_per_service_and_per_masked_client() {
        let mut t = table(64);
        let p = Persistence {
            timeout_ms: 100,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
        };
        t.insert(0, p.mask(ip(2)), 1, 0, p.timeout_ms);
        t.insert(1, p.mask(ip(2)), 2, 0, p.timeout_ms);
        assert_eq!(t.lookup(0, p.mask(ip(77)), 50), Some(1), "same /24");
        assert_eq!(t.lookup(1, p.mask(ip(77)), 50), Some(2));
        assert_eq!(t.lookup(0, p.mask(Ipv4Addr::new(198, 18, 1, 2)), 50), None);
        let host = Persistence {
            netmask: Ipv4Addr::BROADCAST,
            ..p
        };
        assert_eq!(host.mask(ip(77)), ip(77));
    }

    #[test]
    fn insert_replaces_the_same_key_and_forget_removes_it() {
        let mut t = table(16);
        t.insert(0, ip(9), 1, 0, 100);
        t.insert(0, ip(9), 2, 10, 100);
        assert_eq!(t.lookup(0, ip(9), 20), Some(2));
        assert_eq!(t.live(20), 1, "one entry, not two");
        t.forget(0, ip(9));
        assert_eq!(t.lookup(0, ip(9), 20), None);
    }

    #[test]
    fn forget_backend_drops_all_its_clients() {
        let mut t = table(256);
        for i in 0..20 {
            t.insert(0, ip(i), u16::from(i % 2), 0, 1000);
        }
        t.insert(1, ip(1), 1, 0, 1000);
        assert_eq!(t.forget_backend(0, 1), 10);
        assert_eq!(t.lookup(1, ip(1), 1), Some(1), "other service kept");
        assert!((0..20).all(|i| t.lookup(0, ip(i), 1) != Some(1)));
    }

    #[test]
    fn a_full_set_evicts_the_entry_nearest_expiry() {
        // capacity = WAYS: every key shares the one set.
        let mut t = table(WAYS);
        for i in 0..WAYS as u8 {
            let r = t.insert(0, ip(i), 0, u64::from(i), 1000);
            assert_eq!(r, Inserted::Stored);
        }
        assert_eq!(t.insert(0, ip(200), 7, 50, 1000), Inserted::Evicted);
        assert_eq!(t.lookup(0, ip(0), 60), None, "ip(0) expired soonest");
        assert_eq!(t.lookup(0, ip(200), 60), Some(7));
        assert_eq!(t.lookup(0, ip(1), 60), Some(0));
        // expired slots are reused before anything is evicted
        assert_eq!(t.insert(0, ip(201), 1, 5000, 10), Inserted::Stored);
        assert_eq!(table(0).insert(0, ip(1), 0, 0, 1), Inserted::NoRoom);
    }

    #[test]
    fn entries_show_the_time_left() {
        let mut t = table(32);
        t.insert(2, ip(4), 1, 100, 500);
        let e: Vec<_> = t.entries(300).collect();
        assert_eq!(
            e,
            [PersistEntry {
                service: 2,
                client: ip(4),
                backend: 1,
                expires_in_ms: 300
            }]
        );
        assert_eq!(t.entries(600).count(), 0);
    }
}
