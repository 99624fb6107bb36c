//! Experiment 5, **feedback**: the feedbackd paper's experiment (Kerr 2002,
//! section 3) in namespaces. Four real servers behind one balancer node;
//! one of them (rs4) serves an expensive response: `testsrv --burn-us B
//! --workers 1` spends B µs of CPU on every request, one at a time, so it
//! saturates (one CPU busy, a growing queue) at 1e6 / B requests/s while
//! rs1..rs3 answer almost for free. Open-loop new connections at rising
//! rates, each request with a deadline, in two variants:
//!
//! - **wrr**: equal static weights (100 each), no feedback;
//! - **feedback**: the same, plus the node's feedback master and a
//!   `balancer-agent` in each real server's namespace, reporting its
//!   server's CPU (plugin `cgroup`: `/proc/stat` is machine-wide in a
//!   namespace, so every agent would report the same load) as health
//!   = 100 - load; the master smooths health into the wrr weight.
//!
//! Every server runs in a CPU accounting cgroup of its own
//! ([`crate::cgroup::CpuGroup`]: cpuacct here), which measures per-server
//! CPU for the report and feeds the agents. Every (variant, rate) run
//! starts servers, agents and the balancer afresh, lets the load run
//! `warmup` before it counts, then measures `duration`: response rate
//! (ok/s), errors (failed or past the deadline), latency of successes,
//! each server's CPU and weight (sampled every 250 ms) and share of the
//! connections the balancer scheduled.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::chart::{self, Line, LineStyle, PALETTE};
use super::{
    Options, Report, SRV_PORT, VIP_PORT, latencies_ms, med, percentile, ready_answered, target,
};
use crate::cgroup::CpuGroup;
use crate::drill::load::{self, Fail, Sample, Spec};
use crate::single::{CLIENT, GATEWAY, SingleNode, VIP, rs_addr, wait_listening};
use crate::topo::{Proc, wait_until, workspace_bin};

/// Real servers: rs1..rs3 cheap, rs4 (the last) expensive.
pub const SERVERS: usize = 4;
/// Every server's static weight (and the master's initial one).
const WEIGHT: u32 = 100;
/// How often CPU, weights and connection counts are sampled.
const TICK: Duration = Duration::from_millis(250);
/// The shared feedback key (test only).
const KEY: &str = "lbt-feedback-experiment-key";
/// Feedback timing: the master asks every KEEPALIVE, the agents sample
/// their cgroup every SAMPLE; ALPHA smooths (the paper's equation 1).
const KEEPALIVE: &str = "500ms";
const SAMPLE: &str = "500ms";
const ALPHA: f64 = 0.5;

/// The two variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Static,
    Feedback,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Static, Mode::Feedback];

    fn name(self) -> &'static str {
        match self {
            Mode::Static => "wrr",
            Mode::Feedback => "feedback",
        }
    }
}

/// What one run at one rate measured (or the median of several runs).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepFigures {
    /// Offered load: new connections (one request each) per second.
    pub offered: f64,
    /// Requests sent in the measured window.
    pub requests: usize,
    pub ok: usize,
    /// Failed or past the deadline: `timeouts + refused + other_errors`.
    pub errors: usize,
    pub timeouts: usize,
    pub refused: usize,
    pub other_errors: usize,
    /// Response rate: successful requests per second of the window.
    pub ok_per_s: f64,
    pub errors_per_s: f64,
    /// Errors as a share of the requests, percent.
    pub error_pct: f64,
    /// Latency of successful requests (connect to last byte), ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Each server's CPU over the window, percent of one CPU (cpuacct).
    pub cpu_pct: BTreeMap<String, f64>,
    /// Each server's share of the connections the balancer scheduled in
    /// the window (its `conns_total` delta), failed ones included.
    pub share: BTreeMap<String, f64>,
    /// Each server's mean weight over the window (sampled every 250 ms).
    pub weight: BTreeMap<String, f64>,
}

