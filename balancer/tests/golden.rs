//! Golden text: the setup plan printed for every example config, and the
//! `balancer status` table for a fixed snapshot.
//!
//! After an intended change, regenerate with
//! `UPDATE_GOLDEN=1 cargo test -p balancer --test golden` and review the
//! diff.

use std::path::{Path, PathBuf};

use balancer::Config;
use balancer::DropReason;
use balancer::setup::Plan;
use balancer::stats::{ConnGauge, Nic, Stats};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compares `actual` with the golden file `name`, or rewrites the file when
/// `UPDATE_GOLDEN` is set.
#[track_caller]
fn assert_golden(name: &str, actual: &str) {
    let path = manifest_dir().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (create it with UPDATE_GOLDEN=1)", path.display()));
    if expected != actual {
        panic!(
            "{} differs from the golden text.\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }
}

fn example_configs() -> Vec<PathBuf> {
    let dir = manifest_dir().join("../configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        // heartbeat-*.toml configure the heartbeat daemon, agent-*.toml
        // the feedback agent; neither is a node.
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("heartbeat-") || n.starts_with("agent-"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no example configs in {}", dir.display());
    files
}

#[test]
fn setup_plan_of_every_example_config_matches_its_golden_text() {
    for file in example_configs() {
        let config = Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name");
        assert_golden(
            &format!("setup-{stem}.txt"),
            &Plan::for_config(&config).to_string(),
        );
    }
}

#[test]
fn status_table_matches_its_golden_text() {
    let config = Config::load(manifest_dir().join("../configs/single-mixed.toml")).expect("valid");
    let stats = Stats::new(&config);
    // web: 3 connections to rs1 (2 established), 1 to the local backend.
    for _ in 0..3 {
        stats.conn_new(0, 1, ConnGauge::Inactive);
    }
    stats.conn_moved(0, 1, ConnGauge::Inactive, ConnGauge::Active);
    stats.conn_moved(0, 1, ConnGauge::Inactive, ConnGauge::Active);
    stats.conn_new(0, 0, ConnGauge::Active);
    for _ in 0..10 {
        stats.record_in(0, 1, 60);
        stats.record_out(0, 1, 1500);
    }
    stats.record_in(0, 0, 517);
    // echo: one UDP flow to the NAT backend, and a refusal.
    stats.conn_new(1, 1, ConnGauge::Inactive);
    stats.record_in(1, 1, 33);
    stats.record_out(1, 1, 33);
    stats.record_no_backend(1);
    stats.record_drop(DropReason::NoConn);
    stats.record_drop(DropReason::NoConn);
    stats.record_drop(DropReason::Fragment);
    stats
        .nic(Nic::Front)
        .rx_frames
        .fetch_add(1234, std::sync::atomic::Ordering::Relaxed);
    stats
        .nic(Nic::Back)
        .tx_frames
        .fetch_add(1100, std::sync::atomic::Ordering::Relaxed);
    stats
        .arp_replies
        .fetch_add(2, std::sync::atomic::Ordering::Relaxed);

    let snapshot = stats.snapshot();
    assert_golden("status.txt", &snapshot.render(false));
    assert_golden("status-all.txt", &snapshot.render(true));
}
