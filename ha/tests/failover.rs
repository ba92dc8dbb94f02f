//! Two `rdb-ha` processes on loopback (`ucast lo 127.0.0.1:PORT`, a distinct `udpport`
//! per node) running a group of two script resources that write marker files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test file: failures are test failures

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdb_ha::config::{AuthAlg, AuthKey, AuthKeys};
use rdb_protocol::heartbeat::{NodeState, Packet, PacketType};

const BIN: &str = env!("CARGO_BIN_EXE_rdb-ha");
const DEADTIME_MS: u64 = 1000;

struct Node {
    name: String,
    dir: PathBuf,
    run: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--node", &self.name])
            .arg("--config-dir")
            .arg(&self.dir)
            .arg("--run-dir")
            .arg(&self.run)
            .args(["--resource-timeout-ms", "5000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn term(&mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if c.try_wait().unwrap().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit on SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.run.join("rdb-ha.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn state(&self) -> String {
        self.status()
            .and_then(|s| s["state"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Cluster {
    t: tempfile::TempDir,
    n: [Node; 2],
    ports: [u16; 3],
}

/// `N` distinct free UDP ports: the sockets are held until all are picked (dropping
/// each at once let the kernel hand the same port out twice, and a node then failed to
/// bind it).
fn free_udp_ports<const N: usize>() -> [u16; N] {
    let socks: Vec<UdpSocket> = (0..N)
        .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
        .collect();
    std::array::from_fn(|i| socks[i].local_addr().unwrap().port())
}

impl Cluster {
    /// node1 (preferred) and node2; node1 also sends its heartbeats to `ports[2]`, where
    /// the test listens to capture genuine packets.
    fn new() -> Cluster {
        let t = tempfile::tempdir().unwrap();
        let ports = free_udp_ports::<3>();
        let marks = t.path().join("marks");
        std::fs::create_dir(&marks).unwrap();
        let mk = |i: usize| {
            let name = format!("node{}", i + 1);
            let dir = t.path().join(format!("{name}.ha.d"));
            std::fs::create_dir_all(dir.join("resource.d")).unwrap();
            let mut cf = format!(
                "keepalive 100ms\ndeadtime 1\nwarntime 500ms\ninitdead 2\nudpport {}\nucast lo 127.0.0.1:{}\nnode node1\nnode node2\nauto_failback on\nlogfacility none\n",
                ports[i],
                ports[1 - i]
            );
            if i == 0 {
                cf += &format!("ucast lo 127.0.0.1:{}\n", ports[2]);
            }
            std::fs::write(dir.join("ha.cf"), cf).unwrap();
            std::fs::write(dir.join("haresources"), "node1 svc1 \\\n  svc2\n").unwrap();
            std::fs::write(dir.join("authkeys"), "auth 1\n1 sha256 s3cret\n").unwrap();
            std::fs::set_permissions(dir.join("authkeys"), std::fs::Permissions::from_mode(0o600))
                .unwrap();
            for svc in ["svc1", "svc2"] {
                let m = marks.join(format!("{name}-{svc}"));
                let fail = t.path().join(format!("fail-{name}-{svc}"));
                let script = format!(
                    "#!/bin/sh\ncase \"$1\" in\nstart) [ -e {f} ] && exit 1; touch {m};;\nstop) rm -f {m};;\nstatus) [ -e {m} ];;\nesac\n",
                    f = fail.display(),
                    m = m.display()
                );
                let p = dir.join("resource.d").join(svc);
                std::fs::write(&p, script).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Node {
                run: t.path().join(format!("{name}.run")),
                log: t.path().join(format!("{name}.log")),
                name,
                dir,
                child: None,
            }
        };
        let n = [mk(0), mk(1)];
        Cluster { t, n, ports }
    }

    fn runs_group(&self, i: usize) -> bool {
        let name = &self.n[i].name;
        self.n[i].state() == "active"
            && ["svc1", "svc2"].iter().all(|s| {
                self.t
                    .path()
                    .join("marks")
                    .join(format!("{name}-{s}"))
                    .exists()
            })
    }

    fn holds_nothing(&self, i: usize) -> bool {
        let name = &self.n[i].name;
        ["svc1", "svc2"].iter().all(|s| {
            !self
                .t
                .path()
                .join("marks")
                .join(format!("{name}-{s}"))
                .exists()
        })
    }

    fn logs(&self) -> String {
        format!(
            "--- node1:\n{}\n--- node2:\n{}",
            self.n[0].log_text(),
            self.n[1].log_text()
        )
    }

    fn wait(&self, what: &str, timeout_ms: u64, f: impl Fn(&Cluster) -> bool) -> u64 {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < Duration::from_millis(timeout_ms),
                "{what}: not reached within {timeout_ms} ms\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed().as_millis() as u64
    }
}

#[test]
fn kill9_failover_then_auto_failback() {
    let mut c = Cluster::new();
    c.n[0].start();
    c.n[1].start();
    let t = c.wait("node1 runs the group at boot", 5000, |c| c.runs_group(0));
    println!("boot: node1 active after {t} ms");
    assert!(c.holds_nothing(1));
    c.wait("node2 sees node1", 2000, |c| {
        c.n[1].status().is_some_and(|s| s["owner"] == "node1")
    });

    c.n[0].kill9();
    let t = c.wait("node2 takes over after kill -9", DEADTIME_MS + 2000, |c| {
        c.runs_group(1)
    });
    println!(
        "failover after kill -9 of node1: {t} ms (deadtime {DEADTIME_MS} ms, keepalive 100 ms)"
    );
    assert!(t >= DEADTIME_MS - 150, "took over before deadtime: {t} ms");
    let log2 = c.n[1].log_text();
    assert!(log2.contains("node node1: is dead"), "{log2}");
    assert!(log2.contains("Taking over resource group svc1"), "{log2}");
    assert!(
        log2.contains("Resources being acquired from node1."),
        "{log2}"
    );

    // node1 returns: auto_failback on gives the group back (node2 stops first).
    c.n[0].start();
    let t = c.wait("group back on node1", 5000, |c| {
        c.runs_group(0) && c.holds_nothing(1)
    });
    println!("auto_failback: group back on node1 {t} ms after its restart");
    assert_eq!(c.n[1].state(), "standby");

    // Admin standby on node1 hands over; takeover pulls back.
    let out = Command::new(BIN)
        .args(["standby", "--run-dir"])
        .arg(&c.n[0].run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = c.wait("standby hands over", 3000, |c| {
        c.runs_group(1) && c.holds_nothing(0)
    });
    println!("standby: node2 active after {t} ms");
    let out = Command::new(BIN)
        .args(["takeover", "--run-dir"])
        .arg(&c.n[0].run)
        .output()
        .unwrap();
    assert!(out.status.success());
    let t = c.wait("takeover pulls back", 3000, |c| {
        c.runs_group(0) && c.holds_nothing(1)
    });
    println!("takeover: node1 active after {t} ms");

    let out = Command::new(BIN)
        .args(["status", "--json", "--run-dir"])
        .arg(&c.n[1].run)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["owner"], "node1");
    assert_eq!(v["peers"][0]["liveness"], "alive");
    assert_eq!(v["peers"][0]["links"][0]["name"], "lo");
    assert!(v["peers"][0]["last_heartbeat_age_ms"].as_u64().unwrap() < 1000);
    let out = Command::new(BIN)
        .args(["status", "--run-dir"])
        .arg(&c.n[1].run)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("owner of the group: node1"), "{text}");
}

fn forged(sender: &str, kind: PacketType, key: &[u8], generation: u64, seq: u64) -> Vec<u8> {
    let keys = AuthKeys {
        active: 1,
        keys: vec![AuthKey {
            index: 1,
            alg: AuthAlg::Sha256,
            secret: key.to_vec(),
        }],
    };
    let p = Packet {
        kind,
        alg: AuthAlg::Sha256,
        key_index: 1,
        generation,
        seq,
        timestamp_ms: u64::MAX / 2,
        state: NodeState::Standby,
        flags: 0,
        sender: sender.into(),
        owner: String::new(),
    };
    rdb_ha::auth::sign(&keys, p).unwrap()
}

#[test]
fn clean_stop_fails_over_at_once_and_bad_or_replayed_packets_change_nothing() {
    let mut c = Cluster::new();
    let spy = UdpSocket::bind(("127.0.0.1", c.ports[2])).unwrap();
    spy.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    c.n[0].start();
    c.n[1].start();
    c.wait("node1 runs the group", 5000, |c| c.runs_group(0));

    // SIGTERM: node1 releases the group and sends a shutdown notice; node2 takes at once.
    let sent = Instant::now();
    c.n[0].term();
    c.wait("node2 takes over after a clean stop", 2000, |c| {
        c.runs_group(1)
    });
    println!(
        "failover after SIGTERM of node1: {} ms",
        sent.elapsed().as_millis()
    );
    assert!(c.holds_nothing(0));
    assert!(c.n[1]
        .log_text()
        .contains("Received shutdown notice from 'node1'."));
    // The genuine shutdown notice, captured by the spy.
    let mut shutdown = None;
    let mut buf = [0u8; 512];
    while let Ok(n) = spy.recv(&mut buf) {
        if rdb_protocol::heartbeat::decode(&buf[..n])
            .is_ok_and(|d| d.packet.kind == PacketType::Shutdown)
        {
            shutdown = Some(buf[..n].to_vec());
        }
    }
    let shutdown = shutdown.expect("node1's shutdown notice was not captured");

    c.n[0].start();
    c.wait("group back on node1", 5000, |c| {
        c.runs_group(0) && c.holds_nothing(1)
    });
    std::thread::sleep(Duration::from_millis(300));

    let to_node2 = ("127.0.0.1", c.ports[1]);
    // A replay of the old generation's genuine shutdown notice, and a shutdown notice
    // forged with a wrong key, repeated over more than a deadtime.
    let bad = forged("node1", PacketType::Shutdown, b"wrong", 42, 1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(DEADTIME_MS + 500) {
        spy.send_to(&shutdown, to_node2).unwrap();
        spy.send_to(&bad, to_node2).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.runs_group(0), "node1 lost the group\n{}", c.logs());
        assert!(
            c.holds_nothing(1),
            "node2 acted on a bad packet\n{}",
            c.logs()
        );
    }
    let st = c.n[1].status().unwrap();
    assert_eq!(st["peers"][0]["liveness"], "alive", "{st}");
    let log2 = c.n[1].log_text();
    assert!(
        log2.contains("packet refused: replayed packet from 'node1'"),
        "{log2}"
    );
    assert!(
        log2.contains("packet refused: bad MAC from 'node1'"),
        "{log2}"
    );
}

#[test]
fn failed_start_rolls_back_and_peer_takes_over() {
    let mut c = Cluster::new();
    std::fs::write(c.t.path().join("fail-node1-svc2"), "").unwrap();
    c.n[0].start();
    c.n[1].start();
    let t = c.wait(
        "node2 runs the group after node1's start failed",
        6000,
        |c| c.runs_group(1),
    );
    println!("failed start on node1: node2 active {t} ms after boot");
    assert!(c.holds_nothing(0), "node1 did not roll back svc1");
    let log1 = c.n[0].log_text();
    assert!(
        log1.contains("Resource svc2 failed to start: rolling back"),
        "{log1}"
    );
    let st = c.n[0].status().unwrap();
    assert_eq!(st["failed"], true);
    assert_eq!(st["state"], "standby");
    // auto_failback does not pull the group back to a failed node.
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.runs_group(1));
}

#[test]
fn check_config_names_file_and_line() {
    let c = Cluster::new();
    let dir = &c.n[0].dir;
    let out = Command::new(BIN)
        .args(["check-config", "--node", "node1", "--config-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cf = std::fs::read_to_string(dir.join("ha.cf"))
        .unwrap()
        .replace("deadtime", "deadtme");
    std::fs::write(dir.join("ha.cf"), cf).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--node", "node1", "--config-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ha.cf:2: unknown directive 'deadtme' (did you mean 'deadtime'?)"),
        "{err}"
    );
}