/// One 250 ms sample of a run, seconds since the load started.
#[derive(Clone, Debug, Serialize)]
pub struct TimePoint {
    pub t: f64,
    /// CPU of each server since the previous sample, percent of one CPU.
    pub cpu_pct: Vec<f64>,
    pub weight: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub rate: f64,
    pub median: StepFigures,
    pub runs: Vec<StepFigures>,
    /// The last run's samples.
    pub timeline: Vec<TimePoint>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FbVariant {
    pub name: String,
    pub steps: Vec<StepReport>,
}

/// The feedback experiment's results (in [`Report::feedback`]).
#[derive(Clone, Debug, Serialize)]
pub struct FeedbackData {
    /// rs4's CPU cost per request, µs.
    pub burn_us: u64,
    pub rates: Vec<f64>,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub timeout_s: f64,
    pub variants: Vec<FbVariant>,
}

/// Raw sample of the sampler thread.
#[derive(Clone, Debug)]
struct Tick {
    t: Duration,
    usage: Vec<Duration>,
    weight: Vec<u32>,
    conns: Vec<u64>,
}

fn role(i: usize) -> String {
    format!("rs{}", i + 1)
}

fn node_config(mode: Mode) -> String {
    // Closed connections leave the balancer's table soon, as in the
    // other experiments.
    let mut s = String::from(
        "[conntrack]\ntcp_time_wait = \"100ms\"\ntcp_close = \"100ms\"\nexpire_interval = \"20ms\"\n\n",
    );
    if mode == Mode::Feedback {
        s.push_str(&format!(
            "[feedback]\nlisten = \"{GATEWAY}:3262\"\nkey = \"{KEY}\"\nkeepalive_interval = \"{KEEPALIVE}\"\n\
             keepalive_timeout = \"{KEEPALIVE}\"\nalpha = {ALPHA}\n\n"
        ));
    }
    s.push_str(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {VIP_PORT}\nprotocol = \"tcp\"\nscheduler = \"wrr\"\n\n"
    ));
    for i in 0..SERVERS {
        s.push_str(&format!(
            "[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\nport = {SRV_PORT}\nweight = {WEIGHT}\nforward = \"nat\"\n\n",
            role(i),
            rs_addr(i)
        ));
    }
    s
}

fn agent_config(i: usize, cgroup: &Path) -> String {
    format!(
        "[agent]\nname = \"{}\"\nmaster = \"{GATEWAY}:3262\"\nkey = \"{KEY}\"\nsample_interval = \"{SAMPLE}\"\n\
         reconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n\n\
         [[service]]\nprotocol = \"tcp\"\nport = {SRV_PORT}\nforward = \"nat\"\nplugin = \"cgroup\"\n\
         cgroup = \"{}\"\ncpus = 1.0\n",
        role(i),
        cgroup.display()
    )
}

/// Starts the servers, each in its cgroup from before its exec: rs4
/// burns `burn_us` per request with one worker.
fn start_servers(node: &SingleNode, cgroups: &[CpuGroup], burn_us: u64) -> Result<Vec<Proc>> {
    let bin = workspace_bin("testsrv")?;
    let bin = bin.to_string_lossy();
    let listen = format!("0.0.0.0:{SRV_PORT}");
    let burn = burn_us.to_string();
    let mut procs = Vec::new();
    for (i, cg) in cgroups.iter().enumerate() {
        let name = role(i);
        let mut argv = vec![&*bin, "--name", &name, "--tcp", &listen];
        if i == SERVERS - 1 {
            argv.extend(["--burn-us", &burn, "--workers", "1"]);
        }
        // Only the network namespace: joining the cgroup needs /sys/fs/cgroup.
        let argv = cg.wrap(&argv);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        procs
            .push(node.rs[i].spawn_net_only(&argv, Some(&node.dir().join(format!("{name}.log"))))?);
        wait_listening(&node.rs[i], SRV_PORT)?;
    }
    Ok(procs)
}

