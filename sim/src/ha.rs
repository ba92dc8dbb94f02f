//! The heartbeat membership simulator: two nodes each running the real `rdb-ha`
//! state machine (`ha/src/machine.rs`) and its real packet authentication and replay
//! protection (`ha/src/auth.rs`), over a simulated clock and network, with the real
//! `rdbdisk` resource driving the real replication engine (`src/engine/core.rs`) and
//! the real resync decision (`src/engine/sync.rs`) at every rdb handshake.
//!
//! What is simulated (all from one `u64` seed; see `docs/simulation.md`):
//! - **Nodes** `a` (preferred) and `b`, each with `rdb-ha` (a [`Machine`] ticked every
//!   `keepalive/4` as `ha/src/daemon.rs` does, a [`Verifier`] per process, a new random
//!   generation per process start) and `rdbd` (an [`Engine`] plus the generation
//!   UUIDs, crashed-Primary flag and bitmap state that `src/engine/volume.rs` keeps).
//! - **Resources** `rdbdisk::r0` (start = `promote(false)`, retried every 200 ms
//!   within the resource timeout and refused on a StandAlone disk that is not
//!   UpToDate, exactly as `ha/src/agents.rs`; stop = `demote()`), `Filesystem` and
//!   `IPaddr` (taking time, the Filesystem start failing now and then).
//! - **Heartbeat network**: two links, UDP-like: each packet is signed and sent on
//!   both links, delayed 1-10 ms, dropped or duplicated at a per-packet rate; faults
//!   cut a link in one or both directions, partition both links, flap a link, delay a
//!   link for seconds (delay spike), cut a node off from the ping node.
//! - **Replication link**: shares link 0 (both directions up = the rdb connection can
//!   come up). At each handshake both nodes evaluate [`sync::decide`] on the UUIDs;
//!   a split brain leaves both StandAlone until an "operator" discards the data of the
//!   node not holding the group (`connect --discard-my-data`).
//! - **Faults** also crash nodes (power off: resources gone, meta-data kept) and
//!   restart them, shut `rdb-ha` down cleanly and restart it, and run the admin
//!   commands `standby` and `takeover`.
//!
//! The run alternates fault phases and quiet phases long enough for the liveness
//! bound, then heals everything and checks the final state.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt;

use rdb_ha::auth::{self, Verifier};
use rdb_ha::config::{AuthKey, AuthKeys};
use rdb_ha::machine::{Action as HaAction, Event as HaEvent, Liveness, Machine, Op, Params};
use rdb_protocol::heartbeat::{AuthAlg, NodeState, PacketType};

use crate::engine::core::{Action as EngAction, Engine, Event as EngEvent, Protocol};
use crate::engine::state::{DiskState, Role};
use crate::engine::sync::{self, SplitBrainPolicy, SyncDecision, SyncView};
use crate::meta::uuid::GenerationUuids;
use crate::rng::Rng;

/// `keepalive` of `ha.cf`.
pub const KEEPALIVE_MS: u64 = 200;
/// `deadtime`.
pub const DEADTIME_MS: u64 = 1000;
const WARNTIME_MS: u64 = 500;
/// `initdead`.
pub const INITDEAD_MS: u64 = 2000;
/// The daemon's tick: `(keepalive / 4).clamp(10, 100)`.
const TICK_MS: u64 = 50;
/// The daemon's ping period: `keepalive.max(1000)`, and `ping_once`'s timeout.
const PING_EVERY_MS: u64 = 1000;
const PING_TIMEOUT_MS: u64 = 1000;
/// `agents.rs`: a refused promotion is retried every 200 ms ...
const PROMOTE_RETRY_MS: u64 = 200;
/// ... within the resource timeout.
pub const RES_TIMEOUT_MS: u64 = 5000;
const FAULT_TICK_MS: u64 = 100;
/// Normal one-way delay of the heartbeat network, at most.
const MAX_NET_MS: u64 = 10;
const NRES: usize = 3;
/// Longest duration of one start / stop of each resource (rdbdisk: one attempt).
const START_MS: [(u64, u64); NRES] = [(5, 30), (20, 300), (5, 30)];
const STOP_MS: [(u64, u64); NRES] = [(5, 30), (20, 300), (5, 30)];
const MAX_START_TOTAL_MS: u64 = 30 + 300 + 30;
const MAX_STOP_TOTAL_MS: u64 = 30 + 300 + 30;

/// Bound of invariant [`HaInvariant::ReachableOverlap`]: two nodes that hear each
/// other never both run resources for longer than this (the worse ranked one hears
/// the other within two heartbeats, finishes the start in progress, stops all).
pub const OVERLAP_BOUND_MS: u64 =
    2 * KEEPALIVE_MS + 2 * MAX_NET_MS + 2 * TICK_MS + MAX_START_TOTAL_MS + MAX_STOP_TOTAL_MS + 100;
/// An overlap of two holders that hear each other for this long is reported by a
/// machine ("split brain: node ... also holds the resource group").
pub const DETECT_MS: u64 = 2 * KEEPALIVE_MS + 2 * MAX_NET_MS + 2 * TICK_MS;
/// Bound of [`HaInvariant::CutOffHolds`]: a node cut off from the ping node holds no
/// resource after this (ping loss noticed within a probe period plus a probe timeout,
/// then the operation in progress, at worst rdbdisk's retries, then every stop).
pub const CUT_OFF_BOUND_MS: u64 = PING_EVERY_MS
    + PING_TIMEOUT_MS
    + 10
    + RES_TIMEOUT_MS
    + MAX_START_TOTAL_MS
    + MAX_STOP_TOTAL_MS
    + 2 * TICK_MS
    + 100;
/// Bound of [`HaInvariant::Liveness`]: after this long without any fault change, an
/// eligible node (up, not failed, reaching the ping node) holds the group, and two
/// nodes that hear each other see each other alive and hold it exactly once.
pub const LIVENESS_BOUND_MS: u64 = INITDEAD_MS
    + 2 * DEADTIME_MS
    + 2 * (RES_TIMEOUT_MS + MAX_START_TOTAL_MS + MAX_STOP_TOTAL_MS)
    + PING_EVERY_MS
    + PING_TIMEOUT_MS
    + 2 * KEEPALIVE_MS
    + 1000;

const NAMES: [&str; 2] = ["a", "b"];
const RESOURCES: [&str; NRES] = [
    "rdbdisk::r0",
    "Filesystem::/dev/rdb0::/srv::ext4",
    "IPaddr::10.9.0.10/24/eth0",
];

/// A bug deliberately injected into the simulated daemon, to prove the checker
/// catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaBug {
    /// The Filesystem agent reports its stop done at once while the unmount goes on
    /// for seconds (the peer then starts the group while it still runs here).
    StopReportedEarly,
    /// A restarted daemon reuses its previous generation: the peer's replay
    /// protection refuses its packets (sequence numbers restart at 1).
    StaleGenerationOnRestart,
    /// The daemon drops failed ping results: a node cut off from the ping node never
    /// notices it.
    IgnorePingLoss,
}

