//! Typed values of options: numbers, sizes with DRBD's units, times, booleans, addresses,
//! devices, meta-disks and keyword enums. Every error points at the offending token.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use super::error::ConfigError;
use super::model::MetaDisk;
use super::syntax::{Arg, Stmt};

/// DRBD's default replication port when an address has none.
pub const DEFAULT_PORT: u16 = 7788;
/// Default port of `nbd-listen` (the IANA NBD port).
pub const DEFAULT_NBD_PORT: u16 = 10809;
/// Highest minor number (DRBD's limit, 2^20 - 1).
pub const MAX_MINOR: u32 = (1 << 20) - 1;

/// Checks the statement is `kw a1 .. an;` and returns the arguments.
pub(crate) fn args_exact(st: &Stmt, n: usize) -> Result<&[Arg], ConfigError> {
    no_block(st)?;
    if st.args.len() < n {
        return Err(ConfigError::syntax(
            st.last_end(),
            format!("missing value for '{}'", st.name()),
        ));
    }
    if st.args.len() > n {
        return Err(extra_arg(st, n));
    }
    Ok(&st.args)
}

/// Checks the statement is `kw a1 .. ak;` with `lo <= k <= hi`.
pub(crate) fn args_range(st: &Stmt, lo: usize, hi: usize) -> Result<&[Arg], ConfigError> {
    no_block(st)?;
    if st.args.len() < lo {
        return Err(ConfigError::syntax(
            st.last_end(),
            format!("missing value for '{}'", st.name()),
        ));
    }
    if st.args.len() > hi {
        return Err(extra_arg(st, hi));
    }
    Ok(&st.args)
}

/// Error for an argument beyond the `n` expected: most often a missing `;`.
pub(crate) fn extra_arg(st: &Stmt, n: usize) -> ConfigError {
    let last = if n == 0 { &st.kw } else { &st.args[n - 1] };
    ConfigError::syntax(
        &last.end,
        format!(
            "missing ';' after '{}' (found '{}')",
            super::error::clip(&last.text),
            super::error::clip(&st.args[n].text)
        ),
    )
}

fn no_block(st: &Stmt) -> Result<(), ConfigError> {
    match &st.block {
        Some(b) => Err(ConfigError::syntax(
            &b.open,
            format!("'{}' takes a value, not a section", st.name()),
        )),
        None => Ok(()),
    }
}

/// The one value of `kw VALUE;`.
pub(crate) fn one(st: &Stmt) -> Result<&Arg, ConfigError> {
    Ok(&args_exact(st, 1)?[0])
}

/// Decimal unsigned number within `lo..=hi`.
pub(crate) fn number(a: &Arg, kw: &str, lo: u64, hi: u64) -> Result<u64, ConfigError> {
    let v = digits(a, kw)?;
    check_range(a, kw, v, lo, hi, "")
}

fn digits(a: &Arg, kw: &str) -> Result<u64, ConfigError> {
    if a.text.is_empty() || !a.text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::invalid(
            &a.pos,
            kw,
            &a.text,
            "expected a number",
        ));
    }
    a.text
        .parse::<u64>()
        .map_err(|_| ConfigError::invalid(&a.pos, kw, &a.text, "number too large"))
}

fn check_range(
    a: &Arg,
    kw: &str,
    v: u64,
    lo: u64,
    hi: u64,
    unit: &str,
) -> Result<u64, ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::invalid(
            &a.pos,
            kw,
            &a.text,
            format!("must be between {lo}{unit} and {hi}{unit}"),
        ));
    }
    Ok(v)
}

/// Number that fits a u32, within `lo..=hi`.
pub(crate) fn number_u32(a: &Arg, kw: &str, lo: u32, hi: u32) -> Result<u32, ConfigError> {
    let v = number(a, kw, u64::from(lo), u64::from(hi))?;
    // `v <= hi`, a u32, was checked just above.
    Ok(u32::try_from(v).unwrap_or(hi))
}

