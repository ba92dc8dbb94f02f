//! The activity log (AL): the set of "hot" 4 MiB extents that may have writes in
//! flight, bounded by `al-extents` (default 1237).
//!
//! Before the first write to a cold extent, the extent enters the log: the in-memory
//! [`ActivityLog`] returns an [`AlTransaction`] holding a full snapshot of the hot set,
//! which the caller writes durably with [`write_transaction`] (slot `tr_number % 8` of
//! the 32 KiB ring) before issuing the data write. Cold extents without writes in
//! flight are evicted least-recently-used first when the log is full.
//!
//! After a Primary crash, [`replay`] reads the 8 slots, drops torn or foreign ones
//! (checksum, magic, device UUID) and returns the hot set of the newest valid
//! transaction: those extents are marked out of sync. A torn newest write falls back to
//! the previous transaction, which is correct since the data writes that needed the
//! newest transaction had not been issued yet.
//!
//! Transaction layout (4096 bytes, little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RDBALTR1` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | CRC32 of the block with this field zeroed |
//! | 16 | 8 | transaction number |
//! | 24 | 8 | device UUID (context: the superblock's) |
//! | 32 | 4 | al-extents (capacity when written) |
//! | 36 | 4 | number of hot extents N |
//! | 40 | 1 | entry width W (3 or 4 bytes) |
//! | 41 | 7 | reserved, zero |
//! | 48 | N x W | hot extent numbers, strictly ascending, little-endian |
//! | 48+N*W | .. | zero |

use std::collections::HashMap;

use serde::Serialize;

use super::error::{MetaError, Place};
use super::file::MetaData;
use super::layout::{AL_EXTENT_SIZE_BYTES, AL_RING_SLOTS, AL_TRANSACTION_SIZE_BYTES};
use super::superblock::{block_crc, checked_block};

/// Magic at offset 0 of a transaction.
pub const AL_MAGIC: [u8; 8] = *b"RDBALTR1";
/// Transaction format version.
pub const AL_VERSION: u32 = 1;
/// Smallest accepted al-extents (DRBD's minimum).
pub const AL_MIN_EXTENTS: u32 = 7;
/// Default al-extents (DRBD's default).
pub const AL_DEFAULT_EXTENTS: u32 = 1237;
/// Largest transaction number accepted on disk (2^63 - 1): no log reaches it (a
/// million transactions a second for 292,000 years), so a larger one is corruption, and
/// numbering on after it can never overflow.
pub const AL_MAX_TR_NUMBER: u64 = (1 << 63) - 1;
/// Transaction header size.
const HEADER_BYTES: usize = 48;
const CRC_OFFSET: usize = 12;
/// Extent numbers below this fit 3-byte entries.
const NARROW_LIMIT: u64 = 1 << 24;
/// Most extents a transaction holds with 3-byte entries (data up to 64 TiB).
pub const AL_MAX_EXTENTS_NARROW: u32 = ((4096 - HEADER_BYTES) / 3) as u32;
/// Most extents a transaction holds with 4-byte entries.
pub const AL_MAX_EXTENTS_WIDE: u32 = ((4096 - HEADER_BYTES) / 4) as u32;

const WHAT: &str = "activity log transaction";

/// Number of AL extents covering `data_size_bytes`.
pub fn extent_count(data_size_bytes: u64) -> u64 {
    data_size_bytes.div_ceil(AL_EXTENT_SIZE_BYTES)
}

/// The largest al-extents whose full snapshot fits a 4 KiB transaction for this data
/// size (1349 up to 64 TiB of data, 1012 beyond).
pub fn max_al_extents(data_size_bytes: u64) -> u32 {
    if extent_count(data_size_bytes) <= NARROW_LIMIT {
        AL_MAX_EXTENTS_NARROW
    } else {
        AL_MAX_EXTENTS_WIDE
    }
}

/// One on-disk AL transaction: a full snapshot of the hot set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlTransaction {
    /// Monotonic transaction number; the ring slot is `tr_number % 8`.
    pub tr_number: u64,
    /// The superblock's device UUID (transactions of other meta-data are ignored).
    pub device_uuid: u64,
    /// Capacity of the log when written.
    pub al_extents: u32,
    /// Hot extent numbers, strictly ascending.
    pub extents: Vec<u32>,
}

