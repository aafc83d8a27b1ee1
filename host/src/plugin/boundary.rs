//! The host side of the sandbox boundary: what a policy's store holds, and the host's
//! implementation of the contract's imports, the `trace` interface (the trace being decided,
//! and the edits a verdict asks for) and the `host` interface (reasons, log, random, clock,
//! counters).
//!
//! Every index and string that comes from a guest is checked here before it touches host data
//! (the invariants are listed once, in the module doc of [`super`]).

use std::sync::Arc;

use wasmtime::{StoreLimits, bail};

use super::bindings::tailgate::policy::host::{self, Level};
use super::bindings::tailgate::policy::trace;
use super::bindings::tailgate::policy::types::{
    self, AttrValue, DictColumn, PatchTarget, SpanKind, StatusCode, Summary,
};
use super::counters::PolicyCounters;
use super::edits::{Patch, PendingEdits};
use super::index::{AttrTable, TraceIndex, span_name, to_attr_value, trace_id_words};
use crate::otlp::wire::{self, AnyValueRef};
use crate::trace::{BufferedSpan, TraceId};

/// The trace a `decide` call is looking at. Moved into the store for the call and back out
/// after, so no span is copied.
#[derive(Default)]
pub(crate) struct TraceData {
    pub(crate) trace_id: TraceId,
    pub(crate) spans: Vec<BufferedSpan>,
    pub(crate) index: TraceIndex,
}

/// Per-policy settings the host functions need.
pub(crate) struct PolicyMeta {
    pub(crate) name: Arc<str>,
    pub(crate) seed: u64,
    pub(crate) log_per_second: u32,
    pub(crate) counters: Arc<PolicyCounters>,
    /// Caps on one verdict's patches: how many, and their encoded bytes.
    pub(crate) max_patches: usize,
    pub(crate) max_patch_bytes: usize,
}

/// A policy instance's store data.
/// When the current guest call started, by the wall clock and by this thread's CPU clock; the
/// epoch-deadline callback compares the two to tell a busy guest from a preempted thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallClock {
    pub(crate) started: std::time::Instant,
    pub(crate) cpu_at_start: Option<std::time::Duration>,
}

impl CallClock {
    pub(crate) fn now() -> Self {
        Self {
            started: std::time::Instant::now(),
            cpu_at_start: thread_cpu_time(),
        }
    }
}

impl CallClock {
    /// How long the call has run: (wall-clock time, CPU time of this thread). Without a thread
    /// clock the CPU time is taken to be the wall-clock time.
    pub(crate) fn elapsed(&self) -> (std::time::Duration, std::time::Duration) {
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
pub(crate) fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given, which is valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

pub(crate) struct PolicyState {
    pub(crate) limits: StoreLimits,
    pub(crate) call: CallClock,
    pub(crate) trace: Option<Box<TraceData>>,
    pub(crate) meta: Arc<PolicyMeta>,
    /// The edits the current `decide` has asked for.
    pub(crate) edits: PendingEdits,
    pub(crate) reasons: Reasons,
    rng: tailgate_plugin_sdk::TraceStream,
    /// The trace whose stream `rng` becomes on the first draw: most policies never draw.
    unseeded: Option<TraceId>,
    last_now: u64,
    log_second: u64,
    logged_this_second: u32,
    pub(crate) logs_dropped: u64,
}

impl PolicyState {
    pub(crate) fn new(meta: Arc<PolicyMeta>, limits: StoreLimits) -> Self {
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
    pub(crate) fn seed_for(&mut self, trace_id: &TraceId) {
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
        Ok(crate::otlp::regroup::encode_spans(&self.trace()?.spans))
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
pub(crate) struct Reasons {
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
    pub(crate) const CAP: usize = 1024;
    /// The first id of a reason registered past the cap, valid until the call returns.
    pub(crate) const CALL_BASE: u32 = 0x8000_0000;
    /// Texts past the cap that one call may register; later ones share the last id, which
    /// stands for the latest of them.
    pub(crate) const CALL_CAP: usize = 1024;
    /// Longest reason kept, in bytes.
    pub(crate) const MAX_BYTES: usize = 256;

    /// Forgets the previous call's ids; called before each call into the guest.
    pub(crate) fn new_call(&mut self) {
        self.call.clear();
    }

    pub(crate) fn register(&mut self, text: String) -> u32 {
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
    pub(crate) fn get(&self, id: u32) -> wasmtime::Result<&Arc<str>> {
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
pub(crate) fn truncated(mut s: String, max: usize) -> String {
    truncate(&mut s, max);
    s
}

/// Cuts `s` to at most `max` bytes on a character boundary; true if it was longer.
pub(crate) fn truncate(s: &mut String, max: usize) -> bool {
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

    #[test]
    fn random_draws_the_traces_stream_under_the_policys_seed() {
        use host::Host;
        let meta = Arc::new(PolicyMeta {
            name: Arc::from("dice"),
            seed: 42,
            log_per_second: 1,
            counters: Arc::new(PolicyCounters::new(10, std::time::Duration::from_secs(60))),
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
