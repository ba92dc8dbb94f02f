//! Meta-data in action: generation UUIDs, activity log, dirty bitmap and resync,
//! with the real rdbd/rdbadm binaries on loopback and real clients (fio, qemu-io,
//! libnbd). Every test checks the data on the backing disks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn down_both_and_compare(c: &Cluster, size: u64) {
    let _ = c.adm("alpha", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    c.assert_same_data(size, "after down");
}

/// Random data in alpha's first `mib` MiB, new meta-data on both nodes, both up and
/// alpha forced Primary: a full sync from alpha starts.
fn start_full_sync(c: &Cluster, mib: u32) {
    run_ok(
        60,
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", c.img("alpha").display()),
            "bs=1M",
            &format!("count={mib}"),
            "conv=notrunc",
            "status=none",
        ],
    );
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "r0", "--force"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
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

#[test]
fn full_sync_shows_progress_on_both_sides_at_the_configured_rate() {
    need_root();
    need("fio", "fio");
    // `syncer { rate 20M; }` is the seed's 8.3 spelling; 20M = 20 MiB/s.
    let c = Cluster::with_sections("fullsync", "C", "160M", "", "syncer { rate 20M; }");
    // Existing data on alpha that the full sync must copy.
    start_full_sync(&c, 96);
    let size = c.data_size();
    let (mut seen_source, mut seen_target) = (false, false);
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let mut proc_line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let (a, b) = (c.status("alpha"), c.status("beta"));
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
        if c.in_sync() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    c.wait_in_sync(5, "full sync");
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
    c.fresh_pair_with_primary();
    let size = c.data_size();
    c.adm_ok("beta", &["disconnect", "r0"]);
    assert!(wait_for(Duration::from_secs(10), || c.status("alpha")
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
    let before = c.status("alpha")["resync_bytes_total"].as_u64().unwrap();
    let oos = c.status("alpha")["out_of_sync_bytes"].as_u64().unwrap();
    assert!(
        oos > 0 && oos <= written,
        "out of sync {oos} for {written} written"
    );
    c.adm_ok("beta", &["connect", "r0"]);
    c.wait_in_sync(120, "smart resync");
    let sent = c.status("alpha")["resync_bytes_total"].as_u64().unwrap() - before;
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
    c.fresh_pair_with_primary();
    let size = c.data_size();
    let log = c.dir.join("acked.log");
    let mut child = spawn_acked_writer(&c.nbd_uri("alpha"), &log, 40000, 5);
    assert!(
        wait_for(Duration::from_secs(60), || acked_count(&log) >= 3000),
        "the writer did not get 3000 writes acknowledged"
    );
    let al_before = c.status("alpha")["counters"]["al_writes"].as_u64().unwrap();
    assert!(al_before > 0, "no activity-log transaction was written");
    let pid = std::fs::read_to_string(c.run_dir("alpha").join("rdbd.pid")).unwrap();
    run_ok(10, "kill", &["-9", pid.trim()]);
    let _ = child.wait();
    assert!(wait_for(Duration::from_secs(20), || c.status("beta")
        ["connection"]
        != "Connected"));
    // Restart the crashed Primary: the activity log is replayed into the bitmap.
    c.adm_ok("alpha", &["up", "r0"]);
    let a = c.status("alpha");
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
    c.wait_in_sync(120, "resync after the Primary crash");
    assert_eq!(c.status("alpha")["crashed_primary"], false);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    // Every acknowledged write is on both disks, which are identical.
    let mut verified = 0;
    for name in ["alpha", "beta"] {
        let disk = std::fs::read(c.img(name)).unwrap();
        verified = check_acked_writes(&log, &disk, name);
    }
    c.assert_same_data(size, "after the crash resync");
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
        wait_for(Duration::from_secs(20), || c.status("alpha")["connection"]
            == "SyncSource"),
        "no full sync started"
    );
    let size = c.data_size();
    // Verify writes while the full sync runs.
    let args = fio_verify_48m_args("load", &c.nbd_uri("alpha"), "--output=/dev/null");
    run_ok(
        300,
        "fio",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        c.status("alpha")["connection"],
        "SyncSource",
        "the full sync ended before the writes did: the test proves nothing"
    );
    c.wait_in_sync(120, "full sync under load");
    down_both_and_compare(&c, size);
}

#[test]
fn split_brain_is_detected_and_resolved_by_discard_my_data() {
    need_root();
    let c = Cluster::with_sections("splitbrain", "C", "128M", "", "");
    let handler_log = c.dir.join("split-brain.log");
    c.add_to_resource(&format!(
        "handlers {{ split-brain \"echo $DRBD_RESOURCE >> {}\"; }}",
        handler_log.display()
    ));
    c.fresh_pair_with_primary();
    let size = c.data_size();
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
        let s = c.status(n);
        s["connection"] == "StandAlone"
            && s["connection_error"]
                .as_str()
                .is_some_and(|e| e.contains("Split-Brain"))
    };
    assert!(
        wait_for(Duration::from_secs(30), || refused("alpha")
            && refused("beta")),
        "split brain not reported on both sides:\n{}\n{}\n{}",
        c.status("alpha"),
        c.status("beta"),
        c.log_tail("alpha")
    );
    for n in ["alpha", "beta"] {
        assert_eq!(
            c.status(n)["resync_bytes_total"],
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
    assert_eq!(read_bytes(&c.img("beta"), MIB, 4), vec![0x22; 4]);
    // Manual recovery, as in the DRBD guide: the victim discards its data.
    c.adm_ok("beta", &["connect", "--discard-my-data", "r0"]);
    c.adm_ok("alpha", &["connect", "r0"]);
    c.wait_in_sync(60, "resync after --discard-my-data");
    down_both_and_compare(&c, size);
    // The survivor's data won everywhere; the victim's write is gone.
    for img in [c.img("alpha"), c.img("beta")] {
        assert_eq!(read_bytes(&img, 0, 4), vec![0x11; 4]);
        assert_eq!(read_bytes(&img, MIB, 4), vec![0; 4]);
        assert_eq!(read_bytes(&img, 2 * MIB, 4), vec![0x33; 4]);
    }
}

#[test]
fn online_verify_finds_a_block_corrupted_on_the_secondary() {
    need_root();
    let c = Cluster::new("verify", "C", "128M", "verify-alg sha1; csums-alg crc32c;");
    c.fresh_pair_with_primary();
    let size = c.data_size();
    qemu_io(&c, "alpha", "write -P 0x5a 0 16M");
    // Write-zeroes with unmap allowed (mkfs does this) replicates like any write:
    // nothing may be left out of sync while connected.
    qemu_io(&c, "alpha", "write -z -u 32M 4M");
    qemu_io(&c, "alpha", "discard 40M 4M");
    assert_eq!(
        c.status("alpha")["out_of_sync_bytes"],
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
            let s = c.status("alpha");
            s["verify"].is_null() && s["connection"] == "Connected"
        }),
        "online verify did not finish: {}",
        c.status("alpha")
    );
    let found = c.status("alpha")["out_of_sync_bytes"].as_u64().unwrap();
    assert!(
        (4096..=MIB).contains(&found),
        "verify marked {found} bytes out of sync"
    );
    assert!(c.log_tail("alpha").contains("online verify done"));
    // DRBD's recipe: disconnect and connect resyncs what verify marked (with
    // csums-alg, chunks whose checksums match are not sent).
    c.adm_ok("alpha", &["disconnect", "r0"]);
    c.adm_ok("alpha", &["connect", "r0"]);
    c.wait_in_sync(60, "resync after verify");
    down_both_and_compare(&c, size);
    assert_eq!(read_bytes(&c.img("beta"), offset, 4), vec![0x5a; 4]);
}

