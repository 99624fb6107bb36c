use super::*;

const SEED: [u8; 16] = *b"cluster-testseed";
const IV: u64 = 100;
const SIZE: u32 = 1021;

fn cfg(id: NodeId, ids: &[NodeId]) -> ClusterConfig {
    ClusterConfig::new(
        id,
        ids.iter().map(|&i| (i, 1)).collect(),
        TableParams::new(SEED, SIZE).expect("prime"),
        Duration::from_millis(IV),
    )
}

/// A few nodes and what they sent, driven by hand at literal times.
struct Sim {
    nodes: BTreeMap<NodeId, Cluster>,
    /// Nodes that have crashed: they get no events and own nothing.
    crashed: BTreeSet<NodeId>,
    /// Announcements / leaves sent and not yet delivered: (from, action).
    sent: Vec<(NodeId, Action)>,
}

impl Sim {
    fn new(ids: &[NodeId], now: u64) -> Sim {
        Sim {
            nodes: ids
                .iter()
                .map(|&i| (i, Cluster::new(cfg(i, ids), now).expect("cluster")))
                .collect(),
            crashed: BTreeSet::new(),
            sent: Vec::new(),
        }
    }

    fn node(&self, id: NodeId) -> &Cluster {
        self.nodes.get(&id).expect("node")
    }

    fn step(&mut self, id: NodeId, ev: Event, now: u64) -> Vec<Action> {
        let acts = self.nodes.get_mut(&id).expect("node").step(ev, now);
        for a in &acts {
            if matches!(a, Action::Announce { .. } | Action::SendLeave) {
                self.sent.push((id, a.clone()));
            }
        }
        acts
    }

    /// Node `id`'s heartbeat view: the live peers among `alive`, with the
    /// epochs they advertise now.
    fn hear(&mut self, id: NodeId, alive: &[NodeId], now: u64) -> Vec<Action> {
        let peers = alive
            .iter()
            .filter(|&&p| p != id)
            .map(|&p| PeerView {
                id: p,
                weight: 1,
                epoch: self.node(p).advertised,
            })
            .collect();
        self.step(id, Event::Membership(peers), now)
    }

    /// Every live node hears every other live node.
    fn hear_all(&mut self, now: u64) {
        let alive: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|i| !self.crashed.contains(i))
            .collect();
        for &i in &alive {
            self.hear(i, &alive, now);
        }
    }

    /// Delivers what was sent to every other live node at `now`.
    fn deliver(&mut self, now: u64) {
        let sent = std::mem::take(&mut self.sent);
        for (from, a) in sent {
            let ev = match a {
                Action::Announce { epoch, nodes } => Event::Announce { from, epoch, nodes },
                Action::SendLeave => Event::Leave { from },
                _ => continue,
            };
            let to: Vec<NodeId> = self
                .nodes
                .keys()
                .copied()
                .filter(|&i| i != from && !self.crashed.contains(&i))
                .collect();
            for i in to {
                self.step(i, ev.clone(), now);
            }
        }
    }

    fn tick_all(&mut self, now: u64) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for i in ids {
            if !self.crashed.contains(&i) {
                self.step(i, Event::Tick, now);
            }
        }
    }

    /// (buckets owned by two or more nodes, buckets owned by none).
    fn ownership(&self) -> (u32, u32) {
        let (mut double, mut none) = (0, 0);
        for b in 0..SIZE {
            let n = self
                .nodes
                .iter()
                .filter(|(id, _)| !self.crashed.contains(id))
                .filter(|(id, c)| c.table().owner_of_bucket(b) == Some(**id))
                .count();
            match n {
                0 => none += 1,
                1 => {}
                _ => double += 1,
            }
        }
        (double, none)
    }

    fn epochs(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(id, _)| !self.crashed.contains(id))
            .map(|(_, c)| c.epoch())
            .collect()
    }
}

