//! The engine core: a sans-IO state machine for one volume.
//!
//! It owns the node's role, disk and connection states and the table of application
//! requests in flight. It never performs I/O, never blocks and never reads a clock:
//! the driver ([`super::volume::Volume`]) feeds it [`Event`]s with the current time and
//! carries out the [`Action`]s it returns (submit to the local disk, send to the peer,
//! complete the application's request, persist meta-data).
//!
//! A request's life: `Event::Request` -> `Action::SubmitLocal` (and, when a peer is
//! connected, `Action::SendPeer`) -> `Event::LocalDone` (+ the protocol's peer
//! condition) -> `Action::Complete`. Writes that overlap a write still in flight wait
//! until it completes, so overlapping writes reach every disk in the same order.
//!
//! It also owns the transfer log (replicated writes kept until a barrier ack proves
//! them stable on the peer, marked out of sync if the peer is lost first; see
//! `docs/protocol.md` "Epochs and the transfer log") and the cluster-wide promotion
//! (a state-change request the connected peer must grant before this node becomes
//! Primary).

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Default `max-epoch-size`: writes per epoch before a barrier closes it.
pub const DEFAULT_MAX_EPOCH_SIZE: u32 = 2048;

/// An epoch with written writes older than this is closed by the next tick (DRBD
/// closes an epoch when its sender goes idle).
pub const EPOCH_CLOSE_MS: u64 = 100;

/// Default time a promotion waits for the peer's reply to its state-change request.
pub const DEFAULT_STATE_CHANGE_TIMEOUT_MS: u64 = 5000;

pub use crate::engine::congestion::{Congestion, CongestionPolicy, AHEAD_TO_SYNC_MS};
use crate::engine::state::{ConnState, DiskState, Role};

/// Identifier of an application request, unique per volume while in flight.
pub type ReqId = u64;

/// What an application request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    /// Read `len` bytes.
    Read,
    /// Write (optionally FUA).
    Write,
    /// Make completed writes stable.
    Flush,
    /// Discard (TRIM).
    Discard,
    /// Write zeroes.
    Zeroes,
    /// Resync chunk on the SyncSource: read locally and sent to the peer by the
    /// driver; it excludes overlapping writes while in flight, so the data it reads
    /// and sends is never older than a write that completed before it.
    Resync,
}

impl ReqKind {
    /// Whether the request changes data.
    pub fn is_write(self) -> bool {
        matches!(self, ReqKind::Write | ReqKind::Discard | ReqKind::Zeroes)
    }

    /// Whether overlapping writes must wait for this request (and it for them).
    pub fn excludes_writes(self) -> bool {
        self.is_write() || self == ReqKind::Resync
    }
}

/// Replication protocol: when a write is complete towards the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// Local write done and the data handed to the peer connection.
    A,
    /// Local write done and the peer received the data.
    B,
    /// Local write done and the peer wrote the data.
    C,
}

impl Protocol {
    /// The peer progress a write needs before it completes.
    pub fn needs(self) -> PeerProgress {
        match self {
            Protocol::A => PeerProgress::Sent,
            Protocol::B => PeerProgress::Received,
            Protocol::C => PeerProgress::Written,
        }
    }
}

/// How far the peer has got with a request (ordered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerProgress {
    /// Nothing yet.
    None,
    /// Handed to the connection (protocol A).
    Sent,
    /// The peer received it (P_RECV_ACK, protocol B).
    Received,
    /// The peer wrote it (P_WRITE_ACK, protocol C).
    Written,
}

/// An acknowledgement the engine asks the driver to send to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Received (protocol B).
    Recv,
    /// Written to disk (every protocol: the Primary uses it to clear the request).
    Write,
    /// The local write failed with this errno.
    Neg(i32),
}

/// Why the engine refused or failed a request (mapped to errno by the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not Primary: only a Primary serves I/O.
    NotPrimary(Role),
    /// No usable data on this node.
    NoUsableData(DiskState),
    /// The request is past the end of the device.
    OutOfRange,
    /// The local disk failed the request with this errno.
    LocalError(i32),
}

/// Input of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An application request arrives.
    Request {
        /// Identifier chosen by the driver.
        id: ReqId,
        /// Kind of request.
        kind: ReqKind,
        /// Start in bytes.
        offset_bytes: u64,
        /// Length in bytes (0 for flush).
        len_bytes: u64,
    },
    /// The local disk finished an application request: `Ok` or an errno.
    LocalDone {
        /// The request.
        id: ReqId,
        /// Result of the local operation.
        result: Result<(), i32>,
    },
    /// The peer is connected (handshake done) with this role and disk.
    PeerConnected {
        /// The peer's role.
        role: Role,
        /// The peer's disk state.
        disk: DiskState,
    },
    /// The peer reports a new role or disk state.
    PeerState {
        /// The peer's role.
        role: Role,
        /// The peer's disk state.
        disk: DiskState,
    },
    /// The connection to the peer is gone (timeout, error, peer down).
    PeerLost,
    /// The administrator disconnected (StandAlone until `connect`).
    Disconnect,
    /// The administrator asks to connect again.
    Connect,
    /// The peer got this far with an application request sent to it.
    PeerProgressed {
        /// The request.
        id: ReqId,
        /// How far.
        progress: PeerProgress,
    },
    /// The peer failed to write an application request (P_NEG_ACK).
    PeerFailed {
        /// The request.
        id: ReqId,
    },
    /// The peer sent a request to apply (this node is Secondary).
    PeerRequest {
        /// The peer's identifier of the request.
        peer_id: u64,
        /// Kind of request.
        kind: ReqKind,
        /// Start in bytes.
        offset_bytes: u64,
        /// Length in bytes.
        len_bytes: u64,
    },
    /// The local disk finished a peer request.
    PeerRequestDone {
        /// The peer's identifier.
        peer_id: u64,
        /// Result of the local operation.
        result: Result<(), i32>,
    },
    /// Time passes (the driver ticks about every [`EPOCH_CLOSE_MS`]): closes old
    /// epochs, times out a state change waiting for the peer.
    Tick,
    /// The Primary closed an epoch (P_BARRIER): flush, then acknowledge it.
    PeerBarrier {
        /// Epoch number (echoed in the ack).
        epoch: u32,
    },
    /// The local flush asked by [`Action::FlushForBarrier`] finished.
    PeerBarrierDone {
        /// Epoch number.
        epoch: u32,
        /// The token of the action (stale tokens: the connection changed).
        token: u64,
        /// Result of the flush.
        result: Result<(), i32>,
    },
    /// The peer flushed every write it acknowledged before our barrier (P_BARRIER_ACK).
    PeerBarrierAck {
        /// Epoch number of the barrier.
        epoch: u32,
    },
    /// The peer asks to change its role (P_STATE_CHG_REQ): `Primary` to be promoted,
    /// `Secondary` to release an earlier grant (its promotion did not happen).
    PeerStateChangeRequest {
        /// The role the peer asks for.
        role: Role,
    },
    /// The peer's answer to our state-change request (P_STATE_CHG_REPLY).
    PeerStateChangeReply {
        /// The answer.
        reply: ChangeReply,
    },
}

/// The answer to a state-change request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeReply {
    /// Granted: the requester may change its role.
    Granted,
    /// Refused: the replying node is Primary (SS_TWO_PRIMARIES).
    TwoPrimaries,
    /// Refused: the replying node is changing its own state and wins the race.
    Concurrent,
}

impl ChangeReply {
    /// The reason text carried on the wire (empty when granted).
    pub fn reason(self) -> &'static str {
        match self {
            ChangeReply::Granted => "",
            ChangeReply::TwoPrimaries => "(-1) Multiple primaries not allowed by config",
            ChangeReply::Concurrent => "(-19) Concurrent state changes detected and aborted",
        }
    }

    /// The answer from a wire reply.
    pub fn from_wire(ok: bool, reason: &str) -> ChangeReply {
        if ok {
            ChangeReply::Granted
        } else if reason.starts_with("(-1)") {
            ChangeReply::TwoPrimaries
        } else {
            ChangeReply::Concurrent
        }
    }
}

/// Output of the engine, carried out by the driver in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Submit the application request to the local disk.
    SubmitLocal(ReqId),
    /// Send the application request to the peer.
    SendPeer(ReqId),
    /// Record that this range may differ on the peer (dirty bitmap).
    MarkOutOfSync {
        /// Start in bytes.
        offset_bytes: u64,
        /// Length in bytes.
        len_bytes: u64,
    },
    /// Complete the application's request.
    Complete {
        /// The request.
        id: ReqId,
        /// Success, or why it failed.
        result: Result<(), Refusal>,
    },
    /// Submit a peer request to the local disk.
    SubmitPeerRequest(u64),
    /// Acknowledge a peer request.
    AckPeer {
        /// The peer's identifier.
        peer_id: u64,
        /// Which acknowledgement.
        kind: AckKind,
    },
    /// Send a barrier closing this epoch to the peer (P_BARRIER).
    SendBarrier {
        /// Epoch number.
        epoch: u32,
    },
    /// Flush the local disk for the peer's barrier, then report
    /// [`Event::PeerBarrierDone`] with the same epoch and token.
    FlushForBarrier {
        /// Epoch number.
        epoch: u32,
        /// Token to give back.
        token: u64,
    },
    /// Acknowledge the peer's barrier (P_BARRIER_ACK).
    AckBarrier {
        /// Epoch number.
        epoch: u32,
        /// Peer writes this node wrote since its previous barrier ack.
        count: u32,
    },
    /// Send a state-change request to the peer (P_STATE_CHG_REQ).
    SendStateChangeRequest {
        /// Role asked for.
        role: Role,
    },
    /// Answer the peer's state-change request (P_STATE_CHG_REPLY).
    SendStateChangeReply {
        /// The answer.
        reply: ChangeReply,
    },
    /// A promotion started by [`Engine::begin_promote`] ended (`Ok(forced)`).
    PromoteDone {
        /// Outcome.
        result: Result<bool, StateChangeError>,
    },
    /// Send our role and disk state to the peer (after a cluster-wide change).
    AnnounceState,
    /// `on-congestion pull-ahead`: tell the peer this range is out of sync (its
    /// data is not sent).
    SendOutOfSync {
        /// Start of the range.
        offset_bytes: u64,
        /// Length of the range.
        len_bytes: u64,
    },
    /// `on-congestion disconnect`: drop the connection.
    DropConnection {
        /// Which threshold was reached.
        reason: &'static str,
    },
    /// An `Ahead` Primary caught up: start a bitmap resync as SyncSource.
    StartResync,
}

