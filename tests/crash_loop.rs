//! Crash loop: kill -9 of the Primary or the Secondary, many times, under protocol C
//! with real `rdbd` processes, a real NBD client writing, and an independent checker
//! reading the backing files.
//!
//! Each cycle kills one node at a seeded random moment while a writer
//! (python3-libnbd) writes 4 KiB blocks of random data through the Primary's NBD
//! socket. The writer logs each write's intent (block, generation, SHA-256) before
//! sending it and its acknowledgement after the server answered.
//!
//! - Primary killed: the Secondary is promoted (`rdbadm primary`) and a new writer
//!   goes on writing on it; the killed node comes back (`rdbadm up`: activity-log
//!   replay, crashed Primary) as Secondary and resyncs from the new Primary while the
//!   writes go on.
//! - Secondary killed: the writer keeps writing on the Primary; the killed node comes
//!   back and resyncs while the writes go on.
//!
//! - In half of the cycles (seeded), a second kill -9 hits the resync that follows:
//!   of the returning SyncTarget, or of the Primary (SyncSource), which is then
//!   restarted and promoted again (its Inconsistent peer cannot take over).
//!
//! After each cycle (writer stopped, both nodes UpToDate with nothing out of sync),
//! the checker reads both backing files: every block's content is one of the writes
//! issued to it (its SHA-256 matches the logged intent), never older than the last
//! acknowledged one, and the two data areas are byte-identical.
//!
//! `RDB_CRASH_CYCLES` (default 5) is the number of cycles of each kind (Primary kill,
//! Secondary kill); `RDB_CRASH_SEED` replays a run (the seed is printed).
//! Full run: `RDB_CRASH_CYCLES=50 cargo test --release -p rdb --test crash_loop -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
/// Blocks the writer writes to (the first 24 MiB: six activity-log extents).
const BLOCKS: u64 = 6144;

/// The writer: random blocks of `BLOCKS`, each `RDBCRASH <block> <gen>|` followed by
/// seeded random bytes; "I b g sha" before the write, "A b g" after its ack. Stops on
/// the first error (the server was killed) or when `stop` exists.
const WRITER: &str = r#"
import sys, nbd, random, hashlib, os
uri, log, blocks, seed, gen, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rng = random.Random(seed)
h = nbd.NBD(); h.connect_uri(uri)
out = open(log, "a", buffering=1)
n = 0
try:
    while not os.path.exists(stop):
        b = rng.randrange(blocks)
        head = b"RDBCRASH %010d %016d|" % (b, gen)
        data = head + rng.randbytes(4096 - len(head))
        out.write("I %d %d %s\n" % (b, gen, hashlib.sha256(data).hexdigest()))
        h.pwrite(data, b * 4096)
        out.write("A %d %d\n" % (b, gen))
        n += 1
        gen += 1
        if n % 64 == 0:
            h.flush()
except Exception as e:
    print("writer stopped: %s" % e, file=sys.stderr)
print(n)
"#;

struct Writer {
    child: Child,
    stop: PathBuf,
}

