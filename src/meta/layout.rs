//! Where the meta-data regions live on the meta-data device.
//!
//! Internal meta-data (at the end of the backing disk, as DRBD 8.4):
//!
//! ```text
//! [ data ............ ][ bitmap ][ activity log 32 KiB ][ superblock 4 KiB ]
//! ```
//!
//! External meta-data (an indexed 128 MiB slot, or the whole "flexible" device):
//!
//! ```text
//! [ superblock 4 KiB ][ activity log 32 KiB ][ bitmap ][ unused ... ]
//! ```
//!
//! Every region is 4 KiB aligned. The bitmap has 1 bit per 4 KiB block of data; for
//! internal meta-data its size depends on the data size, which in turn shrinks by the
//! bitmap: [`Layout::compute`] finds the largest data size that fits.

use std::path::PathBuf;

use serde::Serialize;

use super::error::{MetaError, Place};

/// Granularity of the bitmap: one bit per block of this size.
pub const BLOCK_SIZE_BYTES: u64 = 4096;
/// Size of an activity-log extent.
pub const AL_EXTENT_SIZE_BYTES: u64 = 4 << 20;
/// Size of one activity-log transaction (one ring slot).
pub const AL_TRANSACTION_SIZE_BYTES: u64 = 4096;
/// Number of slots of the activity-log ring.
pub const AL_RING_SLOTS: u64 = 8;
/// Size of the activity-log area.
pub const AL_SIZE_BYTES: u64 = AL_TRANSACTION_SIZE_BYTES * AL_RING_SLOTS;
/// Size of the superblock.
pub const SUPERBLOCK_SIZE_BYTES: u64 = 4096;
/// Size of one slot of indexed external meta-data (`meta-disk PATH [IDX]`), as DRBD.
pub const EXTERNAL_SLOT_SIZE_BYTES: u64 = 128 << 20;
/// Smallest data area rdb accepts.
pub const MIN_DATA_SIZE_BYTES: u64 = 1 << 20;

/// Where the meta-data of a resource lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum MetaLocation {
    /// At the end of the backing disk (`meta-disk internal;`).
    Internal,
    /// On another file or device: `meta-disk PATH [IDX]` (index = Some: fixed 128 MiB
    /// slot number IDX) or `flexible-meta-disk PATH` (index = None: the whole device).
    External {
        /// The meta-data device or file.
        path: PathBuf,
        /// The slot index, None for flexible meta-data.
        index: Option<u32>,
    },
}

/// Byte positions of the meta-data regions, absolute on the meta-data device (which is
/// the backing disk for internal meta-data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Usable data size, a multiple of 4 KiB, starting at offset 0 of the backing disk.
    pub data_size_bytes: u64,
    /// Start of the meta-data region on the meta-data device.
    pub md_device_offset_bytes: u64,
    /// Start of the bitmap.
    pub bitmap_offset_bytes: u64,
    /// Size of the bitmap region (a multiple of 4 KiB).
    pub bitmap_size_bytes: u64,
    /// Start of the activity-log ring.
    pub al_offset_bytes: u64,
    /// Size of the activity-log ring.
    pub al_size_bytes: u64,
    /// Start of the 4 KiB superblock.
    pub superblock_offset_bytes: u64,
}

/// Rounds down to a multiple of 4 KiB.
pub(crate) fn floor_4k(value: u64) -> u64 {
    value & !(BLOCK_SIZE_BYTES - 1)
}

/// Number of bitmap bits (4 KiB blocks) for `data_size_bytes`, partial block included.
pub fn bitmap_bits(data_size_bytes: u64) -> u64 {
    data_size_bytes.div_ceil(BLOCK_SIZE_BYTES)
}

