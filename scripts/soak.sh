#!/usr/bin/env bash
# Soak of the deterministic simulators (docs/reliability.md): N seeds (default
# 100,000) of the replication engine (protocols C, B and A with every fault: power
# loss, disk errors, rogue promotions; no workaround flag since engine bugs B6-B8
# are fixed) and of the heartbeat membership
# (rdb-ha + rdbdisk over the engine). Runs on every core (JOBS, default nproc) at
# nice 10; stops at the first violation, printing it and its replay command.
# Usage: scripts/soak.sh [N] [ha|c|b|a|ab|all]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
n="${1:-100000}"
what="${2:-all}"
jobs="${JOBS:-$(nproc)}"
cargo build --release -p rdb-sim --quiet
sim() {
  echo "+ nice -n 10 target/release/rdb-sim --jobs $jobs --trace 200 $*"
  nice -n 10 target/release/rdb-sim --jobs "$jobs" --trace 200 "$@" | grep -v ' seeds done, '
}
case "$what" in ha|all) sim --ha --seeds "$n" ;; esac
case "$what" in c|all) sim --seeds "$n" --protocol C --faults all ;; esac
case "$what" in b|ab|all) sim --seeds "$n" --protocol B --faults all ;; esac
case "$what" in a|ab|all) sim --seeds "$n" --protocol A --faults all ;; esac
