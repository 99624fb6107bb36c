//! `balancer-agent`: the feedback agent on a real server.

use std::path::PathBuf;
use std::process::ExitCode;

use balancer::agent::{self, config::AgentConfig};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "balancer-agent",
    version,
    about = "Reports this real server's health and load to the balancer (NECP-style feedback)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Keep a session with the master until SIGINT / SIGTERM (then STOP).
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config; exit 2 if invalid.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
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
    let (path, run) = match cli.command {
        Cmd::Run { config } => (config, true),
        Cmd::Check { config } => (config, false),
    };
    let cfg = match AgentConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if !run {
        println!(
            "{}: agent {} -> {}, {} service(s)",
            path.display(),
            cfg.name,
            cfg.master,
            cfg.services.len()
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balancer-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
