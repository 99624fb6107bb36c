//! The host setup of a two-NIC balancer node, as a plan of steps.
//!
//! The source paper configured its nodes with `ifconfig eth0:0 VIP` and
//! `ifconfig eth1:0 GATEWAY`. Today's form, plus what keeps the kernel from
//! acting on traffic the user-space dataplane owns:
//!
//! 1. `arp_ignore=1`, `arp_announce=2` on the front NIC: the kernel answers
//!    ARP on the front only for addresses on the front itself, and never
//!    uses the VIP as the sender of its own ARP requests (ARP requests *for*
//!    the VIP are dropped by the nft rule of step 3, the dataplane answers).
//! 2. `rp_filter=0` on `all` and on the TUN device: locally served packets
//!    enter through the TUN with client source addresses, which reverse-path
//!    filtering (effective value = max(all, device)) would drop. The TUN is
//!    created by `balancer run`, so at `balancer setup` time its step is
//!    *deferred*: reported, not failed; `run` creates the device first and
//!    then applies the plan, which sets it.
//! 3. An nftables `netdev` table `balancer_<node>`: on the front's ingress
//!    it drops IPv4 to the VIPs and ARP requests for them; on the back's
//!    ingress it drops IPv4 not addressed to the node (local, broadcast or
//!    multicast per the FIB): those are replies of NAT real servers to
//!    clients. The dataplane reads frames on AF_PACKET taps, which run
//!    *before* netdev ingress, so it still sees all of them, while the
//!    kernel never answers (no RST, no ICMP, no ARP reply) nor forwards
//!    them un-NATed.
//! 4. The VIP aliases `ip addr add VIP/32 dev FRONT label FRONT:N` (the VIP
//!    must be a local address for locally served flows) and the back
//!    gateway alias `ip addr add GW/LEN dev BACK label BACK:0`.
//!
//! `net.ipv4.ip_forward` is left alone: the dataplane forwards in user
//! space, and everything the kernel could forward is dropped at ingress
//! (step 3) before routing; whether the host forwards its own other traffic
//! is not ours to change.
//!
//! Order matters: the filters are in place before the addresses appear, so
//! there is no window where the kernel answers for a VIP; undo runs in
//! reverse.
//!
//! [`Plan::apply`] runs only the steps not in effect and returns exactly
//! what it changed ([`Applied`]), with the previous sysctl values, so that
//! [`Applied::undo`] restores the host as it was.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------
// The system the plan acts on
// ---------------------------------------------------------------------------

/// What a command returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// The host operations a plan needs: run a command, read and write a
/// sysctl. [`Host`] is the real one; tests substitute a fake to run the
/// logic without programming a kernel.
pub trait System {
    /// Runs `argv` (with `stdin` fed if given). A non-zero exit is an
    /// `Ok` with `success == false`; only failing to start is an `Err`.
    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<CommandOutput>;
    /// Reads `/proc/sys/...`, trimmed.
    fn read_sysctl(&self, path: &Path) -> io::Result<String>;
    fn write_sysctl(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// The machine (and network namespace) the calling thread runs in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl System for Host {
    fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<CommandOutput> {
        use std::io::Write;
        let command = argv.join(" ");
        let (program, args) = argv.split_first().ok_or_else(|| Error::CommandOutput {
            command: command.clone(),
            message: "empty command".to_owned(),
        })?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::CommandSpawn {
                command: command.clone(),
                source,
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|source| Error::CommandSpawn {
                    command: command.clone(),
                    source,
                })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| Error::CommandSpawn { command, source })?;
        Ok(CommandOutput {
            success: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    fn read_sysctl(&self, path: &Path) -> io::Result<String> {
        Ok(std::fs::read_to_string(path)?.trim().to_owned())
    }

    fn write_sysctl(&self, path: &Path, value: &str) -> io::Result<()> {
        std::fs::write(path, value)
    }
}

/// Runs a command and turns a non-zero exit into [`Error::CommandFailed`].
fn run_ok(sys: &dyn System, argv: &[&str], stdin: Option<&str>) -> Result<CommandOutput> {
    let out = sys.run(argv, stdin)?;
    if out.success {
        Ok(out)
    } else {
        Err(Error::CommandFailed {
            command: argv.join(" "),
            status: out.status,
            stderr: out.stderr,
        })
    }
}

// ---------------------------------------------------------------------------
// Steps
// ---------------------------------------------------------------------------

/// A sysctl under `/proc/sys`, by its dotted name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sysctl {
    /// Path components below /proc/sys, e.g. `["net","ipv4","conf","eth0.5","rp_filter"]`.
    parts: Vec<String>,
}

impl Sysctl {
    fn conf(device: &str, name: &str) -> Sysctl {
        Sysctl {
            parts: ["net", "ipv4", "conf", device, name]
                .map(str::to_owned)
                .to_vec(),
        }
    }

    pub fn path(&self) -> PathBuf {
        let mut p = PathBuf::from("/proc/sys");
        p.extend(&self.parts);
        p
    }

    /// The name `sysctl` takes: components joined by '.', a '.' inside a
    /// component (a VLAN device `eth0.5`) written as '/'.
    pub fn name(&self) -> String {
        let parts: Vec<String> = self.parts.iter().map(|p| p.replace('.', "/")).collect();
        parts.join(".")
    }
}

impl fmt::Display for Sysctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One step of the setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `sysctl -w KEY=VALUE`.
    Sysctl {
        key: Sysctl,
        value: String,
        /// The device the key belongs to may not exist yet (the TUN, made
        /// by `run`): then the step is deferred, not failed.
        deferred_if_missing: Option<String>,
        why: &'static str,
    },
    /// The nftables `netdev` table, replaced atomically as a whole.
    NftTable {
        name: String,
        /// The table body, with a comment carrying its digest.
        ruleset: String,
        digest: String,
    },
    /// `ip addr add ADDR dev DEV label LABEL`.
    Address {
        dev: String,
        addr: Ipv4Net,
        label: String,
        why: &'static str,
    },
}

/// Whether a step is in effect on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    InEffect,
    /// Not in effect; `current` says what is there instead, if anything.
    Missing {
        current: Option<String>,
    },
    /// Cannot be checked or applied yet (a device `run` creates later).
    Deferred {
        reason: String,
    },
}