/// What [`Engine::begin_promote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteStart {
    /// Promoted at once (no connected peer, or already Primary); `forced` as in
    /// [`Engine::promote`].
    Done(bool),
    /// Asked the connected peer; [`Action::PromoteDone`] reports the outcome.
    Asked,
}

/// A role change that the engine refused, in DRBD's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateChangeError {
    /// Promotion needs UpToDate data unless forced.
    #[error("State change failed: (-2) Need access to UpToDate data (disk is {0}; use primary --force to make this node's data authoritative)")]
    NeedUpToDate(DiskState),
    /// Demotion while requests are in flight or the device is open.
    #[error("State change failed: (-12) Device is held open by someone ({0})")]
    HeldOpen(String),
    /// No disk.
    #[error("State change failed: (-2) Need access to UpToDate data (no disk attached)")]
    Diskless,
    /// Single-primary mode and the connected peer is Primary.
    #[error("State change failed: (-1) Multiple primaries not allowed by config (the peer is Primary; demote it first)")]
    PeerIsPrimary,
    /// The peer is changing its state too (racing promotions): this node lost.
    #[error("State change failed: (-19) Concurrent state changes detected and aborted")]
    Concurrent,
    /// The peer did not answer the state-change request in time.
    #[error(
        "State change failed: (-10) State change was refused by peer node (no reply within {0} ms)"
    )]
    NoReply(u64),
    /// The flush before a demotion did not complete in time (the peer or the local
    /// disk does not answer); the node stays Primary.
    #[error("State change failed: (-10) the flush before demotion did not complete within {0} ms (peer or local disk not answering); still Primary")]
    FlushTimeout(u64),
    /// The connection was lost while waiting for the peer's answer.
    #[error("State change failed: (-10) State change was refused by peer node (connection lost during the state change)")]
    Interrupted,
}

/// Counters in DRBD's vocabulary (bytes, not KiB; the presentation converts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Bytes written to the local disk (dw).
    pub disk_written_bytes: u64,
    /// Bytes read from the local disk (dr).
    pub disk_read_bytes: u64,
    /// Bytes sent to the peer (ns).
    pub net_sent_bytes: u64,
    /// Bytes received from the peer (nr).
    pub net_received_bytes: u64,
    /// Activity-log updates (al).
    pub al_writes: u64,
    /// Bitmap updates (bm).
    pub bm_writes: u64,
    /// Requests submitted to the local disk and not yet done (lo).
    pub local_pending: u64,
    /// Application requests not yet completed (ap).
    pub app_pending: u64,
    /// Requests sent to the peer awaiting an answer (pe).
    pub peer_pending: u64,
    /// Requests received from the peer not yet acknowledged (ua).
    pub unacked: u64,
}

#[derive(Debug)]
struct Pending {
    kind: ReqKind,
    offset_bytes: u64,
    len_bytes: u64,
    /// Submitted to the local disk (false while waiting for an overlapping write).
    submitted: bool,
    /// Local result, once the local disk answered.
    local: Option<Result<(), i32>>,
    /// Whether the peer's progress matters for this request.
    peer_needed: bool,
    /// How far the peer has got.
    peer: PeerProgress,
    /// The peer failed the request or was lost before writing it.
    peer_failed: bool,
}

#[derive(Debug)]
struct PeerPending {
    peer_id: u64,
    kind: ReqKind,
    offset_bytes: u64,
    len_bytes: u64,
    submitted: bool,
    /// `conn_gen` when it arrived: its completion is acknowledged only on that
    /// connection (a request of a dead connection is never acked on a newer one).
    conn_gen: u64,
}

/// Epoch tag of a transfer-log entry whose WriteAck has not arrived.
const NOT_WRITTEN: u64 = u64::MAX;

/// A completed replicated write in the transfer log.
#[derive(Debug, Clone, Copy)]
struct TlEntry {
    id: ReqId,
    offset_bytes: u64,
    len_bytes: u64,
    /// Epoch current when the peer's WriteAck arrived ([`NOT_WRITTEN`]: not yet).
    epoch: u64,
}

/// A barrier sent and not yet acknowledged: an explicit one, or an application
/// flush (its FlushAck proves the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarrierKind {
    Barrier(u32),
    Flush(ReqId),
}

#[derive(Debug, Clone, Copy)]
struct OpenBarrier {
    kind: BarrierKind,
    /// Its ack releases written entries tagged with this epoch or older.
    epoch: u64,
}

/// This node's own cluster-wide state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Idle,
    /// Asked the peer for promotion; waiting for its reply until `deadline_ms`.
    Asking {
        force: bool,
        deadline_ms: u64,
    },
}

fn overlap(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_off < b_off + b_len && b_off < a_off + a_len
}

/// The engine of one volume.
#[derive(Debug)]
pub struct Engine {
    size_bytes: u64,
    protocol: Protocol,
    role: Role,
    disk: DiskState,
    conn: ConnState,
    peer_role: Role,
    peer_disk: DiskState,
    pending: BTreeMap<ReqId, Pending>,
    /// Writes waiting for an overlapping in-flight write, in arrival order.
    blocked: VecDeque<ReqId>,
    /// Requests from the peer, by arrival number.
    peer_reqs: BTreeMap<u64, PeerPending>,
    /// Arrival number of each peer request, by the peer's identifier.
    peer_index: HashMap<u64, u64>,
    /// Next arrival number.
    next_arrival: u64,
    /// Arrival numbers of peer requests waiting for an earlier one, in order.
    peer_blocked: VecDeque<u64>,
    /// Replicated writes completed towards the application and not yet proven
    /// stable on the peer (DRBD's transfer log), in completion order: kept until
    /// a barrier ack covers them, marked out of sync if the peer is lost first.
    transfer_log: VecDeque<TlEntry>,
    /// Current epoch number (never reused within this engine's life).
    epoch: u64,
    /// Written (WriteAck received) entries tagged with the current epoch.
    epoch_writes: u32,
    /// When the current epoch started.
    epoch_start_ms: u64,
    /// `max-epoch-size`.
    max_epoch_size: u32,
    /// Barriers (and flushes) sent, oldest first, awaiting their ack.
    barriers: VecDeque<OpenBarrier>,
    /// Incremented at each connection loss: barrier flushes of an older
    /// connection are not acknowledged on a newer one.
    conn_gen: u64,
    /// Secondary: peer writes written since the last barrier ack.
    peer_epoch_writes: u32,
    /// Time of the last event.
    now_ms: u64,
    /// Our state change in progress.
    change: Change,
    /// State-change replies the peer still owes us (the last one answers the
    /// current request; earlier ones answer aborted requests).
    replies_owed: u32,
    /// We granted the peer's promotion and have not seen it become Primary yet.
    peer_promoting: bool,
    /// Wins racing state changes (decided at connect, opposite on the peer).
    conflict_winner: bool,
    /// How long a promotion waits for the peer's reply.
    state_change_timeout_ms: u64,
    counters: Counters,
    /// `on-congestion` state (`congestion.rs`).
    cong: crate::engine::congestion::CongestionState,
}

impl Engine {
    /// A new engine for a device of `size_bytes` whose disk is in state `disk`.
    pub fn new(size_bytes: u64, disk: DiskState, protocol: Protocol) -> Engine {
        Engine {
            size_bytes,
            protocol,
            role: Role::Secondary,
            disk,
            conn: ConnState::StandAlone,
            peer_role: Role::Unknown,
            peer_disk: DiskState::DUnknown,
            pending: BTreeMap::new(),
            blocked: VecDeque::new(),
            peer_reqs: BTreeMap::new(),
            peer_index: HashMap::new(),
            next_arrival: 0,
            peer_blocked: VecDeque::new(),
            transfer_log: VecDeque::new(),
            epoch: 0,
            epoch_writes: 0,
            epoch_start_ms: 0,
            max_epoch_size: DEFAULT_MAX_EPOCH_SIZE,
            barriers: VecDeque::new(),
            conn_gen: 0,
            peer_epoch_writes: 0,
            now_ms: 0,
            change: Change::Idle,
            replies_owed: 0,
            peer_promoting: false,
            conflict_winner: false,
            state_change_timeout_ms: DEFAULT_STATE_CHANGE_TIMEOUT_MS,
            counters: Counters::default(),
            cong: crate::engine::congestion::CongestionState::default(),
        }
    }

    /// Sets `max-epoch-size` (at least 1).
    pub fn set_max_epoch_size(&mut self, writes: u32) {
        self.max_epoch_size = writes.max(1);
    }

    /// Sets how long a promotion waits for the peer's reply.
    pub fn set_state_change_timeout_ms(&mut self, timeout_ms: u64) {
        self.state_change_timeout_ms = timeout_ms.max(1);
    }

    /// How long a state change waits for the peer (promotion's reply, demotion's
    /// flush).
    pub fn state_change_timeout_ms(&self) -> u64 {
        self.state_change_timeout_ms
    }

    /// Whether this node wins racing state changes on the current connection; the
    /// driver sets it before [`Event::PeerConnected`], opposite on the two nodes.
    pub fn set_conflict_winner(&mut self, winner: bool) {
        self.conflict_winner = winner;
    }

