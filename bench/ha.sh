#!/usr/bin/env bash
# Failover benchmark: client outage after a crash (kill -9) or an nftables cut-off of
# node1, for rdb-ha with the seed 003 timings (keepalive 2, deadtime 10), rdb-ha with
# fast timings (keepalive 100ms, deadtime 500ms) and keepalived VRRP (advert_int 1)
# moving the same IP, interleaved rounds in one run (network namespaces; the lab and
# the probe are in ha/tests/lab/mod.rs, the cases in ha/tests/netns.rs bench_failover).
# Writes results/ha.json and results/ha.md.
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "needs root"; exit 1; }
"$ROOT/scripts/deps.sh"
bench_build
OUT=$RESULTS/ha.json
(cd "$ROOT" && RDB_HA_BENCH_ROUNDS=$ROUNDS RDB_HA_BENCH_OUT=$OUT timeout 1800 \
  cargo test --release -p rdb-ha --test netns --quiet -- --ignored --nocapture --test-threads 1 bench_failover) \
  | grep -E '^round'
python3 - "$OUT" > "$RESULTS/ha.md" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
rows = [("keepalived_crash", "keepalived 2.2.7, advert_int 1", "kill -9"),
        ("rdb_ha_seed_crash", "rdb-ha, seed timings (keepalive 2, deadtime 10)", "kill -9"),
        ("rdb_ha_fast_crash", "rdb-ha, keepalive 100ms, deadtime 500ms", "kill -9"),
        ("keepalived_cut", "keepalived 2.2.7, advert_int 1", "nftables cut"),
        ("rdb_ha_fast_cut", "rdb-ha, keepalive 100ms, deadtime 500ms", "nftables cut")]
print("# Failover: client outage (ms)\n")
print(j["method"] + "\n")
print("| tool and settings | failure | median | rounds |\n|---|---|---|---|")
for k, name, how in rows:
    print(f"| {name} | {how} | {j['median_ms'][k]} | {', '.join(map(str, j['outage_ms'][k]))} |")
print(f"\nratios of medians: fast/keepalived (crash) {j['ratio_fast_crash_vs_keepalived_crash']}, "
      f"seed/keepalived (crash) {j['ratio_seed_crash_vs_keepalived_crash']}, "
      f"fast/keepalived (cut) {j['ratio_fast_cut_vs_keepalived_cut']}; target with fast timings < {j['fast_target_ms']} ms")
PY
cat "$RESULTS/ha.md"
