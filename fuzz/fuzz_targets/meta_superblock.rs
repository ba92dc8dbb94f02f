//! Fuzz target: `Superblock::decode` on arbitrary bytes never panics, and whatever it
//! accepts re-encodes to the same 4096 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb::meta::Superblock;

fuzz_target!(|data: &[u8]| {
    if let Ok(superblock) = Superblock::decode(data) {
        assert_eq!(&superblock.encode()[..], &data[..4096]);
    }
});
