//! Sending generated traces: to a live OTLP endpoint at a target rate ([`send`]), or into a
//! file of length-delimited requests for benches and replay ([`write_requests`],
//! [`read_requests`]).
//!
//! Owns: the pacing (one global schedule shared by every connection), the numbering of requests
//! (so the whole run's `loadgen.seq` values are exactly `0..seq_count`), the run's [`Summary`],
//! and the list of acknowledged requests (`--acked-out`, see [`AckLog`]). The wire, the OTLP
//! failure classification and the retry loop are the exporter's ([`crate::export::transport`]):
//! the load generator is one more OTLP client, and must treat failures exactly as tailgate's own
//! exporter does.
//!
//! Must never: reuse a sequence number (a sink counts duplicates by them), leave a gap inside
//! `0..seq_count` (a gap would read as loss), send bursts of a second's worth of spans to
//! make up the rate (a request is due at its own instant of the schedule), or list a request as
//! acknowledged before its success answer arrived (a crash test reads the list as what the
//! target promised to keep).
//!
//! ## Numbering
//!
//! Requests are numbered `0, 1, 2, …` in the order the connections claim them from one shared
//! counter; request `k` carries the spans with seqs `k·S .. k·S + n` where `S` is the spans of a
//! full request (`traces_per_request · spans_per_trace`) and `n` its own span count (only the last
//! request of a `--spans` run is smaller). A claim and the stop check happen under one lock, so the
//! claimed requests are always `0..K`: every seq below `seq_count` is in some request that was
//! sent (or counted as failed), and none above. Connection `i` makes its traces with its own
//! [`Generator`] seeded `seed + i`.
//!
//! ## Pacing
//!
//! With a rate, request `k` is due at `start + k·S/rate`: the requests of all connections
//! interleave evenly on one timeline, whatever their number. Each connection has one request in
//! flight; a connection that falls behind sends its next request at once, so catching up is
//! bounded by the connections' own speed, never by a queue of overdue work. Rate 0 sends as fast
//! as the connections go (saturation).

use std::fs::File;
use std::io::{self, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use parking_lot::Mutex;
use prost::Message as _;
use serde::Serialize;
use tokio::time::Instant;

use super::generate::{Generator, Shape, metrics_request};
use crate::export::transport::{
    Protocol, RetryPolicy, SendError, Transport, TransportConfig, TransportError, send_with_retry,
};
use crate::otlp::signal::Signal;

/// Backoff between retries of one request: short, because a load generator that backs off for
/// long measures nothing; how long to keep retrying is the plan's `retry_for`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Distinct failure messages kept for the summary: enough to see what went wrong.
const MAX_ERRORS_KEPT: usize = 5;
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What to send, where, and for how long.
#[derive(Debug, Clone)]
pub(crate) struct LoadPlan {
    pub(crate) protocol: Protocol,
    /// Traces, or metrics: a data point for each span the shape describes.
    pub(crate) signal: Signal,
    /// gRPC: `http://host:port`; HTTP: a base URL to which `/v1/traces` is appended.
    pub(crate) endpoint: String,
    /// Concurrent connections, each with one request in flight.
    pub(crate) connections: usize,
    /// Spans per second over all connections; 0 = as fast as possible.
    pub(crate) rate: f64,
    /// Stop after this many spans (rounded up to whole traces).
    pub(crate) total_spans: Option<u64>,
    /// Stop claiming new requests after this long.
    pub(crate) duration: Option<Duration>,
    pub(crate) traces_per_request: usize,
    pub(crate) seed: u64,
    pub(crate) shape: Shape,
    pub(crate) gzip: bool,
    /// Per attempt.
    pub(crate) timeout: Duration,
    /// Give up on a request whose retries would start later than this after its first attempt.
    pub(crate) retry_for: Duration,
    /// Progress lines on stderr every few seconds.
    pub(crate) progress: bool,
    /// Where to list the acknowledged requests as their answers arrive (`--acked-out`).
    pub(crate) acked_out: Option<PathBuf>,
}

impl LoadPlan {
    fn spans_per_request(&self) -> u64 {
        (self.traces_per_request.max(1) * self.shape.spans_per_trace.max(1)) as u64
    }

    fn total_traces(&self) -> Option<u64> {
        let per_trace = self.shape.spans_per_trace.max(1) as u64;
        self.total_spans.map(|n| n.div_ceil(per_trace))
    }
}

/// The outcome of a run, as printed (JSON) at its end.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub(crate) struct Summary {
    pub(crate) protocol: String,
    /// Where the requests went: the endpoint, or the file of `--out`.
    pub(crate) target: String,
    pub(crate) connections: usize,
    /// Target spans/s; 0 = saturation.
    pub(crate) rate: f64,
    pub(crate) traces_per_request: usize,
    pub(crate) spans_per_trace: usize,
    pub(crate) seed: u64,
    /// Seqs handed out: the run's spans carry exactly `0..seq_count`.
    pub(crate) seq_count: u64,
    /// Spans in requests put on the wire (or written), retries not counted twice.
    pub(crate) spans_sent: u64,
    /// Spans the receiver took: delivered requests minus partial-success rejections.
    pub(crate) spans_accepted: u64,
    /// `partial_success.rejected_spans` summed.
    pub(crate) spans_rejected: u64,
    /// Spans of requests that failed for good (permanent error, or retries exhausted).
    pub(crate) spans_failed: u64,
    pub(crate) requests: u64,
    pub(crate) requests_failed: u64,
    /// Attempts after a retryable failure.
    pub(crate) retries: u64,
    /// From the first request to the last reply.
    pub(crate) elapsed_seconds: f64,
    /// `spans_accepted / elapsed_seconds`.
    pub(crate) spans_per_second: f64,
    /// A few distinct failure messages (permanent errors, exhausted retries, rejections).
    pub(crate) errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: request {index} does not decode: {source}", path.display())]
    Decode {
        path: PathBuf,
        index: usize,
        source: prost::DecodeError,
    },
    #[error("invalid load plan: {0}")]
    Plan(String),
}

