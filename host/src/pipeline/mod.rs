//! The pipeline: decision workers that take traces from the buffer through the decision step
//! to the export queue. One thread owns one shard of the buffer, its decision memory and its
//! own decider, so nothing on the decision path takes a lock.
//!
//! Owns the order of a trace's last steps (decided, remembered, edited, stamped, queued) and
//! the counting of every span that leaves the buffer. Must never hold a span it was given
//! without handing it on or counting it.
//!
//! Receivers send it spans; it buffers them, decides traces as they come due (or early under
//! memory pressure, or all at shutdown), and passes kept traces to the export queue. It must
//! release every byte it was given to the memory budget and count every span it lets go.
//!
//! With the storage log on, a shard pins the log records its undecided traces came in, logs
//! each batch of decisions before acting on them, unpins a dropped trace's records once its
//! decision is logged, and hands a kept trace's records to the exporter, which unpins them
//! once they are delivered. At start it takes the traces replayed from the log
//! ([`ShardMsg::Replay`]), on the records' own time, and follows the logged decisions for
//! spans of traces decided before the stop.
//!
//! Under memory pressure with the log on, a shard first parks its oldest traces (their spans
//! leave memory; the pinned records in the log hold them) and reads a parked trace back just
//! before its decision, so a long `decision_wait` can hold far more than memory. Only when
//! parking frees nothing more does it decide the oldest early (trigger `memory`).
//!
//! With the log on, a dropped trace's records stay pinned for `buffer.revision_window`
//! ([`window`]). A late span in that time that could turn the verdict, an error span or the
//! root, re-runs the chain on the whole trace read back from the log; kept, the trace is
//! logged again (keep, trigger `rescue`), then exported whole. Other late spans follow the drop
//! but join the trace's records, so a later rescue exports them too. Only errors and roots
//! re-decide: a late span of another kind changes no verdict of the bundled policies but
//! duration-based ones, which the root's arrival covers, and each re-decision reads the trace
//! back from disk.

mod metrics;
mod window;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::buffer::{
    DecisionMemory, DueTrace, Inserted, MemoryBudget, PendingTrace, Remembered, Timings,
    TraceBuffer, shard_of,
};
use crate::clock::Clock;
use crate::decide::{self, Decider, DeciderFactory, Decision, TraceView};
use crate::export::{ExportQueue, KeptTrace};
use crate::storage::{DecisionRef, Exported, RecoveredDecision, Storage};
use crate::trace::{BufferedSpan, Nanos, Stamp, TraceId, Trigger};
use metrics::DecidedSeries;
pub(crate) use metrics::{PipelineMetrics, TimingBoard};
use window::{Revisable, Window};

/// Whether reading spans back goes through the shard's cache of parsed records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cache {
    Use,
    Bypass,
}

/// OTLP `STATUS_CODE_ERROR`.
const STATUS_ERROR: u8 = 2;

/// How often a worker publishes what it learned and forgets keys long unused.
const REPORT_EVERY: Nanos = 1_000_000_000;

/// How often a worker saves what it learned (and at shutdown).
const SAVE_EVERY: Nanos = 60 * REPORT_EVERY;

/// A span for a shard, with the bytes reserved for it in the memory budget.
pub struct ShardSpan {
    pub trace_id: TraceId,
    pub span: BufferedSpan,
    pub cost: usize,
}

pub enum ShardMsg {
    /// Spans of one request; `record` is its log position, pinned once for this message.
    Spans {
        spans: Vec<ShardSpan>,
        record: Option<u64>,
    },
    /// Decisions read back from the log at start, before any replayed span.
    Recovered(HashMap<TraceId, RecoveredDecision>),
    /// Spans of one record read back from the log, arriving `at` (their record time).
    Replay {
        spans: Vec<ShardSpan>,
        record: u64,
        at: Nanos,
    },
    /// Replay is over: recovered decisions go to the decision memory, the clock is live.
    ReplayDone,
    /// Decide everything buffered (trigger `shutdown`), then stop.
    Shutdown,
}

/// A decision followed by the spans replayed after a restart.
struct Followed {
    keep: bool,
    stamp: Arc<Stamp>,
    exported: HashSet<u64>,
}

/// What every worker shares.
#[derive(Clone)]
pub(crate) struct WorkerContext {
    pub(crate) timings: Timings,
    pub(crate) memory: Arc<MemoryBudget>,
    pub(crate) metrics: Arc<PipelineMetrics>,
    pub(crate) export: ExportQueue,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) remember_kept: usize,
    pub(crate) remember_dropped: usize,
    pub(crate) storage: Option<Arc<Storage>>,
    pub(crate) timing: Arc<TimingBoard>,
    /// Where each shard keeps what it learned of arrival between runs (with the storage
    /// log: `<storage.dir>/timing`); None: nowhere.
    pub(crate) timing_dir: Option<std::path::PathBuf>,
}

/// How often an idle worker looks at memory pressure; pressure raised by other shards must be
/// noticed even when this one receives nothing.
const PRESSURE_POLL: Duration = Duration::from_millis(20);

/// Messages handled before timers and pressure are looked at again, so a flood of spans cannot
/// starve decisions.
const MESSAGES_PER_ROUND: usize = 64;

/// Most traces decided in one batch: bounds the latency of the batch's first trace and the
/// memory lent to the decider at once.
const MAX_BATCH: usize = 256;

/// Oldest traces decided per batch under memory pressure, before pressure is looked at again.
const PRESSURE_BATCH: usize = 32;

/// Most parked spans read back for one batch of decisions.
const MAX_PARKED_PER_BATCH: usize = 1024;

/// Log records a shard keeps parsed while it reads parked traces back: the traces of one
/// request arrive, wait and come due together, so one read serves them all.
const PARKED_RECORDS_CACHED: usize = 16;