impl Step {
    /// One line: what the step is for.
    pub fn describe(&self) -> String {
        match self {
            Step::Sysctl { why, .. } => (*why).to_owned(),
            Step::NftTable { name, .. } => {
                format!(
                    "kernel filters (table netdev {name}): the kernel never acts on the dataplane's traffic"
                )
            }
            Step::Address { why, .. } => (*why).to_owned(),
        }
    }

    /// The exact shell command that applies the step.
    pub fn command(&self) -> String {
        match self {
            Step::Sysctl { key, value, .. } => format!("sysctl -w {key}={value}"),
            Step::NftTable { name, ruleset, .. } => {
                format!("nft -f - <<'EOF'\n{}EOF", nft_script(name, ruleset))
            }
            Step::Address {
                dev, addr, label, ..
            } => format!("ip addr add {addr} dev {dev} label {label}"),
        }
    }

    /// The shell command that removes the step (for a sysctl, the value to
    /// restore is only known once applied: see [`Change::undo_command`]).
    pub fn undo_command(&self) -> String {
        match self {
            Step::Sysctl { key, .. } => format!("sysctl -w {key}=<previous value>"),
            Step::NftTable { name, .. } => format!("nft delete table netdev {name}"),
            Step::Address { dev, addr, .. } => format!("ip addr del {addr} dev {dev}"),
        }
    }

    /// Reads the host: is the step in effect?
    pub fn check(&self, sys: &dyn System) -> Result<StepState> {
        match self {
            Step::Sysctl {
                key,
                value,
                deferred_if_missing,
                ..
            } => match sys.read_sysctl(&key.path()) {
                Ok(v) if v == *value => Ok(StepState::InEffect),
                Ok(v) => Ok(StepState::Missing { current: Some(v) }),
                Err(e) if e.kind() == io::ErrorKind::NotFound && deferred_if_missing.is_some() => {
                    Ok(StepState::Deferred {
                        reason: format!(
                            "device {} does not exist yet: `balancer run` creates it, then applies this step",
                            deferred_if_missing.as_deref().unwrap_or_default()
                        ),
                    })
                }
                Err(source) => Err(Error::Sysctl {
                    key: key.name(),
                    source,
                }),
            },
            Step::NftTable { name, digest, .. } => match current_table(sys, name)? {
                None => Ok(StepState::Missing { current: None }),
                Some(text) if text.contains(&digest_comment(digest)) => Ok(StepState::InEffect),
                Some(_) => Ok(StepState::Missing {
                    current: Some("a table of that name with other rules".to_owned()),
                }),
            },
            Step::Address { dev, addr, .. } => {
                let found = device_addresses(sys, dev)?;
                match found.iter().find(|(a, _)| a == addr) {
                    Some(_) => Ok(StepState::InEffect),
                    None => Ok(StepState::Missing { current: None }),
                }
            }
        }
    }

