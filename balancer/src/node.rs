//! `balancer run`: one node. Applies the host setup it needs (and undoes
//! exactly what it applied on exit), opens the rings and the TUN device,
//! runs the dataplane on its own thread and the control plane (control
//! socket, signals) on a small tokio runtime.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rewrite::ethernet::MacAddr;

use crate::config::Config;
use crate::dataplane::engine::{Engine, Interfaces, Output};
use crate::dataplane::ring::{FrameRx, FrameTx, RxRing, TxRing};
use crate::dataplane::tun::Tun;
use crate::setup::Plan;
use crate::stats::Stats;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Balancer(#[from] crate::Error),
    #[error("connection table: {0}")]
    Conntrack(#[from] crate::conntrack::ConntrackError),
    #[error(transparent)]
    Peers(#[from] crate::peers::PeersError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// The MAC address of a local interface.
pub fn interface_mac(ifname: &str) -> io::Result<MacAddr> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))?;
    s.trim().parse::<MacAddr>().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad MAC of {ifname}: {s}"),
        )
    })
}

/// The IPv4 subnet of `addr` on a local interface.
pub fn interface_net(ifname: &str, addr: std::net::Ipv4Addr) -> Option<ipnet::Ipv4Net> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    addrs
        .filter(|a| a.interface_name == ifname)
        .filter(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v| v.ip())) == Some(addr))
        .find_map(|a| a.netmask.and_then(|m| m.as_sockaddr_in().map(|v| v.ip())))
        .and_then(|mask| ipnet::Ipv4Net::with_netmask(addr, mask).ok())
        .map(|n| n.trunc())
}

/// The default router on a local interface, from `/proc/net/route`.
pub fn default_router(ifname: &str) -> Option<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && f[0] == ifname && f[1] == "00000000" {
            let gw = u32::from_str_radix(f[2], 16).ok()?;
            (gw != 0).then(|| std::net::Ipv4Addr::from(gw.to_le_bytes()))
        } else {
            None
        }
    })
}

/// The IPv4 addresses on a local interface.
pub fn interface_addrs(ifname: &str) -> io::Result<Vec<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter(|a| a.interface_name == ifname)
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v| v.ip())))
        .collect())
}

struct Sinks<'a> {
    front: &'a mut TxRing,
    back: &'a mut TxRing,
    tun: Option<&'a Tun>,
}

impl Output for Sinks<'_> {
    fn to_front(&mut self, frame: &[u8]) -> bool {
        self.front.send(frame)
    }
    fn to_back(&mut self, frame: &[u8]) -> bool {
        self.back.send(frame)
    }
    fn to_local(&mut self, packet: &[u8]) -> bool {
        self.tun.is_some_and(|t| t.write_packet(packet))
    }
}

/// How long a leaving cluster node keeps forwarding after handing its
/// buckets over (replies of its flows still reach it through its back
/// gateway until the heartbeat moves the gateway).
const DRAIN: Duration = Duration::from_millis(300);

/// Frames handled per ring before the other ring gets its turn.
const BATCH: usize = 256;

/// The dataplane thread: poll both RX rings, hand frames to the engine,
/// flush TX once per round, run housekeeping on its interval.
/// What the dataplane thread owns.
struct Dataplane {
    engine: Engine,
    front_rx: RxRing,
    back_rx: RxRing,
    front_tx: TxRing,
    back_tx: TxRing,
    tun: Option<Tun>,
    housekeeping: Duration,
    stats: Arc<Stats>,
    /// Cluster mode: set when a new cluster view is published.
    wake: Option<Arc<crate::dataplane::view::Wake>>,
}

