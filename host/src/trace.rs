//! The trace model: the span and trace types every stage shares, from the receivers that
//! index spans as they arrive to the exporter that writes them out.
//!
//! Owns plain data and the few facts derived from it (a span's cost, whether it is a root, a
//! trigger's name). Must never import anything else of the host: every stage depends on this
//! module, so it depends on none of them.

use std::sync::Arc;

/// A W3C / OTLP trace id.
pub(crate) type TraceId = [u8; 16];

/// Nanoseconds on the host's monotonic clock.
pub(crate) type Nanos = u64;

/// Fields of a `ResourceSpans` other than its scope spans, shared by every span of the batch.
#[derive(Debug)]
pub struct ResourceHeader {
    /// Encoded fields (resource, schema url) exactly as received.
    pub fields: Box<[u8]>,
    /// The `Resource` message alone, for attribute lookups.
    pub resource: Box<[u8]>,
    /// `service.name`, or empty when the resource has none.
    pub service: Arc<str>,
}

/// Fields of a `ScopeSpans` other than its spans, plus the resource it belongs to.
#[derive(Debug)]
pub struct ScopeHeader {
    pub resource: Arc<ResourceHeader>,
    pub fields: Box<[u8]>,
}

/// One buffered span: its protobuf bytes as received plus the index fields the host needs
/// without decoding. 64 bytes of index beside the bytes themselves.
#[derive(Debug, Clone)]
pub struct BufferedSpan {
    pub bytes: Box<[u8]>,
    pub scope: Arc<ScopeHeader>,
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub status_code: u8,
    pub kind: u8,
    /// Whether the span has a `trace_state`, so finding a trace's OTel randomness reads the
    /// span's bytes only when it may hold an `rv` (it fits in the struct's padding).
    pub has_trace_state: bool,
}

impl BufferedSpan {
    pub(crate) fn is_root(&self) -> bool {
        self.parent_span_id == [0; 8]
    }

    /// Bytes this span holds while buffered: its wire bytes plus its index.
    pub(crate) fn cost(&self) -> usize {
        self.bytes.len() + std::mem::size_of::<Self>()
    }
}

/// Why a trace was decided when it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The root span arrived and `root_grace` passed with no newer span.
    RootGrace,
    /// No span arrived for `trace_idle`.
    TraceIdle,
    /// `decision_wait` passed since the first span.
    DecisionWait,
    /// The trace reached `max_spans_per_trace`.
    SpanCap,
    /// The trace reached `max_bytes_per_trace`.
    ByteCap,
    /// The buffer ran short of memory and this was among the oldest traces.
    Memory,
    /// The process is shutting down.
    Shutdown,
    /// A span that arrived after its trace was decided.
    Late,
    /// The storage log passed 90 % of `storage.max_bytes` and this was among the oldest traces.
    Disk,
    /// A dropped trace re-decided keep within `revision_window`, when a late span that could
    /// change its verdict (an error, or its root) arrived.
    Rescue,
}

impl Trigger {
    /// Every trigger, in the order of their index (the decision log stores the index, so new
    /// triggers go at the end).
    pub(crate) const ALL: [Trigger; 10] = [
        Trigger::RootGrace,
        Trigger::TraceIdle,
        Trigger::DecisionWait,
        Trigger::SpanCap,
        Trigger::ByteCap,
        Trigger::Memory,
        Trigger::Shutdown,
        Trigger::Late,
        Trigger::Disk,
        Trigger::Rescue,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::RootGrace => "root_grace",
            Trigger::TraceIdle => "trace_idle",
            Trigger::DecisionWait => "decision_wait",
            Trigger::SpanCap => "span_cap",
            Trigger::ByteCap => "byte_cap",
            Trigger::Memory => "memory",
            Trigger::Shutdown => "shutdown",
            Trigger::Late => "late",
            Trigger::Disk => "disk",
            Trigger::Rescue => "rescue",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// What kept spans carry about their decision, encoded once per trace and appended to each
/// span's bytes at export. Built by the decision step (`decide::stamp`).
#[derive(Debug)]
pub struct Stamp {
    pub(crate) policy: Arc<str>,
    pub(crate) reason: Arc<str>,
    /// `sampling.trigger`, `sampling.policy`, `sampling.reason` as encoded Span attributes.
    pub(crate) encoded: Box<[u8]>,
}

/// A span of service `svc` with the given ids and wire bytes, for tests of the stages.
#[cfg(test)]
pub(crate) fn test_span(span_id: u8, parent: u8, bytes: Vec<u8>) -> BufferedSpan {
    BufferedSpan {
        bytes: bytes.into_boxed_slice(),
        scope: Arc::new(ScopeHeader {
            resource: Arc::new(ResourceHeader {
                fields: Box::new([]),
                resource: Box::new([]),
                service: Arc::from("svc"),
            }),
            fields: Box::new([]),
        }),
        span_id: [span_id; 8],
        parent_span_id: [parent; 8],
        start_unix_nano: 0,
        end_unix_nano: 0,
        status_code: 0,
        kind: 0,
        has_trace_state: false,
    }
}
