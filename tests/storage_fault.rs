//! Fault injector tests: seeded rate, ranges, fail-after, power cuts over MemDisk and
//! over a real file engine.

// Test code: a failed call is the test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use rdb::storage::fault::{FaultInjector, Ops};
use rdb::storage::mem::MemDisk;
use rdb::storage::{self, BlockIo, EngineKind, OpenOptions};

const BLOCK: usize = 4096;

fn block(v: u8) -> Bytes {
    Bytes::from(vec![v; BLOCK])
}

async fn fill(dev: &dyn BlockIo, blocks: usize, v: u8) {
    for i in 0..blocks {
        dev.write_at((i * BLOCK) as u64, block(v), false)
            .await
            .unwrap();
    }
}

/// Runs 1000 reads with a 10% seeded rate; returns which ones failed.
async fn rate_pattern(seed: u64) -> Vec<bool> {
    let fi = FaultInjector::new(Arc::new(MemDisk::new(64 * BLOCK)), seed);
    let h = fi.handle();
    h.set_rate(0.1, Ops::READ);
    let mut pattern = Vec::new();
    for i in 0..1000u64 {
        pattern.push(fi.read_at((i % 64) * BLOCK as u64, BLOCK).await.is_err());
    }
    // Writes and flushes are not affected by a read-only rate.
    fi.write_at(0, block(1), false).await.unwrap();
    fi.flush().await.unwrap();
    let c = h.counters();
    assert_eq!(
        c.read_errors as usize,
        pattern.iter().filter(|&&f| f).count()
    );
    assert_eq!((c.write_errors, c.flush_errors), (0, 0));
    pattern
}

#[tokio::test]
async fn rate_is_seeded_and_plausible() {
    let a = rate_pattern(1).await;
    let b = rate_pattern(1).await;
    let c = rate_pattern(2).await;
    assert_eq!(a, b, "same seed, same faults");
    assert_ne!(a, c, "different seed, different faults");
    let n = a.iter().filter(|&&f| f).count();
    assert!(
        (50..=150).contains(&n),
        "{n} faults for a 10% rate over 1000 reads"
    );
}

#[tokio::test]
async fn ranges_and_fail_after() {
    let mem = Arc::new(MemDisk::new(64 * BLOCK));
    let fi = FaultInjector::new(mem.clone(), 0);
    let h = fi.handle();
    fill(&fi, 64, 1).await;
    h.fail_range(10 * BLOCK as u64, 12 * BLOCK as u64, Ops::WRITE);
    // Overlapping writes fail with EIO and leave the disk untouched.
    let e = fi
        .write_at(9 * BLOCK as u64 + 100, block(2), false)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), libc::EIO);
    assert!(mem.snapshot()[9 * BLOCK..13 * BLOCK]
        .iter()
        .all(|&b| b == 1));
    assert!(fi.discard(11 * BLOCK as u64, 1).await.is_err());
    // Adjacent, non-overlapping requests pass; reads are not affected.
    fi.write_at(12 * BLOCK as u64, block(2), false)
        .await
        .unwrap();
    fi.write_at(9 * BLOCK as u64, block(2), false)
        .await
        .unwrap();
    assert_eq!(
        fi.read_at(10 * BLOCK as u64, BLOCK).await.unwrap(),
        &block(1)[..]
    );
    assert_eq!(h.counters().write_errors, 2);
    h.clear_ranges();
    fi.write_at(10 * BLOCK as u64, block(3), false)
        .await
        .unwrap();

    h.fail_after(3, Ops::ALL);
    for _ in 0..3 {
        fi.read_at(0, 10).await.unwrap();
    }
    assert!(fi.read_at(0, 10).await.is_err());
    assert!(fi.flush().await.is_err());
    assert!(fi.write_at(0, block(4), false).await.is_err());
    let c = h.counters();
    assert_eq!((c.read_errors, c.flush_errors, c.write_errors), (1, 1, 3));
    h.clear_faults();
    fi.flush().await.unwrap();
}

