//! File-level meta-data tests on real (sparse) files and a loop device: create/read
//! round trips for internal, indexed and flexible meta-data, refusals, checksum
//! detection, bitmap persistence of dirty pages, activity-log replay with a torn slot.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure

mod common;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use common::{read_bytes, sparse, write_bytes};
use rdb::meta::al::{self, encode_transaction, write_transaction};
use rdb::meta::{
    create_md, flags, read_md, wipe_md, write_superblock, ActivityLog, Bitmap, CreateOptions,
    MetaError, MetaLocation,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

#[test]
fn internal_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", 256 * MIB);
    let md = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    assert!(md.layout.data_size_bytes > 200 * MIB);
    assert_eq!(md.layout.superblock_offset_bytes, 256 * MIB - 4096);
    assert_eq!(md.superblock.uuids.current, 4);
    assert_eq!(md.superblock.flags, flags::AL_CLEAN);
    assert_eq!(md.superblock.al_extents, 1237);
    let read = read_md(&disk, &MetaLocation::Internal).unwrap();
    assert_eq!(read, md);
    // The superblock on disk is exactly the encoded one.
    let raw = read_bytes(&disk, md.layout.superblock_offset_bytes, 4096);
    assert_eq!(raw, md.superblock.encode().to_vec());

    let mut changed = read;
    changed
        .superblock
        .set_flag(flags::CONSISTENT | flags::PRIMARY_IND, true);
    changed.superblock.set_flag(flags::AL_CLEAN, false);
    changed.superblock.uuids.new_current();
    changed.superblock.al_tr_number = 99;
    write_superblock(&changed).unwrap();
    assert_eq!(read_md(&disk, &MetaLocation::Internal).unwrap(), changed);

    let text = changed.dump_text();
    assert!(text.contains("uuid {"), "{text}");
    assert!(text.contains("consistent, primary_ind"), "{text}");
    assert!(text.contains("al-tr-number 99;"), "{text}");
    let json = changed.to_json();
    assert_eq!(json["superblock"]["al_extents"], 1237);
    assert_eq!(json["superblock"]["uuids"]["bitmap"], "0x0000000000000004");
    assert_eq!(json["layout"]["data_size_bytes"], md.layout.data_size_bytes);
}

