//! Slow actions, off the protocol thread: interface aliases over netlink,
//! notify scripts. They may block or take long; adverts do not wait on them.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_route::address::AddressAttribute;

use crate::config::Notify;
use crate::vrrp::state::State;

/// One alias: address, prefix length, label `IF:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub label: String,
}

#[derive(Debug, Clone)]
pub enum Exec {
    AddAliases {
        ifindex: u32,
        aliases: Vec<Alias>,
    },
    RemoveAliases {
        ifindex: u32,
        aliases: Vec<Alias>,
    },
    /// keepalived order: `script INSTANCE|GROUP name state priority`.
    Notify {
        notify: Notify,
        kind: &'static str,
        name: String,
        state: State,
        priority: u8,
    },
    /// The protocol thread finished (after shutdown).
    Done,
}

/// Runs actions in order until `Done` or the channel closes.
pub async fn run(mut rx: tokio::sync::mpsc::UnboundedReceiver<Exec>) {
    let nl = match rtnetlink::new_connection() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            Some(handle)
        }
        Err(e) => {
            tracing::error!(error = %e, "netlink connection failed; aliases will not be managed");
            None
        }
    };
    let mut children = Vec::new();
    while let Some(x) = rx.recv().await {
        match x {
            Exec::AddAliases { ifindex, aliases } => {
                if let Some(h) = &nl {
                    for a in aliases {
                        let mut req = h
                            .address()
                            .add(ifindex, IpAddr::V4(a.addr), a.prefix)
                            .replace();
                        req.message_mut()
                            .attributes
                            .push(AddressAttribute::Label(a.label.clone()));
                        match req.execute().await {
                            Ok(()) => {
                                tracing::info!(addr = %a.addr, label = %a.label, "alias added")
                            }
                            Err(e) => {
                                tracing::warn!(addr = %a.addr, error = %e, "alias add failed")
                            }
                        }
                    }
                }
            }
            Exec::RemoveAliases { ifindex, aliases } => {
                if let Some(h) = &nl {
                    for a in aliases {
                        let msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
                            .index(ifindex)
                            .address(a.addr, a.prefix)
                            .build();
                        match h.address().del(msg).execute().await {
                            Ok(()) => tracing::info!(addr = %a.addr, "alias removed"),
                            // Already gone (never added, or removed by hand).
                            Err(e) => tracing::debug!(addr = %a.addr, error = %e, "alias remove"),
                        }
                    }
                }
            }
            Exec::Notify {
                notify,
                kind,
                name,
                state,
                priority,
            } => {
                children.extend(spawn_notify(&notify, kind, &name, state, priority));
            }
            Exec::Done => break,
        }
        children.retain_mut(|c: &mut tokio::process::Child| matches!(c.try_wait(), Ok(None)));
    }
    // Let the stop notify scripts finish (bounded).
    for mut c in children {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), c.wait()).await;
    }
}

fn spawn_notify(
    n: &Notify,
    kind: &str,
    name: &str,
    state: State,
    priority: u8,
) -> Vec<tokio::process::Child> {
    let specific = match state {
        State::Master => &n.master,
        State::Backup => &n.backup,
        State::Fault => &n.fault,
        State::Initialize => &n.stop,
    };
    let mut out = Vec::new();
    let mut run = |line: &str, args: Vec<String>| {
        let mut words = line.split_whitespace();
        let Some(prog) = words.next() else { return };
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(words)
            .args(args)
            .stdin(std::process::Stdio::null());
        match cmd.spawn() {
            Ok(c) => out.push(c),
            Err(e) => tracing::warn!(script = line, error = %e, "notify script failed to start"),
        }
    };
    if let Some(s) = specific {
        run(s, Vec::new());
    }
    if let Some(s) = &n.any {
        run(
            s,
            vec![
                kind.into(),
                name.into(),
                state.notify_word().into(),
                priority.to_string(),
            ],
        );
    }
    out
}
