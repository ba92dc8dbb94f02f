//! Generation UUIDs (DRBD 8.4 semantics): `current`, `bitmap`, `history[2]`, all u64.
//!
//! - `current` names the data generation this node holds now.
//! - `bitmap` is the generation the peer last had in common with us while the bitmap
//!   records our changes since then (0 when the bitmap is not tracking a divergence).
//! - `history` keeps the two generations before `bitmap`.
//!
//! Bit 0 of a UUID is DRBD's "was primary when this UUID was created" marker; random
//! UUIDs are generated with bit 0 clear and are never below [`UUID_MIN_RANDOM`], which
//! keeps the small values free for special meanings such as [`UUID_JUST_CREATED`].
//!
//! In JSON the UUIDs are written as hex strings, `"0x3F2A0C1D55E6B7A8"` (16 upper-case
//! digits), like `drbdadm show-gi` prints them.

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

/// The `current` UUID of freshly created meta-data (DRBD's `UUID_JUST_CREATED`): the
/// data is Inconsistent and has no relation to any peer yet.
pub const UUID_JUST_CREATED: u64 = 4;
/// Random UUIDs are at least this value.
pub const UUID_MIN_RANDOM: u64 = 16;

/// Formats a UUID as `0x` + 16 upper-case hex digits.
pub fn format_uuid(uuid: u64) -> String {
    format!("0x{uuid:016X}")
}

/// A new random generation UUID (bit 0 clear, never a reserved small value).
pub fn random_uuid() -> u64 {
    loop {
        let value = rand::random::<u64>() & !1;
        if value >= UUID_MIN_RANDOM {
            return value;
        }
    }
}

/// The generation UUIDs of one node's data.
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
    /// UUIDs of freshly created meta-data: current = [`UUID_JUST_CREATED`], rest 0.
    pub fn just_created() -> GenerationUuids {
        GenerationUuids {
            current: UUID_JUST_CREATED,
            bitmap: 0,
            history: [0, 0],
        }
    }

    /// Starts a new data generation (a Primary lost its peer, or `new-current-uuid`):
    /// the old current becomes the bitmap UUID (if the bitmap was not already tracking
    /// an older divergence) and a random UUID becomes current. Returns the new current.
    pub fn new_current(&mut self) -> u64 {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        }
        self.current = random_uuid();
        self.current
    }

    /// The bitmap no longer tracks a divergence (resync finished, or the peer caught
    /// up): bitmap UUID moves into history and becomes 0.
    pub fn clear_bitmap_uuid(&mut self) {
        if self.bitmap == 0 {
            return;
        }
        self.history[1] = self.history[0];
        self.history[0] = self.bitmap;
        self.bitmap = 0;
    }
}

impl Serialize for GenerationUuids {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut state = serializer.serialize_struct("GenerationUuids", 3)?;
        state.serialize_field("current", &format_uuid(self.current))?;
        state.serialize_field("bitmap", &format_uuid(self.bitmap))?;
        state.serialize_field(
            "history",
            &[format_uuid(self.history[0]), format_uuid(self.history[1])],
        )?;
        state.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation() {
        let mut uuids = GenerationUuids::just_created();
        let c0 = uuids.new_current();
        assert_eq!(uuids.bitmap, UUID_JUST_CREATED);
        assert_eq!(c0 & 1, 0);
        assert!(c0 >= UUID_MIN_RANDOM);
        // A second new current while the bitmap tracks keeps the older bitmap UUID.
        let c1 = uuids.new_current();
        assert_ne!(c0, c1);
        assert_eq!(uuids.bitmap, UUID_JUST_CREATED);
        uuids.clear_bitmap_uuid();
        assert_eq!(uuids.bitmap, 0);
        assert_eq!(uuids.history, [UUID_JUST_CREATED, 0]);
        uuids.new_current();
        assert_eq!(uuids.bitmap, c1);
        uuids.clear_bitmap_uuid();
        assert_eq!(uuids.history, [c1, UUID_JUST_CREATED]);
    }

    #[test]
    fn json_hex() {
        let uuids = GenerationUuids {
            current: 0x3F2A_0000_0000_00A8,
            bitmap: 0,
            history: [4, 0],
        };
        let json = serde_json::to_value(uuids).unwrap();
        assert_eq!(json["current"], "0x3F2A0000000000A8");
        assert_eq!(json["history"][0], "0x0000000000000004");
    }
}
