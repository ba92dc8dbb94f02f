#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, builds the
# workspace in release mode and runs every test (unit, integration with real
# binaries and real clients). Needs root (FUSE, loop devices, mount, netns).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "the tests need root (FUSE, loop devices, mount): run with sudo"; exit 1; }
scripts/deps.sh
cargo build --release --workspace --quiet
cargo test --release --workspace --no-fail-fast -- --test-threads=2
# Short fuzzing run of every decoder (10 s each; long runs: docs/reliability.md).
nice -n 10 scripts/fuzz.sh all 10
# Kernel frontends (kernel NBD, ublk) on a 6.12 kernel in a TCG VM: a few minutes.
tests/vm/run.sh
