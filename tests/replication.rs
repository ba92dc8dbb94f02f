//! Replication: two nodes on loopback keep their backing disks identical while the
//! Primary serves writes, under protocols A, B and C. Real binaries, real fio, a
//! user-space proxy between the nodes for stalls and cuts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::proxy::{Dir, Proxy};
use common::*;

fn connected_to_secondary(c: &Cluster) -> bool {
    let s = c.status("alpha");
    matches!(s["connection"].as_str(), Some("Connected" | "SyncSource"))
        && s["peer_role"] == "Secondary"
}

/// Connected and the initial full sync done.
fn in_sync(c: &Cluster) -> bool {
    let s = c.status("alpha");
    s["connection"] == "Connected" && s["peer_disk"] == "UpToDate" && s["disk"] == "UpToDate"
}

fn pair_up(c: &Cluster) {
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "r0"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    assert!(
        wait_for(Duration::from_secs(30), || connected_to_secondary(c)),
        "alpha never connected to a Secondary beta: {}\nalpha log:\n{}\nbeta log:\n{}",
        c.status("alpha"),
        c.log_tail("alpha"),
        c.log_tail("beta")
    );
}

fn fio_verify(c: &Cluster, size: &str) {
    run_ok(
        600,
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={}", c.nbd_uri("alpha")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            &format!("--size={size}"),
            "--offset_increment=96M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
            "--output=/dev/null",
        ],
    );
}

fn data_areas_identical(c: &Cluster, size: u64) {
    let a = sha256_of(&c.img("alpha"), Some(size));
    let b = sha256_of(&c.img("beta"), Some(size));
    assert_eq!(a, b, "backing disks differ in the data area");
}

#[test]
fn protocols_a_b_c_replicate_identically() {
    need_root();
    need("fio", "fio");
    for proto in ["C", "A", "B"] {
        let c = Cluster::new(
            &format!("rep{proto}"),
            proto,
            "256M",
            "cram-hmac-alg sha256; shared-secret \"s3cret\";",
        );
        pair_up(&c);
        assert_eq!(c.status("alpha")["protocol"], proto);
        fio_verify(&c, "48M");
        run_ok(
            120,
            "fio",
            &[
                "--name=s",
                "--ioengine=nbd",
                &format!("--uri={}", c.nbd_uri("alpha")),
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                "--size=32M",
                "--offset=200M",
                "--output=/dev/null",
            ],
        );
        // WRITE_ZEROES (unmap allowed and not), TRIM and FLUSH replicate too.
        let script = r#"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b'z' * 1048576, 220 << 20)
h.zero(65536, 220 << 20)
h.zero(65536, (220 << 20) + 131072, nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, (220 << 20) + 262144)
h.flush()
print("ok")
"#;
        run_ok(60, "/usr/bin/python3", &["-c", script, &c.nbd_uri("alpha")]);
        // The initial full sync ran under the fio load: wait for it to finish.
        assert!(
            wait_for(Duration::from_secs(60), || in_sync(&c)),
            "{proto}: initial sync never finished: {}",
            c.status("alpha")
        );
        assert!(c.status("alpha")["resync_bytes_total"].as_u64().unwrap() > 0);
        let size = c.status("alpha")["size_bytes"].as_u64().unwrap();
        let beta = c.status("beta");
        assert_eq!(beta["role"], "Secondary");
        assert_eq!(beta["peer_role"], "Primary");
        // drbdadm's one-line queries, local state first (`state`: 8.3's `role`).
        let line = |node: &str, cmd: &str| c.adm_ok(node, &[cmd, "r0"]).trim().to_string();
        assert_eq!(line("alpha", "role"), "Primary/Secondary");
        assert_eq!(line("beta", "state"), "Secondary/Primary");
        assert_eq!(line("beta", "cstate"), "Connected");
        assert_eq!(line("alpha", "dstate"), "UpToDate/UpToDate");
        assert!(beta["counters"]["net_received_bytes"].as_u64().unwrap() >= 48 << 20);
        c.adm_ok("alpha", &["secondary", "r0"]);
        c.adm_ok("alpha", &["down", "r0"]);
        c.adm_ok("beta", &["down", "r0"]);
        data_areas_identical(&c, size);
    }
}

