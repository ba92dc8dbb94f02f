//! Incompatible net settings (DRBD's "incompatible after-sb-0pri settings"): both
//! real daemons go StandAlone with the reason in `status --json`, stay there (no
//! retry every connect-int), and `rdbadm connect` tries again (and is refused again).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure

mod common;

use std::time::{Duration, Instant};

use common::*;

const REASON: &str = "incompatible after-sb-0pri settings";

/// Connection attempts a node refused for incompatible settings so far (one log
/// line each).
fn refusals(c: &Cluster, node: &str) -> usize {
    std::fs::read_to_string(c.run_dir(node).join("rdbd.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("cannot connect: incompatible after-sb-0pri settings"))
        .count()
}

/// StandAlone with the incompatibility as the connection error.
fn refused(s: &serde_json::Value) -> bool {
    s["connection"] == "StandAlone"
        && s["connection_error"]
            .as_str()
            .is_some_and(|e| e.contains(REASON))
}

#[test]
fn incompatible_after_sb_0pri_leaves_both_nodes_stand_alone_until_connect() {
    need_root();
    // connect-int 1 s: before the fix a refused node retried every second.
    let c = Cluster::new(
        "compat",
        "C",
        "16M",
        "after-sb-0pri disconnect; connect-int 1;",
    );
    let text = std::fs::read_to_string(&c.conf).unwrap();
    let alpha_text = text.replace(
        "after-sb-0pri disconnect;",
        "after-sb-0pri discard-least-changes;",
    );
    assert_ne!(text, alpha_text);
    let alpha_conf = c.dir.join("alpha.conf");
    std::fs::write(&alpha_conf, alpha_text).unwrap();
    let adm_alpha = |args: &[&str]| c.adm_with_ok("alpha", &alpha_conf, args);
    let status_alpha = || {
        let out = adm_alpha(&["status", "r0", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["resources"][0].clone()
    };
    c.adm_ok("beta", &["create-md", "r0"]);
    c.adm_ok("beta", &["up", "r0"]);
    adm_alpha(&["create-md", "r0"]);
    adm_alpha(&["up", "r0"]);
    let both_refused = |n: usize| {
        refused(&status_alpha())
            && refused(&c.status("beta"))
            && refusals(&c, "alpha") == n
            && refusals(&c, "beta") == n
    };
    assert!(
        wait_for(Duration::from_secs(10), || both_refused(1)),
        "not both StandAlone with {REASON:?}: alpha {} / beta {}\nalpha log:\n{}\nbeta log:\n{}",
        status_alpha(),
        c.status("beta"),
        c.log_tail("alpha"),
        c.log_tail("beta")
    );
    let text = c.status("beta")["connection_error"].to_string();
    assert!(
        text.contains("ours disconnect, peer discard-least-changes"),
        "{text}"
    );
    // A bounded observation window (3 connect-int periods): no new attempt.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            both_refused(1),
            "left StandAlone or retried by itself: alpha {} ({} refusals) / beta {} ({} refusals)",
            status_alpha(),
            refusals(&c, "alpha"),
            c.status("beta"),
            refusals(&c, "beta")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // `connect` on both (the acceptor first): one more attempt each, refused again.
    c.adm_ok("beta", &["connect", "r0"]);
    adm_alpha(&["connect", "r0"]);
    assert!(
        wait_for(Duration::from_secs(10), || both_refused(2)),
        "connect did not try again once: alpha {} ({} refusals) / beta {} ({} refusals)",
        status_alpha(),
        refusals(&c, "alpha"),
        c.status("beta"),
        refusals(&c, "beta")
    );
}
