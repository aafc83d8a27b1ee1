//! The host's notion of now, passed to everything that times decisions, so tests can drive
//! time and a replay can run on record time.

use std::time::Instant;

use crate::buffer::Nanos;

pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed start; never goes backwards.
    fn now(&self) -> Nanos;
}

/// The real monotonic clock.
pub struct MonotonicClock {
    start: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Nanos {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
