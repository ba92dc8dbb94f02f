//! Bounded busy-waiting, the one loop behind rdb's busy-polls.
//!
//! Owns [`spin_until`]. Both busy-polls (an idle NBD connection's socket,
//! `frontend/nbd/busy_poll.rs`, and the peer sockets before a runtime worker
//! sleeps, `peer/park_poll.rs`) wait the same way: try, and between two tries give
//! the CPU to anything runnable (`sched_yield`), until the try succeeds or the
//! budget has passed. `docs/performance.md` explains why polling pays here.

use std::time::{Duration, Instant};

/// Calls `attempt` until it returns `Some` or `budget` has passed (it is always
/// called at least once), yielding the CPU between two calls; `None` when the
/// budget ran out.
pub fn spin_until<T>(budget: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + budget;
    loop {
        if let Some(v) = attempt() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_until_success_or_the_budget_runs_out() {
        let mut tries = 0;
        assert_eq!(
            spin_until(Duration::from_secs(10), || {
                tries += 1;
                (tries == 3).then_some(tries)
            }),
            Some(3)
        );
        // A zero budget still tries once.
        let mut tries = 0;
        assert_eq!(
            spin_until(Duration::ZERO, || {
                tries += 1;
                None::<()>
            }),
            None
        );
        assert_eq!(tries, 1);
    }
}
