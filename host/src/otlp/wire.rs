// TEMPORARY STUB (to be replaced by the real module)
#![allow(unused)]
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);
pub struct ParsedTraces<'a> {
    pub resources: Vec<ResourceBlock<'a>>,
    pub rejected_spans: u64,
    pub rejection: Option<String>,
}
pub struct ResourceBlock<'a> {
    pub fields: Vec<u8>,
    pub resource: &'a [u8],
    pub scopes: Vec<ScopeBlock<'a>>,
}
pub struct ScopeBlock<'a> {
    pub fields: Vec<u8>,
    pub spans: Vec<SpanRef<'a>>,
}
#[derive(Clone, Copy, Debug)]
pub struct SpanRef<'a> {
    pub bytes: &'a [u8],
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    pub start_time_unix_nano: u64,
    pub end_time_unix_nano: u64,
    pub status_code: i32,
    pub kind: i32,
    pub name: &'a str,
}
pub fn parse_traces(buf: &[u8]) -> Result<ParsedTraces<'_>, WireError> {
    todo!()
}
pub struct EncodeResource<'a> {
    pub fields: &'a [u8],
    pub scopes: Vec<EncodeScope<'a>>,
}
pub struct EncodeScope<'a> {
    pub fields: &'a [u8],
    pub spans: Vec<EncodeSpan<'a>>,
}
#[derive(Clone, Copy)]
pub struct EncodeSpan<'a> {
    pub bytes: &'a [u8],
    pub extra: &'a [u8],
}
pub fn encode_request(resources: &[EncodeResource<'_>]) -> Vec<u8> {
    todo!()
}
pub fn append_attribute(out: &mut Vec<u8>, key: &str, value: AttrValue<'_>) {
    todo!()
}
pub enum AttrValue<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AnyValueRef<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    Array(&'a [u8]),
    KvList(&'a [u8]),
    Empty,
}
pub fn resource_attribute<'a>(resource: &'a [u8], key: &str) -> Option<AnyValueRef<'a>> {
    todo!()
}
