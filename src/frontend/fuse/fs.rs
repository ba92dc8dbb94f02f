//! The FUSE filesystem: a root directory holding one regular file whose bytes are the
//! volume. Every data request is answered from a task on the tokio runtime, so the
//! fuser session thread only parses requests and never waits for I/O.

use std::ffi::{OsStr, OsString};
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use tokio::runtime::Handle;

use crate::storage::{BlockIo, IoError};

/// Inode of the single data file (the root is [`INodeNo::ROOT`]).
pub(super) const FILE_INO: INodeNo = INodeNo(2);
/// Attributes never change while mounted (fixed size, fixed owner).
const ATTR_TTL: Duration = Duration::from_secs(60);
/// Block size reported by stat/statfs; the loop driver takes its discard granularity
/// from statfs `f_bsize`.
const REPORTED_BLOCK_SIZE_BYTES: u32 = 4096;
/// Largest single FUSE read/write the kernel may send (it caps this at its page limit).
const MAX_WRITE_BYTES: u32 = 1 << 20;
/// Asynchronous requests (loop direct I/O, readahead) the kernel keeps in flight.
/// This bounds the number of tasks this filesystem has spawned at any time.
const MAX_BACKGROUND: u16 = 128;
/// Background requests above which the kernel considers the queue congested.
const CONGESTION_THRESHOLD: u16 = 96;

/// `fallocate` modes the loop driver sends (from `<linux/falloc.h>`).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The filesystem handed to fuser.
pub(super) struct VolumeFs {
    device: Arc<dyn BlockIo>,
    rt: Handle,
    file_name: OsString,
    size_bytes: u64,
    created: SystemTime,
}

fn errno_of(e: &IoError) -> Errno {
    Errno::from_i32(e.errno())
}

