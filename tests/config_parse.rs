//! Tests of the DRBD-syntax configuration parser: the seed 003 lab files, a full-featured
//! configuration, malformed inputs with exact positions, warnings, suggestions,
//! inheritance, addresses, sizes, includes and dump.

#![allow(clippy::unwrap_used)] // test helpers panic on bad fixtures by design

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rdb::config::*;

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config")
        .join(p)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_str(text, Path::new("t.conf"))
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// A minimal valid resource around `inner` (placed in the resource body).
fn res(inner: &str) -> String {
    format!(
        "resource r {{\n  device /dev/drbd0;\n  disk /dev/sdb1;\n  meta-disk internal;\n  on a {{ address 10.0.0.1:7788; }}\n  on b {{ address 10.0.0.2:7788; }}\n{inner}\n}}\n"
    )
}

#[test]
fn seed003_parses_and_resolves() {
    let path = data("seed003/drbd.conf");
    let cfg = load(&path).unwrap();
    assert_eq!(cfg.resource_names(), vec!["webstore".to_string()]);
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());

    let r = cfg.resolve("webstore", "tho-web1").unwrap();
    assert_eq!(r.name, "webstore");
    assert_eq!(r.node, "tho-web1");
    assert_eq!(
        r.volumes,
        vec![VolumeConfig {
            number: 0,
            device: "/dev/drbd0".into(),
            minor: Some(0),
            disk: "/dev/sdb1".into(),
            meta_disk: MetaDisk::Internal,
        }]
    );
    assert_eq!(
        r.this_host,
        HostConfig {
            name: "tho-web1".into(),
            address: sa("9.1.0.1:7788")
        }
    );
    assert_eq!(
        r.peers,
        vec![HostConfig {
            name: "tho-web2".into(),
            address: sa("9.1.0.2:7788")
        }]
    );
    assert_eq!(r.disk.resync_rate_bytes_per_s, 500 * 1024 * 1024);
    assert_eq!(r.startup.wfc_timeout_s, 1);
    assert_eq!(r.startup.degr_wfc_timeout_s, 1);
    assert_eq!(r.net, NetConfig::default());
    assert_eq!(r.net.protocol, Protocol::C);
    assert_eq!(r.frontend, FrontendKind::Auto);
    assert_eq!(r.nbd_listen, None);
    assert!(r.handlers.is_empty());

    // The other node, and the host name in another case (THO-WEB2 in the course notes).
    let r2 = cfg.resolve("webstore", "THO-WEB2").unwrap();
    assert_eq!(r2.this_host.address, sa("9.1.0.2:7788"));
    assert_eq!(r2.peers[0].name, "tho-web1");

    // Unknown node: the error names the resource's position and the known hosts.
    let e = cfg.resolve("webstore", "tho-web3").unwrap_err().to_string();
    assert!(e.ends_with("drbd.d/data.res:1:10: resource 'webstore' has no 'on tho-web3' section (hosts: tho-web1, tho-web2)"), "{e}");
    let e = cfg.resolve("nope", "tho-web1").unwrap_err().to_string();
    assert_eq!(e, "no such resource 'nope' (defined: webstore)");
}

