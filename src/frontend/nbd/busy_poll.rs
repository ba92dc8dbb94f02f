//! Bounded busy-polling of a connection's socket while nothing is in flight.
//!
//! Owns [`BusyPollRead`], the reader the request loop reads requests through. At
//! queue depth 1 the client sends its next request a few µs to a few tens of µs
//! after it got the previous reply; a thread that sleeps in `epoll_wait` in between
//! lets its CPU go idle, and waking an idle CPU costs far more than the request
//! itself on virtual machines whose guests halt at once (see
//! `docs/performance.md`). So, when the request loop arms it (nothing in flight,
//! after a run of requests that each arrived alone: `transmission.rs`), the
//! reader first polls the socket with non-blocking `recv` calls for at most
//! `budget` (yielding the CPU between two attempts, so a client sharing it runs),
//! and only then waits for readiness the usual way. This is user-space busy
//! polling in the manner of `SO_BUSY_POLL` and the guest's `haltpoll`: it trades
//! at most `budget` of CPU per idle period for the wake-up latency.
//!
//! Reading around tokio's readiness is sound: bytes read here are simply not there
//! any more when tokio reads; a readiness event for them only makes a later read
//! return `WouldBlock`, which clears it.

use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use crate::spin::spin_until;

/// Default busy-poll budget per idle period.
pub const DEFAULT_BUSY_POLL_US: u64 = 50;

/// A socket reader that busy-polls for at most `budget` while `armed`.
pub(crate) struct BusyPollRead<R> {
    inner: R,
    fd: RawFd,
    budget: Duration,
    /// Set by the request loop when nothing is in flight; cleared here once a poll
    /// ran out of budget, so a wake-up after that waits the usual way.
    armed: Arc<AtomicBool>,
}

impl<R> BusyPollRead<R> {
    /// Wraps `inner`, whose socket is `fd` (which must stay open as long as
    /// `inner`), with a budget of `budget_us` per poll (0: never polls).
    pub(crate) fn new(inner: R, fd: RawFd, budget_us: u64) -> (Self, Arc<AtomicBool>) {
        let armed = Arc::new(AtomicBool::new(false));
        let reader = BusyPollRead {
            inner,
            fd,
            budget: Duration::from_micros(budget_us),
            armed: Arc::clone(&armed),
        };
        (reader, armed)
    }

    /// One non-blocking `recv` into `buf`: `None` when nothing is there yet.
    fn try_recv(&self, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
        // SAFETY: the region is only handed to `recv`, which writes received bytes
        // into it and never de-initialises anything.
        let unfilled = unsafe { buf.unfilled_mut() };
        loop {
            // SAFETY: `unfilled` is a valid, writable region of `unfilled.len()` bytes
            // owned by `buf` for the duration of the call; `recv` writes at most that
            // many bytes and never reads them. `self.fd` is the open socket of `inner`.
            let n = unsafe {
                libc::recv(
                    self.fd,
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: `recv` initialised the first `n` bytes of the unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                return Some(Ok(()));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return None,
                _ => return Some(Err(e)),
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for BusyPollRead<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.budget.is_zero() && buf.remaining() > 0 && this.armed.load(Ordering::Relaxed) {
            match spin_until(this.budget, || this.try_recv(buf)) {
                Some(result) => return Poll::Ready(result),
                None => this.armed.store(false, Ordering::Relaxed),
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use tokio::io::AsyncReadExt;

    use std::time::Instant;

    use super::*;

    fn pair(
        budget_us: u64,
    ) -> (
        BusyPollRead<tokio::net::UnixStream>,
        Arc<AtomicBool>,
        std::os::unix::net::UnixStream,
    ) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = tokio::net::UnixStream::from_std(ours).unwrap();
        let fd = ours.as_raw_fd();
        let (reader, armed) = BusyPollRead::new(ours, fd, budget_us);
        (reader, armed, theirs)
    }

    fn send_later(
        mut to: std::os::unix::net::UnixStream,
        after: Duration,
        bytes: Vec<u8>,
    ) -> std::thread::JoinHandle<std::os::unix::net::UnixStream> {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            to.write_all(&bytes).unwrap();
            to
        })
    }

    #[tokio::test]
    async fn an_armed_read_gets_bytes_that_arrive_while_it_polls() {
        let (mut reader, armed, theirs) = pair(5_000_000);
        armed.store(true, Ordering::Relaxed);
        let writer = send_later(theirs, Duration::from_millis(20), b"hello".to_vec());
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Still armed: the bytes came in before the budget ran out.
        assert!(armed.load(Ordering::Relaxed));
        drop(writer.join().unwrap());
        // EOF is seen by the polling path too.
        assert_eq!(reader.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn reads_alternating_between_polling_and_readiness_lose_nothing() {
        let (mut reader, armed, mut theirs) = pair(1);
        for round in 0u8..50 {
            // Bytes already there: read by `recv` when armed, by tokio otherwise;
            // the readiness events they leave behind must not confuse later reads.
            armed.store(round % 2 == 0, Ordering::Relaxed);
            theirs.write_all(&[round; 3]).unwrap();
            let mut got = [0u8; 3];
            reader.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 3]);
            // Nothing there: the 1 µs poll runs out (and disarms) and the read must
            // wait for readiness, then see the bytes written only after that.
            armed.store(true, Ordering::Relaxed);
            let flag = Arc::clone(&armed);
            let mut to = theirs;
            let writer = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(100));
                }
                assert!(!flag.load(Ordering::Relaxed), "an expired poll disarms");
                to.write_all(&[round ^ 0xff; 2]).unwrap();
                to
            });
            let mut got = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(20), reader.read_exact(&mut got))
                .await
                .expect("a read after an expired poll must be woken by readiness")
                .unwrap();
            assert_eq!(got, [round ^ 0xff; 2]);
            theirs = writer.join().unwrap();
        }
    }
}
