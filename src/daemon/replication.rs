//! The replication link of one resource: keeps a connection to the peer while the
//! administrator wants one, and feeds the volume with what arrives.
//!
//! One task per resource loops: connect (both nodes listen, the transport decides
//! who dials), exchange states, attach the connection to the [`Volume`], pump frames
//! until the link is lost or `disconnect` is asked, detach, start again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdb_protocol::repl::Frame;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::sync::{decide, SyncDecision, SyncView};
use crate::engine::volume::{disk_from_code, role_from_code, PeerTx};
use crate::engine::{Role, Volume};
use crate::peer::{self, PeerConnection, PeerEvent, PeerSender, PeerSettings, PeerStatus};

/// Adapts the transport's sender to what the volume needs.
struct SenderTx(PeerSender);

impl PeerTx for SenderTx {
    fn send(
        &self,
        frame: Frame<Bytes>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move { self.0.send(frame).await.is_ok() })
    }
}

/// Handle of a resource's replication task.
pub struct Replication {
    recheck: Arc<tokio::sync::Notify>,
    want: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    status: PeerStatus,
    refusal: Arc<std::sync::Mutex<Option<String>>>,
    task: Option<JoinHandle<()>>,
}

impl Replication {
    /// Binds this node's replication address and starts connecting.
    pub async fn start(
        volume: Arc<Volume>,
        settings: PeerSettings,
        resync_rate_bytes_per_s: u64,
    ) -> std::io::Result<Replication> {
        let listener = TcpListener::bind(settings.listen_addr).await?;
        let recheck = Arc::new(tokio::sync::Notify::new());
        let (want, want_rx) = watch::channel(true);
        let (stop, stop_rx) = watch::channel(false);
        let status = PeerStatus::new();
        let refusal = Arc::new(std::sync::Mutex::new(None));
        let link = Link {
            volume,
            settings,
            status: status.clone(),
            refusal: refusal.clone(),
            recheck: recheck.clone(),
            resync_rate_bytes_per_s,
        };
        let task = tokio::spawn(run(link, listener, want_rx, stop_rx));
        Ok(Replication {
            recheck,
            want,
            stop,
            status,
            refusal,
            task: Some(task),
        })
    }

    /// Re-evaluates the resync decision (after a forced promotion).
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    /// Connect (again) after `disconnect`.
    pub fn connect(&self) {
        let _ = self.want.send(true);
    }

    /// Drop the connection and stay StandAlone.
    pub fn disconnect(&self) {
        let _ = self.want.send(false);
    }

    /// Why the link is not up, if known (authentication failure, refusal, ...).
    pub fn last_error(&self) -> Option<String> {
        if let Ok(g) = self.refusal.lock() {
            if let Some(r) = g.clone() {
                return Some(r);
            }
        }
        self.status.get().last_error
    }

