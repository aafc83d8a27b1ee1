//! Export: kept traces leave the host here.
//!
//! Owns the bounded queue between the decision workers and the network, batching by size and
//! time, regrouping kept spans by resource and scope (a resource is written once per batch,
//! never copied per span), and the sinks: the OTLP/JSON-lines file (the embedded default) and
//! OTLP over gRPC or HTTP. With the storage log on, a batch formed while the memory queue is
//! half full waits in the log (a `Spill` record) until a slot to the backend frees, so a long
//! outage costs disk rather than memory, and retries have no time limit unless one is set. It
//! never drops a span without counting it: every span pushed here ends up counted as exported
//! or as failed with a reason. Metrics pass through beside them ([`forward`]), to their own
//! file or the same backend.

mod file;
mod forward;
mod metrics;
pub(crate) mod transport;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Compression, ExporterConfig, ExporterKind, ExporterSink, OtlpExporterConfig};
use crate::otlp::signal::Signal;
use crate::storage::{Exported, Storage};
use crate::telemetry::Registry;
use crate::trace::{BufferedSpan, Stamp};

pub(crate) use file::FileSink;
use forward::Forwarder;
pub(crate) use forward::{ForwardQueue, NotQueued};
use metrics::ExportMetrics;
use prometheus_client::metrics::counter::Counter;
use transport::{ClientTls, Protocol, RetryPolicy, SendError, Transport, TransportConfig};

/// `exporter.retry_max_elapsed` when unset in memory-only mode.
const MEMORY_RETRY_MAX_ELAPSED: Duration = Duration::from_secs(300);

/// A trace decided keep, on its way out.
#[derive(Debug)]
pub struct KeptTrace {
    pub spans: Vec<BufferedSpan>,
    pub stamp: Arc<Stamp>,
    /// With the storage log on: the trace and its span records, pinned until delivered. Once
    /// the batch is settled (delivered, or refused for good) the exporter logs it as exported
    /// and unpins them; a batch cut short by shutdown stays pinned, for the next start.
    pub(crate) settle: Option<Exported>,
}

impl KeptTrace {
    /// A kept trace with nothing in the storage log to settle (benches, memory-only mode).
    pub fn new(spans: Vec<BufferedSpan>, stamp: Arc<Stamp>) -> Self {
        Self {
            spans,
            stamp,
            settle: None,
        }
    }
}

/// Bounds the spans between the workers and the network. A worker that finds it full waits,
/// which stops it deciding, which fills the buffer, which makes the receivers refuse with a
/// retryable code: back-pressure reaches the senders instead of memory growing.
struct SpanBudget {
    used: Mutex<usize>,
    freed: Condvar,
    cap: usize,
}

impl SpanBudget {
    fn acquire(&self, spans: usize) {
        let mut used = self.used.lock();
        // A trace larger than the whole queue still goes through, alone.
        while *used > 0 && *used + spans > self.cap {
            self.freed.wait(&mut used);
        }
        *used += spans;
    }

    fn release(&self, spans: usize) {
        *self.used.lock() -= spans;
        self.freed.notify_all();
    }

    fn used(&self) -> usize {
        *self.used.lock()
    }
}

/// The workers' handle on the export queue.
#[derive(Clone)]
pub(crate) struct ExportQueue {
    tx: mpsc::UnboundedSender<KeptTrace>,
    budget: Arc<SpanBudget>,
    metrics: Arc<ExportMetrics>,
}

impl ExportQueue {
    /// A queue with no exporter behind it: the test reads what is pushed from the receiver.
    #[cfg(test)]
    pub(crate) fn detached(
        cap: usize,
        registry: &Registry,
    ) -> (Self, mpsc::UnboundedReceiver<KeptTrace>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(SpanBudget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            cap,
        });
        let metrics = ExportMetrics::new(registry);
        (
            Self {
                tx,
                budget,
                metrics,
            },
            rx,
        )
    }

    /// Queues a kept trace, blocking the calling worker while the queue is full.
    pub(crate) fn push(&self, trace: KeptTrace) {
        let spans = trace.spans.len();
        self.budget.acquire(spans);
        self.metrics.queue_spans.inc_by(spans as i64);
        if self.tx.send(trace).is_err() {
            // Only after the exporter has stopped, which happens after every worker: count it.
            self.budget.release(spans);
            self.metrics.queue_spans.dec_by(spans as i64);
            self.metrics.failed("exporter_stopped", spans as u64);
        }
    }
}

