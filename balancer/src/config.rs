//! The node's TOML config: raw structs as written (unknown keys refused,
//! positions kept), then [`validate`](RawConfig::validate) into the plain
//! [`Config`] the rest of the node uses.
//!
//! Every error, syntax or semantic, reads `FILE:LINE:COLUMN: KEY: message`
//! where KEY is the dotted path (`service[1].backend[0].weight`).

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{ConfigError, ConfigErrorKind as Kind, Error, Result};
use crate::health::{HealthCheck, OnDown, Probe};
use crate::persist::Persistence;
use crate::shed::{DEFAULT_K, Shedding, Strategy};

/// Seed of the flow hash when the config sets none. Nodes of one cluster
/// must agree on it; a fixed default makes that the case out of the box.
pub const DEFAULT_FLOW_HASH_SEED: [u8; 16] = *b"balancer-flowkey";
/// TUN device for locally served flows when the config names none.
pub const DEFAULT_LOCAL_TUN: &str = "lbtun0";
/// Control socket when the config names none.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/balancer/balancer.sock";

// ---------------------------------------------------------------------------
// Validated config
// ---------------------------------------------------------------------------

/// A validated node config. Construct with [`Config::load`] or
/// [`Config::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from (for messages).
    pub source: PathBuf,
    pub node: Node,
    pub conntrack: Conntrack,
    /// In file order; the dataplane and [`crate::stats::Stats`] index them
    /// the same way.
    pub services: Vec<Service>,
    /// `[cluster]`: present when this node is one of several peer balancers.
    pub cluster: Option<Cluster>,
    /// `[feedback]`: the feedback master (agents on the real servers).
    pub feedback: Option<Feedback>,
}

/// `[feedback]`: the master end of the agents' NECP-style sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    /// Where agents connect (default `0.0.0.0:3262`).
    pub listen: std::net::SocketAddrV4,
    /// The shared HMAC key (at least 16 bytes).
    pub key: String,
    pub keepalive_interval: Duration,
    /// How long an agent may take to answer a keepalive.
    pub keepalive_timeout: Duration,
    /// Unanswered keepalives in a row that fail a server (NECP: 3).
    pub max_missed: u8,
    /// INIT and START must arrive within this.
    pub handshake_timeout: Duration,
    /// The smoothing factor `a` of `w = a*max(1,h) + (1-a)*w_prev`.
    pub alpha: f64,
    /// Networks agents may connect from (default: the back subnet).
    pub allow: Vec<Ipv4Net>,
    /// Agent connections at once.
    pub max_agents: u32,
    /// Refuse messages whose sequence is older than the wall clock minus
    /// this (needs synchronised clocks); none by default.
    pub max_age: Option<Duration>,
}

// `alpha` is validated into 0..=1, never NaN, so equality is total.
impl Eq for Feedback {}

/// `[service.pool]`: real servers that join by their agent's START, from
/// `network`, at most `max_servers` at once. Their slots are the last
/// backends of the service (named `pool-ADDRESS`), weight 0 until joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub network: Ipv4Net,
    pub forward: Forward,
    pub port: u16,
    pub max_servers: u32,
    /// Index of the first pool slot in the service's backends.
    pub first_slot: usize,
}

/// `[service.autoscale]`: the DVS service proxy's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Autoscale {
    pub rules: crate::feedback::autoscale::Rules,
    /// argv of the scale-up command; its environment names the service and
    /// the counts.
    pub scale_up: Vec<String>,
    /// argv of the scale-down command (also gets the server).
    pub scale_down: Vec<String>,
}

/// Largest pool network: a /24.
pub const MAX_POOL_SLOTS: u32 = 254;

/// How the VIP's frames reach the nodes of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// Every node receives every frame on a multicast cluster MAC and keeps
    /// the flows of its buckets (the default).
    Multicast,
    /// For networks that do not flood a multicast MAC: the MAC holder
    /// receives every frame on a unicast MAC and passes other nodes' flows
    /// to them by rewriting the destination MAC (DR between balancers).
    Director,
}

/// `[cluster]`: the node is one of several bi-active peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The embedded heartbeat's config (the `heartbeat run` format), resolved
    /// against the node config's directory. Node id and membership come
    /// from there.
    pub heartbeat: PathBuf,
    /// The heartbeat instance whose master is the active MAC holder.
    pub front_instance: String,
    /// How VIP frames reach the nodes.
    pub mode: ClusterMode,
    /// Multicast mode: the multicast MAC every node's front NIC accepts.
    /// Director mode: a unicast MAC only the MAC holder accepts. The MAC
    /// holder answers ARP for the VIPs with it.
    pub cluster_mac: rewrite::ethernet::MacAddr,
    /// Bucket table size (a prime).
    pub buckets: u32,
    /// Connection sync: UDP port and multicast group on the front NIC.
    pub sync_port: u16,
    pub sync_group: Ipv4Addr,
    /// Shared HMAC-SHA256 key of connection sync.
    pub sync_key: String,
    /// The back gateway address of each node's sub-cluster (its real
    /// servers' default route): a node sends new flows to a sub-cluster
    /// only while its heartbeat holds that gateway, so that the replies come
    /// back to it. Nodes without an entry: their own sub-cluster, and a dead
    /// node's.
    pub gateways: Vec<(u32, Ipv4Addr)>,
}

/// `[node]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Front NIC (clients, the VIP).
    pub front: String,
    /// Back NIC (real servers).
    pub back: String,
    /// Back-side gateway address with the back subnet's prefix; NAT real
    /// servers route through it. Backends are on-link inside this subnet.
    pub back_gateway: Ipv4Net,
    /// TUN device for locally served flows.
    pub local_tun: String,
    pub control_socket: PathBuf,
    pub flow_hash_seed: [u8; 16],
}

/// `[conntrack]`: IPVS-like timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conntrack {
    pub max_entries: usize,
    pub tcp_syn_recv: Duration,
    pub tcp_established: Duration,
    pub tcp_fin_wait: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_last_ack: Duration,
    pub tcp_time_wait: Duration,
    pub tcp_close: Duration,
    pub udp: Duration,
    /// How often the dataplane runs expiry.
    pub expire_interval: Duration,
}

impl Default for Conntrack {
    /// The IPVS defaults (`ipvsadm --set` and the kernel's timeout table).
    fn default() -> Self {
        Conntrack {
            max_entries: 1 << 20,
            tcp_syn_recv: Duration::from_secs(60),
            tcp_established: Duration::from_secs(900),
            tcp_fin_wait: Duration::from_secs(120),
            tcp_close_wait: Duration::from_secs(60),
            tcp_last_ack: Duration::from_secs(30),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(300),
            expire_interval: Duration::from_millis(100),
        }
    }
}

/// `[[service]]`: a virtual service VIP:port/protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    /// In file order; at least one that is not the sorry server.
    pub backends: Vec<Backend>,
    /// `max_conns`: connections (active + inactive) from which new flows
    /// are refused; 0 = no limit.
    pub max_conns: u32,
    /// `[service.persistence]`: source-address affinity.
    pub persistence: Option<Persistence>,
    /// `[service.shed]`: load shedding on the service's connection count.
    pub shedding: Option<Shedding>,
    /// `[service.health]`: health checks of every backend.
    pub health: Option<HealthCheck>,
    /// `[service.pool]`: servers that join by feedback; their slots are the
    /// last backends.
    pub pool: Option<Pool>,
    /// `[service.autoscale]`.
    pub autoscale: Option<Autoscale>,
}

/// `[[service.backend]]`: a real server, or the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    /// `Some` for nat and dr (inside the back subnet), `None` for local.
    pub address: Option<Ipv4Addr>,
    /// Equal to the service port for dr and local.
    pub port: u16,
    /// 0 = drained: keeps its connections, gets no new ones.
    pub weight: u16,
    pub forward: Forward,
    /// Connection limit (active + inactive); 0 = none. A backend at its
    /// limit gets no new flows.
    pub max_conns: u32,
    /// `fns`: saturated from this many connections on; 0 = never.
    pub high_water: u32,
    /// The sorry server: only used when no other backend can take a flow.
    pub sorry: bool,
    /// The cluster node whose sub-cluster this real server belongs to (it
    /// routes through that node's back gateway); `None`: any node's.
    pub node: Option<u32>,
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => rewrite::flow::proto::TCP,
            Protocol::Udp => rewrite::flow::proto::UDP,
        }
    }
}

/// Scheduling algorithm of a service: the scheduler module's own kind, so
/// that adding a scheduler there makes it configurable here.
pub use crate::sched::SchedulerKind as Scheduler;

/// How packets reach a backend: the connection table's method.
pub use crate::conntrack::Method as Forward;

macro_rules! str_enum_impls {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        format!("unknown value `{s}`, expected one of {}", names.join(", "))
                    })
            }
        }
    )*};
}
str_enum_impls!(Protocol);

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only names the file in messages.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Config> {
        RawConfig::parse(text, path.as_ref())?.validate()
    }

    /// The VIPs of all services, deduplicated, in order of first use.
    pub fn vips(&self) -> Vec<Ipv4Addr> {
        let mut vips: Vec<Ipv4Addr> = Vec::new();
        for s in &self.services {
            if !vips.contains(&s.vip) {
                vips.push(s.vip);
            }
        }
        vips
    }

    /// Whether any service has a `local` backend.
    pub fn has_local(&self) -> bool {
        self.services
            .iter()
            .any(|s| s.backends.iter().any(|b| b.forward == Forward::Local))
    }

    /// The index of the service for (vip, port, protocol), if any.
    pub fn service_index(&self, vip: Ipv4Addr, port: u16, protocol: Protocol) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.vip == vip && s.port == port && s.protocol == protocol)
    }
}

// ---------------------------------------------------------------------------
// Raw config, as written
// ---------------------------------------------------------------------------

