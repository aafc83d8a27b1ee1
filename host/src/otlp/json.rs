//! OTLP/JSON codec for the trace signal.
//!
//! This module owns the translation between OTLP/JSON bodies (`application/json` on
//! `/v1/traces`) and the prost types from `opentelemetry-proto`: decoding
//! `ExportTraceServiceRequest`, and encoding requests (for JSON exporters), export
//! responses and `google.rpc.Status` error bodies.
//!
//! It deliberately does not use `opentelemetry-proto`'s `with-serde` feature. That
//! feature rejects inputs the OpenTelemetry Collector accepts (enum names, `null`
//! fields, `"NaN"` doubles) and silently turns ids under snake_case keys into empty
//! ids. Since clients are tested against the Collector, we decode as leniently as it
//! does, and encode exactly as the OTLP/JSON spec says (hex ids, integer enums,
//! 64-bit integers as decimal strings) so that strict readers accept our output.
//!
//! Decoding goes through private serde mirror structs rather than a
//! `serde_json::Value` tree, so a body is parsed in one pass with no intermediate
//! DOM. Mirror fields already hold the final prost types wherever serde can produce
//! them, which makes the mirror-to-prost conversion a series of moves. serde_json
//! only reports line and column, so on the (cold) error path the body is rescanned up
//! to that position to recover the JSON path of the failing field.

use std::fmt::{self, Write as _};
use std::marker::PhantomData;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};

/// A body that could not be decoded, with an English message saying where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(pub String);

/// Decode an OTLP/JSON ExportTraceServiceRequest body.
///
/// Ids that are not valid hex decode to empty ids instead of failing the request,
/// so that id validation downstream rejects only the affected spans.
pub fn decode_traces(body: &[u8]) -> Result<ExportTraceServiceRequest, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    Strict::<RequestJson>::deserialize(&mut de)
        .and_then(|req| de.end().map(|()| req.0.into()))
        .map_err(|err| located_error(body, &err))
}

/// Why [`decode_traces_within`] did not decode a body.
#[derive(Debug)]
pub(crate) enum Undecoded {
    Malformed(JsonError),
    /// The body would decode into more than it is allowed; decoding stopped there.
    TooLarge(String),
}

/// [`decode_traces`] under an allowance, charged as each repeated element is decoded: at most
/// `max_bytes` of decoded messages (their struct sizes; strings and ids are bounded by the
/// body itself) and at most `max_spans` spans, or resource or scope blocks.
///
/// Without it the mirror-to-prost decoding is what a body costs: an empty span `{}` takes 3
/// bytes of JSON and becomes a 264-byte `Span`, so a 58 KB gzip body of 20 million of them
/// took 5 GB before any other limit applied.
pub(crate) fn decode_traces_within(
    body: &[u8],
    max_bytes: usize,
    max_spans: u64,
) -> Result<ExportTraceServiceRequest, Undecoded> {
    ALLOWANCE.with(|a| {
        a.set(Allowance {
            bytes: max_bytes,
            spans: max_spans,
            blocks: max_spans,
            over: None,
        })
    });
    let decoded = decode_traces(body);
    let left = ALLOWANCE.with(|a| a.replace(Allowance::UNLIMITED));
    match (decoded, left.over) {
        (Err(_), Some(over)) => Err(Undecoded::TooLarge(over.message(max_bytes, max_spans))),
        (decoded, _) => decoded.map_err(Undecoded::Malformed),
    }
}

/// What the request being decoded on this thread may still build (see
/// [`decode_traces_within`]). A thread-local because serde's derived visitors carry no state.
#[derive(Clone, Copy)]
struct Allowance {
    bytes: usize,
    spans: u64,
    blocks: u64,
    over: Option<Over>,
}

#[derive(Clone, Copy, Debug)]
enum Over {
    Bytes,
    Spans,
}

impl Over {
    fn message(self, max_bytes: usize, max_spans: u64) -> String {
        match self {
            Over::Bytes => format!(
                "the request decodes to more than {max_bytes} bytes; split it into smaller ones"
            ),
            Over::Spans => format!(
                "more than {max_spans} spans (or resource or scope blocks) in one request; \
                 split it into smaller ones"
            ),
        }
    }
}

impl Allowance {
    const UNLIMITED: Self = Self {
        bytes: usize::MAX,
        spans: u64::MAX,
        blocks: u64::MAX,
        over: None,
    };
}

thread_local! {
    static ALLOWANCE: std::cell::Cell<Allowance> = const { std::cell::Cell::new(Allowance::UNLIMITED) };
}

/// Charges one decoded element of type `T` to this thread's allowance.
fn charge<T: 'static, E: de::Error>() -> Result<(), E> {
    use std::any::TypeId;
    let over = ALLOWANCE.with(|cell| {
        let mut a = cell.get();
        let ty = TypeId::of::<T>();
        let counter = if ty == TypeId::of::<Span>() {
            Some(&mut a.spans)
        } else if ty == TypeId::of::<ResourceSpans>() || ty == TypeId::of::<ScopeSpans>() {
            Some(&mut a.blocks)
        } else {
            None
        };
        let over = match counter {
            Some(0) => Some(Over::Spans),
            Some(n) => {
                *n -= 1;
                None
            }
            None => None,
        }
        .or_else(|| match a.bytes.checked_sub(std::mem::size_of::<T>()) {
            Some(left) => {
                a.bytes = left;
                None
            }
            None => Some(Over::Bytes),
        });
        if over.is_some() {
            a.over = over;
        }
        cell.set(a);
        over
    });
    match over {
        Some(_) => Err(E::custom("request too large")),
        None => Ok(()),
    }
}

/// Encode as OTLP/JSON on one line (no trailing newline).
pub(crate) fn encode_traces(req: &ExportTraceServiceRequest) -> String {
    // JSON with hex ids and quoted integers runs at roughly twice the protobuf size;
    // sizing up front avoids repeatedly copying a large buffer while it grows.
    let mut out = String::with_capacity(prost::Message::encoded_len(req) * 2 + 32);
    let mut obj = Obj::open(&mut out);
    obj.list("resourceSpans", &req.resource_spans, write_resource_spans);
    obj.close();
    out
}

/// Encode an ExportTraceServiceResponse as OTLP/JSON ("{}" when partial_success is None).
pub(crate) fn encode_response(resp: &ExportTraceServiceResponse) -> String {
    let mut out = String::new();
    let mut obj = Obj::open(&mut out);
    obj.message(
        "partialSuccess",
        resp.partial_success.as_ref(),
        write_partial_success,
    );
    obj.close();
    out
}

/// Encode a google.rpc.Status body {"code":N,"message":"..."} (details omitted) for HTTP error responses.
///
/// Both fields are always written, even when default: readers accept either form,
/// and a body with a visible code is easier to debug for humans with curl.
pub(crate) fn encode_status(code: i32, message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 32);
    let _ = write!(out, "{{\"code\":{code},\"message\":");
    write_str(&mut out, message);
    out.push('}');
    out
}

// ---------------------------------------------------------------------------
// Error reporting
// ---------------------------------------------------------------------------

/// Caps the serde message, which quotes offending strings verbatim and would
/// otherwise let a client make us echo megabytes back.
const MAX_MESSAGE_CHARS: usize = 300;
/// Keys in the path are client-controlled too.
const MAX_KEY_CHARS: usize = 64;

fn located_error(body: &[u8], err: &serde_json::Error) -> JsonError {
    let (line, column) = (err.line(), err.column());
    let full = err.to_string();
    let message = if line == 0 {
        full.as_str()
    } else {
        full.strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(&full)
    };
    let message = truncate_chars(message, MAX_MESSAGE_CHARS);
    if line == 0 {
        return JsonError(message);
    }
    let path = json_path_at(body, byte_offset(body, line, column));
    if path.is_empty() {
        JsonError(format!("{message} (line {line} column {column})"))
    } else {
        JsonError(format!("{path}: {message} (line {line} column {column})"))
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or(s)),
        None => s.to_owned(),
    }
}

/// serde_json counts lines from 1 and columns as bytes consumed on that line.
fn byte_offset(body: &[u8], line: usize, column: usize) -> usize {
    let mut line_start = 0;
    for _ in 1..line {
        match body
            .get(line_start..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            Some(newline) => line_start += newline + 1,
            None => return body.len(),
        }
    }
    (line_start + column).min(body.len())
}

