//! The control protocol between `rdbadm` and `rdbd`.
//!
//! JSON lines over the unix socket `<run-dir>/rdbd.sock` (mode 0666; who may change
//! state is checked per connection, see `daemon::access`): the client
//! writes one [`Request`] line, the daemon answers one [`Response`] line, and either
//! side may close. The protocol is versioned (`v`); the daemon refuses a version it
//! does not speak. [`ResourceStatus`] is the structure `status --json` prints, the
//! same one the daemon keeps.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::Counters;

mod metrics;
pub use self::metrics::render_prometheus;

/// Version of the control protocol.
pub const PROTOCOL_VERSION: u32 = 1;
/// File name of the control socket inside the run dir.
pub const SOCKET_NAME: &str = "rdbd.sock";
/// Longest request or response line accepted, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Path of the control socket for a run dir.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// A command for the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Liveness check.
    Ping,
    /// Attach the disk, start the frontends and (later) connect.
    Up {
        /// Resource name.
        resource: String,
    },
    /// Demote if needed, stop everything of the resource.
    Down {
        /// Resource name.
        resource: String,
    },
    /// Promote.
    Primary {
        /// Resource name.
        resource: String,
        /// Make this node's data authoritative.
        force: bool,
    },
    /// Demote.
    Secondary {
        /// Resource name.
        resource: String,
    },
    /// Start connecting to the peer (after `disconnect`).
    Connect {
        /// Resource name.
        resource: String,
        /// Discard this node's data in a split brain (become SyncTarget).
        #[serde(default)]
        discard_my_data: bool,
    },
    /// Drop the connection and stay StandAlone.
    Disconnect {
        /// Resource name.
        resource: String,
    },
    /// Status of one resource, or all when `None`.
    Status {
        /// Resource name.
        resource: Option<String>,
    },
    /// Stop the daemon (after `down` of every resource).
    Shutdown,
    /// An administrative action on a resource (changes state).
    Admin {
        /// Resource name.
        resource: String,
        /// What to do.
        action: AdminAction,
    },
}

/// Administrative actions of `rdbadm` beyond up/down/role changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminAction {
    /// Discard this node's data: full sync from the peer.
    Invalidate,
    /// Discard the peer's data: full sync to the peer.
    InvalidateRemote,
    /// Start a new data generation; with `clear_bitmap` on a fresh connected pair,
    /// skip the initial sync.
    NewCurrentUuid {
        /// Skip the initial sync (both disks must be new).
        clear_bitmap: bool,
    },
    /// Mark a Secondary's data Outdated.
    Outdate,
    /// Start online verify against the peer.
    Verify,
}

impl Command {
    /// Whether the command only reads (served to anyone who can reach the socket);
    /// the others change roles or states (root or the `control-group` only).
    pub fn is_read_only(&self) -> bool {
        matches!(self, Command::Ping | Command::Status { .. })
    }

    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::Up { .. } => "up",
            Command::Down { .. } => "down",
            Command::Primary { .. } => "primary",
            Command::Secondary { .. } => "secondary",
            Command::Connect { .. } => "connect",
            Command::Disconnect { .. } => "disconnect",
            Command::Status { .. } => "status",
            Command::Shutdown => "shutdown",
            Command::Admin { .. } => "admin",
        }
    }
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version.
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub command: Command,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// A message for the user (an error when `ok` is false).
    #[serde(default)]
    pub message: String,
    /// Warnings to print on stderr.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Resource status (for `status`, and after state changes).
    #[serde(default)]
    pub resources: Vec<ResourceStatus>,
}

impl Response {
    /// A success with a message.
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: message.into(),
            warnings: Vec::new(),
            resources: Vec::new(),
        }
    }

    /// A failure with a message.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            message: message.into(),
            warnings: Vec::new(),
            resources: Vec::new(),
        }
    }
}

