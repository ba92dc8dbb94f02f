//! Round-trip, truncation and garbage tests of the replication frames.

use super::*;

/// Tiny deterministic xorshift64* generator (no dependency on `rand`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self) -> String {
        let n = self.below(40) as usize;
        let alphabet = ['a', 'Z', '0', '-', '_', 'é', '✓', ' '];
        (0..n)
            .map(|_| alphabet[self.below(alphabet.len() as u64) as usize])
            .collect()
    }
    fn digest(&mut self) -> Digest {
        let n = self.below(MAX_DIGEST_BYTES as u64 + 1) as usize;
        Digest::new(&self.bytes(n)).unwrap()
    }
}

/// A random valid frame of the given command.
fn gen_frame(rng: &mut Rng, command: u16) -> Frame {
    match command {
        cmd::HELLO => Frame::Hello {
            proto_min: rng.next() as u32,
            proto_max: rng.next() as u32,
            features: rng.next(),
            node_name: rng.string(),
            resource: rng.string(),
            volumes: rng.next() as u32,
        },
        cmd::AUTH_CHALLENGE => Frame::AuthChallenge {
            nonce: rng.bytes(32).try_into().unwrap(),
        },
        cmd::AUTH_RESPONSE => Frame::AuthResponse { mac: rng.digest() },
        cmd::AUTH_RESULT => Frame::AuthResult {
            ok: rng.below(2) == 1,
        },
        cmd::STATE => Frame::State {
            role: rng.below(3) as u8,
            disk: rng.below(7) as u8,
            flags: rng.next() as u32,
            size_bytes: rng.next(),
        },
        cmd::UUIDS => Frame::Uuids {
            current: rng.next(),
            bitmap: rng.next(),
            history: [rng.next(), rng.next()],
            bitmap_bits: rng.next(),
            flags: rng.next(),
        },
        cmd::DATA => {
            let flags = match rng.below(4) {
                0 => 0,
                1 => DATA_FUA | DATA_FLUSH | DATA_RESYNC,
                2 => DATA_TRIM,
                _ => DATA_ZEROES | DATA_FUA,
            };
            let len = if rng.below(8) == 0 {
                MAX_PAYLOAD_BYTES as u32
            } else {
                rng.below(9000) as u32
            };
            let payload = rng.bytes(data_payload_expected(len, flags));
            Frame::Data {
                offset_bytes: rng.next(),
                len,
                request_id: rng.next(),
                seq: rng.next(),
                flags,
                digest: rng.digest(),
                payload,
            }
        }
        cmd::RECV_ACK => Frame::RecvAck {
            request_id: rng.next(),
            seq: rng.next(),
        },
        cmd::WRITE_ACK => Frame::WriteAck {
            request_id: rng.next(),
            seq: rng.next(),
        },
        cmd::NEG_ACK => Frame::NegAck {
            request_id: rng.next(),
            seq: rng.next(),
            errno: rng.next() as u32,
        },
        cmd::BARRIER => Frame::Barrier {
            epoch: rng.next() as u32,
        },
        cmd::BARRIER_ACK => Frame::BarrierAck {
            epoch: rng.next() as u32,
            count: rng.next() as u32,
        },
        cmd::FLUSH => Frame::Flush { id: rng.next() },
        cmd::FLUSH_ACK => Frame::FlushAck { id: rng.next() },
        cmd::PING => Frame::Ping,
        cmd::PING_ACK => Frame::PingAck,
        cmd::STATE_CHANGE_REQUEST => Frame::StateChangeRequest {
            role: rng.below(3) as u8,
            flags: rng.next() as u32,
        },
        cmd::STATE_CHANGE_REPLY => Frame::StateChangeReply {
            ok: rng.below(2) == 1,
            reason: rng.string(),
        },
        cmd::BITMAP_CHUNK => {
            let n = if rng.below(8) == 0 {
                MAX_BITMAP_WORDS
            } else {
                rng.below(300) as usize
            };
            Frame::BitmapChunk {
                offset_bits: rng.next(),
                words: (0..n).map(|_| rng.next()).collect(),
            }
        }
        cmd::BITMAP_DONE => Frame::BitmapDone,
        cmd::RESYNC_REQUEST => Frame::ResyncRequest {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
            id: rng.next(),
        },
        cmd::RESYNC_DATA => {
            let len = rng.below(70000) as u32;
            Frame::ResyncData {
                offset_bytes: rng.next(),
                len,
                id: rng.next(),
                payload: rng.bytes(len as usize),
            }
        }
        cmd::RESYNC_IN_SYNC => Frame::ResyncInSync {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
            id: rng.next(),
        },
        cmd::RESYNC_ZEROES => Frame::ResyncZeroes {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
            id: rng.next(),
        },
        cmd::CHECKSUM_REQUEST => Frame::ChecksumRequest {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
            id: rng.next(),
            digest: rng.digest(),
        },
        cmd::OUT_OF_SYNC => Frame::OutOfSync {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
        },
        cmd::VERIFY_REQUEST => Frame::VerifyRequest {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
            id: rng.next(),
        },
        cmd::VERIFY_REPLY => Frame::VerifyReply {
            offset_bytes: rng.next(),
            len: rng.next() as u32,
            id: rng.next(),
            digest: rng.digest(),
        },
        cmd::DISCONNECT => Frame::Disconnect {
            reason: rng.string(),
        },
        cmd::NET_SETTINGS => Frame::NetSettings {
            protocol: rng.next() as u8,
            after_sb_0pri: rng.next() as u8,
            after_sb_1pri: rng.next() as u8,
            after_sb_2pri: rng.next() as u8,
            flags: rng.next() as u32,
            integrity_alg: rng.string(),
        },
        other => panic!("no generator for command {other}"),
    }
}

