//! Loop devices driven by ioctl (no `losetup` binary): allocate a free device through
//! `/dev/loop-control`, bind a backing file to it, tell whether someone holds it open,
//! and clear it again, waiting (bounded) until the kernel has really let it go.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::FrontendError;

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// Major number of loop block devices.
const LOOP_MAJOR: u32 = 7;
/// How many times a free device is requested when another process races us to it.
const GET_FREE_ATTEMPTS: u32 = 16;
/// How long a cleared loop device may take to release its backing file.
const CLEAR_WAIT_MS: u64 = 5_000;
/// How long to wait for a device node / sysfs entry to show up after allocation.
const NODE_WAIT_MS: u64 = 2_000;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn new(backing_name: &Path) -> LoopInfo64 {
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        // The kernel shows this name in sysfs when the path is longer; keep a NUL at the end.
        let name = backing_name.as_os_str().as_bytes();
        let n = name.len().min(info.lo_file_name.len() - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        info
    }
}

/// `ioctl` with an integer argument; returns the (non-negative) result.
fn ioctl_int(fd: &impl AsRawFd, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: the fd is open for the duration of the call; the loop ioctls used with
    // this helper take an integer argument (not a pointer), so no memory is touched.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `ioctl` whose argument points at `*arg` (read by the kernel only).
fn ioctl_ptr<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &T) -> io::Result<()> {
    // SAFETY: `arg` is a live, properly initialised `#[repr(C)]` struct matching what
    // the kernel expects for `request` (loop_info64 / loop_config); the kernel only
    // reads it during the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *const T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl` that fills `*arg`.
fn ioctl_out<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct of the layout
    // the kernel writes for `request` (loop_info64); any bit pattern is valid for it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> FrontendError {
    move |source| FrontendError::Io { context, source }
}

/// Whether the loop device can use direct I/O on its backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LoopDirectIo {
    /// The loop driver submits asynchronous direct I/O to the backing file.
    Enabled,
    /// The loop driver uses buffered (synchronous) reads and writes.
    Disabled,
}

/// One bound loop device.
#[derive(Debug)]
pub(super) struct LoopDevice {
    index: u32,
    path: PathBuf,
    rdev: u64,
    /// We created `path` with mknod (no devtmpfs/udev) and remove it when cleared.
    created_node: bool,
    direct_io: LoopDirectIo,
}

