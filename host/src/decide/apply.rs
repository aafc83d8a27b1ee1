//! Applying a kept trace's decision to its spans: validated policy edits (attribute writes,
//! leaf removals) and the OTel `th` threshold for a sampling probability below 1.
//!
//! Runs once per kept trace, on the worker, before export. Spans not touched keep their bytes
//! as received; a touched span is rewritten once.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;

use super::{Decision, TraceEdit};
use crate::otlp::wire;
use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader};

/// Applies the edits and the threshold; returns how many spans were trimmed.
pub(crate) fn apply(decision: &Decision, spans: &mut Vec<BufferedSpan>) -> usize {
    let mut span_patches: HashMap<u32, Vec<(&str, &[u8])>> = HashMap::new();
    let mut resource_patches: HashMap<u32, Vec<&KeyValue>> = HashMap::new();
    let mut removals: Vec<u32> = Vec::new();
    let mut strip_strings = false;
    for edit in &decision.edits {
        match edit {
            TraceEdit::RemoveStringAttributes => strip_strings = true,
            TraceEdit::SpanAttribute { span, key, kv } => {
                span_patches.entry(*span).or_default().push((key, kv));
            }
            TraceEdit::ResourceAttribute { span, attribute } => {
                resource_patches.entry(*span).or_default().push(attribute);
            }
            TraceEdit::RemoveSpan(span) => removals.push(*span),
        }
    }
    if strip_strings {
        // First, so the patches of the enrichments that did run are kept.
        for span in spans.iter_mut() {
            let mut bytes = Vec::with_capacity(span.bytes.len());
            wire::rewrite_span_without_string_attributes(&span.bytes, &mut bytes);
            span.bytes = bytes.into_boxed_slice();
        }
    }
    for (i, patches) in span_patches {
        let Some(span) = spans.get_mut(i as usize) else {
            continue;
        };
        let keys: Vec<&str> = patches.iter().map(|(k, _)| *k).collect();
        let mut bytes = Vec::with_capacity(
            span.bytes.len() + patches.iter().map(|(_, kv)| kv.len()).sum::<usize>(),
        );
        wire::rewrite_span_without_keys(&span.bytes, &keys, &mut bytes);
        for (_, kv) in patches {
            bytes.extend_from_slice(kv);
        }
        span.bytes = bytes.into_boxed_slice();
    }
    for (i, attributes) in resource_patches {
        patch_resource(spans, i as usize, &attributes);
    }
    if let Some(p) = decision.probability.filter(|p| *p > 0.0 && *p < 1.0) {
        let th = threshold_hex(p);
        for span in spans.iter_mut() {
            let state = with_threshold(wire::span_trace_state(&span.bytes), &th);
            let mut bytes = span.bytes.to_vec();
            wire::append_trace_state(&mut bytes, &state);
            span.bytes = bytes.into_boxed_slice();
        }
    }
    removals.sort_unstable();
    removals.dedup();
    let mut index = 0u32;
    spans.retain(|_| {
        let keep = removals.binary_search(&index).is_err();
        index += 1;
        keep
    });
    removals.len()
}

/// Writes attributes on the resource of span `i`; every span of the trace that shares that
/// resource gets the new one. Other traces sharing the original are not affected.
fn patch_resource(spans: &mut [BufferedSpan], i: usize, attributes: &[&KeyValue]) {
    let Some(target) = spans.get(i) else { return };
    let old: Arc<ResourceHeader> = target.scope.resource.clone();
    let Ok(mut fields) = ResourceSpans::decode(&old.fields[..]) else {
        return;
    };
    let resource = fields.resource.get_or_insert_with(Default::default);
    for kv in attributes {
        resource.attributes.retain(|a| a.key != kv.key);
        resource.attributes.push((*kv).clone());
    }
    let new_resource = resource.encode_to_vec();
    let service = resource
        .attributes
        .iter()
        .find(|a| a.key == "service.name")
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                Some(Arc::from(s.as_str()))
            }
            _ => None,
        })
        .unwrap_or_else(|| old.service.clone());
    let header = Arc::new(ResourceHeader {
        fields: fields.encode_to_vec().into_boxed_slice(),
        resource: new_resource.into_boxed_slice(),
        service,
    });
    let mut scopes: HashMap<*const ScopeHeader, Arc<ScopeHeader>> = HashMap::new();
    for span in spans
        .iter_mut()
        .filter(|s| Arc::ptr_eq(&s.scope.resource, &old))
    {
        let scope = scopes
            .entry(Arc::as_ptr(&span.scope))
            .or_insert_with(|| {
                Arc::new(ScopeHeader {
                    resource: header.clone(),
                    fields: span.scope.fields.clone(),
                })
            })
            .clone();
        span.scope = scope;
    }
}

/// The OTel sampling threshold for probability `p`, as the `th` sub-key writes it: 56-bit
/// hex with trailing zeros removed (OTel pkg/sampling ProbabilityToThreshold).
pub(crate) fn threshold_hex(p: f64) -> String {
    const MAX: u64 = 1 << 56;
    // Subtract in integers: near 2^56 an f64 no longer holds every integer.
    let kept = ((p * MAX as f64).round() as u64).min(MAX);
    let t = MAX - kept;
    if t == 0 {
        return "0".into();
    }
    let hex = format!("{t:014x}");
    hex.trim_end_matches('0').to_owned()
}

/// A W3C tracestate with the `ot` entry's `th` sub-key set, other entries kept.
pub(crate) fn with_threshold(state: &str, th: &str) -> String {
    let mut ot_parts: Vec<String> = Vec::new();
    let mut others: Vec<&str> = Vec::new();
    for entry in state.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.strip_prefix("ot=") {
            Some(ot) => ot_parts.extend(
                ot.split(';')
                    .filter(|kv| !kv.is_empty() && !kv.starts_with("th:"))
                    .map(str::to_owned),
            ),
            None => others.push(entry),
        }
    }
    ot_parts.insert(0, format!("th:{th}"));
    // The W3C spec puts the most recently changed entry first.
    let mut out = format!("ot={}", ot_parts.join(";"));
    for o in others {
        out.push(',');
        out.push_str(o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_the_otel_examples() {
        // From the OTel probability sampling spec: 1/2 -> 8, 1/4 -> c, 1/10 -> e666…
        assert_eq!(threshold_hex(0.5), "8");
        assert_eq!(threshold_hex(0.25), "c");
        assert_eq!(threshold_hex(0.1), "e6666666666666");
        assert_eq!(threshold_hex(1.0), "0");
    }

    #[test]
    fn tracestate_keeps_other_vendors_and_other_ot_keys() {
        assert_eq!(with_threshold("", "8"), "ot=th:8");
        assert_eq!(
            with_threshold("ot=rv:abc;th:c,vendor=x", "8"),
            "ot=th:8;rv:abc,vendor=x"
        );
        assert_eq!(with_threshold("vendor=x", "c"), "ot=th:c,vendor=x");
    }
}
