//! Fuzz target: `Superblock::decode` on arbitrary bytes never panics, and whatever it
//! accepts re-encodes to the same 4096 bytes.
//!
//! The first input byte selects fix-ups so the field checks behind the magic, version
//! and CRC32 are reached: bit 0 writes the magic and version, bit 1 recomputes the
//! checksum; the rest of the input is the block (zero-padded to 4096 bytes). Without
//! fix-ups the input is decoded as is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb::meta::superblock::{SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION};
use rdb::meta::Superblock;

fn check(block: &[u8]) {
    if let Ok(superblock) = Superblock::decode(block) {
        assert_eq!(&superblock.encode()[..], &block[..4096]);
        assert!(superblock.check().is_ok());
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 3 == 0 {
        return;
    }
    let mut block = [0u8; 4096];
    let n = rest.len().min(4096);
    block[..n].copy_from_slice(&rest[..n]);
    if mode & 1 != 0 {
        block[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        block[8..12].copy_from_slice(&SUPERBLOCK_VERSION.to_le_bytes());
    }
    if mode & 2 != 0 {
        block[12..16].fill(0);
        let crc = crc32fast::hash(&block);
        block[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    check(&block);
});
