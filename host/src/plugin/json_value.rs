//! OTLP array and key-value-list attribute values as the JSON text the WIT contract gives a
//! guest for them (see `attr-value.json` in `policy.wit`).

use base64::Engine as _;
use serde_json::{Map, Number, Value};

use crate::otlp::wire::{self, AnyValueRef};

/// Nesting beyond this is cut to `null`; the receiver already bounds nesting at 32.
const MAX_DEPTH: u32 = 32;

pub(crate) fn array_to_json(array: &[u8]) -> String {
    array_value(array, 0).to_string()
}

pub(crate) fn kvlist_to_json(list: &[u8]) -> String {
    kvlist_value(list, 0).to_string()
}

fn array_value(array: &[u8], depth: u32) -> Value {
    Value::Array(
        wire::array_values(array)
            .map(|v| to_json(v, depth + 1))
            .collect(),
    )
}

fn kvlist_value(list: &[u8], depth: u32) -> Value {
    let mut map = Map::new();
    for (k, v) in wire::kvlist_entries(list) {
        map.insert(k.to_owned(), to_json(v, depth + 1));
    }
    Value::Object(map)
}

fn to_json(v: AnyValueRef<'_>, depth: u32) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match v {
        AnyValueRef::Str(s) => Value::String(s.to_owned()),
        AnyValueRef::Bool(b) => Value::Bool(b),
        AnyValueRef::Int(i) => Value::Number(i.into()),
        AnyValueRef::Double(d) => Number::from_f64(d).map_or(Value::Null, Value::Number),
        AnyValueRef::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        AnyValueRef::Array(a) => array_value(a, depth),
        AnyValueRef::KvList(l) => kvlist_value(l, depth),
        AnyValueRef::Empty => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, KeyValue, KeyValueList, any_value::Value as V,
    };
    use prost::Message;

    use super::*;

    fn any(v: V) -> AnyValue {
        AnyValue { value: Some(v) }
    }

    #[test]
    fn arrays_and_kvlists_become_json() {
        let array = ArrayValue {
            values: vec![
                any(V::IntValue(3)),
                any(V::StringValue("a".into())),
                any(V::DoubleValue(f64::NAN)),
            ],
        };
        assert_eq!(array_to_json(&array.encode_to_vec()), r#"[3,"a",null]"#);
        let list = KeyValueList {
            values: vec![KeyValue {
                key: "k".into(),
                value: Some(any(V::ArrayValue(ArrayValue {
                    values: vec![any(V::BoolValue(true))],
                }))),
                key_strindex: 0,
            }],
        };
        assert_eq!(kvlist_to_json(&list.encode_to_vec()), r#"{"k":[true]}"#);
    }
}
