//! Connection handshake: Hello exchange, version negotiation, checks, authentication.
//!
//! Both sides run the same symmetric sequence (no side waits for the other to speak
//! first): send Hello, read Hello, check; if a secret is configured send
//! AuthChallenge, read the peer's, send AuthResponse, read the peer's, verify, send
//! AuthResult, read the peer's; then, when both announced `FEATURE_NET_SETTINGS`,
//! send NetSettings, read the peer's and compare ([`super::compat`], DRBD's
//! "incompatible ... settings"). The optional frames both announced
//! (`negotiate_features`) end up in [`PeerInfo::features`]. A refusal is announced
//! with a Disconnect frame carrying the reason before the socket is closed.

use bytes::{Bytes, BytesMut};
use rdb_protocol::repl::{
    negotiate_features, Frame, FrameError, Header, FEATURES_SUPPORTED, FEATURE_AUTH,
    FEATURE_NET_SETTINGS, PROTO_VERSION_MAX, PROTO_VERSION_MIN,
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
    let our_features = FEATURES_SUPPORTED;
    io.write(&Frame::Hello {
        proto_min: PROTO_VERSION_MIN,
        proto_max: PROTO_VERSION_MAX,
        features: our_features | if auth.is_some() { FEATURE_AUTH } else { 0 },
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
    let peer_features = features;
    let features = negotiate_features(our_features, peer_features);
    // The settings both sides must agree on (DRBD's P_PROTOCOL), when both send them.
    if features & FEATURE_NET_SETTINGS != 0 {
        io.write(&settings.compat.to_frame()).await?;
        let peer_settings = match io.read().await {
            Ok(f) => f,
            // The peer found our settings incompatible first: the same verdict.
            Err(PeerError::Refused(reason)) if reason.starts_with(super::INCOMPATIBLE_PREFIX) => {
                return Err(PeerError::IncompatiblePeer(reason));
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = settings.compat.check(&peer_settings) {
            return Err(io.refuse(e).await);
        }
    }
    let info = PeerInfo {
        proto_version,
        peer_features,
        features,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::compat::NetCompat;
    use rdb_protocol::repl::FEATURE_RESYNC_ZEROES;
    use tokio::net::TcpListener;

    fn settings(listen: std::net::SocketAddr) -> PeerSettings {
        PeerSettings {
            resource: "r0".into(),
            node_name: "bravo".into(),
            peer_name: "alpha".into(),
            listen_addr: listen,
            peer_addr: listen,
            auth: None,
            ping_int_ms: 1000,
            ping_timeout_ms: 1000,
            timeout_ms: 2000,
            connect_int_ms: 100,
            ko_count: 4,
            sndbuf_size_bytes: 0,
            rcvbuf_size_bytes: 0,
            max_buffers: 16,
            volumes: 1,
            compat: NetCompat::default(),
            busy_poll_us: 0,
        }
    }

    /// Runs bravo's side of the handshake against a raw alpha that sends `script`
    /// after its Hello (announcing `features`); returns bravo's result and every
    /// frame bravo sent until it closed.
    async fn against(
        features: u64,
        script: Vec<PeerFrame>,
    ) -> (Result<PeerInfo, PeerError>, Vec<PeerFrame>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let alpha = tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("dial");
            let mut io = Framed {
                stream,
                buf: BytesMut::new(),
            };
            io.write(&Frame::Hello {
                proto_min: 1,
                proto_max: 1,
                features,
                node_name: "alpha".into(),
                resource: "r0".into(),
                volumes: 1,
            })
            .await
            .expect("send Hello");
            for f in &script {
                io.write(f).await.expect("send");
            }
            let mut got = Vec::new();
            loop {
                match io.read().await {
                    Ok(f) => got.push(f),
                    Err(PeerError::Refused(reason)) => got.push(Frame::Disconnect { reason }),
                    Err(_) => return got,
                }
            }
        });
        let (stream, _) = listener.accept().await.expect("accept");
        let r = run(stream, &settings(addr), None, false)
            .await
            .map(|(_, _, info)| info);
        // Dropping bravo's stream (inside `r`'s Ok arm it is already dropped) ends
        // alpha's reading.
        let sent = alpha.await.expect("alpha task");
        (r, sent)
    }

    #[tokio::test]
    async fn a_first_version_peer_gets_no_net_settings_and_no_features() {
        let (r, sent) = against(0, Vec::new()).await;
        let info = r.expect("handshake");
        assert_eq!(info.features, 0);
        assert_eq!(info.peer_features, 0);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(
            matches!(&sent[0], Frame::Hello { features, .. } if *features == FEATURES_SUPPORTED)
        );
    }

    #[tokio::test]
    async fn both_announcing_exchange_and_compare_net_settings() {
        let ours = NetCompat::default().to_frame();
        let (r, sent) = against(FEATURES_SUPPORTED, vec![ours.clone()]).await;
        assert_eq!(r.expect("handshake").features, FEATURES_SUPPORTED);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[1], ours);
        // Only ResyncZeroes in common: no NetSettings either way.
        let (r, sent) = against(FEATURE_RESYNC_ZEROES, Vec::new()).await;
        assert_eq!(r.expect("handshake").features, FEATURE_RESYNC_ZEROES);
        assert_eq!(sent.len(), 1, "{sent:?}");
    }

    #[tokio::test]
    async fn a_peer_refusing_our_settings_is_an_incompatibility() {
        let reason =
            "incompatible after-sb-0pri settings (ours discard-least-changes, peer disconnect)";
        let (r, _) = against(
            FEATURES_SUPPORTED,
            vec![Frame::Disconnect {
                reason: reason.into(),
            }],
        )
        .await;
        let e = r.expect_err("refused");
        assert_eq!(e.kind(), crate::peer::PeerErrorKind::Incompatible);
        assert!(e.to_string().contains(reason), "{e}");
        // Our own check names our side first and tells the peer why.
        let theirs = NetCompat {
            after_sb_0pri: crate::config::AfterSb0Pri::DiscardLeastChanges,
            ..NetCompat::default()
        };
        let (r, sent) = against(FEATURES_SUPPORTED, vec![theirs.to_frame()]).await;
        let e = r.expect_err("refused");
        assert_eq!(e.kind(), crate::peer::PeerErrorKind::Incompatible);
        assert!(
            matches!(sent.last(), Some(Frame::Disconnect { reason }) if reason == "incompatible after-sb-0pri settings (ours disconnect, peer discard-least-changes)"),
            "{sent:?}"
        );
    }
}
