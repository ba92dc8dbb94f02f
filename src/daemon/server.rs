//! The control server: accepts `rdbadm` connections on `<run-dir>/rdbd.sock` and
//! executes their commands one at a time.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Mutex};

use crate::control::{self, Command, Request, Response, MAX_LINE_BYTES, PROTOCOL_VERSION};
use crate::daemon::access;
use crate::daemon::resource::Resource;
use crate::daemon::DaemonOptions;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Run dir or socket set-up failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another daemon owns the run dir.
    #[error("another rdbd is running for run dir {0}")]
    AlreadyRunning(PathBuf),
}

struct Daemon {
    opts: DaemonOptions,
    /// Who besides root may change states (see [`access`]).
    control_group: Option<access::ControlGroup>,
    /// Control connections open from users other than root.
    unprivileged_conns: std::sync::atomic::AtomicUsize,
    resources: Mutex<BTreeMap<String, Resource>>,
    stop: watch::Sender<bool>,
}

/// Runs the daemon until the last resource is down or a `Shutdown` command.
pub async fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    let run_dir = opts.run_dir.clone();
    let io = |what, path: &PathBuf| {
        let path = path.clone();
        move |source| DaemonError::Io { what, path, source }
    };
    std::fs::create_dir_all(&run_dir).map_err(io("cannot create run dir", &run_dir))?;
    let lock_path = run_dir.join("rdbd.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("cannot open lock file", &lock_path))?;
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the fd is owned by `lock`, which lives until the end of `run`.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(DaemonError::AlreadyRunning(run_dir));
        }
    }
    let sock_path = control::socket_path(&run_dir);
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).map_err(io("cannot bind", &sock_path))?;
    // Anyone may connect and read the status; state changes are checked per
    // connection (SO_PEERCRED, see `access`).
    let control_group = match access::configured_group(&opts.config_path) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("{e}: only root may change states");
            None
        }
    };
    if let Some(g) = &control_group {
        std::os::unix::fs::chown(&sock_path, Some(0), Some(g.gid))
            .map_err(io("cannot chown", &sock_path))?;
    }
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o666))
        .map_err(io("cannot chmod", &sock_path))?;
    let pid_path = run_dir.join("rdbd.pid");
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .map_err(io("cannot write", &pid_path))?;
    tracing::info!(node = %opts.node, run_dir = %run_dir.display(), "rdbd started");

    let (stop, mut stopped) = watch::channel(false);
    let daemon = Arc::new(Daemon {
        opts,
        control_group,
        unprivileged_conns: std::sync::atomic::AtomicUsize::new(0),
        resources: Mutex::new(BTreeMap::new()),
        stop,
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("cannot install SIGTERM handler", &run_dir))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let d = daemon.clone();
                    tokio::spawn(async move { d.serve_connection(stream).await });
                }
                Err(e) => tracing::warn!("control accept failed: {e}"),
            },
            _ = stopped.changed() => break,
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: taking every resource down");
                break;
            }
        }
    }
    daemon.down_all().await;
    let _ = std::fs::remove_file(&sock_path);
    let _ = std::fs::remove_file(&pid_path);
    tracing::info!("rdbd stopped");
    drop(lock);
    Ok(())
}

