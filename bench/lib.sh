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
  # The previous run's dirty pages must not be written back during this one (the
  # server measured next would pay for the one measured before).
  sync
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

# Two-node rdb setups on loopback shared by replication.sh and cpu.sh.
bench_tmp() { # sets T (scratch dir) and the two nodes' ports
  T=$(mktemp -d /tmp/rdb-bench.XXXXXX)
  PORT_A=$((20000 + RANDOM % 20000)); PORT_B=$((PORT_A + 1))
}
ADM() { local n=$1; shift; mkdir -p "$T/run-$n"; timeout 60 "$BIN/rdbadm" -c "$T/rdb.conf" --node "$n" --run-dir "$T/run-$n" "$@"; }
field() { ADM "$1" status r0 --json | python3 -c "import json,sys; r=json.load(sys.stdin)['resources'][0]; print($2)"; }
wait_for() { # wait_for SECONDS CMD...: polls with a deadline
  local deadline=$((SECONDS + $1)); shift
  while ((SECONDS < deadline)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
rdb_down() {
  for n in alpha beta; do [ -d "$T/run-$n" ] && ADM "$n" down all >/dev/null 2>&1; done
  # any rdbd left behind whose command line or environment names our run dirs
  for p in $(pgrep -x rdbd 2>/dev/null); do
    { tr '\0' ' ' < "/proc/$p/cmdline"; tr '\0' ' ' < "/proc/$p/environ"; } 2>/dev/null | grep -q "$T" && kill -9 "$p" 2>/dev/null
  done
  rm -rf "$T/run-alpha" "$T/run-beta"
  return 0
}

# setup_rdb PROTO|standalone -> serves nbd+unix://$T/run-alpha/r0.nbd
setup_rdb() {
  local proto=$1
  rm -f "$T/alpha.img" "$T/beta.img"; truncate -s 1G "$T/alpha.img" "$T/beta.img"
  cat > "$T/rdb.conf" <<CONF
resource r0 {
    device /dev/rdb-bench-$$;
    meta-disk internal;
    frontend none;
    net { protocol ${proto/standalone/C}; }
    # fresh meta-data counts as "degraded" for rdbadm up (60 s degr-wfc-timeout): no wait
    startup { wfc-timeout 0; degr-wfc-timeout 0; }
    on alpha { disk $T/alpha.img; address 127.0.0.1:$PORT_A; }
    on beta { disk $T/beta.img; address 127.0.0.1:$PORT_B; }
}
CONF
  if [ "$proto" = standalone ]; then
    # the Primary alone: beta is never started, alpha stays Connecting
    ADM alpha create-md r0 >/dev/null && ADM alpha up r0 >/dev/null && ADM alpha primary --force r0 >/dev/null 2>&1 || return 1
    [ "$(field alpha 'r["role"]')" = Primary ] || { echo "rdb standalone: alpha is not Primary" >&2; return 1; }
    return 0
  fi
  for n in alpha beta; do ADM "$n" create-md r0 >/dev/null && ADM "$n" up r0 >/dev/null || return 1; done
  wait_for 60 sh -c "[ \"\$($BIN/rdbadm -c $T/rdb.conf --node alpha --run-dir $T/run-alpha cstate r0)\" = Connected ]" || { echo "rdb $proto: never Connected" >&2; return 1; }
  # fresh pair, both Inconsistent: skip the initial full sync, then promote
  ADM alpha new-current-uuid --clear-bitmap r0 >/dev/null || return 1
  ADM alpha primary r0 >/dev/null 2>&1 || return 1
  local ok=""
  for _ in $(seq 150); do
    ok=$(field alpha 'r["connection"]=="Connected" and r["peer_disk"]=="UpToDate" and r["role"]=="Primary"' 2>/dev/null) || true
    [ "$ok" = True ] && break; sleep 0.2
  done
  [ "$ok" = True ] || { echo "rdb $proto: not Connected/UpToDate/Primary: $(ADM alpha status r0 2>&1)" >&2; return 1; }
  proto_seen=$(field alpha 'r.get("protocol", "?")' 2>/dev/null || echo "?")
  [ "$proto_seen" = "?" ] || [ "$proto_seen" = "$proto" ] || { echo "rdb: asked protocol $proto, status says $proto_seen" >&2; return 1; }
}

