//! Resync decisions: who sends what when two nodes meet.
//!
//! A pure function of both nodes' views, evaluated identically on both sides of a
//! connection (each from its own point of view), so the two always agree. It follows
//! DRBD 8.4's sync handshake:
//!
//! 1. The generation UUIDs are compared ([`uuid_compare`]): equal current UUIDs mean
//!    the same data (unless one side crashed while Primary: it resyncs its activity
//!    log extents to the other); one side's current UUID equal to the other's bitmap
//!    UUID means that other side changed data since they parted (smart resync from
//!    its bitmap); a current UUID found in the other's history means a full sync;
//!    equal bitmap UUIDs with different current UUIDs mean both sides changed data:
//!    split brain; no relation at all is unrelated data.
//! 2. Disk states override: an Inconsistent side facing usable data is the target.
//! 3. Split brain is resolved only by `--discard-my-data` on one side or by the
//!    `after-sb-*pri` policies; the default policy (`disconnect`) refuses.
//!
//! The resync itself is bitmap based in both directions: the set of blocks to send
//! is the union of both nodes' bitmaps (each side's writes while apart).
//!
//! Bit 0 of a UUID is DRBD's "Primary when created" marker; comparisons ignore it.
//! The bitmap UUID's bit 0 tells whether the node was Primary when the nodes parted,
//! which is what `discard-younger-primary` / `discard-older-primary` use.

use crate::config::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri};
use crate::engine::state::{DiskState, Role};
use crate::meta::uuid::{GenerationUuids, UUID_JUST_CREATED};

/// What one node knows about itself, exchanged at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncView {
    /// Role.
    pub role: Role,
    /// Disk state.
    pub disk: DiskState,
    /// Generation UUIDs.
    pub uuids: GenerationUuids,
    /// The node crashed while Primary and has not resynced since.
    pub crashed_primary: bool,
    /// The administrator asked to discard this node's data in a split brain.
    pub discard_my_data: bool,
    /// Blocks marked out of sync in its bitmap.
    pub oos_blocks: u64,
}

/// The split-brain policies of the resource (`net { after-sb-*pri }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitBrainPolicy {
    /// No node is Primary.
    pub zero: AfterSb0Pri,
    /// One node is Primary.
    pub one: AfterSb1Pri,
    /// Both nodes are Primary.
    pub two: AfterSb2Pri,
}

impl Default for SplitBrainPolicy {
    fn default() -> Self {
        SplitBrainPolicy {
            zero: AfterSb0Pri::Disconnect,
            one: AfterSb1Pri::Disconnect,
            two: AfterSb2Pri::Disconnect,
        }
    }
}

/// The decision, from the point of view of the node evaluating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same data: nothing to resync.
    None,
    /// This node sends every block (the peer has no usable data).
    SourceFull,
    /// This node sends the blocks marked in either bitmap.
    SourceBitmap,
    /// The peer sends every block.
    TargetFull,
    /// The peer sends the blocks marked in either bitmap.
    TargetBitmap,
    /// Neither node has usable data: wait for `primary --force`.
    NoData,
    /// Both sides changed data while apart and no policy resolved it.
    SplitBrain {
        /// A policy picked this node (a Primary) as the victim: DRBD's
        /// `call-pri-lost-after-sb` (the handler `pri-lost-after-sb` is called).
        primary_lost: bool,
    },
    /// The UUIDs have no relation: the disks hold unrelated data.
    Unrelated,
    /// The UUIDs name this node the source but its disk cannot be one.
    Refused(&'static str),
}

impl SyncDecision {
    /// Whether this node is the sync source.
    pub fn is_source(self) -> bool {
        matches!(self, SyncDecision::SourceFull | SyncDecision::SourceBitmap)
    }

    /// Whether this node is the sync target.
    pub fn is_target(self) -> bool {
        matches!(self, SyncDecision::TargetFull | SyncDecision::TargetBitmap)
    }

    /// Whether every block is resynced.
    pub fn is_full(self) -> bool {
        matches!(self, SyncDecision::SourceFull | SyncDecision::TargetFull)
    }
}