/// Three nodes boot together; node 1 is the VRRP master. Returns the sim at
/// t = 521 with epoch 2 committed and installed everywhere.
fn booted() -> Sim {
    let mut s = Sim::new(&[1, 2, 3], 0);
    s.step(1, Event::Master(true), 0);
    // t=100: everyone hears everyone, all pending (epoch 0).
    s.hear_all(100);
    assert!(
        s.nodes
            .values()
            .all(|c| matches!(c.phase(), Phase::Starting { .. }))
    );
    assert_eq!(s.node(1).next_deadline(), Some(400));
    // t=400: startup_wait over, nobody ready to pull from: all active,
    // advertising epoch 1; no commit yet, so nobody owns anything.
    s.tick_all(400);
    assert!(s.nodes.values().all(|c| c.phase() == Phase::Active));
    assert!(s.nodes.values().all(|c| c.advertised == 1));
    // t=400 the master committed itself alone (it heard the others pending).
    assert_eq!(s.node(1).epoch(), 1);
    s.deliver(401);
    // t=500: heartbeats show everyone ready; the master commits all three.
    s.hear_all(500);
    assert_eq!(s.node(1).epoch(), 2);
    s.deliver(501);
    assert_eq!(s.epochs(), vec![2, 2, 2]);
    // Nodes 2 and 3 take their buckets from node 1 (live) after the guard.
    assert_eq!(s.ownership().0, 0);
    s.tick_all(521);
    assert_eq!(s.ownership(), (0, 0));
    s
}

#[test]
fn cold_start_converges_on_one_table_owned_once() {
    let s = booted();
    let t = s.node(1).table();
    assert_eq!(t.epoch(), 2);
    for c in s.nodes.values() {
        assert_eq!(c.table().as_ref(), t.as_ref(), "same table everywhere");
    }
    let counts = t.counts();
    assert!(
        counts.iter().all(|&(_, n)| (320..=360).contains(&n)),
        "{counts:?}"
    );
}

#[test]
fn crash_moves_only_the_dead_nodes_buckets_and_never_twice() {
    let mut s = booted();
    let before = s.node(1).table().clone();
    // t=1000: node 3 crashes. Its buckets are owned by none until each
    // survivor's heartbeat declares it dead (3 intervals, timers skewed).
    s.crashed.insert(3);
    assert_eq!(s.ownership().0, 0);
    // t=1300: node 2 notices first (not the master): it takes its share of
    // node 3's buckets without waiting for a commit.
    s.hear(2, &[1, 2], 1300);
    assert_eq!(s.ownership().0, 0, "never owned twice");
    assert_eq!(s.node(2).epoch(), 2, "no commit yet");
    // t=1310: the master notices, commits epoch 3 and announces it.
    s.hear(1, &[1, 2], 1310);
    assert_eq!(s.node(1).epoch(), 3);
    assert_eq!(s.ownership(), (0, 0), "all of node 3's buckets taken");
    s.deliver(1311);
    assert_eq!(s.epochs(), vec![3, 3]);
    let after = s.node(2).table().clone();
    assert_eq!(s.node(1).table().as_ref(), after.as_ref());
    let moves = maglev::diff(&before, &after);
    assert!(!moves.is_empty());
    assert!(
        moves.iter().all(|m| m.from == Some(3)),
        "only node 3's buckets move"
    );
}

