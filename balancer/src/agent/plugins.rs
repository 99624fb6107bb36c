//! Load plugins: each gives a load in percent (0 idle .. 100 saturated);
//! the agent answers health = 100 - load. Pure parsers with tests; the
//! reads are thin.

use std::path::Path;
use std::time::{Duration, Instant};

use super::config::Plugin;

/// CPU times from the first (`cpu `) line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses /proc/stat's aggregate line: busy = total - idle - iowait.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest counted in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// Busy share between two samples, percent.
pub fn cpu_load(prev: CpuTimes, now: CpuTimes) -> u8 {
    let dt = now.total.saturating_sub(prev.total);
    if dt == 0 {
        return 0;
    }
    let db = now.busy.saturating_sub(prev.busy).min(dt);
    ((db * 100 + dt / 2) / dt) as u8
}

/// A cgroup's CPU time in nanoseconds: cgroup v1's `cpuacct.usage` (one
/// number, ns) or cgroup v2's `cpu.stat` (`usage_usec N`).
pub fn parse_cgroup_usage(file: &str, text: &str) -> Option<u64> {
    if file == "cpuacct.usage" {
        return text.trim().parse().ok();
    }
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    usec.checked_mul(1000)
}

/// A cgroup's load between two samples: CPU time used over the wall time
/// times the capacity (in thousandths of a CPU), percent, capped at 100.
pub fn cgroup_load(used_ns: u64, wall: Duration, millicpus: u32) -> u8 {
    let capacity = wall.as_nanos() * u128::from(millicpus) / 1000;
    if capacity == 0 {
        return 0;
    }
    ((u128::from(used_ns) * 100 + capacity / 2) / capacity).min(100) as u8
}

/// Reads a cgroup directory's CPU time: v1 first, then v2.
async fn read_cgroup_usage(dir: &Path) -> Option<u64> {
    for file in ["cpuacct.usage", "cpu.stat"] {
        if let Ok(text) = tokio::fs::read_to_string(dir.join(file)).await {
            return parse_cgroup_usage(file, &text);
        }
    }
    None
}

/// 1-minute load average per CPU as percent, capped at 100.
pub fn parse_loadavg(text: &str, cpus: usize) -> Option<u8> {
    let one: f64 = text.split_whitespace().next()?.parse().ok()?;
    if !one.is_finite() || one < 0.0 {
        return None;
    }
    Some((one / cpus.max(1) as f64 * 100.0).round().min(100.0) as u8)
}

/// The health a command printed: the first whitespace-separated token, an
/// integer 0..=100.
pub fn parse_health(stdout: &str) -> Option<u8> {
    stdout
        .split_whitespace()
        .next()?
        .parse::<u8>()
        .ok()
        .filter(|h| *h <= 100)
}

/// One plugin instance with its memory (the previous CPU sample).
#[derive(Debug)]
pub struct Sampler {
    plugin: Plugin,
    prev_cpu: Option<CpuTimes>,
    /// The cgroup plugin's previous sample: CPU time (ns) and when.
    prev_cgroup: Option<(u64, Instant)>,
}

impl Sampler {
    pub fn new(plugin: Plugin) -> Sampler {
        Sampler {
            plugin,
            prev_cpu: None,
            prev_cgroup: None,
        }
    }

