//! Resource agents: start, stop and status of each `haresources` resource kind
//! (IPaddr, rdbdisk/drbddisk, Filesystem, MailTo, service scripts). Every operation is
//! idempotent (starting a running resource or stopping a stopped one succeeds) and
//! bounded by a timeout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::config::Resource;
use crate::machine::Op;
use crate::net;

/// Attempts of `umount` (with `fuser -km` in between) before a stop fails.
pub const UMOUNT_ATTEMPTS: u32 = 3;
/// Mount attempts of a Filesystem start, and the pause between two.
pub const MOUNT_ATTEMPTS: u32 = 3;
const MOUNT_RETRY_MS: u64 = 300;
/// Gratuitous ARP frames sent after adding an address.
pub const GARP_COUNT: u32 = 3;
/// Pause between two refused promotions of an rdbdisk resource.
pub const PROMOTE_RETRY_MS: u64 = 200;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A command could not be run.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// Command.
        cmd: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A command exited with an error.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// Command line.
        cmd: String,
        /// Exit status.
        status: String,
        /// Its stderr (trimmed, bounded).
        stderr: String,
    },
    /// A command did not finish in time.
    #[error("{0} timed out")]
    Timeout(String),
    /// The resource cannot be resolved (interface, address).
    #[error("{0}")]
    Resolve(String),
    /// Network operation failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
}

/// Where agents find their tools.
#[derive(Debug, Clone)]
pub struct AgentEnv {
    /// `ha.d` directory (for `resource.d/NAME`).
    pub config_dir: PathBuf,
    /// `rdbadm` binary.
    pub rdbadm: PathBuf,
    /// sendmail-compatible command reading the message on stdin.
    pub sendmail: Vec<String>,
    /// This node's name (for mails).
    pub node: String,
    /// Bound on each command.
    pub timeout_ms: u64,
}

