//! The storage log, per span:
//! - `append/{never,interval,always}`: one 300-span trace request appended and answered, one
//!   at a time, per `storage.fsync` mode (a lone sender gets no group commit, so `always` is
//!   one fsync per request: the worst case). Beside it, `accept_unlogged`: the memory-only
//!   receiver path for the same request, the baseline the log's cost adds to.
//! - `replay`: the restart's read side: a segment read and checked (crc32c per record), each
//!   request parsed and routed to the shards' channels as `Ingest::replay` does at start.
//!
//! The logs live under the system temp folder, so the fsync numbers are this machine's disk.
//! Criterion's throughput is spans, so `elem/s` is spans/s. Run:
//! `cargo bench -p tailgate --bench storage`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tailgate::bench::{BenchLog, Config, Registry};

/// Requests in the log the replay bench reads back: 18,000 spans.
const REPLAYED_REQUESTS: usize = 60;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tailgate-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(dir: &std::path::Path, fsync: &str) -> Config {
    let text = format!(
        "[storage]\ndir = {:?}\nfsync = \"{fsync}\"\nsegment_bytes = \"64MiB\"\n",
        dir.display().to_string()
    );
    Config::parse(&text, "bench.toml").expect("bench config")
}

fn bench(c: &mut Criterion) {
    let requests: Vec<Bytes> = common::requests(64).into_iter().map(Bytes::from).collect();
    let spans = (common::TRACES_PER_REQUEST * 30) as u64;

    let mut group = c.benchmark_group("storage_300_spans");
    group.throughput(Throughput::Elements(spans));
    group.measurement_time(Duration::from_secs(5));

    let (ingest, rxs) = common::ingest(2);
    let mut i = 0;
    group.bench_function("accept_unlogged", |b| {
        b.iter(|| {
            let accepted = ingest
                .accept_unlogged(&requests[i % requests.len()], "bench")
                .expect("accepted");
            i += 1;
            rxs.iter().for_each(|rx| while rx.try_recv().is_ok() {});
            accepted.rejected_spans
        })
    });

    for fsync in ["never", "interval", "always"] {
        let dir = temp(&format!("append-{fsync}"));
        let log = BenchLog::open(&config(&dir, fsync), &Registry::new()).expect("open");
        let mut i = 0;
        group.bench_function(format!("append/{fsync}"), |b| {
            b.iter(|| {
                i += 1;
                log.append(requests[i % requests.len()].clone())
            })
        });
        log.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    // A log of REPLAYED_REQUESTS requests, read back whole per iteration.
    let dir = temp("replay");
    {
        let log = BenchLog::open(&config(&dir, "never"), &Registry::new()).expect("open");
        for r in requests.iter().cycle().take(REPLAYED_REQUESTS) {
            log.append(r.clone());
        }
        log.close();
    }
    group.throughput(Throughput::Elements(spans * REPLAYED_REQUESTS as u64));
    group.sample_size(20);
    group.bench_function(format!("replay/{REPLAYED_REQUESTS}_requests"), |b| {
        b.iter_batched(
            || {
                let log = BenchLog::open(&config(&dir, "never"), &Registry::new()).expect("open");
                (log, common::ingest(2))
            },
            |(log, (ingest, rxs))| {
                let mut records = 0;
                log.replay(|position, body| {
                    assert!(ingest.replay(body, position, 0), "a record parses");
                    records += 1;
                    rxs.iter().for_each(|rx| while rx.try_recv().is_ok() {});
                });
                assert_eq!(records, REPLAYED_REQUESTS);
                // Dropped, not closed: a close would write a checkpoint past what it read
                // (nothing pins it here), and the next iteration would replay nothing.
                drop(log);
            },
            BatchSize::PerIteration,
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
