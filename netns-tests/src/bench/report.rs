//! Figures per round, their medians per path, the printed tables and the
//! JSON written by `--json`.

use serde::Serialize;

/// What one round measured on one path.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Round {
    pub round: usize,
    /// Position of the path within its round (the order rotates).
    pub position: usize,
    pub keepalive_rps: f64,
    pub keepalive_p50_ms: f64,
    pub keepalive_p99_ms: f64,
    pub keepalive_errors: u64,
    pub close_rps: f64,
    pub close_p50_ms: f64,
    pub close_p99_ms: f64,
    pub close_errors: u64,
    /// Answered UDP request/response exchanges per second.
    pub udp_pps: f64,
    pub udp_p50_us: f64,
    pub udp_p99_us: f64,
    pub udp_sent: u64,
    pub udp_answered: u64,
    pub udp_lost: u64,
    pub udp_late: u64,
    /// Balancer CPU time (user + system, all threads) per frame it
    /// received (front + back + TUN), over the three loads; our paths only.
    pub cpu_us_per_pkt: Option<f64>,
    /// The user and system parts of `cpu_us_per_pkt`.
    pub cpu_user_us_per_pkt: Option<f64>,
    pub cpu_sys_us_per_pkt: Option<f64>,
    pub cpu_us_per_pkt_keepalive: Option<f64>,
    pub cpu_us_per_pkt_close: Option<f64>,
    pub cpu_us_per_pkt_udp: Option<f64>,
    pub balancer_frames: Option<u64>,
}

/// The memory figure: RSS of `balancer run` holding many UDP flows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryFigures {
    pub max_entries: usize,
    /// Distinct flows (source address and port) opened.
    pub flows: usize,
    /// Datagrams sent: one per flow and pass.
    pub datagrams_sent: u64,
    /// Passes over the flows (another one runs while the node tracks fewer).
    pub passes: u32,
    pub rate_pps: u64,
    /// Connections the node reports (active + inactive over all services).
    pub tracked: u64,
    /// Frames the node's kernel received on the front NIC while the flows
    /// were opened, and frames the dataplane read from its front ring: the
    /// difference was lost before the dataplane (a full RX ring).
    pub front_rx_kernel: u64,
    pub front_rx_balancer: u64,
    pub table_full_drops: u64,
    pub rss_idle_kib: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// RSS parts with the flows: anonymous (heap), file (ring mappings).
    pub anon_idle_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub rss_mib: f64,
    pub target_mib: f64,
    pub target_met: bool,
}

/// Ratios of a path's medians to nftables' (1.0 = same; above 1 is more
/// throughput, or more latency for the latency figures).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    pub keepalive_rps: f64,
    pub keepalive_p50_ms: f64,
    pub close_rps: f64,
    pub close_p50_ms: f64,
    pub close_p99_ms: f64,
    pub udp_pps: f64,
}

/// One path's result: medians over its rounds, the rounds themselves.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathResult {
    pub name: String,
    pub description: String,
    pub target: String,
    pub rounds: usize,
    pub keepalive_rps: f64,
    pub keepalive_p50_ms: f64,
    pub keepalive_p99_ms: f64,
    pub close_rps: f64,
    pub close_p50_ms: f64,
    pub close_p99_ms: f64,
    pub udp_pps: f64,
    pub udp_p50_us: f64,
    pub udp_p99_us: f64,
    pub cpu_us_per_pkt: Option<f64>,
    /// The user and system parts of `cpu_us_per_pkt`.
    pub cpu_user_us_per_pkt: Option<f64>,
    pub cpu_sys_us_per_pkt: Option<f64>,
    pub cpu_us_per_pkt_keepalive: Option<f64>,
    pub cpu_us_per_pkt_close: Option<f64>,
    pub cpu_us_per_pkt_udp: Option<f64>,
    /// Totals over all rounds.
    pub keepalive_errors: u64,
    pub close_errors: u64,
    pub udp_lost: u64,
    /// Ratios of this path's medians to nftables' medians.
    pub vs_nft: Option<Ratios>,
    /// Median over the rounds of the ratio within each round: steadier
    /// when the machine's load drifts between rounds.
    pub vs_nft_per_round: Option<Ratios>,
    pub memory: Option<MemoryFigures>,
    pub per_round: Vec<Round>,
}

