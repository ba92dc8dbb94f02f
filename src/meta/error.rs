//! The error type of the meta-data module ([`MetaError`]) and [`Place`], the "on PATH at
//! offset N" context attached to errors found on a device.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where on which device an error was found; empty when a pure decoder reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    /// The meta-data device (or backing disk), when known.
    pub path: Option<PathBuf>,
    /// The byte offset on that device, when known.
    pub offset_bytes: Option<u64>,
}

impl Place {
    /// A place on `path` at `offset_bytes`.
    pub fn at(path: &Path, offset_bytes: u64) -> Place {
        Place {
            path: Some(path.to_path_buf()),
            offset_bytes: Some(offset_bytes),
        }
    }

    /// A place on `path`, offset unknown or irrelevant.
    pub fn on(path: &Path) -> Place {
        Place {
            path: Some(path.to_path_buf()),
            offset_bytes: None,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, " on {}", path.display())?;
        }
        if let Some(offset_bytes) = self.offset_bytes {
            write!(f, " at offset {offset_bytes}")?;
        }
        Ok(())
    }
}

/// Errors of the meta-data layer; the Display text is meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A system call on a device or file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was attempted ("open", "read", "write", "sync", "stat", ...).
        op: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No rdb magic where the superblock should be.
    #[error("no rdb meta-data found{place} (run rdbadm create-md)")]
    NotFound {
        /// Where the superblock was looked for.
        place: Place,
    },
    /// The stored CRC32 does not match the block's contents.
    #[error(
        "meta-data {what} checksum mismatch{place}: expected {expected:#010x}, found {found:#010x}"
    )]
    BadChecksum {
        /// "superblock" or "activity log transaction".
        what: &'static str,
        /// Where the block was read.
        place: Place,
        /// The checksum stored in the block.
        expected: u32,
        /// The checksum computed over the block.
        found: u32,
    },
    /// The block carries rdb's magic but a format version this build does not know.
    #[error("meta-data {what}{place} has format version {version}, this rdb understands only version {supported}")]
    UnsupportedVersion {
        /// "superblock" or "activity log transaction".
        what: &'static str,
        /// Where the block was read.
        place: Place,
        /// The version found.
        version: u32,
        /// The version this build writes and reads.
        supported: u32,
    },
    /// A checksummed block whose contents are inconsistent (offsets, sizes, counts).
    #[error("corrupt meta-data {what}{place}: {reason}")]
    Corrupt {
        /// "superblock" or "activity log transaction".
        what: &'static str,
        /// Where the block was read.
        place: Place,
        /// What is wrong.
        reason: &'static str,
    },
    /// `create-md` found existing rdb meta-data and was not forced.
    #[error("rdb meta-data already exists{place}; refusing to overwrite it (use --force)")]
    AlreadyExists {
        /// Where the existing superblock was found.
        place: Place,
    },
    /// `create-md` found a file system (or other signature) in the data area.
    #[error("{} holds {fs} at offset {offset_bytes}; refusing to create meta-data over it (use --force to destroy it)", path.display())]
    HoldsFilesystem {
        /// The disk that holds it.
        path: PathBuf,
        /// What was found ("ext4", "xfs", ...).
        fs: String,
        /// Where the file system starts.
        offset_bytes: u64,
    },
    /// The backing disk or the meta-data device is too small for the layout.
    #[error(
        "{what}{place} is too small: {size_bytes} bytes, at least {needed_bytes} bytes needed"
    )]
    TooSmall {
        /// "backing disk" or "meta-data device".
        what: &'static str,
        /// The device, when known.
        place: Place,
        /// Its size.
        size_bytes: u64,
        /// The minimum size.
        needed_bytes: u64,
    },
    /// The data area is too large for a fixed 128 MiB external meta-data slot.
    #[error("a data size of {data_size_bytes} bytes needs {bitmap_size_bytes} bytes of bitmap, more than an indexed 128 MiB meta-data slot holds (use flexible-meta-disk)")]
    TooLarge {
        /// The data size.
        data_size_bytes: u64,
        /// The bitmap it needs.
        bitmap_size_bytes: u64,
    },
    /// The superblock does not describe the layout computed from the current sizes.
    #[error("meta-data{place} does not match the disk: {field} recorded {recorded}, computed {computed} (was the disk resized or the meta-disk setting changed?)")]
    LayoutMismatch {
        /// Where the superblock was read.
        place: Place,
        /// Which field differs.
        field: &'static str,
        /// Value in the superblock.
        recorded: u64,
        /// Value computed now.
        computed: u64,
    },
    /// A bitmap range reaches past the end of the data area.
    #[error("range at offset {offset_bytes} length {len_bytes} is past the end of the data ({size_bytes} bytes)")]
    OutOfRange {
        /// Start of the range.
        offset_bytes: u64,
        /// Length of the range.
        len_bytes: u64,
        /// Data size.
        size_bytes: u64,
    },
    /// Every activity-log slot holds an extent with writes in flight.
    #[error("activity log full: {needed} new extents needed, all {capacity} slots have writes in flight")]
    AlFull {
        /// Extents that needed a slot.
        needed: usize,
        /// Capacity of the log (al-extents).
        capacity: u32,
    },
    /// After an unclean shutdown the activity log does not tell which extents may
    /// differ from the peer (see `meta::recovery`).
    #[error("activity log{place} cannot be recovered: {reason}. This node's data may differ from its peer's in unknown places; resync it fully from the peer: rdbadm create-md --force on this node, then up (it becomes SyncTarget)")]
    AlUnrecoverable {
        /// Where the activity log lives.
        place: Place,
        /// What was found.
        reason: String,
    },
    /// A caller passed an invalid value.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl MetaError {
    /// Attaches `place` to an error produced by a pure decoder (which knows no path).
    pub fn with_place(self, new_place: Place) -> MetaError {
        match self {
            MetaError::NotFound { .. } => MetaError::NotFound { place: new_place },
            MetaError::BadChecksum {
                what,
                expected,
                found,
                ..
            } => MetaError::BadChecksum {
                what,
                place: new_place,
                expected,
                found,
            },
            MetaError::UnsupportedVersion {
                what,
                version,
                supported,
                ..
            } => MetaError::UnsupportedVersion {
                what,
                place: new_place,
                version,
                supported,
            },
            MetaError::Corrupt { what, reason, .. } => MetaError::Corrupt {
                what,
                place: new_place,
                reason,
            },
            other => other,
        }
    }

    /// Builds an [`MetaError::Io`].
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> MetaError {
        MetaError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
