//! `rdb-sim`: runs the replication simulator over a range of seeds.
//!
//! `rdb-sim --seeds N [--seed S] [--protocol A|B|C] [--steps K] [--faults all|survivable|no-connection-loss|none]
//! [--rate name=per_mille,...] [--bug ack-before-write|drop-oos] [--avoid-known-bugs] [--trace N]
//! [--keep-going] [--jobs J]`
//! runs seeds S..S+N of the replication simulator, prints a progress line every 1000
//! seeds, and on the first violation prints it with a replay command and exits with
//! status 1.
//!
//! `rdb-sim --ha --seeds N [--seed S] [--cycles K] [--ha-faults all|none]
//! [--ha-bug stop-early|stale-generation|ignore-ping-loss] [--trace N] [--keep-going] [--jobs J]`
//! runs the heartbeat membership simulator (`rdb_sim::ha`) the same way.
//!
//! `--jobs J` runs the seeds on J threads (seed S+i on thread i mod J); each seed is
//! still a pure function of its number.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rdb_sim::ha::{run_ha_seed, HaBug, HaFaults, HaOptions};
use rdb_sim::{run_seed, Bug, FaultRates, Protocol, SimOptions};

fn usage() -> ExitCode {
    eprintln!(
        "usage: rdb-sim --seeds N [--seed S] [--protocol A|B|C] [--steps K] \
         [--faults all|survivable|no-connection-loss|none] [--rate name=per_mille,...] [--bug ack-before-write|drop-oos] [--avoid-known-bugs] [--trace N] [--keep-going] [--jobs J]\n       \
         rdb-sim --ha --seeds N [--seed S] [--cycles K] [--ha-faults all|none] [--ha-bug stop-early|stale-generation|ignore-ping-loss] [--trace N] [--keep-going] [--jobs J]"
    );
    ExitCode::from(2)
}

