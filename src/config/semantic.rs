//! Meaning of the statement tree: section rules, warnings for accepted-but-ignored DRBD
//! keywords, the resource model with inheritance (common -> resource -> on), `resolve`
//! and `dump`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use super::error::{clip, ConfigError, Pos, Warning};
use super::keywords::{self, Section, Shape};
use super::model::*;
use super::syntax::{self, Arg, Block, Stmt};
use super::values::{self, *};

/// A value with the position of its statement.
#[derive(Debug, Clone, PartialEq)]
struct Located<T> {
    v: T,
    pos: Pos,
}

/// `device`, `disk`, `meta-disk` of one volume (or outside volume blocks).
#[derive(Debug, Clone, PartialEq, Default)]
struct VolFields {
    device: Option<Located<(PathBuf, Option<u32>)>>,
    disk: Option<Located<PathBuf>>,
    meta: Option<Located<MetaDisk>>,
}

/// Volume fields of a resource or an `on` section.
#[derive(Debug, Clone, PartialEq, Default)]
struct VolSet {
    direct: VolFields,
    volumes: BTreeMap<u32, VolFields>,
}

#[derive(Debug, Clone, PartialEq)]
struct Host {
    names: Vec<String>,
    pos: Pos,
    address: Option<SocketAddr>,
    vols: VolSet,
    frontend: Option<FrontendKind>,
    nbd_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
struct Resource {
    name: String,
    /// Position of the name token.
    pos: Pos,
    /// Index of the `resource` statement in `Config::top`.
    top_index: usize,
    vols: VolSet,
    hosts: Vec<Host>,
    frontend: Option<FrontendKind>,
    nbd_listen: Option<SocketAddr>,
    frontend_queues: Option<u32>,
    frontend_queue_depth: Option<u32>,
    nbd_busy_poll_us: Option<u32>,
    peer_busy_poll_us: Option<u32>,
}

/// A parsed and validated configuration (all files of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Top-level statements after include expansion, without `skip` sections.
    top: Vec<Stmt>,
    /// Index of `common` in `top`.
    common: Option<usize>,
    resources: Vec<Resource>,
    warnings: Vec<Warning>,
    /// `global { control-group NAME; }` (rdb extension).
    control_group: Option<String>,
}

/// The settings sections resolve to.
#[derive(Debug, Clone, Default)]
struct Settings {
    net: NetConfig,
    disk: DiskConfig,
    startup: StartupConfig,
    handlers: BTreeMap<String, String>,
}

fn warn(w: &mut Vec<Warning>, kw: &Arg) {
    w.push(Warning {
        pos: kw.pos.clone(),
        message: format!("keyword {} is accepted but has no effect in rdb", kw.text),
    });
}

enum Lookup {
    Implemented,
    Ignored(Shape),
    Unknown,
}

fn lookup(s: Section, kw: &str) -> Lookup {
    if keywords::implemented(s).contains(&kw) {
        Lookup::Implemented
    } else if let Some((_, shape)) = keywords::ignored(s).iter().find(|(k, _)| *k == kw) {
        Lookup::Ignored(*shape)
    } else {
        Lookup::Unknown
    }
}

/// Error for a keyword not valid in section `s`.
fn unknown(s: Section, st: &Stmt) -> ConfigError {
    let kw = &st.kw;
    if kw.text == "include" {
        return ConfigError::syntax(&kw.pos, "include is only allowed at top level");
    }
    let elsewhere = keywords::valid_elsewhere(s, &kw.text);
    if elsewhere.is_empty() {
        ConfigError::UnknownKeyword {
            pos: kw.pos.clone(),
            keyword: clip(&kw.text),
            section: s.name().to_string(),
            suggestion: keywords::suggest(s, &kw.text).map(str::to_string),
        }
    } else {
        ConfigError::syntax(
            &kw.pos,
            format!(
                "keyword '{}' is not valid in section {} (it belongs in: {})",
                kw.text,
                s.name(),
                elsewhere.join(", ")
            ),
        )
    }
}

