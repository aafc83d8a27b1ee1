//! Pass-through: metrics leave the host here, unchanged, beside the kept traces.
//!
//! Owns the metrics queue between the receivers and the network, batching (requests are
//! concatenated, which protobuf reads as one request with every resource of them), the sink
//! (its own file, or the exporter's backend on the metrics path or service, or
//! `exporter.metrics_endpoint`), retries, and settling each request in the storage log.
//!
//! With the log on, every request was appended before its sender was answered, and stays pinned
//! until it is settled: delivered, or given up on and counted failed. Settled requests are
//! logged (a `Forwarded` record), so a restart forwards only the others. The memory queue holds
//! at most `exporter.metrics_queue_max_bytes`; past it a request waits in the log alone and is
//! read back when its turn comes. Without the log, a full queue refuses metrics with a
//! retryable code.
//!
//! Counts, for data points: `received + replayed = exported + failed + refused + queued`, with
//! `received` and `refused` counted by the receivers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Sink, deliver};
use crate::config::ExportBatching;
use crate::storage::Storage;
use crate::telemetry::{CounterFamily, Registry, label};

/// A batch closes before it passes this many bytes (a request larger than it goes alone):
/// under the 4 MiB a gRPC server takes by default.
const MAX_BATCH_BYTES: usize = 3 << 20;

/// One accepted request on its way out.
struct Passed {
    /// Held in memory; None when it waits in the storage log only.
    body: Option<Bytes>,
    /// Bytes held against the memory bound (0 when `body` is None).
    held: usize,
    /// Its length, in memory or in the log.
    size: usize,
    points: u64,
    /// Its record in the storage log, pinned until settled.
    record: Option<u64>,
}

/// Why a request could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotQueued {
    /// The memory queue is full and there is no log copy to wait in: retry later.
    Full,
    /// The exporter has stopped (shutdown).
    Closed,
}

struct ForwardMetrics {
    replayed: Counter,
    queued: Gauge,
    exported: Counter,
    failed: CounterFamily,
    retries: Counter,
}

impl ForwardMetrics {
    fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            replayed: registry.register(
                "metric_points_replayed",
                "Metric data points read back from the storage log at start, to be forwarded again",
                Counter::default(),
            ),
            queued: registry.register(
                "metric_points_queued",
                "Metric data points accepted and not yet delivered or failed",
                Gauge::default(),
            ),
            exported: registry.register(
                "metric_points_exported",
                "Metric data points delivered downstream",
                Counter::default(),
            ),
            failed: registry.counters(
                "metric_points_export_failed",
                "Metric data points that could not be delivered, by reason",
            ),
            retries: registry.register(
                "metric_export_retries",
                "Metrics export attempts retried",
                Counter::default(),
            ),
        })
    }

    fn failed(&self, reason: &'static str, points: u64) {
        if points > 0 {
            self.failed
                .get_or_create(&label("reason", reason))
                .inc_by(points);
        }
    }
}

/// The receivers' handle on the metrics queue.
#[derive(Clone)]
pub(crate) struct ForwardQueue(Arc<Shared>);

struct Shared {
    /// Taken at shutdown, which closes the queue once every handle's push is done.
    tx: Mutex<Option<mpsc::UnboundedSender<Passed>>>,
    held: AtomicUsize,
    cap: usize,
    metrics: Arc<ForwardMetrics>,
}

impl ForwardQueue {
    /// Queues an accepted request of `points` data points. One with a `record` in the storage
    /// log is always taken (in memory while there is room, else read back from the log when
    /// sent); one without is refused while the memory queue is full.
    pub(crate) fn push(
        &self,
        body: Bytes,
        points: u64,
        record: Option<u64>,
    ) -> Result<(), NotQueued> {
        let held = self.hold(body.len());
        if held == 0 && record.is_none() {
            return Err(NotQueued::Full);
        }
        let passed = Passed {
            size: body.len(),
            body: (held > 0).then_some(body),
            held,
            points,
            record,
        };
        // Counted before it can be sent, so the gauge never dips below what is queued.
        self.0.metrics.queued.inc_by(points as i64);
        let sent = match &*self.0.tx.lock() {
            Some(tx) => tx.send(passed).is_ok(),
            None => false,
        };
        if !sent {
            self.0.metrics.queued.dec_by(points as i64);
            self.0.held.fetch_sub(held, Ordering::AcqRel);
            return Err(NotQueued::Closed);
        }
        Ok(())
    }

