//! Network faults between two real nodes, each in its own network namespace, joined by a
//! veth pair on a private test subnet (10.213.K.0/24, only inside the namespaces).
//! nftables rules inside a namespace cut the link one way, both ways, or flap it, while
//! a writer keeps writing through the Primary's NBD socket (protocol C).
//!
//! Asserted on every run: no write waits longer than the configured timeouts allow (the
//! Primary keeps serving through the cut); after healing the link reconnects and the
//! resync finishes; after `down` the two backing disks' data areas are byte-identical
//! and the last acknowledged write of every block (offset and SHA-256 logged by the
//! writer right after the acknowledgement) is on both disks.
//!
//! Everything is bounded: each command runs under `timeout`, each wait has a deadline,
//! the writer stops by itself, and `Drop` removes processes, namespaces and files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// Configured timeouts: ping every 1 s, 0.5 s to answer, `timeout` 1 s, ko-count 2. A
/// dead link is noticed after 1.5 s; a stalled write kills the link after 2 s.
const NET_OPTS: &str = "ping-int 1; ping-timeout 5; timeout 10; ko-count 2; connect-int 1;";
/// The longest a write may wait: a write stall detection (2 s), plus the dead-peer
/// detection (1.5 s), twice, for scheduling slack on a loaded 2-core machine.
const MAX_WRITE_WAIT: Duration = Duration::from_secs(8);
const DISK_SIZE: &str = "64M";
/// The writer writes 4 KiB blocks in the first 16 MiB.
const WRITE_BLOCKS: u64 = 4096;

/// Which direction a rule drops.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// alpha -> beta dropped (data and pings to the Secondary).
    AlphaToBeta,
    /// beta -> alpha dropped (acks and pongs to the Primary).
    BetaToAlpha,
    /// Both directions.
    Both,
}

struct NetPair {
    tag: String,
    ns: [String; 2],
    ip: [String; 2],
    dir: PathBuf,
    conf: PathBuf,
    writer: Option<Child>,
}

fn sh(timeout_s: u64, args: &[&str]) -> Output {
    run(timeout_s, args[0], &args[1..])
}

fn sh_ok(timeout_s: u64, args: &[&str]) -> String {
    run_ok(timeout_s, args[0], &args[1..])
}

