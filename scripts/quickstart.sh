#!/usr/bin/env bash
# Quickstart: a two-node rdb demo on one machine (two run dirs, loopback).
# create-md, up, primary, mkfs.ext4, mount, write, status. KEEP=1 leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "the quickstart needs root (FUSE, loop devices, mount): run with sudo"; exit 1; }
scripts/deps.sh
cargo build --release --workspace --quiet
ADM=$PWD/target/release/rdbadm
D=/tmp/rdb-quickstart
if [ -d "$D" ]; then
  for n in alpha beta; do "$ADM" -c "$D/rdb.conf" --node $n --run-dir "$D/run-$n" down all 2>/dev/null || true; done
  umount "$D/mnt" 2>/dev/null || true
  rm -rf "$D"
fi
mkdir -p "$D/mnt"
truncate -s 512M "$D/alpha.img" "$D/beta.img"
cat > "$D/rdb.conf" <<CONF
resource r0 {
    device /dev/rdb0;
    flexible-meta-disk internal;
    net { protocol C; }
    on alpha { disk $D/alpha.img; address 127.0.0.1:7788; }
    on beta  { disk $D/beta.img;  address 127.0.0.1:7789; }
}
CONF
adm() { local n=$1; shift; echo "+ rdbadm --node $n $*"; "$ADM" -c "$D/rdb.conf" --node "$n" --run-dir "$D/run-$n" "$@"; }
adm alpha create-md r0
adm beta create-md r0
adm alpha up r0
adm beta up r0
adm alpha primary --force r0
echo "+ mkfs.ext4 /dev/rdb0 && mount /dev/rdb0 $D/mnt"
mkfs.ext4 -q /dev/rdb0
mount /dev/rdb0 "$D/mnt"
echo "hello from rdb, $(date)" > "$D/mnt/hello.txt"
head -c 16M /dev/urandom > "$D/mnt/random.bin"
sync
ls -l "$D/mnt"
df -h "$D/mnt"
adm alpha status --proc r0
echo "waiting for the initial full sync (bounded: 120 s)..."
for i in $(seq 1 240); do
  "$ADM" -c "$D/rdb.conf" --node alpha --run-dir "$D/run-alpha" status r0 --json | grep -q '"peer_disk": "UpToDate"' && break
  sleep 0.5
done
adm alpha status r0
adm beta status r0
adm alpha status --proc r0
if [ "${KEEP:-0}" = 1 ]; then
  echo "left running: umount $D/mnt; $ADM -c $D/rdb.conf --node alpha --run-dir $D/run-alpha down r0 (and beta)"
  exit 0
fi
umount "$D/mnt"
adm alpha down r0
adm beta down r0
size=$(( $(stat -c %s "$D/alpha.img") - 1024 * 1024 ))
if cmp -n "$size" "$D/alpha.img" "$D/beta.img"; then
  echo "the two backing disks are identical (first $size bytes compared)"
else
  echo "the backing disks differ"; exit 1
fi
echo "quickstart done"
