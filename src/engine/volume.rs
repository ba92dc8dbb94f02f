//! The volume: the driver around the engine, and what frontends serve.
//!
//! [`Volume`] implements [`BlockIo`], so the NBD server and the FUSE frontend serve a
//! replicated resource exactly as they would serve a file. Each call becomes an
//! [`Event::Request`] for the [`Engine`]; the engine answers with actions that this
//! driver carries out:
//!
//! - `SubmitLocal`: the request's own future performs its local I/O (no extra task);
//! - `SendPeer`: the request becomes a frame for the peer, queued on the connection's
//!   bounded queue before the request's future returns (back-pressure);
//! - `MarkOutOfSync`: the dirty bitmap is updated before the completion is reported;
//! - `Complete`: the waiting future is woken;
//! - `SubmitPeerRequest` / `AckPeer`: a write received from the Primary is applied by
//!   a task and acknowledged.
//!
//! The engine, the table of waiting requests and the peer's pending work sit behind
//! one mutex held only for the few instructions of a state transition, never across
//! an `.await`: frames to send are collected under the lock and sent after it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use rdb_protocol::repl::{self, Digest, Frame};
use tokio::sync::oneshot;

use crate::engine::activity::{AlGate, AlHold};
use crate::engine::core::{
    AckKind, Action, ChangeReply, Counters, Engine, Event, PeerProgress, PromoteStart, Protocol,
    Refusal, ReqId, ReqKind,
};
use crate::engine::state::{ConnState, DiskState, Role};
use crate::engine::sync::SyncView;
use crate::engine::StateChangeError;
use crate::meta::{self, Bitmap, GenerationUuids, MetaData, MetaError, Superblock};
use crate::storage::{BlockIo, Extent, IoError, IoFuture};

mod congestion;
mod diskless;
#[cfg(test)]
mod regression;
mod sync_target;
pub use self::congestion::LinkRequest;
pub use self::diskless::{IoErrorHook, IoErrorPolicy, READ_ID_BIT};

/// Largest request sent to the peer in one frame; larger writes are split.
pub const MAX_PEER_REQUEST_BYTES: u64 = repl::MAX_PAYLOAD_BYTES as u64;

/// Largest piece of a discard or write-zeroes request (64 activity-log extents):
/// larger ones are split so that one request never needs the whole activity log.
pub const MAX_TRIM_PIECE_BYTES: u64 = 256 << 20;

/// Where the volume sends frames for its peer: the connection's bounded queue.
pub trait PeerTx: Send + Sync {
    /// Queues a frame; false when the connection is gone.
    fn send(&self, frame: Frame<Bytes>) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// One request's rendezvous with the engine.
struct Slot {
    kind: ReqKind,
    offset_bytes: u64,
    len_bytes: u64,
    data: Option<Bytes>,
    fua: bool,
    /// Fired when the engine submits the request to the local disk.
    go: Option<oneshot::Sender<()>>,
    /// Fired when the engine completes the request.
    done: Option<oneshot::Sender<Result<(), Refusal>>>,
}

/// A request received from the peer, until it is acknowledged.
struct PeerWork {
    kind: ReqKind,
    offset_bytes: u64,
    len_bytes: u64,
    payload: Option<Bytes>,
    fua: bool,
    /// A resync write: its blocks are in sync once written.
    resync: bool,
}

struct Inner {
    engine: Engine,
    slots: HashMap<ReqId, Slot>,
    peer_work: HashMap<u64, PeerWork>,
    peer_tx: Option<Arc<dyn PeerTx>>,
    bitmap: Bitmap,
    /// Resync chunks sent and not yet acknowledged: id -> (offset, len).
    resync_inflight: HashMap<ReqId, (u64, u64)>,
    /// Bytes sent (SyncSource) or received (SyncTarget) by resync since `up`.
    resync_bytes_total: u64,
    /// Generation UUIDs of this node's data.
    uuids: GenerationUuids,
    /// Crashed while Primary; cleared by the next resync or an in-sync connect.
    crashed_primary: bool,
    /// `connect --discard-my-data`: this node is the victim of the next split brain.
    discard_my_data: bool,
    /// The peer's generation UUIDs, from its last `Uuids` frame.
    peer_uuids: Option<GenerationUuids>,
    /// Progress of the current resync (both sides), for status.
    resync: Option<ResyncProgress>,
    /// csums-alg: the resync sends checksums first.
    csums: Option<crate::engine::digest::BlockDigest>,
    /// The connected peer announced `FEATURE_RESYNC_ZEROES`: zero resync chunks go
    /// as `ResyncZeroes` (else as `ResyncData` of zeroes). Set before `attach_peer`.
    peer_resync_zeroes: bool,
    /// Ranges the peer asked for after a checksum mismatch (sent as data next).
    resync_force_data: Vec<(u64, u64)>,
    /// verify-alg.
    verify_alg: Option<crate::engine::digest::BlockDigest>,
    /// Online verify run by this node (VerifyS).
    verify: Option<VerifyRun>,
    /// The peer runs online verify against us (VerifyT).
    peer_verifying: bool,
    /// Bitmap pages written since `up` (counter `bm`).
    bm_pages_written: u64,
    /// `Volume::promote` waiting for the peer's answer.
    promote_waiter: Option<oneshot::Sender<Result<bool, StateChangeError>>>,
}

/// Online verify as run by this node.
struct VerifyRun {
    /// Request id -> (offset, len, our digest), waiting for the peer's digest.
    waiting: HashMap<ReqId, (u64, u64, Digest)>,
    done_bytes: u64,
    found_bytes: u64,
    started_ms: u64,
}

/// Online verify chunk.
const VERIFY_CHUNK_BYTES: u64 = 256 * 1024;
/// Online verify chunks waiting for the peer at most.
const VERIFY_MAX_IN_FLIGHT: usize = 16;

/// A running resync, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResyncProgress {
    /// Out-of-sync bytes when it started.
    pub total_bytes: u64,
    /// Start, in ms since the volume came up.
    pub started_ms: u64,
    /// This node sends.
    pub source: bool,
}

/// Meta-data state a volume starts with (from the superblock, after AL replay).
pub struct VolumeMeta {
    /// The meta-data (for the activity log and bitmap write-back); None for a
    /// volume without meta-data (tests).
    pub md: Option<Arc<Mutex<MetaData>>>,
    /// Generation UUIDs.
    pub uuids: GenerationUuids,
    /// Crashed while Primary (the activity log was replayed into the bitmap).
    pub crashed_primary: bool,
    /// Keep an activity log (`al-updates yes`, the default).
    pub activity_log: bool,
}

/// `State` frame flag: the sender starts a resync as SyncSource.
pub const STATE_FLAG_SYNC_START: u32 = 1;
/// `State` frame flag: the sender finished its resync as SyncSource.
pub const STATE_FLAG_SYNC_DONE: u32 = 2;
/// `State` frame flag (with SYNC_START): every block is resynced.
pub const STATE_FLAG_SYNC_FULL: u32 = 4;
/// `State` frame flag: the sender starts online verify (the receiver is VerifyT).
pub const STATE_FLAG_VERIFY_START: u32 = 8;
/// `State` frame flag: the sender's online verify ended.
pub const STATE_FLAG_VERIFY_DONE: u32 = 16;
/// `State` frame flag: the sender is Ahead (`on-congestion pull-ahead`): the
/// receiver is Behind, its data Outdated until the sender's resync.
pub const STATE_FLAG_AHEAD: u32 = 32;

fn ahead_flag(conn: ConnState) -> u32 {
    if conn == ConnState::Ahead {
        STATE_FLAG_AHEAD
    } else {
        0
    }
}

/// `Uuids` frame flag: the sender crashed while Primary (its AL extents are marked).
pub const UUID_FLAG_CRASHED_PRIMARY: u64 = 1;
/// `Uuids` frame flag: the sender discards its data in a split brain.
pub const UUID_FLAG_DISCARD_MY_DATA: u64 = 2;
/// `Uuids` frame flag: information only (end of a resync), no new decision.
pub const UUID_FLAG_INFO_ONLY: u64 = 4;
/// `Uuids` frame flag: `new-current-uuid --clear-bitmap`: adopt, no initial sync.
pub const UUID_FLAG_SKIP_SYNC: u64 = 8;
/// `Uuids` frame flag (with INFO_ONLY): the sender, Primary, started a new data
/// generation while connected to this in-sync node (a forced promotion): adopt its
/// current UUID (DRBD sends its UUIDs after `drbd_uuid_new_current`; bug B7).
pub const UUID_FLAG_NEW_CURRENT: u64 = 16;

/// Work collected under the lock, carried out after it is released.
enum Deferred {
    Send(Arc<dyn PeerTx>, Frame<Bytes>),
    /// An application request for the peer: if it cannot be queued, the peer
    /// will never answer it, so it is failed towards the peer (marked out of sync).
    SendRequest(Arc<dyn PeerTx>, Frame<Bytes>, ReqId),
    SubmitPeer(u64),
    /// A frame that must not hold the application back (`OutOfSync` while Ahead).
    SendDetached(Arc<dyn PeerTx>, Frame<Bytes>),
    /// Flush the local disk for the peer's barrier (a task of its own: later peer
    /// writes do not wait for it).
    BarrierFlush {
        epoch: u32,
        token: u64,
    },
    /// Our promotion ended: wake `Volume::promote` (after the frames before it).
    PromoteDone(Result<bool, StateChangeError>),
}

/// A snapshot of a volume's state for `status`.
#[derive(Debug, Clone, Copy)]
pub struct VolumeSnapshot {
    /// This node's role.
    pub role: Role,
    /// This node's disk state.
    pub disk: DiskState,
    /// The connection state.
    pub conn: ConnState,
    /// The peer's role.
    pub peer_role: Role,
    /// The peer's disk.
    pub peer_disk: DiskState,
    /// Counters.
    pub counters: Counters,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Bytes marked out of sync in the bitmap.
    pub out_of_sync_bytes: u64,
    /// Bytes moved by resync since `up`.
    pub resync_bytes_total: u64,
}

/// The operation a request carries to the local disk.
enum LocalOp {
    Read(usize),
    Write(Bytes, bool),
    Flush,
    Discard(u64),
    Zeroes(u64, bool),
    Resync(usize),
    /// Online verify: read, digest, ask the peer for its digest.
    Verify(usize),
}