/// Median of the values (mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

impl PathResult {
    /// Medians of `rounds`, one figure at a time.
    pub fn from_rounds(
        name: &str,
        description: String,
        target: String,
        rounds: Vec<Round>,
    ) -> PathResult {
        let med = |f: fn(&Round) -> f64| median(rounds.iter().map(f)).unwrap_or(0.0);
        let med_opt = |f: fn(&Round) -> Option<f64>| median(rounds.iter().filter_map(f));
        PathResult {
            name: name.to_owned(),
            description,
            target,
            rounds: rounds.len(),
            keepalive_rps: med(|r| r.keepalive_rps),
            keepalive_p50_ms: med(|r| r.keepalive_p50_ms),
            keepalive_p99_ms: med(|r| r.keepalive_p99_ms),
            close_rps: med(|r| r.close_rps),
            close_p50_ms: med(|r| r.close_p50_ms),
            close_p99_ms: med(|r| r.close_p99_ms),
            udp_pps: med(|r| r.udp_pps),
            udp_p50_us: med(|r| r.udp_p50_us),
            udp_p99_us: med(|r| r.udp_p99_us),
            cpu_us_per_pkt: med_opt(|r| r.cpu_us_per_pkt),
            cpu_user_us_per_pkt: med_opt(|r| r.cpu_user_us_per_pkt),
            cpu_sys_us_per_pkt: med_opt(|r| r.cpu_sys_us_per_pkt),
            cpu_us_per_pkt_keepalive: med_opt(|r| r.cpu_us_per_pkt_keepalive),
            cpu_us_per_pkt_close: med_opt(|r| r.cpu_us_per_pkt_close),
            cpu_us_per_pkt_udp: med_opt(|r| r.cpu_us_per_pkt_udp),
            keepalive_errors: rounds.iter().map(|r| r.keepalive_errors).sum(),
            close_errors: rounds.iter().map(|r| r.close_errors).sum(),
            udp_lost: rounds.iter().map(|r| r.udp_lost).sum(),
            vs_nft: None,
            vs_nft_per_round: None,
            memory: None,
            per_round: rounds,
        }
    }

    /// The figures that get ratios, in [`Ratios`] order.
    fn ratio_figures(&self) -> [f64; 6] {
        [
            self.keepalive_rps,
            self.keepalive_p50_ms,
            self.close_rps,
            self.close_p50_ms,
            self.close_p99_ms,
            self.udp_pps,
        ]
    }

    /// Ratios of this path's medians to `base`'s.
    pub fn ratios_to(&self, base: &PathResult) -> Ratios {
        Ratios::from_pairs(self.ratio_figures(), base.ratio_figures())
    }

    /// Median of the per-round ratios to `base` (rounds matched by number).
    pub fn per_round_ratios_to(&self, base: &PathResult) -> Ratios {
        let per_round: Vec<[f64; 6]> = self
            .per_round
            .iter()
            .filter_map(|a| {
                let b = base.per_round.iter().find(|b| b.round == a.round)?;
                let x = Ratios::from_pairs(a.ratio_figures(), b.ratio_figures());
                Some(x.as_array())
            })
            .collect();
        let med = |i: usize| median(per_round.iter().map(|r| r[i])).unwrap_or(f64::NAN);
        Ratios::from_array(std::array::from_fn(med))
    }
}

impl Round {
    fn ratio_figures(&self) -> [f64; 6] {
        [
            self.keepalive_rps,
            self.keepalive_p50_ms,
            self.close_rps,
            self.close_p50_ms,
            self.close_p99_ms,
            self.udp_pps,
        ]
    }
}

impl Ratios {
    fn from_array(v: [f64; 6]) -> Ratios {
        Ratios {
            keepalive_rps: v[0],
            keepalive_p50_ms: v[1],
            close_rps: v[2],
            close_p50_ms: v[3],
            close_p99_ms: v[4],
            udp_pps: v[5],
        }
    }

    fn as_array(&self) -> [f64; 6] {
        [
            self.keepalive_rps,
            self.keepalive_p50_ms,
            self.close_rps,
            self.close_p50_ms,
            self.close_p99_ms,
            self.udp_pps,
        ]
    }

