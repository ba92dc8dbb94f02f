//! Fuzz target: NBD handshake option decoding (header, then payload).
//!
//! The first bytes are an option header; the payload is whatever follows, cut to
//! the announced length. Decoding must never panic, and decoded INFO/GO and
//! META_CONTEXT payloads must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb_protocol::nbd::{
    decode_option, decode_option_header, encode_info_request, encode_meta_context_request,
    ClientOption, DEFAULT_MAX_OPTION_BYTES, OPTION_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = decode_option_header(data, DEFAULT_MAX_OPTION_BYTES) else {
        return;
    };
    let rest = &data[OPTION_HEADER_LEN..];
    let payload = &rest[..rest.len().min(header.len_bytes as usize)];
    let Ok(option) = decode_option(header.option, payload) else {
        return;
    };
    let mut again = Vec::new();
    match &option {
        ClientOption::Info(req) | ClientOption::Go(req) => encode_info_request(&mut again, req),
        ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
            encode_meta_context_request(&mut again, req)
        }
        _ => return,
    }
    assert_eq!(again, payload);
});
