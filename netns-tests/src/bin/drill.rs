//! `drill`: failover drills of the cluster under load, in network
//! namespaces, next to the keepalived + nftables baseline.
//!
//! `cargo build --workspace && sudo target/debug/drill [options]`
//! (`drill --help` explains every option).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use netns_tests::drill::{self, Drill, INTERRUPTED, Options, PeerKind, report};

/// Failover drills under load in network namespaces (needs root; build the
/// workspace first: `cargo build --workspace`).
///
/// Topology, built afresh for every drill and removed after it: a client
/// (198.18.0.2-.5) on the front bridge, nodes lb1, lb2 (lb3) with front0
/// and back0, real servers rs1..rs4 (testsrv on port 8080) on the back
/// bridge; VIP 198.18.0.100:80. Every drill starts from a fresh start
/// converged with lb1 holding the VIP (restart: from a degraded state,
/// lb1 stopped by SIGTERM and lb2 holding), runs new connections at a
/// fixed rate (one request each, 1 s deadline) plus long-lived keep-alive
/// connections opened before the fault (a request every 100 ms), does its
/// fault, and reports:
///
///   gap          the larger of the outage and the disturbance, ms;
///   outage       longest time between two successful responses, from the
///                last one before the fault to the end of the load (the
///                hole failed or delayed requests leave); (calm): the same
///                over the calm half second before the fault, the noise floor;
///   disturbance  the longest episode of failed requests (failures less than
///                250 ms apart), first to last, plus one request period: a
///                bi-active cluster keeps serving the survivors' flows while
///                the dead node's fail, so failures interleave with successes;
///   failed       requests that failed (connect timeout, reset, ...), of all;
///   long broken  long-lived connections broken, to real servers (rs) and to
///                nodes' local services (lo), of those opened;
///   VIP holder   nodes holding the VIP (MAC holder) before > after.
///
/// Drills: kill-holder (SIGKILL of the VIP holder), kill-other (SIGKILL of a
/// non-holder), cut-holder (silent cut of the holder's front link at the
/// switch: carrier stays up), stop-holder / stop-other (SIGTERM), restart
/// (lb1, stopped before the load, is started again), partition (the nodes'
/// bridge ports are isolated from each other on both segments: they lose
/// each other's adverts, heartbeats and sync, not the client nor the
/// servers; healed after master-down + margin).
///
/// ours: `balancer run -c lbK.toml` with a [cluster] section (embedded
/// heartbeat, cluster MAC, buckets, sync), NAT to the real servers, server i
/// in the sub-cluster of node i % nodes + 1; front-instance priorities set
/// to the baseline's.
/// keepalived (BENCH.md): keepalived 2.2.7, VRRPv3, priorities 150/100(/50),
/// nftables `dnat to numgen inc mod N` to the real servers and masquerade on
/// back0 on every node. SIGKILL kills keepalived's VRRP process and its
/// parent (the node's kernel keeps the VIP and the DNAT rules).
///
/// Output: a table on stdout, an SVG per drill (successes and failures per
/// 100 ms) and every node's logs under --out, the figures as JSON (--json).
/// With DRILL_PCAP=1 in the environment, each drill also captures both
/// segments at the switch during the load (logs/<drill>/front.pcap and
/// back.pcap, headers only).
#[derive(Parser, Debug)]
#[command(name = "drill", verbatim_doc_comment)]
struct Args {
    /// Clusters to drill, comma-separated: ours (balancer run in cluster
    /// mode), keepalived (the baseline). They alternate drill by drill and
    /// appear in one report; `--peer keepalived` runs the baseline alone.
    #[arg(long, default_value = "ours,keepalived", value_delimiter = ',')]
    peer: Vec<String>,

    /// VRRP advertisement intervals to run at, comma-separated; applies to
    /// both peers (ours: heartbeat adverts and membership interval). The
    /// complete comparison is `--advert 1s,100ms,20ms` (about 8 minutes).
    #[arg(long, default_value = "100ms", value_delimiter = ',')]
    advert: Vec<String>,

    /// Drills to run, comma-separated (default: all). Names: kill-holder,
    /// kill-other, cut-holder, stop-holder, stop-other, restart, partition.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,

    /// Balancer nodes: 2 or 3.
    #[arg(long, default_value_t = 2)]
    nodes: usize,

    /// Real servers on the back segment (1..=8).
    #[arg(long, default_value_t = 4)]
    real_servers: usize,