    /// Applies the step (assumed not in effect) and says what changed.
    fn apply(&self, sys: &dyn System) -> Result<Change> {
        match self {
            Step::Sysctl { key, value, .. } => {
                let path = key.path();
                let previous = sys.read_sysctl(&path).map_err(|source| Error::Sysctl {
                    key: key.name(),
                    source,
                })?;
                sys.write_sysctl(&path, value)
                    .map_err(|source| Error::Sysctl {
                        key: key.name(),
                        source,
                    })?;
                Ok(Change::SetSysctl {
                    key: key.clone(),
                    previous,
                    value: value.clone(),
                })
            }
            Step::NftTable { name, ruleset, .. } => {
                let previous = current_table(sys, name)?;
                run_ok(sys, &["nft", "-f", "-"], Some(&nft_script(name, ruleset)))?;
                Ok(Change::CreatedTable {
                    name: name.clone(),
                    previous,
                })
            }
            Step::Address {
                dev, addr, label, ..
            } => {
                let a = addr.to_string();
                run_ok(
                    sys,
                    &["ip", "addr", "add", &a, "dev", dev, "label", label],
                    None,
                )?;
                Ok(Change::AddedAddress {
                    dev: dev.clone(),
                    addr: *addr,
                })
            }
        }
    }

    /// Reverses the step as found in effect, when there is no record of
    /// what was there before. Returns `None` when it cannot (a sysctl whose
    /// previous value is unknown).
    fn remove(&self, sys: &dyn System) -> Result<Option<Change>> {
        match self {
            Step::Sysctl { .. } => Ok(None),
            Step::NftTable { name, .. } => {
                run_ok(sys, &["nft", "delete", "table", "netdev", name], None)?;
                Ok(Some(Change::CreatedTable {
                    name: name.clone(),
                    previous: None,
                }))
            }
            Step::Address { dev, addr, .. } => {
                let a = addr.to_string();
                run_ok(sys, &["ip", "addr", "del", &a, "dev", dev], None)?;
                Ok(Some(Change::AddedAddress {
                    dev: dev.clone(),
                    addr: *addr,
                }))
            }
        }
    }
}

/// The nft script that (re)places table `name` with `ruleset`: declaring
/// then deleting the table first makes one atomic transaction that works
/// whether or not the table exists (and never duplicates rules).
fn nft_script(name: &str, ruleset: &str) -> String {
    format!("table netdev {name}\ndelete table netdev {name}\n{ruleset}")
}

fn digest_comment(digest: &str) -> String {
    format!("comment \"balancer setup {digest}\"")
}

/// FNV-1a 64: a stable digest of the ruleset text (no security role: it
/// only tells "the table we would write" from "some other table").
fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The text of `table netdev NAME`, or `None` if there is no such table.
/// Text, not `nft -j`: nft 1.0.6's JSON output omits table comments, which
/// carry the digest.
fn current_table(sys: &dyn System, name: &str) -> Result<Option<String>> {
    let argv = ["nft", "list", "table", "netdev", name];
    let out = sys.run(&argv, None)?;
    if out.success {
        Ok(Some(out.stdout))
    } else if out.stderr.contains("No such file or directory") {
        Ok(None)
    } else {
        Err(Error::CommandFailed {
            command: argv.join(" "),
            status: out.status,
            stderr: out.stderr,
        })
    }
}

/// The IPv4 addresses of `dev` with their labels, from `ip -j addr show`.
fn device_addresses(sys: &dyn System, dev: &str) -> Result<Vec<(Ipv4Net, String)>> {
    let argv = ["ip", "-j", "-4", "addr", "show", "dev", dev];
    let out = run_ok(sys, &argv, None)?;
    parse_ip_addr_json(&out.stdout).map_err(|message| Error::CommandOutput {
        command: argv.join(" "),
        message,
    })
}

/// `[{"ifname":..,"addr_info":[{"family":"inet","local":"198.19.0.1","prefixlen":24,"label":"back0:0"},..]}]`
fn parse_ip_addr_json(text: &str) -> std::result::Result<Vec<(Ipv4Net, String)>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    for link in value.as_array().into_iter().flatten() {
        for info in link
            .get("addr_info")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            if info.get("family").and_then(|f| f.as_str()) != Some("inet") {
                continue;
            }
            let local = info.get("local").and_then(|l| l.as_str()).unwrap_or("");
            let Ok(addr) = local.parse::<Ipv4Addr>() else {
                return Err(format!("bad address `{local}`"));
            };
            let prefix = info.get("prefixlen").and_then(|p| p.as_u64()).unwrap_or(32);
            let net = u8::try_from(prefix)
                .ok()
                .and_then(|p| Ipv4Net::new(addr, p).ok())
                .ok_or_else(|| format!("bad prefix length {prefix}"))?;
            let label = info
                .get("label")
                .and_then(|l| l.as_str())
                .unwrap_or("")
                .to_owned();
            found.push((net, label));
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------

/// One thing [`Plan::apply`] changed, with what is needed to reverse it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    SetSysctl {
        key: Sysctl,
        previous: String,
        value: String,
    },
    /// The table was created (or replaced: `previous` holds the old text).
    CreatedTable {
        name: String,
        previous: Option<String>,
    },
    AddedAddress {
        dev: String,
        addr: Ipv4Net,
    },
}

