//! Fuzz target: `decode_transaction` on arbitrary bytes never panics, and whatever it
//! accepts re-encodes to the same 4096 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb::meta::al::{decode_transaction, encode_transaction};

fuzz_target!(|data: &[u8]| {
    if let Ok(tr) = decode_transaction(data) {
        let block = encode_transaction(&tr).expect("a decoded transaction re-encodes");
        assert_eq!(&block[..], &data[..4096]);
    }
});