fn base(uuid: u64) -> u64 {
    uuid & !1
}

/// DRBD's `uuid_compare`: 0 same data; 1 / -1 this node is source / target of a
/// bitmap resync; 2 / -2 source / target of a full sync; 100 split brain (both
/// moved on from a common generation); -100 split brain with no common bitmap
/// generation; -1000 unrelated data. `tiebreak` is this node's side of the
/// deterministic tie-breaker (both crashed while Primary).
pub fn uuid_compare(mine: &SyncView, peer: &SyncView, tiebreak: bool) -> i32 {
    let (me, them) = (&mine.uuids, &peer.uuids);
    let (my_current, peer_current) = (base(me.current), base(them.current));
    if my_current == UUID_JUST_CREATED && peer_current == UUID_JUST_CREATED {
        return 0;
    }
    if my_current == UUID_JUST_CREATED || my_current == 0 {
        return -2;
    }
    if peer_current == UUID_JUST_CREATED || peer_current == 0 {
        return 2;
    }
    if my_current == peer_current {
        return match (mine.crashed_primary, peer.crashed_primary) {
            (false, false) => 0,
            (true, false) => 1,
            (false, true) => -1,
            (true, true) if tiebreak => 1,
            (true, true) => -1,
        };
    }
    // The peer changed data since it parted from our current generation.
    if base(them.bitmap) == my_current {
        return -1;
    }
    if them
        .history
        .iter()
        .any(|&h| h != 0 && base(h) == my_current)
    {
        return -2;
    }
    // We changed data since we parted from the peer's current generation.
    if base(me.bitmap) == peer_current {
        return 1;
    }
    if me
        .history
        .iter()
        .any(|&h| h != 0 && base(h) == peer_current)
    {
        return 2;
    }
    if me.bitmap != 0 && base(me.bitmap) == base(them.bitmap) {
        return 100;
    }
    let mine_all = [me.bitmap, me.history[0], me.history[1]];
    let theirs_all = [them.bitmap, them.history[0], them.history[1]];
    if mine_all
        .iter()
        .any(|&a| a != 0 && theirs_all.iter().any(|&b| base(a) == base(b)))
    {
        return -100;
    }
    -1000
}

/// Decides the resync between `mine` and `peer`; `tiebreak` is true on exactly one
/// of the two nodes (the one whose name sorts first).
pub fn decide(
    mine: &SyncView,
    peer: &SyncView,
    policy: SplitBrainPolicy,
    tiebreak: bool,
) -> SyncDecision {
    use DiskState::Inconsistent;
    // A Diskless side (detached after an I/O error) has nothing to resync with.
    if mine.disk == DiskState::Diskless || peer.disk == DiskState::Diskless {
        return SyncDecision::NoData;
    }
    let (me_ok, peer_ok) = (mine.disk.is_usable(), peer.disk.is_usable());
    let has_data = |d: DiskState| d > Inconsistent && d != DiskState::DUnknown;
    if !has_data(mine.disk) && !has_data(peer.disk) {
        return SyncDecision::NoData;
    }
    let mut hg = uuid_compare(mine, peer, tiebreak);
    if hg == -1000 {
        return SyncDecision::Unrelated;
    }
    // An Inconsistent side facing data is the target, whatever the UUIDs say.
    if (mine.disk == Inconsistent && has_data(peer.disk))
        || (peer.disk == Inconsistent && has_data(mine.disk))
    {
        let full = hg == -100 || hg == 100 || hg.abs() == 2;
        hg = if has_data(mine.disk) { 1 } else { -1 };
        if full {
            hg *= 2;
        }
    }
    if hg == 100 || hg == -100 {
        hg = match (mine.discard_my_data, peer.discard_my_data) {
            (true, false) => -1,
            (false, true) => 1,
            _ => match resolve_split_brain(mine, peer, policy, tiebreak) {
                Resolution::Victim(true) => -1,
                Resolution::Victim(false) => 1,
                Resolution::Disconnect => {
                    return SyncDecision::SplitBrain {
                        primary_lost: false,
                    }
                }
                Resolution::PrimaryLost => return SyncDecision::SplitBrain { primary_lost: true },
            },
        };
    }
    // Equal data, but blocks marked on either side (online verify, a resync cut
    // short): the Primary sends them, else the tie-breaker picks.
    if hg == 0 && (mine.oos_blocks > 0 || peer.oos_blocks > 0) {
        hg = match (mine.role, peer.role) {
            (Role::Primary, Role::Primary) => 0,
            (Role::Primary, _) => 1,
            (_, Role::Primary) => -1,
            _ if tiebreak => 1,
            _ => -1,
        };
    }
    let decision = match hg {
        0 => SyncDecision::None,
        1 => SyncDecision::SourceBitmap,
        -1 => SyncDecision::TargetBitmap,
        h if h >= 2 => SyncDecision::SourceFull,
        _ => SyncDecision::TargetFull,
    };
    // The same checks from both sides, so both nodes refuse together.
    let (source_ok, target_role) = if decision.is_source() {
        (me_ok, peer.role)
    } else if decision.is_target() {
        (peer_ok, mine.role)
    } else {
        (true, Role::Secondary)
    };
    if !source_ok {
        return SyncDecision::Refused(
            "the sync source's disk is not usable (Outdated or Inconsistent)",
        );
    }
    if target_role == Role::Primary {
        return SyncDecision::Refused(
            "the sync target would be a Primary: demote it first (or discard its data explicitly)",
        );
    }
    decision
}

