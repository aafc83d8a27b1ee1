//! Traces in waiting: every span of a trace is held here until the trace is decided.
//!
//! Owns the per-shard trace table, the decision timing (root grace, idle, decision wait, caps),
//! the memory accounting that bounds the whole buffer, and the memory of past decisions that
//! late spans follow. It never decides anything itself and never drops a span: a trace leaves
//! only through [`TraceBuffer::pop_due`], [`TraceBuffer::pop_oldest`], [`TraceBuffer::take`] or
//! [`TraceBuffer::drain`], and the caller must hand every trace it takes to the decision step.
//!
//! Time is a parameter (`now`, nanoseconds of a monotonic clock), never read here, so tests
//! drive it without sleeping and a replay can run on record time.

mod learned;
mod memory;
mod remembered;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use crate::otlp::wire::span_name;
use crate::trace::{BufferedSpan, Nanos, TraceId, Trigger};

pub(crate) use learned::{AutoGrace, GraceSettings, Learned, SavedGaps};
pub use learned::{LearnedGrace, LearnedReport};
pub use memory::MemoryBudget;
pub(crate) use remembered::{DecisionMemory, Remembered};

/// The timing and cap settings of the buffer, in clock units.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// The fixed grace; with `auto`, unused.
    pub(crate) root_grace: Nanos,
    /// Set: the grace and the idle wait are learned ([`Learned`]).
    pub(crate) auto: Option<AutoGrace>,
    pub(crate) trace_idle: Nanos,
    pub(crate) decision_wait: Nanos,
    pub(crate) revision_window: Nanos,
    pub(crate) max_spans_per_trace: usize,
    pub(crate) max_bytes_per_trace: usize,
}

impl Timings {
    pub fn from_config(b: &crate::config::BufferConfig) -> Self {
        use crate::config::Grace;
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let (root_grace, auto) = match b.root_grace {
            Grace::Fixed(d) => (nanos(d.0), None),
            Grace::Auto => (
                learned::START,
                Some(AutoGrace {
                    min: nanos(b.root_grace_min.0),
                    quantile: b.grace_quantile,
                }),
            ),
        };
        Self {
            root_grace,
            auto,
            trace_idle: nanos(b.trace_idle.0),
            decision_wait: nanos(b.decision_wait.0),
            revision_window: nanos(b.revision_window.0),
            max_spans_per_trace: b.max_spans_per_trace,
            max_bytes_per_trace: b.max_bytes_per_trace.bytes(),
        }
    }

    /// A fixed grace of `root_grace`, without learning, and no revision window.
    #[cfg(test)]
    pub(crate) fn fixed(
        root_grace: Nanos,
        trace_idle: Nanos,
        decision_wait: Nanos,
        max_spans_per_trace: usize,
    ) -> Self {
        Self {
            root_grace,
            auto: None,
            trace_idle,
            decision_wait,
            revision_window: 0,
            max_spans_per_trace,
            max_bytes_per_trace: 1 << 20,
        }
    }

    fn grace_settings(&self) -> GraceSettings {
        GraceSettings {
            auto: self.auto,
            fixed: self.root_grace,
            trace_idle: self.trace_idle,
            decision_wait: self.decision_wait,
        }
    }
}

/// OTLP span kinds the completeness rules read.
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;
const KIND_PRODUCER: u8 = 4;
const KIND_CONSUMER: u8 = 5;

/// A trace still waiting for its decision.
#[derive(Debug)]
pub(crate) struct PendingTrace {
    pub(crate) spans: Vec<BufferedSpan>,
    /// Bytes accounted to the memory budget for this trace.
    pub(crate) cost: usize,
    pub(crate) first_seen: Nanos,
    pub(crate) last_seen: Nanos,
    /// When the root span arrived (spans arrive once ended, so the root has ended by then).
    pub(crate) root_seen: Option<Nanos>,
    /// The grace given at the root's arrival, and the key its gaps are learned under.
    grace: Nanos,
    pub(crate) root_key: u64,
    /// The longest quiet gaps between arrivals: before the root came, and at or after it.
    pub(crate) gap_before_root: Nanos,
    pub(crate) gap_after_root: Nanos,
    /// The grace ran out while the trace visibly lacked parts: it waits for them, up to the
    /// idle wait (at least twice the grace) after its last span, until a new span arrives.
    awaiting_parts: bool,
    /// Log positions of the records this trace's spans came in, each once (none without a
    /// log). Plain positions: whoever pins them (the pipeline) unpins them.
    pub(crate) records: Vec<u64>,
    /// Records whose spans of this trace were parked: dropped from memory, to be read back
    /// from the log when the trace is decided. Always a prefix of `records`.
    pub(crate) parked: usize,
    /// The spans and bytes parked, for the caps and the gauges.
    pub(crate) parked_spans: usize,
    pub(crate) parked_bytes: usize,
}