/// Size of the on-disk bitmap region for `data_size_bytes`: one bit per 4 KiB block,
/// rounded up to whole 4 KiB pages.
pub fn bitmap_size_for(data_size_bytes: u64) -> u64 {
    let bytes = bitmap_bits(data_size_bytes).div_ceil(8);
    bytes.div_ceil(BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES
}

/// Fixed part of the meta-data (activity log + superblock).
const FIXED_MD_BYTES: u64 = AL_SIZE_BYTES + SUPERBLOCK_SIZE_BYTES;

impl Layout {
    /// Computes the layout for a backing disk of `backing_size_bytes` with meta-data at
    /// `meta`; `meta_device_size_bytes` is the size of the external meta-data device
    /// (ignored for internal meta-data).
    pub fn compute(
        backing_size_bytes: u64,
        meta: &MetaLocation,
        meta_device_size_bytes: u64,
    ) -> Result<Layout, MetaError> {
        match meta {
            MetaLocation::Internal => Self::internal(backing_size_bytes),
            MetaLocation::External { index, .. } => {
                let data_size_bytes = floor_4k(backing_size_bytes);
                if data_size_bytes < MIN_DATA_SIZE_BYTES {
                    return Err(MetaError::TooSmall {
                        what: "backing disk",
                        place: Place::default(),
                        size_bytes: backing_size_bytes,
                        needed_bytes: MIN_DATA_SIZE_BYTES,
                    });
                }
                let bitmap_size_bytes = bitmap_size_for(data_size_bytes);
                let needed_bytes = FIXED_MD_BYTES + bitmap_size_bytes;
                let md_device_offset_bytes = match index {
                    Some(index) => {
                        if needed_bytes > EXTERNAL_SLOT_SIZE_BYTES {
                            return Err(MetaError::TooLarge {
                                data_size_bytes,
                                bitmap_size_bytes,
                            });
                        }
                        let offset_bytes = u64::from(*index) * EXTERNAL_SLOT_SIZE_BYTES;
                        let slot_end_bytes = offset_bytes + EXTERNAL_SLOT_SIZE_BYTES;
                        if meta_device_size_bytes < slot_end_bytes {
                            return Err(MetaError::TooSmall {
                                what: "meta-data device (for its 128 MiB slot index)",
                                place: Place::default(),
                                size_bytes: meta_device_size_bytes,
                                needed_bytes: slot_end_bytes,
                            });
                        }
                        offset_bytes
                    }
                    None => {
                        if meta_device_size_bytes < needed_bytes {
                            return Err(MetaError::TooSmall {
                                what: "meta-data device",
                                place: Place::default(),
                                size_bytes: meta_device_size_bytes,
                                needed_bytes,
                            });
                        }
                        0
                    }
                };
                let layout = Layout {
                    data_size_bytes,
                    md_device_offset_bytes,
                    superblock_offset_bytes: md_device_offset_bytes,
                    al_offset_bytes: md_device_offset_bytes + SUPERBLOCK_SIZE_BYTES,
                    al_size_bytes: AL_SIZE_BYTES,
                    bitmap_offset_bytes: md_device_offset_bytes + FIXED_MD_BYTES,
                    bitmap_size_bytes,
                };
                layout.assert_valid(meta);
                Ok(layout)
            }
        }
    }

    fn internal(backing_size_bytes: u64) -> Result<Layout, MetaError> {
        let end_bytes = floor_4k(backing_size_bytes);
        let fits = |blocks: u64| -> bool {
            let data_bytes = blocks * BLOCK_SIZE_BYTES;
            data_bytes + bitmap_size_for(data_bytes) + FIXED_MD_BYTES <= end_bytes
        };
        // The largest number of 4 KiB data blocks whose data + bitmap + AL + superblock
        // fit: `fits` is monotonic (more data never needs less bitmap), so bisect.
        let mut low_blocks = 0u64; // fits(low) or low == 0
        let mut high_blocks = end_bytes / BLOCK_SIZE_BYTES + 1; // !fits(high)
        while high_blocks - low_blocks > 1 {
            let mid_blocks = low_blocks + (high_blocks - low_blocks) / 2;
            if fits(mid_blocks) {
                low_blocks = mid_blocks;
            } else {
                high_blocks = mid_blocks;
            }
        }
        let data_size_bytes = low_blocks * BLOCK_SIZE_BYTES;
        if data_size_bytes < MIN_DATA_SIZE_BYTES || !fits(low_blocks) {
            return Err(MetaError::TooSmall {
                what: "backing disk",
                place: Place::default(),
                size_bytes: backing_size_bytes,
                needed_bytes: MIN_DATA_SIZE_BYTES
                    + bitmap_size_for(MIN_DATA_SIZE_BYTES)
                    + FIXED_MD_BYTES,
            });
        }
        let bitmap_size_bytes = bitmap_size_for(data_size_bytes);
        let superblock_offset_bytes = end_bytes - SUPERBLOCK_SIZE_BYTES;
        let al_offset_bytes = superblock_offset_bytes - AL_SIZE_BYTES;
        let bitmap_offset_bytes = al_offset_bytes - bitmap_size_bytes;
        let layout = Layout {
            data_size_bytes,
            md_device_offset_bytes: bitmap_offset_bytes,
            bitmap_offset_bytes,
            bitmap_size_bytes,
            al_offset_bytes,
            al_size_bytes: AL_SIZE_BYTES,
            superblock_offset_bytes,
        };
        layout.assert_valid(&MetaLocation::Internal);
        Ok(layout)
    }

    /// Size of the whole meta-data region (bitmap + AL + superblock).
    pub fn md_size_bytes(&self) -> u64 {
        self.bitmap_size_bytes + self.al_size_bytes + SUPERBLOCK_SIZE_BYTES
    }

    /// Checks the invariants of a layout computed by this module.
    fn assert_valid(&self, meta: &MetaLocation) {
        assert_eq!(self.data_size_bytes % BLOCK_SIZE_BYTES, 0);
        assert_eq!(self.md_device_offset_bytes % BLOCK_SIZE_BYTES, 0);
        assert_eq!(self.bitmap_offset_bytes % BLOCK_SIZE_BYTES, 0);
        assert_eq!(self.al_offset_bytes % BLOCK_SIZE_BYTES, 0);
        assert_eq!(self.superblock_offset_bytes % BLOCK_SIZE_BYTES, 0);
        assert!(self.bitmap_size_bytes >= bitmap_size_for(self.data_size_bytes));
        assert_eq!(self.al_size_bytes, AL_SIZE_BYTES);
        if *meta == MetaLocation::Internal {
            assert!(self.data_size_bytes <= self.bitmap_offset_bytes);
            assert_eq!(
                self.bitmap_offset_bytes + self.bitmap_size_bytes,
                self.al_offset_bytes
            );
            assert_eq!(
                self.al_offset_bytes + self.al_size_bytes,
                self.superblock_offset_bytes
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    #[test]
    fn bitmap_is_32_kib_per_gib() {
        assert_eq!(bitmap_size_for(GIB), 32 * 1024);
        assert_eq!(bitmap_size_for(TIB), 32 * MIB);
        assert_eq!(bitmap_size_for(1), 4096);
        assert_eq!(bitmap_size_for(128 * MIB), 4096);
        assert_eq!(bitmap_size_for(128 * MIB + 4096), 8192);
    }

    #[test]
    fn internal_256_mib() {
        let layout = Layout::compute(256 * MIB, &MetaLocation::Internal, 0).unwrap();
        assert!(layout.data_size_bytes > 200 * MIB);
        // Just under 65536 blocks -> 8 KiB of bitmap, + 32 KiB AL + 4 KiB superblock.
        assert_eq!(layout.bitmap_size_bytes, 8192);
        assert_eq!(layout.data_size_bytes, 256 * MIB - 44 * 1024);
        assert_eq!(layout.superblock_offset_bytes, 256 * MIB - 4096);
        assert_eq!(layout.al_offset_bytes, 256 * MIB - 36 * 1024);
        assert_eq!(layout.bitmap_offset_bytes, 256 * MIB - 44 * 1024);
        assert_eq!(layout.md_device_offset_bytes, layout.bitmap_offset_bytes);
    }

    /// Brute force of the fixed point: no larger data size fits.
    fn check_internal_optimal(backing_size_bytes: u64) {
        let layout = match Layout::compute(backing_size_bytes, &MetaLocation::Internal, 0) {
            Ok(layout) => layout,
            Err(MetaError::TooSmall { .. }) => {
                assert!(backing_size_bytes < MIN_DATA_SIZE_BYTES + FIXED_MD_BYTES + 4096);
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let d = layout.data_size_bytes;
        assert!(d >= MIN_DATA_SIZE_BYTES);
        assert!(layout.superblock_offset_bytes + SUPERBLOCK_SIZE_BYTES <= backing_size_bytes);
        assert!(d + layout.md_size_bytes() <= backing_size_bytes);
        let next = d + BLOCK_SIZE_BYTES;
        assert!(
            next + bitmap_size_for(next) + FIXED_MD_BYTES > floor_4k(backing_size_bytes),
            "data size {d} not maximal for backing {backing_size_bytes}"
        );
    }

    #[test]
    fn internal_sizes_1_mib_to_16_tib() {
        let mut size = MIB;
        while size <= 16 * TIB {
            for delta in [0, 1, 4095, 4096, 12345, 4096 * 3] {
                check_internal_optimal(size + delta);
                check_internal_optimal(size.saturating_sub(delta));
            }
            size = size * 3 / 2;
        }
        // Around the boundaries where the bitmap gains a page (every 128 MiB of data).
        for pages in [1u64, 2, 8, 1000, 131072] {
            let data = pages * 128 * MIB;
            for delta in 0..24u64 {
                check_internal_optimal(
                    data + FIXED_MD_BYTES + pages * 4096 - 4096 * 12 + delta * 4096,
                );
            }
        }
        let layout = Layout::compute(16 * TIB, &MetaLocation::Internal, 0).unwrap();
        assert_eq!(layout.superblock_offset_bytes, 16 * TIB - 4096);
        assert!(layout.bitmap_size_bytes >= 512 * MIB - 32 * 1024);
    }

    #[test]
    fn too_small_backing() {
        assert!(matches!(
            Layout::compute(MIB, &MetaLocation::Internal, 0),
            Err(MetaError::TooSmall { .. })
        ));
        assert!(Layout::compute(MIB + 40 * 1024, &MetaLocation::Internal, 0).is_ok());
        let meta = MetaLocation::External {
            path: "/m".into(),
            index: None,
        };
        assert!(matches!(
            Layout::compute(MIB - 4096, &meta, GIB),
            Err(MetaError::TooSmall { .. })
        ));
        assert!(Layout::compute(MIB, &meta, GIB).is_ok());
    }

    #[test]
    fn external_indexed() {
        let meta = MetaLocation::External {
            path: "/m".into(),
            index: Some(2),
        };
        let layout = Layout::compute(10 * GIB + 123, &meta, 3 * 128 * MIB).unwrap();
        assert_eq!(layout.data_size_bytes, 10 * GIB);
        assert_eq!(layout.md_device_offset_bytes, 256 * MIB);
        assert_eq!(layout.superblock_offset_bytes, 256 * MIB);
        assert_eq!(layout.al_offset_bytes, 256 * MIB + 4096);
        assert_eq!(layout.bitmap_offset_bytes, 256 * MIB + 36 * 1024);
        assert_eq!(layout.bitmap_size_bytes, 320 * 1024);
        // The slot must exist on the device.
        assert!(matches!(
            Layout::compute(10 * GIB, &meta, 3 * 128 * MIB - 1),
            Err(MetaError::TooSmall { .. })
        ));
        // A 128 MiB slot holds the bitmap of just under 4 TiB.
        assert!(Layout::compute(4 * TIB - 1152 * MIB, &meta, GIB).is_ok());
        assert!(Layout::compute(4 * TIB - 1152 * MIB + 4096, &meta, GIB).is_err());
        assert!(matches!(
            Layout::compute(4 * TIB, &meta, GIB),
            Err(MetaError::TooLarge { .. })
        ));
    }

    #[test]
    fn external_flexible() {
        let meta = MetaLocation::External {
            path: "/m".into(),
            index: None,
        };
        let layout = Layout::compute(16 * TIB, &meta, 513 * MIB).unwrap();
        assert_eq!(layout.md_device_offset_bytes, 0);
        assert_eq!(layout.bitmap_size_bytes, 512 * MIB);
        assert_eq!(layout.data_size_bytes, 16 * TIB);
        assert!(matches!(
            Layout::compute(16 * TIB, &meta, 512 * MIB),
            Err(MetaError::TooSmall { .. })
        ));
    }
}