    /// Entries in the transfer log (completed writes not yet known stable on the peer).
    pub fn transfer_log_len(&self) -> usize {
        self.transfer_log.len()
    }

    /// Completed writes whose WriteAck has not arrived (protocols A and B).
    pub fn writes_awaiting_peer(&self) -> usize {
        self.transfer_log
            .iter()
            .filter(|e| e.epoch == NOT_WRITTEN)
            .count()
    }

    /// Whether [`Event::Tick`] has something to do (an open epoch, a state change).
    pub fn wants_tick(&self) -> bool {
        self.epoch_writes > 0 || self.change != Change::Idle
    }

    /// Whether our promotion waits for the peer's answer.
    pub fn promotion_pending(&self) -> bool {
        self.change != Change::Idle
    }

    /// Size of the device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This node's disk state.
    pub fn disk(&self) -> DiskState {
        self.disk
    }

    /// The connection state.
    pub fn conn(&self) -> ConnState {
        self.conn
    }

    /// The peer's role and disk as last known.
    pub fn peer(&self) -> (Role, DiskState) {
        (self.peer_role, self.peer_disk)
    }

    /// The replication protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of application requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sets the connection state when the driver starts or stops connecting.
    pub fn set_connecting(&mut self, connecting: bool) {
        if !self.conn.is_connected() {
            self.conn = if connecting {
                ConnState::Connecting
            } else {
                ConnState::StandAlone
            };
        }
    }

    /// Sets the disk state by an administrator's decision (`outdate`, `invalidate`,
    /// `new-current-uuid --clear-bitmap`); the caller checked the preconditions.
    pub fn force_disk(&mut self, disk: DiskState) {
        if self.disk != disk {
            tracing::info!("disk( {} -> {disk} )", self.disk);
            self.disk = disk;
        }
    }

    /// Becomes SyncSource (`true`) or SyncTarget (`false`) on a connected link; a
    /// SyncTarget's data is Inconsistent until the resync finishes.
    pub fn start_sync(&mut self, source: bool) {
        if !self.conn.is_connected() {
            return;
        }
        let next = if source {
            ConnState::SyncSource
        } else {
            ConnState::SyncTarget
        };
        tracing::info!("conn( {} -> {next} )", self.conn);
        self.conn = next;
        if !source && self.disk != DiskState::Inconsistent {
            tracing::info!("disk( {} -> Inconsistent ) resync target", self.disk);
            self.disk = DiskState::Inconsistent;
        }
    }

    /// The resync finished: back to Connected; a SyncTarget is now UpToDate.
    pub fn finish_sync(&mut self) {
        match self.conn {
            ConnState::SyncSource => {
                tracing::info!("conn( SyncSource -> Connected )");
                self.conn = ConnState::Connected;
            }
            ConnState::SyncTarget => {
                tracing::info!(
                    "conn( SyncTarget -> Connected ) disk( {} -> UpToDate )",
                    self.disk
                );
                self.conn = ConnState::Connected;
                self.disk = DiskState::UpToDate;
            }
            _ => {}
        }
    }

    /// Promotes this node locally. With `force`, Inconsistent or Outdated data
    /// becomes UpToDate (DRBD's `primary --force`). Returns whether the data was
    /// forced. While a peer is connected, use [`Engine::begin_promote`]: this only
    /// checks what this node knows (the peer's last announced role).
    pub fn promote(&mut self, force: bool) -> Result<bool, StateChangeError> {
        self.check_promote(force)?;
        if self.conn.is_connected() && (self.peer_promoting || self.change != Change::Idle) {
            return Err(StateChangeError::Concurrent);
        }
        Ok(self.apply_promote(force))
    }

    /// The local preconditions of a promotion.
    fn check_promote(&self, force: bool) -> Result<(), StateChangeError> {
        if self.conn.is_connected() && self.peer_role == Role::Primary {
            return Err(StateChangeError::PeerIsPrimary);
        }
        match self.disk {
            DiskState::Diskless | DiskState::Attaching => Err(StateChangeError::Diskless),
            DiskState::UpToDate => Ok(()),
            _ if force => Ok(()),
            // A Consistent disk without a peer to compare with may be promoted: the
            // administrator knows it is the survivor (DRBD's degraded start).
            DiskState::Consistent if !self.conn.is_connected() => Ok(()),
            // A SyncTarget may be Primary while its UpToDate peer serves the blocks
            // not resynced yet (DRBD allows it too).
            DiskState::Inconsistent if self.sync_target_served() => Ok(()),
            other => Err(StateChangeError::NeedUpToDate(other)),
        }
    }

    /// Becomes Primary; the caller checked [`Engine::check_promote`].
    fn apply_promote(&mut self, force: bool) -> bool {
        self.role = Role::Primary;
        match self.disk {
            DiskState::UpToDate => false,
            // Stays Inconsistent until the resync ends.
            DiskState::Inconsistent if !force && self.sync_target_served() => false,
            other if force => {
                tracing::info!("disk( {other} -> UpToDate ) by primary --force");
                self.disk = DiskState::UpToDate;
                true
            }
            _ => {
                self.disk = DiskState::UpToDate;
                false
            }
        }
    }

    /// Starts a promotion. Without a connected peer (or when already Primary) it
    /// happens at once; with one, the peer is asked first (DRBD's cluster-wide state
    /// change) and [`Action::PromoteDone`] reports the outcome: the peer refuses if
    /// it is Primary or is promoting itself (racing requests: the conflict winner's
    /// goes through, the other fails), and no reply within the timeout fails it.
    pub fn begin_promote(
        &mut self,
        now_ms: u64,
        force: bool,
        out: &mut Vec<Action>,
    ) -> Result<PromoteStart, StateChangeError> {
        self.now_ms = self.now_ms.max(now_ms);
        if self.role == Role::Primary && self.disk == DiskState::UpToDate {
            return Ok(PromoteStart::Done(false));
        }
        self.check_promote(force)?;
        if !self.conn.is_connected() {
            return Ok(PromoteStart::Done(self.apply_promote(force)));
        }
        if self.peer_promoting || self.change != Change::Idle {
            return Err(StateChangeError::Concurrent);
        }
        self.change = Change::Asking {
            force,
            deadline_ms: self.now_ms + self.state_change_timeout_ms,
        };
        self.replies_owed += 1;
        out.push(Action::SendStateChangeRequest {
            role: Role::Primary,
        });
        Ok(PromoteStart::Asked)
    }

    /// Our promotion ended without the peer's grant being used: report it and
    /// release the grant the peer may have given.
    fn fail_promotion(&mut self, error: StateChangeError, out: &mut Vec<Action>) {
        self.change = Change::Idle;
        out.push(Action::PromoteDone { result: Err(error) });
        if self.conn.is_connected() {
            self.replies_owed += 1;
            out.push(Action::SendStateChangeRequest {
                role: Role::Secondary,
            });
        }
    }

    fn on_state_change_request(&mut self, role: Role, out: &mut Vec<Action>) {
        if role != Role::Primary {
            // The peer's promotion did not happen: forget our grant.
            self.peer_promoting = false;
            out.push(Action::SendStateChangeReply {
                reply: ChangeReply::Granted,
            });
            return;
        }
        let reply = if self.role == Role::Primary {
            ChangeReply::TwoPrimaries
        } else if self.change != Change::Idle && self.conflict_winner {
            ChangeReply::Concurrent
        } else {
            if self.change != Change::Idle {
                tracing::info!("concurrent promotions: the peer wins, ours is aborted");
                self.fail_promotion(StateChangeError::Concurrent, out);
            }
            self.peer_promoting = true;
            ChangeReply::Granted
        };
        out.push(Action::SendStateChangeReply { reply });
    }

    fn on_state_change_reply(&mut self, reply: ChangeReply, out: &mut Vec<Action>) {
        if self.replies_owed == 0 {
            tracing::warn!(?reply, "state-change reply without a request");
            return;
        }
        self.replies_owed -= 1;
        if self.replies_owed > 0 {
            return; // answers an aborted request
        }
        let Change::Asking { force, .. } = self.change else {
            return;
        };
        self.change = Change::Idle;
        match reply {
            ChangeReply::Granted => {
                let result = self
                    .check_promote(force)
                    .map(|()| self.apply_promote(force));
                match result {
                    Ok(forced) => {
                        out.push(Action::PromoteDone { result: Ok(forced) });
                        out.push(Action::AnnounceState);
                    }
                    Err(e) => self.fail_promotion(e, out),
                }
            }
            ChangeReply::TwoPrimaries => self.fail_promotion(StateChangeError::PeerIsPrimary, out),
            ChangeReply::Concurrent => self.fail_promotion(StateChangeError::Concurrent, out),
        }
    }

    /// Demotes this node; refused while application requests are in flight.
    pub fn demote(&mut self) -> Result<(), StateChangeError> {
        // Resync chunks may stay in flight: a SyncSource can be Secondary.
        let app = self
            .pending
            .values()
            .filter(|p| p.kind != ReqKind::Resync)
            .count();
        if app > 0 {
            return Err(StateChangeError::HeldOpen(format!(
                "{app} requests in flight"
            )));
        }
        // As DRBD waits for ap_pending: writes the peer has not acknowledged yet
        // (protocols A and B) would be lost with this node if it crashed as Secondary.
        let unacked = self.writes_awaiting_peer();
        if unacked > 0 && self.conn.is_connected() {
            return Err(StateChangeError::HeldOpen(format!(
                "{unacked} writes awaiting the peer's acknowledgement"
            )));
        }
        self.role = Role::Secondary;
        Ok(())
    }

