//! NAMESPACED TESTS: need root, iproute2 and nftables (`scripts/deps`).
//! Skipped (with a message) when not run as root.
//!
//! Each test creates its own network namespaces named after the test and
//! the process id, deleted by a `Drop` guard also when the test panics.
//! Leftovers from a killed run: `ip netns list | grep '^bst-'` and
//! `ip netns del NAME`.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use balancer::Config;
use balancer::setup::{Plan, StepState};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (network namespaces, nftables)");
            return;
        }
    };
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
#[track_caller]
fn ip(args: &[&str]) -> String {
    run("ip", args)
}

#[track_caller]
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    fn new(test: &str) -> Netns {
        let name = format!("bst-{test}-{}", std::process::id());
        // A leftover of a killed run with the same pid: start clean.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    #[track_caller]
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that entered this namespace: commands it spawns
    /// and the /proc/sys/net it reads are the namespace's.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // SAFETY: a valid namespace fd; setns only affects this
                // dedicated thread, which ends with the closure.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn example(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name);
    Config::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn sysctl(key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_owned()
}

fn set_sysctl(key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
}

const KEYS: [&str; 4] = [
    "net.ipv4.conf.front0.arp_ignore",
    "net.ipv4.conf.front0.arp_announce",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.lbtun0.rp_filter",
];

/// (address/prefix, label) of every IPv4 address in the namespace.
fn addresses() -> Vec<(String, String)> {
    let out = run("ip", &["-j", "-4", "addr", "show"]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j is JSON");
    let mut found = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            found.push((
                format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]),
                a["label"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    found.sort();
    found
}

fn table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "netdev", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn plan_applies_once_in_a_namespace_and_undo_restores_every_value() {
    require_root!();
    let ns = Netns::new("apply");
    ns.ip(&[
        "link", "add", "front0", "type", "veth", "peer", "name", "fpeer",
    ]);
    ns.ip(&[
        "link", "add", "back0", "type", "veth", "peer", "name", "bpeer",
    ]);
    let config = example("single-mixed.toml");
    let plan = Plan::for_config(&config);

    ns.run(|| {
        // Values different from what the plan sets, to see them restored.
        set_sysctl("net.ipv4.conf.all.rp_filter", "2");
        set_sysctl("net.ipv4.conf.front0.arp_announce", "1");
        let before_addrs = addresses();
        let before: Vec<String> = KEYS[..3].iter().map(|k| sysctl(k)).collect();

        // The TUN does not exist yet: its step is deferred, not failed.
        let states = plan.check().expect("check");
        assert!(
            states
                .iter()
                .any(|s| matches!(s, StepState::Deferred { .. })),
            "{states:?}"
        );
        let first = plan.apply().expect("apply");
        assert!(!first.is_empty());

        let addrs = addresses();
        assert!(
            addrs.contains(&("198.18.0.100/32".into(), "front0:0".into())),
            "{addrs:?}"
        );
        assert!(
            addrs.contains(&("198.19.0.1/24".into(), "back0:0".into())),
            "{addrs:?}"
        );
        assert!(table_exists("balancer_lb1"));
        assert_eq!(sysctl(KEYS[0]), "1");
        assert_eq!(sysctl(KEYS[1]), "2");
        assert_eq!(sysctl(KEYS[2]), "0");

        // Idempotent: a second apply changes nothing.
        assert!(plan.apply().expect("apply again").is_empty());

        // What `run` does: create the TUN, then apply; only its step runs.
        run("ip", &["tuntap", "add", "dev", "lbtun0", "mode", "tun"]);
        set_sysctl(KEYS[3], "1");
        let second = plan.apply().expect("apply with the TUN");
        assert_eq!(second.changes.len(), 1, "{:?}", second.changes);
        assert_eq!(sysctl(KEYS[3]), "0");

        second.undo().expect("undo the TUN step");
        assert_eq!(sysctl(KEYS[3]), "1");
        first.undo().expect("undo");
        let after: Vec<String> = KEYS[..3].iter().map(|k| sysctl(k)).collect();
        assert_eq!(after, before);
        assert_eq!(addresses(), before_addrs);
        assert!(!table_exists("balancer_lb1"));
    });
}

#[test]
fn kernel_neither_answers_arp_nor_resets_for_the_vip_after_setup() {
    require_root!();
    let node = Netns::new("quiet-node");
    let client = Netns::new("quiet-client");
    node.ip(&[
        "link", "add", "front0", "type", "veth", "peer", "name", "cl0",
    ]);
    node.ip(&[
        "link", "add", "back0", "type", "veth", "peer", "name", "bpeer",
    ]);
    node.ip(&["link", "set", "cl0", "netns", &client.name]);
    node.ip(&["addr", "add", "198.18.0.2/24", "dev", "front0"]);
    for dev in ["front0", "back0", "bpeer"] {
        node.ip(&["link", "set", dev, "up"]);
    }
    client.ip(&["addr", "add", "198.18.0.1/24", "dev", "cl0"]);
    client.ip(&["link", "set", "cl0", "up"]);
    let vip = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 100), 80));
    let connect = || client.run(|| TcpStream::connect_timeout(&vip, Duration::from_millis(1500)));

    let plan = Plan::for_config(&example("single-nat.toml"));
    // Control: with the alias but without the filter, the kernel answers
    // ARP for the VIP and refuses the connection with a RST.
    node.ip(&["addr", "add", "198.18.0.100/32", "dev", "front0"]);
    let refused = connect().expect_err("nothing listens on the node");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    node.ip(&["addr", "del", "198.18.0.100/32", "dev", "front0"]);
    client.ip(&["neigh", "flush", "dev", "cl0"]);

    let applied = node.run(|| plan.apply()).expect("apply");
    let err = connect().expect_err("no answer from the node's kernel");
    assert_ne!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the kernel sent a RST: {err}"
    );
    // No ARP reply either: the client never learnt the VIP's MAC.
    let neigh = client.ip(&["-j", "neigh", "show", "198.18.0.100", "dev", "cl0"]);
    assert!(
        !neigh.contains("lladdr"),
        "the kernel answered ARP for the VIP: {neigh}"
    );
    node.run(|| applied.undo()).expect("undo");
}

