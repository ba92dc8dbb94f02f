//! The activity log on the write path (driver side of [`crate::meta::al`]).
//!
//! Owns the in-memory [`ActivityLog`] of a Primary and the rule that makes it useful
//! after a crash: **an extent is in the on-disk activity log before the first write
//! to it reaches the disk**. A write to a hot extent (the common case: a working set
//! inside `al-extents` x 4 MiB) costs two uncontended mutex operations and no
//! meta-data I/O. A write to a cold extent waits for one AL transaction (4 KiB,
//! durable on its range). Transactions are written one at a time, and every cold extent
//! requested while one is being written joins the next one (batching).
//!
//! A transaction is one 4 KiB write made durable on its own range (`RWF_DSYNC`):
//! it does not write back the data of an internal meta-data's backing file. Only a
//! transaction that **evicts** an extent of the durable log needs more, and the
//! caller's `before_eviction` provides it before the transaction is written:
//! - the dirty bitmap pages, durable, so a bit set for a write to an evicted extent
//!   is on disk: after a crash the on-disk bitmap plus the replayed AL extents cover
//!   every block that may differ from the peer;
//! - a flush of the data, so the completed writes to the evicted extent are on disk
//!   (after a crash only hot extents are resynced). This is DRBD's pre-flush of the
//!   meta-data write, and it is what external meta-data needs: there an fdatasync of
//!   the meta-data file does not touch the data.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::meta::{self, ActivityLog, AlTransaction, MetaData, MetaError};

struct AlState {
    log: ActivityLog,
    /// Extents of the transaction being written (hot in memory, not yet durable).
    pending: HashSet<u32>,
    /// Cold extents waited for: the next transaction activates them together.
    wanted: BTreeSet<u32>,
    /// The hot set of the newest durable transaction: a transaction that lacks one
    /// of these evicts it.
    durable: HashSet<u32>,
}

/// The activity log of one volume.
pub struct AlGate {
    md: MetaData,
    state: Mutex<AlState>,
    /// Held while a transaction is written (one at a time).
    writer: tokio::sync::Mutex<()>,
    /// Woken when writes end (an extent may have become evictable).
    idle: tokio::sync::Notify,
    /// Tasks waiting on `idle` (writes only notify when there are some).
    idle_waiters: AtomicUsize,
    writes: AtomicU64,
    evictions: AtomicU64,
}

/// Writes in flight on some extents; ends them when dropped.
pub struct AlHold<'a> {
    gate: &'a AlGate,
    extents: RangeInclusive<u32>,
}

impl Drop for AlHold<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        for e in self.extents.clone() {
            if let Err(e) = st.log.end_io(e) {
                tracing::error!("activity log: {e}");
            }
        }
        drop(st);
        // SeqCst pairs with the waiter's increment before its re-check: either it
        // sees the extent idle, or this sees it waiting.
        if self.gate.idle_waiters.load(Ordering::SeqCst) > 0 {
            self.gate.idle.notify_waiters();
        }
    }
}

