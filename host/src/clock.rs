//! The host's notion of now, passed to everything that times decisions, so tests can drive
//! time and a replay can run on record time.

use std::time::Instant;

use crate::trace::Nanos;

pub(crate) trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed start; never goes backwards.
    fn now(&self) -> Nanos;
}

/// The real monotonic clock.
pub(crate) struct MonotonicClock {
    start: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

/// Where the monotonic clock starts: about 52 days in, so a record written up to that long
/// before this process started still maps to a time on this clock (replay on record time
/// subtracts the record's age from now).
const START: Nanos = 1 << 52;

impl Clock for MonotonicClock {
    fn now(&self) -> Nanos {
        START.saturating_add(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told, for tests of timing logic.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct ManualClock(std::sync::atomic::AtomicU64);

#[cfg(test)]
impl ManualClock {
    pub(crate) fn advance(&self, by: std::time::Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.0
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
