//! A service's whole decision for a new flow: limits, shedding,
//! persistence, the algorithm, the sorry server. Pure ("compute, then
//! apply"): the dataplane hands in the backends' state, the flow, the
//! persistence table, the time and a seeded generator, and applies the
//! [`Decision`] (forward, or refuse with a TCP RST / drop for UDP).
//!
//! Order of the checks, cheapest refusal first:
//! 1. the service's connection limit (`max_conns`, hard);
//! 2. shedding on the service's connection count (hard or exponential);
//! 3. persistence: a live affinity entry whose backend is still eligible
//!    wins (and is refreshed); an entry for a backend that is not eligible
//!    is dropped, so affinity never outlives health;
//! 4. the algorithm over the eligible backends (per-backend limits make a
//!    backend ineligible);
//! 5. the sorry server, if one is configured and available;
//! 6. refuse: every backend full (a limit: answered like shedding), or no
//!    backend at all (down or drained).

use std::net::Ipv4Addr;

use rewrite::FlowHasher;

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind};
use crate::persist::{Inserted, PersistTable, Persistence};
use crate::shed::Shedding;

/// Why a new flow was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The service has `max_conns` connections.
    ServiceFull,
    /// Shedding refused it.
    Shed,
    /// Every backend that could take the flow is at its `max_conns`.
    BackendsFull,
    /// No backend is eligible (down, drained) and no sorry server is
    /// available.
    NoBackend,
}

/// How a backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Persistence,
    Scheduler,
    Sorry,
}

/// The outcome for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    Backend {
        index: usize,
        via: Via,
        /// The persistence table evicted a live entry to remember this one.
        evicted: bool,
    },
    Refuse(Refusal),
}

/// The per-service part of scheduling. One per service, owned by the
/// dataplane thread.
#[derive(Debug)]
pub struct ServicePolicy {
    /// The service's index (persistence keys carry it).
    pub service: u16,
    algorithm: Box<dyn Algorithm>,
    hasher: FlowHasher,
    pub persistence: Option<Persistence>,
    /// 0 = no limit.
    pub max_conns: u32,
    pub shedding: Option<Shedding>,
}

impl ServicePolicy {
    pub fn new(service: u16, kind: SchedulerKind, hasher: FlowHasher) -> ServicePolicy {
        ServicePolicy {
            service,
            algorithm: kind.algorithm(hasher),
            hasher,
            persistence: None,
            max_conns: 0,
            shedding: None,
        }
    }

    pub fn with_persistence(mut self, p: Option<Persistence>) -> Self {
        self.persistence = p;
        self
    }

    pub fn with_max_conns(mut self, max_conns: u32) -> Self {
        self.max_conns = max_conns;
        self
    }

    pub fn with_shedding(mut self, s: Option<Shedding>) -> Self {
        self.shedding = s;
        self
    }

    pub fn kind(&self) -> SchedulerKind {
        self.algorithm.kind()
    }

    /// The backend set was replaced (reload).
    pub fn reset(&mut self) {
        self.algorithm.reset();
    }

