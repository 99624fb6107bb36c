//! `drill`: failover drills under load (DESIGN.md §7, issue 4).
//!
//! Each drill builds the standard topology afresh ([`topology`]), starts a
//! cluster ([`peers`]: ours, or the keepalived + nftables baseline), waits
//! until it is converged with lb1 as VIP holder, puts it under load
//! ([`load`]: new connections at a fixed rate plus long-lived keep-alive
//! connections opened before the fault), does one thing to it — kill,
//! cut, stop, restart, partition — and measures what the client saw
//! ([`report`]), with a plot per drill ([`plot`]).

pub mod load;
pub mod peers;
pub mod plot;
pub mod report;
pub mod topology;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use load::Spec;
use peers::{Peer, master_down};
use plot::Mark;
use report::Figures;
use topology::{CLIENTS, Cluster};

/// The drills, in the order a full run does them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drill {
    /// SIGKILL of the VIP holder.
    KillHolder,
    /// SIGKILL of a node that does not hold the VIP.
    KillOther,
    /// Silent cut of the VIP holder's front link at the switch.
    CutHolder,
    /// SIGTERM of the VIP holder.
    StopHolder,
    /// SIGTERM of a node that does not hold the VIP.
    StopOther,
    /// The first node, stopped before the load, is started again.
    Restart,
    /// The nodes lose each other (not the client nor the servers), then heal.
    Partition,
}

impl Drill {
    pub const ALL: [Drill; 7] = [
        Drill::KillHolder,
        Drill::KillOther,
        Drill::CutHolder,
        Drill::StopHolder,
        Drill::StopOther,
        Drill::Restart,
        Drill::Partition,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Drill::KillHolder => "kill-holder",
            Drill::KillOther => "kill-other",
            Drill::CutHolder => "cut-holder",
            Drill::StopHolder => "stop-holder",
            Drill::StopOther => "stop-other",
            Drill::Restart => "restart",
            Drill::Partition => "partition",
        }
    }

    pub fn parse(s: &str) -> Result<Drill> {
        Drill::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .with_context(|| {
                let all: Vec<&str> = Drill::ALL.iter().map(|d| d.name()).collect();
                format!("unknown drill {s:?} (drills: {})", all.join(", "))
            })
    }
}

/// Which cluster implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Ours,
    Keepalived,
}

impl PeerKind {
    pub fn parse(s: &str) -> Result<PeerKind> {
        match s {
            "ours" => Ok(PeerKind::Ours),
            "keepalived" => Ok(PeerKind::Keepalived),
            _ => bail!("unknown peer {s:?} (peers: ours, keepalived)"),
        }
    }

    fn make(self, advert: Duration, opts: &Options) -> Box<dyn Peer> {
        match self {
            PeerKind::Ours => Box::new(peers::Ours::new(advert, opts.local)),
            PeerKind::Keepalived => Box::new(peers::Keepalived::new(advert)),
        }
    }
}

/// Everything a run does (the CLI fills it).
#[derive(Clone, Debug)]
pub struct Options {
    pub peers: Vec<PeerKind>,
    pub adverts: Vec<Duration>,
    pub drills: Vec<Drill>,
    pub nodes: usize,
    pub real_servers: usize,
    /// Ours only: every node also serves locally (weight 1 of the service).
    pub local: bool,
    pub rate: f64,
    pub timeout: Duration,
    pub long_lived: usize,
    pub long_every: Duration,
    pub long_timeout: Duration,
    /// Load before the fault.
    pub pre: Duration,
    /// Load after the fault, beyond what the advert interval needs.
    pub margin: Duration,
    pub out: PathBuf,
    pub verbose: bool,
}

/// Set by SIGINT: finish the current drill, then stop.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Timeline of one drill, from the load's start.
struct Timeline {
    fault: Duration,
    /// Partition: heal this long after the fault.
    heal_after: Option<Duration>,
    load: Duration,
}

fn timeline(drill: Drill, advert: Duration, opts: &Options) -> Timeline {
    // The slowest takeover the baseline can need: master-down of the
    // lowest-priority backup, then time for the long-lived connections to
    // be judged.
    let md = master_down(advert, peers::priority(opts.nodes.saturating_sub(1)));
    let mut post = md + opts.long_timeout + opts.margin;
    let mut heal_after = None;
    match drill {
        // Start-up of the daemon itself, then a preemption.
        Drill::Restart => post += Duration::from_millis(1000),
        Drill::Partition => {
            let h = md + opts.margin;
            heal_after = Some(h);
            post += h;
        }
        _ => {}
    }
    Timeline {
        fault: opts.pre,
        heal_after,
        load: opts.pre + post,
    }
}

