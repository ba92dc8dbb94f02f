//! Replication transport: one authenticated TCP connection between two nodes.
//!
//! This module owns connection establishment ([`connect`]: accept + dial, handshake,
//! authentication), the framed link (a writer task batching frames into vectored
//! writes, a reader task handing out frames with zero-copy `Bytes` payloads), keepalive
//! and dead-peer detection, and the connection status shown to users ([`PeerStatus`]).
//! It does not interpret frames beyond `Hello`/`Auth*`/`Ping`/`PingAck`/`Disconnect`:
//! the replication engine does. Frame layouts live in [`rdb_protocol::repl`] and
//! `docs/protocol.md`.
//!
//! Who dials: the node whose name sorts lower dials, the other only accepts, so two
//! nodes started at once always end up with exactly one connection without a round
//! trip to agree (an accepted connection from the higher-named node is refused).
//!
//! Liveness: when nothing was *sent* for `ping_int_ms` the writer sends a `Ping` (the
//! peer's transport answers `PingAck`), so each side hears from the other at least
//! every `ping_int_ms`, even while the other's reader waits for its consumer. The
//! connection is declared lost when no frame at all arrived for
//! `max(ping_int_ms + ping_timeout_ms, timeout_ms)` (not counting time our reader
//! spends waiting for our consumer), or when one write makes no progress for
//! `max(that, timeout_ms * ko_count)`. While [`PeerConnection::receiver`] is full the
//! reader stops reading (TCP back-pressure on the peer's writer).

mod auth;
pub mod compat;
mod handshake;
mod link;
pub mod park_poll;
mod sock;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdb_protocol::repl::{EncodeError, Frame, FrameError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use auth::HmacAlg;

/// A frame as the transport sends and delivers it (payloads are `Bytes`).
pub type PeerFrame = Frame<Bytes>;

/// How a refusal for incompatible net settings starts (DRBD's text).
const INCOMPATIBLE_PREFIX: &str = "incompatible ";

/// Quick retries during the first seconds of [`connect`], whatever `connect_int_ms` is.
const FAST_RETRY_MS: u64 = 250;
/// How long [`connect`] uses [`FAST_RETRY_MS`] before falling back to `connect_int_ms`.
const FAST_RETRY_WINDOW_MS: u64 = 5000;
/// Lower bound of the handshake timeout.
const MIN_HANDSHAKE_TIMEOUT_MS: u64 = 500;

/// Shared-secret authentication settings (DRBD `cram-hmac-alg` + `shared-secret`).
#[derive(Clone)]
pub struct PeerAuth {
    /// Algorithm name: `sha256`, `sha1`, `sha512`, `md5`, optionally as `hmac(...)`.
    pub alg: String,
    /// The shared secret (never sent, never logged).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAuth")
            .field("alg", &self.alg)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Everything the transport needs to reach one peer for one resource.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// Resource name; must match the peer's.
    pub resource: String,
    /// This node's name (as in `on NAME { }`).
    pub node_name: String,
    /// The peer's node name; an accepted connection must announce exactly this name.
    pub peer_name: String,
    /// Address this node listens on (the caller binds the listener).
    pub listen_addr: SocketAddr,
    /// Address of the peer's listener.
    pub peer_addr: SocketAddr,
    /// Shared-secret authentication; both sides must agree on having one.
    pub auth: Option<PeerAuth>,
    /// Idle time (nothing sent) before a Ping is sent.
    pub ping_int_ms: u64,
    /// Time a Ping may stay unanswered (part of the dead-peer timeout).
    pub ping_timeout_ms: u64,
    /// DRBD `timeout`: lower bound of the dead-peer timeout, and of the handshake.
    pub timeout_ms: u64,
    /// Dial retry interval (after the first seconds of quick retries).
    pub connect_int_ms: u64,
    /// A write making no progress for `timeout_ms * ko_count` kills the connection.
    pub ko_count: u32,
    /// SO_SNDBUF when > 0.
    pub sndbuf_size_bytes: u64,
    /// SO_RCVBUF when > 0.
    pub rcvbuf_size_bytes: u64,
    /// Bound of the send queue and of the receive queue, in frames.
    pub max_buffers: u32,
    /// Number of volumes of the resource on this node (announced in Hello).
    pub volumes: u32,
    /// Net settings the peer must agree on (`NetSettings` at the end of the handshake).
    pub compat: compat::NetCompat,
    /// Busy-poll budget of the established connection's socket before a runtime
    /// worker sleeps, in µs (0: none); see [`park_poll`].
    pub busy_poll_us: u32,
}

impl PeerSettings {
    /// No frame received for this long => the connection is lost.
    pub fn dead_after_ms(&self) -> u64 {
        (self.ping_int_ms.saturating_add(self.ping_timeout_ms)).max(self.timeout_ms)
    }

