//! Control socket round trips over a socket in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use balancer::control::{self, ControlServer, Request, Response};
use balancer::stats::ConnGauge;
use balancer::{Config, DropReason, Error, Stats};

const CONFIG: &str = r#"
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
name = "rs1"
address = "198.19.0.21"
forward = "nat"

[[service.backend]]
forward = "local"
"#;

/// A directory removed on drop, also when the test panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("balancer-{test}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stats() -> Arc<Stats> {
    Arc::new(Stats::new(
        &Config::parse(CONFIG, "test.toml").expect("valid config"),
    ))
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_round_trip_returns_the_live_counters() {
    let dir = TempDir::new("status");
    // A parent directory that does not exist yet: bind creates it.
    let path = dir.0.join("run").join("balancer.sock");
    let stats = stats();
    stats.record_in(0, 1, 100);
    stats.conn_new(0, 1, ConnGauge::Active);
    stats.record_drop(DropReason::Fragment);

    let server = ControlServer::bind(&path).expect("bind");
    let mode = std::fs::metadata(&path)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(Arc::clone(&stats), async {
        let _ = stopped.await;
    }));

    let client_path = path.clone();
    let snapshot = tokio::task::spawn_blocking(move || control::status(&client_path, TIMEOUT))
        .await
        .expect("join")
        .expect("status");
    assert_eq!(snapshot, stats.snapshot());
    assert_eq!(snapshot.services[0].backends[1].counters.bytes_in, 100);
    assert_eq!(snapshot.services[0].counters.conns_active, 1);

    // Counters move between requests: the second answer sees the change.
    stats.record_out(0, 1, 40);
    let client_path = path.clone();
    let again = tokio::task::spawn_blocking(move || control::status(&client_path, TIMEOUT))
        .await
        .expect("join")
        .expect("status");
    assert_eq!(again.services[0].counters.bytes_out, 40);

    stop.send(()).expect("server still running");
    task.await.expect("join").expect("serve");
    assert!(!path.exists(), "socket removed after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_gets_an_error_line_not_a_hang_up() {
    use std::io::{BufRead, BufReader, Write};
    let dir = TempDir::new("unknown");
    let path = dir.0.join("b.sock");
    let server = ControlServer::bind(&path).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(stats(), async {
        let _ = stopped.await;
    }));
    let client_path = path.clone();
    let replies = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&client_path).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        s.write_all(b"{\"cmd\":\"reboot\"}\nnot json\n{\"cmd\":\"status\"}\n")
            .expect("write");
        let mut r = BufReader::new(s);
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            r.read_line(&mut line).expect("read");
            lines.push(serde_json::from_str::<Response>(&line).expect("a response line"));
        }
        lines
    })
    .await
    .expect("join");
    assert!(
        matches!(&replies[0], Response::Error { error } if error.contains("reboot")),
        "{replies:?}"
    );
    assert!(matches!(&replies[1], Response::Error { .. }), "{replies:?}");
    assert!(matches!(&replies[2], Response::Status(_)), "{replies:?}");
    stop.send(()).expect("server still running");
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = TempDir::new("stale");
    let path = dir.0.join("b.sock");
    // A socket file nobody listens on: what a crashed node leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind stale"));
    assert!(path.exists());
    let server = ControlServer::bind(&path).expect("stale socket replaced");

    match ControlServer::bind(&path) {
        Err(Error::ControlSocketSetup { action, .. }) => assert_eq!(action, "take it over"),
        other => panic!("second bind on a live socket: {other:?}"),
    }
    drop(server);
    assert!(!path.exists());

    std::fs::write(&path, b"not a socket").expect("write file");
    assert!(
        ControlServer::bind(&path).is_err(),
        "a regular file is never deleted"
    );
    assert!(path.exists());
}

#[test]
fn client_reports_a_missing_server() {
    let dir = TempDir::new("missing");
    match control::request(dir.0.join("none.sock"), &Request::Status, TIMEOUT) {
        Err(e @ Error::ControlConnect { .. }) => {
            assert!(e.to_string().contains("none.sock"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}