    /// Decides for a new flow from `client` whose 5-tuple hashes to
    /// `flow_hash`. `persist` is updated (refreshed, inserted, or the stale
    /// entry dropped).
    pub fn decide(
        &mut self,
        backends: &[BackendState],
        client: Ipv4Addr,
        flow_hash: u64,
        persist: &mut PersistTable,
        now_ms: u64,
        rng: &mut SchedRng,
    ) -> Decision {
        let conns: u64 = backends.iter().map(|b| u64::from(b.conns())).sum();
        let conns = u32::try_from(conns).unwrap_or(u32::MAX);
        if self.max_conns != 0 && conns >= self.max_conns {
            return Decision::Refuse(Refusal::ServiceFull);
        }
        if let Some(s) = &self.shedding
            && s.refuse(conns, rng)
        {
            return Decision::Refuse(Refusal::Shed);
        }
        let source = match &self.persistence {
            Some(p) => p.mask(client),
            None => client,
        };
        if let Some(p) = &self.persistence
            && let Some(b) = persist.lookup(self.service, source, now_ms)
        {
            let i = usize::from(b);
            if backends.get(i).is_some_and(BackendState::is_eligible) {
                persist.refresh(self.service, source, now_ms, p.timeout_ms);
                return Decision::Backend {
                    index: i,
                    via: Via::Persistence,
                    evicted: false,
                };
            }
            persist.forget(self.service, source);
        }
        let flow = Flow::new(flow_hash, self.hasher.hash_addr(source));
        if let Some(i) = self.algorithm.pick(backends, &flow, rng) {
            let mut evicted = false;
            if let (Some(p), Ok(b)) = (&self.persistence, u16::try_from(i)) {
                evicted = persist.insert(self.service, source, b, now_ms, p.timeout_ms)
                    == Inserted::Evicted;
            }
            return Decision::Backend {
                index: i,
                via: Via::Scheduler,
                evicted,
            };
        }
        // The sorry server gets no affinity: clients return to the real
        // servers as soon as one is back.
        match backends
            .iter()
            .position(|b| b.standby && b.available && b.weight > 0 && !b.is_full())
        {
            Some(index) => Decision::Backend {
                index,
                via: Via::Sorry,
                evicted: false,
            },
            None if backends
                .iter()
                .any(|b| b.available && b.weight > 0 && !b.standby && b.is_full()) =>
            {
                Decision::Refuse(Refusal::BackendsFull)
            }
            None => Decision::Refuse(Refusal::NoBackend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rng_from_seed;
    use super::super::testkit::*;
    use super::*;
    use crate::shed::Strategy;

    const TIMEOUT: u64 = 1000;

    fn hasher() -> FlowHasher {
        FlowHasher::new([4; 16])
    }

    fn sticky(kind: SchedulerKind) -> ServicePolicy {
        ServicePolicy::new(0, kind, hasher()).with_persistence(Some(Persistence {
            timeout_ms: TIMEOUT,
            netmask: Ipv4Addr::BROADCAST,
        }))
    }

    fn client(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, i)
    }

    fn backend(d: Decision) -> Option<(usize, Via)> {
        match d {
            Decision::Backend { index, via, .. } => Some((index, via)),
            Decision::Refuse(_) => None,
        }
    }

    #[test]
    fn persistence_keeps_a_client_on_its_backend_while_eligible() {
        let mut p = sticky(SchedulerKind::Rr);
        let mut t = PersistTable::new(1024, hasher());
        let mut rng = rng_from_seed(1);
        let mut b = keyed(3);
        let first = backend(p.decide(&b, client(2), 1, &mut t, 0, &mut rng));
        let (i, via) = first.expect("scheduled");
        assert_eq!(via, Via::Scheduler);
        // rr would move on; persistence keeps the client (refreshing it)
        for (k, now) in [100u64, 900, 1800, 2700].into_iter().enumerate() {
            let d = backend(p.decide(&b, client(2), k as u64 + 2, &mut t, now, &mut rng));
            assert_eq!(d, Some((i, Via::Persistence)), "at {now}");
        }
        // another client is scheduled normally
        let other = backend(p.decide(&b, client(3), 9, &mut t, 2700, &mut rng));
        assert_eq!(other.map(|x| x.1), Some(Via::Scheduler));
        // the backend goes down: the client moves, and stays on the new one
        b[i].available = false;
        let (j, via) = backend(p.decide(&b, client(2), 10, &mut t, 2800, &mut rng)).expect("moved");
        assert!(j != i && via == Via::Scheduler);
        b[i].available = true;
        assert_eq!(
            backend(p.decide(&b, client(2), 11, &mut t, 2900, &mut rng)),
            Some((j, Via::Persistence)),
            "affinity follows the new choice, not the old backend's return"
        );
        // drained also breaks affinity
        b[j].weight = 0;
        let (k, _) = backend(p.decide(&b, client(2), 12, &mut t, 3000, &mut rng)).expect("moved");
        assert_ne!(k, j);
        // silence longer than the timeout forgets the client
        let (_, via) = backend(p.decide(&b, client(2), 13, &mut t, 3000 + TIMEOUT, &mut rng))
            .expect("scheduled");
        assert_eq!(via, Via::Scheduler);
    }

    #[test]
    fn persistence_netmask_groups_clients() {
        let mut p = ServicePolicy::new(0, SchedulerKind::Rr, hasher()).with_persistence(Some(
            Persistence {
                timeout_ms: TIMEOUT,
                netmask: Ipv4Addr::new(255, 255, 255, 0),
            },
        ));
        let mut t = PersistTable::new(64, hasher());
        let mut rng = rng_from_seed(1);
        let b = keyed(4);
        let a = backend(p.decide(&b, client(2), 0, &mut t, 0, &mut rng));
        let c = backend(p.decide(&b, client(200), 1, &mut t, 0, &mut rng));
        assert_eq!(a.map(|x| x.0), c.map(|x| x.0));
    }

    #[test]
    fn service_limit_and_hard_shedding_refuse_before_scheduling() {
        let mut b = keyed(2);
        b[0].active_conns = 3;
        b[1].inactive_conns = 2;
        let mut t = PersistTable::new(0, hasher());
        let mut rng = rng_from_seed(1);
        let mut p = ServicePolicy::new(0, SchedulerKind::Wlc, hasher()).with_max_conns(5);
        assert_eq!(
            p.decide(&b, client(1), 0, &mut t, 0, &mut rng),
            Decision::Refuse(Refusal::ServiceFull)
        );
        p.max_conns = 6;
        assert!(backend(p.decide(&b, client(1), 0, &mut t, 0, &mut rng)).is_some());
        let mut p = p.with_shedding(Some(Shedding {
            threshold: 5,
            strategy: Strategy::Hard,
        }));
        assert_eq!(
            p.decide(&b, client(1), 0, &mut t, 0, &mut rng),
            Decision::Refuse(Refusal::Shed)
        );
    }

    #[test]
    fn per_backend_limit_moves_flows_to_others_then_refuses() {
        let mut b = keyed(2);
        for x in b.iter_mut() {
            x.max_conns = 2;
        }
        let mut t = PersistTable::new(0, hasher());
        let mut rng = rng_from_seed(1);
        let mut p = ServicePolicy::new(0, SchedulerKind::Rr, hasher());
        let mut got = Vec::new();
        for k in 0..5 {
            match p.decide(&b, client(k), 0, &mut t, 0, &mut rng) {
                Decision::Backend { index, .. } => {
                    b[index].active_conns += 1;
                    got.push(Some(index));
                }
                Decision::Refuse(r) => {
                    assert_eq!(r, Refusal::BackendsFull);
                    got.push(None);
                }
            }
        }
        assert_eq!(got, [Some(0), Some(1), Some(0), Some(1), None]);
    }

    #[test]
    fn the_sorry_server_takes_flows_only_when_all_others_are_out() {
        let mut b = keyed(3);
        b[2].standby = true;
        let mut t = PersistTable::new(64, hasher());
        let mut rng = rng_from_seed(1);
        let mut p = sticky(SchedulerKind::Wrr);
        for k in 0..6 {
            let (i, _) = backend(p.decide(&b, client(k), 0, &mut t, 0, &mut rng)).expect("up");
            assert_ne!(i, 2);
        }
        b[0].available = false;
        b[1].weight = 0;
        assert_eq!(
            backend(p.decide(&b, client(50), 0, &mut t, 10, &mut rng)),
            Some((2, Via::Sorry))
        );
        // no affinity to the sorry server: back to a real one when it returns
        b[0].available = true;
        assert_eq!(
            backend(p.decide(&b, client(50), 0, &mut t, 20, &mut rng)),
            Some((0, Via::Scheduler))
        );
        b[0].available = false;
        b[2].available = false;
        assert_eq!(
            p.decide(&b, client(50), 0, &mut t, 30, &mut rng),
            Decision::Refuse(Refusal::NoBackend)
        );
    }

    #[test]
    fn sh_uses_the_masked_source_so_a_client_keeps_its_backend() {
        let b = keyed(5);
        let mut t = PersistTable::new(0, hasher());
        let mut rng = rng_from_seed(1);
        let mut p = ServicePolicy::new(0, SchedulerKind::Sh, hasher());
        let first = backend(p.decide(&b, client(7), 1, &mut t, 0, &mut rng));
        for h in 2..50 {
            assert_eq!(
                backend(p.decide(&b, client(7), h, &mut t, 0, &mut rng)),
                first
            );
        }
    }
}
