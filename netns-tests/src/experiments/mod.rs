//! `experiments`: the L7 seed's balancing experiments repeated at layer 4
//! (issue 5) and the feedbackd paper's experiment (issue 6), on the
//! single-node topology ([`SingleNode`]): a client, the balancer, three
//! real servers (four when `feedback` runs) running `testsrv` whose
//! capacity is emulated (`--delay-ms` service time, `--workers`
//! concurrent requests, `--burn-us` CPU per request).
//!
//! 1. **scale**: 1 server vs 3 equal servers under rr.
//! 2. **weighted**: rr vs wrr 1:2:3 on servers of capacities 1:2:3.
//! 3. **least**: lc vs lrt (health-check RTT) on the same unequal servers.
//! 4. **shed**: no shedding vs hard vs exponential while one server of
//!    three is overloaded (open-loop load beyond its share).
//! 5. **feedback** (the feedbackd paper's experiment, [`feedback`]): four
//!    servers, one serving an expensive (CPU-burning) response; wrr with
//!    equal weights vs weights from agents' CPU reports, under rising
//!    open-loop load.
//!
//! Experiments 1-3 use a closed loop (`clients` threads, each sending one
//! request per new connection, back to back, as the seed's clients did);
//! experiment 4 the drill's open-loop generator ([`load::run`]: new
//! connections at a fixed rate whatever happens to earlier ones), so that
//! the overload does not slow the offered load down. Every request's
//! connection is new (`Connection: close`): an L4 balancer decides per
//! connection.
//!
//! One topology serves the whole run; each run of a variant starts its
//! servers and the balancer afresh and stops them after. Variants of an
//! experiment alternate (ABAB, then BABA...) and the table gives the median
//! over `reps` runs (BENCH.md: only ratios within one run mean anything).

pub mod chart;
pub mod feedback;

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::drill::load::{self, Fail, Sample, Spec};
use crate::drill::plot::{self, Bin};
use crate::single::{CLIENT, SingleNode, VIP, rs_addr, wait_listening};
use crate::topo::{Proc, wait_until, workspace_bin};
use chart::{Bar, Line, PALETTE, Panel};

/// The VIP's port and the real servers' port.
const VIP_PORT: u16 = 80;
const SRV_PORT: u16 = 8080;
/// Width of a time-series bin.
const BIN: Duration = Duration::from_millis(100);
/// Window of the p99-over-time series (trailing, every bin).
const P99_WINDOW: Duration = Duration::from_secs(1);

/// The experiments, in run order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exp {
    Scale,
    Weighted,
    Least,
    Shed,
    Feedback,
}

impl Exp {
    pub const ALL: [Exp; 5] = [
        Exp::Scale,
        Exp::Weighted,
        Exp::Least,
        Exp::Shed,
        Exp::Feedback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Exp::Scale => "scale",
            Exp::Weighted => "weighted",
            Exp::Least => "least",
            Exp::Shed => "shed",
            Exp::Feedback => "feedback",
        }
    }

    pub fn parse(s: &str) -> Result<Exp> {
        Exp::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .with_context(|| {
                format!("unknown experiment {s:?} (scale, weighted, least, shed, feedback)")
            })
    }
}

/// A real server's emulated capacity.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Server {
    /// Service time of a request.
    pub delay_ms: u64,
    /// Requests in service at once.
    pub workers: usize,
}

impl Server {
    /// Requests per second it can serve.
    pub fn capacity(&self) -> f64 {
        self.workers as f64 * 1000.0 / self.delay_ms.max(1) as f64
    }
}

/// Equal servers (scale): 200 requests/s each.
const EQUAL: Server = Server {
    delay_ms: 10,
    workers: 2,
};
/// Capacities 1:2:3 (weighted, least): 100, 200, 300 requests/s, by
/// service time (30, 15, 10 ms) with 3 workers each, so an idle server's
/// response time already tells them apart.
const UNEQUAL: [Server; 3] = [
    Server {
        delay_ms: 30,
        workers: 3,
    },
    Server {
        delay_ms: 15,
        workers: 3,
    },
    Server {
        delay_ms: 10,
        workers: 3,
    },
];
/// Shed: rs1 is slow (25/s), rs2 and rs3 fast (1600/s each).
const OVERLOAD: [Server; 3] = [
    Server {
        delay_ms: 40,
        workers: 1,
    },
    Server {
        delay_ms: 5,
        workers: 8,
    },
    Server {
        delay_ms: 5,
        workers: 8,
    },
];

