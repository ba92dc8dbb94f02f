//! Replication frames between two rdb nodes, sans I/O.
//!
//! This module owns the byte layout of every frame exchanged on the replication link
//! (documented byte by byte in `docs/protocol.md`). A frame is a 16-byte header followed
//! by a body of `body_len` bytes; all integers are little-endian.
//!
//! Decoding is check-then-parse: [`Frame::check`] validates the header and tells how many
//! bytes the whole frame needs ([`FrameError::Incomplete`] when the buffer is short);
//! [`Frame::decode`] (or [`Frame::decode_parts`]) then parses the body. Decoders never
//! panic and never allocate more than the (bounded) frame size.
//!
//! Frames that carry block data (`Data`, `ResyncData`) are generic over the payload type
//! `P` so the payload never has to be copied: [`Frame::encode_header`] writes everything
//! but the payload (the caller then writes its own `&[u8]`/`Bytes`), and
//! [`Frame::decode_parts`] returns the payload as a `Range<usize>` into the input buffer,
//! which a transport turns into a zero-copy slice with [`Frame::map_payload`].

use std::ops::Range;

/// Header magic: the bytes `b"RDB1"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RDB1");
/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 16;
/// Largest block payload carried by one `Data` or `ResyncData` frame.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Largest body (fixed fields + digest + payload) a frame may declare.
pub const MAX_BODY_BYTES: usize = MAX_PAYLOAD_BYTES + 128;
/// Largest whole frame (header + body).
pub const MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_BODY_BYTES;
/// Largest string (node name, resource name, reasons) in bytes of UTF-8.
pub const MAX_STRING_BYTES: usize = 256;
/// Largest digest or MAC (SHA-512 size).
pub const MAX_DIGEST_BYTES: usize = 64;
/// Largest number of 64-bit words in one `BitmapChunk` (512 KiB, 4 Mi bits).
pub const MAX_BITMAP_WORDS: usize = 65536;
/// Oldest replication protocol version this implementation speaks.
pub const PROTO_VERSION_MIN: u32 = 1;
/// Newest replication protocol version this implementation speaks.
pub const PROTO_VERSION_MAX: u32 = 1;

/// `Hello::features` bit: this node has a shared secret configured and will authenticate.
pub const FEATURE_AUTH: u64 = 1 << 0;
/// `Hello::features` bit: this node understands `ResyncZeroes` (command 29); a
/// SyncSource sends it only to a peer that announced this bit, otherwise a zero chunk
/// goes as `ResyncData` with a zero payload.
pub const FEATURE_RESYNC_ZEROES: u64 = 1 << 1;
/// `Hello::features` bit: this node sends `NetSettings` (command 30) at the end of
/// the handshake; both send it (and compare) only when both announced this bit.
pub const FEATURE_NET_SETTINGS: u64 = 1 << 2;
/// The optional frames this implementation supports, announced in every `Hello`
/// (`FEATURE_AUTH` is added when a shared secret is configured).
pub const FEATURES_SUPPORTED: u64 = FEATURE_RESYNC_ZEROES | FEATURE_NET_SETTINGS;

/// The optional frames a connection may use: the bits of [`FEATURES_SUPPORTED`] both
/// sides announced (`FEATURE_AUTH` is not negotiated this way: one side having a
/// secret and not the other is a refusal). Unknown bits of a newer peer are ignored.
pub fn negotiate_features(ours: u64, peer: u64) -> u64 {
    ours & peer & FEATURES_SUPPORTED
}

/// `Data::flags` bit: force unit access (write through to stable storage).
pub const DATA_FUA: u32 = 1 << 0;
/// `Data::flags` bit: flush the peer's disk cache before this write.
pub const DATA_FLUSH: u32 = 1 << 1;
/// `Data::flags` bit: discard the range (no payload).
pub const DATA_TRIM: u32 = 1 << 2;
/// `Data::flags` bit: write zeroes to the range (no payload).
pub const DATA_ZEROES: u32 = 1 << 3;
/// `Data::flags` bit: the write belongs to a resync rather than application I/O.
pub const DATA_RESYNC: u32 = 1 << 4;
/// Every defined `Data::flags` bit.
pub const DATA_FLAGS_ALL: u32 = DATA_FUA | DATA_FLUSH | DATA_TRIM | DATA_ZEROES | DATA_RESYNC;

/// `State::role` codes.
pub const ROLE_UNKNOWN: u8 = 0;
/// Role code: Primary.
pub const ROLE_PRIMARY: u8 = 1;
/// Role code: Secondary.
pub const ROLE_SECONDARY: u8 = 2;
/// `State::disk` codes, in the order of DRBD's disk states.
pub const DISK_DISKLESS: u8 = 0;
/// Disk code: Attaching.
pub const DISK_ATTACHING: u8 = 1;
/// Disk code: Inconsistent.
pub const DISK_INCONSISTENT: u8 = 2;
/// Disk code: Outdated.
pub const DISK_OUTDATED: u8 = 3;
/// Disk code: DUnknown.
pub const DISK_DUNKNOWN: u8 = 4;
/// Disk code: Consistent.
pub const DISK_CONSISTENT: u8 = 5;
/// Disk code: UpToDate.
pub const DISK_UPTODATE: u8 = 6;

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The buffer holds a valid prefix; at least `needed` more bytes are required.
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// Minimum number of additional bytes before the next attempt can progress.
        needed: usize,
    },
    /// The header does not start with [`MAGIC`].
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The command code is not defined.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// Reserved header flags are not zero.
    #[error("reserved header flags {0:#06x} set")]
    BadHeaderFlags(u16),
    /// The declared body length is impossible for the command (or over the limit).
    #[error("command {command}: body length {len} out of range")]
    BadLength {
        /// Command code.
        command: u16,
        /// Declared body length.
        len: usize,
    },
    /// A field is invalid or inconsistent with the body length.
    #[error("command {command}: invalid field: {what}")]
    Invalid {
        /// Command code.
        command: u16,
        /// Which rule was broken.
        what: &'static str,
    },
}

