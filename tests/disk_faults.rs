//! Disk faults on the Primary's backing disk and `disk { on-io-error }`: real
//! `rdbd` pairs under protocol C; the Primary's data area fails through the
//! test-only `RDB_FAULT_SPEC` (see `src/daemon/io_error.rs`), real clients (fio with
//! verify, python3-libnbd) on the Primary's NBD socket.
//!
//! - `detach`: the disk dies in the middle of a fio verify run; the node goes
//!   Diskless, the run goes on through the peer and its verify passes; after
//!   `down`/`up` without the fault the node full-resyncs and the disks are identical.
//! - `pass_on`: the client gets EIO for the failing range, the block is marked out of
//!   sync, the daemon keeps serving the rest.
//! - `call-local-io-error`: the `local-io-error` handler runs with the resource in its
//!   environment and the node goes Diskless (DRBD 8.4 detaches too).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `rdbadm` for a node with `RDB_FAULT_SPEC` in its environment (the rdbd it starts
/// inherits it).
fn adm_with_faults(c: &Cluster, node: &str, spec: &str, args: &[&str]) -> String {
    let run_dir = c.run_dir(node);
    std::fs::create_dir_all(&run_dir).unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg(bin("rdbadm"))
        .args(["-c", &c.conf.display().to_string(), "--node", node])
        .args(["--run-dir", &run_dir.display().to_string()])
        .args(args)
        .env("RDB_FAULT_SPEC", spec)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rdbadm {args:?} on {node} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(node)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh pair (initial sync skipped), alpha Primary with `spec` on its data area.
fn pair_with_faulty_primary(c: &Cluster, spec: &str) {
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "--force", "r0"]);
    }
    adm_with_faults(c, "alpha", spec, &["up", "r0"]);
    c.adm_ok("beta", &["up", "r0"]);
    c.skip_initial_sync();
    c.adm_ok("alpha", &["primary", "r0"]);
}

fn log_of(c: &Cluster, node: &str) -> String {
    std::fs::read_to_string(c.run_dir(node).join("rdbd.log")).unwrap_or_default()
}

#[test]
fn on_io_error_detach_keeps_a_fio_verify_run_going_through_the_peer() {
    // The disk dies after 3000 data-area requests: in the middle of the writes
    // (48 MiB of 4 KiB random writes are 12288 requests).
    detach_during_fio("after=3000:rwf", "Write at");
}

#[test]
fn on_io_error_detach_retries_a_failed_read_on_the_peer() {
    // The disk dies after 15000 requests: in fio's verify pass (12288 writes, then
    // reads): the failed read is served by the peer.
    detach_during_fio("after=15000:rwf", "Read at");
}

fn detach_during_fio(spec: &str, failing: &str) {
    need_root();
    need("fio", "fio");
    let c = Cluster::with_sections(
        "detach",
        "C",
        "96M",
        "",
        "frontend none;\n    disk { on-io-error detach; }",
    );
    pair_with_faulty_primary(&c, spec);
    let size = c.data_size();
    let t0 = Instant::now();
    let args = fio_verify_48m_args("detach", &c.nbd_uri("alpha"), "--output-format=terse");
    let fio = run(
        300,
        "fio",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        fio.status.success(),
        "fio verify failed after the disk error:\n{}\n{}\nalpha log:\n{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr),
        c.log_tail("alpha")
    );
    let elapsed = t0.elapsed();
    let a = c.status("alpha");
    assert_eq!(a["disk"], "Diskless", "{a}");
    assert_eq!(a["role"], "Primary", "{a}");
    assert_eq!(a["connection"], "Connected", "{a}");
    let b = c.status("beta");
    assert_eq!(b["disk"], "UpToDate", "{b}");
    assert_eq!(b["peer_disk"], "Diskless", "{b}");
    let log = log_of(&c, "alpha");
    let detach = log
        .lines()
        .find(|l| l.contains("Detaching..."))
        .unwrap_or_else(|| panic!("no detach in the log:\n{}", c.log_tail("alpha")));
    eprintln!("detach: {detach}");
    assert!(
        detach.contains(failing),
        "the disk did not fail where expected ({failing}): {detach}"
    );
    // Every request after the fault went to the peer. A write after the run still
    // works and reads back (through the peer).
    let script = r#"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\xa5" * 65536, 80 << 20)
h.flush()
assert h.pread(65536, 80 << 20) == b"\xa5" * 65536
print("ok")
"#;
    let out = run_ok(60, "/usr/bin/python3", &["-c", script, &c.nbd_uri("alpha")]);
    assert_eq!(out.trim(), "ok");
    eprintln!(
        "detach ({spec}): fio randwrite 48 MiB + verify passed in {:.1} s; alpha Diskless, beta UpToDate",
        elapsed.as_secs_f64()
    );
    // Back without the fault: the detached disk is Inconsistent, full resync from
    // the peer, and both data areas are identical.
    c.adm_ok("alpha", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);
    let a = c.status("alpha");
    assert!(
        matches!(a["disk"].as_str(), Some("Inconsistent")),
        "a detached disk came back as {a}"
    );
    c.wait_or_dump(120, "no resync after the re-attach", || c.in_sync());
    c.adm_ok("alpha", &["down", "r0"]);
    c.adm_ok("beta", &["down", "r0"]);
    c.assert_same_data(size, "after the re-attach resync");
}

