//! `balancer`: check a config, prepare a host, query a running node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use balancer::config::{self, Config};
use balancer::setup::{Applied, Plan, StepState, Undone};
use balancer::{Error, control};
use clap::{Parser, Subcommand};

/// Exit status for a config that does not validate (as `check` documents).
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "balancer",
    version,
    about = "Bi-active clustered layer-4 load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node: apply the host setup it needs, forward until SIGTERM or
    /// SIGINT, then undo what it applied.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config and print a summary; exit 2 if invalid.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print (or apply, or undo) the host setup: VIP and back gateway
    /// aliases, sysctls, kernel filters.
    Setup {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Apply the steps that are not in effect (idempotent).
        #[arg(long, conflicts_with = "undo")]
        apply: bool,
        /// Reverse the steps that are in effect.
        #[arg(long)]
        undo: bool,
    },
    /// Query a running node's counters over its control socket.
    Status {
        /// The control socket.
        #[arg(short, long, value_name = "SOCKET", conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Take the control socket from this config.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the raw snapshot as JSON.
        #[arg(long)]
        json: bool,
        /// Show every drop reason, also those at zero.
        #[arg(long)]
        all: bool,
    },
    /// Drain a real server: weight 0, no new flows, existing ones finish.
    Drain {
        /// The backend's name.
        server: String,
        /// Only in this service (default: every service that has it).
        #[arg(long)]
        service: Option<String>,
        #[arg(short, long, value_name = "SOCKET", conflicts_with = "config")]
        socket: Option<PathBuf>,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Give a drained real server its configured weight again.
    Undrain {
        server: String,
        #[arg(long)]
        service: Option<String>,
        #[arg(short, long, value_name = "SOCKET", conflicts_with = "config")]
        socket: Option<PathBuf>,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = balancer::Config::load(path)?;
    balancer::node::run(config)?;
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run { config } => run(&config),
        Cmd::Check { config } => check(&config),
        Cmd::Setup {
            config,
            apply,
            undo,
        } => setup(&config, apply, undo),
        Cmd::Status {
            socket,
            config,
            json,
            all,
        } => status(socket, config, json, all),
        Cmd::Drain {
            server,
            service,
            socket,
            config,
        } => drain(&server, service.as_deref(), socket, config, true),
        Cmd::Undrain {
            server,
            service,
            socket,
            config,
        } => drain(&server, service.as_deref(), socket, config, false),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A config error is already `FILE:LINE:COL: KEY: message`.
            if let Some(Error::Config(c)) = e.downcast_ref::<Error>() {
                eprintln!("{c}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            if let Some(Error::ConfigRead { .. }) = e.downcast_ref::<Error>() {
                eprintln!("{e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            eprintln!("balancer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &PathBuf) -> anyhow::Result<()> {
    let c = Config::load(path)?;
    let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
    println!(
        "{}: ok: node {} (front {}, back {}, back gateway {}), {} service(s), {} backend(s)",
        path.display(),
        c.node.name,
        c.node.front,
        c.node.back,
        c.node.back_gateway,
        c.services.len(),
        backends
    );
    for s in &c.services {
        println!(
            "  {} {}:{}/{} {} ({} backend(s))",
            s.name,
            s.vip,
            s.port,
            s.protocol,
            s.scheduler,
            s.backends.len()
        );
        for b in &s.backends {
            let at = b.address.map_or_else(
                || format!("local:{}", b.port),
                |a| format!("{a}:{}", b.port),
            );
            println!("    -> {} {} {} weight {}", b.name, at, b.forward, b.weight);
        }
    }
    Ok(())
}

fn setup(path: &PathBuf, apply: bool, undo: bool) -> anyhow::Result<()> {
    let c = Config::load(path)?;
    let plan = Plan::for_config(&c);
    let record_path = Plan::record_path(&c);
    if !apply && !undo {
        print!("{plan}");
        return Ok(());
    }
    let record = read_record(&record_path)?;
    if apply {
        let states = plan.check()?;
        for (step, state) in plan.steps.iter().zip(&states) {
            let first = step.command();
            let first = first.lines().next().unwrap_or("");
            match state {
                StepState::InEffect => println!("in effect:  {first}"),
                StepState::Deferred { reason } => println!("deferred:   {first} ({reason})"),
                StepState::Missing { .. } => {}
            }
        }
        let applied = plan.apply().context("applying the setup (rolled back)")?;
        for change in &applied.changes {
            println!("changed:    {change}");
        }
        if applied.is_empty() {
            println!("nothing changed: every step is already in effect");
            return Ok(());
        }
        let mut record = record;
        record.merge(applied);
        write_record(&record_path, &record)?;
        println!("recorded for --undo in {}", record_path.display());
    } else {
        let undone = plan.undo(&record)?;
        let mut nothing = true;
        for (step, u) in plan.steps.iter().zip(&undone) {
            match u {
                Undone::Reversed(cmd) => {
                    nothing = false;
                    println!("undone:     {cmd}");
                }
                Undone::NoRecord(msg) => println!("left as is: {msg}"),
                Undone::NotInEffect => {
                    let first = step.command();
                    println!("not in effect: {}", first.lines().next().unwrap_or(""));
                }
            }
        }
        if nothing {
            println!("nothing to undo");
        }
        match std::fs::remove_file(&record_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", record_path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn read_record(path: &PathBuf) -> anyhow::Result<Applied> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("reading the setup record {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Applied::default()),
        Err(e) => Err(e).with_context(|| format!("reading the setup record {}", path.display())),
    }
}

fn write_record(path: &PathBuf, record: &Applied) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(record)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("writing the setup record {}", path.display()))
}

fn control_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => Config::load(c)?.node.control_socket,
        (None, None) => PathBuf::from(config::DEFAULT_CONTROL_SOCKET),
    })
}

fn drain(
    server: &str,
    service: Option<&str>,
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    drain: bool,
) -> anyhow::Result<()> {
    let socket = control_socket(socket, config)?;
    let changed = control::drain(&socket, service, server, drain, Duration::from_secs(5))?;
    let what = if drain { "drained" } else { "undrained" };
    for c in changed {
        println!("{what} {c}");
    }
    Ok(())
}

fn status(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    json: bool,
    all: bool,
) -> anyhow::Result<()> {
    let socket = control_socket(socket, config)?;
    let snapshot = control::status(&socket, Duration::from_secs(5))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", snapshot.render(all));
    }
    Ok(())
}
