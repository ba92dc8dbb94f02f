//! The vocabulary of states, in DRBD's words.
//!
//! These enums are what `rdbadm status` prints and what the engine reasons about:
//! a node's [`Role`], the state of its [`DiskState`] and of its [`ConnState`]. Their
//! `Display` is the exact word DRBD users know (`Primary`, `UpToDate`,
//! `WFConnection` is shown as `Connecting` as in DRBD 9).

use std::fmt;

use serde::Serialize;

/// Role of a node for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    /// Serves I/O to applications.
    Primary,
    /// Receives the Primary's writes; refuses application I/O.
    Secondary,
    /// The peer's role when it is not connected.
    Unknown,
}

/// State of a node's local (or peer) disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum DiskState {
    /// No disk attached.
    Diskless,
    /// Reading meta-data.
    Attaching,
    /// Data is not usable (fresh, or in the middle of a resync as target).
    Inconsistent,
    /// Consistent, but known to be older than the peer's.
    Outdated,
    /// The peer's disk when it is not connected.
    DUnknown,
    /// Consistent, freshness unknown until the peer is seen.
    Consistent,
    /// Consistent and current.
    UpToDate,
}

/// State of the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConnState {
    /// Not trying to connect (`disconnect`, or no peer configured).
    StandAlone,
    /// Tearing the connection down.
    Disconnecting,
    /// Waiting for the peer (DRBD 8.4's WFConnection).
    Connecting,
    /// Connected, no resync running.
    Connected,
    /// Connected, sending a resync.
    SyncSource,
    /// Connected, receiving a resync.
    SyncTarget,
    /// Connected, running online verify as its initiator.
    VerifyS,
    /// Connected, answering an online verify.
    VerifyT,
    /// Connected, `on-congestion pull-ahead`: writes are marked out of sync instead
    /// of sent, until a resync catches the peer up.
    Ahead,
    /// Connected, the peer is Ahead: our data is Outdated until its resync.
    Behind,
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(Role, DiskState, ConnState);

impl DiskState {
    /// Whether data on this disk may be served to applications.
    pub fn is_usable(self) -> bool {
        matches!(self, DiskState::UpToDate | DiskState::Consistent)
    }
}

impl ConnState {
    /// Whether a peer is connected (in any sub-state).
    pub fn is_connected(self) -> bool {
        matches!(
            self,
            ConnState::Connected
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::VerifyS
                | ConnState::VerifyT
                | ConnState::Ahead
                | ConnState::Behind
        )
    }
}