#[test]
fn full_featured_config() {
    let cfg = load(&data("full.conf")).unwrap();
    assert_eq!(
        cfg.resource_names(),
        vec!["r0".to_string(), "r1".to_string()]
    );
    let r = cfg.resolve("r0", "alpha").unwrap();
    let n = &r.net;
    assert_eq!(n.protocol, Protocol::A);
    assert_eq!(n.cram_hmac_alg.as_deref(), Some("sha256"));
    assert_eq!(n.shared_secret.as_deref(), Some("s3cr\"et"));
    assert_eq!(n.ping_int_ms, 5_000); // from common
    assert_eq!(n.ping_timeout_ms, 700);
    assert_eq!(n.timeout_ms, 5_000);
    assert_eq!(n.connect_int_ms, 3_000);
    assert_eq!(n.ko_count, 4); // from common
    assert_eq!(n.sndbuf_size_bytes, 512 * 1024);
    assert_eq!(n.rcvbuf_size_bytes, 1_048_576);
    assert_eq!(n.max_buffers, 8000);
    assert_eq!(n.max_epoch_size, 8000);
    assert!(n.allow_two_primaries);
    assert_eq!(n.after_sb_0pri, AfterSb0Pri::DiscardZeroChanges);
    assert_eq!(n.after_sb_1pri, AfterSb1Pri::DiscardSecondary);
    assert_eq!(n.after_sb_2pri, AfterSb2Pri::CallPriLostAfterSb);
    assert_eq!(n.data_integrity_alg.as_deref(), Some("crc32c"));
    assert_eq!(n.csums_alg.as_deref(), Some("md5"));
    assert_eq!(n.verify_alg.as_deref(), Some("sha1"));
    assert_eq!(n.on_congestion, OnCongestion::PullAhead);
    let d = &r.disk;
    assert_eq!(d.on_io_error, OnIoError::Detach);
    assert_eq!(d.al_extents, 3389);
    assert_eq!(d.resync_rate_bytes_per_s, 40 << 20);
    assert_eq!(d.c_plan_ahead_ms, 1_000);
    assert_eq!(d.c_fill_target_bytes, 1 << 20);
    assert_eq!(d.c_max_rate_bytes_per_s, 200 << 20); // from common
    assert_eq!(d.c_min_rate_bytes_per_s, 4 << 20);
    assert_eq!(d.io_engine, IoEngineKind::Sync);
    assert!(d.direct_io);
    let s = &r.startup;
    assert_eq!(
        (
            s.wfc_timeout_s,
            s.degr_wfc_timeout_s,
            s.outdated_wfc_timeout_s
        ),
        (30, 15, 5)
    );
    assert!(s.wait_after_sb);
    assert_eq!(s.become_primary_on, vec!["alpha".to_string()]);
    assert_eq!(
        r.handlers.get("split-brain").map(String::as_str),
        Some("/bin/true")
    );
    assert_eq!(
        r.handlers.get("fence-peer").map(String::as_str),
        Some("/usr/lib/drbd/crm-fence-peer.sh")
    );
    assert_eq!(r.frontend, FrontendKind::Fuse); // on-level wins
    assert_eq!(r.nbd_listen, Some(sa("127.0.0.1:10809")));
    assert_eq!(r.this_host.address, sa("10.0.0.1:7789"));
    assert_eq!(
        r.peers,
        vec![HostConfig {
            name: "beta".into(),
            address: sa("10.0.0.2:7788")
        }]
    );
    assert_eq!(
        r.volumes,
        vec![
            VolumeConfig {
                number: 0,
                device: "/dev/drbd1".into(),
                minor: Some(1),
                disk: "/dev/vg/data0".into(),
                meta_disk: MetaDisk::Internal,
            },
            VolumeConfig {
                number: 1,
                device: "/dev/rdb2".into(),
                minor: Some(2),
                disk: "/dev/vg/data1".into(),
                meta_disk: MetaDisk::External {
                    path: "/dev/vg/meta".into(),
                    index: Some(3)
                },
            },
        ]
    );

    let b = cfg.resolve("r0", "beta").unwrap();
    assert_eq!(b.volumes[1].disk, PathBuf::from("/dev/vg/other1")); // on > resource
    assert_eq!(b.volumes[0].disk, PathBuf::from("/dev/vg/data0"));
    assert_eq!(b.frontend, FrontendKind::Nbd);
    assert_eq!(b.nbd_listen, Some(sa("[::1]:10810")));

    let r1a = cfg.resolve("r1", "alpha").unwrap();
    assert_eq!(r1a.net.protocol, Protocol::B); // from common, 8.3 syntax
    assert_eq!(r1a.disk.on_io_error, OnIoError::CallLocalIoError);
    assert_eq!(r1a.this_host.address, sa("[fd00::1]:7790"));
    assert_eq!(r1a.peers[0].address, sa("[fd00::2]:7788"));
    assert_eq!(r1a.volumes[0].device, PathBuf::from("/dev/rdb7"));
    assert_eq!(r1a.volumes[0].minor, Some(7));
    assert_eq!(
        r1a.volumes[0].meta_disk,
        MetaDisk::External {
            path: "/dev/sdd1".into(),
            index: None
        }
    );
    let r1b = cfg.resolve("r1", "beta").unwrap();
    assert_eq!(r1b.volumes[0].disk, PathBuf::from("/dev/sde1"));
    assert_eq!(
        r1b.volumes[0].meta_disk,
        MetaDisk::External {
            path: "/dev/sdf1".into(),
            index: Some(0)
        }
    );

    // Only cpu-mask is accepted without effect.
    let w: Vec<String> = cfg.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].ends_with(
            "full.conf:95:9: warning: keyword cpu-mask is accepted but has no effect in rdb"
        ),
        "{w:?}"
    );

    // The daemon prints the resolved configuration as JSON.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["net"]["protocol"], "A");
    assert_eq!(json["net"]["after_sb_0pri"], "discard-zero-changes");
    assert_eq!(json["frontend"], "fuse");
}