impl NetPair {
    /// Two namespaces joined by a veth pair on 10.213.`k`.0/24, nftables tables ready,
    /// a protocol C resource `r0` with a 64 MiB backing file per node.
    fn new(tag: &str, k: u8) -> NetPair {
        need_root();
        need("ip", "iproute2");
        need("nft", "nftables");
        need("sha256sum", "coreutils");
        assert!(
            Command::new("/usr/bin/python3")
                .args(["-c", "import nbd"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
            "python3-libnbd is required by this test: apt-get install python3-libnbd"
        );
        let id = std::process::id() % 100_000;
        let ns = [format!("rdbf-{tag}-{id}-a"), format!("rdbf-{tag}-{id}-b")];
        let ip = [format!("10.213.{k}.1"), format!("10.213.{k}.2")];
        let dir = PathBuf::from(format!("/tmp/rdb-netns-{tag}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pair = NetPair {
            tag: tag.to_string(),
            ns: ns.clone(),
            ip: ip.clone(),
            dir: dir.clone(),
            conf: dir.join("rdb.conf"),
            writer: None,
        };
        // Leftovers of an earlier, killed run of the same pid would collide.
        for n in &ns {
            let _ = sh(10, &["ip", "netns", "del", n]);
        }
        let veth = [format!("rv{k}{id}a"), format!("rv{k}{id}b")];
        sh_ok(10, &["ip", "netns", "add", &ns[0]]);
        sh_ok(10, &["ip", "netns", "add", &ns[1]]);
        sh_ok(
            10,
            &[
                "ip", "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
            ],
        );
        for i in 0..2 {
            sh_ok(10, &["ip", "link", "set", &veth[i], "netns", &ns[i]]);
            sh_ok(
                10,
                &[
                    "ip",
                    "-n",
                    &ns[i],
                    "addr",
                    "add",
                    &format!("{}/24", ip[i]),
                    "dev",
                    &veth[i],
                ],
            );
            sh_ok(10, &["ip", "-n", &ns[i], "link", "set", &veth[i], "up"]);
            sh_ok(10, &["ip", "-n", &ns[i], "link", "set", "lo", "up"]);
            pair.nft(
                i,
                "add table inet rdbfault\n\
                 add chain inet rdbfault input { type filter hook input priority 0; policy accept; }\n\
                 add chain inet rdbfault output { type filter hook output priority 0; policy accept; }\n",
            );
        }
        for n in ["alpha", "beta"] {
            sh_ok(
                10,
                &[
                    "truncate",
                    "-s",
                    DISK_SIZE,
                    &dir.join(format!("{n}.img")).display().to_string(),
                ],
            );
        }
        let text = format!(
            "resource r0 {{\n    frontend none;\n    flexible-meta-disk internal;\n    \
             net {{\n        protocol C;\n        {NET_OPTS}\n        \
             cram-hmac-alg sha256; shared-secret \"netns\";\n    }}\n    \
             on alpha {{\n        device {d}/alpha.dev;\n        disk {d}/alpha.img;\n        address {a}:7789;\n    }}\n    \
             on beta {{\n        device {d}/beta.dev;\n        disk {d}/beta.img;\n        address {b}:7789;\n    }}\n}}\n",
            d = dir.display(),
            a = ip[0],
            b = ip[1],
        );
        std::fs::write(&pair.conf, text).unwrap();
        pair
    }

    fn node_index(node: &str) -> usize {
        usize::from(node != "alpha")
    }

    fn run_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("run-{node}"))
    }

    fn img(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.img"))
    }

    /// Applies an nft script inside a node's namespace.
    fn nft(&self, i: usize, script: &str) {
        let path = self.dir.join(format!("nft-{i}.txt"));
        std::fs::write(&path, script).unwrap();
        sh_ok(
            10,
            &[
                "ip",
                "netns",
                "exec",
                &self.ns[i],
                "nft",
                "-f",
                &path.display().to_string(),
            ],
        );
    }

    /// `rdbadm` for a node, run inside its namespace (the daemon it starts stays there).
    fn adm(&self, node: &str, args: &[&str]) -> Output {
        let run_dir = self.run_dir(node);
        std::fs::create_dir_all(&run_dir).unwrap();
        let rdbadm = bin("rdbadm").display().to_string();
        let conf = self.conf.display().to_string();
        let rd = run_dir.display().to_string();
        let mut full = vec![
            "ip",
            "netns",
            "exec",
            &self.ns[Self::node_index(node)],
            &rdbadm,
            "-c",
            &conf,
            "--node",
            node,
            "--run-dir",
            &rd,
        ];
        full.extend_from_slice(args);
        sh(60, &full)
    }

    fn adm_ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.adm(node, args);
        assert!(
            out.status.success(),
            "rdbadm {args:?} on {node} failed:\nstdout: {}\nstderr: {}\nalpha log:\n{}\nbeta log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail("alpha"),
            self.log_tail("beta")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_tail(&self, node: &str) -> String {
        let log = std::fs::read_to_string(self.run_dir(node).join("rdbd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// How often a node's daemon logged the loss of its connection.
    fn link_losses(&self, node: &str) -> usize {
        std::fs::read_to_string(self.run_dir(node).join("rdbd.log"))
            .unwrap_or_default()
            .matches("connection to the peer lost")
            .count()
    }

    fn status(&self, node: &str) -> serde_json::Value {
        let out = self.adm_ok(node, &["status", "r0", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
        v["resources"][0].clone()
    }

    /// Connected, both UpToDate, nothing out of sync on alpha.
    fn in_sync(&self) -> bool {
        let s = self.status("alpha");
        s["connection"] == "Connected"
            && s["disk"] == "UpToDate"
            && s["peer_disk"] == "UpToDate"
            && s["out_of_sync_bytes"] == 0
    }

    fn wait_in_sync(&self, what: &str) -> Duration {
        let t0 = Instant::now();
        assert!(
            wait_for(Duration::from_secs(90), || self.in_sync()),
            "{}: {what}: never back in sync\nalpha: {}\nbeta: {}\nalpha log:\n{}\nbeta log:\n{}",
            self.tag,
            self.status("alpha"),
            self.status("beta"),
            self.log_tail("alpha"),
            self.log_tail("beta")
        );
        t0.elapsed()
    }

    fn up_pair(&self) {
        for n in ["alpha", "beta"] {
            self.adm_ok(n, &["create-md", "r0"]);
            self.adm_ok(n, &["up", "r0"]);
        }
        self.adm_ok("alpha", &["primary", "r0", "--force"]);
        self.wait_in_sync("initial full sync");
    }

    fn cut(&self, cut: Cut) {
        let (a, b) = (&self.ip[0], &self.ip[1]);
        match cut {
            Cut::AlphaToBeta => self.nft(
                0,
                &format!("add rule inet rdbfault output ip daddr {b} drop\n"),
            ),
            Cut::BetaToAlpha => self.nft(
                1,
                &format!("add rule inet rdbfault output ip daddr {a} drop\n"),
            ),
            Cut::Both => self.nft(
                0,
                &format!(
                    "add rule inet rdbfault output ip daddr {b} drop\n\
                     add rule inet rdbfault input ip saddr {b} drop\n"
                ),
            ),
        }
    }

    fn heal(&self) {
        for i in 0..2 {
            self.nft(
                i,
                "flush chain inet rdbfault input\nflush chain inet rdbfault output\n",
            );
        }
    }

    fn writer_log(&self) -> PathBuf {
        self.dir.join("writer.log")
    }

    fn stop_file(&self) -> PathBuf {
        self.dir.join("writer.stop")
    }

    /// Starts the writer on alpha's NBD socket: sequential 4 KiB writes of fresh random
    /// data to random blocks, a flush every 16 writes, each acknowledged write logged
    /// (`offset generation sha256 latency_ms`) and the log flushed before the next one.
    /// Stops when the stop file appears, or after 240 s.
    fn start_writer(&mut self, seed: u64) {
        let script = r#"
import hashlib, os, random, sys, time, nbd
uri, log_path, stop, seed, blocks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
h = nbd.NBD(); h.connect_uri(uri)
deadline = time.monotonic() + 240
gen = 0
with open(log_path, "w") as log:
    while not os.path.exists(stop) and time.monotonic() < deadline:
        gen += 1
        off = rng.randrange(blocks) * 4096
        data = gen.to_bytes(8, "little") + off.to_bytes(8, "little") + rng.randbytes(4096 - 16)
        t = time.monotonic()
        h.pwrite(data, off)
        if gen % 16 == 0:
            h.flush()
        lat_ms = (time.monotonic() - t) * 1000
        log.write("%d %d %s %.1f\n" % (off, gen, hashlib.sha256(data).hexdigest(), lat_ms))
        log.flush()
        time.sleep(0.002)
h.shutdown()
print("writes", gen)
"#;
        let _ = std::fs::remove_file(self.stop_file());
        let child = Command::new("timeout")
            .args(["300", "/usr/bin/python3", "-c", script])
            .arg(format!(
                "nbd+unix:///r0?socket={}/r0.nbd",
                self.run_dir("alpha").display()
            ))
            .arg(self.writer_log())
            .arg(self.stop_file())
            .arg(seed.to_string())
            .arg(WRITE_BLOCKS.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the writer");
        self.writer = Some(child);
        // Wait until writes flow.
        assert!(
            wait_for(Duration::from_secs(20), || self.logged_writes() > 20),
            "the writer never got going"
        );
    }

    fn logged_writes(&self) -> usize {
        std::fs::read_to_string(self.writer_log())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Stops the writer; returns the acknowledged writes: offset -> (generation, sha256)
    /// of the last one per block, the write count, and the longest write wait in ms.
    fn stop_writer(&mut self) -> (BTreeMap<u64, (u64, String)>, usize, f64) {
        std::fs::write(self.stop_file(), b"stop").unwrap();
        let mut child = self.writer.take().expect("writer running");
        let finished = wait_for(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !finished {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            finished && out.status.success(),
            "{}: the writer failed or hung ({:?}): {}\n{}\nalpha log:\n{}",
            self.tag,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail("alpha")
        );
        let text = std::fs::read_to_string(self.writer_log()).unwrap();
        let mut last = BTreeMap::new();
        let mut max_wait_ms = 0f64;
        let mut count = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 4, "bad writer log line {line:?}");
            let (off, gen): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            last.insert(off, (gen, f[2].to_string()));
            max_wait_ms = max_wait_ms.max(f[3].parse().unwrap());
            count += 1;
        }
        (last, count, max_wait_ms)
    }

    /// Takes both nodes down and checks the disks; returns the bytes verified.
    fn down_and_verify(&self, acked: &BTreeMap<u64, (u64, String)>) -> u64 {
        self.adm_ok("alpha", &["secondary", "r0"]);
        self.adm_ok("alpha", &["down", "r0"]);
        self.adm_ok("beta", &["down", "r0"]);
        let md = rdb::meta::read_md(&self.img("alpha"), &rdb::meta::MetaLocation::Internal)
            .expect("alpha's meta-data");
        let data = md.layout.data_size_bytes;
        let a = sha256_of(&self.img("alpha"), Some(data));
        let b = sha256_of(&self.img("beta"), Some(data));
        assert_eq!(a, b, "{}: the data areas differ after healing", self.tag);
        let disk = File::open(self.img("alpha")).unwrap();
        let mut block = vec![0u8; 4096];
        for (off, (gen, sum)) in acked {
            disk.read_exact_at(&mut block, *off).unwrap();
            let found = format!("{:x}", Sha256::digest(&block));
            assert_eq!(
                &found, sum,
                "{}: acknowledged write gen {gen} at offset {off} is not on the disks",
                self.tag
            );
        }
        data + acked.len() as u64 * 4096
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        if let Some(mut w) = self.writer.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        for n in ["alpha", "beta"] {
            if self.run_dir(n).exists() {
                let _ = self.adm(n, &["down", "all"]);
            }
        }
        // Daemons whose command line names our directory (still running after a failed
        // down): killed by pid.
        if let Ok(out) = Command::new("pgrep").args(["-x", "rdbd"]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&self.dir.display().to_string()) {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
        }
        for n in &self.ns {
            let _ = sh(10, &["ip", "netns", "del", n]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One scenario: up, writer, the faults (each cut held `hold`, then healed and the
/// resync awaited when `resync_each`), the checks.
fn scenario(tag: &str, k: u8, faults: &[Cut], hold: Duration, resync_each: bool) {
    let mut p = NetPair::new(tag, k);
    p.up_pair();
    p.start_writer(u64::from(k) * 7919);
    let mut resyncs = Vec::new();
    for (i, cut) in faults.iter().enumerate() {
        let before = p.logged_writes();
        p.cut(*cut);
        std::thread::sleep(hold);
        // The Primary kept serving during the cut (writes acknowledged locally once
        // the peer was declared dead).
        let during = p.logged_writes();
        // (Only checked for cuts held long enough for the dead-peer detection.)
        assert!(
            !resync_each || during > before,
            "{tag}: no write completed during cut {i} ({cut:?}) held {hold:?}\nalpha: {}\nalpha log:\n{}",
            p.status("alpha"),
            p.log_tail("alpha")
        );
        p.heal();
        if resync_each || i + 1 == faults.len() {
            resyncs.push(p.wait_in_sync(&format!("after cut {i} ({cut:?})")));
        } else {
            std::thread::sleep(hold);
        }
    }
    let (acked, writes, max_wait_ms) = p.stop_writer();
    assert!(
        max_wait_ms < MAX_WRITE_WAIT.as_secs_f64() * 1000.0,
        "{tag}: a write waited {max_wait_ms} ms (bound {MAX_WRITE_WAIT:?})"
    );
    let s = p.status("alpha");
    let losses = p.link_losses("alpha");
    // A cut held past the dead-peer detection is always noticed.
    assert!(
        !resync_each || losses >= faults.len(),
        "{tag}: {losses} connection losses logged for {} cuts",
        faults.len()
    );
    let verified = p.down_and_verify(&acked);
    // Figures for docs/reliability.md (cargo test -- --nocapture).
    println!(
        "netns {tag}: {} faults {faults:?}, {losses} connection losses on alpha, {writes} acknowledged writes ({} blocks), \
         longest write wait {max_wait_ms:.0} ms, resyncs {:?}, {} bytes verified, \
         resync bytes total {}",
        faults.len(),
        acked.len(),
        resyncs,
        verified,
        s["resync_bytes_total"]
    );
}

#[test]
fn cut_one_way_each_direction() {
    scenario(
        "oneway",
        1,
        &[Cut::AlphaToBeta, Cut::BetaToAlpha],
        Duration::from_secs(5),
        true,
    );
}

#[test]
fn cut_both_ways() {
    scenario("both", 2, &[Cut::Both], Duration::from_secs(5), true);
}

#[test]
fn flapping_link() {
    let faults = [
        Cut::Both,
        Cut::AlphaToBeta,
        Cut::Both,
        Cut::BetaToAlpha,
        Cut::Both,
        Cut::AlphaToBeta,
    ];
    scenario("flap", 3, &faults, Duration::from_millis(2500), false);
}
