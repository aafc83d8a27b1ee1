//! OTLP trace protobuf read and written at the wire level, without decoding it.
//!
//! This module owns tailgate's view of `ExportTraceServiceRequest` bytes. It splits a request
//! into resource blocks, scope blocks and span slices that borrow from the request buffer
//! ([`parse_traces`]), re-assembles requests from such pieces ([`encode_request`]), and makes the
//! few surgical edits the collector needs on a span (add an attribute, replace `trace_state`,
//! drop attribute keys), plus attribute lookups for sampling policies.
//!
//! Why not prost: decoding allocates a `String` per attribute, and the ingest budget is about
//! 50 ns per span. Here a span costs one `Vec` push; attributes are only validated.
//!
//! What this module must never do:
//! - allocate per attribute, or per span beyond pushing a [`SpanRef`];
//! - trust a length, tag or varint from the wire: every slice is bounds-checked, the read
//!   helpers return `None` on garbage, and nothing here panics on any input;
//! - accept what prost would reject: the bytes are forwarded verbatim to exporters and peers
//!   that decode with prost, so [`parse_traces`] checks structure, wire types of known fields,
//!   UTF-8 of string fields and nesting depth of the whole request;
//! - drop or reorder what it does not understand inside a resource, scope or span: unknown
//!   fields (newer OTLP versions) are carried verbatim.

use std::fmt;
use std::str;

/// A malformed request: what is wrong and where, in English.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

/// How deep AnyValues may nest; a top-level attribute value is level 1, so at most 31
/// arrays/kvlists enclose one another. Deeper input is refused: an AnyValue at level 33 in a
/// span event would sit past prost's recursion limit of 100 nested messages, so the exporters
/// could not decode what we forward, and hostile input must not exhaust our stack either.
pub(crate) const MAX_ANY_VALUE_DEPTH: u32 = 32;

/// A request split into blocks that borrow from the request buffer.
///
/// Request-level fields other than `resource_spans` (there are none in OTLP 1.x) are dropped.
/// Empty `ResourceSpans` and `ScopeSpans` are kept as blocks with empty lists, so that
/// re-encoding a parse is lossless; callers that only care about spans skip them.
#[derive(Debug)]
pub struct ParsedTraces<'a> {
    pub resources: Vec<ResourceBlock<'a>>,
    /// spans refused for invalid ids (counted for OTLP partial_success)
    pub(crate) rejected_spans: u64,
    /// English description of the first rejection, e.g. "span 3 of scope 0 of resource 1:
    /// trace_id must be 16 non-zero bytes, got 0 bytes"
    pub(crate) rejection: Option<String>,
}

/// One `ResourceSpans`.
#[derive(Debug)]
pub struct ResourceBlock<'a> {
    /// Every field of the ResourceSpans except scope_spans (field 2), verbatim WITH tags
    /// (resource, schema_url, unknown fields), in original order. Re-emitting these bytes
    /// followed by new scope_spans entries yields a valid ResourceSpans.
    pub(crate) fields: Vec<u8>,
    /// Raw bytes of the Resource message (field 1), empty if absent. If the field repeats
    /// (protobuf would merge the occurrences) this is the last one.
    pub(crate) resource: &'a [u8],
    pub(crate) scopes: Vec<ScopeBlock<'a>>,
}

/// One `ScopeSpans`.
#[derive(Debug)]
pub(crate) struct ScopeBlock<'a> {
    /// Every field of the ScopeSpans except spans (field 2), verbatim with tags.
    pub(crate) fields: Vec<u8>,
    pub(crate) spans: Vec<SpanRef<'a>>,
}

/// A validated span and the fields the collector routes and samples on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpanRef<'a> {
    /// the Span message body (without its own tag/length)
    pub(crate) bytes: &'a [u8],
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    /// all zero = no parent (root)
    pub(crate) parent_span_id: [u8; 8],
    pub(crate) start_time_unix_nano: u64,
    pub(crate) end_time_unix_nano: u64,
    pub(crate) status_code: i32,
    pub(crate) kind: i32,
    pub(crate) name: &'a str,
    /// Whether the span carries a non-empty `trace_state` (its last occurrence).
    pub(crate) has_trace_state: bool,
}

/// Validates a whole `ExportTraceServiceRequest` and splits it into blocks and spans.
///
/// Structural problems anywhere make the whole request an error, as they would for prost.
/// Spans with unusable ids are not errors: they are left out, counted and described, so the
/// receiver can answer with an OTLP partial success.
pub fn parse_traces(buf: &[u8]) -> Result<ParsedTraces<'_>, WireError> {
    parse_traces_within(buf, u64::MAX).map_err(|e| match e {
        Unparsed::Malformed(e) => e,
        too_many => WireError(too_many.to_string()),
    })
}

/// Why [`parse_traces_within`] did not parse a request.
#[derive(Debug)]
pub(crate) enum Unparsed {
    Malformed(WireError),
    /// More than this many spans, or resource and scope blocks; the parse stopped there, so
    /// what such a request would have cost was never allocated.
    TooManySpans(u64),
}

impl fmt::Display for Unparsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unparsed::Malformed(e) => e.fmt(f),
            Unparsed::TooManySpans(max) => write!(
                f,
                "more than {max} spans (or resource or scope blocks) in one request; split it \
                 into smaller ones"
            ),
        }
    }
}

/// [`parse_traces`], stopping with [`Unparsed::TooManySpans`] past `max_spans` spans or
/// blocks: each costs a push here, however few bytes it took on the wire (an empty span is 2).
pub(crate) fn parse_traces_within(
    buf: &[u8],
    max_spans: u64,
) -> Result<ParsedTraces<'_>, Unparsed> {
    let mut tally = Tally {
        max_items: max_spans,
        ..Tally::default()
    };
    let parsed = parse_with(buf, &mut tally);
    match parsed {
        Err(_) if tally.over => Err(Unparsed::TooManySpans(max_spans)),
        Err(e) => Err(Unparsed::Malformed(e)),
        Ok(resources) => Ok(ParsedTraces {
            resources,
            rejected_spans: tally.count,
            rejection: tally.first,
        }),
    }
}

fn parse_with<'a>(buf: &'a [u8], tally: &mut Tally) -> Result<Vec<ResourceBlock<'a>>, WireError> {
    let mut resources = Vec::new();
    let mut r = Reader::new(buf, 0, "ExportTraceServiceRequest");
    while let Some(f) = r.next()? {
        if f.number == 1 {
            tally.block()?;
            let body = r.message(&f, "resource_spans", "ResourceSpans")?;
            let index = resources.len();
            resources.push(parse_resource_spans(body, index, tally)?);
        }
    }
    Ok(resources)
}

/// Rejected spans, counted for partial_success (only the first is worth describing), and
/// the spans and blocks seen, against the request's limit.
#[derive(Default)]
struct Tally {
    count: u64,
    first: Option<String>,
    spans: u64,
    blocks: u64,
    max_items: u64,
    over: bool,
}

impl Tally {
    /// One more span; past the limit the parse stops (the caller names why).
    fn span(&mut self) -> Result<(), WireError> {
        self.spans += 1;
        self.check(self.spans)
    }

    /// One more resource or scope block, held to the same limit as spans.
    fn block(&mut self) -> Result<(), WireError> {
        self.blocks += 1;
        self.check(self.blocks)
    }

    fn check(&mut self, n: u64) -> Result<(), WireError> {
        if n > self.max_items {
            self.over = true;
            return Err(WireError(String::new()));
        }
        Ok(())
    }

    fn reject(&mut self, at: SpanAt, fault: IdFault) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!(
                "span {} of scope {} of resource {}: {fault}",
                at.span, at.scope, at.resource
            ));
        }
    }
}

/// Where a span sits in the request, by occurrence order (rejected spans count too).
#[derive(Clone, Copy)]
struct SpanAt {
    resource: usize,
    scope: usize,
    span: usize,
}

/// Why a span's ids make it unusable; the lengths are what was received.
#[derive(Clone, Copy, Debug)]
enum IdFault {
    Trace(usize),
    Span(usize),
    Parent(usize),
}

impl fmt::Display for IdFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IdFault::Trace(16) => {
                f.write_str("trace_id must be 16 non-zero bytes, got 16 zero bytes")
            }
            IdFault::Trace(n) => write!(f, "trace_id must be 16 non-zero bytes, got {n} bytes"),
            IdFault::Span(8) => f.write_str("span_id must be 8 non-zero bytes, got 8 zero bytes"),
            IdFault::Span(n) => write!(f, "span_id must be 8 non-zero bytes, got {n} bytes"),
            IdFault::Parent(n) => {
                write!(f, "parent_span_id must be empty or 8 bytes, got {n} bytes")
            }
        }
    }
}

fn parse_resource_spans<'a>(
    mut r: Reader<'a>,
    resource: usize,
    tally: &mut Tally,
) -> Result<ResourceBlock<'a>, WireError> {
    let mut block = ResourceBlock {
        fields: Vec::new(),
        resource: &[],
        scopes: Vec::new(),
    };
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                let body = r.message(&f, "resource", "Resource")?;
                block.resource = body.buf;
                check_resource(body)?;
            }
            2 => {
                tally.block()?;
                let body = r.message(&f, "scope_spans", "ScopeSpans")?;
                let scope = block.scopes.len();
                block
                    .scopes
                    .push(parse_scope_spans(body, resource, scope, tally)?);
                continue;
            }
            3 => {
                r.utf8(&f, "schema_url")?;
            }
            _ => {}
        }
        block.fields.extend_from_slice(r.raw(&f));
    }
    Ok(block)
}

fn parse_scope_spans<'a>(
    mut r: Reader<'a>,
    resource: usize,
    scope: usize,
    tally: &mut Tally,
) -> Result<ScopeBlock<'a>, WireError> {
    let mut block = ScopeBlock {
        fields: Vec::new(),
        spans: Vec::new(),
    };
    let mut span = 0;
    while let Some(f) = r.next()? {
        match f.number {
            1 => check_scope(r.message(&f, "scope", "InstrumentationScope")?)?,
            2 => {
                tally.span()?;
                match parse_span(r.message(&f, "spans", "Span")?)? {
                    Ok(valid) => block.spans.push(valid),
                    Err(fault) => tally.reject(
                        SpanAt {
                            resource,
                            scope,
                            span,
                        },
                        fault,
                    ),
                }
                span += 1;
                continue;
            }
            3 => {
                r.utf8(&f, "schema_url")?;
            }
            _ => {}
        }
        block.fields.extend_from_slice(r.raw(&f));
    }
    Ok(block)
}

