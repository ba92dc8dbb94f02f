//! The out-of-sync bitmap: 1 bit per 4 KiB block of data (32 KiB of memory per GiB).
//!
//! A set bit means "this block may differ from the peer". Bits are set for writes the
//! peer has not acknowledged (disconnected, or in flight at a crash via the activity
//! log) and cleared when resync or acknowledged replication proves the block equal.
//!
//! On disk, bit `i` is bit `i % 8` (least significant first) of byte `i / 8` of the
//! bitmap region; bits past the end of the data are zero. Changes mark the 4 KiB pages
//! of the on-disk bitmap they touch dirty; [`Bitmap::flush_dirty`] writes only those.

use bitvec::prelude::*;

use super::error::MetaError;
use super::file::MetaData;
use super::layout::{bitmap_bits, AL_EXTENT_SIZE_BYTES, BLOCK_SIZE_BYTES};

/// Bytes per on-disk bitmap page.
pub const PAGE_SIZE_BYTES: u64 = 4096;
/// Most runs [`DirtyPages::write_with`] makes durable one by one (each costs a
/// device cache flush) before one fdatasync of the whole file is cheaper.
const MAX_DURABLE_RUNS: usize = 4;
/// Bits (blocks) per on-disk bitmap page.
pub const BITS_PER_PAGE: u64 = PAGE_SIZE_BYTES * 8;
/// u64 words per page.
const WORDS_PER_PAGE: usize = (PAGE_SIZE_BYTES / 8) as usize;

/// The in-memory bitmap with a set-bit counter and dirty-page tracking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    data_size_bytes: u64,
    bits: BitVec<u64, Lsb0>,
    set_count: u64,
    dirty_pages: BitVec<u64, Lsb0>,
    /// Some dirty page holds a bit cleared since it was last taken: writing it
    /// durably must wait for a flush of the data that cleared it.
    cleared_dirty: bool,
}

impl Bitmap {
    /// An all-clear bitmap for `data_size_bytes` of data.
    pub fn new(data_size_bytes: u64) -> Bitmap {
        let bit_count = bitmap_bits(data_size_bytes) as usize;
        let page_count = (bit_count as u64).div_ceil(BITS_PER_PAGE) as usize;
        Bitmap {
            data_size_bytes,
            bits: BitVec::repeat(false, bit_count),
            set_count: 0,
            dirty_pages: BitVec::repeat(false, page_count),
            cleared_dirty: false,
        }
    }

    /// Size of the data the bitmap covers.
    pub fn data_size_bytes(&self) -> u64 {
        self.data_size_bytes
    }

    /// Number of bits (4 KiB blocks).
    pub fn block_count(&self) -> u64 {
        self.bits.len() as u64
    }

    /// Number of 4 KiB pages of the on-disk bitmap that hold bits.
    pub fn page_count(&self) -> u64 {
        self.dirty_pages.len() as u64
    }