    /// Feeds one event; actions are appended to `out` in the order to carry out.
    pub fn handle(&mut self, now_ms: u64, event: Event, out: &mut Vec<Action>) {
        self.now_ms = self.now_ms.max(now_ms);
        match event {
            Event::Request {
                id,
                kind,
                offset_bytes,
                len_bytes,
            } => self.on_request(id, kind, offset_bytes, len_bytes, out),
            Event::LocalDone { id, result } => {
                let Some(p) = self.pending.get_mut(&id) else {
                    tracing::error!(id, "local completion for an unknown request");
                    return;
                };
                assert!(p.submitted, "completion of a request never submitted");
                assert!(p.local.is_none(), "two local completions for request {id}");
                p.local = Some(result);
                self.counters.local_pending -= 1;
                if result.is_err() && p.kind.is_write() {
                    // The peer may have written what our disk refused: the block
                    // differs between the nodes until a resync settles it.
                    out.push(Action::MarkOutOfSync {
                        offset_bytes: p.offset_bytes,
                        len_bytes: p.len_bytes,
                    });
                }
                if result.is_ok() {
                    match p.kind {
                        ReqKind::Read | ReqKind::Resync => {
                            self.counters.disk_read_bytes += p.len_bytes
                        }
                        ReqKind::Write | ReqKind::Zeroes | ReqKind::Discard => {
                            self.counters.disk_written_bytes += p.len_bytes
                        }
                        ReqKind::Flush => {}
                    }
                }
                self.try_complete(id, out);
            }
            Event::PeerConnected { role, disk } => {
                tracing::info!(
                    "conn( {} -> Connected ) peer role {role} disk {disk}",
                    self.conn
                );
                self.conn = ConnState::Connected;
                self.peer_role = role;
                self.peer_disk = disk;
            }
            Event::PeerState { role, disk } => {
                self.peer_role = role;
                self.peer_disk = disk;
                if role == Role::Primary {
                    // The promotion we granted happened: peer_role refuses ours now.
                    self.peer_promoting = false;
                }
            }
            Event::PeerLost => self.lose_peer(ConnState::Connecting, out),
            Event::Disconnect => self.lose_peer(ConnState::StandAlone, out),
            Event::Connect => {
                if self.conn == ConnState::StandAlone {
                    self.conn = ConnState::Connecting;
                }
            }
            Event::PeerProgressed { id, progress } => {
                if progress == PeerProgress::Written && !self.barriers.is_empty() {
                    self.barrier_acked(BarrierKind::Flush(id));
                }
                if let Some(p) = self.pending.get_mut(&id) {
                    if p.peer_needed && progress > p.peer {
                        p.peer = progress;
                        self.try_complete(id, out);
                    }
                } else if progress == PeerProgress::Written {
                    // Completed before the WriteAck (protocols A and B): written on
                    // the peer now, stable once a barrier covers this epoch.
                    if let Some(e) = self
                        .transfer_log
                        .iter_mut()
                        .rev()
                        .find(|e| e.id == id && e.epoch == NOT_WRITTEN)
                    {
                        e.epoch = self.epoch;
                        self.note_written(out);
                    }
                }
            }
            Event::PeerFailed { id } => {
                if let Some(b) = self
                    .barriers
                    .iter()
                    .position(|b| b.kind == BarrierKind::Flush(id))
                {
                    // The peer's flush failed: it proves nothing.
                    self.barriers.remove(b);
                }
                if let Some(i) = self.transfer_log.iter().rposition(|e| e.id == id) {
                    if let Some(e) = self.transfer_log.remove(i) {
                        self.cong.tl_bytes -= e.len_bytes;
                        out.push(Action::MarkOutOfSync {
                            offset_bytes: e.offset_bytes,
                            len_bytes: e.len_bytes,
                        });
                    }
                }
                if let Some(p) = self.pending.get_mut(&id) {
                    if p.peer_needed && p.peer < PeerProgress::Written {
                        p.peer = PeerProgress::Written;
                        p.peer_failed = true;
                        if p.kind.is_write() {
                            out.push(Action::MarkOutOfSync {
                                offset_bytes: p.offset_bytes,
                                len_bytes: p.len_bytes,
                            });
                        }
                        self.try_complete(id, out);
                    }
                }
            }
            Event::PeerRequest {
                peer_id,
                kind,
                offset_bytes,
                len_bytes,
            } => self.on_peer_request(peer_id, kind, offset_bytes, len_bytes, out),
            Event::PeerRequestDone { peer_id, result } => {
                let Some(p) = self
                    .peer_index
                    .remove(&peer_id)
                    .and_then(|arrival| self.peer_reqs.remove(&arrival))
                else {
                    tracing::error!(peer_id, "completion of an unknown peer request");
                    return;
                };
                assert!(
                    p.submitted,
                    "peer request {peer_id} completed but never submitted"
                );
                self.counters.local_pending -= 1;
                self.counters.unacked -= 1;
                let current = p.conn_gen == self.conn_gen;
                let kind = match result {
                    Ok(()) => {
                        if p.kind.is_write() {
                            self.counters.disk_written_bytes += p.len_bytes;
                            if current {
                                self.peer_epoch_writes = self.peer_epoch_writes.saturating_add(1);
                            }
                        }
                        AckKind::Write
                    }
                    Err(errno) => AckKind::Neg(errno),
                };
                if current {
                    out.push(Action::AckPeer { peer_id, kind });
                } else {
                    // B8: the request came on a connection that is gone. Its Primary
                    // marked it out of sync when it lost us; an ack on the current
                    // connection would acknowledge a different request that reuses
                    // the id (a restarted Primary numbers from 1 again). DRBD drops
                    // the acks of peer requests with their connection.
                    tracing::debug!(
                        peer_id,
                        ?kind,
                        "no ack for a peer request of an older connection"
                    );
                }
                self.release_peer_blocked(out);
                if p.kind.is_write() && !self.blocked.is_empty() {
                    self.release_blocked(out);
                }
            }
            Event::Tick => {
                if let Change::Asking { deadline_ms, .. } = self.change {
                    if self.now_ms >= deadline_ms {
                        tracing::warn!("no reply to our state-change request");
                        let timeout_ms = self.state_change_timeout_ms;
                        self.fail_promotion(StateChangeError::NoReply(timeout_ms), out);
                    }
                }
                if self.epoch_writes > 0 && self.now_ms >= self.epoch_start_ms + EPOCH_CLOSE_MS {
                    self.close_epoch(out);
                }
                self.congestion_tick(out);
            }
            Event::PeerBarrier { epoch } => {
                // Every write whose WriteAck we sent is complete: a flush started
                // now makes them all stable.
                self.counters.local_pending += 1;
                out.push(Action::FlushForBarrier {
                    epoch,
                    token: self.conn_gen,
                });
            }
            Event::PeerBarrierDone {
                epoch,
                token,
                result,
            } => {
                self.counters.local_pending -= 1;
                match result {
                    Ok(()) if token == self.conn_gen => {
                        out.push(Action::AckBarrier {
                            epoch,
                            count: std::mem::take(&mut self.peer_epoch_writes),
                        });
                    }
                    Ok(()) => {}
                    // No ack: the Primary keeps the epoch's writes and marks them
                    // out of sync when the connection goes.
                    Err(errno) => {
                        tracing::error!(epoch, errno, "flush for the peer's barrier failed")
                    }
                }
            }
            Event::PeerBarrierAck { epoch } => self.barrier_acked(BarrierKind::Barrier(epoch)),
            Event::PeerStateChangeRequest { role } => self.on_state_change_request(role, out),
            Event::PeerStateChangeReply { reply } => self.on_state_change_reply(reply, out),
        }
        debug_assert_eq!(self.counters.app_pending, self.pending.len() as u64);
        debug_assert_eq!(self.counters.unacked, self.peer_reqs.len() as u64);
        debug_assert_eq!(
            self.cong.tl_bytes,
            self.transfer_log.iter().map(|e| e.len_bytes).sum::<u64>()
        );
    }

    fn on_request(
        &mut self,
        id: ReqId,
        kind: ReqKind,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        // A SyncSource may be Secondary: resync reads need usable data, not a role.
        let refusal = if self.role != Role::Primary && kind != ReqKind::Resync {
            Some(Refusal::NotPrimary(self.role))
        } else if !(self.disk.is_usable()
            || kind != ReqKind::Resync && (self.diskless_served() || self.sync_target_served()))
        {
            Some(Refusal::NoUsableData(self.disk))
        } else if offset_bytes
            .checked_add(len_bytes)
            .is_none_or(|end| end > self.size_bytes)
        {
            Some(Refusal::OutOfRange)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            out.push(Action::Complete {
                id,
                result: Err(refusal),
            });
            return;
        }
        assert!(
            !self.pending.contains_key(&id),
            "request id {id} reused while in flight"
        );
        // A write waits for overlapping writes in flight: ours, and the previous
        // Primary's still being applied here after a failover.
        let overlaps = kind.excludes_writes()
            && (self.peer_write_overlaps(offset_bytes, len_bytes)
                || self.pending.values().any(|p| {
                    p.kind.excludes_writes()
                        && overlap(p.offset_bytes, p.len_bytes, offset_bytes, len_bytes)
                }));
        self.pending.insert(
            id,
            Pending {
                kind,
                offset_bytes,
                len_bytes,
                submitted: false,
                local: None,
                peer_needed: false,
                peer: PeerProgress::None,
                peer_failed: false,
            },
        );
        self.counters.app_pending += 1;
        if overlaps {
            self.blocked.push_back(id);
        } else {
            self.submit(id, out);
        }
    }

