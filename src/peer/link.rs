//! The established link: one writer task and one reader task per connection.
//!
//! The writer drains the bounded send queue in batches (up to [`BATCH_FRAMES`] frames
//! or [`BATCH_BYTES`] bytes), encodes all headers into one buffer and writes headers
//! and the callers' payload `Bytes` with vectored writes, so a payload is never copied.
//! The writer sends a Ping whenever it has sent nothing for `ping_int` (so the peer
//! hears from us even while our reader waits for a slow consumer); PingAck requests
//! from the reader bypass the queue (flag + `Notify`). The reader decodes frames in place
//! and hands out payloads as `Bytes` slices of its read buffer. The first failure on
//! either side sets the shared "dead" flag with its reason; both tasks then stop and
//! the receiver gets one [`PeerEvent::Lost`].

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rdb_protocol::repl::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::handshake::take_frame;
use super::park_poll;
use super::{PeerEvent, PeerFrame, PeerSender, PeerSettings, PeerStatus};

/// Most frames written by one vectored write (keeps iovecs under IOV_MAX = 1024).
const BATCH_FRAMES: usize = 256;
/// Most bytes gathered into one batch.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A queued frame.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) volume: u32,
    pub(crate) frame: PeerFrame,
    /// Fired once the frame has been handed to the kernel (protocol A completion).
    pub(crate) written: Option<oneshot::Sender<()>>,
}

/// State shared by the two tasks and every sender.
#[derive(Debug)]
pub(crate) struct Shared {
    dead: watch::Sender<bool>,
    reason: Mutex<Option<String>>,
    send_ping: AtomicBool,
    send_pong: AtomicBool,
    wake_writer: Notify,
    status: PeerStatus,
    pub(crate) close_wait_ms: u64,
}

impl Shared {
    pub(crate) fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// Record the first failure reason (later ones are ignored) and stop both tasks.
    /// Returns the reason that won.
    pub(crate) fn fail(&self, reason: String) -> String {
        let winner = {
            let mut r = match self.reason.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            if r.is_none() {
                self.status.record_lost(&reason);
                *r = Some(reason);
            }
            r.clone().unwrap_or_default()
        };
        self.dead.send_replace(true);
        winner
    }

    fn request(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        self.wake_writer.notify_one();
    }
}

/// Resolves once the connection is marked dead.
async fn until_dead(dead: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when everything is.
    let _ = dead.wait_for(|d| *d).await;
}

/// Start the two tasks on an established stream; `buf` holds bytes read past the
/// handshake. Returns the sender, the event receiver and the writer's handle.
pub(crate) fn start(
    stream: TcpStream,
    buf: BytesMut,
    settings: &PeerSettings,
    status: PeerStatus,
) -> (
    PeerSender,
    mpsc::Receiver<PeerEvent>,
    tokio::task::JoinHandle<()>,
) {
    let polled = park_poll::register(stream.as_raw_fd(), settings.busy_poll_us);
    let (rd, wr) = stream.into_split();
    let (dead, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        dead,
        reason: Mutex::new(None),
        send_ping: AtomicBool::new(false),
        send_pong: AtomicBool::new(false),
        wake_writer: Notify::new(),
        status,
        close_wait_ms: settings.handshake_timeout_ms(),
    });
    let depth = settings.max_buffers.max(1) as usize;
    let (tx, rx) = mpsc::channel(depth);
    let (ev_tx, ev_rx) = mpsc::channel(depth);
    let ping_int = Duration::from_millis(settings.ping_int_ms);
    let dead_after = Duration::from_millis(settings.dead_after_ms());
    let stall = Duration::from_millis(settings.write_stall_ms());
    tokio::spawn(reader(rd, polled, buf, ev_tx, shared.clone(), dead_after));
    let writer = tokio::spawn(writer(wr, rx, shared.clone(), ping_int, stall));
    (PeerSender { tx, shared }, ev_rx, writer)
}

/// Reads frames until the connection ends. `_polled` keeps the socket registered
/// for busy-polling while `rd` keeps it open.
async fn reader(
    mut rd: OwnedReadHalf,
    _polled: Option<park_poll::Registration>,
    mut buf: BytesMut,
    events: mpsc::Sender<PeerEvent>,
    shared: Arc<Shared>,
    dead_after: Duration,
) {
    let mut dead = shared.dead.subscribe();
    let mut last_rx = Instant::now();
    let reason = 'conn: loop {
        // Deliver every complete frame already buffered.
        loop {
            match take_frame(&mut buf) {
                Ok(Some((header, frame))) => {
                    last_rx = Instant::now();
                    match frame {
                        Frame::Ping => shared.request(&shared.send_pong),
                        Frame::PingAck => {}
                        Frame::Disconnect { reason } => {
                            break 'conn format!("peer disconnected: {reason}");
                        }
                        frame => {
                            let ev = PeerEvent::Frame {
                                volume: header.volume,
                                frame,
                            };
                            tokio::select! {
                                r = events.send(ev) => if r.is_err() {
                                    break 'conn "connection dropped by its owner".to_owned();
                                },
                                _ = until_dead(&mut dead) => break 'conn String::new(),
                            }
                            // Time spent waiting for the consumer is not peer silence.
                            last_rx = Instant::now();
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("malformed frame from peer, closing the connection: {e}");
                    break 'conn format!("malformed frame from peer: {e}");
                }
            }
        }
        let dead_at = last_rx + dead_after;
        tokio::select! {
            // Bytes already waiting win over an expired timer.
            biased;
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break 'conn "connection closed by the peer".to_owned(),
                Ok(_) => {}
                Err(e) => break 'conn format!("read error: {e}"),
            },
            _ = tokio::time::sleep_until(dead_at) => {
                break 'conn format!("no frame from the peer for {} ms", dead_after.as_millis());
            }
            _ = until_dead(&mut dead) => break 'conn String::new(),
            _ = events.closed() => break 'conn "connection dropped by its owner".to_owned(),
        }
    };
    let reason = shared.fail(reason);
    tracing::warn!("peer connection lost: {reason}");
    let _ = events.send(PeerEvent::Lost { reason }).await;
}

