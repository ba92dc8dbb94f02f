//! Heartbeat packets of `rdb-ha`, sans I/O.
//!
//! This module owns the byte layout of the UDP datagrams exchanged by `rdb-ha` daemons
//! (documented byte by byte in `docs/ha.md`). A packet is a 36-byte fixed header, the
//! sender's node name, the sender's view of the group owner, then a MAC whose length is
//! fixed by the algorithm byte. All integers are little-endian.
//!
//! The MAC is computed by the caller (the `rdb-ha` crate holds the keys) over every byte
//! before it: [`Packet::encode_unsigned`] writes those bytes, the caller appends the MAC;
//! [`decode`] splits a datagram into the packet, the signed bytes and the MAC. Decoding
//! never panics and never allocates more than two short strings.

/// Packet magic: the bytes `b"RDBH"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RDBH");
/// The only packet version this implementation speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_BYTES: usize = 36;
/// Longest node name in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest MAC (SHA-256).
pub const MAX_MAC_BYTES: usize = 32;
/// Largest datagram a valid packet can occupy.
pub const MAX_PACKET_BYTES: usize = HEADER_BYTES + 2 * MAX_NAME_BYTES + MAX_MAC_BYTES;

/// What a packet announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// Periodic liveness and state announcement.
    Heartbeat = 1,
    /// The sender asks every other node to go standby (it takes the group).
    TakeoverRequest = 2,
    /// Reply to a takeover request: the sender went standby.
    TakeoverAck = 3,
    /// The sender went standby (admin `standby`).
    Standby = 4,
    /// The sender's resource state changed (sent at once, not waiting for keepalive).
    ResourceState = 5,
    /// The sender is shutting down cleanly and holds no resource.
    Shutdown = 6,
}

impl PacketType {
    fn from_u8(v: u8) -> Option<PacketType> {
        Some(match v {
            1 => PacketType::Heartbeat,
            2 => PacketType::TakeoverRequest,
            3 => PacketType::TakeoverAck,
            4 => PacketType::Standby,
            5 => PacketType::ResourceState,
            6 => PacketType::Shutdown,
            _ => return None,
        })
    }
}

/// The sender's own state with respect to the resource group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Holds no resource.
    Standby = 0,
    /// Acquiring the group (some resources may be running).
    Starting = 1,
    /// Runs the whole group.
    Active = 2,
    /// Releasing the group (some resources may be running).
    Stopping = 3,
}

impl NodeState {
    fn from_u8(v: u8) -> Option<NodeState> {
        Some(match v {
            0 => NodeState::Standby,
            1 => NodeState::Starting,
            2 => NodeState::Active,
            3 => NodeState::Stopping,
            _ => return None,
        })
    }

    /// Lower-case name used in logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Standby => "standby",
            NodeState::Starting => "starting",
            NodeState::Active => "active",
            NodeState::Stopping => "stopping",
        }
    }

    /// True when the node may hold some resource of the group.
    pub fn holds_resources(self) -> bool {
        !matches!(self, NodeState::Standby)
    }
}

/// MAC algorithm of a packet (from `authkeys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthAlg {
    /// CRC-32 of key and data: integrity only, no authentication.
    Crc = 1,
    /// HMAC-MD5 (16 bytes).
    Md5 = 2,
    /// HMAC-SHA1 (20 bytes).
    Sha1 = 3,
    /// HMAC-SHA256 (32 bytes).
    Sha256 = 4,
}

impl AuthAlg {
    fn from_u8(v: u8) -> Option<AuthAlg> {
        Some(match v {
            1 => AuthAlg::Crc,
            2 => AuthAlg::Md5,
            3 => AuthAlg::Sha1,
            4 => AuthAlg::Sha256,
            _ => return None,
        })
    }

    /// Length of the MAC this algorithm appends.
    pub fn mac_len(self) -> usize {
        match self {
            AuthAlg::Crc => 4,
            AuthAlg::Md5 => 16,
            AuthAlg::Sha1 => 20,
            AuthAlg::Sha256 => 32,
        }
    }