/// Everything a run does (the CLI fills it).
#[derive(Clone, Debug)]
pub struct Options {
    pub exps: Vec<Exp>,
    /// Runs of each variant; the table gives medians.
    pub reps: usize,
    /// Closed-loop clients (experiments 1-3).
    pub clients: usize,
    /// Closed-loop load per run.
    pub duration: Duration,
    /// Shed: new connections per second, load per run, and threshold.
    pub shed_rate: f64,
    pub shed_duration: Duration,
    pub shed_threshold: u32,
    /// Feedback: offered loads (new connections/s), rs4's CPU per
    /// request (µs), the load before and during the measured window.
    pub fb_rates: Vec<f64>,
    pub fb_burn_us: u64,
    pub fb_warmup: Duration,
    pub fb_duration: Duration,
    /// Deadline of one request (connect + request + response).
    pub timeout: Duration,
    pub out: PathBuf,
    pub verbose: bool,
}

impl Options {
    /// A full run: a few minutes.
    pub fn full(out: PathBuf) -> Options {
        Options {
            exps: Exp::ALL.to_vec(),
            reps: 3,
            clients: 16,
            duration: Duration::from_secs(4),
            shed_rate: 120.0,
            shed_duration: Duration::from_secs(10),
            shed_threshold: 30,
            fb_rates: vec![100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 800.0],
            fb_burn_us: 10_000,
            fb_warmup: Duration::from_secs(3),
            fb_duration: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            out,
            verbose: false,
        }
    }

    /// A smoke run: one short run of every variant.
    pub fn quick(out: PathBuf) -> Options {
        Options {
            reps: 1,
            duration: Duration::from_millis(1500),
            shed_duration: Duration::from_secs(4),
            fb_rates: vec![100.0, 500.0],
            fb_warmup: Duration::from_secs(1),
            fb_duration: Duration::from_secs(3),
            ..Options::full(out)
        }
    }
}

/// How a run loads the service.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// `clients` threads, back to back, for `duration`.
    Closed { clients: usize, duration: Duration },
    /// New connections at `rate` per second for `duration`.
    Open { rate: f64, duration: Duration },
}

impl Load {
    fn duration(&self) -> Duration {
        match *self {
            Load::Closed { duration, .. } | Load::Open { duration, .. } => duration,
        }
    }

    fn describe(&self) -> String {
        match *self {
            Load::Closed { clients, duration } => format!(
                "closed loop, {clients} clients, {:.1} s, one request per connection",
                duration.as_secs_f64()
            ),
            Load::Open { rate, duration } => format!(
                "open loop, {rate:.0} new connections/s, {:.1} s, one request per connection",
                duration.as_secs_f64()
            ),
        }
    }
}

/// One configuration compared in an experiment.
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    servers: Vec<Server>,
    /// Service keys after `port` (scheduler, subtables).
    keys: String,
    weights: Vec<u16>,
    /// Health checks configured: wait for every backend up with an RTT.
    health: bool,
}

impl Variant {
    fn new(name: &str, servers: &[Server], scheduler: &str) -> Variant {
        Variant {
            name: name.into(),
            servers: servers.to_vec(),
            keys: format!("scheduler = \"{scheduler}\"\n"),
            weights: vec![1; servers.len()],
            health: false,
        }
    }

    fn config(&self) -> String {
        // Short TIME_WAIT/CLOSE in the balancer's table: closed connections
        // (inactive) would otherwise dominate the connection counts that
        // lc and shedding read.
        let mut s = format!(
            "[conntrack]\ntcp_time_wait = \"100ms\"\ntcp_close = \"100ms\"\nexpire_interval = \"20ms\"\n\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {VIP_PORT}\nprotocol = \"tcp\"\n{}\n",
            self.keys
        );
        for (i, w) in self.weights.iter().enumerate() {
            s.push_str(&format!(
                "[[service.backend]]\nname = \"rs{}\"\naddress = \"{}\"\nport = {SRV_PORT}\nweight = {w}\nforward = \"nat\"\n\n",
                i + 1,
                rs_addr(i)
            ));
        }
        s
    }
}

