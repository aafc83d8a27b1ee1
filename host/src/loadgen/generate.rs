//! Deterministic agent traces: the same seed and shape give the same traces, byte for byte, so
//! a bench, a replay file and a live load all see one workload.
//!
//! A trace is an agent run: a root `agent.run` (service `agent`) carrying the baggage
//! attributes (`tenant.id`, `user.id`, `feature.name`) and the user's query, then steps in a
//! fixed rotation: a `retrieval.search` on service `retriever` with a `retrieval.top_score`, an
//! `llm.call` with the GenAI semantic-convention model and token attributes, a `tool.call` on
//! service `tools`, and a 1 ms `cache.lookup` leaf under the tool call. Some traces carry an
//! error span, a slow LLM call, an expensive model with many tokens, or a low retrieval score,
//! at the rates of [`Shape`].
//!
//! Every span carries `loadgen.seq`, an integer unique across the whole load (see
//! [`Generator::with_seq`]), so a sink counts loss and duplicates exactly.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};

/// The span attribute holding a span's sequence number.
pub const SEQ_ATTRIBUTE: &str = "loadgen.seq";

/// Services of an agent trace, in the order their `ResourceSpans` appear in a request.
pub const SERVICES: [&str; 3] = ["agent", "retriever", "tools"];

const MODELS: [&str; 3] = ["gpt-4o-mini", "claude-haiku-4", "gpt-4o"];
const COSTLY_MODEL: &str = "claude-sonnet-4";
const FEATURES: [&str; 6] = [
    "support-chat",
    "billing",
    "search",
    "onboarding",
    "code-review",
    "summaries",
];
const TOOLS: [&str; 4] = ["web.search", "sql.query", "calendar.read", "http.fetch"];

/// What the generated traces look like. Rates are per trace, in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Spans per trace, root included (at least 1).
    pub(crate) spans_per_trace: usize,
    /// Traces with one failing tool call (status ERROR).
    pub(crate) error_rate: f64,
    /// Traces with one LLM call 20× slower than usual.
    pub(crate) slow_rate: f64,
    /// Traces whose LLM calls use an expensive model with 10× the tokens.
    pub(crate) costly_rate: f64,
    /// Traces whose retrieval scores fall to 0.30-0.60 (0.75-0.98 otherwise).
    pub(crate) low_confidence_rate: f64,
    pub(crate) tenants: u32,
    pub(crate) users: u32,
    /// Characters of the root's `agent.query` (a high-cardinality value worth truncating).
    pub(crate) query_len: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            spans_per_trace: 30,
            error_rate: 0.02,
            slow_rate: 0.02,
            costly_rate: 0.02,
            low_confidence_rate: 0.02,
            tenants: 20,
            users: 2_000,
            query_len: 300,
        }
    }
}

/// The kind of one generated trace, for tests and reports; never written into the spans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traits {
    pub(crate) error: bool,
    pub(crate) slow: bool,
    pub(crate) costly: bool,
    pub(crate) low_confidence: bool,
}

/// SplitMix64: tiny, fast, and its output for a seed never changes with a dependency upgrade.
/// Public so tests that make their own traffic draw from the same deterministic stream.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn nonzero_id<const N: usize>(&mut self) -> [u8; N] {
        loop {
            let mut id = [0u8; N];
            for chunk in id.chunks_mut(8) {
                let bytes = self.next_u64().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            if id != [0; N] {
                return id;
            }
        }
    }
}

/// One generated trace: its spans by service (indexes into [`SERVICES`]).
#[derive(Debug, Clone)]
pub struct GeneratedTrace {
    pub trace_id: [u8; 16],
    pub spans: Vec<(usize, Span)>,
    pub traits: Traits,
}

/// Makes agent traces from a seed. Not `Sync`: give each sending connection its own, with
/// disjoint sequence numbers ([`Generator::with_seq`]) and seeds.
#[derive(Debug, Clone)]
pub struct Generator {
    shape: Shape,
    rng: Rng,
    next_seq: u64,
    seq_stride: u64,
    query: String,
}