/// Status of one resource on one node, as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceStatus {
    /// Resource name.
    pub name: String,
    /// This node's name.
    pub node: String,
    /// Role: Primary, Secondary, or Unconfigured when the resource is down.
    pub role: String,
    /// Local disk state (UpToDate, Inconsistent, ..., Diskless).
    pub disk: String,
    /// Connection state (StandAlone, Connecting, Connected, SyncSource, ...).
    pub connection: String,
    /// The peer's name, if one is configured.
    pub peer: Option<String>,
    /// The peer's role (Unknown when not connected).
    pub peer_role: String,
    /// The peer's disk (DUnknown when not connected).
    pub peer_disk: String,
    /// Why the connection is not established (authentication failure, refusal...).
    #[serde(default)]
    pub connection_error: Option<String>,
    /// Replication protocol (A, B or C).
    pub protocol: String,
    /// Size of the device in bytes.
    pub size_bytes: u64,
    /// The configured device path.
    pub device: String,
    /// The device minor, if known.
    pub minor: Option<u32>,
    /// The NBD unix socket.
    pub nbd_socket: String,
    /// The TCP NBD listener, if configured.
    pub nbd_tcp: Option<String>,
    /// The block-device frontend in use (`fuse+loop`, `none`, ...).
    pub frontend: String,
    /// Why this frontend was chosen (or why the device is missing).
    pub frontend_reason: String,
    /// The kernel device behind the device path (e.g. /dev/loop3), when present.
    pub backing_device: Option<String>,
    /// The backing disk.
    pub disk_path: String,
    /// The storage engine in use (sync, uring).
    pub io_engine: String,
    /// Bytes that may differ from the peer.
    pub out_of_sync_bytes: u64,
    /// Bytes sent or received by resync since `up`.
    pub resync_bytes_total: u64,
    /// Generation UUIDs as hex strings.
    pub uuids: Uuids,
    /// DRBD counters.
    pub counters: Counters,
    /// Number of NBD clients connected.
    pub nbd_clients: usize,
    /// The resync in progress (SyncSource or SyncTarget), if any.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// The online verify this node runs (VerifyS), if any.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    /// Crashed while Primary and not resynced since (activity log replayed).
    #[serde(default)]
    pub crashed_primary: bool,
}

/// Progress of a resync, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// This node sends (SyncSource) or receives (SyncTarget).
    pub source: bool,
    /// Bytes to resync when it started.
    pub total_bytes: u64,
    /// Bytes still out of sync.
    pub remaining_bytes: u64,
    /// Done, in percent of `total_bytes`.
    pub done_percent: f64,
    /// Average speed since the start.
    pub speed_bytes_per_s: u64,
    /// Estimated seconds to go (None until some progress).
    pub eta_s: Option<u64>,
    /// Seconds since it started.
    pub elapsed_s: f64,
}

/// Progress of online verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// Bytes compared.
    pub done_bytes: u64,
    /// Device size.
    pub total_bytes: u64,
    /// Bytes found out of sync so far.
    pub found_bytes: u64,
    /// Done, in percent.
    pub done_percent: f64,
}

/// Generation UUIDs for display.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Uuids {
    /// Current UUID.
    pub current: String,
    /// Bitmap UUID.
    pub bitmap: String,
    /// History UUIDs.
    pub history: Vec<String>,
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens on the run dir's socket.
    #[error("rdbd is not running for run dir {0} (no control socket answers)")]
    NotRunning(PathBuf),
    /// Socket I/O failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon's answer was not valid.
    #[error("invalid answer from rdbd: {0}")]
    BadAnswer(String),
}

/// Sends one command and waits for its answer (blocking; for `rdbadm`).
pub fn call(run_dir: &Path, command: Command, timeout: Duration) -> Result<Response, ControlError> {
    let path = socket_path(run_dir);
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning(run_dir.to_path_buf())
        }
        _ => io_err(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let request = Request {
        v: PROTOCOL_VERSION,
        command,
    };
    let mut line =
        serde_json::to_vec(&request).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_err)?;
    let mut reader = BufReader::new(&stream).take(MAX_LINE_BYTES as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io_err)?;
    if answer.is_empty() {
        return Err(ControlError::BadAnswer(
            "connection closed without an answer".into(),
        ));
    }
    serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_as_one_json_line() {
        let r = Request {
            v: PROTOCOL_VERSION,
            command: Command::Primary {
                resource: "r0".into(),
                force: true,
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"v":1,"cmd":"primary","resource":"r0","force":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }
}
