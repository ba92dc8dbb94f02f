//! The few items of the `rdb` crate that `src/engine/sync.rs` imports, for the
//! simulator, which compiles that file in as it is (`crate::engine::sync`):
//! `crate::config::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri}` (the variants of
//! `src/config/model.rs`; `sync.rs` matches them exhaustively, so a new variant
//! there fails this build instead of going unnoticed) and
//! `crate::meta::uuid::{GenerationUuids, UUID_JUST_CREATED}` (the fields and
//! constant of `src/meta/uuid.rs`; the UUID rotation rules of `src/engine/volume.rs`
//! are modelled by the simulator's nodes, with UUIDs from the seeded generator
//! instead of `rand`, so runs replay).

/// `src/config/model.rs`'s split-brain policies.
pub mod config {
    /// `after-sb-0pri`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum AfterSb0Pri {
        /// `disconnect`.
        Disconnect,
        /// `discard-younger-primary`.
        DiscardYoungerPrimary,
        /// `discard-older-primary`.
        DiscardOlderPrimary,
        /// `discard-zero-changes`.
        DiscardZeroChanges,
        /// `discard-least-changes`.
        DiscardLeastChanges,
        /// `discard-local`.
        DiscardLocal,
        /// `discard-remote`.
        DiscardRemote,
    }

    /// `after-sb-1pri`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum AfterSb1Pri {
        /// `disconnect`.
        Disconnect,
        /// `consensus`.
        Consensus,
        /// `violently-as0p`.
        ViolentlyAs0p,
        /// `discard-secondary`.
        DiscardSecondary,
        /// `call-pri-lost-after-sb`.
        CallPriLostAfterSb,
    }

    /// `after-sb-2pri`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum AfterSb2Pri {
        /// `disconnect`.
        Disconnect,
        /// `violently-as0p`.
        ViolentlyAs0p,
        /// `call-pri-lost-after-sb`.
        CallPriLostAfterSb,
    }
}

/// `src/meta/uuid.rs`'s generation UUIDs.
pub mod meta {
    /// Generation UUIDs.
    pub mod uuid {
        /// Current UUID of freshly created meta-data.
        pub const UUID_JUST_CREATED: u64 = 4;

        /// A node's generation UUIDs (same fields as `src/meta/uuid.rs`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct GenerationUuids {
            /// The generation of the data this node holds.
            pub current: u64,
            /// The generation at which the bitmap started recording (0 = not tracking).
            pub bitmap: u64,
            /// Older generations, newest first.
            pub history: [u64; 2],
        }

        impl GenerationUuids {
            /// `GenerationUuids::new_current` with `uuid` (even, >= 16) as the new
            /// current UUID.
            pub fn new_current_with(&mut self, uuid: u64) {
                if self.bitmap == 0 {
                    self.bitmap = self.current;
                }
                self.current = uuid;
            }

            /// `GenerationUuids::clear_bitmap_uuid`.
            pub fn clear_bitmap_uuid(&mut self) {
                if self.bitmap == 0 {
                    return;
                }
                self.history[1] = self.history[0];
                self.history[0] = self.bitmap;
                self.bitmap = 0;
            }
        }
    }
}