pub(crate) struct Workers {
    pub(crate) senders: Vec<Sender<ShardMsg>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    pub(crate) fn spawn(
        count: usize,
        ctx: WorkerContext,
        deciders: &dyn DeciderFactory,
    ) -> std::io::Result<Self> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = crossbeam_channel::unbounded();
            let mut worker = Worker::new(ctx.clone(), deciders.build(), count);
            worker.shard = i;
            let handle = std::thread::Builder::new()
                .name(format!("tailgate-worker-{i}"))
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| worker.run(rx));
                    if std::panic::catch_unwind(run).is_err() {
                        // A dead shard would take spans and never decide them. Exit so that
                        // the supervisor restarts tailgate and recovery replays the log.
                        tracing::error!(
                            shard = i,
                            "a decision worker panicked; exiting so that a restart recovers its traces from the storage log"
                        );
                        std::process::exit(70);
                    }
                })?;
            senders.push(tx);
            handles.push(handle);
        }
        Ok(Self { senders, handles })
    }

    /// Asks every worker to decide what it holds and stop, and waits until they have.
    pub(crate) fn shutdown(self) {
        for tx in &self.senders {
            let _ = tx.send(ShardMsg::Shutdown);
        }
        drop(self.senders);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Gauge values this worker last added, so it can publish its share as deltas.
#[derive(Default)]
struct Reported {
    bytes: i64,
    spans: i64,
    traces: i64,
}

struct Worker {
    buffer: TraceBuffer,
    decisions: DecisionMemory<Stamp>,
    decider: Box<dyn Decider>,
    ctx: WorkerContext,
    reported: Reported,
    /// Decisions from before a restart, while the log is replayed.
    followed: HashMap<TraceId, Followed>,
    replaying: bool,
    /// The record time of the last replayed message: the clock while replaying.
    replay_now: Nanos,
    /// How many shards share the memory budget, and which one this is.
    shards: usize,
    shard: usize,
    /// Log records read back for parked traces, parsed by trace, newest last.
    parked_records: std::collections::VecDeque<(u64, HashMap<TraceId, Vec<BufferedSpan>>)>,
    /// This worker's `traces_decided` series.
    decided: DecidedSeries,
    /// Traces decided within the revision window.
    window: Window,
    /// When this worker last published what it learned, and last saved it.
    reported_at: Nanos,
    saved_at: Nanos,
}

impl Worker {
    /// One of `shards` workers: its share of the decision memory.
    fn new(ctx: WorkerContext, decider: Box<dyn Decider>, shards: usize) -> Self {
        let mut buffer = TraceBuffer::new(ctx.timings);
        let window = Window::new(ctx.timings.revision_window);
        if ctx.storage.is_some() {
            buffer.enable_parking();
        }
        Worker {
            buffer,
            decisions: DecisionMemory::new(
                ctx.remember_kept.div_ceil(shards),
                ctx.remember_dropped.div_ceil(shards),
            ),
            decider,
            ctx,
            reported: Reported::default(),
            followed: HashMap::new(),
            replaying: false,
            replay_now: 0,
            shards,
            shard: 0,
            parked_records: std::collections::VecDeque::new(),
            decided: DecidedSeries::default(),
            window,
            reported_at: 0,
            saved_at: 0,
        }
    }

    fn run(&mut self, rx: Receiver<ShardMsg>) {
        self.load_learned();
        loop {
            let now = self.ctx.clock.now();
            let wait = self
                .buffer
                .next_wakeup()
                .map(|at| Duration::from_nanos(at.saturating_sub(now)))
                .unwrap_or(PRESSURE_POLL)
                .min(PRESSURE_POLL);
            let mut stop = false;
            match rx.recv_timeout(wait) {
                Ok(msg) => stop = self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            for _ in 0..MESSAGES_PER_ROUND {
                if stop {
                    break;
                }
                match rx.try_recv() {
                    Ok(msg) => stop = self.handle(msg),
                    Err(_) => break,
                }
            }
            if stop {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                for due in self.buffer.drain(Trigger::Shutdown) {
                    batch.push(due);
                    if batch.len() == MAX_BATCH {
                        self.decide_batch(&mut batch);
                    }
                }
                self.decide_batch(&mut batch);
                // Nothing will be rescued now: the window's records go, so the checkpoint
                // holds only what a restart needs.
                while let Some(entry) = self.window.pop_oldest() {
                    self.unpin(&entry.records);
                }
                self.publish_gauges();
                self.save_learned();
                return;
            }
            let now = if self.replaying {
                self.replay_now
            } else {
                self.ctx.clock.now()
            };
            self.decide_due(now);
            self.publish_gauges();
            if !self.replaying && now.saturating_sub(self.reported_at) >= REPORT_EVERY {
                self.reported_at = now;
                let learned = self.buffer.learned();
                learned.forget_unused(now);
                let report = learned.report();
                self.ctx.timing.publish(self.shard, report);
                if now.saturating_sub(self.saved_at) >= SAVE_EVERY {
                    self.saved_at = now;
                    self.save_learned();
                }
            }
        }
    }

    fn learned_file(&self) -> Option<std::path::PathBuf> {
        let dir = self.ctx.timing_dir.as_ref()?;
        self.ctx.timings.auto?;
        Some(dir.join(format!("timing-{}.json", self.shard)))
    }

    /// Takes back what this shard learned in the run before, if it saved anything.
    fn load_learned(&mut self) {
        let Some(path) = self.learned_file() else {
            return;
        };
        let saved = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the learned timing; learning it anew");
                return;
            }
        };
        match serde_json::from_slice(&saved) {
            Ok(saved) => self.buffer.restore_learned(saved, self.ctx.clock.now()),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the learned timing does not parse; learning it anew")
            }
        }
    }

    /// Saves what this shard learned, for the next run: written aside, then renamed over.
    fn save_learned(&mut self) {
        let Some(path) = self.learned_file() else {
            return;
        };
        let saved = self.buffer.learned().save();
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let aside = path.with_extension("json.tmp");
            std::fs::write(&aside, serde_json::to_vec(&saved)?)?;
            std::fs::rename(&aside, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the learned timing");
        }
    }

    /// Returns true when the worker must stop.
    fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Spans { spans, record } => {
                let now = self.ctx.clock.now();
                self.insert(spans, record, now);
                false
            }
            ShardMsg::Recovered(decisions) => {
                self.replaying = true;
                self.follow(decisions);
                false
            }
            ShardMsg::Replay { spans, record, at } => {
                self.replaying = true;
                self.replay_now = self.replay_now.max(at);
                // Triggers fire on the records' time, as they would have live: what was due
                // before this record arrived is decided before it is taken.
                self.decide_due(self.replay_now);
                self.insert(spans, Some(record), at);
                false
            }
            ShardMsg::ReplayDone => {
                self.end_replay();
                false
            }
            ShardMsg::Shutdown => true,
        }
    }

    fn pin(&self, record: u64) {
        if let Some(storage) = &self.ctx.storage {
            storage.pins.pin(record);
        }
    }

    fn unpin(&self, records: &[u64]) {
        if let Some(storage) = &self.ctx.storage {
            records.iter().for_each(|r| storage.pins.unpin(*r));
        }
    }

    /// Takes the decisions logged before a restart, for the replay that follows.
    fn follow(&mut self, decisions: HashMap<TraceId, RecoveredDecision>) {
        for (trace_id, r) in decisions {
            let d = r.decision;
            let decision = Decision {
                keep: d.keep,
                policy: Arc::from(d.policy),
                reason: Arc::from(d.reason),
                probability: d.probability,
                edits: Vec::new(),
            };
            self.followed.insert(
                trace_id,
                Followed {
                    keep: d.keep,
                    stamp: Arc::new(decide::stamp(&decision, d.trigger)),
                    exported: r.exported,
                },
            );
        }
    }

    /// Replay is over: the decisions it followed are remembered for late spans.
    fn end_replay(&mut self) {
        for (trace_id, f) in std::mem::take(&mut self.followed) {
            if f.keep {
                self.decisions.remember_kept(trace_id, f.stamp);
            } else {
                self.decisions.remember_dropped(&trace_id);
            }
        }
        self.replaying = false;
    }

    /// Takes the spans of one request (or one replayed record) at `now`. A trace that reaches
    /// a cap is decided after the whole message is in, so the spans one record brought a trace
    /// always leave together (the exporter's record of what it delivered is per trace and
    /// record).
    fn insert(&mut self, spans: Vec<ShardSpan>, record: Option<u64>, now: Nanos) {
        let mut late: HashMap<TraceId, (Arc<Stamp>, Vec<BufferedSpan>)> = HashMap::new();
        let mut reexport: HashMap<TraceId, (Arc<Stamp>, Vec<BufferedSpan>)> = HashMap::new();
        let mut capped: Vec<(TraceId, Trigger)> = Vec::new();
        let mut revisit: HashMap<TraceId, Vec<BufferedSpan>> = HashMap::new();
        let mut recovered = 0u64;
        for ShardSpan {
            trace_id,
            span,
            cost,
        } in spans
        {
            if let Some(f) = self.followed.get(&trace_id) {
                // Decided before the restart: follow the logged decision, never decide anew.
                self.ctx.memory.release(cost);
                if f.keep && !record.is_some_and(|r| f.exported.contains(&r)) {
                    reexport
                        .entry(trace_id)
                        .or_insert_with(|| (f.stamp.clone(), Vec::new()))
                        .1
                        .push(span);
                }
                continue;
            }
            if self.replaying {
                recovered += 1;
            }
            match self.decisions.recall(&trace_id) {
                None => {
                    let (inserted, new_record) =
                        self.buffer.insert_from(trace_id, span, cost, now, record);
                    if new_record && let Some(r) = record {
                        self.pin(r);
                    }
                    if let Inserted::CapReached(trigger) = inserted
                        && !capped.iter().any(|(t, _)| *t == trace_id)
                    {
                        capped.push((trace_id, trigger));
                    }
                }
                Some(Remembered::Kept(stamp)) => {
                    self.ctx.memory.release(cost);
                    self.learn_late(&trace_id, &span, now);
                    late.entry(trace_id)
                        .or_insert_with(|| (Arc::new(decide::late_stamp(&stamp)), Vec::new()))
                        .1
                        .push(span);
                }
                Some(Remembered::Dropped) => {
                    self.ctx.memory.release(cost);
                    self.learn_late(&trace_id, &span, now);
                    if self.window.get_mut(&trace_id).is_some_and(|e| e.rescuable) {
                        revisit.entry(trace_id).or_default().push(span);
                        continue;
                    }
                    self.ctx.metrics.late(false, 1);
                    self.ctx.metrics.dropped(Trigger::Late, 1);
                }
            }
        }
        for (trace_id, spans) in revisit {
            self.revisit(trace_id, spans, record, now);
        }
        for (trace_id, trigger) in capped {
            if let Some(due) = self.buffer.take(&trace_id, trigger) {
                self.decide(due);
            }
        }
        let settle = |trace_id: TraceId| {
            record.map(|r| Exported {
                trace_id,
                records: vec![r],
            })
        };
        for (trace_id, (stamp, mut spans)) in late {
            let n = spans.len() as u64;
            self.ctx.metrics.late(true, n);
            // Late spans of a kept trace go through the enrichments too (redaction above all).
            let edits = self.decider.enrich_late(&mut TraceView {
                trace_id: &trace_id,
                spans: &mut spans,
            });
            let mut trimmed = 0;
            if !edits.is_empty() {
                let enriched = Decision {
                    keep: true,
                    policy: stamp.policy.clone(),
                    edits,
                    ..Decision::default()
                };
                trimmed = decide::apply(&enriched, &mut spans) as u64;
                if trimmed > 0 {
                    self.ctx.metrics.dropped(Trigger::Late, trimmed);
                    self.ctx.metrics.trimmed(&stamp.policy, trimmed);
                }
            }
            self.ctx.metrics.kept(Trigger::Late, n - trimmed);
            record.inspect(|r| self.pin(*r));
            self.ctx.export.push(KeptTrace {
                spans,
                stamp,
                settle: settle(trace_id),
            });
        }
        for (trace_id, (stamp, spans)) in reexport {
            if let Some(storage) = &self.ctx.storage {
                storage.metrics.reexported_spans.inc_by(spans.len() as u64);
            }
            record.inspect(|r| self.pin(*r));
            self.ctx.export.push(KeptTrace {
                spans,
                stamp,
                settle: settle(trace_id),
            });
        }
        if let Some(storage) = &self.ctx.storage {
            storage.metrics.recovered_spans.inc_by(recovered);
            // The message's own pin: the traces that need the record hold pins of their own.
            record.inspect(|r| storage.pins.unpin(*r));
        }
    }

    /// A span arrived for a trace decided within the window: if the decision waited for the
    /// trace's arrival, the gap since its last span is one that wait did not cover.
    fn learn_late(&mut self, trace_id: &TraceId, span: &BufferedSpan, now: Nanos) {
        let Some(entry) = self.window.get_mut(trace_id) else {
            return;
        };
        let gap = now.saturating_sub(entry.last_seen);
        if entry.timed && gap > 0 {
            self.buffer.learn_late(entry.root_key, entry.rooted, gap);
        }
        entry.last_seen = now;
        entry.rooted |= span.is_root();
    }

    /// Late spans of a dropped trace still in the window. With an error span or the root
    /// among them, the chain decides the whole trace again, read back from the log; kept, it
    /// is rescued. Otherwise, or if still dropped, they follow the drop and their record joins
    /// the trace's, for a later rescue.
    fn revisit(
        &mut self,
        trace_id: TraceId,
        late: Vec<BufferedSpan>,
        record: Option<u64>,
        now: Nanos,
    ) {
        let n = late.len() as u64;
        let turns = (late.iter()).any(|s| s.status_code == STATUS_ERROR || s.is_root());
        if turns && self.redecide(trace_id, late, record, now) {
            return;
        }
        self.ctx.metrics.late(false, n);
        self.ctx.metrics.dropped(Trigger::Late, n);
        if let Some(r) = record
            && let Some(entry) = self.window.get_mut(&trace_id)
            && !entry.records.contains(&r)
        {
            entry.records.push(r);
            self.pin(r);
        }
    }

    /// Runs the chain on a dropped trace read back whole, with its `late` spans; rescues it
    /// if kept. Returns whether it was.
    fn redecide(
        &mut self,
        trace_id: TraceId,
        late: Vec<BufferedSpan>,
        record: Option<u64>,
        now: Nanos,
    ) -> bool {
        let n = late.len() as u64;
        let records = (self.window.get_mut(&trace_id))
            .map(|e| e.records.clone())
            .unwrap_or_default();
        let mut spans = self.read_back(&trace_id, &records, Vec::new(), Cache::Bypass);
        let earlier = spans.len() as u64;
        spans.extend(late);
        let mut decisions = Vec::with_capacity(1);
        self.decider.decide_batch(
            &mut [TraceView {
                trace_id: &trace_id,
                spans: &mut spans,
            }],
            &mut decisions,
        );
        let Some(decision) = decisions.pop().filter(|d| d.keep) else {
            return false;
        };
        let Some(mut entry) = self.window.remove(&trace_id) else {
            return false;
        };
        self.ctx.metrics.revisable(-1);
        if let Some(r) = record
            && !entry.records.contains(&r)
        {
            self.pin(r);
            entry.records.push(r);
        }
        self.ctx.metrics.late(true, n);
        self.rescue(trace_id, spans, earlier, entry.records, decision, now);
        true
    }

    /// Keeps a dropped trace after all: logs the new decision, then exports it whole. `earlier`
    /// of its spans had been counted dropped.
    fn rescue(
        &mut self,
        trace_id: TraceId,
        mut spans: Vec<BufferedSpan>,
        earlier: u64,
        records: Vec<u64>,
        decision: Decision,
        now: Nanos,
    ) {
        let trigger = Trigger::Rescue;
        if let Some(storage) = &self.ctx.storage {
            // Before the export: a restart follows the keep, not the drop it replaces.
            let logged = [DecisionRef {
                trace_id: &trace_id,
                keep: true,
                trigger,
                probability: decision.probability,
                policy: &decision.policy,
                reason: &decision.reason,
            }];
            if let Err(e) = storage.log_decisions(&logged) {
                tracing::error!(error = %e, "cannot log a rescue; exporting it all the same");
            }
        }
        let metrics = &self.ctx.metrics;
        metrics.rescued(&decision.policy, earlier);
        metrics.decided(
            &mut self.decided,
            trigger,
            true,
            &decision.policy,
            Duration::from_nanos(self.ctx.clock.now().saturating_sub(now)),
        );
        let stamp = self.keep(trace_id, &mut spans, &decision, trigger);
        self.ctx.export.push(KeptTrace {
            spans,
            stamp,
            settle: (!records.is_empty()).then_some(Exported { trace_id, records }),
        });
    }

    /// Unpins the records of traces whose window ended: expired, or, while the log is short
    /// of disk, the oldest.
    fn close_window(&mut self, now: Nanos) {
        let mut closed = 0i64;
        while let Some(entry) = self.window.pop_expired(now) {
            self.unpin(&entry.records);
            closed += 1;
        }
        if let Some(storage) = self.ctx.storage.clone() {
            while storage.under_pressure() && closed < PRESSURE_BATCH as i64 * 8 {
                let Some(entry) = self.window.pop_oldest() else {
                    break;
                };
                self.unpin(&entry.records);
                closed += 1;
            }
        }
        if closed > 0 {
            self.ctx.metrics.revisable(-closed);
        }
    }

    /// Decides every trace that is due, in batches: the decider may then enter each policy
    /// once per batch instead of once per trace, so the busier the worker, the cheaper each
    /// decision.
    fn decide_due(&mut self, now: Nanos) {
        self.close_window(now);
        let mut batch = Vec::new();
        let mut parked = 0;
        while let Some(due) = self.buffer.pop_due(now) {
            parked += due.trace.parked_spans;
            batch.push(due);
            // Parked spans are read back for the batch: bound what it holds at once.
            if batch.len() == MAX_BATCH || parked >= MAX_PARKED_PER_BATCH {
                self.decide_batch(&mut batch);
                parked = 0;
            }
        }
        self.decide_batch(&mut batch);
        // Under pressure, the oldest traces go a few at a time: pressure is rechecked after
        // each batch has released its bytes.
        loop {
            self.park_under_pressure();
            // With parking, what memory still holds past it is mostly in flight to the shards
            // (and refused at the receivers when full): a shard decides early only once its
            // own buffer, the parked traces' index and its recent spans, holds its share.
            let holds_its_share = self.ctx.storage.is_none()
                || self.buffer.cost() >= self.ctx.memory.pressure_share(self.shards);
            let trigger = if self.ctx.memory.under_pressure() && holds_its_share {
                Trigger::Memory
            } else if self
                .ctx
                .storage
                .as_ref()
                .is_some_and(|s| s.under_pressure())
            {
                Trigger::Disk
            } else {
                break;
            };
            while batch.len() < PRESSURE_BATCH {
                let Some(due) = self.buffer.pop_oldest(trigger) else {
                    break;
                };
                batch.push(due);
            }
            if batch.is_empty() {
                break;
            }
            self.decide_batch(&mut batch);
        }
    }

    /// With the log on, parks the oldest traces while memory is under pressure.
    fn park_under_pressure(&mut self) {
        let Some(storage) = &self.ctx.storage else {
            return;
        };
        while self.ctx.memory.under_pressure() {
            let Some((freed, spans)) = self.buffer.park_oldest() else {
                break;
            };
            self.ctx.memory.release(freed);
            storage.metrics.parked_spans.inc_by(spans as i64);
        }
    }

    /// Reads a parked trace's spans back from the log before its decision: those it parked,
    /// then those that arrived since. A span that cannot be read back (the record is damaged)
    /// is counted dropped, with an error naming the record.
    fn unpark(&mut self, due: &mut DueTrace) {
        if due.trace.parked == 0 || self.ctx.storage.is_none() {
            return;
        }
        let trace = &mut due.trace;
        let into = Vec::with_capacity(trace.span_total());
        let parked = std::mem::take(&mut trace.parked_spans);
        let records = &trace.records[..trace.parked];
        let mut spans = self.read_back(&due.trace_id, records, into, Cache::Use);
        if let Some(storage) = &self.ctx.storage {
            storage.metrics.parked_spans.dec_by(parked as i64);
        }
        if spans.len() < parked {
            let lost = (parked - spans.len()) as u64;
            self.ctx.metrics.dropped(due.trigger, lost);
            tracing::error!(
                lost,
                "spans of a parked trace could not be read back from the log"
            );
        }
        spans.append(&mut trace.spans);
        trace.spans = spans;
        trace.parked = 0;
        trace.parked_bytes = 0;
    }

    /// The spans of `trace_id` in the log records at `positions`, appended to `spans`. A
    /// record that cannot be read or parsed is skipped, counted corrupt, with an error naming
    /// it. Parked traces (`Cache::Use`) share a cache of parsed records, each trace taking its
    /// spans out; a rescue (`Cache::Bypass`) reads past it, since the spans it needs may have
    /// been taken out of a cached record when the trace was unparked.
    fn read_back(
        &mut self,
        trace_id: &TraceId,
        positions: &[u64],
        mut spans: Vec<BufferedSpan>,
        cache: Cache,
    ) -> Vec<BufferedSpan> {
        let use_cache = cache == Cache::Use;
        let Some(storage) = self.ctx.storage.clone() else {
            return spans;
        };
        for &position in positions {
            let cached = (self.parked_records.iter())
                .position(|(p, _)| *p == position)
                .filter(|_| use_cache);
            let index = match cached {
                Some(i) => i,
                None => match storage.read_spans(position) {
                    Ok(body) => {
                        // Only this shard's traces: the others read their own.
                        let mut by_trace: HashMap<TraceId, Vec<BufferedSpan>> = HashMap::new();
                        let (shard, shards) = (self.shard, self.shards);
                        let parsed = crate::otlp::spans::for_each_span(&body, |id, span, _| {
                            if shard_of(&id, shards) == shard {
                                by_trace.entry(id).or_default().push(span);
                            }
                        });
                        if let Err(e) = parsed {
                            storage.metrics.corrupt_records.inc();
                            tracing::error!(position, error = %e, "a buffered trace's record does not parse");
                            continue;
                        }
                        if !use_cache {
                            spans.extend(by_trace.remove(trace_id).unwrap_or_default());
                            continue;
                        }
                        if self.parked_records.len() == PARKED_RECORDS_CACHED {
                            self.parked_records.pop_front();
                        }
                        self.parked_records.push_back((position, by_trace));
                        self.parked_records.len() - 1
                    }
                    Err(e) => {
                        storage.metrics.corrupt_records.inc();
                        tracing::error!(position, error = %e, "cannot read a buffered trace's record back");
                        continue;
                    }
                },
            };
            if let Some(own) = self.parked_records[index].1.remove(trace_id) {
                spans.extend(own);
            }
        }
        spans
    }

    /// Decides one trace on its own (a trace that hit a cap while its spans arrived).
    fn decide(&mut self, due: DueTrace) {
        self.decide_batch(&mut vec![due]);
    }

    /// Decides the traces in `batch` together and acts on each decision; leaves it empty.
    fn decide_batch(&mut self, batch: &mut Vec<DueTrace>) {
        if batch.is_empty() {
            return;
        }
        for due in batch.iter_mut() {
            self.unpark(due);
        }
        let mut decisions = Vec::with_capacity(batch.len());
        {
            let mut views: Vec<TraceView<'_>> = (batch.iter_mut())
                .map(|due| TraceView {
                    trace_id: &due.trace_id,
                    spans: &mut due.trace.spans,
                })
                .collect();
            self.decider.decide_batch(&mut views, &mut decisions);
        }
        if let Some(storage) = &self.ctx.storage {
            // Before any effect: a restart follows these and never decides the traces anew.
            let logged: Vec<DecisionRef<'_>> = (batch.iter().zip(&decisions))
                .map(|(due, d)| DecisionRef {
                    trace_id: &due.trace_id,
                    keep: d.keep,
                    trigger: due.trigger,
                    probability: d.probability,
                    policy: &d.policy,
                    reason: &d.reason,
                })
                .collect();
            if let Err(e) = storage.log_decisions(&logged) {
                tracing::error!(error = %e, "cannot log decisions; acting on them all the same");
            }
        }
        let mut decisions = decisions.into_iter();
        for due in batch.drain(..) {
            // A decider owes one decision per trace; should one fall short, keep rather than
            // lose the trace.
            let decision = decisions.next().unwrap_or_else(|| {
                tracing::error!("the decider returned no decision for a trace; keeping it");
                Decision {
                    keep: true,
                    policy: std::sync::Arc::from("default"),
                    reason: std::sync::Arc::from("no decision"),
                    ..Decision::default()
                }
            });
            self.finish(due, decision);
        }
    }

    /// Acts on one decision: metrics, the memory budget, the decision memory, the export.
    fn finish(&mut self, due: DueTrace, decision: Decision) {
        let DueTrace {
            trace_id,
            mut trace,
            trigger,
        } = due;
        let now = self.ctx.clock.now();
        // What tailgate added: the wait since the trace's last span, not the senders' delays
        // before it (a root may come 5 s before another service's spans).
        let metrics = &self.ctx.metrics;
        let lag = Duration::from_nanos(now.saturating_sub(trace.last_seen));
        metrics.decided(
            &mut self.decided,
            trigger,
            decision.keep,
            &decision.policy,
            lag,
        );
        self.ctx.memory.release(trace.cost);
        if decision.keep {
            let stamp = self.keep(trace_id, &mut trace.spans, &decision, trigger);
            if self.window.is_on() && self.ctx.timings.auto.is_some() {
                // Not to rescue: to learn from its late spans.
                self.hold(trace_id, &trace, trigger, false, now);
            }
            // The trace's record pins pass to the exporter, which releases them on delivery.
            let settle = (!trace.records.is_empty()).then(|| Exported {
                trace_id,
                records: std::mem::take(&mut trace.records),
            });
            self.ctx.export.push(KeptTrace {
                spans: trace.spans,
                stamp,
                settle,
            });
        } else {
            metrics.dropped(trigger, trace.spans.len() as u64);
            self.decisions.remember_dropped(&trace_id);
            // A late span may rescue it from the log, where a record of each of its spans is
            // pinned; a trace dropped to free the disk lets its records go.
            let rescuable = self.window.is_on()
                && self.ctx.storage.is_some()
                && !trace.records.is_empty()
                && trigger != Trigger::Disk
                && trigger != Trigger::Shutdown;
            if rescuable || (self.window.is_on() && self.ctx.timings.auto.is_some()) {
                self.hold(trace_id, &trace, trigger, rescuable, now);
            }
            if !rescuable {
                // The drop is logged: nothing needs these records any more.
                self.unpin(&trace.records);
            }
        }
    }

    /// Applies a keep's edits to `spans`, counts them (trimmed spans leave by a decision too:
    /// dropped), and remembers the keep; returns the stamp its spans carry.
    fn keep(
        &mut self,
        trace_id: TraceId,
        spans: &mut Vec<BufferedSpan>,
        decision: &Decision,
        trigger: Trigger,
    ) -> Arc<Stamp> {
        let metrics = &self.ctx.metrics;
        let before = spans.len() as u64;
        let trimmed = decide::apply(decision, spans) as u64;
        if trimmed > 0 {
            metrics.dropped(trigger, trimmed);
            metrics.trimmed(&decision.policy, trimmed);
        }
        metrics.kept(trigger, before - trimmed);
        let stamp = Arc::new(decide::stamp(decision, trigger));
        self.decisions.remember_kept(trace_id, stamp.clone());
        stamp
    }

    /// Holds a decided trace in the revision window; a rescuable one with its records.
    fn hold(
        &mut self,
        trace_id: TraceId,
        trace: &PendingTrace,
        trigger: Trigger,
        rescuable: bool,
        now: Nanos,
    ) {
        let timed = matches!(trigger, Trigger::RootGrace | Trigger::TraceIdle);
        let mut entry = Revisable::new(
            rescuable,
            timed,
            trace.root_seen.is_some(),
            trace.root_key,
            trace.last_seen,
        );
        if rescuable {
            entry.records = trace.records.clone();
        }
        match self.window.insert(trace_id, entry, now) {
            Some(out) => self.unpin(&out.records),
            None => self.ctx.metrics.revisable(1),
        }
    }

    fn publish_gauges(&mut self) {
        let now = Reported {
            bytes: self.buffer.cost() as i64,
            spans: self.buffer.span_count() as i64,
            traces: self.buffer.trace_count() as i64,
        };
        self.ctx.metrics.buffered(
            now.bytes - self.reported.bytes,
            now.spans - self.reported.spans,
            now.traces - self.reported.traces,
        );
        self.reported = now;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;
    use crate::clock::ManualClock;
    use crate::telemetry::Registry;

    const S: Duration = Duration::from_secs(1);

    /// Keeps a trace with an error span, drops the rest.
    struct KeepErrors;

    impl Decider for KeepErrors {
        fn decide(&mut self, trace: &mut TraceView<'_>) -> Decision {
            let keep = trace.spans.iter().any(|s| s.status_code == 2);
            Decision {
                keep,
                policy: Arc::from("errors"),
                reason: Arc::from(if keep { "error" } else { "no error" }),
                ..Decision::default()
            }
        }
    }

    struct Harness {
        worker: Worker,
        clock: Arc<ManualClock>,
        memory: Arc<MemoryBudget>,
        exported: UnboundedReceiver<KeptTrace>,
        registry: Arc<Registry>,
    }

    fn harness(memory_limit: usize, max_spans_per_trace: usize) -> Harness {
        let registry = Registry::new();
        let clock = Arc::new(ManualClock::default());
        let memory = Arc::new(MemoryBudget::new(memory_limit));
        let (export, exported) = ExportQueue::detached(1 << 20, &registry);
        let nanos = |d: Duration| d.as_nanos() as u64;
        let ctx = WorkerContext {
            timings: Timings::fixed(
                nanos(2 * S),
                nanos(10 * S),
                nanos(30 * S),
                max_spans_per_trace,
            ),
            memory: memory.clone(),
            metrics: PipelineMetrics::new(&registry),
            export,
            clock: clock.clone(),
            remember_kept: 100,
            remember_dropped: 100,
            storage: None,
            timing: TimingBoard::new(&registry),
            timing_dir: None,
        };
        Harness {
            worker: Worker::new(ctx, Box::new(KeepErrors), 1),
            clock,
            memory,
            exported,
            registry,
        }
    }

    fn span(id: u8, parent: u8, error: bool) -> BufferedSpan {
        let mut span = crate::trace::test_span(id, parent, vec![0; 100]);
        span.status_code = if error { 2 } else { 0 };
        span
    }

    impl Harness {
        /// Sends spans as a receiver would: reserved in the budget first.
        fn receive(&mut self, trace: u8, spans: Vec<BufferedSpan>) {
            let spans = spans
                .into_iter()
                .map(|mut span| {
                    span.bytes = vec![trace; 100].into_boxed_slice();
                    let cost = span.cost();
                    assert!(self.memory.try_reserve(cost), "the budget refused a span");
                    ShardSpan {
                        trace_id: [trace; 16],
                        span,
                        cost,
                    }
                })
                .collect();
            assert!(!self.worker.handle(ShardMsg::Spans {
                spans,
                record: None
            }));
        }

        fn tick(&mut self, by: Duration) {
            self.clock.advance(by);
            self.worker.decide_due(self.clock.now());
            self.worker.publish_gauges();
        }

        /// Every kept trace queued so far: (trace id byte, span count, `sampling.trigger`).
        fn exported(&mut self) -> Vec<(u8, usize, String)> {
            let mut out = Vec::new();
            while let Ok(kept) = self.exported.try_recv() {
                // The stamp is a run of encoded span attributes, readable as a span's.
                let trigger = match crate::otlp::wire::span_attribute(
                    &kept.stamp.encoded,
                    "sampling.trigger",
                ) {
                    Some(crate::otlp::wire::AnyValueRef::Str(t)) => t.to_owned(),
                    other => panic!("no sampling.trigger in the stamp: {other:?}"),
                };
                // Every span's bytes are its trace's id byte (see `receive`).
                out.push((kept.spans[0].bytes[0], kept.spans.len(), trigger));
            }
            out
        }
    }

    #[test]
    fn a_root_span_decides_its_trace_after_the_quiet_grace() {
        let mut h = harness(1 << 20, 100);
        h.receive(1, vec![span(2, 1, true)]);
        h.receive(1, vec![span(1, 0, false)]);
        h.tick(S);
        h.receive(1, vec![span(3, 1, false)]);
        // The span after the root extends the grace: 2 s from it, not from the root.
        h.tick(S + S / 2);
        assert!(h.exported().is_empty(), "decided before its grace");
        h.tick(S);
        assert_eq!(h.exported(), vec![(1, 3, "root_grace".to_owned())]);
        assert_eq!(
            h.registry
                .value("tailgate_spans_kept_total{trigger=\"root_grace\"}"),
            3.0
        );
        assert_eq!(h.memory.used(), 0, "every byte is released");
        assert_eq!(h.registry.value("tailgate_buffer_spans"), 0.0);
    }

    #[test]
    fn a_trace_without_a_root_is_decided_when_idle_and_drops_are_counted() {
        let mut h = harness(1 << 20, 100);
        h.receive(1, vec![span(2, 1, false), span(3, 1, false)]);
        h.tick(S);
        assert_eq!(h.registry.value("tailgate_buffer_spans"), 2.0);
        h.tick(9 * S);
        assert!(h.exported().is_empty(), "dropped: nothing exported");
        assert_eq!(
            h.registry
                .value("tailgate_spans_dropped_total{trigger=\"trace_idle\"}"),
            2.0
        );
        assert_eq!(h.registry.value("tailgate_buffer_spans"), 0.0);
        assert_eq!(h.memory.used(), 0);
    }

    #[test]
    fn a_trace_at_its_span_cap_is_decided_at_once() {
        let mut h = harness(1 << 20, 3);
        h.receive(
            1,
            vec![span(2, 1, true), span(3, 1, false), span(4, 1, false)],
        );
        assert_eq!(h.exported(), vec![(1, 3, "span_cap".to_owned())]);
    }

    #[test]
    fn memory_pressure_decides_the_oldest_traces_first() {
        let cost = span(1, 0, true).cost();
        // Room for ten spans; pressure starts past nine.
        let mut h = harness(cost * 10, 100);
        for t in 1..=10u8 {
            h.receive(t, vec![span(2, 1, true)]);
            h.clock.advance(Duration::from_millis(1));
        }
        h.tick(Duration::ZERO);
        let exported = h.exported();
        assert!(!exported.is_empty(), "pressure decided nothing");
        assert!(
            exported.iter().all(|(_, _, trigger)| trigger == "memory"),
            "{exported:?}"
        );
        let ids: Vec<u8> = exported.iter().map(|(t, _, _)| *t).collect();
        let oldest: Vec<u8> = (1..=ids.len() as u8).collect();
        assert_eq!(ids, oldest, "the oldest go first");
        assert!(!h.memory.under_pressure());
    }

    #[test]
    fn late_spans_follow_their_traces_decision() {
        let mut h = harness(1 << 20, 100);
        h.receive(1, vec![span(1, 0, true)]);
        h.receive(2, vec![span(1, 0, false)]);
        h.tick(3 * S);
        assert_eq!(h.exported(), vec![(1, 1, "root_grace".to_owned())]);
        h.receive(1, vec![span(5, 1, false)]);
        h.receive(2, vec![span(5, 1, true)]);
        // A late span of a kept trace is exported at once, stamped late.
        assert_eq!(h.exported(), vec![(1, 1, "late".to_owned())]);
        assert_eq!(
            h.registry
                .value("tailgate_late_spans_total{verdict=\"keep\"}"),
            1.0
        );
        assert_eq!(
            h.registry
                .value("tailgate_late_spans_total{verdict=\"drop\"}"),
            1.0
        );
        assert_eq!(
            h.registry
                .value("tailgate_spans_dropped_total{trigger=\"late\"}"),
            1.0
        );
        assert_eq!(h.memory.used(), 0, "late spans release their bytes");
        assert_eq!(
            h.registry.value("tailgate_buffer_traces"),
            0.0,
            "no new trace opened"
        );
    }

    #[test]
    fn shutdown_decides_everything_buffered_and_stops() {
        let mut h = harness(1 << 20, 100);
        let (tx, rx) = crossbeam_channel::unbounded();
        for t in 1..=3u8 {
            let mut span = span(1, 0, true);
            span.bytes = vec![t; 100].into_boxed_slice();
            let cost = span.cost();
            assert!(h.memory.try_reserve(cost));
            tx.send(ShardMsg::Spans {
                spans: vec![ShardSpan {
                    trace_id: [t; 16],
                    span,
                    cost,
                }],
                record: None,
            })
            .unwrap();
        }
        tx.send(ShardMsg::Shutdown).unwrap();
        // The manual clock never moves, so only shutdown can decide them.
        h.worker.run(rx);
        let mut exported = h.exported();
        exported.sort();
        assert_eq!(
            exported,
            (1..=3u8)
                .map(|t| (t, 1, "shutdown".to_owned()))
                .collect::<Vec<_>>()
        );
        assert_eq!(h.memory.used(), 0);
        assert_eq!(h.registry.value("tailgate_buffer_traces"), 0.0);
    }

    /// A harness whose worker logs to a real storage log in a fresh folder.
    /// The log in `dir` opened again, as after a restart.
    fn reopen(dir: &std::path::Path) -> (Arc<Storage>, crate::storage::Recovery) {
        let config = crate::config::StorageConfig {
            dir: dir.to_owned(),
            ..Default::default()
        };
        Storage::open(&config, &Registry::new()).expect("reopen")
    }

    fn with_storage(name: &str) -> (Harness, Arc<Storage>, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tailgate-pipeline-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::StorageConfig {
            dir: dir.clone(),
            fsync: crate::config::Fsync::Never,
            ..Default::default()
        };
        let (storage, _) = Storage::open(&config, &Registry::new()).expect("storage");
        let mut h = harness(1 << 20, 100);
        h.worker.ctx.storage = Some(storage.clone());
        h.worker.buffer.enable_parking();
        (h, storage, dir)
    }

    impl Harness {
        /// Spans that came in the log record at `record`, pinned once as the writer does.
        fn receive_from(
            &mut self,
            record: u64,
            trace: u8,
            spans: Vec<BufferedSpan>,
            replay_at: Option<Nanos>,
        ) {
            if let Some(storage) = &self.worker.ctx.storage {
                storage.pins.pin(record);
            }
            let spans = spans
                .into_iter()
                .map(|mut span| {
                    span.bytes = vec![trace; 100].into_boxed_slice();
                    let cost = span.cost();
                    self.memory.force_reserve(cost);
                    ShardSpan {
                        trace_id: [trace; 16],
                        span,
                        cost,
                    }
                })
                .collect();
            let msg = match replay_at {
                None => ShardMsg::Spans {
                    spans,
                    record: Some(record),
                },
                Some(at) => ShardMsg::Replay { spans, record, at },
            };
            assert!(!self.worker.handle(msg));
        }

        /// The kept traces queued so far, with what they hand the exporter to settle.
        fn settles(&mut self) -> Vec<(u8, usize, Option<Exported>)> {
            let mut out = Vec::new();
            while let Ok(kept) = self.exported.try_recv() {
                out.push((kept.spans[0].bytes[0], kept.spans.len(), kept.settle));
            }
            out
        }
    }

    /// An OTLP request of one span of trace `[trace; 16]`, with a 1 KB attribute; the root
    /// (parent 0) has an error status, so `KeepErrors` keeps the trace.
    fn request_body(trace: u8, span: u8, parent: u8) -> Vec<u8> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
        use prost::Message as _;
        let span = Span {
            trace_id: vec![trace; 16],
            span_id: vec![span; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: format!("span {span}"),
            attributes: vec![KeyValue {
                key: "payload".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("x".repeat(1000))),
                }),
                ..Default::default()
            }],
            status: (parent == 0).then(|| Status {
                code: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    impl Harness {
        /// Appends a request to the log and hands its spans to the worker, as a receiver does.
        fn receive_logged(&mut self, storage: &Storage, body: Vec<u8>) {
            let position = storage
                .append_spans(
                    bytes::Bytes::from(body.clone()),
                    crate::storage::unix_nanos(),
                    None,
                )
                .blocking_recv()
                .expect("answered")
                .expect("appended");
            let mut spans = Vec::new();
            crate::otlp::spans::for_each_span(&body, |trace_id, span, cost| {
                self.memory.force_reserve(cost);
                spans.push(ShardSpan {
                    trace_id,
                    span,
                    cost,
                });
            })
            .expect("parses");
            let msg = ShardMsg::Spans {
                spans,
                record: Some(position),
            };
            assert!(!self.worker.handle(msg));
            self.worker.decide_due(self.clock.now());
        }
    }

    #[test]
    fn under_memory_pressure_the_oldest_traces_park_in_the_log_and_are_decided_whole() {
        let (mut h, storage, dir) = with_storage("park");
        // Room for about 6 spans of 1 KB: 8 traces of 3 children each are far more.
        let memory = Arc::new(MemoryBudget::new(8 << 10));
        h.memory = memory.clone();
        h.worker.ctx.memory = memory.clone();
        let mut originals: HashMap<u8, Vec<Box<[u8]>>> = HashMap::new();
        for child in 1..=3u8 {
            for trace in 1..=8u8 {
                let body = request_body(trace, 10 + child, 1);
                crate::otlp::spans::for_each_span(&body, |_, s, _| {
                    originals.entry(trace).or_default().push(s.bytes);
                })
                .expect("parses");
                h.receive_logged(&storage, body);
            }
        }
        assert!(
            storage.metrics.parked_spans.get() > 0,
            "nothing was parked: memory {} of {}, buffer {} bytes",
            memory.used(),
            8 << 10,
            h.worker.buffer.cost()
        );
        assert!(
            !memory.under_pressure(),
            "parking freed the memory: {} of {}",
            memory.used(),
            8 << 10
        );
        // Nothing was decided early: parking came first.
        assert!(h.exported.try_recv().is_err(), "a trace was decided early");
        // The roots arrive last; each trace is then decided with every span, parked or not.
        for trace in 1..=8u8 {
            let body = request_body(trace, 1, 0);
            crate::otlp::spans::for_each_span(&body, |_, s, _| {
                originals.entry(trace).or_default().push(s.bytes);
            })
            .expect("parses");
            h.receive_logged(&storage, body);
        }
        h.tick(3 * S);
        let mut kept = Vec::new();
        while let Ok(k) = h.exported.try_recv() {
            kept.push(k);
        }
        assert_eq!(kept.len(), 8, "every trace kept, once");
        for k in &kept {
            let trace = k.spans.last().expect("spans").bytes.clone();
            let id = originals
                .iter()
                .find(|(_, spans)| spans.contains(&trace))
                .map(|(t, _)| *t)
                .expect("a known span");
            let got: Vec<&Box<[u8]>> = k.spans.iter().map(|s| &s.bytes).collect();
            let want: Vec<&Box<[u8]>> = originals[&id].iter().collect();
            assert_eq!(got, want, "trace {id}: every span, in arrival order");
        }
        assert_eq!(storage.metrics.parked_spans.get(), 0);
        assert_eq!(
            h.registry
                .value("tailgate_spans_kept_total{trigger=\"root_grace\"}"),
            32.0
        );
        drop(kept);
        assert_eq!(memory.used(), 0, "every byte released");
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_late_error_root_rescues_a_dropped_trace_whole_from_the_log_within_the_window() {
        let (mut h, storage, dir) = with_storage("rescue");
        let window = 30 * S.as_nanos() as u64;
        h.worker.window = Window::new(window);
        // Trace 6: a child alone, dropped at the idle wait; a second child comes late and
        // follows the drop; then the root, an error, comes late too.
        h.receive_logged(&storage, request_body(6, 2, 1));
        h.tick(11 * S);
        assert_eq!(
            h.registry
                .value("tailgate_spans_dropped_total{trigger=\"trace_idle\"}"),
            1.0
        );
        let first = storage
            .pins
            .low()
            .expect("the dropped trace's record stays pinned");
        h.receive_logged(&storage, request_body(6, 3, 1));
        assert_eq!(
            h.registry
                .value("tailgate_spans_dropped_total{trigger=\"late\"}"),
            1.0
        );
        assert!(
            h.exported.try_recv().is_err(),
            "a plain late span turns nothing"
        );
        h.receive_logged(&storage, request_body(6, 1, 0));
        let kept = h.exported.try_recv().expect("rescued");
        assert_eq!(
            kept.spans.len(),
            3,
            "whole: both children read back, and the root"
        );
        let trigger = crate::otlp::wire::span_attribute(&kept.stamp.encoded, "sampling.trigger");
        assert!(
            matches!(trigger, Some(crate::otlp::wire::AnyValueRef::Str("rescue"))),
            "{trigger:?}"
        );
        let settle = kept.settle.expect("the exporter settles its records");
        assert_eq!(settle.records.len(), 3);
        assert_eq!(settle.records[0], first);
        assert_eq!(h.registry.value("tailgate_spans_rescued_total"), 2.0);
        assert_eq!(
            h.registry
                .value("tailgate_traces_rescued_total{policy=\"errors\"}"),
            1.0
        );
        assert_eq!(
            h.registry
                .value("tailgate_spans_kept_total{trigger=\"rescue\"}"),
            3.0
        );
        drop(kept.spans);
        // The rescue is logged: a restart follows the keep.
        for r in settle.records {
            storage.pins.unpin(r);
        }

        // Trace 7 is dropped and nothing comes: its records are let go at the window's end.
        h.receive_logged(&storage, request_body(7, 2, 1));
        h.tick(11 * S);
        assert!(storage.pins.low().is_some());
        h.tick(31 * S);
        assert_eq!(storage.pins.low(), None, "the window closed");
        storage.close();
        drop(h);
        drop(storage);
        let (reopened, recovery) = reopen(&dir);
        let logged = |t: u8| {
            recovery
                .decisions
                .get(&[t; 16])
                .map(|r| (r.decision.keep, r.decision.trigger))
        };
        assert_eq!(
            logged(6),
            Some((true, Trigger::Rescue)),
            "the latest record wins"
        );
        assert_eq!(logged(7), Some((false, Trigger::TraceIdle)));
        reopened.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn with_the_log_a_drop_releases_its_records_and_a_keep_hands_them_to_the_exporter() {
        let (mut h, storage, dir) = with_storage("pins");
        h.receive_from(100, 1, vec![span(1, 0, false)], None);
        h.receive_from(200, 2, vec![span(1, 0, true)], None);
        h.receive_from(300, 2, vec![span(2, 1, false)], None);
        assert_eq!(
            storage.pins.low(),
            Some(100),
            "undecided traces pin their records"
        );
        h.tick(3 * S);
        // Trace 1 was dropped (its decision is logged): nothing pins 100 any more. Trace 2 was
        // kept: its records stay pinned until the exporter settles them.
        assert_eq!(storage.pins.low(), Some(200));
        let settles = h.settles();
        assert_eq!(settles.len(), 1);
        let (trace, spans, settle) = &settles[0];
        assert_eq!((*trace, *spans), (2, 2));
        assert_eq!(
            settle.as_ref().expect("kept with the log on").records,
            vec![200, 300]
        );
        storage.close();
        // The lock goes with the last handle.
        drop(h);
        drop(storage);
        let (reopened, recovery) = reopen(&dir);
        let logged = |t: u8| recovery.decisions.get(&[t; 16]).map(|r| r.decision.keep);
        assert_eq!(
            (logged(1), logged(2)),
            (Some(false), Some(true)),
            "both decisions logged"
        );
        reopened.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn replay_follows_logged_decisions_and_decides_the_rest_on_record_time() {
        let (mut h, storage, dir) = with_storage("replay");
        let logged = |t: u8, keep: bool, exported: &[u64]| {
            (
                [t; 16],
                RecoveredDecision {
                    decision: crate::storage::LoggedDecision {
                        trace_id: [t; 16],
                        keep,
                        trigger: Trigger::RootGrace,
                        probability: None,
                        policy: "errors".into(),
                        reason: "logged".into(),
                    },
                    exported: exported.iter().copied().collect(),
                },
            )
        };
        // Trace 1 was kept and its record 10 exported, record 20 not; trace 2 was dropped.
        assert!(!h.worker.handle(ShardMsg::Recovered(HashMap::from([
            logged(1, true, &[10]),
            logged(2, false, &[]),
        ]))));
        let at = h.clock.now();
        h.receive_from(10, 1, vec![span(1, 0, false)], Some(at));
        h.receive_from(20, 1, vec![span(2, 1, false)], Some(at));
        h.receive_from(30, 2, vec![span(1, 0, true)], Some(at));
        // Trace 3 was undecided: rebuilt, and decided by its root grace on record time.
        h.receive_from(40, 3, vec![span(1, 0, true)], Some(at));
        h.receive_from(
            50,
            3,
            vec![span(2, 1, false)],
            Some(at + 3 * S.as_nanos() as u64),
        );
        let mut settles = h.settles();
        settles.sort_by_key(|s| s.0);
        let summary: Vec<(u8, usize, Vec<u64>)> = settles
            .into_iter()
            .map(|(t, n, s)| (t, n, s.map(|s| s.records).unwrap_or_default()))
            .collect();
        assert_eq!(
            summary,
            vec![(1, 1, vec![20]), (3, 1, vec![40]), (3, 1, vec![50])],
            "trace 1's unexported record again, none of dropped trace 2, trace 3 decided when \
             its grace passed on record time, so its second span came late"
        );
        assert_eq!(
            h.registry
                .value("tailgate_spans_kept_total{trigger=\"root_grace\"}"),
            1.0
        );
        assert_eq!(storage.metrics.reexported_spans.get(), 1);
        assert_eq!(storage.metrics.recovered_spans.get(), 2);
        // After the replay, late spans follow the recovered decisions.
        assert!(!h.worker.handle(ShardMsg::ReplayDone));
        h.receive_from(60, 2, vec![span(3, 1, true)], None);
        assert!(
            h.settles().is_empty(),
            "a late span of dropped trace 2 stays dropped"
        );
        h.receive_from(70, 1, vec![span(3, 1, false)], None);
        assert_eq!(h.settles().len(), 1, "a late span of kept trace 1 is kept");
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