#[test]
fn restarted_node_pulls_the_table_before_it_owns_buckets() {
    let mut s = booted();
    s.crashed.insert(3);
    s.hear(1, &[1, 2], 1300);
    s.hear(2, &[1, 2], 1300);
    s.deliver(1301);
    let without3 = s.node(1).table().clone();
    // t=2000: node 3 restarts (fresh state), pending.
    s.crashed.remove(&3);
    s.nodes
        .insert(3, Cluster::new(cfg(3, &[1, 2, 3]), 2000).expect("cluster"));
    assert_eq!(s.node(3).advertised, 0);
    // t=2100: peers hear it pending: nothing changes.
    s.hear(1, &[1, 2, 3], 2100);
    s.hear(2, &[1, 2, 3], 2100);
    assert_eq!(s.node(1).epoch(), 3);
    assert_eq!(s.node(1).table().as_ref(), without3.as_ref());
    // It hears ready peers: pulls from the one with the highest epoch, the
    // lowest id first.
    let acts = s.hear(3, &[1, 2, 3], 2100);
    assert!(acts.contains(&Action::StartBulk { peer: 1 }), "{acts:?}");
    assert_eq!(s.node(3).phase(), Phase::Syncing { peer: 1 });
    // The master's announcement reaches it while syncing: it learns the
    // table but owns nothing.
    s.tick_all(2110);
    s.deliver(2111);
    assert_eq!(s.node(3).epoch(), 3);
    assert!(s.node(3).owned() == 0);
    // t=2200: the table is complete; it advertises epoch 3 (ready).
    let acts = s.step(3, Event::BulkDone, 2200);
    assert!(acts.contains(&Action::SetHeartbeatEpoch(3)), "{acts:?}");
    assert!(s.node(3).owned() == 0, "still not in a commit");
    // t=2300: the master hears it ready and commits epoch 4 with it. The
    // old owners give buckets up on adoption; node 3 takes them after the
    // guard (20 ms).
    s.hear(1, &[1, 2, 3], 2300);
    s.hear(2, &[1, 2, 3], 2300);
    assert_eq!(s.node(1).epoch(), 4);
    assert_eq!(s.ownership().0, 0);
    s.deliver(2301);
    assert_eq!(s.epochs(), vec![4, 4, 4]);
    assert_eq!(s.ownership().0, 0, "never owned twice");
    let (_, none) = s.ownership();
    assert!(none > 300, "node 3's buckets wait for the guard");
    assert_eq!(s.node(3).next_deadline(), Some(2321));
    s.tick_all(2320);
    assert!(s.ownership().1 > 0);
    s.tick_all(2321);
    assert_eq!(s.ownership(), (0, 0));
    let with3 = s.node(3).table().clone();
    let moves = maglev::diff(&without3, &with3);
    assert!(
        moves.iter().all(|m| m.to == Some(3)),
        "only node 3's buckets move"
    );
    assert_eq!(
        with3.as_ref().clone().with_epoch(2),
        booted().node(1).table().as_ref().clone()
    );
}

#[test]
fn graceful_stop_hands_buckets_over_within_one_datagram() {
    let mut s = booted();
    let acts = s.step(2, Event::Shutdown, 3000);
    assert!(acts.contains(&Action::SendLeave));
    assert!(acts.contains(&Action::SetHeartbeatEpoch(0)));
    assert!(s.node(2).owned() == 0, "gives up at once");
    assert_eq!(s.ownership().0, 0);
    s.deliver(3001);
    assert_eq!(s.ownership(), (0, 0), "peers took its buckets on receipt");
    assert_eq!(s.node(1).epoch(), 3, "the master committed without it");
    s.deliver(3002);
    assert_eq!(s.epochs(), vec![3, 3, 3]);
    assert_eq!(s.node(2).phase(), Phase::Leaving { until: 3200 });
    s.step(2, Event::Tick, 3200);
    assert_eq!(s.node(2).phase(), Phase::Stopped);
    // Its heartbeats still come (epoch 0) until it exits: it stays out.
    s.hear(1, &[1, 2, 3], 3300);
    assert_eq!(s.node(1).epoch(), 3);
}

#[test]
fn fast_restart_advertising_epoch_zero_is_treated_as_gone() {
    let mut s = booted();
    // Node 3 restarts within the dead time: peers never see it dead, but
    // its heartbeats now carry epoch 0.
    s.nodes
        .insert(3, Cluster::new(cfg(3, &[1, 2, 3]), 1000).expect("cluster"));
    s.hear(2, &[1, 2, 3], 1050);
    s.hear(1, &[1, 2, 3], 1060);
    assert_eq!(s.ownership(), (0, 0), "survivors took node 3's buckets");
    assert_eq!(s.node(1).epoch(), 3);
}

