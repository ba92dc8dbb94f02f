//! The driver's side of `on-congestion` (the engine's is `engine/congestion.rs`).
//!
//! Owns: the requests the engine makes of the replication link (start the resync of
//! an `Ahead` Primary, drop a congested connection), handed to the link's task
//! through [`Volume::next_link_request`], and the `OutOfSync` frames an `Ahead`
//! Primary sends instead of data. Those are sent by detached tasks (at most
//! [`MAX_DETACHED_OOS_SENDS`] at once) so that an application write never waits for
//! the congested queue it is avoiding; one that finds no room is dropped, which
//! costs nothing in correctness: the Primary's own bitmap, which the resync sends
//! from, already holds the range.

use super::*;
use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;

/// Most `OutOfSync` frames waiting for queue space at once.
pub const MAX_DETACHED_OOS_SENDS: usize = 1024;

/// Bound of the link request queue (requests are idempotent: extra ones are dropped).
const MAX_LINK_REQUESTS: usize = 8;

/// What the engine asks of the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRequest {
    /// Start a bitmap resync as SyncSource (an `Ahead` Primary caught up).
    StartResync,
    /// Drop the connection (`on-congestion disconnect`).
    Drop(&'static str),
}

/// The volume's congestion plumbing.
#[derive(Default)]
pub(super) struct VolumeCongestion {
    requests: Mutex<VecDeque<LinkRequest>>,
    notify: tokio::sync::Notify,
    oos_sends: Arc<AtomicUsize>,
}

impl VolumeCongestion {
    pub(super) fn request(&self, r: LinkRequest) {
        let mut q = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() < MAX_LINK_REQUESTS && !q.contains(&r) {
            q.push_back(r);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Sends an `OutOfSync` frame without waiting for queue space.
    pub(super) fn send_detached(&self, tx: Arc<dyn PeerTx>, frame: Frame<Bytes>) {
        let n = self.oos_sends.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_DETACHED_OOS_SENDS {
            self.oos_sends.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!(
                "OutOfSync frame dropped: {MAX_DETACHED_OOS_SENDS} already wait for room"
            );
            return;
        }
        let count = self.oos_sends.clone();
        tokio::spawn(async move {
            tx.send(frame).await;
            count.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl Volume {
    /// Sets `on-congestion`, `congestion-fill` and `congestion-extents`.
    pub fn set_congestion(&self, settings: crate::engine::core::Congestion) {
        self.lock().engine.set_congestion(settings);
    }

    /// Waits for the engine's next request to the replication link.
    pub async fn next_link_request(&self) -> LinkRequest {
        loop {
            let notified = self.congestion.notify.notified();
            if let Some(r) = self
                .congestion
                .requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return r;
            }
            notified.await;
        }
    }

    /// Forgets requests of a connection that is gone.
    pub fn clear_link_requests(&self) {
        self.congestion
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Reports the activity log's extents with writes in flight to the engine
    /// (`congestion-extents`), before a write's request event.
    pub(super) fn note_al_in_use(&self, g: &mut Inner) {
        if let Some(al) = &self.al {
            g.engine.set_al_in_use(al.extents_in_use());
        }
    }
}
