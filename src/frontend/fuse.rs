//! FUSE + loop frontend: for kernels without nbd or ublk, a volume (an
//! `Arc<dyn BlockIo>`) is served as the single regular file of a FUSE mount, that
//! file is bound to a loop device, and the configured device path (e.g. `/dev/drbd0`)
//! becomes a symlink to the loop device, so `mkfs`, `mount` and applications use it
//! like any disk.
//!
//! This module owns the whole lifecycle ([`FuseLoopDevice::attach`] /
//! [`FuseLoopDevice::detach`]) and its errors ([`FrontendError`]); `fs` holds the
//! FUSE filesystem and `loopdev` the loop ioctls.
//!
//! Data path: the FUSE file is opened with `FOPEN_DIRECT_IO`, so the kernel keeps no
//! page cache for it and every read/write the loop driver issues arrives as a FUSE
//! request, which a task on the tokio runtime turns into a `BlockIo` call. A flush of
//! the loop device (`fsync`, `sync`, a filesystem's journal commit) makes the loop
//! driver `vfs_fsync` the backing file, which FUSE sends as `FSYNC` -> `BlockIo::flush`.
//! The only page cache involved is the one above the loop device (the filesystem's or
//! a buffered application's), which the usual flushes push down.
//!
//! Teardown order matters: the loop device holds the FUSE file open, so it is cleared
//! first, then FUSE is unmounted. All calls here block (syscalls, bounded waits): call
//! them from a blocking context (`spawn_blocking`), never from an async task.

mod fs;
mod loopdev;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use tokio::runtime::Handle;

use self::fs::VolumeFs;
use self::loopdev::{LoopDevice, LoopDirectIo};
use crate::storage::{BlockIo, IoError};

/// How long the FUSE session thread may take to end after the unmount.
const SESSION_JOIN_MS: u64 = 5_000;
/// How long the final volume flush at detach may take.
const DETACH_FLUSH_MS: u64 = 30_000;
/// Ask the loop driver for direct (asynchronous) I/O on the FUSE file: it then keeps
/// many requests in flight instead of one at a time. Falls back to buffered loop I/O
/// if the kernel refuses.
const LOOP_DIRECT_IO: bool = true;

