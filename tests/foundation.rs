//! Foundation: one node serves a real block device from a DRBD-style config.
//!
//! Drives the real `rdbadm`/`rdbd` binaries and real clients (nbdinfo, fio,
//! qemu-img, nbdsh, mkfs.ext4, mount, fsck) and asserts on data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

fn up_primary(c: &Cluster) {
    c.adm_ok("alpha", &["create-md", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
}

#[test]
fn nbd_clients_see_the_right_device_and_data() {
    need_root();
    need("nbdinfo", "libnbd-bin");
    need("fio", "fio");
    need("qemu-img", "qemu-utils");
    let c = Cluster::new("nbd", "C", "256M", "");
    c.adm_ok("alpha", &["create-md", "r0"]);
    let again = c.adm("alpha", &["create-md", "r0"]);
    assert!(
        !again.status.success(),
        "create-md overwrote existing meta-data without --force"
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "refusal should say how to force: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    c.adm_ok("alpha", &["up", "r0"]);
    // A Secondary refuses NBD clients with a clear message.
    // libnbd shows the server's message only in its debug output.
    let refused = run(
        20,
        "sh",
        &[
            "-c",
            &format!("LIBNBD_DEBUG=1 nbdinfo --size '{}'", c.nbd_uri("alpha")),
        ],
    );
    assert!(
        !refused.status.success(),
        "a Secondary served an NBD client"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only the Primary serves I/O"),
        "refusal message: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    let uri = c.nbd_uri("alpha");
    let size: u64 = run_ok(20, "nbdinfo", &["--size", &uri])
        .trim()
        .parse()
        .unwrap();
    assert!(size > 200 << 20 && size <= 256 << 20, "export size {size}");
    let st = c.status("alpha");
    assert_eq!(st["size_bytes"].as_u64(), Some(size));
    assert_eq!(st["role"], "Primary");
    assert_eq!(st["disk"], "UpToDate");
    assert_eq!(
        st["connection"], "Connecting",
        "beta is configured but down"
    );
    let info = run_ok(20, "nbdinfo", &[&uri]);
    for flag in [
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "is_read_only: false",
    ] {
        assert!(info.contains(flag), "nbdinfo lacks {flag}:\n{info}");
    }

    run_ok(
        300,
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=32M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting",
            "--output=/dev/null",
        ],
    );

    let input = c.dir.join("in.raw");
    let output = c.dir.join("out.raw");
    run_ok(
        60,
        "sh",
        &[
            "-c",
            &format!("head -c 64M /dev/urandom > {}", input.display()),
        ],
    );
    qemu_img_convert(&input.display().to_string(), &uri, true);
    run_ok(
        120,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={}/r0.nbd,export=r0",
                c.run_dir("alpha").display()
            ),
            &output.display().to_string(),
        ],
    );
    assert_eq!(
        sha256_of(&input, None),
        sha256_of(&output, Some(64 << 20)),
        "qemu-img round trip differs"
    );
    // The data is on the backing disk itself, at the start of the data area.
    assert_eq!(
        sha256_of(&input, None),
        sha256_of(&c.img("alpha"), Some(64 << 20))
    );

    // Requests past the end: EINVAL/ENOSPC, and the connection keeps serving.
    let script = r#"
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
for what, call in (("read", lambda: h.pread(4096, size)), ("write", lambda: h.pwrite(b"x" * 4096, size - 2048))):
    try:
        call()
        print(what + " past the end succeeded"); sys.exit(3)
    except nbd.Error as e:
        if e.errno not in ("EINVAL", "ENOSPC"):
            print(what, e.errno); sys.exit(4)
assert h.pread(512, 0) is not None
print("ok")
"#;
    let out = run(30, "/usr/bin/python3", &["-c", script, &uri]);
    assert!(
        out.status.success(),
        "out-of-range check (needs python3-libnbd): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok(20, "nbdinfo", &["--size", &uri]);
    c.adm_ok("alpha", &["secondary", "r0"]);
    c.adm_ok("alpha", &["down", "r0"]);
}

#[test]
fn ext4_on_the_device_survives_down_and_up() {
    need_root();
    need("mkfs.ext4", "e2fsprogs");
    need("nbdinfo", "libnbd-bin");
    let c = Cluster::new("ext4", "C", "256M", "");
    up_primary(&c);
    let st = c.status("alpha");
    assert_eq!(st["frontend"], "fuse+loop", "status: {st}");
    let dev = c.device.clone();
    let real = std::fs::canonicalize(&dev).expect("device path resolves");
    assert!(
        real.display().to_string().starts_with("/dev/loop"),
        "{} -> {}",
        dev.display(),
        real.display()
    );
    let dev_s = dev.display().to_string();
    run_ok(120, "mkfs.ext4", &["-q", "-F", &dev_s]);
    let mnt = c.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    run_ok(30, "mount", &[&dev_s, &mnt_s]);
    // While mounted, secondary is refused.
    let busy = c.adm("alpha", &["secondary", "r0"]);
    assert!(!busy.status.success(), "secondary succeeded while mounted");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("held open"));
    run_ok(
        120,
        "sh",
        &["-c", &format!("cd {mnt_s} && for i in $(seq 1 100); do head -c $((RANDOM * 8 + 1)) /dev/urandom > f$i; done && sha256sum f* > ../sums")],
    );
    run_ok(60, "umount", &[&mnt_s]);
    c.adm_ok("alpha", &["down", "r0"]);
    assert!(!dev.exists(), "device path still there after down");
    c.adm_ok("alpha", &["up", "r0"]);
    assert_eq!(c.status("alpha")["disk"], "UpToDate");
    c.adm_ok("alpha", &["primary", "r0"]);
    run_ok(120, "fsck.ext4", &["-n", &dev_s]);
    run_ok(30, "mount", &[&dev_s, &mnt_s]);
    run_ok(
        60,
        "sh",
        &["-c", &format!("cd {mnt_s} && sha256sum -c --quiet ../sums")],
    );
    run_ok(60, "umount", &[&mnt_s]);
    c.adm_ok("alpha", &["secondary", "r0"]);
    assert!(!dev.exists(), "device path still there after secondary");
    assert_eq!(c.status("alpha")["role"], "Secondary");
    let refused = run(20, "nbdinfo", &["--size", &c.nbd_uri("alpha")]);
    assert!(
        !refused.status.success(),
        "a Secondary served an NBD client"
    );
    c.adm_ok("alpha", &["down", "r0"]);
    // The daemon exits after the last resource went down.
    assert!(wait_for(Duration::from_secs(10), || !c
        .run_dir("alpha")
        .join("rdbd.sock")
        .exists()));
}

#[test]
fn meta_data_round_trips_and_corruption_is_refused() {
    need_root();
    let c = Cluster::new("md", "C", "64M", "");
    c.adm_ok("alpha", &["create-md", "r0"]);
    let j: serde_json::Value =
        serde_json::from_str(&c.adm_ok("alpha", &["dump-md", "r0", "--json"]))
            .expect("dump-md --json");
    let text = c.adm_ok("alpha", &["dump-md", "r0"]);
    assert!(!text.is_empty());
    let s = j.to_string();
    assert!(s.contains("data_size_bytes"), "dump-md --json: {s}");
    // Corrupt one byte of the superblock (the last 4 KiB of the disk).
    let img = c.img("alpha");
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len - 4096 + 40).unwrap();
    b[0] ^= 0x55;
    f.write_all_at(&b, len - 4096 + 40).unwrap();
    drop(f);
    let bad = c.adm("alpha", &["dump-md", "r0"]);
    assert!(!bad.status.success());
    let up = c.adm("alpha", &["up", "r0"]);
    assert!(!up.status.success(), "up accepted corrupt meta-data");
    let msg = String::from_utf8_lossy(&up.stderr).to_lowercase();
    assert!(
        msg.contains("checksum"),
        "up's refusal should name the checksum: {msg}"
    );
    // create-md --force repairs it.
    c.adm_ok("alpha", &["create-md", "r0", "--force"]);
    c.adm_ok("alpha", &["dump-md", "r0"]);
}

