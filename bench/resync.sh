#!/usr/bin/env bash
# Resync benchmark (issue "Meta-data in action"), three figures measured in one run:
#  1. full resync throughput on loopback (primary --force on a fresh pair, 2 GiB, 1 GiB
#     of it random data), against the backing file's sequential read speed (fio,
#     O_DIRECT, same file system) -> target >= min(1 GiB/s, 90 % of that read speed);
#  2. smart resync time after 1 % of a 10 GiB device was written while disconnected
#     (random 4 KiB blocks) -> target < 2 s;
#  3. activity-log overhead: 4k randwrite QD32 inside the hot set (1 GiB, AL warm),
#     `al-updates yes` vs `al-updates no`, interleaved rounds -> target < 3 %.
# Writes results/resync.json and results/resync.md.
# PARTS=1 (or 2, 3, 13...) runs only those figures while iterating; results are only
# written when all three ran.
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "needs root"; exit 1; }
"$ROOT/scripts/deps.sh"
bench_build
T=$(mktemp -d /tmp/rdb-bench-resync.XXXXXX)
P=$((20000 + RANDOM % 20000))
ADM() { local n=$1; shift; "$BIN/rdbadm" -c "$T/rdb.conf" --node "$n" --run-dir "$T/run-$n" "$@"; }
cleanup() {
  for n in alpha beta; do ADM $n down all >/dev/null 2>&1 || true; done
  rm -rf "$T"
}
trap cleanup EXIT
jget() { # jget NODE EXPR (r = resources[0])
  ADM "$1" status r0 --json | python3 -c "import json,sys; r=json.load(sys.stdin)['resources'][0]; print($2)"
}
conf() { # conf SIZE EXTRA_DISK (KEEP_IMAGES=1: the images stay as they are)
  if [ -z "${KEEP_IMAGES:-}" ]; then
    rm -f "$T"/alpha.img "$T"/beta.img
    truncate -s "$1" "$T/alpha.img" "$T/beta.img"
  fi
  cat > "$T/rdb.conf" <<CONF
resource r0 {
    device /dev/rdb-bench-$$;
    meta-disk internal;
    frontend none;
    disk { c-max-rate 4G; $2 }
    # Redial every second: the smart resync time starts at rdbadm connect, and with
    # the default 10 s it measured when the dialler next woke up.
    net { connect-int 1; }
    on alpha { disk $T/alpha.img; address 127.0.0.1:$P; }
    on beta { disk $T/beta.img; address 127.0.0.1:$((P + 1)); }
}
CONF
}
in_sync() { [ "$(jget alpha 'r["connection"]=="Connected" and r["peer_disk"]=="UpToDate" and r["out_of_sync_bytes"]==0')" = True ]; }
wait_sync() { local deadline=$((SECONDS + $1)); until in_sync; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.05; done; }
now() { date +%s.%N; }
AL_ROUNDS=${AL_ROUNDS:-6}
PARTS=${PARTS:-123}
part() { [[ $PARTS == *$1* ]]; }
full_bps=0; read_bps=1; full_bytes=0; smart_s=0; oos=0; smart_bytes=0; al_tr=0; on=(0); off=(0); on_cpu=(0); off_cpu=(0)

