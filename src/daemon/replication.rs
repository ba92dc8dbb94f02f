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

use crate::engine::sync::{decide, SplitBrainPolicy, SyncDecision, SyncView};
use crate::engine::volume::{
    disk_from_code, role_from_code, LinkRequest, PeerTx, UUID_FLAG_CRASHED_PRIMARY,
    UUID_FLAG_DISCARD_MY_DATA, UUID_FLAG_INFO_ONLY, UUID_FLAG_NEW_CURRENT, UUID_FLAG_SKIP_SYNC,
};
use crate::engine::{ConnState, Role, Volume};
use crate::meta::uuid::format_uuid;
use crate::meta::GenerationUuids;
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

/// How resyncs run and split brains are handled (from the resource's config).
#[derive(Debug, Clone)]
pub struct ResyncSettings {
    /// `after-sb-*pri`.
    pub policy: SplitBrainPolicy,
    /// `handlers { }`: name -> shell command.
    pub handlers: std::collections::BTreeMap<String, String>,
    /// A fixed rate (`syncer { rate }` / `resync-rate` set, or `c-plan-ahead 0`).
    pub fixed_rate_bytes_per_s: Option<u64>,
    /// Dynamic controller: rate while applications are idle.
    pub c_max_rate_bytes_per_s: u64,
    /// Dynamic controller: rate kept while applications write.
    pub c_min_rate_bytes_per_s: u64,
}