/// Where batches go.
enum Sink {
    File(Arc<FileSink>),
    Otlp(Arc<Transport>, RetryPolicy),
}

/// The sink for `signal` that `config` names, and how many batches it takes at once.
fn open_sink(
    config: &ExporterConfig,
    signal: Signal,
    logged: bool,
) -> Result<(Sink, usize), ExporterError> {
    let otlp = match &config.sink {
        ExporterSink::File(file) => {
            let path = match signal {
                Signal::Traces => &file.path,
                Signal::Metrics => &file.metrics_path,
            };
            let sink = FileSink::open(signal, path, file.max_file_size.0, file.max_files).map_err(
                |source| ExporterError::File {
                    path: path.display().to_string(),
                    source,
                },
            )?;
            // One writer keeps the file's lines whole and in order.
            return Ok((Sink::File(Arc::new(sink)), 1));
        }
        ExporterSink::OtlpGrpc(otlp) | ExporterSink::OtlpHttp(otlp) => otlp,
    };
    let http = config.kind() == ExporterKind::OtlpHttp;
    let endpoint = match signal {
        Signal::Traces => otlp.endpoint.clone(),
        Signal::Metrics => otlp.metrics_target(http),
    };
    if signal == Signal::Traces
        && let Some(names) = headers_in_clear(otlp)
    {
        tracing::warn!(
            endpoint = %otlp.endpoint,
            headers = %names,
            "exporter.headers go to a plain http:// endpoint, readable by anyone on \
             the path; use https:// for API keys"
        );
    }
    let transport = Transport::new(TransportConfig {
        protocol: if http {
            Protocol::HttpProtobuf
        } else {
            Protocol::Grpc
        },
        signal,
        endpoint,
        headers: (otlp.headers.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        gzip: otlp.compression == Compression::Gzip,
        timeout: otlp.timeout.0,
        tls: ClientTls {
            ca_file: otlp.ca_file.clone(),
            cert_file: otlp.client_cert_file.clone(),
            key_file: otlp.client_key_file.clone(),
        },
    })
    .map_err(|e| ExporterError::Transport(e.to_string()))?;
    // Unset: with the log on, retry while there is disk (the batch waits there); without it,
    // give up after 5 minutes, as the OTel Collector does.
    let max_elapsed = match (otlp.retry_max_elapsed, logged) {
        (Some(limit), _) => limit.0,
        (None, true) => Duration::MAX,
        (None, false) => MEMORY_RETRY_MAX_ELAPSED,
    };
    let policy = RetryPolicy {
        initial_backoff: otlp.retry_initial_backoff.0,
        max_backoff: otlp.retry_max_backoff.0,
        max_elapsed,
        ..RetryPolicy::default()
    };
    Ok((Sink::Otlp(Arc::new(transport), policy), otlp.concurrency))
}

/// The running exporter: a queue handle for the workers and the task that drains it.
pub(crate) struct Exporter {
    pub(crate) queue: ExportQueue,
    task: tokio::task::JoinHandle<()>,
    forwarder: Forwarder,
    shutdown_deadline: watch::Sender<Option<Instant>>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExporterError {
    #[error("exporter file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("exporter: {0}")]
    Transport(String),
}

impl Exporter {
    /// Starts the exporter task on the current tokio runtime.
    pub(crate) fn start(
        config: &ExporterConfig,
        registry: &Registry,
        storage: Option<Arc<Storage>>,
    ) -> Result<Self, ExporterError> {
        let metrics = ExportMetrics::new(registry);
        let (sink, concurrency) = open_sink(config, Signal::Traces, storage.is_some())?;
        let (metrics_sink, metrics_concurrency) =
            open_sink(config, Signal::Metrics, storage.is_some())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(SpanBudget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            cap: config.batching.queue_max_spans,
        });
        let (shutdown_deadline, deadline_rx) = watch::channel(None);
        let batcher = Batcher {
            sink: Arc::new(sink),
            budget: budget.clone(),
            metrics: metrics.clone(),
            max_spans: config.batching.batch_max_spans,
            timeout: config.batching.batch_timeout.0,
            storage: storage.clone(),
            in_flight: Arc::new(Semaphore::new(concurrency)),
            deadline: deadline_rx.clone(),
            spill_refused: false,
        };
        let task = tokio::spawn(batcher.run(rx));
        let forwarder = Forwarder::start(
            metrics_sink,
            metrics_concurrency,
            &config.batching,
            registry,
            storage,
            deadline_rx,
        );
        Ok(Self {
            queue: ExportQueue {
                tx,
                budget,
                metrics,
            },
            task,
            forwarder,
            shutdown_deadline,
        })
    }

    /// The receivers' handle on the metrics queue.
    pub(crate) fn metrics_queue(&self) -> ForwardQueue {
        self.forwarder.queue.clone()
    }

    /// From now on, retries give up at `deadline`: shutdown has begun. Call before stopping the
    /// workers, so a worker waiting on a full queue is not held up by a backend that is down.
    pub(crate) fn begin_shutdown(&self, deadline: Instant) {
        let _ = self.shutdown_deadline.send(Some(deadline));
    }

    /// Flushes what is queued and waits for it to be delivered or to fail. Call after every
    /// worker has stopped and dropped its queue handle, and the receivers have stopped.
    pub(crate) async fn finish(self) {
        drop(self.queue);
        let ((), _) = tokio::join!(self.forwarder.finish(), self.task);
    }
}

/// A batch formed and waiting for a slot to the sink.
struct Ready {
    count: usize,
    settles: Vec<Exported>,
    body: Body,
}

enum Body {
    /// Held in memory; its spans still hold their share of the queue budget.
    Memory(Bytes),
    /// Written to the storage log at this position (pinned); its budget is released.
    Spilled(u64),
}

struct Batcher {
    sink: Arc<Sink>,
    budget: Arc<SpanBudget>,
    metrics: Arc<ExportMetrics>,
    max_spans: usize,
    timeout: Duration,
    storage: Option<Arc<Storage>>,
    in_flight: Arc<Semaphore>,
    deadline: watch::Receiver<Option<Instant>>,
    /// A spill was refused (the disk bound) and not yet followed by one that worked: warn once.
    spill_refused: bool,
}

impl Batcher {
    /// Forms batches from what the workers queue and sends each as a slot frees, oldest first.
    /// With the storage log on, a batch formed while the memory queue is half full (the backend
    /// is slow or down) waits in the log instead, so an outage costs disk, not memory, and the
    /// workers keep deciding until the disk bound makes the receivers refuse.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<KeptTrace>) {
        let mut sends = JoinSet::new();
        let mut ready: VecDeque<Ready> = VecDeque::new();
        let mut batch: Vec<KeptTrace> = Vec::new();
        let mut spans = 0usize;
        let mut flush_at: Option<Instant> = None;
        let mut open = true;
        while open || !ready.is_empty() {
            let timer = flush_timer(flush_at);
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    Some(trace) => {
                        if batch.is_empty() {
                            flush_at = Some(Instant::now() + self.timeout);
                        }
                        spans += trace.spans.len();
                        batch.push(trace);
                        if spans >= self.max_spans {
                            self.form(&mut batch, &mut spans, &mut ready).await;
                            flush_at = None;
                        }
                    }
                    None => {
                        open = false;
                        self.form(&mut batch, &mut spans, &mut ready).await;
                        flush_at = None;
                    }
                },
                _ = timer => {
                    self.form(&mut batch, &mut spans, &mut ready).await;
                    flush_at = None;
                }
                permit = self.in_flight.clone().acquire_owned(), if !ready.is_empty() => {
                    let (Ok(permit), Some(next)) = (permit, ready.pop_front()) else {
                        break;
                    };
                    self.send(next, permit, &mut sends);
                }
            }
            while sends.try_join_next().is_some() {}
        }
        while sends.join_next().await.is_some() {}
    }

    /// Closes the batch being built: encodes it, and queues it in memory or in the log.
    async fn form(
        &mut self,
        batch: &mut Vec<KeptTrace>,
        spans: &mut usize,
        ready: &mut VecDeque<Ready>,
    ) {
        if batch.is_empty() {
            return;
        }
        let mut traces = std::mem::take(batch);
        let count = std::mem::take(spans);
        let settles: Vec<Exported> = traces.iter_mut().filter_map(|t| t.settle.take()).collect();
        let body = Bytes::from(encode_batch(&traces));
        drop(traces);
        // Spill while the memory queue is half full, and go on while anything spilled waits,
        // so that batches leave in the order they were formed.
        let spill = self.budget.used() * 2 >= self.budget.cap
            || ready.iter().any(|r| matches!(r.body, Body::Spilled(_)));
        let body = match &self.storage {
            Some(storage) if spill => match storage.spill(body.clone()).await {
                Ok(Ok(position)) => {
                    self.spill_refused = false;
                    self.budget.release(count);
                    self.metrics.spilled_spans.inc_by(count as i64);
                    self.metrics.spilled_total.inc_by(count as u64);
                    Body::Spilled(position)
                }
                refused => {
                    if !self.spill_refused {
                        let why = match refused {
                            Ok(Err(e)) => e.to_string(),
                            _ => "the storage log is closed".to_owned(),
                        };
                        tracing::warn!(error = %why, "cannot move export batches to the storage log; they wait in memory");
                        self.spill_refused = true;
                    }
                    Body::Memory(body)
                }
            },
            _ => Body::Memory(body),
        };
        ready.push_back(Ready {
            count,
            settles,
            body,
        });
    }

    /// Sends one ready batch in a task of its own, holding a slot until it is settled.
    fn send(&self, ready: Ready, permit: OwnedSemaphorePermit, sends: &mut JoinSet<()>) {
        let sink = self.sink.clone();
        let budget = self.budget.clone();
        let metrics = self.metrics.clone();
        let deadline = self.deadline.clone();
        let storage = self.storage.clone();
        sends.spawn(async move {
            let Ready {
                count,
                settles,
                body,
            } = ready;
            let spilled = match body {
                Body::Spilled(position) => Some(position),
                Body::Memory(_) => None,
            };
            let shutdown_passed = || deadline.borrow().is_some_and(|at| Instant::now() >= at);
            let body = match (body, &storage) {
                // Past the shutdown deadline nothing more is sent: it stays in the log.
                _ if shutdown_passed() => Err("shutdown_timeout"),
                (Body::Memory(body), _) => Ok(body),
                (Body::Spilled(position), Some(storage)) => read_spill(storage, position).await,
                (Body::Spilled(_), None) => Err("spill_unreadable"),
            };
            let outcome = match body {
                Ok(body) => {
                    let started = std::time::Instant::now();
                    let outcome = deliver(&sink, body, &metrics.retries, deadline).await;
                    metrics.latency.observe(started.elapsed().as_secs_f64());
                    outcome
                }
                Err(reason) => Err(reason),
            };
            if let Some(storage) = &storage {
                // Settled unless shutdown cut it short (then it stays in the log for the next
                // start) or its spilled copy could not be read (the span records are kept
                // from then on only if a restart comes before their segments are freed).
                let cut_short = outcome == Err("shutdown_timeout");
                if !cut_short
                    && outcome != Err("spill_unreadable")
                    && !settles.is_empty()
                    && let Ok(Err(e)) = storage.log_exported(&settles).await
                {
                    tracing::warn!(error = %e, "cannot log an export; a restart may send it again");
                }
                if !cut_short {
                    for s in &settles {
                        s.records.iter().for_each(|r| storage.pins.unpin(*r));
                    }
                }
                if let Some(position) = spilled {
                    storage.pins.unpin(position);
                }
            }
            match outcome {
                Ok(rejected) => {
                    let rejected = rejected.min(count as u64);
                    metrics.exported_spans.inc_by(count as u64 - rejected);
                    if rejected > 0 {
                        metrics.failed("rejected_by_backend", rejected);
                    }
                    metrics.batch("sent");
                }
                Err(reason) => {
                    metrics.failed(reason, count as u64);
                    metrics.batch("failed");
                }
            }
            metrics.queue_spans.dec_by(count as i64);
            if spilled.is_some() {
                metrics.spilled_spans.dec_by(count as i64);
            } else {
                budget.release(count);
            }
            drop(permit);
        });
    }
}