    /// Submits a request locally and, when a peer is connected and the request
    /// changes data (or is a flush), to the peer; marks it out of sync otherwise.
    fn submit(&mut self, id: ReqId, out: &mut Vec<Action>) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        p.submitted = true;
        self.counters.local_pending += 1;
        out.push(Action::SubmitLocal(id));
        let (kind, offset_bytes, len_bytes) = (p.kind, p.offset_bytes, p.len_bytes);
        let replicated = kind.is_write() || kind == ReqKind::Flush;
        if !replicated {
            return;
        }
        if kind.is_write() {
            self.check_congestion(out);
        }
        if self.conn == ConnState::Ahead {
            // Pulled ahead: the peer gets the range, not the data; the resync
            // started once it caught up sends it.
            if kind.is_write() {
                out.push(Action::MarkOutOfSync {
                    offset_bytes,
                    len_bytes,
                });
                out.push(Action::SendOutOfSync {
                    offset_bytes,
                    len_bytes,
                });
            }
            return;
        }
        let connected = self.conn.is_connected();
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        if connected {
            p.peer_needed = true;
            // The driver hands the frame to the connection's bounded queue (our send
            // buffer) before the request's future may return: protocol A's condition.
            p.peer = PeerProgress::Sent;
            self.counters.peer_pending += 1;
            if p.kind == ReqKind::Write {
                self.counters.net_sent_bytes += p.len_bytes;
            }
            if p.kind.is_write() {
                self.cong.sent_pending_bytes += p.len_bytes;
            }
            let flush = p.kind == ReqKind::Flush;
            out.push(Action::SendPeer(id));
            if flush {
                // The peer's FlushAck proves every write it acknowledged before
                // receiving the flush stable: an application flush closes the epoch.
                self.barriers.push_back(OpenBarrier {
                    kind: BarrierKind::Flush(id),
                    epoch: self.epoch,
                });
                self.next_epoch();
            }
        } else if p.kind.is_write() {
            out.push(Action::MarkOutOfSync {
                offset_bytes: p.offset_bytes,
                len_bytes: p.len_bytes,
            });
        }
    }

    /// Completes `id` if both its local and peer conditions hold.
    fn try_complete(&mut self, id: ReqId, out: &mut Vec<Action>) {
        let need = self.protocol.needs();
        let Some(p) = self.pending.get(&id) else {
            return;
        };
        let Some(local) = p.local else {
            return;
        };
        if p.peer_needed && p.peer < need {
            return;
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        // Diskless (disk detached after an I/O error): a write or flush exists only
        // on the peer; without the peer's acknowledgement it failed.
        let local = if self.disk == DiskState::Diskless
            && (p.kind.is_write() || p.kind == ReqKind::Flush)
            && (!p.peer_needed || p.peer_failed)
        {
            Err(libc::EIO)
        } else {
            local
        };
        let mut written = false;
        if p.peer_needed {
            self.counters.peer_pending -= 1;
            if p.kind.is_write() {
                self.cong.sent_pending_bytes -= p.len_bytes;
            }
            if p.kind.is_write() && self.conn.is_connected() {
                written = p.peer >= PeerProgress::Written;
                self.cong.tl_bytes += p.len_bytes;
                self.transfer_log.push_back(TlEntry {
                    id,
                    offset_bytes: p.offset_bytes,
                    len_bytes: p.len_bytes,
                    epoch: if written { self.epoch } else { NOT_WRITTEN },
                });
            }
        }
        self.counters.app_pending -= 1;
        out.push(Action::Complete {
            id,
            result: local.map_err(Refusal::LocalError),
        });
        if written {
            self.note_written(out);
        }
        if p.kind.excludes_writes() && !self.blocked.is_empty() {
            self.release_blocked(out);
        }
    }

    /// A transfer-log entry was tagged with the current epoch: close the epoch
    /// once it holds `max-epoch-size` written writes.
    fn note_written(&mut self, out: &mut Vec<Action>) {
        if self.epoch_writes == 0 {
            self.epoch_start_ms = self.now_ms;
        }
        self.epoch_writes += 1;
        if self.epoch_writes >= self.max_epoch_size {
            self.close_epoch(out);
        }
    }

    /// Sends a barrier for the current epoch (if it holds written writes).
    fn close_epoch(&mut self, out: &mut Vec<Action>) {
        if self.epoch_writes == 0 || !self.conn.is_connected() {
            return;
        }
        let epoch = self.epoch as u32; // the wire carries the low 32 bits
        self.barriers.push_back(OpenBarrier {
            kind: BarrierKind::Barrier(epoch),
            epoch: self.epoch,
        });
        out.push(Action::SendBarrier { epoch });
        self.next_epoch();
    }

    fn next_epoch(&mut self) {
        self.epoch += 1;
        self.epoch_writes = 0;
        self.epoch_start_ms = self.now_ms;
    }

    /// A barrier (or flush) was acknowledged: the written entries of its epoch and
    /// older ones are stable on the peer and leave the transfer log.
    fn barrier_acked(&mut self, kind: BarrierKind) {
        let Some(i) = self.barriers.iter().position(|b| b.kind == kind) else {
            return;
        };
        let upto = self.barriers[i].epoch;
        // Older barriers are covered by this one.
        self.barriers.drain(..=i);
        let mut released_bytes = 0;
        self.transfer_log.retain(|e| {
            let keep = e.epoch == NOT_WRITTEN || e.epoch > upto;
            if !keep {
                released_bytes += e.len_bytes;
            }
            keep
        });
        self.cong.tl_bytes -= released_bytes;
    }

    /// The peer is gone: every write it may miss is marked out of sync before its
    /// completion is reported.
    fn lose_peer(&mut self, next: ConnState, out: &mut Vec<Action>) {
        if self.conn != next {
            tracing::info!("conn( {} -> {next} )", self.conn);
        }
        self.conn = next;
        if self.role == Role::Secondary
            && self.peer_role == Role::Primary
            && self.disk == DiskState::UpToDate
        {
            // The Primary may go on writing without us: our data is consistent but
            // no longer known to be current.
            tracing::info!("disk( UpToDate -> Consistent ) lost the Primary");
            self.disk = DiskState::Consistent;
        }
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::DUnknown;
        // Every write not covered by a barrier ack may be missing on the peer (its
        // volatile cache may be gone): the resync repairs it.
        for e in self.transfer_log.drain(..) {
            out.push(Action::MarkOutOfSync {
                offset_bytes: e.offset_bytes,
                len_bytes: e.len_bytes,
            });
        }
        self.barriers.clear();
        self.congestion_reset();
        self.next_epoch();
        self.conn_gen += 1;
        self.peer_epoch_writes = 0;
        self.peer_promoting = false;
        self.replies_owed = 0;
        if self.change != Change::Idle {
            self.change = Change::Idle;
            out.push(Action::PromoteDone {
                result: Err(StateChangeError::Interrupted),
            });
        }
        // Writes still in flight that the peer acknowledged are not proven stable
        // there either (no barrier ack yet): marked too.
        for p in self.pending.values() {
            if p.peer_needed && p.peer >= PeerProgress::Written && p.kind.is_write() {
                out.push(Action::MarkOutOfSync {
                    offset_bytes: p.offset_bytes,
                    len_bytes: p.len_bytes,
                });
            }
        }
        let waiting: Vec<ReqId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.peer_needed && p.peer < PeerProgress::Written)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if let Some(p) = self.pending.get_mut(&id) {
                if p.kind.is_write() {
                    out.push(Action::MarkOutOfSync {
                        offset_bytes: p.offset_bytes,
                        len_bytes: p.len_bytes,
                    });
                }
                p.peer = PeerProgress::Written;
                p.peer_failed = true;
            }
            self.try_complete(id, out);
        }
    }

    /// A Diskless Primary serves I/O through a connected UpToDate peer.
    fn diskless_served(&self) -> bool {
        self.disk == DiskState::Diskless
            && self.conn.is_connected()
            && self.peer_disk == DiskState::UpToDate
    }

    /// A SyncTarget with an UpToDate peer: the driver reads blocks not resynced
    /// yet from the peer.
    pub fn sync_target_served(&self) -> bool {
        self.disk == DiskState::Inconsistent
            && self.conn == ConnState::SyncTarget
            && self.peer_disk == DiskState::UpToDate
    }

    fn peer_write_overlaps(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.peer_reqs.values().any(|q| {
            q.kind.is_write() && overlap(q.offset_bytes, q.len_bytes, offset_bytes, len_bytes)
        })
    }

    /// Submits, in arrival order, every blocked write that no longer overlaps an
    /// in-flight write (nor an earlier blocked one).
    fn release_blocked(&mut self, out: &mut Vec<Action>) {
        let mut still_blocked = VecDeque::with_capacity(self.blocked.len());
        let mut ahead: Vec<(u64, u64)> = Vec::new();
        for id in std::mem::take(&mut self.blocked) {
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            let (off, len) = (p.offset_bytes, p.len_bytes);
            let overlaps_ahead = ahead.iter().any(|&(o, l)| overlap(o, l, off, len));
            let overlaps_running = self.peer_write_overlaps(off, len)
                || self.pending.values().any(|q| {
                    q.submitted
                        && q.kind.excludes_writes()
                        && overlap(q.offset_bytes, q.len_bytes, off, len)
                });
            if overlaps_ahead || overlaps_running {
                ahead.push((off, len));
                still_blocked.push_back(id);
            } else {
                self.submit(id, out);
            }
        }
        self.blocked = still_blocked;
    }

    fn on_peer_request(
        &mut self,
        peer_id: u64,
        kind: ReqKind,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<Action>,
    ) {
        if offset_bytes
            .checked_add(len_bytes)
            .is_none_or(|end| end > self.size_bytes)
            // A Primary takes resync writes only (as a SyncTarget: the peer is
            // Secondary, it sends no application writes).
            || self.role == Role::Primary && self.conn != ConnState::SyncTarget
            || self.peer_index.contains_key(&peer_id)
        {
            tracing::error!(peer_id, offset_bytes, len_bytes, role = %self.role, "refusing a peer request");
            out.push(Action::AckPeer {
                peer_id,
                kind: AckKind::Neg(libc::EINVAL),
            });
            return;
        }
        if kind.is_write() {
            self.counters.net_received_bytes += len_bytes;
        }
        // A flush is a barrier: it waits for every earlier peer write. Writes wait
        // for earlier overlapping writes (and earlier flushes), so the peer's disk
        // sees overlapping writes in the Primary's order.
        let blocked = self.peer_reqs.values().any(|p| match kind {
            ReqKind::Flush => p.kind.is_write() || p.kind == ReqKind::Flush,
            _ => {
                p.kind == ReqKind::Flush
                    || (p.kind.is_write()
                        && overlap(p.offset_bytes, p.len_bytes, offset_bytes, len_bytes))
            }
        });
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.peer_index.insert(peer_id, arrival);
        self.peer_reqs.insert(
            arrival,
            PeerPending {
                peer_id,
                kind,
                offset_bytes,
                len_bytes,
                submitted: !blocked,
                conn_gen: self.conn_gen,
            },
        );
        self.counters.unacked += 1;
        if self.protocol == Protocol::B {
            out.push(Action::AckPeer {
                peer_id,
                kind: AckKind::Recv,
            });
        }
        if blocked {
            self.peer_blocked.push_back(arrival);
        } else {
            self.counters.local_pending += 1;
            out.push(Action::SubmitPeerRequest(peer_id));
        }
    }

    fn release_peer_blocked(&mut self, out: &mut Vec<Action>) {
        let mut still = VecDeque::new();
        for arrival in std::mem::take(&mut self.peer_blocked) {
            let Some(p) = self.peer_reqs.get(&arrival) else {
                continue;
            };
            let (kind, off, len) = (p.kind, p.offset_bytes, p.len_bytes);
            // Only requests that arrived earlier can hold this one back.
            let blocked = self.peer_reqs.range(..arrival).any(|(_, q)| match kind {
                ReqKind::Flush => q.kind.is_write() || q.kind == ReqKind::Flush,
                _ => {
                    q.kind == ReqKind::Flush
                        || (q.kind.is_write() && overlap(q.offset_bytes, q.len_bytes, off, len))
                }
            });
            if blocked {
                still.push_back(arrival);
            } else if let Some(p) = self.peer_reqs.get_mut(&arrival) {
                p.submitted = true;
                self.counters.local_pending += 1;
                out.push(Action::SubmitPeerRequest(p.peer_id));
            }
        }
        self.peer_blocked = still;
    }
}

