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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use rdb_protocol::repl::{self, Digest, Frame};
use tokio::sync::oneshot;

use crate::engine::core::{
    AckKind, Action, Counters, Engine, Event, PeerProgress, Protocol, Refusal, ReqId, ReqKind,
};
use crate::engine::state::{ConnState, DiskState, Role};
use crate::engine::StateChangeError;
use crate::meta::Bitmap;
use crate::storage::{BlockIo, Extent, IoError, IoFuture};

/// Largest request sent to the peer in one frame; larger writes are split.
pub const MAX_PEER_REQUEST_BYTES: u64 = repl::MAX_PAYLOAD_BYTES as u64;

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
    may_unmap: bool,
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
}

/// `State` frame flag: the sender starts a resync as SyncSource.
pub const STATE_FLAG_SYNC_START: u32 = 1;
/// `State` frame flag: the sender finished its resync as SyncSource.
pub const STATE_FLAG_SYNC_DONE: u32 = 2;

/// Work collected under the lock, carried out after it is released.
enum Deferred {
    Send(Arc<dyn PeerTx>, Frame<Bytes>),
    /// An application request for the peer: if it cannot be queued, the peer
    /// will never answer it, so it is failed towards the peer (marked out of sync).
    SendRequest(Arc<dyn PeerTx>, Frame<Bytes>, ReqId),
    SubmitPeer(u64),
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
}

