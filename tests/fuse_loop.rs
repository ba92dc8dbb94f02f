//! FUSE + loop frontend, end to end (root, /dev/fuse, loop module, e2fsprogs,
//! util-linux): data written through the device path reaches the `BlockIo`, ext4 on
//! top survives detach/re-attach, detach refuses while mounted, discards arrive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};
use rdb::frontend::fuse::{FrontendError, FuseLoopDevice, FuseLoopOptions};
use rdb::storage::{BlockIo, IoError, IoFuture};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const TOOL_DEADLINE: Duration = Duration::from_secs(60);

/// In-memory volume that counts what reaches it.
#[derive(Default)]
struct MemDisk {
    data: Mutex<Vec<u8>>,
    flushes: AtomicU64,
    writes: AtomicU64,
    zeroes_unmap: AtomicU64,
    zeroes_keep: AtomicU64,
    discards: AtomicU64,
    /// Fail every write with `NotPermitted` (a Secondary's volume).
    fail_writes: AtomicBool,
}

impl MemDisk {
    fn new(size_bytes: u64) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; size_bytes as usize]),
            ..MemDisk::default()
        })
    }
    fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockIo for MemDisk {
    fn size_bytes(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let d = self.data.lock().unwrap();
            IoError::check_range(offset, len as u64, d.len() as u64)?;
            Ok(d[offset as usize..offset as usize + len].to_vec())
        })
    }
    fn write_at(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.fail_writes.load(Ordering::Relaxed) {
                return Err(IoError::NotPermitted("secondary".into()));
            }
            let mut d = self.data.lock().unwrap();
            IoError::check_range(offset, data.len() as u64, d.len() as u64)?;
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            self.writes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let d = self.data.lock().unwrap();
            IoError::check_range(offset, len, d.len() as u64)?;
            self.discards.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mut d = self.data.lock().unwrap();
            IoError::check_range(offset, len, d.len() as u64)?;
            d[offset as usize..(offset + len) as usize].fill(0);
            if may_unmap {
                self.zeroes_unmap.fetch_add(1, Ordering::Relaxed);
            } else {
                self.zeroes_keep.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    }
}

/// Fails the test with a clear message when a required tool is missing.
fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .chain(["/sbin", "/usr/sbin", "/bin", "/usr/bin"]);
    for dir in dirs {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("required tool `{name}` is not installed (e2fsprogs / util-linux / fuse3 needed)");
}

fn require_env() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: modprobe fuse"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control is missing: modprobe loop"
    );
    require_tool("fusermount3");
}

/// Runs a tool with a deadline; panics with its output on failure.
fn run(tool: &str, args: &[&str]) -> String {
    let bin = require_tool(tool);
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {tool}: {e}"));
    let deadline = Instant::now() + TOOL_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                status.success(),
                "{tool} {args:?} failed ({status}): {text}"
            );
            return text;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{tool} {args:?} did not finish within {TOOL_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// Whether `loop_path` is bound to a file under `dir` (parallel tests reuse freed
/// loop devices, so "bound at all" says nothing).
fn loop_bound(loop_path: &Path, dir: &Path) -> bool {
    let name = loop_path.file_name().unwrap().to_str().unwrap();
    match std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) {
        Ok(backing) => backing.trim().starts_with(dir.to_str().unwrap()),
        Err(_) => false,
    }
}