    /// Number of pages changed since the last load/flush.
    pub fn dirty_page_count(&self) -> u64 {
        self.dirty_pages.count_ones() as u64
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<u64, MetaError> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.data_size_bytes => Ok(end),
            _ => Err(MetaError::OutOfRange {
                offset_bytes,
                len_bytes,
                size_bytes: self.data_size_bytes,
            }),
        }
    }

    fn mark_dirty(&mut self, first_block: usize, end_block: usize) {
        if first_block >= end_block {
            return;
        }
        let first_page = first_block / BITS_PER_PAGE as usize;
        let last_page = (end_block - 1) / BITS_PER_PAGE as usize;
        self.dirty_pages[first_page..=last_page].fill(true);
    }

    /// Sets the bits of every block `[offset, offset+len)` touches, even partially.
    /// Returns the number of bits that changed.
    pub fn set_range(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<u64, MetaError> {
        let end_bytes = self.check_range(offset_bytes, len_bytes)?;
        let first = (offset_bytes / BLOCK_SIZE_BYTES) as usize;
        let end = end_bytes.div_ceil(BLOCK_SIZE_BYTES) as usize;
        Ok(self.fill(first, end, true))
    }

    /// Clears the bits of the blocks `[offset, offset+len)` covers entirely (the final
    /// partial block of the data counts as covered when the range reaches the end).
    /// Returns the number of bits that changed.
    pub fn clear_range(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<u64, MetaError> {
        let end_bytes = self.check_range(offset_bytes, len_bytes)?;
        let first = offset_bytes.div_ceil(BLOCK_SIZE_BYTES) as usize;
        let end = if end_bytes == self.data_size_bytes {
            self.bits.len()
        } else {
            (end_bytes / BLOCK_SIZE_BYTES) as usize
        };
        Ok(self.fill(first, end, false))
    }

    fn fill(&mut self, first: usize, end: usize, value: bool) -> u64 {
        if first >= end {
            return 0;
        }
        let range = &mut self.bits[first..end];
        let before = range.count_ones() as u64;
        range.fill(value);
        let len = (end - first) as u64;
        let changed = if value {
            self.set_count += len - before;
            len - before
        } else {
            self.set_count -= before;
            before
        };
        if changed > 0 {
            self.mark_dirty(first, end);
            self.cleared_dirty |= !value;
        }
        // Full recount only for small bitmaps: it is O(size).
        debug_assert!(self.bits.len() > 1 << 20 || self.set_count == self.bits.count_ones() as u64);
        changed
    }

    /// Sets the bits of whole activity-log extents (after a Primary crash, every hot
    /// extent is out of sync). Extents past the end are clipped. Returns bits changed.
    pub fn set_extents(&mut self, extents: &[u32]) -> u64 {
        let mut changed = 0;
        for &extent in extents {
            let offset_bytes = u64::from(extent) * AL_EXTENT_SIZE_BYTES;
            if offset_bytes >= self.data_size_bytes {
                continue;
            }
            let len_bytes = AL_EXTENT_SIZE_BYTES.min(self.data_size_bytes - offset_bytes);
            let first = (offset_bytes / BLOCK_SIZE_BYTES) as usize;
            let end = (offset_bytes + len_bytes).div_ceil(BLOCK_SIZE_BYTES) as usize;
            changed += self.fill(first, end, true);
        }
        changed
    }

    /// Whether block `block` is out of sync (false past the end).
    pub fn is_set(&self, block: u64) -> bool {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.bits.get(i).map(|bit| *bit))
            .unwrap_or(false)
    }

    /// Number of set bits (kept by a counter, O(1)).
    pub fn count_set(&self) -> u64 {
        self.set_count
    }

    /// Bytes out of sync (set bits x 4 KiB, the final partial block counted partially).
    pub fn out_of_sync_bytes(&self) -> u64 {
        let mut bytes = self.set_count * BLOCK_SIZE_BYTES;
        let tail_bytes = self.data_size_bytes % BLOCK_SIZE_BYTES;
        if tail_bytes != 0 && self.bits.last().is_some_and(|bit| *bit) {
            bytes -= BLOCK_SIZE_BYTES - tail_bytes;
        }
        bytes
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        let len = self.bits.len();
        self.fill(0, len, true);
        self.dirty_pages.fill(true);
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        let len = self.bits.len();
        self.fill(0, len, false);
        self.dirty_pages.fill(true);
        self.cleared_dirty = true;
    }

    /// Runs of set blocks at or after `from_offset_bytes`, as `(offset_bytes,
    /// len_bytes)` clipped to the data size. A run containing `from_offset_bytes` starts
    /// at the start of its block.
    pub fn runs(&self, from_offset_bytes: u64) -> Runs<'_> {
        let start = (from_offset_bytes / BLOCK_SIZE_BYTES).min(self.bits.len() as u64);
        Runs {
            bitmap: self,
            next_block: start as usize,
        }
    }

    /// Loads the bitmap of `md` from disk (all pages clean afterwards). Bits past the
    /// end of the data are ignored.
    pub fn load(md: &MetaData) -> Result<Bitmap, MetaError> {
        let mut bitmap = Bitmap::new(md.layout.data_size_bytes);
        let page_count = bitmap.dirty_pages.len();
        let read_bytes = page_count as u64 * PAGE_SIZE_BYTES;
        assert!(read_bytes <= md.layout.bitmap_size_bytes);
        const CHUNK_PAGES: usize = 256; // 1 MiB reads
        let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE_BYTES as usize];
        let word_count = bitmap.bits.as_raw_slice().len();
        let mut page = 0usize;
        while page < page_count {
            let pages = CHUNK_PAGES.min(page_count - page);
            let chunk = &mut buf[..pages * PAGE_SIZE_BYTES as usize];
            md.read_region(
                chunk,
                md.layout.bitmap_offset_bytes + page as u64 * PAGE_SIZE_BYTES,
            )?;
            let words = bitmap.bits.as_raw_mut_slice();
            let first_word = page * WORDS_PER_PAGE;
            for (i, bytes) in chunk.chunks_exact(8).enumerate() {
                let word_index = first_word + i;
                if word_index >= word_count {
                    break;
                }
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                words[word_index] = u64::from_le_bytes(word);
            }
            page += pages;
        }
        // Zero the bits of the last word past the end, then count.
        let len = bitmap.bits.len();
        let capacity = word_count * 64;
        if capacity > len {
            let keep = len % 64;
            if let Some(last) = bitmap.bits.as_raw_mut_slice().last_mut() {
                *last &= (1u64 << keep) - 1;
            }
        }
        bitmap.set_count = bitmap.bits.count_ones() as u64;
        Ok(bitmap)
    }

    /// Encodes page `page` of the on-disk bitmap.
    fn encode_page(&self, page: usize, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE_BYTES as usize);
        out.fill(0);
        let words = self.bits.as_raw_slice();
        let first_word = page * WORDS_PER_PAGE;
        let last_word = (first_word + WORDS_PER_PAGE).min(words.len());
        for (i, word) in words[first_word..last_word].iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
    }

    /// Writes the dirty pages to `md`'s bitmap (contiguous dirty pages in one write),
    /// makes them durable, and marks them clean. Returns the number of pages written.
    pub fn flush_dirty(&mut self, md: &MetaData) -> Result<u64, MetaError> {
        let pages = self.take_dirty_pages(md)?;
        match pages.write(md) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.restore_dirty_pages(&pages);
                Err(e)
            }
        }
    }

    /// The bitmap as little-endian-bit words: bit `i` of word `j` is block `64*j + i`.
    pub fn words(&self) -> &[u64] {
        self.bits.as_raw_slice()
    }

    /// Sets every bit set in `words` (bit `i` of `words[j]` is block
    /// `offset_bits + 64*j + i`; `offset_bits` is a multiple of 64). Bits past the end
    /// of the data are ignored. Returns the number of bits that changed.
    pub fn or_words(&mut self, offset_bits: u64, words: &[u64]) -> Result<u64, MetaError> {
        if offset_bits % 64 != 0 {
            return Err(MetaError::InvalidArgument(format!(
                "bitmap chunk at bit {offset_bits} is not word aligned"
            )));
        }
        let first_word = (offset_bits / 64) as usize;
        let raw_len = self.bits.as_raw_slice().len();
        if first_word > raw_len || words.len() > raw_len - first_word {
            return Err(MetaError::OutOfRange {
                offset_bytes: offset_bits * BLOCK_SIZE_BYTES,
                len_bytes: words.len() as u64 * 64 * BLOCK_SIZE_BYTES,
                size_bytes: self.data_size_bytes,
            });
        }
        let bit_len = self.bits.len();
        let mut changed = 0u64;
        for (i, &w) in words.iter().enumerate() {
            let index = first_word + i;
            let mut w = w;
            if (index + 1) * 64 > bit_len {
                let keep = bit_len.saturating_sub(index * 64);
                w &= if keep >= 64 {
                    u64::MAX
                } else {
                    (1u64 << keep) - 1
                };
            }
            let raw = self.bits.as_raw_mut_slice();
            let added = w & !raw[index];
            if added != 0 {
                raw[index] |= added;
                changed += u64::from(added.count_ones());
                let block = index * 64;
                self.mark_dirty(block, block + 64);
            }
        }
        self.set_count += changed;
        Ok(changed)
    }

    /// Encodes the dirty pages (contiguous ones in runs of at most 1 MiB) and marks
    /// them clean, so they can be written without holding the bitmap: a caller that
    /// fails to write them calls [`Bitmap::restore_dirty_pages`].
    pub fn take_dirty_pages(&mut self, md: &MetaData) -> Result<DirtyPages, MetaError> {
        if md.layout.data_size_bytes != self.data_size_bytes {
            return Err(MetaError::InvalidArgument(format!(
                "bitmap covers {} bytes, meta-data {} bytes",
                self.data_size_bytes, md.layout.data_size_bytes
            )));
        }
        const MAX_RUN_PAGES: usize = 256;
        let mut runs = Vec::new();
        let mut page = 0usize;
        while let Some(first) = self.dirty_pages[page..].first_one().map(|i| i + page) {
            let run_end = self.dirty_pages[first..]
                .first_zero()
                .map_or(self.dirty_pages.len(), |i| i + first)
                .min(first + MAX_RUN_PAGES);
            let pages = run_end - first;
            let mut buf = vec![0u8; pages * PAGE_SIZE_BYTES as usize];
            for i in 0..pages {
                let start = i * PAGE_SIZE_BYTES as usize;
                self.encode_page(first + i, &mut buf[start..start + PAGE_SIZE_BYTES as usize]);
            }
            runs.push((first as u64, buf));
            page = run_end;
        }
        self.dirty_pages.fill(false);
        let cleared = std::mem::take(&mut self.cleared_dirty);
        Ok(DirtyPages { runs, cleared })
    }

    /// Marks the pages of `pages` dirty again (their write failed).
    pub fn restore_dirty_pages(&mut self, pages: &DirtyPages) {
        for (first, buf) in &pages.runs {
            let count = buf.len() / PAGE_SIZE_BYTES as usize;
            let first = *first as usize;
            self.dirty_pages[first..first + count].fill(true);
        }
        self.cleared_dirty |= pages.cleared;
    }
}