/// A replicated volume of one resource on this node.
pub struct Volume {
    name: String,
    storage: Arc<dyn BlockIo>,
    inner: Mutex<Inner>,
    /// The activity log (Primary writes), when the volume has meta-data.
    al: Option<AlGate>,
    /// The meta-data (shared with the resource), for bitmap and superblock writes.
    md: Option<Arc<Mutex<MetaData>>>,
    /// Woken when meta-data changed in memory (UUIDs, flags, bitmap to write).
    meta_changed: tokio::sync::Notify,
    next_id: AtomicU64,
    /// The role was Primary after the last engine step (a hint read without the
    /// lock on the write path; `false` is checked under the lock).
    primary_hint: AtomicBool,
    /// `disk-flushes` (default yes): a Secondary makes each epoch stable
    /// (fdatasync) before it acknowledges the Primary's barrier.
    barrier_flushes: AtomicBool,
    epoch: Instant,
    /// `on-io-error` and the Diskless mode (`diskless.rs`).
    diskless: diskless::Diskless,
    /// `on-congestion` plumbing (`congestion.rs`).
    congestion: congestion::VolumeCongestion,
    /// Held by a Primary SyncTarget's write that covers part of an out-of-sync
    /// block, from fetching that block until the widened write completes
    /// (`sync_target.rs`).
    widen_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("name", &self.name).finish()
    }
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => repl::ROLE_PRIMARY,
        Role::Secondary => repl::ROLE_SECONDARY,
        Role::Unknown => repl::ROLE_UNKNOWN,
    }
}

fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::Diskless => repl::DISK_DISKLESS,
        DiskState::Attaching => repl::DISK_ATTACHING,
        DiskState::Inconsistent => repl::DISK_INCONSISTENT,
        DiskState::Outdated => repl::DISK_OUTDATED,
        DiskState::DUnknown => repl::DISK_DUNKNOWN,
        DiskState::Consistent => repl::DISK_CONSISTENT,
        DiskState::UpToDate => repl::DISK_UPTODATE,
    }
}

/// Role from its wire code.
pub fn role_from_code(c: u8) -> Role {
    match c {
        repl::ROLE_PRIMARY => Role::Primary,
        repl::ROLE_SECONDARY => Role::Secondary,
        _ => Role::Unknown,
    }
}

/// Disk state from its wire code.
pub fn disk_from_code(c: u8) -> DiskState {
    match c {
        repl::DISK_DISKLESS => DiskState::Diskless,
        repl::DISK_ATTACHING => DiskState::Attaching,
        repl::DISK_INCONSISTENT => DiskState::Inconsistent,
        repl::DISK_OUTDATED => DiskState::Outdated,
        repl::DISK_CONSISTENT => DiskState::Consistent,
        repl::DISK_UPTODATE => DiskState::UpToDate,
        _ => DiskState::DUnknown,
    }
}