impl Generator {
    pub fn new(seed: u64, shape: Shape) -> Self {
        let mut rng = Rng(seed);
        // A query with an e-mail address in it, as users paste them; attribute-hygiene redacts it.
        let words = [
            "why", "did", "my", "invoice", "change", "after", "the", "upgrade", "please", "check",
            "account", "history", "and", "explain",
        ];
        let mut query = String::from("contact jane.doe@example.com: ");
        while query.len() < shape.query_len {
            query.push_str(words[rng.below(words.len() as u64) as usize]);
            query.push(' ');
        }
        query.truncate(shape.query_len);
        Self {
            shape,
            rng,
            next_seq: 0,
            seq_stride: 1,
            query,
        }
    }

    /// Sequence numbers `start, start + stride, start + 2·stride, …`: connection `i` of `n` takes
    /// `with_seq(i, n)`, so the whole load numbers its spans `0..total` with no gap or overlap.
    #[cfg(test)]
    pub(crate) fn with_seq(mut self, start: u64, stride: u64) -> Self {
        self.set_seq(start, stride);
        self
    }

    /// [`Generator::with_seq`] in place: a sender that hands out blocks of seqs renumbers the
    /// same generator before each request.
    pub(crate) fn set_seq(&mut self, start: u64, stride: u64) {
        self.next_seq = start;
        self.seq_stride = stride.max(1);
    }