#[test]
fn external_indexed_and_flexible_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let disk_a = sparse(dir.path(), "a", 64 * MIB);
    let disk_b = sparse(dir.path(), "b", 10 * GIB);
    let meta_file = sparse(dir.path(), "meta", 3 * 128 * MIB);
    let slot = |index| MetaLocation::External {
        path: meta_file.clone(),
        index: Some(index),
    };
    let a = create_md(&disk_a, &slot(0), &CreateOptions::default()).unwrap();
    let b = create_md(&disk_b, &slot(2), &CreateOptions::default()).unwrap();
    assert_eq!(a.layout.data_size_bytes, 64 * MIB);
    assert_eq!(b.layout.data_size_bytes, 10 * GIB);
    assert_eq!(b.layout.superblock_offset_bytes, 256 * MIB);
    assert_eq!(read_md(&disk_a, &slot(0)).unwrap(), a);
    assert_eq!(read_md(&disk_b, &slot(2)).unwrap(), b);
    assert!(matches!(
        read_md(&disk_a, &slot(1)),
        Err(MetaError::NotFound { .. })
    ));
    // Slot 3 is past the end of the meta-data file.
    let err = create_md(&disk_a, &slot(3), &CreateOptions::default()).unwrap_err();
    assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
    assert!(err.to_string().contains("meta"), "{err}");
    // Indexed meta-data read as flexible: not found at offset 0? Slot 0 is at offset 0,
    // so the superblock is found but the layout differs.
    let flexible_view = MetaLocation::External {
        path: meta_file.clone(),
        index: None,
    };
    let err = read_md(&disk_a, &flexible_view).unwrap_err();
    assert!(matches!(err, MetaError::LayoutMismatch { .. }), "{err}");

    // Flexible: the whole (small) file.
    let flex_file = sparse(dir.path(), "flex", 4096 + 32 * 1024 + 320 * 1024);
    let flexible = MetaLocation::External {
        path: flex_file.clone(),
        index: None,
    };
    let c = create_md(&disk_b, &flexible, &CreateOptions::default()).unwrap();
    assert_eq!(c.layout.superblock_offset_bytes, 0);
    assert_eq!(c.layout.bitmap_size_bytes, 320 * 1024);
    assert_eq!(read_md(&disk_b, &flexible).unwrap(), c);
    // One byte too small: clear error.
    let small = sparse(dir.path(), "small", 4096 + 32 * 1024 + 320 * 1024 - 1);
    let err = create_md(
        &disk_b,
        &MetaLocation::External {
            path: small.clone(),
            index: None,
        },
        &CreateOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(small.to_str().unwrap()) && msg.contains("too small"),
        "{msg}"
    );

    // The backing disk grew: the recorded data size no longer matches.
    File::options()
        .write(true)
        .open(&disk_b)
        .unwrap()
        .set_len(11 * GIB)
        .unwrap();
    File::options()
        .write(true)
        .open(&flex_file)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let err = read_md(&disk_b, &flexible).unwrap_err();
    assert!(
        matches!(
            err,
            MetaError::LayoutMismatch {
                field: "data size",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn refuses_to_overwrite_and_wipes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", 64 * MIB);
    let first = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    let err = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap_err();
    assert!(matches!(err, MetaError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("--force"));
    let forced = create_md(
        &disk,
        &MetaLocation::Internal,
        &CreateOptions {
            force: true,
            al_extents: 511,
        },
    )
    .unwrap();
    assert_ne!(forced.superblock.device_uuid, first.superblock.device_uuid);
    assert_eq!(
        read_md(&disk, &MetaLocation::Internal)
            .unwrap()
            .superblock
            .al_extents,
        511
    );

    wipe_md(&disk, &MetaLocation::Internal).unwrap();
    let err = read_md(&disk, &MetaLocation::Internal).unwrap_err();
    assert!(matches!(err, MetaError::NotFound { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("no rdb meta-data found on {}", disk.display()))
            && msg.ends_with("(run rdbadm create-md)"),
        "{msg}"
    );
    create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();

    // Too small a backing disk.
    let tiny = sparse(dir.path(), "tiny", MIB);
    let err = create_md(&tiny, &MetaLocation::Internal, &CreateOptions::default()).unwrap_err();
    assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
    // Bad al-extents.
    let other = sparse(dir.path(), "other", 64 * MIB);
    let bad = CreateOptions {
        force: false,
        al_extents: 5000,
    };
    assert!(matches!(
        create_md(&other, &MetaLocation::Internal, &bad),
        Err(MetaError::InvalidArgument(_))
    ));
    // Missing file.
    let err = read_md(&dir.path().join("nope"), &MetaLocation::Internal).unwrap_err();
    assert!(matches!(err, MetaError::Io { .. }), "{err}");
}

#[test]
fn refuses_ext4() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "ext4.img", 64 * MIB);
    let status = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&disk)
        .status()
        .unwrap_or_else(|e| panic!("mkfs.ext4 is required for this test and failed to run: {e}"));
    assert!(status.success(), "mkfs.ext4 failed: {status}");
    assert_eq!(
        rdb::meta::detect_filesystem(&disk, 0).unwrap().as_deref(),
        Some("ext4")
    );
    let err = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap_err();
    match &err {
        MetaError::HoldsFilesystem { fs, .. } => assert_eq!(fs, "ext4"),
        other => panic!("expected HoldsFilesystem, got {other}"),
    }
    assert!(err.to_string().contains("ext4"));
    // External meta-data does not change the data area: still refused.
    let meta = sparse(dir.path(), "meta", 128 * MIB);
    let external = MetaLocation::External {
        path: meta,
        index: Some(0),
    };
    assert!(matches!(
        create_md(&disk, &external, &CreateOptions::default()),
        Err(MetaError::HoldsFilesystem { .. })
    ));
    let forced = CreateOptions {
        force: true,
        ..CreateOptions::default()
    };
    create_md(&disk, &MetaLocation::Internal, &forced).unwrap();
}

#[test]
fn flipped_superblock_byte_is_bad_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", 64 * MIB);
    let md = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    let offset = md.layout.superblock_offset_bytes;
    let mut byte = read_bytes(&disk, offset + 100, 1);
    byte[0] ^= 0x01;
    write_bytes(&disk, offset + 100, &byte);
    let err = read_md(&disk, &MetaLocation::Internal).unwrap_err();
    assert!(matches!(err, MetaError::BadChecksum { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "meta-data superblock checksum mismatch on {} at offset {offset}: expected 0x",
            disk.display()
        )),
        "{msg}"
    );
    // create-md still sees rdb meta-data there.
    assert!(matches!(
        create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()),
        Err(MetaError::AlreadyExists { .. })
    ));
}

