//! End to end, the seed 003 scenario in network namespaces (node1, node2 and a client
//! on a bridge, see `lab/mod.rs`): the real rdbd replicating under protocol C, the
//! real rdb-ha running IPaddr (with gratuitous ARP), drbddisk, Filesystem (ext4 on the
//! rdb device), a web server and MailTo, a client probing the cluster IP.
//!
//! The failover benchmark (`bench_failover`, ignored here; run by `bench/ha.sh`) uses
//! the same lab and compares with keepalived.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test file: failures are test failures

mod lab;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use lab::*;

fn assert_in_sync(lab: &Lab) {
    assert!(
        wait_for(Duration::from_secs(60), || lab.rdb_in_sync(0)
            && lab.rdb_in_sync(1)),
        "rdb pair not back in sync: {}\n{}\n{}",
        lab.rdb(0),
        lab.rdb(1),
        lab.logs()
    );
}

/// Seed timings (keepalive 2, deadtime 10, initdead 60, auto_failback on): boot on
/// node1, crash of node1 (kill -9 of rdb-ha, rdbd and its web server), node2 takes
/// over with the data written on node1, node1 reboots, resyncs and takes the group back.
#[test]
fn seed_003_crash_failover_then_auto_failback_on() {
    let mut lab = Lab::new(
        "a",
        1,
        Opts {
            t: SEED,
            auto_failback: true,
            second_link: false,
            ping_client: false,
            http_check: false,
            rdb_fast_ping: false,
            seed_authkeys: true,
        },
    );
    let out = run(
        10,
        &rdb_ha_bin().display().to_string(),
        &[
            "check-config",
            "--node",
            "node1",
            "--config-dir",
            &lab.n[0].ha_dir.display().to_string(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("keepalive 2000 ms, deadtime 10000 ms, warntime 6000 ms, initdead 60000 ms, udpport 694"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("md5 is weak"), "{err}");
    let boot = Instant::now();
    lab.start_ha(0);
    lab.start_ha(1);
    assert!(
        wait_for(Duration::from_secs(30), || lab.runs_group(0)),
        "node1 never ran the group\n{}",
        lab.logs()
    );
    println!(
        "boot: node1 runs the group {} ms after start",
        boot.elapsed().as_millis()
    );
    assert!(lab.holds_nothing(1));
    let p = lab.wait_page_from("node1", Duration::from_secs(10));
    assert_eq!(p.body, "THOLDI webstore v0\n");
    let v1 = format!("THOLDI webstore v1 written on node1 {}", std::process::id());
    lab.write_page(0, &v1);
    assert_eq!(lab.fetch().unwrap().body, format!("{v1}\n"));
    assert!(wait_for(Duration::from_secs(10), || lab.ha_status(1)
        ["owner"]
        == "node1"));

    let probe = Probe::start(&client_ns(&lab.p), &lab.vip);
    assert!(wait_for(Duration::from_secs(5), || probe
        .last()
        .is_some_and(|s| s.page.is_ok())));
    let crash = Instant::now();
    lab.crash(0);
    assert!(
        wait_for(Duration::from_secs(40), || lab.runs_group(1)),
        "node2 never took over\n{}",
        lab.logs()
    );
    let p = lab.wait_page_from("node2", Duration::from_secs(10));
    assert_eq!(
        p.body,
        format!("{v1}\n"),
        "node2 serves other data than node1 wrote"
    );
    // Served steadily by node2 afterwards.
    std::thread::sleep(Duration::from_secs(1));
    let samples = probe.stop();
    let (t, failed) = outage(&samples, crash, "node1", "node2").expect("outage seen by the client");
    println!(
        "failover (seed timings, crash of node1): client outage {} ms ({failed} failed requests), node2 took over {} ms after the crash",
        t.as_millis(),
        crash.elapsed().as_millis()
    );
    // Once node2 served, node1 never again (no flapping back to the dead node's MAC);
    // single probe timeouts under load are not failures of the failover.
    let first2 = samples
        .iter()
        .position(|s| s.page.as_ref().is_ok_and(|p| p.node == "node2"))
        .unwrap();
    assert!(
        samples[first2..]
            .iter()
            .all(|s| !s.page.as_ref().is_ok_and(|p| p.node != "node2")),
        "client served by node1 after node2 took over"
    );
    assert!(lab.fetch().is_ok_and(|p| p.node == "node2"));
    let log2 = lab.ha_log(1);
    for needle in [
        "node node1: is dead",
        "Taking over resource group IPaddr::",
        "Resources being acquired from node1.",
    ] {
        assert!(log2.contains(needle), "{needle} missing:\n{log2}");
    }
    let mail = std::fs::read_to_string(lab.n[1].ha_dir.join("mail")).unwrap_or_default();
    assert!(
        mail.contains("To: sip@tholdi.com"),
        "MailTo sent nothing: {mail}"
    );
    let st = lab.rdb(1);
    assert_eq!(st["role"], "Primary", "{st}");

    // Written while node1 is down: node1 must get it by resync.
    let v2 = format!("THOLDI webstore v2 written on node2 {}", std::process::id());
    lab.write_page(1, &v2);
    assert_eq!(lab.fetch().unwrap().body, format!("{v2}\n"));

    // node1 reboots: rdb up (resync from node2), rdb-ha starts, auto_failback on.
    // The client must never see the data of before v2 again.
    let probe = Probe::start(&client_ns(&lab.p), &lab.vip);
    lab.reboot(0);
    let back = Instant::now();
    lab.start_ha(0);
    // The crashed Primary's activity-log extents and node2's writes since the
    // failover (its bitmap) are resynced from node2 (generation UUIDs: node2's
    // bitmap UUID is node1's current one), then rdb-ha fails back.
    assert!(
        wait_for(Duration::from_secs(60), || lab.runs_group(0)
            && lab.holds_nothing(1)),
        "group did not fail back to node1 after its return (resync)\n{}",
        lab.logs()
    );
    println!(
        "auto_failback on: node1 runs the group {} ms after its first restart",
        back.elapsed().as_millis()
    );
    let p = lab.wait_page_from("node1", Duration::from_secs(10));
    assert_eq!(
        p.body,
        format!("{v2}\n"),
        "node1 did not get node2's writes by resync"
    );
    let samples = probe.stop();
    let stale = samples
        .iter()
        .filter(|s| s.page.as_ref().is_ok_and(|p| p.body != format!("{v2}\n")))
        .count();
    assert_eq!(
        stale, 0,
        "the client was served stale data during node1's return"
    );
    assert_in_sync(&lab);
    let st = lab.rdb(1);
    assert!(
        st["resync_bytes_total"].as_u64().unwrap_or(0) > 0
            || lab.rdb(0)["resync_bytes_total"].as_u64().unwrap_or(0) > 0
    );

    // status --json: nodes, links, heartbeat age, owner, resources.
    let v: serde_json::Value = serde_json::from_str(&lab.ha_cmd(1, &["status", "--json"])).unwrap();
    assert_eq!(v["node"], "node2");
    assert_eq!(v["owner"], "node1");
    assert_eq!(v["peers"][0]["name"], "node1");
    assert_eq!(v["peers"][0]["liveness"], "alive");
    assert_eq!(v["peers"][0]["links"][0]["name"], "eth0");
    assert!(v["peers"][0]["last_heartbeat_age_ms"].as_u64().unwrap() < 5000);
    assert_eq!(v["resources"].as_array().unwrap().len(), 5);
    assert!(v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["state"] == "stopped"));
    assert!(v["refused_packets"].is_object(), "{v}");
}

/// Captures genuine heartbeats of `from` (broadcast on eth0) in the client namespace.
fn capture(ns: &str, from: &str, count: usize) -> Vec<Vec<u8>> {
    let ns = ns.to_owned();
    let from = from.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let s = UdpSocket::bind("0.0.0.0:694").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < count && Instant::now() < deadline {
            if let Ok(n) = s.recv(&mut buf) {
                if rdb_protocol::heartbeat::decode(&buf[..n]).is_ok_and(|d| d.packet.sender == from)
                {
                    got.push(buf[..n].to_vec());
                }
            }
        }
        got
    })
    .join()
    .unwrap()
}

