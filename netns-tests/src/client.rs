//! Real TCP/UDP clients for the tests, talking to `testsrv` (or any HTTP/1.1
//! server). Run them inside a namespace with [`crate::topo::Host::in_ns`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What a response told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// `X-Server`: which server answered.
    pub server: String,
    /// `X-Peer`: the client address as the server saw it.
    pub peer: String,
    pub body_len: usize,
    /// The body had the expected repeating pattern.
    pub body_ok: bool,
}

fn pattern(i: usize) -> u8 {
    b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36]
}

/// An HTTP/1.1 connection that can carry several requests (keep-alive).
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// A connection made elsewhere (for example bound to a chosen source
    /// address first).
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> Result<HttpConn> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    /// The local address of this connection (client ip:port).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Sends `GET /size/<size>` and reads the whole response.
    pub fn get(&mut self, size: usize, close: bool) -> Result<Reply> {
        let req = format!(
            "GET /size/{size} HTTP/1.1\r\nHost: vip\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        self.stream.write_all(req.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed before a response");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad status line")?;
        let (mut len, mut server, mut peer) = (0usize, String::new(), String::new());
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                bail!("connection closed in headers");
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim().to_string();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.parse().context("bad content-length")?,
                    "x-server" => server = v,
                    "x-peer" => peer = v,
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        let body_ok = body.iter().enumerate().all(|(i, b)| *b == pattern(i));
        Ok(Reply {
            status,
            server,
            peer,
            body_len: len,
            body_ok,
        })
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn http_get(addr: SocketAddr, size: usize, timeout: Duration) -> Result<Reply> {
    HttpConn::connect(addr, timeout)?.get(size, true)
}

/// One UDP request/response; returns the responder's name, the peer it saw,
/// and whether it echoed our payload.
pub fn udp_request(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(String, String, bool)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(addr)?;
    s.send(payload)?;
    let mut buf = vec![0u8; 65536];
    let n = s
        .recv(&mut buf)
        .with_context(|| format!("no UDP answer from {addr}"))?;
    let text = &buf[..n];
    let mut parts = text.splitn(3, |b| *b == b' ');
    let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let peer = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let echoed = parts.next() == Some(payload);
    Ok((name, peer, echoed))
}

/// A keep-alive connection and the server its first request reached.
pub type LongConn = (HttpConn, String);

/// A request on a long-lived connection that takes longer than this counts
/// as a broken connection (the drill's default deadline): a user's
/// application would have given up.
pub const LONG_DEADLINE: Duration = Duration::from_secs(2);

/// Opens `n` keep-alive connections to `addr` (call inside the client's
/// namespace), one request each, noting which server each reached.
pub fn open_long(addr: SocketAddr, n: usize, timeout: Duration) -> Result<Vec<LongConn>> {
    (0..n)
        .map(|_| {
            let mut h = HttpConn::connect(addr, timeout)?;
            let server = h.get(100, false)?.server;
            Ok((h, server))
        })
        .collect()
}

/// Exercises long-lived connections: a request of `size` bytes on each,
/// every `every`, for `length`. Returns the indices of those that broke,
/// were answered by another server or took longer than [`LONG_DEADLINE`]
/// to answer (each is tried no more after that).
pub fn exercise(
    conns: &mut [LongConn],
    length: Duration,
    every: Duration,
    size: usize,
) -> Vec<usize> {
    let mut broken = Vec::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < length {
        for (i, (h, server)) in conns.iter_mut().enumerate() {
            if broken.contains(&i) {
                continue;
            }
            let t = std::time::Instant::now();
            match h.get(size, false) {
                Ok(r) if r.server == *server && r.body_ok && t.elapsed() <= LONG_DEADLINE => {}
                other => {
                    eprintln!("connection {i} to {server}: {other:?}");
                    broken.push(i);
                }
            }
        }
        std::thread::sleep(every);
    }
    broken
}
