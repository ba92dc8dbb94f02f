//! ublk frontend: the volume as `/dev/ublkbN`, through libublk.
//!
//! This module owns the lifecycle of one ublk device ([`UblkDevice`]): a control
//! thread that creates (or, after an rdbd crash, recovers) the device and runs its
//! queues until it is stopped; the queue threads, one per hardware queue, each an
//! io_uring with one task per tag; and the bridge from those tasks to the volume.
//!
//! Data path: a queue task receives a request (READ, WRITE with or without FUA,
//! FLUSH, DISCARD, WRITE_ZEROES with or without NOUNMAP) from the kernel, hands
//! the matching `BlockIo` call to the tokio runtime, and sleeps on a per-tag eventfd
//! polled through the queue's own io_uring; the tokio task stores the result and
//! signals the eventfd, so the queue thread wakes up through its ring (it never
//! blocks outside it), copies read data into the request buffer and commits.
//!
//! Recovery: devices are created with `UBLK_F_USER_RECOVERY` (+ `_REISSUE`) when the
//! driver offers it. If rdbd dies (kill -9), the kernel quiesces the device and
//! holds its I/O; the device id is recorded in the run directory, and the next
//! `primary` of the resource recovers that device (`START_USER_RECOVERY`, new queues,
//! `END_USER_RECOVERY`): openers keep their file descriptors, held I/O is reissued.
//!
//! Every call here blocks (bounded waits): call it from a blocking context.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use tokio::runtime::Handle;

use super::kernel_nbd::{install_link, remove_link, DeviceNode, KernelNbdError};
use crate::storage::{BlockIo, IoError};

/// The message of item 3 of the frontends issue for ublk.
pub const UBLK_MODULE_MISSING: &str =
    "kernel module ublk_drv is not loaded (no /dev/ublk-control): `modprobe ublk_drv`, or use `frontend fuse`";
/// How long `attach` waits for the device to start (recovery waits up to 30 s for
/// the kernel to quiesce the old device).
const START_WAIT_MS: u64 = 45_000;
/// How long `detach` waits for the queues to end after STOP_DEV.
const STOP_WAIT_MS: u64 = 15_000;

/// Errors of the ublk frontend.
#[derive(Debug, thiserror::Error)]
pub enum UblkFrontendError {
    /// `/dev/ublk-control` is missing.
    #[error("{}", UBLK_MODULE_MISSING)]
    ModuleMissing,
    /// The device is held open.
    #[error("{0}")]
    Busy(String),
    /// libublk or the driver refused.
    #[error("ublk: {0}")]
    Ublk(String),
    /// The symlink could not be installed.
    #[error("{0}")]
    Link(#[from] KernelNbdError),
}

/// Whether this kernel offers ublk.
pub fn module_available() -> Result<(), UblkFrontendError> {
    if Path::new("/dev/ublk-control").exists() {
        Ok(())
    } else {
        Err(UblkFrontendError::ModuleMissing)
    }
}

/// How the ublk device is set up.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// The configured device path, made a symlink to `/dev/ublkbN`.
    pub link_path: PathBuf,
    /// Hardware queues (one thread each).
    pub nr_queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest request (and buffer per tag).
    pub io_buf_bytes: u32,
    /// Ask for user recovery when the driver offers it.
    pub recovery: bool,
    /// Where the device id is recorded for recovery after a crash.
    pub state_path: PathBuf,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl UblkOptions {
    /// Defaults, overridden by rdbd's environment (`RDB_UBLK_QUEUES`,
    /// `RDB_UBLK_QUEUE_DEPTH`, `RDB_UBLK_IO_BUF_BYTES`, `RDB_UBLK_RECOVERY=0`).
    pub fn from_env(link_path: PathBuf, state_path: PathBuf) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        UblkOptions {
            link_path,
            nr_queues: env_u64("RDB_UBLK_QUEUES", cpus.min(4)).clamp(1, 32) as u16,
            queue_depth: env_u64("RDB_UBLK_QUEUE_DEPTH", 64).clamp(1, 4096) as u16,
            io_buf_bytes: env_u64("RDB_UBLK_IO_BUF_BYTES", 512 * 1024).clamp(4096, 1 << 20) as u32,
            recovery: std::env::var("RDB_UBLK_RECOVERY").map_or(true, |v| v != "0"),
            state_path,
        }
    }
}

