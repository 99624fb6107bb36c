//! `bench`: our node (NAT, DR) against a direct path and kernel nftables
//! DNAT, measured in one run on one topology, paths alternated, medians of
//! the rounds (BENCH.md: only ratios within one run mean anything).
//!
//! ```text
//! cargo build --release --workspace
//! sudo target/release/bench [--json FILE] [--quick] [--paths direct,nat,dr,nft]
//! ```
//!
//! Per path and round: keep-alive HTTP (`wrk -t1 -c32 -d5s --latency`),
//! short connections (the same with `Connection: close`), UDP
//! request/response (our closed-loop generator, 32 outstanding), and for
//! our paths the balancer's CPU per received frame. Then, once, the RSS of
//! `balancer run` holding 100k UDP flows. Everything is bounded in time and
//! the testbed is removed at the end.

#[path = "../bench/mod.rs"]
mod bench;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use balancer::{DropReason, StatusSnapshot};
use clap::Parser;

use bench::paths::{self, DR_RS, MAX_ENTRIES, NAT_PORT, NAT_RS, PathKind, SERVICE_PORT, Up};
use bench::procfs;
use bench::report::{self, MemoryFigures, PathResult, Round};
use bench::servers;
use bench::udp::{self, UdpLoad};
use bench::wrk;
use netns_tests::single::{self, CLIENT, RTR_FRONT, SingleNode, VIP};
use netns_tests::topo::{Host, Proc, workspace_bin};

/// The memory target of issue 2: RSS with 100k tracked connections.
const RSS_TARGET_MIB: f64 = 64.0;
/// The issue's target for short connections: NAT >= 0.7 x nftables.
const NAT_CLOSE_TARGET: f64 = 0.7;

#[derive(Debug, Parser)]
#[command(
    about = "Compare our balancer (NAT, DR) with a direct path and nftables DNAT, in namespaces"
)]
struct Args {
    /// Also write the results as JSON (an array, one object per path).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Smoke test: 1 s loads, 1 round.
    #[arg(long)]
    quick: bool,
    /// Paths to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "direct,nat,dr,nft")]
    paths: Vec<PathKind>,
    /// Rounds (default 3, or 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds of each load (default 5, or 1 with --quick).
    #[arg(long)]
    duration: Option<u64>,
    /// Concurrent connections of wrk, and outstanding UDP requests.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// UDP flows opened for the memory figure (needs the nat path).
    #[arg(long, default_value_t = 100_000)]
    flows: usize,
    /// Datagrams per second when opening those flows: a rate the node
    /// keeps up with on a small machine (its RX ring holds 4096 frames).
    #[arg(long, default_value_t = 20_000)]
    flow_rate: u64,
    /// Skip the memory figure.
    #[arg(long)]
    no_memory: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let duration = Duration::from_secs(
        args.duration
            .unwrap_or(if args.quick { 1 } else { 5 })
            .max(1),
    );
    let mut paths: Vec<PathKind> = Vec::new();
    for p in &args.paths {
        if !paths.contains(p) {
            paths.push(*p);
        }
    }
    if paths.is_empty() {
        bail!("no paths to measure");
    }
    preflight(&paths)?;
    let nginx_build = servers::nginx_build()?;

    let started = Instant::now();
    let load_start = loadavg();
    let prefix = format!("lbt{}x", std::process::id());
    let (mut results, memory) = {
        let bed = SingleNode::new(
            "bench",
            &single::Options {
                real_servers: 4,
                dr: DR_RS.to_vec(),
                checksum_offload: true,
            },
        )?;
        eprintln!("bench: testbed in {}", bed.dir().display());
        let _servers = start_backends(&bed, &nginx_build)?;
        let results = run_rounds(&bed, &paths, rounds, duration, args.connections)?;
        let memory = if paths.contains(&PathKind::Nat) && !args.no_memory {
            Some(memory_figure(&bed, args.flows, args.flow_rate)?)
        } else {
            None
        };
        (results, memory)
        // The testbed, its processes and namespaces go here.
    };
    let left: Vec<String> = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect();

    if let Some(nft) = results.iter().find(|r| r.name == "nft").cloned() {
        for r in results.iter_mut().filter(|r| r.name != "nft") {
            r.vs_nft = Some(r.ratios_to(&nft));
            r.vs_nft_per_round = Some(r.per_round_ratios_to(&nft));
        }
    }
    if let Some(m) = memory
        && let Some(nat) = results.iter_mut().find(|r| r.name == "nat")
    {
        nat.memory = Some(m);
    }