    /// Stops the task (bounded wait).
    pub async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// What the replication task works with.
struct Link {
    volume: Arc<Volume>,
    settings: PeerSettings,
    status: PeerStatus,
    refusal: Arc<std::sync::Mutex<Option<String>>>,
    recheck: Arc<tokio::sync::Notify>,
    resync_rate_bytes_per_s: u64,
}

async fn run(
    link: Link,
    listener: TcpListener,
    mut want: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let volume = link.volume.clone();
    loop {
        if *stop.borrow() {
            break;
        }
        if !*want.borrow() {
            volume.set_connecting(false);
            tokio::select! {
                _ = wait_until(&mut want, true) => continue,
                _ = wait_until(&mut stop, true) => break,
            }
        }
        volume.set_connecting(true);
        // The transport stops trying when this flips (disconnect or stop).
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let attempt = peer::connect_with_status(&link.settings, &listener, cancel_rx, &link.status);
        let conn = tokio::select! {
            r = attempt => r,
            _ = wait_until(&mut want, false) => { let _ = cancel_tx.send(true); continue; }
            _ = wait_until(&mut stop, true) => { let _ = cancel_tx.send(true); break; }
        };
        match conn {
            Ok(conn) => {
                if let Ok(mut g) = link.refusal.lock() {
                    *g = None;
                }
                session(&link, conn, &mut want, &mut stop).await;
            }
            Err(e) => {
                tracing::error!(resource = %link.settings.resource, "cannot connect: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(link.settings.connect_int_ms.max(100))) => {}
                    _ = wait_until(&mut stop, true) => break,
                }
            }
        }
    }
    volume.set_connecting(false);
}

/// One connected period.
async fn session(
    link: &Link,
    mut conn: PeerConnection,
    want: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) {
    let (volume, settings, refusal) = (&link.volume, &link.settings, &link.refusal);
    let res = settings.resource.clone();
    let tx = Arc::new(SenderTx(conn.sender.clone()));
    if !tx.send(volume.state_frame()).await {
        return;
    }
    // The peer's state comes first; anything else is a protocol error.
    let timeout = Duration::from_millis(settings.timeout_ms.max(1000));
    let first = tokio::time::timeout(timeout, conn.recv()).await;
    let (role, disk, size_bytes) = match first {
        Ok(Some(PeerEvent::Frame {
            frame:
                Frame::State {
                    role,
                    disk,
                    size_bytes,
                    ..
                },
            ..
        })) => (role_from_code(role), disk_from_code(disk), size_bytes),
        other => {
            tracing::warn!(resource = %res, "peer did not send its state first: {other:?}");
            conn.close("protocol error: state expected").await;
            return;
        }
    };
    let mine = volume.snapshot();
    let refuse = if size_bytes != mine.size_bytes {
        Some(format!(
            "peer's device is {size_bytes} bytes, ours {} bytes: refusing to connect (same size needed)",
            mine.size_bytes
        ))
    } else if role == Role::Primary && mine.role == Role::Primary {
        Some(
            "both nodes are Primary (allow-two-primaries is not supported): refusing to connect"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(reason) = refuse {
        tracing::error!(resource = %res, "{reason}");
        if let Ok(mut g) = refusal.lock() {
            *g = Some(reason.clone());
        }
        conn.close(&reason).await;
        // Stay StandAlone, as DRBD does after a refused handshake.
        volume.set_connecting(false);
        tokio::select! {
            _ = want.changed() => {}
            _ = wait_until(stop, true) => {}
        }
        return;
    }
    volume.attach_peer(tx.clone(), role, disk);
    tx.send(uuids_frame(volume)).await;
    let mut peer_oos_blocks: Option<u64> = None;
    let mut resync: Option<JoinHandle<()>> = None;
    loop {
        tokio::select! {
            ev = conn.recv() => match ev {
                Some(PeerEvent::Frame { frame: Frame::Uuids { bitmap_bits, .. }, .. }) => {
                    peer_oos_blocks = Some(bitmap_bits);
                    if !evaluate(link, bitmap_bits, &mut resync) {
                        split_brain(link, conn, want, stop).await;
                        return;
                    }
                }
                Some(PeerEvent::Frame { frame, .. }) => volume.on_frame(frame).await,
                Some(PeerEvent::Lost { reason }) => {
                    tracing::warn!(resource = %res, "connection to the peer lost: {reason}");
                    volume.detach_peer(false);
                    return;
                }
                None => {
                    volume.detach_peer(false);
                    return;
                }
            },
            _ = link.recheck.notified() => {
                tx.send(uuids_frame(volume)).await;
                if let Some(bits) = peer_oos_blocks {
                    if !evaluate(link, bits, &mut resync) {
                        split_brain(link, conn, want, stop).await;
                        return;
                    }
                }
            }
            _ = wait_until(want, false) => {
                conn.close("disconnect").await;
                volume.detach_peer(true);
                return;
            }
            _ = wait_until(stop, true) => {
                conn.close("down").await;
                volume.detach_peer(true);
                return;
            }
        }
    }
}

/// Waits until the watched flag equals `value` (or its sender is gone).
async fn wait_until(rx: &mut watch::Receiver<bool>, value: bool) {
    // The `Ref` that `wait_for` returns is not `Send`: drop it here.
    let _ = rx.wait_for(|v| *v == value).await.map(|_| ());
}

/// This node's resync view for the peer (its bitmap count; UUIDs come next).
fn uuids_frame(volume: &Volume) -> Frame<Bytes> {
    let view = volume.sync_view();
    Frame::Uuids {
        current: 0,
        bitmap: 0,
        history: [0, 0],
        bitmap_bits: view.oos_blocks,
        flags: 0,
    }
}

/// Decides the resync with the peer's latest view; starts it when this node is
/// the source. Returns false on split brain.
fn evaluate(link: &Link, peer_oos_blocks: u64, resync: &mut Option<JoinHandle<()>>) -> bool {
    let volume = &link.volume;
    let snap = volume.snapshot();
    let peer = SyncView {
        role: snap.peer_role,
        disk: snap.peer_disk,
        oos_blocks: peer_oos_blocks,
    };
    let mine = volume.sync_view();
    let decision = decide(mine, peer);
    tracing::info!(
        resource = %link.settings.resource,
        ?mine,
        ?peer,
        ?decision,
        "resync decision"
    );
    let full = match decision {
        SyncDecision::SplitBrain => return false,
        SyncDecision::SourceFull => true,
        SyncDecision::SourceBitmap => false,
        SyncDecision::None | SyncDecision::NoData | SyncDecision::Target => return true,
    };
    if resync.as_ref().is_some_and(|t| !t.is_finished()) {
        return true;
    }
    let v = volume.clone();
    let rate = link.resync_rate_bytes_per_s;
    *resync = Some(tokio::spawn(run_resync(v, full, rate)));
    true
}

async fn split_brain(
    link: &Link,
    conn: PeerConnection,
    want: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) {
    let reason = "Split-Brain detected: both nodes changed data while apart; nothing resynced. \
                  Resolve with `rdbadm secondary` + `rdbadm connect --discard-my-data` on the victim"
        .to_string();
    tracing::error!(resource = %link.settings.resource, "{reason}");
    if let Ok(mut g) = link.refusal.lock() {
        *g = Some(reason.clone());
    }
    conn.close(&reason).await;
    link.volume.detach_peer(true);
    tokio::select! {
        _ = want.changed() => {}
        _ = wait_until(stop, true) => {}
    }
}

/// Largest resync chunk.
const RESYNC_CHUNK_BYTES: u64 = 256 * 1024;
/// Resync chunks in flight at most.
const RESYNC_MAX_IN_FLIGHT: usize = 32;

/// Sends every out-of-sync block to the peer at most `rate_bytes_per_s`, then
/// declares the peer UpToDate. Stops quietly if the link goes (bits stay set).
async fn run_resync(volume: Arc<Volume>, full: bool, rate_bytes_per_s: u64) {
    if !volume.start_sync_source(full).await {
        return;
    }
    let started = std::time::Instant::now();
    let mut sent_bytes: u64 = 0;
    let mut cursor = 0u64;
    loop {
        if !volume.snapshot().conn.is_connected() {
            return;
        }
        if volume.resync_in_flight() >= RESYNC_MAX_IN_FLIGHT {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        match volume.next_resync_range(cursor, RESYNC_CHUNK_BYTES) {
            Some((offset, len)) => {
                if rate_bytes_per_s > 0 {
                    let due = Duration::from_secs_f64(sent_bytes as f64 / rate_bytes_per_s as f64);
                    let elapsed = started.elapsed();
                    if due > elapsed {
                        tokio::time::sleep(due - elapsed).await;
                    }
                }
                match volume.resync_chunk(offset, len).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::error!("resync read at {offset} failed: {e}");
                        return;
                    }
                }
                sent_bytes += len;
                cursor = offset + len;
            }
            None if cursor > 0 => cursor = 0,
            None => {
                if volume.resync_in_flight() == 0 {
                    if volume.sync_view().oos_blocks == 0 {
                        break;
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        "resync done: {sent_bytes} bytes in {secs:.2} s ({:.1} MiB/s)",
        sent_bytes as f64 / secs / 1048576.0
    );
    volume.finish_sync_source().await;
}
