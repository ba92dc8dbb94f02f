//! The replication engine.
//!
//! - [`state`]: roles, disk and connection states in DRBD's vocabulary;
//! - [`core`]: the sans-IO state machine of one volume (events in, actions out,
//!   time passed in, no I/O), testable by deterministic simulation;
//! - [`congestion`]: `on-congestion` (pull-ahead, disconnect) thresholds and states;
//! - [`sync`]: the resync decision when two nodes meet;
//! - [`volume`]: the driver that feeds the engine and carries out its actions, and
//!   implements [`crate::storage::BlockIo`] for the frontends.

pub mod activity;
pub mod congestion;
pub mod core;
pub mod digest;
pub mod state;
pub mod sync;
pub mod volume;

pub use self::core::{Counters, StateChangeError, EPOCH_CLOSE_MS};
pub use self::state::{ConnState, DiskState, Role};
pub use self::volume::{Volume, VolumeSnapshot};
