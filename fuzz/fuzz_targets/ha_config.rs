//! Fuzz the rdb-ha configuration parsers (ha.cf, haresources, authkeys): never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = rdb_ha::config::parse_hacf(Path::new("ha.cf"), &text);
    let _ = rdb_ha::config::parse_haresources(Path::new("haresources"), &text);
    let _ = rdb_ha::config::parse_authkeys(Path::new("authkeys"), &text, 0o600, true);
});