/// What a parked trace still costs the memory budget: its entry in the trace table, the
/// schedule and the arrival queue, and its record positions.
pub(crate) fn parked_cost(records: usize) -> usize {
    std::mem::size_of::<PendingTrace>() + 96 + 8 * records
}

impl PendingTrace {
    /// Spans held in memory or parked.
    pub(crate) fn span_total(&self) -> usize {
        self.spans.len() + self.parked_spans
    }

    /// When this trace is due, and which rule makes it due first. `idle` is how long a trace
    /// without its root, or missing parts, waits after its last span.
    fn due(&self, t: &Timings, idle: Nanos) -> (Nanos, Trigger) {
        let mut due = (
            self.first_seen.saturating_add(t.decision_wait),
            Trigger::DecisionWait,
        );
        // A trace with its root waits out its grace, which trace_idle never cuts short; one
        // awaiting a part waits at least twice the grace for it.
        let idle = match self.root_seen {
            Some(_) if !self.awaiting_parts => t.trace_idle.max(self.grace),
            Some(_) => idle.max(self.grace.saturating_mul(2)),
            None => idle,
        };
        let idle = self.last_seen.saturating_add(idle);
        if idle < due.0 {
            due = (idle, Trigger::TraceIdle);
        }
        if let Some(root) = self.root_seen
            && !self.awaiting_parts
        {
            // The grace is a quiet period: children that arrive after the root extend it, so a
            // trace whose spans are still trickling in is not cut in two.
            let grace = root.max(self.last_seen).saturating_add(self.grace);
            if grace <= due.0 {
                due = (grace, Trigger::RootGrace);
            }
        }
        due
    }
}

/// Whether a trace visibly lacks parts: a span names a parent that has not arrived, or a call
/// into a service seen instrumented ([`learned::Callees`]) has no SERVER or CONSUMER child yet.
fn lacks_parts(spans: &[BufferedSpan], callees: &learned::Callees) -> bool {
    let mut ids: Vec<[u8; 8]> = spans.iter().map(|s| s.span_id).collect();
    ids.sort_unstable();
    let arrived = |id: &[u8; 8]| ids.binary_search(id).is_ok();
    if spans
        .iter()
        .any(|s| !s.is_root() && !arrived(&s.parent_span_id))
    {
        return true;
    }
    let mut served: Vec<[u8; 8]> = served_calls(spans).collect();
    served.sort_unstable();
    spans.iter().any(|s| {
        is_call(s)
            && served.binary_search(&s.span_id).is_err()
            && callees.expects_child(callees.key(&s.scope.resource.service, span_name(&s.bytes)))
    })
}

fn is_call(span: &BufferedSpan) -> bool {
    span.kind == KIND_CLIENT || span.kind == KIND_PRODUCER
}

/// The span ids of calls a SERVER or CONSUMER span answers.
fn served_calls(spans: &[BufferedSpan]) -> impl Iterator<Item = [u8; 8]> + '_ {
    (spans.iter())
        .filter(|s| s.kind == KIND_SERVER || s.kind == KIND_CONSUMER)
        .map(|s| s.parent_span_id)
}

/// A trace taken out of the buffer for its decision.
#[derive(Debug)]
pub struct DueTrace {
    pub(crate) trace_id: TraceId,
    pub(crate) trace: PendingTrace,
    pub(crate) trigger: Trigger,
}

type TraceMap = HashMap<TraceId, PendingTrace, foldhash::fast::RandomState>;