/// A replicated volume of one resource on this node.
pub struct Volume {
    name: String,
    storage: Arc<dyn BlockIo>,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    epoch: Instant,
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
    ) -> Volume {
        let size_bytes = storage.size_bytes();
        Volume {
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
            }),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
        }
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

    /// Promotes this node (see [`Engine::promote`]); returns whether data was forced.
    pub fn promote(&self, force: bool) -> Result<bool, StateChangeError> {
        self.lock().engine.promote(force)
    }

    /// Demotes this node.
    pub fn demote(&self) -> Result<(), StateChangeError> {
        self.lock().engine.demote()
    }

    /// A snapshot for status.
    pub fn snapshot(&self) -> VolumeSnapshot {
        let g = self.lock();
        let (peer_role, peer_disk) = g.engine.peer();
        VolumeSnapshot {
            role: g.engine.role(),
            disk: g.engine.disk(),
            conn: g.engine.conn(),
            peer_role,
            peer_disk,
            counters: g.engine.counters(),
            size_bytes: g.engine.size_bytes(),
            out_of_sync_bytes: g.bitmap.out_of_sync_bytes(),
            resync_bytes_total: g.resync_bytes_total,
        }
    }

    /// Runs `f` on the dirty bitmap (persistence, resync).
    pub fn with_bitmap<T>(&self, f: impl FnOnce(&mut Bitmap) -> T) -> T {
        f(&mut self.lock().bitmap)
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
            flags,
            size_bytes: g.engine.size_bytes(),
        }
    }

    /// What this node brings to a resync decision.
    pub fn sync_view(&self) -> crate::engine::sync::SyncView {
        let g = self.lock();
        crate::engine::sync::SyncView {
            role: g.engine.role(),
            disk: g.engine.disk(),
            oos_blocks: g.bitmap.count_set(),
        }
    }

    /// Starts a resync as SyncSource (`full`: every block) and tells the peer.
    pub async fn start_sync_source(&self, full: bool) -> bool {
        let tx = {
            let mut g = self.lock();
            if full {
                g.bitmap.set_all();
            }
            g.engine.start_sync(true);
            g.peer_tx.clone()
        };
        match tx {
            Some(tx) => tx.send(self.state_frame_with(STATE_FLAG_SYNC_START)).await,
            None => false,
        }
    }

    /// Ends a resync as SyncSource and tells the peer its data is now UpToDate.
    pub async fn finish_sync_source(&self) {
        let tx = {
            let mut g = self.lock();
            g.engine.finish_sync();
            g.peer_tx.clone()
        };
        if let Some(tx) = tx {
            tx.send(self.state_frame_with(STATE_FLAG_SYNC_DONE)).await;
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
    pub fn attach_peer(&self, tx: Arc<dyn PeerTx>, role: Role, disk: DiskState) {
        let mut g = self.lock();
        g.peer_tx = Some(tx);
        let deferred = self.step(&mut g, Event::PeerConnected { role, disk });
        drop(g);
        self.spawn_deferred(deferred);
    }

    /// The peer is gone (`admin` = an administrator's `disconnect`).
    pub fn detach_peer(&self, admin: bool) {
        let mut g = self.lock();
        g.peer_tx = None;
        g.peer_work.clear();
        let event = if admin {
            Event::Disconnect
        } else {
            Event::PeerLost
        };
        let deferred = self.step(&mut g, event);
        drop(g);
        self.spawn_deferred(deferred);
    }

    /// Handles a frame received from the peer. Requests of the peer are applied
    /// here, in arrival order, before the next frame is read: on the Secondary this
    /// is the whole data path (no task hop per write), and a slow disk slows the
    /// link down (back-pressure through TCP) instead of queueing without bound.
    pub async fn on_frame(self: &Arc<Self>, frame: Frame<Bytes>) {
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
            } => {
                let work = PeerWork {
                    kind: ReqKind::Write,
                    offset_bytes,
                    len_bytes: u64::from(len),
                    payload: Some(payload),
                    fua: false,
                };
                let mut g = self.lock();
                g.peer_work.insert(id, work);
                g.resync_bytes_total += u64::from(len);
                Event::PeerRequest {
                    peer_id: id,
                    kind: ReqKind::Write,
                    offset_bytes,
                    len_bytes: u64::from(len),
                }
            }
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
                let mut g = self.lock();
                if flags & STATE_FLAG_SYNC_START != 0 {
                    g.engine.start_sync(false);
                    g.bitmap.clear_all();
                }
                if flags & STATE_FLAG_SYNC_DONE != 0 {
                    g.engine.finish_sync();
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
                    if let Some(tx) = tx {
                        tokio::spawn(async move {
                            tx.send(frame).await;
                        });
                    }
                }
                Event::PeerState {
                    role: role_from_code(role),
                    disk: disk_from_code(disk),
                }
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
                Deferred::Send(tx, frame) => {
                    tx.send(frame).await;
                }
                Deferred::SendRequest(tx, frame, id) => {
                    if !tx.send(frame).await {
                        self.peer_send_failed(id);
                    }
                }
            }
        }
    }

    /// Applies one request of the peer to the local disk and reports it.
    async fn apply_peer_request(&self, peer_id: u64) -> Vec<Deferred> {
        let work = {
            let mut g = self.lock();
            g.peer_work
                .get_mut(&peer_id)
                .map(|w| (w.kind, w.offset_bytes, w.len_bytes, w.payload.take(), w.fua))
        };
        let result = match work {
            None => Err(libc::ECANCELED),
            Some((kind, offset, len, payload, fua)) => {
                let r = match kind {
                    ReqKind::Write => match payload {
                        Some(data) => self.storage.write_at(offset, data, fua).await,
                        None => Err(IoError::Invalid("peer write without payload".into())),
                    },
                    ReqKind::Flush => self.storage.flush().await,
                    ReqKind::Discard => self.storage.discard(offset, len).await,
                    ReqKind::Zeroes => self.storage.write_zeroes(offset, len, true).await,
                    ReqKind::Read | ReqKind::Resync => Err(IoError::Invalid("peer read".into())),
                };
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
                Deferred::SubmitPeer(pid) => {
                    tracing::error!(pid, "peer request released outside the peer path");
                }
            }
        }
    }

    /// Feeds one event to the engine at the current time and carries out its
    /// actions under the lock (`g`); returns what must be done after it is released.
    fn step(&self, g: &mut Inner, event: Event) -> Vec<Deferred> {
        let mut actions = Vec::with_capacity(3);
        g.engine.handle(self.now_ms(), event, &mut actions);
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
                                ReqKind::Zeroes if slot.may_unmap => {
                                    repl::DATA_ZEROES | repl::DATA_TRIM
                                }
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (go_tx, go_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (data, fua, may_unmap) = match &op {
            LocalOp::Write(d, fua) => (Some(d.clone()), *fua, false),
            LocalOp::Zeroes(_, unmap) => (None, false, *unmap),
            _ => (None, false, false),
        };
        let deferred = {
            let mut g = self.lock();
            g.slots.insert(
                id,
                Slot {
                    kind,
                    offset_bytes,
                    len_bytes,
                    data,
                    fua,
                    may_unmap,
                    go: Some(go_tx),
                    done: Some(done_tx),
                },
            );
            let event = Event::Request {
                id,
                kind,
                offset_bytes,
                len_bytes,
            };
            self.step(&mut g, event)
        };
        let mut local_error = None;
        let mut data = None;
        // `go` fires when the engine submits the request; if the slot is removed
        // without it (refusal), the sender is dropped and we go straight to `done`.
        // While waiting for `go` (overlapping write), nothing is sent yet.
        let sends = self.send_all(deferred);
        let go = async { go_rx.await.is_ok() };
        let (_, go) = tokio::join!(sends, go);
        if go {
            // If this future is dropped mid-I/O (client gone), the guard still reports
            // a completion so the engine never keeps a request in flight forever.
            let guard = CancelGuard { volume: self, id };
            let mut result = self.local(offset_bytes, op).await;
            if kind == ReqKind::Resync {
                // Send while overlapping writes still wait: they follow it on the
                // link, so the peer applies them after this (older) data.
                result = match result {
                    Ok(Some(data)) => self.send_resync(id, offset_bytes, data).await,
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

    async fn send_resync(
        &self,
        id: ReqId,
        offset_bytes: u64,
        data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let len = data.len() as u64;
        let tx = {
            let mut g = self.lock();
            let tx = g.peer_tx.clone();
            if tx.is_some() {
                g.resync_inflight.insert(id, (offset_bytes, len));
            }
            tx
        };
        let Some(tx) = tx else {
            return Ok(None);
        };
        let frame = Frame::ResyncData {
            offset_bytes,
            len: len as u32,
            id,
            payload: Bytes::from(data),
        };
        if tx.send(frame).await {
            Ok(Some(Vec::new()))
        } else {
            self.lock().resync_inflight.remove(&id);
            Ok(None)
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
                Deferred::SubmitPeer(pid) => {
                    tracing::error!(pid, "peer request released on the application path");
                }
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
            LocalOp::Read(len) | LocalOp::Resync(len) => {
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

    /// Flushes the backing disk directly, whatever the role (used by `down`).
    pub async fn flush_storage(&self) -> Result<(), IoError> {
        self.storage.flush().await
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), IoError> {
        IoError::check_range(offset_bytes, len_bytes, self.storage.size_bytes())
    }
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
            let len = data.len() as u64;
            self.check_range(offset, len)?;
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
                let n = (len - done).min(u64::from(u32::MAX) & !4095);
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
                let n = (len - done).min(u64::from(u32::MAX) & !4095);
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
            }
            self.storage.block_status(offset, len).await
        })
    }

    fn flush_covers_all_handles(&self) -> bool {
        self.storage.flush_covers_all_handles()
    }
}
