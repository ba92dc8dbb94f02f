//! One resource on this node: its disk, meta-data, volume and frontends.
//!
//! `up` reads the configuration and the meta-data, opens the data area, builds the
//! [`Volume`] and starts the NBD listeners (they refuse clients until this node is
//! Primary). `primary` promotes and creates the block device (FUSE + loop on kernels
//! without nbd/ublk); `secondary` removes it and demotes; `down` stops everything.
//! Every role change is persisted in the meta-data superblock before it is reported.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, FrontendKind, MetaDisk, ResourceConfig};
use crate::control::{AdminAction, ResourceStatus, SyncStatus, Uuids, VerifyStatus};
use crate::daemon::replication::{LinkCommand, Replication, ResyncSettings};
use crate::daemon::{nbd_socket_path, DaemonOptions};
use crate::engine::core::Protocol;
use crate::engine::sync::SplitBrainPolicy;
use crate::engine::volume::{lock_md, VolumeMeta};
use crate::engine::{ConnState, DiskState, Role, Volume};
use crate::frontend::fuse::{FuseLoopDevice, FuseLoopOptions};
use crate::frontend::kernel_nbd::{self, KernelNbdDevice, KernelNbdOptions};
use crate::frontend::nbd::{ExportInfo, ExportLookup, ExportResolver, NbdLimits, NbdServer};
use crate::frontend::ublk::{self, UblkDevice, UblkOptions};
use crate::meta::{self, MetaData, MetaLocation};
use crate::peer::{PeerAuth, PeerSettings};
use crate::storage::{self, BlockIo, EngineKind};

