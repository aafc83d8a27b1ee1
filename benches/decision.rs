//! The cost of a decision, all on the same 30-span agent traces in one run, so the ratios
//! are meaningful on a noisy machine:
//! - `host_only_empty_chain`: the host's own per-trace work with no policy;
//! - `fixed_export_call`: one policy whose `decide` does nothing (the accessor probe with
//!   `calls = 0`): the fixed cost of a Wasm decision, index and metrics included;
//! - `fixed_export_call_1_span`: the same on one-span traces, which leaves out nearly all of
//!   the host's per-span index work (a few ns a span, see `host_index_rebuild`);
//! - `fixed_summary_only/1` and `/256`: `keep-errors` alone (a summary-only policy that reads
//!   the error count and abstains) on a trace decided alone, and per trace in a batch of 256;
//! - `fixed_plus_summary`: the same reading the summary, which nearly every policy does. Since
//!   contract 0.2.0 the summary and trace id come with the `decide` call, so this should equal
//!   `fixed_export_call` (it was a host call of its own, about 0.3 µs, before);
//! - `accessor/<name>`: the probe calling one accessor 1 and 65 times; one call costs
//!   (t65 - t1) / 64;
//! - the bundled `keep-errors` + `latency` + `probabilistic` chain in Wasm, the same three
//!   crates run natively through the SDK's in-memory backend, and the same rules handwritten
//!   over the buffered spans. The three are summary-only, so the host enters each once per
//!   batch of traces that come due together: `wasm_errors_latency_probabilistic` is a batch
//!   of one (a trace decided alone), `..._batch/N` a batch of N (criterion's throughput is
//!   per trace). `native_chain_errors_latency_probabilistic/256` is the ratio's baseline: the
//!   same three crates compiled into the host as a chain ([`NativeChain`]), through the same
//!   batch interface, from the host's index and facts of each trace, their verdicts combined
//!   as the Wasm chain combines them, one `Decision` out per trace; it is checked to decide
//!   exactly as the Wasm chain. `native_host_errors_latency_probabilistic/256` is the same
//!   minus the combination and the `Decision`s (index, facts and the three `decide`s only);
//! - `host_index_rebuild`: the host's per-trace index (parents, leaves, summary) alone, which
//!   every Wasm case includes;
//! - `floor_*`: the least any sandboxed per-trace call can cost here (see [`floor`]).
//!
//! - `agent_chain/*`: the whole `config/agent.toml` chain (six deciding policies, two
//!   enrichments on kept traces) in Wasm on 30-span loadgen agent traces taken through the real
//!   ingest path, beside the same eight crates compiled natively and driven through the SDK's
//!   in-memory backend; then each policy alone (`only_<name>`), to show where the chain's time
//!   goes.
//!
//! Run: `cargo bench -p tailgate --bench decision`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use prost::Message;
use tailgate::bench::Config;
use tailgate::bench::PolicyRuntime;
use tailgate::bench::WasmChainFactory;
use tailgate::bench::{BufferedSpan, ResourceHeader, ScopeHeader};
use tailgate::bench::{Decider, DeciderFactory, DefaultDecision, Role, Tally, TraceView, Verdict};
use tailgate::bench::{PluginMetrics, Registry};
use tailgate_plugin_sdk::Policy;
use tailgate_plugin_sdk::testing::{self, TraceBuilder};

const SPANS: usize = 30;

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        key_strindex: 0,
    }
}

/// An agent-shaped trace: a root, then LLM calls with a model, token counts and a tenant.
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
                start_time_unix_nano: start(i),
                end_time_unix_nano: start(i) + 800_000,
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
                has_trace_state: false,
            }
        })
        .collect()
}

fn start(i: usize) -> u64 {
    1_700_000_000_000_000_000 + i as u64 * 1_000_000
}

