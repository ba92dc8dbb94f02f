//! Storage: one asynchronous block I/O interface, several engines.
//!
//! This module owns the [`BlockIo`] trait, the error type every engine and every
//! layer above it speaks ([`IoError`], mapped to errno values for NBD and FUSE), and
//! the engines that reach a backing disk:
//!
//! - [`sync`]: portable engine, positioned `pread`/`pwrite` (page-cache hits served
//!   inline, the rest on tokio's blocking pool);
//! - [`uring`]: io_uring engine, one submission thread per disk;
//! - [`mem`]: an in-memory disk for tests and the simulator;
//! - [`fault`]: a wrapper that injects errors and simulates power cuts (tests);
//! - [`sys`]: aligned buffers, ioctls, fallocate, SEEK_DATA/SEEK_HOLE helpers.
//!
//! [`open`] opens a byte range of a file or block device with either engine.
//!
//! The same trait is implemented by the replicated volume, so a frontend (NBD, FUSE)
//! serves a plain file and a replicated resource alike. Offsets and lengths are in
//! bytes, relative to the start of whatever the implementor exposes (for an engine
//! opened on a range, the start of that range).
//!
//! Durability contract: a completed `write_at` may sit in a volatile cache (the page
//! cache when the file is not opened with O_DIRECT); it is stable once a later `flush`
//! completes, or immediately when `write_at` was called with `fua = true`.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub mod fault;
pub mod mem;
pub mod sync;
pub mod sys;
pub mod uring;

/// A boxed future returned by every [`BlockIo`] call (dyn-compatible trait).
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, IoError>> + Send + 'a>>;

/// Errors of the block layer, each with the errno a frontend reports.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The backing disk returned an error.
    #[error("I/O error on the backing disk: {0}")]
    Io(#[from] std::io::Error),
    /// The request reaches past the end of the device.
    #[error(
        "request at offset {offset_bytes} length {len_bytes} is past the end ({size_bytes} bytes)"
    )]
    OutOfRange {
        /// Start of the request.
        offset_bytes: u64,
        /// Length of the request.
        len_bytes: u64,
        /// Size of the device.
        size_bytes: u64,
    },
    /// The device may not be written (or read) in its current role/state.
    #[error("{0}")]
    NotPermitted(String),
    /// The request is malformed (alignment, zero length where forbidden, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The operation is not supported by this engine.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The device is shutting down.
    #[error("device is shutting down")]
    Shutdown,
}

impl IoError {
    /// The errno value that represents this error to a client.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            IoError::OutOfRange { .. } => libc::EINVAL,
            IoError::NotPermitted(_) => libc::EPERM,
            IoError::Invalid(_) => libc::EINVAL,
            IoError::Unsupported(_) => libc::EOPNOTSUPP,
            IoError::Shutdown => libc::ESHUTDOWN,
        }
    }

    /// Checks that `[offset, offset+len)` lies within `size_bytes`.
    pub fn check_range(offset_bytes: u64, len_bytes: u64, size_bytes: u64) -> Result<(), IoError> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset_bytes,
                len_bytes,
                size_bytes,
            }),
        }
    }
}

/// One extent of allocation information (NBD `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent in bytes.
    pub len_bytes: u64,
    /// The extent is a hole (reads as zeroes, no storage allocated).
    pub hole: bool,
    /// The extent reads as zeroes.
    pub zero: bool,
}

/// Asynchronous block I/O on a device of fixed size.
///
/// Implementations must be safe to call concurrently from many tasks; requests
/// may complete in any order. Overlapping concurrent writes have no defined order
/// (as on a real disk): callers that care serialise them.
pub trait BlockIo: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;

    /// Reads `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>>;

    /// Writes `data` at `offset`; with `fua`, the data is stable when this completes.
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()>;

    /// Makes every completed write stable (fdatasync).
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Discards a range (TRIM): its content becomes unspecified (engines on files
    /// punch a hole, so it reads as zeroes).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Writes zeroes to a range; with `may_unmap`, the engine may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()>;

    /// Allocation status from `offset`, covering at most `len` bytes (at least one
    /// extent when `len > 0`). The default reports everything as allocated data.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            IoError::check_range(offset, len, self.size_bytes())?;
            Ok(vec![Extent {
                len_bytes: len,
                hole: false,
                zero: false,
            }])
        })
    }

    /// Whether a `flush` covers writes completed through any handle to this
    /// device (NBD `CAN_MULTI_CONN`).
    fn flush_covers_all_handles(&self) -> bool {
        true
    }
}

