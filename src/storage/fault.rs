//! Fault injection around any [`BlockIo`], driven at run time through a [`FaultHandle`].
//!
//! Faults (EIO) can be injected for requests overlapping given byte ranges, at a
//! seeded random rate, or for every request after N requests. [`FaultHandle::power_cut`]
//! simulates losing the volatile write cache: writes completed since the last
//! successful flush are reverted (pre-images are kept for each one), except a seeded
//! random subset that "made it to the platter", and FUA writes, which are stable.
//!
//! Everything random comes from one `StdRng` seeded at construction, so a test run is
//! reproducible. To keep pre-images exact, writes through the injector (write, discard,
//! write_zeroes) are serialised; reads and flushes run concurrently.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{BlockIo, Extent, IoError, IoFuture};

/// Which kinds of request a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ops {
    /// `read_at`.
    pub read: bool,
    /// `write_at`, `discard`, `write_zeroes`.
    pub write: bool,
    /// `flush`.
    pub flush: bool,
}

impl Ops {
    /// Reads only.
    pub const READ: Ops = Ops {
        read: true,
        write: false,
        flush: false,
    };
    /// Writes only (incl. discard and write_zeroes).
    pub const WRITE: Ops = Ops {
        read: false,
        write: true,
        flush: false,
    };
    /// Flushes only.
    pub const FLUSH: Ops = Ops {
        read: false,
        write: false,
        flush: true,
    };
    /// Every kind.
    pub const ALL: Ops = Ops {
        read: true,
        write: true,
        flush: true,
    };

    fn has(self, k: Kind) -> bool {
        match k {
            Kind::Read => self.read,
            Kind::Write => self.write,
            Kind::Flush => self.flush,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// Counters of injected faults and simulated power cuts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounters {
    /// Reads failed with EIO.
    pub read_errors: u64,
    /// Writes (incl. discard, write_zeroes) failed with EIO.
    pub write_errors: u64,
    /// Flushes failed with EIO.
    pub flush_errors: u64,
    /// Power cuts simulated.
    pub power_cuts: u64,
    /// Unflushed writes reverted by power cuts.
    pub reverted_writes: u64,
    /// Unflushed writes that survived power cuts (including FUA writes).
    pub survived_writes: u64,
}

/// What one power cut did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Writes reverted to their pre-image.
    pub reverted: usize,
    /// Writes kept (FUA, or chosen to survive).
    pub survived: usize,
}

enum PostImage {
    Data(Bytes),
    Zeroes(u64),
}

struct JournalEntry {
    seq: u64,
    offset: u64,
    pre: Vec<u8>,
    post: PostImage,
    durable: bool,
}

struct State {
    rng: StdRng,
    ranges: Vec<(u64, u64, Ops)>,
    rate: f64,
    rate_ops: Ops,
    /// (ops allowed before failing, ops it applies to, ops seen so far).
    fail_after: Option<(u64, Ops, u64)>,
    track_writes: bool,
    survive_ratio: f64,
    journal: Vec<JournalEntry>,
    next_seq: u64,
    counters: FaultCounters,
}

impl State {
    /// Whether to fail this request; counts the injected fault.
    fn decide(&mut self, kind: Kind, range: Option<(u64, u64)>) -> bool {
        let mut fail = false;
        if let Some((n, ops, seen)) = &mut self.fail_after {
            if ops.has(kind) {
                if *seen >= *n {
                    fail = true;
                } else {
                    *seen += 1;
                }
            }
        }
        if let Some((off, len)) = range {
            let end = off.saturating_add(len.max(1));
            fail |= self
                .ranges
                .iter()
                .any(|&(s, e, ops)| ops.has(kind) && off < e && s < end);
        }
        if !fail && self.rate > 0.0 && self.rate_ops.has(kind) {
            fail = self.rng.random_bool(self.rate.clamp(0.0, 1.0));
        }
        if fail {
            match kind {
                Kind::Read => self.counters.read_errors += 1,
                Kind::Write => self.counters.write_errors += 1,
                Kind::Flush => self.counters.flush_errors += 1,
            }
        }
        fail
    }
}

struct Shared {
    inner: Arc<dyn BlockIo>,
    state: Mutex<State>,
    /// Serialises writes (pre-image capture + write) and power cuts.
    write_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Poisoning only follows a panic elsewhere; the state stays consistent
        // because every critical section is a few plain assignments.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn eio() -> IoError {
        IoError::Io(io::Error::from_raw_os_error(libc::EIO))
    }

