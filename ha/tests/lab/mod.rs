//! A two-node lab in network namespaces for the end-to-end tests and the failover
//! benchmark: `<p>sw` holds the bridges, `<p>n1` and `<p>n2` the cluster nodes (eth0 on
//! br0: clients, heartbeats and rdb replication; eth1 on br1: a second heartbeat
//! link), `<p>cl` the client. Each node runs the real `rdbd` (started by `rdbadm up`
//! inside its namespace) and the real `rdb-ha`; the resource group is the seed 003 one
//! (IPaddr, drbddisk, Filesystem ext4, a web server, MailTo). `ip netns exec` gives every
//! process it starts its own mount namespace, so rdbd's FUSE mount and the ext4 mount
//! made by rdb-ha live in private namespaces that vanish with their processes; paths
//! (device symlink, mount point) are still per node because /tmp is shared.
//!
//! Everything is torn down by `Drop` (processes of the namespaces killed by pid, loop
//! devices the nodes used detached, namespaces deleted, directory removed), and
//! leftovers of an earlier run with the same tag are removed at start.

#![allow(dead_code)] // each test binary uses a part of the lab

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The rdb resource name of the seed (`resource webstore`).
pub const RES: &str = "webstore";
/// Port of the web server behind the cluster IP.
pub const HTTP_PORT: u16 = 8080;

/// The rdb-ha binary under test.
pub fn rdb_ha_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rdb-ha"))
}

/// A binary of the workspace next to rdb-ha (rdbadm, rdbd).
pub fn sibling_bin(name: &str) -> PathBuf {
    let p = rdb_ha_bin()
        .parent()
        .map(|d| d.join(name))
        .unwrap_or_default();
    assert!(
        p.exists(),
        "{} missing: build the workspace first (cargo build --release)",
        p.display()
    );
    p
}

/// Fails with a message naming the package when a tool is missing.
pub fn need(cmd: &str, package: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{cmd} not found: install the Debian package {package} (scripts/deps.sh)"
    );
}

/// Runs a command with a time bound; returns its output.
pub fn run(timeout_s: u64, prog: &str, args: &[&str]) -> Output {
    let mut child = Command::new("timeout")
        .arg("-k")
        .arg("2")
        .arg(timeout_s.to_string())
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut err);
    }
    let status = child.wait().expect("wait");
    Output {
        status,
        stdout: out,
        stderr: err,
    }
}

/// Runs a command and asserts success; returns stdout.
pub fn run_ok(timeout_s: u64, prog: &str, args: &[&str]) -> String {
    let o = run(timeout_s, prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Enters the network namespace `ns` (this thread only).
pub fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on an open namespace file; only the calling thread changes.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// One HTTP answer: who served it (`X-Served-By`) and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Node that served the page.
    pub node: String,
    /// Body.
    pub body: String,
}

/// `GET http://addr/` with an overall timeout (HTTP/1.0, one connection per request).
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Result<Page, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    let left = timeout
        .checked_sub(start.elapsed())
        .unwrap_or(Duration::from_millis(1))
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "status {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    let node = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Served-By: "))
        .unwrap_or("?")
        .trim()
        .to_owned();
    Ok(Page {
        node,
        body: body.to_owned(),
    })
}

/// One probe result.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent.
    pub at: Instant,
    /// The answer.
    pub page: Result<Page, String>,
}

/// A client probing `GET http://VIP:8080/` every 50 ms with a 200 ms timeout from its
/// namespace (the reference method of /work/shared/reference.md).
pub struct Probe {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Starts probing `vip:8080` from namespace `ns`.
    pub fn start(ns: &str, vip: &str) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let addr: SocketAddr = format!("{vip}:{HTTP_PORT}").parse().expect("vip");
        let (st, sa, ns) = (stop.clone(), samples.clone(), ns.to_owned());
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            while !st.load(Ordering::Relaxed) {
                let at = Instant::now();
                let page = http_get(addr, Duration::from_millis(200));
                sa.lock().expect("samples").push(Sample { at, page });
                let next = at + Duration::from_millis(50);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        });
        Probe {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// A copy of the samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// The last sample, if any.
    pub fn last(&self) -> Option<Sample> {
        self.samples.lock().expect("samples").last().cloned()
    }

    /// Stops the probe and returns every sample.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Failover seen by the client: last success from `from` (after `since`) to the first
/// success from `to` after it. Returns (outage, failed requests in between).
pub fn outage(
    samples: &[Sample],
    since: Instant,
    from: &str,
    to: &str,
) -> Option<(Duration, usize)> {
    let first_to = samples
        .iter()
        .position(|s| s.at >= since && s.page.as_ref().is_ok_and(|p| p.node == to))?;
    let last_from = samples[..first_to]
        .iter()
        .rposition(|s| s.page.as_ref().is_ok_and(|p| p.node == from))?;
    let failed = samples[last_from + 1..first_to]
        .iter()
        .filter(|s| s.page.is_err())
        .count();
    Some((
        samples[first_to].at.duration_since(samples[last_from].at),
        failed,
    ))
}

/// Heartbeat timings written into ha.cf.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// `keepalive`.
    pub keepalive: &'static str,
    /// `deadtime`.
    pub deadtime: &'static str,
    /// `warntime`.
    pub warntime: &'static str,
    /// `initdead`.
    pub initdead: &'static str,
}