/// The config as written, with positions, before semantic validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    node: Spanned<RawNode>,
    #[serde(default)]
    conntrack: Option<Spanned<RawConntrack>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    feedback: Option<Spanned<RawFeedback>>,
    #[serde(skip)]
    ctx: Ctx,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeedback {
    listen: Option<Spanned<String>>,
    key: Spanned<String>,
    keepalive_interval: Option<SpannedDuration>,
    keepalive_timeout: Option<SpannedDuration>,
    max_missed: Option<Spanned<i64>>,
    handshake_timeout: Option<SpannedDuration>,
    alpha: Option<Spanned<f64>>,
    allow: Option<Vec<Spanned<String>>>,
    max_agents: Option<Spanned<i64>>,
    max_age: Option<SpannedDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    network: Spanned<String>,
    forward: Spanned<Forward>,
    port: Option<Spanned<i64>>,
    max_servers: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscale {
    start_period: SpannedDuration,
    shutdown_period: SpannedDuration,
    cooldown: Option<SpannedDuration>,
    min_servers: Option<Spanned<i64>>,
    max_servers: Option<Spanned<i64>>,
    scale_up: Spanned<Vec<String>>,
    scale_down: Spanned<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    heartbeat: Spanned<String>,
    mode: Option<Spanned<ClusterMode>>,
    front_instance: Option<Spanned<String>>,
    cluster_mac: Spanned<String>,
    buckets: Option<Spanned<i64>>,
    sync_port: Option<Spanned<i64>>,
    sync_group: Option<Spanned<String>>,
    sync_key: Spanned<String>,
    #[serde(default)]
    gateways: std::collections::BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    front: Spanned<String>,
    back: Spanned<String>,
    back_gateway: Spanned<String>,
    local_tun: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    flow_hash_seed: Option<Spanned<String>>,
}

type SpannedDuration = Spanned<humantime_serde::Serde<Duration>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    max_entries: Option<Spanned<i64>>,
    tcp_syn_recv: Option<SpannedDuration>,
    tcp_established: Option<SpannedDuration>,
    tcp_fin_wait: Option<SpannedDuration>,
    tcp_close_wait: Option<SpannedDuration>,
    tcp_last_ack: Option<SpannedDuration>,
    tcp_time_wait: Option<SpannedDuration>,
    tcp_close: Option<SpannedDuration>,
    udp: Option<SpannedDuration>,
    expire_interval: Option<SpannedDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Spanned<String>,
    port: Spanned<i64>,
    protocol: Option<Spanned<Protocol>>,
    scheduler: Option<Spanned<Scheduler>>,
    max_conns: Option<Spanned<i64>>,
    persistence: Option<Spanned<RawPersistence>>,
    shed: Option<Spanned<RawShed>>,
    health: Option<Spanned<RawHealth>>,
    pool: Option<Spanned<RawPool>>,
    autoscale: Option<Spanned<RawAutoscale>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPersistence {
    timeout: SpannedDuration,
    netmask: Option<Spanned<String>>,
}

/// Shedding strategies by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ShedName {
    Hard,
    Exponential,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShed {
    strategy: Spanned<ShedName>,
    threshold: Spanned<i64>,
    k: Option<Spanned<f64>>,
}

/// Health check kinds by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CheckName {
    Tcp,
    Http,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Spanned<CheckName>,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<i64>>,
    expect_body: Option<Spanned<String>>,
    interval: Option<SpannedDuration>,
    timeout: Option<SpannedDuration>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    on_down: Option<Spanned<OnDown>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    forward: Spanned<Forward>,
    max_conns: Option<Spanned<i64>>,
    high_water: Option<Spanned<i64>>,
    sorry: Option<Spanned<bool>>,
    node: Option<Spanned<i64>>,
}

/// What validation needs to turn a byte offset into `FILE:LINE:COLUMN`.
#[derive(Debug, Default)]
struct Ctx {
    file: PathBuf,
    text: String,
}

impl Ctx {
    fn err(
        &self,
        span: &Range<usize>,
        key: impl Into<String>,
        kind: Kind,
        message: impl Into<String>,
    ) -> Error {
        let (line, column) = line_column(&self.text, span.start);
        ConfigError {
            file: self.file.clone(),
            line,
            column,
            key: key.into(),
            kind,
            message: message.into(),
        }
        .into()
    }
}

/// 1-based line and character column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl RawConfig {
    /// Parses TOML into the raw structs: syntax errors, unknown keys,
    /// missing keys and wrong types are reported here.
    pub fn parse(text: &str, path: &Path) -> Result<RawConfig> {
        let ctx = Ctx {
            file: path.to_path_buf(),
            text: text.to_owned(),
        };
        // Parse the document first on its own: its tree gives the key path
        // of any later serde error.
        let tree = match DeTable::parse(text) {
            Ok(tree) => tree,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let key = syntax_error_key(text, span.start);
                return Err(ctx.err(&span, key, Kind::Syntax, first_line(e.message())));
            }
        };
        match toml::from_str::<RawConfig>(text) {
            Ok(mut raw) => {
                raw.ctx = ctx;
                Ok(raw)
            }
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = first_line(e.message());
                let (kind, missing) = classify_serde_error(&message);
                let mut key = key_at(&tree, span.start).unwrap_or_default();
                if let Some(field) = missing {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(&field);
                }
                if key.is_empty() {
                    key = "(document)".to_owned();
                }
                Err(ctx.err(&span, key, kind, message))
            }
        }
    }
}

/// The key of a syntax error: the key on the error's line in what the
/// parser could recover, else the table header on that line, else
/// `(document)`.
fn syntax_error_key(text: &str, offset: usize) -> String {
    let (line, _) = line_column(text, offset);
    let recovered = DeTable::parse_recoverable(text).0;
    if let Some(key) = key_at(&recovered, offset) {
        // Recovery can attach the offset to an unrelated element: only
        // trust a key on the same line.
        if text.lines().nth(line - 1).is_some_and(|l| {
            let leaf = key.rsplit('.').next().unwrap_or(&key);
            let leaf = leaf.split('[').next().unwrap_or(leaf);
            l.contains(leaf)
        }) {
            return key;
        }
    }
    let header = text.lines().nth(line - 1).map(str::trim).unwrap_or("");
    if header.starts_with('[') {
        let name = header.trim_matches(|c| c == '[' || c == ']' || c == ' ');
        if !name.is_empty() {
            return name.to_owned();
        }
    }
    "(document)".to_owned()
}

fn first_line(message: &str) -> String {
    message.trim().lines().next().unwrap_or("").to_owned()
}

/// The kind of a serde error from its message, and for a missing field its
/// name (serde's messages are the only structure it offers).
fn classify_serde_error(message: &str) -> (Kind, Option<String>) {
    let quoted = |m: &str| m.split('`').nth(1).map(str::to_owned);
    if message.starts_with("unknown field") {
        (Kind::UnknownKey, None)
    } else if message.starts_with("missing field") {
        (Kind::MissingKey, quoted(message))
    } else if message.contains("as i128")
        || (message.starts_with("invalid value") && message.contains("expected i64"))
    {
        (Kind::OutOfRange, None)
    } else {
        (Kind::WrongType, None)
    }
}

/// The dotted key path of the deepest key or value whose span contains
/// `offset`; for a table (header) it is the table's path.
fn key_at(root: &Spanned<DeTable<'_>>, offset: usize) -> Option<String> {
    fn contains(span: &Range<usize>, offset: usize) -> bool {
        span.contains(&offset) || (span.is_empty() && span.start == offset)
    }
    fn value(v: &Spanned<DeValue<'_>>, path: String, offset: usize) -> Option<String> {
        match v.get_ref() {
            DeValue::Table(t) => {
                table(t, &path, offset).or_else(|| contains(&v.span(), offset).then_some(path))
            }
            DeValue::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, e)| value(e, format!("{path}[{i}]"), offset))
                .or_else(|| contains(&v.span(), offset).then_some(path)),
            _ => contains(&v.span(), offset).then_some(path),
        }
    }
    fn table(t: &DeTable<'_>, prefix: &str, offset: usize) -> Option<String> {
        t.iter().find_map(|(k, v)| {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            if contains(&k.span(), offset) {
                Some(path)
            } else {
                value(v, path, offset)
            }
        })
    }
    table(root.get_ref(), "", offset)
}

// ---------------------------------------------------------------------------
// Semantic validation
// ---------------------------------------------------------------------------

/// Linux `dev_valid_name`: 1..=15 bytes, not `.`/`..`, no `/`, `:` or
/// whitespace (`:` would also clash with the `DEV:N` alias labels).
fn check_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("interface name `{name}` must be 1 to 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "interface name `{name}` must not contain '/', ':' or whitespace"
        ));
    }
    Ok(())
}

/// Service and backend names are shown in `status` and logs: printable,
/// 1..=64 characters.
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.chars().count() > 64 {
        return Err("a name must be 1 to 64 characters".to_owned());
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("name `{name}` must not contain whitespace"));
    }
    Ok(())
}

fn parse_seed(text: &str) -> std::result::Result<[u8; 16], String> {
    let text = text.strip_prefix("0x").unwrap_or(text);
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 32 hex digits (16 bytes)".to_owned());
    }
    let mut seed = [0u8; 16];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(seed)
}