    /// A single write that makes no progress for this long => the connection is lost.
    pub fn write_stall_ms(&self) -> u64 {
        self.dead_after_ms()
            .max(self.timeout_ms.saturating_mul(u64::from(self.ko_count)))
    }

    /// Bound of one connection attempt (dial + handshake).
    pub fn handshake_timeout_ms(&self) -> u64 {
        self.timeout_ms
            .max(self.ping_timeout_ms)
            .max(MIN_HANDSHAKE_TIMEOUT_MS)
    }

    fn check(&self) -> Result<Option<auth::Authenticator>, PeerError> {
        let bad = |what: &str| Err(PeerError::Config(what.to_owned()));
        for (what, s) in [
            ("resource", &self.resource),
            ("node_name", &self.node_name),
            ("peer_name", &self.peer_name),
        ] {
            if s.is_empty() || s.len() > rdb_protocol::repl::MAX_STRING_BYTES {
                return Err(PeerError::Config(format!(
                    "{what} must be 1..={} bytes",
                    rdb_protocol::repl::MAX_STRING_BYTES
                )));
            }
        }
        if self.node_name == self.peer_name {
            return bad("node_name and peer_name must differ");
        }
        if self.ping_int_ms == 0 || self.timeout_ms == 0 {
            return bad("ping_int_ms and timeout_ms must be > 0");
        }
        if self.max_buffers == 0 {
            return bad("max_buffers must be > 0");
        }
        match &self.auth {
            None => Ok(None),
            Some(a) => {
                let alg = HmacAlg::parse(&a.alg).ok_or_else(|| {
                    PeerError::Config(format!("unsupported cram-hmac-alg {:?}", a.alg))
                })?;
                if a.secret.is_empty() {
                    return bad("shared secret is empty");
                }
                Ok(Some(auth::Authenticator::new(alg, a.secret.clone())))
            }
        }
    }

