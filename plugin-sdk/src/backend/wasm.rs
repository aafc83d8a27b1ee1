//! The Wasm backend: every method is one call into the host's `trace`
//! interface (the trace being decided), with the generated binding types
//! converted to the SDK's.

use crate::bindings::tailgate::policy::trace as imp;
use crate::bindings::tailgate::policy::types as wit;
use crate::types::{AttrValue, DictColumn, SpanKind, StatusCode, Summary};

/// The trace the host is deciding. The host's functions read it only during
/// `decide`; the SDK creates a `Backend` only there (see `__private::decide`).
pub(crate) struct Backend;

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
    pub(crate) fn summary(&self) -> Summary {
        summary_from_wit(imp::summary())
    }

    pub(crate) fn services(&self) -> Vec<String> {
        imp::services()
    }

    pub(crate) fn trace_id(&self) -> (u64, u64) {
        imp::trace_id()
    }

    pub(crate) fn name(&self, i: u32) -> String {
        imp::name(i)
    }

    pub(crate) fn kind(&self, i: u32) -> SpanKind {
        match imp::kind(i) {
            wit::SpanKind::Unspecified => SpanKind::Unspecified,
            wit::SpanKind::Internal => SpanKind::Internal,
            wit::SpanKind::Server => SpanKind::Server,
            wit::SpanKind::Client => SpanKind::Client,
            wit::SpanKind::Producer => SpanKind::Producer,
            wit::SpanKind::Consumer => SpanKind::Consumer,
        }
    }

    pub(crate) fn status(&self, i: u32) -> StatusCode {
        status(imp::status(i))
    }

    pub(crate) fn status_message(&self, i: u32) -> String {
        imp::status_message(i)
    }

    pub(crate) fn start_ns(&self, i: u32) -> u64 {
        imp::start_ns(i)
    }

    pub(crate) fn end_ns(&self, i: u32) -> u64 {
        imp::end_ns(i)
    }

    pub(crate) fn duration_ns(&self, i: u32) -> u64 {
        imp::duration_ns(i)
    }

    pub(crate) fn parent(&self, i: u32) -> Option<u32> {
        imp::parent(i)
    }

    pub(crate) fn missing_parent(&self, i: u32) -> bool {
        imp::missing_parent(i)
    }

    pub(crate) fn span_id(&self, i: u32) -> u64 {
        imp::span_id(i)
    }

    pub(crate) fn trace_state(&self, i: u32) -> Option<String> {
        imp::trace_state(i)
    }

    pub(crate) fn service(&self, i: u32) -> String {
        imp::service(i)
    }

    pub(crate) fn attr(&self, i: u32, key: &str) -> Option<AttrValue> {
        imp::attr(i, key).map(attr_from_wit)
    }

    pub(crate) fn resource_attr(&self, i: u32, key: &str) -> Option<AttrValue> {
        imp::resource_attr(i, key).map(attr_from_wit)
    }

    pub(crate) fn durations(&self) -> Vec<u64> {
        imp::durations()
    }

    pub(crate) fn statuses(&self) -> Vec<StatusCode> {
        imp::statuses().into_iter().map(status).collect()
    }

    pub(crate) fn parents(&self) -> Vec<Option<u32>> {
        imp::parents()
    }

    pub(crate) fn attr_column(&self, key: &str) -> Vec<Option<AttrValue>> {
        imp::attr_column(key)
            .into_iter()
            .map(|v| v.map(attr_from_wit))
            .collect()
    }

    pub(crate) fn attr_column_dict(&self, key: &str) -> DictColumn {
        let wit::DictColumn { values, codes } = imp::attr_column_dict(key);
        DictColumn::new(values.into_iter().map(attr_from_wit).collect(), codes)
    }

    pub(crate) fn string_attrs(&self, min_len: u32) -> Vec<(u32, String, String)> {
        imp::string_attrs(min_len)
    }

    pub(crate) fn sum(&self, key: &str) -> f64 {
        imp::sum(key)
    }

    pub(crate) fn max(&self, key: &str) -> Option<f64> {
        imp::max(key)
    }

    pub(crate) fn count(&self, key: &str) -> u32 {
        imp::count(key)
    }

    pub(crate) fn count_name(&self, name: &str) -> u32 {
        imp::count_name(name)
    }

    pub(crate) fn otlp_bytes(&self) -> Vec<u8> {
        imp::otlp_bytes()
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
