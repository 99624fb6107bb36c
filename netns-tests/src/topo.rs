//! Test topologies in network namespaces.
//!
//! A [`Testbed`] owns a switch namespace holding the bridges (the L2
//! segments) and any number of host namespaces wired to them with veth
//! pairs. Names carry a per-process prefix so tests run in parallel, and
//! everything is deleted when the testbed is dropped, on success, failure
//! and panic alike. Processes started with [`Host::spawn`] are killed when
//! their [`Proc`] is dropped, and any process still inside a namespace is
//! killed before the namespace is deleted.
//!
//! Nothing here touches the root namespace's interfaces or routes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Prefix of every namespace this harness creates: `lbt<pid>x<n>`.
const PREFIX: &str = "lbt";

static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out: Output = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command in the root namespace (used only for `ip netns` itself).
fn ip(args: &[&str]) -> Result<String> {
    run_cmd(Command::new("ip").args(args))
}

/// Deletes namespaces left behind by earlier runs of this harness whose
/// process no longer exists (a SIGKILLed test cannot run its destructors).
pub fn sweep_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if pid as u32 != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
    crate::cgroup::sweep_stale(PREFIX);
}

fn kill_all_in(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for p in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

struct NsInner {
    name: String,
}

impl Drop for NsInner {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        // The kernel may need a moment to release a namespace whose last
        // process just died; retry briefly.
        for _ in 0..20 {
            if ip(&["netns", "del", &self.name]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A network namespace (a host, or the switch). Cheap to clone; deleted
/// when the last clone and its testbed are gone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<NsInner>,
    /// The short role name given by the test (`client`, `lb1`, ...).
    role: String,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Host({} = {})", self.role, self.inner.name)
    }
}

impl Host {
    fn create(name: String, role: &str) -> Result<Host> {
        ip(&["netns", "add", &name])?;
        let host = Host {
            inner: Arc::new(NsInner { name }),
            role: role.to_string(),
        };
        host.run(&["ip", "link", "set", "lo", "up"])?;
        // IPv4 only: no IPv6 router/neighbour chatter in captures and counters.
        host.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        host.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(host)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn ns(&self) -> &str {
        &self.inner.name
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    /// A `Command` that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(), program]);
        c
    }

    /// Runs a command to completion in the namespace; Err (with its stderr)
    /// unless it exits 0. Returns its stdout.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        let (prog, args) = argv.split_first().context("empty command")?;
        run_cmd(self.command(prog).args(args))
            .with_context(|| format!("in namespace {} ({})", self.ns(), self.role))
    }

    /// Runs a command and returns its full output whatever its exit status.
    pub fn output(&self, argv: &[&str]) -> Result<Output> {
        let (prog, args) = argv.split_first().context("empty command")?;
        Ok(self.command(prog).args(args).output()?)
    }

    /// Writes a sysctl inside the namespace (`net.ipv4.conf.all.rp_filter`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Starts a long-running process in the namespace. Its stdout and stderr
    /// go to `<log_dir>/<role>-<program>.log` when a log dir is set.
    pub fn spawn(&self, argv: &[&str]) -> Result<Proc> {
        self.spawn_logged(argv, None)
    }

    pub fn spawn_logged(&self, argv: &[&str], log: Option<&Path>) -> Result<Proc> {
        let (prog, args) = argv.split_first().context("empty command")?;
        let mut cmd = self.command(prog);
        cmd.args(args);
        self.spawn_cmd(cmd, argv, log)
    }

    /// Like [`Host::spawn_logged`], but the process enters only the network
    /// namespace (`nsenter --net`), keeping the root's mounts: `ip netns
    /// exec` mounts a fresh /sys, which hides /sys/fs/cgroup, and a
    /// process that reads or joins a cgroup needs it.
    pub fn spawn_net_only(&self, argv: &[&str], log: Option<&Path>) -> Result<Proc> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.ns()))
            .arg("--")
            .args(argv);
        self.spawn_cmd(cmd, argv, log)
    }

    fn spawn_cmd(&self, mut cmd: Command, argv: &[&str], log: Option<&Path>) -> Result<Proc> {
        cmd.stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.ns()))?;
        Ok(Proc {
            child: Some(child),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The MAC address of an interface in this namespace.
    pub fn mac(&self, ifname: &str) -> Result<String> {
        let s = self.run(&["cat", &format!("/sys/class/net/{ifname}/address")])?;
        Ok(s.trim().to_string())
    }

    /// Sets an interface up or down inside this namespace.
    pub fn set_link(&self, ifname: &str, up: bool) -> Result<()> {
        self.run(&["ip", "link", "set", ifname, if up { "up" } else { "down" }])
            .map(|_| ())
    }

    /// Waits until `cond` holds or the timeout passes.
    pub fn wait_for(&self, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        wait_until(timeout, &mut cond)
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, cond: &mut dyn FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process started inside a namespace; killed (SIGKILL) and reaped on drop
/// unless it already exited.
pub struct Proc {
    child: Option<Child>,
    argv: Vec<String>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Proc({:?}, pid {:?})",
            self.argv,
            self.child.as_ref().map(|c| c.id())
        )
    }
}

impl Proc {
    /// Pid of the process itself. `ip netns exec` execs the program, so this
    /// is the program's pid, not a wrapper's.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid().context("process already reaped")?;
        kill(Pid::from_raw(pid), sig).with_context(|| format!("kill -{sig} {pid}"))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its status.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("process already reaped")?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An L2 segment: a bridge in the testbed's switch namespace.
#[derive(Clone, Debug)]
pub struct Bridge {
    pub name: String,
}

/// One end of a link made by [`Testbed::link`]: the host side interface and
/// the bridge port in the switch namespace.
#[derive(Clone, Debug)]
pub struct Link {
    pub host: Host,
    pub ifname: String,
    pub port: String,
    pub bridge: String,
}

/// A set of namespaces wired together; all deleted on drop.
pub struct Testbed {
    prefix: String,
    sw: Host,
    hosts: Mutex<Vec<Host>>,
    links: Mutex<HashMap<(String, String), Link>>,
    next_port: AtomicU32,
    dir: PathBuf,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Testbed({})", self.prefix)
    }
}

impl Testbed {
    /// A new testbed. `tag` names it in logs and in its scratch directory;
    /// namespace names are `lbt<pid>x<n>-<role>`.
    pub fn new(tag: &str) -> Result<Testbed> {
        if !nix::unistd::geteuid().is_root() {
            bail!("network-namespace tests need root (run them with sudo, as CI does)");
        }
        sweep_stale();
        let n = NEXT_TESTBED.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{prefix}-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let sw = Host::create(format!("{prefix}-sw"), "sw")?;
        // A switch forwards frames as they are. With br_netfilter loaded
        // (container hosts load it), bridged IPv4 and IPv6 pass netfilter's
        // header validation, which silently drops a bad checksum or length
        // before it reaches the far end. The sysctls are per namespace and
        // exist only while the module is loaded, hence no error check.
        for table in ["iptables", "ip6tables", "arptables"] {
            let _ = sw.sysctl(&format!("net.bridge.bridge-nf-call-{table}"), "0");
        }
        Ok(Testbed {
            prefix,
            sw,
            hosts: Mutex::new(Vec::new()),
            links: Mutex::new(HashMap::new()),
            next_port: AtomicU32::new(0),
            dir,
        })
    }

    /// Scratch directory for this testbed (configs, logs, captures); kept
    /// after the run for post-mortems, under the system temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A CPU accounting group for `role`'s processes, named with this
    /// testbed's prefix; removed when the returned guard drops (drop it
    /// after the processes in it have ended).
    pub fn cpu_group(&self, role: &str) -> Result<crate::cgroup::CpuGroup> {
        crate::cgroup::CpuGroup::new(&format!("{}-{role}", self.prefix))
    }

    /// The switch namespace holding the bridges.
    pub fn switch(&self) -> &Host {
        &self.sw
    }

    /// A bridge (an L2 segment) in the switch namespace.
    pub fn bridge(&self, name: &str) -> Result<Bridge> {
        let br = format!("br-{name}");
        self.sw.run(&[
            "ip",
            "link",
            "add",
            &br,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        // Forward multicast (VRRP, cluster MAC) without IGMP snooping getting in the way.
        self.sw.run(&[
            "ip",
            "link",
            "set",
            &br,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        self.sw.run(&["ip", "link", "set", &br, "up"])?;
        Ok(Bridge { name: br })
    }

    /// A host namespace with loopback up.
    pub fn host(&self, role: &str) -> Result<Host> {
        let h = Host::create(format!("{}-{role}", self.prefix), role)?;
        if let Ok(mut hs) = self.hosts.lock() {
            hs.push(h.clone());
        }
        Ok(h)
    }

    /// Connects `host` to `bridge` by a veth pair: `ifname` inside the host
    /// (with `addrs` in CIDR form, up) and a bridge port in the switch.
    pub fn link(&self, host: &Host, ifname: &str, bridge: &Bridge, addrs: &[&str]) -> Result<Link> {
        let n = self.next_port.fetch_add(1, Ordering::Relaxed);
        let port = format!("p{n}");
        let tmp = format!("t{}x{n}", std::process::id() % 100_000);
        // Create the pair inside the switch namespace, then move one end.
        self.sw.run(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", &tmp,
        ])?;
        self.sw
            .run(&["ip", "link", "set", &tmp, "netns", host.ns()])?;
        host.run(&["ip", "link", "set", &tmp, "name", ifname])?;
        self.sw
            .run(&["ip", "link", "set", &port, "master", &bridge.name])?;
        self.sw.run(&["ip", "link", "set", &port, "up"])?;
        for a in addrs {
            host.run(&["ip", "addr", "add", a, "dev", ifname])?;
        }
        host.run(&["ip", "link", "set", ifname, "up"])?;
        let link = Link {
            host: host.clone(),
            ifname: ifname.to_string(),
            port,
            bridge: bridge.name.clone(),
        };
        if let Ok(mut ls) = self.links.lock() {
            ls.insert((host.ns().to_string(), ifname.to_string()), link.clone());
        }
        Ok(link)
    }

    fn port_of(&self, host: &Host, ifname: &str) -> Result<String> {
        let ls = self.links.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        ls.get(&(host.ns().to_string(), ifname.to_string()))
            .map(|l| l.port.clone())
            .with_context(|| format!("no link {ifname} on {}", host.role()))
    }

    /// Cuts a host off its segment at the switch, silently: the host's
    /// link stays up (carrier and all), frames to and from it are dropped
    /// by the bridge, as when a switch port or a cable beyond the NIC fails
    /// without the NIC noticing. Several cuts make a partition.
    pub fn cut(&self, host: &Host, ifname: &str) -> Result<()> {
        let port = self.port_of(host, ifname)?;
        self.ensure_cut_table()?;
        self.sw
            .run(&[
                "nft",
                "add",
                "element",
                "bridge",
                "testbed",
                "cut",
                &format!("{{ {port} }}"),
            ])
            .map(|_| ())
    }

    /// Restores a link cut with [`Testbed::cut`].
    pub fn heal(&self, host: &Host, ifname: &str) -> Result<()> {
        let port = self.port_of(host, ifname)?;
        self.sw
            .run(&[
                "nft",
                "delete",
                "element",
                "bridge",
                "testbed",
                "cut",
                &format!("{{ {port} }}"),
            ])
            .map(|_| ())
    }

    fn ensure_cut_table(&self) -> Result<()> {
        if self
            .sw
            .run(&["nft", "list", "set", "bridge", "testbed", "cut"])
            .is_ok()
        {
            return Ok(());
        }
        let rules = "table bridge testbed {\n set cut { type ifname; }\n chain forward { type filter hook forward priority 0; iifname @cut drop; oifname @cut drop; }\n}\n";
        self.sw
            .run(&["sh", "-c", &format!("printf '{rules}' | nft -f -")])
            .map(|_| ())
    }

    /// Unplugs a host's cable at the switch: the switch port goes down, so
    /// the host's interface loses carrier (what a pulled cable looks like).
    pub fn unplug(&self, host: &Host, ifname: &str) -> Result<()> {
        let port = self.port_of(host, ifname)?;
        self.sw
            .run(&["ip", "link", "set", &port, "down"])
            .map(|_| ())
    }

    /// Plugs back a cable pulled with [`Testbed::unplug`].
    pub fn plug(&self, host: &Host, ifname: &str) -> Result<()> {
        let port = self.port_of(host, ifname)?;
        self.sw.run(&["ip", "link", "set", &port, "up"]).map(|_| ())
    }

    /// Isolates a host's bridge port (or lifts it): isolated ports do not
    /// talk to each other but still talk to every other port. Isolating the
    /// nodes' ports partitions the nodes from each other while clients and
    /// servers still reach all of them.
    pub fn isolate(&self, host: &Host, ifname: &str, on: bool) -> Result<()> {
        let port = self.port_of(host, ifname)?;
        let state = if on { "on" } else { "off" };
        self.sw
            .run(&["bridge", "link", "set", "dev", &port, "isolated", state])
            .map(|_| ())
    }

    /// The bridge port (in the switch namespace) of a host's interface.
    pub fn port(&self, host: &Host, ifname: &str) -> Result<String> {
        self.port_of(host, ifname)
    }

    /// Sets the host's own interface down (the host sees carrier loss).
    pub fn link_down(&self, host: &Host, ifname: &str) -> Result<()> {
        host.set_link(ifname, false)
    }

    pub fn link_up(&self, host: &Host, ifname: &str) -> Result<()> {
        host.set_link(ifname, true)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Hosts first (their processes are killed), then the switch. The Host
        // handles a test still holds keep their namespace alive until they
        // drop too; kill their processes now so nothing outlives the bed.
        if let Ok(mut hs) = self.hosts.lock() {
            for h in hs.iter() {
                kill_all_in(h.ns());
            }
            hs.clear();
        }
        if let Ok(mut ls) = self.links.lock() {
            ls.clear();
        }
    }
}

/// Path of a binary of this workspace built by cargo for the running test
/// (`target/<profile>/<name>`), found next to the test executable.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let mut dir = exe
        .parent()
        .context("test exe has no parent")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not built (build the workspace binaries first: cargo build --workspace)",
            p.display()
        );
    }
    Ok(p)
}

impl Host {
    /// Runs `f` on a new OS thread that has entered this namespace (network
    /// namespaces are per thread: the caller's thread is not affected).
    /// Sockets made inside `f` live in the namespace.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.ns());
        let h = std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
            Ok(f())
        });
        h.join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.ns()))?
    }

    /// Like [`Host::in_ns`] but returns at once with the thread's handle.
    pub fn spawn_in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/var/run/netns/{}", self.ns());
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
            Ok(f())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hosts_on_a_bridge_ping_and_everything_is_removed() -> Result<()> {
        let names;
        {
            let tb = Testbed::new("topo-self")?;
            let lan = tb.bridge("front")?;
            let a = tb.host("a")?;
            let b = tb.host("b")?;
            tb.link(&a, "eth0", &lan, &["198.18.0.1/24"])?;
            tb.link(&b, "eth0", &lan, &["198.18.0.2/24"])?;
            a.run(&["ping", "-c1", "-W2", "198.18.0.2"])?;
            tb.cut(&b, "eth0")?;
            assert!(
                a.run(&["ping", "-c1", "-W1", "198.18.0.2"]).is_err(),
                "cut link still passes traffic"
            );
            tb.heal(&b, "eth0")?;
            a.run(&["ping", "-c1", "-W2", "198.18.0.2"])?;
            let _sleeper = b.spawn(&["sleep", "30"])?;
            names = vec![
                a.ns().to_string(),
                b.ns().to_string(),
                tb.switch().ns().to_string(),
            ];
        }
        let list = ip(&["netns", "list"])?;
        for n in names {
            assert!(!list.contains(&n), "namespace {n} left behind: {list}");
        }
        Ok(())
    }
}