/// The same trace for the SDK's native backend.
fn sdk_trace(seed: u8) -> tailgate_plugin_sdk::Trace {
    let mut b = TraceBuilder::new().trace_id([seed; 16]).base_ns(start(0));
    for i in 0..SPANS {
        b = b
            .span(if i == 0 {
                "agent.run".to_owned()
            } else {
                format!("llm.call.{i}")
            })
            .start_ns(start(i))
            .duration_ns(800_000)
            .attr("gen_ai.request.model", "gpt-4o")
            .attr("gen_ai.usage.input_tokens", 1200i64)
            .attr("tenant.id", "t1");
        if i > 0 {
            b = b.child_of(0);
        }
    }
    b.build()
}

/// Builds the accessor probe from `tests/plugins/` once.
fn probe_path() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-plugins");
    let built = tailgate_plugin_build::Builder::new(repo.join("tests/plugins"), &out)
        .only(vec!["accessor-probe".to_owned()])
        .build()
        .expect("build the accessor probe");
    built
        .into_iter()
        .find(|p| p.name == "accessor-probe")
        .expect("accessor-probe built")
        .component
}

fn probe(path: &Path, accessor: &str, calls: u32) -> String {
    format!(
        "[[policies]]\nname = \"probe\"\npath = {:?}\n[policies.config]\naccessor = \"{accessor}\"\ncalls = {calls}\n",
        path.display().to_string()
    )
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
        metrics: PluginMetrics::new(&Registry::new()),
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

/// `THREE`'s policies compiled natively, configured as in `THREE`.
fn native_three() -> (
    keep_errors::KeepErrors,
    latency::Latency,
    probabilistic::Probabilistic,
) {
    (
        testing::init("{}").unwrap(),
        testing::init(r#"{"threshold_ms": 500}"#).unwrap(),
        testing::init(r#"{"rate": 0.1}"#).unwrap(),
    )
}

/// `THREE` as a native chain: the same three crates compiled into the host, given what the
/// host gives the Wasm ones (its index and each trace's facts), their verdicts combined as
/// the Wasm chain combines them (the host's own [`Tally`], the one copy of the combination),
/// and one
/// [`tailgate::bench::Decision`] out per trace. Everything the Wasm chain does but the
/// sandbox.
struct NativeChain {
    index: tailgate::bench::TraceIndex,
    facts: Vec<u64>,
    /// One facts trace for every decision, as the SDK reuses one for a Wasm batch.
    trace: tailgate_plugin_sdk::Trace,
    policies: (
        keep_errors::KeepErrors,
        latency::Latency,
        probabilistic::Probabilistic,
    ),
    /// Policy names, and each policy's last reason (shared while it repeats, as in the chain).
    names: [Arc<str>; 3],
    reasons: [Option<Arc<str>>; 3],
    /// The host's combination of verdicts, the one the Wasm chain uses.
    tally: Tally,
    default: DefaultDecision,
}

impl NativeChain {
    fn new() -> Self {
        let config = Config::parse(THREE, "bench.toml").expect("bench config");
        let default = config.decide.default;
        NativeChain {
            index: Default::default(),
            facts: Vec::with_capacity(tailgate_plugin_sdk::FACT_WORDS),
            trace: testing::facts_trace(Default::default(), [0; 16], 0),
            policies: native_three(),
            names: ["errors", "slow", "sample"].map(Arc::from),
            reasons: Default::default(),
            tally: Tally::default(),
            default: DefaultDecision::new(default),
        }
    }
}

impl Decider for NativeChain {
    fn decide(&mut self, trace: &mut TraceView<'_>) -> tailgate::bench::Decision {
        self.index.rebuild(trace.spans);
        self.facts.clear();
        (self.index).push_facts(trace.trace_id, trace.spans, &mut self.facts);
        let (summary, id, r) = tailgate_plugin_sdk::facts_from_words(&self.facts);
        testing::set_facts(&mut self.trace, summary, id, r);
        let t = &self.trace;
        let (errors, slow, sample) = &mut self.policies;
        let verdicts = [errors.decide(t), slow.decide(t), sample.decide(t)];
        for (i, v) in verdicts.iter().enumerate() {
            let verdict = match v.decision {
                tailgate_plugin_sdk::Decision::Keep => Verdict::Keep,
                tailgate_plugin_sdk::Decision::Drop => Verdict::Drop,
                tailgate_plugin_sdk::Decision::Abstain => Verdict::Abstain,
            };
            let probability = v.probability.filter(|p| *p > 0.0 && *p < 1.0);
            (self.tally).add(
                Role::Enforce,
                i as u32,
                i as u32,
                verdict,
                probability,
                &mut Vec::new(),
            );
        }
        // The chain's own combination; reasons shared while they repeat, as in the chain.
        let (names, reasons) = (&self.names, &mut self.reasons);
        self.tally.decision(
            |i| {
                let i = i as usize;
                let reason = match &reasons[i] {
                    Some(last) if **last == *verdicts[i].reason => last.clone(),
                    _ => (reasons[i].insert(Arc::from(verdicts[i].reason.as_str()))).clone(),
                };
                (names[i].clone(), reason)
            },
            &self.default,
        )
    }
}

/// The summary-only policy that does least: read the summary's error count, abstain.
const KEEP_ERRORS: &str = r#"
[[policies]]
name = "errors"
plugin = "keep-errors"
"#;

/// Checks that the Wasm chain and [`NativeChain`] decide a batch of 256 alike (keep, policy,
/// reason, probability), so the ratio compares the same work.
fn same_decisions(
    wasm: &mut dyn Decider,
    native: &mut NativeChain,
    traces: &[([u8; 16], Vec<BufferedSpan>)],
) {
    let mut outs = [Vec::new(), Vec::new()];
    for (decider, out) in [wasm, native as &mut dyn Decider]
        .into_iter()
        .zip(&mut outs)
    {
        let mut batch = batch_of(256, traces);
        decider.decide_batch(&mut views(&mut batch), out);
    }
    let key = |d: &tailgate::bench::Decision| {
        (
            d.keep,
            d.policy.to_string(),
            d.reason.to_string(),
            d.probability,
        )
    };
    let [wasm, native] = outs;
    assert_eq!(wasm.len(), 256);
    // Both ways of deciding occur: a policy's keep and the default.
    let by = |name: &str| wasm.iter().any(|d| &*d.policy == name);
    assert!(by("sample") && by("default"));
    assert_eq!(
        wasm.iter().map(key).collect::<Vec<_>>(),
        native.iter().map(key).collect::<Vec<_>>(),
        "the native chain must decide as the Wasm chain"
    );
}

/// A worker's views of `batch`, as it hands them to a decider.
fn views(batch: &mut [([u8; 16], Vec<BufferedSpan>)]) -> Vec<TraceView<'_>> {
    (batch.iter_mut())
        .map(|(id, spans)| TraceView {
            trace_id: id,
            spans,
        })
        .collect()
}

/// `n` traces with distinct ids, cycling through `traces`' spans (each trace its own copy,
/// as in a worker's batch).
fn batch_of(
    n: usize,
    traces: &[([u8; 16], Vec<BufferedSpan>)],
) -> Vec<([u8; 16], Vec<BufferedSpan>)> {
    (0..n)
        .map(|k| {
            let mut id = [0x5a; 16];
            id[8..].copy_from_slice(&(k as u64 * 0x9E37_79B9_7F4A_7C15).to_be_bytes());
            (id, traces[k % traces.len()].1.clone())
        })
        .collect()
}

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

fn run(
    decider: &mut dyn Decider,
    traces: &mut [([u8; 16], Vec<BufferedSpan>)],
    i: &mut usize,
) -> bool {
    let (id, spans) = &mut traces[*i % traces.len()];
    *i += 1;
    decider
        .decide(&mut TraceView {
            trace_id: id,
            spans,
        })
        .keep
}

fn bench(c: &mut Criterion) {
    let traces: Vec<([u8; 16], Vec<BufferedSpan>)> =
        (1..=16u8).map(|s| ([s; 16], trace(s))).collect();
    let probe_wasm = probe_path();

    let mut group = c.benchmark_group("decision_30_spans");
    let mut cases: Vec<(String, String)> = vec![
        ("host_only_empty_chain".into(), String::new()),
        ("fixed_export_call".into(), probe(&probe_wasm, "summary", 0)),
        (
            "fixed_plus_summary".into(),
            probe(&probe_wasm, "summary", 1),
        ),
    ];
    let accessors = [
        "name",
        "duration",
        "attr",
        "attr_column",
        "attr_column_str",
        "attr_column_dict_str",
        "sum",
    ];
    for accessor in accessors {
        for calls in [1, 65] {
            cases.push((
                format!("accessor/{accessor}/x{calls}"),
                probe(&probe_wasm, accessor, calls),
            ));
        }
    }
    cases.push(("wasm_errors_latency_probabilistic".into(), THREE.into()));
    cases.push(("fixed_summary_only/1".into(), KEEP_ERRORS.into()));
    for (name, policies) in &cases {
        let mut decider = chain(policies);
        let mut traces = traces.clone();
        let mut i = 0;
        group.bench_function(name.as_str(), |b| {
            b.iter(|| run(decider.as_mut(), &mut traces, &mut i))
        });
    }

    // The fixed cost apart from the trace's size: the same do-nothing call on one-span traces
    // (the host's index costs a few ns a span on top; compare `host_index_rebuild`).
    let mut one_span: Vec<([u8; 16], Vec<BufferedSpan>)> = (traces.iter())
        .map(|(id, spans)| (*id, spans[..1].to_vec()))
        .collect();
    let mut decider = chain(&probe(&probe_wasm, "summary", 0));
    let mut i = 0;
    group.bench_function("fixed_export_call_1_span", |b| {
        b.iter(|| run(decider.as_mut(), &mut one_span, &mut i))
    });

    // The three summary-only policies deciding batches of traces that came due together,
    // and keep-errors alone (the fixed cost of a summary-only decision in a batch).
    // Last, the same three natively as a chain (`NativeChain`), through the same batch
    // interface: the ratio's baseline.
    // (Each decider is built just before its case and dropped after it, so only one engine
    // and its epoch thread are alive at a time, as in the host.)
    type Build = fn() -> Box<dyn Decider>;
    let batches: [(&str, Build, usize); 5] = [
        (
            "wasm_errors_latency_probabilistic_batch",
            || chain(THREE),
            16,
        ),
        (
            "wasm_errors_latency_probabilistic_batch",
            || chain(THREE),
            64,
        ),
        (
            "wasm_errors_latency_probabilistic_batch",
            || chain(THREE),
            256,
        ),
        ("fixed_summary_only", || chain(KEEP_ERRORS), 256),
        (
            "native_chain_errors_latency_probabilistic",
            || Box::new(NativeChain::new()),
            256,
        ),
    ];
    same_decisions(chain(THREE).as_mut(), &mut NativeChain::new(), &traces);
    for (name, decider, n) in batches {
        let mut decider = decider();
        let mut batch = batch_of(n, &traces);
        let mut out = Vec::with_capacity(n);
        group.throughput(criterion::Throughput::Elements(n as u64));
        group.bench_function(format!("{name}/{n}"), |b| {
            b.iter(|| {
                out.clear();
                decider.decide_batch(&mut views(&mut batch), &mut out);
                out.iter().filter(|d| d.keep).count()
            })
        });
    }

    // The same three crates natively, from what the host computes for the Wasm ones, on the
    // same 256 traces as the largest batch (so both read the same spans from memory).
    let (mut errors, mut slow, mut sample) = native_three();
    let mut idx = tailgate::bench::TraceIndex::default();
    let mut facts = Vec::with_capacity(tailgate_plugin_sdk::FACT_WORDS);
    let mut t = testing::facts_trace(Default::default(), [0; 16], 0);
    let batch = batch_of(256, &traces);
    group.throughput(criterion::Throughput::Elements(batch.len() as u64));
    group.bench_function("native_host_errors_latency_probabilistic/256", |b| {
        b.iter(|| {
            let mut kept = 0;
            for (id, spans) in &batch {
                idx.rebuild(spans);
                facts.clear();
                idx.push_facts(id, spans, &mut facts);
                let (summary, id, r) = tailgate_plugin_sdk::facts_from_words(&facts);
                testing::set_facts(&mut t, summary, id, r);
                let verdicts = [errors.decide(&t), slow.decide(&t), sample.decide(&t)];
                kept += usize::from(verdicts.iter().any(|v| v.is_keep()));
            }
            kept
        })
    });
    group.throughput(criterion::Throughput::Elements(1));

    // The same three crates, compiled natively, through the SDK's in-memory trace: the
    // policies' own `decide`, called directly.
    let sdk_traces: Vec<_> = (1..=16u8).map(sdk_trace).collect();
    let (mut errors, mut slow, mut sample) = native_three();
    let mut i = 0;
    group.bench_function("native_sdk_errors_latency_probabilistic", |b| {
        b.iter(|| {
            let t = &sdk_traces[i % 16];
            i += 1;
            let verdicts = [errors.decide(t), slow.decide(t), sample.decide(t)];
            verdicts.iter().any(|v| v.is_keep())
        })
    });
    // The host's per-trace index alone (inside every Wasm case above; the native SDK
    // traces have their summary computed when built, outside the timing).
    let mut idx = tailgate::bench::TraceIndex::default();
    let mut i = 0;
    group.bench_function("host_index_rebuild", |b| {
        b.iter(|| {
            let (_, spans) = &traces[i % 16];
            i += 1;
            idx.rebuild(spans);
            idx.span_count
        })
    });
    let mut i = 0;
    group.bench_function("native_handwritten_errors_latency_probabilistic", |b| {
        b.iter(|| {
            let (id, spans) = &traces[i % 16];
            i += 1;
            native_chain(std::hint::black_box(id), std::hint::black_box(spans))
        })
    });
    floor(&mut group, &traces);
    group.finish();
}

/// The floor of any sandboxed per-trace call on this engine (fuel and epochs on, as for the
/// policies): bare core-Wasm functions, no component model, no host calls, no verdict
/// record, inputs as arguments and the answer as one integer.
/// - `floor_empty_core_call`: one call of `() -> ()`;
/// - `floor_three_rules_core_calls`: keep-errors, latency and probabilistic as three
///   instances (one per policy, as the host runs them), each called once per trace with the
///   summary values it needs, which are computed natively from the spans first (as the
///   handwritten native chain does).
fn floor(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    traces: &[([u8; 16], Vec<BufferedSpan>)],
) {
    use wasmtime::{Instance, Module, Store, TypedFunc};
    let plugins = tailgate::bench::PluginEngine::new(None, 1000).expect("engine");
    let engine = plugins.engine();
    let instance = |wasm: Vec<u8>| {
        let module = Module::new(engine, wasm).expect("core module");
        let mut store = Store::new(engine, ());
        store.set_fuel(u64::MAX).expect("fuel");
        store.set_epoch_deadline(1 << 40);
        let instance = Instance::new(&mut store, &module, &[]).expect("instantiate");
        (store, instance)
    };

    let (mut store, inst) = instance(core_module(&[], &[], |_| {}));
    let empty: TypedFunc<(), ()> = inst.get_typed_func(&mut store, "f").expect("f");
    group.bench_function("floor_empty_core_call", |b| {
        b.iter(|| empty.call(&mut store, ()).expect("call"))
    });

    use wasm_encoder::ValType::{I32, I64};
    let threshold = ((1.0 - 0.1) * (1u64 << 56) as f64).round() as i64;
    let mut errors = instance(core_module(&[I32], &[I32], |f| {
        f.local_get(0).i32_const(0).i32_gt_u();
    }));
    let mut slow = instance(core_module(&[I64], &[I32], |f| {
        f.local_get(0).i64_const(500_000_000).i64_ge_u();
    }));
    let mut sample = instance(core_module(&[I64], &[I32], |f| {
        f.local_get(0)
            .i64_const((1 << 56) - 1)
            .i64_and()
            .i64_const(threshold)
            .i64_ge_u();
    }));
    let errors_f: TypedFunc<u32, u32> = errors.1.get_typed_func(&mut errors.0, "f").unwrap();
    let slow_f: TypedFunc<u64, u32> = slow.1.get_typed_func(&mut slow.0, "f").unwrap();
    let sample_f: TypedFunc<u64, u32> = sample.1.get_typed_func(&mut sample.0, "f").unwrap();
    let mut i = 0;
    group.bench_function("floor_three_rules_core_calls", |b| {
        b.iter(|| {
            let (id, spans) = &traces[i % traces.len()];
            i += 1;
            let errs = spans.iter().filter(|s| s.status_code == 2).count() as u32;
            let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
            let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(0);
            let r = u64::from_be_bytes(id[8..].try_into().unwrap_or([0; 8]));
            let keep = errors_f.call(&mut errors.0, errs).expect("call") != 0
                || slow_f
                    .call(&mut slow.0, end.saturating_sub(start))
                    .expect("call")
                    != 0
                || sample_f.call(&mut sample.0, r).expect("call") != 0;
            std::hint::black_box(keep)
        })
    });
}

/// A core module exporting one function `f(params) -> results` with the body `body` writes.
fn core_module(
    params: &[wasm_encoder::ValType],
    results: &[wasm_encoder::ValType],
    body: impl FnOnce(&mut wasm_encoder::InstructionSink<'_>),
) -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, ExportKind, ExportSection, Function, FunctionSection, Module, TypeSection,
    };
    let mut types = TypeSection::new();
    types
        .ty()
        .function(params.iter().copied(), results.iter().copied());
    let mut functions = FunctionSection::new();
    functions.function(0);
    let mut exports = ExportSection::new();
    exports.export("f", ExportKind::Func, 0);
    let mut f = Function::new([]);
    body(&mut f.instructions());
    f.instructions().end();
    let mut code = CodeSection::new();
    code.function(&f);
    let mut module = Module::new();
    module
        .section(&types)
        .section(&functions)
        .section(&exports)
        .section(&code);
    module.finish()
}

/// The eight agent crates natively, chained as the host chains them: every deciding policy
/// sees every trace (any keep keeps; agent.toml has no drop rule), enrichments see kept ones.
struct NativeAgentChain {
    decide: Vec<NativePolicy>,
    enrich: Vec<NativePolicy>,
}

type NativePolicy = Box<dyn FnMut(&tailgate_plugin_sdk::Trace) -> tailgate_plugin_sdk::Verdict>;

/// A policy's own `decide`, called directly on the in-memory trace (not through
/// `testing::decide`, which for a summary-only policy also builds the facts-only trace the
/// host would give it).
fn native<P: tailgate_plugin_sdk::Policy + 'static>(config: &str) -> NativePolicy {
    let mut p = testing::init::<P>(config).expect("native init");
    Box::new(move |t| p.decide(t))
}