async fn writer(
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
    ping_int: Duration,
    stall: Duration,
) {
    let mut dead = shared.dead.subscribe();
    let mut last_tx = Instant::now();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH_FRAMES);
    let mut headers: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            biased;
            _ = until_dead(&mut dead) => return,
            _ = shared.wake_writer.notified() => {}
            m = queue.recv() => match m {
                Some(o) => batch.push(o),
                None => {
                    // Every sender is gone: nothing more will be sent.
                    shared.fail("all senders dropped".to_owned());
                    return;
                }
            },
            // Heartbeat: nothing sent for ping_int.
            _ = tokio::time::sleep_until(last_tx + ping_int) => {
                shared.send_ping.store(true, Ordering::Release);
            }
        }
        let mut bytes = batch
            .first()
            .map_or(0, |o| o.frame.payload().map_or(0, Bytes::len));
        while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
            match queue.try_recv() {
                Ok(o) => {
                    bytes += o.frame.payload().map_or(0, Bytes::len);
                    batch.push(o);
                }
                Err(_) => break,
            }
        }
        let closing = batch
            .iter()
            .any(|o| matches!(o.frame, Frame::Disconnect { .. }));
        if let Err(e) = write_batch(&mut wr, &shared, &batch, &mut headers, stall).await {
            shared.fail(e);
            return;
        }
        last_tx = Instant::now();
        for o in batch.drain(..) {
            if let Some(done) = o.written {
                let _ = done.send(());
            }
        }
        if closing {
            let _ = wr.shutdown().await;
            shared.fail("connection closed locally".to_owned());
            return;
        }
    }
}

/// Encode and write one batch (plus pending Ping/PingAck) with vectored writes.
async fn write_batch(
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
    batch: &[Outgoing],
    headers: &mut Vec<u8>,
    stall: Duration,
) -> Result<(), String> {
    headers.clear();
    let ping_ack: PeerFrame = Frame::PingAck;
    let ping: PeerFrame = Frame::Ping;
    // (range of `headers`, payload written after it)
    let mut parts: Vec<Part<'_>> = Vec::with_capacity(batch.len() + 2);
    if shared.send_pong.swap(false, Ordering::AcqRel) {
        push_frame(&ping_ack, 0, headers, &mut parts)?;
    }
    if shared.send_ping.swap(false, Ordering::AcqRel) {
        push_frame(&ping, 0, headers, &mut parts)?;
    }
    for o in batch {
        push_frame(&o.frame, o.volume, headers, &mut parts)?;
    }
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() * 2);
    for (start, end, payload) in &parts {
        iov.push(IoSlice::new(&headers[*start..*end]));
        if let Some(p) = payload {
            iov.push(IoSlice::new(p));
        }
    }
    let mut slices: &mut [IoSlice<'_>] = &mut iov;
    while !slices.is_empty() {
        let n = match tokio::time::timeout(stall, wr.write_vectored(slices)).await {
            Err(_) => {
                return Err(format!(
                    "peer not receiving: no send progress for {} ms",
                    stall.as_millis()
                ))
            }
            Ok(Err(e)) => return Err(format!("write error: {e}")),
            Ok(Ok(0)) => return Err("write returned 0 bytes".to_owned()),
            Ok(Ok(n)) => n,
        };
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// A run of encoded headers (`start..end` of the header buffer) and the payload that
/// follows it on the wire.
type Part<'a> = (usize, usize, Option<&'a Bytes>);

fn push_frame<'a>(
    frame: &'a PeerFrame,
    volume: u32,
    headers: &mut Vec<u8>,
    parts: &mut Vec<Part<'a>>,
) -> Result<(), String> {
    let start = headers.len();
    frame
        .encode_header(volume, headers)
        .map_err(|e| format!("cannot encode frame: {e}"))?;
    match parts.last_mut() {
        // Extend the previous header run when no payload sits between them.
        Some((_, end, None)) if *end == start => *end = headers.len(),
        _ => parts.push((start, headers.len(), None)),
    }
    if let Some(p) = frame.payload().filter(|p| !p.is_empty()) {
        if let Some(last) = parts.last_mut() {
            last.2 = Some(p);
        }
    }
    Ok(())
}
