//! Configuration of `rdb-ha`: parsing of `ha.cf`, `haresources` and `authkeys`.
//!
//! This module owns the Heartbeat v1 file syntax (plus rdb's documented extensions,
//! see `docs/ha.md`) and every validation rule. Errors name `file:line(:col)`; several
//! errors are collected before giving up so one `check-config` run reports them all.
//! Warnings (accepted but dubious input) are returned beside the configuration.

use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use rdb_protocol::heartbeat::AuthAlg;

/// Heartbeat's default UDP port.
pub const DEFAULT_UDP_PORT: u16 = 694;
/// Most nodes in `ha.cf`.
pub const MAX_NODES: usize = 16;
/// Most resources in the group.
pub const MAX_RESOURCES: usize = 64;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// File the problem is in.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column, 0 when not meaningful.
    pub col: usize,
    /// What is wrong.
    pub msg: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let f = self.file.display();
        match (self.line, self.col) {
            (0, _) => format!("{f}: {}", self.msg),
            (l, 0) => format!("{f}:{l}: {}", self.msg),
            (l, c) => format!("{f}:{l}:{c}: {}", self.msg),
        }
    }
}

/// Every error found, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// A dubious but accepted input, rendered like an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning(pub ConfigError);

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "warning: {}", self.0)
    }
}

/// `auto_failback` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoFailback {
    /// The group goes back to its preferred node when that node returns.
    On,
    /// The group stays where it is.
    Off,
    /// Heartbeat's `legacy`: treated as `on` (the 2-node case), with a warning.
    Legacy,
}

/// One heartbeat medium.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Medium {
    /// `bcast IFACE`: broadcast on the interface's broadcast address.
    Bcast {
        /// Interface name.
        iface: String,
    },
    /// `ucast IFACE IP[:PORT]`: unicast to one address (port defaults to `udpport`).
    Ucast {
        /// Interface name.
        iface: String,
        /// Destination.
        ip: Ipv4Addr,
        /// Destination port.
        port: u16,
    },
    /// `mcast IFACE GROUP PORT TTL LOOP`.
    Mcast {
        /// Interface name.
        iface: String,
        /// Multicast group.
        group: Ipv4Addr,
        /// Destination port.
        port: u16,
        /// Multicast TTL.
        ttl: u8,
        /// Multicast loopback on.
        loopback: bool,
    },
}

impl Medium {
    /// Interface the medium uses (one link per interface).
    pub fn iface(&self) -> &str {
        match self {
            Medium::Bcast { iface } | Medium::Ucast { iface, .. } | Medium::Mcast { iface, .. } => {
                iface
            }
        }
    }
}

/// Kind of health check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum CheckKind {
    /// A shell command; exit status 0 is healthy.
    Cmd(String),
    /// A TCP connect to `HOST:PORT`.
    Tcp(String),
    /// An HTTP GET of `http://HOST[:PORT]/PATH`; 2xx or 3xx is healthy.
    Http(String),
}

/// `check NAME cmd|tcp|http ARG [interval D] [timeout D] [fall N] [rise N]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    /// Name used in logs and status.
    pub name: String,
    /// What to probe.
    pub kind: CheckKind,
    /// Time between probes.
    pub interval_ms: u64,
    /// Time a probe may take.
    pub timeout_ms: u64,
    /// Consecutive failures that make the check fail.
    pub fall: u32,
    /// Consecutive successes that make a failed check pass again.
    pub rise: u32,
}

/// Parsed `ha.cf`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HaCf {
    /// Time between heartbeats.
    pub keepalive_ms: u64,
    /// Silence after which a node is dead.
    pub deadtime_ms: u64,
    /// Silence after which a late heartbeat is logged.
    pub warntime_ms: u64,
    /// Deadtime at boot.
    pub initdead_ms: u64,
    /// Local UDP port (receive) and default destination port.
    pub udpport: u16,
    /// Heartbeat media.
    pub media: Vec<Medium>,
    /// Cluster nodes in file order.
    pub nodes: Vec<String>,
    /// Failback policy.
    pub auto_failback: AutoFailback,
    /// `logfile` (accepted; also written by the daemon).
    pub logfile: Option<String>,
    /// `debugfile` (accepted).
    pub debugfile: Option<String>,
    /// `logfacility` (accepted).
    pub logfacility: Option<String>,
    /// Ping nodes (tie-breaker): reachable when any answers.
    pub ping: Vec<Ipv4Addr>,
    /// Fencing command (argv), the dead node's name is appended.
    pub fence: Option<Vec<String>>,
    /// Time the fence command may take.
    pub fence_timeout_ms: u64,
    /// Health checks run on the active node.
    pub checks: Vec<HealthCheck>,
}

