//! Regression tests of the volume driver for engine bugs the simulator found
//! (`docs/simulation.md`): B6 (demotion flushes the device first) and B7 (a forced
//! promotion while connected makes the in-sync peer adopt the new current UUID);
//! the demotion's flush bounded by the state-change timeout; zero resync chunks sent
//! as `ResyncZeroes` only to a peer that announced the feature; a barrier flushed
//! only under `disk-flushes yes`; meta-data writes that vouch for data (an evicting
//! activity-log transaction, cleared bitmap bits, a superblock becoming Consistent)
//! made durable only after a flush of that data, with external meta-data, so that a
//! power cut after an eviction leaves no lost write outside the next resync.

use super::*;
use std::sync::atomic::AtomicUsize;

const SIZE_BYTES: usize = 1 << 20;

/// A memory disk that counts flushes and, with meta-data, records the durable
/// activity log's hot set at each flush.
struct CountingDisk {
    disk: crate::storage::mem::MemDisk,
    flushes: AtomicUsize,
    md: Option<MetaData>,
    log_at_flush: Mutex<Vec<Vec<u32>>>,
}

impl CountingDisk {
    fn new(size_bytes: usize, md: Option<MetaData>) -> CountingDisk {
        CountingDisk {
            disk: crate::storage::mem::MemDisk::new(size_bytes),
            flushes: AtomicUsize::new(0),
            md,
            log_at_flush: Mutex::new(Vec::new()),
        }
    }
}

impl BlockIo for CountingDisk {
    fn size_bytes(&self) -> u64 {
        self.disk.size_bytes()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        self.disk.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        self.disk.write_at(offset, data, fua)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if let Some(md) = &self.md {
            let hot = meta::al::replay(md).expect("replay the activity log");
            self.log_at_flush
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(hot);
        }
        self.disk.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.disk.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        self.disk.write_zeroes(offset, len, may_unmap)
    }
}

/// Records every frame sent to the peer.
#[derive(Default)]
struct Recorder(Mutex<Vec<Frame<Bytes>>>);

impl PeerTx for Recorder {
    fn send(&self, frame: Frame<Bytes>) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(frame);
        Box::pin(async { true })
    }
}

