//! Replication transport tests: two endpoints on 127.0.0.1, plus raw-socket fake peers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures are panics

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdb::peer::{
    connect, connect_with_status, PeerAuth, PeerConnection, PeerError, PeerErrorKind, PeerEvent,
    PeerFrame, PeerSettings, PeerStatus,
};
use rdb_protocol::repl::{Digest, Frame, FrameError, DATA_FUA};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(10);

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn settings(name: &str, peer: &str, listen: SocketAddr, peer_addr: SocketAddr) -> PeerSettings {
    PeerSettings {
        resource: "r0".into(),
        node_name: name.into(),
        peer_name: peer.into(),
        listen_addr: listen,
        peer_addr,
        auth: None,
        // Generous by default so an overloaded machine cannot trip the dead-peer
        // detector; the keepalive tests shrink them.
        ping_int_ms: 200,
        ping_timeout_ms: 200,
        timeout_ms: 2000,
        connect_int_ms: 100,
        ko_count: 4,
        sndbuf_size_bytes: 0,
        rcvbuf_size_bytes: 0,
        max_buffers: 256,
        volumes: 1,
        compat: Default::default(),
        busy_poll_us: rdb::peer::park_poll::DEFAULT_PEER_BUSY_POLL_US,
    }
}

fn auth(secret: &str) -> Option<PeerAuth> {
    Some(PeerAuth {
        alg: "sha256".into(),
        secret: secret.as_bytes().to_vec(),
    })
}

/// Two endpoints `alpha` (dials) and `bravo` (accepts) with their listeners.
struct Pair {
    a: PeerSettings,
    b: PeerSettings,
    la: TcpListener,
    lb: TcpListener,
}

async fn pair() -> Pair {
    let la = listener().await;
    let lb = listener().await;
    let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    Pair {
        a: settings("alpha", "bravo", aa, ab),
        b: settings("bravo", "alpha", ab, aa),
        la,
        lb,
    }
}

fn no_shutdown() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    std::mem::forget(tx);
    rx
}

