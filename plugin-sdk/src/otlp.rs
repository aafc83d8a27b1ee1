//! A minimal OTLP protobuf encoder for the native backend, so that
//! `trace.otlp_bytes()` in a unit test returns real `TracesData` bytes (what
//! the host sends), not a stub. Hand-written to keep the SDK free of protobuf
//! dependencies; only encoding, only the fields the builder can set.

use crate::backend::native::{MemResource, MemSpan, MemTrace};
use crate::types::{AttrValue, SpanKind, StatusCode};

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from((field << 3) | wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Writes a length-delimited sub-message built by `f`.
fn message(out: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    let mut buf = Vec::new();
    f(&mut buf);
    bytes_field(out, field, &buf);
}

fn any_value_json(out: &mut Vec<u8>, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => {}
        Value::Bool(b) => {
            tag(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        Value::Number(n) => match n.as_i64() {
            Some(i) => {
                tag(out, 3, VARINT);
                varint(out, i as u64);
            }
            None => {
                tag(out, 4, FIXED64);
                out.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_le_bytes());
            }
        },
        Value::String(s) => bytes_field(out, 1, s.as_bytes()),
        Value::Array(items) => message(out, 5, |arr| {
            for item in items {
                message(arr, 1, |av| any_value_json(av, item));
            }
        }),
        Value::Object(map) => message(out, 6, |kvl| {
            for (k, item) in map {
                message(kvl, 1, |kv| {
                    bytes_field(kv, 1, k.as_bytes());
                    message(kv, 2, |av| any_value_json(av, item));
                });
            }
        }),
    }
}

fn any_value(out: &mut Vec<u8>, v: &AttrValue) {
    match v {
        AttrValue::Str(s) => bytes_field(out, 1, s.as_bytes()),
        AttrValue::Bool(b) => {
            tag(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        AttrValue::Int(i) => {
            tag(out, 3, VARINT);
            varint(out, *i as u64);
        }
        AttrValue::Double(d) => {
            tag(out, 4, FIXED64);
            out.extend_from_slice(&d.to_le_bytes());
        }
        AttrValue::Bytes(b) => bytes_field(out, 7, b),
        // Arrays and kvlists travel as JSON in the WIT; turn them back into
        // OTLP values as the contract describes. Text that is not JSON is
        // kept as a string rather than lost.
        AttrValue::Json(j) => match serde_json::from_str::<serde_json::Value>(j) {
            Ok(v) => any_value_json(out, &v),
            Err(_) => bytes_field(out, 1, j.as_bytes()),
        },
    }
}

fn key_values(out: &mut Vec<u8>, field: u32, attrs: &[(String, AttrValue)]) {
    for (k, v) in attrs {
        message(out, field, |kv| {
            bytes_field(kv, 1, k.as_bytes());
            message(kv, 2, |av| any_value(av, v));
        });
    }
}

fn span(out: &mut Vec<u8>, trace_id: &[u8; 16], s: &MemSpan) {
    bytes_field(out, 1, trace_id);
    bytes_field(out, 2, &s.span_id);
    if !s.trace_state.is_empty() {
        bytes_field(out, 3, s.trace_state.as_bytes());
    }
    if let Some(p) = &s.parent_span_id {
        bytes_field(out, 4, p);
    }
    bytes_field(out, 5, s.name.as_bytes());
    let kind = match s.kind {
        SpanKind::Unspecified => 0,
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    if kind != 0 {
        tag(out, 6, VARINT);
        varint(out, kind);
    }
    tag(out, 7, FIXED64);
    out.extend_from_slice(&s.start_ns.to_le_bytes());
    tag(out, 8, FIXED64);
    out.extend_from_slice(&s.end_ns.to_le_bytes());
    key_values(out, 9, &s.attrs);
    let code = match s.status {
        StatusCode::Unset => 0,
        StatusCode::Ok => 1,
        StatusCode::Error => 2,
    };
    if code != 0 || !s.status_message.is_empty() {
        message(out, 15, |st| {
            if !s.status_message.is_empty() {
                bytes_field(st, 2, s.status_message.as_bytes());
            }
            if code != 0 {
                tag(st, 3, VARINT);
                varint(st, code);
            }
        });
    }
}

/// Encodes the trace as `opentelemetry.proto.trace.v1.TracesData`: one
/// `ResourceSpans` per resource (in order of first use), each with a single
/// `ScopeSpans` with an empty scope.
pub(crate) fn encode(t: &MemTrace) -> Vec<u8> {
    let mut out = Vec::new();
    for (ri, res) in t.resources.iter().enumerate() {
        let spans: Vec<&MemSpan> = t.spans.iter().filter(|s| s.resource == ri).collect();
        if spans.is_empty() {
            continue;
        }
        message(&mut out, 1, |rs| {
            resource(rs, res);
            message(rs, 2, |ss| {
                message(ss, 1, |_scope| {});
                for s in spans {
                    message(ss, 2, |sp| span(sp, &t.trace_id, s));
                }
            });
        });
    }
    out
}

fn resource(out: &mut Vec<u8>, r: &MemResource) {
    message(out, 1, |res| key_values(res, 1, &r.attrs));
}
