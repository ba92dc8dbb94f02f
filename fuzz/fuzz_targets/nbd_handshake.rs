//! Fuzz target: the small fixed-size NBD decoders: client flags (server side), greeting,
//! option reply header, simple reply and structured chunk header (client side, used by
//! the tests and benchmarks). Never panic; what decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb_protocol::nbd::{
    decode_chunk_header, decode_client_flags, decode_greeting, decode_option_reply_header,
    decode_simple_reply, encode_chunk_header, encode_greeting, CHUNK_HEADER_LEN, GREETING_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(flags) = decode_client_flags(data) {
        assert_eq!(flags.to_be_bytes(), data[..4]);
    }
    if let Ok(flags) = decode_greeting(data) {
        assert_eq!(encode_greeting(flags), data[..GREETING_LEN]);
    }
    let _ = decode_option_reply_header(data);
    let _ = decode_simple_reply(data);
    if let Ok(h) = decode_chunk_header(data) {
        assert_eq!(
            encode_chunk_header(h.flags, h.reply_type, h.cookie, h.len_bytes),
            data[..CHUNK_HEADER_LEN]
        );
    }
});
