//! The bench's backends (BENCH.md): Debian nginx, 1 worker, `access_log
//! off`, a 100-byte file, each with its own config, pid, logs and temp
//! paths under the testbed dir; plus `testsrv` for UDP request/response.

use std::net::SocketAddrV4;
use std::path::Path;

use anyhow::{Context, Result};

use netns_tests::single::wait_listening;
use netns_tests::topo::{Host, Proc, workspace_bin};

/// The URL path of the 100-byte file.
pub const FILE: &str = "/f100";
const FILE_LEN: usize = 100;

/// Temp-path directives of the HTTP modules nginx has; a module compiled
/// out (`--without-http_<m>_module` in `nginx -V`) refuses its directive.
const TEMP_PATHS: [(&str, &str); 4] = [
    ("proxy", "proxy_temp_path"),
    ("fastcgi", "fastcgi_temp_path"),
    ("uwsgi", "uwsgi_temp_path"),
    ("scgi", "scgi_temp_path"),
];

/// `nginx -V` (it prints on stderr).
pub fn nginx_build() -> Result<String> {
    let out = std::process::Command::new("nginx")
        .arg("-V")
        .output()
        .context("running nginx -V (install nginx-light: scripts/deps)")?;
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The first line of `nginx -V`: `nginx version: nginx/1.22.1`.
pub fn nginx_version(build: &str) -> String {
    build
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("nginx version: "))
        .unwrap_or("nginx (unknown version)")
        .to_owned()
}

/// The config of one nginx instance rooted at `prefix`, on `port`.
pub fn nginx_conf(prefix: &Path, port: u16, build: &str) -> String {
    let p = prefix.display();
    let mut temps = format!("    client_body_temp_path {p}/tmp/client_body;\n");
    for (module, directive) in TEMP_PATHS {
        if !build.contains(&format!("--without-http_{module}_module")) {
            temps.push_str(&format!("    {directive} {p}/tmp/{module};\n"));
        }
    }
    format!(
        "# Written by the bench: one worker, no access log, a 100-byte file.\n\
         worker_processes 1;\n\
         daemon off;\n\
         user root;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         worker_rlimit_nofile 16384;\n\
         events {{\n    worker_connections 8192;\n}}\n\
         http {{\n\
         \x20   access_log off;\n\
         {temps}\
         \x20   server {{\n\
         \x20       listen {port};\n\
         \x20       root {p}/www;\n\
         \x20   }}\n\
         }}\n"
    )
}

/// Starts nginx on `host` listening on `port`, its files under
/// `dir/nginx-<role>`, and waits until it listens.
pub fn start_nginx(host: &Host, port: u16, dir: &Path, build: &str) -> Result<Proc> {
    let prefix = dir.join(format!("nginx-{}", host.role()));
    std::fs::create_dir_all(prefix.join("www"))?;
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let body: Vec<u8> = (0..FILE_LEN).map(|i| b"0123456789"[i % 10]).collect();
    std::fs::write(prefix.join("www").join(FILE.trim_start_matches('/')), body)?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&prefix, port, build))?;
    let (p, c, e) = (
        prefix.to_string_lossy().into_owned(),
        conf.to_string_lossy().into_owned(),
        prefix.join("error.log").to_string_lossy().into_owned(),
    );
    let proc = host.spawn_logged(
        &["nginx", "-p", &p, "-c", &c, "-e", &e],
        Some(&prefix.join("stdout.log")),
    )?;
    wait_listening(host, port).with_context(|| {
        let log = std::fs::read_to_string(&e).unwrap_or_default();
        format!("nginx on {} did not start:\n{log}", host.role())
    })?;
    Ok(proc)
}

/// Starts `testsrv` as a UDP responder on each of `addrs` in `host`.
///
/// A DR real server needs a socket bound to the VIP itself: a reply from a
/// wildcard-bound UDP socket takes the source address of the route back
/// (the server's own), which the client's connected socket does not accept.
pub fn start_udp_responder(host: &Host, addrs: &[SocketAddrV4], dir: &Path) -> Result<Proc> {
    let bin = workspace_bin("testsrv")?.to_string_lossy().into_owned();
    let mut argv = vec![bin, "--name".to_owned(), host.role().to_owned()];
    for a in addrs {
        argv.push("--udp".to_owned());
        argv.push(a.to_string());
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    host.spawn_logged(&argv, Some(&dir.join(format!("udp-{}.log", host.role()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_sets_every_temp_path_of_a_full_build_under_the_prefix() {
        let c = nginx_conf(Path::new("/t/x"), 8080, "nginx version: nginx/1.22.1\n");
        for d in [
            "client_body_temp_path /t/x/tmp/client_body;",
            "proxy_temp_path /t/x/tmp/proxy;",
            "uwsgi_temp_path /t/x/tmp/uwsgi;",
            "pid /t/x/nginx.pid;",
            "listen 8080;",
            "access_log off;",
            "worker_processes 1;",
        ] {
            assert!(c.contains(d), "missing {d} in\n{c}");
        }
    }

    #[test]
    fn conf_leaves_out_temp_paths_of_modules_built_without() {
        let c = nginx_conf(
            Path::new("/t"),
            80,
            "configure arguments: --without-http_uwsgi_module",
        );
        assert!(!c.contains("uwsgi_temp_path"));
        assert!(c.contains("scgi_temp_path"));
    }
}