/// A volume served as a ublk device.
pub struct UblkDevice {
    dev_id: u32,
    node: DeviceNode,
    opts: UblkOptions,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    detached: bool,
}

impl std::ops::Deref for UblkDevice {
    type Target = DeviceNode;

    /// The accessors shared with kernel NBD: `dev_path` (`/dev/ublkbN`),
    /// `link_path`, `description`, `is_in_use`.
    fn deref(&self) -> &DeviceNode {
        &self.node
    }
}

fn ublk_err(what: &str) -> impl FnOnce(UblkError) -> UblkFrontendError + '_ {
    move |e| UblkFrontendError::Ublk(format!("{what}: {e} ({e:?})"))
}

/// A device a previous rdbd left for recovery, if any.
fn recoverable(state_path: &Path) -> Option<u32> {
    let id: u32 = std::fs::read_to_string(state_path)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
    let info = ctrl.dev_info();
    // A device whose server is alive belongs to somebody else (the run-dir lock
    // guarantees it is not a previous rdbd of ours): never touch it.
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    if info.ublksrv_pid > 0 && unsafe { libc::kill(info.ublksrv_pid, 0) } == 0 {
        tracing::warn!(
            dev_id = id,
            pid = info.ublksrv_pid,
            "recorded ublk device is served by a live process; not recovering it"
        );
        return None;
    }
    // Only a device this run directory's resource created (its libublk json names
    // our state file) is recovered or removed.
    let ours = ctrl
        .get_target_data_from_json()
        .and_then(|v| {
            v.get("rdb_state")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        })
        .is_some_and(|s| Path::new(&s) == state_path);
    if !ours {
        tracing::warn!(
            dev_id = id,
            "recorded ublk device was not created for this resource; ignoring it"
        );
        return None;
    }
    let with_recovery = info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0;
    let state = u32::from(info.state);
    if with_recovery && state != sys::UBLK_S_DEV_DEAD {
        Some(id)
    } else {
        // Not recoverable (created without recovery, or dead): remove it.
        tracing::info!(
            dev_id = id,
            state,
            "removing an unrecoverable ublk device left by a previous rdbd"
        );
        let _ = ctrl.kill_dev();
        let _ = ctrl.del_dev();
        None
    }
}

impl UblkDevice {
    /// Creates (or recovers) the ublk device for `io` and installs the symlink.
    pub fn attach(
        io: Arc<dyn BlockIo>,
        opts: UblkOptions,
        runtime: &Handle,
    ) -> Result<UblkDevice, UblkFrontendError> {
        module_available()?;
        let features = UblkCtrl::get_features().unwrap_or(0);
        let recovery_flags =
            u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        let recovery = opts.recovery && features & recovery_flags == recovery_flags;
        let recover_id = if recovery {
            recoverable(&opts.state_path)
        } else {
            None
        };
        let size_bytes = io.size_bytes();
        let stopping = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();

        let thread = {
            let opts = opts.clone();
            let runtime = runtime.clone();
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("ublk-ctrl".into())
                .spawn(move || {
                    let started = ready_tx.clone();
                    if let Err(e) = run_device(
                        io, &opts, recovery, recover_id, size_bytes, runtime, &stopping, ready_tx,
                    ) {
                        let _ = started.send(Err(e.to_string()));
                    }
                })
                .map_err(|e| {
                    UblkFrontendError::Ublk(format!("spawning the ublk control thread: {e}"))
                })?
        };
        let dev_id = match ready_rx.recv_timeout(Duration::from_millis(START_WAIT_MS)) {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(UblkFrontendError::Ublk(e));
            }
            Err(_) => {
                return Err(UblkFrontendError::Ublk(format!(
                    "the ublk device did not start within {} s",
                    START_WAIT_MS / 1000
                )))
            }
        };
        let how = format!(
            "ublk /dev/ublkb{dev_id}{}: {} queue(s) x depth {}, user recovery {}",
            if recover_id.is_some() {
                " recovered after an rdbd restart"
            } else {
                ""
            },
            opts.nr_queues,
            opts.queue_depth,
            if recovery {
                "on"
            } else if opts.recovery {
                "not offered by this kernel"
            } else {
                "off"
            }
        );
        if let Err(e) = std::fs::write(&opts.state_path, format!("{dev_id}\n")) {
            tracing::warn!(path = %opts.state_path.display(), error = %e, "cannot record the ublk device id");
        }
        let dev_path = PathBuf::from(format!("/dev/ublkb{dev_id}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dev_path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let node = DeviceNode {
            dev_path,
            link_path: opts.link_path.clone(),
            how,
        };
        let mut dev = UblkDevice {
            dev_id,
            node,
            opts,
            stopping,
            thread: Some(thread),
            detached: false,
        };
        if let Err(e) = install_link(&dev.node.link_path, &dev.node.dev_path) {
            let _ = dev.stop();
            return Err(e.into());
        }
        tracing::info!("{}", dev.node.how);
        Ok(dev)
    }