impl VolumeFs {
    pub(super) fn new(device: Arc<dyn BlockIo>, rt: Handle, file_name: OsString) -> VolumeFs {
        let size_bytes = device.size_bytes();
        VolumeFs {
            device,
            rt,
            file_name,
            size_bytes,
            created: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 2, 0)
        } else if ino == FILE_INO {
            (FileType::RegularFile, 0o600, 1, self.size_bytes)
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: REPORTED_BLOCK_SIZE_BYTES,
            flags: 0,
        })
    }

    /// Clamps `[offset, offset+len)` to the file; `None` when it starts at/after EOF.
    fn clamp(&self, offset: u64, len: u64) -> Option<u64> {
        if offset >= self.size_bytes {
            None
        } else {
            Some(len.min(self.size_bytes - offset))
        }
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Let the kernel keep many requests in flight; the values are within range, so
        // the "nearest valid value" error cases cannot occur, but log them if they do.
        if let Err(v) = config.set_max_background(MAX_BACKGROUND) {
            tracing::warn!(nearest = v, "FUSE max_background rejected");
        }
        if let Err(v) = config.set_congestion_threshold(CONGESTION_THRESHOLD) {
            tracing::warn!(nearest = v, "FUSE congestion_threshold rejected");
        }
        if let Err(v) = config.set_max_write(MAX_WRITE_BYTES) {
            tracing::warn!(nearest = v, "FUSE max_write rejected");
        }
        // Asynchronous direct I/O lets the loop driver (in direct I/O mode) submit many
        // requests at once instead of one at a time.
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == self.file_name => {
                reply.entry(&ATTR_TTL, &attr, Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        // The volume has a fixed size and owner; time updates are accepted and ignored.
        let changes_size = size.is_some_and(|s| s != attr.size);
        let changes_owner =
            uid.is_some_and(|u| u != attr.uid) || gid.is_some_and(|g| g != attr.gid);
        let changes_mode = mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm));
        if changes_size || changes_owner || changes_mode {
            reply.error(Errno::EPERM);
        } else {
            reply.attr(&ATTR_TTL, &attr);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == INodeNo::ROOT {
            reply.error(Errno::EISDIR);
        } else if ino == FILE_INO {
            // No page cache for this file: every byte goes straight to the volume, and
            // concurrent direct writes are allowed (no inode lock per write).
            reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            );
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let Some(len) = self.clamp(offset, u64::from(size)) else {
            reply.data(&[]); // at or past EOF: empty read
            return;
        };
        // `len <= size: u32`, so it fits in usize on every supported target.
        let len = len as usize;
        let device = Arc::clone(&self.device);
        self.rt.spawn(async move {
            match device.read_at(offset, len).await {
                Ok(buf) => reply.data(&buf),
                Err(e) => {
                    tracing::debug!(offset, len, error = %e, "FUSE read failed");
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if data.is_empty() {
            reply.written(0);
            return;
        }
        // A write past the end of a device is "no space"; one straddling it is short.
        let Some(len) = self.clamp(offset, data.len() as u64) else {
            reply.error(Errno::ENOSPC);
            return;
        };
        // `len <= data.len()`.
        let len = len as usize;
        let Ok(written) = u32::try_from(len) else {
            reply.error(Errno::EINVAL);
            return;
        };
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let buf = Bytes::copy_from_slice(&data[..len]);
        let device = Arc::clone(&self.device);
        self.rt.spawn(async move {
            match device.write_at(offset, buf, fua).await {
                Ok(()) => reply.written(written),
                Err(e) => {
                    tracing::debug!(offset, len, error = %e, "FUSE write failed");
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): no data is buffered here (direct I/O), durability is fsync's job.
        // ENOSYS makes the kernel stop sending FLUSH on this connection for good
        // (`no_flush`): otherwise a close() of the FUSE file that races with rdbd's
        // death (kill -9) waits forever for an answer in D state.
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            reply.ok();
            return;
        }
        let device = Arc::clone(&self.device);
        self.rt.spawn(async move {
            match device.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE fsync: volume flush failed");
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0
            || (mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_ZERO_RANGE != 0)
        {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let end = offset.checked_add(length);
        if length == 0 || end.is_none() {
            reply.error(Errno::EINVAL);
            return;
        }
        if !keep_size && end.is_some_and(|e| e > self.size_bytes) {
            // Growing the file would grow the device.
            reply.error(Errno::ENOSPC);
            return;
        }
        // With KEEP_SIZE, ranges past EOF are legal and do nothing there.
        let Some(len) = self.clamp(offset, length) else {
            reply.ok();
            return;
        };
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0 {
            // Plain preallocation: every byte of a block device is already allocated.
            reply.ok();
            return;
        }
        // PUNCH_HOLE promises the range reads back as zeroes, and the loop driver uses
        // it for both REQ_OP_DISCARD and REQ_OP_WRITE_ZEROES (without NOUNMAP): a plain
        // `discard` (content unspecified) would break write-zeroes, so punch maps to
        // write_zeroes with unmapping allowed; ZERO_RANGE (NOUNMAP) keeps allocation.
        let may_unmap = mode & FALLOC_FL_PUNCH_HOLE != 0;
        let device = Arc::clone(&self.device);
        self.rt.spawn(async move {
            match device.write_zeroes(offset, len, may_unmap).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::debug!(offset, len, may_unmap, error = %e, "FUSE fallocate failed");
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.file_name.as_os_str()),
        ];
        // `offset` is the cookie of the last entry returned: its index + 1.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (entry_ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            if reply.add(*entry_ino, i as u64 + 1, *kind, name) {
                break; // buffer full; the kernel asks again from this cookie
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size_bytes / u64::from(REPORTED_BLOCK_SIZE_BYTES);
        reply.statfs(
            blocks,
            0,
            0,
            1,
            0,
            REPORTED_BLOCK_SIZE_BYTES,
            255,
            REPORTED_BLOCK_SIZE_BYTES,
        );
    }
}
