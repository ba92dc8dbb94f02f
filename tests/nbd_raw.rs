//! rdb's NBD server driven byte by byte with `rdb_protocol::nbd`: option errors,
//! metadata contexts, EXPORT_NAME padding, fatal vs non-fatal request errors,
//! connection limit, and shutdown draining in-flight requests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

mod nbd_common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nbd_common::{sparse_file, FileDev, MapResolver, TestServer};
use rdb::frontend::nbd::NbdLimits;
use rdb::storage::{BlockIo, IoFuture};
use rdb_protocol::nbd::{self as proto, InfoRequest, MetaContextRequest, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const DEADLINE: Duration = Duration::from_secs(10);
const SIZE_BYTES: u64 = 1 << 20;

async fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .expect("server did not answer in time")
        .expect("read from server failed");
    buf
}

async fn expect_eof(s: &mut UnixStream) {
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("server did not close the connection in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the connection");
}

/// Connects and completes greeting + client flags.
async fn connect(server: &TestServer, client_flags: u32) -> UnixStream {
    let mut s = UnixStream::connect(&server.socket).await.unwrap();
    let greeting = read_n(&mut s, proto::GREETING_LEN).await;
    let flags = proto::decode_greeting(&greeting).unwrap();
    assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
    s
}

async fn send_option(s: &mut UnixStream, option: u32, payload: &[u8]) {
    let mut out = Vec::new();
    proto::encode_option(&mut out, option, payload);
    s.write_all(&out).await.unwrap();
}

async fn read_option_reply(s: &mut UnixStream) -> (proto::OptionReplyHeader, Vec<u8>) {
    let h = proto::decode_option_reply_header(&read_n(s, proto::OPTION_REPLY_HEADER_LEN).await)
        .unwrap();
    let payload = read_n(s, h.len_bytes as usize).await;
    (h, payload)
}

fn go_payload(name: &str, info_types: Vec<u16>) -> Vec<u8> {
    let mut p = Vec::new();
    proto::encode_info_request(
        &mut p,
        &InfoRequest {
            name: name.into(),
            info_types,
        },
    );
    p
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = Vec::new();
    proto::encode_meta_context_request(
        &mut p,
        &MetaContextRequest {
            export: export.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        },
    );
    p
}