/// Errors of the FUSE + loop frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Mounting the FUSE filesystem failed.
    #[error("FUSE mount on {mount_dir} failed: {source} ({hint})")]
    FuseMount {
        /// Where the mount was attempted.
        mount_dir: PathBuf,
        /// What the mount returned.
        #[source]
        source: io::Error,
        /// The likely cause and fix.
        hint: String,
    },
    /// `/dev/loop-control` does not exist.
    #[error("/dev/loop-control is missing: kernel module loop is not loaded: modprobe loop")]
    LoopControlMissing,
    /// The device path exists and is not a stale symlink to a loop device.
    #[error("device path {0} already exists and is not a symlink to a loop device")]
    LinkExists(PathBuf),
    /// The device is held open (mounted, opened by an application, stacked).
    #[error("{0}")]
    Busy(String),
    /// An option is out of range.
    #[error("invalid FUSE/loop option: {0}")]
    InvalidOption(String),
    /// The final flush of the volume at detach failed (data may not be stable).
    #[error("flushing the volume at detach failed: {0}")]
    Flush(#[source] IoError),
    /// Any other system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Where and how a volume is exposed.
#[derive(Debug, Clone)]
pub struct FuseLoopOptions {
    /// FUSE mount point; created if missing (e.g. `<run-dir>/fuse/<resource>`).
    pub mount_dir: PathBuf,
    /// Name of the single file in the mount (e.g. `data`).
    pub file_name: String,
    /// The configured device path, made a symlink to the loop device.
    pub link_path: PathBuf,
    /// Logical block size of the loop device: 512, 1024, 2048 or 4096.
    pub block_size_bytes: u32,
}

/// A volume exposed as a loop device over a FUSE file, with its device-path symlink.
pub struct FuseLoopDevice {
    device: Arc<dyn BlockIo>,
    rt: Handle,
    link_path: PathBuf,
    mount_dir: PathBuf,
    loop_path: PathBuf,
    /// `None` once cleared.
    loop_dev: Option<LoopDevice>,
    /// `None` once unmounted.
    session: Option<BackgroundSession>,
    detached: bool,
}

impl std::fmt::Debug for FuseLoopDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseLoopDevice")
            .field("size_bytes", &self.device.size_bytes())
            .field("link_path", &self.link_path)
            .field("loop_path", &self.loop_path)
            .field("mount_dir", &self.mount_dir)
            .field("detached", &self.detached)
            .finish_non_exhaustive()
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> FrontendError {
    let context = context.into();
    move |source| FrontendError::Io { context, source }
}

impl FuseLoopDevice {
    /// Mounts the FUSE filesystem, binds its file to a free loop device and points
    /// `opts.link_path` at it. Everything done so far is undone on failure.
    pub fn attach(
        device: Arc<dyn BlockIo>,
        opts: FuseLoopOptions,
        rt: Handle,
    ) -> Result<FuseLoopDevice, FrontendError> {
        validate(&*device, &opts)?;
        check_link_free(&opts.link_path)?;
        clear_stale_loop(&opts);
        prepare_mount_dir(&opts.mount_dir)?;

        let fs = VolumeFs::new(
            Arc::clone(&device),
            rt.clone(),
            OsString::from(&opts.file_name),
        );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("rdb".into()),
            MountOption::Subtype("rdb".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        // allow_other + default_permissions: the kernel enforces the file's 0600 root
        // mode for everybody, and requests from any context (loop kworkers) pass.
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(fs, &opts.mount_dir, &config).map_err(|source| {
            FrontendError::FuseMount {
                mount_dir: opts.mount_dir.clone(),
                hint: fuse_mount_hint(&source),
                source,
            }
        })?;

        let mut this = FuseLoopDevice {
            device,
            rt,
            link_path: opts.link_path.clone(),
            mount_dir: opts.mount_dir.clone(),
            loop_path: PathBuf::new(),
            loop_dev: None,
            session: Some(session),
            detached: false,
        };
        // From here on, `this` owns what exists; on error its Drop undoes it.
        // Absolute: it is recorded in the loop device to recognise it after a crash.
        let file_path = std::path::absolute(opts.mount_dir.join(&opts.file_name))
            .map_err(io_err("resolving the FUSE file path"))?;
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&file_path)
            .map_err(io_err(format!("opening FUSE file {}", file_path.display())))?;
        let loop_dev =
            LoopDevice::attach(&backing, &file_path, opts.block_size_bytes, LOOP_DIRECT_IO)?;
        // The loop driver holds its own reference to the file.
        drop(backing);
        this.loop_path = loop_dev.path().to_path_buf();
        tracing::info!(
            loop_dev = %this.loop_path.display(),
            link = %this.link_path.display(),
            direct_io = loop_dev.direct_io() == LoopDirectIo::Enabled,
            size_bytes = this.device.size_bytes(),
            "FUSE+loop device attached"
        );
        this.loop_dev = Some(loop_dev);
        install_link(&this.link_path, &this.loop_path)?;
        Ok(this)
    }

    /// The loop device (`/dev/loopN`).
    pub fn loop_path(&self) -> &Path {
        &self.loop_path
    }

    /// The configured device path (a symlink to [`Self::loop_path`]).
    pub fn link_path(&self) -> &Path {
        &self.link_path
    }

    /// Whether somebody holds the loop device: a mounted filesystem, an application
    /// with an open descriptor, or a stacked device.
    pub fn is_in_use(&self) -> bool {
        self.loop_dev.as_ref().is_some_and(LoopDevice::is_in_use)
    }

    /// Removes the symlink, clears the loop device (waiting until it is free), flushes
    /// the volume, unmounts FUSE and joins its session thread. Refuses with
    /// [`FrontendError::Busy`] while the device is in use (nothing is changed then).
    /// Calling it again after success does nothing. [`FrontendError::Flush`] means the
    /// teardown completed but the final volume flush failed.
    pub fn detach(&mut self) -> Result<(), FrontendError> {
        if self.detached {
            return Ok(());
        }
        if let Some(loop_dev) = &self.loop_dev {
            if loop_dev.is_in_use() {
                return Err(FrontendError::Busy(format!(
                    "device {} ({}) is held open (mounted?)",
                    self.link_path.display(),
                    self.loop_path.display()
                )));
            }
        }
        remove_link(&self.link_path, &self.loop_path);
        if let Some(loop_dev) = self.loop_dev.take() {
            if let Err(e) = loop_dev.clear(true) {
                // Somebody opened it between the check and the clear: the kernel
                // detaches it at their last close. Keep serving until then.
                self.loop_dev = Some(loop_dev);
                let _ = install_link(&self.link_path, &self.loop_path);
                return Err(e);
            }
        }
        let flushed = self.flush_volume();
        self.unmount_fuse()?;
        self.detached = true;
        tracing::info!(loop_dev = %self.loop_path.display(), "FUSE+loop device detached");
        flushed
    }

    /// Flushes the volume once nothing can write to it any more (bounded wait).
    fn flush_volume(&self) -> Result<(), FrontendError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let device = Arc::clone(&self.device);
        self.rt.spawn(async move {
            let _ = tx.send(device.flush().await);
        });
        match rx.recv_timeout(Duration::from_millis(DETACH_FLUSH_MS)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(FrontendError::Flush(e)),
            Err(RecvTimeoutError::Timeout) => {
                Err(FrontendError::Flush(IoError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("volume flush did not complete within {DETACH_FLUSH_MS} ms"),
                ))))
            }
            Err(RecvTimeoutError::Disconnected) => Err(FrontendError::Flush(IoError::Shutdown)),
        }
    }

    /// Unmounts FUSE (lazily if something still holds it) and joins the session.
    fn unmount_fuse(&mut self) -> Result<(), FrontendError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if let Err(e) = umount(&self.mount_dir, 0) {
            if e.raw_os_error() == Some(libc::EBUSY) {
                tracing::warn!(mount_dir = %self.mount_dir.display(), "FUSE mount busy; lazy unmount");
                umount(&self.mount_dir, libc::MNT_DETACH).map_err(io_err(format!(
                    "lazy unmount of {}",
                    self.mount_dir.display()
                )))?;
            } else if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
                // EINVAL/ENOENT: not mounted any more (someone unmounted it for us).
                self.session = Some(session);
                return Err(io_err(format!("unmounting {}", self.mount_dir.display()))(
                    e,
                ));
            }
        }
        let deadline = Instant::now() + Duration::from_millis(SESSION_JOIN_MS);
        while !session.guard.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "FUSE session thread still running {SESSION_JOIN_MS} ms after unmount; leaving it"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Err(e) = session.join() {
            tracing::warn!(error = %e, "FUSE session ended with an error");
        }
        Ok(())
    }
}

