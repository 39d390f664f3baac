//! The engine's clock: wall time that follows tokio's clock, so tests under
//! `tokio::time::pause` drive durable timers deterministically.

use std::time::Duration;

use tokio::time::Instant;

use crate::types::Timestamp;

/// Wall-clock time anchored once and advanced by tokio's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall0: Timestamp,
    inst0: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock anchored at the current wall time.
    pub fn new() -> Self {
        Self {
            wall0: Timestamp::now(),
            inst0: Instant::now(),
        }
    }
    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.wall0.plus(self.inst0.elapsed())
    }
    /// The tokio instant at which `t` falls (now, if `t` is in the past).
    pub fn instant_of(&self, t: Timestamp) -> Instant {
        let now = self.now();
        if t <= now {
            Instant::now()
        } else {
            Instant::now() + now.until(t)
        }
    }
    /// `now() + d`.
    pub fn after(&self, d: Duration) -> Timestamp {
        self.now().plus(d)
    }
}