#[test]
fn partition_heal_ends_with_one_epoch() {
    let mut s = booted();
    // Heartbeat partition {1} | {2, 3}: node 2 becomes master on its side.
    s.hear(1, &[1], 1300);
    s.hear(2, &[2, 3], 1300);
    s.hear(3, &[2, 3], 1300);
    s.step(2, Event::Master(true), 1300);
    assert_eq!(s.node(1).epoch(), 3);
    assert_eq!(s.node(2).epoch(), 3, "the same epoch, another origin");
    s.sent.clear();
    // Heal: VRRP leaves node 1 master (higher priority), node 2 steps down.
    s.step(2, Event::Master(false), 2000);
    s.hear_all(2000);
    s.deliver(2001);
    s.tick_all(2100);
    s.deliver(2101);
    let e = s.epochs();
    assert!(e.windows(2).all(|w| w[0] == w[1]), "{e:?}");
    assert_eq!(s.ownership(), (0, 0));
    let t = s.node(1).table().clone();
    assert!(s.nodes.values().all(|c| c.table().as_ref() == t.as_ref()));
}

#[test]
fn announcements_for_other_node_sets_or_older_epochs_are_ignored() {
    let mut s = booted();
    let t = s.node(2).table().clone();
    let bad = vec![Node::new(1, 1, true), Node::new(9, 1, true)];
    s.step(
        2,
        Event::Announce {
            from: 1,
            epoch: 99,
            nodes: bad,
        },
        1000,
    );
    assert_eq!(s.node(2).stats.announce_refused, 1);
    let old = vec![
        Node::new(1, 1, true),
        Node::new(2, 1, false),
        Node::new(3, 1, true),
    ];
    s.step(
        2,
        Event::Announce {
            from: 1,
            epoch: 1,
            nodes: old,
        },
        1000,
    );
    assert_eq!(s.node(2).stats.announce_old, 1);
    assert_eq!(s.node(2).table().as_ref(), t.as_ref());
}

#[test]
fn bulk_failure_tries_another_peer_then_goes_alone() {
    let mut s = booted();
    s.nodes
        .insert(3, Cluster::new(cfg(3, &[1, 2, 3]), 1000).expect("cluster"));
    let acts = s.hear(3, &[1, 2, 3], 1100);
    assert!(acts.contains(&Action::StartBulk { peer: 1 }));
    let acts = s.step(3, Event::BulkFailed, 1500);
    assert_eq!(acts, vec![Action::StartBulk { peer: 2 }]);
    let acts = s.step(3, Event::BulkFailed, 1900);
    assert!(acts.contains(&Action::SetHeartbeatEpoch(2)), "{acts:?}");
    assert_eq!(s.node(3).phase(), Phase::Active);
}

#[test]
fn master_reannounces_every_interval() {
    let mut s = booted();
    assert_eq!(s.node(1).next_deadline(), Some(600));
    let acts = s.step(1, Event::Tick, 600);
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Announce { epoch: 2, .. }))
    );
    assert_eq!(s.node(1).next_deadline(), Some(700));
    assert_eq!(s.node(2).next_deadline(), None);
}

#[test]
fn config_errors() {
    let p = TableParams::new(SEED, SIZE).expect("prime");
    let c = ClusterConfig::new(7, vec![(1, 1)], p, Duration::from_millis(IV));
    assert_eq!(
        Cluster::new(c, 0).err(),
        Some(ClusterError::SelfNotConfigured(7))
    );
    let c = ClusterConfig::new(1, vec![(1, 1), (1, 2)], p, Duration::from_millis(IV));
    assert_eq!(
        Cluster::new(c, 0).err(),
        Some(ClusterError::Table(TableError::DuplicateNode(1)))
    );
}