/// Resolves at `at`; never without one (no batch is open).
async fn flush_timer(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads a spilled batch back from the log, off the async threads.
async fn read_spill(storage: &Arc<Storage>, position: u64) -> Result<Bytes, &'static str> {
    let storage = storage.clone();
    match tokio::task::spawn_blocking(move || storage.read_spill(position)).await {
        Ok(Ok(body)) => Ok(Bytes::from(body)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read a spilled export batch back from the storage log");
            Err("spill_unreadable")
        }
        Err(_) => Err("spill_unreadable"),
    }
}

/// Sends one batch; `Ok` carries the spans the backend rejected in a partial success.
async fn deliver(
    sink: &Sink,
    body: Bytes,
    retries: &Counter,
    mut deadline: watch::Receiver<Option<Instant>>,
) -> Result<u64, &'static str> {
    match sink {
        Sink::File(file) => {
            let file = file.clone();
            match tokio::task::spawn_blocking(move || file.write_batch(&body)).await {
                Ok(Ok(())) => Ok(0),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "file exporter could not write a batch");
                    Err("io")
                }
                Err(_) => Err("io"),
            }
        }
        Sink::Otlp(transport, policy) => {
            // Shutdown may begin while this batch is retrying; the watch cuts retries short.
            let result =
                transport::send_with_retry_until(transport, body, policy, &mut deadline, |e| {
                    retries.inc();
                    tracing::warn!(error = %e, "export attempt failed; retrying");
                })
                .await;
            match result {
                Ok(delivered) => {
                    if delivered.rejected_spans > 0 {
                        tracing::warn!(rejected = delivered.rejected_spans, message = %delivered.message,
                            "backend rejected part of a batch");
                    } else if !delivered.message.is_empty() {
                        tracing::warn!(message = %delivered.message, "backend warning on export");
                    }
                    Ok(u64::try_from(delivered.rejected_spans).unwrap_or(0))
                }
                Err(SendError::Permanent { message }) => {
                    tracing::error!(%message, "backend refused a batch; not retrying");
                    Err("permanent_error")
                }
                Err(SendError::Retryable { message, .. }) => {
                    let shutting_down = deadline.borrow().is_some_and(|at| Instant::now() >= at);
                    if shutting_down {
                        tracing::error!(%message, "shutdown timeout reached while a batch was still being retried");
                        Err("shutdown_timeout")
                    } else {
                        tracing::error!(%message, "gave up on a batch after retrying");
                        Err("retries_exhausted")
                    }
                }
            }
        }
    }
}

