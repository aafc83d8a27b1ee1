//! The cost of a decision: the bundled `keep-errors` + `latency` + `probabilistic` chain in
//! WebAssembly, one policy alone (the fixed cost of a call plus the summary), the empty chain
//! (the host's own per-trace work), and the same three rules compiled natively, all on the
//! same 30-span traces in one run so their ratio is meaningful on a noisy machine.
//!
//! Run: `cargo bench -p tailgate --bench decision`.

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use prost::Message;
use tailgate::buffer::{BufferedSpan, ResourceHeader, ScopeHeader, Trigger};
use tailgate::config::Config;
use tailgate::decide::{Decider, DeciderFactory, TraceView};
use tailgate::plugin::PolicyRuntime;
use tailgate::plugin::chain::WasmChainFactory;
use tailgate::telemetry::Metrics;

const SPANS: usize = 30;

/// An agent-shaped trace: a root, a retrieval, LLM calls with token counts, tools.
fn trace(seed: u8) -> Vec<BufferedSpan> {
    let header = Arc::new(ScopeHeader {
        resource: Arc::new(ResourceHeader {
            fields: Box::new([]),
            resource: Box::new([]),
            service: Arc::from("agent"),
        }),
        fields: Box::new([]),
    });
    (0..SPANS)
        .map(|i| {
            let id = [seed, i as u8 + 1, 0, 0, 0, 0, 0, 1];
            let parent = if i == 0 {
                vec![]
            } else {
                vec![seed, 1, 0, 0, 0, 0, 0, 1]
            };
            let kv = |k: &str, v: any_value::Value| KeyValue {
                key: k.into(),
                value: Some(AnyValue { value: Some(v) }),
                key_strindex: 0,
            };
            let span = Span {
                trace_id: vec![seed; 16],
                span_id: id.to_vec(),
                parent_span_id: parent.clone(),
                name: if i == 0 {
                    "agent.run".into()
                } else {
                    format!("llm.call.{i}")
                },
                kind: 1,
                start_time_unix_nano: 1_700_000_000_000_000_000 + i as u64 * 1_000_000,
                end_time_unix_nano: 1_700_000_000_000_000_000 + i as u64 * 1_000_000 + 800_000,
                attributes: vec![
                    kv(
                        "gen_ai.request.model",
                        any_value::Value::StringValue("gpt-4o".into()),
                    ),
                    kv(
                        "gen_ai.usage.input_tokens",
                        any_value::Value::IntValue(1200),
                    ),
                    kv("tenant.id", any_value::Value::StringValue("t1".into())),
                ],
                status: Some(Status::default()),
                ..Default::default()
            };
            BufferedSpan {
                bytes: span.encode_to_vec().into_boxed_slice(),
                scope: header.clone(),
                span_id: id,
                parent_span_id: parent.try_into().unwrap_or([0; 8]),
                start_unix_nano: span.start_time_unix_nano,
                end_unix_nano: span.end_time_unix_nano,
                status_code: 0,
                kind: 1,
            }
        })
        .collect()
}

fn chain(policies: &str) -> Box<dyn Decider> {
    let config = Config::parse(
        &format!("[plugins]\ncache_dir = \"\"\n{policies}"),
        "bench.toml",
    )
    .expect("bench config");
    let runtime = PolicyRuntime::start(&config, Path::new(".")).expect("policies load");
    WasmChainFactory {
        runtime,
        metrics: Metrics::new(),
    }
    .build()
}

const THREE: &str = r#"
[[policies]]
name = "errors"
plugin = "keep-errors"
[[policies]]
name = "slow"
plugin = "latency"
[policies.config]
threshold_ms = 500
[[policies]]
name = "sample"
plugin = "probabilistic"
[policies.config]
rate = 0.1
"#;

/// The same three rules in native Rust, on the same spans.
fn native_chain(trace_id: &[u8; 16], spans: &[BufferedSpan]) -> bool {
    if spans.iter().any(|s| s.status_code == 2) {
        return true;
    }
    let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(0);
    if end.saturating_sub(start) >= 500_000_000 {
        return true;
    }
    let r = u64::from_be_bytes(trace_id[8..].try_into().unwrap_or([0; 8])) & ((1 << 56) - 1);
    r >= ((1.0 - 0.1) * (1u64 << 56) as f64).round() as u64
}

fn bench(c: &mut Criterion) {
    let traces: Vec<([u8; 16], Vec<BufferedSpan>)> =
        (1..=16u8).map(|s| ([s; 16], trace(s))).collect();
    let mut group = c.benchmark_group("decision_30_spans");
    let cases = [
        ("host_only_empty_chain", ""),
        (
            "wasm_keep_errors_alone",
            "[[policies]]\nname = \"errors\"\nplugin = \"keep-errors\"\n",
        ),
        ("wasm_errors_latency_probabilistic", THREE),
    ];
    for (name, policies) in cases {
        let mut decider = chain(policies);
        let mut traces = traces.clone();
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let (id, spans) = &mut traces[i % 16];
                i += 1;
                decider
                    .decide(&mut TraceView {
                        trace_id: id,
                        spans,
                        trigger: Trigger::RootGrace,
                    })
                    .keep
            })
        });
    }
    let mut i = 0;
    group.bench_function("native_errors_latency_probabilistic", |b| {
        b.iter(|| {
            let (id, spans) = &traces[i % 16];
            i += 1;
            native_chain(std::hint::black_box(id), std::hint::black_box(spans))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