/// One shard of the buffer. Owned by one worker thread; no locks inside.
pub struct TraceBuffer {
    traces: TraceMap,
    /// Min-heap of times at which a trace may be due. Entries are hints: a popped entry is
    /// re-checked against the trace's current deadline, so spans arriving later (which only
    /// move deadlines out) need no heap update.
    schedule: BinaryHeap<Reverse<(Nanos, TraceId)>>,
    /// Traces in order of first arrival, for deciding the oldest first under memory pressure.
    /// Entries of traces already decided are skipped when met.
    arrivals: VecDeque<(Nanos, TraceId)>,
    timings: Timings,
    cost: usize,
    spans: usize,
    /// With parking enabled: traces holding spans in memory, in the order they began to.
    /// Entries of traces decided or parked since are skipped when met.
    in_memory: VecDeque<TraceId>,
    parking: bool,
    /// Spans a new trace's vector is made for: a running mean of the traces this shard
    /// decided, so a trace the size of those before it (agent runs mostly arrive whole, 30
    /// spans in one request) fills its vector without growing it 4, 8, 16, 32.
    span_hint: usize,
    /// The graces, the idle wait and the callees learned from arrival.
    learned: Learned,
    /// `learned.idle()`, refreshed as traces are decided.
    idle: Nanos,
}

/// The first traces' vectors, before any was decided.
const FIRST_SPAN_HINT: usize = 4;
/// A few huge traces must not make every new one reserve for their size: 128 spans is an
/// 8 KiB vector; larger traces grow theirs.
const MAX_SPAN_HINT: usize = 128;

/// What happened to a span offered to the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Buffered; the trace waits on.
    Waiting,
    /// Buffered, and the trace reached a cap: take it now with this trigger.
    CapReached(Trigger),
}

impl TraceBuffer {
    pub fn new(timings: Timings) -> Self {
        let learned = Learned::new(timings.grace_settings());
        Self {
            traces: TraceMap::default(),
            schedule: BinaryHeap::new(),
            arrivals: VecDeque::new(),
            timings,
            cost: 0,
            spans: 0,
            in_memory: VecDeque::new(),
            parking: false,
            span_hint: FIRST_SPAN_HINT,
            idle: learned.idle(),
            learned,
        }
    }

    /// What this shard learned from arrival.
    pub(crate) fn learned(&mut self) -> &mut Learned {
        &mut self.learned
    }

    /// Takes back what a run before learned (see [`Learned::restore`]).
    pub(crate) fn restore_learned(&mut self, saved: SavedGaps, now: Nanos) {
        self.learned.restore(saved, now);
        self.idle = self.learned.idle();
    }

    /// Adds a span to its trace. `cost` is what the caller reserved for it in the budget.
    pub fn insert(
        &mut self,
        trace_id: TraceId,
        span: BufferedSpan,
        cost: usize,
        now: Nanos,
    ) -> Inserted {
        self.insert_from(trace_id, span, cost, now, None).0
    }

