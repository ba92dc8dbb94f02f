//! rdbd: the rdb daemon of one node.
//!
//! Normally started by `rdbadm up` (detached, logging to `<run-dir>/rdbd.log`); it
//! can also run in the foreground under a service manager. It exits when its last
//! resource goes down.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "rdbd",
    version,
    about = "rdb daemon: runs the rdb resources of one node"
)]
struct Args {
    /// Configuration file (DRBD syntax).
    #[arg(short = 'c', long = "config", env = "RDB_CONFIG", default_value = rdb::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, env = "RDB_NODE")]
    node: Option<String>,
    /// Run directory (control socket, NBD sockets, FUSE mounts, log).
    #[arg(long = "run-dir", env = "RDB_RUN_DIR", default_value = rdb::daemon::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Worker threads of the async runtime (default: half the CPUs, at least one;
    /// slow disk I/O runs on separate blocking threads either way).
    #[arg(long = "worker-threads", env = "RDB_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

/// Default runtime workers: half the CPUs, at least one. rdbd shares the machine
/// with the application it serves; on 2 CPUs one worker measured better than two
/// (no hand-over between workers at each replicated write, no work stealing among
/// the read tasks; `docs/performance.md`).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RDB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let opts = rdb::daemon::DaemonOptions {
        config_path: args.config,
        node: args.node.unwrap_or_else(rdb::daemon::default_node_name),
        run_dir: args.run_dir,
    };
    let workers = args
        .worker_threads
        .map_or_else(default_worker_threads, usize::from);
    tracing::info!(workers, "starting the runtime");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        // Busy-polls the peer sockets before a worker sleeps (`peer-busy-poll`).
        .on_thread_park(rdb::peer::park_poll::before_park)
        .thread_name("rdbd")
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(rdb::daemon::run(opts))?;
    // Blocking tasks of dropped connections must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}
