//! The index of the trace being decided: facts computed once per trace and shared by every
//! policy of the chain (parents, leaves, roots, services, the summary, attribute positions).
//!
//! Pure data: built from a trace's spans and read by the host side of the contract
//! ([`super::boundary`]) and the chain's batch facts. It never sees a guest value; every index
//! it is asked about has been checked at the boundary first.

use std::sync::Arc;

use super::bindings::tailgate::policy::types::{AttrValue, DictColumn, Summary};
use crate::otlp::wire::{self, AnyValueRef};
use crate::trace::{BufferedSpan, ScopeHeader, TraceId};

/// Facts about a trace computed once and shared by every policy of the chain. A chain keeps
/// one and rebuilds it in place for each trace, so its buffers are allocated once per worker.
#[derive(Debug, Default)]
pub struct TraceIndex {
    pub(crate) parents: Vec<Option<u32>>,
    pub(crate) missing_parent: Vec<bool>,
    pub(crate) is_leaf: Vec<bool>,
    pub span_count: u32,
    pub(crate) error_count: u32,
    pub(crate) duration_ns: u64,
    pub(crate) root: Option<u32>,
    /// Spans naming a parent that is not in the trace.
    pub(crate) orphan_count: u32,
    pub(crate) services: Vec<Arc<str>>,
    /// Open-addressing table of (span id, span index) by span id: the parent lookup. Its
    /// first `1 << bits` slots serve a trace; slots of older generations are free. Ids are
    /// random 64-bit numbers, so one multiply spreads them; no hasher runs. The id is held in
    /// the slot, so a probe reads no span.
    slots: Vec<Slot>,
    generation: u32,
    /// Every span attribute, found by one pass over the spans on the first attribute lookup
    /// of the trace and shared by every policy after it: a lookup compares key lengths and
    /// bytes in this table instead of parsing each span's protobuf again.
    pub(super) attrs: AttrTable,
}

/// One span attribute, as byte ranges of its span's bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttrEntry {
    key_at: u32,
    key_len: u32,
    value_at: u32,
    value_len: u32,
}

#[derive(Debug, Default)]
pub(super) struct AttrTable {
    pub(super) built: bool,
    pub(super) entries: Vec<AttrEntry>,
    /// `entries[starts[i]..starts[i + 1]]` are span `i`'s attributes, in wire order.
    pub(super) starts: Vec<u32>,
}

impl AttrTable {
    pub(super) fn build(&mut self, spans: &[BufferedSpan]) {
        self.entries.clear();
        self.starts.clear();
        for s in spans {
            let start = self.entries.len();
            self.starts.push(start as u32);
            let base = s.bytes.as_ptr() as usize;
            let entries = &mut self.entries;
            let clean = wire::for_each_span_attribute(&s.bytes, |key, value| {
                entries.push(AttrEntry {
                    key_at: (key.as_ptr() as usize - base) as u32,
                    key_len: key.len() as u32,
                    value_at: (value.as_ptr() as usize - base) as u32,
                    value_len: value.len() as u32,
                });
            });
            if !clean {
                // As a lookup in the span itself would: a malformed span has no attributes.
                self.entries.truncate(start);
            }
        }
        self.starts.push(self.entries.len() as u32);
        self.built = true;
    }

