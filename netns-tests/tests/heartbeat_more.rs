//! More network-namespace tests of the standalone `heartbeat` daemon (need
//! root): what `heartbeat.rs` does not cover end to end — sync groups,
//! tracked interfaces and scripts, notify arguments, unicast peers, the
//! status table, ARP with a non-interface MAC, and CPU load.
//!
//! Run: `cargo build --workspace && cargo test -p netns-tests --test heartbeat_more -- --test-threads=2`
//! The 5-minute CPU-load run is ignored by default:
//! `cargo test -p netns-tests --test heartbeat_more -- --ignored --nocapture no_false_failover_5min`
//! The CPU-load runs use the default `node.realtime = true` (SCHED_FIFO for
//! the protocol thread when allowed); `HB_LOAD_REALTIME=0` runs them with
//! the protocol thread at normal priority.
//! Every test builds its own testbed (`topo::Testbed`), removed on drop.
//! Timing bounds are generous (shared, noisy machine); figures are printed
//! (`--nocapture`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netns_tests::topo::{Bridge, Host, Proc, Testbed, workspace_bin};
use nix::sys::signal::Signal;
use serde_json::Value;

const VIP: &str = "198.18.0.100";
const BACK_VIP: &str = "198.19.0.1";

/// One of our daemons in a host namespace.
struct Hb {
    id: u32,
    host: Host,
    cfg: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Hb {
    /// Writes `hb<id>.toml`: `[node]`, `[control]`, then `body`.
    fn new(tb: &Testbed, host: &Host, id: u32, body: &str) -> Result<Hb> {
        let dir = tb.dir();
        let sock = dir.join(format!("hb{id}.sock"));
        let cfg = dir.join(format!("hb{id}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[node]\nid = {id}\nname = \"lb{id}\"\n[control]\nsocket = \"{}\"\n{body}",
                sock.display()
            ),
        )?;
        Ok(Hb {
            id,
            host: host.clone(),
            cfg,
            sock,
            log: dir.join(format!("lb{id}.log")),
            proc: None,
        })
    }

    /// Starts the daemon, under `taskset -c CPU` if `cpu` is set.
    fn start(&mut self, cpu: Option<usize>) -> Result<()> {
        let b = workspace_bin("heartbeat")?.display().to_string();
        let cfg = self.cfg.display().to_string();
        let cpu = cpu.map(|c| c.to_string());
        let mut argv: Vec<&str> = Vec::new();
        if let Some(c) = &cpu {
            argv.extend(["taskset", "-c", c]);
        }
        argv.extend([b.as_str(), "run", "-c", &cfg]);
        self.proc = Some(self.host.spawn_logged(&argv, Some(&self.log))?);
        Ok(())
    }

    fn status(&self) -> Option<Value> {
        let line = heartbeat::control::query(&self.sock, "status").ok()?;
        serde_json::from_str(&line).ok()
    }

    fn inst(&self, name: &str) -> Option<Value> {
        let s = self.status()?;
        s["instances"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
    }

    fn state(&self, name: &str) -> Option<String> {
        self.inst(name)
            .and_then(|i| i["state"].as_str().map(str::to_string))
    }

    fn is(&self, name: &str, want: &str) -> bool {
        self.state(name).as_deref() == Some(want)
    }

    fn has_addr(&self, dev: &str, addr: &str) -> bool {
        self.host
            .run(&["ip", "-4", "-o", "addr", "show", "dev", dev])
            .map(|s| s.contains(&format!("{addr}/")))
            .unwrap_or(false)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn states(nodes: &[&Hb], inst: &str) -> Vec<Option<String>> {
    nodes.iter().map(|n| n.state(inst)).collect()
}

/// Two hosts lb1 (198.18.0.11) and lb2 (.12) and a client (.2) on `front`.
struct Two {
    tb: Testbed,
    front: Bridge,
    client: Host,
    h: [Host; 2],
}

fn two(tag: &str) -> Result<Two> {
    let tb = Testbed::new(tag)?;
    let front = tb.bridge("front")?;
    let client = tb.host("client")?;
    tb.link(&client, "front0", &front, &["198.18.0.2/24"])?;
    let h1 = tb.host("lb1")?;
    tb.link(&h1, "front0", &front, &["198.18.0.11/24"])?;
    let h2 = tb.host("lb2")?;
    tb.link(&h2, "front0", &front, &["198.18.0.12/24"])?;
    Ok(Two {
        tb,
        front,
        client,
        h: [h1, h2],
    })
}

fn front_instance(prio: u8, extra: &str) -> String {
    format!(
        "[[instance]]\nname = \"front\"\ninterface = \"front0\"\nvrid = 51\npriority = {prio}\n\
         advert_interval = \"100ms\"\nvirtual_addresses = [\"{VIP}/24\"]\n\
         garp = {{ repeat = 2, interval = \"10ms\", master_delay = \"0s\" }}\n{extra}"
    )
}

/// A notify script that appends its arguments, `|`-separated, to `<path>.log`.
/// The daemon runs the group's and the instances' scripts concurrently, so the
/// line is built first and appended with one write: field by field, two runs'
/// lines interleaved ("INSTANCE|GROUP|front|lb|...").
fn notify_script(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(
        &p,
        "#!/bin/sh\nline=\nfor a in \"$@\"; do line=\"$line$a|\"; done\nprintf '%s\\n' \"$line\" >> \"$0.log\"\n",
    )?;
    std::process::Command::new("chmod")
        .args(["+x", &p.display().to_string()])
        .status()?;
    Ok(p)
}

fn read_log(script: &Path) -> String {
    std::fs::read_to_string(format!("{}.log", script.display())).unwrap_or_default()
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

fn converge(nodes: &[&Hb], inst: &str, master: usize) -> Result<()> {
    let ok = wait(Duration::from_secs(10), || {
        nodes
            .iter()
            .enumerate()
            .all(|(i, n)| n.is(inst, if i == master { "Master" } else { "Backup" }))
    });
    if ok.is_none() {
        bail!(
            "{inst}: no convergence to lb{} master: {:?}\n{}",
            master + 1,
            states(nodes, inst),
            nodes
                .iter()
                .map(|n| n.log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    Ok(())
}

/// Sync group: the master's front link is unplugged; its back instance
/// (link still up) follows front into Fault and the peer takes both. Notify
/// scripts see keepalived's argument order (`INSTANCE|GROUP name state
/// priority`), the per-state `master` script runs, and `heartbeat status`
/// prints the table.
#[test]
fn sync_group_back_follows_front_when_front_link_unplugged() -> Result<()> {
    let t = two("hb-sync")?;
    let back = t.tb.bridge("back")?;
    t.tb.link(&t.h[0], "back0", &back, &["198.19.0.11/24"])?;
    t.tb.link(&t.h[1], "back0", &back, &["198.19.0.12/24"])?;
    let dir = t.tb.dir();
    let mut nodes = Vec::new();
    let mut scripts = Vec::new();
    for (i, prio) in [(0usize, 150u8), (1, 100)] {
        let any = notify_script(dir, &format!("notify-lb{}.sh", i + 1))?;
        let master = notify_script(dir, &format!("master-lb{}.sh", i + 1))?;
        let notify = format!(
            "notify = {{ any = \"{}\", master = \"{}\" }}\n",
            any.display(),
            master.display()
        );
        let body = format!(
            "{}\n[[instance]]\nname = \"back\"\ninterface = \"back0\"\nvrid = 52\npriority = {prio}\n\
             advert_interval = \"100ms\"\nvirtual_addresses = [\"{BACK_VIP}/24\"]\n{notify}\n\
             [[sync_group]]\nname = \"lb\"\nmembers = [\"front\", \"back\"]\nnotify = {{ any = \"{}\" }}\n",
            front_instance(prio, &notify),
            any.display()
        );
        let mut n = Hb::new(&t.tb, &t.h[i], i as u32 + 1, &body)?;
        n.start(None)?;
        nodes.push(n);
        scripts.push((any, master));
    }
    let refs: Vec<&Hb> = nodes.iter().collect();
    converge(&refs, "front", 0)?;
    converge(&refs, "back", 0)?;
    wait(Duration::from_secs(3), || {
        nodes[0].has_addr("front0", VIP) && nodes[0].has_addr("back0", BACK_VIP)
    })
    .context("VIPs on lb1")?;

    // `heartbeat status` prints a table with both instances.
    let bin = workspace_bin("heartbeat")?;
    let out = std::process::Command::new(&bin)
        .args(["status", "-s", &nodes[0].sock.display().to_string()])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "status failed: {out:?}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("node 1 (lb1)")),
        "{table}"
    );
    let header: Vec<&str> = lines
        .get(1)
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        header,
        [
            "instance", "iface", "vrid", "state", "prio", "base", "master", "sent", "recv",
            "trans", "maxgap", "drops"
        ],
        "{table}"
    );
    for (name, iface, vrid, master) in [
        ("front", "front0", "51", "198.18.0.11"),
        ("back", "back0", "52", "198.19.0.11"),
    ] {
        let row: Vec<&str> = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().collect())
            .with_context(|| format!("no row for {name}:\n{table}"))?;
        assert_eq!(
            row[..7],
            [name, iface, vrid, "Master", "150", "150", master][..],
            "{table}"
        );
    }

    // Unplug lb1's front cable; back0 stays up.
    t.tb.unplug(&nodes[0].host, "front0")?;
    let took = wait(Duration::from_secs(5), || {
        nodes[1].is("front", "Master") && nodes[1].is("back", "Master")
    })
    .with_context(|| {
        format!(
            "lb2 did not take both: front {:?} back {:?}",
            states(&refs, "front"),
            states(&refs, "back")
        )
    })?;
    println!("FIGURE sync group: lb2 master of both after {took:?}");
    wait(Duration::from_secs(2), || {
        nodes[0].is("front", "Fault") && nodes[0].is("back", "Fault")
    })
    .with_context(|| format!("lb1 not all Fault: {:?}", nodes[0].status()))?;
    let back0 = nodes[0].host.run(&["ip", "-o", "link", "show", "back0"])?;
    assert!(
        back0.contains("LOWER_UP"),
        "back0 must still be up: {back0}"
    );
    wait(Duration::from_secs(2), || {
        !nodes[0].has_addr("back0", BACK_VIP)
    })
    .context("lb1 kept the back VIP")?;
    wait(Duration::from_secs(2), || {
        nodes[1].has_addr("back0", BACK_VIP)
    })
    .context("lb2 lacks the back VIP")?;

    // Notify lines, keepalived's order: INSTANCE|GROUP, name, state, priority.
    let l1 = read_log(&scripts[0].0);
    for want in [
        "INSTANCE|front|MASTER|150|",
        "INSTANCE|back|MASTER|150|",
        "GROUP|lb|MASTER|150|",
        "INSTANCE|front|FAULT|150|",
        "INSTANCE|back|FAULT|150|",
        "GROUP|lb|FAULT|150|",
    ] {
        assert!(has_line(&l1, want), "lb1 notify lacks {want:?}:\n{l1}");
    }
    let l2 = read_log(&scripts[1].0);
    for want in [
        "INSTANCE|front|BACKUP|100|",
        "GROUP|lb|BACKUP|100|",
        "INSTANCE|front|MASTER|100|",
        "GROUP|lb|MASTER|100|",
    ] {
        assert!(has_line(&l2, want), "lb2 notify lacks {want:?}:\n{l2}");
    }
    // notify_master (keepalived: no arguments appended), once per instance.
    let m1 = read_log(&scripts[0].1);
    assert_eq!(
        m1.lines().filter(|l| l.is_empty()).count(),
        2,
        "master script runs:\n{m1}"
    );

    // Plug back: lb1 (preempt, higher) takes both back.
    t.tb.plug(&nodes[0].host, "front0")?;
    wait(Duration::from_secs(5), || {
        nodes[0].is("front", "Master")
            && nodes[0].is("back", "Master")
            && nodes[1].is("front", "Backup")
            && nodes[1].is("back", "Backup")
    })
    .with_context(|| {
        format!(
            "no recovery: {:?} {:?}",
            states(&refs, "front"),
            states(&refs, "back")
        )
    })?;
    Ok(())
}

/// A tracked interface (not the VRRP one) losing carrier sends the node to
/// Fault; the peer takes over; carrier back, the node preempts again.
#[test]
fn tracked_interface_unplugged_sends_node_to_fault() -> Result<()> {
    let t = two("hb-trackif")?;
    let mon = t.tb.bridge("mon")?;
    t.tb.link(&t.h[0], "mon0", &mon, &["10.9.0.1/24"])?;
    let mut n1 = Hb::new(
        &t.tb,
        &t.h[0],
        1,
        &front_instance(150, "track_interfaces = [\"mon0\"]\n"),
    )?;
    let mut n2 = Hb::new(&t.tb, &t.h[1], 2, &front_instance(100, ""))?;
    n1.start(None)?;
    n2.start(None)?;
    converge(&[&n1, &n2], "front", 0)?;
    t.tb.unplug(&n1.host, "mon0")?;
    wait(Duration::from_secs(5), || {
        n1.is("front", "Fault") && n2.is("front", "Master")
    })
    .with_context(|| format!("no fault/takeover: {:?}", states(&[&n1, &n2], "front")))?;
    let front0 = n1.host.run(&["ip", "-o", "link", "show", "front0"])?;
    assert!(
        front0.contains("LOWER_UP"),
        "front0 must still be up: {front0}"
    );
    wait(Duration::from_secs(2), || !n1.has_addr("front0", VIP))
        .context("lb1 kept the VIP in Fault")?;
    t.tb.plug(&n1.host, "mon0")?;
    wait(Duration::from_secs(5), || {
        n1.is("front", "Master") && n2.is("front", "Backup")
    })
    .with_context(|| format!("no recovery: {:?}", states(&[&n1, &n2], "front")))?;
    Ok(())
}

/// A failing tracked script with a negative weight lowers the master's
/// priority below the peer's: the peer preempts; the node is Backup, not
/// Fault. The script succeeding again restores the priority and mastership.
#[test]
fn failing_tracked_script_lowers_priority_so_peer_preempts() -> Result<()> {
    let t = two("hb-trackscript")?;
    let flag = t.tb.dir().join("service-down");
    let script = format!(
        "[[script]]\nname = \"svc\"\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e {}\"]\n\
         interval = \"100ms\"\ntimeout = \"1s\"\nweight = -60\nfall = 2\nrise = 2\n",
        flag.display()
    );
    let mut n1 = Hb::new(
        &t.tb,
        &t.h[0],
        1,
        &format!(
            "{script}{}",
            front_instance(150, "track_scripts = [\"svc\"]\n")
        ),
    )?;
    let mut n2 = Hb::new(&t.tb, &t.h[1], 2, &front_instance(100, ""))?;
    n1.start(None)?;
    n2.start(None)?;
    converge(&[&n1, &n2], "front", 0)?;
    std::fs::write(&flag, "")?;
    let took = wait(Duration::from_secs(8), || {
        n2.is("front", "Master") && n1.is("front", "Backup")
    })
    .with_context(|| format!("no preempt by lb2: {:?}", states(&[&n1, &n2], "front")))?;
    println!("FIGURE tracked script failure -> peer master after {took:?}");
    let i1 = n1.inst("front").context("status")?;
    assert_eq!(
        (i1["priority"].as_u64(), i1["base_priority"].as_u64()),
        (Some(90), Some(150)),
        "{i1}"
    );
    assert_eq!(n2.inst("front").context("status")?["master"], "198.18.0.12");
    std::fs::remove_file(&flag)?;
    wait(Duration::from_secs(8), || {
        n1.is("front", "Master") && n2.is("front", "Backup")
    })
    .with_context(|| format!("no recovery: {:?}", states(&[&n1, &n2], "front")))?;
    assert_eq!(n1.inst("front").context("status")?["priority"], 150);
    Ok(())
}

/// Unicast peers on a segment that drops all multicast: VRRP election and
/// membership both work over the peer list; the master's death is seen.
#[test]
fn unicast_peers_elect_and_see_members_without_multicast() -> Result<()> {
    let t = two("hb-unicast")?;
    // The switch drops every IPv4 multicast frame on this segment.
    let rules = "table bridge nomcast {\n chain forward { type filter hook forward priority 0; ip daddr 224.0.0.0/4 counter drop; }\n}\n";
    t.tb.switch()
        .run(&["sh", "-c", &format!("printf '{rules}' | nft -f -")])?;
    let body = |prio: u8, peer: &str| {
        format!(
            "{}unicast_peers = [\"{peer}\"]\n\n[membership]\ninterface = \"front0\"\npeers = [\"{peer}\"]\n\
             nodes = [1, 2]\ninterval = \"100ms\"\nkey = \"0123456789abcdef0123\"\n",
            front_instance(prio, "")
        )
    };
    let mut n1 = Hb::new(&t.tb, &t.h[0], 1, &body(150, "198.18.0.12"))?;
    let mut n2 = Hb::new(&t.tb, &t.h[1], 2, &body(100, "198.18.0.11"))?;
    n1.start(None)?;
    n2.start(None)?;
    // Without working unicast, both would be Master.
    converge(&[&n1, &n2], "front", 0)?;
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        states(&[&n1, &n2], "front"),
        [Some("Master".into()), Some("Backup".into())]
    );
    assert_eq!(n2.inst("front").context("status")?["master"], "198.18.0.11");
    for n in [&n1, &n2] {
        wait(Duration::from_secs(3), || {
            n.status()
                .is_some_and(|s| s["live"] == serde_json::json!([1, 2]))
        })
        .with_context(|| format!("lb{} does not see both alive: {:?}", n.id, n.status()))?;
    }
    // The multicast drop rule is in place (checks the test, not the daemon).
    let fwd =
        t.tb.switch()
            .run(&["nft", "list", "table", "bridge", "nomcast"])?;
    assert!(fwd.contains("224.0.0.0/4") && fwd.contains("drop"), "{fwd}");
    if let Some(p) = &n1.proc {
        p.signal(Signal::SIGKILL)?;
    }
    wait(Duration::from_secs(5), || {
        n2.is("front", "Master")
            && n2
                .status()
                .is_some_and(|s| s["live"] == serde_json::json!([2]))
    })
    .with_context(|| format!("lb2 did not take over / see lb1 dead: {:?}", n2.status()))?;
    Ok(())
}

/// `arp_mac = "vrrp"`: the client resolves the VIP to 00:00:5e:00:01:33,
/// never to the master's interface MAC (the kernel is kept quiet by the
/// daemon's nftables table, removed again on exit).
#[test]
fn vrrp_mac_vip_resolves_to_virtual_mac_not_interface_mac() -> Result<()> {
    let t = two("hb-vmac")?;
    let mut n1 = Hb::new(
        &t.tb,
        &t.h[0],
        1,
        &front_instance(150, "arp_mac = \"vrrp\"\n"),
    )?;
    let mut n2 = Hb::new(
        &t.tb,
        &t.h[1],
        2,
        &front_instance(100, "arp_mac = \"vrrp\"\n"),
    )?;
    let cap = t.tb.dir().join("arp.pcap");
    let mut tcpdump = t.client.spawn(&[
        "tcpdump",
        "-i",
        "front0",
        "-U",
        "-nn",
        "-w",
        &cap.display().to_string(),
        "arp",
    ])?;
    std::thread::sleep(Duration::from_millis(500));
    n1.start(None)?;
    n2.start(None)?;
    converge(&[&n1, &n2], "front", 0)?;
    wait(Duration::from_secs(3), || n1.has_addr("front0", VIP)).context("VIP alias on lb1")?;
    let tables = n1.host.run(&["nft", "list", "tables"])?;
    assert!(
        tables.contains("arp heartbeat_1"),
        "no kernel-ARP table: {tables}"
    );
    // The client asks (the ping itself need not succeed: frames to the
    // virtual MAC are not the host's own).
    let _ = t.client.output(&["ping", "-c1", "-W1", VIP]);
    let vmac = "00:00:5e:00:01:33";
    wait(Duration::from_secs(3), || {
        t.client
            .run(&["ip", "neigh", "show", VIP, "dev", "front0"])
            .is_ok_and(|s| s.contains(vmac))
    })
    .with_context(|| {
        format!(
            "client neighbour entry: {:?}\nlb1 log:\n{}",
            t.client.run(&["ip", "neigh", "show", VIP]),
            n1.log_text()
        )
    })?;
    // Asking again does not flip it (the kernel's reply would be first).
    t.client.run(&["ip", "neigh", "flush", "dev", "front0"])?;
    let _ = t.client.output(&["ping", "-c1", "-W1", VIP]);
    std::thread::sleep(Duration::from_millis(300));
    let neigh = t
        .client
        .run(&["ip", "neigh", "show", VIP, "dev", "front0"])?;
    assert!(neigh.contains(vmac), "after re-resolution: {neigh}");
    tcpdump.signal(Signal::SIGINT)?;
    let _ = tcpdump.wait_timeout(Duration::from_secs(3));
    let dump = t
        .client
        .run(&["tcpdump", "-r", &cap.display().to_string(), "-nn", "-e"])?;
    let mac1 = n1.host.mac("front0")?;
    let replies: Vec<&str> = dump
        .lines()
        .filter(|l| l.contains(&format!("Reply {VIP} is-at")))
        .collect();
    assert!(replies.len() >= 2, "expected our replies:\n{dump}");
    assert!(
        replies.iter().all(|l| l.contains(&format!("is-at {vmac}"))),
        "a reply with another MAC (kernel's {mac1}?):\n{dump}"
    );
    // No request from the kernel names the VIP as its sender (only our
    // gratuitous ARPs, "who-has VIP tell VIP", carry it, with the virtual MAC).
    assert!(
        !dump
            .lines()
            .any(|l| l.contains(&format!("tell {VIP}")) && !l.contains(&format!("who-has {VIP}"))),
        "kernel request sourced from the VIP:\n{dump}"
    );
    // Exit removes the table.
    if let Some(mut p) = n1.proc.take() {
        p.signal(Signal::SIGTERM)?;
        let st = p.wait_timeout(Duration::from_secs(5))?;
        assert!(st.is_some_and(|s| s.success()), "lb1 exit: {st:?}");
    }
    let tables = n1.host.run(&["nft", "list", "tables"])?;
    assert!(
        !tables.contains("heartbeat_1"),
        "table left behind: {tables}"
    );
    let _ = &t.front;
    Ok(())
}

/// Spins on `cpu` until `stop` or `until`, whichever first.
/// Returns whether the thread could be pinned.
fn busy(cpu: usize, until: Instant, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut set = nix::sched::CpuSet::new();
        let pinned = set.set(cpu).is_ok()
            && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_ok();
        let mut n: u64 = 0;
        while pinned && Instant::now() < until && !stop.load(Ordering::Relaxed) {
            for _ in 0..10_000 {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        pinned
    })
}

struct LoadFigures {
    transitions: [u64; 2],
    received: u64,
    max_gap_ms: f64,
}

/// Two nodes at 100 ms adverts, each pinned to a CPU of `pins`; busy loops
/// pinned to every CPU of `load` for `dur`. The transition counters of both
/// nodes must not move from their converged values.
fn cpu_load_run(tag: &str, dur: Duration, pins: [usize; 2], load: &[usize]) -> Result<LoadFigures> {
    let t = two(tag)?;
    let realtime = std::env::var("HB_LOAD_REALTIME").map_or(true, |v| v != "0");
    let mk = |i: usize, prio: u8| -> Result<Hb> {
        let n = Hb::new(&t.tb, &t.h[i], i as u32 + 1, &front_instance(prio, ""))?;
        if !realtime {
            let text = std::fs::read_to_string(&n.cfg)?;
            std::fs::write(
                &n.cfg,
                text.replacen("[node]\n", "[node]\nrealtime = false\n", 1),
            )?;
        }
        Ok(n)
    };
    let mut n1 = mk(0, 150)?;
    let mut n2 = mk(1, 100)?;
    n1.start(Some(pins[0]))?;
    n2.start(Some(pins[1]))?;
    converge(&[&n1, &n2], "front", 0)?;
    std::thread::sleep(Duration::from_millis(500));
    let snap = |n: &Hb| -> Result<Value> { n.inst("front").context("status") };
    let (a1, a2) = (snap(&n1)?, snap(&n2)?);
    let tr0 = [
        a1["transitions"].as_u64().unwrap_or(u64::MAX),
        a2["transitions"].as_u64().unwrap_or(u64::MAX),
    ];
    // Init -> Backup -> Master, and Init -> Backup.
    assert_eq!(tr0, [2, 1], "converged transitions");
    let rx0 = a2["adverts_received"].as_u64().unwrap_or(0);
    let gap0 = a2["max_advert_gap_us"].as_u64().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + dur;
    let spinners: Vec<_> = load.iter().map(|&c| busy(c, until, stop.clone())).collect();
    let mut moved = None;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(1));
        let tr = [
            n1.inst("front")
                .map(|i| i["transitions"].as_u64().unwrap_or(0)),
            n2.inst("front")
                .map(|i| i["transitions"].as_u64().unwrap_or(0)),
        ];
        if tr != [Some(tr0[0]), Some(tr0[1])] {
            moved = Some(tr);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for (s, cpu) in spinners.into_iter().zip(load) {
        assert!(
            s.join().unwrap_or(false),
            "busy loop could not be pinned to cpu {cpu}"
        );
    }
    let (b1, b2) = (snap(&n1)?, snap(&n2)?);
    let figures = LoadFigures {
        transitions: [
            b1["transitions"].as_u64().unwrap_or(0),
            b2["transitions"].as_u64().unwrap_or(0),
        ],
        received: b2["adverts_received"].as_u64().unwrap_or(0) - rx0,
        max_gap_ms: b2["max_advert_gap_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
    };
    let rt = if n1.log_text().contains("SCHED_FIFO 10") {
        "SCHED_FIFO"
    } else {
        "normal"
    };
    println!(
        "FIGURE cpu load {tag} {:?} pins {pins:?} load {load:?} realtime={realtime} ({rt}): \
         transitions {:?} (converged {tr0:?}), lb2 received {} adverts, max advert gap {:.1} ms (before load {:.1} ms)",
        dur,
        figures.transitions,
        figures.received,
        figures.max_gap_ms,
        gap0 as f64 / 1000.0
    );
    assert!(
        moved.is_none() && figures.transitions == tr0,
        "false failover under load: {moved:?} {b1} {b2}"
    );
    assert_eq!(
        (b1["state"].as_str(), b2["state"].as_str()),
        (Some("Master"), Some("Backup"))
    );
    // Adverts kept flowing (10/s); half is a generous floor.
    let expect = dur.as_secs() * 10;
    assert!(
        figures.received >= expect / 2,
        "only {} adverts in {dur:?}",
        figures.received
    );
    Ok(figures)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Short, always-on: every CPU busy (up to two), one node per CPU.
#[test]
fn no_false_failover_30s_with_both_cores_busy() -> Result<()> {
    let n = cpus();
    let (a, b) = (0, 1 % n);
    let load: Vec<usize> = if a == b { vec![a] } else { vec![a, b] };
    cpu_load_run("hb-load30", Duration::from_secs(30), [a, b], &load)?;
    Ok(())
}

/// The issue's figure: 5 minutes, one core saturated, both nodes pinned to
/// that core. Ignored by default (too long for CI).
#[test]
#[ignore]
fn no_false_failover_5min_one_core_saturated() -> Result<()> {
    cpu_load_run("hb-load300", Duration::from_secs(300), [0, 0], &[0])?;
    Ok(())
}