/// What one run (or the median of several) measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    pub requests: usize,
    pub ok: usize,
    /// Connections refused by a RST (shed by the balancer).
    pub refused: usize,
    /// No answer before the deadline (connect or response).
    pub timeouts: usize,
    pub other_errors: usize,
    /// Successful requests per second of load.
    pub throughput: f64,
    /// Latency of successful requests (connect to last byte), ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// Share of the successful requests per server (X-Server).
    pub share: BTreeMap<String, f64>,
    /// The balancer's counters at the end of the run.
    pub shed: u64,
    pub resets_sent: u64,
    /// Health-check RTT average per backend at the end, ms (0: none).
    pub rtt_ms: BTreeMap<String, f64>,
}

/// A variant's runs and their median.
#[derive(Clone, Debug, Serialize)]
pub struct VariantReport {
    pub name: String,
    pub servers: Vec<Server>,
    pub median: Figures,
    pub runs: Vec<Figures>,
}

/// One 100 ms bin of a run's time series (requests by send time).
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Start of the bin, seconds since the load started.
    pub t: f64,
    pub ok: u32,
    pub refused: u32,
    pub failed_other: u32,
    /// p99 latency of the successful requests sent in the trailing 1 s
    /// window ending with this bin, ms (0 when none).
    pub p99_ms: f64,
}

/// The time series of a variant's last run.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    pub variant: String,
    pub points: Vec<Point>,
}

/// One experiment's results.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub experiment: String,
    pub title: String,
    pub load: String,
    pub variants: Vec<VariantReport>,
    pub series: Vec<Series>,
    pub plots: Vec<String>,
    pub table: String,
    /// The feedback experiment's figures (its `variants` and `series`
    /// are empty: it measures per load step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<feedback::FeedbackData>,
}

/// Runs the chosen experiments on one topology; returns their reports.
pub fn run(opts: &Options) -> Result<Vec<Report>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let t = Instant::now();
    let real_servers = if opts.exps.contains(&Exp::Feedback) {
        feedback::SERVERS
    } else {
        3
    };
    let node = SingleNode::new(
        "exp",
        &crate::single::Options {
            real_servers,
            ..crate::single::Options::default()
        },
    )?;
    if opts.verbose {
        eprintln!(
            "experiments: topology in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let mut reports = Vec::new();
    for e in &opts.exps {
        let r = run_exp(&node, *e, opts).with_context(|| format!("experiment {}", e.name()))?;
        println!("{}\n", r.table);
        reports.push(r);
    }
    Ok(reports)
}

fn run_exp(node: &SingleNode, exp: Exp, opts: &Options) -> Result<Report> {
    let closed = Load::Closed {
        clients: opts.clients,
        duration: opts.duration,
    };
    let (title, load, variants) = match exp {
        Exp::Scale => (
            "1 server vs 3 servers under rr",
            closed,
            vec![
                Variant::new("1 server", &[EQUAL], "rr"),
                Variant::new("3 servers rr", &[EQUAL; 3], "rr"),
            ],
        ),
        Exp::Weighted => {
            let mut wrr = Variant::new("wrr 1:2:3", &UNEQUAL, "wrr");
            wrr.weights = vec![1, 2, 3];
            (
                "rr vs wrr 1:2:3 on servers of capacities 1:2:3",
                closed,
                vec![Variant::new("rr", &UNEQUAL, "rr"), wrr],
            )
        }
        Exp::Least => {
            let health = "[service.health]\ncheck = \"http\"\npath = \"/health\"\nexpect_status = 200\n\
                          interval = \"250ms\"\ntimeout = \"250ms\"\nrise = 1\nfall = 8\non_down = \"keep\"\n";
            let mut v = vec![
                Variant::new("lc", &UNEQUAL, "lc"),
                Variant::new("lrt", &UNEQUAL, "lrt"),
            ];
            for v in &mut v {
                v.keys.push_str(health);
                v.health = true;
            }
            (
                "lc vs lrt (HTTP health checks every 250 ms feed the RTT) on servers of capacities 1:2:3",
                closed,
                v,
            )
        }
        Exp::Shed => {
            let th = opts.shed_threshold;
            let mut hard = Variant::new("hard", &OVERLOAD, "rr");
            hard.keys.push_str(&format!(
                "[service.shed]\nstrategy = \"hard\"\nthreshold = {th}\n"
            ));
            let mut exp = Variant::new("exponential", &OVERLOAD, "rr");
            exp.keys.push_str(&format!(
                "[service.shed]\nstrategy = \"exponential\"\nthreshold = {th}\nk = 0.3\n"
            ));
            (
                "no shedding vs hard vs exponential (K 0.3), rr, rs1 overloaded",
                Load::Open {
                    rate: opts.shed_rate,
                    duration: opts.shed_duration,
                },
                vec![Variant::new("none", &OVERLOAD, "rr"), hard, exp],
            )
        }
        // Measured per load step, with its own report.
        Exp::Feedback => return feedback::run(node, opts),
    };
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); variants.len()];
    let mut series: Vec<Option<Series>> = vec![None; variants.len()];
    for rep in 0..opts.reps.max(1) {
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            let v = &variants[i];
            let t = Instant::now();
            let (fig, samples) = run_variant(node, v, load, opts)
                .with_context(|| format!("{} run {}", v.name, rep + 1))?;
            if opts.verbose {
                eprintln!(
                    "experiments: {} / {} run {}: {} requests, {} ok, {:.0}/s, p99 {:.1} ms ({:.1} s)",
                    exp.name(),
                    v.name,
                    rep + 1,
                    fig.requests,
                    fig.ok,
                    fig.throughput,
                    fig.p99_ms,
                    t.elapsed().as_secs_f64()
                );
            }
            runs[i].push(fig);
            if matches!(load, Load::Open { .. }) {
                series[i] = Some(Series {
                    variant: v.name.clone(),
                    points: time_series(&samples, load.duration()),
                });
            }
        }
    }
    let reports: Vec<VariantReport> = variants
        .iter()
        .zip(runs)
        .map(|(v, runs)| VariantReport {
            name: v.name.clone(),
            servers: v.servers.clone(),
            median: median(&runs),
            runs,
        })
        .collect();
    let series: Vec<Series> = series.into_iter().flatten().collect();
    let plots = plots(exp, title, &reports, &series, opts)?;
    let table = table(exp, title, &load, &reports, opts.reps);
    Ok(Report {
        experiment: exp.name().into(),
        title: title.into(),
        load: load.describe(),
        variants: reports,
        series,
        plots,
        table,
        feedback: None,
    })
}

