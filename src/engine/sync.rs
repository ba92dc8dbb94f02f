//! Resync decisions: who sends what when two nodes meet.
//!
//! A pure function of both nodes' views (role, disk state, out-of-sync blocks in
//! their dirty bitmaps), evaluated identically on both sides. This version decides
//! from disk states and bitmaps; generation-UUID history (to tell a smart resync
//! from unrelated data after both sides moved on) is the next step.

use crate::engine::state::{DiskState, Role};

/// What one node knows about itself, exchanged at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncView {
    /// Role.
    pub role: Role,
    /// Disk state.
    pub disk: DiskState,
    /// Blocks marked out of sync in its bitmap.
    pub oos_blocks: u64,
}

/// The decision, from the point of view of the node evaluating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Nothing to resync.
    None,
    /// This node sends every block (the peer has no usable data).
    SourceFull,
    /// This node sends the blocks marked in its bitmap.
    SourceBitmap,
    /// The peer sends; this node receives.
    Target,
    /// Neither node has usable data: wait for `primary --force`.
    NoData,
    /// Both sides changed data while apart: split brain, nothing is resynced.
    SplitBrain,
}

/// Decides the resync between `mine` and `peer`.
pub fn decide(mine: SyncView, peer: SyncView) -> SyncDecision {
    let (me_ok, peer_ok) = (mine.disk.is_usable(), peer.disk.is_usable());
    match (me_ok, peer_ok) {
        (false, false) => SyncDecision::NoData,
        (true, false) => SyncDecision::SourceFull,
        (false, true) => SyncDecision::Target,
        (true, true) => match (mine.oos_blocks > 0, peer.oos_blocks > 0) {
            (false, false) => SyncDecision::None,
            (true, true) => SyncDecision::SplitBrain,
            // Only one side wrote while apart; if the other side is Primary now,
            // both may have diverged (it could have written without us knowing
            // after a later failover): refuse rather than overwrite.
            (true, false) if peer.role == Role::Primary => SyncDecision::SplitBrain,
            (true, false) => SyncDecision::SourceBitmap,
            (false, true) if mine.role == Role::Primary => SyncDecision::SplitBrain,
            (false, true) => SyncDecision::Target,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(role: Role, disk: DiskState, oos_blocks: u64) -> SyncView {
        SyncView {
            role,
            disk,
            oos_blocks,
        }
    }

    #[test]
    fn decisions_are_symmetric() {
        use DiskState::*;
        use Role::*;
        let views = [
            v(Primary, UpToDate, 0),
            v(Primary, UpToDate, 5),
            v(Secondary, UpToDate, 0),
            v(Secondary, Consistent, 3),
            v(Secondary, Inconsistent, 0),
            v(Secondary, Outdated, 0),
        ];
        for a in views {
            for b in views {
                let (x, y) = (decide(a, b), decide(b, a));
                let ok = matches!(
                    (x, y),
                    (SyncDecision::None, SyncDecision::None)
                        | (SyncDecision::NoData, SyncDecision::NoData)
                        | (SyncDecision::SplitBrain, SyncDecision::SplitBrain)
                        | (SyncDecision::SourceFull, SyncDecision::Target)
                        | (SyncDecision::Target, SyncDecision::SourceFull)
                        | (SyncDecision::SourceBitmap, SyncDecision::Target)
                        | (SyncDecision::Target, SyncDecision::SourceBitmap)
                );
                assert!(ok, "{a:?} vs {b:?}: {x:?} / {y:?}");
            }
        }
    }

    #[test]
    fn fresh_pair_after_force_is_a_full_sync() {
        let alpha = v(Role::Primary, DiskState::UpToDate, 0);
        let beta = v(Role::Secondary, DiskState::Inconsistent, 0);
        assert_eq!(decide(alpha, beta), SyncDecision::SourceFull);
        assert_eq!(decide(beta, alpha), SyncDecision::Target);
    }

    #[test]
    fn writes_while_apart_on_both_sides_are_split_brain() {
        let a = v(Role::Primary, DiskState::UpToDate, 10);
        let b = v(Role::Primary, DiskState::UpToDate, 2);
        assert_eq!(decide(a, b), SyncDecision::SplitBrain);
    }
}
