//! Torn and corrupt meta-data: flipped bits in every structure, power cuts in the middle
//! of activity-log and superblock writes, and the refusal of the real `rdbadm up` when
//! recovery is impossible.
//!
//! A power cut is simulated by writing part of the new block over the old one: whole
//! 512-byte sectors (what a disk guarantees), and single bytes for the superblock (a
//! disk without sector atomicity). Bit flips go over every bit of the encoded fields
//! and a spread of the padding. The bitmap carries no checksum (as in DRBD): the last
//! test states what a flipped bit there does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure

mod common;

use std::path::Path;

use common::*;
use rdb::meta::al::{encode_transaction, write_transaction, AlTransaction};
use rdb::meta::recovery::{recover_al, SlotState};
use rdb::meta::{
    create_md, flags, read_md, write_superblock, ActivityLog, Bitmap, CreateOptions, MetaData,
    MetaError, MetaLocation,
};

/// Size of the sparse backing disks: 2047 extents of 4 MiB, room for big hot sets.
const DISK_BYTES: u64 = 8 << 30;
/// Hot extents per transaction: 600 entries of 3 bytes end at byte 1848, so a
/// transaction spans 4 of the block's 512-byte sectors and a power cut can tear it.
const HOT_PER_TR: u32 = 600;

/// Meta-data of a node that crashed as Primary: transactions 1..=`last` written (see
/// [`tr`]), AL not clean.
fn crashed_primary(disk: &Path, last: u64) -> MetaData {
    let opts = CreateOptions {
        force: true,
        al_extents: 1237,
    };
    let mut md = create_md(disk, &MetaLocation::Internal, &opts).unwrap();
    md.superblock.set_flag(flags::AL_CLEAN, false);
    md.superblock.set_flag(
        flags::CONSISTENT | flags::PRIMARY_IND | flags::CRASHED_PRIMARY,
        true,
    );
    write_superblock(&md).unwrap();
    for n in 1..=last {
        write_transaction(&md, &tr(&md, n)).unwrap();
    }
    md
}

/// Transaction `n`: hot extents `3i + n % 3` for i < 600 (distinct from n - 1's).
fn tr(md: &MetaData, n: u64) -> AlTransaction {
    AlTransaction {
        tr_number: n,
        device_uuid: md.superblock.device_uuid,
        al_extents: 1237,
        extents: hot_of(n),
    }
}

fn hot_of(n: u64) -> Vec<u32> {
    (0..HOT_PER_TR).map(|i| i * 3 + (n % 3) as u32).collect()
}

fn slot_offset(md: &MetaData, n: u64) -> u64 {
    md.layout.al_offset_bytes + (n % 8) * 4096
}

#[test]
fn every_superblock_bit_flip_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let md = crashed_primary(&disk, 3);
    let at = md.layout.superblock_offset_bytes;
    let good = read_bytes(&disk, at, 4096);
    let mut flips = 0;
    // Every bit of the 160 bytes of fields, then every 61st bit of the padding.
    let bits = (0..160 * 8).chain((160 * 8..4096 * 8).step_by(61));
    for bit in bits {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        write_bytes(&disk, at, &bad);
        let err = read_md(&disk, &MetaLocation::Internal)
            .expect_err(&format!("flipped bit {bit} accepted"));
        let msg = err.to_string();
        match bit / 8 {
            0..=7 => assert!(
                matches!(err, MetaError::NotFound { .. }),
                "bit {bit}: {msg}"
            ),
            8..=11 => assert!(
                matches!(err, MetaError::UnsupportedVersion { .. }),
                "bit {bit}: {msg}"
            ),
            _ => assert!(
                matches!(err, MetaError::BadChecksum { .. }),
                "bit {bit}: {msg}"
            ),
        }
        assert!(
            msg.contains(&format!("on {} at offset {at}", disk.display())),
            "bit {bit}: {msg}"
        );
        flips += 1;
    }
    assert_eq!(flips, 1280 + (4096 * 8 - 1280usize).div_ceil(61));
    println!("superblock: {flips} single-bit flips, all refused");
    write_bytes(&disk, at, &good);
    assert_eq!(read_md(&disk, &MetaLocation::Internal).unwrap(), md);
}

