//! The agent policy pack end to end: the real binary on `config/agent.toml` (only its listen
//! addresses and exporter replaced, so the test owns its ports and output), fed by the
//! OpenTelemetry Rust SDK's batch exporter over gRPC with agent-shaped traces.
//!
//! The class of each trace (normal, error, slow, costly, low confidence) lives only in this
//! test: spans carry what a real agent would emit (timings, status, model and tokens, a
//! retrieval score, tenant / user / feature), never a hint of the class.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, SdkTracerProvider,
};

use crate::support::*;

const AGENT_TOML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/agent.toml");

/// `config/agent.toml` as shipped, minus the tables a test must own (listen addresses,
/// exporter), which `Tailgate::start` supplies.
pub fn agent_config() -> (String, toml::Table) {
    let text = std::fs::read_to_string(AGENT_TOML).expect("read config/agent.toml");
    let mut table: toml::Table = text.parse().expect("config/agent.toml parses");
    for owned in ["receivers", "admin", "exporter"] {
        table.remove(owned);
    }
    (toml::to_string(&table).expect("re-serialise"), table)
}

/// The `config` table of the policy named `name` in agent.toml.
fn policy_config<'a>(table: &'a toml::Table, plugin: &str) -> &'a toml::Table {
    table["policies"]
        .as_array()
        .expect("[[policies]]")
        .iter()
        .find(|p| p.get("plugin").and_then(|v| v.as_str()) == Some(plugin))
        .unwrap_or_else(|| panic!("agent.toml has a {plugin} policy"))
        .get("config")
        .and_then(|c| c.as_table())
        .unwrap_or_else(|| panic!("{plugin} has a config table"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Class {
    Normal,
    Error,
    Slow,
    Costly,
    LowConfidence,
}

/// What the test knows about one trace it sent.
struct Sent {
    class: Class,
    tenant: String,
    cost: f64,
    input_tokens: u64,
    output_tokens: u64,
    duration_ms: u64,
    /// Span ids of the spans tailgate must deliver when it keeps the trace.
    kept_spans: HashSet<[u8; 8]>,
    /// Span ids noise-trim must remove from a kept trace.
    noise_spans: HashSet<[u8; 8]>,
    feature: String,
}

/// Prices from agent.toml's llm-cost config: model → (USD per 1k input, per 1k output).
struct Pricing {
    models: HashMap<String, (f64, f64)>,
    fallback: (f64, f64),
}

impl Pricing {
    fn from(table: &toml::Table) -> Self {
        let config = policy_config(table, "llm-cost");
        let pair = |t: &toml::Value| {
            let f = |k: &str| t[k].as_float().or(t[k].as_integer().map(|i| i as f64));
            (f("input_per_1k").unwrap(), f("output_per_1k").unwrap())
        };
        Pricing {
            models: config["pricing"]
                .as_table()
                .expect("pricing table")
                .iter()
                .map(|(m, p)| (m.clone(), pair(p)))
                .collect(),
            fallback: pair(&config["fallback"]),
        }
    }

    fn cost(&self, model: &str, input: u64, output: u64) -> f64 {
        let (i, o) = self.models.get(model).copied().unwrap_or(self.fallback);
        input as f64 / 1000.0 * i + output as f64 / 1000.0 * o
    }
}

/// Trace and span ids drawn from a seeded stream instead of the SDK's thread-local random
/// generator, so a test sends the same ids on every run: which traces the consistent-probability
/// sampler keeps (it decides on the trace id) is then the same on every run too.
#[derive(Debug)]
struct SeededIds(Mutex<Rng>);

impl IdGenerator for SeededIds {
    fn new_trace_id(&self) -> TraceId {
        let mut r = self.0.lock().unwrap();
        let (hi, lo) = (r.next_u64(), r.next_u64().max(1));
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&hi.to_be_bytes());
        id[8..].copy_from_slice(&lo.to_be_bytes());
        TraceId::from_bytes(id)
    }

    fn new_span_id(&self) -> SpanId {
        SpanId::from_bytes(self.0.lock().unwrap().next_u64().max(1).to_be_bytes())
    }
}

const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "local-llama-3"];
const TENANTS: [&str; 5] = ["acme", "globex", "initech", "umbrella", "hooli"];
const FEATURES: [&str; 4] = ["search", "billing", "support", "onboarding"];