/// Writes and reads a few blocks through libnbd; prints one result per line.
const PROBE: &str = r#"
import sys, nbd, errno
h = nbd.NBD(); h.connect_uri(sys.argv[1])
def w(off, byte):
    try:
        h.pwrite(bytes([byte]) * 4096, off); return "ok"
    except nbd.Error as e:
        return "errno=%s" % e.errno
def r(off):
    try:
        return "data=%02x" % h.pread(4096, off)[0]
    except nbd.Error as e:
        return "errno=%s" % e.errno
bad = int(sys.argv[2])
print("write_good", w(0, 0x11))
print("write_bad", w(bad, 0x22))
print("read_bad", r(bad))
print("write_after", w(8 << 20, 0x33))
print("read_after", r(8 << 20))
print("read_good", r(0))
"#;

fn probe(c: &Cluster, bad_offset: u64) -> std::collections::HashMap<String, String> {
    let out = run_ok(
        60,
        "/usr/bin/python3",
        &["-c", PROBE, &c.nbd_uri("alpha"), &bad_offset.to_string()],
    );
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn on_io_error_pass_on_reports_eio_and_keeps_serving() {
    need_root();
    let c = Cluster::with_sections(
        "passon",
        "C",
        "64M",
        "",
        "frontend none;\n    disk { on-io-error pass_on; }",
    );
    let bad = 4u64 << 20;
    pair_with_faulty_primary(&c, &format!("range={bad}-{}:rw", bad + 4096));
    let r = probe(&c, bad);
    eprintln!("pass_on: {r:?}");
    assert_eq!(r["write_good"], "ok");
    assert_eq!(r["write_bad"], "errno=EIO");
    assert_eq!(r["read_bad"], "errno=EIO");
    assert_eq!(r["write_after"], "ok");
    assert_eq!(r["read_after"], "data=33");
    assert_eq!(r["read_good"], "data=11");
    let a = c.status("alpha");
    assert_eq!(a["disk"], "UpToDate", "pass_on keeps the disk: {a}");
    assert!(
        a["out_of_sync_bytes"].as_u64().unwrap() >= 4096,
        "the failed write is not marked out of sync: {a}"
    );
}

#[test]
fn on_io_error_call_local_io_error_runs_the_handler_and_detaches() {
    need_root();
    let c = Cluster::with_sections("localioerr", "C", "64M", "", "");
    let handler_log = c.dir.join("local-io-error.log");
    c.add_to_resource(&format!(
        "frontend none;\n    disk {{ on-io-error call-local-io-error; }}\n    handlers {{ local-io-error \"echo $DRBD_RESOURCE $RDB_RESOURCE >> {}\"; }}",
        handler_log.display()
    ));
    let bad = 4u64 << 20;
    pair_with_faulty_primary(&c, &format!("range={bad}-{}:rw", bad + 4096));
    let r = probe(&c, bad);
    eprintln!("call-local-io-error: {r:?}");
    // Detached on the first error: that write and everything after went to the peer.
    assert_eq!(r["write_good"], "ok");
    assert_eq!(r["write_bad"], "ok");
    assert_eq!(r["read_bad"], "data=22");
    assert_eq!(r["read_after"], "data=33");
    assert_eq!(r["read_good"], "data=11");
    assert_eq!(c.status("alpha")["disk"], "Diskless");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(
            &handler_log
        )
        .is_ok_and(|s| s.lines().any(|l| l == "r0 r0"))),
        "local-io-error handler not run with the resource:\n{}",
        c.log_tail("alpha")
    );
    // Diskless without its peer: no data anywhere, I/O fails, the daemon serves on.
    let pid = std::fs::read_to_string(c.run_dir("beta").join("rdbd.pid")).unwrap();
    run_ok(10, "kill", &["-9", pid.trim()]);
    c.wait_or_dump(20, "alpha never lost beta", || {
        c.status("alpha")["connection"] != "Connected"
    });
    let r = probe(&c, bad);
    eprintln!("call-local-io-error, peer gone: {r:?}");
    for k in ["write_good", "write_bad", "read_bad", "read_good"] {
        assert_eq!(r[k], "errno=EIO", "{k} without disk and peer: {r:?}");
    }
    assert_eq!(c.status("alpha")["disk"], "Diskless");
}
