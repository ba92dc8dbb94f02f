//! NBD server: exports `BlockIo` devices to NBD clients over unix and TCP sockets.
//!
//! This module owns the public API of the server ([`NbdServer`], [`ExportResolver`],
//! [`NbdLimits`]), the accept loops with their connection limit and shutdown, and the
//! per-connection driver. The handshake lives in `nbd/handshake.rs`, the transmission
//! phase (pipelined requests, replies written by the connection task) in `nbd/transmission.rs`; the wire
//! formats are `rdb_protocol::nbd`. See `docs/nbd.md` for what is implemented.
//!
//! Shutdown: when the watch channel given to `serve_*` becomes `true` (or its sender
//! is dropped), the server stops accepting, every connection stops reading new
//! requests, answers the ones in flight and closes; `serve_*` returns once every
//! connection has closed.

mod busy_poll;
mod handshake;
mod transmission;

pub use self::busy_poll::DEFAULT_BUSY_POLL_US;

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdb_protocol::nbd::{DecodeError, DEFAULT_MAX_OPTION_BYTES, DEFAULT_MAX_REQUEST_BYTES};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::storage::BlockIo;

/// One export as the resolver describes it.
#[derive(Clone)]
pub struct ExportInfo {
    /// Canonical export name (sent for `NBD_INFO_NAME`).
    pub name: String,
    /// Human-readable description (sent for `NBD_INFO_DESCRIPTION` and `OPT_LIST`).
    pub description: String,
    /// The device behind the export.
    pub device: Arc<dyn BlockIo>,
    /// Whether clients may only read (writes get `EPERM`).
    pub read_only: bool,
}

/// The answer of an [`ExportResolver`] to a name.
pub enum ExportLookup {
    /// The export exists and may be served.
    Found(ExportInfo),
    /// The export exists but may not be served now (`NBD_REP_ERR_POLICY`, with message).
    Refused {
        /// Shown to the client (e.g. "resource r0 is Secondary").
        message: String,
    },
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    Unknown,
}

/// Maps export names to devices. `""` (the default export) is passed as-is.
pub trait ExportResolver: Send + Sync + 'static {
    /// Names listed by `NBD_OPT_LIST`.
    fn list(&self) -> Vec<String>;
    /// Looks an export up by name.
    fn lookup(&self, name: &str) -> ExportLookup;
}

/// Bounds on what peers can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// Requests executing at once on one connection.
    pub max_inflight_per_conn: usize,
    /// Payload bytes (write data, read buffers) held at once by one connection.
    pub max_inflight_bytes_per_conn: u32,
    /// Largest READ/WRITE length; a larger WRITE closes the connection, a larger
    /// READ gets `EINVAL`. Also the advertised maximum block size.
    pub max_request_bytes: u32,
    /// Largest option payload during the handshake (larger closes the connection).
    pub max_option_bytes: u32,
    /// Options accepted on one connection before the handshake is abandoned.
    pub max_options_per_conn: u32,
    /// Busy-poll budget of an idle connection before it sleeps (0: never poll);
    /// see `nbd/busy_poll.rs`.
    pub busy_poll_us: u64,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_connections: 64,
            max_inflight_per_conn: 128,
            max_inflight_bytes_per_conn: 128 * 1024 * 1024,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_option_bytes: DEFAULT_MAX_OPTION_BYTES,
            max_options_per_conn: 4096,
            busy_poll_us: DEFAULT_BUSY_POLL_US,
        }
    }
}

/// Why a connection ended abnormally (logged, never propagated to other connections).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol (bad magic, oversize length, unknown flags...).
    #[error("protocol violation: {0}")]
    Protocol(#[from] DecodeError),
    /// The peer sent more options than allowed.
    #[error("too many options during the handshake")]
    TooManyOptions,
    /// The reply writer task failed.
    #[error("reply writer task failed: {0}")]
    Writer(String),
}

/// An NBD server over one [`ExportResolver`].
pub struct NbdServer {
    resolver: Arc<dyn ExportResolver>,
    limits: NbdLimits,
    connection_slots: Arc<Semaphore>,
    next_connection_id: AtomicU64,
}

/// What every connection task needs from the server.
#[derive(Clone)]
pub(crate) struct ConnContext {
    pub(crate) resolver: Arc<dyn ExportResolver>,
    pub(crate) limits: NbdLimits,
}