/// Starts an agent in every real server's network namespace, outside the
/// server's cgroup (it measures it). Only the network namespace: `ip
/// netns exec` mounts a fresh /sys, which hides /sys/fs/cgroup.
fn start_agents(node: &SingleNode, cgroups: &[CpuGroup]) -> Result<Vec<Proc>> {
    let bin = workspace_bin("balancer-agent")?;
    let bin = bin.to_string_lossy();
    let mut procs = Vec::new();
    for (i, cg) in cgroups.iter().enumerate() {
        let name = role(i);
        let cfg = node.dir().join(format!("agent-{name}.toml"));
        std::fs::write(&cfg, agent_config(i, cg.dir()))?;
        procs.push(node.rs[i].spawn_net_only(
            &[&bin, "run", "-c", &cfg.to_string_lossy()],
            Some(&node.dir().join(format!("agent-{name}.log"))),
        )?);
    }
    Ok(procs)
}

/// Waits until every agent has joined and answered a keepalive (fails at
/// once when an agent exits, e.g. on a config it refuses).
fn agents_reporting(node: &SingleNode, agents: &mut [Proc]) -> Result<()> {
    let sock = node.control_socket();
    let mut last = String::new();
    let mut exited = None;
    let ok = wait_until(Duration::from_secs(15), &mut || {
        exited = agents.iter_mut().position(|a| !a.is_running());
        if exited.is_some() {
            return true;
        }
        match balancer::control::feedback(&sock, Duration::from_secs(2)) {
            Ok(f) => {
                last = format!("{:?}", f.servers);
                f.servers.len() == SERVERS && f.servers.iter().all(|s| s.health.is_some())
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    if let Some(i) = exited {
        last = format!("the agent of {} exited", role(i));
    }
    if !ok || exited.is_some() {
        let logs: String = (0..SERVERS)
            .map(|i| {
                let p = node.dir().join(format!("agent-{}.log", role(i)));
                format!(
                    "--- {}:\n{}\n",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                )
            })
            .collect();
        bail!("the agents did not all report within 15 s (last: {last})\n{logs}");
    }
    Ok(())
}

/// Samples the cgroups and the balancer every [`TICK`] from `t0` until
/// `stop`.
fn sample(cgroups: &[CpuGroup], sock: &Path, t0: Instant, stop: &AtomicBool) -> Vec<Tick> {
    let mut out = Vec::new();
    let mut k = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let at = t0 + TICK * k;
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        k += 1;
        let t = Instant::now().saturating_duration_since(t0);
        // A read that fails repeats the last value, so that deltas over the
        // window stay right.
        let usage: Vec<Duration> = cgroups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                g.usage()
                    .unwrap_or_else(|_| out.last().map_or(Duration::ZERO, |k: &Tick| k.usage[i]))
            })
            .collect();
        let (mut weight, mut conns) = out.last().map_or_else(
            || (vec![0; SERVERS], vec![0; SERVERS]),
            |k: &Tick| (k.weight.clone(), k.conns.clone()),
        );
        let status = balancer::control::status(sock, Duration::from_secs(1));
        if let Some(svc) = status.ok().and_then(|s| s.services.into_iter().next()) {
            for (i, b) in svc.backends.iter().take(SERVERS).enumerate() {
                weight[i] = b.weight;
                conns[i] = b.counters.conns_total;
            }
        }
        out.push(Tick {
            t,
            usage,
            weight,
            conns,
        });
    }
    out
}

/// One run at `rate` in `mode`: everything started, loaded, stopped.
fn run_step(
    node: &SingleNode,
    mode: Mode,
    rate: f64,
    opts: &Options,
) -> Result<(StepFigures, Vec<TimePoint>)> {
    // Declared first, dropped last: the processes are gone by then.
    let cgroups: Vec<CpuGroup> = (0..SERVERS)
        .map(|i| node.tb.cpu_group(&role(i)))
        .collect::<Result<_>>()?;
    let servers = start_servers(node, &cgroups, opts.fb_burn_us)?;
    let cfg = node.write_config(&node_config(mode))?;
    let mut lb = node.start_balancer(&cfg)?;
    let mut agents = Vec::new();
    let res = (|| -> Result<(StepFigures, Vec<TimePoint>)> {
        if mode == Mode::Feedback {
            agents = start_agents(node, &cgroups)?;
            agents_reporting(node, &mut agents)?;
        }
        ready_answered(node)?;
        std::thread::sleep(Duration::from_millis(300));
        let (warmup, duration) = (opts.fb_warmup, opts.fb_duration);
        let spec = Spec {
            target: target(),
            sources: vec![CLIENT],
            rate,
            duration: warmup + duration,
            timeout: opts.timeout,
            max_inflight: ((rate * opts.timeout.as_secs_f64()) as usize * 3).max(64),
            long_lived: 0,
            long_open: Duration::ZERO,
            long_every: Duration::from_secs(1),
            long_timeout: opts.timeout,
        };
        let t0 = Instant::now() + Duration::from_millis(20);
        let stop = AtomicBool::new(false);
        let sock = node.control_socket();
        let (samples, ticks) = std::thread::scope(|sc| {
            let sampling = sc.spawn(|| sample(&cgroups, &sock, t0, &stop));
            let samples = node
                .client
                .in_ns(move || load::run(spec, t0, Arc::new(AtomicBool::new(false))));
            stop.store(true, Ordering::Relaxed);
            (samples, sampling.join())
        });
        let samples = samples?.samples;
        let ticks = ticks.map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        let fig = step_figures(rate, &samples, &ticks, warmup, duration)?;
        Ok((fig, timeline(&ticks)))
    })();
    // STOP from the agents first (SIGTERM), then the balancer undoes its
    // setup; SIGKILL (drop) for anything that hangs.
    for a in &agents {
        let _ = a.signal(Signal::SIGTERM);
    }
    for a in &mut agents {
        let _ = a.wait_timeout(Duration::from_secs(3));
    }
    drop(agents);
    let _ = lb.signal(Signal::SIGTERM);
    let _ = lb.wait_timeout(Duration::from_secs(3));
    drop(lb);
    drop(servers);
    drop(cgroups);
    res
}

/// The sample nearest to `t`.
fn nearest(ticks: &[Tick], t: Duration) -> Option<&Tick> {
    ticks.iter().min_by_key(|k| k.t.abs_diff(t).as_micros())
}

fn step_figures(
    rate: f64,
    samples: &[Sample],
    ticks: &[Tick],
    warmup: Duration,
    duration: Duration,
) -> Result<StepFigures> {
    let end = warmup + duration;
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= warmup && s.start < end)
        .collect();
    let mut f = StepFigures {
        offered: rate,
        requests: window.len(),
        ..StepFigures::default()
    };
    for s in &window {
        match &s.result {
            Ok(_) => f.ok += 1,
            Err(Fail::Timeout | Fail::ConnectTimeout) => f.timeouts += 1,
            Err(Fail::Refused | Fail::Reset) => f.refused += 1,
            Err(_) => f.other_errors += 1,
        }
    }
    f.errors = f.timeouts + f.refused + f.other_errors;
    let secs = duration.as_secs_f64();
    f.ok_per_s = f.ok as f64 / secs;
    f.errors_per_s = f.errors as f64 / secs;
    f.error_pct = 100.0 * f.errors as f64 / f.requests.max(1) as f64;
    let lat = latencies_ms(window.iter().copied());
    f.p50_ms = percentile(&lat, 0.50);
    f.p99_ms = percentile(&lat, 0.99);
    let (Some(a), Some(b)) = (nearest(ticks, warmup), nearest(ticks, end)) else {
        bail!("no CPU samples");
    };
    let dt = b.t.saturating_sub(a.t).as_secs_f64();
    if dt <= 0.0 {
        bail!("CPU samples do not span the window");
    }
    let conns: u64 = (0..SERVERS)
        .map(|i| b.conns[i].saturating_sub(a.conns[i]))
        .sum();
    let inside: Vec<&Tick> = ticks.iter().filter(|k| k.t >= a.t && k.t <= b.t).collect();
    for i in 0..SERVERS {
        let name = role(i);
        let used = b.usage[i].saturating_sub(a.usage[i]).as_secs_f64();
        f.cpu_pct.insert(name.clone(), 100.0 * used / dt);
        let n = b.conns[i].saturating_sub(a.conns[i]);
        f.share.insert(name.clone(), n as f64 / conns.max(1) as f64);
        let w: f64 =
            inside.iter().map(|k| f64::from(k.weight[i])).sum::<f64>() / inside.len().max(1) as f64;
        f.weight.insert(name, w);
    }
    Ok(f)
}

