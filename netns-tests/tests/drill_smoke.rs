//! Smoke test of the `drill` binary (needs root, the workspace binaries and
//! keepalived): one quick drill against the keepalived baseline must produce
//! sane figures and a plot, and leave no namespace behind. It asserts that
//! the measurement works, never what it measured (shared, noisy machine).
//!
//! Run: `cargo build --workspace && cargo test -p netns-tests --test drill_smoke`

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use netns_tests::topo::workspace_bin;
use serde_json::Value;

#[test]
fn quick_kill_holder_drill_against_keepalived_reports_sane_figures() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("drill-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("figures.json");
    let child = Command::new(workspace_bin("drill")?)
        .args(["--quick", "--peer", "keepalived", "--only", "kill-holder"])
        .arg("--json")
        .arg(&json)
        .arg("--out")
        .arg(dir.join("out"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running drill")?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "drill failed:\n{text}");
    let figs: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let figs = figs.as_array().context("JSON is an array")?;
    let f = figs
        .iter()
        .find(|f| f["drill"] == "kill-holder" && f["peer"] == "keepalived")
        .with_context(|| format!("no kill-holder drill in {figs:?}"))?;
    let gap = f["gap_ms"].as_f64().context("gap_ms")?;
    ensure!(gap.is_finite() && gap > 0.0, "gap {gap}");
    let requests = f["requests"].as_u64().context("requests")?;
    let failed = f["failed"].as_u64().context("failed")?;
    // --quick: 200/s for at least a second and a half of load.
    ensure!(requests >= 300, "only {requests} requests counted");
    ensure!(failed <= requests, "{failed} failed of {requests}");
    ensure!(
        f["long_lived"].as_u64() == Some(4),
        "long-lived connections: {}",
        f["long_lived"]
    );
    ensure!(
        f["holders_before"] == serde_json::json!(["lb1"]),
        "VIP holder before the fault: {}",
        f["holders_before"]
    );
    let plot = f["plot"].as_str().context("plot")?;
    let svg = std::fs::read_to_string(plot).with_context(|| format!("reading {plot}"))?;
    ensure!(svg.starts_with("<svg"), "{plot} is not an SVG");
    ensure!(text.contains(plot), "plot path not printed:\n{text}");
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
