//! Low-level helpers shared by the disk engines: the 4 KiB-aligned buffer used for
//! O_DIRECT, block-device ioctls (size, discard, zero-out), `fallocate`, `pwritev2`
//! with `RWF_DSYNC`, and the `SEEK_DATA`/`SEEK_HOLE` walk behind `block_status`.
//!
//! Every function here is blocking; engines call them from a blocking thread.

use std::alloc::Layout;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;

use super::{Extent, IoError};

/// Alignment of O_DIRECT buffers, offsets and lengths.
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Largest chunk written at a time when zeroes are written by hand.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Most extents returned by one `block_status` call.
const MAX_EXTENTS: usize = 1024;

/// A heap buffer aligned to [`DIRECT_ALIGN_BYTES`], zero-initialised.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); no interior
// shared state, so moving it across threads or sharing `&` references is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only gives read access to the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (rounded up to the alignment for the allocation;
    /// `len()` reports `len`).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let alloc_len = round_up(len.max(1) as u64, DIRECT_ALIGN_BYTES as u64) as usize;
        let layout = match Layout::from_size_align(alloc_len, DIRECT_ALIGN_BYTES) {
            Ok(l) => l,
            // Only fails when alloc_len overflows isize: a caller bug, not I/O.
            Err(_) => panic!("aligned buffer of {len} bytes is too large"),
        };
        // SAFETY: layout has a non-zero size (len.max(1) rounded up).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// An aligned copy of `data`.
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least `len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Rounds `v` down to a multiple of `align`.
pub fn round_down(v: u64, align: u64) -> u64 {
    v - v % align
}

/// Rounds `v` up to a multiple of `align`.
pub fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Whether `v` is a multiple of the O_DIRECT alignment.
pub fn is_direct_aligned(v: u64) -> bool {
    v % DIRECT_ALIGN_BYTES as u64 == 0
}

/// Whether a pointer is aligned for O_DIRECT.
pub fn is_ptr_aligned(p: *const u8) -> bool {
    (p as usize) % DIRECT_ALIGN_BYTES == 0
}

/// Checks that a write is usable with O_DIRECT (offset and length aligned).
pub fn check_direct_write(file_offset: u64, len: u64) -> Result<(), IoError> {
    if is_direct_aligned(file_offset) && is_direct_aligned(len) {
        Ok(())
    } else {
        Err(IoError::Invalid(format!(
            "with direct I/O, writes must be {DIRECT_ALIGN_BYTES}-byte aligned \
             (offset {file_offset}, length {len})"
        )))
    }
}

/// The aligned window `[start, start+len)` that covers `[offset, offset+len)`.
pub fn direct_window(offset: u64, len: u64) -> (u64, u64) {
    let a = DIRECT_ALIGN_BYTES as u64;
    let start = round_down(offset, a);
    let end = round_up(offset + len, a);
    (start, end - start)
}

/// Whether `file` is a block device.
pub fn is_block_device(file: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    Ok(file.metadata()?.file_type().is_block_device())
}

/// Size in bytes of a regular file or block device.
pub fn file_size_bytes(file: &File) -> io::Result<u64> {
    if is_block_device(file)? {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
        // live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

fn ioctl_range(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 from the pointer, a live local array.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `fallocate(2)` on a file.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether an error means "this kind of operation is not supported here".
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

/// Punch-hole mode for discard.
pub const PUNCH_MODE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Zero-range mode for write_zeroes without unmap.
pub const ZERO_MODE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// Discards `[offset, offset+len)` (absolute file offsets). "Not supported" is not an
/// error: TRIM is a hint.
pub fn discard(file: &File, is_block: bool, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let r = if is_block {
        ioctl_range(file, BLKDISCARD, offset, len)
    } else {
        fallocate(file, PUNCH_MODE, offset, len)
    };
    match r {
        Err(e) if is_unsupported(&e) || (is_block && e.raw_os_error() == Some(libc::EINVAL)) => {
            tracing::debug!("discard not supported by the backing disk: {e}");
            Ok(())
        }
        other => other,
    }
}

/// Writes zeroes to `[offset, offset+len)` (absolute file offsets), deallocating if
/// `may_unmap`; falls back to writing zero buffers.
pub fn write_zeroes(
    file: &File,
    is_block: bool,
    direct_io: bool,
    offset: u64,
    len: u64,
    may_unmap: bool,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let r = if is_block {
        ioctl_range(file, BLKZEROOUT, offset, len)
    } else {
        fallocate(
            file,
            if may_unmap { PUNCH_MODE } else { ZERO_MODE },
            offset,
            len,
        )
    };
    match r {
        Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
            write_zero_buffers(file, direct_io, offset, len)
        }
        other => other,
    }
}

/// Writes zeroes with plain writes.
pub fn write_zero_buffers(file: &File, direct_io: bool, offset: u64, len: u64) -> io::Result<()> {
    if direct_io && !(is_direct_aligned(offset) && is_direct_aligned(len)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unaligned write_zeroes with direct I/O on a disk without fallocate",
        ));
    }
    let chunk = AlignedBuf::zeroed(ZERO_CHUNK_BYTES.min(len as usize));
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk.as_slice()[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Positioned write, durable on return when `fua` (pwritev2 + RWF_DSYNC, falling back
/// to pwrite + fdatasync when the kernel refuses the flag).
pub fn write_all_at(file: &File, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
    if !fua {
        return file.write_all_at(data, offset);
    }
    let mut done = 0usize;
    while done < data.len() {
        let rest = &data[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let off = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: iov points to `rest`, a live borrowed slice that the kernel only
        // reads during the call; one iovec is passed.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    file.write_all_at(rest, offset + done as u64)?;
                    return file.sync_data();
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n as usize;
    }
    Ok(())
}

/// One `preadv2(RWF_NOWAIT)`: reads only what is already in the page cache without
/// blocking; `Ok(None)` when it would block (EAGAIN) or the kernel refuses the flag.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: iov points to `buf`, a live exclusive slice the kernel writes at most
    // `buf.len()` bytes into during the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    nowait_result(n)
}

fn nowait_result(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINTR) | Some(libc::ENOSYS) => {
            Ok(None)
        }
        _ => Err(e),
    }
}

fn lseek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let p = i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on a valid fd. Changing the file position is harmless:
    // every engine uses positioned I/O only.
    let r = unsafe { libc::lseek(file.as_raw_fd(), p, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Allocation map of `[offset, offset+len)` (absolute file offsets) of a regular file,
/// via SEEK_DATA/SEEK_HOLE. Holes are reported as hole+zero. At least one extent when
/// `len > 0`; adjacent extents never have the same kind.
pub fn block_status(file: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < MAX_EXTENTS {
        let data = match lseek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                push_extent(&mut out, end - pos, false);
                break;
            }
            Err(e) => return Err(e),
        };
        match data {
            None => {
                push_extent(&mut out, end - pos, true);
                pos = end;
            }
            Some(d) if d > pos => {
                let e = d.min(end);
                push_extent(&mut out, e - pos, true);
                pos = e;
            }
            Some(_) => {
                let hole = lseek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end);
                // SEEK_HOLE at a data position returns > pos (EOF counts as a hole).
                let e = hole.max(pos + 1).min(end);
                push_extent(&mut out, e - pos, false);
                pos = e;
            }
        }
    }
    Ok(out)
}

fn push_extent(out: &mut Vec<Extent>, len_bytes: u64, hole: bool) {
    if let Some(last) = out.last_mut() {
        if last.hole == hole {
            last.len_bytes += len_bytes;
            return;
        }
    }
    out.push(Extent {
        len_bytes,
        hole,
        zero: hole,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for len in [1usize, 512, 4096, 5000, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert!(is_ptr_aligned(b.as_slice().as_ptr()));
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
        let c = AlignedBuf::copy_from(b"hello");
        assert_eq!(c.as_slice(), b"hello");
    }

    #[test]
    fn direct_window_covers_request() {
        assert_eq!(direct_window(0, 4096), (0, 4096));
        assert_eq!(direct_window(100, 10), (0, 4096));
        assert_eq!(direct_window(4000, 200), (0, 8192));
        assert_eq!(direct_window(8192, 1), (8192, 4096));
    }
}
