//! Who may do what on the control socket.
//!
//! The socket is mode 0666 (like DRBD's world-readable `/proc/drbd`, anyone on the
//! machine may read the status); its group is the configured `control-group` when one
//! is set. Every connection's credentials are read with `SO_PEERCRED` when it is
//! accepted: read-only commands (`ping`, `status`) are served to anyone; commands that
//! change roles or states only to uid 0 and to members of the `control-group` (primary
//! group, or listed as a member in the group database). The group is resolved when the
//! daemon starts. Users other than root hold at most [`MAX_UNPRIVILEGED_CONNECTIONS`]
//! connections at once.

use std::ffi::{CStr, CString};
use std::path::Path;

/// The group allowed to change states, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    /// Its name (as configured, or the numeric gid).
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

/// The credentials of a control connection (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid of the connecting process.
    pub uid: u32,
    /// Effective gid of the connecting process.
    pub gid: u32,
}

/// Control connections open at once from users other than root; more are answered with
/// an error and closed (root is never limited, so a local user cannot lock it out).
pub const MAX_UNPRIVILEGED_CONNECTIONS: usize = 16;

/// Buffer size for the reentrant passwd/group lookups.
const LOOKUP_BUF_BYTES: usize = 64 * 1024;

/// Resolves a group name or numeric gid through the group database.
pub fn resolve_group(name: &str) -> Result<ControlGroup, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(ControlGroup {
            name: name.to_string(),
            gid,
        });
    }
    let c_name = CString::new(name).map_err(|_| format!("bad group name {name:?}"))?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0u8; LOOKUP_BUF_BYTES];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: c_name is NUL-terminated, grp and
    // result are live locals, buf is valid for buf.len() bytes and outlives the use
    // of the strings grp points into (none are kept past this function).
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!("control-group {name}: no such group"));
    }
    Ok(ControlGroup {
        name: name.to_string(),
        gid: grp.gr_gid,
    })
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is a plain C struct of integers and pointers, for which all
    // zero bytes (null pointers) is a valid value; getgrnam_r overwrites it.
    unsafe { std::mem::zeroed() }
}

fn zeroed_passwd() -> libc::passwd {
    // SAFETY: as for group: integers and pointers, all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Whether the user `uid` (primary group `gid`) belongs to `group`.
fn is_member(uid: u32, gid: u32, group: &ControlGroup) -> bool {
    if gid == group.gid {
        return true;
    }
    let mut pw = zeroed_passwd();
    let mut pw_buf = vec![0u8; LOOKUP_BUF_BYTES];
    let mut pw_result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: pw, pw_buf and pw_result are live locals valid for the call; pw_buf
    // outlives every read of the strings pw points into (below, in this function).
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pw,
            pw_buf.as_mut_ptr().cast(),
            pw_buf.len(),
            &mut pw_result,
        )
    };
    if rc != 0 || pw_result.is_null() || pw.pw_name.is_null() {
        return false;
    }
    if pw.pw_gid == group.gid {
        return true;
    }
    // SAFETY: pw_name is a NUL-terminated string inside pw_buf (checked non-null).
    let user = unsafe { CStr::from_ptr(pw.pw_name) }.to_owned();
    let mut grp = unsafe_zeroed_group();
    let mut buf = vec![0u8; LOOKUP_BUF_BYTES];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in resolve_group.
    let rc = unsafe {
        libc::getgrgid_r(
            group.gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || grp.gr_mem.is_null() {
        return false;
    }
    let mut i = 0;
    loop {
        // SAFETY: gr_mem is a NULL-terminated array of NUL-terminated strings inside
        // buf; we stop at the terminating NULL.
        let member = unsafe { *grp.gr_mem.add(i) };
        if member.is_null() {
            return false;
        }
        // SAFETY: member is a non-null NUL-terminated string inside buf.
        if unsafe { CStr::from_ptr(member) } == user.as_c_str() {
            return true;
        }
        i += 1;
    }
}

/// Whether `peer` may run state-changing commands.
pub fn may_change(peer: Option<Peer>, group: Option<&ControlGroup>) -> bool {
    match peer {
        None => false,
        Some(p) if p.uid == 0 => true,
        Some(p) => group.is_some_and(|g| is_member(p.uid, p.gid, g)),
    }
}

/// The refusal text for a command a peer may not run.
pub fn refusal(command: &str, peer: Option<Peer>, group: Option<&ControlGroup>) -> String {
    let who = peer.map_or("an unidentified peer".to_string(), |p| {
        format!("uid {}", p.uid)
    });
    let allowed = match group {
        Some(g) => format!("root or members of group {} (gid {})", g.name, g.gid),
        None => "root (set global { control-group NAME; } to allow a group)".to_string(),
    };
    format!("permission denied: {command} changes state and is allowed to {allowed}; {who} may only read (status)")
}

/// Reads the control group of the configuration at `config_path`: `Ok(None)` when none
/// is configured; an error text when the file cannot be loaded or the group does not
/// exist (the daemon then allows changes to root only).
pub fn configured_group(config_path: &Path) -> Result<Option<ControlGroup>, String> {
    let cfg = crate::config::load(config_path).map_err(|e| e.to_string())?;
    cfg.control_group().map(resolve_group).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_always_others_by_group() {
        let root = Some(Peer { uid: 0, gid: 0 });
        let user = Some(Peer {
            uid: 4242,
            gid: 4242,
        });
        assert!(may_change(root, None));
        assert!(!may_change(user, None));
        assert!(!may_change(None, None));
        let g = ControlGroup {
            name: "4242".into(),
            gid: 4242,
        };
        assert!(may_change(user, Some(&g)), "primary gid matches");
        let other = ControlGroup {
            name: "4343".into(),
            gid: 4343,
        };
        assert!(!may_change(user, Some(&other)));
        assert!(refusal("primary", user, Some(&other)).contains("members of group 4343"));
        assert_eq!(resolve_group("root").unwrap().gid, 0);
        assert!(resolve_group("no-such-group-rdb").is_err());
        assert_eq!(resolve_group("123").unwrap().gid, 123);
    }
}
