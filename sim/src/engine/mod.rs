//! The engine sources of the `rdb` crate (`src/engine/core.rs`, `state.rs`,
//! `sync.rs`),
//! compiled into the simulator as they are, so the simulator exercises the real code.

#[path = "../../../src/engine/congestion.rs"]
pub mod congestion;
#[path = "../../../src/engine/core.rs"]
pub mod core;
#[path = "../../../src/engine/state.rs"]
pub mod state;

pub use self::core::StateChangeError;
#[path = "../../../src/engine/sync.rs"]
pub mod sync;
