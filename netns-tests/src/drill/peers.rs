//! The clusters a drill runs against, behind one trait: ours (`balancer
//! run` in cluster mode on every node) and the baseline of BENCH.md —
//! keepalived 2.2.7 (VRRPv3) electing the VIP holder, nftables DNAT
//! (`numgen inc mod N`) to the real servers on every node, masquerade on
//! the back NIC so replies return to the node that translated them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::topology::{Cluster, RS_PORT, VIP, VIP_PORT, has_addr, rs_addr};
use crate::topo::Proc;

/// A cluster implementation under drill.
pub trait Peer {
    /// Short name for reports: `ours`, `keepalived`.
    fn name(&self) -> &'static str;
    /// Prepares the fresh topology (configs, kernel setup); nothing runs yet.
    fn setup(&mut self, c: &Cluster) -> Result<()>;
    /// Starts node `i`'s daemon(s).
    fn start(&mut self, c: &Cluster, i: usize) -> Result<()>;
    /// SIGKILL of node `i`'s daemon(s): no goodbye of any kind.
    fn kill(&mut self, c: &Cluster, i: usize) -> Result<()>;
    /// SIGTERM of node `i`'s daemon(s); returns once they exited.
    fn stop(&mut self, c: &Cluster, i: usize) -> Result<()>;
    /// Which nodes claim the VIP (the MAC holder, or holders in a split brain).
    fn holders(&self, c: &Cluster) -> Vec<usize>;
    /// Every running node agrees on the membership (nothing to wait for
    /// when the peer has no membership).
    fn settled(&self, _c: &Cluster) -> bool {
        true
    }
    /// Ends everything it started (before the topology is removed).
    fn teardown(&mut self, c: &Cluster);
    /// Where node `i`'s logs are.
    fn log(&self, c: &Cluster, i: usize) -> PathBuf;
    /// Saves whatever the running nodes can tell about themselves (status,
    /// counters) next to their logs, for post-mortems. Best effort.
    fn snapshot(&self, _c: &Cluster, _label: &str) {}
}

/// Master-down interval of RFC 5798 §6.1 for `priority` at `advert`:
/// 3 x interval + skew, skew = (256 - priority) x interval / 256.
pub fn master_down(advert: Duration, priority: u8) -> Duration {
    advert * 3 + advert * (256 - u32::from(priority)) / 256
}

/// VRRP priorities by node: lb1 150, lb2 100 (BENCH.md), lb3 50.
pub fn priority(i: usize) -> u8 {
    match i {
        0 => 150,
        1 => 100,
        _ => 50,
    }
}

/// keepalived 2.2.7 + nftables, as measured in BENCH.md.
pub struct Keepalived {
    pub advert: Duration,
    procs: Vec<Option<Proc>>,
}

impl Keepalived {
    pub fn new(advert: Duration) -> Keepalived {
        Keepalived {
            advert,
            procs: Vec::new(),
        }
    }

    fn file(c: &Cluster, i: usize, what: &str) -> PathBuf {
        c.tb().dir().join(format!("ka-lb{}.{what}", i + 1))
    }

    /// keepalived's `advert_int` in seconds (VRRPv3: centisecond units).
    fn advert_int(&self) -> String {
        format!("{}", self.advert.as_secs_f64())
    }

    fn config(&self, c: &Cluster, i: usize) -> String {
        format!(
            "global_defs {{\n router_id drill_lb{n}\n vrrp_version 3\n script_user root\n enable_script_security\n}}\n\
             vrrp_instance VI_front {{\n state BACKUP\n interface front0\n virtual_router_id 51\n priority {prio}\n advert_int {adv}\n\
             notify \"{notify} lb{n}\"\n virtual_ipaddress {{\n  {VIP}/24 dev front0 label front0:0\n }}\n}}\n",
            n = i + 1,
            prio = priority(i),
            adv = self.advert_int(),
            notify = c.tb().dir().join("ka-notify.sh").display(),
        )
    }

    /// nftables DNAT to the real servers, as BENCH.md's baseline.
    fn nft_rules(rs: usize) -> String {
        let map: Vec<String> = (0..rs).map(|k| format!("{k} : {}", rs_addr(k))).collect();
        format!(
            "table ip drill {{\n chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr {VIP} tcp dport {VIP_PORT} dnat to numgen inc mod {rs} map {{ {} }} : {RS_PORT}\n }}\n \
             chain post {{ type nat hook postrouting priority srcnat; policy accept;\n  oifname \"back0\" masquerade\n }}\n}}\n",
            map.join(", ")
        )
    }

    fn pids(c: &Cluster, i: usize) -> (Option<i32>, Option<i32>) {
        let read = |what: &str| -> Option<i32> {
            std::fs::read_to_string(Self::file(c, i, what))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        (read("pid"), read("vrrp.pid"))
    }
}

impl Peer for Keepalived {
    fn name(&self) -> &'static str {
        "keepalived"
    }