/// Test fixture: a runtime, a temp dir, and cleanup of mounts and devices on drop
/// (also when the test fails half-way).
struct Fixture {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    link: PathBuf,
    fs_mounts: Mutex<Vec<PathBuf>>,
    dev: Option<FuseLoopDevice>,
    block_size_bytes: u32,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        require_env();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let link = PathBuf::from(format!("/dev/rdb-test-{}-{tag}", std::process::id()));
        Fixture {
            rt,
            dir: tempfile::tempdir().unwrap(),
            link,
            fs_mounts: Mutex::new(Vec::new()),
            dev: None,
            block_size_bytes: 4096,
        }
    }

    fn opts(&self) -> FuseLoopOptions {
        FuseLoopOptions {
            mount_dir: self.dir.path().join("fuse"),
            file_name: "data".into(),
            link_path: self.link.clone(),
            block_size_bytes: self.block_size_bytes,
        }
    }

    fn attach(&mut self, disk: &Arc<MemDisk>) -> &FuseLoopDevice {
        let device: Arc<dyn BlockIo> = disk.clone();
        let dev = FuseLoopDevice::attach(device, self.opts(), self.rt.handle().clone())
            .unwrap_or_else(|e| panic!("attach failed: {e}"));
        assert!(is_mounted(&self.opts().mount_dir), "FUSE not mounted");
        assert!(
            loop_bound(dev.loop_path(), self.dir.path()),
            "loop device not bound"
        );
        let target = std::fs::read_link(&self.link).unwrap();
        assert_eq!(target, dev.loop_path());
        assert!(std::fs::metadata(&self.link)
            .unwrap()
            .file_type()
            .is_block_device());
        self.dev = Some(dev);
        self.dev.as_ref().unwrap()
    }

    fn dev(&mut self) -> &mut FuseLoopDevice {
        self.dev.as_mut().expect("attached")
    }

    /// Detaches and checks that everything is gone.
    fn detach(&mut self) {
        let mut dev = self.dev.take().expect("attached");
        let loop_path = dev.loop_path().to_path_buf();
        dev.detach()
            .unwrap_or_else(|e| panic!("detach failed: {e}"));
        dev.detach().expect("second detach is a no-op");
        assert!(
            std::fs::symlink_metadata(&self.link).is_err(),
            "link still exists"
        );
        assert!(
            !loop_bound(&loop_path, self.dir.path()),
            "loop device still bound"
        );
        assert!(!is_mounted(&self.opts().mount_dir), "FUSE still mounted");
    }

    fn mount_fs(&self, name: &str) -> PathBuf {
        let mnt = self.dir.path().join(name);
        std::fs::create_dir_all(&mnt).unwrap();
        run(
            "mount",
            &[self.link.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        self.fs_mounts.lock().unwrap().push(mnt.clone());
        mnt
    }

    fn umount_fs(&self, mnt: &Path) {
        run("umount", &[mnt.to_str().unwrap()]);
        self.fs_mounts.lock().unwrap().retain(|m| m != mnt);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for mnt in self.fs_mounts.lock().unwrap().drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
        if let Some(mut dev) = self.dev.take() {
            if let Err(e) = dev.detach() {
                eprintln!("fixture cleanup: detach failed: {e}");
            }
        }
        let _ = std::fs::remove_file(&self.link);
    }
}

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let start = (4096 - (raw.as_ptr() as usize % 4096)) % 4096;
        Aligned { raw, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[test]
fn fuse_loop_data_reaches_blockio_4k() {
    data_reaches_blockio(4096);
}

#[test]
fn fuse_loop_data_reaches_blockio_512() {
    data_reaches_blockio(512);
}

fn data_reaches_blockio(block_size_bytes: u32) {
    let mut fx = Fixture::new(&format!("data{block_size_bytes}"));
    fx.block_size_bytes = block_size_bytes;
    let disk = MemDisk::new(64 * MIB);
    fx.attach(&disk);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);

    // O_DIRECT write of 4 MiB at 1 MiB.
    let mut direct = Aligned::new(4 * MIB as usize);
    rng.fill_bytes(direct.buf());
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&fx.link)
            .unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(direct.buf()).unwrap();
        // Read it back through the device too.
        let mut back = Aligned::new(4 * MIB as usize);
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.read_exact(back.buf()).unwrap();
        assert!(back.buf() == direct.buf(), "O_DIRECT read-back differs");
    }
    assert!(
        disk.snapshot(MIB, 4 * MIB as usize) == direct.buf(),
        "O_DIRECT data did not reach the BlockIo"
    );

    // Buffered write of 3 MiB + 512 bytes at an odd offset, then fsync.
    let mut buffered = vec![0u8; 3 * MIB as usize + 512];
    rng.fill_bytes(&mut buffered);
    let off = 20 * MIB + 512;
    let flushes_before = disk.flushes.load(Ordering::Relaxed);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.link)
            .unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&buffered).unwrap();
        f.sync_all().unwrap();
    }
    assert!(
        disk.snapshot(off, buffered.len()) == buffered,
        "buffered data did not reach the BlockIo after fsync"
    );
    assert!(
        disk.flushes.load(Ordering::Relaxed) > flushes_before,
        "fsync on the device did not reach BlockIo::flush"
    );

    // The last block of the device, and a write past the end is refused.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&fx.link)
            .unwrap();
        let mut last = Aligned::new(4096);
        last.buf().fill(0xA5);
        f.seek(SeekFrom::Start(64 * MIB - 4096)).unwrap();
        f.write_all(last.buf()).unwrap();
        let err = f.write(last.buf());
        assert!(
            matches!(err, Ok(0)) || err.is_err(),
            "write past the end succeeded: {err:?}"
        );
    }
    assert_eq!(disk.snapshot(64 * MIB - 4096, 4096), vec![0xA5; 4096]);

    // Concurrent O_DIRECT writers on distinct regions (many requests in flight).
    let mut expected = vec![0u8; 32 * MIB as usize];
    rng.fill_bytes(&mut expected);
    std::thread::scope(|s| {
        for (i, chunk) in expected.chunks(8 * MIB as usize).enumerate() {
            let link = fx.link.clone();
            s.spawn(move || {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&link)
                    .unwrap();
                let mut buf = Aligned::new(64 * 1024);
                for (j, piece) in chunk.chunks(64 * 1024).enumerate() {
                    buf.buf().copy_from_slice(piece);
                    let off = 30 * MIB + (i as u64) * 8 * MIB + (j as u64) * 64 * 1024;
                    f.seek(SeekFrom::Start(off)).unwrap();
                    f.write_all(buf.buf()).unwrap();
                }
            });
        }
    });
    assert!(
        disk.snapshot(30 * MIB, expected.len()) == expected,
        "concurrent O_DIRECT data differs"
    );

    // A volume error reaches the writer as an I/O error, and nothing is written.
    disk.fail_writes.store(true, Ordering::Relaxed);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&fx.link)
            .unwrap();
        let mut buf = Aligned::new(4096);
        buf.buf().fill(0xEE);
        let err = f
            .write_all(buf.buf())
            .expect_err("write to a failing volume succeeded");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    }
    disk.fail_writes.store(false, Ordering::Relaxed);
    assert_eq!(disk.snapshot(0, 4096), vec![0; 4096]);

    assert!(!fx.dev().is_in_use());
    fx.detach();
}

