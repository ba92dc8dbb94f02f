//! Local disk errors on the application path (`disk { on-io-error }`) and the
//! Diskless mode a failed disk leads to.
//!
//! Owns: the volume's `on-io-error` policy, the detached flag, and the application
//! reads forwarded to the peer while Diskless (DRBD's `P_DATA_REQUEST` /
//! `P_DATA_REPLY`).
//!
//! - `pass_on`: the error goes to the application (EIO); a failed write's blocks are
//!   marked out of sync by the engine (the peer may have written them).
//! - `detach`: the disk is dropped: `disk( UpToDate -> Diskless )`, every block is
//!   marked out of sync and the meta-data says Inconsistent (the next attach is a
//!   full resync). The request that failed and every later one are served through
//!   the peer: reads are forwarded over the replication link, writes and flushes go
//!   only to the peer (the engine completes them on the peer's acknowledgement and
//!   fails them with EIO without one). Without a connected UpToDate peer, I/O fails.
//! - `call-local-io-error`: like `detach` (as DRBD 8.4's kernel does) and the
//!   `local-io-error` handler runs (through the hook the daemon installs).
//!
//! A forwarded read travels as a `ResyncRequest` whose id has [`READ_ID_BIT`] set
//! (application request ids never reach bit 63), answered by a `ResyncData` with the
//! same id, or a `NegAck` with the errno.

use super::*;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Bit set in the id of a forwarded application read.
pub const READ_ID_BIT: u64 = 1 << 63;

/// Longest a forwarded read waits for the peer (the link's own timeouts drop a dead
/// peer sooner: then the read fails at once).
const PEER_READ_TIMEOUT_S: u64 = 60;

/// What a local disk error does (`disk { on-io-error }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoErrorPolicy {
    /// `pass_on`: report the error to the application.
    #[default]
    PassOn,
    /// `call-local-io-error`: detach and run the `local-io-error` handler.
    CallHandler,
    /// `detach`: go Diskless and serve through the peer.
    Detach,
}

/// Called once when the disk is detached under `call-local-io-error` (the daemon
/// runs the handler); must not block.
pub type IoErrorHook = Arc<dyn Fn() + Send + Sync>;

/// The Diskless part of a volume.
#[derive(Default)]
pub(super) struct Diskless {
    detached: AtomicBool,
    policy: Mutex<(IoErrorPolicy, Option<IoErrorHook>)>,
    /// Forwarded reads waiting for the peer: id -> where to deliver.
    reads: Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, i32>>>>,
    next_read: AtomicU64,
}