/// Outer error: the span is malformed (the whole request is). Inner error: the span is
/// well-formed but its ids make it unusable.
fn parse_span(mut r: Reader<'_>) -> Result<Result<SpanRef<'_>, IdFault>, WireError> {
    let mut span = SpanRef {
        bytes: r.buf,
        trace_id: [0; 16],
        span_id: [0; 8],
        parent_span_id: [0; 8],
        start_time_unix_nano: 0,
        end_time_unix_nano: 0,
        status_code: 0,
        kind: 0,
        name: "",
        has_trace_state: false,
    };
    // Ids are checked only once the last occurrence of each is known.
    let (mut trace_id, mut span_id, mut parent): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    while let Some(f) = r.next()? {
        match f.number {
            1 => trace_id = r.bytes(&f, "trace_id")?,
            2 => span_id = r.bytes(&f, "span_id")?,
            3 => span.has_trace_state = !r.utf8(&f, "trace_state")?.is_empty(),
            4 => parent = r.bytes(&f, "parent_span_id")?,
            5 => span.name = r.string(&f, "name")?,
            // prost truncates enum varints to i32 the same way.
            6 => span.kind = r.varint(&f, "kind")? as i32,
            7 => span.start_time_unix_nano = r.fixed64(&f, "start_time_unix_nano")?,
            8 => span.end_time_unix_nano = r.fixed64(&f, "end_time_unix_nano")?,
            9 => check_key_value(r.message(&f, "attributes", "KeyValue")?, 1)?,
            10 => {
                r.varint(&f, "dropped_attributes_count")?;
            }
            11 => check_event(r.message(&f, "events", "Event")?)?,
            12 => {
                r.varint(&f, "dropped_events_count")?;
            }
            13 => check_link(r.message(&f, "links", "Link")?)?,
            14 => {
                r.varint(&f, "dropped_links_count")?;
            }
            // Repeated Status messages merge: a later one without a code keeps the earlier code.
            15 => {
                if let Some(code) = check_status(r.message(&f, "status", "Status")?)? {
                    span.status_code = code;
                }
            }
            16 => {
                r.fixed32(&f, "flags")?;
            }
            _ => {}
        }
    }
    let Some(id) = nonzero_id(trace_id) else {
        return Ok(Err(IdFault::Trace(trace_id.len())));
    };
    span.trace_id = id;
    let Some(id) = nonzero_id(span_id) else {
        return Ok(Err(IdFault::Span(span_id.len())));
    };
    span.span_id = id;
    if !parent.is_empty() {
        let Ok(id) = parent.try_into() else {
            return Ok(Err(IdFault::Parent(parent.len())));
        };
        span.parent_span_id = id;
    }
    Ok(Ok(span))
}

fn nonzero_id<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    let id: [u8; N] = bytes.try_into().ok()?;
    (id != [0; N]).then_some(id)
}

// Validators for the messages nested in a span or block. They only need to fail where prost
// would, so each checks the wire type of every known field and UTF-8 of every string field.

fn check_resource(mut r: Reader<'_>) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        match f.number {
            1 => check_key_value(r.message(&f, "attributes", "KeyValue")?, 1)?,
            2 => {
                r.varint(&f, "dropped_attributes_count")?;
            }
            3 => check_entity_ref(r.message(&f, "entity_refs", "EntityRef")?)?,
            _ => {}
        }
    }
    Ok(())
}

fn check_entity_ref(mut r: Reader<'_>) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        let name = match f.number {
            1 => "schema_url",
            2 => "type",
            3 => "id_keys",
            4 => "description_keys",
            _ => continue,
        };
        r.utf8(&f, name)?;
    }
    Ok(())
}

