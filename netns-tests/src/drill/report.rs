//! Figures of one drill, computed from what the load generator saw, and
//! the report printed at the end (table) and written as JSON.
//!
//! **Failover gap** (`gap_ms`), the larger of two spans:
//!
//! - *outage*: the longest time, from the last successful response before
//!   the fault to the end of the load, between two consecutive successful
//!   responses (by completion time). Requests that failed, or that were
//!   delayed, leave a hole in the successes; at 200 requests/s a calm run
//!   shows ~5 ms (one request period). This is BENCH.md's "longest run of
//!   failed/absent requests" for a cluster where one node carries all.
//! - *disturbance*: the longest episode of failures — failed requests sent
//!   from one timeout before the fault on, grouped while less than 250 ms
//!   apart — from the first one's send time to the last one's, plus one
//!   request period. In a bi-active cluster the survivors' flows go on
//!   while the dead node's fail, so successes and failures interleave and
//!   the outage alone would hide how long the dead node's flows failed.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::load::{LongConn, Run};
use super::plot::Bin;

/// Every figure of one drill (one JSON object).
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub peer: String,
    pub drill: String,
    /// VRRP advertisement interval, ms.
    pub advert_ms: f64,
    pub nodes: usize,
    /// The state the drill started from.
    pub start: String,
    /// What was done at the fault.
    pub fault: String,
    /// Nodes holding the VIP just before the fault and at the end.
    pub holders_before: Vec<String>,
    pub holders_after: Vec<String>,
    /// See the module doc: max(outage, disturbance). `recovered` is false
    /// when requests did not succeed again before the end of the load (the
    /// outage then runs to its end).
    pub gap_ms: f64,
    pub outage_ms: f64,
    pub disturbed_ms: f64,
    /// The outage measured the same way over the second half of the load
    /// before the fault, when nothing happened: the noise floor of this run.
    pub calm_outage_ms: f64,
    pub recovered: bool,
    /// Where the gap started, ms after the fault (negative: the last
    /// success before the fault).
    pub gap_start_ms: f64,
    pub requests: usize,
    pub failed: usize,
    pub failed_by_reason: BTreeMap<String, usize>,
    /// Longest run of consecutive failed requests (by send order).
    pub longest_failed_run: usize,
    pub served_by: BTreeMap<String, usize>,
    /// Latency of successful requests, ms.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub long_lived: usize,
    pub long_to_real: usize,
    pub long_to_local: usize,
    pub long_broken_real: usize,
    pub long_broken_local: usize,
    /// Long-lived connections that could not even be opened.
    pub long_not_opened: usize,
    /// When each broken connection broke, ms after the fault.
    pub long_broken_at_ms: Vec<f64>,
    /// Longest stall a surviving long-lived connection went through, ms.
    pub long_worst_stall_ms: f64,
    pub long: Vec<LongConn>,
    /// Successes and failures per 100 ms, by send time (t: seconds after the fault).
    pub timeline: Vec<Bin>,
    pub plot: String,
    pub logs: String,
    /// Load: new connections per second, seconds of load, fault after (s).
    pub rate: f64,
    pub load_s: f64,
    pub fault_after_s: f64,
}