/// A digest or MAC of at most [`MAX_DIGEST_BYTES`] bytes, stored inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    len: u8,
    bytes: [u8; MAX_DIGEST_BYTES],
}

impl Digest {
    /// The empty digest.
    pub const EMPTY: Digest = Digest {
        len: 0,
        bytes: [0; MAX_DIGEST_BYTES],
    };

    /// A digest holding `bytes`, or `None` when longer than [`MAX_DIGEST_BYTES`].
    pub fn new(bytes: &[u8]) -> Option<Digest> {
        if bytes.len() > MAX_DIGEST_BYTES {
            return None;
        }
        let mut d = Digest::EMPTY;
        d.bytes[..bytes.len()].copy_from_slice(bytes);
        d.len = bytes.len() as u8; // <= 64 checked above
        Some(d)
    }

    /// The digest bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True when the digest is empty (no digest).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Digest {
    fn default() -> Self {
        Digest::EMPTY
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest(")?;
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Command codes (header bytes 4..6).
pub mod cmd {
    /// Hello.
    pub const HELLO: u16 = 1;
    /// AuthChallenge.
    pub const AUTH_CHALLENGE: u16 = 2;
    /// AuthResponse.
    pub const AUTH_RESPONSE: u16 = 3;
    /// AuthResult.
    pub const AUTH_RESULT: u16 = 4;
    /// State.
    pub const STATE: u16 = 5;
    /// Uuids.
    pub const UUIDS: u16 = 6;
    /// Data.
    pub const DATA: u16 = 7;
    /// RecvAck.
    pub const RECV_ACK: u16 = 8;
    /// WriteAck.
    pub const WRITE_ACK: u16 = 9;
    /// NegAck.
    pub const NEG_ACK: u16 = 10;
    /// Barrier.
    pub const BARRIER: u16 = 11;
    /// BarrierAck.
    pub const BARRIER_ACK: u16 = 12;
    /// Flush.
    pub const FLUSH: u16 = 13;
    /// FlushAck.
    pub const FLUSH_ACK: u16 = 14;
    /// Ping.
    pub const PING: u16 = 15;
    /// PingAck.
    pub const PING_ACK: u16 = 16;
    /// StateChangeRequest.
    pub const STATE_CHANGE_REQUEST: u16 = 17;
    /// StateChangeReply.
    pub const STATE_CHANGE_REPLY: u16 = 18;
    /// BitmapChunk.
    pub const BITMAP_CHUNK: u16 = 19;
    /// BitmapDone.
    pub const BITMAP_DONE: u16 = 20;
    /// ResyncRequest.
    pub const RESYNC_REQUEST: u16 = 21;
    /// ResyncData.
    pub const RESYNC_DATA: u16 = 22;
    /// ResyncInSync.
    pub const RESYNC_IN_SYNC: u16 = 23;
    /// ChecksumRequest.
    pub const CHECKSUM_REQUEST: u16 = 24;
    /// OutOfSync.
    pub const OUT_OF_SYNC: u16 = 25;
    /// VerifyRequest.
    pub const VERIFY_REQUEST: u16 = 26;
    /// VerifyReply.
    pub const VERIFY_REPLY: u16 = 27;
    /// Disconnect.
    pub const DISCONNECT: u16 = 28;
    /// ResyncZeroes.
    pub const RESYNC_ZEROES: u16 = 29;
    /// NetSettings.
    pub const NET_SETTINGS: u16 = 30;
    /// Highest defined command code.
    pub const LAST: u16 = NET_SETTINGS;
}

/// Fixed body bytes of a `Data` frame before the digest.
const DATA_FIXED_BYTES: usize = 36;
/// Fixed body bytes of range frames (offset u64, id u64, len u32).
const RANGE_FIXED_BYTES: usize = 20;
/// Fixed body bytes of a `Hello` before its two strings.
const HELLO_FIXED_BYTES: usize = 20;

/// Inclusive (min, max) body length allowed for a command; `None` for unknown commands.
fn body_len_bounds(command: u16) -> Option<(usize, usize)> {
    let s = 2 + MAX_STRING_BYTES;
    let b = match command {
        cmd::HELLO => (HELLO_FIXED_BYTES + 4, HELLO_FIXED_BYTES + 2 * s),
        cmd::AUTH_CHALLENGE => (32, 32),
        cmd::AUTH_RESPONSE => (1, 1 + MAX_DIGEST_BYTES),
        cmd::AUTH_RESULT => (1, 1),
        cmd::STATE => (16, 16),
        cmd::UUIDS => (48, 48),
        cmd::DATA => (DATA_FIXED_BYTES, MAX_BODY_BYTES),
        cmd::RECV_ACK | cmd::WRITE_ACK => (16, 16),
        cmd::NEG_ACK => (20, 20),
        cmd::BARRIER => (4, 4),
        cmd::BARRIER_ACK => (8, 8),
        cmd::FLUSH | cmd::FLUSH_ACK => (8, 8),
        cmd::PING | cmd::PING_ACK | cmd::BITMAP_DONE => (0, 0),
        cmd::STATE_CHANGE_REQUEST => (8, 8),
        cmd::STATE_CHANGE_REPLY => (3, 1 + s),
        cmd::BITMAP_CHUNK => (12, 12 + 8 * MAX_BITMAP_WORDS),
        cmd::RESYNC_REQUEST | cmd::RESYNC_IN_SYNC | cmd::VERIFY_REQUEST | cmd::RESYNC_ZEROES => {
            (RANGE_FIXED_BYTES, RANGE_FIXED_BYTES)
        }
        cmd::RESYNC_DATA => (RANGE_FIXED_BYTES, RANGE_FIXED_BYTES + MAX_PAYLOAD_BYTES),
        cmd::CHECKSUM_REQUEST | cmd::VERIFY_REPLY => (
            RANGE_FIXED_BYTES + 1,
            RANGE_FIXED_BYTES + 1 + MAX_DIGEST_BYTES,
        ),
        cmd::OUT_OF_SYNC => (12, 12),
        cmd::DISCONNECT => (2, s),
        cmd::NET_SETTINGS => (8 + 2, 8 + s),
        _ => return None,
    };
    debug_assert!(b.1 <= MAX_BODY_BYTES);
    Some(b)
}

/// The decoded 16-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Command code (see [`cmd`]).
    pub command: u16,
    /// Volume number inside the resource the frame is about (0 for connection frames).
    pub volume: u32,
    /// Body length in bytes (everything after the header).
    pub body_len: usize,
}

impl Header {
    /// Total frame length (header + body).
    pub fn frame_len(&self) -> usize {
        HEADER_BYTES + self.body_len
    }

    /// Validate and decode the header at the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Header, FrameError> {
        let Some(h) = buf.get(..HEADER_BYTES) else {
            return Err(FrameError::Incomplete {
                needed: HEADER_BYTES - buf.len(),
            });
        };
        let mut r = Reader::new(h, 0);
        // The reads below cannot fail: `h` is exactly HEADER_BYTES long.
        let magic = r.u32()?;
        let command = r.u16()?;
        let flags = r.u16()?;
        let volume = r.u32()?;
        let body_len = r.u32()? as usize;
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let Some((min, max)) = body_len_bounds(command) else {
            return Err(FrameError::UnknownCommand(command));
        };
        if flags != 0 {
            return Err(FrameError::BadHeaderFlags(flags));
        }
        if body_len < min || body_len > max {
            return Err(FrameError::BadLength {
                command,
                len: body_len,
            });
        }
        Ok(Header {
            command,
            volume,
            body_len,
        })
    }
}

/// One replication frame. `P` is the payload type of `Data` and `ResyncData`:
/// `Vec<u8>` by default, `Range<usize>` straight out of [`Frame::decode_parts`],
/// `bytes::Bytes` in the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<P = Vec<u8>> {
    /// First frame of each side: version range, features, names.
    Hello {
        /// Oldest protocol version spoken.
        proto_min: u32,
        /// Newest protocol version spoken.
        proto_max: u32,
        /// Feature bits ([`FEATURE_AUTH`], [`FEATURE_RESYNC_ZEROES`], [`FEATURE_NET_SETTINGS`]).
        features: u64,
        /// Sender's node name.
        node_name: String,
        /// Resource name (must match on both sides).
        resource: String,
        /// Number of volumes of the resource on the sender.
        volumes: u32,
    },
    /// Authentication challenge: a random nonce to answer with an HMAC.
    AuthChallenge {
        /// Random nonce.
        nonce: [u8; 32],
    },
    /// Answer to the peer's challenge.
    AuthResponse {
        /// HMAC (see `docs/protocol.md`).
        mac: Digest,
    },
    /// Whether the peer's response was accepted.
    AuthResult {
        /// True when accepted.
        ok: bool,
    },
    /// Role and disk state of the sender.
    State {
        /// Role code (`ROLE_*`).
        role: u8,
        /// Disk state code (`DISK_*`).
        disk: u8,
        /// State flags (meaning owned by the engine).
        flags: u32,
        /// Usable size of the sender's backing device.
        size_bytes: u64,
    },
    /// Generation UUIDs of the sender.
    Uuids {
        /// Current UUID.
        current: u64,
        /// Bitmap UUID.
        bitmap: u64,
        /// History UUIDs.
        history: [u64; 2],
        /// Number of bits set in the sender's bitmap.
        bitmap_bits: u64,
        /// UUID flags (meaning owned by the engine).
        flags: u64,
    },
    /// A replicated write.
    Data {
        /// Byte offset on the device.
        offset_bytes: u64,
        /// Length of the write in bytes (payload length unless TRIM/ZEROES).
        len: u32,
        /// Request id, echoed in acks.
        request_id: u64,
        /// Sequence number, echoed in acks.
        seq: u64,
        /// `DATA_*` flags.
        flags: u32,
        /// Optional data-integrity digest of the payload (empty = none).
        digest: Digest,
        /// Block data: `len` bytes, or empty for TRIM/ZEROES.
        payload: P,
    },
    /// The peer received a `Data` frame (protocol B).
    RecvAck {
        /// Request id of the Data frame.
        request_id: u64,
        /// Sequence number of the Data frame.
        seq: u64,
    },
    /// The peer wrote a `Data` frame to its disk (protocol C).
    WriteAck {
        /// Request id of the Data frame.
        request_id: u64,
        /// Sequence number of the Data frame.
        seq: u64,
    },
    /// The peer failed to write a `Data` frame.
    NegAck {
        /// Request id of the Data frame.
        request_id: u64,
        /// Sequence number of the Data frame.
        seq: u64,
        /// errno of the failure.
        errno: u32,
    },
    /// End of a write epoch.
    Barrier {
        /// Epoch number.
        epoch: u32,
    },
    /// All writes of an epoch are on the peer's disk.
    BarrierAck {
        /// Epoch number.
        epoch: u32,
        /// Number of writes in the epoch.
        count: u32,
    },
    /// Flush the peer's disk.
    Flush {
        /// Flush id, echoed in FlushAck.
        id: u64,
    },
    /// The flush is done.
    FlushAck {
        /// Flush id.
        id: u64,
    },
    /// Keepalive request (handled inside the transport).
    Ping,
    /// Keepalive answer (handled inside the transport).
    PingAck,
    /// Ask the peer to agree to a state change.
    StateChangeRequest {
        /// Requested role code.
        role: u8,
        /// Request flags (meaning owned by the engine).
        flags: u32,
    },
    /// Answer to a StateChangeRequest.
    StateChangeReply {
        /// True when accepted.
        ok: bool,
        /// Why not (empty when ok).
        reason: String,
    },
    /// A chunk of the sender's out-of-sync bitmap.
    BitmapChunk {
        /// Bit index of the first bit of `words[0]`.
        offset_bits: u64,
        /// Bitmap words (bit i of word j is bit `offset_bits + 64*j + i`).
        words: Vec<u64>,
    },
    /// The bitmap exchange is complete.
    BitmapDone,
    /// Ask for a block range during resync.
    ResyncRequest {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
        /// Request id.
        id: u64,
    },
    /// Resync data for a ResyncRequest.
    ResyncData {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes (= payload length).
        len: u32,
        /// Request id.
        id: u64,
        /// Block data.
        payload: P,
    },
    /// Resync data that reads as zeroes (DRBD 9's `rs_is_zero`): the SyncTarget
    /// writes zeroes (it may deallocate), so both disks read the same.
    ResyncZeroes {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
        /// Request id.
        id: u64,
    },
    /// The requested range is already equal (checksum-based resync).
    ResyncInSync {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
        /// Request id.
        id: u64,
    },
    /// Ask for a range, sending our checksum first (csums-alg).
    ChecksumRequest {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
        /// Request id.
        id: u64,
        /// Checksum of our copy.
        digest: Digest,
    },
    /// Mark a range out of sync on the peer.
    OutOfSync {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
    },
    /// Online verify: ask the peer for the digest of a range.
    VerifyRequest {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
        /// Request id.
        id: u64,
    },
    /// Online verify: the peer's digest of a range.
    VerifyReply {
        /// Byte offset.
        offset_bytes: u64,
        /// Length in bytes.
        len: u32,
        /// Request id.
        id: u64,
        /// Digest of the peer's copy.
        digest: Digest,
    },
    /// The sender closes the connection.
    Disconnect {
        /// Why.
        reason: String,
    },
    /// The net settings both nodes must agree on (DRBD's P_PROTOCOL), sent once by
    /// each side at the end of the handshake. Codes are indexes into the
    /// configuration keyword lists; the receiver compares (see `docs/protocol.md`).
    NetSettings {
        /// Replication protocol: `b'A'`, `b'B'` or `b'C'`.
        protocol: u8,
        /// `after-sb-0pri` code.
        after_sb_0pri: u8,
        /// `after-sb-1pri` code.
        after_sb_1pri: u8,
        /// `after-sb-2pri` code.
        after_sb_2pri: u8,
        /// Bits: [`NET_ALLOW_TWO_PRIMARIES`].
        flags: u32,
        /// `data-integrity-alg` (empty: none).
        integrity_alg: String,
    },
}

