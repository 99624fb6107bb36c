//! `experiments`: the L7 seed's balancing experiments at layer 4 (issue 5)
//! and the feedbackd paper's experiment (issue 6), in network namespaces.
//!
//! `cargo build --workspace && sudo target/debug/experiments [options]`
//! (`experiments --help` explains every option).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use netns_tests::experiments::{self, Exp, Options};

/// The L7 seed's balancing experiments repeated at layer 4, and the
/// feedbackd paper's experiment (needs root; build the workspace first:
/// `cargo build --workspace`).
///
/// Topology (built once, removed at the end): a client (198.18.0.2), the
/// balancer (VIP 198.18.0.100:80, NAT), real servers rs1..rs3 (rs1..rs4
/// when feedback runs) running `testsrv` on 8080 with an emulated
/// capacity: `--delay-ms` service time per request and `--workers`
/// requests in service at once (capacity = workers x 1000 / delay req/s;
/// no CPU burnt), or `--burn-us` CPU time per request (feedback's rs4).
///
///   scale     1 server vs 3 equal servers (200 req/s each) under rr;
///   weighted  rr vs wrr 1:2:3, servers of 100/200/300 req/s;
///   least     lc vs lrt (HTTP health checks every 250 ms feed the RTT),
///             servers of 100/200/300 req/s;
///   shed      none vs hard vs exponential shedding (rr) while rs1
///             (25 req/s) gets a third of an open-loop 120 conn/s;
///   feedback  the feedbackd paper's experiment: four servers (rs1..rs4),
///             rs4 burning --fb-burn-us of CPU per request with one
///             worker; wrr with equal weights vs the same with agents
///             (balancer-agent, plugin cgroup) reporting each server's
///             CPU to the feedback master; open loop at each of
///             --fb-rates; response rate, errors, latency, per-server
///             CPU (each server in a cpuacct cgroup), share and weight.
///
/// scale, weighted and least: closed loop (--clients threads, one request
/// per new connection, back to back); shed: new connections at a fixed
/// rate (the drill's generator), as does feedback. Each request has a 2 s
/// deadline. Variants alternate, the table gives medians over --reps
/// runs; only ratios within one run mean anything (BENCH.md).
///
/// Output: a Markdown table per experiment on stdout (and all of them in
/// OUT/experiments.md), SVG plots under --out, everything as JSON (--json).
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Smoke run: one short run per variant (about a minute).
    #[arg(long)]
    quick: bool,
    /// Only these experiments (repeatable): scale, weighted, least, shed,
    /// feedback.
    #[arg(long = "only", value_name = "EXP")]
    only: Vec<String>,
    /// Runs per variant (default 3, --quick 1).
    #[arg(long)]
    reps: Option<usize>,
    /// Closed-loop clients.
    #[arg(long)]
    clients: Option<usize>,
    /// Closed-loop load per run, ms (default 4000, --quick 1500).
    #[arg(long, value_name = "MS")]
    duration_ms: Option<u64>,
    /// shed: new connections per second.
    #[arg(long)]
    shed_rate: Option<f64>,
    /// shed: load per run, ms (default 10000, --quick 4000).
    #[arg(long, value_name = "MS")]
    shed_duration_ms: Option<u64>,
    /// shed: the service's connection threshold (hard and exponential).
    #[arg(long)]
    shed_threshold: Option<u32>,
    /// feedback: offered loads, new connections/s, comma-separated
    /// (default 100,200,300,400,500,600,800; --quick 100,500).
    #[arg(long, value_name = "RATES", value_delimiter = ',')]
    fb_rates: Vec<f64>,
    /// feedback: rs4's CPU time per request, µs (default 10000).
    #[arg(long, value_name = "US")]
    fb_burn_us: Option<u64>,
    /// feedback: load per run before measuring, ms (default 3000, --quick 1000).
    #[arg(long, value_name = "MS")]
    fb_warmup_ms: Option<u64>,
    /// feedback: measured load per run, ms (default 10000, --quick 3000).
    #[arg(long, value_name = "MS")]
    fb_duration_ms: Option<u64>,
    /// Directory for the SVG plots and experiments.md.
    #[arg(long, default_value = "experiments-out")]
    out: PathBuf,
    /// Write every figure as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Progress on stderr.
    #[arg(short, long)]
    verbose: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut o = if cli.quick {
        Options::quick(cli.out.clone())
    } else {
        Options::full(cli.out.clone())
    };
    if !cli.only.is_empty() {
        o.exps = cli
            .only
            .iter()
            .map(|s| Exp::parse(s))
            .collect::<Result<_>>()?;
    }
    o.reps = cli.reps.unwrap_or(o.reps).max(1);
    o.clients = cli.clients.unwrap_or(o.clients).max(1);
    if let Some(ms) = cli.duration_ms {
        o.duration = Duration::from_millis(ms.max(100));
    }
    o.shed_rate = cli.shed_rate.unwrap_or(o.shed_rate).clamp(1.0, 5000.0);
    if let Some(ms) = cli.shed_duration_ms {
        o.shed_duration = Duration::from_millis(ms.max(500));
    }
    o.shed_threshold = cli.shed_threshold.unwrap_or(o.shed_threshold).max(1);
    if !cli.fb_rates.is_empty() {
        o.fb_rates = cli.fb_rates.iter().map(|r| r.clamp(1.0, 5000.0)).collect();
    }
    o.fb_burn_us = cli.fb_burn_us.unwrap_or(o.fb_burn_us).clamp(1, 1_000_000);
    if let Some(ms) = cli.fb_warmup_ms {
        o.fb_warmup = Duration::from_millis(ms);
    }
    if let Some(ms) = cli.fb_duration_ms {
        o.fb_duration = Duration::from_millis(ms.max(500));
    }
    o.verbose = cli.verbose;
    let t = Instant::now();
    let reports = experiments::run(&o)?;
    let mut md = String::new();
    for r in &reports {
        md.push_str(&r.table);
        md.push('\n');
        for p in &r.plots {
            let file = std::path::Path::new(p)
                .file_name()
                .map_or(p.clone(), |f| f.to_string_lossy().into_owned());
            md.push_str(&format!("![{}]({file})\n", r.experiment));
            println!("plot: {p}");
        }
        md.push('\n');
    }
    let md_path = o.out.join("experiments.md");
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("tables: {}", md_path.display());
    if let Some(j) = &cli.json {
        std::fs::write(j, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("writing {}", j.display()))?;
        println!("json: {}", j.display());
    }
    println!("done in {:.0} s", t.elapsed().as_secs_f64());
    Ok(())
}