/// A packet claiming to be `sender`, signed with a key that is not in authkeys.
fn forged(sender: &str, seq: u64) -> Vec<u8> {
    use rdb_ha::config::{AuthAlg, AuthKey, AuthKeys};
    use rdb_protocol::heartbeat::{NodeState, Packet, PacketType};
    let keys = AuthKeys {
        active: 3,
        keys: vec![AuthKey {
            index: 3,
            alg: AuthAlg::Sha256,
            secret: b"not-the-key".to_vec(),
        }],
    };
    let p = Packet {
        kind: PacketType::Heartbeat,
        alg: AuthAlg::Sha256,
        key_index: 3,
        generation: 7,
        seq,
        timestamp_ms: u64::MAX / 2,
        state: NodeState::Active,
        flags: 0,
        sender: sender.into(),
        owner: sender.into(),
    };
    rdb_ha::auth::sign(&keys, p).unwrap()
}

/// Sub-second timings (keepalive 200ms, deadtime 1500ms: `MID`, robust on a loaded CI
/// machine; the 100ms/500ms timings are measured by the benchmark), two heartbeat links, the client as
/// ping tie-breaker, an HTTP health check, auto_failback off. In order: a start failure
/// on node1 rolls back and node2 takes the group; `takeover` pulls it to node1; a dead
/// web server (health check) hands it over cleanly; one link cut changes nothing; node1
/// cut off by nftables (while replayed and wrongly signed heartbeats of node1 reach
/// node2): node2 takes over and node1, which lost the ping node, releases everything;
/// node1 returns and, auto_failback off, node2 keeps the group.
#[test]
fn subsecond_rollback_takeover_check_links_cutoff_failback_off() {
    let mut lab = Lab::new(
        "b",
        2,
        Opts {
            t: MID,
            auto_failback: false,
            second_link: true,
            ping_client: true,
            http_check: true,
            rdb_fast_ping: true,
            seed_authkeys: false,
        },
    );
    // 1. A start failure on node1 rolls back; node2 takes the group.
    std::fs::write(lab.fail_flag(0), "").unwrap();
    lab.start_ha(0);
    lab.start_ha(1);
    assert!(
        wait_for(Duration::from_secs(30), || lab.runs_group(1)
            && lab.holds_nothing(0)),
        "node2 did not take the group after node1's failed start\n{}",
        lab.logs()
    );
    let log1 = lab.ha_log(0);
    assert!(
        log1.contains("Resource httpd failed to start: rolling back"),
        "{log1}"
    );
    assert_eq!(lab.ha_status(0)["failed"], true);
    assert!(!lab.has_vip(0));
    assert_eq!(
        lab.wait_page_from("node2", Duration::from_secs(5)).body,
        "THOLDI webstore v0\n"
    );
    println!("start failure on node1: rolled back, node2 serves");

    // 2. takeover on node1.
    std::fs::remove_file(lab.fail_flag(0)).unwrap();
    lab.ha_cmd(0, &["takeover"]);
    assert!(
        wait_for(Duration::from_secs(20), || lab.runs_group(0)
            && lab.holds_nothing(1)),
        "takeover did not move the group to node1\n{}",
        lab.logs()
    );
    lab.wait_page_from("node1", Duration::from_secs(5));
    let v1 = format!("THOLDI webstore v1 written on node1 {}", std::process::id());
    lab.write_page(0, &v1);

    // 3. The web server dies on node1: the health check hands over cleanly.
    let pid: i32 = std::fs::read_to_string(lab.n[0].ha_run.join("httpd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    // SAFETY: kill(2) of the test web server node1's rdb-ha started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(20), || lab.runs_group(1)
            && lab.holds_nothing(0)),
        "failed health check did not hand over\n{}",
        lab.logs()
    );
    assert_eq!(
        lab.wait_page_from("node2", Duration::from_secs(5)).body,
        format!("{v1}\n")
    );
    println!(
        "health check: node2 serves {} ms after the web server died on node1",
        t.elapsed().as_millis()
    );
    assert!(lab.ha_log(0).contains("health check web failed"));
    assert_eq!(lab.ha_status(0)["failed"], true);
    assert!(
        lab.rdb_in_sync(1),
        "clean handover left the pair out of sync: {}",
        lab.rdb(1)
    );
    lab.ha_cmd(0, &["takeover"]);
    assert!(
        wait_for(Duration::from_secs(20), || lab.runs_group(0)
            && lab.holds_nothing(1)),
        "takeover after the check failure\n{}",
        lab.logs()
    );
    lab.wait_page_from("node1", Duration::from_secs(5));

    // 4. One link cut (eth1): node2 logs the dead link, node1 stays alive.
    lab.cut(0, &["eth1"]);
    let link_dead = |lab: &Lab| {
        let s = lab.ha_status(1);
        s["peers"][0]["links"][0]["up"] == true && s["peers"][0]["links"][1]["up"] == false
    };
    assert!(
        wait_for(Duration::from_secs(5), || link_dead(&lab)),
        "{}",
        lab.ha_status(1)
    );
    std::thread::sleep(Duration::from_millis(3000));
    assert!(link_dead(&lab) && lab.runs_group(0) && lab.holds_nothing(1));
    assert_eq!(lab.ha_status(1)["peers"][0]["liveness"], "alive");
    assert!(lab.ha_log(1).contains("Link node1:eth1 dead."));
    lab.cut(0, &[]);
    assert!(wait_for(Duration::from_secs(5), || lab.ha_status(1)
        ["peers"][0]["links"][1]["up"]
        == true));
    // Both links up: no packet refused (a packet arrives once per link).
    let st = lab.ha_status(1);
    assert_eq!(st["refused_packets"]["replay"], 0, "{st}");

    // 5. node1 cut off; replays of its genuine heartbeats and forged ones reach node2.
    let cl = client_ns(&lab.p);
    let genuine = capture(&cl, "node1", 5);
    assert_eq!(genuine.len(), 5, "no heartbeat of node1 captured");
    let probe = Probe::start(&cl, &lab.vip);
    assert!(wait_for(Duration::from_secs(5), || probe
        .last()
        .is_some_and(|s| s.page.is_ok())));
    let refused_before = lab.ha_status(1)["refused_packets"].clone();
    let cut = Instant::now();
    lab.cut(0, &["eth0", "eth1"]);
    let injector = {
        let cl = cl.clone();
        let to = format!("{}:694", lab.n[1].ip);
        std::thread::spawn(move || {
            enter_netns(&cl);
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let start = Instant::now();
            let mut seq = 1;
            while start.elapsed() < Duration::from_secs(3) {
                for g in &genuine {
                    let _ = s.send_to(g, &to);
                }
                let _ = s.send_to(&forged("node1", seq), &to);
                seq += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), || lab.runs_group(1)),
        "node2 did not take over from the cut-off node1\n{}",
        lab.logs()
    );
    let p = lab.wait_page_from("node2", Duration::from_secs(10));
    assert_eq!(p.body, format!("{v1}\n"));
    injector.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let samples = probe.stop();
    let (t, failed) = outage(&samples, cut, "node1", "node2").expect("outage seen by the client");
    println!(
        "failover (keepalive 200ms, deadtime 1500ms, node1 cut off by nftables): client outage {} ms ({failed} failed requests)",
        t.as_millis()
    );
    let st = lab.ha_status(1);
    let refused = &st["refused_packets"];
    assert!(
        refused["replay"].as_u64().unwrap() > refused_before["replay"].as_u64().unwrap()
            && refused["bad_mac"].as_u64().unwrap() > refused_before["bad_mac"].as_u64().unwrap(),
        "replayed/forged packets were not refused: {st}"
    );
    assert!(lab.ha_log(1).contains("node node1: is dead"));
    // node1 lost the ping node: it released everything (no second owner of the VIP).
    assert!(
        wait_for(Duration::from_secs(20), || lab.holds_nothing(0)),
        "cut-off node1 kept resources: {}\n{}",
        lab.ha_status(0),
        lab.logs()
    );
    assert_eq!(lab.ha_status(0)["ping_lost"], true);

    // 6. node1 returns; auto_failback off: node2 keeps the group.
    lab.cut(0, &[]);
    assert!(wait_for(Duration::from_secs(10), || lab.ha_status(1)
        ["peers"][0]["liveness"]
        == "alive"));
    assert!(wait_for(Duration::from_secs(10), || lab.ha_status(0)
        ["ping_lost"]
        == false));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        lab.runs_group(1) && lab.holds_nothing(0),
        "auto_failback off moved the group\n{}",
        lab.logs()
    );
    assert_eq!(lab.fetch().unwrap().node, "node2");
    // rdb: node1 wrote (ext4 umount) while cut off, node2 too: a split brain for rdbd
    // (as for DRBD without fencing). Manual recovery as in the DRBD guide, discarding
    // node1's changes: `connect --discard-my-data` on the victim, `connect` on the
    // survivor (a bitmap resync of both sides' changes).
    if !wait_for(Duration::from_secs(10), || lab.rdb_in_sync(1)) {
        println!(
            "rdb after the cut: node1 {} / node2 {}: split brain, node1 discards its data",
            lab.rdb(0)["connection"],
            lab.rdb(1)["connection"]
        );
        let _ = lab.adm(0, &["secondary", RES]);
        lab.adm_ok(0, &["connect", "--discard-my-data", RES]);
        lab.adm_ok(1, &["connect", RES]);
    }
    assert_in_sync(&lab);
    assert_eq!(lab.fetch().unwrap().body, format!("{v1}\n"));
}

