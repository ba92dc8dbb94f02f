//! NBD transmission phase: pipelined request execution and one reply writer.
//!
//! Owns the request loop of one connection. The reader decodes a request header,
//! reads a WRITE payload straight into a buffer that becomes the `Bytes` handed to
//! the device, takes an in-flight slot (bounded by count and by payload bytes) and
//! spawns the request; requests run concurrently. Replies go out in completion order
//! through a [`ReplySink`]: the finishing request writes them itself when the socket
//! is free, batching whatever else completed meanwhile into one flush.
//!
//! A bad magic or an oversize WRITE is fatal for the connection; a bad request
//! (range, unknown command, read-only export) gets an error reply and the connection
//! keeps serving. On DISC, EOF or shutdown, the reader stops and the connection
//! closes after every in-flight request has been answered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use rdb_protocol::nbd::{self as proto, BlockDescriptor, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::{wait_shutdown, ConnError, NbdLimits};
use crate::storage::{Extent, IoError};

/// Read buffer of a connection (many request headers per syscall).
const READ_BUFFER_BYTES: usize = 128 * 1024;
/// Write buffer of the reply writer (many replies per syscall).
const WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// Most descriptors in one BLOCK_STATUS reply.
const MAX_BLOCK_DESCRIPTORS: usize = 64 * 1024;

/// One encoded reply, ready to be written.
enum Reply {
    /// A simple reply without data.
    Simple([u8; proto::SIMPLE_REPLY_LEN]),
    /// A header (simple reply or OFFSET_DATA chunk header) followed by read data.
    Data {
        header: [u8; proto::OFFSET_DATA_HEADER_LEN],
        header_len: usize,
        data: Vec<u8>,
    },
    /// Any other encoded reply (structured error, block status, done).
    Encoded(Vec<u8>),
}

impl Reply {
    async fn write_to<W: AsyncWrite + Unpin>(&self, out: &mut BufWriter<W>) -> std::io::Result<()> {
        match self {
            Reply::Simple(bytes) => out.write_all(bytes).await,
            Reply::Data {
                header,
                header_len,
                data,
            } => {
                out.write_all(&header[..*header_len]).await?;
                out.write_all(data).await
            }
            Reply::Encoded(bytes) => out.write_all(bytes).await,
        }
    }
}

/// Permits a request holds until its reply has been written and flushed.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// The reply side of a connection. There is no writer task: the request that
/// finishes takes the writer if it is free and writes every queued reply (its own
/// and those that completed meanwhile), flushing once per batch; a request that
/// finds the writer busy only queues its reply. This saves a task hop per reply
/// at low queue depth and batches replies at high queue depth.
struct ReplySink<W> {
    queue: std::sync::Mutex<VecDeque<(Reply, Permits)>>,
    writer: tokio::sync::Mutex<BufWriter<W>>,
    failed: AtomicBool,
    failed_notify: Notify,
}