    /// True when this node dials (its name sorts lower than the peer's).
    pub fn is_dialer(&self) -> bool {
        self.node_name < self.peer_name
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The settings cannot work (returned at once by [`connect`], never retried).
    #[error("invalid peer settings: {0}")]
    Config(String),
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A step took too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The caller tried to send a frame that cannot be encoded.
    #[error("frame cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
    /// The peer sent a valid frame at the wrong time.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No protocol version in common.
    #[error(
        "no common protocol version: ours {ours_min}..={ours_max}, peer {peer_min}..={peer_max}"
    )]
    Version {
        /// Our oldest version.
        ours_min: u32,
        /// Our newest version.
        ours_max: u32,
        /// Peer's oldest version.
        peer_min: u32,
        /// Peer's newest version.
        peer_max: u32,
    },
    /// The peer serves another resource.
    #[error("resource mismatch: ours {ours:?}, peer {peer:?}")]
    ResourceMismatch {
        /// Our resource name.
        ours: String,
        /// The peer's resource name.
        peer: String,
    },
    /// The peer announced another node name than configured.
    #[error("unexpected peer name {got:?} (expected {expected:?})")]
    PeerNameMismatch {
        /// Configured peer name.
        expected: String,
        /// Announced name.
        got: String,
    },
    /// Only one side has a shared secret configured.
    #[error("shared secret configured on {configured_on} only")]
    AuthMismatch {
        /// "this node" or "the peer".
        configured_on: &'static str,
    },
    /// The challenge-response failed (wrong shared secret or algorithm).
    #[error("peer authentication failed: {0}")]
    AuthFailed(&'static str),
    /// The peer refused the connection with a Disconnect frame.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// A net setting differs from the peer's (DRBD's text first).
    #[error("incompatible {setting} settings ({detail})")]
    Incompatible {
        /// The setting, as in the configuration file.
        setting: &'static str,
        /// Both values.
        detail: String,
    },
    /// The peer refused the connection because our net settings differ from its
    /// own (its Disconnect reason, DRBD's text: `incompatible ... settings (ours X,
    /// peer Y)` as the peer sees it).
    #[error("peer refused the connection: {0}")]
    IncompatiblePeer(String),
    /// The connection is closed or lost.
    #[error("connection closed")]
    Closed,
    /// Shutdown was requested.
    #[error("shut down")]
    Shutdown,
}

/// A copyable summary of a [`PeerError`], for status displays and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerErrorKind {
    /// [`PeerError::Config`].
    Config,
    /// [`PeerError::Io`].
    Io,
    /// [`PeerError::Timeout`].
    Timeout,
    /// [`PeerError::Frame`].
    Frame,
    /// [`PeerError::Encode`].
    Encode,
    /// [`PeerError::Protocol`].
    Protocol,
    /// [`PeerError::Version`].
    Version,
    /// [`PeerError::ResourceMismatch`].
    ResourceMismatch,
    /// [`PeerError::PeerNameMismatch`].
    PeerNameMismatch,
    /// [`PeerError::AuthMismatch`].
    AuthMismatch,
    /// [`PeerError::AuthFailed`].
    AuthFailed,
    /// [`PeerError::Refused`].
    Refused,
    /// [`PeerError::Incompatible`] or [`PeerError::IncompatiblePeer`].
    Incompatible,
    /// [`PeerError::Closed`].
    Closed,
    /// [`PeerError::Shutdown`].
    Shutdown,
    /// An established connection was lost (see [`PeerEvent::Lost`]).
    Lost,
}

impl PeerError {
    /// The kind of this error.
    pub fn kind(&self) -> PeerErrorKind {
        match self {
            PeerError::Config(_) => PeerErrorKind::Config,
            PeerError::Io(_) => PeerErrorKind::Io,
            PeerError::Timeout(_) => PeerErrorKind::Timeout,
            PeerError::Frame(_) => PeerErrorKind::Frame,
            PeerError::Encode(_) => PeerErrorKind::Encode,
            PeerError::Protocol(_) => PeerErrorKind::Protocol,
            PeerError::Version { .. } => PeerErrorKind::Version,
            PeerError::ResourceMismatch { .. } => PeerErrorKind::ResourceMismatch,
            PeerError::PeerNameMismatch { .. } => PeerErrorKind::PeerNameMismatch,
            PeerError::AuthMismatch { .. } => PeerErrorKind::AuthMismatch,
            PeerError::AuthFailed(_) => PeerErrorKind::AuthFailed,
            PeerError::Refused(_) => PeerErrorKind::Refused,
            PeerError::Incompatible { .. } | PeerError::IncompatiblePeer(_) => {
                PeerErrorKind::Incompatible
            }
            PeerError::Closed => PeerErrorKind::Closed,
            PeerError::Shutdown => PeerErrorKind::Shutdown,
        }
    }
}

/// Connection phase shown in status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPhase {
    /// Not trying to connect (before [`connect`], after a loss or close).
    StandAlone,
    /// [`connect`] is running (DRBD's `Connecting` / `WFConnection`).
    Connecting,
    /// A connection is established.
    Connected,
}

/// Snapshot of the transport state for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// Current phase.
    pub phase: PeerPhase,
    /// Kind of the last error (connection attempt failure or loss), kept until replaced.
    pub last_error_kind: Option<PeerErrorKind>,
    /// Text of the last error.
    pub last_error: Option<String>,
    /// Remote address of the current (or last) connection.
    pub remote_addr: Option<SocketAddr>,
    /// Negotiated protocol version of the current (or last) connection.
    pub proto_version: Option<u32>,
    /// Number of connections established so far.
    pub connections: u64,
    /// Number of failed authentications so far.
    pub auth_failures: u64,
}

