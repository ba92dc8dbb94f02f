//! Kernel frontends on this host: `frontend nbd` / `frontend ublk` on a kernel
//! without the module fail `up` at once with the message that says what to do;
//! `frontend auto` falls back to FUSE + loop and says why in `status`.
//! (The frontends themselves are proven in a VM: `tests/vm/run.sh`.)
//!
//! On a machine that has the modules loaded, the same test checks the other branch:
//! `auto` picks ublk (or kernel NBD) and explicit frontends pass `up`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use common::*;

struct OneNode {
    dir: PathBuf,
    conf: PathBuf,
    device: PathBuf,
}

impl OneNode {
    fn new(tag: &str, frontend: &str) -> OneNode {
        let dir = PathBuf::from(format!("/tmp/rdb-test-kfe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        run_ok(
            10,
            "truncate",
            &["-s", "64M", &dir.join("disk.img").display().to_string()],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let device = PathBuf::from(format!("/dev/rdb-test-kfe-{tag}-{}", std::process::id()));
        let conf = dir.join("rdb.conf");
        std::fs::write(
            &conf,
            format!(
                "resource r0 {{\n    device {};\n    flexible-meta-disk internal;\n    frontend {frontend};\n    on vm {{\n        disk {}/disk.img;\n        address 127.0.0.1:{port};\n    }}\n}}\n",
                device.display(),
                dir.display()
            ),
        )
        .unwrap();
        OneNode { dir, conf, device }
    }

    fn adm(&self, args: &[&str]) -> Output {
        let mut full = vec![
            "-c".to_string(),
            self.conf.display().to_string(),
            "--node".into(),
            "vm".into(),
            "--run-dir".into(),
            self.dir.join("run").display().to_string(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        run(60, &bin("rdbadm").display().to_string(), &refs)
    }

    fn adm_ok(&self, args: &[&str]) -> String {
        let out = self.adm(args);
        assert!(
            out.status.success(),
            "rdbadm {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for OneNode {
    fn drop(&mut self) {
        let _ = self.adm(&["down", "r0"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have_ublk() -> bool {
    Path::new("/dev/ublk-control").exists()
}

fn have_nbd() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// `up` with an explicit kernel frontend fails fast with `message` when the module is missing.
fn explicit_frontend(frontend: &str, available: bool, message: &str) {
    let n = OneNode::new(frontend, frontend);
    n.adm_ok(&["create-md", "r0"]);
    let t0 = Instant::now();
    let out = n.adm(&["up", "r0"]);
    let took = t0.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if available {
        assert!(
            out.status.success(),
            "up with frontend {frontend} on a kernel that has it: {text}"
        );
        return;
    }
    assert!(
        !out.status.success(),
        "up with frontend {frontend} succeeded without the module: {text}"
    );
    assert!(
        text.contains(message),
        "frontend {frontend}: message {text:?} lacks {message:?}"
    );
    // "Never a hang": the refusal is immediate (bounded by the 60 s run timeout above;
    // 20 s leaves room for a loaded CI machine).
    assert!(took.as_secs() < 20, "refusal took {took:?}");
    assert!(!n.device.exists(), "a device link was created");
    // Nothing is left up: status says so and a later `up` with fuse works.
    let st = n.adm(&["status", "r0", "--json"]);
    let st = String::from_utf8_lossy(&st.stdout);
    assert!(
        !st.contains("\"role\":\"Primary\""),
        "status after refused up: {st}"
    );
}

#[test]
fn frontend_nbd_without_module_fails_up_clearly() {
    need_root();
    explicit_frontend(
        "nbd",
        have_nbd(),
        "kernel module nbd is not loaded: `modprobe nbd`, or use `frontend fuse`",
    );
}

#[test]
fn frontend_ublk_without_module_fails_up_clearly() {
    need_root();
    explicit_frontend(
        "ublk",
        have_ublk(),
        "kernel module ublk_drv is not loaded (no /dev/ublk-control): `modprobe ublk_drv`, or use `frontend fuse`",
    );
}

#[test]
fn frontend_auto_falls_back_to_fuse_loop_and_says_why() {
    need_root();
    let n = OneNode::new("auto", "auto");
    n.adm_ok(&["create-md", "r0"]);
    n.adm_ok(&["up", "r0"]);
    n.adm_ok(&["primary", "r0", "--force"]);
    let out = n.adm_ok(&["status", "r0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["resources"][0];
    let reason = r["frontend_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let expected = if have_ublk() {
        "ublk"
    } else if have_nbd() {
        "nbd"
    } else {
        "fuse+loop"
    };
    assert_eq!(r["frontend"], expected, "status: {r}");
    if expected == "fuse+loop" {
        assert!(
            reason.contains("ublk module not loaded"),
            "reason: {reason}"
        );
        assert!(reason.contains("nbd module not loaded"), "reason: {reason}");
        // The device really is there and holds data.
        let target = std::fs::read_link(&n.device).unwrap();
        assert!(
            target.to_string_lossy().starts_with("/dev/loop"),
            "link -> {}",
            target.display()
        );
        let pattern = n.dir.join("pattern");
        run_ok(
            10,
            "sh",
            &[
                "-c",
                &format!("head -c 1048576 /dev/urandom > {}", pattern.display()),
            ],
        );
        run_ok(
            30,
            "dd",
            &[
                &format!("if={}", pattern.display()),
                &format!("of={}", n.device.display()),
                "bs=64k",
                "oflag=direct",
                "status=none",
            ],
        );
        let back = sha256_of(&n.device, Some(1 << 20));
        assert_eq!(
            back,
            sha256_of(&pattern, None),
            "data read back through the fallback device"
        );
    }
    n.adm_ok(&["down", "r0"]);
    assert!(!n.device.exists(), "device link left after down");
}