/// One resource of the group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Resource {
    /// `IPaddr::IP[/PREFIX[/IFACE[:LABEL]]]` (also `IPaddr2`).
    IpAddr {
        /// Address.
        ip: Ipv4Addr,
        /// Prefix length, `None`: that of the interface whose network holds `ip`.
        prefix: Option<u8>,
        /// Interface, `None`: the one whose network holds `ip`.
        iface: Option<String>,
        /// Label (`eth0:0`), `None`: no label.
        label: Option<String>,
    },
    /// `rdbdisk::RES` / `drbddisk::RES`: promote/demote an rdb resource.
    RdbDisk {
        /// rdb resource name (`all` when omitted).
        res: String,
    },
    /// `Filesystem::DEV::DIR::FSTYPE[::OPTIONS]`.
    Filesystem {
        /// Block device.
        dev: String,
        /// Mount point.
        dir: String,
        /// File system type.
        fstype: String,
        /// `-o` options.
        options: Option<String>,
    },
    /// `MailTo::ADDR[::SUBJECT]`.
    MailTo {
        /// Recipients.
        addr: String,
        /// Subject prefix.
        subject: Option<String>,
    },
    /// Any other name: a service script called with `ARGS... start|stop|status`.
    Script {
        /// Script or service name.
        name: String,
        /// Arguments before the operation.
        args: Vec<String>,
    },
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::IpAddr {
                ip,
                prefix,
                iface,
                label,
            } => {
                write!(f, "IPaddr::{ip}")?;
                if let Some(p) = prefix {
                    write!(f, "/{p}")?;
                }
                if let Some(l) = label.as_ref().or(iface.as_ref()) {
                    write!(f, "/{l}")?;
                }
                Ok(())
            }
            Resource::RdbDisk { res } => write!(f, "rdbdisk::{res}"),
            Resource::Filesystem {
                dev, dir, fstype, ..
            } => write!(f, "Filesystem::{dev}::{dir}::{fstype}"),
            Resource::MailTo { addr, .. } => write!(f, "MailTo::{addr}"),
            Resource::Script { name, args } => {
                write!(f, "{name}")?;
                for a in args {
                    write!(f, "::{a}")?;
                }
                Ok(())
            }
        }
    }
}

/// Parsed `haresources`: the single resource group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HaResources {
    /// Preferred node (first field).
    pub preferred: String,
    /// Resources, started in this order, stopped in reverse.
    pub resources: Vec<Resource>,
}

/// One `authkeys` key.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey {
    /// Index (`N`).
    pub index: u8,
    /// Algorithm.
    pub alg: AuthAlg,
    /// Secret.
    pub secret: Vec<u8>,
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthKey({} {} <secret>)", self.index, self.alg.as_str())
    }
}

/// Parsed `authkeys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKeys {
    /// Index used to sign (`auth N`).
    pub active: u8,
    /// Every key (any may verify).
    pub keys: Vec<AuthKey>,
}

impl AuthKeys {
    /// The key `auth N` selects.
    pub fn active_key(&self) -> Option<&AuthKey> {
        self.keys.iter().find(|k| k.index == self.active)
    }
}

/// The whole configuration of a node.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory the files were read from.
    pub dir: PathBuf,
    /// This node's name.
    pub node: String,
    /// `ha.cf`.
    pub hacf: HaCf,
    /// `haresources`.
    pub resources: HaResources,
    /// `authkeys`.
    pub authkeys: AuthKeys,
}

struct Ctx<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
}

impl Ctx<'_> {
    fn err(&mut self, line: usize, col: usize, msg: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            msg: msg.into(),
        });
    }
    fn warn(&mut self, line: usize, col: usize, msg: impl Into<String>) {
        self.warnings.push(Warning(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            msg: msg.into(),
        }));
    }
}

/// A token with its 1-based column.
#[derive(Debug, Clone)]
struct Tok {
    text: String,
    col: usize,
}

/// Splits a line into whitespace-separated tokens; `"..."` quotes a token (no escapes);
/// `#` outside quotes starts a comment. Returns an error column for an open quote.
fn tokenize(line: &str) -> Result<Vec<Tok>, usize> {
    let mut toks = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '#' {
            break;
        }
        let start = i;
        let mut text = String::new();
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                text.push(chars[i]);
                i += 1;
            }
            if i == chars.len() {
                return Err(start + 1);
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                text.push(chars[i]);
                i += 1;
            }
        }
        toks.push(Tok {
            text,
            col: start + 1,
        });
    }
    Ok(toks)
}

/// Parses a duration: integer or decimal seconds (`2`, `1.5`, `2s`) or milliseconds (`100ms`).
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<u64>().ok();
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    if let Some((int, frac)) = secs.split_once('.') {
        if frac.is_empty() || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let i: u64 = int.parse().ok()?;
        let f: u64 = format!("{frac:0<3}").parse().ok()?;
        return i.checked_mul(1000)?.checked_add(f);
    }
    secs.parse::<u64>().ok()?.checked_mul(1000)
}

