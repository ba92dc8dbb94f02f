//! Connection handshake: Hello exchange, version negotiation, checks, authentication.
//!
//! Both sides run the same symmetric sequence (no side waits for the other to speak
//! first): send Hello, read Hello, check; if a secret is configured send
//! AuthChallenge, read the peer's, send AuthResponse, read the peer's, verify, send
//! AuthResult, read the peer's; then send NetSettings, read the peer's and compare
//! ([`super::compat`], DRBD's "incompatible ... settings"). A refusal is announced with a Disconnect frame carrying
//! the reason before the socket is closed.

use bytes::{Bytes, BytesMut};
use rdb_protocol::repl::{
    Frame, FrameError, Header, FEATURE_AUTH, PROTO_VERSION_MAX, PROTO_VERSION_MIN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth::Authenticator;
use super::{truncate_reason, PeerError, PeerFrame, PeerInfo, PeerSettings};

/// Read size hint of the framed reader.
pub(crate) const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Take one complete frame off the front of `buf`, or `Ok(None)` when more bytes are
/// needed (the buffer then has room reserved for at least the missing bytes).
pub(crate) fn take_frame(buf: &mut BytesMut) -> Result<Option<(Header, PeerFrame)>, FrameError> {
    match Frame::check(buf) {
        Ok(len) => {
            let bytes: Bytes = buf.split_to(len).freeze();
            let (h, f) = Frame::decode_parts(&bytes)?;
            Ok(Some((h, f.map_payload(|r| bytes.slice(r)))))
        }
        Err(FrameError::Incomplete { needed }) => {
            buf.reserve(needed.max(READ_CHUNK_BYTES));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A stream with its read buffer, used during the handshake.
struct Framed {
    stream: TcpStream,
    buf: BytesMut,
}

impl Framed {
    async fn read(&mut self) -> Result<PeerFrame, PeerError> {
        loop {
            if let Some((_, f)) = take_frame(&mut self.buf)? {
                return match f {
                    Frame::Disconnect { reason } => Err(PeerError::Refused(reason)),
                    f => Ok(f),
                };
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(PeerError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the handshake",
                )));
            }
        }
    }

    async fn write(&mut self, frame: &PeerFrame) -> Result<(), PeerError> {
        let mut out = Vec::new();
        frame.encode(0, &mut out)?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Tell the peer why we refuse (best effort), then return the error.
    async fn refuse(&mut self, e: PeerError) -> PeerError {
        let reason = truncate_reason(&e.to_string());
        let _ = self.write(&Frame::Disconnect { reason }).await;
        let _ = self.stream.shutdown().await;
        e
    }
}

fn unexpected(expected: &str, got: &PeerFrame) -> PeerError {
    PeerError::Protocol(format!(
        "expected {expected} during the handshake, got command {}",
        got.command()
    ))
}

/// Run the handshake on a fresh stream. Returns the stream, the bytes read past the
/// handshake (frames the peer sent right after), and the connection facts.
pub(crate) async fn run(
    stream: TcpStream,
    settings: &PeerSettings,
    auth: Option<&Authenticator>,
    dialled: bool,
) -> Result<(TcpStream, BytesMut, PeerInfo), PeerError> {
    let local_addr = stream.local_addr()?;
    let remote_addr = stream.peer_addr()?;
    let mut io = Framed {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
    };
    io.write(&Frame::Hello {
        proto_min: PROTO_VERSION_MIN,
        proto_max: PROTO_VERSION_MAX,
        features: if auth.is_some() { FEATURE_AUTH } else { 0 },
        node_name: settings.node_name.clone(),
        resource: settings.resource.clone(),
        volumes: settings.volumes,
    })
    .await?;
    let hello = io.read().await?;
    let Frame::Hello {
        proto_min,
        proto_max,
        features,
        node_name,
        resource,
        volumes,
    } = hello
    else {
        let e = unexpected("Hello", &hello);
        return Err(io.refuse(e).await);
    };
    let proto_version = PROTO_VERSION_MAX.min(proto_max);
    if proto_version < PROTO_VERSION_MIN.max(proto_min) {
        let e = PeerError::Version {
            ours_min: PROTO_VERSION_MIN,
            ours_max: PROTO_VERSION_MAX,
            peer_min: proto_min,
            peer_max: proto_max,
        };
        return Err(io.refuse(e).await);
    }
    if resource != settings.resource {
        let e = PeerError::ResourceMismatch {
            ours: settings.resource.clone(),
            peer: resource,
        };
        return Err(io.refuse(e).await);
    }
    if node_name != settings.peer_name {
        let e = PeerError::PeerNameMismatch {
            expected: settings.peer_name.clone(),
            got: node_name,
        };
        return Err(io.refuse(e).await);
    }
    // The connection must be dialled by the node whose name sorts lower.
    let dialler_name = if dialled {
        &settings.node_name
    } else {
        &settings.peer_name
    };
    if *dialler_name != settings.node_name.as_str().min(settings.peer_name.as_str()) {
        let e = PeerError::Protocol(format!(
            "connection dialled by {dialler_name:?}, but only the node whose name sorts lower dials"
        ));
        return Err(io.refuse(e).await);
    }
    let peer_auth = features & FEATURE_AUTH != 0;
    match (auth, peer_auth) {
        (Some(_), false) => {
            let e = PeerError::AuthMismatch {
                configured_on: "this node",
            };
            return Err(io.refuse(e).await);
        }
        (None, true) => {
            let e = PeerError::AuthMismatch {
                configured_on: "the peer",
            };
            return Err(io.refuse(e).await);
        }
        _ => {}
    }
    if let Some(auth) = auth {
        authenticate(&mut io, settings, auth).await?;
    }
    // The settings both sides must agree on (DRBD's P_PROTOCOL).
    io.write(&settings.compat.to_frame()).await?;
    let peer_settings = io.read().await?;
    if let Err(e) = settings.compat.check(&peer_settings) {
        return Err(io.refuse(e).await);
    }
    let info = PeerInfo {
        proto_version,
        peer_features: features,
        peer_volumes: volumes,
        local_addr,
        remote_addr,
        dialled,
        authenticated: auth.is_some(),
    };
    Ok((io.stream, io.buf, info))
}

async fn authenticate(
    io: &mut Framed,
    settings: &PeerSettings,
    auth: &Authenticator,
) -> Result<(), PeerError> {
    let nonce: [u8; 32] = rand::random();
    io.write(&Frame::AuthChallenge { nonce }).await?;
    let peer_nonce = match io.read().await? {
        Frame::AuthChallenge { nonce } => nonce,
        other => {
            let e = unexpected("AuthChallenge", &other);
            return Err(io.refuse(e).await);
        }
    };
    if peer_nonce == nonce {
        let e = PeerError::AuthFailed("peer reflected our challenge");
        return Err(io.refuse(e).await);
    }
    let Some(mac) = auth.respond(&peer_nonce, &settings.node_name, &settings.resource) else {
        let e = PeerError::Config("HMAC cannot be keyed with the shared secret".into());
        return Err(io.refuse(e).await);
    };
    io.write(&Frame::AuthResponse { mac }).await?;
    let peer_mac = match io.read().await? {
        Frame::AuthResponse { mac } => mac,
        other => {
            let e = unexpected("AuthResponse", &other);
            return Err(io.refuse(e).await);
        }
    };
    let ok = auth.verify(
        &nonce,
        &settings.peer_name,
        &settings.resource,
        peer_mac.as_slice(),
    );
    io.write(&Frame::AuthResult { ok }).await?;
    // Always read the peer's verdict, so both sides see both results before closing.
    let verdict = io.read().await;
    if !ok {
        let _ = io.stream.shutdown().await;
        return Err(PeerError::AuthFailed(
            "the peer's response does not match (different shared secret or cram-hmac-alg?)",
        ));
    }
    match verdict? {
        Frame::AuthResult { ok: true } => Ok(()),
        Frame::AuthResult { ok: false } => {
            let _ = io.stream.shutdown().await;
            Err(PeerError::AuthFailed(
                "the peer rejected our response (different shared secret or cram-hmac-alg?)",
            ))
        }
        other => {
            let e = unexpected("AuthResult", &other);
            Err(io.refuse(e).await)
        }
    }
}
