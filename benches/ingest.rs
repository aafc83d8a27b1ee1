//! Ingest: from an OTLP/protobuf request body to spans in the buffer, per span.
//! - `wire_parse`: the wire-level parse alone (no prost decode);
//! - `accept`: parse, index each span, charge the memory budget and split by trace to the
//!   shards' channels (`Ingest::accept_unlogged`, the path a receiver takes without the storage log);
//! - `accept_and_insert`: the same plus the worker's side, receiving from the channel and
//!   inserting every span into its trace in the buffer: the whole ingest + buffering cost.
//!
//! Requests are 10 loadgen agent traces of 30 spans (300 spans, as a batch exporter sends
//! them). Criterion's throughput is spans, so its `elem/s` is spans/s; ns/span is the median
//! time divided by 300. Run: `cargo bench -p tailgate --bench ingest`.

mod common;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tailgate::bench::BufferConfig;
use tailgate::bench::ShardMsg;
use tailgate::bench::wire;
use tailgate::bench::{Timings, TraceBuffer, Trigger};

/// Requests inserted before the (untimed) buffer drain, so the buffer holds what a busy shard
/// holds: a few thousand traces.
const REQUESTS_PER_DRAIN: usize = 200;

fn bench(c: &mut Criterion) {
    let requests = common::requests(64);
    let spans = (common::TRACES_PER_REQUEST * 30) as u64;
    let mut group = c.benchmark_group("ingest_300_spans");
    group.throughput(Throughput::Elements(spans));

    let mut i = 0;
    group.bench_function("wire_parse", |b| {
        b.iter(|| {
            let body = &requests[i % requests.len()];
            i += 1;
            wire::parse_traces(body).expect("valid").resources.len()
        })
    });

    let (ingest, rxs) = common::ingest(1);
    let mut i = 0;
    group.bench_function("accept", |b| {
        b.iter(|| {
            let body = &requests[i % requests.len()];
            i += 1;
            let accepted = ingest.accept_unlogged(body, "bench").expect("accepted");
            // Emptying the channel (dropping the spans) is measured too: small beside the
            // accept.
            while rxs[0].try_recv().is_ok() {}
            accepted.rejected_spans
        })
    });

    // Two shards, as the default worker count on this 2-core machine.
    let (ingest, rxs) = common::ingest(2);
    let timings = Timings::from_config(&BufferConfig::default());
    let mut buffers: Vec<TraceBuffer> = (0..2).map(|_| TraceBuffer::new(timings)).collect();
    let mut i = 0;
    group.bench_function("accept_and_insert", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let body = &requests[i % requests.len()];
                i += 1;
                let now = i as u64 * 1_000;
                let started = Instant::now();
                ingest.accept_unlogged(body, "bench").expect("accepted");
                for (rx, buffer) in rxs.iter().zip(&mut buffers) {
                    while let Ok(ShardMsg::Spans { spans: batch, .. }) = rx.try_recv() {
                        for s in batch {
                            buffer.insert(s.trace_id, s.span, s.cost, now);
                        }
                    }
                }
                timed += started.elapsed();
                if i % REQUESTS_PER_DRAIN == 0 {
                    for buffer in &mut buffers {
                        drop(buffer.drain(Trigger::Shutdown));
                    }
                }
            }
            timed
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
