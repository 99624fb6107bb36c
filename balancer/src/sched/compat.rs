//! The scheduler interface the dataplane engine on `main` calls:
//! `pick(&[BackendView], flow_hash)`, with a three-field view. Every
//! [`Algorithm`] is usable through it; what the older view does not carry
//! takes its neutral value (no limit, no RTT, no standby), the flow hash
//! doubles as the source hash, and the random draws of `p2c` come from a
//! generator owned by the adapter.
//!
//! Goes away once the engine holds [`BackendState`]s and calls
//! [`Algorithm::pick`] itself.

use core::fmt;

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind, rng_from_seed};

/// What the engine on `main` knows about one backend.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct BackendView {
    /// 0 = drained: never chosen for new flows.
    pub weight: u32,
    pub active_conns: u32,
    pub available: bool,
}

impl BackendView {
    pub const fn is_eligible(&self) -> bool {
        self.available && self.weight > 0
    }
}

/// The older scheduler interface.
pub trait Scheduler: fmt::Debug + Send {
    fn kind(&self) -> SchedulerKind;

    /// Index into `backends` of the backend for a new flow, or `None`.
    fn pick(&mut self, backends: &[BackendView], flow_hash: u64) -> Option<usize>;

    fn reset(&mut self);
}

/// An [`Algorithm`] behind [`Scheduler`]. The state buffer is reused:
/// it reallocates only when the backend count grows.
#[derive(Debug)]
pub(super) struct Compat {
    inner: Box<dyn Algorithm>,
    states: Vec<BackendState>,
    rng: SchedRng,
}

impl Compat {
    pub(super) fn new(inner: Box<dyn Algorithm>) -> Compat {
        Compat {
            inner,
            states: Vec::new(),
            rng: rng_from_seed(0x5eed),
        }
    }
}

impl Scheduler for Compat {
    fn kind(&self) -> SchedulerKind {
        self.inner.kind()
    }

    fn pick(&mut self, backends: &[BackendView], flow_hash: u64) -> Option<usize> {
        self.states.clear();
        self.states
            .extend(backends.iter().enumerate().map(|(i, v)| BackendState {
                key: i as u64,
                weight: v.weight,
                active_conns: v.active_conns,
                available: v.available,
                ..BackendState::default()
            }));
        self.inner.pick(
            &self.states,
            &Flow::new(flow_hash, flow_hash),
            &mut self.rng,
        )
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_works_through_the_older_interface() {
        let b = [
            BackendView {
                weight: 1,
                active_conns: 0,
                available: true,
            },
            BackendView {
                weight: 2,
                active_conns: 0,
                available: false,
            },
            BackendView {
                weight: 1,
                active_conns: 3,
                available: true,
            },
        ];
        for k in SchedulerKind::ALL {
            let mut s = k.build();
            for h in 0..20 {
                let i = s.pick(&b, h).expect("eligible");
                assert!(i == 0 || i == 2, "{k}: {i}");
            }
            s.reset();
            assert_eq!(s.pick(&[], 0), None);
        }
        let mut lc = SchedulerKind::Lc.build();
        assert_eq!(lc.pick(&b, 0), Some(0), "active_conns reach lc");
    }
}
