//! Holding and checking a verdict's edits before any of them touches a trace.
//!
//! A policy asks for edits during `decide` (`trace.patch`, `trace.remove-span`); the host
//! holds them in [`PendingEdits`], within the policy's caps, and checks them with the verdict
//! once the call has returned normally.
//!
//! All or nothing: one bad patch or removal (index out of range, empty key, a removal of a
//! span that has children, too many patches or bytes, a `json` value that is not an array or
//! object) rejects every edit of that verdict, so the trace stays as it arrived.

use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, KeyValue, KeyValueList, any_value,
};
use prost::Message;

use super::bindings::tailgate::policy::types::{AttrValue, PatchTarget};
use crate::config::PolicyConfig;
use crate::decide::TraceEdit;
use crate::trace::BufferedSpan;

/// Longest attribute key a policy may write.
const MAX_KEY_BYTES: usize = 256;

/// One attribute write a policy asked for.
pub(crate) struct Patch {
    pub(crate) target: PatchTarget,
    pub(crate) key: String,
    pub(crate) value: AttrValue,
}

/// The edits of the `decide` call under way.
#[derive(Default)]
pub(crate) struct PendingEdits {
    pub(crate) patches: Vec<Patch>,
    pub(crate) removals: Vec<u32>,
    /// Why the call's edits are already known to be invalid: it asked for more than the caps
    /// allow. Nothing past that point is held.
    pub(crate) refused: Option<String>,
    /// The patches' keys and text values so far, in bytes: what the host holds. The exact
    /// encoded size is checked against `max_patch_bytes` by [`validate`]; holding stops at
    /// twice that, since raw JSON text may shrink when encoded.
    bytes: usize,
}

impl PendingEdits {
    pub(crate) fn push_patch(&mut self, patch: Patch, max_patches: usize, max_bytes: usize) {
        if self.refused.is_some() {
            return;
        }
        if self.patches.len() >= max_patches {
            return self.refuse(format!("more than max_patches = {max_patches} patches"));
        }
        self.bytes += patch.key.len() + value_bytes(&patch.value);
        if self.bytes > max_bytes.saturating_mul(2) {
            return self.refuse(format!(
                "patches take more than max_patch_bytes = {max_bytes} bytes"
            ));
        }
        self.patches.push(patch);
    }

    pub(crate) fn push_removal(&mut self, span: u32, span_count: usize) {
        if self.refused.is_some() {
            return;
        }
        if self.removals.len() >= span_count {
            return self.refuse(format!(
                "more span removals than the trace's {span_count} spans"
            ));
        }
        self.removals.push(span);
    }

    fn refuse(&mut self, why: String) {
        self.refused = Some(why);
        self.patches = Vec::new();
        self.removals = Vec::new();
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.patches.is_empty() && self.removals.is_empty() && self.refused.is_none()
    }
}

/// A value's variable-size payload in bytes (scalars are bounded by the patch count).
fn value_bytes(v: &AttrValue) -> usize {
    match v {
        AttrValue::Str(s) | AttrValue::Json(s) => s.len(),
        AttrValue::Bytes(b) => b.len(),
        AttrValue::Int(_) | AttrValue::Double(_) | AttrValue::Boolean(_) => 0,
    }
}

