//! The connection-counting algorithms of IPVS (`ip_vs_lc.c`,
//! `ip_vs_wlc.c`, `ip_vs_sed.c`, `ip_vs_nq.c`) and least response time.
//!
//! All are stateless: they read the connection gauges the dataplane keeps
//! in [`BackendState`] and compare exact fractions (see `min_ratio`), the
//! lowest index winning ties, as IPVS's first-found rule does.

use super::{Algorithm, BackendState, Flow, SchedRng, SchedulerKind, min_ratio};

/// Least connections: the smallest overhead `256 * active + inactive`;
/// weights only matter as 0 (drained).
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastConn;

impl Algorithm for LeastConn {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lc
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, _: &mut SchedRng) -> Option<usize> {
        min_ratio(backends, |b| (b.overhead(), 1))
    }

    fn reset(&mut self) {}
}

/// Weighted least connections: the smallest `overhead / weight`.
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightedLeastConn;

impl Algorithm for WeightedLeastConn {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Wlc
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, _: &mut SchedRng) -> Option<usize> {
        min_ratio(backends, |b| (b.overhead(), u64::from(b.weight)))
    }

    fn reset(&mut self) {}
}

/// Shortest expected delay: the smallest `(active + 1) / weight`, the
/// delay a new connection expects if each server serves its active
/// connections at a rate proportional to its weight. Unlike wlc an idle
/// heavy server beats an idle light one.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShortestExpectedDelay;

fn sed(backends: &[BackendState]) -> Option<usize> {
    min_ratio(backends, |b| {
        (u64::from(b.active_conns) + 1, u64::from(b.weight))
    })
}

impl Algorithm for ShortestExpectedDelay {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Sed
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, _: &mut SchedRng) -> Option<usize> {
        sed(backends)
    }

    fn reset(&mut self) {}
}

/// Never queue: the first eligible backend with no active connection,
/// whatever its weight; when every one is busy, as [`ShortestExpectedDelay`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NeverQueue;

impl Algorithm for NeverQueue {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Nq
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, _: &mut SchedRng) -> Option<usize> {
        backends
            .iter()
            .position(|b| b.is_eligible() && b.active_conns == 0)
            .or_else(|| sed(backends))
    }

    fn reset(&mut self) {}
}

/// Least response time: the smallest health-check RTT average divided by
/// weight; among equals, the smallest `overhead / weight` (so that equal
/// RTTs do not all send their flows to the first backend). A backend not
/// measured yet (RTT 0) counts as fastest, so that it gets traffic and
/// measurements. Meant with health checks: without them no RTT is known
/// and lrt degrades to wlc.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastResponseTime;

