//! Fuzz target: `decode_transaction` on arbitrary bytes never panics, and whatever it
//! accepts re-encodes to the same 4096 bytes; the ring recovery of `meta::recovery`
//! never panics on eight such blocks.
//!
//! The first input byte selects fix-ups so the checks behind the magic, version and
//! CRC32 are reached: bit 0 writes the magic and version, bit 1 recomputes the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb::meta::al::{decode_transaction, encode_transaction, AL_MAGIC, AL_VERSION};
use rdb::meta::recovery::recover_ring;
use rdb::meta::Place;

fn check(block: &[u8]) {
    if let Ok(tr) = decode_transaction(block) {
        let again = encode_transaction(&tr).expect("a decoded transaction re-encodes");
        assert_eq!(&again[..], &block[..4096]);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut block = [0u8; 4096];
    let n = rest.len().min(4096);
    block[..n].copy_from_slice(&rest[..n]);
    if mode & 1 != 0 {
        block[0..8].copy_from_slice(&AL_MAGIC);
        block[8..12].copy_from_slice(&AL_VERSION.to_le_bytes());
    }
    if mode & 2 != 0 {
        block[12..16].fill(0);
        let crc = crc32fast::hash(&block);
        block[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    check(&block);
    // The same block in every slot of a ring, plus whatever follows in the input.
    let mut ring = vec![0u8; 8 * 4096];
    for slot in 0..8 {
        ring[slot * 4096..(slot + 1) * 4096].copy_from_slice(&block);
        if mode & 4 != 0 && slot % 2 == 1 {
            ring[slot * 4096..(slot + 1) * 4096].fill(0);
        }
    }
    let uuid = u64::from_le_bytes(block[24..32].try_into().expect("8 bytes"));
    let tr_number = u64::from_le_bytes(block[16..24].try_into().expect("8 bytes"));
    for clean in [false, true] {
        if let Ok(r) = recover_ring(&ring, uuid, clean, tr_number, &Place::default()) {
            assert_eq!(r.slots.len(), 8);
            if clean {
                assert!(r.hot_extents().is_empty());
            }
        }
    }
});