impl Diskless {
    fn reads(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<Bytes, i32>>>> {
        // Held for a map operation only; a poisoned map is still coherent.
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// The peer is gone: every forwarded read fails now.
    pub(super) fn fail_reads(&self) {
        self.reads().clear();
    }
}

fn eio(what: &str) -> IoError {
    tracing::warn!("Diskless I/O failed: {what}");
    IoError::Io(std::io::Error::from_raw_os_error(libc::EIO))
}

impl Volume {
    /// Sets the reaction to local disk errors; `hook` runs on detach under
    /// [`IoErrorPolicy::CallHandler`].
    pub fn set_io_error_policy(&self, policy: IoErrorPolicy, hook: Option<IoErrorHook>) {
        *self
            .diskless
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (policy, hook);
    }

    /// Whether the disk was detached after an I/O error.
    pub fn is_detached(&self) -> bool {
        self.diskless.is_detached()
    }

    /// The local part of an application request: the disk, or the peer once the
    /// disk is detached (see the module documentation).
    pub(super) async fn local_or_peer(
        &self,
        kind: ReqKind,
        offset_bytes: u64,
        op: LocalOp,
    ) -> Result<Option<Vec<u8>>, IoError> {
        let read_len = match &op {
            LocalOp::Read(len) => Some(*len),
            _ => None,
        };
        if !self.diskless.is_detached() {
            let err = match self.local(offset_bytes, op).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let (policy, hook) = self
                .diskless
                .policy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // A cancelled or refused request is no disk failure.
            let disk_error = matches!(err, IoError::Io(_));
            if policy == IoErrorPolicy::PassOn || !disk_error {
                tracing::error!(resource = %self.name, offset_bytes, ?kind, "Local IO failed: {err} (on-io-error pass_on: reported to the application)");
                return Err(err);
            }
            if self.detach_disk(&format!("{kind:?} at {offset_bytes}: {err}")) {
                if let (IoErrorPolicy::CallHandler, Some(hook)) = (policy, hook) {
                    hook();
                }
            }
        }
        match (kind, read_len) {
            (ReqKind::Read, Some(len)) => self.read_from_peer(offset_bytes, len).await.map(Some),
            (ReqKind::Resync, _) => Err(eio("no local disk (Diskless)")),
            // Writes, flushes, discards go to the peer only: the engine completes
            // them on the peer's answer, with EIO without one.
            _ => Ok(None),
        }
    }

    /// Drops the local disk after an I/O error; returns false if it was already.
    fn detach_disk(&self, why: &str) -> bool {
        let mut g = self.lock();
        if self.diskless.detached.swap(true, Ordering::AcqRel) {
            return false;
        }
        let before = g.engine.disk();
        tracing::error!(resource = %self.name, "Local IO failed ({why}). Detaching... disk( {before} -> Diskless )");
        g.engine.force_disk(DiskState::Diskless);
        // Nothing on this disk can be trusted to be current from now on.
        g.bitmap.set_all();
        drop(g);
        self.meta_changed.notify_one();
        self.announce_state();
        true
    }

    /// Reads `len` bytes at `offset_bytes` from the peer's disk.
    pub(super) async fn read_from_peer(
        &self,
        offset_bytes: u64,
        len: usize,
    ) -> Result<Vec<u8>, IoError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(MAX_PEER_REQUEST_BYTES as usize);
            let piece = self.read_piece(offset_bytes + out.len() as u64, n).await?;
            if piece.len() != n {
                return Err(eio("the peer answered a read with the wrong length"));
            }
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    async fn read_piece(&self, offset_bytes: u64, len: usize) -> Result<Bytes, IoError> {
        let Some(tx) = self.lock().peer_tx.clone() else {
            return Err(eio("Diskless and no peer connected: no data to read"));
        };
        let id = READ_ID_BIT | self.diskless.next_read.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        self.diskless.reads().insert(id, done_tx);
        let frame = Frame::ResyncRequest {
            offset_bytes,
            len: len as u32, // <= MAX_PEER_REQUEST_BYTES
            id,
        };
        if !tx.send(frame).await {
            self.diskless.reads().remove(&id);
            return Err(eio("the peer connection is gone"));
        }
        let answer = tokio::time::timeout(Duration::from_secs(PEER_READ_TIMEOUT_S), done_rx).await;
        self.diskless.reads().remove(&id);
        match answer {
            Ok(Ok(Ok(data))) => Ok(data),
            Ok(Ok(Err(errno))) => Err(IoError::Io(std::io::Error::from_raw_os_error(errno))),
            Ok(Err(_)) => Err(eio("the peer connection was lost during a read")),
            Err(_) => Err(eio("the peer did not answer a read")),
        }
    }

    /// Handles the frames of forwarded reads (both sides); returns every other frame.
    pub(super) async fn diskless_frame(&self, frame: Frame<Bytes>) -> Option<Frame<Bytes>> {
        match frame {
            Frame::ResyncRequest {
                offset_bytes,
                len,
                id,
            } if id & READ_ID_BIT != 0 => {
                // The peer is Diskless: serve its read from our disk, in frame order
                // (after every write it sent before).
                let usable = self.lock().engine.disk() == DiskState::UpToDate;
                let data = if usable && u64::from(len) <= MAX_PEER_REQUEST_BYTES {
                    self.read_for_peer(offset_bytes, len).await
                } else {
                    None
                };
                let tx = self.lock().peer_tx.clone();
                if let Some(tx) = tx {
                    let reply = match data {
                        Some(d) => Frame::ResyncData {
                            offset_bytes,
                            len,
                            id,
                            payload: Bytes::from(d),
                        },
                        None => Frame::NegAck {
                            request_id: id,
                            seq: id,
                            errno: libc::EIO as u32,
                        },
                    };
                    tx.send(reply).await;
                }
                None
            }
            Frame::ResyncData { id, payload, .. } if id & READ_ID_BIT != 0 => {
                if let Some(w) = self.diskless.reads().remove(&id) {
                    let _ = w.send(Ok(payload));
                }
                None
            }
            Frame::NegAck {
                request_id, errno, ..
            } if request_id & READ_ID_BIT != 0 => {
                if let Some(w) = self.diskless.reads().remove(&request_id) {
                    let _ = w.send(Err(i32::try_from(errno).unwrap_or(libc::EIO)));
                }
                None
            }
            other => Some(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::core::{Action, Engine, Event, PeerProgress, Protocol, Refusal, ReqKind};
    use crate::engine::state::{DiskState, Role};

    fn diskless_primary() -> Engine {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        e.handle(
            0,
            Event::PeerConnected {
                role: Role::Secondary,
                disk: DiskState::UpToDate,
            },
            &mut out,
        );
        e.promote(false).unwrap();
        e.force_disk(DiskState::Diskless);
        e
    }

    fn write(e: &mut Engine, id: u64) -> Vec<Action> {
        let mut out = Vec::new();
        e.handle(
            0,
            Event::Request {
                id,
                kind: ReqKind::Write,
                offset_bytes: 0,
                len_bytes: 4096,
            },
            &mut out,
        );
        // The driver's "local" part of a Diskless write does nothing and succeeds.
        e.handle(0, Event::LocalDone { id, result: Ok(()) }, &mut out);
        out
    }

    fn completion(out: &[Action], id: u64) -> Option<Result<(), Refusal>> {
        out.iter().find_map(|a| match a {
            Action::Complete { id: i, result } if *i == id => Some(result.clone()),
            _ => None,
        })
    }

    #[test]
    fn a_diskless_write_completes_only_with_the_peers_ack() {
        let mut e = diskless_primary();
        let out = write(&mut e, 1);
        assert!(out.contains(&Action::SendPeer(1)), "{out:?}");
        assert_eq!(
            completion(&out, 1),
            None,
            "completed before the peer wrote it"
        );
        let mut out = Vec::new();
        e.handle(
            0,
            Event::PeerProgressed {
                id: 1,
                progress: PeerProgress::Written,
            },
            &mut out,
        );
        assert_eq!(completion(&out, 1), Some(Ok(())));
    }

    #[test]
    fn a_diskless_write_fails_when_the_peer_is_lost_or_refuses() {
        let mut e = diskless_primary();
        write(&mut e, 1);
        let mut out = Vec::new();
        e.handle(0, Event::PeerFailed { id: 1 }, &mut out);
        assert_eq!(
            completion(&out, 1),
            Some(Err(Refusal::LocalError(libc::EIO)))
        );
        write(&mut e, 2);
        let mut out = Vec::new();
        e.handle(0, Event::PeerLost, &mut out);
        assert_eq!(
            completion(&out, 2),
            Some(Err(Refusal::LocalError(libc::EIO)))
        );
        // No disk, no peer: refused at once.
        let mut out = Vec::new();
        e.handle(
            0,
            Event::Request {
                id: 3,
                kind: ReqKind::Read,
                offset_bytes: 0,
                len_bytes: 4096,
            },
            &mut out,
        );
        assert_eq!(
            completion(&out, 3),
            Some(Err(Refusal::NoUsableData(DiskState::Diskless)))
        );
    }
}
