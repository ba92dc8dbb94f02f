//! The io_uring engine: one dedicated thread per opened disk owns a ring.
//!
//! Requests travel from async callers to the ring thread through a bounded tokio
//! channel and complete through a tokio oneshot. The thread never spins: when it has
//! nothing to submit and nothing has completed, it blocks in `io_uring_enter` waiting
//! for one completion; a read on an eventfd is kept armed in the ring, and a sender
//! writes the eventfd only when the thread announced it was about to sleep (a
//! `sleeping` flag with SeqCst fences on both sides, the Dekker pattern), so a busy
//! engine costs no extra syscall per request. Submissions are batched: every request
//! found in the channel is queued before one `io_uring_enter`.
//!
//! Buffers live in the in-flight table until their completion arrives; short reads
//! and writes are resubmitted for the remainder. With O_DIRECT, reads go through an
//! aligned bounce buffer covering the aligned window and writes are copied into an
//! aligned buffer unless the caller's bytes are already aligned.
//!
//! Discard, write_zeroes (fallocate opcode) run in the ring on files; block devices
//! use the ioctls on the blocking pool (io_uring has no portable discard opcode).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::{mpsc, oneshot};

use super::sync::{self as sync_engine, Target};
use super::sys::{self, AlignedBuf};
use super::{BlockIo, Extent, IoError, IoFuture};

/// Ring size (submission queue entries).
const RING_ENTRIES: u32 = 256;
/// Requests in flight at once: one SQE each, plus the eventfd read, fit the ring.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize - 1;
/// Capacity of the request channel (callers wait when it is full).
const CHANNEL_CAPACITY: usize = 1024;
/// user_data of the eventfd read.
const EVENTFD_TOKEN: u64 = u64::MAX;
/// Largest byte count put in one SQE (its length field is 32 bits).
const MAX_SQE_BYTES: usize = 1 << 30;

type Reply<T> = oneshot::Sender<Result<T, IoError>>;

/// One request from a caller to the ring thread (absolute file offsets).
enum Request {
    Read {
        abs: u64,
        len: usize,
        reply: Reply<Vec<u8>>,
    },
    Write {
        abs: u64,
        data: Bytes,
        fua: bool,
        reply: Reply<()>,
    },
    Fsync {
        reply: Reply<()>,
    },
    Fallocate {
        abs: u64,
        len: u64,
        mode: i32,
        reply: Reply<()>,
    },
}

/// Wake-up channel into the ring thread.
struct Wake {
    efd: OwnedFd,
    /// Set by the ring thread just before it blocks with an empty channel.
    sleeping: AtomicBool,
}

impl Wake {
    fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our own eventfd.
        let rc = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if rc != 8 {
            // Only fails if the counter would overflow, i.e. it is already signalled.
            tracing::trace!("eventfd write: {}", io::Error::last_os_error());
        }
    }

    /// Called by a sender after its request is in the channel.
    fn after_send(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.notify();
        }
    }
}

/// The io_uring engine.
pub struct UringDisk {
    t: Target,
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl UringDisk {
    /// Starts the ring thread; fails when io_uring cannot be set up.
    pub(crate) fn start(t: Target) -> Result<UringDisk, IoError> {
        // SAFETY: plain syscall, no memory passed.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(IoError::Io(io::Error::last_os_error()));
        }
        // SAFETY: raw is a freshly created fd that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let wake = Arc::new(Wake {
            efd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let thread_wake = wake.clone();
        let file = t.file.clone();
        let direct_io = t.direct_io;
        let thread = std::thread::Builder::new()
            .name("rdb-uring".into())
            .spawn(move || {
                // The ring is built on its own thread (SINGLE_ISSUER binds it here).
                let ring = match build_ring() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                RingThread::new(ring, rx, thread_wake, file, direct_io).run();
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(UringDisk {
                t,
                tx: Some(tx),
                wake,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(IoError::Io(e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(IoError::Io(io::Error::other(
                    "io_uring thread died during setup",
                )))
            }
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, IoError> {
        let (reply, rx) = oneshot::channel();
        let req = make(reply);
        let sender = self.tx.as_ref().ok_or(IoError::Shutdown)?;
        match sender.try_send(req) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(req)) => {
                // Make sure the thread is awake to drain the channel, then wait.
                self.wake.after_send();
                sender.send(req).await.map_err(|_| IoError::Shutdown)?;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(IoError::Shutdown),
        }
        self.wake.after_send();
        rx.await.map_err(|_| IoError::Shutdown)?
    }
}

impl Drop for UringDisk {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish in-flight work and exit.
        drop(self.tx.take());
        self.wake.notify();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("io_uring thread panicked");
            }
        }
    }
}

fn build_ring() -> io::Result<IoUring> {
    let fast = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES);
    match fast {
        Ok(r) => Ok(r),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES),
        Err(e) => Err(e),
    }
}