    /// [`Self::insert`] for a span that came in the log record at `record`; also says whether
    /// the record is new to the trace (so the caller pins it for the trace).
    pub(crate) fn insert_from(
        &mut self,
        trace_id: TraceId,
        span: BufferedSpan,
        cost: usize,
        now: Nanos,
        record: Option<u64>,
    ) -> (Inserted, bool) {
        let is_root = span.is_root();
        let timings = self.timings;
        let idle = self.idle;
        let trace = match self.traces.entry(trace_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let first_due = now.saturating_add(idle.min(timings.decision_wait));
                self.schedule.push(Reverse((first_due, trace_id)));
                self.arrivals.push_back((now, trace_id));
                e.insert(PendingTrace {
                    spans: Vec::with_capacity(self.span_hint),
                    cost: 0,
                    first_seen: now,
                    last_seen: now,
                    root_seen: None,
                    grace: timings.root_grace,
                    root_key: 0,
                    gap_before_root: 0,
                    gap_after_root: 0,
                    awaiting_parts: false,
                    records: Vec::new(),
                    parked: 0,
                    parked_spans: 0,
                    parked_bytes: 0,
                })
            }
        };
        let new_record = match record {
            // Spans of one record arrive together, so the last entry is nearly always it.
            Some(r) if trace.records.last() != Some(&r) && !trace.records.contains(&r) => {
                trace.records.push(r);
                true
            }
            _ => false,
        };
        if self.parking && trace.spans.is_empty() {
            self.in_memory.push_back(trace_id);
        }
        let gap = now.saturating_sub(trace.last_seen);
        if trace.root_seen.is_some() {
            trace.gap_after_root = trace.gap_after_root.max(gap);
        } else {
            trace.gap_before_root = trace.gap_before_root.max(gap);
        }
        if trace.awaiting_parts {
            // A part may have come: the grace counts again, from this span.
            trace.awaiting_parts = false;
            self.schedule
                .push(Reverse((now.saturating_add(trace.grace), trace_id)));
        }
        if is_root && trace.root_seen.is_none() {
            trace.root_seen = Some(now);
            let name = span_name(&span.bytes);
            (trace.grace, trace.root_key) =
                self.learned
                    .grace_for(&span.scope.resource.service, name, now);
            // The root may make the trace due before the entry already scheduled.
            self.schedule
                .push(Reverse((now.saturating_add(trace.grace), trace_id)));
        }
        trace.spans.push(span);
        trace.cost += cost;
        trace.last_seen = now;
        self.cost += cost;
        self.spans += 1;
        let inserted = if trace.span_total() >= timings.max_spans_per_trace {
            Inserted::CapReached(Trigger::SpanCap)
        } else if trace.cost + trace.parked_bytes >= timings.max_bytes_per_trace {
            Inserted::CapReached(Trigger::ByteCap)
        } else {
            Inserted::Waiting
        };
        (inserted, new_record)
    }

    /// Takes a trace out (after a cap was reached).
    pub(crate) fn take(&mut self, trace_id: &TraceId, trigger: Trigger) -> Option<DueTrace> {
        let trace = self.traces.remove(trace_id)?;
        Some(self.account_removed(*trace_id, trace, trigger))
    }

    fn account_removed(
        &mut self,
        trace_id: TraceId,
        trace: PendingTrace,
        trigger: Trigger,
    ) -> DueTrace {
        self.cost -= trace.cost;
        self.spans -= trace.span_total();
        // A mean over about the last eight traces, rounded up so that it reaches the size
        // of traces that are all alike.
        let spans = trace.span_total().clamp(1, MAX_SPAN_HINT);
        self.span_hint = (self.span_hint * 7 + spans).div_ceil(8);
        DueTrace {
            trace_id,
            trace,
            trigger,
        }
    }

    /// The next trace whose deadline has passed, if any. A trace whose grace ran out while
    /// it visibly lacks parts ([`lacks_parts`]; not checked for a parked trace, whose spans
    /// are not at hand) waits on for them, up to the idle wait after its last span.
    pub(crate) fn pop_due(&mut self, now: Nanos) -> Option<DueTrace> {
        while let Some(&Reverse((at, trace_id))) = self.schedule.peek() {
            if at > now {
                return None;
            }
            self.schedule.pop();
            let Some(trace) = self.traces.get_mut(&trace_id) else {
                continue; // decided earlier; a stale hint
            };
            let (mut due, mut trigger) = trace.due(&self.timings, self.idle);
            if due <= now
                && trigger == Trigger::RootGrace
                && trace.parked == 0
                && lacks_parts(&trace.spans, &self.learned.callees)
            {
                trace.awaiting_parts = true;
                (due, trigger) = trace.due(&self.timings, self.idle);
            }
            if due <= now {
                let trace = self.traces.remove(&trace_id)?;
                self.prune_arrivals();
                self.learn(&trace, trigger, now);
                return Some(self.account_removed(trace_id, trace, trigger));
            }
            self.schedule.push(Reverse((due, trace_id)));
        }
        None
    }

    /// Learns from a trace decided on time: its gaps (with a learned grace), and which of its
    /// calls were served. Traces cut by a cap, memory or shutdown show nothing about arrival.
    fn learn(&mut self, trace: &PendingTrace, trigger: Trigger, now: Nanos) {
        if trace.root_seen.is_none()
            || !matches!(
                trigger,
                Trigger::RootGrace | Trigger::TraceIdle | Trigger::DecisionWait
            )
        {
            return;
        }
        self.learned.observe(
            trace.root_key,
            Some(trace.gap_after_root),
            Some(trace.gap_before_root),
        );
        let mut served: Vec<[u8; 8]> = served_calls(&trace.spans).collect();
        served.sort_unstable();
        for s in trace.spans.iter().filter(|s| is_call(s)) {
            let key = (self.learned.callees).key(&s.scope.resource.service, span_name(&s.bytes));
            let answered = served.binary_search(&s.span_id).is_ok();
            self.learned.callees.observe(key, answered, now);
        }
        self.idle = self.learned.idle();
    }

    /// A span arrived `gap` after the last span of its trace, decided already without waiting
    /// for it: learns the gap (see [`Learned::observe_late`]).
    pub(crate) fn learn_late(&mut self, key: u64, rooted: bool, gap: Nanos) {
        self.learned.observe_late(key, rooted, gap);
        self.idle = self.learned.idle();
    }

    /// The oldest trace, for an early decision under memory (or disk) pressure, with `trigger`.
    pub(crate) fn pop_oldest(&mut self, trigger: Trigger) -> Option<DueTrace> {
        while let Some((first_seen, trace_id)) = self.arrivals.pop_front() {
            let current = self.traces.get(&trace_id).map(|t| t.first_seen);
            if current == Some(first_seen) {
                let trace = self.traces.remove(&trace_id)?;
                return Some(self.account_removed(trace_id, trace, trigger));
            }
        }
        None
    }

    /// From now on, traces can be parked (the storage log is on): the buffer tracks which
    /// traces hold spans in memory, oldest first.
    pub(crate) fn enable_parking(&mut self) {
        self.parking = true;
    }

    /// Parks the trace that has held spans in memory the longest: its spans are dropped from
    /// memory (the log records hold them, pinned) and read back when it is decided. Returns
    /// the bytes it no longer costs and the spans parked, or None when no trace can be parked.
    /// A parked trace that gets new spans holds them in memory and queues again, at the back:
    /// memory keeps the most recent spans. Only with parking enabled, where every span came
    /// in a log record.
    pub(crate) fn park_oldest(&mut self) -> Option<(usize, usize)> {
        while let Some(trace_id) = self.in_memory.pop_front() {
            let Some(trace) = self.traces.get_mut(&trace_id) else {
                continue;
            };
            if trace.spans.is_empty() || trace.records.is_empty() {
                continue;
            }
            let residual = parked_cost(trace.records.len());
            let freed = trace.cost.saturating_sub(residual);
            if freed == 0 {
                continue;
            }
            let spans = trace.spans.len();
            trace.parked = trace.records.len();
            trace.parked_spans += spans;
            trace.parked_bytes += freed;
            trace.spans = Vec::new();
            trace.cost = residual;
            self.cost -= freed;
            return Some((freed, spans));
        }
        None
    }

    /// Every trace still buffered, for shutdown.
    pub fn drain(&mut self, trigger: Trigger) -> Vec<DueTrace> {
        let traces = std::mem::take(&mut self.traces);
        self.schedule.clear();
        self.arrivals.clear();
        self.in_memory.clear();
        let mut out: Vec<DueTrace> = traces
            .into_iter()
            .map(|(trace_id, trace)| DueTrace {
                trace_id,
                trace,
                trigger,
            })
            .collect();
        out.sort_by_key(|d| d.trace.first_seen);
        self.cost = 0;
        self.spans = 0;
        out
    }

    /// Drops arrival entries of traces already decided, so the queue tracks live traces; the
    /// same for the front of the in-memory queue.
    fn prune_arrivals(&mut self) {
        while let Some(trace_id) = self.in_memory.front() {
            if self
                .traces
                .get(trace_id)
                .is_some_and(|t| !t.spans.is_empty())
            {
                break;
            }
            self.in_memory.pop_front();
        }
        while let Some((first_seen, trace_id)) = self.arrivals.front() {
            let live = self.traces.get(trace_id).map(|t| t.first_seen) == Some(*first_seen);
            if live {
                break;
            }
            self.arrivals.pop_front();
        }
    }

    /// The earliest time at which [`Self::pop_due`] may return a trace.
    pub(crate) fn next_wakeup(&self) -> Option<Nanos> {
        self.schedule.peek().map(|Reverse((at, _))| *at)
    }

    pub(crate) fn trace_count(&self) -> usize {
        self.traces.len()
    }

    pub(crate) fn span_count(&self) -> usize {
        self.spans
    }

    pub fn cost(&self) -> usize {
        self.cost
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }
}

