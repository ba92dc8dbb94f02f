//! The resolved, typed configuration of one resource on one node, with DRBD 8.4 defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

/// Defines a keyword enum: variants with their DRBD spelling, `ALL`, `as_str`, Display,
/// and serde names equal to the DRBD spelling.
macro_rules! kw_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $var),+
        }
        impl $name {
            /// Every value with its spelling in the configuration file.
            pub const ALL: &'static [(&'static str, $name)] = &[$(($s, $name::$var)),+];
            /// The spelling in the configuration file.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

kw_enum! {
    /// Replication protocol: when a write counts as complete (default C).
    #[derive(Default)]
    Protocol {
        /// Local disk done and data in the local send buffer.
        A = "A",
        /// Local disk done and the peer received the data.
        B = "B",
        /// Local disk done and the peer wrote the data.
        #[default]
        C = "C",
    }
}

kw_enum! {
    /// What applications open on the Primary (default auto).
    #[derive(Default)]
    FrontendKind {
        /// The best frontend available on this machine.
        #[default]
        Auto = "auto",
        /// NBD server (unix socket, plus TCP if `nbd-listen` is set).
        Nbd = "nbd",
        /// ublk device.
        Ublk = "ublk",
        /// FUSE file (+ loop device).
        Fuse = "fuse",
        /// No frontend (replication only).
        None = "none",
    }
}

kw_enum! {
    /// How the backing disk is driven (rdb extension `io-engine`).
    IoEngineKind {
        /// io_uring.
        Uring = "uring",
        /// Blocking pread/pwrite on a thread pool.
        Sync = "sync",
    }
}

kw_enum! {
    /// `on-io-error`: reaction to a local disk error.
    OnIoError {
        /// Report the error to the upper layer.
        PassOn = "pass_on",
        /// Run the `local-io-error` handler.
        CallLocalIoError = "call-local-io-error",
        /// Detach the disk and serve I/O through the peer.
        Detach = "detach",
    }
}

kw_enum! {
    /// `on-congestion`: what protocol A does when the send buffer is full.
    OnCongestion {
        /// Wait.
        Block = "block",
        /// Go Ahead of the peer and resync later.
        PullAhead = "pull-ahead",
        /// Drop the connection.
        Disconnect = "disconnect",
    }
}

kw_enum! {
    /// `after-sb-0pri`: split brain recovery when no node is Primary.
    AfterSb0Pri {
        /// Do not recover automatically.
        Disconnect = "disconnect",
        /// Discard the node that was Primary last.
        DiscardYoungerPrimary = "discard-younger-primary",
        /// Discard the node that was Primary first.
        DiscardOlderPrimary = "discard-older-primary",
        /// Discard the node without changes, if one has none.
        DiscardZeroChanges = "discard-zero-changes",
        /// Discard the node with fewer changed blocks.
        DiscardLeastChanges = "discard-least-changes",
        /// Discard this node's data.
        DiscardLocal = "discard-local",
        /// Discard the peer's data.
        DiscardRemote = "discard-remote",
    }
}

kw_enum! {
    /// `after-sb-1pri`: split brain recovery when one node is Primary.
    AfterSb1Pri {
        /// Do not recover automatically.
        Disconnect = "disconnect",
        /// Discard the Secondary if the 0pri policy agrees, else disconnect.
        Consensus = "consensus",
        /// Apply the 0pri policy even if it discards the Primary's data.
        ViolentlyAs0p = "violently-as0p",
        /// Discard the Secondary.
        DiscardSecondary = "discard-secondary",
        /// Apply the 0pri policy; a losing Primary runs `pri-lost-after-sb`.
        CallPriLostAfterSb = "call-pri-lost-after-sb",
    }
}

kw_enum! {
    /// `after-sb-2pri`: split brain recovery when both nodes are Primary.
    AfterSb2Pri {
        /// Do not recover automatically.
        Disconnect = "disconnect",
        /// Apply the 0pri policy even if it discards a Primary's data.
        ViolentlyAs0p = "violently-as0p",
        /// Apply the 0pri policy; the losing Primary runs `pri-lost-after-sb`.
        CallPriLostAfterSb = "call-pri-lost-after-sb",
    }
}