impl Daemon {
    async fn serve_connection(self: Arc<Self>, stream: UnixStream) {
        let peer = stream.peer_cred().ok().map(|c| access::Peer {
            uid: c.uid(),
            gid: c.gid(),
        });
        let (read, mut write) = stream.into_split();
        let _slot = match self.unprivileged_slot(peer) {
            Ok(slot) => slot,
            Err(()) => {
                let r = Response::error(format!(
                    "too many control connections from users other than root (at most {})",
                    access::MAX_UNPRIVILEGED_CONNECTIONS
                ));
                if let Ok(mut out) = serde_json::to_vec(&r) {
                    out.push(b'\n');
                    let _ = write.write_all(&out).await;
                }
                return;
            }
        };
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut reader)
                .take(MAX_LINE_BYTES as u64)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("control read failed: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            let too_long = n >= MAX_LINE_BYTES && !line.ends_with(b"\n");
            let response = match serde_json::from_slice::<Request>(&line) {
                _ if too_long => Response::error(format!(
                    "bad control request: line longer than {MAX_LINE_BYTES} bytes"
                )),
                Ok(req)
                    if req.v == PROTOCOL_VERSION
                        && !req.command.is_read_only()
                        && !access::may_change(peer, self.control_group.as_ref()) =>
                {
                    tracing::warn!(
                        ?peer,
                        command = req.command.name(),
                        "control: permission denied"
                    );
                    Response::error(access::refusal(
                        req.command.name(),
                        peer,
                        self.control_group.as_ref(),
                    ))
                }
                Ok(req) if req.v == PROTOCOL_VERSION => self.execute(req.command).await,
                Ok(req) => Response::error(format!(
                    "control protocol version {} not supported (rdbd speaks {PROTOCOL_VERSION})",
                    req.v
                )),
                Err(e) => Response::error(format!("bad control request: {e}")),
            };
            let mut out = match serde_json::to_vec(&response) {
                Ok(v) => v,
                Err(e) => {
                    format!("{{\"ok\":false,\"message\":\"encoding failed: {e}\"}}").into_bytes()
                }
            };
            out.push(b'\n');
            if write.write_all(&out).await.is_err() || too_long {
                // An over-long line: the rest of it is not read as further requests.
                return;
            }
        }
    }

    /// Counts a connection from a user other than root; `Err` when the limit is
    /// reached. The guard gives the slot back when dropped.
    fn unprivileged_slot(&self, peer: Option<access::Peer>) -> Result<Option<SlotGuard<'_>>, ()> {
        use std::sync::atomic::Ordering;
        if peer.is_some_and(|p| p.uid == 0) {
            return Ok(None);
        }
        let before = self.unprivileged_conns.fetch_add(1, Ordering::SeqCst);
        let guard = SlotGuard(&self.unprivileged_conns);
        if before >= access::MAX_UNPRIVILEGED_CONNECTIONS {
            return Err(());
        }
        Ok(Some(guard))
    }

    async fn execute(&self, command: Command) -> Response {
        let mut resources = self.resources.lock().await;
        let kind = match &command {
            Command::Up { .. } => "up",
            Command::Down { .. } => "down",
            _ => "other",
        };
        let response = match command {
            Command::Ping => Response::ok("pong"),
            Command::Status { resource } => {
                let mut r = Response::ok("");
                for (name, res) in resources.iter() {
                    if resource.as_deref().is_none_or(|want| want == name) {
                        r.resources.push(res.status());
                    }
                }
                r
            }
            Command::Up { resource } => match resources.entry(resource.clone()) {
                std::collections::btree_map::Entry::Occupied(_) => {
                    Response::ok(format!("{resource}: already up"))
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    match Resource::up(&self.opts, &resource).await {
                        Ok((res, warnings)) => {
                            let mut r = Response::ok(format!("{resource}: up"));
                            r.warnings = warnings;
                            r.resources.push(res.status());
                            slot.insert(res);
                            r
                        }
                        Err(e) => Response::error(format!("{resource}: {e}")),
                    }
                }
            },
            Command::Down { resource } => match resources.remove(&resource) {
                None => Response::ok(format!("{resource}: not up")),
                Some(mut res) => match res.down().await {
                    Ok(()) => Response::ok(format!("{resource}: down")),
                    Err(e) => {
                        let r = Response::error(format!("{resource}: {e}"));
                        resources.insert(resource, res);
                        r
                    }
                },
            },
            Command::Primary { resource, force } => match resources.get_mut(&resource) {
                None => not_up(&resource),
                Some(res) => match res.primary(force).await {
                    Ok(warnings) => {
                        let mut r = Response::ok(format!("{resource}: Primary"));
                        r.warnings = warnings;
                        r.resources.push(res.status());
                        r
                    }
                    Err(e) => Response::error(format!("{resource}: {e}")),
                },
            },
            Command::Secondary { resource } => match resources.get_mut(&resource) {
                None => not_up(&resource),
                Some(res) => match res.secondary().await {
                    Ok(()) => {
                        let mut r = Response::ok(format!("{resource}: Secondary"));
                        r.resources.push(res.status());
                        r
                    }
                    Err(e) => Response::error(format!("{resource}: {e}")),
                },
            },
            Command::Connect {
                resource,
                discard_my_data,
            } => match resources.get_mut(&resource) {
                None => not_up(&resource),
                Some(res) => match res.connect(discard_my_data).await {
                    Ok(()) => Response::ok(format!("{resource}: connecting")),
                    Err(e) => Response::error(format!("{resource}: {e}")),
                },
            },
            Command::Disconnect { resource } => match resources.get_mut(&resource) {
                None => not_up(&resource),
                Some(res) => match res.disconnect().await {
                    Ok(()) => Response::ok(format!("{resource}: StandAlone")),
                    Err(e) => Response::error(format!("{resource}: {e}")),
                },
            },
            Command::Admin { resource, action } => match resources.get_mut(&resource) {
                None => not_up(&resource),
                Some(res) => match res.admin(action).await {
                    Ok(msg) => Response::ok(format!("{resource}: {msg}")),
                    Err(e) => Response::error(format!("{resource}: {e}")),
                },
            },
            Command::Shutdown => {
                let _ = self.stop.send(true);
                Response::ok("rdbd shutting down")
            }
        };
        if resources.is_empty() && matches!(kind, "down" | "up") {
            // Nothing left to serve after `down` of the last resource (or a failed
            // first `up`): the daemon goes away; the next `up` starts it again.
            let _ = self.stop.send(true);
        }
        response
    }

    async fn down_all(&self) {
        let mut resources = self.resources.lock().await;
        for (name, mut res) in std::mem::take(&mut *resources) {
            if let Err(e) = res.down_forced().await {
                tracing::error!(resource = %name, "down at exit: {e}");
            }
        }
    }
}

/// Gives an unprivileged connection slot back.
struct SlotGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn not_up(resource: &str) -> Response {
    Response::error(format!(
        "{resource}: resource is not up (rdbadm up {resource})"
    ))
}