/// The seed's timings (keepalive 2, deadtime 10, warntime 6, initdead 60).
pub const SEED: Timings = Timings {
    keepalive: "2",
    deadtime: "10",
    warntime: "6",
    initdead: "60",
};

/// Sub-second timings (keepalive 100ms, deadtime 500ms).
pub const FAST: Timings = Timings {
    keepalive: "100ms",
    deadtime: "500ms",
    warntime: "300ms",
    initdead: "5",
};

/// Sub-second heartbeats with a deadtime that a loaded CI machine does not trip by
/// accident (keepalive 200ms, deadtime 1500ms).
pub const MID: Timings = Timings {
    keepalive: "200ms",
    deadtime: "1500ms",
    warntime: "1s",
    initdead: "5",
};

/// What the lab's ha.cf and haresources contain beyond the seed.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Heartbeat timings.
    pub t: Timings,
    /// `auto_failback on|off`.
    pub auto_failback: bool,
    /// A second heartbeat link on eth1 (`ucast eth1 PEER`).
    pub second_link: bool,
    /// `ping CLIENT` tie-breaker.
    pub ping_client: bool,
    /// Health check of the web server (`check web http ...`).
    pub http_check: bool,
    /// rdb `net { ping-int; ping-timeout }` for fast loss detection of a silent peer.
    pub rdb_fast_ping: bool,
    /// The seed's authkeys verbatim (`3 md5 azerty`, accepted with a warning);
    /// otherwise `3 sha256` with a longer key.
    pub seed_authkeys: bool,
}

/// A node of the lab.
pub struct Node {
    /// `node1` / `node2`.
    pub name: String,
    /// Namespace.
    pub ns: String,
    /// Address on eth0.
    pub ip: String,
    /// Address on eth1.
    pub ip1: String,
    /// Its ha.d directory.
    pub ha_dir: PathBuf,
    /// rdb-ha run dir.
    pub ha_run: PathBuf,
    /// rdbd run dir.
    pub rdb_run: PathBuf,
    /// Device symlink path of its rdb device.
    pub device: PathBuf,
    /// Mount point of the Filesystem resource.
    pub mnt: PathBuf,
    /// rdb-ha log.
    pub log: PathBuf,
    /// The running rdb-ha (`ip netns exec` execs it: same pid).
    pub ha: Option<Child>,
}

/// The lab.
pub struct Lab {
    /// Namespace prefix.
    pub p: String,
    /// Test directory.
    pub dir: PathBuf,
    /// First three octets of the eth0 subnet.
    pub net: String,
    /// First three octets of the eth1 subnet.
    pub net1: String,
    /// The cluster IP.
    pub vip: String,
    /// rdb config file.
    pub rdb_conf: PathBuf,
    /// Nodes.
    pub n: [Node; 2],
    /// Loop devices the nodes' device symlinks pointed to (detached at teardown).
    pub loops: Mutex<Vec<String>>,
    /// FUSE connections of the nodes' rdbd (aborted after a kill -9, see
    /// [`abort_fuse`]).
    pub fuse_conns: Mutex<Vec<u64>>,
    /// Options.
    pub o: Opts,
}

fn sh(cmd: &str) -> Output {
    run(30, "sh", &["-c", cmd])
}