/// Where the meta-data (superblock, activity log, bitmap) lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetaDisk {
    /// At the end of the backing disk.
    Internal,
    /// On another device or file; `index` is the 128 MiB slot of `meta-disk PATH [IDX]`,
    /// `None` for `flexible-meta-disk PATH` (or `meta-disk PATH`), sized to the disk.
    External {
        /// The meta-data device or file.
        path: PathBuf,
        /// Fixed-size slot index, if any.
        index: Option<u32>,
    },
}

/// One node of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostConfig {
    /// Host name as in `on NAME`.
    pub name: String,
    /// Replication address.
    pub address: SocketAddr,
}

/// One replicated volume of a resource on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeConfig {
    /// Volume number (0 when the resource has no `volume` blocks).
    pub number: u32,
    /// Device path applications open (`/dev/rdbN` for `device minor N;`).
    pub device: PathBuf,
    /// Minor number, when given or derivable from a `/dev/drbdN` or `/dev/rdbN` path.
    pub minor: Option<u32>,
    /// Backing disk.
    pub disk: PathBuf,
    /// Meta-data location.
    pub meta_disk: MetaDisk,
}

/// `net { }` settings (times in ms, sizes in bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetConfig {
    /// Replication protocol (default C).
    pub protocol: Protocol,
    /// HMAC digest for peer authentication (e.g. `sha256`).
    pub cram_hmac_alg: Option<String>,
    /// Shared secret for peer authentication.
    pub shared_secret: Option<String>,
    /// Idle time before a keep-alive ping (default 10 s).
    pub ping_int_ms: u64,
    /// Time the peer has to answer a ping (default 500 ms).
    pub ping_timeout_ms: u64,
    /// Time the peer has to answer a request (default 6 s).
    pub timeout_ms: u64,
    /// Interval between connection attempts (default 10 s).
    pub connect_int_ms: u64,
    /// Timeouts of one request before the peer is dropped (default 7, 0 = never).
    pub ko_count: u32,
    /// TCP send buffer (0 = kernel auto-tuning).
    pub sndbuf_size_bytes: u64,
    /// TCP receive buffer (0 = kernel auto-tuning).
    pub rcvbuf_size_bytes: u64,
    /// Bound of receive buffers, in 4 KiB pages (default 2048).
    pub max_buffers: u32,
    /// Most writes between two barriers (default 2048).
    pub max_epoch_size: u32,
    /// Dual-primary opt-in.
    pub allow_two_primaries: bool,
    /// Split brain policy with no Primary.
    pub after_sb_0pri: AfterSb0Pri,
    /// Split brain policy with one Primary.
    pub after_sb_1pri: AfterSb1Pri,
    /// Split brain policy with two Primaries.
    pub after_sb_2pri: AfterSb2Pri,
    /// Per-block digest on the wire.
    pub data_integrity_alg: Option<String>,
    /// Checksum-based resync digest.
    pub csums_alg: Option<String>,
    /// Online verify digest.
    pub verify_alg: Option<String>,
    /// Protocol A congestion policy (default block).
    pub on_congestion: OnCongestion,
    /// `congestion-fill`: bytes in flight to the peer that count as congestion
    /// (default 0: not checked).
    pub congestion_fill_bytes: u64,
    /// `congestion-extents`: activity-log extents in use that count as congestion
    /// (default: `al-extents`).
    pub congestion_extents: Option<u32>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            protocol: Protocol::C,
            cram_hmac_alg: None,
            shared_secret: None,
            ping_int_ms: 10_000,
            ping_timeout_ms: 500,
            timeout_ms: 6_000,
            connect_int_ms: 10_000,
            ko_count: 7,
            sndbuf_size_bytes: 0,
            rcvbuf_size_bytes: 0,
            max_buffers: 2048,
            max_epoch_size: 2048,
            allow_two_primaries: false,
            after_sb_0pri: AfterSb0Pri::Disconnect,
            after_sb_1pri: AfterSb1Pri::Disconnect,
            after_sb_2pri: AfterSb2Pri::Disconnect,
            data_integrity_alg: None,
            csums_alg: None,
            verify_alg: None,
            on_congestion: OnCongestion::Block,
            congestion_fill_bytes: 0,
            congestion_extents: None,
        }
    }
}