/// `NetSettings` flag: `allow-two-primaries yes`.
pub const NET_ALLOW_TWO_PRIMARIES: u32 = 1 << 0;

impl<P> Frame<P> {
    /// The command code of this frame.
    pub fn command(&self) -> u16 {
        match self {
            Frame::Hello { .. } => cmd::HELLO,
            Frame::AuthChallenge { .. } => cmd::AUTH_CHALLENGE,
            Frame::AuthResponse { .. } => cmd::AUTH_RESPONSE,
            Frame::AuthResult { .. } => cmd::AUTH_RESULT,
            Frame::State { .. } => cmd::STATE,
            Frame::Uuids { .. } => cmd::UUIDS,
            Frame::Data { .. } => cmd::DATA,
            Frame::RecvAck { .. } => cmd::RECV_ACK,
            Frame::WriteAck { .. } => cmd::WRITE_ACK,
            Frame::NegAck { .. } => cmd::NEG_ACK,
            Frame::Barrier { .. } => cmd::BARRIER,
            Frame::BarrierAck { .. } => cmd::BARRIER_ACK,
            Frame::Flush { .. } => cmd::FLUSH,
            Frame::FlushAck { .. } => cmd::FLUSH_ACK,
            Frame::Ping => cmd::PING,
            Frame::PingAck => cmd::PING_ACK,
            Frame::StateChangeRequest { .. } => cmd::STATE_CHANGE_REQUEST,
            Frame::StateChangeReply { .. } => cmd::STATE_CHANGE_REPLY,
            Frame::BitmapChunk { .. } => cmd::BITMAP_CHUNK,
            Frame::BitmapDone => cmd::BITMAP_DONE,
            Frame::ResyncRequest { .. } => cmd::RESYNC_REQUEST,
            Frame::ResyncData { .. } => cmd::RESYNC_DATA,
            Frame::ResyncInSync { .. } => cmd::RESYNC_IN_SYNC,
            Frame::ResyncZeroes { .. } => cmd::RESYNC_ZEROES,
            Frame::ChecksumRequest { .. } => cmd::CHECKSUM_REQUEST,
            Frame::OutOfSync { .. } => cmd::OUT_OF_SYNC,
            Frame::VerifyRequest { .. } => cmd::VERIFY_REQUEST,
            Frame::VerifyReply { .. } => cmd::VERIFY_REPLY,
            Frame::Disconnect { .. } => cmd::DISCONNECT,
            Frame::NetSettings { .. } => cmd::NET_SETTINGS,
        }
    }