fn sh_ok(cmd: &str) -> String {
    run_ok(30, "sh", &["-c", cmd])
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The client's namespace name.
pub fn client_ns(p: &str) -> String {
    format!("{p}cl")
}

/// Removes what a previous run with prefix `p` / directory prefix left.
fn cleanup_leftovers(p: &str, dir_prefix: &str) {
    let list = sh("ip netns list").stdout;
    for l in String::from_utf8_lossy(&list).lines() {
        let name = l.split_whitespace().next().unwrap_or_default();
        if name.starts_with(p) && name.len() == p.len() + 2 {
            kill_netns_pids(name);
            let _ = sh(&format!("ip netns del {name}"));
        }
    }
    // Mounts and loop devices under stale directories, then the directories.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for l in mounts.lines() {
        if let Some(t) = l.split(' ').nth(4) {
            if t.starts_with(dir_prefix) {
                let _ = sh(&format!("umount -l {t}"));
            }
        }
    }
    let loops = sh("losetup -l -n -O NAME,BACK-FILE").stdout;
    for l in String::from_utf8_lossy(&loops).lines() {
        let mut it = l.split_whitespace();
        if let (Some(dev), Some(back)) = (it.next(), it.next()) {
            if back.starts_with(dir_prefix) {
                let _ = sh(&format!("losetup -d {dev}"));
            }
        }
    }
    if let Some(parent) = Path::new(dir_prefix).parent() {
        let base = Path::new(dir_prefix)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(rd) = std::fs::read_dir(parent) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&base) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// Aborts FUSE connections (by number) of rdbd processes this lab killed.
///
/// Workaround of an rdbd bug: after kill -9, rdbd's exit can hang forever in
/// `fuse_flush` (closing an fd on a file of its own FUSE mount, whose server is the
/// dying process itself): the zombie keeps its listening socket and the loop device
/// stays bound. Aborting the connection (fusectl, mounted in a private mount
/// namespace) lets it finish. Only numbers recorded from our own rdbd are aborted.
pub fn abort_fuse(conns: &[u64]) {
    if conns.is_empty() {
        return;
    }
    let mut cmd = String::from("mount -t fusectl none /sys/fs/fuse/connections || exit 1\n");
    for c in conns {
        cmd += &format!(
            "[ -e /sys/fs/fuse/connections/{c}/abort ] && echo 1 > /sys/fs/fuse/connections/{c}/abort\n"
        );
    }
    cmd += "exit 0\n";
    let _ = run(10, "unshare", &["--mount", "sh", "-c", &cmd]);
}

/// Kills (SIGKILL, by pid) every process of namespace `ns` and waits for them.
pub fn kill_netns_pids(ns: &str) {
    for _ in 0..50 {
        let out = sh(&format!("ip netns pids {ns}")).stdout;
        let pids: Vec<i32> = String::from_utf8_lossy(&out)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) of a process in a namespace this test created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const WEB_PY: &str = r#"# Test web server: python's http.server serving DIR on PORT, naming the node in
# an X-Served-By header; writes READY once listening.
import functools, http.server, sys
d, port, node, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
class H(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("X-Served-By", node)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), functools.partial(H, directory=d))
open(ready, "w").close()
srv.serve_forever()
"#;

impl Lab {
    /// Builds the namespaces, the rdb pair (created, synced, ext4 with a first page,
    /// both Secondary) and the ha.d directories of both nodes. `k` picks the subnets
    /// (10.231.k.0/24 and 10.232.k.0/24); `tag` names namespaces and the directory.
    pub fn new(tag: &str, k: u8, o: Opts) -> Lab {
        assert_eq!(
            // SAFETY: geteuid(2) has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "the netns tests need root"
        );
        for (c, p) in [
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("mkfs.ext4", "e2fsprogs"),
            ("fsck", "util-linux"),
            ("losetup", "util-linux"),
            ("nsenter", "util-linux"),
            ("fuser", "psmisc"),
            ("fusermount3", "fuse3"),
            ("/usr/bin/python3", "python3"),
        ] {
            need(c, p);
        }
        let p = format!("rha{tag}");
        let dir_prefix = format!("/tmp/rdb-ha-e2e-{tag}-");
        cleanup_leftovers(&p, &dir_prefix);
        let dir = PathBuf::from(format!("{dir_prefix}{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        let net = format!("10.231.{k}");
        let net1 = format!("10.232.{k}");
        let mk = |i: usize| {
            let name = format!("node{}", i + 1);
            let nd = dir.join(&name);
            Node {
                ns: format!("{p}n{}", i + 1),
                ip: format!("{net}.{}", i + 1),
                ip1: format!("{net1}.{}", i + 1),
                ha_dir: nd.join("ha.d"),
                ha_run: nd.join("run-ha"),
                rdb_run: nd.join("run-rdb"),
                device: nd.join("drbd0"),
                mnt: nd.join("webstore"),
                log: nd.join("rdb-ha.log"),
                ha: None,
                name,
            }
        };
        let lab = Lab {
            vip: format!("{net}.100"),
            rdb_conf: dir.join("rdb.conf"),
            n: [mk(0), mk(1)],
            p,
            dir,
            net,
            net1,
            loops: Mutex::new(Vec::new()),
            fuse_conns: Mutex::new(Vec::new()),
            o,
        };
        lab.network();
        lab.rdb_setup();
        for i in 0..2 {
            lab.ha_files(i);
        }
        lab
    }

    fn network(&self) {
        let p = &self.p;
        let sw = format!("{p}sw");
        let mut s = format!(
            "set -e\nip netns add {sw}\nip -n {sw} link set lo up\n\
             ip -n {sw} link add br0 type bridge\nip -n {sw} link set br0 up\n\
             ip -n {sw} link add br1 type bridge\nip -n {sw} link set br1 up\n"
        );
        let members = [
            (
                "n1",
                format!("{}.1", self.net),
                Some(format!("{}.1", self.net1)),
            ),
            (
                "n2",
                format!("{}.2", self.net),
                Some(format!("{}.2", self.net1)),
            ),
            ("cl", format!("{}.3", self.net), None),
        ];
        for (m, ip, ip1) in members {
            let ns = format!("{p}{m}");
            s += &format!(
                "ip netns add {ns}\nip -n {ns} link set lo up\n\
                 ip link add {p}{m}0 netns {ns} type veth peer name {m}e0 netns {sw}\n\
                 ip -n {ns} link set {p}{m}0 name eth0\n\
                 ip -n {sw} link set {m}e0 master br0 up\n\
                 ip -n {ns} addr add {ip}/24 dev eth0\nip -n {ns} link set eth0 up\n"
            );
            if let Some(ip1) = ip1 {
                s += &format!(
                    "ip link add {p}{m}1 netns {ns} type veth peer name {m}e1 netns {sw}\n\
                     ip -n {ns} link set {p}{m}1 name eth1\n\
                     ip -n {sw} link set {m}e1 master br1 up\n\
                     ip -n {ns} addr add {ip1}/24 dev eth1\nip -n {ns} link set eth1 up\n"
                );
            }
        }
        sh_ok(&s);
        // The bridge learns addresses at once (no STP delay: forward_delay only
        // applies with STP on, which is off by default).
    }

    /// `rdbadm` for node `i`, run inside its namespace (so `up` starts rdbd there).
    pub fn adm(&self, i: usize, args: &[&str]) -> Output {
        let n = &self.n[i];
        let adm = sibling_bin("rdbadm").display().to_string();
        let conf = self.rdb_conf.display().to_string();
        let run_dir = n.rdb_run.display().to_string();
        let mut a = vec![
            "netns",
            "exec",
            &n.ns,
            &adm,
            "-c",
            &conf,
            "--node",
            &n.name,
            "--run-dir",
            &run_dir,
        ];
        a.extend_from_slice(args);
        let o = run(60, "ip", &a);
        self.note_loop(i);
        o
    }

    /// `rdbadm` for node `i`, asserting success.
    pub fn adm_ok(&self, i: usize, args: &[&str]) -> String {
        let o = self.adm(i, args);
        assert!(
            o.status.success(),
            "rdbadm {args:?} on {} failed:\n{}\n{}\nrdbd log:\n{}",
            self.n[i].name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.rdbd_log_tail(i)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The pid of node `i`'s rdbd (from its pid file).
    pub fn rdbd_pid(&self, i: usize) -> Option<i32> {
        std::fs::read_to_string(self.n[i].rdb_run.join("rdbd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Remembers the FUSE connection of node `i`'s rdbd (its mount lives in rdbd's
    /// mount namespace: seen through /proc/PID/root).
    pub fn note_fuse(&self, i: usize) {
        use std::os::unix::fs::MetadataExt;
        let Some(pid) = self.rdbd_pid(i) else {
            return;
        };
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let base = self.n[i].rdb_run.join("fuse");
        let rel = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let (Ok(parent), Ok(m)) = (
            std::fs::metadata(rel(&base)),
            std::fs::metadata(rel(&base.join(RES))),
        ) else {
            return;
        };
        let (maj, min) = (libc::major(m.dev()), libc::minor(m.dev()));
        if maj == 0 && m.dev() != parent.dev() {
            let mut c = self.fuse_conns.lock().expect("conns");
            if !c.contains(&u64::from(min)) {
                c.push(u64::from(min));
            }
        }
    }

    /// Remembers the loop device node `i`'s device symlink points to.
    pub fn note_loop(&self, i: usize) {
        self.note_fuse(i);
        if let Ok(t) = std::fs::read_link(&self.n[i].device) {
            let t = t.display().to_string();
            let mut l = self.loops.lock().expect("loops");
            if !l.contains(&t) {
                l.push(t);
            }
        }
    }

    /// rdb status (`status --json`, first resource) of node `i` (null if rdbd is down).
    pub fn rdb(&self, i: usize) -> serde_json::Value {
        let o = self.adm(i, &["status", RES, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .map(|v| v["resources"][0].clone())
            .unwrap_or_default()
    }

    /// True when node `i`'s rdb is connected, both disks UpToDate.
    pub fn rdb_in_sync(&self, i: usize) -> bool {
        let s = self.rdb(i);
        s["connection"] == "Connected" && s["disk"] == "UpToDate" && s["peer_disk"] == "UpToDate"
    }

    /// The last lines of node `i`'s rdbd log.
    pub fn rdbd_log_tail(&self, i: usize) -> String {
        let t = std::fs::read_to_string(self.n[i].rdb_run.join("rdbd.log")).unwrap_or_default();
        let l: Vec<&str> = t.lines().collect();
        l[l.len().saturating_sub(25)..].join("\n")
    }

    fn rdb_setup(&self) {
        let fast = if self.o.rdb_fast_ping {
            "\n        ping-int 1;\n        ping-timeout 5;\n        timeout 5;"
        } else {
            ""
        };
        // The seed's drbd config (global_common startup section, resource webstore with
        // internal meta-data, syncer rate), with this lab's paths and addresses.
        let mut conf = format!(
            "common {{\n    startup {{\n        wfc-timeout 1;\n        degr-wfc-timeout 1;\n    }}\n}}\n\
             resource webstore {{\n    flexible-meta-disk internal;\n    net {{\n        protocol C;{fast}\n    }}\n"
        );
        for n in &self.n {
            std::fs::create_dir_all(&n.mnt).expect("mnt");
            std::fs::create_dir_all(&n.rdb_run).expect("run");
            let img = n.device.with_file_name("sdb1.img");
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(64 << 20))
                .expect("backing file");
            conf += &format!(
                "    on {} {{\n        device {};\n        disk {};\n        address {}:7788;\n    }}\n",
                n.name,
                n.device.display(),
                img.display(),
                n.ip
            );
        }
        conf += "    syncer {\n        rate 500M;\n    }\n}\n";
        std::fs::write(&self.rdb_conf, conf).expect("rdb.conf");
        for i in 0..2 {
            self.adm_ok(i, &["create-md", RES]);
            self.adm_ok(i, &["up", RES]);
        }
        self.adm_ok(0, &["primary", "--force", RES]);
        assert!(
            wait_for(Duration::from_secs(60), || self.rdb_in_sync(0)),
            "initial sync did not finish: {}\n{}",
            self.rdb(0),
            self.rdbd_log_tail(0)
        );
        let dev = self.n[0].device.display().to_string();
        run_ok(60, "mkfs.ext4", &["-q", "-F", &dev]);
        // The first page, written through a mount inside node1's namespace.
        let m = self.n[0].mnt.display().to_string();
        run_ok(
            60,
            "ip",
            &[
                "netns",
                "exec",
                &self.n[0].ns,
                "sh",
                "-c",
                &format!(
                    "mount -t ext4 {dev} {m} && echo 'THOLDI webstore v0' > {m}/index.html && sync && umount {m}"
                ),
            ],
        );
        self.adm_ok(0, &["secondary", RES]);
    }

    /// The adapted seed ha.cf of node `i`.
    pub fn ha_cf(&self, i: usize) -> String {
        let n = &self.n[i];
        let peer = &self.n[1 - i];
        let t = self.o.t;
        // Seed 003 ha.cf, in its order; names, paths and timings adapted.
        let mut cf = format!(
            "bcast          eth0\n\
             debugfile      {d}/ha-debug\n\
             logfile        {d}/ha-log\n\
             logfacility    none\n\
             keepalive     {}\n\
             deadtime      {}\n\
             warntime      {}\n\
             initdead      {}\n\
             udpport       694\n\
             node          node1\n\
             node          node2\n\
             auto_failback {}\n",
            t.keepalive,
            t.deadtime,
            t.warntime,
            t.initdead,
            if self.o.auto_failback { "on" } else { "off" },
            d = n.ha_dir.display(),
        );
        if self.o.second_link {
            cf += &format!("ucast          eth1 {}\n", peer.ip1);
        }
        if self.o.ping_client {
            cf += &format!("ping           {}.3\n", self.net);
        }
        if self.o.http_check {
            cf += &format!(
                "check web http http://127.0.0.1:{HTTP_PORT}/ interval 200ms timeout 200ms fall 2 rise 1\n"
            );
        }
        cf
    }

    fn ha_files(&self, i: usize) {
        let n = &self.n[i];
        let rd = n.ha_dir.join("resource.d");
        std::fs::create_dir_all(&rd).expect("ha.d");
        std::fs::create_dir_all(&n.ha_run).expect("run");
        std::fs::write(n.ha_dir.join("ha.cf"), self.ha_cf(i)).expect("ha.cf");
        // Seed 003 haresources (step 25 and the MailTo line of step 14), adapted: the
        // cluster IP, this node's device and mount point, the web server's name.
        std::fs::write(
            n.ha_dir.join("haresources"),
            format!(
                "node1 IPaddr::{vip}/24/eth0:0 drbddisk::webstore Filesystem::{dev}::{mnt}:ext4 httpd\n\
                 node1 MailTo::sip@tholdi.com\n",
                vip = self.vip,
                dev = n.device.display(),
                mnt = n.mnt.display()
            ),
        )
        .expect("haresources");
        // Seed authkeys ("auth 3 / 3 md5 azerty"), or the same index with sha256.
        let ak = n.ha_dir.join("authkeys");
        let keys = if self.o.seed_authkeys {
            "auth 3\n3 md5 azerty\n"
        } else {
            "auth 3\n3 sha256 azerty-tholdi-lab\n"
        };
        std::fs::write(&ak, keys).expect("authkeys");
        std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let web = n.ha_dir.join("web.py");
        std::fs::write(&web, WEB_PY).expect("web.py");
        let run = n.ha_run.display();
        let fail = self.fail_flag(i).display().to_string();
        write_exec(
            &rd.join("httpd"),
            &format!(
                "#!/bin/sh\n# LSB-style web server script (start|stop|status) for the test.\n\
                 PID={run}/httpd.pid; READY={run}/httpd.ready\n\
                 alive() {{ [ -f $PID ] && kill -0 $(cat $PID) 2>/dev/null; }}\n\
                 case \"$1\" in\n\
                 start)\n  [ -e {fail} ] && {{ echo 'httpd: cannot start (test failure flag)' >&2; exit 1; }}\n\
                 \x20 alive && exit 0\n  rm -f $READY\n\
                 \x20 setsid /usr/bin/python3 {web} {mnt} {HTTP_PORT} {name} $READY >>{run}/httpd.log 2>&1 </dev/null &\n\
                 \x20 echo $! > $PID\n\
                 \x20 i=0; while [ ! -e $READY ]; do i=$((i+1)); [ $i -gt 500 ] && exit 1; alive || exit 1; sleep 0.01; done ;;\n\
                 stop)\n  alive && kill $(cat $PID)\n\
                 \x20 i=0; while alive; do i=$((i+1)); [ $i -gt 500 ] && exit 1; sleep 0.01; done; rm -f $PID ;;\n\
                 status) alive ;;\n\
                 *) exit 2 ;;\nesac\n",
                web = web.display(),
                mnt = n.mnt.display(),
                name = n.name,
            ),
        );
        write_exec(
            &n.ha_dir.join("sendmail"),
            &format!("#!/bin/sh\ncat >> {}/mail\n", n.ha_dir.display()),
        );
    }

    /// The file that makes node `i`'s httpd start fail.
    pub fn fail_flag(&self, i: usize) -> PathBuf {
        self.n[i].ha_dir.join("httpd.fail")
    }

    /// Starts rdb-ha on node `i` inside its namespace.
    pub fn start_ha(&mut self, i: usize) {
        let adm = sibling_bin("rdbadm");
        let n = &mut self.n[i];
        assert!(n.ha.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(rdb_ha_bin())
            .args(["run", "--node", &n.name])
            .arg("--config-dir")
            .arg(&n.ha_dir)
            .arg("--run-dir")
            .arg(&n.ha_run)
            .arg("--rdbadm")
            .arg(&adm)
            .arg("--sendmail")
            .arg(n.ha_dir.join("sendmail"))
            .args(["--resource-timeout-ms", "20000"])
            .env("RDB_CONFIG", &self.rdb_conf)
            .env("RDB_NODE", &n.name)
            .env("RDB_RUN_DIR", &n.rdb_run)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn rdb-ha");
        n.ha = Some(child);
    }

    /// rdb-ha status file of node `i`.
    pub fn ha_status(&self, i: usize) -> serde_json::Value {
        std::fs::read_to_string(self.n[i].ha_run.join("rdb-ha.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// `rdb-ha CMD --run-dir` of node `i` (standby, takeover, status --json).
    pub fn ha_cmd(&self, i: usize, args: &[&str]) -> String {
        let bin = rdb_ha_bin().display().to_string();
        let run_dir = self.n[i].ha_run.display().to_string();
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["--run-dir", &run_dir]);
        run_ok(20, &bin, &a)
    }

    /// True when node `i` is active with every resource started and holds the VIP.
    pub fn runs_group(&self, i: usize) -> bool {
        let s = self.ha_status(i);
        s["state"] == "active"
            && s["resources"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["state"] == "started"))
            && self.has_vip(i)
    }

    /// True when node `i` holds nothing: not active, no VIP, rdb Secondary.
    pub fn holds_nothing(&self, i: usize) -> bool {
        let s = self.ha_status(i);
        s["state"] != "active" && !self.has_vip(i) && self.rdb(i)["role"] != "Primary"
    }

    /// True when the cluster IP is configured on node `i`'s eth0.
    pub fn has_vip(&self, i: usize) -> bool {
        let o = run(
            10,
            "ip",
            &[
                "-n",
                &self.n[i].ns,
                "-o",
                "-4",
                "addr",
                "show",
                "dev",
                "eth0",
            ],
        );
        String::from_utf8_lossy(&o.stdout).contains(&format!("inet {}/", self.vip))
    }

    /// One GET of the cluster IP from the client namespace.
    pub fn fetch(&self) -> Result<Page, String> {
        let ns = client_ns(&self.p);
        let addr: SocketAddr = format!("{}:{HTTP_PORT}", self.vip).parse().expect("vip");
        std::thread::spawn(move || {
            enter_netns(&ns);
            http_get(addr, Duration::from_millis(1000))
        })
        .join()
        .expect("fetch thread")
    }

    /// Waits until the client gets a page from `node`; returns it.
    pub fn wait_page_from(&self, node: &str, timeout: Duration) -> Page {
        let mut last = Err(String::new());
        let ok = wait_for(timeout, || {
            last = self.fetch();
            last.as_ref().is_ok_and(|p| p.node == node)
        });
        assert!(
            ok,
            "client never served by {node}: {last:?}\n{}",
            self.logs()
        );
        last.expect("checked")
    }

    /// Writes the page on the node that runs the group, inside rdb-ha's mount
    /// namespace (where the Filesystem resource mounted it), and syncs.
    pub fn write_page(&self, i: usize, text: &str) {
        let pid = self.n[i]
            .ha
            .as_ref()
            .expect("rdb-ha running")
            .id()
            .to_string();
        let m = self.n[i].mnt.display().to_string();
        run_ok(
            30,
            "nsenter",
            &[
                "-t",
                &pid,
                "-m",
                "sh",
                "-c",
                &format!("printf '%s\\n' '{text}' > {m}/index.html.new && mv {m}/index.html.new {m}/index.html && sync"),
            ],
        );
    }

    /// kill -9 of rdb-ha on node `i` (the child is rdb-ha itself: ip netns exec execs).
    pub fn kill9_ha(&mut self, i: usize) {
        if let Some(mut c) = self.n[i].ha.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 of node `i`'s rdbd. Its stuck exit (see [`abort_fuse`]) is released.
    pub fn kill9_rdbd(&self, i: usize) {
        self.note_loop(i);
        if let Some(pid) = self.rdbd_pid(i) {
            // SAFETY: kill(2) of the rdbd this lab started (pid from its pid file).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(50));
            abort_fuse(
                &self
                    .fuse_conns
                    .lock()
                    .map(|c| c.clone())
                    .unwrap_or_default(),
            );
        }
    }

    /// Node `i` crashes: kill -9 of rdb-ha, rdbd and the web server it ran (every
    /// process of the node's namespace). Addresses stay configured, as after a crash
    /// of the software (the node's kernel still answers for the cluster IP).
    pub fn crash(&mut self, i: usize) {
        self.kill9_ha(i);
        self.kill9_rdbd(i);
        kill_netns_pids(&self.n[i].ns);
    }

    /// Node `i` reboots after a crash: nothing of it runs, its addresses are the
    /// boot ones (the cluster IP is gone), its stale loop device is released, then
    /// the rdb resource comes up (Secondary) as at boot.
    pub fn reboot(&mut self, i: usize) {
        self.crash(i);
        let _ = run(
            10,
            "ip",
            &[
                "-n",
                &self.n[i].ns,
                "addr",
                "del",
                &format!("{}/24", self.vip),
                "dev",
                "eth0",
            ],
        );
        if let Ok(t) = std::fs::read_link(&self.n[i].device) {
            let _ = run(10, "losetup", &["-d", &t.display().to_string()]);
            let _ = std::fs::remove_file(&self.n[i].device);
        }
        let _ = std::fs::remove_file(self.n[i].ha_run.join("rdb-ha.json"));
        self.adm_ok(i, &["up", RES]);
    }

    /// nftables in node `i`'s namespace: drop everything on `ifaces`, or remove the rules.
    pub fn cut(&self, i: usize, ifaces: &[&str]) {
        let ns = &self.n[i].ns;
        let _ = run(
            10,
            "ip",
            &[
                "netns", "exec", ns, "nft", "delete", "table", "inet", "rdbhacut",
            ],
        );
        if ifaces.is_empty() {
            return;
        }
        let set = ifaces.join(", ");
        let rules = format!(
            "table inet rdbhacut {{\n  chain in {{ type filter hook input priority -300; policy accept; iifname {{ {set} }} drop; }}\n  chain out {{ type filter hook output priority -300; policy accept; oifname {{ {set} }} drop; }}\n}}\n"
        );
        let f = self.dir.join(format!("cut-{i}.nft"));
        std::fs::write(&f, rules).expect("nft rules");
        run_ok(
            10,
            "ip",
            &["netns", "exec", ns, "nft", "-f", &f.display().to_string()],
        );
    }

    /// Both rdb-ha logs and rdbd log tails.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.n.iter().enumerate() {
            let t = std::fs::read_to_string(&n.log).unwrap_or_default();
            let l: Vec<&str> = t.lines().collect();
            s += &format!(
                "--- {} rdb-ha (last 40 lines):\n{}\n--- {} rdbd:\n{}\n",
                n.name,
                l[l.len().saturating_sub(40)..].join("\n"),
                n.name,
                self.rdbd_log_tail(i)
            );
        }
        s
    }

    /// node `i`'s rdb-ha log.
    pub fn ha_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.n[i].log).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..2 {
            self.note_loop(i);
            if let Some(mut c) = self.n[i].ha.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for i in 0..2 {
            if let Some(pid) = self.rdbd_pid(i) {
                // SAFETY: kill(2) of the rdbd this lab started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        abort_fuse(
            &self
                .fuse_conns
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
        );
        for m in ["n1", "n2", "cl", "sw"] {
            kill_netns_pids(&format!("{}{m}", self.p));
        }
        let loops = self.loops.lock().map(|l| l.clone()).unwrap_or_default();
        for l in loops {
            let _ = run(10, "losetup", &["-d", &l]);
        }
        for m in ["n1", "n2", "cl", "sw"] {
            let _ = run(10, "ip", &["netns", "del", &format!("{}{m}", self.p)]);
        }
        if std::env::var_os("RDB_HA_KEEP").is_none() {
            let dir_prefix = self.dir.display().to_string();
            cleanup_leftovers(&self.p, &dir_prefix);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
