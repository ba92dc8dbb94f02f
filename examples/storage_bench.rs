//! Storage engine benchmark: 1 MiB sequential writes (QD4), 4 KiB random writes at
//! QD32 and QD1, 4 KiB random reads at QD32, on a temp file, for each engine.
//!
//! Usage: `cargo run --release --example storage_bench -- [SIZE_MIB] [SECS] [DIR] [direct]`
//! (defaults: 1024 MiB, 3 s per test, /var/tmp, buffered).

// A benchmark tool: a failed I/O aborts the run with its message.
#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdb::storage::{self, BlockIo, EngineKind, OpenOptions};

#[derive(Clone, Copy)]
enum Pattern {
    SeqWrite,
    RandWrite,
    RandRead,
}

async fn run(
    dev: &Arc<dyn BlockIo>,
    pattern: Pattern,
    block_bytes: usize,
    qd: usize,
    secs: f64,
) -> (f64, f64) {
    let blocks = dev.size_bytes() / block_bytes as u64;
    let next_seq = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let dev = dev.clone();
        let next_seq = next_seq.clone();
        let ops = ops.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(t as u64);
            let data = Bytes::from(vec![(t as u8) | 1; block_bytes]);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let blk = match pattern {
                    Pattern::SeqWrite => next_seq.fetch_add(1, Ordering::Relaxed) % blocks,
                    _ => rng.random_range(0..blocks),
                };
                let off = blk * block_bytes as u64;
                match pattern {
                    Pattern::RandRead => {
                        let v = dev.read_at(off, block_bytes).await.expect("read");
                        assert_eq!(v.len(), block_bytes);
                    }
                    _ => dev.write_at(off, data.clone(), false).await.expect("write"),
                }
                n += 1;
            }
            ops.fetch_add(n, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = ops.load(Ordering::Relaxed) as f64;
    let iops = n / elapsed;
    (iops, iops * block_bytes as f64 / 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let dir = args.get(3).cloned().unwrap_or_else(|| "/var/tmp".into());
    let direct_io = args.get(4).is_some_and(|s| s == "direct");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        for engine in [EngineKind::Sync, EngineKind::Uring] {
            let tmp = tempfile::Builder::new()
                .prefix("rdb-bench")
                .tempfile_in(&dir)
                .expect("temp file");
            tmp.as_file().set_len(size_mib << 20).expect("set_len");
            let o = OpenOptions {
                engine,
                direct_io,
                ..OpenOptions::default()
            };
            let (dev, kind) = storage::open_with_info(tmp.path(), &o).expect("open");
            println!("engine={kind} direct_io={direct_io} size={size_mib}MiB secs={secs}");
            // Fill the whole file first so reads hit allocated data.
            let fill_secs = 600.0;
            let mut filled = 0u64;
            let t0 = Instant::now();
            let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
            while filled < dev.size_bytes() && t0.elapsed().as_secs_f64() < fill_secs {
                dev.write_at(filled, chunk.clone(), false)
                    .await
                    .expect("fill");
                filled += 1 << 20;
            }
            dev.flush().await.expect("flush");
            let tests: [(&str, Pattern, usize, usize); 4] = [
                ("seqwrite 1M  QD4 ", Pattern::SeqWrite, 1 << 20, 4),
                ("randwrite 4k QD32", Pattern::RandWrite, 4096, 32),
                ("randwrite 4k QD1 ", Pattern::RandWrite, 4096, 1),
                ("randread 4k  QD32", Pattern::RandRead, 4096, 32),
            ];
            for (name, pattern, bs, qd) in tests {
                let (iops, mbs) = run(&dev, pattern, bs, qd, secs).await;
                println!("  {name}: {iops:>10.0} IOPS {mbs:>8.1} MB/s");
            }
            dev.flush().await.expect("flush");
        }
    });
}
