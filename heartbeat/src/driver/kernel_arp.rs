//! Keeping the kernel quiet about virtual addresses announced with another
//! MAC (standalone daemon only).
//!
//! With `arp_mac = "vrrp"` (00:00:5e:00:01:VRID) or a fixed (e.g. multicast
//! cluster) MAC, the VIP is still an alias on the interface, so the kernel
//! treats it as local and ARPs for it with the *interface* MAC:
//! - it answers requests for the VIP (its reply races ours, and Linux keeps
//!   the first answer for `locktime`, 1 s by default, so the client usually
//!   ends up with the wrong MAC);
//! - when it resolves a neighbour for traffic sourced from the VIP, its
//!   request says "VIP is at <interface MAC>" (`arp_announce = 0` picks the
//!   packet's source), which every host that has the VIP cached believes.
//!
//! We install one `arp` family nftables table for the life of the daemon:
//! its output hook drops the kernel's replies for the VIPs, and rewrites
//! the sender address of the kernel's own requests from a VIP to the
//! interface's primary address (true, with the interface MAC). Requests
//! still reach the kernel, which keeps learning its neighbours from them.
//! Our responder ([`crate::arp::ArpResponder`]) sends on an AF_PACKET socket,
//! which the `arp` hooks do not see, so only it answers.
//!
//! Why not `arp_ignore`/`arp_filter` with the alias on a dummy device: that
//! moves the VIP off the interface it is announced on (keepalived's
//! `IF:N` label, `ip addr show dev front0`), changes sysctls that govern
//! every address of the interface and outlive the daemon, and still leaves
//! the request sender problem (`arp_announce`). The table touches only the
//! VIPs, is replaced atomically at start (a stale one from a killed run
//! included) and deleted at exit.
//!
//! The balancer does not use this: its dataplane answers ARP itself.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::arp::ArpMac;
use crate::config::Config;

/// One virtual address the kernel must not announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietAddr {
    pub vip: Ipv4Addr,
    /// The interface's primary address: the sender the kernel's own
    /// requests get instead of the VIP (`None`: unknown, requests dropped
    /// rather than mis-announcing).
    pub primary: Option<Ipv4Addr>,
}

/// The table's name for node `id` (two daemons in one namespace do not
/// share it).
pub fn table_name(node_id: u32) -> String {
    format!("heartbeat_{node_id}")
}

/// The addresses of every instance whose ARP MAC is not the interface's.
/// `primary_of(interface)` supplies the primary address when the config
/// does not.
pub fn quiet_addrs(cfg: &Config, primary_of: impl Fn(&str) -> Option<Ipv4Addr>) -> Vec<QuietAddr> {
    let mut out: Vec<QuietAddr> = Vec::new();
    for ic in cfg
        .instances
        .iter()
        .filter(|i| i.arp_mac != ArpMac::Interface)
    {
        let primary = ic.primary.or_else(|| primary_of(&ic.interface));
        for (vip, _) in &ic.virtual_addresses {
            if !out.iter().any(|q| q.vip == *vip) {
                out.push(QuietAddr { vip: *vip, primary });
            }
        }
    }
    out
}

/// The `nft -f` script: creates (or replaces) the table. `None` when there
/// is nothing to keep quiet. Pure, so that the rules are tested as text.
pub fn ruleset(table: &str, addrs: &[QuietAddr]) -> Option<String> {
    if addrs.is_empty() {
        return None;
    }
    let vips = addrs
        .iter()
        .map(|a| a.vip.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = String::new();
    // Declare then delete: replaces a stale table in the same transaction
    // and never fails for a missing one.
    s.push_str(&format!(
        "table arp {table} {{}}\ndelete table arp {table}\n"
    ));
    s.push_str(&format!("table arp {table} {{\n"));
    s.push_str("  chain out {\n    type filter hook output priority 0; policy accept;\n");
    s.push_str(&format!(
        "    arp operation reply arp saddr ip {{ {vips} }} counter drop\n"
    ));
    for a in addrs {
        match a.primary {
            Some(p) => s.push_str(&format!(
                "    arp operation request arp saddr ip {} arp saddr ip set {p} counter\n",
                a.vip
            )),
            None => s.push_str(&format!(
                "    arp operation request arp saddr ip {} counter drop\n",
                a.vip
            )),
        }
    }
    s.push_str("  }\n}\n");
    Some(s)
}

fn nft(script: &str) -> io::Result<()> {
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = c.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let out = c.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Installs the table; `Ok(false)` when there was nothing to install.
pub fn install(table: &str, addrs: &[QuietAddr]) -> io::Result<bool> {
    match ruleset(table, addrs) {
        Some(s) => nft(&s).map(|()| true),
        None => Ok(false),
    }
}

/// Deletes the table (no error if it is already gone).
pub fn remove(table: &str) -> io::Result<()> {
    nft(&format!(
        "table arp {table} {{}}\ndelete table arp {table}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
[node]
id = 3
[[instance]]
name = "front"
interface = "front0"
vrid = 51
priority = 150
virtual_addresses = ["198.18.0.100/24", "198.18.0.101/24"]
arp_mac = "vrrp"
[[instance]]
name = "back"
interface = "back0"
vrid = 52
priority = 150
primary_address = "198.19.0.11"
virtual_addresses = ["198.19.0.1/24"]
arp_mac = "01:00:5e:7f:00:64"
[[instance]]
name = "mgmt"
interface = "mgmt0"
vrid = 53
priority = 150
virtual_addresses = ["10.0.0.1/24"]
"#;

    #[test]
    fn only_non_interface_mac_instances_are_kept_quiet() {
        let cfg = Config::parse("t.toml", CFG).expect("valid");
        let q = quiet_addrs(&cfg, |i| {
            (i == "front0").then_some(Ipv4Addr::new(198, 18, 0, 11))
        });
        let v = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        assert_eq!(
            q,
            vec![
                QuietAddr {
                    vip: v("198.18.0.100"),
                    primary: Some(v("198.18.0.11"))
                },
                QuietAddr {
                    vip: v("198.18.0.101"),
                    primary: Some(v("198.18.0.11"))
                },
                // The configured primary wins over the interface's.
                QuietAddr {
                    vip: v("198.19.0.1"),
                    primary: Some(v("198.19.0.11"))
                },
            ]
        );
    }

    #[test]
    fn ruleset_drops_kernel_replies_and_rewrites_its_requests() {
        let q = [
            QuietAddr {
                vip: Ipv4Addr::new(198, 18, 0, 100),
                primary: Some(Ipv4Addr::new(198, 18, 0, 11)),
            },
            QuietAddr {
                vip: Ipv4Addr::new(198, 19, 0, 1),
                primary: None,
            },
        ];
        assert_eq!(
            ruleset("heartbeat_3", &q).expect("rules"),
            "table arp heartbeat_3 {}\n\
             delete table arp heartbeat_3\n\
             table arp heartbeat_3 {\n  \
               chain out {\n    \
                 type filter hook output priority 0; policy accept;\n    \
                 arp operation reply arp saddr ip { 198.18.0.100, 198.19.0.1 } counter drop\n    \
                 arp operation request arp saddr ip 198.18.0.100 arp saddr ip set 198.18.0.11 counter\n    \
                 arp operation request arp saddr ip 198.19.0.1 counter drop\n  \
               }\n\
             }\n"
        );
        assert_eq!(ruleset("heartbeat_3", &[]), None);
        assert_eq!(table_name(3), "heartbeat_3");
    }
}
