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
    ) -> std::io::Result<Replication> {
        let listener = TcpListener::bind(settings.listen_addr).await?;
        let (want, want_rx) = watch::channel(true);
        let (stop, stop_rx) = watch::channel(false);
        let status = PeerStatus::new();
        let refusal = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn(run(
            volume,
            settings,
            listener,
            want_rx,
            stop_rx,
            status.clone(),
            refusal.clone(),
        ));
        Ok(Replication {
            want,
            stop,
            status,
            refusal,
            task: Some(task),
        })
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

async fn run(
    volume: Arc<Volume>,
    settings: PeerSettings,
    listener: TcpListener,
    mut want: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    status: PeerStatus,
    refusal: Arc<std::sync::Mutex<Option<String>>>,
) {
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
        let attempt = peer::connect_with_status(&settings, &listener, cancel_rx, &status);
        let conn = tokio::select! {
            r = attempt => r,
            _ = wait_until(&mut want, false) => { let _ = cancel_tx.send(true); continue; }
            _ = wait_until(&mut stop, true) => { let _ = cancel_tx.send(true); break; }
        };
        match conn {
            Ok(conn) => {
                if let Ok(mut g) = refusal.lock() {
                    *g = None;
                }
                session(&volume, &settings, conn, &mut want, &mut stop, &refusal).await;
            }
            Err(e) => {
                tracing::error!(resource = %settings.resource, "cannot connect: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(settings.connect_int_ms.max(100))) => {}
                    _ = wait_until(&mut stop, true) => break,
                }
            }
        }
    }
    volume.set_connecting(false);
}

/// One connected period.
async fn session(
    volume: &Arc<Volume>,
    settings: &PeerSettings,
    mut conn: PeerConnection,
    want: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
    refusal: &Arc<std::sync::Mutex<Option<String>>>,
) {
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
    volume.attach_peer(tx, role, disk);
    loop {
        tokio::select! {
            ev = conn.recv() => match ev {
                Some(PeerEvent::Frame { frame, .. }) => volume.on_frame(frame),
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