/// A long-lived connection was served by a real server (`rsN`), not by a
/// node's local service.
pub fn is_real(server: &str) -> bool {
    server.starts_with("rs")
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn signed_ms(a: Duration, b: Duration) -> f64 {
    if a >= b { ms(a - b) } else { -ms(b - a) }
}

/// The part of [`Figures`] computed from a load run.
pub struct Analysis {
    /// max(outage, disturbed).
    pub gap: Duration,
    pub outage: Duration,
    pub disturbed: Duration,
    pub calm_outage: Duration,
    pub gap_start_ms: f64,
    pub recovered: bool,
    pub failed: usize,
    pub failed_by_reason: BTreeMap<String, usize>,
    pub longest_failed_run: usize,
    pub served_by: BTreeMap<String, usize>,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub timeline: Vec<Bin>,
}

/// Failures closer than this belong to one episode.
const EPISODE_JOIN: Duration = Duration::from_millis(250);

/// The longest failure episode of `run` from `from` on (see the module doc).
fn disturbance(run: &Run, from: Duration, period: Duration) -> Duration {
    let mut longest = Duration::ZERO;
    let mut episode: Option<(Duration, Duration)> = None;
    for s in run
        .samples
        .iter()
        .filter(|s| s.start >= from && s.result.is_err())
    {
        episode = match episode {
            Some((first, last)) if s.start - last < EPISODE_JOIN => Some((first, s.start)),
            _ => Some((s.start, s.start)),
        };
        if let Some((first, last)) = episode {
            longest = longest.max(last - first + period);
        }
    }
    longest
}

/// Gap, failures, latencies and the timeline of `run` around `fault`
/// (both since the load's t0); bins of `bin`. `period`: time between two
/// new requests; `timeout`: a request's deadline.
pub fn analyse(
    run: &Run,
    fault: Duration,
    load_end: Duration,
    bin: Duration,
    period: Duration,
    timeout: Duration,
) -> Analysis {
    let from = fault;
    let mut ends: Vec<Duration> = run
        .samples
        .iter()
        .filter(|s| s.result.is_ok())
        .map(|s| s.end)
        .collect();
    ends.sort();
    let success_ends = ends.clone();
    // The last success before the window opens the first interval.
    let first = ends.partition_point(|e| *e < from).saturating_sub(1);
    let ends = &ends[first..];
    let (mut gap, mut gap_start) = (Duration::ZERO, from);
    for w in ends.windows(2) {
        if w[1] - w[0] > gap {
            gap = w[1] - w[0];
            gap_start = w[0];
        }
    }
    // No success near the end of the load: the hole lasts to its end.
    let last = ends.last().copied().unwrap_or(from);
    let tail = load_end.saturating_sub(last);
    let mut recovered = tail <= EPISODE_JOIN;
    if !recovered && tail > gap {
        gap = tail;
        gap_start = last;
    }
    // Failures still going on at the end of the load: not recovered either.
    let last_failure = run
        .samples
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| s.start)
        .max();
    if last_failure.is_some_and(|f| f + EPISODE_JOIN + period >= load_end && f >= from) {
        recovered = false;
    }

    let outage = gap;
    let calm_outage = success_ends
        .iter()
        .copied()
        .filter(|e| *e >= fault / 2 && *e <= fault)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let disturbed = disturbance(run, fault.saturating_sub(timeout), period);
    if disturbed > gap {
        gap = disturbed;
    }

    let mut failed_by_reason = BTreeMap::new();
    let mut served_by = BTreeMap::new();
    let (mut run_len, mut longest) = (0usize, 0usize);
    let mut hist = Histogram::<u64>::new(3).ok();
    for s in &run.samples {
        match &s.result {
            Ok(server) => {
                *served_by.entry(server.clone()).or_insert(0) += 1;
                if let Some(h) = hist.as_mut() {
                    let _ = h.record((s.end - s.start).as_micros() as u64);
                }
                run_len = 0;
            }
            Err(f) => {
                *failed_by_reason.entry(f.name().to_string()).or_insert(0) += 1;
                run_len += 1;
                longest = longest.max(run_len);
            }
        }
    }
    let q = |q: f64| {
        hist.as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1e3)
    };
    let max = hist.as_ref().map_or(0.0, |h| h.max() as f64 / 1e3);

    // Timeline by send time, relative to the fault.
    let n_bins = load_end.as_nanos().div_ceil(bin.as_nanos().max(1)) as usize + 1;
    let mut bins: Vec<Bin> = (0..n_bins)
        .map(|k| Bin {
            t: (bin * k as u32).as_secs_f64() - fault.as_secs_f64(),
            ok: 0,
            failed: 0,
        })
        .collect();
    for s in &run.samples {
        let k = (s.start.as_nanos() / bin.as_nanos().max(1)) as usize;
        if let Some(b) = bins.get_mut(k) {
            if s.result.is_ok() {
                b.ok += 1;
            } else {
                b.failed += 1;
            }
        }
    }
    // Only whole bins: the last one would be cut by the end of the load.
    let whole = (load_end.as_nanos() / bin.as_nanos().max(1)) as usize;
    bins.truncate(whole.max(1));
    Analysis {
        gap,
        outage,
        disturbed,
        calm_outage,
        gap_start_ms: signed_ms(gap_start, fault),
        recovered,
        failed: run.samples.iter().filter(|s| s.result.is_err()).count(),
        failed_by_reason,
        longest_failed_run: longest,
        served_by,
        p50: q(0.5),
        p99: q(0.99),
        max,
        timeline: bins,
    }
}

