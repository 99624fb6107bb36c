//! The `balancer` binary: exit codes and what it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn balancer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_balancer"))
        .args(args)
        .output()
        .expect("run balancer")
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name)
        .display()
        .to_string()
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("balancer-cli-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn check_accepts_an_example_and_prints_a_summary() {
    let out = balancer(&["check", "-c", &example("single-nat.toml")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 service(s), 6 backend(s)"), "{stdout}");
    assert!(
        stdout.contains("-> rs3 198.19.0.23:8080 nat weight 2"),
        "{stdout}"
    );
}

#[test]
fn check_exits_2_with_file_line_column_and_key() {
    let text = "[node]\nname = \"lb1\"\nfront = \"front0\"\nback = \"back0\"\nback_gateway = \"198.19.0.1/24\"\n\
                [[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n\
                [[service.backend]]\naddress = \"198.19.0.21\"\nweight = 70000\nforward = \"nat\"\n";
    let file = TempFile::new("bad.toml", text);
    let out = balancer(&["check", "-c", &file.0.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:12:10: service[0].backend[0].weight: ", file.0.display());
    assert!(stderr.starts_with(&expected), "{stderr}");
}

#[test]
fn check_exits_2_for_a_missing_file() {
    let out = balancer(&["check", "-c", "/nonexistent/balancer.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/balancer.toml"));
}

#[test]
fn setup_without_flags_prints_the_plan_and_changes_nothing() {
    let out = balancer(&["setup", "-c", &example("single-dr.toml")]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ip addr add 198.18.0.100/32 dev front0 label front0:0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ip addr add 198.19.0.1/24 dev back0 label back0:0"),
        "{stdout}"
    );
}

#[test]
fn status_reports_a_node_that_is_not_running() {
    let out = balancer(&["status", "-s", "/nonexistent/balancer.sock"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/balancer.sock") && stderr.contains("cannot connect"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_table_and_the_json_of_a_running_server() {
    use std::sync::Arc;

    use balancer::control::ControlServer;
    use balancer::{Config, Stats, StatusSnapshot};

    let config = Config::load(example("single-mixed.toml")).expect("valid");
    let stats = Arc::new(Stats::new(&config));
    stats.record_in(0, 1, 1000);
    stats.record_drop(balancer::DropReason::NoService);
    let socket =
        std::env::temp_dir().join(format!("balancer-cli-{}-status.sock", std::process::id()));
    let server = ControlServer::bind(&socket).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(Arc::clone(&stats), async {
        let _ = stopped.await;
    }));

    let path = socket.display().to_string();
    let (table, json) = tokio::task::spawn_blocking(move || {
        (
            balancer(&["status", "-s", &path]),
            balancer(&["status", "-s", &path, "--json"]),
        )
    })
    .await
    .expect("join");
    stop.send(()).expect("server running");
    task.await.expect("join").expect("serve");

    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table, stats.snapshot().render(false));
    assert!(table.contains("no_service"), "{table}");
    let parsed: StatusSnapshot =
        serde_json::from_slice(&json.stdout).expect("--json prints a snapshot");
    assert_eq!(parsed, stats.snapshot());
}