    async fn tracked_write(&self, offset: u64, op: WriteOp) -> Result<(), IoError> {
        let len = op.len_bytes();
        IoError::check_range(offset, len, self.inner.size_bytes())?;
        let _g = self.write_lock.lock().await;
        if self.state().decide(Kind::Write, Some((offset, len))) {
            return Err(Self::eio());
        }
        let track = self.state().track_writes && len > 0;
        let pre = if track {
            Some(self.inner.read_at(offset, len as usize).await?)
        } else {
            None
        };
        let (post, durable) = match op {
            WriteOp::Data(d, fua) => {
                self.inner.write_at(offset, d.clone(), fua).await?;
                (PostImage::Data(d), fua)
            }
            WriteOp::Discard(l) => {
                self.inner.discard(offset, l).await?;
                (PostImage::Zeroes(l), false)
            }
            WriteOp::Zeroes(l, may_unmap) => {
                self.inner.write_zeroes(offset, l, may_unmap).await?;
                (PostImage::Zeroes(l), false)
            }
        };
        if let Some(pre) = pre {
            let mut st = self.state();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.journal.push(JournalEntry {
                seq,
                offset,
                pre,
                post,
                durable,
            });
        }
        Ok(())
    }
}

enum WriteOp {
    Data(Bytes, bool),
    Discard(u64),
    Zeroes(u64, bool),
}

impl WriteOp {
    fn len_bytes(&self) -> u64 {
        match self {
            WriteOp::Data(d, _) => d.len() as u64,
            WriteOp::Discard(l) | WriteOp::Zeroes(l, _) => *l,
        }
    }
}

/// A [`BlockIo`] wrapper that injects faults; configure it through [`FaultHandle`].
pub struct FaultInjector {
    shared: Arc<Shared>,
}