#[test]
fn setup_cli_applies_once_and_undoes_from_its_record() {
    require_root!();
    let ns = Netns::new("cli");
    ns.ip(&[
        "link", "add", "front0", "type", "veth", "peer", "name", "fpeer",
    ]);
    ns.ip(&[
        "link", "add", "back0", "type", "veth", "peer", "name", "bpeer",
    ]);
    let dir = std::env::temp_dir().join(format!("balancer-setup-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveDir(dir.clone());
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/single-dr.toml"),
    )
    .expect("example");
    let text = text.replace(
        "/run/balancer/lb1.sock",
        &dir.join("lb1.sock").display().to_string(),
    );
    let config = dir.join("lb1.toml");
    std::fs::write(&config, text).expect("write config");
    let config = config.display().to_string();

    let cli = |args: &[&str]| {
        let mut all = vec![
            "netns",
            "exec",
            ns.name.as_str(),
            env!("CARGO_BIN_EXE_balancer"),
        ];
        all.extend_from_slice(args);
        ip(&all)
    };
    let before = ns.run(|| {
        (
            KEYS[..3].iter().map(|k| sysctl(k)).collect::<Vec<_>>(),
            addresses(),
        )
    });

    let out = cli(&["setup", "-c", &config, "--apply"]);
    assert!(
        out.contains("changed:    198.18.0.100/32 added to front0"),
        "{out}"
    );
    assert!(dir.join("setup-lb1.json").exists());
    let out = cli(&["setup", "-c", &config, "--apply"]);
    assert!(out.contains("nothing changed"), "{out}");
    let out = cli(&["setup", "-c", &config, "--undo"]);
    assert!(
        out.contains("undone:     nft delete table netdev balancer_lb1"),
        "{out}"
    );
    let out = cli(&["setup", "-c", &config, "--undo"]);
    assert!(out.contains("nothing to undo"), "{out}");

    let after = ns.run(|| {
        (
            KEYS[..3].iter().map(|k| sysctl(k)).collect::<Vec<_>>(),
            addresses(),
        )
    });
    assert_eq!(after, before);
    assert!(!dir.join("setup-lb1.json").exists());
}