#[test]
fn invalidate_invalidate_remote_and_outdate() {
    need_root();
    let c = Cluster::new("invalidate", "C", "64M", "");
    c.fresh_pair_with_primary();
    let size = c.data_size();
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
    let before = c.status("alpha")["resync_bytes_total"].as_u64().unwrap();
    c.adm_ok("beta", &["invalidate", "r0"]);
    c.wait_in_sync(60, "invalidate");
    let sent = c.status("alpha")["resync_bytes_total"].as_u64().unwrap() - before;
    assert!(
        sent >= size - 4096,
        "invalidate resynced only {sent} of {size} bytes"
    );
    assert_eq!(read_bytes(&c.img("beta"), 3 * MIB, 4), vec![0x77; 4]);
    // `invalidate-remote` on the Primary: everything again, to the peer.
    let before = c.status("alpha")["resync_bytes_total"].as_u64().unwrap();
    c.adm_ok("alpha", &["invalidate-remote", "r0"]);
    assert!(wait_for(Duration::from_secs(60), || c.status("alpha")
        ["resync_bytes_total"]
        .as_u64()
        .unwrap()
        >= before + size - 4096));
    c.wait_in_sync(60, "invalidate-remote");
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
    assert_eq!(c.status("beta")["disk"], "Outdated");
    let out = c.adm("beta", &["primary", "r0"]);
    assert!(
        !out.status.success(),
        "an Outdated node was promoted without --force"
    );
    c.adm_ok("beta", &["connect", "r0"]);
    assert!(
        wait_for(Duration::from_secs(30), || c.status("beta")["disk"]
            == "UpToDate"
            && c.status("beta")["connection"] == "Connected"),
        "beta did not become UpToDate again: {}",
        c.status("beta")
    );
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    c.assert_same_data(size, "after outdate and reconnect");
}

