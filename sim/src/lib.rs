//! rdb-sim: a seeded, deterministic simulator of rdb's replication engine, in the
//! spirit of TigerBeetle's VOPR.
//!
//! Two nodes, each an [`engine::core::Engine`] driven exactly as
//! `src/engine/volume.rs` drives it, over simulated disks (version stamps per sector,
//! volatile caches, power loss, slow disks, I/O errors) and a simulated TCP link (FIFO
//! per direction, delays, partitions, stale acknowledgements after a reconnect),
//! with a random workload and random faults (crashes, failover, switchover). After
//! every step the simulator checks the replication invariants (see
//! `docs/simulation.md`). Everything derives from one `u64` seed: [`run_seed`]
//! replays a run exactly.

pub mod disk;
pub mod rng;
mod world;

pub mod engine;
pub mod ha;
mod shim;
mod sync_model;

// `src/engine/sync.rs` imports these as `crate::config` and `crate::meta`.
pub(crate) use shim::{config, meta};

pub use engine::core::Protocol;

use std::fmt;

/// A bug deliberately injected into the simulated driver, to prove the checker
/// catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The Secondary sends WriteAck when it submits a peer write (before the disk
    /// completes it) and then sometimes crashes.
    AckBeforeWrite,
    /// The driver ignores `MarkOutOfSync` actions.
    DropMarkOutOfSync,
}

/// Fault rates, in per mille per fault tick (one tick every 10 simulated ms) unless
/// said otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRates {
    /// Cut the link (both sides see PeerLost after a timeout); healed later.
    pub partition: u32,
    /// Crash (and later restart) the Secondary.
    pub crash_secondary: u32,
    /// Crash (and later restart) the Primary; the Secondary takes over when it was
    /// connected.
    pub crash_primary: u32,
    /// Share of crashes that are power losses (the disk cache is lost), per mille.
    pub power_loss: u32,
    /// Toggle a node's disk between normal and slow.
    pub slow_disk: u32,
    /// Toggle a node's disk between healthy and failing (5 % of its I/Os fail).
    pub disk_errors: u32,
    /// Planned switchover (demote the Primary, promote the Secondary).
    pub switchover: u32,
    /// An administrator promotes a Secondary at a random moment.
    pub rogue_promote: u32,
}

impl FaultRates {
    /// Every fault enabled.
    pub fn all() -> FaultRates {
        FaultRates {
            partition: 20,
            crash_secondary: 10,
            crash_primary: 8,
            power_loss: 500,
            slow_disk: 20,
            disk_errors: 10,
            switchover: 10,
            rogue_promote: 5,
        }
    }

    /// No faults at all.
    pub fn none() -> FaultRates {
        FaultRates {
            partition: 0,
            crash_secondary: 0,
            crash_primary: 0,
            power_loss: 0,
            slow_disk: 0,
            disk_errors: 0,
            switchover: 0,
            rogue_promote: 0,
        }
    }

    /// Faults that never lose the connection (slow disks, switchovers, concurrent
    /// promotions): what protocols A and B survive today.
    pub fn no_connection_loss() -> FaultRates {
        FaultRates {
            slow_disk: 20,
            switchover: 10,
            rogue_promote: 5,
            ..FaultRates::none()
        }
    }

    /// The faults the engine is currently expected to survive (see the report of
    /// known engine bugs in `docs/simulation.md`): no power loss, no disk errors,
    /// no concurrent promotion.
    pub fn survivable() -> FaultRates {
        FaultRates {
            power_loss: 0,
            disk_errors: 0,
            rogue_promote: 0,
            ..FaultRates::all()
        }
    }
}