#[test]
fn external_meta_data_keeps_the_whole_disk() {
    need_root();
    let c = Cluster::new("extmd", "C", "64M", "");
    let md = c.dir.join("alpha.md");
    run_ok(10, "truncate", &["-s", "8M", &md.display().to_string()]);
    let text = std::fs::read_to_string(&c.conf).unwrap().replace(
        "        address 127.0.0.1",
        &format!(
            "        meta-disk {};\n        address 127.0.0.1",
            md.display()
        ),
    );
    std::fs::write(&c.conf, text).unwrap();
    c.adm_ok("alpha", &["create-md", "r0"]);
    let j: serde_json::Value =
        serde_json::from_str(&c.adm_ok("alpha", &["dump-md", "r0", "--json"])).unwrap();
    let s = j.to_string();
    assert!(
        s.contains(&(64u64 << 20).to_string()),
        "external md: data size is the whole disk: {s}"
    );
    c.adm_ok("alpha", &["up", "r0"]);
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    assert_eq!(c.status("alpha")["size_bytes"].as_u64(), Some(64 << 20));
    c.adm_ok("alpha", &["down", "r0"]);
}

#[test]
fn create_md_refuses_a_disk_holding_a_file_system() {
    need_root();
    need("mkfs.ext4", "e2fsprogs");
    let c = Cluster::new("fs", "C", "64M", "");
    run_ok(
        60,
        "mkfs.ext4",
        &["-q", "-F", &c.img("alpha").display().to_string()],
    );
    let out = c.adm("alpha", &["create-md", "r0"]);
    assert!(!out.status.success(), "create-md overwrote a file system");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ext"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.adm_ok("alpha", &["create-md", "r0", "--force"]);
}

#[test]
fn seed_003_config_is_accepted_by_rdbadm() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/config/seed003");
    let out = run_ok(
        20,
        &bin("rdbadm").display().to_string(),
        &[
            "-c",
            &format!("{dir}/drbd.conf"),
            "--node",
            "tho-web1",
            "dump",
            "webstore",
        ],
    );
    assert!(out.contains("webstore"), "{out}");
    assert!(out.contains("/dev/drbd0"), "{out}");
    let st = run_ok(
        20,
        &bin("rdbadm").display().to_string(),
        &[
            "-c",
            &format!("{dir}/drbd.conf"),
            "--node",
            "tho-web2",
            "--run-dir",
            "/tmp/rdb-test-nonexistent-run",
            "status",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(v["resources"][0]["name"], "webstore");
    assert_eq!(v["resources"][0]["role"], "Unconfigured");
}
