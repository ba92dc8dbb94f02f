//! Busy-polling of the peer sockets before a runtime worker goes to sleep.
//!
//! Owns the process-wide registry of peer sockets worth polling and
//! [`before_park`], which `rdbd` installs as the tokio runtime's `on_thread_park`
//! hook. A replicated write at queue depth 1 crosses four hops (application ->
//! Primary -> Secondary -> Primary -> application); at each one the receiving
//! thread sleeps in `epoll_wait`, its CPU goes idle, and on virtual machines whose
//! guests halt at once waking it costs tens of µs (see `docs/performance.md`).
//! With the hook, a worker that runs out of work first polls the registered
//! sockets with `poll(2)` and a zero timeout for at most the largest registered
//! budget (yielding the CPU between two attempts), and returns as soon as one is
//! readable, so the runtime's `epoll_wait` that follows returns at once instead of
//! sleeping. The peer's answer to a frame just sent (an ack) or its next frame
//! usually arrives within that budget.
//!
//! The NBD connections' sockets are registered too, as *watched* sockets with no
//! budget of their own ([`watch`]): they never start a poll, but one that becomes
//! readable ends it, so a spinning worker (the only one, on a 2-CPU machine) does
//! not leave an application's request waiting for the peer's budget to run out.
//!
//! It is a registry rather than state passed around because the hook belongs to
//! the runtime, which `rdbd` builds before any resource exists. A socket stays
//! registered while its [`Registration`] lives; the link's reader holds it next to
//! the socket's read half, and an NBD connection for as long as it serves, so a
//! registered descriptor is open (an NBD one at most until the instant its
//! registration is dropped).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::spin::spin_until;

/// Default budget (µs) of the `peer-busy-poll` keyword.
pub const DEFAULT_PEER_BUSY_POLL_US: u32 = 150;

/// Most sockets polled at once: the peer sockets first, then watched NBD sockets
/// (a watched socket beyond the bound only waits for the budget).
const MAX_POLLED: usize = 64;

/// One registered socket: its descriptor, its budget (0: watched only) and the
/// registration's id.
struct Entry {
    fd: RawFd,
    budget_us: u32,
    id: u64,
}

/// Registered sockets.
static SOCKETS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
/// Entries with a budget, read without the lock on every park.
static SPINNERS: AtomicUsize = AtomicUsize::new(0);
/// Ids of registrations.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Keeps a socket registered; unregisters it when dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
}

fn add(fd: RawFd, budget_us: u32) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    sockets.push(Entry { fd, budget_us, id });
    SPINNERS.store(spinners(&sockets), Ordering::Relaxed);
    Registration { id }
}

fn spinners(sockets: &[Entry]) -> usize {
    sockets.iter().filter(|e| e.budget_us > 0).count()
}

/// Registers a peer socket `fd` (open while the returned registration lives) with
/// a budget of `budget_us`; `None` when the budget is 0.
pub(crate) fn register(fd: RawFd, budget_us: u32) -> Option<Registration> {
    (budget_us > 0).then(|| add(fd, budget_us))
}

/// Watches an application's socket `fd` (an NBD connection, open while the
/// returned registration lives): it never starts a poll, but ends one when it
/// becomes readable.
pub(crate) fn watch(fd: RawFd) -> Registration {
    add(fd, 0)
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = sockets.iter().position(|e| e.id == self.id) {
            sockets.swap_remove(i);
        }
        SPINNERS.store(spinners(&sockets), Ordering::Relaxed);
    }
}

/// The `on_thread_park` hook: while a peer socket is registered, polls every
/// registered socket until one is readable or the largest budget has passed.
/// Returns at once when no peer socket is registered.
pub fn before_park() {
    if SPINNERS.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut fds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; MAX_POLLED];
    let mut n = 0;
    let mut budget_us = 0;
    {
        let sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
        let peers = sockets.iter().filter(|e| e.budget_us > 0);
        let watched = sockets.iter().filter(|e| e.budget_us == 0);
        for e in peers.chain(watched).take(MAX_POLLED) {
            fds[n] = libc::pollfd {
                fd: e.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            n += 1;
            budget_us = budget_us.max(e.budget_us);
        }
    }
    if n == 0 || budget_us == 0 {
        return;
    }
    let budget = Duration::from_micros(u64::from(budget_us));
    // `poll` errors (never expected) end the wait like readiness does.
    let _ = spin_until(budget, || {
        // SAFETY: `fds[..n]` is an initialised array of `n` pollfd structures that
        // `poll` may write `revents` into; a zero timeout never blocks. The
        // descriptors are open (see the module doc); one closed in the instant
        // between its owner's close and the registration's drop would only be
        // reported as POLLNVAL (or, reused, as some readiness), which ends the wait.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, 0) };
        (ready != 0).then_some(())
    });
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use std::time::Instant;

    use super::*;

    /// Writes a byte to `theirs` 20 ms from now and checks that `before_park`
    /// returns because of it, long before a 1 s budget.
    fn returns_when_written(mut theirs: UnixStream) -> UnixStream {
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            theirs.write_all(b"x").unwrap();
            theirs
        });
        let t0 = Instant::now();
        before_park();
        assert!(
            t0.elapsed() < Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
        writer.join().unwrap()
    }

    fn registered(fd: RawFd) -> bool {
        SOCKETS.lock().unwrap().iter().any(|e| e.fd == fd)
    }

    #[test]
    fn polls_until_readable_and_not_without_registrations() {
        // Other tests of this binary may register sockets too: only ours matter.
        let (theirs, ours) = UnixStream::pair().unwrap();
        let reg = register(ours.as_raw_fd(), 1_000_000).unwrap();
        assert!(register(ours.as_raw_fd(), 0).is_none());
        let _theirs = returns_when_written(theirs);
        drop(reg);
        assert!(!registered(ours.as_raw_fd()));
    }

    #[test]
    fn a_watched_socket_ends_the_poll() {
        let (_peer_theirs, peer_ours) = UnixStream::pair().unwrap();
        let (app_theirs, app_ours) = UnixStream::pair().unwrap();
        let watched = watch(app_ours.as_raw_fd());
        // A peer with a 1 s budget and nothing to read: the application's request
        // ends the poll.
        let peer = register(peer_ours.as_raw_fd(), 1_000_000).unwrap();
        let _app_theirs = returns_when_written(app_theirs);
        drop(peer);
        drop(watched);
        assert!(!registered(app_ours.as_raw_fd()) && !registered(peer_ours.as_raw_fd()));
    }
}
