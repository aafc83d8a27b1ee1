//! From a request body to spans in the buffer's shards: the part both transports share.
//! Metrics take [`super::passthrough`]'s way instead; [`Ingest::accept`] chooses.
//!
//! Parses at the wire level (no prost decode on the protobuf path), counts every span, rejects
//! spans with bad ids into `partial_success`, reserves memory for the rest or refuses the whole
//! request with a retryable error, appends the request to the storage log (the answer waits
//! for it), and routes each span to the shard that owns its trace.
//!
//! The append and the routing after it run in a task of their own, so a sender that hangs up
//! mid-request cannot leave a record in the log that no shard holds. The same routing takes
//! records read back from the log at start ([`Ingest::replay`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_channel::Sender;
use prost::Message;
use tokio::sync::Notify;

use super::metrics::{ReceiverMetrics, RefusedReason};
use crate::buffer::{MemoryBudget, shard_of};
use crate::export::ForwardQueue;
use crate::otlp::signal::Signal;
use crate::otlp::{json, spans, wire};
use crate::pipeline::{ShardMsg, ShardSpan};
use crate::storage::{self, AppendError, Storage};
use crate::trace::Nanos;

/// The request was taken; `rejected_spans` of it were refused for bad ids.
#[derive(Debug, Default)]
pub struct Accepted {
    pub rejected_spans: u64,
    pub(crate) message: String,
}

/// The request was not taken.
#[derive(Debug)]
pub enum Refusal {
    /// The body is not a valid OTLP trace request; not retryable.
    Malformed(String),
    /// The request holds more than one request may (spans, or what its JSON decodes to); not
    /// retryable as it is: HTTP 413, gRPC `RESOURCE_EXHAUSTED` without RetryInfo.
    TooLarge(String),
    /// The buffer is full; retryable.
    Busy,
    /// The metrics queue is full and there is no storage log to wait in; retryable.
    MetricsQueueFull,
    /// The storage log is full or cannot be written; retryable.
    DiskFull(String),
    /// The host is shutting down; retryable (elsewhere or later).
    ShuttingDown,
}

/// What one request may hold, however few bytes it took on the wire.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestLimits {
    /// `receivers.max_spans_per_request`; resource and scope blocks are held to it too.
    pub(crate) max_spans: u64,
    /// What decoding an OTLP/JSON body may build: twice `receivers.max_request_size` (decoded
    /// messages can be larger than the JSON text that holds them, but not without bound).
    pub(crate) max_json_decoded: usize,
}

impl RequestLimits {
    pub(crate) fn from_config(config: &crate::config::ReceiversConfig) -> Self {
        Self {
            max_spans: config.max_spans_per_request as u64,
            max_json_decoded: config.max_request_size.bytes().saturating_mul(2),
        }
    }
}

pub struct Ingest {
    shards: Vec<Sender<ShardMsg>>,
    pub(super) limits: RequestLimits,
    memory: Arc<MemoryBudget>,
    pub(super) metrics: Arc<ReceiverMetrics>,
    pub(super) storage: Option<Arc<Storage>>,
    /// Where metrics go (they pass through, past the buffer).
    pub(super) forward: Option<ForwardQueue>,
    accepting: AtomicBool,
    /// Requests between the `accepting` check and their spans reaching the shards.
    in_flight: AtomicUsize,
    idle: Notify,
}

/// A parsed request, split by shard, with its memory cost.
struct Split {
    per_shard: Vec<Vec<ShardSpan>>,
    cost: usize,
    accepted: u64,
    rejected: u64,
    rejection: Option<String>,
}

/// Holds the request in flight until dropped.
pub(super) struct InFlight<'a>(&'a Ingest);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// [`InFlight`] for a task that carries on a request already admitted.
pub(super) struct OwnedInFlight(pub(super) Arc<Ingest>);