impl RawConfig {
    /// Semantic validation into the plain [`Config`].
    pub fn validate(self) -> Result<Config> {
        let ctx = &self.ctx;
        let node = self.validate_node()?;
        let conntrack = self.validate_conntrack()?;

        if self.service.is_empty() {
            return Err(ctx.err(
                &(ctx.text.len()..ctx.text.len()),
                "service",
                Kind::NoService,
                "at least one [[service]] is required",
            ));
        }
        let mut services: Vec<Service> = Vec::with_capacity(self.service.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        for (si, raw) in self.service.iter().enumerate() {
            let service = validate_service(ctx, &node, si, raw)?;
            let key = format!("service[{si}]");
            if let Some(prev) = names.insert(service.name.clone(), si) {
                return Err(ctx.err(
                    &raw.get_ref().name.span(),
                    format!("{key}.name"),
                    Kind::DuplicateName,
                    format!(
                        "service name `{}` is already used by service[{prev}]",
                        service.name
                    ),
                ));
            }
            if let Some(prev) = services.iter().position(|s| {
                s.vip == service.vip && s.port == service.port && s.protocol == service.protocol
            }) {
                return Err(ctx.err(
                    &raw.span(),
                    key,
                    Kind::DuplicateService,
                    format!(
                        "{}:{}/{} is already defined by service[{prev}] `{}`",
                        service.vip, service.port, service.protocol, services[prev].name
                    ),
                ));
            }
            services.push(service);
        }
        let cluster = self.validate_cluster()?;
        let feedback = self.validate_feedback(&node)?;
        if feedback.is_none()
            && let Some((si, raw)) = self
                .service
                .iter()
                .enumerate()
                .find(|(_, s)| s.get_ref().pool.is_some() || s.get_ref().autoscale.is_some())
        {
            let r = raw.get_ref();
            let (span, k) = match (&r.pool, &r.autoscale) {
                (Some(p), _) => (p.span(), "pool"),
                (None, Some(a)) => (a.span(), "autoscale"),
                (None, None) => (raw.span(), "pool"),
            };
            return Err(ctx.err(
                &span,
                format!("service[{si}].{k}"),
                Kind::NeedsFeedback,
                "servers join a pool and report load through their agents: add [feedback]",
            ));
        }
        Ok(Config {
            source: ctx.file.clone(),
            node,
            conntrack,
            services,
            cluster,
            feedback,
        })
    }

    fn validate_cluster(&self) -> Result<Option<Cluster>> {
        let ctx = &self.ctx;
        let Some(raw) = &self.cluster else {
            return Ok(None);
        };
        let raw = raw.get_ref();
        let hb = raw.heartbeat.get_ref();
        if hb.is_empty() {
            return Err(ctx.err(
                &raw.heartbeat.span(),
                "cluster.heartbeat",
                Kind::BadValue,
                "expected a file path",
            ));
        }
        let dir = ctx.file.parent().map(Path::to_path_buf).unwrap_or_default();
        let heartbeat = dir.join(hb);
        let mac_text = raw.cluster_mac.get_ref();
        let cluster_mac: rewrite::ethernet::MacAddr = mac_text.parse().map_err(|_| {
            ctx.err(
                &raw.cluster_mac.span(),
                "cluster.cluster_mac",
                Kind::BadValue,
                format!("`{mac_text}` is not a MAC address"),
            )
        })?;
        let mode = raw
            .mode
            .as_ref()
            .map_or(ClusterMode::Multicast, |m| *m.get_ref());
        let bad = match mode {
            ClusterMode::Multicast if !cluster_mac.is_multicast() || cluster_mac.is_broadcast() => {
                Some(
                    "must be a multicast MAC (first octet odd), not broadcast: in multicast mode every node's NIC accepts it",
                )
            }
            ClusterMode::Director if cluster_mac.is_multicast() => Some(
                "must be a unicast MAC in director mode (e.g. the VRRP virtual MAC 00:00:5e:00:01:VRID)",
            ),
            _ => None,
        };
        if let Some(why) = bad {
            return Err(ctx.err(
                &raw.cluster_mac.span(),
                "cluster.cluster_mac",
                Kind::BadValue,
                format!("`{mac_text}` {why}"),
            ));
        }
        let buckets = match &raw.buckets {
            None => 65_537,
            Some(b) => {
                let v = *b.get_ref();
                if !(7..=1_048_573).contains(&v) || !rewrite::maglev::is_prime(v as u32) {
                    return Err(ctx.err(
                        &b.span(),
                        "cluster.buckets",
                        Kind::OutOfRange,
                        format!("{v} must be a prime between 7 and 1048573"),
                    ));
                }
                v as u32
            }
        };
        let sync_port = match &raw.sync_port {
            None => 7790,
            Some(p) => {
                let v = *p.get_ref();
                if !(1..=65535).contains(&v) {
                    return Err(ctx.err(
                        &p.span(),
                        "cluster.sync_port",
                        Kind::OutOfRange,
                        format!("{v} is not a port (1..=65535)"),
                    ));
                }
                v as u16
            }
        };
        let sync_group = match &raw.sync_group {
            None => Ipv4Addr::new(239, 255, 77, 78),
            Some(g) => {
                let v: Ipv4Addr = g.get_ref().parse().map_err(|_| {
                    ctx.err(
                        &g.span(),
                        "cluster.sync_group",
                        Kind::BadValue,
                        format!("`{}` is not an IPv4 address", g.get_ref()),
                    )
                })?;
                if !v.is_multicast() {
                    return Err(ctx.err(
                        &g.span(),
                        "cluster.sync_group",
                        Kind::BadValue,
                        format!("`{v}` is not a multicast group"),
                    ));
                }
                v
            }
        };
        let key = raw.sync_key.get_ref();
        if key.len() < 16 {
            return Err(ctx.err(
                &raw.sync_key.span(),
                "cluster.sync_key",
                Kind::BadValue,
                "the sync key must be at least 16 bytes",
            ));
        }
        let mut gateways = Vec::new();
        for (id, addr) in &raw.gateways {
            let key = format!("cluster.gateways.{id}");
            let node: u32 = id.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                ctx.err(
                    &addr.span(),
                    key.clone(),
                    Kind::BadValue,
                    format!("`{id}` is not a node id"),
                )
            })?;
            let ip: Ipv4Addr = addr.get_ref().parse().map_err(|_| {
                ctx.err(
                    &addr.span(),
                    key.clone(),
                    Kind::BadValue,
                    format!("`{}` is not an IPv4 address", addr.get_ref()),
                )
            })?;
            gateways.push((node, ip));
        }
        let front_instance = raw
            .front_instance
            .as_ref()
            .map_or_else(|| "front".to_owned(), |f| f.get_ref().clone());
        Ok(Some(Cluster {
            heartbeat,
            mode,
            front_instance,
            cluster_mac,
            buckets,
            sync_port,
            sync_group,
            sync_key: key.clone(),
            gateways,
        }))
    }

    fn validate_node(&self) -> Result<Node> {
        let ctx = &self.ctx;
        let raw = self.node.get_ref();

        let name = raw.name.get_ref();
        // Also the nft table name `balancer_<name>`: keep it an identifier.
        if name.is_empty()
            || name.len() > 32
            || !name.starts_with(|c: char| c.is_ascii_alphabetic())
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ctx.err(
                &raw.name.span(),
                "node.name",
                Kind::BadValue,
                format!("node name `{name}` must be 1 to 32 ASCII letters, digits, '_' or '-', starting with a letter"),
            ));
        }

        let mut ifaces: Vec<(&'static str, &Spanned<String>)> =
            vec![("node.front", &raw.front), ("node.back", &raw.back)];
        let default_tun = Spanned::new(0..0, DEFAULT_LOCAL_TUN.to_owned());
        let tun = raw.local_tun.as_ref().unwrap_or(&default_tun);
        ifaces.push(("node.local_tun", tun));
        for (i, (key, value)) in ifaces.iter().enumerate() {
            check_ifname(value.get_ref())
                .map_err(|m| ctx.err(&value.span(), *key, Kind::BadInterfaceName, m))?;
            if let Some((other, _)) = ifaces[..i]
                .iter()
                .find(|(_, v)| v.get_ref() == value.get_ref())
            {
                let span = if value.span().is_empty() {
                    self.node.span()
                } else {
                    value.span()
                };
                return Err(ctx.err(
                    &span,
                    *key,
                    Kind::SameInterface,
                    format!(
                        "`{}` is also {other}; the node needs distinct devices",
                        value.get_ref()
                    ),
                ));
            }
        }

        let gw_text = raw.back_gateway.get_ref();
        let back_gateway: Ipv4Net = gw_text.parse().map_err(|_| {
            ctx.err(
                &raw.back_gateway.span(),
                "node.back_gateway",
                Kind::BadValue,
                format!(
                    "`{gw_text}` is not an IPv4 address with prefix length, like 198.19.0.1/24"
                ),
            )
        })?;
        if back_gateway.prefix_len() > 30
            || back_gateway.addr() == back_gateway.network()
            || back_gateway.addr() == back_gateway.broadcast()
        {
            return Err(ctx.err(
                &raw.back_gateway.span(),
                "node.back_gateway",
                Kind::BadGateway,
                format!(
                    "`{back_gateway}` must be a host address of a subnet of /30 or larger (not its network or broadcast address)"
                ),
            ));
        }

        let control_socket = raw.control_socket.as_ref().map_or_else(
            || PathBuf::from(DEFAULT_CONTROL_SOCKET),
            |s| PathBuf::from(s.get_ref()),
        );
        if let Some(s) = &raw.control_socket
            && (s.get_ref().is_empty() || s.get_ref().ends_with('/'))
        {
            return Err(ctx.err(
                &s.span(),
                "node.control_socket",
                Kind::BadValue,
                "expected a socket file path",
            ));
        }

        let flow_hash_seed = match &raw.flow_hash_seed {
            None => DEFAULT_FLOW_HASH_SEED,
            Some(s) => parse_seed(s.get_ref())
                .map_err(|m| ctx.err(&s.span(), "node.flow_hash_seed", Kind::BadValue, m))?,
        };

        Ok(Node {
            name: name.clone(),
            front: raw.front.get_ref().clone(),
            back: raw.back.get_ref().clone(),
            back_gateway,
            local_tun: tun.get_ref().clone(),
            control_socket,
            flow_hash_seed,
        })
    }

    fn validate_conntrack(&self) -> Result<Conntrack> {
        let ctx = &self.ctx;
        let mut c = Conntrack::default();
        let Some(raw) = &self.conntrack else {
            return Ok(c);
        };
        let raw = raw.get_ref();
        if let Some(m) = &raw.max_entries {
            let v = *m.get_ref();
            // The table is preallocated: keep it to what a node can hold.
            if !(1..=(1 << 26)).contains(&v) {
                return Err(ctx.err(
                    &m.span(),
                    "conntrack.max_entries",
                    Kind::OutOfRange,
                    format!("{v} is out of range 1..=67108864"),
                ));
            }
            c.max_entries = usize::try_from(v).unwrap_or(c.max_entries);
        }
        let durations: [(&str, &Option<SpannedDuration>, &mut Duration); 9] = [
            ("tcp_syn_recv", &raw.tcp_syn_recv, &mut c.tcp_syn_recv),
            (
                "tcp_established",
                &raw.tcp_established,
                &mut c.tcp_established,
            ),
            ("tcp_fin_wait", &raw.tcp_fin_wait, &mut c.tcp_fin_wait),
            ("tcp_close_wait", &raw.tcp_close_wait, &mut c.tcp_close_wait),
            ("tcp_last_ack", &raw.tcp_last_ack, &mut c.tcp_last_ack),
            ("tcp_time_wait", &raw.tcp_time_wait, &mut c.tcp_time_wait),
            ("tcp_close", &raw.tcp_close, &mut c.tcp_close),
            ("udp", &raw.udp, &mut c.udp),
            (
                "expire_interval",
                &raw.expire_interval,
                &mut c.expire_interval,
            ),
        ];
        for (key, value, slot) in durations {
            if let Some(v) = value {
                let d: Duration = **v.get_ref();
                if d.is_zero() {
                    return Err(ctx.err(
                        &v.span(),
                        format!("conntrack.{key}"),
                        Kind::OutOfRange,
                        "must be greater than zero",
                    ));
                }
                *slot = d;
            }
        }
        Ok(c)
    }
}

fn check_port(ctx: &Ctx, value: &Spanned<i64>, key: &str) -> Result<u16> {
    let v = *value.get_ref();
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ctx.err(
            &value.span(),
            key,
            Kind::OutOfRange,
            format!("port {v} is out of range 1..=65535"),
        )),
    }
}

fn parse_addr(ctx: &Ctx, value: &Spanned<String>, key: &str) -> Result<Ipv4Addr> {
    value.get_ref().parse().map_err(|_| {
        ctx.err(
            &value.span(),
            key,
            Kind::BadValue,
            format!("`{}` is not an IPv4 address", value.get_ref()),
        )
    })
}