impl Drop for FuseLoopDevice {
    /// Best effort with bounded waits: a clean detach if nothing holds the device
    /// (including the final volume flush, up to `DETACH_FLUSH_MS`), otherwise the loop device is marked to clear itself at its last close and FUSE
    /// is lazily unmounted (its thread serves the loop device until then).
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        match self.detach() {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "FUSE+loop detach on drop failed; forcing"),
        }
        remove_link(&self.link_path, &self.loop_path);
        if let Some(loop_dev) = self.loop_dev.take() {
            let _ = loop_dev.clear(false);
        }
        if let Some(session) = self.session.take() {
            let _ = umount(&self.mount_dir, libc::MNT_DETACH);
            drop(session);
        }
        self.detached = true;
    }
}

fn validate(device: &dyn BlockIo, opts: &FuseLoopOptions) -> Result<(), FrontendError> {
    let bs = opts.block_size_bytes;
    if !(512..=4096).contains(&bs) || !bs.is_power_of_two() {
        return Err(FrontendError::InvalidOption(format!(
            "block size {bs} (must be 512, 1024, 2048 or 4096)"
        )));
    }
    let size = device.size_bytes();
    if size == 0 || size % u64::from(bs) != 0 {
        return Err(FrontendError::InvalidOption(format!(
            "volume size {size} bytes is not a non-zero multiple of the block size {bs}"
        )));
    }
    let name_ok = !opts.file_name.is_empty()
        && opts.file_name != "."
        && opts.file_name != ".."
        && !opts.file_name.contains(['/', '\0']);
    if !name_ok {
        return Err(FrontendError::InvalidOption(format!(
            "file name {:?}",
            opts.file_name
        )));
    }
    Ok(())
}

fn fuse_mount_hint(e: &io::Error) -> String {
    if !Path::new("/dev/fuse").exists() {
        "/dev/fuse is missing: modprobe fuse (in a container, pass the /dev/fuse device)".into()
    } else if e.kind() == io::ErrorKind::NotFound {
        "fusermount3 not found: install the fuse3 package (the mount needs /dev/fuse and \
         root or fusermount3)"
            .into()
    } else {
        "the mount needs /dev/fuse and either root (mount(2)) or the fuse3 package's \
         fusermount3"
            .into()
    }
}