impl<W: AsyncWrite + Unpin + Send> ReplySink<W> {
    fn new(wr: W) -> Self {
        ReplySink {
            queue: std::sync::Mutex::new(VecDeque::new()),
            writer: tokio::sync::Mutex::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr)),
            failed: AtomicBool::new(false),
            failed_notify: Notify::new(),
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(Reply, Permits)>> {
        // A panic while holding this lock only happens inside VecDeque itself; the
        // queue is still consistent, so recover from poisoning.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a reply and writes the queue if no other request is writing.
    async fn submit(&self, reply: Reply, permits: Permits) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        self.lock_queue().push_back((reply, permits));
        loop {
            let Ok(mut writer) = self.writer.try_lock() else {
                // The holder re-checks the queue after releasing the writer.
                return;
            };
            loop {
                let batch = std::mem::take(&mut *self.lock_queue());
                if batch.is_empty() {
                    break;
                }
                if let Err(e) = write_batch(&mut writer, &batch).await {
                    tracing::debug!(error = %e, "writing replies failed");
                    self.failed.store(true, Ordering::Release);
                    self.failed_notify.notify_one();
                    self.lock_queue().clear();
                    return;
                }
                // `batch` (with its permits) drops here, after the flush.
            }
            drop(writer);
            if self.lock_queue().is_empty() || self.failed.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut BufWriter<W>,
    batch: &VecDeque<(Reply, Permits)>,
) -> std::io::Result<()> {
    for (reply, _) in batch {
        reply.write_to(writer).await?;
    }
    writer.flush().await
}

/// Serves requests until DISC, EOF, a fatal error or shutdown.
pub(crate) async fn serve<R, W>(
    session: Session,
    limits: &NbdLimits,
    rd: R,
    wr: W,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!(
        export = %session.export.name,
        structured = session.structured,
        base_allocation = session.base_allocation,
        "transmission"
    );
    let session = Arc::new(session);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let sink = Arc::new(ReplySink::new(wr));
    let slots = Arc::new(Semaphore::new(limits.max_inflight_per_conn));
    let byte_budget = Arc::new(Semaphore::new(limits.max_inflight_bytes_per_conn as usize));

    let result: Result<(), ConnError> = loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        let read = tokio::select! {
            biased;
            read = reader.read_exact(&mut header) => read,
            () = wait_shutdown(&mut shutdown) => break Ok(()),
            () = sink.failed_notify.notified() => break Ok(()),
        };
        match read {
            Ok(_) => {}
            // A client that closes without DISC is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match proto::decode_request(&header, limits.max_request_bytes) {
            Ok(req) => req,
            Err(e) => break Err(e.into()),
        };
        if req.command == proto::CMD_DISC {
            break Ok(());
        }

        // Take the permits before reading the payload: memory stays bounded.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            unreachable!("the in-flight semaphore is never closed");
        };
        let cost_bytes = match req.command {
            proto::CMD_READ | proto::CMD_WRITE => req.len_bytes.min(limits.max_request_bytes),
            _ => 0,
        };
        let Ok(bytes) = Arc::clone(&byte_budget)
            .acquire_many_owned(cost_bytes)
            .await
        else {
            unreachable!("the byte-budget semaphore is never closed");
        };
        let permits = Permits {
            _slot: slot,
            _bytes: bytes,
        };
        let payload = if req.command == proto::CMD_WRITE {
            match read_payload(&mut reader, req.len_bytes as usize).await {
                Ok(payload) => Some(payload),
                Err(e) => break Err(e.into()),
            }
        } else {
            None
        };

        let max_request_bytes = limits.max_request_bytes;
        // Alone in flight with nothing more buffered (queue depth 1): run it here,
        // saving a task spawn and a wake-up on the latency-bound path.
        let alone = slots.available_permits() + 1 == limits.max_inflight_per_conn
            && reader.buffer().is_empty();
        if alone {
            let reply = execute(&session, &req, payload, max_request_bytes).await;
            sink.submit(reply, permits).await;
            continue;
        }
        let session = Arc::clone(&session);
        let sink = Arc::clone(&sink);
        tokio::spawn(async move {
            let reply = execute(&session, &req, payload, max_request_bytes).await;
            sink.submit(reply, permits).await;
        });
    };

    // Every permit comes back once its reply is written and flushed (or dropped
    // after a write error): then nothing is in flight.
    let all = u32::try_from(limits.max_inflight_per_conn).unwrap_or(u32::MAX);
    let _drained = slots.acquire_many(all).await;
    let mut writer = sink.writer.lock().await;
    let closed = writer.shutdown().await;
    result?;
    if sink.failed.load(Ordering::Acquire) {
        return Err(ConnError::Writer("writing replies failed".into()));
    }
    closed.map_err(ConnError::from)
}

/// Reads a WRITE payload into a buffer of exactly `len` bytes (no zero-fill, no copy).
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        let n = (&mut *reader).take(want).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    debug_assert_eq!(buf.len(), len);
    Ok(buf)
}

/// A request that failed: NBD error and message.
struct Failure {
    error: u32,
    message: String,
}

impl Failure {
    fn new(error: u32, message: impl Into<String>) -> Self {
        Failure {
            error,
            message: message.into(),
        }
    }
}

impl From<IoError> for Failure {
    fn from(e: IoError) -> Self {
        Failure {
            error: proto::errno_to_nbd(e.errno()),
            message: e.to_string(),
        }
    }
}

fn check_range(req: &Request, size_bytes: u64, error: u32) -> Result<(), Failure> {
    IoError::check_range(req.offset_bytes, u64::from(req.len_bytes), size_bytes)
        .map_err(|e| Failure::new(error, e.to_string()))
}