/// `disk { }` settings (and the 8.3 `syncer { }` ones that moved there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskConfig {
    /// Reaction to a local disk error (default pass_on).
    pub on_io_error: OnIoError,
    /// Activity log size in 4 MiB extents (default 1237).
    pub al_extents: u32,
    /// Fixed resync rate (default 250 KiB/s).
    pub resync_rate_bytes_per_s: u64,
    /// Resync controller planning horizon (default 2 s; 0 = fixed rate).
    pub c_plan_ahead_ms: u64,
    /// Resync data the controller keeps in flight (default 100 sectors = 50 KiB).
    pub c_fill_target_bytes: u64,
    /// Controller's ceiling (default 100 MiB/s).
    pub c_max_rate_bytes_per_s: u64,
    /// Resync rate kept while applications do I/O (default 250 KiB/s).
    pub c_min_rate_bytes_per_s: u64,
    /// Backing disk engine (rdb extension, default uring).
    pub io_engine: IoEngineKind,
    /// Open the backing disk with O_DIRECT (rdb extension, default no).
    pub direct_io: bool,
    /// Keep the activity log (default yes; `no` means a full resync after a
    /// Primary crash).
    pub al_updates: bool,
    /// Flush the backing disk at each epoch boundary before acknowledging the
    /// Primary's barrier (default yes; `no` only for a write cache that survives a
    /// power loss).
    pub disk_flushes: bool,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            on_io_error: OnIoError::PassOn,
            al_extents: 1237,
            resync_rate_bytes_per_s: 250 * 1024,
            c_plan_ahead_ms: 2_000,
            c_fill_target_bytes: 100 * 512,
            c_max_rate_bytes_per_s: 100 * 1024 * 1024,
            c_min_rate_bytes_per_s: 250 * 1024,
            io_engine: IoEngineKind::Sync,
            direct_io: false,
            al_updates: true,
            disk_flushes: true,
        }
    }
}

/// `startup { }` settings (seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartupConfig {
    /// How long `up` waits for the peer (0 = forever).
    pub wfc_timeout_s: u64,
    /// Same, when the node was part of a degraded cluster before (default 60).
    pub degr_wfc_timeout_s: u64,
    /// Same, when the peer was outdated (0 = forever).
    pub outdated_wfc_timeout_s: u64,
    /// Keep waiting after a split brain was detected.
    pub wait_after_sb: bool,
    /// Hosts that become Primary on startup (`both` allowed).
    pub become_primary_on: Vec<String>,
}

impl Default for StartupConfig {
    fn default() -> Self {
        StartupConfig {
            wfc_timeout_s: 0,
            degr_wfc_timeout_s: 60,
            outdated_wfc_timeout_s: 0,
            wait_after_sb: false,
            become_primary_on: Vec::new(),
        }
    }
}

/// Everything the daemon needs to run one resource on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceConfig {
    /// Resource name.
    pub name: String,
    /// The node it was resolved for.
    pub node: String,
    /// Volumes, sorted by number (at least one).
    pub volumes: Vec<VolumeConfig>,
    /// This node.
    pub this_host: HostConfig,
    /// The other `on` sections.
    pub peers: Vec<HostConfig>,
    /// Network settings.
    pub net: NetConfig,
    /// Disk and resync settings.
    pub disk: DiskConfig,
    /// Startup settings.
    pub startup: StartupConfig,
    /// Handler name -> shell command.
    pub handlers: BTreeMap<String, String>,
    /// Frontend (rdb extension, default auto).
    pub frontend: FrontendKind,
    /// TCP NBD listener (rdb extension; the unix socket is always there).
    pub nbd_listen: Option<SocketAddr>,
    /// Queues of a ublk device / sockets of a kernel NBD device (rdb extension
    /// `frontend-queues`; default: the frontend's own).
    pub frontend_queues: Option<u32>,
    /// Depth of each ublk queue (rdb extension `frontend-queue-depth`).
    pub frontend_queue_depth: Option<u32>,
    /// How long an idle NBD connection of a queue-depth-1 client busy-polls for
    /// its next request, in µs (rdb extension `nbd-busy-poll`; default
    /// [`crate::frontend::nbd::DEFAULT_BUSY_POLL_US`], 0 turns it off).
    pub nbd_busy_poll_us: Option<u32>,
    /// How long a runtime worker busy-polls the peer connection's socket before it
    /// sleeps, in µs (rdb extension `peer-busy-poll`; default
    /// [`crate::peer::park_poll::DEFAULT_PEER_BUSY_POLL_US`], 0 turns it off).
    pub peer_busy_poll_us: Option<u32>,
}