/// Handles a statement that is not implemented in section `s`: an accepted DRBD keyword
/// (checked for shape, warned about when `w` is given) or an error.
fn other(s: Section, st: &Stmt, w: Option<&mut Vec<Warning>>) -> Result<(), ConfigError> {
    let Lookup::Ignored(shape) = lookup(s, st.name()) else {
        return Err(unknown(s, st));
    };
    match shape {
        Shape::One => {
            values::one(st)?;
        }
        Shape::Many => {
            values::args_range(st, 1, usize::MAX)?;
        }
        Shape::Bool => {
            values::boolean(st)?;
        }
        Shape::Flag => {
            values::args_exact(st, 0)?;
        }
        Shape::Block => {
            let (_, block) = section_head(st, 0, usize::MAX)?;
            match st.name() {
                // Plugin sections are proxy-plugin specific: any content.
                "plugin" => {}
                "proxy" => {
                    for inner in &block.stmts {
                        other(Section::Proxy, inner, None)?;
                    }
                }
                "floating" => {
                    let head = Stmt {
                        kw: st.kw.clone(),
                        args: st.args.clone(),
                        block: None,
                    };
                    values::address(&head, DEFAULT_PORT)?;
                    host_body(Section::Floating, block, &mut Vec::new())?;
                }
                "stacked-on-top-of" => {
                    values::args_exact(
                        &Stmt {
                            kw: st.kw.clone(),
                            args: st.args.clone(),
                            block: None,
                        },
                        1,
                    )?;
                    host_body(Section::Stacked, block, &mut Vec::new())?;
                }
                _ => {}
            }
        }
    }
    if let Some(w) = w {
        warn(w, &st.kw);
    }
    Ok(())
}

/// Checks `kw ARGS { ... }` with `lo..=hi` args and returns them with the block.
fn section_head(st: &Stmt, lo: usize, hi: usize) -> Result<(&[Arg], &Block), ConfigError> {
    let Some(block) = &st.block else {
        return Err(ConfigError::syntax(
            st.last_end(),
            format!("expected '{{' after '{}'", clip(&st.last_arg_text())),
        ));
    };
    if st.args.len() < lo {
        return Err(ConfigError::syntax(
            &st.kw.end,
            format!("missing name after '{}'", st.name()),
        ));
    }
    if st.args.len() > hi {
        let a = &st.args[hi];
        return Err(ConfigError::syntax(
            &a.pos,
            format!("unexpected '{}' before '{{'", clip(&a.text)),
        ));
    }
    Ok((&st.args, block))
}

impl Stmt {
    fn last_arg_text(&self) -> String {
        self.args.last().map_or(&self.kw.text, |a| &a.text).clone()
    }
}

/// Detects an option set twice in one section.
struct Seen {
    section: &'static str,
    seen: Vec<(String, Pos)>,
}

impl Seen {
    fn new(section: &'static str) -> Self {
        Seen {
            section,
            seen: Vec::new(),
        }
    }

    fn check(&mut self, name: &str, pos: &Pos) -> Result<(), ConfigError> {
        if let Some((_, first)) = self.seen.iter().find(|(n, _)| n == name) {
            return Err(ConfigError::Duplicate {
                pos: pos.clone(),
                what: format!("'{}' in section {}", name, self.section),
                first: first.clone(),
            });
        }
        self.seen.push((name.to_string(), pos.clone()));
        Ok(())
    }
}

// ---- settings sections -------------------------------------------------------------------

/// Digest names accepted for checksums and HMAC.
const DIGESTS: &[&str] = &[
    "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "crc32c", "crc32",
];

fn digest(st: &Stmt, hmac: bool) -> Result<String, ConfigError> {
    let a = values::one(st)?;
    let name = a.text.to_ascii_lowercase();
    let ok = DIGESTS.contains(&name.as_str()) && !(hmac && name.starts_with("crc"));
    if !ok {
        let list: Vec<&str> = DIGESTS
            .iter()
            .copied()
            .filter(|d| !(hmac && d.starts_with("crc")))
            .collect();
        return Err(ConfigError::invalid(
            &a.pos,
            st.name(),
            &a.text,
            format!("unsupported algorithm (rdb supports: {})", list.join(", ")),
        ));
    }
    Ok(name)
}

fn protocol(st: &Stmt) -> Result<Protocol, ConfigError> {
    let a = values::one(st)?;
    match a.text.as_str() {
        "A" | "a" => Ok(Protocol::A),
        "B" | "b" => Ok(Protocol::B),
        "C" | "c" => Ok(Protocol::C),
        _ => Err(ConfigError::invalid(
            &a.pos,
            "protocol",
            &a.text,
            "expected A, B or C",
        )),
    }
}

/// Rates: default unit KiB/s, 1 KiB/s .. 4 GiB/s.
fn rate(st: &Stmt, lo_bytes: u64) -> Result<u64, ConfigError> {
    values::size(values::one(st)?, st.name(), 1024, lo_bytes, 4 << 30)
}