fn check_writable(session: &Session) -> Result<(), Failure> {
    if session.export.read_only {
        Err(Failure::new(proto::NBD_EPERM, "export is read-only"))
    } else {
        Ok(())
    }
}

async fn execute(
    session: &Session,
    req: &Request,
    payload: Option<BytesMut>,
    max_request_bytes: u32,
) -> Reply {
    let cookie = req.cookie;
    let is_data_command = matches!(req.command, proto::CMD_READ | proto::CMD_BLOCK_STATUS);
    let result = match req.command {
        proto::CMD_READ => match read(session, req, max_request_bytes).await {
            Ok(reply) => return reply,
            Err(f) => Err(f),
        },
        proto::CMD_BLOCK_STATUS => match block_status(session, req).await {
            Ok(reply) => return reply,
            Err(f) => Err(f),
        },
        proto::CMD_WRITE => write(session, req, payload).await,
        proto::CMD_FLUSH => session.export.device.flush().await.map_err(Failure::from),
        proto::CMD_TRIM => trim(session, req).await,
        proto::CMD_WRITE_ZEROES => write_zeroes(session, req).await,
        proto::CMD_CACHE => check_range(req, session.export.device.size_bytes(), proto::NBD_EINVAL),
        other => Err(Failure::new(
            proto::NBD_EINVAL,
            format!("unknown command {other}"),
        )),
    };
    match result {
        Ok(()) => Reply::Simple(proto::encode_simple_reply(0, cookie)),
        Err(f) => {
            tracing::debug!(cookie, command = req.command, error = f.error, message = %f.message, "request failed");
            if session.structured && is_data_command {
                let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 6 + f.message.len());
                proto::encode_error_chunk(
                    &mut out,
                    proto::REPLY_FLAG_DONE,
                    cookie,
                    f.error,
                    &f.message,
                );
                Reply::Encoded(out)
            } else {
                Reply::Simple(proto::encode_simple_reply(f.error, cookie))
            }
        }
    }
}

async fn read(session: &Session, req: &Request, max_request_bytes: u32) -> Result<Reply, Failure> {
    let device = &session.export.device;
    check_range(req, device.size_bytes(), proto::NBD_EINVAL)?;
    if req.len_bytes > max_request_bytes {
        return Err(Failure::new(
            proto::NBD_EINVAL,
            "read longer than the maximum block size",
        ));
    }
    if req.len_bytes == 0 {
        return Ok(if session.structured {
            Reply::Encoded(proto::encode_done(req.cookie).to_vec())
        } else {
            Reply::Simple(proto::encode_simple_reply(0, req.cookie))
        });
    }
    let data = device
        .read_at(req.offset_bytes, req.len_bytes as usize)
        .await?;
    if data.len() != req.len_bytes as usize {
        return Err(Failure::new(proto::NBD_EIO, "short read from the device"));
    }
    let mut header = [0u8; proto::OFFSET_DATA_HEADER_LEN];
    let header_len = if session.structured {
        header = proto::encode_offset_data_header(
            proto::REPLY_FLAG_DONE,
            req.cookie,
            req.offset_bytes,
            req.len_bytes,
        );
        proto::OFFSET_DATA_HEADER_LEN
    } else {
        header[..proto::SIMPLE_REPLY_LEN]
            .copy_from_slice(&proto::encode_simple_reply(0, req.cookie));
        proto::SIMPLE_REPLY_LEN
    };
    Ok(Reply::Data {
        header,
        header_len,
        data,
    })
}

async fn write(session: &Session, req: &Request, payload: Option<BytesMut>) -> Result<(), Failure> {
    check_writable(session)?;
    let device = &session.export.device;
    check_range(req, device.size_bytes(), proto::NBD_ENOSPC)?;
    let Some(payload) = payload else {
        unreachable!("the reader always reads a WRITE payload");
    };
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    device
        .write_at(req.offset_bytes, payload.freeze(), fua)
        .await?;
    Ok(())
}

async fn trim(session: &Session, req: &Request) -> Result<(), Failure> {
    check_writable(session)?;
    let device = &session.export.device;
    check_range(req, device.size_bytes(), proto::NBD_EINVAL)?;
    device
        .discard(req.offset_bytes, u64::from(req.len_bytes))
        .await?;
    if req.flags & proto::CMD_FLAG_FUA != 0 {
        device.flush().await?;
    }
    Ok(())
}

