//! The replication simulator judges every handshake with the real resync decision
//! (`src/engine/sync.rs`) on the generation UUIDs (`sim/src/sync_model.rs`,
//! invariant `ResyncDecision`). The sweeps of `sim.rs` check it on every seed; this
//! file keeps the seed of the engine bug it found (B7, fixed).

use rdb_sim::{run_seed, FaultRates, Protocol, SimOptions};

#[test]
// Regression (was engine bug B7: a forced promotion while connected gave the Primary
// a new UUID its in-sync peer never adopted; after a later failover the decision
// reported a split brain). Fixed in src/engine/volume.rs (`promoted` sends the new
// UUID with UUID_FLAG_NEW_CURRENT, `adopt_new_current`); no workaround flag.
fn b7_forced_promotion_while_connected() {
    let o = SimOptions {
        protocol: Protocol::C,
        faults: FaultRates::survivable(),
        ..SimOptions::default()
    };
    run_seed(873, &o).unwrap();
}
