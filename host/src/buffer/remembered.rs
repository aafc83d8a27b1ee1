//! What was decided for traces that already left the buffer, so late spans follow it.
//!
//! Bounded on both sides: kept traces keep their decision stamp (so a late span carries the
//! same `sampling.*` attributes); dropped ones only an 8-byte fingerprint, since far more
//! traces are dropped than kept. The oldest entries are forgotten first. This is the one place
//! decisions are recorded, so a durable decision log can replace it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use crate::trace::TraceId;

/// What a past decision said about a trace.
#[derive(Debug, Clone)]
pub(crate) enum Remembered<S> {
    Kept(Arc<S>),
    Dropped,
}

/// Bounded memory of past decisions, generic over the stamp kept with each kept trace.
pub(crate) struct DecisionMemory<S> {
    kept: HashMap<TraceId, Arc<S>, foldhash::fast::RandomState>,
    kept_order: VecDeque<TraceId>,
    kept_cap: usize,
    dropped: HashSet<u64, IdentityHash>,
    dropped_order: VecDeque<u64>,
    dropped_cap: usize,
    hasher: foldhash::fast::RandomState,
}

impl<S> DecisionMemory<S> {
    pub(crate) fn new(kept_cap: usize, dropped_cap: usize) -> Self {
        Self {
            kept: Default::default(),
            kept_order: VecDeque::new(),
            kept_cap,
            dropped: Default::default(),
            dropped_order: VecDeque::new(),
            dropped_cap,
            hasher: Default::default(),
        }
    }

    fn fingerprint(&self, trace_id: &TraceId) -> u64 {
        self.hasher.hash_one(trace_id)
    }

    pub(crate) fn remember_kept(&mut self, trace_id: TraceId, stamp: Arc<S>) {
        if self.kept_cap == 0 {
            return;
        }
        if self.kept.insert(trace_id, stamp).is_none() {
            self.kept_order.push_back(trace_id);
            if self.kept_order.len() > self.kept_cap
                && let Some(old) = self.kept_order.pop_front()
            {
                self.kept.remove(&old);
            }
        }
    }

    pub(crate) fn remember_dropped(&mut self, trace_id: &TraceId) {
        if self.dropped_cap == 0 {
            return;
        }
        let fp = self.fingerprint(trace_id);
        if self.dropped.insert(fp) {
            self.dropped_order.push_back(fp);
            if self.dropped_order.len() > self.dropped_cap
                && let Some(old) = self.dropped_order.pop_front()
            {
                self.dropped.remove(&old);
            }
        }
    }

    pub(crate) fn recall(&self, trace_id: &TraceId) -> Option<Remembered<S>> {
        if let Some(stamp) = self.kept.get(trace_id) {
            return Some(Remembered::Kept(stamp.clone()));
        }
        if self.dropped.contains(&self.fingerprint(trace_id)) {
            return Some(Remembered::Dropped);
        }
        None
    }
}

/// The fingerprints are already hashes; hashing them again would be wasted work.
#[derive(Default, Clone, Copy)]
struct IdentityHash;

impl BuildHasher for IdentityHash {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recalls_kept_and_dropped_and_forgets_the_oldest() {
        let mut m: DecisionMemory<&'static str> = DecisionMemory::new(2, 2);
        m.remember_kept([1; 16], Arc::new("errors"));
        m.remember_dropped(&[2; 16]);
        assert!(matches!(m.recall(&[1; 16]), Some(Remembered::Kept(s)) if *s == "errors"));
        assert!(matches!(m.recall(&[2; 16]), Some(Remembered::Dropped)));
        assert!(m.recall(&[3; 16]).is_none());

        m.remember_kept([4; 16], Arc::new("a"));
        m.remember_kept([5; 16], Arc::new("b"));
        assert!(m.recall(&[1; 16]).is_none(), "oldest kept forgotten");
        m.remember_dropped(&[6; 16]);
        m.remember_dropped(&[7; 16]);
        assert!(m.recall(&[2; 16]).is_none(), "oldest dropped forgotten");
        assert!(matches!(m.recall(&[7; 16]), Some(Remembered::Dropped)));
    }
}