/// Encodes kept traces as one `ExportTraceServiceRequest`, with spans regrouped under one
/// `ResourceSpans` per distinct resource and one `ScopeSpans` per distinct scope, and each
/// span's decision stamp appended to it.
pub fn encode_batch(traces: &[KeptTrace]) -> Vec<u8> {
    crate::otlp::regroup::encode_grouped(
        traces
            .iter()
            .flat_map(|t| t.spans.iter().map(move |s| (s, &*t.stamp.encoded))),
    )
}

/// The header names an OTLP exporter would send unencrypted, comma-separated: `None` for an
/// `https://` endpoint or no headers.
fn headers_in_clear(otlp: &OtlpExporterConfig) -> Option<String> {
    let plain = otlp
        .endpoint
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
    (plain && !otlp.headers.is_empty())
        .then(|| otlp.headers.keys().cloned().collect::<Vec<_>>().join(","))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::ExporterKind;

    #[test]
    fn headers_bound_for_a_plain_http_endpoint_are_named_for_a_warning() {
        let mut otlp = OtlpExporterConfig {
            endpoint: "http://backend:4317".into(),
            ..Default::default()
        };
        assert_eq!(super::headers_in_clear(&otlp), None, "no headers");
        otlp.headers.insert("x-api-key".into(), "secret".into());
        assert_eq!(super::headers_in_clear(&otlp).as_deref(), Some("x-api-key"));
        otlp.endpoint = "HTTPS://backend:4317".into();
        assert_eq!(super::headers_in_clear(&otlp), None);
    }

    fn kept(spans: usize) -> KeptTrace {
        // A valid encoded Span: field 5 (name) = "op".
        let span = crate::trace::test_span(1, 0, vec![0x2a, 2, b'o', b'p']);
        KeptTrace::new(
            vec![span; spans],
            Arc::new(Stamp {
                policy: Arc::from("p"),
                reason: Arc::from("r"),
                encoded: Box::new([]),
            }),
        )
    }

    /// A file exporter into a fresh folder, with the given batching.
    fn file_exporter(
        dir: &std::path::Path,
        max_spans: usize,
        timeout: std::time::Duration,
    ) -> (ExporterConfig, Arc<Registry>) {
        let mut config = ExporterConfig::default_for(ExporterKind::File);
        if let ExporterSink::File(file) = &mut config.sink {
            file.path = dir.join("traces.jsonl");
        }
        config.batching.batch_max_spans = max_spans;
        config.batching.batch_timeout = crate::config::Duration(timeout);
        (config, Registry::new())
    }

    fn lines(dir: &std::path::Path) -> Vec<usize> {
        let text = std::fs::read_to_string(dir.join("traces.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let request = crate::otlp::json::decode_traces(l.as_bytes()).expect("OTLP/JSON");
                (request.resource_spans.iter())
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len())
                    .sum()
            })
            .collect()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tailgate-export-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_close_at_their_span_count_and_finish_flushes_the_rest() {
        let dir = temp_dir("count");
        // A timeout no test waits for: only the span count and `finish` close a batch.
        let (config, registry) = file_exporter(&dir, 10, std::time::Duration::from_secs(3600));
        let exporter = Exporter::start(&config, &registry, None).expect("exporter");
        let queue = exporter.queue.clone();
        tokio::task::spawn_blocking(move || {
            for _ in 0..5 {
                queue.push(kept(4));
            }
        })
        .await
        .expect("pushed");
        exporter.finish().await;
        // 4 + 4 + 4 reaches 10: one batch of 12; the last 8 leave with `finish`.
        assert_eq!(lines(&dir), vec![12, 8]);
        assert_eq!(registry.value("tailgate_exported_spans_total"), 20.0);
        assert_eq!(registry.value("tailgate_export_queue_spans"), 0.0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_short_of_its_count_leaves_when_its_timeout_passes() {
        let dir = temp_dir("timeout");
        let (config, registry) = file_exporter(&dir, 1000, std::time::Duration::from_millis(50));
        let exporter = Exporter::start(&config, &registry, None).expect("exporter");
        exporter.queue.push(kept(3));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while lines(&dir).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the batch never left on its timeout"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(lines(&dir), vec![3], "sent before finish, on the timeout");
        exporter.finish().await;
        assert_eq!(registry.value("tailgate_exported_spans_total"), 3.0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_queue_holds_the_pusher_until_spans_are_released() {
        let budget = Arc::new(SpanBudget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            cap: 10,
        });
        budget.acquire(8);
        let waiting = budget.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let pusher = std::thread::spawn(move || {
            waiting.acquire(5);
            tx.send(()).expect("report");
        });
        // Held while 8 + 5 would pass the cap of 10.
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "the pusher went through a full queue"
        );
        budget.release(8);
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("released once room was made");
        pusher.join().expect("pusher");
        // A trace larger than the whole queue still goes through alone.
        budget.release(5);
        budget.acquire(50);
        assert_eq!(*budget.used.lock(), 50);
    }
}
