//! The 4 KiB meta-data superblock: a fixed little-endian byte layout with a CRC32.
//!
//! Byte layout (the table in `docs/metadata.md` is the reference):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RDBMETA1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | CRC32 of the 4096 bytes with this field zeroed |
//! | 16 | 4 | flags |
//! | 20 | 4 | bytes per bitmap bit (4096) |
//! | 24 | 8 | data size |
//! | 32 | 8 | meta-data region offset |
//! | 40 | 8 | superblock offset |
//! | 48 | 8 | bitmap offset |
//! | 56 | 8 | bitmap size |
//! | 64 | 8 | AL offset |
//! | 72 | 8 | AL size |
//! | 80 | 4 | al-extents |
//! | 84 | 4 | AL extent size (4 MiB) |
//! | 88 | 8 | current UUID |
//! | 96 | 8 | bitmap UUID |
//! | 104 | 16 | history UUIDs [2] |
//! | 120 | 8 | device UUID |
//! | 128 | 8 | last AL transaction number |
//! | 136 | 8 | creation time (Unix seconds) |
//! | 144 | 8 | peer node name hash (0 = unknown) |
//! | 152 | 4 | meta-data kind (0 internal, 1 external indexed, 2 flexible) |
//! | 156 | 4 | external slot index |
//! | 160 | 3936 | reserved, zero |

use serde::{Serialize, Serializer};

use super::al;
use super::error::{MetaError, Place};
use super::layout::{
    bitmap_size_for, Layout, MetaLocation, AL_EXTENT_SIZE_BYTES, AL_SIZE_BYTES, BLOCK_SIZE_BYTES,
    SUPERBLOCK_SIZE_BYTES,
};
use super::uuid::GenerationUuids;

/// Magic at offset 0 of the superblock.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"RDBMETA1";
/// The format version this build writes and reads.
pub const SUPERBLOCK_VERSION: u32 = 1;
/// Offset of the CRC32 field.
const CRC_OFFSET: usize = 12;
/// First reserved byte.
const RESERVED_OFFSET: usize = 160;

const WHAT: &str = "superblock";

/// Superblock flags (bit values of [`Superblock::flags`]).
pub mod flags {
    /// The data is consistent (not in the middle of a resync target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The data was UpToDate when last written.
    pub const WAS_UP_TO_DATE: u32 = 1 << 1;
    /// The peer marked this node's data Outdated (fencing).
    pub const OUTDATED: u32 = 1 << 2;
    /// This node is Primary; still set at the next start = the Primary crashed.
    pub const PRIMARY_IND: u32 = 1 << 3;
    /// The node was connected to its peer when last written.
    pub const CONNECTED_IND: u32 = 1 << 4;
    /// A full sync is needed (the whole bitmap is to be set on next attach).
    pub const FULL_SYNC_NEEDED: u32 = 1 << 5;
    /// A Primary crashed: the AL extents must be resynced on next connect.
    pub const CRASHED_PRIMARY: u32 = 1 << 6;
    /// The activity log was cleanly shut down (no hot extents to replay).
    pub const AL_CLEAN: u32 = 1 << 7;
    /// Every defined flag.
    pub const ALL: u32 = (1 << 8) - 1;
    /// Flag names, in bit order.
    pub const NAMES: [(u32, &str); 8] = [
        (CONSISTENT, "consistent"),
        (WAS_UP_TO_DATE, "was_up_to_date"),
        (OUTDATED, "outdated"),
        (PRIMARY_IND, "primary_ind"),
        (CONNECTED_IND, "connected_ind"),
        (FULL_SYNC_NEEDED, "full_sync_needed"),
        (CRASHED_PRIMARY, "crashed_primary"),
        (AL_CLEAN, "al_clean"),
    ];

    /// The names of the flags set in `bits`.
    pub fn names(bits: u32) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(bit, _)| bits & bit != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

/// How the meta-data is placed, as recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetaKind {
    /// At the end of the backing disk.
    Internal,
    /// In slot `meta_index` of an external device.
    ExternalIndexed,
    /// On a whole external device.
    Flexible,
}

