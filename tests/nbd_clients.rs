//! rdb's NBD server against real clients: nbdinfo, nbdcopy, nbdsh (python libnbd),
//! qemu-img, qemu-io and fio, each run as a child process with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

mod common;
mod nbd_common;

use std::sync::Arc;
use std::time::Duration;

use common::qemu_img_convert_args;
use nbd_common::{
    random_file, run, run_env, run_ok, run_python, sparse_file, FileDev, MapResolver, TestServer,
};

const DEADLINE: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

/// A sparse `dev.img` of `size_bytes` in `dir`, served as the export `name`.
fn serve_sparse(
    dir: &std::path::Path,
    name: &str,
    size_bytes: usize,
    read_only: bool,
) -> (std::path::PathBuf, TestServer) {
    let path = dir.join("dev.img");
    sparse_file(&path, size_bytes as u64);
    let server = TestServer::start(MapResolver::default().with_export(
        name,
        "",
        FileDev::open(&path),
        read_only,
    ));
    (path, server)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_size_flags_list_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    sparse_file(&path, 16 * MIB as u64);
    // 1 MiB of data at 4 MiB, the rest is a hole.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xaa; MIB], 4 * MIB as u64)
        })
        .unwrap();
    let ro_path = dir.path().join("ro.img");
    sparse_file(&ro_path, MIB as u64);
    let server = TestServer::start(
        MapResolver::default()
            .with_export("disk0", "first test disk", FileDev::open(&path), false)
            .with_export(
                "ro0",
                "read-only disk",
                FileDev::open_with(&ro_path, false),
                true,
            ),
    );

    let info = json(&run_ok("nbdinfo", &["--json", &server.uri("disk0")], DEADLINE).await);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["structured"], true);
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB as u64);
    assert_eq!(e["export-name"], "disk0");
    assert_eq!(e["description"], "first test disk");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_cache",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["contexts"][0], "base:allocation");
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB as u64);

    let info = json(&run_ok("nbdinfo", &["--json", &server.uri("ro0")], DEADLINE).await);
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], false);

    let list = run_ok("nbdinfo", &["--list", &server.uri("")], DEADLINE).await;
    assert!(
        list.contains("export=\"disk0\"") && list.contains("export=\"ro0\""),
        "{list}"
    );
    assert!(list.contains("first test disk"), "{list}");

    let map = run_ok("nbdinfo", &["--map", &server.uri("disk0")], DEADLINE).await;
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = [
        ["0", "4194304", "3"],
        ["4194304", "1048576", "0"],
        ["5242880", "11534336", "3"],
    ];
    assert_eq!(rows.len(), 3, "{map}");
    for (row, want) in rows.iter().zip(expect) {
        assert_eq!(&row[..3], &want[..], "{map}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_to_and_from() {
    let dir = tempfile::tempdir().unwrap();
    let (dev_path, server) = serve_sparse(dir.path(), "vol", 64 * MIB, false);
    let src = dir.path().join("src.raw");
    let data = random_file(&src, 64 * MIB);
    let uri = server.uri("vol");

    run_ok(
        "qemu-img",
        &qemu_img_convert_args(src.to_str().unwrap(), &uri, true),
        DEADLINE,
    )
    .await;
    assert!(
        std::fs::read(&dev_path).unwrap() == data,
        "device differs from the source after qemu-img convert"
    );

    let back = dir.path().join("back.raw");
    run_ok(
        "qemu-img",
        &qemu_img_convert_args(&uri, back.to_str().unwrap(), false),
        DEADLINE,
    )
    .await;
    assert!(
        std::fs::read(&back).unwrap() == data,
        "image read back through NBD differs"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_pattern_write_read() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = serve_sparse(dir.path(), "", 8 * MIB, false);
    let uri = server.uri("");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 65536",
            "-c",
            "write -P 0xcd -f 1048576 4096", // FUA
            "-c",
            "write -z 8192 4096", // write zeroes
            "-c",
            "discard 2097152 65536", // trim
            "-c",
            "flush",
            "-c",
            "read -P 0xab 12288 57344",
            "-c",
            "read -P 0 8192 4096",
            "-c",
            "read -P 0xcd 1048576 4096",
            &uri,
        ],
        DEADLINE,
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[4096..8192].iter().all(|&b| b == 0xab));
    assert!(disk[8192..12288].iter().all(|&b| b == 0));
    assert!(disk[12288..69632].iter().all(|&b| b == 0xab));
    assert!(disk[MIB..MIB + 4096].iter().all(|&b| b == 0xcd));
    assert!(disk[69632..MIB].iter().all(|&b| b == 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_verify_qd32_two_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = serve_sparse(dir.path(), "", 32 * MIB, false);
    let uri = format!("--uri={}", server.uri(""));
    let out = run_ok(
        "fio",
        &[
            "--name=randwrite",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=8M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
        ],
        DEADLINE,
    )
    .await;
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:"), "{out}");
    server.stop().await;
}

const ERRORS_SCRIPT: &str = r#"
import errno, sys, nbd
uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)  # let out-of-range requests reach the server
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert size == 1048576, size
try:
    h.pread(512, size - 100)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"x" * 512, size - 100)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