    print_report(
        &results,
        rounds,
        duration,
        args.connections,
        &nginx_build,
        started.elapsed(),
    );
    println!(
        "machine load average (1 min): {load_start} at start, {} at end (other work on the machine adds noise)",
        loadavg()
    );
    if left.is_empty() {
        println!("namespaces left behind: none");
    } else {
        println!("namespaces left behind: {}", left.join(" "));
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    if !left.is_empty() {
        bail!("the testbed left namespaces behind");
    }
    Ok(())
}

/// Root and the tools the chosen paths need, before building anything.
fn preflight(paths: &[PathKind]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench builds network namespaces: run it as root");
    }
    for tool in ["wrk", "nginx", "nft", "ethtool"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` not found: install the bench's packages with scripts/deps");
        }
    }
    workspace_bin("testsrv")?;
    if paths.iter().any(|p| p.is_ours()) {
        workspace_bin("balancer").context("the nat and dr paths run `balancer run`")?;
    }
    Ok(())
}

/// nginx and a UDP responder on every real server, the client's route to
/// the back segment through `rtr` for the direct path, and a switch that
/// only switches.
fn start_backends(bed: &SingleNode, nginx_build: &str) -> Result<Vec<Proc>> {
    // With br_netfilter in the kernel, a new namespace's bridges hand every
    // IPv4 frame to the netfilter hooks (bridge-nf-call-iptables defaults
    // to 1): work a real switch does not do, and that veth delivery charges
    // to whoever sends, the balancer included. Off in the switch namespace.
    for key in ["iptables", "ip6tables", "arptables"] {
        let key = format!("net.bridge.bridge-nf-call-{key}");
        if bed.tb.switch().run(&["sysctl", "-n", &key]).is_ok() {
            bed.tb.switch().sysctl(&key, "0")?;
        }
    }
    bed.client.run(&[
        "ip",
        "route",
        "add",
        "198.19.0.0/24",
        "via",
        &RTR_FRONT.to_string(),
    ])?;
    let mut procs = Vec::new();
    for (i, h) in bed.rs.iter().enumerate() {
        let own = single::rs_addr(i);
        let (port, udp) = if NAT_RS.contains(&i) {
            (NAT_PORT, vec![SocketAddrV4::new(own, NAT_PORT)])
        } else {
            // DR: answers to the VIP must leave from the VIP; rs3 also
            // serves the direct path on its own address.
            (
                SERVICE_PORT,
                vec![
                    SocketAddrV4::new(VIP, SERVICE_PORT),
                    SocketAddrV4::new(own, SERVICE_PORT),
                ],
            )
        };
        procs.push(servers::start_nginx(h, port, bed.dir(), nginx_build)?);
        procs.push(servers::start_udp_responder(h, &udp, bed.dir())?);
    }
    Ok(procs)
}

/// CPU ticks of the balancer and frames it has received, at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    cpu: procfs::CpuTicks,
    frames: u64,
}

fn sample(bed: &SingleNode, up: &Up) -> Result<Option<Sample>> {
    let Some(pid) = up.balancer_pid() else {
        return Ok(None);
    };
    let snap = status(bed)?;
    Ok(Some(Sample {
        cpu: procfs::cpu_ticks(pid)?,
        frames: rx_frames(&snap),
    }))
}

/// `balancer status --json`, typed.
fn status(bed: &SingleNode) -> Result<StatusSnapshot> {
    serde_json::from_value(bed.status()?).context("status JSON is not a StatusSnapshot")
}

/// Frames received on every device of the node (front, back, TUN).
fn rx_frames(status: &StatusSnapshot) -> u64 {
    status.nics.iter().map(|n| n.rx_frames).sum()
}

/// Connections in the node's table: active + inactive over all services.
fn tracked(status: &StatusSnapshot) -> u64 {
    status
        .services
        .iter()
        .map(|s| s.counters.conns_active + s.counters.conns_inactive)
        .sum()
}

fn drops(status: &StatusSnapshot, reason: DropReason) -> u64 {
    status
        .drops
        .iter()
        .find(|d| d.reason == reason.as_str())
        .map_or(0, |d| d.count)
}

/// CPU µs per frame between two samples: (user + system, user, system).
fn cpu_per_frame(a: Option<Sample>, b: Option<Sample>) -> Option<(f64, f64, f64)> {
    let (a, b) = (a?, b?);
    let frames = b.frames.checked_sub(a.frames).filter(|f| *f > 0)? as f64;
    let us = |t: u64| t as f64 * 1e6 / procfs::clock_ticks_per_sec() as f64 / frames;
    let user = us(b.cpu.user.saturating_sub(a.cpu.user));
    let system = us(b.cpu.system.saturating_sub(a.cpu.system));
    Some((user + system, user, system))
}

/// The three loads on a path that is up.
fn measure(bed: &SingleNode, up: &Up, duration: Duration, conns: u32) -> Result<Round> {
    let target = up.path.target();
    let url = format!("http://{target}{}", servers::FILE);
    let s0 = sample(bed, up)?;
    let ka = wrk::run(&bed.client, &url, false, conns, duration)?;
    let s1 = sample(bed, up)?;
    let close = wrk::run(&bed.client, &url, true, conns, duration)?;
    let s2 = sample(bed, up)?;
    let load = UdpLoad {
        target,
        outstanding: conns as usize,
        duration,
        timeout: Duration::from_millis(200),
    };
    let u = bed.client.in_ns(move || load.run())??;
    let s3 = sample(bed, up)?;
    Ok(Round {
        keepalive_rps: ka.rps,
        keepalive_p50_ms: ka.p50_ms,
        keepalive_p99_ms: ka.p99_ms,
        keepalive_errors: ka.errors + ka.non_2xx,
        close_rps: close.rps,
        close_p50_ms: close.p50_ms,
        close_p99_ms: close.p99_ms,
        close_errors: close.errors + close.non_2xx,
        udp_pps: u.rps,
        udp_p50_us: u.p50_us,
        udp_p99_us: u.p99_us,
        udp_sent: u.counts.sent,
        udp_answered: u.counts.answered,
        udp_lost: u.counts.lost,
        udp_late: u.counts.late,
        cpu_us_per_pkt: cpu_per_frame(s0, s3).map(|c| c.0),
        cpu_user_us_per_pkt: cpu_per_frame(s0, s3).map(|c| c.1),
        cpu_sys_us_per_pkt: cpu_per_frame(s0, s3).map(|c| c.2),
        cpu_us_per_pkt_keepalive: cpu_per_frame(s0, s1).map(|c| c.0),
        cpu_us_per_pkt_close: cpu_per_frame(s1, s2).map(|c| c.0),
        cpu_us_per_pkt_udp: cpu_per_frame(s2, s3).map(|c| c.0),
        balancer_frames: s0.zip(s3).map(|(a, b)| b.frames - a.frames),
        ..Round::default()
    })
}

/// Every path in every round, the order rotated each round so that no path
/// always runs first or last.
fn run_rounds(
    bed: &SingleNode,
    paths: &[PathKind],
    rounds: usize,
    duration: Duration,
    conns: u32,
) -> Result<Vec<PathResult>> {
    let mut per_path: Vec<Vec<Round>> = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        for pos in 0..paths.len() {
            let k = (pos + round) % paths.len();
            let path = paths[k];
            let up = paths::bring_up(bed, path)?;
            let measured = measure(bed, &up, duration, conns);
            paths::tear_down(bed, up)?;
            let mut r =
                measured.with_context(|| format!("measuring {path} in round {}", round + 1))?;
            r.round = round + 1;
            r.position = pos + 1;
            eprintln!(
                "bench: round {}/{rounds} {path:>6}: keep-alive {} req/s, close {} req/s (p50 {:.2} ms), UDP {} pps{}",
                round + 1,
                report::thousands(r.keepalive_rps),
                report::thousands(r.close_rps),
                r.close_p50_ms,
                report::thousands(r.udp_pps),
                r.cpu_us_per_pkt
                    .map_or(String::new(), |c| format!(", CPU {c:.2} µs/pkt")),
            );
            per_path[k].push(r);
        }
    }
    Ok(paths
        .iter()
        .zip(per_path)
        .map(|(p, rounds)| {
            PathResult::from_rounds(p.as_str(), p.describe(), p.target().to_string(), rounds)
        })
        .collect())
}

/// RSS of `balancer run` (NAT config, `max_entries` = 131072) after `flows`
/// UDP flows to the VIP, each from its own source address and port.
fn memory_figure(bed: &SingleNode, flows: usize, rate: u64) -> Result<MemoryFigures> {
    let up = paths::bring_up(bed, PathKind::Nat)?;
    let result = memory_with(bed, &up, flows, rate.max(1));
    paths::tear_down(bed, up)?;
    result
}

fn memory_with(bed: &SingleNode, up: &Up, flows: usize, rate: u64) -> Result<MemoryFigures> {
    let pid = up.balancer_pid().context("nat path without a balancer")?;
    let idle = procfs::memory(pid)?;
    // Enough client source addresses for the flows: 198.18.0.2, .3, ...
    let per_source = udp::flow_capacity(&[CLIENT]);
    let n_sources = flows.div_ceil(per_source).max(1);
    if n_sources > 8 {
        bail!("at most {} flows", 8 * per_source);
    }
    let sources: Vec<Ipv4Addr> = (0..n_sources)
        .map(|i| Ipv4Addr::new(198, 18, 0, 2 + i as u8))
        .collect();
    for a in &sources[1..] {
        bed.client
            .run(&["ip", "addr", "add", &format!("{a}/24"), "dev", "front0"])?;
    }
    // The answers reach ports nobody listens on: keep the client's port
    // unreachables away from the node (they are not part of the figure).
    bed.client
        .run(&["nft", "add", "table", "ip", "bench_client"])?;
    bed.client.run(&[
        "nft",
        "add",
        "chain",
        "ip",
        "bench_client",
        "out",
        "{ type filter hook output priority 0; policy accept; }",
    ])?;
    bed.client.run(&[
        "nft",
        "add",
        "rule",
        "ip",
        "bench_client",
        "out",
        "icmp",
        "type",
        "destination-unreachable",
        "drop",
    ])?;
    let dst = SocketAddrV4::new(VIP, SERVICE_PORT);
    let mut sent = 0;
    let mut snap = status(bed)?;
    let front_rx = |snap: &StatusSnapshot| {
        snap.nics
            .iter()
            .find(|n| n.role == "front")
            .map_or(0, |n| n.rx_frames)
    };
    let (kernel0, balancer0) = (kernel_rx_packets(&bed.lb, "front0")?, front_rx(&snap));
    // Further passes re-create flows whose datagram was lost (a full ring);
    // flows that exist only see one more datagram.
    let mut passes = 0;
    for _ in 0..3 {
        let srcs = sources.clone();
        sent += bed
            .client
            .in_ns(move || udp::open_flows(&srcs, dst, flows, rate))??;
        passes += 1;
        std::thread::sleep(Duration::from_millis(500));
        snap = status(bed)?;
        if tracked(&snap) >= flows as u64 {
            break;
        }
    }
    let mem = procfs::memory(pid)?;
    let kernel_rx = kernel_rx_packets(&bed.lb, "front0")?.saturating_sub(kernel0);
    let balancer_rx = front_rx(&snap).saturating_sub(balancer0);
    // For post-mortems: what the node reported at the figure.
    std::fs::write(
        bed.dir().join("status-memory.json"),
        serde_json::to_string_pretty(&snap)?,
    )?;
    let rss_mib = mem.rss_kib as f64 / 1024.0;
    Ok(MemoryFigures {
        max_entries: MAX_ENTRIES,
        flows,
        datagrams_sent: sent,
        passes,
        rate_pps: rate,
        tracked: tracked(&snap),
        front_rx_kernel: kernel_rx,
        front_rx_balancer: balancer_rx,
        table_full_drops: drops(&snap, DropReason::TableFull),
        rss_idle_kib: idle.rss_kib,
        rss_kib: mem.rss_kib,
        hwm_kib: mem.hwm_kib,
        anon_idle_kib: idle.anon_kib,
        anon_kib: mem.anon_kib,
        file_kib: mem.file_kib,
        rss_mib,
        target_mib: RSS_TARGET_MIB,
        target_met: rss_mib < RSS_TARGET_MIB,
    })
}

/// Packets the kernel counted as received on `ifname` in `host`.
fn kernel_rx_packets(host: &Host, ifname: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{ifname}/statistics/rx_packets");
    host.run(&["cat", &path])?
        .trim()
        .parse()
        .with_context(|| format!("reading {path}"))
}

/// The 1-minute load average, as `/proc/loadavg` prints it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn print_report(
    results: &[PathResult],
    rounds: usize,
    duration: Duration,
    conns: u32,
    nginx_build: &str,
    elapsed: Duration,
) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "# bench: {} rounds, {} s per load, paths alternated, medians",
        rounds,
        duration.as_secs()
    );
    println!(
        "kernel {}, {cpus} CPUs; {}; {}; {}",
        kernel.trim(),
        servers::nginx_version(nginx_build),
        first_line("wrk", &["--version"])
            .split(" Copyright")
            .next()
            .unwrap_or(""),
        first_line("nft", &["--version"]),
    );
    println!(
        "load: wrk -t1 -c{conns} -d{}s --latency (keep-alive; and -H 'Connection: close'), \
         UDP closed loop with {conns} outstanding (200 ms timeout)",
        duration.as_secs()
    );
    println!(
        "backends: nginx, 1 worker, access_log off, 100-byte file; \
         net.ipv4.tcp_max_tw_buckets=0 on the real servers (the TIME_WAIT trap, BENCH.md); \
         bridge-nf-call-* = 0 in the switch namespace"
    );
    for r in results {
        println!("  {:<6} {} -> {}", r.name, r.description, r.target);
    }
    println!();
    print!("{}", report::figures_table(results));
    println!(
        "UDP pps = answered request/response exchanges per second. CPU = balancer user + system \
         time per frame it received (front + back + TUN), over the three loads; the system part \
         includes the kernel's veth/bridge delivery that runs inside the balancer's ring sends"
    );
    let lost: Vec<String> = results
        .iter()
        .filter(|r| r.keepalive_errors + r.close_errors + r.udp_lost > 0)
        .map(|r| {
            format!(
                "{}: {} keep-alive and {} close errors, {} UDP lost",
                r.name, r.keepalive_errors, r.close_errors, r.udp_lost
            )
        })
        .collect();
    if !lost.is_empty() {
        println!("errors over all rounds: {}", lost.join("; "));
    }
    println!();
    if results.iter().any(|r| r.vs_nft.is_some()) {
        print!("{}", report::ratio_table(results));
        println!(
            "(of medians: ratio of the paths' medians; per round: median of the ratios within \
             each round; latency ratios above 1 mean slower than nftables)"
        );
        if let Some(nat) = results.iter().find(|r| r.name == "nat")
            && let (Some(a), Some(b)) = (&nat.vs_nft, &nat.vs_nft_per_round)
        {
            let verdict = |x: f64| {
                if x >= NAT_CLOSE_TARGET {
                    "met"
                } else {
                    "NOT met"
                }
            };
            println!(
                "NAT new-connection rate vs nftables: {:.2} of medians ({}), {:.2} per round ({}); \
                 issue target >= {NAT_CLOSE_TARGET:.2}",
                a.close_rps,
                verdict(a.close_rps),
                b.close_rps,
                verdict(b.close_rps),
            );
        }
    } else {
        println!("no ratios: the nft path was not measured");
    }
    if let Some(m) = results.iter().find_map(|r| r.memory.as_ref()) {
        println!(
            "memory: {} UDP flows opened ({} datagrams at {}/s in {} passes), {} connections tracked \
             (status, max_entries {}), {} refused as table full; {} frames reached front0, the \
             dataplane saw {}; balancer RSS {:.1} MiB (idle {:.1} MiB, \
             peak {:.1} MiB; anonymous {:.1} MiB, idle {:.1} MiB; file/ring pages {:.1} MiB); \
             target < {:.0} MiB: {}",
            m.flows,
            m.datagrams_sent,
            m.rate_pps,
            m.passes,
            m.tracked,
            m.max_entries,
            m.table_full_drops,
            m.front_rx_kernel,
            m.front_rx_balancer,
            m.rss_mib,
            m.rss_idle_kib as f64 / 1024.0,
            m.hwm_kib as f64 / 1024.0,
            m.anon_kib as f64 / 1024.0,
            m.anon_idle_kib as f64 / 1024.0,
            m.file_kib as f64 / 1024.0,
            m.target_mib,
            if m.target_met { "met" } else { "NOT met" }
        );
    }
    println!("took {:.0} s", elapsed.as_secs_f64());
}