/// A corrupt value with a matching checksum (a bug, or a write of garbage) is refused
/// by the field checks when it breaks the layout.
#[test]
fn checksummed_garbage_in_layout_fields_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let md = crashed_primary(&disk, 0);
    let at = md.layout.superblock_offset_bytes;
    let good = read_bytes(&disk, at, 4096);
    // bytes_per_bit, the seven layout fields, al extent size, meta kind, meta index.
    let fields = (20..24).chain(24..80).chain(84..88).chain(152..160);
    for byte in fields {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            bad[12..16].fill(0);
            let crc = crc32(&bad);
            bad[12..16].copy_from_slice(&crc.to_le_bytes());
            write_bytes(&disk, at, &bad);
            let err = read_md(&disk, &MetaLocation::Internal)
                .expect_err(&format!("byte {byte} bit {bit} accepted"));
            assert!(
                matches!(
                    err,
                    MetaError::Corrupt { .. } | MetaError::LayoutMismatch { .. }
                ),
                "byte {byte} bit {bit}: {err}"
            );
        }
    }
}

fn crc32(block: &[u8]) -> u32 {
    // CRC-32 (IEEE), the checksum of the superblock and AL transactions.
    let mut crc = 0xFFFF_FFFFu32;
    for &b in block {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn bit_flips_in_each_al_slot_are_detected_and_replay_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let md = crashed_primary(&disk, 12); // slots hold 5..=12; newest 12 in slot 4
    let mut flips = 0;
    for slot in 0..8u64 {
        let at = md.layout.al_offset_bytes + slot * 4096;
        let good = read_bytes(&disk, at, 4096);
        // A spread of bits over the header, the extent list and the padding.
        for bit in (0..4096 * 8).step_by(509).chain([100, 128, 300, 330]) {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            write_bytes(&disk, at, &bad);
            let md_now = read_md(&disk, &MetaLocation::Internal)
                .unwrap_or_else(|e| panic!("slot {slot} bit {bit}: {e}"));
            let r = recover_al(&md_now).unwrap();
            let state = &r.slots[slot as usize];
            if bit < 64 {
                // The magic is gone: the slot looks never written.
                assert_eq!(*state, SlotState::Empty, "slot {slot} bit {bit}");
            } else {
                assert!(
                    matches!(state, SlotState::Damaged { .. }),
                    "slot {slot} bit {bit}: {state:?}"
                );
            }
            let newest = r.newest.as_ref().unwrap().tr_number;
            // The newest transaction (12, slot 4) damaged: replay uses 11, as after a
            // torn write; any other slot damaged: 12.
            let expect = if slot == 12 % 8 { 11 } else { 12 };
            assert_eq!(newest, expect, "slot {slot} bit {bit}");
            assert_eq!(r.hot_extents(), hot_of(expect), "slot {slot} bit {bit}");
            // The in-memory log replays the same set and numbers on after it.
            let log = ActivityLog::from_meta(&md_now).unwrap();
            let mut log_hot = log.hot_extents();
            log_hot.sort();
            assert_eq!(log_hot, hot_of(expect));
            assert!(log.last_tr_number() >= newest);
            flips += 1;
        }
        write_bytes(&disk, at, &good);
    }
    assert!(flips >= 8 * 64, "{flips}");
    println!("activity log: {flips} single-bit flips over 8 slots, all detected");
}

#[test]
fn power_cut_during_al_write_replays_previous_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let (mut torn, mut complete) = (0, 0);
    for last in [1u64, 2, 8, 9, 20] {
        let md = crashed_primary(&disk, last - 1);
        let new = encode_transaction(&tr(&md, last)).unwrap();
        let at = slot_offset(&md, last);
        let old = read_bytes(&disk, at, 4096);
        for sectors in 0..=8usize {
            let mut block = old.clone();
            block[..sectors * 512].copy_from_slice(&new[..sectors * 512]);
            write_bytes(&disk, at, &block);
            let md_now = read_md(&disk, &MetaLocation::Internal)
                .unwrap_or_else(|e| panic!("last {last} sectors {sectors}: {e}"));
            let r = recover_al(&md_now).unwrap();
            let hot = r.hot_extents();
            let log = ActivityLog::from_meta(&md_now).unwrap();
            let mut log_hot = log.hot_extents();
            log_hot.sort();
            assert_eq!(log_hot, hot, "last {last} sectors {sectors}");
            if block[..] == new[..] {
                // Sectors 4..8 of the new transaction are zero, like the old one's:
                // once 4 sectors are down the block is complete.
                assert!(sectors >= 4, "{sectors}");
                assert_eq!(hot, hot_of(last), "last {last} sectors {sectors}");
                assert!(!r.fell_back);
                complete += 1;
            } else if sectors == 0 {
                // Nothing reached the disk: the previous state.
                let expect = if last == 1 { vec![] } else { hot_of(last - 1) };
                assert_eq!(hot, expect, "last {last}");
                assert!(!r.fell_back);
            } else {
                // Torn: the previous transaction's hot set (none for the first one).
                // Every data write that needed the new transaction waited for it.
                let expect = if last == 1 { vec![] } else { hot_of(last - 1) };
                assert_eq!(hot, expect, "last {last} sectors {sectors}");
                assert!(r.fell_back, "last {last} sectors {sectors}");
                torn += 1;
            }
            // Numbering continues after every transaction seen.
            assert!(log.last_tr_number() + 1 >= last);
        }
    }
    assert_eq!((torn, complete), (5 * 3, 5 * 5));
    println!("activity log power cuts: 45 (torn {torn}, complete {complete}, not started 5)");
}

