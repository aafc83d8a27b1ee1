//! The native backend: an in-memory trace that answers every accessor the way
//! the WIT contract says the host must (same root rule, same "numeric" rule,
//! same saturating durations), so a policy tested natively behaves the same
//! in Wasm.

use crate::types::{AttrValue, DictColumn, SpanKind, StatusCode, Summary};

/// `service.name`, the resource attribute behind `service` and the summary.
pub(crate) const SERVICE_NAME: &str = "service.name";

#[derive(Clone, Debug)]
pub(crate) struct MemSpan {
    pub name: String,
    pub kind: SpanKind,
    pub status: StatusCode,
    pub status_message: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub span_id: [u8; 8],
    /// The parent span id as received; `None` for a root.
    pub parent_span_id: Option<[u8; 8]>,
    /// Index of the parent within this trace, when it is present.
    pub parent: Option<u32>,
    pub trace_state: String,
    /// Index into `MemTrace::resources`.
    pub resource: usize,
    pub attrs: Vec<(String, AttrValue)>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct MemResource {
    pub attrs: Vec<(String, AttrValue)>,
}

#[derive(Clone, Debug)]
pub(crate) struct MemTrace {
    pub trace_id: [u8; 16],
    pub spans: Vec<MemSpan>,
    pub resources: Vec<MemResource>,
    pub summary: Summary,
    pub services: Vec<String>,
}

fn lookup<'a>(attrs: &'a [(String, AttrValue)], key: &str) -> Option<&'a AttrValue> {
    // Last write wins, as when an OTLP producer repeats a key.
    attrs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

impl MemTrace {
    pub(crate) fn new(
        trace_id: [u8; 16],
        spans: Vec<MemSpan>,
        resources: Vec<MemResource>,
    ) -> Self {
        let mut t = MemTrace {
            trace_id,
            spans,
            resources,
            summary: Summary::default(),
            services: Vec::new(),
        };
        t.services = t.compute_services();
        t.summary = t.compute_summary();
        t
    }

    /// Distinct non-empty service names in order of first appearance.
    fn compute_services(&self) -> Vec<String> {
        let mut services: Vec<String> = Vec::new();
        for i in 0..self.spans.len() {
            let s = self.service_of(i);
            if !s.is_empty() && !services.contains(&s) {
                services.push(s);
            }
        }
        services
    }

    fn service_of(&self, i: usize) -> String {
        match lookup(&self.resources[self.spans[i].resource].attrs, SERVICE_NAME) {
            Some(AttrValue::Str(s)) => s.clone(),
            _ => String::new(),
        }
    }

    /// The summary exactly as documented on WIT `summary`.
    fn compute_summary(&self) -> Summary {
        let spans = &self.spans;
        let min_start = spans.iter().map(|s| s.start_ns).min();
        let max_end = spans.iter().map(|s| s.end_ns).max();
        let duration_ns = match (min_start, max_end) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        // Root: no parent span id; earliest start, then lowest index.
        let root = spans
            .iter()
            .enumerate()
            .filter(|(_, s)| s.parent_span_id.is_none())
            .min_by_key(|(i, s)| (s.start_ns, *i))
            .map(|(i, _)| i as u32);
        Summary {
            span_count: spans.len() as u32,
            error_count: spans
                .iter()
                .filter(|s| s.status == StatusCode::Error)
                .count() as u32,
            duration_ns,
            root,
            service_count: self.services.len() as u32,
            orphan_count: spans
                .iter()
                .filter(|s| s.parent_span_id.is_some() && s.parent.is_none())
                .count() as u32,
        }
    }

    fn numeric_values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = f64> + 'a {
        self.spans
            .iter()
            .filter_map(move |s| lookup(&s.attrs, key).and_then(AttrValue::as_f64))
            .filter(|v| !v.is_nan())
    }
}

pub(crate) struct Backend {
    pub(crate) trace: MemTrace,
}

impl Backend {
    fn span(&self, i: u32) -> &MemSpan {
        // The host traps on an out-of-range index; panicking is the native
        // equivalent, and tells a test exactly which index was wrong.
        self.trace.spans.get(i as usize).unwrap_or_else(|| {
            panic!(
                "span index {i} out of range (trace has {} spans)",
                self.trace.spans.len()
            )
        })
    }

    pub(crate) fn summary(&self) -> Summary {
        self.trace.summary
    }

    pub(crate) fn services(&self) -> Vec<String> {
        self.trace.services.clone()
    }