impl Change {
    pub fn undo_command(&self) -> String {
        match self {
            Change::SetSysctl { key, previous, .. } => format!("sysctl -w {key}={previous}"),
            Change::CreatedTable {
                name,
                previous: None,
            } => format!("nft delete table netdev {name}"),
            Change::CreatedTable {
                name,
                previous: Some(_),
            } => {
                format!("nft -f <the previous table netdev {name}>")
            }
            Change::AddedAddress { dev, addr } => format!("ip addr del {addr} dev {dev}"),
        }
    }

    fn undo(&self, sys: &dyn System) -> Result<()> {
        match self {
            Change::SetSysctl { key, previous, .. } => sys
                .write_sysctl(&key.path(), previous)
                .map_err(|source| Error::Sysctl {
                    key: key.name(),
                    source,
                }),
            Change::CreatedTable { name, previous } => {
                let script = nft_script(name, previous.as_deref().unwrap_or(""));
                run_ok(sys, &["nft", "-f", "-"], Some(&script)).map(drop)
            }
            Change::AddedAddress { dev, addr } => {
                let a = addr.to_string();
                let out = sys.run(&["ip", "addr", "del", &a, "dev", dev], None)?;
                // Already gone (the device was deleted, or someone removed
                // it): the goal of the undo is met.
                if out.success
                    || out.stderr.contains("Cannot assign requested address")
                    || out.stderr.contains("does not exist")
                {
                    Ok(())
                } else {
                    Err(Error::CommandFailed {
                        command: format!("ip addr del {a} dev {dev}"),
                        status: out.status,
                        stderr: out.stderr,
                    })
                }
            }
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::SetSysctl {
                key,
                previous,
                value,
            } => write!(f, "{key}: {previous} -> {value}"),
            Change::CreatedTable {
                name,
                previous: None,
            } => write!(f, "table netdev {name} created"),
            Change::CreatedTable {
                name,
                previous: Some(_),
            } => write!(f, "table netdev {name} replaced"),
            Change::AddedAddress { dev, addr } => write!(f, "{addr} added to {dev}"),
        }
    }
}

