//! Autoscaling rules of one service (the DVS service proxy's LBM): pure,
//! time as a parameter. The master's driver feeds it the pool every tick
//! and runs the commands its decisions name.
//!
//! - **Scale up**: every server of the service has been SATURATED for
//!   `start_period` without a break, the pool is below `max_servers`, and
//!   the cooldown since the last action is over. The saturation period then
//!   starts over (the new server must show up and take load first).
//! - **Scale down**: a server has had no connection for `shutdown_period`,
//!   the pool is above `min_servers`, and the cooldown is over. The server
//!   with the longest idle time goes first (ties: by name). The driver
//!   drains it (weight 0) and runs the scale-down command for it.
//!
//! A rule that would fire but is held back (limit, cooldown) says why in
//! [`Step::held`], so the driver can log that decision too.

use std::collections::BTreeMap;
use std::time::Duration;

use super::levels::Level;

/// `[service.autoscale]` without the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub start_period: Duration,
    pub shutdown_period: Duration,
    pub cooldown: Duration,
    pub min_servers: u32,
    pub max_servers: u32,
}

/// What the rules see of one server of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerView {
    pub name: String,
    /// Last reported level; `None` before the first report.
    pub level: Option<Level>,
    /// Connections (active + inactive) now.
    pub conns: u64,
}

/// An action to take.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    ScaleUp {
        /// Servers now, and after the new one joins.
        servers: u32,
        target: u32,
    },
    ScaleDown {
        server: String,
        servers: u32,
        target: u32,
    },
}

/// Why a rule that would fire did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    UpAtMaxServers,
    UpCooldown,
    DownAtMinServers,
    DownCooldown,
}

impl Hold {
    pub const fn as_str(self) -> &'static str {
        match self {
            Hold::UpAtMaxServers => "scale-up held: at max_servers",
            Hold::UpCooldown => "scale-up held: cooldown",
            Hold::DownAtMinServers => "scale-down held: at min_servers",
            Hold::DownCooldown => "scale-down held: cooldown",
        }
    }
}

/// The result of one tick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    pub decision: Option<Decision>,
    pub held: Option<Hold>,
}

#[derive(Debug, Clone)]
pub struct Autoscaler {
    rules: Rules,
    saturated_since: Option<Duration>,
    idle_since: BTreeMap<String, Duration>,
    last_action: Option<Duration>,
}