const HACF_DIRECTIVES: &[&str] = &[
    "keepalive",
    "deadtime",
    "warntime",
    "initdead",
    "udpport",
    "bcast",
    "ucast",
    "mcast",
    "node",
    "auto_failback",
    "logfile",
    "debugfile",
    "logfacility",
    "ping",
    "fence",
    "fence_timeout",
    "check",
];

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= rdb_protocol::heartbeat::MAX_NAME_BYTES
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Parses the text of `ha.cf` (`file` names it in errors).
pub fn parse_hacf(file: &Path, text: &str) -> Result<(HaCf, Vec<Warning>), ConfigErrors> {
    let mut cx = Ctx {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let mut cf = HaCf {
        keepalive_ms: 2000,
        deadtime_ms: 30_000,
        warntime_ms: 0,
        initdead_ms: 0,
        udpport: DEFAULT_UDP_PORT,
        media: Vec::new(),
        nodes: Vec::new(),
        auto_failback: AutoFailback::Legacy,
        logfile: None,
        debugfile: None,
        logfacility: None,
        ping: Vec::new(),
        fence: None,
        fence_timeout_ms: 30_000,
        checks: Vec::new(),
    };
    let mut seen_warntime = false;
    let mut seen_initdead = false;
    let mut seen_failback = false;
    let mut ucast_ports: Vec<(usize, bool)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let ln = i + 1;
        let toks = match tokenize(raw) {
            Ok(t) => t,
            Err(col) => {
                cx.err(ln, col, "unterminated quote");
                continue;
            }
        };
        let Some((d, args)) = toks.split_first() else {
            continue;
        };
        let nargs = |cx: &mut Ctx, n: usize, usage: &str| -> bool {
            if args.len() != n {
                cx.err(ln, d.col, format!("usage: {usage}"));
                false
            } else {
                true
            }
        };
        let dur = |cx: &mut Ctx, t: &Tok| -> Option<u64> {
            let v = parse_duration_ms(&t.text);
            if v.is_none() {
                cx.err(
                    ln,
                    t.col,
                    format!("invalid duration '{}' (seconds, or NNNms)", t.text),
                );
            }
            v
        };
        match d.text.as_str() {
            "keepalive" | "deadtime" | "warntime" | "initdead" | "fence_timeout" => {
                if !nargs(&mut cx, 1, &format!("{} SECONDS|NNNms", d.text)) {
                    continue;
                }
                let Some(v) = dur(&mut cx, &args[0]) else {
                    continue;
                };
                if v == 0 {
                    cx.err(ln, args[0].col, format!("{} must be positive", d.text));
                    continue;
                }
                match d.text.as_str() {
                    "keepalive" => cf.keepalive_ms = v,
                    "deadtime" => cf.deadtime_ms = v,
                    "warntime" => {
                        cf.warntime_ms = v;
                        seen_warntime = true;
                    }
                    "initdead" => {
                        cf.initdead_ms = v;
                        seen_initdead = true;
                    }
                    _ => cf.fence_timeout_ms = v,
                }
            }
            "udpport" => {
                if !nargs(&mut cx, 1, "udpport PORT") {
                    continue;
                }
                match args[0].text.parse::<u16>() {
                    Ok(p) if p > 0 => cf.udpport = p,
                    _ => cx.err(ln, args[0].col, format!("invalid port '{}'", args[0].text)),
                }
            }
            "bcast" => {
                if args.is_empty() {
                    cx.err(ln, d.col, "usage: bcast IFACE [IFACE...]");
                }
                for a in args {
                    cf.media.push(Medium::Bcast {
                        iface: a.text.clone(),
                    });
                }
            }
            "ucast" => {
                if !nargs(&mut cx, 2, "ucast IFACE IP[:PORT]") {
                    continue;
                }
                let (ip_s, port_s) = match args[1].text.split_once(':') {
                    Some((a, p)) => (a, Some(p)),
                    None => (args[1].text.as_str(), None),
                };
                let Ok(ip) = ip_s.parse::<Ipv4Addr>() else {
                    cx.err(ln, args[1].col, format!("invalid IPv4 address '{ip_s}'"));
                    continue;
                };
                let port = match port_s.map(str::parse::<u16>) {
                    None => 0,
                    Some(Ok(p)) if p > 0 => p,
                    Some(_) => {
                        cx.err(
                            ln,
                            args[1].col,
                            format!("invalid port in '{}'", args[1].text),
                        );
                        continue;
                    }
                };
                ucast_ports.push((cf.media.len(), port == 0));
                cf.media.push(Medium::Ucast {
                    iface: args[0].text.clone(),
                    ip,
                    port,
                });
            }
            "mcast" => {
                if !nargs(&mut cx, 5, "mcast IFACE GROUP PORT TTL LOOP") {
                    continue;
                }
                let group = args[1]
                    .text
                    .parse::<Ipv4Addr>()
                    .ok()
                    .filter(|g| g.is_multicast());
                let port = args[2].text.parse::<u16>().ok().filter(|p| *p > 0);
                let ttl = args[3].text.parse::<u8>().ok().filter(|t| *t >= 1);
                let lp = match args[4].text.as_str() {
                    "0" => Some(false),
                    "1" => Some(true),
                    _ => None,
                };
                match (group, port, ttl, lp) {
                    (Some(group), Some(port), Some(ttl), Some(loopback)) => {
                        cf.media.push(Medium::Mcast {
                            iface: args[0].text.clone(),
                            group,
                            port,
                            ttl,
                            loopback,
                        })
                    }
                    (None, ..) => cx.err(ln, args[1].col, "invalid multicast group"),
                    (_, None, ..) => cx.err(ln, args[2].col, "invalid port"),
                    (_, _, None, _) => cx.err(ln, args[3].col, "invalid TTL (1..255)"),
                    _ => cx.err(ln, args[4].col, "LOOP must be 0 or 1"),
                }
            }
            "node" => {
                if args.is_empty() {
                    cx.err(ln, d.col, "usage: node NAME [NAME...]");
                }
                for a in args {
                    if !valid_node_name(&a.text) {
                        cx.err(ln, a.col, format!("invalid node name '{}'", a.text));
                    } else if cf.nodes.contains(&a.text) {
                        cx.err(ln, a.col, format!("node '{}' listed twice", a.text));
                    } else if cf.nodes.len() == MAX_NODES {
                        cx.err(ln, a.col, format!("more than {MAX_NODES} nodes"));
                    } else {
                        cf.nodes.push(a.text.clone());
                    }
                }
            }
            "auto_failback" => {
                if !nargs(&mut cx, 1, "auto_failback on|off|legacy") {
                    continue;
                }
                seen_failback = true;
                cf.auto_failback = match args[0].text.as_str() {
                    "on" | "yes" | "true" => AutoFailback::On,
                    "off" | "no" | "false" => AutoFailback::Off,
                    "legacy" => {
                        cx.warn(ln, args[0].col, "auto_failback legacy is treated as 'on'");
                        AutoFailback::Legacy
                    }
                    o => {
                        cx.err(
                            ln,
                            args[0].col,
                            format!("auto_failback '{o}': expected on, off or legacy"),
                        );
                        continue;
                    }
                };
            }
            "logfile" | "debugfile" | "logfacility" => {
                if !nargs(&mut cx, 1, &format!("{} VALUE", d.text)) {
                    continue;
                }
                let v = Some(args[0].text.clone());
                match d.text.as_str() {
                    "logfile" => cf.logfile = v,
                    "debugfile" => cf.debugfile = v,
                    _ => cf.logfacility = v,
                }
            }
            "ping" => {
                if args.is_empty() {
                    cx.err(ln, d.col, "usage: ping IP [IP...]");
                }
                for a in args {
                    match a.text.parse::<Ipv4Addr>() {
                        Ok(ip) => cf.ping.push(ip),
                        Err(_) => cx.err(
                            ln,
                            a.col,
                            format!("ping: invalid IPv4 address '{}'", a.text),
                        ),
                    }
                }
            }
            "fence" => {
                if args.is_empty() {
                    cx.err(ln, d.col, "usage: fence COMMAND [ARGS...]");
                    continue;
                }
                if cf.fence.is_some() {
                    cx.err(ln, d.col, "fence given twice");
                    continue;
                }
                cf.fence = Some(args.iter().map(|t| t.text.clone()).collect());
            }
            "check" => parse_check(&mut cx, ln, d, args, &mut cf),
            other => {
                let hint = suggest(other, HACF_DIRECTIVES)
                    .map(|s| format!(" (did you mean '{s}'?)"))
                    .unwrap_or_default();
                cx.err(ln, 0, format!("unknown directive '{other}'{hint}"));
            }
        }
    }
    for (idx, default_port) in ucast_ports {
        if default_port {
            if let Some(Medium::Ucast { port, .. }) = cf.media.get_mut(idx) {
                *port = cf.udpport;
            }
        }
    }
    if !seen_warntime {
        cf.warntime_ms = cf.deadtime_ms / 2;
    }
    if !seen_initdead {
        cf.initdead_ms = cf.deadtime_ms.saturating_mul(2);
    }
    if !seen_failback {
        cf.auto_failback = AutoFailback::Off;
    }
    if cf.keepalive_ms >= cf.deadtime_ms {
        cx.err(0, 0, "keepalive must be shorter than deadtime");
    } else if cf.deadtime_ms < 2 * cf.keepalive_ms {
        cx.warn(
            0,
            0,
            "deadtime is less than two keepalive periods: one lost heartbeat declares a node dead",
        );
    }
    if cf.warntime_ms >= cf.deadtime_ms {
        cx.warn(
            0,
            0,
            "warntime is not shorter than deadtime: no late-heartbeat warning will be logged",
        );
    }
    if cf.initdead_ms < cf.deadtime_ms {
        cx.err(0, 0, "initdead must be at least deadtime");
    } else if cf.initdead_ms < 2 * cf.deadtime_ms {
        cx.warn(0, 0, "initdead should be at least twice deadtime");
    }
    if cf.media.is_empty() {
        cx.err(0, 0, "no heartbeat medium (bcast, ucast or mcast)");
    }
    if cf.nodes.is_empty() {
        cx.err(0, 0, "no node directive");
    }
    if cx.errors.is_empty() {
        Ok((cf, cx.warnings))
    } else {
        Err(ConfigErrors(cx.errors))
    }
}