struct Traffic {
    provider: SdkTracerProvider,
    rng: Rng,
    pricing: Pricing,
    sent: HashMap<[u8; 16], Sent>,
    spans: u64,
    next_user: u64,
}

impl Traffic {
    /// `seed` fixes everything the test sends: the traces' shapes and attributes, and their
    /// ids.
    fn new(tg: &Tailgate, pricing: Pricing, seed: u64) -> Self {
        let exporter = grpc_exporter(tg);
        // A queue large enough that the SDK never drops a span of ours.
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(1 << 17)
                    .with_max_export_batch_size(512)
                    .with_scheduled_delay(Duration::from_millis(50))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(Resource::builder().with_service_name("agent").build())
            .with_id_generator(SeededIds(Mutex::new(Rng(seed ^ 0x1d5_1d5_1d5_1d5_u64))))
            .build();
        Traffic {
            provider,
            rng: Rng(seed),
            pricing,
            sent: HashMap::new(),
            spans: 0,
            next_user: 0,
        }
    }

    /// One agent run: root `agent.run`, a retrieval span with a score, one to three LLM calls,
    /// one or two tool calls, and a 1 ms cache lookup (noise). `low_score` overrides the
    /// retrieval score's range.
    fn send(&mut self, class: Class, feature: Option<&str>, low_score: Option<(f64, f64)>) {
        let tracer = self.provider.tracer("agent-e2e");
        let r = &mut self.rng;
        let tenant = TENANTS[r.between(0, 4) as usize].to_owned();
        let feature = feature
            .unwrap_or(FEATURES[r.between(0, 3) as usize])
            .to_owned();
        // More users than the per-label cardinality cap, so the cap shows.
        let user = format!("user-{:04}", self.next_user % 1300);
        self.next_user += 1;
        let duration_ms = match class {
            Class::Slow => r.between(6_000, 9_000),
            _ => r.between(300, 1_500),
        };
        let score = match (class, low_score) {
            (Class::LowConfidence, _) => 0.30 + r.unit() * 0.30,
            (_, Some((lo, hi))) => lo + r.unit() * (hi - lo),
            _ => 0.78 + r.unit() * 0.10,
        };
        let calls = r.between(1, 3);
        let start = SystemTime::now() - Duration::from_secs(20);
        let at = |ms: u64| start + Duration::from_millis(ms);
        let common = [
            KeyValue::new("tenant.id", tenant.clone()),
            KeyValue::new("user.id", user.clone()),
            KeyValue::new("feature.name", feature.clone()),
        ];
        let query: String = "why is my invoice wrong? ".repeat(20); // 500 characters

        let mut root_attrs = common.to_vec();
        root_attrs.push(KeyValue::new("agent.query", query));
        let root = tracer
            .span_builder("agent.run")
            .with_kind(SpanKind::Server)
            .with_start_time(at(0))
            .with_attributes(root_attrs)
            .start(&tracer);
        let cx = Context::current_with_span(root);
        let mut kept_spans = HashSet::new();
        let mut noise_spans = HashSet::new();
        let child = |name: &str, from: u64, to: u64, attrs: Vec<KeyValue>, error: bool| {
            let mut all = common.to_vec();
            all.extend(attrs);
            let mut span = tracer
                .span_builder(name.to_owned())
                .with_start_time(at(from))
                .with_attributes(all)
                .start_with_context(&tracer, &cx);
            if error {
                span.set_status(Status::error("tool failed"));
            }
            let id = span.span_context().span_id().to_bytes();
            span.end_with_timestamp(at(to));
            id
        };
        let slot = duration_ms / (calls + 4);
        kept_spans.insert(child(
            "retrieval",
            0,
            slot,
            vec![KeyValue::new("retrieval.top_score", score)],
            false,
        ));
        noise_spans.insert(child("cache.lookup", slot, slot + 1, vec![], false));
        let (mut cost, mut input_tokens, mut output_tokens) = (0.0, 0, 0);
        for c in 0..calls {
            // Costly runs use the big models on long contexts.
            let model = match class {
                Class::Costly => MODELS[r.between(0, 1) as usize * 2],
                _ => MODELS[r.between(0, 3) as usize],
            };
            let (input, output) = match class {
                Class::Costly => (r.between(40_000, 60_000), r.between(4_000, 8_000)),
                _ => (r.between(300, 1_500), r.between(50, 400)),
            };
            cost += self.pricing.cost(model, input, output);
            input_tokens += input;
            output_tokens += output;
            // Half the calls use the older `llm.*` names, which llm-cost maps to gen_ai.*.
            let attrs = if r.next_u64().is_multiple_of(2) {
                vec![
                    KeyValue::new("gen_ai.request.model", model),
                    KeyValue::new("gen_ai.usage.input_tokens", input as i64),
                    KeyValue::new("gen_ai.usage.output_tokens", output as i64),
                ]
            } else {
                vec![
                    KeyValue::new("llm.model", model),
                    KeyValue::new("llm.input_tokens", input as i64),
                    KeyValue::new("llm.output_tokens", output as i64),
                ]
            };
            let from = slot * (c + 1);
            kept_spans.insert(child("llm.call", from, from + slot, attrs, false));
        }
        let tools = r.between(1, 2);
        for t in 0..tools {
            let from = slot * (calls + 1 + t);
            let error = class == Class::Error && t == 0;
            kept_spans.insert(child(
                "tool.call",
                from,
                from + slot.max(10),
                vec![KeyValue::new("tool.name", "sql")],
                error,
            ));
        }
        let trace_id = cx.span().span_context().trace_id().to_bytes();
        kept_spans.insert(cx.span().span_context().span_id().to_bytes());
        cx.span().end_with_timestamp(at(duration_ms));
        self.spans += (kept_spans.len() + noise_spans.len()) as u64;
        self.sent.insert(
            trace_id,
            Sent {
                class,
                tenant,
                cost,
                input_tokens,
                output_tokens,
                duration_ms,
                kept_spans,
                noise_spans,
                feature,
            },
        );
    }

