//! Several instances on one node, sync groups that move them together, and
//! tracking (interfaces, scripts) that turns into priority and fault.
//!
//! Sync group rules (keepalived's `vrrp_sync_group`):
//! - a member entering Fault puts every other member in Fault; they leave it
//!   only when no member is faulted by its own tracking any more;
//! - a member going Backup -> Master takes the others to Master;
//! - a member going Master -> Backup takes the others to Backup.
//!
//! Tracking (keepalived semantics): a tracked interface that is down faults
//! the instance; a tracked script with weight 0 faults it while failing; a
//! positive weight is added to the priority while the script succeeds, a
//! negative one while it fails. The result is clamped to 1..254.

use std::time::Duration;

use super::state::{Action, Event, Instance, State, SyncEvent};

/// One tracked check and its current result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    /// keepalived `weight`: -254..=254; 0 = fault on failure.
    pub weight: i32,
    pub ok: bool,
}

/// Effective priority and fault from the configured priority and tracking.
/// The owner (255) is not adjusted, only faulted.
pub fn effective_priority(base: u8, tracked: &[Tracked]) -> (u8, bool) {
    let fault = tracked.iter().any(|t| t.weight == 0 && !t.ok);
    if base == 255 {
        return (255, fault);
    }
    let delta: i32 = tracked
        .iter()
        .map(|t| match (t.weight, t.ok) {
            (w, true) if w > 0 => w,
            (w, false) if w < 0 => w,
            _ => 0,
        })
        .sum();
    let p = (i32::from(base) + delta).clamp(1, 254);
    (p as u8, fault)
}

/// The instances of one node and their sync groups.
#[derive(Debug, Clone)]
pub struct Router {
    pub instances: Vec<Instance>,
    /// Each group is a list of indices into `instances`.
    groups: Vec<Vec<usize>>,
}

impl Router {
    /// `groups` lists member indices; an instance is in at most one group
    /// (config validation enforces it).
    pub fn new(instances: Vec<Instance>, groups: Vec<Vec<usize>>) -> Router {
        let groups = groups
            .into_iter()
            .map(|g| g.into_iter().filter(|&i| i < instances.len()).collect())
            .collect();
        Router { instances, groups }
    }

    fn group_of(&self, idx: usize) -> Option<&Vec<usize>> {
        self.groups.iter().find(|g| g.contains(&idx))
    }