    /// Stops and deletes the device; refused while it is in use.
    pub fn detach(&mut self) -> Result<(), UblkFrontendError> {
        if self.detached {
            return Ok(());
        }
        if let Some(busy) = self.node.busy() {
            return Err(UblkFrontendError::Busy(busy));
        }
        self.stop()
    }

    fn stop(&mut self) -> Result<(), UblkFrontendError> {
        remove_link(&self.node.link_path, &self.node.dev_path);
        self.stopping.store(true, Ordering::Release);
        let ctrl =
            UblkCtrl::new_simple(self.dev_id as i32).map_err(ublk_err("opening the device"))?;
        ctrl.kill_dev().map_err(ublk_err("STOP_DEV"))?;
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_millis(STOP_WAIT_MS);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                return Err(UblkFrontendError::Ublk(format!(
                    "ublk queues of device {} did not stop within {} s",
                    self.dev_id,
                    STOP_WAIT_MS / 1000
                )));
            }
        }
        let _ = ctrl.del_dev();
        let _ = std::fs::remove_file(&self.opts.state_path);
        self.detached = true;
        tracing::info!(device = %self.node.dev_path.display(), "ublk device removed");
        Ok(())
    }
}

/// The control thread: create or recover, run the queues until stopped.
#[allow(clippy::too_many_arguments)]
fn run_device(
    io: Arc<dyn BlockIo>,
    opts: &UblkOptions,
    recovery: bool,
    recover_id: Option<u32>,
    size_bytes: u64,
    runtime: Handle,
    stopping: &AtomicBool,
    ready: std::sync::mpsc::Sender<Result<u32, String>>,
) -> Result<(), UblkFrontendError> {
    let (id, dev_flags) = match recover_id {
        Some(id) => {
            let old = UblkCtrl::new_simple(id as i32)
                .map_err(ublk_err("opening the device to recover"))?;
            old.start_user_recover()
                .map_err(ublk_err("START_USER_RECOVERY"))?;
            (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        }
        None => (-1, UblkFlags::UBLK_DEV_F_ADD_DEV),
    };
    let ctrl_flags = if recovery {
        u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
    } else {
        0
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("rdb")
        .id(id)
        .nr_queues(opts.nr_queues)
        .depth(opts.queue_depth)
        .io_buf_bytes(opts.io_buf_bytes)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(ublk_err("creating the device"))?;
    let identity = serde_json::json!({ "rdb_state": opts.state_path.display().to_string() });
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_target_json(identity);
        let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
        dev.tgt.dev_size = size_bytes;
        dev.tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
            basic: sys::ublk_param_basic {
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors,
                dev_sectors: size_bytes >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_granularity: 4096,
                max_discard_sectors: max_sectors,
                max_write_zeroes_sectors: max_sectors,
                max_discard_segments: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, io.clone(), runtime.clone());
    let started = ready.clone();
    ctrl.run_target(tgt_init, q_fn, move |c: &UblkCtrl| {
        let _ = started.send(Ok(c.dev_info().dev_id));
    })
    .map_err(ublk_err("running the device"))?;
    if stopping.load(Ordering::Acquire) {
        let _ = ctrl.del_dev();
    } else {
        // The queues ended without `detach` (the kernel aborted them): keep the
        // device for a later recovery only if it was created with recovery.
        tracing::warn!("ublk queues ended without a stop request");
        if !recovery {
            let _ = ctrl.del_dev();
        } else {
            ctrl.disown();
        }
    }
    Ok(())
}

/// An eventfd the tokio side signals when a request's result is ready.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        // SAFETY: plain eventfd(2); the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn drain(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer (non-blocking).
        let _ = unsafe { libc::read(self.0.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    }
}

fn serve_queue(qid: u16, dev: &UblkDev, io: Arc<dyn BlockIo>, runtime: Handle) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    let exe_rc = Rc::new(smol::LocalExecutor::new());
    let exe = exe_rc.clone();
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let q = q.clone();
        let io = io.clone();
        let runtime = runtime.clone();
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, &io, &runtime).await {
                Err(UblkError::QueueIsDown) | Ok(()) => {}
                Err(e) => tracing::error!(qid, tag, error = %e, "ublk tag task failed"),
            }
        }));
    }
    smol::block_on(exe_rc.run(async move {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!(qid, error = %e, "ublk queue event loop failed");
        }
    }));
}