impl MetaKind {
    /// The kind and slot index of a location.
    pub fn of(meta: &MetaLocation) -> (MetaKind, u32) {
        match meta {
            MetaLocation::Internal => (MetaKind::Internal, 0),
            MetaLocation::External {
                index: Some(index), ..
            } => (MetaKind::ExternalIndexed, *index),
            MetaLocation::External { index: None, .. } => (MetaKind::Flexible, 0),
        }
    }

    fn code(self) -> u32 {
        match self {
            MetaKind::Internal => 0,
            MetaKind::ExternalIndexed => 1,
            MetaKind::Flexible => 2,
        }
    }

    fn from_code(code: u32) -> Option<MetaKind> {
        match code {
            0 => Some(MetaKind::Internal),
            1 => Some(MetaKind::ExternalIndexed),
            2 => Some(MetaKind::Flexible),
            _ => None,
        }
    }
}

fn serialize_flags<S: Serializer>(bits: &u32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(flags::names(*bits))
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Superblock {
    /// [`flags`] bits (JSON: the list of flag names).
    #[serde(serialize_with = "serialize_flags")]
    pub flags: u32,
    /// Sizes and offsets of the regions (absolute on the meta-data device).
    pub layout: Layout,
    /// Bytes covered by one bitmap bit (always [`BLOCK_SIZE_BYTES`]).
    pub bytes_per_bit: u32,
    /// Capacity of the activity log in extents.
    pub al_extents: u32,
    /// Size of an AL extent (always [`AL_EXTENT_SIZE_BYTES`]).
    pub al_extent_size_bytes: u32,
    /// Generation UUIDs.
    pub uuids: GenerationUuids,
    /// Random identity of this meta-data, chosen at create-md (JSON: hex string).
    #[serde(serialize_with = "serialize_hex")]
    pub device_uuid: u64,
    /// Number of the last activity-log transaction known to be written.
    pub al_tr_number: u64,
    /// Hash of the peer's node name (0 = unknown).
    #[serde(serialize_with = "serialize_hex")]
    pub peer_name_hash: u64,
    /// Creation time, Unix seconds.
    pub created_unix_s: u64,
    /// Placement of the meta-data.
    pub meta_kind: MetaKind,
    /// Slot index for [`MetaKind::ExternalIndexed`], else 0.
    pub meta_index: u32,
}

fn serialize_hex<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&super::uuid::format_uuid(*value))
}