/// Which shard owns a trace. Trace ids are random in their low bytes (W3C level 2 asks for
/// the rightmost 7 bytes to be random), so they spread evenly without hashing.
pub(crate) fn shard_of(trace_id: &TraceId, shards: usize) -> usize {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    // Multiply to mix the bytes before the modulo; shards is tiny.
    (u64::from_le_bytes(low).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;
    const S: Nanos = 1_000 * MS;

    fn timings() -> Timings {
        Timings::fixed(2 * S, 10 * S, 30 * S, 5)
    }

    pub(crate) fn span(parent: u8, len: usize) -> BufferedSpan {
        crate::trace::test_span(1, parent, vec![0u8; len])
    }

    fn tid(n: u8) -> TraceId {
        [n; 16]
    }

    fn insert(b: &mut TraceBuffer, id: u8, parent: u8, now: Nanos) -> Inserted {
        let s = span(parent, 100);
        let cost = s.cost();
        b.insert(tid(id), s, cost, now)
    }

    #[test]
    fn root_trace_is_decided_after_root_grace_not_decision_wait() {
        let mut b = TraceBuffer::new(timings());
        insert(&mut b, 1, 1, 0);
        insert(&mut b, 1, 0, S); // root arrives at 1 s
        assert!(b.pop_due(3 * S - 1).is_none());
        let due = b.pop_due(3 * S).expect("due after grace");
        assert_eq!(due.trigger, Trigger::RootGrace);
        assert_eq!(due.trace.spans.len(), 2);
        assert!(b.is_empty());
        assert_eq!(b.cost(), 0);
    }

    #[test]
    fn children_after_the_root_extend_the_grace() {
        let mut b = TraceBuffer::new(timings());
        insert(&mut b, 1, 0, 0);
        insert(&mut b, 1, 1, 1500 * MS);
        assert!(b.pop_due(2 * S).is_none());
        let due = b.pop_due(3500 * MS).unwrap();
        assert_eq!(
            (due.trigger, due.trace.spans.len()),
            (Trigger::RootGrace, 2)
        );
    }

    #[test]
    fn rootless_trace_waits_for_idle_then_decision_wait() {
        let mut b = TraceBuffer::new(timings());
        insert(&mut b, 1, 7, 0);
        assert!(b.pop_due(10 * S - 1).is_none());
        assert_eq!(b.pop_due(10 * S).unwrap().trigger, Trigger::TraceIdle);

        // A trace that keeps receiving spans is cut at decision_wait.
        for i in 0..=30 {
            insert(&mut b, 2, 7, i * S);
        }
        let due = b.pop_due(30 * S).unwrap();
        assert_eq!(due.trigger, Trigger::DecisionWait);
    }

    /// A span of trace `id` with its own span id and parent, of `kind`, from `service`.
    fn insert_span(b: &mut TraceBuffer, id: u8, (span, parent, kind): (u8, u8, u8), now: Nanos) {
        let mut s = crate::trace::test_span(span, parent, vec![0u8; 50]);
        s.kind = kind;
        let cost = s.cost();
        b.insert(tid(id), s, cost, now);
    }

    #[test]
    fn a_trace_with_a_missing_parent_waits_past_its_grace_up_to_the_idle_wait() {
        let mut b = TraceBuffer::new(timings());
        insert_span(&mut b, 1, (1, 0, 2), 0); // the root
        insert_span(&mut b, 1, (3, 2, 1), 0); // its parent, span 2, has not arrived
        assert!(b.pop_due(2 * S).is_none(), "not at the grace");
        // Span 2 arrives: the wait ends, and the grace counts from it.
        insert_span(&mut b, 1, (2, 1, 1), 4 * S);
        assert!(b.pop_due(6 * S - 1).is_none());
        let due = b.pop_due(6 * S).expect("complete, after the grace");
        assert_eq!(
            (due.trigger, due.trace.spans.len()),
            (Trigger::RootGrace, 3)
        );

        // Span 2 never comes: decided at the idle wait after the last span.
        insert_span(&mut b, 2, (1, 0, 2), 0);
        insert_span(&mut b, 2, (3, 2, 1), S);
        assert!(b.pop_due(11 * S - 1).is_none());
        let due = b.pop_due(11 * S).expect("decided at its cap");
        assert_eq!(due.trigger, Trigger::TraceIdle);
    }

    #[test]
    fn a_call_waits_for_its_server_span_only_where_the_callee_was_seen_instrumented() {
        let (server, client) = (KIND_SERVER, KIND_CLIENT);
        let mut t = timings();
        t.auto = Some(AutoGrace {
            min: 2 * S,
            quantile: 0.999,
        });
        let mut b = TraceBuffer::new(t);
        b.timings.max_spans_per_trace = 100;
        // Calls (all named "" here) are first seen served: the callee is instrumented.
        let mut now = 0;
        for id in 10..20u8 {
            insert_span(&mut b, id, (1, 0, server), now);
            insert_span(&mut b, id, (2, 1, client), now);
            insert_span(&mut b, id, (3, 2, server), now);
            now += 100 * S;
            while b.pop_due(now).is_some() {}
        }
        // A call without its server span: the trace waits past its grace.
        insert_span(&mut b, 1, (1, 0, server), now);
        insert_span(&mut b, 1, (2, 1, client), now);
        let grace = b.traces[&tid(1)].grace;
        assert!(b.pop_due(now + grace).is_none(), "waits for the callee");
        insert_span(&mut b, 1, (3, 2, server), now + S);
        let due = b.pop_due(now + S + grace).expect("served");
        assert_eq!(
            (due.trigger, due.trace.spans.len()),
            (Trigger::RootGrace, 3)
        );
    }

    #[test]
    fn a_call_into_what_is_not_instrumented_is_not_waited_for() {
        let mut b = TraceBuffer::new(timings());
        insert_span(&mut b, 1, (1, 0, KIND_SERVER), 0);
        insert_span(&mut b, 1, (2, 1, KIND_CLIENT), 0);
        let due = b.pop_due(2 * S).expect("at the grace");
        assert_eq!(due.trigger, Trigger::RootGrace);
    }

    #[test]
    fn a_learned_idle_wait_keeps_a_long_step_from_cutting_a_trace_before_its_root() {
        let mut t = timings();
        t.trace_idle = 3 * S;
        t.auto = Some(AutoGrace {
            min: S,
            quantile: 0.999,
        });
        let mut b = TraceBuffer::new(t);
        // Before any sample the wait is the start value, above the SDKs' 5 s delay.
        insert_span(&mut b, 1, (2, 1, 1), 0);
        assert!(b.pop_due(5 * S).is_none());
        insert_span(&mut b, 1, (1, 0, 2), 4 * S); // the root, after a 4 s step
        assert_eq!(b.pop_due(100 * S).unwrap().trace.spans.len(), 2);
        // Runs with 4 s steps teach the wait; short rootless traces then go at trace_idle's
        // floor no sooner than the gaps seen.
        for id in 2..60u8 {
            let at = id as Nanos * 100 * S;
            insert_span(&mut b, id, (2, 1, 1), at);
            insert_span(&mut b, id, (1, 0, 2), at + 4 * S);
            b.pop_due(at + 99 * S).expect("decided");
        }
        let idle = b.idle;
        assert!(idle > 4 * S && idle < 6 * S, "{idle}");
    }

    #[test]
    fn caps_are_reported_on_insert() {
        let mut b = TraceBuffer::new(timings());
        for i in 0..4 {
            assert_eq!(insert(&mut b, 1, 7, i), Inserted::Waiting);
        }
        assert_eq!(
            insert(&mut b, 1, 7, 5),
            Inserted::CapReached(Trigger::SpanCap)
        );
        let due = b.take(&tid(1), Trigger::SpanCap).unwrap();
        assert_eq!(due.trace.spans.len(), 5);
        assert_eq!(b.span_count(), 0);
    }

    #[test]
    fn oldest_first_under_pressure_and_drain_takes_everything() {
        let mut b = TraceBuffer::new(timings());
        insert(&mut b, 3, 7, 0);
        insert(&mut b, 1, 7, 1);
        insert(&mut b, 2, 7, 2);
        insert(&mut b, 3, 7, 3);
        let first = b.pop_oldest(Trigger::Memory).unwrap();
        assert_eq!((first.trace_id, first.trigger), (tid(3), Trigger::Memory));
        assert_eq!(first.trace.spans.len(), 2);
        assert_eq!(b.pop_oldest(Trigger::Memory).unwrap().trace_id, tid(1));
        let rest = b.drain(Trigger::Shutdown);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].trace_id, tid(2));
        assert!(b.is_empty() && b.cost() == 0 && b.span_count() == 0);
        assert!(b.pop_due(u64::MAX).is_none());
    }

    #[test]
    fn parking_takes_the_longest_in_memory_first_and_a_parked_trace_queues_again_with_new_spans() {
        let mut b = TraceBuffer::new(timings());
        b.enable_parking();
        let add = |b: &mut TraceBuffer, id: u8, record: u64, now: Nanos| {
            let s = span(7, 1000);
            let cost = s.cost();
            b.insert_from(tid(id), s, cost, now, Some(record));
        };
        add(&mut b, 1, 100, 0);
        add(&mut b, 2, 200, 1);
        add(&mut b, 1, 300, 2);
        let before = b.cost();
        let (freed, spans) = b.park_oldest().expect("trace 1 parks");
        assert_eq!(spans, 2);
        assert_eq!(b.cost(), before - freed);
        // Trace 1 gets a new span: it is in memory again, behind trace 2.
        add(&mut b, 1, 400, 3);
        assert_eq!(b.park_oldest().map(|(_, n)| n), Some(1), "trace 2 next");
        assert_eq!(
            b.park_oldest().map(|(_, n)| n),
            Some(1),
            "then trace 1's new span"
        );
        assert_eq!(b.park_oldest(), None, "everything is parked");
        let due = b.take(&tid(1), Trigger::SpanCap).expect("trace 1");
        let t = &due.trace;
        assert_eq!((t.parked, t.parked_spans, t.spans.len()), (3, 3, 0));
        assert_eq!(t.records, vec![100, 300, 400]);
        assert_eq!(
            t.cost,
            parked_cost(3),
            "a parked trace costs its index entry"
        );
        assert_eq!(b.span_count(), 1, "trace 2's parked span is still counted");
    }

    #[test]
    fn a_new_trace_reserves_for_the_size_of_those_decided_before_it() {
        let mut b = TraceBuffer::new(timings());
        b.timings.max_spans_per_trace = 1000;
        let mut id = 0u8;
        for _ in 0..40 {
            id = id.wrapping_add(1);
            for _ in 0..30 {
                insert(&mut b, id, 7, 0);
            }
            b.take(&tid(id), Trigger::SpanCap).expect("buffered");
        }
        insert(&mut b, 0, 7, 0);
        let due = b.take(&tid(0), Trigger::SpanCap).expect("buffered");
        assert!(
            (30..=32).contains(&due.trace.spans.capacity()),
            "{}",
            due.trace.spans.capacity()
        );
        // One huge trace does not make the next ones reserve for it.
        for _ in 0..5000 {
            insert(&mut b, 1, 7, 0);
        }
        b.take(&tid(1), Trigger::SpanCap).expect("buffered");
        insert(&mut b, 2, 7, 0);
        let due = b.take(&tid(2), Trigger::SpanCap).expect("buffered");
        assert!(due.trace.spans.capacity() <= MAX_SPAN_HINT);
    }

    #[test]
    fn cost_accounting_balances() {
        let mut b = TraceBuffer::new(timings());
        let mut total = 0;
        for i in 0..50u8 {
            let s = span(if i % 5 == 0 { 0 } else { 1 }, 10 + i as usize);
            total += s.cost();
            let c = s.cost();
            b.insert(tid(i % 7), s, c, i as u64 * MS);
        }
        assert_eq!(b.cost(), total);
        let mut taken = 0;
        while let Some(d) = b.pop_due(u64::MAX / 2) {
            taken += d.trace.cost;
        }
        assert_eq!(taken, total);
        assert_eq!(b.cost(), 0);
    }

    #[test]
    fn shards_spread_random_ids() {
        let mut counts = [0usize; 4];
        let mut x: u64 = 0x1234_5678;
        for _ in 0..4000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&x.to_le_bytes());
            counts[shard_of(&id, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