    /// The payload of `Data` / `ResyncData`, `None` for other frames.
    pub fn payload(&self) -> Option<&P> {
        match self {
            Frame::Data { payload, .. } | Frame::ResyncData { payload, .. } => Some(payload),
            _ => None,
        }
    }

    /// Convert the payload type (e.g. a `Range<usize>` into a `Bytes` slice).
    pub fn map_payload<Q>(self, f: impl FnOnce(P) -> Q) -> Frame<Q> {
        match self {
            Frame::Hello {
                proto_min,
                proto_max,
                features,
                node_name,
                resource,
                volumes,
            } => Frame::Hello {
                proto_min,
                proto_max,
                features,
                node_name,
                resource,
                volumes,
            },
            Frame::AuthChallenge { nonce } => Frame::AuthChallenge { nonce },
            Frame::AuthResponse { mac } => Frame::AuthResponse { mac },
            Frame::AuthResult { ok } => Frame::AuthResult { ok },
            Frame::State {
                role,
                disk,
                flags,
                size_bytes,
            } => Frame::State {
                role,
                disk,
                flags,
                size_bytes,
            },
            Frame::Uuids {
                current,
                bitmap,
                history,
                bitmap_bits,
                flags,
            } => Frame::Uuids {
                current,
                bitmap,
                history,
                bitmap_bits,
                flags,
            },
            Frame::Data {
                offset_bytes,
                len,
                request_id,
                seq,
                flags,
                digest,
                payload,
            } => Frame::Data {
                offset_bytes,
                len,
                request_id,
                seq,
                flags,
                digest,
                payload: f(payload),
            },
            Frame::RecvAck { request_id, seq } => Frame::RecvAck { request_id, seq },
            Frame::WriteAck { request_id, seq } => Frame::WriteAck { request_id, seq },
            Frame::NegAck {
                request_id,
                seq,
                errno,
            } => Frame::NegAck {
                request_id,
                seq,
                errno,
            },
            Frame::Barrier { epoch } => Frame::Barrier { epoch },
            Frame::BarrierAck { epoch, count } => Frame::BarrierAck { epoch, count },
            Frame::Flush { id } => Frame::Flush { id },
            Frame::FlushAck { id } => Frame::FlushAck { id },
            Frame::Ping => Frame::Ping,
            Frame::PingAck => Frame::PingAck,
            Frame::StateChangeRequest { role, flags } => Frame::StateChangeRequest { role, flags },
            Frame::StateChangeReply { ok, reason } => Frame::StateChangeReply { ok, reason },
            Frame::BitmapChunk { offset_bits, words } => Frame::BitmapChunk { offset_bits, words },
            Frame::BitmapDone => Frame::BitmapDone,
            Frame::ResyncRequest {
                offset_bytes,
                len,
                id,
            } => Frame::ResyncRequest {
                offset_bytes,
                len,
                id,
            },
            Frame::ResyncData {
                offset_bytes,
                len,
                id,
                payload,
            } => Frame::ResyncData {
                offset_bytes,
                len,
                id,
                payload: f(payload),
            },
            Frame::ResyncInSync {
                offset_bytes,
                len,
                id,
            } => Frame::ResyncInSync {
                offset_bytes,
                len,
                id,
            },
            Frame::ResyncZeroes {
                offset_bytes,
                len,
                id,
            } => Frame::ResyncZeroes {
                offset_bytes,
                len,
                id,
            },
            Frame::ChecksumRequest {
                offset_bytes,
                len,
                id,
                digest,
            } => Frame::ChecksumRequest {
                offset_bytes,
                len,
                id,
                digest,
            },
            Frame::OutOfSync { offset_bytes, len } => Frame::OutOfSync { offset_bytes, len },
            Frame::VerifyRequest {
                offset_bytes,
                len,
                id,
            } => Frame::VerifyRequest {
                offset_bytes,
                len,
                id,
            },
            Frame::VerifyReply {
                offset_bytes,
                len,
                id,
                digest,
            } => Frame::VerifyReply {
                offset_bytes,
                len,
                id,
                digest,
            },
            Frame::Disconnect { reason } => Frame::Disconnect { reason },
            Frame::NetSettings {
                protocol,
                after_sb_0pri,
                after_sb_1pri,
                after_sb_2pri,
                flags,
                integrity_alg,
            } => Frame::NetSettings {
                protocol,
                after_sb_0pri,
                after_sb_1pri,
                after_sb_2pri,
                flags,
                integrity_alg,
            },
        }
    }
}

