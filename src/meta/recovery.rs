//! Recovery of the activity log after a crash, and the decision when it is impossible.
//!
//! This module owns the rule that says whether the ring of 8 AL transactions read after
//! an unclean shutdown (superblock without [`flags::AL_CLEAN`]) tells which extents may
//! hold writes the peer lacks. Transactions are written in sequence, transaction `n`
//! into slot `n % 8`, each one durable before the data writes that need it are issued.
//! So a power cut can tear only the transaction being written, the one after the newest
//! complete one: its slot then holds a block that fails its checksum (or an older
//! transaction). Replay uses the newest valid transaction `M`:
//!
//! - when no slot after `M` is damaged, `M` is the last transaction written;
//! - when exactly the slot of `M + 1` is damaged, that is a torn write: `M` is correct,
//!   since the data writes that needed `M + 1` had not been issued;
//! - when the slots of `M + 1` and `M + 2` (or more in a row) are damaged, more than one
//!   write went wrong: transactions newer than `M` may have been complete and their
//!   extents would be forgotten, so recovery refuses;
//! - when damaged slots exist but none is valid, the hot set is unknown: refusal;
//! - an empty ring (never written: no magic in any slot) has nothing hot.
//!
//! A refusal is [`MetaError::AlUnrecoverable`]; its text tells the operator how to go
//! on (a full resync of this node from the peer, `create-md --force` then connect).
//! A bit flip inside the newest complete transaction is indistinguishable from a torn
//! write of that transaction (DRBD has the same limit); it is reported as a fall-back.

use serde::Serialize;

use super::al::{decode_transaction, AlTransaction};
use super::error::{MetaError, Place};
use super::file::MetaData;
use super::layout::{AL_RING_SLOTS, AL_TRANSACTION_SIZE_BYTES};
use super::superblock::flags;

/// What replay found in one ring slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SlotState {
    /// Never written: all zero, or no magic.
    Empty,
    /// A valid transaction of this meta-data, in its slot.
    Valid {
        /// Its transaction number.
        tr_number: u64,
    },
    /// A valid transaction of other meta-data (another device UUID): ignored.
    Foreign {
        /// The device UUID it carries.
        device_uuid: u64,
    },
    /// Carries the AL magic but fails its checks (torn or corrupt).
    Damaged {
        /// Why it was rejected (the decoder's error).
        reason: String,
    },
    /// A valid transaction whose number does not belong in this slot.
    Misplaced {
        /// Its transaction number.
        tr_number: u64,
    },
}

/// The outcome of a successful activity-log recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlRecovery {
    /// Per slot, what was found.
    pub slots: Vec<SlotState>,
    /// The newest valid transaction (None: nothing to replay).
    pub newest: Option<AlTransaction>,
    /// The slot after the newest was damaged (a torn write): replay fell back to the
    /// previous transaction.
    pub fell_back: bool,
    /// Whether the superblock said the log was cleanly shut down.
    pub clean: bool,
}

impl AlRecovery {
    /// Extents to mark out of sync (empty after a clean shutdown).
    pub fn hot_extents(&self) -> Vec<u32> {
        if self.clean {
            return Vec::new();
        }
        self.newest
            .as_ref()
            .map(|tr| tr.extents.clone())
            .unwrap_or_default()
    }
}

/// Classifies the 8 slots of a 32 KiB ring image for meta-data `device_uuid`.
pub fn classify_ring(ring: &[u8], device_uuid: u64) -> Vec<SlotState> {
    ring.chunks_exact(AL_TRANSACTION_SIZE_BYTES as usize)
        .take(AL_RING_SLOTS as usize)
        .enumerate()
        .map(|(slot, block)| {
            if block[..8] != super::al::AL_MAGIC {
                return SlotState::Empty;
            }
            match decode_transaction(block) {
                Err(e) => SlotState::Damaged {
                    reason: e.to_string(),
                },
                Ok(tr) if tr.device_uuid != device_uuid => SlotState::Foreign {
                    device_uuid: tr.device_uuid,
                },
                Ok(tr) if tr.tr_number % AL_RING_SLOTS != slot as u64 => SlotState::Misplaced {
                    tr_number: tr.tr_number,
                },
                Ok(tr) => SlotState::Valid {
                    tr_number: tr.tr_number,
                },
            }
        })
        .collect()
}

