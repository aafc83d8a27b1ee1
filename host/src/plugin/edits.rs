//! Checking a verdict's edits before any of them touches a trace.
//!
//! All or nothing: one bad patch or removal (index out of range, empty key, a removal of a
//! span that has children, too many patches or bytes, a `json` value that is not an array or
//! object) rejects every edit of that verdict, so the trace stays as it arrived.

use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, KeyValue, KeyValueList, any_value,
};
use prost::Message;

use super::bindings::tailgate::policy::types::{AttrValue, PatchTarget, Verdict};
use crate::buffer::BufferedSpan;
use crate::config::PolicyConfig;
use crate::decide::TraceEdit;

/// Longest attribute key a policy may write.
const MAX_KEY_BYTES: usize = 256;

pub fn validate(
    verdict: &Verdict,
    spans: &[BufferedSpan],
    is_leaf: &[bool],
    spec: &PolicyConfig,
) -> Result<Vec<TraceEdit>, String> {
    if verdict.patches.is_empty() && verdict.remove_spans.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(p) = verdict.probability
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(format!("probability {p} is not in (0, 1]"));
    }
    if verdict.patches.len() > spec.max_patches {
        return Err(format!(
            "{} patches, more than max_patches = {}",
            verdict.patches.len(),
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
    let mut edits = Vec::with_capacity(verdict.patches.len() + verdict.remove_spans.len());
    for patch in &verdict.patches {
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
    for &i in &verdict.remove_spans {
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