/// Encoded bitmap pages taken from a [`Bitmap`], to be written to the meta-data.
#[derive(Debug, Default)]
pub struct DirtyPages {
    /// (first page index, encoded pages).
    runs: Vec<(u64, Vec<u8>)>,
    /// Some page holds a bit cleared since the pages were last taken.
    cleared: bool,
}

impl DirtyPages {
    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.runs
            .iter()
            .map(|(_, b)| b.len() as u64 / PAGE_SIZE_BYTES)
            .sum()
    }

    /// Whether some page holds a cleared bit: such pages may become durable only
    /// after the data whose writes cleared the bits (flush the data first; a copy
    /// written without a flush could reach the disk before that data).
    pub fn holds_cleared_bits(&self) -> bool {
        self.cleared
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Writes the pages to `md`'s bitmap area durably; returns the page count.
    pub fn write(&self, md: &MetaData) -> Result<u64, MetaError> {
        self.write_with(md, true)
    }

    /// Writes the pages to `md`'s bitmap area, durably when `sync`; returns the page
    /// count. Unsynced pages survive a crash of the process (they are in the kernel's
    /// page cache), not a power loss.
    ///
    /// A durable write of a few runs makes each run durable by itself
    /// ([`MetaData::write_region_durable`]), so that it does not write back the data
    /// pages of an internal meta-data's backing file; more runs are written plainly
    /// and then fdatasynced once. Neither is a data barrier: pages holding cleared
    /// bits ([`DirtyPages::holds_cleared_bits`]) need the data flushed first.
    pub fn write_with(&self, md: &MetaData, sync: bool) -> Result<u64, MetaError> {
        if self.runs.is_empty() {
            return Ok(0);
        }
        let file = md.open_rw()?;
        let each_durable = sync && self.runs.len() <= MAX_DURABLE_RUNS;
        for (first, buf) in &self.runs {
            let offset_bytes = md.layout.bitmap_offset_bytes + first * PAGE_SIZE_BYTES;
            if each_durable {
                md.write_region_durable(&file, buf, offset_bytes)?;
            } else {
                md.write_region(&file, buf, offset_bytes)?;
            }
        }
        if sync && !each_durable {
            md.sync(&file)?;
        }
        Ok(self.page_count())
    }
}

