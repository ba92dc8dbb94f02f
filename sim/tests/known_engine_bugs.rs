//! Engine bugs the soak found after `sim/tests/sim.rs` was written; each seed failed
//! before its fix and is a regression test now (`docs/simulation.md`).

use rdb_sim::{run_seed, FaultRates, Protocol, SimOptions};

#[test]
// Regression (was engine bug B8: a WriteAck of a previous connection acknowledged the
// restarted Primary's new request with the same id), fixed in src/engine/core.rs:
// peer requests carry their connection generation, acks of a dead one are dropped.
fn b8_stale_write_ack_after_primary_restart() {
    for avoid_known_bugs in [true, false] {
        let o = SimOptions {
            protocol: Protocol::C,
            faults: FaultRates::survivable(),
            avoid_known_bugs,
            ..SimOptions::default()
        };
        run_seed(38185, &o).unwrap();
    }
}

#[test]
// Regression (was engine bug B6: a power loss of the just-demoted old Primary lost its
// last writes from the disk cache), fixed by the flush before the demotion completes
// (src/engine/volume.rs `demote_waiting`, the simulator's switchover). The seeds
// failed with every fault on, no workaround flag.
fn b6_power_loss_after_a_switchover() {
    for (protocol, seed) in [
        (Protocol::C, 140),
        (Protocol::C, 321),
        (Protocol::B, 58),
        (Protocol::A, 140),
    ] {
        let o = SimOptions {
            protocol,
            faults: FaultRates::all(),
            ..SimOptions::default()
        };
        if let Err(v) = run_seed(seed, &o) {
            panic!("protocol {protocol:?} seed {seed}: {v}");
        }
    }
}
