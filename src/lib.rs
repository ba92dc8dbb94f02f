//! rdb: a replicated block device in user space.
//!
//! The crate is layered from the disk up (see `docs/architecture.md`):
//!
//! - [`storage`]: the [`storage::BlockIo`] trait and the engines that reach a backing disk;
//! - [`meta`]: the on-disk meta-data (superblock, activity log, bitmap, generation UUIDs);
//! - [`config`]: DRBD-syntax configuration, parsed with positions for every error;
//! - [`engine`]: the replicated volume, a state machine driven by events;
//! - [`peer`]: the replication transport between nodes;
//! - [`frontend`]: what applications open: an NBD server, FUSE + loop;
//! - [`control`]: the JSON-lines protocol between `rdbadm` and `rdbd`;
//! - [`daemon`]: `rdbd` itself, which owns the resources of one node;
//! - [`spin`]: the bounded busy-wait shared by the busy-polls.

pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod frontend;
pub mod meta;
pub mod peer;
pub mod spin;
pub mod storage;
