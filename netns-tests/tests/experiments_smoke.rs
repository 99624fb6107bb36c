//! Smoke test of the `experiments` binary (needs root and the workspace
//! binaries): `--quick` must report every experiment with every variant
//! measured (non-zero requests, successes, throughput and latencies), write
//! its plots, and leave no namespace behind. It asserts that the
//! measurement works, never what it measured (shared, noisy machine).
//!
//! Run: `cargo build --workspace && cargo test -p netns-tests --test experiments_smoke`

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use netns_tests::topo::workspace_bin;
use serde_json::Value;

#[test]
fn quick_run_reports_every_experiment_with_figures_and_plots() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("experiments-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("figures.json");
    let child = Command::new(workspace_bin("experiments")?)
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .arg("--out")
        .arg(dir.join("out"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running experiments")?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "experiments failed:\n{text}");
    let reports: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let reports = reports.as_array().context("JSON is an array")?;
    let expected = [("scale", 2), ("weighted", 2), ("least", 2), ("shed", 3)];
    for (name, variants) in expected {
        let r = reports
            .iter()
            .find(|r| r["experiment"] == name)
            .with_context(|| format!("no experiment {name} in the JSON"))?;
        let vs = r["variants"].as_array().context("variants")?;
        ensure!(vs.len() == variants, "{name}: {} variants", vs.len());
        for v in vs {
            let m = &v["median"];
            for key in [
                "requests",
                "ok",
                "throughput",
                "p50_ms",
                "p99_ms",
                "mean_ms",
            ] {
                let x = m[key].as_f64().with_context(|| format!("{name}: {key}"))?;
                ensure!(
                    x.is_finite() && x > 0.0,
                    "{name} / {}: {key} = {x}",
                    v["name"]
                );
            }
            let share: f64 = m["share"]
                .as_object()
                .context("share")?
                .values()
                .filter_map(Value::as_f64)
                .sum();
            ensure!(
                (share - 1.0).abs() < 1e-6,
                "{name} / {}: shares sum to {share}",
                v["name"]
            );
        }
        ensure!(
            r["table"].as_str().is_some_and(|t| text.contains(t)),
            "{name}: table not printed"
        );
        let plots = r["plots"].as_array().context("plots")?;
        ensure!(!plots.is_empty(), "{name}: no plot");
        for p in plots {
            let p = p.as_str().context("plot path")?;
            let svg = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
            ensure!(svg.starts_with("<svg"), "{p} is not an SVG");
        }
    }
    // Shed: a time series of 100 ms bins per variant, with successes.
    let shed = reports
        .iter()
        .find(|r| r["experiment"] == "shed")
        .context("shed")?;
    let series = shed["series"].as_array().context("series")?;
    ensure!(series.len() == 3, "{} shed series", series.len());
    for s in series {
        let pts = s["points"].as_array().context("points")?;
        ensure!(pts.len() >= 10, "{} bins", pts.len());
        let ok: u64 = pts.iter().filter_map(|p| p["ok"].as_u64()).sum();
        ensure!(ok > 0, "{}: no success in the series", s["variant"]);
    }
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    // The harness names namespaces lbt<pid>x<n>-<role>.
    let left = String::from_utf8_lossy(&left.stdout).into_owned();
    ensure!(
        !left.contains(&format!("lbt{pid}x")),
        "namespaces left behind:\n{left}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
