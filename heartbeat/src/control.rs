//! Control socket: a Unix stream socket speaking JSON lines. A request is
//! one line, `{"cmd":"status"}` (or the bare word `status`); the answer is
//! one line of JSON: the [`NodeStatus`](crate::driver::NodeStatus), or
//! `{"error": "..."}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::driver::NodeStatus;

pub const DEFAULT_SOCKET: &str = "/run/heartbeat.sock";

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    cmd: String,
}

fn answer(line: &str, status: &NodeStatus) -> String {
    let cmd = match serde_json::from_str::<Request>(line) {
        Ok(r) => r.cmd,
        Err(_) => line.trim().to_string(),
    };
    let out = match cmd.as_str() {
        "status" => serde_json::to_string(status),
        other => serde_json::to_string(
            &serde_json::json!({ "error": format!("unknown command {other:?}") }),
        ),
    };
    out.unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Serves until the task is dropped. Removes a stale socket file first.
pub async fn serve(path: PathBuf, status: watch::Receiver<Arc<NodeStatus>>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (conn, _) = l.accept().await?;
        let status = status.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let snap = status.borrow().clone();
                let mut out = answer(&line, &snap);
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Client side: one request, one JSON answer line.
pub fn query(path: &Path, cmd: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    writeln!(s, "{}", serde_json::json!({ "cmd": cmd }))?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_answers_json_and_unknown_is_an_error() {
        let st = NodeStatus {
            node_id: 3,
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&answer("{\"cmd\":\"status\"}", &st)).expect("json");
        assert_eq!(v["node_id"], 3);
        let v: serde_json::Value = serde_json::from_str(&answer("status", &st)).expect("json");
        assert_eq!(v["node_id"], 3);
        let v: serde_json::Value =
            serde_json::from_str(&answer("{\"cmd\":\"nope\"}", &st)).expect("json");
        assert!(v["error"].as_str().is_some_and(|e| e.contains("nope")));
    }
}