/// The path (`resourceSpans[0].scopeSpans[1].spans[4].name`) of the innermost value
/// open or just finished at `end`, from a tolerant structural scan of `body[..end]`.
/// Keys are reported as the client spelled them, so snake_case input gives
/// snake_case paths.
fn json_path_at(body: &[u8], end: usize) -> String {
    enum Frame {
        Object { key: Option<String>, want_key: bool },
        Array { index: usize },
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < end {
        let Some(&byte) = body.get(i) else { break };
        match byte {
            b'{' => stack.push(Frame::Object {
                key: None,
                want_key: true,
            }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { key, want_key }) => {
                    *key = None;
                    *want_key = true;
                }
                None => {}
            },
            b':' => {
                if let Some(Frame::Object { want_key, .. }) = stack.last_mut() {
                    *want_key = false;
                }
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while let Some(&c) = body.get(j) {
                    match c {
                        b'"' => break,
                        b'\\' => j += 2,
                        _ => j += 1,
                    }
                }
                if let Some(Frame::Object {
                    key,
                    want_key: true,
                }) = stack.last_mut()
                {
                    let raw = body.get(start..j.min(body.len())).unwrap_or_default();
                    *key = Some(truncate_chars(&String::from_utf8_lossy(raw), MAX_KEY_CHARS));
                }
                i = j;
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Object { key: None, .. } => {}
            Frame::Array { index } => {
                let _ = write!(path, "[{index}]");
            }
        }
    }
    path
}

// ---------------------------------------------------------------------------
// Decoding: mirror structs
// ---------------------------------------------------------------------------
//
// Every field is optional (`default`), `null` means default, unknown keys are
// ignored (no `deny_unknown_fields`), and each multi-word field accepts its proto
// snake_case name as an alias, as the Collector's decoder does.

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct RequestJson {
    #[serde(
        alias = "resource_spans",
        deserialize_with = "seq_into::<ResourceSpansJson, _, _>"
    )]
    resource_spans: Vec<ResourceSpans>,
}