/// Fault rates, per mille per fault tick (every 100 ms of a fault phase) unless said
/// otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaFaults {
    /// Both links cut both ways, healed after 0.2-4 s.
    pub partition: u32,
    /// One link (or both) cut in one direction, healed after 0.2-4 s.
    pub one_way: u32,
    /// One link cut both ways for 0.1-1.5 s.
    pub flap: u32,
    /// One link delays every packet 100-1500 ms for 0.2-2 s.
    pub delay_spike: u32,
    /// A node cut off from the ping node for 0.5-12 s.
    pub ping_cut: u32,
    /// A node powers off; back after 0.5-5 s.
    pub crash: u32,
    /// `rdb-ha` shuts down cleanly; started again 0.2-3 s later.
    pub ha_restart: u32,
    /// Admin `standby` on the holder.
    pub admin_standby: u32,
    /// Admin `takeover` on a random node.
    pub admin_takeover: u32,
    /// Per mille of packets lost (per link copy), always.
    pub drop: u32,
    /// Per mille of packets delivered twice, always.
    pub duplicate: u32,
    /// Per mille of Filesystem starts that fail.
    pub start_failure: u32,
    /// Per mille of quiet phases that keep one fault for the whole liveness window (a
    /// partition, a one-way cut of both links, a node cut off from the ping node).
    pub lasting: u32,
}

impl HaFaults {
    /// Every fault.
    pub fn all() -> HaFaults {
        HaFaults {
            partition: 8,
            one_way: 8,
            flap: 10,
            delay_spike: 10,
            ping_cut: 8,
            crash: 4,
            ha_restart: 3,
            admin_standby: 3,
            admin_takeover: 3,
            drop: 20,
            duplicate: 20,
            start_failure: 20,
            lasting: 400,
        }
    }

    /// No fault at all (a perfect network).
    pub fn none() -> HaFaults {
        HaFaults {
            partition: 0,
            one_way: 0,
            flap: 0,
            delay_spike: 0,
            ping_cut: 0,
            crash: 0,
            ha_restart: 0,
            admin_standby: 0,
            admin_takeover: 0,
            drop: 0,
            duplicate: 0,
            start_failure: 0,
            lasting: 0,
        }
    }
}

/// Options of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaOptions {
    /// Fault phase + quiet phase pairs before the final heal.
    pub cycles: u32,
    /// Fault rates.
    pub faults: HaFaults,
    /// A bug to inject.
    pub inject_bug: Option<HaBug>,
    /// Events kept in a violation's trace.
    pub trace_len: usize,
}

impl Default for HaOptions {
    fn default() -> HaOptions {
        HaOptions {
            cycles: 2,
            faults: HaFaults::all(),
            inject_bug: None,
            trace_len: 60,
        }
    }
}

/// The invariants of the membership simulation (`docs/simulation.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaInvariant {
    /// Never both engines Primary while the rdb connection is up.
    SinglePrimaryConnected,
    /// Two nodes that hear each other (both directions, both daemons up) never both
    /// run resources for longer than [`OVERLAP_BOUND_MS`].
    ReachableOverlap,
    /// A node cut off from the ping node holds nothing after [`CUT_OFF_BOUND_MS`].
    CutOffHolds,
    /// A node declares a peer dead only if no packet the peer's current process sent
    /// within the last deadtime reached it.
    FalseSuspicion,
    /// Split brain is never silent: two holders that heard each other for
    /// [`DETECT_MS`] were reported by a machine; two nodes that were both Primary
    /// while apart get `SplitBrain` from the resync decision at the handshake.
    SplitBrainSilent,
    /// The resync decision: both sides agree; the only node that changed data while
    /// apart is the source; no split brain is reported when at most one did.
    ResyncDecision,
    /// After [`LIVENESS_BOUND_MS`] without a fault change: an eligible node holds the
    /// group; nodes that hear each other see each other alive and exactly one holds
    /// the group. At the end (all healed): one node Active with every resource, the
    /// other holding nothing, rdb connected and in sync, Primary only on the holder.
    Liveness,
    /// The machine or the engine panicked.
    Panic,
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaViolation {
    /// Seed.
    pub seed: u64,
    /// Which invariant.
    pub invariant: HaInvariant,
    /// Simulated time in ms.
    pub time_ms: u64,
    /// Events processed.
    pub step: u64,
    /// What is wrong.
    pub message: String,
    /// Last events, oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for HaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::write_violation(
            f,
            format_args!(
                "ha seed {}: invariant {:?} broken at step {} (t={} ms): {}",
                self.seed, self.invariant, self.step, self.time_ms, self.message
            ),
            &self.trace,
        )
    }
}

impl std::error::Error for HaViolation {}

/// What a passing run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaReport {
    /// Seed.
    pub seed: u64,
    /// Events processed.
    pub steps: u64,
    /// Simulated time at the end.
    pub end_time_ms: u64,
    /// Heartbeat packets sent (per link copy).
    pub packets: u64,
    /// Of which lost.
    pub dropped: u64,
    /// Duplicated.
    pub duplicated: u64,
    /// Refused by the replay protection.
    pub refused: u64,
    /// Network faults injected (partitions, one-way cuts, flaps, delay spikes).
    pub net_faults: u64,
    /// Ping cuts.
    pub ping_cuts: u64,
    /// Node power-offs.
    pub crashes: u64,
    /// Clean `rdb-ha` restarts.
    pub ha_restarts: u64,
    /// Admin standby / takeover commands.
    pub admin: u64,
    /// Group starts (a node became Active).
    pub activations: u64,
    /// Activations on another node than the previous holder.
    pub failovers: u64,
    /// Failed Filesystem starts injected.
    pub start_failures: u64,
    /// rdbdisk promotions refused (and retried).
    pub promote_refusals: u64,
    /// Episodes with two holders at once.
    pub overlaps: u64,
    /// Split brains reported by a machine.
    pub split_brain_logs: u64,
    /// rdb handshakes.
    pub handshakes: u64,
    /// Split brains found by the resync decision at a handshake.
    pub split_brains_detected: u64,
    /// Resyncs started (bitmap or full).
    pub resyncs: u64,
    /// Handshakes both sides refused (the target would be a Primary).
    pub refused_handshakes: u64,
    /// Promotions without the rdb connection while the peer had changed data since they
    /// parted (the promoted node misses those writes; detected as a split brain when
    /// they reconnect).
    pub stale_promotions: u64,
    /// Liveness windows checked.
    pub liveness_checks: u64,
}

/// Runs one seed of the membership simulation.
pub fn run_ha_seed(seed: u64, opts: &HaOptions) -> Result<HaReport, HaViolation> {
    let mut w = World::new(seed, opts);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
    match outcome {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(w.violation(HaInvariant::Panic, format!("panic: {msg}")))
        }
    }
}