/// One failover measurement: crash of node1 (kill -9 of every process of it), outage
/// seen by the client (last success from node1 to first success from node2).
fn measure_crash(lab: &mut Lab, crash: impl FnOnce(&mut Lab)) -> Duration {
    let probe = Probe::start(&client_ns(&lab.p), &lab.vip);
    assert!(
        wait_for(Duration::from_secs(10), || probe.last().is_some_and(|s| s
            .page
            .as_ref()
            .is_ok_and(|p| p.node == "node1"))),
        "client not served by node1 before the crash\n{}",
        lab.logs()
    );
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    crash(lab);
    assert!(
        wait_for(Duration::from_secs(60), || probe.last().is_some_and(|s| s
            .page
            .as_ref()
            .is_ok_and(|p| p.node == "node2"))),
        "client never served by node2\n{}",
        lab.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let samples = probe.stop();
    outage(&samples, t0, "node1", "node2").expect("outage").0
}

/// node1 cut off by nftables (both directions, every interface).
fn cut_node1(l: &mut Lab) {
    l.cut(0, &["eth0", "eth1"]);
}

fn rdb_ha_round(tag: &str, k: u8, t: Timings, cut: bool) -> Duration {
    let mut lab = Lab::new(
        tag,
        k,
        Opts {
            t,
            auto_failback: false,
            second_link: false,
            ping_client: false,
            http_check: false,
            // rdbd must notice a silent peer before node2 can be promoted.
            rdb_fast_ping: cut,
            seed_authkeys: false,
        },
    );
    lab.start_ha(0);
    lab.start_ha(1);
    assert!(
        wait_for(Duration::from_secs(30), || lab.runs_group(0)
            && lab.ha_status(1)["owner"] == "node1"),
        "{}",
        lab.logs()
    );
    let d = if cut {
        measure_crash(&mut lab, cut_node1)
    } else {
        measure_crash(&mut lab, |l| l.crash(0))
    };
    assert_eq!(lab.fetch().unwrap().body, "THOLDI webstore v0\n");
    d
}

fn keepalived_round(tag: &str, k: u8, cut: bool) -> Duration {
    need("keepalived", "keepalived");
    let mut lab = Lab::new(
        tag,
        k,
        Opts {
            t: FAST,
            auto_failback: false,
            second_link: false,
            ping_client: false,
            http_check: false,
            rdb_fast_ping: false,
            seed_authkeys: false,
        },
    );
    // The same VIP moved by VRRP; each node serves its own static copy of the page
    // with the same web server (no rdb, no mount: the IP move only).
    for i in 0..2 {
        let n = &lab.n[i];
        let www = n.ha_run.join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), "THOLDI webstore v0\n").unwrap();
        let conf = n.ha_run.join("keepalived.conf");
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  router_id {name}\n}}\nvrrp_instance VI_1 {{\n  state {state}\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n  advert_int 1\n  authentication {{\n    auth_type PASS\n    auth_pass tholdi\n  }}\n  virtual_ipaddress {{\n    {vip}/24 dev eth0\n  }}\n}}\n",
                name = n.name,
                state = if i == 0 { "MASTER" } else { "BACKUP" },
                prio = if i == 0 { 150 } else { 100 },
                vip = lab.vip
            ),
        )
        .unwrap();
        let run = n.ha_run.display().to_string();
        let web = n.ha_dir.join("web.py").display().to_string();
        let cmd = format!(
            "setsid /usr/bin/python3 {web} {www} {HTTP_PORT} {name} {run}/web.ready >{run}/web.log 2>&1 </dev/null &\n\
             setsid keepalived -n -l -P -f {conf} -p {run}/keepalived.pid -r {run}/vrrp.pid >{run}/keepalived.log 2>&1 </dev/null &\n",
            www = www.display(),
            name = n.name,
            conf = conf.display()
        );
        run_ok(10, "ip", &["netns", "exec", &n.ns, "sh", "-c", &cmd]);
    }
    assert!(
        wait_for(Duration::from_secs(20), || lab.has_vip(0)),
        "keepalived never gave node1 the VIP"
    );
    if cut {
        let d = measure_crash(&mut lab, cut_node1);
        kill_netns_pids(&lab.n[0].ns);
        kill_netns_pids(&lab.n[1].ns);
        return d;
    }
    let d = measure_crash(&mut lab, |l| {
        // keepalived's VRRP child first (killing the parent first makes it clean up).
        let run = &l.n[0].ha_run;
        for f in ["vrrp.pid", "keepalived.pid"] {
            if let Ok(t) = std::fs::read_to_string(run.join(f)) {
                if let Ok(pid) = t.trim().parse::<i32>() {
                    // SAFETY: kill(2) of the keepalived this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        kill_netns_pids(&l.n[0].ns);
    });
    kill_netns_pids(&lab.n[1].ns);
    d
}

/// Failover benchmark (bench/ha.sh): client outage after a crash of node1 with rdb-ha
/// and the seed's timings, rdb-ha with sub-second timings, and keepalived VRRP
/// (advert_int 1) moving the same IP, interleaved rounds in one run.
#[test]
#[ignore = "benchmark: run by bench/ha.sh"]
fn bench_failover() {
    let rounds: usize = std::env::var("RDB_HA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // (name, runner) in the order of the interleaved rounds.
    type Runner = Box<dyn Fn() -> Duration>;
    let cases: Vec<(&str, Runner)> = vec![
        (
            "keepalived_crash",
            Box::new(|| keepalived_round("k", 5, false)),
        ),
        (
            "rdb_ha_fast_crash",
            Box::new(|| rdb_ha_round("f", 4, FAST, false)),
        ),
        (
            "rdb_ha_seed_crash",
            Box::new(|| rdb_ha_round("s", 3, SEED, false)),
        ),
        (
            "keepalived_cut",
            Box::new(|| keepalived_round("k", 5, true)),
        ),
        (
            "rdb_ha_fast_cut",
            Box::new(|| rdb_ha_round("f", 4, FAST, true)),
        ),
    ];
    let mut res: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for r in 0..rounds {
        let mut line = format!("round {r}:");
        for (i, (name, f)) in cases.iter().enumerate() {
            let d = f();
            line += &format!(" {name} {} ms", d.as_millis());
            res[i].push(d);
        }
        println!("{line}");
    }
    let med = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let mut per = serde_json::Map::new();
    let mut medians = serde_json::Map::new();
    for (i, (name, _)) in cases.iter().enumerate() {
        per.insert(
            (*name).into(),
            res[i]
                .iter()
                .map(|d| d.as_millis() as u64)
                .collect::<Vec<_>>()
                .into(),
        );
        medians.insert((*name).into(), (med(&res[i]).as_millis() as u64).into());
    }
    let ratio = |a: usize, b: usize| {
        (med(&res[a]).as_secs_f64() / med(&res[b]).as_secs_f64() * 100.0).round() / 100.0
    };
    let out = serde_json::json!({
        "method": "client GET http://VIP:8080/ every 50 ms, 200 ms timeout; outage = last success from node1 to first success from node2. crash = kill -9 of every process of node1 (rdb-ha, rdbd, web server | keepalived VRRP child, then parent, web server); cut = nftables drops everything on node1's interfaces. rdb-ha moves IPaddr + rdb Primary + ext4 mount (fsck) + web server; keepalived moves the IP only (a web server runs on each node)",
        "timings": {"seed": "keepalive 2, deadtime 10", "fast": "keepalive 100ms, deadtime 500ms", "keepalived": "advert_int 1, VRRPv2 auth PASS", "rdb_cut": "rdb net ping-int 1, ping-timeout 5 (0.5 s)"},
        "rounds": rounds,
        "outage_ms": per,
        "median_ms": medians,
        "ratio_fast_crash_vs_keepalived_crash": ratio(1, 0),
        "ratio_seed_crash_vs_keepalived_crash": ratio(2, 0),
        "ratio_fast_cut_vs_keepalived_cut": ratio(4, 3),
        "fast_target_ms": 1500,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    if let Some(p) = std::env::var_os("RDB_HA_BENCH_OUT") {
        std::fs::write(p, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    }
}
