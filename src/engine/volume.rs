//! The volume: the driver around the engine, and what frontends serve.
//!
//! [`Volume`] implements [`BlockIo`], so the NBD server and the FUSE frontend serve a
//! replicated resource exactly as they would serve a file. Each call becomes an
//! [`Event::Request`] for the [`Engine`]; the engine answers with actions that this
//! driver carries out: the request's own future performs its local I/O when the
//! engine says `SubmitLocal`, and returns when the engine says `Complete`. Requests
//! held back by the engine (overlapping writes) wait on a one-shot signal.
//!
//! The engine and the table of waiting requests sit behind one mutex held only for
//! the few instructions of a state transition, never across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::engine::core::{Action, Counters, Engine, Event, Protocol, Refusal, ReqId, ReqKind};
use crate::engine::state::{ConnState, DiskState, Role};
use crate::engine::StateChangeError;
use crate::storage::{BlockIo, Extent, IoError, IoFuture};

/// One request's rendezvous with the engine.
struct Slot {
    /// Fired when the engine submits the request to the local disk.
    go: Option<oneshot::Sender<()>>,
    /// Fired when the engine completes the request.
    done: Option<oneshot::Sender<Result<(), Refusal>>>,
}

struct Inner {
    engine: Engine,
    slots: HashMap<ReqId, Slot>,
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
    /// Counters.
    pub counters: Counters,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// The operation a request carries to the local disk.
enum LocalOp {
    Read(usize),
    Write(Bytes, bool),
    Flush,
    Discard(u64),
    Zeroes(u64, bool),
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

impl Volume {
    /// A volume named `name` over `storage` (the data area), with the disk state read
    /// from meta-data.
    pub fn new(name: &str, storage: Arc<dyn BlockIo>, disk: DiskState) -> Volume {
        let size_bytes = storage.size_bytes();
        Volume {
            name: name.to_string(),
            storage,
            inner: Mutex::new(Inner {
                engine: Engine::new(size_bytes, disk, Protocol::C),
                slots: HashMap::new(),
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
        // A panic while holding the lock leaves the engine in a state we cannot
        // trust; poisoning is propagated as a panic of this task only.
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
        VolumeSnapshot {
            role: g.engine.role(),
            disk: g.engine.disk(),
            conn: g.engine.conn(),
            counters: g.engine.counters(),
            size_bytes: g.engine.size_bytes(),
        }
    }

    /// Carries out the engine's actions (called with the lock held; only signals).
    fn run_actions(inner: &mut Inner, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::SubmitLocal(id) => {
                    if let Some(tx) = inner.slots.get_mut(&id).and_then(|s| s.go.take()) {
                        // The waiting future may have been dropped (client gone):
                        // then the request still runs to keep the engine consistent.
                        let _ = tx.send(());
                    }
                }
                Action::Complete { id, result } => {
                    if let Some(mut slot) = inner.slots.remove(&id) {
                        if let Some(tx) = slot.done.take() {
                            let _ = tx.send(result);
                        }
                    }
                }
                other => tracing::error!("no peer link to carry out {other:?}"),
            }
        }
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
        {
            let mut g = self.lock();
            g.slots.insert(
                id,
                Slot {
                    go: Some(go_tx),
                    done: Some(done_tx),
                },
            );
            let mut actions = Vec::with_capacity(2);
            let now_ms = self.now_ms();
            g.engine.handle(
                now_ms,
                Event::Request {
                    id,
                    kind,
                    offset_bytes,
                    len_bytes,
                },
                &mut actions,
            );
            Self::run_actions(&mut g, &mut actions);
        }
        let mut local_error = None;
        let mut data = None;
        // `go` fires when the engine submits the request; if the slot is removed
        // without it (refusal), the sender is dropped and we go straight to `done`.
        if go_rx.await.is_ok() {
            // If this future is dropped mid-I/O (client gone), the guard still reports
            // a completion so the engine never keeps a request in flight forever.
            let guard = CancelGuard { volume: self, id };
            let result = self.local(offset_bytes, op).await;
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
            let mut g = self.lock();
            let mut actions = Vec::with_capacity(2);
            let now_ms = self.now_ms();
            g.engine
                .handle(now_ms, Event::LocalDone { id, result: errno }, &mut actions);
            Self::run_actions(&mut g, &mut actions);
        }
        let result = done_rx.await.map_err(|_| IoError::Shutdown)?;
        match result {
            Ok(()) => Ok(data),
            Err(refusal) => Err(local_error.unwrap_or_else(|| self.refusal_error(refusal))),
        }
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
            LocalOp::Read(len) => self.storage.read_at(offset_bytes, len).await.map(Some),
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
        let mut g = self.volume.lock();
        let mut actions = Vec::new();
        let now_ms = self.volume.now_ms();
        g.engine.handle(
            now_ms,
            Event::LocalDone {
                id: self.id,
                result: Err(libc::ECANCELED),
            },
            &mut actions,
        );
        Volume::run_actions(&mut g, &mut actions);
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
            self.submit(ReqKind::Write, offset, len, LocalOp::Write(data, fua))
                .await
                .map(|_| ())
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
            self.submit(ReqKind::Discard, offset, len, LocalOp::Discard(len))
                .await
                .map(|_| ())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_range(offset, len)?;
            self.submit(
                ReqKind::Zeroes,
                offset,
                len,
                LocalOp::Zeroes(len, may_unmap),
            )
            .await
            .map(|_| ())
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