impl From<RequestJson> for ExportTraceServiceRequest {
    fn from(j: RequestJson) -> Self {
        Self {
            resource_spans: j.resource_spans,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct ResourceSpansJson {
    #[serde(deserialize_with = "opt_into::<ResourceJson, _, _>")]
    resource: Option<Resource>,
    #[serde(
        alias = "scope_spans",
        deserialize_with = "seq_into::<ScopeSpansJson, _, _>"
    )]
    scope_spans: Vec<ScopeSpans>,
    #[serde(alias = "schema_url", deserialize_with = "nullable")]
    schema_url: String,
}

impl From<ResourceSpansJson> for ResourceSpans {
    fn from(j: ResourceSpansJson) -> Self {
        Self {
            resource: j.resource,
            scope_spans: j.scope_spans,
            schema_url: j.schema_url,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct ResourceJson {
    #[serde(deserialize_with = "seq_into::<KeyValueJson, _, _>")]
    attributes: Vec<KeyValue>,
    #[serde(alias = "dropped_attributes_count", deserialize_with = "int")]
    dropped_attributes_count: u32,
    #[serde(
        alias = "entity_refs",
        deserialize_with = "seq_into::<EntityRefJson, _, _>"
    )]
    entity_refs: Vec<EntityRef>,
}

impl From<ResourceJson> for Resource {
    fn from(j: ResourceJson) -> Self {
        Self {
            attributes: j.attributes,
            dropped_attributes_count: j.dropped_attributes_count,
            entity_refs: j.entity_refs,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct EntityRefJson {
    #[serde(alias = "schema_url", deserialize_with = "nullable")]
    schema_url: String,
    #[serde(deserialize_with = "nullable")]
    r#type: String,
    #[serde(
        alias = "id_keys",
        deserialize_with = "seq_into::<NullableString, _, _>"
    )]
    id_keys: Vec<String>,
    #[serde(
        alias = "description_keys",
        deserialize_with = "seq_into::<NullableString, _, _>"
    )]
    description_keys: Vec<String>,
}

impl From<EntityRefJson> for EntityRef {
    fn from(j: EntityRefJson) -> Self {
        Self {
            schema_url: j.schema_url,
            r#type: j.r#type,
            id_keys: j.id_keys,
            description_keys: j.description_keys,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct ScopeSpansJson {
    #[serde(deserialize_with = "opt_into::<ScopeJson, _, _>")]
    scope: Option<InstrumentationScope>,
    #[serde(deserialize_with = "seq_into::<SpanJson, _, _>")]
    spans: Vec<Span>,
    #[serde(alias = "schema_url", deserialize_with = "nullable")]
    schema_url: String,
}

impl From<ScopeSpansJson> for ScopeSpans {
    fn from(j: ScopeSpansJson) -> Self {
        Self {
            scope: j.scope,
            spans: j.spans,
            schema_url: j.schema_url,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct ScopeJson {
    #[serde(deserialize_with = "nullable")]
    name: String,
    #[serde(deserialize_with = "nullable")]
    version: String,
    #[serde(deserialize_with = "seq_into::<KeyValueJson, _, _>")]
    attributes: Vec<KeyValue>,
    #[serde(alias = "dropped_attributes_count", deserialize_with = "int")]
    dropped_attributes_count: u32,
}

impl From<ScopeJson> for InstrumentationScope {
    fn from(j: ScopeJson) -> Self {
        Self {
            name: j.name,
            version: j.version,
            attributes: j.attributes,
            dropped_attributes_count: j.dropped_attributes_count,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct SpanJson {
    #[serde(alias = "trace_id", deserialize_with = "hex_id")]
    trace_id: Vec<u8>,
    #[serde(alias = "span_id", deserialize_with = "hex_id")]
    span_id: Vec<u8>,
    #[serde(alias = "trace_state", deserialize_with = "nullable")]
    trace_state: String,
    #[serde(alias = "parent_span_id", deserialize_with = "hex_id")]
    parent_span_id: Vec<u8>,
    #[serde(deserialize_with = "int")]
    flags: u32,
    #[serde(deserialize_with = "nullable")]
    name: String,
    #[serde(deserialize_with = "span_kind")]
    kind: i32,
    #[serde(alias = "start_time_unix_nano", deserialize_with = "int")]
    start_time_unix_nano: u64,
    #[serde(alias = "end_time_unix_nano", deserialize_with = "int")]
    end_time_unix_nano: u64,
    #[serde(deserialize_with = "seq_into::<KeyValueJson, _, _>")]
    attributes: Vec<KeyValue>,
    #[serde(alias = "dropped_attributes_count", deserialize_with = "int")]
    dropped_attributes_count: u32,
    #[serde(deserialize_with = "seq_into::<EventJson, _, _>")]
    events: Vec<Event>,
    #[serde(alias = "dropped_events_count", deserialize_with = "int")]
    dropped_events_count: u32,
    #[serde(deserialize_with = "seq_into::<LinkJson, _, _>")]
    links: Vec<Link>,
    #[serde(alias = "dropped_links_count", deserialize_with = "int")]
    dropped_links_count: u32,
    #[serde(deserialize_with = "opt_into::<StatusJson, _, _>")]
    status: Option<Status>,
}

impl From<SpanJson> for Span {
    fn from(j: SpanJson) -> Self {
        Self {
            trace_id: j.trace_id,
            span_id: j.span_id,
            trace_state: j.trace_state,
            parent_span_id: j.parent_span_id,
            flags: j.flags,
            name: j.name,
            kind: j.kind,
            start_time_unix_nano: j.start_time_unix_nano,
            end_time_unix_nano: j.end_time_unix_nano,
            attributes: j.attributes,
            dropped_attributes_count: j.dropped_attributes_count,
            events: j.events,
            dropped_events_count: j.dropped_events_count,
            links: j.links,
            dropped_links_count: j.dropped_links_count,
            status: j.status,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct EventJson {
    #[serde(alias = "time_unix_nano", deserialize_with = "int")]
    time_unix_nano: u64,
    #[serde(deserialize_with = "nullable")]
    name: String,
    #[serde(deserialize_with = "seq_into::<KeyValueJson, _, _>")]
    attributes: Vec<KeyValue>,
    #[serde(alias = "dropped_attributes_count", deserialize_with = "int")]
    dropped_attributes_count: u32,
}

impl From<EventJson> for Event {
    fn from(j: EventJson) -> Self {
        Self {
            time_unix_nano: j.time_unix_nano,
            name: j.name,
            attributes: j.attributes,
            dropped_attributes_count: j.dropped_attributes_count,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct LinkJson {
    #[serde(alias = "trace_id", deserialize_with = "hex_id")]
    trace_id: Vec<u8>,
    #[serde(alias = "span_id", deserialize_with = "hex_id")]
    span_id: Vec<u8>,
    #[serde(alias = "trace_state", deserialize_with = "nullable")]
    trace_state: String,
    #[serde(deserialize_with = "seq_into::<KeyValueJson, _, _>")]
    attributes: Vec<KeyValue>,
    #[serde(alias = "dropped_attributes_count", deserialize_with = "int")]
    dropped_attributes_count: u32,
    #[serde(deserialize_with = "int")]
    flags: u32,
}

impl From<LinkJson> for Link {
    fn from(j: LinkJson) -> Self {
        Self {
            trace_id: j.trace_id,
            span_id: j.span_id,
            trace_state: j.trace_state,
            attributes: j.attributes,
            dropped_attributes_count: j.dropped_attributes_count,
            flags: j.flags,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct StatusJson {
    #[serde(deserialize_with = "nullable")]
    message: String,
    #[serde(deserialize_with = "status_code")]
    code: i32,
}

impl From<StatusJson> for Status {
    fn from(j: StatusJson) -> Self {
        Self {
            message: j.message,
            code: j.code,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase", expecting = "an object")]
struct KeyValueJson {
    #[serde(deserialize_with = "nullable")]
    key: String,
    #[serde(deserialize_with = "opt_into::<AnyValueJson, _, _>")]
    value: Option<AnyValue>,
    #[serde(alias = "key_strindex", deserialize_with = "int")]
    key_strindex: i32,
}

impl From<KeyValueJson> for KeyValue {
    fn from(j: KeyValueJson) -> Self {
        Self {
            key: j.key,
            value: j.value,
            key_strindex: j.key_strindex,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default, expecting = "an object")]
struct ArrayValueJson {
    #[serde(deserialize_with = "seq_into::<AnyValueJson, _, _>")]
    values: Vec<AnyValue>,
}

#[derive(Default, Deserialize)]
#[serde(default, expecting = "an object")]
struct KeyValueListJson {
    #[serde(deserialize_with = "seq_into::<KeyValueJson, _, _>")]
    values: Vec<KeyValue>,
}

/// AnyValue is hand-written rather than a mirror with one `Option` per oneof member:
/// it is the most frequent message in a request, and a visitor lets the last
/// non-null member win, as oneof semantics do, without a wide intermediate struct.
struct AnyValueJson(AnyValue);

impl From<AnyValueJson> for AnyValue {
    fn from(j: AnyValueJson) -> Self {
        j.0
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum AnyValueField {
    #[serde(alias = "string_value")]
    StringValue,
    #[serde(alias = "bool_value")]
    BoolValue,
    #[serde(alias = "int_value")]
    IntValue,
    #[serde(alias = "double_value")]
    DoubleValue,
    #[serde(alias = "array_value")]
    ArrayValue,
    #[serde(alias = "kvlist_value")]
    KvlistValue,
    #[serde(alias = "bytes_value")]
    BytesValue,
    #[serde(alias = "string_value_strindex")]
    StringValueStrindex,
    #[serde(other)]
    Unknown,
}

impl<'de> Deserialize<'de> for AnyValueJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_option(AnyValueVisitor)
    }
}

struct AnyValueVisitor;

impl<'de> Visitor<'de> for AnyValueVisitor {
    type Value = AnyValueJson;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an AnyValue object")
    }

    // A null array element is an empty AnyValue rather than a failed request.
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(AnyValueJson(AnyValue::default()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut value = None;
        while let Some(field) = map.next_key::<AnyValueField>()? {
            let member = match field {
                AnyValueField::StringValue => {
                    map.next_value::<Option<String>>()?.map(Value::StringValue)
                }
                AnyValueField::BoolValue => map.next_value::<Option<bool>>()?.map(Value::BoolValue),
                AnyValueField::IntValue => map
                    .next_value::<Option<Int<i64>>>()?
                    .map(|v| Value::IntValue(v.0)),
                AnyValueField::DoubleValue => map
                    .next_value::<Option<Double>>()?
                    .map(|v| Value::DoubleValue(v.0)),
                AnyValueField::ArrayValue => map
                    .next_value::<Option<Strict<ArrayValueJson>>>()?
                    .map(|v| Value::ArrayValue(ArrayValue { values: v.0.values })),
                AnyValueField::KvlistValue => map
                    .next_value::<Option<Strict<KeyValueListJson>>>()?
                    .map(|v| Value::KvlistValue(KeyValueList { values: v.0.values })),
                AnyValueField::BytesValue => map
                    .next_value::<Option<Bytes>>()?
                    .map(|v| Value::BytesValue(v.0)),
                AnyValueField::StringValueStrindex => map
                    .next_value::<Option<Int<i32>>>()?
                    .map(|v| Value::StringValueStrindex(v.0)),
                AnyValueField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                    None
                }
            };
            if member.is_some() {
                value = member;
            }
        }
        Ok(AnyValueJson(AnyValue { value }))
    }
}

// ---------------------------------------------------------------------------
// Decoding: lenient scalar and container helpers
// ---------------------------------------------------------------------------

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn opt_into<'de, J, T, D>(d: D) -> Result<Option<T>, D::Error>
where
    J: Deserialize<'de> + Into<T>,
    D: Deserializer<'de>,
{
    Ok(Option::<Strict<J>>::deserialize(d)?.map(|j| j.0.into()))
}

/// Converts each element as it is parsed, so repeated fields land directly in the
/// prost `Vec` without an intermediate vector of mirrors.
fn seq_into<'de, J, T, D>(d: D) -> Result<Vec<T>, D::Error>
where
    J: Deserialize<'de> + Into<T>,
    T: 'static,
    D: Deserializer<'de>,
{
    d.deserialize_option(SeqInto::<J, T>(PhantomData))
}

struct SeqInto<J, T>(PhantomData<fn() -> (J, T)>);

impl<'de, J, T> Visitor<'de> for SeqInto<J, T>
where
    J: Deserialize<'de> + Into<T>,
    T: 'static,
{
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // The hint is client-controlled; cap it so a lying length cannot reserve much.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element::<Strict<J>>()? {
            charge::<T, A::Error>()?;
            out.push(item.0.into());
        }
        Ok(out)
    }
}

/// Deserializes `J` with derived structs accepting only JSON objects.
///
/// serde_json also feeds a derived struct from an array, binding elements to fields
/// by position, so `"resource": [..]` or a top-level `[]` would be accepted as
/// something no OTLP client meant. Every message decodes through this wrapper so
/// that such input is a type error, as it is for the Collector.
struct Strict<J>(J);

impl<'de, J: Deserialize<'de>> Deserialize<'de> for Strict<J> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        J::deserialize(ObjectsOnly(d)).map(Strict)
    }
}

/// Forwards everything to the wrapped deserializer except that structs are read
/// as maps, which serde_json only accepts from JSON objects.
struct ObjectsOnly<D>(D);

macro_rules! forward_to_inner {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.0.$method(visitor)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectsOnly<D> {
    type Error = D::Error;

    forward_to_inner! {
        deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
        deserialize_f32 deserialize_f64 deserialize_char deserialize_str deserialize_string
        deserialize_bytes deserialize_byte_buf deserialize_option deserialize_unit
        deserialize_seq deserialize_map deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple_struct(name, len, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// A string list element where `null` reads as "".
struct NullableString(String);

impl<'de> Deserialize<'de> for NullableString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        nullable(d).map(NullableString)
    }
}

impl From<NullableString> for String {
    fn from(s: NullableString) -> Self {
        s.0
    }
}

/// Integer types accepted as JSON numbers or decimal strings, as proto3 JSON allows
/// for every integer width.
trait LenientInt: Sized + Default + TryFrom<u64> + TryFrom<i64> + std::str::FromStr {
    const NAME: &'static str;
}

impl LenientInt for u32 {
    const NAME: &'static str = "an unsigned 32-bit integer";
}
impl LenientInt for i32 {
    const NAME: &'static str = "a 32-bit integer";
}
impl LenientInt for u64 {
    const NAME: &'static str = "an unsigned 64-bit integer";
}
impl LenientInt for i64 {
    const NAME: &'static str = "a 64-bit integer";
}

struct Int<T>(T);

impl<'de, T: LenientInt> Deserialize<'de> for Int<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IntVisitor::<T>(PhantomData)).map(Int)
    }
}

fn int<'de, D: Deserializer<'de>, T: LenientInt>(d: D) -> Result<T, D::Error> {
    Int::<T>::deserialize(d).map(|v| v.0)
}

struct IntVisitor<T>(PhantomData<fn() -> T>);

impl<'de, T: LenientInt> Visitor<'de> for IntVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer or a decimal string")
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format_args!("{v} is out of range for {}", T::NAME)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format_args!("{v} is out of range for {}", T::NAME)))
    }

    // Exponent notation such as 1.5e9 arrives as a float; accept it when integral.
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
        const MINUS_TWO_POW_63: f64 = -9_223_372_036_854_775_808.0;
        if v.fract() != 0.0 {
            return Err(E::invalid_value(Unexpected::Float(v), &self));
        }
        if (0.0..TWO_POW_64).contains(&v) {
            self.visit_u64(v as u64)
        } else if (MINUS_TWO_POW_63..0.0).contains(&v) {
            self.visit_i64(v as i64)
        } else {
            Err(E::custom(format_args!(
                "{v} is out of range for {}",
                T::NAME
            )))
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        if let Ok(v) = s.parse::<T>() {
            return Ok(v);
        }
        match s.parse::<f64>() {
            Ok(f) if f.is_finite() => self.visit_f64(f),
            _ => Err(E::invalid_value(Unexpected::Str(s), &self)),
        }
    }
}

struct Double(f64);

impl<'de> Deserialize<'de> for Double {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DoubleVisitor).map(Double)
    }
}

struct DoubleVisitor;

impl Visitor<'_> for DoubleVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
    }

    fn visit_unit<E: de::Error>(self) -> Result<f64, E> {
        Ok(0.0)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<f64, E> {
        match s {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => s
                .parse::<f64>()
                .map_err(|_| E::invalid_value(Unexpected::Str(s), &self)),
        }
    }
}

/// Padding is optional and both alphabets are accepted because Go's protojson
/// (and so the Collector) accepts all four spellings.
const LENIENT_BASE64: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT_BASE64);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT_BASE64);

struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BytesVisitor).map(Bytes)
    }
}

struct BytesVisitor;

impl Visitor<'_> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a base64 string")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Vec<u8>, E> {
        Ok(Vec::new())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
        STANDARD_LENIENT
            .decode(s)
            .or_else(|_| URL_SAFE_LENIENT.decode(s))
            .map_err(|err| E::custom(format_args!("invalid base64: {err}")))
    }
}

fn hex_id<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_any(HexIdVisitor)
}

struct HexIdVisitor;

impl Visitor<'_> for HexIdVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a hex string")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Vec<u8>, E> {
        Ok(Vec::new())
    }