#[test]
fn a_sync_target_can_be_primary_reads_come_from_the_peer() {
    need_root();
    need("qemu-img", "qemu-utils");
    // 5 MiB/s over 64 MiB: the full sync lasts ~13 s, long enough to switch roles
    // and read the whole device on the SyncTarget.
    let c = Cluster::with_sections("stprimary", "C", "64M", "", "disk { resync-rate 5M; }");
    start_full_sync(&c, 48);
    let size = c.data_size();
    assert!(
        wait_for(Duration::from_secs(30), || c.status("beta")["connection"]
            == "SyncTarget"),
        "beta never became SyncTarget: {}",
        c.status("beta")
    );
    let want = sha256_of(&c.img("alpha"), Some(size));
    c.adm_ok("alpha", &["secondary", "r0"]);
    c.adm_ok("beta", &["primary", "r0"]);
    let b = c.status("beta");
    assert_eq!(b["role"], "Primary", "{b}");
    assert_eq!(
        b["connection"], "SyncTarget",
        "promoted after the sync ended: {b}"
    );
    assert_eq!(b["disk"], "Inconsistent", "{b}");
    // The whole device through beta's NBD export, while beta is still SyncTarget.
    let copy = c.dir.join("beta-read.img");
    qemu_img_convert(&c.nbd_uri("beta"), &copy.display().to_string(), false);
    let b = c.status("beta");
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
        c.status("beta")["connection"],
        "SyncTarget",
        "the sync ended before the shared-block writes: the test proves nothing"
    );
    c.wait_in_sync(60, "resync with a Primary SyncTarget");
    let _ = c.adm("beta", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    for n in ["alpha", "beta"] {
        assert_eq!(
            read_bytes(&c.img(n), MIB, 64 * 1024),
            vec![0xab; 64 * 1024],
            "{n}"
        );
        assert_eq!(read_bytes(&c.img(n), 40965, 3000), vec![0xcd; 3000], "{n}");
        for i in 0..8u64 {
            assert_eq!(
                read_bytes(&c.img(n), shared_block + i * 512, 512),
                vec![0x11 + i as u8; 512],
                "{n}: 512-byte write {i} into the shared block was undone"
            );
        }
    }
    c.assert_same_data(size, "after the resync with a Primary SyncTarget");
}
