//! The control socket: a Unix stream socket speaking one JSON request line,
//! answered by one JSON response line.
//!
//! ```text
//! > {"cmd":"status"}
//! < {"node":"lb1","services":[...],"drops":[...],...}      (a StatusSnapshot)
//! > {"cmd":"bogus"}
//! < {"error":"unknown variant `bogus`, expected `status` at line 1 column 15"}
//! ```
//!
//! The server is a tokio task (control plane); the dataplane threads only
//! write the atomics in [`Stats`] that the server reads.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::error::{Error, Result};
use crate::stats::{Stats, StatusSnapshot};

/// Longest request line the server reads; longer ones are refused.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// How long the server waits for a client's request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request: `{"cmd":"status"}`. New commands are new variants (for
/// example `Reload`, or `Drain { service, backend }` as
/// `{"cmd":"drain","service":"web","backend":"rs1"}`); a server that does
/// not know a command answers with an error line, never by hanging up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Every counter: answered by a [`StatusSnapshot`].
    Status,
    /// Weight 0 for the backends named `backend` (of `service`, or of every
    /// service): no new flows, existing ones finish. Answered by
    /// [`Response::Changed`].
    Drain {
        backend: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    /// The configured weight again.
    Undrain {
        backend: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    /// The feedback master's agents, refusals and autoscale decisions:
    /// answered by [`Response::Feedback`].
    Feedback,
}

/// A response line: the command's payload, or `{"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Response {
    /// Listed first: an untagged enum takes the first variant that fits,
    /// and only an error line has the single `error` key.
    Error {
        error: String,
    },
    Status(Box<StatusSnapshot>),
    /// The `service/backend` names a drain or undrain changed.
    Changed {
        changed: Vec<String>,
    },
    Feedback(Box<crate::feedback::master::FeedbackSnapshot>),
}

/// What the server needs to answer requests.
fn handle(request: Request, stats: &Stats) -> Response {
    let (backend, service, drain) = match request {
        Request::Status => {
            let mut snapshot = stats.snapshot();
            snapshot.feedback = crate::feedback::master::snapshot();
            return Response::Status(Box::new(snapshot));
        }
        Request::Drain { backend, service } => (backend, service, true),
        Request::Undrain { backend, service } => (backend, service, false),
        Request::Feedback => {
            return match crate::feedback::master::snapshot() {
                Some(f) => Response::Feedback(Box::new(f)),
                None => Response::Error {
                    error: "no [feedback] in this node's config".into(),
                },
            };
        }
    };
    let changed = stats.drain(service.as_deref(), &backend, drain);
    if changed.is_empty() {
        return Response::Error {
            error: match service {
                Some(s) => format!("no backend `{backend}` in service `{s}`"),
                None => format!("no backend `{backend}` in any service"),
            },
        };
    }
    tracing::info!(?changed, drain, "weights changed over the control socket");
    Response::Changed { changed }
}

/// A bound control socket: bind first (so that `run` fails early on a busy
/// or forbidden path), serve later. Removes the socket file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Creates the parent directory (mode 0700) if missing, removes a
    /// stale socket (one nobody accepts on), refuses a live one or a
    /// non-socket file, binds, and sets the socket's mode to 0600.
    /// Must be called inside a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<ControlServer> {
        let path = path.as_ref().to_path_buf();
        let setup_err = |action: &'static str| {
            let path = path.clone();
            move |source| Error::ControlSocketSetup {
                path,
                action,
                source,
            }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(setup_err("create its directory"))?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(Error::ControlSocketSetup {
                        path,
                        action: "take it over",
                        source: std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "another process is serving it (is another `balancer run` using this config?)",
                        ),
                    });
                }
                tracing::info!(path = %path.display(), "removing stale control socket");
                std::fs::remove_file(&path).map_err(setup_err("remove the stale socket"))?;
            }
            Ok(_) => {
                return Err(Error::ControlSocketSetup {
                    path,
                    action: "use it",
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not a socket; refusing to delete it",
                    ),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(setup_err("inspect it")(e)),
        }
        let listener = UnixListener::bind(&path).map_err(setup_err("bind"))?;
        // The parent is 0700 when we created it, so the window between bind
        // and chmod is not reachable by others in that case.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(setup_err("set mode 0600"))?;
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(ControlServer { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers clients until `shutdown` completes, then removes the socket.
    /// Each client is served by its own task; a slow or broken client
    /// never blocks others.
    pub async fn serve(self, stats: Arc<Stats>, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let stats = Arc::clone(&stats);
                        tokio::spawn(async move {
                            if let Err(e) = serve_client(stream, &stats).await {
                                tracing::debug!(error = %e, "control client");
                            }
                        });
                    }
                    // Out of file descriptors and the like: keep serving,
                    // after a pause so as not to spin.
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove control socket");
        }
    }
}

/// Binds `path` and serves it until `shutdown` completes: the one-call form
/// of [`ControlServer::bind`] + [`ControlServer::serve`].
pub async fn serve(
    path: impl AsRef<Path>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    ControlServer::bind(path)?.serve(stats, shutdown).await
}