#[derive(Debug)]
enum Ev {
    Tick {
        node: usize,
        inc: u64,
    },
    PingProbe {
        node: usize,
        inc: u64,
    },
    PingResult {
        node: usize,
        inc: u64,
    },
    Deliver {
        to: usize,
        link: usize,
        bytes: Vec<u8>,
        sent_ms: u64,
        generation: u64,
        shutdown: bool,
    },
    ResDone {
        node: usize,
        inc: u64,
        index: usize,
        op: Op,
        ok: bool,
    },
    PromoteTry {
        node: usize,
        inc: u64,
        deadline_ms: u64,
    },
    ResGone {
        node: usize,
        index: usize,
    },
    Recheck,
    Restart {
        node: usize,
    },
    HaStart {
        node: usize,
    },
    FaultTick,
    Phase {
        quiet: bool,
    },
    RdbConnect,
    RdbState {
        to: usize,
        epoch: u64,
        role: Role,
        disk: DiskState,
    },
    SyncDone {
        epoch: u64,
    },
    SbResolve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RConn {
    Down,
    Up { syncing: bool },
    StandAlone,
}

struct Node {
    /// The host is powered.
    up: bool,
    /// Incarnation of the daemon (events of an older one are ignored).
    inc: u64,
    machine: Option<Machine>,
    verifier: Verifier,
    generation: u64,
    /// Filesystem and IPaddr running (index 0, rdbdisk, is the engine's role).
    running: [bool; NRES],
    /// Per peer-sender: newest send time of a packet of the peer's current process
    /// that reached this daemon, its generation, and whether it was a Shutdown.
    last_rx: Option<(u64, u64, bool)>,
    engine: Engine,
    /// Meta-data (survives crashes).
    uuids: GenerationUuids,
    crashed_primary: bool,
    discard_my_data: bool,
    /// Was Primary without the peer since the last resync (its data changed).
    changed: bool,
    /// Blocks marked in the bitmap.
    oos: u64,
    persisted_disk: DiskState,
}

impl Node {
    fn holder(&self) -> bool {
        self.up && (self.engine.role() == Role::Primary || self.running[1] || self.running[2])
    }
}

struct Overlap {
    start_ms: u64,
    mutual_ms: u64,
    logged: bool,
}

struct World<'a> {
    opts: &'a HaOptions,
    seed: u64,
    rng: Rng,
    now: u64,
    step: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: [Node; 2],
    keys: AuthKeys,
    /// `cut_until[link][from]`.
    cut_until: [[u64; 2]; 2],
    spike_until: [u64; 2],
    ping_cut_until: [u64; 2],
    /// When each node lost the ping node (network level), if it has.
    ping_lost_since: [Option<u64>; 2],
    rconn: RConn,
    rdb_epoch: u64,
    connect_scheduled: bool,
    faults_on: bool,
    final_phase: bool,
    cycles_done: u32,
    end_ms: Option<u64>,
    last_change_ms: u64,
    checked_change_ms: Option<u64>,
    mutual_since: Option<u64>,
    overlap: Option<Overlap>,
    last_holder: Option<usize>,
    last_sb_log_ms: Option<u64>,
    trace: VecDeque<String>,
    report: HaReport,
}

type Res = Result<(), HaViolation>;

fn params(node: usize, generation: u64) -> Params {
    Params {
        node: NAMES[node].into(),
        nodes: NAMES.iter().map(|s| s.to_string()).collect(),
        preferred: NAMES[0].into(),
        resources: RESOURCES.iter().map(|s| s.to_string()).collect(),
        links: vec!["eth0".into(), "eth1".into()],
        keepalive_ms: KEEPALIVE_MS,
        deadtime_ms: DEADTIME_MS,
        warntime_ms: WARNTIME_MS,
        initdead_ms: INITDEAD_MS,
        auto_failback: true,
        fence: false,
        ping: true,
        checks: Vec::new(),
        generation,
    }
}

impl<'a> World<'a> {
    fn new(seed: u64, opts: &'a HaOptions) -> World<'a> {
        let keys = AuthKeys {
            active: 1,
            keys: vec![AuthKey {
                index: 1,
                alg: AuthAlg::Crc,
                secret: b"sim".to_vec(),
            }],
        };
        let node = |_| {
            let mut engine = Engine::new(1 << 20, DiskState::UpToDate, Protocol::C);
            engine.set_connecting(true);
            Node {
                up: true,
                inc: 0,
                machine: None,
                verifier: Verifier::new(keys.clone()),
                generation: 0,
                running: [false; NRES],
                last_rx: None,
                engine,
                uuids: GenerationUuids {
                    current: 0x1000,
                    bitmap: 0,
                    history: [0, 0],
                },
                crashed_primary: false,
                discard_my_data: false,
                changed: false,
                oos: 0,
                persisted_disk: DiskState::UpToDate,
            }
        };
        World {
            opts,
            seed,
            rng: Rng::new(seed ^ 0x4841_5349_4d00_0000),
            now: 0,
            step: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes: [node(0), node(1)],
            keys,
            cut_until: [[0; 2]; 2],
            spike_until: [0; 2],
            ping_cut_until: [0; 2],
            ping_lost_since: [None; 2],
            rconn: RConn::Down,
            rdb_epoch: 0,
            connect_scheduled: false,
            faults_on: false,
            final_phase: false,
            cycles_done: 0,
            end_ms: None,
            last_change_ms: 0,
            checked_change_ms: None,
            mutual_since: None,
            overlap: None,
            last_holder: None,
            last_sb_log_ms: None,
            trace: VecDeque::new(),
            report: HaReport {
                seed,
                ..HaReport::default()
            },
        }
    }

    fn run(&mut self) -> Result<HaReport, HaViolation> {
        for n in 0..2 {
            // Both boot within a second of each other.
            let d = self.rng.range(0, 1000);
            self.schedule(d, Ev::HaStart { node: n });
        }
        self.schedule(1, Ev::RdbConnect);
        self.connect_scheduled = true;
        self.schedule(FAULT_TICK_MS, Ev::FaultTick);
        // First a quiet phase: the cluster forms.
        let d = self.quiet_len();
        self.schedule(d, Ev::Phase { quiet: false });
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            self.now = t;
            self.step += 1;
            self.process(ev)?;
            self.check()?;
            if self.end_ms.is_some_and(|e| self.now >= e) {
                self.final_check()?;
                self.report.steps = self.step;
                self.report.end_time_ms = self.now;
                return Ok(self.report.clone());
            }
        }
        Err(self.violation(HaInvariant::Liveness, "event queue ran dry".into()))
    }

    fn quiet_len(&mut self) -> u64 {
        LIVENESS_BOUND_MS + self.rng.range(1000, 3000)
    }

    // ----- scheduling and tracing -------------------------------------------------

