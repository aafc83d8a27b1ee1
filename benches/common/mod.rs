//! What the benches share: agent traces from the loadgen's generator, taken through the real
//! ingest path into the host's buffered form, and the same traces for the SDK's native backend.

#![allow(dead_code)] // each bench uses its own part

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use prost::Message;
use tailgate::bench::Ingest;
use tailgate::bench::SERVICES;
use tailgate::bench::{BufferedSpan, MemoryBudget};
use tailgate::bench::{GeneratedTrace, Generator, Shape, request_of};
use tailgate::bench::{ReceiverMetrics, Registry};
use tailgate::bench::{ShardMsg, ShardSpan};
use tailgate_plugin_sdk::testing::TraceBuilder;
use tailgate_plugin_sdk::{AttrValue, SpanKind, StatusCode};

/// Traces per request, as an SDK batch exporter of an agent service sends them.
pub const TRACES_PER_REQUEST: usize = 10;
pub const SEED: u64 = 42;
/// The root of the last trace ends here (any fixed time; the benches never read the clock).
pub const END_NS: u64 = 1_760_000_000_000_000_000;

pub fn generated(n: usize) -> Vec<GeneratedTrace> {
    let mut g = Generator::new(SEED, Shape::default());
    (0..n).map(|i| g.trace(END_NS + i as u64 * 1_000)).collect()
}

/// Encoded export requests of [`TRACES_PER_REQUEST`] traces each.
pub fn requests(n: usize) -> Vec<Vec<u8>> {
    generated(n * TRACES_PER_REQUEST)
        .chunks(TRACES_PER_REQUEST)
        .map(|c| request_of(c.to_vec()).encode_to_vec())
        .collect()
}

/// An ingest with `shards` workers' channels and a budget nothing in a bench exhausts.
pub fn ingest(shards: usize) -> (Ingest, Vec<crossbeam_channel::Receiver<ShardMsg>>) {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..shards).map(|_| crossbeam_channel::unbounded()).unzip();
    let ingest = Ingest::new(
        txs,
        Arc::new(MemoryBudget::new(usize::MAX / 2)),
        ReceiverMetrics::new(&Registry::new()),
    );
    (ingest, rxs)
}

/// Traces in the host's buffered form, taken through the real protobuf ingest path.
pub fn buffered(traces: &[GeneratedTrace]) -> Vec<([u8; 16], Vec<BufferedSpan>)> {
    let (ingest, rxs) = ingest(1);
    let mut out: Vec<([u8; 16], Vec<BufferedSpan>)> = Vec::new();
    for t in traces {
        let body = request_of([t.clone()]).encode_to_vec();
        ingest
            .accept_unlogged(&body, "bench")
            .expect("ingest takes it");
        let mut spans = Vec::new();
        while let Ok(ShardMsg::Spans { spans: batch, .. }) = rxs[0].try_recv() {
            spans.extend(batch.into_iter().map(|s: ShardSpan| s.span));
        }
        out.push((t.trace_id, spans));
    }
    out
}

/// The same trace for the SDK's in-memory backend, span for span and in the order the host
/// holds them (by service, as the request grouped them).
pub fn sdk_trace(t: &GeneratedTrace) -> tailgate_plugin_sdk::Trace {
    let mut order: Vec<usize> = (0..t.spans.len()).collect();
    order.sort_by_key(|&i| t.spans[i].0);
    let index_of = |id: &[u8]| {
        order
            .iter()
            .position(|&i| t.spans[i].1.span_id == id)
            .map(|p| p as u32)
    };
    let mut b = TraceBuilder::new().trace_id(t.trace_id);
    for &i in &order {
        let (service, span) = &t.spans[i];
        b = b
            .span(span.name.clone())
            .service(SERVICES[*service])
            .span_id(span.span_id.clone().try_into().expect("8-byte id"))
            .kind(match span.kind {
                2 => SpanKind::Server,
                3 => SpanKind::Client,
                _ => SpanKind::Internal,
            })
            .start_ns(span.start_time_unix_nano)
            .duration_ns(span.end_time_unix_nano - span.start_time_unix_nano);
        if span.status.as_ref().is_some_and(|s| s.code == 2) {
            b = b.status(StatusCode::Error);
        }
        if let Some(p) = index_of(&span.parent_span_id) {
            b = b.child_of(p);
        }
        for kv in &span.attributes {
            let value = match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => AttrValue::from(s.as_str()),
                Some(any_value::Value::IntValue(v)) => AttrValue::from(*v),
                Some(any_value::Value::DoubleValue(v)) => AttrValue::from(*v),
                Some(any_value::Value::BoolValue(v)) => AttrValue::from(*v),
                _ => continue,
            };
            b = b.attr(kv.key.clone(), value);
        }
    }
    b.build()
}

/// The policies of `config/agent.toml`, in order, with their modes and configs as JSON.
pub fn agent_policies() -> Vec<(String, String, bool, String)> {
    let config = agent_config();
    config
        .policies
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.plugin.clone().unwrap_or_default(),
                matches!(p.mode, tailgate::bench::PolicyMode::Enrich),
                serde_json::to_string(&p.config).expect("config as JSON"),
            )
        })
        .collect()
}

pub fn agent_config() -> tailgate::bench::Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/agent.toml");
    let mut config = tailgate::bench::Config::load(&path).expect("config/agent.toml loads");
    config.plugins.cache_dir = Default::default(); // a bench writes no cache
    config
}
