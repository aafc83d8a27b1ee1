//! tailgate: a tail-sampling OpenTelemetry trace collector.
//!
//! The data flow, one module per stage, dependencies running one way:
//!
//! ```text
//! trace (the model: shared types, depends on nothing)
//! receiver/ ──► buffer/ ──► pipeline/ ──► decide/ ──► export/
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
//! | `receiver` | `buffer`, `config`, `otlp`, `pipeline`, `storage`, `telemetry`, `trace` |
//! | `buffer` | `config`, `trace` |
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
    pub use crate::otlp::{RpcStatus, wire};
    pub use crate::pipeline::{ShardMsg, ShardSpan};
    pub use crate::plugin::chain::WasmChainFactory;
    pub use crate::plugin::{PluginEngine, PluginMetrics, PolicyRuntime, TraceIndex};
    pub use crate::receiver::{Ingest, ReceiverMetrics};
    pub use crate::storage::bench::BenchLog;
    pub use crate::telemetry::Registry;
    pub use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader, Stamp, Trigger};
}
