//! The `rdb-ha run` runtime: links, timers, resource and fence execution, health
//! checks, ping, the status file `<run-dir>/rdb-ha.json` and the control socket
//! `<run-dir>/rdb-ha.sock` (one JSON line request, one JSON line reply). Every decision
//! is the state machine's; this module only feeds it events and performs its actions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::agents::{self, AgentEnv};
use crate::auth::{self, Verifier};
use crate::config::{AutoFailback, Config};
use crate::machine::{Action, Event, Level, Machine, Params};
use crate::{checks, net};
use rdb_protocol::heartbeat::{NodeState, MAX_PACKET_BYTES};

/// Status file name in the run dir.
pub const STATUS_FILE: &str = "rdb-ha.json";
/// Control socket name in the run dir.
pub const SOCKET_FILE: &str = "rdb-ha.sock";
/// Bound of the event queue into the main loop.
pub const EVENT_QUEUE: usize = 1024;
/// Longest control request line.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Startup failed.
    #[error("{0}")]
    Setup(String),
    /// Network setup failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// I/O on the run dir or socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// Options of `rdb-ha run` beyond the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run dir (status file, control socket).
    pub run_dir: PathBuf,
    /// `rdbadm` binary for rdbdisk resources.
    pub rdbadm: PathBuf,
    /// sendmail-compatible command for MailTo.
    pub sendmail: Vec<String>,
    /// Bound on each resource operation.
    pub resource_timeout_ms: u64,
}