/// Shared, observable transport status (a `watch` channel).
#[derive(Debug, Clone)]
pub struct PeerStatus {
    tx: watch::Sender<PeerState>,
}

impl Default for PeerStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerStatus {
    /// A status in phase StandAlone with no error.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(PeerState {
            phase: PeerPhase::StandAlone,
            last_error_kind: None,
            last_error: None,
            remote_addr: None,
            proto_version: None,
            connections: 0,
            auth_failures: 0,
        });
        PeerStatus { tx }
    }

    /// The current state.
    pub fn get(&self) -> PeerState {
        self.tx.borrow().clone()
    }

    /// A receiver notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<PeerState> {
        self.tx.subscribe()
    }

    fn set_phase(&self, phase: PeerPhase) {
        self.tx.send_modify(|s| s.phase = phase);
    }

    fn record_error(&self, e: &PeerError) {
        self.tx.send_modify(|s| {
            s.last_error_kind = Some(e.kind());
            s.last_error = Some(e.to_string());
            if e.kind() == PeerErrorKind::AuthFailed {
                s.auth_failures += 1;
            }
        });
    }

    fn record_lost(&self, reason: &str) {
        self.tx.send_modify(|s| {
            s.phase = PeerPhase::StandAlone;
            s.last_error_kind = Some(PeerErrorKind::Lost);
            s.last_error = Some(reason.to_owned());
        });
    }

    fn record_connected(&self, info: &PeerInfo) {
        self.tx.send_modify(|s| {
            s.phase = PeerPhase::Connected;
            s.remote_addr = Some(info.remote_addr);
            s.proto_version = Some(info.proto_version);
            s.connections += 1;
        });
    }
}

/// Facts about an established connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Negotiated protocol version.
    pub proto_version: u32,
    /// Feature bits the peer announced.
    pub peer_features: u64,
    /// Optional frames this connection may use: the feature bits both sides
    /// announced ([`rdb_protocol::repl::negotiate_features`]).
    pub features: u64,
    /// Number of volumes the peer announced.
    pub peer_volumes: u32,
    /// Our end of the TCP connection.
    pub local_addr: SocketAddr,
    /// The peer's end of the TCP connection.
    pub remote_addr: SocketAddr,
    /// True when this node dialled the connection.
    pub dialled: bool,
    /// True when the shared-secret challenge-response was done.
    pub authenticated: bool,
}

/// What the receiver yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A frame from the peer (never Ping/PingAck/Disconnect, handled inside).
    Frame {
        /// Volume number from the frame header.
        volume: u32,
        /// The frame; `Data`/`ResyncData` payloads are slices of the read buffer.
        frame: PeerFrame,
    },
    /// The connection is gone (last event; the channel closes after it).
    Lost {
        /// Why (peer disconnect reason, timeout, I/O or framing error).
        reason: String,
    },
}

/// Sending half of a connection. Cheap to clone; all clones feed one writer task
/// through a queue bounded by `max_buffers` frames.
#[derive(Debug, Clone)]
pub struct PeerSender {
    tx: mpsc::Sender<link::Outgoing>,
    shared: Arc<link::Shared>,
}

impl PeerSender {
    /// Queue `frame` for volume 0. Waits while the queue is full.
    pub async fn send(&self, frame: PeerFrame) -> Result<(), PeerError> {
        self.send_on(0, frame).await
    }

    /// Queue `frame` with `volume` in its header. Waits while the queue is full. The
    /// frame is validated here, so an unencodable frame never reaches the socket.
    pub async fn send_on(&self, volume: u32, frame: PeerFrame) -> Result<(), PeerError> {
        frame.encoded_len()?;
        if self.shared.is_dead() {
            return Err(PeerError::Closed);
        }
        self.tx
            .send(link::Outgoing {
                volume,
                frame,
                written: None,
            })
            .await
            .map_err(|_| PeerError::Closed)
    }