#[test]
fn power_cut_during_superblock_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let old_md = crashed_primary(&disk, 0);
    let at = old_md.layout.superblock_offset_bytes;
    let old = read_bytes(&disk, at, 4096);
    let mut new_md = old_md.clone();
    new_md.superblock.uuids.new_current();
    new_md.superblock.set_flag(flags::PRIMARY_IND, false);
    let new = new_md.superblock.encode();
    // Sector-atomic disk: every field lives in sector 0, so a cut leaves the old or the
    // new superblock, never a mix.
    for sectors in 0..=8usize {
        let mut block = old.clone();
        block[..sectors * 512].copy_from_slice(&new[..sectors * 512]);
        write_bytes(&disk, at, &block);
        let read = read_md(&disk, &MetaLocation::Internal).unwrap();
        let expect = if sectors == 0 { &old_md } else { &new_md };
        assert_eq!(read.superblock, expect.superblock, "sectors {sectors}");
    }
    // A disk that tears inside a sector: every mixed prefix is refused (checksum), and
    // the refusal names the place.
    let (mut refused, mut mixes) = (0, 0);
    for bytes in 1..160 {
        let mut block = old.clone();
        block[..bytes].copy_from_slice(&new[..bytes]);
        if block == old || block[..] == new[..] {
            continue;
        }
        mixes += 1;
        write_bytes(&disk, at, &block);
        match read_md(&disk, &MetaLocation::Internal) {
            Err(MetaError::BadChecksum { .. }) => refused += 1,
            Err(e) => panic!("bytes {bytes}: unexpected {e}"),
            Ok(md) => assert!(
                md.superblock == old_md.superblock || md.superblock == new_md.superblock,
                "bytes {bytes}: a mix was accepted"
            ),
        }
    }
    assert!(mixes > 50, "{mixes}");
    assert_eq!(refused, mixes);
    println!("superblock power cuts: 9 sector-granular (old or new), {mixes} byte-granular mixes, all refused");
}