impl LoopDevice {
    /// Binds `backing` to a free loop device with the given logical block size.
    /// `backing_name` is only recorded for display (`losetup -a`).
    pub(super) fn attach(
        backing: &File,
        backing_name: &Path,
        block_size_bytes: u32,
        want_direct_io: bool,
    ) -> Result<LoopDevice, FrontendError> {
        let ctl = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FrontendError::LoopControlMissing)
            }
            Err(e) => return Err(io_err("opening /dev/loop-control".into())(e)),
        };
        let mut last_busy = None;
        for _ in 0..GET_FREE_ATTEMPTS {
            let index = ioctl_int(&ctl, LOOP_CTL_GET_FREE, 0)
                .map_err(io_err("LOOP_CTL_GET_FREE".into()))?;
            let index = u32::try_from(index).map_err(|_| FrontendError::Io {
                context: "LOOP_CTL_GET_FREE".into(),
                source: io::Error::other("negative loop index"),
            })?;
            let (path, rdev, created_node) = ensure_node(index)?;
            let dev = LoopDevice {
                index,
                path,
                rdev,
                created_node,
                direct_io: LoopDirectIo::Disabled,
            };
            match dev.bind(backing, backing_name, block_size_bytes) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Someone else took this device between GET_FREE and our bind.
                    last_busy = Some(e);
                    dev.remove_created_node();
                    continue;
                }
                Err(e) => {
                    dev.remove_created_node();
                    return Err(io_err(format!("binding {}", dev.path.display()))(e));
                }
            }
            let mut dev = dev;
            if want_direct_io {
                dev.direct_io = match dev.set_direct_io() {
                    Ok(()) => LoopDirectIo::Enabled,
                    Err(e) => {
                        tracing::info!(loop_dev = %dev.path.display(), error = %e,
                            "loop direct I/O not available on the FUSE file; using buffered loop I/O");
                        LoopDirectIo::Disabled
                    }
                };
            }
            return Ok(dev);
        }
        Err(io_err(format!(
            "no free loop device after {GET_FREE_ATTEMPTS} attempts (all raced away)"
        ))(last_busy.unwrap_or_else(|| {
            io::Error::from_raw_os_error(libc::EBUSY)
        })))
    }

    /// An already existing loop device node (e.g. a stale symlink's target), if `path`
    /// is a loop block device.
    pub(super) fn existing(path: &Path) -> Option<LoopDevice> {
        let index: u32 = path.to_str()?.strip_prefix("/dev/loop")?.parse().ok()?;
        let md = std::fs::metadata(path).ok()?;
        if !md.file_type().is_block_device() {
            return None;
        }
        Some(LoopDevice {
            index,
            path: path.to_path_buf(),
            rdev: md.rdev(),
            created_node: false,
            direct_io: LoopDirectIo::Disabled,
        })
    }

    /// The backing file name recorded at bind time (`lo_file_name`), if bound.
    pub(super) fn bound_file_name(&self) -> Option<PathBuf> {
        let dev = self.open_rw().ok()?;
        let mut info = LoopInfo64::new(Path::new(""));
        ioctl_out(&dev, LOOP_GET_STATUS64, &mut info).ok()?;
        let end = info.lo_file_name.iter().position(|&b| b == 0)?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(
            &info.lo_file_name[..end],
        )))
    }

    /// Opens the device node read-write (not exclusively).
    fn open_rw(&self) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.path)
    }

    /// LOOP_CONFIGURE, or the older SET_FD + SET_STATUS64 + SET_BLOCK_SIZE sequence.
    fn bind(&self, backing: &File, backing_name: &Path, block_size_bytes: u32) -> io::Result<()> {
        let dev = self.open_rw()?;
        let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
        let config = LoopConfig {
            fd,
            block_size: block_size_bytes,
            info: LoopInfo64::new(backing_name),
            reserved: [0; 8],
        };
        match ioctl_ptr(&dev, LOOP_CONFIGURE, &config) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
                tracing::debug!(error = %e, "LOOP_CONFIGURE unsupported, using LOOP_SET_FD");
            }
            Err(e) => return Err(e),
        }
        ioctl_int(&dev, LOOP_SET_FD, libc::c_ulong::from(fd))?;
        let configured = ioctl_ptr(&dev, LOOP_SET_STATUS64, &config.info)
            .and_then(|()| ioctl_int(&dev, LOOP_SET_BLOCK_SIZE, block_size_bytes.into()));
        if let Err(e) = configured {
            // Undo the half-configured binding; the error that matters is `e`.
            let _ = ioctl_int(&dev, LOOP_CLR_FD, 0);
            return Err(e);
        }
        Ok(())
    }

    fn set_direct_io(&self) -> io::Result<()> {
        let dev = self.open_rw()?;
        ioctl_int(&dev, LOOP_SET_DIRECT_IO, 1).map(|_| ())
    }

    /// `/dev/loopN`.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the loop driver uses direct I/O on the backing file.
    pub(super) fn direct_io(&self) -> LoopDirectIo {
        self.direct_io
    }

    /// Whether anybody holds the device: a mounted filesystem or another exclusive
    /// opener (O_EXCL fails with EBUSY), a stacked device (sysfs holders), or any open
    /// file descriptor in any process (including this one: the frontend keeps none).
    pub(super) fn is_in_use(&self) -> bool {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(&self.path)
        {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return true,
            // Other errors (node vanished...) say nothing about holders: look further.
            Ok(_) | Err(_) => {}
        }
        let holders = format!("/sys/block/loop{}/holders", self.index);
        if let Ok(mut entries) = std::fs::read_dir(holders) {
            if entries.next().is_some() {
                return true;
            }
        }
        any_process_has_open(self.rdev)
    }

    /// Detaches the backing file; with `wait`, waits (bounded) until the device is
    /// free. If someone still has it open, the kernel finishes at their last close.
    pub(super) fn clear(&self, wait: bool) -> Result<(), FrontendError> {
        match self.open_rw() {
            Ok(dev) => match ioctl_int(&dev, LOOP_CLR_FD, 0) {
                // ENXIO: nothing bound (already cleared).
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => return Err(io_err(format!("LOOP_CLR_FD on {}", self.path.display()))(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("opening {}", self.path.display()))(e)),
        }
        if !wait {
            return Ok(());
        }
        // The kernel finishes the clear when the last opener closes; wait for it.
        let backing = format!("/sys/block/loop{}/loop/backing_file", self.index);
        let deadline = Instant::now() + Duration::from_millis(CLEAR_WAIT_MS);
        while Path::new(&backing).exists() {
            if Instant::now() >= deadline {
                return Err(FrontendError::Busy(format!(
                    "device {} still has a backing file {CLEAR_WAIT_MS} ms after LOOP_CLR_FD",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.remove_created_node();
        Ok(())
    }

    fn remove_created_node(&self) {
        if self.created_node {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "removing loop node");
            }
        }
    }
}

/// Makes sure `/dev/loop<index>` exists as the right block device; creates it with
/// mknod when there is no devtmpfs/udev to do it. Returns (path, rdev, created).
fn ensure_node(index: u32) -> Result<(PathBuf, u64, bool), FrontendError> {
    let path = PathBuf::from(format!("/dev/loop{index}"));
    let (major, minor) = sysfs_dev_numbers(index)?;
    let want_rdev = libc::makedev(major, minor);
    // devtmpfs normally has the node before GET_FREE returns; wait briefly, then mknod.
    let mknod_after = Instant::now() + Duration::from_millis(NODE_WAIT_MS / 10);
    loop {
        match std::fs::metadata(&path) {
            Ok(md) if md.file_type().is_block_device() && md.rdev() == want_rdev => {
                return Ok((path, want_rdev, false));
            }
            Ok(_) => {
                return Err(FrontendError::Io {
                    context: format!(
                        "{} is not loop block device {major}:{minor}",
                        path.display()
                    ),
                    source: io::Error::from_raw_os_error(libc::EEXIST),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < mknod_after => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let cpath =
                    CString::new(path.as_os_str().as_bytes()).map_err(|_| FrontendError::Io {
                        context: "loop path".into(),
                        source: io::Error::other("NUL in path"),
                    })?;
                // SAFETY: `cpath` is a valid NUL-terminated path for the duration of
                // the call; mknod takes no other pointers.
                let rc = unsafe { libc::mknod(cpath.as_ptr(), libc::S_IFBLK | 0o600, want_rdev) };
                if rc == 0 {
                    return Ok((path, want_rdev, true));
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(io_err(format!("mknod {}", path.display()))(e));
                }
            }
            Err(e) => return Err(io_err(format!("stat {}", path.display()))(e)),
        }
    }
}

/// Reads `major:minor` of loop device `index` from sysfs (the minor is not `index`
/// when the loop module was loaded with `max_part`).
fn sysfs_dev_numbers(index: u32) -> Result<(u32, u32), FrontendError> {
    let file = format!("/sys/block/loop{index}/dev");
    let deadline = Instant::now() + Duration::from_millis(NODE_WAIT_MS);
    let text = loop {
        match std::fs::read_to_string(&file) {
            Ok(t) => break t,
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // No sysfs entry (unusual sandbox): fall back to the classic numbering.
                return Ok((LOOP_MAJOR, index));
            }
            Err(e) => return Err(io_err(format!("reading {file}"))(e)),
        }
    };
    let parsed = text
        .trim()
        .split_once(':')
        .and_then(|(ma, mi)| Some((ma.parse::<u32>().ok()?, mi.parse::<u32>().ok()?)));
    parsed.ok_or_else(|| FrontendError::Io {
        context: format!("parsing {file}: {:?}", text.trim()),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Scans `/proc/*/fd` for a descriptor open on the block device `rdev`.
fn any_process_has_open(rdev: u64) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for proc_entry in procs.flatten() {
        let name = proc_entry.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // Cheap filter on the link text before stat'ing what it points to.
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            // Sockets, pipes and anonymous inodes ("socket:[..]") are not paths.
            if !target.as_os_str().as_bytes().starts_with(b"/") {
                continue;
            }
            if let Ok(md) = std::fs::metadata(fd.path()) {
                if md.file_type().is_block_device() && md.rdev() == rdev {
                    return true;
                }
            }
        }
    }
    false
}
