//! Smoke test of the `experiments` binary (needs root and the workspace
//! binaries): `--quick` must report every experiment with every variant
//! measured (non-zero requests, successes, throughput and latencies), write
//! its plots, and leave no namespace (nor, for `feedback`, cpuacct cgroup)
//! behind. It asserts that the measurement works, never what it measured
//! (shared, noisy machine).
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
    check_feedback(reports, &text)?;
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    // The harness names namespaces lbt<pid>x<n>-<role>.
    let left = String::from_utf8_lossy(&left.stdout).into_owned();
    ensure!(
        !left.contains(&format!("lbt{pid}x")),
        "namespaces left behind:\n{left}"
    );
    // The feedback experiment's cgroups are named lbt<pid>x<n>-<role>.
    let groups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/cpuacct")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("lbt{pid}-")) || n.starts_with(&format!("lbt{pid}x")))
        .collect();
    ensure!(groups.is_empty(), "cgroups left behind: {groups:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `feedback`: both variants (wrr, feedback) at every load step, each with
/// requests, successes, a response rate, latencies, CPU measured for every
/// server (rs4, the expensive one, above zero), shares summing to 1 and a
/// weight sampled for every server; its table printed and its plots
/// written.
fn check_feedback(reports: &[Value], text: &str) -> Result<()> {
    let r = reports
        .iter()
        .find(|r| r["experiment"] == "feedback")
        .context("no experiment feedback in the JSON")?;
    let fb = &r["feedback"];
    let rates = fb["rates"].as_array().context("feedback: rates")?;
    ensure!(!rates.is_empty(), "feedback: no load step");
    let vs = fb["variants"].as_array().context("feedback: variants")?;
    let names: Vec<&str> = vs.iter().filter_map(|v| v["name"].as_str()).collect();
    ensure!(names == ["wrr", "feedback"], "feedback variants: {names:?}");
    for v in vs {
        let steps = v["steps"].as_array().context("steps")?;
        ensure!(
            steps.len() == rates.len(),
            "{}: {} steps",
            v["name"],
            steps.len()
        );
        for s in steps {
            let m = &s["median"];
            let what = format!("feedback / {} at {}", v["name"], s["rate"]);
            for key in ["offered", "requests", "ok", "ok_per_s", "p50_ms", "p99_ms"] {
                let x = m[key].as_f64().with_context(|| format!("{what}: {key}"))?;
                ensure!(x.is_finite() && x > 0.0, "{what}: {key} = {x}");
            }
            for key in ["errors", "error_pct", "errors_per_s"] {
                let x = m[key].as_f64().with_context(|| format!("{what}: {key}"))?;
                ensure!(x.is_finite() && x >= 0.0, "{what}: {key} = {x}");
            }
            let per = |key: &str| -> Result<Vec<f64>> {
                let o = m[key]
                    .as_object()
                    .with_context(|| format!("{what}: {key}"))?;
                (1..=4)
                    .map(|i| {
                        o.get(&format!("rs{i}"))
                            .and_then(Value::as_f64)
                            .with_context(|| format!("{what}: {key} of rs{i}"))
                    })
                    .collect()
            };
            let cpu = per("cpu_pct")?;
            ensure!(
                cpu.iter().all(|c| c.is_finite() && *c >= 0.0) && cpu[3] > 0.0,
                "{what}: CPU {cpu:?}"
            );
            let share: f64 = per("share")?.iter().sum();
            ensure!((share - 1.0).abs() < 1e-6, "{what}: shares sum to {share}");
            let w = per("weight")?;
            ensure!(
                w.iter().all(|w| w.is_finite() && *w >= 0.0) && w.iter().any(|w| *w > 0.0),
                "{what}: weights {w:?}"
            );
            let tl = s["timeline"].as_array().context("timeline")?;
            ensure!(tl.len() >= 4, "{what}: {} samples", tl.len());
        }
    }
    ensure!(
        r["table"].as_str().is_some_and(|t| text.contains(t)),
        "feedback: table not printed"
    );
    let plots = r["plots"].as_array().context("plots")?;
    ensure!(plots.len() >= 4, "feedback: {} plots", plots.len());
    for p in plots {
        let p = p.as_str().context("plot path")?;
        let svg = std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?;
        ensure!(svg.starts_with("<svg"), "{p} is not an SVG");
    }
    Ok(())
}