enum ReadBuf {
    Plain(Vec<u8>),
    Aligned(AlignedBuf),
}

enum WriteBuf {
    Plain(Bytes),
    Aligned(AlignedBuf),
}

impl WriteBuf {
    fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Plain(b) => b,
            WriteBuf::Aligned(b) => b.as_slice(),
        }
    }
}

/// A request in flight; owns its buffer until the completion arrives.
enum Slot {
    Read {
        buf: ReadBuf,
        /// Absolute offset of `buf[0]`.
        start: u64,
        /// Bytes read so far into `buf`.
        done: usize,
        /// Bytes needed before the request is satisfied.
        want: usize,
        /// Where the caller's bytes start in `buf`.
        skip: usize,
        /// Bytes the caller asked for.
        len: usize,
        reply: Reply<Vec<u8>>,
    },
    Write {
        buf: WriteBuf,
        abs: u64,
        done: usize,
        fua: bool,
        reply: Reply<()>,
    },
    Fsync {
        reply: Reply<()>,
    },
    Fallocate {
        reply: Reply<()>,
    },
}

struct RingThread {
    ring: IoUring,
    rx: mpsc::Receiver<Request>,
    wake: Arc<Wake>,
    /// Keeps the fd open while the ring uses it.
    file: Arc<File>,
    fd: RawFd,
    direct_io: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Target of the eventfd read; boxed so its address is stable.
    efd_buf: Box<u64>,
    efd_armed: bool,
}

impl RingThread {
    fn new(
        ring: IoUring,
        rx: mpsc::Receiver<Request>,
        wake: Arc<Wake>,
        file: Arc<File>,
        direct_io: bool,
    ) -> RingThread {
        let fd = file.as_raw_fd();
        RingThread {
            ring,
            rx,
            wake,
            file,
            fd,
            direct_io,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            efd_buf: Box::new(0),
            efd_armed: false,
        }
    }

    fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len()
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every SQE we build points at memory owned either by a Slot in
            // `self.slots` (kept there until its CQE is reaped) or by `self.efd_buf`
            // (kept until the eventfd read's CQE is reaped before exit).
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                return;
            }
            // Cannot happen (one SQE per slot, ring sized for all slots), but stay
            // correct: hand the queue to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit while the queue was full: {e}");
            }
        }
    }

    fn arm_eventfd(&mut self) {
        let ptr: *mut u64 = &mut *self.efd_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.efd.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(EVENTFD_TOKEN);
        self.push(sqe);
        self.efd_armed = true;
    }

    fn run(mut self) {
        let mut closed = false;
        loop {
            if !self.efd_armed && !closed {
                self.arm_eventfd();
            }
            while !closed && !self.free.is_empty() {
                match self.rx.try_recv() {
                    Ok(req) => self.start(req),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if closed && self.in_flight() == 0 {
                break;
            }
            let r = if !self.ring.completion().is_empty() {
                self.ring.submit()
            } else if !closed && !self.free.is_empty() {
                // About to sleep: announce it, then re-check the channel (Dekker).
                self.wake.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if !self.rx.is_empty() || self.rx.is_closed() {
                    self.wake.sleeping.store(false, Ordering::SeqCst);
                    self.ring.submit()
                } else {
                    let r = self.ring.submit_and_wait(1);
                    self.wake.sleeping.store(false, Ordering::SeqCst);
                    r
                }
            } else {
                self.ring.submit_and_wait(1)
            };
            self.check_enter(r);
            self.reap();
        }
        self.disarm_eventfd();
        drop(self.file);
    }

    fn check_enter(&self, r: io::Result<usize>) {
        if let Err(e) = r {
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                _ => {
                    tracing::error!("io_uring_enter failed: {e}");
                    // Avoid a hot loop on a persistent error.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Completes the pending eventfd read so no SQE references `efd_buf` at exit.
    fn disarm_eventfd(&mut self) {
        if !self.efd_armed {
            return;
        }
        self.wake.notify();
        while self.efd_armed {
            let r = self.ring.submit_and_wait(1);
            self.check_enter(r);
            self.reap();
        }
    }

    fn reap(&mut self) {
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                return;
            };
            let (token, res) = (cqe.user_data(), cqe.result());
            if token == EVENTFD_TOKEN {
                self.efd_armed = false;
                continue;
            }
            self.complete(token as usize, res);
        }
    }

    fn alloc_slot(&mut self, slot: Slot) -> usize {
        // Callers only start requests while `free` is not empty.
        let idx = match self.free.pop() {
            Some(i) => i,
            None => unreachable!("request started with no free slot"),
        };
        debug_assert!(self.slots[idx].is_none());
        self.slots[idx] = Some(slot);
        idx
    }

    fn start(&mut self, req: Request) {
        let slot = match req {
            Request::Read { abs, len, reply } => {
                if self.direct_io {
                    let (start, wlen) = sys::direct_window(abs, len as u64);
                    Slot::Read {
                        buf: ReadBuf::Aligned(AlignedBuf::zeroed(wlen as usize)),
                        start,
                        done: 0,
                        want: (abs + len as u64 - start) as usize,
                        skip: (abs - start) as usize,
                        len,
                        reply,
                    }
                } else {
                    Slot::Read {
                        buf: ReadBuf::Plain(vec![0u8; len]),
                        start: abs,
                        done: 0,
                        want: len,
                        skip: 0,
                        len,
                        reply,
                    }
                }
            }
            Request::Write {
                abs,
                data,
                fua,
                reply,
            } => {
                let buf = if self.direct_io && !sys::is_ptr_aligned(data.as_ptr()) {
                    WriteBuf::Aligned(AlignedBuf::copy_from(&data))
                } else {
                    WriteBuf::Plain(data)
                };
                Slot::Write {
                    buf,
                    abs,
                    done: 0,
                    fua,
                    reply,
                }
            }
            Request::Fsync { reply } => Slot::Fsync { reply },
            Request::Fallocate {
                abs,
                len,
                mode,
                reply,
            } => {
                let idx = self.alloc_slot(Slot::Fallocate { reply });
                let sqe = opcode::Fallocate::new(types::Fd(self.fd), len)
                    .offset(abs)
                    .mode(mode)
                    .build()
                    .user_data(idx as u64);
                self.push(sqe);
                return;
            }
        };
        let idx = self.alloc_slot(slot);
        self.submit_slot(idx);
    }

    /// Queues the SQE for the remaining part of slot `idx`.
    fn submit_slot(&mut self, idx: usize) {
        let fd = types::Fd(self.fd);
        let sqe = match &mut self.slots[idx] {
            Some(Slot::Read {
                buf, start, done, ..
            }) => {
                let (ptr, total) = match buf {
                    ReadBuf::Plain(v) => (v.as_mut_ptr(), v.len()),
                    ReadBuf::Aligned(a) => (a.as_mut_ptr(), a.len()),
                };
                let n = (total - *done).min(MAX_SQE_BYTES);
                // SAFETY: done < total, so the pointer stays inside the buffer. The
                // buffer is heap memory owned by this Slot, which stays in the
                // in-flight table until the CQE is reaped; moving the Slot does not
                // move the heap allocation.
                let p = unsafe { ptr.add(*done) };
                opcode::Read::new(fd, p, n as u32)
                    .offset(*start + *done as u64)
                    .build()
            }
            Some(Slot::Write {
                buf,
                abs,
                done,
                fua,
                ..
            }) => {
                let rest = &buf.as_slice()[*done..];
                let n = rest.len().min(MAX_SQE_BYTES);
                // The kernel reads `rest` (heap memory of Bytes/AlignedBuf owned by the
                // Slot, stable until the CQE is reaped; see push()).
                opcode::Write::new(fd, rest.as_ptr(), n as u32)
                    .offset(*abs + *done as u64)
                    .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Some(Slot::Fsync { .. }) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Some(Slot::Fallocate { .. }) | None => {
                unreachable!("submit_slot on a fallocate or empty slot")
            }
        };
        self.push(sqe.user_data(idx as u64));
    }

    fn finish(&mut self, idx: usize) -> Option<Slot> {
        let slot = self.slots[idx].take();
        if slot.is_some() {
            self.free.push(idx);
        }
        slot
    }

    fn complete(&mut self, idx: usize, res: i32) {
        if idx >= self.slots.len() || self.slots[idx].is_none() {
            tracing::error!("io_uring completion for unknown slot {idx}");
            return;
        }
        if res == -libc::EINTR || res == -libc::EAGAIN {
            match &self.slots[idx] {
                Some(Slot::Fallocate { .. }) => {}
                _ => return self.submit_slot(idx),
            }
        }
        let err = (res < 0).then(|| IoError::Io(io::Error::from_raw_os_error(-res)));
        let progressed = match &mut self.slots[idx] {
            Some(Slot::Read { done, want, .. }) if err.is_none() => {
                if res == 0 {
                    Some(Err(IoError::Io(io::ErrorKind::UnexpectedEof.into())))
                } else {
                    *done += res as usize;
                    (*done >= *want).then_some(Ok(()))
                }
            }
            Some(Slot::Write { done, buf, .. }) if err.is_none() => {
                if res == 0 {
                    Some(Err(IoError::Io(io::ErrorKind::WriteZero.into())))
                } else {
                    *done += res as usize;
                    (*done >= buf.as_slice().len()).then_some(Ok(()))
                }
            }
            _ => Some(match err {
                Some(e) => Err(e),
                None => Ok(()),
            }),
        };
        let Some(outcome) = progressed else {
            return self.submit_slot(idx);
        };
        // A dropped receiver means the caller gave up; the result is discarded.
        match self.finish(idx) {
            Some(Slot::Read {
                buf,
                skip,
                len,
                reply,
                ..
            }) => {
                let r = outcome.map(|()| match buf {
                    ReadBuf::Plain(v) => v,
                    ReadBuf::Aligned(a) => a.as_slice()[skip..skip + len].to_vec(),
                });
                let _ = reply.send(r);
            }
            Some(Slot::Write { reply, .. })
            | Some(Slot::Fsync { reply })
            | Some(Slot::Fallocate { reply }) => {
                let _ = reply.send(outcome);
            }
            None => {}
        }
    }
}

impl BlockIo for UringDisk {
    fn size_bytes(&self) -> u64 {
        self.t.size_bytes
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let abs = self.t.check_read(offset, len as u64)?;
            if len == 0 {
                return Ok(Vec::new());
            }
            self.call(|reply| Request::Read { abs, len, reply }).await
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let abs = self.t.check_write(offset, data.len() as u64)?;
            if self.t.direct_io {
                sys::check_direct_write(abs, data.len() as u64)?;
            }
            if data.is_empty() {
                if fua {
                    return self.call(|reply| Request::Fsync { reply }).await;
                }
                return Ok(());
            }
            self.call(|reply| Request::Write {
                abs,
                data,
                fua,
                reply,
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.call(|reply| Request::Fsync { reply }))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let abs = self.t.check_write(offset, len)?;
            if self.t.is_block {
                return sync_engine::discard(&self.t, offset, len).await;
            }
            if len == 0 {
                return Ok(());
            }
            let mode = sys::PUNCH_MODE;
            match self
                .call(|reply| Request::Fallocate {
                    abs,
                    len,
                    mode,
                    reply,
                })
                .await
            {
                Err(IoError::Io(e)) if sys::is_unsupported(&e) => Ok(()),
                other => other,
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let abs = self.t.check_write(offset, len)?;
            if self.t.is_block {
                return sync_engine::write_zeroes(&self.t, offset, len, may_unmap).await;
            }
            if len == 0 {
                return Ok(());
            }
            let mode = if may_unmap {
                sys::PUNCH_MODE
            } else {
                sys::ZERO_MODE
            };
            match self
                .call(|reply| Request::Fallocate {
                    abs,
                    len,
                    mode,
                    reply,
                })
                .await
            {
                Err(IoError::Io(e))
                    if sys::is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    let (file, direct) = (self.t.file.clone(), self.t.direct_io);
                    sync_engine::blocking(move || sys::write_zero_buffers(&file, direct, abs, len))
                        .await
                }
                other => other,
            }
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(sync_engine::block_status(&self.t, offset, len))
    }
}