fn timeline(ticks: &[Tick]) -> Vec<TimePoint> {
    ticks
        .windows(2)
        .map(|w| {
            let dt = w[1].t.saturating_sub(w[0].t).as_secs_f64().max(1e-6);
            TimePoint {
                t: w[1].t.as_secs_f64(),
                cpu_pct: (0..SERVERS)
                    .map(|i| 100.0 * w[1].usage[i].saturating_sub(w[0].usage[i]).as_secs_f64() / dt)
                    .collect(),
                weight: w[1].weight.clone(),
            }
        })
        .collect()
}

/// Field by field median.
fn median(runs: &[StepFigures]) -> StepFigures {
    let m = |f: fn(&StepFigures) -> f64| med(runs.iter().map(f).collect());
    let per = |f: fn(&StepFigures) -> &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        (0..SERVERS)
            .map(|i| {
                let k = role(i);
                let v = med(runs
                    .iter()
                    .map(|r| f(r).get(&k).copied().unwrap_or(0.0))
                    .collect());
                (k, v)
            })
            .collect()
    };
    StepFigures {
        offered: m(|r| r.offered),
        requests: m(|r| r.requests as f64) as usize,
        ok: m(|r| r.ok as f64) as usize,
        errors: m(|r| r.errors as f64) as usize,
        timeouts: m(|r| r.timeouts as f64) as usize,
        refused: m(|r| r.refused as f64) as usize,
        other_errors: m(|r| r.other_errors as f64) as usize,
        ok_per_s: m(|r| r.ok_per_s),
        errors_per_s: m(|r| r.errors_per_s),
        error_pct: m(|r| r.error_pct),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        cpu_pct: per(|r| &r.cpu_pct),
        share: per(|r| &r.share),
        weight: per(|r| &r.weight),
    }
}

