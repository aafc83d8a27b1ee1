//! A decision worker: one thread that owns one shard of the buffer, its decision memory and
//! its own decider, so nothing on the decision path takes a lock.
//!
//! Receivers send it spans; it buffers them, decides traces as they come due (or early under
//! memory pressure, or all at shutdown), and passes kept traces to the export queue. It must
//! release every byte it was given to the memory budget and count every span it lets go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{
    BufferedSpan, DecisionMemory, DueTrace, Inserted, MemoryBudget, Remembered, Timings,
    TraceBuffer, TraceId, Trigger,
};
use crate::clock::Clock;
use crate::decide::{Decider, DeciderFactory, Decision, Stamp, TraceView};
use crate::export::{ExportQueue, KeptTrace};
use crate::telemetry::Metrics;

/// A span for a shard, with the bytes reserved for it in the memory budget.
pub struct ShardSpan {
    pub trace_id: TraceId,
    pub span: BufferedSpan,
    pub cost: usize,
}

pub enum ShardMsg {
    Spans(Vec<ShardSpan>),
    /// Decide everything buffered (trigger `shutdown`), then stop.
    Shutdown,
}

/// What every worker shares.
#[derive(Clone)]
pub struct WorkerContext {
    pub timings: Timings,
    pub memory: Arc<MemoryBudget>,
    pub metrics: Arc<Metrics>,
    pub export: ExportQueue,
    pub clock: Arc<dyn Clock>,
    pub remember_kept: usize,
    pub remember_dropped: usize,
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

pub struct Workers {
    pub senders: Vec<Sender<ShardMsg>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    pub fn spawn(
        count: usize,
        ctx: WorkerContext,
        deciders: &dyn DeciderFactory,
    ) -> std::io::Result<Self> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = crossbeam_channel::unbounded();
            let mut worker = Worker {
                buffer: TraceBuffer::new(ctx.timings),
                decisions: DecisionMemory::new(
                    ctx.remember_kept.div_ceil(count),
                    ctx.remember_dropped.div_ceil(count),
                ),
                decider: deciders.build(),
                ctx: ctx.clone(),
                reported: Reported::default(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("tailgate-worker-{i}"))
                .spawn(move || worker.run(rx))?;
            senders.push(tx);
            handles.push(handle);
        }
        Ok(Self { senders, handles })
    }

    /// Asks every worker to decide what it holds and stop, and waits until they have.
    pub fn shutdown(self) {
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
}

impl Worker {
    fn run(&mut self, rx: Receiver<ShardMsg>) {
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
                self.publish_gauges();
                return;
            }
            self.decide_due();
            self.publish_gauges();
        }
    }

    /// Returns true when the worker must stop.
    fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Spans(spans) => {
                self.insert(spans);
                false
            }
            ShardMsg::Shutdown => true,
        }
    }

    fn insert(&mut self, spans: Vec<ShardSpan>) {
        let now = self.ctx.clock.now();
        let mut late: HashMap<TraceId, (Arc<Stamp>, Vec<BufferedSpan>)> = HashMap::new();
        for ShardSpan {
            trace_id,
            span,
            cost,
        } in spans
        {
            match self.decisions.recall(&trace_id) {
                None => {
                    if let Inserted::CapReached(trigger) =
                        self.buffer.insert(trace_id, span, cost, now)
                        && let Some(due) = self.buffer.take(&trace_id, trigger)
                    {
                        self.decide(due);
                    }
                }
                Some(Remembered::Kept(stamp)) => {
                    self.ctx.memory.release(cost);
                    late.entry(trace_id)
                        .or_insert_with(|| (Arc::new(stamp.for_late_span()), Vec::new()))
                        .1
                        .push(span);
                }
                Some(Remembered::Dropped) => {
                    self.ctx.memory.release(cost);
                    self.ctx.metrics.late(false, 1);
                    self.ctx.metrics.dropped(Trigger::Late, 1);
                }
            }
        }
        for (trace_id, (stamp, spans)) in late {
            let n = spans.len() as u64;
            self.ctx.metrics.late(true, n);
            self.ctx.metrics.kept(Trigger::Late, n);
            self.ctx.export.push(KeptTrace {
                trace_id,
                spans,
                stamp,
            });
        }
    }

    /// Decides every trace that is due, in batches: the decider may then enter each policy
    /// once per batch instead of once per trace, so the busier the worker, the cheaper each
    /// decision.
    fn decide_due(&mut self) {
        let now = self.ctx.clock.now();
        let mut batch = Vec::new();
        while let Some(due) = self.buffer.pop_due(now) {
            batch.push(due);
            if batch.len() == MAX_BATCH {
                self.decide_batch(&mut batch);
            }
        }
        self.decide_batch(&mut batch);
        // Under pressure, the oldest traces go a few at a time: pressure is rechecked after
        // each batch has released its bytes.
        while self.ctx.memory.under_pressure() {
            while batch.len() < PRESSURE_BATCH {
                let Some(due) = self.buffer.pop_oldest() else {
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

    /// Decides one trace on its own (a trace that hit a cap while its spans arrived).
    fn decide(&mut self, due: DueTrace) {
        self.decide_batch(&mut vec![due]);
    }

    /// Decides the traces in `batch` together and acts on each decision; leaves it empty.
    fn decide_batch(&mut self, batch: &mut Vec<DueTrace>) {
        if batch.is_empty() {
            return;
        }
        let mut decisions = Vec::with_capacity(batch.len());
        {
            let mut views: Vec<TraceView<'_>> = (batch.iter_mut())
                .map(|due| TraceView {
                    trace_id: &due.trace_id,
                    spans: &mut due.trace.spans,
                    trigger: due.trigger,
                })
                .collect();
            self.decider.decide_batch(&mut views, &mut decisions);
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
        let since = trace.root_seen.unwrap_or(trace.last_seen);
        let metrics = &self.ctx.metrics;
        metrics
            .decision_lag
            .observe(Duration::from_nanos(now.saturating_sub(since)).as_secs_f64());
        metrics.decided(trigger, decision.keep, &decision.policy);
        self.ctx.memory.release(trace.cost);
        if decision.keep {
            let before = trace.spans.len() as u64;
            let trimmed = crate::decide::apply(&decision, &mut trace.spans) as u64;
            if trimmed > 0 {
                // Trimmed spans leave by a decision too: count them as dropped.
                metrics.dropped(trigger, trimmed);
                metrics.trimmed(&decision.policy, trimmed);
            }
            metrics.kept(trigger, before - trimmed);
            let stamp = Arc::new(Stamp::new(&decision, trigger));
            self.decisions.remember_kept(trace_id, stamp.clone());
            self.ctx.export.push(KeptTrace {
                trace_id,
                spans: trace.spans,
                stamp,
            });
        } else {
            metrics.dropped(trigger, trace.spans.len() as u64);
            self.decisions.remember_dropped(&trace_id);
        }
    }

    fn publish_gauges(&mut self) {
        let now = Reported {
            bytes: self.buffer.cost() as i64,
            spans: self.buffer.span_count() as i64,
            traces: self.buffer.trace_count() as i64,
        };
        let m = &self.ctx.metrics;
        m.buffer_bytes.inc_by(now.bytes - self.reported.bytes);
        m.buffer_spans.inc_by(now.spans - self.reported.spans);
        m.buffer_traces.inc_by(now.traces - self.reported.traces);
        self.reported = now;
    }
}