fn apply_net(
    b: &Block,
    s: &mut Settings,
    mut w: Option<&mut Vec<Warning>>,
) -> Result<(), ConfigError> {
    let mut seen = Seen::new("net");
    let mut congestion_pos = None;
    let mut protocol_pos = None;
    for st in &b.stmts {
        seen.check(st.name(), &st.kw.pos)?;
        let kw = st.name();
        let n = &mut s.net;
        match kw {
            "protocol" => n.protocol = protocol(st)?,
            "cram-hmac-alg" => n.cram_hmac_alg = Some(digest(st, true)?),
            "shared-secret" => {
                let a = values::one(st)?;
                if a.text.len() > 64 {
                    return Err(ConfigError::invalid(
                        &a.pos,
                        kw,
                        &a.text,
                        "at most 64 bytes",
                    ));
                }
                n.shared_secret = Some(a.text.clone());
            }
            "ping-int" => n.ping_int_ms = values::time_ms(values::one(st)?, kw, 1000, 1, 120)?,
            "ping-timeout" => {
                n.ping_timeout_ms = values::time_ms(values::one(st)?, kw, 100, 1, 300)?
            }
            "timeout" => n.timeout_ms = values::time_ms(values::one(st)?, kw, 100, 1, 600)?,
            "connect-int" => {
                n.connect_int_ms = values::time_ms(values::one(st)?, kw, 1000, 1, 120)?
            }
            "ko-count" => n.ko_count = values::number_u32(values::one(st)?, kw, 0, 200)?,
            "sndbuf-size" => {
                n.sndbuf_size_bytes = values::size(values::one(st)?, kw, 1, 0, 10 << 20)?
            }
            "rcvbuf-size" => {
                n.rcvbuf_size_bytes = values::size(values::one(st)?, kw, 1, 0, 10 << 20)?
            }
            "max-buffers" => n.max_buffers = values::number_u32(values::one(st)?, kw, 32, 131_072)?,
            "max-epoch-size" => {
                n.max_epoch_size = values::number_u32(values::one(st)?, kw, 1, 20_000)?
            }
            "allow-two-primaries" => n.allow_two_primaries = values::boolean(st)?,
            "after-sb-0pri" => {
                n.after_sb_0pri = values::keyword(values::one(st)?, kw, AfterSb0Pri::ALL)?
            }
            "after-sb-1pri" => {
                n.after_sb_1pri = values::keyword(values::one(st)?, kw, AfterSb1Pri::ALL)?
            }
            "after-sb-2pri" => {
                n.after_sb_2pri = values::keyword(values::one(st)?, kw, AfterSb2Pri::ALL)?
            }
            "data-integrity-alg" => n.data_integrity_alg = Some(digest(st, false)?),
            "csums-alg" => n.csums_alg = Some(digest(st, false)?),
            "verify-alg" => n.verify_alg = Some(digest(st, false)?),
            "on-congestion" => {
                let a = values::one(st)?;
                n.on_congestion = values::keyword(a, kw, OnCongestion::ALL)?;
                congestion_pos = Some((a.pos.clone(), a.text.clone()));
            }
            // DRBD 8.4: sectors by default, at most 10 GiB.
            "congestion-fill" => {
                n.congestion_fill_bytes = values::size(values::one(st)?, kw, 512, 0, 10 << 30)?
            }
            "congestion-extents" => {
                n.congestion_extents = Some(values::number_u32(values::one(st)?, kw, 7, 6433)?)
            }
            _ => other(Section::Net, st, w.as_deref_mut())?,
        }
        if kw == "protocol" && s.net.protocol != Protocol::A {
            protocol_pos = Some(st.kw.pos.clone());
        }
    }
    // DRBD: "on-congestion policy requires protocol A".
    if s.net.on_congestion != OnCongestion::Block && s.net.protocol != Protocol::A {
        let (pos, value) = match (congestion_pos, protocol_pos) {
            (Some(c), _) => c,
            (None, Some(p)) => (p, "protocol".to_string()),
            (None, None) => return Ok(()),
        };
        return Err(ConfigError::invalid(
            &pos,
            "on-congestion",
            &value,
            "on-congestion pull-ahead/disconnect requires protocol A",
        ));
    }
    Ok(())
}

fn on_io_error(st: &Stmt) -> Result<OnIoError, ConfigError> {
    let a = values::one(st)?;
    if a.text == "pass-on" {
        return Ok(OnIoError::PassOn);
    }
    values::keyword(a, st.name(), OnIoError::ALL)
}