    /// 500 normal traces, sent and settled: the percentile policies keep everything until they
    /// have seen enough. Returns their trace ids.
    fn warm_up(&mut self, tg: &Tailgate) -> HashSet<[u8; 16]> {
        for _ in 0..500 {
            self.send(Class::Normal, None, None);
        }
        self.flush();
        settle(tg, self.spans);
        self.sent.keys().copied().collect()
    }

    fn flush(&self) {
        self.provider
            .force_flush()
            .expect("flush the SDK's batch processor");
    }
}

/// Waits until tailgate has received every span sent and decided all of them, and the
/// exporter has written every kept one.
fn settle(tg: &Tailgate, spans: u64) -> Metrics {
    wait_for(Duration::from_secs(90), || {
        let m = tg.metrics();
        (m.received() == spans as f64 && m.accounted() == m.received() && m.exported() == m.kept())
            .then_some(m)
    })
    .unwrap_or_else(|| {
        let m = tg.metrics();
        panic!(
            "not settled: sent {spans}, received {}, kept {}, dropped {}, exported {}",
            m.received(),
            m.kept(),
            m.dropped(),
            m.exported()
        )
    })
}

/// The exported spans, by trace id.
fn exported(tg: &Tailgate) -> HashMap<[u8; 16], Vec<ProtoSpan>> {
    let mut out: HashMap<[u8; 16], Vec<ProtoSpan>> = HashMap::new();
    for (_, span) in exported_spans(&tg.exported()) {
        out.entry(span.trace_id.clone().try_into().unwrap())
            .or_default()
            .push(span);
    }
    out
}

/// What OTel's consistent probability sampling (and the bundled `probabilistic`) decides for
/// `trace_id` at `rate`: keep when the low 56 bits reach 2^56 - round(rate * 2^56).
fn probabilistic_keeps(trace_id: &[u8; 16], rate: f64) -> bool {
    let r = u64::from_be_bytes(trace_id[8..].try_into().unwrap()) & ((1 << 56) - 1);
    let t = (1u64 << 56) - (rate * (1u64 << 56) as f64).round() as u64;
    r >= t
}

fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * q) as usize]
}

