//! Fuzz target: the control protocol request line `rdbd` decodes from `rdbadm` (JSON):
//! never panics, and a decoded request round-trips through its encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb::control::Request;

fuzz_target!(|data: &[u8]| {
    if data.len() > rdb::control::MAX_LINE_BYTES {
        return;
    }
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let text = serde_json::to_string(&req).expect("a decoded request encodes");
        let again: Request = serde_json::from_str(&text).expect("an encoded request decodes");
        assert_eq!(again, req);
    }
});
