//! Frontends: how applications reach a volume.
//!
//! - [`nbd`]: an NBD server (fixed newstyle, structured replies) on unix and TCP sockets;
//! - [`kernel_nbd`]: the volume as `/dev/nbdX`, the kernel's NBD client on socketpairs
//!   served by [`nbd`] (generic netlink, ioctl fallback); [`kernel_nbd_genl`] is the
//!   generic netlink encoding it uses;
//! - [`ublk`]: the volume as `/dev/ublkbN` through libublk (user recovery);
//! - [`fuse`]: the volume as one file in a FUSE mount, attached to a loop device, for
//!   kernels without nbd or ublk.
//!
//! Every frontend serves an `Arc<dyn BlockIo>` and nothing else.

pub mod fuse;
pub mod kernel_nbd;
pub mod kernel_nbd_genl;
pub mod nbd;
pub mod ublk;