/// Starts `testsrv` with `servers[i]`'s capacity on real server i.
fn start_servers(node: &SingleNode, servers: &[Server]) -> Result<Vec<Proc>> {
    let bin = workspace_bin("testsrv")?;
    let bin = bin.to_string_lossy();
    let listen = format!("0.0.0.0:{SRV_PORT}");
    let mut procs = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let name = format!("rs{}", i + 1);
        let (d, w) = (s.delay_ms.to_string(), s.workers.to_string());
        let argv = [
            &*bin,
            "--name",
            &name,
            "--tcp",
            &listen,
            "--delay-ms",
            &d,
            "--workers",
            &w,
        ];
        procs.push(node.rs[i].spawn_logged(&argv, Some(&node.dir().join(format!("{name}.log"))))?);
        wait_listening(&node.rs[i], SRV_PORT)?;
    }
    Ok(procs)
}

fn target() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

/// Waits until a request through the VIP is answered and, with health
/// checks, until every backend is up with an RTT measured.
fn ready(node: &SingleNode, v: &Variant) -> Result<()> {
    ready_answered(node)?;
    if v.health {
        let n = v.servers.len();
        let all_up = wait_until(Duration::from_secs(8), &mut || {
            node.status().is_ok_and(|s| {
                let b = &s["services"][0]["backends"];
                (0..n).all(|i| b[i]["up"] == true && b[i]["rtt_us"].as_u64().unwrap_or(0) > 0)
            })
        });
        if !all_up {
            bail!("backends not all up with an RTT within 8 s");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Waits until a request through the VIP is answered.
fn ready_answered(node: &SingleNode) -> Result<()> {
    let answered = node.client.in_ns(|| {
        wait_until(Duration::from_secs(5), &mut || {
            load::one_request(CLIENT, target(), Duration::from_secs(1)).is_ok()
        })
    })?;
    if !answered {
        bail!("no answer through the VIP within 5 s");
    }
    Ok(())
}

/// One run of `v`: servers and balancer started, loaded, stopped.
fn run_variant(
    node: &SingleNode,
    v: &Variant,
    load: Load,
    opts: &Options,
) -> Result<(Figures, Vec<Sample>)> {
    let servers = start_servers(node, &v.servers)?;
    let cfg = node.write_config(&v.config())?;
    let mut lb = node.start_balancer(&cfg)?;
    let res = (|| -> Result<(Figures, Vec<Sample>)> {
        ready(node, v)?;
        let samples = match load {
            Load::Closed { clients, duration } => {
                closed_loop(node, clients, duration, opts.timeout)?
            }
            Load::Open { rate, duration } => {
                let spec = Spec {
                    target: target(),
                    sources: vec![CLIENT],
                    rate,
                    duration,
                    timeout: opts.timeout,
                    max_inflight: ((rate * opts.timeout.as_secs_f64()) as usize * 3).max(64),
                    long_lived: 0,
                    long_open: Duration::ZERO,
                    long_every: Duration::from_secs(1),
                    long_timeout: opts.timeout,
                };
                let t0 = Instant::now() + Duration::from_millis(20);
                node.client
                    .in_ns(move || load::run(spec, t0, Arc::new(AtomicBool::new(false))))?
                    .samples
            }
        };
        let status = node.status()?;
        Ok((figures(&samples, load.duration(), &status), samples))
    })();
    // SIGTERM lets the balancer undo its setup; SIGKILL (drop) if it hangs.
    let _ = lb.signal(Signal::SIGTERM);
    let _ = lb.wait_timeout(Duration::from_secs(3));
    drop(lb);
    drop(servers);
    res
}

/// `clients` threads in the client namespace, each sending one request per
/// new connection back to back until `duration` is over. Bounded: a
/// request starts only before the end and has a deadline of `timeout`.
fn closed_loop(
    node: &SingleNode,
    clients: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<Vec<Sample>> {
    node.client.in_ns(move || {
        let t0 = Instant::now();
        let end = t0 + duration;
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    while Instant::now() < end {
                        let start = Instant::now();
                        let result = load::one_request(CLIENT, target(), timeout);
                        let failed = result.is_err();
                        out.push(Sample {
                            start: start - t0,
                            end: Instant::now() - t0,
                            result,
                        });
                        if failed {
                            // A refusal returns at once: do not spin on it.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    out
                })
            })
            .collect();
        let mut all: Vec<Sample> = workers
            .into_iter()
            .filter_map(|h| h.join().ok())
            .flatten()
            .collect();
        all.sort_by_key(|s| s.start);
        all
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let k = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[k - 1]
}

fn latencies_ms<'a>(samples: impl Iterator<Item = &'a Sample>) -> Vec<f64> {
    let mut v: Vec<f64> = samples
        .filter(|s| s.result.is_ok())
        .map(|s| (s.end - s.start).as_secs_f64() * 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn figures(samples: &[Sample], duration: Duration, status: &serde_json::Value) -> Figures {
    let mut f = Figures {
        requests: samples.len(),
        ..Figures::default()
    };
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples {
        match &s.result {
            Ok(server) => {
                f.ok += 1;
                *per.entry(server.clone()).or_default() += 1;
            }
            Err(Fail::Refused | Fail::Reset) => f.refused += 1,
            Err(Fail::Timeout | Fail::ConnectTimeout) => f.timeouts += 1,
            Err(_) => f.other_errors += 1,
        }
    }
    f.throughput = f.ok as f64 / duration.as_secs_f64();
    let lat = latencies_ms(samples.iter());
    f.p50_ms = percentile(&lat, 0.50);
    f.p99_ms = percentile(&lat, 0.99);
    f.mean_ms = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<f64>() / lat.len() as f64
    };
    f.share = per
        .into_iter()
        .map(|(k, n)| (k, n as f64 / f.ok.max(1) as f64))
        .collect();
    let svc = &status["services"][0];
    f.shed = svc["shed"].as_u64().unwrap_or(0);
    f.resets_sent = svc["resets_sent"].as_u64().unwrap_or(0);
    if let Some(bs) = svc["backends"].as_array() {
        for b in bs {
            let name = b["name"].as_str().unwrap_or("?").to_string();
            let rtt = b["rtt_us"].as_f64().unwrap_or(0.0) / 1e3;
            f.rtt_ms.insert(name, rtt);
        }
    }
    f
}

fn med(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Field by field median of `runs` (each field on its own).
fn median(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| med(runs.iter().map(f).collect());
    let keys = |f: fn(&Figures) -> &BTreeMap<String, f64>| {
        let mut names: Vec<String> = runs.iter().flat_map(|r| f(r).keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|k| {
                let v = med(runs
                    .iter()
                    .map(|r| f(r).get(&k).copied().unwrap_or(0.0))
                    .collect());
                (k, v)
            })
            .collect()
    };
    Figures {
        requests: m(|r| r.requests as f64) as usize,
        ok: m(|r| r.ok as f64) as usize,
        refused: m(|r| r.refused as f64) as usize,
        timeouts: m(|r| r.timeouts as f64) as usize,
        other_errors: m(|r| r.other_errors as f64) as usize,
        throughput: m(|r| r.throughput),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        mean_ms: m(|r| r.mean_ms),
        share: keys(|r| &r.share),
        shed: m(|r| r.shed as f64) as u64,
        resets_sent: m(|r| r.resets_sent as f64) as u64,
        rtt_ms: keys(|r| &r.rtt_ms),
    }
}

/// Per-100 ms bins of `samples` (by send time) over `duration`.
fn time_series(samples: &[Sample], duration: Duration) -> Vec<Point> {
    let n = (duration.as_secs_f64() / BIN.as_secs_f64()).ceil() as usize;
    (0..n)
        .map(|k| {
            let lo = BIN * k as u32;
            let hi = lo + BIN;
            let mut p = Point {
                t: lo.as_secs_f64(),
                ok: 0,
                refused: 0,
                failed_other: 0,
                p99_ms: 0.0,
            };
            for s in samples.iter().filter(|s| s.start >= lo && s.start < hi) {
                match s.result {
                    Ok(_) => p.ok += 1,
                    Err(Fail::Refused | Fail::Reset) => p.refused += 1,
                    Err(_) => p.failed_other += 1,
                }
            }
            let wlo = hi.saturating_sub(P99_WINDOW);
            let lat = latencies_ms(samples.iter().filter(|s| s.start >= wlo && s.start < hi));
            p.p99_ms = percentile(&lat, 0.99);
            p
        })
        .collect()
}

/// `c` halfway to white.
fn light(c: plotters::style::RGBColor) -> plotters::style::RGBColor {
    let h = |x: u8| ((u16::from(x) + 255) / 2) as u8;
    plotters::style::RGBColor(h(c.0), h(c.1), h(c.2))
}

fn servers_text(s: &[Server]) -> String {
    s.iter()
        .map(|s| format!("{:.0}", s.capacity()))
        .collect::<Vec<_>>()
        .join("/")
}

fn share_text(f: &Figures, n: usize) -> String {
    (1..=n)
        .map(|i| {
            let v = f.share.get(&format!("rs{i}")).copied().unwrap_or(0.0);
            format!("{:.0}%", v * 100.0)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The experiment's table (Markdown).
fn table(exp: Exp, title: &str, load: &Load, vs: &[VariantReport], reps: usize) -> String {
    let mut t = format!(
        "### {}: {title}\n\n{}; median of {reps} run(s) per variant.\n\n",
        exp.name(),
        load.describe()
    );
    match exp {
        Exp::Shed => {
            t.push_str("| shedding | servers req/s | requests | ok | refused (RST) | timeouts | other errors | ok/s | p50 ms | p99 ms | shed (lb) | share rs1/rs2/rs3 |\n");
            t.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
            for v in vs {
                let f = &v.median;
                t.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |\n",
                    v.name,
                    servers_text(&v.servers),
                    f.requests,
                    f.ok,
                    f.refused,
                    f.timeouts,
                    f.other_errors,
                    f.throughput,
                    f.p50_ms,
                    f.p99_ms,
                    f.shed,
                    share_text(f, v.servers.len()),
                ));
            }
        }
        _ => {
            let rtt = exp == Exp::Least;
            t.push_str("| variant | servers req/s | requests | ok/s | p50 ms | p99 ms | mean ms | errors | share rs1/rs2/rs3 |");
            t.push_str(if rtt {
                " health RTT ms (end) |\n"
            } else {
                "\n"
            });
            t.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
            t.push_str(if rtt { " --- |\n" } else { "\n" });
            for v in vs {
                let f = &v.median;
                t.push_str(&format!(
                    "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} |",
                    v.name,
                    servers_text(&v.servers),
                    f.requests,
                    f.throughput,
                    f.p50_ms,
                    f.p99_ms,
                    f.mean_ms,
                    f.refused + f.timeouts + f.other_errors,
                    share_text(f, v.servers.len()),
                ));
                if rtt {
                    let r: Vec<String> = f.rtt_ms.values().map(|x| format!("{x:.1}")).collect();
                    t.push_str(&format!(" {} |", r.join(" / ")));
                }
                t.push('\n');
            }
        }
    }
    t
}

/// A time-series chart of the shed experiment: file, y axis, what, value.
type TimeChart = (&'static str, &'static str, &'static str, fn(&Point) -> f64);

fn plots(
    exp: Exp,
    title: &str,
    vs: &[VariantReport],
    series: &[Series],
    opts: &Options,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let color = |i: usize| PALETTE[i % PALETTE.len()];
    if exp == Exp::Shed {
        let x = "seconds since the load started (requests by send time)";
        for (i, s) in series.iter().enumerate() {
            let bins: Vec<Bin> = s
                .points
                .iter()
                .map(|p| Bin {
                    t: p.t,
                    ok: p.ok,
                    failed: p.refused + p.failed_other,
                })
                .collect();
            let f = &vs[i].median;
            let path = opts.out.join(format!("shed-{}.svg", s.variant));
            plot::svg_with_x(
                &path,
                &format!(
                    "shedding {}: {} ok, {} refused, {} timed out (last run)",
                    s.variant,
                    vs[i].runs.last().map_or(f.ok, |r| r.ok),
                    vs[i].runs.last().map_or(f.refused, |r| r.refused),
                    vs[i].runs.last().map_or(f.timeouts, |r| r.timeouts),
                ),
                x,
                &bins,
                BIN.as_secs_f64(),
                &[],
            )?;
            out.push(path.display().to_string());
        }
        let mk = |f: fn(&Point) -> f64| -> Vec<Line> {
            series
                .iter()
                .enumerate()
                .map(|(i, s)| Line {
                    label: s.variant.clone(),
                    points: s.points.iter().map(|p| (p.t, f(p))).collect(),
                    color: color(i),
                })
                .collect()
        };
        let charts: [TimeChart; 3] = [
            (
                "shed-p99.svg",
                "p99 latency of successful requests (trailing 1 s), ms",
                "p99 of successes over time",
                |p| p.p99_ms,
            ),
            (
                "shed-ok.svg",
                "successful requests per 100 ms",
                "successes over time",
                |p| f64::from(p.ok),
            ),
            (
                "shed-errors.svg",
                "failed requests per 100 ms (RST + timeouts)",
                "errors over time",
                |p| f64::from(p.refused + p.failed_other),
            ),
        ];
        for (file, y, what, f) in charts {
            let path = opts.out.join(file);
            chart::lines(&path, &format!("{title}: {what} (last run)"), x, y, &mk(f))?;
            out.push(path.display().to_string());
        }
        return Ok(out);
    }
    let mut panels = vec![
        Panel {
            title: "throughput".into(),
            y_desc: "successful requests/s".into(),
            bars: vs
                .iter()
                .enumerate()
                .map(|(i, v)| Bar {
                    label: v.name.clone(),
                    value: v.median.throughput,
                    color: color(i),
                })
                .collect(),
        },
        Panel {
            title: "latency p50 / p99".into(),
            y_desc: "ms".into(),
            bars: vs
                .iter()
                .enumerate()
                .flat_map(|(i, v)| {
                    [
                        Bar {
                            label: format!("{} p50", v.name),
                            value: v.median.p50_ms,
                            color: light(color(i)),
                        },
                        Bar {
                            label: format!("{} p99", v.name),
                            value: v.median.p99_ms,
                            color: color(i),
                        },
                    ]
                })
                .collect(),
        },
    ];
    if vs.iter().any(|v| v.servers.len() > 1) {
        panels.push(Panel {
            title: "share of requests per server".into(),
            y_desc: "%".into(),
            bars: vs
                .iter()
                .enumerate()
                .flat_map(|(i, v)| {
                    (1..=v.servers.len()).map(move |k| Bar {
                        label: format!("{} rs{k}", v.name),
                        value: v
                            .median
                            .share
                            .get(&format!("rs{k}"))
                            .copied()
                            .unwrap_or(0.0)
                            * 100.0,
                        color: color(i),
                    })
                })
                .collect(),
        });
    }
    let path = opts.out.join(format!("{}.svg", exp.name()));
    chart::bars(&path, title, &panels)?;
    out.push(path.display().to_string());
    Ok(out)
}
