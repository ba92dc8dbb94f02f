//! Shared harness of the integration tests: a throw-away directory with backing
//! files, a DRBD-syntax config for two nodes on loopback, and helpers that run the
//! real `rdbadm` (which starts the real `rdbd`) and real clients.
//!
//! Everything is bounded: every command runs under `timeout`, every wait polls with a
//! deadline, and the `Drop` of [`Cluster`] takes resources down, unmounts, kills
//! leftover daemons and removes the directory even when a test fails.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

mod pair;
pub mod proxy;

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Path of a binary built by this workspace (`rdbd`, `rdbadm`, ...).
pub fn bin(name: &str) -> PathBuf {
    let rdbd = PathBuf::from(env!("CARGO_BIN_EXE_rdbd"));
    let p = rdbd.with_file_name(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (same profile) before the tests",
        p.display()
    );
    p
}

/// Fails the test with an install hint when a tool is missing.
pub fn need(cmd: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{cmd}` is required by this test: apt-get install {package}"
    );
}

/// Fails the test unless running as root.
pub fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "this test needs root (FUSE, loop devices, mount)");
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command under `timeout SECS`, returning its output.
pub fn run(timeout_s: u64, prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(timeout_s.to_string())
        .arg(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a command and asserts it succeeded; returns stdout.
pub fn run_ok(timeout_s: u64, prog: &str, args: &[&str]) -> String {
    let out = run(timeout_s, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 of a file's first `len` bytes (whole file when None).
pub fn sha256_of(path: &Path, len: Option<u64>) -> String {
    let script = match len {
        Some(n) => format!("head -c {n} '{}' | sha256sum", path.display()),
        None => format!("sha256sum < '{}'", path.display()),
    };
    let out = run_ok(120, "sh", &["-c", &script]);
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The arguments of `qemu-img convert` copying the raw image `from` to the raw
/// image `to` (each a file or an NBD URI); `into_existing` (`-n`): `to` exists
/// and is written in place (an NBD export).
pub fn qemu_img_convert_args<'a>(from: &'a str, to: &'a str, into_existing: bool) -> Vec<&'a str> {
    let mut args = vec!["convert"];
    if into_existing {
        args.push("-n");
    }
    args.extend(["-f", "raw", "-O", "raw", from, to]);
    args
}

/// Runs `qemu-img convert` (see [`qemu_img_convert_args`]) with a 120 s deadline.
pub fn qemu_img_convert(from: &str, to: &str, into_existing: bool) {
    run_ok(
        120,
        "qemu-img",
        &qemu_img_convert_args(from, to, into_existing),
    );
}

/// The address `node`'s section of the config text `conf` names.
pub fn address_of(conf: &str, node: &str) -> SocketAddr {
    let start = conf.find(&format!("on {node}")).unwrap();
    let line = conf[start..]
        .lines()
        .find(|l| l.contains("address"))
        .unwrap();
    line.trim()
        .trim_start_matches("address")
        .trim()
        .trim_end_matches(';')
        .parse()
        .unwrap()
}

/// Creates the sparse file `name` of `size_bytes` in `dir`.
pub fn sparse(dir: &Path, name: &str, size_bytes: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size_bytes).unwrap();
    path
}

/// `len` bytes of a file at `offset`, read with `pread`.
pub fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Writes `buf` into a file at `offset` with `pwrite`.
pub fn write_bytes(path: &Path, offset: u64, buf: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(buf, offset).unwrap();
}

/// fio arguments: job `name` writes 48 MiB in 4 KiB random writes at queue depth 16
/// through the NBD `uri`, then verifies them (crc32c, failing at the first
/// mismatch); `output` is fio's output option (e.g. `--output=/dev/null`).
pub fn fio_verify_48m_args(name: &str, uri: &str, output: &str) -> Vec<String> {
    [
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=48M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        output,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A test directory with two nodes' backing files and a config.
pub struct Cluster {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// The config file.
    pub conf: PathBuf,
    /// The device path configured for the resource.
    pub device: PathBuf,
    /// Resource name.
    pub res: String,
}

/// Two distinct free TCP ports (both listeners are held until both are picked, so the
/// kernel cannot hand the same port out twice).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    (
        a.local_addr().expect("local addr").port(),
        b.local_addr().expect("local addr").port(),
    )
}

impl Cluster {
    /// A cluster of `alpha` and `beta` with `size` backing files (e.g. "256M"),
    /// the given protocol and extra `net { }` lines.
    pub fn new(tag: &str, protocol: &str, size: &str, extra_net: &str) -> Cluster {
        Cluster::with_sections(tag, protocol, size, extra_net, "")
    }

    /// Like [`Cluster::new`], with more sections inside the resource (e.g.
    /// `disk { ... }`, `handlers { ... }`, `startup { ... }`).
    pub fn with_sections(
        tag: &str,
        protocol: &str,
        size: &str,
        extra_net: &str,
        extra_resource: &str,
    ) -> Cluster {
        let dir = PathBuf::from(format!(
            "/tmp/rdb-test-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        for n in ["alpha", "beta"] {
            run_ok(
                10,
                "truncate",
                &[
                    "-s",
                    size,
                    &dir.join(format!("{n}.img")).display().to_string(),
                ],
            );
        }
        let device = PathBuf::from(format!("/dev/rdb-test-{tag}-{}", std::process::id()));
        let (pa, pb) = free_ports();
        let conf = dir.join("rdb.conf");
        let text = format!(
            "resource r0 {{\n    device {dev};\n    flexible-meta-disk internal;\n    {extra_resource}\n    net {{\n        protocol {protocol};\n        {extra_net}\n    }}\n    on alpha {{\n        disk {d}/alpha.img;\n        address 127.0.0.1:{pa};\n    }}\n    on beta {{\n        disk {d}/beta.img;\n        address 127.0.0.1:{pb};\n    }}\n}}\n",
            dev = device.display(),
            d = dir.display(),
        );
        std::fs::write(&conf, text).expect("write config");
        Cluster {
            dir,
            conf,
            device,
            res: "r0".into(),
        }
    }

    /// The run dir of a node.
    pub fn run_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("run-{node}"))
    }

    /// The backing file of a node.
    pub fn img(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.img"))
    }

    /// Runs `rdbadm` for a node.
    pub fn adm(&self, node: &str, args: &[&str]) -> Output {
        self.adm_with(node, &self.conf, args)
    }

    /// Runs `rdbadm` for `node` with another configuration file (a node whose
    /// settings differ from its peer's).
    pub fn adm_with(&self, node: &str, conf: &std::path::Path, args: &[&str]) -> Output {
        let run_dir = self.run_dir(node);
        std::fs::create_dir_all(&run_dir).expect("create run dir");
        let mut full: Vec<String> = vec![
            "-c".into(),
            conf.display().to_string(),
            "--node".into(),
            node.into(),
            "--run-dir".into(),
            run_dir.display().to_string(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        run(120, &bin("rdbadm").display().to_string(), &refs)
    }

    /// Runs `rdbadm` and asserts success; returns stdout.
    pub fn adm_ok(&self, node: &str, args: &[&str]) -> String {
        self.adm_with_ok(node, &self.conf, args)
    }

    /// [`Cluster::adm_with`] asserting success; returns stdout.
    pub fn adm_with_ok(&self, node: &str, conf: &std::path::Path, args: &[&str]) -> String {
        let out = self.adm_with(node, conf, args);
        assert!(
            out.status.success(),
            "rdbadm {args:?} on {node} failed:\nstdout: {}\nstderr: {}\nrdbd log tail:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(node)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last lines of a node's rdbd log.
    pub fn log_tail(&self, node: &str) -> String {
        let log = std::fs::read_to_string(self.run_dir(node).join("rdbd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `status --json` of r0 on a node.
    pub fn status(&self, node: &str) -> serde_json::Value {
        let out = self.adm_ok(node, &["status", "r0", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
        v["resources"][0].clone()
    }

    /// NBD URI of a node's export.
    pub fn nbd_uri(&self, node: &str) -> String {
        format!(
            "nbd+unix:///r0?socket={}/r0.nbd",
            self.run_dir(node).display()
        )
    }

    fn cleanup(&self) {
        for n in ["alpha", "beta"] {
            if self.run_dir(n).exists() {
                let _ = self.adm(n, &["down", "all"]);
            }
        }
        // Unmount anything left under the directory (deepest first).
        if let Ok(out) = Command::new("findmnt")
            .args(["-rn", "-o", "TARGET"])
            .output()
        {
            let mut mounts: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|m| m.starts_with(&self.dir.display().to_string()))
                .map(|s| s.to_string())
                .collect();
            mounts.sort();
            for m in mounts.iter().rev() {
                let _ = Command::new("umount").args(["-l", m]).output();
            }
        }
        // Kill daemons whose run dir is ours.
        if let Ok(out) = Command::new("pgrep").args(["-x", "rdbd"]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&self.dir.display().to_string()) {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
        }
        // Loop devices whose backing file lives under our directory.
        if let Ok(out) = Command::new("losetup")
            .args(["-nO", "NAME,BACK-FILE"])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut it = line.split_whitespace();
                if let (Some(dev), Some(back)) = (it.next(), it.next()) {
                    if back.starts_with(&self.dir.display().to_string()) {
                        let _ = Command::new("losetup").args(["-d", dev]).output();
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&self.device);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t % 1_000_000
}

/// Starts a writer (python3-libnbd) that writes `blocks` distinct 4 KiB blocks in a
/// seeded random order to `uri`, each tagged `BLOCK:GENERATION|`, and appends
/// "BLOCK GENERATION" to `log` only after the server acknowledged the write.
pub fn spawn_acked_writer(uri: &str, log: &Path, blocks: u32, seed: u32) -> std::process::Child {
    let writer = r#"
import sys, nbd, random
h = nbd.NBD(); h.connect_uri(sys.argv[1])
log = open(sys.argv[2], "w", buffering=1)
blocks = list(range(0, int(sys.argv[3]))); random.Random(int(sys.argv[4])).shuffle(blocks)
for gen, b in enumerate(blocks):
    tag = (b"%010d:%010d|" % (b, gen + 1)) * 186
    h.pwrite(tag[:4096].ljust(4096, b"."), b * 4096)
    log.write("%d %d\n" % (b, gen + 1))
"#;
    Command::new("timeout")
        .args([
            "120",
            "/usr/bin/python3",
            "-c",
            writer,
            uri,
            &log.display().to_string(),
            &blocks.to_string(),
            &seed.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the acknowledged-write writer (python3-libnbd)")
}

/// Number of acknowledged writes logged so far by [`spawn_acked_writer`].
pub fn acked_count(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |s| s.lines().count())
}

/// Checks that every write logged by [`spawn_acked_writer`] is on `disk` (the
/// backing file's bytes, read independently of rdb); returns how many were checked.
pub fn check_acked_writes(log: &Path, disk: &[u8], name: &str) -> usize {
    let acked = std::fs::read_to_string(log).expect("read the acknowledged-write log");
    let mut checked = 0;
    for line in acked.lines() {
        let mut it = line.split_whitespace();
        let (Some(b), Some(g)) = (it.next(), it.next()) else {
            continue; // a torn last line of the log itself
        };
        let (Ok(b), Ok(g)) = (b.parse::<usize>(), g.parse::<u64>()) else {
            continue;
        };
        let want = format!("{b:010}:{g:010}|");
        assert_eq!(
            &disk[b * 4096..b * 4096 + want.len()],
            want.as_bytes(),
            "acknowledged write of block {b} (gen {g}) missing on {name}"
        );
        checked += 1;
    }
    checked
}