#[test]
fn unrecoverable_activity_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let md = crashed_primary(&disk, 10);
    // Damage the slots of 9 and 10: two writes went wrong; 10 was complete, so the
    // extents of 10 would be forgotten by a fall-back to 8.
    for n in [9u64, 10] {
        let at = slot_offset(&md, n) + 200;
        let mut b = read_bytes(&disk, at, 1);
        b[0] ^= 0x10;
        write_bytes(&disk, at, &b);
    }
    let err = read_md(&disk, &MetaLocation::Internal).unwrap_err();
    assert!(matches!(err, MetaError::AlUnrecoverable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "activity log on {} at offset {} cannot be recovered",
            disk.display(),
            md.layout.al_offset_bytes
        )) && msg.contains("transactions 9 and 10")
            && msg.contains("create-md --force"),
        "{msg}"
    );
    // Every slot damaged: the hot set is unknown.
    for n in 3..=10u64 {
        let at = slot_offset(&md, n) + 300;
        let mut b = read_bytes(&disk, at, 1);
        b[0] ^= 0x01;
        write_bytes(&disk, at, &b);
    }
    let err = read_md(&disk, &MetaLocation::Internal).unwrap_err();
    assert!(err.to_string().contains("no valid transaction"), "{err}");
    // After a clean shutdown the same ring is not needed: accepted.
    let mut clean = md.clone();
    clean.superblock.set_flag(flags::AL_CLEAN, true);
    write_superblock(&clean).unwrap();
    assert!(read_md(&disk, &MetaLocation::Internal).is_ok());
}

/// The bitmap has no checksum (as in DRBD): a flipped bit is loaded as is. A 0 -> 1
/// flip adds one 4 KiB block to the next resync; a 1 -> 0 flip hides an out-of-sync
/// block from it (online verify would find it; rdb has no verify yet).
#[test]
fn bitmap_bit_flips_are_loaded_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let md = crashed_primary(&disk, 0);
    let mut bitmap = Bitmap::new(md.layout.data_size_bytes);
    bitmap.set_range(0, 16 * 4096).unwrap();
    bitmap.flush_dirty(&md).unwrap();
    let at = md.layout.bitmap_offset_bytes;
    let mut page = read_bytes(&disk, at, 4096);
    page[0] ^= 0x01; // block 0: 1 -> 0
    page[100] ^= 0x80; // block 807: 0 -> 1
    write_bytes(&disk, at, &page);
    let loaded = Bitmap::load(&md).unwrap();
    assert_eq!(loaded.count_set(), 16);
    assert!(!loaded.is_set(0) && loaded.is_set(807));
    // Bits past the end of the data are ignored, whatever the disk holds.
    let total = read_bytes(&disk, at, md.layout.bitmap_size_bytes as usize);
    let ones = vec![0xFFu8; total.len()];
    write_bytes(&disk, at, &ones);
    let loaded = Bitmap::load(&md).unwrap();
    assert_eq!(loaded.count_set(), loaded.block_count());
}