/// `on-congestion` (types and the design in `congestion.rs`).
impl Engine {
    /// Sets `on-congestion`, `congestion-fill` and `congestion-extents`.
    pub fn set_congestion(&mut self, settings: Congestion) {
        self.cong.settings = settings;
    }

    /// Whether `congestion-extents` is checked (the driver then reports the
    /// activity log's use before each write).
    pub fn watches_al_in_use(&self) -> bool {
        self.cong.settings.policy != CongestionPolicy::Block
            && self.cong.settings.extents > 0
            && self.protocol == Protocol::A
    }

    /// The driver reports the activity log's extents with writes in flight.
    pub fn set_al_in_use(&mut self, extents: u32) {
        self.cong.al_in_use = extents;
    }

    /// Bytes sent to the peer and not yet proven stable there (DRBD's `ap_in_flight`).
    pub fn net_in_flight_bytes(&self) -> u64 {
        self.cong.sent_pending_bytes + self.cong.tl_bytes
    }

    /// Before a write is handed to the peer: checks the thresholds (protocol A,
    /// `Connected`, a policy other than `block`).
    fn check_congestion(&mut self, out: &mut Vec<Action>) {
        let c = self.cong.settings;
        if c.policy == CongestionPolicy::Block
            || self.protocol != Protocol::A
            || self.conn != ConnState::Connected
        {
            return;
        }
        let why = if c.fill_bytes > 0 && self.net_in_flight_bytes() >= c.fill_bytes {
            "congestion-fill threshold reached"
        } else if c.extents > 0 && self.cong.al_in_use >= c.extents {
            "congestion-extents threshold reached"
        } else {
            return;
        };
        match c.policy {
            CongestionPolicy::Block => {}
            CongestionPolicy::PullAhead => {
                tracing::warn!(
                    in_flight_bytes = self.net_in_flight_bytes(),
                    al_in_use = self.cong.al_in_use,
                    "{why}: conn( Connected -> Ahead ), writes are marked out of sync and resynced later"
                );
                self.conn = ConnState::Ahead;
                self.cong.drained_since_ms = None;
                self.cong.resync_asked = false;
                out.push(Action::AnnounceState);
            }
            CongestionPolicy::Disconnect => {
                if !self.cong.drop_asked {
                    self.cong.drop_asked = true;
                    tracing::warn!(
                        in_flight_bytes = self.net_in_flight_bytes(),
                        "{why}: on-congestion disconnect drops the connection"
                    );
                    out.push(Action::DropConnection { reason: why });
                }
            }
        }
    }

    /// The peer announced it went Ahead of us: we are Behind, our data Outdated
    /// until the resync it starts.
    pub fn peer_went_ahead(&mut self) {
        if self.conn != ConnState::Connected {
            return;
        }
        tracing::warn!("conn( Connected -> Behind ) the peer pulled ahead");
        self.conn = ConnState::Behind;
        if self.disk == DiskState::UpToDate {
            tracing::info!("disk( UpToDate -> Outdated ) Behind the peer");
            self.disk = DiskState::Outdated;
        }
    }

    /// On each tick: an Ahead Primary whose earlier writes were all acknowledged
    /// asks for the resync after [`AHEAD_TO_SYNC_MS`].
    fn congestion_tick(&mut self, out: &mut Vec<Action>) {
        if self.conn != ConnState::Ahead || self.cong.resync_asked {
            return;
        }
        if self.net_in_flight_bytes() > 0 {
            self.cong.drained_since_ms = None;
            return;
        }
        let since = *self.cong.drained_since_ms.get_or_insert(self.now_ms);
        if self.now_ms >= since + AHEAD_TO_SYNC_MS {
            self.cong.resync_asked = true;
            tracing::info!("Ahead and every sent write acknowledged: starting the resync");
            out.push(Action::StartResync);
        }
    }

    /// The connection went: a new one starts from `Connected` again.
    fn congestion_reset(&mut self) {
        self.cong.tl_bytes = 0;
        self.cong.drained_since_ms = None;
        self.cong.resync_asked = false;
        self.cong.drop_asked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: ReqId, kind: ReqKind, off: u64, len: u64) -> Event {
        Event::Request {
            id,
            kind,
            offset_bytes: off,
            len_bytes: len,
        }
    }

