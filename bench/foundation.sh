#!/usr/bin/env bash
# Foundation benchmark: rdb's NBD server (one node, Primary) vs nbdkit's file plugin
# on the same kind of 1 GiB backing file, same fio jobs, interleaved rounds; prints
# the median ratio per job and writes results/foundation.json (+ .md table, .png).
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "needs root"; exit 1; }
"$ROOT/scripts/deps.sh"
bench_build
T=$(mktemp -d /tmp/rdb-bench.XXXXXX)
ADM() { "$BIN/rdbadm" -c "$T/rdb.conf" --node alpha --run-dir "$T/run" "$@"; }
cleanup() { ADM down all >/dev/null 2>&1 || true; [ -f "$T/kit.pid" ] && kill "$(cat "$T/kit.pid")" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
truncate -s 1G "$T/beta.img"
# Both servers' files are written in full first: a write into a hole of a sparse
# file pays the filesystem's block allocation, and the first round would measure
# that (rdb 0.39x-1.41x of nbdkit at QD32 on the same binaries, 2026-12-01).
for f in alpha kit; do
  dd if=/dev/zero of="$T/$f.img" bs=1M count=1024 conv=fsync status=none
done
ENGINE=${ENGINE:-sync}
cat > "$T/rdb.conf" <<CONF
resource r0 {
    device /dev/rdb-bench-$$;
    meta-disk internal;
    frontend none;
    disk { io-engine $ENGINE; }
    on alpha { disk $T/alpha.img; address 127.0.0.1:17788; }
    on beta { disk $T/beta.img; address 127.0.0.1:17789; }
}
CONF
ADM create-md r0 >/dev/null && ADM up r0 >/dev/null && ADM primary --force r0 2>/dev/null
nbdkit -U "$T/kit.sock" -P "$T/kit.pid" file file="$T/kit.img"
for i in $(seq 50); do [ -S "$T/kit.sock" ] && break; sleep 0.1; done
R="nbd+unix:///r0?socket=$T/run/r0.nbd"; K="nbd+unix:///?socket=$T/kit.sock"
echo "rdb vs nbdkit file plugin, ${RUNTIME_S}s per run, $ROUNDS interleaved rounds, io-engine $ENGINE"
json="["
for job in "${JOBS[@]}"; do
  set -- $job
  rows=""
  for round in $(seq "$ROUNDS"); do
    k=$(fio_job "$K" "$1" "$2" "$3"); r=$(fio_job "$R" "$1" "$2" "$3")
    rows="$rows$k $r;"
  done
  line=$(python3 - "$1" "$2" "$3" "$rows" <<'PY'
import sys, statistics, json
rw, bs, qd, rows = sys.argv[1:5]
runs = [list(map(float, r.split())) for r in rows.strip(";").split(";")]
ratio = statistics.median(r[3] / max(r[0], 1) for r in runs)
kit = statistics.median(r[0] for r in runs); rdb = statistics.median(r[3] for r in runs)
kp50 = statistics.median(r[2] for r in runs); rp50 = statistics.median(r[5] for r in runs)
job = f"{rw} {bs} QD{qd}"
print(f"{job:<18} nbdkit {kit:>9.0f} IOPS  rdb {rdb:>9.0f} IOPS  ratio {ratio:.2f}x  p50 {kp50:.0f}/{rp50:.0f} us", file=sys.stderr)
print(json.dumps({"job": job, "nbdkit_iops": kit, "rdb_iops": rdb, "ratio": round(ratio, 2), "nbdkit_p50_us": kp50, "rdb_p50_us": rp50}))
PY
)
  json="$json$line,"
done
echo "${json%,}]" > "$RESULTS/foundation.json"
python3 "$BENCH_DIR/report.py" "$RESULTS/foundation.json" "rdb vs nbdkit (one node)" || true