    /// The sequence number the next span will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += self.seq_stride;
        s
    }

    /// One agent trace whose root span ends at `end_unix_nano`.
    pub fn trace(&mut self, end_unix_nano: u64) -> GeneratedTrace {
        let shape = &self.shape;
        let n = shape.spans_per_trace.max(1);
        let traits = Traits {
            error: self.rng.chance(shape.error_rate),
            slow: self.rng.chance(shape.slow_rate),
            costly: self.rng.chance(shape.costly_rate),
            low_confidence: self.rng.chance(shape.low_confidence_rate),
        };
        let tenant = format!("tenant-{}", self.rng.below(u64::from(shape.tenants)));
        let user = format!("user-{}", self.rng.below(u64::from(shape.users)));
        let feature = FEATURES[self.rng.below(FEATURES.len() as u64) as usize];
        let trace_id: [u8; 16] = self.rng.nonzero_id();
        let root_id: [u8; 8] = self.rng.nonzero_id();
        let baggage = [
            kv_str("tenant.id", &tenant),
            kv_str("user.id", &user),
            kv_str("feature.name", feature),
        ];

        // Children run one after another; the root starts 1 ms before the first and ends 1 ms
        // after the last. Durations first, then times backwards from `end_unix_nano`.
        let children = n - 1;
        let steps: Vec<Step> = (0..children).map(|i| Step::at(i, children)).collect();
        let slow_llm = traits
            .slow
            .then(|| steps.iter().position(|s| *s == Step::Llm))
            .flatten();
        let error_tool = traits
            .error
            .then(|| steps.iter().position(|s| *s == Step::Tool))
            .flatten();
        let durations: Vec<u64> = steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let ms = match step {
                    Step::Retrieval => self.rng.between(20, 120),
                    Step::Llm if slow_llm == Some(i) => self.rng.between(20_000, 40_000),
                    Step::Llm => self.rng.between(300, 1_500),
                    Step::Tool => self.rng.between(10, 300),
                    Step::Cache => 1,
                };
                ms * 1_000_000
            })
            .collect();
        // A cache lookup runs inside the tool call before it, so it takes no slot of its own.
        let total: u64 = steps
            .iter()
            .zip(&durations)
            .filter(|(s, _)| **s != Step::Cache)
            .map(|(_, d)| d)
            .sum::<u64>()
            + 2_000_000;
        let root_start = end_unix_nano.saturating_sub(total);

        let mut spans = Vec::with_capacity(n);
        let mut root_attrs = vec![kv_str("agent.query", &self.query)];
        root_attrs.extend(baggage.iter().cloned());
        root_attrs.push(kv_int(SEQ_ATTRIBUTE, self.seq() as i64));
        spans.push((
            0,
            Span {
                trace_id: trace_id.to_vec(),
                span_id: root_id.to_vec(),
                name: "agent.run".into(),
                kind: span::SpanKind::Server as i32,
                start_time_unix_nano: root_start,
                end_time_unix_nano: end_unix_nano,
                attributes: root_attrs,
                status: Some(Status::default()),
                ..Default::default()
            },
        ));

        let mut cursor = root_start + 1_000_000;
        let mut last_tool: Option<([u8; 8], u64, u64)> = None;
        for (i, step) in steps.iter().enumerate() {
            let id: [u8; 8] = self.rng.nonzero_id();
            let duration = durations[i];
            let (service, parent, start, name, kind, mut attrs) = match step {
                Step::Retrieval => {
                    let score = if traits.low_confidence {
                        0.30 + 0.30 * self.rng.unit()
                    } else {
                        0.75 + 0.23 * self.rng.unit()
                    };
                    let attrs = vec![
                        kv_f64("retrieval.top_score", (score * 1000.0).round() / 1000.0),
                        kv_int("retrieval.documents", self.rng.between(3, 20) as i64),
                    ];
                    (
                        1,
                        root_id,
                        cursor,
                        "retrieval.search",
                        span::SpanKind::Client,
                        attrs,
                    )
                }
                Step::Llm => {
                    let (model, scale) = if traits.costly {
                        (COSTLY_MODEL, 10)
                    } else {
                        (MODELS[self.rng.below(MODELS.len() as u64) as usize], 1)
                    };
                    let system = if model.starts_with("claude") {
                        "anthropic"
                    } else {
                        "openai"
                    };
                    let attrs = vec![
                        kv_str("gen_ai.system", system),
                        kv_str("gen_ai.operation.name", "chat"),
                        kv_str("gen_ai.request.model", model),
                        kv_int(
                            "gen_ai.usage.input_tokens",
                            (self.rng.between(400, 2_000) * scale) as i64,
                        ),
                        kv_int(
                            "gen_ai.usage.output_tokens",
                            (self.rng.between(50, 500) * scale) as i64,
                        ),
                    ];
                    (
                        0,
                        root_id,
                        cursor,
                        "llm.call",
                        span::SpanKind::Client,
                        attrs,
                    )
                }
                Step::Tool => {
                    let tool = TOOLS[self.rng.below(TOOLS.len() as u64) as usize];
                    (
                        2,
                        root_id,
                        cursor,
                        "tool.call",
                        span::SpanKind::Internal,
                        vec![kv_str("tool.name", tool)],
                    )
                }
                Step::Cache => {
                    let (parent, tool_start, _) = last_tool.unwrap_or((root_id, cursor, 0));
                    (
                        2,
                        parent,
                        tool_start,
                        "cache.lookup",
                        span::SpanKind::Internal,
                        vec![kv_str("cache.hit", "false")],
                    )
                }
            };
            if *step != Step::Cache {
                cursor += duration;
            }
            if *step == Step::Tool {
                last_tool = Some((id, start, start + duration));
            }
            let status = if error_tool == Some(i) {
                Status {
                    code: 2,
                    message: "tool call failed: upstream returned 503".into(),
                }
            } else {
                Status::default()
            };
            attrs.extend(baggage.iter().cloned());
            attrs.push(kv_int(SEQ_ATTRIBUTE, self.seq() as i64));
            spans.push((
                service,
                Span {
                    trace_id: trace_id.to_vec(),
                    span_id: id.to_vec(),
                    parent_span_id: parent.to_vec(),
                    name: name.into(),
                    kind: kind as i32,
                    start_time_unix_nano: start,
                    end_time_unix_nano: start + duration,
                    attributes: attrs,
                    status: Some(status),
                    ..Default::default()
                },
            ));
        }
        GeneratedTrace {
            trace_id,
            spans,
            traits,
        }
    }

    /// An export request of `traces` whole traces, the last ending at `end_unix_nano` and each
    /// one 1 µs before the next, grouped into one `ResourceSpans` per service.
    pub(crate) fn request(
        &mut self,
        traces: usize,
        end_unix_nano: u64,
    ) -> ExportTraceServiceRequest {
        let generated: Vec<GeneratedTrace> = (0..traces)
            .map(|i| self.trace(end_unix_nano.saturating_sub(1_000 * (traces - 1 - i) as u64)))
            .collect();
        request_of(generated)
    }
}

