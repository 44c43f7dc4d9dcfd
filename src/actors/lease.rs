//! A node's lease: the deadline until which it may act as the owner of its markets. The
//! heartbeat extends it after each acknowledged renewal; a market checks it before every
//! journal publish and stops by itself once it has passed, so a node that was paused or cut off
//! from NATS stops publishing before the cluster gives its markets to another node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Lease(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    origin: Instant,
    /// Microseconds after `origin`; 0 until the first renewal, `u64::MAX`: never lapses.
    deadline_us: AtomicU64,
}

impl Lease {
    /// A lease not granted yet (invalid until `extend_to`).
    pub fn new() -> Lease {
        Lease(Arc::new(Inner {
            origin: Instant::now(),
            deadline_us: AtomicU64::new(0),
        }))
    }

    /// A lease that never lapses.
    pub fn forever() -> Lease {
        let lease = Lease::new();
        lease.0.deadline_us.store(u64::MAX, Ordering::Release);
        lease
    }

    /// Moves the deadline to `deadline` (never backwards).
    pub fn extend_to(&self, deadline: Instant) {
        let us = u64::try_from(
            deadline
                .saturating_duration_since(self.0.origin)
                .as_micros(),
        )
        .unwrap_or(u64::MAX - 1)
        .max(1);
        self.0.deadline_us.fetch_max(us, Ordering::AcqRel);
    }

    /// Ends the lease now (it stays ended until the next `extend_to` beyond now).
    pub fn lapse(&self) {
        let now = u64::try_from(self.0.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        let _ = self
            .0
            .deadline_us
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d != u64::MAX && d > now).then_some(now)
            });
    }

    pub fn valid(&self) -> bool {
        let deadline = self.0.deadline_us.load(Ordering::Acquire);
        deadline == u64::MAX
            || (deadline > 0
                && u64::try_from(self.0.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
                    < deadline)
    }

    /// Time left before it lapses (zero when it has).
    pub fn remaining(&self) -> Duration {
        let deadline = self.0.deadline_us.load(Ordering::Acquire);
        if deadline == u64::MAX {
            return Duration::MAX;
        }
        Duration::from_micros(deadline).saturating_sub(self.0.origin.elapsed())
    }
}

impl Default for Lease {
    fn default() -> Lease {
        Lease::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_valid_until_its_deadline() {
        let lease = Lease::new();
        assert!(!lease.valid(), "not granted yet");
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(lease.valid());
        lease.extend_to(Instant::now());
        assert!(lease.valid(), "never moved backwards");
        lease.lapse();
        assert!(!lease.valid());
        lease.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(lease.valid(), "renewed");
        lease.extend_to(Instant::now() - Duration::from_secs(1));
        assert!(lease.valid());
        assert!(Lease::forever().valid());
        Lease::forever().lapse();
        let past = Lease::new();
        past.extend_to(Instant::now() + Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!past.valid(), "lapsed by itself");
    }
}