    /// Ours only: every node also serves the VIP with its own local service.
    #[arg(long)]
    local: bool,

    /// New connections per second (one request each), as BENCH.md.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,

    /// Deadline of one request (connect + request + response), e.g. 1s.
    #[arg(long, default_value = "1s")]
    timeout: String,

    /// Long-lived keep-alive connections opened before each fault.
    #[arg(long, default_value_t = 16)]
    long: usize,

    /// A long-lived connection is broken when a request on it fails or gets
    /// no answer within this.
    #[arg(long, default_value = "2s")]
    long_timeout: String,

    /// Load before the fault.
    #[arg(long, default_value = "1s")]
    pre: String,

    /// Load after the fault beyond master-down + --long-timeout.
    #[arg(long, default_value = "1s")]
    margin: String,

    /// Directory for plots and logs (default: a new /tmp/drill-<time>).
    #[arg(long)]
    out: Option<PathBuf>,

    /// Write every figure to this file as JSON (one object per drill).
    #[arg(long)]
    json: Option<PathBuf>,

    /// Smoke test: shorter load (0.5 s before the fault, 0.5 s margin), 4
    /// long-lived connections (unless --long is given) judged after 1 s.
    #[arg(long)]
    quick: bool,

    /// Print progress of every drill.
    #[arg(short, long)]
    verbose: bool,
}

/// `1s`, `100ms`, `20ms`, `0.5s`.
fn duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?} (use 1s, 100ms, 20ms)"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("bad duration {s:?}: must be positive");
    }
    Ok(Duration::from_secs_f64(v * unit))
}

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    let args = Args::parse();
    let adverts: Vec<Duration> = args
        .advert
        .iter()
        .map(|s| duration(s))
        .collect::<Result<_>>()?;
    for a in &adverts {
        // VRRPv3 carries the interval in centiseconds (RFC 5798 §5.2.7).
        if a.as_millis() % 10 != 0 || a.as_millis() < 10 || a.as_millis() > 40_950 {
            bail!("advert interval {a:?}: VRRPv3 needs 10 ms .. 40.95 s in 10 ms steps");
        }
    }
    let drills = if args.only.is_empty() {
        Drill::ALL.to_vec()
    } else {
        args.only
            .iter()
            .map(|s| Drill::parse(s))
            .collect::<Result<_>>()?
    };
    let peers: Vec<PeerKind> = args
        .peer
        .iter()
        .map(|s| PeerKind::parse(s))
        .collect::<Result<_>>()?;
    if !(2..=3).contains(&args.nodes) {
        bail!("--nodes must be 2 or 3");
    }
    if !(1..=8).contains(&args.real_servers) {
        bail!("--real-servers must be 1..=8");
    }
    if !(args.rate > 0.0 && args.rate <= 2000.0) {
        bail!("--rate must be in (0, 2000]");
    }
    let out = match args.out {
        Some(o) => o,
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            std::env::temp_dir().join(format!("drill-{t}"))
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let q = args.quick;
    let opts = Options {
        peers,
        adverts,
        drills,
        nodes: args.nodes,
        real_servers: args.real_servers,
        local: args.local,
        rate: args.rate,
        timeout: duration(&args.timeout)?,
        long_lived: if q && args.long == 16 { 4 } else { args.long },
        long_every: Duration::from_millis(100),
        long_timeout: if q {
            Duration::from_secs(1)
        } else {
            duration(&args.long_timeout)?
        },
        pre: if q {
            Duration::from_millis(500)
        } else {
            duration(&args.pre)?
        },
        margin: if q {
            Duration::from_millis(500)
        } else {
            duration(&args.margin)?
        },
        out: out.clone(),
        verbose: args.verbose,
    };
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::Handler(on_sigint),
        )
    }
    .context("installing the SIGINT handler")?;
    let verbose = args.verbose;
    let (figs, errors) = drill::run_all(&opts, |line| {
        if verbose {
            eprintln!("drill: {line}");
        }
    });
    println!("{}", report::table(&figs));
    for f in &figs {
        println!("plot {}", f.plot);
    }
    println!("logs {}", out.join("logs").display());
    if let Some(path) = &args.json {
        drill::write_json(path, &figs, &errors)?;
        println!("json {}", path.display());
    }
    for e in &errors {
        eprintln!("drill failed: {e}");
    }
    if !errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
