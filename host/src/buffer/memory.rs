//! The byte budget shared by every shard of the buffer.
//!
//! Receivers reserve before they hand spans to a shard and are refused (so they answer the
//! sender with a retryable code) when the budget is spent; shards release when a trace leaves
//! the buffer. Lock-free: one atomic on the ingest path.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
    /// Above this, shards decide their oldest traces early.
    pressure_at: usize,
}

impl MemoryBudget {
    /// Early decisions start at 90 % of the limit, leaving the last 10 % as headroom for the
    /// requests in flight while the shards catch up.
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
            pressure_at: limit / 10 * 9,
        }
    }

    /// Reserves `bytes`, or returns false (and reserves nothing) when that would pass the limit.
    pub(crate) fn try_reserve(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(bytes).filter(|&n| n <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    /// Reserves `bytes` even past the limit: for spans that were acknowledged already (replayed
    /// from the log), which the shards then shed by deciding early.
    pub(crate) fn force_reserve(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Whether the budget is at or past its limit.
    pub(crate) fn is_full(&self) -> bool {
        self.used() >= self.limit
    }

    pub(crate) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// One of `shards` equal parts of the level where pressure starts.
    pub(crate) fn pressure_share(&self, shards: usize) -> usize {
        self.pressure_at / shards.max(1)
    }

    /// True while the buffer should shed its oldest traces by deciding them.
    pub(crate) fn under_pressure(&self) -> bool {
        self.used() > self.pressure_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_refuses_past_the_limit_and_release_restores() {
        let m = MemoryBudget::new(1000);
        assert!(m.try_reserve(600));
        assert!(!m.try_reserve(401));
        assert_eq!(m.used(), 600);
        assert!(m.try_reserve(400));
        assert!(m.under_pressure());
        m.release(1000);
        assert_eq!(m.used(), 0);
        assert!(!m.under_pressure());
    }
}
