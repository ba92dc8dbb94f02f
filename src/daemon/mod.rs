//! rdbd: the daemon that runs the resources of one node.
//!
//! It owns the control socket of its run dir (see [`crate::control`]) and a table of
//! the resources that are up. Commands are executed one at a time (a state change
//! never interleaves with another); `status` reads snapshots. The daemon exits when
//! the last resource goes down or on `Shutdown`.
//!
//! Layers: [`server`] accepts control connections and decodes lines; [`resource`]
//! carries out `up`, `down`, `primary`, `secondary` for one resource;
//! [`replication`] keeps its link to the peer.

pub mod access;
pub mod io_error;
pub mod replication;
pub mod resource;
pub mod server;

use std::path::{Path, PathBuf};

pub use self::server::{run, DaemonError};

/// Where a daemon finds its configuration and keeps its runtime files.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The configuration file (DRBD syntax).
    pub config_path: PathBuf,
    /// This node's name (selects the `on NAME` sections).
    pub node: String,
    /// Directory of the control socket, NBD sockets, FUSE mounts and log.
    pub run_dir: PathBuf,
}

/// Default run dir.
pub const DEFAULT_RUN_DIR: &str = "/run/rdb";

/// This machine's host name, the default node name.
pub fn default_node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for writes of buf.len() bytes; gethostname writes at most
    // that many bytes and we only read up to the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Path of the NBD unix socket of a resource.
pub fn nbd_socket_path(run_dir: &Path, resource: &str) -> PathBuf {
    run_dir.join(format!("{resource}.nbd"))
}

/// Path of the daemon's log file (stderr of a daemon started by `rdbadm up`).
pub fn log_path(run_dir: &Path) -> PathBuf {
    run_dir.join("rdbd.log")
}
