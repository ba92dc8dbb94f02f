//! Waits and checks on a two-node [`Cluster`] shared by the replication tests:
//! `status --json` polling with a failure message that shows both nodes, the
//! in-sync condition, skipping the initial sync of fresh disks, comparing the two
//! data areas.

use std::time::Duration;

use super::{sha256_of, wait_for, Cluster};

impl Cluster {
    /// Both nodes' `status --json` and log tails, for a failure message.
    pub fn dump(&self) -> String {
        format!(
            "alpha: {}\nbeta: {}\nalpha log:\n{}\nbeta log:\n{}",
            self.status("alpha"),
            self.status("beta"),
            self.log_tail("alpha"),
            self.log_tail("beta")
        )
    }

    /// Polls `f` for `timeout_s` seconds; fails with `what` and [`Cluster::dump`]
    /// if it never holds.
    pub fn wait_or_dump(&self, timeout_s: u64, what: &str, f: impl FnMut() -> bool) {
        assert!(
            wait_for(Duration::from_secs(timeout_s), f),
            "{what} (after {timeout_s} s)\n{}",
            self.dump()
        );
    }

    /// Both nodes Connected and UpToDate, nothing out of sync (no resync running).
    pub fn in_sync(&self) -> bool {
        let (a, b) = (self.status("alpha"), self.status("beta"));
        a["connection"] == "Connected"
            && b["connection"] == "Connected"
            && a["disk"] == "UpToDate"
            && b["disk"] == "UpToDate"
            && a["out_of_sync_bytes"] == 0
            && b["out_of_sync_bytes"] == 0
    }

    /// Waits up to `timeout_s` seconds for [`Cluster::in_sync`]; `what` says after what.
    pub fn wait_in_sync(&self, timeout_s: u64, what: &str) {
        self.wait_or_dump(timeout_s, &format!("{what}: not in sync"), || {
            self.in_sync()
        });
    }

    /// Both nodes see the connection as Connected.
    pub fn connected(&self) -> bool {
        self.status("alpha")["connection"] == "Connected"
            && self.status("beta")["connection"] == "Connected"
    }

    /// With both nodes up: waits until they are connected, skips the initial sync
    /// of the (all-zero) new disks with `new-current-uuid --clear-bitmap` on alpha
    /// and waits until both are UpToDate.
    pub fn skip_initial_sync(&self) {
        self.wait_or_dump(30, "never connected", || self.connected());
        let out = self.adm_ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
        assert!(out.contains("initial sync skipped"), "{out}");
        self.wait_or_dump(30, "not in sync after new-current-uuid", || self.in_sync());
        assert_eq!(
            self.status("alpha")["uuids"]["current"],
            self.status("beta")["uuids"]["current"],
            "both nodes share the new generation"
        );
    }

    /// New meta-data on both nodes, both up, the initial sync skipped
    /// ([`Cluster::skip_initial_sync`]), alpha Primary.
    pub fn fresh_pair_with_primary(&self) {
        for n in ["alpha", "beta"] {
            self.adm_ok(n, &["create-md", "--force", "r0"]);
            self.adm_ok(n, &["up", "r0"]);
        }
        self.skip_initial_sync();
        self.adm_ok("alpha", &["primary", "r0"]);
    }

    /// The size of the data area, from alpha's status.
    pub fn data_size(&self) -> u64 {
        self.status("alpha")["size_bytes"]
            .as_u64()
            .expect("size_bytes in status --json")
    }

    /// Asserts that the first `size_bytes` (the data area) of both backing files
    /// are identical; `what` says when.
    pub fn assert_same_data(&self, size_bytes: u64, what: &str) {
        assert_eq!(
            sha256_of(&self.img("alpha"), Some(size_bytes)),
            sha256_of(&self.img("beta"), Some(size_bytes)),
            "the data areas of the two backing disks differ: {what}"
        );
    }

    /// Adds `text` (e.g. `handlers { ... }` naming a file in [`Cluster::dir`]) to
    /// the resource section of the config.
    pub fn add_to_resource(&self, text: &str) {
        let conf = std::fs::read_to_string(&self.conf)
            .expect("read the config")
            .replacen(
                "flexible-meta-disk internal;",
                &format!("flexible-meta-disk internal;\n    {text}"),
                1,
            );
        std::fs::write(&self.conf, conf).expect("write the config");
    }
}
