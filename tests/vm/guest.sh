#!/bin/sh
# Runs inside the test VM (busybox sh). `guest.sh all` runs every scenario, each
# bounded by `timeout`, and prints one line per scenario on the console:
#   RDB-VM-RESULT <name> PASS|FAIL <detail>
# followed by RDB-VM-DONE. `guest.sh bench` runs the benchmark and prints
#   RDB-VM-BENCH <target> <job> <iops> <bw_kib_s>
# `guest.sh <scenario>` runs one scenario (exit status = result).
# Sizes are small on purpose: the VM runs under TCG (no KVM).
set -u
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
SIZE_MB=${RDB_VM_DISK_MB:-96}
FIO_MB=${RDB_VM_FIO_MB:-24}

log() { echo "[guest $(cut -d' ' -f1 /proc/uptime)] $*"; }
die() { log "FAILED: $*"; exit 1; }

# conf <dir> <frontend> <protocol> <nodes...>: writes <dir>/rdb.conf
conf() {
    d=$1; fe=$2; proto=$3; shift 3
    port=7800
    {
        echo "resource r0 {"
        echo "    device $d/dev-r0;"
        echo "    flexible-meta-disk internal;"
        echo "    frontend $fe;"
        # rdb extensions: ublk queues / kernel NBD sockets, and ublk queue depth
        echo "    frontend-queues 2; frontend-queue-depth 32;"
        echo "    net { protocol $proto; }"
        [ -n "${DISK_OPTS:-}" ] && echo "    disk { $DISK_OPTS }"
        for n in "$@"; do
            port=$((port + 1))
            echo "    on $n { disk $d/$n.img; address 127.0.0.1:$port; }"
        done
        echo "}"
    } > "$d/rdb.conf"
}

adm() { # adm <dir> <node> args...
    d=$1; n=$2; shift 2
    mkdir -p "$d/run-$n"
    timeout 120 rdbadm -c "$d/rdb.conf" --node "$n" --run-dir "$d/run-$n" "$@"
}

status_field() { # status_field <dir> <node> <field>
    adm "$1" "$2" status r0 --json | tr ',{}' '\n\n\n' | sed -n "s/^ *\"$3\": *\"\{0,1\}\([^\"]*\)\"\{0,1\} *$/\1/p" | head -1
}

fresh() { # fresh <name> <frontend> <protocol> <nodes...>: new dir with disks and config
    d=/tmp/$1; rm -rf "$d"; mkdir -p "$d"
    fe=$2; proto=$3; shift 3
    for n in "$@"; do truncate -s ${SIZE_MB}M "$d/$n.img"; done
    conf "$d" "$fe" "$proto" "$@"
    echo "$d"
}

show_logs() { # on failure: the daemon logs
    for f in "$1"/run-*/rdbd.log; do
        [ -f "$f" ] && { echo "--- $f (tail)"; tail -n 25 "$f"; }
    done
    dmesg | tail -n 20 | sed 's/^/dmesg: /'
}

fio_verify() { # fio_verify <device> <MiB>
    fio --name=verify --filename="$1" --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bsrange=4k-128k --size="${2}M" --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=0 --numjobs=1 --group_reporting \
        --output=/tmp/fio-verify.out || { cat /tmp/fio-verify.out; return 1; }
    grep -q "err= 0" /tmp/fio-verify.out || { cat /tmp/fio-verify.out; return 1; }
}

wait_until() { # wait_until <seconds> <command...>
    t=$1; shift
    i=0
    while ! "$@" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $((t * 5)) ] && return 1
        sleep 0.2
    done
}