fn check_scope(mut r: Reader<'_>) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                r.utf8(&f, "name")?;
            }
            2 => {
                r.utf8(&f, "version")?;
            }
            3 => check_key_value(r.message(&f, "attributes", "KeyValue")?, 1)?,
            4 => {
                r.varint(&f, "dropped_attributes_count")?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_event(mut r: Reader<'_>) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                r.fixed64(&f, "time_unix_nano")?;
            }
            2 => {
                r.utf8(&f, "name")?;
            }
            3 => check_key_value(r.message(&f, "attributes", "KeyValue")?, 1)?,
            4 => {
                r.varint(&f, "dropped_attributes_count")?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_link(mut r: Reader<'_>) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                r.bytes(&f, "trace_id")?;
            }
            2 => {
                r.bytes(&f, "span_id")?;
            }
            3 => {
                r.utf8(&f, "trace_state")?;
            }
            4 => check_key_value(r.message(&f, "attributes", "KeyValue")?, 1)?,
            5 => {
                r.varint(&f, "dropped_attributes_count")?;
            }
            6 => {
                r.fixed32(&f, "flags")?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Returns the status code if this Status message sets one.
fn check_status(mut r: Reader<'_>) -> Result<Option<i32>, WireError> {
    let mut code = None;
    while let Some(f) = r.next()? {
        match f.number {
            2 => {
                r.utf8(&f, "message")?;
            }
            3 => code = Some(r.varint(&f, "code")? as i32),
            _ => {}
        }
    }
    Ok(code)
}

/// `level` is the nesting level of this KeyValue's AnyValue (1 for a top-level attribute).
#[inline(always)]
fn check_key_value(r: Reader<'_>, level: u32) -> Result<(), WireError> {
    if is_plain_scalar_attribute(r.buf) {
        return Ok(());
    }
    check_key_value_fields(r, level)
}

#[inline(never)]
fn check_key_value_fields(mut r: Reader<'_>, level: u32) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                r.utf8(&f, "key")?;
            }
            2 => check_any_value(r.message(&f, "value", "AnyValue")?, level)?,
            3 => {
                r.varint(&f, "key_strindex")?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Fast path for the attribute SDKs emit most: a plain KeyValue (see [`split_plain_key_value`])
/// with an ASCII key and a scalar value (short ASCII string, bool, int or double). Attributes
/// are most of a span's fields, and the general field loop costs several times more. `true`
/// only if the general path would accept `kv` too; `false` means "take the general path",
/// which also produces the error messages.
#[inline(always)]
fn is_plain_scalar_attribute(kv: &[u8]) -> bool {
    let Some((key, value)) = split_plain_key_value(kv) else {
        return false;
    };
    is_ascii(key)
        && match value {
            [0x0a, len @ 0..0x80, text @ ..] => usize::from(*len) == text.len() && is_ascii(text),
            [0x10, 0..0x80] | [0x21, _, _, _, _, _, _, _, _] => true,
            [0x18, int @ ..] => matches!(read_varint(int, 0), Ok((_, end)) if end == int.len()),
            _ => false,
        }
}

/// The KeyValue layout SDKs emit: key (field 1) then value (field 2), each once and under 128
/// bytes. Returns the key bytes and the AnyValue body, or `None` for any other layout (which
/// may still be valid, so callers fall back to the general field loop).
#[inline(always)]
fn split_plain_key_value(kv: &[u8]) -> Option<(&[u8], &[u8])> {
    let [0x0a, key_len @ 0..0x80, rest @ ..] = kv else {
        return None;
    };
    let (key, rest) = rest.split_at_checked(usize::from(*key_len))?;
    let [0x12, value_len @ 0..0x80, value @ ..] = rest else {
        return None;
    };
    (usize::from(*value_len) == value.len()).then_some((key, value))
}

fn check_any_value(mut r: Reader<'_>, level: u32) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        match f.number {
            1 => {
                r.utf8(&f, "string_value")?;
            }
            2 => {
                r.varint(&f, "bool_value")?;
            }
            3 => {
                r.varint(&f, "int_value")?;
            }
            4 => {
                r.fixed64(&f, "double_value")?;
            }
            5 => {
                let body = r.container(&f, "array_value", "ArrayValue", level)?;
                check_array(body, level + 1)?;
            }
            6 => {
                let body = r.container(&f, "kvlist_value", "KeyValueList", level)?;
                check_kvlist(body, level + 1)?;
            }
            7 => {
                r.bytes(&f, "bytes_value")?;
            }
            8 => {
                r.varint(&f, "string_value_strindex")?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_array(mut r: Reader<'_>, level: u32) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        if f.number == 1 {
            check_any_value(r.message(&f, "values", "AnyValue")?, level)?;
        }
    }
    Ok(())
}

fn check_kvlist(mut r: Reader<'_>, level: u32) -> Result<(), WireError> {
    while let Some(f) = r.next()? {
        if f.number == 1 {
            check_key_value(r.message(&f, "values", "KeyValue")?, level)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// A `ResourceSpans` to encode: its non-scope fields verbatim, then its scopes.
pub(crate) struct EncodeResource<'a> {
    pub(crate) fields: &'a [u8],
    pub(crate) scopes: Vec<EncodeScope<'a>>,
}

/// A `ScopeSpans` to encode: its non-span fields verbatim, then its spans.
pub(crate) struct EncodeScope<'a> {
    pub(crate) fields: &'a [u8],
    pub(crate) spans: Vec<EncodeSpan<'a>>,
}

/// A span body to encode: `bytes` followed by `extra`, already-encoded fields appended after
/// them (protobuf merges repeated fields; a later singular field overrides).
#[derive(Clone, Copy)]
pub(crate) struct EncodeSpan<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) extra: &'a [u8],
}

/// Key of a length-delimited field 1 (`resource_spans` in the request).
const TAG_1_LEN: u8 = 1 << 3 | 2;
/// Key of a length-delimited field 2 (`scope_spans`, `spans`).
const TAG_2_LEN: u8 = 2 << 3 | 2;
/// Key of `Span.trace_state`.
const TAG_SPAN_TRACE_STATE: u8 = 3 << 3 | 2;
/// Key of `Span.attributes`.
const TAG_SPAN_ATTRIBUTES: u8 = 9 << 3 | 2;

/// Encodes an ExportTraceServiceRequest (exact lengths computed up front, one allocation, no
/// re-decoding).
pub(crate) fn encode_request(resources: &[EncodeResource<'_>]) -> Vec<u8> {
    let total = encoded_request_len(resources);
    let mut out = Vec::with_capacity(total);
    for resource in resources {
        put_len_prefix(&mut out, TAG_1_LEN, resource_len(resource));
        out.extend_from_slice(resource.fields);
        for scope in &resource.scopes {
            put_len_prefix(&mut out, TAG_2_LEN, scope_len(scope));
            out.extend_from_slice(scope.fields);
            for span in &scope.spans {
                put_len_prefix(&mut out, TAG_2_LEN, span_len(span));
                out.extend_from_slice(span.bytes);
                out.extend_from_slice(span.extra);
            }
        }
    }
    debug_assert_eq!(out.len(), total);
    out
}

/// The exact length of what [`encode_request`] produces.
pub(crate) fn encoded_request_len(resources: &[EncodeResource<'_>]) -> usize {
    resources.iter().map(|r| field_len(resource_len(r))).sum()
}

fn resource_len(resource: &EncodeResource<'_>) -> usize {
    let scopes: usize = resource
        .scopes
        .iter()
        .map(|s| field_len(scope_len(s)))
        .sum();
    resource.fields.len() + scopes
}

fn scope_len(scope: &EncodeScope<'_>) -> usize {
    let spans: usize = scope.spans.iter().map(|s| field_len(span_len(s))).sum();
    scope.fields.len() + spans
}

fn span_len(span: &EncodeSpan<'_>) -> usize {
    span.bytes.len() + span.extra.len()
}

/// Encoded size of a length-delimited field with a one-byte key (field numbers 1 to 15).
fn field_len(body: usize) -> usize {
    1 + varint_len(body as u64) + body
}

fn put_len_prefix(out: &mut Vec<u8>, key: u8, len: usize) {
    out.push(key);
    put_varint(out, len as u64);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Append an encoded Span.attributes entry (field 9, KeyValue) with a string value to `out`:
/// the values the collector writes (sampling decisions and the like) are strings.
pub(crate) fn append_attribute(out: &mut Vec<u8>, key: &str, value: &str) {
    let any_len = field_len(value.len());
    let kv_len = field_len(key.len()) + field_len(any_len);
    out.reserve(field_len(kv_len));
    put_len_prefix(out, TAG_SPAN_ATTRIBUTES, kv_len);
    put_len_prefix(out, TAG_1_LEN, key.len());
    out.extend_from_slice(key.as_bytes());
    put_len_prefix(out, TAG_2_LEN, any_len);
    put_len_prefix(out, 1 << 3 | 2, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// A trace request with every span's attribute `key` set to `value`, whatever the span held
/// (the entries it had under `key` are removed first). Spans with bad ids are left out, and
/// counted in the second value as [`parse_traces`] counts them.
pub(crate) fn with_span_attribute(
    body: &[u8],
    key: &str,
    value: &str,
    max_spans: u64,
) -> Result<(Vec<u8>, u64, Option<String>), Unparsed> {
    let parsed = parse_traces_within(body, max_spans)?;
    let mut rewritten: Vec<Vec<u8>> = Vec::new();
    for resource in &parsed.resources {
        for scope in &resource.scopes {
            for span in &scope.spans {
                let mut out = Vec::with_capacity(span.bytes.len() + key.len() + value.len() + 8);
                rewrite_span_without_keys(span.bytes, &[key], &mut out);
                append_attribute(&mut out, key, value);
                rewritten.push(out);
            }
        }
    }
    let mut next = rewritten.iter();
    let encoded = encode_parsed(&parsed, |_| next.next().expect("one rewrite per span"));
    Ok((encoded, parsed.rejected_spans, parsed.rejection))
}

/// Encodes a parsed request again, each span's body being what `span_bytes` gives for it (in
/// order), with every resource and scope field as it arrived.
pub(crate) fn encode_parsed<'b>(
    parsed: &'b ParsedTraces<'_>,
    mut span_bytes: impl FnMut(&'b SpanRef<'_>) -> &'b [u8],
) -> Vec<u8> {
    let resources: Vec<EncodeResource<'_>> = parsed
        .resources
        .iter()
        .map(|resource| EncodeResource {
            fields: &resource.fields,
            scopes: resource
                .scopes
                .iter()
                .map(|scope| EncodeScope {
                    fields: &scope.fields,
                    spans: scope
                        .spans
                        .iter()
                        .map(|span| EncodeSpan {
                            bytes: span_bytes(span),
                            extra: &[],
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    encode_request(&resources)
}

/// Append an encoded Span.trace_state (field 3) to `out`; later occurrence wins on decode.
pub(crate) fn append_trace_state(out: &mut Vec<u8>, value: &str) {
    out.reserve(field_len(value.len()));
    put_len_prefix(out, TAG_SPAN_TRACE_STATE, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// Rewrite a span without any attributes whose key is in `drop_keys`, i.e. copy every field
/// except those attribute entries. Used before overwriting an attribute, so keys stay unique.
///
/// Everything from the first unreadable byte on is copied verbatim (validated spans have none).
pub(crate) fn rewrite_span_without_keys(span: &[u8], drop_keys: &[&str], out: &mut Vec<u8>) {
    rewrite_span_without_attributes(span, out, |key, _| {
        drop_keys.iter().any(|d| d.as_bytes() == key)
    });
}

/// Copies `span` into `out` without the attributes `drop(key, value)` picks (value: the
/// AnyValue's body). Kept fields are copied in runs, so a span that loses none is one memcpy.
fn rewrite_span_without_attributes(
    span: &[u8],
    out: &mut Vec<u8>,
    drop: impl Fn(&[u8], &[u8]) -> bool,
) {
    out.reserve(span.len());
    let mut run_start = 0;
    for f in Fields::new(span) {
        let dropped = f.number == 9
            && matches!(f.value, Value::Len(kv) if key_value(kv)
                .is_some_and(|(key, value)| drop(key, value)));
        if dropped {
            out.extend_from_slice(span.get(run_start..f.start).unwrap_or_default());
            run_start = f.end;
        }
    }
    out.extend_from_slice(span.get(run_start..).unwrap_or_default());
}

/// Rewrite a span without the attributes that may hold text: every one but those whose value
/// is a bool, an int, a double or empty (strings, bytes, arrays and lists, and anything that
/// does not read as an AnyValue, go). Every other field is copied as is.
pub(crate) fn rewrite_span_without_string_attributes(span: &[u8], out: &mut Vec<u8>) {
    rewrite_span_without_attributes(span, out, |_, value| {
        !matches!(
            any_value(value),
            Some(
                AnyValueRef::Bool(_)
                    | AnyValueRef::Int(_)
                    | AnyValueRef::Double(_)
                    | AnyValueRef::Empty
            )
        )
    });
}

// ---------------------------------------------------------------------------------------------
// Reading helpers, for bytes that parse_traces already validated. They still take any input:
// garbage gives None (or stops an iteration), never a panic.

/// An attribute value borrowed from the wire. `Array` and `KvList` are the bodies of the
/// ArrayValue / KeyValueList messages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum AnyValueRef<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    Array(&'a [u8]),
    KvList(&'a [u8]),
    /// No value set, or only a profiling string-table index (meaningless for traces).
    Empty,
}

/// Look up an attribute of a Span (field 9) by key; if the key repeats, the last one wins.
/// `None` if the key is absent or the span is malformed.
#[cfg(test)]
pub(crate) fn span_attribute<'a>(span: &'a [u8], key: &str) -> Option<AnyValueRef<'a>> {
    find_attribute(span, 9, key)
}

/// Look up an attribute of a Resource message body (field 1) by key.
pub(crate) fn resource_attribute<'a>(resource: &'a [u8], key: &str) -> Option<AnyValueRef<'a>> {
    find_attribute(resource, 1, key)
}

/// Calls `f(key, value)` for each attribute of a span in wire order, with `key` the key bytes
/// and `value` the AnyValue body, both slices of `span`. Returns false if the span is
/// malformed (after calling `f` for the attributes before the fault).
pub(crate) fn for_each_span_attribute<'a>(
    span: &'a [u8],
    mut f: impl FnMut(&'a [u8], &'a [u8]),
) -> bool {
    let mut fields = Fields::new(span);
    for field in &mut fields {
        if field.number != 9 {
            continue;
        }
        let Value::Len(kv) = field.value else {
            return false;
        };
        let Some((key, value)) = key_value(kv) else {
            return false;
        };
        f(key, value);
    }
    fields.clean
}

/// The span's trace_state string ("" if absent, last occurrence wins; "" on garbage).
pub(crate) fn span_trace_state(span: &[u8]) -> &str {
    last_string_field(span, 3)
}

/// The span's name ("" if absent or on garbage).
pub(crate) fn span_name(span: &[u8]) -> &str {
    last_string_field(span, 5)
}

/// The span's status message ("" if absent or on garbage).
pub(crate) fn span_status_message(span: &[u8]) -> &str {
    let mut status: &[u8] = &[];
    let mut fields = Fields::new(span);
    for f in &mut fields {
        if let (15, Value::Len(b)) = (f.number, f.value) {
            status = b;
        }
    }
    if fields.clean {
        last_string_field(status, 2)
    } else {
        ""
    }
}

/// The values of an `ArrayValue` body (as found in [`AnyValueRef::Array`]).
pub(crate) fn array_values(array: &[u8]) -> impl Iterator<Item = AnyValueRef<'_>> {
    Fields::new(array).filter_map(|f| match (f.number, f.value) {
        (1, Value::Len(b)) => any_value(b),
        _ => None,
    })
}

/// The entries of a `KeyValueList` body (as found in [`AnyValueRef::KvList`]).
pub(crate) fn kvlist_entries(list: &[u8]) -> impl Iterator<Item = (&str, AnyValueRef<'_>)> {
    Fields::new(list).filter_map(|f| match (f.number, f.value) {
        (1, Value::Len(kv)) => {
            let (key, value) = key_value(kv)?;
            Some((str::from_utf8(key).ok()?, any_value(value)?))
        }
        _ => None,
    })
}

/// The last occurrence of a string field ("" if absent; "" on garbage).
fn last_string_field(message: &[u8], number: u32) -> &str {
    let mut found = "";
    let mut fields = Fields::new(message);
    for f in &mut fields {
        if f.number == number {
            let Value::Len(bytes) = f.value else {
                return "";
            };
            let Ok(s) = str::from_utf8(bytes) else {
                return "";
            };
            found = s;
        }
    }
    if fields.clean { found } else { "" }
}

fn find_attribute<'a>(message: &'a [u8], field: u32, key: &str) -> Option<AnyValueRef<'a>> {
    // Values are decoded only for matching keys: most attributes are skipped unread.
    let mut found = None;
    let mut fields = Fields::new(message);
    for f in &mut fields {
        if f.number != field {
            continue;
        }
        let Value::Len(kv) = f.value else { return None };
        let (k, value) = key_value(kv)?;
        if k == key.as_bytes() {
            found = Some(value);
        }
    }
    if !fields.clean {
        return None;
    }
    any_value(found?)
}

/// The key bytes and AnyValue body of a KeyValue (last occurrence of each wins; a repeated
/// value message would merge in protobuf, which no SDK produces). An absent value reads as an
/// empty AnyValue body.
fn key_value(kv: &[u8]) -> Option<(&[u8], &[u8])> {
    split_plain_key_value(kv).or_else(|| key_value_fields(kv))
}

fn key_value_fields(kv: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    let mut fields = Fields::new(kv);
    for f in &mut fields {
        match (f.number, f.value) {
            (1, Value::Len(b)) => key = b,
            (2, Value::Len(b)) => value = b,
            (3, Value::Varint(_)) => {}
            (1..=3, _) => return None,
            _ => {}
        }
    }
    fields.clean.then_some((key, value))
}

/// Decodes an AnyValue body (as [`for_each_span_attribute`] gives it).
pub(crate) fn any_value(body: &[u8]) -> Option<AnyValueRef<'_>> {
    let mut value = AnyValueRef::Empty;
    let mut fields = Fields::new(body);
    for f in &mut fields {
        value = match (f.number, f.value) {
            (1, Value::Len(b)) => AnyValueRef::Str(str::from_utf8(b).ok()?),
            (2, Value::Varint(v)) => AnyValueRef::Bool(v != 0),
            (3, Value::Varint(v)) => AnyValueRef::Int(v as i64),
            (4, Value::Fixed64(v)) => AnyValueRef::Double(f64::from_bits(v)),
            (5, Value::Len(b)) => AnyValueRef::Array(b),
            (6, Value::Len(b)) => AnyValueRef::KvList(b),
            (7, Value::Len(b)) => AnyValueRef::Bytes(b),
            (8, Value::Varint(_)) => AnyValueRef::Empty,
            (1..=8, _) => return None,
            _ => continue,
        };
    }
    fields.clean.then_some(value)
}

// ---------------------------------------------------------------------------------------------
// Low-level field reading

/// One field as read from the wire.
#[derive(Clone, Copy)]
struct Field<'a> {
    number: u32,
    value: Value<'a>,
    /// offsets of the key and of the byte after the field in the enclosing message body
    start: usize,
    end: usize,
}

#[derive(Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Len(&'a [u8]),
    Fixed32(u32),
}

impl Value<'_> {
    fn wire_name(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64(_) => "fixed64",
            Value::Len(_) => "length-delimited",
            Value::Fixed32(_) => "fixed32",
        }
    }
}

/// Why a field could not be read; turned into English only on the error path.
#[derive(Clone, Copy, Debug)]
enum Fault {
    TagTruncated,
    TagMalformed,
    TagTooLarge(u64),
    FieldZero,
    Group {
        field: u32,
        wire: u32,
    },
    WireType {
        field: u32,
        wire: u32,
    },
    VarintTruncated(u32),
    VarintMalformed(u32),
    FixedTruncated {
        field: u32,
        width: usize,
    },
    LenPrefixTruncated(u32),
    LenPrefixMalformed(u32),
    LenTruncated {
        field: u32,
        len: u64,
        remaining: usize,
    },
}

#[derive(Clone, Copy)]
enum VarintFault {
    Truncated,
    /// longer than 10 bytes, or a 10th byte that overflows 64 bits (prost rejects both)
    Malformed,
}

#[inline(always)]
fn read_varint(buf: &[u8], pos: usize) -> Result<(u64, usize), VarintFault> {
    match buf.get(pos) {
        Some(&b) if b < 0x80 => Ok((u64::from(b), pos + 1)),
        Some(_) => read_varint_multibyte(buf, pos),
        None => Err(VarintFault::Truncated),
    }
}

fn read_varint_multibyte(buf: &[u8], pos: usize) -> Result<(u64, usize), VarintFault> {
    let mut value = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(pos + i) else {
            return Err(VarintFault::Truncated);
        };
        if i == 9 && b > 1 {
            return Err(VarintFault::Malformed);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok((value, pos + i + 1));
        }
    }
    Err(VarintFault::Malformed)
}

#[inline(always)]
fn read_field(buf: &[u8], start: usize) -> Result<Field<'_>, Fault> {
    let (key, pos) = read_varint(buf, start).map_err(|e| match e {
        VarintFault::Truncated => Fault::TagTruncated,
        VarintFault::Malformed => Fault::TagMalformed,
    })?;
    let key = u32::try_from(key).map_err(|_| Fault::TagTooLarge(key))?;
    let (field, wire) = (key >> 3, key & 7);
    if field == 0 {
        return Err(Fault::FieldZero);
    }
    let (value, end) = match wire {
        0 => {
            let (v, end) = read_varint(buf, pos).map_err(|e| match e {
                VarintFault::Truncated => Fault::VarintTruncated(field),
                VarintFault::Malformed => Fault::VarintMalformed(field),
            })?;
            (Value::Varint(v), end)
        }
        1 => {
            let bytes = fixed::<8>(buf, pos).ok_or(Fault::FixedTruncated { field, width: 8 })?;
            (Value::Fixed64(u64::from_le_bytes(bytes)), pos + 8)
        }
        2 => read_len(buf, pos, field)?,
        5 => {
            let bytes = fixed::<4>(buf, pos).ok_or(Fault::FixedTruncated { field, width: 4 })?;
            (Value::Fixed32(u32::from_le_bytes(bytes)), pos + 4)
        }
        3 | 4 => return Err(Fault::Group { field, wire }),
        _ => return Err(Fault::WireType { field, wire }),
    };
    Ok(Field {
        number: field,
        value,
        start,
        end,
    })
}