# 1. Full resync.
if part 1; then
conf 2G ""
dd if=/dev/urandom of="$T/alpha.img" bs=1M count=1024 conv=notrunc status=none
read_bps=$(fio --name=r --filename="$T/alpha.img" --rw=read --bs=1M --direct=1 --size=1G \
  --ioengine=psync --output-format=json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"])')
for n in alpha beta; do ADM $n create-md r0 --force >/dev/null; ADM $n up r0 >/dev/null; done
t0=$(now); ADM alpha primary r0 --force >/dev/null
wait_sync 300 || { echo "full sync did not finish"; exit 1; }
t1=$(now)
full_bytes=$(jget alpha 'r["resync_bytes_total"]')
grep -ho "resync done.*" "$T/run-alpha/rdbd.log" | tail -1 || true
for n in alpha beta; do ADM $n down r0 >/dev/null; done
cmp -n "$full_bytes" "$T/alpha.img" "$T/beta.img" >/dev/null || { echo "disks differ after the full sync"; exit 1; }
full_bps=$(python3 -c "print(int($full_bytes/($t1-$t0)))")
echo "full resync: $full_bytes bytes in $(python3 -c "print(round($t1-$t0,2))") s = $((full_bps/1048576)) MiB/s; backing file O_DIRECT sequential read $((read_bps/1048576)) MiB/s"
fi

# 2. Smart resync of 1 % of 10 GiB.
if part 2; then
conf 10G ""
for n in alpha beta; do ADM $n create-md r0 --force >/dev/null; ADM $n up r0 >/dev/null; done
deadline=$((SECONDS + 30)); until [ "$(jget beta 'r["connection"]')" = Connected ]; do [ $SECONDS -lt $deadline ] || exit 1; sleep 0.1; done
ADM alpha new-current-uuid --clear-bitmap r0 >/dev/null
wait_sync 30 || { echo "skip-sync failed"; exit 1; }
ADM alpha primary r0 >/dev/null
ADM beta disconnect r0 >/dev/null
size=$(jget alpha 'r["size_bytes"]'); blocks=$((size / 4096 / 100))
fio --name=dirty --ioengine=nbd --uri="nbd+unix:///r0?socket=$T/run-alpha/r0.nbd" --rw=randwrite --bs=4k \
  --iodepth=32 --size="$size" --number_ios=$blocks --randseed=3 --output=/dev/null >/dev/null 2>&1
oos=$(jget alpha 'r["out_of_sync_bytes"]'); before=$(jget alpha 'r["resync_bytes_total"]')
t0=$(now); ADM beta connect r0 >/dev/null
wait_sync 120 || { echo "smart resync did not finish"; exit 1; }
t1=$(now)
smart_s=$(python3 -c "print(round($t1-$t0,3))")
smart_bytes=$(( $(jget alpha 'r["resync_bytes_total"]') - before ))
ADM alpha secondary r0 >/dev/null; for n in alpha beta; do ADM $n down r0 >/dev/null; done
echo "smart resync: $oos bytes out of sync ($blocks random 4k writes on $size bytes), $smart_bytes bytes sent in $smart_s s (connect to in sync)"
fi

# 3. Activity-log overhead inside the hot set (one node, no peer: only the AL differs).
# Both settings run on the same image, whose first GiB is written (allocated) once
# beforehand, with dirty pages written back before each run: no run pays for block
# allocation or for the previous run's writeback. Besides IOPS, the daemon's CPU
# time per write (all its threads, from schedstat) is compared: it does not depend
# on what else the machine runs.
cpu_ns() { # cpu_ns PID -> ns on CPU of every thread of PID
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%d\n", s}'
}
al_iops() { # al_iops yes|no -> "IOPS AL_WRITES CPU_NS_PER_WRITE" of a warm randwrite QD32 run
  KEEP_IMAGES=1 conf 2G "al-updates $1;"
  ADM alpha create-md r0 --force >/dev/null; ADM alpha up r0 >/dev/null; ADM alpha primary r0 --force >/dev/null 2>&1
  local pid; pid=$(pgrep -f -- "--node alpha --run-dir $T/run-alpha" | head -1)
  local U="nbd+unix:///r0?socket=$T/run-alpha/r0.nbd"
  fio --name=warm --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --iodepth=32 --size=1G \
    --time_based --runtime=2 --output=/dev/null >/dev/null 2>&1
  local al0; al0=$(jget alpha 'r["counters"]["al_writes"]')
  local w0; w0=$(jget alpha 'r["counters"]["disk_written_bytes"]//4096')
  local c0; c0=$(cpu_ns "$pid")
  local r; r=$(fio_job "$U" randwrite 4k 32)
  local c1; c1=$(cpu_ns "$pid")
  local w1; w1=$(jget alpha 'r["counters"]["disk_written_bytes"]//4096')
  local al1; al1=$(jget alpha 'r["counters"]["al_writes"]')
  ADM alpha secondary r0 >/dev/null; ADM alpha down r0 >/dev/null
  sync
  local n=$((w1 - w0)); [ "$n" -gt 0 ] || n=1
  echo "${r%% *} $((al1 - al0)) $(((c1 - c0) / n))"
}
if part 3; then
conf 2G ""
dd if=/dev/zero of="$T/alpha.img" bs=1M count=1024 conv=notrunc status=none; sync
on=(); off=(); on_cpu=(); off_cpu=(); al_tr=0
for i in $(seq "$AL_ROUNDS"); do
  # Alternate which setting runs first (ABBA).
  if [ $((i % 2)) = 1 ]; then
    read -r a tr ac < <(al_iops yes); read -r b _ bc < <(al_iops no)
  else
    read -r b _ bc < <(al_iops no); read -r a tr ac < <(al_iops yes)
  fi
  on+=("$a"); off+=("$b"); on_cpu+=("$ac"); off_cpu+=("$bc"); al_tr=$((al_tr + tr))
  echo "  round $i: al-updates yes $a IOPS, $ac ns CPU/write ($tr AL transactions during the run); no $b IOPS, $bc ns CPU/write"
done
fi
[ "$PARTS" = 123 ] || exit 0
python3 - "$RESULTS" "$full_bps" "$read_bps" "$full_bytes" "$smart_s" "$oos" "$smart_bytes" "$al_tr" "${on[*]}" "${off[*]}" "${on_cpu[*]}" "${off_cpu[*]}" <<'PY'
import json, statistics, sys
res, full_bps, read_bps, full_bytes, smart_s, oos, smart_bytes, al_tr = sys.argv[1], *map(float, sys.argv[2:9])
on = [float(x) for x in sys.argv[9].split()]; off = [float(x) for x in sys.argv[10].split()]
on_cpu = [float(x) for x in sys.argv[11].split()]; off_cpu = [float(x) for x in sys.argv[12].split()]
mon, moff = statistics.median(on), statistics.median(off)
# Paired: each round's two runs are adjacent in time, so their ratio cancels most
# of the load others put on the machine; the median over rounds is reported.
overhead = statistics.median(100.0 * (b - a) / b for a, b in zip(on, off) if b)
cpu_overhead = statistics.median(100.0 * (a - b) / b for a, b in zip(on_cpu, off_cpu) if b)
full_target = min(1 << 30, 0.9 * read_bps)
out = {
    "full_resync_bytes_per_s": full_bps, "backing_seq_read_bytes_per_s": read_bps,
    "full_resync_target_bytes_per_s": full_target, "full_resync_ratio_to_target": full_bps / full_target,
    "smart_resync_s": smart_s, "smart_resync_out_of_sync_bytes": oos, "smart_resync_sent_bytes": smart_bytes,
    "al_on_iops": on, "al_off_iops": off, "al_overhead_percent": overhead,
    "al_on_cpu_ns_per_write": on_cpu, "al_off_cpu_ns_per_write": off_cpu,
    "al_cpu_overhead_percent": cpu_overhead,
    "al_transactions_in_measured_runs": al_tr,
}
json.dump(out, open(f"{res}/resync.json", "w"), indent=2)
md = f"""| figure | measured | target |
|---|---|---|
| full resync | {full_bps/2**20:.0f} MiB/s ({full_bytes/2**20:.0f} MiB) | >= {full_target/2**20:.0f} MiB/s (min of 1 GiB/s and 90 % of the {read_bps/2**20:.0f} MiB/s O_DIRECT read) |
| smart resync, 1 % of 10 GiB dirty | {smart_s:.2f} s ({smart_bytes/2**20:.1f} MiB sent) | < 2 s |
| AL overhead, 4k randwrite QD32 in the hot set | {overhead:.1f} % IOPS (median of {len(on)} paired rounds; medians {mon:.0f} vs {moff:.0f} IOPS); rdbd CPU per write {cpu_overhead:+.1f} % ({statistics.median(on_cpu):.0f} vs {statistics.median(off_cpu):.0f} ns; schedstat of live threads only, blocking-pool threads that exit are missed: indicative); {al_tr:.0f} AL writes | < 3 % |
"""
open(f"{res}/resync.md", "w").write(md)
print(md)
PY