    pub(crate) fn trace_id(&self) -> (u64, u64) {
        let id = &self.trace.trace_id;
        (
            u64::from_be_bytes(id[..8].try_into().unwrap()),
            u64::from_be_bytes(id[8..].try_into().unwrap()),
        )
    }

    pub(crate) fn name(&self, i: u32) -> String {
        self.span(i).name.clone()
    }

    pub(crate) fn kind(&self, i: u32) -> SpanKind {
        self.span(i).kind
    }

    pub(crate) fn status(&self, i: u32) -> StatusCode {
        self.span(i).status
    }

    pub(crate) fn status_message(&self, i: u32) -> String {
        self.span(i).status_message.clone()
    }

    pub(crate) fn start_ns(&self, i: u32) -> u64 {
        self.span(i).start_ns
    }

    pub(crate) fn end_ns(&self, i: u32) -> u64 {
        self.span(i).end_ns
    }

    pub(crate) fn duration_ns(&self, i: u32) -> u64 {
        let s = self.span(i);
        s.end_ns.saturating_sub(s.start_ns)
    }

    pub(crate) fn parent(&self, i: u32) -> Option<u32> {
        self.span(i).parent
    }

    pub(crate) fn missing_parent(&self, i: u32) -> bool {
        let s = self.span(i);
        s.parent_span_id.is_some() && s.parent.is_none()
    }

    pub(crate) fn span_id(&self, i: u32) -> u64 {
        u64::from_be_bytes(self.span(i).span_id)
    }

    pub(crate) fn trace_state(&self, i: u32) -> Option<String> {
        let ts = &self.span(i).trace_state;
        (!ts.is_empty()).then(|| ts.clone())
    }

    pub(crate) fn service(&self, i: u32) -> String {
        self.span(i);
        self.trace.service_of(i as usize)
    }

    pub(crate) fn attr(&self, i: u32, key: &str) -> Option<AttrValue> {
        lookup(&self.span(i).attrs, key).cloned()
    }

    pub(crate) fn resource_attr(&self, i: u32, key: &str) -> Option<AttrValue> {
        let r = self.span(i).resource;
        lookup(&self.trace.resources[r].attrs, key).cloned()
    }

    pub(crate) fn durations(&self) -> Vec<u64> {
        (0..self.trace.spans.len() as u32)
            .map(|i| self.duration_ns(i))
            .collect()
    }

    pub(crate) fn statuses(&self) -> Vec<StatusCode> {
        self.trace.spans.iter().map(|s| s.status).collect()
    }

    pub(crate) fn parents(&self) -> Vec<Option<u32>> {
        self.trace.spans.iter().map(|s| s.parent).collect()
    }

    pub(crate) fn attr_column(&self, key: &str) -> Vec<Option<AttrValue>> {
        self.trace
            .spans
            .iter()
            .map(|s| lookup(&s.attrs, key).cloned())
            .collect()
    }

    /// Distinct by equality here (the host tells values apart by their
    /// encoding); the decoded column is the same either way.
    pub(crate) fn attr_column_dict(&self, key: &str) -> DictColumn {
        let mut values: Vec<AttrValue> = Vec::new();
        let codes = (self.trace.spans.iter())
            .map(|s| match lookup(&s.attrs, key) {
                None => DictColumn::NO_VALUE,
                Some(v) => match values.iter().position(|known| known == v) {
                    Some(code) => code as u32,
                    None => {
                        values.push(v.clone());
                        values.len() as u32 - 1
                    }
                },
            })
            .collect();
        DictColumn::new(values, codes)
    }

    pub(crate) fn string_attrs(&self, min_len: u32) -> Vec<(u32, String, String)> {
        let mut out = Vec::new();
        for (i, s) in self.trace.spans.iter().enumerate() {
            for (k, v) in &s.attrs {
                if let AttrValue::Str(v) = v
                    && v.len() >= min_len as usize
                {
                    out.push((i as u32, k.clone(), v.clone()));
                }
            }
        }
        out
    }

    pub(crate) fn sum(&self, key: &str) -> f64 {
        self.trace.numeric_values(key).sum()
    }

    pub(crate) fn max(&self, key: &str) -> Option<f64> {
        self.trace.numeric_values(key).reduce(f64::max)
    }

    pub(crate) fn count(&self, key: &str) -> u32 {
        self.trace.numeric_values(key).count() as u32
    }

    pub(crate) fn count_name(&self, name: &str) -> u32 {
        self.trace.spans.iter().filter(|s| s.name == name).count() as u32
    }

    pub(crate) fn otlp_bytes(&self) -> Vec<u8> {
        crate::otlp::encode(&self.trace)
    }
}