fn parse_check(cx: &mut Ctx, ln: usize, d: &Tok, args: &[Tok], cf: &mut HaCf) {
    const USAGE: &str =
        "usage: check NAME cmd|tcp|http ARG [interval D] [timeout D] [fall N] [rise N]";
    if args.len() < 3 || args.len() % 2 != 1 {
        cx.err(ln, d.col, USAGE);
        return;
    }
    let name = args[0].text.clone();
    if cf.checks.iter().any(|c| c.name == name) {
        cx.err(ln, args[0].col, format!("check '{name}' defined twice"));
        return;
    }
    let arg = args[2].text.clone();
    let kind = match args[1].text.as_str() {
        "cmd" => CheckKind::Cmd(arg),
        "tcp" => {
            if arg
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                cx.err(
                    ln,
                    args[2].col,
                    format!("tcp check: expected HOST:PORT, got '{arg}'"),
                );
                return;
            }
            CheckKind::Tcp(arg)
        }
        "http" => {
            if !arg.starts_with("http://") {
                cx.err(
                    ln,
                    args[2].col,
                    format!("http check: expected http://HOST[:PORT]/PATH, got '{arg}'"),
                );
                return;
            }
            CheckKind::Http(arg)
        }
        o => {
            cx.err(
                ln,
                args[1].col,
                format!("check kind '{o}': expected cmd, tcp or http"),
            );
            return;
        }
    };
    let mut c = HealthCheck {
        name,
        kind,
        interval_ms: 2000,
        timeout_ms: 0,
        fall: 3,
        rise: 2,
    };
    for pair in args[3..].chunks(2) {
        let (k, v) = (&pair[0], &pair[1]);
        match k.text.as_str() {
            "interval" | "timeout" => match parse_duration_ms(&v.text).filter(|d| *d > 0) {
                Some(ms) if k.text == "interval" => c.interval_ms = ms,
                Some(ms) => c.timeout_ms = ms,
                None => {
                    cx.err(ln, v.col, format!("invalid duration '{}'", v.text));
                    return;
                }
            },
            "fall" | "rise" => match v
                .text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
            {
                Some(n) if k.text == "fall" => c.fall = n,
                Some(n) => c.rise = n,
                None => {
                    cx.err(ln, v.col, format!("invalid count '{}' (1..1000)", v.text));
                    return;
                }
            },
            o => {
                cx.err(
                    ln,
                    k.col,
                    format!("check option '{o}': expected interval, timeout, fall or rise"),
                );
                return;
            }
        }
    }
    if c.timeout_ms == 0 {
        c.timeout_ms = c.interval_ms;
    }
    cf.checks.push(c);
}

