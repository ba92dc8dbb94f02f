//! Deterministic mutation smoke test of the configuration parser (what the cargo-fuzz
//! target `fuzz/fuzz_targets/config.rs` checks, run here for a few thousand inputs on
//! every `cargo test`): no panic on mutated configurations, dump re-parses to the same
//! resolved result, and each input is handled quickly.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdb::config::parse_str;

const SEEDS: &[&str] = &[
    include_str!("data/config/full.conf"),
    include_str!("data/config/seed003/drbd.d/data.res"),
    include_str!("data/config/seed003/drbd.d/global_common.conf"),
];

const TOKENS: &[&str] = &[
    "{",
    "}",
    ";",
    "\"",
    "#",
    "\\",
    "\n",
    " ",
    "on",
    "volume",
    "resource r",
    "net",
    "disk",
    "[",
    "]",
    ":",
    "ipv6",
    "minor",
    "internal",
    "9999999999999999999999",
    "0",
    "M",
    "include",
    "skip",
];

fn mutate(rng: &mut StdRng, base: &str) -> String {
    let mut chars: Vec<char> = base.chars().collect();
    for _ in 0..rng.random_range(1..8) {
        let len = chars.len();
        match rng.random_range(0..5) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=16.min(len - i));
                chars.drain(i..i + n);
            }
            1 => {
                let i = rng.random_range(0..=len);
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                for (k, c) in t.chars().enumerate() {
                    chars.insert(i + k, c);
                }
            }
            2 if len > 0 => {
                let i = rng.random_range(0..len);
                chars[i] = char::from(rng.random_range(0x20u8..0x7f));
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=64.min(len - i));
                let piece: Vec<char> = chars[i..i + n].to_vec();
                let j = rng.random_range(0..=len);
                for (k, c) in piece.into_iter().enumerate() {
                    chars.insert(j + k, c);
                }
            }
            _ => {}
        }
    }
    chars.into_iter().filter(|c| *c != '\0').collect()
}

#[test]
fn mutated_configs_never_panic_and_dump_round_trips() {
    let mut rng = StdRng::seed_from_u64(0x7264_6263);
    // Includes in mutated text resolve inside an empty directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fuzz.conf");
    let mut parsed = 0;
    for i in 0..4000 {
        let text = mutate(&mut rng, SEEDS[i % SEEDS.len()]);
        let start = Instant::now();
        let result = parse_str(&text, &file);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "slow input:\n{text}"
        );
        let Ok(cfg) = result else { continue };
        parsed += 1;
        let dump = cfg.dump(None).expect("dump");
        let again = parse_str(&dump, Path::new("dump.conf"))
            .unwrap_or_else(|e| panic!("dump does not parse back: {e}\n{dump}"));
        assert_eq!(cfg.resource_names(), again.resource_names());
        for name in cfg.resource_names() {
            for node in ["alpha", "beta", "tho-web1"] {
                if let Ok(r) = cfg.resolve(&name, node) {
                    assert_eq!(Some(r), again.resolve(&name, node).ok(), "{dump}");
                }
            }
        }
    }
    // The mutations are mild enough that a good share of inputs still parses.
    assert!(parsed > 200, "only {parsed} mutated inputs parsed");
}
