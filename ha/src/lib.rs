//! rdb-ha: a Heartbeat v1 style membership and resource-group daemon for rdb.
//!
//! - [`config`]: `ha.cf`, `haresources`, `authkeys` parsing and validation;
//! - [`auth`]: packet signing, MAC verification and replay protection;
//! - [`machine`]: the sans-IO membership and resource-group state machine;
//! - [`agents`], [`net`], [`checks`], [`daemon`]: the I/O edges (resource agents,
//!   UDP links and gratuitous ARP, health checks and ping, the runtime loop and the
//!   control socket).

pub mod agents;
pub mod auth;
pub mod checks;
pub mod config;
pub mod daemon;
pub mod machine;
pub mod net;