fn names(v: &[usize]) -> Vec<String> {
    v.iter().map(|i| format!("lb{}", i + 1)).collect()
}

/// Waits until `expect` alone holds the VIP, the nodes agree on the
/// membership, and a burst of requests from every client address is all
/// answered; then lets adverts settle.
fn converge(peer: &dyn Peer, c: &Cluster, expect: usize, advert: Duration) -> Result<()> {
    let limit = master_down(advert, 1) + Duration::from_secs(8);
    let t = Instant::now();
    let mut last = Vec::new();
    let mut probes = String::new();
    while t.elapsed() < limit {
        last = peer.holders(c);
        if last == [expect] && peer.settled(c) {
            match topology::probe_all(&c.client, 16, Duration::from_millis(500)) {
                Ok(()) => {
                    std::thread::sleep(
                        (advert * 2).clamp(Duration::from_millis(300), Duration::from_secs(2)),
                    );
                    if peer.holders(c) == [expect] && peer.settled(c) {
                        return Ok(());
                    }
                }
                Err(e) => {
                    probes = format!("; {e:#}");
                    if std::env::var_os("DRILL_DEBUG").is_some() {
                        eprintln!("drill:   {:.2} s {probes}", t.elapsed().as_secs_f64());
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{}: no convergence to lb{} as VIP holder within {limit:?} (holders: {:?}, membership agreed: {}{probes})",
        peer.name(),
        expect + 1,
        names(&last),
        peer.settled(c)
    )
}

/// Runs one drill on a fresh topology and returns its figures.
pub fn run_drill(
    kind: PeerKind,
    advert: Duration,
    drill: Drill,
    opts: &Options,
) -> Result<Figures> {
    let mut peer = kind.make(advert, opts);
    let tag = format!("drill-{}-{}", peer.name(), drill.name());
    let t = Instant::now();
    let c = Cluster::new(
        &tag,
        opts.nodes,
        opts.real_servers,
        &format!("{}ms", advert.as_millis()),
    )?;
    if opts.verbose {
        eprintln!("drill:   topology in {:.1} s", t.elapsed().as_secs_f64());
    }
    let res = drive(peer.as_mut(), &c, advert, drill, opts);
    peer.teardown(&c);
    let logs = keep_logs(
        &c,
        opts,
        &format!("{}-{}ms-{}", peer.name(), advert.as_millis(), drill.name()),
    );
    drop(c);
    let mut f = res?;
    f.logs = logs.display().to_string();
    Ok(f)
}

/// Moves the testbed's scratch dir (configs, daemon logs) under `--out`.
fn keep_logs(c: &Cluster, opts: &Options, name: &str) -> PathBuf {
    let dst = opts.out.join("logs").join(name);
    let _ = std::fs::create_dir_all(opts.out.join("logs"));
    let _ = std::fs::remove_dir_all(&dst);
    if std::fs::rename(c.tb().dir(), &dst).is_err() {
        return c.tb().dir().to_path_buf();
    }
    dst
}

fn drive(
    peer: &mut dyn Peer,
    c: &Cluster,
    advert: Duration,
    drill: Drill,
    opts: &Options,
) -> Result<Figures> {
    let t = Instant::now();
    peer.setup(c)?;
    for i in 0..c.nodes.len() {
        peer.start(c, i)?;
    }
    let started = t.elapsed();
    converge(peer, c, 0, advert)?;
    if opts.verbose {
        eprintln!(
            "drill:   {} started in {:.1} s, converged {:.1} s later",
            peer.name(),
            started.as_secs_f64(),
            (t.elapsed() - started).as_secs_f64()
        );
    }
    let mut start = format!("fresh start, lb1 VIP holder, {} nodes up", c.nodes.len());
    if drill == Drill::Restart {
        peer.stop(c, 0)?;
        converge(peer, c, 1, advert)?;
        start = format!(
            "lb1 stopped (SIGTERM) before the load, lb2 VIP holder, {} of {} nodes up",
            c.nodes.len() - 1,
            c.nodes.len()
        );
    }
    let holders_before = peer.holders(c);
    peer.snapshot(c, "before");
    let holder = holders_before.first().copied().unwrap_or(0);
    let other = (0..c.nodes.len()).find(|i| *i != holder).unwrap_or(1);
    let tl = timeline(drill, advert, opts);

    let spec = Spec {
        target: topology::vip(),
        sources: CLIENTS.to_vec(),
        rate: opts.rate,
        duration: tl.load,
        timeout: opts.timeout,
        max_inflight: ((opts.rate * opts.timeout.as_secs_f64()) as usize * 3).max(64),
        long_lived: opts.long_lived,
        long_open: tl.fault / 4,
        long_every: opts.long_every,
        long_timeout: opts.long_timeout,
    };
    // DRILL_PCAP: capture both segments at the switch for the post-mortem.
    let captures = if std::env::var_os("DRILL_PCAP").is_some() {
        capture(c)?
    } else {
        Vec::new()
    };
    let t0 = Instant::now() + Duration::from_millis(50);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = c.client.spawn_in_ns(move || load::run(spec, t0, stop2));

    sleep_until(t0 + tl.fault);
    let fault_at = Instant::now() - t0;
    let mut marks = vec![];
    let fault = match drill {
        Drill::KillHolder | Drill::KillOther => {
            let n = if drill == Drill::KillHolder {
                holder
            } else {
                other
            };
            peer.kill(c, n)?;
            format!("SIGKILL lb{}{}", n + 1, holder_note(n, holder))
        }
        Drill::StopHolder | Drill::StopOther => {
            let n = if drill == Drill::StopHolder {
                holder
            } else {
                other
            };
            peer.stop(c, n)?;
            format!("SIGTERM lb{}{}", n + 1, holder_note(n, holder))
        }
        Drill::CutHolder => {
            c.tb().cut(&c.nodes[holder], "front0")?;
            format!(
                "silent cut of lb{} front0 at the switch (carrier stays up)",
                holder + 1
            )
        }
        Drill::Restart => {
            peer.start(c, 0)?;
            "lb1 started again".to_string()
        }
        Drill::Partition => {
            c.partition(true)?;
            let heal = tl.heal_after.unwrap_or(Duration::from_secs(1));
            sleep_until(t0 + tl.fault + heal);
            c.partition(false)?;
            let at = Instant::now() - t0;
            marks.push(Mark {
                t: (at.as_secs_f64() - fault_at.as_secs_f64()),
                label: "heal".into(),
            });
            format!(
                "nodes isolated from each other (bridge ports isolated, both segments) for {} ms, then healed",
                heal.as_millis()
            )
        }
    };
    marks.insert(
        0,
        Mark {
            t: 0.0,
            label: drill.name().into(),
        },
    );
    let run = match load.join() {
        Ok(r) => r?,
        Err(_) => bail!("load generator panicked"),
    };
    stop.store(true, Ordering::Relaxed);
    drop(captures);
    let holders_after = peer.holders(c);
    peer.snapshot(c, "after");
    if drill == Drill::CutHolder {
        let _ = c.tb().heal(&c.nodes[holder], "front0");
    }

    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let a = report::analyse(
        &run,
        fault_at,
        tl.load,
        Duration::from_millis(100),
        period,
        opts.timeout,
    );
    let lc = report::long_counts(&run.long, fault_at);
    let name = format!("{}-{}ms-{}", peer.name(), advert.as_millis(), drill.name());
    let plot_path = opts.out.join(format!("{name}.svg"));
    let title = format!(
        "{} {} ({} ms adverts): gap {}{:.0} ms, {} of {} failed",
        peer.name(),
        drill.name(),
        advert.as_millis(),
        if a.recovered { "" } else { "> " },
        a.gap.as_secs_f64() * 1e3,
        a.failed,
        run.samples.len()
    );
    plot::svg(&plot_path, &title, &a.timeline, 0.1, &marks)?;
    Ok(Figures {
        peer: peer.name().into(),
        drill: drill.name().into(),
        advert_ms: advert.as_secs_f64() * 1e3,
        nodes: c.nodes.len(),
        start,
        fault,
        holders_before: names(&holders_before),
        holders_after: names(&holders_after),
        gap_ms: (a.gap.as_secs_f64() * 1e6).round() / 1e3,
        outage_ms: (a.outage.as_secs_f64() * 1e6).round() / 1e3,
        disturbed_ms: (a.disturbed.as_secs_f64() * 1e6).round() / 1e3,
        calm_outage_ms: (a.calm_outage.as_secs_f64() * 1e6).round() / 1e3,
        recovered: a.recovered,
        gap_start_ms: a.gap_start_ms,
        requests: run.samples.len(),
        failed: a.failed,
        failed_by_reason: a.failed_by_reason,
        longest_failed_run: a.longest_failed_run,
        served_by: a.served_by,
        latency_p50_ms: a.p50,
        latency_p99_ms: a.p99,
        latency_max_ms: a.max,
        long_lived: run.long.len(),
        long_to_real: lc.to_real,
        long_to_local: lc.to_local,
        long_broken_real: lc.broken_real,
        long_broken_local: lc.broken_local,
        long_not_opened: lc.not_opened,
        long_broken_at_ms: lc.broken_at_ms,
        long_worst_stall_ms: lc.worst_stall_ms,
        long: run.long,
        timeline: a.timeline,
        plot: plot_path.display().to_string(),
        logs: String::new(),
        rate: opts.rate,
        load_s: tl.load.as_secs_f64(),
        fault_after_s: fault_at.as_secs_f64(),
    })
}

/// tcpdump on the front and back bridges (in the switch namespace, where
/// every frame of a segment passes), headers only, written packet by packet
/// to `front.pcap` and `back.pcap` next to the daemons' logs.
fn capture(c: &Cluster) -> Result<Vec<crate::topo::Proc>> {
    let mut v = Vec::new();
    for seg in ["front", "back"] {
        let file = c.tb().dir().join(format!("{seg}.pcap"));
        v.push(c.tb().switch().spawn(&[
            "tcpdump",
            "-i",
            &format!("br-{seg}"),
            "-U",
            "-s",
            "128",
            "-w",
            &file.to_string_lossy(),
        ])?);
    }
    // tcpdump needs a moment to open the interface.
    std::thread::sleep(Duration::from_millis(500));
    Ok(v)
}

fn holder_note(n: usize, holder: usize) -> &'static str {
    if n == holder {
        " (VIP holder)"
    } else {
        " (not the VIP holder)"
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Runs every selected drill for every advert interval and peer (peers
/// alternate drill by drill, as BENCH.md asks of comparisons). Failed
/// drills are reported and skipped. Returns the figures and the errors.
pub fn run_all(opts: &Options, mut progress: impl FnMut(&str)) -> (Vec<Figures>, Vec<String>) {
    let mut figs = Vec::new();
    let mut errors = Vec::new();
    'all: for &advert in &opts.adverts {
        for &drill in &opts.drills {
            for &kind in &opts.peers {
                if INTERRUPTED.load(Ordering::Relaxed) {
                    errors.push("interrupted".to_string());
                    break 'all;
                }
                let what = format!(
                    "{kind:?} {} ms adverts {}",
                    advert.as_millis(),
                    drill.name()
                )
                .to_lowercase();
                progress(&format!("{what} ..."));
                let t = Instant::now();
                match run_drill(kind, advert, drill, opts) {
                    Ok(f) => {
                        progress(&format!(
                            "{what}: gap {:.0} ms, {} of {} failed, long broken {}/{} ({:.1} s)",
                            f.gap_ms,
                            f.failed,
                            f.requests,
                            f.long_broken_real + f.long_broken_local,
                            f.long_lived,
                            t.elapsed().as_secs_f64()
                        ));
                        figs.push(f);
                    }
                    Err(e) => {
                        let msg = format!("{what}: {e:#}");
                        progress(&format!("FAILED {msg}"));
                        errors.push(msg);
                    }
                }
            }
        }
    }
    (figs, errors)
}

/// Writes the figures as a JSON array (one object per drill), with the
/// errors of drills that did not complete as `{"error": ...}` objects.
pub fn write_json(path: &Path, figs: &[Figures], errors: &[String]) -> Result<()> {
    let mut v: Vec<serde_json::Value> = figs
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    v.extend(errors.iter().map(|e| serde_json::json!({ "error": e })));
    std::fs::write(path, serde_json::to_string_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))
}
