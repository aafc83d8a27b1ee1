//! A trace request's spans in the buffer's form: what the receivers route to the shards, and
//! what a shard reads back from the storage log for a trace whose spans it parked there.

use std::sync::Arc;

use super::wire::{self, Unparsed, WireError};
use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader, TraceId};

/// Growth slack of a trace's span vector, charged per span so the budget tracks real usage.
const SPAN_SLACK: usize = 16;

/// The spans of a request that were refused for bad ids.
pub(crate) struct Rejected {
    pub(crate) spans: u64,
    /// The first refusal, in English.
    pub(crate) first: Option<String>,
}

/// Parses a trace request at the wire level and hands every span with a valid id to `f`, with
/// its trace id and its cost to the memory budget: its bytes, the growth slack, and (for the
/// first span of a scope) the resource and scope headers its scope's spans share.
pub(crate) fn for_each_span(
    body: &[u8],
    f: impl FnMut(TraceId, BufferedSpan, usize),
) -> Result<Rejected, WireError> {
    for_each_span_within(body, u64::MAX, f).map_err(|e| match e {
        Unparsed::Malformed(e) => e,
        too_many => WireError(too_many.to_string()),
    })
}

/// [`for_each_span`] for a request from a client: one with more than `max_spans` spans (or
/// blocks) is refused before its spans are built.
pub(crate) fn for_each_span_within(
    body: &[u8],
    max_spans: u64,
    f: impl FnMut(TraceId, BufferedSpan, usize),
) -> Result<Rejected, Unparsed> {
    Ok(parse_within(body, max_spans)?.for_each(f))
}

/// A request parsed at the wire level, before its spans are built: the receiver sizes what
/// it routes them in from [`ParsedSpans::count`], so routing grows no vector span by span.
pub(crate) struct ParsedSpans<'a>(wire::ParsedTraces<'a>);

/// Parses a request from a client, refused past `max_spans` spans or blocks.
pub(crate) fn parse_within(body: &[u8], max_spans: u64) -> Result<ParsedSpans<'_>, Unparsed> {
    wire::parse_traces_within(body, max_spans).map(ParsedSpans)
}

impl ParsedSpans<'_> {
    /// Spans with a valid id, each of which [`Self::for_each`] will hand on.
    pub(crate) fn count(&self) -> usize {
        (self.0.resources.iter())
            .flat_map(|r| &r.scopes)
            .map(|s| s.spans.len())
            .sum()
    }

    /// Hands every span with a valid id to `f`, with its trace id and its cost to the memory
    /// budget: its bytes, the growth slack, and (for the first span of a scope) the resource
    /// and scope headers its scope's spans share.
    pub(crate) fn for_each(self, mut f: impl FnMut(TraceId, BufferedSpan, usize)) -> Rejected {
        let parsed = self.0;
        for resource in parsed.resources {
            let service = match wire::resource_attribute(resource.resource, "service.name") {
                Some(wire::AnyValueRef::Str(s)) => Arc::from(s),
                _ => Arc::from(""),
            };
            let resource_header = Arc::new(ResourceHeader {
                resource: Box::from(resource.resource),
                fields: resource.fields.into_boxed_slice(),
                service,
            });
            for scope in resource.scopes {
                let header = Arc::new(ScopeHeader {
                    resource: resource_header.clone(),
                    fields: scope.fields.into_boxed_slice(),
                });
                // Headers are shared by their spans; charge them to the first one.
                let mut header_cost = header.fields.len()
                    + header.resource.fields.len()
                    + header.resource.resource.len()
                    + 64;
                for s in scope.spans {
                    let span = BufferedSpan {
                        bytes: Box::from(s.bytes),
                        scope: header.clone(),
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        status_code: u8::try_from(s.status_code).unwrap_or(0),
                        kind: u8::try_from(s.kind).unwrap_or(0),
                        has_trace_state: s.has_trace_state,
                    };
                    let cost = span.cost() + SPAN_SLACK + std::mem::take(&mut header_cost);
                    f(s.trace_id, span, cost);
                }
            }
        }
        Rejected {
            spans: parsed.rejected_spans,
            first: parsed.rejection,
        }
    }
}
