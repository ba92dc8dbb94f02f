//! Kernel NBD frontend: the volume as `/dev/nbdX`, served by rdbd's own NBD code.
//!
//! This module owns the lifecycle of one kernel NBD device ([`KernelNbdDevice`]):
//! `socketpair()`s whose one end is served by the NBD transmission code of
//! [`super::nbd`] (the kernel starts in the transmission phase, no handshake) and
//! whose other end is handed to the kernel with generic netlink `NBD_CMD_CONNECT`
//! (several sockets = several hardware queues, size, block size, server flags,
//! `dead_conn_timeout`), `NBD_CMD_RECONFIGURE` to give a device new sockets after an
//! rdbd restart, and `NBD_CMD_DISCONNECT` at detach. When the netlink family is
//! missing but `/dev/nbd0` exists (very old kernels), the ioctl interface is used
//! (`NBD_SET_SOCK`, `NBD_DO_IT` on a thread, `NBD_DISCONNECT`).
//!
//! It also owns the device symlink helpers shared with the ublk frontend and the
//! module checks that give the administrator a clear message instead of a hang.
//!
//! Every call here blocks (syscalls and bounded waits): call them from a blocking
//! context (`block_in_place`, `spawn_blocking`), never from an async task.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::watch;

use super::kernel_nbd_genl::{self as genl, nbd as attr, AttrBuf, GenlError, GenlSocket};
use super::nbd::{kernel_transmission_flags, serve_transmission_only, ExportInfo, NbdLimits};

/// The message of item 3 of the frontends issue: what to do when nbd is missing.
pub const NBD_MODULE_MISSING: &str =
    "kernel module nbd is not loaded: `modprobe nbd`, or use `frontend fuse`";
/// How long a netlink request may wait for the kernel.
const NETLINK_TIMEOUT_MS: u64 = 10_000;
/// How long detach waits for the serving tasks once the kernel disconnected.
const DETACH_WAIT_MS: u64 = 10_000;
/// How long attach waits for the device node to appear.
const NODE_WAIT_MS: u64 = 5_000;

