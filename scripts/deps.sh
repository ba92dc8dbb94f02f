#!/usr/bin/env bash
# Installs the Debian packages rdb's build, quickstart and tests need (idempotent).
set -euo pipefail
pkgs=(fio nbdkit libnbd-bin python3-libnbd qemu-utils fuse3 e2fsprogs util-linux
      iproute2 nftables pkg-config keepalived psmisc passwd
      qemu-system-x86 busybox-static cpio libclang-dev)  # last line: tests/vm (VM harness, libublk bindgen)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "FUSE is not available (/dev/fuse missing): load the fuse module"; exit 1; }
[ -e /dev/loop-control ] || { echo "loop devices are not available (/dev/loop-control missing): modprobe loop"; exit 1; }