/// Why a frame cannot be encoded (it would not decode on the other side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string is longer than [`MAX_STRING_BYTES`].
    #[error("string of {0} bytes over the limit")]
    StringTooLong(usize),
    /// A payload is over [`MAX_PAYLOAD_BYTES`] or does not match `len` / the flags.
    #[error("payload of {payload_bytes} bytes does not fit len {len} / flags {flags:#x}")]
    BadPayload {
        /// Payload length.
        payload_bytes: usize,
        /// Declared length.
        len: u32,
        /// Data flags.
        flags: u32,
    },
    /// Undefined data flags, or both TRIM and ZEROES.
    #[error("bad data flags {0:#x}")]
    BadFlags(u32),
    /// More than [`MAX_BITMAP_WORDS`] bitmap words.
    #[error("{0} bitmap words over the limit")]
    TooManyWords(usize),
    /// A role/disk code out of range.
    #[error("state code out of range")]
    BadStateCode,
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Length checked by `validate` before encoding.
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}
fn str_bytes(s: &str) -> Result<usize, EncodeError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(EncodeError::StringTooLong(s.len()));
    }
    Ok(2 + s.len())
}

/// Payload length a Data frame must carry for `len` and `flags`.
fn data_payload_expected(len: u32, flags: u32) -> usize {
    if flags & (DATA_TRIM | DATA_ZEROES) != 0 {
        0
    } else {
        len as usize
    }
}

fn check_data_flags(flags: u32) -> bool {
    flags & !DATA_FLAGS_ALL == 0 && flags & (DATA_TRIM | DATA_ZEROES) != (DATA_TRIM | DATA_ZEROES)
}

