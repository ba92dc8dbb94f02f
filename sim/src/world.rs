//! The simulated world: two nodes (engine + driver model + disk), the link between
//! them, the workload, the faults and the invariant checks.
//!
//! The driver model mirrors `src/engine/volume.rs` action by action: `SendPeer` ->
//! Data/Flush frame on the current connection; a received Data/Flush frame ->
//! `peer_work` + `PeerRequest`; `SubmitPeerRequest` -> a local write of the peer's
//! payload (or ECANCELED when the work was dropped at a disconnect); `AckPeer` ->
//! RecvAck/WriteAck/FlushAck/NegAck on whatever connection is current (the engine
//! emits no ack for peer work of an older connection: B8); detach -> `peer_work`
//! cleared + `PeerLost`. Request ids restart at 1 when a node restarts, as
//! `Volume::new` does. A switchover closes the Primary's device, flushes it (an
//! application flush) and then demotes, as `Volume::demote_waiting` does (B6).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use crate::disk::SimDisk;
use crate::engine::core::{
    AckKind, Action, ChangeReply, Engine, Event, PeerProgress, PromoteStart, ReqId, ReqKind,
};
use crate::engine::state::{DiskState, Role};
use crate::engine::StateChangeError;
use crate::rng::Rng;
use crate::sync_model::{Observed, SyncModel};
use crate::{Bug, Invariant, SimOptions, SimReport, Violation};

const SECTOR_BYTES: u64 = 512;
const FAULT_TICK_MS: u64 = 10;
/// After faults stop, everything must settle within this simulated time.
const HEAL_DEADLINE_MS: u64 = 120_000;
/// Per mille of I/Os that fail on a disk in failing mode.
const FAILING_IO_PER_MILLE: u32 = 50;

/// What a local I/O does.
#[derive(Debug, Clone, Copy)]
enum Io {
    Write {
        first: usize,
        n: usize,
        version: u64,
        fua: bool,
    },
    Flush {
        mark: u64,
    },
    Read,
    /// The peer work was dropped (disconnect): ECANCELED without touching the disk.
    Cancelled,
}

#[derive(Debug, Clone, Copy)]
enum DiskOp {
    App(ReqId),
    Peer(u64),
    /// The flush for the peer's barrier.
    Barrier {
        epoch: u32,
        token: u64,
    },
}

/// Why a promotion was started (what to do with its outcome).
#[derive(Debug, Clone, Copy)]
enum Why {
    /// Failover or switchover (`from` == the node itself for a failover).
    Retry { from: usize, attempts: u32 },
    /// A refused switchover gives the role back to the old Primary.
    Back,
    /// An administrator's promotion; the peer's role as this node saw it.
    Rogue { peer_role: Role },
    /// The cluster manager: 0 last Primary, 1 the other node, 2 last Primary forced.
    Manager { stage: u8 },
}

#[derive(Debug, Clone)]
enum Frame {
    Data {
        id: u64,
        first: usize,
        n: usize,
        version: u64,
        fua: bool,
    },
    Flush {
        id: u64,
    },
    RecvAck {
        id: u64,
    },
    WriteAck {
        id: u64,
    },
    FlushAck {
        id: u64,
    },
    NegAck {
        id: u64,
    },
    State {
        role: Role,
        disk: DiskState,
    },
    Barrier {
        epoch: u32,
    },
    BarrierAck {
        epoch: u32,
    },
    StateChangeRequest {
        role: Role,
    },
    StateChangeReply {
        reply: ChangeReply,
    },
}

#[derive(Debug)]
enum Ev {
    AppTick,
    FaultTick,
    DiskDone {
        node: usize,
        inc: u64,
        op: DiskOp,
        io: Io,
        result: Result<(), i32>,
    },
    Deliver {
        to: usize,
        epoch: u64,
        frame: Frame,
    },
    PeerLostTimeout {
        node: usize,
        inc: u64,
    },
    Connect,
    Heal,
    Crash {
        node: usize,
        /// Always a power loss (injected bugs).
        power: bool,
    },
    Restart {
        node: usize,
    },
    PromoteRetry {
        node: usize,
        from: usize,
        attempts: u32,
    },
}

/// An application request in the driver (volume.rs's `Slot`).
#[derive(Debug, Clone)]
struct Slot {
    kind: ReqKind,
    first: usize,
    n: usize,
    version: u64,
    fua: bool,
    /// `SendPeer` was carried out for it.
    sent: bool,
    /// A WriteAck/FlushAck for it reached the engine while it was pending.
    peer_written: bool,
}

/// A write sent to the peer whose WriteAck has not arrived yet.
#[derive(Debug, Clone)]
struct SentWrite {
    first: usize,
    n: usize,
    version: u64,
    completed_ok: bool,
}

/// A request received from the peer (volume.rs's `PeerWork`).
#[derive(Debug, Clone)]
struct PeerWork {
    kind: ReqKind,
    first: usize,
    n: usize,
    version: u64,
    fua: bool,
    taken: bool,
}

struct Node {
    engine: Engine,
    up: bool,
    inc: u64,
    disk: SimDisk,
    /// The persistent out-of-sync bitmap, per sector.
    oos: Vec<bool>,
    slots: BTreeMap<ReqId, Slot>,
    peer_work: BTreeMap<u64, PeerWork>,
    sent: BTreeMap<ReqId, SentWrite>,
    /// Epoch of the connection frames go to (volume.rs's `peer_tx`).
    peer_tx: Option<u64>,
    next_id: ReqId,
    /// Local I/Os submitted by the engine and not yet reported done.
    outstanding: u64,
    slow: bool,
    failing: bool,
    /// Disk state this node comes back with after a restart.
    restart_disk: DiskState,
    /// Whether it should be promoted when it comes back.
    restart_promote: bool,
    /// Per sector: completion number of the last write this node completed as
    /// Primary that no flush acknowledged by the peer covers yet (0: none). This is
    /// what DRBD's activity log covers when a Primary crashes.
    hot: Vec<u64>,
    /// Completion number when each in-flight flush was submitted.
    flush_gen: BTreeMap<ReqId, u64>,
    /// A promotion waiting for the peer's answer, and why it was started.
    promoting: Option<Why>,
}

impl Node {
    fn new(sectors: usize, opts: &SimOptions) -> Node {
        Node {
            engine: Engine::new(
                sectors as u64 * SECTOR_BYTES,
                DiskState::UpToDate,
                opts.protocol,
            ),
            up: true,
            inc: 0,
            disk: SimDisk::new(sectors),
            oos: vec![false; sectors],
            slots: BTreeMap::new(),
            peer_work: BTreeMap::new(),
            sent: BTreeMap::new(),
            peer_tx: None,
            next_id: 1,
            outstanding: 0,
            slow: false,
            failing: false,
            restart_disk: DiskState::UpToDate,
            restart_promote: false,
            hot: vec![0; sectors],
            flush_gen: BTreeMap::new(),
            promoting: None,
        }
    }

