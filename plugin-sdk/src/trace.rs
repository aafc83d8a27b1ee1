//! The ergonomic view of a trace that a policy's `decide` receives.
//!
//! [`Trace`] is one type on every target; only its backend differs: on Wasm it
//! forwards to the host's `trace` interface (each call crosses into the host),
//! natively it reads an in-memory trace built with
//! `testing::TraceBuilder`. The summary and the trace id arrive with the
//! `decide` call itself, so reading them costs no host call. Other values the
//! host computes once per trace (the services, the columns) are fetched at most
//! once per `decide` and cached here, so calling `span.is_leaf()` in a loop
//! stays cheap.

use std::cell::OnceCell;
use std::time::Duration;

use crate::backend::Backend;
use crate::types::{AttrValue, DictColumn, SpanKind, StatusCode, Summary};

/// One trace, readable for the duration of a `decide` call.
///
/// On Wasm a `Trace` only ever exists behind the `&Trace` that `decide`
/// receives; it cannot be kept past the call.
pub struct Trace {
    /// `None` for a summary-only trace (see [`Policy::SUMMARY_ONLY`](crate::Policy::SUMMARY_ONLY)).
    backend: Option<Backend>,
    summary: OnceCell<Summary>,
    randomness: OnceCell<u64>,
    services: OnceCell<Vec<String>>,
    trace_id: OnceCell<[u8; 16]>,
    durations: OnceCell<Vec<u64>>,
    statuses: OnceCell<Vec<StatusCode>>,
    parents: OnceCell<Vec<Option<u32>>>,
    /// `has_children[i]` is true when some span names `i` as its parent.
    has_children: OnceCell<Vec<bool>>,
}

impl Trace {
    pub(crate) fn from_backend(backend: Backend) -> Self {
        Trace {
            backend: Some(backend),
            summary: OnceCell::new(),
            randomness: OnceCell::new(),
            services: OnceCell::new(),
            trace_id: OnceCell::new(),
            durations: OnceCell::new(),
            statuses: OnceCell::new(),
            parents: OnceCell::new(),
            has_children: OnceCell::new(),
        }
    }