fn sample_rate(table: &toml::Table) -> f64 {
    policy_config(table, "probabilistic")["rate"]
        .as_float()
        .expect("probabilistic rate")
}

/// Normal traces well inside the percentile thresholds (the test's own p70 of cost and p70
/// of duration over everything sent), where only the random sampler can keep them. Returns
/// (trace id, kept?) for each.
fn ordinary_normals(
    traffic: &Traffic,
    measured: &HashSet<[u8; 16]>,
    out: &HashMap<[u8; 16], Vec<ProtoSpan>>,
) -> Vec<([u8; 16], bool)> {
    let all: Vec<&Sent> = traffic.sent.values().collect();
    let cost_cut = quantile(all.iter().map(|s| s.cost).collect(), 0.70);
    let slow_cut = quantile(all.iter().map(|s| s.duration_ms as f64).collect(), 0.70);
    measured
        .iter()
        .filter(|id| {
            let s = &traffic.sent[*id];
            s.class == Class::Normal && s.cost < cost_cut && (s.duration_ms as f64) < slow_cut
        })
        .map(|id| (*id, out.contains_key(id)))
        .collect()
}

/// Traces the sampler alone should have decided but were decided otherwise, described.
fn against_sampler(
    traffic: &Traffic,
    ordinary: &[([u8; 16], bool)],
    out: &HashMap<[u8; 16], Vec<ProtoSpan>>,
    rate: f64,
) -> Vec<String> {
    ordinary
        .iter()
        .filter(|(id, kept)| *kept != probabilistic_keeps(id, rate))
        .map(|(id, kept)| {
            let s = &traffic.sent[id];
            let root = out
                .get(id)
                .and_then(|spans| spans.iter().find(|s| s.name == "agent.run"));
            format!(
                "{} kept={kept} cost={:.4} duration={}ms by {:?} ({:?})",
                hex(id),
                s.cost,
                s.duration_ms,
                root.and_then(|r| attr_str(r, "sampling.policy")),
                root.and_then(|r| attr_str(r, "sampling.reason")),
            )
        })
        .collect()
}

/// Asserts that each of `ordinary` was kept exactly when the sampler keeps its trace id, and
/// that the kept share is `rate` within four binomial standard deviations. The trace ids come
/// from the test's seed ([`SeededIds`]), so the share is the same on every run: the check is
/// deterministic, and still fails if tailgate samples at another rate.
fn assert_sampled_alone(
    traffic: &Traffic,
    ordinary: &[([u8; 16], bool)],
    out: &HashMap<[u8; 16], Vec<ProtoSpan>>,
    rate: f64,
    what: &str,
) {
    let wrong = against_sampler(traffic, ordinary, out, rate);
    assert!(
        wrong.is_empty(),
        "{what}: {} decided against the sampler:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let kept_rate = ordinary.iter().filter(|(_, k)| *k).count() as f64 / ordinary.len() as f64;
    let tolerance = 4.0 * (rate * (1.0 - rate) / ordinary.len() as f64).sqrt();
    eprintln!(
        "{what} kept: {kept_rate:.4} of {} (config {rate}, tolerance ±{tolerance:.4})",
        ordinary.len()
    );
    assert!(
        (kept_rate - rate).abs() <= tolerance,
        "{what}: rate {kept_rate}"
    );
}

fn attr_str<'a>(span: &'a ProtoSpan, key: &str) -> Option<&'a str> {
    attr(span, key)
}