    /// The load now, percent. A failed read or command counts as
    /// saturated (health 0): a server that cannot tell is not fit.
    pub async fn sample(&mut self, timeout: Duration) -> u8 {
        match &self.plugin {
            Plugin::Cpu => {
                let Some(now) = tokio::fs::read_to_string("/proc/stat")
                    .await
                    .ok()
                    .and_then(|t| parse_proc_stat(&t))
                else {
                    return 100;
                };
                let load = self.prev_cpu.map_or(0, |p| cpu_load(p, now));
                self.prev_cpu = Some(now);
                load
            }
            Plugin::Cgroup { dir, millicpus } => {
                let Some(used) = read_cgroup_usage(dir).await else {
                    tracing::warn!(cgroup = %dir.display(), "cannot read the cgroup's CPU time");
                    self.prev_cgroup = None;
                    return 100;
                };
                let now = Instant::now();
                let millicpus = millicpus.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1000, |n| n.get() as u32 * 1000)
                });
                let load = self.prev_cgroup.map_or(0, |(prev, at)| {
                    cgroup_load(used.saturating_sub(prev), now - at, millicpus)
                });
                self.prev_cgroup = Some((used, now));
                load
            }
            Plugin::LoadAvg => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                tokio::fs::read_to_string("/proc/loadavg")
                    .await
                    .ok()
                    .and_then(|t| parse_loadavg(&t, cpus))
                    .unwrap_or(100)
            }
            Plugin::Command(argv) => {
                let Some((prog, args)) = argv.split_first() else {
                    return 100;
                };
                let mut cmd = tokio::process::Command::new(prog);
                cmd.args(args)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                match tokio::time::timeout(timeout, cmd.output()).await {
                    Ok(Ok(out)) if out.status.success() => {
                        parse_health(&String::from_utf8_lossy(&out.stdout)).map_or(100, |h| 100 - h)
                    }
                    Ok(Ok(out)) => {
                        tracing::warn!(program = %prog, status = %out.status, "health command failed");
                        100
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(program = %prog, error = %e, "cannot run health command");
                        100
                    }
                    Err(_) => {
                        tracing::warn!(program = %prog, "health command timed out");
                        100
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\nintr 1\n";

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait() {
        assert_eq!(
            parse_proc_stat(STAT),
            Some(CpuTimes {
                busy: 150,
                total: 1000
            })
        );
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2 x 4\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
    }

    #[test]
    fn cpu_load_is_the_busy_share_of_the_interval() {
        let a = CpuTimes {
            busy: 150,
            total: 1000,
        };
        let b = CpuTimes {
            busy: 225,
            total: 1100,
        };
        assert_eq!(cpu_load(a, b), 75);
        assert_eq!(cpu_load(a, a), 0);
        // Counters never make the share exceed 100.
        assert_eq!(
            cpu_load(
                a,
                CpuTimes {
                    busy: 500,
                    total: 1010
                }
            ),
            100
        );
    }

    #[test]
    fn cgroup_usage_reads_v1_and_v2() {
        assert_eq!(
            parse_cgroup_usage("cpuacct.usage", "123456789\n"),
            Some(123_456_789)
        );
        assert_eq!(
            parse_cgroup_usage(
                "cpu.stat",
                "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n"
            ),
            Some(2_500_000)
        );
        assert_eq!(parse_cgroup_usage("cpu.stat", "user_usec 1\n"), None);
        assert_eq!(parse_cgroup_usage("cpuacct.usage", "x"), None);
    }

    #[test]
    fn cgroup_load_is_relative_to_the_capacity() {
        let s = Duration::from_secs(1);
        // Half a CPU-second in one second: 50 % of one CPU, 25 % of two.
        assert_eq!(cgroup_load(500_000_000, s, 1000), 50);
        assert_eq!(cgroup_load(500_000_000, s, 2000), 25);
        // A quarter CPU quota fully used.
        assert_eq!(cgroup_load(250_000_000, s, 250), 100);
        assert_eq!(cgroup_load(2_000_000_000, s, 1000), 100);
        assert_eq!(cgroup_load(1, Duration::ZERO, 1000), 0);
    }

    #[tokio::test]
    async fn cgroup_plugin_measures_the_counter_over_wall_time() {
        let dir = std::env::temp_dir().join(format!("lbt-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let usage = dir.join("cpuacct.usage");
        std::fs::write(&usage, "1000000000\n").expect("write");
        let mut s = Sampler::new(Plugin::Cgroup {
            dir: dir.clone(),
            millicpus: Some(1000),
        });
        assert_eq!(
            s.sample(Duration::from_secs(1)).await,
            0,
            "first sample has no interval"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        // 1 CPU-second in ~0.2 s of wall time: saturated.
        std::fs::write(&usage, "2000000000\n").expect("write");
        assert_eq!(s.sample(Duration::from_secs(1)).await, 100);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // No CPU time at all: idle.
        assert_eq!(s.sample(Duration::from_secs(1)).await, 0);
        std::fs::remove_dir_all(&dir).expect("cleanup");
        // A cgroup that is gone cannot tell: saturated.
        assert_eq!(s.sample(Duration::from_secs(1)).await, 100);
    }

    #[test]
    fn loadavg_is_per_cpu_and_capped() {
        assert_eq!(parse_loadavg("0.50 0.40 0.30 1/100 42\n", 2), Some(25));
        assert_eq!(parse_loadavg("9.00 0 0 1/1 1\n", 2), Some(100));
        assert_eq!(parse_loadavg("garbage", 2), None);
        assert_eq!(parse_loadavg("-1 0 0", 2), None);
    }

    #[test]
    fn command_health_is_the_first_number_up_to_100() {
        assert_eq!(parse_health("75\n"), Some(75));
        assert_eq!(parse_health("  0 ok"), Some(0));
        assert_eq!(parse_health("101"), None);
        assert_eq!(parse_health("-1"), None);
        assert_eq!(parse_health(""), None);
    }

    #[tokio::test]
    async fn command_plugin_turns_health_into_load_and_failure_into_saturation() {
        let mut s = Sampler::new(Plugin::Command(vec!["echo".into(), "30".into()]));
        assert_eq!(s.sample(Duration::from_secs(5)).await, 70);
        let mut s = Sampler::new(Plugin::Command(vec!["false".into()]));
        assert_eq!(s.sample(Duration::from_secs(5)).await, 100);
        let mut s = Sampler::new(Plugin::Command(vec!["sleep".into(), "5".into()]));
        assert_eq!(s.sample(Duration::from_millis(100)).await, 100);
    }
}
