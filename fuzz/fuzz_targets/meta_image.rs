//! Fuzz target: a whole meta-data image (superblock, activity-log ring, bitmap) read the
//! way `rdbadm up` reads it: `read_md` (superblock, layout checks, activity-log
//! recovery after an unclean shutdown), `Bitmap::load`, `ActivityLog::from_meta`.
//!
//! The input is a list of patches applied to a valid image (10 AL transactions, some
//! bitmap bits, unclean shutdown): `[region, offset u16 LE, len, bytes...]`, region 0 the
//! superblock, 1 the AL ring, 2 the bitmap. The first input byte selects checksum fix-ups
//! (bit 0: superblock, bit 1: AL slots) so the checks behind the checksums are reached.
//! Properties: nothing panics; accepted meta-data re-encodes to the bytes on disk; the
//! bitmap counts at most one bit per block; recovery agrees with `read_md`.
#![no_main]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rdb::meta::al::{write_transaction, AlTransaction};
use rdb::meta::recovery::recover_al;
use rdb::meta::{
    create_md, flags, read_md, write_superblock, ActivityLog, Bitmap, CreateOptions, MetaData,
    MetaLocation,
};

struct Fixture {
    disk: PathBuf,
    md: MetaData,
    /// superblock, AL ring, bitmap (pristine).
    regions: [(u64, Vec<u8>); 3],
}

fn read_at(path: &PathBuf, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .expect("read the fixture");
    buf
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("rdb-fuzz-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fixture dir");
        let disk = dir.join("disk");
        File::create(&disk)
            .and_then(|f| f.set_len(40 << 20))
            .expect("fixture disk");
        let opts = CreateOptions {
            force: true,
            al_extents: 61,
        };
        let mut md = create_md(&disk, &MetaLocation::Internal, &opts).expect("create-md");
        for n in 1..=10u64 {
            let tr = AlTransaction {
                tr_number: n,
                device_uuid: md.superblock.device_uuid,
                al_extents: 61,
                extents: (0..n as u32)
                    .map(|e| e % 9)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            write_transaction(&md, &tr).expect("AL transaction");
        }
        let mut bitmap = Bitmap::new(md.layout.data_size_bytes);
        bitmap.set_range(0, 1 << 20).expect("bits");
        bitmap
            .set_range(md.layout.data_size_bytes - 4096, 4096)
            .expect("bits");
        bitmap.flush_dirty(&md).expect("bitmap");
        md.superblock.set_flag(flags::AL_CLEAN, false);
        md.superblock
            .set_flag(flags::CONSISTENT | flags::PRIMARY_IND, true);
        md.superblock.al_tr_number = 4;
        write_superblock(&md).expect("superblock");
        let l = md.layout;
        let regions = [
            (
                l.superblock_offset_bytes,
                read_at(&disk, l.superblock_offset_bytes, 4096),
            ),
            (
                l.al_offset_bytes,
                read_at(&disk, l.al_offset_bytes, l.al_size_bytes),
            ),
            (
                l.bitmap_offset_bytes,
                read_at(&disk, l.bitmap_offset_bytes, l.bitmap_size_bytes),
            ),
        ];
        Fixture { disk, md, regions }
    })
}

/// CRC32 of a 4096-byte block with the 4 bytes at `at` taken as zero, stored there.
fn fix_crc(block: &mut [u8], at: usize) {
    block[at..at + 4].fill(0);
    let crc = crc32fast::hash(block);
    block[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut regions = f.regions.clone();
    while rest.len() >= 4 {
        let region = (rest[0] % 3) as usize;
        let offset = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let len = rest[3] as usize;
        rest = &rest[4..];
        let bytes = &rest[..len.min(rest.len())];
        rest = &rest[bytes.len()..];
        let target = &mut regions[region].1;
        for (i, b) in bytes.iter().enumerate() {
            let at = (offset + i) % target.len();
            target[at] = *b;
        }
    }
    if mode & 1 != 0 {
        fix_crc(&mut regions[0].1, 12);
    }
    if mode & 2 != 0 {
        for slot in regions[1].1.chunks_exact_mut(4096) {
            if slot[..8] == *b"RDBALTR1" {
                fix_crc(slot, 12);
            }
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .open(&f.disk)
        .expect("open the fixture");
    for (offset, bytes) in &regions {
        file.write_all_at(bytes, *offset)
            .expect("write the fixture");
    }
    drop(file);
    match read_md(&f.disk, &MetaLocation::Internal) {
        Ok(md) => {
            assert_eq!(md.layout, f.md.layout);
            assert_eq!(&md.superblock.encode()[..], &regions[0].1[..]);
            let recovery = recover_al(&md).expect("read_md accepted the activity log");
            for e in recovery.hot_extents() {
                let _ = e;
            }
            if let Ok(log) = ActivityLog::from_meta(&md) {
                assert!(log.len() <= log.capacity() as usize);
            }
            let bitmap = Bitmap::load(&md).expect("bitmap loads");
            assert!(bitmap.count_set() <= bitmap.block_count());
            assert!(bitmap.out_of_sync_bytes() <= md.layout.data_size_bytes);
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
        }
    }
});