    #[test]
    fn secondary_refuses_io() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Read, 0, 4096), &mut out);
        assert_eq!(
            out,
            vec![Action::Complete {
                id: 1,
                result: Err(Refusal::NotPrimary(Role::Secondary))
            }]
        );
    }

    #[test]
    fn primary_needs_force_on_inconsistent() {
        let mut e = Engine::new(1 << 20, DiskState::Inconsistent, Protocol::C);
        assert!(matches!(
            e.promote(false),
            Err(StateChangeError::NeedUpToDate(DiskState::Inconsistent))
        ));
        assert_eq!(e.promote(true), Ok(true));
        assert_eq!(e.disk(), DiskState::UpToDate);
        assert_eq!(e.role(), Role::Primary);
    }

    #[test]
    fn out_of_range_is_refused() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        e.promote(false).unwrap();
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, (1 << 20) - 512, 4096), &mut out);
        assert!(matches!(
            out[0],
            Action::Complete {
                result: Err(Refusal::OutOfRange),
                ..
            }
        ));
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn overlapping_writes_are_serialised_in_arrival_order() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        e.promote(false).unwrap();
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, 0, 8192), &mut out);
        e.handle(0, req(2, ReqKind::Write, 4096, 4096), &mut out);
        e.handle(0, req(3, ReqKind::Write, 4096, 512), &mut out);
        e.handle(0, req(4, ReqKind::Write, 65536, 4096), &mut out);
        out.retain(|a| !matches!(a, Action::MarkOutOfSync { .. }));
        assert_eq!(out, vec![Action::SubmitLocal(1), Action::SubmitLocal(4)]);
        out.clear();
        e.handle(
            0,
            Event::LocalDone {
                id: 1,
                result: Ok(()),
            },
            &mut out,
        );
        out.retain(|a| !matches!(a, Action::MarkOutOfSync { .. }));
        // 2 is released; 3 still overlaps 2.
        assert_eq!(
            out,
            vec![
                Action::Complete {
                    id: 1,
                    result: Ok(())
                },
                Action::SubmitLocal(2)
            ]
        );
        out.clear();
        e.handle(
            0,
            Event::LocalDone {
                id: 2,
                result: Ok(()),
            },
            &mut out,
        );
        out.retain(|a| !matches!(a, Action::MarkOutOfSync { .. }));
        assert_eq!(
            out,
            vec![
                Action::Complete {
                    id: 2,
                    result: Ok(())
                },
                Action::SubmitLocal(3)
            ]
        );
        assert!(e.demote().is_err(), "demote with requests in flight");
    }

    #[test]
    fn local_error_is_reported() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        e.promote(false).unwrap();
        let mut out = Vec::new();
        e.handle(0, req(7, ReqKind::Read, 0, 512), &mut out);
        out.clear();
        e.handle(
            0,
            Event::LocalDone {
                id: 7,
                result: Err(5),
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![Action::Complete {
                id: 7,
                result: Err(Refusal::LocalError(5))
            }]
        );
        assert_eq!(e.counters().disk_read_bytes, 0);
    }

    fn connected(protocol: Protocol) -> Engine {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, protocol);
        e.promote(false).unwrap();
        let mut out = Vec::new();
        e.handle(
            0,
            Event::PeerConnected {
                role: Role::Secondary,
                disk: DiskState::UpToDate,
            },
            &mut out,
        );
        assert!(out.is_empty());
        e
    }

    fn completes(out: &[Action], id: ReqId) -> bool {
        out.iter()
            .any(|a| matches!(a, Action::Complete { id: i, result: Ok(()) } if *i == id))
    }

    #[test]
    fn each_protocol_completes_on_its_own_condition() {
        for (protocol, enough) in [
            (Protocol::A, PeerProgress::Sent),
            (Protocol::B, PeerProgress::Received),
            (Protocol::C, PeerProgress::Written),
        ] {
            let mut e = connected(protocol);
            let mut out = Vec::new();
            e.handle(0, req(1, ReqKind::Write, 0, 4096), &mut out);
            assert_eq!(out, vec![Action::SubmitLocal(1), Action::SendPeer(1)]);
            out.clear();
            e.handle(
                0,
                Event::LocalDone {
                    id: 1,
                    result: Ok(()),
                },
                &mut out,
            );
            if protocol == Protocol::A {
                // Handing the frame to the connection is protocol A's condition.
                assert!(completes(&out, 1), "A waits for more than the send");
                continue;
            }
            assert!(out.is_empty(), "{protocol:?} completed before the peer");
            for step in [PeerProgress::Received, PeerProgress::Written] {
                e.handle(
                    0,
                    Event::PeerProgressed {
                        id: 1,
                        progress: step,
                    },
                    &mut out,
                );
                assert_eq!(
                    completes(&out, 1),
                    step >= enough,
                    "{protocol:?} at {step:?}"
                );
                if step >= enough {
                    break;
                }
            }
            assert_eq!(e.in_flight(), 0);
            assert_eq!(e.counters().peer_pending, 0);
        }
    }

    #[test]
    fn peer_progress_before_local_completion_waits_for_the_disk() {
        let mut e = connected(Protocol::C);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, 0, 4096), &mut out);
        out.clear();
        e.handle(
            0,
            Event::PeerProgressed {
                id: 1,
                progress: PeerProgress::Written,
            },
            &mut out,
        );
        assert!(out.is_empty());
        e.handle(
            0,
            Event::LocalDone {
                id: 1,
                result: Ok(()),
            },
            &mut out,
        );
        assert!(completes(&out, 1));
    }

    #[test]
    fn losing_the_peer_marks_unacknowledged_writes_before_completing_them() {
        let mut e = connected(Protocol::C);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, 8192, 4096), &mut out);
        e.handle(0, req(2, ReqKind::Write, 65536, 512), &mut out);
        e.handle(
            0,
            Event::LocalDone {
                id: 1,
                result: Ok(()),
            },
            &mut out,
        );
        e.handle(
            0,
            Event::PeerProgressed {
                id: 2,
                progress: PeerProgress::Written,
            },
            &mut out,
        );
        out.clear();
        e.handle(0, Event::PeerLost, &mut out);
        // 2 (written on the peer, not yet covered by a barrier ack): marked, completes
        // when its local write is done; 1: marked then completed.
        assert_eq!(
            out,
            vec![
                Action::MarkOutOfSync {
                    offset_bytes: 65536,
                    len_bytes: 512
                },
                Action::MarkOutOfSync {
                    offset_bytes: 8192,
                    len_bytes: 4096
                },
                Action::Complete {
                    id: 1,
                    result: Ok(())
                },
            ]
        );
        assert_eq!(e.conn(), ConnState::Connecting);
        out.clear();
        e.handle(
            0,
            Event::LocalDone {
                id: 2,
                result: Ok(()),
            },
            &mut out,
        );
        assert!(completes(&out, 2));
        // Writes while disconnected are marked out of sync.
        out.clear();
        e.handle(0, req(3, ReqKind::Write, 0, 4096), &mut out);
        assert_eq!(
            out,
            vec![
                Action::SubmitLocal(3),
                Action::MarkOutOfSync {
                    offset_bytes: 0,
                    len_bytes: 4096
                }
            ]
        );
    }

    #[test]
    fn negative_ack_marks_out_of_sync() {
        let mut e = connected(Protocol::C);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, 0, 4096), &mut out);
        e.handle(
            0,
            Event::LocalDone {
                id: 1,
                result: Ok(()),
            },
            &mut out,
        );
        out.clear();
        e.handle(0, Event::PeerFailed { id: 1 }, &mut out);
        assert_eq!(
            out[0],
            Action::MarkOutOfSync {
                offset_bytes: 0,
                len_bytes: 4096
            }
        );
        assert!(completes(&out, 1));
    }

    #[test]
    fn single_primary_refuses_promotion_while_peer_is_primary() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        e.handle(
            0,
            Event::PeerConnected {
                role: Role::Primary,
                disk: DiskState::UpToDate,
            },
            &mut out,
        );
        assert_eq!(e.promote(false), Err(StateChangeError::PeerIsPrimary));
    }

    fn peer_req(pid: u64, kind: ReqKind, off: u64, len: u64) -> Event {
        Event::PeerRequest {
            peer_id: pid,
            kind,
            offset_bytes: off,
            len_bytes: len,
        }
    }

    #[test]
    fn secondary_applies_overlapping_peer_writes_in_order_and_flush_is_a_barrier() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        e.handle(0, peer_req(10, ReqKind::Write, 0, 4096), &mut out);
        e.handle(0, peer_req(11, ReqKind::Write, 4096, 4096), &mut out);
        e.handle(0, peer_req(12, ReqKind::Write, 0, 512), &mut out);
        e.handle(0, peer_req(13, ReqKind::Flush, 0, 0), &mut out);
        e.handle(0, peer_req(14, ReqKind::Write, 65536, 4096), &mut out);
        assert_eq!(
            out,
            vec![Action::SubmitPeerRequest(10), Action::SubmitPeerRequest(11)]
        );
        out.clear();
        e.handle(
            0,
            Event::PeerRequestDone {
                peer_id: 10,
                result: Ok(()),
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Action::AckPeer {
                    peer_id: 10,
                    kind: AckKind::Write
                },
                Action::SubmitPeerRequest(12)
            ]
        );
        out.clear();
        e.handle(
            0,
            Event::PeerRequestDone {
                peer_id: 11,
                result: Ok(()),
            },
            &mut out,
        );
        e.handle(
            0,
            Event::PeerRequestDone {
                peer_id: 12,
                result: Err(5),
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Action::AckPeer {
                    peer_id: 11,
                    kind: AckKind::Write
                },
                Action::AckPeer {
                    peer_id: 12,
                    kind: AckKind::Neg(5)
                },
                Action::SubmitPeerRequest(13)
            ]
        );
        out.clear();
        e.handle(
            0,
            Event::PeerRequestDone {
                peer_id: 13,
                result: Ok(()),
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Action::AckPeer {
                    peer_id: 13,
                    kind: AckKind::Write
                },
                Action::SubmitPeerRequest(14)
            ]
        );
        assert_eq!(e.counters().unacked, 1);
    }

    #[test]
    fn protocol_b_acknowledges_receipt_at_once() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::B);
        let mut out = Vec::new();
        e.handle(0, peer_req(1, ReqKind::Write, 0, 4096), &mut out);
        assert_eq!(
            out,
            vec![
                Action::AckPeer {
                    peer_id: 1,
                    kind: AckKind::Recv
                },
                Action::SubmitPeerRequest(1)
            ]
        );
    }

    #[test]
    fn a_primary_refuses_peer_writes() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        e.promote(false).unwrap();
        let mut out = Vec::new();
        e.handle(0, peer_req(1, ReqKind::Write, 0, 4096), &mut out);
        assert_eq!(
            out,
            vec![Action::AckPeer {
                peer_id: 1,
                kind: AckKind::Neg(libc::EINVAL)
            }]
        );
    }

    #[test]
    fn a_secondary_sync_source_may_read_for_resync() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Resync, 0, 65536), &mut out);
        assert_eq!(out, vec![Action::SubmitLocal(1)]);
        out.clear();
        // It completes on the local read alone (the driver sends the data).
        e.handle(
            0,
            Event::LocalDone {
                id: 1,
                result: Ok(()),
            },
            &mut out,
        );
        assert!(completes(&out, 1));
        assert!(e.demote().is_ok());
    }

    fn ack_written(e: &mut Engine, id: ReqId, out: &mut Vec<Action>) {
        e.handle(0, Event::LocalDone { id, result: Ok(()) }, out);
        e.handle(
            0,
            Event::PeerProgressed {
                id,
                progress: PeerProgress::Written,
            },
            out,
        );
    }

    fn marks(out: &[Action]) -> usize {
        out.iter()
            .filter(|a| matches!(a, Action::MarkOutOfSync { .. }))
            .count()
    }

    #[test]
    fn written_writes_stay_in_the_transfer_log_until_a_barrier_ack() {
        let mut e = connected(Protocol::C);
        e.set_max_epoch_size(2);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, 0, 4096), &mut out);
        ack_written(&mut e, 1, &mut out);
        assert!(completes(&out, 1));
        assert_eq!(e.transfer_log_len(), 1);
        out.clear();
        // The second written write fills the epoch: a barrier closes it.
        e.handle(0, req(2, ReqKind::Write, 8192, 4096), &mut out);
        ack_written(&mut e, 2, &mut out);
        assert!(out.contains(&Action::SendBarrier { epoch: 0 }), "{out:?}");
        // A write acknowledged after the barrier belongs to the next epoch.
        e.handle(0, req(3, ReqKind::Write, 16384, 4096), &mut out);
        ack_written(&mut e, 3, &mut out);
        assert_eq!(e.transfer_log_len(), 3);
        e.handle(0, Event::PeerBarrierAck { epoch: 0 }, &mut out);
        assert_eq!(e.transfer_log_len(), 1);
        // A stale or unknown barrier ack releases nothing.
        e.handle(0, Event::PeerBarrierAck { epoch: 7 }, &mut out);
        assert_eq!(e.transfer_log_len(), 1);
        out.clear();
        e.handle(0, Event::PeerLost, &mut out);
        assert_eq!(
            out,
            vec![Action::MarkOutOfSync {
                offset_bytes: 16384,
                len_bytes: 4096
            }]
        );
        assert_eq!(e.transfer_log_len(), 0);
    }

    #[test]
    fn an_application_flush_and_the_tick_close_epochs() {
        let mut e = connected(Protocol::A);
        let mut out = Vec::new();
        e.handle(0, req(1, ReqKind::Write, 0, 4096), &mut out);
        e.handle(
            0,
            Event::LocalDone {
                id: 1,
                result: Ok(()),
            },
            &mut out,
        );
        assert!(
            completes(&out, 1),
            "protocol A completes before the WriteAck"
        );
        // The flush goes out before the WriteAck of 1 arrived: it cannot cover 1.
        e.handle(0, req(2, ReqKind::Flush, 0, 0), &mut out);
        e.handle(
            0,
            Event::PeerProgressed {
                id: 1,
                progress: PeerProgress::Written,
            },
            &mut out,
        );
        ack_written(&mut e, 2, &mut out);
        assert_eq!(e.transfer_log_len(), 1);
        // The tick closes the epoch holding 1 once it is old enough.
        out.clear();
        e.handle(EPOCH_CLOSE_MS - 1, Event::Tick, &mut out);
        assert!(out.is_empty(), "{out:?}");
        e.handle(EPOCH_CLOSE_MS + 1, Event::Tick, &mut out);
        assert_eq!(out, vec![Action::SendBarrier { epoch: 1 }]);
        e.handle(0, Event::PeerBarrierAck { epoch: 1 }, &mut out);
        assert_eq!(e.transfer_log_len(), 0);
        out.clear();
        e.handle(0, Event::PeerLost, &mut out);
        assert_eq!(marks(&out), 0);
    }

    #[test]
    fn a_secondary_acks_a_barrier_after_its_flush_on_the_same_connection_only() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        let up = Event::PeerConnected {
            role: Role::Primary,
            disk: DiskState::UpToDate,
        };
        e.handle(0, up.clone(), &mut out);
        e.handle(0, Event::PeerBarrier { epoch: 4 }, &mut out);
        assert_eq!(out, vec![Action::FlushForBarrier { epoch: 4, token: 0 }]);
        assert_eq!(e.counters().local_pending, 1);
        out.clear();
        let done = |token| Event::PeerBarrierDone {
            epoch: 4,
            token,
            result: Ok(()),
        };
        e.handle(0, done(0), &mut out);
        assert_eq!(out, vec![Action::AckBarrier { epoch: 4, count: 0 }]);
        out.clear();
        e.handle(0, Event::PeerBarrier { epoch: 5 }, &mut out);
        e.handle(0, Event::PeerLost, &mut out);
        e.handle(0, up, &mut out);
        out.clear();
        e.handle(0, done(0), &mut out);
        assert!(
            out.is_empty(),
            "a flush of the old connection acks nothing: {out:?}"
        );
        assert_eq!(e.counters().local_pending, 0);
    }

    fn secondary_pair() -> (Engine, Engine) {
        let mut a = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut b = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        a.set_conflict_winner(true);
        let mut out = Vec::new();
        for e in [&mut a, &mut b] {
            e.handle(
                0,
                Event::PeerConnected {
                    role: Role::Secondary,
                    disk: DiskState::UpToDate,
                },
                &mut out,
            );
        }
        (a, b)
    }

    /// Delivers `from`'s state-change frames in `out` to `to`; returns `to`'s actions.
    fn deliver(to: &mut Engine, out: &[Action]) -> Vec<Action> {
        let mut back = Vec::new();
        for a in out {
            let ev = match a {
                Action::SendStateChangeRequest { role } => {
                    Event::PeerStateChangeRequest { role: *role }
                }
                Action::SendStateChangeReply { reply } => {
                    Event::PeerStateChangeReply { reply: *reply }
                }
                _ => continue,
            };
            to.handle(0, ev, &mut back);
        }
        back
    }

    #[test]
    fn promotion_while_connected_waits_for_the_peer() {
        let (mut a, mut b) = secondary_pair();
        let mut out = Vec::new();
        assert_eq!(a.begin_promote(0, false, &mut out), Ok(PromoteStart::Asked));
        assert_eq!(a.role(), Role::Secondary);
        let reply = deliver(&mut b, &out);
        assert_eq!(
            reply,
            vec![Action::SendStateChangeReply {
                reply: ChangeReply::Granted
            }]
        );
        // Granted: b refuses its own promotion until it sees a Primary.
        assert_eq!(
            b.begin_promote(0, false, &mut Vec::new()),
            Err(StateChangeError::Concurrent)
        );
        let done = deliver(&mut a, &reply);
        assert_eq!(
            done,
            vec![
                Action::PromoteDone { result: Ok(false) },
                Action::AnnounceState
            ]
        );
        assert_eq!(a.role(), Role::Primary);
        // A Primary refuses the peer's request.
        let mut out = Vec::new();
        b.handle(
            0,
            Event::PeerState {
                role: Role::Primary,
                disk: DiskState::UpToDate,
            },
            &mut out,
        );
        assert_eq!(
            b.begin_promote(0, false, &mut out),
            Err(StateChangeError::PeerIsPrimary)
        );
        let back = deliver(
            &mut a,
            &[Action::SendStateChangeRequest {
                role: Role::Primary,
            }],
        );
        assert_eq!(
            back,
            vec![Action::SendStateChangeReply {
                reply: ChangeReply::TwoPrimaries
            }]
        );
    }

    #[test]
    fn racing_promotions_let_exactly_one_node_win() {
        let (mut a, mut b) = secondary_pair();
        let (mut qa, mut qb) = (Vec::new(), Vec::new());
        assert_eq!(a.begin_promote(0, false, &mut qa), Ok(PromoteStart::Asked));
        assert_eq!(b.begin_promote(0, false, &mut qb), Ok(PromoteStart::Asked));
        // Both requests cross on the wire.
        let from_b = deliver(&mut b, &qa); // b loses: aborts its own, grants a's
        let from_a = deliver(&mut a, &qb); // a wins: refuses b's
        assert!(from_b.contains(&Action::PromoteDone {
            result: Err(StateChangeError::Concurrent)
        }));
        assert!(from_a.contains(&Action::SendStateChangeReply {
            reply: ChangeReply::Concurrent
        }));
        let a_done = deliver(&mut a, &from_b);
        let _ = deliver(&mut b, &from_a);
        assert!(a_done.contains(&Action::PromoteDone { result: Ok(false) }));
        assert_eq!(a.role(), Role::Primary);
        assert_eq!(b.role(), Role::Secondary);
    }

    #[test]
    fn a_promotion_without_reply_times_out_and_one_interrupted_by_a_loss_fails() {
        let (mut a, _) = secondary_pair();
        a.set_state_change_timeout_ms(500);
        let mut out = Vec::new();
        assert_eq!(
            a.begin_promote(10, false, &mut out),
            Ok(PromoteStart::Asked)
        );
        out.clear();
        a.handle(400, Event::Tick, &mut out);
        assert!(out.is_empty());
        a.handle(510, Event::Tick, &mut out);
        assert_eq!(
            out[0],
            Action::PromoteDone {
                result: Err(StateChangeError::NoReply(500))
            }
        );
        assert_eq!(a.role(), Role::Secondary);
        // A late grant of the timed-out request is ignored; the release was sent.
        assert!(out.contains(&Action::SendStateChangeRequest {
            role: Role::Secondary
        }));
        out.clear();
        a.handle(
            600,
            Event::PeerStateChangeReply {
                reply: ChangeReply::Granted,
            },
            &mut out,
        );
        a.handle(
            600,
            Event::PeerStateChangeReply {
                reply: ChangeReply::Granted,
            },
            &mut out,
        );
        assert_eq!(a.role(), Role::Secondary);
        assert_eq!(
            a.begin_promote(700, false, &mut out),
            Ok(PromoteStart::Asked)
        );
        out.clear();
        a.handle(710, Event::PeerLost, &mut out);
        assert_eq!(
            out,
            vec![Action::PromoteDone {
                result: Err(StateChangeError::Interrupted)
            }]
        );
    }

    /// B8 (docs/simulation.md): a peer write of a connection that is gone completes
    /// after the next connection came up; its ack must not go out on the new one,
    /// where the restarted Primary reuses the id for another write.
    #[test]
    fn peer_request_of_an_older_connection_is_not_acked_on_the_new_one() {
        let mut e = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
        let mut out = Vec::new();
        let primary = Event::PeerConnected {
            role: Role::Primary,
            disk: DiskState::UpToDate,
        };
        e.handle(0, primary.clone(), &mut out);
        e.handle(0, peer_req(4, ReqKind::Write, 0, 4096), &mut out);
        assert_eq!(out, vec![Action::SubmitPeerRequest(4)]);
        out.clear();
        e.handle(1, Event::PeerLost, &mut out);
        e.handle(2, primary, &mut out);
        // The new connection's request 4 collides with the old one still on disk:
        // refused (the Primary marks it out of sync), never confused with it.
        out.clear();
        e.handle(3, peer_req(4, ReqKind::Write, 8192, 4096), &mut out);
        assert_eq!(
            out,
            vec![Action::AckPeer {
                peer_id: 4,
                kind: AckKind::Neg(libc::EINVAL)
            }]
        );
        out.clear();
        e.handle(
            4,
            Event::PeerRequestDone {
                peer_id: 4,
                result: Ok(()),
            },
            &mut out,
        );
        assert!(out.is_empty(), "stale ack sent: {out:?}");
        assert_eq!(e.counters().unacked, 0);
        assert_eq!(e.counters().local_pending, 0);
        // Requests of the current connection are acknowledged as before.
        e.handle(5, peer_req(4, ReqKind::Write, 8192, 4096), &mut out);
        e.handle(
            6,
            Event::PeerRequestDone {
                peer_id: 4,
                result: Ok(()),
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                Action::SubmitPeerRequest(4),
                Action::AckPeer {
                    peer_id: 4,
                    kind: AckKind::Write
                }
            ]
        );
    }
}