    /// A trace whose summary and id are already known (the host passes both
    /// to `decide`), so reading them makes no host call.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn with_facts(backend: Backend, summary: Summary, trace_id: [u8; 16]) -> Self {
        let trace = Self::from_backend(backend);
        let _ = trace.summary.set(summary);
        let _ = trace.trace_id.set(trace_id);
        trace
    }

    /// A trace known only by its facts, as a summary-only policy sees it:
    /// the summary, the id and the OTel randomness answer, anything else
    /// panics (see [`Policy::SUMMARY_ONLY`](crate::Policy::SUMMARY_ONLY)).
    pub(crate) fn summary_only(summary: Summary, trace_id: [u8; 16], randomness: u64) -> Self {
        Trace {
            backend: None,
            summary: OnceCell::from(summary),
            randomness: OnceCell::from(randomness),
            services: OnceCell::new(),
            trace_id: OnceCell::from(trace_id),
            durations: OnceCell::new(),
            statuses: OnceCell::new(),
            parents: OnceCell::new(),
            has_children: OnceCell::new(),
        }
    }

    /// Whether this is a summary-only trace (facts without span data).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn is_facts_only(&self) -> bool {
        self.backend.is_none()
    }

    /// Makes this summary-only trace the next one of a batch: a batch reuses
    /// one `Trace`, so deciding a trace builds and drops nothing.
    #[inline]
    pub(crate) fn set_facts(&mut self, summary: Summary, trace_id: [u8; 16], randomness: u64) {
        debug_assert!(
            self.backend.is_none(),
            "only a summary-only trace is reused"
        );
        self.summary = OnceCell::from(summary);
        self.trace_id = OnceCell::from(trace_id);
        self.randomness = OnceCell::from(randomness);
    }

    fn backend(&self) -> &Backend {
        match &self.backend {
            Some(b) => b,
            None => panic!(
                "a SUMMARY_ONLY policy read span data; it may read only the summary, the \
                 trace id and the randomness (or set SUMMARY_ONLY = false)"
            ),
        }
    }

    // ---- summary ----

    /// The host's precomputed summary (given with the trace, so free).
    #[inline]
    pub fn summary(&self) -> &Summary {
        match self.summary.get() {
            Some(summary) => summary,
            None => self.fetch_summary(),
        }
    }

    #[cold]
    #[inline(never)]
    fn fetch_summary(&self) -> &Summary {
        self.summary.get_or_init(|| self.backend().summary())
    }

    /// Number of spans; valid span indexes are `0..span_count()`.
    #[inline]
    pub fn span_count(&self) -> u32 {
        self.summary().span_count
    }

    /// Number of spans with status `Error`.
    #[inline]
    pub fn error_count(&self) -> u32 {
        self.summary().error_count
    }

    /// True when at least one span has status `Error`.
    #[inline]
    pub fn has_errors(&self) -> bool {
        self.error_count() > 0
    }

    /// max(end) - min(start) over all spans.
    #[inline]
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.duration_ns())
    }

    /// max(end) - min(start) over all spans, in nanoseconds.
    #[inline]
    pub fn duration_ns(&self) -> u64 {
        self.summary().duration_ns
    }

    /// The root span, if it arrived.
    pub fn root(&self) -> Option<Span<'_>> {
        self.summary().root.map(|index| Span { trace: self, index })
    }

    /// Name of the root span; empty without a root.
    pub fn root_name(&self) -> String {
        self.root().map(|r| r.name()).unwrap_or_default()
    }

    /// `service.name` of the root span; empty without a root or service.
    pub fn root_service(&self) -> String {
        self.root().map(|r| r.service()).unwrap_or_default()
    }

    /// True when the root arrived and no span misses its parent.
    #[inline]
    pub fn is_complete(&self) -> bool {
        let s = self.summary();
        s.root.is_some() && s.orphan_count == 0
    }

    /// Distinct non-empty service names in order of first appearance (one
    /// host call, cached).
    pub fn services(&self) -> &[String] {
        self.services.get_or_init(|| self.backend().services())
    }

    /// The 16-byte trace id (given with the trace: no host call).
    #[inline]
    pub fn trace_id(&self) -> [u8; 16] {
        match self.trace_id.get() {
            Some(id) => *id,
            None => self.fetch_trace_id(),
        }
    }

    #[cold]
    #[inline(never)]
    fn fetch_trace_id(&self) -> [u8; 16] {
        *self.trace_id.get_or_init(|| {
            let (hi, lo) = self.backend().trace_id();
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&hi.to_be_bytes());
            id[8..].copy_from_slice(&lo.to_be_bytes());
            id
        })
    }

    /// The trace's OTel randomness R (W3C Trace Context Level 2), as
    /// consistent probability sampling uses it: the `rv` sub-key of the root
    /// span's `ot` tracestate entry when it holds 14 hex digits (the first
    /// span's when there is no root), otherwise the trace id's lower 56 bits.
    /// Summary-only policies receive it from the host.
    #[inline]
    pub fn randomness(&self) -> u64 {
        match self.randomness.get() {
            Some(r) => *r,
            None => self.find_randomness(),
        }
    }

    #[cold]
    #[inline(never)]
    fn find_randomness(&self) -> u64 {
        *self.randomness.get_or_init(|| {
            let probe = self.root().or_else(|| self.span(0));
            probe
                .and_then(|s| s.trace_state())
                .and_then(|ts| explicit_randomness(&ts))
                .unwrap_or_else(|| trace_id_randomness(&self.trace_id()))
        })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        crate::hex(&self.trace_id())
    }

    // ---- spans ----

    /// The span at `index`, or `None` if out of range.
    pub fn span(&self, index: u32) -> Option<Span<'_>> {
        (index < self.span_count()).then_some(Span { trace: self, index })
    }

    /// All spans, in index order.
    pub fn spans(&self) -> Spans<'_> {
        Spans {
            trace: self,
            next: 0,
            end: self.span_count(),
        }
    }

    // ---- columns (one host call each, cached) ----

    /// Duration in nanoseconds of every span, by index.
    pub fn durations(&self) -> &[u64] {
        self.durations.get_or_init(|| self.backend().durations())
    }

    /// Status of every span, by index.
    pub fn statuses(&self) -> &[StatusCode] {
        self.statuses.get_or_init(|| self.backend().statuses())
    }

    /// Parent index of every span, by index (`None` for roots and for spans
    /// whose parent is missing).
    pub fn parents(&self) -> &[Option<u32>] {
        self.parents.get_or_init(|| self.backend().parents())
    }

    /// Attribute `key` of every span, by index. One host call, instead of one
    /// per span with [`Span::attr`]. Not cached: each call asks again.
    pub fn attr_column(&self, key: &str) -> Vec<Option<AttrValue>> {
        self.backend().attr_column(key)
    }

    /// [`Trace::attr_column`] dictionary-encoded: each distinct value once,
    /// and a code per span. The same answer, at a fraction of the cost when
    /// values repeat across spans (tenant, user, model...): one host call, and
    /// each distinct string crosses into the guest once rather than once per
    /// span.
    pub fn attr_column_dict(&self, key: &str) -> DictColumn {
        self.backend().attr_column_dict(key)
    }

    /// Every string-valued span attribute at least `min_len` bytes long, as
    /// `(span index, key, value)`, by span index and then attribute order: one
    /// host call for the whole trace. For hygiene rules that cannot name their
    /// keys in advance; a high `min_len` keeps the answer small. Resource
    /// attributes are not included.
    pub fn string_attrs(&self, min_len: u32) -> Vec<(u32, String, String)> {
        self.backend().string_attrs(min_len)
    }

    fn has_children(&self) -> &[bool] {
        self.has_children.get_or_init(|| {
            let parents = self.parents();
            let mut has = vec![false; parents.len()];
            for p in parents.iter().flatten() {
                if let Some(slot) = has.get_mut(*p as usize) {
                    *slot = true;
                }
            }
            has
        })
    }

    // ---- aggregates (computed by the host) ----

    /// Sum of the numeric (int or double) values of span attribute `key`; 0
    /// when no span has one.
    pub fn sum(&self, key: &str) -> f64 {
        self.backend().sum(key)
    }

    /// Largest numeric value of span attribute `key`, if any span has one.
    pub fn max(&self, key: &str) -> Option<f64> {
        self.backend().max(key)
    }

    /// Number of spans whose attribute `key` is numeric.
    pub fn count_attr(&self, key: &str) -> u32 {
        self.backend().count(key)
    }

    /// Number of spans named exactly `name`.
    pub fn count_name(&self, name: &str) -> u32 {
        self.backend().count_name(name)
    }

    /// The trace as OTLP protobuf `TracesData` bytes. Expensive: an escape
    /// hatch for what the accessors cannot express.
    pub fn otlp_bytes(&self) -> Vec<u8> {
        self.backend().otlp_bytes()
    }
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("trace_id", &self.trace_id_hex())
            .field("summary", self.summary())
            .finish()
    }
}