/// The trace edits `pending` stands for, or why none of them may be applied. A verdict whose
/// `probability` is out of (0, 1] gets none either.
pub(crate) fn validate(
    pending: &PendingEdits,
    probability: Option<f64>,
    spans: &[BufferedSpan],
    is_leaf: &[bool],
    spec: &PolicyConfig,
) -> Result<Vec<TraceEdit>, String> {
    if let Some(why) = &pending.refused {
        return Err(why.clone());
    }
    if pending.patches.is_empty() && pending.removals.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(p) = probability
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(format!("probability {p} is not in (0, 1]"));
    }
    if pending.patches.len() > spec.max_patches {
        return Err(format!(
            "{} patches, more than max_patches = {}",
            pending.patches.len(),
            spec.max_patches
        ));
    }
    let in_range = |i: u32| -> Result<(), String> {
        if (i as usize) < spans.len() {
            Ok(())
        } else {
            Err(format!(
                "span index {i} out of range: the trace has {} spans",
                spans.len()
            ))
        }
    };
    let mut bytes = 0usize;
    let mut edits = Vec::with_capacity(pending.patches.len() + pending.removals.len());
    for patch in &pending.patches {
        if patch.key.is_empty() || patch.key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "patch key of {} bytes (must be 1..={MAX_KEY_BYTES})",
                patch.key.len()
            ));
        }
        let attribute = KeyValue {
            key: patch.key.clone(),
            value: Some(
                any_value_of(&patch.value).map_err(|e| format!("patch {:?}: {e}", patch.key))?,
            ),
            key_strindex: 0,
        };
        bytes += attribute.encoded_len();
        if bytes > spec.max_patch_bytes.bytes() {
            return Err(format!(
                "patches take more than max_patch_bytes = {} bytes",
                spec.max_patch_bytes.0
            ));
        }
        match patch.target {
            PatchTarget::Span(i) => {
                in_range(i)?;
                let mut kv = Vec::with_capacity(attribute.encoded_len() + 4);
                // Span.attributes is field 9, length-delimited: appending an entry is merging.
                prost::encoding::encode_key(9, prost::encoding::WireType::LengthDelimited, &mut kv);
                prost::encoding::encode_varint(attribute.encoded_len() as u64, &mut kv);
                attribute.encode_raw(&mut kv);
                edits.push(TraceEdit::SpanAttribute {
                    span: i,
                    key: patch.key.clone(),
                    kv,
                });
            }
            PatchTarget::ResourceOf(i) => {
                in_range(i)?;
                edits.push(TraceEdit::ResourceAttribute { span: i, attribute });
            }
        }
    }
    for &i in &pending.removals {
        in_range(i)?;
        if !is_leaf.get(i as usize).copied().unwrap_or(false) {
            return Err(format!(
                "span {i} has children; only leaf spans can be removed"
            ));
        }
        edits.push(TraceEdit::RemoveSpan(i));
    }
    Ok(edits)
}

fn any_value_of(v: &AttrValue) -> Result<AnyValue, String> {
    use any_value::Value;
    let value = match v {
        AttrValue::Str(s) => Value::StringValue(s.clone()),
        AttrValue::Int(i) => Value::IntValue(*i),
        AttrValue::Double(d) => Value::DoubleValue(*d),
        AttrValue::Boolean(b) => Value::BoolValue(*b),
        AttrValue::Bytes(b) => Value::BytesValue(b.clone()),
        AttrValue::Json(text) => {
            let json: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("invalid json value: {e}"))?;
            match json {
                serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                    return Ok(json_to_any(&json, 0));
                }
                _ => return Err("a json value must be an array or an object".into()),
            }
        }
    };
    Ok(AnyValue { value: Some(value) })
}

fn json_to_any(json: &serde_json::Value, depth: u32) -> AnyValue {
    use any_value::Value;
    // The receiver refuses AnyValue nesting of 32 and deeper; keep what we write below that.
    if depth >= 30 {
        return AnyValue { value: None };
    }
    let value = match json {
        serde_json::Value::Null => None,
        serde_json::Value::Bool(b) => Some(Value::BoolValue(*b)),
        serde_json::Value::Number(n) => Some(match n.as_i64() {
            Some(i) => Value::IntValue(i),
            None => Value::DoubleValue(n.as_f64().unwrap_or(f64::NAN)),
        }),
        serde_json::Value::String(s) => Some(Value::StringValue(s.clone())),
        serde_json::Value::Array(items) => Some(Value::ArrayValue(ArrayValue {
            values: items.iter().map(|i| json_to_any(i, depth + 1)).collect(),
        })),
        serde_json::Value::Object(map) => Some(Value::KvlistValue(KeyValueList {
            values: map
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: Some(json_to_any(v, depth + 1)),
                    key_strindex: 0,
                })
                .collect(),
        })),
    };
    AnyValue { value }
}