#[test]
fn bitmap_persists_dirty_pages_only() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", 2 * GIB);
    let md = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    let mut bitmap = Bitmap::load(&md).unwrap();
    assert_eq!(bitmap.count_set(), 0);
    assert_eq!(bitmap.page_count(), 16);
    bitmap.set_range(0, 10_000).unwrap(); // blocks 0..=2, page 0
    bitmap.set_range(GIB, 4096).unwrap(); // block 262144, page 8
    let last_offset = md.layout.data_size_bytes - 4096;
    bitmap.set_range(last_offset, 4096).unwrap(); // last page
    assert_eq!(bitmap.dirty_page_count(), 3);
    assert_eq!(bitmap.flush_dirty(&md).unwrap(), 3);
    assert_eq!(bitmap.flush_dirty(&md).unwrap(), 0);
    // On-disk encoding: bit i = byte i/8, bit i%8.
    let page0 = read_bytes(&disk, md.layout.bitmap_offset_bytes, 1);
    assert_eq!(page0[0], 0b0000_0111);
    let loaded = Bitmap::load(&md).unwrap();
    assert_eq!(loaded, bitmap);
    assert_eq!(loaded.count_set(), 5);
    assert_eq!(
        loaded.runs(0).collect::<Vec<_>>(),
        vec![(0, 3 * 4096), (GIB, 4096), (last_offset, 4096)]
    );

    // Scribble on a clean page (page 4) behind the bitmap's back; dirty page 1 only.
    let page4_offset = md.layout.bitmap_offset_bytes + 4 * 4096;
    write_bytes(&disk, page4_offset, &[0xFF; 8]);
    bitmap.set_range(32768 * 4096, 4096).unwrap(); // first block of page 1
    assert_eq!(bitmap.flush_dirty(&md).unwrap(), 1);
    // Page 4 was not rewritten: the scribble is still there.
    assert_eq!(read_bytes(&disk, page4_offset, 8), vec![0xFF; 8]);
    let reloaded = Bitmap::load(&md).unwrap();
    assert_eq!(reloaded.count_set(), 6 + 64);

    // set_all / clear_all persist everything.
    let mut all = reloaded;
    all.set_all();
    assert_eq!(all.flush_dirty(&md).unwrap(), 16);
    let loaded = Bitmap::load(&md).unwrap();
    assert_eq!(loaded.count_set(), md.layout.data_size_bytes / 4096);
    assert_eq!(loaded.out_of_sync_bytes(), md.layout.data_size_bytes);
    all.clear_all();
    all.flush_dirty(&md).unwrap();
    assert_eq!(Bitmap::load(&md).unwrap().count_set(), 0);
}