fn parse_ip_spec(cx: &mut Ctx, ln: usize, col: usize, spec: &str) -> Option<Resource> {
    let mut parts = spec.split('/');
    let ip_s = parts.next().unwrap_or_default();
    let Ok(ip) = ip_s.parse::<Ipv4Addr>() else {
        cx.err(ln, col, format!("IPaddr: invalid IPv4 address '{ip_s}'"));
        return None;
    };
    let prefix = match parts.next() {
        None | Some("") => None,
        Some(p) => match p.parse::<u8>().ok().filter(|p| (1..=32).contains(p)) {
            Some(p) => Some(p),
            None => match p.parse::<Ipv4Addr>() {
                Ok(mask) => {
                    let m = u32::from(mask);
                    if m.leading_ones() + m.trailing_zeros() != 32 || m == 0 {
                        cx.err(ln, col, format!("IPaddr: invalid netmask '{p}'"));
                        return None;
                    }
                    Some(m.leading_ones() as u8) // at most 32
                }
                Err(_) => {
                    cx.err(ln, col, format!("IPaddr: invalid prefix length '{p}'"));
                    return None;
                }
            },
        },
    };
    let (iface, label) = match parts.next() {
        None | Some("") => (None, None),
        Some(l) => match l.split_once(':') {
            Some((i, _)) => (Some(i.to_owned()), Some(l.to_owned())),
            None => (Some(l.to_owned()), None),
        },
    };
    if parts.next().is_some() {
        cx.warn(
            ln,
            col,
            "IPaddr: broadcast address argument ignored (derived from the prefix)",
        );
    }
    Some(Resource::IpAddr {
        ip,
        prefix,
        iface,
        label,
    })
}

fn parse_resource(cx: &mut Ctx, ln: usize, tok: &Tok) -> Option<Resource> {
    let mut parts = tok.text.split("::");
    let name = parts.next().unwrap_or_default();
    let args: Vec<&str> = parts.collect();
    let col = tok.col;
    if name.is_empty() || args.iter().any(|a| a.is_empty()) {
        cx.err(ln, col, format!("malformed resource '{}'", tok.text));
        return None;
    }
    match name {
        "IPaddr" | "IPaddr2" | "IPAddr" | "IPAddr2" => {
            if name.starts_with("IPAddr") {
                cx.warn(
                    ln,
                    col,
                    format!("'{name}' spelt with a capital A: read as 'IPaddr'"),
                );
            }
            if args.len() != 1 {
                cx.err(ln, col, "usage: IPaddr::IP[/PREFIX[/IFACE[:LABEL]]]");
                return None;
            }
            parse_ip_spec(cx, ln, col, args[0])
        }
        "rdbdisk" | "drbddisk" => {
            if args.len() > 1 {
                cx.err(ln, col, format!("usage: {name}::RESOURCE"));
                return None;
            }
            Some(Resource::RdbDisk {
                res: args.first().map_or("all", |s| s).to_owned(),
            })
        }
        "Filesystem" => {
            let (dev, dir, fstype, options) = match args.as_slice() {
                [dev, dir, fs] => (*dev, *dir, *fs, None),
                [dev, dir, fs, opts] => (*dev, *dir, *fs, Some(opts.to_string())),
                [dev, dirfs] if dirfs.contains(':') => {
                    let (dir, fs) = dirfs.rsplit_once(':').unwrap_or((dirfs, ""));
                    cx.warn(ln, col, format!("Filesystem: '{dirfs}' read as mount point '{dir}' and type '{fs}' (expected '{dir}::{fs}')"));
                    (*dev, dir, fs, None)
                }
                _ => {
                    cx.err(
                        ln,
                        col,
                        "usage: Filesystem::DEVICE::MOUNTPOINT::FSTYPE[::OPTIONS]",
                    );
                    return None;
                }
            };
            if !dir.starts_with('/') || fstype.is_empty() {
                cx.err(
                    ln,
                    col,
                    format!(
                        "Filesystem: mount point must be absolute and type given in '{}'",
                        tok.text
                    ),
                );
                return None;
            }
            Some(Resource::Filesystem {
                dev: dev.to_owned(),
                dir: dir.to_owned(),
                fstype: fstype.to_owned(),
                options,
            })
        }
        "MailTo" => match args.as_slice() {
            [addr] => Some(Resource::MailTo {
                addr: addr.to_string(),
                subject: None,
            }),
            [addr, subj] => Some(Resource::MailTo {
                addr: addr.to_string(),
                subject: Some(subj.to_string()),
            }),
            _ => {
                cx.err(ln, col, "usage: MailTo::ADDRESS[::SUBJECT]");
                None
            }
        },
        script => {
            if script.contains('/') || script.starts_with('.') {
                cx.err(ln, col, format!("resource name '{script}' must be a plain name (looked up in resource.d, /etc/init.d, systemd)"));
                return None;
            }
            Some(Resource::Script {
                name: script.to_owned(),
                args: args.iter().map(|s| s.to_string()).collect(),
            })
        }
    }
}