impl<P: AsRef<[u8]>> Frame<P> {
    /// Body length excluding the payload, after validating every field.
    fn validate(&self) -> Result<usize, EncodeError> {
        let n = match self {
            Frame::Hello {
                node_name,
                resource,
                ..
            } => HELLO_FIXED_BYTES + str_bytes(node_name)? + str_bytes(resource)?,
            Frame::AuthChallenge { .. } => 32,
            Frame::AuthResponse { mac } => 1 + mac.len(),
            Frame::AuthResult { .. } => 1,
            Frame::State { role, disk, .. } => {
                if *role > ROLE_SECONDARY || *disk > DISK_UPTODATE {
                    return Err(EncodeError::BadStateCode);
                }
                16
            }
            Frame::Uuids { .. } => 48,
            Frame::Data {
                len,
                flags,
                digest,
                payload,
                ..
            } => {
                if !check_data_flags(*flags) {
                    return Err(EncodeError::BadFlags(*flags));
                }
                let p = payload.as_ref().len();
                if p != data_payload_expected(*len, *flags) || p > MAX_PAYLOAD_BYTES {
                    return Err(EncodeError::BadPayload {
                        payload_bytes: p,
                        len: *len,
                        flags: *flags,
                    });
                }
                DATA_FIXED_BYTES + digest.len()
            }
            Frame::RecvAck { .. } | Frame::WriteAck { .. } => 16,
            Frame::NegAck { .. } => 20,
            Frame::Barrier { .. } => 4,
            Frame::BarrierAck { .. } => 8,
            Frame::Flush { .. } | Frame::FlushAck { .. } => 8,
            Frame::Ping | Frame::PingAck | Frame::BitmapDone => 0,
            Frame::StateChangeRequest { role, .. } => {
                if *role > ROLE_SECONDARY {
                    return Err(EncodeError::BadStateCode);
                }
                8
            }
            Frame::StateChangeReply { reason, .. } => 1 + str_bytes(reason)?,
            Frame::BitmapChunk { words, .. } => {
                if words.len() > MAX_BITMAP_WORDS {
                    return Err(EncodeError::TooManyWords(words.len()));
                }
                12 + 8 * words.len()
            }
            Frame::ResyncRequest { .. }
            | Frame::ResyncInSync { .. }
            | Frame::ResyncZeroes { .. }
            | Frame::VerifyRequest { .. } => RANGE_FIXED_BYTES,
            Frame::ResyncData { len, payload, .. } => {
                let p = payload.as_ref().len();
                if p != *len as usize || p > MAX_PAYLOAD_BYTES {
                    return Err(EncodeError::BadPayload {
                        payload_bytes: p,
                        len: *len,
                        flags: 0,
                    });
                }
                RANGE_FIXED_BYTES
            }
            Frame::ChecksumRequest { digest, .. } | Frame::VerifyReply { digest, .. } => {
                RANGE_FIXED_BYTES + 1 + digest.len()
            }
            Frame::OutOfSync { .. } => 12,
            Frame::Disconnect { reason } => str_bytes(reason)?,
            Frame::NetSettings { integrity_alg, .. } => 8 + str_bytes(integrity_alg)?,
        };
        Ok(n)
    }

    /// Total encoded length of the frame (header + body + payload), after validation.
    pub fn encoded_len(&self) -> Result<usize, EncodeError> {
        let payload = self.payload().map_or(0, |p| p.as_ref().len());
        Ok(HEADER_BYTES + self.validate()? + payload)
    }

    /// Append the header and every body byte except the payload to `out`. The caller
    /// then writes `self.payload()` (if any) right after, without copying it here.
    pub fn encode_header(&self, volume: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let fixed = self.validate()?;
        let payload = self.payload().map_or(0, |p| p.as_ref().len());
        let body = fixed + payload;
        assert!(body <= MAX_BODY_BYTES, "validated body over the limit");
        let start = out.len();
        out.reserve(HEADER_BYTES + fixed);
        put_u32(out, MAGIC);
        put_u16(out, self.command());
        put_u16(out, 0);
        put_u32(out, volume);
        put_u32(out, body as u32); // <= MAX_BODY_BYTES asserted above
        match self {
            Frame::Hello {
                proto_min,
                proto_max,
                features,
                node_name,
                resource,
                volumes,
            } => {
                put_u32(out, *proto_min);
                put_u32(out, *proto_max);
                put_u64(out, *features);
                put_u32(out, *volumes);
                put_str(out, node_name);
                put_str(out, resource);
            }
            Frame::AuthChallenge { nonce } => out.extend_from_slice(nonce),
            Frame::AuthResponse { mac } => {
                out.push(mac.len);
                out.extend_from_slice(mac.as_slice());
            }
            Frame::AuthResult { ok } => out.push(u8::from(*ok)),
            Frame::State {
                role,
                disk,
                flags,
                size_bytes,
            } => {
                out.push(*role);
                out.push(*disk);
                put_u16(out, 0);
                put_u32(out, *flags);
                put_u64(out, *size_bytes);
            }
            Frame::Uuids {
                current,
                bitmap,
                history,
                bitmap_bits,
                flags,
            } => {
                for v in [
                    *current,
                    *bitmap,
                    history[0],
                    history[1],
                    *bitmap_bits,
                    *flags,
                ] {
                    put_u64(out, v);
                }
            }
            Frame::Data {
                offset_bytes,
                len,
                request_id,
                seq,
                flags,
                digest,
                ..
            } => {
                put_u64(out, *offset_bytes);
                put_u64(out, *request_id);
                put_u64(out, *seq);
                put_u32(out, *len);
                put_u32(out, *flags);
                out.push(digest.len);
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(digest.as_slice());
            }
            Frame::RecvAck { request_id, seq } | Frame::WriteAck { request_id, seq } => {
                put_u64(out, *request_id);
                put_u64(out, *seq);
            }
            Frame::NegAck {
                request_id,
                seq,
                errno,
            } => {
                put_u64(out, *request_id);
                put_u64(out, *seq);
                put_u32(out, *errno);
            }
            Frame::Barrier { epoch } => put_u32(out, *epoch),
            Frame::BarrierAck { epoch, count } => {
                put_u32(out, *epoch);
                put_u32(out, *count);
            }
            Frame::Flush { id } | Frame::FlushAck { id } => put_u64(out, *id),
            Frame::Ping | Frame::PingAck | Frame::BitmapDone => {}
            Frame::StateChangeRequest { role, flags } => {
                out.push(*role);
                out.extend_from_slice(&[0; 3]);
                put_u32(out, *flags);
            }
            Frame::StateChangeReply { ok, reason } => {
                out.push(u8::from(*ok));
                put_str(out, reason);
            }
            Frame::BitmapChunk { offset_bits, words } => {
                put_u64(out, *offset_bits);
                put_u32(out, words.len() as u32); // <= MAX_BITMAP_WORDS checked
                for w in words {
                    put_u64(out, *w);
                }
            }
            Frame::ResyncRequest {
                offset_bytes,
                len,
                id,
            }
            | Frame::ResyncInSync {
                offset_bytes,
                len,
                id,
            }
            | Frame::ResyncZeroes {
                offset_bytes,
                len,
                id,
            }
            | Frame::VerifyRequest {
                offset_bytes,
                len,
                id,
            }
            | Frame::ResyncData {
                offset_bytes,
                len,
                id,
                ..
            } => {
                put_u64(out, *offset_bytes);
                put_u64(out, *id);
                put_u32(out, *len);
            }
            Frame::ChecksumRequest {
                offset_bytes,
                len,
                id,
                digest,
            }
            | Frame::VerifyReply {
                offset_bytes,
                len,
                id,
                digest,
            } => {
                put_u64(out, *offset_bytes);
                put_u64(out, *id);
                put_u32(out, *len);
                out.push(digest.len);
                out.extend_from_slice(digest.as_slice());
            }
            Frame::OutOfSync { offset_bytes, len } => {
                put_u64(out, *offset_bytes);
                put_u32(out, *len);
            }
            Frame::Disconnect { reason } => put_str(out, reason),
            Frame::NetSettings {
                protocol,
                after_sb_0pri,
                after_sb_1pri,
                after_sb_2pri,
                flags,
                integrity_alg,
            } => {
                out.extend_from_slice(&[*protocol, *after_sb_0pri, *after_sb_1pri, *after_sb_2pri]);
                put_u32(out, *flags);
                put_str(out, integrity_alg);
            }
        }
        assert_eq!(
            out.len() - start,
            HEADER_BYTES + fixed,
            "encoder/validate mismatch"
        );
        Ok(())
    }

