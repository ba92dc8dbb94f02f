//! `rdb-ha`: command line of the Heartbeat v1 style daemon (argument parsing and
//! presentation only; every decision lives in the `rdb_ha` library).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rdb_ha::{agents, config, daemon};

#[derive(Parser)]
#[command(
    name = "rdb-ha",
    version,
    about = "Heartbeat v1 style membership and resource-group daemon"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Directory holding ha.cf, haresources, authkeys (and resource.d/).
    #[arg(long, default_value = "/etc/rdb/ha.d")]
    config_dir: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Run directory (status file, control socket).
    #[arg(long, default_value = "/run/rdb-ha")]
    run_dir: PathBuf,
    /// Accept `crc` keys in authkeys (no authentication at all).
    #[arg(long)]
    insecure_crc: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        #[command(flatten)]
        c: Common,
        /// rdbadm binary used by rdbdisk/drbddisk resources (RDB_CONFIG, RDB_RUN_DIR,
        /// RDB_NODE are passed through in the environment).
        #[arg(long, default_value = "rdbadm")]
        rdbadm: PathBuf,
        /// sendmail-compatible command used by MailTo (message on stdin).
        #[arg(long, default_value = "sendmail -t")]
        sendmail: String,
        /// Bound on each resource start or stop, in milliseconds.
        #[arg(long, default_value_t = 120_000)]
        resource_timeout_ms: u64,
    },
    /// Parse and validate the configuration, print a summary.
    CheckConfig {
        #[command(flatten)]
        c: Common,
    },
    /// Give the resource group to another node.
    Standby {
        /// Run directory of the daemon.
        #[arg(long, default_value = "/run/rdb-ha")]
        run_dir: PathBuf,
    },
    /// Pull the resource group to this node.
    Takeover {
        /// Run directory of the daemon.
        #[arg(long, default_value = "/run/rdb-ha")]
        run_dir: PathBuf,
    },
    /// Show nodes, links, owner and resources.
    Status {
        /// Run directory of the daemon.
        #[arg(long, default_value = "/run/rdb-ha")]
        run_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn load(c: &Common) -> Result<config::Config, ()> {
    let node = c.node.clone().unwrap_or_else(hostname);
    match config::load(&c.config_dir, &node, c.insecure_crc) {
        Ok((cfg, warnings)) => {
            for w in warnings {
                eprintln!("{w}");
            }
            Ok(cfg)
        }
        Err(errs) => {
            for e in errs.0 {
                eprintln!("error: {e}");
            }
            Err(())
        }
    }
}

fn summary(cfg: &config::Config) {
    let h = &cfg.hacf;
    println!("node {} (nodes: {})", cfg.node, h.nodes.join(", "));
    println!(
        "keepalive {} ms, deadtime {} ms, warntime {} ms, initdead {} ms, udpport {}, auto_failback {:?}",
        h.keepalive_ms, h.deadtime_ms, h.warntime_ms, h.initdead_ms, h.udpport, h.auto_failback
    );
    for m in &h.media {
        println!("link: {m:?}");
    }
    if !h.ping.is_empty() {
        println!("ping: {:?}", h.ping);
    }
    if let Some(f) = &h.fence {
        println!("fence: {}", f.join(" "));
    }
    for c in &h.checks {
        println!(
            "check {}: {:?} interval {} ms fall {} rise {}",
            c.name, c.kind, c.interval_ms, c.fall, c.rise
        );
    }
    println!(
        "resource group (preferred node {}):",
        cfg.resources.preferred
    );
    for r in &cfg.resources.resources {
        let how = match r {
            config::Resource::Script { name, .. } => match agents::resolve_script(&cfg.dir, name) {
                agents::ScriptPath::File(p) => format!(" -> {}", p.display()),
                agents::ScriptPath::Systemd(u) => format!(" -> systemctl {u}"),
            },
            _ => String::new(),
        };
        println!("  {r}{how}");
    }
    if let Some(k) = cfg.authkeys.active_key() {
        println!("auth {} ({})", k.index, k.alg.as_str());
    }
}

fn print_status(v: &serde_json::Value) {
    let s = &v["status"];
    let owner = s["owner"]
        .as_str()
        .filter(|o| !o.is_empty())
        .unwrap_or("(nobody)");
    println!(
        "node {}: {} (owner of the group: {owner})",
        s["node"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?")
    );
    for flag in ["standby", "failed", "ping_lost", "unclean"] {
        if s[flag].as_bool() == Some(true) {
            println!("  {flag}");
        }
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        println!(
            "peer {}: {} {} (last heartbeat {} ms ago)",
            p["name"].as_str().unwrap_or("?"),
            p["liveness"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["last_heartbeat_age_ms"]
        );
        for l in p["links"].as_array().into_iter().flatten() {
            println!(
                "  link {}: {} ({} ms)",
                l["name"].as_str().unwrap_or("?"),
                if l["up"].as_bool() == Some(true) {
                    "up"
                } else {
                    "dead"
                },
                l["last_heartbeat_age_ms"]
            );
        }
    }
    if let Some(c) = s["refused_packets"].as_object() {
        let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("refused packets: {}", parts.join(", "));
    }
    for r in s["resources"].as_array().into_iter().flatten() {
        println!(
            "resource {}: {}",
            r["name"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?")
        );
    }
}

async fn ctl(run_dir: &std::path::Path, cmd: &str) -> anyhow::Result<serde_json::Value> {
    let v = daemon::control(run_dir, cmd).await?;
    if v["ok"].as_bool() != Some(true) {
        anyhow::bail!("{}", v["error"]);
    }
    Ok(v)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let r: anyhow::Result<()> = async {
        match cli.cmd {
            Cmd::CheckConfig { c } => match load(&c) {
                Ok(cfg) => {
                    summary(&cfg);
                    println!("configuration OK");
                }
                Err(_) => anyhow::bail!("check-config: configuration rejected"),
            },
            Cmd::Run {
                c,
                rdbadm,
                sendmail,
                resource_timeout_ms,
            } => {
                let cfg = load(&c).map_err(|_| anyhow::anyhow!("configuration rejected"))?;
                let opts = daemon::Options {
                    run_dir: c.run_dir.clone(),
                    rdbadm,
                    sendmail: sendmail.split_whitespace().map(str::to_owned).collect(),
                    resource_timeout_ms,
                };
                daemon::run(cfg, opts).await.context("rdb-ha")?;
            }
            Cmd::Standby { run_dir } => {
                let v = ctl(&run_dir, "standby").await?;
                println!("{}", v["message"].as_str().unwrap_or("ok"));
            }
            Cmd::Takeover { run_dir } => {
                let v = ctl(&run_dir, "takeover").await?;
                println!("{}", v["message"].as_str().unwrap_or("ok"));
            }
            Cmd::Status { run_dir, json } => {
                let v = ctl(&run_dir, "status").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v["status"])?);
                } else {
                    print_status(&v);
                }
            }
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdb-ha: {e:#}");
            ExitCode::from(1)
        }
    }
}