/// Long-lived connection counts: (to real, to local, broken real, broken
/// local, not opened, broken-at ms after the fault, worst survivor stall ms).
pub struct LongCounts {
    pub to_real: usize,
    pub to_local: usize,
    pub broken_real: usize,
    pub broken_local: usize,
    pub not_opened: usize,
    pub broken_at_ms: Vec<f64>,
    pub worst_stall_ms: f64,
}

pub fn long_counts(long: &[LongConn], fault: Duration) -> LongCounts {
    let mut c = LongCounts {
        to_real: 0,
        to_local: 0,
        broken_real: 0,
        broken_local: 0,
        not_opened: 0,
        broken_at_ms: Vec::new(),
        worst_stall_ms: 0.0,
    };
    for l in long {
        let Some(server) = &l.server else {
            c.not_opened += 1;
            continue;
        };
        let real = is_real(server);
        if real {
            c.to_real += 1;
        } else {
            c.to_local += 1;
        }
        match l.broke {
            Some(at) => {
                if real {
                    c.broken_real += 1;
                } else {
                    c.broken_local += 1;
                }
                c.broken_at_ms.push(signed_ms(at, fault));
            }
            None => c.worst_stall_ms = c.worst_stall_ms.max(ms(l.worst)),
        }
    }
    c
}

/// The report table.
pub fn table(figs: &[Figures]) -> String {
    let mut s = format!(
        "{:<10} {:>6} {:<11} {:>7} {:>12} {:>13} {:>6} {:>17} {:>11}  {}\n",
        "peer",
        "advert",
        "drill",
        "gap ms",
        "outage(calm)",
        "failed/total",
        "p99 ms",
        "long broken",
        "VIP holder",
        "start"
    );
    for f in figs {
        let gap = if f.recovered {
            format!("{:.0}", f.gap_ms)
        } else {
            format!(">{:.0}", f.gap_ms)
        };
        s.push_str(&format!(
            "{:<10} {:>6} {:<11} {:>7} {:>12} {:>13} {:>6.1} {:>17} {:>11}  {}\n",
            f.peer,
            format!("{}ms", f.advert_ms),
            f.drill,
            gap,
            format!("{:.0} ({:.0})", f.outage_ms, f.calm_outage_ms),
            format!("{}/{}", f.failed, f.requests),
            f.latency_p99_ms,
            format!(
                "{}/{} rs {}/{} lo",
                f.long_broken_real, f.long_to_real, f.long_broken_local, f.long_to_local
            ),
            format!("{}>{}", join(&f.holders_before), join(&f.holders_after)),
            f.start
        ));
    }
    s
}

