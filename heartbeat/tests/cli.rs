//! The `heartbeat` binary's offline commands (no root, no namespace).

use std::path::PathBuf;
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_heartbeat")
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

const GOOD: &str = "[node]\nid = 1\n\n[[instance]]\nname = \"front\"\ninterface = \"front0\"\nvrid = 51\npriority = 150\nadvert_interval = \"100ms\"\nvirtual_addresses = [\"198.18.0.100/24\"]\n";

#[test]
fn check_accepts_a_good_file_and_exits_zero() {
    let p = scratch("good.toml", GOOD);
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&p)
        .output()
        .expect("run heartbeat");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("{}: ok (1 instances)", p.display()));
}

#[test]
fn check_prints_file_line_col_key_and_exits_nonzero_for_a_bad_file() {
    for (name, text, want) in [
        (
            "range.toml",
            GOOD.replace("vrid = 51", "vrid = 256"),
            ":7:8: instance[0].vrid: 256 is outside 1..=255",
        ),
        (
            "unknown.toml",
            GOOD.replace("priority = 150", "priority = 150\npriorty = 3"),
            ":9:1: priorty: unknown field `priorty`",
        ),
        (
            "interval.toml",
            GOOD.replace("\"100ms\"", "\"15ms\""),
            ":9:19: instance[0].advert_interval: must be a multiple of 10ms",
        ),
    ] {
        let p = scratch(name, &text);
        let out = Command::new(bin())
            .args(["check", "-c"])
            .arg(&p)
            .output()
            .expect("run heartbeat");
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("{}{want}", p.display())),
            "{name}: {first:?} does not start with {}{want}",
            p.display()
        );
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
    }
}

#[test]
fn check_of_a_missing_file_fails() {
    let out = Command::new(bin())
        .args(["check", "-c", "/nonexistent/heartbeat.toml"])
        .output()
        .expect("run heartbeat");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("/nonexistent/heartbeat.toml:"));
}

#[test]
fn check_accepts_every_example_config() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("configs") {
        let p = e.expect("entry").path();
        let f = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
        if f.starts_with("heartbeat-") && f.ends_with(".toml") {
            let out = Command::new(bin())
                .args(["check", "-c"])
                .arg(&p)
                .output()
                .expect("run");
            assert!(out.status.success(), "{}: {out:?}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2);
}