/// Errors of resource operations, worded for the administrator.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Configuration problem.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// Meta-data problem.
    #[error("{0}")]
    Meta(#[from] meta::MetaError),
    /// Backing disk problem.
    #[error("backing disk: {0}")]
    Storage(#[from] storage::IoError),
    /// A refused state change.
    #[error("{0}")]
    State(#[from] crate::engine::StateChangeError),
    /// The block device could not be created or removed.
    #[error("device {path}: {message}")]
    Device {
        /// The device path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Something this version does not do.
    #[error("{0}")]
    Unsupported(String),
    /// Socket set-up.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Resolves NBD export names to this resource's volume while it is Primary.
struct Exports {
    name: String,
    node: String,
    volume: Arc<Volume>,
}

impl ExportResolver for Exports {
    fn list(&self) -> Vec<String> {
        vec![self.name.clone()]
    }

    fn lookup(&self, name: &str) -> ExportLookup {
        if !name.is_empty() && name != self.name {
            return ExportLookup::Unknown;
        }
        let snap = self.volume.snapshot();
        if snap.role != Role::Primary {
            return ExportLookup::Refused {
                message: format!(
                    "resource {} is {} on node {}: only the Primary serves I/O (rdbadm primary {})",
                    self.name, snap.role, self.node, self.name
                ),
            };
        }
        ExportLookup::Found(ExportInfo {
            name: self.name.clone(),
            description: format!("rdb resource {} on {}", self.name, self.node),
            device: self.volume.clone() as Arc<dyn BlockIo>,
            read_only: false,
        })
    }
}

/// A resource that is up on this node.
pub struct Resource {
    cfg: ResourceConfig,
    run_dir: PathBuf,
    md: Arc<std::sync::Mutex<MetaData>>,
    keeper: JoinHandle<()>,
    volume: Arc<Volume>,
    io_engine: EngineKind,
    nbd: Arc<NbdServer>,
    nbd_stop: watch::Sender<bool>,
    nbd_tasks: Vec<JoinHandle<()>>,
    device: Option<FuseLoopDevice>,
    kernel_dev: Option<KernelDevice>,
    frontend: &'static str,
    frontend_reason: String,
    replication: Option<Replication>,
}

/// A kernel block device served by rdbd (`frontend nbd` / `frontend ublk`).
enum KernelDevice {
    Nbd(KernelNbdDevice),
    Ublk(UblkDevice),
}

impl KernelDevice {
    fn link_path(&self) -> &std::path::Path {
        match self {
            KernelDevice::Nbd(d) => d.link_path(),
            KernelDevice::Ublk(d) => d.link_path(),
        }
    }
    fn is_in_use(&self) -> bool {
        match self {
            KernelDevice::Nbd(d) => d.is_in_use(),
            KernelDevice::Ublk(d) => d.is_in_use(),
        }
    }
    fn description(&self) -> &str {
        match self {
            KernelDevice::Nbd(d) => d.description(),
            KernelDevice::Ublk(d) => d.description(),
        }
    }
    fn detach(&mut self) -> Result<(), String> {
        match self {
            KernelDevice::Nbd(d) => d.detach().map_err(|e| e.to_string()),
            KernelDevice::Ublk(d) => d.detach().map_err(|e| e.to_string()),
        }
    }
}

/// Picks the block-device frontend for this kernel; `Err` (with what to do) when
/// the configured one cannot work here.
fn choose_frontend(kind: FrontendKind) -> Result<(&'static str, String), String> {
    match kind {
        FrontendKind::None => Ok(("none", "frontend none: NBD socket only".into())),
        FrontendKind::Fuse => Ok(("fuse+loop", "frontend fuse configured".into())),
        FrontendKind::Nbd => kernel_nbd::module_available()
            .map(|()| ("nbd", "frontend nbd configured: kernel NBD device".into()))
            .map_err(|e| e.to_string()),
        FrontendKind::Ublk => ublk::module_available()
            .map(|()| ("ublk", "frontend ublk configured: ublk device".into()))
            .map_err(|e| e.to_string()),
        FrontendKind::Auto => {
            let ublk = ublk::module_available();
            let nbd = kernel_nbd::module_available();
            Ok(match (ublk, nbd) {
                (Ok(()), _) => ("ublk", "auto: ublk available (/dev/ublk-control); using ublk".into()),
                (Err(_), Ok(())) => (
                    "nbd",
                    "auto: no ublk (ublk_drv not loaded, no /dev/ublk-control); kernel nbd loaded; using kernel NBD".into(),
                ),
                (Err(_), Err(_)) => (
                    "fuse+loop",
                    "auto: ublk module not loaded (no /dev/ublk-control), kernel nbd module not loaded (no /sys/module/nbd); using FUSE + loop".into(),
                ),
            })
        }
    }
}

fn meta_location(m: &MetaDisk) -> MetaLocation {
    match m {
        MetaDisk::Internal => MetaLocation::Internal,
        MetaDisk::External { path, index } => MetaLocation::External {
            path: path.clone(),
            index: *index,
        },
    }
}

/// The disk state recorded in meta-data flags.
fn disk_state_from_flags(flags: u32) -> DiskState {
    if flags & meta::flags::CONSISTENT == 0 {
        DiskState::Inconsistent
    } else if flags & meta::flags::OUTDATED != 0 {
        DiskState::Outdated
    } else if flags & meta::flags::WAS_UP_TO_DATE != 0 {
        DiskState::UpToDate
    } else {
        DiskState::Consistent
    }
}

fn hex_uuid(u: u64) -> String {
    format!("{u:016X}")
}

impl Resource {
    /// Brings resource `name` up on this node.
    pub async fn up(
        opts: &DaemonOptions,
        name: &str,
    ) -> Result<(Resource, Vec<String>), ResourceError> {
        let config = config::load(&opts.config_path)?;
        let warnings: Vec<String> = config.warnings().iter().map(|w| w.to_string()).collect();
        let cfg = config.resolve(name, &opts.node)?;
        if cfg.volumes.len() != 1 {
            return Err(ResourceError::Unsupported(format!(
                "resource {name} has {} volumes; this version of rdb runs exactly one volume per resource",
                cfg.volumes.len()
            )));
        }
        // An explicit `frontend nbd`/`ublk` on a kernel without it fails `up` at once.
        let (frontend, frontend_reason) =
            choose_frontend(cfg.frontend).map_err(ResourceError::Unsupported)?;
        let vol = &cfg.volumes[0];
        let md = meta::read_md(&vol.disk, &meta_location(&vol.meta_disk))?;
        let (storage, io_engine) = storage::open_with_info(
            &vol.disk,
            &storage::OpenOptions {
                engine: match cfg.disk.io_engine {
                    config::IoEngineKind::Sync => EngineKind::Sync,
                    config::IoEngineKind::Uring => EngineKind::Uring,
                },
                direct_io: cfg.disk.direct_io,
                read_only: false,
                offset_bytes: 0,
                size_bytes: Some(md.layout.data_size_bytes),
            },
        )?;
        // Tests only: RDB_FAULT_SPEC makes the data area fail (daemon/io_error.rs).
        let storage =
            super::io_error::wrap_for_tests(name, storage).map_err(ResourceError::Unsupported)?;
        let mut md = md;
        let disk = disk_state_from_flags(md.superblock.flags);
        let mut bitmap = meta::Bitmap::load(&md)?;
        // A node that went away while Primary (PRIMARY_IND still set) crashed: every
        // extent of its activity log may hold writes the peer never saw.
        let mut crashed_primary = md.superblock.has_flag(meta::flags::CRASHED_PRIMARY);
        if md.superblock.has_flag(meta::flags::PRIMARY_IND) {
            let extents = if cfg.disk.al_updates {
                meta::al::replay(&md)?
            } else {
                // Without an activity log any block may differ: all of them.
                bitmap.set_all();
                Vec::new()
            };
            let marked = bitmap.set_extents(&extents);
            tracing::warn!(
                resource = name,
                "crashed Primary: {} activity-log extents ({} blocks) marked out of sync",
                extents.len(),
                marked
            );
            crashed_primary = true;
            md.superblock.set_flag(meta::flags::CRASHED_PRIMARY, true);
            md.superblock.set_flag(meta::flags::PRIMARY_IND, false);
            bitmap.flush_dirty(&md)?;
            meta::write_superblock(&md)?;
        }
        let uuids = md.superblock.uuids;
        let protocol = match cfg.net.protocol {
            config::Protocol::A => Protocol::A,
            config::Protocol::B => Protocol::B,
            config::Protocol::C => Protocol::C,
        };
        let md = Arc::new(std::sync::Mutex::new(md));
        let volume = Arc::new(Volume::new(
            name,
            storage,
            disk,
            protocol,
            bitmap,
            VolumeMeta {
                md: Some(md.clone()),
                uuids,
                crashed_primary,
                activity_log: cfg.disk.al_updates,
            },
        )?);
        volume.set_io_error_policy(
            super::io_error::policy(cfg.disk.on_io_error),
            super::io_error::handler_hook(
                &cfg.handlers,
                name,
                cfg.peers.first().map(|p| p.name.as_str()),
            ),
        );
        // A promotion waits for the peer's answer as long as DRBD's `timeout` (at
        // least 1 s).
        volume.set_replication_limits(cfg.net.max_epoch_size, cfg.net.timeout_ms.max(1000));
        volume.set_barrier_flushes(cfg.disk.disk_flushes);
        volume.set_congestion(crate::engine::core::Congestion {
            policy: match cfg.net.on_congestion {
                config::OnCongestion::Block => crate::engine::core::CongestionPolicy::Block,
                config::OnCongestion::PullAhead => crate::engine::core::CongestionPolicy::PullAhead,
                config::OnCongestion::Disconnect => {
                    crate::engine::core::CongestionPolicy::Disconnect
                }
            },
            fill_bytes: cfg.net.congestion_fill_bytes,
            extents: cfg.net.congestion_extents.unwrap_or(cfg.disk.al_extents),
        });
        tracing::info!(
            resource = name,
            "disk( Diskless -> {disk} ), size {} bytes",
            lock_md(&md).layout.data_size_bytes
        );

        let run_dir = opts.run_dir.clone();
        let nbd = Arc::new(NbdServer::new(
            Arc::new(Exports {
                name: name.to_string(),
                node: opts.node.clone(),
                volume: volume.clone(),
            }),
            NbdLimits {
                busy_poll_us: nbd_busy_poll_us(&cfg),
                ..NbdLimits::default()
            },
        ));
        let (nbd_stop, stop_rx) = watch::channel(false);
        let mut nbd_tasks = Vec::new();
        let sock = nbd_socket_path(&run_dir, name);
        let _ = std::fs::remove_file(&sock);
        let listener =
            tokio::net::UnixListener::bind(&sock).map_err(|source| ResourceError::Io {
                what: "cannot listen on NBD socket",
                path: sock.clone(),
                source,
            })?;
        {
            let nbd = nbd.clone();
            let stop = stop_rx.clone();
            nbd_tasks.push(tokio::spawn(async move {
                if let Err(e) = nbd.serve_unix(listener, stop).await {
                    tracing::error!("NBD unix listener stopped: {e}");
                }
            }));
        }
        if let Some(addr) = cfg.nbd_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ResourceError::Io {
                    what: "cannot listen on NBD TCP address",
                    path: PathBuf::from(addr.to_string()),
                    source,
                })?;
            let nbd = nbd.clone();
            let stop = stop_rx.clone();
            nbd_tasks.push(tokio::spawn(async move {
                if let Err(e) = nbd.serve_tcp(listener, stop).await {
                    tracing::error!("NBD TCP listener stopped: {e}");
                }
            }));
        }
        let replication = match cfg.peers.as_slice() {
            [] => None,
            [peer] => {
                let settings = peer_settings(&cfg, peer);
                // A rate set in the configuration (or `c-plan-ahead 0`) is a fixed
                // rate; otherwise DRBD's dynamic controller between c-min-rate and
                // c-max-rate.
                let d = &cfg.disk;
                let fixed = d.resync_rate_bytes_per_s
                    != config::DiskConfig::default().resync_rate_bytes_per_s
                    || d.c_plan_ahead_ms == 0;
                let rate = ResyncSettings {
                    policy: SplitBrainPolicy {
                        zero: cfg.net.after_sb_0pri,
                        one: cfg.net.after_sb_1pri,
                        two: cfg.net.after_sb_2pri,
                    },
                    handlers: cfg.handlers.clone(),
                    fixed_rate_bytes_per_s: fixed.then_some(d.resync_rate_bytes_per_s),
                    c_max_rate_bytes_per_s: d.c_max_rate_bytes_per_s,
                    c_min_rate_bytes_per_s: d.c_min_rate_bytes_per_s,
                };
                let r = Replication::start(volume.clone(), settings, rate)
                    .await
                    .map_err(|source| ResourceError::Io {
                        what: "cannot listen for the peer on",
                        path: PathBuf::from(cfg.this_host.address.to_string()),
                        source,
                    })?;
                Some(r)
            }
            more => {
                return Err(ResourceError::Unsupported(format!(
                    "resource {name} has {} peers; this version of rdb replicates to one peer",
                    more.len()
                )))
            }
        };
        let digest = |what: &str, alg: &Option<String>| {
            alg.as_deref()
                .map(crate::engine::digest::BlockDigest::parse)
                .transpose()
                .map_err(|e| ResourceError::Unsupported(format!("{what}: {e}")))
        };
        volume.set_digests(
            digest("csums-alg", &cfg.net.csums_alg)?,
            digest("verify-alg", &cfg.net.verify_alg)?,
        );
        let keeper = tokio::spawn(keep_meta(volume.clone()));
        Ok((
            Resource {
                cfg,
                run_dir,
                md,
                keeper,
                volume,
                io_engine,
                nbd,
                nbd_stop,
                nbd_tasks,
                device: None,
                kernel_dev: None,
                frontend,
                frontend_reason,
                replication,
            },
            warnings,
        ))
    }

    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn md(&self) -> std::sync::MutexGuard<'_, MetaData> {
        self.md.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No longer Primary: no crash replay needed at the next `up`.
    fn mark_not_primary(&self) {
        let mut md = self.md();
        md.superblock.flags &= !meta::flags::PRIMARY_IND;
        md.superblock.flags |= meta::flags::AL_CLEAN;
    }

    /// Writes the superblock, then the dirty bitmap pages, through the volume's
    /// write-ordering rules (a data flush first when the superblock becomes
    /// Consistent or the pages hold cleared bits; `docs/metadata.md`).
    async fn persist(&mut self) -> Result<(), ResourceError> {
        self.volume.write_superblock().await?;
        self.volume.write_bitmap().await?;
        Ok(())
    }

    /// Promotes; creates the block device. Returns warnings for the user.
    pub async fn primary(&mut self, force: bool) -> Result<Vec<String>, ResourceError> {
        let mut warnings = Vec::new();
        let was = self.volume.snapshot();
        let forced = self.volume.promote(force).await?;
        if was.role != Role::Primary {
            tracing::info!(resource = self.name(), "role( {} -> Primary )", was.role);
        }
        // The volume made a new data generation if needed (forced, or no peer);
        // PRIMARY_IND on disk tells the next `up` that a crash left AL extents hot.
        {
            let mut md = self.md();
            md.superblock.flags |= meta::flags::PRIMARY_IND;
            // From now on the AL may hold extents to replay after a crash.
            md.superblock.flags &= !meta::flags::AL_CLEAN;
        }
        self.persist().await?;
        self.volume.announce_state();
        if forced {
            if let Some(r) = &self.replication {
                r.recheck();
            }
        }
        if let Err(e) = self.attach_devices() {
            // Roll back: a Primary without its device would surprise everyone.
            let _ = self.volume.demote();
            self.mark_not_primary();
            let _ = self.persist().await;
            return Err(e);
        }
        if self.frontend == "none" {
            warnings.push(format!(
                "{}: no block device ({}); the NBD socket {} serves the data",
                self.name(),
                self.frontend_reason,
                nbd_socket_path(&self.run_dir, self.name()).display()
            ));
        }
        Ok(warnings)
    }

    /// Gives a Primary its block device (FUSE + loop, or the kernel's NBD or ublk
    /// device), unless it has it already.
    fn attach_devices(&mut self) -> Result<(), ResourceError> {
        if self.device.is_none() && self.frontend == "fuse+loop" {
            // Mounting FUSE and configuring the loop device block: keep the runtime's
            // other tasks (the FUSE requests themselves) running meanwhile.
            self.device = Some(tokio::task::block_in_place(|| self.attach_device())?);
        } else if self.kernel_dev.is_none() && matches!(self.frontend, "nbd" | "ublk") {
            let dev = tokio::task::block_in_place(|| self.attach_kernel_device())?;
            tracing::info!(resource = self.name(), "{}", dev.description());
            self.kernel_dev = Some(dev);
        }
        Ok(())
    }

    fn attach_device(&self) -> Result<FuseLoopDevice, ResourceError> {
        let vol = &self.cfg.volumes[0];
        FuseLoopDevice::attach(
            self.volume.clone() as Arc<dyn BlockIo>,
            FuseLoopOptions {
                mount_dir: self.run_dir.join("fuse").join(self.name()),
                file_name: "data".to_string(),
                link_path: vol.device.clone(),
                block_size_bytes: 512,
            },
            tokio::runtime::Handle::current(),
        )
        .map_err(|e| ResourceError::Device {
            path: vol.device.clone(),
            message: e.to_string(),
        })
    }

    fn attach_kernel_device(&self) -> Result<KernelDevice, ResourceError> {
        let vol = &self.cfg.volumes[0];
        let state = |ext: &str| self.run_dir.join(format!("{}.{ext}", self.name()));
        let io = self.volume.clone() as Arc<dyn BlockIo>;
        let rt = tokio::runtime::Handle::current();
        let device_err = |message: String| ResourceError::Device {
            path: vol.device.clone(),
            message,
        };
        if self.frontend == "ublk" {
            let mut opts = UblkOptions::from_env(vol.device.clone(), state("ublk-id"));
            // The configuration wins over the defaults (the environment overrides
            // only what the configuration leaves unset).
            if let Some(q) = self.cfg.frontend_queues {
                opts.nr_queues = q as u16;
            }
            if let Some(d) = self.cfg.frontend_queue_depth {
                opts.queue_depth = d as u16;
            }
            UblkDevice::attach(io, opts, &rt)
                .map(KernelDevice::Ublk)
                .map_err(|e| device_err(e.to_string()))
        } else {
            let export = ExportInfo {
                name: self.name().to_string(),
                description: format!("rdb resource {} (kernel NBD)", self.name()),
                device: io,
                read_only: false,
            };
            let mut opts = KernelNbdOptions::from_env(vol.device.clone(), state("nbd-index"));
            if let Some(q) = self.cfg.frontend_queues {
                opts.connections = q as usize;
            }
            opts.busy_poll_us = nbd_busy_poll_us(&self.cfg);
            KernelNbdDevice::attach(export, opts, &rt)
                .map(KernelDevice::Nbd)
                .map_err(|e| device_err(e.to_string()))
        }
    }

    /// Demotes: removes the block device (refused while it is open) and waits for
    /// NBD clients to leave (refused if they do not within a second). If the
    /// volume then refuses the demotion (the flush before it failed or timed out),
    /// the resource stays Primary and gets its device back.
    pub async fn secondary(&mut self) -> Result<(), ResourceError> {
        if self.volume.snapshot().role != Role::Primary {
            return Ok(());
        }
        if let Some(dev) = &self.device {
            if dev.is_in_use() {
                return Err(crate::engine::StateChangeError::HeldOpen(format!(
                    "{} is open or mounted",
                    dev.link_path().display()
                ))
                .into());
            }
        }
        if let Some(dev) = &self.kernel_dev {
            if dev.is_in_use() {
                return Err(crate::engine::StateChangeError::HeldOpen(format!(
                    "{} is open or mounted",
                    dev.link_path().display()
                ))
                .into());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.nbd.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let clients = self.nbd.connection_count();
        if clients > 0 {
            return Err(crate::engine::StateChangeError::HeldOpen(format!(
                "{clients} NBD client(s) connected"
            ))
            .into());
        }
        if let Some(dev) = self.device.as_mut() {
            let path = dev.link_path().to_path_buf();
            if let Err(e) = tokio::task::block_in_place(|| dev.detach()) {
                return Err(ResourceError::Device {
                    path,
                    message: e.to_string(),
                });
            }
            self.device = None;
        }
        if let Some(dev) = self.kernel_dev.as_mut() {
            let path = dev.link_path().to_path_buf();
            if let Err(message) = tokio::task::block_in_place(|| dev.detach()) {
                return Err(ResourceError::Device { path, message });
            }
            self.kernel_dev = None;
        }
        if let Err(e) = self.volume.demote_waiting(Duration::from_secs(5)).await {
            // Still Primary (a demotion refused changes nothing): give the device
            // back, as `drbdadm secondary` that fails leaves /dev/drbdX in place.
            if let Err(again) = self.attach_devices() {
                tracing::error!(
                    resource = self.name(),
                    "demotion refused ({e}) and the device could not be set up again: {again}"
                );
            }
            return Err(e.into());
        }
        self.volume.announce_state();
        tracing::info!(resource = self.name(), "role( Primary -> Secondary )");
        self.mark_not_primary();
        self.persist().await?;
        Ok(())
    }

    /// Takes the resource down: demote (refused if open), stop the listeners,
    /// flush the disk, persist meta-data.
    pub async fn down(&mut self) -> Result<(), ResourceError> {
        self.secondary().await?;
        self.stop_everything().await
    }

    /// `down` at daemon exit: the device is removed even if that fails half-way.
    pub async fn down_forced(&mut self) -> Result<(), ResourceError> {
        if let Err(e) = self.secondary().await {
            tracing::warn!(resource = self.name(), "demote at exit failed: {e}");
        }
        self.stop_everything().await
    }

    /// `connect`: start (or keep) connecting to the peer.
    pub async fn connect(&mut self, discard_my_data: bool) -> Result<(), ResourceError> {
        if discard_my_data {
            if self.volume.snapshot().role == Role::Primary {
                return Err(ResourceError::Unsupported(
                    "connect --discard-my-data: this node is Primary; run `rdbadm secondary` first"
                        .into(),
                ));
            }
            tracing::warn!(
                resource = self.name(),
                "discard-my-data: this node loses the next split brain"
            );
            self.volume.set_discard_my_data(true);
        }
        match &self.replication {
            Some(r) => {
                r.connect();
                Ok(())
            }
            None => Err(ResourceError::Unsupported(format!(
                "resource {} has no peer configured",
                self.name()
            ))),
        }
    }

    /// `invalidate`, `invalidate-remote`, `new-current-uuid`, `outdate`, `verify`.
    pub async fn admin(&mut self, action: AdminAction) -> Result<String, ResourceError> {
        let refused = |m: String| ResourceError::Unsupported(m);
        match action {
            AdminAction::Invalidate => {
                self.volume.invalidate().map_err(refused)?;
                self.persist().await?;
                if let Some(r) = &self.replication {
                    r.recheck();
                }
                Ok("invalidated: full sync from the peer".into())
            }
            AdminAction::InvalidateRemote => {
                let snap = self.volume.snapshot();
                if snap.conn != ConnState::Connected || snap.disk != DiskState::UpToDate {
                    return Err(refused(format!(
                        "State change failed: (-15) invalidate-remote needs a Connected peer and UpToDate data here (connection {}, disk {})",
                        snap.conn, snap.disk
                    )));
                }
                if snap.peer_role == Role::Primary {
                    return Err(refused("State change failed: (-16) the peer is Primary: it cannot become SyncTarget".into()));
                }
                let sent = self
                    .replication
                    .as_ref()
                    .is_some_and(|r| r.command(LinkCommand::FullSyncToPeer));
                if !sent {
                    return Err(refused("the replication link is busy; try again".into()));
                }
                Ok("full sync to the peer started".into())
            }
            AdminAction::NewCurrentUuid { clear_bitmap } => {
                if clear_bitmap {
                    let snap = self.volume.snapshot();
                    let fresh = self.volume.uuids().current & !1 == meta::uuid::UUID_JUST_CREATED;
                    if !(snap.conn == ConnState::Connected
                        && snap.disk == DiskState::Inconsistent
                        && snap.peer_disk == DiskState::Inconsistent
                        && fresh)
                    {
                        return Err(refused(format!(
                            "new-current-uuid --clear-bitmap is for a fresh pair: both disks Inconsistent and just created, Connected (connection {}, disks {}/{})",
                            snap.conn, snap.disk, snap.peer_disk
                        )));
                    }
                }
                let uuid = self.volume.new_current_uuid(clear_bitmap);
                self.persist().await?;
                if clear_bitmap {
                    if let Some(r) = &self.replication {
                        r.command(LinkCommand::SkipInitialSync);
                    }
                }
                Ok(format!(
                    "new current UUID {}{}",
                    meta::uuid::format_uuid(uuid),
                    if clear_bitmap {
                        " (initial sync skipped)"
                    } else {
                        ""
                    }
                ))
            }
            AdminAction::Outdate => {
                self.volume.outdate().map_err(refused)?;
                self.persist().await?;
                self.volume.announce_state();
                Ok("disk Outdated".into())
            }
            AdminAction::Verify => {
                let volume = self.volume.clone();
                // Checks run synchronously so the caller sees a refusal; the pass
                // itself runs in the background (status shows VerifyS and progress).
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let v2 = volume.clone();
                    let run = tokio::spawn(async move { v2.run_verify().await });
                    // Early refusals come back at once; a started run keeps going.
                    tokio::pin!(run);
                    tokio::select! {
                        r = &mut run => { let _ = tx.send(r.map_err(|e| e.to_string()).and_then(|r| r.map(Some))); }
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {
                            let _ = tx.send(Ok(None));
                            match run.await {
                                Ok(Ok(found)) => tracing::info!(resource = volume.name(), "online verify found {found} bytes out of sync"),
                                Ok(Err(e)) => tracing::error!(resource = volume.name(), "online verify: {e}"),
                                Err(e) => tracing::error!(resource = volume.name(), "online verify task: {e}"),
                            }
                        }
                    }
                });
                match rx.await {
                    Ok(Ok(Some(found))) => {
                        Ok(format!("online verify done: {found} bytes out of sync"))
                    }
                    Ok(Ok(None)) => Ok("online verify started".into()),
                    Ok(Err(e)) => Err(refused(e)),
                    Err(_) => Err(refused("online verify task ended".into())),
                }
            }
        }
    }

    /// `disconnect`: drop the link and stay StandAlone.
    pub async fn disconnect(&mut self) -> Result<(), ResourceError> {
        if let Some(r) = &self.replication {
            r.disconnect();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.volume.snapshot().conn.is_connected() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    async fn stop_everything(&mut self) -> Result<(), ResourceError> {
        self.keeper.abort();
        if let Some(r) = self.replication.as_mut() {
            r.stop().await;
        }
        let _ = self.nbd_stop.send(true);
        for task in self.nbd_tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let _ = std::fs::remove_file(nbd_socket_path(&self.run_dir, self.name()));
        if let Err(e) = self.volume_storage_flush().await {
            tracing::error!(resource = self.name(), "flush at down failed: {e}");
        }
        // Every write is on disk and the node is no longer Primary: nothing in the
        // activity log needs a resync after this.
        if let Err(e) = self.volume.retire_activity_log().await {
            tracing::error!(resource = self.name(), "activity log at down: {e}");
        }
        self.persist().await?;
        tracing::info!(
            resource = self.name(),
            "disk( {} -> Diskless )",
            self.volume.snapshot().disk
        );
        Ok(())
    }

    async fn volume_storage_flush(&self) -> Result<(), storage::IoError> {
        // The volume refuses I/O when Secondary; the data area is flushed through a
        // fresh handle-independent fdatasync of the storage layer.
        self.volume.flush_storage().await
    }

    /// The status of this resource.
    pub fn status(&self) -> ResourceStatus {
        let snap = self.volume.snapshot();
        let vol = &self.cfg.volumes[0];
        let uuids = self.volume.uuids();
        ResourceStatus {
            name: self.cfg.name.clone(),
            node: self.cfg.node.clone(),
            role: snap.role.to_string(),
            disk: snap.disk.to_string(),
            connection: snap.conn.to_string(),
            peer: self.cfg.peers.first().map(|p| p.name.clone()),
            peer_role: snap.peer_role.to_string(),
            peer_disk: snap.peer_disk.to_string(),
            connection_error: self.replication.as_ref().and_then(|r| r.last_error()),
            protocol: self.cfg.net.protocol.to_string(),
            size_bytes: snap.size_bytes,
            device: vol.device.display().to_string(),
            minor: vol.minor,
            nbd_socket: nbd_socket_path(&self.run_dir, self.name())
                .display()
                .to_string(),
            nbd_tcp: self.cfg.nbd_listen.map(|a| a.to_string()),
            frontend: self.frontend.to_string(),
            frontend_reason: match &self.kernel_dev {
                Some(dev) => format!("{}; {}", self.frontend_reason, dev.description()),
                None => self.frontend_reason.clone(),
            },
            backing_device: self
                .device
                .as_ref()
                .map(|d| d.loop_path().display().to_string()),
            disk_path: vol.disk.display().to_string(),
            io_engine: self.io_engine.to_string(),
            out_of_sync_bytes: snap.out_of_sync_bytes,
            resync_bytes_total: snap.resync_bytes_total,
            uuids: Uuids {
                current: hex_uuid(uuids.current),
                bitmap: hex_uuid(uuids.bitmap),
                history: uuids.history.iter().map(|u| hex_uuid(*u)).collect(),
            },
            counters: snap.counters,
            nbd_clients: self.nbd.connection_count(),
            sync: self.volume.resync_progress().map(|p| {
                let elapsed_s =
                    (self.volume.uptime_ms().saturating_sub(p.started_ms)) as f64 / 1000.0;
                let remaining_bytes = snap.out_of_sync_bytes.min(p.total_bytes);
                let done_bytes = p.total_bytes - remaining_bytes;
                let speed = if elapsed_s > 0.0 {
                    done_bytes as f64 / elapsed_s
                } else {
                    0.0
                };
                SyncStatus {
                    source: p.source,
                    total_bytes: p.total_bytes,
                    remaining_bytes,
                    done_percent: 100.0 * done_bytes as f64 / p.total_bytes.max(1) as f64,
                    speed_bytes_per_s: speed as u64,
                    eta_s: (speed >= 1.0).then(|| (remaining_bytes as f64 / speed) as u64),
                    elapsed_s,
                }
            }),
            verify: self
                .volume
                .verify_progress()
                .map(|(done_bytes, found_bytes, _)| VerifyStatus {
                    done_bytes,
                    total_bytes: snap.size_bytes,
                    found_bytes,
                    done_percent: 100.0 * done_bytes as f64 / snap.size_bytes.max(1) as f64,
                }),
            crashed_primary: self.volume.crashed_primary(),
        }
    }
}

/// The `nbd-busy-poll` budget of the resource's NBD sockets (unix, TCP, `/dev/nbdX`).
fn nbd_busy_poll_us(cfg: &ResourceConfig) -> u64 {
    cfg.nbd_busy_poll_us
        .map_or(crate::frontend::nbd::DEFAULT_BUSY_POLL_US, u64::from)
}

/// Transport settings from the resolved configuration.
fn peer_settings(cfg: &ResourceConfig, peer: &config::HostConfig) -> PeerSettings {
    let net = &cfg.net;
    PeerSettings {
        resource: cfg.name.clone(),
        node_name: cfg.node.clone(),
        peer_name: peer.name.clone(),
        listen_addr: cfg.this_host.address,
        peer_addr: peer.address,
        auth: match (&net.cram_hmac_alg, &net.shared_secret) {
            (Some(alg), Some(secret)) => Some(PeerAuth {
                alg: alg.clone(),
                secret: secret.as_bytes().to_vec(),
            }),
            _ => None,
        },
        ping_int_ms: net.ping_int_ms,
        ping_timeout_ms: net.ping_timeout_ms,
        timeout_ms: net.timeout_ms,
        connect_int_ms: net.connect_int_ms,
        ko_count: net.ko_count,
        sndbuf_size_bytes: net.sndbuf_size_bytes,
        rcvbuf_size_bytes: net.rcvbuf_size_bytes,
        max_buffers: net.max_buffers,
        volumes: cfg.volumes.len() as u32,
        compat: crate::peer::compat::NetCompat {
            protocol: net.protocol,
            after_sb_0pri: net.after_sb_0pri,
            after_sb_1pri: net.after_sb_1pri,
            after_sb_2pri: net.after_sb_2pri,
            allow_two_primaries: net.allow_two_primaries,
            integrity_alg: net.data_integrity_alg.clone(),
        },
        busy_poll_us: cfg
            .peer_busy_poll_us
            .unwrap_or(crate::peer::park_poll::DEFAULT_PEER_BUSY_POLL_US),
    }
}

/// Longest time between two meta-data write-backs (superblock when changed, dirty
/// bitmap pages): the volume wakes the keeper at once on a state change.
const META_KEEPER_INTERVAL_MS: u64 = 1000;

/// Writes what changed in the volume's meta-data: the superblock (UUIDs, disk state
/// flags) as soon as it changes, and the dirty bitmap pages at least every second
/// (bits not yet written are covered by the activity log after a crash). The
/// periodic pass of a Primary outside a resync skips the fdatasync
/// ([`Volume::persist_meta_lazily`]).
async fn keep_meta(volume: Arc<Volume>) {
    loop {
        let asked = volume
            .meta_changed(Duration::from_millis(META_KEEPER_INTERVAL_MS))
            .await;
        let r = if asked {
            volume.persist_meta().await
        } else {
            volume.persist_meta_lazily().await
        };
        if let Err(e) = r {
            tracing::error!(resource = volume.name(), "meta-data update failed: {e}");
        }
    }
}
