//! `heartbeat run -c FILE` | `heartbeat check -c FILE` | `heartbeat status`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand};
use heartbeat::config::Config;
use heartbeat::control;
use heartbeat::driver::{self, NodeStatus};

#[derive(Parser)]
#[command(
    name = "heartbeat",
    about = "VRRPv3 election and membership heartbeats"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit (0 = valid).
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print instances, states, priorities and counters of a running daemon.
    Status {
        #[arg(short, long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Read the socket path from this config instead.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the raw JSON line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} instances)", config.display(), c.instances.len());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::from(1);
            }
        },
        Cmd::Status {
            socket,
            config,
            json,
        } => status(socket, config, json),
        Cmd::Run { config } => run(config),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heartbeat: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn status(socket: PathBuf, config: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let socket = match config {
        Some(c) => Config::load(&c)?.control_socket.unwrap_or(socket),
        None => socket,
    };
    let line = control::query(&socket, "status")
        .with_context(|| format!("control socket {}", socket.display()))?;
    if json {
        print!("{line}");
        return Ok(());
    }
    let s: serde_json::Value = serde_json::from_str(&line)?;
    println!(
        "node {} ({})",
        s["node_id"],
        s["node_name"].as_str().unwrap_or("")
    );
    println!(
        "{:<12} {:<8} {:>4} {:<10} {:>4} {:>4} {:<15} {:>8} {:>8} {:>5} {:>8}  drops",
        "instance",
        "iface",
        "vrid",
        "state",
        "prio",
        "base",
        "master",
        "sent",
        "recv",
        "trans",
        "maxgap"
    );
    // serde_json::Value's Display ignores widths: format plain strings.
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    for i in s["instances"].as_array().into_iter().flatten() {
        let gap_ms = i["max_advert_gap_us"].as_u64().unwrap_or(0) as f64 / 1000.0;
        println!(
            "{:<12} {:<8} {:>4} {:<10} {:>4} {:>4} {:<15} {:>8} {:>8} {:>5} {:>6.1}ms  {}",
            text(&i["name"]),
            text(&i["interface"]),
            text(&i["vrid"]),
            text(&i["state"]),
            text(&i["priority"]),
            text(&i["base_priority"]),
            text(&i["master"]),
            text(&i["adverts_sent"]),
            text(&i["adverts_received"]),
            text(&i["transitions"]),
            gap_ms,
            text(&i["drops"])
        );
    }
    println!("interface drops: {}", s["interface_drops"]);
    if let Some(m) = s["members"].as_array().filter(|m| !m.is_empty()) {
        println!("live: {}", s["live"]);
        for x in m {
            println!(
                "  member {} alive={} accepted={}",
                x["node_id"], x["alive"], x["accepted"]
            );
        }
        println!("refused: {}", s["member_refused"]);
    }
    Ok(())
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // A small runtime for everything slow; the protocol has its own thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Before any instance can become master: the kernel must not answer ARP
    // for a VIP announced with another MAC (see driver::kernel_arp).
    let table = driver::kernel_arp::table_name(cfg.node_id);
    let quiet = driver::kernel_arp::quiet_addrs(&cfg, |i| driver::sock::interface_ipv4(i).ok());
    let quiet_installed = match driver::kernel_arp::install(&table, &quiet) {
        Ok(x) => {
            if x {
                tracing::info!(table = %table, addresses = quiet.len(), "kernel ARP for VIPs suppressed (nftables)");
            }
            x
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot keep the kernel from answering ARP for the VIPs; it may answer with the interface MAC");
            false
        }
    };
    let r = rt.block_on(async move {
        let (handle, exec_rx) = driver::start(&cfg)?;
        let exec = tokio::spawn(driver::exec::run(exec_rx));
        let scripts = tokio::spawn({
            let cfg = cfg.clone();
            let cmd = handle.commander.clone();
            async move { driver::run_scripts(&cfg, cmd).await }
        });
        let sock = cfg
            .control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(control::DEFAULT_SOCKET));
        let ctl = tokio::spawn(control::serve(sock.clone(), handle.status.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let arp = driver::start_arp_responders(&cfg, handle.status.clone(), stop.clone());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tracing::info!(config = %path.display(), "running");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        // Priority 0, aliases removed, stop notify: done by the protocol
        // thread's shutdown; exec drains until its Done.
        scripts.abort();
        let status = handle.status.clone();
        tokio::task::spawn_blocking(move || handle.shutdown()).await?;
        let _ = exec.await;
        ctl.abort();
        let _ = std::fs::remove_file(&sock);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in arp {
            let _ = t.join();
        }
        let s: Arc<NodeStatus> = status.borrow().clone();
        tracing::info!(stopped = s.stopped, "exit");
        anyhow::Ok(())
    });
    // Aliases are gone by now; the table goes last.
    if quiet_installed && let Err(e) = driver::kernel_arp::remove(&table) {
        tracing::warn!(error = %e, table = %table, "nftables table not removed");
    }
    r
}