/// Exactly what one [`Plan::apply`] changed, in the order it changed it.
/// Serializable so that `balancer setup --apply` can record it for a later
/// `--undo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub changes: Vec<Change>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Reverses the changes on this host, last first.
    pub fn undo(&self) -> Result<()> {
        self.undo_on(&Host)
    }

    /// Reverses the changes on `sys`, last first. Tries every change even
    /// after a failure (leaving less behind), then reports the first error.
    pub fn undo_on(&self, sys: &dyn System) -> Result<()> {
        let mut first = None;
        for change in self.changes.iter().rev() {
            match change.undo(sys) {
                Ok(()) => tracing::info!(undo = %change.undo_command(), "setup undone"),
                Err(e) => {
                    tracing::warn!(undo = %change.undo_command(), error = %e, "setup undo failed");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Adds `later` to a record, keeping for each sysctl the value from
    /// before the *first* change (the one to restore).
    pub fn merge(&mut self, later: Applied) {
        for change in later.changes {
            let known = self.changes.iter().any(|c| match (c, &change) {
                (Change::SetSysctl { key: a, .. }, Change::SetSysctl { key: b, .. }) => a == b,
                (Change::CreatedTable { name: a, .. }, Change::CreatedTable { name: b, .. }) => {
                    a == b
                }
                (
                    Change::AddedAddress { dev: d1, addr: a1 },
                    Change::AddedAddress { dev: d2, addr: a2 },
                ) => d1 == d2 && a1 == a2,
                _ => false,
            });
            if !known {
                self.changes.push(change);
            }
        }
    }
}

/// What [`Plan::undo`] did for each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undone {
    /// Reversed with this command.
    Reversed(String),
    /// Was not in effect.
    NotInEffect,
    /// In effect, but with no record of the previous value: left alone.
    NoRecord(String),
}

// ---------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------

/// The ordered steps that prepare a host for `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub node: String,
    pub steps: Vec<Step>,
}

impl Plan {
    /// The plan for `config` (pure: reads nothing from the host).
    pub fn for_config(config: &Config) -> Plan {
        let n = &config.node;
        let vips = config.vips();
        let mut steps = vec![
            Step::Sysctl {
                key: Sysctl::conf(&n.front, "arp_ignore"),
                value: "1".to_owned(),
                deferred_if_missing: None,
                why: "front: answer ARP only for addresses of the front itself",
            },
            Step::Sysctl {
                key: Sysctl::conf(&n.front, "arp_announce"),
                value: "2".to_owned(),
                deferred_if_missing: None,
                why: "front: never use a VIP as the sender of the kernel's ARP requests",
            },
            Step::Sysctl {
                key: Sysctl::conf("all", "rp_filter"),
                value: "0".to_owned(),
                deferred_if_missing: None,
                why: "locally served packets enter the TUN with client sources: no reverse-path filter (effective = max(all, device))",
            },
            Step::Sysctl {
                key: Sysctl::conf(&n.local_tun, "rp_filter"),
                value: "0".to_owned(),
                deferred_if_missing: Some(n.local_tun.clone()),
                why: "the TUN itself: no reverse-path filter (deferred until `balancer run` creates it)",
            },
        ];
        let name = format!("balancer_{}", n.name);
        let vip_set = vips
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let body = format!(
            "\tchain front_ingress {{\n\
             \t\ttype filter hook ingress device \"{front}\" priority 0; policy accept;\n\
             \t\tip daddr {{ {vip_set} }} drop\n\
             \t\tarp operation request arp daddr ip {{ {vip_set} }} drop\n\
             \t}}\n\
             \tchain back_ingress {{\n\
             \t\ttype filter hook ingress device \"{back}\" priority 0; policy accept;\n\
             \t\tmeta protocol ip fib daddr type {{ local, broadcast, multicast }} accept\n\
             \t\tmeta protocol ip drop\n\
             \t}}\n",
            front = n.front,
            back = n.back,
        );
        let digest = format!("{:016x}", fnv1a64(&format!("{name}\n{body}")));
        let ruleset = format!(
            "table netdev {name} {{\n\t{}\n{body}}}\n",
            digest_comment(&digest)
        );
        steps.push(Step::NftTable {
            name,
            ruleset,
            digest,
        });
        for (i, vip) in vips.iter().enumerate() {
            steps.push(Step::Address {
                dev: n.front.clone(),
                addr: Ipv4Net::from(*vip),
                label: format!("{}:{i}", n.front),
                why: "VIP alias on the front (a local address for locally served flows)",
            });
        }
        // In a cluster the back gateway is a heartbeat instance: it moves to
        // a survivor when its node fails, so the heartbeat adds and removes it.
        if config.cluster.is_none() {
            steps.push(Step::Address {
                dev: n.back.clone(),
                addr: n.back_gateway,
                label: format!("{}:0", n.back),
                why: "back gateway alias: NAT real servers route through it",
            });
        }
        Plan {
            node: n.name.clone(),
            steps,
        }
    }

    /// The state of every step on this host.
    pub fn check(&self) -> Result<Vec<StepState>> {
        self.check_on(&Host)
    }

    pub fn check_on(&self, sys: &dyn System) -> Result<Vec<StepState>> {
        self.steps.iter().map(|s| s.check(sys)).collect()
    }

    /// Applies the steps not in effect, in order, on this host. On failure
    /// reverses what it did and returns the error: all or nothing.
    pub fn apply(&self) -> Result<Applied> {
        self.apply_on(&Host)
    }

    pub fn apply_on(&self, sys: &dyn System) -> Result<Applied> {
        let mut applied = Applied::default();
        for step in &self.steps {
            let result = match step.check(sys) {
                Ok(StepState::InEffect) => continue,
                Ok(StepState::Deferred { reason }) => {
                    tracing::info!(step = %step.command(), reason, "setup step deferred");
                    continue;
                }
                Ok(StepState::Missing { .. }) => step.apply(sys),
                Err(e) => Err(e),
            };
            match result {
                Ok(change) => {
                    tracing::info!(command = %step.command().lines().next().unwrap_or(""), change = %change, "setup applied");
                    applied.changes.push(change);
                }
                Err(e) => {
                    if let Err(undo) = applied.undo_on(sys) {
                        tracing::warn!(error = %undo, "rolling back a failed setup left something behind");
                    }
                    return Err(e);
                }
            }
        }
        Ok(applied)
    }

    /// Reverses the steps in effect, last first: with the recorded previous
    /// value where `record` has one (sysctls), else by removing what the
    /// step added; a sysctl without a record is left alone and reported.
    pub fn undo(&self, record: &Applied) -> Result<Vec<Undone>> {
        self.undo_on(&Host, record)
    }

    pub fn undo_on(&self, sys: &dyn System, record: &Applied) -> Result<Vec<Undone>> {
        let mut out = vec![Undone::NotInEffect; self.steps.len()];
        for (i, step) in self.steps.iter().enumerate().rev() {
            if step.check(sys)? != StepState::InEffect {
                continue;
            }
            let recorded = record.changes.iter().find(|c| match (c, step) {
                (Change::SetSysctl { key, .. }, Step::Sysctl { key: k, .. }) => key == k,
                (Change::CreatedTable { name, .. }, Step::NftTable { name: n, .. }) => name == n,
                _ => false,
            });
            out[i] = match recorded {
                Some(change) => {
                    change.undo(sys)?;
                    Undone::Reversed(change.undo_command())
                }
                None => match step.remove(sys)? {
                    Some(change) => Undone::Reversed(change.undo_command()),
                    None => Undone::NoRecord(match step {
                        Step::Sysctl { key, value, .. } => {
                            format!(
                                "{key}={value}: no record that setup changed it (it may have been so before); left as is"
                            )
                        }
                        _ => step.command(),
                    }),
                },
            };
        }
        Ok(out)
    }

    /// Where `balancer setup --apply` records what it changed, for
    /// `--undo`: next to the control socket.
    pub fn record_path(config: &Config) -> PathBuf {
        let dir = config
            .node
            .control_socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        dir.join(format!("setup-{}.json", config.node.name))
    }
}

/// The plan as a shell script: a comment per step, then its command.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# balancer setup for node {}", self.node)?;
        for step in &self.steps {
            writeln!(f, "# {}", step.describe())?;
            writeln!(f, "{}", step.command())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::*;

    /// A host in memory: sysctls, addresses per device, nft tables. Runs
    /// the same plan logic as [`Host`] without a kernel.
    #[derive(Default)]
    struct FakeHost {
        sysctls: RefCell<BTreeMap<PathBuf, String>>,
        addrs: RefCell<BTreeMap<String, Vec<(Ipv4Net, String)>>>,
        tables: RefCell<BTreeMap<String, String>>,
        commands: RefCell<Vec<String>>,
    }

    /// Sysctls, addresses per device, table names.
    type HostState = (
        BTreeMap<PathBuf, String>,
        BTreeMap<String, Vec<(Ipv4Net, String)>>,
        Vec<String>,
    );

    impl FakeHost {
        fn new(devices: &[&str]) -> FakeHost {
            let host = FakeHost::default();
            for dev in devices.iter().chain(["all", "default"].iter()) {
                for (name, value) in [
                    ("arp_ignore", "0"),
                    ("arp_announce", "0"),
                    ("rp_filter", "2"),
                ] {
                    host.sysctls
                        .borrow_mut()
                        .insert(Sysctl::conf(dev, name).path(), value.to_owned());
                }
                host.addrs
                    .borrow_mut()
                    .insert((*dev).to_owned(), Vec::new());
            }
            host
        }

        fn snapshot(&self) -> HostState {
            (
                self.sysctls.borrow().clone(),
                self.addrs.borrow().clone(),
                self.tables.borrow().keys().cloned().collect(),
            )
        }
    }

    fn ok(stdout: String) -> Result<CommandOutput> {
        Ok(CommandOutput {
            success: true,
            status: "exit status: 0".to_owned(),
            stdout,
            stderr: String::new(),
        })
    }

    fn fail(stderr: &str) -> Result<CommandOutput> {
        Ok(CommandOutput {
            success: false,
            status: "exit status: 1".to_owned(),
            stdout: String::new(),
            stderr: stderr.to_owned(),
        })
    }

    impl System for FakeHost {
        fn run(&self, argv: &[&str], stdin: Option<&str>) -> Result<CommandOutput> {
            self.commands.borrow_mut().push(argv.join(" "));
            match argv {
                ["ip", "-j", "-4", "addr", "show", "dev", dev] => match self
                    .addrs
                    .borrow()
                    .get(*dev)
                {
                    None => fail("Device does not exist."),
                    Some(list) => {
                        let infos: Vec<serde_json::Value> = list
                            .iter()
                            .map(|(n, l)| {
                                serde_json::json!({"family":"inet","local":n.addr().to_string(),"prefixlen":n.prefix_len(),"label":l})
                            })
                            .collect();
                        ok(serde_json::json!([{"ifname": dev, "addr_info": infos}]).to_string())
                    }
                },
                ["ip", "addr", "add", addr, "dev", dev, "label", label] => {
                    let net: Ipv4Net = addr.parse().expect("addr");
                    let mut addrs = self.addrs.borrow_mut();
                    let list = addrs.get_mut(*dev).expect("device");
                    if list.iter().any(|(n, _)| *n == net) {
                        return fail("RTNETLINK answers: File exists");
                    }
                    list.push((net, (*label).to_owned()));
                    ok(String::new())
                }
                ["ip", "addr", "del", addr, "dev", dev] => {
                    let net: Ipv4Net = addr.parse().expect("addr");
                    let mut addrs = self.addrs.borrow_mut();
                    let list = addrs.get_mut(*dev).expect("device");
                    let before = list.len();
                    list.retain(|(n, _)| *n != net);
                    if list.len() == before {
                        return fail("RTNETLINK answers: Cannot assign requested address");
                    }
                    ok(String::new())
                }
                ["nft", "list", "table", "netdev", name] => match self.tables.borrow().get(*name) {
                    Some(text) => ok(text.clone()),
                    None => fail("Error: No such file or directory"),
                },
                ["nft", "delete", "table", "netdev", name] => {
                    match self.tables.borrow_mut().remove(*name) {
                        Some(_) => ok(String::new()),
                        None => fail("Error: No such file or directory"),
                    }
                }
                ["nft", "-f", "-"] => {
                    // `table X` / `delete table X` / optional new table text.
                    let text = stdin.unwrap_or("");
                    let mut lines = text.splitn(3, '\n');
                    let name = lines
                        .next()
                        .and_then(|l| l.strip_prefix("table netdev "))
                        .expect("script starts by declaring the table")
                        .to_owned();
                    lines.next();
                    let rest = lines.next().unwrap_or("");
                    let mut tables = self.tables.borrow_mut();
                    tables.remove(&name);
                    if !rest.is_empty() {
                        tables.insert(name, rest.to_owned());
                    }
                    ok(String::new())
                }
                other => panic!("unexpected command {other:?}"),
            }
        }

        fn read_sysctl(&self, path: &Path) -> io::Result<String> {
            self.sysctls
                .borrow()
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        fn write_sysctl(&self, path: &Path, value: &str) -> io::Result<()> {
            match self.sysctls.borrow_mut().get_mut(path) {
                Some(v) => {
                    *v = value.to_owned();
                    Ok(())
                }
                None => Err(io::Error::from(io::ErrorKind::NotFound)),
            }
        }
    }

    fn config() -> Config {
        Config::parse(
            r#"
[node]
name = "lb1"
front = "front0"
back = "back0"
back_gateway = "198.19.0.1/24"

[[service]]
name = "web"
vip = "198.18.0.100"
port = 80
[[service.backend]]
address = "198.19.0.21"
forward = "nat"

[[service]]
name = "web2"
vip = "198.18.0.101"
port = 80
[[service.backend]]
forward = "local"

[[service]]
name = "dns"
vip = "198.18.0.100"
port = 53
protocol = "udp"
[[service.backend]]
address = "198.19.0.22"
forward = "nat"
"#,
            "test.toml",
        )
        .expect("valid")
    }

    #[test]
    fn one_alias_label_per_distinct_vip() {
        let plan = Plan::for_config(&config());
        let aliases: Vec<String> = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Address { .. }))
            .map(Step::command)
            .collect();
        assert_eq!(
            aliases,
            [
                "ip addr add 198.18.0.100/32 dev front0 label front0:0",
                "ip addr add 198.18.0.101/32 dev front0 label front0:1",
                "ip addr add 198.19.0.1/24 dev back0 label back0:0",
            ]
        );
    }

    #[test]
    fn sysctl_name_writes_a_dot_in_a_device_name_as_slash() {
        let key = Sysctl::conf("eth0.5", "rp_filter");
        assert_eq!(key.name(), "net.ipv4.conf.eth0/5.rp_filter");
        assert_eq!(
            key.path(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.5/rp_filter")
        );
    }

    #[test]
    fn apply_changes_only_what_is_missing_and_twice_changes_nothing() {
        let host = FakeHost::new(&["front0", "back0"]);
        host.sysctls
            .borrow_mut()
            .insert(Sysctl::conf("front0", "arp_ignore").path(), "1".to_owned());
        let before = host.snapshot();
        let plan = Plan::for_config(&config());
        let states = plan.check_on(&host).expect("check");
        assert_eq!(states[0], StepState::InEffect);
        assert!(
            matches!(states[3], StepState::Deferred { .. }),
            "{:?}",
            states[3]
        );

        let applied = plan.apply_on(&host).expect("apply");
        let shown: Vec<String> = applied.changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "net.ipv4.conf.front0.arp_announce: 0 -> 2",
                "net.ipv4.conf.all.rp_filter: 2 -> 0",
                "table netdev balancer_lb1 created",
                "198.18.0.100/32 added to front0",
                "198.18.0.101/32 added to front0",
                "198.19.0.1/24 added to back0",
            ]
        );
        let states = plan.check_on(&host).expect("check");
        assert!(
            states
                .iter()
                .all(|s| matches!(s, StepState::InEffect | StepState::Deferred { .. })),
            "{states:?}"
        );
        assert!(plan.apply_on(&host).expect("again").is_empty());

        applied.undo_on(&host).expect("undo");
        assert_eq!(host.snapshot(), before);
    }

    #[test]
    fn tun_step_applies_once_the_device_exists() {
        let host = FakeHost::new(&["front0", "back0"]);
        let plan = Plan::for_config(&config());
        let first = plan.apply_on(&host).expect("apply");
        // What `run` does: the TUN appears, with the default rp_filter.
        host.sysctls
            .borrow_mut()
            .insert(Sysctl::conf("lbtun0", "rp_filter").path(), "1".to_owned());
        let second = plan.apply_on(&host).expect("apply after run made the TUN");
        assert_eq!(second.changes.len(), 1);
        assert_eq!(
            second.changes[0].to_string(),
            "net.ipv4.conf.lbtun0.rp_filter: 1 -> 0"
        );
        second.undo_on(&host).expect("undo");
        first.undo_on(&host).expect("undo");
    }

    #[test]
    fn a_changed_config_replaces_the_table_and_undo_restores_the_old_one() {
        let host = FakeHost::new(&["front0", "back0"]);
        let old = Plan::for_config(&config());
        old.apply_on(&host).expect("apply");
        let old_text = host.tables.borrow().get("balancer_lb1").cloned();

        let mut changed = config();
        changed.services.truncate(1);
        let plan = Plan::for_config(&changed);
        assert!(matches!(
            plan.check_on(&host).expect("check")[4],
            StepState::Missing { current: Some(_) }
        ));
        let applied = plan.apply_on(&host).expect("apply");
        assert_eq!(
            applied.changes[0].to_string(),
            "table netdev balancer_lb1 replaced"
        );
        applied.undo_on(&host).expect("undo");
        assert_eq!(host.tables.borrow().get("balancer_lb1").cloned(), old_text);
    }

    #[test]
    fn failed_apply_rolls_back_what_it_did() {
        // No back0: the back gateway alias (the last step) fails.
        let host = FakeHost::new(&["front0"]);
        let before = host.snapshot();
        let err = Plan::for_config(&config())
            .apply_on(&host)
            .expect_err("back0 is missing");
        assert!(matches!(err, Error::CommandFailed { .. }), "{err}");
        assert_eq!(host.snapshot(), before);
    }

    #[test]
    fn undo_without_record_removes_addresses_and_table_but_keeps_sysctls() {
        let host = FakeHost::new(&["front0", "back0"]);
        let plan = Plan::for_config(&config());
        let applied = plan.apply_on(&host).expect("apply");

        let undone = plan.undo_on(&host, &Applied::default()).expect("undo");
        assert!(
            matches!(&undone[0], Undone::NoRecord(m) if m.contains("arp_ignore")),
            "{undone:?}"
        );
        assert_eq!(undone[3], Undone::NotInEffect, "the TUN does not exist");
        assert_eq!(
            undone[4],
            Undone::Reversed("nft delete table netdev balancer_lb1".to_owned())
        );
        assert!(host.addrs.borrow().values().all(Vec::is_empty));
        assert!(host.tables.borrow().is_empty());

        // With the record, the sysctls come back too.
        plan.apply_on(&host).expect("apply again");
        plan.undo_on(&host, &applied).expect("undo with record");
        assert_eq!(
            host.snapshot(),
            FakeHost::new(&["front0", "back0"]).snapshot()
        );
    }

    #[test]
    fn merge_keeps_the_value_from_before_the_first_change() {
        let key = Sysctl::conf("all", "rp_filter");
        let mut record = Applied {
            changes: vec![Change::SetSysctl {
                key: key.clone(),
                previous: "2".to_owned(),
                value: "0".to_owned(),
            }],
        };
        record.merge(Applied {
            changes: vec![Change::SetSysctl {
                key,
                previous: "1".to_owned(),
                value: "0".to_owned(),
            }],
        });
        assert_eq!(record.changes.len(), 1);
        assert!(
            matches!(&record.changes[0], Change::SetSysctl { previous, .. } if previous == "2")
        );
    }

    #[test]
    fn parses_ip_json_addresses_and_labels() {
        let text = r#"[{"ifindex":3,"ifname":"d0","addr_info":[{"family":"inet","local":"198.19.0.1","prefixlen":24,"scope":"global","label":"d0:0"},{"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
        let found = parse_ip_addr_json(text).expect("parses");
        assert_eq!(
            found,
            [("198.19.0.1/24".parse().expect("net"), "d0:0".to_owned())]
        );
    }
}
