//! A small real server for the namespace tests: HTTP/1.1 over TCP (with
//! keep-alive) and a UDP responder, each answer naming the server so a test
//! can tell which backend a flow reached.
//!
//! `testsrv --name rs1 --tcp 0.0.0.0:8080 --udp 0.0.0.0:8080`
//!
//! HTTP: `GET /size/N` answers N bytes of body (a repeating pattern, so
//! corruption is visible), with `X-Server: <name>` and `X-Peer: <client
//! ip:port as seen by the server>`. Any other path answers 13 bytes.
//! UDP: each datagram is answered with `<name> <peer> ` followed by the
//! datagram's own bytes.
//!
//! Capacity emulation (for `experiments`; off by default): `--delay-ms N`
//! holds every HTTP request N ms before it is answered (service time), and
//! `--workers N` lets at most N requests be in service at once; the others
//! wait their turn in arrival order (a queue, as in a server with N worker
//! threads). Such a server does at most `workers * 1000 / delay-ms`
//! requests per second, without burning CPU.
//!
//! Expensive responses (for the `feedback` experiment): `--burn-us N` makes
//! every HTTP request cost N µs of CPU time (the serving thread's own CPU
//! clock, spent in a busy loop) before it is answered, inside its worker
//! slot. With `--workers 1` the server thus uses at most one CPU and
//! serves at most 1e6 / N requests per second when it has that CPU to
//! itself; under CPU contention each request takes longer in wall time
//! but still costs the same N µs of CPU.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// Service time, CPU cost and worker limit of HTTP requests
/// (`--delay-ms`, `--burn-us`, `--workers`); the default does none.
#[derive(Default)]
struct Capacity {
    delay: Duration,
    /// CPU time each request burns.
    burn: Duration,
    /// 0 = unlimited.
    workers: usize,
    /// Requests in service and those waiting, in arrival order.
    queue: Mutex<Queue>,
}

/// A FIFO admission of `workers` requests at once. Each waiter sleeps on
/// its own [`Turn`], and a finishing request hands its slot straight to
/// the first waiter: one wake-up per request, however long the queue (a
/// shared condition variable woke every waiter on every completion, which
/// cost an overloaded server more CPU than its work).
#[derive(Default)]
struct Queue {
    busy: usize,
    waiting: VecDeque<Arc<Turn>>,
}

#[derive(Default)]
struct Turn {
    go: Mutex<bool>,
    cv: Condvar,
}

impl Capacity {
    /// One request's service: its CPU burn, then its delay.
    fn work(&self) {
        if !self.burn.is_zero() {
            burn_cpu(self.burn);
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }

    /// Holds the calling request for its service time, after waiting for a
    /// free worker.
    fn serve_one(&self) {
        if self.workers == 0 {
            self.work();
            return;
        }
        let turn = {
            let Ok(mut q) = self.queue.lock() else { return };
            if q.busy < self.workers && q.waiting.is_empty() {
                q.busy += 1;
                None
            } else {
                let t = Arc::new(Turn::default());
                q.waiting.push_back(t.clone());
                Some(t)
            }
        };
        if let Some(t) = turn {
            let Ok(mut go) = t.go.lock() else { return };
            while !*go {
                go = match t.cv.wait(go) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
        }
        self.work();
        let Ok(mut q) = self.queue.lock() else { return };
        match q.waiting.pop_front() {
            // The slot passes to the next in line; `busy` stays.
            Some(next) => {
                drop(q);
                if let Ok(mut go) = next.go.lock() {
                    *go = true;
                }
                next.cv.notify_one();
            }
            None => q.busy -= 1,
        }
    }
}

/// The calling thread's CPU time so far.
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Spins until this thread has used `cost` more CPU time: real work (a
/// hash chain the optimiser cannot drop), not a sleep, so it shows in the
/// server's CPU accounting and competes for the CPU like a CGI script.
fn burn_cpu(cost: Duration) {
    let end = thread_cpu() + cost;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
        if thread_cpu() >= end {
            return;
        }
    }
}

fn body_byte(i: usize) -> u8 {
    b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36]
}

fn serve(stream: TcpStream, name: &str, cap: &Capacity) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        cap.serve_one();
        let path = line.split_whitespace().nth(1).unwrap_or("/");
        let size = path
            .strip_prefix("/size/")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(13);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nX-Server: {name}\r\nX-Peer: {peer}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        out.write_all(head.as_bytes())?;
        let mut buf = [0u8; 16384];
        let mut sent = 0;
        while sent < size {
            let n = (size - sent).min(buf.len());
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = body_byte(sent + i);
            }
            out.write_all(&buf[..n])?;
            sent += n;
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn main() {
    let mut name = String::from("server");
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut cap = Capacity::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next().unwrap_or_default(),
            "--tcp" => tcp.extend(args.next()),
            "--udp" => udp.extend(args.next()),
            "--delay-ms" | "--workers" | "--burn-us" => {
                let Some(n) = args.next().and_then(|v| v.parse::<u64>().ok()) else {
                    eprintln!("testsrv: {a} needs a number");
                    std::process::exit(2);
                };
                if a == "--delay-ms" {
                    cap.delay = Duration::from_millis(n);
                } else if a == "--burn-us" {
                    cap.burn = Duration::from_micros(n);
                } else {
                    cap.workers = n as usize;
                }
            }
            other => {
                eprintln!("testsrv: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let cap = Arc::new(cap);
    let mut threads = Vec::new();
    for addr in tcp {
        let l = match TcpListener::bind(&addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("testsrv: bind tcp {addr}: {e}");
                std::process::exit(1);
            }
        };
        let name = name.clone();
        let cap = cap.clone();
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                let cap = cap.clone();
                std::thread::spawn(move || {
                    let _ = serve(s, &name, &cap);
                });
            }
        }));
    }
    for addr in udp {
        let s = match UdpSocket::bind(&addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("testsrv: bind udp {addr}: {e}");
                std::process::exit(1);
            }
        };
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut out = Vec::with_capacity(65600);
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                out.clear();
                out.extend_from_slice(format!("{name} {peer} ").as_bytes());
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, peer);
            }
        }));
    }
    println!("testsrv {name} ready");
    for t in threads {
        let _ = t.join();
    }
}
