//! Storage: one asynchronous block I/O interface, several engines.
//!
//! This module owns the [`BlockIo`] trait, the error type every engine and every
//! layer above it speaks ([`IoError`], mapped to errno values for NBD and FUSE), and
//! the engines that reach a backing disk:
//!
//! - `sync`: portable engine, positioned `pread`/`pwrite` on tokio's blocking pool;
//! - `uring`: io_uring engine, one submission thread per disk;
//! - `fault`: a wrapper that injects errors and simulates power cuts (tests).
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
use std::pin::Pin;

use bytes::Bytes;

/// A boxed future returned by every [`BlockIo`] call (dyn-compatible trait).
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, IoError>> + Send + 'a>>;

/// Errors of the block layer, each with the errno a frontend reports.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The backing disk returned an error.
    #[error("I/O error on the backing disk: {0}")]
    Io(#[from] std::io::Error),
    /// The request reaches past the end of the device.
    #[error("request at offset {offset_bytes} length {len_bytes} is past the end ({size_bytes} bytes)")]
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
