//! Engine bugs the soak found after `sim/tests/sim.rs` was written; each seed fails
//! today (ignored until fixed; `docs/simulation.md`).

use rdb_sim::{run_seed, FaultRates, Protocol, SimOptions};

#[test]
#[ignore = "engine bug B8: a WriteAck of a previous connection acknowledges the restarted Primary's new request with the same id"]
fn b7_stale_write_ack_after_primary_restart() {
    let o = SimOptions {
        protocol: Protocol::C,
        faults: FaultRates::survivable(),
        avoid_known_bugs: true,
        ..SimOptions::default()
    };
    run_seed(38185, &o).unwrap();
}