impl Recorder {
    fn frames(&self) -> Vec<Frame<Bytes>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn volume(disk: DiskState) -> (Arc<Volume>, Arc<CountingDisk>) {
    let storage = Arc::new(CountingDisk::new(SIZE_BYTES, None));
    let meta = VolumeMeta {
        md: None,
        uuids: GenerationUuids {
            current: 0x1000,
            bitmap: 0,
            history: [0, 0],
        },
        crashed_primary: false,
        activity_log: false,
    };
    let v = Volume::new(
        "r0",
        storage.clone(),
        disk,
        Protocol::C,
        Bitmap::new(SIZE_BYTES as u64),
        meta,
    )
    .expect("volume without meta-data");
    (Arc::new(v), storage)
}

#[tokio::test]
async fn b6_demotion_flushes_the_device_first() {
    let (v, disk) = volume(DiskState::UpToDate);
    v.promote(false).await.expect("promote");
    BlockIo::write_at(&*v, 0, Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write");
    let before = disk.flushes.load(Ordering::SeqCst);
    v.demote_waiting(std::time::Duration::from_secs(1))
        .await
        .expect("demote");
    assert!(
        disk.flushes.load(Ordering::SeqCst) > before,
        "demoted without flushing the disk"
    );
    assert_eq!(v.lock().engine.role(), Role::Secondary);
}

#[tokio::test]
async fn b7_forced_promotion_while_connected_hands_the_new_uuid_to_the_peer() {
    let (v, _) = volume(DiskState::Consistent);
    let tx = Arc::new(Recorder::default());
    v.attach_peer(tx.clone(), Role::Secondary, DiskState::Consistent, true);
    let old = v.uuids();
    let grant = async {
        // The peer grants the cluster-wide promotion once it was asked.
        for _ in 0..1000 {
            if tx
                .frames()
                .iter()
                .any(|f| matches!(f, Frame::StateChangeRequest { .. }))
            {
                let reply = Frame::StateChangeReply {
                    ok: true,
                    reason: String::new(),
                };
                v.on_frame(reply).await;
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("no state-change request sent");
    };
    let (forced, ()) = tokio::join!(v.promote(true), grant);
    assert_eq!(forced, Ok(true));
    let mine = v.uuids();
    assert_ne!(mine.current & !1, old.current & !1, "no new generation");
    assert_eq!(mine.bitmap, 0, "the in-sync peer shares the generation");
    let sent = tx.frames().into_iter().find_map(|f| match f {
        Frame::Uuids { current, flags, .. } if flags & UUID_FLAG_NEW_CURRENT != 0 => Some(current),
        _ => None,
    });
    assert_eq!(sent.map(|c| c & !1), Some(mine.current & !1));

    // The peer's side: a connected, in-sync Secondary adopts it.
    let (peer, _) = volume(DiskState::Consistent);
    peer.attach_peer(
        Arc::new(Recorder::default()),
        Role::Primary,
        DiskState::UpToDate,
        false,
    );
    assert!(peer.adopt_new_current(mine.current));
    let theirs = peer.uuids();
    assert_eq!(theirs.current, mine.current & !1);
    assert_eq!(theirs.history[0], old.current);
    // Again: nothing changes.
    assert!(!peer.adopt_new_current(mine.current));
}

#[tokio::test]
async fn demotion_is_refused_when_the_peer_never_answers_its_flush() {
    let (v, _) = volume(DiskState::UpToDate);
    v.promote(false).await.expect("promote");
    v.set_replication_limits(2048, 200);
    let tx = Arc::new(Recorder::default());
    v.attach_peer(tx.clone(), Role::Secondary, DiskState::UpToDate, true);
    let started = std::time::Instant::now();
    // Before the bound the flush waited for a FlushAck forever.
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        v.demote_waiting(std::time::Duration::from_secs(1)),
    )
    .await
    .expect("demotion hangs on a silent peer");
    assert_eq!(r, Err(StateChangeError::FlushTimeout(200)));
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(v.lock().engine.role(), Role::Primary, "must stay Primary");
    let flushes = |tx: &Recorder| {
        tx.frames()
            .iter()
            .filter_map(|f| match f {
                Frame::Flush { id } => Some(*id),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(flushes(&tx).len(), 1, "the flush went to the peer");
    // A peer that answers (both flushes, the abandoned one first): the demotion
    // goes through.
    let answer = async {
        for _ in 0..5000 {
            let ids = flushes(&tx);
            if ids.len() >= 2 {
                for id in ids {
                    v.on_frame(Frame::FlushAck { id }).await;
                }
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("no second flush sent");
    };
    let (r, ()) = tokio::join!(v.demote_waiting(std::time::Duration::from_secs(5)), answer);
    assert_eq!(r, Ok(()));
    assert_eq!(v.lock().engine.role(), Role::Secondary);
}

#[tokio::test]
async fn zero_resync_chunks_go_as_resync_zeroes_only_to_a_peer_that_knows_them() {
    const CHUNK_BYTES: u64 = 256 * 1024;
    for features in [rdb_protocol::repl::FEATURE_RESYNC_ZEROES, 0] {
        let (v, _) = volume(DiskState::UpToDate);
        let tx = Arc::new(Recorder::default());
        v.set_peer_features(features);
        v.attach_peer(tx.clone(), Role::Secondary, DiskState::Inconsistent, true);
        assert!(v.start_sync_source(true).await, "SyncSource");
        // The memory disk reads as zeroes everywhere.
        assert!(v.resync_chunk(0, CHUNK_BYTES).await.expect("resync read"));
        let sent: Vec<_> = tx
            .frames()
            .into_iter()
            .filter(|f| matches!(f, Frame::ResyncZeroes { .. } | Frame::ResyncData { .. }))
            .collect();
        assert_eq!(sent.len(), 1, "features {features}: {sent:?}");
        match &sent[0] {
            Frame::ResyncZeroes {
                offset_bytes: 0,
                len,
                ..
            } if features != 0 => assert_eq!(u64::from(*len), CHUNK_BYTES),
            Frame::ResyncData {
                offset_bytes: 0,
                len,
                payload,
                ..
            } if features == 0 => {
                assert_eq!(u64::from(*len), CHUNK_BYTES);
                assert_eq!(payload.len() as u64, CHUNK_BYTES);
                assert!(payload.iter().all(|&b| b == 0));
            }
            other => panic!("features {features}: sent {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_barrier_is_flushed_unless_disk_flushes_is_off() {
    for barrier_flushes in [true, false] {
        let (v, disk) = volume(DiskState::UpToDate);
        v.set_barrier_flushes(barrier_flushes);
        let tx = Arc::new(Recorder::default());
        v.attach_peer(tx.clone(), Role::Primary, DiskState::UpToDate, false);
        v.on_frame(Frame::Data {
            offset_bytes: 4096,
            len: 4096,
            request_id: 1,
            seq: 1,
            flags: 0,
            digest: rdb_protocol::repl::Digest::EMPTY,
            payload: Bytes::from(vec![9u8; 4096]),
        })
        .await;
        let before = disk.flushes.load(Ordering::SeqCst);
        v.on_frame(Frame::Barrier { epoch: 1 }).await;
        let mut acked = None;
        for _ in 0..5000 {
            acked = tx.frames().into_iter().find_map(|f| match f {
                Frame::BarrierAck { epoch: 1, count } => Some(count),
                _ => None,
            });
            if acked.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(
            acked,
            Some(1),
            "disk-flushes {barrier_flushes}: barrier not acked"
        );
        let flushed = disk.flushes.load(Ordering::SeqCst) - before;
        assert_eq!(
            flushed,
            usize::from(barrier_flushes),
            "disk-flushes {barrier_flushes}: {flushed} flushes for one barrier"
        );
        // The write itself reached the disk either way.
        let data = BlockIo::read_at(&*disk, 4096, 4096).await.expect("read");
        assert!(data.iter().all(|&b| b == 9));
    }
}

/// Data size of the volumes with meta-data: 16 activity-log extents.
const META_DATA_BYTES: u64 = 64 << 20;

/// External meta-data in `dir` (al-extents 7) for a data file of
/// [`META_DATA_BYTES`], as created by `create-md`.
fn external_meta(dir: &std::path::Path) -> MetaData {
    let data_path = dir.join("data.img");
    let md_path = dir.join("md.img");
    std::fs::File::create(&data_path)
        .and_then(|f| f.set_len(META_DATA_BYTES))
        .expect("data file");
    std::fs::File::create(&md_path)
        .and_then(|f| f.set_len(4 << 20))
        .expect("meta-data file");
    let location = meta::MetaLocation::External {
        path: md_path,
        index: None,
    };
    let opts = meta::CreateOptions {
        force: true,
        al_extents: meta::al::AL_MIN_EXTENTS,
    };
    let md = meta::create_md(&data_path, &location, &opts).expect("create-md");
    assert_eq!(md.layout.data_size_bytes, META_DATA_BYTES);
    md
}

/// A volume over `storage` with the meta-data `md` and its activity log.
fn volume_over(
    storage: Arc<dyn BlockIo>,
    md: &MetaData,
    disk: DiskState,
    protocol: Protocol,
) -> Arc<Volume> {
    let meta = VolumeMeta {
        md: Some(Arc::new(Mutex::new(md.clone()))),
        uuids: md.superblock.uuids,
        crashed_primary: false,
        activity_log: true,
    };
    let v = Volume::new(
        "r0",
        storage,
        disk,
        protocol,
        Bitmap::new(META_DATA_BYTES),
        meta,
    )
    .expect("volume with meta-data");
    Arc::new(v)
}

/// A protocol C volume with external meta-data in `dir` over a counting disk.
fn volume_with_meta(
    dir: &std::path::Path,
    disk: DiskState,
) -> (Arc<Volume>, Arc<CountingDisk>, MetaData) {
    let md = external_meta(dir);
    let storage = Arc::new(CountingDisk::new(
        META_DATA_BYTES as usize,
        Some(md.clone()),
    ));
    let v = volume_over(storage.clone(), &md, disk, Protocol::C);
    (v, storage, md)
}

#[tokio::test]
async fn an_evicting_al_transaction_waits_for_the_data_and_the_bitmap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, disk, md) = volume_with_meta(dir.path(), DiskState::UpToDate);
    v.promote(false).await.expect("promote");
    let extent_bytes = meta::layout::AL_EXTENT_SIZE_BYTES;
    let al = v.al.as_ref().expect("activity log");
    // Seven cold extents fill the log: each transaction is durable on its own range,
    // and none flushes the data.
    for e in 0..7u64 {
        BlockIo::write_at(
            &*v,
            e * extent_bytes,
            Bytes::from(vec![e as u8; 4096]),
            false,
        )
        .await
        .expect("write");
    }
    assert!(al.transactions_written() >= 1);
    assert_eq!(al.evictions_written(), 0);
    assert_eq!(
        disk.flushes.load(Ordering::SeqCst),
        0,
        "a transaction without eviction flushed the data"
    );
    assert_eq!(
        meta::al::replay(&md).expect("replay"),
        (0..7).collect::<Vec<u32>>()
    );
    // The eighth evicts extent 0 (least recently used): its data is flushed while the
    // durable log still holds it, and the bit of its write (no peer) is on disk.
    BlockIo::write_at(&*v, 7 * extent_bytes, Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write");
    assert_eq!(al.evictions_written(), 1);
    let seen = disk
        .log_at_flush
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(!seen.is_empty(), "evicted extent 0 without a data flush");
    assert!(
        seen.iter().all(|hot| hot.contains(&0)),
        "the data was flushed after extent 0 left the durable log: {seen:?}"
    );
    let hot = meta::al::replay(&md).expect("replay");
    assert!(!hot.contains(&0) && hot.contains(&7), "{hot:?}");
    let on_disk = Bitmap::load(&md).expect("load the bitmap");
    assert!(
        on_disk.is_set(0),
        "the bit of the evicted extent's write is not on disk"
    );
}

#[tokio::test]
async fn cleared_bits_and_a_new_consistent_superblock_wait_for_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, disk, md) = volume_with_meta(dir.path(), DiskState::Inconsistent);
    let flushes = || disk.flushes.load(Ordering::SeqCst);
    // Set bits are written without a data flush (the activity log covers them).
    v.lock().bitmap.set_range(0, 8192).expect("set");
    v.write_bitmap().await.expect("write the bitmap");
    assert_eq!(flushes(), 0);
    assert!(Bitmap::load(&md).expect("load").is_set(1));
    // Still Inconsistent: the superblock is written without one either.
    v.persist_meta().await.expect("persist");
    assert_eq!(flushes(), 0);
    // The forced promotion makes the disk UpToDate: the superblock that says so
    // waits for a flush, once.
    v.promote(true).await.expect("forced promotion");
    v.persist_meta().await.expect("persist");
    assert_eq!(
        flushes(),
        1,
        "Consistent superblock written without a data flush"
    );
    let location = meta::MetaLocation::External {
        path: md.md_path.clone(),
        index: None,
    };
    let sb = meta::read_md(&md.disk_path, &location)
        .expect("read the meta-data")
        .superblock;
    assert_ne!(sb.flags & meta::flags::CONSISTENT, 0);
    v.persist_meta().await.expect("persist");
    assert_eq!(flushes(), 1, "an unchanged superblock flushed again");
    // A cleared bit (a resync wrote the block) is never copied lazily, and its
    // durable write comes after a flush.
    v.lock().bitmap.clear_range(4096, 4096).expect("clear");
    v.persist_meta_lazily().await.expect("lazy pass");
    assert_eq!(flushes(), 1);
    assert!(
        Bitmap::load(&md).expect("load").is_set(1),
        "a cleared bit was copied lazily"
    );
    v.write_bitmap().await.expect("write the bitmap");
    assert_eq!(flushes(), 2, "cleared bits written without a data flush");
    let on_disk = Bitmap::load(&md).expect("load");
    assert!(on_disk.is_set(0) && !on_disk.is_set(1));
}

#[tokio::test]
async fn a_power_cut_after_an_eviction_leaves_no_unsynced_block_unmarked() {
    // A connected Primary (protocol A: a write completes once sent, no bit is set)
    // fills the log, evicts extent 0, then loses its disk's volatile cache. Every
    // block whose write did not survive must be one that the next resync covers: a
    // hot extent of the durable log or a bit of the on-disk bitmap.
    let dir = tempfile::tempdir().expect("tempdir");
    let md = external_meta(dir.path());
    let mem = Arc::new(crate::storage::mem::MemDisk::new(META_DATA_BYTES as usize));
    let faults = Arc::new(crate::storage::fault::FaultInjector::new(mem, 7));
    let cut = faults.handle();
    let v = volume_over(faults, &md, DiskState::UpToDate, Protocol::A);
    v.promote(false).await.expect("promote");
    let tx = Arc::new(Recorder::default());
    v.attach_peer(tx.clone(), Role::Secondary, DiskState::UpToDate, true);
    let extent_bytes = meta::layout::AL_EXTENT_SIZE_BYTES;
    for e in 0..8u64 {
        BlockIo::write_at(
            &*v,
            e * extent_bytes,
            Bytes::from(vec![e as u8 + 1; 4096]),
            false,
        )
        .await
        .expect("write");
    }
    assert!(
        tx.frames()
            .iter()
            .filter(|f| matches!(f, Frame::Data { .. }))
            .count()
            >= 8,
        "the writes were not replicated"
    );
    assert_eq!(
        v.lock().bitmap.count_set(),
        0,
        "a replicated write set a bit"
    );
    cut.power_cut().await.expect("power cut");
    let hot = meta::al::replay(&md).expect("replay");
    let bits = Bitmap::load(&md).expect("load the bitmap");
    assert!(!hot.contains(&0), "extent 0 was not evicted: {hot:?}");
    for e in 0..8u64 {
        // The storage itself: the volume would refuse nothing here, but read it raw.
        let data = v
            .storage
            .read_at(e * extent_bytes, 4096)
            .await
            .expect("read");
        let survived = data.iter().all(|&b| b == e as u8 + 1);
        let covered = hot.contains(&(e as u32)) || bits.is_set(e * extent_bytes / 4096);
        assert!(
            survived || covered,
            "extent {e}: the write was lost and neither the log nor the bitmap covers it"
        );
    }
}
