//! Fuzz the replication frame decoder: arbitrary bytes must never panic, `check` and
//! `decode` must agree, and whatever decodes must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdb_protocol::repl::{Frame, FrameError};

fuzz_target!(|data: &[u8]| {
    let checked = Frame::check(data);
    match Frame::decode(data) {
        Ok((frame, used)) => {
            assert_eq!(checked, Ok(used));
            assert!(used <= data.len());
            let volume = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
            let mut out = Vec::new();
            frame
                .encode(volume, &mut out)
                .expect("a decoded frame encodes");
            assert_eq!(out.as_slice(), &data[..used]);
        }
        Err(FrameError::Incomplete { needed }) => {
            assert_eq!(checked, Err(FrameError::Incomplete { needed }));
        }
        Err(_) => {
            // An invalid body may pass `check` (header only); an invalid header fails both.
            if let Err(e) = checked {
                assert!(!matches!(e, FrameError::Incomplete { .. }));
            }
        }
    }
});
