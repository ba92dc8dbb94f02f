//! Security: who may change states on the control socket (real non-root users through
//! `setpriv`), what a hostile NBD client, control client or replication peer can make
//! `rdbd` allocate, and that a replayed replication handshake or a peer without the
//! shared secret is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rdb_protocol::repl::{Frame, FrameError, MAGIC};

/// Resident set of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn daemon_pid(c: &Cluster, node: &str) -> u32 {
    std::fs::read_to_string(c.run_dir(node).join("rdbd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Users and a group created for one test, removed on drop.
struct Accounts {
    users: Vec<String>,
    group: String,
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = run(30, "userdel", &[u]);
        }
        let _ = run(30, "groupdel", &[&self.group]);
    }
}

fn as_user(user: &str, c: &Cluster, node: &str, args: &[&str]) -> Output {
    let rdbadm = bin("rdbadm").display().to_string();
    let conf = c.conf.display().to_string();
    let run_dir = c.run_dir(node).display().to_string();
    let mut full = vec![
        "--reuid",
        user,
        "--regid",
        "nogroup",
        "--init-groups",
        rdbadm.as_str(),
        "-c",
        conf.as_str(),
        "--node",
        node,
        "--run-dir",
        run_dir.as_str(),
    ];
    full.extend_from_slice(args);
    run(60, "setpriv", &full)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn control_socket_reads_for_anyone_changes_for_root_and_the_group() {
    need_root();
    need("useradd", "passwd");
    need("setpriv", "util-linux");
    let id = std::process::id() % 100_000;
    let group = format!("rdbctl{id}");
    let (reader, operator) = (format!("rdbro{id}"), format!("rdbop{id}"));
    let accounts = Accounts {
        users: vec![reader.clone(), operator.clone()],
        group: group.clone(),
    };
    let _ = run(30, "userdel", &[&reader]);
    let _ = run(30, "userdel", &[&operator]);
    let _ = run(30, "groupdel", &[&group]);
    run_ok(30, "groupadd", &[&group]);
    run_ok(30, "useradd", &["-M", "-N", "-g", "nogroup", &reader]);
    run_ok(
        30,
        "useradd",
        &["-M", "-N", "-g", "nogroup", "-G", &group, &operator],
    );

    let c = Cluster::new("ctlperm", "C", "64M", "");
    let conf = std::fs::read_to_string(&c.conf).unwrap();
    std::fs::write(
        &c.conf,
        format!("global {{ control-group {group}; }}\n{conf}"),
    )
    .unwrap();
    // The test dir must be reachable by the unprivileged users.
    std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.adm_ok("alpha", &["create-md", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);

    let sock = c.run_dir("alpha").join("rdbd.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o666, "socket mode");
    let gid = rdb::daemon::access::resolve_group(&group).unwrap().gid;
    assert_eq!((meta.uid(), meta.gid()), (0, gid), "socket owner");

    // Anyone reads.
    let out = as_user(&reader, &c, "alpha", &["status", "r0", "--json"]);
    assert!(out.status.success(), "status as {reader}: {}", text(&out));
    assert!(text(&out).contains("\"role\""), "{}", text(&out));
    // A non-member changes nothing.
    for args in [
        &["primary", "r0", "--force"][..],
        &["disconnect", "r0"],
        &["down", "r0"],
    ] {
        let out = as_user(&reader, &c, "alpha", args);
        let t = text(&out);
        assert!(!out.status.success(), "{args:?} as {reader} succeeded: {t}");
        assert!(
            t.contains("permission denied")
                && t.contains(&format!("members of group {group}"))
                && t.contains("may only read"),
            "{args:?}: {t}"
        );
    }
    assert_eq!(c.status("alpha")["role"], "Secondary");
    // A member of the control group may.
    let out = as_user(&operator, &c, "alpha", &["primary", "r0", "--force"]);
    assert!(
        out.status.success(),
        "primary as {operator}: {}",
        text(&out)
    );
    assert_eq!(c.status("alpha")["role"], "Primary");
    let out = as_user(&operator, &c, "alpha", &["secondary", "r0"]);
    assert!(
        out.status.success(),
        "secondary as {operator}: {}",
        text(&out)
    );
    // A user other than root holds at most 16 control connections; root is never
    // locked out.
    let script = r#"
import json, socket, sys, time
socks, ok, refused = [], 0, 0
for i in range(20):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    try:
        s.sendall(b'{"v":1,"cmd":"ping"}\n')
    except BrokenPipeError:
        pass  # refused at once: the answer is already in the socket
    answer = json.loads(s.makefile().readline())
    if answer["ok"]: ok += 1
    elif "too many control connections" in answer["message"]: refused += 1
    socks.append(s)
print(ok, refused, flush=True)
time.sleep(4)
"#;
    let mut hog = std::process::Command::new("setpriv")
        .args(["--reuid", &reader, "--regid", "nogroup", "--init-groups"])
        .args(["/usr/bin/python3", "-c", script])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line.trim(),
        "16 4",
        "connections accepted / refused for {reader}"
    );
    assert_eq!(c.status("alpha")["role"], "Secondary", "root locked out");
    assert!(hog.wait().unwrap().success());
    // Root always may.
    c.adm_ok("alpha", &["down", "r0"]);
    drop(accounts);
}

#[test]
fn control_group_config_is_checked() {
    let bad = rdb::config::parse_str(
        "global { control-group \"a b\"; }\nresource r { device /dev/x; disk /d; meta-disk internal; on a { address 127.0.0.1:7000; } }\n",
        Path::new("t.conf"),
    )
    .unwrap_err()
    .to_string();
    assert!(bad.starts_with("t.conf:1:24: "), "{bad}");
    assert!(bad.contains("control-group"), "{bad}");
    let good = rdb::config::parse_str("global { control-group rdbadmins; }\n", Path::new("t.conf"))
        .unwrap();
    assert_eq!(good.control_group(), Some("rdbadmins"));
}

/// Raw NBD client: fixed newstyle, NO_ZEROES, EXPORT_NAME `r0`.
fn nbd_connect(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes()); // OPT_EXPORT_NAME
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"r0");
    s.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    s
}