/// The real `rdbadm up` refuses corrupt meta-data with the decoder's message, and
/// comes up once the meta-data is recreated.
#[test]
fn rdbadm_up_refuses_corrupt_meta_data() {
    let c = Cluster::new("metafault", "C", "64M", "");
    c.adm_ok("alpha", &["create-md", "r0"]);
    let disk = c.img("alpha");
    let md = read_md(&disk, &MetaLocation::Internal).unwrap();

    // 1. A flipped bit in the superblock.
    let at = md.layout.superblock_offset_bytes + 90;
    let mut b = read_bytes(&disk, at, 1);
    b[0] ^= 0x04;
    write_bytes(&disk, at, &b);
    let out = c.adm("alpha", &["up", "r0"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "up accepted a corrupt superblock");
    assert!(
        err.contains("meta-data superblock checksum mismatch")
            && err.contains(&disk.display().to_string()),
        "{err}"
    );
    b[0] ^= 0x04;
    write_bytes(&disk, at, &b);

    // 2. A crashed Primary whose activity log lost two transactions.
    let mut crashed = md.clone();
    crashed.superblock.set_flag(flags::AL_CLEAN, false);
    crashed
        .superblock
        .set_flag(flags::CONSISTENT | flags::PRIMARY_IND, true);
    write_superblock(&crashed).unwrap();
    for n in 1..=6 {
        let t = AlTransaction {
            tr_number: n,
            device_uuid: md.superblock.device_uuid,
            al_extents: md.superblock.al_extents,
            extents: vec![n as u32],
        };
        write_transaction(&crashed, &t).unwrap();
    }
    for n in [5u64, 6] {
        let at = slot_offset(&md, n) + 64;
        let mut b = read_bytes(&disk, at, 1);
        b[0] ^= 0x01;
        write_bytes(&disk, at, &b);
    }
    let out = c.adm("alpha", &["up", "r0"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "up accepted an unrecoverable activity log"
    );
    assert!(
        err.contains("activity log") && err.contains("cannot be recovered"),
        "{err}"
    );
    assert!(err.contains("create-md --force"), "{err}");

    // 3. The way out the message names: recreate the meta-data, then up works.
    c.adm_ok("alpha", &["create-md", "--force", "r0"]);
    c.adm_ok("alpha", &["up", "r0"]);
    assert_eq!(c.status("alpha")["disk"], "Inconsistent");
    c.adm_ok("alpha", &["down", "r0"]);
}

/// Regression (found by the `meta_image` fuzz target, input
/// `fuzz/seeds/meta_image/crash-2ed0b843...`): a checksummed superblock whose
/// `al_tr_number` is u64::MAX made `ActivityLog::from_meta` overflow `+ 1` (a panic
/// with overflow checks; in release a wrap to transaction 0, older than every slot).
/// Numbers above 2^63 - 1 are now corrupt, in the superblock and in AL transactions.
#[test]
fn fuzz_regression_al_tr_number_at_max() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", DISK_BYTES);
    let md = crashed_primary(&disk, 3);
    let at = md.layout.superblock_offset_bytes;
    for n in [u64::MAX, 1 << 63] {
        let mut sb = md.superblock.clone();
        sb.al_tr_number = n;
        write_bytes(&disk, at, &sb.encode());
        let err = read_md(&disk, &MetaLocation::Internal).unwrap_err();
        assert!(
            err.to_string()
                .contains("activity log transaction number implausibly large"),
            "{err}"
        );
        // The in-memory path refuses too, without panicking.
        let mut in_memory = md.clone();
        in_memory.superblock.al_tr_number = n;
        assert!(matches!(
            ActivityLog::from_meta(&in_memory),
            Err(MetaError::Corrupt { .. })
        ));
    }
    write_bytes(&disk, at, &md.superblock.encode());
    // A checksummed AL transaction numbered u64::MAX is damaged, not the newest.
    let mut huge = tr(&md, 3);
    huge.tr_number = (1 << 63) - 2; // slot 6
    write_transaction(&md, &huge).unwrap();
    huge.tr_number = u64::MAX;
    assert!(encode_transaction(&huge).is_err());
    let mut block = encode_transaction(&tr(&md, 7)).unwrap();
    block[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    block[12..16].fill(0);
    let crc = crc32(&block);
    block[12..16].copy_from_slice(&crc.to_le_bytes());
    write_bytes(&disk, slot_offset(&md, 7), &block);
    let md_now = read_md(&disk, &MetaLocation::Internal).unwrap();
    let r = recover_al(&md_now).unwrap();
    assert!(
        matches!(r.slots[7], SlotState::Damaged { .. }),
        "{:?}",
        r.slots[7]
    );
    assert_eq!(r.newest.unwrap().tr_number, (1 << 63) - 2);
    let log = ActivityLog::from_meta(&md_now).unwrap();
    assert_eq!(log.last_tr_number(), (1 << 63) - 2);
}