/// Answers request lines until the client closes, sends an oversized line
/// or stays silent for [`REQUEST_TIMEOUT`].
async fn serve_client(stream: UnixStream, stats: &Stats) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut read).take(MAX_REQUEST_LEN as u64 + 1);
        let limited = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(REQUEST_TIMEOUT, limited).await {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > MAX_REQUEST_LEN;
        let response = if too_long {
            Response::Error {
                error: format!("request longer than {MAX_REQUEST_LEN} bytes"),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handle(request, stats),
                Err(e) => Response::Error {
                    error: e.to_string(),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

/// Sends one request and reads one response line (blocking; for the CLI).
pub fn request(path: impl AsRef<Path>, request: &Request, timeout: Duration) -> Result<Response> {
    let path = path.as_ref();
    let io_err = |source| Error::ControlIo {
        path: path.to_path_buf(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| Error::ControlConnect {
            path: path.to_path_buf(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_vec(request).map_err(|e| Error::ControlProtocol {
        message: e.to_string(),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    if reply.is_empty() {
        return Err(Error::ControlProtocol {
            message: "the server closed the connection without answering".to_owned(),
        });
    }
    serde_json::from_str(&reply).map_err(|e| Error::ControlProtocol {
        message: e.to_string(),
    })
}

/// `{"cmd":"drain"}` or `{"cmd":"undrain"}`: the `service/backend` names
/// whose weight changed.
pub fn drain(
    path: impl AsRef<Path>,
    service: Option<&str>,
    backend: &str,
    drain: bool,
    timeout: Duration,
) -> Result<Vec<String>> {
    let (backend, service) = (backend.to_owned(), service.map(str::to_owned));
    let req = if drain {
        Request::Drain { backend, service }
    } else {
        Request::Undrain { backend, service }
    };
    match request(path, &req, timeout)? {
        Response::Changed { changed } => Ok(changed),
        Response::Error { error } => Err(Error::ControlRefused { message: error }),
        Response::Status(_) | Response::Feedback(_) => Err(Error::ControlProtocol {
            message: "not a drain answer".to_owned(),
        }),
    }
}

/// `{"cmd":"status"}`: the node's counters.
pub fn status(path: impl AsRef<Path>, timeout: Duration) -> Result<StatusSnapshot> {
    match request(path, &Request::Status, timeout)? {
        Response::Status(snapshot) => Ok(*snapshot),
        Response::Error { error } => Err(Error::ControlRefused { message: error }),
        Response::Changed { .. } => Err(Error::ControlProtocol {
            message: "a drain answer where a status was expected".to_owned(),
        }),
        Response::Feedback(_) => Err(Error::ControlProtocol {
            message: "a feedback answer where a status was expected".into(),
        }),
    }
}

/// `{"cmd":"feedback"}`: the feedback master's agents and decisions.
pub fn feedback(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<crate::feedback::master::FeedbackSnapshot> {
    match request(path, &Request::Feedback, timeout)? {
        Response::Feedback(f) => Ok(*f),
        Response::Error { error } => Err(Error::ControlRefused { message: error }),
        Response::Status(_) | Response::Changed { .. } => Err(Error::ControlProtocol {
            message: "not a feedback answer".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form_is_a_cmd_tag() {
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).expect("parses"),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"drain","backend":"rs2"}"#).expect("parses"),
            Request::Drain {
                backend: "rs2".into(),
                service: None
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Undrain {
                backend: "rs2".into(),
                service: Some("web".into())
            })
            .expect("json"),
            r#"{"cmd":"undrain","backend":"rs2","service":"web"}"#
        );
    }

    #[test]
    fn drain_sets_weight_zero_and_undrain_restores_the_configured_one() {
        let text = concat!(
            "[node]\nname = \"lb1\"\nfront = \"f\"\nback = \"b\"\nback_gateway = \"198.19.0.1/24\"\n",
            "[[service]]\nname = \"web\"\nvip = \"198.18.0.100\"\nport = 80\n",
            "[[service.backend]]\nname = \"rs1\"\naddress = \"198.19.0.21\"\nweight = 3\nforward = \"nat\"\n",
            "[[service]]\nname = \"dns\"\nvip = \"198.18.0.100\"\nport = 53\nprotocol = \"udp\"\n",
            "[[service.backend]]\nname = \"rs1\"\naddress = \"198.19.0.21\"\nforward = \"nat\"\n",
        );
        let stats = Stats::new(&crate::Config::parse(text, "t").expect("valid"));
        let weight = |s: usize| stats.snapshot().services[s].backends[0].weight;
        let drain = |backend: &str, service: Option<&str>, drain: bool| {
            handle(
                if drain {
                    Request::Drain {
                        backend: backend.into(),
                        service: service.map(Into::into),
                    }
                } else {
                    Request::Undrain {
                        backend: backend.into(),
                        service: service.map(Into::into),
                    }
                },
                &stats,
            )
        };
        assert_eq!(
            drain("rs1", Some("web"), true),
            Response::Changed {
                changed: vec!["web/rs1".into()]
            }
        );
        assert_eq!((weight(0), weight(1)), (0, 1));
        assert_eq!(
            drain("rs1", None, true),
            Response::Changed {
                changed: vec!["web/rs1".into(), "dns/rs1".into()]
            }
        );
        assert_eq!((weight(0), weight(1)), (0, 0));
        drain("rs1", None, false);
        assert_eq!((weight(0), weight(1)), (3, 1));
        assert!(matches!(drain("rs9", None, true), Response::Error { .. }));
        let line = serde_json::to_string(&drain("rs1", Some("dns"), true)).expect("json");
        let back: Response = serde_json::from_str(&line).expect("parses");
        assert!(matches!(back, Response::Changed { .. }), "{line}");
    }

    #[test]
    fn error_response_is_not_mistaken_for_a_snapshot() {
        let r: Response = serde_json::from_str(r#"{"error":"nope"}"#).expect("parses");
        assert_eq!(
            r,
            Response::Error {
                error: "nope".to_owned()
            }
        );
    }
}