    /// Append the whole frame (header, body and payload) to `out`.
    pub fn encode(&self, volume: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_header(volume, out)?;
        if let Some(p) = self.payload() {
            out.extend_from_slice(p.as_ref());
        }
        Ok(())
    }
}

/// Bounds-checked little-endian reader over one frame body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    command: u16,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], command: u16) -> Self {
        Reader {
            buf,
            pos: 0,
            command,
        }
    }
    fn invalid(&self, what: &'static str) -> FrameError {
        FrameError::Invalid {
            command: self.command,
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(FrameError::Invalid {
                command: self.command,
                what: "field runs past the body length",
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid("boolean not 0 or 1")),
        }
    }
    fn zeros(&mut self, n: usize) -> Result<(), FrameError> {
        if self.take(n)?.iter().any(|b| *b != 0) {
            return Err(self.invalid("reserved bytes not zero"));
        }
        Ok(())
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = usize::from(self.u16()?);
        if n > MAX_STRING_BYTES {
            return Err(self.invalid("string over MAX_STRING_BYTES"));
        }
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| self.invalid("string not UTF-8"))?;
        Ok(s.to_owned())
    }
    fn digest(&mut self) -> Result<Digest, FrameError> {
        let n = usize::from(self.u8()?);
        if n > MAX_DIGEST_BYTES {
            return Err(self.invalid("digest over MAX_DIGEST_BYTES"));
        }
        Digest::new(self.take(n)?).ok_or(self.invalid("digest over MAX_DIGEST_BYTES"))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn finish(&self) -> Result<(), FrameError> {
        if self.remaining() != 0 {
            return Err(self.invalid("trailing bytes after the last field"));
        }
        Ok(())
    }
}

impl Frame<Vec<u8>> {
    /// Validate the header at the start of `buf` and return the whole frame's length.
    /// [`FrameError::Incomplete`] means more bytes are needed; any other error means the
    /// stream is corrupt. The body is validated by [`Frame::decode`].
    pub fn check(buf: &[u8]) -> Result<usize, FrameError> {
        let h = Header::decode(buf)?;
        let len = h.frame_len();
        if buf.len() < len {
            return Err(FrameError::Incomplete {
                needed: len - buf.len(),
            });
        }
        Ok(len)
    }

    /// Decode one frame from the start of `buf`, copying the payload into a `Vec`.
    /// Returns the frame and the number of bytes it used. The volume is dropped; use
    /// [`Frame::decode_parts`] to get it (and the payload without a copy).
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), FrameError> {
        let (h, f) = Frame::decode_parts(buf)?;
        let frame = f.map_payload(|r| buf[r].to_vec());
        Ok((frame, h.frame_len()))
    }
}