#[test]
fn activity_log_replay_with_torn_slot() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "disk", 4 * GIB);
    let md = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    assert!(al::replay(&md).unwrap().is_empty());
    let mut log = ActivityLog::from_meta(&md).unwrap();
    assert_eq!(log.last_tr_number(), 0);
    // 11 transactions: the ring wraps.
    let mut history = Vec::new();
    for step in 0..11u32 {
        let tr = log.activate(&[step * 7, step * 7 + 1]).unwrap().unwrap();
        write_transaction(&md, &tr).unwrap();
        history.push(tr);
    }
    let newest = history.last().unwrap().clone();
    assert_eq!(newest.tr_number, 11);
    assert_eq!(newest.extents.len(), 22);
    assert_eq!(al::replay(&md).unwrap(), newest.extents);

    // A restarted log continues the numbering and holds the same hot set.
    let restarted = ActivityLog::from_meta(&md).unwrap();
    assert_eq!(restarted.last_tr_number(), 11);
    assert_eq!(restarted.hot_extents(), newest.extents);

    // Tear a 12th transaction (slot 12 % 8 = 4): only its header and first entries reach
    // the disk, the rest of the slot still holds transaction 4.
    let mut next_log = restarted;
    let torn = next_log.activate(&[500]).unwrap().unwrap();
    assert_eq!(torn.tr_number, 12);
    let block = encode_transaction(&torn).unwrap();
    let slot_offset = md.layout.al_offset_bytes + (torn.tr_number % 8) * 4096;
    write_bytes(&disk, slot_offset, &block[..64]);
    // Falls back to transaction 11.
    assert_eq!(al::replay(&md).unwrap(), newest.extents);
    assert_eq!(al::replay_newest(&md).unwrap().unwrap().tr_number, 11);

    // Also tear 11 (flip a byte in its slot): falls back to 10.
    let slot11 = md.layout.al_offset_bytes + (11 % 8) * 4096;
    let mut byte = read_bytes(&disk, slot11 + 200, 1);
    byte[0] ^= 0xFF;
    write_bytes(&disk, slot11 + 200, &byte);
    assert_eq!(al::replay(&md).unwrap(), history[9].extents);

    // A transaction of other meta-data (device UUID) in a slot is ignored.
    let mut foreign = history[9].clone();
    foreign.tr_number = 13;
    foreign.device_uuid ^= 1;
    write_transaction(&md, &foreign).unwrap();
    assert_eq!(al::replay_newest(&md).unwrap().unwrap().tr_number, 10);

    // Crash recovery: hot extents become out of sync.
    let mut bitmap = Bitmap::load(&md).unwrap();
    let hot = al::replay(&md).unwrap();
    bitmap.set_extents(&hot);
    assert_eq!(bitmap.count_set(), hot.len() as u64 * 1024);
}

#[test]
fn one_tib_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let disk = sparse(dir.path(), "big", TIB);
    let md = create_md(&disk, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    assert_eq!(md.layout.bitmap_size_bytes, 32 * MIB);
    let read = read_md(&disk, &MetaLocation::Internal).unwrap();
    let mut bitmap = Bitmap::load(&read).unwrap();
    assert_eq!(bitmap.count_set(), 0);
    bitmap.set_range(TIB / 2, 8192).unwrap();
    assert_eq!(bitmap.flush_dirty(&read).unwrap(), 1);
    assert_eq!(Bitmap::load(&read).unwrap().count_set(), 2);
    // The file stays sparse: far less than the bitmap is allocated.
    let allocated_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&disk).unwrap().blocks() * 512
    };
    assert!(
        allocated_bytes < 4 * MIB,
        "{allocated_bytes} bytes allocated"
    );
}

/// Detaches a loop device on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_via_loop() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "loop.img", 96 * MIB);
    let output = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&image)
        .output()
        .unwrap_or_else(|e| panic!("losetup is required for this test: {e}"));
    assert!(
        output.status.success(),
        "losetup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dev = Loop(String::from_utf8(output.stdout).unwrap().trim().to_string());
    let dev_path = Path::new(&dev.0);
    assert_eq!(rdb::meta::device_size_bytes(dev_path).unwrap(), 96 * MIB);
    let md = create_md(dev_path, &MetaLocation::Internal, &CreateOptions::default()).unwrap();
    assert_eq!(read_md(dev_path, &MetaLocation::Internal).unwrap(), md);
    let mut bitmap = Bitmap::load(&md).unwrap();
    bitmap.set_range(0, MIB).unwrap();
    bitmap.flush_dirty(&md).unwrap();
    assert_eq!(Bitmap::load(&md).unwrap().count_set(), 256);
    // The same bytes through the image file.
    let raw = read_bytes(&image, md.layout.superblock_offset_bytes, 8);
    assert_eq!(&raw, b"RDBMETA1");
}
