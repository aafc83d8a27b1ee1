//! The revision window: traces decided within the last `buffer.revision_window`, whose late
//! spans may still change something.
//!
//! A dropped trace's log records stay pinned here, so a late span that turns the verdict (an
//! error, or the root) can read the whole trace back and rescue it. Kept and dropped traces
//! alike remember when their last span came and under which key their root's grace is learned,
//! so a late span teaches the buffer the gap it was cut at. Bounded by the window's length
//! and by [`MAX_ENTRIES`]; an entry leaves at its expiry, on a rescue, or oldest first when the
//! log is short of disk.

use std::collections::{HashMap, VecDeque};

use crate::trace::{Nanos, TraceId};

/// Entries one shard holds at most; past it the oldest leave first. At 2,000 traces a second
/// and a 30 s window a shard holds 60,000.
const MAX_ENTRIES: usize = 250_000;

/// A trace decided within the window.
#[derive(Debug)]
pub(crate) struct Revisable {
    /// Dropped with the log on: the records holding its spans, pinned while it is here.
    pub(crate) records: Vec<u64>,
    /// The trace may be rescued (dropped, with the log on).
    pub(crate) rescuable: bool,
    /// Whether the decision waited for its arrival (a grace or an idle wait), so that a late
    /// span shows a gap the wait did not cover.
    pub(crate) timed: bool,
    pub(crate) rooted: bool,
    pub(crate) root_key: u64,
    pub(crate) last_seen: Nanos,
    expires: Nanos,
}

impl Revisable {
    pub(crate) fn new(
        rescuable: bool,
        timed: bool,
        rooted: bool,
        root_key: u64,
        last_seen: Nanos,
    ) -> Self {
        Self {
            records: Vec::new(),
            rescuable,
            timed,
            rooted,
            root_key,
            last_seen,
            expires: 0,
        }
    }
}

pub(crate) struct Window {
    entries: HashMap<TraceId, Revisable, foldhash::fast::RandomState>,
    /// Expiry order; entries of traces that left early are skipped when met.
    order: VecDeque<(Nanos, TraceId)>,
    length: Nanos,
}

impl Window {
    pub(crate) fn new(length: Nanos) -> Self {
        Self {
            entries: HashMap::default(),
            order: VecDeque::new(),
            length,
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.length > 0
    }

    /// Holds a trace decided at `now`; returns what an entry pushed out held (its records to
    /// unpin).
    pub(crate) fn insert(
        &mut self,
        trace_id: TraceId,
        mut entry: Revisable,
        now: Nanos,
    ) -> Option<Revisable> {
        entry.expires = now.saturating_add(self.length);
        self.order.push_back((entry.expires, trace_id));
        let replaced = self.entries.insert(trace_id, entry);
        if replaced.is_some() {
            return replaced;
        }
        if self.entries.len() > MAX_ENTRIES {
            return self.pop_oldest();
        }
        None
    }

    pub(crate) fn get_mut(&mut self, trace_id: &TraceId) -> Option<&mut Revisable> {
        self.entries.get_mut(trace_id)
    }

    pub(crate) fn remove(&mut self, trace_id: &TraceId) -> Option<Revisable> {
        self.entries.remove(trace_id)
    }

    /// The next entry expired at `now`.
    pub(crate) fn pop_expired(&mut self, now: Nanos) -> Option<Revisable> {
        while let Some(&(expires, _)) = self.order.front() {
            if expires > now {
                return None;
            }
            if let Some(e) = self.pop_front() {
                return Some(e);
            }
        }
        None
    }

    /// The oldest entry, whatever its expiry.
    pub(crate) fn pop_oldest(&mut self) -> Option<Revisable> {
        while !self.order.is_empty() {
            if let Some(e) = self.pop_front() {
                return Some(e);
            }
        }
        None
    }

    fn pop_front(&mut self) -> Option<Revisable> {
        let (expires, trace_id) = self.order.pop_front()?;
        match self.entries.get(&trace_id) {
            Some(e) if e.expires == expires => self.entries.remove(&trace_id),
            _ => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_at_expiry_or_on_removal_oldest_first() {
        let mut w = Window::new(10);
        w.insert([1; 16], Revisable::new(true, true, true, 0, 0), 0);
        w.insert([2; 16], Revisable::new(true, true, true, 0, 0), 5);
        w.insert([3; 16], Revisable::new(true, true, true, 0, 0), 6);
        assert!(w.remove(&[2; 16]).is_some());
        assert!(w.pop_expired(9).is_none());
        assert!(w.pop_expired(10).is_some());
        assert!(w.pop_expired(15).is_none(), "2 left early");
        assert_eq!(w.len(), 1);
        assert!(w.pop_oldest().is_some());
        assert_eq!(w.len(), 0);
    }
}