struct Args {
    seeds: u64,
    start: u64,
    opts: SimOptions,
    faults_name: String,
    bug_name: Option<String>,
    proto_name: String,
    keep_going: bool,
    rates: String,
    jobs: u64,
    ha: bool,
    ha_opts: HaOptions,
    ha_faults_name: String,
    ha_bug_name: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 1,
        start: 0,
        opts: SimOptions::default(),
        faults_name: "all".to_string(),
        bug_name: None,
        proto_name: "C".to_string(),
        keep_going: false,
        rates: String::new(),
        jobs: 1,
        ha: false,
        ha_opts: HaOptions::default(),
        ha_faults_name: "all".to_string(),
        ha_bug_name: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--keep-going" {
            a.keep_going = true;
            continue;
        }
        if flag == "--avoid-known-bugs" {
            a.opts.avoid_known_bugs = true;
            continue;
        }
        if flag == "--ha" {
            a.ha = true;
            continue;
        }
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || val.parse::<u64>().map_err(|e| format!("{flag} {val}: {e}"));
        match flag.as_str() {
            "--seeds" => a.seeds = num()?,
            "--seed" => a.start = num()?,
            "--steps" => a.opts.steps = num()?,
            "--trace" => {
                a.opts.trace_len = num()? as usize;
                a.ha_opts.trace_len = a.opts.trace_len;
            }
            "--jobs" => a.jobs = num()?.max(1),
            "--cycles" => a.ha_opts.cycles = num()? as u32,
            "--ha-faults" => {
                a.ha_opts.faults = match val.as_str() {
                    "all" => HaFaults::all(),
                    "none" => HaFaults::none(),
                    _ => return Err(format!("unknown ha fault profile {val}")),
                };
                a.ha_faults_name = val;
            }
            "--ha-bug" => {
                a.ha_opts.inject_bug = Some(match val.as_str() {
                    "stop-early" => HaBug::StopReportedEarly,
                    "stale-generation" => HaBug::StaleGenerationOnRestart,
                    "ignore-ping-loss" => HaBug::IgnorePingLoss,
                    _ => return Err(format!("unknown ha bug {val}")),
                });
                a.ha_bug_name = Some(val);
            }
            "--protocol" => {
                a.opts.protocol = match val.as_str() {
                    "A" | "a" => Protocol::A,
                    "B" | "b" => Protocol::B,
                    "C" | "c" => Protocol::C,
                    _ => return Err(format!("unknown protocol {val}")),
                };
                a.proto_name = val.to_uppercase();
            }
            "--faults" => {
                a.opts.faults = match val.as_str() {
                    "all" => FaultRates::all(),
                    "survivable" => FaultRates::survivable(),
                    "none" => FaultRates::none(),
                    "no-connection-loss" => FaultRates::no_connection_loss(),
                    _ => return Err(format!("unknown fault profile {val}")),
                };
                a.faults_name = val;
            }
            "--rate" => {
                for kv in val.split(',') {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or(format!("--rate {kv}: name=per_mille"))?;
                    let v: u32 = v.parse().map_err(|e| format!("--rate {kv}: {e}"))?;
                    let f = &mut a.opts.faults;
                    let slot = match k {
                        "partition" => &mut f.partition,
                        "crash_secondary" => &mut f.crash_secondary,
                        "crash_primary" => &mut f.crash_primary,
                        "power_loss" => &mut f.power_loss,
                        "slow_disk" => &mut f.slow_disk,
                        "disk_errors" => &mut f.disk_errors,
                        "switchover" => &mut f.switchover,
                        "rogue_promote" => &mut f.rogue_promote,
                        _ => return Err(format!("unknown rate {k}")),
                    };
                    *slot = v;
                }
                a.rates.push_str(&format!(" --rate {val}"));
            }
            "--bug" => {
                a.opts.inject_bug = Some(match val.as_str() {
                    "ack-before-write" => Bug::AckBeforeWrite,
                    "drop-oos" => Bug::DropMarkOutOfSync,
                    _ => return Err(format!("unknown bug {val}")),
                });
                a.bug_name = Some(val);
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// Outcome of one seed: its counters (events first, named by [`counter_names`]), or
/// the violation and its replay command.
type Outcome = Result<Vec<u64>, String>;

fn counter_names(ha: bool) -> &'static [&'static str] {
    if ha {
        &[
            "events",
            "packets",
            "dropped",
            "duplicated",
            "refused by replay protection",
            "network faults",
            "ping cuts",
            "power-offs",
            "rdb-ha restarts",
            "admin commands",
            "activations",
            "failovers",
            "start failures",
            "promotions refused",
            "two-holder episodes",
            "split brains logged by rdb-ha",
            "rdb handshakes",
            "split brains detected at handshake",
            "resyncs",
            "refused handshakes",
            "stale promotions",
            "liveness windows checked",
        ]
    } else {
        &[
            "events",
            "writes ok",
            "requests failed",
            "flushes ok",
            "partitions",
            "crashes",
            "power losses",
            "failovers",
            "switchovers",
            "connects",
            "resyncs",
            "resynced sectors",
            "stale acks",
        ]
    }
}

fn run_one(a: &Args, seed: u64) -> Outcome {
    if a.ha {
        return match run_ha_seed(seed, &a.ha_opts) {
            Ok(r) => Ok(vec![
                r.steps,
                r.packets,
                r.dropped,
                r.duplicated,
                r.refused,
                r.net_faults,
                r.ping_cuts,
                r.crashes,
                r.ha_restarts,
                r.admin,
                r.activations,
                r.failovers,
                r.start_failures,
                r.promote_refusals,
                r.overlaps,
                r.split_brain_logs,
                r.handshakes,
                r.split_brains_detected,
                r.resyncs,
                r.refused_handshakes,
                r.stale_promotions,
                r.liveness_checks,
            ]),
            Err(v) => {
                let bug = a
                    .ha_bug_name
                    .as_ref()
                    .map(|b| format!(" --ha-bug {b}"))
                    .unwrap_or_default();
                Err(format!(
                    "FAIL {v}\nreplay: cargo run --release -p rdb-sim -- --ha --seeds 1 --seed {seed} --cycles {} --ha-faults {}{bug} --trace 300",
                    a.ha_opts.cycles, a.ha_faults_name
                ))
            }
        };
    }
    match run_seed(seed, &a.opts) {
        Ok(r) => Ok(vec![
            r.steps,
            r.writes_ok,
            r.requests_failed,
            r.flushes_ok,
            r.partitions,
            r.crashes,
            r.power_losses,
            r.failovers,
            r.switchovers,
            r.connects,
            r.resyncs,
            r.resynced_sectors,
            r.stale_acks,
        ]),
        Err(v) => {
            let bug = a
                .bug_name
                .as_ref()
                .map(|b| format!(" --bug {b}"))
                .unwrap_or_default();
            let avoid = if a.opts.avoid_known_bugs {
                " --avoid-known-bugs"
            } else {
                ""
            };
            Err(format!(
                "FAIL {v}\nreplay: cargo run --release -p rdb-sim -- --seeds 1 --seed {seed} --protocol {} --steps {} --faults {}{}{bug}{avoid} --trace 200",
                a.proto_name, a.opts.steps, a.faults_name, a.rates
            ))
        }
    }
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rdb-sim: {e}");
            return usage();
        }
    };
    // Engine panics are reported as violations; keep stderr readable.
    std::panic::set_hook(Box::new(|_| {}));
    let t0 = Instant::now();
    let failures = AtomicU64::new(0);
    let steps = AtomicU64::new(0);
    let totals = Mutex::new(vec![0u64; counter_names(a.ha).len()]);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let out = Mutex::new(());
    std::thread::scope(|sc| {
        for j in 0..a.jobs {
            let (a, failures, steps, done, stop, out, totals) =
                (&a, &failures, &steps, &done, &stop, &out, &totals);
            sc.spawn(move || {
                let mut i = j;
                while i < a.seeds && !stop.load(Ordering::Relaxed) {
                    let seed = a.start + i;
                    let r = run_one(a, seed);
                    let _g = out.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(c) => {
                            steps.fetch_add(c[0], Ordering::Relaxed);
                            let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                            for (t, c) in t.iter_mut().zip(&c) {
                                *t += c;
                            }
                        }
                        Err(msg) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            println!("{msg}");
                            if !a.keep_going {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d % 1000 == 0 {
                        println!(
                            "{d} seeds done, {} failed, {} events, {:.1} s",
                            failures.load(Ordering::Relaxed),
                            steps.load(Ordering::Relaxed),
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    i += a.jobs;
                }
            });
        }
    });
    let failures = failures.into_inner();
    let what = if a.ha {
        format!(
            "heartbeat membership, {} cycles, faults {}",
            a.ha_opts.cycles, a.ha_faults_name
        )
    } else {
        format!(
            "protocol {}, {} steps, faults {}",
            a.proto_name, a.opts.steps, a.faults_name
        )
    };
    println!(
        "{} seeds from {} ({what}): {failures} failed, {} events, {:.1} s, {} jobs",
        done.into_inner(),
        a.start,
        steps.into_inner(),
        t0.elapsed().as_secs_f64(),
        a.jobs
    );
    let totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let line: Vec<String> = counter_names(a.ha)
        .iter()
        .zip(&totals)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    println!("totals of the passing seeds: {}", line.join(", "));
    if failures > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