    // A bad id is the span's problem, not the request's: leaving it empty lets id
    // validation reject just that span and report a partial success.
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
        Ok(hex::decode(s).unwrap_or_default())
    }
}

fn span_kind<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    d.deserialize_any(EnumVisitor {
        name: "span kind",
        prefix: "SPAN_KIND_",
        variants: &[
            ("UNSPECIFIED", SpanKind::Unspecified as i32),
            ("INTERNAL", SpanKind::Internal as i32),
            ("SERVER", SpanKind::Server as i32),
            ("CLIENT", SpanKind::Client as i32),
            ("PRODUCER", SpanKind::Producer as i32),
            ("CONSUMER", SpanKind::Consumer as i32),
        ],
    })
}

fn status_code<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    d.deserialize_any(EnumVisitor {
        name: "status code",
        prefix: "STATUS_CODE_",
        variants: &[
            ("UNSET", StatusCode::Unset as i32),
            ("OK", StatusCode::Ok as i32),
            ("ERROR", StatusCode::Error as i32),
        ],
    })
}

/// Enums arrive as integers or names. Names match case-insensitively with or
/// without the proto prefix (`SPAN_KIND_SERVER`, `server`). Integers outside the
/// known set are kept, as proto3 enums are open.
struct EnumVisitor {
    name: &'static str,
    prefix: &'static str,
    variants: &'static [(&'static str, i32)],
}

impl EnumVisitor {
    fn lookup(&self, s: &str) -> Option<i32> {
        let short = s
            .get(..self.prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(self.prefix))
            .and_then(|_| s.get(self.prefix.len()..))
            .unwrap_or(s);
        self.variants
            .iter()
            .find(|(variant, _)| variant.eq_ignore_ascii_case(short))
            .map(|&(_, value)| value)
    }
}

impl Visitor<'_> for EnumVisitor {
    type Value = i32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer or a {} name", self.name)
    }

    fn visit_unit<E: de::Error>(self) -> Result<i32, E> {
        Ok(0)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
        i32::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
        i32::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<i32, E> {
        self.lookup(s)
            .or_else(|| s.parse::<i32>().ok())
            .ok_or_else(|| E::custom(format_args!("unknown {} {s:?}", self.name)))
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------
//
// Hand-written rather than serde: every rule below (hex ids, quoted 64-bit
// integers, omitted defaults, NaN as a string, oneof as a single key) would
// otherwise need a custom serializer per field, and writing straight into one
// String avoids per-field allocations.

/// Writes one JSON object, omitting default-valued fields as proto3 JSON does.
struct Obj<'a> {
    out: &'a mut String,
    empty: bool,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut String) -> Self {
        out.push('{');
        Obj { out, empty: true }
    }

    fn close(self) {
        self.out.push('}');
    }

    /// Keys are compile-time camelCase names, so they need no escaping.
    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.key(key);
            write_str(self.out, value);
        }
    }

    fn hex(&mut self, key: &str, value: &[u8]) {
        if !value.is_empty() {
            self.key(key);
            write_hex(self.out, value);
        }
    }

    /// 64-bit integers are strings in proto3 JSON because JavaScript numbers
    /// cannot hold them exactly.
    fn u64(&mut self, key: &str, value: u64) {
        if value != 0 {
            self.key(key);
            let _ = write!(self.out, "\"{value}\"");
        }
    }

    fn i64(&mut self, key: &str, value: i64) {
        if value != 0 {
            self.key(key);
            let _ = write!(self.out, "\"{value}\"");
        }
    }

    fn u32(&mut self, key: &str, value: u32) {
        if value != 0 {
            self.key(key);
            let _ = write!(self.out, "{value}");
        }
    }

    fn i32(&mut self, key: &str, value: i32) {
        if value != 0 {
            self.key(key);
            let _ = write!(self.out, "{value}");
        }
    }

    fn list<T>(&mut self, key: &str, items: &[T], write_item: impl Fn(&mut String, &T)) {
        if items.is_empty() {
            return;
        }
        self.key(key);
        self.out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            write_item(self.out, item);
        }
        self.out.push(']');
    }

    /// A present message is written even when empty: presence is meaningful.
    fn message<T>(&mut self, key: &str, value: Option<&T>, write_value: fn(&mut String, &T)) {
        if let Some(value) = value {
            self.key(key);
            write_value(self.out, value);
        }
    }
}

fn write_resource_spans(out: &mut String, rs: &ResourceSpans) {
    let mut obj = Obj::open(out);
    obj.message("resource", rs.resource.as_ref(), write_resource);
    obj.list("scopeSpans", &rs.scope_spans, write_scope_spans);
    obj.str("schemaUrl", &rs.schema_url);
    obj.close();
}

fn write_resource(out: &mut String, resource: &Resource) {
    let mut obj = Obj::open(out);
    obj.list("attributes", &resource.attributes, write_key_value);
    obj.u32("droppedAttributesCount", resource.dropped_attributes_count);
    obj.list("entityRefs", &resource.entity_refs, write_entity_ref);
    obj.close();
}

