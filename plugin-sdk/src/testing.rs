//! Native-only test support: build traces in memory, drive a policy the way
//! the host does, and inspect what it logged and counted.
//!
//! ```
//! use tailgate_plugin_sdk::testing::TraceBuilder;
//!
//! let trace = TraceBuilder::new()
//!     .span("agent.run").service("api").duration_ms(120)
//!     .span("llm.call").child_of(0).duration_ms(80).error()
//!     .attr("gen_ai.usage.input_tokens", 1200)
//!     .build();
//! assert_eq!(trace.error_count(), 1);
//! assert_eq!(trace.sum("gen_ai.usage.input_tokens"), 1200.0);
//! assert!(trace.span(1).unwrap().is_leaf());
//! ```
//!
//! The host imports ([`crate::host`]) are per-thread here, and `cargo test`
//! runs each test on its own thread, so tests do not see each other's
//! counters or seeds.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::backend::native::{MemResource, MemSpan, MemTrace, SERVICE_NAME};
use crate::types::{AttrValue, Level, PatchTarget, SpanKind, StatusCode};
use crate::{Policy, Trace, Verdict};

/// The trace id builders use unless told otherwise (the W3C example id).
pub const DEFAULT_TRACE_ID: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];

/// Start time of offset 0: 2023-11-14T22:13:20Z, in ns since the epoch.
pub const DEFAULT_BASE_NS: u64 = 1_700_000_000_000_000_000;

#[derive(Clone, Debug)]
enum Parent {
    Root,
    Index(u32),
    Missing,
}

#[derive(Clone, Debug)]
struct SpanSpec {
    name: String,
    kind: SpanKind,
    status: StatusCode,
    status_message: String,
    start_ns: Option<u64>,
    offset_ns: u64,
    duration_ns: u64,
    parent: Parent,
    span_id: Option<[u8; 8]>,
    trace_state: String,
    service: Option<String>,
    attrs: Vec<(String, AttrValue)>,
    resource_attrs: Vec<(String, AttrValue)>,
}

/// Builds an in-memory [`Trace`] for native tests.
///
/// `span(name)` starts a new span; every other span-level method applies to
/// the most recent one. Spans get indexes in the order they are added. By
/// default a span starts at [`DEFAULT_BASE_NS`], lasts 0 ns, is a root, has
/// kind `Unspecified`, status `Unset` and span id `i + 1` (big-endian).
/// Spans with the same `service` share one resource, whose attributes are the
/// union of the `resource_attr`s given on any of them.
#[derive(Clone, Debug)]
pub struct TraceBuilder {
    trace_id: [u8; 16],
    base_ns: u64,
    spans: Vec<SpanSpec>,
}

impl Default for TraceBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceBuilder {
    pub fn new() -> Self {
        TraceBuilder {
            trace_id: DEFAULT_TRACE_ID,
            base_ns: DEFAULT_BASE_NS,
            spans: Vec::new(),
        }
    }

    // ---- trace level ----

    pub fn trace_id(mut self, id: [u8; 16]) -> Self {
        self.trace_id = id;
        self
    }