/// The `--acked-out` file: one line `<first_seq> <spans>` per request answered with success,
/// saying that seqs `first_seq .. first_seq + spans` were acknowledged, in the order the answers
/// arrived. A partial success is listed whole (its rejected spans are counted in the summary's
/// `spans_rejected`); a request that failed for good is never listed.
///
/// Each line is one unbuffered `write` made as soon as its answer arrives, so the file is right
/// at every moment, also when the run goes on to fail (a target killed mid-run).
struct AckLog {
    path: PathBuf,
    file: Mutex<File>,
    /// The first write that failed: the list is then incomplete, and the run is an error.
    failed: Mutex<Option<io::Error>>,
}

impl AckLog {
    fn create(path: &Path) -> Result<Self, LoadgenError> {
        let file = File::create(path).map_err(|source| LoadgenError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
            failed: Mutex::new(None),
        })
    }

    /// Lists one acknowledged request. A write of a few bytes into the page cache, made on the
    /// connection's task: cheaper than a hop to a blocking thread, and it keeps the line ahead
    /// of the connection's next request.
    fn record(&self, first_seq: u64, spans: u64) {
        let line = format!("{first_seq} {spans}\n");
        if let Err(e) = self.file.lock().write_all(line.as_bytes()) {
            self.failed.lock().get_or_insert(e);
        }
    }

    /// Ok when every acknowledged request was listed.
    fn finish(&self) -> Result<(), LoadgenError> {
        match self.failed.lock().take() {
            None => Ok(()),
            Some(source) => Err(LoadgenError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// One request's worth of the schedule.
#[derive(Debug, Clone, Copy)]
struct Claim {
    index: u64,
    seq_start: u64,
    traces: usize,
    due: Option<Instant>,
}

/// The shared request counter and stop condition.
struct Schedule {
    start: Instant,
    /// Between two requests' due times; None = no pacing.
    interval: Option<Duration>,
    end: Option<Instant>,
    total_traces: Option<u64>,
    traces_per_request: u64,
    spans_per_request: u64,
    spans_per_trace: u64,
    state: Mutex<ScheduleState>,
}

#[derive(Default)]
struct ScheduleState {
    next: u64,
    closed: bool,
}

impl Schedule {
    fn new(plan: &LoadPlan, start: Instant) -> Self {
        let spans_per_request = plan.spans_per_request();
        let interval = (plan.rate > 0.0)
            .then(|| Duration::try_from_secs_f64(spans_per_request as f64 / plan.rate).ok())
            .flatten();
        Self {
            start,
            interval,
            end: plan.duration.map(|d| start + d),
            total_traces: plan.total_traces(),
            traces_per_request: plan.traces_per_request.max(1) as u64,
            spans_per_request,
            spans_per_trace: plan.shape.spans_per_trace.max(1) as u64,
            state: Mutex::new(ScheduleState::default()),
        }
    }

    fn due(&self, index: u64) -> Option<Instant> {
        let interval = self.interval?;
        // u32 is ample: at one request a microsecond it lasts over an hour; saturate beyond.
        let k = u32::try_from(index).unwrap_or(u32::MAX);
        Some(self.start + interval.saturating_mul(k))
    }

    /// The next request, or None once the run is over (for every later caller too).
    fn claim(&self) -> Option<Claim> {
        let mut state = self.state.lock();
        if state.closed {
            return None;
        }
        let index = state.next;
        let first_trace = index * self.traces_per_request;
        let traces = match self.total_traces {
            Some(total) if first_trace >= total => {
                state.closed = true;
                return None;
            }
            Some(total) => (total - first_trace).min(self.traces_per_request),
            None => self.traces_per_request,
        };
        let due = self.due(index);
        if let Some(end) = self.end
            && due.unwrap_or_else(Instant::now) >= end
        {
            state.closed = true;
            return None;
        }
        state.next += 1;
        Some(Claim {
            index,
            seq_start: index * self.spans_per_request,
            traces: traces as usize,
            due,
        })
    }

    /// Seqs handed out so far.
    fn seq_count(&self, spans_per_trace: u64) -> u64 {
        let next = self.state.lock().next;
        match (next, self.total_traces) {
            (0, _) => 0,
            (n, Some(total)) => ((n * self.traces_per_request).min(total)) * spans_per_trace,
            (n, None) => n * self.spans_per_request,
        }
    }
}

/// Counters of one connection, added up at the end.
#[derive(Debug, Default)]
struct ConnectionStats {
    spans_sent: u64,
    spans_accepted: u64,
    spans_rejected: u64,
    spans_failed: u64,
    requests: u64,
    requests_failed: u64,
    retries: u64,
    errors: Vec<String>,
}

impl ConnectionStats {
    fn note_error(&mut self, message: String) {
        if self.errors.len() < MAX_ERRORS_KEPT && !self.errors.contains(&message) {
            self.errors.push(message);
        }
    }
}

fn validate(plan: &LoadPlan) -> Result<(), LoadgenError> {
    if plan.connections == 0 {
        return Err(LoadgenError::Plan("connections must be at least 1".into()));
    }
    if !(plan.rate >= 0.0 && plan.rate.is_finite()) {
        return Err(LoadgenError::Plan(format!(
            "rate must be a finite number ≥ 0, not {}",
            plan.rate
        )));
    }
    if plan.total_spans.is_none() && plan.duration.is_none() {
        return Err(LoadgenError::Plan(
            "give a number of spans, a duration, or both".into(),
        ));
    }
    Ok(())
}

/// Wall clock in Unix nanoseconds: the end time of the roots of a request made now.
fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Sends the plan's load to its endpoint and reports what happened. Must run inside a tokio
/// runtime. Failed requests are counted in the summary, not returned as errors: only a plan or
/// endpoint that cannot work at all is an error.
pub(crate) async fn send(plan: &LoadPlan) -> Result<Summary, LoadgenError> {
    validate(plan)?;
    // One transport (one gRPC channel, one HTTP connection pool) per connection: N real
    // connections, as N instrumented services would open.
    let transports = (0..plan.connections)
        .map(|_| {
            Transport::new(TransportConfig {
                protocol: plan.protocol,
                signal: plan.signal,
                endpoint: plan.endpoint.clone(),
                headers: Vec::new(),
                gzip: plan.gzip,
                timeout: plan.timeout,
                tls: Default::default(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let acked = match &plan.acked_out {
        Some(path) => Some(Arc::new(AckLog::create(path)?)),
        None => None,
    };
    let target = transports
        .first()
        .map(|t| t.endpoint().to_owned())
        .unwrap_or_default();

    let start = Instant::now();
    let schedule = Arc::new(Schedule::new(plan, start));
    let accepted = Arc::new(AtomicU64::new(0));
    let progress = plan.progress.then(|| {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = accepted.load(Ordering::Relaxed);
                eprintln!(
                    "loadgen: {now} spans accepted, {:.0} spans/s over the last {}s",
                    (now - last) as f64 / PROGRESS_EVERY.as_secs_f64(),
                    PROGRESS_EVERY.as_secs()
                );
                last = now;
            }
        })
    });

    let retry = RetryPolicy {
        initial_backoff: INITIAL_BACKOFF,
        max_backoff: MAX_BACKOFF,
        max_elapsed: plan.retry_for,
        multiplier: 1.5,
    };
    let tasks: Vec<_> = transports
        .into_iter()
        .enumerate()
        .map(|(i, transport)| {
            let generator = Generator::new(plan.seed.wrapping_add(i as u64), plan.shape.clone());
            tokio::spawn(run_connection(
                transport,
                plan.signal,
                generator,
                retry,
                schedule.clone(),
                accepted.clone(),
                acked.clone(),
            ))
        })
        .collect();
    let mut stats = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(s) => stats.push(s),
            Err(e) => {
                return Err(LoadgenError::Plan(format!("a connection task failed: {e}")));
            }
        }
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    if let Some(acked) = &acked {
        acked.finish()?;
    }
    let seq_count = schedule.seq_count(plan.shape.spans_per_trace.max(1) as u64);
    Ok(summarize(plan, target, seq_count, elapsed, stats))
}

async fn run_connection(
    transport: Transport,
    signal: Signal,
    mut generator: Generator,
    retry: RetryPolicy,
    schedule: Arc<Schedule>,
    accepted: Arc<AtomicU64>,
    acked: Option<Arc<AckLog>>,
) -> ConnectionStats {
    let mut stats = ConnectionStats::default();
    while let Some(claim) = schedule.claim() {
        if let Some(due) = claim.due {
            tokio::time::sleep_until(due).await;
        }
        generator.set_seq(claim.seq_start, 1);
        let (body, spans) = match signal {
            Signal::Traces => {
                let request = generator.request(claim.traces, now_unix_nanos());
                let spans = generator.next_seq() - claim.seq_start;
                (Bytes::from(request.encode_to_vec()), spans)
            }
            Signal::Metrics => {
                let points = claim.traces as u64 * schedule.spans_per_trace;
                let request = metrics_request(claim.seq_start, points, now_unix_nanos());
                (Bytes::from(request.encode_to_vec()), points)
            }
        };
        stats.requests += 1;
        stats.spans_sent += spans;
        let mut retries = 0;
        let result =
            send_with_retry(&transport, body, &retry, None, |_: &SendError| retries += 1).await;
        stats.retries += retries;
        match result {
            Ok(delivered) => {
                if let Some(acked) = &acked {
                    acked.record(claim.seq_start, spans);
                }
                let rejected = u64::try_from(delivered.rejected_spans)
                    .unwrap_or(0)
                    .min(spans);
                stats.spans_rejected += rejected;
                stats.spans_accepted += spans - rejected;
                accepted.fetch_add(spans - rejected, Ordering::Relaxed);
                if rejected > 0 || !delivered.message.is_empty() {
                    stats.note_error(format!(
                        "request {}: partial success, {rejected} spans rejected: {}",
                        claim.index, delivered.message
                    ));
                }
            }
            Err(e) => {
                stats.requests_failed += 1;
                stats.spans_failed += spans;
                stats.note_error(e.message().to_owned());
            }
        }
    }
    stats
}

fn summarize(
    plan: &LoadPlan,
    target: String,
    seq_count: u64,
    elapsed: Duration,
    stats: Vec<ConnectionStats>,
) -> Summary {
    let mut s = Summary {
        protocol: match plan.protocol {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http",
        }
        .into(),
        target,
        connections: plan.connections,
        rate: plan.rate,
        traces_per_request: plan.traces_per_request.max(1),
        spans_per_trace: plan.shape.spans_per_trace.max(1),
        seed: plan.seed,
        seq_count,
        elapsed_seconds: elapsed.as_secs_f64(),
        ..Summary::default()
    };
    for c in stats {
        s.spans_sent += c.spans_sent;
        s.spans_accepted += c.spans_accepted;
        s.spans_rejected += c.spans_rejected;
        s.spans_failed += c.spans_failed;
        s.requests += c.requests;
        s.requests_failed += c.requests_failed;
        s.retries += c.retries;
        for e in c.errors {
            if s.errors.len() < MAX_ERRORS_KEPT && !s.errors.contains(&e) {
                s.errors.push(e);
            }
        }
    }
    if s.elapsed_seconds > 0.0 {
        s.spans_per_second = s.spans_accepted as f64 / s.elapsed_seconds;
    }
    s
}

/// Writes the plan's requests to `path` instead of sending them: each request as a varint
/// length and then the encoded `ExportTraceServiceRequest` (protobuf's length-delimited
/// framing), read back by [`read_requests`]. Requests are numbered as in [`send`], request `k`
/// made by the generator of connection `k mod connections`; roots end at the wall clock when
/// their request is made. Needs `total_spans`: a file has no rate or duration.
pub(crate) fn write_requests(plan: &LoadPlan, path: &Path) -> Result<Summary, LoadgenError> {
    validate(plan)?;
    if plan.total_spans.is_none() {
        return Err(LoadgenError::Plan(
            "writing to a file needs a number of spans".into(),
        ));
    }
    if plan.acked_out.is_some() {
        return Err(LoadgenError::Plan(
            "acknowledged requests are listed from an endpoint's answers; a file gives none".into(),
        ));
    }
    if plan.signal != Signal::Traces {
        return Err(LoadgenError::Plan(
            "--out writes trace requests only".into(),
        ));
    }
    let io_err = |source| LoadgenError::Io {
        path: path.to_owned(),
        source,
    };
    let start = Instant::now();
    // No rate and no duration: the schedule only numbers the requests.
    let unpaced = LoadPlan {
        rate: 0.0,
        duration: None,
        ..plan.clone()
    };
    let schedule = Schedule::new(&unpaced, start);
    let mut generators: Vec<Generator> = (0..plan.connections)
        .map(|i| Generator::new(plan.seed.wrapping_add(i as u64), plan.shape.clone()))
        .collect();
    let mut out = BufWriter::new(File::create(path).map_err(io_err)?);
    let mut stats = ConnectionStats::default();
    let mut buf = Vec::new();
    while let Some(claim) = schedule.claim() {
        let slot = (claim.index % plan.connections as u64) as usize;
        let generator = &mut generators[slot];
        generator.set_seq(claim.seq_start, 1);
        let request = generator.request(claim.traces, now_unix_nanos());
        let spans = generator.next_seq() - claim.seq_start;
        buf.clear();
        request
            .encode_length_delimited(&mut buf)
            .map_err(|e| io_err(io::Error::other(e)))?;
        out.write_all(&buf).map_err(io_err)?;
        stats.requests += 1;
        stats.spans_sent += spans;
        stats.spans_accepted += spans;
    }
    out.flush().map_err(io_err)?;
    let seq_count = schedule.seq_count(plan.shape.spans_per_trace.max(1) as u64);
    Ok(summarize(
        &unpaced,
        path.display().to_string(),
        seq_count,
        start.elapsed(),
        vec![stats],
    ))
}

/// Every request of a file written by [`write_requests`] (`tailgate loadgen --out`), in order.
pub fn read_requests(path: &Path) -> Result<Vec<ExportTraceServiceRequest>, LoadgenError> {
    let bytes = std::fs::read(path).map_err(|source| LoadgenError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut rest = bytes.as_slice();
    let mut requests = Vec::new();
    while !rest.is_empty() {
        let request =
            ExportTraceServiceRequest::decode_length_delimited(&mut rest).map_err(|source| {
                LoadgenError::Decode {
                    path: path.to_owned(),
                    index: requests.len(),
                    source,
                }
            })?;
        requests.push(request);
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };

    use super::*;
    use crate::loadgen::seq_of;

    fn plan(total: Option<u64>, duration: Option<Duration>, rate: f64) -> LoadPlan {
        LoadPlan {
            protocol: Protocol::Grpc,
            signal: Signal::Traces,
            endpoint: "http://127.0.0.1:1".into(),
            connections: 3,
            rate,
            total_spans: total,
            duration,
            traces_per_request: 4,
            seed: 9,
            shape: Shape {
                spans_per_trace: 7,
                ..Shape::default()
            },
            gzip: false,
            timeout: Duration::from_secs(1),
            retry_for: Duration::from_secs(1),
            progress: false,
            acked_out: None,
        }
    }

    #[test]
    fn claims_cover_whole_traces_up_to_the_total_and_stop_for_good() {
        // 100 spans of 7-span traces: 15 traces (105 spans), requests of 4, 4, 4, 3 traces.
        let s = Schedule::new(&plan(Some(100), None, 0.0), Instant::now());
        let claims: Vec<Claim> = std::iter::from_fn(|| s.claim()).collect();
        let traces: Vec<usize> = claims.iter().map(|c| c.traces).collect();
        assert_eq!(traces, [4, 4, 4, 3]);
        let starts: Vec<u64> = claims.iter().map(|c| c.seq_start).collect();
        assert_eq!(starts, [0, 28, 56, 84]);
        assert!(s.claim().is_none());
        assert_eq!(s.seq_count(7), 105);
    }

    #[test]
    fn paced_requests_are_due_evenly_and_stop_at_the_duration() {
        // 28 spans per request at 280 spans/s: one request every 100 ms; 1 s gives 10.
        let start = Instant::now();
        let s = Schedule::new(&plan(None, Some(Duration::from_secs(1)), 280.0), start);
        let claims: Vec<Claim> = std::iter::from_fn(|| s.claim()).collect();
        assert_eq!(claims.len(), 10);
        for (k, c) in claims.iter().enumerate() {
            assert_eq!(c.due, Some(start + Duration::from_millis(100) * k as u32));
        }
        assert_eq!(s.seq_count(7), 280);
    }

    #[test]
    fn a_written_file_reads_back_with_every_seq_once() {
        let dir =
            std::env::temp_dir().join(format!("tailgate-loadgen-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("load.bin");
        let summary = write_requests(&plan(Some(1_000), None, 0.0), &path).unwrap();
        let requests = read_requests(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(summary.seq_count, 1_001); // 143 traces of 7
        assert_eq!(requests.len() as u64, summary.requests);
        let mut seqs: Vec<u64> = requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(|s| seq_of(s).unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..1_001).collect::<Vec<_>>());
    }

    /// A gRPC receiver that refuses every third request as a permanent error and records the
    /// first seq and span count of each request it accepts.
    struct RefuseEveryThird {
        calls: std::sync::atomic::AtomicUsize,
        accepted: std::sync::Arc<Mutex<Vec<(u64, u64)>>>,
    }

    #[tonic::async_trait]
    impl TraceService for RefuseEveryThird {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(3) {
                return Err(tonic::Status::invalid_argument("refused for the test"));
            }
            let seqs: Vec<u64> = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .flat_map(|ss| &ss.spans)
                .filter_map(seq_of)
                .collect();
            let first = seqs.iter().copied().min().unwrap_or(0);
            self.accepted.lock().push((first, seqs.len() as u64));
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acked_out_lists_exactly_the_requests_answered_with_success() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = RefuseEveryThird {
            calls: Default::default(),
            accepted: accepted.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );

        let dir =
            std::env::temp_dir().join(format!("tailgate-loadgen-acked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acked.txt");
        let run = LoadPlan {
            endpoint: format!("http://{addr}"),
            acked_out: Some(path.clone()),
            ..plan(Some(700), None, 0.0)
        };
        let summary = send(&run).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = stop.send(());
        let _ = server.await;

        // 700 spans of 7-span traces in requests of 4 traces: 25 requests, 8 of them refused.
        assert_eq!((summary.requests, summary.requests_failed), (25, 8));
        let mut listed: Vec<(u64, u64)> = text
            .lines()
            .map(|l| {
                let (first, spans) = l.split_once(' ').expect("two fields");
                (first.parse().unwrap(), spans.parse().unwrap())
            })
            .collect();
        listed.sort_unstable();
        let mut want = accepted.lock().clone();
        want.sort_unstable();
        assert_eq!(listed, want, "the list is the accepted requests, no more");
        let spans: u64 = listed.iter().map(|(_, n)| n).sum();
        assert_eq!(spans, summary.spans_accepted);
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_the_request() {
        let dir =
            std::env::temp_dir().join(format!("tailgate-loadgen-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("load.bin");
        write_requests(&plan(Some(100), None, 0.0), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_requests(&path).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(err, LoadgenError::Decode { index: 3, .. }),
            "{err}"
        );
    }
}
