//! `heartbeat.toml`: a raw, span-carrying struct parsed with unknown keys
//! refused, then validated into [`Config`]. Errors read
//! `FILE:LINE:COL: KEY: message`.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::arp::{ArpMac, GarpConfig, Mac};

/// A configuration error pointing at the file position and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    instance: Vec<RawInstance>,
    #[serde(default)]
    sync_group: Vec<RawSyncGroup>,
    #[serde(default)]
    script: Vec<RawScript>,
    membership: Option<RawMembership>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<u32>,
    name: Option<String>,
    /// Try SCHED_FIFO for the protocol thread (root only).
    #[serde(default = "yes")]
    realtime: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Spanned<String>,
    interface: Spanned<String>,
    vrid: Spanned<i64>,
    priority: Spanned<i64>,
    #[serde(default = "one_second")]
    advert_interval: Spanned<String>,
    #[serde(default = "yes")]
    preempt: bool,
    #[serde(default)]
    preempt_delay: Option<Spanned<String>>,
    primary_address: Option<Spanned<String>>,
    virtual_addresses: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    unicast_peers: Vec<Spanned<String>>,
    #[serde(default)]
    arp_mac: Option<Spanned<String>>,
    #[serde(default)]
    track_interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    track_scripts: Vec<Spanned<String>>,
    #[serde(default)]
    garp: RawGarp,
    #[serde(default)]
    notify: RawNotify,
}

fn one_second() -> Spanned<String> {
    Spanned::new(0..0, "1s".into())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGarp {
    repeat: Option<Spanned<i64>>,
    interval: Option<Spanned<String>>,
    master_delay: Option<Spanned<String>>,
    refresh: Option<Spanned<String>>,
    refresh_repeat: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    master: Option<String>,
    backup: Option<String>,
    fault: Option<String>,
    stop: Option<String>,
    /// Generic script: `script INSTANCE|GROUP name state priority`.
    any: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyncGroup {
    name: String,
    members: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    notify: RawNotify,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    name: Spanned<String>,
    command: Spanned<Vec<String>>,
    #[serde(default = "two_seconds")]
    interval: Spanned<String>,
    timeout: Option<Spanned<String>>,
    #[serde(default = "zero")]
    weight: Spanned<i64>,
    #[serde(default = "one")]
    rise: Spanned<i64>,
    #[serde(default = "one")]
    fall: Spanned<i64>,
}

fn two_seconds() -> Spanned<String> {
    Spanned::new(0..0, "2s".into())
}
fn zero() -> Spanned<i64> {
    Spanned::new(0..0, 0)
}
fn one() -> Spanned<i64> {
    Spanned::new(0..0, 1)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMembership {
    interface: Spanned<String>,
    #[serde(default)]
    group: Option<Spanned<String>>,
    #[serde(default = "default_port")]
    port: u16,
    /// All node ids of the cluster (messages from others are refused).
    nodes: Spanned<Vec<u32>>,
    /// Unicast peer addresses (instead of, or besides, the group).
    #[serde(default)]
    peers: Vec<Spanned<String>>,
    #[serde(default = "default_member_interval")]
    interval: Spanned<String>,
    key: Option<Spanned<String>>,
    key_file: Option<Spanned<PathBuf>>,
    /// This node's share of flows relative to the others (bucket table);
    /// 0 announces that the node is leaving.
    #[serde(default = "default_member_weight")]
    weight: u16,
    max_age: Option<Spanned<String>>,
}

fn default_member_weight() -> u16 {
    1
}

fn default_port() -> u16 {
    7788
}
fn default_member_interval() -> Spanned<String> {
    Spanned::new(0..0, "200ms".into())
}

/// Notify script paths (keepalived's `notify_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notify {
    pub master: Option<String>,
    pub backup: Option<String>,
    pub fault: Option<String>,
    pub stop: Option<String>,
    pub any: Option<String>,
}

impl From<RawNotify> for Notify {
    fn from(r: RawNotify) -> Self {
        Notify {
            master: r.master,
            backup: r.backup,
            fault: r.fault,
            stop: r.stop,
            any: r.any,
        }
    }
}

/// One validated instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCfg {
    pub name: String,
    pub interface: String,
    pub vrid: u8,
    pub priority: u8,
    pub advert_interval_cs: u16,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// None: the interface's first IPv4 address at start.
    pub primary: Option<Ipv4Addr>,
    /// (address, prefix length)
    pub virtual_addresses: Vec<(Ipv4Addr, u8)>,
    pub unicast_peers: Vec<Ipv4Addr>,
    pub arp_mac: ArpMac,
    pub track_interfaces: Vec<String>,
    /// Indices into `Config::scripts`.
    pub track_scripts: Vec<usize>,
    pub garp: GarpConfig,
    pub notify: Notify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncGroupCfg {
    pub name: String,
    /// Indices into `Config::instances`.
    pub members: Vec<usize>,
    pub notify: Notify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCfg {
    pub name: String,
    pub command: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub weight: i32,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipCfg {
    pub interface: String,
    pub group: Option<Ipv4Addr>,
    pub port: u16,
    pub nodes: Vec<u32>,
    pub peers: Vec<Ipv4Addr>,
    pub interval: Duration,
    pub key: Vec<u8>,
    pub weight: u16,
    pub max_age: Option<Duration>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_id: u32,
    pub node_name: String,
    pub realtime: bool,
    pub control_socket: Option<PathBuf>,
    pub instances: Vec<InstanceCfg>,
    pub sync_groups: Vec<SyncGroupCfg>,
    pub scripts: Vec<ScriptCfg>,
    pub membership: Option<MembershipCfg>,
    /// First 16 bytes of SHA-256 of the file text (membership digest).
    pub digest: [u8; 16],
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let (line, col) = line_col(self.text, span.start);
        ConfigError {
            file: self.file.into(),
            line,
            col,
            key: key.into(),
            message: message.into(),
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn duration(ctx: &Ctx, s: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.get_ref()).map_err(|e| {
        ctx.err(
            s.span(),
            key,
            format!("bad duration {:?}: {e}", s.get_ref()),
        )
    })
}

fn ipv4(ctx: &Ctx, s: &Spanned<String>, key: &str) -> Result<Ipv4Addr, ConfigError> {
    s.get_ref().parse().map_err(|_| {
        ctx.err(
            s.span(),
            key,
            format!("not an IPv4 address: {:?}", s.get_ref()),
        )
    })
}

fn int_in(ctx: &Ctx, v: &Spanned<i64>, key: &str, lo: i64, hi: i64) -> Result<i64, ConfigError> {
    let x = *v.get_ref();
    if x < lo || x > hi {
        return Err(ctx.err(v.span(), key, format!("{x} is outside {lo}..={hi}")));
    }
    Ok(x)
}

fn ifname(ctx: &Ctx, s: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let n = s.get_ref();
    // IFNAMSIZ 16 including NUL; labels `IF:N` must fit too.
    if n.is_empty() || n.len() > 12 || n.contains(['/', ':', ' ']) {
        return Err(ctx.err(
            s.span(),
            key,
            format!("bad interface name {n:?} (1..12 chars, no '/', ':' or space)"),
        ));
    }
    Ok(n.clone())
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            col: 0,
            key: "-".into(),
            message: e.to_string(),
        })?;
        Config::parse(&file, &text)
    }

    /// Parses and validates `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let ctx = Ctx { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = text
                .get(span.clone())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty() && s.len() < 40)
                .unwrap_or_else(|| "-".into());
            ctx.err(span, &key, e.message().to_string())
        })?;
        validate(&ctx, raw)
    }
}

