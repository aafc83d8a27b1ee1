//! What a policy's store holds, and the host side of the contract: the `trace` interface
//! (the trace being decided, and the edits a verdict asks for) and the `host` interface
//! (reasons, log, random, clock, counters).
//!
//! This is the sandbox boundary. Every index and string that comes from a guest is checked
//! here before it touches host data: an out-of-range span index traps the guest (as a Rust
//! slice would), never the host.

use std::sync::Arc;

use wasmtime::{StoreLimits, bail};

use super::bindings::tailgate::policy::host::{self, Level};
use super::bindings::tailgate::policy::trace;
use super::bindings::tailgate::policy::types::{
    self, AttrValue, DictColumn, PatchTarget, SpanKind, StatusCode, Summary,
};
use super::counters::PolicyCounters;
use super::edits::{Patch, PendingEdits};
use crate::buffer::{BufferedSpan, ScopeHeader, TraceId};
use crate::otlp::wire::{self, AnyValueRef};

/// Facts about a trace computed once and shared by every policy of the chain. A chain keeps
/// one and rebuilds it in place for each trace, so its buffers are allocated once per worker.
#[derive(Debug, Default)]
pub struct TraceIndex {
    pub parents: Vec<Option<u32>>,
    pub missing_parent: Vec<bool>,
    pub is_leaf: Vec<bool>,
    pub span_count: u32,
    pub error_count: u32,
    pub duration_ns: u64,
    pub root: Option<u32>,
    /// Spans naming a parent that is not in the trace.
    pub orphan_count: u32,
    pub services: Vec<Arc<str>>,
    /// Open-addressing table of (span id, span index) by span id: the parent lookup. Its
    /// first `1 << bits` slots serve a trace; slots of older generations are free. Ids are
    /// random 64-bit numbers, so one multiply spreads them; no hasher runs. The id is held in
    /// the slot, so a probe reads no span.
    slots: Vec<Slot>,
    generation: u32,
    /// Every span attribute, found by one pass over the spans on the first attribute lookup
    /// of the trace and shared by every policy after it: a lookup compares key lengths and
    /// bytes in this table instead of parsing each span's protobuf again.
    attrs: AttrTable,
}

/// One span attribute, as byte ranges of its span's bytes.
#[derive(Debug, Clone, Copy)]
struct AttrEntry {
    key_at: u32,
    key_len: u32,
    value_at: u32,
    value_len: u32,
}

#[derive(Debug, Default)]
struct AttrTable {
    built: bool,
    entries: Vec<AttrEntry>,
    /// `entries[starts[i]..starts[i + 1]]` are span `i`'s attributes, in wire order.
    starts: Vec<u32>,
}

impl AttrTable {
    fn build(&mut self, spans: &[BufferedSpan]) {
        self.entries.clear();
        self.starts.clear();
        for s in spans {
            let start = self.entries.len();
            self.starts.push(start as u32);
            let base = s.bytes.as_ptr() as usize;
            let entries = &mut self.entries;
            let clean = wire::for_each_span_attribute(&s.bytes, |key, value| {
                entries.push(AttrEntry {
                    key_at: (key.as_ptr() as usize - base) as u32,
                    key_len: key.len() as u32,
                    value_at: (value.as_ptr() as usize - base) as u32,
                    value_len: value.len() as u32,
                });
            });
            if !clean {
                // As a lookup in the span itself would: a malformed span has no attributes.
                self.entries.truncate(start);
            }
        }
        self.starts.push(self.entries.len() as u32);
        self.built = true;
    }

    /// The last value of `key` on span `i` (the last occurrence wins, as in protobuf).
    fn get<'a>(&self, spans: &'a [BufferedSpan], i: usize, key: &str) -> Option<AnyValueRef<'a>> {
        self.get_encoded(spans, i, key).and_then(wire::any_value)
    }

    /// The encoded `AnyValue` of `key`'s last occurrence on span `i`.
    fn get_encoded<'a>(&self, spans: &'a [BufferedSpan], i: usize, key: &str) -> Option<&'a [u8]> {
        let bytes: &'a [u8] = &spans[i].bytes;
        let range = self.starts[i] as usize..self.starts[i + 1] as usize;
        self.entries[range]
            .iter()
            .rev()
            .find(|e| {
                e.key_len as usize == key.len()
                    && &bytes[e.key_at as usize..(e.key_at + e.key_len) as usize] == key.as_bytes()
            })
            .map(|e| &bytes[e.value_at as usize..(e.value_at + e.value_len) as usize])
    }

    /// `key` over every span as distinct values and one code per span (`NO_VALUE` where
    /// the span has none). Values are told apart by their encoded bytes.
    fn dict_column(&self, spans: &[BufferedSpan], key: &str) -> DictColumn {
        let mut values = Vec::new();
        let mut codes_of: foldhash::HashMap<&[u8], u32> = Default::default();
        let codes = (0..spans.len())
            .map(|i| {
                let Some(encoded) = self.get_encoded(spans, i, key) else {
                    return NO_VALUE;
                };
                if let Some(code) = codes_of.get(encoded) {
                    return *code;
                }
                let Some(value) = wire::any_value(encoded).and_then(to_attr_value) else {
                    return NO_VALUE;
                };
                let code = values.len() as u32;
                values.push(value);
                codes_of.insert(encoded, code);
                code
            })
            .collect();
        DictColumn { values, codes }
    }

    /// Every attribute of span `i` as (key, value), in wire order.
    fn of_span<'a>(
        &'a self,
        spans: &'a [BufferedSpan],
        i: usize,
    ) -> impl Iterator<Item = (&'a [u8], AnyValueRef<'a>)> + 'a {
        let bytes: &'a [u8] = &spans[i].bytes;
        let range = self.starts[i] as usize..self.starts[i + 1] as usize;
        self.entries[range].iter().filter_map(move |e| {
            let key = &bytes[e.key_at as usize..(e.key_at + e.key_len) as usize];
            let value = &bytes[e.value_at as usize..(e.value_at + e.value_len) as usize];
            Some((key, wire::any_value(value)?))
        })
    }
}