impl NativeAgentChain {
    /// The chain of `config/agent.toml`, or only its policy `only`, deciding every trace.
    fn new(only: Option<&str>) -> Self {
        let mut chain = Self {
            decide: Vec::new(),
            enrich: Vec::new(),
        };
        for (name, plugin, enrich, config) in common::agent_policies() {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let enrich = enrich && only.is_none();
            let f = match plugin.as_str() {
                "keep-errors" => native::<keep_errors::KeepErrors>(&config),
                "retrieval-confidence" => {
                    native::<retrieval_confidence::RetrievalConfidence>(&config)
                }
                "context-guard" => native::<context_guard::ContextGuard>(&config),
                "adaptive-latency" => native::<adaptive_latency::AdaptiveLatency>(&config),
                "llm-cost" => native::<llm_cost::LlmCost>(&config),
                "probabilistic" => native::<probabilistic::Probabilistic>(&config),
                "attribute-hygiene" => native::<attribute_hygiene::Hygiene>(&config),
                "noise-trim" => native::<noise_trim::NoiseTrim>(&config),
                other => panic!("policy {name}: no native build of {other} in this bench"),
            };
            if enrich {
                chain.enrich.push(f);
            } else {
                chain.decide.push(f);
            }
        }
        chain
    }

    /// Keep or not, and the edits gathered (so none of the work is optimised away).
    fn run(&mut self, t: &tailgate_plugin_sdk::Trace) -> (bool, usize) {
        let mut keep = false;
        let mut edits = 0;
        for d in &mut self.decide {
            let v = d(t);
            keep |= v.is_keep();
            edits += v.patches.len();
        }
        if keep {
            for e in &mut self.enrich {
                let v = e(t);
                edits += v.patches.len() + v.remove_spans.len();
            }
        }
        (keep, edits)
    }
}