fn dataplane_loop(dp: Dataplane, stop: Arc<AtomicBool>) {
    let Dataplane {
        mut engine,
        mut front_rx,
        mut back_rx,
        mut front_tx,
        mut back_tx,
        tun,
        housekeeping,
        stats,
        wake,
    } = dp;
    let t0 = Instant::now();
    let hk_ms = housekeeping.as_millis().max(1) as u64;
    let mut next_hk = 0u64;
    let pfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = vec![pfd(front_rx.fd()), pfd(back_rx.fd())];
    if let Some(fd) = engine.sync_fd() {
        fds.push(pfd(fd));
    }
    if let Some(w) = &wake {
        fds.push(pfd(w.fd()));
    }
    while !stop.load(Ordering::Relaxed) {
        let now_ms = t0.elapsed().as_millis() as u64;
        // In this order: a new view, then sync (what peers sent before the
        // view changed is applied, and the view is acknowledged once what
        // this node scheduled is sent), then frames.
        engine.refresh();
        engine.poll_sync(now_ms);
        let mut sinks = Sinks {
            front: &mut front_tx,
            back: &mut back_tx,
            tun: tun.as_ref(),
        };
        if now_ms >= next_hk {
            engine.housekeeping(now_ms, &mut sinks);
            let lost = front_rx.take_drops() + back_rx.take_drops();
            if lost > 0 {
                stats
                    .drop_counter(crate::stats::DropReason::RxRingFull)
                    .fetch_add(lost, Ordering::Relaxed);
            }
            next_hk = now_ms + hk_ms;
        }
        let mut n =
            front_rx.recv_batch(BATCH, &mut |f, m| engine.on_front(f, m, now_ms, &mut sinks));
        n += back_rx.recv_batch(BATCH, &mut |f, m| engine.on_back(f, m, now_ms, &mut sinks));
        let _ = front_tx.flush();
        let _ = back_tx.flush();
        if n == 0 {
            let wait = next_hk
                .saturating_sub(t0.elapsed().as_millis() as u64)
                .clamp(1, 100) as libc::c_int;
            // SAFETY: fds is a valid array of pollfd for the call.
            unsafe {
                libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait);
            }
            if let (Some(w), Some(last)) = (&wake, fds.last())
                && last.fd == w.fd()
                && last.revents & libc::POLLIN != 0
            {
                w.clear();
            }
        }
    }
}

/// Runs a node until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), NodeError> {
    // The TUN first: the setup plan turns off reverse-path filtering on it.
    let tun = open_tun(&config)?;
    let plan = Plan::for_config(&config);
    // Make the host what the node needs; remember exactly what we changed.
    let applied = plan.apply()?;
    let result = run_applied(&config, tun);
    if let Err(e) = applied.undo() {
        tracing::error!(error = %e, "undoing the host setup failed");
    }
    result
}

fn open_tun(config: &Config) -> Result<Option<Tun>, NodeError> {
    if !config.has_local() {
        return Ok(None);
    }
    let name = &config.node.local_tun;
    let t = Tun::open(name).map_err(io_err(format!("TUN {name}")))?;
    let st = std::process::Command::new("ip")
        .args(["link", "set", name.as_str(), "up"])
        .status()
        .map_err(io_err("ip link set up"))?;
    if !st.success() {
        return Err(NodeError::Io {
            what: format!("ip link set {name} up"),
            source: io::Error::other("failed"),
        });
    }
    Ok(Some(t))
}

