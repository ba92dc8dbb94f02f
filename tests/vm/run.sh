#!/usr/bin/env bash
# VM test harness: proves the kernel frontends (kernel NBD via netlink, ublk) on a
# kernel that has nbd.ko and ublk_drv.ko, which the host kernel lacks.
#
# Boots Debian bookworm's 6.12 kernel (fetched with `apt-get download`, unpacked,
# never installed) under qemu-system-x86_64 with TCG, with a small uncompressed
# initramfs: busybox, the static rdbd/rdbadm, fio, mke2fs/e2fsck (host binaries and
# the shared libraries ldd lists), the modules, and tests/vm/guest.sh, which runs
# every scenario and reports on the serial console. This script parses the console,
# prints one line per scenario and a one-line summary last, and exits non-zero if
# any scenario failed or the VM did not finish.
#
# Usage: tests/vm/run.sh [all|bench]   (bench: used by bench/vm.sh)
# Env:   RDB_VM_DIR (cache + work dir, default /tmp/rdb-vm), RDB_VM_KPKG (kernel
#        package), RDB_VM_TIMEOUT_S (whole VM run, default 1200), RDB_VM_MEM_MB,
#        RDB_VM_DISK_MB (rdb test disks, default 96), RDB_VM_FIO_MB (default 24).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MODE=${1:-all}
VMDIR=${RDB_VM_DIR:-/tmp/rdb-vm}
TIMEOUT_S=${RDB_VM_TIMEOUT_S:-1200}
MEM_MB=${RDB_VM_MEM_MB:-1536}
export PATH="$HOME/.cargo/bin:$PATH"
t_start=$(date +%s)

[ "$(id -u)" = 0 ] || { echo "tests/vm/run.sh needs root (apt-get, kernel package unpacking)"; exit 1; }
need_pkgs=()
for p in qemu-system-x86 busybox-static fio e2fsprogs cpio; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    echo "vm: installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: apt-get install qemu-system-x86"; exit 1; }
[ -x /bin/busybox ] || { echo "/bin/busybox missing: apt-get install busybox-static"; exit 1; }
mkdir -p "$VMDIR/debs"

# ------------------------------------------------------------------ rdb, static
echo "vm: building static rdbd/rdbadm"
RUSTFLAGS='-C target-feature=+crt-static' nice -n 10 cargo build --release --quiet \
    --target x86_64-unknown-linux-gnu -p rdb -p rdb-tools
SBIN=$ROOT/target/x86_64-unknown-linux-gnu/release
for b in rdbd rdbadm; do
    lddout=$(ldd "$SBIN/$b" 2>&1 || true)
    echo "$lddout" | grep -qE "not a dynamic|statically linked" ||
        { echo "vm: $SBIN/$b is not statically linked"; exit 1; }
done

# ------------------------------------------------------------------ kernel
KPKG=${RDB_VM_KPKG:-}
if [ -z "$KPKG" ]; then
    KPKG=$(ls "$VMDIR"/debs/linux-image-6.12.*+deb12-amd64_*.deb 2>/dev/null | sed 's#.*/##; s/_.*//' | sort -V | tail -1 || true)
fi
if [ -z "$KPKG" ]; then
    KPKG=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | cut -d' ' -f1 | sort -V | tail -1 || true)
    [ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | cut -d' ' -f1 | sort -V | tail -1 || true); }
    [ -n "$KPKG" ] || { echo "vm: no linux-image-6.12.*+deb12-amd64 in apt (bookworm-security/updates missing from sources?)"; exit 1; }
