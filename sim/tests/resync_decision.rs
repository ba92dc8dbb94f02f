//! The replication simulator judges every handshake with the real resync decision
//! (`src/engine/sync.rs`) on the generation UUIDs (`sim/src/sync_model.rs`,
//! invariant `ResyncDecision`). The sweeps of `sim.rs` check it on every seed; this
//! file keeps the seed of the engine bug it found (ignored until fixed).

use rdb_sim::{run_seed, FaultRates, Invariant, Protocol, SimOptions};

#[test]
#[ignore = "engine bug B7: a forced promotion while connected gives the Primary a new UUID its in-sync peer never adopts; after a later failover the decision reports a split brain"]
fn b6_forced_promotion_while_connected() {
    let o = SimOptions {
        protocol: Protocol::C,
        faults: FaultRates::survivable(),
        ..SimOptions::default()
    };
    run_seed(873, &o).unwrap();
}

#[test]
fn b6_is_what_fails_today_and_the_workaround_passes() {
    let o = SimOptions {
        protocol: Protocol::C,
        faults: FaultRates::survivable(),
        ..SimOptions::default()
    };
    if let Err(v) = run_seed(873, &o) {
        assert_eq!(v.invariant, Invariant::ResyncDecision, "{v}");
    }
    let o = SimOptions {
        avoid_known_bugs: true,
        ..o
    };
    run_seed(873, &o).unwrap();
}
