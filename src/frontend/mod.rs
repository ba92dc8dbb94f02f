//! Frontends: how applications reach a volume.
//!
//! - [`nbd`]: an NBD server (fixed newstyle, structured replies) on unix and TCP sockets;
//! - [`fuse`]: the volume as one file in a FUSE mount, attached to a loop device, for
//!   kernels without nbd or ublk.
//!
//! Every frontend serves an `Arc<dyn BlockIo>` and nothing else.

pub mod fuse;
pub mod nbd;
