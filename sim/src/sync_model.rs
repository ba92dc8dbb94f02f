//! The generation-UUID bookkeeping of `src/engine/volume.rs`, for the replication
//! simulator (`world.rs`), so that every handshake there is judged by the real resync
//! decision (`src/engine/sync.rs`, compiled in as `crate::engine::sync`).
//!
//! The model watches each node's role, disk and connection after every simulated
//! event and applies volume.rs's rules: a promotion without a connected peer (or a
//! forced one) starts a new data generation, which a connected in-sync Secondary
//! adopts after a forced promotion (B7); a Primary that loses its peer starts one;
//! the Primary bit follows the role; a node that goes down while Primary is a crashed
//! Primary. At each handshake both sides' `sync::decide` must agree, must not report a
//! split brain, unrelated data or a refusal (the simulator's cluster manager never lets
//! both nodes write apart), and when exactly one node changed data while apart (was
//! Primary without the peer) that node must be the sync source. The handshake then
//! settles the UUIDs as the finished resync does (the target adopts the source's
//! generation; bitmap UUIDs move to history). UUIDs are a counter, not random, so the
//! model consumes nothing from the run's generator: seeds replay as before.
//!
//! Still modelled by the simulator itself: the resync data path (at each quiescent
//! point the simulator copies every sector marked in either bitmap from the Primary),
//! the activity log (a crashed Primary's marks), and the cluster manager's choice of
//! Primary.

use crate::engine::state::{DiskState, Role};
use crate::engine::sync::{self, SplitBrainPolicy, SyncDecision, SyncView};
use crate::meta::uuid::GenerationUuids;

#[derive(Debug, Clone, Copy)]
struct Meta {
    uuids: GenerationUuids,
    crashed_primary: bool,
    /// Was Primary without a connected peer since the last handshake.
    changed: bool,
    role: Role,
    disk: DiskState,
    connected: bool,
    up: bool,
}

/// The UUID state of both nodes.
#[derive(Debug, Clone)]
pub(crate) struct SyncModel {
    nodes: [Meta; 2],
    next_uuid: u64,
    /// Handshakes judged.
    pub handshakes: u64,
    /// Of which with a resync (bitmap or full).
    pub resyncs: u64,
}

/// What the simulator knows of a node after an event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observed {
    pub up: bool,
    pub role: Role,
    pub disk: DiskState,
    pub connected: bool,
}

impl SyncModel {
    pub(crate) fn new() -> SyncModel {
        let meta = Meta {
            uuids: GenerationUuids {
                current: 0x1000,
                bitmap: 0,
                history: [0, 0],
            },
            crashed_primary: false,
            changed: false,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            connected: false,
            up: true,
        };
        SyncModel {
            nodes: [meta; 2],
            next_uuid: 0x1_0000,
            handshakes: 0,
            resyncs: 0,
        }
    }

    fn new_current(&mut self, n: usize, apart: bool) {
        self.next_uuid += 0x10;
        let m = &mut self.nodes[n];
        if m.uuids.bitmap == 0 {
            m.uuids.bitmap = m.uuids.current & !1;
        }
        m.uuids.current = self.next_uuid;
        if apart {
            m.changed = true;
        }
    }

