//! What the bench reads about a process from `/proc`: CPU time and memory.

use anyhow::{Context, Result};

/// CPU time of the whole process (all threads) in clock ticks: fields 14
/// (utime) and 15 (stime) of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

pub fn cpu_ticks(pid: i32) -> Result<CpuTicks> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&text).with_context(|| format!("parsing /proc/{pid}/stat: {text}"))
}

/// Parses utime and stime out of a `stat` line. The command name (field
/// 2) is in parentheses and may hold spaces or parentheses itself, so
/// fields are counted from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<CpuTicks> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    Some(CpuTicks {
        user: fields.get(14 - 3)?.parse().ok()?,
        system: fields.get(15 - 3)?.parse().ok()?,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks_per_sec() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as u64,
        // Linux has used 100 on every architecture for the user ABI.
        _ => 100,
    }
}

/// Memory of a process as `/proc/<pid>/status` reports it, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size.
    pub hwm_kib: u64,
    /// The parts of the RSS: anonymous memory (heap: the connection
    /// table), file pages (the AF_PACKET ring mappings count here) and
    /// shared memory.
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

pub fn memory(pid: i32) -> Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_memory(&text).with_context(|| format!("no VmRSS/VmHWM in /proc/{pid}/status"))
}

pub fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        shmem_kib: field("RssShmem:").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (bal (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 269 0 0 20 0 3 0 \
                    123456 10000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_cpu_ticks(stat),
            Some(CpuTicks {
                user: 731,
                system: 269
            })
        );
    }

    #[test]
    fn a_short_stat_line_is_refused() {
        assert_eq!(parse_cpu_ticks("1 (x) S 0 0"), None);
    }

    #[test]
    fn rss_and_peak_are_read_in_kib() {
        let status = "Name:\tbalancer\nVmPeak:\t  99999 kB\nVmHWM:\t   30720 kB\nVmRSS:\t   20480 kB\n\
                      RssAnon:\t    4096 kB\nRssFile:\t   16384 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(
            parse_memory(status),
            Some(Memory {
                rss_kib: 20480,
                hwm_kib: 30720,
                anon_kib: 4096,
                file_kib: 16384,
                shmem_kib: 0,
            })
        );
    }
}
