//! The daemon's side of local disk errors: `disk { on-io-error }` mapped onto the
//! volume, the `local-io-error` handler, and the test-only fault injection of the
//! data area (`RDB_FAULT_SPEC`).
//!
//! `RDB_FAULT_SPEC` is for tests only: when it is set in rdbd's environment (rdbd
//! inherits `rdbadm up`'s), every resource this daemon brings up has its data area
//! wrapped in [`crate::storage::fault::FaultInjector`]. Clauses, `;`-separated:
//!
//! - `after=N[:OPS]`: the first N requests of kinds OPS pass, every later one fails;
//! - `range=START-END[:OPS]`: requests of kinds OPS overlapping bytes [START, END) fail;
//! - `rate=P[:OPS]`: requests of kinds OPS fail with probability P (seeded);
//! - `seed=S`: the seed of `rate` (default 1).
//!
//! OPS is a set of letters: `r` read, `w` write (incl. discard and write-zeroes),
//! `f` flush; default `rw`. Meta-data I/O does not go through the wrapper.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::volume::{IoErrorHook, IoErrorPolicy};
use crate::storage::fault::{FaultInjector, Ops};
use crate::storage::BlockIo;

/// The environment variable of the test-only fault injection.
pub const FAULT_SPEC_ENV: &str = "RDB_FAULT_SPEC";

/// Longest the `local-io-error` handler may run.
const HANDLER_TIMEOUT_S: u64 = 60;

/// One fault of a spec.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Fail every request of `ops` after the first `n`.
    After(u64, Ops),
    /// Fail requests of `ops` overlapping `[start, end)`.
    Range(u64, u64, Ops),
    /// Fail requests of `ops` with this probability.
    Rate(f64, Ops),
}

/// A parsed `RDB_FAULT_SPEC`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// The faults.
    pub faults: Vec<Fault>,
    /// Seed of the random rate.
    pub seed: u64,
}

fn parse_ops(s: Option<&str>) -> Result<Ops, String> {
    let Some(s) = s else {
        return Ok(Ops {
            read: true,
            write: true,
            flush: false,
        });
    };
    let mut ops = Ops {
        read: false,
        write: false,
        flush: false,
    };
    for c in s.chars() {
        match c {
            'r' => ops.read = true,
            'w' => ops.write = true,
            'f' => ops.flush = true,
            other => return Err(format!("unknown operation {other:?} (r, w, f)")),
        }
    }
    Ok(ops)
}

fn num(s: &str, what: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{what}: {s:?} is not a number"))
}

/// Parses a spec (see the module documentation).
pub fn parse_fault_spec(spec: &str) -> Result<FaultSpec, String> {
    let mut out = FaultSpec {
        faults: Vec::new(),
        seed: 1,
    };
    for clause in spec.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let (key, value) = clause
            .split_once('=')
            .ok_or_else(|| format!("{clause:?}: expected KEY=VALUE"))?;
        let (arg, ops) = match value.split_once(':') {
            Some((a, o)) => (a, Some(o)),
            None => (value, None),
        };
        let ops = parse_ops(ops).map_err(|e| format!("{clause:?}: {e}"))?;
        match key.trim() {
            "after" => out.faults.push(Fault::After(num(arg, clause)?, ops)),
            "range" => {
                let (a, b) = arg
                    .split_once('-')
                    .ok_or_else(|| format!("{clause:?}: expected range=START-END"))?;
                let (a, b) = (num(a, clause)?, num(b, clause)?);
                if a > b {
                    return Err(format!("{clause:?}: start after end"));
                }
                out.faults.push(Fault::Range(a, b, ops));
            }
            "rate" => {
                let p: f64 = arg
                    .trim()
                    .parse()
                    .map_err(|_| format!("{clause:?}: {arg:?} is not a probability"))?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("{clause:?}: probability outside 0..1"));
                }
                out.faults.push(Fault::Rate(p, ops));
            }
            "seed" => out.seed = num(arg, clause)?,
            other => return Err(format!("{clause:?}: unknown key {other:?}")),
        }
    }
    Ok(out)
}