// ioctl numbers of <linux/nbd.h>: _IO(0xab, n).
const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// Errors of the kernel NBD frontend.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    /// Neither the netlink family nor `/dev/nbd0` exist.
    #[error("{}", NBD_MODULE_MISSING)]
    ModuleMissing,
    /// The device is held open.
    #[error("{0}")]
    Busy(String),
    /// A netlink request failed.
    #[error("netlink NBD: {0}")]
    Genl(#[from] GenlError),
    /// The device path exists and is not a symlink.
    #[error("device path {0} already exists and is not a symlink")]
    LinkExists(PathBuf),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> KernelNbdError {
    let context = context.into();
    move |source| KernelNbdError::Io { context, source }
}

/// Whether this kernel can give us `/dev/nbdX` (`Err` says why not, in words).
pub fn module_available() -> Result<(), KernelNbdError> {
    if Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists() {
        Ok(())
    } else {
        Err(KernelNbdError::ModuleMissing)
    }
}

/// How the kernel device is set up.
#[derive(Debug, Clone)]
pub struct KernelNbdOptions {
    /// The configured device path, made a symlink to `/dev/nbdX`.
    pub link_path: PathBuf,
    /// Sockets (kernel hardware queues), at least 1.
    pub connections: usize,
    /// Logical block size given to the kernel.
    pub block_size_bytes: u64,
    /// Request timeout in seconds; 0 = none (the kernel only warns about slow requests).
    pub timeout_s: u64,
    /// How long the kernel holds I/O when every socket is dead, waiting for
    /// `NBD_CMD_RECONFIGURE` (an rdbd restart), before failing it.
    pub dead_conn_timeout_s: u64,
    /// Where the device index is recorded, so a restarted rdbd reconfigures the same
    /// device instead of creating a new one.
    pub state_path: PathBuf,
    /// Use the ioctl interface even if netlink is there (tests of the fallback).
    pub force_ioctl: bool,
    /// Busy-poll budget of an idle socket (see [`NbdLimits::busy_poll_us`]).
    pub busy_poll_us: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl KernelNbdOptions {
    /// Defaults, overridden by rdbd's environment (`RDB_NBD_CONNECTIONS`,
    /// `RDB_NBD_TIMEOUT_S`, `RDB_NBD_DEAD_CONN_TIMEOUT_S`, `RDB_NBD_IOCTL=1`).
    pub fn from_env(link_path: PathBuf, state_path: PathBuf) -> Self {
        KernelNbdOptions {
            link_path,
            connections: env_u64("RDB_NBD_CONNECTIONS", 2).clamp(1, 16) as usize,
            block_size_bytes: 4096,
            timeout_s: env_u64("RDB_NBD_TIMEOUT_S", 0),
            dead_conn_timeout_s: env_u64("RDB_NBD_DEAD_CONN_TIMEOUT_S", 60),
            state_path,
            force_ioctl: std::env::var("RDB_NBD_IOCTL").is_ok_and(|v| v == "1"),
            busy_poll_us: super::nbd::DEFAULT_BUSY_POLL_US,
        }
    }
}

/// The control channel of an attached device.
enum Control {
    Netlink {
        family: u16,
    },
    Ioctl {
        file: File,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

/// A volume attached to a kernel NBD device.
pub struct KernelNbdDevice {
    index: u32,
    node: DeviceNode,
    opts: KernelNbdOptions,
    control: Control,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    detached: bool,
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is valid for two ints; the result is checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn ioctl(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: NBD ioctls take an integer argument (no pointer is passed).
    let rc = unsafe { libc::ioctl(fd, req as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads the device index a previous rdbd recorded.
fn recorded_index(state_path: &Path) -> Option<u32> {
    std::fs::read_to_string(state_path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether `/dev/nbd<index>` is configured (has sockets, dead or alive).
fn is_configured(index: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// The backend identifier rdbd gives its devices: names the run directory and
/// resource, so a stale record never makes rdbd touch somebody else's device.
fn backend_id(state_path: &Path) -> String {
    format!("rdb:{}", state_path.display())
}

/// Whether `/dev/nbd<index>` is configured and carries our backend identifier.
fn is_ours(index: u32, backend: &str) -> bool {
    is_configured(index)
        && std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
            .is_ok_and(|b| b.trim_end_matches('\n') == backend)
}

fn sockets_attr(kernel_fds: &[OwnedFd]) -> AttrBuf {
    let mut socks = AttrBuf::new();
    for fd in kernel_fds {
        let mut item = AttrBuf::new();
        item.put_u32(attr::SOCK_FD, fd.as_raw_fd() as u32);
        socks.put_nested(attr::SOCK_ITEM, &item);
    }
    socks
}

impl KernelNbdDevice {
    /// Attaches `export` to a kernel NBD device (reconfiguring the one a previous
    /// rdbd left behind, if any) and installs the symlink.
    pub fn attach(
        export: ExportInfo,
        opts: KernelNbdOptions,
        runtime: &Handle,
    ) -> Result<KernelNbdDevice, KernelNbdError> {
        module_available()?;
        let size_bytes = export.device.size_bytes();
        let flags = u64::from(kernel_transmission_flags(&export));
        let limits = NbdLimits {
            busy_poll_us: opts.busy_poll_us,
            ..NbdLimits::default()
        };

        // Our ends are served right away: the kernel may send requests (partition
        // scan) as soon as it has its ends.
        let (stop, stop_rx) = watch::channel(false);
        let mut kernel_fds = Vec::new();
        let mut tasks = Vec::new();
        {
            let _guard = runtime.enter();
            for _ in 0..opts.connections.max(1) {
                let (ours, theirs) = socketpair().map_err(io_err("socketpair"))?;
                // SAFETY: `ours` is a fresh unix stream socket we own.
                let std_stream =
                    unsafe { std::os::unix::net::UnixStream::from_raw_fd(ours.into_raw_fd()) };
                std_stream
                    .set_nonblocking(true)
                    .map_err(io_err("socket O_NONBLOCK"))?;
                let stream = tokio::net::UnixStream::from_std(std_stream)
                    .map_err(io_err("registering the NBD socket"))?;
                let export = export.clone();
                let stop_rx = stop_rx.clone();
                tasks.push(runtime.spawn(async move {
                    match serve_transmission_only(export, limits, stream, stop_rx).await {
                        Ok(()) => tracing::debug!("kernel NBD connection closed"),
                        Err(e) => tracing::info!(error = %e, "kernel NBD connection ended"),
                    }
                }));
                kernel_fds.push(theirs);
            }
        }
        let fail = |e: KernelNbdError, stop: &watch::Sender<bool>| {
            let _ = stop.send(true);
            e
        };

        let netlink = if opts.force_ioctl {
            None
        } else {
            let mut sock =
                GenlSocket::open(NETLINK_TIMEOUT_MS).map_err(|e| fail(e.into(), &stop))?;
            match sock.resolve_family(attr::FAMILY_NAME) {
                Ok(family) => Some((sock, family)),
                Err(GenlError::NoFamily(_)) if Path::new("/dev/nbd0").exists() => {
                    tracing::warn!("generic netlink family nbd missing; using the NBD ioctls");
                    None
                }
                Err(GenlError::NoFamily(_)) => {
                    return Err(fail(KernelNbdError::ModuleMissing, &stop))
                }
                Err(e) => return Err(fail(e.into(), &stop)),
            }
        };

        let (index, control, how) = match netlink {
            Some((mut sock, family)) => {
                let mut reconfigured = None;
                let backend = backend_id(&opts.state_path);
                if let Some(old) =
                    recorded_index(&opts.state_path).filter(|i| is_ours(*i, &backend))
                {
                    let mut a = AttrBuf::new();
                    a.put_u32(attr::ATTR_INDEX, old)
                        .put_str(attr::ATTR_BACKEND_IDENTIFIER, &backend)
                        .put_nested(attr::ATTR_SOCKETS, &sockets_attr(&kernel_fds));
                    match sock.request(family, attr::CMD_RECONFIGURE, attr::VERSION, &a) {
                        Ok(_) => reconfigured = Some(old),
                        Err(e) => {
                            tracing::warn!(index = old, error = %e,
                                "NBD_CMD_RECONFIGURE failed; disconnecting the old device");
                            let mut d = AttrBuf::new();
                            d.put_u32(attr::ATTR_INDEX, old);
                            let _ = sock.request(family, attr::CMD_DISCONNECT, attr::VERSION, &d);
                        }
                    }
                }
                match reconfigured {
                    Some(index) => (
                        index,
                        Control::Netlink { family },
                        format!(
                            "kernel NBD /dev/nbd{index} reconfigured with {} new socket(s) (netlink NBD_CMD_RECONFIGURE)",
                            kernel_fds.len()
                        ),
                    ),
                    None => {
                        let mut a = AttrBuf::new();
                        a.put_u64(attr::ATTR_SIZE_BYTES, size_bytes)
                            .put_u64(attr::ATTR_BLOCK_SIZE_BYTES, opts.block_size_bytes)
                            .put_u64(attr::ATTR_SERVER_FLAGS, flags)
                            .put_u64(attr::ATTR_DEAD_CONN_TIMEOUT, opts.dead_conn_timeout_s)
                            .put_str(attr::ATTR_BACKEND_IDENTIFIER, &backend);
                        if opts.timeout_s > 0 {
                            a.put_u64(attr::ATTR_TIMEOUT, opts.timeout_s);
                        }
                        a.put_nested(attr::ATTR_SOCKETS, &sockets_attr(&kernel_fds));
                        let replies = sock
                            .request(family, attr::CMD_CONNECT, attr::VERSION, &a)
                            .map_err(|e| fail(e.into(), &stop))?;
                        let mut index = None;
                        for r in &replies {
                            for (kind, payload) in genl::parse_attrs(r).map_err(|e| fail(e.into(), &stop))? {
                                if kind == attr::ATTR_INDEX {
                                    index = Some(genl::attr_u32(payload).map_err(|e| fail(e.into(), &stop))?);
                                }
                            }
                        }
                        let Some(index) = index else {
                            return Err(fail(
                                KernelNbdError::Other("NBD_CMD_CONNECT reply has no device index".into()),
                                &stop,
                            ));
                        };
                        (
                            index,
                            Control::Netlink { family },
                            format!(
                                "kernel NBD /dev/nbd{index} via netlink, {} connection(s), dead_conn_timeout {} s",
                                kernel_fds.len(),
                                opts.dead_conn_timeout_s
                            ),
                        )
                    }
                }
            }
            None => Self::attach_ioctl(&opts, &kernel_fds, size_bytes, flags)
                .map_err(|e| fail(e, &stop))?,
        };
        // The kernel holds its own references to its ends now.
        drop(kernel_fds);
        let node = DeviceNode {
            dev_path: PathBuf::from(format!("/dev/nbd{index}")),
            link_path: opts.link_path.clone(),
            how,
        };
        let mut dev = KernelNbdDevice {
            index,
            node,
            opts,
            control,
            stop,
            tasks,
            detached: false,
        };
        if let Err(e) = std::fs::write(&dev.opts.state_path, format!("{index}\n")) {
            tracing::warn!(path = %dev.opts.state_path.display(), error = %e, "cannot record the NBD index");
        }
        let deadline = Instant::now() + Duration::from_millis(NODE_WAIT_MS);
        while !dev.node.dev_path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = install_link(&dev.node.link_path, &dev.node.dev_path) {
            let _ = dev.teardown();
            return Err(e);
        }
        tracing::info!("{}", dev.node.how);
        Ok(dev)
    }

    fn attach_ioctl(
        opts: &KernelNbdOptions,
        kernel_fds: &[OwnedFd],
        size_bytes: u64,
        flags: u64,
    ) -> Result<(u32, Control, String), KernelNbdError> {
        let mut index = None;
        for i in 0..1024u32 {
            if !Path::new(&format!("/dev/nbd{i}")).exists() {
                break;
            }
            if !is_configured(i) {
                index = Some(i);
                break;
            }
        }
        let Some(index) = index else {
            return Err(KernelNbdError::Other("no free /dev/nbdX device".into()));
        };
        let path = format!("/dev/nbd{index}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err(format!("opening {path}")))?;
        let fd = file.as_raw_fd();
        let bs = opts.block_size_bytes;
        ioctl(fd, NBD_SET_BLKSIZE, bs as libc::c_ulong).map_err(io_err("NBD_SET_BLKSIZE"))?;
        ioctl(fd, NBD_SET_SIZE_BLOCKS, (size_bytes / bs) as libc::c_ulong)
            .map_err(io_err("NBD_SET_SIZE_BLOCKS"))?;
        ioctl(fd, NBD_SET_FLAGS, flags as libc::c_ulong).map_err(io_err("NBD_SET_FLAGS"))?;
        if opts.timeout_s > 0 {
            ioctl(fd, NBD_SET_TIMEOUT, opts.timeout_s as libc::c_ulong)
                .map_err(io_err("NBD_SET_TIMEOUT"))?;
        }
        for k in kernel_fds {
            ioctl(fd, NBD_SET_SOCK, k.as_raw_fd() as libc::c_ulong)
                .map_err(io_err("NBD_SET_SOCK"))?;
        }
        // NBD_DO_IT runs the device until NBD_DISCONNECT; it needs its own thread
        // and its own descriptor.
        let do_it = file.try_clone().map_err(io_err("dup of the NBD fd"))?;
        let thread = std::thread::Builder::new()
            .name(format!("nbd{index}-do-it"))
            .spawn(move || {
                let fd = do_it.as_raw_fd();
                if let Err(e) = ioctl(fd, NBD_DO_IT, 0) {
                    tracing::info!(error = %e, "NBD_DO_IT returned");
                }
                let _ = ioctl(fd, NBD_CLEAR_SOCK, 0);
            })
            .map_err(io_err("spawning the NBD_DO_IT thread"))?;
        // Wait until the kernel reports the device running (its pid file).
        let deadline = Instant::now() + Duration::from_millis(NODE_WAIT_MS);
        while !is_configured(index) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((
            index,
            Control::Ioctl {
                file,
                thread: Some(thread),
            },
            format!(
                "kernel NBD /dev/nbd{index} via ioctl (no netlink), {} connection(s)",
                kernel_fds.len()
            ),
        ))
    }

    /// Disconnects the device and stops serving it; refused while it is in use.
    pub fn detach(&mut self) -> Result<(), KernelNbdError> {
        if self.detached {
            return Ok(());
        }
        if let Some(busy) = self.node.busy() {
            return Err(KernelNbdError::Busy(busy));
        }
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), KernelNbdError> {
        remove_link(&self.node.link_path, &self.node.dev_path);
        let result = match &mut self.control {
            Control::Netlink { family } => {
                let mut a = AttrBuf::new();
                a.put_u32(attr::ATTR_INDEX, self.index);
                GenlSocket::open(NETLINK_TIMEOUT_MS)
                    .and_then(|mut s| s.request(*family, attr::CMD_DISCONNECT, attr::VERSION, &a))
                    .map(|_| ())
                    .map_err(KernelNbdError::from)
            }
            Control::Ioctl { file, thread } => {
                let r =
                    ioctl(file.as_raw_fd(), NBD_DISCONNECT, 0).map_err(io_err("NBD_DISCONNECT"));
                if let Some(t) = thread.take() {
                    let deadline = Instant::now() + Duration::from_millis(DETACH_WAIT_MS);
                    while !t.is_finished() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if t.is_finished() {
                        let _ = t.join();
                    } else {
                        tracing::warn!("NBD_DO_IT thread did not end");
                    }
                }
                r
            }
        };
        // The kernel sent NBD_CMD_DISC and shut its ends: the tasks end by
        // themselves; the stop signal bounds the wait for the rest.
        let deadline = Instant::now() + Duration::from_millis(DETACH_WAIT_MS);
        while self.tasks.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.stop.send(true);
        let deadline = Instant::now() + Duration::from_millis(2_000);
        while self.tasks.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.opts.state_path);
        self.detached = true;
        tracing::info!(device = %self.node.dev_path.display(), "kernel NBD device disconnected");
        result
    }
}

impl std::ops::Deref for KernelNbdDevice {
    type Target = DeviceNode;

    /// The accessors shared with ublk: `dev_path` (`/dev/nbdX`), `link_path`,
    /// `description`, `is_in_use`.
    fn deref(&self) -> &DeviceNode {
        &self.node
    }
}

impl Drop for KernelNbdDevice {
    fn drop(&mut self) {
        // Dropping without detach (daemon exit) leaves the kernel device configured:
        // a restarted rdbd reconfigures it. Only stop our side.
        let _ = self.stop.send(true);
    }
}

/// What the kernel block-device frontends (kernel NBD, ublk) share: the kernel
/// device node, the configured symlink to it and how it was set up. Both devices
/// dereference to it for these accessors.
#[derive(Debug)]
pub struct DeviceNode {
    pub(crate) dev_path: PathBuf,
    pub(crate) link_path: PathBuf,
    pub(crate) how: String,
}

impl DeviceNode {
    /// The kernel device (`/dev/nbdX`, `/dev/ublkbN`).
    pub fn dev_path(&self) -> &Path {
        &self.dev_path
    }

    /// The configured device path (symlink).
    pub fn link_path(&self) -> &Path {
        &self.link_path
    }

    /// How the device was set up, for `status`.
    pub fn description(&self) -> &str {
        &self.how
    }

    /// Whether the device is held open exclusively (mounted, or opened O_EXCL).
    pub fn is_in_use(&self) -> bool {
        is_held_open(&self.dev_path)
    }

    /// Why the device cannot be taken away now (it is held open), if it cannot.
    pub(crate) fn busy(&self) -> Option<String> {
        self.is_in_use().then(|| {
            format!(
                "device {} ({}) is held open (mounted?)",
                self.link_path.display(),
                self.dev_path.display()
            )
        })
    }
}

/// Whether a block device is held open exclusively (mounted, O_EXCL opener).
pub(crate) fn is_held_open(dev: &Path) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Makes `link` a symlink to `target` (replacing a stale symlink, never a file).
pub(crate) fn install_link(link: &Path, target: &Path) -> Result<(), KernelNbdError> {
    if let Ok(meta) = std::fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            return Err(KernelNbdError::LinkExists(link.to_path_buf()));
        }
    }
    let parent = link.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let tmp = parent.join(format!(".rdb-link-tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(io_err(format!("symlink {}", tmp.display())))?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        KernelNbdError::Io {
            context: format!("renaming {} to {}", tmp.display(), link.display()),
            source: e,
        }
    })
}

/// Removes `link` if it still points at `target`.
pub(crate) fn remove_link(link: &Path, target: &Path) {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        if let Err(e) = std::fs::remove_file(link) {
            tracing::warn!(link = %link.display(), error = %e, "removing device symlink");
        }
    }
}