    /// Applies volume.rs's rules to what changed on node `n`.
    pub(crate) fn observe(&mut self, n: usize, o: Observed) {
        let before = self.nodes[n];
        if before.up && !o.up {
            // Down: a Primary that goes away crashed (its meta-data says so).
            if before.role == Role::Primary {
                self.nodes[n].crashed_primary = true;
            }
            self.nodes[n].uuids.current &= !1;
        }
        if o.up {
            if before.role != Role::Primary && o.role == Role::Primary {
                let forced = before.disk != DiskState::UpToDate && o.connected;
                if !o.connected {
                    self.new_current(n, true);
                } else if forced {
                    self.new_current(n, false);
                    // B7 (fixed, volume.rs `promoted` / `adopt_new_current`): the
                    // connected, in-sync Secondary adopts the forced Primary's new
                    // current UUID; both stay in one generation.
                    let peer = self.nodes[1 - n];
                    if peer.connected
                        && peer.role == Role::Secondary
                        && matches!(
                            peer.disk,
                            DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
                        )
                    {
                        self.nodes[n].uuids.clear_bitmap_uuid();
                        let current = self.nodes[n].uuids.current & !1;
                        let peer = &mut self.nodes[1 - n];
                        peer.uuids.clear_bitmap_uuid();
                        peer.uuids.history[1] = peer.uuids.history[0];
                        peer.uuids.history[0] = peer.uuids.current & !1;
                        peer.uuids.current = current;
                    }
                }
                self.nodes[n].uuids.current |= 1;
            } else if before.role == Role::Primary && o.role != Role::Primary {
                self.nodes[n].uuids.current &= !1;
            } else if o.role == Role::Primary && before.connected && !o.connected {
                // The Primary goes on without its peer.
                self.new_current(n, true);
                self.nodes[n].uuids.current |= 1;
            }
        }
        let m = &mut self.nodes[n];
        m.up = o.up;
        m.role = if o.up { o.role } else { Role::Secondary };
        m.disk = o.disk;
        m.connected = o.up && o.connected;
    }

    /// Judges a handshake; `oos` is the number of marked sectors of each node.
    pub(crate) fn handshake(
        &mut self,
        states: [(Role, DiskState); 2],
        oos: [u64; 2],
    ) -> Result<(), String> {
        self.handshakes += 1;
        let view = |n: usize| SyncView {
            role: states[n].0,
            disk: states[n].1,
            uuids: self.nodes[n].uuids,
            crashed_primary: self.nodes[n].crashed_primary,
            discard_my_data: false,
            oos_blocks: oos[n],
        };
        let (v0, v1) = (view(0), view(1));
        let policy = SplitBrainPolicy::default();
        let d0 = sync::decide(&v0, &v1, policy, true);
        let d1 = sync::decide(&v1, &v0, policy, false);
        use SyncDecision as D;
        let agree = matches!(
            (d0, d1),
            (D::None, D::None)
                | (D::SourceBitmap, D::TargetBitmap)
                | (D::TargetBitmap, D::SourceBitmap)
                | (D::SourceFull, D::TargetFull)
                | (D::TargetFull, D::SourceFull)
        );
        let what = || {
            format!(
                "n0 {d0:?} ({} {} uuids {:x?} crashed={} changed={} oos={}), n1 {d1:?} ({} {} uuids {:x?} crashed={} changed={} oos={})",
                v0.role, v0.disk, v0.uuids, v0.crashed_primary, self.nodes[0].changed, oos[0],
                v1.role, v1.disk, v1.uuids, v1.crashed_primary, self.nodes[1].changed, oos[1]
            )
        };
        if !agree {
            return Err(format!(
                "resync decision refused or disagreeing: {}",
                what()
            ));
        }
        let (c0, c1) = (self.nodes[0].changed, self.nodes[1].changed);
        if c0 && c1 {
            return Err(format!(
                "both nodes changed data while apart (the cluster manager let them): {}",
                what()
            ));
        }
        if (c0 && !d0.is_source()) || (c1 && !d1.is_source()) {
            return Err(format!(
                "the node that changed data while apart is not the sync source: {}",
                what()
            ));
        }
        // The handshake's resync, settled as volume.rs does when it finishes.
        let source = if d0.is_source() {
            Some(0)
        } else if d1.is_source() {
            Some(1)
        } else {
            None
        };
        if let Some(s) = source {
            self.resyncs += 1;
            let current = self.nodes[s].uuids.current & !1;
            let t = &mut self.nodes[1 - s];
            t.uuids.current = current | u64::from(states[1 - s].0 == Role::Primary);
        }
        for m in &mut self.nodes {
            m.uuids.clear_bitmap_uuid();
            m.crashed_primary = false;
            m.changed = false;
            m.connected = true;
        }
        Ok(())
    }
}
