#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (one per decoder, see docs/reliability.md).
#
#   scripts/fuzz.sh all SECONDS        every target for SECONDS each, one after the other
#   scripts/fuzz.sh TARGET SECONDS     one target
#   scripts/fuzz.sh list               the target names
#
# CI (scripts/test.sh) runs `scripts/fuzz.sh all 10`; the long run of docs/reliability.md
# is `nice -n 19 scripts/fuzz.sh TARGET 600` per target. Works on the stable toolchain:
# no sanitizer (`-s none`, the decoders are safe Rust), debug assertions on (overflow
# checks), libFuzzer's coverage instrumentation. Installs cargo-fuzz if missing.
#
# The corpus grows in fuzz/corpus/TARGET (not committed), seeded from fuzz/seeds/TARGET
# (committed) and, for `config`, from tests/data/config. A crash leaves its input in
# fuzz/artifacts/TARGET/ and fails the script: turn it into a regression test (see
# docs/reliability.md) and fix the decoder. The last line per target is a summary:
#   fuzz TARGET: N runs in S s, cov C, ft F, corpus K (ok|CRASH)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"

usage() { echo "usage: $0 all|TARGET SECONDS | list" >&2; exit 2; }
[ $# -ge 1 ] || usage

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked --quiet
fi

targets=$(cargo fuzz list)
if [ "$1" = list ]; then echo "$targets"; exit 0; fi
[ $# -eq 2 ] || usage
seconds=$2
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || usage
if [ "$1" = all ]; then
  run=$targets
else
  grep -qx -- "$1" <<<"$targets" || { echo "unknown fuzz target '$1'; targets: $(echo $targets)" >&2; exit 2; }
  run=$1
fi

# FUZZ_NO_BUILD=1 runs the binaries built before (long runs while the sources change).
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
  one=$([ "$1" = all ] || echo "$1")  # cargo fuzz build takes one target or none (all)
  cargo fuzz build -s none $one >/dev/null 2>build.log || { cat build.log >&2; exit 1; }
  rm -f build.log
fi
bin_dir=target/$(rustc -vV | sed -n 's/^host: //p')/release

failed=()
for t in $run; do
  mkdir -p "corpus/$t" "artifacts/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  [ "$t" = config ] && dirs+=("../tests/data/config" "../tests/data/config/seed003/drbd.d")
  log="artifacts/$t/last-run.log"
  rc=0
  # -timeout: an input taking more than 10 s is a hang; -rss_limit_mb bounds memory.
  "$bin_dir/$t" "${dirs[@]}" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corpus=$(find "corpus/$t" -type f | wc -l)
  if [ "$rc" = 0 ]; then
    echo "fuzz $t: ${runs:-?} runs in ${secs:-?} s, cov ${cov:-?}, ft ${ft:-?}, corpus $corpus (ok)"
  else
    echo "fuzz $t: CRASH (exit $rc) after ${runs:-?} runs; input and log in fuzz/artifacts/$t/:" >&2
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -10 >&2 || true
    failed+=("$t")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz targets failed: ${failed[*]}" >&2
  exit 1
fi