    /// Trace id from 32 hex digits; panics on anything else.
    pub fn trace_id_hex(self, hex: &str) -> Self {
        let bytes = crate::unhex(hex)
            .filter(|b| b.len() == 16)
            .unwrap_or_else(|| panic!("trace id must be 32 hex digits, got {hex:?}"));
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes);
        self.trace_id(id)
    }

    /// The time that `offset_*` offsets count from.
    pub fn base_ns(mut self, ns: u64) -> Self {
        self.base_ns = ns;
        self
    }

    // ---- spans ----

    /// Start a new span named `name`.
    pub fn span(mut self, name: impl Into<String>) -> Self {
        self.spans.push(SpanSpec {
            name: name.into(),
            kind: SpanKind::Unspecified,
            status: StatusCode::Unset,
            status_message: String::new(),
            start_ns: None,
            offset_ns: 0,
            duration_ns: 0,
            parent: Parent::Root,
            span_id: None,
            trace_state: String::new(),
            service: None,
            attrs: Vec::new(),
            resource_attrs: Vec::new(),
        });
        self
    }

    fn cur(&mut self) -> &mut SpanSpec {
        self.spans
            .last_mut()
            .expect("TraceBuilder: call .span(name) before setting span fields")
    }

    pub fn kind(mut self, kind: SpanKind) -> Self {
        self.cur().kind = kind;
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.cur().status = status;
        self
    }

    /// Status `Error`.
    pub fn error(self) -> Self {
        self.status(StatusCode::Error)
    }

    /// Status `Ok`.
    pub fn ok(self) -> Self {
        self.status(StatusCode::Ok)
    }

    pub fn status_message(mut self, msg: impl Into<String>) -> Self {
        self.cur().status_message = msg.into();
        self
    }

    /// Absolute start time (overrides any offset).
    pub fn start_ns(mut self, ns: u64) -> Self {
        self.cur().start_ns = Some(ns);
        self
    }

    /// Start `ns` after the builder's base time.
    pub fn offset_ns(mut self, ns: u64) -> Self {
        self.cur().offset_ns = ns;
        self
    }

    /// Start `ms` milliseconds after the builder's base time.
    pub fn offset_ms(self, ms: u64) -> Self {
        self.offset_ns(ms * 1_000_000)
    }

    pub fn duration_ns(mut self, ns: u64) -> Self {
        self.cur().duration_ns = ns;
        self
    }

    pub fn duration_us(self, us: u64) -> Self {
        self.duration_ns(us * 1_000)
    }

    pub fn duration_ms(self, ms: u64) -> Self {
        self.duration_ns(ms * 1_000_000)
    }

    /// Make this span a child of the span with index `parent`.
    pub fn child_of(mut self, parent: u32) -> Self {
        self.cur().parent = Parent::Index(parent);
        self
    }

    /// Give this span a parent span id that is not in the trace.
    pub fn missing_parent(mut self) -> Self {
        self.cur().parent = Parent::Missing;
        self
    }

    pub fn span_id(mut self, id: [u8; 8]) -> Self {
        self.cur().span_id = Some(id);
        self
    }

    pub fn trace_state(mut self, ts: impl Into<String>) -> Self {
        self.cur().trace_state = ts.into();
        self
    }

    /// `service.name` of this span's resource.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.cur().service = Some(name.into());
        self
    }

    /// A span attribute.
    pub fn attr(mut self, key: impl Into<String>, value: impl Into<AttrValue>) -> Self {
        self.cur().attrs.push((key.into(), value.into()));
        self
    }

    /// An attribute of this span's resource (shared with every span of the
    /// same service).
    pub fn resource_attr(mut self, key: impl Into<String>, value: impl Into<AttrValue>) -> Self {
        self.cur().resource_attrs.push((key.into(), value.into()));
        self
    }

    /// Build the trace. Panics if a `child_of` index is out of range or names
    /// the span itself.
    pub fn build(self) -> Trace {
        let n = self.spans.len();
        // One resource per distinct service (None = no service.name), in order
        // of first use.
        let mut keys: Vec<Option<String>> = Vec::new();
        let mut resources: Vec<MemResource> = Vec::new();
        let mut spans = Vec::with_capacity(n);
        for (i, s) in self.spans.into_iter().enumerate() {
            let r = match keys.iter().position(|k| *k == s.service) {
                Some(r) => r,
                None => {
                    let mut res = MemResource::default();
                    if let Some(name) = &s.service {
                        res.attrs
                            .push((SERVICE_NAME.to_owned(), AttrValue::Str(name.clone())));
                    }
                    keys.push(s.service.clone());
                    resources.push(res);
                    resources.len() - 1
                }
            };
            resources[r].attrs.extend(s.resource_attrs);
            let (parent, parent_span_id) = match s.parent {
                Parent::Root => (None, None),
                Parent::Index(p) => {
                    assert!(
                        (p as usize) < n && p as usize != i,
                        "TraceBuilder: span {i} ({:?}) child_of({p}) but the trace has {n} spans",
                        s.name
                    );
                    (Some(p), Some([0u8; 8])) // real id filled in below
                }
                // An id no builder span uses (those count up from 1).
                Parent::Missing => (None, Some((u64::MAX - i as u64).to_be_bytes())),
            };
            let start_ns = s.start_ns.unwrap_or(self.base_ns + s.offset_ns);
            spans.push(MemSpan {
                name: s.name,
                kind: s.kind,
                status: s.status,
                status_message: s.status_message,
                start_ns,
                end_ns: start_ns.saturating_add(s.duration_ns),
                span_id: s.span_id.unwrap_or((i as u64 + 1).to_be_bytes()),
                parent_span_id,
                parent,
                trace_state: s.trace_state,
                resource: r,
                attrs: s.attrs,
            });
        }
        for i in 0..n {
            if let Some(p) = spans[i].parent {
                spans[i].parent_span_id = Some(spans[p as usize].span_id);
            }
        }
        Trace::from_backend(Backend {
            trace: MemTrace::new(self.trace_id, spans, resources),
        })
    }
}

