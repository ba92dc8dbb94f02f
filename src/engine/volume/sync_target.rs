//! A SyncTarget that is Primary (DRBD allows promoting a SyncTarget whose peer is
//! UpToDate and connected): the application's I/O while the resync still runs.
//!
//! Owns the three rules that keep the application's view equal to the source's:
//! - **reads** of a range with any block still out of sync go to the peer (the
//!   Diskless node's forwarded read: a `ResyncRequest` with `READ_ID_BIT`, served
//!   by the source in frame order, after every write we sent before);
//! - **writes** clear the bits of the blocks they cover entirely before they are
//!   submitted (they go to both disks, so those blocks are in sync once they
//!   complete; a failure marks them again). A write covering part of an
//!   out-of-sync block first fetches that block from the peer and writes it whole;
//! - **resync data** arriving later for a block written meanwhile is not applied
//!   to it: only the runs whose bits are still set are written (an application
//!   write in flight when it arrives waits in the engine until it is applied).

use super::*;
use crate::meta::layout::BLOCK_SIZE_BYTES;

impl Volume {
    /// Whether this node is a Primary SyncTarget served by its peer.
    pub(super) fn sync_target_primary(g: &Inner) -> bool {
        g.engine.role() == Role::Primary && g.engine.sync_target_served()
    }

    /// Whether some block of `[offset, offset+len)` is out of sync.
    fn any_out_of_sync(g: &Inner, offset_bytes: u64, len_bytes: u64) -> bool {
        let end = offset_bytes + len_bytes;
        matches!(g.bitmap.runs(offset_bytes).next(), Some((o, _)) if o < end)
    }

    /// A read on a Primary SyncTarget: from the peer when the range is not all in
    /// sync here. `None`: read locally.
    pub(super) async fn sync_target_read(
        &self,
        offset_bytes: u64,
        len: usize,
    ) -> Option<Result<Vec<u8>, IoError>> {
        {
            let g = self.lock();
            if !Self::sync_target_primary(&g)
                || !Self::any_out_of_sync(&g, offset_bytes, len as u64)
            {
                return None;
            }
        }
        Some(self.read_from_peer(offset_bytes, len).await)
    }

    /// Widens a write on a Primary SyncTarget so that it never covers part of an
    /// out-of-sync block: such blocks are read from the peer and merged. A widened
    /// write comes with the guard of `widen_lock`, to hold until it completes: two
    /// writes to different parts of one out-of-sync block would otherwise both
    /// fetch the old block and the second to land would undo the first. The
    /// second one waits, then finds the block in sync (the first cleared its bit)
    /// and is not widened.
    pub(super) async fn sync_target_widen_write(
        &self,
        offset_bytes: u64,
        data: Bytes,
    ) -> Result<(u64, Bytes, Option<tokio::sync::MutexGuard<'_, ()>>), IoError> {
        let len = data.len() as u64;
        let size = self.storage.size_bytes();
        let start = offset_bytes / BLOCK_SIZE_BYTES * BLOCK_SIZE_BYTES;
        let end = (offset_bytes + len)
            .div_ceil(BLOCK_SIZE_BYTES)
            .saturating_mul(BLOCK_SIZE_BYTES)
            .min(size);
        if len == 0 || (start == offset_bytes && end == offset_bytes + len) {
            return Ok((offset_bytes, data, None));
        }
        let tail_block = (offset_bytes + len - 1) / BLOCK_SIZE_BYTES * BLOCK_SIZE_BYTES;
        let partial = |g: &Inner| {
            if !Self::sync_target_primary(g) {
                return (false, false);
            }
            let head = start < offset_bytes && Self::any_out_of_sync(g, start, 1);
            let tail = end > offset_bytes + len && Self::any_out_of_sync(g, tail_block, 1);
            (head, tail)
        };
        if partial(&self.lock()) == (false, false) {
            return Ok((offset_bytes, data, None));
        }
        let guard = self.widen_lock.lock().await;
        // Again under the guard: a widened write that just completed may have
        // brought the block in sync.
        let (head, tail) = partial(&self.lock());
        if !head && !tail {
            return Ok((offset_bytes, data, None));
        }
        // The whole block span from the peer, our bytes on top (the blocks in sync
        // in the middle are overwritten by ours anyway).
        let new_start = if head { start } else { offset_bytes };
        let new_end = if tail { end } else { offset_bytes + len };
        let mut buf = vec![0u8; (new_end - new_start) as usize];
        if head {
            let block = self
                .read_from_peer(start, (BLOCK_SIZE_BYTES.min(size - start)) as usize)
                .await?;
            buf[..block.len()].copy_from_slice(&block);
        }
        if tail {
            let block = self
                .read_from_peer(tail_block, (end - tail_block) as usize)
                .await?;
            let at = (tail_block - new_start) as usize;
            buf[at..at + block.len()].copy_from_slice(&block);
        }
        let at = (offset_bytes - new_start) as usize;
        buf[at..at + data.len()].copy_from_slice(&data);
        Ok((new_start, Bytes::from(buf), Some(guard)))
    }

    /// Called under the lock before an application write is submitted on a Primary
    /// SyncTarget: the blocks it covers entirely are in sync once it completes.
    pub(super) fn sync_target_written(g: &mut Inner, offset_bytes: u64, len_bytes: u64) {
        if Self::sync_target_primary(g) {
            // Range checked by the caller; an error here cannot happen.
            let _ = g.bitmap.clear_range(offset_bytes, len_bytes);
        }
    }

    /// The runs of `[offset, offset+len)` a resync write must still be applied to
    /// (all of it unless this node is a Primary SyncTarget).
    pub(super) fn resync_runs(&self, offset_bytes: u64, len_bytes: u64) -> Vec<(u64, u64)> {
        let g = self.lock();
        if g.engine.role() != Role::Primary {
            return vec![(offset_bytes, len_bytes)];
        }
        let end = offset_bytes + len_bytes;
        let mut runs = Vec::new();
        for (o, l) in g.bitmap.runs(offset_bytes) {
            if o >= end {
                break;
            }
            let s = o.max(offset_bytes);
            let e = (o + l).min(end);
            if e > s {
                runs.push((s, e - s));
            }
        }
        runs
    }
}

impl Volume {
    /// Applies resync data (`payload`) or resync zeroes (`None`) to the runs still
    /// out of sync (see [`Volume::resync_runs`]).
    pub(super) async fn apply_resync_write(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        payload: Option<Bytes>,
    ) -> Result<(), IoError> {
        for (o, l) in self.resync_runs(offset_bytes, len_bytes) {
            match &payload {
                Some(data) => {
                    let at = (o - offset_bytes) as usize;
                    let Some(piece) = data.get(at..at + l as usize) else {
                        return Err(IoError::Invalid("resync payload shorter than len".into()));
                    };
                    self.storage
                        .write_at(o, data.slice_ref(piece), false)
                        .await?;
                }
                None => self.storage.write_zeroes(o, l, true).await?,
            }
        }
        Ok(())
    }
}

impl Volume {
    /// Allocation status on a Primary SyncTarget: our local holes say nothing about
    /// blocks not resynced yet, so a range with any of them is reported as data.
    pub(super) fn sync_target_block_status(
        g: &Inner,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Option<Vec<crate::storage::Extent>> {
        (len_bytes > 0
            && Self::sync_target_primary(g)
            && Self::any_out_of_sync(g, offset_bytes, len_bytes))
        .then(|| {
            vec![crate::storage::Extent {
                len_bytes,
                hole: false,
                zero: false,
            }]
        })
    }
}
