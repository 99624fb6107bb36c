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
    /// In file order; at least one.
    pub backends: Vec<Backend>,
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

/// Scheduling algorithm of a service. To add one: a variant, its name in
/// `as_str` and `ALL`; serde and `FromStr` follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
}

impl Scheduler {
    pub const ALL: [Scheduler; 2] = [Scheduler::Rr, Scheduler::Wrr];

    pub const fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
        }
    }
}

/// How packets reach a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// Destination address and port rewritten; replies come back through
    /// the node (its back gateway) and are rewritten back.
    Nat,
    /// Only the destination MAC rewritten; the real server holds the VIP
    /// on `lo` and answers the client directly.
    Dr,
    /// Served by the node's own stack through the TUN device.
    Local,
}

impl Forward {
    pub const ALL: [Forward; 3] = [Forward::Nat, Forward::Dr, Forward::Local];

    pub const fn as_str(self) -> &'static str {
        match self {
            Forward::Nat => "nat",
            Forward::Dr => "dr",
            Forward::Local => "local",
        }
    }

    /// The name `ipvsadm -L` shows for the method.
    pub const fn ipvs_name(self) -> &'static str {
        match self {
            Forward::Nat => "Masq",
            Forward::Dr => "Route",
            Forward::Local => "Local",
        }
    }
}

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
str_enum_impls!(Protocol, Scheduler, Forward);

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
    #[serde(skip)]
    ctx: Ctx,
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
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    forward: Spanned<Forward>,
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
                let key = key_at(&DeTable::parse_recoverable(text).0, span.start)
                    .unwrap_or_else(|| "(document)".to_owned());
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
    } else if message.starts_with("invalid value") && message.contains("expected i64") {
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
    let text = text.trim_start_matches("0x");
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
        Ok(Config {
            source: ctx.file.clone(),
            node,
            conntrack,
            services,
        })
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
                format!(
                    "node name `{name}` must be 1 to 32 ASCII letters, digits, '_' or '-', starting with a letter"
                ),
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

    if r.backend.is_empty() {
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
        backends.push(Backend {
            name,
            address,
            port: bport,
            weight,
            forward,
        });
    }
    Ok(Service {
        name,
        vip,
        port,
        protocol,
        scheduler,
        backends,
    })
}