#[test]
fn fuse_loop_ext4_survives_reattach() {
    require_tool("mkfs.ext4");
    require_tool("e2fsck");
    let mut fx = Fixture::new("ext4");
    let disk = MemDisk::new(64 * MIB);
    fx.attach(&disk);
    let link = fx.link.to_str().unwrap().to_string();
    run("mkfs.ext4", &["-q", "-F", &link]);

    let mnt = fx.mount_fs("mnt");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut sums = HashMap::new();
    for i in 0..100 {
        let len = rng.random_range(1..64 * 1024);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let name = format!("file-{i:03}");
        std::fs::write(mnt.join(&name), &data).unwrap();
        sums.insert(name, Sha256::digest(&data));
    }
    fx.umount_fs(&mnt);
    fx.detach();

    fx.attach(&disk);
    let mnt = fx.mount_fs("mnt");
    for (name, sum) in &sums {
        let data = std::fs::read(mnt.join(name)).unwrap();
        assert_eq!(
            &Sha256::digest(&data),
            sum,
            "{name} differs after re-attach"
        );
    }
    fx.umount_fs(&mnt);
    let out = run("e2fsck", &["-f", "-n", &link]);
    assert!(out.contains("clean") || !out.contains("Fix"), "fsck: {out}");
    fx.detach();
}

