//! `balancer-agent`'s TOML config (`agent.toml`): raw structs with
//! positions, then a validated [`AgentConfig`]. Errors read
//! `FILE:LINE:COLUMN: KEY: message`, like the node's.
//!
//! ```toml
//! [agent]
//! name = "rs1"
//! master = "198.19.0.1:3262"      # port defaults to 3262
//! key = "a shared key of 16+ bytes"
//! sample_interval = "1s"
//! reconnect_min = "500ms"
//! reconnect_max = "30s"
//!
//! [[service]]
//! protocol = "tcp"                 # default
//! port = 80
//! forward = "dr"                   # nat | dr
//! plugin = "cpu"                   # cpu | loadavg | cgroup | command
//! # command = ["/usr/local/bin/health"]   (plugin = "command")
//! # cgroup = "/sys/fs/cgroup/cpuacct/web" (plugin = "cgroup": v1 cpuacct or v2 dir)
//! # cpus = 1.5                            (plugin = "cgroup": capacity; default online CPUs)
//! low_water = 30                   # load levels, percent
//! high_water = 80
//! hysteresis = 5
//! ```

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Forward, Protocol};
use crate::feedback::levels::Marks;
use crate::feedback::necp::{MAX_NAME, MAX_SERVICES, Offer, PORT};

/// Why an agent config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}")]
pub struct AgentConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

