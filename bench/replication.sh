#!/usr/bin/env bash
# Replication benchmark (issue #4): two rdb nodes on loopback, protocols A, B and C, against
# (a) the same Primary standalone (no peer) and (b) QEMU's synchronous mirror
# (qemu-storage-daemon `blockdev-mirror` copy-mode write-blocking to a qemu-nbd target over a
# unix socket: the protocol C anchor). Same fio jobs as bench/foundation.sh, interleaved
# rounds (each round brings every setup up, runs all jobs, tears it down); prints medians
# and ratios, writes results/replication.json (+ .md table, .png when matplotlib exists).
# Env: ROUNDS (3), RUNTIME_S (5 s per fio job), NOBUILD=1 to skip the cargo build.
. "$(dirname "$0")/lib.sh"
[ "$(id -u)" = 0 ] || { echo "needs root"; exit 1; }
"$ROOT/scripts/deps.sh"
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing: apt-get install qemu-system-common (scripts/deps.sh installs qemu-system-x86)"; exit 1; }
command -v qemu-nbd >/dev/null || { echo "qemu-nbd missing: apt-get install qemu-utils"; exit 1; }
[ "${NOBUILD:-0}" = 1 ] || bench_build
bench_tmp
kill_pidfile() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null; rm -f "$1"; }
qemu_down() { kill_pidfile "$T/qsd.pid"; kill_pidfile "$T/qnbd.pid"; rm -f "$T"/*.sock; return 0; }
cleanup() { rdb_down; qemu_down; rm -rf "$T"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# setup_qemu -> serves nbd+unix:///src?socket=$T/qsd-export.sock with the mirror READY
setup_qemu() {
  rm -f "$T/src.img" "$T/tgt.img"; truncate -s 1G "$T/src.img" "$T/tgt.img"
  qemu-nbd -t -f raw -k "$T/qnbd.sock" --pid-file="$T/qnbd.pid" "$T/tgt.img" </dev/null >"$T/qnbd.log" 2>&1 &
  wait_for 20 test -S "$T/qnbd.sock" || { echo "qemu-nbd did not start: $(cat "$T/qnbd.log")" >&2; return 1; }
  # export first, then mirror: blockdev-mirror moves the export's parent link onto its
  # filter node (mtop), so every write of the export goes through the mirror
  qemu-storage-daemon \
      --blockdev driver=file,node-name=srcfile,filename="$T/src.img" \
      --blockdev driver=raw,node-name=src,file=srcfile \
      --blockdev driver=nbd,node-name=tgt,server.type=unix,server.path="$T/qnbd.sock" \
      --nbd-server addr.type=unix,addr.path="$T/qsd-export.sock" \
      --export type=nbd,id=e0,node-name=src,name=src,writable=on \
      --chardev socket,id=qmp,path="$T/qmp.sock",server=on,wait=off --monitor chardev=qmp \
      --pidfile "$T/qsd.pid" </dev/null >"$T/qsd.log" 2>&1 &
  wait_for 20 test -S "$T/qmp.sock" -a -S "$T/qsd-export.sock" || { echo "qemu-storage-daemon did not start: $(cat "$T/qsd.log")" >&2; return 1; }
  timeout 120 python3 "$BENCH_DIR/qmp.py" "$T/qmp.sock" mirror src tgt 100 || { echo "blockdev-mirror failed: $(cat "$T/qsd.log")" >&2; return 1; }
}

run_jobs() { # run_jobs SETUP URI: appends "SETUP ROUND JOBIDX iops bw p50" lines to $T/raw
  local setup=$1 uri=$2 i=0 job r
  for job in "${JOBS[@]}"; do
    set -- $job
    r=$(fio_job "$uri" "$1" "$2" "$3") || return 1
    echo "$setup $round $i $r" >> "$T/raw"
    i=$((i + 1))
  done
}

SETUPS=(standalone A B C qemu)
echo "rdb replication (2 nodes, loopback) vs standalone and QEMU write-blocking mirror; ${RUNTIME_S}s per job, $ROUNDS interleaved rounds"
: > "$T/raw"
for round in $(seq "$ROUNDS"); do
  for s in "${SETUPS[@]}"; do
    if [ "$s" = qemu ]; then
      setup_qemu || exit 1
      run_jobs qemu "nbd+unix:///src?socket=$T/qsd-export.sock" || exit 1
      python3 "$BENCH_DIR/qmp.py" "$T/qmp.sock" check-mirror >/dev/null || { echo "QEMU mirror job not READY after the jobs" >&2; exit 1; }
      # the mirror must really be synchronous: target == source once the writes are done
      cmp -s "$T/src.img" "$T/tgt.img" || { echo "QEMU mirror: target differs from source" >&2; exit 1; }
      qemu_down
    else
      setup_rdb "$s" || exit 1
      run_jobs "$s" "nbd+unix:///r0?socket=$T/run-alpha/r0.nbd" || exit 1
      if [ "$s" != standalone ]; then
        [ "$(field alpha 'r["connection"]')" = Connected ] || { echo "rdb $s: lost the connection during the jobs" >&2; exit 1; }
      fi
      rdb_down
    fi
    echo "round $round: $s done" >&2
  done
done

python3 - "$T/raw" "$RESULTS/replication.json" "$RUNTIME_S" "$ROUNDS" "$(nproc)" "$(uptime)" <<'PY'
import json, statistics, sys
raw, out, runtime_s, rounds, ncpu, uptime = sys.argv[1:7]
jobs = ["4k randwrite QD32", "4k randwrite QD1", "1M write QD8", "4k randread QD32"]
setups = ["standalone", "A", "B", "C", "qemu"]
runs = {}
for line in open(raw):
    s, rnd, i, iops, bw, p50 = line.split()
    runs.setdefault((s, int(i)), []).append((float(iops), float(bw), float(p50)))
med = lambda s, i, k: statistics.median(r[k] for r in runs[(s, i)])
rows = []
for i, job in enumerate(jobs):
    row = {"job": job}
    for s in setups:
        row[f"{s}_iops"] = round(med(s, i, 0))
        row[f"{s}_MiBps"] = round(med(s, i, 1) / 2**20, 1)
        row[f"{s}_p50_us"] = round(med(s, i, 2), 1)
    for s in ["C", "B", "A"]:
        row[f"{s}/standalone"] = round(row[f"{s}_iops"] / max(row["standalone_iops"], 1), 2)
    row["C/qemu"] = round(row["C_iops"] / max(row["qemu_iops"], 1), 2)
    row["C-standalone_p50_us"] = round(row["C_p50_us"] - row["standalone_p50_us"], 1)
    row["runs"] = {s: runs[(s, i)] for s in setups}
    rows.append(row)
r32, r1, seq = rows[0], rows[1], rows[2]
targets = [
    ("C 4k randwrite QD32 >= 0.70x standalone", r32["C/standalone"], r32["C/standalone"] >= 0.70),
    ("C 4k randwrite QD32 >= 2x QEMU mirror", r32["C/qemu"], r32["C/qemu"] >= 2.0),
    ("C 1M seq write >= 0.85x standalone bandwidth", seq["C/standalone"], seq["C/standalone"] >= 0.85),
    ("C QD1 write p50 <= standalone p50 + 60 us", r1["C-standalone_p50_us"], r1["C-standalone_p50_us"] <= 60),
]
doc = {"runtime_s": int(runtime_s), "rounds": int(rounds), "cpus": int(ncpu), "load_at_end": uptime.strip(),
       "note": "medians of interleaved rounds on a shared, noisy 2-core machine; runs[] are (iops, bw_bytes, p50_us) per round",
       "jobs": rows, "targets": [{"target": t, "value": v, "met": m} for t, v, m in targets]}
json.dump(doc, open(out, "w"), indent=1)
md = ["# rdb replication vs standalone and QEMU write-blocking mirror", "",
      f"fio 4 jobs, `ioengine=nbd`, {runtime_s} s per job (+1 s ramp), 1 GiB files in page cache (no O_DIRECT on either side), "
      f"median of {rounds} interleaved round(s). Machine: {ncpu} shared cores, noisy (other developers' builds and tests); "
      f"load at end: `{uptime.strip()}`.", "",
      "| job | standalone | A | B | C | QEMU mirror | C/standalone | B/standalone | A/standalone | C/QEMU |",
      "|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    unit = (lambda s: f"{r[s + '_MiBps']:.0f} MiB/s") if r["job"].startswith("1M") else (lambda s: f"{r[s + '_iops'] / 1000:.1f}k")
    md.append(f"| {r['job']} | " + " | ".join(unit(s) for s in setups)
              + f" | {r['C/standalone']:.2f} | {r['B/standalone']:.2f} | {r['A/standalone']:.2f} | {r['C/qemu']:.2f} |")
md += ["", "p50 completion latency (us):", "", "| job | standalone | A | B | C | QEMU mirror | C - standalone |", "|---|---|---|---|---|---|---|"]
for r in rows:
    md.append(f"| {r['job']} | " + " | ".join(f"{r[s + '_p50_us']:.0f}" for s in setups) + f" | {r['C-standalone_p50_us']:+.0f} |")
md += ["", "Targets (issue #4):", ""]
md += [f"- {t}: {v} -> {'met' if m else 'NOT met'}" for t, v, m in targets]
open(out.replace(".json", ".md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(matplotlib not installed: no PNG plot; pip install matplotlib for it)")
    sys.exit(0)
fig, ax = plt.subplots(figsize=(8, 3.5))
w = 0.2
for k, key in enumerate(["A/standalone", "B/standalone", "C/standalone", "C/qemu"]):
    ax.bar([i + (k - 1.5) * w for i in range(len(rows))], [r[key] for r in rows], w, label=key)
ax.set_xticks(range(len(rows)), [r["job"] for r in rows])
ax.axhline(1.0, color="black", linewidth=0.8)
ax.set_ylabel("ratio (higher is better)"); ax.legend(fontsize=7); ax.set_title("rdb replication")
plt.tight_layout(); plt.savefig(out.replace(".json", ".png"), dpi=100)
PY