impl NbdServer {
    /// Creates a server; nothing is served until `serve_unix` / `serve_tcp`.
    pub fn new(resolver: Arc<dyn ExportResolver>, limits: NbdLimits) -> Self {
        assert!(
            limits.max_connections > 0,
            "max_connections must be positive"
        );
        assert!(
            limits.max_inflight_per_conn > 0,
            "max_inflight_per_conn must be positive"
        );
        assert!(
            limits.max_request_bytes > 0,
            "max_request_bytes must be positive"
        );
        assert!(
            limits.max_inflight_bytes_per_conn >= limits.max_request_bytes,
            "max_inflight_bytes_per_conn must hold one maximal request"
        );
        NbdServer {
            resolver,
            limits,
            connection_slots: Arc::new(Semaphore::new(limits.max_connections)),
            next_connection_id: AtomicU64::new(1),
        }
    }

    /// Number of connections currently open (handshake or transmission).
    pub fn connection_count(&self) -> usize {
        self.limits.max_connections - self.connection_slots.available_permits()
    }

    /// Serves clients on a unix socket until `shutdown` becomes true.
    pub async fn serve_unix(
        &self,
        listener: tokio::net::UnixListener,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let accept = || async {
            let (stream, _addr) = listener.accept().await?;
            let fd = stream.as_raw_fd();
            let (rd, wr) = stream.into_split();
            Ok((rd, fd, wr, "unix".to_string()))
        };
        self.serve(accept, shutdown).await
    }

    /// Serves clients on a TCP socket (with `TCP_NODELAY`) until `shutdown` becomes true.
    pub async fn serve_tcp(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let accept = || async {
            let (stream, addr) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let fd = stream.as_raw_fd();
            let (rd, wr) = stream.into_split();
            Ok((rd, fd, wr, addr.to_string()))
        };
        self.serve(accept, shutdown).await
    }

    async fn serve<A, F, R, W>(
        &self,
        mut accept: A,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()>
    where
        A: FnMut() -> F,
        F: Future<Output = io::Result<(R, RawFd, W, String)>>,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = ConnContext {
            resolver: Arc::clone(&self.resolver),
            limits: self.limits,
        };
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                biased;
                () = wait_shutdown(&mut shutdown) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = accept() => accepted,
            };
            let (rd, fd, wr, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "nbd: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&self.connection_slots).try_acquire_owned() else {
                tracing::warn!(%peer, max = self.limits.max_connections, "nbd: connection limit reached, closing");
                continue;
            };
            let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("nbd_conn", id, %peer);
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            connections.spawn(
                async move {
                    tracing::debug!("connected");
                    match serve_connection(ctx, rd, fd, wr, shutdown).await {
                        Ok(()) => tracing::debug!("closed"),
                        Err(e) => tracing::info!(error = %e, "closed on error"),
                    }
                    drop(slot);
                }
                .instrument(span),
            );
        }
        while connections.join_next().await.is_some() {}
        Ok(())
    }
}

/// Completes when shutdown is requested (or can no longer be signalled).
pub(crate) async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: nobody can keep us running, so stop.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves one connection whose socket is `fd` (read through `rd`).
async fn serve_connection<R, W>(
    ctx: ConnContext,
    rd: R,
    fd: RawFd,
    mut wr: W,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, armed) = busy_poll::BusyPollRead::new(rd, fd, ctx.limits.busy_poll_us);
    // A request on this socket ends a worker's peer busy-poll.
    let _watched = crate::peer::park_poll::watch(fd);
    let outcome = tokio::select! {
        outcome = handshake::negotiate(&ctx, &mut rd, &mut wr) => outcome?,
        () = wait_shutdown(&mut shutdown) => return Ok(()),
    };
    match outcome {
        None => Ok(()),
        Some(session) => transmission::serve(session, &ctx.limits, rd, armed, wr, shutdown).await,
    }
}

/// Serves one socket whose other end belongs to the kernel's NBD client
/// (`/dev/nbdX`): the kernel starts in the transmission phase (no handshake,
/// simple replies only), so this goes straight to the request loop. Used by
/// `frontend::kernel_nbd`.
pub async fn serve_transmission_only(
    export: ExportInfo,
    limits: NbdLimits,
    stream: tokio::net::UnixStream,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let session = handshake::Session {
        export,
        structured: false,
        base_allocation: false,
    };
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let (rd, armed) = busy_poll::BusyPollRead::new(rd, fd, limits.busy_poll_us);
    let _watched = crate::peer::park_poll::watch(fd);
    transmission::serve(session, &limits, rd, armed, wr, shutdown).await
}

/// The transmission flags the kernel client is given for `export` (what the
/// handshake would advertise without structured replies).
pub fn kernel_transmission_flags(export: &ExportInfo) -> u16 {
    handshake::transmission_flags(export, false)
}