    /// Like [`PeerSender::send_on`], but returns only once the frame has been written
    /// into the local TCP send buffer (protocol A completion). Fails with
    /// [`PeerError::Closed`] if the connection dies first.
    pub async fn send_written(&self, volume: u32, frame: PeerFrame) -> Result<(), PeerError> {
        frame.encoded_len()?;
        if self.shared.is_dead() {
            return Err(PeerError::Closed);
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(link::Outgoing {
                volume,
                frame,
                written: Some(done_tx),
            })
            .await
            .map_err(|_| PeerError::Closed)?;
        done_rx.await.map_err(|_| PeerError::Closed)
    }

    /// Queue a `Data` frame whose payload is sent straight from `payload` (no copy).
    #[allow(clippy::too_many_arguments)]
    pub async fn send_data(
        &self,
        volume: u32,
        offset_bytes: u64,
        request_id: u64,
        seq: u64,
        flags: u32,
        digest: rdb_protocol::repl::Digest,
        payload: Bytes,
    ) -> Result<(), PeerError> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            PeerError::Encode(EncodeError::BadPayload {
                payload_bytes: payload.len(),
                len: u32::MAX,
                flags,
            })
        })?;
        let frame = Frame::Data {
            offset_bytes,
            len,
            request_id,
            seq,
            flags,
            digest,
            payload,
        };
        self.send_on(volume, frame).await
    }

    /// True once the connection is lost or closed (sends will fail).
    pub fn is_closed(&self) -> bool {
        self.shared.is_dead()
    }
}

/// An established, authenticated connection.
#[derive(Debug)]
pub struct PeerConnection {
    /// Send frames to the peer.
    pub sender: PeerSender,
    /// Frames from the peer, then one [`PeerEvent::Lost`], then `None`.
    pub receiver: mpsc::Receiver<PeerEvent>,
    /// Facts about the connection.
    pub info: PeerInfo,
    status: PeerStatus,
    writer: tokio::task::JoinHandle<()>,
}

impl PeerConnection {
    /// Next event from the peer (`None` after [`PeerEvent::Lost`]).
    pub async fn recv(&mut self) -> Option<PeerEvent> {
        self.receiver.recv().await
    }

    /// The status this connection updates.
    pub fn status(&self) -> &PeerStatus {
        &self.status
    }

    /// Send `Disconnect { reason }` after the frames already queued, then close. Waits
    /// at most the handshake timeout for the queue to drain.
    pub async fn close(self, reason: &str) {
        let reason = truncate_reason(reason);
        let limit = Duration::from_millis(self.sender.shared.close_wait_ms);
        let frame = Frame::Disconnect {
            reason: reason.clone(),
        };
        let mut writer = self.writer;
        let _ = tokio::time::timeout(limit, async {
            if self.sender.send(frame).await.is_ok() {
                let _ = (&mut writer).await;
            }
        })
        .await;
        writer.abort();
        self.sender.shared.fail(format!("closed locally: {reason}"));
    }
}

