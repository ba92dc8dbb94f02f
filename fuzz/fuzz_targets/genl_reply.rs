//! Fuzz target: decoding generic netlink replies (kernel NBD frontend) must never
//! panic on arbitrary bytes: messages, then the attributes of each data message,
//! nested once more.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb::frontend::kernel_nbd_genl::{attr_u32, decode_replies, parse_attrs, Reply};

fuzz_target!(|data: &[u8]| {
    let seq = data.first().map_or(0, |b| u32::from(*b));
    if let Ok(replies) = decode_replies(data, seq) {
        for r in replies {
            if let Reply::Data(d) = r {
                if let Ok(attrs) = parse_attrs(&d) {
                    for (_, payload) in attrs {
                        let _ = attr_u32(payload);
                        let _ = parse_attrs(payload);
                    }
                }
            }
        }
    }
    let _ = parse_attrs(data);
});