/// The trace id's randomness: bytes 9..16 (the lower 56 bits), big-endian.
pub fn trace_id_randomness(trace_id: &[u8; 16]) -> u64 {
    let mut b = [0u8; 8];
    b[1..].copy_from_slice(&trace_id[9..16]);
    u64::from_be_bytes(b)
}

/// The explicit randomness `rv` in a W3C tracestate, if its `ot` entry has a
/// valid one (exactly 14 hex digits).
pub fn explicit_randomness(tracestate: &str) -> Option<u64> {
    let ot = tracestate
        .split(',')
        .find_map(|member| member.trim().strip_prefix("ot="))?;
    let rv = ot.split(';').find_map(|kv| kv.strip_prefix("rv:"))?;
    if rv.len() != 14 || !rv.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(rv, 16).ok()
}

/// A cheap, copyable view of one span of a [`Trace`].
///
/// Each accessor is one host call on Wasm, except those answered from a
/// column the trace already fetched (`duration`, `status`, `parent` once the
/// corresponding column was read; `is_leaf` always uses the parents column).
#[derive(Clone, Copy)]
pub struct Span<'t> {
    trace: &'t Trace,
    index: u32,
}

impl<'t> Span<'t> {
    /// This span's index in the trace (what patches and removals refer to).
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn name(&self) -> String {
        self.trace.backend().name(self.index)
    }

