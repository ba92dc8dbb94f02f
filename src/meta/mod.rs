//! On-disk meta-data of an rdb resource, modelled on DRBD 8.4's meta-data.
//!
//! This module owns every byte rdb keeps beside the replicated data:
//!
//! - [`layout`]: where the regions live (internal meta-data at the end of the backing
//!   disk, or external meta-data in an indexed 128 MiB slot or a whole "flexible" file);
//! - [`superblock`]: the 4 KiB superblock (flags, sizes, generation UUIDs), encoded in a
//!   fixed little-endian layout with a CRC32;
//! - [`uuid`]: the generation UUIDs and their rotation rules;
//! - [`bitmap`]: the in-memory out-of-sync bitmap (1 bit per 4 KiB) with dirty-page
//!   tracking and persistence;
//! - [`al`]: the activity log (hot 4 MiB extents), its 4 KiB checksummed transactions
//!   written to a ring of 8 slots, and crash replay;
//! - [`file`]: the file-level operations used by `rdbadm create-md/dump-md/wipe-md` and
//!   by the daemon at `up` (regular files and block devices);
//! - [`recovery`]: activity-log recovery after a crash (fall back over a torn
//!   transaction, refuse when the hot set is unknown).
//!
//! The byte-level formats are documented in `docs/metadata.md`.

pub mod al;
pub mod bitmap;
pub mod file;
pub mod layout;
pub mod recovery;
pub mod superblock;
pub mod uuid;

mod error;

pub use al::{ActivityLog, AlTransaction};
pub use bitmap::Bitmap;
pub use error::{MetaError, Place};
pub use file::{
    create_md, detect_filesystem, device_size_bytes, read_md, wipe_md, write_superblock,
    CreateOptions, MetaData,
};
pub use layout::{
    Layout, MetaLocation, AL_EXTENT_SIZE_BYTES, AL_RING_SLOTS, AL_SIZE_BYTES, BLOCK_SIZE_BYTES,
    EXTERNAL_SLOT_SIZE_BYTES, MIN_DATA_SIZE_BYTES, SUPERBLOCK_SIZE_BYTES,
};
pub use superblock::{flags, Superblock};
pub use uuid::GenerationUuids;