/// Options shared by `disk` (8.4) and `syncer` (8.3).
fn apply_resync_option(st: &Stmt, d: &mut DiskConfig) -> Result<bool, ConfigError> {
    let kw = st.name();
    match kw {
        "resync-rate" | "rate" => d.resync_rate_bytes_per_s = rate(st, 1024)?,
        "al-extents" => d.al_extents = values::number_u32(values::one(st)?, kw, 7, 6433)?,
        "c-plan-ahead" => d.c_plan_ahead_ms = values::time_ms(values::one(st)?, kw, 100, 0, 300)?,
        "c-fill-target" => {
            d.c_fill_target_bytes = values::size(values::one(st)?, kw, 512, 0, (1 << 20) * 512)?
        }
        "c-max-rate" => d.c_max_rate_bytes_per_s = rate(st, 250 * 1024)?,
        "c-min-rate" => d.c_min_rate_bytes_per_s = rate(st, 0)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn apply_disk(
    b: &Block,
    s: &mut Settings,
    mut w: Option<&mut Vec<Warning>>,
) -> Result<(), ConfigError> {
    let mut seen = Seen::new("disk");
    for st in &b.stmts {
        seen.check(st.name(), &st.kw.pos)?;
        let d = &mut s.disk;
        match st.name() {
            "on-io-error" => d.on_io_error = on_io_error(st)?,
            "io-engine" => {
                d.io_engine = values::keyword(values::one(st)?, st.name(), IoEngineKind::ALL)?
            }
            "direct-io" => d.direct_io = values::boolean(st)?,
            "al-updates" => d.al_updates = values::boolean(st)?,
            "disk-flushes" => d.disk_flushes = values::boolean(st)?,
            "no-disk-flushes" => {
                values::args_exact(st, 0)?;
                d.disk_flushes = false;
            }
            "rate" => return Err(unknown(Section::Disk, st)),
            _ => {
                if !apply_resync_option(st, d)? {
                    other(Section::Disk, st, w.as_deref_mut())?;
                }
            }
        }
    }
    Ok(())
}

fn apply_syncer(
    b: &Block,
    s: &mut Settings,
    mut w: Option<&mut Vec<Warning>>,
) -> Result<(), ConfigError> {
    let mut seen = Seen::new("syncer");
    for st in &b.stmts {
        seen.check(st.name(), &st.kw.pos)?;
        match st.name() {
            "verify-alg" => s.net.verify_alg = Some(digest(st, false)?),
            "csums-alg" => s.net.csums_alg = Some(digest(st, false)?),
            "resync-rate" => return Err(unknown(Section::Syncer, st)),
            _ => {
                if !apply_resync_option(st, &mut s.disk)? {
                    other(Section::Syncer, st, w.as_deref_mut())?;
                }
            }
        }
    }
    Ok(())
}

fn apply_startup(
    b: &Block,
    s: &mut Settings,
    mut w: Option<&mut Vec<Warning>>,
) -> Result<(), ConfigError> {
    let mut seen = Seen::new("startup");
    for st in &b.stmts {
        seen.check(st.name(), &st.kw.pos)?;
        let kw = st.name();
        let u = &mut s.startup;
        match kw {
            "wfc-timeout" => u.wfc_timeout_s = values::number(values::one(st)?, kw, 0, 300_000)?,
            "degr-wfc-timeout" => {
                u.degr_wfc_timeout_s = values::number(values::one(st)?, kw, 0, 300_000)?
            }
            "outdated-wfc-timeout" => {
                u.outdated_wfc_timeout_s = values::number(values::one(st)?, kw, 0, 300_000)?
            }
            "wait-after-sb" => u.wait_after_sb = values::boolean(st)?,
            "become-primary-on" => {
                u.become_primary_on = values::args_range(st, 1, usize::MAX)?
                    .iter()
                    .map(|a| a.text.clone())
                    .collect()
            }
            _ => other(Section::Startup, st, w.as_deref_mut())?,
        }
    }
    Ok(())
}

fn apply_handlers(
    b: &Block,
    s: &mut Settings,
    mut w: Option<&mut Vec<Warning>>,
) -> Result<(), ConfigError> {
    let mut seen = Seen::new("handlers");
    for st in &b.stmts {
        seen.check(st.name(), &st.kw.pos)?;
        if keywords::HANDLERS.contains(&st.name()) {
            let cmd = values::one(st)?;
            s.handlers.insert(st.name().to_string(), cmd.text.clone());
        } else {
            other(Section::Handlers, st, w.as_deref_mut())?;
        }
    }
    Ok(())
}

fn apply_options(b: &Block, mut w: Option<&mut Vec<Warning>>) -> Result<(), ConfigError> {
    let mut seen = Seen::new("options");
    for st in &b.stmts {
        seen.check(st.name(), &st.kw.pos)?;
        other(Section::Options, st, w.as_deref_mut())?;
    }
    Ok(())
}

/// Applies the settings sections of a `common` or `resource` body, in order.
fn apply_scope(
    stmts: &[Stmt],
    s: &mut Settings,
    mut w: Option<&mut Vec<Warning>>,
) -> Result<(), ConfigError> {
    for st in stmts {
        let Some(b) = &st.block else {
            if st.name() == "protocol" {
                s.net.protocol = protocol(st)?;
            }
            continue;
        };
        match st.name() {
            "net" => apply_net(b, s, w.as_deref_mut())?,
            "disk" => apply_disk(b, s, w.as_deref_mut())?,
            "syncer" => apply_syncer(b, s, w.as_deref_mut())?,
            "startup" => apply_startup(b, s, w.as_deref_mut())?,
            "handlers" => apply_handlers(b, s, w.as_deref_mut())?,
            "options" => apply_options(b, w.as_deref_mut())?,
            _ => {}
        }
    }
    Ok(())
}

/// Structure check of a `common` or `resource` settings statement: section keywords need a
/// block, appear once, and `protocol` (8.3) is a value.
fn settings_stmt(st: &Stmt, sections: &mut Seen) -> Result<(), ConfigError> {
    match st.name() {
        "protocol" => {
            sections.check("protocol", &st.kw.pos)?;
            protocol(st)?;
        }
        name => {
            section_head(st, 0, 0)?;
            sections.check(name, &st.kw.pos)?;
        }
    }
    Ok(())
}

// ---- hosts and volumes ------------------------------------------------------------------

/// Handles `device`, `disk`, `meta-disk`, `flexible-meta-disk`; false if `st` is another keyword.
fn vol_field(st: &Stmt, f: &mut VolFields, section: &str) -> Result<bool, ConfigError> {
    let pos = st.kw.pos.clone();
    let dup = |first: &Pos, what: &str| ConfigError::Duplicate {
        pos: pos.clone(),
        what: format!("'{what}' in section {section}"),
        first: first.clone(),
    };
    match st.name() {
        "device" => {
            if let Some(d) = &f.device {
                return Err(dup(&d.pos, "device"));
            }
            f.device = Some(Located {
                v: values::device(st)?,
                pos,
            });
        }
        "disk" => {
            if let Some(d) = &f.disk {
                return Err(dup(&d.pos, "disk"));
            }
            f.disk = Some(Located {
                v: values::disk(st)?,
                pos,
            });
        }
        "meta-disk" | "flexible-meta-disk" => {
            if let Some(d) = &f.meta {
                return Err(dup(&d.pos, "meta-disk"));
            }
            f.meta = Some(Located {
                v: values::meta_disk(st)?,
                pos,
            });
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn volume(st: &Stmt, w: &mut Vec<Warning>) -> Result<(u32, VolFields), ConfigError> {
    let (args, block) = section_head(st, 1, 1)?;
    let n = values::number_u32(&args[0], "volume", 0, 65_535)?;
    let mut f = VolFields::default();
    for inner in &block.stmts {
        if let ("disk", Some(b)) = (inner.name(), &inner.block) {
            // Per-volume disk options: DRBD 8.4 allows them, rdb has one set per resource.
            apply_disk(b, &mut Settings::default(), None)?;
            warn(w, &inner.kw);
            continue;
        }
        if !vol_field(inner, &mut f, "volume")? {
            other(Section::Volume, inner, Some(w))?;
        }
    }
    Ok((n, f))
}

fn add_volume(
    set: &mut VolSet,
    st: &Stmt,
    w: &mut Vec<Warning>,
    first_pos: &mut BTreeMap<u32, Pos>,
) -> Result<(), ConfigError> {
    let (n, f) = volume(st, w)?;
    if let Some(first) = first_pos.get(&n) {
        return Err(ConfigError::Duplicate {
            pos: st.kw.pos.clone(),
            what: format!("volume {n}"),
            first: first.clone(),
        });
    }
    first_pos.insert(n, st.kw.pos.clone());
    set.volumes.insert(n, f);
    Ok(())
}

/// Body of `on`, `floating` or `stacked-on-top-of`.
fn host_body(section: Section, block: &Block, w: &mut Vec<Warning>) -> Result<Host, ConfigError> {
    let mut host = Host {
        names: Vec::new(),
        pos: block.open.clone(),
        address: None,
        vols: VolSet::default(),
        frontend: None,
        nbd_listen: None,
    };
    let mut seen = Seen::new(section.name());
    let mut vol_pos = BTreeMap::new();
    for st in &block.stmts {
        let name = st.name();
        if !matches!(lookup(section, name), Lookup::Implemented) {
            other(section, st, Some(w))?;
            continue;
        }
        if vol_field(st, &mut host.vols.direct, section.name())? {
            continue;
        }
        match name {
            "address" => {
                seen.check(name, &st.kw.pos)?;
                host.address = Some(values::address(st, DEFAULT_PORT)?);
            }
            "volume" => add_volume(&mut host.vols, st, w, &mut vol_pos)?,
            "nbd-listen" => {
                seen.check(name, &st.kw.pos)?;
                host.nbd_listen = Some(values::address(st, DEFAULT_NBD_PORT)?);
            }
            "frontend" => {
                seen.check(name, &st.kw.pos)?;
                host.frontend = Some(values::keyword(values::one(st)?, name, FrontendKind::ALL)?);
            }
            _ => return Err(unknown(section, st)),
        }
    }
    Ok(host)
}

fn build_resource(
    st: &Stmt,
    top_index: usize,
    w: &mut Vec<Warning>,
) -> Result<Resource, ConfigError> {
    let (args, block) = section_head(st, 1, 1)?;
    let mut r = Resource {
        name: args[0].text.clone(),
        pos: args[0].pos.clone(),
        top_index,
        vols: VolSet::default(),
        hosts: Vec::new(),
        frontend: None,
        nbd_listen: None,
        frontend_queues: None,
        frontend_queue_depth: None,
        nbd_busy_poll_us: None,
        peer_busy_poll_us: None,
    };
    let mut sections = Seen::new("resource");
    let mut vol_pos = BTreeMap::new();
    let mut host_pos: Vec<(String, Pos)> = Vec::new();
    for inner in &block.stmts {
        let name = inner.name();
        if !matches!(lookup(Section::Resource, name), Lookup::Implemented) {
            other(Section::Resource, inner, Some(w))?;
            continue;
        }
        let is_section = inner.block.is_some();
        match name {
            "on" => {
                let (names, body) = section_head(inner, 1, usize::MAX)?;
                let mut host = host_body(Section::On, body, w)?;
                host.pos = inner.kw.pos.clone();
                for n in names {
                    if let Some((_, first)) = host_pos
                        .iter()
                        .find(|(h, _)| h.eq_ignore_ascii_case(&n.text))
                    {
                        return Err(ConfigError::Duplicate {
                            pos: n.pos.clone(),
                            what: format!("'on {}' section in resource '{}'", n.text, r.name),
                            first: first.clone(),
                        });
                    }
                    host_pos.push((n.text.clone(), n.pos.clone()));
                    host.names.push(n.text.clone());
                }
                r.hosts.push(host);
            }
            "volume" => add_volume(&mut r.vols, inner, w, &mut vol_pos)?,
            "disk" if is_section => settings_stmt(inner, &mut sections)?,
            "device" | "disk" | "meta-disk" | "flexible-meta-disk" => {
                vol_field(inner, &mut r.vols.direct, "resource")?;
            }
            "nbd-listen" => {
                sections.check(name, &inner.kw.pos)?;
                r.nbd_listen = Some(values::address(inner, DEFAULT_NBD_PORT)?);
            }
            "frontend-queues" => {
                sections.check(name, &inner.kw.pos)?;
                r.frontend_queues = Some(values::number_u32(values::one(inner)?, name, 1, 32)?);
            }
            "frontend-queue-depth" => {
                sections.check(name, &inner.kw.pos)?;
                r.frontend_queue_depth =
                    Some(values::number_u32(values::one(inner)?, name, 1, 4096)?);
            }
            "nbd-busy-poll" => {
                sections.check(name, &inner.kw.pos)?;
                r.nbd_busy_poll_us = Some(values::number_u32(values::one(inner)?, name, 0, 1000)?);
            }
            "peer-busy-poll" => {
                sections.check(name, &inner.kw.pos)?;
                r.peer_busy_poll_us = Some(values::number_u32(values::one(inner)?, name, 0, 1000)?);
            }
            "frontend" => {
                sections.check(name, &inner.kw.pos)?;
                r.frontend = Some(values::keyword(
                    values::one(inner)?,
                    name,
                    FrontendKind::ALL,
                )?);
            }
            _ => settings_stmt(inner, &mut sections)?,
        }
    }
    apply_scope(&block.stmts, &mut Settings::default(), Some(w))?;
    Ok(r)
}

/// Checks `global`; returns its `control-group`.
fn check_global(st: &Stmt, w: &mut Vec<Warning>) -> Result<Option<String>, ConfigError> {
    let (_, block) = section_head(st, 0, 0)?;
    let mut seen = Seen::new("global");
    let mut control_group = None;
    for inner in &block.stmts {
        seen.check(inner.name(), &inner.kw.pos)?;
        if inner.name() == "control-group" {
            let a = values::one(inner)?;
            // A POSIX portable group name (or a numeric gid), as useradd accepts it.
            let valid = !a.text.is_empty()
                && a.text.len() <= 32
                && !a.text.starts_with('-')
                && a.text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(ConfigError::invalid(
                    &a.pos,
                    "control-group",
                    &a.text,
                    "expected a group name (letters, digits, '_', '-', '.'; at most 32) or a gid",
                ));
            }
            control_group = Some(a.text.clone());
        } else if inner.name() == "usage-count" {
            let a = values::one(inner)?;
            match a.text.as_str() {
                "no" => {}
                "yes" | "ask" => w.push(Warning {
                    pos: a.pos.clone(),
                    message: format!(
                        "usage-count {} has no effect: rdb never reports usage",
                        a.text
                    ),
                }),
                _ => {
                    return Err(ConfigError::invalid(
                        &a.pos,
                        "usage-count",
                        &a.text,
                        "expected yes, no or ask",
                    ))
                }
            }
        } else {
            other(Section::Global, inner, Some(w))?;
        }
    }
    Ok(control_group)
}

fn check_common(st: &Stmt, w: &mut Vec<Warning>) -> Result<(), ConfigError> {
    let (_, block) = section_head(st, 0, 0)?;
    let mut sections = Seen::new("common");
    for inner in &block.stmts {
        match lookup(Section::Common, inner.name()) {
            Lookup::Implemented => settings_stmt(inner, &mut sections)?,
            _ => other(Section::Common, inner, Some(w))?,
        }
    }
    apply_scope(&block.stmts, &mut Settings::default(), Some(w))
}

/// Builds the configuration from the expanded top-level statements.
pub(crate) fn build(stmts: Vec<Stmt>) -> Result<Config, ConfigError> {
    let mut w = Vec::new();
    let mut cfg = Config {
        top: Vec::with_capacity(stmts.len()),
        common: None,
        resources: Vec::new(),
        warnings: Vec::new(),
        control_group: None,
    };
    let mut once = Seen::new("top level");
    for st in stmts {
        match st.name() {
            "global" => {
                once.check("global", &st.kw.pos)?;
                cfg.control_group = check_global(&st, &mut w)?;
            }
            "common" => {
                once.check("common", &st.kw.pos)?;
                check_common(&st, &mut w)?;
                cfg.common = Some(cfg.top.len());
            }
            "resource" => {
                let r = build_resource(&st, cfg.top.len(), &mut w)?;
                if let Some(first) = cfg.resources.iter().find(|o| o.name == r.name) {
                    return Err(ConfigError::Duplicate {
                        pos: r.pos.clone(),
                        what: format!("resource '{}'", r.name),
                        first: first.pos.clone(),
                    });
                }
                cfg.resources.push(r);
            }
            "skip" => {
                // `skip [anything] { ... }` comments out a section, as in drbdadm.
                section_head(&st, 0, usize::MAX)?;
                continue;
            }
            _ => return Err(unknown(Section::Top, &st)),
        }
        cfg.top.push(st);
    }
    cfg.warnings = w;
    Ok(cfg)
}

// ---- resolve and dump -------------------------------------------------------------------

impl Config {
    /// Keywords accepted without effect, in the order found.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Names of all resources, in file order.
    pub fn resource_names(&self) -> Vec<String> {
        self.resources.iter().map(|r| r.name.clone()).collect()
    }

    fn resource(&self, name: &str) -> Result<&Resource, ConfigError> {
        self.resources
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| ConfigError::NoSuchResource {
                name: name.to_string(),
                known: self.resource_names(),
            })
    }

    fn body(&self, index: usize) -> &[Stmt] {
        self.top
            .get(index)
            .and_then(|s| s.block.as_ref())
            .map_or(&[], |b| b.stmts.as_slice())
    }

    /// The effective configuration of `resource` on host `node` (matched case-insensitively
    /// against the `on` sections): common, then resource, then `on` values.
    pub fn resolve(&self, resource: &str, node: &str) -> Result<ResourceConfig, ConfigError> {
        let r = self.resource(resource)?;
        let Some(host) = r
            .hosts
            .iter()
            .find(|h| h.names.iter().any(|n| n.eq_ignore_ascii_case(node)))
        else {
            return Err(ConfigError::NoSuchHost {
                pos: r.pos.clone(),
                resource: r.name.clone(),
                node: node.to_string(),
                known: r
                    .hosts
                    .iter()
                    .flat_map(|h| h.names.iter().cloned())
                    .collect(),
            });
        };
        let mut s = Settings::default();
        if let Some(c) = self.common {
            apply_scope(self.body(c), &mut s, None)?;
        }
        apply_scope(self.body(r.top_index), &mut s, None)?;

        let missing = |h: &Host, what: String| ConfigError::Missing {
            pos: h.pos.clone(),
            resource: r.name.clone(),
            node: h.names.first().cloned().unwrap_or_default(),
            what,
        };
        let this_name = host
            .names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(node))
            .cloned()
            .unwrap_or_else(|| node.to_string());
        let Some(address) = host.address else {
            return Err(missing(host, "missing 'address'".to_string()));
        };
        let mut peers = Vec::new();
        for h in r.hosts.iter().filter(|h| !std::ptr::eq(*h, host)) {
            let Some(a) = h.address else {
                return Err(missing(h, "missing 'address'".to_string()));
            };
            if a == address {
                return Err(missing(
                    h,
                    format!("address {a} is the same as host '{this_name}'"),
                ));
            }
            peers.push(HostConfig {
                name: h.names.first().cloned().unwrap_or_default(),
                address: a,
            });
        }

        let numbers: BTreeSet<u32> = r
            .vols
            .volumes
            .keys()
            .chain(host.vols.volumes.keys())
            .copied()
            .collect();
        let numbers = if numbers.is_empty() {
            BTreeSet::from([0])
        } else {
            numbers
        };
        let empty = VolFields::default();
        let mut volumes: Vec<VolumeConfig> = Vec::new();
        let mut used: Vec<(PathBuf, Pos, &'static str)> = Vec::new();
        for n in numbers {
            let layers = [
                host.vols.volumes.get(&n).unwrap_or(&empty),
                r.vols.volumes.get(&n).unwrap_or(&empty),
                &host.vols.direct,
                &r.vols.direct,
            ];
            let device = layers.iter().find_map(|l| l.device.as_ref());
            let disk = layers.iter().find_map(|l| l.disk.as_ref());
            let meta = layers.iter().find_map(|l| l.meta.as_ref());
            let Some(device) = device else {
                return Err(missing(host, format!("missing 'device' for volume {n}")));
            };
            let Some(disk) = disk else {
                return Err(missing(host, format!("missing 'disk' for volume {n}")));
            };
            for (path, pos, what) in [
                (&device.v.0, &device.pos, "device"),
                (&disk.v, &disk.pos, "disk"),
            ] {
                if let Some((_, first, _)) = used.iter().find(|(p, _, k)| p == path && *k == what) {
                    return Err(ConfigError::Duplicate {
                        pos: pos.clone(),
                        what: format!(
                            "{what} '{}' used by two volumes (volume {n})",
                            path.display()
                        ),
                        first: first.clone(),
                    });
                }
                used.push((path.clone(), pos.clone(), what));
            }
            volumes.push(VolumeConfig {
                number: n,
                device: device.v.0.clone(),
                minor: device.v.1,
                disk: disk.v.clone(),
                meta_disk: meta.map_or(MetaDisk::Internal, |m| m.v.clone()),
            });
        }
        Ok(ResourceConfig {
            name: r.name.clone(),
            node: node.to_string(),
            volumes,
            this_host: HostConfig {
                name: this_name,
                address,
            },
            peers,
            net: s.net,
            disk: s.disk,
            startup: s.startup,
            handlers: s.handlers,
            frontend: host.frontend.or(r.frontend).unwrap_or_default(),
            nbd_listen: host.nbd_listen.or(r.nbd_listen),
            frontend_queues: r.frontend_queues,
            frontend_queue_depth: r.frontend_queue_depth,
            nbd_busy_poll_us: r.nbd_busy_poll_us,
            peer_busy_poll_us: r.peer_busy_poll_us,
        })
    }

    /// The group whose members may change roles and states through the control socket
    /// (`global { control-group NAME; }`); root always may.
    pub fn control_group(&self) -> Option<&str> {
        self.control_group.as_deref()
    }

    /// Normalized DRBD-syntax text of the configuration (includes expanded, comments
    /// dropped, 4-space indentation): everything, or one resource.
    pub fn dump(&self, resource: Option<&str>) -> Result<String, ConfigError> {
        let mut out = String::new();
        match resource {
            Some(name) => {
                let r = self.resource(name)?;
                self.dump_resource(&mut out, r);
            }
            None => {
                for (i, st) in self.top.iter().enumerate() {
                    if let Some(r) = self.resources.iter().find(|r| r.top_index == i) {
                        self.dump_resource(&mut out, r);
                    } else {
                        syntax::write_stmt(&mut out, st, 0);
                        out.push('\n');
                    }
                }
            }
        }
        Ok(out)
    }

    fn dump_resource(&self, out: &mut String, r: &Resource) {
        out.push_str(&format!("# resource {} defined at {}\n", r.name, r.pos));
        if let Some(st) = self.top.get(r.top_index) {
            syntax::write_stmt(out, st, 0);
        }
        out.push('\n');
    }
}