#[test]
fn malformed_inputs_report_exact_positions() {
    let cases: &[(&str, &str)] = &[
        // 1. misspelled keyword with suggestion
        (
            "resource r {\n  net {\n    protcol C;\n  }\n}\n",
            "t.conf:3:5: unknown keyword 'protcol' in section net (did you mean 'protocol'?)",
        ),
        // 2. missing ';' (next keyword swallowed as a value)
        (
            "resource r {\n  net {\n    protocol C\n    ko-count 3;\n  }\n}\n",
            "t.conf:3:15: missing ';' after 'C' (found 'ko-count')",
        ),
        // 3. missing ';' before '}'
        ("global {\n  usage-count no\n}\n", "t.conf:2:17: missing ';' after 'no'"),
        // 4. unterminated string
        (
            "resource r {\n  net { shared-secret \"abc;\n  }\n}\n",
            "t.conf:2:23: unterminated string (missing closing '\"' on the same line)",
        ),
        // 5. unexpected end of file
        (
            "resource r {\n  on a {\n    address 10.0.0.1:7788;\n",
            "t.conf:4:1: unexpected end of file, missing '}' for section opened at 2:8",
        ),
        // 6. unbalanced '}'
        ("global { }\n}\n", "t.conf:2:1: unbalanced '}' (no section is open here)"),
        // 7. bad protocol letter
        (
            "common {\n  net { protocol D; }\n}\n",
            "t.conf:2:18: invalid value 'D' for 'protocol': expected A, B or C",
        ),
        // 8. bad address
        (
            "resource r {\n  on a {\n    address 10.0.0.300:7788;\n  }\n}\n",
            "t.conf:3:13: invalid value '10.0.0.300:7788' for 'address': invalid IPv4 address (DRBD takes IP addresses, not host names; IPv6 needs 'ipv6 [ADDR]:PORT')",
        ),
        // 9. bad size unit
        (
            "common {\n  disk {\n    resync-rate 10Q;\n  }\n}\n",
            "t.conf:3:17: invalid value '10Q' for 'resync-rate': unknown unit (expected K, M, G, T or s)",
        ),
        // 10. duplicate on-section
        (
            "resource r {\n  on a { }\n  on a { }\n}\n",
            "t.conf:3:6: duplicate 'on a' section in resource 'r' (first defined at t.conf:2:6)",
        ),
        // 11. number out of range
        (
            "common { net { ping-timeout 0; } }\n",
            "t.conf:1:29: invalid value '0' for 'ping-timeout': must be between 1 and 300",
        ),
        // 12. unknown top-level keyword with suggestion
        ("resorce r { }\n", "t.conf:1:1: unknown keyword 'resorce' in section top level (did you mean 'resource'?)"),
        // 13. keyword valid elsewhere
        (
            "resource r {\n  address 10.0.0.1:7788;\n}\n",
            "t.conf:2:3: keyword 'address' is not valid in section resource (it belongs in: on, floating, stacked-on-top-of)",
        ),
        // 14. duplicate resource
        (
            "resource r { }\nresource r { }\n",
            "t.conf:2:10: duplicate resource 'r' (first defined at t.conf:1:10)",
        ),
        // 15. duplicate option in a section
        (
            "common {\n  net {\n    protocol A;\n    protocol C;\n  }\n}\n",
            "t.conf:4:5: duplicate 'protocol' in section net (first defined at t.conf:3:5)",
        ),
        // 16. section without '{'
        ("resource r;\n", "t.conf:1:11: expected '{' after 'r'"),
        // 17. bad boolean
        (
            "common { net { allow-two-primaries maybe; } }\n",
            "t.conf:1:36: invalid value 'maybe' for 'allow-two-primaries': expected yes or no",
        ),
        // 18. include inside a section
        ("resource r {\n  include \"x\";\n}\n", "t.conf:2:3: include is only allowed at top level"),
        // 19. bad port
        (
            "resource r { on a { address 10.0.0.1:99999; } }\n",
            "t.conf:1:29: invalid value '10.0.0.1:99999' for 'address': invalid port (expected 1 to 65535)",
        ),
        // 20. stray ';'
        ("global { };\n", "t.conf:1:11: unexpected ';' (empty statement)"),
        // 21. enum value
        (
            "common { net { after-sb-0pri discard-everything; } }\n",
            "t.conf:1:30: invalid value 'discard-everything' for 'after-sb-0pri': expected one of: disconnect, discard-younger-primary, discard-older-primary, discard-zero-changes, discard-least-changes, discard-local, discard-remote",
        ),
        // 22. tab counts as one column
        ("global {\n\tfoo;\n}\n", "t.conf:2:2: unknown keyword 'foo' in section global"),
    ];
    for (text, want) in cases {
        assert_eq!(&err(text), want, "input:\n{text}");
    }
}