    pub fn kind(&self) -> SpanKind {
        self.trace.backend().kind(self.index)
    }

    pub fn status(&self) -> StatusCode {
        match self.trace.statuses.get() {
            Some(col) => col[self.index as usize],
            None => self.trace.backend().status(self.index),
        }
    }

    pub fn is_error(&self) -> bool {
        self.status() == StatusCode::Error
    }

    pub fn status_message(&self) -> String {
        self.trace.backend().status_message(self.index)
    }

    /// Start time, nanoseconds since the Unix epoch.
    pub fn start_ns(&self) -> u64 {
        self.trace.backend().start_ns(self.index)
    }

    /// End time, nanoseconds since the Unix epoch.
    pub fn end_ns(&self) -> u64 {
        self.trace.backend().end_ns(self.index)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.duration_ns())
    }

    pub fn duration_ns(&self) -> u64 {
        match self.trace.durations.get() {
            Some(col) => col[self.index as usize],
            None => self.trace.backend().duration_ns(self.index),
        }
    }

    /// Index of the parent span, if it is in this trace.
    pub fn parent_index(&self) -> Option<u32> {
        match self.trace.parents.get() {
            Some(col) => col[self.index as usize],
            None => self.trace.backend().parent(self.index),
        }
    }

    /// The parent span, if it is in this trace.
    pub fn parent(&self) -> Option<Span<'t>> {
        self.parent_index().map(|index| Span {
            trace: self.trace,
            index,
        })
    }

    /// True when the span names a parent that is not in this trace.
    pub fn missing_parent(&self) -> bool {
        self.trace.backend().missing_parent(self.index)
    }

    /// True when no span of this trace has this span as its parent. Answered
    /// from the parents column: one host call for the whole trace.
    pub fn is_leaf(&self) -> bool {
        !self.trace.has_children()[self.index as usize]
    }

    /// Spans whose parent is this span (scans the parents column).
    pub fn children(&self) -> impl Iterator<Item = Span<'t>> + 't {
        let trace = self.trace;
        let me = self.index;
        trace
            .parents()
            .iter()
            .enumerate()
            .filter(move |(_, p)| **p == Some(me))
            .map(move |(i, _)| Span {
                trace,
                index: i as u32,
            })
    }

    /// The 8-byte span id.
    pub fn span_id(&self) -> [u8; 8] {
        self.trace.backend().span_id(self.index).to_be_bytes()
    }

    /// The span's W3C tracestate, if it has one.
    pub fn trace_state(&self) -> Option<String> {
        self.trace.backend().trace_state(self.index)
    }

    /// `service.name` of the span's resource; empty if it has none.
    pub fn service(&self) -> String {
        self.trace.backend().service(self.index)
    }

    /// Span attribute `key`.
    pub fn attr(&self, key: &str) -> Option<AttrValue> {
        self.trace.backend().attr(self.index, key)
    }

    /// Attribute `key` of the span's resource.
    pub fn resource_attr(&self, key: &str) -> Option<AttrValue> {
        self.trace.backend().resource_attr(self.index, key)
    }
}

impl std::fmt::Debug for Span<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Span")
            .field("index", &self.index)
            .field("name", &self.name())
            .finish()
    }
}

/// Iterator over a trace's spans, from [`Trace::spans`].
pub struct Spans<'t> {
    trace: &'t Trace,
    next: u32,
    end: u32,
}

impl<'t> Iterator for Spans<'t> {
    type Item = Span<'t>;

    fn next(&mut self) -> Option<Span<'t>> {
        if self.next >= self.end {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(Span {
            trace: self.trace,
            index,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.end - self.next) as usize;
        (n, Some(n))
    }
}

impl DoubleEndedIterator for Spans<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        self.end -= 1;
        Some(Span {
            trace: self.trace,
            index: self.end,
        })
    }
}

impl ExactSizeIterator for Spans<'_> {}