#[inline(always)]
fn read_len(buf: &[u8], pos: usize, field: u32) -> Result<(Value<'_>, usize), Fault> {
    let (len, body_start) = read_varint(buf, pos).map_err(|e| match e {
        VarintFault::Truncated => Fault::LenPrefixTruncated(field),
        VarintFault::Malformed => Fault::LenPrefixMalformed(field),
    })?;
    let remaining = buf.len().saturating_sub(body_start);
    let truncated = Fault::LenTruncated {
        field,
        len,
        remaining,
    };
    let len = usize::try_from(len).map_err(|_| truncated)?;
    let end = body_start.checked_add(len).ok_or(truncated)?;
    let body = buf.get(body_start..end).ok_or(truncated)?;
    Ok((Value::Len(body), end))
}

/// Most OTLP strings are short ASCII, for which std's UTF-8 validator has a high fixed cost
/// per call; this checks eight bytes at a time.
#[inline(always)]
fn is_ascii(bytes: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    if let Some(last) = bytes.last_chunk::<8>() {
        let (words, _) = bytes.as_chunks::<8>();
        // The last eight bytes overlap the words and cover the tail the words leave out.
        let mut seen = u64::from_ne_bytes(*last);
        for word in words {
            seen |= u64::from_ne_bytes(*word);
        }
        seen & HIGH == 0
    } else if let (Some(first), Some(last)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        (u32::from_ne_bytes(*first) | u32::from_ne_bytes(*last)) & HIGH as u32 == 0
    } else {
        bytes.iter().all(u8::is_ascii)
    }
}

fn fixed<const N: usize>(buf: &[u8], pos: usize) -> Option<[u8; N]> {
    buf.get(pos..pos.checked_add(N)?)?.try_into().ok()
}

/// Lenient field iterator for the read helpers: stops at the first malformed byte and
/// records that in `clean`.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    clean: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields {
            buf,
            pos: 0,
            clean: true,
        }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Field<'a>;

    fn next(&mut self) -> Option<Field<'a>> {
        if self.pos >= self.buf.len() {
            return None;
        }
        match read_field(self.buf, self.pos) {
            Ok(f) => {
                self.pos = f.end;
                Some(f)
            }
            Err(_) => {
                self.clean = false;
                self.pos = self.buf.len();
                None
            }
        }
    }
}