fn validate(ctx: &Ctx, raw: RawConfig) -> Result<Config, ConfigError> {
    use sha2::Digest;
    let mut scripts = Vec::new();
    for (n, s) in raw.script.iter().enumerate() {
        let k = |f: &str| format!("script[{n}].{f}");
        if scripts
            .iter()
            .any(|x: &ScriptCfg| &x.name == s.name.get_ref())
        {
            return Err(ctx.err(s.name.span(), &k("name"), "duplicate script name"));
        }
        if s.command.get_ref().is_empty() {
            return Err(ctx.err(s.command.span(), &k("command"), "empty command"));
        }
        let interval = duration(ctx, &s.interval, &k("interval"))?;
        if interval < Duration::from_millis(10) {
            return Err(ctx.err(s.interval.span(), &k("interval"), "must be at least 10ms"));
        }
        let timeout = match &s.timeout {
            Some(t) => duration(ctx, t, &k("timeout"))?,
            None => interval,
        };
        scripts.push(ScriptCfg {
            name: s.name.get_ref().clone(),
            command: s.command.get_ref().clone(),
            interval,
            timeout,
            weight: int_in(ctx, &s.weight, &k("weight"), -254, 254)? as i32,
            rise: int_in(ctx, &s.rise, &k("rise"), 1, 1000)? as u32,
            fall: int_in(ctx, &s.fall, &k("fall"), 1, 1000)? as u32,
        });
    }

    let mut instances: Vec<InstanceCfg> = Vec::new();
    for (n, r) in raw.instance.into_iter().enumerate() {
        let k = |f: &str| format!("instance[{n}].{f}");
        let name = r.name.get_ref().clone();
        if instances.iter().any(|i| i.name == name) {
            return Err(ctx.err(r.name.span(), &k("name"), "duplicate instance name"));
        }
        let interface = ifname(ctx, &r.interface, &k("interface"))?;
        let vrid = int_in(ctx, &r.vrid, &k("vrid"), 1, 255)? as u8;
        if instances
            .iter()
            .any(|i| i.vrid == vrid && i.interface == interface)
        {
            return Err(ctx.err(
                r.vrid.span(),
                &k("vrid"),
                "another instance uses this VRID on this interface",
            ));
        }
        let priority = int_in(ctx, &r.priority, &k("priority"), 1, 255)? as u8;
        let iv = duration(ctx, &r.advert_interval, &k("advert_interval"))?;
        let ms = iv.as_millis();
        // Max Adver Int is 12 bits of centiseconds (RFC 5798 §5.2.7).
        if ms % 10 != 0 || !(10..=40_950).contains(&ms) || iv.subsec_nanos() % 1_000_000 != 0 {
            return Err(ctx.err(
                r.advert_interval.span(),
                &k("advert_interval"),
                "must be a multiple of 10ms in 10ms..40.95s (centiseconds, RFC 5798 §5.2.7)",
            ));
        }
        let preempt_delay = match &r.preempt_delay {
            Some(d) => duration(ctx, d, &k("preempt_delay"))?,
            None => Duration::ZERO,
        };
        let primary = r
            .primary_address
            .as_ref()
            .map(|a| ipv4(ctx, a, &k("primary_address")))
            .transpose()?;
        let mut vips = Vec::new();
        if r.virtual_addresses.get_ref().is_empty() {
            return Err(ctx.err(
                r.virtual_addresses.span(),
                &k("virtual_addresses"),
                "at least one address",
            ));
        }
        for a in r.virtual_addresses.get_ref() {
            let key = k("virtual_addresses");
            let (ip, len) = match a.get_ref().split_once('/') {
                Some((ip, len)) => (ip, len.parse::<u8>().ok().filter(|l| *l <= 32)),
                None => (a.get_ref().as_str(), Some(32)),
            };
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                ctx.err(
                    a.span(),
                    &key,
                    format!("not an IPv4 address: {:?}", a.get_ref()),
                )
            })?;
            let len = len.ok_or_else(|| ctx.err(a.span(), &key, "bad prefix length"))?;
            if ip.is_multicast() || ip.is_unspecified() || ip.is_broadcast() {
                return Err(ctx.err(a.span(), &key, "not a unicast address"));
            }
            vips.push((ip, len));
        }
        let unicast_peers = r
            .unicast_peers
            .iter()
            .map(|p| ipv4(ctx, p, &k("unicast_peers")))
            .collect::<Result<_, _>>()?;
        let arp_mac = match &r.arp_mac {
            None => ArpMac::Interface,
            Some(s) => match s.get_ref().as_str() {
                "interface" => ArpMac::Interface,
                "vrrp" => ArpMac::VirtualRouter,
                m => ArpMac::Fixed(parse_mac(m).ok_or_else(|| {
                    ctx.err(
                        s.span(),
                        &k("arp_mac"),
                        "expected \"interface\", \"vrrp\" or a MAC aa:bb:cc:dd:ee:ff",
                    )
                })?),
            },
        };
        let track_interfaces = r
            .track_interfaces
            .iter()
            .map(|i| ifname(ctx, i, &k("track_interfaces")))
            .collect::<Result<_, _>>()?;
        let mut track_scripts = Vec::new();
        for t in &r.track_scripts {
            let idx = scripts
                .iter()
                .position(|s| &s.name == t.get_ref())
                .ok_or_else(|| {
                    ctx.err(
                        t.span(),
                        &k("track_scripts"),
                        format!("no [[script]] named {:?}", t.get_ref()),
                    )
                })?;
            track_scripts.push(idx);
        }
        let d = GarpConfig::default();
        let g = &r.garp;
        let garp = GarpConfig {
            repeat: match &g.repeat {
                Some(v) => int_in(ctx, v, &k("garp.repeat"), 0, 100)? as u32,
                None => d.repeat,
            },
            interval: g
                .interval
                .as_ref()
                .map(|v| duration(ctx, v, &k("garp.interval")))
                .transpose()?
                .unwrap_or(d.interval),
            master_delay: g
                .master_delay
                .as_ref()
                .map(|v| duration(ctx, v, &k("garp.master_delay")))
                .transpose()?
                .unwrap_or(d.master_delay),
            refresh: g
                .refresh
                .as_ref()
                .map(|v| duration(ctx, v, &k("garp.refresh")))
                .transpose()?
                .unwrap_or(d.refresh),
            refresh_repeat: match &g.refresh_repeat {
                Some(v) => int_in(ctx, v, &k("garp.refresh_repeat"), 1, 100)? as u32,
                None => d.refresh_repeat,
            },
        };
        instances.push(InstanceCfg {
            name,
            interface,
            vrid,
            priority,
            advert_interval_cs: (ms / 10) as u16,
            preempt: r.preempt,
            preempt_delay,
            primary,
            virtual_addresses: vips,
            unicast_peers,
            arp_mac,
            track_interfaces,
            track_scripts,
            garp,
            notify: r.notify.into(),
        });
    }

    let mut sync_groups = Vec::new();
    for (n, g) in raw.sync_group.into_iter().enumerate() {
        let key = format!("sync_group[{n}].members");
        let mut members = Vec::new();
        for m in g.members.get_ref() {
            let idx = instances
                .iter()
                .position(|i| &i.name == m.get_ref())
                .ok_or_else(|| {
                    ctx.err(
                        m.span(),
                        &key,
                        format!("no instance named {:?}", m.get_ref()),
                    )
                })?;
            let taken = sync_groups
                .iter()
                .any(|s: &SyncGroupCfg| s.members.contains(&idx))
                || members.contains(&idx);
            if taken {
                return Err(ctx.err(m.span(), &key, "instance already in a sync group"));
            }
            members.push(idx);
        }
        if members.len() < 2 {
            return Err(ctx.err(
                g.members.span(),
                &key,
                "a sync group needs at least two instances",
            ));
        }
        sync_groups.push(SyncGroupCfg {
            name: g.name,
            members,
            notify: g.notify.into(),
        });
    }

    let membership = match raw.membership {
        None => None,
        Some(m) => {
            let k = |f: &str| format!("membership.{f}");
            let interface = ifname(ctx, &m.interface, &k("interface"))?;
            let group = m
                .group
                .as_ref()
                .map(|g| ipv4(ctx, g, &k("group")))
                .transpose()?;
            if let (Some(g), Some(s)) = (group, &m.group)
                && !g.is_multicast()
            {
                return Err(ctx.err(s.span(), &k("group"), "not a multicast address"));
            }
            let peers: Vec<Ipv4Addr> = m
                .peers
                .iter()
                .map(|p| ipv4(ctx, p, &k("peers")))
                .collect::<Result<_, _>>()?;
            if group.is_none() && peers.is_empty() {
                return Err(ctx.err(
                    m.interface.span(),
                    &k("group"),
                    "set a multicast group or unicast peers",
                ));
            }
            if !m.nodes.get_ref().contains(raw.node.id.get_ref()) {
                return Err(ctx.err(m.nodes.span(), &k("nodes"), "must contain this node's id"));
            }
            let interval = duration(ctx, &m.interval, &k("interval"))?;
            if interval < Duration::from_millis(10) || interval > Duration::from_millis(60_000) {
                return Err(ctx.err(m.interval.span(), &k("interval"), "must be in 10ms..60s"));
            }
            let key = match (&m.key, &m.key_file) {
                (Some(s), None) => s.get_ref().as_bytes().to_vec(),
                (None, Some(p)) => std::fs::read(p.get_ref())
                    .map_err(|e| ctx.err(p.span(), &k("key_file"), e.to_string()))?,
                _ => {
                    return Err(ctx.err(
                        m.interface.span(),
                        &k("key"),
                        "set exactly one of key, key_file",
                    ));
                }
            };
            if key.len() < 16 {
                let span = m.key.as_ref().map(|s| s.span()).unwrap_or(0..0);
                return Err(ctx.err(span, &k("key"), "key must be at least 16 bytes"));
            }
            let max_age = m
                .max_age
                .as_ref()
                .map(|v| duration(ctx, v, &k("max_age")))
                .transpose()?;
            Some(MembershipCfg {
                interface,
                group,
                port: m.port,
                nodes: m.nodes.get_ref().clone(),
                peers,
                interval,
                key,
                weight: m.weight,
                max_age,
            })
        }
    };

    let digest_full = sha2::Sha256::digest(ctx.text.as_bytes());
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&digest_full[..16]);
    Ok(Config {
        node_id: *raw.node.id.get_ref(),
        node_name: raw
            .node
            .name
            .unwrap_or_else(|| format!("node{}", raw.node.id.get_ref())),
        realtime: raw.node.realtime,
        control_socket: raw.control.socket,
        instances,
        sync_groups,
        scripts,
        membership,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
id = 1

[[instance]]
name = "front"
interface = "front0"
vrid = 51
priority = 150
advert_interval = "100ms"
virtual_addresses = ["198.18.0.100/24"]
"#;

    fn err(text: &str) -> ConfigError {
        Config::parse("t.toml", text).expect_err("must be refused")
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse("t.toml", GOOD).expect("valid");
        let i = &c.instances[0];
        assert_eq!(
            (i.vrid, i.priority, i.advert_interval_cs, i.preempt),
            (51, 150, 10, true)
        );
        assert_eq!(
            i.virtual_addresses,
            vec![(Ipv4Addr::new(198, 18, 0, 100), 24)]
        );
        assert_eq!(i.garp, GarpConfig::default());
    }

    #[test]
    fn unknown_key_is_refused_with_position() {
        let e = err(&GOOD.replace("priority = 150", "priority = 150\npriorty = 3"));
        assert_eq!((e.line, e.col), (10, 1), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e.to_string().starts_with("t.toml:10:1: priorty:"), "{e}");
    }

    #[test]
    fn vrid_out_of_range_names_key_and_line() {
        let e = err(&GOOD.replace("vrid = 51", "vrid = 256"));
        assert_eq!(
            e.to_string(),
            "t.toml:8:8: instance[0].vrid: 256 is outside 1..=255"
        );
    }

    #[test]
    fn priority_zero_refused() {
        let e = err(&GOOD.replace("priority = 150", "priority = 0"));
        assert_eq!(e.key, "instance[0].priority");
    }

    #[test]
    fn interval_must_be_centiseconds() {
        for bad in ["5ms", "15ms", "41s", "0s"] {
            let e = err(&GOOD.replace("\"100ms\"", &format!("\"{bad}\"")));
            assert_eq!(
                (e.key.as_str(), e.line),
                ("instance[0].advert_interval", 10),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_address_and_arp_mac_refused() {
        assert_eq!(
            err(&GOOD.replace("198.18.0.100/24", "198.18.0.300")).key,
            "instance[0].virtual_addresses"
        );
        assert_eq!(
            err(&GOOD.replace("198.18.0.100/24", "198.18.0.100/33")).key,
            "instance[0].virtual_addresses"
        );
        assert_eq!(
            err(&GOOD.replace("198.18.0.100/24", "224.0.0.1")).key,
            "instance[0].virtual_addresses"
        );
        let e = err(&format!("{GOOD}arp_mac = \"zz\"\n"));
        assert_eq!(e.key, "instance[0].arp_mac");
    }

    #[test]
    fn unknown_tracked_script_and_sync_member_refused() {
        let e = err(&format!("{GOOD}track_scripts = [\"nope\"]\n"));
        assert_eq!(e.key, "instance[0].track_scripts");
        let e = err(&format!(
            "{GOOD}\n[[sync_group]]\nname = \"g\"\nmembers = [\"front\", \"back\"]\n"
        ));
        assert_eq!(e.key, "sync_group[0].members");
    }

    #[test]
    fn membership_key_rules() {
        let m =
            "\n[membership]\ninterface = \"front0\"\ngroup = \"239.255.77.77\"\nnodes = [1, 2]\n";
        assert_eq!(err(&format!("{GOOD}{m}")).key, "membership.key");
        assert_eq!(
            err(&format!("{GOOD}{m}key = \"short\"\n")).key,
            "membership.key"
        );
        assert_eq!(
            err(&format!(
                "{GOOD}{m}key = \"0123456789abcdef\"\nnodes2 = 1\n"
            ))
            .key,
            "nodes2"
        );
        let c =
            Config::parse("t", &format!("{GOOD}{m}key = \"0123456789abcdef\"\n")).expect("valid");
        assert_eq!(c.membership.expect("m").nodes, vec![1, 2]);
        let e = err(&format!(
            "{GOOD}\n[membership]\ninterface = \"front0\"\ngroup = \"10.0.0.1\"\nnodes = [1]\nkey = \"0123456789abcdef\"\n"
        ));
        assert_eq!(e.key, "membership.group");
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("configs dir") {
            let p = e.expect("entry").path();
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
            if name.starts_with("heartbeat-") && name.ends_with(".toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "expected example configs in {}", dir.display());
    }
}