# --- scenario: one node, frontend $1: filesystem survives down/up, fio verify
scenario_fs() {
    fe=$1
    d=$(fresh "fs-$fe" "$fe" C vm) || die "setup"
    adm "$d" vm create-md r0 || die "create-md"
    adm "$d" vm up r0 || die "up"
    adm "$d" vm primary r0 --force || die "primary --force"
    [ "$(status_field "$d" vm frontend)" = "$fe" ] || die "status frontend is not $fe: $(adm "$d" vm status r0)"
    dev=$(readlink "$d/dev-r0") || die "no device symlink"
    case $fe in nbd) case $dev in /dev/nbd*) ;; *) die "device $dev is not /dev/nbdX";; esac;;
                ublk) case $dev in /dev/ublkb*) ;; *) die "device $dev is not /dev/ublkbN";; esac;; esac
    log "$fe device $dev: $(status_field "$d" vm frontend_reason)"
    mkfs.ext4 -q -F "$d/dev-r0" || die "mkfs.ext4"
    mkdir -p /mnt/t
    mount -t ext4 "$d/dev-r0" /mnt/t || die "mount"
    for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k count=$((8 * i)) 2>/dev/null || die "write f$i"; done
    (cd /mnt/t && sha256sum f1 f2 f3 f4) > "$d/sums"
    umount /mnt/t || die "umount"
    adm "$d" vm down r0 || die "down"
    [ -e "$d/dev-r0" ] && die "device link still there after down"
    adm "$d" vm up r0 || die "up again"
    adm "$d" vm primary r0 || die "primary after up"
    mount -t ext4 "$d/dev-r0" /mnt/t || die "mount after down/up"
    (cd /mnt/t && sha256sum -c "$d/sums") || die "files changed after down/up"
    umount /mnt/t || die "umount 2"
    fsck.ext4 -n -f "$d/dev-r0" >/dev/null 2>&1 || die "fsck after down/up"
    fio_verify "$d/dev-r0" "$FIO_MB" || die "fio verify on $dev"
    adm "$d" vm down r0 || die "final down"
    log "ok: mkfs, mount, files intact across down/up, fsck clean, fio verify ${FIO_MB} MiB"
}

in_sync() {
    [ "$(status_field "$1" alpha connection)" = Connected ] &&
    [ "$(status_field "$1" alpha peer_disk)" = UpToDate ] &&
    [ "$(status_field "$1" alpha disk)" = UpToDate ]
}

# --- scenario: two nodes on loopback, protocol C, fio verify, disks identical
scenario_two_nodes() {
    fe=$1
    # smaller disks: the initial full sync dominates this scenario under TCG
    d=$(SIZE_MB=${RDB_VM_PAIR_DISK_MB:-64} fresh "pair-$fe" "$fe" C alpha beta) || die "setup"
    for n in alpha beta; do adm "$d" $n create-md r0 || die "create-md $n"; adm "$d" $n up r0 || die "up $n"; done
    adm "$d" alpha primary r0 --force || die "primary --force"
    wait_until 120 in_sync "$d" || die "initial sync did not finish: $(adm "$d" alpha status r0)"
    log "initial sync done"
    fio_verify "$d/dev-r0" "$FIO_MB" || die "fio verify"
    size=$(status_field "$d" alpha size_bytes)
    wait_until 30 in_sync "$d" || die "not in sync after fio"
    adm "$d" alpha down r0 || die "down alpha"
    adm "$d" beta down r0 || die "down beta"
    a=$(head -c "$size" "$d/alpha.img" | sha256sum | cut -d' ' -f1)
    b=$(head -c "$size" "$d/beta.img" | sha256sum | cut -d' ' -f1)
    [ "$a" = "$b" ] || die "data areas differ: alpha $a beta $b"
    log "ok: protocol C pair ($fe on the Primary), fio verify ${FIO_MB} MiB, data areas identical ($size bytes, sha256 $a)"
}