fn nbd_request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// Reads until EOF (or an error); true if EOF came within the read timeout.
fn closes(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn hostile_nbd_and_control_clients_cannot_make_rdbd_allocate() {
    need_root();
    need("python3", "python3");
    let c = Cluster::new("limits", "C", "64M", "");
    c.adm_ok("alpha", &["create-md", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    let pid = daemon_pid(&c, "alpha");
    let nbd_sock = c.run_dir("alpha").join("r0.nbd");
    let before = rss_kib(pid);

    // 1. READ of 4 GiB - 1: refused with an error reply, the connection goes on.
    let mut s = nbd_connect(&nbd_sock);
    s.write_all(&nbd_request(0, 7, 0, u32::MAX)).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[0..4], &0x6744_6698u32.to_be_bytes());
    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    assert_ne!(error, 0, "a 4 GiB read was not refused");
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 7);
    s.write_all(&nbd_request(0, 8, 0, 4096)).unwrap();
    let mut reply = [0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
    // 2. WRITE announcing 4 GiB - 1 of payload: the server cannot skip it and closes.
    s.write_all(&nbd_request(1, 9, 0, u32::MAX)).unwrap();
    let _ = s.write_all(&[0xAB; 65536]); // may fail: the server closes at once
    assert!(closes(&mut s), "a 4 GiB write did not close the connection");

    // 3. Ten thousand pipelined 1 MiB reads never read back: the per-connection
    //    in-flight bound stops the server reading requests; memory stays bounded.
    let s = nbd_connect(&nbd_sock);
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let pump = std::thread::spawn(move || {
        let mut sent = 0u32;
        for i in 0..10_000u64 {
            if w.write_all(&nbd_request(0, i, (i % 63) << 20, 1 << 20))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let sent = pump.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let flooded = rss_kib(pid);
    let _ = s.shutdown(std::net::Shutdown::Both);
    assert!(
        sent < 10_000,
        "the server read all 10000 pipelined requests without answering them"
    );

    // 4. A control line of 8 MiB without a newline: refused, connection closed.
    let mut ctl = UnixStream::connect(c.run_dir("alpha").join("rdbd.sock")).unwrap();
    ctl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ctl.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..8 {
        if ctl.write_all(&chunk).is_err() {
            break; // closed by the daemon after the first MiB
        }
    }
    let mut answer = String::new();
    let _ = ctl.read_to_string(&mut answer);
    assert!(
        answer.contains("longer than 1048576 bytes"),
        "control answer: {answer:?}"
    );
    let after = rss_kib(pid);

    // The daemon keeps serving, and its memory stayed bounded: the in-flight bound of
    // one connection is 128 MiB of buffers (docs/reliability.md).
    assert_eq!(c.status("alpha")["role"], "Primary");
    run_ok(
        30,
        "/usr/bin/python3",
        &[
            "-c",
            "import sys, nbd; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b'x' * 4096, 0); assert h.pread(4096, 0) == b'x' * 4096",
            &c.nbd_uri("alpha"),
        ],
    );
    println!(
        "limits: rss before {before} KiB, after the flood {flooded} KiB, at the end {after} KiB; \
         {sent} pipelined 1 MiB reads accepted before the server stopped reading"
    );
    assert!(
        flooded < before + 200 * 1024 && after < before + 200 * 1024,
        "rss grew from {before} KiB to {flooded} / {after} KiB"
    );
    c.adm_ok("alpha", &["down", "r0"]);
}

/// Frames a peer sent, decoded until EOF or the read timeout, and whether the peer
/// closed the connection (EOF or reset) before the timeout.
fn frames_and_close(s: &mut TcpStream) -> (Vec<Frame<Vec<u8>>>, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let closed = loop {
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut frames = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match Frame::decode(&buf[at..]) {
            Ok((f, used)) => {
                frames.push(f);
                at += used;
            }
            Err(FrameError::Incomplete { .. }) | Err(_) => break,
        }
    }
    (frames, closed)
}

fn frames_from(s: &mut TcpStream) -> Vec<Frame<Vec<u8>>> {
    frames_and_close(s).0
}

#[test]
fn replication_peer_limits_replay_and_missing_secret() {
    need_root();
    let c = Cluster::new(
        "peerauth",
        "C",
        "64M",
        "cram-hmac-alg sha256; shared-secret \"s3cret\"; ping-int 1; ping-timeout 5; timeout 10; connect-int 1;",
    );
    let conf = std::fs::read_to_string(&c.conf).unwrap();
    let beta_addr = address_of(&conf, "beta");
    // alpha sorts first, so alpha dials beta: route alpha through a recorder.
    let recorder = TcpListener::bind("127.0.0.1:0").unwrap();
    let rec_addr = recorder.local_addr().unwrap();
    let alpha_conf = c.dir.join("rdb-alpha.conf");
    std::fs::write(
        &alpha_conf,
        conf.replace(
            &format!("address {beta_addr};"),
            &format!("address {rec_addr};"),
        ),
    )
    .unwrap();
    let recorded = Arc::new(Mutex::new(Vec::<u8>::new()));
    {
        let recorded = recorded.clone();
        std::thread::spawn(move || {
            // Forward the first connection, recording what alpha sends.
            let Ok((mut from_alpha, _)) = recorder.accept() else {
                return;
            };
            let mut to_beta = TcpStream::connect(beta_addr).unwrap();
            let mut back = to_beta.try_clone().unwrap();
            let mut alpha_w = from_alpha.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back, &mut alpha_w);
            });
            let mut chunk = [0u8; 65536];
            while let Ok(n) = from_alpha.read(&mut chunk) {
                if n == 0 || to_beta.write_all(&chunk[..n]).is_err() {
                    break;
                }
                let mut r = recorded.lock().unwrap();
                if r.len() < 1 << 20 {
                    r.extend_from_slice(&chunk[..n]);
                }
            }
            let _ = to_beta.shutdown(std::net::Shutdown::Both);
        });
    }
    let adm_alpha = |args: &[&str]| c.adm_with_ok("alpha", &alpha_conf, args);
    c.adm_ok("beta", &["create-md", "r0"]);
    c.adm_ok("beta", &["up", "r0"]);
    adm_alpha(&["create-md", "r0"]);
    adm_alpha(&["up", "r0"]);
    assert!(
        wait_for(Duration::from_secs(30), || c.status("beta")["connection"]
            == "Connected"),
        "alpha and beta never connected through the recorder: {}",
        c.status("beta")
    );
    adm_alpha(&["down", "r0"]);
    assert!(wait_for(Duration::from_secs(20), || c.status("beta")
        ["connection"]
        != "Connected"));
    let recorded = recorded.lock().unwrap().clone();
    assert!(recorded.len() > 64, "nothing recorded");
    let beta_pid = daemon_pid(&c, "beta");
    let before = rss_kib(beta_pid);

    // 1. The recorded handshake replayed: beta's new challenge is not the one the
    //    recorded response answers, so beta answers AuthResult { ok: false }.
    let mut s = TcpStream::connect(beta_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&recorded).unwrap();
    let frames = frames_from(&mut s);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::AuthResult { ok: false })),
        "a replayed handshake was not refused; beta sent {frames:?}"
    );
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, Frame::AuthResult { ok: true })),
        "a replayed handshake was accepted"
    );

    // 2. A peer without the shared secret: its Hello lacks the auth feature; refused
    //    with the reason.
    let no_secret = conf.replace("cram-hmac-alg sha256; shared-secret \"s3cret\";", "");
    let hello_only: Vec<u8> = {
        // Take the recorded Hello frame and clear its FEATURE_AUTH bit by re-encoding.
        let (f, _) = Frame::decode(&recorded).unwrap();
        let Frame::Hello {
            proto_min,
            proto_max,
            features,
            node_name,
            resource,
            volumes,
        } = f
        else {
            panic!("the first recorded frame is not Hello: {f:?}")
        };
        let hello: Frame = Frame::Hello {
            proto_min,
            proto_max,
            features: features & !rdb_protocol::repl::FEATURE_AUTH,
            node_name,
            resource,
            volumes,
        };
        let mut out = Vec::new();
        hello.encode(0, &mut out).unwrap();
        out
    };
    let mut s = TcpStream::connect(beta_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello_only).unwrap();
    let frames = frames_from(&mut s);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::Disconnect { reason } if reason.contains("shared secret"))),
        "a peer without the secret was not refused with a reason: {frames:?}"
    );
    assert!(!no_secret.contains("shared-secret"));

    // 3. A frame header announcing a 4 GiB body: refused at once, nothing allocated.
    let mut s = TcpStream::connect(beta_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes()); // Hello
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&header).unwrap();
    let _ = s.write_all(&[0u8; 65536]);
    let (frames, closed) = frames_and_close(&mut s);
    assert!(
        closed
            && frames
                .iter()
                .all(|f| matches!(f, Frame::Hello { .. } | Frame::Disconnect { .. })),
        "a 4 GiB frame did not close the connection (closed {closed}): {frames:?}"
    );
    // 4. Connections that never speak: beta handshakes one connection at a time, each
    //    bounded by the handshake timeout (1 s here), the others wait in the listen
    //    backlog; memory stays bounded.
    let idle: Vec<TcpStream> = (0..50)
        .filter_map(|_| TcpStream::connect_timeout(&beta_addr, Duration::from_secs(2)).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let flooded = rss_kib(beta_pid);
    let idle_count = idle.len();
    drop(idle);
    println!(
        "peer limits: beta rss before {before} KiB, with {} idle connections {flooded} KiB",
        idle_count
    );
    assert!(
        flooded < before + 64 * 1024,
        "rss grew from {before} KiB to {flooded} KiB"
    );

    // beta still serves.
    assert_eq!(c.status("beta")["role"], "Secondary");
    c.adm_ok("beta", &["down", "r0"]);
}
