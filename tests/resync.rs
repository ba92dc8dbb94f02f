//! Meta-data in action: generation UUIDs, activity log, dirty bitmap and resync,
//! with the real rdbd/rdbadm binaries on loopback and real clients (fio, qemu-io,
//! libnbd). Every test checks the data on the backing disks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn status_of(c: &Cluster, node: &str) -> serde_json::Value {
    c.status(node)
}

/// Connected, both UpToDate, no resync.
fn in_sync(c: &Cluster) -> bool {
    let (a, b) = (status_of(c, "alpha"), status_of(c, "beta"));
    a["connection"] == "Connected"
        && b["connection"] == "Connected"
        && a["disk"] == "UpToDate"
        && b["disk"] == "UpToDate"
        && a["out_of_sync_bytes"] == 0
        && b["out_of_sync_bytes"] == 0
}

fn wait_in_sync(c: &Cluster, timeout_s: u64, what: &str) {
    assert!(
        wait_for(Duration::from_secs(timeout_s), || in_sync(c)),
        "{what}: not in sync after {timeout_s} s\nalpha: {}\nbeta: {}\nalpha log:\n{}\nbeta log:\n{}",
        status_of(c, "alpha"),
        status_of(c, "beta"),
        c.log_tail("alpha"),
        c.log_tail("beta")
    );
}

fn connected(c: &Cluster) -> bool {
    status_of(c, "alpha")["connection"] == "Connected"
        && status_of(c, "beta")["connection"] == "Connected"
}

/// Two fresh nodes connected; `new-current-uuid --clear-bitmap` skips the initial
/// sync of the (all-zero) new disks; alpha becomes Primary.
fn fresh_pair_skip_sync(c: &Cluster) {
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "--force", "r0"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    assert!(
        wait_for(Duration::from_secs(30), || connected(c)),
        "never connected:\n{}\n{}",
        c.log_tail("alpha"),
        c.log_tail("beta")
    );
    let out = c.adm_ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    assert!(out.contains("initial sync skipped"), "{out}");
    wait_in_sync(c, 30, "new-current-uuid --clear-bitmap");
    assert_eq!(
        status_of(c, "alpha")["uuids"]["current"],
        status_of(c, "beta")["uuids"]["current"],
        "both nodes share the new generation"
    );
    c.adm_ok("alpha", &["primary", "r0"]);
}

fn data_size(c: &Cluster) -> u64 {
    status_of(c, "alpha")["size_bytes"].as_u64().unwrap()
}