fn validate_service(
    ctx: &Ctx,
    node: &Node,
    si: usize,
    raw: &Spanned<RawService>,
) -> Result<Service> {
    let key = format!("service[{si}]");
    let r = raw.get_ref();
    let name = r.name.get_ref().clone();
    check_name(&name)
        .map_err(|m| ctx.err(&r.name.span(), format!("{key}.name"), Kind::BadValue, m))?;
    let vip = parse_addr(ctx, &r.vip, &format!("{key}.vip"))?;
    if vip.is_unspecified() || vip.is_multicast() || vip.is_broadcast() || vip.is_loopback() {
        return Err(ctx.err(
            &r.vip.span(),
            format!("{key}.vip"),
            Kind::BadValue,
            format!("{vip} cannot be a service address"),
        ));
    }
    let gw = node.back_gateway;
    if gw.contains(&vip) {
        return Err(ctx.err(
            &r.vip.span(),
            format!("{key}.vip"),
            Kind::VipInBackSubnet,
            format!(
                "VIP {vip} is inside the back subnet {} of back_gateway; DR real servers hold the VIP on lo and would answer for it on the back segment",
                gw.trunc()
            ),
        ));
    }
    let port = check_port(ctx, &r.port, &format!("{key}.port"))?;
    let protocol = r.protocol.as_ref().map_or(Protocol::Tcp, |p| *p.get_ref());
    let scheduler = r
        .scheduler
        .as_ref()
        .map_or(Scheduler::Wrr, |s| *s.get_ref());

    if r.backend.is_empty() && r.pool.is_none() {
        return Err(ctx.err(
            &raw.span(),
            format!("{key}.backend"),
            Kind::NoBackend,
            format!("service `{name}` needs at least one [[service.backend]]"),
        ));
    }
    let mut backends: Vec<Backend> = Vec::with_capacity(r.backend.len());
    for (bi, rb) in r.backend.iter().enumerate() {
        let bkey = format!("{key}.backend[{bi}]");
        let b = rb.get_ref();
        let forward = *b.forward.get_ref();
        let address = match (forward, &b.address) {
            (Forward::Local, Some(a)) => {
                return Err(ctx.err(
                    &a.span(),
                    format!("{bkey}.address"),
                    Kind::LocalWithAddress,
                    "a local backend is the node itself and takes no address",
                ));
            }
            (Forward::Local, None) => None,
            (_, None) => {
                return Err(ctx.err(
                    &rb.span(),
                    format!("{bkey}.address"),
                    Kind::MissingAddress,
                    format!("a {forward} backend needs an address"),
                ));
            }
            (_, Some(a)) => {
                let akey = format!("{bkey}.address");
                let addr = parse_addr(ctx, a, &akey)?;
                if addr == gw.addr() {
                    return Err(ctx.err(
                        &a.span(),
                        akey,
                        Kind::BackendIsGateway,
                        format!("{addr} is the node's back_gateway"),
                    ));
                }
                if !gw.contains(&addr) || addr == gw.network() || addr == gw.broadcast() {
                    return Err(ctx.err(
                        &a.span(),
                        akey,
                        Kind::BackendOffLink,
                        format!(
                            "{addr} is not a host of the back subnet {} (back_gateway); {forward} backends must be on-link on the back segment",
                            gw.trunc()
                        ),
                    ));
                }
                Some(addr)
            }
        };
        let bport = match &b.port {
            None => port,
            Some(p) => {
                let pkey = format!("{bkey}.port");
                let bp = check_port(ctx, p, &pkey)?;
                if forward != Forward::Nat && bp != port {
                    return Err(ctx.err(
                        &p.span(),
                        pkey,
                        Kind::PortMismatch,
                        format!(
                            "a {forward} backend cannot change the port: must equal the service port {port} (only nat rewrites ports)"
                        ),
                    ));
                }
                bp
            }
        };
        let weight = match &b.weight {
            None => 1,
            Some(w) => u16::try_from(*w.get_ref()).map_err(|_| {
                ctx.err(
                    &w.span(),
                    format!("{bkey}.weight"),
                    Kind::OutOfRange,
                    format!("weight {} is out of range 0..=65535", w.get_ref()),
                )
            })?,
        };
        let name = match &b.name {
            Some(n) => {
                check_name(n.get_ref())
                    .map_err(|m| ctx.err(&n.span(), format!("{bkey}.name"), Kind::BadValue, m))?;
                n.get_ref().clone()
            }
            None => match address {
                Some(a) => format!("{a}:{bport}"),
                None => "local".to_owned(),
            },
        };
        // Where to point a clash with an earlier backend: its address if
        // written, else the table.
        let here = b.address.as_ref().map_or_else(|| rb.span(), |a| a.span());
        if forward == Forward::Local
            && let Some(prev) = backends.iter().position(|x| x.forward == Forward::Local)
        {
            return Err(ctx.err(
                &b.forward.span(),
                format!("{bkey}.forward"),
                Kind::SecondLocalBackend,
                format!(
                    "service `{}` already has a local backend: backend[{prev}]",
                    r.name.get_ref()
                ),
            ));
        }
        if let Some(prev) = backends
            .iter()
            .position(|x| x.address.is_some() && x.address == address && x.port == bport)
        {
            return Err(ctx.err(
                &here,
                format!("{bkey}.address"),
                Kind::DuplicateBackend,
                format!(
                    "{}:{bport} is already backend[{prev}] of this service",
                    address.map_or_else(String::new, |a| a.to_string())
                ),
            ));
        }
        if let Some(prev) = backends.iter().position(|x| x.name == name) {
            let (span, k) = match &b.name {
                Some(n) => (n.span(), format!("{bkey}.name")),
                None => (rb.span(), bkey.clone()),
            };
            return Err(ctx.err(
                &span,
                k,
                Kind::DuplicateName,
                format!("backend name `{name}` is already used by backend[{prev}]"),
            ));
        }
        let max_conns = match &b.max_conns {
            None => 0,
            Some(v) => count(ctx, v, &format!("{bkey}.max_conns"))?,
        };
        let high_water = match &b.high_water {
            None => 0,
            Some(v) => {
                let hw = count(ctx, v, &format!("{bkey}.high_water"))?;
                if max_conns != 0 && hw > max_conns {
                    return Err(ctx.err(
                        &v.span(),
                        format!("{bkey}.high_water"),
                        Kind::Inconsistent,
                        format!("high_water {hw} is above max_conns {max_conns}: the backend would never be saturated"),
                    ));
                }
                hw
            }
        };
        let sorry = b.sorry.as_ref().is_some_and(|v| *v.get_ref());
        if sorry && let Some(prev) = backends.iter().position(|x| x.sorry) {
            let span = b.sorry.as_ref().map_or_else(|| rb.span(), |v| v.span());
            return Err(ctx.err(
                &span,
                format!("{bkey}.sorry"),
                Kind::SecondSorryBackend,
                format!("backend[{prev}] is already the sorry server of this service"),
            ));
        }
        let node = match &rb.get_ref().node {
            None => None,
            Some(n) => {
                let v = *n.get_ref();
                if !(1..=i64::from(u32::MAX)).contains(&v) {
                    return Err(ctx.err(
                        &n.span(),
                        format!("{bkey}.node"),
                        Kind::OutOfRange,
                        format!("{v} is not a node id (1..=4294967295)"),
                    ));
                }
                Some(v as u32)
            }
        };
        backends.push(Backend {
            name,
            address,
            port: bport,
            weight,
            forward,
            max_conns,
            high_water,
            sorry,
            node,
        });
    }
    // Pool slots come after the configured backends.
    let pool = r
        .pool
        .as_ref()
        .map(|p| validate_pool(ctx, node, &key, port, p, &mut backends))
        .transpose()?;
    if backends.iter().all(|b| b.sorry) {
        return Err(ctx.err(
            &raw.span(),
            format!("{key}.backend"),
            Kind::NoRegularBackend,
            "the sorry server is only used when the others are out; the service needs another backend",
        ));
    }
    let max_conns = match &r.max_conns {
        None => 0,
        Some(v) => count(ctx, v, &format!("{key}.max_conns"))?,
    };
    let persistence = r
        .persistence
        .as_ref()
        .map(|p| validate_persistence(ctx, &key, p))
        .transpose()?;
    let shedding = r
        .shed
        .as_ref()
        .map(|s| validate_shed(ctx, &key, s))
        .transpose()?;
    let health = r
        .health
        .as_ref()
        .map(|h| validate_health(ctx, &key, protocol, h))
        .transpose()?;
    if scheduler == Scheduler::Lrt && health.is_none() {
        return Err(ctx.err(
            &r.scheduler
                .as_ref()
                .map_or_else(|| raw.span(), |s| s.span()),
            format!("{key}.scheduler"),
            Kind::Inconsistent,
            "lrt schedules by health-check round trip times: add [service.health]",
        ));
    }
    let autoscale = r
        .autoscale
        .as_ref()
        .map(|a| validate_autoscale(ctx, &key, pool.as_ref(), a))
        .transpose()?;
    Ok(Service {
        name,
        vip,
        port,
        protocol,
        scheduler,
        backends,
        max_conns,
        persistence,
        shedding,
        health,
        pool,
        autoscale,
    })
}

/// A positive duration.
fn nonzero(ctx: &Ctx, value: &SpannedDuration, key: &str) -> Result<Duration> {
    let d: Duration = **value.get_ref();
    if d.is_zero() {
        return Err(ctx.err(
            &value.span(),
            key,
            Kind::OutOfRange,
            "must be greater than zero",
        ));
    }
    Ok(d)
}