fn join(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join("+")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::load::{Fail, Sample};

    fn sample(start_ms: u64, lat_ms: u64, ok: bool) -> Sample {
        Sample {
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(start_ms + lat_ms),
            result: if ok {
                Ok("rs1".into())
            } else {
                Err(Fail::ConnectTimeout)
            },
        }
    }

    #[test]
    fn gap_spans_the_failed_requests_between_two_successes() {
        // Every 5 ms for 3 s; the fault at 1.5 s; requests sent in
        // [1.5 s, 1.8 s) fail.
        let samples: Vec<Sample> = (0..600)
            .map(|k| {
                let t = k * 5;
                sample(t, 1, !(1500..1800).contains(&t))
            })
            .collect();
        let run = Run {
            samples,
            long: Vec::new(),
        };
        let a = analyse(
            &run,
            Duration::from_millis(1500),
            Duration::from_millis(3000),
            Duration::from_millis(100),
            Duration::from_millis(5),
            Duration::from_secs(1),
        );
        // Last success sent at 1495 (done 1496), next at 1800 (done 1801).
        assert_eq!(a.outage, Duration::from_millis(305));
        // Failures sent 1500 ..= 1795, plus one period.
        assert_eq!(a.disturbed, Duration::from_millis(300));
        assert_eq!(a.gap, Duration::from_millis(305));
        assert_eq!(a.gap_start_ms, -4.0);
        assert!(a.recovered);
        assert_eq!(a.failed, 60);
        assert_eq!(a.longest_failed_run, 60);
        assert_eq!(a.failed_by_reason["connect_timeout"], 60);
        let zero = a.timeline.iter().position(|b| b.t.abs() < 1e-9);
        let zero = zero.expect("a bin starts at the fault");
        assert_eq!((a.timeline[zero].ok, a.timeline[zero].failed), (0, 20));
        assert_eq!(
            (a.timeline[zero + 3].ok, a.timeline[zero + 3].failed),
            (20, 0)
        );
    }

    #[test]
    fn delayed_answers_count_in_the_gap_though_none_failed() {
        // Requests sent in [1.0 s, 1.6 s) all answered at 1.6 s (a stall).
        let samples: Vec<Sample> = (0..400)
            .map(|k| {
                let t = k * 5;
                let lat = if (1000..1600).contains(&t) {
                    1600 - t
                } else {
                    1
                };
                sample(t, lat, true)
            })
            .collect();
        let run = Run {
            samples,
            long: Vec::new(),
        };
        let a = analyse(
            &run,
            Duration::from_millis(1000),
            Duration::from_millis(2000),
            Duration::from_millis(100),
            Duration::from_millis(5),
            Duration::from_secs(1),
        );
        assert_eq!(a.failed, 0);
        // Last prompt answer 996 ms; the delayed ones complete at 1600.
        assert_eq!(a.gap, Duration::from_millis(604));
    }

    #[test]
    fn no_success_after_the_fault_is_a_gap_to_the_end_not_recovered() {
        let samples: Vec<Sample> = (0..400).map(|k| sample(k * 5, 1, k * 5 < 1000)).collect();
        let run = Run {
            samples,
            long: Vec::new(),
        };
        let a = analyse(
            &run,
            Duration::from_millis(1000),
            Duration::from_millis(2000),
            Duration::from_millis(100),
            Duration::from_millis(5),
            Duration::from_secs(1),
        );
        assert!(!a.recovered);
        assert_eq!(a.gap, Duration::from_millis(2000 - 996));
    }

    #[test]
    fn failures_of_one_node_until_the_end_are_not_recovered() {
        // Every other request fails from the fault to the end of the load.
        let samples: Vec<Sample> = (0..400)
            .map(|k| sample(k * 5, 1, k * 5 < 1000 || k % 2 == 0))
            .collect();
        let run = Run {
            samples,
            long: Vec::new(),
        };
        let a = analyse(
            &run,
            Duration::from_millis(1000),
            Duration::from_millis(2000),
            Duration::from_millis(100),
            Duration::from_millis(5),
            Duration::from_secs(1),
        );
        assert!(!a.recovered);
        // First failure sent at 1005, last at 1995, plus one period.
        assert_eq!(a.disturbed, Duration::from_millis(995));
    }

    #[test]
    fn interleaved_failures_of_one_node_make_a_disturbance_not_an_outage() {
        // Two nodes: every other request fails for 350 ms after the fault.
        let samples: Vec<Sample> = (0..400)
            .map(|k| {
                let t = k * 5;
                sample(t, 1, !((1000..1350).contains(&t) && k % 2 == 1))
            })
            .collect();
        let run = Run {
            samples,
            long: Vec::new(),
        };
        let a = analyse(
            &run,
            Duration::from_millis(1000),
            Duration::from_millis(2000),
            Duration::from_millis(100),
            Duration::from_millis(5),
            Duration::from_secs(1),
        );
        assert!(a.outage <= Duration::from_millis(10), "{:?}", a.outage);
        // First failure sent at 1005, last at 1345, plus one period.
        assert_eq!(a.disturbed, Duration::from_millis(345));
        assert_eq!(a.gap, a.disturbed);
        assert_eq!(a.failed, 35);
    }

    #[test]
    fn long_lived_split_between_real_servers_and_local() {
        let conn = |server: Option<&str>, broke: Option<u64>| LongConn {
            source: "x".into(),
            server: server.map(str::to_string),
            answered: 3,
            broke: broke.map(Duration::from_millis),
            error: broke.map(|_| Fail::Reset),
            worst: Duration::from_millis(40),
        };
        let long = [
            conn(Some("rs1"), None),
            conn(Some("rs2"), Some(1200)),
            conn(Some("lb1"), Some(1100)),
            conn(Some("lb2"), None),
            conn(None, Some(10)),
        ];
        let c = long_counts(&long, Duration::from_millis(1000));
        assert_eq!((c.to_real, c.to_local), (2, 2));
        assert_eq!((c.broken_real, c.broken_local), (1, 1));
        assert_eq!(c.not_opened, 1);
        assert_eq!(c.broken_at_ms, vec![200.0, 100.0]);
        assert_eq!(c.worst_stall_ms, 40.0);
    }
}