    /// The last value of `key` on span `i` (the last occurrence wins, as in protobuf).
    pub(super) fn get<'a>(
        &self,
        spans: &'a [BufferedSpan],
        i: usize,
        key: &str,
    ) -> Option<AnyValueRef<'a>> {
        self.get_encoded(spans, i, key).and_then(wire::any_value)
    }

    /// The encoded `AnyValue` of `key`'s last occurrence on span `i`.
    fn get_encoded<'a>(&self, spans: &'a [BufferedSpan], i: usize, key: &str) -> Option<&'a [u8]> {
        let bytes: &'a [u8] = &spans[i].bytes;
        let range = self.starts[i] as usize..self.starts[i + 1] as usize;
        self.entries[range]
            .iter()
            .rev()
            .find(|e| {
                e.key_len as usize == key.len()
                    && &bytes[e.key_at as usize..(e.key_at + e.key_len) as usize] == key.as_bytes()
            })
            .map(|e| &bytes[e.value_at as usize..(e.value_at + e.value_len) as usize])
    }

    /// `key` over every span as distinct values and one code per span (`NO_VALUE` where
    /// the span has none). Values are told apart by their encoded bytes.
    pub(super) fn dict_column(&self, spans: &[BufferedSpan], key: &str) -> DictColumn {
        let mut values = Vec::new();
        let mut codes_of: foldhash::HashMap<&[u8], u32> = Default::default();
        let codes = (0..spans.len())
            .map(|i| {
                let Some(encoded) = self.get_encoded(spans, i, key) else {
                    return NO_VALUE;
                };
                if let Some(code) = codes_of.get(encoded) {
                    return *code;
                }
                let Some(value) = wire::any_value(encoded).and_then(to_attr_value) else {
                    return NO_VALUE;
                };
                let code = values.len() as u32;
                values.push(value);
                codes_of.insert(encoded, code);
                code
            })
            .collect();
        DictColumn { values, codes }
    }

    /// Every attribute of span `i` as (key, value), in wire order.
    pub(super) fn of_span<'a>(
        &'a self,
        spans: &'a [BufferedSpan],
        i: usize,
    ) -> impl Iterator<Item = (&'a [u8], AnyValueRef<'a>)> + 'a {
        let bytes: &'a [u8] = &spans[i].bytes;
        let range = self.starts[i] as usize..self.starts[i + 1] as usize;
        self.entries[range].iter().filter_map(move |e| {
            let key = &bytes[e.key_at as usize..(e.key_at + e.key_len) as usize];
            let value = &bytes[e.value_at as usize..(e.value_at + e.value_len) as usize];
            Some((key, wire::any_value(value)?))
        })
    }
}

/// A slot of the span-id table. It is in use only when its `generation` is the index's
/// current one, so the table is never cleared between traces.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    index: u32,
    generation: u32,
}

/// A `dict-column` code for a span without the attribute.
const NO_VALUE: u32 = u32::MAX;

const EMPTY: Slot = Slot {
    id: 0,
    index: 0,
    generation: 0,
};

/// The per-process salt that keeps crafted ids from colliding on purpose.
fn salt() -> u64 {
    static SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SALT.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x7461_696c_6761_7465);
        h.finish()
    })
}