impl Volume {
    /// A volume named `name` over `storage` (the data area), with the disk state read
    /// from meta-data and the dirty bitmap loaded from it.
    pub fn new(
        name: &str,
        storage: Arc<dyn BlockIo>,
        disk: DiskState,
        protocol: Protocol,
        bitmap: Bitmap,
        meta: VolumeMeta,
    ) -> Result<Volume, MetaError> {
        let size_bytes = storage.size_bytes();
        let al = meta
            .md
            .as_ref()
            .filter(|_| meta.activity_log)
            .map(|md| AlGate::new(lock_md(md).clone()))
            .transpose()?;
        Ok(Volume {
            name: name.to_string(),
            storage,
            inner: Mutex::new(Inner {
                engine: Engine::new(size_bytes, disk, protocol),
                slots: HashMap::new(),
                peer_work: HashMap::new(),
                peer_tx: None,
                bitmap,
                resync_inflight: HashMap::new(),
                resync_bytes_total: 0,
                uuids: meta.uuids,
                crashed_primary: meta.crashed_primary,
                discard_my_data: false,
                peer_uuids: None,
                resync: None,
                csums: None,
                peer_resync_zeroes: false,
                resync_force_data: Vec::new(),
                verify_alg: None,
                verify: None,
                peer_verifying: false,
                bm_pages_written: 0,
                promote_waiter: None,
            }),
            al,
            md: meta.md,
            meta_changed: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
            primary_hint: AtomicBool::new(false),
            barrier_flushes: AtomicBool::new(true),
            epoch: Instant::now(),
            diskless: diskless::Diskless::default(),
            congestion: congestion::VolumeCongestion::default(),
            widen_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The resource name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock is never held across an await nor while calling user code; a
        // panic under it is a bug that already aborted that task: keep serving.
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Promotes this node (see [`Engine::begin_promote`]); returns whether data was
    /// forced. With a connected peer, the peer is asked first and this waits for its
    /// answer. A forced promotion, or one without a connected peer, starts a new
    /// data generation (new current UUID), as DRBD does. The caller persists the
    /// superblock (the keeper is not woken: its write could race the caller's).
    pub async fn promote(&self, force: bool) -> Result<bool, StateChangeError> {
        let (started, deferred, rx) = {
            let mut g = self.lock();
            let mut tell_peer = None;
            let mut actions = Vec::new();
            let started = g.engine.begin_promote(self.now_ms(), force, &mut actions)?;
            let rx = match started {
                PromoteStart::Done(forced) => {
                    tell_peer = self.promoted(&mut g, forced);
                    None
                }
                PromoteStart::Asked => {
                    let (tx, rx) = oneshot::channel();
                    g.promote_waiter = Some(tx);
                    Some(rx)
                }
            };
            let mut deferred = self.run_actions(&mut g, &mut actions);
            deferred.extend(tell_peer);
            (started, deferred, rx)
        };
        self.send_all(deferred).await;
        let result = match (started, rx) {
            // The engine answers within its timeout (ticks) or at the connection's
            // loss; the outer bound only guards against a link task gone.
            (_, Some(rx)) => {
                match tokio::time::timeout(std::time::Duration::from_secs(60), rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) | Err(_) => Err(StateChangeError::Interrupted),
                }
            }
            (PromoteStart::Done(forced), None) => Ok(forced),
            (PromoteStart::Asked, None) => Err(StateChangeError::Interrupted),
        };
        result
    }

    /// The engine made us Primary: a new data generation if needed. After a forced
    /// promotion while connected to an in-sync peer (Secondary with data, no resync
    /// running) both stay in the same generation: the bitmap UUID is cleared and the
    /// returned `Uuids` frame (NEW_CURRENT) makes the peer adopt the new current UUID
    /// (B7: otherwise a later failover to that peer looks like a split brain).
    fn promoted(&self, g: &mut Inner, forced: bool) -> Option<Deferred> {
        let mut tell_peer = None;
        if forced || !g.engine.conn().is_connected() {
            let old = g.uuids;
            g.uuids.new_current();
            let (peer_role, peer_disk) = g.engine.peer();
            if forced
                && g.engine.conn().is_connected()
                && g.resync.is_none()
                && peer_role == Role::Secondary
                && matches!(
                    peer_disk,
                    DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
                )
            {
                if let Some(tx) = g.peer_tx.clone() {
                    g.uuids.clear_bitmap_uuid();
                    let frame = Frame::Uuids {
                        current: g.uuids.current | 1,
                        bitmap: g.uuids.bitmap,
                        history: g.uuids.history,
                        bitmap_bits: g.bitmap.count_set(),
                        flags: UUID_FLAG_INFO_ONLY | UUID_FLAG_NEW_CURRENT,
                    };
                    tell_peer = Some(Deferred::Send(tx, frame));
                }
            }
            tracing::info!(
                resource = %self.name,
                "new current UUID {} (was {}), bitmap UUID {}{}",
                meta::uuid::format_uuid(g.uuids.current),
                meta::uuid::format_uuid(old.current),
                meta::uuid::format_uuid(g.uuids.bitmap),
                if tell_peer.is_some() { ", sent to the in-sync peer" } else { "" }
            );
        }
        g.uuids.current |= 1;
        tell_peer
    }

    /// The connected Primary started a new generation while we are in sync with it
    /// (its `Uuids` frame with NEW_CURRENT): our data is that generation too. Ignored
    /// unless we are a connected Secondary with data and no resync running.
    pub fn adopt_new_current(&self, current: u64) -> bool {
        let mut g = self.lock();
        let in_sync = g.engine.role() == Role::Secondary
            && g.engine.conn().is_connected()
            && g.resync.is_none()
            && matches!(
                g.engine.disk(),
                DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
            );
        if !in_sync || g.uuids.current & !1 == current & !1 {
            return false;
        }
        g.uuids.clear_bitmap_uuid();
        g.uuids.history[1] = g.uuids.history[0];
        g.uuids.history[0] = g.uuids.current & !1;
        g.uuids.current = current & !1;
        tracing::info!(
            resource = %self.name,
            "adopted the Primary's new current UUID {}",
            meta::uuid::format_uuid(g.uuids.current)
        );
        drop(g);
        self.meta_changed.notify_one();
        true
    }

    /// Sets `max-epoch-size` and how long a promotion waits for the peer's answer.
    pub fn set_replication_limits(&self, max_epoch_size: u32, state_change_timeout_ms: u64) {
        let mut g = self.lock();
        g.engine.set_max_epoch_size(max_epoch_size);
        g.engine
            .set_state_change_timeout_ms(state_change_timeout_ms);
    }

    /// `disk-flushes`: with `false`, a barrier of the peer is acknowledged once the
    /// writes of its epoch are written, without an fdatasync (DRBD's `disk-flushes
    /// no`, for backing disks whose write cache survives a power loss). Flushes and
    /// FUA writes of the application are carried out either way.
    pub fn set_barrier_flushes(&self, enabled: bool) {
        self.barrier_flushes.store(enabled, Ordering::Relaxed);
    }

    /// Periodic work of the engine (epochs, state-change timeout); the link calls
    /// it about every 100 ms while connected.
    pub async fn tick(&self) {
        let deferred = self.step(&mut self.lock(), Event::Tick);
        self.send_all(deferred).await;
    }

    /// Entries in the transfer log (for tests and status).
    pub fn transfer_log_len(&self) -> usize {
        self.lock().engine.transfer_log_len()
    }

    /// Demotes this node, waiting up to `timeout` for the peer to acknowledge the
    /// writes it has not acknowledged yet (protocols A and B; DRBD waits the same way).
    /// The device is flushed first, as an application flush (B6): local disk and
    /// connected peer, so the last writes are stable on both. The caller closed
    /// the device; without this a power loss of the demoted node (and of the peer,
    /// which acknowledged them from its cache) loses them and nothing marks them
    /// (the activity log only covers a node that crashes as Primary). DRBD gets the
    /// same from the file system's flush at unmount, which it replicates. A failed
    /// flush refuses the demotion, and so does one that takes longer than the
    /// state-change timeout (net `timeout`, `set_replication_limits`): a peer that
    /// never answers cannot make `secondary` hang (DRBD: the state change fails).
    pub async fn demote_waiting(
        &self,
        timeout: std::time::Duration,
    ) -> Result<(), StateChangeError> {
        let deadline = Instant::now() + timeout;
        let (primary, flush_timeout_ms) = {
            let g = self.lock();
            (
                g.engine.role() == Role::Primary,
                g.engine.state_change_timeout_ms(),
            )
        };
        if primary {
            let limit = std::time::Duration::from_millis(flush_timeout_ms);
            // A flush given up here stays in the engine until the peer answers or
            // the connection is lost (its future's completion is then dropped).
            match tokio::time::timeout(limit, BlockIo::flush(self)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(resource = %self.name, "flush before demotion: {e}");
                    return Err(StateChangeError::HeldOpen(format!(
                        "flush before demotion failed: {e}"
                    )));
                }
                Err(_) => {
                    let e = StateChangeError::FlushTimeout(flush_timeout_ms);
                    tracing::error!(resource = %self.name, "{e}");
                    return Err(e);
                }
            }
        }
        loop {
            match self.demote() {
                Err(StateChangeError::HeldOpen(_))
                    if self.lock().engine.writes_awaiting_peer() > 0
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                other => return other,
            }
        }
    }

    /// Demotes this node.
    pub fn demote(&self) -> Result<(), StateChangeError> {
        let mut g = self.lock();
        g.engine.demote()?;
        g.uuids.current &= !1;
        drop(g);
        self.meta_changed.notify_one();
        Ok(())
    }

    /// The generation UUIDs of this node's data.
    pub fn uuids(&self) -> GenerationUuids {
        self.lock().uuids
    }

    /// Whether this node crashed while Primary and has not resynced since.
    pub fn crashed_primary(&self) -> bool {
        self.lock().crashed_primary
    }

    /// `connect --discard-my-data`: lose the next split brain.
    pub fn set_discard_my_data(&self, on: bool) {
        self.lock().discard_my_data = on;
    }

    /// Records the peer's generation UUIDs.
    pub fn set_peer_uuids(&self, uuids: GenerationUuids) {
        self.lock().peer_uuids = Some(uuids);
    }

    /// The connection is in sync with nothing to resync: a crash's AL marks are
    /// settled and the bitmap no longer tracks a divergence.
    pub fn settle_in_sync(&self, peer_disk: DiskState) {
        let mut g = self.lock();
        // Same generation as an UpToDate peer and nothing to resync: the same data.
        if peer_disk == DiskState::UpToDate
            && matches!(g.engine.disk(), DiskState::Consistent | DiskState::Outdated)
        {
            g.engine.force_disk(DiskState::UpToDate);
        }
        g.crashed_primary = false;
        g.discard_my_data = false;
        if g.bitmap.count_set() == 0 {
            g.uuids.clear_bitmap_uuid();
        }
        drop(g);
        self.meta_changed.notify_one();
    }

    /// `new-current-uuid`: starts a new data generation. With `clear_bitmap` on a
    /// fresh, connected pair (both Inconsistent, just created), the data is declared
    /// UpToDate on both sides without an initial sync; returns the new UUID.
    pub fn new_current_uuid(&self, clear_bitmap: bool) -> u64 {
        let mut g = self.lock();
        g.uuids.new_current();
        if g.engine.role() == Role::Primary {
            g.uuids.current |= 1;
        }
        if clear_bitmap {
            g.bitmap.clear_all();
            g.uuids.bitmap = 0;
            g.engine.force_disk(DiskState::UpToDate);
        }
        let current = g.uuids.current;
        drop(g);
        self.meta_changed.notify_one();
        current
    }

    /// Adopts the peer's current generation (the peer declared a new UUID with
    /// `--clear-bitmap` on a fresh pair): our data is UpToDate too.
    pub fn adopt_skip_sync(&self, current: u64) {
        let mut g = self.lock();
        g.uuids.current = current & !1;
        g.uuids.bitmap = 0;
        g.bitmap.clear_all();
        g.engine.force_disk(DiskState::UpToDate);
        drop(g);
        self.meta_changed.notify_one();
    }

    /// `outdate`: a Secondary's data is marked Outdated.
    pub fn outdate(&self) -> Result<(), String> {
        let mut g = self.lock();
        if g.engine.role() == Role::Primary {
            return Err("State change failed: (-7) Refusing to outdate a Primary".into());
        }
        if !matches!(
            g.engine.disk(),
            DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
        ) {
            return Err(format!(
                "State change failed: (-2) disk is {}: nothing to outdate",
                g.engine.disk()
            ));
        }
        if g.engine.conn().is_connected() && g.engine.peer().0 == Role::Primary {
            return Err("State change failed: (-10) State change was refused by peer node (connected to a Primary)".into());
        }
        g.engine.force_disk(DiskState::Outdated);
        drop(g);
        self.meta_changed.notify_one();
        Ok(())
    }

    /// `invalidate`: every block of this node is out of sync; the data is
    /// Inconsistent until a full resync from the peer.
    pub fn invalidate(&self) -> Result<(), String> {
        let mut g = self.lock();
        if g.engine.role() == Role::Primary {
            return Err("State change failed: (-16) Primary cannot become SyncTarget in this version: demote first".into());
        }
        if !g.engine.conn().is_connected() || !g.engine.peer().1.is_usable() {
            return Err("State change failed: (-15) Need a connection to a peer with UpToDate data to start a resync".into());
        }
        g.bitmap.set_all();
        g.engine.force_disk(DiskState::Inconsistent);
        // Our data no longer carries a generation: the peer's UUIDs decide.
        g.uuids.current = meta::uuid::UUID_JUST_CREATED;
        g.uuids.bitmap = 0;
        drop(g);
        self.meta_changed.notify_one();
        Ok(())
    }

    /// Waits until meta-data changed in memory (true) or `timeout` passed (false).
    pub async fn meta_changed(&self, timeout: std::time::Duration) -> bool {
        tokio::time::timeout(timeout, self.meta_changed.notified())
            .await
            .is_ok()
    }

    /// Copies what the volume keeps (UUIDs, disk state, crash flag) into `sb`;
    /// returns whether `sb` changed.
    pub fn fill_superblock(&self, sb: &mut Superblock) -> bool {
        use meta::flags::{CONNECTED_IND, CONSISTENT, CRASHED_PRIMARY, OUTDATED, WAS_UP_TO_DATE};
        let g = self.lock();
        let before = (sb.flags, sb.uuids);
        sb.uuids = g.uuids;
        let keep = sb.flags & !(CONSISTENT | OUTDATED | WAS_UP_TO_DATE | CRASHED_PRIMARY);
        let disk_bits = match g.engine.disk() {
            DiskState::UpToDate => CONSISTENT | WAS_UP_TO_DATE,
            DiskState::Consistent => CONSISTENT | (sb.flags & WAS_UP_TO_DATE),
            DiskState::Outdated => CONSISTENT | OUTDATED,
            // A disk detached after an I/O error missed writes: full resync.
            DiskState::Diskless if self.diskless.is_detached() => 0,
            DiskState::Diskless | DiskState::Attaching | DiskState::DUnknown => {
                sb.flags & (CONSISTENT | OUTDATED | WAS_UP_TO_DATE)
            }
            DiskState::Inconsistent => 0,
        };
        let crash_bit = if g.crashed_primary {
            CRASHED_PRIMARY
        } else {
            0
        };
        let keep = keep & !CONNECTED_IND;
        let connected_bit = if g.engine.conn().is_connected() {
            CONNECTED_IND
        } else {
            0
        };
        sb.flags = keep | disk_bits | crash_bit | connected_bit;
        (sb.flags, sb.uuids) != before
    }

    /// Writes the superblock (when the UUIDs, flags or disk state changed) and the
    /// dirty bitmap pages, outside the volume lock.
    pub async fn persist_meta(&self) -> Result<(), MetaError> {
        self.write_bitmap().await?;
        self.persist_superblock().await
    }

    /// Writes the superblock when the UUIDs, flags or disk state changed.
    async fn persist_superblock(&self) -> Result<(), MetaError> {
        self.write_superblock_with(false).await
    }

    /// Writes the superblock with the current UUIDs and disk state, changed or not
    /// (the daemon sets flags of its own in it first: `PRIMARY_IND`, `AL_CLEAN`).
    pub async fn write_superblock(&self) -> Result<(), MetaError> {
        self.write_superblock_with(true).await
    }

    /// Writes the superblock if it changed, or `always`. A superblock that becomes
    /// Consistent (a resync ended here) waits for a flush of the data it vouches
    /// for: its own durable write is not a data barrier.
    async fn write_superblock_with(&self, always: bool) -> Result<(), MetaError> {
        let Some(md) = self.md.clone() else {
            return Ok(());
        };
        let (snapshot, becomes_consistent) = {
            let mut md = lock_md(&md);
            let mut sb = md.superblock.clone();
            if !self.fill_superblock(&mut sb) && !always {
                return Ok(());
            }
            let consistent = meta::flags::CONSISTENT;
            let becomes_consistent =
                sb.flags & consistent != 0 && md.superblock.flags & consistent == 0;
            md.superblock = sb;
            (md.clone(), becomes_consistent)
        };
        if becomes_consistent {
            if let Err(e) = self.flush_data_for_meta(&snapshot).await {
                // Written again at the next change or pass of the keeper.
                lock_md(&md).superblock.flags &= !meta::flags::CONSISTENT;
                return Err(e);
            }
        }
        tokio::task::spawn_blocking(move || meta::write_superblock(&snapshot))
            .await
            .map_err(|e| MetaError::InvalidArgument(format!("superblock writer: {e}")))?
    }

    /// The periodic write-back (no state change asked for it): like
    /// [`Volume::persist_meta`], except that a Primary outside a resync writes a
    /// copy of its dirty bitmap pages without making it durable (it survives a
    /// crash of this process; the pages stay dirty for the next durable write), and
    /// no copy at all of pages holding cleared bits. Its bits belong to writes in
    /// extents of the activity log (a crash marks those extents whole) or are made
    /// durable before their extent leaves the AL, at a state change, at
    /// `secondary`/`down`. A durable write every second would cost a device cache
    /// flush every second; when it was an fdatasync, with internal meta-data it also
    /// forced out every dirty data page of the backing file (standalone 4k random
    /// writes at QD32: 98-100k against 93-95k IOPS on a quiet machine, 51-58k
    /// against 42-43k on a loaded one).
    pub async fn persist_meta_lazily(&self) -> Result<(), MetaError> {
        let lazy = {
            let g = self.lock();
            g.engine.role() == Role::Primary
                && !matches!(
                    g.engine.conn(),
                    ConnState::SyncSource | ConnState::SyncTarget
                )
        };
        self.write_bitmap_with(!lazy, false).await?;
        self.persist_superblock().await
    }

    /// Writes the dirty bitmap pages to the meta-data (outside the volume lock).
    pub async fn write_bitmap(&self) -> Result<u64, MetaError> {
        self.write_bitmap_with(true, false).await
    }

    /// Writes the dirty bitmap pages. With `sync`, they are written durably and
    /// clean; pages holding cleared bits (a resync or an acknowledged write proved
    /// the blocks equal) are written only after a flush of the data, which
    /// `flush_data` also asks for (before an AL transaction that evicts extents).
    /// Without `sync`, a copy is written and the pages stay dirty, so the next
    /// durable write (before an evicting AL transaction, at a state change) still
    /// writes them: an AL transaction can never become durable before the bits of
    /// the extents it evicts. No copy is written of pages holding cleared bits: the
    /// kernel could write it back before the data.
    async fn write_bitmap_with(&self, sync: bool, flush_data: bool) -> Result<u64, MetaError> {
        let Some(md) = self.md.as_ref().map(|m| lock_md(m).clone()) else {
            return Ok(0);
        };
        let pages = {
            let mut g = self.lock();
            let pages = g.bitmap.take_dirty_pages(&md)?;
            if !sync {
                g.bitmap.restore_dirty_pages(&pages);
                if pages.holds_cleared_bits() {
                    return Ok(0);
                }
            }
            pages
        };
        if sync && (flush_data || pages.holds_cleared_bits()) {
            // The pages were taken first: every bit cleared in them was cleared after
            // its data write completed, so this flush covers that data.
            if let Err(e) = self.flush_data_for_meta(&md).await {
                self.lock().bitmap.restore_dirty_pages(&pages);
                return Err(e);
            }
        }
        if pages.is_empty() {
            return Ok(0);
        }
        let (md2, pages) = (md, Arc::new(pages));
        let p2 = pages.clone();
        let r = tokio::task::spawn_blocking(move || p2.write_with(&md2, sync)).await;
        let r = match r {
            Ok(r) => r,
            Err(e) => Err(MetaError::InvalidArgument(format!("bitmap writer: {e}"))),
        };
        match r {
            Ok(n) => {
                self.lock().bm_pages_written += n;
                Ok(n)
            }
            Err(e) => {
                if sync {
                    self.lock().bitmap.restore_dirty_pages(&pages);
                }
                Err(e)
            }
        }
    }

    /// Flushes the backing disk before a meta-data write that must not be durable
    /// before the data (`docs/metadata.md`, "Write ordering").
    async fn flush_data_for_meta(&self, md: &MetaData) -> Result<(), MetaError> {
        self.storage.flush().await.map_err(|e| MetaError::Io {
            op: "flush the data before the meta-data of",
            path: md.disk_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// What must be durable before an activity-log transaction evicts extents: the
    /// bitmap bits of writes to them and the data of those writes.
    async fn before_al_eviction(&self) -> Result<(), MetaError> {
        self.write_bitmap_with(true, true).await.map(|_| ())
    }

    /// Empties the activity log (clean demotion, `down`).
    pub async fn retire_activity_log(&self) -> Result<(), MetaError> {
        match &self.al {
            Some(al) => al.retire_idle(|| self.before_al_eviction()).await,
            None => Ok(()),
        }
    }

    /// The activity-log hold for a Primary's write (None without meta-data).
    async fn al_begin(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Option<AlHold<'_>>, IoError> {
        let Some(al) = &self.al else {
            return Ok(None);
        };
        // The hint saves taking the volume lock once more per write; a stale
        // `true` only costs a hold on a write the engine refuses anyway.
        if len_bytes == 0
            || !self.primary_hint.load(Ordering::Relaxed)
                && self.lock().engine.role() != Role::Primary
        {
            return Ok(None);
        }
        al.begin(offset_bytes, len_bytes, || self.before_al_eviction())
            .await
            .map(Some)
            .map_err(|e| IoError::Io(std::io::Error::other(format!("activity log: {e}"))))
    }

    /// Resync progress, if a resync runs.
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.lock().resync
    }

    /// Milliseconds since the volume came up.
    pub fn uptime_ms(&self) -> u64 {
        self.now_ms()
    }

    /// A snapshot for status.
    pub fn snapshot(&self) -> VolumeSnapshot {
        let g = self.lock();
        let (peer_role, peer_disk) = g.engine.peer();
        let conn = match g.engine.conn() {
            ConnState::Connected if g.verify.is_some() => ConnState::VerifyS,
            ConnState::Connected if g.peer_verifying => ConnState::VerifyT,
            c => c,
        };
        VolumeSnapshot {
            role: g.engine.role(),
            disk: g.engine.disk(),
            conn,
            peer_role,
            peer_disk,
            counters: Counters {
                al_writes: self.al.as_ref().map_or(0, |al| al.transactions_written()),
                bm_writes: g.bm_pages_written,
                ..g.engine.counters()
            },
            size_bytes: g.engine.size_bytes(),
            out_of_sync_bytes: g.bitmap.out_of_sync_bytes(),
            resync_bytes_total: g.resync_bytes_total,
        }
    }

    /// This node's state as a frame for the peer.
    pub fn state_frame(&self) -> Frame<Bytes> {
        self.state_frame_with(0)
    }

    fn state_frame_with(&self, flags: u32) -> Frame<Bytes> {
        let g = self.lock();
        Frame::State {
            role: role_code(g.engine.role()),
            disk: disk_code(g.engine.disk()),
            flags: flags | ahead_flag(g.engine.conn()),
            size_bytes: g.engine.size_bytes(),
        }
    }

    /// What this node brings to a resync decision.
    pub fn sync_view(&self) -> SyncView {
        let g = self.lock();
        SyncView {
            role: g.engine.role(),
            disk: g.engine.disk(),
            uuids: g.uuids,
            crashed_primary: g.crashed_primary,
            discard_my_data: g.discard_my_data,
            oos_blocks: g.bitmap.count_set(),
        }
    }

    /// Merges the peer's bitmap words into ours (the resync sends the union).
    pub fn merge_peer_bitmap(&self, offset_bits: u64, words: &[u64]) -> Result<u64, MetaError> {
        self.lock().bitmap.or_words(offset_bits, words)
    }

    /// The non-zero runs of our bitmap as `(offset_bits, words)` chunks of at most
    /// `max_words` words, for the peer.
    pub fn bitmap_chunks(&self, max_words: usize) -> Vec<(u64, Vec<u64>)> {
        let g = self.lock();
        let words = g.bitmap.words();
        let mut chunks = Vec::new();
        let mut i = 0;
        while i < words.len() {
            if words[i] == 0 {
                i += 1;
                continue;
            }
            let start = i;
            let mut end = i;
            // Extend over short gaps of zero words, up to max_words.
            while end < words.len() && end - start < max_words {
                // A zero word is kept when a set one follows within 8 words.
                let next_set = words[end..words.len().min(end + 8)].iter().any(|&w| w != 0);
                if !next_set {
                    break;
                }
                end += 1;
            }
            chunks.push(((start * 64) as u64, words[start..end].to_vec()));
            i = end;
        }
        chunks
    }

    /// Starts a resync as SyncSource (`full`: every block) and tells the peer. The
    /// bitmap (the union of both nodes' bits, or every bit) is written to disk first,
    /// so a crash during the resync resumes it instead of forgetting blocks.
    pub async fn start_sync_source(&self, full: bool) -> bool {
        {
            let mut g = self.lock();
            if full {
                g.bitmap.set_all();
            }
        }
        if let Err(e) = self.write_bitmap().await {
            tracing::error!(resource = %self.name, "cannot write the bitmap before the resync: {e}");
            return false;
        }
        let tx = {
            let mut g = self.lock();
            g.engine.start_sync(true);
            g.discard_my_data = false;
            let total_bytes = g.bitmap.out_of_sync_bytes();
            g.resync = Some(ResyncProgress {
                total_bytes,
                started_ms: self.now_ms(),
                source: true,
            });
            g.peer_tx.clone()
        };
        let flags = STATE_FLAG_SYNC_START | if full { STATE_FLAG_SYNC_FULL } else { 0 };
        match tx {
            Some(tx) => tx.send(self.state_frame_with(flags)).await,
            None => false,
        }
    }

    /// Ends a resync as SyncSource and tells the peer its data is now UpToDate (with
    /// our UUIDs first, which the peer adopts).
    pub async fn finish_sync_source(&self) {
        let tx = {
            let mut g = self.lock();
            g.engine.finish_sync();
            g.resync = None;
            g.crashed_primary = false;
            g.uuids.clear_bitmap_uuid();
            g.peer_tx.clone()
        };
        self.meta_changed.notify_one();
        if let Some(tx) = tx {
            tx.send(self.uuids_frame(UUID_FLAG_INFO_ONLY)).await;
            tx.send(self.state_frame_with(STATE_FLAG_SYNC_DONE)).await;
        }
    }

    /// This node's UUIDs as a frame for the peer.
    pub fn uuids_frame(&self, flags: u64) -> Frame<Bytes> {
        let g = self.lock();
        let mut flags = flags;
        if g.crashed_primary {
            flags |= UUID_FLAG_CRASHED_PRIMARY;
        }
        if g.discard_my_data {
            flags |= UUID_FLAG_DISCARD_MY_DATA;
        }
        Frame::Uuids {
            current: g.uuids.current,
            bitmap: g.uuids.bitmap,
            history: g.uuids.history,
            bitmap_bits: g.bitmap.count_set(),
            flags,
        }
    }

    /// Resync chunks sent and not yet acknowledged.
    pub fn resync_in_flight(&self) -> usize {
        self.lock().resync_inflight.len()
    }

    /// The next run of out-of-sync blocks at or after `from`, at most `max_len`
    /// bytes, skipping chunks already in flight.
    pub fn next_resync_range(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let g = self.lock();
        let mut cursor = from;
        loop {
            let (off, len) = g.bitmap.runs(cursor).next()?;
            let len = len.min(max_len);
            let busy = g
                .resync_inflight
                .values()
                .any(|&(o, l)| off < o + l && o < off + len);
            if !busy {
                return Some((off, len));
            }
            cursor = off + len;
        }
    }

    /// Reads one chunk and sends it to the peer as resync data; overlapping
    /// application writes wait while it is in flight. Returns false when the link
    /// is gone.
    pub async fn resync_chunk(&self, offset_bytes: u64, len_bytes: u64) -> Result<bool, IoError> {
        self.check_range(offset_bytes, len_bytes)?;
        let r = self
            .submit(
                ReqKind::Resync,
                offset_bytes,
                len_bytes,
                LocalOp::Resync(len_bytes as usize),
            )
            .await?;
        Ok(r.is_some())
    }

    /// Tells the peer about a role or disk change (no-op when not connected).
    pub fn announce_state(&self) {
        let tx = self.lock().peer_tx.clone();
        if let Some(tx) = tx {
            let frame = self.state_frame();
            tokio::spawn(async move {
                tx.send(frame).await;
            });
        }
    }

    /// Marks the connection as being (re)established or abandoned (StandAlone).
    pub fn set_connecting(&self, connecting: bool) {
        self.lock().engine.set_connecting(connecting);
    }

    /// The peer is connected: frames go to `tx` from now on.
    /// `conflict_winner`: this node wins racing state changes on this connection
    /// (the opposite on the peer).
    pub fn attach_peer(
        &self,
        tx: Arc<dyn PeerTx>,
        role: Role,
        disk: DiskState,
        conflict_winner: bool,
    ) {
        let mut g = self.lock();
        g.peer_tx = Some(tx);
        g.engine.set_conflict_winner(conflict_winner);
        let deferred = self.step(&mut g, Event::PeerConnected { role, disk });
        drop(g);
        self.meta_changed.notify_one();
        self.spawn_deferred(deferred);
    }

    /// The optional frames the connection about to be attached may use (the
    /// handshake's negotiated `Hello` feature bits, `rdb_protocol::repl::FEATURE_*`).
    pub fn set_peer_features(&self, features: u64) {
        self.lock().peer_resync_zeroes = features & rdb_protocol::repl::FEATURE_RESYNC_ZEROES != 0;
    }

    /// The peer is gone (`admin` = an administrator's `disconnect`).
    pub fn detach_peer(&self, admin: bool) {
        let mut g = self.lock();
        g.peer_tx = None;
        g.peer_work.clear();
        self.diskless.fail_reads();
        // Resync chunks sent on the lost connection will never be acknowledged:
        // their bits stay set and the next resync sends them again. Left here, they
        // would count as in flight forever and the next resync would skip their
        // ranges and never finish.
        g.resync_inflight.clear();
        let event = if admin {
            Event::Disconnect
        } else {
            Event::PeerLost
        };
        let deferred = self.step(&mut g, event);
        g.peer_uuids = None;
        g.resync = None;
        if g.engine.role() == Role::Primary {
            // The Primary goes on without its peer: a new data generation; the
            // bitmap records the changes since the old one.
            g.uuids.new_current();
            g.uuids.current |= 1;
            tracing::info!(
                resource = %self.name,
                "new current UUID {} (peer lost), bitmap UUID {}",
                meta::uuid::format_uuid(g.uuids.current),
                meta::uuid::format_uuid(g.uuids.bitmap)
            );
        }
        drop(g);
        self.meta_changed.notify_one();
        self.spawn_deferred(deferred);
    }

    /// Handles a frame received from the peer. Requests of the peer are applied
    /// here, in arrival order, before the next frame is read: on the Secondary this
    /// is the whole data path (no task hop per write), and a slow disk slows the
    /// link down (back-pressure through TCP) instead of queueing without bound.
    pub async fn on_frame(self: &Arc<Self>, frame: Frame<Bytes>) {
        let Some(frame) = self.diskless_frame(frame).await else {
            return;
        };
        let event = match frame {
            Frame::Data {
                offset_bytes,
                len,
                request_id,
                flags,
                payload,
                ..
            } => {
                let kind = if flags & repl::DATA_TRIM != 0 {
                    ReqKind::Discard
                } else if flags & repl::DATA_ZEROES != 0 {
                    ReqKind::Zeroes
                } else {
                    ReqKind::Write
                };
                let work = PeerWork {
                    kind,
                    offset_bytes,
                    len_bytes: u64::from(len),
                    payload: (kind == ReqKind::Write).then_some(payload),
                    fua: flags & repl::DATA_FUA != 0,
                    resync: false,
                };
                self.lock().peer_work.insert(request_id, work);
                Event::PeerRequest {
                    peer_id: request_id,
                    kind,
                    offset_bytes,
                    len_bytes: u64::from(len),
                }
            }
            Frame::Flush { id } => {
                let work = PeerWork {
                    kind: ReqKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    payload: None,
                    fua: false,
                    resync: false,
                };
                self.lock().peer_work.insert(id, work);
                Event::PeerRequest {
                    peer_id: id,
                    kind: ReqKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                }
            }
            Frame::RecvAck { request_id, .. } => Event::PeerProgressed {
                id: request_id,
                progress: PeerProgress::Received,
            },
            Frame::WriteAck { request_id, .. } => {
                let mut g = self.lock();
                if let Some((offset_bytes, len_bytes)) = g.resync_inflight.remove(&request_id) {
                    // The peer wrote this resync chunk: the blocks are in sync.
                    if let Err(e) = g.bitmap.clear_range(offset_bytes, len_bytes) {
                        tracing::error!(resource = %self.name, "bitmap: {e}");
                    }
                    g.resync_bytes_total += len_bytes;
                    return;
                }
                Event::PeerProgressed {
                    id: request_id,
                    progress: PeerProgress::Written,
                }
            }
            Frame::ResyncData {
                offset_bytes,
                len,
                id,
                payload,
            } => self.resync_write_request(id, ReqKind::Write, offset_bytes, len, Some(payload)),
            Frame::ResyncZeroes {
                offset_bytes,
                len,
                id,
            } => self.resync_write_request(id, ReqKind::Zeroes, offset_bytes, len, None),
            Frame::FlushAck { id } => Event::PeerProgressed {
                id,
                progress: PeerProgress::Written,
            },
            Frame::NegAck {
                request_id, errno, ..
            } if self.lock().resync_inflight.remove(&request_id).is_some() => {
                // The bits stay set: the chunk is sent again on the next pass.
                tracing::warn!(resource = %self.name, request_id, errno, "peer failed a resync write");
                return;
            }
            Frame::NegAck {
                request_id, errno, ..
            } => {
                tracing::warn!(
                    resource = %self.name,
                    request_id,
                    errno,
                    "peer failed a write: block marked out of sync"
                );
                Event::PeerFailed { id: request_id }
            }
            Frame::State {
                role, disk, flags, ..
            } => {
                if flags & STATE_FLAG_VERIFY_START != 0 {
                    self.lock().peer_verifying = true;
                }
                if flags & STATE_FLAG_VERIFY_DONE != 0 {
                    self.lock().peer_verifying = false;
                }
                if flags & STATE_FLAG_AHEAD != 0 {
                    let changed = {
                        let mut g = self.lock();
                        let before = g.engine.conn();
                        g.engine.peer_went_ahead();
                        before != g.engine.conn()
                    };
                    if changed {
                        // Our Outdated disk, for the peer's status; kept on disk too.
                        self.meta_changed.notify_one();
                        self.announce_state();
                    }
                }
                if flags & STATE_FLAG_SYNC_START != 0 {
                    {
                        let mut g = self.lock();
                        if flags & STATE_FLAG_SYNC_FULL != 0 {
                            g.bitmap.set_all();
                        }
                        g.engine.start_sync(false);
                        g.discard_my_data = false;
                        let total_bytes = g.bitmap.out_of_sync_bytes();
                        g.resync = Some(ResyncProgress {
                            total_bytes,
                            started_ms: self.now_ms(),
                            source: false,
                        });
                    }
                    // Inconsistent, with the blocks still to come, on disk before
                    // the first resync write lands.
                    if let Err(e) = self.persist_meta().await {
                        tracing::error!(resource = %self.name, "cannot persist meta-data at resync start: {e}");
                    }
                }
                let mut g = self.lock();
                if flags & STATE_FLAG_SYNC_DONE != 0 {
                    g.engine.finish_sync();
                    g.resync = None;
                    // Our data is now the source's generation.
                    if let Some(peer) = g.peer_uuids {
                        g.uuids.current = peer.current & !1;
                        g.uuids.clear_bitmap_uuid();
                        if g.engine.role() == Role::Primary {
                            g.uuids.current |= 1;
                        }
                    }
                    g.crashed_primary = false;
                    // Blocks the source had in sync but we still marked (a resync
                    // write lost to a crash was resent) are settled now.
                    g.bitmap.clear_all();
                    self.meta_changed.notify_one();
                }
                if flags & (STATE_FLAG_SYNC_START | STATE_FLAG_SYNC_DONE) != 0 {
                    // Our disk state changed: the peer shows it in its status.
                    let tx = g.peer_tx.clone();
                    let frame = Frame::State {
                        role: role_code(g.engine.role()),
                        disk: disk_code(g.engine.disk()),
                        flags: 0,
                        size_bytes: g.engine.size_bytes(),
                    };
                    // After a resync our UUIDs changed too: they go first, so the
                    // peer decides again (if it does) with what we hold now.
                    let uuids = (flags & STATE_FLAG_SYNC_DONE != 0).then(|| Frame::Uuids {
                        current: g.uuids.current,
                        bitmap: g.uuids.bitmap,
                        history: g.uuids.history,
                        bitmap_bits: g.bitmap.count_set(),
                        flags: UUID_FLAG_INFO_ONLY,
                    });
                    if let Some(tx) = tx {
                        tokio::spawn(async move {
                            if let Some(u) = uuids {
                                tx.send(u).await;
                            }
                            tx.send(frame).await;
                        });
                    }
                }
                Event::PeerState {
                    role: role_from_code(role),
                    disk: disk_from_code(disk),
                }
            }
            Frame::ChecksumRequest {
                offset_bytes,
                len,
                id,
                digest,
            } => {
                // SyncTarget with csums-alg: compare the source's checksum with ours.
                let alg = self.lock().csums;
                let ours = match (alg, self.read_for_peer(offset_bytes, len).await) {
                    (Some(alg), Some(data)) => Some(alg.digest(&data)),
                    _ => None,
                };
                let tx = self.lock().peer_tx.clone();
                let Some(tx) = tx else { return };
                if ours == Some(digest) {
                    if let Err(e) = self.lock().bitmap.clear_range(offset_bytes, u64::from(len)) {
                        tracing::error!(resource = %self.name, "bitmap: {e}");
                    }
                    tx.send(Frame::ResyncInSync {
                        offset_bytes,
                        len,
                        id,
                    })
                    .await;
                } else {
                    tx.send(Frame::ResyncRequest {
                        offset_bytes,
                        len,
                        id,
                    })
                    .await;
                }
                return;
            }
            Frame::ResyncInSync {
                offset_bytes,
                len,
                id,
            } => {
                // SyncSource: the peer's copy already equals ours.
                let mut g = self.lock();
                if g.resync_inflight.remove(&id).is_some() {
                    if let Err(e) = g.bitmap.clear_range(offset_bytes, u64::from(len)) {
                        tracing::error!(resource = %self.name, "bitmap: {e}");
                    }
                }
                return;
            }
            Frame::ResyncRequest {
                offset_bytes,
                len,
                id,
            } => {
                // SyncSource: the checksums differed: send this range as data next.
                let mut g = self.lock();
                if g.resync_inflight.remove(&id).is_some() {
                    g.resync_force_data.push((offset_bytes, u64::from(len)));
                }
                return;
            }
            Frame::VerifyRequest {
                offset_bytes,
                len,
                id,
            } => {
                // VerifyT: our digest of the range, in frame order (after every
                // earlier write of the Primary was applied).
                let alg = self.lock().verify_alg;
                let digest = match (alg, self.read_for_peer(offset_bytes, len).await) {
                    (Some(alg), Some(data)) => alg.digest(&data),
                    _ => Digest::EMPTY,
                };
                let tx = self.lock().peer_tx.clone();
                if let Some(tx) = tx {
                    tx.send(Frame::VerifyReply {
                        offset_bytes,
                        len,
                        id,
                        digest,
                    })
                    .await;
                }
                return;
            }
            Frame::VerifyReply { id, digest, .. } => {
                let found = {
                    let mut g = self.lock();
                    let Some((offset_bytes, len_bytes, ours)) =
                        g.verify.as_mut().and_then(|v| v.waiting.remove(&id))
                    else {
                        return;
                    };
                    let differs = digest.is_empty() || digest != ours;
                    if let Some(v) = g.verify.as_mut() {
                        v.done_bytes += len_bytes;
                        if differs {
                            v.found_bytes += len_bytes;
                        }
                    }
                    if differs {
                        tracing::warn!(resource = %self.name, offset_bytes, len_bytes, "online verify: out of sync");
                        if let Err(e) = g.bitmap.set_range(offset_bytes, len_bytes) {
                            tracing::error!(resource = %self.name, "bitmap: {e}");
                        }
                    }
                    differs.then(|| (offset_bytes, len_bytes, g.peer_tx.clone()))
                };
                if let Some((offset_bytes, len_bytes, tx)) = found {
                    self.meta_changed.notify_one();
                    if let Some(tx) = tx {
                        tx.send(Frame::OutOfSync {
                            offset_bytes,
                            len: len_bytes as u32,
                        })
                        .await;
                    }
                }
                return;
            }
            Frame::Barrier { epoch } => Event::PeerBarrier { epoch },
            Frame::BarrierAck { epoch, .. } => Event::PeerBarrierAck { epoch },
            Frame::StateChangeRequest { role, .. } => Event::PeerStateChangeRequest {
                role: role_from_code(role),
            },
            Frame::StateChangeReply { ok, reason } => Event::PeerStateChangeReply {
                reply: ChangeReply::from_wire(ok, &reason),
            },
            Frame::OutOfSync { offset_bytes, len } => {
                if let Err(e) = self.lock().bitmap.set_range(offset_bytes, u64::from(len)) {
                    tracing::error!(resource = %self.name, "bitmap: {e}");
                }
                self.meta_changed.notify_one();
                return;
            }
            other => {
                tracing::debug!(resource = %self.name, "ignoring frame {}", other.command());
                return;
            }
        };
        let deferred = self.step(&mut self.lock(), event);
        let mut work: std::collections::VecDeque<Deferred> = deferred.into();
        while let Some(d) = work.pop_front() {
            match d {
                Deferred::SubmitPeer(pid) => work.extend(self.apply_peer_request(pid).await),
                Deferred::SendDetached(tx, frame) => self.congestion.send_detached(tx, frame),
                Deferred::Send(tx, frame) => {
                    tx.send(frame).await;
                }
                Deferred::SendRequest(tx, frame, id) => {
                    if !tx.send(frame).await {
                        self.peer_send_failed(id);
                    }
                }
                Deferred::BarrierFlush { epoch, token } => {
                    let volume = self.clone();
                    tokio::spawn(async move { volume.barrier_flush(epoch, token).await });
                }
                Deferred::PromoteDone(result) => self.promote_done(result),
            }
        }
    }

    /// Registers a resync write of the source (`ResyncData`: `kind` Write with its
    /// payload; `ResyncZeroes`: `kind` Zeroes, no payload) and returns the event
    /// that asks the engine to apply it.
    fn resync_write_request(
        &self,
        id: u64,
        kind: ReqKind,
        offset_bytes: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> Event {
        let work = PeerWork {
            kind,
            offset_bytes,
            len_bytes: u64::from(len),
            payload,
            fua: false,
            resync: true,
        };
        let mut g = self.lock();
        g.peer_work.insert(id, work);
        g.resync_bytes_total += u64::from(len);
        Event::PeerRequest {
            peer_id: id,
            kind,
            offset_bytes,
            len_bytes: u64::from(len),
        }
    }

    /// Flushes for the peer's barrier and acknowledges it.
    async fn barrier_flush(&self, epoch: u32, token: u64) {
        let result = if self.barrier_flushes.load(Ordering::Relaxed) {
            self.storage.flush().await.map_err(|e| {
                tracing::error!(resource = %self.name, epoch, "flush for the peer's barrier: {e}");
                e.errno()
            })
        } else {
            Ok(())
        };
        let event = Event::PeerBarrierDone {
            epoch,
            token,
            result,
        };
        let deferred = self.step(&mut self.lock(), event);
        self.send_all(deferred).await;
    }

    fn promote_done(&self, result: Result<bool, StateChangeError>) {
        let waiter = self.lock().promote_waiter.take();
        match waiter {
            Some(tx) => {
                let _ = tx.send(result);
            }
            None => {
                tracing::warn!(resource = %self.name, ?result, "promotion ended with nobody waiting")
            }
        }
    }

    /// Applies one request of the peer to the local disk and reports it.
    async fn apply_peer_request(&self, peer_id: u64) -> Vec<Deferred> {
        let work = {
            let mut g = self.lock();
            g.peer_work.get_mut(&peer_id).map(|w| {
                (
                    w.kind,
                    w.offset_bytes,
                    w.len_bytes,
                    w.payload.take(),
                    w.fua,
                    w.resync,
                )
            })
        };
        let result = match work {
            None => Err(libc::ECANCELED),
            Some((kind, offset, len, payload, fua, resync)) => {
                let r = match kind {
                    ReqKind::Write if resync => match payload {
                        Some(data) => self.apply_resync_write(offset, len, Some(data)).await,
                        None => Err(IoError::Invalid("peer write without payload".into())),
                    },
                    ReqKind::Zeroes if resync => self.apply_resync_write(offset, len, None).await,
                    ReqKind::Write => match payload {
                        Some(data) => self.storage.write_at(offset, data, fua).await,
                        None => Err(IoError::Invalid("peer write without payload".into())),
                    },
                    ReqKind::Flush => self.storage.flush().await,
                    ReqKind::Discard => self.storage.discard(offset, len).await,
                    ReqKind::Zeroes => self.storage.write_zeroes(offset, len, true).await,
                    ReqKind::Read | ReqKind::Resync => Err(IoError::Invalid("peer read".into())),
                };
                if r.is_ok() && resync {
                    if let Err(e) = self.lock().bitmap.clear_range(offset, len) {
                        tracing::error!(resource = %self.name, "bitmap: {e}");
                    }
                }
                r.map_err(|e| {
                    tracing::error!(resource = %self.name, offset, len, "applying a peer write failed: {e}");
                    e.errno()
                })
            }
        };
        self.step(&mut self.lock(), Event::PeerRequestDone { peer_id, result })
    }

    /// Carries out deferred work from a context that cannot await.
    fn spawn_deferred(&self, deferred: Vec<Deferred>) {
        for d in deferred {
            match d {
                Deferred::Send(tx, frame) | Deferred::SendRequest(tx, frame, _) => {
                    // Requests here come from a cancelled future or a state change;
                    // a failed send is followed by the link's loss (PeerLost).
                    tokio::spawn(async move {
                        tx.send(frame).await;
                    });
                }
                Deferred::SendDetached(tx, frame) => self.congestion.send_detached(tx, frame),
                Deferred::SubmitPeer(pid) => {
                    tracing::error!(pid, "peer request released outside the peer path");
                }
                Deferred::BarrierFlush { epoch, .. } => {
                    tracing::error!(epoch, "barrier flush outside the peer path");
                }
                Deferred::PromoteDone(result) => self.promote_done(result),
            }
        }
    }

    /// Feeds one event to the engine at the current time and carries out its
    /// actions under the lock (`g`); returns what must be done after it is released.
    fn step(&self, g: &mut Inner, event: Event) -> Vec<Deferred> {
        let mut actions = Vec::with_capacity(3);
        g.engine.handle(self.now_ms(), event, &mut actions);
        self.primary_hint
            .store(g.engine.role() == Role::Primary, Ordering::Relaxed);
        self.run_actions(g, &mut actions)
    }

    /// Carries out the engine's actions under the lock; returns what must be done
    /// after it is released.
    fn run_actions(&self, inner: &mut Inner, actions: &mut Vec<Action>) -> Vec<Deferred> {
        let mut deferred = Vec::new();
        for action in actions.drain(..) {
            match action {
                Action::SubmitLocal(id) => {
                    if let Some(tx) = inner.slots.get_mut(&id).and_then(|s| s.go.take()) {
                        // The waiting future may have been dropped (client gone):
                        // its cancel guard reports the completion.
                        let _ = tx.send(());
                    }
                }
                Action::SendPeer(id) => {
                    let (Some(tx), Some(slot)) = (inner.peer_tx.clone(), inner.slots.get(&id))
                    else {
                        continue;
                    };
                    let frame = match slot.kind {
                        ReqKind::Flush => Frame::Flush { id },
                        kind => Frame::Data {
                            offset_bytes: slot.offset_bytes,
                            // Requests are split to MAX_PEER_REQUEST_BYTES before
                            // they reach the engine, so the length fits.
                            len: slot.len_bytes as u32,
                            request_id: id,
                            seq: id,
                            flags: match kind {
                                ReqKind::Discard => repl::DATA_TRIM,
                                // TRIM|ZEROES is not a valid frame: the peer writes
                                // zeroes allowing unmap whatever the client said.
                                ReqKind::Zeroes => repl::DATA_ZEROES,
                                _ if slot.fua => repl::DATA_FUA,
                                _ => 0,
                            },
                            digest: Digest::EMPTY,
                            payload: slot.data.clone().unwrap_or_default(),
                        },
                    };
                    deferred.push(Deferred::SendRequest(tx, frame, id));
                }
                Action::MarkOutOfSync {
                    offset_bytes,
                    len_bytes,
                } => {
                    if let Err(e) = inner.bitmap.set_range(offset_bytes, len_bytes) {
                        tracing::error!(resource = %self.name, "bitmap: {e}");
                    }
                }
                Action::Complete { id, result } => {
                    if let Some(mut slot) = inner.slots.remove(&id) {
                        if let Some(tx) = slot.done.take() {
                            let _ = tx.send(result);
                        }
                    }
                }
                Action::SubmitPeerRequest(pid) => deferred.push(Deferred::SubmitPeer(pid)),
                Action::AckPeer { peer_id, kind } => {
                    let work_kind = match kind {
                        AckKind::Recv => inner.peer_work.get(&peer_id).map(|w| w.kind),
                        _ => inner.peer_work.remove(&peer_id).map(|w| w.kind),
                    };
                    let Some(tx) = inner.peer_tx.clone() else {
                        continue;
                    };
                    let frame = match (kind, work_kind) {
                        (AckKind::Recv, _) => Frame::RecvAck {
                            request_id: peer_id,
                            seq: peer_id,
                        },
                        (AckKind::Write, Some(ReqKind::Flush)) => Frame::FlushAck { id: peer_id },
                        (AckKind::Write, _) => Frame::WriteAck {
                            request_id: peer_id,
                            seq: peer_id,
                        },
                        (AckKind::Neg(errno), _) => Frame::NegAck {
                            request_id: peer_id,
                            seq: peer_id,
                            errno: errno as u32,
                        },
                    };
                    deferred.push(Deferred::Send(tx, frame));
                }
                Action::SendBarrier { epoch } => {
                    if let Some(tx) = inner.peer_tx.clone() {
                        deferred.push(Deferred::Send(tx, Frame::Barrier { epoch }));
                    }
                }
                Action::FlushForBarrier { epoch, token } => {
                    deferred.push(Deferred::BarrierFlush { epoch, token })
                }
                Action::AckBarrier { epoch, count } => {
                    if let Some(tx) = inner.peer_tx.clone() {
                        deferred.push(Deferred::Send(tx, Frame::BarrierAck { epoch, count }));
                    }
                }
                Action::SendStateChangeRequest { role } => {
                    if let Some(tx) = inner.peer_tx.clone() {
                        let frame = Frame::StateChangeRequest {
                            role: role_code(role),
                            flags: 0,
                        };
                        deferred.push(Deferred::Send(tx, frame));
                    }
                }
                Action::SendStateChangeReply { reply } => {
                    if let Some(tx) = inner.peer_tx.clone() {
                        let frame = Frame::StateChangeReply {
                            ok: reply == ChangeReply::Granted,
                            reason: reply.reason().to_string(),
                        };
                        deferred.push(Deferred::Send(tx, frame));
                    }
                }
                Action::PromoteDone { result } => {
                    // The caller (`Resource::primary`) persists the superblock with
                    // its Primary flag; a keeper write racing it could drop the flag.
                    if let Ok(forced) = result {
                        deferred.extend(self.promoted(inner, forced));
                    }
                    deferred.push(Deferred::PromoteDone(result));
                }
                Action::AnnounceState => {
                    if let Some(tx) = inner.peer_tx.clone() {
                        let frame = Frame::State {
                            role: role_code(inner.engine.role()),
                            disk: disk_code(inner.engine.disk()),
                            flags: ahead_flag(inner.engine.conn()),
                            size_bytes: inner.engine.size_bytes(),
                        };
                        deferred.push(Deferred::Send(tx, frame));
                    }
                }
                Action::SendOutOfSync {
                    offset_bytes,
                    len_bytes,
                } => {
                    if let Some(tx) = inner.peer_tx.clone() {
                        // Writes are split to at most MAX_TRIM_PIECE_BYTES (256 MiB)
                        // before they reach the engine: the length fits.
                        let frame = Frame::OutOfSync {
                            offset_bytes,
                            len: len_bytes.min(u64::from(u32::MAX)) as u32,
                        };
                        deferred.push(Deferred::SendDetached(tx, frame));
                    }
                }
                Action::DropConnection { reason } => {
                    self.congestion.request(LinkRequest::Drop(reason))
                }
                Action::StartResync => self.congestion.request(LinkRequest::StartResync),
            }
        }
        deferred
    }

    async fn submit(
        &self,
        kind: ReqKind,
        offset_bytes: u64,
        len_bytes: u64,
        op: LocalOp,
    ) -> Result<Option<Vec<u8>>, IoError> {
        // The extents a write touches are in the on-disk activity log before it
        // reaches the disk; the hold ends when this request does.
        let _al_hold = if kind.is_write() {
            self.al_begin(offset_bytes, len_bytes).await?
        } else {
            None
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (go_tx, go_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (data, fua) = match &op {
            LocalOp::Write(d, fua) => (Some(d.clone()), *fua),
            _ => (None, false),
        };
        let deferred = {
            let mut g = self.lock();
            if matches!(kind, ReqKind::Write | ReqKind::Zeroes) {
                Self::sync_target_written(&mut g, offset_bytes, len_bytes);
            }
            g.slots.insert(
                id,
                Slot {
                    kind,
                    offset_bytes,
                    len_bytes,
                    data,
                    fua,
                    go: Some(go_tx),
                    done: Some(done_tx),
                },
            );
            if kind.is_write() && g.engine.watches_al_in_use() {
                self.note_al_in_use(&mut g);
            }
            let event = Event::Request {
                id,
                kind,
                offset_bytes,
                len_bytes,
            };
            self.step(&mut g, event)
        };
        let verify = matches!(op, LocalOp::Verify(_));
        let mut local_error = None;
        let mut data = None;
        // `go` fires when the engine submits the request; if the slot is removed
        // without it (refusal), the sender is dropped and we go straight to `done`.
        // While waiting for `go` (overlapping write), nothing is sent yet.
        let sends = self.send_all(deferred);
        let go = async { go_rx.await.is_ok() };
        // The frame queued for the peer goes out when the connection's writer task
        // runs: on the other worker if it is awake, else after this task's local
        // write. Yielding here to send it first was measured: it costs a wake of
        // the other worker per write (4.1 -> 5.6 context switches per QD1 write,
        // fewer IOPS), more than the overlap gains on this 2-core machine.
        let (_, go) = tokio::join!(sends, go);
        if go {
            // If this future is dropped mid-I/O (client gone), the guard still reports
            // a completion so the engine never keeps a request in flight forever.
            let guard = CancelGuard { volume: self, id };
            let mut result = self.local_or_peer(kind, offset_bytes, op).await;
            if kind == ReqKind::Resync {
                // Send while overlapping writes still wait: they follow it on the
                // link, so the peer applies them after this (older) data.
                result = match result {
                    Ok(Some(data)) if verify => self.send_verify(id, offset_bytes, data).await,
                    Ok(Some(data)) => self.send_resync(id, offset_bytes, len_bytes, data).await,
                    other => other,
                };
            }
            std::mem::forget(guard);
            let errno = match result {
                Ok(d) => {
                    data = d;
                    Ok(())
                }
                Err(e) => {
                    let errno = e.errno();
                    local_error = Some(e);
                    Err(errno)
                }
            };
            let deferred = self.step(&mut self.lock(), Event::LocalDone { id, result: errno });
            self.send_all(deferred).await;
        }
        let result = done_rx.await.map_err(|_| IoError::Shutdown)?;
        match result {
            Ok(()) => Ok(data),
            Err(refusal) => Err(local_error.unwrap_or_else(|| self.refusal_error(refusal))),
        }
    }

    /// Sends one resync chunk read by `local` (`data` empty: the range is a hole of
    /// the backing file, it reads as zeroes).
    async fn send_resync(
        &self,
        id: ReqId,
        offset_bytes: u64,
        len: u64,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, IoError> {
        debug_assert!(data.is_empty() || data.len() as u64 == len);
        let (tx, peer_zeroes) = {
            let mut g = self.lock();
            let tx = g.peer_tx.clone();
            if tx.is_some() {
                g.resync_inflight.insert(id, (offset_bytes, len));
            }
            (tx, g.peer_resync_zeroes)
        };
        // Zeroes go as a range without payload to a peer that knows the frame; the
        // target writes zeroes, so both disks read the same (DRBD 9's rs_is_zero /
        // P_RS_DEALLOCATED). A peer without it gets a hole's zeroes as data.
        let zero = peer_zeroes && data.iter().all(|&b| b == 0);
        let Some(tx) = tx else {
            return Ok(None);
        };
        let data = if data.is_empty() && !peer_zeroes {
            vec![0u8; len as usize]
        } else {
            data
        };
        // csums-alg: the checksum first; the peer asks for the data only if its
        // copy differs (ranges it asked for are sent as data).
        let csums = {
            let mut g = self.lock();
            let forced = g
                .resync_force_data
                .iter()
                .position(|&(o, l)| o == offset_bytes && l == len);
            match forced {
                Some(i) => {
                    g.resync_force_data.swap_remove(i);
                    None
                }
                None => g.csums,
            }
        };
        let frame = match csums {
            _ if zero => Frame::ResyncZeroes {
                offset_bytes,
                len: len as u32,
                id,
            },
            Some(alg) => Frame::ChecksumRequest {
                offset_bytes,
                len: len as u32,
                id,
                digest: alg.digest(&data),
            },
            None => Frame::ResyncData {
                offset_bytes,
                len: len as u32,
                id,
                payload: Bytes::from(data),
            },
        };
        if tx.send(frame).await {
            Ok(Some(Vec::new()))
        } else {
            self.lock().resync_inflight.remove(&id);
            Ok(None)
        }
    }

    /// Online verify of one chunk: keeps our digest and asks the peer for its own.
    async fn send_verify(
        &self,
        id: ReqId,
        offset_bytes: u64,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let len = data.len() as u64;
        let tx = {
            let mut g = self.lock();
            let Some(alg) = g.verify_alg else {
                return Ok(None);
            };
            let digest = alg.digest(&data);
            let tx = g.peer_tx.clone();
            if let (Some(v), true) = (g.verify.as_mut(), tx.is_some()) {
                v.waiting.insert(id, (offset_bytes, len, digest));
            }
            tx
        };
        let Some(tx) = tx else {
            return Ok(None);
        };
        let frame = Frame::VerifyRequest {
            offset_bytes,
            len: len as u32,
            id,
        };
        if tx.send(frame).await {
            Ok(Some(Vec::new()))
        } else {
            if let Some(v) = self.lock().verify.as_mut() {
                v.waiting.remove(&id);
            }
            Ok(None)
        }
    }

    /// Runs online verify over the whole device (this node is VerifyS): compares
    /// every chunk's digest with the peer's, marks differing chunks out of sync on
    /// both nodes. Returns the out-of-sync bytes found.
    pub async fn run_verify(self: &Arc<Self>) -> Result<u64, String> {
        let (size, tx) = {
            let mut g = self.lock();
            if g.verify_alg.is_none() {
                return Err("online verify needs `verify-alg` in the net section".into());
            }
            if g.engine.conn() != ConnState::Connected {
                return Err(format!(
                    "online verify needs a Connected peer (connection is {})",
                    g.engine.conn()
                ));
            }
            if !g.engine.disk().is_usable() || !g.engine.peer().1.is_usable() {
                return Err("online verify needs usable data on both nodes".into());
            }
            if g.verify.is_some() {
                return Err("online verify is already running".into());
            }
            g.verify = Some(VerifyRun {
                waiting: HashMap::new(),
                done_bytes: 0,
                found_bytes: 0,
                started_ms: self.now_ms(),
            });
            (g.engine.size_bytes(), g.peer_tx.clone())
        };
        if let Some(tx) = &tx {
            tx.send(self.state_frame_with(STATE_FLAG_VERIFY_START))
                .await;
        }
        tracing::info!(resource = %self.name, "online verify started: {size} bytes");
        let mut offset = 0u64;
        let result = loop {
            if offset >= size {
                break Ok(());
            }
            if !self.snapshot().conn.is_connected() {
                break Err("the connection was lost during online verify".to_string());
            }
            let waiting = self.lock().verify.as_ref().map_or(0, |v| v.waiting.len());
            if waiting >= VERIFY_MAX_IN_FLIGHT {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
            let len = VERIFY_CHUNK_BYTES.min(size - offset);
            match self
                .submit(ReqKind::Resync, offset, len, LocalOp::Verify(len as usize))
                .await
            {
                Ok(Some(_)) => offset += len,
                Ok(None) => break Err("the connection was lost during online verify".into()),
                Err(e) => break Err(format!("online verify read at {offset} failed: {e}")),
            }
        };
        // Wait (bounded) for the last replies.
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while self
            .lock()
            .verify
            .as_ref()
            .is_some_and(|v| !v.waiting.is_empty())
            && Instant::now() < deadline
            && self.snapshot().conn.is_connected()
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let run = self.lock().verify.take();
        if let Some(tx) = &tx {
            tx.send(self.state_frame_with(STATE_FLAG_VERIFY_DONE)).await;
        }
        self.meta_changed.notify_one();
        let found = run.map_or(0, |r| r.found_bytes);
        result?;
        tracing::info!(
            resource = %self.name,
            "online verify done: {found} bytes ({} 4k blocks) out of sync",
            found.div_ceil(4096)
        );
        Ok(found)
    }

    /// Sets the resync checksum and online verify algorithms.
    pub fn set_digests(
        &self,
        csums: Option<crate::engine::digest::BlockDigest>,
        verify: Option<crate::engine::digest::BlockDigest>,
    ) {
        let mut g = self.lock();
        g.csums = csums;
        g.verify_alg = verify;
    }

    /// Online verify progress: (done bytes, found bytes, started ms) while running.
    pub fn verify_progress(&self) -> Option<(u64, u64, u64)> {
        self.lock()
            .verify
            .as_ref()
            .map(|v| (v.done_bytes, v.found_bytes, v.started_ms))
    }

    /// Reads our copy of a range for the peer (verify, csums); None on error.
    async fn read_for_peer(&self, offset_bytes: u64, len: u32) -> Option<Vec<u8>> {
        match self.storage.read_at(offset_bytes, len as usize).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(resource = %self.name, offset_bytes, "read for the peer failed: {e}");
                None
            }
        }
    }

    /// Sends deferred frames in order (awaiting queue space: back-pressure).
    async fn send_all(&self, deferred: Vec<Deferred>) {
        for d in deferred {
            match d {
                Deferred::Send(tx, frame) => {
                    tx.send(frame).await;
                }
                Deferred::SendRequest(tx, frame, id) => {
                    if !tx.send(frame).await {
                        self.peer_send_failed(id);
                    }
                }
                Deferred::SendDetached(tx, frame) => self.congestion.send_detached(tx, frame),
                Deferred::SubmitPeer(pid) => {
                    tracing::error!(pid, "peer request released on the application path");
                }
                Deferred::BarrierFlush { epoch, .. } => {
                    tracing::error!(epoch, "barrier flush on the application path");
                }
                Deferred::PromoteDone(result) => self.promote_done(result),
            }
        }
    }

    /// A request could not be handed to the peer: the peer will never write it.
    fn peer_send_failed(&self, id: ReqId) {
        tracing::warn!(resource = %self.name, id, "could not send a request to the peer: marked out of sync");
        let deferred = self.step(&mut self.lock(), Event::PeerFailed { id });
        self.spawn_deferred(deferred);
    }

    fn refusal_error(&self, refusal: Refusal) -> IoError {
        match refusal {
            Refusal::NotPrimary(role) => IoError::NotPermitted(format!(
                "resource {} is {role} on this node: only the Primary serves I/O",
                self.name
            )),
            Refusal::NoUsableData(disk) => IoError::Io(std::io::Error::other(format!(
                "resource {}: no usable data (disk {disk})",
                self.name
            ))),
            Refusal::OutOfRange => IoError::OutOfRange {
                offset_bytes: 0,
                len_bytes: 0,
                size_bytes: self.storage.size_bytes(),
            },
            Refusal::LocalError(errno) => IoError::Io(std::io::Error::from_raw_os_error(errno)),
        }
    }

    async fn local(&self, offset_bytes: u64, op: LocalOp) -> Result<Option<Vec<u8>>, IoError> {
        match op {
            LocalOp::Read(len) if let Some(r) = self.sync_target_read(offset_bytes, len).await => {
                r.map(Some)
            }
            LocalOp::Resync(len)
                if len as u64 >= ZERO_CHECK_MIN_BYTES
                    && self.reads_as_zero(offset_bytes, len as u64).await =>
            {
                // A hole: nothing to read (reading holes through the page cache
                // costs a memset per page); `send_resync` sends it as zeroes.
                Ok(Some(Vec::new()))
            }
            LocalOp::Read(len) | LocalOp::Resync(len) | LocalOp::Verify(len) => {
                self.storage.read_at(offset_bytes, len).await.map(Some)
            }
            LocalOp::Write(data, fua) => self
                .storage
                .write_at(offset_bytes, data, fua)
                .await
                .map(|_| None),
            LocalOp::Flush => self.storage.flush().await.map(|_| None),
            LocalOp::Discard(len) => self.storage.discard(offset_bytes, len).await.map(|_| None),
            LocalOp::Zeroes(len, unmap) => self
                .storage
                .write_zeroes(offset_bytes, len, unmap)
                .await
                .map(|_| None),
        }
    }

    /// Whether the whole range is known to read as zeroes on the backing disk (a
    /// hole by SEEK_DATA/SEEK_HOLE; block devices never say so). Errors mean no.
    async fn reads_as_zero(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        match self.storage.block_status(offset_bytes, len_bytes).await {
            Ok(extents) => {
                extents.iter().all(|e| e.zero || e.hole)
                    && extents.iter().map(|e| e.len_bytes).sum::<u64>() >= len_bytes
            }
            Err(_) => false,
        }
    }

    /// Flushes the backing disk directly, whatever the role (used by `down`).
    pub async fn flush_storage(&self) -> Result<(), IoError> {
        self.storage.flush().await
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), IoError> {
        IoError::check_range(offset_bytes, len_bytes, self.storage.size_bytes())
    }
}

/// Smallest resync chunk whose allocation is asked before it is read: for the
/// scattered small chunks of a smart resync the extra lseek costs more than the
/// read it might save.
const ZERO_CHECK_MIN_BYTES: u64 = 64 * 1024;

/// Locks shared meta-data; a poisoned lock (a panic while holding it) still holds a
/// coherent copy: the writers replace whole fields.
pub fn lock_md(md: &Mutex<MetaData>) -> MutexGuard<'_, MetaData> {
    md.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports a cancelled local request to the engine if the future is dropped.
struct CancelGuard<'a> {
    volume: &'a Volume,
    id: ReqId,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        let event = Event::LocalDone {
            id: self.id,
            result: Err(libc::ECANCELED),
        };
        let deferred = self.volume.step(&mut self.volume.lock(), event);
        self.volume.spawn_deferred(deferred);
    }
}

impl BlockIo for Volume {
    fn size_bytes(&self) -> u64 {
        self.storage.size_bytes()
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move {
            self.check_range(offset, len as u64)?;
            let data = self
                .submit(ReqKind::Read, offset, len as u64, LocalOp::Read(len))
                .await?;
            data.ok_or(IoError::Invalid("read returned no data".into()))
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_range(offset, data.len() as u64)?;
            // A Primary SyncTarget writes out-of-sync blocks whole (`_widened` is
            // held until the write completes).
            let (offset, data, _widened) = self.sync_target_widen_write(offset, data).await?;
            let len = data.len() as u64;
            // Split to the peer's frame limit; the pieces do not overlap, so the
            // engine runs them side by side.
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(MAX_PEER_REQUEST_BYTES);
                let piece = data.slice(done as usize..(done + n) as usize);
                self.submit(ReqKind::Write, offset + done, n, LocalOp::Write(piece, fua))
                    .await?;
                done += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.submit(ReqKind::Flush, 0, 0, LocalOp::Flush)
                .await
                .map(|_| ())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_range(offset, len)?;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(MAX_TRIM_PIECE_BYTES);
                self.submit(ReqKind::Discard, offset + done, n, LocalOp::Discard(n))
                    .await?;
                done += n;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_range(offset, len)?;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(MAX_TRIM_PIECE_BYTES);
                self.submit(
                    ReqKind::Zeroes,
                    offset + done,
                    n,
                    LocalOp::Zeroes(n, may_unmap),
                )
                .await?;
                done += n;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            {
                let g = self.lock();
                if g.engine.role() != Role::Primary {
                    return Err(self.refusal_error(Refusal::NotPrimary(g.engine.role())));
                }
                if let Some(extents) = Self::sync_target_block_status(&g, offset, len) {
                    return Ok(extents);
                }
            }
            self.storage.block_status(offset, len).await
        })
    }

    fn flush_covers_all_handles(&self) -> bool {
        self.storage.flush_covers_all_handles()
    }
}
