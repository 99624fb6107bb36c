//! The feedback master and a real agent over loopback TCP (no namespaces):
//! the agent's START joins, its command-reported health becomes the
//! backend's weight, and when the agent vanishes without STOP the server
//! leaves (weight 0) after the missed keepalives.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use balancer::agent::config::AgentConfig;
use balancer::config::Config;
use balancer::feedback::master::{self, Master};
use balancer::stats::Stats;

async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_health_becomes_weight_and_a_vanished_agent_leaves() {
    let port = 40000 + (std::process::id() % 20000) as u16;
    let node = format!(
        "[node]\nname = \"lb1\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"127.0.0.3/8\"\n\
         [feedback]\nlisten = \"127.0.0.3:{port}\"\nkey = \"0123456789abcdef\"\nkeepalive_interval = \"100ms\"\nkeepalive_timeout = \"100ms\"\nalpha = 1.0\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n\
         [[service.backend]]\nname = \"rs1\"\naddress = \"127.0.0.1\"\nweight = 7\nforward = \"dr\"\n"
    );
    let config = Arc::new(Config::parse(&node, "node.toml").expect("node config"));
    let stats = Arc::new(Stats::new(&config));
    let m = Master::new(config.clone(), stats.clone()).expect("feedback configured");
    tokio::spawn(master::run(m.clone()));

    let agent = AgentConfig::parse(
        &format!(
            "[agent]\nname = \"rs1\"\nmaster = \"127.0.0.3:{port}\"\nkey = \"0123456789abcdef\"\nsample_interval = \"50ms\"\nreconnect_min = \"50ms\"\n\
             [[service]]\nport = 80\nforward = \"dr\"\nplugin = \"command\"\ncommand = [\"echo\", \"40\"]\n"
        ),
        "agent.toml",
    )
    .expect("agent config");
    let task = tokio::spawn(balancer::agent::run(agent));
    let weight = || stats.service(0).backend(0).weight.load(Relaxed);
    assert!(
        wait_for(Duration::from_secs(10), || weight() == 40).await,
        "weight {} never followed health 40",
        weight()
    );
    let snap = m.snapshot();
    assert_eq!(snap.servers.len(), 1);
    assert_eq!(snap.servers[0].health, Some(40));
    assert!(
        snap.refused.iter().all(|(_, n)| *n == 0),
        "{:?}",
        snap.refused
    );

    // The agent vanishes without STOP: 3 keepalives of 100 ms unanswered.
    task.abort();
    let gone = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || weight() == 0).await,
        "weight {} after the agent vanished",
        weight()
    );
    assert!(
        gone.elapsed() >= Duration::from_millis(200),
        "left before the keepalives were missed"
    );
    assert!(wait_for(Duration::from_secs(5), || m.snapshot().servers.is_empty()).await);
}