try:
    h.zero(4096, size)
    raise SystemExit("zero past the end succeeded")
except nbd.Error as e:
    assert e.errnum in (errno.EINVAL, errno.ENOSPC), e
# Still serving after the errors.
h.pwrite(b"\x5a" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"\x5a" * 4096
h.cache(4096, 0)
h.flush()
h.trim(4096, 8192)
assert h.pread(4096, 8192) == b"\0" * 4096
# REQ_ONE block status: exactly one extent.
seen = []
h.block_status(size, 0, lambda ctx, off, entries, err: seen.append(entries) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and len(seen[0]) == 2, seen
h.shutdown()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_errors_then_still_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = serve_sparse(dir.path(), "d", MIB, false);
    let out = run_python(ERRORS_SCRIPT, &[&server.uri("d")], DEADLINE).await;
    assert_eq!(out.trim(), "ok");
    server.stop().await;
}

const READ_ONLY_SCRIPT: &str = r#"
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # let the write reach the server
h.connect_uri(sys.argv[1])
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
assert h.pread(512, 0) == b"\0" * 512
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_rejects_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, server) = serve_sparse(dir.path(), "ro", MIB, true);
    let out = run_python(READ_ONLY_SCRIPT, &[&server.uri("ro")], DEADLINE).await;
    assert_eq!(out.trim(), "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_refused_exports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    sparse_file(&path, MIB as u64);
    let server = TestServer::start(
        MapResolver::default()
            .with_export("d", "", FileDev::open(&path), false)
            .with_refused("r0", "resource r0 is Secondary"),
    );
    let out = run("nbdinfo", &[&server.uri("nope")], DEADLINE).await;
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No such file or directory for export: nope"),
        "{err}"
    );

    // libnbd prints the server's error message only in its debug output.
    let out = run_env(
        "nbdinfo",
        &[&server.uri("r0")],
        &[("LIBNBD_DEBUG", "1")],
        DEADLINE,
    )
    .await;
    assert!(
        !out.status.success(),
        "nbdinfo on a refused export succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server error message: resource r0 is Secondary"),
        "{err}"
    );

    // The server keeps serving the good export.
    run_ok("nbdinfo", &[&server.uri("d")], DEADLINE).await;
    server.stop().await;
}

const EXPORT_NAME_SCRIPT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.set_handshake_flags(0)  # plain newstyle: only NBD_OPT_EXPORT_NAME
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert h.get_protocol() == "newstyle", h.get_protocol()
assert h.get_size() == 1048576
h.pwrite(b"\x42" * 65536, 4096)
assert h.pread(65536, 4096) == b"\x42" * 65536
h.flush()
h.shutdown()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let (path, server) = serve_sparse(dir.path(), "old", MIB, false);
    let out = run_python(EXPORT_NAME_SCRIPT, &[&server.uri("old")], DEADLINE).await;
    assert_eq!(out.trim(), "ok");
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[4096..4096 + 65536].iter().all(|&b| b == 0x42));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_multi_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (dev_path, server) = serve_sparse(dir.path(), "m", 32 * MIB, false);
    let src = dir.path().join("src.raw");
    let data = random_file(&src, 32 * MIB);
    let uri = server.uri("m");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            "--flush",
            src.to_str().unwrap(),
            &uri,
        ],
        DEADLINE,
    )
    .await;
    assert!(
        std::fs::read(&dev_path).unwrap() == data,
        "device differs after nbdcopy"
    );
    let back = dir.path().join("back.raw");
    run_ok(
        "nbdcopy",
        &["--connections=4", &uri, back.to_str().unwrap()],
        DEADLINE,
    )
    .await;
    assert!(
        std::fs::read(&back).unwrap() == data,
        "copy back through NBD differs"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    let data = random_file(&path, 4 * MIB);
    let resolver = MapResolver::default().with_export("t", "", FileDev::open(&path), false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Arc::new(rdb::frontend::nbd::NbdServer::new(
        Arc::new(resolver),
        rdb::frontend::nbd::NbdLimits::default(),
    ));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let s = Arc::clone(&server);
    let task = tokio::spawn(async move { s.serve_tcp(listener, rx).await });

    let uri = format!("nbd://127.0.0.1:{port}/t");
    let info = json(&run_ok("nbdinfo", &["--json", &uri], DEADLINE).await);
    assert_eq!(info["exports"][0]["export-size"], 4 * MIB as u64);
    let back = dir.path().join("back.raw");
    run_ok(
        "qemu-img",
        &qemu_img_convert_args(&uri, back.to_str().unwrap(), false),
        DEADLINE,
    )
    .await;
    assert!(
        std::fs::read(&back).unwrap() == data,
        "image read over TCP differs"
    );

    tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server did not stop")
        .unwrap()
        .unwrap();
    assert_eq!(server.connection_count(), 0);
}