/// Decides the recovery of a ring image (pure; see the module documentation).
/// `clean`: the superblock's [`flags::AL_CLEAN`]; `al_tr_number`: the superblock's last
/// transaction number known written (a torn first transaction after it, in an
/// otherwise empty ring, leaves nothing hot). `place`: for the error message.
pub fn recover_ring(
    ring: &[u8],
    device_uuid: u64,
    clean: bool,
    al_tr_number: u64,
    place: &Place,
) -> Result<AlRecovery, MetaError> {
    let slots = classify_ring(ring, device_uuid);
    let newest = slots
        .iter()
        .enumerate()
        .filter_map(|(slot, s)| match s {
            SlotState::Valid { tr_number } => Some((slot, *tr_number)),
            _ => None,
        })
        .max_by_key(|&(_, tr_number)| tr_number);
    let damaged = |slot: u64| {
        matches!(
            slots[(slot % AL_RING_SLOTS) as usize],
            SlotState::Damaged { .. }
        )
    };
    let any_damaged = (0..AL_RING_SLOTS).any(damaged);
    let refuse = |reason: String| MetaError::AlUnrecoverable {
        place: place.clone(),
        reason,
    };
    let only_damaged = |slot: u64| {
        (0..AL_RING_SLOTS).all(|s| {
            if s == slot % AL_RING_SLOTS {
                damaged(s)
            } else {
                slots[s as usize] == SlotState::Empty
            }
        })
    };
    let newest_tr = match newest {
        None if any_damaged && !clean && only_damaged(al_tr_number.wrapping_add(1)) => {
            // The very first transaction after the recorded one was torn: none of its
            // data writes was issued, nothing was hot before it.
            return Ok(AlRecovery {
                slots,
                newest: None,
                fell_back: true,
                clean,
            });
        }
        None if any_damaged && !clean => {
            return Err(refuse(
                "no valid transaction, damaged slots: the hot extents of the crash are unknown"
                    .to_string(),
            ))
        }
        None => None,
        Some((slot, tr_number)) => {
            let start = slot * AL_TRANSACTION_SIZE_BYTES as usize;
            let block = &ring[start..start + AL_TRANSACTION_SIZE_BYTES as usize];
            // Classified Valid above, so it decodes.
            Some(decode_transaction(block)?).filter(|tr| tr.tr_number == tr_number)
        }
    };
    let fell_back = match &newest_tr {
        Some(tr) if damaged(tr.tr_number.wrapping_add(1)) => {
            if damaged(tr.tr_number.wrapping_add(2)) && !clean {
                return Err(refuse(format!(
                    "the slots of transactions {} and {} after the newest valid one ({}) are \
                     both damaged: more than a torn write, newer hot extents may be lost",
                    tr.tr_number.wrapping_add(1),
                    tr.tr_number.wrapping_add(2),
                    tr.tr_number
                )));
            }
            true
        }
        _ => false,
    };
    Ok(AlRecovery {
        slots,
        newest: newest_tr,
        fell_back,
        clean,
    })
}