/// For the fuzz target (`host/fuzz`, target `edits`): builds a trace and a verdict's edits from
/// any bytes, checks them as a policy's are checked, and applies what passes. Nothing may
/// panic, and a trace the edits were applied to must still be OTLP that prost decodes, with
/// every span that was not removed.
pub(crate) fn fuzz(data: &[u8]) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    /// Reads the fuzz bytes front to back; past the end every read is zero or empty.
    struct Bytes<'a>(&'a [u8]);
    impl<'a> Bytes<'a> {
        fn byte(&mut self) -> u8 {
            let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
            self.0 = rest;
            b
        }
        fn take(&mut self, n: usize) -> &'a [u8] {
            let (taken, rest) = self.0.split_at(n.min(self.0.len()));
            self.0 = rest;
            taken
        }
        fn text(&mut self) -> String {
            let n = self.byte() as usize;
            String::from_utf8_lossy(self.take(n)).into_owned()
        }
    }

    let mut b = Bytes(data);
    let count = b.byte() as usize % 8 + 1;
    let parents: Vec<Option<usize>> = (0..count)
        .map(|i| {
            let p = b.byte() as usize % (i + 1);
            (p < i).then_some(p)
        })
        .collect();
    let spans: Vec<Span> = (0..count)
        .map(|i| Span {
            trace_id: vec![7; 16],
            span_id: (i as u64 + 1).to_be_bytes().to_vec(),
            parent_span_id: parents[i]
                .map_or(Vec::new(), |p| (p as u64 + 1).to_be_bytes().to_vec()),
            name: format!("span-{i}"),
            attributes: vec![KeyValue {
                key: "k".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("v".into())),
                }),
                key_strindex: 0,
            }],
            ..Default::default()
        })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let mut trace: Vec<BufferedSpan> = Vec::new();
    crate::otlp::spans::for_each_span(&request.encode_to_vec(), |_, span, _| trace.push(span))
        .expect("the fuzz trace parses");
    let is_leaf: Vec<bool> = (0..count).map(|i| !parents.contains(&Some(i))).collect();

    let mut pending = PendingEdits::default();
    let edits = b.byte() as usize % 16;
    for _ in 0..edits {
        let kind = b.byte();
        let index = u32::from(b.byte() % 10);
        if kind % 5 == 4 {
            pending.push_removal(index, count);
            continue;
        }
        let target = if kind & 8 == 0 {
            PatchTarget::Span(index)
        } else {
            PatchTarget::ResourceOf(index)
        };
        let key = b.text();
        let value = match kind % 5 {
            0 => AttrValue::Str(b.text()),
            1 => AttrValue::Int(i64::from(b.byte()) - 128),
            2 => AttrValue::Json(b.text()),
            _ => AttrValue::Bytes(b.take(b.0.len().min(4)).to_vec()),
        };
        pending.push_patch(Patch { target, key, value }, 8, 512);
    }
    let mut spec = crate::config::Config::parse(
        "[[policies]]\nname = \"fuzz\"\nplugin = \"keep-errors\"\nmax_patches = 8\nmax_patch_bytes = 512\n",
        "fuzz.toml",
    )
    .expect("the fuzz policy's config parses")
    .policies
    .remove(0);
    spec.max_patches = 8;
    let Ok(edits) = validate(&pending, None, &trace, &is_leaf, &spec) else {
        return;
    };
    let removed: std::collections::BTreeSet<u32> = edits
        .iter()
        .filter_map(|e| match e {
            TraceEdit::RemoveSpan(i) => Some(*i),
            _ => None,
        })
        .collect();
    let decision = crate::decide::Decision {
        keep: true,
        policy: "fuzz".into(),
        reason: "fuzz".into(),
        probability: None,
        edits,
    };
    crate::decide::apply(&decision, &mut trace);
    let encoded = crate::otlp::regroup::encode_grouped(trace.iter().map(|s| (s, &[][..])));
    let decoded = ExportTraceServiceRequest::decode(encoded.as_slice())
        .unwrap_or_else(|e| panic!("an edited trace prost refuses: {e}"));
    let spans: usize = (decoded.resource_spans.iter().flat_map(|r| &r.scope_spans))
        .map(|s| s.spans.len())
        .sum();
    assert_eq!(
        spans,
        count - removed.len(),
        "spans left after {removed:?} were removed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(span: u32, key: &str, value: &str) -> Patch {
        Patch {
            target: PatchTarget::Span(span),
            key: key.into(),
            value: AttrValue::Str(value.into()),
        }
    }

    #[test]
    fn pending_edits_past_a_cap_are_refused_whole_and_not_held() {
        let mut count = PendingEdits::default();
        for i in 0..3 {
            count.push_patch(patch(i, "k", "v"), 2, 1 << 20);
        }
        assert!(count.patches.is_empty() && !count.is_empty());
        let why = count.refused.clone().unwrap();
        assert!(why.contains("max_patches = 2"), "{why}");
        // Nothing more is held once refused.
        count.push_patch(patch(0, "k", "v"), 2, 1 << 20);
        count.push_removal(0, 10);
        assert!(count.patches.is_empty() && count.removals.is_empty());

        // Held up to twice the cap (JSON text may encode smaller); `validate` checks the cap.
        let mut bytes = PendingEdits::default();
        bytes.push_patch(patch(0, "k", &"v".repeat(1200)), 8, 1000);
        assert_eq!(bytes.patches.len(), 1);
        bytes.push_patch(patch(1, "k", &"v".repeat(900)), 8, 1000);
        assert!(bytes.patches.is_empty());
        assert!(bytes.refused.unwrap().contains("max_patch_bytes = 1000"));

        let mut removals = PendingEdits::default();
        for i in 0..4 {
            removals.push_removal(i, 3);
        }
        assert!(removals.removals.is_empty());
        assert!(removals.refused.unwrap().contains("3 spans"));

        let mut fine = PendingEdits::default();
        assert!(fine.is_empty());
        fine.push_patch(patch(0, "k", "v"), 2, 1 << 20);
        fine.push_removal(1, 3);
        assert_eq!((fine.patches.len(), fine.removals.len()), (1, 1));
        assert!(fine.refused.is_none());
    }

    #[test]
    fn edits_are_refused_whole_with_an_invalid_probability_or_any_bad_edit() {
        let spec: PolicyConfig = toml::from_str("name = \"p\"\nplugin = \"keep-errors\"").unwrap();
        let header = std::sync::Arc::new(crate::trace::ScopeHeader {
            resource: std::sync::Arc::new(crate::trace::ResourceHeader {
                fields: Box::new([]),
                resource: Box::new([]),
                service: std::sync::Arc::from("svc"),
            }),
            fields: Box::new([]),
        });
        let span = BufferedSpan {
            bytes: Box::new([]),
            scope: header,
            span_id: [1; 8],
            parent_span_id: [0; 8],
            start_unix_nano: 0,
            end_unix_nano: 1,
            status_code: 0,
            kind: 1,
            has_trace_state: false,
        };
        let spans = [span.clone(), span];
        let is_leaf = [false, true];
        let mut pending = PendingEdits::default();
        pending.push_patch(patch(0, "k", "v"), 8, 1 << 20);
        pending.push_removal(1, 2);
        let ok = validate(&pending, Some(0.5), &spans, &is_leaf, &spec).unwrap();
        assert_eq!(ok.len(), 2);
        for p in [0.0, 1.5, f64::NAN] {
            let why = validate(&pending, Some(p), &spans, &is_leaf, &spec).unwrap_err();
            assert!(why.contains("probability"), "{why}");
        }
        // One bad edit (a removal of a span with children) and none apply.
        pending.push_removal(0, 2);
        let why = validate(&pending, None, &spans, &is_leaf, &spec).unwrap_err();
        assert!(why.contains("span 0 has children"), "{why}");
    }
}