    /// Earliest deadline over all instances.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.instances
            .iter()
            .filter_map(|i| i.next_deadline())
            .min()
    }

    /// Steps instance `idx` and propagates sync-group effects. Returns the
    /// actions per instance index, in order.
    pub fn step(&mut self, idx: usize, event: Event, now: Duration) -> Vec<(usize, Action)> {
        let mut out = Vec::new();
        let mut work = vec![(idx, event)];
        // Each forced event is idempotent; the bound only guards mistakes.
        let mut budget = 8 * (self.instances.len() + 1);
        while let Some((i, ev)) = work.pop() {
            if budget == 0 {
                tracing::warn!("sync group propagation did not settle");
                break;
            }
            budget -= 1;
            let Some(inst) = self.instances.get_mut(i) else {
                continue;
            };
            let acts = inst.step(ev, now);
            for a in &acts {
                if let Action::StateChanged { from, to } = *a {
                    work.extend(self.sync_effects(i, from, to));
                }
            }
            out.extend(acts.into_iter().map(|a| (i, a)));
        }
        out
    }

    /// Steps every instance with the same event (Startup, Shutdown, Timer).
    pub fn step_all(&mut self, event: Event, now: Duration) -> Vec<(usize, Action)> {
        let mut out = Vec::new();
        for i in 0..self.instances.len() {
            out.extend(self.step(i, event.clone(), now));
        }
        out
    }

    fn sync_effects(&self, i: usize, from: State, to: State) -> Vec<(usize, Event)> {
        let Some(g) = self.group_of(i) else {
            return Vec::new();
        };
        let mut ev = Vec::new();
        // Fault: others are group-faulted while any other member is own-faulted.
        for &m in g {
            let want = g.iter().any(|&o| o != m && self.instances[o].own_fault());
            if self.instances[m].group_fault() != want {
                ev.push((m, Event::Sync(SyncEvent::Fault(want))));
            }
        }
        let follow = match (from, to) {
            (State::Backup, State::Master) => Some(SyncEvent::Master),
            (State::Master, State::Backup) => Some(SyncEvent::Backup),
            _ => None,
        };
        if let Some(f) = follow {
            for &m in g {
                if m != i {
                    ev.push((m, Event::Sync(f)));
                }
            }
        }
        ev
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::state::{InstanceConfig, master_down_interval};
    use super::*;

    fn inst(name: &str, vrid: u8, prio: u8) -> Instance {
        Instance::new(InstanceConfig {
            name: name.into(),
            vrid,
            priority: prio,
            advert_interval_cs: 100,
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary: Ipv4Addr::new(198, 18, 0, 11),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 100)],
            unicast_peers: vec![],
        })
    }

    fn states(r: &Router) -> Vec<State> {
        r.instances.iter().map(|i| i.state()).collect()
    }

    #[test]
    fn effective_priority_follows_keepalived_weights() {
        let t = |weight, ok| Tracked { weight, ok };
        assert_eq!(effective_priority(100, &[]), (100, false));
        assert_eq!(
            effective_priority(100, &[t(20, true), t(-30, true)]),
            (120, false)
        );
        assert_eq!(
            effective_priority(100, &[t(20, false), t(-30, false)]),
            (70, false)
        );
        assert_eq!(effective_priority(100, &[t(0, false)]), (100, true));
        assert_eq!(effective_priority(250, &[t(50, true)]), (254, false));
        assert_eq!(effective_priority(10, &[t(-50, false)]), (1, false));
        assert_eq!(
            effective_priority(255, &[t(-50, false), t(0, false)]),
            (255, true)
        );
    }

    #[test]
    fn sync_group_member_fault_faults_all_and_recovers_together() {
        let mut r = Router::new(
            vec![
                inst("front", 51, 100),
                inst("back", 52, 100),
                inst("solo", 53, 100),
            ],
            vec![vec![0, 1]],
        );
        r.step_all(Event::Startup, Duration::ZERO);
        r.step(1, Event::Fault(true), Duration::from_millis(10));
        assert_eq!(states(&r), vec![State::Fault, State::Fault, State::Backup]);
        r.step(1, Event::Fault(false), Duration::from_millis(20));
        assert_eq!(
            states(&r),
            vec![State::Backup, State::Backup, State::Backup]
        );
    }

    #[test]
    fn sync_group_master_and_backup_move_together() {
        let mut r = Router::new(
            vec![inst("front", 51, 100), inst("back", 52, 100)],
            vec![vec![0, 1]],
        );
        r.step_all(Event::Startup, Duration::ZERO);
        // front's timer fires first (back got an advert, say): both go master.
        let t = master_down_interval(100, 100);
        let acts = r.step(0, Event::Timer, t);
        assert_eq!(states(&r), vec![State::Master, State::Master]);
        assert!(acts.contains(&(1, Action::AddAddresses)));
        // back loses to a higher priority: front follows to backup.
        let ip = super::super::wire::Ipv4Info {
            src: Ipv4Addr::new(198, 18, 0, 12),
            dst: super::super::wire::VRRP_GROUP_V4,
            ttl: 255,
        };
        let repr = super::super::wire::Repr {
            vrid: 52,
            priority: 200,
            max_adver_int: 100,
            addresses: vec![Ipv4Addr::new(198, 18, 0, 100)],
        };
        let acts = r.step(1, Event::Advert { ip, repr }, t + Duration::from_millis(5));
        assert_eq!(states(&r), vec![State::Backup, State::Backup]);
        assert!(acts.contains(&(0, Action::RemoveAddresses)));
    }
}