// ---- driving a policy like the host does ----

/// Parse `config` (JSON text, as the host passes it) and `init` the policy,
/// through the same code path the Wasm export uses.
pub fn init<P: Policy>(config: &str) -> Result<P, String> {
    crate::init_from_json::<P>(config)
}

/// Run `decide` the way the host does: first reseed the random stream from
/// the trace id and the current seed (see [`set_seed`]).
///
/// A [`Policy::SUMMARY_ONLY`] policy sees what the host gives it: a trace of
/// the summary, id and randomness alone, so reading anything else panics here
/// as it traps in Wasm, and so do edits in its verdict.
pub fn decide<P: Policy>(policy: &mut P, trace: &Trace) -> Verdict {
    state::begin_trace(&trace.trace_id());
    if P::SUMMARY_ONLY {
        let facts = facts_trace(*trace.summary(), trace.trace_id(), trace.randomness());
        // As `decide-summaries` runs it: random numbers come from the SDK's own
        // copy of the trace's stream, not from the host.
        let verdict = crate::host::with_trace_stream(state::seed(), trace.trace_id(), || {
            policy.decide(&facts)
        });
        assert!(
            verdict.patches.is_empty() && verdict.remove_spans.is_empty(),
            "a SUMMARY_ONLY policy returned edits; it cannot edit traces"
        );
        return verdict;
    }
    policy.decide(trace)
}

/// The trace a summary-only policy sees: its summary, id and randomness
/// alone, as `decide-summaries` passes them (reading anything else panics).
pub fn facts_trace(summary: crate::Summary, trace_id: [u8; 16], randomness: u64) -> Trace {
    Trace::summary_only(summary, trace_id, randomness)
}

/// Makes a [`facts_trace`] the next trace of a batch, as `decide-summaries`
/// reuses one trace for a whole batch (so deciding one builds nothing).
///
/// # Panics
/// If `trace` is not a [`facts_trace`].
pub fn set_facts(trace: &mut Trace, summary: crate::Summary, trace_id: [u8; 16], randomness: u64) {
    assert!(trace.is_facts_only(), "set_facts takes a facts_trace");
    trace.set_facts(summary, trace_id, randomness);
}