# --- scenario: ublk, kill -9 of rdbd with the device mounted, restart, recovery
scenario_ublk_kill9() {
    d=$(fresh ublk-kill9 ublk C vm) || die "setup"
    adm "$d" vm create-md r0 || die "create-md"
    adm "$d" vm up r0 || die "up"
    adm "$d" vm primary r0 --force || die "primary --force"
    dev=$(readlink "$d/dev-r0")
    mkfs.ext4 -q -F "$d/dev-r0" || die "mkfs"
    mkdir -p /mnt/k; mount -t ext4 "$dev" /mnt/k || die "mount"
    dd if=/dev/urandom of=/mnt/k/before bs=64k count=32 2>/dev/null; sync
    sum_before=$(sha256sum < /mnt/k/before)
    pid=$(cat "$d/run-vm/rdbd.pid")
    kill -9 "$pid" || die "kill -9"
    wait_until 10 sh -c "! kill -0 $pid" || die "rdbd did not die"
    log "rdbd $pid killed with $dev mounted; writing while it is down"
    # I/O issued while the server is gone is held by the kernel, not failed.
    dd if=/dev/urandom of=/tmp/after.src bs=64k count=32 2>/dev/null
    ( cp /tmp/after.src /mnt/k/after && sync && echo done > /tmp/kill9-writer ) &
    writer=$!
    sleep 2
    [ -e /tmp/kill9-writer ] && die "cp + sync completed while rdbd was dead: the I/O was not held by the device"
    adm "$d" vm up r0 || die "up after kill -9"
    adm "$d" vm primary r0 || die "primary after kill -9"
    [ "$(readlink "$d/dev-r0")" = "$dev" ] || die "a new device was created instead of recovering $dev"
    reason=$(status_field "$d" vm frontend_reason)
    log "after restart: $reason"
    echo "$reason" | grep -q recovered || die "status does not say the device was recovered: $reason"
    wait_until 60 test -e /tmp/kill9-writer || die "I/O held during the crash did not complete after recovery"
    wait "$writer"
    [ "$(sha256sum < /mnt/k/before)" = "$sum_before" ] || die "file written before the crash changed"
    cmp /tmp/after.src /mnt/k/after || die "file written during the crash differs"
    umount /mnt/k || die "umount"
    fsck.ext4 -n -f "$dev" >/dev/null 2>&1 || die "fsck after recovery"
    mount -t ext4 "$dev" /mnt/k && cmp /tmp/after.src /mnt/k/after && umount /mnt/k || die "data after remount"
    adm "$d" vm down r0 || die "down"
    log "ok: same $dev recovered after kill -9; cp+sync issued while rdbd was dead stayed pending, then completed after recovery; files intact, fsck clean"
}

# --- scenario: kernel NBD, kill -9 of rdbd, restart: NBD_CMD_RECONFIGURE
scenario_nbd_kill9() {
    d=$(fresh nbd-kill9 nbd C vm) || die "setup"
    adm "$d" vm create-md r0 || die "create-md"
    adm "$d" vm up r0 || die "up"
    adm "$d" vm primary r0 --force || die "primary --force"
    dev=$(readlink "$d/dev-r0")
    dd if=/dev/urandom of=/tmp/nbd.src bs=64k count=64 2>/dev/null
    dd if=/tmp/nbd.src of="$dev" bs=64k oflag=direct 2>/dev/null || die "write before"
    pid=$(cat "$d/run-vm/rdbd.pid")
    kill -9 "$pid"; wait_until 10 sh -c "! kill -0 $pid" || die "rdbd did not die"
    adm "$d" vm up r0 || die "up after kill -9"
    adm "$d" vm primary r0 || die "primary after kill -9"
    [ "$(readlink "$d/dev-r0")" = "$dev" ] || die "another device than $dev after restart"
    reason=$(status_field "$d" vm frontend_reason)
    log "after restart: $reason"
    echo "$reason" | grep -q reconfigured || die "not reconfigured: $reason"
    head -c 4194304 "$dev" | cmp - /tmp/nbd.src || die "data read back after reconfigure differs"
    adm "$d" vm down r0 || die "down"
    log "ok: $dev reconfigured with new sockets after kill -9, data intact"
}