    /// `a[i] / b[i]`, NaN where `b[i]` is not positive.
    fn from_pairs(a: [f64; 6], b: [f64; 6]) -> Ratios {
        Ratios::from_array(std::array::from_fn(|i| {
            if b[i] > 0.0 { a[i] / b[i] } else { f64::NAN }
        }))
    }
}

/// `12345.6` -> `12,346`.
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Left-aligned first column, right-aligned others, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// The main table: one row per path, medians.
pub fn figures_table(results: &[PathResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                thousands(r.keepalive_rps),
                format!("{:.2}/{:.2}", r.keepalive_p50_ms, r.keepalive_p99_ms),
                thousands(r.close_rps),
                format!("{:.2}/{:.2}", r.close_p50_ms, r.close_p99_ms),
                thousands(r.udp_pps),
                format!("{:.0}/{:.0}", r.udp_p50_us, r.udp_p99_us),
                match (
                    r.cpu_us_per_pkt,
                    r.cpu_user_us_per_pkt,
                    r.cpu_sys_us_per_pkt,
                ) {
                    (Some(c), Some(u), Some(s)) => format!("{c:.2} ({u:.2}+{s:.2})"),
                    _ => "-".to_owned(),
                },
            ]
        })
        .collect();
    table(
        &[
            "path",
            "keep-alive req/s",
            "p50/p99 ms",
            "close req/s",
            "p50/p99 ms",
            "UDP pps",
            "p50/p99 µs",
            "CPU µs/pkt (usr+sys)",
        ],
        &rows,
    )
}

/// Ratios of every path to nftables.
pub fn ratio_table(results: &[PathResult]) -> String {
    let row = |label: String, x: &Ratios| {
        vec![
            label,
            format!("{:.2}", x.keepalive_rps),
            format!("{:.2}", x.close_rps),
            format!("{:.2}", x.close_p50_ms),
            format!("{:.2}", x.close_p99_ms),
            format!("{:.2}", x.udp_pps),
        ]
    };
    let mut rows = Vec::new();
    for r in results {
        if let Some(x) = &r.vs_nft {
            rows.push(row(format!("{}/nft of medians", r.name), x));
        }
        if let Some(x) = &r.vs_nft_per_round {
            rows.push(row(format!("{}/nft per round", r.name), x));
        }
    }
    table(
        &[
            "ratio",
            "keep-alive req/s",
            "close req/s",
            "p50 close",
            "p99 close",
            "UDP pps",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
        assert_eq!(median([f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn medians_are_taken_per_figure_and_errors_summed() {
        let round = |rps: f64, err: u64, cpu: Option<f64>| Round {
            close_rps: rps,
            close_errors: err,
            cpu_us_per_pkt: cpu,
            ..Round::default()
        };
        let r = PathResult::from_rounds(
            "nat",
            String::new(),
            String::new(),
            vec![
                round(10.0, 1, Some(2.0)),
                round(30.0, 0, None),
                round(20.0, 2, Some(4.0)),
            ],
        );
        assert_eq!(r.close_rps, 20.0);
        assert_eq!(r.close_errors, 3);
        assert_eq!(r.cpu_us_per_pkt, Some(3.0));
        assert_eq!(r.rounds, 3);
    }

    #[test]
    fn per_round_ratios_pair_rounds_by_number() {
        let round = |n: usize, rps: f64| Round {
            round: n,
            close_rps: rps,
            keepalive_rps: 1.0,
            ..Round::default()
        };
        let nat = PathResult::from_rounds(
            "nat",
            String::new(),
            String::new(),
            vec![round(1, 50.0), round(2, 100.0), round(3, 55.0)],
        );
        let nft = PathResult::from_rounds(
            "nft",
            String::new(),
            String::new(),
            vec![round(1, 100.0), round(2, 100.0), round(3, 55.0)],
        );
        // Of medians: 55 / 100. Per round: 0.5, 1.0, 1.0 -> 1.0.
        assert!((nat.ratios_to(&nft).close_rps - 0.55).abs() < 1e-9);
        assert!((nat.per_round_ratios_to(&nft).close_rps - 1.0).abs() < 1e-9);
        assert!(
            nat.per_round_ratios_to(&nft).udp_pps.is_nan(),
            "no UDP figure: no ratio"
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(36_720.2), "36,720");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["a", "bb"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxyz   1\n");
    }
}