    fn is_primary(&self) -> bool {
        self.up && self.engine.role() == Role::Primary
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Key(u64, u64);

struct World<'a> {
    opts: &'a SimOptions,
    seed: u64,
    rng: Rng,
    now: u64,
    step: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Key>>,
    events: BTreeMap<u64, Ev>,
    nodes: [Node; 2],
    sectors: usize,
    link_up: bool,
    session: bool,
    epoch: u64,
    next_free: [u64; 2],
    frames_in_flight: u64,
    connect_scheduled: bool,
    heal_scheduled: bool,
    /// Per sector: the newest version the Secondary acknowledged as written.
    acked_ver: Vec<u64>,
    next_version: u64,
    /// Completion counter for `Node::hot`.
    gen: u64,
    faults_on: bool,
    heal_start: Option<u64>,
    pause_until: u64,
    dirty: bool,
    failover_pending: Option<usize>,
    switch_pending: bool,
    /// A switchover closing the device of this Primary: no new application
    /// requests; demoted once its flush (this request id) completes (B6).
    closing: Option<(usize, ReqId)>,
    /// The node that was Primary last (the cluster manager's choice when none is).
    last_primary: usize,
    trace: VecDeque<String>,
    report: SimReport,
    /// A violation found where no `Res` could carry it.
    pending_violation: Option<Violation>,
    /// Generation UUIDs, judged by `src/engine/sync.rs` at each handshake.
    meta: SyncModel,
}

type Res = Result<(), Violation>;

fn fnv(content: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in content {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, Violation> {
    assert!(
        opts.size_bytes >= 64 * 1024 && opts.size_bytes % SECTOR_BYTES == 0,
        "size_bytes must be a multiple of 512 of at least 64 KiB"
    );
    let sectors = (opts.size_bytes / SECTOR_BYTES) as usize;
    let mut w = World {
        opts,
        seed,
        rng: Rng::new(seed),
        now: 0,
        step: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        nodes: [Node::new(sectors, opts), Node::new(sectors, opts)],
        sectors,
        link_up: true,
        session: false,
        epoch: 0,
        next_free: [0; 2],
        frames_in_flight: 0,
        connect_scheduled: false,
        heal_scheduled: false,
        acked_ver: vec![0; sectors],
        next_version: 1,
        gen: 1,
        faults_on: true,
        heal_start: None,
        pause_until: 0,
        dirty: false,
        failover_pending: None,
        switch_pending: false,
        closing: None,
        last_primary: 0,
        trace: VecDeque::with_capacity(opts.trace_len + 1),
        report: SimReport {
            seed,
            ..SimReport::default()
        },
        pending_violation: None,
        meta: SyncModel::new(),
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
    match outcome {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(w.violation(Invariant::EnginePanic, format!("panic: {msg}")))
        }
    }
}

impl World<'_> {
    fn run(&mut self) -> Result<SimReport, Violation> {
        self.nodes[0].engine.set_connecting(true);
        self.nodes[1].engine.set_connecting(true);
        if let Err(e) = self.nodes[0].engine.promote(false) {
            return Err(self.violation(Invariant::SinglePrimary, format!("initial promote: {e}")));
        }
        self.schedule(0, Ev::Connect);
        self.connect_scheduled = true;
        self.schedule(1, Ev::AppTick);
        self.schedule(FAULT_TICK_MS, Ev::FaultTick);
        loop {
            if self.faults_on && self.step >= self.opts.steps {
                self.start_heal();
            }
            let Some(Reverse(Key(t, seq))) = self.queue.pop() else {
                break;
            };
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            self.now = t;
            self.step += 1;
            self.process(ev)?;
            self.observe_meta();
            self.check_all()?;
            if let Some(p) = self.primary() {
                self.last_primary = p;
            } else if self.both_connected()
                && !self.switch_pending
                && self.failover_pending.is_none()
            {
                self.ensure_primary();
                if let Some(v) = self.pending_violation.take() {
                    return Err(v);
                }
            }
            if let Some(start) = self.heal_start {
                if self.now > start + HEAL_DEADLINE_MS {
                    return Err(self.violation(
                        Invariant::Liveness,
                        format!(
                            "not settled {HEAL_DEADLINE_MS} ms after faults stopped: {}",
                            self.describe()
                        ),
                    ));
                }
            }
        }
        if !self.quiescent() {
            return Err(self.violation(
                Invariant::Liveness,
                format!(
                    "nothing left to happen but not settled: {}",
                    self.describe()
                ),
            ));
        }
        self.checkpoint()?;
        let p = self.primary().unwrap_or(0);
        self.report.steps = self.step;
        self.report.end_time_ms = self.now;
        self.report.final_hash = fnv(self.nodes[p].disk.content());
        Ok(self.report.clone())
    }

    /// Feeds what changed on each node to the UUID model.
    fn observe_meta(&mut self) {
        for i in 0..2 {
            let n = &self.nodes[i];
            let o = Observed {
                up: n.up,
                role: n.engine.role(),
                disk: n.engine.disk(),
                connected: n.engine.conn().is_connected(),
            };
            self.meta.observe(i, o);
        }
    }

    // ----- scheduling and tracing -------------------------------------------------

    fn schedule(&mut self, delay_ms: u64, ev: Ev) {
        let seq = self.seq;
        self.seq += 1;
        self.queue.push(Reverse(Key(self.now + delay_ms, seq)));
        self.events.insert(seq, ev);
    }

    fn note(&mut self, what: String) {
        if self.opts.trace_len == 0 {
            return;
        }
        if self.trace.len() == self.opts.trace_len {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("#{} t={} {}", self.step, self.now, what));
    }

    fn violation(&self, invariant: Invariant, message: String) -> Violation {
        Violation {
            seed: self.seed,
            invariant,
            step: self.step,
            time_ms: self.now,
            message,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "link_up={} session={} frames_in_flight={}",
            self.link_up, self.session, self.frames_in_flight
        );
        for (i, n) in self.nodes.iter().enumerate() {
            let c = n.engine.counters();
            s.push_str(&format!(
                "; n{i}: up={} role={} disk={} conn={} in_flight={} local_pending={} unacked={} outstanding={}",
                n.up,
                n.engine.role(),
                n.engine.disk(),
                n.engine.conn(),
                n.engine.in_flight(),
                c.local_pending,
                c.unacked,
                n.outstanding
            ));
        }
        s
    }

    fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| self.nodes[i].is_primary())
    }