/// GO to `name`, expecting success; returns (size, transmission flags).
async fn go(s: &mut UnixStream, name: &str) -> (u64, u16) {
    send_option(s, proto::OPT_GO, &go_payload(name, vec![])).await;
    let mut export = None;
    loop {
        let (h, p) = read_option_reply(s).await;
        match h.reply_type {
            proto::REP_INFO if p[..2] == proto::INFO_EXPORT.to_be_bytes() => {
                let size = u64::from_be_bytes(p[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes(p[10..12].try_into().unwrap());
                export = Some((size, flags));
            }
            proto::REP_INFO => {}
            proto::REP_ACK => return export.expect("GO acknowledged without INFO_EXPORT"),
            other => panic!(
                "unexpected reply {other:#x} to GO: {:?}",
                String::from_utf8_lossy(&p)
            ),
        }
    }
}

async fn request(
    s: &mut UnixStream,
    command: u16,
    flags: u16,
    cookie: u64,
    offset_bytes: u64,
    len_bytes: u32,
) {
    let req = Request {
        flags,
        command,
        cookie,
        offset_bytes,
        len_bytes,
    };
    s.write_all(&req.encode()).await.unwrap();
}

async fn read_simple(s: &mut UnixStream) -> proto::SimpleReply {
    proto::decode_simple_reply(&read_n(s, proto::SIMPLE_REPLY_LEN).await).unwrap()
}

async fn read_chunk(s: &mut UnixStream) -> (proto::ChunkHeader, Vec<u8>) {
    let h = proto::decode_chunk_header(&read_n(s, proto::CHUNK_HEADER_LEN).await).unwrap();
    let p = read_n(s, h.len_bytes as usize).await;
    (h, p)
}

fn test_server(limits: NbdLimits) -> (TestServer, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    sparse_file(&path, SIZE_BYTES);
    let dev = FileDev::open(&path);
    let server = TestServer::start_with(
        MapResolver::default()
            .with_export("d", "the disk", dev, false)
            .with_refused("r0", "resource r0 is Secondary"),
        limits,
    );
    // Keep the file alive with the server's own temp dir.
    let kept = server.dir.path().join("dev.img");
    std::fs::rename(&path, &kept).unwrap();
    (server, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_phase_errors_and_meta_contexts() {
    let (server, _path) = test_server(NbdLimits::default());
    let mut s = connect(
        &server,
        proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
    )
    .await;

    send_option(&mut s, 42, b"junk").await;
    let (h, _) = read_option_reply(&mut s).await;
    assert_eq!((h.option, h.reply_type), (42, proto::REP_ERR_UNSUP));

    send_option(&mut s, proto::OPT_STARTTLS, &[]).await;
    assert_eq!(
        read_option_reply(&mut s).await.0.reply_type,
        proto::REP_ERR_UNSUP
    );

    send_option(&mut s, proto::OPT_LIST, b"x").await;
    assert_eq!(
        read_option_reply(&mut s).await.0.reply_type,
        proto::REP_ERR_INVALID
    );

    send_option(
        &mut s,
        proto::OPT_LIST_META_CONTEXT,
        &meta_payload("d", &[]),
    )
    .await;
    assert_eq!(
        read_option_reply(&mut s).await.0.reply_type,
        proto::REP_ERR_INVALID
    );

    send_option(&mut s, proto::OPT_GO, &go_payload("r0", vec![])).await;
    let (h, p) = read_option_reply(&mut s).await;
    assert_eq!(h.reply_type, proto::REP_ERR_POLICY);
    assert_eq!(p, b"resource r0 is Secondary");

    send_option(&mut s, proto::OPT_INFO, &go_payload("nope", vec![])).await;
    assert_eq!(
        read_option_reply(&mut s).await.0.reply_type,
        proto::REP_ERR_UNKNOWN
    );

    // Truncated GO payload.
    send_option(&mut s, proto::OPT_GO, &[0, 0, 0, 9, b'd']).await;
    assert_eq!(
        read_option_reply(&mut s).await.0.reply_type,
        proto::REP_ERR_INVALID
    );

    send_option(&mut s, proto::OPT_LIST, &[]).await;
    let (h, p) = read_option_reply(&mut s).await;
    assert_eq!(h.reply_type, proto::REP_SERVER);
    assert_eq!(p, b"\0\0\0\x01dthe disk");
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, proto::REP_ACK);

    send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, proto::REP_ACK);

    send_option(
        &mut s,
        proto::OPT_LIST_META_CONTEXT,
        &meta_payload("d", &[]),
    )
    .await;
    let (h, p) = read_option_reply(&mut s).await;
    assert_eq!(h.reply_type, proto::REP_META_CONTEXT);
    assert_eq!(&p[4..], b"base:allocation");
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, proto::REP_ACK);

    // An unknown context selects nothing.
    send_option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta_payload("d", &["qemu:dirty-bitmap:x"]),
    )
    .await;
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, proto::REP_ACK);

    send_option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta_payload("d", &["base:allocation"]),
    )
    .await;
    let (h, p) = read_option_reply(&mut s).await;
    assert_eq!(h.reply_type, proto::REP_META_CONTEXT);
    let context_id = u32::from_be_bytes(p[..4].try_into().unwrap());
    assert_eq!(read_option_reply(&mut s).await.0.reply_type, proto::REP_ACK);

    send_option(
        &mut s,
        proto::OPT_GO,
        &go_payload(
            "d",
            vec![
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_BLOCK_SIZE,
            ],
        ),
    )
    .await;
    let mut infos = Vec::new();
    loop {
        let (h, p) = read_option_reply(&mut s).await;
        if h.reply_type == proto::REP_ACK {
            break;
        }
        assert_eq!(h.reply_type, proto::REP_INFO);
        infos.push(p);
    }
    assert!(infos.contains(&b"\0\x01d".to_vec()), "{infos:?}");
    assert!(infos.contains(&b"\0\x02the disk".to_vec()), "{infos:?}");
    let export = infos.iter().find(|p| p[..2] == [0, 0]).unwrap();
    let tflags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_ne!(tflags & proto::TFLAG_SEND_DF, 0);
    assert_ne!(tflags & proto::TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(tflags & proto::TFLAG_READ_ONLY, 0);

    // Transmission: write, structured read, unknown command, block status, DISC.
    let mut write = Request {
        flags: proto::CMD_FLAG_FUA,
        command: proto::CMD_WRITE,
        cookie: 1,
        offset_bytes: 8192,
        len_bytes: 4096,
    }
    .encode()
    .to_vec();
    write.extend_from_slice(&[0x77; 4096]);
    s.write_all(&write).await.unwrap();
    assert_eq!(
        read_simple(&mut s).await,
        proto::SimpleReply {
            error: 0,
            cookie: 1
        }
    );

    request(&mut s, proto::CMD_READ, 0, 2, 8192, 4096).await;
    let (h, p) = read_chunk(&mut s).await;
    assert_eq!(
        (h.cookie, h.flags, h.reply_type),
        (2, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA)
    );
    assert_eq!(&p[..8], &8192u64.to_be_bytes());
    assert!(p[8..].iter().all(|&b| b == 0x77));

    request(&mut s, 99, 0, 3, 0, 0).await;
    assert_eq!(
        read_simple(&mut s).await,
        proto::SimpleReply {
            error: proto::NBD_EINVAL,
            cookie: 3
        }
    );

    request(&mut s, proto::CMD_READ, 0, 4, SIZE_BYTES, 1).await;
    let (h, p) = read_chunk(&mut s).await;
    assert_eq!(h.reply_type, proto::REPLY_TYPE_ERROR);
    assert_eq!(&p[..4], &proto::NBD_EINVAL.to_be_bytes());

    request(&mut s, proto::CMD_BLOCK_STATUS, 0, 5, 0, SIZE_BYTES as u32).await;
    let (h, p) = read_chunk(&mut s).await;
    assert_eq!(h.reply_type, proto::REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(&p[..4], &context_id.to_be_bytes());
    let descriptors: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        descriptors.iter().map(|d| u64::from(d.0)).sum::<u64>(),
        SIZE_BYTES
    );
    assert!(descriptors.contains(&(4096, 0)), "{descriptors:?}");

    // DISC right behind a write: the write is still answered, then the server closes.
    s.write_all(&write).await.unwrap();
    request(&mut s, proto::CMD_DISC, 0, 6, 0, 0).await;
    assert_eq!(
        read_simple(&mut s).await,
        proto::SimpleReply {
            error: 0,
            cookie: 1
        }
    );
    expect_eof(&mut s).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_zeroes() {
    let (server, _path) = test_server(NbdLimits::default());
    for no_zeroes in [false, true] {
        let flags = proto::FLAG_C_FIXED_NEWSTYLE
            | if no_zeroes {
                proto::FLAG_C_NO_ZEROES
            } else {
                0
            };
        let mut s = connect(&server, flags).await;
        send_option(&mut s, proto::OPT_EXPORT_NAME, b"d").await;
        let reply = read_n(&mut s, if no_zeroes { 10 } else { 134 }).await;
        assert_eq!(
            u64::from_be_bytes(reply[..8].try_into().unwrap()),
            SIZE_BYTES
        );
        assert!(reply[10..].iter().all(|&b| b == 0));
        request(&mut s, proto::CMD_READ, 0, 7, 0, 512).await;
        assert_eq!(
            read_simple(&mut s).await,
            proto::SimpleReply {
                error: 0,
                cookie: 7
            }
        );
        assert_eq!(read_n(&mut s, 512).await, vec![0u8; 512]);
    }
    // An unknown EXPORT_NAME has no error reply: the server closes.
    let mut s = connect(&server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    send_option(&mut s, proto::OPT_EXPORT_NAME, b"nope").await;
    expect_eof(&mut s).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_errors_close_only_that_connection() {
    let (server, _path) = test_server(NbdLimits::default());
    let flags = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;

    // Unknown client flags.
    let mut s = connect(&server, 1 << 7).await;
    expect_eof(&mut s).await;

    // Oversize option payload.
    let mut s = connect(&server, flags).await;
    let mut out = Vec::new();
    proto::encode_option(&mut out, proto::OPT_GO, &[]);
    out[12..16].copy_from_slice(&(16u32 << 20).to_be_bytes());
    s.write_all(&out).await.unwrap();
    expect_eof(&mut s).await;

    // Bad request magic.
    let mut s = connect(&server, flags).await;
    go(&mut s, "d").await;
    let mut bad = Request {
        flags: 0,
        command: proto::CMD_READ,
        cookie: 1,
        offset_bytes: 0,
        len_bytes: 512,
    }
    .encode();
    bad[0] ^= 0xff;
    s.write_all(&bad).await.unwrap();
    expect_eof(&mut s).await;

    // Oversize write payload.
    let mut s = connect(&server, flags).await;
    go(&mut s, "d").await;
    request(&mut s, proto::CMD_WRITE, 0, 1, 0, 64 << 20).await;
    expect_eof(&mut s).await;

    // A too long READ is an error reply, not fatal.
    let mut s = connect(&server, flags).await;
    let (size, _) = go(&mut s, "d").await;
    assert_eq!(size, SIZE_BYTES);
    request(&mut s, proto::CMD_READ, 0, 2, 0, 64 << 20).await;
    assert_eq!(read_simple(&mut s).await.error, proto::NBD_EINVAL);
    // Block status without a negotiated context: EINVAL.
    request(&mut s, proto::CMD_BLOCK_STATUS, 0, 3, 0, 4096).await;
    assert_eq!(read_simple(&mut s).await.error, proto::NBD_EINVAL);
    request(&mut s, proto::CMD_READ, 0, 4, 0, 512).await;
    assert_eq!(
        read_simple(&mut s).await,
        proto::SimpleReply {
            error: 0,
            cookie: 4
        }
    );
    read_n(&mut s, 512).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit() {
    let limits = NbdLimits {
        max_connections: 1,
        ..NbdLimits::default()
    };
    let (server, _path) = test_server(limits);
    let mut first = connect(&server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    go(&mut first, "d").await;
    assert_eq!(server.server.connection_count(), 1);
    let mut second = UnixStream::connect(&server.socket).await.unwrap();
    expect_eof(&mut second).await;
    request(&mut first, proto::CMD_DISC, 0, 0, 0, 0).await;
    expect_eof(&mut first).await;
    // The slot frees once the first connection is gone.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while server.server.connection_count() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection slot not released"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut third = connect(&server, proto::FLAG_C_FIXED_NEWSTYLE).await;
    go(&mut third, "d").await;
    server.stop().await;
}

/// A device whose writes take `delay` (to observe draining on shutdown).
struct SlowDev {
    inner: Arc<FileDev>,
    delay: Duration,
}

impl BlockIo for SlowDev {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        self.inner.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.write_at(offset, data, fua).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    sparse_file(&path, SIZE_BYTES);
    let dev = Arc::new(SlowDev {
        inner: FileDev::open(&path),
        delay: Duration::from_millis(300),
    });
    let server = TestServer::start(MapResolver::default().with_export("", "", dev, false));
    let mut s = connect(
        &server,
        proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
    )
    .await;
    go(&mut s, "").await;
    let mut write = Request {
        flags: 0,
        command: proto::CMD_WRITE,
        cookie: 9,
        offset_bytes: 0,
        len_bytes: 4096,
    }
    .encode()
    .to_vec();
    write.extend_from_slice(&[0x33; 4096]);
    s.write_all(&write).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stop = tokio::spawn(server.stop());
    assert_eq!(
        read_simple(&mut s).await,
        proto::SimpleReply {
            error: 0,
            cookie: 9
        }
    );
    expect_eof(&mut s).await;
    tokio::time::timeout(DEADLINE, stop).await.unwrap().unwrap();
    assert!(std::fs::read(&path).unwrap()[..4096]
        .iter()
        .all(|&b| b == 0x33));
}