/// The `config/agent.toml` chain, Wasm against native, on the same traces in the same run.
fn agent_chain(c: &mut Criterion) {
    let generated = common::generated(256);
    let mut wasm_traces = common::buffered(&generated);
    let sdk_traces: Vec<_> = generated.iter().map(common::sdk_trace).collect();
    let spans = generated[0].spans.len() as u64;

    let mut group = c.benchmark_group("agent_chain_30_spans");
    group.throughput(criterion::Throughput::Elements(spans));
    // The whole chain, then each policy alone (enrichments made to decide, so they see
    // every trace): where the chain's time goes, in Wasm and natively.
    let names: Vec<String> = common::agent_policies().into_iter().map(|p| p.0).collect();
    let cases = std::iter::once(None).chain(names.iter().map(|n| Some(n.as_str())));
    for only in cases {
        let label = only.map_or("chain".to_owned(), |n| format!("only_{n}"));
        let mut wasm = agent_wasm(only);
        let mut i = 0;
        group.bench_function(format!("{label}/wasm"), |b| {
            b.iter(|| run(wasm.as_mut(), &mut wasm_traces, &mut i))
        });
        let mut native = NativeAgentChain::new(only);
        let mut i = 0;
        group.bench_function(format!("{label}/native_sdk"), |b| {
            b.iter(|| {
                let t = &sdk_traces[i % sdk_traces.len()];
                i += 1;
                native.run(t)
            })
        });
    }
    group.finish();
}