/// After a crash, the device path may still point at a loop device bound to our
/// (now dead) FUSE file: clear it unless somebody holds it. Best effort.
fn clear_stale_loop(opts: &FuseLoopOptions) {
    let Ok(target) = std::fs::read_link(&opts.link_path) else {
        return;
    };
    let Some(stale) = LoopDevice::existing(&target) else {
        return;
    };
    let Ok(ours) = std::path::absolute(opts.mount_dir.join(&opts.file_name)) else {
        return;
    };
    if stale.bound_file_name().as_deref() != Some(ours.as_path()) {
        return;
    }
    if stale.is_in_use() {
        tracing::warn!(loop_dev = %target.display(),
            "stale loop device of a previous run is still held open; leaving it");
    } else if let Err(e) = stale.clear(true) {
        tracing::warn!(loop_dev = %target.display(), error = %e, "clearing stale loop device");
    } else {
        tracing::info!(loop_dev = %target.display(), "cleared stale loop device of a previous run");
    }
}

/// Creates the mount point; clears a stale FUSE mount left by a crashed daemon
/// ("Transport endpoint is not connected") and refuses a live mount.
fn prepare_mount_dir(dir: &Path) -> Result<(), FrontendError> {
    let stale = match std::fs::metadata(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(format!("stat {}", dir.display()))(e)),
        Ok(md) => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            let parent_md =
                std::fs::metadata(parent).map_err(io_err(format!("stat {}", parent.display())))?;
            if md.dev() == parent_md.dev() {
                false // a plain directory
            } else {
                // A mount point. The kernel may answer stat from its attribute cache
                // even for a dead FUSE server; statfs always asks the server.
                match statfs(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => true,
                    _ => {
                        return Err(FrontendError::Io {
                            context: format!("{} is already a mount point", dir.display()),
                            source: io::Error::from_raw_os_error(libc::EBUSY),
                        })
                    }
                }
            }
        }
    };
    if stale {
        tracing::warn!(mount_dir = %dir.display(), "clearing stale FUSE mount of a previous run");
        umount(dir, libc::MNT_DETACH)
            .map_err(io_err(format!("clearing stale mount {}", dir.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))
}

fn path_cstring(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn statfs(dir: &Path) -> io::Result<()> {
    let c = path_cstring(dir)?;
    // SAFETY: all-zero is a valid `statfs` value; the kernel overwrites it.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a live, writable statfs
    // struct, both outliving the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn umount(dir: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = path_cstring(dir)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `target` (a symlink's content) names a loop device.
fn is_loop_target(target: &Path) -> bool {
    target.as_os_str().as_bytes().starts_with(b"/dev/loop")
}

/// The device path must be absent or a stale symlink to a loop device.
fn check_link_free(link: &Path) -> Result<(), FrontendError> {
    match std::fs::symlink_metadata(link) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("stat {}", link.display()))(e)),
        Ok(md) if md.file_type().is_symlink() => {
            let target =
                std::fs::read_link(link).map_err(io_err(format!("readlink {}", link.display())))?;
            if is_loop_target(&target) {
                Ok(())
            } else {
                Err(FrontendError::LinkExists(link.to_path_buf()))
            }
        }
        Ok(_) => Err(FrontendError::LinkExists(link.to_path_buf())),
    }
}

/// Points `link` at `target` atomically (temporary symlink, then rename over).
fn install_link(link: &Path, target: &Path) -> Result<(), FrontendError> {
    check_link_free(link)?;
    let parent = link.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let name = link.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some(name) = name else {
        return Err(FrontendError::InvalidOption(format!(
            "device path {}",
            link.display()
        )));
    };
    let tmp = parent.join(format!(".{name}.rdb-tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(io_err(format!("symlink {}", tmp.display())))?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(format!(
            "renaming {} to {}",
            tmp.display(),
            link.display()
        ))(e));
    }
    Ok(())
}

/// Removes `link` if it still points at `target`.
fn remove_link(link: &Path, target: &Path) {
    if target.as_os_str().is_empty() {
        return;
    }
    match std::fs::read_link(link) {
        Ok(t) if t == target => {
            if let Err(e) = std::fs::remove_file(link) {
                tracing::warn!(link = %link.display(), error = %e, "removing device symlink");
            }
        }
        _ => {}
    }
}
