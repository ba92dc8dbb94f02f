//! Engine tests: sync and io_uring, buffered and O_DIRECT, on temp files and on a loop
//! device. Every check compares bytes against a reference model.

// Test code: a failed call is the test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdb::storage::{self, BlockIo, EngineKind, IoError, OpenOptions};

const MIB: u64 = 1 << 20;

fn opts(engine: EngineKind, direct_io: bool) -> OpenOptions {
    OpenOptions {
        engine,
        direct_io,
        ..OpenOptions::default()
    }
}

fn temp_file(dir: &tempfile::TempDir, size_bytes: u64) -> PathBuf {
    let p = dir.path().join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size_bytes).unwrap();
    p
}

fn open_checked(path: &Path, o: &OpenOptions) -> Arc<dyn BlockIo> {
    let (dev, kind) = storage::open_with_info(path, o).unwrap();
    assert_eq!(
        kind, o.engine,
        "engine fell back on a machine that has io_uring"
    );
    dev
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Random writes in concurrent batches of non-overlapping requests, random reads,
/// all compared with an in-memory model.
async fn random_io(dev: &Arc<dyn BlockIo>, direct: bool, seed: u64) {
    let size = dev.size_bytes();
    let mut model = dev.read_at(0, size as usize).await.unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let slot = 64 * 1024u64;
    for _round in 0..20 {
        // 16 writes into distinct 64 KiB slots, issued concurrently.
        let mut slots: Vec<u64> = (0..size / slot).collect();
        let mut futs = Vec::new();
        for _ in 0..16 {
            let i = rng.random_range(0..slots.len());
            let s = slots.swap_remove(i) * slot;
            let (off, len) = if direct {
                let blocks = rng.random_range(1..=16u64);
                (
                    s + rng.random_range(0..=(16 - blocks)) * 4096,
                    blocks * 4096,
                )
            } else {
                let len = rng.random_range(1..=slot);
                (s + rng.random_range(0..=(slot - len)), len)
            };
            let data = random_bytes(&mut rng, len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let fua = rng.random_bool(0.1);
            futs.push(dev.write_at(off, Bytes::from(data), fua));
        }
        for r in join_all(futs).await {
            r.unwrap();
        }
        // Concurrent reads of random ranges (unaligned even with O_DIRECT).
        let mut reads = Vec::new();
        let mut ranges = Vec::new();
        for _ in 0..16 {
            let len = rng.random_range(1..=200_000u64).min(size);
            let off = rng.random_range(0..=size - len);
            ranges.push((off, len));
            reads.push(dev.read_at(off, len as usize));
        }
        for (r, (off, len)) in join_all(reads).await.into_iter().zip(ranges) {
            let got = r.unwrap();
            assert!(
                got == model[off as usize..(off + len) as usize],
                "read mismatch at {off}+{len}"
            );
        }
    }
    dev.flush().await.unwrap();
    assert!(
        dev.read_at(0, size as usize).await.unwrap() == model,
        "final content differs"
    );
}

/// Awaits all futures concurrently (no `futures` crate here).
async fn join_all<F: std::future::Future + Unpin>(futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futs: Vec<Option<F>> = futs.into_iter().map(Some).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(outs.iter_mut()) {
            if let Some(fut) = f {
                match std::pin::Pin::new(fut).poll(cx) {
                    Poll::Ready(v) => {
                        *o = Some(v);
                        *f = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(outs.iter_mut().map(|o| o.take().unwrap()).collect())
        }
    })
    .await
}

async fn suite(engine: EngineKind, direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, 8 * MIB);
    let dev = open_checked(&path, &opts(engine, direct));
    assert_eq!(dev.size_bytes(), 8 * MIB);

    random_io(&dev, direct, 42 + direct as u64).await;

    // FUA write, then flush; the file shows the bytes through another descriptor.
    let data = Bytes::from(vec![0xabu8; 8192]);
    dev.write_at(MIB, data.clone(), true).await.unwrap();
    dev.flush().await.unwrap();
    let mut check = vec![0u8; 8192];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut check, MIB)
        .unwrap();
    assert_eq!(check, &data[..]);

    // Discard on a file punches a hole: reads zeroes.
    dev.write_at(2 * MIB, Bytes::from(vec![7u8; 65536]), false)
        .await
        .unwrap();
    dev.discard(2 * MIB, 65536).await.unwrap();
    assert!(dev
        .read_at(2 * MIB, 65536)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // write_zeroes, with and without unmap, leaves the neighbours alone.
    for may_unmap in [false, true] {
        dev.write_at(3 * MIB, Bytes::from(vec![9u8; 3 * 4096]), false)
            .await
            .unwrap();
        dev.write_zeroes(3 * MIB + 4096, 4096, may_unmap)
            .await
            .unwrap();
        let got = dev.read_at(3 * MIB, 3 * 4096).await.unwrap();
        assert!(got[..4096].iter().all(|&b| b == 9));
        assert!(
            got[4096..8192].iter().all(|&b| b == 0),
            "may_unmap={may_unmap}"
        );
        assert!(got[8192..].iter().all(|&b| b == 9));
    }

    // Out of range: typed error, errno EINVAL, nothing touched.
    let size = dev.size_bytes();
    for e in [
        dev.read_at(size - 10, 20).await.map(|_| ()),
        dev.write_at(size, Bytes::from(vec![1u8; 4096]), false)
            .await,
        dev.discard(size - 4096, 8192).await,
        dev.write_zeroes(u64::MAX - 1, 4096, false).await,
        dev.block_status(size, 1).await.map(|_| ()),
    ] {
        let e = e.unwrap_err();
        assert!(matches!(e, IoError::OutOfRange { .. }), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
    }
    assert_eq!(dev.read_at(size - 4096, 4096).await.unwrap().len(), 4096);

    if direct {
        let e = dev
            .write_at(100, Bytes::from(vec![1u8; 512]), false)
            .await
            .unwrap_err();
        assert!(matches!(e, IoError::Invalid(_)), "{e}");
    }
    drop(dev);

    // block_status finds a hole in a fresh sparse file.
    let dir2 = tempfile::tempdir().unwrap();
    let sparse = temp_file(&dir2, 4 * MIB);
    let dev = open_checked(&sparse, &opts(engine, direct));
    dev.write_at(0, Bytes::from(vec![1u8; 65536]), false)
        .await
        .unwrap();
    let ext = dev.block_status(0, 4 * MIB).await.unwrap();
    assert_eq!(ext.iter().map(|e| e.len_bytes).sum::<u64>(), 4 * MIB);
    assert!(!ext[0].hole && !ext[0].zero, "{ext:?}");
    assert_eq!(ext[0].len_bytes, 65536, "{ext:?}");
    assert!(ext[1].hole && ext[1].zero, "{ext:?}");
    let ext = dev.block_status(MIB, 4096).await.unwrap();
    assert_eq!(ext.len(), 1);
    assert!(ext[0].hole && ext[0].len_bytes == 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_buffered() {
    suite(EngineKind::Sync, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_direct() {
    suite(EngineKind::Sync, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_buffered() {
    suite(EngineKind::Uring, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_direct() {
    suite(EngineKind::Uring, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_range_and_read_only() {
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = temp_file(&dir, 4 * MIB);
            let o = OpenOptions {
                offset_bytes: MIB,
                size_bytes: Some(2 * MIB),
                ..opts(engine, direct)
            };
            let dev = open_checked(&path, &o);
            assert_eq!(dev.size_bytes(), 2 * MIB);
            dev.write_at(0, Bytes::from(vec![5u8; 4096]), false)
                .await
                .unwrap();
            dev.write_at(2 * MIB - 4096, Bytes::from(vec![6u8; 4096]), false)
                .await
                .unwrap();
            dev.flush().await.unwrap();
            let e = dev
                .write_at(2 * MIB, Bytes::from(vec![6u8; 4096]), false)
                .await;
            assert!(matches!(e, Err(IoError::OutOfRange { .. })));
            let f = std::fs::File::open(&path).unwrap();
            let mut buf = vec![0u8; 3 * MIB as usize];
            f.read_exact_at(&mut buf, 0).unwrap();
            assert!(
                buf[..MIB as usize].iter().all(|&b| b == 0),
                "wrote before the area"
            );
            assert!(buf[MIB as usize..MIB as usize + 4096]
                .iter()
                .all(|&b| b == 5));
            assert!(buf[3 * MIB as usize - 4096..].iter().all(|&b| b == 6));
            drop(dev);

            // None = up to the end of the file.
            let o = OpenOptions {
                offset_bytes: MIB,
                size_bytes: None,
                read_only: true,
                ..opts(engine, direct)
            };
            let dev = open_checked(&path, &o);
            assert_eq!(dev.size_bytes(), 3 * MIB);
            assert!(dev.read_at(0, 4096).await.unwrap().iter().all(|&b| b == 5));
            let e = dev
                .write_at(0, Bytes::from(vec![1u8; 4096]), false)
                .await
                .unwrap_err();
            assert_eq!(e.errno(), libc::EPERM);

            // An area that does not fit is refused at open.
            let o = OpenOptions {
                offset_bytes: 3 * MIB,
                size_bytes: Some(2 * MIB),
                ..opts(engine, direct)
            };
            assert!(matches!(storage::open(&path, &o), Err(IoError::Invalid(_))));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_many_in_flight_and_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, 16 * MIB);
    let dev = open_checked(&path, &opts(EngineKind::Uring, false));
    // More requests than ring slots and channel capacity, to exercise back-pressure.
    let n = 2000u64;
    let futs: Vec<_> = (0..n)
        .map(|i| dev.write_at(i * 4096, Bytes::from(vec![(i % 251) as u8; 4096]), false))
        .collect();
    for r in join_all(futs).await {
        r.unwrap();
    }
    let futs: Vec<_> = (0..n).map(|i| dev.read_at(i * 4096, 4096)).collect();
    for (i, r) in join_all(futs).await.into_iter().enumerate() {
        assert!(
            r.unwrap().iter().all(|&b| b == (i % 251) as u8),
            "block {i}"
        );
    }
    // Large request, more than one SQE's worth is not needed; 8 MiB single read.
    let big = dev.read_at(0, 8 * MIB as usize).await.unwrap();
    assert_eq!(big.len(), 8 * MIB as usize);
    drop(dev); // joins the ring thread
}

#[test]
fn engine_kind_display_and_parse() {
    assert_eq!(EngineKind::Sync.to_string(), "sync");
    assert_eq!(EngineKind::Uring.to_string(), "uring");
    assert_eq!("uring".parse::<EngineKind>().unwrap(), EngineKind::Uring);
    assert!("aio".parse::<EngineKind>().is_err());
    assert_eq!(
        serde_json::to_string(&EngineKind::Uring).unwrap(),
        "\"uring\""
    );
}

/// A loop device over a temp file, detached on drop.
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("losetup is required for this test (util-linux): {e}"));
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, 16 * MIB);
    let lo = LoopDev::attach(&path);
    assert_eq!(storage::device_size_bytes(&lo.dev).unwrap(), 16 * MIB);
    assert_eq!(storage::device_size_bytes(&path).unwrap(), 16 * MIB);
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        for direct in [false, true] {
            let o = OpenOptions {
                offset_bytes: MIB,
                size_bytes: Some(8 * MIB),
                ..opts(engine, direct)
            };
            let dev = open_checked(&lo.dev, &o);
            assert_eq!(dev.size_bytes(), 8 * MIB);
            random_io(&dev, direct, 7).await;
            dev.write_at(0, Bytes::from(vec![3u8; 8192]), true)
                .await
                .unwrap();
            dev.write_zeroes(4096, 4096, false).await.unwrap();
            let got = dev.read_at(0, 8192).await.unwrap();
            assert!(got[..4096].iter().all(|&b| b == 3) && got[4096..].iter().all(|&b| b == 0));
            dev.discard(0, 65536).await.unwrap();
            let ext = dev.block_status(0, MIB).await.unwrap();
            assert_eq!(ext.len(), 1);
            assert!(!ext[0].hole && ext[0].len_bytes == MIB);
            let e = dev.read_at(8 * MIB, 1).await.unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL);
            dev.flush().await.unwrap();
        }
    }
}

/// The sync engine's inline write path needs a multi-thread runtime; on a
/// current-thread runtime it must take the blocking pool instead and still work.
#[tokio::test]
async fn sync_on_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_file(&dir, 4 * MIB);
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let dev = open_checked(&path, &opts(engine, false));
        random_io(&dev, false, 11).await;
    }
}
