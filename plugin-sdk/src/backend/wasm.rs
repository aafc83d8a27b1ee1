//! The Wasm backend: every method is one call into the host's `trace`
//! resource, with the generated binding types converted to the SDK's.

use std::mem::ManuallyDrop;

use crate::bindings::tailgate::policy::types as wit;
use crate::types::{AttrValue, DictColumn, SpanKind, StatusCode, Summary};

pub(crate) struct Backend {
    // A second handle object for the *borrowed* resource that `decide`
    // received. Never dropped: dropping would end the borrow a second time
    // (wit-bindgen's generated code ends it when `decide` returns).
    raw: ManuallyDrop<wit::Trace>,
}

/// The SDK's summary from the binding's record.
pub(crate) fn summary_from_wit(s: wit::Summary) -> Summary {
    Summary {
        span_count: s.span_count,
        error_count: s.error_count,
        duration_ns: s.duration_ns,
        root: s.root,
        service_count: s.service_count,
        orphan_count: s.orphan_count,
    }
}

impl Backend {
    /// # Safety
    /// The returned backend must not outlive the `decide` call that lent `t`.
    /// The SDK guarantees this by creating the `Trace` inside its export shim
    /// and only handing out `&Trace`.
    pub(crate) unsafe fn borrowed(t: &wit::Trace) -> Self {
        Backend {
            raw: ManuallyDrop::new(unsafe { wit::Trace::from_handle(t.handle()) }),
        }
    }

    pub(crate) fn summary(&self) -> Summary {
        summary_from_wit(self.raw.summary())
    }

    pub(crate) fn services(&self) -> Vec<String> {
        self.raw.services()
    }

    pub(crate) fn trace_id(&self) -> (u64, u64) {
        self.raw.trace_id()
    }

    pub(crate) fn name(&self, i: u32) -> String {
        self.raw.name(i)
    }

    pub(crate) fn kind(&self, i: u32) -> SpanKind {
        match self.raw.kind(i) {
            wit::SpanKind::Unspecified => SpanKind::Unspecified,
            wit::SpanKind::Internal => SpanKind::Internal,
            wit::SpanKind::Server => SpanKind::Server,
            wit::SpanKind::Client => SpanKind::Client,
            wit::SpanKind::Producer => SpanKind::Producer,
            wit::SpanKind::Consumer => SpanKind::Consumer,
        }
    }

    pub(crate) fn status(&self, i: u32) -> StatusCode {
        status(self.raw.status(i))
    }

    pub(crate) fn status_message(&self, i: u32) -> String {
        self.raw.status_message(i)
    }

    pub(crate) fn start_ns(&self, i: u32) -> u64 {
        self.raw.start_ns(i)
    }

    pub(crate) fn end_ns(&self, i: u32) -> u64 {
        self.raw.end_ns(i)
    }

    pub(crate) fn duration_ns(&self, i: u32) -> u64 {
        self.raw.duration_ns(i)
    }

    pub(crate) fn parent(&self, i: u32) -> Option<u32> {
        self.raw.parent(i)
    }

    pub(crate) fn missing_parent(&self, i: u32) -> bool {
        self.raw.missing_parent(i)
    }

    pub(crate) fn span_id(&self, i: u32) -> u64 {
        self.raw.span_id(i)
    }

    pub(crate) fn trace_state(&self, i: u32) -> Option<String> {
        self.raw.trace_state(i)
    }

    pub(crate) fn service(&self, i: u32) -> String {
        self.raw.service(i)
    }

    pub(crate) fn attr(&self, i: u32, key: &str) -> Option<AttrValue> {
        self.raw.attr(i, key).map(attr_from_wit)
    }

    pub(crate) fn resource_attr(&self, i: u32, key: &str) -> Option<AttrValue> {
        self.raw.resource_attr(i, key).map(attr_from_wit)
    }

    pub(crate) fn durations(&self) -> Vec<u64> {
        self.raw.durations()
    }

    pub(crate) fn statuses(&self) -> Vec<StatusCode> {
        self.raw.statuses().into_iter().map(status).collect()
    }

    pub(crate) fn parents(&self) -> Vec<Option<u32>> {
        self.raw.parents()
    }

    pub(crate) fn attr_column(&self, key: &str) -> Vec<Option<AttrValue>> {
        self.raw
            .attr_column(key)
            .into_iter()
            .map(|v| v.map(attr_from_wit))
            .collect()
    }

    pub(crate) fn attr_column_dict(&self, key: &str) -> DictColumn {
        let wit::DictColumn { values, codes } = self.raw.attr_column_dict(key);
        DictColumn::new(values.into_iter().map(attr_from_wit).collect(), codes)
    }

    pub(crate) fn string_attrs(&self, min_len: u32) -> Vec<(u32, String, String)> {
        self.raw.string_attrs(min_len)
    }

    pub(crate) fn sum(&self, key: &str) -> f64 {
        self.raw.sum(key)
    }

    pub(crate) fn max(&self, key: &str) -> Option<f64> {
        self.raw.max(key)
    }

    pub(crate) fn count(&self, key: &str) -> u32 {
        self.raw.count(key)
    }

    pub(crate) fn count_name(&self, name: &str) -> u32 {
        self.raw.count_name(name)
    }

    pub(crate) fn otlp_bytes(&self) -> Vec<u8> {
        self.raw.otlp_bytes()
    }
}

fn status(s: wit::StatusCode) -> StatusCode {
    match s {
        wit::StatusCode::Unset => StatusCode::Unset,
        wit::StatusCode::Ok => StatusCode::Ok,
        wit::StatusCode::Error => StatusCode::Error,
    }
}

pub(crate) fn attr_from_wit(v: wit::AttrValue) -> AttrValue {
    match v {
        wit::AttrValue::Str(s) => AttrValue::Str(s),
        wit::AttrValue::Int(i) => AttrValue::Int(i),
        wit::AttrValue::Double(d) => AttrValue::Double(d),
        wit::AttrValue::Boolean(b) => AttrValue::Bool(b),
        wit::AttrValue::Bytes(b) => AttrValue::Bytes(b),
        wit::AttrValue::Json(j) => AttrValue::Json(j),
    }
}

pub(crate) fn attr_to_wit(v: AttrValue) -> wit::AttrValue {
    match v {
        AttrValue::Str(s) => wit::AttrValue::Str(s),
        AttrValue::Int(i) => wit::AttrValue::Int(i),
        AttrValue::Double(d) => wit::AttrValue::Double(d),
        AttrValue::Bool(b) => wit::AttrValue::Boolean(b),
        AttrValue::Bytes(b) => wit::AttrValue::Bytes(b),
        AttrValue::Json(j) => wit::AttrValue::Json(j),
    }
}