fn write_entity_ref(out: &mut String, entity: &EntityRef) {
    let mut obj = Obj::open(out);
    obj.str("schemaUrl", &entity.schema_url);
    obj.str("type", &entity.r#type);
    obj.list("idKeys", &entity.id_keys, |out, key| write_str(out, key));
    obj.list("descriptionKeys", &entity.description_keys, |out, key| {
        write_str(out, key)
    });
    obj.close();
}

fn write_scope_spans(out: &mut String, ss: &ScopeSpans) {
    let mut obj = Obj::open(out);
    obj.message("scope", ss.scope.as_ref(), write_scope);
    obj.list("spans", &ss.spans, write_span);
    obj.str("schemaUrl", &ss.schema_url);
    obj.close();
}

fn write_scope(out: &mut String, scope: &InstrumentationScope) {
    let mut obj = Obj::open(out);
    obj.str("name", &scope.name);
    obj.str("version", &scope.version);
    obj.list("attributes", &scope.attributes, write_key_value);
    obj.u32("droppedAttributesCount", scope.dropped_attributes_count);
    obj.close();
}

fn write_span(out: &mut String, span: &Span) {
    let mut obj = Obj::open(out);
    obj.hex("traceId", &span.trace_id);
    obj.hex("spanId", &span.span_id);
    obj.str("traceState", &span.trace_state);
    obj.hex("parentSpanId", &span.parent_span_id);
    obj.u32("flags", span.flags);
    obj.str("name", &span.name);
    obj.i32("kind", span.kind);
    obj.u64("startTimeUnixNano", span.start_time_unix_nano);
    obj.u64("endTimeUnixNano", span.end_time_unix_nano);
    obj.list("attributes", &span.attributes, write_key_value);
    obj.u32("droppedAttributesCount", span.dropped_attributes_count);
    obj.list("events", &span.events, write_event);
    obj.u32("droppedEventsCount", span.dropped_events_count);
    obj.list("links", &span.links, write_link);
    obj.u32("droppedLinksCount", span.dropped_links_count);
    obj.message("status", span.status.as_ref(), write_status);
    obj.close();
}

fn write_event(out: &mut String, event: &Event) {
    let mut obj = Obj::open(out);
    obj.u64("timeUnixNano", event.time_unix_nano);
    obj.str("name", &event.name);
    obj.list("attributes", &event.attributes, write_key_value);
    obj.u32("droppedAttributesCount", event.dropped_attributes_count);
    obj.close();
}

fn write_link(out: &mut String, link: &Link) {
    let mut obj = Obj::open(out);
    obj.hex("traceId", &link.trace_id);
    obj.hex("spanId", &link.span_id);
    obj.str("traceState", &link.trace_state);
    obj.list("attributes", &link.attributes, write_key_value);
    obj.u32("droppedAttributesCount", link.dropped_attributes_count);
    obj.u32("flags", link.flags);
    obj.close();
}

fn write_status(out: &mut String, status: &Status) {
    let mut obj = Obj::open(out);
    obj.str("message", &status.message);
    obj.i32("code", status.code);
    obj.close();
}

fn write_partial_success(out: &mut String, partial: &ExportTracePartialSuccess) {
    let mut obj = Obj::open(out);
    obj.i64("rejectedSpans", partial.rejected_spans);
    obj.str("errorMessage", &partial.error_message);
    obj.close();
}

fn write_key_value(out: &mut String, kv: &KeyValue) {
    let mut obj = Obj::open(out);
    obj.str("key", &kv.key);
    obj.message("value", kv.value.as_ref(), write_any_value);
    obj.i32("keyStrindex", kv.key_strindex);
    obj.close();
}

/// A set oneof member is written even when it holds its type's default (`""`,
/// `0`, `false`): which member is set is itself the information.
fn write_any_value(out: &mut String, any: &AnyValue) {
    let Some(value) = &any.value else {
        out.push_str("{}");
        return;
    };
    match value {
        Value::StringValue(s) => {
            out.push_str("{\"stringValue\":");
            write_str(out, s);
        }
        Value::BoolValue(b) => {
            let _ = write!(out, "{{\"boolValue\":{b}");
        }
        Value::IntValue(i) => {
            let _ = write!(out, "{{\"intValue\":\"{i}\"");
        }
        Value::DoubleValue(d) => {
            out.push_str("{\"doubleValue\":");
            write_double(out, *d);
        }
        Value::ArrayValue(array) => {
            out.push_str("{\"arrayValue\":");
            let mut obj = Obj::open(out);
            obj.list("values", &array.values, write_any_value);
            obj.close();
        }
        Value::KvlistValue(list) => {
            out.push_str("{\"kvlistValue\":");
            let mut obj = Obj::open(out);
            obj.list("values", &list.values, write_key_value);
            obj.close();
        }
        Value::BytesValue(bytes) => {
            out.push_str("{\"bytesValue\":\"");
            STANDARD.encode_string(bytes, out);
            out.push('"');
        }
        Value::StringValueStrindex(i) => {
            let _ = write!(out, "{{\"stringValueStrindex\":{i}");
        }
    }
    out.push('}');
}

fn write_double(out: &mut String, d: f64) {
    if d.is_nan() {
        out.push_str("\"NaN\"");
    } else if d.is_infinite() {
        out.push_str(if d > 0.0 {
            "\"Infinity\""
        } else {
            "\"-Infinity\""
        });
    } else {
        // Debug, unlike Display, switches to exponent notation for very large or
        // small magnitudes; both forms are valid JSON and round-trip exactly.
        let _ = write!(out, "{d:?}");
    }
}

fn write_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2 + 2);
    out.push('"');
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out.push('"');
}

fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let mut clean_from = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` indexes an ASCII byte, so both slice ends are char boundaries.
        out.push_str(s.get(clean_from..i).unwrap_or_default());
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        } else {
            out.push_str(escape);
        }
        clean_from = i + 1;
    }
    out.push_str(s.get(clean_from..).unwrap_or_default());
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            key_strindex: 0,
        }
    }

    fn string(s: &str) -> Value {
        Value::StringValue(s.to_owned())
    }

    fn single_span(body: &str) -> Span {
        let req = decode_traces(body.as_bytes()).expect("decodes");
        assert_eq!(req.resource_spans.len(), 1);
        assert_eq!(req.resource_spans[0].scope_spans.len(), 1);
        assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), 1);
        req.resource_spans[0].scope_spans[0].spans[0].clone()
    }

    fn span_json(fields: &str) -> String {
        format!(r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{{{fields}}}]}}]}}]}}"#)
    }

    fn attr_json(value: &str) -> String {
        span_json(&format!(r#""attributes":[{{"key":"a","value":{value}}}]"#))
    }

    fn attr_value(value: &str) -> Option<Value> {
        let span = single_span(&attr_json(value));
        span.attributes[0].value.clone().and_then(|v| v.value)
    }

    fn decode_err(body: &str) -> String {
        match decode_traces(body.as_bytes()) {
            Ok(req) => panic!("expected an error, decoded {req:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn rich_request() -> ExportTraceServiceRequest {
        let nested_kvlist = Value::KvlistValue(KeyValueList {
            values: vec![
                kv("inner.str", string("x")),
                kv(
                    "inner.arr",
                    Value::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(Value::BoolValue(true)),
                            },
                            AnyValue { value: None },
                        ],
                    }),
                ),
                KeyValue {
                    key: "inner.none".to_owned(),
                    value: None,
                    key_strindex: 0,
                },
            ],
        });
        let attributes = vec![
            kv(
                "str",
                string("quote \" backslash \\ nl \n tab \t ctrl \u{1} \u{1f} é 😀 </script>"),
            ),
            kv("empty.str", string("")),
            kv("bool.t", Value::BoolValue(true)),
            kv("bool.f", Value::BoolValue(false)),
            kv("int.zero", Value::IntValue(0)),
            kv("int.min", Value::IntValue(i64::MIN)),
            kv("int.max", Value::IntValue(i64::MAX)),
            kv("double", Value::DoubleValue(3.25)),
            kv("double.neg", Value::DoubleValue(-0.1)),
            kv("double.zero", Value::DoubleValue(0.0)),
            kv("double.huge", Value::DoubleValue(1.5e300)),
            kv("double.tiny", Value::DoubleValue(2.5e-300)),
            kv("double.max", Value::DoubleValue(f64::MAX)),
            kv("double.integral", Value::DoubleValue(1e21)),
            kv("bytes", Value::BytesValue((0..=255).collect())),
            kv("bytes.empty", Value::BytesValue(Vec::new())),
            kv(
                "array",
                Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(string("a")),
                        },
                        AnyValue {
                            value: Some(Value::IntValue(-5)),
                        },
                        AnyValue {
                            value: Some(Value::ArrayValue(ArrayValue {
                                values: vec![AnyValue {
                                    value: Some(Value::DoubleValue(0.5)),
                                }],
                            })),
                        },
                        AnyValue {
                            value: Some(nested_kvlist.clone()),
                        },
                    ],
                }),
            ),
            kv("array.empty", Value::ArrayValue(ArrayValue::default())),
            kv("kvlist", nested_kvlist),
            kv("kvlist.empty", Value::KvlistValue(KeyValueList::default())),
            kv("strindex", Value::StringValueStrindex(7)),
            KeyValue {
                key: "empty.any".to_owned(),
                value: Some(AnyValue { value: None }),
                key_strindex: 0,
            },
            KeyValue {
                key: String::new(),
                value: None,
                key_strindex: 3,
            },
        ];
        let full_span = Span {
            trace_id: (1..=16).collect(),
            span_id: vec![0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3],
            trace_state: "vendor=value,other=1".to_owned(),
            parent_span_id: vec![0xff; 8],
            flags: 0x301,
            name: "GET /api/{id}".to_owned(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_544_712_660_000_000_000,
            end_time_unix_nano: u64::MAX,
            attributes: attributes.clone(),
            dropped_attributes_count: 4,
            events: vec![
                Event {
                    time_unix_nano: 1_544_712_660_500_000_000,
                    name: "exception".to_owned(),
                    attributes: vec![kv("exception.type", string("E"))],
                    dropped_attributes_count: 1,
                },
                Event::default(),
            ],
            dropped_events_count: 5,
            links: vec![
                Link {
                    trace_id: vec![0xab; 16],
                    span_id: vec![0xcd; 8],
                    trace_state: "k=v".to_owned(),
                    attributes: vec![kv("link.attr", Value::IntValue(1))],
                    dropped_attributes_count: 2,
                    flags: 0x100,
                },
                Link::default(),
            ],
            dropped_links_count: 6,
            status: Some(Status {
                message: "boom".to_owned(),
                code: StatusCode::Error as i32,
            }),
        };
        let bare_span = Span {
            trace_id: vec![0x11; 16],
            span_id: vec![0x22; 8],
            status: Some(Status::default()),
            ..Span::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(Resource {
                        attributes: attributes.clone(),
                        dropped_attributes_count: 9,
                        entity_refs: vec![EntityRef {
                            schema_url: "https://example.com/entity".to_owned(),
                            r#type: "service".to_owned(),
                            id_keys: vec!["service.name".to_owned()],
                            description_keys: vec!["a".to_owned(), String::new()],
                        }],
                    }),
                    scope_spans: vec![
                        ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "my.library".to_owned(),
                                version: "1.0.0".to_owned(),
                                attributes: vec![kv("scope.attr", Value::BoolValue(true))],
                                dropped_attributes_count: 8,
                            }),
                            spans: vec![full_span, bare_span],
                            schema_url: "https://opentelemetry.io/schemas/1.21.0".to_owned(),
                        },
                        ScopeSpans {
                            scope: Some(InstrumentationScope::default()),
                            spans: vec![Span::default()],
                            schema_url: String::new(),
                        },
                    ],
                    schema_url: "https://opentelemetry.io/schemas/1.20.0".to_owned(),
                },
                ResourceSpans::default(),
                ResourceSpans {
                    resource: Some(Resource::default()),
                    scope_spans: vec![ScopeSpans::default()],
                    schema_url: String::new(),
                },
            ],
        }
    }

    #[test]
    fn decoding_stops_past_its_allowance_and_the_next_decode_is_unlimited() {
        let spans = |n: usize| {
            format!(
                r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
                vec!["{}"; n].join(",")
            )
        };
        let body = spans(5);
        assert!(decode_traces_within(body.as_bytes(), 1 << 20, 5).is_ok());
        let err = decode_traces_within(body.as_bytes(), 1 << 20, 4).unwrap_err();
        assert!(
            matches!(&err, Undecoded::TooLarge(m) if m.contains("more than 4 spans")),
            "{err:?}"
        );
        // Five 264-byte spans do not fit in 1 KiB of decoded messages.
        let err = decode_traces_within(body.as_bytes(), 1024, 100).unwrap_err();
        assert!(
            matches!(&err, Undecoded::TooLarge(m) if m.contains("more than 1024 bytes")),
            "{err:?}"
        );
        // Attributes are charged too: an empty `{}` is a whole KeyValue.
        let attrs = format!(
            r#"{{"resourceSpans":[{{"resource":{{"attributes":[{}]}}}}]}}"#,
            vec!["{}"; 1000].join(",")
        );
        assert!(matches!(
            decode_traces_within(attrs.as_bytes(), 16 << 10, 100),
            Err(Undecoded::TooLarge(_))
        ));
        assert!(matches!(
            decode_traces_within(b"{", 1 << 20, 100),
            Err(Undecoded::Malformed(_))
        ));
        // The allowance belongs to one call.
        assert_eq!(
            decode_traces(spans(50).as_bytes())
                .unwrap()
                .resource_spans
                .len(),
            1
        );
    }

    #[test]
    fn rich_request_round_trips() {
        let req = rich_request();
        let json = encode_traces(&req);
        assert!(!json.contains('\n'), "one line: {json}");
        let decoded = decode_traces(json.as_bytes()).expect("own output decodes");
        assert_eq!(decoded, req);
        assert_eq!(encode_traces(&decoded), json);
    }

    #[test]
    fn encoded_output_is_valid_json_per_serde() {
        let json = encode_traces(&rich_request());
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let span = &value["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "0102030405060708090a0b0c0d0e0f10");
        assert_eq!(span["spanId"], "deadbeef00010203");
        assert_eq!(span["endTimeUnixNano"], "18446744073709551615");
        assert_eq!(span["kind"], 2);
        assert_eq!(span["flags"], 0x301);
        let attrs = span["attributes"].as_array().expect("attributes");
        let find = |key: &str| {
            attrs
                .iter()
                .find(|a| a["key"] == key)
                .map(|a| a["value"].clone())
                .expect("attribute present")
        };
        assert_eq!(find("int.min")["intValue"], "-9223372036854775808");
        assert_eq!(find("empty.str")["stringValue"], "");
        assert_eq!(find("int.zero")["intValue"], "0");
        assert_eq!(find("bool.f")["boolValue"], false);
        assert_eq!(find("empty.any"), serde_json::json!({}));
        assert_eq!(find("array.empty"), serde_json::json!({"arrayValue": {}}));
    }

    #[test]
    fn encodes_small_request_exactly() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", string("svc"))],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lib".to_owned(),
                        ..InstrumentationScope::default()
                    }),
                    spans: vec![Span {
                        trace_id: vec![
                            0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33,
                            0x81, 0x3f, 0xc6, 0x0c,
                        ],
                        span_id: vec![0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74],
                        name: "op \"x\"".to_owned(),
                        kind: 2,
                        start_time_unix_nano: 1_544_712_660_000_000_000,
                        end_time_unix_nano: 1_544_712_661_000_000_000,
                        attributes: vec![
                            kv("n", Value::IntValue(-7)),
                            kv("d", Value::DoubleValue(1.5)),
                            kv("nan", Value::DoubleValue(f64::NAN)),
                            kv("b", Value::BytesValue(vec![1, 2, 3])),
                        ],
                        status: Some(Status {
                            message: String::new(),
                            code: 2,
                        }),
                        ..Span::default()
                    }],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let expected = concat!(
            r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"svc"}}]},"#,
            r#""scopeSpans":[{"scope":{"name":"lib"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","#,
            r#""spanId":"eee19b7ec3c1b174","name":"op \"x\"","kind":2,"startTimeUnixNano":"1544712660000000000","#,
            r#""endTimeUnixNano":"1544712661000000000","attributes":[{"key":"n","value":{"intValue":"-7"}},"#,
            r#"{"key":"d","value":{"doubleValue":1.5}},{"key":"nan","value":{"doubleValue":"NaN"}},"#,
            r#"{"key":"b","value":{"bytesValue":"AQID"}}],"status":{"code":2}}]}]}]}"#,
        );
        assert_eq!(encode_traces(&req), expected);
        assert_eq!(encode_traces(&ExportTraceServiceRequest::default()), "{}");
    }

    #[test]
    fn escapes_control_characters() {
        let mut out = String::new();
        write_str(&mut out, "a\u{0}b\u{8}\u{c}\u{7f}\u{2028}\"\\");
        assert_eq!(out, "\"a\\u0000b\\b\\f\u{7f}\u{2028}\\\"\\\\\"");
        let back: String = serde_json::from_str(&out).expect("valid JSON string");
        assert_eq!(back, "a\u{0}b\u{8}\u{c}\u{7f}\u{2028}\"\\");
    }

    #[test]
    fn non_finite_doubles_round_trip() {
        for (d, text) in [
            (f64::NAN, "\"NaN\""),
            (f64::INFINITY, "\"Infinity\""),
            (f64::NEG_INFINITY, "\"-Infinity\""),
        ] {
            let mut out = String::new();
            write_double(&mut out, d);
            assert_eq!(out, text);
            let Some(Value::DoubleValue(back)) =
                attr_value(&format!(r#"{{"doubleValue":{text}}}"#))
            else {
                panic!("not a double");
            };
            assert_eq!(back.is_nan(), d.is_nan());
            if !d.is_nan() {
                assert_eq!(back, d);
            }
        }
    }

    const SPEC_EXAMPLE: &str = r#"{
  "resourceSpans": [
    {
      "resource": {
        "attributes": [
          {
            "key": "service.name",
            "value": {
              "stringValue": "my.service"
            }
          }
        ]
      },
      "scopeSpans": [
        {
          "scope": {
            "name": "my.library",
            "version": "1.0.0",
            "attributes": [
              {
                "key": "my.scope.attribute",
                "value": {
                  "stringValue": "some scope attribute"
                }
              }
            ]
          },
          "spans": [
            {
              "traceId": "5B8EFFF798038103D269B633813FC60C",
              "spanId": "EEE19B7EC3C1B174",
              "parentSpanId": "EEE19B7EC3C1B173",
              "name": "I'm a server span",
              "startTimeUnixNano": "1544712660000000000",
              "endTimeUnixNano": "1544712661000000000",
              "kind": 2,
              "attributes": [
                {
                  "key": "my.span.attr",
                  "value": {
                    "stringValue": "some value"
                  }
                },
                {
                  "key": "my.bool",
                  "value": {
                    "boolValue": true
                  }
                },
                {
                  "key": "my.int",
                  "value": {
                    "intValue": "1"
                  }
                },
                {
                  "key": "my.double",
                  "value": {
                    "doubleValue": 2.5
                  }
                }
              ]
            }
          ]
        }
      ]
    }
  ]
}"#;

    #[test]
    fn decodes_spec_example() {
        let req = decode_traces(SPEC_EXAMPLE.as_bytes()).expect("spec example decodes");
        let rs = &req.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().map(|r| r.attributes.clone()),
            Some(vec![kv("service.name", string("my.service"))])
        );
        let ss = &rs.scope_spans[0];
        let scope = ss.scope.as_ref().expect("scope");
        assert_eq!(scope.name, "my.library");
        assert_eq!(scope.version, "1.0.0");
        assert_eq!(
            scope.attributes,
            vec![kv("my.scope.attribute", string("some scope attribute"))]
        );
        let span = &ss.spans[0];
        assert_eq!(
            span.trace_id,
            [
                0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f,
                0xc6, 0x0c
            ]
        );
        assert_eq!(
            span.span_id,
            [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74]
        );
        assert_eq!(
            span.parent_span_id,
            [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x73]
        );
        assert_eq!(span.name, "I'm a server span");
        assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
        assert_eq!(span.end_time_unix_nano, 1_544_712_661_000_000_000);
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(
            span.attributes,
            vec![
                kv("my.span.attr", string("some value")),
                kv("my.bool", Value::BoolValue(true)),
                kv("my.int", Value::IntValue(1)),
                kv("my.double", Value::DoubleValue(2.5)),
            ]
        );

        // Lowercase hex and JSON numbers for the timestamps (as in the spec repo's
        // own copy of the example) decode identically.
        let variant = SPEC_EXAMPLE
            .replace(
                "5B8EFFF798038103D269B633813FC60C",
                "5b8efff798038103d269b633813fc60c",
            )
            .replace("\"1544712660000000000\"", "1544712660000000000")
            .replace("\"1544712661000000000\"", "1544712661000000000");
        assert_eq!(decode_traces(variant.as_bytes()).expect("decodes"), req);
    }

    #[test]
    fn snake_case_keys_match_camel_case() {
        let camel = encode_traces(&rich_request());
        let mut snake = camel.clone();
        for (from, to) in [
            ("resourceSpans", "resource_spans"),
            ("scopeSpans", "scope_spans"),
            ("schemaUrl", "schema_url"),
            ("droppedAttributesCount", "dropped_attributes_count"),
            ("droppedEventsCount", "dropped_events_count"),
            ("droppedLinksCount", "dropped_links_count"),
            ("entityRefs", "entity_refs"),
            ("idKeys", "id_keys"),
            ("descriptionKeys", "description_keys"),
            ("traceId", "trace_id"),
            ("parentSpanId", "parent_span_id"),
            ("spanId", "span_id"),
            ("traceState", "trace_state"),
            ("startTimeUnixNano", "start_time_unix_nano"),
            ("endTimeUnixNano", "end_time_unix_nano"),
            ("timeUnixNano", "time_unix_nano"),
            ("stringValueStrindex", "string_value_strindex"),
            ("stringValue", "string_value"),
            ("boolValue", "bool_value"),
            ("intValue", "int_value"),
            ("doubleValue", "double_value"),
            ("arrayValue", "array_value"),
            ("kvlistValue", "kvlist_value"),
            ("bytesValue", "bytes_value"),
            ("keyStrindex", "key_strindex"),
        ] {
            snake = snake.replace(&format!("\"{from}\""), &format!("\"{to}\""));
        }
        assert!(!snake.contains("\"traceId\""));
        assert!(snake.contains("\"trace_id\""));
        assert_eq!(
            decode_traces(snake.as_bytes()).expect("snake_case decodes"),
            rich_request()
        );
    }

    #[test]
    fn enum_names_and_numbers() {
        for (kind, expected) in [
            (r#""SPAN_KIND_SERVER""#, 2),
            (r#""SPAN_KIND_CONSUMER""#, 5),
            (r#""SPAN_KIND_UNSPECIFIED""#, 0),
            (r#""client""#, 3),
            (r#""Producer""#, 4),
            (r#""span_kind_internal""#, 1),
            ("3", 3),
            (r#""4""#, 4),
            ("42", 42),
            ("null", 0),
        ] {
            let span = single_span(&span_json(&format!(r#""kind":{kind}"#)));
            assert_eq!(span.kind, expected, "kind {kind}");
        }
        for (code, expected) in [
            (r#""STATUS_CODE_ERROR""#, 2),
            (r#""STATUS_CODE_OK""#, 1),
            (r#""STATUS_CODE_UNSET""#, 0),
            (r#""error""#, 2),
            ("1", 1),
        ] {
            let span = single_span(&span_json(&format!(
                r#""status":{{"code":{code},"message":"m"}}"#
            )));
            assert_eq!(
                span.status,
                Some(Status {
                    message: "m".to_owned(),
                    code: expected
                }),
                "code {code}"
            );
        }
        let err = decode_err(&span_json(r#""kind":"SPAN_KIND_WHATEVER""#));
        assert!(err.contains("kind"), "{err}");
        assert!(
            err.contains("unknown span kind \"SPAN_KIND_WHATEVER\""),
            "{err}"
        );
        let err = decode_err(&span_json(r#""status":{"code":"FATAL"}"#));
        assert!(err.contains("status.code"), "{err}");
        assert!(err.contains("unknown status code"), "{err}");
        let err = decode_err(&span_json(r#""kind":4294967296"#));
        assert!(err.contains("kind"), "{err}");
    }

    #[test]
    fn integers_accept_numbers_and_strings() {
        for (text, expected) in [
            ("1544712660000000000", 1_544_712_660_000_000_000),
            (r#""1544712660000000000""#, 1_544_712_660_000_000_000),
            (r#""18446744073709551615""#, u64::MAX),
            ("18446744073709551615", u64::MAX),
            ("1.5e9", 1_500_000_000),
            (r#""2e3""#, 2_000),
            ("0", 0),
            ("null", 0),
        ] {
            let span = single_span(&span_json(&format!(r#""startTimeUnixNano":{text}"#)));
            assert_eq!(span.start_time_unix_nano, expected, "{text}");
        }
        for (text, expected) in [
            ("-5", -5),
            (r#""-5""#, -5),
            (r#""9223372036854775807""#, i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(
                attr_value(&format!(r#"{{"intValue":{text}}}"#)),
                Some(Value::IntValue(expected)),
                "{text}"
            );
        }
        let span = single_span(&span_json(
            r#""droppedAttributesCount":"3","droppedEventsCount":4,"flags":"257""#,
        ));
        assert_eq!(span.dropped_attributes_count, 3);
        assert_eq!(span.dropped_events_count, 4);
        assert_eq!(span.flags, 257);

        for bad in [
            "-1",
            r#""-1""#,
            "1.5",
            r#""abc""#,
            "18446744073709551616",
            "true",
        ] {
            let err = decode_err(&span_json(&format!(r#""startTimeUnixNano":{bad}"#)));
            assert!(
                err.starts_with("resourceSpans[0].scopeSpans[0].spans[0].startTimeUnixNano: "),
                "{bad}: {err}"
            );
        }
        let err = decode_err(&span_json(r#""droppedLinksCount":4294967296"#));
        assert!(err.contains("droppedLinksCount"), "{err}");
        assert!(err.contains("out of range"), "{err}");
        let err = decode_err(&attr_json(r#"{"intValue":"9223372036854775808"}"#));
        assert!(err.contains("attributes[0].value.intValue"), "{err}");
    }

    #[test]
    fn doubles_accept_special_strings_and_numbers() {
        let double = |text: &str| match attr_value(&format!(r#"{{"doubleValue":{text}}}"#)) {
            Some(Value::DoubleValue(d)) => d,
            other => panic!("{text}: {other:?}"),
        };
        assert!(double(r#""NaN""#).is_nan());
        assert_eq!(double(r#""Infinity""#), f64::INFINITY);
        assert_eq!(double(r#""-Infinity""#), f64::NEG_INFINITY);
        assert_eq!(double("3"), 3.0);
        assert_eq!(double("-3"), -3.0);
        assert_eq!(double("2.5e-3"), 2.5e-3);
        assert_eq!(double(r#""1.25""#), 1.25);
        let err = decode_err(&attr_json(r#"{"doubleValue":"many"}"#));
        assert!(err.contains("doubleValue"), "{err}");
    }

    #[test]
    fn null_means_absent() {
        let body = r#"{"resourceSpans":[{"resource":null,"schemaUrl":null,"scopeSpans":[{"scope":null,"schemaUrl":null,"spans":[{
            "traceId":null,"spanId":null,"parentSpanId":null,"traceState":null,"flags":null,"name":null,
            "kind":null,"startTimeUnixNano":null,"endTimeUnixNano":null,"droppedAttributesCount":null,
            "events":[{"timeUnixNano":null,"name":null,"attributes":null}],"droppedEventsCount":null,
            "links":[{"traceId":null,"spanId":null,"traceState":null,"flags":null}],"droppedLinksCount":null,
            "status":{"code":null,"message":null},
            "attributes":[
              {"key":"a","value":null},
              {"key":null,"value":{"stringValue":null}},
              {"key":"b","value":{"arrayValue":{"values":[null,{"intValue":null}]}}},
              {"key":"c","value":{"kvlistValue":null,"boolValue":true}},
              {"key":"d","value":{"intValue":"5","stringValue":null}}
            ]}]}]}]}"#;
        let span = single_span(body);
        let expected = Span {
            attributes: vec![
                KeyValue {
                    key: "a".to_owned(),
                    value: None,
                    key_strindex: 0,
                },
                KeyValue {
                    key: String::new(),
                    value: Some(AnyValue { value: None }),
                    key_strindex: 0,
                },
                kv(
                    "b",
                    Value::ArrayValue(ArrayValue {
                        values: vec![AnyValue { value: None }, AnyValue { value: None }],
                    }),
                ),
                kv("c", Value::BoolValue(true)),
                kv("d", Value::IntValue(5)),
            ],
            events: vec![Event::default()],
            links: vec![Link::default()],
            status: Some(Status::default()),
            ..Span::default()
        };
        assert_eq!(span, expected);
        let req = decode_traces(br#"{"resourceSpans":null}"#).expect("decodes");
        assert_eq!(req, ExportTraceServiceRequest::default());
        assert_eq!(
            decode_traces(b"{}").expect("decodes"),
            ExportTraceServiceRequest::default()
        );
    }

    #[test]
    fn unknown_fields_are_ignored_everywhere() {
        let body = r#"{"extra":1,"resourceSpans":[{"x":[1,{"y":null}],"resource":{"z":{},"attributes":[
            {"key":"k","value":{"stringValue":"v","futureValue":{"a":[1,2]}},"extra":true}]},
            "scopeSpans":[{"u":"v","scope":{"name":"s","w":1},"spans":[{"unknownField":"?",
            "traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",
            "events":[{"name":"e","q":1}],"links":[{"spanId":"0102030405060708","r":[]}],
            "status":{"code":1,"details":[1]}}]}]}]}"#;
        let req = decode_traces(body.as_bytes()).expect("decodes");
        let rs = &req.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().map(|r| r.attributes.clone()),
            Some(vec![kv("k", string("v"))])
        );
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(
            rs.scope_spans[0].scope.as_ref().map(|s| s.name.as_str()),
            Some("s")
        );
        assert_eq!(span.trace_id, (1..=16).collect::<Vec<u8>>());
        assert_eq!(span.events[0].name, "e");
        assert_eq!(span.links[0].span_id, (1..=8).collect::<Vec<u8>>());
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(1));
    }

    #[test]
    fn invalid_hex_ids_decode_to_empty() {
        let span = single_span(&span_json(
            r#""traceId":"not-hex-at-all!!","spanId":"abc","parentSpanId":"","name":"kept",
               "links":[{"traceId":"zz","spanId":"0102030405060708"}]"#,
        ));
        assert!(span.trace_id.is_empty());
        assert!(span.span_id.is_empty());
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.name, "kept");
        assert!(span.links[0].trace_id.is_empty());
        assert_eq!(span.links[0].span_id, (1..=8).collect::<Vec<u8>>());
        // The wrong JSON type is a malformed request, not a bad id.
        let err = decode_err(&span_json(r#""traceId":12"#));
        assert!(err.contains("spans[0].traceId"), "{err}");
    }

    #[test]
    fn bytes_accept_standard_and_url_safe_base64() {
        for text in ["+/8=", "+/8", "-_8=", "-_8"] {
            assert_eq!(
                attr_value(&format!(r#"{{"bytesValue":"{text}"}}"#)),
                Some(Value::BytesValue(vec![0xfb, 0xff])),
                "{text}"
            );
        }
        let err = decode_err(&attr_json(r#"{"bytesValue":"!!!"}"#));
        assert!(err.contains("attributes[0].value.bytesValue"), "{err}");
        assert!(err.contains("base64"), "{err}");
    }

    #[test]
    fn malformed_json_reports_position() {
        let err = decode_err(r#"{"resourceSpans":["#);
        assert!(err.starts_with("resourceSpans[0]: "), "{err}");
        assert!(err.contains("(line 1 column 18)"), "{err}");

        let err = decode_err("{\n  \"resourceSpans\": [\n    {\"scopeSpans\": [}\n]}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("resourceSpans[0].scopeSpans"), "{err}");

        let err = decode_err("");
        assert!(err.contains("EOF"), "{err}");
        let err = decode_err("{} trailing");
        assert!(err.contains("trailing"), "{err}");
        let err = decode_err("[]");
        assert!(err.contains("expected an object"), "{err}");
    }

    #[test]
    fn wrong_types_report_path_and_position() {
        let body = r#"{"resourceSpans":[{"scopeSpans":[{},{"spans":[{},{},{},{},{"startTimeUnixNano":true}]}]}]}"#;
        let err = decode_err(body);
        let column = body.find("true").map(|i| i + 4).unwrap_or_default();
        assert_eq!(
            err,
            format!(
                "resourceSpans[0].scopeSpans[1].spans[4].startTimeUnixNano: invalid type: boolean `true`, \
                 expected an integer or a decimal string (line 1 column {column})"
            )
        );

        let err = decode_err(&span_json(r#""name":5"#));
        assert!(
            err.starts_with("resourceSpans[0].scopeSpans[0].spans[0].name: "),
            "{err}"
        );
        assert!(err.contains("expected a string"), "{err}");

        let err = decode_err(r#"{"resourceSpans":[{"scopeSpans":[{"spans":{}}]}]}"#);
        assert!(
            err.starts_with("resourceSpans[0].scopeSpans[0].spans: "),
            "{err}"
        );
        assert!(err.contains("expected an array"), "{err}");

        let err = decode_err(r#"{"resourceSpans":[{"resource":"r"}]}"#);
        assert!(err.starts_with("resourceSpans[0].resource: "), "{err}");

        let err = decode_err(&attr_json(r#"{"boolValue":"yes"}"#));
        assert!(err.contains("attributes[0].value.boolValue"), "{err}");

        let err = decode_err(&attr_json(r#"{"kvlistValue":{"values":[{"key":1}]}}"#));
        assert!(
            err.contains("attributes[0].value.kvlistValue.values[0].key"),
            "{err}"
        );

        let err = decode_err(
            r#"{"resource_spans":[{"scope_spans":[{"spans":[{"start_time_unix_nano":[]}]}]}]}"#,
        );
        assert!(
            err.starts_with("resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano: "),
            "{err}"
        );
    }

    #[test]
    fn arrays_are_not_accepted_as_messages() {
        // serde_json would otherwise bind array elements to struct fields by position.
        for (body, path) in [
            ("[]", ""),
            (r#"{"resourceSpans":[[]]}"#, "resourceSpans[0]: "),
            (
                r#"{"resourceSpans":[{"resource":[[]]}]}"#,
                "resourceSpans[0].resource: ",
            ),
            (
                r#"{"resourceSpans":[{"scopeSpans":[{"scope":["n"]}]}]}"#,
                "resourceSpans[0].scopeSpans[0].scope: ",
            ),
            (&span_json(r#""status":["m",2]"#), "spans[0].status: "),
            (&span_json(r#""events":[[1]]"#), "spans[0].events[0]: "),
            (&attr_json("[1]"), "attributes[0].value: "),
            (
                &attr_json(r#"{"arrayValue":[[]]}"#),
                "attributes[0].value.arrayValue: ",
            ),
            (
                &attr_json(r#"{"kvlistValue":[[]]}"#),
                "attributes[0].value.kvlistValue: ",
            ),
        ] {
            let err = decode_err(body);
            assert!(err.contains(path), "{body}: {err}");
            assert!(err.contains("invalid type: sequence"), "{body}: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let depth = 10_000;
        let body = attr_json(&format!(
            "{}1{}",
            r#"{"arrayValue":{"values":["#.repeat(depth),
            "]}}".repeat(depth)
        ));
        let err = decode_err(&body);
        assert!(
            err.contains("recursion limit"),
            "{}",
            &err[..err.len().min(200)]
        );
    }

    #[test]
    fn error_messages_are_bounded() {
        let huge = "x".repeat(100_000);
        let err = decode_err(&span_json(&format!(r#""kind":"{huge}""#)));
        assert!(err.len() < 1_000, "{} bytes", err.len());
        assert!(err.contains("spans[0].kind"), "{err}");
        let err = decode_err(&format!(r#"{{"{huge}":"#));
        assert!(err.len() < 1_000, "{} bytes", err.len());
    }

    #[test]
    fn encodes_responses() {
        assert_eq!(
            encode_response(&ExportTraceServiceResponse {
                partial_success: None
            }),
            "{}"
        );
        assert_eq!(
            encode_response(&ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans: 2,
                    error_message: "2 spans had invalid \"ids\"".to_owned(),
                }),
            }),
            r#"{"partialSuccess":{"rejectedSpans":"2","errorMessage":"2 spans had invalid \"ids\""}}"#
        );
        assert_eq!(
            encode_response(&ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess::default()),
            }),
            r#"{"partialSuccess":{}}"#
        );
    }

    #[test]
    fn encodes_status() {
        assert_eq!(
            encode_status(3, "bad \"json\"\n"),
            r#"{"code":3,"message":"bad \"json\"\n"}"#
        );
        assert_eq!(encode_status(0, ""), r#"{"code":0,"message":""}"#);
    }
}