    /// Name as written in `authkeys`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthAlg::Crc => "crc",
            AuthAlg::Md5 => "md5",
            AuthAlg::Sha1 => "sha1",
            AuthAlg::Sha256 => "sha256",
        }
    }
}

/// `Packet::flags` bit: the sender is in standby (it takes the group only if nobody else can).
pub const FLAG_STANDBY: u8 = 1 << 0;
/// `Packet::flags` bit: the sender failed to run the group and will not try again.
pub const FLAG_FAILED: u8 = 1 << 1;
/// `Packet::flags` bit: ping nodes are configured and none is reachable from the sender.
pub const FLAG_PING_LOST: u8 = 1 << 2;
/// Every defined flag bit.
pub const FLAGS_ALL: u8 = FLAG_STANDBY | FLAG_FAILED | FLAG_PING_LOST;

/// One heartbeat packet, without its MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// What the packet announces.
    pub kind: PacketType,
    /// MAC algorithm of the appended MAC.
    pub alg: AuthAlg,
    /// Key index in `authkeys` (`auth N`).
    pub key_index: u8,
    /// Random per sender process start.
    pub generation: u64,
    /// Sequence number, from 1 at each process start, increasing by one per packet.
    pub seq: u64,
    /// Sender's wall clock in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Sender's own state.
    pub state: NodeState,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Sender node name (1..=64 bytes).
    pub sender: String,
    /// Who the sender believes owns the group (empty: nobody).
    pub owner: String,
}

/// Why bytes could not be decoded as a heartbeat packet, or a packet not encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than the layout requires.
    #[error("truncated packet: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the layout requires.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// More bytes than the layout describes.
    #[error("{0} trailing bytes after the MAC")]
    Trailing(usize),
    /// The packet does not start with [`MAGIC`].
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// Unsupported version.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Unknown packet type code.
    #[error("unknown packet type {0}")]
    BadType(u8),
    /// Unknown MAC algorithm code.
    #[error("unknown auth algorithm {0}")]
    BadAlg(u8),
    /// Unknown node state code.
    #[error("unknown node state {0}")]
    BadState(u8),
    /// Undefined flag bits set.
    #[error("undefined flag bits {0:#04x}")]
    BadFlags(u8),
    /// Reserved bytes not zero.
    #[error("reserved bytes not zero")]
    Reserved,
    /// Name empty (sender), too long, or not UTF-8.
    #[error("invalid {0} name")]
    BadName(&'static str),
    /// The sequence number 0 is never sent.
    #[error("sequence number 0")]
    ZeroSeq,
}

/// A decoded datagram: the packet, the bytes the MAC covers, and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The packet fields.
    pub packet: Packet,
    /// Every byte before the MAC (what the MAC covers).
    pub signed: &'a [u8],
    /// The MAC as received.
    pub mac: &'a [u8],
}

fn check_name(name: &str, what: &'static str, allow_empty: bool) -> Result<(), PacketError> {
    if name.len() > MAX_NAME_BYTES || (!allow_empty && name.is_empty()) {
        return Err(PacketError::BadName(what));
    }
    Ok(())
}

impl Packet {
    /// Writes every byte the MAC covers (header and names) to `out`; the caller then
    /// appends a MAC of `self.alg.mac_len()` bytes computed over exactly these bytes.
    pub fn encode_unsigned(&self, out: &mut Vec<u8>) -> Result<(), PacketError> {
        check_name(&self.sender, "sender", false)?;
        check_name(&self.owner, "owner", true)?;
        if self.flags & !FLAGS_ALL != 0 {
            return Err(PacketError::BadFlags(self.flags));
        }
        if self.seq == 0 {
            return Err(PacketError::ZeroSeq);
        }
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(VERSION);
        out.push(self.kind as u8);
        out.push(self.alg as u8);
        out.push(self.key_index);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.push(self.state as u8);
        out.push(self.flags);
        // Both lengths were checked <= 64 above, so they fit in a byte.
        out.push(self.sender.len() as u8);
        out.push(self.owner.len() as u8);
        out.extend_from_slice(self.sender.as_bytes());
        out.extend_from_slice(self.owner.as_bytes());
        Ok(())
    }