impl Autoscaler {
    pub fn new(rules: Rules) -> Self {
        Autoscaler {
            rules,
            saturated_since: None,
            idle_since: BTreeMap::new(),
            last_action: None,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    fn cooling(&self, now: Duration) -> bool {
        self.last_action
            .is_some_and(|t| now < t + self.rules.cooldown)
    }

    /// One evaluation over the pool's current servers.
    pub fn step(&mut self, now: Duration, servers: &[ServerView]) -> Step {
        let n = servers.len() as u32;
        let r = self.rules;
        let all_saturated =
            !servers.is_empty() && servers.iter().all(|s| s.level == Some(Level::Saturated));
        if all_saturated {
            let since = *self.saturated_since.get_or_insert(now);
            if now >= since + r.start_period {
                if n >= r.max_servers {
                    return Step {
                        decision: None,
                        held: Some(Hold::UpAtMaxServers),
                    };
                }
                if self.cooling(now) {
                    return Step {
                        decision: None,
                        held: Some(Hold::UpCooldown),
                    };
                }
                self.last_action = Some(now);
                self.saturated_since = Some(now);
                return Step {
                    decision: Some(Decision::ScaleUp {
                        servers: n,
                        target: n + 1,
                    }),
                    held: None,
                };
            }
        } else {
            self.saturated_since = None;
        }

        self.idle_since
            .retain(|name, _| servers.iter().any(|s| &s.name == name && s.conns == 0));
        for s in servers.iter().filter(|s| s.conns == 0) {
            self.idle_since.entry(s.name.clone()).or_insert(now);
        }
        let longest = self
            .idle_since
            .iter()
            .filter(|(_, since)| now >= **since + r.shutdown_period)
            .min_by_key(|(name, since)| (**since, (*name).clone()))
            .map(|(name, _)| name.clone());
        let Some(server) = longest else {
            return Step::default();
        };
        if n <= r.min_servers {
            return Step {
                decision: None,
                held: Some(Hold::DownAtMinServers),
            };
        }
        if self.cooling(now) {
            return Step {
                decision: None,
                held: Some(Hold::DownCooldown),
            };
        }
        self.last_action = Some(now);
        self.idle_since.remove(&server);
        Step {
            decision: Some(Decision::ScaleDown {
                server,
                servers: n,
                target: n - 1,
            }),
            held: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: u64) -> Duration {
        Duration::from_secs(v)
    }

    fn rules() -> Rules {
        Rules {
            start_period: s(10),
            shutdown_period: s(30),
            cooldown: s(20),
            min_servers: 1,
            max_servers: 3,
        }
    }

    fn view(name: &str, level: Level, conns: u64) -> ServerView {
        ServerView {
            name: name.into(),
            level: Some(level),
            conns,
        }
    }

    fn saturated(n: usize) -> Vec<ServerView> {
        (0..n)
            .map(|i| view(&format!("rs{i}"), Level::Saturated, 5))
            .collect()
    }

    #[test]
    fn all_saturated_for_start_period_scales_up() {
        let mut a = Autoscaler::new(rules());
        assert_eq!(a.step(s(0), &saturated(2)), Step::default());
        assert_eq!(a.step(s(9), &saturated(2)), Step::default());
        assert_eq!(
            a.step(s(10), &saturated(2)).decision,
            Some(Decision::ScaleUp {
                servers: 2,
                target: 3
            })
        );
    }

    #[test]
    fn one_server_below_saturation_restarts_the_period() {
        let mut a = Autoscaler::new(rules());
        a.step(s(0), &saturated(2));
        let mut mixed = saturated(2);
        mixed[1].level = Some(Level::Loaded);
        assert_eq!(a.step(s(5), &mixed), Step::default());
        assert_eq!(a.step(s(6), &saturated(2)), Step::default());
        assert_eq!(a.step(s(15), &saturated(2)), Step::default());
        assert!(a.step(s(16), &saturated(2)).decision.is_some());
    }

    #[test]
    fn unknown_level_is_not_saturated() {
        let mut a = Autoscaler::new(rules());
        let mut v = saturated(1);
        v[0].level = None;
        a.step(s(0), &v);
        assert_eq!(a.step(s(100), &v), Step::default());
        assert_eq!(a.step(s(100), &[]), Step::default());
    }

    #[test]
    fn scale_up_holds_at_max_servers() {
        let mut a = Autoscaler::new(rules());
        a.step(s(0), &saturated(3));
        assert_eq!(
            a.step(s(10), &saturated(3)),
            Step {
                decision: None,
                held: Some(Hold::UpAtMaxServers)
            }
        );
    }

    #[test]
    fn scale_up_waits_for_the_cooldown_then_another_full_period() {
        let mut a = Autoscaler::new(rules());
        a.step(s(0), &saturated(1));
        assert!(a.step(s(10), &saturated(1)).decision.is_some());
        // The period starts over at 10; at 20 it is over but the cooldown
        // (until 30) is not.
        assert_eq!(a.step(s(20), &saturated(2)).held, Some(Hold::UpCooldown));
        assert_eq!(
            a.step(s(30), &saturated(2)).decision,
            Some(Decision::ScaleUp {
                servers: 2,
                target: 3
            })
        );
    }

    #[test]
    fn idle_server_for_shutdown_period_scales_down() {
        let mut a = Autoscaler::new(rules());
        let v = vec![
            view("rs1", Level::Loaded, 4),
            view("rs2", Level::Unloaded, 0),
        ];
        assert_eq!(a.step(s(0), &v), Step::default());
        assert_eq!(a.step(s(29), &v), Step::default());
        assert_eq!(
            a.step(s(30), &v).decision,
            Some(Decision::ScaleDown {
                server: "rs2".into(),
                servers: 2,
                target: 1
            })
        );
    }

    #[test]
    fn a_connection_restarts_the_idle_period() {
        let mut a = Autoscaler::new(rules());
        let idle = vec![
            view("rs1", Level::Loaded, 4),
            view("rs2", Level::Unloaded, 0),
        ];
        let busy = vec![
            view("rs1", Level::Loaded, 4),
            view("rs2", Level::Unloaded, 1),
        ];
        a.step(s(0), &idle);
        a.step(s(20), &busy);
        assert_eq!(a.step(s(21), &idle), Step::default());
        assert_eq!(a.step(s(50), &idle), Step::default());
        assert!(a.step(s(51), &idle).decision.is_some());
    }

    #[test]
    fn scale_down_holds_at_min_servers() {
        let mut a = Autoscaler::new(rules());
        let v = vec![view("rs1", Level::Unloaded, 0)];
        a.step(s(0), &v);
        assert_eq!(a.step(s(30), &v).held, Some(Hold::DownAtMinServers));
    }

    #[test]
    fn longest_idle_goes_first_and_cooldown_spaces_the_next() {
        let mut a = Autoscaler::new(rules());
        let all = vec![
            view("rs1", Level::Unloaded, 0),
            view("rs2", Level::Unloaded, 2),
            view("rs3", Level::Unloaded, 0),
        ];
        a.step(s(0), &all[..1]);
        a.step(s(5), &all);
        let first = a.step(s(30), &all).decision;
        assert_eq!(
            first,
            Some(Decision::ScaleDown {
                server: "rs1".into(),
                servers: 3,
                target: 2
            })
        );
        let rest = vec![all[1].clone(), all[2].clone()];
        assert_eq!(a.step(s(49), &rest).held, Some(Hold::DownCooldown));
        assert_eq!(
            a.step(s(50), &rest).decision,
            Some(Decision::ScaleDown {
                server: "rs3".into(),
                servers: 2,
                target: 1
            })
        );
    }

    #[test]
    fn a_server_that_left_forgets_its_idle_time() {
        let mut a = Autoscaler::new(rules());
        let two = vec![
            view("rs1", Level::Loaded, 3),
            view("rs2", Level::Unloaded, 0),
        ];
        a.step(s(0), &two);
        a.step(s(10), &two[..1]);
        a.step(s(20), &two);
        assert_eq!(a.step(s(49), &two), Step::default());
        assert!(a.step(s(50), &two).decision.is_some());
    }
}
