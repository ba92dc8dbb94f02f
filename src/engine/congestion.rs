//! `on-congestion` (DRBD 8.4 `net { on-congestion; congestion-fill;
//! congestion-extents; }`): what a protocol A Primary does when its peer falls
//! behind.
//!
//! This module owns the congestion check and the Ahead/Behind states:
//!
//! - `block` (default): nothing here; the connection's bounded queue applies
//!   back-pressure, so application writes wait for the peer.
//! - `pull-ahead`: when the bytes sent to the peer and not yet proven stable there
//!   (queued, on the wire, or in the transfer log: DRBD's `ap_in_flight`) reach
//!   `congestion-fill`, or the activity log has `congestion-extents` extents with
//!   writes in flight, the Primary goes `Ahead`: new writes are written locally,
//!   marked out of sync and announced to the peer with an `OutOfSync` frame instead
//!   of their data. The peer goes `Behind` (its disk `Outdated`). Once everything
//!   sent before was acknowledged and [`AHEAD_TO_SYNC_MS`] passed, the engine asks
//!   for a bitmap resync ([`Action::StartResync`]); `Ahead` becomes `SyncSource`,
//!   then `Connected`.
//! - `disconnect`: the same thresholds drop the connection
//!   ([`Action::DropConnection`]); the writes the peer misses are marked out of sync
//!   as for any connection loss, and the next connection resyncs them.
//!
//! The engine's side (`Engine::check_congestion` and friends) is in `core.rs`.
//!
//! As in DRBD, the policies other than `block` need protocol A (the configuration
//! refuses them otherwise), and a Primary only pulls ahead from `Connected`.

/// Time an `Ahead` Primary waits, once every earlier write was acknowledged,
/// before it starts the resync (DRBD: one second).
pub const AHEAD_TO_SYNC_MS: u64 = 1000;

/// `on-congestion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionPolicy {
    /// Wait for the peer (back-pressure).
    #[default]
    Block,
    /// Go Ahead of the peer, resync later.
    PullAhead,
    /// Drop the connection.
    Disconnect,
}

/// The congestion settings of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Congestion {
    /// `on-congestion`.
    pub policy: CongestionPolicy,
    /// `congestion-fill` in bytes (0: not checked).
    pub fill_bytes: u64,
    /// `congestion-extents` (0: not checked).
    pub extents: u32,
}

/// What the engine tracks for congestion (kept by [`crate::engine::core::Engine`]).
#[derive(Debug, Default)]
pub(crate) struct CongestionState {
    pub(crate) settings: Congestion,
    /// Bytes of writes handed to the peer and not completed towards the application.
    pub(crate) sent_pending_bytes: u64,
    /// Bytes of the transfer log (completed writes not yet proven stable on the peer).
    pub(crate) tl_bytes: u64,
    /// Activity-log extents with writes in flight (reported by the driver).
    pub(crate) al_in_use: u32,
    /// Ahead, nothing in flight since this time.
    pub(crate) drained_since_ms: Option<u64>,
    /// Ahead: the resync was asked for.
    pub(crate) resync_asked: bool,
    /// Disconnect: the drop was asked for on this connection.
    pub(crate) drop_asked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::core::{Action, Engine, Event, Protocol, ReqKind};
    use crate::engine::state::{ConnState, DiskState, Role};

    /// A node connected to a peer in `peer_role`, both UpToDate.
    fn connected(protocol: Protocol, congestion: Congestion, peer_role: Role) -> Engine {
        let mut e = Engine::new(1 << 30, DiskState::UpToDate, protocol);
        e.set_congestion(congestion);
        let mut out = Vec::new();
        e.handle(0, Event::Connect, &mut out);
        e.handle(
            0,
            Event::PeerConnected {
                role: peer_role,
                disk: DiskState::UpToDate,
            },
            &mut out,
        );
        e
    }

    /// A protocol A Primary connected to an UpToDate Secondary.
    fn primary(policy: CongestionPolicy, fill_bytes: u64) -> Engine {
        let congestion = Congestion {
            policy,
            fill_bytes,
            extents: 0,
        };
        let mut e = connected(Protocol::A, congestion, Role::Secondary);
        e.promote(false).expect("promote a connected UpToDate node");
        e
    }

    fn write(e: &mut Engine, now_ms: u64, id: u64, out: &mut Vec<Action>) {
        e.handle(
            now_ms,
            Event::Request {
                id,
                kind: ReqKind::Write,
                offset_bytes: id * 4096,
                len_bytes: 4096,
            },
            out,
        );
    }