fn down_both_and_compare(c: &Cluster, size: u64) {
    let _ = c.adm("alpha", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    assert_eq!(
        sha256_of(&c.img("alpha"), Some(size)),
        sha256_of(&c.img("beta"), Some(size)),
        "the data areas of the two backing disks differ"
    );
}

/// qemu-io on a node's NBD export.
fn qemu_io(c: &Cluster, node: &str, cmd: &str) {
    qemu_io_all(c, node, &[cmd.to_string()]);
}

/// qemu-io running `cmds` in order in one client (`aio_write`s are in flight together).
fn qemu_io_all(c: &Cluster, node: &str, cmds: &[String]) {
    need("qemu-io", "qemu-utils");
    let uri = c.nbd_uri(node);
    let mut args = vec!["-f", "raw"];
    for cmd in cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    args.push(&uri);
    run_ok(60, "qemu-io", &args);
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn full_sync_shows_progress_on_both_sides_at_the_configured_rate() {
    need_root();
    need("fio", "fio");
    // `syncer { rate 20M; }` is the seed's 8.3 spelling; 20M = 20 MiB/s.
    let c = Cluster::with_sections("fullsync", "C", "160M", "", "syncer { rate 20M; }");
    // Existing data on alpha that the full sync must copy.
    run_ok(
        60,
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", c.img("alpha").display()),
            "bs=1M",
            "count=96",
            "conv=notrunc",
            "status=none",
        ],
    );
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "r0", "--force"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    let size = data_size(&c);
    let (mut seen_source, mut seen_target) = (false, false);
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let mut proc_line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let (a, b) = (status_of(&c, "alpha"), status_of(&c, "beta"));
        if let Some(p) = a["sync"].as_object() {
            let pct = p["done_percent"].as_f64().unwrap();
            if p["source"] == true && pct > 0.0 && pct < 100.0 {
                seen_source = true;
                samples.push((Instant::now(), a["resync_bytes_total"].as_u64().unwrap()));
            }
        }
        if let Some(p) = b["sync"].as_object() {
            let pct = p["done_percent"].as_f64().unwrap();
            if p["source"] == false && pct > 0.0 && pct < 100.0 {
                seen_target = true;
                if proc_line.is_empty() {
                    proc_line = c.adm_ok("beta", &["status", "r0", "--proc"]);
                }
            }
        }
        if in_sync(&c) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_in_sync(&c, 5, "full sync");
    assert!(seen_source, "alpha never showed SyncSource progress");
    assert!(seen_target, "beta never showed SyncTarget progress");
    assert!(
        proc_line.contains("cs:SyncTarget") && proc_line.contains("sync'ed:"),
        "--proc during the sync: {proc_line}"
    );
    // Rate: between the first sample after 1 s and the last one.
    let t0 = samples[0].0 + Duration::from_secs(1);
    let first = samples.iter().find(|(t, _)| *t >= t0).copied().unwrap();
    let last = *samples.last().unwrap();
    let secs = last.0.duration_since(first.0).as_secs_f64();
    assert!(
        secs > 3.0,
        "too few samples to measure the rate ({secs:.1} s)"
    );
    let rate = (last.1 - first.1) as f64 / secs;
    let want = 20.0 * MIB as f64;
    eprintln!(
        "full sync of {size} bytes: measured {:.2} MiB/s for rate 20M ({:.1}% off)",
        rate / MIB as f64,
        100.0 * (rate - want) / want
    );
    assert!(
        (rate - want).abs() <= want * 0.10,
        "resync rate {:.2} MiB/s, configured 20 MiB/s (+-10 %)",
        rate / MIB as f64
    );
    down_both_and_compare(&c, size);
}

#[test]
fn smart_resync_sends_only_what_changed() {
    need_root();
    need("fio", "fio");
    let c = Cluster::with_sections(
        "smart",
        "C",
        "1G",
        "",
        "startup { wfc-timeout 2; degr-wfc-timeout 2; }",
    );
    // wfc-timeout: `up` of a lone node waits that long for its peer.
    c.adm_ok("alpha", &["create-md", "r0"]);
    c.adm_ok("beta", &["create-md", "r0"]);
    let started = Instant::now();
    let out = c.adm("alpha", &["up", "r0"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not connected after 2 s") && started.elapsed() >= Duration::from_secs(2),
        "up with wfc-timeout 2: {stderr}"
    );
    c.adm_ok("alpha", &["down", "r0"]);
    fresh_pair_skip_sync(&c);
    let size = data_size(&c);
    c.adm_ok("beta", &["disconnect", "r0"]);
    assert!(wait_for(Duration::from_secs(10), || status_of(&c, "alpha")
        ["connection"]
        != "Connected"));
    // 1 % of the device in random 4 KiB blocks.
    let blocks = size / 4096 / 100;
    run_ok(
        300,
        "fio",
        &[
            "--name=dirty",
            "--ioengine=nbd",
            &format!("--uri={}", c.nbd_uri("alpha")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            &format!("--number_ios={blocks}"),
            "--randseed=11",
            "--norandommap",
            "--output=/dev/null",
        ],
    );
    let written = blocks * 4096;
    let before = status_of(&c, "alpha")["resync_bytes_total"]
        .as_u64()
        .unwrap();
    let oos = status_of(&c, "alpha")["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        oos > 0 && oos <= written,
        "out of sync {oos} for {written} written"
    );
    c.adm_ok("beta", &["connect", "r0"]);
    wait_in_sync(&c, 120, "smart resync");
    let sent = status_of(&c, "alpha")["resync_bytes_total"]
        .as_u64()
        .unwrap()
        - before;
    eprintln!(
        "smart resync: {sent} bytes sent for {written} bytes written ({:.3}x)",
        sent as f64 / written as f64
    );
    assert!(
        sent <= written * 11 / 10,
        "smart resync sent {sent} bytes for {written} written (want <= 1.1x)"
    );
    assert!(sent >= oos, "resync sent {sent} < out-of-sync {oos}");
    down_both_and_compare(&c, size);
}

#[test]
fn primary_crash_replays_the_activity_log() {
    need_root();
    let c = Cluster::with_sections("alcrash", "C", "256M", "", "frontend none;");
    fresh_pair_skip_sync(&c);
    let size = data_size(&c);
    let log = c.dir.join("acked.log");
    let mut child = spawn_acked_writer(&c.nbd_uri("alpha"), &log, 40000, 5);
    assert!(
        wait_for(Duration::from_secs(60), || acked_count(&log) >= 3000),
        "the writer did not get 3000 writes acknowledged"
    );
    let al_before = status_of(&c, "alpha")["counters"]["al_writes"]
        .as_u64()
        .unwrap();
    assert!(al_before > 0, "no activity-log transaction was written");
    let pid = std::fs::read_to_string(c.run_dir("alpha").join("rdbd.pid")).unwrap();
    run_ok(10, "kill", &["-9", pid.trim()]);
    let _ = child.wait();
    assert!(wait_for(Duration::from_secs(20), || status_of(&c, "beta")
        ["connection"]
        != "Connected"));
    // Restart the crashed Primary: the activity log is replayed into the bitmap.
    c.adm_ok("alpha", &["up", "r0"]);
    let a = status_of(&c, "alpha");
    assert_eq!(a["crashed_primary"], true, "{a}");
    // The resync may already run: the replay itself is in the log.
    let log_text = std::fs::read_to_string(c.run_dir("alpha").join("rdbd.log")).unwrap();
    let replay = log_text
        .lines()
        .find(|l| l.contains("crashed Primary:"))
        .unwrap_or_else(|| panic!("no AL replay in the log:\n{}", c.log_tail("alpha")))
        .to_string();
    let extents: u64 = replay
        .split("crashed Primary: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // 40000 random blocks of the first 160 MiB: every extent of it was hot.
    assert!(extents > 0 && extents <= 41, "{replay}");
    let marked = extents * 4 * MIB;
    wait_in_sync(&c, 120, "resync after the Primary crash");
    assert_eq!(status_of(&c, "alpha")["crashed_primary"], false);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    // Every acknowledged write is on both disks, which are identical.
    let mut verified = 0;
    for name in ["alpha", "beta"] {
        let disk = std::fs::read(c.img(name)).unwrap();
        verified = check_acked_writes(&log, &disk, name);
    }
    assert_eq!(
        sha256_of(&c.img("alpha"), Some(size)),
        sha256_of(&c.img("beta"), Some(size)),
        "data areas differ after the crash resync"
    );
    eprintln!(
        "primary crash: {verified} acknowledged writes verified on both disks; AL replay marked {} MiB",
        marked / MIB
    );
}

#[test]
fn resync_under_load_never_loses_application_writes() {
    need_root();
    need("fio", "fio");
    let c = Cluster::with_sections("underload", "C", "192M", "", "disk { resync-rate 25M; }");
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "r0"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    assert!(
        wait_for(Duration::from_secs(20), || status_of(&c, "alpha")
            ["connection"]
            == "SyncSource"),
        "no full sync started"
    );
    let size = data_size(&c);
    // Verify writes while the full sync runs.
    run_ok(
        300,
        "fio",
        &[
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", c.nbd_uri("alpha")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=48M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output=/dev/null",
        ],
    );
    assert_eq!(
        status_of(&c, "alpha")["connection"],
        "SyncSource",
        "the full sync ended before the writes did: the test proves nothing"
    );
    wait_in_sync(&c, 120, "full sync under load");
    down_both_and_compare(&c, size);
}

#[test]
fn split_brain_is_detected_and_resolved_by_discard_my_data() {
    need_root();
    let c = Cluster::with_sections("splitbrain", "C", "128M", "", "");
    let handler_log = c.dir.join("split-brain.log");
    let conf = std::fs::read_to_string(&c.conf).unwrap().replacen(
        "flexible-meta-disk internal;",
        &format!(
            "flexible-meta-disk internal;\n    handlers {{ split-brain \"echo $DRBD_RESOURCE >> {}\"; }}",
            handler_log.display()
        ),
        1,
    );
    std::fs::write(&c.conf, conf).unwrap();
    fresh_pair_skip_sync(&c);
    let size = data_size(&c);
    qemu_io(&c, "alpha", "write -P 0x11 0 1M");
    // Partition: both sides go StandAlone; each side becomes Primary and writes.
    c.adm_ok("alpha", &["disconnect", "r0"]);
    c.adm_ok("beta", &["disconnect", "r0"]);
    c.adm_ok("beta", &["primary", "r0"]);
    qemu_io(&c, "beta", "write -P 0x22 1M 1M");
    qemu_io(&c, "alpha", "write -P 0x33 2M 1M");
    c.adm_ok("beta", &["secondary", "r0"]);
    c.adm_ok("alpha", &["connect", "r0"]);
    c.adm_ok("beta", &["connect", "r0"]);
    let refused = |n: &str| {
        let s = status_of(&c, n);
        s["connection"] == "StandAlone"
            && s["connection_error"]
                .as_str()
                .is_some_and(|e| e.contains("Split-Brain"))
    };
    assert!(
        wait_for(Duration::from_secs(30), || refused("alpha")
            && refused("beta")),
        "split brain not reported on both sides:\n{}\n{}\n{}",
        status_of(&c, "alpha"),
        status_of(&c, "beta"),
        c.log_tail("alpha")
    );
    for n in ["alpha", "beta"] {
        assert_eq!(
            status_of(&c, n)["resync_bytes_total"],
            0,
            "{n} resynced something"
        );
    }
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(
            &handler_log
        )
        .is_ok_and(|s| s.lines().filter(|l| *l == "r0").count() == 2)),
        "split-brain handler not called with the resource on both nodes"
    );
    assert_eq!(read_at(&c.img("beta"), MIB, 4), vec![0x22; 4]);
    // Manual recovery, as in the DRBD guide: the victim discards its data.
    c.adm_ok("beta", &["connect", "--discard-my-data", "r0"]);
    c.adm_ok("alpha", &["connect", "r0"]);
    wait_in_sync(&c, 60, "resync after --discard-my-data");
    down_both_and_compare(&c, size);
    // The survivor's data won everywhere; the victim's write is gone.
    for img in [c.img("alpha"), c.img("beta")] {
        assert_eq!(read_at(&img, 0, 4), vec![0x11; 4]);
        assert_eq!(read_at(&img, MIB, 4), vec![0; 4]);
        assert_eq!(read_at(&img, 2 * MIB, 4), vec![0x33; 4]);
    }
}

#[test]
fn online_verify_finds_a_block_corrupted_on_the_secondary() {
    need_root();
    let c = Cluster::new("verify", "C", "128M", "verify-alg sha1; csums-alg crc32c;");
    fresh_pair_skip_sync(&c);
    let size = data_size(&c);
    qemu_io(&c, "alpha", "write -P 0x5a 0 16M");
    // Write-zeroes with unmap allowed (mkfs does this) replicates like any write:
    // nothing may be left out of sync while connected.
    qemu_io(&c, "alpha", "write -z -u 32M 4M");
    qemu_io(&c, "alpha", "discard 40M 4M");
    assert_eq!(
        status_of(&c, "alpha")["out_of_sync_bytes"],
        0,
        "writes marked out of sync while Connected:\n{}",
        c.log_tail("alpha")
    );
    // Behind rdb's back: one 4 KiB block on beta's backing disk.
    let offset = 5 * MIB + 4096;
    run_ok(
        10,
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", c.img("beta").display()),
            "bs=4096",
            "count=1",
            &format!("seek={}", offset / 4096),
            "conv=notrunc",
            "status=none",
        ],
    );
    let out = c.adm_ok("alpha", &["verify", "r0"]);
    assert!(out.contains("online verify"), "{out}");
    assert!(
        wait_for(Duration::from_secs(60), || {
            let s = status_of(&c, "alpha");
            s["verify"].is_null() && s["connection"] == "Connected"
        }),
        "online verify did not finish: {}",
        status_of(&c, "alpha")
    );
    let found = status_of(&c, "alpha")["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        (4096..=MIB).contains(&found),
        "verify marked {found} bytes out of sync"
    );
    assert!(c.log_tail("alpha").contains("online verify done"));
    // DRBD's recipe: disconnect and connect resyncs what verify marked (with
    // csums-alg, chunks whose checksums match are not sent).
    c.adm_ok("alpha", &["disconnect", "r0"]);
    c.adm_ok("alpha", &["connect", "r0"]);
    wait_in_sync(&c, 60, "resync after verify");
    down_both_and_compare(&c, size);
    assert_eq!(read_at(&c.img("beta"), offset, 4), vec![0x5a; 4]);
}

#[test]
fn invalidate_invalidate_remote_and_outdate() {
    need_root();
    let c = Cluster::new("invalidate", "C", "64M", "");
    fresh_pair_skip_sync(&c);
    let size = data_size(&c);
    qemu_io(&c, "alpha", "write -P 0x77 0 8M");
    // Damage beta behind rdb's back, then `invalidate` there: a full sync from alpha.
    run_ok(
        10,
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", c.img("beta").display()),
            "bs=1M",
            "count=4",
            "seek=2",
            "conv=notrunc",
            "status=none",
        ],
    );
    let before = status_of(&c, "alpha")["resync_bytes_total"]
        .as_u64()
        .unwrap();
    c.adm_ok("beta", &["invalidate", "r0"]);
    wait_in_sync(&c, 60, "invalidate");
    let sent = status_of(&c, "alpha")["resync_bytes_total"]
        .as_u64()
        .unwrap()
        - before;
    assert!(
        sent >= size - 4096,
        "invalidate resynced only {sent} of {size} bytes"
    );
    assert_eq!(read_at(&c.img("beta"), 3 * MIB, 4), vec![0x77; 4]);
    // `invalidate-remote` on the Primary: everything again, to the peer.
    let before = status_of(&c, "alpha")["resync_bytes_total"]
        .as_u64()
        .unwrap();
    c.adm_ok("alpha", &["invalidate-remote", "r0"]);
    assert!(wait_for(Duration::from_secs(60), || status_of(&c, "alpha")
        ["resync_bytes_total"]
        .as_u64()
        .unwrap()
        >= before + size - 4096));
    wait_in_sync(&c, 60, "invalidate-remote");
    // `outdate`: refused on a Primary and while connected to one; a disconnected
    // Secondary is Outdated, and UpToDate again after reconnecting (same data).
    let out = c.adm("alpha", &["outdate", "r0"]);
    assert!(!out.status.success(), "outdate of a Primary succeeded");
    let out = c.adm("beta", &["outdate", "r0"]);
    assert!(
        !out.status.success(),
        "outdate while connected to a Primary succeeded"
    );
    c.adm_ok("alpha", &["secondary", "r0"]);
    c.adm_ok("beta", &["disconnect", "r0"]);
    c.adm_ok("beta", &["outdate", "r0"]);
    assert_eq!(status_of(&c, "beta")["disk"], "Outdated");
    let out = c.adm("beta", &["primary", "r0"]);
    assert!(
        !out.status.success(),
        "an Outdated node was promoted without --force"
    );
    c.adm_ok("beta", &["connect", "r0"]);
    assert!(
        wait_for(Duration::from_secs(30), || status_of(&c, "beta")["disk"]
            == "UpToDate"
            && status_of(&c, "beta")["connection"] == "Connected"),
        "beta did not become UpToDate again: {}",
        status_of(&c, "beta")
    );
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    assert_eq!(
        sha256_of(&c.img("alpha"), Some(size)),
        sha256_of(&c.img("beta"), Some(size))
    );
}

