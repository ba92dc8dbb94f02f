//! `rdb-sim`: runs the replication simulator over a range of seeds.
//!
//! `rdb-sim --seeds N [--seed S] [--protocol A|B|C] [--steps K] [--faults all|survivable|no-connection-loss|none]
//! [--rate name=per_mille,...] [--bug ack-before-write|drop-oos] [--avoid-known-bugs] [--trace N]
//! [--keep-going]`
//! runs seeds S..S+N, prints a progress line every 1000 seeds, and on the first
//! violation prints it with a replay command and exits with status 1.

use std::process::ExitCode;
use std::time::Instant;

use rdb_sim::{run_seed, Bug, FaultRates, Protocol, SimOptions};

fn usage() -> ExitCode {
    eprintln!(
        "usage: rdb-sim --seeds N [--seed S] [--protocol A|B|C] [--steps K] \
         [--faults all|survivable|no-connection-loss|none] [--rate name=per_mille,...] [--bug ack-before-write|drop-oos] [--avoid-known-bugs] [--trace N] [--keep-going]"
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
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || val.parse::<u64>().map_err(|e| format!("{flag} {val}: {e}"));
        match flag.as_str() {
            "--seeds" => a.seeds = num()?,
            "--seed" => a.start = num()?,
            "--steps" => a.opts.steps = num()?,
            "--trace" => a.opts.trace_len = num()? as usize,
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
    let mut failures = 0u64;
    let mut steps = 0u64;
    for i in 0..a.seeds {
        let seed = a.start + i;
        match run_seed(seed, &a.opts) {
            Ok(r) => steps += r.steps,
            Err(v) => {
                failures += 1;
                println!("FAIL {v}");
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
                println!(
                    "replay: cargo run --release -p rdb-sim -- --seeds 1 --seed {seed} --protocol {} --steps {} --faults {}{}{bug}{avoid} --trace 200",
                    a.proto_name, a.opts.steps, a.faults_name, a.rates
                );
                if !a.keep_going {
                    return ExitCode::from(1);
                }
            }
        }
        if (i + 1) % 1000 == 0 {
            println!(
                "{} seeds ({}..={seed}) done, {failures} failed, {steps} steps, {:.1} s",
                i + 1,
                a.start,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{} seeds from {} (protocol {}, {} steps, faults {}): {failures} failed, {steps} events, {:.1} s",
        a.seeds,
        a.start,
        a.proto_name,
        a.opts.steps,
        a.faults_name,
        t0.elapsed().as_secs_f64()
    );
    if failures > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