# --- scenario: DISCARD and WRITE_ZEROES reach the volume (frontend $1)
scenario_trim() {
    fe=$1
    d=$(fresh "trim-$fe" "$fe" C vm) || die "setup"
    adm "$d" vm create-md r0 && adm "$d" vm up r0 && adm "$d" vm primary r0 --force || die "up/primary"
    dev=$(readlink "$d/dev-r0"); q=/sys/block/${dev#/dev/}/queue
    [ "$(cat $q/discard_max_bytes)" -gt 0 ] || die "$dev advertises no discard"
    [ "$(cat $q/write_zeroes_max_bytes)" -gt 0 ] || die "$dev advertises no write zeroes"
    dd if=/dev/urandom of=/tmp/trim.src bs=1M count=8 2>/dev/null
    dd if=/dev/zero of=/tmp/zero.2m bs=1M count=2 2>/dev/null
    dd if=/tmp/trim.src of="$dev" bs=1M oflag=direct 2>/dev/null || die "write pattern"
    sync
    before=$(du -k "$d/vm.img" | cut -f1)
    /usr/sbin/blkdiscard -o 0 -l 4194304 "$dev" || die "blkdiscard"
    /usr/sbin/blkdiscard -z -o 4194304 -l 2097152 "$dev" || die "blkdiscard -z (BLKZEROOUT)"
    after=$(du -k "$d/vm.img" | cut -f1)
    for off in 0 1 2; do
        dd if="$dev" bs=2M skip=$off count=1 iflag=direct 2>/dev/null | cmp - /tmp/zero.2m || die "range $((off * 2))M..$((off * 2 + 2))M not zero"
    done
    dd if="$dev" bs=2M skip=3 count=1 iflag=direct of=/tmp/trim.back 2>/dev/null
    dd if=/tmp/trim.src bs=2M skip=3 count=1 2>/dev/null | cmp - /tmp/trim.back || die "untouched range 6M..8M changed"
    [ $((before - after)) -ge 3072 ] || die "backing file did not shrink by the discarded 4 MiB (du ${before}k -> ${after}k): discard did not reach the volume"
    adm "$d" vm down r0 || die "down"
    log "ok: discard (4 MiB) and write-zeroes (2 MiB) read back as zeroes, untouched data intact, backing file ${before}k -> ${after}k"
}

# --- scenario: kernel NBD through the ioctl fallback (RDB_NBD_IOCTL=1)
scenario_nbd_ioctl() {
    d=$(fresh nbd-ioctl nbd C vm) || die "setup"
    adm "$d" vm create-md r0 || die "create-md"
    RDB_NBD_IOCTL=1 adm "$d" vm up r0 || die "up"
    adm "$d" vm primary r0 --force || die "primary"
    reason=$(status_field "$d" vm frontend_reason)
    echo "$reason" | grep -q "via ioctl" || die "not the ioctl path: $reason"
    dev=$(readlink "$d/dev-r0")
    fio_verify "$d/dev-r0" 8 || die "fio verify"
    adm "$d" vm down r0 || die "down"
    [ -e "/sys/block/${dev#/dev/}/pid" ] && die "$dev still configured after down"
    log "ok: $reason; fio verify 8 MiB; disconnected at down"
}

bench_one() { # bench_one <target> <device>
    for job in randread:4k:16 randwrite:4k:16 read:1M:4 write:1M:4; do
        rw=${job%%:*}; rest=${job#*:}; bs=${rest%%:*}; qd=${rest#*:}
        fio --name=b --filename="$2" --direct=1 --ioengine=libaio --iodepth="$qd" --rw="$rw" \
            --bs="$bs" --size=64M --time_based --runtime="${RDB_VM_BENCH_S:-8}" --ramp_time=1 \
            --output-format=terse --terse-version=3 --output=/tmp/b.terse >/dev/null 2>&1 || { echo "RDB-VM-BENCH $1 $rw-$bs-qd$qd FAIL"; continue; }
        # terse v3: field 7/8 = read bw KiB/s, iops; 48/49 = write bw, iops
        line=$(cat /tmp/b.terse)
        case $rw in *read) bw=$(echo "$line" | cut -d';' -f7); iops=$(echo "$line" | cut -d';' -f8);;
                    *) bw=$(echo "$line" | cut -d';' -f48); iops=$(echo "$line" | cut -d';' -f49);; esac
        echo "RDB-VM-BENCH $1 $rw-$bs-qd$qd $iops $bw"
    done
}