/// A slot of the span-id table. It is in use only when its `generation` is the index's
/// current one, so the table is never cleared between traces.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    index: u32,
    generation: u32,
}

/// A `dict-column` code for a span without the attribute.
const NO_VALUE: u32 = u32::MAX;

const EMPTY: Slot = Slot {
    id: 0,
    index: 0,
    generation: 0,
};

/// The per-process salt that keeps crafted ids from colliding on purpose.
fn salt() -> u64 {
    static SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SALT.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x7461_696c_6761_7465);
        h.finish()
    })
}

/// Probes for `id` in a table of `1 << bits` slots (those of `generation` in use) from its
/// home slot (an odd fixed multiplier over the salted id), and returns the slot holding it
/// or the free slot where it belongs.
fn probe(slots: &[Slot], id: u64, salt: u64, bits: u32, generation: u32) -> usize {
    let mask = slots.len() - 1;
    let mut at = ((id ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize;
    loop {
        let slot = slots[at];
        if slot.generation != generation || slot.id == id {
            return at;
        }
        at = (at + 1) & mask;
    }
}

impl TraceIndex {
    pub fn new(spans: &[BufferedSpan]) -> Self {
        let mut index = Self::default();
        index.rebuild(spans);
        index
    }

    /// Recomputes every fact for `spans`, reusing this index's buffers.
    pub fn rebuild(&mut self, spans: &[BufferedSpan]) {
        // At most half full: short probes. The table is reused, so it is allocated once per
        // worker and grown only for a larger trace than any before.
        let bits = (spans.len().max(1) * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(4);
        let salt = salt();
        let size = 1usize << bits;
        if self.slots.len() < size {
            self.slots.resize(size, EMPTY);
        }
        // A new generation frees every slot without writing them.
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.slots.fill(EMPTY);
            self.generation = 1;
        }
        let generation = self.generation;
        let slots = &mut self.slots[..size];
        for (i, s) in spans.iter().enumerate() {
            let id = u64::from_ne_bytes(s.span_id);
            let at = probe(slots, id, salt, bits, generation);
            // A repeated span id: the first arrival keeps the slot.
            if slots[at].generation != generation {
                slots[at] = Slot {
                    id,
                    index: i as u32,
                    generation,
                };
            }
        }
        let n = spans.len();
        self.parents.clear();
        self.parents.resize(n, None);
        self.missing_parent.clear();
        self.missing_parent.resize(n, false);
        self.is_leaf.clear();
        self.is_leaf.resize(n, true);
        self.services.clear();
        // Plain slices from here: the loop then keeps every pointer in a register.
        let (slots, parents, missing, is_leaf) = (
            &self.slots[..size],
            &mut self.parents[..],
            &mut self.missing_parent[..],
            &mut self.is_leaf[..],
        );
        let mut root: Option<u32> = None;
        let (mut min_start, mut max_end) = (u64::MAX, 0u64);
        let mut error_count = 0;
        let mut orphan_count = 0;
        let mut last_parent: Option<(u64, Slot)> = None;
        let mut last_scope: Option<&Arc<ScopeHeader>> = None;
        for (i, s) in spans.iter().enumerate() {
            if s.is_root() {
                let earlier =
                    root.is_none_or(|r| s.start_unix_nano < spans[r as usize].start_unix_nano);
                if earlier {
                    root = Some(i as u32);
                }
            } else {
                let id = u64::from_ne_bytes(s.parent_span_id);
                // Siblings come in runs (a parent's calls are sent together): the previous
                // span's answer serves the next one with the same parent.
                let slot = match last_parent {
                    Some((last, slot)) if last == id => slot,
                    _ => {
                        let slot = slots[probe(slots, id, salt, bits, generation)];
                        last_parent = Some((id, slot));
                        slot
                    }
                };
                if slot.generation == generation {
                    parents[i] = Some(slot.index);
                    is_leaf[slot.index as usize] = false;
                } else {
                    missing[i] = true;
                    orphan_count += 1;
                }
            }
            min_start = min_start.min(s.start_unix_nano);
            max_end = max_end.max(s.end_unix_nano);
            error_count += u32::from(s.status_code == 2);
            // Spans of one request share their scope: only a new scope can add a service.
            if last_scope.is_some_and(|l| Arc::ptr_eq(l, &s.scope)) {
                continue;
            }
            last_scope = Some(&s.scope);
            let service = &s.scope.resource.service;
            // Spans of one batch share the Arc: compare pointers before text.
            if !service.is_empty()
                && !self
                    .services
                    .iter()
                    .any(|x| Arc::ptr_eq(x, service) || x == service)
            {
                self.services.push(service.clone());
            }
        }
        self.attrs.built = false; // built on the first attribute lookup, if any policy makes one
        self.span_count = spans.len() as u32;
        self.error_count = error_count;
        self.duration_ns = max_end.saturating_sub(min_start);
        self.root = root;
        self.orphan_count = orphan_count;
    }

    /// The contract's `summary` of the indexed trace.
    pub fn summary(&self) -> Summary {
        Summary {
            span_count: self.span_count,
            error_count: self.error_count,
            duration_ns: self.duration_ns,
            root: self.root,
            service_count: self.services.len() as u32,
            orphan_count: self.orphan_count,
        }
    }

    /// The trace's facts for `decide-summaries`, appended to `out`: the summary, the id and
    /// the OTel randomness (the root's explicit `rv`, else the first span's, else the id's).
    pub fn push_facts(&self, trace_id: &TraceId, spans: &[BufferedSpan], out: &mut Vec<u64>) {
        let probe = self.root.map(|r| r as usize).unwrap_or(0);
        let randomness = spans
            .get(probe)
            .filter(|s| s.has_trace_state)
            .map(|s| wire::span_trace_state(&s.bytes))
            .and_then(tailgate_plugin_sdk::explicit_randomness)
            .unwrap_or_else(|| tailgate_plugin_sdk::trace_id_randomness(trace_id));
        let summary = tailgate_plugin_sdk::Summary {
            span_count: self.span_count,
            error_count: self.error_count,
            duration_ns: self.duration_ns,
            root: self.root,
            service_count: self.services.len() as u32,
            orphan_count: self.orphan_count,
        };
        tailgate_plugin_sdk::facts_to_words(&summary, trace_id, randomness, out);
    }
}

/// The 16-byte trace id as the contract's two big-endian halves.
pub fn trace_id_words(id: &TraceId) -> (u64, u64) {
    let (hi, lo) = id.split_at(8);
    let word = |b: &[u8]| b.try_into().map(u64::from_be_bytes).unwrap_or(0);
    (word(hi), word(lo))
}

/// A span's name, read from its bytes.
pub fn span_name(span: &BufferedSpan) -> &str {
    wire::span_name(&span.bytes)
}

/// The trace a `decide` call is looking at. Moved into the store for the call and back out
/// after, so no span is copied.
#[derive(Default)]
pub struct TraceData {
    pub trace_id: TraceId,
    pub spans: Vec<BufferedSpan>,
    pub index: TraceIndex,
}

/// Per-policy settings the host functions need.
pub struct PolicyMeta {
    pub name: Arc<str>,
    pub seed: u64,
    pub log_per_second: u32,
    pub counters: Arc<PolicyCounters>,
    /// Caps on one verdict's patches: how many, and their encoded bytes.
    pub max_patches: usize,
    pub max_patch_bytes: usize,
}

/// A policy instance's store data.
/// When the current guest call started, by the wall clock and by this thread's CPU clock; the
/// epoch-deadline callback compares the two to tell a busy guest from a preempted thread.
#[derive(Clone, Copy, Debug)]
pub struct CallClock {
    pub started: std::time::Instant,
    pub cpu_at_start: Option<std::time::Duration>,
}

impl CallClock {
    pub fn now() -> Self {
        Self {
            started: std::time::Instant::now(),
            cpu_at_start: thread_cpu_time(),
        }
    }
}

impl CallClock {
    /// How long the call has run: (wall-clock time, CPU time of this thread). Without a thread
    /// clock the CPU time is taken to be the wall-clock time.
    pub fn elapsed(&self) -> (std::time::Duration, std::time::Duration) {
        let wall = self.started.elapsed();
        let cpu = match (thread_cpu_time(), self.cpu_at_start) {
            (Some(now), Some(start)) => now.saturating_sub(start),
            _ => wall,
        };
        (wall, cpu)
    }
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`). A system call, so callers on
/// the hot path cache it (see the chain).
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given, which is valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

pub struct PolicyState {
    pub limits: StoreLimits,
    pub call: CallClock,
    pub trace: Option<Box<TraceData>>,
    pub meta: Arc<PolicyMeta>,
    /// The edits the current `decide` has asked for.
    pub edits: PendingEdits,
    pub reasons: Reasons,
    rng: tailgate_plugin_sdk::TraceStream,
    /// The trace whose stream `rng` becomes on the first draw: most policies never draw.
    unseeded: Option<TraceId>,
    last_now: u64,
    log_second: u64,
    logged_this_second: u32,
    pub logs_dropped: u64,
}

impl PolicyState {
    pub fn new(meta: Arc<PolicyMeta>, limits: StoreLimits) -> Self {
        let rng = tailgate_plugin_sdk::TraceStream::untraced(meta.seed);
        Self {
            limits,
            call: CallClock::now(),
            trace: None,
            meta,
            edits: PendingEdits::default(),
            reasons: Reasons::default(),
            rng,
            unseeded: None,
            last_now: 0,
            log_second: 0,
            logged_this_second: 0,
            logs_dropped: 0,
        }
    }

    /// Seeds the per-trace random stream from the trace id and the policy's seed, so the same
    /// trace through the same policy sees the same numbers on any replica.
    pub fn seed_for(&mut self, trace_id: &TraceId) {
        self.unseeded = Some(*trace_id);
    }

    fn trace(&self) -> wasmtime::Result<&TraceData> {
        match &self.trace {
            Some(t) => Ok(t),
            None => bail!("the trace is only readable during decide"),
        }
    }

    /// The trace with its attribute table built.
    fn attributed(&mut self) -> wasmtime::Result<(&[BufferedSpan], &AttrTable)> {
        let Some(t) = self.trace.as_mut() else {
            bail!("the trace is only readable during decide")
        };
        if !t.index.attrs.built {
            t.index.attrs.build(&t.spans);
        }
        Ok((&t.spans, &t.index.attrs))
    }

    fn span(&self, i: u32) -> wasmtime::Result<&BufferedSpan> {
        let t = self.trace()?;
        match t.spans.get(i as usize) {
            Some(s) => Ok(s),
            None => bail!(
                "span index {i} out of range: the trace has {} spans",
                t.spans.len()
            ),
        }
    }
}

/// An OTLP attribute value as the guest sees it.
pub fn to_attr_value(v: AnyValueRef<'_>) -> Option<AttrValue> {
    Some(match v {
        AnyValueRef::Str(s) => AttrValue::Str(s.to_owned()),
        AnyValueRef::Bool(b) => AttrValue::Boolean(b),
        AnyValueRef::Int(i) => AttrValue::Int(i),
        AnyValueRef::Double(d) => AttrValue::Double(d),
        AnyValueRef::Bytes(b) => AttrValue::Bytes(b.to_vec()),
        AnyValueRef::Array(bytes) => AttrValue::Json(super::json_value::array_to_json(bytes)),
        AnyValueRef::KvList(bytes) => AttrValue::Json(super::json_value::kvlist_to_json(bytes)),
        AnyValueRef::Empty => return None,
    })
}

fn numeric(v: AnyValueRef<'_>) -> Option<f64> {
    match v {
        AnyValueRef::Int(i) => Some(i as f64),
        AnyValueRef::Double(d) if !d.is_nan() => Some(d),
        _ => None,
    }
}

fn kind_of(k: u8) -> SpanKind {
    match k {
        1 => SpanKind::Internal,
        2 => SpanKind::Server,
        3 => SpanKind::Client,
        4 => SpanKind::Producer,
        5 => SpanKind::Consumer,
        _ => SpanKind::Unspecified,
    }
}

fn status_of(code: u8) -> StatusCode {
    match code {
        1 => StatusCode::Ok,
        2 => StatusCode::Error,
        _ => StatusCode::Unset,
    }
}

fn duration(s: &BufferedSpan) -> u64 {
    s.end_unix_nano.saturating_sub(s.start_unix_nano)
}

impl trace::Host for PolicyState {
    fn summary(&mut self) -> wasmtime::Result<Summary> {
        Ok(self.trace()?.index.summary())
    }

    fn services(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self
            .trace()?
            .index
            .services
            .iter()
            .map(|s| s.to_string())
            .collect())
    }

    fn trace_id(&mut self) -> wasmtime::Result<(u64, u64)> {
        Ok(trace_id_words(&self.trace()?.trace_id))
    }

    fn name(&mut self, span: u32) -> wasmtime::Result<String> {
        Ok(span_name(self.span(span)?).to_owned())
    }

    fn kind(&mut self, span: u32) -> wasmtime::Result<SpanKind> {
        Ok(kind_of(self.span(span)?.kind))
    }

    fn status(&mut self, span: u32) -> wasmtime::Result<StatusCode> {
        Ok(status_of(self.span(span)?.status_code))
    }

    fn status_message(&mut self, span: u32) -> wasmtime::Result<String> {
        Ok(wire::span_status_message(&self.span(span)?.bytes).to_owned())
    }

    fn start_ns(&mut self, span: u32) -> wasmtime::Result<u64> {
        Ok(self.span(span)?.start_unix_nano)
    }

    fn end_ns(&mut self, span: u32) -> wasmtime::Result<u64> {
        Ok(self.span(span)?.end_unix_nano)
    }

    fn duration_ns(&mut self, span: u32) -> wasmtime::Result<u64> {
        Ok(duration(self.span(span)?))
    }

    fn parent(&mut self, span: u32) -> wasmtime::Result<Option<u32>> {
        self.span(span)?;
        Ok(self.trace()?.index.parents[span as usize])
    }

    fn missing_parent(&mut self, span: u32) -> wasmtime::Result<bool> {
        self.span(span)?;
        Ok(self.trace()?.index.missing_parent[span as usize])
    }

    fn span_id(&mut self, span: u32) -> wasmtime::Result<u64> {
        Ok(u64::from_be_bytes(self.span(span)?.span_id))
    }

    fn trace_state(&mut self, span: u32) -> wasmtime::Result<Option<String>> {
        let state = wire::span_trace_state(&self.span(span)?.bytes);
        Ok((!state.is_empty()).then(|| state.to_owned()))
    }

    fn service(&mut self, span: u32) -> wasmtime::Result<String> {
        Ok(self.span(span)?.scope.resource.service.to_string())
    }

    fn attr(&mut self, span: u32, key: String) -> wasmtime::Result<Option<AttrValue>> {
        self.span(span)?; // the range check
        let (spans, attrs) = self.attributed()?;
        Ok(attrs
            .get(spans, span as usize, &key)
            .and_then(to_attr_value))
    }

    fn resource_attr(&mut self, span: u32, key: String) -> wasmtime::Result<Option<AttrValue>> {
        let s = self.span(span)?;
        Ok(wire::resource_attribute(&s.scope.resource.resource, &key).and_then(to_attr_value))
    }

    fn durations(&mut self) -> wasmtime::Result<Vec<u64>> {
        Ok(self.trace()?.spans.iter().map(duration).collect())
    }

    fn statuses(&mut self) -> wasmtime::Result<Vec<StatusCode>> {
        Ok(self
            .trace()?
            .spans
            .iter()
            .map(|s| status_of(s.status_code))
            .collect())
    }

    fn parents(&mut self) -> wasmtime::Result<Vec<Option<u32>>> {
        Ok(self.trace()?.index.parents.clone())
    }

    fn attr_column(&mut self, key: String) -> wasmtime::Result<Vec<Option<AttrValue>>> {
        let (spans, attrs) = self.attributed()?;
        Ok((0..spans.len())
            .map(|i| attrs.get(spans, i, &key).and_then(to_attr_value))
            .collect())
    }

    fn attr_column_dict(&mut self, key: String) -> wasmtime::Result<DictColumn> {
        let (spans, attrs) = self.attributed()?;
        Ok(attrs.dict_column(spans, &key))
    }

    fn sum(&mut self, key: String) -> wasmtime::Result<f64> {
        Ok(self.numeric_values(&key)?.sum())
    }

    fn max(&mut self, key: String) -> wasmtime::Result<Option<f64>> {
        Ok(self.numeric_values(&key)?.reduce(f64::max))
    }

    fn count(&mut self, key: String) -> wasmtime::Result<u32> {
        Ok(self.numeric_values(&key)?.count() as u32)
    }

    fn count_name(&mut self, name: String) -> wasmtime::Result<u32> {
        Ok(self
            .trace()?
            .spans
            .iter()
            .filter(|s| span_name(s) == name)
            .count() as u32)
    }

    fn string_attrs(&mut self, min_len: u32) -> wasmtime::Result<Vec<(u32, String, String)>> {
        let mut out = Vec::new();
        let (spans, attrs) = self.attributed()?;
        for i in 0..spans.len() {
            for (key, value) in attrs.of_span(spans, i) {
                if let wire::AnyValueRef::Str(v) = value
                    && v.len() >= min_len as usize
                    && let Ok(key) = std::str::from_utf8(key)
                {
                    out.push((i as u32, key.to_owned(), v.to_owned()));
                }
            }
        }
        Ok(out)
    }

    fn otlp_bytes(&mut self) -> wasmtime::Result<Vec<u8>> {
        Ok(crate::export::encode_spans(&self.trace()?.spans))
    }

    fn patch(
        &mut self,
        target: PatchTarget,
        key: String,
        value: AttrValue,
    ) -> wasmtime::Result<()> {
        // Checked against the trace when the call returns (see `edits::validate`); here only
        // held, within the caps, so a guest cannot make the host hold more than they allow.
        self.trace()?;
        let (max, max_bytes) = (self.meta.max_patches, self.meta.max_patch_bytes);
        (self.edits).push_patch(Patch { target, key, value }, max, max_bytes);
        Ok(())
    }

    fn remove_span(&mut self, span: u32) -> wasmtime::Result<()> {
        let spans = self.trace()?.spans.len();
        self.edits.push_removal(span, spans);
        Ok(())
    }
}

/// The reasons an instance has registered through `host.reason`: id `n` is `texts[n]`.
/// Past [`Reasons::CAP`] distinct texts, a new text gets a call id instead
/// ([`Reasons::CALL_BASE`] and up), good for the current call only.
pub struct Reasons {
    texts: Vec<Arc<str>>,
    ids: std::collections::HashMap<Arc<str>, u32>,
    /// This call's texts past the cap, by call id - [`Reasons::CALL_BASE`].
    call: Vec<Arc<str>>,
}

impl Default for Reasons {
    fn default() -> Self {
        let empty: Arc<str> = Arc::from("");
        Self {
            texts: vec![empty.clone()],
            ids: [(empty, 0)].into_iter().collect(),
            call: Vec::new(),
        }
    }
}

impl Reasons {
    /// Distinct reasons an instance may hold.
    pub const CAP: usize = 1024;
    /// The first id of a reason registered past the cap, valid until the call returns.
    pub const CALL_BASE: u32 = 0x8000_0000;
    /// Texts past the cap that one call may register; later ones share the last id, which
    /// stands for the latest of them.
    pub const CALL_CAP: usize = 1024;
    /// Longest reason kept, in bytes.
    pub const MAX_BYTES: usize = 256;

    /// Forgets the previous call's ids; called before each call into the guest.
    pub fn new_call(&mut self) {
        self.call.clear();
    }

    pub fn register(&mut self, text: String) -> u32 {
        let text = truncated(text, Self::MAX_BYTES);
        if let Some(&id) = self.ids.get(text.as_str()) {
            return id;
        }
        if self.texts.len() < Self::CAP {
            let text: Arc<str> = Arc::from(text);
            let id = self.texts.len() as u32;
            self.texts.push(text.clone());
            self.ids.insert(text, id);
            return id;
        }
        if let Some(k) = self.call.iter().position(|t| **t == *text) {
            return Self::CALL_BASE + k as u32;
        }
        if self.call.len() == Self::CALL_CAP {
            self.call.pop();
        }
        self.call.push(Arc::from(text));
        Self::CALL_BASE + (self.call.len() - 1) as u32
    }

    /// The text of a reason id the guest returned; an id it was never given fails the call.
    pub fn get(&self, id: u32) -> wasmtime::Result<&Arc<str>> {
        let text = match id.checked_sub(Self::CALL_BASE) {
            Some(k) => self.call.get(k as usize),
            None => self.texts.get(id as usize),
        };
        match text {
            Some(text) => Ok(text),
            None => bail!(
                "the verdict names reason {id:#x}, which this instance was not given (it holds {} reasons, and {} for this call)",
                self.texts.len(),
                self.call.len()
            ),
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary, without copying it.
pub fn truncated(mut s: String, max: usize) -> String {
    truncate(&mut s, max);
    s
}

/// Cuts `s` to at most `max` bytes on a character boundary; true if it was longer.
pub fn truncate(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    true
}

impl PolicyState {
    fn numeric_values<'a>(
        &'a mut self,
        key: &'a str,
    ) -> wasmtime::Result<impl Iterator<Item = f64> + 'a> {
        let (spans, attrs) = self.attributed()?;
        Ok((0..spans.len()).filter_map(move |i| attrs.get(spans, i, key).and_then(numeric)))
    }
}

impl types::Host for PolicyState {}

/// Longest log message kept; a guest cannot flood the host's logs with one call.
const MAX_LOG_BYTES: usize = 1024;

impl host::Host for PolicyState {
    fn reason(&mut self, text: String) -> wasmtime::Result<u32> {
        Ok(self.reasons.register(text))
    }

    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let second = unix_nanos() / 1_000_000_000;
        if second != self.log_second {
            self.log_second = second;
            self.logged_this_second = 0;
        }
        if self.logged_this_second >= self.meta.log_per_second {
            self.logs_dropped += 1;
            return Ok(());
        }
        self.logged_this_second += 1;
        let mut message = message;
        if truncate(&mut message, MAX_LOG_BYTES) {
            message.push('…');
        }
        let policy = &*self.meta.name;
        match level {
            Level::Trace => tracing::trace!(policy, "{message}"),
            Level::Debug => tracing::debug!(policy, "{message}"),
            Level::Info => tracing::info!(policy, "{message}"),
            Level::Warn => tracing::warn!(policy, "{message}"),
            Level::Error => tracing::error!(policy, "{message}"),
        }
        Ok(())
    }

    fn random(&mut self) -> wasmtime::Result<u64> {
        if let Some(id) = self.unseeded.take() {
            self.rng = tailgate_plugin_sdk::TraceStream::new(self.meta.seed, &id);
        }
        Ok(self.rng.next_u64())
    }

    fn now_ns(&mut self) -> wasmtime::Result<u64> {
        self.last_now = self.last_now.max(unix_nanos());
        Ok(self.last_now)
    }

    fn counter_add(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    ) -> wasmtime::Result<()> {
        self.meta
            .counters
            .add(&self.meta.name, &name, labels, value);
        Ok(())
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{ResourceHeader, ScopeHeader};
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};

    fn span(id: u64, parent: u64, start: u64, service: &Arc<ResourceHeader>) -> BufferedSpan {
        BufferedSpan {
            bytes: Box::new([]),
            scope: Arc::new(ScopeHeader {
                resource: service.clone(),
                fields: Box::new([]),
            }),
            span_id: id.to_be_bytes(),
            parent_span_id: parent.to_be_bytes(),
            start_unix_nano: start,
            end_unix_nano: start + 10,
            status_code: 0,
            kind: 1,
            has_trace_state: false,
        }
    }

    #[test]
    fn random_draws_the_traces_stream_under_the_policys_seed() {
        use host::Host;
        let meta = Arc::new(PolicyMeta {
            name: Arc::from("dice"),
            seed: 42,
            log_per_second: 1,
            counters: Arc::new(PolicyCounters::new(10)),
            max_patches: 4,
            max_patch_bytes: 1024,
        });
        let mut state = PolicyState::new(meta, StoreLimits::default());
        for id in [[1u8; 16], [2; 16], [1; 16]] {
            state.seed_for(&id);
            // The same numbers the SDK draws for a summary-only policy, on any replica.
            let mut want = tailgate_plugin_sdk::TraceStream::new(42, &id);
            for _ in 0..3 {
                assert_eq!(state.random().unwrap(), want.next_u64());
            }
        }
    }

    fn resource(service: &str) -> Arc<ResourceHeader> {
        Arc::new(ResourceHeader {
            fields: Box::new([]),
            resource: Box::new([]),
            service: Arc::from(service),
        })
    }

    #[test]
    fn parents_leaves_roots_and_services() {
        let (a, b) = (resource("a"), resource("b"));
        let spans = vec![
            span(5, 1, 20, &a), // child of the root, arrives first
            span(1, 0, 10, &a), // the root
            span(6, 5, 30, &b),
            span(7, 99, 40, &b), // parent never arrived
            span(2, 0, 5, &b),   // a second parentless span, earlier: the root
        ];
        let i = TraceIndex::new(&spans);
        assert_eq!(i.parents, vec![Some(1), None, Some(0), None, None]);
        assert_eq!(i.missing_parent, vec![false, false, false, true, false]);
        assert_eq!(i.is_leaf, vec![false, false, true, true, true]);
        assert_eq!(i.root, Some(4));
        assert_eq!(i.duration_ns, 50 - 5);
        let services: Vec<&str> = i.services.iter().map(|s| &**s).collect();
        assert_eq!(services, ["a", "b"]);
    }

    #[test]
    fn runs_of_siblings_and_ids_of_an_earlier_trace_resolve_correctly() {
        let r = resource("svc");
        let mut index = TraceIndex::default();
        // Trace A holds span 9; trace B's spans name 9 as their parent, but it is not in B:
        // the table's slot for 9 from trace A must not answer for B.
        index.rebuild(&[span(9, 0, 0, &r), span(3, 9, 1, &r)]);
        let spans = vec![
            span(1, 0, 0, &r),
            span(2, 1, 1, &r), // a run of siblings under the root
            span(3, 1, 2, &r),
            span(4, 9, 3, &r), // a run of orphans under a parent of trace A
            span(5, 9, 4, &r),
            span(6, 1, 5, &r), // the root again after the run
            span(7, 2, 6, &r),
        ];
        index.rebuild(&spans);
        let want = [None, Some(0), Some(0), None, None, Some(0), Some(1)];
        assert_eq!(index.parents, want);
        assert_eq!(index.orphan_count, 2);
        assert_eq!(
            index.missing_parent,
            [false, false, false, true, true, false, false]
        );
        assert_eq!(index.is_leaf, [false, false, true, true, true, true, true]);
    }

    #[test]
    fn a_repeated_span_id_resolves_to_its_first_arrival() {
        let r = resource("svc");
        let spans = vec![span(1, 0, 0, &r), span(1, 0, 5, &r), span(2, 1, 6, &r)];
        let i = TraceIndex::new(&spans);
        assert_eq!(i.parents[2], Some(0));
    }

    #[test]
    fn rebuilding_in_place_matches_a_fresh_index_for_any_size() {
        let r = resource("svc");
        let mut reused = TraceIndex::default();
        for n in [3usize, 1000, 0, 40, 1] {
            // Sequential ids, the worst case for a table indexed by low bits.
            let spans: Vec<_> = (0..n as u64)
                .map(|k| span(k + 1, if k == 0 { 0 } else { k }, k, &r))
                .collect();
            reused.rebuild(&spans);
            let fresh = TraceIndex::new(&spans);
            assert_eq!(reused.parents, fresh.parents);
            assert_eq!(reused.is_leaf, fresh.is_leaf);
            let expect: Vec<Option<u32>> = (0..n as u32).map(|k| k.checked_sub(1)).collect();
            assert_eq!(reused.parents, expect, "{n} spans");
            assert_eq!(reused.span_count as usize, n);
        }
    }

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            key_strindex: 0,
        }
    }

    /// Span `id` with these attributes in its bytes.
    fn with_attrs(id: u64, attrs: Vec<KeyValue>) -> BufferedSpan {
        use prost::Message;
        let proto = opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: vec![1; 16],
            span_id: id.to_be_bytes().to_vec(),
            name: format!("span-{id}"),
            attributes: attrs,
            ..Default::default()
        };
        BufferedSpan {
            bytes: proto.encode_to_vec().into_boxed_slice(),
            ..span(id, 0, id, &resource("svc"))
        }
    }

    #[test]
    fn the_attribute_table_answers_as_the_span_bytes_do() {
        let spans = vec![
            with_attrs(
                1,
                vec![
                    kv("tenant.id", Value::StringValue("t1".into())),
                    kv("tokens", Value::IntValue(5)),
                    // A repeated key: the last occurrence wins, as in protobuf.
                    kv("tenant.id", Value::StringValue("t2".into())),
                ],
            ),
            with_attrs(2, vec![]),
            with_attrs(
                3,
                vec![
                    kv("tokens", Value::DoubleValue(2.5)),
                    kv("tenant.i", Value::StringValue("prefix, not the key".into())),
                ],
            ),
        ];
        let mut table = AttrTable::default();
        table.build(&spans);
        for key in ["tenant.id", "tokens", "tenant.i", "absent", ""] {
            for (i, s) in spans.iter().enumerate() {
                assert_eq!(
                    table.get(&spans, i, key),
                    wire::span_attribute(&s.bytes, key),
                    "span {i}, key {key:?}"
                );
            }
        }
        assert_eq!(
            table.get(&spans, 0, "tenant.id"),
            Some(AnyValueRef::Str("t2"))
        );
        let all: Vec<Vec<(&[u8], AnyValueRef<'_>)>> = (0..spans.len())
            .map(|i| table.of_span(&spans, i).collect())
            .collect();
        assert_eq!(all[0].len(), 3);
        assert!(all[1].is_empty());
        assert_eq!(
            all[2][1],
            (&b"tenant.i"[..], AnyValueRef::Str("prefix, not the key"))
        );
    }

    #[test]
    fn a_dictionary_column_decodes_to_the_plain_column() {
        // 40 spans: 3 distinct values for `tenant`, 40 for `user`, mixed types and gaps for
        // `mixed`.
        let spans: Vec<BufferedSpan> = (0..40u64)
            .map(|i| {
                let mut attributes = vec![
                    kv("tenant", Value::StringValue(format!("t{}", i % 3))),
                    kv("user", Value::StringValue(format!("u{i}"))),
                ];
                match i % 4 {
                    0 => attributes.push(kv("mixed", Value::IntValue(7))),
                    1 => attributes.push(kv("mixed", Value::StringValue("7".into()))),
                    2 => attributes.push(kv("mixed", Value::BoolValue(true))),
                    _ => {}
                }
                with_attrs(i + 1, attributes)
            })
            .collect();
        let mut table = AttrTable::default();
        table.build(&spans);
        for (key, distinct) in [("tenant", 3), ("user", 40), ("mixed", 3), ("absent", 0)] {
            let dict = table.dict_column(&spans, key);
            assert_eq!(dict.values.len(), distinct, "{key}");
            assert_eq!(dict.codes.len(), spans.len(), "{key}");
            for (i, code) in dict.codes.iter().enumerate() {
                let plain = table.get(&spans, i, key).and_then(to_attr_value);
                let decoded = (*code != NO_VALUE).then(|| dict.values[*code as usize].clone());
                assert_eq!(
                    format!("{decoded:?}"),
                    format!("{plain:?}"),
                    "{key}, span {i}"
                );
            }
        }
    }

    #[test]
    fn reasons_get_one_id_per_text_and_past_the_cap_one_per_call() {
        let mut r = Reasons::default();
        assert_eq!(r.register(String::new()), 0);
        let error = r.register("error".into());
        assert_eq!(r.register("slow".into()), error + 1);
        assert_eq!(r.register("error".into()), error);
        assert_eq!(&**r.get(error).unwrap(), "error");
        assert_eq!(&**r.get(0).unwrap(), "");
        // An id never handed out fails the call instead of reading as some other reason.
        let unknown = r.get(error + 2).unwrap_err().to_string();
        assert!(unknown.contains("reason 0x3"), "{unknown}");
        // Reasons are cut to 256 bytes on a character boundary.
        let long = r.register("é".repeat(200));
        assert_eq!(r.get(long).unwrap().len(), 256);
        // Fill the table; past it, each new text gets an id of its own for this call.
        let mut n = 0;
        while r.register(format!("r{n}")) < Reasons::CALL_BASE {
            n += 1;
        }
        assert_eq!(n + 4, Reasons::CAP, "ids 0..CAP were handed out");
        let (a, b) = (r.register("late a".into()), r.register("late b".into()));
        assert_eq!((a, b), (Reasons::CALL_BASE + 1, Reasons::CALL_BASE + 2));
        assert_eq!(r.register("late a".into()), a);
        assert_eq!(&**r.get(a).unwrap(), "late a");
        assert_eq!(&**r.get(b).unwrap(), "late b");
        // Registered texts keep their ids.
        assert_eq!(r.register("slow".into()), error + 1);
        // A call's ids end with the call.
        r.new_call();
        assert!(r.get(a).is_err());
        assert_eq!(r.register("late b".into()), Reasons::CALL_BASE);
        // A call registering more than CALL_CAP such texts: the last id is the latest text.
        for k in 0..Reasons::CALL_CAP + 5 {
            r.register(format!("burst {k}"));
        }
        let last = Reasons::CALL_BASE + Reasons::CALL_CAP as u32 - 1;
        assert_eq!(
            &**r.get(last).unwrap(),
            format!("burst {}", Reasons::CALL_CAP + 4)
        );
        assert!(r.get(last + 1).is_err());
    }
}
