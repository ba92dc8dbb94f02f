//! Fuzz the heartbeat packet decoder: never panics; a decoded packet re-encodes to the
//! same signed bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rdb_protocol::heartbeat;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = heartbeat::decode(data) {
        let mut out = Vec::new();
        d.packet
            .encode_unsigned(&mut out)
            .expect("a decoded packet encodes");
        assert_eq!(out, d.signed);
        assert_eq!(d.signed.len() + d.mac.len(), data.len());
    }
});