fn run_applied(config: &Config, tun: Option<Tun>) -> Result<(), NodeError> {
    let node = &config.node;
    let front_mac =
        interface_mac(&node.front).map_err(io_err(format!("front NIC {}", node.front)))?;
    let back_mac = interface_mac(&node.back).map_err(io_err(format!("back NIC {}", node.back)))?;
    let back_local =
        interface_addrs(&node.back).map_err(io_err(format!("addresses of {}", node.back)))?;
    // The source of our ARP requests on the back: the gateway alias on a
    // single node; in a cluster the gateway moves, so the node's own address.
    let back_addr = match (&config.cluster, back_local.first()) {
        (Some(_), Some(a)) => *a,
        _ => node.back_gateway.addr(),
    };
    // The node's own front address (not a VIP): source of its ARP requests
    // on the front and of connection sync.
    let vips = config.vips();
    let front_addr = interface_addrs(&node.front)
        .map_err(io_err(format!("addresses of {}", node.front)))?
        .into_iter()
        .find(|a| !vips.contains(a));
    let ifs = Interfaces {
        front_addr: front_addr.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        front_net: front_addr.and_then(|a| interface_net(&node.front, a)),
        front_router: default_router(&node.front),
        front_mac,
        back_mac,
        back_addr,
        answer_mac: front_mac,
    };
    let stats = Arc::new(Stats::new(config));
    let mut engine =
        Engine::new(config, ifs, back_local, stats.clone())?.with_seed(crate::sched::random_seed());
    let peers = match &config.cluster {
        Some(c) => {
            let mut p = crate::peers::Peers::start(config, c, stats.clone())?;
            engine = engine.with_cluster(p.shared.clone(), p.applied.clone());
            if let Some((commands, ready)) = p.take_dataplane_ends() {
                let front_addr = front_addr.ok_or_else(|| NodeError::Io {
                    what: format!("front NIC {}", node.front),
                    source: io::Error::other("has no address of its own for connection sync"),
                })?;
                let sync = crate::dataplane::syncio::SyncIo::open(
                    p.me(),
                    p.universe(),
                    c.sync_key.as_bytes(),
                    &node.front,
                    front_addr,
                    c.sync_group,
                    c.sync_port,
                    commands,
                    ready,
                )
                .map_err(io_err("connection sync socket"))?;
                engine = engine.with_sync(sync);
            }
            Some(p)
        }
        None => None,
    };
    let front_rx =
        RxRing::open(&node.front, 4096).map_err(io_err(format!("RX ring on {}", node.front)))?;
    if let Some(c) = &config.cluster {
        front_rx
            .add_membership(&node.front, c.cluster_mac.0)
            .map_err(io_err(format!("cluster MAC on {}", node.front)))?;
    }
    let back_rx =
        RxRing::open(&node.back, 4096).map_err(io_err(format!("RX ring on {}", node.back)))?;
    let front_tx =
        TxRing::open(&node.front, 2048).map_err(io_err(format!("TX ring on {}", node.front)))?;
    let back_tx =
        TxRing::open(&node.back, 2048).map_err(io_err(format!("TX ring on {}", node.back)))?;

    let stop = Arc::new(AtomicBool::new(false));
    let hk = config.conntrack.expire_interval;
    let dp_stop = stop.clone();
    let dp_stats = stats.clone();
    let dp_wake = peers.as_ref().map(|p| p.wake.clone());
    let dp = std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            let dp = Dataplane {
                engine,
                front_rx,
                back_rx,
                front_tx,
                back_tx,
                tun,
                housekeeping: hk,
                stats: dp_stats,
                wake: dp_wake,
            };
            dataplane_loop(dp, dp_stop)
        })
        .map_err(io_err("spawning the dataplane thread"))?;
    tracing::info!(node = %node.name, front = %node.front, back = %node.back, services = config.services.len(), "dataplane running");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime"))?;
    let hb_handle = peers.as_ref().map(|p| p.handle.commander.clone());
    let drainer = peers.as_ref().map(|p| p.drainer());
    let served = rt.block_on(async {
        if let Some(p) = peers {
            tokio::spawn(p.run());
        }
        // The feedback master publishes agents' weights to `stats`.
        if let Some(m) =
            crate::feedback::master::Master::new(Arc::new(config.clone()), stats.clone())
        {
            tokio::spawn(crate::feedback::master::run(m));
        }
        // Health checks run on this (control-plane) runtime and publish to
        // `stats`; the dataplane reads them on its housekeeping tick.
        let targets = crate::health::targets(config);
        if !targets.is_empty() {
            tokio::spawn(crate::health::run(
                targets,
                stats.clone(),
                std::future::pending::<()>(),
            ));
        }
        let server = crate::control::ControlServer::bind(&node.control_socket)?;
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot catch SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            }
            if let Some(d) = &drainer {
                // Hand the buckets over before going: stop scheduling, then
                // announce weight 0 (peers take the buckets when it
                // arrives); meanwhile this node passes its former buckets'
                // frames to the new owner and keeps reverse-NATing replies
                // through its back gateway.
                d.leave(Duration::from_secs(1)).await;
                tokio::time::sleep(DRAIN).await;
                tracing::info!("buckets handed over");
            }
        };
        server.serve(stats.clone(), shutdown).await
    });
    if let Some(c) = hb_handle {
        // Priority 0: a backup takes over at once (RFC 5798 §6.4.3).
        c.send(heartbeat::driver::Command::Shutdown);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = dp.join();
    let _ = std::fs::remove_file(&node.control_socket);
    served?;
    Ok(())
}