#[test]
fn a_sync_target_can_be_primary_reads_come_from_the_peer() {
    need_root();
    need("qemu-img", "qemu-utils");
    // 5 MiB/s over 64 MiB: the full sync lasts ~13 s, long enough to switch roles
    // and read the whole device on the SyncTarget.
    let c = Cluster::with_sections("stprimary", "C", "64M", "", "disk { resync-rate 5M; }");
    run_ok(
        60,
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", c.img("alpha").display()),
            "bs=1M",
            "count=48",
            "conv=notrunc",
            "status=none",
        ],
    );
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "r0", "--force"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    let size = data_size(&c);
    assert!(
        wait_for(Duration::from_secs(30), || status_of(&c, "beta")
            ["connection"]
            == "SyncTarget"),
        "beta never became SyncTarget: {}",
        status_of(&c, "beta")
    );
    let want = sha256_of(&c.img("alpha"), Some(size));
    c.adm_ok("alpha", &["secondary", "r0"]);
    c.adm_ok("beta", &["primary", "r0"]);
    let b = status_of(&c, "beta");
    assert_eq!(b["role"], "Primary", "{b}");
    assert_eq!(
        b["connection"], "SyncTarget",
        "promoted after the sync ended: {b}"
    );
    assert_eq!(b["disk"], "Inconsistent", "{b}");
    // The whole device through beta's NBD export, while beta is still SyncTarget.
    let copy = c.dir.join("beta-read.img");
    run_ok(
        120,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &c.nbd_uri("beta"),
            &copy.display().to_string(),
        ],
    );
    let b = status_of(&c, "beta");
    assert_eq!(
        b["connection"], "SyncTarget",
        "the sync ended before the read did: the test proves nothing: {b}"
    );
    assert_eq!(
        sha256_of(&copy, Some(size)),
        want,
        "beta (SyncTarget, Primary) did not read what alpha has"
    );
    // Writes on the Primary SyncTarget: whole blocks and a partial one (the rest of
    // that block comes from the peer).
    qemu_io(&c, "beta", "write -P 0xab 1M 64k");
    qemu_io(&c, "beta", "write -P 0xcd 40965 3000");
    // Eight 512-byte writes in flight together into one block not resynced yet
    // (the resync runs from the start at 5 MiB/s): each is widened with the peer's
    // copy of the block, and none may undo another.
    let shared_block = 60 * MIB;
    let mut cmds: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "aio_write -P 0x{:x} {} 512",
                0x11 + i,
                shared_block + i * 512
            )
        })
        .collect();
    cmds.push("aio_flush".to_string());
    qemu_io_all(&c, "beta", &cmds);
    assert_eq!(
        status_of(&c, "beta")["connection"],
        "SyncTarget",
        "the sync ended before the shared-block writes: the test proves nothing"
    );
    wait_in_sync(&c, 60, "resync with a Primary SyncTarget");
    let _ = c.adm("beta", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    for n in ["alpha", "beta"] {
        assert_eq!(
            read_at(&c.img(n), MIB, 64 * 1024),
            vec![0xab; 64 * 1024],
            "{n}"
        );
        assert_eq!(read_at(&c.img(n), 40965, 3000), vec![0xcd; 3000], "{n}");
        for i in 0..8u64 {
            assert_eq!(
                read_at(&c.img(n), shared_block + i * 512, 512),
                vec![0x11 + i as u8; 512],
                "{n}: 512-byte write {i} into the shared block was undone"
            );
        }
    }
    assert_eq!(
        sha256_of(&c.img("alpha"), Some(size)),
        sha256_of(&c.img("beta"), Some(size)),
        "the data areas of the two backing disks differ"
    );
}