fn encode(frame: &Frame, volume: u32) -> Vec<u8> {
    let mut out = Vec::new();
    frame.encode(volume, &mut out).unwrap();
    assert_eq!(out.len(), frame.encoded_len().unwrap());
    out
}

#[test]
fn every_frame_round_trips() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for command in 1..=cmd::LAST {
        for _ in 0..40 {
            let frame = gen_frame(&mut rng, command);
            assert_eq!(frame.command(), command);
            let volume = rng.next() as u32;
            let mut buf = encode(&frame, volume);
            let frame_len = buf.len();
            // Trailing bytes of a following frame are not consumed.
            buf.extend_from_slice(&[0xAA; 7]);
            assert_eq!(Frame::check(&buf), Ok(frame_len));
            let (decoded, used) = Frame::decode(&buf).unwrap();
            assert_eq!(used, frame_len);
            assert_eq!(decoded, frame);
            let (h, parts) = Frame::decode_parts(&buf).unwrap();
            assert_eq!(h.volume, volume);
            assert_eq!(h.command, command);
            assert_eq!(h.frame_len(), frame_len);
            if let Some(r) = parts.payload() {
                assert_eq!(&buf[r.clone()], frame.payload().unwrap().as_slice());
            }
        }
    }
}

#[test]
fn encode_header_plus_payload_equals_encode() {
    let mut rng = Rng(7);
    let frame = gen_frame(&mut rng, cmd::DATA);
    let mut head = Vec::new();
    frame.encode_header(3, &mut head).unwrap();
    head.extend_from_slice(frame.payload().unwrap());
    assert_eq!(head, encode(&frame, 3));
}

