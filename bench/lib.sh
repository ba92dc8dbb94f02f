# Shared helpers of the benchmarks (sourced). Every fio run is bounded by --runtime.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
BIN=$ROOT/target/release
RUNTIME_S=${RUNTIME_S:-5}
ROUNDS=${ROUNDS:-3}
RESULTS=$BENCH_DIR/results
mkdir -p "$RESULTS"

bench_build() {
  (cd "$ROOT" && cargo build --release --workspace --quiet)
}

# fio_job URI RW BS QD -> prints "iops bw_bytes p50_us"
fio_job() {
  local uri=$1 rw=$2 bs=$3 qd=$4 out
  out=$(mktemp /tmp/rdb-bench.XXXXXX.json)
  timeout $((RUNTIME_S * 4 + 60)) fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --numjobs=1 --size=1G --time_based --runtime="$RUNTIME_S" --ramp_time=1 \
      --group_reporting --output-format=json --output="$out" >/dev/null 2>&1 || { rm -f "$out"; echo "fio failed on $uri" >&2; return 1; }
  python3 - "$out" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
p50 = side["clat_ns"]["percentile"].get("50.000000", 0) / 1000
print(f'{side["iops"]:.0f} {side["bw_bytes"]:.0f} {p50:.1f}')
PY
  rm -f "$out"
}

JOBS=("randwrite 4k 32" "randwrite 4k 1" "write 1M 8" "randread 4k 32")