enum Resolution {
    /// The policy picked a victim: `true` = this node.
    Victim(bool),
    /// No automatic resolution.
    Disconnect,
    /// The policy picked this node, a Primary, as the victim.
    PrimaryLost,
}

/// DRBD's after-sb-0pri rules (also the base of the 1pri "consensus" and
/// "call-pri-lost-after-sb" rules).
fn zero_pri(mine: &SyncView, peer: &SyncView, rule: AfterSb0Pri, tiebreak: bool) -> Resolution {
    let (my_changes, peer_changes) = (mine.oos_blocks, peer.oos_blocks);
    // Bit 0 of the bitmap UUID: Primary when the nodes parted (the older Primary).
    let (me_was_pri, peer_was_pri) = (mine.uuids.bitmap & 1 == 1, peer.uuids.bitmap & 1 == 1);
    match rule {
        AfterSb0Pri::Disconnect => Resolution::Disconnect,
        AfterSb0Pri::DiscardYoungerPrimary => match (me_was_pri, peer_was_pri) {
            (false, true) => Resolution::Victim(true),
            (true, false) => Resolution::Victim(false),
            _ => Resolution::Disconnect,
        },
        AfterSb0Pri::DiscardOlderPrimary => match (me_was_pri, peer_was_pri) {
            (true, false) => Resolution::Victim(true),
            (false, true) => Resolution::Victim(false),
            _ => Resolution::Disconnect,
        },
        AfterSb0Pri::DiscardZeroChanges => match (my_changes == 0, peer_changes == 0) {
            (true, false) => Resolution::Victim(true),
            (false, true) => Resolution::Victim(false),
            (true, true) => Resolution::Victim(!tiebreak),
            (false, false) => Resolution::Disconnect,
        },
        // Asymmetric by design: one node says discard-local, the other discard-remote.
        AfterSb0Pri::DiscardLocal => Resolution::Victim(true),
        AfterSb0Pri::DiscardRemote => Resolution::Victim(false),
        AfterSb0Pri::DiscardLeastChanges => {
            if my_changes != peer_changes {
                Resolution::Victim(my_changes < peer_changes)
            } else {
                Resolution::Victim(!tiebreak)
            }
        }
    }
}