fi
KVER=${KPKG#linux-image-}
KROOT=$VMDIR/kernel-$KVER
if [ ! -f "$KROOT/boot/vmlinuz-$KVER" ]; then
    ls "$VMDIR"/debs/"${KPKG}"_*.deb >/dev/null 2>&1 || (cd "$VMDIR/debs" && apt-get download -qq "$KPKG")
    rm -rf "$KROOT.tmp"; mkdir -p "$KROOT.tmp"
    dpkg-deb -x "$VMDIR"/debs/"${KPKG}"_*.deb "$KROOT.tmp"
    mv "$KROOT.tmp" "$KROOT"
fi
KERNEL=$KROOT/boot/vmlinuz-$KVER
MODDIR=$KROOT/lib/modules/$KVER

# ------------------------------------------------------------------ initramfs
IRD=$VMDIR/initramfs
rm -rf "$IRD"
mkdir -p "$IRD"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,run,etc,lib/modules,lib64}
cp /bin/busybox "$IRD/bin/busybox"
for a in $("$IRD/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$IRD/bin/$a"; done
# modules and their dependencies (read from each module's modinfo `depends=`; the
# unpacked package has no modules.dep), dependencies first, decompressed (busybox
# insmod cannot read .ko.xz)
MODS=""
find_mod() { find "$MODDIR" \( -name "$1.ko.xz" -o -name "$1.ko" -o -name "${1//_/-}.ko.xz" -o -name "${1//-/_}.ko.xz" \) | head -1; }
add_mod() {
    local m=$1 f deps d
    case " $MODS " in *" $m "*) return 0;; esac
    f=$(find_mod "$m")
    if [ -z "$f" ]; then
        grep -qE "/${m//_/[-_]}\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null && return 0
        echo "vm: module $m missing in $MODDIR"; exit 1
    fi
    case $f in *.xz) xz -dc "$f" > "$IRD/lib/modules/$m.ko";; *) cp "$f" "$IRD/lib/modules/$m.ko";; esac
    deps=$(tr '\0' '\n' < "$IRD/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
    for d in $deps; do add_mod "$d"; done
    MODS="$MODS $m"
}
for m in nbd ublk_drv virtio_blk crc32c_generic ext4; do add_mod "$m"; done
echo "vm: modules:$MODS"
strip -o "$IRD/bin/rdbd" "$SBIN/rdbd"
strip -o "$IRD/bin/rdbadm" "$SBIN/rdbadm"
copy_dyn() { # copy_dyn <host binary> <guest path>: binary + shared libraries (ldd)
    cp -L "$1" "$IRD$2"
    for lib in $(ldd "$1" | grep -o '/[^ ]*'); do
        [ -e "$IRD$lib" ] && continue
        mkdir -p "$IRD$(dirname "$lib")"
        cp -L "$lib" "$IRD$lib"
    done
}
copy_dyn "$(command -v fio)" /usr/bin/fio
copy_dyn /usr/sbin/mke2fs /usr/sbin/mkfs.ext4
copy_dyn /usr/sbin/e2fsck /usr/sbin/fsck.ext4
copy_dyn /usr/sbin/blkdiscard /usr/sbin/blkdiscard
cp /etc/ld.so.cache "$IRD/etc/" 2>/dev/null || true
cp /etc/mke2fs.conf "$IRD/etc/" 2>/dev/null || true
cp "$ROOT/tests/vm/guest.sh" "$IRD/guest.sh"
chmod +x "$IRD/guest.sh"
cat > "$IRD/init" <<EOF
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=900m tmp /tmp
for m in $MODS; do insmod /lib/modules/\$m.ko || echo "RDB-VM-RESULT insmod-\$m FAIL"; done
ip link set lo up
echo "RDB-VM-BOOTED kernel=\$(uname -r) uptime=\$(cut -d' ' -f1 /proc/uptime)"
MODE=\$(sed -n 's/.*rdbmode=\([a-z]*\).*/\1/p' /proc/cmdline)
/guest.sh "\${MODE:-all}"
sync
poweroff -f
EOF
chmod +x "$IRD/init"
(cd "$IRD" && find . | cpio -o -H newc --quiet) > "$VMDIR/initramfs.cpio"

# ------------------------------------------------------------------ boot
DRIVES=()
if [ "$MODE" = bench ]; then
    for disk in vda vdb; do
        rm -f "$VMDIR/$disk.img"; truncate -s 192M "$VMDIR/$disk.img"
        DRIVES+=(-drive "file=$VMDIR/$disk.img,if=virtio,format=raw,cache=none,aio=threads")
    done
fi
LOG=$VMDIR/console-$MODE.log
: > "$LOG"
echo "vm: booting $KPKG under TCG (${MEM_MB} MiB, 2 vCPUs), mode $MODE, console $LOG"
t_boot=$(date +%s)
set +e
timeout "$TIMEOUT_S" qemu-system-x86_64 -accel tcg -cpu max -m "$MEM_MB" -smp 2 \
    -display none -monitor none -serial file:"$LOG" -no-reboot \
    -kernel "$KERNEL" -initrd "$VMDIR/initramfs.cpio" \
    -append "console=ttyS0 quiet panic=-1 rdbmode=$MODE" \
    -nic none "${DRIVES[@]}" > "$VMDIR/qemu.err" 2>&1
qrc=$?
set -e
t_end=$(date +%s)
[ -s "$VMDIR/qemu.err" ] && sed 's/^/qemu: /' "$VMDIR/qemu.err"

# ------------------------------------------------------------------ report
tr -d '\r' < "$LOG" > "$LOG.txt"
if [ "$MODE" = bench ]; then
    grep -a '^RDB-VM-BENCH' "$LOG.txt" || true
fi
grep -a -E '^(RDB-VM-RESULT|  [a-z0-9-]+\| )' "$LOG.txt" | sed 's/^RDB-VM-RESULT /vm: /' || true
pass=$(grep -a -c '^RDB-VM-RESULT .* PASS' "$LOG.txt" || true)
fail=$(grep -a -c '^RDB-VM-RESULT .* FAIL' "$LOG.txt" || true)
done_seen=$(grep -a -c '^RDB-VM-DONE' "$LOG.txt" || true)
booted=$(grep -a -m1 '^RDB-VM-BOOTED' "$LOG.txt" | sed 's/.*uptime=//' || true)
why=""
[ "$done_seen" = 0 ] && why=" VM did not finish (qemu rc $qrc, timeout ${TIMEOUT_S}s; see $LOG)"
echo "vm summary: $pass passed, $fail failed, kernel $KVER, TCG boot to init ${booted:-?} s, VM $((t_end - t_boot)) s, total $((t_end - t_start)) s.$why"
[ "$fail" = 0 ] && [ "$done_seen" != 0 ] && { [ "$MODE" = bench ] || [ "$pass" -gt 0 ]; }