fn corrupt(reason: &'static str) -> MetaError {
    MetaError::Corrupt {
        what: WHAT,
        place: Place::default(),
        reason,
    }
}

/// Encodes a transaction into its 4096-byte block.
pub fn encode_transaction(tr: &AlTransaction) -> Result<[u8; 4096], MetaError> {
    if tr.extents.windows(2).any(|w| w[0] >= w[1]) {
        return Err(MetaError::InvalidArgument(
            "AL transaction extents must be strictly ascending".to_string(),
        ));
    }
    if tr.tr_number > AL_MAX_TR_NUMBER {
        return Err(MetaError::InvalidArgument(format!(
            "AL transaction number {} above {AL_MAX_TR_NUMBER}",
            tr.tr_number
        )));
    }
    if tr.extents.len() > tr.al_extents as usize {
        return Err(MetaError::InvalidArgument(format!(
            "AL transaction holds {} extents, more than al-extents {}",
            tr.extents.len(),
            tr.al_extents
        )));
    }
    let narrow = tr
        .extents
        .last()
        .is_none_or(|&e| u64::from(e) < NARROW_LIMIT);
    let width: usize = if narrow { 3 } else { 4 };
    if HEADER_BYTES + tr.extents.len() * width > 4096 {
        return Err(MetaError::InvalidArgument(format!(
            "{} extents of {width} bytes do not fit a 4 KiB AL transaction",
            tr.extents.len()
        )));
    }
    let mut buf = [0u8; 4096];
    buf[0..8].copy_from_slice(&AL_MAGIC);
    buf[8..12].copy_from_slice(&AL_VERSION.to_le_bytes());
    buf[16..24].copy_from_slice(&tr.tr_number.to_le_bytes());
    buf[24..32].copy_from_slice(&tr.device_uuid.to_le_bytes());
    buf[32..36].copy_from_slice(&tr.al_extents.to_le_bytes());
    // The count fits u32: it is at most al_extents (checked above).
    buf[36..40].copy_from_slice(&(tr.extents.len() as u32).to_le_bytes());
    buf[40] = width as u8;
    for (i, extent) in tr.extents.iter().enumerate() {
        let at = HEADER_BYTES + i * width;
        buf[at..at + width].copy_from_slice(&extent.to_le_bytes()[..width]);
    }
    let crc = block_crc(&buf, CRC_OFFSET);
    buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Decodes a transaction block; never panics on arbitrary input.
pub fn decode_transaction(buf: &[u8]) -> Result<AlTransaction, MetaError> {
    if buf.len() < 8 || buf[0..8] != AL_MAGIC {
        return Err(corrupt("no magic (slot never written)"));
    }
    let bytes = checked_block(buf, WHAT, AL_VERSION, CRC_OFFSET)?;
    if u64_at(&bytes, 16) > AL_MAX_TR_NUMBER {
        return Err(corrupt("transaction number implausibly large (>= 2^63)"));
    }
    let al_extents = u32_at(&bytes, 32);
    let count = u32_at(&bytes, 36) as usize;
    let width = bytes[40] as usize;
    if width != 3 && width != 4 {
        return Err(corrupt("entry width is not 3 or 4"));
    }
    if bytes[41..48].iter().any(|&b| b != 0) {
        return Err(corrupt("reserved header bytes are not zero"));
    }
    if count > al_extents as usize {
        return Err(corrupt("more hot extents than al-extents"));
    }
    let end = count
        .checked_mul(width)
        .and_then(|n| n.checked_add(HEADER_BYTES))
        .filter(|&end| end <= 4096)
        .ok_or(corrupt("extent list does not fit the block"))?;
    if bytes[end..].iter().any(|&b| b != 0) {
        return Err(corrupt("bytes after the extent list are not zero"));
    }
    let mut extents = Vec::with_capacity(count);
    for entry in bytes[HEADER_BYTES..end].chunks_exact(width) {
        let mut word = [0u8; 4];
        word[..width].copy_from_slice(entry);
        let extent = u32::from_le_bytes(word);
        if extents.last().is_some_and(|&last| last >= extent) {
            return Err(corrupt("extents not strictly ascending"));
        }
        extents.push(extent);
    }
    let narrow = extents.last().is_none_or(|&e| u64::from(e) < NARROW_LIMIT);
    if narrow != (width == 3) {
        return Err(corrupt("entry width does not match the largest extent"));
    }
    Ok(AlTransaction {
        tr_number: u64_at(&bytes, 16),
        device_uuid: u64_at(&bytes, 24),
        al_extents,
        extents,
    })
}

/// Writes `tr` durably into ring slot `tr.tr_number % 8` of `md`'s activity log.
pub fn write_transaction(md: &MetaData, tr: &AlTransaction) -> Result<(), MetaError> {
    let block = encode_transaction(tr)?;
    let slot = tr.tr_number % AL_RING_SLOTS;
    let file = md.open_rw()?;
    // Durable before the writes it covers are issued, without writing back the data
    // of an internal meta-data's backing file. A transaction that evicts extents
    // needs their data durable first: the caller flushes it (`AlGate::begin`).
    md.write_region_durable(
        &file,
        &block,
        md.layout.al_offset_bytes + slot * AL_TRANSACTION_SIZE_BYTES,
    )
}

/// Reads the ring and returns the newest valid transaction of this meta-data (valid:
/// magic, version, checksum, consistent, device UUID equal to the superblock's).
pub fn replay_newest(md: &MetaData) -> Result<Option<AlTransaction>, MetaError> {
    let mut ring = vec![0u8; md.layout.al_size_bytes as usize];
    md.read_region(&mut ring, md.layout.al_offset_bytes)?;
    let newest = ring
        .chunks_exact(AL_TRANSACTION_SIZE_BYTES as usize)
        .enumerate()
        .filter_map(|(slot, block)| {
            let tr = decode_transaction(block).ok()?;
            let in_its_slot = tr.tr_number % AL_RING_SLOTS == slot as u64;
            (in_its_slot && tr.device_uuid == md.superblock.device_uuid).then_some(tr)
        })
        .max_by_key(|tr| tr.tr_number);
    Ok(newest)
}

/// The hot extents of the newest valid transaction (empty when none is valid).
pub fn replay(md: &MetaData) -> Result<Vec<u32>, MetaError> {
    Ok(replay_newest(md)?.map(|tr| tr.extents).unwrap_or_default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HotExtent {
    in_flight: u32,
    last_used: u64,
}

/// The in-memory activity log.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    capacity: u32,
    extent_limit: u64,
    device_uuid: u64,
    hot: HashMap<u32, HotExtent>,
    /// Hot extents with writes in flight.
    in_use: u32,
    tick: u64,
    next_tr_number: u64,
}

impl ActivityLog {
    /// An empty log of `al_extents` extents for `data_size_bytes` of data; the first
    /// transaction is number 1.
    pub fn new(al_extents: u32, data_size_bytes: u64) -> Result<ActivityLog, MetaError> {
        let max = max_al_extents(data_size_bytes);
        if !(AL_MIN_EXTENTS..=max).contains(&al_extents) {
            return Err(MetaError::InvalidArgument(format!(
                "al-extents {al_extents} out of range {AL_MIN_EXTENTS}..={max}"
            )));
        }
        Ok(ActivityLog {
            capacity: al_extents,
            extent_limit: extent_count(data_size_bytes),
            device_uuid: 0,
            hot: HashMap::with_capacity(al_extents as usize),
            in_use: 0,
            tick: 0,
            next_tr_number: 1,
        })
    }

    /// The log of `md` after replay: hot set of the newest valid transaction, numbering
    /// continuing after both it and the superblock's `al_tr_number`.
    pub fn from_meta(md: &MetaData) -> Result<ActivityLog, MetaError> {
        let sb = &md.superblock;
        let mut log = ActivityLog::new(sb.al_extents, md.layout.data_size_bytes)?;
        log.device_uuid = sb.device_uuid;
        let newest = replay_newest(md)?;
        let last_tr_number = newest
            .as_ref()
            .map_or(0, |tr| tr.tr_number)
            .max(sb.al_tr_number);
        // Both numbers are at most AL_MAX_TR_NUMBER (checked by the decoders, found by
        // fuzzing: an unchecked u64::MAX overflowed here); refuse anything else.
        if last_tr_number > AL_MAX_TR_NUMBER {
            return Err(MetaError::Corrupt {
                what: WHAT,
                place: Place::at(&md.md_path, md.layout.al_offset_bytes),
                reason: "transaction number implausibly large (>= 2^63)",
            });
        }
        log.next_tr_number = last_tr_number + 1;
        if let Some(tr) = newest {
            for extent in tr.extents.into_iter().take(sb.al_extents as usize) {
                if u64::from(extent) < log.extent_limit {
                    log.tick += 1;
                    log.hot.insert(
                        extent,
                        HotExtent {
                            in_flight: 0,
                            last_used: log.tick,
                        },
                    );
                }
            }
        }
        Ok(log)
    }

    /// Sets the device UUID written into transactions (the superblock's).
    pub fn set_device_uuid(&mut self, device_uuid: u64) {
        self.device_uuid = device_uuid;
    }

    /// Capacity (al-extents).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Number of hot extents.
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// Whether no extent is hot.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// Number of the last transaction produced (or replayed).
    pub fn last_tr_number(&self) -> u64 {
        self.next_tr_number - 1
    }

    /// Hot extents, ascending.
    pub fn hot_extents(&self) -> Vec<u32> {
        let mut extents: Vec<u32> = self.hot.keys().copied().collect();
        extents.sort_unstable();
        extents
    }

    /// Whether `extent` is hot.
    pub fn is_hot(&self, extent: u32) -> bool {
        self.hot.contains_key(&extent)
    }

    /// Whether a write to `extent` needs a transaction first (the extent is cold).
    pub fn needs_transaction(&self, extent: u32) -> bool {
        !self.is_hot(extent)
    }

    /// Writes in flight on `extent`.
    pub fn in_flight(&self, extent: u32) -> u32 {
        self.hot.get(&extent).map_or(0, |h| h.in_flight)
    }

    /// The extents `[offset, offset+len)` touches.
    pub fn extents_of(offset_bytes: u64, len_bytes: u64) -> std::ops::RangeInclusive<u32> {
        let first = offset_bytes / AL_EXTENT_SIZE_BYTES;
        let last = (offset_bytes + len_bytes.max(1) - 1) / AL_EXTENT_SIZE_BYTES;
        let clamp = |e: u64| u32::try_from(e).unwrap_or(u32::MAX);
        clamp(first)..=clamp(last)
    }

    fn transaction(&mut self) -> AlTransaction {
        let tr = AlTransaction {
            tr_number: self.next_tr_number,
            device_uuid: self.device_uuid,
            al_extents: self.capacity,
            extents: self.hot_extents(),
        };
        self.next_tr_number += 1;
        tr
    }

    /// Makes `extents` hot. Returns the transaction to write durably before the data
    /// writes when the hot set changed, None when all were already hot. Cold extents
    /// with no writes in flight are evicted least-recently-used first; if too few can
    /// be evicted nothing changes and [`MetaError::AlFull`] is returned (retry after
    /// some `end_io`). Call [`ActivityLog::begin_io`] for the writes right after.
    pub fn activate(&mut self, extents: &[u32]) -> Result<Option<AlTransaction>, MetaError> {
        if let Some(&bad) = extents.iter().find(|&&e| u64::from(e) >= self.extent_limit) {
            return Err(MetaError::InvalidArgument(format!(
                "extent {bad} is past the end of the data ({} extents)",
                self.extent_limit
            )));
        }
        let mut new: Vec<u32> = extents
            .iter()
            .copied()
            .filter(|e| !self.hot.contains_key(e))
            .collect();
        new.sort_unstable();
        new.dedup();
        if new.len() > self.capacity as usize {
            return Err(MetaError::InvalidArgument(format!(
                "{} extents requested at once, al-extents is {}",
                new.len(),
                self.capacity
            )));
        }
        let free = self.capacity as usize - self.hot.len();
        let evict_count = new.len().saturating_sub(free);
        let mut victims = Vec::new();
        if evict_count > 0 {
            let mut idle: Vec<(u64, u32)> = self
                .hot
                .iter()
                .filter(|(e, h)| h.in_flight == 0 && !extents.contains(e))
                .map(|(e, h)| (h.last_used, *e))
                .collect();
            if idle.len() < evict_count {
                return Err(MetaError::AlFull {
                    needed: new.len(),
                    capacity: self.capacity,
                });
            }
            idle.sort_unstable();
            victims.extend(idle[..evict_count].iter().map(|(_, e)| *e));
        }
        self.tick += 1;
        for extent in extents {
            if let Some(h) = self.hot.get_mut(extent) {
                h.last_used = self.tick;
            }
        }
        if new.is_empty() {
            return Ok(None);
        }
        for victim in victims {
            self.hot.remove(&victim);
        }
        for extent in new {
            self.hot.insert(
                extent,
                HotExtent {
                    in_flight: 0,
                    last_used: self.tick,
                },
            );
        }
        assert!(self.hot.len() <= self.capacity as usize);
        Ok(Some(self.transaction()))
    }

    /// A write to `extent` starts (the extent must be hot).
    pub fn begin_io(&mut self, extent: u32) -> Result<(), MetaError> {
        let h = self.hot.get_mut(&extent).ok_or_else(|| {
            MetaError::InvalidArgument(format!("begin_io on cold AL extent {extent}"))
        })?;
        if h.in_flight == 0 {
            self.in_use += 1;
        }
        h.in_flight += 1;
        Ok(())
    }

    /// Hot extents with writes in flight (DRBD's `act_log->used`).
    pub fn extents_in_use(&self) -> u32 {
        self.in_use
    }

    /// A write to `extent` completed.
    pub fn end_io(&mut self, extent: u32) -> Result<(), MetaError> {
        match self.hot.get_mut(&extent) {
            Some(h) if h.in_flight > 0 => {
                h.in_flight -= 1;
                if h.in_flight == 0 {
                    self.in_use -= 1;
                }
                Ok(())
            }
            _ => Err(MetaError::InvalidArgument(format!(
                "end_io on AL extent {extent} without a write in flight"
            ))),
        }
    }

    /// Drops every extent without writes in flight (idle, or before a clean shutdown).
    /// Returns the transaction to write when the hot set changed.
    pub fn retire_idle(&mut self) -> Option<AlTransaction> {
        let before = self.hot.len();
        self.hot.retain(|_, h| h.in_flight > 0);
        (self.hot.len() != before).then(|| self.transaction())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn transaction_round_trip() {
        let tr = AlTransaction {
            tr_number: 42,
            device_uuid: 0xDEAD_BEEF,
            al_extents: 1237,
            extents: (0..1237).map(|i| i * 3).collect(),
        };
        let block = encode_transaction(&tr).unwrap();
        assert_eq!(decode_transaction(&block).unwrap(), tr);
        assert_eq!(block[40], 3);
        // Wide entries.
        let wide = AlTransaction {
            extents: vec![1, 1 << 24, u32::MAX],
            al_extents: 1000,
            ..tr.clone()
        };
        let block = encode_transaction(&wide).unwrap();
        assert_eq!(block[40], 4);
        assert_eq!(decode_transaction(&block).unwrap(), wide);
        // Too many wide entries.
        let too_many = AlTransaction {
            extents: (0..1100).map(|i| i + (1 << 24)).collect(),
            al_extents: 1237,
            ..tr.clone()
        };
        assert!(encode_transaction(&too_many).is_err());
        // Every flipped byte is detected.
        let block = encode_transaction(&tr).unwrap();
        for offset in 0..4096 {
            let mut bad = block;
            bad[offset] ^= 1;
            assert!(decode_transaction(&bad).is_err(), "offset {offset}");
        }
        assert!(decode_transaction(&[0u8; 4096]).is_err());
        assert!(decode_transaction(&block[..1000]).is_err());
    }

    /// The fuzz target's property on mutated valid blocks: decode never panics and what
    /// it accepts re-encodes to the same bytes.
    #[test]
    fn mutated_blocks_decode_canonically() {
        let tr = AlTransaction {
            tr_number: 9,
            device_uuid: 77,
            al_extents: 20,
            extents: vec![1, 5, 9, 300],
        };
        let block = encode_transaction(&tr).unwrap();
        let mut accepted = 0;
        for round in 0..20_000u32 {
            let mut bad = block;
            let at = (round as usize * 7919) % 64;
            bad[at] = bad[at].wrapping_add((round % 255) as u8 + 1);
            if round % 3 == 0 {
                let crc = block_crc(&bad, CRC_OFFSET);
                bad[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(decoded) = decode_transaction(&bad) {
                accepted += 1;
                assert_eq!(encode_transaction(&decoded).unwrap(), bad);
            }
        }
        assert!(accepted > 0);
        // Width 4 with narrow extents is not canonical.
        let mut wide = block;
        wide[40] = 4;
        let crc = block_crc(&wide, CRC_OFFSET);
        wide[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_transaction(&wide).is_err());
    }

    #[test]
    fn lru_eviction_respects_in_flight() {
        let mut log = ActivityLog::new(7, 100 * GIB).unwrap();
        assert!(log.needs_transaction(5));
        let tr = log.activate(&[0, 1, 2]).unwrap().unwrap();
        assert_eq!(tr.tr_number, 1);
        assert_eq!(tr.extents, vec![0, 1, 2]);
        assert!(log.activate(&[1, 2]).unwrap().is_none());
        let tr = log.activate(&[3, 4, 5, 6]).unwrap().unwrap();
        assert_eq!(tr.tr_number, 2);
        assert_eq!(log.len(), 7);
        log.begin_io(0).unwrap();
        // Full: evicts the least recently used idle extent (1 or 2 were touched at
        // tick 2; 0 has a write in flight): 1 and 2 are older than 3..6.
        let tr = log.activate(&[10]).unwrap().unwrap();
        assert!(!tr.extents.contains(&1) || !tr.extents.contains(&2));
        assert!(tr.extents.contains(&0));
        assert_eq!(tr.extents.len(), 7);
        // Everything busy -> AlFull, nothing changed.
        for e in log.hot_extents() {
            if e != 0 {
                log.begin_io(e).unwrap();
            }
        }
        let before = log.hot_extents();
        assert!(matches!(log.activate(&[20]), Err(MetaError::AlFull { .. })));
        assert_eq!(log.hot_extents(), before);
        log.end_io(10).unwrap();
        let tr = log.activate(&[20]).unwrap().unwrap();
        assert!(!tr.extents.contains(&10) && tr.extents.contains(&20));
        assert!(log.end_io(20).is_err());
        assert!(log.begin_io(99).is_err());
        assert!(log.activate(&[u32::MAX]).is_err());
        assert!(log.activate(&(100..108).collect::<Vec<_>>()).is_err());
        // Retire idle extents: only those with writes in flight remain.
        let tr = log.retire_idle().unwrap();
        assert!(!tr.extents.contains(&20));
        assert_eq!(tr.extents.len(), 6);
        assert!(log.retire_idle().is_none());
    }

    #[test]
    fn limits() {
        assert_eq!(max_al_extents(64 << 40), AL_MAX_EXTENTS_NARROW);
        assert_eq!(max_al_extents((64 << 40) + 1), AL_MAX_EXTENTS_WIDE);
        assert!(ActivityLog::new(1237, 16 << 40).is_ok());
        assert!(ActivityLog::new(6, GIB).is_err());
        assert!(ActivityLog::new(1237, 100 << 40).is_err());
        assert_eq!(ActivityLog::extents_of(0, 4096), 0..=0);
        assert_eq!(ActivityLog::extents_of((4 << 20) - 1, 2), 0..=1);
    }
}