    fn setup(&mut self, c: &Cluster) -> Result<()> {
        let notify = c.tb().dir().join("ka-notify.sh");
        std::fs::write(
            &notify,
            "#!/bin/sh\necho \"$(date +%s.%N) $*\" >> \"$0.log\"\n",
        )?;
        c.tb()
            .switch()
            .run(&["chmod", "+x", &notify.to_string_lossy()])?;
        let rules = Self::nft_rules(c.rs.len());
        for (i, h) in c.nodes.iter().enumerate() {
            h.sysctl("net.ipv4.ip_forward", "1")?;
            for k in ["all", "default", "front0", "back0"] {
                h.sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0")?;
            }
            let f = Self::file(c, i, "nft");
            std::fs::write(&f, &rules)?;
            h.run(&["nft", "-f", &f.to_string_lossy()])?;
            std::fs::write(Self::file(c, i, "conf"), self.config(c, i))?;
        }
        self.procs = (0..c.nodes.len()).map(|_| None).collect();
        Ok(())
    }

    fn start(&mut self, c: &Cluster, i: usize) -> Result<()> {
        for what in ["pid", "vrrp.pid"] {
            let _ = std::fs::remove_file(Self::file(c, i, what));
        }
        let path = |what: &str| Self::file(c, i, what).to_string_lossy().into_owned();
        let p = c.nodes[i].spawn_logged(
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
                "-f",
                &path("conf"),
                "-p",
                &path("pid"),
                "-r",
                &path("vrrp.pid"),
            ],
            Some(&Self::file(c, i, "log")),
        )?;
        self.procs[i] = Some(p);
        // The VRRP child writes its pid file once it runs: the kill drills
        // need it.
        let ok =
            crate::topo::wait_until(Duration::from_secs(5), &mut || Self::pids(c, i).1.is_some());
        if !ok {
            bail!("keepalived on lb{} did not start its VRRP process", i + 1);
        }
        Ok(())
    }

    fn kill(&mut self, c: &Cluster, i: usize) -> Result<()> {
        // keepalived is a parent that respawns its VRRP child, and the child
        // stops cleanly (priority 0) when the parent dies. A SIGKILL of the
        // node's daemon must be neither: freeze the parent, then kill the
        // child, then the parent.
        let (parent, child) = Self::pids(c, i);
        let parent = parent.context("keepalived parent pid")?;
        let child = child.context("keepalived VRRP pid")?;
        kill(Pid::from_raw(parent), Signal::SIGSTOP)?;
        kill(Pid::from_raw(child), Signal::SIGKILL)?;
        kill(Pid::from_raw(parent), Signal::SIGKILL)?;
        if let Some(mut p) = self.procs[i].take() {
            p.kill();
        }
        Ok(())
    }

    fn stop(&mut self, _c: &Cluster, i: usize) -> Result<()> {
        let mut p = self.procs[i]
            .take()
            .with_context(|| format!("keepalived on lb{} not running", i + 1))?;
        p.signal(Signal::SIGTERM)?;
        if p.wait_timeout(Duration::from_secs(10))?.is_none() {
            bail!("keepalived on lb{} ignored SIGTERM for 10 s", i + 1);
        }
        Ok(())
    }

    fn holders(&self, c: &Cluster) -> Vec<usize> {
        (0..c.nodes.len())
            .filter(|&i| has_addr(&c.nodes[i], "front0", VIP))
            .collect()
    }

    fn teardown(&mut self, _c: &Cluster) {
        for p in self.procs.iter_mut() {
            if let Some(mut p) = p.take() {
                p.kill();
            }
        }
    }

    fn log(&self, c: &Cluster, i: usize) -> PathBuf {
        Self::file(c, i, "log")
    }
}

/// Our cluster: `balancer run -c lbK.toml` on every node, the heartbeat
/// embedded (`[cluster]`), configs as the cluster tests write them
/// ([`crate::cluster::ClusterBed::write_configs`]) with the front
/// instance's priorities set to the baseline's (150/100/50), so both
/// peers' master-down intervals are the same.
pub struct Ours {
    pub advert: Duration,
    /// Every node also serves the VIP with its own local service.
    pub local: bool,
    configs: Vec<PathBuf>,
    procs: Vec<Option<Proc>>,
    local_services: Vec<Proc>,
}

impl Ours {
    pub fn new(advert: Duration, local: bool) -> Ours {
        Ours {
            advert,
            local,
            configs: Vec::new(),
            procs: Vec::new(),
            local_services: Vec::new(),
        }
    }

    /// The web service: NAT to every real server, each in the sub-cluster
    /// of the node it routes through; with `local`, each node's own
    /// service too (weight 1, like one real server).
    fn services(&self, c: &Cluster) -> String {
        let n = c.nodes.len();
        let mut backends: Vec<String> = (0..c.rs.len())
            .map(|i| crate::cluster::rs_backend(i + 1, Some(RS_PORT), "nat", i % n + 1))
            .collect();
        if self.local {
            backends.push("name = \"local\"\nforward = \"local\"\n".to_string());
        }
        crate::cluster::web_service(&backends)
    }