/// Iterator over runs of set bits, see [`Bitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    bitmap: &'a Bitmap,
    next_block: usize,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let bits = &self.bitmap.bits;
        let first = self.next_block + bits[self.next_block..].first_one()?;
        let end = bits[first..].first_zero().map_or(bits.len(), |i| first + i);
        self.next_block = end;
        let offset_bytes = first as u64 * BLOCK_SIZE_BYTES;
        let end_bytes = (end as u64 * BLOCK_SIZE_BYTES).min(self.bitmap.data_size_bytes);
        Some((offset_bytes, end_bytes - offset_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 4096;

    #[test]
    fn set_and_clear_partial_blocks() {
        let mut bm = Bitmap::new(1 << 20);
        assert_eq!(bm.block_count(), 256);
        // Touches blocks 0 and 1 partially.
        assert_eq!(bm.set_range(100, K).unwrap(), 2);
        assert!(bm.is_set(0) && bm.is_set(1) && !bm.is_set(2));
        // Does not fully cover any block.
        assert_eq!(bm.clear_range(100, K).unwrap(), 0);
        // Covers block 1 entirely, block 0 only partially.
        assert_eq!(bm.clear_range(100, 2 * K).unwrap(), 1);
        assert!(bm.is_set(0) && !bm.is_set(1));
        assert_eq!(bm.count_set(), 1);
        assert_eq!(bm.set_range(0, 0).unwrap(), 0);
        assert!(matches!(
            bm.set_range((1 << 20) - 1, 2),
            Err(MetaError::OutOfRange { .. })
        ));
        assert!(matches!(
            bm.set_range(u64::MAX, 2),
            Err(MetaError::OutOfRange { .. })
        ));
        assert!(!bm.is_set(256));
        assert!(!bm.is_set(u64::MAX));
    }

    #[test]
    fn counter_and_runs() {
        let mut bm = Bitmap::new(100 * K + 512); // partial final block
        assert_eq!(bm.block_count(), 101);
        bm.set_range(0, 3 * K).unwrap();
        bm.set_range(10 * K, K).unwrap();
        bm.set_range(100 * K, 512).unwrap();
        assert_eq!(bm.count_set(), 5);
        assert_eq!(bm.out_of_sync_bytes(), 4 * K + 512);
        let runs: Vec<_> = bm.runs(0).collect();
        assert_eq!(runs, vec![(0, 3 * K), (10 * K, K), (100 * K, 512)]);
        let runs: Vec<_> = bm.runs(K + 7).collect();
        assert_eq!(runs, vec![(K, 2 * K), (10 * K, K), (100 * K, 512)]);
        assert_eq!(bm.runs(101 * K).count(), 0);
        // Clearing to the end clears the partial final block.
        assert_eq!(bm.clear_range(99 * K, K + 512).unwrap(), 1);
        bm.set_all();
        assert_eq!(bm.count_set(), 101);
        assert_eq!(bm.out_of_sync_bytes(), 100 * K + 512);
        assert_eq!(bm.runs(0).collect::<Vec<_>>(), vec![(0, 100 * K + 512)]);
        bm.clear_all();
        assert_eq!(bm.count_set(), 0);
        assert_eq!(bm.runs(0).count(), 0);
    }

    #[test]
    fn dirty_pages() {
        let mut bm = Bitmap::new(1 << 30); // 8 pages
        assert_eq!(bm.page_count(), 8);
        assert_eq!(bm.dirty_page_count(), 0);
        bm.set_range(0, K).unwrap();
        assert_eq!(bm.dirty_page_count(), 1);
        // Block 32768 is the first of page 1; a range across the page boundary.
        bm.set_range(32767 * K, 2 * K).unwrap();
        assert_eq!(bm.dirty_page_count(), 2);
        bm.set_range(7 * 32768 * K, K).unwrap();
        assert_eq!(bm.dirty_page_count(), 3);
        bm.set_all();
        assert_eq!(bm.dirty_page_count(), 8);
    }

    #[test]
    fn extents() {
        let mut bm = Bitmap::new(10 << 20); // extents 0, 1, and half of 2
        assert_eq!(bm.set_extents(&[1, 2, 99]), 1024 + 512);
        assert_eq!(bm.runs(0).collect::<Vec<_>>(), vec![(4 << 20, 6 << 20)]);
    }
}