/// What a request asks of the volume.
enum Job {
    Read(u64, usize),
    Write(u64, Bytes, bool),
    Flush,
    Discard(u64, u64),
    Zeroes(u64, u64, bool),
}

async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    io: &Arc<dyn BlockIo>,
    runtime: &Handle,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let bell = Arc::new(Doorbell::new()?);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = *q.get_iod(tag);
        let res = handle_request(&iod, buf.as_mut_slice(), io, runtime, &bell).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Runs one request on the tokio runtime; returns the ublk result (bytes or -errno).
async fn handle_request(
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    io: &Arc<dyn BlockIo>,
    runtime: &Handle,
    bell: &Arc<Doorbell>,
) -> i32 {
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let len_bytes = u64::from(iod.nr_sectors) << 9;
    let len = len_bytes as usize;
    let job = match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if len > buf.len() => return -libc::EINVAL,
        sys::UBLK_IO_OP_READ => Job::Read(offset, len),
        sys::UBLK_IO_OP_WRITE => Job::Write(
            offset,
            Bytes::copy_from_slice(&buf[..len]),
            iod.op_flags & sys::UBLK_IO_F_FUA != 0,
        ),
        sys::UBLK_IO_OP_FLUSH => Job::Flush,
        sys::UBLK_IO_OP_DISCARD => Job::Discard(offset, len_bytes),
        sys::UBLK_IO_OP_WRITE_ZEROES => Job::Zeroes(
            offset,
            len_bytes,
            iod.op_flags & sys::UBLK_IO_F_NOUNMAP == 0,
        ),
        _ => return -libc::EOPNOTSUPP,
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel::<Result<Option<Vec<u8>>, IoError>>();
    {
        let io = io.clone();
        let bell = bell.clone();
        runtime.spawn(async move {
            let r = match job {
                Job::Read(o, l) => io.read_at(o, l).await.map(Some),
                Job::Write(o, d, fua) => io.write_at(o, d, fua).await.map(|()| None),
                Job::Flush => io.flush().await.map(|()| None),
                Job::Discard(o, l) => io.discard(o, l).await.map(|()| None),
                Job::Zeroes(o, l, unmap) => io.write_zeroes(o, l, unmap).await.map(|()| None),
            };
            let _ = tx.send(r);
            bell.ring();
        });
    }
    let result = loop {
        match rx.try_recv() {
            Ok(r) => break r,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return -libc::EIO,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        let sqe = opcode::PollAdd::new(types::Fd(bell.0.as_raw_fd()), libc::POLLIN as u32).build();
        if ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .is_err()
        {
            return -libc::EIO;
        }
        bell.drain();
    };
    match result {
        Ok(Some(data)) => {
            let n = data.len().min(len);
            buf[..n].copy_from_slice(&data[..n]);
            len as i32
        }
        Ok(None) if op == sys::UBLK_IO_OP_WRITE => len as i32,
        Ok(None) => 0,
        Err(e) => -e.errno(),
    }
}