/// Strict field reader for validation: every problem becomes a [`WireError`] naming the
/// message, the field and the absolute byte offset in the request.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// offset of `buf` in the whole request, for error messages
    base: usize,
    /// message type name, for error messages
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, msg: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            base,
            msg,
        }
    }

    #[inline(always)]
    fn next(&mut self) -> Result<Option<Field<'a>>, WireError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        match read_field(self.buf, self.pos) {
            Ok(f) => {
                self.pos = f.end;
                Ok(Some(f))
            }
            Err(fault) => Err(self.malformed(fault)),
        }
    }

    /// A reader over the body of a length-delimited field holding message type `msg`.
    fn message(
        &self,
        f: &Field<'a>,
        name: &str,
        msg: &'static str,
    ) -> Result<Reader<'a>, WireError> {
        let body = self.bytes(f, name)?;
        Ok(Reader::new(body, self.body_at(f, body), msg))
    }

    /// Like [`Reader::message`] for an ArrayValue/KeyValueList inside an AnyValue at `level`.
    fn container(
        &self,
        f: &Field<'a>,
        name: &str,
        msg: &'static str,
        level: u32,
    ) -> Result<Reader<'a>, WireError> {
        if level >= MAX_ANY_VALUE_DEPTH {
            return Err(WireError(format!(
                "AnyValue nested deeper than {MAX_ANY_VALUE_DEPTH} levels: field {} ({name}) in {} at byte {}",
                f.number,
                self.msg,
                self.base + f.start
            )));
        }
        self.message(f, name, msg)
    }

    fn bytes(&self, f: &Field<'a>, name: &str) -> Result<&'a [u8], WireError> {
        match f.value {
            Value::Len(b) => Ok(b),
            _ => Err(self.wrong_wire_type(f, name, "length-delimited")),
        }
    }

    fn string(&self, f: &Field<'a>, name: &str) -> Result<&'a str, WireError> {
        let bytes = self.bytes(f, name)?;
        str::from_utf8(bytes).map_err(|e| self.bad_utf8(f, name, bytes, e))
    }

    /// Validates a string field whose text is not needed, and returns its bytes.
    #[inline(always)]
    fn utf8(&self, f: &Field<'a>, name: &str) -> Result<&'a [u8], WireError> {
        let bytes = self.bytes(f, name)?;
        if is_ascii(bytes) {
            return Ok(bytes);
        }
        match str::from_utf8(bytes) {
            Ok(_) => Ok(bytes),
            Err(e) => Err(self.bad_utf8(f, name, bytes, e)),
        }
    }

    fn varint(&self, f: &Field<'a>, name: &str) -> Result<u64, WireError> {
        match f.value {
            Value::Varint(v) => Ok(v),
            _ => Err(self.wrong_wire_type(f, name, "varint")),
        }
    }

    fn fixed64(&self, f: &Field<'a>, name: &str) -> Result<u64, WireError> {
        match f.value {
            Value::Fixed64(v) => Ok(v),
            _ => Err(self.wrong_wire_type(f, name, "fixed64")),
        }
    }

    fn fixed32(&self, f: &Field<'a>, name: &str) -> Result<u32, WireError> {
        match f.value {
            Value::Fixed32(v) => Ok(v),
            _ => Err(self.wrong_wire_type(f, name, "fixed32")),
        }
    }

    /// The whole field: key, length prefix if any, payload.
    fn raw(&self, f: &Field<'a>) -> &'a [u8] {
        self.buf.get(f.start..f.end).unwrap_or_default()
    }

    /// Absolute offset of a length-delimited field's body.
    fn body_at(&self, f: &Field<'a>, body: &[u8]) -> usize {
        self.base + f.end - body.len()
    }

    #[cold]
    fn bad_utf8(&self, f: &Field<'a>, name: &str, bytes: &[u8], e: str::Utf8Error) -> WireError {
        WireError(format!(
            "invalid UTF-8 in field {} ({name}) of {} at byte {}",
            f.number,
            self.msg,
            self.body_at(f, bytes) + e.valid_up_to()
        ))
    }

    #[cold]
    fn wrong_wire_type(&self, f: &Field<'a>, name: &str, expected: &str) -> WireError {
        WireError(format!(
            "wrong wire type for field {} ({name}) in {} at byte {}: expected {expected}, got {}",
            f.number,
            self.msg,
            self.base + f.start,
            f.value.wire_name()
        ))
    }

    #[cold]
    fn malformed(&self, fault: Fault) -> WireError {
        let (msg, at) = (self.msg, self.base + self.pos);
        WireError(match fault {
            Fault::TagTruncated => format!("truncated field key in {msg} at byte {at}"),
            Fault::TagMalformed => format!("malformed varint field key in {msg} at byte {at}"),
            Fault::TagTooLarge(key) => {
                format!("field key {key} does not fit 32 bits in {msg} at byte {at}")
            }
            Fault::FieldZero => format!("invalid field number 0 in {msg} at byte {at}"),
            Fault::Group { field, wire } => format!(
                "unsupported group wire type {wire} for field {field} in {msg} at byte {at}"
            ),
            Fault::WireType { field, wire } => {
                format!("invalid wire type {wire} for field {field} in {msg} at byte {at}")
            }
            Fault::VarintTruncated(field) => {
                format!("truncated varint field {field} in {msg} at byte {at}")
            }
            Fault::VarintMalformed(field) => format!(
                "malformed varint field {field} (over 10 bytes or 64 bits) in {msg} at byte {at}"
            ),
            Fault::FixedTruncated { field, width } => {
                format!(
                    "truncated fixed{} field {field} in {msg} at byte {at}",
                    width * 8
                )
            }
            Fault::LenPrefixTruncated(field) => {
                format!("truncated length of field {field} in {msg} at byte {at}")
            }
            Fault::LenPrefixMalformed(field) => {
                format!("malformed varint length of field {field} in {msg} at byte {at}")
            }
            Fault::LenTruncated {
                field,
                len,
                remaining,
            } => format!(
                "truncated length-delimited field {field} in {msg} at byte {at}: \
                 length {len} exceeds the {remaining} bytes left"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
    use prost::Message;

    // ----- builders -------------------------------------------------------------------------

    type SpanEdit = dyn Fn(&mut Span);
    type RequestEdit = dyn Fn(&mut ExportTraceServiceRequest);

    fn any(value: V) -> AnyValue {
        AnyValue { value: Some(value) }
    }

    fn kv(key: &str, value: V) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(any(value)),
            ..Default::default()
        }
    }

    fn text(s: &str) -> V {
        V::StringValue(s.into())
    }

    fn tid(n: u8) -> Vec<u8> {
        let mut id = vec![0xab; 16];
        id[15] = n;
        id
    }

    fn sid(n: u8) -> Vec<u8> {
        vec![0x5c, 0, 0, 0, 0, 0, 0, n]
    }

    fn all_kinds() -> Vec<KeyValue> {
        vec![
            kv("str", text("hello")),
            kv("bool", V::BoolValue(true)),
            kv("int", V::IntValue(-42)),
            kv("double", V::DoubleValue(2.5)),
            kv("bytes", V::BytesValue(vec![0, 1, 255])),
            kv(
                "array",
                V::ArrayValue(ArrayValue {
                    values: vec![
                        any(text("a")),
                        any(V::IntValue(7)),
                        AnyValue { value: None },
                    ],
                }),
            ),
            kv(
                "kvlist",
                V::KvlistValue(KeyValueList {
                    values: vec![
                        kv("inner", text("x")),
                        kv(
                            "deeper",
                            V::ArrayValue(ArrayValue {
                                values: vec![any(V::BoolValue(false))],
                            }),
                        ),
                    ],
                }),
            ),
            KeyValue {
                key: "no_value".into(),
                value: None,
                ..Default::default()
            },
            KeyValue {
                key: "empty_any".into(),
                value: Some(AnyValue { value: None }),
                ..Default::default()
            },
        ]
    }

    fn span(n: u8, parent: Option<u8>, name: &str) -> Span {
        Span {
            trace_id: tid(n),
            span_id: sid(n),
            parent_span_id: parent.map(sid).unwrap_or_default(),
            name: name.into(),
            kind: i32::from(n % 6),
            start_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(n),
            end_time_unix_nano: 1_700_000_000_500_000_000 + u64::from(n),
            attributes: vec![
                kv("http.route", text("/users/{id}")),
                kv("n", V::IntValue(n.into())),
            ],
            ..Default::default()
        }
    }

    fn rich_span() -> Span {
        Span {
            trace_state: "vendor=1".into(),
            flags: 0x301,
            attributes: all_kinds(),
            dropped_attributes_count: 2,
            events: vec![
                Event {
                    time_unix_nano: 17,
                    name: "exception".into(),
                    attributes: vec![kv("exception.type", text("Boom"))],
                    dropped_attributes_count: 1,
                },
                Event::default(),
            ],
            dropped_events_count: 3,
            links: vec![Link {
                trace_id: tid(9),
                span_id: sid(9),
                trace_state: "k=v".into(),
                attributes: vec![kv("link.kind", text("follows"))],
                dropped_attributes_count: 4,
                flags: 0x100,
            }],
            dropped_links_count: 5,
            status: Some(Status {
                message: "failed".into(),
                code: 2,
            }),
            ..span(1, None, "GET /users")
        }
    }

    fn sample_request() -> ExportTraceServiceRequest {
        let resource = Resource {
            attributes: [vec![kv("service.name", text("checkout"))], all_kinds()].concat(),
            dropped_attributes_count: 3,
            entity_refs: vec![EntityRef {
                schema_url: "https://schema".into(),
                r#type: "service".into(),
                id_keys: vec!["service.name".into()],
                description_keys: vec!["str".into()],
            }],
        };
        let scope = InstrumentationScope {
            name: "io.tailgate".into(),
            version: "1.2.3".into(),
            attributes: vec![kv("scope.attr", V::BoolValue(true))],
            dropped_attributes_count: 6,
        };
        ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(resource),
                    scope_spans: vec![
                        ScopeSpans {
                            scope: Some(scope),
                            spans: vec![rich_span(), span(2, Some(1), "db"), span(3, Some(2), "q")],
                            schema_url: "https://scope-schema".into(),
                        },
                        ScopeSpans {
                            scope: None,
                            spans: vec![span(4, None, "solo")],
                            schema_url: String::new(),
                        },
                        ScopeSpans::default(),
                    ],
                    schema_url: "https://resource-schema".into(),
                },
                ResourceSpans {
                    resource: None,
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span(5, None, "a"), span(6, Some(5), "b")],
                        ..Default::default()
                    }],
                    schema_url: String::new(),
                },
                ResourceSpans::default(),
            ],
        }
    }

    /// Every message type and AnyValue kind once, small enough to flip every bit of quickly.
    fn compact_request() -> ExportTraceServiceRequest {
        let mut req = sample_request();
        req.resource_spans.truncate(2);
        let rs = &mut req.resource_spans[0];
        rs.scope_spans.truncate(1);
        rs.scope_spans[0].spans.truncate(2);
        if let Some(resource) = &mut rs.resource {
            resource.attributes.truncate(2);
        }
        let rich = &mut rs.scope_spans[0].spans[0];
        rich.events.truncate(1);
        rich.attributes
            .retain(|a| a.key != "str" && a.key != "no_value");
        req
    }

    fn key(field: u32, wire: u32) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, u64::from(field << 3 | wire));
        out
    }

    /// A length-delimited field.
    fn ld(field: u32, body: &[u8]) -> Vec<u8> {
        let mut out = key(field, 2);
        put_varint(&mut out, body.len() as u64);
        out.extend_from_slice(body);
        out
    }

    /// One unknown field of every valid wire type, numbered from `first`.
    fn unknowns(first: u32) -> Vec<u8> {
        let mut out = key(first, 0);
        put_varint(&mut out, 300);
        out.extend(key(first + 1, 1));
        out.extend(7u64.to_le_bytes());
        out.extend(ld(first + 2, b"\xffnot utf-8 but unknown"));
        out.extend(key(first + 3, 5));
        out.extend(9u32.to_le_bytes());
        out
    }

    /// The request's encoding with unknown fields added to every ResourceSpans, ScopeSpans and
    /// Span, and to the request itself; prost ignores them all.
    fn encode_with_unknowns(req: &ExportTraceServiceRequest) -> Vec<u8> {
        let mut out = Vec::new();
        for rs in &req.resource_spans {
            let shell = ResourceSpans {
                scope_spans: Vec::new(),
                ..rs.clone()
            };
            let mut rs_body = shell.encode_to_vec();
            rs_body.extend(unknowns(100));
            for ss in &rs.scope_spans {
                let shell = ScopeSpans {
                    spans: Vec::new(),
                    ..ss.clone()
                };
                let mut ss_body = shell.encode_to_vec();
                ss_body.extend(unknowns(200));
                for span in &ss.spans {
                    let mut span_body = span.encode_to_vec();
                    span_body.extend(unknowns(300));
                    ss_body.extend(ld(2, &span_body));
                }
                rs_body.extend(ld(2, &ss_body));
            }
            out.extend(ld(1, &rs_body));
        }
        out.extend(unknowns(400));
        out
    }

    fn reencode(parsed: &ParsedTraces<'_>) -> Vec<u8> {
        encode_parsed(parsed, |sp| sp.bytes)
    }

    fn decode(buf: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(buf).expect("prost decodes")
    }

    fn span_is_valid(s: &Span) -> bool {
        s.trace_id.len() == 16
            && s.trace_id.iter().any(|&b| b != 0)
            && s.span_id.len() == 8
            && s.span_id.iter().any(|&b| b != 0)
            && (s.parent_span_id.is_empty() || s.parent_span_id.len() == 8)
    }

    fn without_invalid_spans(mut req: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        for rs in &mut req.resource_spans {
            for ss in &mut rs.scope_spans {
                ss.spans.retain(span_is_valid);
            }
        }
        req
    }

    fn all_spans(req: &ExportTraceServiceRequest) -> Vec<&Span> {
        req.resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .collect()
    }

    fn parsed_spans<'p, 'a>(parsed: &'p ParsedTraces<'a>) -> Vec<&'p SpanRef<'a>> {
        parsed
            .resources
            .iter()
            .flat_map(|r| &r.scopes)
            .flat_map(|s| &s.spans)
            .collect()
    }

    fn parse_ok(buf: &[u8]) -> ParsedTraces<'_> {
        match parse_traces(buf) {
            Ok(parsed) => parsed,
            Err(e) => panic!("unexpected parse error: {e}"),
        }
    }

    fn parse_err(buf: &[u8]) -> String {
        match parse_traces(buf) {
            Ok(_) => panic!("malformed input accepted"),
            Err(e) => e.0,
        }
    }

    /// A request holding one span body in one scope in one resource; with these sizes every
    /// length prefix is one byte, so the span body starts at byte 6.
    fn request_with_span(span_body: &[u8]) -> Vec<u8> {
        ld(1, &ld(2, &ld(2, span_body)))
    }

    fn valid_span_body() -> Vec<u8> {
        Span {
            trace_id: tid(1),
            span_id: sid(1),
            ..Default::default()
        }
        .encode_to_vec()
    }

    // ----- parse + encode round trips -------------------------------------------------------

    #[test]
    fn a_request_past_the_span_limit_stops_the_parse() {
        let spans: Vec<Span> = (1..=5).map(|n| span(n, None, "s")).collect();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let buf = req.encode_to_vec();
        assert!(parse_traces_within(&buf, 5).is_ok(), "exactly at the limit");
        let err = parse_traces_within(&buf, 4).unwrap_err();
        assert!(matches!(err, Unparsed::TooManySpans(4)), "{err}");
        // Empty blocks cost a push each too: two bytes apiece on the wire.
        let blocks = [0x0a, 0x00].repeat(10);
        assert!(parse_traces_within(&blocks, 10).is_ok());
        assert!(matches!(
            parse_traces_within(&blocks, 9),
            Err(Unparsed::TooManySpans(9))
        ));
        // A malformed request under the limit is still malformed.
        assert!(matches!(
            parse_traces_within(&[0x0a, 0x05], 9),
            Err(Unparsed::Malformed(_))
        ));
    }

    #[test]
    fn round_trip_with_unknown_fields_equals_prost() {
        let original = sample_request();
        let wire = encode_with_unknowns(&original);
        assert_eq!(decode(&wire), original, "prost ignores the unknown fields");

        let parsed = parse_ok(&wire);
        assert_eq!(parsed.rejected_spans, 0);
        assert_eq!(parsed.rejection, None);
        let shape: Vec<Vec<usize>> = parsed
            .resources
            .iter()
            .map(|r| r.scopes.iter().map(|s| s.spans.len()).collect())
            .collect();
        assert_eq!(shape, vec![vec![3, 1, 0], vec![2], vec![]]);

        assert_eq!(decode(&reencode(&parsed)), original);

        // Unknown fields inside blocks and spans are carried verbatim.
        for block in &parsed.resources {
            assert!(block.fields.ends_with(&unknowns(100)));
            for scope in &block.scopes {
                assert!(scope.fields.ends_with(&unknowns(200)));
                for span in &scope.spans {
                    assert!(span.bytes.ends_with(&unknowns(300)));
                }
            }
        }
        let resource = original.resource_spans[0]
            .resource
            .as_ref()
            .map(Message::encode_to_vec);
        assert_eq!(Some(parsed.resources[0].resource.to_vec()), resource);
        assert!(parsed.resources[1].resource.is_empty());
    }

    #[test]
    fn round_trip_of_plain_prost_encoding() {
        let original = sample_request();
        let wire = original.encode_to_vec();
        let parsed = parse_ok(&wire);
        assert_eq!(decode(&reencode(&parsed)), original);
    }

    #[test]
    fn extracted_fields_equal_prost() {
        let original = sample_request();
        let wire = encode_with_unknowns(&original);
        let parsed = parse_ok(&wire);
        let expected = all_spans(&original);
        let got = parsed_spans(&parsed);
        assert_eq!(got.len(), expected.len());
        for (want, got) in expected.iter().zip(got) {
            assert_eq!(got.trace_id.to_vec(), want.trace_id);
            assert_eq!(got.span_id.to_vec(), want.span_id);
            let parent = if want.parent_span_id.is_empty() {
                vec![0; 8]
            } else {
                want.parent_span_id.clone()
            };
            assert_eq!(got.parent_span_id.to_vec(), parent);
            assert_eq!(got.start_time_unix_nano, want.start_time_unix_nano);
            assert_eq!(got.end_time_unix_nano, want.end_time_unix_nano);
            assert_eq!(got.status_code, want.status.as_ref().map_or(0, |s| s.code));
            assert_eq!(got.kind, want.kind);
            assert_eq!(got.name, want.name);
            assert_eq!(got.has_trace_state, !want.trace_state.is_empty());
            assert_eq!(Span::decode(got.bytes).expect("span decodes"), **want);
        }
        assert_eq!(parsed_spans(&parsed)[0].status_code, 2);
    }

    #[test]
    fn later_occurrences_win_like_prost() {
        let first = Span {
            trace_id: tid(1),
            span_id: sid(1),
            name: "first".into(),
            kind: 1,
            trace_state: "ot=rv:0123456789abcd".into(),
            start_time_unix_nano: 5,
            status: Some(Status {
                message: "boom".into(),
                code: 2,
            }),
            ..Default::default()
        };
        // The second Status has no code on the wire (0 is the default), so merging keeps 2.
        let second = Span {
            trace_id: tid(2),
            name: "second".into(),
            kind: 3,
            start_time_unix_nano: 9,
            status: Some(Status {
                message: "later".into(),
                code: 0,
            }),
            ..Default::default()
        };
        let body = [first.encode_to_vec(), second.encode_to_vec()].concat();
        let merged = Span::decode(&body[..]).expect("merged span decodes");
        let wire = request_with_span(&body);
        let parsed = parse_ok(&wire);
        let got = parsed_spans(&parsed)[0];
        assert_eq!(got.trace_id.to_vec(), merged.trace_id);
        assert_eq!(got.span_id.to_vec(), merged.span_id);
        assert_eq!(got.name, merged.name);
        // The second occurrence has no trace_state on the wire, so the first one stands.
        assert!(got.has_trace_state && !merged.trace_state.is_empty());
        assert_eq!(got.kind, merged.kind);
        assert_eq!(got.start_time_unix_nano, merged.start_time_unix_nano);
        assert_eq!(got.status_code, merged.status.map_or(-1, |s| s.code));
        assert_eq!(got.status_code, 2);

        // A later empty trace_id overrides a valid one, so the span is refused.
        let body = [valid_span_body(), ld(1, &[])].concat();
        let wire = request_with_span(&body);
        let parsed = parse_ok(&wire);
        assert_eq!(parsed.rejected_spans, 1);
        assert!(parsed_spans(&parsed).is_empty());
    }

    #[test]
    fn empty_buffer_is_an_empty_request() {
        let parsed = parse_ok(&[]);
        assert!(parsed.resources.is_empty());
        assert_eq!(parsed.rejected_spans, 0);
        assert!(encode_request(&[]).is_empty());
    }

    // ----- rejected spans -------------------------------------------------------------------

    #[test]
    fn rejected_spans_are_counted_and_the_rest_survives() {
        let with = |f: &dyn Fn(&mut Span)| {
            let mut s = span(10, None, "bad");
            f(&mut s);
            s
        };
        let spans = vec![
            span(1, None, "keep-1"),
            with(&|s| s.trace_id.clear()),
            with(&|s| s.trace_id.truncate(8)),
            with(&|s| s.trace_id = vec![0; 16]),
            with(&|s| s.span_id.clear()),
            with(&|s| s.span_id.truncate(4)),
            with(&|s| s.span_id = vec![0; 8]),
            with(&|s| s.parent_span_id = vec![1; 4]),
            with(&|s| s.parent_span_id = vec![1; 16]),
            Span {
                parent_span_id: vec![0; 8],
                ..span(2, None, "keep-zero-parent")
            },
            span(3, Some(2), "keep-3"),
        ];
        let original = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span(4, None, "keep-4")],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        let wire = original.encode_to_vec();
        let parsed = parse_ok(&wire);
        assert_eq!(parsed.rejected_spans, 8);
        assert_eq!(
            parsed.rejection.as_deref(),
            Some(
                "span 1 of scope 0 of resource 0: trace_id must be 16 non-zero bytes, got 0 bytes"
            )
        );
        let names: Vec<&str> = parsed_spans(&parsed).iter().map(|s| s.name).collect();
        assert_eq!(names, ["keep-1", "keep-zero-parent", "keep-3", "keep-4"]);
        assert_eq!(parsed_spans(&parsed)[1].parent_span_id, [0; 8]);
        assert_eq!(decode(&reencode(&parsed)), without_invalid_spans(original));
    }

    #[test]
    fn each_rejection_is_described() {
        let cases: [(&SpanEdit, &str); 7] = [
            (
                &|s| s.trace_id.clear(),
                "trace_id must be 16 non-zero bytes, got 0 bytes",
            ),
            (
                &|s| s.trace_id.push(1),
                "trace_id must be 16 non-zero bytes, got 17 bytes",
            ),
            (
                &|s| s.trace_id = vec![0; 16],
                "trace_id must be 16 non-zero bytes, got 16 zero bytes",
            ),
            (
                &|s| s.span_id.truncate(7),
                "span_id must be 8 non-zero bytes, got 7 bytes",
            ),
            (
                &|s| s.span_id = vec![0; 8],
                "span_id must be 8 non-zero bytes, got 8 zero bytes",
            ),
            (
                &|s| s.parent_span_id = vec![3; 9],
                "parent_span_id must be empty or 8 bytes, got 9 bytes",
            ),
            (
                &|s| s.parent_span_id = vec![3; 1],
                "parent_span_id must be empty or 8 bytes, got 1 bytes",
            ),
        ];
        for (mutate, reason) in cases {
            let mut bad = span(7, None, "bad");
            mutate(&mut bad);
            let req = ExportTraceServiceRequest {
                resource_spans: vec![
                    ResourceSpans::default(),
                    ResourceSpans {
                        scope_spans: vec![
                            ScopeSpans::default(),
                            ScopeSpans {
                                spans: vec![span(1, None, "ok"), span(2, None, "ok"), bad],
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    },
                ],
            };
            let wire = req.encode_to_vec();
            let parsed = parse_ok(&wire);
            assert_eq!(parsed.rejected_spans, 1);
            assert_eq!(
                parsed.rejection,
                Some(format!("span 2 of scope 1 of resource 1: {reason}"))
            );
            assert_eq!(parsed_spans(&parsed).len(), 2);
        }
    }

    // ----- malformed input ------------------------------------------------------------------

    #[test]
    fn truncation_at_every_offset_agrees_with_prost() {
        let wire = encode_with_unknowns(&sample_request());
        for end in 0..wire.len() {
            let cut = &wire[..end];
            let ours = parse_traces(cut);
            let prost = ExportTraceServiceRequest::decode(cut);
            assert_eq!(
                ours.is_ok(),
                prost.is_ok(),
                "truncated at {end}: {:?}",
                ours.err()
            );
            if let (Ok(parsed), Ok(expected)) = (ours, prost) {
                assert_eq!(decode(&reencode(&parsed)), without_invalid_spans(expected));
            }
        }
    }

    #[test]
    fn bit_flips_never_panic_and_never_accept_what_prost_rejects() {
        let wire = encode_with_unknowns(&compact_request());
        let mut mutated = wire.clone();
        let mut accepted = 0;
        for i in 0..wire.len() {
            for bit in 0..8 {
                mutated[i] ^= 1 << bit;
                check_against_prost(&mutated, &mut accepted);
                mutated[i] ^= 1 << bit;
            }
        }
        // The loop must exercise both outcomes to mean anything.
        assert!(
            accepted > 1000 && accepted < wire.len() * 8,
            "accepted {accepted}"
        );
    }

    fn check_against_prost(buf: &[u8], accepted: &mut usize) {
        let expected = ExportTraceServiceRequest::decode(buf);
        match (parse_traces(buf), expected) {
            (Ok(parsed), Ok(expected)) => {
                *accepted += 1;
                let invalid = all_spans(&expected)
                    .iter()
                    .filter(|s| !span_is_valid(s))
                    .count();
                assert_eq!(parsed.rejected_spans, invalid as u64);
                // Compare encodings: a flipped double may be NaN, which is never equal to itself.
                let ours = decode(&reencode(&parsed)).encode_to_vec();
                assert_eq!(ours, without_invalid_spans(expected).encode_to_vec());
                for span in parsed_spans(&parsed) {
                    exercise_read_helpers(span.bytes);
                }
            }
            (Ok(_), Err(e)) => panic!("accepted what prost rejects: {e}"),
            (Err(e), Ok(_)) => assert!(e.0.contains("group"), "refused what prost accepts: {e}"),
            (Err(_), Err(_)) => {}
        }
    }

    fn exercise_read_helpers(span: &[u8]) {
        for key in ["str", "http.route", "n", "missing"] {
            let _ = span_attribute(span, key);
            let _ = resource_attribute(span, key);
        }
        for_each_span_attribute(span, |_, _| {});
        let _ = span_trace_state(span);
        let mut out = Vec::new();
        rewrite_span_without_keys(span, &["str", "n"], &mut out);
        assert!(out.len() <= span.len());
    }

    #[test]
    fn read_helpers_never_panic_on_garbage() {
        let body = rich_span().encode_to_vec();
        for start in 0..body.len() {
            for end in start..body.len().min(start + 64) {
                exercise_read_helpers(&body[start..end]);
            }
            exercise_read_helpers(&body[start..]);
        }
        assert_eq!(span_attribute(&[0xff], "str"), None);
        assert_eq!(span_trace_state(&[0x1a, 0x05, b'a']), "");
        // An attribute entry that is not length-delimited is garbage, not a miss.
        assert_eq!(span_attribute(&[9 << 3, 1], "str"), None);
        let mut out = Vec::new();
        rewrite_span_without_keys(&[0x4a, 0x7f, 1, 2], &["x"], &mut out);
        assert_eq!(
            out,
            [0x4a, 0x7f, 1, 2],
            "unreadable bytes are copied verbatim"
        );
    }

    #[test]
    fn error_messages_say_what_and_where() {
        // trace_id sent as a varint
        let wire = request_with_span(&[0x08, 0x01]);
        assert_eq!(
            parse_err(&wire),
            "wrong wire type for field 1 (trace_id) in Span at byte 6: expected length-delimited, got varint"
        );
        // attributes claiming more bytes than there are
        let wire = request_with_span(&[0x4a, 100, 0x0a]);
        assert_eq!(
            parse_err(&wire),
            "truncated length-delimited field 9 in Span at byte 6: length 100 exceeds the 1 bytes left"
        );
        assert_eq!(
            parse_err(&[0x00, 0x00]),
            "invalid field number 0 in ExportTraceServiceRequest at byte 0"
        );
        let bad_key = ld(9, &ld(1, b"k\xffey"));
        let wire = request_with_span(&bad_key);
        assert_eq!(
            parse_err(&wire),
            "invalid UTF-8 in field 1 (key) of KeyValue at byte 11"
        );
    }

    #[test]
    fn structural_errors_are_refused() {
        let span = valid_span_body();
        let with = |extra: &[u8]| request_with_span(&[&span[..], extra].concat());
        let mut eleven_byte_varint = key(6, 0);
        eleven_byte_varint.extend([0xff; 10]);
        eleven_byte_varint.push(0x01);
        let mut overflowing_varint = key(6, 0);
        overflowing_varint.extend([0xff; 9]);
        overflowing_varint.push(0x02);
        let mut huge_key = Vec::new();
        put_varint(&mut huge_key, 1 << 35);
        huge_key.push(0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("wire type 6", with(&key(50, 6))),
            ("wire type 7", with(&key(50, 7))),
            ("start group", with(&[key(50, 3), key(50, 4)].concat())),
            ("end group", with(&key(50, 4))),
            ("11-byte varint", with(&eleven_byte_varint)),
            ("varint over 64 bits", with(&overflowing_varint)),
            ("key over 32 bits", with(&huge_key)),
            (
                "truncated fixed64",
                with(&[key(7, 1), vec![1, 2, 3]].concat()),
            ),
            ("truncated fixed32", with(&[key(16, 5), vec![1]].concat())),
            ("kind as bytes", with(&ld(6, b"x"))),
            ("start time as varint", with(&[key(7, 0), vec![1]].concat())),
            ("flags as fixed64", with(&[key(16, 1), vec![0; 8]].concat())),
            ("status code as bytes", with(&ld(15, &ld(3, b"x")))),
            (
                "event time as varint",
                with(&ld(11, &[key(1, 0), vec![1]].concat())),
            ),
            (
                "link flags as varint",
                with(&ld(13, &[key(6, 0), vec![1]].concat())),
            ),
            (
                "attribute value as varint",
                with(&ld(9, &[key(2, 0), vec![1]].concat())),
            ),
            (
                "double as varint",
                with(&ld(9, &ld(2, &[key(4, 0), vec![1]].concat()))),
            ),
            ("bool as bytes", with(&ld(9, &ld(2, &ld(2, b""))))),
            (
                "array entry as fixed32",
                with(&ld(9, &ld(2, &ld(5, &[key(1, 5), vec![0; 4]].concat())))),
            ),
            (
                "truncated nested attribute",
                with(&ld(9, &[0x12, 0x05, 0x0a])),
            ),
            (
                "resource attributes as fixed32",
                ld(1, &ld(1, &[key(1, 5), vec![0; 4]].concat())),
            ),
            (
                "entity ref type as varint",
                ld(1, &ld(1, &ld(3, &[key(2, 0), vec![1]].concat()))),
            ),
            (
                "scope name as varint",
                ld(1, &ld(2, &ld(1, &[key(1, 0), vec![1]].concat()))),
            ),
            (
                "schema_url as fixed64",
                ld(1, &[key(3, 1), vec![0; 8]].concat()),
            ),
            ("resource_spans as varint", [key(1, 0), vec![1]].concat()),
            (
                "spans as varint",
                ld(1, &ld(2, &[key(2, 0), vec![1]].concat())),
            ),
        ];
        for (what, wire) in cases {
            assert!(parse_traces(&wire).is_err(), "{what} was accepted");
            assert!(
                ExportTraceServiceRequest::decode(&wire[..]).is_err() || what.contains("group"),
                "{what}: prost accepts it"
            );
        }
        // The largest valid 10-byte varint is fine.
        let mut max_varint = key(6, 0);
        max_varint.extend([0xff; 9]);
        max_varint.push(0x01);
        assert_eq!(parsed_spans(&parse_ok(&with(&max_varint)))[0].kind, -1);
    }

    #[test]
    fn invalid_utf8_is_refused_in_every_known_string_field() {
        const MARK: &str = "\u{1}MARK\u{1}";
        let places: Vec<(&str, Box<RequestEdit>)> = vec![
            (
                "attribute key",
                Box::new(|r| span_mut(r).attributes[0].key = MARK.into()),
            ),
            (
                "string_value",
                Box::new(|r| span_mut(r).attributes[0] = kv("k", text(MARK))),
            ),
            (
                "array string",
                Box::new(|r| {
                    span_mut(r).attributes[0] = kv(
                        "k",
                        V::ArrayValue(ArrayValue {
                            values: vec![any(text(MARK))],
                        }),
                    )
                }),
            ),
            (
                "kvlist key",
                Box::new(|r| {
                    span_mut(r).attributes[0] = kv(
                        "k",
                        V::KvlistValue(KeyValueList {
                            values: vec![kv(MARK, V::IntValue(1))],
                        }),
                    )
                }),
            ),
            ("span name", Box::new(|r| span_mut(r).name = MARK.into())),
            (
                "trace_state",
                Box::new(|r| span_mut(r).trace_state = MARK.into()),
            ),
            (
                "event name",
                Box::new(|r| span_mut(r).events[0].name = MARK.into()),
            ),
            (
                "event attribute key",
                Box::new(|r| span_mut(r).events[0].attributes[0].key = MARK.into()),
            ),
            (
                "link trace_state",
                Box::new(|r| span_mut(r).links[0].trace_state = MARK.into()),
            ),
            (
                "link attribute key",
                Box::new(|r| span_mut(r).links[0].attributes[0].key = MARK.into()),
            ),
            (
                "status message",
                Box::new(|r| {
                    span_mut(r).status = Some(Status {
                        message: MARK.into(),
                        code: 1,
                    })
                }),
            ),
            ("scope name", Box::new(|r| scope_mut(r).name = MARK.into())),
            (
                "scope version",
                Box::new(|r| scope_mut(r).version = MARK.into()),
            ),
            (
                "scope attribute key",
                Box::new(|r| scope_mut(r).attributes[0].key = MARK.into()),
            ),
            (
                "scope schema_url",
                Box::new(|r| r.resource_spans[0].scope_spans[0].schema_url = MARK.into()),
            ),
            (
                "resource schema_url",
                Box::new(|r| r.resource_spans[0].schema_url = MARK.into()),
            ),
            (
                "resource attribute key",
                Box::new(|r| resource_mut(r).attributes[0].key = MARK.into()),
            ),
            (
                "entity ref type",
                Box::new(|r| resource_mut(r).entity_refs[0].r#type = MARK.into()),
            ),
            (
                "entity ref id key",
                Box::new(|r| resource_mut(r).entity_refs[0].id_keys[0] = MARK.into()),
            ),
        ];
        for (what, place) in places {
            let mut req = sample_request();
            place(&mut req);
            let mut wire = req.encode_to_vec();
            let at = wire
                .windows(MARK.len())
                .position(|w| w == MARK.as_bytes())
                .expect("marker");
            assert!(parse_traces(&wire).is_ok(), "{what}: valid marker accepted");
            wire[at + 1] = 0xff;
            assert!(
                ExportTraceServiceRequest::decode(&wire[..]).is_err(),
                "{what}: prost check"
            );
            let err = parse_err(&wire);
            assert!(err.contains("invalid UTF-8"), "{what}: {err}");
            assert!(
                err.ends_with(&format!("at byte {}", at + 1)),
                "{what}: {err}"
            );
        }
    }

    fn span_mut(r: &mut ExportTraceServiceRequest) -> &mut Span {
        &mut r.resource_spans[0].scope_spans[0].spans[0]
    }

    fn scope_mut(r: &mut ExportTraceServiceRequest) -> &mut InstrumentationScope {
        r.resource_spans[0].scope_spans[0]
            .scope
            .as_mut()
            .expect("scope")
    }

    fn resource_mut(r: &mut ExportTraceServiceRequest) -> &mut Resource {
        r.resource_spans[0].resource.as_mut().expect("resource")
    }

    /// An AnyValue body holding `containers` nested arrays (or kvlists) around a string.
    fn nested_any_value(containers: usize, kvlist: bool) -> Vec<u8> {
        let mut value = ld(1, b"leaf");
        for _ in 0..containers {
            value = if kvlist {
                ld(6, &ld(1, &[ld(1, b"k"), ld(2, &value)].concat()))
            } else {
                ld(5, &ld(1, &value))
            };
        }
        value
    }

    /// A request whose only span holds `value` as an event attribute, the deepest place an
    /// attribute can sit.
    fn request_with_event_value(value: &[u8]) -> Vec<u8> {
        let event = ld(3, &[ld(1, b"deep"), ld(2, value)].concat());
        request_with_span(&[valid_span_body(), ld(11, &event)].concat())
    }

    #[test]
    fn any_value_nesting_is_bounded() {
        for kvlist in [false, true] {
            let deepest = request_with_event_value(&nested_any_value(31, kvlist));
            parse_ok(&deepest);
            assert!(
                ExportTraceServiceRequest::decode(&deepest[..]).is_ok(),
                "prost decodes what we accept"
            );

            let too_deep = request_with_event_value(&nested_any_value(32, kvlist));
            let err = parse_err(&too_deep);
            assert!(
                err.contains("AnyValue nested deeper than 32 levels"),
                "{err}"
            );

            let hostile = request_with_event_value(&nested_any_value(3000, kvlist));
            assert!(parse_err(&hostile).contains("nested deeper"));
        }
        // With kvlists, one more level is already past prost's own recursion limit.
        let too_deep = request_with_event_value(&nested_any_value(32, true));
        assert!(ExportTraceServiceRequest::decode(&too_deep[..]).is_err());
    }

    #[test]
    fn attribute_fast_paths_agree_with_the_general_field_loop() {
        let mut attributes = all_kinds();
        attributes.extend([
            kv("min", V::IntValue(i64::MIN)),
            kv("max", V::IntValue(i64::MAX)),
            kv("zero", V::IntValue(0)),
            kv("nan", V::DoubleValue(f64::NAN)),
            kv("clé", text("non-ASCII key")),
            kv("k", text("valeur non-ASCII: é")),
            kv("", text("")),
            kv("long", text(&"x".repeat(130))),
        ]);
        let (mut plain, mut variants) = (0, 0);
        for attribute in &attributes {
            let encoded = attribute.encode_to_vec();
            let mut candidates: Vec<Vec<u8>> = (0..encoded.len())
                .map(|end| encoded[..end].to_vec())
                .collect();
            for i in 0..encoded.len() {
                for bit in 0..8 {
                    let mut flipped = encoded.clone();
                    flipped[i] ^= 1 << bit;
                    candidates.push(flipped);
                }
            }
            candidates.push(encoded);
            for kv in &candidates {
                variants += 1;
                let general = check_key_value_fields(Reader::new(kv, 0, "KeyValue"), 1);
                match (&general, KeyValue::decode(&kv[..])) {
                    (Ok(()), Err(e)) => panic!("accepted what prost rejects: {e}"),
                    (Err(e), Ok(_)) => assert!(e.0.contains("group"), "{e}"),
                    _ => {}
                }
                if is_plain_scalar_attribute(kv) {
                    plain += 1;
                    assert!(general.is_ok(), "fast path accepted {kv:?}");
                }
                if let Some(split) = split_plain_key_value(kv) {
                    assert_eq!(Some(split), key_value_fields(kv));
                }
            }
        }
        // Both outcomes must be exercised for the comparison to mean anything.
        assert!(plain > 100 && plain < variants / 2, "{plain} of {variants}");
    }

    #[test]
    fn is_ascii_matches_std_at_every_length_and_position() {
        for len in 0..40 {
            let mut bytes = vec![b'a'; len];
            assert!(is_ascii(&bytes));
            for pos in 0..len {
                for high in [0x80, 0xc3, 0xff] {
                    bytes[pos] = high;
                    assert!(!is_ascii(&bytes), "len {len}, byte {pos}");
                    bytes[pos] = b'a';
                }
            }
        }
    }

    // ----- encoding helpers -----------------------------------------------------------------

    #[test]
    fn rewrite_and_append_produce_what_prost_expects() {
        let original = Span {
            trace_state: "old=1".into(),
            attributes: vec![
                kv("a", V::IntValue(1)),
                kv("sampling.policy", text("old")),
                kv("b", V::BoolValue(true)),
                kv("sampling.policy", text("older")),
                kv("sampling.reasonable", text("kept: not an exact key match")),
            ],
            events: vec![Event {
                name: "e".into(),
                attributes: vec![kv(
                    "sampling.policy",
                    text("event attrs are not span attrs"),
                )],
                ..Default::default()
            }],
            ..rich_span()
        };
        let body = original.encode_to_vec();
        let mut out = Vec::new();
        rewrite_span_without_keys(&body, &["sampling.policy", "sampling.reason"], &mut out);
        let long = "x".repeat(200);
        let appended: Vec<(&str, &str, V)> = vec![
            ("sampling.policy", "keep-errors", text("keep-errors")),
            ("sampling.reason", &long, text(&long)),
            ("", "", text("")),
            ("ключ", "значение", text("значение")),
        ];
        for (key, value, _) in &appended {
            append_attribute(&mut out, key, value);
        }
        append_trace_state(&mut out, "tg=1");

        let decoded = Span::decode(&out[..]).expect("rewritten span decodes");
        let mut expected = original.clone();
        expected.attributes.retain(|a| a.key != "sampling.policy");
        expected
            .attributes
            .extend(appended.iter().map(|(k, _, v)| kv(k, v.clone())));
        expected.trace_state = "tg=1".into();
        assert_eq!(decoded, expected);

        assert_eq!(span_trace_state(&out), "tg=1");
        assert_eq!(
            span_attribute(&out, "sampling.policy"),
            Some(AnyValueRef::Str("keep-errors"))
        );
        assert_eq!(
            span_attribute(&out, "ключ"),
            Some(AnyValueRef::Str("значение"))
        );
        let wire = request_with_span_long(&out);
        assert_eq!(parse_ok(&wire).rejected_spans, 0);

        // Nothing to drop: the span is copied unchanged.
        let mut copy = Vec::new();
        rewrite_span_without_keys(&body, &["absent"], &mut copy);
        assert_eq!(copy, body);
    }

    #[test]
    fn only_attributes_that_cannot_hold_text_survive_the_fail_closed_rewrite() {
        let original = Span {
            attributes: vec![
                kv("a", V::IntValue(1)),
                kv("mail", text("bob@example.com")),
                kv("b", V::BoolValue(true)),
                kv("d", V::DoubleValue(0.5)),
                kv("raw", V::BytesValue(b"bob@example.com".to_vec())),
                kv(
                    "list",
                    V::ArrayValue(ArrayValue {
                        values: vec![AnyValue {
                            value: Some(text("bob@example.com")),
                        }],
                    }),
                ),
            ],
            ..rich_span()
        };
        let mut out = Vec::new();
        rewrite_span_without_string_attributes(&original.encode_to_vec(), &mut out);
        let decoded = Span::decode(&out[..]).expect("rewritten span decodes");
        let keys: Vec<&str> = decoded.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "d"]);
        assert_eq!(decoded.name, original.name, "other fields stay");
    }

    #[test]
    fn every_span_gets_the_one_attribute_value_and_bad_spans_are_counted() {
        let mut spoofed = rich_span();
        spoofed.attributes = vec![kv("tenant.id", text("globex")), kv("k", text("v"))];
        let mut bad = rich_span();
        bad.trace_id = vec![0; 16];
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![spoofed, rich_span(), bad],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let (body, rejected, first) =
            with_span_attribute(&request.encode_to_vec(), "tenant.id", "acme", u64::MAX).unwrap();
        assert_eq!(rejected, 1);
        assert!(first.is_some());
        let decoded = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        let spans = &decoded.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        for span in spans {
            let tenants: Vec<_> = (span.attributes.iter())
                .filter(|a| a.key == "tenant.id")
                .collect();
            assert_eq!(tenants, [&kv("tenant.id", text("acme"))]);
        }
        assert!(spans[0].attributes.iter().any(|a| a.key == "k"));
    }

    fn request_with_span_long(span_body: &[u8]) -> Vec<u8> {
        encode_request(&[EncodeResource {
            fields: &[],
            scopes: vec![EncodeScope {
                fields: &[],
                spans: vec![EncodeSpan {
                    bytes: span_body,
                    extra: &[],
                }],
            }],
        }])
    }

    #[test]
    fn encode_request_appends_extra_fields_to_spans() {
        let original = sample_request();
        let wire = original.encode_to_vec();
        let parsed = parse_ok(&wire);
        let mut extra = Vec::new();
        append_attribute(&mut extra, "sampling.decision", "keep");
        append_trace_state(&mut extra, "tg=kept");
        let resources: Vec<EncodeResource<'_>> = parsed
            .resources
            .iter()
            .map(|r| EncodeResource {
                fields: &r.fields,
                scopes: r
                    .scopes
                    .iter()
                    .map(|s| EncodeScope {
                        fields: &s.fields,
                        spans: s
                            .spans
                            .iter()
                            .map(|sp| EncodeSpan {
                                bytes: sp.bytes,
                                extra: &extra,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        let out = encode_request(&resources);
        assert_eq!(out.len(), encoded_request_len(&resources));
        let mut expected = original;
        for rs in &mut expected.resource_spans {
            for ss in &mut rs.scope_spans {
                for s in &mut ss.spans {
                    s.attributes.push(kv("sampling.decision", text("keep")));
                    s.trace_state = "tg=kept".into();
                }
            }
        }
        assert_eq!(decode(&out), expected);
    }

    #[test]
    fn encoded_lengths_are_exact_across_varint_boundaries() {
        for size in [0, 1, 120, 127, 128, 129, 16_383, 16_384, 70_000, 2_100_000] {
            let value = "v".repeat(size);
            let s = Span {
                attributes: vec![kv("big", text(&value))],
                ..span(1, None, "big")
            };
            let original = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![s.clone(), s],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let wire = original.encode_to_vec();
            let parsed = parse_ok(&wire);
            let out = reencode(&parsed);
            assert_eq!(
                out, wire,
                "size {size}: canonical input re-encodes byte for byte"
            );
            assert_eq!(
                span_attribute(parsed_spans(&parsed)[1].bytes, "big"),
                Some(AnyValueRef::Str(&value))
            );
        }
    }

    #[test]
    fn varint_helpers_match_prost() {
        let values = [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            1 << 56,
            u64::MAX,
            i64::MIN as u64,
        ];
        for v in values {
            let mut ours = Vec::new();
            put_varint(&mut ours, v);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs);
            assert_eq!(varint_len(v), prost::encoding::encoded_len_varint(v));
            assert!(
                matches!(read_varint(&ours, 0), Ok((got, end)) if got == v && end == ours.len())
            );
        }
    }

    // ----- attribute lookups ----------------------------------------------------------------

    #[test]
    fn span_attribute_finds_each_kind() {
        let mut s = rich_span();
        s.attributes.push(kv("str", text("second wins")));
        s.attributes.push(KeyValue {
            key: "strindex".into(),
            value: Some(any(V::StringValueStrindex(5))),
            ..Default::default()
        });
        let body = s.encode_to_vec();
        let array = ArrayValue {
            values: vec![
                any(text("a")),
                any(V::IntValue(7)),
                AnyValue { value: None },
            ],
        }
        .encode_to_vec();
        let Some(V::KvlistValue(kvlist)) = all_kinds()[6].value.clone().and_then(|v| v.value)
        else {
            panic!("all_kinds()[6] is the kvlist");
        };
        let kvlist = kvlist.encode_to_vec();
        let expected = [
            ("str", AnyValueRef::Str("second wins")),
            ("bool", AnyValueRef::Bool(true)),
            ("int", AnyValueRef::Int(-42)),
            ("double", AnyValueRef::Double(2.5)),
            ("bytes", AnyValueRef::Bytes(&[0, 1, 255])),
            ("array", AnyValueRef::Array(&array)),
            ("kvlist", AnyValueRef::KvList(&kvlist)),
            ("no_value", AnyValueRef::Empty),
            ("empty_any", AnyValueRef::Empty),
            ("strindex", AnyValueRef::Empty),
        ];
        for (key, want) in expected {
            assert_eq!(span_attribute(&body, key), Some(want), "{key}");
        }
        assert_eq!(span_attribute(&body, "missing"), None);
        assert_eq!(
            span_attribute(&body, "exception.type"),
            None,
            "event attributes are not span attributes"
        );
        assert_eq!(span_trace_state(&body), "vendor=1");
        assert_eq!(span_trace_state(&span(1, None, "x").encode_to_vec()), "");

        let mut listed: Vec<(&str, AnyValueRef<'_>)> = Vec::new();
        assert!(for_each_span_attribute(&body, |k, v| listed
            .push((str::from_utf8(k).unwrap(), any_value(v).unwrap()))));
        assert_eq!(listed.len(), s.attributes.len());
        let keys: Vec<&str> = listed.iter().map(|(k, _)| *k).collect();
        let want: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, want);
        assert_eq!(listed[0].1, AnyValueRef::Str("hello"));
        assert_eq!(listed[3].1, AnyValueRef::Double(2.5));
    }

    #[test]
    fn resource_attribute_finds_service_name() {
        let wire = sample_request().encode_to_vec();
        let parsed = parse_ok(&wire);
        let resource = parsed.resources[0].resource;
        assert_eq!(
            resource_attribute(resource, "service.name"),
            Some(AnyValueRef::Str("checkout"))
        );
        assert_eq!(
            resource_attribute(resource, "int"),
            Some(AnyValueRef::Int(-42))
        );
        assert_eq!(resource_attribute(resource, "nope"), None);
        assert_eq!(
            resource_attribute(parsed.resources[1].resource, "service.name"),
            None
        );
    }
}