impl Algorithm for LeastResponseTime {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lrt
    }

    fn pick(&mut self, backends: &[BackendState], _: &Flow, _: &mut SchedRng) -> Option<usize> {
        let mut best: Option<(usize, &BackendState)> = None;
        for (i, b) in backends.iter().enumerate() {
            if !b.is_eligible() {
                continue;
            }
            let better = match best {
                None => true,
                Some((_, c)) => {
                    let (w, cw) = (u128::from(b.weight), u128::from(c.weight));
                    let (r, cr) = (u128::from(b.rtt_us) * cw, u128::from(c.rtt_us) * w);
                    r < cr
                        || (r == cr && u128::from(b.overhead()) * cw < u128::from(c.overhead()) * w)
                }
            };
            if better {
                best = Some((i, b));
            }
        }
        best.map(|(i, _)| i)
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
pub(crate) mod sim {
    //! A discrete-time simulation: one new connection per tick, each
    //! lasting a number of ticks drawn per backend; the connection gauges
    //! follow, as the dataplane's would.
    use super::super::{Algorithm, BackendState, Flow, SchedRng, below};

    /// Runs `ticks` ticks; returns how many flows each backend got.
    pub fn run(
        s: &mut dyn Algorithm,
        backends: &mut [BackendState],
        ticks: u64,
        rng: &mut SchedRng,
        mut duration: impl FnMut(usize, &mut SchedRng) -> u64,
    ) -> Vec<u64> {
        let mut ends: Vec<(u64, usize)> = Vec::new();
        let mut got = vec![0u64; backends.len()];
        for t in 0..ticks {
            ends.retain(|&(end, i)| {
                if end <= t {
                    backends[i].active_conns -= 1;
                    false
                } else {
                    true
                }
            });
            let h = below(rng, usize::MAX) as u64;
            if let Some(i) = s.pick(backends, &Flow::new(h, h), rng) {
                got[i] += 1;
                backends[i].active_conns += 1;
                ends.push((t + duration(i, rng).max(1), i));
            }
        }
        got
    }

    pub fn share(got: &[u64], i: usize) -> f64 {
        got[i] as f64 / got.iter().sum::<u64>() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{below, rng_from_seed};
    use super::sim::{run, share};
    use super::*;

    fn with_conns(weight: u32, active: u32, inactive: u32) -> BackendState {
        BackendState {
            active_conns: active,
            inactive_conns: inactive,
            ..up(weight)
        }
    }

    #[test]
    fn lc_takes_the_least_overhead_and_ignores_weight() {
        let mut s = LeastConn;
        // overheads 512+0, 256+300, 256+10 -> index 2
        let b = [
            with_conns(9, 2, 0),
            with_conns(1, 1, 300),
            with_conns(1, 1, 10),
        ];
        assert_eq!(pick1(&mut s, &b, 0), Some(2));
        // ties -> first; drained and down skipped
        let b = [up(0), down(1), with_conns(1, 3, 0), with_conns(5, 3, 0)];
        assert_eq!(pick1(&mut s, &b, 0), Some(2));
    }

    #[test]
    fn wlc_divides_by_weight() {
        let mut s = WeightedLeastConn;
        // 256*4/4 = 256 vs 256*2/1 = 512 -> index 0
        let b = [with_conns(4, 4, 0), with_conns(1, 2, 0)];
        assert_eq!(pick1(&mut s, &b, 0), Some(0));
        // all idle: tie at 0 -> first, whatever the weights
        assert_eq!(pick1(&mut s, &[up(1), up(9)], 0), Some(0));
    }

    #[test]
    fn sed_prefers_the_idle_heavy_server_and_nq_any_idle_one() {
        let b = [up(1), up(3)];
        assert_eq!(pick1(&mut ShortestExpectedDelay, &b, 0), Some(1));
        assert_eq!(pick1(&mut NeverQueue, &b, 0), Some(0));
        // both busy: nq = sed: (1+1)/1 = 2 vs (4+1)/3 = 1.67 -> 1
        let b = [with_conns(1, 1, 0), with_conns(3, 4, 0)];
        assert_eq!(pick1(&mut NeverQueue, &b, 0), Some(1));
        assert_eq!(pick1(&mut ShortestExpectedDelay, &b, 0), Some(1));
        // sed sends to a busy heavy server before an idle light one
        let b = [up(1), with_conns(10, 2, 0)];
        assert_eq!(pick1(&mut ShortestExpectedDelay, &b, 0), Some(1));
        assert_eq!(pick1(&mut NeverQueue, &b, 0), Some(0));
    }

    #[test]
    fn lrt_takes_the_least_rtt_per_weight_and_breaks_ties_by_load() {
        let rtt = |weight, rtt_us, active| BackendState {
            rtt_us,
            ..with_conns(weight, active, 0)
        };
        let mut s = LeastResponseTime;
        assert_eq!(
            pick1(&mut s, &[rtt(1, 500, 0), rtt(1, 100, 9), rtt(1, 300, 0)], 0),
            Some(1)
        );
        // 300 / 4 = 75 < 100
        assert_eq!(
            pick1(&mut s, &[rtt(1, 500, 0), rtt(1, 100, 0), rtt(4, 300, 0)], 0),
            Some(2)
        );
        // equal RTT: fewer connections wins
        assert_eq!(
            pick1(&mut s, &[rtt(1, 200, 3), rtt(1, 200, 1), rtt(1, 200, 2)], 0),
            Some(1)
        );
        // not measured yet: tried first
        assert_eq!(pick1(&mut s, &[rtt(1, 200, 0), rtt(1, 0, 5)], 0), Some(1));
    }

    /// Uneven connection lengths: one server finishes its connections in
    /// 20 ticks, the other in 200. lc keeps their active counts level (A
    /// each), so the fast one completes A/20 per tick against A/200: a
    /// share of 10/11 = 0.909 of the flows. rr ignores the lengths: 1:1.
    #[test]
    fn lc_gives_the_faster_server_more_flows_when_lengths_are_uneven() {
        let dur = |i: usize, _: &mut SchedRng| if i == 0 { 20 } else { 200 };
        let mut rng = rng_from_seed(11);
        let mut b = [up(1), up(1)];
        let got = run(&mut LeastConn, &mut b, 20_000, &mut rng, dur);
        let fast = share(&got, 0);
        assert!((0.88..=0.94).contains(&fast), "lc fast share {fast}");

        let mut b = [up(1), up(1)];
        let got = run(
            &mut super::super::RoundRobin::new(),
            &mut b,
            20_000,
            &mut rng,
            dur,
        );
        assert!((share(&got, 0) - 0.5).abs() < 1e-3, "rr {got:?}");
    }

    /// Random lengths (uniform 1..=40 ticks, the same for all servers):
    /// wlc with weights 1:3 keeps active counts near 1:3, so the shares of
    /// flows are near 1/4 and 3/4 (tolerance 0.03 over 40 000 flows).
    #[test]
    fn wlc_shares_follow_weights_under_random_lengths() {
        let mut rng = rng_from_seed(12);
        let mut b = [up(1), up(3)];
        let dur = |_: usize, r: &mut SchedRng| 1 + below(r, 40) as u64;
        let got = run(&mut WeightedLeastConn, &mut b, 40_000, &mut rng, dur);
        let light = share(&got, 0);
        assert!((light - 0.25).abs() < 0.03, "wlc light share {light}");
    }

    /// Uneven lengths per server (server 0 short, server 2 long) and
    /// random: lc still keeps active counts level at every pick: the chosen
    /// server never has more active connections than another.
    #[test]
    fn lc_always_picks_a_least_loaded_server() {
        let mut rng = rng_from_seed(13);
        let mut b = [up(1), up(1), up(1)];
        let mut s = LeastConn;
        let mut ends: Vec<(u64, usize)> = Vec::new();
        for t in 0..5_000u64 {
            ends.retain(|&(e, i)| {
                if e <= t {
                    b[i].active_conns -= 1;
                }
                e > t
            });
            let i = pick1(&mut s, &b, t).expect("eligible");
            let min = b.iter().map(|x| x.active_conns).min().unwrap_or(0);
            assert_eq!(b[i].active_conns, min, "tick {t}: {b:?}");
            b[i].active_conns += 1;
            let len = [3, 10, 30][i] + below(&mut rng, 5) as u64;
            ends.push((t + len, i));
        }
    }
}
