//! Regrouping buffered spans into one `ExportTraceServiceRequest`: one `ResourceSpans` per
//! distinct resource and one `ScopeSpans` per distinct scope, so a resource is written once per
//! request, never copied per span. The exporter encodes its batches here, and the sandbox a
//! policy's `otlp-bytes`.
//!
//! Owns only encoding; it never changes a span's bytes beyond appending what it is given.

use std::collections::HashMap;

use super::wire::{EncodeResource, EncodeScope, EncodeSpan};
use crate::trace::{BufferedSpan, ScopeHeader};

/// Encodes spans as they were received (a policy's `otlp-bytes`).
pub(crate) fn encode_spans(spans: &[BufferedSpan]) -> Vec<u8> {
    encode_grouped(spans.iter().map(|s| (s, &[][..])))
}

/// Encodes spans, each followed by its `extra` bytes (encoded attributes such as a decision
/// stamp).
pub(crate) fn encode_grouped<'a>(
    spans: impl Iterator<Item = (&'a BufferedSpan, &'a [u8])>,
) -> Vec<u8> {
    // Spans of one request share their header by pointer; different requests from the same
    // service carry equal bytes. Look up by pointer first, by bytes only for a new pointer.
    let mut by_pointer: HashMap<*const ScopeHeader, (usize, usize)> = HashMap::new();
    let mut resource_by_bytes: HashMap<&[u8], usize> = HashMap::new();
    let mut scope_by_bytes: HashMap<(usize, &[u8]), usize> = HashMap::new();
    let mut resources: Vec<EncodeResource<'_>> = Vec::new();
    for (span, extra) in spans {
        let header: &ScopeHeader = &span.scope;
        let (r, s) = *by_pointer
            .entry(header as *const ScopeHeader)
            .or_insert_with(|| {
                let fields: &[u8] = &header.resource.fields;
                let r = *resource_by_bytes.entry(fields).or_insert_with(|| {
                    resources.push(EncodeResource {
                        fields,
                        scopes: Vec::new(),
                    });
                    resources.len() - 1
                });
                let scope_fields: &[u8] = &header.fields;
                let s = *scope_by_bytes.entry((r, scope_fields)).or_insert_with(|| {
                    resources[r].scopes.push(EncodeScope {
                        fields: scope_fields,
                        spans: Vec::new(),
                    });
                    resources[r].scopes.len() - 1
                });
                (r, s)
            });
        resources[r].scopes[s].spans.push(EncodeSpan {
            bytes: &span.bytes,
            extra,
        });
    }
    super::wire::encode_request(&resources)
}