/// Wraps `storage` in a fault injector when `RDB_FAULT_SPEC` is set (tests only).
pub fn wrap_for_tests(
    resource: &str,
    storage: Arc<dyn BlockIo>,
) -> Result<Arc<dyn BlockIo>, String> {
    let Ok(spec) = std::env::var(FAULT_SPEC_ENV) else {
        return Ok(storage);
    };
    let spec = parse_fault_spec(&spec).map_err(|e| format!("{FAULT_SPEC_ENV}: {e}"))?;
    let injector = FaultInjector::new(storage, spec.seed);
    let h = injector.handle();
    // No power cuts here: no write journal to keep.
    h.set_track_writes(false);
    for f in &spec.faults {
        match *f {
            Fault::After(n, ops) => h.fail_after(n, ops),
            Fault::Range(a, b, ops) => h.fail_range(a, b, ops),
            Fault::Rate(p, ops) => h.set_rate(p, ops),
        }
    }
    tracing::warn!(
        resource,
        "{FAULT_SPEC_ENV} set: fault injection on the data area (tests only): {spec:?}"
    );
    Ok(Arc::new(injector))
}

/// The volume policy of `disk { on-io-error }`.
pub fn policy(on_io_error: crate::config::OnIoError) -> IoErrorPolicy {
    use crate::config::OnIoError;
    match on_io_error {
        OnIoError::PassOn => IoErrorPolicy::PassOn,
        OnIoError::Detach => IoErrorPolicy::Detach,
        OnIoError::CallLocalIoError => IoErrorPolicy::CallHandler,
    }
}

/// A hook that runs the `local-io-error` handler (if configured) in the background,
/// with the resource in `DRBD_RESOURCE` / `RDB_RESOURCE`, bounded in time.
pub fn handler_hook(
    handlers: &BTreeMap<String, String>,
    resource: &str,
    peer: Option<&str>,
) -> Option<IoErrorHook> {
    let cmd = handlers.get("local-io-error")?.clone();
    let resource = resource.to_string();
    let peer = peer.unwrap_or_default().to_string();
    let rt = tokio::runtime::Handle::current();
    Some(Arc::new(move || {
        let (cmd, resource, peer) = (cmd.clone(), resource.clone(), peer.clone());
        rt.spawn(async move {
            tracing::warn!(resource = %resource, "calling handler local-io-error: {cmd}");
            let child = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .env("DRBD_RESOURCE", &resource)
                .env("RDB_RESOURCE", &resource)
                .env("DRBD_PEER", &peer)
                .env("DRBD_MINOR", "0")
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(Duration::from_secs(HANDLER_TIMEOUT_S), child).await {
                Ok(Ok(st)) => {
                    tracing::info!(resource = %resource, "handler local-io-error exited with {st}")
                }
                Ok(Err(e)) => {
                    tracing::error!(resource = %resource, "handler local-io-error failed to start: {e}")
                }
                Err(_) => {
                    tracing::error!(resource = %resource, "handler local-io-error killed after {HANDLER_TIMEOUT_S} s")
                }
            }
        });
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_are_named() {
        let s = parse_fault_spec("after=100:w; range=4096-8192; rate=0.5:rf; seed=7").unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.faults.len(), 3);
        assert_eq!(s.faults[0], Fault::After(100, Ops::WRITE));
        assert!(
            matches!(s.faults[1], Fault::Range(4096, 8192, o) if o.read && o.write && !o.flush)
        );
        assert!(parse_fault_spec("after=x")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_fault_spec("range=9-1")
            .unwrap_err()
            .contains("start after end"));
        assert!(parse_fault_spec("after=1:q")
            .unwrap_err()
            .contains("unknown operation"));
        assert!(parse_fault_spec("bogus=1")
            .unwrap_err()
            .contains("unknown key"));
        assert!(parse_fault_spec("rate=2")
            .unwrap_err()
            .contains("probability"));
    }
}