/// Parses the text of `haresources`.
pub fn parse_haresources(
    file: &Path,
    text: &str,
) -> Result<(HaResources, Vec<Warning>), ConfigErrors> {
    let mut cx = Ctx {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    // Join `\` continuations, remembering where each logical line starts.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut cont = false;
    for (i, raw) in text.lines().enumerate() {
        let (body, more) = match raw.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (raw, false),
        };
        if cont {
            if let Some(last) = logical.last_mut() {
                last.1.push(' ');
                last.1.push_str(body);
            }
        } else {
            logical.push((i + 1, body.to_owned()));
        }
        cont = more;
    }
    let mut group: Option<(String, usize)> = None;
    let mut resources = Vec::new();
    for (ln, line) in &logical {
        let toks = match tokenize(line) {
            Ok(t) => t,
            Err(col) => {
                cx.err(*ln, col, "unterminated quote");
                continue;
            }
        };
        let Some((node, res)) = toks.split_first() else {
            continue;
        };
        match &group {
            None => group = Some((node.text.clone(), *ln)),
            Some((g, first)) if *g != node.text => {
                cx.err(*ln, node.col, format!("only one resource group is supported: line {first} gives it to '{g}', this line to '{}'", node.text));
                continue;
            }
            Some(_) => {}
        }
        if res.is_empty() {
            cx.warn(*ln, node.col, "line lists no resource");
        }
        for t in res {
            if let Some(r) = parse_resource(&mut cx, *ln, t) {
                if resources.len() == MAX_RESOURCES {
                    cx.err(*ln, t.col, format!("more than {MAX_RESOURCES} resources"));
                    break;
                }
                resources.push(r);
            }
        }
    }
    let Some((preferred, _)) = group else {
        cx.err(0, 0, "no resource group");
        return Err(ConfigErrors(cx.errors));
    };
    if cx.errors.is_empty() {
        Ok((
            HaResources {
                preferred,
                resources,
            },
            cx.warnings,
        ))
    } else {
        Err(ConfigErrors(cx.errors))
    }
}

/// Parses the text of `authkeys`. `mode` is the file's permission bits: any group or
/// other bit is refused. `crc` keys are refused unless `allow_crc`.
pub fn parse_authkeys(
    file: &Path,
    text: &str,
    mode: u32,
    allow_crc: bool,
) -> Result<(AuthKeys, Vec<Warning>), ConfigErrors> {
    let mut cx = Ctx {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    if mode & 0o077 != 0 {
        cx.err(
            0,
            0,
            format!(
                "mode {:04o} gives access to group or others: run 'chmod 600 {}'",
                mode & 0o7777,
                file.display()
            ),
        );
    }
    let mut active: Option<(u8, usize)> = None;
    let mut keys: Vec<AuthKey> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let ln = i + 1;
        let toks = match tokenize(raw) {
            Ok(t) => t,
            Err(col) => {
                cx.err(ln, col, "unterminated quote");
                continue;
            }
        };
        let Some(first) = toks.first() else {
            continue;
        };
        if first.text == "auth" {
            match toks.get(1).map(|t| t.text.parse::<u8>()) {
                Some(Ok(n)) if toks.len() == 2 && active.is_none() => active = Some((n, ln)),
                _ if active.is_some() => cx.err(ln, 1, "auth given twice"),
                _ => cx.err(ln, 1, "usage: auth N (0..255)"),
            }
            continue;
        }
        let Ok(index) = first.text.parse::<u8>() else {
            cx.err(
                ln,
                first.col,
                format!("expected 'auth N' or 'N ALG KEY', got '{}'", first.text),
            );
            continue;
        };
        let Some(alg_t) = toks.get(1) else {
            cx.err(ln, first.col, "usage: N sha1|md5|sha256|crc KEY");
            continue;
        };
        let alg = match alg_t.text.as_str() {
            "sha256" => AuthAlg::Sha256,
            "sha1" => {
                cx.warn(ln, alg_t.col, "sha1 is weak: prefer sha256");
                AuthAlg::Sha1
            }
            "md5" => {
                cx.warn(ln, alg_t.col, "md5 is weak: prefer sha256");
                AuthAlg::Md5
            }
            "crc" if allow_crc => {
                cx.warn(
                    ln,
                    alg_t.col,
                    "crc authenticates nothing (--insecure-crc given)",
                );
                AuthAlg::Crc
            }
            "crc" => {
                cx.err(
                    ln,
                    alg_t.col,
                    "crc authenticates nothing: refused without --insecure-crc",
                );
                continue;
            }
            o => {
                cx.err(
                    ln,
                    alg_t.col,
                    format!("unknown algorithm '{o}' (sha256, sha1, md5)"),
                );
                continue;
            }
        };
        let secret: Vec<u8> = toks[2..]
            .iter()
            .map(|t| t.text.as_str())
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes();
        if secret.is_empty() && alg != AuthAlg::Crc {
            cx.err(ln, alg_t.col, "missing key");
            continue;
        }
        if keys.iter().any(|k| k.index == index) {
            cx.err(ln, first.col, format!("key {index} defined twice"));
            continue;
        }
        keys.push(AuthKey { index, alg, secret });
    }
    match active {
        None => cx.err(0, 0, "no 'auth N' line"),
        Some((n, ln)) if !keys.iter().any(|k| k.index == n) => {
            cx.err(ln, 0, format!("auth {n}: no key {n} defined"))
        }
        Some(_) => {}
    }
    match (cx.errors.is_empty(), active) {
        (true, Some((active, _))) => Ok((AuthKeys { active, keys }, cx.warnings)),
        _ => Err(ConfigErrors(cx.errors)),
    }
}

