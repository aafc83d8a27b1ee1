//! Export: kept traces regrouped under one `ResourceSpans` per resource and one `ScopeSpans`
//! per scope, each span's decision stamp appended, encoded as one `ExportTraceServiceRequest`
//! (`encode_batch`, what the exporter sends); and the same plus gzip at level 1 (the
//! exporter's, `GZIP_LEVEL`) and at zlib's default level 6 for comparison.
//!
//! Batches of 10 and 100 loadgen agent traces (300 and 3,000 spans; the exporter's default
//! `batch_max_spans` is 8,192) that arrived in separate requests, so regrouping has real work.
//! Throughput is spans: ns/span is the median divided by the batch's spans.
//! Run: `cargo bench -p tailgate --bench export`.

mod common;

use std::io::Write;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flate2::Compression;
use flate2::write::GzEncoder;
use tailgate::bench::Trigger;
use tailgate::bench::{Decision, stamp};
use tailgate::bench::{KeptTrace, encode_batch};

fn kept(traces: usize) -> Vec<KeptTrace> {
    let decision = Decision {
        keep: true,
        policy: Arc::from("sample"),
        reason: "sampled at 0.15".into(),
        probability: Some(0.15),
        edits: Vec::new(),
    };
    let stamp = Arc::new(stamp(&decision, Trigger::RootGrace));
    common::buffered(&common::generated(traces))
        .into_iter()
        .map(|(_, spans)| KeptTrace::new(spans, stamp.clone()))
        .collect()
}

fn gzip(body: &[u8], level: u32) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::new(level));
    gz.write_all(body).expect("in memory");
    gz.finish().expect("in memory")
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("export");
    for traces in [10, 100] {
        let batch = kept(traces);
        let spans: usize = batch.iter().map(|t| t.spans.len()).sum();
        group.throughput(Throughput::Elements(spans as u64));
        group.bench_function(format!("encode_batch/{spans}_spans"), |b| {
            b.iter(|| encode_batch(&batch).len())
        });
        let body = encode_batch(&batch);
        for (name, level) in [("gzip1", 1), ("gzip6", 6)] {
            println!(
                "export/{spans}_spans: {} bytes encoded, {} with {name}",
                body.len(),
                gzip(&body, level).len()
            );
            group.bench_function(format!("encode_batch_{name}/{spans}_spans"), |b| {
                b.iter(|| gzip(&encode_batch(&batch), level).len())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