impl Frame<Range<usize>> {
    /// Decode one frame from the start of `buf`. The payload of `Data`/`ResyncData` is
    /// returned as the byte range of `buf` that holds it (always in bounds of `buf`).
    pub fn decode_parts(buf: &[u8]) -> Result<(Header, Frame<Range<usize>>), FrameError> {
        let h = Header::decode(buf)?;
        let total = h.frame_len();
        let Some(body) = buf.get(HEADER_BYTES..total) else {
            return Err(FrameError::Incomplete {
                needed: total - buf.len(),
            });
        };
        let mut r = Reader::new(body, h.command);
        let frame = match h.command {
            cmd::HELLO => {
                let proto_min = r.u32()?;
                let proto_max = r.u32()?;
                let features = r.u64()?;
                let volumes = r.u32()?;
                let node_name = r.string()?;
                let resource = r.string()?;
                Frame::Hello {
                    proto_min,
                    proto_max,
                    features,
                    node_name,
                    resource,
                    volumes,
                }
            }
            cmd::AUTH_CHALLENGE => Frame::AuthChallenge { nonce: r.array()? },
            cmd::AUTH_RESPONSE => Frame::AuthResponse { mac: r.digest()? },
            cmd::AUTH_RESULT => Frame::AuthResult { ok: r.bool()? },
            cmd::STATE => {
                let role = r.u8()?;
                let disk = r.u8()?;
                r.zeros(2)?;
                let flags = r.u32()?;
                let size_bytes = r.u64()?;
                if role > ROLE_SECONDARY {
                    return Err(r.invalid("role code out of range"));
                }
                if disk > DISK_UPTODATE {
                    return Err(r.invalid("disk code out of range"));
                }
                Frame::State {
                    role,
                    disk,
                    flags,
                    size_bytes,
                }
            }
            cmd::UUIDS => Frame::Uuids {
                current: r.u64()?,
                bitmap: r.u64()?,
                history: [r.u64()?, r.u64()?],
                bitmap_bits: r.u64()?,
                flags: r.u64()?,
            },
            cmd::DATA => {
                let offset_bytes = r.u64()?;
                let request_id = r.u64()?;
                let seq = r.u64()?;
                let len = r.u32()?;
                let flags = r.u32()?;
                let digest_len = r.u8()?;
                r.zeros(3)?;
                if usize::from(digest_len) > MAX_DIGEST_BYTES {
                    return Err(r.invalid("digest over MAX_DIGEST_BYTES"));
                }
                let digest = Digest::new(r.take(usize::from(digest_len))?)
                    .ok_or(r.invalid("digest over MAX_DIGEST_BYTES"))?;
                if !check_data_flags(flags) {
                    return Err(r.invalid("undefined data flags or TRIM with ZEROES"));
                }
                let want = data_payload_expected(len, flags);
                if r.remaining() != want {
                    return Err(r.invalid("payload length does not match len/flags"));
                }
                let start = HEADER_BYTES + r.pos;
                r.take(want)?;
                Frame::Data {
                    offset_bytes,
                    len,
                    request_id,
                    seq,
                    flags,
                    digest,
                    payload: start..start + want,
                }
            }
            cmd::RECV_ACK => Frame::RecvAck {
                request_id: r.u64()?,
                seq: r.u64()?,
            },
            cmd::WRITE_ACK => Frame::WriteAck {
                request_id: r.u64()?,
                seq: r.u64()?,
            },
            cmd::NEG_ACK => Frame::NegAck {
                request_id: r.u64()?,
                seq: r.u64()?,
                errno: r.u32()?,
            },
            cmd::BARRIER => Frame::Barrier { epoch: r.u32()? },
            cmd::BARRIER_ACK => Frame::BarrierAck {
                epoch: r.u32()?,
                count: r.u32()?,
            },
            cmd::FLUSH => Frame::Flush { id: r.u64()? },
            cmd::FLUSH_ACK => Frame::FlushAck { id: r.u64()? },
            cmd::PING => Frame::Ping,
            cmd::PING_ACK => Frame::PingAck,
            cmd::BITMAP_DONE => Frame::BitmapDone,
            cmd::STATE_CHANGE_REQUEST => {
                let role = r.u8()?;
                r.zeros(3)?;
                let flags = r.u32()?;
                if role > ROLE_SECONDARY {
                    return Err(r.invalid("role code out of range"));
                }
                Frame::StateChangeRequest { role, flags }
            }
            cmd::STATE_CHANGE_REPLY => Frame::StateChangeReply {
                ok: r.bool()?,
                reason: r.string()?,
            },
            cmd::BITMAP_CHUNK => {
                let offset_bits = r.u64()?;
                let count = r.u32()? as usize;
                if count > MAX_BITMAP_WORDS || r.remaining() != count * 8 {
                    return Err(r.invalid("word count does not match the body length"));
                }
                let mut words = Vec::with_capacity(count);
                for _ in 0..count {
                    words.push(r.u64()?);
                }
                Frame::BitmapChunk { offset_bits, words }
            }
            cmd::RESYNC_REQUEST
            | cmd::RESYNC_IN_SYNC
            | cmd::VERIFY_REQUEST
            | cmd::RESYNC_ZEROES => {
                let offset_bytes = r.u64()?;
                let id = r.u64()?;
                let len = r.u32()?;
                match h.command {
                    cmd::RESYNC_ZEROES => Frame::ResyncZeroes {
                        offset_bytes,
                        len,
                        id,
                    },
                    cmd::RESYNC_REQUEST => Frame::ResyncRequest {
                        offset_bytes,
                        len,
                        id,
                    },
                    cmd::RESYNC_IN_SYNC => Frame::ResyncInSync {
                        offset_bytes,
                        len,
                        id,
                    },
                    _ => Frame::VerifyRequest {
                        offset_bytes,
                        len,
                        id,
                    },
                }
            }
            cmd::RESYNC_DATA => {
                let offset_bytes = r.u64()?;
                let id = r.u64()?;
                let len = r.u32()?;
                if r.remaining() != len as usize {
                    return Err(r.invalid("payload length does not match len"));
                }
                let start = HEADER_BYTES + r.pos;
                r.take(len as usize)?;
                Frame::ResyncData {
                    offset_bytes,
                    len,
                    id,
                    payload: start..start + len as usize,
                }
            }
            cmd::CHECKSUM_REQUEST | cmd::VERIFY_REPLY => {
                let offset_bytes = r.u64()?;
                let id = r.u64()?;
                let len = r.u32()?;
                let digest = r.digest()?;
                if h.command == cmd::CHECKSUM_REQUEST {
                    Frame::ChecksumRequest {
                        offset_bytes,
                        len,
                        id,
                        digest,
                    }
                } else {
                    Frame::VerifyReply {
                        offset_bytes,
                        len,
                        id,
                        digest,
                    }
                }
            }
            cmd::OUT_OF_SYNC => Frame::OutOfSync {
                offset_bytes: r.u64()?,
                len: r.u32()?,
            },
            cmd::DISCONNECT => Frame::Disconnect {
                reason: r.string()?,
            },
            cmd::NET_SETTINGS => Frame::NetSettings {
                protocol: r.u8()?,
                after_sb_0pri: r.u8()?,
                after_sb_1pri: r.u8()?,
                after_sb_2pri: r.u8()?,
                flags: r.u32()?,
                integrity_alg: r.string()?,
            },
            other => return Err(FrameError::UnknownCommand(other)),
        };
        r.finish()?;
        Ok((h, frame))
    }
}

#[cfg(test)]
mod tests;
