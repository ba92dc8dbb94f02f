//! Packet authentication: signing with the `authkeys` key, MAC verification and replay
//! protection per sender.
//!
//! A packet is accepted when its MAC matches the key its `key_index` names (with the
//! algorithm that key is configured with), and when its `(generation, seq)` is new for
//! its sender: inside one generation `seq` must increase; a new generation is accepted
//! with a timestamp not older than the newest seen from that sender, when it is not one
//! of the sender's retired generations. Its sequence number may be anything: a sender
//! that restarted during a long partition has sent many packets by the time one gets
//! through (a bound on it made the peer refuse the restarted node forever; found by
//! the membership simulator, `sim/src/ha.rs`); replaying a recorded packet needs a
//! timestamp newer than every packet seen from the sender, i.e. one sent after them.
//! The same packet arrives once per link (a sender signs one packet and sends it on
//! every link): sequence numbers are also tracked per link, so the copy of
//! the newest packet is accepted once on each link (every link is seen alive) and never
//! twice on one; a copy older than the newest packet (links reordered) is refused as
//! stale, not counted as a replay.

use hmac::{Hmac, Mac};
use rdb_protocol::heartbeat::{self, AuthAlg, Packet, PacketError};
use std::collections::HashMap;

use crate::config::{AuthKey, AuthKeys};

/// Retired generations remembered per sender.
pub const RETIRED_GENERATIONS: usize = 16;
/// Senders tracked at most (a bound on the replay table).
pub const MAX_SENDERS: usize = 64;

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a well-formed packet.
    #[error("malformed packet: {0}")]
    Malformed(#[from] PacketError),
    /// No key with that index, or the key uses another algorithm.
    #[error("no key {index} with algorithm {alg}")]
    UnknownKey {
        /// Key index in the packet.
        index: u8,
        /// Algorithm in the packet.
        alg: &'static str,
    },
    /// The MAC does not match.
    #[error("bad MAC from '{0}'")]
    BadMac(String),
    /// The sequence number was already seen (or is older).
    #[error("replayed packet from '{sender}' (generation {generation:#x}, seq {seq})")]
    Replay {
        /// Claimed sender.
        sender: String,
        /// Generation.
        generation: u64,
        /// Sequence number.
        seq: u64,
    },
    /// The packet encodes wrongly (local bug or bad names).
    #[error("cannot encode: {0}")]
    Encode(PacketError),
    /// Too many distinct senders, or a link index beyond [`MAX_LINKS`].
    #[error("too many senders or links tracked")]
    TooManySenders,
    /// A copy of an older packet arriving on another link after a newer one.
    #[error("stale copy from '{sender}' (seq {seq}, newest {newest})")]
    Stale {
        /// Claimed sender.
        sender: String,
        /// Sequence number.
        seq: u64,
        /// Newest sequence number seen from the sender.
        newest: u64,
    },
}

macro_rules! hmac_with {
    ($digest:ty, $key:expr, $data:expr) => {{
        // HMAC accepts keys of any length, so new_from_slice cannot fail; an empty MAC
        // (which never verifies) would be the result if it did.
        match <Hmac<$digest> as Mac>::new_from_slice($key) {
            Ok(mut m) => {
                m.update($data);
                m.finalize().into_bytes().to_vec()
            }
            Err(_) => Vec::new(),
        }
    }};
}

