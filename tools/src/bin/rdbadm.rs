//! rdbadm: administer rdb resources, in drbdadm's words.
//!
//! Argument parsing and presentation only: meta-data commands call the library
//! directly (the disk is not in use), state commands go to the node's `rdbd` over its
//! control socket (starting it on `up`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use rdb::config::{self, Config, MetaDisk};
use rdb::control::{self, AdminAction, Command, ControlError, ResourceStatus, Response};
use rdb::meta::{self, MetaLocation};

#[derive(Parser, Debug)]
#[command(
    name = "rdbadm",
    version,
    about = "Administer rdb resources (a replicated block device in user space)",
    after_help = "Resource arguments take a resource name or `all`."
)]
struct Cli {
    /// Configuration file (DRBD syntax).
    #[arg(short = 'c', long = "config", env = "RDB_CONFIG", default_value = config::DEFAULT_CONFIG_PATH, global = true)]
    config: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, env = "RDB_NODE", global = true)]
    node: Option<String>,
    /// Run directory of this node's rdbd.
    #[arg(long = "run-dir", env = "RDB_RUN_DIR", default_value = rdb::daemon::DEFAULT_RUN_DIR, global = true)]
    run_dir: PathBuf,
    /// Force the operation (create-md over existing data, primary on Inconsistent data).
    #[arg(long, global = true)]
    force: bool,
    /// DRBD 8.3 spelling of `primary --force`.
    #[arg(long = "overwrite-data-of-peer", global = true, hide = true)]
    overwrite_data_of_peer: bool,
    /// Accepted for drbdadm compatibility; no effect.
    #[arg(long = "ignore-sanity-checks", global = true, hide = true)]
    ignore_sanity_checks: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the parsed configuration.
    Dump {
        /// Resource name or `all`.
        resource: Option<String>,
    },
    /// Initialise meta-data on the backing disk.
    CreateMd {
        /// Resource name or `all`.
        resource: String,
    },
    /// Print the meta-data.
    DumpMd {
        /// Resource name.
        resource: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Destroy the meta-data.
    WipeMd {
        /// Resource name or `all`.
        resource: String,
    },
    /// Attach the disk and start serving (starts rdbd if needed).
    Up {
        /// Resource name or `all`.
        resource: String,
    },
    /// Stop the resource.
    Down {
        /// Resource name or `all`.
        resource: String,
    },
    /// Promote to Primary.
    Primary {
        /// Resource name or `all`.
        resource: String,
    },
    /// Demote to Secondary.
    Secondary {
        /// Resource name or `all`.
        resource: String,
    },
    /// Connect to the peer (after `disconnect`).
    Connect {
        /// Resource name or `all`.
        resource: String,
        /// In a split brain, discard this node's data and resync from the peer.
        #[arg(long = "discard-my-data")]
        discard_my_data: bool,
    },
    /// Disconnect from the peer (StandAlone).
    Disconnect {
        /// Resource name or `all`.
        resource: String,
    },
    /// Wait until the resource is connected to its peer.
    WaitConnect {
        /// Resource name or `all`.
        resource: String,
        /// Give up after this many seconds (0 = wait forever; default: the
        /// resource's wfc-timeout, or degr-wfc-timeout after a degraded shutdown).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Show the state of resources.
    Status {
        /// Resource name or `all` (default).
        resource: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// /proc/drbd-style output.
        #[arg(long)]
        proc: bool,
        /// Prometheus text format (for node_exporter's textfile collector).
        #[arg(long, conflicts_with_all = ["json", "proc", "watch"])]
        prometheus: bool,
        /// More detail.
        #[arg(short, long)]
        verbose: bool,
        /// Refresh until interrupted, with a progress bar while a resync or verify runs.
        #[arg(long)]
        watch: bool,
    },
    /// Discard this node's data and resync everything from the peer.
    Invalidate {
        /// Resource name or `all`.
        resource: String,
    },
    /// Discard the peer's data and resync everything to it.
    InvalidateRemote {
        /// Resource name or `all`.
        resource: String,
    },
    /// Start a new data generation (new current UUID).
    NewCurrentUuid {
        /// Resource name or `all`.
        resource: String,
        /// On a fresh connected pair (both disks just created): skip the initial sync.
        #[arg(long = "clear-bitmap")]
        clear_bitmap: bool,
    },
    /// Mark this node's (Secondary) data Outdated.
    Outdate {
        /// Resource name or `all`.
        resource: String,
    },
    /// Online verify: compare both disks while in use (needs `verify-alg`).
    Verify {
        /// Resource name or `all`.
        resource: String,
    },
    /// Print the role (e.g. Primary/Secondary); `state` is DRBD 8.3's name for it.
    #[command(alias = "state")]
    Role {
        /// Resource name.
        resource: String,
    },
    /// Print the connection state.
    Cstate {
        /// Resource name.
        resource: String,
    },
    /// Print the disk states (e.g. UpToDate/DUnknown).
    Dstate {
        /// Resource name.
        resource: String,
    },
}

struct Ctx {
    config_path: PathBuf,
    node: String,
    run_dir: PathBuf,
}

impl Ctx {
    fn config(&self) -> anyhow::Result<Config> {
        let cfg = config::load(&self.config_path).map_err(|e| anyhow!("{e}"))?;
        for w in cfg.warnings() {
            eprintln!("{w}");
        }
        Ok(cfg)
    }

    /// Expands `all` to the resources that have an `on` section for this node.
    fn names(&self, cfg: &Config, resource: &str) -> anyhow::Result<Vec<String>> {
        if resource == "all" {
            Ok(cfg
                .resource_names()
                .into_iter()
                .filter(|r| cfg.resolve(r, &self.node).is_ok())
                .collect())
        } else {
            cfg.resolve(resource, &self.node)
                .map_err(|e| anyhow!("{e}"))?;
            Ok(vec![resource.to_string()])
        }
    }

    fn call(&self, command: Command, timeout: Duration) -> Result<Response, ControlError> {
        control::call(&self.run_dir, command, timeout)
    }

    fn daemon_running(&self) -> bool {
        self.call(Command::Ping, Duration::from_secs(5)).is_ok()
    }

    /// Starts rdbd for this run dir unless it already answers.
    fn ensure_daemon(&self) -> anyhow::Result<()> {
        if self.daemon_running() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("cannot create run dir {}", self.run_dir.display()))?;
        let rdbd = std::env::var_os("RDBD_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let p = std::env::current_exe().ok()?.parent()?.join("rdbd");
                p.exists().then_some(p)
            })
            .unwrap_or_else(|| PathBuf::from("rdbd"));
        let log_path = rdb::daemon::log_path(&self.run_dir);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&rdbd)
            .arg("-c")
            .arg(&self.config_path)
            .arg("--node")
            .arg(&self.node)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", rdbd.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.daemon_running() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("rdbd did not start within 10 s; see {}", log_path.display())
    }
}