/// Reads `md`'s activity log and decides its recovery (see the module documentation).
pub fn recover_al(md: &MetaData) -> Result<AlRecovery, MetaError> {
    let mut ring = vec![0u8; md.layout.al_size_bytes as usize];
    md.read_region(&mut ring, md.layout.al_offset_bytes)?;
    recover_ring(
        &ring,
        md.superblock.device_uuid,
        md.superblock.has_flag(flags::AL_CLEAN),
        md.superblock.al_tr_number,
        &Place::at(&md.md_path, md.layout.al_offset_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::al::encode_transaction;

    const UUID: u64 = 0x1234_5678_9abc_def0;

    fn tr(n: u64, extents: Vec<u32>) -> AlTransaction {
        AlTransaction {
            tr_number: n,
            device_uuid: UUID,
            al_extents: 61,
            extents,
        }
    }

    /// A ring holding transactions `numbers` in their slots.
    fn ring(numbers: &[u64]) -> Vec<u8> {
        let mut ring = vec![0u8; 8 * 4096];
        for &n in numbers {
            let slot = (n % 8) as usize;
            ring[slot * 4096..(slot + 1) * 4096]
                .copy_from_slice(&encode_transaction(&tr(n, vec![n as u32])).unwrap());
        }
        ring
    }

    fn tear(ring: &mut [u8], slot: usize) {
        // The first 512-byte sector of a new transaction reached the disk, the rest
        // is the old contents: the checksum fails.
        ring[slot * 4096 + 100] ^= 0x40;
    }

    #[test]
    fn clean_and_empty() {
        let r = recover_ring(&ring(&[]), UUID, false, 0, &Place::default()).unwrap();
        assert!(r.newest.is_none() && r.hot_extents().is_empty() && !r.fell_back);
        assert!(r.slots.iter().all(|s| *s == SlotState::Empty));
        let r = recover_ring(&ring(&[1, 2, 3]), UUID, true, 0, &Place::default()).unwrap();
        assert_eq!(r.newest.as_ref().unwrap().tr_number, 3);
        assert!(r.hot_extents().is_empty(), "clean: nothing to replay");
    }

    #[test]
    fn newest_wins_and_wraps() {
        let r = recover_ring(
            &ring(&(5..=14).collect::<Vec<_>>()),
            UUID,
            false,
            0,
            &Place::default(),
        )
        .unwrap();
        assert_eq!(r.newest.as_ref().unwrap().tr_number, 14);
        assert_eq!(r.hot_extents(), vec![14]);
        assert!(!r.fell_back);
    }

    #[test]
    fn torn_newest_falls_back() {
        for last in [1u64, 7, 8, 9, 30] {
            let first = last.saturating_sub(7).max(1);
            let mut ring = ring(&(first..=last).collect::<Vec<_>>());
            tear(&mut ring, (last % 8) as usize);
            let r = recover_ring(&ring, UUID, false, 0, &Place::default());
            if last == 1 {
                // The first transaction of a fresh ring was torn: nothing was hot.
                let r = r.unwrap();
                assert!(r.newest.is_none() && r.fell_back && r.hot_extents().is_empty());
                // The same image when the superblock says transaction 5 was written:
                // the hot set is unknown.
                let e = recover_ring(&ring, UUID, false, 5, &Place::default());
                assert!(matches!(e, Err(MetaError::AlUnrecoverable { .. })), "{e:?}");
                continue;
            }
            let r = r.unwrap();
            assert_eq!(
                r.newest.as_ref().unwrap().tr_number,
                last - 1,
                "last {last}"
            );
            assert!(r.fell_back);
            assert_eq!(r.hot_extents(), vec![(last - 1) as u32]);
        }
    }

    #[test]
    fn two_damaged_after_newest_refuses() {
        let mut ring = ring(&(3..=10).collect::<Vec<_>>());
        tear(&mut ring, 10 % 8);
        tear(&mut ring, 9 % 8);
        let e = recover_ring(&ring, UUID, false, 0, &Place::default()).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, MetaError::AlUnrecoverable { .. }));
        assert!(text.contains("transactions 9 and 10"), "{text}");
        assert!(text.contains("create-md --force"), "{text}");
        // The same ring after a clean shutdown: nothing hot, no refusal.
        assert!(recover_ring(&ring, UUID, true, 0, &Place::default()).is_ok());
    }

    #[test]
    fn older_damage_is_harmless() {
        let mut ring = ring(&(3..=10).collect::<Vec<_>>());
        tear(&mut ring, 4);
        let r = recover_ring(&ring, UUID, false, 0, &Place::default()).unwrap();
        assert_eq!(r.newest.unwrap().tr_number, 10);
        assert!(!r.fell_back);
        assert!(matches!(r.slots[4], SlotState::Damaged { .. }));
    }

    #[test]
    fn foreign_and_misplaced_are_ignored() {
        let mut ring = ring(&[1, 2]);
        let mut other = tr(3, vec![9]);
        other.device_uuid = 99;
        ring[3 * 4096..4 * 4096].copy_from_slice(&encode_transaction(&other).unwrap());
        ring[5 * 4096..6 * 4096].copy_from_slice(&encode_transaction(&tr(12, vec![1])).unwrap());
        let r = recover_ring(&ring, UUID, false, 0, &Place::default()).unwrap();
        assert_eq!(r.newest.unwrap().tr_number, 2);
        assert_eq!(r.slots[3], SlotState::Foreign { device_uuid: 99 });
        assert_eq!(r.slots[5], SlotState::Misplaced { tr_number: 12 });
    }
}