/// Size with optional suffix K, M, G, T (powers of 1024) or s (512-byte sectors); without a
/// suffix the value is in `default_unit_bytes`. Result in bytes, within `lo..=hi` bytes.
pub(crate) fn size(
    a: &Arg,
    kw: &str,
    default_unit_bytes: u64,
    lo: u64,
    hi: u64,
) -> Result<u64, ConfigError> {
    let t = a.text.as_str();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let bad = |reason: &str| ConfigError::invalid(&a.pos, kw, t, reason);
    if num.is_empty() {
        return Err(bad(
            "expected a size: a number with optional unit K, M, G, T or s",
        ));
    }
    let mult: u64 = match suffix {
        "" => default_unit_bytes,
        "s" | "S" => 512,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        _ => return Err(bad("unknown unit (expected K, M, G, T or s)")),
    };
    let n: u64 = num.parse().map_err(|_| bad("number too large"))?;
    let v = n.checked_mul(mult).ok_or_else(|| bad("size too large"))?;
    if v < lo || v > hi {
        return Err(bad(&format!("must be between {} and {} bytes", lo, hi)));
    }
    Ok(v)
}

/// Time as a plain number in `unit_ms` (DRBD: seconds or tenths of a second), in ms.
pub(crate) fn time_ms(
    a: &Arg,
    kw: &str,
    unit_ms: u64,
    lo: u64,
    hi: u64,
) -> Result<u64, ConfigError> {
    Ok(number(a, kw, lo, hi)? * unit_ms)
}

/// `kw;` (= yes) or `kw yes|no;`.
pub(crate) fn boolean(st: &Stmt) -> Result<bool, ConfigError> {
    match args_range(st, 0, 1)? {
        [] => Ok(true),
        [a] => match a.text.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => Err(ConfigError::invalid(
                &a.pos,
                st.name(),
                &a.text,
                "expected yes or no",
            )),
        },
        _ => Err(extra_arg(st, 1)),
    }
}

/// One of a keyword enum's spellings.
pub(crate) fn keyword<T: Copy>(a: &Arg, kw: &str, all: &[(&str, T)]) -> Result<T, ConfigError> {
    all.iter()
        .find(|(s, _)| *s == a.text)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|(s, _)| *s).collect();
            ConfigError::invalid(
                &a.pos,
                kw,
                &a.text,
                format!("expected one of: {}", names.join(", ")),
            )
        })
}

/// `[ipv4|ipv6] ADDR[:PORT]` (IPv6 in brackets); missing port = `default_port`.
pub(crate) fn address(st: &Stmt, default_port: u16) -> Result<SocketAddr, ConfigError> {
    let args = args_range(st, 1, 2)?;
    let kw = st.name();
    let (family, a) = match args {
        [a] => (None, a),
        [f, a] => {
            match f.text.as_str() {
                "ipv4" | "ipv6" => {}
                "ssocks" | "sdp" | "sci" => {
                    return Err(ConfigError::invalid(
                        &f.pos,
                        kw,
                        &f.text,
                        "address family not supported by rdb (use ipv4 or ipv6)",
                    ))
                }
                _ => {
                    return Err(ConfigError::invalid(
                        &f.pos,
                        kw,
                        &f.text,
                        "expected an address family (ipv4, ipv6) or an address",
                    ))
                }
            }
            (Some(f.text.as_str()), a)
        }
        _ => return Err(extra_arg(st, 2)),
    };
    let t = a.text.as_str();
    let bad = |reason: &str| ConfigError::invalid(&a.pos, kw, t, reason);
    let (ip, port): (IpAddr, &str) = if let Some(rest) = t.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("missing ']' after the IPv6 address"))?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| bad("invalid IPv6 address"))?;
        let port = match after {
            "" => "",
            p => p
                .strip_prefix(':')
                .ok_or_else(|| bad("expected ':PORT' after ']'"))?,
        };
        (IpAddr::V6(ip), port)
    } else {
        if family == Some("ipv6") {
            return Err(bad("IPv6 addresses are written in brackets: [ADDR]:PORT"));
        }
        let (host, port) = t.split_once(':').unwrap_or((t, ""));
        let ip: Ipv4Addr = host.parse().map_err(|_| {
            bad("invalid IPv4 address (DRBD takes IP addresses, not host names; IPv6 needs 'ipv6 [ADDR]:PORT')")
        })?;
        (IpAddr::V4(ip), port)
    };
    if family == Some("ipv4") && ip.is_ipv6() {
        return Err(bad("an IPv6 address after 'ipv4'"));
    }
    let port = if port.is_empty() && !t.ends_with(':') {
        default_port
    } else {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("invalid port (expected 1 to 65535)")),
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// `device PATH;` `device minor N;` `device PATH minor N;` -> (path, minor).
pub(crate) fn device(st: &Stmt) -> Result<(PathBuf, Option<u32>), ConfigError> {
    let args = args_range(st, 1, 3)?;
    let minor_of = |a: &Arg| number_u32(a, "device minor", 0, MAX_MINOR);
    match args {
        [m, n] if m.text == "minor" && !m.quoted => {
            let minor = minor_of(n)?;
            Ok((PathBuf::from(format!("/dev/rdb{minor}")), Some(minor)))
        }
        [m] if m.text == "minor" && !m.quoted => Err(ConfigError::syntax(
            &m.end,
            "missing minor number after 'minor'",
        )),
        [p] => {
            let path = abs_path(p, "device")?;
            Ok((path, minor_from_path(&p.text)))
        }
        [p, m, n] if m.text == "minor" => {
            let path = abs_path(p, "device")?;
            Ok((path, Some(minor_of(n)?)))
        }
        [_, m] if m.text == "minor" => Err(ConfigError::syntax(
            &m.end,
            "missing minor number after 'minor'",
        )),
        [_, x, ..] => Err(ConfigError::syntax(
            &args[0].end,
            format!(
                "missing ';' after '{}' (found '{}'; expected 'minor N')",
                args[0].text,
                super::error::clip(&x.text)
            ),
        )),
        [] => Err(ConfigError::syntax(
            st.last_end(),
            "missing value for 'device'",
        )),
    }
}