/// Options of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOptions {
    /// Simulated events processed while the workload and faults run.
    pub steps: u64,
    /// Replication protocol of both nodes.
    pub protocol: Protocol,
    /// Device size in bytes (a multiple of 512).
    pub size_bytes: u64,
    /// Application requests in flight at most.
    pub max_in_flight: usize,
    /// Fault rates.
    pub faults: FaultRates,
    /// A bug to inject in the simulated driver.
    pub inject_bug: Option<Bug>,
    /// Events kept in a violation's trace.
    pub trace_len: usize,
    /// Workarounds for engine bugs this simulator found, all fixed now (B1, B5; see
    /// `docs/simulation.md`): promotions wait until no peer request is in flight, and
    /// no administrator promotes a node while a switchover is under way. No sweep
    /// needs it any more; kept so that old replay commands still run.
    pub avoid_known_bugs: bool,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            steps: 4000,
            protocol: Protocol::C,
            size_bytes: 256 * 1024,
            max_in_flight: 8,
            faults: FaultRates::all(),
            inject_bug: None,
            trace_len: 40,
            avoid_known_bugs: false,
        }
    }
}

/// The invariants the simulator checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// (1) A write the Secondary acknowledged as written (WriteAck/FlushAck reached
    /// the Primary) is on both disks, or its sectors are marked out of sync.
    AckedWriteDurable,
    /// (2) Writes the peer may miss are marked out of sync: before their completion
    /// when not replicated, when the connection loss or a NegAck is processed
    /// otherwise.
    OutOfSyncCoverage,
    /// (3) At most one Primary while connected; promotion refused while the peer is
    /// Primary.
    SinglePrimary,
    /// (4) Overlapping writes reach each disk in the Primary's order; at every
    /// quiescent point both disks are equal except on out-of-sync sectors.
    WriteOrder,
    /// (5) Once faults stop and the link heals, everything completes in bounded time.
    Liveness,
    /// (6) Engine counters agree with what the driver sees.
    Counters,
    /// After the simulated resync the two disks are identical.
    ResyncIdentical,
    /// At each handshake the real resync decision (`src/engine/sync.rs`, on the
    /// generation UUIDs kept as `src/engine/volume.rs` keeps them) agrees on both
    /// sides, finds no split brain, and makes the node that changed data while apart
    /// the sync source.
    ResyncDecision,
    /// The engine panicked (an internal assertion failed).
    EnginePanic,
}

/// A broken invariant, with where and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The seed of the run.
    pub seed: u64,
    /// Which invariant.
    pub invariant: Invariant,
    /// Step (processed events) at which it was detected.
    pub step: u64,
    /// Simulated time in ms.
    pub time_ms: u64,
    /// What exactly is wrong.
    pub message: String,
    /// The last events before the violation, oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_violation(
            f,
            format_args!(
                "seed {}: invariant {:?} broken at step {} (t={} ms): {}",
                self.seed, self.invariant, self.step, self.time_ms, self.message
            ),
            &self.trace,
        )
    }
}

/// Writes a broken invariant: its `headline` line, then the last events of `trace`
/// (shared by [`Violation`] and [`ha::HaViolation`]).
pub(crate) fn write_violation(
    f: &mut fmt::Formatter<'_>,
    headline: fmt::Arguments<'_>,
    trace: &[String],
) -> fmt::Result {
    writeln!(f, "{headline}")?;
    writeln!(f, "last {} events:", trace.len())?;
    for line in trace {
        writeln!(f, "  {line}")?;
    }
    Ok(())
}

impl std::error::Error for Violation {}

/// What a passing run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Events processed in total.
    pub steps: u64,
    /// Simulated time at the end, in ms.
    pub end_time_ms: u64,
    /// Writes completed OK to the application.
    pub writes_ok: u64,
    /// Requests completed with an error.
    pub requests_failed: u64,
    /// Flushes completed OK.
    pub flushes_ok: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Node crashes (power losses included).
    pub crashes: u64,
    /// Of which power losses.
    pub power_losses: u64,
    /// Failovers (the Secondary promoted after the Primary crashed).
    pub failovers: u64,
    /// Planned switchovers done.
    pub switchovers: u64,
    /// Connections established.
    pub connects: u64,
    /// Quiescent points where disks were compared and resynced.
    pub resyncs: u64,
    /// Sectors copied by the simulated resyncs.
    pub resynced_sectors: u64,
    /// Stale acknowledgements delivered on a newer connection.
    pub stale_acks: u64,
    /// Hash of the final disk content (both disks are equal).
    pub final_hash: u64,
}

/// Runs one seed.
pub fn run_seed(seed: u64, opts: &SimOptions) -> Result<SimReport, Violation> {
    world::run(seed, opts)
}