/// Reads and validates the three files of `dir` for node `node`.
pub fn load(
    dir: &Path,
    node: &str,
    allow_crc: bool,
) -> Result<(Config, Vec<Warning>), ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let read = |name: &str, errors: &mut Vec<ConfigError>| -> Option<(PathBuf, String, u32)> {
        let p = dir.join(name);
        let res = std::fs::metadata(&p).and_then(|m| Ok((std::fs::read_to_string(&p)?, m)));
        match res {
            Ok((text, m)) => Some((p, text, m.permissions().mode())),
            Err(e) => {
                errors.push(ConfigError {
                    file: p,
                    line: 0,
                    col: 0,
                    msg: format!("cannot read: {e}"),
                });
                None
            }
        }
    };
    let mut hacf = None;
    if let Some((p, t, _)) = read("ha.cf", &mut errors) {
        match parse_hacf(&p, &t) {
            Ok((c, w)) => {
                hacf = Some((p, c));
                warnings.extend(w);
            }
            Err(e) => errors.extend(e.0),
        }
    }
    let mut res = None;
    if let Some((p, t, _)) = read("haresources", &mut errors) {
        match parse_haresources(&p, &t) {
            Ok((r, w)) => {
                res = Some((p, r));
                warnings.extend(w);
            }
            Err(e) => errors.extend(e.0),
        }
    }
    let mut keys = None;
    if let Some((p, t, mode)) = read("authkeys", &mut errors) {
        match parse_authkeys(&p, &t, mode, allow_crc) {
            Ok((k, w)) => {
                keys = Some(k);
                warnings.extend(w);
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if let (Some((hp, cf)), Some((rp, r))) = (&hacf, &res) {
        if !cf.nodes.iter().any(|n| n == node) {
            errors.push(ConfigError {
                file: hp.clone(),
                line: 0,
                col: 0,
                msg: format!("this node '{node}' is not listed in a 'node' directive (use --node)"),
            });
        }
        if !cf.nodes.contains(&r.preferred) {
            errors.push(ConfigError {
                file: rp.clone(),
                line: 0,
                col: 0,
                msg: format!("preferred node '{}' is not listed in ha.cf", r.preferred),
            });
        }
    }
    match (hacf, res, keys) {
        (Some((_, hacf)), Some((_, resources)), Some(authkeys)) if errors.is_empty() => Ok((
            Config {
                dir: dir.to_path_buf(),
                node: node.to_owned(),
                hacf,
                resources,
                authkeys,
            },
            warnings,
        )),
        _ => Err(ConfigErrors(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_HACF: &str = "bcast          eth0\ndebugfile      /var/log/ha-debug\nlogfile        /var/log/ha-log\nlogfacility    none\nkeepalive     2\ndeadtime      10\nwarntime      6\ninitdead      60\nudpport       694\nnode          tho-web1\nnode          tho-web2\nauto_failback on\n";

    fn p() -> &'static Path {
        Path::new("ha.cf")
    }

    #[test]
    fn seed_hacf_parses() {
        let (cf, w) = parse_hacf(p(), SEED_HACF).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(cf.keepalive_ms, 2000);
        assert_eq!(cf.deadtime_ms, 10_000);
        assert_eq!(cf.warntime_ms, 6000);
        assert_eq!(cf.initdead_ms, 60_000);
        assert_eq!(cf.udpport, 694);
        assert_eq!(cf.nodes, vec!["tho-web1", "tho-web2"]);
        assert_eq!(cf.auto_failback, AutoFailback::On);
        assert_eq!(
            cf.media,
            vec![Medium::Bcast {
                iface: "eth0".into()
            }]
        );
    }

    #[test]
    fn misspelt_directive_names_line_and_suggests() {
        let text = SEED_HACF.replace("deadtime", "deadtme");
        let e = parse_hacf(p(), &text).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "ha.cf:6: unknown directive 'deadtme' (did you mean 'deadtime'?)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("2"), Some(2000));
        assert_eq!(parse_duration_ms("2s"), Some(2000));
        assert_eq!(parse_duration_ms("100ms"), Some(100));
        assert_eq!(parse_duration_ms("1.5"), Some(1500));
        assert_eq!(parse_duration_ms("0.25s"), Some(250));
        assert_eq!(parse_duration_ms("x"), None);
        assert_eq!(parse_duration_ms("1.2345"), None);
        assert_eq!(parse_duration_ms("-1"), None);
    }

    #[test]
    fn extensions_parse() {
        let text = "keepalive 100ms\ndeadtime 1\ninitdead 2\nucast lo 127.0.0.1:7002\nucast eth1 10.0.0.2\nmcast eth2 239.0.0.1 694 1 0\nudpport 7001\nnode a\nnode b\nping 10.0.0.254\nfence /usr/local/bin/fence-node --hard\ncheck web http http://127.0.0.1:80/ interval 1s fall 3 rise 2\ncheck app cmd \"test -e /run/app.pid\" timeout 500ms\n";
        let (cf, _) = parse_hacf(p(), text).unwrap();
        assert_eq!(cf.keepalive_ms, 100);
        assert_eq!(cf.warntime_ms, 500);
        assert_eq!(
            cf.media[0],
            Medium::Ucast {
                iface: "lo".into(),
                ip: Ipv4Addr::LOCALHOST,
                port: 7002
            }
        );
        assert!(matches!(cf.media[1], Medium::Ucast { port: 7001, .. }));
        assert!(matches!(
            cf.media[2],
            Medium::Mcast {
                ttl: 1,
                loopback: false,
                ..
            }
        ));
        assert_eq!(cf.ping, vec![Ipv4Addr::new(10, 0, 0, 254)]);
        assert_eq!(
            cf.fence.as_deref().unwrap(),
            ["/usr/local/bin/fence-node", "--hard"]
        );
        assert_eq!(cf.checks[0].fall, 3);
        assert_eq!(cf.checks[0].interval_ms, 1000);
        assert_eq!(
            cf.checks[1].kind,
            CheckKind::Cmd("test -e /run/app.pid".into())
        );
        assert_eq!(cf.checks[1].timeout_ms, 500);
        assert_eq!(cf.checks[1].interval_ms, 2000);
    }

    #[test]
    fn hacf_errors_are_collected_with_columns() {
        let text =
            "keepalive two\nnode a\nnode a\nucast lo 1.2.3\nauto_failback maybe\ncheck x foo y\n";
        let e = parse_hacf(p(), text).unwrap_err();
        let s: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        assert!(
            s[0].starts_with("ha.cf:1:11: invalid duration 'two'"),
            "{s:?}"
        );
        assert!(
            s[1].starts_with("ha.cf:3:6: node 'a' listed twice"),
            "{s:?}"
        );
        assert!(s[2].starts_with("ha.cf:4:10: invalid IPv4"), "{s:?}");
        assert!(s[3].starts_with("ha.cf:5:15:"), "{s:?}");
        assert!(s[4].starts_with("ha.cf:6:9: check kind 'foo'"), "{s:?}");
        assert!(s.iter().any(|m| m.contains("no heartbeat medium")));
    }

    #[test]
    fn seed_haresources_both_versions() {
        let f = Path::new("haresources");
        let text =
            "tho-web1 IPAddr::192.168.0.7/29/eth0:0   apache2\ntho-web1 MailTo::sip@tholdi.com\n";
        let (r, w) = parse_haresources(f, text).unwrap();
        assert_eq!(r.preferred, "tho-web1");
        assert_eq!(r.resources.len(), 3);
        assert_eq!(w.len(), 1, "IPAddr spelling warned");
        assert_eq!(
            r.resources[0],
            Resource::IpAddr {
                ip: Ipv4Addr::new(192, 168, 0, 7),
                prefix: Some(29),
                iface: Some("eth0".into()),
                label: Some("eth0:0".into())
            }
        );
        let text = "tho-web1 IPaddr::192.168.10.13/29/eth0:0 drbddisk::webstore \\\n   Filesystem::/dev/drbd0::/var/webstore:ext4 apache2\ntho-web1 MailTo::sip@tholdi.com::failover\n";
        let (r, w) = parse_haresources(f, text).unwrap();
        assert_eq!(w.len(), 1, "Filesystem typo warned: {w:?}");
        assert!(w[0].to_string().contains("haresources:1:"));
        assert_eq!(
            r.resources[1],
            Resource::RdbDisk {
                res: "webstore".into()
            }
        );
        assert_eq!(
            r.resources[2],
            Resource::Filesystem {
                dev: "/dev/drbd0".into(),
                dir: "/var/webstore".into(),
                fstype: "ext4".into(),
                options: None
            }
        );
        assert_eq!(
            r.resources[3],
            Resource::Script {
                name: "apache2".into(),
                args: vec![]
            }
        );
        assert_eq!(
            r.resources[4],
            Resource::MailTo {
                addr: "sip@tholdi.com".into(),
                subject: Some("failover".into())
            }
        );
    }

    #[test]
    fn haresources_errors() {
        let f = Path::new("haresources");
        let e =
            parse_haresources(f, "a IPaddr::300.1.1.1 Filesystem::/dev/x\nb foo\n").unwrap_err();
        let s: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        assert!(
            s[0].starts_with("haresources:1:3: IPaddr: invalid"),
            "{s:?}"
        );
        assert!(
            s[1].starts_with("haresources:1:21: usage: Filesystem"),
            "{s:?}"
        );
        assert!(
            s[2].starts_with("haresources:2:1: only one resource group"),
            "{s:?}"
        );
        assert!(parse_haresources(f, "# nothing\n").is_err());
        let (r, _) = parse_haresources(f, "a IPaddr::10.0.0.5/255.255.255.0 s::x::y\n").unwrap();
        assert!(matches!(
            r.resources[0],
            Resource::IpAddr {
                prefix: Some(24),
                iface: None,
                ..
            }
        ));
        assert_eq!(
            r.resources[1],
            Resource::Script {
                name: "s".into(),
                args: vec!["x".into(), "y".into()]
            }
        );
    }

    #[test]
    fn authkeys_rules() {
        let f = Path::new("authkeys");
        let (k, w) = parse_authkeys(f, "auth 3\n3 md5 azerty\n", 0o100600, false).unwrap();
        assert_eq!(k.active, 3);
        assert_eq!(k.active_key().unwrap().alg, AuthAlg::Md5);
        assert_eq!(k.active_key().unwrap().secret, b"azerty");
        assert_eq!(w.len(), 1);
        let e = parse_authkeys(f, "auth 3\n3 md5 azerty\n", 0o100644, false).unwrap_err();
        assert!(e.to_string().contains("mode 0644"), "{e}");
        assert!(parse_authkeys(f, "auth 3\n3 md5 azerty\n", 0o100640, false).is_err());
        assert!(parse_authkeys(f, "auth 3\n3 md5 azerty\n", 0o100400, false).is_ok());
        let e = parse_authkeys(f, "auth 1\n1 crc\n", 0o600, false).unwrap_err();
        assert!(e.to_string().contains("authkeys:2:3: crc"), "{e}");
        assert!(parse_authkeys(f, "auth 1\n1 crc\n", 0o600, true).is_ok());
        let e = parse_authkeys(f, "auth 2\n1 sha256 k\n", 0o600, false).unwrap_err();
        assert!(
            e.to_string().contains("authkeys:1: auth 2: no key 2"),
            "{e}"
        );
        let (k, w) = parse_authkeys(
            f,
            "auth 2\n1 sha1 old\n2 sha256 long secret\n",
            0o600,
            false,
        )
        .unwrap();
        assert_eq!(k.keys.len(), 2);
        assert_eq!(k.active_key().unwrap().secret, b"long secret");
        assert_eq!(w.len(), 1);
    }
}