fn spawn_writer(uri: &str, log: &Path, seed: u64, gen_base: u64, stop: PathBuf) -> Writer {
    let _ = std::fs::remove_file(&stop);
    let child = Command::new("timeout")
        .args([
            "600",
            "/usr/bin/python3",
            "-c",
            WRITER,
            uri,
            &log.display().to_string(),
            &BLOCKS.to_string(),
            &seed.to_string(),
            &gen_base.to_string(),
            &stop.display().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the writer (python3-libnbd)");
    Writer { child, stop }
}

/// Starts the successive writers of one log: each with the next seed and its own
/// range of generations.
struct Writers {
    log: PathBuf,
    stop: PathBuf,
    seed: u64,
    gen_base: u64,
}

impl Writers {
    /// Starts a writer on `primary`'s NBD socket and waits until it has `n` writes
    /// acknowledged (`what`: the failure message).
    fn start(&mut self, c: &Cluster, primary: &str, n: u64, what: &str) -> Writer {
        self.seed += 1;
        let acks_before = read_acks(&self.log);
        let w = spawn_writer(
            &c.nbd_uri(primary),
            &self.log,
            self.seed,
            self.gen_base,
            self.stop.clone(),
        );
        self.gen_base += 10_000_000;
        wait_acks(c, &self.log, acks_before, n, what);
        w
    }
}

impl Writer {
    /// Asks the writer to stop and waits for it; returns its count of acked writes
    /// (0 when it was already stopped).
    fn stop(&mut self) -> u64 {
        let Some(mut out) = self.child.stdout.take() else {
            return 0;
        };
        std::fs::write(&self.stop, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the writer did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut s = String::new();
        use std::io::Read;
        out.read_to_string(&mut s).unwrap();
        s.trim().parse().unwrap_or(0)
    }
}

/// What the log says about every block: the SHA-256 of each generation issued and
/// the last acknowledged generation.
#[derive(Default)]
struct Ledger {
    issued: HashMap<(u64, u64), String>,
    last_acked: HashMap<u64, u64>,
    acked: u64,
}

fn read_ledger(log: &Path) -> Ledger {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut l = Ledger::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["I", b, g, sha] if sha.len() == 64 => {
                l.issued
                    .insert((b.parse().unwrap(), g.parse().unwrap()), sha.to_string());
            }
            ["A", b, g] => {
                let (b, g): (u64, u64) = (b.parse().unwrap(), g.parse().unwrap());
                let e = l.last_acked.entry(b).or_insert(0);
                *e = (*e).max(g);
                l.acked += 1;
            }
            _ => {} // a torn last line (the writer was killed mid-line): no claim
        }
    }
    l
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks one disk against the ledger; returns the number of blocks verified.
fn check_disk(ledger: &Ledger, disk: &[u8], name: &str, cycle: &str) -> u64 {
    let mut verified = 0;
    for b in 0..BLOCKS {
        let blk = &disk[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        let acked = ledger.last_acked.get(&b).copied();
        if blk.iter().all(|&x| x == 0) {
            assert!(
                acked.is_none(),
                "{cycle}: block {b} is zero on {name} but generation {acked:?} was acknowledged"
            );
            continue;
        }
        let head = std::str::from_utf8(&blk[..36]).unwrap_or("");
        let f: Vec<&str> = head.trim_end_matches('|').split(' ').collect();
        assert!(
            f.len() == 3 && f[0] == "RDBCRASH",
            "{cycle}: block {b} on {name} holds no write of ours: {head:?}"
        );
        let (hb, hg): (u64, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(
            hb, b,
            "{cycle}: block {b} on {name} holds block {hb}'s data"
        );
        let sha = ledger.issued.get(&(b, hg)).unwrap_or_else(|| {
            panic!("{cycle}: block {b} on {name}: generation {hg} never issued")
        });
        assert_eq!(
            &sha256_hex(blk),
            sha,
            "{cycle}: block {b} on {name}: generation {hg} torn or corrupt"
        );
        if let Some(a) = acked {
            assert!(
                hg >= a,
                "{cycle}: block {b} on {name} holds generation {hg}, older than the acknowledged {a}: acknowledged write lost"
            );
        }
        verified += 1;
    }
    verified
}

/// [`Cluster::wait_or_dump`] that also keeps both nodes' logs for the post-mortem
/// (the cluster dir is removed).
fn wait_or_dump(c: &Cluster, timeout_s: u64, what: &str, f: impl FnMut() -> bool) {
    let ok = wait_for(Duration::from_secs(timeout_s), f);
    if !ok {
        let keep = format!("/tmp/rdb-crash-loop-failure-{}", std::process::id());
        for n in ["alpha", "beta"] {
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(c.run_dir(n).join("rdbd.log"), format!("{keep}/{n}.log"));
        }
        eprintln!("logs kept in {keep}");
    }
    assert!(ok, "{what} (after {timeout_s} s)\n{}", c.dump());
}

fn kill9(c: &Cluster, node: &str) {
    let pid = std::fs::read_to_string(c.run_dir(node).join("rdbd.pid")).unwrap();
    let pid = pid.trim();
    run_ok(10, "kill", &["-9", pid]);
    // The process is gone (its sockets closed) before we go on.
    assert!(
        wait_for(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "rdbd {pid} of {node} survived kill -9"
    );
}

/// Waits until the writer has `n` more acknowledged writes in the log than `from`.
fn wait_acks(c: &Cluster, log: &Path, from: u64, n: u64, what: &str) {
    wait_or_dump(c, 60, what, || read_acks(log) >= from + n);
}

fn read_acks(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("A "))
        .count() as u64
}

#[test]
fn kill_nine_of_primary_and_secondary_loses_no_acknowledged_write() {
    need_root();
    let cycles: u64 = std::env::var("RDB_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("RDB_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        });
    eprintln!("crash loop: {cycles} cycles of each kind, RDB_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Cluster::with_sections(
        "crashloop",
        "C",
        "64M",
        "ping-int 1; ping-timeout 5; connect-int 1;",
        "frontend none;",
    );
    c.fresh_pair_with_primary();
    let size = c.data_size();

    let log = c.dir.join("writes.log");
    let mut writers = Writers {
        log: log.clone(),
        stop: c.dir.join("writer.stop"),
        seed,
        gen_base: 1,
    };
    let t0 = Instant::now();
    let mut primary = "alpha";
    let mut kills: HashMap<(&str, &str), u64> = HashMap::new();
    let mut resync_kills: HashMap<&str, u64> = HashMap::new();
    let mut bytes_verified = 0u64;
    let mut acked_total;
    // Alternate: even cycles kill the Primary, odd ones the Secondary.
    for cycle in 0..2 * cycles {
        let secondary = if primary == "alpha" { "beta" } else { "alpha" };
        let kill_primary = cycle % 2 == 0;
        let victim = if kill_primary { primary } else { secondary };
        let delay_ms = rng.random_range(50..1500u64);
        let tag = format!(
            "cycle {cycle} (kill -9 of {} {victim} after {delay_ms} ms)",
            if kill_primary { "Primary" } else { "Secondary" }
        );
        let mut w = writers.start(&c, primary, 20, &format!("{tag}: writer never started"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill9(&c, victim);
        *kills
            .entry((victim, if kill_primary { "Primary" } else { "Secondary" }))
            .or_default() += 1;
        let mut w = if kill_primary {
            // The writer fails with the connection; the survivor sees the loss,
            // is promoted and takes the writes.
            w.stop();
            wait_or_dump(
                &c,
                30,
                &format!("{tag}: survivor never lost the peer"),
                || c.status(secondary)["connection"] != "Connected",
            );
            c.adm_ok(secondary, &["primary", "r0"]);
            primary = secondary;
            writers.start(
                &c,
                primary,
                50,
                &format!("{tag}: no writes on the new Primary"),
            )
        } else {
            let a = read_acks(&log);
            wait_acks(&c, &log, a, 50, &format!("{tag}: Primary stopped serving"));
            w
        };
        // The killed node returns as Secondary and resyncs while writes go on.
        c.adm_ok(victim, &["up", "r0"]);
        wait_or_dump(&c, 60, &format!("{tag}: never reconnected"), || {
            let s = c.status(victim);
            s["connection"] != "Connecting" && s["connection"] != "StandAlone"
        });
        // Half of the cycles kill again during that resync (it runs at c-min-rate
        // while the writer writes): the returning SyncTarget, or the Primary
        // (SyncSource), whose Inconsistent peer then waits for it to come back.
        let again = rng.random_range(0..4u32);
        let delay_ms = rng.random_range(0..300u64);
        let (who, state) = match again {
            1 => (victim, "SyncTarget"),
            2 => (primary, "SyncSource"),
            _ => ("", ""),
        };
        let reached = !who.is_empty()
            && wait_for(Duration::from_secs(10), || {
                c.status(who)["connection"] == state
            });
        if !who.is_empty() && !reached {
            eprintln!(
                "{tag}: {who} never {state} in 10 s: {}",
                c.status(who)["connection"]
            );
        }
        if reached {
            std::thread::sleep(Duration::from_millis(delay_ms));
            kill9(&c, who);
            *resync_kills.entry(state).or_default() += 1;
            eprintln!("{tag}: kill -9 of the {state} {who} after {delay_ms} ms of resync");
            if who == primary {
                w.stop();
            }
            c.adm_ok(who, &["up", "r0"]);
            wait_or_dump(&c, 60, &format!("{tag}: {who} never reconnected"), || {
                let s = c.status(who);
                s["connection"] != "Connecting" && s["connection"] != "StandAlone"
            });
            if who == primary {
                // The peer is Inconsistent: only the returned Primary has the data.
                c.adm_ok(primary, &["primary", "r0"]);
                w = writers.start(
                    &c,
                    primary,
                    50,
                    &format!("{tag}: no writes after the second return"),
                );
            }
        }
        let a = read_acks(&log);
        wait_acks(
            &c,
            &log,
            a,
            30,
            &format!("{tag}: no writes after the return"),
        );
        w.stop();
        wait_or_dump(&c, 120, &format!("{tag}: no resync to UpToDate"), || {
            c.in_sync()
        });
        // Independent check of both backing files.
        let ledger = read_ledger(&log);
        acked_total = ledger.acked;
        let da = std::fs::read(c.img("alpha")).unwrap();
        let db = std::fs::read(c.img("beta")).unwrap();
        let va = check_disk(&ledger, &da, "alpha", &tag);
        let vb = check_disk(&ledger, &db, "beta", &tag);
        assert_eq!(va, vb);
        assert!(
            da[..size as usize] == db[..size as usize],
            "{tag}: the data areas differ"
        );
        bytes_verified += 2 * size;
        eprintln!(
            "{tag}: ok, {} acked writes so far, {va} blocks checked per disk, primary now {primary}, {:.1} s",
            acked_total,
            t0.elapsed().as_secs_f64()
        );
    }
    let ledger = read_ledger(&log);
    eprintln!(
        "crash loop done: seed {seed}, {} kills {:?}, {} more during a resync {:?}, {} acknowledged writes, {} bytes of data areas compared, {:.1} s",
        2 * cycles,
        kills,
        resync_kills.values().sum::<u64>(),
        resync_kills,
        ledger.acked,
        bytes_verified,
        t0.elapsed().as_secs_f64()
    );
    for n in ["alpha", "beta"] {
        let _ = c.adm(n, &["secondary", "r0"]);
        c.adm_ok(n, &["down", "r0"]);
    }
}

/// Regression (found by the loop above, seed 404756676): resync chunks in flight
/// when the link died stayed "in flight" on the SyncSource forever, so after a
/// kill -9 of the SyncTarget the next resync skipped their ranges and never finished.
#[test]
fn resync_finishes_after_a_kill_of_the_sync_target_mid_resync() {
    need_root();
    let c = Cluster::with_sections(
        "midresync",
        "C",
        "64M",
        "ping-int 1; ping-timeout 5; connect-int 1;",
        "frontend none;\n    disk { resync-rate 8M; }",
    );
    c.fresh_pair_with_primary();
    let size = c.data_size();
    // 24 MiB written while beta is away: a 3 s resync at 8 MiB/s.
    c.adm_ok("beta", &["disconnect", "r0"]);
    let script = r#"
import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(24):
    h.pwrite(bytes([0x40 + i]) * (1 << 20), i << 20)
h.flush()
"#;
    run_ok(60, "/usr/bin/python3", &["-c", script, &c.nbd_uri("alpha")]);
    c.adm_ok("beta", &["connect", "r0"]);
    wait_or_dump(&c, 30, "no resync started", || {
        let b = c.status("beta");
        b["connection"] == "SyncTarget" && b["resync_bytes_total"].as_u64().unwrap_or(0) >= 4 << 20
    });
    // Stopped first, so that the SyncSource has chunks sent and not acknowledged
    // when the connection dies.
    let pid = std::fs::read_to_string(c.run_dir("beta").join("rdbd.pid")).unwrap();
    run_ok(10, "kill", &["-STOP", pid.trim()]);
    std::thread::sleep(Duration::from_millis(700));
    kill9(&c, "beta");
    c.adm_ok("beta", &["up", "r0"]);
    wait_or_dump(
        &c,
        60,
        "the resync after the SyncTarget's return never finished",
        || c.in_sync(),
    );
    c.adm_ok("alpha", &["secondary", "r0"]);
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["down", "r0"]);
    }
    let (a, b) = (
        std::fs::read(c.img("alpha")).unwrap(),
        std::fs::read(c.img("beta")).unwrap(),
    );
    for i in 0..24usize {
        assert!(
            b[i << 20..(i + 1) << 20]
                .iter()
                .all(|&x| x == 0x40 + i as u8),
            "MiB {i} missing on beta"
        );
    }
    assert!(
        a[..size as usize] == b[..size as usize],
        "data areas differ"
    );
}