#[test]
fn truncation_at_every_byte_is_incomplete() {
    let mut rng = Rng(0xDEAD_BEEF);
    for command in 1..=cmd::LAST {
        let mut frame = gen_frame(&mut rng, command);
        // Keep the byte-by-byte loop fast.
        while frame.encoded_len().unwrap() > 20_000 {
            frame = gen_frame(&mut rng, command);
        }
        let buf = encode(&frame, 1);
        for cut in 0..buf.len() {
            let prefix = &buf[..cut];
            match Frame::check(prefix) {
                Err(FrameError::Incomplete { needed }) => {
                    assert!(
                        needed >= 1 && cut + needed <= buf.len(),
                        "cmd {command} cut {cut}"
                    );
                }
                other => panic!("cmd {command} cut {cut}: check gave {other:?}"),
            }
            assert!(
                matches!(Frame::decode(prefix), Err(FrameError::Incomplete { .. })),
                "cmd {command} cut {cut}"
            );
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(12345);
    for _ in 0..200_000 {
        let n = rng.below(96) as usize;
        let mut buf = rng.bytes(n);
        // Often give it a valid magic and a plausible command to reach the body parsers.
        if buf.len() >= HEADER_BYTES && rng.below(2) == 0 {
            buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
            let c = (rng.below(u64::from(cmd::LAST) + 2)) as u16;
            buf[4..6].copy_from_slice(&c.to_le_bytes());
            buf[6..8].copy_from_slice(&[0, 0]);
            let body = (buf.len() - HEADER_BYTES) as u32;
            buf[12..16].copy_from_slice(&body.to_le_bytes());
        }
        let _ = Frame::check(&buf);
        if let Ok((f, used)) = Frame::decode(&buf) {
            assert!(used <= buf.len());
            // Whatever decodes re-encodes to the same bytes.
            let vol = u32::from_le_bytes(buf[8..12].try_into().unwrap());
            assert_eq!(encode(&f, vol), buf[..used]);
        }
    }
}

#[test]
fn mutated_frames_never_panic_and_reencode_identically() {
    let mut rng = Rng(99);
    for _ in 0..20_000 {
        let command = 1 + rng.below(u64::from(cmd::LAST)) as u16;
        let frame = gen_frame(&mut rng, command);
        if frame.encoded_len().unwrap() > 4096 {
            continue;
        }
        let mut buf = encode(&frame, 0);
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(buf.len() as u64) as usize;
            buf[i] ^= 1 << rng.below(8);
        }
        if let Ok((f, used)) = Frame::decode(&buf) {
            let vol = u32::from_le_bytes(buf[8..12].try_into().unwrap());
            assert_eq!(encode(&f, vol), buf[..used]);
        }
    }
}

fn header(command: u16, body_len: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&command.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&body_len.to_le_bytes());
    b
}

#[test]
fn invalid_headers_are_rejected_before_the_body_arrives() {
    let mut b = header(cmd::PING, 0);
    b[0] ^= 1;
    assert!(matches!(Frame::check(&b), Err(FrameError::BadMagic(_))));
    assert_eq!(
        Frame::check(&header(999, 0)),
        Err(FrameError::UnknownCommand(999))
    );
    assert_eq!(
        Frame::check(&header(0, 0)),
        Err(FrameError::UnknownCommand(0))
    );
    let mut b = header(cmd::PING, 0);
    b[6] = 1;
    assert_eq!(Frame::check(&b), Err(FrameError::BadHeaderFlags(1)));
    // Over the global limit, and wrong for a fixed-size command.
    let big = (MAX_BODY_BYTES + 1) as u32;
    assert!(matches!(
        Frame::check(&header(cmd::DATA, big)),
        Err(FrameError::BadLength { .. })
    ));
    assert!(matches!(
        Frame::check(&header(cmd::PING, 4)),
        Err(FrameError::BadLength { .. })
    ));
    assert!(matches!(
        Frame::check(&header(cmd::DATA, u32::MAX)),
        Err(FrameError::BadLength { .. })
    ));
    // A plausible Data header only asks for its body.
    assert_eq!(
        Frame::check(&header(cmd::DATA, 4132)),
        Err(FrameError::Incomplete { needed: 4132 })
    );
}