/// Writes one 4 KiB block through nbdsh in a child process; returns the child.
fn spawn_write(c: &Cluster, offset: u64) -> std::process::Child {
    std::process::Command::new("timeout")
        .args([
            "60",
            "/usr/bin/python3",
            "-c",
            "import sys, nbd; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b'w' * 4096, int(sys.argv[2])); print('done')",
            &c.nbd_uri("alpha"),
            &offset.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nbdsh writer")
}

fn finished_within(child: &mut std::process::Child, timeout: Duration) -> bool {
    wait_for(timeout, || matches!(child.try_wait(), Ok(Some(_))))
}

/// A cluster whose two nodes reach each other only through proxies.
fn proxied(tag: &str, proto: &str) -> (Cluster, Proxy, Proxy, std::path::PathBuf) {
    proxied_with(tag, proto, "")
}

/// [`proxied`] with more `net { }` options.
fn proxied_with(
    tag: &str,
    proto: &str,
    extra_net: &str,
) -> (Cluster, Proxy, Proxy, std::path::PathBuf) {
    let c = Cluster::new(
        tag,
        proto,
        "64M",
        &format!("ping-int 10; ping-timeout 50; timeout 100; connect-int 1; {extra_net}"),
    );
    let conf = std::fs::read_to_string(&c.conf).unwrap();
    let (a, b) = (address_of(&conf, "alpha"), address_of(&conf, "beta"));
    // to_beta: alpha dials it to reach beta; to_alpha: beta dials it to reach alpha.
    let to_beta = Proxy::start("127.0.0.1:0", b);
    let to_alpha = Proxy::start("127.0.0.1:0", a);
    let alpha_conf = conf.replace(
        &format!("address {b};"),
        &format!("address {};", to_beta.addr),
    );
    let beta_conf = conf.replace(
        &format!("address {a};"),
        &format!("address {};", to_alpha.addr),
    );
    std::fs::write(&c.conf, alpha_conf).unwrap();
    let beta_path = c.dir.join("rdb-beta.conf");
    std::fs::write(&beta_path, beta_conf).unwrap();
    (c, to_beta, to_alpha, beta_path)
}

/// Brings up a [`proxied`] pair, alpha Primary, and waits for the initial full sync.
fn pair_up_proxied(c: &Cluster, beta_conf: &Path) {
    c.adm_ok("alpha", &["create-md", "r0"]);
    adm_conf(c, beta_conf, "beta", &["create-md", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);
    adm_conf(c, beta_conf, "beta", &["up", "r0"]);
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    assert!(
        wait_for(Duration::from_secs(30), || in_sync(c)),
        "initial sync never finished: {}\nalpha log:\n{}",
        c.status("alpha"),
        c.log_tail("alpha")
    );
}

fn adm_conf(c: &Cluster, conf: &std::path::Path, node: &str, args: &[&str]) -> String {
    let run_dir = c.run_dir(node);
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut full = vec![
        "-c",
        conf.to_str().unwrap(),
        "--node",
        node,
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    full.extend_from_slice(args);
    run_ok(120, &bin("rdbadm").display().to_string(), &full)
}

#[test]
fn completion_rules_under_stalled_acks() {
    need_root();
    for proto in ["C", "A", "B"] {
        let (c, to_beta, to_alpha, beta_conf) = proxied(&format!("stall{proto}"), proto);
        pair_up_proxied(&c, &beta_conf);
        // Stall everything beta sends to alpha (acks), whichever way the link was dialled.
        to_beta.stall(Dir::FromTarget, true);
        to_alpha.stall(Dir::ToTarget, true);
        let mut child = spawn_write(&c, 8192);
        let done_while_stalled = finished_within(&mut child, Duration::from_secs(3));
        if done_while_stalled && proto != "A" {
            let out = child.wait_with_output().unwrap();
            panic!(
                "protocol {proto} write completed without the peer's ack: {} {}\nalpha log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                c.log_tail("alpha")
            );
        }
        match proto {
            "A" => assert!(
                done_while_stalled,
                "protocol A write did not complete while acks were stalled"
            ),
            _ => assert!(
                !done_while_stalled,
                "protocol {proto} write completed without the peer's ack"
            ),
        }
        to_beta.heal();
        to_alpha.heal();
        assert!(
            finished_within(&mut child, Duration::from_secs(20)),
            "{proto}: write never completed after heal"
        );
        assert!(child.wait().unwrap().success());
        // The write reached beta (for B: it completed only once beta received it).
        let beta = adm_conf(&c, &beta_conf, "beta", &["status", "r0", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&beta).unwrap();
        assert!(
            v["resources"][0]["counters"]["net_received_bytes"]
                .as_u64()
                .unwrap()
                >= 4096
        );
        c.adm_ok("alpha", &["secondary", "r0"]);
        c.adm_ok("alpha", &["down", "r0"]);
        adm_conf(&c, &beta_conf, "beta", &["down", "r0"]);
        let (a, b) = (
            std::fs::read(c.img("alpha")).unwrap(),
            std::fs::read(c.img("beta")).unwrap(),
        );
        assert_eq!(
            &a[8192..12288],
            &b[8192..12288],
            "{proto}: the stalled write did not reach beta"
        );
    }
}

#[test]
fn primary_keeps_serving_when_the_secondary_is_killed() {
    need_root();
    need("fio", "fio");
    let c = Cluster::new(
        "killsec",
        "C",
        "128M",
        "ping-int 1; ping-timeout 5; timeout 10;",
    );
    pair_up(&c);
    let beta_pid = std::fs::read_to_string(c.run_dir("beta").join("rdbd.pid")).unwrap();
    // Writes of known blocks while beta dies.
    let t0 = Instant::now();
    run_ok(10, "kill", &["-9", beta_pid.trim()]);
    let script = r#"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(0, 256):
    h.pwrite(bytes([i % 256]) * 4096, (i * 7 % 4096) * 4096 * 4)
print("ok")
"#;
    run_ok(60, "/usr/bin/python3", &["-c", script, &c.nbd_uri("alpha")]);
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_secs(30),
        "primary paused {elapsed:?}"
    );
    let s = c.status("alpha");
    assert_ne!(s["connection"], "Connected");
    // 256 distinct 4 KiB blocks were written: the bitmap covers all of them.
    let oos = s["out_of_sync_bytes"].as_u64().unwrap();
    assert!(
        oos >= 256 * 4096,
        "bitmap covers {oos} bytes, want >= {}",
        256 * 4096
    );
}

#[test]
fn wrong_shared_secret_never_connects() {
    need_root();
    let c = Cluster::new(
        "secret",
        "C",
        "64M",
        "cram-hmac-alg sha256; shared-secret \"right\";",
    );
    let beta_conf = c.dir.join("rdb-beta.conf");
    std::fs::write(
        &beta_conf,
        std::fs::read_to_string(&c.conf)
            .unwrap()
            .replace("\"right\"", "\"wrong\""),
    )
    .unwrap();
    c.adm_ok("alpha", &["create-md", "r0"]);
    adm_conf(&c, &beta_conf, "beta", &["create-md", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);
    adm_conf(&c, &beta_conf, "beta", &["up", "r0"]);
    std::thread::sleep(Duration::from_secs(4));
    let s = c.status("alpha");
    assert!(
        matches!(s["connection"].as_str(), Some("Connecting" | "StandAlone")),
        "a peer with the wrong secret connected: {s}"
    );
    let log = std::fs::read_to_string(c.run_dir("alpha").join("rdbd.log")).unwrap();
    assert!(
        log.to_lowercase().contains("authentication"),
        "no clear log line: {log}"
    );
    adm_conf(&c, &beta_conf, "beta", &["down", "r0"]);
}

#[test]
fn acknowledged_protocol_c_writes_survive_a_primary_kill() {
    need_root();
    let c = Cluster::new("killpri", "C", "128M", "");
    pair_up(&c);
    assert!(
        wait_for(Duration::from_secs(60), || in_sync(&c)),
        "initial sync never finished"
    );
    let log = c.dir.join("acked.log");
    let mut child = spawn_acked_writer(&c.nbd_uri("alpha"), &log, 24000, 7);
    assert!(
        wait_for(Duration::from_secs(60), || acked_count(&log) >= 2000),
        "the writer did not get 2000 writes acknowledged"
    );
    let pid = std::fs::read_to_string(c.run_dir("alpha").join("rdbd.pid")).unwrap();
    run_ok(10, "kill", &["-9", pid.trim()]);
    let _ = child.wait();
    // Independent check: read beta's backing disk directly.
    let disk = std::fs::read(c.img("beta")).unwrap();
    let checked = check_acked_writes(&log, &disk, "beta");
    assert!(
        checked >= 2000,
        "only {checked} acknowledged writes checked"
    );
    eprintln!("{checked} acknowledged protocol C writes found on the Secondary after kill -9 of the Primary");
}

/// A protocol A pair behind proxies with `extra_net`, in sync, then the link from
/// alpha to beta stalled while fio writes 48 MiB of 4 KiB blocks with verify on alpha
/// (far more than the send queue and socket buffers hold: under `on-congestion block`
/// fio would wait for the peer). Asserts fio finished, and passed, with the link
/// still stalled.
fn fio_over_a_stalled_link(tag: &str, extra_net: &str) -> (Cluster, Proxy, Proxy, PathBuf) {
    need_root();
    need("fio", "fio");
    let (c, to_beta, to_alpha, beta_conf) = proxied_with(tag, "A", extra_net);
    pair_up_proxied(&c, &beta_conf);
    // Stall what alpha sends to beta, whichever way the link was dialled.
    to_beta.stall(Dir::ToTarget, true);
    to_alpha.stall(Dir::FromTarget, true);
    let uri = c.nbd_uri("alpha");
    let fio = std::thread::spawn(move || {
        let args = fio_verify_48m_args("stalled", &uri, "--output=/dev/null");
        run(
            60,
            "fio",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    });
    let t0 = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || fio.is_finished()),
        "fio did not finish while the link was stalled (writes blocked): {}\nalpha log:\n{}",
        c.status("alpha"),
        c.log_tail("alpha")
    );
    let out = fio.join().unwrap();
    assert!(
        out.status.success(),
        "fio verify failed with the link stalled: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = c.status("alpha");
    assert!(
        s["out_of_sync_bytes"].as_u64().unwrap() > 0,
        "nothing marked: {s}"
    );
    eprintln!(
        "{tag}: fio finished in {:?} with the link stalled; alpha {}, {} bytes out of sync",
        t0.elapsed(),
        s["connection"],
        s["out_of_sync_bytes"]
    );
    (c, to_beta, to_alpha, beta_conf)
}

/// Heals the stall of [`fio_over_a_stalled_link`], waits until alpha is Connected
/// with nothing out of sync, runs `check`, takes both nodes down and compares the
/// data areas.
fn heal_and_converge(
    c: &Cluster,
    to_beta: &Proxy,
    to_alpha: &Proxy,
    beta_conf: &Path,
    check: impl FnOnce(&Cluster),
) {
    to_beta.stall(Dir::ToTarget, false);
    to_alpha.stall(Dir::FromTarget, false);
    assert!(
        wait_for(Duration::from_secs(60), || {
            let s = c.status("alpha");
            s["connection"] == "Connected"
                && s["peer_disk"] == "UpToDate"
                && s["out_of_sync_bytes"] == 0
        }),
        "alpha did not resync after the heal: {}\nalpha log:\n{}\nbeta log:\n{}",
        c.status("alpha"),
        c.log_tail("alpha"),
        c.log_tail("beta")
    );
    check(c);
    let size = c.status("alpha")["size_bytes"].as_u64().unwrap();
    c.adm_ok("alpha", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
    adm_conf(c, beta_conf, "beta", &["down", "r0"]);
    data_areas_identical(c, size);
}

fn log_of(c: &Cluster, node: &str) -> String {
    std::fs::read_to_string(c.run_dir(node).join("rdbd.log")).unwrap_or_default()
}

/// `on-congestion pull-ahead`: over the stalled link the Primary goes Ahead at
/// `congestion-fill`, completes writes locally and marks them; after the heal,
/// Ahead/Behind -> SyncSource/SyncTarget -> Connected, disks identical. (With
/// `on-congestion block` instead, fio does not finish while stalled.)
#[test]
fn on_congestion_pull_ahead_then_resync() {
    let (c, to_beta, to_alpha, beta_conf) =
        fio_over_a_stalled_link("pullahead", "on-congestion pull-ahead; congestion-fill 1M;");
    let s = c.status("alpha");
    assert_eq!(s["connection"], "Ahead", "alpha is not Ahead: {s}");
    heal_and_converge(&c, &to_beta, &to_alpha, &beta_conf, |c| {
        assert!(log_of(c, "alpha").contains("conn( Connected -> Ahead )"));
        let beta_log = log_of(c, "beta");
        assert!(
            beta_log.contains("conn( Connected -> Behind )"),
            "beta never Behind"
        );
        assert!(
            beta_log.contains("Behind -> SyncTarget"),
            "beta not SyncTarget after Behind"
        );
        // The same state as Prometheus metrics.
        let prom = c.adm_ok("alpha", &["status", "r0", "--prometheus"]);
        for want in [
            "rdb_connected{resource=\"r0\",node=\"alpha\"} 1\n",
            "rdb_out_of_sync_bytes{resource=\"r0\",node=\"alpha\"} 0\n",
            "connection=\"Connected\"",
        ] {
            assert!(prom.contains(want), "{want} missing in:\n{prom}");
        }
    });
}

/// `on-congestion disconnect`: the same stalled link makes the Primary drop the
/// connection at `congestion-fill`; after the heal the reconnect resyncs what the
/// peer missed.
#[test]
fn on_congestion_disconnect_then_resync() {
    let (c, to_beta, to_alpha, beta_conf) =
        fio_over_a_stalled_link("congdisc", "on-congestion disconnect; congestion-fill 1M;");
    assert!(
        log_of(&c, "alpha").contains("on-congestion disconnect"),
        "alpha did not drop the connection for congestion:\n{}",
        c.log_tail("alpha")
    );
    heal_and_converge(&c, &to_beta, &to_alpha, &beta_conf, |_| {});
}