/// Handle of a resource's replication task.
pub struct Replication {
    recheck: Arc<tokio::sync::Notify>,
    commands: tokio::sync::mpsc::Sender<LinkCommand>,
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
        resync: ResyncSettings,
    ) -> std::io::Result<Replication> {
        let listener = TcpListener::bind(settings.listen_addr).await?;
        let recheck = Arc::new(tokio::sync::Notify::new());
        let (want, want_rx) = watch::channel(true);
        let (stop, stop_rx) = watch::channel(false);
        let status = PeerStatus::new();
        let refusal = Arc::new(std::sync::Mutex::new(None));
        let (commands, commands_rx) = tokio::sync::mpsc::channel(LINK_COMMAND_QUEUE);
        let link = Link {
            commands: tokio::sync::Mutex::new(commands_rx),
            volume,
            settings,
            status: status.clone(),
            refusal: refusal.clone(),
            recheck: recheck.clone(),
            resync,
        };
        let task = tokio::spawn(run(link, listener, want_rx, stop_rx));
        Ok(Replication {
            recheck,
            commands,
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

    /// Asks the connected link to do something (false: no room or no task).
    pub fn command(&self, cmd: LinkCommand) -> bool {
        self.commands.try_send(cmd).is_ok()
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

/// Administrator requests for a connected link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkCommand {
    /// `invalidate-remote`: send every block to the peer (full sync from here).
    FullSyncToPeer,
    /// `new-current-uuid --clear-bitmap`: tell the peer to adopt our new UUID and
    /// skip the initial sync.
    SkipInitialSync,
}

/// Bound of the link command queue.
const LINK_COMMAND_QUEUE: usize = 8;

/// What the replication task works with.
struct Link {
    commands: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<LinkCommand>>,
    volume: Arc<Volume>,
    settings: PeerSettings,
    status: PeerStatus,
    refusal: Arc<std::sync::Mutex<Option<String>>>,
    recheck: Arc<tokio::sync::Notify>,
    resync: ResyncSettings,
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
            Err(e) if e.kind() == peer::PeerErrorKind::Incompatible => {
                // DRBD: "incompatible ... settings" drops to StandAlone until the
                // administrator connects again (after fixing a configuration).
                let reason = format!("{e}: StandAlone until `connect`");
                tracing::error!(resource = %link.settings.resource, "cannot connect: {reason}");
                if let Ok(mut g) = link.refusal.lock() {
                    *g = Some(reason);
                }
                volume.set_connecting(false);
                tokio::select! {
                    _ = want.changed() => {}
                    _ = wait_until(&mut stop, true) => break,
                }
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
    // Racing state changes: the node whose name sorts first wins (both agree).
    // Requests of an earlier connection mean nothing for this one.
    volume.clear_link_requests();
    volume.set_peer_features(conn.info.features);
    volume.attach_peer(
        tx.clone(),
        role,
        disk,
        settings.node_name < settings.peer_name,
    );
    let mut tick = tokio::time::interval(Duration::from_millis(crate::engine::EPOCH_CLOSE_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut my_oos_blocks = send_uuids_and_bitmap(volume, &tx, 0).await;
    let mut peer: Option<PeerUuids> = None;
    let mut bitmap_words_received: u64 = 0;
    let bitmap_words_limit = mine.size_bytes.div_ceil(4096).div_ceil(64) + 1;
    let mut resync: Option<JoinHandle<()>> = None;
    let mut commands = link.commands.lock().await;
    loop {
        tokio::select! {
            _ = tick.tick() => volume.tick().await,
            req = volume.next_link_request() => match req {
                LinkRequest::StartResync => {
                    if volume.snapshot().conn != ConnState::Ahead {
                        continue;
                    }
                    if resync.as_ref().is_some_and(|t| !t.is_finished()) {
                        tracing::warn!(resource = %res, "Ahead: a resync is already running");
                    } else {
                        tracing::info!(resource = %res, "Ahead -> SyncSource: resyncing what the peer missed");
                        resync = Some(tokio::spawn(run_resync(volume.clone(), false, link.resync.clone())));
                    }
                }
                LinkRequest::Drop(reason) => {
                    tracing::warn!(resource = %res, "on-congestion disconnect: {reason}, dropping the connection");
                    conn.close(reason).await;
                    volume.detach_peer(false);
                    return;
                }
            },
            Some(cmd) = commands.recv() => match cmd {
                LinkCommand::FullSyncToPeer => {
                    if resync.as_ref().is_some_and(|t| !t.is_finished()) {
                        tracing::warn!(resource = %res, "invalidate-remote: a resync is already running");
                    } else {
                        tracing::info!(resource = %res, "invalidate-remote: full sync to the peer");
                        resync = Some(tokio::spawn(run_resync(volume.clone(), true, link.resync.clone())));
                    }
                }
                LinkCommand::SkipInitialSync => {
                    tx.send(volume.uuids_frame(UUID_FLAG_SKIP_SYNC)).await;
                    tx.send(volume.state_frame()).await;
                }
            },
            ev = conn.recv() => match ev {
                Some(PeerEvent::Frame { frame: Frame::Uuids { current, bitmap, history, bitmap_bits, flags }, .. }) => {
                    let uuids = GenerationUuids { current, bitmap, history };
                    volume.set_peer_uuids(uuids);
                    if flags & UUID_FLAG_NEW_CURRENT != 0 && volume.adopt_new_current(current) {
                        // B7: the Primary's forced promotion started a generation we
                        // share; our UUIDs follow it (the peer cleared its bitmap UUID).
                        tx.send(volume.uuids_frame(UUID_FLAG_INFO_ONLY)).await;
                    }
                    if flags & UUID_FLAG_INFO_ONLY != 0 {
                        // The peer's generation moved (end of a resync): keep its view
                        // current for later decisions, decide nothing now.
                        if let Some(p) = peer.as_mut() {
                            p.uuids = uuids;
                            p.bitmap_bits = bitmap_bits;
                            p.flags = flags & !UUID_FLAG_INFO_ONLY;
                        }
                        continue;
                    }
                    if flags & UUID_FLAG_SKIP_SYNC != 0 {
                        tracing::info!(resource = %res, "peer declared new current UUID {} with --clear-bitmap: adopting it, no initial sync", format_uuid(current));
                        volume.adopt_skip_sync(current);
                        // Our new UUIDs first, then the state that shows UpToDate, so
                        // the peer never decides on our old UUIDs.
                        tx.send(volume.uuids_frame(UUID_FLAG_INFO_ONLY)).await;
                        tx.send(volume.state_frame()).await;
                        if let Some(p) = peer.as_mut() {
                            p.uuids = uuids;
                            p.bitmap_bits = bitmap_bits;
                        }
                        continue;
                    }
                    peer = Some(PeerUuids { uuids, bitmap_bits, flags, bitmap_done: false });
                    bitmap_words_received = 0;
                }
                Some(PeerEvent::Frame { frame: Frame::BitmapChunk { offset_bits, words }, .. }) => {
                    bitmap_words_received += words.len() as u64;
                    let merged = if bitmap_words_received > bitmap_words_limit {
                        Err("more bitmap than the device has".to_string())
                    } else {
                        volume.merge_peer_bitmap(offset_bits, &words).map_err(|e| e.to_string())
                    };
                    if let Err(e) = merged {
                        tracing::error!(resource = %res, "bad bitmap from the peer: {e}");
                        conn.close("protocol error: bad bitmap").await;
                        volume.detach_peer(false);
                        return;
                    }
                }
                Some(PeerEvent::Frame { frame: Frame::BitmapDone, .. }) => {
                    if let Some(p) = peer.as_mut() {
                        p.bitmap_done = true;
                    }
                    if let Some(p) = peer {
                        if !evaluate(link, &p, my_oos_blocks, &mut resync).await {
                            stand_alone(link, conn, want, stop).await;
                            return;
                        }
                    }
                }
                Some(PeerEvent::Frame { frame: frame @ Frame::State { .. }, .. }) => {
                    let before = volume.snapshot();
                    volume.on_frame(frame).await;
                    let after = volume.snapshot();
                    // A peer that changed role or disk outside a resync may change the
                    // decision (e.g. it was forced to Primary).
                    let idle = !matches!(after.conn, ConnState::SyncSource | ConnState::SyncTarget);
                    let changed = (before.peer_role, before.peer_disk) != (after.peer_role, after.peer_disk);
                    if let (true, true, Some(p)) = (idle, changed, peer) {
                        my_oos_blocks = volume.sync_view().oos_blocks;
                        if p.bitmap_done && !evaluate(link, &p, my_oos_blocks, &mut resync).await {
                            stand_alone(link, conn, want, stop).await;
                            return;
                        }
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
                // Our state changed (forced promotion, invalidate, new UUID): tell
                // the peer in order (state, then UUIDs and bitmap) and decide again.
                tx.send(volume.state_frame()).await;
                my_oos_blocks = send_uuids_and_bitmap(volume, &tx, 0).await;
                if let Some(p) = peer.filter(|p| p.bitmap_done) {
                    if !evaluate(link, &p, my_oos_blocks, &mut resync).await {
                        stand_alone(link, conn, want, stop).await;
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

/// The peer's part of the sync handshake.
#[derive(Debug, Clone, Copy)]
struct PeerUuids {
    uuids: GenerationUuids,
    bitmap_bits: u64,
    flags: u64,
    /// Its whole bitmap arrived (and was merged into ours).
    bitmap_done: bool,
}

/// Bitmap words per `BitmapChunk` frame (256 KiB of bitmap = 8 GiB of data).
const BITMAP_CHUNK_WORDS: usize = 32 * 1024;

/// Sends our UUIDs and the set runs of our bitmap; returns the bit count sent.
async fn send_uuids_and_bitmap(volume: &Volume, tx: &SenderTx, flags: u64) -> u64 {
    let frame = volume.uuids_frame(flags);
    let count = match &frame {
        Frame::Uuids { bitmap_bits, .. } => *bitmap_bits,
        _ => 0,
    };
    tx.send(frame).await;
    for (offset_bits, words) in volume.bitmap_chunks(BITMAP_CHUNK_WORDS) {
        tx.send(Frame::BitmapChunk { offset_bits, words }).await;
    }
    tx.send(Frame::BitmapDone).await;
    count
}

/// Waits until the watched flag equals `value` (or its sender is gone).
async fn wait_until(rx: &mut watch::Receiver<bool>, value: bool) {
    // The `Ref` that `wait_for` returns is not `Send`: drop it here.
    let _ = rx.wait_for(|v| *v == value).await.map(|_| ());
}

/// Decides the resync with the peer's latest view; starts it when this node is
/// the source. Returns false when the connection must be given up (split brain,
/// unrelated data, a refused direction).
async fn evaluate(
    link: &Link,
    peer: &PeerUuids,
    my_oos_blocks: u64,
    resync: &mut Option<JoinHandle<()>>,
) -> bool {
    let volume = &link.volume;
    let res = &link.settings.resource;
    let snap = volume.snapshot();
    let theirs = SyncView {
        role: snap.peer_role,
        disk: snap.peer_disk,
        uuids: peer.uuids,
        crashed_primary: peer.flags & UUID_FLAG_CRASHED_PRIMARY != 0,
        discard_my_data: peer.flags & UUID_FLAG_DISCARD_MY_DATA != 0,
        oos_blocks: peer.bitmap_bits,
    };
    let mut mine = volume.sync_view();
    mine.oos_blocks = my_oos_blocks;
    let tiebreak = link.settings.node_name < link.settings.peer_name;
    let decision = decide(&mine, &theirs, link.resync.policy, tiebreak);
    tracing::info!(
        resource = %res,
        "resync decision {decision:?}: self {}:{}:{}:{} {} {} bits:{}{}, peer {}:{}:{}:{} {} {} bits:{}{}",
        format_uuid(mine.uuids.current), format_uuid(mine.uuids.bitmap),
        format_uuid(mine.uuids.history[0]), format_uuid(mine.uuids.history[1]),
        mine.role, mine.disk, mine.oos_blocks,
        if mine.crashed_primary { " crashed-primary" } else { "" },
        format_uuid(theirs.uuids.current), format_uuid(theirs.uuids.bitmap),
        format_uuid(theirs.uuids.history[0]), format_uuid(theirs.uuids.history[1]),
        theirs.role, theirs.disk, theirs.oos_blocks,
        if theirs.crashed_primary { " crashed-primary" } else { "" },
    );
    let refuse = |reason: String| {
        tracing::error!(resource = %res, "{reason}");
        if let Ok(mut g) = link.refusal.lock() {
            *g = Some(reason);
        }
        false
    };
    match decision {
        SyncDecision::None => {
            let before = volume.snapshot().disk;
            volume.settle_in_sync(theirs.disk);
            if volume.snapshot().disk != before {
                // The peer shows our new disk state.
                volume.announce_state();
            }
            true
        }
        SyncDecision::NoData => true,
        SyncDecision::TargetFull | SyncDecision::TargetBitmap => {
            tracing::info!(resource = %res, "becoming SyncTarget ({}), waiting for the peer", if decision.is_full() { "full sync" } else { "bitmap" });
            true
        }
        SyncDecision::SourceFull | SyncDecision::SourceBitmap => {
            if resync.as_ref().is_some_and(|t| !t.is_finished()) {
                return true;
            }
            let v = volume.clone();
            *resync = Some(tokio::spawn(run_resync(v, decision.is_full(), link.resync.clone())));
            true
        }
        SyncDecision::SplitBrain { primary_lost } => {
            run_handler(link, "split-brain").await;
            if primary_lost {
                run_handler(link, "pri-lost-after-sb").await;
            }
            refuse(
                "Split-Brain detected: both nodes changed data while apart; dropping the connection, nothing resynced. \
                 Resolve with `rdbadm secondary` + `rdbadm connect --discard-my-data` on the victim and `rdbadm connect` on the survivor"
                    .to_string(),
            )
        }
        SyncDecision::Unrelated => refuse(
            "Unrelated data, aborting! The generation UUIDs of the two nodes have nothing in common; \
             re-create the meta-data of the node whose data is not wanted (create-md --force) and connect again"
                .to_string(),
        ),
        SyncDecision::Refused(why) => refuse(format!("resync refused: {why}")),
    }
}

/// Runs the configured handler `name` (`handlers { split-brain "cmd"; }`) with the
/// resource in `DRBD_RESOURCE` / `RDB_RESOURCE` (and the peer's name), bounded.
async fn run_handler(link: &Link, name: &str) {
    let Some(cmd) = link.resync.handlers.get(name) else {
        return;
    };
    let s = &link.settings;
    tracing::warn!(resource = %s.resource, "calling handler {name}: {cmd}");
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("DRBD_RESOURCE", &s.resource)
        .env("RDB_RESOURCE", &s.resource)
        .env("DRBD_PEER", &s.peer_name)
        .env("DRBD_MINOR", "0")
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(HANDLER_TIMEOUT_S), child).await {
        Ok(Ok(st)) => tracing::info!(resource = %s.resource, "handler {name} exited with {st}"),
        Ok(Err(e)) => {
            tracing::error!(resource = %s.resource, "handler {name} failed to start: {e}")
        }
        Err(_) => {
            tracing::error!(resource = %s.resource, "handler {name} killed after {HANDLER_TIMEOUT_S} s")
        }
    }
}

/// Longest a handler may run.
const HANDLER_TIMEOUT_S: u64 = 60;

/// Gives the connection up and stays StandAlone until the administrator connects.
async fn stand_alone(
    link: &Link,
    conn: PeerConnection,
    want: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) {
    let reason = link
        .refusal
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .unwrap_or_else(|| "refused".to_string());
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
const RESYNC_MAX_IN_FLIGHT: usize = 128;
/// Resync chunks being read and queued at once on the source.
const RESYNC_READERS: usize = 16;

/// Period of the resync rate controller.
const CONTROLLER_PERIOD_MS: u64 = 100;

/// The resync rate: fixed, or DRBD's dynamic controller in its simplest form: up to
/// `c-max-rate` while applications are idle, `c-min-rate` while they write (the
/// application's writes on this node are watched every 100 ms).
struct RateController {
    settings: ResyncSettings,
    window_start: std::time::Instant,
    window_app_written_bytes: u64,
    app_active: bool,
    /// Bytes allowed but not sent yet (token bucket, at most one period's worth).
    budget_bytes: f64,
    last_refill: std::time::Instant,
}

impl RateController {
    fn new(settings: ResyncSettings, app_written_bytes: u64) -> RateController {
        let now = std::time::Instant::now();
        RateController {
            settings,
            window_start: now,
            window_app_written_bytes: app_written_bytes,
            app_active: false,
            budget_bytes: RESYNC_CHUNK_BYTES as f64,
            last_refill: now,
        }
    }

    fn rate_bytes_per_s(&self) -> u64 {
        match self.settings.fixed_rate_bytes_per_s {
            Some(r) => r,
            None if self.app_active => self.settings.c_min_rate_bytes_per_s,
            None => self.settings.c_max_rate_bytes_per_s,
        }
    }

    /// Waits until `len` bytes may be sent.
    async fn admit(&mut self, len: u64, app_written_bytes: u64) {
        loop {
            let now = std::time::Instant::now();
            if now.duration_since(self.window_start) >= Duration::from_millis(CONTROLLER_PERIOD_MS)
            {
                self.app_active = app_written_bytes > self.window_app_written_bytes;
                self.window_app_written_bytes = app_written_bytes;
                self.window_start = now;
            }
            let rate = self.rate_bytes_per_s().max(4096) as f64;
            let dt = now.duration_since(self.last_refill).as_secs_f64();
            self.last_refill = now;
            let cap = (rate * CONTROLLER_PERIOD_MS as f64 / 1000.0).max(len as f64);
            self.budget_bytes = (self.budget_bytes + rate * dt).min(cap);
            if self.budget_bytes >= len as f64 {
                self.budget_bytes -= len as f64;
                return;
            }
            let wait_s = (len as f64 - self.budget_bytes) / rate;
            tokio::time::sleep(Duration::from_secs_f64(wait_s.min(0.1))).await;
        }
    }
}

/// Sends every out-of-sync block (the union of both bitmaps, or every block) to the
/// peer at the controller's rate, then declares the peer UpToDate. Stops quietly if
/// the link goes (the bits stay set, on disk too).
async fn run_resync(volume: Arc<Volume>, full: bool, settings: ResyncSettings) {
    if !volume.start_sync_source(full).await {
        return;
    }
    let started = std::time::Instant::now();
    let mut sent_bytes: u64 = 0;
    let mut cursor = 0u64;
    let mut rate = RateController::new(settings, volume.snapshot().counters.disk_written_bytes);
    // Chunks being read and queued (each excludes overlapping writes meanwhile);
    // `cursor` moves past them, so a pass never picks one twice.
    let mut reading: tokio::task::JoinSet<Result<bool, crate::storage::IoError>> =
        tokio::task::JoinSet::new();
    loop {
        if !volume.snapshot().conn.is_connected() {
            reading.abort_all();
            return;
        }
        while reading.len() < RESYNC_READERS && volume.resync_in_flight() < RESYNC_MAX_IN_FLIGHT {
            let Some((offset, len)) = volume.next_resync_range(cursor, RESYNC_CHUNK_BYTES) else {
                break;
            };
            rate.admit(len, volume.snapshot().counters.disk_written_bytes)
                .await;
            let v = volume.clone();
            reading.spawn(async move { v.resync_chunk(offset, len).await });
            sent_bytes += len;
            cursor = offset + len;
        }
        if reading.is_empty() {
            if volume
                .next_resync_range(cursor, RESYNC_CHUNK_BYTES)
                .is_some()
            {
                // Room for more once acknowledgements come back.
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else if cursor > 0 {
                // End of a pass: start over for bits set meanwhile (or sent again).
                cursor = 0;
            } else if volume.resync_in_flight() == 0 {
                if volume.sync_view().oos_blocks == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            continue;
        }
        tokio::select! {
            done = reading.join_next() => match done {
                Some(Ok(Ok(true))) | None => {}
                Some(Ok(Ok(false))) => {
                    reading.abort_all();
                    return;
                }
                Some(Ok(Err(e))) => {
                    tracing::error!("resync read failed: {e}");
                    reading.abort_all();
                    return;
                }
                Some(Err(e)) => {
                    tracing::error!("resync reader: {e}");
                    reading.abort_all();
                    return;
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        "resync done: {sent_bytes} bytes in {secs:.2} s ({:.1} MiB/s)",
        sent_bytes as f64 / secs / 1048576.0
    );
    volume.finish_sync_source().await;
}
