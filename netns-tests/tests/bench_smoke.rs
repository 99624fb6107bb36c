//! The `bench` program still runs: a `--quick` pass over every path writes
//! JSON with each path and non-zero figures. No timing assertion (the
//! machine is shared and noisy); the figures themselves are the bench's
//! business, not this test's.
//!
//! Needs root, the bench's packages (`scripts/deps`) and the workspace
//! binaries (`cargo build --workspace`: the nat and dr paths run
//! `balancer run`).

use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

const PATHS: [&str; 4] = ["direct", "nat", "dr", "nft"];

#[test]
fn quick_bench_reports_every_path_with_non_zero_figures() -> Result<()> {
    let json = std::env::temp_dir().join(format!("bench-smoke-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--quick",
            "--paths",
            &PATHS.join(","),
            "--flows",
            "2000",
            "--json",
        ])
        .arg(&json)
        .output()
        .context("running bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let _ = std::fs::remove_file(&json);
    let results: Value = serde_json::from_str(&text)?;
    let results = results.as_array().context("JSON is not an array")?;
    let names: Vec<&str> = results.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, PATHS, "one object per path, in order");
    for r in results {
        let name = r["name"].as_str().unwrap_or("?");
        for figure in [
            "keepalive_rps",
            "keepalive_p50_ms",
            "keepalive_p99_ms",
            "close_rps",
            "close_p50_ms",
            "close_p99_ms",
            "udp_pps",
            "udp_p50_us",
            "udp_p99_us",
        ] {
            let v = r[figure].as_f64().unwrap_or(0.0);
            assert!(v > 0.0, "{name}: {figure} = {v}\n{stdout}");
        }
        let cpu = r["cpu_us_per_pkt"].as_f64();
        if name == "nat" || name == "dr" {
            assert!(
                cpu.is_some_and(|c| c > 0.0),
                "{name}: no CPU per packet\n{stdout}"
            );
        } else {
            assert!(
                cpu.is_none(),
                "{name}: CPU per packet is only measured for our paths"
            );
        }
        if name != "nft" {
            let ratio = r["vs_nft"]["close_rps"].as_f64().unwrap_or(0.0);
            assert!(ratio > 0.0, "{name}: no ratio to nft\n{stdout}");
        }
    }
    let mem = &results[1]["memory"];
    assert_eq!(
        mem["flows"].as_u64(),
        Some(2000),
        "memory figure of the nat path: {mem}"
    );
    assert!(
        mem["tracked"].as_u64().unwrap_or(0) >= 2000,
        "flows not tracked: {mem}"
    );
    assert!(mem["rss_kib"].as_u64().unwrap_or(0) > 0, "no RSS: {mem}");
    assert!(
        stdout.contains("namespaces left behind: none"),
        "bench left namespaces:\n{stdout}"
    );
    Ok(())
}