#[test]
fn agent_pack_keeps_every_interesting_trace_samples_the_rest_and_attributes_cost() {
    let (config, table) = agent_config();
    let tg = Tailgate::start(&config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut traffic = Traffic::new(&tg, Pricing::from(&table), 7);
    let warm = traffic.warm_up(&tg);

    // Measured: about 3% of each interesting class, the rest normal, shuffled.
    let mut counts: BTreeMap<Class, usize> = BTreeMap::new();
    for _ in 0..2_000 {
        let roll = traffic.rng.between(0, 99);
        let class = match roll {
            0..=2 => Class::Error,
            3..=5 => Class::Slow,
            6..=8 => Class::Costly,
            9..=11 => Class::LowConfidence,
            _ => Class::Normal,
        };
        *counts.entry(class).or_default() += 1;
        traffic.send(class, None, None);
    }
    traffic.flush();
    let metrics = settle(&tg, traffic.spans);
    let out = exported(&tg);
    let measured: HashSet<[u8; 16]> = traffic
        .sent
        .keys()
        .filter(|id| !warm.contains(*id))
        .copied()
        .collect();
    eprintln!("measured traces by class: {counts:?}");
    assert!(counts.values().sum::<usize>() == 2_000 && counts.len() == 5);

    // 1. Every interesting trace is kept, whole (minus the trimmed noise), with its reason.
    for id in &measured {
        let sent = &traffic.sent[id];
        if sent.class == Class::Normal {
            continue;
        }
        let spans = out
            .get(id)
            .unwrap_or_else(|| panic!("{:?} trace {} was dropped", sent.class, hex(id)));
        let root = spans.iter().find(|s| s.name == "agent.run").unwrap();
        let policy = attr_str(root, "sampling.policy").unwrap_or_default();
        // `sampling.policy` names the first policy in chain order that kept the trace. A
        // costly trace may also be among the slowest 5% of normal durations.
        let expected: &[&str] = match sent.class {
            Class::Error => &["errors"],
            Class::LowConfidence => &["retrieval"],
            Class::Slow => &["slow"],
            Class::Costly => &["slow", "cost"],
            Class::Normal => unreachable!(),
        };
        assert!(
            expected.contains(&policy),
            "{:?} trace kept by {policy:?}, expected one of {expected:?}",
            sent.class
        );
    }
    // Every kept trace (of any class) is complete except for the noise noise-trim removes.
    let mut trimmed = 0;
    for (id, spans) in &out {
        let Some(sent) = traffic.sent.get(id) else {
            panic!("exported a trace the test never sent: {}", hex(id))
        };
        let got: HashSet<[u8; 8]> = spans
            .iter()
            .map(|s| s.span_id.clone().try_into().unwrap())
            .collect();
        assert_eq!(got.len(), spans.len(), "a span exported twice");
        assert_eq!(got, sent.kept_spans, "kept trace {} incomplete", hex(id));
        trimmed += sent.noise_spans.len();
    }
    assert_eq!(
        metrics.sum("tailgate_policy_noise_trimmed_spans_total", &[]),
        trimmed as f64,
        "noise-trim counts exactly the spans it removed"
    );

    // 2. Normal traffic away from the percentile thresholds is kept exactly when the
    // consistent-probability sampler keeps it: the configured rate.
    let rate = sample_rate(&table);
    let ordinary = ordinary_normals(&traffic, &measured, &out);
    assert!(ordinary.len() > 900, "{} ordinary traces", ordinary.len());
    assert_sampled_alone(&traffic, &ordinary, &out, rate, "ordinary normal traces");

    // 3. Cost and tokens per tenant, over all traffic sent (kept or not).
    let mut by_tenant: BTreeMap<&str, (f64, f64, f64)> = BTreeMap::new();
    for s in traffic.sent.values() {
        let e = by_tenant.entry(&s.tenant).or_default();
        e.0 += s.cost;
        e.1 += s.input_tokens as f64;
        e.2 += s.output_tokens as f64;
    }
    for (tenant, (cost, input, output)) in &by_tenant {
        let label = format!("tenant=\"{tenant}\"");
        let got_cost = metrics.sum("tailgate_policy_llm_cost_usd_total", &[&label]);
        assert!(
            (got_cost - cost).abs() <= 1e-9 * cost.max(1.0),
            "{tenant}: cost {got_cost} on /metrics, {cost} sent"
        );
        assert_eq!(
            metrics.sum("tailgate_policy_llm_input_tokens_total", &[&label]),
            *input,
            "{tenant} input tokens"
        );
        assert_eq!(
            metrics.sum("tailgate_policy_llm_output_tokens_total", &[&label]),
            *output,
            "{tenant} output tokens"
        );
    }
    // The user label is capped: at most max_label_values distinct users plus the overflow.
    let cap = table["plugins"]["max_label_values"]
        .as_integer()
        .expect("plugins.max_label_values in agent.toml") as usize;
    let users: HashSet<&str> = metrics
        .0
        .keys()
        .filter(|k| k.starts_with("tailgate_policy_llm_cost_usd_total{"))
        .filter_map(|k| {
            let at = k.find("user=\"")? + 6;
            Some(&k[at..at + k[at..].find('"')?])
        })
        .collect();
    assert!(users.len() <= cap + 1, "{} user values", users.len());
    assert!(users.contains("__overflow__"), "overflow series present");

    // 4. Enrichment on kept traces: root totals, gen_ai names, truncated query.
    let query_max = policy_config(&table, "attribute-hygiene")["rules"][0]["max_length"]
        .as_integer()
        .unwrap() as usize;
    for (id, spans) in &out {
        let sent = &traffic.sent[id];
        let root = spans.iter().find(|s| s.name == "agent.run").unwrap();
        let total = root
            .attributes
            .iter()
            .find(|kv| kv.key == "llm.cost_usd.total")
            .and_then(|kv| kv.value.as_ref()?.value.clone());
        match total {
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::DoubleValue(v)) => {
                assert!(
                    (v - sent.cost).abs() < 1e-9,
                    "root total {v}, sent {}",
                    sent.cost
                )
            }
            other => panic!("root of {} has llm.cost_usd.total {other:?}", hex(id)),
        }
        assert_eq!(
            attr_str(root, "agent.query").map(|q| q.chars().count()),
            Some(query_max),
            "agent.query truncated"
        );
        for llm in spans.iter().filter(|s| s.name == "llm.call") {
            assert!(
                attr_str(llm, "gen_ai.request.model").is_some(),
                "gen_ai.* filled in"
            );
        }
    }
    traffic.provider.shutdown().ok();
}