const TITLE: &str =
    "wrr with equal weights vs feedback (agents report each server's CPU), rs4 expensive";

/// Runs the experiment on `node` (which needs [`SERVERS`] real servers).
pub fn run(node: &SingleNode, opts: &Options) -> Result<Report> {
    if node.rs.len() < SERVERS {
        bail!("the feedback experiment needs {SERVERS} real servers");
    }
    let rates = opts.fb_rates.clone();
    let mut runs: Vec<Vec<Vec<StepFigures>>> = vec![vec![Vec::new(); rates.len()]; Mode::ALL.len()];
    let mut lines: Vec<Vec<Vec<TimePoint>>> = vec![vec![Vec::new(); rates.len()]; Mode::ALL.len()];
    for rep in 0..opts.reps.max(1) {
        for (ri, &rate) in rates.iter().enumerate() {
            // Variants alternate: AB at one rate, BA at the next (and the
            // other way round in the next repetition).
            let mut order: Vec<usize> = (0..Mode::ALL.len()).collect();
            if (rep + ri) % 2 == 1 {
                order.reverse();
            }
            for mi in order {
                let mode = Mode::ALL[mi];
                let t = Instant::now();
                let (fig, tl) = run_step(node, mode, rate, opts).with_context(|| {
                    format!("{} at {rate} conn/s, run {}", mode.name(), rep + 1)
                })?;
                if opts.verbose {
                    eprintln!(
                        "experiments: feedback / {} {rate:.0}/s run {}: {} requests, {:.0} ok/s, {:.1} % errors, \
                         p99 {:.0} ms, CPU {}, share {}, weight {} ({:.1} s)",
                        mode.name(),
                        rep + 1,
                        fig.requests,
                        fig.ok_per_s,
                        fig.error_pct,
                        fig.p99_ms,
                        per_server(&fig.cpu_pct, |v| format!("{v:.0}%")),
                        per_server(&fig.share, |v| format!("{:.0}%", v * 100.0)),
                        per_server(&fig.weight, |v| format!("{v:.0}")),
                        t.elapsed().as_secs_f64()
                    );
                }
                runs[mi][ri].push(fig);
                lines[mi][ri] = tl;
            }
        }
    }
    let variants: Vec<FbVariant> = Mode::ALL
        .iter()
        .enumerate()
        .map(|(mi, m)| FbVariant {
            name: m.name().into(),
            steps: rates
                .iter()
                .enumerate()
                .map(|(ri, &rate)| StepReport {
                    rate,
                    median: median(&runs[mi][ri]),
                    runs: runs[mi][ri].clone(),
                    timeline: std::mem::take(&mut lines[mi][ri]),
                })
                .collect(),
        })
        .collect();
    let data = FeedbackData {
        burn_us: opts.fb_burn_us,
        rates,
        warmup_s: opts.fb_warmup.as_secs_f64(),
        duration_s: opts.fb_duration.as_secs_f64(),
        timeout_s: opts.timeout.as_secs_f64(),
        variants,
    };
    let load = describe(&data);
    let table = table(&data, &load, opts.reps);
    let plots = plots(&data, opts)?;
    Ok(Report {
        experiment: "feedback".into(),
        title: TITLE.into(),
        load,
        variants: Vec::new(),
        series: Vec::new(),
        plots,
        table,
        feedback: Some(data),
    })
}