/// Series in each metric of [`metrics_request`].
const SERIES_PER_METRIC: u64 = 10;

/// A metrics request of `points` data points, seqs `seq_start..seq_start + points`: cumulative
/// sums of [`SERIES_PER_METRIC`] series each (by `tenant.id` and `model`, as the cost counters of
/// an agent), every point carrying its `loadgen.seq`.
pub(crate) fn metrics_request(
    seq_start: u64,
    points: u64,
    now_unix_nano: u64,
) -> ExportMetricsServiceRequest {
    let metrics = (0..points.div_ceil(SERIES_PER_METRIC))
        .map(|m| {
            let first = m * SERIES_PER_METRIC;
            let data_points = (first..(first + SERIES_PER_METRIC).min(points))
                .map(|i| NumberDataPoint {
                    attributes: vec![
                        kv_str("tenant.id", &format!("tenant-{}", i % 5)),
                        kv_str(
                            "model",
                            if i % 2 == 0 {
                                "gpt-4o"
                            } else {
                                "claude-3-haiku"
                            },
                        ),
                        kv_int(SEQ_ATTRIBUTE, (seq_start + i) as i64),
                    ],
                    start_time_unix_nano: now_unix_nano.saturating_sub(60_000_000_000),
                    time_unix_nano: now_unix_nano,
                    value: Some(number_data_point::Value::AsDouble(
                        (seq_start + i) as f64 * 0.001,
                    )),
                    ..Default::default()
                })
                .collect();
            Metric {
                name: format!("agent.llm.cost_usd.{}", m % 4),
                unit: "USD".into(),
                data: Some(metric::Data::Sum(Sum {
                    data_points,
                    aggregation_temporality: 2,
                    is_monotonic: true,
                })),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv_str("service.name", "loadgen-metrics")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "tailgate-loadgen".into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Groups traces into one request, one `ResourceSpans` per service.
pub fn request_of(traces: impl IntoIterator<Item = GeneratedTrace>) -> ExportTraceServiceRequest {
    let mut by_service: [Vec<Span>; SERVICES.len()] = Default::default();
    for trace in traces {
        for (service, span) in trace.spans {
            by_service[service].push(span);
        }
    }
    let resource_spans = by_service
        .into_iter()
        .enumerate()
        .filter(|(_, spans)| !spans.is_empty())
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv_str("service.name", SERVICES[service]),
                    kv_str("service.version", "1.4.2"),
                    kv_str("deployment.environment.name", "production"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tailgate-loadgen".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Retrieval,
    Llm,
    Tool,
    Cache,
}

impl Step {
    /// The rotation retrieval, LLM, tool, cache; the last child is always an LLM call (the
    /// agent's answer), so even a 2-span trace has one.
    fn at(i: usize, children: usize) -> Step {
        if i + 1 == children {
            return Step::Llm;
        }
        [Step::Retrieval, Step::Llm, Step::Tool, Step::Cache][i % 4]
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        key_strindex: 0,
    }
}

fn kv_str(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

fn kv_int(key: &str, value: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(value))
}

fn kv_f64(key: &str, value: f64) -> KeyValue {
    kv(key, any_value::Value::DoubleValue(value))
}

/// The `loadgen.seq` of a span, if it has one.
pub fn seq_of(span: &Span) -> Option<u64> {
    span.attributes
        .iter()
        .find(|a| a.key == SEQ_ATTRIBUTE)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(v) => u64::try_from(*v).ok(),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_seed_does_not() {
        let a = Generator::new(7, Shape::default()).request(20, 1_700_000_000_000_000_000);
        let b = Generator::new(7, Shape::default()).request(20, 1_700_000_000_000_000_000);
        let c = Generator::new(8, Shape::default()).request(20, 1_700_000_000_000_000_000);
        assert_eq!(a.encode_to_vec(), b.encode_to_vec());
        assert_ne!(a.encode_to_vec(), c.encode_to_vec());
    }

    #[test]
    fn a_trace_is_a_well_formed_agent_run() {
        let end = 1_700_000_000_000_000_000;
        let mut g = Generator::new(1, Shape::default());
        for _ in 0..50 {
            let t = g.trace(end);
            assert_eq!(t.spans.len(), 30);
            let ids: HashMap<Vec<u8>, &Span> = t
                .spans
                .iter()
                .map(|(_, s)| (s.span_id.clone(), s))
                .collect();
            assert_eq!(ids.len(), 30, "span ids are unique");
            let root = &t.spans[0].1;
            assert_eq!(root.name, "agent.run");
            assert!(root.parent_span_id.is_empty());
            assert_eq!(root.end_time_unix_nano, end);
            for (_, s) in &t.spans[1..] {
                assert_eq!(s.trace_id, t.trace_id.to_vec());
                let parent = ids.get(&s.parent_span_id).expect("parent is in the trace");
                assert!(
                    s.start_time_unix_nano >= parent.start_time_unix_nano,
                    "{}",
                    s.name
                );
                assert!(
                    s.end_time_unix_nano <= parent.end_time_unix_nano,
                    "{}",
                    s.name
                );
                for key in ["tenant.id", "user.id", "feature.name"] {
                    assert!(
                        s.attributes.iter().any(|a| a.key == key),
                        "{key} on {}",
                        s.name
                    );
                }
            }
            let names: HashSet<&str> = t.spans.iter().map(|(_, s)| s.name.as_str()).collect();
            for name in ["retrieval.search", "llm.call", "tool.call", "cache.lookup"] {
                assert!(names.contains(name), "{name}");
            }
            let errors = t
                .spans
                .iter()
                .filter(|(_, s)| s.status.as_ref().is_some_and(|st| st.code == 2))
                .count();
            assert_eq!(errors, usize::from(t.traits.error));
        }
    }

    #[test]
    fn sequence_numbers_of_strided_generators_tile_the_range_exactly_once() {
        let conns = 3;
        let mut seen = Vec::new();
        for c in 0..conns {
            let mut g = Generator::new(100 + c, Shape::default()).with_seq(c, conns);
            let request = g.request(10, 1_000_000_000_000);
            for s in request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|ss| &ss.spans)
            {
                seen.push(seq_of(s).expect("every span has a seq"));
            }
        }
        seen.sort_unstable();
        let expected: Vec<u64> = (0..(conns * 10 * 30)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn rates_come_out_near_their_settings() {
        let shape = Shape {
            error_rate: 0.1,
            slow_rate: 0.2,
            costly_rate: 0.05,
            low_confidence_rate: 0.3,
            ..Shape::default()
        };
        let mut g = Generator::new(3, shape);
        let n = 5_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let t = g.trace(1_000_000_000_000).traits;
            for (c, on) in counts
                .iter_mut()
                .zip([t.error, t.slow, t.costly, t.low_confidence])
            {
                *c += usize::from(on);
            }
        }
        for (count, rate) in counts.iter().zip([0.1, 0.2, 0.05, 0.3]) {
            let got = *count as f64 / n as f64;
            let sigma = (rate * (1.0 - rate) / n as f64).sqrt();
            assert!((got - rate).abs() < 5.0 * sigma, "{got} vs {rate}");
        }
    }

    #[test]
    fn small_shapes_still_make_valid_traces() {
        for n in 1..6 {
            let shape = Shape {
                spans_per_trace: n,
                error_rate: 1.0,
                slow_rate: 1.0,
                ..Shape::default()
            };
            let t = Generator::new(n as u64, shape).trace(10_000_000_000_000);
            assert_eq!(t.spans.len(), n);
            if n >= 2 {
                assert_eq!(
                    t.spans.last().map(|(_, s)| s.name.as_str()),
                    Some("llm.call")
                );
            }
        }
    }
}
