//! tailgate: a tail-sampling OpenTelemetry trace collector.
//!
//! The data flow, one module per stage, dependencies running one way:
//!
//! ```text
//! trace (the model: shared types, depends on nothing)
//! receiver/ ──► buffer/ ──► pipeline/ ──► decide/ ──► export/
//!     │ └──────────── metrics pass through ──────────────► │
//!     │                          │           ▲            │
//!     │                          │        plugin/ (the sandbox: implements decide's Decider)
//!     └───────────► storage/ ◄───┴────────────────────────┘
//!                   (the log: appended before an answer, decisions before their effects)
//! otlp/ (wire, JSON, regrouping) is a codec used by receiver, decide, plugin and export
//! telemetry/ is told by every stage (each registers its own metrics); it imports none
//! config, cli, app wire the stages together
//! ```
//!
//! Which module may import which, as `layering.rs` checks it on every test run:
//!
//! | module | imports |
//! |---|---|
//! | `trace` | nothing |
//! | `clock` | `trace` |
//! | `config` | nothing |
//! | `otlp` | `trace` |
//! | `telemetry` | nothing |
//! | `storage` | `config`, `telemetry`, `trace` |
//! | `receiver` | `buffer`, `config`, `export`, `otlp`, `pipeline`, `storage`, `telemetry`, `trace` |
//! | `buffer` | `config`, `otlp`, `trace` |
//! | `pipeline` | `buffer`, `clock`, `decide`, `export`, `otlp`, `storage`, `telemetry`, `trace` |
//! | `decide` | `config`, `otlp`, `trace` |
//! | `plugin` | `config`, `decide`, `otlp`, `telemetry`, `trace` |
//! | `export` | `config`, `otlp`, `storage`, `telemetry`, `trace` |
//! | `loadgen` | `export`, `otlp` |
//! | `app`, `cli`, [`bench`] | anything |
//!
//! The library's public surface is the command line ([`cli::main`]) and, for the workspace's
//! benches, load harness and end-to-end tests only, [`bench`].

pub(crate) mod app;
pub(crate) mod buffer;
pub mod cli;
pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod decide;
pub(crate) mod export;
pub(crate) mod loadgen;
pub(crate) mod otlp;
pub(crate) mod pipeline;
pub(crate) mod plugin;
pub(crate) mod receiver;
pub(crate) mod storage;
pub(crate) mod telemetry;
pub(crate) mod trace;

#[cfg(test)]
mod layering;

/// What the benches (`benches/`), the load harness (`tailgate-load`) and the end-to-end tests
/// reach inside the host. Not an API: it changes with the host, and nothing outside this
/// workspace should use it.
#[doc(hidden)]
pub mod bench {
    pub use crate::buffer::{MemoryBudget, Timings, TraceBuffer};
    pub use crate::config::{BufferConfig, Config, DefaultVerdict, PolicyMode};
    pub use crate::decide::{
        Decider, DeciderFactory, Decision, DefaultDecision, Role, Tally, TraceView, Verdict, stamp,
    };
    pub use crate::export::{KeptTrace, encode_batch};
    pub use crate::loadgen::generate::SERVICES;
    pub use crate::loadgen::{
        GeneratedTrace, Generator, Rng, SEQ_ATTRIBUTE, Shape, read_requests, request_of, seq_of,
    };
    pub use crate::otlp::json::decode_traces;
    pub use crate::otlp::signal::points_of as metric_points;
    pub use crate::otlp::{RpcStatus, wire};
    pub use crate::pipeline::{ShardMsg, ShardSpan};
    pub use crate::plugin::chain::WasmChainFactory;
    pub use crate::plugin::{PluginEngine, PluginMetrics, PolicyRuntime, TraceIndex};
    pub use crate::receiver::{Ingest, ReceiverMetrics};
    pub use crate::storage::bench::BenchLog;
    pub use crate::telemetry::Registry;
    pub use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader, Stamp, Trigger};

    /// A trace request as OTLP/JSON, as the file exporter writes it.
    pub fn encode_traces_json(
        request: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    ) -> String {
        crate::otlp::json::encode_traces(request)
    }
}

/// Entry points for the fuzz targets (`host/fuzz`, run with `cargo fuzz`): each takes any bytes
/// and must not panic; where a decoder accepts its input, it checks what callers rely on.
#[doc(hidden)]
pub mod fuzz {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    pub use crate::storage::fuzz::records;

    /// The protobuf wire parser: what it accepts prost decodes too (the bytes are forwarded to
    /// peers that decode with prost), with every span accounted for, kept or rejected.
    pub fn wire(data: &[u8]) {
        let Ok(parsed) = crate::otlp::wire::parse_traces(data) else {
            return;
        };
        let decoded = ExportTraceServiceRequest::decode(data)
            .unwrap_or_else(|e| panic!("the wire parser accepted what prost refuses: {e}"));
        let ours: u64 = (parsed.resources.iter().flat_map(|r| &r.scopes))
            .map(|s| s.spans.len() as u64)
            .sum();
        let theirs: usize = (decoded.resource_spans.iter().flat_map(|r| &r.scope_spans))
            .map(|s| s.spans.len())
            .sum();
        assert_eq!(ours + parsed.rejected_spans, theirs as u64);
    }

    /// OTLP/JSON decoding under an allowance, then the protobuf path it feeds.
    pub fn json(data: &[u8]) {
        if let Ok(request) = crate::otlp::json::decode_traces_within(data, 1 << 20, 10_000) {
            let _ = crate::otlp::wire::parse_traces(&request.encode_to_vec());
        }
    }

    /// The metrics decoders, protobuf and OTLP/JSON: what either accepts, the file exporter's
    /// JSON of it reads back with the same points (or, holding a double that is not finite,
    /// is refused; never read with points missing).
    pub fn metrics(data: &[u8]) {
        use crate::otlp::signal;
        let from_protobuf = signal::count_metric_points(data, u64::MAX).ok();
        let from_json = signal::metrics_from_json(data, 1 << 22, u64::MAX).ok();
        for (body, points) in [from_protobuf.map(|p| (data.to_vec(), p)), from_json]
            .into_iter()
            .flatten()
        {
            let line = signal::metrics_to_json(&body).expect("an accepted request re-encodes");
            match signal::metrics_from_json(line.as_bytes(), usize::MAX, u64::MAX) {
                Ok((back, again)) => {
                    assert_eq!(points, again, "{line}");
                    assert_eq!(signal::count_metric_points(&back, u64::MAX), Ok(points));
                }
                // Doubles that are not finite are written spelled, and refused when read.
                Err(_) if line.contains("NaN") || line.contains("Infinity") => {}
                Err(e) => panic!("our own JSON is refused: {e:?}\n{line}"),
            }
        }
    }

    /// Patch and edit validation, and applying what it accepts: an edited trace is still OTLP
    /// that prost decodes, with every span that was not removed.
    pub fn edits(data: &[u8]) {
        crate::plugin::fuzz_edits(data)
    }

    /// Config parsing: an error names the file; nothing panics.
    pub fn config(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data)
            && let Err(e) = crate::config::Config::parse(text, "fuzz.toml")
        {
            assert!(e.to_string().contains("fuzz.toml"), "{e}");
        }
    }
}
