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

use std::collections::{BTreeMap, HashMap, VecDeque};

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
    /// Writes completed towards the application before the peer wrote them
    /// (protocols A and B), by id: kept until the peer's WriteAck and marked out of
    /// sync if the peer is lost first (DRBD's transfer log).
    transfer_log: BTreeMap<ReqId, (u64, u64)>,
    counters: Counters,
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
            transfer_log: BTreeMap::new(),
            counters: Counters::default(),
        }
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

    /// Promotes this node. With `force`, Inconsistent or Outdated data becomes
    /// UpToDate (DRBD's `primary --force`). Returns whether the data was forced.
    pub fn promote(&mut self, force: bool) -> Result<bool, StateChangeError> {
        if self.conn.is_connected() && self.peer_role == Role::Primary {
            return Err(StateChangeError::PeerIsPrimary);
        }
        match self.disk {
            DiskState::Diskless | DiskState::Attaching => Err(StateChangeError::Diskless),
            DiskState::UpToDate => {
                self.role = Role::Primary;
                Ok(false)
            }
            other if force => {
                tracing::info!("disk( {other} -> UpToDate ) by primary --force");
                self.disk = DiskState::UpToDate;
                self.role = Role::Primary;
                Ok(true)
            }
            // A Consistent disk without a peer to compare with may be promoted: the
            // administrator knows it is the survivor (DRBD's degraded start).
            DiskState::Consistent if !self.conn.is_connected() => {
                self.disk = DiskState::UpToDate;
                self.role = Role::Primary;
                Ok(false)
            }
            other => Err(StateChangeError::NeedUpToDate(other)),
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
        self.role = Role::Secondary;
        Ok(())
    }

    /// Feeds one event; actions are appended to `out` in the order to carry out.
    pub fn handle(&mut self, _now_ms: u64, event: Event, out: &mut Vec<Action>) {
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
            }
            Event::PeerLost => self.lose_peer(ConnState::Connecting, out),
            Event::Disconnect => self.lose_peer(ConnState::StandAlone, out),
            Event::Connect => {
                if self.conn == ConnState::StandAlone {
                    self.conn = ConnState::Connecting;
                }
            }
            Event::PeerProgressed { id, progress } => {
                if let Some(p) = self.pending.get_mut(&id) {
                    if p.peer_needed && progress > p.peer {
                        p.peer = progress;
                        self.try_complete(id, out);
                    }
                } else if progress == PeerProgress::Written {
                    self.transfer_log.remove(&id);
                }
            }
            Event::PeerFailed { id } => {
                if let Some((offset_bytes, len_bytes)) = self.transfer_log.remove(&id) {
                    out.push(Action::MarkOutOfSync {
                        offset_bytes,
                        len_bytes,
                    });
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
                let kind = match result {
                    Ok(()) => {
                        if p.kind.is_write() {
                            self.counters.disk_written_bytes += p.len_bytes;
                        }
                        AckKind::Write
                    }
                    Err(errno) => AckKind::Neg(errno),
                };
                out.push(Action::AckPeer { peer_id, kind });
                self.release_peer_blocked(out);
                if p.kind.is_write() && !self.blocked.is_empty() {
                    self.release_blocked(out);
                }
            }
        }
        debug_assert_eq!(self.counters.app_pending, self.pending.len() as u64);
        debug_assert_eq!(self.counters.unacked, self.peer_reqs.len() as u64);
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
        } else if !(self.disk.is_usable() || kind != ReqKind::Resync && self.diskless_served()) {
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
        let connected = self.conn.is_connected();
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        p.submitted = true;
        self.counters.local_pending += 1;
        out.push(Action::SubmitLocal(id));
        let replicated = p.kind.is_write() || p.kind == ReqKind::Flush;
        if !replicated {
            return;
        }
        if connected {
            p.peer_needed = true;
            // The driver hands the frame to the connection's bounded queue (our send
            // buffer) before the request's future may return: protocol A's condition.
            p.peer = PeerProgress::Sent;
            self.counters.peer_pending += 1;
            if p.kind == ReqKind::Write {
                self.counters.net_sent_bytes += p.len_bytes;
            }
            out.push(Action::SendPeer(id));
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
        if p.peer_needed {
            self.counters.peer_pending -= 1;
            if p.kind.is_write() && p.peer < PeerProgress::Written {
                self.transfer_log.insert(id, (p.offset_bytes, p.len_bytes));
            }
        }
        self.counters.app_pending -= 1;
        out.push(Action::Complete {
            id,
            result: local.map_err(Refusal::LocalError),
        });
        if p.kind.excludes_writes() && !self.blocked.is_empty() {
            self.release_blocked(out);
        }
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
        for (_, (offset_bytes, len_bytes)) in std::mem::take(&mut self.transfer_log) {
            out.push(Action::MarkOutOfSync {
                offset_bytes,
                len_bytes,
            });
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
            || self.role == Role::Primary
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
        // 1: marked then completed; 2: marked, completes when its local write is done.
        assert_eq!(
            out,
            vec![
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
}
