//! Fuzz target: NBD transmission request header decoding.
//!
//! Any byte string must decode to a request or a typed error, never panic; a
//! decoded request must re-encode to the same 28 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb_protocol::nbd::{decode_request, DecodeError, DEFAULT_MAX_REQUEST_BYTES, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    match decode_request(data, DEFAULT_MAX_REQUEST_BYTES) {
        Ok(req) => {
            assert_eq!(&req.encode()[..], &data[..REQUEST_LEN]);
            assert!(req.payload_len() <= DEFAULT_MAX_REQUEST_BYTES as usize);
        }
        Err(DecodeError::Incomplete { needed_bytes }) => assert!(data.len() < needed_bytes),
        Err(_) => {}
    }
});