    /// A request read back from the log at start, queued again.
    pub(crate) fn replay(&self, body: Bytes, points: u64, record: u64) -> Result<(), NotQueued> {
        self.push(body, points, Some(record))?;
        self.0.metrics.replayed.inc_by(points);
        Ok(())
    }

    /// Reserves `bytes` of the memory queue; 0 when they do not fit.
    fn hold(&self, bytes: usize) -> usize {
        let bytes = bytes.max(1);
        let mut held = self.0.held.load(Ordering::Acquire);
        loop {
            if held + bytes > self.0.cap {
                return 0;
            }
            match self.0.held.compare_exchange_weak(
                held,
                held + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return bytes,
                Err(now) => held = now,
            }
        }
    }
}

/// The running metrics forwarder.
pub(crate) struct Forwarder {
    pub(crate) queue: ForwardQueue,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    pub(super) fn start(
        sink: Sink,
        concurrency: usize,
        batching: &ExportBatching,
        registry: &Registry,
        storage: Option<Arc<Storage>>,
        deadline: watch::Receiver<Option<Instant>>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = ForwardMetrics::new(registry);
        let queue = ForwardQueue(Arc::new(Shared {
            tx: Mutex::new(Some(tx)),
            held: AtomicUsize::new(0),
            cap: batching.metrics_queue_max_bytes.bytes(),
            metrics: metrics.clone(),
        }));
        let batcher = Batcher {
            sink: Arc::new(sink),
            queue: queue.clone(),
            metrics,
            timeout: batching.batch_timeout.0,
            // A batch closes at `batch_max_spans` data points, as a span batch at its spans.
            max_points: batching.batch_max_spans as u64,
            storage,
            in_flight: Arc::new(Semaphore::new(concurrency)),
            deadline,
        };
        let task = tokio::spawn(batcher.run(rx));
        Self { queue, task }
    }

    /// Closes the queue and waits until what it holds is delivered, failed, or (past the
    /// shutdown deadline, with the log on) left in the log for the next start. Call once no
    /// receiver can push any more.
    pub(super) async fn finish(self) {
        self.queue.0.tx.lock().take();
        let _ = self.task.await;
    }
}

struct Batcher {
    sink: Arc<Sink>,
    queue: ForwardQueue,
    metrics: Arc<ForwardMetrics>,
    timeout: Duration,
    max_points: u64,
    storage: Option<Arc<Storage>>,
    in_flight: Arc<Semaphore>,
    deadline: watch::Receiver<Option<Instant>>,
}

impl Batcher {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Passed>) {
        let mut sends = JoinSet::new();
        let mut ready: VecDeque<Vec<Passed>> = VecDeque::new();
        let mut batch: Vec<Passed> = Vec::new();
        let (mut points, mut bytes) = (0u64, 0usize);
        let mut flush_at: Option<Instant> = None;
        let mut open = true;
        while open || !ready.is_empty() || !batch.is_empty() {
            let timer = super::flush_timer(flush_at);
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    Some(passed) => {
                        let size = passed.size;
                        if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
                            ready.push_back(std::mem::take(&mut batch));
                            (points, bytes) = (0, 0);
                        }
                        if batch.is_empty() {
                            flush_at = Some(Instant::now() + self.timeout);
                        }
                        points += passed.points;
                        bytes += size;
                        batch.push(passed);
                        if points >= self.max_points {
                            ready.push_back(std::mem::take(&mut batch));
                            (points, bytes, flush_at) = (0, 0, None);
                        }
                    }
                    None => {
                        open = false;
                        if !batch.is_empty() {
                            ready.push_back(std::mem::take(&mut batch));
                        }
                        flush_at = None;
                    }
                },
                _ = timer => {
                    ready.push_back(std::mem::take(&mut batch));
                    (points, bytes, flush_at) = (0, 0, None);
                }
                permit = self.in_flight.clone().acquire_owned(), if !ready.is_empty() => {
                    let (Ok(permit), Some(next)) = (permit, ready.pop_front()) else {
                        break;
                    };
                    let send = Send {
                        sink: self.sink.clone(),
                        queue: self.queue.clone(),
                        metrics: self.metrics.clone(),
                        storage: self.storage.clone(),
                        deadline: self.deadline.clone(),
                    };
                    sends.spawn(async move {
                        send.run(next).await;
                        drop(permit);
                    });
                }
            }
            while sends.try_join_next().is_some() {}
        }
        while sends.join_next().await.is_some() {}
    }
}

