//! Every example in `configs/` parses and validates: walking the directory
//! means a new file is covered without touching this test. `heartbeat-*.toml`
//! are configs of the `heartbeat` daemon and are checked by its parser;
//! `agent-*.toml` are `balancer-agent` configs, checked by its parser; all
//! other files are node configs.

use std::path::{Path, PathBuf};

use balancer::Config;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn example_files() -> Vec<PathBuf> {
    let dir = configs_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_validates() {
    let files = example_files();
    assert!(
        !files.is_empty(),
        "no *.toml in {}",
        configs_dir().display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("heartbeat-") {
            if let Err(e) = heartbeat::config::Config::load(file) {
                failures.push(e.to_string());
            }
            continue;
        }
        if name.starts_with("agent-") {
            if let Err(e) = balancer::agent::config::AgentConfig::load(file) {
                failures.push(e.to_string());
            }
            continue;
        }
        match Config::load(file) {
            Ok(config) => assert!(!config.services.is_empty()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "invalid example configs:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_three_single_node_examples_exist_with_their_modes() {
    use balancer::config::Forward;
    let load =
        |name: &str| Config::load(configs_dir().join(name)).unwrap_or_else(|e| panic!("{e}"));
    let methods = |c: &Config| {
        let mut m: Vec<Forward> = c
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.forward))
            .collect();
        m.sort_by_key(|f| f.as_str());
        m.dedup();
        m
    };
    assert_eq!(methods(&load("single-nat.toml")), [Forward::Nat]);
    assert_eq!(methods(&load("single-dr.toml")), [Forward::Dr]);
    assert_eq!(
        methods(&load("single-mixed.toml")),
        [Forward::Local, Forward::Nat]
    );
    for name in ["single-nat.toml", "single-dr.toml", "single-mixed.toml"] {
        let c = load(name);
        assert_eq!(
            c.vips(),
            ["198.18.0.100".parse::<std::net::Ipv4Addr>().expect("ip")]
        );
        assert_eq!(c.node.back_gateway.to_string(), "198.19.0.1/24");
    }
}