    #[test]
    fn pull_ahead_marks_instead_of_sending_then_asks_for_a_resync() {
        let mut e = primary(CongestionPolicy::PullAhead, 3 * 4096);
        let mut out = Vec::new();
        for id in 1..=3 {
            write(&mut e, 1, id, &mut out);
        }
        assert!(
            out.iter()
                .filter(|a| matches!(a, Action::SendPeer(_)))
                .count()
                == 3
        );
        assert_eq!(e.conn(), ConnState::Connected);
        out.clear();
        // The fourth write finds 12 KiB in flight: Ahead, not sent, marked.
        write(&mut e, 2, 4, &mut out);
        assert_eq!(e.conn(), ConnState::Ahead);
        assert!(!out.iter().any(|a| matches!(a, Action::SendPeer(_))));
        assert!(out.iter().any(|a| matches!(
            a,
            Action::MarkOutOfSync {
                offset_bytes: 16384,
                len_bytes: 4096
            }
        )));
        assert!(out.iter().any(|a| matches!(
            a,
            Action::SendOutOfSync {
                offset_bytes: 16384,
                ..
            }
        )));
        assert!(out.iter().any(|a| matches!(a, Action::AnnounceState)));
        // No resync while earlier writes are unacknowledged.
        out.clear();
        for id in 1..=4 {
            e.handle(3, Event::LocalDone { id, result: Ok(()) }, &mut out);
        }
        e.handle(5000, Event::Tick, &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::StartResync)));
        for id in 1..=3 {
            e.handle(
                5001,
                Event::PeerProgressed {
                    id,
                    progress: crate::engine::core::PeerProgress::Written,
                },
                &mut out,
            );
        }
        e.handle(5200, Event::Tick, &mut out);
        let epoch = out.iter().find_map(|a| match a {
            Action::SendBarrier { epoch } => Some(*epoch),
            _ => None,
        });
        let epoch = epoch.expect("the epoch of the acknowledged writes is closed");
        e.handle(5201, Event::PeerBarrierAck { epoch }, &mut out);
        assert_eq!(e.net_in_flight_bytes(), 0);
        out.clear();
        e.handle(5300, Event::Tick, &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::StartResync)));
        e.handle(5300 + AHEAD_TO_SYNC_MS, Event::Tick, &mut out);
        assert_eq!(
            out.iter()
                .filter(|a| matches!(a, Action::StartResync))
                .count(),
            1
        );
        e.start_sync(true);
        assert_eq!(e.conn(), ConnState::SyncSource);
    }

    #[test]
    fn disconnect_policy_asks_once_per_connection() {
        let mut e = primary(CongestionPolicy::Disconnect, 4096);
        let mut out = Vec::new();
        write(&mut e, 1, 1, &mut out);
        write(&mut e, 1, 2, &mut out);
        write(&mut e, 1, 3, &mut out);
        let drops = out
            .iter()
            .filter(|a| matches!(a, Action::DropConnection { .. }))
            .count();
        assert_eq!(drops, 1);
        assert_eq!(e.conn(), ConnState::Connected);
    }

    #[test]
    fn block_and_protocol_c_never_pull_ahead() {
        let mut e = primary(CongestionPolicy::Block, 4096);
        let mut out = Vec::new();
        for id in 1..=10 {
            write(&mut e, 1, id, &mut out);
        }
        assert_eq!(e.conn(), ConnState::Connected);
        let pull_ahead = Congestion {
            policy: CongestionPolicy::PullAhead,
            fill_bytes: 4096,
            extents: 0,
        };
        let mut c = connected(Protocol::C, pull_ahead, Role::Secondary);
        c.promote(false).expect("promote");
        for id in 1..=10 {
            write(&mut c, 1, id, &mut out);
        }
        assert_eq!(c.conn(), ConnState::Connected);
    }

    #[test]
    fn behind_peer_is_outdated_and_becomes_sync_target() {
        let mut e = connected(Protocol::A, Congestion::default(), Role::Primary);
        e.peer_went_ahead();
        assert_eq!(
            (e.conn(), e.disk()),
            (ConnState::Behind, DiskState::Outdated)
        );
        e.start_sync(false);
        assert_eq!(e.conn(), ConnState::SyncTarget);
        e.finish_sync();
        assert_eq!(
            (e.conn(), e.disk()),
            (ConnState::Connected, DiskState::UpToDate)
        );
    }
}