/// One batch's way out.
struct Send {
    sink: Arc<Sink>,
    queue: ForwardQueue,
    metrics: Arc<ForwardMetrics>,
    storage: Option<Arc<Storage>>,
    deadline: watch::Receiver<Option<Instant>>,
}

impl Send {
    async fn run(self, batch: Vec<Passed>) {
        let shutdown_passed = || {
            self.deadline
                .borrow()
                .is_some_and(|at| Instant::now() >= at)
        };
        let held: usize = batch.iter().map(|p| p.held).sum();
        let records: Vec<u64> = batch.iter().filter_map(|p| p.record).collect();
        let (body, points, unreadable) = self.assemble(batch).await;
        let outcome = if shutdown_passed() {
            Err("shutdown_timeout")
        } else if body.is_empty() {
            Ok(0)
        } else {
            deliver(
                &self.sink,
                body,
                &self.metrics.retries,
                self.deadline.clone(),
            )
            .await
        };
        // Past the deadline, a batch with the log on stays there, queued for the next start.
        let cut_short = outcome == Err("shutdown_timeout") && self.storage.is_some();
        if let Some(storage) = &self.storage
            && !cut_short
        {
            if !records.is_empty()
                && let Ok(Err(e)) = storage.log_forwarded(&records).await
            {
                tracing::warn!(error = %e, "cannot log forwarded metrics; a restart may send them again");
            }
            records.iter().for_each(|r| storage.pins.unpin(*r));
        }
        self.queue.0.held.fetch_sub(held, Ordering::AcqRel);
        self.metrics.failed("unreadable", unreadable);
        self.metrics.queued.dec_by(unreadable as i64);
        if cut_short {
            return;
        }
        match outcome {
            Ok(rejected) => {
                let rejected = rejected.min(points);
                self.metrics.exported.inc_by(points - rejected);
                self.metrics.failed("rejected_by_backend", rejected);
            }
            Err(reason) => self.metrics.failed(reason, points),
        }
        self.metrics.queued.dec_by(points as i64);
    }

    /// The batch's requests as one body (those waiting in the log read back); the data points
    /// it holds, and those of requests that could not be read back.
    async fn assemble(&self, batch: Vec<Passed>) -> (Bytes, u64, u64) {
        let mut body = BytesMut::new();
        let (mut points, mut unreadable) = (0, 0);
        for passed in batch {
            let bytes = match (passed.body, passed.record, &self.storage) {
                (Some(bytes), _, _) => Some(bytes),
                (None, Some(position), Some(storage)) => {
                    let storage = storage.clone();
                    match tokio::task::spawn_blocking(move || storage.read_passthrough(position))
                        .await
                    {
                        Ok(Ok(bytes)) => Some(Bytes::from(bytes)),
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, position, "cannot read queued metrics back from the storage log");
                            None
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            match bytes {
                Some(bytes) => {
                    body.extend_from_slice(&bytes);
                    points += passed.points;
                }
                None => unreadable += passed.points,
            }
        }
        (body.freeze(), points, unreadable)
    }
}
