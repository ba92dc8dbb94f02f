//! Performance comparison (not a correctness test, `#[ignore]`d): fio ioengine=nbd
//! against rdb's NBD server over a file-backed `BlockIo` (pread/pwrite on the blocking
//! pool) and against `nbdkit file`, on the same 1 GiB file, interleaved.
//!
//! Run: `cargo test --release --test nbd_perf -- --ignored --nocapture`
//! (`NBD_PERF_ROUNDS`, default 3, and `NBD_PERF_SECONDS`, default 5, tune it;
//! `NBD_PERF_INLINE=1` does the file I/O on the worker instead of the blocking pool).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

mod nbd_common;

use std::time::Duration;

use nbd_common::{run, run_ok, FileDev, MapResolver, TestServer};

struct Workload {
    name: &'static str,
    args: &'static [&'static str],
    /// Report bandwidth (MiB/s) instead of IOPS.
    bandwidth: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4k randwrite QD32",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        bandwidth: false,
    },
    Workload {
        name: "4k randwrite QD1",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=1"],
        bandwidth: false,
    },
    Workload {
        name: "1M write QD8",
        args: &["--rw=write", "--bs=1M", "--iodepth=8"],
        bandwidth: true,
    },
    Workload {
        name: "4k randread QD32",
        args: &["--rw=randread", "--bs=4k", "--iodepth=32"],
        bandwidth: false,
    },
];

async fn fio(uri: &str, w: &Workload, seconds: u64) -> f64 {
    let uri = format!("--uri={uri}");
    let runtime = format!("--runtime={seconds}");
    let mut args = vec![
        "--name=perf",
        "--ioengine=nbd",
        &uri,
        "--size=1G",
        "--time_based",
        &runtime,
        "--output-format=json",
    ];
    args.extend_from_slice(w.args);
    let out = run_ok("fio", &args, Duration::from_secs(seconds + 60)).await;
    let start = out.find('{').expect("no JSON in fio output");
    let v: serde_json::Value = serde_json::from_str(&out[start..]).unwrap();
    let job = &v["jobs"][0];
    let side = if w.args[0].contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    if w.bandwidth {
        side["bw"].as_f64().unwrap() / 1024.0
    } else {
        side["iops"].as_f64().unwrap()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "performance comparison; run explicitly with --release --ignored --nocapture"]
async fn compare_with_nbdkit() {
    let rounds: usize = std::env::var("NBD_PERF_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seconds: u64 = std::env::var("NBD_PERF_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("perf.img");
    run_ok(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", path.display()),
            "bs=1M",
            "count=1024",
            "status=none",
        ],
        Duration::from_secs(120),
    )
    .await;

    let server =
        TestServer::start(MapResolver::default().with_export("", "", FileDev::open(&path), false));
    let ours = server.uri("");
    let kit_sock = dir.path().join("nbdkit.sock");
    let kit_pid = dir.path().join("nbdkit.pid");
    run_ok(
        "nbdkit",
        &[
            "-U",
            kit_sock.to_str().unwrap(),
            "-P",
            kit_pid.to_str().unwrap(),
            "file",
            &format!("file={}", path.display()),
        ],
        Duration::from_secs(10),
    )
    .await;
    let kit = format!("nbd+unix:///?socket={}", kit_sock.display());

    let mut results = vec![(Vec::new(), Vec::new()); WORKLOADS.len()];
    for round in 0..rounds {
        for (i, w) in WORKLOADS.iter().enumerate() {
            // Alternate which server goes first.
            let (a, b) = if round % 2 == 0 {
                (&ours, &kit)
            } else {
                (&kit, &ours)
            };
            let ra = fio(a, w, seconds).await;
            let rb = fio(b, w, seconds).await;
            let (r_ours, r_kit) = if round % 2 == 0 { (ra, rb) } else { (rb, ra) };
            println!(
                "round {round} {:<18} rdb {r_ours:>10.0}  nbdkit {r_kit:>10.0}",
                w.name
            );
            results[i].0.push(r_ours);
            results[i].1.push(r_kit);
        }
    }
    println!("\nmedians over {rounds} interleaved rounds of {seconds} s:");
    for (w, (ours, kit)) in WORKLOADS.iter().zip(results.iter_mut()) {
        let (m_ours, m_kit) = (median(ours), median(kit));
        let unit = if w.bandwidth { "MiB/s" } else { "IOPS" };
        println!(
            "{:<18} rdb {m_ours:>10.0} {unit:<5}  nbdkit {m_kit:>10.0} {unit:<5}  ratio {:.2}",
            w.name,
            m_ours / m_kit
        );
    }

    let pid = std::fs::read_to_string(&kit_pid).unwrap();
    run("kill", &[pid.trim()], Duration::from_secs(5)).await;
    server.stop().await;
}