/// Computes the MAC of `data` with `key`.
pub fn mac(key: &AuthKey, data: &[u8]) -> Vec<u8> {
    match key.alg {
        AuthAlg::Crc => {
            let mut h = crc32fast::Hasher::new();
            h.update(&key.secret);
            h.update(data);
            h.finalize().to_le_bytes().to_vec()
        }
        AuthAlg::Md5 => hmac_with!(md5::Md5, &key.secret, data),
        AuthAlg::Sha1 => hmac_with!(sha1::Sha1, &key.secret, data),
        AuthAlg::Sha256 => hmac_with!(sha2::Sha256, &key.secret, data),
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encodes `p` and appends the MAC of the active key; `p.alg`/`p.key_index` are set here.
pub fn sign(keys: &AuthKeys, mut p: Packet) -> Result<Vec<u8>, AuthError> {
    let key = keys.active_key().ok_or(AuthError::UnknownKey {
        index: keys.active,
        alg: "-",
    })?;
    p.alg = key.alg;
    p.key_index = key.index;
    let mut out = Vec::with_capacity(p.encoded_len());
    p.encode_unsigned(&mut out).map_err(AuthError::Encode)?;
    let m = mac(key, &out);
    out.extend_from_slice(&m);
    Ok(out)
}

/// Links tracked per sender (packets on a link index beyond are refused).
pub const MAX_LINKS: usize = 16;

#[derive(Debug, Clone)]
struct SenderTrack {
    generation: u64,
    seq: u64,
    timestamp_ms: u64,
    retired: Vec<u64>,
    /// Newest sequence number accepted on each link (0: none).
    link_seq: [u64; MAX_LINKS],
}

/// Counters of refused datagrams, by reason (for `status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RefusedCounters {
    /// Not a well-formed packet.
    pub malformed: u64,
    /// Unknown key index or algorithm.
    pub unknown_key: u64,
    /// MAC mismatch (wrong key, tampered).
    pub bad_mac: u64,
    /// Replayed or old sequence number / generation.
    pub replay: u64,
    /// Copies of older packets arriving late on another link (not an attack).
    pub stale: u64,
    /// Too many senders, or a link index out of range.
    pub other: u64,
}

/// Verifies datagrams and remembers the newest `(generation, seq)` of each sender.
#[derive(Debug)]
pub struct Verifier {
    keys: AuthKeys,
    senders: HashMap<String, SenderTrack>,
    refused: RefusedCounters,
}

impl Verifier {
    /// A verifier accepting any key of `keys`.
    pub fn new(keys: AuthKeys) -> Verifier {
        Verifier {
            keys,
            senders: HashMap::new(),
            refused: RefusedCounters::default(),
        }
    }

    /// Refused datagrams so far, by reason.
    pub fn refused(&self) -> &RefusedCounters {
        &self.refused
    }

    /// Decodes and authenticates one datagram received on link `link`; on success the
    /// sender's counters advance. A refused datagram changes nothing but the refusal
    /// counters.
    pub fn verify(&mut self, link: usize, datagram: &[u8]) -> Result<Packet, AuthError> {
        let r = self.check(link, datagram);
        if let Err(e) = &r {
            let c = &mut self.refused;
            match e {
                AuthError::Malformed(_) => c.malformed += 1,
                AuthError::UnknownKey { .. } => c.unknown_key += 1,
                AuthError::BadMac(_) => c.bad_mac += 1,
                AuthError::Replay { .. } => c.replay += 1,
                AuthError::Stale { .. } => c.stale += 1,
                AuthError::Encode(_) | AuthError::TooManySenders => c.other += 1,
            }
        }
        r
    }

    fn check(&mut self, link: usize, datagram: &[u8]) -> Result<Packet, AuthError> {
        if link >= MAX_LINKS {
            return Err(AuthError::TooManySenders);
        }
        let d = heartbeat::decode(datagram)?;
        let p = d.packet;
        let key = self
            .keys
            .keys
            .iter()
            .find(|k| k.index == p.key_index && k.alg == p.alg)
            .ok_or(AuthError::UnknownKey {
                index: p.key_index,
                alg: p.alg.as_str(),
            })?;
        if !ct_eq(&mac(key, d.signed), d.mac) {
            return Err(AuthError::BadMac(p.sender));
        }
        let replay = || AuthError::Replay {
            sender: p.sender.clone(),
            generation: p.generation,
            seq: p.seq,
        };
        match self.senders.get_mut(&p.sender) {
            Some(t) if t.generation == p.generation => {
                if p.seq <= t.link_seq[link] {
                    return Err(replay());
                }
                if p.seq < t.seq {
                    return Err(AuthError::Stale {
                        sender: p.sender.clone(),
                        seq: p.seq,
                        newest: t.seq,
                    });
                }
                // Newer, or the copy of the newest sent on another link.
                t.seq = p.seq;
                t.link_seq[link] = p.seq;
                t.timestamp_ms = t.timestamp_ms.max(p.timestamp_ms);
            }
            Some(t) => {
                if p.timestamp_ms < t.timestamp_ms || t.retired.contains(&p.generation) {
                    return Err(replay());
                }
                if t.retired.len() == RETIRED_GENERATIONS {
                    t.retired.remove(0);
                }
                t.retired.push(t.generation);
                t.generation = p.generation;
                t.seq = p.seq;
                t.link_seq = [0; MAX_LINKS];
                t.link_seq[link] = p.seq;
                t.timestamp_ms = p.timestamp_ms;
            }
            None => {
                if self.senders.len() >= MAX_SENDERS {
                    return Err(AuthError::TooManySenders);
                }
                self.senders.insert(
                    p.sender.clone(),
                    SenderTrack {
                        generation: p.generation,
                        seq: p.seq,
                        timestamp_ms: p.timestamp_ms,
                        retired: Vec::new(),
                        link_seq: {
                            let mut l = [0; MAX_LINKS];
                            l[link] = p.seq;
                            l
                        },
                    },
                );
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdb_protocol::heartbeat::{NodeState, PacketType};

    fn keys(alg: AuthAlg) -> AuthKeys {
        AuthKeys {
            active: 3,
            keys: vec![AuthKey {
                index: 3,
                alg,
                secret: b"azerty".to_vec(),
            }],
        }
    }

    fn pkt(generation: u64, seq: u64, ts: u64) -> Packet {
        Packet {
            kind: PacketType::Heartbeat,
            alg: AuthAlg::Md5,
            key_index: 0,
            generation,
            seq,
            timestamp_ms: ts,
            state: NodeState::Active,
            flags: 0,
            sender: "tho-web1".into(),
            owner: "tho-web1".into(),
        }
    }

    #[test]
    fn hmac_known_vector() {
        // RFC 2202 test case 2: HMAC-MD5("Jefe", "what do ya want for nothing?").
        let k = AuthKey {
            index: 1,
            alg: AuthAlg::Md5,
            secret: b"Jefe".to_vec(),
        };
        let m = mac(&k, b"what do ya want for nothing?");
        let hex: String = m.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "750c783e6ab0b503eaa86e310a5db738");
    }

    #[test]
    fn sign_verify_every_alg_and_reject_tampering() {
        for alg in [AuthAlg::Crc, AuthAlg::Md5, AuthAlg::Sha1, AuthAlg::Sha256] {
            let k = keys(alg);
            let mut v = Verifier::new(k.clone());
            let b = sign(&k, pkt(7, 1, 100)).unwrap();
            let p = v.verify(0, &b).unwrap();
            assert_eq!(p.alg, alg);
            for i in 0..b.len() {
                let mut c = b.clone();
                c[i] ^= 0x01;
                assert!(
                    v.verify(0, &c).is_err(),
                    "{alg:?} byte {i} flipped accepted"
                );
            }
        }
        let mut other = keys(AuthAlg::Sha256);
        other.keys[0].secret = b"wrong".to_vec();
        let b = sign(&other, pkt(7, 1, 100)).unwrap();
        let mut v = Verifier::new(keys(AuthAlg::Sha256));
        assert!(matches!(v.verify(0, &b), Err(AuthError::BadMac(_))));
        let b = sign(&keys(AuthAlg::Md5), pkt(7, 1, 100)).unwrap();
        assert!(matches!(v.verify(0, &b), Err(AuthError::UnknownKey { .. })));
    }

    #[test]
    fn replay_rules() {
        let k = keys(AuthAlg::Sha256);
        let mut v = Verifier::new(k.clone());
        let s = |g, q, t| sign(&k, pkt(g, q, t)).unwrap();
        let first = s(1, 1, 1000);
        v.verify(0, &first).unwrap();
        assert!(matches!(v.verify(0, &first), Err(AuthError::Replay { .. })));
        v.verify(0, &s(1, 5, 1010)).unwrap();
        assert!(v.verify(0, &s(1, 4, 1020)).is_err(), "older seq");
        // Restart: a new generation with a later timestamp.
        assert!(v.verify(0, &s(2, 1, 900)).is_err(), "older timestamp");
        // Its first packets may all have been lost (restarted during a partition):
        // any sequence number opens it.
        v.verify(0, &s(2, 500, 2000)).unwrap();
        // The retired generation cannot come back, even with a fresh-looking packet.
        assert!(v.verify(0, &s(1, 6, 3000)).is_err());
        assert!(v.verify(0, &s(1, 2, 3000)).is_err());
        assert!(v.verify(0, &s(2, 500, 2000)).is_err(), "replay");
        v.verify(0, &s(2, 501, 2001)).unwrap();
    }

    #[test]
    fn one_copy_per_link_and_counters() {
        let k = keys(AuthAlg::Sha256);
        let mut v = Verifier::new(k.clone());
        let a = sign(&k, pkt(1, 1, 1000)).unwrap();
        v.verify(0, &a).unwrap();
        v.verify(1, &a).unwrap();
        assert!(v.verify(1, &a).is_err(), "twice on one link");
        assert!(v.verify(0, &a).is_err(), "twice on one link");
        let b = sign(&k, pkt(1, 2, 1001)).unwrap();
        v.verify(1, &b).unwrap();
        v.verify(0, &b).unwrap();
        // An older packet is refused on every link, even one that missed it.
        assert!(matches!(v.verify(2, &a), Err(AuthError::Stale { .. })));
        let mut wrong = k.clone();
        wrong.keys[0].secret = b"wrong".to_vec();
        assert!(v
            .verify(0, &sign(&wrong, pkt(1, 3, 1002)).unwrap())
            .is_err());
        assert!(v.verify(0, b"junk").is_err());
        assert_eq!(
            *v.refused(),
            RefusedCounters {
                malformed: 1,
                unknown_key: 0,
                bad_mac: 1,
                replay: 2,
                stale: 1,
                other: 0
            }
        );
    }
}