/// Reads a little-endian u32 at `offset` of a 4096-byte block.
fn get_u32(buf: &[u8; 4096], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

/// Reads a little-endian u64 at `offset` of a 4096-byte block.
fn get_u64(buf: &[u8; 4096], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

fn put_u32(buf: &mut [u8; 4096], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(buf: &mut [u8; 4096], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// CRC32 of a 4096-byte block with the 4 bytes at `crc_offset` taken as zero.
pub(crate) fn block_crc(buf: &[u8; 4096], crc_offset: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[..crc_offset]);
    hasher.update(&[0u8; 4]);
    hasher.update(&buf[crc_offset + 4..]);
    hasher.finalize()
}

/// The first 4096 bytes of `buf`, a meta-data block whose magic the caller checked,
/// once its version (the u32 at 8) is `version` and its CRC32 (at `crc_offset`,
/// [`block_crc`]) matches; `what` names the block in errors. Shared by the
/// superblock and the activity-log transactions.
pub(crate) fn checked_block(
    buf: &[u8],
    what: &'static str,
    version: u32,
    crc_offset: usize,
) -> Result<[u8; 4096], MetaError> {
    let Some(block) = buf.get(..4096) else {
        return Err(MetaError::Corrupt {
            what,
            place: Place::default(),
            reason: "block shorter than 4096 bytes",
        });
    };
    let mut bytes = [0u8; 4096];
    bytes.copy_from_slice(block);
    let found_version = get_u32(&bytes, 8);
    if found_version != version {
        return Err(MetaError::UnsupportedVersion {
            what,
            place: Place::default(),
            version: found_version,
            supported: version,
        });
    }
    let expected = get_u32(&bytes, crc_offset);
    let found = block_crc(&bytes, crc_offset);
    if expected != found {
        return Err(MetaError::BadChecksum {
            what,
            place: Place::default(),
            expected,
            found,
        });
    }
    Ok(bytes)
}

/// Whether `[a, a+a_len)` and `[b, b+b_len)` overlap (no overflow: callers check ends).
fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

impl Superblock {
    /// A superblock for freshly created meta-data: no flags but [`flags::AL_CLEAN`]
    /// (Inconsistent), UUIDs [`GenerationUuids::just_created`].
    pub fn new(
        layout: Layout,
        meta: &MetaLocation,
        al_extents: u32,
        device_uuid: u64,
        created_unix_s: u64,
    ) -> Superblock {
        let (meta_kind, meta_index) = MetaKind::of(meta);
        Superblock {
            flags: flags::AL_CLEAN,
            layout,
            bytes_per_bit: BLOCK_SIZE_BYTES as u32,
            al_extents,
            al_extent_size_bytes: AL_EXTENT_SIZE_BYTES as u32,
            uuids: GenerationUuids::just_created(),
            device_uuid,
            al_tr_number: 0,
            peer_name_hash: 0,
            created_unix_s,
            meta_kind,
            meta_index,
        }
    }

    /// Whether all bits of `flag` are set.
    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }

    /// Sets or clears `flag`.
    pub fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Encodes into the 4096-byte on-disk block (CRC included).
    pub fn encode(&self) -> [u8; 4096] {
        let mut buf = [0u8; 4096];
        buf[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut buf, 8, SUPERBLOCK_VERSION);
        put_u32(&mut buf, 16, self.flags);
        put_u32(&mut buf, 20, self.bytes_per_bit);
        put_u64(&mut buf, 24, self.layout.data_size_bytes);
        put_u64(&mut buf, 32, self.layout.md_device_offset_bytes);
        put_u64(&mut buf, 40, self.layout.superblock_offset_bytes);
        put_u64(&mut buf, 48, self.layout.bitmap_offset_bytes);
        put_u64(&mut buf, 56, self.layout.bitmap_size_bytes);
        put_u64(&mut buf, 64, self.layout.al_offset_bytes);
        put_u64(&mut buf, 72, self.layout.al_size_bytes);
        put_u32(&mut buf, 80, self.al_extents);
        put_u32(&mut buf, 84, self.al_extent_size_bytes);
        put_u64(&mut buf, 88, self.uuids.current);
        put_u64(&mut buf, 96, self.uuids.bitmap);
        put_u64(&mut buf, 104, self.uuids.history[0]);
        put_u64(&mut buf, 112, self.uuids.history[1]);
        put_u64(&mut buf, 120, self.device_uuid);
        put_u64(&mut buf, 128, self.al_tr_number);
        put_u64(&mut buf, 136, self.created_unix_s);
        put_u64(&mut buf, 144, self.peer_name_hash);
        put_u32(&mut buf, 152, self.meta_kind.code());
        put_u32(&mut buf, 156, self.meta_index);
        let crc = block_crc(&buf, CRC_OFFSET);
        put_u32(&mut buf, CRC_OFFSET, crc);
        buf
    }

    /// Decodes an on-disk block. Errors carry no [`Place`]; file-level callers attach
    /// one with [`MetaError::with_place`].
    pub fn decode(buf: &[u8]) -> Result<Superblock, MetaError> {
        let corrupt = |reason: &'static str| MetaError::Corrupt {
            what: WHAT,
            place: Place::default(),
            reason,
        };
        if buf.len() < 8 || buf[0..8] != SUPERBLOCK_MAGIC {
            return Err(MetaError::NotFound {
                place: Place::default(),
            });
        }
        let bytes = checked_block(buf, WHAT, SUPERBLOCK_VERSION, CRC_OFFSET)?;
        if bytes[RESERVED_OFFSET..].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved bytes are not zero"));
        }
        let meta_kind =
            MetaKind::from_code(get_u32(&bytes, 152)).ok_or(corrupt("unknown meta-data kind"))?;
        let superblock = Superblock {
            flags: get_u32(&bytes, 16),
            bytes_per_bit: get_u32(&bytes, 20),
            layout: Layout {
                data_size_bytes: get_u64(&bytes, 24),
                md_device_offset_bytes: get_u64(&bytes, 32),
                superblock_offset_bytes: get_u64(&bytes, 40),
                bitmap_offset_bytes: get_u64(&bytes, 48),
                bitmap_size_bytes: get_u64(&bytes, 56),
                al_offset_bytes: get_u64(&bytes, 64),
                al_size_bytes: get_u64(&bytes, 72),
            },
            al_extents: get_u32(&bytes, 80),
            al_extent_size_bytes: get_u32(&bytes, 84),
            uuids: GenerationUuids {
                current: get_u64(&bytes, 88),
                bitmap: get_u64(&bytes, 96),
                history: [get_u64(&bytes, 104), get_u64(&bytes, 112)],
            },
            device_uuid: get_u64(&bytes, 120),
            al_tr_number: get_u64(&bytes, 128),
            created_unix_s: get_u64(&bytes, 136),
            peer_name_hash: get_u64(&bytes, 144),
            meta_kind,
            meta_index: get_u32(&bytes, 156),
        };
        superblock.check().map_err(corrupt)?;
        Ok(superblock)
    }

    /// Checks the internal consistency of the fields (what decode accepts).
    pub fn check(&self) -> Result<(), &'static str> {
        let l = &self.layout;
        if self.flags & !flags::ALL != 0 {
            return Err("unknown flag bits");
        }
        if u64::from(self.bytes_per_bit) != BLOCK_SIZE_BYTES {
            return Err("bytes per bitmap bit is not 4096");
        }
        if u64::from(self.al_extent_size_bytes) != AL_EXTENT_SIZE_BYTES {
            return Err("activity log extent size is not 4 MiB");
        }
        if l.al_size_bytes != AL_SIZE_BYTES {
            return Err("activity log size is not 32 KiB");
        }
        let aligned = [
            l.data_size_bytes,
            l.md_device_offset_bytes,
            l.superblock_offset_bytes,
            l.bitmap_offset_bytes,
            l.bitmap_size_bytes,
            l.al_offset_bytes,
        ];
        if aligned.iter().any(|v| v % BLOCK_SIZE_BYTES != 0) {
            return Err("an offset or size is not 4 KiB aligned");
        }
        if l.data_size_bytes == 0 {
            return Err("data size is zero");
        }
        if l.bitmap_size_bytes < bitmap_size_for(l.data_size_bytes) {
            return Err("bitmap too small for the data size");
        }
        let ends = [
            l.superblock_offset_bytes.checked_add(SUPERBLOCK_SIZE_BYTES),
            l.bitmap_offset_bytes.checked_add(l.bitmap_size_bytes),
            l.al_offset_bytes.checked_add(l.al_size_bytes),
        ];
        if ends.iter().any(Option::is_none) {
            return Err("a region ends past 2^64");
        }
        let regions = [
            (l.superblock_offset_bytes, SUPERBLOCK_SIZE_BYTES),
            (l.bitmap_offset_bytes, l.bitmap_size_bytes),
            (l.al_offset_bytes, l.al_size_bytes),
        ];
        for (i, a) in regions.iter().enumerate() {
            if a.0 < l.md_device_offset_bytes {
                return Err("a region starts before the meta-data offset");
            }
            for b in &regions[i + 1..] {
                if overlaps(a.0, a.1, b.0, b.1) {
                    return Err("meta-data regions overlap");
                }
            }
        }
        if self.meta_kind == MetaKind::Internal && l.data_size_bytes > l.md_device_offset_bytes {
            return Err("data area overlaps internal meta-data");
        }
        if self.meta_kind != MetaKind::ExternalIndexed && self.meta_index != 0 {
            return Err("slot index set for non-indexed meta-data");
        }
        if self.al_tr_number > al::AL_MAX_TR_NUMBER {
            return Err("activity log transaction number implausibly large (>= 2^63)");
        }
        if self.al_extents < al::AL_MIN_EXTENTS
            || self.al_extents > al::max_al_extents(l.data_size_bytes)
        {
            return Err("al-extents out of range for the data size");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        let layout = Layout::compute(1 << 30, &MetaLocation::Internal, 0).unwrap();
        let mut sb = Superblock::new(
            layout,
            &MetaLocation::Internal,
            1237,
            0x1234_5678_9ABC_DEF0,
            1_700_000_000,
        );
        sb.flags |= flags::CONSISTENT | flags::PRIMARY_IND;
        sb.uuids.current = 0xAAAA_BBBB_CCCC_DDDE;
        sb.uuids.history = [6, 8];
        sb.al_tr_number = 77;
        sb
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let buf = sb.encode();
        assert_eq!(&buf[0..8], b"RDBMETA1");
        assert_eq!(Superblock::decode(&buf).unwrap(), sb);
        // Field positions of the documented table.
        assert_eq!(get_u64(&buf, 24), sb.layout.data_size_bytes);
        assert_eq!(get_u64(&buf, 88), 0xAAAA_BBBB_CCCC_DDDE);
        assert_eq!(get_u64(&buf, 128), 77);
        assert_eq!(get_u32(&buf, 80), 1237);
        assert_eq!(
            get_u32(&buf, 16),
            flags::CONSISTENT | flags::PRIMARY_IND | flags::AL_CLEAN
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let buf = sample().encode();
        for offset in 0..4096 {
            let mut bad = buf;
            bad[offset] ^= 0x40;
            let err = Superblock::decode(&bad).unwrap_err();
            match offset {
                0..=7 => assert!(matches!(err, MetaError::NotFound { .. })),
                8..=11 => assert!(matches!(err, MetaError::UnsupportedVersion { .. })),
                _ => assert!(
                    matches!(err, MetaError::BadChecksum { .. }),
                    "offset {offset}: {err}"
                ),
            }
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            Superblock::decode(&[0u8; 4096]),
            Err(MetaError::NotFound { .. })
        ));
        assert!(matches!(
            Superblock::decode(b"RDB"),
            Err(MetaError::NotFound { .. })
        ));
        let buf = sample().encode();
        assert!(matches!(
            Superblock::decode(&buf[..100]),
            Err(MetaError::Corrupt { .. })
        ));
        // Consistently checksummed but inconsistent offsets.
        let mut sb = sample();
        sb.layout.al_offset_bytes = sb.layout.bitmap_offset_bytes;
        let err = Superblock::decode(&sb.encode()).unwrap_err();
        assert!(matches!(
            err,
            MetaError::Corrupt {
                reason: "meta-data regions overlap",
                ..
            }
        ));
        let mut sb = sample();
        sb.layout.bitmap_size_bytes = 0;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(MetaError::Corrupt { .. })
        ));
        let mut sb = sample();
        sb.flags |= 1 << 20;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(MetaError::Corrupt { .. })
        ));
        let mut sb = sample();
        sb.layout.superblock_offset_bytes = u64::MAX - 4095;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(MetaError::Corrupt { .. })
        ));
        let msg = MetaError::BadChecksum {
            what: "superblock",
            place: Place::at(std::path::Path::new("/x"), 4096),
            expected: 1,
            found: 2,
        }
        .to_string();
        assert_eq!(
            msg,
            "meta-data superblock checksum mismatch on /x at offset 4096: expected 0x00000001, found 0x00000002"
        );
    }

    #[test]
    fn json() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["uuids"]["current"], "0xAAAABBBBCCCCDDDE");
        assert_eq!(json["device_uuid"], "0x123456789ABCDEF0");
        assert_eq!(
            json["flags"],
            serde_json::json!(["consistent", "primary_ind", "al_clean"])
        );
        assert_eq!(json["meta_kind"], "internal");
    }
}