async fn write_zeroes(session: &Session, req: &Request) -> Result<(), Failure> {
    check_writable(session)?;
    if req.flags & proto::CMD_FLAG_FAST_ZERO != 0 {
        return Err(Failure::new(
            proto::NBD_EINVAL,
            "FAST_ZERO was not negotiated",
        ));
    }
    let device = &session.export.device;
    check_range(req, device.size_bytes(), proto::NBD_ENOSPC)?;
    let may_unmap = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
    device
        .write_zeroes(req.offset_bytes, u64::from(req.len_bytes), may_unmap)
        .await?;
    if req.flags & proto::CMD_FLAG_FUA != 0 {
        device.flush().await?;
    }
    Ok(())
}

async fn block_status(session: &Session, req: &Request) -> Result<Reply, Failure> {
    if !session.structured || !session.base_allocation {
        return Err(Failure::new(
            proto::NBD_EINVAL,
            "BLOCK_STATUS needs structured replies and the base:allocation context",
        ));
    }
    if req.len_bytes == 0 {
        return Err(Failure::new(proto::NBD_EINVAL, "BLOCK_STATUS of length 0"));
    }
    let device = &session.export.device;
    check_range(req, device.size_bytes(), proto::NBD_EINVAL)?;
    let extents = device
        .block_status(req.offset_bytes, u64::from(req.len_bytes))
        .await?;
    let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
    let descriptors = descriptors_from_extents(&extents, req.len_bytes, req_one);
    if descriptors.is_empty() {
        return Err(Failure::new(
            proto::NBD_EIO,
            "the device returned no extent",
        ));
    }
    let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 4 + 8 * descriptors.len());
    proto::encode_block_status(
        &mut out,
        proto::REPLY_FLAG_DONE,
        req.cookie,
        BASE_ALLOCATION_ID,
        &descriptors,
    );
    Ok(Reply::Encoded(out))
}

/// Turns device extents into descriptors covering at most `len_bytes`: merges
/// neighbours with equal flags, drops empty extents, keeps one with `req_one`.
fn descriptors_from_extents(
    extents: &[Extent],
    len_bytes: u32,
    req_one: bool,
) -> Vec<BlockDescriptor> {
    let mut remaining = u64::from(len_bytes);
    let mut out: Vec<BlockDescriptor> = Vec::new();
    for extent in extents {
        if remaining == 0 {
            break;
        }
        let len = extent.len_bytes.min(remaining);
        if len == 0 {
            continue;
        }
        remaining -= len;
        // `len <= len_bytes`, a u32.
        let len = len as u32;
        let mut flags = 0;
        if extent.hole {
            flags |= proto::STATE_HOLE;
        }
        if extent.zero {
            flags |= proto::STATE_ZERO;
        }
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len_bytes += len,
            _ => {
                if out.len() == MAX_BLOCK_DESCRIPTORS {
                    break;
                }
                out.push(BlockDescriptor {
                    len_bytes: len,
                    flags,
                });
            }
        }
        if req_one {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len_bytes: u64, hole: bool) -> Extent {
        Extent {
            len_bytes,
            hole,
            zero: hole,
        }
    }

    #[test]
    fn descriptors_merge_clamp_and_req_one() {
        let extents = [
            ext(4096, false),
            ext(4096, false),
            ext(8192, true),
            ext(1 << 40, false),
        ];
        let d = descriptors_from_extents(&extents, 20_000, false);
        assert_eq!(
            d,
            vec![
                BlockDescriptor {
                    len_bytes: 8192,
                    flags: 0
                },
                BlockDescriptor {
                    len_bytes: 8192,
                    flags: 3
                },
                BlockDescriptor {
                    len_bytes: 20_000 - 16384,
                    flags: 0
                },
            ]
        );
        let d = descriptors_from_extents(&extents, 20_000, true);
        assert_eq!(
            d,
            vec![BlockDescriptor {
                len_bytes: 4096,
                flags: 0
            }]
        );
        assert!(descriptors_from_extents(&[ext(0, false)], 10, false).is_empty());
    }
}