async fn connect_both(p: &Pair) -> (PeerConnection, PeerConnection) {
    let (a, b) = timeout(
        DEADLINE,
        futures_join(
            connect(&p.a, &p.la, no_shutdown()),
            connect(&p.b, &p.lb, no_shutdown()),
        ),
    )
    .await
    .expect("both sides connect in time");
    (a.unwrap(), b.unwrap())
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

async fn next_frame(c: &mut PeerConnection) -> (u32, PeerFrame) {
    match timeout(DEADLINE, c.recv()).await.expect("frame in time") {
        Some(PeerEvent::Frame { volume, frame }) => (volume, frame),
        other => panic!("expected a frame, got {other:?}"),
    }
}

async fn next_lost(c: &mut PeerConnection) -> String {
    loop {
        match timeout(DEADLINE, c.recv()).await.expect("event in time") {
            Some(PeerEvent::Lost { reason }) => return reason,
            Some(PeerEvent::Frame { .. }) => continue,
            None => panic!("receiver closed without Lost"),
        }
    }
}

fn pattern(seed: u64, n: usize) -> Bytes {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn data(seq: u64, payload: Bytes) -> PeerFrame {
    Frame::Data {
        offset_bytes: seq * 4096,
        len: payload.len() as u32,
        request_id: seq + 1000,
        seq,
        flags: DATA_FUA,
        digest: Digest::new(&crc32fast::hash(&payload).to_le_bytes()).unwrap(),
        payload,
    }
}

#[tokio::test]
async fn simultaneous_connect_gives_exactly_one_connection() {
    let p = pair().await;
    let (status_a, status_b) = (PeerStatus::new(), PeerStatus::new());
    let (a, b) = tokio::join!(
        connect_with_status(&p.a, &p.la, no_shutdown(), &status_a),
        connect_with_status(&p.b, &p.lb, no_shutdown(), &status_b),
    );
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    // Both ends hold the same TCP connection, dialled by the lower name.
    assert_eq!(a.info.local_addr, b.info.remote_addr);
    assert_eq!(a.info.remote_addr, b.info.local_addr);
    assert!(a.info.dialled && !b.info.dialled);
    assert_eq!(a.info.proto_version, 1);
    assert_eq!(status_a.get().connections, 1);
    assert_eq!(status_b.get().connections, 1);
    assert_eq!(status_a.get().phase, rdb::peer::PeerPhase::Connected);
    a.sender
        .send_on(3, Frame::Barrier { epoch: 7 })
        .await
        .unwrap();
    b.sender
        .send(Frame::BarrierAck { epoch: 7, count: 1 })
        .await
        .unwrap();
    assert_eq!(next_frame(&mut b).await, (3, Frame::Barrier { epoch: 7 }));
    assert_eq!(
        next_frame(&mut a).await,
        (0, Frame::BarrierAck { epoch: 7, count: 1 })
    );
    // No second connection is pending on either listener.
    assert!(timeout(Duration::from_millis(300), p.lb.accept())
        .await
        .is_err());
    assert!(timeout(Duration::from_millis(300), p.la.accept())
        .await
        .is_err());
}

#[tokio::test]
async fn data_frames_round_trip_intact() {
    let p = pair().await;
    let (a, mut b) = connect_both(&p).await;
    let sender = a.sender.clone();
    let producer = tokio::spawn(async move {
        for seq in 0..1000u64 {
            sender.send(data(seq, pattern(seq, 4096))).await.unwrap();
        }
        // A TRIM carries no payload; a resync block and a bitmap chunk.
        sender
            .send(Frame::Data {
                offset_bytes: 0,
                len: 1 << 20,
                request_id: 1,
                seq: 1000,
                flags: rdb_protocol::repl::DATA_TRIM,
                digest: Digest::EMPTY,
                payload: Bytes::new(),
            })
            .await
            .unwrap();
        sender
            .send(Frame::ResyncData {
                offset_bytes: 8192,
                len: 65536,
                id: 9,
                payload: pattern(99, 65536),
            })
            .await
            .unwrap();
    });
    for seq in 0..1000u64 {
        match next_frame(&mut b).await.1 {
            Frame::Data {
                seq: s,
                payload,
                digest,
                offset_bytes,
                len,
                ..
            } => {
                assert_eq!(s, seq, "frames arrive in order");
                assert_eq!(offset_bytes, seq * 4096);
                assert_eq!(len, 4096);
                assert_eq!(payload, pattern(seq, 4096), "payload of frame {seq}");
                assert_eq!(digest.as_slice(), crc32fast::hash(&payload).to_le_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(
        next_frame(&mut b).await.1,
        Frame::Data { len: 1048576, ref payload, .. } if payload.is_empty()
    ));
    match next_frame(&mut b).await.1 {
        Frame::ResyncData { payload, id: 9, .. } => assert_eq!(payload, pattern(99, 65536)),
        other => panic!("unexpected {other:?}"),
    }
    producer.await.unwrap();
}

#[tokio::test]
async fn authentication_succeeds_with_the_same_secret() {
    let mut p = pair().await;
    p.a.auth = auth("s3cr3t");
    p.b.auth = Some(PeerAuth {
        alg: "hmac(sha256)".into(),
        secret: b"s3cr3t".to_vec(),
    });
    let (a, mut b) = connect_both(&p).await;
    assert!(a.info.authenticated && b.info.authenticated);
    a.sender.send(data(1, pattern(1, 4096))).await.unwrap();
    assert!(matches!(
        next_frame(&mut b).await.1,
        Frame::Data { seq: 1, .. }
    ));
}

/// Run both sides with statuses until `done(a, b)` holds, then shut them down and
/// check neither connected.
async fn run_failing_pair(
    p: &Pair,
    want_a: PeerErrorKind,
    want_b: PeerErrorKind,
) -> (PeerStatus, PeerStatus) {
    let (sa, sb) = (PeerStatus::new(), PeerStatus::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let fa = connect_with_status(&p.a, &p.la, stop_rx.clone(), &sa);
    let fb = connect_with_status(&p.b, &p.lb, stop_rx, &sb);
    let watcher = async {
        let start = Instant::now();
        loop {
            let (a, b) = (sa.get(), sb.get());
            if a.last_error_kind == Some(want_a) && b.last_error_kind == Some(want_b) {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "statuses: {a:?} / {b:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_tx.send(true).unwrap();
    };
    let (ra, rb, ()) = tokio::join!(fa, fb, watcher);
    assert!(matches!(ra, Err(PeerError::Shutdown)), "{ra:?}");
    assert!(matches!(rb, Err(PeerError::Shutdown)), "{rb:?}");
    assert_eq!(sa.get().connections, 0);
    assert_eq!(sb.get().connections, 0);
    (sa, sb)
}

#[tokio::test]
async fn wrong_secret_never_connects_and_reports_auth_failed_on_both_sides() {
    let mut p = pair().await;
    p.a.auth = auth("right");
    p.b.auth = auth("wrong");
    let (sa, sb) = run_failing_pair(&p, PeerErrorKind::AuthFailed, PeerErrorKind::AuthFailed).await;
    assert!(sa.get().auth_failures >= 1 && sb.get().auth_failures >= 1);
    let text = sa.get().last_error.unwrap();
    assert!(text.contains("authentication failed"), "{text}");
    assert!(
        !text.contains("right"),
        "the secret never appears in errors"
    );
}

#[tokio::test]
async fn incompatible_after_sb_policies_are_refused_with_drbds_text() {
    use rdb::config::AfterSb0Pri;
    let mut p = pair().await;
    p.a.compat.after_sb_0pri = AfterSb0Pri::DiscardLeastChanges;
    // Not retried: both sides give up at once (DRBD goes StandAlone).
    let (sa, sb) = (PeerStatus::new(), PeerStatus::new());
    let (ra, rb) = timeout(DEADLINE, async {
        tokio::join!(
            connect_with_status(&p.a, &p.la, no_shutdown(), &sa),
            connect_with_status(&p.b, &p.lb, no_shutdown(), &sb)
        )
    })
    .await
    .expect("an incompatible peer is not retried");
    for (r, s) in [(&ra, &sa), (&rb, &sb)] {
        assert!(
            matches!(r, Err(e) if e.kind() == PeerErrorKind::Incompatible),
            "{:?}",
            r.as_ref().err()
        );
        assert_eq!(s.get().phase, rdb::peer::PeerPhase::StandAlone);
        assert_eq!(s.get().connections, 0);
    }
    let text = sa.get().last_error.unwrap_or_default();
    assert!(
        text.contains("incompatible after-sb-0pri settings"),
        "{text}"
    );
    let text = sb.get().last_error.unwrap_or_default();
    assert!(
        text.contains("incompatible after-sb-0pri settings"),
        "{text}"
    );
    // discard-local here and discard-remote there name the same victim: agreed.
    let mut p = pair().await;
    p.a.compat.after_sb_0pri = AfterSb0Pri::DiscardLocal;
    p.b.compat.after_sb_0pri = AfterSb0Pri::DiscardRemote;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (a, b) = tokio::join!(
        rdb::peer::connect(&p.a, &p.la, stop_rx.clone()),
        rdb::peer::connect(&p.b, &p.lb, stop_rx)
    );
    drop(stop_tx);
    assert!(a.is_ok() && b.is_ok(), "{:?} / {:?}", a.err(), b.err());
}

#[tokio::test]
async fn auth_on_one_side_only_is_refused_both_ways() {
    let mut p = pair().await;
    p.a.auth = auth("x");
    run_failing_pair(&p, PeerErrorKind::AuthMismatch, PeerErrorKind::AuthMismatch).await;
    let mut p = pair().await;
    p.b.auth = auth("x");
    run_failing_pair(&p, PeerErrorKind::AuthMismatch, PeerErrorKind::AuthMismatch).await;
}

#[tokio::test]
async fn resource_mismatch_is_refused() {
    let mut p = pair().await;
    p.b.resource = "r1".into();
    run_failing_pair(
        &p,
        PeerErrorKind::ResourceMismatch,
        PeerErrorKind::ResourceMismatch,
    )
    .await;
}

fn encode(frame: &Frame, out: &mut Vec<u8>) {
    frame.encode(0, out).unwrap();
}

/// Read one frame from a raw stream (test helper of the fake peers).
async fn raw_read(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Frame> {
    loop {
        match Frame::decode(buf) {
            Ok((f, n)) => {
                buf.drain(..n);
                return Some(f);
            }
            Err(FrameError::Incomplete { .. }) => {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => panic!("endpoint sent a bad frame: {e}"),
        }
    }
}

/// A raw peer named `alpha` dialling `addr` and doing the unauthenticated handshake.
async fn fake_alpha(addr: SocketAddr, proto: (u32, u32)) -> (TcpStream, Vec<u8>, Option<Frame>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    encode(
        &Frame::Hello {
            proto_min: proto.0,
            proto_max: proto.1,
            features: rdb_protocol::repl::FEATURE_NET_SETTINGS,
            node_name: "alpha".into(),
            resource: "r0".into(),
            volumes: 1,
        },
        &mut out,
    );
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let hello = raw_read(&mut s, &mut buf).await;
    assert!(matches!(hello, Some(Frame::Hello { .. })), "{hello:?}");
    let next = if proto.0 > 1 {
        raw_read(&mut s, &mut buf).await
    } else {
        // The net settings both sides compare (DRBD's defaults on both).
        let mut out = Vec::new();
        encode(
            &Frame::NetSettings {
                protocol: b'C',
                after_sb_0pri: 0,
                after_sb_1pri: 0,
                after_sb_2pri: 0,
                flags: 0,
                integrity_alg: String::new(),
            },
            &mut out,
        );
        s.write_all(&out).await.unwrap();
        let settings = raw_read(&mut s, &mut buf).await;
        assert!(
            matches!(settings, Some(Frame::NetSettings { .. })),
            "{settings:?}"
        );
        None
    };
    (s, buf, next)
}

/// Wait until `s` is closed by the other side (EOF or reset).
async fn assert_closed(s: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    timeout(DEADLINE, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("endpoint closes the connection");
}

async fn wait_error(status: &PeerStatus, kind: PeerErrorKind) {
    let start = Instant::now();
    while status.get().last_error_kind != Some(kind) {
        assert!(start.elapsed() < DEADLINE, "status {:?}", status.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn garbage_and_truncated_frames_from_a_stranger_leave_the_endpoint_usable() {
    let mut p = pair().await;
    p.b.timeout_ms = 500; // handshake timeout of the silent stranger
    let bravo_addr = p.lb.local_addr().unwrap();
    let status = PeerStatus::new();
    let b_task = {
        let (b, lb, status) = (p.b.clone(), p.lb, status.clone());
        tokio::spawn(async move { connect_with_status(&b, &lb, no_shutdown(), &status).await })
    };
    // Garbage: rejected as a bad frame, connection closed.
    let mut s = TcpStream::connect(bravo_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_closed(&mut s).await;
    wait_error(&status, PeerErrorKind::Frame).await;
    // Truncated Hello, then the stranger hangs up: EOF during the handshake.
    let mut out = Vec::new();
    encode(
        &Frame::Hello {
            proto_min: 1,
            proto_max: 1,
            features: 0,
            node_name: "alpha".into(),
            resource: "r0".into(),
            volumes: 1,
        },
        &mut out,
    );
    let mut s = TcpStream::connect(bravo_addr).await.unwrap();
    s.write_all(&out[..out.len() - 3]).await.unwrap();
    drop(s);
    wait_error(&status, PeerErrorKind::Io).await;
    // A truncated frame and then silence: the handshake times out.
    let mut s = TcpStream::connect(bravo_addr).await.unwrap();
    s.write_all(&out[..10]).await.unwrap();
    assert_closed(&mut s).await;
    wait_error(&status, PeerErrorKind::Timeout).await;
    // No common protocol version: refused with a Disconnect carrying the reason.
    let (_s, _, next) = fake_alpha(bravo_addr, (5, 9)).await;
    match next {
        Some(Frame::Disconnect { reason }) => {
            assert!(reason.contains("protocol version"), "{reason}")
        }
        other => panic!("expected Disconnect, got {other:?}"),
    }
    wait_error(&status, PeerErrorKind::Version).await;
    // The real peer still gets in.
    let mut a = timeout(DEADLINE, connect(&p.a, &p.la, no_shutdown()))
        .await
        .unwrap()
        .unwrap();
    let b = b_task.await.unwrap().unwrap();
    b.sender.send(Frame::Flush { id: 5 }).await.unwrap();
    assert_eq!(next_frame(&mut a).await.1, Frame::Flush { id: 5 });
}

#[tokio::test]
async fn malformed_frame_after_the_handshake_loses_the_connection() {
    let p = pair().await;
    let bravo_addr = p.lb.local_addr().unwrap();
    let b_task = tokio::spawn(async move { connect(&p.b, &p.lb, no_shutdown()).await });
    let (mut s, _, _) = fake_alpha(bravo_addr, (1, 1)).await;
    let mut b = b_task.await.unwrap().unwrap();
    // A valid frame first, then a Data header whose payload disagrees with `len`.
    let mut out = Vec::new();
    encode(&Frame::Flush { id: 1 }, &mut out);
    let start = out.len();
    encode(
        &Frame::Data {
            offset_bytes: 0,
            len: 8,
            request_id: 1,
            seq: 1,
            flags: 0,
            digest: Digest::EMPTY,
            payload: vec![0; 8],
        },
        &mut out,
    );
    out[start + 16 + 24] = 9; // len = 9 but 8 payload bytes
    s.write_all(&out).await.unwrap();
    assert_eq!(next_frame(&mut b).await.1, Frame::Flush { id: 1 });
    let reason = next_lost(&mut b).await;
    assert!(reason.contains("malformed"), "{reason}");
    assert!(b.recv().await.is_none());
    assert!(b.sender.send(Frame::Ping).await.is_err());
    assert_closed(&mut s).await;
}

#[tokio::test]
async fn silent_peer_is_declared_lost_within_the_timeouts() {
    let mut p = pair().await;
    (p.b.ping_int_ms, p.b.ping_timeout_ms, p.b.timeout_ms) = (100, 100, 300);
    let bravo_addr = p.lb.local_addr().unwrap();
    let dead_after = Duration::from_millis(p.b.dead_after_ms());
    let b_task = tokio::spawn(async move { connect(&p.b, &p.lb, no_shutdown()).await });
    let (mut s, mut buf, _) = fake_alpha(bravo_addr, (1, 1)).await;
    let b_conn = b_task.await.unwrap();
    let mut b = b_conn.unwrap();
    let start = Instant::now();
    // The endpoint pings the idle peer; answering keeps it alive for a while.
    for _ in 0..5 {
        let f = timeout(DEADLINE, raw_read(&mut s, &mut buf)).await.unwrap();
        assert_eq!(f, Some(Frame::Ping));
        let mut out = Vec::new();
        encode(&Frame::PingAck, &mut out);
        s.write_all(&out).await.unwrap();
    }
    assert!(
        start.elapsed() > dead_after,
        "answered pings kept the link up"
    );
    // Now go silent.
    let silent = Instant::now();
    let reason = next_lost(&mut b).await;
    let took = silent.elapsed();
    assert!(reason.contains("no frame"), "{reason}");
    assert!(
        took >= dead_after - Duration::from_millis(150),
        "lost too early: {took:?}"
    );
    assert!(
        took < dead_after + Duration::from_secs(1),
        "lost too late: {took:?}"
    );
    assert_eq!(b.status().get().last_error_kind, Some(PeerErrorKind::Lost));
    drop(s);
}

#[tokio::test]
async fn idle_link_stays_up_and_keepalives_are_not_delivered() {
    let mut p = pair().await;
    for s in [&mut p.a, &mut p.b] {
        (s.ping_int_ms, s.ping_timeout_ms, s.timeout_ms) = (50, 100, 400);
    }
    let (mut a, mut b) = connect_both(&p).await;
    let idle = Duration::from_millis(p.a.dead_after_ms() * 4);
    let (ra, rb) = tokio::join!(timeout(idle, a.recv()), timeout(idle, b.recv()));
    assert!(ra.is_err() && rb.is_err(), "{ra:?} {rb:?}");
    a.sender.send(Frame::FlushAck { id: 2 }).await.unwrap();
    assert_eq!(next_frame(&mut b).await.1, Frame::FlushAck { id: 2 });
}

#[tokio::test]
async fn close_sends_disconnect_with_the_reason() {
    let p = pair().await;
    let (a, mut b) = connect_both(&p).await;
    a.sender.send(Frame::Barrier { epoch: 1 }).await.unwrap();
    a.close("admin disconnect").await;
    assert_eq!(next_frame(&mut b).await.1, Frame::Barrier { epoch: 1 });
    let reason = next_lost(&mut b).await;
    assert!(reason.contains("admin disconnect"), "{reason}");
}

#[tokio::test]
async fn reconnects_after_the_other_side_restarts() {
    let p = pair().await;
    let bravo_addr = p.lb.local_addr().unwrap();
    let (mut a, b) = connect_both(&p).await;
    // bravo "crashes": its connection and listener go away without a Disconnect.
    drop(b);
    drop(p.lb);
    let reason = next_lost(&mut a).await;
    assert!(!reason.is_empty());
    // bravo restarts on the same port while alpha reconnects.
    let lb = TcpListener::bind(bravo_addr).await.unwrap();
    let (a2, b2) = timeout(
        DEADLINE,
        futures_join(
            connect(&p.a, &p.la, no_shutdown()),
            connect(&p.b, &lb, no_shutdown()),
        ),
    )
    .await
    .unwrap();
    let (a2, mut b2) = (a2.unwrap(), b2.unwrap());
    a2.sender.send(Frame::Flush { id: 77 }).await.unwrap();
    assert_eq!(next_frame(&mut b2).await.1, Frame::Flush { id: 77 });
}

#[tokio::test]
async fn shutdown_stops_connect() {
    let p = pair().await;
    let (tx, rx) = watch::channel(false);
    let t = tokio::spawn(async move { connect(&p.a, &p.la, rx).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(true).unwrap();
    let r = timeout(DEADLINE, t).await.unwrap().unwrap();
    assert!(matches!(r, Err(PeerError::Shutdown)));
}

#[tokio::test]
async fn bad_settings_are_rejected_at_once() {
    let mut p = pair().await;
    p.a.auth = Some(PeerAuth {
        alg: "crc32c".into(),
        secret: b"x".to_vec(),
    });
    let r = connect(&p.a, &p.la, no_shutdown()).await;
    assert!(matches!(r, Err(PeerError::Config(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_4k_data_qd32_with_write_acks() {
    const FRAMES: u64 = 20_000;
    const QD: usize = 32;
    let p = pair().await;
    let (mut a, mut b) = connect_both(&p).await;
    // bravo acks every Data frame (protocol C style).
    let acker = tokio::spawn(async move {
        let mut n = 0u64;
        while n < FRAMES {
            match b.recv().await {
                Some(PeerEvent::Frame {
                    frame:
                        Frame::Data {
                            request_id,
                            seq,
                            payload,
                            ..
                        },
                    ..
                }) => {
                    assert_eq!(payload.len(), 4096);
                    b.sender
                        .send(Frame::WriteAck { request_id, seq })
                        .await
                        .unwrap();
                    n += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        b
    });
    let payload = pattern(5, 4096);
    let start = Instant::now();
    let mut in_flight = 0usize;
    let mut sent = 0u64;
    let mut acked = 0u64;
    while acked < FRAMES {
        while in_flight < QD && sent < FRAMES {
            a.sender.send(data(sent, payload.clone())).await.unwrap();
            sent += 1;
            in_flight += 1;
        }
        match next_frame(&mut a).await.1 {
            Frame::WriteAck { seq, .. } => {
                assert_eq!(seq, acked);
                acked += 1;
                in_flight -= 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _b = acker.await.unwrap();
    println!(
        "peer transport: {FRAMES} x 4 KiB Data + WriteAck at QD{QD}: {:.0} frames/s ({:.1} MiB/s) in {secs:.2} s",
        FRAMES as f64 / secs,
        FRAMES as f64 * 4096.0 / secs / 1048576.0
    );
}

#[tokio::test]
async fn send_written_completes_after_the_socket_write_and_fails_once_lost() {
    let p = pair().await;
    let (a, mut b) = connect_both(&p).await;
    timeout(
        DEADLINE,
        a.sender.send_written(2, data(1, pattern(1, 4096))),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(matches!(
        next_frame(&mut b).await,
        (2, Frame::Data { seq: 1, .. })
    ));
    b.close("bye").await;
    let mut a = a;
    let reason = next_lost(&mut a).await;
    assert!(reason.contains("bye"), "{reason}");
    assert!(a.sender.is_closed());
    let r = a.sender.send_written(0, Frame::Flush { id: 1 }).await;
    assert!(matches!(r, Err(PeerError::Closed)), "{r:?}");
}