impl AlGate {
    /// The gate over `md`'s activity log, with the hot set of its newest transaction.
    pub fn new(md: MetaData) -> Result<AlGate, MetaError> {
        let log = ActivityLog::from_meta(&md)?;
        let durable = log.hot_extents().into_iter().collect();
        Ok(AlGate {
            md,
            state: Mutex::new(AlState {
                log,
                pending: HashSet::new(),
                wanted: BTreeSet::new(),
                durable,
            }),
            writer: tokio::sync::Mutex::new(()),
            idle: tokio::sync::Notify::new(),
            idle_waiters: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AlState> {
        // Held for a few instructions, never across an await: a poisoned lock only
        // means a panic elsewhere; the state itself stays coherent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Extents with writes in flight (`congestion-extents`).
    pub fn extents_in_use(&self) -> u32 {
        self.lock().log.extents_in_use()
    }

    /// Number of AL transactions written since `up`.
    pub fn transactions_written(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of those transactions that evicted extents (each after a data flush).
    pub fn evictions_written(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Makes the extents of `[offset, offset+len)` hot and durable in the AL, then
    /// counts a write in flight on each until the returned hold is dropped.
    /// `before_eviction` runs before a transaction that evicts extents is written:
    /// it makes the bitmap durable and flushes the data (see the module doc).
    pub async fn begin<F, Fut>(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        before_eviction: F,
    ) -> Result<AlHold<'_>, MetaError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), MetaError>>,
    {
        let extents = ActivityLog::extents_of(offset_bytes, len_bytes);
        loop {
            if let Some(hold) = self.try_hold(&extents) {
                return Ok(hold);
            }
            {
                let mut st = self.lock();
                st.wanted.extend(extents.clone());
            }
            let writer = self.writer.lock().await;
            if let Some(hold) = self.try_hold(&extents) {
                return Ok(hold);
            }
            // Activate every extent waited for, or at least ours if they do not fit.
            let activated = {
                let mut st = self.lock();
                let mut batch: Vec<u32> = st.wanted.iter().copied().collect();
                let mut result = st.log.activate(&batch);
                if matches!(result, Err(MetaError::AlFull { .. })) && batch.len() > 1 {
                    batch = extents.clone().collect();
                    result = st.log.activate(&batch);
                }
                match result {
                    Ok(tr) => {
                        for e in &batch {
                            st.wanted.remove(e);
                        }
                        if tr.is_some() {
                            st.pending.extend(batch.iter().copied());
                        }
                        Some((tr, batch))
                    }
                    Err(MetaError::AlFull { .. }) => None,
                    Err(e) => return Err(e),
                }
            };
            let Some((tr, batch)) = activated else {
                // Every hot extent has writes in flight: wait for one to end.
                drop(writer);
                let idle = self.idle.notified();
                tokio::pin!(idle);
                self.idle_waiters.fetch_add(1, Ordering::SeqCst);
                if self.try_hold(&extents).is_none() {
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(50), idle).await;
                }
                self.idle_waiters.fetch_sub(1, Ordering::SeqCst);
                continue;
            };
            if let Some(tr) = tr {
                let written = self.write(tr, &before_eviction).await;
                let mut st = self.lock();
                for e in &batch {
                    st.pending.remove(e);
                }
                drop(st);
                if let Err(e) = written {
                    tracing::error!("activity log transaction failed: {e}");
                    return Err(e);
                }
            }
            drop(writer);
        }
    }

    /// Writes `tr` (the caller holds `writer`), after `before_eviction` when it drops
    /// an extent of the durable log.
    async fn write<F, Fut>(&self, tr: AlTransaction, before_eviction: &F) -> Result<(), MetaError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), MetaError>>,
    {
        let evicts = {
            let st = self.lock();
            // `tr.extents` is ascending (`ActivityLog::hot_extents`).
            st.durable
                .iter()
                .any(|e| tr.extents.binary_search(e).is_err())
        };
        if evicts {
            before_eviction().await?;
        }
        let md = self.md.clone();
        let tr =
            tokio::task::spawn_blocking(move || meta::al::write_transaction(&md, &tr).map(|()| tr))
                .await
                .map_err(|e| MetaError::InvalidArgument(format!("AL writer: {e}")))??;
        self.lock().durable = tr.extents.iter().copied().collect();
        self.writes.fetch_add(1, Ordering::Relaxed);
        if evicts {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The hold, if every extent is hot and durable.
    fn try_hold(&self, extents: &RangeInclusive<u32>) -> Option<AlHold<'_>> {
        let mut st = self.lock();
        let ready = extents
            .clone()
            .all(|e| st.log.is_hot(e) && !st.pending.contains(&e));
        if !ready {
            return None;
        }
        for e in extents.clone() {
            // The extent is hot (checked above under the same lock).
            if let Err(e) = st.log.begin_io(e) {
                tracing::error!("activity log: {e}");
            }
        }
        Some(AlHold {
            gate: self,
            extents: extents.clone(),
        })
    }

    /// Empties the log of idle extents and writes the transaction (clean demotion or
    /// `down`: nothing to resync from the AL after this), after `before_eviction`.
    pub async fn retire_idle<F, Fut>(&self, before_eviction: F) -> Result<(), MetaError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), MetaError>>,
    {
        let _writer = self.writer.lock().await;
        let tr = self.lock().log.retire_idle();
        match tr {
            Some(tr) => self.write(tr, &before_eviction).await,
            None => Ok(()),
        }
    }
}