/// Run-time control of a [`FaultInjector`]; cheap to clone.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultInjector {
    /// Wraps `inner`; no faults are configured, writes are tracked for power cuts,
    /// and every random choice derives from `seed`.
    pub fn new(inner: Arc<dyn BlockIo>, seed: u64) -> FaultInjector {
        FaultInjector {
            shared: Arc::new(Shared {
                inner,
                state: Mutex::new(State {
                    rng: StdRng::seed_from_u64(seed),
                    ranges: Vec::new(),
                    rate: 0.0,
                    rate_ops: Ops::ALL,
                    fail_after: None,
                    track_writes: true,
                    survive_ratio: 0.0,
                    journal: Vec::new(),
                    next_seq: 0,
                    counters: FaultCounters::default(),
                }),
                write_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The control handle.
    pub fn handle(&self) -> FaultHandle {
        FaultHandle {
            shared: self.shared.clone(),
        }
    }
}

impl FaultHandle {
    /// Fails `ops` requests overlapping `[start, end)`.
    pub fn fail_range(&self, start: u64, end: u64, ops: Ops) {
        assert!(start <= end, "fault range start {start} > end {end}");
        self.shared.state().ranges.push((start, end, ops));
    }

    /// Removes every range fault.
    pub fn clear_ranges(&self) {
        self.shared.state().ranges.clear();
    }

    /// Fails `ops` requests with probability `rate` (0.0 disables).
    pub fn set_rate(&self, rate: f64, ops: Ops) {
        let mut st = self.shared.state();
        st.rate = rate.clamp(0.0, 1.0);
        st.rate_ops = ops;
    }

    /// Lets `n` more `ops` requests through, then fails every later one.
    pub fn fail_after(&self, n: u64, ops: Ops) {
        self.shared.state().fail_after = Some((n, ops, 0));
    }

    /// Removes every fault (ranges, rate, fail-after); keeps the write journal.
    pub fn clear_faults(&self) {
        let mut st = self.shared.state();
        st.ranges.clear();
        st.rate = 0.0;
        st.fail_after = None;
    }

    /// Enables or disables keeping pre-images for power cuts (on by default;
    /// disabling drops the journal).
    pub fn set_track_writes(&self, on: bool) {
        let mut st = self.shared.state();
        st.track_writes = on;
        if !on {
            st.journal.clear();
        }
    }

    /// Probability that an unflushed write survives a power cut (default 0.0).
    pub fn set_power_cut_survive_ratio(&self, ratio: f64) {
        self.shared.state().survive_ratio = ratio.clamp(0.0, 1.0);
    }

    /// Writes completed since the last successful flush (tracked ones).
    pub fn unflushed_writes(&self) -> usize {
        self.shared.state().journal.len()
    }

    /// Counters so far.
    pub fn counters(&self) -> FaultCounters {
        self.shared.state().counters.clone()
    }

    /// Simulates a power cut: reverts writes completed since the last successful
    /// flush, except FUA writes and a seeded random subset (see
    /// [`set_power_cut_survive_ratio`](Self::set_power_cut_survive_ratio)), then
    /// flushes the inner device. Survivors are re-applied in their original order, so
    /// the result is the pre-flush state plus the surviving writes.
    pub async fn power_cut(&self) -> Result<PowerCutReport, IoError> {
        let sh = &self.shared;
        let _g = sh.write_lock.lock().await;
        let (entries, keep) = {
            let mut st = sh.state();
            let entries = std::mem::take(&mut st.journal);
            let ratio = st.survive_ratio;
            let keep: Vec<bool> = entries
                .iter()
                .map(|e| e.durable || (ratio > 0.0 && st.rng.random_bool(ratio)))
                .collect();
            (entries, keep)
        };
        for e in entries.iter().rev() {
            sh.inner
                .write_at(e.offset, Bytes::copy_from_slice(&e.pre), false)
                .await?;
        }
        let mut report = PowerCutReport {
            reverted: 0,
            survived: 0,
        };
        for (e, keep) in entries.iter().zip(keep) {
            if !keep {
                report.reverted += 1;
                continue;
            }
            report.survived += 1;
            let data = match &e.post {
                PostImage::Data(d) => d.clone(),
                PostImage::Zeroes(l) => Bytes::from(vec![0u8; *l as usize]),
            };
            sh.inner.write_at(e.offset, data, false).await?;
        }
        sh.inner.flush().await?;
        let mut st = sh.state();
        st.counters.power_cuts += 1;
        st.counters.reverted_writes += report.reverted as u64;
        st.counters.survived_writes += report.survived as u64;
        Ok(report)
    }
}

impl BlockIo for FaultInjector {
    fn size_bytes(&self) -> u64 {
        self.shared.inner.size_bytes()
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move {
            IoError::check_range(offset, len as u64, self.size_bytes())?;
            if self
                .shared
                .state()
                .decide(Kind::Read, Some((offset, len as u64)))
            {
                return Err(Shared::eio());
            }
            self.shared.inner.read_at(offset, len).await
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.shared
                .tracked_write(offset, WriteOp::Data(data, fua))
                .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let seq = {
                let mut st = self.shared.state();
                if st.decide(Kind::Flush, None) {
                    return Err(Shared::eio());
                }
                st.next_seq
            };
            self.shared.inner.flush().await?;
            self.shared.state().journal.retain(|e| e.seq >= seq);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.shared.tracked_write(offset, WriteOp::Discard(len)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(
            self.shared
                .tracked_write(offset, WriteOp::Zeroes(len, may_unmap)),
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.shared.inner.block_status(offset, len)
    }

    fn flush_covers_all_handles(&self) -> bool {
        self.shared.inner.flush_covers_all_handles()
    }
}