#[test]
fn a_retrieval_regression_in_one_feature_is_kept_whole_and_the_rest_still_sampled() {
    let (config, table) = agent_config();
    let tg = Tailgate::start(&config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut traffic = Traffic::new(&tg, Pricing::from(&table), 11);
    let warm = traffic.warm_up(&tg);

    // The index behind "billing" goes stale: its retrieval scores fall from 0.78-0.88 to
    // 0.42-0.55. Everything else is unchanged.
    for i in 0..1_600 {
        if i % 4 == 0 {
            traffic.send(Class::Normal, Some("billing"), Some((0.42, 0.55)));
        } else {
            traffic.send(Class::Normal, Some(FEATURES[[0, 2, 3][i % 3]]), None);
        }
    }
    traffic.flush();
    settle(&tg, traffic.spans);
    let out = exported(&tg);
    let measured: HashSet<[u8; 16]> = traffic
        .sent
        .keys()
        .filter(|id| !warm.contains(*id))
        .copied()
        .collect();

    let mut affected = 0;
    for id in &measured {
        let sent = &traffic.sent[id];
        if sent.feature != "billing" {
            continue;
        }
        affected += 1;
        let spans = out
            .get(id)
            .unwrap_or_else(|| panic!("affected trace {} dropped", hex(id)));
        let got: HashSet<[u8; 8]> = spans
            .iter()
            .map(|s| s.span_id.clone().try_into().unwrap())
            .collect();
        assert_eq!(
            got,
            sent.kept_spans,
            "affected trace {} incomplete",
            hex(id)
        );
        let root = spans.iter().find(|s| s.name == "agent.run").unwrap();
        assert_eq!(attr_str(root, "sampling.policy"), Some("retrieval"));
        let reason = attr_str(root, "sampling.reason").unwrap_or_default();
        assert!(reason.contains("retrieval"), "reason {reason:?}");
    }
    assert_eq!(affected, 400);

    let rate = sample_rate(&table);
    let unaffected: HashSet<[u8; 16]> = measured
        .iter()
        .filter(|id| traffic.sent[*id].feature != "billing")
        .copied()
        .collect();
    let ordinary = ordinary_normals(&traffic, &unaffected, &out);
    assert!(ordinary.len() > 500, "{} ordinary traces", ordinary.len());
    assert_sampled_alone(
        &traffic,
        &ordinary,
        &out,
        rate,
        "unaffected ordinary traces",
    );
    traffic.provider.shutdown().ok();
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