bench() {
    # raw virtio disk (anchor), then rdb (ublk, kernel NBD) on a second identical virtio disk
    [ -b /dev/vda ] && [ -b /dev/vdb ] || die "bench needs /dev/vda and /dev/vdb"
    bench_one raw /dev/vda
    for fe in ublk nbd; do
        d=/tmp/bench-$fe; rm -rf "$d"; mkdir -p "$d"
        ln -s /dev/vdb "$d/vm.img"
        DISK_OPTS="io-engine uring; direct-io yes;" conf "$d" "$fe" C vm
        # the same disk serves both frontends in turn: new meta-data each time
        adm "$d" vm create-md r0 --force || die "create-md"
        adm "$d" vm up r0 && adm "$d" vm primary r0 --force || die "up/primary $fe"
        bench_one "$fe" "$d/dev-r0"
        adm "$d" vm down r0 || die "down $fe"
    done
}

run_scenario() { # run_scenario <name> <timeout_s> <function args...>
    name=$1; t=$2; shift 2
    start=$(cut -d' ' -f1 /proc/uptime)
    if timeout "$t" /guest.sh "$@" > "/tmp/$name.log" 2>&1; then
        echo "RDB-VM-RESULT $name PASS ($(awk "BEGIN{print int($(cut -d' ' -f1 /proc/uptime)-$start)}") s) $(grep 'ok:' "/tmp/$name.log" | tail -1 | sed 's/.*ok: //')"
    else
        echo "RDB-VM-RESULT $name FAIL (exit $?)"
        sed "s/^/  $name| /" "/tmp/$name.log" | tail -n 60
        for dd in /tmp/*/; do
            if [ -d "${dd}run-vm" ] || [ -d "${dd}run-alpha" ]; then show_logs "$dd" | sed "s/^/  $name| /"; fi
        done
    fi
    # whatever a failed scenario left running
    for p in /tmp/*/run-*/rdbd.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null; done
    grep -q " /mnt/t " /proc/mounts && umount /mnt/t; grep -q " /mnt/k " /proc/mounts && umount /mnt/k
    rm -rf /tmp/fs-* /tmp/pair-* /tmp/ublk-kill9 /tmp/nbd-kill9 /tmp/trim-* /tmp/nbd-ioctl 2>/dev/null
    true
}

case ${1:-all} in
    all)
        run_scenario host-checks 30 host_checks
        run_scenario nbd-fs-fio 300 fs nbd
        run_scenario ublk-fs-fio 300 fs ublk
        run_scenario pair-protocol-c-ublk 300 two_nodes ublk
        run_scenario pair-protocol-c-nbd 300 two_nodes nbd
        run_scenario ublk-kill9-recovery 240 ublk_kill9
        run_scenario nbd-kill9-reconfigure 240 nbd_kill9
        run_scenario ublk-discard-zeroes 120 trim ublk
        run_scenario nbd-discard-zeroes 120 trim nbd
        run_scenario nbd-ioctl-fallback 120 nbd_ioctl
        echo RDB-VM-DONE
        ;;
    host_checks)
        [ -e /dev/ublk-control ] || die "no /dev/ublk-control"
        [ -d /sys/module/nbd ] || die "nbd not loaded"
        log "ok: kernel $(uname -r), nbd and ublk_drv loaded, io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo n/a)"
        ;;
    fs) scenario_fs "$2" ;;
    two_nodes) scenario_two_nodes "$2" ;;
    ublk_kill9) scenario_ublk_kill9 ;;
    nbd_kill9) scenario_nbd_kill9 ;;
    trim) scenario_trim "$2" ;;
    nbd_ioctl) scenario_nbd_ioctl ;;
    bench) bench; echo RDB-VM-DONE ;;
    *) die "unknown scenario $1" ;;
esac
