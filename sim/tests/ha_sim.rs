//! Seed sweeps of the heartbeat membership simulator (`rdb_sim::ha`): the real
//! `rdb-ha` state machine and replay protection, the rdbdisk resource over the real
//! engine and the real resync decision, under partitions, one-way cuts, flapping and
//! delayed links, lost and duplicated packets, ping cuts, power-offs, daemon restarts
//! and admin commands. The invariants are listed in `docs/simulation.md`.
//!
//! Injected bugs (each must be caught, by the invariant named):
//! - `HaBug::StopReportedEarly`: the Filesystem agent reports its stop done while the
//!   unmount goes on for seconds; the peer starts the group meanwhile: two holders
//!   that hear each other, which no machine can report (ReachableOverlap or
//!   SplitBrainSilent).
//! - `HaBug::StaleGenerationOnRestart`: a restarted daemon reuses its generation; the
//!   peer's replay protection refuses its packets and declares it dead although its
//!   packets arrive (FalseSuspicion), or never sees it alive again (Liveness).
//! - `HaBug::IgnorePingLoss`: failed ping results are dropped; a node cut off from the
//!   ping node keeps the group (CutOffHolds).

use rdb_sim::ha::{run_ha_seed, HaBug, HaInvariant, HaOptions, HaReport};

/// Seeds per CI run (the soak runs 100,000: `scripts/soak.sh`).
const CI_SEEDS: u64 = 500;

fn opts() -> HaOptions {
    HaOptions {
        trace_len: 0,
        ..HaOptions::default()
    }
}

#[test]
fn membership_survives_every_fault() {
    let o = opts();
    let mut total = HaReport::default();
    for seed in 0..CI_SEEDS {
        match run_ha_seed(seed, &o) {
            Ok(r) => {
                total.steps += r.steps;
                total.packets += r.packets;
                total.dropped += r.dropped;
                total.duplicated += r.duplicated;
                total.refused += r.refused;
                total.net_faults += r.net_faults;
                total.ping_cuts += r.ping_cuts;
                total.crashes += r.crashes;
                total.ha_restarts += r.ha_restarts;
                total.admin += r.admin;
                total.failovers += r.failovers;
                total.start_failures += r.start_failures;
                total.promote_refusals += r.promote_refusals;
                total.overlaps += r.overlaps;
                total.split_brain_logs += r.split_brain_logs;
                total.split_brains_detected += r.split_brains_detected;
                total.resyncs += r.resyncs;
                total.liveness_checks += r.liveness_checks;
                total.handshakes += r.handshakes;
                total.refused_handshakes += r.refused_handshakes;
                total.stale_promotions += r.stale_promotions;
                total.activations += r.activations;
            }
            Err(v) => {
                // Replay with the trace.
                let v = run_ha_seed(seed, &HaOptions::default()).err().unwrap_or(v);
                panic!("{v}");
            }
        }
    }
    println!("{CI_SEEDS} seeds: {total:?}");
    // The faults did happen, and each kind of situation was reached.
    assert!(total.failovers > CI_SEEDS, "{total:?}");
    assert!(
        total.overlaps > 50 && total.split_brains_detected > 50,
        "{total:?}"
    );
    assert!(total.split_brain_logs > 50, "{total:?}");
    assert!(
        total.resyncs > CI_SEEDS && total.promote_refusals > 0,
        "{total:?}"
    );
    assert!(total.refused > 1000 && total.dropped > 1000, "{total:?}");
    assert!(total.crashes > 100 && total.ha_restarts > 100, "{total:?}");
    assert!(total.liveness_checks > 2 * CI_SEEDS, "{total:?}");
}

fn caught(bug: HaBug) -> rdb_sim::ha::HaViolation {
    let o = HaOptions {
        inject_bug: Some(bug),
        ..opts()
    };
    (0..200)
        .find_map(|s| run_ha_seed(s, &o).err())
        .unwrap_or_else(|| panic!("{bug:?} not caught in 200 seeds"))
}

#[test]
fn injected_stop_reported_early_is_caught() {
    let v = caught(HaBug::StopReportedEarly);
    assert!(
        matches!(
            v.invariant,
            HaInvariant::ReachableOverlap | HaInvariant::SplitBrainSilent
        ),
        "{v}"
    );
}

#[test]
fn injected_stale_generation_is_caught() {
    let v = caught(HaBug::StaleGenerationOnRestart);
    assert!(
        matches!(
            v.invariant,
            HaInvariant::FalseSuspicion | HaInvariant::Liveness
        ),
        "{v}"
    );
}

#[test]
fn injected_ignore_ping_loss_is_caught() {
    let v = caught(HaBug::IgnorePingLoss);
    assert_eq!(v.invariant, HaInvariant::CutOffHolds, "{v}");
}

#[test]
fn replaying_a_seed_gives_the_identical_outcome() {
    let o = opts();
    for seed in [1, 42, 1234] {
        assert_eq!(run_ha_seed(seed, &o), run_ha_seed(seed, &o), "seed {seed}");
    }
    assert_ne!(run_ha_seed(1, &o).unwrap(), run_ha_seed(2, &o).unwrap());
}