#[tokio::test]
async fn power_cut_reverts_unflushed_writes() {
    let mem = Arc::new(MemDisk::new(64 * BLOCK));
    let fi = FaultInjector::new(mem.clone(), 9);
    let h = fi.handle();
    fill(&fi, 64, 1).await;
    fi.flush().await.unwrap();
    assert_eq!(h.unflushed_writes(), 0);
    let flushed = mem.snapshot();

    // Unflushed: overlapping writes, a zeroing, a discard, and one FUA write.
    fi.write_at(0, block(2), false).await.unwrap();
    fi.write_at(BLOCK as u64 / 2, block(3), false)
        .await
        .unwrap();
    fi.write_zeroes(5 * BLOCK as u64, BLOCK as u64, false)
        .await
        .unwrap();
    fi.discard(6 * BLOCK as u64, BLOCK as u64).await.unwrap();
    fi.write_at(20 * BLOCK as u64, block(7), true)
        .await
        .unwrap();
    assert_eq!(h.unflushed_writes(), 5);

    let r = h.power_cut().await.unwrap();
    assert_eq!((r.reverted, r.survived), (4, 1));
    let mut expect = flushed.clone();
    expect[20 * BLOCK..21 * BLOCK].fill(7);
    assert!(mem.snapshot() == expect, "only the FUA write survives");
    let c = h.counters();
    assert_eq!(
        (c.power_cuts, c.reverted_writes, c.survived_writes),
        (1, 4, 1)
    );

    // Flushed writes survive a cut.
    fi.write_at(30 * BLOCK as u64, block(8), false)
        .await
        .unwrap();
    fi.flush().await.unwrap();
    fi.write_at(31 * BLOCK as u64, block(9), false)
        .await
        .unwrap();
    h.power_cut().await.unwrap();
    let snap = mem.snapshot();
    assert!(snap[30 * BLOCK..31 * BLOCK].iter().all(|&b| b == 8));
    assert!(snap[31 * BLOCK..32 * BLOCK].iter().all(|&b| b == 1));

    // A failed flush does not make writes stable.
    fi.write_at(32 * BLOCK as u64, block(9), false)
        .await
        .unwrap();
    h.fail_after(0, Ops::FLUSH);
    assert!(fi.flush().await.is_err());
    h.clear_faults();
    h.power_cut().await.unwrap();
    assert!(mem.snapshot()[32 * BLOCK..33 * BLOCK]
        .iter()
        .all(|&b| b == 1));
}

#[tokio::test]
async fn power_cut_seeded_survivors() {
    // Each write hits its own block, so every block is either old or new.
    let run = |seed: u64| async move {
        let mem = Arc::new(MemDisk::new(64 * BLOCK));
        let fi = FaultInjector::new(mem.clone(), seed);
        let h = fi.handle();
        h.set_power_cut_survive_ratio(0.5);
        for i in 0..64 {
            fi.write_at((i * BLOCK) as u64, block(i as u8 + 1), false)
                .await
                .unwrap();
        }
        let r = h.power_cut().await.unwrap();
        assert_eq!(r.reverted + r.survived, 64);
        let snap = mem.snapshot();
        let mut kept = Vec::new();
        for i in 0..64 {
            let b = &snap[i * BLOCK..(i + 1) * BLOCK];
            let new = b.iter().all(|&x| x == i as u8 + 1);
            assert!(new || b.iter().all(|&x| x == 0), "block {i} is torn");
            kept.push(new);
        }
        assert_eq!(kept.iter().filter(|&&k| k).count(), r.survived);
        kept
    };
    let a = run(5).await;
    assert_eq!(a, run(5).await);
    let n = a.iter().filter(|&&k| k).count();
    assert!((16..=48).contains(&n), "{n} of 64 survived at ratio 0.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_over_file_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let o = OpenOptions {
            engine,
            ..OpenOptions::default()
        };
        let dev = storage::open(&path, &o).unwrap();
        let fi = FaultInjector::new(dev, 3);
        let h = fi.handle();
        fi.write_at(0, block(1), false).await.unwrap();
        fi.flush().await.unwrap();
        fi.write_at(0, block(2), false).await.unwrap();
        fi.write_at(BLOCK as u64, block(2), false).await.unwrap();
        assert_eq!(h.power_cut().await.unwrap().reverted, 2);
        let got = fi.read_at(0, 2 * BLOCK).await.unwrap();
        assert!(got[..BLOCK].iter().all(|&b| b == 1));
        assert!(got[BLOCK..].iter().all(|&b| b == 0));
    }
}
