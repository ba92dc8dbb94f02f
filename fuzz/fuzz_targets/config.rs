//! Fuzz target: the DRBD-syntax configuration parser must never panic, hang or grow
//! without bound on arbitrary UTF-8, and `dump` must produce text that parses back to the
//! same configuration.
//!
//! Includes are followed relative to the current directory ("fuzz.conf" has no directory
//! part); the loader bounds them (regular files only, opened non-blocking, size, count and
//! depth limits, cycle detection), so they cannot hang the target.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rdb::config::parse_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = parse_str(text, Path::new("fuzz.conf")) else {
        return;
    };
    for w in cfg.warnings() {
        let _ = w.to_string();
    }
    let Ok(dump) = cfg.dump(None) else {
        panic!("dump(None) of a parsed configuration failed");
    };
    let again = match parse_str(&dump, Path::new("fuzz-dump.conf")) {
        Ok(c) => c,
        Err(e) => panic!("dump does not parse back: {e}\n{dump}"),
    };
    assert_eq!(cfg.resource_names(), again.resource_names());
    for name in cfg.resource_names() {
        let _ = cfg.dump(Some(&name));
        for node in ["a", "b", "alpha"] {
            if let Ok(r) = cfg.resolve(&name, node) {
                assert_eq!(
                    Some(r),
                    again.resolve(&name, node).ok(),
                    "resolve differs after dump"
                );
            }
        }
    }
});