    /// Length of the whole datagram (signed bytes and MAC).
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.sender.len() + self.owner.len() + self.alg.mac_len()
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes one datagram. Never panics; every malformed input is a [`PacketError`].
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, PacketError> {
    if buf.len() < HEADER_BYTES {
        return Err(PacketError::Truncated {
            needed: HEADER_BYTES,
            got: buf.len(),
        });
    }
    let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != MAGIC {
        return Err(PacketError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(PacketError::BadVersion(buf[4]));
    }
    let kind = PacketType::from_u8(buf[5]).ok_or(PacketError::BadType(buf[5]))?;
    let alg = AuthAlg::from_u8(buf[6]).ok_or(PacketError::BadAlg(buf[6]))?;
    let key_index = buf[7];
    let generation = le_u64(buf, 8);
    let seq = le_u64(buf, 16);
    let timestamp_ms = le_u64(buf, 24);
    let state = NodeState::from_u8(buf[32]).ok_or(PacketError::BadState(buf[32]))?;
    let flags = buf[33];
    if flags & !FLAGS_ALL != 0 {
        return Err(PacketError::BadFlags(flags));
    }
    let sender_len = usize::from(buf[34]);
    let owner_len = usize::from(buf[35]);
    if sender_len == 0 || sender_len > MAX_NAME_BYTES {
        return Err(PacketError::BadName("sender"));
    }
    if owner_len > MAX_NAME_BYTES {
        return Err(PacketError::BadName("owner"));
    }
    if seq == 0 {
        return Err(PacketError::ZeroSeq);
    }
    let signed_len = HEADER_BYTES + sender_len + owner_len;
    let total = signed_len + alg.mac_len();
    if buf.len() < total {
        return Err(PacketError::Truncated {
            needed: total,
            got: buf.len(),
        });
    }
    if buf.len() > total {
        return Err(PacketError::Trailing(buf.len() - total));
    }
    let sender = std::str::from_utf8(&buf[HEADER_BYTES..HEADER_BYTES + sender_len])
        .map_err(|_| PacketError::BadName("sender"))?
        .to_owned();
    let owner = std::str::from_utf8(&buf[HEADER_BYTES + sender_len..signed_len])
        .map_err(|_| PacketError::BadName("owner"))?
        .to_owned();
    Ok(Decoded {
        packet: Packet {
            kind,
            alg,
            key_index,
            generation,
            seq,
            timestamp_ms,
            state,
            flags,
            sender,
            owner,
        },
        signed: &buf[..signed_len],
        mac: &buf[signed_len..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(alg: AuthAlg) -> Packet {
        Packet {
            kind: PacketType::Heartbeat,
            alg,
            key_index: 3,
            generation: 0x0123_4567_89ab_cdef,
            seq: 94,
            timestamp_ms: 1_580_668_609_000,
            state: NodeState::Active,
            flags: FLAG_STANDBY,
            sender: "tho-web2".into(),
            owner: "tho-web2".into(),
        }
    }

    fn encode(p: &Packet) -> Vec<u8> {
        let mut v = Vec::new();
        p.encode_unsigned(&mut v).unwrap();
        v.extend((0..p.alg.mac_len()).map(|i| i as u8 ^ 0x5a));
        v
    }

    #[test]
    fn heartbeat_round_trip_every_type_state_alg() {
        let kinds = [
            PacketType::Heartbeat,
            PacketType::TakeoverRequest,
            PacketType::TakeoverAck,
            PacketType::Standby,
            PacketType::ResourceState,
            PacketType::Shutdown,
        ];
        let states = [
            NodeState::Standby,
            NodeState::Starting,
            NodeState::Active,
            NodeState::Stopping,
        ];
        for alg in [AuthAlg::Crc, AuthAlg::Md5, AuthAlg::Sha1, AuthAlg::Sha256] {
            for kind in kinds {
                for state in states {
                    let mut p = sample(alg);
                    p.kind = kind;
                    p.state = state;
                    let bytes = encode(&p);
                    assert_eq!(bytes.len(), p.encoded_len());
                    let d = decode(&bytes).unwrap();
                    assert_eq!(d.packet, p);
                    assert_eq!(d.signed, &bytes[..bytes.len() - alg.mac_len()]);
                    assert_eq!(d.mac, &bytes[bytes.len() - alg.mac_len()..]);
                }
            }
        }
    }

    #[test]
    fn heartbeat_fixed_layout() {
        let mut p = sample(AuthAlg::Md5);
        p.owner = String::new();
        let b = encode(&p);
        assert_eq!(&b[0..4], b"RDBH");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 1);
        assert_eq!(b[6], 2);
        assert_eq!(b[7], 3);
        assert_eq!(&b[8..16], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert_eq!(&b[16..24], &94u64.to_le_bytes());
        assert_eq!(b[32], 2);
        assert_eq!(b[33], FLAG_STANDBY);
        assert_eq!(b[34], 8);
        assert_eq!(b[35], 0);
        assert_eq!(&b[36..44], b"tho-web2");
        assert_eq!(b.len(), 36 + 8 + 16);
    }

    #[test]
    fn heartbeat_every_truncation_is_an_error() {
        let b = encode(&sample(AuthAlg::Sha256));
        for n in 0..b.len() {
            assert!(
                matches!(decode(&b[..n]), Err(PacketError::Truncated { .. })),
                "prefix {n}"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(PacketError::Trailing(1)));
    }

    #[test]
    fn heartbeat_bad_fields() {
        let b = encode(&sample(AuthAlg::Sha1));
        let with = |i: usize, v: u8| {
            let mut c = b.clone();
            c[i] = v;
            decode(&c).map(|d| d.packet)
        };
        assert!(matches!(with(0, b'X'), Err(PacketError::BadMagic(_))));
        assert_eq!(with(4, 2), Err(PacketError::BadVersion(2)));
        assert_eq!(with(5, 0), Err(PacketError::BadType(0)));
        assert_eq!(with(6, 9), Err(PacketError::BadAlg(9)));
        assert_eq!(with(32, 7), Err(PacketError::BadState(7)));
        assert_eq!(with(33, 0x80), Err(PacketError::BadFlags(0x80)));
        assert_eq!(with(34, 0), Err(PacketError::BadName("sender")));
        assert_eq!(with(35, 65), Err(PacketError::BadName("owner")));
        assert_eq!(with(36, 0xff), Err(PacketError::BadName("sender")));
        let mut z = b.clone();
        z[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(decode(&z).map(|d| d.packet), Err(PacketError::ZeroSeq));
    }

    #[test]
    fn heartbeat_encode_rejects_bad_packets() {
        let mut p = sample(AuthAlg::Md5);
        p.sender = String::new();
        assert!(p.encode_unsigned(&mut Vec::new()).is_err());
        let mut p = sample(AuthAlg::Md5);
        p.owner = "x".repeat(65);
        assert!(p.encode_unsigned(&mut Vec::new()).is_err());
        let mut p = sample(AuthAlg::Md5);
        p.seq = 0;
        assert!(p.encode_unsigned(&mut Vec::new()).is_err());
    }

    #[test]
    fn heartbeat_random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let base = encode(&sample(AuthAlg::Sha256));
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut c = base.clone();
            let i = (x as usize) % c.len();
            c[i] = (x >> 32) as u8;
            let cut = ((x >> 40) as usize) % (c.len() + 1);
            let _ = decode(&c[..cut]);
            let _ = decode(&c);
        }
    }
}