    /// The last cluster view node `i` logged (`balancer status` does not
    /// show the cluster yet): the line `cluster view changed live=[1, 2]
    /// mac_holder=true`.
    fn last_view(c: &Cluster, i: usize) -> Option<String> {
        let log = c.tb().dir().join(format!("lb{}.log", i + 1));
        let text = std::fs::read_to_string(log).ok()?;
        text.lines()
            .rev()
            .find(|l| l.contains("cluster view changed"))
            .map(str::to_string)
    }

    fn running(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| self.procs[i].is_some())
            .collect()
    }
}

impl Peer for Ours {
    fn name(&self) -> &'static str {
        "ours"
    }

    fn setup(&mut self, c: &Cluster) -> Result<()> {
        let services = self.services(c);
        self.configs.clear();
        for (i, _) in c.nodes.iter().enumerate() {
            let k = i + 1;
            let cfg = c.bed.write_configs(k, &services)?;
            // Front instance (the first in the file): the baseline's priority.
            let hb = c.tb().dir().join(format!("lb{k}-heartbeat.toml"));
            let text = std::fs::read_to_string(&hb)?;
            let from = format!("priority = {}", 250 - 50 * k);
            if !text.contains(&from) {
                bail!(
                    "{}: no front instance `{from}` to align with the baseline",
                    hb.display()
                );
            }
            let text = text.replacen(&from, &format!("priority = {}", priority(i)), 1);
            std::fs::write(&hb, text)?;
            self.configs.push(cfg);
        }
        if self.local {
            self.local_services = c.bed.start_local_services(VIP_PORT)?;
        }
        self.procs = (0..c.nodes.len()).map(|_| None).collect();
        Ok(())
    }

    fn start(&mut self, c: &Cluster, i: usize) -> Result<()> {
        // Keep the log of an earlier run of this node (restart drill).
        let log = c.tb().dir().join(format!("lb{}.log", i + 1));
        if log.exists() {
            let old = c.tb().dir().join(format!("lb{}.log.1", i + 1));
            let _ = std::fs::rename(&log, old);
        }
        let p = c.bed.start_node(i + 1, &self.configs[i])?;
        self.procs[i] = Some(p);
        Ok(())
    }

    fn kill(&mut self, _c: &Cluster, i: usize) -> Result<()> {
        let mut p = self.procs[i]
            .take()
            .with_context(|| format!("lb{} not running", i + 1))?;
        p.signal(Signal::SIGKILL)?;
        p.kill();
        Ok(())
    }

    fn stop(&mut self, _c: &Cluster, i: usize) -> Result<()> {
        let mut p = self.procs[i]
            .take()
            .with_context(|| format!("lb{} not running", i + 1))?;
        p.signal(Signal::SIGTERM)?;
        if p.wait_timeout(Duration::from_secs(10))?.is_none() {
            bail!("balancer on lb{} ignored SIGTERM for 10 s", i + 1);
        }
        Ok(())
    }

    fn holders(&self, c: &Cluster) -> Vec<usize> {
        self.running()
            .into_iter()
            .filter(|&i| Self::last_view(c, i).is_some_and(|l| l.contains("mac_holder=true")))
            .collect()
    }

    fn settled(&self, c: &Cluster) -> bool {
        let ids: Vec<String> = self.running().iter().map(|i| (i + 1).to_string()).collect();
        let want = format!("live=[{}]", ids.join(", "));
        self.running()
            .into_iter()
            .all(|i| Self::last_view(c, i).is_some_and(|l| l.contains(&want)))
    }

    fn teardown(&mut self, _c: &Cluster) {
        for p in self.procs.iter_mut() {
            if let Some(mut p) = p.take() {
                p.kill();
            }
        }
        self.local_services.clear();
    }

    fn log(&self, c: &Cluster, i: usize) -> PathBuf {
        c.tb().dir().join(format!("lb{}.log", i + 1))
    }

    fn snapshot(&self, c: &Cluster, label: &str) {
        for i in self.running() {
            if let Ok(st) = c.bed.status(i + 1) {
                let path = c
                    .tb()
                    .dir()
                    .join(format!("lb{}-status-{label}.json", i + 1));
                let _ = std::fs::write(path, st.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_down_follows_rfc5798() {
        // 3 x 100 ms + (256 - 100) x 100 ms / 256 = 360.9375 ms.
        assert_eq!(
            master_down(Duration::from_millis(100), 100),
            Duration::from_micros(360_937) + Duration::from_nanos(500)
        );
        assert_eq!(
            master_down(Duration::from_secs(1), 150),
            Duration::from_micros(3_414_062) + Duration::from_nanos(500)
        );
    }

    #[test]
    fn nft_baseline_spreads_over_every_real_server() {
        let r = Keepalived::nft_rules(4);
        assert!(r.contains("numgen inc mod 4 map { 0 : 198.19.0.21, 1 : 198.19.0.22, 2 : 198.19.0.23, 3 : 198.19.0.24 } : 8080"), "{r}");
        assert!(r.contains("masquerade"));
    }
}