enum Input {
    Ev(Event),
    Datagram(usize, Vec<u8>),
    Control(String, oneshot::Sender<String>),
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Machine parameters from the configuration.
pub fn params(cfg: &Config, links: Vec<String>, generation: u64) -> Params {
    Params {
        node: cfg.node.clone(),
        nodes: cfg.hacf.nodes.clone(),
        preferred: cfg.resources.preferred.clone(),
        resources: cfg
            .resources
            .resources
            .iter()
            .map(|r| r.to_string())
            .collect(),
        links,
        keepalive_ms: cfg.hacf.keepalive_ms,
        deadtime_ms: cfg.hacf.deadtime_ms,
        warntime_ms: cfg.hacf.warntime_ms,
        initdead_ms: cfg.hacf.initdead_ms,
        auto_failback: cfg.hacf.auto_failback != AutoFailback::Off,
        fence: cfg.hacf.fence.is_some(),
        ping: !cfg.hacf.ping.is_empty(),
        checks: cfg
            .hacf
            .checks
            .iter()
            .map(|c| (c.name.clone(), c.fall, c.rise))
            .collect(),
        generation,
    }
}

/// Sends one request to a running daemon and returns its reply line.
pub async fn control(run_dir: &Path, cmd: &str) -> Result<serde_json::Value, DaemonError> {
    let path = run_dir.join(SOCKET_FILE);
    let io = |what: String| move |source| DaemonError::Io { what, source };
    let mut s = UnixStream::connect(&path).await.map_err(io(format!(
        "connect {} (is rdb-ha running?)",
        path.display()
    )))?;
    let req = serde_json::json!({ "cmd": cmd }).to_string() + "\n";
    s.write_all(req.as_bytes())
        .await
        .map_err(io("send".into()))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(io("receive".into()))?;
    serde_json::from_str(&line).map_err(|e| DaemonError::Setup(format!("bad reply: {e}")))
}

/// Runs the daemon until a clean shutdown (SIGTERM/SIGINT).
pub async fn run(cfg: Config, opts: Options) -> Result<(), DaemonError> {
    let io = |what: String| move |source| DaemonError::Io { what, source };
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(io(format!("create {}", opts.run_dir.display())))?;
    let links = net::open_links(&cfg.hacf.media, cfg.hacf.udpport)?;
    let link_names: Vec<String> = links.iter().map(|l| l.iface.clone()).collect();
    let generation = rand::random::<u64>() | 1;
    let mut machine =
        Machine::new(params(&cfg, link_names, generation)).map_err(DaemonError::Setup)?;
    let mut verifier = Verifier::new(cfg.authkeys.clone());
    let (tx, mut rx) = mpsc::channel::<Input>(EVENT_QUEUE);

    // Links: one receive task per socket; the main loop sends on the shared sockets.
    let mut senders = Vec::new();
    for (i, l) in links.into_iter().enumerate() {
        l.socket
            .set_nonblocking(true)
            .map_err(io("nonblocking".into()))?;
        let sock =
            Arc::new(tokio::net::UdpSocket::from_std(l.socket).map_err(io("udp socket".into()))?);
        senders.push((sock.clone(), l.targets));
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_PACKET_BYTES + 1];
            loop {
                match sock.recv_from(&mut buf).await {
                    Ok((n, _)) => {
                        // Drop when the queue is full: heartbeats are periodic.
                        let _ = tx.try_send(Input::Datagram(i, buf[..n].to_vec()));
                    }
                    Err(e) => {
                        tracing::warn!("receive on link {i}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }

    // Resource executor: one operation at a time, in the order the machine asks.
    let env = AgentEnv {
        config_dir: cfg.dir.clone(),
        rdbadm: opts.rdbadm.clone(),
        sendmail: opts.sendmail.clone(),
        node: cfg.node.clone(),
        timeout_ms: opts.resource_timeout_ms,
    };
    let (res_tx, mut res_rx) = mpsc::channel::<(usize, crate::machine::Op)>(16);
    {
        let tx = tx.clone();
        let resources = cfg.resources.resources.clone();
        let env = env.clone();
        tokio::spawn(async move {
            while let Some((index, op)) = res_rx.recv().await {
                let Some(r) = resources.get(index) else {
                    continue;
                };
                let verb = if op == crate::machine::Op::Start {
                    "start"
                } else {
                    "stop"
                };
                tracing::info!("Running {r} {verb}");
                let ok = match agents::run(&env, r, op).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!("{r} {verb}: {e}");
                        false
                    }
                };
                if tx
                    .send(Input::Ev(Event::ResourceDone { index, op, ok }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    // Resources already running at startup are reported (Heartbeat's rc.d/status).
    for r in &cfg.resources.resources {
        if let Ok(true) = agents::status(&env, r).await {
            tracing::warn!("resource {r} is running at startup");
        }
    }

    // Health checks run only while the group is active here.
    let (active_tx, active_rx) = watch::channel(false);
    for (index, c) in cfg.hacf.checks.iter().cloned().enumerate() {
        let tx = tx.clone();
        let mut active = active_rx.clone();
        tokio::spawn(async move {
            loop {
                if !*active.borrow_and_update() {
                    if active.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let ok = checks::probe(&c.kind, c.timeout_ms).await;
                if !ok {
                    tracing::warn!("health check {} failed", c.name);
                }
                if tx
                    .send(Input::Ev(Event::Check { index, ok }))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(c.interval_ms)).await;
            }
        });
    }
    if !cfg.hacf.ping.is_empty() {
        let hosts = cfg.hacf.ping.clone();
        let tx = tx.clone();
        let every_ms = cfg.hacf.keepalive_ms.max(1000);
        tokio::spawn(async move {
            loop {
                let hs = hosts.clone();
                let reachable = tokio::task::spawn_blocking(move || {
                    hs.iter().any(|h| checks::ping_once(*h, every_ms.min(1000)))
                })
                .await
                .unwrap_or(false);
                if tx.send(Input::Ev(Event::Ping { reachable })).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(every_ms)).await;
            }
        });
    }

    // Control socket.
    let sock_path = opts.run_dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&sock_path);
    let listener =
        UnixListener::bind(&sock_path).map_err(io(format!("bind {}", sock_path.display())))?;
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut line = String::new();
                    let mut r = BufReader::new(r.take(MAX_REQUEST_BYTES as u64));
                    if r.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let (otx, orx) = oneshot::channel();
                    if tx.send(Input::Control(line, otx)).await.is_err() {
                        return;
                    }
                    if let Ok(reply) = orx.await {
                        let _ = w.write_all((reply + "\n").as_bytes()).await;
                    }
                });
            }
        });
    }

    // Signals.
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = tx.send(Input::Ev(Event::Shutdown)).await;
        });
    }

    let fence_cmd = cfg.hacf.fence.clone();
    let fence_timeout_ms = cfg.hacf.fence_timeout_ms;
    let status_path = opts.run_dir.join(STATUS_FILE);
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let tick_ms = (cfg.hacf.keepalive_ms / 4).clamp(10, 100);
    let mut ticker = tokio::time::interval(Duration::from_millis(tick_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status_write = 0u64;
    let mut refusal_log = RefusalLog::default();
    tracing::info!(
        "rdb-ha starting on node {} (generation {generation:016x}), links: {}",
        cfg.node,
        senders
            .iter()
            .map(|(_, t)| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    loop {
        let input = tokio::select! {
            _ = ticker.tick() => Input::Ev(Event::Tick),
            i = rx.recv() => match i { Some(i) => i, None => break },
        };
        let now = now_ms();
        // A quiet input (a tick, a refused packet) changes nothing worth a status write.
        let mut quiet = false;
        let actions = match input {
            Input::Ev(ev) => {
                quiet = ev == Event::Tick;
                machine.handle(now, ev)
            }
            Input::Datagram(link, bytes) => match verifier.verify(link, &bytes) {
                Ok(packet) => machine.handle(now, Event::Packet { link, packet }),
                Err(e @ auth::AuthError::Stale { .. }) => {
                    tracing::debug!("link {link}: packet refused: {e}");
                    quiet = true; // nothing changed: no status write per refused packet
                    Vec::new()
                }
                Err(e) => {
                    // A flood of bad packets must not turn into a flood of status writes.
                    quiet = true;
                    if let Some(suppressed) = refusal_log.admit(now) {
                        if suppressed > 0 {
                            tracing::warn!(
                                "link {link}: packet refused: {e} ({suppressed} more refused in the last {} ms, not logged)",
                                RefusalLog::INTERVAL_MS
                            );
                        } else {
                            tracing::warn!("link {link}: packet refused: {e}");
                        }
                    }
                    Vec::new()
                }
            },
            Input::Control(line, reply) => {
                let cmd = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("cmd").and_then(|c| c.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                let (acts, msg) = match cmd.as_str() {
                    "status" => (Vec::new(), None),
                    "standby" => (
                        machine.handle(now, Event::AdminStandby),
                        Some("standby requested"),
                    ),
                    "takeover" => (
                        machine.handle(now, Event::AdminTakeover),
                        Some("takeover requested"),
                    ),
                    _ => {
                        let _ = reply.send(serde_json::json!({"ok": false, "error": format!("unknown command '{cmd}'")}).to_string());
                        continue;
                    }
                };
                let st = status_json(&machine, &verifier, now_ms());
                let mut v = serde_json::json!({"ok": true, "status": st});
                if let Some(m) = msg {
                    v["message"] = serde_json::Value::from(m);
                }
                let _ = reply.send(v.to_string());
                acts
            }
        };
        for a in actions {
            match a {
                Action::Send(mut p) => {
                    p.timestamp_ms = wall_ms();
                    match auth::sign(&cfg.authkeys, p) {
                        Ok(bytes) => {
                            for (sock, targets) in &senders {
                                for t in targets {
                                    if let Err(e) = sock.try_send_to(&bytes, (*t).into()) {
                                        tracing::debug!("send to {t}: {e}");
                                    }
                                }
                            }
                        }
                        Err(e) => tracing::error!("cannot sign heartbeat: {e}"),
                    }
                }
                Action::Resource { index, op } => {
                    if res_tx.send((index, op)).await.is_err() {
                        tracing::error!("resource executor gone");
                    }
                }
                Action::Fence(node) => {
                    let tx = tx.clone();
                    let argv = fence_cmd.clone().unwrap_or_default();
                    tokio::spawn(async move {
                        let ok = run_fence(&argv, &node, fence_timeout_ms).await;
                        let _ = tx.send(Input::Ev(Event::FenceDone { node, ok })).await;
                    });
                }
                Action::Log(level, msg) => match level {
                    Level::Info => tracing::info!("{msg}"),
                    Level::Warn => tracing::warn!("{msg}"),
                    Level::Error => tracing::error!("{msg}"),
                },
                Action::Exit => {}
            }
        }
        let _ = active_tx.send(machine.state() == NodeState::Active);
        if !quiet || now.saturating_sub(last_status_write) >= 500 || machine.exited() {
            last_status_write = now;
            write_status(&status_path, &status_json(&machine, &verifier, now));
        }
        if machine.exited() {
            break;
        }
    }
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

/// The machine's status plus the counters of refused packets (`refused_packets`).
fn status_json(m: &Machine, v: &Verifier, now: u64) -> serde_json::Value {
    let mut j = serde_json::to_value(m.status(now)).unwrap_or_default();
    if let Some(o) = j.as_object_mut() {
        o.insert(
            "refused_packets".into(),
            serde_json::to_value(v.refused()).unwrap_or_default(),
        );
    }
    j
}

fn write_status(path: &Path, status: &serde_json::Value) {
    let tmp = path.with_extension("json.tmp");
    let text = match serde_json::to_string_pretty(status) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("status: {e}");
            return;
        }
    };
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}

async fn run_fence(argv: &[String], node: &str, timeout_ms: u64) -> bool {
    let Some((prog, args)) = argv.split_first() else {
        return false;
    };
    let child = tokio::process::Command::new(prog)
        .args(args)
        .arg(node)
        .env("RDB_HA_PEER", node)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_millis(timeout_ms), child).await {
        Ok(Ok(s)) => s.success(),
        Ok(Err(e)) => {
            tracing::error!("fence {prog}: {e}");
            false
        }
        Err(_) => {
            tracing::error!("fence {prog} {node}: timed out");
            false
        }
    }
}

/// Rate limit for "packet refused" warnings: a flood of forged or replayed packets must not
/// drown the log (or the disk). At most [`RefusalLog::BURST`] warnings per interval; the
/// next one that is logged says how many were not. Every refusal is still counted in the
/// status file (`refused_packets`).
#[derive(Debug, Default)]
struct RefusalLog {
    window_start_ms: u64,
    logged_in_window: u32,
    suppressed: u64,
}

impl RefusalLog {
    const INTERVAL_MS: u64 = 1000;
    const BURST: u32 = 5;

    /// `Some(n)` when this refusal should be logged (`n` refusals were suppressed before
    /// it), `None` when it should not.
    fn admit(&mut self, now_ms: u64) -> Option<u64> {
        if now_ms.saturating_sub(self.window_start_ms) >= Self::INTERVAL_MS {
            self.window_start_ms = now_ms;
            self.logged_in_window = 0;
        }
        if self.logged_in_window >= Self::BURST {
            self.suppressed += 1;
            return None;
        }
        self.logged_in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod refusal_log_tests {
    use super::RefusalLog;

    #[test]
    fn floods_are_summarised() {
        let mut l = RefusalLog::default();
        let logged: Vec<_> = (0..100).filter_map(|_| l.admit(10)).collect();
        assert_eq!(logged, vec![0; RefusalLog::BURST as usize]);
        assert_eq!(l.admit(1500), Some(95));
        assert_eq!(l.admit(1501), Some(0));
    }
}