/// How a service's load is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugin {
    /// Busy share of all CPUs from /proc/stat over the sample interval.
    Cpu,
    /// 1-minute load average per CPU, as percent (capped at 100).
    LoadAvg,
    /// CPU time of one cgroup (a container, a service's slice) over the
    /// sample interval, relative to `millicpus` (or the online CPUs):
    /// /proc/stat is the whole machine's, also inside a container or a
    /// network namespace. Reads `cpuacct.usage` (cgroup v1) or
    /// `cpu.stat`'s `usage_usec` (cgroup v2).
    Cgroup {
        dir: PathBuf,
        millicpus: Option<u32>,
    },
    /// An operator command: its stdout's first number is the health
    /// (0..=100); failure, timeout or garbage count as health 0.
    Command(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentService {
    pub offer: Offer,
    pub plugin: Plugin,
    pub marks: Marks,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub name: String,
    pub master: SocketAddrV4,
    pub key: String,
    pub sample_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub handshake_timeout: Duration,
    pub stop_timeout: Duration,
    pub services: Vec<AgentService>,
}

type SpannedDuration = Spanned<humantime_serde::Serde<Duration>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    agent: Spanned<RawAgent>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    master: Spanned<String>,
    key: Spanned<String>,
    sample_interval: Option<SpannedDuration>,
    reconnect_min: Option<SpannedDuration>,
    reconnect_max: Option<SpannedDuration>,
    handshake_timeout: Option<SpannedDuration>,
    stop_timeout: Option<SpannedDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PluginName {
    Cpu,
    Loadavg,
    Cgroup,
    Command,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    protocol: Option<Spanned<Protocol>>,
    port: Spanned<i64>,
    forward: Spanned<Forward>,
    plugin: Spanned<PluginName>,
    command: Option<Spanned<Vec<String>>>,
    cgroup: Option<Spanned<PathBuf>>,
    cpus: Option<Spanned<f64>>,
    low_water: Option<Spanned<i64>>,
    high_water: Option<Spanned<i64>>,
    hysteresis: Option<Spanned<i64>>,
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> AgentConfigError {
        let off = span.start.min(self.text.len());
        let mut o = off;
        while !self.text.is_char_boundary(o) {
            o -= 1;
        }
        let before = &self.text[..o];
        let line = before.matches('\n').count() + 1;
        let start = before.rfind('\n').map_or(0, |i| i + 1);
        AgentConfigError {
            file: self.file.to_path_buf(),
            line,
            column: before[start..].chars().count() + 1,
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl AgentConfig {
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, AgentConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| AgentConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<AgentConfig, AgentConfigError> {
        let ctx = Ctx {
            file: path.as_ref(),
            text,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let msg = e.message().lines().next().unwrap_or("").to_owned();
            ctx.err(e.span().unwrap_or(0..0), "", msg)
        })?;
        let a = raw.agent.get_ref();
        let name = a.name.get_ref().clone();
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(ctx.err(
                a.name.span(),
                "agent.name",
                format!("must be 1 to {MAX_NAME} bytes"),
            ));
        }
        let m = a.master.get_ref();
        let master = m
            .parse::<SocketAddrV4>()
            .or_else(|_| m.parse().map(|ip| SocketAddrV4::new(ip, PORT)))
            .map_err(|_| {
                ctx.err(
                    a.master.span(),
                    "agent.master",
                    format!("`{m}` is not ADDRESS[:PORT]"),
                )
            })?;
        let key = a.key.get_ref().clone();
        if key.len() < 16 {
            return Err(ctx.err(
                a.key.span(),
                "agent.key",
                "the shared key must be at least 16 bytes",
            ));
        }
        let dur = |v: &Option<SpannedDuration>,
                   k: &str,
                   d: Duration|
         -> Result<Duration, AgentConfigError> {
            match v {
                None => Ok(d),
                Some(v) if v.get_ref().is_zero() => {
                    Err(ctx.err(v.span(), &format!("agent.{k}"), "must be greater than zero"))
                }
                Some(v) => Ok(**v.get_ref()),
            }
        };
        let sample_interval = dur(
            &a.sample_interval,
            "sample_interval",
            Duration::from_secs(1),
        )?;
        let reconnect_min = dur(
            &a.reconnect_min,
            "reconnect_min",
            Duration::from_millis(500),
        )?;
        let reconnect_max = dur(&a.reconnect_max, "reconnect_max", Duration::from_secs(30))?;
        if reconnect_max < reconnect_min {
            let span = a.reconnect_max.as_ref().map_or(0..0, |v| v.span());
            return Err(ctx.err(
                span,
                "agent.reconnect_max",
                "must not be below reconnect_min",
            ));
        }
        let handshake_timeout = dur(
            &a.handshake_timeout,
            "handshake_timeout",
            Duration::from_secs(5),
        )?;
        let stop_timeout = dur(&a.stop_timeout, "stop_timeout", Duration::from_secs(2))?;
        if raw.service.is_empty() {
            return Err(ctx.err(
                text.len()..text.len(),
                "service",
                "at least one [[service]] is required",
            ));
        }
        if raw.service.len() > MAX_SERVICES {
            return Err(ctx.err(
                raw.service[MAX_SERVICES].span(),
                "service",
                format!("at most {MAX_SERVICES} services"),
            ));
        }
        let mut services = Vec::new();
        for (i, rs) in raw.service.iter().enumerate() {
            let k = format!("service[{i}]");
            let s = rs.get_ref();
            let port = u16::try_from(*s.port.get_ref())
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    ctx.err(
                        s.port.span(),
                        &format!("{k}.port"),
                        format!("port {} is out of range 1..=65535", s.port.get_ref()),
                    )
                })?;
            let forward = *s.forward.get_ref();
            if forward == Forward::Local {
                return Err(ctx.err(
                    s.forward.span(),
                    &format!("{k}.forward"),
                    "an agent's server is a real server: nat or dr",
                ));
            }
            let plugin = match (*s.plugin.get_ref(), &s.command) {
                (PluginName::Command, Some(c))
                    if c.get_ref().first().is_some_and(|p| !p.is_empty()) =>
                {
                    Plugin::Command(c.get_ref().clone())
                }
                (PluginName::Command, Some(c)) => {
                    return Err(ctx.err(
                        c.span(),
                        &format!("{k}.command"),
                        "a command is a non-empty list: [\"program\", \"arg\", ...]",
                    ));
                }
                (PluginName::Command, None) => {
                    return Err(ctx.err(
                        s.plugin.span(),
                        &format!("{k}.command"),
                        "plugin = \"command\" needs command = [...]",
                    ));
                }
                (_, Some(c)) => {
                    return Err(ctx.err(
                        c.span(),
                        &format!("{k}.command"),
                        "only plugin = \"command\" takes a command",
                    ));
                }
                (PluginName::Cpu, None) => Plugin::Cpu,
                (PluginName::Loadavg, None) => Plugin::LoadAvg,
                (PluginName::Cgroup, None) => {
                    let dir = s.cgroup.as_ref().ok_or_else(|| {
                        ctx.err(
                            s.plugin.span(),
                            &format!("{k}.cgroup"),
                            "plugin = \"cgroup\" needs cgroup = \"/sys/fs/cgroup/...\"",
                        )
                    })?;
                    if !dir.get_ref().is_absolute() {
                        return Err(ctx.err(
                            dir.span(),
                            &format!("{k}.cgroup"),
                            "a cgroup is an absolute directory (/sys/fs/cgroup/...)",
                        ));
                    }
                    let millicpus = match &s.cpus {
                        None => None,
                        Some(c) => {
                            let v = *c.get_ref();
                            if !(v.is_finite() && (0.001..=4096.0).contains(&v)) {
                                return Err(ctx.err(
                                    c.span(),
                                    &format!("{k}.cpus"),
                                    format!("{v} is out of range 0.001..=4096"),
                                ));
                            }
                            Some((v * 1000.0).round() as u32)
                        }
                    };
                    Plugin::Cgroup {
                        dir: dir.get_ref().clone(),
                        millicpus,
                    }
                }
            };
            if !matches!(plugin, Plugin::Cgroup { .. }) {
                let stray = s
                    .cgroup
                    .as_ref()
                    .map(|c| (c.span(), "cgroup"))
                    .or(s.cpus.as_ref().map(|c| (c.span(), "cpus")));
                if let Some((span, key)) = stray {
                    return Err(ctx.err(
                        span,
                        &format!("{k}.{key}"),
                        format!("only plugin = \"cgroup\" takes {key}"),
                    ));
                }
            }
            let pct =
                |v: &Option<Spanned<i64>>, key: &str, d: u8| -> Result<u8, AgentConfigError> {
                    match v {
                        None => Ok(d),
                        Some(v) => u8::try_from(*v.get_ref())
                            .ok()
                            .filter(|x| *x <= 100)
                            .ok_or_else(|| {
                                ctx.err(
                                    v.span(),
                                    &format!("{k}.{key}"),
                                    format!("{} is out of range 0..=100", v.get_ref()),
                                )
                            }),
                    }
                };
            let d = Marks::default();
            let marks = Marks {
                low: pct(&s.low_water, "low_water", d.low)?,
                high: pct(&s.high_water, "high_water", d.high)?,
                hysteresis: pct(&s.hysteresis, "hysteresis", d.hysteresis)?,
            };
            if marks.low >= marks.high {
                let span = s.low_water.as_ref().map_or_else(|| rs.span(), |v| v.span());
                return Err(ctx.err(
                    span,
                    &format!("{k}.low_water"),
                    format!(
                        "low_water {} must be below high_water {}",
                        marks.low, marks.high
                    ),
                ));
            }
            services.push(AgentService {
                offer: Offer {
                    protocol: s.protocol.as_ref().map_or(Protocol::Tcp, |p| *p.get_ref()),
                    port,
                    forward,
                },
                plugin,
                marks,
            });
        }
        Ok(AgentConfig {
            name,
            master,
            key,
            sample_interval,
            reconnect_min,
            reconnect_max,
            handshake_timeout,
            stop_timeout,
            services,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str =
        "[agent]\nname = \"rs1\"\nmaster = \"198.19.0.1\"\nkey = \"0123456789abcdef\"\n";

    fn refused(text: &str, line: usize, column: usize, key: &str) {
        match AgentConfig::parse(text, "a.toml") {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => {
                let prefix = format!("a.toml:{line}:{column}: {key}: ");
                assert!(
                    e.to_string().starts_with(&prefix),
                    "expected `{prefix}`, got `{e}`"
                );
            }
        }
    }

    #[test]
    fn minimal_agent_config_gets_the_documented_defaults() {
        let c = AgentConfig::parse(
            &format!("{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\n"),
            "a.toml",
        )
        .expect("valid");
        assert_eq!(c.master, "198.19.0.1:3262".parse().expect("addr"));
        assert_eq!(c.sample_interval, Duration::from_secs(1));
        assert_eq!(c.services[0].plugin, Plugin::Cpu);
        assert_eq!(c.services[0].marks, Marks::default());
        assert_eq!(c.services[0].offer.protocol, Protocol::Tcp);
    }

    #[test]
    fn rejects_short_key() {
        refused(
            "[agent]\nname = \"rs1\"\nmaster = \"198.19.0.1\"\nkey = \"short\"\n[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\n",
            4,
            7,
            "agent.key",
        );
    }

    #[test]
    fn rejects_bad_master() {
        refused(
            "[agent]\nname = \"rs1\"\nmaster = \"nowhere\"\nkey = \"0123456789abcdef\"\n[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\n",
            3,
            10,
            "agent.master",
        );
    }

    #[test]
    fn rejects_no_service() {
        refused(HEAD, 5, 1, "service");
    }

    #[test]
    fn rejects_local_forward() {
        refused(
            &format!("{HEAD}[[service]]\nport = 80\nforward = \"local\"\nplugin = \"cpu\"\n"),
            7,
            11,
            "service[0].forward",
        );
    }

    #[test]
    fn rejects_command_plugin_without_command() {
        refused(
            &format!("{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"command\"\n"),
            8,
            10,
            "service[0].command",
        );
    }

    #[test]
    fn cgroup_plugin_takes_a_directory_and_a_capacity() {
        let c = AgentConfig::parse(&format!(
            "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cgroup\"\ncgroup = \"/sys/fs/cgroup/cpuacct/web\"\ncpus = 1.5\n"
        ), "a.toml")
        .expect("valid");
        assert_eq!(
            c.services[0].plugin,
            Plugin::Cgroup {
                dir: PathBuf::from("/sys/fs/cgroup/cpuacct/web"),
                millicpus: Some(1500)
            }
        );
        let c = AgentConfig::parse(&format!(
            "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cgroup\"\ncgroup = \"/sys/fs/cgroup/web\"\n"
        ), "a.toml")
        .expect("valid");
        assert!(matches!(
            c.services[0].plugin,
            Plugin::Cgroup {
                millicpus: None,
                ..
            }
        ));
    }

    #[test]
    fn rejects_bad_cgroup_plugins() {
        refused(
            &format!("{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cgroup\"\n"),
            8,
            10,
            "service[0].cgroup",
        );
        refused(
            &format!(
                "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cgroup\"\ncgroup = \"web\"\n"
            ),
            9,
            10,
            "service[0].cgroup",
        );
        refused(
            &format!(
                "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cgroup\"\ncgroup = \"/c\"\ncpus = 0\n"
            ),
            10,
            8,
            "service[0].cpus",
        );
        refused(
            &format!(
                "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\ncpus = 2\n"
            ),
            9,
            8,
            "service[0].cpus",
        );
    }

    #[test]
    fn rejects_command_with_cpu_plugin() {
        refused(
            &format!(
                "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\ncommand = [\"x\"]\n"
            ),
            9,
            11,
            "service[0].command",
        );
    }

    #[test]
    fn rejects_low_water_not_below_high_water() {
        refused(
            &format!(
                "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\nlow_water = 90\n"
            ),
            9,
            13,
            "service[0].low_water",
        );
    }

    #[test]
    fn rejects_high_water_above_100() {
        refused(
            &format!(
                "{HEAD}[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\nhigh_water = 101\n"
            ),
            9,
            14,
            "service[0].high_water",
        );
    }

    #[test]
    fn rejects_port_zero() {
        refused(
            &format!("{HEAD}[[service]]\nport = 0\nforward = \"dr\"\nplugin = \"cpu\"\n"),
            6,
            8,
            "service[0].port",
        );
    }

    #[test]
    fn rejects_zero_sample_interval() {
        refused(
            "[agent]\nname = \"rs1\"\nmaster = \"198.19.0.1\"\nkey = \"0123456789abcdef\"\nsample_interval = \"0s\"\n[[service]]\nport = 80\nforward = \"dr\"\nplugin = \"cpu\"\n",
            5,
            19,
            "agent.sample_interval",
        );
    }

    #[test]
    fn rejects_unknown_key() {
        match AgentConfig::parse(&format!("{HEAD}bogus = 1\n"), "a.toml") {
            Err(e) => assert!(e.to_string().contains("bogus"), "{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn every_agent_example_in_configs_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("configs/") {
            let p = e.expect("entry").path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("agent-") && name.ends_with(".toml") {
                AgentConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1, "no configs/agent-*.toml");
    }
}