/// The agent chain in Wasm, or only its policy `only` (as a deciding policy).
fn agent_wasm(only: Option<&str>) -> Box<dyn Decider> {
    let mut config = common::agent_config();
    if let Some(name) = only {
        config.policies.retain(|p| p.name == name);
        for p in &mut config.policies {
            p.mode = tailgate::bench::PolicyMode::Enforce;
        }
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let runtime = PolicyRuntime::start(&config, &base).expect("agent policies load");
    WasmChainFactory {
        runtime,
        metrics: PluginMetrics::new(&Registry::new()),
    }
    .build()
}

/// Loading a policy whose compiled form is in the plugin cache (issue 3: at most 5 ms): read
/// and hash the component, map its compiled code from the cache file, check its imports,
/// link it, and instantiate it once to run `init` — all that a start or a reload does per
/// policy, bar the trial decisions of a reload. The smallest bundled policy and the largest
/// (attribute-hygiene, with the regex crate inside).
fn policy_load(c: &mut Criterion) {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-plugin-cache-{}", std::process::id()));
    let engine = tailgate::bench::PluginEngine::new(Some(cache.clone()), 1000).expect("engine");
    let config = Config::parse(
        "[[policies]]\nname = \"errors\"\nplugin = \"keep-errors\"\n\
         [[policies]]\nname = \"hygiene\"\nplugin = \"attribute-hygiene\"\n",
        "bench.toml",
    )
    .expect("bench config");
    let mut group = c.benchmark_group("policy_load");
    for spec in &config.policies {
        // The first load compiles and fills the cache; every measured one reads it.
        engine.load(spec, Path::new(".")).expect("first load");
        group.bench_function(format!("cached/{}", spec.name), |b| {
            b.iter(|| engine.load(spec, Path::new(".")).expect("cached load"))
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&cache);
}

criterion_group!(benches, bench, agent_chain, policy_load);
criterion_main!(benches);