fn describe(d: &FeedbackData) -> String {
    let rates: Vec<String> = d.rates.iter().map(|r| format!("{r:.0}")).collect();
    format!(
        "open loop, {} new connections/s, one request per connection, {:.0} s deadline; each run {:.1} s of \
         warm-up, then {:.1} s measured; rs4 burns {} µs of CPU per request with one worker (at most {:.0} \
         req/s), rs1-rs3 none",
        rates.join(" / "),
        d.timeout_s,
        d.warmup_s,
        d.duration_s,
        d.burn_us,
        1e6 / d.burn_us.max(1) as f64
    )
}

fn per_server(m: &BTreeMap<String, f64>, f: impl Fn(f64) -> String) -> String {
    (0..SERVERS)
        .map(|i| f(m.get(&role(i)).copied().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn table(d: &FeedbackData, load: &str, reps: usize) -> String {
    let mut t = format!(
        "### feedback: {TITLE}\n\n{load}; median of {reps} run(s) per variant and rate. CPU: percent of one \
         CPU (cpuacct); share: of the connections the balancer scheduled; weight: mean over the window.\n\n"
    );
    t.push_str("| offered conn/s | variant | requests | ok/s | errors | error % | p50 ms | p99 ms | CPU % rs1/rs2/rs3/rs4 | share rs1/rs2/rs3/rs4 | weight rs1/rs2/rs3/rs4 |\n");
    t.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |\n");
    for (ri, rate) in d.rates.iter().enumerate() {
        for v in &d.variants {
            let f = &v.steps[ri].median;
            t.push_str(&format!(
                "| {rate:.0} | {} | {} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
                v.name,
                f.requests,
                f.ok_per_s,
                f.errors,
                f.error_pct,
                f.p50_ms,
                f.p99_ms,
                per_server(&f.cpu_pct, |x| format!("{x:.0}")),
                per_server(&f.share, |x| format!("{:.0}%", x * 100.0)),
                per_server(&f.weight, |x| format!("{x:.0}")),
            ));
        }
    }
    t
}

fn plots(d: &FeedbackData, opts: &Options) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let x = "offered load, new connections/s";
    let style = LineStyle {
        y_max: None,
        markers: true,
    };
    let vs_rate = |f: fn(&StepFigures) -> f64| -> Vec<Line> {
        d.variants
            .iter()
            .enumerate()
            .map(|(i, v)| Line {
                label: v.name.clone(),
                points: v.steps.iter().map(|s| (s.rate, f(&s.median))).collect(),
                color: PALETTE[i % PALETTE.len()],
            })
            .collect()
    };
    // The offered load first, so the variants are drawn over it.
    let mut rate_lines = vec![Line {
        label: "offered".into(),
        points: d.rates.iter().map(|&r| (r, r)).collect(),
        color: plotters::style::RGBColor(0xbb, 0xbb, 0xbb),
    }];
    rate_lines.extend(vs_rate(|f| f.ok_per_s));
    let path = opts.out.join("feedback-rate.svg");
    chart::lines_with(
        &path,
        "feedback: response rate vs offered load (median)",
        x,
        "successful responses/s",
        &rate_lines,
        &style,
    )?;
    out.push(path.display().to_string());
    let path = opts.out.join("feedback-errors.svg");
    chart::lines_with(
        &path,
        "feedback: error rate vs offered load (failed or past the deadline, median)",
        x,
        "errors, % of requests",
        &vs_rate(|f| f.error_pct),
        &style,
    )?;
    out.push(path.display().to_string());
    // Per-server CPU: one chart per variant, same scale.
    let cpu_max = d
        .variants
        .iter()
        .flat_map(|v| v.steps.iter())
        .flat_map(|s| s.median.cpu_pct.values().copied())
        .fold(100.0, f64::max)
        * 1.1;
    for v in &d.variants {
        let lines: Vec<Line> = (0..SERVERS)
            .map(|i| Line {
                label: role(i),
                points: v
                    .steps
                    .iter()
                    .map(|s| {
                        (
                            s.rate,
                            s.median.cpu_pct.get(&role(i)).copied().unwrap_or(0.0),
                        )
                    })
                    .collect(),
                color: PALETTE[i % PALETTE.len()],
            })
            .collect();
        let path = opts.out.join(format!("feedback-cpu-{}.svg", v.name));
        chart::lines_with(
            &path,
            &format!("feedback: per-server CPU, {} (median)", v.name),
            x,
            "CPU, % of one CPU (cpuacct)",
            &lines,
            &LineStyle {
                y_max: Some(cpu_max),
                markers: true,
            },
        )?;
        out.push(path.display().to_string());
    }
    // The highest rate over time: the weights feedback gave, and rs4's CPU
    // in both variants.
    if let Some(ri) = d.rates.len().checked_sub(1) {
        let rate = d.rates[ri];
        let mut lines = Vec::new();
        for v in d
            .variants
            .iter()
            .filter(|v| v.name == Mode::Feedback.name())
        {
            for i in 0..SERVERS {
                lines.push(Line {
                    label: format!("weight {}", role(i)),
                    points: v.steps[ri]
                        .timeline
                        .iter()
                        .map(|p| (p.t, f64::from(p.weight[i])))
                        .collect(),
                    color: PALETTE[i % PALETTE.len()],
                });
            }
        }
        for (k, v) in d.variants.iter().enumerate() {
            lines.push(Line {
                label: format!("CPU % rs4, {}", v.name),
                points: v.steps[ri]
                    .timeline
                    .iter()
                    .map(|p| (p.t, p.cpu_pct[SERVERS - 1]))
                    .collect(),
                color: PALETTE[(SERVERS + k) % PALETTE.len()],
            });
        }
        let path = opts.out.join("feedback-timeline.svg");
        chart::lines_with(
            &path,
            &format!(
                "feedback at {rate:.0} conn/s: weights (feedback) and rs4's CPU (both), last run; \
                 measured from {:.1} s",
                d.warmup_s
            ),
            "seconds since the load started",
            "weight / CPU %",
            &lines,
            &LineStyle {
                y_max: Some(cpu_max.max(110.0)),
                markers: false,
            },
        )?;
        out.push(path.display().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sample(start: u64, took: u64, result: Result<&str, Fail>) -> Sample {
        Sample {
            start: ms(start),
            end: ms(start + took),
            result: result.map(str::to_owned),
        }
    }

    /// Ticks every 250 ms from 0 to 2 s: rs4 busy half a CPU, rs1 a tenth;
    /// the balancer schedules 3 connections per tick to rs1, 1 to rs4; rs4's
    /// weight is 40 from 1 s on.
    fn ticks() -> Vec<Tick> {
        (0..=8u64)
            .map(|k| Tick {
                t: ms(250 * k),
                usage: vec![ms(25 * k), ms(0), ms(0), ms(125 * k)],
                weight: vec![100, 100, 100, if k >= 4 { 40 } else { 100 }],
                conns: vec![3 * k, 0, 0, k],
            })
            .collect()
    }

    #[test]
    fn figures_count_only_requests_sent_in_the_measured_window() {
        let samples = vec![
            sample(100, 5, Ok("rs1")), // warm-up: not counted
            sample(1000, 10, Ok("rs1")),
            sample(1200, 30, Ok("rs4")),
            sample(1500, 2000, Err(Fail::Timeout)),
            sample(1700, 0, Err(Fail::Refused)),
            sample(1999, 1, Err(Fail::Closed)),
            sample(2000, 5, Ok("rs1")), // after the window
        ];
        let f = step_figures(200.0, &samples, &ticks(), ms(1000), ms(1000)).expect("figures");
        assert_eq!((f.requests, f.ok, f.errors), (5, 2, 3));
        assert_eq!((f.timeouts, f.refused, f.other_errors), (1, 1, 1));
        assert!((f.ok_per_s - 2.0).abs() < 1e-9);
        assert!((f.error_pct - 60.0).abs() < 1e-9);
        assert!((f.p50_ms - 10.0).abs() < 1e-9 && (f.p99_ms - 30.0).abs() < 1e-9);
    }

    #[test]
    fn cpu_share_and_weight_come_from_the_samples_at_the_window_edges() {
        let f = step_figures(200.0, &[], &ticks(), ms(1000), ms(1000)).expect("figures");
        let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        // rs4 used 125 ms per 250 ms: 50 % of one CPU; rs1 10 %.
        assert!((get(&f.cpu_pct, "rs4") - 50.0).abs() < 1e-9);
        assert!((get(&f.cpu_pct, "rs1") - 10.0).abs() < 1e-9);
        assert!((get(&f.share, "rs1") - 0.75).abs() < 1e-9);
        assert!((get(&f.share, "rs4") - 0.25).abs() < 1e-9);
        assert!((get(&f.weight, "rs4") - 40.0).abs() < 1e-9);
        assert!((get(&f.weight, "rs2") - 100.0).abs() < 1e-9);
    }

    #[test]
    fn figures_need_samples_that_span_the_window() {
        let one = vec![ticks().remove(0)];
        assert!(step_figures(200.0, &[], &one, ms(1000), ms(1000)).is_err());
        assert!(step_figures(200.0, &[], &[], ms(1000), ms(1000)).is_err());
    }

    #[test]
    fn timeline_gives_cpu_between_consecutive_samples() {
        let tl = timeline(&ticks());
        assert_eq!(tl.len(), 8);
        assert!((tl[0].cpu_pct[3] - 50.0).abs() < 1e-9);
        assert_eq!(tl[3].weight[3], 40);
    }

    #[test]
    fn median_is_taken_field_by_field() {
        let mk = |ok: usize, cpu4: f64| StepFigures {
            ok,
            cpu_pct: [("rs4".to_owned(), cpu4)].into_iter().collect(),
            ..StepFigures::default()
        };
        let m = median(&[mk(10, 90.0), mk(30, 10.0), mk(20, 50.0)]);
        assert_eq!(m.ok, 20);
        assert_eq!(m.cpu_pct.get("rs4").copied(), Some(50.0));
        assert_eq!(m.cpu_pct.get("rs1").copied(), Some(0.0));
    }

    #[test]
    fn agent_and_node_configs_parse() {
        let agent = agent_config(3, Path::new("/sys/fs/cgroup/cpuacct/lbt1x0-rs4"));
        let a = balancer::agent::config::AgentConfig::parse(&agent, "agent.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.name, "rs4");
        assert_eq!(a.services[0].offer.port, SRV_PORT);
        for mode in Mode::ALL {
            let node = format!(
                "[node]\nname = \"lb\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"{GATEWAY}/24\"\n\n{}",
                node_config(mode)
            );
            let c =
                balancer::config::Config::parse(&node, "lb.toml").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.services[0].backends.len(), SERVERS);
            assert_eq!(c.feedback.is_some(), mode == Mode::Feedback);
        }
    }
}