/// Which engine reaches the backing disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `pread`/`pwrite` on tokio's blocking pool.
    Sync,
    /// io_uring, one ring thread per disk.
    Uring,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Sync => "sync",
            EngineKind::Uring => "uring",
        })
    }
}

impl std::str::FromStr for EngineKind {
    type Err = IoError;

    fn from_str(s: &str) -> Result<EngineKind, IoError> {
        match s {
            "sync" => Ok(EngineKind::Sync),
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            other => Err(IoError::Invalid(format!(
                "unknown storage engine {other:?} (sync, uring)"
            ))),
        }
    }
}

/// How to open a backing disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// The engine to use (io_uring falls back to sync when unavailable).
    pub engine: EngineKind,
    /// Open with O_DIRECT (bypass the page cache). Writes must then be 4 KiB aligned
    /// (offset and length, relative to the disk; `offset_bytes` must be aligned too).
    pub direct_io: bool,
    /// Open read-only: every write, discard, zeroing fails with `NotPermitted`.
    pub read_only: bool,
    /// Start of the exposed range on the disk.
    pub offset_bytes: u64,
    /// Length of the exposed range; `None` = up to the end of the disk.
    pub size_bytes: Option<u64>,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            engine: EngineKind::Sync,
            direct_io: false,
            read_only: false,
            offset_bytes: 0,
            size_bytes: None,
        }
    }
}

/// Size in bytes of a regular file (its length) or block device (BLKGETSIZE64).
pub fn device_size_bytes(path: &Path) -> Result<u64, IoError> {
    let file = std::fs::File::open(path)?;
    Ok(sys::file_size_bytes(&file)?)
}

/// Opens a backing disk; see [`open_with_info`].
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockIo>, IoError> {
    open_with_info(path, opts).map(|(dev, _)| dev)
}

/// Opens `[offset_bytes, offset_bytes + size_bytes)` of a regular file or block device
/// with the requested engine, and returns the engine really in use (io_uring falls
/// back to sync with a warning when the ring cannot be set up).
pub fn open_with_info(
    path: &Path,
    opts: &OpenOptions,
) -> Result<(Arc<dyn BlockIo>, EngineKind), IoError> {
    use std::os::unix::fs::OpenOptionsExt;

    if opts.direct_io && !sys::is_direct_aligned(opts.offset_bytes) {
        return Err(IoError::Invalid(format!(
            "with direct I/O the data offset must be {} aligned, not {}",
            sys::DIRECT_ALIGN_BYTES,
            opts.offset_bytes
        )));
    }
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(!opts.read_only);
    if opts.direct_io {
        oo.custom_flags(libc::O_DIRECT);
    }
    let file = oo.open(path)?;
    let is_block = sys::is_block_device(&file)?;
    let disk_bytes = sys::file_size_bytes(&file)?;
    let size_bytes = match opts.size_bytes {
        Some(s) => s,
        None => disk_bytes.checked_sub(opts.offset_bytes).ok_or_else(|| {
            IoError::Invalid(format!(
                "data offset {} is past the end of {} ({disk_bytes} bytes)",
                opts.offset_bytes,
                path.display()
            ))
        })?,
    };
    if opts
        .offset_bytes
        .checked_add(size_bytes)
        .is_none_or(|end| end > disk_bytes)
    {
        return Err(IoError::Invalid(format!(
            "data area [{}, +{size_bytes}) does not fit in {} ({disk_bytes} bytes)",
            opts.offset_bytes,
            path.display()
        )));
    }
    let target = sync::Target {
        file: Arc::new(file),
        base_bytes: opts.offset_bytes,
        size_bytes,
        direct_io: opts.direct_io,
        is_block,
        read_only: opts.read_only,
    };
    if opts.engine == EngineKind::Uring {
        match uring::UringDisk::start(target.clone()) {
            Ok(d) => return Ok((Arc::new(d), EngineKind::Uring)),
            Err(e) => tracing::warn!(
                "io_uring unavailable for {} ({e}); falling back to the sync engine",
                path.display()
            ),
        }
    }
    Ok((Arc::new(sync::SyncDisk::new(target)), EngineKind::Sync))
}