/// Cut a reason to the protocol's string limit on a char boundary.
fn truncate_reason(reason: &str) -> String {
    let max = rdb_protocol::repl::MAX_STRING_BYTES;
    if reason.len() <= max {
        return reason.to_owned();
    }
    let mut end = max;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// Establish a connection to the peer of `settings`; see [`connect_with_status`].
pub async fn connect(
    settings: &PeerSettings,
    listener: &TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<PeerConnection, PeerError> {
    connect_with_status(settings, listener, shutdown, &PeerStatus::new()).await
}

/// Keep trying until a connection is established and authenticated, or `shutdown`
/// becomes true (=> [`PeerError::Shutdown`]). Invalid settings return
/// [`PeerError::Config`] at once; net settings that differ from the peer's return
/// at once too (kind [`PeerErrorKind::Incompatible`], detected here or announced by
/// the peer): DRBD goes StandAlone then, retrying cannot help until the
/// administrator changes a configuration. Every other failure (refused dial, wrong secret,
/// resource mismatch, garbage from a stranger...) is logged, recorded in `status`
/// (`last_error`, `auth_failures`) and retried. The dialling side (lower name) dials at
/// once, every 250 ms for 5 s, then every `connect_int_ms`; both sides accept on
/// `listener` and refuse connections dialled by the higher-named node.
pub async fn connect_with_status(
    settings: &PeerSettings,
    listener: &TcpListener,
    mut shutdown: watch::Receiver<bool>,
    status: &PeerStatus,
) -> Result<PeerConnection, PeerError> {
    let auth = settings.check()?;
    status.set_phase(PeerPhase::Connecting);
    let dialer = settings.is_dialer();
    let started = Instant::now();
    let mut next_dial = started;
    let hs_timeout = Duration::from_millis(settings.handshake_timeout_ms());
    let result = loop {
        enum Attempt {
            Accepted(tokio::net::TcpStream, SocketAddr),
            Dial,
        }
        let attempt = tokio::select! {
            _ = wait_shutdown(&mut shutdown) => break Err(PeerError::Shutdown),
            r = listener.accept() => match r {
                Ok((stream, addr)) => Attempt::Accepted(stream, addr),
                Err(e) => {
                    tracing::warn!(resource = %settings.resource, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(FAST_RETRY_MS)).await;
                    continue;
                }
            },
            _ = tokio::time::sleep_until(next_dial), if dialer => Attempt::Dial,
        };
        let was_dial = matches!(attempt, Attempt::Dial);
        let work = async {
            match attempt {
                Attempt::Accepted(stream, addr) => {
                    if !settings.peer_addr.ip().is_unspecified()
                        && addr.ip() != settings.peer_addr.ip()
                    {
                        return Err(PeerError::Protocol(format!(
                            "connection from unexpected address {addr} (peer is {})",
                            settings.peer_addr
                        )));
                    }
                    sock::configure_accepted(
                        &stream,
                        settings.sndbuf_size_bytes,
                        settings.rcvbuf_size_bytes,
                    )?;
                    handshake::run(stream, settings, auth.as_ref(), false).await
                }
                Attempt::Dial => {
                    let stream = sock::dial(
                        settings.peer_addr,
                        settings.sndbuf_size_bytes,
                        settings.rcvbuf_size_bytes,
                    )
                    .await?;
                    handshake::run(stream, settings, auth.as_ref(), true).await
                }
            }
        };
        let outcome = tokio::select! {
            _ = wait_shutdown(&mut shutdown) => break Err(PeerError::Shutdown),
            r = tokio::time::timeout(hs_timeout, work) => match r {
                Ok(r) => r,
                Err(_) => Err(PeerError::Timeout("connection handshake")),
            },
        };
        if was_dial {
            let elapsed = started.elapsed();
            let interval_ms = if elapsed < Duration::from_millis(FAST_RETRY_WINDOW_MS) {
                settings.connect_int_ms.min(FAST_RETRY_MS)
            } else {
                settings.connect_int_ms
            };
            next_dial = Instant::now() + Duration::from_millis(interval_ms.max(1));
        }
        match outcome {
            Ok((stream, buf, info)) => {
                tracing::info!(
                    resource = %settings.resource,
                    peer = %settings.peer_name,
                    remote = %info.remote_addr,
                    proto = info.proto_version,
                    "peer connected"
                );
                status.record_connected(&info);
                let (sender, receiver, writer) = link::start(stream, buf, settings, status.clone());
                break Ok(PeerConnection {
                    sender,
                    receiver,
                    info,
                    status: status.clone(),
                    writer,
                });
            }
            Err(e) => {
                match &e {
                    PeerError::AuthFailed(_) => tracing::error!(
                        resource = %settings.resource,
                        peer = %settings.peer_name,
                        "peer authentication failed: {e}"
                    ),
                    PeerError::Io(_) if was_dial => tracing::debug!(
                        resource = %settings.resource,
                        "dial {} failed: {e}", settings.peer_addr
                    ),
                    _ => tracing::warn!(
                        resource = %settings.resource,
                        peer = %settings.peer_name,
                        "connection attempt failed: {e}"
                    ),
                }
                status.record_error(&e);
                if e.kind() == PeerErrorKind::Incompatible {
                    break Err(e);
                }
            }
        }
    };
    if result.is_err() {
        status.set_phase(PeerPhase::StandAlone);
    }
    result
}

/// Resolves when `shutdown` is (or becomes) true; never if its sender is gone.
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