/// Output of a command that ran.
struct Ran {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

async fn run_cmd(env: &AgentEnv, argv: &[String], stdin: Option<&str>) -> Result<Ran, AgentError> {
    let line = argv.join(" ");
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| AgentError::Resolve("empty command".into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A script just written (by an administrator's tool, or a test) may still be
    // open for writing in a process that forked meanwhile: exec then fails with
    // ETXTBSY for a moment. Retry a few times, bounded.
    let mut attempts = 0u32;
    let mut child = loop {
        match cmd.spawn() {
            Ok(child) => break child,
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(source) => {
                return Err(AgentError::Spawn {
                    cmd: line.clone(),
                    source,
                })
            }
        }
    };
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        // A reader that exits early is reported by its exit status, not here.
        let _ = pipe.write_all(text.as_bytes()).await;
    }
    let out = tokio::time::timeout(
        Duration::from_millis(env.timeout_ms),
        child.wait_with_output(),
    )
    .await
    .map_err(|_| AgentError::Timeout(line.clone()))?
    .map_err(|source| AgentError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    stderr.truncate(500);
    Ok(Ran {
        ok: out.status.success(),
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    })
}

async fn must(env: &AgentEnv, argv: &[String]) -> Result<Ran, AgentError> {
    let r = run_cmd(env, argv, None).await?;
    if r.ok {
        Ok(r)
    } else {
        Err(AgentError::Failed {
            cmd: argv.join(" "),
            status: r.status,
            stderr: r.stderr,
        })
    }
}

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// How a service script is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptPath {
    /// A script file called with `ARGS... OP`.
    File(PathBuf),
    /// A systemd unit (`systemctl start|stop|is-active NAME`).
    Systemd(String),
}

/// Resolves a service script: `<config-dir>/resource.d/NAME`, `/etc/init.d/NAME`, else systemd.
pub fn resolve_script(config_dir: &Path, name: &str) -> ScriptPath {
    for p in [
        config_dir.join("resource.d").join(name),
        Path::new("/etc/init.d").join(name),
    ] {
        if p.is_file() {
            return ScriptPath::File(p);
        }
    }
    ScriptPath::Systemd(name.to_owned())
}

/// Resolved IPaddr parameters: (ip, prefix, iface, label).
fn resolve_ip(res: &Resource) -> Result<(String, u8, String, Option<String>), AgentError> {
    let Resource::IpAddr {
        ip,
        prefix,
        iface,
        label,
    } = res
    else {
        return Err(AgentError::Resolve("not an IPaddr resource".into()));
    };
    let (iface, prefix) = match (iface, prefix) {
        (Some(i), Some(p)) => (i.clone(), *p),
        _ => {
            let addrs = net::ipv4_addrs()?;
            let found = addrs
                .iter()
                .find(|a| iface.as_ref().is_none_or(|i| *i == a.name) && a.contains(*ip))
                .ok_or_else(|| {
                    AgentError::Resolve(format!(
                        "IPaddr {ip}: no interface has a network holding it (give IP/PREFIX/IFACE)"
                    ))
                })?;
            (found.name.clone(), prefix.unwrap_or(found.prefix))
        }
    };
    Ok((ip.to_string(), prefix, iface, label.clone()))
}

fn mounted(dir: &str) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.trim_end_matches('/');
    text.lines().any(|l| l.split(' ').nth(4) == Some(dir))
}

async fn mail(
    env: &AgentEnv,
    addr: &str,
    subject: &Option<String>,
    what: &str,
) -> Result<(), AgentError> {
    let subj = match subject {
        Some(s) => format!("{s} {what}"),
        None => what.to_owned(),
    };
    let msg = format!(
        "To: {addr}\nSubject: {subj}\n\n{what} on node {}\n",
        env.node
    );
    match run_cmd(env, &env.sendmail, Some(&msg)).await {
        Ok(r) if r.ok => Ok(()),
        Ok(r) => {
            tracing::warn!(
                "MailTo: {} failed ({}): {}",
                env.sendmail.join(" "),
                r.status,
                r.stderr
            );
            Ok(())
        }
        Err(e) => {
            tracing::warn!("MailTo: mail not sent: {e}");
            Ok(())
        }
    }
}

/// Runs `op` on `res`. Idempotent.
pub async fn run(env: &AgentEnv, res: &Resource, op: Op) -> Result<(), AgentError> {
    match (res, op) {
        (Resource::IpAddr { .. }, _) => {
            let (ip, prefix, iface, label) = resolve_ip(res)?;
            let present = ip_present(env, &ip, &iface).await?;
            let cidr = format!("{ip}/{prefix}");
            match op {
                Op::Start => {
                    if !present {
                        let mut argv = sv(&["ip", "addr", "add", &cidr, "dev", &iface]);
                        if let Some(l) = &label {
                            argv.extend(sv(&["label", l]));
                        }
                        must(env, &argv).await?;
                    }
                    if !net::iface_noarp(&iface)? {
                        let ipv4 = ip.parse().map_err(|_| AgentError::Resolve(ip.clone()))?;
                        net::send_garp(&iface, ipv4, GARP_COUNT)?;
                    }
                    Ok(())
                }
                Op::Stop => {
                    if present {
                        must(env, &sv(&["ip", "addr", "del", &cidr, "dev", &iface])).await?;
                    }
                    Ok(())
                }
            }
        }
        (Resource::RdbDisk { res }, Op::Start) => {
            // Like Heartbeat's drbddisk: the promotion is retried while it is refused
            // (e.g. this node is a SyncTarget finishing its resync after a return),
            // within the resource timeout (run() is bounded by the caller's timeout too).
            // A disk that is StandAlone (split brain, or disconnected by the
            // administrator) and not UpToDate may hold stale data: never promote it
            // here. A Consistent disk whose peer is merely unreachable (Connecting) is
            // the normal failover case and is promoted.
            let st = vec![
                env.rdbadm.display().to_string(),
                "status".into(),
                res.clone(),
                "--json".into(),
            ];
            let r = run_cmd(env, &st, None).await?;
            if r.ok {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.stdout) {
                    let s = &v["resources"][0];
                    if s["connection"] == "StandAlone" && s["disk"] != "UpToDate" {
                        return Err(AgentError::Resolve(format!(
                            "rdbdisk {res}: StandAlone with disk {} (split brain?): refusing to promote possibly stale data; resolve it first",
                            s["disk"]
                        )));
                    }
                }
            }
            let argv = vec![
                env.rdbadm.display().to_string(),
                "primary".into(),
                res.clone(),
            ];
            let deadline = tokio::time::Instant::now() + Duration::from_millis(env.timeout_ms);
            let mut logged = false;
            loop {
                let r = run_cmd(env, &argv, None).await?;
                if r.ok {
                    return Ok(());
                }
                if tokio::time::Instant::now() + Duration::from_millis(PROMOTE_RETRY_MS) >= deadline
                {
                    return Err(AgentError::Failed {
                        cmd: argv.join(" "),
                        status: r.status,
                        stderr: r.stderr,
                    });
                }
                if !logged {
                    tracing::warn!("{} refused ({}); retrying", argv.join(" "), r.stderr);
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(PROMOTE_RETRY_MS)).await;
            }
        }
        (Resource::RdbDisk { res }, Op::Stop) => {
            let argv = vec![
                env.rdbadm.display().to_string(),
                "secondary".into(),
                res.clone(),
            ];
            must(env, &argv).await.map(|_| ())
        }
        (
            Resource::Filesystem {
                dev,
                dir,
                fstype,
                options,
            },
            Op::Start,
        ) => {
            if mounted(dir) {
                return Ok(());
            }
            // fsck -p: 0 clean, 1 errors corrected; anything else is a failure.
            let r = run_cmd(env, &sv(&["fsck", "-p", dev]), None).await?;
            if !r.ok && !r.status.ends_with("exit status: 1") {
                return Err(AgentError::Failed {
                    cmd: format!("fsck -p {dev}"),
                    status: r.status,
                    stderr: r.stderr,
                });
            }
            let mut argv = sv(&["mount", "-t", fstype]);
            if let Some(o) = options {
                argv.extend(sv(&["-o", o]));
            }
            argv.extend(sv(&[dev, dir]));
            // A device promoted a moment ago can fail its first superblock read
            // ("can't read superblock", seen once in CI right after an rdb
            // promotion on FUSE + loop): retry a bounded number of times before the
            // start counts as failed (which rolls the whole group back).
            let mut attempt = 1;
            loop {
                let r = run_cmd(env, &argv, None).await?;
                if r.ok || mounted(dir) {
                    return Ok(());
                }
                if attempt == MOUNT_ATTEMPTS {
                    return Err(AgentError::Failed {
                        cmd: argv.join(" "),
                        status: r.status,
                        stderr: r.stderr,
                    });
                }
                tracing::warn!(
                    "mount {dev} on {dir} failed (attempt {attempt} of {MOUNT_ATTEMPTS}): {}",
                    r.stderr.trim()
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(MOUNT_RETRY_MS)).await;
            }
        }
        (Resource::Filesystem { dir, .. }, Op::Stop) => {
            for attempt in 1..=UMOUNT_ATTEMPTS {
                if !mounted(dir) {
                    return Ok(());
                }
                let r = run_cmd(env, &sv(&["umount", dir]), None).await?;
                if r.ok {
                    return Ok(());
                }
                tracing::warn!(
                    "umount {dir} failed (attempt {attempt}): {}; killing users",
                    r.stderr
                );
                let _ = run_cmd(env, &sv(&["fuser", "-km", dir]), None).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if mounted(dir) {
                return Err(AgentError::Failed {
                    cmd: format!("umount {dir}"),
                    status: format!("{UMOUNT_ATTEMPTS} attempts"),
                    stderr: "still busy".into(),
                });
            }
            Ok(())
        }
        (Resource::MailTo { addr, subject }, _) => {
            let what = if op == Op::Start {
                "Takeover in progress"
            } else {
                "Migrating resource away"
            };
            mail(env, addr, subject, what).await
        }
        (Resource::Script { name, args }, _) => {
            let verb = if op == Op::Start { "start" } else { "stop" };
            let argv = match resolve_script(&env.config_dir, name) {
                ScriptPath::File(p) => {
                    let mut v = vec![p.display().to_string()];
                    v.extend(args.iter().cloned());
                    v.push(verb.into());
                    v
                }
                ScriptPath::Systemd(unit) => sv(&["systemctl", verb, &unit]),
            };
            must(env, &argv).await.map(|_| ())
        }
    }
}

async fn ip_present(env: &AgentEnv, ip: &str, iface: &str) -> Result<bool, AgentError> {
    let r = must(env, &sv(&["ip", "-o", "-4", "addr", "show", "dev", iface])).await?;
    let needle = format!("inet {ip}/");
    Ok(r.stdout.contains(&needle))
}

/// True when the resource runs here.
pub async fn status(env: &AgentEnv, res: &Resource) -> Result<bool, AgentError> {
    match res {
        Resource::IpAddr { .. } => {
            let (ip, _, iface, _) = resolve_ip(res)?;
            ip_present(env, &ip, &iface).await
        }
        Resource::RdbDisk { res } => {
            let argv = vec![env.rdbadm.display().to_string(), "role".into(), res.clone()];
            let r = run_cmd(env, &argv, None).await?;
            Ok(r.ok && r.stdout.trim_start().starts_with("Primary"))
        }
        Resource::Filesystem { dir, .. } => Ok(mounted(dir)),
        Resource::MailTo { .. } => Ok(false),
        Resource::Script { name, args } => {
            let argv = match resolve_script(&env.config_dir, name) {
                ScriptPath::File(p) => {
                    let mut v = vec![p.display().to_string()];
                    v.extend(args.iter().cloned());
                    v.push("status".into());
                    v
                }
                ScriptPath::Systemd(unit) => sv(&["systemctl", "is-active", "--quiet", &unit]),
            };
            Ok(run_cmd(env, &argv, None).await?.ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn env(dir: &Path) -> AgentEnv {
        AgentEnv {
            config_dir: dir.to_path_buf(),
            rdbadm: dir.join("rdbadm"),
            sendmail: vec![dir.join("sendmail").display().to_string(), "-t".into()],
            node: "tho-web1".into(),
            timeout_ms: 5000,
        }
    }

    fn script(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn script_agent_args_and_status() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("resource.d")).unwrap();
        let log = d.path().join("log");
        script(
            &d.path().join("resource.d/web"),
            &format!(
                "echo \"$@\" >> {0}; [ \"$2\" != status ] || [ -e {0}.up ]",
                log.display()
            ),
        );
        let e = env(d.path());
        let r = Resource::Script {
            name: "web".into(),
            args: vec!["x".into()],
        };
        run(&e, &r, Op::Start).await.unwrap();
        assert!(!status(&e, &r).await.unwrap());
        std::fs::write(d.path().join("log.up"), "").unwrap();
        assert!(status(&e, &r).await.unwrap());
        run(&e, &r, Op::Stop).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "x start\nx status\nx status\nx stop\n"
        );
        script(&d.path().join("resource.d/bad"), "echo broken >&2; exit 3");
        let err = run(
            &e,
            &Resource::Script {
                name: "bad".into(),
                args: vec![],
            },
            Op::Start,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
    }

    #[tokio::test]
    async fn rdbdisk_and_mailto() {
        let d = tempfile::tempdir().unwrap();
        let e = env(d.path());
        let log = d.path().join("log");
        let sb = d.path().join("split-brain");
        script(
            &e.rdbadm,
            &format!(
                "echo \"rdbadm $@\" >> {}; [ \"$1\" = status ] && [ -e {} ] && echo '{{\"resources\":[{{\"connection\":\"StandAlone\",\"disk\":\"Consistent\"}}]}}'; exit 0",
                log.display(),
                sb.display()
            ),
        );
        let r = Resource::RdbDisk {
            res: "webstore".into(),
        };
        run(&e, &r, Op::Start).await.unwrap();
        run(&e, &r, Op::Stop).await.unwrap();
        // A StandAlone disk that is not UpToDate is never promoted.
        std::fs::write(&sb, "").unwrap();
        let err = run(&e, &r, Op::Start).await.unwrap_err();
        assert!(err.to_string().contains("refusing to promote"), "{err}");
        std::fs::remove_file(&sb).unwrap();
        // Missing sendmail: a warning, not a failure.
        let m = Resource::MailTo {
            addr: "sip@tholdi.com".into(),
            subject: None,
        };
        run(&e, &m, Op::Start).await.unwrap();
        script(
            &d.path().join("sendmail"),
            &format!("cat >> {}", log.display()),
        );
        run(&e, &m, Op::Stop).await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.starts_with("rdbadm status webstore --json\nrdbadm primary webstore\nrdbadm secondary webstore\nrdbadm status webstore --json\nTo: sip@tholdi.com\nSubject: Migrating resource away\n"), "{text}");
    }

    #[tokio::test]
    async fn filesystem_agent_loop_mount() {
        for tool in ["mkfs.ext4", "losetup", "mount", "umount", "fsck"] {
            assert!(
                std::process::Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "{tool} missing: install e2fsprogs/util-linux"
            );
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        let mnt = d.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let e = env(d.path());
        let r = Resource::Filesystem {
            dev: img.display().to_string(),
            dir: mnt.display().to_string(),
            fstype: "ext4".into(),
            options: Some("loop".into()),
        };
        run(&e, &r, Op::Start).await.unwrap();
        run(&e, &r, Op::Start).await.unwrap();
        assert!(status(&e, &r).await.unwrap());
        // A process holding the mount point is killed by the stop.
        let mut busy = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&mnt)
            .spawn()
            .unwrap();
        run(&e, &r, Op::Stop).await.unwrap();
        assert!(!status(&e, &r).await.unwrap());
        run(&e, &r, Op::Stop).await.unwrap();
        let _ = busy.kill();
        let _ = busy.wait();
    }
}