fn main() -> ExitCode {
    // drbdadm passes options after a lone `--` to drbdsetup (`drbdadm -- --force
    // primary r0`); rdbadm takes them anywhere, so the `--` is dropped.
    let args: Vec<String> = std::env::args().filter(|a| a != "--").collect();
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rdbadm: {e:#}");
            ExitCode::from(1)
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx {
        config_path: cli.config.clone(),
        node: cli
            .node
            .clone()
            .unwrap_or_else(rdb::daemon::default_node_name),
        run_dir: cli.run_dir.clone(),
    };
    let force = cli.force || cli.overwrite_data_of_peer;
    let long = Duration::from_secs(120);
    match cli.command {
        Cmd::Dump { resource } => {
            let cfg = ctx.config()?;
            let which = resource.filter(|r| r != "all");
            print!(
                "{}",
                cfg.dump(which.as_deref()).map_err(|e| anyhow!("{e}"))?
            );
        }
        Cmd::CreateMd { resource } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                refuse_if_up(&ctx, &name, "create-md")?;
                let rc = cfg.resolve(&name, &ctx.node).map_err(|e| anyhow!("{e}"))?;
                for vol in &rc.volumes {
                    let md = meta::create_md(
                        &vol.disk,
                        &meta_location(&vol.meta_disk),
                        &meta::CreateOptions {
                            force,
                            al_extents: rc.disk.al_extents,
                        },
                    )
                    .map_err(|e| anyhow!("{name}: {e}"))?;
                    println!("initializing activity log");
                    println!(
                        "initializing bitmap ({} KB) to all zero",
                        md.layout.bitmap_size_bytes.div_ceil(1024)
                    );
                    println!("Writing meta data...");
                    println!(
                        "New rdb meta data block successfully created ({name}: {} usable bytes on {}).",
                        md.layout.data_size_bytes,
                        vol.disk.display()
                    );
                }
            }
        }
        Cmd::DumpMd { resource, json } => {
            let cfg = ctx.config()?;
            let rc = cfg
                .resolve(&resource, &ctx.node)
                .map_err(|e| anyhow!("{e}"))?;
            let mut all = Vec::new();
            for vol in &rc.volumes {
                let md = meta::read_md(&vol.disk, &meta_location(&vol.meta_disk))
                    .map_err(|e| anyhow!("{resource}: {e}"))?;
                if json {
                    all.push(md.to_json());
                } else {
                    print!("{}", md.dump_text());
                }
            }
            if json {
                let v = if all.len() == 1 {
                    all.remove(0)
                } else {
                    serde_json::Value::Array(all)
                };
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        Cmd::WipeMd { resource } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                refuse_if_up(&ctx, &name, "wipe-md")?;
                if !force {
                    if !std::io::stdin().is_terminal() {
                        bail!("{name}: wipe-md destroys the meta-data; add --force to confirm");
                    }
                    eprint!("Do you really want to wipe out the rdb meta data of {name}? [need to type 'yes' to confirm] ");
                    let mut answer = String::new();
                    std::io::stdin().read_line(&mut answer)?;
                    if answer.trim() != "yes" {
                        bail!("{name}: not confirmed");
                    }
                }
                let rc = cfg.resolve(&name, &ctx.node).map_err(|e| anyhow!("{e}"))?;
                for vol in &rc.volumes {
                    meta::wipe_md(&vol.disk, &meta_location(&vol.meta_disk))
                        .map_err(|e| anyhow!("{name}: {e}"))?;
                    println!(
                        "Wiping meta data of {name} on {}... done",
                        vol.disk.display()
                    );
                }
            }
        }
        Cmd::Up { resource } => {
            let cfg = ctx.config()?;
            let names = ctx.names(&cfg, &resource)?;
            ctx.ensure_daemon()?;
            for name in names {
                // Was the node connected when it went down? (degr-wfc-timeout if not)
                let rc = cfg.resolve(&name, &ctx.node).map_err(|e| anyhow!("{e}"))?;
                let degraded = was_degraded(&rc);
                state_call(
                    &ctx,
                    Command::Up {
                        resource: name.clone(),
                    },
                    long,
                )?;
                // `startup { wfc-timeout N; }` (N > 0) makes `up` wait for the peer like
                // DRBD's init script: N s, or degr-wfc-timeout if this node went down
                // degraded. The default (0) does not wait here (`wait-connect` does).
                let wait_s = match rc.startup.wfc_timeout_s {
                    0 => 0,
                    _ if degraded => rc.startup.degr_wfc_timeout_s,
                    wfc => wfc,
                };
                let was_connected = Some(!degraded);
                if wait_s > 0 && !rc.peers.is_empty() {
                    let deadline = Instant::now() + Duration::from_secs(wait_s);
                    loop {
                        let st = one_status(&ctx, &name)?;
                        if !matches!(
                            st.connection.as_str(),
                            "StandAlone" | "Connecting" | "Disconnecting"
                        ) {
                            break;
                        }
                        if Instant::now() >= deadline {
                            eprintln!(
                                "{name}: not connected after {wait_s} s ({}), continuing ({})",
                                st.connection,
                                if was_connected == Some(false) {
                                    "degr-wfc-timeout"
                                } else {
                                    "wfc-timeout"
                                }
                            );
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
        Cmd::Down { resource } => {
            let cfg = ctx.config()?;
            let names = ctx.names(&cfg, &resource)?;
            if !ctx.daemon_running() {
                return Ok(ExitCode::SUCCESS);
            }
            for name in names {
                match ctx.call(Command::Down { resource: name }, long) {
                    Err(ControlError::NotRunning(_)) => break,
                    r => report(r.map_err(|e| anyhow!("{e}"))?)?,
                }
            }
        }
        Cmd::Primary { resource } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                state_call(
                    &ctx,
                    Command::Primary {
                        resource: name,
                        force,
                    },
                    long,
                )?;
            }
        }
        Cmd::Secondary { resource } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                state_call(&ctx, Command::Secondary { resource: name }, long)?;
            }
        }
        Cmd::Connect {
            resource,
            discard_my_data,
        } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                state_call(
                    &ctx,
                    Command::Connect {
                        resource: name,
                        discard_my_data,
                    },
                    long,
                )?;
            }
        }
        Cmd::Disconnect { resource } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                state_call(&ctx, Command::Disconnect { resource: name }, long)?;
            }
        }
        Cmd::WaitConnect { resource, timeout } => {
            let cfg = ctx.config()?;
            for name in ctx.names(&cfg, &resource)? {
                // Without --timeout: the resource's wfc-timeout (degr-wfc-timeout if
                // it went down degraded); 0 waits forever, as DRBD's init script.
                let timeout = match timeout {
                    Some(t) => t,
                    None => {
                        let rc = cfg.resolve(&name, &ctx.node).map_err(|e| anyhow!("{e}"))?;
                        if was_degraded(&rc) {
                            rc.startup.degr_wfc_timeout_s
                        } else {
                            rc.startup.wfc_timeout_s
                        }
                    }
                };
                let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout));
                loop {
                    let s = one_status(&ctx, &name)?;
                    if !matches!(
                        s.connection.as_str(),
                        "StandAlone" | "Connecting" | "Disconnecting"
                    ) {
                        break;
                    }
                    if s.role == "Unconfigured" {
                        bail!("{name}: resource is not up");
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        eprintln!("{name}: not connected after {timeout} s ({})", s.connection);
                        return Ok(ExitCode::from(5));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Cmd::Status {
            resource,
            json,
            proc,
            prometheus,
            verbose,
            watch,
        } => {
            if watch {
                return watch_status(&ctx, resource.as_deref());
            }
            let list = statuses(&ctx, resource.as_deref())?;
            if json {
                let v = serde_json::json!({ "version": 1, "node": ctx.node, "resources": list });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if proc {
                print!("{}", render_proc(&list));
            } else if prometheus {
                print!("{}", control::render_prometheus(&list));
            } else {
                print!("{}", render_status(&list, verbose));
            }
        }
        Cmd::Invalidate { resource } => admin(&ctx, &resource, AdminAction::Invalidate, long)?,
        Cmd::InvalidateRemote { resource } => {
            admin(&ctx, &resource, AdminAction::InvalidateRemote, long)?
        }
        Cmd::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => admin(
            &ctx,
            &resource,
            AdminAction::NewCurrentUuid { clear_bitmap },
            long,
        )?,
        Cmd::Outdate { resource } => admin(&ctx, &resource, AdminAction::Outdate, long)?,
        Cmd::Verify { resource } => admin(&ctx, &resource, AdminAction::Verify, long)?,
        Cmd::Role { resource } => {
            let s = one_status(&ctx, &resource)?;
            println!("{}/{}", s.role, s.peer_role);
        }
        Cmd::Cstate { resource } => {
            let s = one_status(&ctx, &resource)?;
            println!("{}", s.connection);
        }
        Cmd::Dstate { resource } => {
            let s = one_status(&ctx, &resource)?;
            println!("{}/{}", s.disk, s.peer_disk);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an administrative action on each named resource, printing the answer.
fn admin(ctx: &Ctx, resource: &str, action: AdminAction, timeout: Duration) -> anyhow::Result<()> {
    let cfg = ctx.config()?;
    for name in ctx.names(&cfg, resource)? {
        let r = ctx
            .call(
                Command::Admin {
                    resource: name,
                    action,
                },
                timeout,
            )
            .map_err(|e| match e {
                ControlError::NotRunning(_) => anyhow!("{e}; run `rdbadm up` first"),
                e => anyhow!("{e}"),
            })?;
        let message = r.message.clone();
        report(r)?;
        if !message.is_empty() {
            println!("{message}");
        }
    }
    Ok(())
}

/// `status --watch`: the status, refreshed every second; while a resync or an
/// online verify runs, a progress bar per resource. Stops on Ctrl-C.
fn watch_status(ctx: &Ctx, resource: Option<&str>) -> anyhow::Result<ExitCode> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>10} [{bar:40.cyan/blue}] {percent:>3}% {msg}")
            .map_err(|e| anyhow!("{e}"))?
            .progress_chars("=> ");
    let header = multi.add(ProgressBar::new_spinner());
    let mut bars: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    loop {
        let list = statuses(ctx, resource)?;
        header.set_message(render_status(&list, false).trim_end().to_string());
        header.tick();
        for r in &list {
            let progress = r
                .sync
                .as_ref()
                .map(|p| {
                    (
                        p.done_percent,
                        format!(
                            "{} {}/{} KiB, {} KiB/s, finish {}",
                            if p.source { "SyncSource" } else { "SyncTarget" },
                            (p.total_bytes - p.remaining_bytes) / 1024,
                            p.total_bytes / 1024,
                            p.speed_bytes_per_s / 1024,
                            p.eta_s.map_or("?".to_string(), format_hms)
                        ),
                    )
                })
                .or_else(|| {
                    r.verify.as_ref().map(|v| {
                        (
                            v.done_percent,
                            format!("VerifyS, {} KiB out of sync so far", v.found_bytes / 1024),
                        )
                    })
                });
            match progress {
                Some((pct, msg)) => {
                    let bar = bars.entry(r.name.clone()).or_insert_with(|| {
                        let b = multi.add(ProgressBar::new(1000));
                        b.set_style(style.clone());
                        b.set_prefix(r.name.clone());
                        b
                    });
                    bar.set_position((pct * 10.0) as u64);
                    bar.set_message(msg);
                }
                None => {
                    if let Some(bar) = bars.remove(&r.name) {
                        bar.finish_with_message("done");
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Seconds as `h:mm:ss`, as /proc/drbd prints `finish:`.
fn format_hms(s: u64) -> String {
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Whether the node went down degraded: its data UpToDate but not connected to the
/// peer (DRBD's condition for degr-wfc-timeout). Fresh meta-data is not degraded.
fn was_degraded(rc: &config::ResourceConfig) -> bool {
    rc.volumes.first().is_some_and(|v| {
        meta::read_md(&v.disk, &meta_location(&v.meta_disk)).is_ok_and(|md| {
            md.superblock.has_flag(meta::flags::WAS_UP_TO_DATE)
                && !md.superblock.has_flag(meta::flags::CONNECTED_IND)
        })
    })
}

fn refuse_if_up(ctx: &Ctx, name: &str, what: &str) -> anyhow::Result<()> {
    if let Ok(r) = ctx.call(
        Command::Status {
            resource: Some(name.to_string()),
        },
        Duration::from_secs(10),
    ) {
        if !r.resources.is_empty() {
            bail!("{name}: resource is up; {what} needs it down (rdbadm down {name})");
        }
    }
    Ok(())
}

fn report(r: Response) -> anyhow::Result<()> {
    for w in &r.warnings {
        eprintln!("{w}");
    }
    if !r.ok {
        bail!("{}", r.message);
    }
    Ok(())
}

fn state_call(ctx: &Ctx, command: Command, timeout: Duration) -> anyhow::Result<()> {
    let r = ctx.call(command, timeout).map_err(|e| match e {
        ControlError::NotRunning(_) => anyhow!("{e}; run `rdbadm up` first"),
        e => anyhow!("{e}"),
    })?;
    report(r)
}

/// Status of the configured resources: live from rdbd, `Unconfigured` for those down.
fn statuses(ctx: &Ctx, resource: Option<&str>) -> anyhow::Result<Vec<ResourceStatus>> {
    let cfg = ctx.config()?;
    let names = ctx.names(&cfg, resource.unwrap_or("all"))?;
    let live = match ctx.call(Command::Status { resource: None }, Duration::from_secs(10)) {
        Ok(r) => r.resources,
        Err(ControlError::NotRunning(_)) => Vec::new(),
        Err(e) => return Err(anyhow!("{e}")),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(s) = live.iter().find(|s| s.name == name) {
            out.push(s.clone());
            continue;
        }
        let rc = cfg.resolve(&name, &ctx.node).map_err(|e| anyhow!("{e}"))?;
        let vol = &rc.volumes[0];
        out.push(ResourceStatus {
            name: name.clone(),
            node: ctx.node.clone(),
            role: "Unconfigured".into(),
            disk: "Unconfigured".into(),
            connection: "StandAlone".into(),
            peer: rc.peers.first().map(|p| p.name.clone()),
            peer_role: "Unknown".into(),
            peer_disk: "DUnknown".into(),
            connection_error: None,
            protocol: rc.net.protocol.to_string(),
            size_bytes: 0,
            device: vol.device.display().to_string(),
            minor: vol.minor,
            nbd_socket: rdb::daemon::nbd_socket_path(&ctx.run_dir, &name)
                .display()
                .to_string(),
            nbd_tcp: rc.nbd_listen.map(|a| a.to_string()),
            frontend: "none".into(),
            frontend_reason: "resource is down".into(),
            backing_device: None,
            disk_path: vol.disk.display().to_string(),
            io_engine: String::new(),
            out_of_sync_bytes: 0,
            resync_bytes_total: 0,
            uuids: Default::default(),
            counters: Default::default(),
            nbd_clients: 0,
            sync: None,
            verify: None,
            crashed_primary: false,
        });
    }
    Ok(out)
}

fn one_status(ctx: &Ctx, resource: &str) -> anyhow::Result<ResourceStatus> {
    statuses(ctx, Some(resource))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{resource}: no such resource"))
}

/// `drbdadm status` layout.
fn render_status(list: &[ResourceStatus], verbose: bool) -> String {
    let mut s = String::new();
    for r in list {
        if r.role == "Unconfigured" {
            s.push_str(&format!("{}: No such resource (down)\n", r.name));
            continue;
        }
        s.push_str(&format!("{} role:{}\n", r.name, r.role));
        s.push_str(&format!("  disk:{}", r.disk));
        if verbose {
            s.push_str(&format!(
                " size:{} device:{} frontend:{}{} nbd:{}",
                r.size_bytes,
                r.device,
                r.frontend,
                r.backing_device
                    .as_deref()
                    .map(|d| format!("({d})"))
                    .unwrap_or_default(),
                r.nbd_socket
            ));
        }
        s.push('\n');
        if let Some(peer) = &r.peer {
            s.push_str(&format!("  {peer} connection:{}", r.connection));
            if r.connection != "StandAlone" && r.connection != "Connecting" {
                s.push_str(&format!(" role:{}", r.peer_role));
            } else if let Some(e) = &r.connection_error {
                s.push_str(&format!(" ({e})"));
            }
            s.push('\n');
            if r.peer_disk != "DUnknown" {
                s.push_str(&format!("    peer-disk:{}", r.peer_disk));
                if let Some(p) = &r.sync {
                    s.push_str(&format!(
                        " replication:{} done:{:.2} remaining:{}K speed:{}K/s finish:{}",
                        if p.source { "SyncSource" } else { "SyncTarget" },
                        p.done_percent,
                        p.remaining_bytes / 1024,
                        p.speed_bytes_per_s / 1024,
                        p.eta_s.map_or("?".to_string(), format_hms)
                    ));
                }
                if let Some(v) = &r.verify {
                    s.push_str(&format!(
                        " verify:{:.2}% out-of-sync:{}K",
                        v.done_percent,
                        v.found_bytes / 1024
                    ));
                }
                s.push('\n');
            }
        }
        s.push('\n');
    }
    s
}

/// `/proc/drbd` layout (counters in KiB, as DRBD prints them).
fn render_proc(list: &[ResourceStatus]) -> String {
    let mut s = format!(
        "version: rdb {} (api:{}/proto:1)\n",
        env!("CARGO_PKG_VERSION"),
        control::PROTOCOL_VERSION
    );
    for (i, r) in list.iter().enumerate() {
        let minor = r.minor.unwrap_or(i as u32);
        if r.role == "Unconfigured" {
            s.push_str(&format!("{minor:2}: cs:Unconfigured\n"));
            continue;
        }
        let c = &r.counters;
        let k = |b: u64| b / 1024;
        s.push_str(&format!(
            "{minor:2}: cs:{} ro:{}/{} ds:{}/{} {} r-----\n",
            r.connection, r.role, r.peer_role, r.disk, r.peer_disk, r.protocol
        ));
        s.push_str(&format!(
            "    ns:{} nr:{} dw:{} dr:{} al:{} bm:{} lo:{} pe:{} ua:{} ap:{} ep:1 wo:f oos:{}\n",
            k(c.net_sent_bytes),
            k(c.net_received_bytes),
            k(c.disk_written_bytes),
            k(c.disk_read_bytes),
            c.al_writes,
            c.bm_writes,
            c.local_pending,
            c.peer_pending,
            c.unacked,
            c.app_pending,
            k(r.out_of_sync_bytes)
        ));
        if let Some(p) = &r.sync {
            let pct = p.done_percent;
            let filled = ((pct / 5.0) as usize).min(19);
            s.push_str(&format!(
                "\t[{}>{}] sync'ed: {pct:.1}% ({}/{})K\n",
                "=".repeat(filled),
                ".".repeat(19 - filled),
                k(p.remaining_bytes),
                k(p.total_bytes)
            ));
            s.push_str(&format!(
                "\tfinish: {} speed: {} ({}) K/sec\n",
                p.eta_s.map_or("?".to_string(), format_hms),
                group_thousands(k(p.speed_bytes_per_s)),
                group_thousands(k(p.speed_bytes_per_s))
            ));
        }
        if let Some(v) = &r.verify {
            s.push_str(&format!(
                "\t[{}>{}] verified: {:.1}% ({}/{})K oos found: {}K\n",
                "=".repeat(((v.done_percent / 5.0) as usize).min(19)),
                ".".repeat(19 - ((v.done_percent / 5.0) as usize).min(19)),
                v.done_percent,
                k(v.done_bytes),
                k(v.total_bytes),
                k(v.found_bytes)
            ));
        }
    }
    s
}

/// `12,345` as /proc/drbd prints speeds.
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
