//! From a request body to spans in the buffer's shards: the part both transports share.
//!
//! Parses at the wire level (no prost decode on the protobuf path), counts every span, rejects
//! spans with bad ids into `partial_success`, reserves memory for the rest or refuses the whole
//! request with a retryable error, and routes each span to the shard that owns its trace.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::Sender;
use prost::Message;

use super::metrics::{ReceiverMetrics, RefusedReason};
use crate::buffer::{MemoryBudget, shard_of};
use crate::otlp::{json, wire};
use crate::pipeline::{ShardMsg, ShardSpan};
use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader};

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
    /// The buffer is full; retryable.
    Busy,
    /// The host is shutting down; retryable (elsewhere or later).
    ShuttingDown,
}

/// Growth slack of a trace's span vector, charged per span so the budget tracks real usage.
const SPAN_SLACK: usize = 16;

pub struct Ingest {
    shards: Vec<Sender<ShardMsg>>,
    memory: Arc<MemoryBudget>,
    metrics: Arc<ReceiverMetrics>,
    accepting: AtomicBool,
}

impl Ingest {
    pub fn new(
        shards: Vec<Sender<ShardMsg>>,
        memory: Arc<MemoryBudget>,
        metrics: Arc<ReceiverMetrics>,
    ) -> Self {
        Self {
            shards,
            memory,
            metrics,
            accepting: AtomicBool::new(true),
        }
    }

    /// From now on every request is refused as retryable: the host is draining.
    pub(crate) fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// An OTLP/JSON body: decoded leniently, then taken through the protobuf path so both
    /// encodings share every rule after decoding.
    pub(crate) fn accept_json(
        &self,
        body: &[u8],
        transport: &'static str,
    ) -> Result<Accepted, Refusal> {
        let request = json::decode_traces(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
        self.accept_protobuf(&request.encode_to_vec(), transport)
    }

    pub fn accept_protobuf(
        &self,
        body: &[u8],
        transport: &'static str,
    ) -> Result<Accepted, Refusal> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(Refusal::ShuttingDown);
        }
        let parsed = wire::parse_traces(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let mut spans_per_shard: Vec<Vec<ShardSpan>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        let mut total_cost = 0usize;
        let mut accepted = 0u64;
        for resource in parsed.resources {
            let service = match wire::resource_attribute(resource.resource, "service.name") {
                Some(wire::AnyValueRef::Str(s)) => Arc::from(s),
                _ => Arc::from(""),
            };
            let resource_header = Arc::new(ResourceHeader {
                resource: Box::from(resource.resource),
                fields: resource.fields.into_boxed_slice(),
                service,
            });
            for scope in resource.scopes {
                let header = Arc::new(ScopeHeader {
                    resource: resource_header.clone(),
                    fields: scope.fields.into_boxed_slice(),
                });
                // Headers are shared by their spans; charge them to the first one.
                let mut header_cost = header.fields.len()
                    + header.resource.fields.len()
                    + header.resource.resource.len()
                    + 64;
                for s in scope.spans {
                    let span = BufferedSpan {
                        bytes: Box::from(s.bytes),
                        scope: header.clone(),
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        status_code: u8::try_from(s.status_code).unwrap_or(0),
                        kind: u8::try_from(s.kind).unwrap_or(0),
                        has_trace_state: s.has_trace_state,
                    };
                    let cost = span.cost() + SPAN_SLACK + std::mem::take(&mut header_cost);
                    total_cost += cost;
                    accepted += 1;
                    spans_per_shard[shard_of(&s.trace_id, self.shards.len())].push(ShardSpan {
                        trace_id: s.trace_id,
                        span,
                        cost,
                    });
                }
            }
        }
        self.metrics
            .received(transport, accepted + parsed.rejected_spans);
        self.metrics
            .refused(RefusedReason::InvalidId, parsed.rejected_spans);
        if accepted > 0 && !self.memory.try_reserve(total_cost) {
            self.metrics.refused(RefusedReason::Memory, accepted);
            return Err(Refusal::Busy);
        }
        let mut message = parsed.rejection.unwrap_or_default();
        let mut rejected = parsed.rejected_spans;
        for (shard, spans) in spans_per_shard.into_iter().enumerate() {
            if spans.is_empty() {
                continue;
            }
            let n = spans.len() as u64;
            let cost: usize = spans.iter().map(|s| s.cost).sum();
            if self.shards[shard].send(ShardMsg::Spans(spans)).is_err() {
                // The worker has stopped, which only happens at shutdown, after the listeners
                // closed. Other shards may have taken their part, so report these spans as
                // rejected rather than failing (and duplicating) the whole request.
                self.memory.release(cost);
                self.metrics.refused(RefusedReason::ShuttingDown, n);
                rejected += n;
                message = "tailgate is shutting down".into();
            }
        }
        Ok(Accepted {
            rejected_spans: rejected,
            message,
        })
    }
}