#[test]
fn fuse_loop_detach_refused_while_in_use() {
    require_tool("mkfs.ext4");
    let mut fx = Fixture::new("busy");
    let disk = MemDisk::new(32 * MIB);
    fx.attach(&disk);
    let link = fx.link.to_str().unwrap().to_string();
    run("mkfs.ext4", &["-q", "-F", &link]);
    let mnt = fx.mount_fs("mnt");
    assert!(fx.dev().is_in_use());
    match fx.dev().detach() {
        Err(FrontendError::Busy(msg)) => assert!(msg.contains("held open"), "{msg}"),
        other => panic!("detach while mounted: expected Busy, got {other:?}"),
    }
    // Still fully working after the refusal.
    std::fs::write(mnt.join("after-busy"), b"still here").unwrap();
    fx.umount_fs(&mnt);

    // An application holding a plain descriptor also makes it busy.
    let holder = std::fs::File::open(&fx.link).unwrap();
    assert!(fx.dev().is_in_use());
    assert!(matches!(fx.dev().detach(), Err(FrontendError::Busy(_))));
    drop(holder);
    // Free once the last opener is gone; another process probing the new device
    // (blkid after the unmount, a scan of /proc) may hold it a moment longer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fx.dev().is_in_use() {
        assert!(
            Instant::now() < deadline,
            "loop device still in use 5 s after the last close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    fx.detach();
}

#[test]
fn fuse_loop_discard_and_zeroout_reach_blockio() {
    let mut fx = Fixture::new("discard");
    let disk = MemDisk::new(32 * MIB);
    fx.attach(&disk);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.link)
            .unwrap();
        f.write_all(&vec![0x5Au8; 16 * MIB as usize]).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(disk.snapshot(MIB, 4096), vec![0x5A; 4096]);
    let link = fx.link.to_str().unwrap().to_string();

    run("blkdiscard", &["-o", "1048576", "-l", "4194304", &link]);
    assert!(
        disk.zeroes_unmap.load(Ordering::Relaxed) > 0,
        "discard did not reach BlockIo::write_zeroes(may_unmap)"
    );
    assert!(disk.snapshot(MIB, 4 * MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(disk.snapshot(5 * MIB, 4096), vec![0x5A; 4096]);

    run(
        "blkdiscard",
        &["-z", "-o", "8388608", "-l", "1048576", &link],
    );
    assert!(
        disk.zeroes_keep.load(Ordering::Relaxed) + disk.zeroes_unmap.load(Ordering::Relaxed) > 1,
        "zero-out did not reach BlockIo::write_zeroes"
    );
    assert!(disk.snapshot(8 * MIB, MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(disk.snapshot(9 * MIB, 4096), vec![0x5A; 4096]);
    fx.detach();
}

#[test]
fn fuse_loop_refuses_foreign_link_and_replaces_stale_one() {
    let mut fx = Fixture::new("link");
    let disk = MemDisk::new(8 * MIB);
    // A regular file at the device path is not ours.
    std::fs::write(&fx.link, b"not a device").unwrap();
    let device: Arc<dyn BlockIo> = disk.clone();
    match FuseLoopDevice::attach(device, fx.opts(), fx.rt.handle().clone()) {
        Err(FrontendError::LinkExists(p)) => assert_eq!(p, fx.link),
        other => panic!("expected LinkExists, got {other:?}"),
    }
    assert!(
        !is_mounted(&fx.opts().mount_dir),
        "failed attach left a mount"
    );
    std::fs::remove_file(&fx.link).unwrap();
    // A stale symlink to a loop device (crash leftover) is replaced.
    std::os::unix::fs::symlink("/dev/loop99999", &fx.link).unwrap();
    fx.attach(&disk);
    fx.detach();
}

/// Throughput figure (run with `--ignored --nocapture`): dd 64 MiB through the loop
/// device with O_DIRECT over a memory `BlockIo`.
#[test]
#[ignore]
fn fuse_loop_dd_throughput() {
    let mut fx = Fixture::new("dd");
    let disk = MemDisk::new(128 * MIB);
    let loop_name = fx.attach(&disk).loop_path().file_name().unwrap().to_owned();
    let dio_file = format!("/sys/block/{}/loop/dio", loop_name.to_str().unwrap());
    println!(
        "loop dio: {}",
        std::fs::read_to_string(dio_file).unwrap().trim()
    );
    let link = fx.link.to_str().unwrap().to_string();
    for bs in ["1M", "128k", "4k"] {
        let count = match bs {
            "1M" => "64",
            "128k" => "512",
            _ => "16384",
        };
        let t = Instant::now();
        run(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={link}"),
                &format!("bs={bs}"),
                &format!("count={count}"),
                "oflag=direct",
            ],
        );
        let w = t.elapsed();
        let t = Instant::now();
        run(
            "dd",
            &[
                &format!("if={link}"),
                "of=/dev/null",
                &format!("bs={bs}"),
                &format!("count={count}"),
                "iflag=direct",
            ],
        );
        let r = t.elapsed();
        println!(
            "bs={bs}: write {:.0} MiB/s, read {:.0} MiB/s",
            64.0 / w.as_secs_f64(),
            64.0 / r.as_secs_f64()
        );
    }
    // Queue depth 32 (what a filesystem or database issues), 4 KiB random.
    for rw in ["randwrite", "randread"] {
        let out = run(
            "fio",
            &[
                "--name=q32",
                &format!("--filename={link}"),
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=32",
                "--ioengine=libaio",
                "--direct=1",
                "--size=64m",
                "--runtime=3",
                "--time_based",
                "--output-format=terse",
                "--terse-version=3",
            ],
        );
        let f: Vec<&str> = out.trim().lines().last().unwrap().split(';').collect();
        let iops = if rw == "randwrite" { f[48] } else { f[7] };
        println!("fio 4k {rw} qd32: {iops} IOPS");
    }
    fx.detach();
}

#[test]
fn fuse_loop_drop_while_mounted_defers_cleanup() {
    require_tool("mkfs.ext4");
    let mut fx = Fixture::new("drop");
    let disk = MemDisk::new(32 * MIB);
    let loop_path = fx.attach(&disk).loop_path().to_path_buf();
    let link = fx.link.to_str().unwrap().to_string();
    run("mkfs.ext4", &["-q", "-F", &link]);
    let mnt = fx.mount_fs("mnt");
    // Dropping without detach must not hang nor break the mounted filesystem.
    let t = Instant::now();
    drop(fx.dev.take());
    assert!(t.elapsed() < Duration::from_secs(2), "drop blocked");
    assert!(std::fs::symlink_metadata(&fx.link).is_err(), "link kept");
    std::fs::write(mnt.join("after-drop"), b"still served").unwrap();
    fx.umount_fs(&mnt);
    // Last close of the loop device: it clears itself, and the FUSE file is released.
    let deadline = Instant::now() + Duration::from_secs(5);
    while loop_bound(&loop_path, fx.dir.path()) {
        assert!(Instant::now() < deadline, "loop device not auto-cleared");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!is_mounted(&fx.opts().mount_dir), "FUSE still mounted");
}

/// Child half of the crash test: attaches, reports, waits to be killed.
#[test]
#[ignore]
fn fuse_loop_crash_child() {
    let Ok(dir) = std::env::var("RDB_FUSE_CRASH_DIR") else {
        return; // only meaningful when started by the crash test
    };
    let link = std::env::var("RDB_FUSE_CRASH_LINK").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let disk = MemDisk::new(8 * MIB);
    let opts = FuseLoopOptions {
        mount_dir: Path::new(&dir).join("fuse"),
        file_name: "data".into(),
        link_path: link.into(),
        block_size_bytes: 4096,
    };
    let dev = FuseLoopDevice::attach(disk, opts, rt.handle().clone()).unwrap();
    println!("READY {}", dev.loop_path().display());
    std::mem::forget(dev);
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn fuse_loop_recovers_after_crash() {
    use std::io::BufRead;
    let mut fx = Fixture::new("crash");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fuse_loop_crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RDB_FUSE_CRASH_DIR", fx.dir.path())
        .env("RDB_FUSE_CRASH_LINK", &fx.link)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let old_loop = loop {
        let line = lines.next().expect("child exited before READY").unwrap();
        // libtest may print "test name ... " on the same line first.
        if let Some(at) = line.find("READY ") {
            break PathBuf::from(line[at + 6..].trim());
        }
    };
    child.kill().unwrap(); // SIGKILL: no cleanup at all
    child.wait().unwrap();
    let mount_dir = fx.opts().mount_dir;
    // opendir always asks the server (stat may be answered from the attribute cache).
    let err = std::fs::read_dir(&mount_dir).expect_err("dead FUSE mount still answers");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    assert!(loop_bound(&old_loop, fx.dir.path()));

    // A new attach clears the stale mount, loop device and symlink.
    let disk = MemDisk::new(8 * MIB);
    fx.attach(&disk);
    let new_loop = fx.dev().loop_path().to_path_buf();
    let old_still_bound = new_loop != old_loop && loop_bound(&old_loop, fx.dir.path());
    assert!(!old_still_bound, "stale loop device kept");
    fx.detach();
}