/// Probes for `id` in a table of `1 << bits` slots (those of `generation` in use) from its
/// home slot (an odd fixed multiplier over the salted id), and returns the slot holding it
/// or the free slot where it belongs.
fn probe(slots: &[Slot], id: u64, salt: u64, bits: u32, generation: u32) -> usize {
    let mask = slots.len() - 1;
    let mut at = ((id ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize;
    loop {
        let slot = slots[at];
        if slot.generation != generation || slot.id == id {
            return at;
        }
        at = (at + 1) & mask;
    }
}

impl TraceIndex {
    pub(crate) fn new(spans: &[BufferedSpan]) -> Self {
        let mut index = Self::default();
        index.rebuild(spans);
        index
    }

    /// Recomputes every fact for `spans`, reusing this index's buffers.
    pub fn rebuild(&mut self, spans: &[BufferedSpan]) {
        // At most half full: short probes. The table is reused, so it is allocated once per
        // worker and grown only for a larger trace than any before.
        let bits = (spans.len().max(1) * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(4);
        let salt = salt();
        let size = 1usize << bits;
        if self.slots.len() < size {
            self.slots.resize(size, EMPTY);
        }
        // A new generation frees every slot without writing them.
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.slots.fill(EMPTY);
            self.generation = 1;
        }
        let generation = self.generation;
        let slots = &mut self.slots[..size];
        for (i, s) in spans.iter().enumerate() {
            let id = u64::from_ne_bytes(s.span_id);
            let at = probe(slots, id, salt, bits, generation);
            // A repeated span id: the first arrival keeps the slot.
            if slots[at].generation != generation {
                slots[at] = Slot {
                    id,
                    index: i as u32,
                    generation,
                };
            }
        }
        let n = spans.len();
        self.parents.clear();
        self.parents.resize(n, None);
        self.missing_parent.clear();
        self.missing_parent.resize(n, false);
        self.is_leaf.clear();
        self.is_leaf.resize(n, true);
        self.services.clear();
        // Plain slices from here: the loop then keeps every pointer in a register.
        let (slots, parents, missing, is_leaf) = (
            &self.slots[..size],
            &mut self.parents[..],
            &mut self.missing_parent[..],
            &mut self.is_leaf[..],
        );
        let mut root: Option<u32> = None;
        let (mut min_start, mut max_end) = (u64::MAX, 0u64);
        let mut error_count = 0;
        let mut orphan_count = 0;
        let mut last_parent: Option<(u64, Slot)> = None;
        let mut last_scope: Option<&Arc<ScopeHeader>> = None;
        for (i, s) in spans.iter().enumerate() {
            if s.is_root() {
                let earlier =
                    root.is_none_or(|r| s.start_unix_nano < spans[r as usize].start_unix_nano);
                if earlier {
                    root = Some(i as u32);
                }
            } else {
                let id = u64::from_ne_bytes(s.parent_span_id);
                // Siblings come in runs (a parent's calls are sent together): the previous
                // span's answer serves the next one with the same parent.
                let slot = match last_parent {
                    Some((last, slot)) if last == id => slot,
                    _ => {
                        let slot = slots[probe(slots, id, salt, bits, generation)];
                        last_parent = Some((id, slot));
                        slot
                    }
                };
                if slot.generation == generation {
                    parents[i] = Some(slot.index);
                    is_leaf[slot.index as usize] = false;
                } else {
                    missing[i] = true;
                    orphan_count += 1;
                }
            }
            min_start = min_start.min(s.start_unix_nano);
            max_end = max_end.max(s.end_unix_nano);
            error_count += u32::from(s.status_code == 2);
            // Spans of one request share their scope: only a new scope can add a service.
            if last_scope.is_some_and(|l| Arc::ptr_eq(l, &s.scope)) {
                continue;
            }
            last_scope = Some(&s.scope);
            let service = &s.scope.resource.service;
            // Spans of one batch share the Arc: compare pointers before text.
            if !service.is_empty()
                && !self
                    .services
                    .iter()
                    .any(|x| Arc::ptr_eq(x, service) || x == service)
            {
                self.services.push(service.clone());
            }
        }
        self.attrs.built = false; // built on the first attribute lookup, if any policy makes one
        self.span_count = spans.len() as u32;
        self.error_count = error_count;
        self.duration_ns = max_end.saturating_sub(min_start);
        self.root = root;
        self.orphan_count = orphan_count;
    }

    /// The contract's `summary` of the indexed trace.
    pub(crate) fn summary(&self) -> Summary {
        Summary {
            span_count: self.span_count,
            error_count: self.error_count,
            duration_ns: self.duration_ns,
            root: self.root,
            service_count: self.services.len() as u32,
            orphan_count: self.orphan_count,
        }
    }

    /// The trace's facts for `decide-summaries`, appended to `out`: the summary, the id and
    /// the OTel randomness (the root's explicit `rv`, else the first span's, else the id's).
    pub fn push_facts(&self, trace_id: &TraceId, spans: &[BufferedSpan], out: &mut Vec<u64>) {
        let probe = self.root.map(|r| r as usize).unwrap_or(0);
        let randomness = spans
            .get(probe)
            .filter(|s| s.has_trace_state)
            .map(|s| wire::span_trace_state(&s.bytes))
            .and_then(tailgate_plugin_sdk::explicit_randomness)
            .unwrap_or_else(|| tailgate_plugin_sdk::trace_id_randomness(trace_id));
        let summary = tailgate_plugin_sdk::Summary {
            span_count: self.span_count,
            error_count: self.error_count,
            duration_ns: self.duration_ns,
            root: self.root,
            service_count: self.services.len() as u32,
            orphan_count: self.orphan_count,
        };
        tailgate_plugin_sdk::facts_to_words(&summary, trace_id, randomness, out);
    }
}

/// The 16-byte trace id as the contract's two big-endian halves.
pub(crate) fn trace_id_words(id: &TraceId) -> (u64, u64) {
    let (hi, lo) = id.split_at(8);
    let word = |b: &[u8]| b.try_into().map(u64::from_be_bytes).unwrap_or(0);
    (word(hi), word(lo))
}

/// A span's name, read from its bytes.
pub(crate) fn span_name(span: &BufferedSpan) -> &str {
    wire::span_name(&span.bytes)
}

/// An OTLP attribute value as the guest sees it.
pub(crate) fn to_attr_value(v: AnyValueRef<'_>) -> Option<AttrValue> {
    Some(match v {
        AnyValueRef::Str(s) => AttrValue::Str(s.to_owned()),
        AnyValueRef::Bool(b) => AttrValue::Boolean(b),
        AnyValueRef::Int(i) => AttrValue::Int(i),
        AnyValueRef::Double(d) => AttrValue::Double(d),
        AnyValueRef::Bytes(b) => AttrValue::Bytes(b.to_vec()),
        AnyValueRef::Array(bytes) => AttrValue::Json(super::json_value::array_to_json(bytes)),
        AnyValueRef::KvList(bytes) => AttrValue::Json(super::json_value::kvlist_to_json(bytes)),
        AnyValueRef::Empty => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ResourceHeader;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};

    fn span(id: u64, parent: u64, start: u64, service: &Arc<ResourceHeader>) -> BufferedSpan {
        BufferedSpan {
            bytes: Box::new([]),
            scope: Arc::new(ScopeHeader {
                resource: service.clone(),
                fields: Box::new([]),
            }),
            span_id: id.to_be_bytes(),
            parent_span_id: parent.to_be_bytes(),
            start_unix_nano: start,
            end_unix_nano: start + 10,
            status_code: 0,
            kind: 1,
            has_trace_state: false,
        }
    }

    fn resource(service: &str) -> Arc<ResourceHeader> {
        Arc::new(ResourceHeader {
            fields: Box::new([]),
            resource: Box::new([]),
            service: Arc::from(service),
        })
    }

    #[test]
    fn parents_leaves_roots_and_services() {
        let (a, b) = (resource("a"), resource("b"));
        let spans = vec![
            span(5, 1, 20, &a), // child of the root, arrives first
            span(1, 0, 10, &a), // the root
            span(6, 5, 30, &b),
            span(7, 99, 40, &b), // parent never arrived
            span(2, 0, 5, &b),   // a second parentless span, earlier: the root
        ];
        let i = TraceIndex::new(&spans);
        assert_eq!(i.parents, vec![Some(1), None, Some(0), None, None]);
        assert_eq!(i.missing_parent, vec![false, false, false, true, false]);
        assert_eq!(i.is_leaf, vec![false, false, true, true, true]);
        assert_eq!(i.root, Some(4));
        assert_eq!(i.duration_ns, 50 - 5);
        let services: Vec<&str> = i.services.iter().map(|s| &**s).collect();
        assert_eq!(services, ["a", "b"]);
    }

    #[test]
    fn runs_of_siblings_and_ids_of_an_earlier_trace_resolve_correctly() {
        let r = resource("svc");
        let mut index = TraceIndex::default();
        // Trace A holds span 9; trace B's spans name 9 as their parent, but it is not in B:
        // the table's slot for 9 from trace A must not answer for B.
        index.rebuild(&[span(9, 0, 0, &r), span(3, 9, 1, &r)]);
        let spans = vec![
            span(1, 0, 0, &r),
            span(2, 1, 1, &r), // a run of siblings under the root
            span(3, 1, 2, &r),
            span(4, 9, 3, &r), // a run of orphans under a parent of trace A
            span(5, 9, 4, &r),
            span(6, 1, 5, &r), // the root again after the run
            span(7, 2, 6, &r),
        ];
        index.rebuild(&spans);
        let want = [None, Some(0), Some(0), None, None, Some(0), Some(1)];
        assert_eq!(index.parents, want);
        assert_eq!(index.orphan_count, 2);
        assert_eq!(
            index.missing_parent,
            [false, false, false, true, true, false, false]
        );
        assert_eq!(index.is_leaf, [false, false, true, true, true, true, true]);
    }

    #[test]
    fn a_repeated_span_id_resolves_to_its_first_arrival() {
        let r = resource("svc");
        let spans = vec![span(1, 0, 0, &r), span(1, 0, 5, &r), span(2, 1, 6, &r)];
        let i = TraceIndex::new(&spans);
        assert_eq!(i.parents[2], Some(0));
    }

    #[test]
    fn rebuilding_in_place_matches_a_fresh_index_for_any_size() {
        let r = resource("svc");
        let mut reused = TraceIndex::default();
        for n in [3usize, 1000, 0, 40, 1] {
            // Sequential ids, the worst case for a table indexed by low bits.
            let spans: Vec<_> = (0..n as u64)
                .map(|k| span(k + 1, if k == 0 { 0 } else { k }, k, &r))
                .collect();
            reused.rebuild(&spans);
            let fresh = TraceIndex::new(&spans);
            assert_eq!(reused.parents, fresh.parents);
            assert_eq!(reused.is_leaf, fresh.is_leaf);
            let expect: Vec<Option<u32>> = (0..n as u32).map(|k| k.checked_sub(1)).collect();
            assert_eq!(reused.parents, expect, "{n} spans");
            assert_eq!(reused.span_count as usize, n);
        }
    }

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            key_strindex: 0,
        }
    }

    fn with_attrs(id: u64, attrs: Vec<KeyValue>) -> BufferedSpan {
        use prost::Message;
        let proto = opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: vec![1; 16],
            span_id: id.to_be_bytes().to_vec(),
            name: format!("span-{id}"),
            attributes: attrs,
            ..Default::default()
        };
        BufferedSpan {
            bytes: proto.encode_to_vec().into_boxed_slice(),
            ..span(id, 0, id, &resource("svc"))
        }
    }

    #[test]
    fn the_attribute_table_answers_as_the_span_bytes_do() {
        let spans = vec![
            with_attrs(
                1,
                vec![
                    kv("tenant.id", Value::StringValue("t1".into())),
                    kv("tokens", Value::IntValue(5)),
                    // A repeated key: the last occurrence wins, as in protobuf.
                    kv("tenant.id", Value::StringValue("t2".into())),
                ],
            ),
            with_attrs(2, vec![]),
            with_attrs(
                3,
                vec![
                    kv("tokens", Value::DoubleValue(2.5)),
                    kv("tenant.i", Value::StringValue("prefix, not the key".into())),
                ],
            ),
        ];
        let mut table = AttrTable::default();
        table.build(&spans);
        for key in ["tenant.id", "tokens", "tenant.i", "absent", ""] {
            for (i, s) in spans.iter().enumerate() {
                assert_eq!(
                    table.get(&spans, i, key),
                    wire::span_attribute(&s.bytes, key),
                    "span {i}, key {key:?}"
                );
            }
        }
        assert_eq!(
            table.get(&spans, 0, "tenant.id"),
            Some(AnyValueRef::Str("t2"))
        );
        let all: Vec<Vec<(&[u8], AnyValueRef<'_>)>> = (0..spans.len())
            .map(|i| table.of_span(&spans, i).collect())
            .collect();
        assert_eq!(all[0].len(), 3);
        assert!(all[1].is_empty());
        assert_eq!(
            all[2][1],
            (&b"tenant.i"[..], AnyValueRef::Str("prefix, not the key"))
        );
    }

    #[test]
    fn a_dictionary_column_decodes_to_the_plain_column() {
        // 40 spans: 3 distinct values for `tenant`, 40 for `user`, mixed types and gaps for
        // `mixed`.
        let spans: Vec<BufferedSpan> = (0..40u64)
            .map(|i| {
                let mut attributes = vec![
                    kv("tenant", Value::StringValue(format!("t{}", i % 3))),
                    kv("user", Value::StringValue(format!("u{i}"))),
                ];
                match i % 4 {
                    0 => attributes.push(kv("mixed", Value::IntValue(7))),
                    1 => attributes.push(kv("mixed", Value::StringValue("7".into()))),
                    2 => attributes.push(kv("mixed", Value::BoolValue(true))),
                    _ => {}
                }
                with_attrs(i + 1, attributes)
            })
            .collect();
        let mut table = AttrTable::default();
        table.build(&spans);
        for (key, distinct) in [("tenant", 3), ("user", 40), ("mixed", 3), ("absent", 0)] {
            let dict = table.dict_column(&spans, key);
            assert_eq!(dict.values.len(), distinct, "{key}");
            assert_eq!(dict.codes.len(), spans.len(), "{key}");
            for (i, code) in dict.codes.iter().enumerate() {
                let plain = table.get(&spans, i, key).and_then(to_attr_value);
                let decoded = (*code != NO_VALUE).then(|| dict.values[*code as usize].clone());
                assert_eq!(
                    format!("{decoded:?}"),
                    format!("{plain:?}"),
                    "{key}, span {i}"
                );
            }
        }
    }
}
