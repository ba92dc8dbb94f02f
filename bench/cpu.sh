#!/usr/bin/env bash
# Where the CPU goes (issue #4's analysis): one fio job on a protocol-C pair (or A/B) and on
# the same Primary standalone, in turn. For each: IOPS and p50, CPU µs per I/O of each rdbd
# (utime+stime of every thread, from /proc) and of fio, the machine's busy/idle/steal
# shares (/proc/stat), and each busy rdbd thread's share of one CPU. A replicated run that
# leaves the machine idle while no thread is near 100% is waiting on wake-ups, not on CPU.
# Env: JOB ("randwrite 4k 32"), PROTO (C), RUNTIME_S (5), NOBUILD=1.
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "needs root"; exit 1; }
"$ROOT/scripts/deps.sh"
[ "${NOBUILD:-0}" = 1 ] || bench_build
read -r RW BS QD <<< "${JOB:-randwrite 4k 32}"
PROTO=${PROTO:-C}
bench_tmp
trap 'rdb_down; rm -rf "$T"' EXIT
trap 'exit 130' INT TERM

proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }          # clock ticks
threads() { for t in /proc/$1/task/*; do echo "$1 ${t##*/} $(awk '{print $14 + $15}' "$t/stat")"; done; }
machine() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6, $9}' /proc/stat; }  # busy idle steal

measure() { # measure LABEL: runs the job against alpha's export
  local label=$1 a b out m0 m1 a0 b0 a1 b1 w0 w1
  a=$(pgrep -f "rdbd.*--run-dir $T/run-alpha" | head -1)
  b=$(pgrep -f "rdbd.*--run-dir $T/run-beta" | head -1 || true)
  out=$(mktemp /tmp/rdb-bench.XXXXXX.json)
  w0=$(date +%s.%N); m0=$(machine); a0=$(proc_cpu "$a"); b0=${b:+$(proc_cpu "$b")}
  threads "$a" > "$T/t0"; [ -n "$b" ] && threads "$b" >> "$T/t0"
  timeout $((RUNTIME_S * 4 + 60)) fio --name=b --ioengine=nbd --uri="nbd+unix:///r0?socket=$T/run-alpha/r0.nbd" \
      --rw="$RW" --bs="$BS" --iodepth="$QD" --size=128M --time_based --runtime="$RUNTIME_S" \
      --output-format=json --output="$out" >/dev/null 2>&1 || { echo "fio failed" >&2; return 1; }
  w1=$(date +%s.%N); m1=$(machine); a1=$(proc_cpu "$a"); b1=${b:+$(proc_cpu "$b")}
  threads "$a" > "$T/t1"; [ -n "$b" ] && threads "$b" >> "$T/t1"
  python3 - "$out" "$label" "$a0" "$a1" "${b0:-0}" "${b1:-0}" "$m0" "$m1" "$T/t0" "$T/t1" "$w0" "$w1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
out, label, a0, a1, b0, b1, m0, m1, t0, t1, w0, w1, hz = sys.argv[1:14]
hz = int(hz); wall_s = float(w1) - float(w0)
j = json.load(open(out))["jobs"][0]
s = j["write"] if j["write"]["io_bytes"] else j["read"]
n = max(s["total_ios"], 1)
us = lambda d: d * 1e6 / hz / n
fio_us = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["elapsed"] * 1e6 / n
busy0, idle0, st0 = map(int, m0.split()); busy1, idle1, st1 = map(int, m1.split())
tot = max((busy1 - busy0) + (idle1 - idle0) + (st1 - st0), 1)
print(f"{label}: {s['iops']:.0f} IOPS, p50 {s['clat_ns']['percentile']['50.000000']/1000:.0f} us; "
      f"CPU per I/O: alpha {us(int(a1)-int(a0)):.1f} us, beta {us(int(b1)-int(b0)):.1f} us, fio {fio_us:.1f} us; "
      f"machine busy {100*(busy1-busy0)/tot:.0f}% idle {100*(idle1-idle0)/tot:.0f}% steal {100*(st1-st0)/tot:.0f}%")
before = {(l.split()[0], l.split()[1]): int(l.split()[2]) for l in open(t0)}
shares = []
for l in open(t1):
    p, t, v = l.split()
    if (p, t) in before and int(v) > before[(p, t)]:
        shares.append((int(v) - before[(p, t)]) * 100 / hz / wall_s)
print("  busiest rdbd threads (% of one CPU): " + ", ".join(f"{x:.0f}" for x in sorted(shares, reverse=True)[:6]))
PY
  rm -f "$out"
}

echo "job: $RW $BS QD$QD, $RUNTIME_S s; protocol $PROTO, then standalone (peer down)"
setup_rdb "$PROTO" || exit 1
measure "protocol $PROTO"
ADM beta down r0 >/dev/null 2>&1
wait_for 30 sh -c "[ \"\$($BIN/rdbadm -c $T/rdb.conf --node alpha --run-dir $T/run-alpha cstate r0)\" != Connected ]"
measure "standalone"