    fn both_connected(&self) -> bool {
        self.session
            && self
                .nodes
                .iter()
                .all(|n| n.up && n.engine.conn().is_connected())
    }

    // ----- the engine and the driver model -----------------------------------------

    fn feed(&mut self, n: usize, ev: Event) -> Res {
        self.note(format!("n{n} <- {ev:?}"));
        let mut actions = Vec::new();
        self.nodes[n].engine.handle(self.now, ev, &mut actions);
        if !actions.is_empty() {
            self.note(format!("n{n} -> {actions:?}"));
        }
        self.run_actions(n, actions)
    }

    fn run_actions(&mut self, n: usize, actions: Vec<Action>) -> Res {
        for action in actions {
            match action {
                Action::SubmitLocal(id) => {
                    let Some(slot) = self.nodes[n].slots.get(&id).cloned() else {
                        return Err(self.violation(
                            Invariant::Counters,
                            format!("n{n}: SubmitLocal({id}) for an unknown request"),
                        ));
                    };
                    if slot.kind == ReqKind::Flush {
                        self.nodes[n].flush_gen.insert(id, self.gen);
                    }
                    let io = match slot.kind {
                        ReqKind::Flush => Io::Flush {
                            mark: self.nodes[n].disk.flush_mark(),
                        },
                        ReqKind::Read => Io::Read,
                        _ => Io::Write {
                            first: slot.first,
                            n: slot.n,
                            version: slot.version,
                            fua: slot.fua,
                        },
                    };
                    self.nodes[n].outstanding += 1;
                    self.submit_io(n, DiskOp::App(id), io);
                }
                Action::SendPeer(id) => {
                    let Some(ep) = self.nodes[n].peer_tx else {
                        continue;
                    };
                    let Some(slot) = self.nodes[n].slots.get_mut(&id) else {
                        continue;
                    };
                    slot.sent = true;
                    let slot = slot.clone();
                    let frame = if slot.kind == ReqKind::Flush {
                        Frame::Flush { id }
                    } else {
                        self.nodes[n].sent.insert(
                            id,
                            SentWrite {
                                first: slot.first,
                                n: slot.n,
                                version: slot.version,
                                completed_ok: false,
                            },
                        );
                        Frame::Data {
                            id,
                            first: slot.first,
                            n: slot.n,
                            version: slot.version,
                            fua: slot.fua,
                        }
                    };
                    self.send(n, ep, frame);
                }
                Action::MarkOutOfSync {
                    offset_bytes,
                    len_bytes,
                } => {
                    if self.opts.inject_bug == Some(Bug::DropMarkOutOfSync) {
                        continue;
                    }
                    let first = (offset_bytes / SECTOR_BYTES) as usize;
                    let end = (offset_bytes + len_bytes).div_ceil(SECTOR_BYTES) as usize;
                    for s in first..end.min(self.sectors) {
                        self.nodes[n].oos[s] = true;
                    }
                    self.dirty = true;
                }
                Action::Complete { id, result } => {
                    let Some(slot) = self.nodes[n].slots.remove(&id) else {
                        continue;
                    };
                    if self.closing == Some((n, id)) {
                        self.switchover_flushed(n, result.is_ok());
                    }
                    let flushed_upto = self.nodes[n].flush_gen.remove(&id);
                    if let (Some(g), true, true) = (flushed_upto, result.is_ok(), slot.peer_written)
                    {
                        // Stable on both sides: the activity log may forget the
                        // writes completed before the flush was submitted (their
                        // numbers are below `g`; the next completion gets `g`).
                        for h in self.nodes[n].hot.iter_mut() {
                            if *h < g {
                                *h = 0;
                            }
                        }
                    }
                    if result.is_err() {
                        self.report.requests_failed += 1;
                        continue;
                    }
                    match slot.kind {
                        ReqKind::Flush => self.report.flushes_ok += 1,
                        ReqKind::Read => {}
                        _ => self.write_completed(n, id, &slot)?,
                    }
                }
                Action::SubmitPeerRequest(pid) => {
                    self.nodes[n].outstanding += 1;
                    let work = self.nodes[n].peer_work.get_mut(&pid).and_then(|w| {
                        if w.taken {
                            None
                        } else {
                            w.taken = true;
                            Some(w.clone())
                        }
                    });
                    let io = match work {
                        None => Io::Cancelled,
                        Some(w) if w.kind == ReqKind::Flush => Io::Flush {
                            mark: self.nodes[n].disk.flush_mark(),
                        },
                        Some(w) => Io::Write {
                            first: w.first,
                            n: w.n,
                            version: w.version,
                            fua: w.fua,
                        },
                    };
                    if let (Some(Bug::AckBeforeWrite), Io::Write { .. }) =
                        (self.opts.inject_bug, io)
                    {
                        if let Some(ep) = self.nodes[n].peer_tx {
                            self.note(format!("n{n}: BUG AckBeforeWrite acks {pid} early"));
                            self.send(n, ep, Frame::WriteAck { id: pid });
                            if self.rng.chance(300) {
                                self.schedule(
                                    0,
                                    Ev::Crash {
                                        node: n,
                                        power: false,
                                    },
                                );
                            }
                        }
                    }
                    self.submit_io(n, DiskOp::Peer(pid), io);
                }
                Action::AckPeer { peer_id, kind } => {
                    let work_kind = match kind {
                        AckKind::Recv => self.nodes[n].peer_work.get(&peer_id).map(|w| w.kind),
                        _ => self.nodes[n].peer_work.remove(&peer_id).map(|w| w.kind),
                    };
                    let Some(ep) = self.nodes[n].peer_tx else {
                        continue;
                    };
                    let frame = match (kind, work_kind) {
                        (AckKind::Recv, _) => Frame::RecvAck { id: peer_id },
                        (AckKind::Write, Some(ReqKind::Flush)) => Frame::FlushAck { id: peer_id },
                        (AckKind::Write, _) => Frame::WriteAck { id: peer_id },
                        (AckKind::Neg(_), _) => Frame::NegAck { id: peer_id },
                    };
                    self.send(n, ep, frame);
                }
                Action::SendBarrier { epoch } => {
                    if let Some(ep) = self.nodes[n].peer_tx {
                        self.send(n, ep, Frame::Barrier { epoch });
                    }
                }
                Action::FlushForBarrier { epoch, token } => {
                    if self.opts.inject_bug == Some(Bug::AckBeforeWrite) {
                        // BUG: the barrier is acknowledged before the flush, and the
                        // Secondary sometimes loses power right after.
                        self.note(format!(
                            "n{n}: BUG AckBeforeWrite acks barrier {epoch} early"
                        ));
                        if let Some(ep) = self.nodes[n].peer_tx {
                            self.send(n, ep, Frame::BarrierAck { epoch });
                        }
                        if self.rng.chance(300) {
                            self.schedule(
                                0,
                                Ev::Crash {
                                    node: n,
                                    power: true,
                                },
                            );
                        }
                    }
                    self.nodes[n].outstanding += 1;
                    let mark = self.nodes[n].disk.flush_mark();
                    self.submit_io(n, DiskOp::Barrier { epoch, token }, Io::Flush { mark });
                }
                Action::AckBarrier { epoch, .. } => {
                    if self.opts.inject_bug == Some(Bug::AckBeforeWrite) {
                        continue; // already acknowledged
                    }
                    if let Some(ep) = self.nodes[n].peer_tx {
                        self.send(n, ep, Frame::BarrierAck { epoch });
                    }
                }
                Action::SendStateChangeRequest { role } => {
                    if let Some(ep) = self.nodes[n].peer_tx {
                        self.send(n, ep, Frame::StateChangeRequest { role });
                    }
                }
                Action::SendStateChangeReply { reply } => {
                    if let Some(ep) = self.nodes[n].peer_tx {
                        self.send(n, ep, Frame::StateChangeReply { reply });
                    }
                }
                Action::PromoteDone { result } => {
                    if let Some(why) = self.nodes[n].promoting.take() {
                        self.promote_result(n, why, result)?;
                    }
                }
                Action::AnnounceState => self.announce(n),
                // The simulator runs `on-congestion block` (the default): the engine
                // never pulls ahead nor drops the link for congestion here.
                Action::SendOutOfSync { .. }
                | Action::DropConnection { .. }
                | Action::StartResync => {
                    return Err(self.violation(
                        Invariant::Counters,
                        format!("n{n}: on-congestion action {action:?} under block"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A write completed OK to the application on node `n`.
    fn write_completed(&mut self, n: usize, id: ReqId, slot: &Slot) -> Res {
        self.report.writes_ok += 1;
        for s in slot.first..slot.first + slot.n {
            self.nodes[n].hot[s] = self.gen;
        }
        self.gen += 1;
        if !slot.sent {
            // Invariant 2: written while not replicated -> marked before completion.
            if let Some(s) = (slot.first..slot.first + slot.n).find(|&s| !self.nodes[n].oos[s]) {
                return Err(self.violation(
                    Invariant::OutOfSyncCoverage,
                    format!(
                        "n{n}: write {id} (v{}) completed without being sent to the peer, \
                         but sector {s} is not marked out of sync",
                        slot.version
                    ),
                ));
            }
        }
        if slot.peer_written {
            self.raise_acked(slot.first, slot.n, slot.version);
            self.nodes[n].sent.remove(&id);
        } else if let Some(sw) = self.nodes[n].sent.get_mut(&id) {
            sw.completed_ok = true;
        }
        Ok(())
    }

    fn raise_acked(&mut self, first: usize, n: usize, version: u64) {
        for s in first..first + n {
            self.acked_ver[s] = self.acked_ver[s].max(version);
        }
    }

    fn submit_io(&mut self, n: usize, op: DiskOp, io: Io) {
        let node = &self.nodes[n];
        let (delay, result) = match io {
            Io::Cancelled => (0, Err(libc::ECANCELED)),
            _ => {
                let delay = if node.slow {
                    self.rng.range(10, 150)
                } else {
                    self.rng.range(1, 4)
                };
                let fail = node.failing && self.rng.chance(FAILING_IO_PER_MILLE);
                (delay, if fail { Err(libc::EIO) } else { Ok(()) })
            }
        };
        let inc = self.nodes[n].inc;
        self.schedule(
            delay,
            Ev::DiskDone {
                node: n,
                inc,
                op,
                io,
                result,
            },
        );
    }

    fn send(&mut self, from: usize, ep: u64, frame: Frame) {
        if ep != self.epoch || !self.session {
            // Written to a dead socket: lost.
            return;
        }
        let delay = if self.rng.chance(50) {
            self.rng.range(5, 30)
        } else {
            self.rng.range(1, 3)
        };
        let at = (self.now + delay).max(self.next_free[from]);
        self.next_free[from] = at;
        self.frames_in_flight += 1;
        let to = 1 - from;
        self.schedule(
            at - self.now,
            Ev::Deliver {
                to,
                epoch: ep,
                frame,
            },
        );
    }

    fn announce(&mut self, n: usize) {
        if let Some(ep) = self.nodes[n].peer_tx {
            let frame = Frame::State {
                role: self.nodes[n].engine.role(),
                disk: self.nodes[n].engine.disk(),
            };
            self.send(n, ep, frame);
        }
    }

    // ----- events ------------------------------------------------------------------

    fn process(&mut self, ev: Ev) -> Res {
        match ev {
            Ev::AppTick => self.app_tick(),
            Ev::FaultTick => self.fault_tick(),
            Ev::DiskDone {
                node,
                inc,
                op,
                io,
                result,
            } => self.disk_done(node, inc, op, io, result),
            Ev::Deliver { to, epoch, frame } => {
                self.frames_in_flight -= 1;
                if epoch != self.epoch || !self.session || !self.nodes[to].up {
                    return Ok(());
                }
                self.on_frame(to, frame)
            }
            Ev::PeerLostTimeout { node, inc } => self.peer_lost(node, inc),
            Ev::Connect => self.connect(),
            Ev::Heal => {
                self.heal_scheduled = false;
                if !self.link_up {
                    self.note("link healed".to_string());
                }
                self.link_up = true;
                self.schedule_connect();
                Ok(())
            }
            Ev::Crash { node, power } => self.crash(node, power),
            Ev::Restart { node } => self.restart(node),
            Ev::PromoteRetry {
                node,
                from,
                attempts,
            } => self.promote_retry(node, from, attempts),
        }
    }

    fn app_tick(&mut self) -> Res {
        if !self.faults_on {
            return Ok(());
        }
        let delay = self.rng.range(1, 3);
        self.schedule(delay, Ev::AppTick);
        if self.now < self.pause_until {
            return Ok(());
        }
        if self.rng.chance(20) {
            self.pause_until = self.now + self.rng.range(20, 80);
            return Ok(());
        }
        let Some(p) = self.primary() else {
            return Ok(());
        };
        if self.closing.is_some_and(|(c, _)| c == p) {
            // The switchover closed the device.
            return Ok(());
        }
        if self.nodes[p].slots.len() >= self.opts.max_in_flight {
            return Ok(());
        }
        let id = self.nodes[p].next_id;
        self.nodes[p].next_id += 1;
        let r = self.rng.range(0, 99);
        let (kind, fua) = match r {
            0..70 => (ReqKind::Write, false),
            70..78 => (ReqKind::Write, true),
            78..90 => (ReqKind::Flush, false),
            _ => (ReqKind::Read, false),
        };
        let (first, n) = if kind == ReqKind::Flush {
            (0, 0)
        } else {
            let n = if self.rng.chance(500) {
                self.rng.range(1, 8)
            } else {
                self.rng.range(1, 128)
            } as usize;
            (self.rng.range(0, (self.sectors - n) as u64) as usize, n)
        };
        let version = if kind == ReqKind::Write {
            self.next_version += 1;
            self.next_version - 1
        } else {
            0
        };
        self.nodes[p].slots.insert(
            id,
            Slot {
                kind,
                first,
                n,
                version,
                fua,
                sent: false,
                peer_written: false,
            },
        );
        self.feed(
            p,
            Event::Request {
                id,
                kind,
                offset_bytes: first as u64 * SECTOR_BYTES,
                len_bytes: n as u64 * SECTOR_BYTES,
            },
        )
    }

    fn disk_done(
        &mut self,
        n: usize,
        inc: u64,
        op: DiskOp,
        io: Io,
        result: Result<(), i32>,
    ) -> Res {
        if !self.nodes[n].up || self.nodes[n].inc != inc {
            return Ok(());
        }
        if result.is_ok() {
            match io {
                Io::Write {
                    first,
                    n: count,
                    version,
                    fua,
                } => {
                    // Invariant 4: an older write never lands over a newer one.
                    if let Some(s) =
                        (first..first + count).find(|&s| self.nodes[n].disk.current(s) > version)
                    {
                        let cur = self.nodes[n].disk.current(s);
                        return Err(self.violation(
                            Invariant::WriteOrder,
                            format!(
                                "n{n}: {op:?} applied v{version} over the newer v{cur} at sector {s}"
                            ),
                        ));
                    }
                    self.nodes[n].disk.write(first, count, version, fua);
                    self.dirty = true;
                }
                Io::Flush { mark } => self.nodes[n].disk.flush_done(mark),
                Io::Read | Io::Cancelled => {}
            }
        }
        self.nodes[n].outstanding -= 1;
        match op {
            DiskOp::App(id) => self.feed(n, Event::LocalDone { id, result }),
            DiskOp::Peer(peer_id) => self.feed(n, Event::PeerRequestDone { peer_id, result }),
            DiskOp::Barrier { epoch, token } => self.feed(
                n,
                Event::PeerBarrierDone {
                    epoch,
                    token,
                    result,
                },
            ),
        }
    }

    fn on_frame(&mut self, n: usize, frame: Frame) -> Res {
        match frame {
            Frame::Data {
                id,
                first,
                n: count,
                version,
                fua,
            } => {
                self.nodes[n].peer_work.insert(
                    id,
                    PeerWork {
                        kind: ReqKind::Write,
                        first,
                        n: count,
                        version,
                        fua,
                        taken: false,
                    },
                );
                self.feed(
                    n,
                    Event::PeerRequest {
                        peer_id: id,
                        kind: ReqKind::Write,
                        offset_bytes: first as u64 * SECTOR_BYTES,
                        len_bytes: count as u64 * SECTOR_BYTES,
                    },
                )
            }
            Frame::Flush { id } => {
                self.nodes[n].peer_work.insert(
                    id,
                    PeerWork {
                        kind: ReqKind::Flush,
                        first: 0,
                        n: 0,
                        version: 0,
                        fua: false,
                        taken: false,
                    },
                );
                self.feed(
                    n,
                    Event::PeerRequest {
                        peer_id: id,
                        kind: ReqKind::Flush,
                        offset_bytes: 0,
                        len_bytes: 0,
                    },
                )
            }
            Frame::RecvAck { id } => self.feed(
                n,
                Event::PeerProgressed {
                    id,
                    progress: PeerProgress::Received,
                },
            ),
            Frame::WriteAck { id } | Frame::FlushAck { id } => {
                let node = &mut self.nodes[n];
                if let Some(slot) = node.slots.get_mut(&id) {
                    if slot.sent {
                        slot.peer_written = true;
                        node.sent.remove(&id);
                    }
                } else if let Some(sw) = node.sent.remove(&id) {
                    // Completed before the ack (protocols A and B).
                    if sw.completed_ok {
                        self.raise_acked(sw.first, sw.n, sw.version);
                    }
                } else {
                    self.report.stale_acks += 1;
                    self.note(format!("n{n}: ack for {id} matches no request"));
                }
                self.feed(
                    n,
                    Event::PeerProgressed {
                        id,
                        progress: PeerProgress::Written,
                    },
                )
            }
            Frame::NegAck { id } => {
                self.feed(n, Event::PeerFailed { id })?;
                if let Some(sw) = self.nodes[n].sent.remove(&id) {
                    self.require_covered(n, &sw, &format!("after a NegAck for {id}"))?;
                }
                Ok(())
            }
            Frame::State { role, disk } => self.feed(n, Event::PeerState { role, disk }),
            Frame::Barrier { epoch } => self.feed(n, Event::PeerBarrier { epoch }),
            Frame::BarrierAck { epoch } => self.feed(n, Event::PeerBarrierAck { epoch }),
            Frame::StateChangeRequest { role } => {
                self.feed(n, Event::PeerStateChangeRequest { role })
            }
            Frame::StateChangeReply { reply } => {
                self.feed(n, Event::PeerStateChangeReply { reply })
            }
        }
    }

    fn require_covered(&self, n: usize, sw: &SentWrite, when: &str) -> Res {
        if let Some(s) = (sw.first..sw.first + sw.n).find(|&s| !self.nodes[n].oos[s]) {
            return Err(self.violation(
                Invariant::OutOfSyncCoverage,
                format!(
                    "n{n}: write v{} (sectors {}..{}) sent to the peer without a WriteAck, \
                     {when}: sector {s} is not marked out of sync",
                    sw.version,
                    sw.first,
                    sw.first + sw.n
                ),
            ));
        }
        Ok(())
    }

    /// The link is gone: frames in flight are lost; each side notices after a timeout.
    fn cut(&mut self) {
        if !self.session {
            return;
        }
        self.session = false;
        self.epoch += 1;
        for i in 0..2 {
            if self.nodes[i].up && self.nodes[i].peer_tx.is_some() {
                let inc = self.nodes[i].inc;
                let delay = self.rng.range(20, 120);
                self.schedule(delay, Ev::PeerLostTimeout { node: i, inc });
            }
        }
    }

    fn peer_lost(&mut self, n: usize, inc: u64) -> Res {
        let node = &mut self.nodes[n];
        if !node.up || node.inc != inc || node.peer_tx.is_none() {
            return Ok(());
        }
        node.peer_tx = None;
        node.peer_work.clear();
        self.feed(n, Event::PeerLost)?;
        // Invariant 2: whatever the peer may miss is marked once the loss is handled.
        let sent: Vec<SentWrite> = std::mem::take(&mut self.nodes[n].sent)
            .into_values()
            .collect();
        for sw in &sent {
            self.require_covered(n, sw, "when the connection loss was handled")?;
        }
        if self.failover_pending == Some(n) {
            self.failover_pending = None;
            self.switch_pending = true;
            self.promote_retry(n, n, 0)?;
        }
        self.schedule_connect();
        Ok(())
    }

    fn schedule_connect(&mut self) {
        if !self.connect_scheduled
            && self.link_up
            && !self.session
            && self.nodes.iter().all(|n| n.up)
        {
            self.connect_scheduled = true;
            let delay = self.rng.range(1, 20);
            self.schedule(delay, Ev::Connect);
        }
    }

    fn connect(&mut self) -> Res {
        self.connect_scheduled = false;
        if !self.link_up
            || self.session
            || self
                .nodes
                .iter()
                .any(|n| !n.up || n.engine.conn().is_connected() || n.peer_tx.is_some())
        {
            return Ok(());
        }
        if self.nodes.iter().all(|n| n.engine.role() == Role::Primary) {
            return Err(self.violation(
                Invariant::SinglePrimary,
                "both nodes are Primary at the handshake (split brain)".to_string(),
            ));
        }
        self.session = true;
        self.epoch += 1;
        self.next_free = [self.now; 2];
        self.report.connects += 1;
        let states: Vec<(Role, DiskState)> = self
            .nodes
            .iter()
            .map(|n| (n.engine.role(), n.engine.disk()))
            .collect();
        self.observe_meta();
        let oos = [0, 1].map(|i| self.nodes[i].oos.iter().filter(|&&b| b).count() as u64);
        if let Err(e) = self.meta.handshake([states[0], states[1]], oos) {
            return Err(self.violation(Invariant::ResyncDecision, e));
        }
        for i in 0..2 {
            self.nodes[i].peer_tx = Some(self.epoch);
        }
        for i in 0..2 {
            let (role, disk) = states[1 - i];
            // Racing state changes: node 0 wins (as the node whose name sorts first).
            self.nodes[i].engine.set_conflict_winner(i == 0);
            self.feed(i, Event::PeerConnected { role, disk })?;
        }
        Ok(())
    }

    fn crash(&mut self, n: usize, force_power: bool) -> Res {
        if !self.nodes[n].up {
            return Ok(());
        }
        let power = self.rng.chance(self.opts.faults.power_loss) || force_power;
        let was_primary = self.nodes[n].engine.role() == Role::Primary;
        self.note(format!(
            "n{n}: CRASH ({}) as {}",
            if power { "power loss" } else { "process" },
            self.nodes[n].engine.role()
        ));
        self.report.crashes += 1;
        if power {
            self.report.power_losses += 1;
        }
        let other = 1 - n;
        let other_connected =
            self.session && self.nodes[other].up && self.nodes[other].engine.conn().is_connected();
        self.cut();
        let node = &mut self.nodes[n];
        if was_primary {
            // DRBD's activity log: the restarted Primary resyncs every area it may have
            // been writing (in flight, in its volatile cache, or not yet stable on the
            // peer).
            let mut hot: Vec<usize> = node.disk.unstable_sectors().collect();
            hot.extend((0..node.hot.len()).filter(|&s| node.hot[s] != 0));
            for slot in node.slots.values() {
                if slot.kind.is_write() {
                    hot.extend(slot.first..slot.first + slot.n);
                }
            }
            for s in hot {
                node.oos[s] = true;
            }
            self.dirty = true;
        }
        node.disk.crash(power, &mut self.rng);
        node.up = false;
        if self.closing.is_some_and(|(c, _)| c == n) {
            self.closing = None;
        }
        node.inc += 1;
        node.slots.clear();
        node.flush_gen.clear();
        if let Some(Why::Retry { .. }) = node.promoting.take() {
            self.switch_pending = false;
        }
        let node = &mut self.nodes[n];
        node.hot.iter_mut().for_each(|h| *h = 0);
        node.peer_work.clear();
        node.sent.clear();
        node.outstanding = 0;
        node.peer_tx = None;
        node.restart_disk = if was_primary {
            DiskState::UpToDate
        } else {
            DiskState::Consistent
        };
        node.restart_promote = was_primary;
        if self.failover_pending == Some(n) {
            // It was to take over: it takes over when it comes back.
            self.failover_pending = None;
            node.restart_promote = true;
        }
        if was_primary && other_connected && self.nodes[other].engine.role() == Role::Secondary {
            self.failover_pending = Some(other);
            self.nodes[n].restart_promote = false;
        }
        let delay = self.rng.range(50, 400);
        self.schedule(delay, Ev::Restart { node: n });
        Ok(())
    }

    fn restart(&mut self, n: usize) -> Res {
        if self.nodes[n].up {
            return Ok(());
        }
        let disk = self.nodes[n].restart_disk;
        let node = &mut self.nodes[n];
        node.engine = Engine::new(self.opts.size_bytes, disk, self.opts.protocol);
        node.engine.set_connecting(true);
        node.up = true;
        node.next_id = 1;
        let other = &self.nodes[1 - n];
        let other_primary = other.engine.role() == Role::Primary;
        let promote =
            self.nodes[n].restart_promote && !other_primary && self.failover_pending != Some(1 - n);
        self.note(format!("n{n}: restart with disk {disk}, promote={promote}"));
        if promote {
            if let Err(e) = self.nodes[n].engine.promote(false) {
                self.note(format!("n{n}: promote after restart refused: {e}"));
            }
        }
        self.schedule_connect();
        Ok(())
    }

    fn promote_retry(&mut self, n: usize, from: usize, attempts: u32) -> Res {
        if !self.nodes[n].up {
            self.switch_pending = false;
            return Ok(());
        }
        if self.opts.avoid_known_bugs
            && self.nodes[n].engine.counters().unacked > 0
            && attempts < 10_000
        {
            // Workaround: never promote while writes of the old Primary are in flight.
            self.schedule(
                10,
                Ev::PromoteRetry {
                    node: n,
                    from,
                    attempts: attempts + 1,
                },
            );
            return Ok(());
        }
        self.start_promote(n, false, Why::Retry { from, attempts })
    }

    /// Starts a promotion of node `n` through the engine's cluster-wide state
    /// change; the outcome goes to [`World::promote_result`] now or when the peer
    /// answers.
    fn start_promote(&mut self, n: usize, force: bool, why: Why) -> Res {
        let mut actions = Vec::new();
        let now = self.now;
        let r = self.nodes[n].engine.begin_promote(now, force, &mut actions);
        self.note(format!(
            "n{n}: begin_promote(force={force}) for {why:?}: {r:?}"
        ));
        match r {
            Ok(PromoteStart::Asked) => {
                self.nodes[n].promoting = Some(why);
                self.run_actions(n, actions)
            }
            Ok(PromoteStart::Done(forced)) => {
                self.run_actions(n, actions)?;
                self.promote_result(n, why, Ok(forced))
            }
            Err(e) => {
                self.run_actions(n, actions)?;
                self.promote_result(n, why, Err(e))
            }
        }
    }

    fn promote_result(
        &mut self,
        n: usize,
        why: Why,
        result: Result<bool, StateChangeError>,
    ) -> Res {
        match (why, result) {
            (Why::Retry { from, .. }, Ok(_)) if from == n => {
                self.note(format!("n{n}: failover: promoted"));
                self.report.failovers += 1;
                self.switch_pending = false;
            }
            (Why::Retry { .. }, Ok(_)) => {
                self.note(format!("n{n}: switchover: promoted"));
                self.report.switchovers += 1;
                self.switch_pending = false;
                self.announce(n);
            }
            (Why::Retry { from, .. }, Err(StateChangeError::PeerIsPrimary))
                if from != n && self.nodes[from].is_primary() =>
            {
                // The old Primary took the role back (an administrator's promotion
                // won the race): the switchover is over. Retrying would promote this
                // node as soon as the link breaks, while that Primary lives on
                // (seed 40203 of the first `--faults all` soak).
                self.note(format!(
                    "n{n}: switchover abandoned: n{from} is Primary again"
                ));
                self.switch_pending = false;
            }
            (
                Why::Retry { from, attempts },
                Err(StateChangeError::PeerIsPrimary | StateChangeError::Concurrent),
            ) if attempts < 50 => {
                self.schedule(
                    10,
                    Ev::PromoteRetry {
                        node: n,
                        from,
                        attempts: attempts + 1,
                    },
                );
            }
            (Why::Retry { from, .. }, Err(e)) => {
                self.note(format!("n{n}: switchover refused: {e}; n{from} back"));
                self.switch_pending = false;
                if from != n && self.nodes[from].up && self.nodes[n].engine.role() != Role::Primary
                {
                    self.start_promote(from, false, Why::Back)?;
                }
            }
            (Why::Back, Ok(_)) => {
                self.note(format!("n{n}: re-promoted"));
                self.announce(n);
            }
            (Why::Back, Err(e)) => self.note(format!("n{n}: re-promote refused: {e}")),
            (Why::Rogue { peer_role }, Ok(_)) => {
                self.note(format!(
                    "n{n}: rogue promote succeeded (peer seen as {peer_role})"
                ));
                if self.nodes[n].engine.peer().0 == Role::Primary {
                    return Err(self.violation(
                        Invariant::SinglePrimary,
                        format!("n{n}: promotion succeeded while the peer is known Primary"),
                    ));
                }
                self.announce(n);
            }
            (Why::Rogue { .. }, Err(e)) => self.note(format!("n{n}: rogue promote refused: {e}")),
            (Why::Manager { stage }, Ok(_)) => {
                self.note(format!(
                    "n{n}: promoted by the cluster manager (stage {stage})"
                ));
                self.announce(n);
            }
            (Why::Manager { stage }, Err(e)) => {
                self.note(format!("n{n}: cluster manager's promotion refused: {e}"));
                let last = self.last_primary;
                let both_secondary = self.both_connected()
                    && self.nodes.iter().all(|x| x.engine.role() != Role::Primary);
                match stage {
                    0 if both_secondary => {
                        self.start_promote(1 - last, false, Why::Manager { stage: 1 })?
                    }
                    1 if both_secondary => {
                        self.start_promote(last, true, Why::Manager { stage: 2 })?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn fault_tick(&mut self) -> Res {
        for i in 0..2 {
            if self.nodes[i].up {
                self.feed(i, Event::Tick)?;
            }
        }
        if !self.faults_on {
            // Keep ticking while an engine has timed work (epochs, state changes).
            if self.nodes.iter().any(|n| n.up && n.engine.wants_tick()) {
                self.schedule(FAULT_TICK_MS, Ev::FaultTick);
            }
            return Ok(());
        }
        self.schedule(FAULT_TICK_MS, Ev::FaultTick);
        let f = self.opts.faults;
        if self.rng.chance(f.partition) && self.link_up {
            self.note("PARTITION".to_string());
            self.report.partitions += 1;
            self.link_up = false;
            self.cut();
            if !self.heal_scheduled {
                self.heal_scheduled = true;
                let delay = self.rng.range(20, 400);
                self.schedule(delay, Ev::Heal);
            }
        }
        if self.rng.chance(f.crash_secondary) {
            if let Some(s) = (0..2).find(|&i| self.nodes[i].up && !self.nodes[i].is_primary()) {
                self.crash(s, false)?;
            }
        }
        if self.rng.chance(f.crash_primary) {
            if let Some(p) = self.primary() {
                self.crash(p, false)?;
            }
        }
        if self.rng.chance(f.slow_disk) {
            let i = self.rng.range(0, 1) as usize;
            self.nodes[i].slow = !self.nodes[i].slow;
            self.note(format!("n{i}: slow disk = {}", self.nodes[i].slow));
        }
        if self.rng.chance(f.disk_errors) {
            let i = self.rng.range(0, 1) as usize;
            self.nodes[i].failing = !self.nodes[i].failing;
            self.note(format!("n{i}: failing disk = {}", self.nodes[i].failing));
        }
        if self.rng.chance(f.switchover)
            && self.both_connected()
            && !self.switch_pending
            && self.closing.is_none()
        {
            if let Some(p) = self.primary() {
                let e = &self.nodes[p].engine;
                if e.in_flight() == 0 && e.writes_awaiting_peer() == 0 {
                    // B6 (fixed): the device is closed and flushed (an application
                    // flush: local disk and peer, as the file system's flush at
                    // unmount) before the demotion (volume.rs `demote_waiting`).
                    let id = self.nodes[p].next_id;
                    self.nodes[p].next_id += 1;
                    self.closing = Some((p, id));
                    self.note(format!("n{p}: switchover: closing, flush {id}"));
                    self.nodes[p].slots.insert(
                        id,
                        Slot {
                            kind: ReqKind::Flush,
                            first: 0,
                            n: 0,
                            version: 0,
                            fua: false,
                            sent: false,
                            peer_written: false,
                        },
                    );
                    self.feed(
                        p,
                        Event::Request {
                            id,
                            kind: ReqKind::Flush,
                            offset_bytes: 0,
                            len_bytes: 0,
                        },
                    )?;
                }
            }
        }
        if self.rng.chance(f.rogue_promote) && self.session {
            let i = self.rng.range(0, 1) as usize;
            // Workaround: no promotion racing a switchover's state exchange, nor while
            // writes of the old Primary are in flight.
            let busy = self.opts.avoid_known_bugs
                && (self.switch_pending
                    || self.nodes[1 - i].is_primary()
                    || self.nodes[i].engine.counters().unacked > 0);
            if self.nodes[i].up && self.nodes[i].engine.role() == Role::Secondary && !busy {
                let (peer_role, _) = self.nodes[i].engine.peer();
                if self.nodes[i].promoting.is_none() {
                    self.start_promote(i, false, Why::Rogue { peer_role })?;
                }
            }
        }
        Ok(())
    }

    /// The switchover's flush completed on `p`: demote and let the peer take over
    /// (unless the flush failed or the connection went meanwhile: `p` stays Primary).
    fn switchover_flushed(&mut self, p: usize, ok: bool) {
        self.closing = None;
        if !ok || !self.both_connected() || self.switch_pending {
            self.note(format!("n{p}: switchover abandoned (flush ok={ok})"));
            return;
        }
        match self.nodes[p].engine.demote() {
            Ok(()) => {
                self.note(format!("n{p}: switchover: flushed, demoted"));
                self.switch_pending = true;
                self.announce(p);
                let delay = self.rng.range(1, 10);
                self.schedule(
                    delay,
                    Ev::PromoteRetry {
                        node: 1 - p,
                        from: p,
                        attempts: 0,
                    },
                );
            }
            Err(e) => self.note(format!("n{p}: switchover: demote refused: {e}")),
        }
    }

    fn start_heal(&mut self) {
        self.faults_on = false;
        self.heal_start = Some(self.now);
        self.note("faults stop; healing".to_string());
        for i in 0..2 {
            self.nodes[i].slow = false;
            self.nodes[i].failing = false;
            if !self.nodes[i].up {
                self.schedule(1, Ev::Restart { node: i });
            }
        }
        self.link_up = true;
        self.schedule_connect();
    }

    /// The cluster manager's rule when both nodes are up, connected and Secondary:
    /// promote the node that was Primary last (with `--force` if the engine left both
    /// disks Consistent: it has no resync yet to bring them back to UpToDate).
    fn ensure_primary(&mut self) {
        if self.opts.avoid_known_bugs && self.nodes.iter().any(|n| n.engine.counters().unacked > 0)
        {
            return;
        }
        if self.nodes.iter().any(|n| n.promoting.is_some()) {
            return;
        }
        let last = self.last_primary;
        if let Err(v) = self.start_promote(last, false, Why::Manager { stage: 0 }) {
            self.pending_violation.get_or_insert(v);
        }
    }

    // ----- invariants --------------------------------------------------------------

    fn quiescent(&self) -> bool {
        self.both_connected()
            && self.frames_in_flight == 0
            && self.primary().is_some()
            && self.nodes.iter().all(|n| {
                n.engine.in_flight() == 0
                    && n.outstanding == 0
                    && n.engine.counters().unacked == 0
                    && n.engine.counters().local_pending == 0
            })
    }

    fn check_all(&mut self) -> Res {
        // Invariant 3.
        if self.session && self.nodes.iter().all(|n| n.is_primary()) {
            return Err(self.violation(
                Invariant::SinglePrimary,
                "both nodes are Primary while connected".to_string(),
            ));
        }
        // Invariant 6.
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.up {
                continue;
            }
            let c = n.engine.counters();
            if c.app_pending != n.engine.in_flight() as u64
                || c.app_pending != n.slots.len() as u64
                || c.local_pending != n.outstanding
                || c.peer_pending > c.app_pending
            {
                return Err(self.violation(
                    Invariant::Counters,
                    format!(
                        "n{i}: counters {c:?} vs in_flight {} slots {} outstanding {}",
                        n.engine.in_flight(),
                        n.slots.len(),
                        n.outstanding
                    ),
                ));
            }
        }
        // Invariant 1, except while a Primary - or a just-demoted one whose transfer
        // log still holds writes it will mark at the loss - has not yet noticed a
        // dead link.
        let undetected = self.nodes.iter().any(|n| {
            n.up && (n.is_primary() || n.engine.transfer_log_len() > 0)
                && n.engine.conn().is_connected()
                && !self.session
        });
        if !undetected {
            for s in 0..self.sectors {
                let v = self.acked_ver[s];
                if v == 0 || self.nodes[0].oos[s] || self.nodes[1].oos[s] {
                    continue;
                }
                if let Some(i) = (0..2).find(|&i| self.nodes[i].disk.current(s) < v) {
                    return Err(self.violation(
                        Invariant::AckedWriteDurable,
                        format!(
                            "sector {s}: v{v} was acknowledged as written by the peer, n{i} has v{} \
                             and no bitmap marks the sector out of sync",
                            self.nodes[i].disk.current(s)
                        ),
                    ));
                }
            }
        }
        if self.dirty && self.quiescent() {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Both nodes connected and idle: compare, resync out-of-sync sectors from the
    /// Primary, and check the disks are identical.
    fn checkpoint(&mut self) -> Res {
        let Some(p) = self.primary() else {
            return Ok(());
        };
        let q = 1 - p;
        let mut copy = Vec::new();
        for s in 0..self.sectors {
            let (a, b) = (self.nodes[p].disk.current(s), self.nodes[q].disk.current(s));
            let marked = self.nodes[0].oos[s] || self.nodes[1].oos[s];
            if marked {
                copy.push((s, a));
            } else if a != b {
                return Err(self.violation(
                    Invariant::WriteOrder,
                    format!(
                        "connected and idle: sector {s} is v{a} on the Primary n{p}, v{b} on n{q}, \
                         and not marked out of sync"
                    ),
                ));
            }
        }
        self.report.resyncs += 1;
        self.report.resynced_sectors += copy.len() as u64;
        self.nodes[q].disk.resync(&copy);
        for &(s, v) in &copy {
            self.acked_ver[s] = v;
        }
        for n in &mut self.nodes {
            n.oos.iter_mut().for_each(|b| *b = false);
        }
        if self.nodes[p].disk.content() != self.nodes[q].disk.content() {
            return Err(self.violation(
                Invariant::ResyncIdentical,
                "disks differ after the resync".to_string(),
            ));
        }
        self.note(format!("checkpoint: resynced {} sectors", copy.len()));
        self.dirty = false;
        Ok(())
    }
}
