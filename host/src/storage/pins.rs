//! Positions that must stay in the log, and the low watermark below which nothing is needed.
//!
//! Any holder pins a position while it needs the record there and unpins it when it no longer
//! does: the receivers from the append until the shards hold the spans, a shard while a trace
//! is undecided, the exporter until a kept span is delivered. The log frees only what lies
//! below the lowest pin, so a later holder (a dropped trace kept for a revision window, say)
//! needs nothing but a pin of its own.

use std::collections::BTreeMap;

use parking_lot::Mutex;

#[derive(Default)]
pub(crate) struct Pins(Mutex<BTreeMap<u64, u32>>);

impl Pins {
    pub(crate) fn pin(&self, position: u64) {
        *self.0.lock().entry(position).or_insert(0) += 1;
    }

    /// Pins `position` `n` more times (one per holder it is handed to).
    pub(crate) fn pin_n(&self, position: u64, n: u32) {
        if n > 0 {
            *self.0.lock().entry(position).or_insert(0) += n;
        }
    }

    pub(crate) fn unpin(&self, position: u64) {
        let mut pins = self.0.lock();
        match pins.get_mut(&position) {
            Some(1) => {
                pins.remove(&position);
            }
            Some(n) => *n -= 1,
            None => {
                debug_assert!(false, "unpinned {position}, which was not pinned");
                tracing::error!(position, "unpinned a log position that was not pinned");
            }
        }
    }

    /// The lowest pinned position, if any.
    pub(crate) fn low(&self) -> Option<u64> {
        self.0.lock().keys().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_low_watermark_is_the_lowest_position_still_pinned_by_anyone() {
        let pins = Pins::default();
        assert_eq!(pins.low(), None);
        pins.pin(30);
        pins.pin_n(10, 2);
        pins.pin(20);
        assert_eq!(pins.low(), Some(10));
        pins.unpin(10);
        assert_eq!(pins.low(), Some(10), "a second holder still pins 10");
        pins.unpin(10);
        assert_eq!(pins.low(), Some(20));
        pins.unpin(30);
        assert_eq!(
            pins.low(),
            Some(20),
            "releasing a higher pin leaves the watermark"
        );
        pins.unpin(20);
        assert_eq!(pins.low(), None);
    }
}