/// Check `verdict` against `trace` with the contract's validation rules (as
/// the host applies them, minus its configurable size caps): probability in
/// (0, 1], patch targets and removals in range, keys non-empty, JSON patch
/// values are arrays or objects, removals are leaves.
pub fn check_verdict(trace: &Trace, verdict: &Verdict) -> Result<(), String> {
    let n = trace.span_count();
    if let Some(p) = verdict.probability
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(format!("probability {p} is not in (0, 1]"));
    }
    for (k, patch) in verdict.patches.iter().enumerate() {
        let (PatchTarget::Span(i) | PatchTarget::ResourceOf(i)) = patch.target;
        if i >= n {
            return Err(format!(
                "patch {k}: span index {i} out of range ({n} spans)"
            ));
        }
        if patch.key.is_empty() {
            return Err(format!("patch {k}: empty key"));
        }
        if let AttrValue::Json(j) = &patch.value {
            match serde_json::from_str::<serde_json::Value>(j) {
                Ok(serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {}
                _ => return Err(format!("patch {k}: json value is not an array or object")),
            }
        }
    }
    for &i in &verdict.remove_spans {
        match trace.span(i) {
            None => return Err(format!("span removal: index {i} out of range ({n} spans)")),
            Some(s) if !s.is_leaf() => {
                return Err(format!("span removal: span {i} is not a leaf"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

// ---- the native host stand-in ----

/// Set the policy seed for this thread and restart the random stream.
pub fn set_seed(seed: u64) {
    state::with(|s| {
        s.seed = seed;
        s.rng = crate::TraceStream::untraced(seed);
    })
}

/// Pin `now_ns()` for this thread (`None`: the system clock).
pub fn set_now_ns(ns: Option<u64>) {
    state::with(|s| s.now = ns)
}

/// A counter series: name plus labels sorted by key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// Every counter this thread's policy added to, with its total.
pub fn counters() -> BTreeMap<CounterKey, f64> {
    state::with(|s| s.counters.clone())
}

/// The total of one series (labels in any order); 0 if never added to.
pub fn counter(name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = state::key(name, labels);
    state::with(|s| s.counters.get(&key).copied().unwrap_or(0.0))
}

/// Everything logged on this thread, oldest first.
pub fn logs() -> Vec<(Level, String)> {
    state::with(|s| s.logs.clone())
}

/// Forget counters, logs, the seed and a pinned clock on this thread.
pub fn reset() {
    state::with(|s| *s = state::HostState::default())
}

pub(crate) mod state {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::CounterKey;
    use crate::TraceStream;
    use crate::types::Level;

    pub(crate) struct HostState {
        pub seed: u64,
        pub rng: TraceStream,
        pub now: Option<u64>,
        pub counters: BTreeMap<CounterKey, f64>,
        pub logs: Vec<(Level, String)>,
    }

    impl Default for HostState {
        fn default() -> Self {
            HostState {
                seed: 0,
                rng: TraceStream::untraced(0),
                now: None,
                counters: BTreeMap::new(),
                logs: Vec::new(),
            }
        }
    }

    thread_local! {
        static STATE: RefCell<HostState> = RefCell::new(HostState::default());
    }

    pub(crate) fn with<R>(f: impl FnOnce(&mut HostState) -> R) -> R {
        STATE.with(|s| f(&mut s.borrow_mut()))
    }

    /// The policy seed set by [`set_seed`](super::set_seed).
    pub(crate) fn seed() -> u64 {
        with(|s| s.seed)
    }

    /// The host's own stream (see [`TraceStream`]), so a policy sees the same
    /// numbers natively as in Wasm.
    pub(crate) fn begin_trace(trace_id: &[u8; 16]) {
        with(|s| s.rng = TraceStream::new(s.seed, trace_id))
    }

    pub(crate) fn random() -> u64 {
        with(|s| s.rng.next_u64())
    }

    pub(crate) fn now_ns() -> u64 {
        with(|s| s.now).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        })
    }

    pub(crate) fn log(level: Level, message: &str) {
        with(|s| s.logs.push((level, message.to_owned())))
    }

    pub(crate) fn key(name: &str, labels: &[(&str, &str)]) -> CounterKey {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        CounterKey {
            name: name.to_owned(),
            labels,
        }
    }

    pub(crate) fn counter_add(name: &str, labels: &[(&str, &str)], value: f64) {
        // The host silently drops invalid calls; natively we fail loudly so
        // the policy's tests catch the bug.
        assert!(
            crate::host::is_valid_metric_name(name),
            "counter_add: invalid counter name {name:?}"
        );
        for (k, _) in labels {
            assert!(
                crate::host::is_valid_metric_name(k),
                "counter_add: invalid label name {k:?}"
            );
        }
        assert!(
            value.is_finite() && value >= 0.0,
            "counter_add: value must be finite and >= 0, got {value}"
        );
        let key = key(name, labels);
        with(|s| *s.counters.entry(key).or_insert(0.0) += value)
    }
}