fn resolve_split_brain(
    mine: &SyncView,
    peer: &SyncView,
    policy: SplitBrainPolicy,
    tiebreak: bool,
) -> Resolution {
    let primaries =
        usize::from(mine.role == Role::Primary) + usize::from(peer.role == Role::Primary);
    let lost_if_primary = |r: Resolution| match r {
        Resolution::Victim(true) if mine.role == Role::Primary => Resolution::PrimaryLost,
        Resolution::Victim(false) if peer.role == Role::Primary => Resolution::Disconnect,
        other => other,
    };
    match primaries {
        0 => zero_pri(mine, peer, policy.zero, tiebreak),
        1 => match policy.one {
            AfterSb1Pri::Disconnect => Resolution::Disconnect,
            AfterSb1Pri::DiscardSecondary => Resolution::Victim(mine.role != Role::Primary),
            AfterSb1Pri::Consensus => match zero_pri(mine, peer, policy.zero, tiebreak) {
                // Only if the 0pri rule picks the Secondary.
                Resolution::Victim(me) if (mine.role == Role::Primary) != me => {
                    Resolution::Victim(me)
                }
                _ => Resolution::Disconnect,
            },
            AfterSb1Pri::CallPriLostAfterSb => {
                lost_if_primary(zero_pri(mine, peer, policy.zero, tiebreak))
            }
            AfterSb1Pri::ViolentlyAs0p => zero_pri(mine, peer, policy.zero, tiebreak),
        },
        _ => match policy.two {
            AfterSb2Pri::Disconnect => Resolution::Disconnect,
            AfterSb2Pri::CallPriLostAfterSb => {
                lost_if_primary(zero_pri(mine, peer, policy.zero, tiebreak))
            }
            AfterSb2Pri::ViolentlyAs0p => zero_pri(mine, peer, policy.zero, tiebreak),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DiskState::*;
    use Role::*;

    const C0: u64 = 0x1000;
    const C1: u64 = 0x2000;
    const C2: u64 = 0x3000;

    fn v(role: Role, disk: DiskState, current: u64, bitmap: u64, oos_blocks: u64) -> SyncView {
        SyncView {
            role,
            disk,
            uuids: GenerationUuids {
                current,
                bitmap,
                history: [0, 0],
            },
            crashed_primary: false,
            discard_my_data: false,
            oos_blocks,
        }
    }

    fn both(a: &SyncView, b: &SyncView, policy: SplitBrainPolicy) -> (SyncDecision, SyncDecision) {
        (decide(a, b, policy, true), decide(b, a, policy, false))
    }

    fn consistent(x: SyncDecision, y: SyncDecision) -> bool {
        use SyncDecision::*;
        matches!(
            (x, y),
            (None, None)
                | (NoData, NoData)
                | (SplitBrain { .. }, SplitBrain { .. })
                | (Unrelated, Unrelated)
                | (Refused(_), Refused(_))
                | (SourceFull, TargetFull)
                | (TargetFull, SourceFull)
                | (SourceBitmap, TargetBitmap)
                | (TargetBitmap, SourceBitmap)
        )
    }

    #[test]
    fn decisions_are_symmetric() {
        let mut views = Vec::new();
        for role in [Primary, Secondary] {
            for disk in [UpToDate, Consistent, Outdated, Inconsistent] {
                for (c, b) in [
                    (UUID_JUST_CREATED, 0),
                    (C0, 0),
                    (C1, C0),
                    (C2, C0 | 1),
                    (C1 | 1, 0),
                ] {
                    for oos in [0, 7] {
                        for crashed in [false, true] {
                            let mut x = v(role, disk, c, b, oos);
                            x.crashed_primary = crashed;
                            views.push(x);
                        }
                    }
                }
            }
        }
        let policies = [
            SplitBrainPolicy::default(),
            SplitBrainPolicy {
                zero: AfterSb0Pri::DiscardZeroChanges,
                one: AfterSb1Pri::DiscardSecondary,
                two: AfterSb2Pri::Disconnect,
            },
            SplitBrainPolicy {
                zero: AfterSb0Pri::DiscardLeastChanges,
                one: AfterSb1Pri::Consensus,
                two: AfterSb2Pri::Disconnect,
            },
            SplitBrainPolicy {
                zero: AfterSb0Pri::DiscardYoungerPrimary,
                one: AfterSb1Pri::CallPriLostAfterSb,
                two: AfterSb2Pri::CallPriLostAfterSb,
            },
        ];
        for policy in policies {
            for a in &views {
                for b in &views {
                    let (x, y) = both(a, b, policy);
                    assert!(
                        consistent(x, y),
                        "{a:?} vs {b:?} ({policy:?}): {x:?} / {y:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn fresh_pair_after_force_is_a_full_sync() {
        let alpha = v(Primary, UpToDate, C0 | 1, 0, 0);
        let beta = v(Secondary, Inconsistent, UUID_JUST_CREATED, 0, 0);
        let p = SplitBrainPolicy::default();
        assert_eq!(
            both(&alpha, &beta, p),
            (SyncDecision::SourceFull, SyncDecision::TargetFull)
        );
    }

    #[test]
    fn writes_while_disconnected_are_a_smart_resync() {
        // The Primary made a new current UUID when it lost the peer.
        let pri = v(Primary, UpToDate, C1 | 1, C0 | 1, 100);
        let sec = v(Secondary, Consistent, C0, 0, 0);
        let p = SplitBrainPolicy::default();
        assert_eq!(
            both(&pri, &sec, p),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
    }

    #[test]
    fn crashed_primary_resyncs_its_activity_log() {
        let mut old = v(Secondary, UpToDate, C0, 0, 1024);
        old.crashed_primary = true;
        let sec = v(Secondary, Consistent, C0, 0, 0);
        let p = SplitBrainPolicy::default();
        assert_eq!(
            both(&old, &sec, p),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
        // After a failover the new Primary is the source; the old one's extents
        // (its bitmap) join the union.
        let new_pri = v(Primary, UpToDate, C1 | 1, C0, 50);
        assert_eq!(
            both(&new_pri, &old, p),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
    }

    #[test]
    fn writes_on_both_sides_are_split_brain_unless_resolved() {
        let a = v(Primary, UpToDate, C1 | 1, C0 | 1, 10);
        let b = v(Secondary, UpToDate, C2, C0, 2);
        let p = SplitBrainPolicy::default();
        assert_eq!(
            both(&a, &b, p),
            (
                SyncDecision::SplitBrain {
                    primary_lost: false
                },
                SyncDecision::SplitBrain {
                    primary_lost: false
                }
            )
        );
        let mut victim = b;
        victim.discard_my_data = true;
        assert_eq!(
            both(&a, &victim, p),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
        let p1 = SplitBrainPolicy {
            one: AfterSb1Pri::DiscardSecondary,
            ..p
        };
        assert_eq!(
            both(&a, &b, p1),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
        // Two Secondaries, discard-zero-changes: the side without changes loses.
        let a0 = v(Secondary, UpToDate, C1, C0, 0);
        let p0 = SplitBrainPolicy {
            zero: AfterSb0Pri::DiscardZeroChanges,
            ..p
        };
        assert_eq!(
            both(&a0, &b, p0),
            (SyncDecision::TargetBitmap, SyncDecision::SourceBitmap)
        );
        // discard-younger-primary: b was Secondary when they parted (bitmap bit 0 clear).
        let a2 = v(Secondary, UpToDate, C1, C0 | 1, 10);
        let py = SplitBrainPolicy {
            zero: AfterSb0Pri::DiscardYoungerPrimary,
            ..p
        };
        assert_eq!(
            both(&a2, &b, py),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
    }

    #[test]
    fn unrelated_data_is_refused() {
        let a = v(Secondary, UpToDate, C1, 0, 0);
        let b = v(Secondary, UpToDate, C2, 0, 0);
        let p = SplitBrainPolicy::default();
        assert_eq!(
            both(&a, &b, p),
            (SyncDecision::Unrelated, SyncDecision::Unrelated)
        );
    }

    #[test]
    fn verify_marks_are_resynced_by_the_primary() {
        let a = v(Primary, UpToDate, C1 | 1, 0, 3);
        let b = v(Secondary, UpToDate, C1, 0, 0);
        let p = SplitBrainPolicy::default();
        assert_eq!(
            both(&a, &b, p),
            (SyncDecision::SourceBitmap, SyncDecision::TargetBitmap)
        );
    }
}