/// An integer in `range`.
fn ranged(
    ctx: &Ctx,
    value: &Spanned<i64>,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64> {
    let v = *value.get_ref();
    if !range.contains(&v) {
        return Err(ctx.err(
            &value.span(),
            key,
            Kind::OutOfRange,
            format!("{v} is out of range {}..={}", range.start(), range.end()),
        ));
    }
    Ok(v)
}

impl RawConfig {
    fn validate_feedback(&self, node: &Node) -> Result<Option<Feedback>> {
        let ctx = &self.ctx;
        let Some(raw) = &self.feedback else {
            return Ok(None);
        };
        let r = raw.get_ref();
        let listen = match &r.listen {
            None => std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, crate::feedback::necp::PORT),
            Some(l) => l.get_ref().parse().map_err(|_| {
                ctx.err(
                    &l.span(),
                    "feedback.listen",
                    Kind::BadValue,
                    format!("`{}` is not ADDRESS:PORT", l.get_ref()),
                )
            })?,
        };
        let key = r.key.get_ref().clone();
        if key.len() < 16 {
            return Err(ctx.err(
                &r.key.span(),
                "feedback.key",
                Kind::BadValue,
                "the shared key must be at least 16 bytes",
            ));
        }
        let dur = |v: &Option<SpannedDuration>, k: &str, d: Duration| -> Result<Duration> {
            v.as_ref()
                .map_or(Ok(d), |v| nonzero(ctx, v, &format!("feedback.{k}")))
        };
        let keepalive_interval = dur(
            &r.keepalive_interval,
            "keepalive_interval",
            Duration::from_secs(1),
        )?;
        let keepalive_timeout = dur(
            &r.keepalive_timeout,
            "keepalive_timeout",
            keepalive_interval,
        )?;
        let handshake_timeout = dur(
            &r.handshake_timeout,
            "handshake_timeout",
            Duration::from_secs(5),
        )?;
        let max_age = r
            .max_age
            .as_ref()
            .map(|v| nonzero(ctx, v, "feedback.max_age"))
            .transpose()?;
        let max_missed = match &r.max_missed {
            None => 3,
            Some(v) => ranged(ctx, v, "feedback.max_missed", 1..=255)? as u8,
        };
        let alpha = match &r.alpha {
            None => 0.5,
            Some(a) => {
                let v = *a.get_ref();
                if !(0.0..=1.0).contains(&v) {
                    return Err(ctx.err(
                        &a.span(),
                        "feedback.alpha",
                        Kind::OutOfRange,
                        format!("{v} is out of range 0..=1"),
                    ));
                }
                v
            }
        };
        let allow = match &r.allow {
            None => vec![node.back_gateway.trunc()],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    n.get_ref()
                        .parse::<Ipv4Net>()
                        .map(|n| n.trunc())
                        .map_err(|_| {
                            ctx.err(
                                &n.span(),
                                format!("feedback.allow[{i}]"),
                                Kind::BadValue,
                                format!("`{}` is not a network (ADDRESS/PREFIX)", n.get_ref()),
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let max_agents = match &r.max_agents {
            None => 64,
            Some(v) => ranged(ctx, v, "feedback.max_agents", 1..=4096)? as u32,
        };
        Ok(Some(Feedback {
            listen,
            key,
            keepalive_interval,
            keepalive_timeout,
            max_missed,
            handshake_timeout,
            alpha,
            allow,
            max_agents,
            max_age,
        }))
    }
}

/// Checks `[service.pool]` and appends its slots (weight 0) to `backends`.
fn validate_pool(
    ctx: &Ctx,
    node: &Node,
    key: &str,
    service_port: u16,
    raw: &Spanned<RawPool>,
    backends: &mut Vec<Backend>,
) -> Result<Pool> {
    let r = raw.get_ref();
    let pkey = format!("{key}.pool");
    let network = r.network.get_ref().parse::<Ipv4Net>().map_err(|_| {
        ctx.err(
            &r.network.span(),
            format!("{pkey}.network"),
            Kind::BadValue,
            format!(
                "`{}` is not a network (ADDRESS/PREFIX)",
                r.network.get_ref()
            ),
        )
    })?;
    let network = network.trunc();
    let gw = node.back_gateway;
    if !gw.trunc().contains(&network) {
        return Err(ctx.err(
            &r.network.span(),
            format!("{pkey}.network"),
            Kind::BackendOffLink,
            format!(
                "{network} is not inside the back subnet {}: pool servers must be on-link",
                gw.trunc()
            ),
        ));
    }
    if network.prefix_len() < 24 {
        return Err(ctx.err(
            &r.network.span(),
            format!("{pkey}.network"),
            Kind::OutOfRange,
            format!("{network} is larger than a /24 (at most {MAX_POOL_SLOTS} slots)"),
        ));
    }
    let forward = *r.forward.get_ref();
    if forward == Forward::Local {
        return Err(ctx.err(
            &r.forward.span(),
            format!("{pkey}.forward"),
            Kind::BadValue,
            "pool servers are real servers: nat or dr",
        ));
    }
    let port = match &r.port {
        None => service_port,
        Some(p) => {
            let k = format!("{pkey}.port");
            let v = check_port(ctx, p, &k)?;
            if forward != Forward::Nat && v != service_port {
                return Err(ctx.err(
                    &p.span(),
                    k,
                    Kind::PortMismatch,
                    format!("a dr pool cannot change the port: must equal the service port {service_port}"),
                ));
            }
            v
        }
    };
    let max_servers = match &r.max_servers {
        None => 8,
        Some(v) => ranged(
            ctx,
            v,
            &format!("{pkey}.max_servers"),
            1..=i64::from(MAX_POOL_SLOTS),
        )? as u32,
    };
    let first_slot = backends.len();
    let bcast = gw.broadcast();
    for addr in network.hosts() {
        if addr == gw.addr()
            || addr == gw.network()
            || addr == bcast
            || backends
                .iter()
                .any(|b| b.address == Some(addr) && b.port == port)
        {
            continue;
        }
        backends.push(Backend {
            name: format!("pool-{addr}"),
            address: Some(addr),
            port,
            weight: 0,
            forward,
            max_conns: 0,
            high_water: 0,
            sorry: false,
            node: None,
        });
    }
    Ok(Pool {
        network,
        forward,
        port,
        max_servers,
        first_slot,
    })
}

fn validate_autoscale(
    ctx: &Ctx,
    key: &str,
    pool: Option<&Pool>,
    raw: &Spanned<RawAutoscale>,
) -> Result<Autoscale> {
    let r = raw.get_ref();
    let akey = format!("{key}.autoscale");
    let start_period = nonzero(ctx, &r.start_period, &format!("{akey}.start_period"))?;
    let shutdown_period = nonzero(ctx, &r.shutdown_period, &format!("{akey}.shutdown_period"))?;
    let cooldown = r
        .cooldown
        .as_ref()
        .map_or(Duration::ZERO, |v| **v.get_ref());
    let min_servers = match &r.min_servers {
        None => 1,
        Some(v) => ranged(
            ctx,
            v,
            &format!("{akey}.min_servers"),
            0..=i64::from(MAX_POOL_SLOTS),
        )? as u32,
    };
    let max_servers = match &r.max_servers {
        None => pool.map_or(MAX_POOL_SLOTS, |p| p.max_servers),
        Some(v) => ranged(
            ctx,
            v,
            &format!("{akey}.max_servers"),
            1..=i64::from(MAX_POOL_SLOTS),
        )? as u32,
    };
    if min_servers > max_servers {
        let span = r
            .min_servers
            .as_ref()
            .map_or_else(|| raw.span(), |v| v.span());
        return Err(ctx.err(
            &span,
            format!("{akey}.min_servers"),
            Kind::OutOfRange,
            format!("min_servers {min_servers} is above max_servers {max_servers}"),
        ));
    }
    for (k, v) in [("scale_up", &r.scale_up), ("scale_down", &r.scale_down)] {
        if v.get_ref().first().is_none_or(|c| c.is_empty()) {
            return Err(ctx.err(
                &v.span(),
                format!("{akey}.{k}"),
                Kind::BadValue,
                "a command is a non-empty list: [\"program\", \"arg\", ...]",
            ));
        }
    }
    Ok(Autoscale {
        rules: crate::feedback::autoscale::Rules {
            start_period,
            shutdown_period,
            cooldown,
            min_servers,
            max_servers,
        },
        scale_up: r.scale_up.get_ref().clone(),
        scale_down: r.scale_down.get_ref().clone(),
    })
}

/// A count of connections: 1 ..= 2^31 - 1 (leave out a key for "none").
fn count(ctx: &Ctx, value: &Spanned<i64>, key: &str) -> Result<u32> {
    let v = *value.get_ref();
    match u32::try_from(v) {
        Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(n),
        _ => Err(ctx.err(
            &value.span(),
            key,
            Kind::OutOfRange,
            format!("{v} is out of range 1..=2147483647"),
        )),
    }
}

/// A positive duration.
fn positive(ctx: &Ctx, value: &SpannedDuration, key: &str) -> Result<Duration> {
    let d: Duration = **value.get_ref();
    if d.is_zero() {
        return Err(ctx.err(
            &value.span(),
            key,
            Kind::OutOfRange,
            "must be greater than zero",
        ));
    }
    Ok(d)
}

fn validate_persistence(
    ctx: &Ctx,
    key: &str,
    raw: &Spanned<RawPersistence>,
) -> Result<Persistence> {
    let r = raw.get_ref();
    let timeout = positive(ctx, &r.timeout, &format!("{key}.persistence.timeout"))?;
    let netmask = match &r.netmask {
        None => Ipv4Addr::BROADCAST,
        Some(m) => {
            let mkey = format!("{key}.persistence.netmask");
            let mask = parse_addr(ctx, m, &mkey)?;
            let bits = u32::from(mask);
            // Contiguous: ones then zeros (as `ipvsadm -M` requires).
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(ctx.err(
                    &m.span(),
                    mkey,
                    Kind::BadValue,
                    format!("{mask} is not a netmask (ones, then zeros)"),
                ));
            }
            mask
        }
    };
    Ok(Persistence {
        timeout_ms: u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
        netmask,
    })
}

fn validate_shed(ctx: &Ctx, key: &str, raw: &Spanned<RawShed>) -> Result<Shedding> {
    let r = raw.get_ref();
    let tkey = format!("{key}.shed.threshold");
    let t = *r.threshold.get_ref();
    let threshold = match u32::try_from(t) {
        Ok(n) if n <= i32::MAX as u32 => n,
        _ => {
            return Err(ctx.err(
                &r.threshold.span(),
                tkey,
                Kind::OutOfRange,
                format!("{t} is out of range 0..=2147483647"),
            ));
        }
    };
    let strategy = match (*r.strategy.get_ref(), &r.k) {
        (ShedName::Hard, Some(k)) => {
            return Err(ctx.err(
                &k.span(),
                format!("{key}.shed.k"),
                Kind::Inconsistent,
                "k only applies to strategy = \"exponential\"",
            ));
        }
        (ShedName::Hard, None) => {
            if threshold == 0 {
                return Err(ctx.err(
                    &r.threshold.span(),
                    tkey,
                    Kind::OutOfRange,
                    "hard shedding at 0 connections would refuse every flow",
                ));
            }
            Strategy::Hard
        }
        (ShedName::Exponential, k) => {
            let k_value = k.as_ref().map_or(DEFAULT_K, |k| *k.get_ref());
            if !(k_value.is_finite() && k_value > 0.0 && k_value <= 100.0) {
                let span = k.as_ref().map_or_else(|| raw.span(), |k| k.span());
                return Err(ctx.err(
                    &span,
                    format!("{key}.shed.k"),
                    Kind::OutOfRange,
                    format!("k = {k_value} is out of range (0, 100]"),
                ));
            }
            Strategy::Exponential { k: k_value }
        }
    };
    Ok(Shedding {
        threshold,
        strategy,
    })
}

fn validate_health(
    ctx: &Ctx,
    key: &str,
    protocol: Protocol,
    raw: &Spanned<RawHealth>,
) -> Result<HealthCheck> {
    let r = raw.get_ref();
    let hkey = format!("{key}.health");
    let mut h = HealthCheck::default();
    let http = *r.check.get_ref() == CheckName::Http;
    if !http {
        let http_only: [(&str, Option<Range<usize>>); 3] = [
            ("path", r.path.as_ref().map(Spanned::span)),
            ("expect_status", r.expect_status.as_ref().map(Spanned::span)),
            ("expect_body", r.expect_body.as_ref().map(Spanned::span)),
        ];
        if let Some((k, Some(span))) = http_only.into_iter().find(|(_, s)| s.is_some()) {
            return Err(ctx.err(
                &span,
                format!("{hkey}.{k}"),
                Kind::Inconsistent,
                format!("{k} only applies to check = \"http\""),
            ));
        }
    } else {
        let path = r
            .path
            .as_ref()
            .map_or_else(|| "/".to_owned(), |p| p.get_ref().clone());
        if let Some(p) = &r.path
            && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ctx.err(
                &p.span(),
                format!("{hkey}.path"),
                Kind::BadValue,
                format!(
                    "`{path}` is not a request path: it must start with '/' and have no whitespace"
                ),
            ));
        }
        let expect_status = match &r.expect_status {
            None => 200,
            Some(v) => match u16::try_from(*v.get_ref()) {
                Ok(s) if (100..=599).contains(&s) => s,
                _ => {
                    return Err(ctx.err(
                        &v.span(),
                        format!("{hkey}.expect_status"),
                        Kind::OutOfRange,
                        format!("{} is not an HTTP status (100..=599)", v.get_ref()),
                    ));
                }
            },
        };
        h.probe = Probe::Http {
            path,
            expect_status,
            expect_body: r.expect_body.as_ref().map(|b| b.get_ref().clone()),
        };
    }
    if let Some(p) = &r.port {
        h.port = Some(check_port(ctx, p, &format!("{hkey}.port"))?);
    } else if protocol == Protocol::Udp {
        return Err(ctx.err(
            &raw.span(),
            format!("{hkey}.port"),
            Kind::Inconsistent,
            "checks are TCP: a udp service's check needs the TCP `port` to check",
        ));
    }
    if let Some(v) = &r.interval {
        h.interval = positive(ctx, v, &format!("{hkey}.interval"))?;
    }
    if let Some(v) = &r.timeout {
        h.timeout = positive(ctx, v, &format!("{hkey}.timeout"))?;
    }
    if h.timeout > h.interval {
        let span = r
            .timeout
            .as_ref()
            .or(r.interval.as_ref())
            .map_or_else(|| raw.span(), |v| v.span());
        return Err(ctx.err(
            &span,
            format!("{hkey}.timeout"),
            Kind::Inconsistent,
            format!(
                "timeout {} is longer than interval {}: checks would overlap",
                humantime::format_duration(h.timeout),
                humantime::format_duration(h.interval)
            ),
        ));
    }
    for (name, value, slot) in [
        ("rise", &r.rise, &mut h.rise),
        ("fall", &r.fall, &mut h.fall),
    ] {
        if let Some(v) = value {
            match u32::try_from(*v.get_ref()) {
                Ok(n) if (1..=100).contains(&n) => *slot = n,
                _ => {
                    return Err(ctx.err(
                        &v.span(),
                        format!("{hkey}.{name}"),
                        Kind::OutOfRange,
                        format!("{} is out of range 1..=100", v.get_ref()),
                    ));
                }
            }
        }
    }
    if let Some(v) = &r.on_down {
        h.on_down = *v.get_ref();
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines 1-5 of most test configs.
    macro_rules! node {
        () => {
            "[node]\nname = \"lb1\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"198.19.0.1/24\"\n"
        };
    }

    /// Asserts that `text` is refused with `test.toml:LINE:COLUMN: KEY: ...`
    /// and `kind`; returns the message for further checks.
    #[track_caller]
    fn refused(text: &str, line: usize, column: usize, key: &str, kind: Kind) -> String {
        let err = match Config::parse(text, "test.toml") {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(Error::Config(e)) => e,
            Err(e) => panic!("not a config error: {e}"),
        };
        let shown = err.to_string();
        let prefix = format!("test.toml:{line}:{column}: {key}: ");
        assert!(
            shown.starts_with(&prefix),
            "expected `{prefix}...`, got `{shown}`"
        );
        assert_eq!(err.kind, kind, "{shown}");
        shown
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let text = concat!(
            node!(),
            "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
            "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
            "[[service.backend]]\nforward = \"local\"\n",
        );
        let c = Config::parse(text, "test.toml").expect("valid");
        assert_eq!(c.node.local_tun, "lbtun0");
        assert_eq!(
            c.node.control_socket,
            PathBuf::from("/run/balancer/balancer.sock")
        );
        assert_eq!(c.node.flow_hash_seed, DEFAULT_FLOW_HASH_SEED);
        assert_eq!(c.node.back_gateway.to_string(), "198.19.0.1/24");
        assert_eq!(c.conntrack, Conntrack::default());
        let s = &c.services[0];
        assert_eq!((s.protocol, s.scheduler), (Protocol::Tcp, Scheduler::Wrr));
        assert_eq!(s.backends[0].name, "198.19.0.21:80");
        assert_eq!((s.backends[0].port, s.backends[0].weight), (80, 1));
        assert_eq!(s.backends[1].name, "local");
        assert_eq!(s.backends[1].address, None);
        assert!(c.has_local());
        assert_eq!(
            c.service_index("198.18.0.100".parse().expect("ip"), 80, Protocol::Tcp),
            Some(0)
        );
    }

    #[test]
    fn full_config_sets_every_key() {
        let text = concat!(
            "[node]\nname = \"lb-2\"\nfront = \"eth0\"\nback = \"eth1\"\nback_gateway = \"10.1.0.1/16\"\n",
            "local_tun = \"tun7\"\ncontrol_socket = \"/tmp/x.sock\"\n",
            "flow_hash_seed = \"00112233445566778899aabbccddeeff\"\n",
            "[conntrack]\nmax_entries = 1000\ntcp_syn_recv = \"1s\"\ntcp_established = \"2m\"\n",
            "tcp_fin_wait = \"3s\"\ntcp_close_wait = \"4s\"\ntcp_last_ack = \"5s\"\ntcp_time_wait = \"6s\"\n",
            "tcp_close = \"7s\"\nudp = \"8s\"\nexpire_interval = \"250ms\"\n",
            "[[service]]\nname = \"dns\"\nvip = \"192.0.2.1\"\nport = 53\nprotocol = \"udp\"\nscheduler = \"rr\"\n",
            "[[service.backend]]\nname = \"a\"\naddress = \"10.1.2.3\"\nport = 5353\nweight = 0\nforward = \"nat\"\n",
            "[[service.backend]]\nname = \"b\"\naddress = \"10.1.2.4\"\nport = 53\nweight = 65535\nforward = \"dr\"\n",
        );
        let c = Config::parse(text, "test.toml").expect("valid");
        assert_eq!(c.node.flow_hash_seed[0..3], [0x00, 0x11, 0x22]);
        assert_eq!(c.node.flow_hash_seed[15], 0xff);
        assert_eq!(c.conntrack.max_entries, 1000);
        assert_eq!(c.conntrack.tcp_established, Duration::from_secs(120));
        assert_eq!(c.conntrack.expire_interval, Duration::from_millis(250));
        let s = &c.services[0];
        assert_eq!((s.protocol, s.scheduler), (Protocol::Udp, Scheduler::Rr));
        assert_eq!((s.backends[0].port, s.backends[0].weight), (5353, 0));
        assert_eq!(
            (s.backends[1].forward, s.backends[1].weight),
            (Forward::Dr, 65535)
        );
    }

    #[test]
    fn enums_round_trip_through_their_names() {
        for s in Scheduler::ALL {
            assert_eq!(s.as_str().parse::<Scheduler>(), Ok(s));
        }
        for f in Forward::ALL {
            assert_eq!(f.as_str().parse::<Forward>(), Ok(f));
        }
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>(), Ok(p));
        }
        assert!("lcx".parse::<Scheduler>().is_err());
    }

    #[test]
    fn error_column_counts_characters_not_bytes() {
        assert_eq!(line_column("a\nü = x", 5), (2, 3));
    }

    // --- syntax and schema ------------------------------------------------

    #[test]
    fn rejects_invalid_toml() {
        refused(
            concat!(node!(), "[[service]\n"),
            6,
            11,
            "service",
            Kind::Syntax,
        );
    }

    #[test]
    fn rejects_unknown_key_in_backend() {
        let m = refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\nwieght = 2\n",
            ),
            13,
            1,
            "service[0].backend[0].wieght",
            Kind::UnknownKey,
        );
        assert!(m.contains("unknown field `wieght`"), "{m}");
    }

    #[test]
    fn rejects_unknown_key_in_node() {
        refused(
            concat!(node!(), "vip = \"1.2.3.4\"\n"),
            6,
            1,
            "node.vip",
            Kind::UnknownKey,
        );
    }

    #[test]
    fn rejects_unknown_top_level_table() {
        refused(
            concat!(node!(), "[health]\n"),
            6,
            2,
            "health",
            Kind::UnknownKey,
        );
    }

    #[test]
    fn rejects_missing_back_gateway() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"front0\"\nback = \"back0\"\n",
            1,
            1,
            "node.back_gateway",
            Kind::MissingKey,
        );
    }

    #[test]
    fn rejects_backend_without_forward() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
                "[[service.backend]]\naddress = \"198.19.0.21\"\n",
            ),
            10,
            1,
            "service[0].backend[0].forward",
            Kind::MissingKey,
        );
    }

    #[test]
    fn rejects_port_given_as_string() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = \"80\"\n"
            ),
            9,
            8,
            "service[0].port",
            Kind::WrongType,
        );
    }

    #[test]
    fn rejects_unknown_scheduler() {
        let m = refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\nscheduler = \"lcx\"\n",
            ),
            10,
            13,
            "service[0].scheduler",
            Kind::WrongType,
        );
        assert!(m.contains("`rr`"), "{m}");
    }

    #[test]
    fn rejects_unknown_forward_method() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"tun\"\n",
            ),
            12,
            11,
            "service[0].backend[0].forward",
            Kind::WrongType,
        );
    }

    #[test]
    fn rejects_malformed_duration() {
        refused(
            concat!(node!(), "[conntrack]\nudp = \"5 parsecs\"\n"),
            7,
            7,
            "conntrack.udp",
            Kind::WrongType,
        );
    }

    // --- node ---------------------------------------------------------------

    #[test]
    fn rejects_node_name_unfit_for_the_nft_table_name() {
        refused(
            "[node]\nname = \"lb 1\"\nfront = \"f\"\nback = \"b\"\nback_gateway = \"198.19.0.1/24\"\n",
            2,
            8,
            "node.name",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_interface_name_longer_than_15_bytes() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"front0123456789ab\"\nback = \"b\"\nback_gateway = \"198.19.0.1/24\"\n",
            3,
            9,
            "node.front",
            Kind::BadInterfaceName,
        );
    }

    #[test]
    fn rejects_interface_name_with_slash() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"f\"\nback = \"b/0\"\nback_gateway = \"198.19.0.1/24\"\n",
            4,
            8,
            "node.back",
            Kind::BadInterfaceName,
        );
    }

    #[test]
    fn rejects_interface_name_with_whitespace() {
        refused(
            concat!(node!(), "local_tun = \"lb tun\"\n"),
            6,
            13,
            "node.local_tun",
            Kind::BadInterfaceName,
        );
    }

    #[test]
    fn rejects_empty_interface_name() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"\"\nback = \"b\"\nback_gateway = \"198.19.0.1/24\"\n",
            3,
            9,
            "node.front",
            Kind::BadInterfaceName,
        );
    }

    #[test]
    fn rejects_front_equal_to_back() {
        let m = refused(
            "[node]\nname = \"lb1\"\nfront = \"eth0\"\nback = \"eth0\"\nback_gateway = \"198.19.0.1/24\"\n",
            4,
            8,
            "node.back",
            Kind::SameInterface,
        );
        assert!(m.contains("node.front"), "{m}");
    }

    #[test]
    fn rejects_tun_equal_to_front() {
        refused(
            concat!(node!(), "local_tun = \"front0\"\n"),
            6,
            13,
            "node.local_tun",
            Kind::SameInterface,
        );
    }

    #[test]
    fn rejects_back_gateway_without_prefix() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"f\"\nback = \"b\"\nback_gateway = \"198.19.0.1\"\n",
            5,
            16,
            "node.back_gateway",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_back_gateway_that_is_the_network_address() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"f\"\nback = \"b\"\nback_gateway = \"198.19.0.0/24\"\n",
            5,
            16,
            "node.back_gateway",
            Kind::BadGateway,
        );
    }

    #[test]
    fn rejects_back_gateway_with_a_host_prefix() {
        refused(
            "[node]\nname = \"lb1\"\nfront = \"f\"\nback = \"b\"\nback_gateway = \"198.19.0.1/32\"\n",
            5,
            16,
            "node.back_gateway",
            Kind::BadGateway,
        );
    }

    #[test]
    fn rejects_flow_hash_seed_of_wrong_length() {
        refused(
            concat!(node!(), "flow_hash_seed = \"0011\"\n"),
            6,
            18,
            "node.flow_hash_seed",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_flow_hash_seed_with_non_hex_digits() {
        refused(
            concat!(
                node!(),
                "flow_hash_seed = \"00112233445566778899aabbccddeefg\"\n"
            ),
            6,
            18,
            "node.flow_hash_seed",
            Kind::BadValue,
        );
    }

    // --- conntrack -------------------------------------------------------------

    #[test]
    fn rejects_zero_timeout() {
        refused(
            concat!(node!(), "[conntrack]\ntcp_established = \"0s\"\n"),
            7,
            19,
            "conntrack.tcp_established",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_zero_expire_interval() {
        refused(
            concat!(node!(), "[conntrack]\nexpire_interval = \"0ms\"\n"),
            7,
            19,
            "conntrack.expire_interval",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_zero_max_entries() {
        refused(
            concat!(node!(), "[conntrack]\nmax_entries = 0\n"),
            7,
            15,
            "conntrack.max_entries",
            Kind::OutOfRange,
        );
    }

    // --- services -------------------------------------------------------------

    #[test]
    fn rejects_config_without_service() {
        refused(node!(), 6, 1, "service", Kind::NoService);
    }

    #[test]
    fn rejects_service_without_backend() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n"
            ),
            6,
            1,
            "service[0].backend",
            Kind::NoBackend,
        );
    }

    #[test]
    fn rejects_duplicate_service() {
        let m = refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
                "[[service]]\nname = \"web2\"\nvip = \"198.18.0.100\"\nport = 80\n",
                "[[service.backend]]\naddress = \"198.19.0.22\"\nforward = \"nat\"\n",
            ),
            13,
            1,
            "service[1]",
            Kind::DuplicateService,
        );
        assert!(m.contains("service[0]"), "{m}");
    }

    #[test]
    fn accepts_same_vip_and_port_for_tcp_and_udp() {
        let text = concat!(
            node!(),
            "[[service]]\nname = \"dns-tcp\"\nvip = \"198.18.0.100\"\nport = 53\n",
            "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
            "[[service]]\nname = \"dns-udp\"\nvip = \"198.18.0.100\"\nport = 53\nprotocol = \"udp\"\n",
            "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
        );
        assert_eq!(Config::parse(text, "t").expect("valid").services.len(), 2);
    }

    #[test]
    fn rejects_duplicate_service_name() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 443\n",
                "[[service.backend]]\naddress = \"198.19.0.22\"\nforward = \"nat\"\n",
            ),
            14,
            8,
            "service[1].name",
            Kind::DuplicateName,
        );
    }

    #[test]
    fn rejects_invalid_vip() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.300\"\nport = 80\n"
            ),
            8,
            7,
            "service[0].vip",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_vip_inside_the_back_subnet() {
        let m = refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.19.0.100\"\nport = 80\n"
            ),
            8,
            7,
            "service[0].vip",
            Kind::VipInBackSubnet,
        );
        assert!(m.contains("198.19.0.0/24"), "{m}");
    }

    #[test]
    fn rejects_service_port_zero() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 0\n"
            ),
            9,
            8,
            "service[0].port",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_service_port_above_65535() {
        refused(
            concat!(
                node!(),
                "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 65536\n"
            ),
            9,
            8,
            "service[0].port",
            Kind::OutOfRange,
        );
    }

    // --- backends -------------------------------------------------------------

    /// A service at lines 6-9 followed by `backends` from line 10 on.
    fn with_backends(backends: &str) -> String {
        format!(
            "{}[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n{backends}",
            node!()
        )
    }

    #[test]
    fn rejects_weight_above_65535() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nweight = 65536\nforward = \"nat\"\n",
            ),
            12,
            10,
            "service[0].backend[0].weight",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_negative_weight() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nweight = -1\nforward = \"nat\"\n",
            ),
            12,
            10,
            "service[0].backend[0].weight",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_backend_port_zero() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nport = 0\nforward = \"nat\"\n",
            ),
            12,
            8,
            "service[0].backend[0].port",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_dr_backend_with_another_port() {
        let m = refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nport = 8080\nforward = \"dr\"\n",
            ),
            12,
            8,
            "service[0].backend[0].port",
            Kind::PortMismatch,
        );
        assert!(m.contains("80"), "{m}");
    }

    #[test]
    fn rejects_local_backend_with_another_port() {
        refused(
            &with_backends("[[service.backend]]\nport = 8080\nforward = \"local\"\n"),
            11,
            8,
            "service[0].backend[0].port",
            Kind::PortMismatch,
        );
    }

    #[test]
    fn accepts_nat_backend_with_another_port() {
        let c = Config::parse(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nport = 8080\nforward = \"nat\"\n",
            ),
            "t",
        )
        .expect("valid");
        assert_eq!(c.services[0].backends[0].port, 8080);
    }

    #[test]
    fn rejects_local_backend_with_address() {
        refused(
            &with_backends("[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"local\"\n"),
            11,
            11,
            "service[0].backend[0].address",
            Kind::LocalWithAddress,
        );
    }

    #[test]
    fn rejects_second_local_backend() {
        refused(
            &with_backends(
                "[[service.backend]]\nforward = \"local\"\n[[service.backend]]\nname = \"again\"\nforward = \"local\"\n",
            ),
            14,
            11,
            "service[0].backend[1].forward",
            Kind::SecondLocalBackend,
        );
    }

    #[test]
    fn rejects_nat_backend_without_address() {
        refused(
            &with_backends("[[service.backend]]\nforward = \"nat\"\n"),
            10,
            1,
            "service[0].backend[0].address",
            Kind::MissingAddress,
        );
    }

    #[test]
    fn rejects_dr_backend_without_address() {
        refused(
            &with_backends("[[service.backend]]\nweight = 2\nforward = \"dr\"\n"),
            10,
            1,
            "service[0].backend[0].address",
            Kind::MissingAddress,
        );
    }

    #[test]
    fn rejects_invalid_backend_address() {
        refused(
            &with_backends("[[service.backend]]\naddress = \"rs1.example\"\nforward = \"nat\"\n"),
            11,
            11,
            "service[0].backend[0].address",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_backend_outside_the_back_subnet() {
        let m = refused(
            &with_backends("[[service.backend]]\naddress = \"198.20.0.21\"\nforward = \"dr\"\n"),
            11,
            11,
            "service[0].backend[0].address",
            Kind::BackendOffLink,
        );
        assert!(m.contains("on-link"), "{m}");
    }

    #[test]
    fn rejects_backend_at_the_subnet_broadcast_address() {
        refused(
            &with_backends("[[service.backend]]\naddress = \"198.19.0.255\"\nforward = \"nat\"\n"),
            11,
            11,
            "service[0].backend[0].address",
            Kind::BackendOffLink,
        );
    }

    #[test]
    fn rejects_backend_equal_to_the_gateway() {
        refused(
            &with_backends("[[service.backend]]\naddress = \"198.19.0.1\"\nforward = \"nat\"\n"),
            11,
            11,
            "service[0].backend[0].address",
            Kind::BackendIsGateway,
        );
    }

    #[test]
    fn rejects_duplicate_backend() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n\
                 [[service.backend]]\nname = \"other\"\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
            ),
            15,
            11,
            "service[0].backend[1].address",
            Kind::DuplicateBackend,
        );
    }

    #[test]
    fn rejects_duplicate_backend_name() {
        refused(
            &with_backends(
                "[[service.backend]]\nname = \"rs\"\naddress = \"198.19.0.21\"\nforward = \"nat\"\n\
                 [[service.backend]]\nname = \"rs\"\naddress = \"198.19.0.22\"\nforward = \"nat\"\n",
            ),
            15,
            8,
            "service[0].backend[1].name",
            Kind::DuplicateName,
        );
    }

    #[test]
    fn rejects_empty_backend_name() {
        refused(
            &with_backends("[[service.backend]]\nname = \"\"\nforward = \"local\"\n"),
            11,
            8,
            "service[0].backend[0].name",
            Kind::BadValue,
        );
    }

    // --- scheduling, persistence, shedding, health ------------------------------

    /// A service at lines 6-9 with `extra` lines from line 10 on, then one
    /// nat backend.
    fn with_service_keys(extra: &str) -> String {
        format!(
            "{}[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n{extra}[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
            node!()
        )
    }

    #[test]
    fn accepts_every_scheduling_key() {
        let text = with_service_keys(concat!(
            "scheduler = \"lrt\"\nmax_conns = 500\n",
            "[service.persistence]\ntimeout = \"5m\"\nnetmask = \"255.255.255.0\"\n",
            "[service.shed]\nstrategy = \"exponential\"\nthreshold = 40\nk = 0.5\n",
            "[service.health]\ncheck = \"http\"\nport = 8081\npath = \"/healthz\"\nexpect_status = 204\n",
            "expect_body = \"ok\"\ninterval = \"500ms\"\ntimeout = \"200ms\"\nrise = 3\nfall = 4\non_down = \"reset\"\n",
        ))
        .replace(
            "forward = \"nat\"\n",
            "forward = \"nat\"\nmax_conns = 100\nhigh_water = 80\n[[service.backend]]\nname = \"sorry\"\naddress = \"198.19.0.99\"\nforward = \"nat\"\nsorry = true\n",
        );
        let c = Config::parse(&text, "t").expect("valid");
        let s = &c.services[0];
        assert_eq!((s.scheduler, s.max_conns), (Scheduler::Lrt, 500));
        assert_eq!(
            s.persistence,
            Some(Persistence {
                timeout_ms: 300_000,
                netmask: Ipv4Addr::new(255, 255, 255, 0)
            })
        );
        assert_eq!(
            s.shedding,
            Some(Shedding {
                threshold: 40,
                strategy: Strategy::Exponential { k: 0.5 }
            })
        );
        let h = s.health.as_ref().expect("health");
        assert_eq!(
            h.probe,
            Probe::Http {
                path: "/healthz".into(),
                expect_status: 204,
                expect_body: Some("ok".into())
            }
        );
        assert_eq!(h.port, Some(8081));
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_millis(500), Duration::from_millis(200))
        );
        assert_eq!((h.rise, h.fall, h.on_down), (3, 4, OnDown::Reset));
        let b = &s.backends;
        assert_eq!(
            (b[0].max_conns, b[0].high_water, b[0].sorry),
            (100, 80, false)
        );
        assert_eq!((b[1].max_conns, b[1].sorry), (0, true));
    }

    #[test]
    fn scheduling_keys_have_documented_defaults() {
        let c = Config::parse(
            &with_service_keys(
                "[service.persistence]\ntimeout = \"1s\"\n[service.shed]\nstrategy = \"exponential\"\nthreshold = 0\n[service.health]\ncheck = \"http\"\n",
            ),
            "t",
        )
        .expect("valid");
        let s = &c.services[0];
        assert_eq!(s.max_conns, 0);
        assert_eq!(s.persistence.map(|p| p.netmask), Some(Ipv4Addr::BROADCAST));
        assert_eq!(
            s.shedding.map(|x| x.strategy),
            Some(Strategy::Exponential { k: 0.3 })
        );
        let h = s.health.as_ref().expect("health");
        assert_eq!(
            h.probe,
            Probe::Http {
                path: "/".into(),
                expect_status: 200,
                expect_body: None
            }
        );
        assert_eq!(
            (h.rise, h.fall, h.on_down, h.port),
            (2, 3, OnDown::Keep, None)
        );
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(2), Duration::from_secs(1))
        );
        assert_eq!((s.backends[0].max_conns, s.backends[0].high_water), (0, 0));
    }

    #[test]
    fn rejects_zero_service_max_conns() {
        refused(
            &with_service_keys("max_conns = 0\n"),
            10,
            13,
            "service[0].max_conns",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_zero_persistence_timeout() {
        refused(
            &with_service_keys("[service.persistence]\ntimeout = \"0s\"\n"),
            11,
            11,
            "service[0].persistence.timeout",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_persistence_without_timeout() {
        refused(
            &with_service_keys("[service.persistence]\nnetmask = \"255.255.255.0\"\n"),
            10,
            1,
            "service[0].persistence.timeout",
            Kind::MissingKey,
        );
    }

    #[test]
    fn rejects_persistence_netmask_that_is_not_an_address() {
        refused(
            &with_service_keys("[service.persistence]\ntimeout = \"1m\"\nnetmask = \"/24\"\n"),
            12,
            11,
            "service[0].persistence.netmask",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_non_contiguous_netmask() {
        refused(
            &with_service_keys(
                "[service.persistence]\ntimeout = \"1m\"\nnetmask = \"255.0.255.0\"\n",
            ),
            12,
            11,
            "service[0].persistence.netmask",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_unknown_shed_strategy() {
        refused(
            &with_service_keys("[service.shed]\nstrategy = \"random\"\nthreshold = 5\n"),
            11,
            12,
            "service[0].shed.strategy",
            Kind::WrongType,
        );
    }

    #[test]
    fn rejects_negative_shed_threshold() {
        refused(
            &with_service_keys("[service.shed]\nstrategy = \"hard\"\nthreshold = -1\n"),
            12,
            13,
            "service[0].shed.threshold",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_hard_shedding_at_zero() {
        refused(
            &with_service_keys("[service.shed]\nstrategy = \"hard\"\nthreshold = 0\n"),
            12,
            13,
            "service[0].shed.threshold",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_k_with_hard_shedding() {
        refused(
            &with_service_keys("[service.shed]\nstrategy = \"hard\"\nthreshold = 5\nk = 0.3\n"),
            13,
            5,
            "service[0].shed.k",
            Kind::Inconsistent,
        );
    }

    #[test]
    fn rejects_non_positive_k() {
        refused(
            &with_service_keys(
                "[service.shed]\nstrategy = \"exponential\"\nthreshold = 5\nk = -0.3\n",
            ),
            13,
            5,
            "service[0].shed.k",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_infinite_k() {
        refused(
            &with_service_keys(
                "[service.shed]\nstrategy = \"exponential\"\nthreshold = 5\nk = inf\n",
            ),
            13,
            5,
            "service[0].shed.k",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_health_without_check() {
        refused(
            &with_service_keys("[service.health]\ninterval = \"1s\"\n"),
            10,
            1,
            "service[0].health.check",
            Kind::MissingKey,
        );
    }

    #[test]
    fn rejects_unknown_check_kind() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"icmp\"\n"),
            11,
            9,
            "service[0].health.check",
            Kind::WrongType,
        );
    }

    #[test]
    fn rejects_zero_health_interval() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\ninterval = \"0s\"\n"),
            12,
            12,
            "service[0].health.interval",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_zero_health_timeout() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\ntimeout = \"0ms\"\n"),
            12,
            11,
            "service[0].health.timeout",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_health_timeout_longer_than_interval() {
        let m = refused(
            &with_service_keys(
                "[service.health]\ncheck = \"tcp\"\ninterval = \"1s\"\ntimeout = \"2s\"\n",
            ),
            13,
            11,
            "service[0].health.timeout",
            Kind::Inconsistent,
        );
        assert!(m.contains("2s") && m.contains("1s"), "{m}");
    }

    #[test]
    fn rejects_default_timeout_longer_than_a_short_interval() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\n"),
            12,
            12,
            "service[0].health.timeout",
            Kind::Inconsistent,
        );
    }

    #[test]
    fn rejects_zero_rise() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\nrise = 0\n"),
            12,
            8,
            "service[0].health.rise",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_fall_above_100() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\nfall = 101\n"),
            12,
            8,
            "service[0].health.fall",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_http_keys_on_a_tcp_check() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\npath = \"/\"\n"),
            12,
            8,
            "service[0].health.path",
            Kind::Inconsistent,
        );
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\nexpect_body = \"ok\"\n"),
            12,
            15,
            "service[0].health.expect_body",
            Kind::Inconsistent,
        );
    }

    #[test]
    fn rejects_relative_health_path() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"http\"\npath = \"health\"\n"),
            12,
            8,
            "service[0].health.path",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_expect_status_outside_http_range() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"http\"\nexpect_status = 99\n"),
            12,
            17,
            "service[0].health.expect_status",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_health_port_zero() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\nport = 0\n"),
            12,
            8,
            "service[0].health.port",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_unknown_on_down() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\non_down = \"drop\"\n"),
            12,
            11,
            "service[0].health.on_down",
            Kind::WrongType,
        );
    }

    #[test]
    fn rejects_udp_health_check_without_port() {
        refused(
            &with_service_keys("protocol = \"udp\"\n[service.health]\ncheck = \"tcp\"\n"),
            11,
            1,
            "service[0].health.port",
            Kind::Inconsistent,
        );
    }

    #[test]
    fn rejects_lrt_without_health_checks() {
        refused(
            &with_service_keys("scheduler = \"lrt\"\n"),
            10,
            13,
            "service[0].scheduler",
            Kind::Inconsistent,
        );
    }

    #[test]
    fn rejects_zero_backend_max_conns() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\nmax_conns = 0\n",
            ),
            13,
            13,
            "service[0].backend[0].max_conns",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_backend_max_conns_above_i32() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\nmax_conns = 2147483648\n",
            ),
            13,
            13,
            "service[0].backend[0].max_conns",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_high_water_above_max_conns() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\nmax_conns = 10\nhigh_water = 11\n",
            ),
            14,
            14,
            "service[0].backend[0].high_water",
            Kind::Inconsistent,
        );
    }

    #[test]
    fn rejects_second_sorry_backend() {
        refused(
            &with_backends(concat!(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
                "[[service.backend]]\naddress = \"198.19.0.22\"\nforward = \"nat\"\nsorry = true\n",
                "[[service.backend]]\naddress = \"198.19.0.23\"\nforward = \"nat\"\nsorry = true\n",
            )),
            20,
            9,
            "service[0].backend[2].sorry",
            Kind::SecondSorryBackend,
        );
    }

    #[test]
    fn rejects_service_with_only_a_sorry_backend() {
        refused(
            &with_backends(
                "[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"nat\"\nsorry = true\n",
            ),
            6,
            1,
            "service[0].backend",
            Kind::NoRegularBackend,
        );
    }

    #[test]
    fn rejects_unknown_key_in_health() {
        refused(
            &with_service_keys("[service.health]\ncheck = \"tcp\"\nretries = 3\n"),
            12,
            1,
            "service[0].health.retries",
            Kind::UnknownKey,
        );
    }

    // --- [feedback], [service.pool], [service.autoscale] ---

    /// Lines 1-5 node, 6-7 feedback, then `extra_fb` (from line 8), then a
    /// service whose first line follows.
    fn feedback_config(extra_fb: &str, service_extra: &str) -> String {
        format!(
            "{}[feedback]\nkey = \"0123456789abcdef\"\n{extra_fb}[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n{service_extra}[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"dr\"\n",
            node!()
        )
    }

    #[test]
    fn feedback_pool_and_autoscale_get_their_defaults_and_slots() {
        let c = Config::parse(
            &feedback_config(
                "",
                "[service.pool]\nnetwork = \"198.19.0.20/30\"\nforward = \"dr\"\n[service.autoscale]\nstart_period = \"5s\"\nshutdown_period = \"1m\"\nscale_up = [\"up\"]\nscale_down = [\"down\"]\n",
            ),
            "test.toml",
        )
        .expect("valid");
        let f = c.feedback.expect("feedback");
        assert_eq!(f.listen, "0.0.0.0:3262".parse().expect("addr"));
        assert_eq!(f.keepalive_interval, Duration::from_secs(1));
        assert_eq!(f.keepalive_timeout, Duration::from_secs(1));
        assert_eq!((f.max_missed, f.alpha, f.max_agents), (3, 0.5, 64));
        assert_eq!(
            f.allow,
            vec!["198.19.0.0/24".parse::<Ipv4Net>().expect("net")]
        );
        let s = &c.services[0];
        let pool = s.pool.as_ref().expect("pool");
        // .21 is a configured backend: only .22 is a slot.
        assert_eq!(pool.first_slot, 1);
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[1].name, "pool-198.19.0.22");
        assert_eq!(s.backends[1].weight, 0);
        let a = s.autoscale.as_ref().expect("autoscale");
        assert_eq!((a.rules.min_servers, a.rules.max_servers), (1, 8));
        assert_eq!(a.rules.cooldown, Duration::ZERO);
    }

    #[test]
    fn service_with_only_a_pool_is_accepted() {
        let text = format!(
            "{}[feedback]\nkey = \"0123456789abcdef\"\n[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n[service.pool]\nnetwork = \"198.19.0.32/29\"\nforward = \"dr\"\n",
            node!()
        );
        let c = Config::parse(&text, "test.toml").expect("valid");
        assert_eq!(c.services[0].backends.len(), 6);
    }

    #[test]
    fn rejects_short_feedback_key() {
        refused(
            &feedback_config("", "").replace("0123456789abcdef", "short"),
            7,
            7,
            "feedback.key",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_alpha_above_one() {
        refused(
            &feedback_config("alpha = 1.5\n", ""),
            8,
            9,
            "feedback.alpha",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_zero_keepalive_interval() {
        refused(
            &feedback_config("keepalive_interval = \"0s\"\n", ""),
            8,
            22,
            "feedback.keepalive_interval",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_zero_max_missed() {
        refused(
            &feedback_config("max_missed = 0\n", ""),
            8,
            14,
            "feedback.max_missed",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_allow_entry_that_is_not_a_network() {
        refused(
            &feedback_config("allow = [\"198.19.0.0/24\", \"everyone\"]\n", ""),
            8,
            27,
            "feedback.allow[1]",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_bad_listen_address() {
        refused(
            &feedback_config("listen = \"198.19.0.1\"\n", ""),
            8,
            10,
            "feedback.listen",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_pool_outside_the_back_subnet() {
        refused(
            &feedback_config(
                "",
                "[service.pool]\nnetwork = \"10.0.0.0/28\"\nforward = \"dr\"\n",
            ),
            13,
            11,
            "service[0].pool.network",
            Kind::BackendOffLink,
        );
    }

    #[test]
    fn rejects_pool_larger_than_a_slash_24() {
        let text = "[node]\nname = \"lb1\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"198.19.0.1/16\"\n[feedback]\nkey = \"0123456789abcdef\"\n[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n[service.pool]\nnetwork = \"198.19.0.0/23\"\nforward = \"dr\"\n";
        refused(text, 13, 11, "service[0].pool.network", Kind::OutOfRange);
    }

    #[test]
    fn rejects_local_pool() {
        refused(
            &feedback_config(
                "",
                "[service.pool]\nnetwork = \"198.19.0.32/29\"\nforward = \"local\"\n",
            ),
            14,
            11,
            "service[0].pool.forward",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_dr_pool_with_another_port() {
        refused(
            &feedback_config(
                "",
                "[service.pool]\nnetwork = \"198.19.0.32/29\"\nforward = \"dr\"\nport = 8080\n",
            ),
            15,
            8,
            "service[0].pool.port",
            Kind::PortMismatch,
        );
    }

    #[test]
    fn rejects_zero_pool_max_servers() {
        refused(
            &feedback_config(
                "",
                "[service.pool]\nnetwork = \"198.19.0.32/29\"\nforward = \"dr\"\nmax_servers = 0\n",
            ),
            15,
            15,
            "service[0].pool.max_servers",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_pool_without_feedback() {
        let text = format!(
            "{}[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n[service.pool]\nnetwork = \"198.19.0.32/29\"\nforward = \"dr\"\n",
            node!()
        );
        refused(&text, 10, 1, "service[0].pool", Kind::NeedsFeedback);
    }

    #[test]
    fn rejects_autoscale_without_feedback() {
        let text = format!(
            "{}[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n[service.autoscale]\nstart_period = \"5s\"\nshutdown_period = \"1m\"\nscale_up = [\"up\"]\nscale_down = [\"down\"]\n[[service.backend]]\naddress = \"198.19.0.21\"\nforward = \"dr\"\n",
            node!()
        );
        refused(&text, 10, 1, "service[0].autoscale", Kind::NeedsFeedback);
    }

    fn autoscale(extra: &str) -> String {
        feedback_config(
            "",
            &format!(
                "[service.autoscale]\nstart_period = \"5s\"\nshutdown_period = \"1m\"\nscale_up = [\"up\"]\nscale_down = [\"down\"]\n{extra}"
            ),
        )
    }

    #[test]
    fn rejects_min_servers_above_max_servers() {
        refused(
            &autoscale("min_servers = 5\nmax_servers = 2\n"),
            17,
            15,
            "service[0].autoscale.min_servers",
            Kind::OutOfRange,
        );
    }

    #[test]
    fn rejects_empty_scale_command() {
        let text = feedback_config(
            "",
            "[service.autoscale]\nstart_period = \"5s\"\nshutdown_period = \"1m\"\nscale_up = []\nscale_down = [\"down\"]\n",
        );
        refused(
            &text,
            15,
            12,
            "service[0].autoscale.scale_up",
            Kind::BadValue,
        );
    }

    #[test]
    fn rejects_zero_start_period() {
        let text = feedback_config(
            "",
            "[service.autoscale]\nstart_period = \"0s\"\nshutdown_period = \"1m\"\nscale_up = [\"u\"]\nscale_down = [\"down\"]\n",
        );
        refused(
            &text,
            13,
            16,
            "service[0].autoscale.start_period",
            Kind::OutOfRange,
        );
    }
}