#[test]
fn inconsistent_fields_are_invalid() {
    // Data whose len disagrees with the payload.
    let frame = Frame::Data {
        offset_bytes: 0,
        len: 8,
        request_id: 1,
        seq: 1,
        flags: 0,
        digest: Digest::EMPTY,
        payload: vec![1u8; 8],
    };
    let mut b = encode(&frame, 0);
    b[16 + 24..16 + 28].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(Frame::decode(&b), Err(FrameError::Invalid { .. })));
    // Undefined flag.
    let mut b = encode(&frame, 0);
    b[16 + 28..16 + 32].copy_from_slice(&(1u32 << 20).to_le_bytes());
    assert!(matches!(Frame::decode(&b), Err(FrameError::Invalid { .. })));
    // Bad UTF-8 in a string.
    let mut b = encode(
        &Frame::Disconnect {
            reason: "ab".into(),
        },
        0,
    );
    b[18] = 0xFF;
    assert!(matches!(Frame::decode(&b), Err(FrameError::Invalid { .. })));
    // Bitmap word count disagreeing with the body length.
    let mut b = encode(
        &Frame::BitmapChunk {
            offset_bits: 0,
            words: vec![1, 2],
        },
        0,
    );
    b[16 + 8..16 + 12].copy_from_slice(&3u32.to_le_bytes());
    assert!(matches!(Frame::decode(&b), Err(FrameError::Invalid { .. })));
    // Role out of range.
    let mut b = encode(
        &Frame::State {
            role: 1,
            disk: 6,
            flags: 0,
            size_bytes: 0,
        },
        0,
    );
    b[16] = 3;
    assert!(matches!(Frame::decode(&b), Err(FrameError::Invalid { .. })));
}

#[test]
fn encoder_refuses_frames_that_would_not_decode() {
    let long = "x".repeat(MAX_STRING_BYTES + 1);
    let mut out = Vec::new();
    let f: Frame = Frame::Disconnect { reason: long };
    assert!(f.encode(0, &mut out).is_err());
    let bad: Frame = Frame::Data {
        offset_bytes: 0,
        len: 4,
        request_id: 0,
        seq: 0,
        flags: DATA_TRIM,
        digest: Digest::EMPTY,
        payload: vec![0; 4],
    };
    assert!(bad.encode(0, &mut out).is_err());
    let too_big: Frame = Frame::ResyncData {
        offset_bytes: 0,
        len: MAX_PAYLOAD_BYTES as u32 + 1,
        id: 0,
        payload: vec![0; MAX_PAYLOAD_BYTES + 1],
    };
    assert!(too_big.encode(0, &mut out).is_err());
    assert!(out.is_empty());
    assert!(Digest::new(&[0; MAX_DIGEST_BYTES + 1]).is_none());
}

#[test]
fn header_layout_is_as_documented() {
    let b = encode(&Frame::Barrier { epoch: 0x0102_0304 }, 0x0A0B_0C0D);
    assert_eq!(
        b,
        [b'R', b'D', b'B', b'1', 11, 0, 0, 0, 0x0D, 0x0C, 0x0B, 0x0A, 4, 0, 0, 0, 4, 3, 2, 1]
    );
}

#[test]
fn features_are_the_bits_both_sides_announced() {
    let all = FEATURES_SUPPORTED;
    // Distinct bits, AUTH not among the negotiated ones.
    assert_eq!(FEATURE_AUTH & all, 0);
    assert_eq!(FEATURE_RESYNC_ZEROES & FEATURE_NET_SETTINGS, 0);
    assert_eq!(negotiate_features(all, all), all);
    // A peer of the first version announces nothing (or only AUTH).
    assert_eq!(negotiate_features(all, 0), 0);
    assert_eq!(negotiate_features(all | FEATURE_AUTH, FEATURE_AUTH), 0);
    // One feature on one side only: not used.
    assert_eq!(
        negotiate_features(all, FEATURE_NET_SETTINGS),
        FEATURE_NET_SETTINGS
    );
    assert_eq!(
        negotiate_features(FEATURE_RESYNC_ZEROES, all),
        FEATURE_RESYNC_ZEROES
    );
    // Bits of a newer peer we do not know are ignored; symmetric.
    let newer = all | 1 << 40;
    assert_eq!(negotiate_features(all, newer), all);
    assert_eq!(
        negotiate_features(newer, all),
        negotiate_features(all, newer)
    );
}
