//! CPU accounting groups for test hosts: a namespace shares the machine's
//! /proc/stat, so a real server's own CPU use is read from its cgroup (as
//! a container's is). [`CpuGroup`] makes one under the CPU-accounting
//! hierarchy this machine has (cgroup v1 `cpuacct`, else cgroup v2),
//! named with the test's unique prefix, and removes it on drop (also on
//! panic), moving any process still in it back to the root first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One CPU accounting group.
#[derive(Debug)]
pub struct CpuGroup {
    dir: PathBuf,
    root: PathBuf,
}

/// The CPU-accounting hierarchy's root: cgroup v1's cpuacct, else v2.
fn accounting_root() -> Result<PathBuf> {
    for p in ["/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu,cpuacct"] {
        if Path::new(p).join("cpuacct.usage").exists() {
            return Ok(PathBuf::from(p));
        }
    }
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(p).join("cgroup.controllers").exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("no CPU accounting cgroup hierarchy (cpuacct v1 or cgroup v2) is mounted")
}

impl CpuGroup {
    /// Creates `<root>/<name>`; `name` should carry the test bed's unique
    /// prefix so parallel tests never share a group.
    pub fn new(name: &str) -> Result<CpuGroup> {
        let root = accounting_root()?;
        let dir = root.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(CpuGroup { dir, root })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `argv` wrapped so that the process joins this group before it
    /// execs (no child can escape by forking first).
    pub fn wrap(&self, argv: &[&str]) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        let mut v = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo $$ > '{}' && exec \"$@\"", procs.display()),
            "sh".to_owned(),
        ];
        v.extend(argv.iter().map(|s| (*s).to_owned()));
        v
    }

    /// CPU time used by the group so far.
    pub fn usage(&self) -> Result<Duration> {
        let v1 = self.dir.join("cpuacct.usage");
        if let Ok(t) = std::fs::read_to_string(&v1) {
            let ns: u64 = t.trim().parse().context("cpuacct.usage")?;
            return Ok(Duration::from_nanos(ns));
        }
        let t = std::fs::read_to_string(self.dir.join("cpu.stat")).context("cpu.stat")?;
        let us: u64 = t
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("cpu.stat has no usage_usec")?
            .trim()
            .parse()?;
        Ok(Duration::from_micros(us))
    }
}

/// Removes groups left by harness processes that no longer exist (a
/// SIGKILLed test cannot run its destructors). `prefix` is the harness's
/// name prefix; names are `<prefix><pid>x...`.
pub fn sweep_stale(prefix: &str) {
    let Ok(root) = accounting_root() else { return };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.split_once('x'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            drop(CpuGroup {
                dir: e.path(),
                root: root.clone(),
            });
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            // Still populated: move what is left to the root.
            if let Ok(pids) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
                for pid in pids.lines() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("cgroup {} could not be removed", self.dir.display());
    }
}