/// Minor number in a `/dev/drbdN` or `/dev/rdbN` path.
fn minor_from_path(p: &str) -> Option<u32> {
    let n = p
        .strip_prefix("/dev/drbd")
        .or_else(|| p.strip_prefix("/dev/rdb"))?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|&m| m <= MAX_MINOR)
}

/// An absolute path.
pub(crate) fn abs_path(a: &Arg, kw: &str) -> Result<PathBuf, ConfigError> {
    if !a.text.starts_with('/') {
        return Err(ConfigError::invalid(
            &a.pos,
            kw,
            &a.text,
            "expected an absolute path",
        ));
    }
    Ok(PathBuf::from(&a.text))
}

/// `disk PATH;`.
pub(crate) fn disk(st: &Stmt) -> Result<PathBuf, ConfigError> {
    let a = one(st)?;
    if a.text == "none" && !a.quoted {
        return Err(ConfigError::invalid(
            &a.pos,
            "disk",
            &a.text,
            "diskless nodes are not supported by rdb",
        ));
    }
    abs_path(a, "disk")
}

/// `meta-disk internal | PATH [IDX] | PATH [[IDX]]` or `flexible-meta-disk internal | PATH`.
pub(crate) fn meta_disk(st: &Stmt) -> Result<MetaDisk, ConfigError> {
    let kw = st.name();
    let flexible = kw == "flexible-meta-disk";
    let args = if flexible {
        args_exact(st, 1)?
    } else {
        args_range(st, 1, 2)?
    };
    let first = &args[0];
    if first.text == "internal" && !first.quoted {
        if args.len() > 1 {
            return Err(extra_arg(st, 1));
        }
        return Ok(MetaDisk::Internal);
    }
    let index_of = |a: &Arg, text: &str| -> Result<u32, ConfigError> {
        let t = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConfigError::invalid(
                &a.pos,
                kw,
                &a.text,
                "expected a meta-data index: N or [N]",
            ));
        }
        t.parse::<u32>()
            .map_err(|_| ConfigError::invalid(&a.pos, kw, &a.text, "index too large"))
    };
    // `PATH[IDX]` in one token.
    let (path_text, inline_idx) = match first.text.rfind('[') {
        Some(i) if first.text.ends_with(']') && i > 0 => {
            (&first.text[..i], Some(index_of(first, &first.text[i..])?))
        }
        _ => (first.text.as_str(), None),
    };
    if !path_text.starts_with('/') {
        return Err(ConfigError::invalid(
            &first.pos,
            kw,
            &first.text,
            "expected 'internal' or an absolute path",
        ));
    }
    let index = match (inline_idx, args.get(1)) {
        (Some(_), Some(_)) => return Err(extra_arg(st, 1)),
        (i, None) => i,
        (None, Some(a)) => Some(index_of(a, &a.text)?),
    };
    Ok(MetaDisk::External {
        path: PathBuf::from(path_text),
        index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::syntax::parse;
    use std::path::Path;
    use std::sync::Arc;

    fn st(text: &str) -> Stmt {
        parse(text, Arc::from(Path::new("v.conf")))
            .unwrap()
            .remove(0)
    }

    #[test]
    fn sizes() {
        let a = |t: &str| st(&format!("k {t};")).args[0].clone();
        assert_eq!(
            size(&a("500M"), "rate", 1024, 0, u64::MAX).unwrap(),
            500 << 20
        );
        assert_eq!(
            size(&a("10240"), "rate", 1024, 0, u64::MAX).unwrap(),
            10 << 20
        );
        assert_eq!(
            size(&a("512k"), "sndbuf", 1, 0, u64::MAX).unwrap(),
            512 << 10
        );
        assert_eq!(size(&a("2T"), "x", 1, 0, u64::MAX).unwrap(), 2 << 40);
        assert_eq!(size(&a("100s"), "x", 1, 0, u64::MAX).unwrap(), 51200);
        assert!(size(&a("5X"), "x", 1, 0, u64::MAX).is_err());
        assert!(size(&a("99999999999999999999"), "x", 1, 0, u64::MAX).is_err());
        assert!(size(&a("99999999999T"), "x", 1, 0, u64::MAX).is_err());
    }

    #[test]
    fn addresses() {
        let ad = |t: &str| address(&st(t), DEFAULT_PORT);
        assert_eq!(
            ad("address 127.0.0.1:7788;").unwrap(),
            "127.0.0.1:7788".parse().unwrap()
        );
        assert_eq!(
            ad("address ipv4 10.0.0.1:7000;").unwrap(),
            "10.0.0.1:7000".parse().unwrap()
        );
        assert_eq!(
            ad("address ipv6 [::1]:7789;").unwrap(),
            "[::1]:7789".parse().unwrap()
        );
        assert_eq!(
            ad("address ipv6 [fd00::2];").unwrap(),
            "[fd00::2]:7788".parse().unwrap()
        );
        assert_eq!(
            ad("address 10.0.0.1;").unwrap(),
            "10.0.0.1:7788".parse().unwrap()
        );
        assert!(ad("address host.example:7788;").is_err());
        assert!(ad("address 10.0.0.1:0;").is_err());
        assert!(ad("address 10.0.0.1:;").is_err());
        assert!(ad("address 10.0.0.1:70000;").is_err());
        assert!(ad("address ipv4 [::1]:1;").is_err());
        assert!(ad("address ipv6 ::1;").is_err());
        assert!(ad("address sdp 10.0.0.1:1;").is_err());
    }

    #[test]
    fn devices_and_meta() {
        assert_eq!(
            device(&st("device /dev/drbd0;")).unwrap(),
            ("/dev/drbd0".into(), Some(0))
        );
        assert_eq!(
            device(&st("device minor 3;")).unwrap(),
            ("/dev/rdb3".into(), Some(3))
        );
        assert_eq!(
            device(&st("device /dev/x minor 4;")).unwrap(),
            ("/dev/x".into(), Some(4))
        );
        assert_eq!(
            device(&st("device /dev/x;")).unwrap(),
            ("/dev/x".into(), None)
        );
        assert!(device(&st("device minor;")).is_err());
        assert!(device(&st("device drbd0;")).is_err());
        assert_eq!(
            meta_disk(&st("meta-disk internal;")).unwrap(),
            MetaDisk::Internal
        );
        let ext = |p: &str, i| MetaDisk::External {
            path: p.into(),
            index: i,
        };
        assert_eq!(
            meta_disk(&st("meta-disk /dev/sdc1 [2];")).unwrap(),
            ext("/dev/sdc1", Some(2))
        );
        assert_eq!(
            meta_disk(&st("meta-disk /dev/sdc1[3];")).unwrap(),
            ext("/dev/sdc1", Some(3))
        );
        assert_eq!(
            meta_disk(&st("meta-disk /dev/sdc1 4;")).unwrap(),
            ext("/dev/sdc1", Some(4))
        );
        assert_eq!(meta_disk(&st("meta-disk /m;")).unwrap(), ext("/m", None));
        assert_eq!(
            meta_disk(&st("flexible-meta-disk /m;")).unwrap(),
            ext("/m", None)
        );
        assert!(meta_disk(&st("flexible-meta-disk /m 1;")).is_err());
        assert!(meta_disk(&st("meta-disk /m [x];")).is_err());
    }
}