    fn schedule(&mut self, delay_ms: u64, ev: Ev) {
        let seq = self.seq;
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay_ms, seq)));
        self.events.insert(seq, ev);
    }

    fn tracing(&self) -> bool {
        self.opts.trace_len > 0
    }

    fn note(&mut self, what: String) {
        if self.trace.len() == self.opts.trace_len {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("#{} t={} {}", self.step, self.now, what));
    }

    fn violation(&self, invariant: HaInvariant, message: String) -> HaViolation {
        HaViolation {
            seed: self.seed,
            invariant,
            time_ms: self.now,
            step: self.step,
            message: format!("{message} [{}]", self.describe()),
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "rdb={:?} mutual={:?} cut={:?} spike={:?} ping_cut={:?}",
            self.rconn,
            self.mutual(),
            [
                [self.cut(0, 0), self.cut(0, 1)],
                [self.cut(1, 0), self.cut(1, 1)]
            ],
            [self.spiked(0), self.spiked(1)],
            [self.ping_cut(0), self.ping_cut(1)]
        );
        for (i, n) in self.nodes.iter().enumerate() {
            let st = n.machine.as_ref().map(|m| m.status(self.now));
            s.push_str(&format!(
                "; {}: up={} ha={} running={:?} role={} disk={} conn={} uuid={:x}/{:x} changed={}",
                NAMES[i],
                n.up,
                st.as_ref().map_or("down".to_string(), |st| format!(
                    "{}{}{}{} peer={:?}",
                    st.state,
                    if st.failed { " failed" } else { "" },
                    if st.standby { " standby" } else { "" },
                    if st.ping_lost { " ping-lost" } else { "" },
                    st.peers[0].liveness
                )),
                [n.engine.role() == Role::Primary, n.running[1], n.running[2]],
                n.engine.role(),
                n.engine.disk(),
                n.engine.conn(),
                n.uuids.current,
                n.uuids.bitmap,
                n.changed
            ));
        }
        s
    }

    // ----- network state -------------------------------------------------------------

    fn cut(&self, link: usize, from: usize) -> bool {
        self.now < self.cut_until[link][from]
    }

    fn spiked(&self, link: usize) -> bool {
        self.now < self.spike_until[link]
    }

    fn ping_cut(&self, n: usize) -> bool {
        self.now < self.ping_cut_until[n]
    }

    /// A packet from `from` gets through on some link without a delay spike.
    fn reaches(&self, from: usize) -> bool {
        (0..2).any(|l| !self.cut(l, from) && !self.spiked(l))
    }

    fn ha_up(&self, n: usize) -> bool {
        self.nodes[n].up && self.nodes[n].machine.is_some()
    }

    fn mutual(&self) -> bool {
        self.ha_up(0) && self.ha_up(1) && self.reaches(0) && self.reaches(1)
    }

    fn rdb_path(&self) -> bool {
        self.nodes.iter().all(|n| n.up) && !self.cut(0, 0) && !self.cut(0, 1)
    }

    fn changed_now(&mut self) {
        self.last_change_ms = self.now;
    }

    // ----- the daemon ------------------------------------------------------------------

    fn feed(&mut self, n: usize, ev: HaEvent) -> Res {
        let now = self.now;
        if self.nodes[n].machine.is_none() {
            return Ok(());
        }
        if self.tracing() && !matches!(ev, HaEvent::Tick | HaEvent::Packet { .. }) {
            let line = format!("{} <- {ev:?}", NAMES[n]);
            self.note(line);
        }
        let Some(m) = self.nodes[n].machine.as_mut() else {
            return Ok(());
        };
        let actions = m.handle(now, ev);
        for a in actions {
            self.action(n, a)?;
        }
        Ok(())
    }

    fn action(&mut self, n: usize, a: HaAction) -> Res {
        match a {
            HaAction::Send(mut p) => {
                // The daemon stamps packets with the wall clock before signing.
                p.timestamp_ms = self.now;
                let shutdown = p.kind == PacketType::Shutdown;
                let generation = p.generation;
                if self.tracing() && p.kind != PacketType::Heartbeat {
                    self.note(format!(
                        "{} sends {:?} state={} flags={:#x}",
                        NAMES[n],
                        p.kind,
                        p.state.as_str(),
                        p.flags
                    ));
                }
                let bytes = match auth::sign(&self.keys, p) {
                    Ok(b) => b,
                    Err(e) => return Err(self.violation(HaInvariant::Panic, format!("sign: {e}"))),
                };
                let to = 1 - n;
                for link in 0..2 {
                    self.report.packets += 1;
                    if self.cut(link, n) || self.rng.chance(self.opts.faults.drop) {
                        self.report.dropped += 1;
                        continue;
                    }
                    let copies = if self.rng.chance(self.opts.faults.duplicate) {
                        self.report.duplicated += 1;
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let d = if self.spiked(link) {
                            self.rng.range(100, 1500)
                        } else {
                            self.rng.range(1, MAX_NET_MS)
                        };
                        self.schedule(
                            d,
                            Ev::Deliver {
                                to,
                                link,
                                bytes: bytes.clone(),
                                sent_ms: self.now,
                                generation,
                                shutdown,
                            },
                        );
                    }
                }
            }
            HaAction::Resource { index, op } => self.resource(n, index, op)?,
            HaAction::Fence(node) => {
                return Err(self.violation(
                    HaInvariant::Panic,
                    format!("{}: fence {node} without a fence hook", NAMES[n]),
                ))
            }
            HaAction::Log(level, msg) => {
                if msg.starts_with("split brain: node") {
                    self.report.split_brain_logs += 1;
                    self.last_sb_log_ms = Some(self.now);
                    if let Some(o) = self.overlap.as_mut() {
                        o.logged = true;
                    }
                }
                if let Some(peer) = msg
                    .strip_prefix("node ")
                    .and_then(|r| r.strip_suffix(": is dead"))
                {
                    self.on_declared_dead(n, peer)?;
                }
                if self.tracing() && !msg.starts_with("Late heartbeat") {
                    self.note(format!("{} log {level:?}: {msg}", NAMES[n]));
                }
                if msg == "local HA resource acquisition completed" {
                    self.report.activations += 1;
                    if self.last_holder.is_some_and(|h| h != n) {
                        self.report.failovers += 1;
                    }
                    self.last_holder = Some(n);
                }
            }
            HaAction::Exit => {
                self.note(format!("{}: rdb-ha exited", NAMES[n]));
                let node = &mut self.nodes[n];
                node.machine = None;
                node.inc += 1;
                let d = self.rng.range(200, 3000);
                self.schedule(d, Ev::HaStart { node: n });
                self.changed_now();
            }
        }
        Ok(())
    }

    /// Invariant FalseSuspicion.
    fn on_declared_dead(&mut self, n: usize, peer: &str) -> Res {
        let m = 1 - n;
        if peer != NAMES[m] || !self.ha_up(m) {
            return Ok(());
        }
        if let Some((sent, generation, shutdown)) = self.nodes[n].last_rx {
            if generation == self.nodes[m].generation
                && !shutdown
                && self.now.saturating_sub(sent) <= DEADTIME_MS
            {
                return Err(self.violation(
                    HaInvariant::FalseSuspicion,
                    format!(
                        "{} declared {} dead, but a packet {} sent {} ms ago (generation {:x}) reached it",
                        NAMES[n],
                        NAMES[m],
                        NAMES[m],
                        self.now - sent,
                        generation
                    ),
                ));
            }
        }
        Ok(())
    }

    fn resource(&mut self, n: usize, index: usize, op: Op) -> Res {
        if self.tracing() {
            self.note(format!("{}: {op:?} {}", NAMES[n], RESOURCES[index]));
        }
        let inc = self.nodes[n].inc;
        if index == 0 {
            match op {
                Op::Start => {
                    // agents.rs: a StandAlone disk that is not UpToDate is never promoted.
                    if self.rconn == RConn::StandAlone
                        && self.nodes[n].engine.disk() != DiskState::UpToDate
                    {
                        let d = self.rng.range(START_MS[0].0, START_MS[0].1);
                        self.schedule(
                            d,
                            Ev::ResDone {
                                node: n,
                                inc,
                                index,
                                op,
                                ok: false,
                            },
                        );
                        return Ok(());
                    }
                    let d = self.rng.range(START_MS[0].0, START_MS[0].1);
                    self.schedule(
                        d,
                        Ev::PromoteTry {
                            node: n,
                            inc,
                            deadline_ms: self.now + RES_TIMEOUT_MS,
                        },
                    );
                }
                Op::Stop => {
                    let d = self.rng.range(STOP_MS[0].0, STOP_MS[0].1);
                    self.schedule(
                        d,
                        Ev::ResDone {
                            node: n,
                            inc,
                            index,
                            op,
                            ok: true,
                        },
                    );
                }
            }
            return Ok(());
        }
        let (lo, hi) = match op {
            Op::Start => START_MS[index],
            Op::Stop => STOP_MS[index],
        };
        let d = self.rng.range(lo, hi);
        let mut ok = true;
        match op {
            Op::Start => {
                if index == 1 && self.rng.chance(self.opts.faults.start_failure) {
                    self.report.start_failures += 1;
                    ok = false;
                } else {
                    self.nodes[n].running[index] = true;
                }
            }
            Op::Stop => {
                if index == 1 && self.opts.inject_bug == Some(HaBug::StopReportedEarly) {
                    let linger = self.rng.range(2000, 5000);
                    self.note(format!(
                        "{}: BUG StopReportedEarly: unmount goes on for {linger} ms",
                        NAMES[n]
                    ));
                    self.schedule(linger, Ev::ResGone { node: n, index });
                    self.schedule(
                        1,
                        Ev::ResDone {
                            node: n,
                            inc,
                            index,
                            op,
                            ok: true,
                        },
                    );
                    return Ok(());
                }
            }
        }
        self.schedule(
            d,
            Ev::ResDone {
                node: n,
                inc,
                index,
                op,
                ok,
            },
        );
        Ok(())
    }

    fn promote_try(&mut self, n: usize, inc: u64, deadline_ms: u64) -> Res {
        if self.nodes[n].inc != inc || !self.nodes[n].up {
            return Ok(());
        }
        let connected = matches!(self.rconn, RConn::Up { .. });
        match self.nodes[n].engine.promote(false) {
            Ok(_) => {
                // volume.rs: a promotion without a connected peer starts a new data
                // generation.
                if !connected {
                    if self.nodes[1 - n].changed {
                        // The peer changed data since they parted: this node serves
                        // data without those writes (DRBD avoids it with resource-level
                        // fencing, which rdb does not have): a split brain at reconnect.
                        self.report.stale_promotions += 1;
                    }
                    self.new_generation(n);
                }
                self.nodes[n].uuids.current |= 1;
                self.note(format!("{}: promoted (connected={connected})", NAMES[n]));
                self.announce(n);
                self.feed(
                    n,
                    HaEvent::ResourceDone {
                        index: 0,
                        op: Op::Start,
                        ok: true,
                    },
                )
            }
            Err(e) => {
                self.report.promote_refusals += 1;
                if self.now + PROMOTE_RETRY_MS >= deadline_ms {
                    self.note(format!("{}: promote refused ({e}): giving up", NAMES[n]));
                    return self.feed(
                        n,
                        HaEvent::ResourceDone {
                            index: 0,
                            op: Op::Start,
                            ok: false,
                        },
                    );
                }
                if self.tracing() {
                    self.note(format!("{}: promote refused ({e}), retrying", NAMES[n]));
                }
                let d = PROMOTE_RETRY_MS + self.rng.range(START_MS[0].0, START_MS[0].1);
                self.schedule(
                    d,
                    Ev::PromoteTry {
                        node: n,
                        inc,
                        deadline_ms,
                    },
                );
                Ok(())
            }
        }
    }

    fn res_done(&mut self, n: usize, inc: u64, index: usize, op: Op, ok: bool) -> Res {
        if self.nodes[n].inc != inc || !self.nodes[n].up {
            return Ok(());
        }
        if op == Op::Stop {
            if index == 0 {
                if let Err(e) = self.nodes[n].engine.demote() {
                    return Err(
                        self.violation(HaInvariant::Panic, format!("{}: demote: {e}", NAMES[n]))
                    );
                }
                self.nodes[n].uuids.current &= !1;
                self.announce(n);
            } else if self.nodes[n].inc == inc
                && !(index == 1 && self.opts.inject_bug == Some(HaBug::StopReportedEarly))
            {
                self.nodes[n].running[index] = false;
            }
        }
        self.feed(n, HaEvent::ResourceDone { index, op, ok })
    }

    fn ha_start(&mut self, n: usize) {
        if !self.nodes[n].up || self.nodes[n].machine.is_some() {
            return;
        }
        let node = &mut self.nodes[n];
        node.inc += 1;
        let stale = self.opts.inject_bug == Some(HaBug::StaleGenerationOnRestart);
        if !(stale && node.generation != 0) {
            node.generation = (self.rng.next_u64() | 1) & 0x7fff_ffff_ffff_ffff;
        }
        let generation = node.generation;
        // `Params` come from a fixed, valid configuration: `new` cannot fail.
        let m = match Machine::new(params(n, generation)) {
            Ok(m) => m,
            Err(e) => panic!("machine params: {e}"),
        };
        let node = &mut self.nodes[n];
        node.machine = Some(m);
        node.verifier = Verifier::new(self.keys.clone());
        node.last_rx = None;
        node.running[1] = false;
        node.running[2] = false;
        let inc = node.inc;
        self.note(format!(
            "{}: rdb-ha starts, generation {generation:x}",
            NAMES[n]
        ));
        self.schedule(0, Ev::Tick { node: n, inc });
        self.schedule(0, Ev::PingProbe { node: n, inc });
        self.changed_now();
    }

    // ----- rdb ----------------------------------------------------------------------------

    fn engine_event(&mut self, n: usize, ev: EngEvent) {
        let mut out: Vec<EngAction> = Vec::new();
        self.nodes[n].engine.handle(self.now, ev, &mut out);
    }

    fn new_generation(&mut self, n: usize) {
        let uuid = (self.rng.next_u64() & !1).max(16);
        let node = &mut self.nodes[n];
        node.uuids.new_current_with(uuid);
        node.changed = true;
        node.oos = node.oos.max(1);
    }

    fn announce(&mut self, n: usize) {
        if matches!(self.rconn, RConn::Up { .. }) {
            let d = self.rng.range(1, 10);
            let (role, disk) = (self.nodes[n].engine.role(), self.nodes[n].engine.disk());
            let epoch = self.rdb_epoch;
            self.schedule(
                d,
                Ev::RdbState {
                    to: 1 - n,
                    epoch,
                    role,
                    disk,
                },
            );
        }
    }

    /// The rdb connection follows link 0 and the hosts.
    fn rdb_update(&mut self) {
        let path = self.rdb_path();
        if matches!(self.rconn, RConn::Up { .. }) && !path {
            self.note("rdb: connection lost".into());
            self.rconn = RConn::Down;
            self.rdb_epoch += 1;
            for n in 0..2 {
                if !self.nodes[n].up {
                    continue;
                }
                self.engine_event(n, EngEvent::PeerLost);
                if self.nodes[n].engine.role() == Role::Primary {
                    // volume.rs: the Primary goes on without its peer: new generation.
                    self.new_generation(n);
                    self.nodes[n].uuids.current |= 1;
                }
            }
        }
        if self.rconn == RConn::Down && path && !self.connect_scheduled {
            self.connect_scheduled = true;
            let d = self.rng.range(10, 200);
            self.schedule(d, Ev::RdbConnect);
        }
    }

    fn view(&self, n: usize) -> SyncView {
        let node = &self.nodes[n];
        SyncView {
            role: node.engine.role(),
            disk: node.engine.disk(),
            uuids: node.uuids,
            crashed_primary: node.crashed_primary,
            discard_my_data: node.discard_my_data,
            oos_blocks: node.oos,
        }
    }

    fn rdb_connect(&mut self) -> Res {
        self.connect_scheduled = false;
        if self.rconn != RConn::Down || !self.rdb_path() {
            return Ok(());
        }
        self.report.handshakes += 1;
        let (va, vb) = (self.view(0), self.view(1));
        let policy = SplitBrainPolicy::default();
        let da = sync::decide(&va, &vb, policy, true);
        let db = sync::decide(&vb, &va, policy, false);
        let (ca, cb) = (self.nodes[0].changed, self.nodes[1].changed);
        self.note(format!(
            "rdb handshake: a {da:?} (uuid {:x}/{:x} {} changed={ca}), b {db:?} (uuid {:x}/{:x} {} changed={cb})",
            va.uuids.current, va.uuids.bitmap, va.role, vb.uuids.current, vb.uuids.bitmap, vb.role
        ));
        use SyncDecision as D;
        if matches!((da, db), (D::Refused(_), D::Refused(_))) {
            // Both refuse (the target would be a Primary: the group moved to the
            // node the operator chose to discard): rdbd stays StandAlone, as DRBD.
            self.report.refused_handshakes += 1;
            self.stand_alone();
            return Ok(());
        }
        let agree = matches!(
            (da, db),
            (D::None, D::None)
                | (D::SourceBitmap, D::TargetBitmap)
                | (D::TargetBitmap, D::SourceBitmap)
                | (D::SourceFull, D::TargetFull)
                | (D::TargetFull, D::SourceFull)
                | (D::SplitBrain { .. }, D::SplitBrain { .. })
        );
        if !agree {
            return Err(self.violation(
                HaInvariant::ResyncDecision,
                format!("the two sides disagree: a {da:?}, b {db:?}"),
            ));
        }
        let split = matches!(da, D::SplitBrain { .. });
        let (xa, xb) = (va.discard_my_data, vb.discard_my_data);
        match (ca, cb) {
            // A split brain the operator resolved: the discarding side is the target.
            (true, true) if xa != xb && !(if xa { da.is_target() } else { db.is_target() }) => {
                return Err(self.violation(
                    HaInvariant::ResyncDecision,
                    format!(
                        "{} discards its data, but the decision is a {da:?}, b {db:?}",
                        if xa { "a" } else { "b" }
                    ),
                ));
            }
            (true, true) if xa != xb => {}
            (true, true) if !split => {
                return Err(self.violation(
                    HaInvariant::SplitBrainSilent,
                    format!("both nodes were Primary while apart, but the decision is {da:?}"),
                ))
            }
            (true, false) | (false, true)
                if split || (ca && !da.is_source()) || (cb && !db.is_source()) =>
            {
                return Err(self.violation(
                    HaInvariant::ResyncDecision,
                    format!(
                        "only {} changed data while apart, but the decision is a {da:?}, b {db:?}",
                        if ca { "a" } else { "b" }
                    ),
                ))
            }
            (false, false) if split => {
                return Err(self.violation(
                    HaInvariant::ResyncDecision,
                    "split brain reported though no node changed data while apart".into(),
                ))
            }
            _ => {}
        }
        if split {
            self.report.split_brains_detected += 1;
            self.stand_alone();
            return Ok(());
        }
        self.rdb_epoch += 1;
        let roles = [
            (self.nodes[0].engine.role(), self.nodes[0].engine.disk()),
            (self.nodes[1].engine.role(), self.nodes[1].engine.disk()),
        ];
        for n in 0..2 {
            let (role, disk) = roles[1 - n];
            self.engine_event(n, EngEvent::PeerConnected { role, disk });
        }
        if da == D::None {
            self.rconn = RConn::Up { syncing: false };
            for n in 0..2 {
                let peer_disk = roles[1 - n].1;
                let node = &mut self.nodes[n];
                // volume.rs `settle_in_sync`.
                if peer_disk == DiskState::UpToDate
                    && matches!(
                        node.engine.disk(),
                        DiskState::Consistent | DiskState::Outdated
                    )
                {
                    node.engine.force_disk(DiskState::UpToDate);
                }
                node.crashed_primary = false;
                node.discard_my_data = false;
                node.changed = false;
                node.oos = 0;
                node.uuids.clear_bitmap_uuid();
            }
        } else {
            self.report.resyncs += 1;
            self.rconn = RConn::Up { syncing: true };
            let source = if da.is_source() { 0 } else { 1 };
            self.nodes[source].engine.start_sync(true);
            self.nodes[1 - source].engine.start_sync(false);
            self.nodes[1 - source].persisted_disk = DiskState::Inconsistent;
            self.nodes[1 - source].oos = self.nodes[1 - source].oos.max(1);
            let d = self.rng.range(20, 500);
            let epoch = self.rdb_epoch;
            self.schedule(d, Ev::SyncDone { epoch });
        }
        Ok(())
    }

    fn sync_done(&mut self, epoch: u64) {
        if epoch != self.rdb_epoch || self.rconn != (RConn::Up { syncing: true }) {
            return;
        }
        let source = if self.nodes[0].engine.conn() == crate::engine::state::ConnState::SyncSource {
            0
        } else {
            1
        };
        let t = 1 - source;
        self.note(format!(
            "rdb: resync {} -> {} done",
            NAMES[source], NAMES[t]
        ));
        let src_current = self.nodes[source].uuids.current;
        for n in 0..2 {
            let node = &mut self.nodes[n];
            node.engine.finish_sync();
            node.uuids.clear_bitmap_uuid();
            node.crashed_primary = false;
            node.discard_my_data = false;
            node.changed = false;
            node.oos = 0;
            node.persisted_disk = DiskState::UpToDate;
        }
        let target = &mut self.nodes[t];
        target.uuids.current = src_current & !1;
        if target.engine.role() == Role::Primary {
            target.uuids.current |= 1;
        }
        self.rconn = RConn::Up { syncing: false };
    }

    /// A refused handshake: both sides stay StandAlone until the operator acts.
    fn stand_alone(&mut self) {
        self.rconn = RConn::StandAlone;
        for n in 0..2 {
            self.nodes[n].engine.set_connecting(false);
        }
        let d = self.rng.range(500, 2000);
        self.schedule(d, Ev::SbResolve);
    }

    /// The operator resolves a split brain (or a refused handshake) once the nodes can
    /// reach each other: the node not Primary discards its data (`rdbadm connect
    /// --discard-my-data`), the other connects, at once.
    fn sb_resolve(&mut self) -> Res {
        if self.rconn != RConn::StandAlone {
            return Ok(());
        }
        let primaries: Vec<usize> = (0..2)
            .filter(|&n| self.nodes[n].up && self.nodes[n].engine.role() == Role::Primary)
            .collect();
        if primaries.len() == 2 || !self.rdb_path() {
            let d = self.rng.range(200, 1000);
            self.schedule(d, Ev::SbResolve);
            return Ok(());
        }
        let victim = match primaries.first() {
            Some(&p) => 1 - p,
            None => 1,
        };
        self.note(format!(
            "operator: {} discards its data and connects",
            NAMES[victim]
        ));
        self.nodes[victim].discard_my_data = true;
        self.nodes[1 - victim].discard_my_data = false;
        self.rconn = RConn::Down;
        for n in 0..2 {
            self.nodes[n].engine.set_connecting(true);
        }
        self.connect_scheduled = true;
        self.rdb_connect()
    }

    // ----- hosts -----------------------------------------------------------------------

    fn crash(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        self.report.crashes += 1;
        self.note(format!("{}: POWER OFF", NAMES[n]));
        let node = &mut self.nodes[n];
        node.persisted_disk = if node.engine.disk() == DiskState::Inconsistent {
            DiskState::Inconsistent
        } else {
            DiskState::UpToDate
        };
        if node.engine.role() == Role::Primary {
            node.crashed_primary = true;
            node.oos = node.oos.max(1);
        }
        node.up = false;
        node.machine = None;
        node.inc += 1;
        node.running = [false; NRES];
        node.engine = Engine::new(1 << 20, DiskState::Diskless, Protocol::C);
        self.rdb_update();
        let d = self.rng.range(500, 5000);
        self.schedule(d, Ev::Restart { node: n });
        self.changed_now();
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].up {
            return;
        }
        let node = &mut self.nodes[n];
        node.up = true;
        node.engine = Engine::new(1 << 20, node.persisted_disk, Protocol::C);
        node.engine.set_connecting(self.rconn != RConn::StandAlone);
        node.uuids.current &= !1;
        let disk = node.persisted_disk;
        self.note(format!("{}: boots (disk {disk})", NAMES[n]));
        self.ha_start(n);
        self.rdb_update();
        self.changed_now();
    }

    // ----- events ------------------------------------------------------------------------

    fn process(&mut self, ev: Ev) -> Res {
        match ev {
            Ev::Tick { node, inc } => {
                if self.nodes[node].inc == inc && self.ha_up(node) {
                    self.schedule(TICK_MS, Ev::Tick { node, inc });
                    self.feed(node, HaEvent::Tick)?;
                }
            }
            Ev::PingProbe { node, inc } => {
                if self.nodes[node].inc == inc && self.ha_up(node) {
                    let d = if self.ping_cut(node) {
                        PING_TIMEOUT_MS
                    } else {
                        self.rng.range(1, 5)
                    };
                    self.schedule(d, Ev::PingResult { node, inc });
                }
            }
            Ev::PingResult { node, inc } => {
                if self.nodes[node].inc == inc && self.ha_up(node) {
                    let reachable = !self.ping_cut(node);
                    self.schedule(PING_EVERY_MS, Ev::PingProbe { node, inc });
                    if reachable || self.opts.inject_bug != Some(HaBug::IgnorePingLoss) {
                        self.feed(node, HaEvent::Ping { reachable })?;
                    }
                }
            }
            Ev::Deliver {
                to,
                link,
                bytes,
                sent_ms,
                generation,
                shutdown,
            } => {
                if !self.ha_up(to) {
                    return Ok(());
                }
                let from = 1 - to;
                if generation == self.nodes[from].generation
                    && self.nodes[to]
                        .last_rx
                        .is_none_or(|(s, g, _)| g != generation || sent_ms >= s)
                {
                    self.nodes[to].last_rx = Some((sent_ms, generation, shutdown));
                }
                match self.nodes[to].verifier.verify(link, &bytes) {
                    Ok(packet) => self.feed(to, HaEvent::Packet { link, packet })?,
                    Err(_) => self.report.refused += 1,
                }
            }
            Ev::ResDone {
                node,
                inc,
                index,
                op,
                ok,
            } => self.res_done(node, inc, index, op, ok)?,
            Ev::PromoteTry {
                node,
                inc,
                deadline_ms,
            } => self.promote_try(node, inc, deadline_ms)?,
            Ev::ResGone { node, index } => {
                self.nodes[node].running[index] = false;
            }
            Ev::Recheck => {
                self.changed_now();
                self.rdb_update();
            }
            Ev::Restart { node } => self.restart(node),
            Ev::HaStart { node } => self.ha_start(node),
            Ev::FaultTick => {
                self.schedule(FAULT_TICK_MS, Ev::FaultTick);
                if self.faults_on {
                    self.fault_tick()?;
                }
                self.liveness()?;
            }
            Ev::Phase { quiet } => self.phase(quiet),
            Ev::RdbConnect => self.rdb_connect()?,
            Ev::RdbState {
                to,
                epoch,
                role,
                disk,
            } => {
                if epoch == self.rdb_epoch && matches!(self.rconn, RConn::Up { .. }) {
                    self.engine_event(to, EngEvent::PeerState { role, disk });
                }
            }
            Ev::SyncDone { epoch } => self.sync_done(epoch),
            Ev::SbResolve => self.sb_resolve()?,
        }
        Ok(())
    }

    fn phase(&mut self, quiet: bool) {
        if quiet {
            self.faults_on = false;
            self.cycles_done += 1;
            if self.cycles_done >= self.opts.cycles {
                self.heal_all();
                return;
            }
            let d = self.quiet_len();
            self.note("quiet phase".into());
            self.schedule(d, Ev::Phase { quiet: false });
            if self.rng.chance(self.opts.faults.lasting) {
                // A fault that lasts the whole liveness window.
                let t = self.now + LIVENESS_BOUND_MS + 500;
                self.schedule(LIVENESS_BOUND_MS + 500, Ev::Recheck);
                match self.rng.range(0, 3) {
                    0 => {
                        self.cut_until = [[t; 2]; 2];
                        self.net_fault("LASTING PARTITION both links".into());
                    }
                    1 => {
                        let from = self.rng.range(0, 1) as usize;
                        self.cut_until[0][from] = t;
                        self.cut_until[1][from] = t;
                        self.net_fault(format!("LASTING ONE-WAY cut from {}", NAMES[from]));
                    }
                    _ => {
                        let n = self.rng.range(0, 1) as usize;
                        self.ping_cut_until[n] = t;
                        self.report.ping_cuts += 1;
                        self.note(format!("LASTING PING CUT {}", NAMES[n]));
                        self.changed_now();
                    }
                }
            }
        } else {
            self.faults_on = true;
            self.note("fault phase".into());
            let d = self.rng.range(2000, 8000);
            self.schedule(d, Ev::Phase { quiet: true });
        }
    }

    fn heal_all(&mut self) {
        self.note("faults stop; healing everything".into());
        self.final_phase = true;
        self.cut_until = [[0; 2]; 2];
        self.spike_until = [0; 2];
        self.ping_cut_until = [0; 2];
        for n in 0..2 {
            if !self.nodes[n].up {
                self.restart(n);
            } else if self.nodes[n].machine.is_none() {
                self.ha_start(n);
            }
        }
        self.changed_now();
        self.rdb_update();
        self.end_ms = Some(self.now + LIVENESS_BOUND_MS + 3000);
    }

    fn until(&mut self, lo: u64, hi: u64) -> u64 {
        let d = self.rng.range(lo, hi);
        self.schedule(d, Ev::Recheck);
        self.now + d
    }

    fn fault_tick(&mut self) -> Res {
        let f = self.opts.faults;
        if self.rng.chance(f.partition) {
            let t = self.until(200, 4000);
            for l in 0..2 {
                for d in 0..2 {
                    self.cut_until[l][d] = self.cut_until[l][d].max(t);
                }
            }
            self.net_fault("PARTITION both links".into());
        }
        if self.rng.chance(f.one_way) {
            let t = self.until(200, 4000);
            let from = self.rng.range(0, 1) as usize;
            let which = self.rng.range(0, 2) as usize;
            for l in 0..2 {
                if which == 2 || which == l {
                    self.cut_until[l][from] = self.cut_until[l][from].max(t);
                }
            }
            self.net_fault(format!(
                "ONE-WAY cut from {} on link(s) {which}",
                NAMES[from]
            ));
        }
        if self.rng.chance(f.flap) {
            let t = self.until(100, 1500);
            let l = self.rng.range(0, 1) as usize;
            for d in 0..2 {
                self.cut_until[l][d] = self.cut_until[l][d].max(t);
            }
            self.net_fault(format!("FLAP link {l}"));
        }
        if self.rng.chance(f.delay_spike) {
            let t = self.until(200, 2000);
            let l = self.rng.range(0, 1) as usize;
            self.spike_until[l] = self.spike_until[l].max(t);
            self.net_fault(format!("DELAY SPIKE link {l}"));
        }
        if self.rng.chance(f.ping_cut) {
            let t = self.until(500, 12_000);
            let n = self.rng.range(0, 1) as usize;
            self.ping_cut_until[n] = self.ping_cut_until[n].max(t);
            self.report.ping_cuts += 1;
            self.note(format!("PING CUT {}", NAMES[n]));
            self.changed_now();
        }
        if self.rng.chance(f.crash) {
            let n = self.rng.range(0, 1) as usize;
            self.crash(n);
        }
        if self.rng.chance(f.ha_restart) {
            let n = self.rng.range(0, 1) as usize;
            if self.ha_up(n) {
                self.report.ha_restarts += 1;
                self.changed_now();
                self.feed(n, HaEvent::Shutdown)?;
            }
        }
        if self.rng.chance(f.admin_standby) {
            if let Some(n) = (0..2).find(|&n| self.ha_up(n) && self.nodes[n].holder()) {
                self.report.admin += 1;
                self.changed_now();
                self.feed(n, HaEvent::AdminStandby)?;
            }
        }
        if self.rng.chance(f.admin_takeover) {
            let n = self.rng.range(0, 1) as usize;
            if self.ha_up(n) {
                self.report.admin += 1;
                self.changed_now();
                self.feed(n, HaEvent::AdminTakeover)?;
            }
        }
        self.rdb_update();
        Ok(())
    }

    fn net_fault(&mut self, what: String) {
        self.report.net_faults += 1;
        self.note(what);
        self.changed_now();
        self.rdb_update();
    }

    // ----- invariants ----------------------------------------------------------------------

    fn check(&mut self) -> Res {
        // SinglePrimaryConnected.
        if matches!(self.rconn, RConn::Up { .. })
            && self
                .nodes
                .iter()
                .all(|n| n.up && n.engine.role() == Role::Primary)
        {
            return Err(self.violation(
                HaInvariant::SinglePrimaryConnected,
                "both engines are Primary while the rdb connection is up".into(),
            ));
        }
        // CutOffHolds.
        for (n, name) in NAMES.iter().enumerate() {
            let cut = self.ping_cut(n) && self.nodes[n].up;
            match (cut, self.ping_lost_since[n]) {
                (true, None) => self.ping_lost_since[n] = Some(self.now),
                (false, Some(_)) => self.ping_lost_since[n] = None,
                _ => {}
            }
            if let Some(t) = self.ping_lost_since[n] {
                if self.now - t > CUT_OFF_BOUND_MS && self.nodes[n].holder() {
                    return Err(self.violation(
                        HaInvariant::CutOffHolds,
                        format!(
                            "{name} has been cut off from the ping node for {} ms and still runs resources",
                            self.now - t
                        ),
                    ));
                }
            }
        }
        // ReachableOverlap and SplitBrainSilent (machines).
        let mutual = self.mutual();
        match (mutual, self.mutual_since) {
            (true, None) => self.mutual_since = Some(self.now),
            (false, Some(_)) => self.mutual_since = None,
            _ => {}
        }
        let both = self.nodes[0].holder() && self.nodes[1].holder();
        if both {
            if self.overlap.is_none() {
                self.report.overlaps += 1;
                self.note("two holders".into());
                // A machine may report it as soon as the other announces its start,
                // a little before the start makes it a holder here.
                let logged = self
                    .last_sb_log_ms
                    .is_some_and(|t| self.now - t <= DETECT_MS);
                self.overlap = Some(Overlap {
                    start_ms: self.now,
                    mutual_ms: 0,
                    logged,
                });
            }
            let since = self.mutual_since;
            if let (Some(ms), Some(o)) = (since, self.overlap.as_mut()) {
                let from = ms.max(o.start_ms);
                let len = self.now - from;
                o.mutual_ms = o.mutual_ms.max(len);
                if len > OVERLAP_BOUND_MS {
                    return Err(self.violation(
                        HaInvariant::ReachableOverlap,
                        format!(
                            "both nodes run resources while hearing each other for {len} ms (bound {OVERLAP_BOUND_MS} ms)"
                        ),
                    ));
                }
            }
        } else if let Some(o) = self.overlap.take() {
            if o.mutual_ms >= DETECT_MS && !o.logged && self.ha_up(0) && self.ha_up(1) {
                return Err(self.violation(
                    HaInvariant::SplitBrainSilent,
                    format!(
                        "two holders heard each other for {} ms and no machine reported the split brain",
                        o.mutual_ms
                    ),
                ));
            }
        }
        Ok(())
    }

    fn eligible(&self, n: usize) -> bool {
        self.ha_up(n)
            && !self.ping_cut(n)
            && self.nodes[n].machine.as_ref().is_some_and(|m| {
                let st = m.status(self.now);
                !st.failed && !st.unclean
            })
    }

    fn active(&self, n: usize) -> bool {
        self.nodes[n]
            .machine
            .as_ref()
            .is_some_and(|m| m.state() == NodeState::Active)
            && self.nodes[n].engine.role() == Role::Primary
            && self.nodes[n].running[1]
            && self.nodes[n].running[2]
    }

    /// Liveness after a stable window.
    fn liveness(&mut self) -> Res {
        if self.now - self.last_change_ms < LIVENESS_BOUND_MS
            || self.checked_change_ms == Some(self.last_change_ms)
        {
            return Ok(());
        }
        self.checked_change_ms = Some(self.last_change_ms);
        self.report.liveness_checks += 1;
        let stable = self.now - self.last_change_ms;
        if (0..2).any(|n| self.eligible(n)) && !(0..2).any(|n| self.eligible(n) && self.active(n)) {
            return Err(self.violation(
                HaInvariant::Liveness,
                format!("{stable} ms without a fault change, an eligible node, and no eligible node holds the group"),
            ));
        }
        if self.mutual() {
            for n in 0..2 {
                let seen = self.nodes[n]
                    .machine
                    .as_ref()
                    .map(|m| m.status(self.now).peers[0].liveness);
                if seen != Some(Liveness::Alive) {
                    return Err(self.violation(
                        HaInvariant::Liveness,
                        format!(
                            "{stable} ms without a fault change, both nodes hear each other, but {} sees {} as {seen:?}",
                            NAMES[n],
                            NAMES[1 - n]
                        ),
                    ));
                }
            }
            let holders = (0..2).filter(|&n| self.nodes[n].holder()).count();
            if holders > 1 {
                return Err(self.violation(
                    HaInvariant::Liveness,
                    format!("{stable} ms without a fault change, nodes hear each other, and both hold resources"),
                ));
            }
        }
        Ok(())
    }

    fn final_check(&mut self) -> Res {
        self.liveness()?;
        let eligible = (0..2).filter(|&n| self.eligible(n)).count();
        if eligible == 0 {
            // Both nodes failed a start: nobody may hold the group (nothing to check).
            return Ok(());
        }
        let actives: Vec<usize> = (0..2).filter(|&n| self.active(n)).collect();
        if actives.len() != 1 {
            return Err(self.violation(
                HaInvariant::Liveness,
                format!("after healing, {} nodes are Active", actives.len()),
            ));
        }
        let h = actives[0];
        if self.nodes[1 - h].holder() {
            return Err(self.violation(
                HaInvariant::Liveness,
                format!("after healing, {} still runs resources", NAMES[1 - h]),
            ));
        }
        if self.rconn != (RConn::Up { syncing: false }) {
            return Err(self.violation(
                HaInvariant::Liveness,
                format!("after healing, the rdb connection is {:?}", self.rconn),
            ));
        }
        let (ua, ub) = (self.nodes[0].uuids, self.nodes[1].uuids);
        if ua.current & !1 != ub.current & !1 || self.nodes.iter().any(|n| n.changed) {
            return Err(self.violation(
                HaInvariant::Liveness,
                "after healing and resync, the generation UUIDs differ".into(),
            ));
        }
        Ok(())
    }
}