impl OwnedInFlight {
    pub(super) fn new(ingest: Arc<Ingest>) -> Self {
        ingest.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(ingest)
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Ingest {
    pub fn new(
        shards: Vec<Sender<ShardMsg>>,
        memory: Arc<MemoryBudget>,
        metrics: Arc<ReceiverMetrics>,
    ) -> Self {
        Self {
            shards,
            limits: RequestLimits::from_config(&Default::default()),
            memory,
            metrics,
            storage: None,
            forward: None,
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    pub(crate) fn with_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Appends every accepted request to `storage` before answering it.
    pub(crate) fn with_storage(mut self, storage: Option<Arc<Storage>>) -> Self {
        self.storage = storage;
        self
    }

    /// Queues accepted metrics for the exporter.
    pub(crate) fn with_metrics_queue(mut self, queue: ForwardQueue) -> Self {
        self.forward = Some(queue);
        self
    }

    /// A request of `signal`, protobuf or (with `json`) OTLP/JSON, from a caller whose token
    /// may bind it to `tenant`.
    pub(crate) async fn accept(
        self: &Arc<Self>,
        signal: Signal,
        body: Bytes,
        json: bool,
        transport: &'static str,
        tenant: Option<&str>,
    ) -> Result<Accepted, Refusal> {
        match (signal, json) {
            (Signal::Traces, false) => self.accept_protobuf_from(body, transport, tenant).await,
            (Signal::Traces, true) => self.accept_json(&body, transport, tenant).await,
            (Signal::Metrics, json) => self.accept_metrics(body, json, transport, tenant).await,
        }
    }

    /// [`Self::check_shape`] for a protobuf request of `signal`.
    pub(crate) fn check_signal_shape(&self, signal: Signal, body: &[u8]) -> Result<(), Refusal> {
        match signal {
            Signal::Traces => self.check_shape(body),
            Signal::Metrics => self.check_metrics_shape(body),
        }
    }

    /// From now on every request is refused as retryable: the host is draining. Returns once
    /// every request already past the check has handed its spans to the shards, so stopping
    /// the shards after it loses nothing that was acknowledged.
    pub(crate) async fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// A request in flight is done; the last one wakes a waiting drain.
    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub(super) fn enter(&self) -> Result<InFlight<'_>, Refusal> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self);
        if !self.accepting.load(Ordering::Acquire) {
            return Err(Refusal::ShuttingDown);
        }
        Ok(guard)
    }

    /// An OTLP/JSON body: decoded leniently, then taken through the protobuf path so both
    /// encodings share every rule after decoding (and the log holds protobuf only).
    pub(crate) async fn accept_json(
        self: &Arc<Self>,
        body: &[u8],
        transport: &'static str,
        tenant: Option<&str>,
    ) -> Result<Accepted, Refusal> {
        let limits = self.limits;
        let request = super::run_ingest(body.len(), || {
            json::decode_traces_within(body, limits.max_json_decoded, limits.max_spans)
        })
        .map_err(|e| match e {
            json::Undecoded::Malformed(e) => Refusal::Malformed(e.to_string()),
            json::Undecoded::TooLarge(why) => Refusal::TooLarge(why),
        })?;
        self.accept_protobuf_from(Bytes::from(request.encode_to_vec()), transport, tenant)
            .await
    }

    pub async fn accept_protobuf(
        self: &Arc<Self>,
        body: Bytes,
        transport: &'static str,
    ) -> Result<Accepted, Refusal> {
        self.accept_protobuf_from(body, transport, None).await
    }

    /// [`Self::accept_protobuf`] for a sender whose token binds it to `tenant`: every span is
    /// stamped `tenant.id = <tenant>` first, replacing what the sender wrote, so the request
    /// is rewritten (at the wire level) before it is logged and buffered.
    pub(crate) async fn accept_protobuf_from(
        self: &Arc<Self>,
        body: Bytes,
        transport: &'static str,
        tenant: Option<&str>,
    ) -> Result<Accepted, Refusal> {
        let guard = self.enter()?;
        let (body, stamped) = match tenant {
            None => (body, None),
            Some(tenant) => {
                let limit = self.limits.max_spans;
                let (body, rejected, first) = super::run_ingest(body.len(), || {
                    wire::with_span_attribute(&body, "tenant.id", tenant, limit)
                })
                .map_err(unparsed)?;
                (Bytes::from(body), Some((rejected, first)))
            }
        };
        let mut split = self.split_request(&body, stamped)?;
        self.admit(&mut split, transport)?;
        let Some(storage) = self.storage.clone().filter(|_| split.accepted > 0) else {
            return Ok(self.route(split, None));
        };
        let Some(admission) = storage.admit(body.len()) else {
            return Err(self.refuse_for_disk(&split, "storage.max_bytes is reached".into()));
        };
        // From the append on, the request finishes even if its sender hangs up; it stays in
        // flight throughout, so a drain waits for it.
        let owned = OwnedInFlight::new(self.clone());
        drop(guard);
        let task = tokio::spawn(async move {
            let ingest = owned.0.clone();
            let appended = storage
                .append_spans(body, storage::unix_nanos(), Some(admission))
                .await;
            let result = match appended.unwrap_or(Err(AppendError::Closed)) {
                Ok(position) => Ok(ingest.route(split, Some(position))),
                Err(e) => {
                    tracing::warn!(error = %e, "refusing a request: the storage log cannot take it");
                    Err(ingest.refuse_for_disk(&split, e.to_string()))
                }
            };
            drop(owned);
            result
        });
        task.await
            .unwrap_or_else(|e| Err(Refusal::DiskFull(format!("append failed: {e}"))))
    }

    /// The whole path without the storage log, synchronously: what memory-only mode does, for
    /// callers outside the async runtime (the benches).
    pub fn accept_unlogged(
        &self,
        body: &[u8],
        transport: &'static str,
    ) -> Result<Accepted, Refusal> {
        let _guard = self.enter()?;
        let mut split = self.split_request(body, None)?;
        self.admit(&mut split, transport)?;
        Ok(self.route(split, None))
    }

    /// The refusal a protobuf request would get for its shape (malformed, or more spans than
    /// a request may hold), found without building its spans: for a request the in-flight
    /// budget cannot take now, which should not be told to retry what can never be taken.
    pub(crate) fn check_shape(&self, body: &[u8]) -> Result<(), Refusal> {
        super::run_ingest(body.len(), || {
            spans::parse_within(body, self.limits.max_spans).map(|_| ())
        })
        .map_err(unparsed)
    }

    /// Parses a client's request; `stamped` carries what an earlier rewrite of it refused.
    fn split_request(
        &self,
        body: &[u8],
        stamped: Option<(u64, Option<String>)>,
    ) -> Result<Split, Refusal> {
        let mut split = super::run_ingest(body.len(), || self.split(body, self.limits.max_spans))?;
        if let Some((rejected, first)) = stamped {
            split.rejected += rejected;
            split.rejection = split.rejection.or(first);
        }
        Ok(split)
    }

    /// Counts a parsed request and reserves its memory, or refuses it.
    fn admit(&self, split: &mut Split, transport: &'static str) -> Result<(), Refusal> {
        self.metrics
            .received(transport, split.accepted + split.rejected);
        self.metrics
            .refused(RefusedReason::InvalidId, split.rejected);
        if split.accepted > 0 && !self.memory.try_reserve(split.cost) {
            self.metrics.refused(RefusedReason::Memory, split.accepted);
            return Err(Refusal::Busy);
        }
        Ok(())
    }

    fn refuse_for_disk(&self, split: &Split, why: String) -> Refusal {
        self.memory.release(split.cost);
        self.metrics
            .refused(RefusedReason::DiskFull, split.accepted);
        Refusal::DiskFull(why)
    }

    /// A span record read back from the log at start, routed as if it had just arrived at
    /// `at` (its record time on the host's clock). The caller has pinned `position` once.
    /// Returns false for a record that does not parse (it was checked when appended, so this
    /// is damage the checksum missed).
    pub fn replay(&self, body: &[u8], position: u64, at: Nanos) -> bool {
        // Admitted under the limits of its day; they may have been lowered since.
        let Ok(split) = self.split(body, u64::MAX) else {
            if let Some(storage) = &self.storage {
                storage.pins.unpin(position);
            }
            return false;
        };
        // Replay is not refused for memory: the shards shed early under pressure, and the
        // caller waits for room between records.
        self.memory.force_reserve(split.cost);
        self.route_at(split, Some(position), Some(at));
        true
    }

    /// Parses a request into spans per shard, with their costs.
    fn split(&self, body: &[u8], max_spans: u64) -> Result<Split, Refusal> {
        let shards = self.shards.len();
        let parsed = spans::parse_within(body, max_spans).map_err(unparsed)?;
        // Sized up front rather than grown span by span (seven reallocations of a shard's
        // vector for a 300-span request). Traces spread over the shards unevenly, so each
        // gets its even share and a quarter more: the rare shard that takes more grows once.
        let n = parsed.count();
        let share = if shards <= 1 {
            n
        } else {
            (n.div_ceil(shards) + n / 4).min(n)
        };
        let mut per_shard: Vec<Vec<ShardSpan>> =
            (0..shards).map(|_| Vec::with_capacity(share)).collect();
        let mut cost = 0usize;
        let mut accepted = 0u64;
        let rejected = parsed.for_each(|trace_id, span, span_cost| {
            cost += span_cost;
            accepted += 1;
            per_shard[shard_of(&trace_id, shards)].push(ShardSpan {
                trace_id,
                span,
                cost: span_cost,
            });
        });
        Ok(Split {
            per_shard,
            cost,
            accepted,
            rejected: rejected.spans,
            rejection: rejected.first,
        })
    }

    fn route(&self, split: Split, record: Option<u64>) -> Accepted {
        self.route_at(split, record, None)
    }

    /// Hands each shard its spans. The record's one pin (the writer's, or the replay's)
    /// becomes one per shard message; each shard unpins its own once its traces hold it.
    fn route_at(&self, split: Split, record: Option<u64>, at: Option<Nanos>) -> Accepted {
        let messages = split.per_shard.iter().filter(|s| !s.is_empty()).count() as u32;
        let storage = self.storage.as_ref().zip(record);
        if let Some((storage, position)) = storage {
            match messages {
                0 => storage.pins.unpin(position),
                n => storage.pins.pin_n(position, n - 1),
            }
        }
        let mut message = split.rejection.unwrap_or_default();
        let mut rejected = split.rejected;
        for (shard, spans) in split.per_shard.into_iter().enumerate() {
            if spans.is_empty() {
                continue;
            }
            let n = spans.len() as u64;
            let cost: usize = spans.iter().map(|s| s.cost).sum();
            let msg = match at {
                None => ShardMsg::Spans { spans, record },
                Some(at) => ShardMsg::Replay {
                    spans,
                    record: record.unwrap_or(0),
                    at,
                },
            };
            if self.shards[shard].send(msg).is_err() {
                // The worker has stopped, which only happens at shutdown, after the listeners
                // closed. Other shards may have taken their part, so report these spans as
                // rejected rather than failing (and duplicating) the whole request.
                self.memory.release(cost);
                if let Some((storage, position)) = storage {
                    storage.pins.unpin(position);
                }
                self.metrics.refused(RefusedReason::ShuttingDown, n);
                rejected += n;
                message = "tailgate is shutting down".into();
            }
        }
        Accepted {
            rejected_spans: rejected,
            message,
        }
    }
}

fn unparsed(e: wire::Unparsed) -> Refusal {
    match e {
        wire::Unparsed::Malformed(e) => Refusal::Malformed(e.to_string()),
        too_many => Refusal::TooLarge(too_many.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;
    use crate::telemetry::Registry;

    struct Setup {
        ingest: Arc<Ingest>,
        shards: Vec<crossbeam_channel::Receiver<ShardMsg>>,
        memory: Arc<MemoryBudget>,
        registry: Arc<Registry>,
    }

    fn setup(shards: usize, memory_limit: usize) -> Setup {
        let (txs, rxs): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| crossbeam_channel::unbounded()).unzip();
        let registry = Registry::new();
        let memory = Arc::new(MemoryBudget::new(memory_limit));
        Setup {
            ingest: Arc::new(Ingest::new(
                txs,
                memory.clone(),
                ReceiverMetrics::new(&registry),
            )),
            shards: rxs,
            memory,
            registry,
        }
    }

    impl Setup {
        /// Every span the shards were sent: (shard, trace id byte, cost).
        fn routed(&self) -> Vec<(usize, u8, usize)> {
            let mut out = Vec::new();
            for (i, rx) in self.shards.iter().enumerate() {
                while let Ok(msg) = rx.try_recv() {
                    if let ShardMsg::Spans { spans, .. } = msg {
                        out.extend(spans.iter().map(|s| (i, s.trace_id[0], s.cost)));
                    }
                }
            }
            out
        }
    }

    fn span(trace: u8, id: u8) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            name: "op".into(),
            ..Default::default()
        }
    }

    fn request(spans: Vec<Span>) -> Vec<u8> {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue("api".into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn spans_go_to_the_shard_of_their_trace_with_their_cost_reserved() {
        let s = setup(4, 1 << 20);
        let body = request((1..=8u8).map(|t| span(t, 1)).collect());
        let accepted = s.ingest.accept_unlogged(&body, "grpc").expect("accepted");
        assert_eq!(accepted.rejected_spans, 0);
        let routed = s.routed();
        assert_eq!(routed.len(), 8);
        for (shard, trace, _) in &routed {
            assert_eq!(*shard, shard_of(&[*trace; 16], 4), "trace {trace}");
        }
        let reserved: usize = routed.iter().map(|(_, _, c)| c).sum();
        assert_eq!(
            s.memory.used(),
            reserved,
            "the budget holds what the spans cost"
        );
        assert_eq!(
            s.registry
                .value("tailgate_spans_received_total{transport=\"grpc\"}"),
            8.0
        );
    }

    #[test]
    fn spans_with_bad_ids_are_rejected_and_counted_the_rest_taken() {
        let s = setup(1, 1 << 20);
        let mut bad = span(1, 2);
        bad.trace_id = vec![1, 2, 3];
        let body = request(vec![span(1, 1), bad]);
        let accepted = s
            .ingest
            .accept_unlogged(&body, "http_protobuf")
            .expect("taken");
        assert_eq!(accepted.rejected_spans, 1);
        assert!(!accepted.message.is_empty());
        assert_eq!(s.routed().len(), 1);
        assert_eq!(
            s.registry
                .value("tailgate_spans_received_total{transport=\"http_protobuf\"}"),
            2.0
        );
        assert_eq!(
            s.registry
                .value("tailgate_spans_refused_total{reason=\"invalid_id\"}"),
            1.0
        );
    }

    #[test]
    fn a_full_budget_refuses_the_whole_request_as_busy_and_reserves_nothing() {
        let s = setup(2, 200);
        let body = request((1..=4u8).map(|t| span(t, 1)).collect());
        assert!(matches!(
            s.ingest.accept_unlogged(&body, "grpc"),
            Err(Refusal::Busy)
        ));
        assert!(s.routed().is_empty());
        assert_eq!(s.memory.used(), 0);
        assert_eq!(
            s.registry
                .value("tailgate_spans_refused_total{reason=\"memory\"}"),
            4.0
        );
    }

    #[tokio::test]
    async fn malformed_bodies_are_refused_and_json_takes_the_protobuf_path() {
        let s = setup(1, 1 << 20);
        assert!(matches!(
            s.ingest.accept_unlogged(&[0xff, 0xff, 0xff], "grpc"),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            s.ingest.accept_json(b"{not json", "http_json", None).await,
            Err(Refusal::Malformed(_))
        ));
        let json = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0101010101010101010101010101010a","spanId":"0202020202020202","name":"op"}]}]}]}"#;
        let accepted = s
            .ingest
            .accept_json(json, "http_json", None)
            .await
            .expect("json taken");
        assert_eq!(accepted.rejected_spans, 0);
        assert_eq!(s.routed().len(), 1);
    }

    #[tokio::test]
    async fn after_stop_accepting_every_request_is_refused_as_shutting_down() {
        let s = setup(1, 1 << 20);
        s.ingest.stop_accepting().await;
        assert!(matches!(
            s.ingest.accept_unlogged(&request(vec![span(1, 1)]), "grpc"),
            Err(Refusal::ShuttingDown)
        ));
        assert_eq!(s.memory.used(), 0);
    }

    #[test]
    fn spans_for_a_stopped_shard_are_rejected_and_their_bytes_released() {
        let mut s = setup(2, 1 << 20);
        // Shard 1's worker has stopped: its receiver is gone.
        let stopped = s.shards.pop();
        drop(stopped);
        let body = request((1..=16u8).map(|t| span(t, 1)).collect());
        let to_stopped = (1..=16u8).filter(|t| shard_of(&[*t; 16], 2) == 1).count();
        assert!(to_stopped > 0, "the ids route some spans to shard 1");
        let accepted = s.ingest.accept_unlogged(&body, "grpc").expect("taken");
        assert_eq!(accepted.rejected_spans, to_stopped as u64);
        let routed = s.routed();
        assert_eq!(routed.len(), 16 - to_stopped);
        let held: usize = routed.iter().map(|(_, _, c)| c).sum();
        assert_eq!(
            s.memory.used(),
            held,
            "only the delivered spans stay reserved"
        );
        assert_eq!(
            s.registry
                .value("tailgate_spans_refused_total{reason=\"shutting_down\"}"),
            to_stopped as f64
        );
    }
}