#[test]
fn error_positions_are_structured() {
    let e = parse("common {\n  net { protcol C; }\n}\n").unwrap_err();
    let pos = e.pos().unwrap();
    assert_eq!(
        (pos.file.as_ref(), pos.line, pos.col),
        (Path::new("t.conf"), 2, 9)
    );
    match e {
        ConfigError::UnknownKeyword {
            keyword,
            section,
            suggestion,
            ..
        } => {
            assert_eq!((keyword.as_str(), section.as_str()), ("protcol", "net"));
            assert_eq!(suggestion.as_deref(), Some("protocol"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn accepted_but_ignored_keywords_warn() {
    let text = res(
        "  disk {\n    fencing resource-only;\n    no-disk-barrier;\n    md-flushes no;\n  }\n  net {\n    rr-conflict disconnect;\n  }\n  proxy {\n    memlimit 100M;\n    plugin { lz4 level 9; }\n  }",
    );
    let cfg = parse(&text).unwrap();
    let w: Vec<String> = cfg.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        vec![
            "t.conf:15:3: warning: keyword proxy is accepted but has no effect in rdb",
            "t.conf:8:5: warning: keyword fencing is accepted but has no effect in rdb",
            "t.conf:9:5: warning: keyword no-disk-barrier is accepted but has no effect in rdb",
            "t.conf:10:5: warning: keyword md-flushes is accepted but has no effect in rdb",
            "t.conf:13:5: warning: keyword rr-conflict is accepted but has no effect in rdb",
        ]
    );
    // Warnings do not prevent use.
    cfg.resolve("r", "a").unwrap();
    // Shapes are still checked for ignored keywords.
    assert_eq!(
        err(&res("  disk { md-flushes perhaps; }")),
        "t.conf:7:21: invalid value 'perhaps' for 'md-flushes': expected yes or no"
    );
    assert_eq!(
        err(&res("  disk { no-disk-barrier yes; }")),
        "t.conf:7:25: missing ';' after 'no-disk-barrier' (found 'yes')"
    );
    // An unknown keyword inside an ignored section is still an error.
    assert_eq!(
        err(&res("  proxy { memlimt 1M; }")),
        "t.conf:7:11: unknown keyword 'memlimt' in section proxy (did you mean 'memlimit'?)"
    );
}

#[test]
fn did_you_mean() {
    let cases = [
        ("common { disk { resync-rat 1M; } }", "resync-rate"),
        ("common { startup { wfc-timout 1; } }", "wfc-timeout"),
        ("common { handlers { split-brian \"x\"; } }", "split-brain"),
        ("global { usage-cont no; }", "usage-count"),
        ("resource r { on a { adress 10.0.0.1; } }", "address"),
        ("common { disk { io-engin sync; } }", "io-engine"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.ends_with(&format!("(did you mean '{want}'?)")), "{e}");
    }
    let e = err("common { net { frobnicate 1; } }");
    assert_eq!(
        e,
        "t.conf:1:16: unknown keyword 'frobnicate' in section net"
    );
}

#[test]
fn inheritance_common_resource_host() {
    let text = "common {\n  net { ko-count 3; timeout 20; }\n  disk { al-extents 100; }\n}\n\
        resource r {\n  net { ko-count 5; }\n  device /dev/drbd3;\n  disk /dev/sda1;\n\
        on a { address 10.0.0.1; disk /dev/sda9; }\n  on b { address 10.0.0.2; device minor 9; }\n}\n\
        resource s {\n  device minor 4;\n  disk /dev/sdb1;\n  on a { address 10.0.0.1:7790; }\n  on b { address 10.0.0.2:7790; }\n}\n";
    let cfg = parse(text).unwrap();
    let a = cfg.resolve("r", "a").unwrap();
    assert_eq!(a.net.ko_count, 5); // resource beats common
    assert_eq!(a.net.timeout_ms, 2_000); // common
    assert_eq!(a.disk.al_extents, 100); // common
    assert_eq!(a.net.max_buffers, 2048); // default
    assert_eq!(a.volumes[0].disk, PathBuf::from("/dev/sda9")); // host beats resource
    assert_eq!(a.volumes[0].device, PathBuf::from("/dev/drbd3"));
    let b = cfg.resolve("r", "b").unwrap();
    assert_eq!(b.volumes[0].disk, PathBuf::from("/dev/sda1"));
    assert_eq!(b.volumes[0].device, PathBuf::from("/dev/rdb9"));
    assert_eq!(b.volumes[0].minor, Some(9));
    let s = cfg.resolve("s", "a").unwrap();
    assert_eq!(s.net.ko_count, 3);
    assert_eq!(s.disk.al_extents, 100);
    assert_eq!(s.volumes[0].device, PathBuf::from("/dev/rdb4"));
}

#[test]
fn defaults_are_drbd_defaults() {
    let cfg = parse(&res("")).unwrap();
    let r = cfg.resolve("r", "a").unwrap();
    let n = &r.net;
    assert_eq!(
        (
            n.ping_int_ms,
            n.ping_timeout_ms,
            n.timeout_ms,
            n.connect_int_ms,
            n.ko_count
        ),
        (10_000, 500, 6_000, 10_000, 7)
    );
    assert_eq!(
        (n.max_buffers, n.max_epoch_size, n.sndbuf_size_bytes),
        (2048, 2048, 0)
    );
    assert_eq!(n.on_congestion, OnCongestion::Block);
    let d = &r.disk;
    assert_eq!(d.on_io_error, OnIoError::PassOn);
    assert_eq!(d.al_extents, 1237);
    assert_eq!(d.resync_rate_bytes_per_s, 250 * 1024);
    assert_eq!(d.c_max_rate_bytes_per_s, 100 << 20);
    assert_eq!(d.c_min_rate_bytes_per_s, 250 * 1024);
    assert_eq!(d.io_engine, IoEngineKind::Sync);
    assert!(!d.direct_io);
    assert_eq!(r.startup.wfc_timeout_s, 0);
    assert_eq!(r.startup.degr_wfc_timeout_s, 60);
}

#[test]
fn resolve_errors() {
    let no_disk = "resource r {\n  device /dev/drbd0;\n  on a { address 10.0.0.1; }\n  on b { address 10.0.0.2; }\n}\n";
    let cfg = parse(no_disk).unwrap();
    assert_eq!(
        cfg.resolve("r", "a").unwrap_err().to_string(),
        "t.conf:3:3: resource 'r' on host 'a': missing 'disk' for volume 0"
    );
    let no_dev = "resource r {\n  disk /dev/sda1;\n  on a { address 10.0.0.1; }\n}\n";
    assert_eq!(
        parse(no_dev)
            .unwrap()
            .resolve("r", "a")
            .unwrap_err()
            .to_string(),
        "t.conf:3:3: resource 'r' on host 'a': missing 'device' for volume 0"
    );
    let no_addr = "resource r {\n  disk /dev/sda1;\n  device minor 0;\n  on a { }\n  on b { address 10.0.0.2; }\n}\n";
    let cfg = parse(no_addr).unwrap();
    assert_eq!(
        cfg.resolve("r", "a").unwrap_err().to_string(),
        "t.conf:4:3: resource 'r' on host 'a': missing 'address'"
    );
    // The peer's missing address is reported too.
    assert_eq!(
        cfg.resolve("r", "b").unwrap_err().to_string(),
        "t.conf:4:3: resource 'r' on host 'a': missing 'address'"
    );
}

#[test]
fn addresses_ipv4_ipv6_and_default_port() {
    let text = "resource r {\n  device minor 0;\n  disk /dev/sda1;\n\
        on a { address ipv6 [fe80::1:2]:7000; }\n  on b { address ipv6 [::1]; }\n  on c { address ipv4 10.1.2.3; }\n\
        on d { address [2001:db8::5]:7001; }\n}\n";
    let cfg = parse(text).unwrap();
    let r = cfg.resolve("r", "a").unwrap();
    assert_eq!(r.this_host.address, sa("[fe80::1:2]:7000"));
    let peers: Vec<SocketAddr> = r.peers.iter().map(|p| p.address).collect();
    assert_eq!(
        peers,
        vec![
            sa("[::1]:7788"),
            sa("10.1.2.3:7788"),
            sa("[2001:db8::5]:7001")
        ]
    );
    assert_eq!(
        err("resource r { on a { address ipv6 ::1:7788; } }"),
        "t.conf:1:34: invalid value '::1:7788' for 'address': IPv6 addresses are written in brackets: [ADDR]:PORT"
    );
    assert_eq!(
        err("resource r { on a { address ipv6 [::1:7788; } }"),
        "t.conf:1:34: invalid value '[::1:7788' for 'address': missing ']' after the IPv6 address"
    );
    assert_eq!(
        err("resource r { on a { address sdp 10.0.0.1:7788; } }"),
        "t.conf:1:29: invalid value 'sdp' for 'address': address family not supported by rdb (use ipv4 or ipv6)"
    );
}

#[test]
fn sizes_and_units() {
    let rate = |v: &str| {
        let cfg = parse(&res(&format!("  disk {{ resync-rate {v}; }}"))).unwrap();
        cfg.resolve("r", "a").unwrap().disk.resync_rate_bytes_per_s
    };
    assert_eq!(rate("100"), 100 * 1024); // default unit KiB/s
    assert_eq!(rate("100K"), 100 * 1024);
    assert_eq!(rate("100k"), 100 * 1024);
    assert_eq!(rate("33M"), 33 << 20);
    assert_eq!(rate("1G"), 1 << 30);
    assert_eq!(rate("2048s"), 2048 * 512);
    let snd = |v: &str| {
        let cfg = parse(&res(&format!("  net {{ sndbuf-size {v}; }}"))).unwrap();
        cfg.resolve("r", "a").unwrap().net.sndbuf_size_bytes
    };
    assert_eq!(snd("131072"), 131_072); // default unit bytes
    assert_eq!(snd("128K"), 131_072);
    assert_eq!(snd("10M"), 10 << 20);
    let e = err(&res("  net { sndbuf-size 11M; }"));
    assert_eq!(
        e,
        "t.conf:7:21: invalid value '11M' for 'sndbuf-size': must be between 0 and 10485760 bytes"
    );
    let e = err(&res("  disk { resync-rate 1T; }"));
    assert!(
        e.starts_with("t.conf:7:22: invalid value '1T' for 'resync-rate': must be between"),
        "{e}"
    );
    let e = err(&res("  disk { resync-rate 18446744073709551615K; }"));
    assert_eq!(
        e,
        "t.conf:7:22: invalid value '18446744073709551615K' for 'resync-rate': size too large"
    );
    let e = err(&res("  disk { resync-rate M; }"));
    assert!(e.contains("expected a size"), "{e}");
    // c-fill-target's default unit is 512-byte sectors.
    let cfg = parse(&res("  disk { c-fill-target 200; }")).unwrap();
    assert_eq!(
        cfg.resolve("r", "a").unwrap().disk.c_fill_target_bytes,
        200 * 512
    );
}

#[test]
fn times_in_drbd_units() {
    let cfg = parse(&res(
        "  net { ping-int 3; ping-timeout 15; timeout 45; connect-int 7; }\n  disk { c-plan-ahead 30; }",
    ))
    .unwrap();
    let r = cfg.resolve("r", "a").unwrap();
    assert_eq!(r.net.ping_int_ms, 3_000);
    assert_eq!(r.net.ping_timeout_ms, 1_500);
    assert_eq!(r.net.timeout_ms, 4_500);
    assert_eq!(r.net.connect_int_ms, 7_000);
    assert_eq!(r.disk.c_plan_ahead_ms, 3_000);
}

#[test]
fn volumes_and_devices() {
    let text = "resource r {\n  meta-disk internal;\n\
        volume 0 { device /dev/drbd10 minor 10; disk /dev/vg/a; }\n\
        volume 5 { device minor 11; disk /dev/vg/b; flexible-meta-disk /dev/vg/m; }\n\
        on a { address 10.0.0.1; }\n  on b { address 10.0.0.2; }\n}\n";
    let r = parse(text).unwrap().resolve("r", "b").unwrap();
    assert_eq!(r.volumes.len(), 2);
    assert_eq!((r.volumes[0].number, r.volumes[0].minor), (0, Some(10)));
    assert_eq!((r.volumes[1].number, r.volumes[1].minor), (5, Some(11)));
    assert_eq!(r.volumes[1].device, PathBuf::from("/dev/rdb11"));
    assert_eq!(
        r.volumes[1].meta_disk,
        MetaDisk::External {
            path: "/dev/vg/m".into(),
            index: None
        }
    );
    // Two volumes on the same disk.
    let text = "resource r {\n  volume 0 { device minor 1; disk /dev/x; }\n  volume 1 { device minor 2; disk /dev/x; }\n  on a { address 10.0.0.1; }\n}\n";
    assert_eq!(
        parse(text).unwrap().resolve("r", "a").unwrap_err().to_string(),
        "t.conf:3:30: duplicate disk '/dev/x' used by two volumes (volume 1) (first defined at t.conf:2:30)"
    );
    assert_eq!(
        err("resource r { volume 0 { } volume 0 { } }"),
        "t.conf:1:27: duplicate volume 0 (first defined at t.conf:1:14)"
    );
    assert_eq!(
        err("resource r { disk none; }"),
        "t.conf:1:19: invalid value 'none' for 'disk': diskless nodes are not supported by rdb"
    );
}

#[test]
fn includes_globs_and_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("conf.d")).unwrap();
    std::fs::write(
        d.join("main.conf"),
        "include \"conf.d/*.res\";\ninclude \"none/*.conf\";\n",
    )
    .unwrap();
    std::fs::write(
        d.join("conf.d/b.res"),
        res("").replace("resource r", "resource b"),
    )
    .unwrap();
    std::fs::write(
        d.join("conf.d/a.res"),
        res("").replace("resource r", "resource a"),
    )
    .unwrap();
    std::fs::write(d.join("conf.d/ignored.txt"), "garbage").unwrap();
    let cfg = load(&d.join("main.conf")).unwrap();
    assert_eq!(cfg.resource_names(), vec!["a".to_string(), "b".to_string()]); // sorted
                                                                              // parse_str resolves includes relative to the given file's directory.
    let cfg = parse_str("include \"conf.d/a.res\";", &d.join("virtual.conf")).unwrap();
    assert_eq!(cfg.resource_names(), vec!["a".to_string()]);
    // Errors in included files name the included file.
    std::fs::write(d.join("bad.conf"), "include \"conf.d/bad.res\";\n").unwrap();
    std::fs::write(
        d.join("conf.d/bad.res"),
        "resource x {\n  net { protocol Z; }\n}\n",
    )
    .unwrap();
    let e = load(&d.join("bad.conf")).unwrap_err().to_string();
    assert!(
        e.ends_with("conf.d/bad.res:2:18: invalid value 'Z' for 'protocol': expected A, B or C"),
        "{e}"
    );
    // A literal include that does not exist is an error at the include.
    std::fs::write(d.join("missing.conf"), "\n  include \"nope.conf\";\n").unwrap();
    let e = load(&d.join("missing.conf")).unwrap_err().to_string();
    assert!(e.contains("missing.conf:2:3: cannot read"), "{e}");
    // Cycle: main -> x -> y -> x.
    std::fs::write(d.join("cyc.conf"), "include \"x.inc\";\n").unwrap();
    std::fs::write(d.join("x.inc"), "global { }\ninclude \"y.inc\";\n").unwrap();
    std::fs::write(d.join("y.inc"), "\n\ninclude \"x.inc\";\n").unwrap();
    let e = load(&d.join("cyc.conf")).unwrap_err();
    assert!(matches!(e, ConfigError::IncludeCycle { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("y.inc:3:1: include cycle: "), "{msg}");
    assert!(msg.ends_with("x.inc"), "{msg}");
    // A file including itself.
    std::fs::write(d.join("self.conf"), "include \"self.conf\";\n").unwrap();
    assert!(matches!(
        load(&d.join("self.conf")),
        Err(ConfigError::IncludeCycle { .. })
    ));
    // Reading a directory or a FIFO fails cleanly instead of hanging.
    let e = load(d).unwrap_err().to_string();
    assert!(e.contains("cannot read"), "{e}");
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = parse_str("include \"fifo\";", &d.join("v.conf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn dump_round_trips() {
    let cfg = load(&data("full.conf")).unwrap();
    let text = cfg.dump(None).unwrap();
    let again = parse_str(&text, Path::new("dump.conf")).unwrap();
    for (r, n) in [
        ("r0", "alpha"),
        ("r0", "beta"),
        ("r1", "alpha"),
        ("r1", "beta"),
    ] {
        assert_eq!(cfg.resolve(r, n).unwrap(), again.resolve(r, n).unwrap());
    }
    // Normalized text is a fixed point.
    assert_eq!(
        again
            .dump(None)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
    );
    let one = cfg.dump(Some("r1")).unwrap();
    assert!(one.starts_with("# resource r1 defined at "), "{one}");
    assert!(
        one.contains("resource r1 {\n    device /dev/rdb7;\n"),
        "{one}"
    );
    assert!(!one.contains("resource r0"));
    assert!(text.contains("shared-secret \"s3cr\\\"et\";"), "{text}");
    assert!(matches!(
        cfg.dump(Some("zz")),
        Err(ConfigError::NoSuchResource { .. })
    ));

    let seed = load(&data("seed003/drbd.conf"))
        .unwrap()
        .dump(Some("webstore"))
        .unwrap();
    assert!(seed.ends_with(
        "resource webstore {\n    device /dev/drbd0;\n    disk /dev/sdb1;\n    flexible-meta-disk internal;\n    on tho-web1 {\n        address 9.1.0.1:7788;\n    }\n    on tho-web2 {\n        address 9.1.0.2:7788;\n    }\n    syncer {\n        rate 500M;\n    }\n}\n\n"
    ), "{seed}");
}

#[test]
fn bounds_hold() {
    // Deep nesting is refused without recursion blow-up.
    let deep = "resource r {".repeat(50_000);
    assert!(matches!(parse(&deep), Err(ConfigError::Limit { .. })));
    // Huge input is refused.
    let huge = "#".repeat(MAX_FILE_BYTES as usize + 1);
    assert!(matches!(parse(&huge), Err(ConfigError::Limit { .. })));
    // A huge unknown word is clipped in the message and gets no suggestion.
    let word = "x".repeat(500_000);
    let e = err(&format!("{word};"));
    assert!(e.len() < 200, "{}", e.len());
    // Warnings serialize for the daemon's JSON output.
    let cfg = parse(&res("  options { cpu-mask 1; }")).unwrap();
    let json = serde_json::to_value(cfg.warnings()).unwrap();
    assert_eq!(json[0]["pos"]["line"], 7);
    assert_eq!(json[0]["pos"]["file"], "t.conf");
    // skip sections are ignored entirely.
    let cfg = parse("skip resource old { anything goes here; on x { } }\nglobal { }").unwrap();
    assert!(cfg.resource_names().is_empty());
}

#[test]
fn drbd83_style_config() {
    let text = r#"resource clusterdb_res {
  protocol C;
  handlers {
    pri-on-incon-degr "/usr/lib/drbd/notify-pri-on-incon-degr.sh; echo b > /proc/sysrq-trigger ; reboot -f";
    fence-peer "/usr/lib/drbd/crm-fence-peer.sh";
  }
  startup { degr-wfc-timeout 120; outdated-wfc-timeout 2; }
  disk { on-io-error detach; }
  net {
    cram-hmac-alg "sha1";
    shared-secret "supersecret!";
    after-sb-0pri disconnect;
    rr-conflict disconnect;
  }
  syncer { rate 10M; al-extents 257; on-no-data-accessible io-error; }
  on sql1 {
    device /dev/drbd0;
    disk /dev/sda4;
    address 10.1.1.53:7788;
    flexible-meta-disk internal;
  }
  on sql2 {
    device /dev/drbd0;
    disk /dev/sda4;
    address 10.1.1.54:7788;
    meta-disk internal;
  }
}
"#;
    let cfg = parse(text).unwrap();
    let r = cfg.resolve("clusterdb_res", "sql2").unwrap();
    assert_eq!(r.net.protocol, Protocol::C);
    assert_eq!(r.net.cram_hmac_alg.as_deref(), Some("sha1"));
    assert_eq!(r.disk.resync_rate_bytes_per_s, 10 << 20);
    assert_eq!(r.disk.al_extents, 257);
    assert_eq!(r.disk.on_io_error, OnIoError::Detach);
    assert_eq!(r.startup.degr_wfc_timeout_s, 120);
    assert_eq!(r.handlers.len(), 2);
    assert_eq!(r.volumes[0].device, PathBuf::from("/dev/drbd0"));
    let w: Vec<String> = cfg.warnings().iter().map(|w| w.message.clone()).collect();
    assert_eq!(
        w,
        vec![
            "keyword rr-conflict is accepted but has no effect in rdb",
            "keyword on-no-data-accessible is accepted but has no effect in rdb",
        ]
    );
}

#[test]
fn on_congestion_settings_and_protocol_a_rule() {
    let cfg = parse(&res(
        "  net {\n    protocol A;\n    on-congestion pull-ahead;\n    congestion-fill 2G;\n    congestion-extents 500;\n  }",
    ))
    .unwrap();
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    let r = cfg.resolve("r", "a").unwrap();
    assert_eq!(r.net.on_congestion, rdb::config::OnCongestion::PullAhead);
    assert_eq!(r.net.congestion_fill_bytes, 2 << 30);
    assert_eq!(r.net.congestion_extents, Some(500));
    // Default unit of congestion-fill: 512-byte sectors, as in DRBD.
    let r = parse(&res(
        "  net { protocol A; on-congestion disconnect; congestion-fill 2048; }",
    ))
    .unwrap()
    .resolve("r", "a")
    .unwrap();
    assert_eq!(r.net.congestion_fill_bytes, 1 << 20);
    // DRBD: pull-ahead and disconnect need protocol A.
    assert_eq!(
        err(&res("  net { on-congestion pull-ahead; }")),
        "t.conf:7:23: invalid value 'pull-ahead' for 'on-congestion': on-congestion pull-ahead/disconnect requires protocol A"
    );
    assert_eq!(
        err(&res("  net { protocol B; on-congestion disconnect; }")),
        "t.conf:7:35: invalid value 'disconnect' for 'on-congestion': on-congestion pull-ahead/disconnect requires protocol A"
    );
}

#[test]
fn busy_poll_budgets_are_bounded_resource_level_extensions() {
    let cfg = parse(&res("  nbd-busy-poll 0;")).unwrap();
    assert_eq!(cfg.resolve("r", "a").unwrap().nbd_busy_poll_us, Some(0));
    let cfg = parse(&res("")).unwrap();
    assert_eq!(cfg.resolve("r", "a").unwrap().nbd_busy_poll_us, None);
    let e = err(&res("  nbd-busy-poll 1001;"));
    assert!(e.starts_with("t.conf:7:"), "{e}");
    assert!(e.contains("nbd-busy-poll"), "{e}");
    let e = err(&res("  nbd-busy-poll 10;\n  nbd-busy-poll 20;"));
    assert!(e.contains("nbd-busy-poll"), "{e}");
    let r = parse(&res("  peer-busy-poll 300;"))
        .unwrap()
        .resolve("r", "a")
        .unwrap();
    assert_eq!((r.peer_busy_poll_us, r.nbd_busy_poll_us), (Some(300), None));
    let e = err(&res("  peer-busy-poll -1;"));
    assert!(e.starts_with("t.conf:7:"), "{e}");
}

#[test]
fn disk_flushes_in_both_spellings() {
    let flushes = |inner: &str| {
        parse(&res(inner))
            .unwrap()
            .resolve("r", "a")
            .unwrap()
            .disk
            .disk_flushes
    };
    assert!(flushes(""));
    assert!(flushes("  disk { disk-flushes yes; }"));
    assert!(!flushes("  disk { disk-flushes no; }"));
    assert!(!flushes("  disk { no-disk-flushes; }"));
    // Neither spelling warns any more: the keyword has an effect.
    let cfg = parse(&res("  disk { no-disk-flushes; }")).unwrap();
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    assert_eq!(
        err(&res("  disk { no-disk-flushes yes; }")),
        "t.conf:7:25: missing ';' after 'no-disk-flushes' (found 'yes')"
    );
    assert_eq!(
        err(&res("  disk { disk-flushes perhaps; }")),
        "t.conf:7:23: invalid value 'perhaps' for 'disk-flushes': expected yes or no"
    );
}
