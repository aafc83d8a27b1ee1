//! Configuration: the TOML file (or the embedded defaults) parsed into typed, validated structs.
//!
//! Owns every default and every check on user-written values. Whatever reaches the rest of the
//! host from here is valid; errors name the file, the key and the line so an operator can fix
//! them without reading code. Never reads anything but the one file it is given.

mod exporter;
mod keys;
mod locate;
mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub(crate) use exporter::{
    Compression, ExportBatching, ExporterConfig, ExporterKind, ExporterSink, OtlpExporterConfig,
};
pub(crate) use keys::keys_needing_restart;
pub(crate) use units::{Duration, Grace, Size};

use locate::KeyLines;

/// The whole configuration. Every section and key is optional; absent ones take the defaults
/// documented in the README, which suit a first run on a laptop.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub(crate) receivers: ReceiversConfig,
    pub(crate) buffer: BufferConfig,
    pub decide: DecideConfig,
    pub(crate) exporter: ExporterConfig,
    pub(crate) admin: AdminConfig,
    pub(crate) log: LogConfig,
    pub(crate) shutdown: ShutdownConfig,
    pub(crate) storage: StorageConfig,
    pub plugins: PluginsConfig,
    /// The policy chain, in order. Empty: every trace gets `decide.default`.
    pub policies: Vec<PolicyConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Compiled policies are cached here, keyed by the wasm's sha256 and the engine, so a
    /// restart or reload of an unchanged policy skips compilation. Created `0700`, and not used
    /// if another user owns it or others can write to it; an artifact is loaded only if it
    /// matches the manifest this host wrote beside it. Empty: no cache.
    pub cache_dir: PathBuf,
    /// Distinct values one label of a policy counter may take before the rest are folded into
    /// `__overflow__`.
    pub(crate) max_label_values: usize,
    /// When a label is full, a value unused for this long gives its place to the next new
    /// one, and when a counter is full, so does a series: a flood of junk values folds into
    /// `__overflow__` while it lasts, and real values get their own names again this long
    /// after it stops.
    pub(crate) label_ttl: Duration,
    /// How often plugin files and the config file are checked for changes (hot swap). Zero
    /// turns watching off; SIGHUP and `POST /reload` still work.
    pub(crate) watch_interval: Duration,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("tailgate-data/plugin-cache"),
            max_label_values: 1000,
            label_ttl: Duration::from_secs(60),
            watch_interval: Duration::from_millis(250),
        }
    }
}

/// Whether a policy's verdict counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// The verdict takes part in the decision.
    #[default]
    Enforce,
    /// The policy runs and is measured, but its verdict is ignored.
    Shadow,
    /// An enrichment: runs only on traces the enforcing policies decided to keep, after that
    /// decision, and on spans that arrive after a trace was kept, and contributes only its
    /// edits (patches, span removals). Its keep / drop / abstain is ignored, and so is
    /// `on_error`: what a failing enrichment does is `on_enrich_error`. Saves running cost
    /// enrichment, hygiene and trimming on traces that are dropped.
    Enrich,
}

/// What a failing enrichment (trap, timeout, fuel, quarantine, or edits refused) does to the
/// kept trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnEnrichError {
    /// The trace is exported without this enrichment's edits.
    #[default]
    Pass,
    /// Every span attribute that may hold text (strings, bytes, arrays, lists) is removed, and
    /// the trace counted in `tailgate_policy_failed_closed_total`: for redaction, which must
    /// not let through what it could not check.
    FailClosed,
}

/// What a failing policy call (trap, timeout, memory cap) counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnError {
    /// Losing an error trace is worse than keeping a boring one.
    #[default]
    Keep,
    Drop,
    Abstain,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Names the policy in metrics, logs and `sampling.policy`.
    pub name: String,
    /// A bundled policy by name (`keep-errors`, `latency`, …)…
    pub plugin: Option<String>,
    /// …or a WebAssembly component file, relative to the config file.
    pub(crate) path: Option<PathBuf>,
    /// Refuse the component unless its sha256 (hex) is this.
    pub(crate) sha256: Option<String>,
    #[serde(default)]
    pub mode: PolicyMode,
    /// A `drop` from a drop rule wins over every `keep` (e.g. health checks).
    #[serde(default)]
    pub(crate) drop_rule: bool,
    #[serde(default)]
    pub(crate) on_error: OnError,
    /// Only with `mode = "enrich"`: what a failed call does to the trace.
    pub(crate) on_enrich_error: Option<OnEnrichError>,
    /// Linear memory cap of one instance.
    #[serde(default = "default_policy_memory")]
    pub(crate) memory_limit: Size,
    /// Wall-clock budget of one call (epoch interruption).
    #[serde(default = "default_policy_timeout")]
    pub(crate) timeout: Duration,
    /// Optional deterministic budget per call, in wasmtime fuel units.
    pub(crate) fuel: Option<u64>,
    /// Caps on a verdict's attribute writes.
    #[serde(default = "default_max_patches")]
    pub(crate) max_patches: usize,
    #[serde(default = "default_max_patch_bytes")]
    pub(crate) max_patch_bytes: Size,
    /// Log lines per second the policy may write; the rest are counted and dropped. The host's
    /// own lines about the policy (failed calls, rejected edits) have the same limit.
    #[serde(default = "default_log_per_second")]
    pub(crate) log_per_second: u32,
    /// Seeds the policy's deterministic random stream.
    #[serde(default)]
    pub(crate) seed: u64,
    /// Consecutive failures that quarantine the policy…
    #[serde(default = "default_quarantine_after")]
    pub(crate) quarantine_after: u32,
    /// …for this long, after which it is tried again.
    #[serde(default = "default_quarantine_for")]
    pub(crate) quarantine_for: Duration,
    /// The policy's own settings, handed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_policy_memory() -> Size {
    Size(16 << 20)
}
fn default_policy_timeout() -> Duration {
    // Policies read a few fields per trace; 50 ms is generous and still bounds a stuck one.
    Duration::from_millis(50)
}
fn default_max_patches() -> usize {
    256
}
fn default_max_patch_bytes() -> Size {
    Size(64 << 10)
}
fn default_log_per_second() -> u32 {
    10
}
fn default_quarantine_after() -> u32 {
    10
}
fn default_quarantine_for() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ReceiversConfig {
    /// OTLP/gRPC listen address; the OTLP default port is 4317.
    pub(crate) grpc: Option<SocketAddr>,
    /// OTLP/HTTP listen address; the OTLP default port is 4318.
    pub(crate) http: Option<SocketAddr>,
    /// Served before the OTLP/HTTP paths: `"/otlp"` serves `/otlp/v1/traces` and
    /// `/otlp/v1/metrics`, for a receiver behind a path-routing proxy. Empty: `/v1/...`.
    pub(crate) http_path_prefix: String,
    /// Largest request accepted, measured after decompression (OTLP recommends 64 MiB).
    /// An OTLP/JSON body may decode to at most twice this.
    pub(crate) max_request_size: Size,
    /// Most spans (or metric data points) one request may hold (resource and scope blocks are
    /// held to it too); a larger request gets HTTP 413 or `RESOURCE_EXHAUSTED`. An empty span
    /// takes 2 bytes of protobuf, so without this a request's cost would not be bounded by its
    /// size.
    pub(crate) max_spans_per_request: usize,
    /// What all requests being read and decoded may hold at once, across both receivers: a
    /// request's body as it arrives (inflated), and then its decoding (once more its size for
    /// protobuf, twice for JSON). Past it a request gets the retryable 503 / `UNAVAILABLE`; one
    /// that could never fit gets 413 / `RESOURCE_EXHAUSTED`.
    pub(crate) max_in_flight_bytes: Size,
    /// `Retry-After` sent with HTTP 503 when the buffer is full.
    pub(crate) retry_after: Duration,
    /// What every connection to the receivers is held to.
    pub(crate) limits: ListenerLimits,
    /// Who may send.
    pub(crate) auth: ReceiverAuth,
    /// TLS on both receivers (no `cert_file`: plain TCP).
    pub(crate) tls: ListenerTls,
    /// Cross-origin requests to the HTTP receiver, for browser SDKs. Off by default.
    pub(crate) cors: CorsConfig,
}

/// CORS on the OTLP/HTTP receiver, as the OpenTelemetry Collector's OTLP receiver has it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CorsConfig {
    /// Origins allowed to send, exactly (`"https://app.example.com"`), with one wildcard
    /// (`"https://*.example.com"`, any subdomain), or `"*"` for any. Empty: CORS is off, and
    /// preflights get 405.
    pub(crate) allowed_origins: Vec<String>,
    /// Request headers allowed beyond `Content-Type`, `Content-Encoding`, `Authorization`
    /// and `X-Requested-With`, which always are.
    pub(crate) allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight's answer; unset, it decides itself.
    pub(crate) max_age: Option<Duration>,
}

impl CorsConfig {
    fn validate(&self) -> Result<(), KeyError> {
        for origin in &self.allowed_origins {
            if origin == "*" {
                continue;
            }
            let Some((scheme, host)) = origin.split_once("://") else {
                return Err(KeyError::new(
                    "allowed_origins",
                    format!(
                        "{origin:?} is not an origin: write it as scheme://host[:port], like \"https://app.example.com\""
                    ),
                ));
            };
            if scheme.is_empty()
                || host.is_empty()
                || host.contains('/')
                || host.matches('*').count() > 1
                || (host.contains('*') && !host.starts_with("*."))
            {
                return Err(KeyError::new(
                    "allowed_origins",
                    format!(
                        "{origin:?} is not an origin: scheme://host[:port], no path, and a wildcard only as the first label (\"https://*.example.com\")"
                    ),
                ));
            }
        }
        for name in &self.allowed_headers {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(KeyError::new(
                    "allowed_headers",
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        Ok(())
    }
}

/// Bearer tokens on the receivers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ReceiverAuth {
    /// A file of accepted tokens, one a line (`#` comments), reloaded when it changes. Set, a
    /// request without `Authorization: Bearer <one of them>` (HTTP header or gRPC metadata) is
    /// refused: HTTP 401, gRPC `UNAUTHENTICATED`. Unset: every client is accepted.
    pub(crate) tokens_file: Option<PathBuf>,
}

/// TLS on a listener: PEM files, read at start and again whenever one of them changes. Off
/// while `cert_file` is unset.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ListenerTls {
    /// The certificate chain, leaf first.
    pub(crate) cert_file: Option<PathBuf>,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub(crate) key_file: Option<PathBuf>,
    /// Set: mutual TLS, and a client must present a certificate this CA bundle issued.
    pub(crate) client_ca_file: Option<PathBuf>,
}

/// A listener's TLS files, once checked: what [`ListenerTls`] holds when TLS is on.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub(crate) cert_file: PathBuf,
    pub(crate) key_file: PathBuf,
    pub(crate) client_ca_file: Option<PathBuf>,
}

impl ListenerTls {
    /// The files, when TLS is on.
    pub(crate) fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert_file: self.cert_file.clone()?,
            key_file: self.key_file.clone()?,
            client_ca_file: self.client_ca_file.clone(),
        })
    }

    fn validate(&self) -> Result<(), KeyError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(KeyError::new("key_file", "cert_file needs key_file too")),
            (None, Some(_)) => Err(KeyError::new("cert_file", "key_file needs cert_file too")),
            (None, None) if self.client_ca_file.is_some() => Err(KeyError::new(
                "client_ca_file",
                "mutual TLS needs cert_file and key_file too",
            )),
            _ => Ok(()),
        }
    }
}

/// Limits every connection of a listener is held to (the receivers' and the admin
/// listener's, each its own table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ListenerLimits {
    /// A new connection must send its first byte, and an HTTP/1 request its whole head,
    /// within this time; otherwise the connection is closed.
    pub(crate) header_read_timeout: Duration,
    /// A connection on which no byte moved either way for this long is closed.
    pub(crate) idle_timeout: Duration,
    /// A request body must arrive within this time: HTTP gets 408, and over gRPC it bounds
    /// the whole call (`DEADLINE_EXCEEDED`).
    pub(crate) body_read_timeout: Duration,
    /// Open connections at most; one past it is accepted and closed at once, and counted.
    pub(crate) max_connections: usize,
    /// HTTP/2 streams (concurrent requests) on one connection.
    pub(crate) max_concurrent_streams: u32,
    /// HTTP/2 keepalive: a ping this often, and a peer that does not answer within it is
    /// dropped.
    pub(crate) keepalive: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_concurrent_streams: 256,
            keepalive: Duration::from_secs(30),
        }
    }
}

impl Default for ReceiversConfig {
    fn default() -> Self {
        Self {
            grpc: Some(SocketAddr::from(([127, 0, 0, 1], 4317))),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 4318))),
            http_path_prefix: String::new(),
            max_request_size: Size(64 << 20),
            max_spans_per_request: 100_000,
            max_in_flight_bytes: Size(256 << 20),
            retry_after: Duration::from_secs(1),
            limits: ListenerLimits::default(),
            auth: ReceiverAuth::default(),
            tls: ListenerTls::default(),
            cors: CorsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Quiet period after the root span arrives before the trace is decided: `"auto"` learns
    /// it per (service, root name) from how late spans arrive after their root; a duration
    /// fixes it.
    pub(crate) root_grace: Grace,
    /// With `root_grace = "auto"`: the least grace learned.
    pub(crate) root_grace_min: Duration,
    /// With `root_grace = "auto"`: the quantile of the arrival gaps the learned grace covers.
    pub(crate) grace_quantile: f64,
    /// Decide a trace without a root when no span of it has arrived for this long. With
    /// `root_grace = "auto"` this is the least such wait: it stretches to cover the gaps seen
    /// before roots arrive.
    pub(crate) trace_idle: Duration,
    /// Decide a trace at the latest this long after its first span (OTel `tail_sampling` default).
    pub(crate) decision_wait: Duration,
    /// How long after a drop a late span may still rescue the trace (an error span arriving
    /// for a trace dropped without it). Needs the storage log; `"0s"` turns rescue off.
    pub(crate) revision_window: Duration,
    /// Decide a trace at once when it holds this many spans.
    pub(crate) max_spans_per_trace: usize,
    /// Decide a trace at once when its spans take this many bytes.
    pub(crate) max_bytes_per_trace: Size,
    /// Bound on all buffered traces. Past 90 % the oldest are decided early; at 100 % new data
    /// is refused with a retryable code.
    pub(crate) max_buffer_bytes: Size,
    /// Decision worker threads (shards); 0 = one per CPU. The Wasm instance pool is sized
    /// from this and the policy count at start.
    pub(crate) workers: usize,
    /// How many kept trace ids are remembered, so late spans follow the decision.
    pub(crate) remember_kept: usize,
    /// How many dropped trace ids are remembered (as 8-byte fingerprints).
    pub(crate) remember_dropped: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            root_grace: Grace::Auto,
            root_grace_min: Duration::from_secs(1),
            grace_quantile: 0.999,
            trace_idle: Duration::from_secs(10),
            decision_wait: Duration::from_secs(30),
            revision_window: Duration::from_secs(30),
            max_spans_per_trace: 10_000,
            max_bytes_per_trace: Size(16 << 20),
            max_buffer_bytes: Size(512 << 20),
            workers: 0,
            remember_kept: 100_000,
            remember_dropped: 1_000_000,
        }
    }
}

/// What happens to a trace when no policy has an opinion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultVerdict {
    Keep,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecideConfig {
    /// Verdict when every policy abstains (or none is configured).
    pub default: DefaultVerdict,
}

impl Default for DecideConfig {
    fn default() -> Self {
        Self {
            default: DefaultVerdict::Keep,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`; loopback by default since it is unauthenticated.
    pub(crate) endpoint: Option<SocketAddr>,
    /// A file holding the admin token (one a line, as `receivers.auth.tokens_file`), reloaded
    /// when it changes. Set: `/metrics`, `/status` and `/reload` need `Authorization: Bearer
    /// <token>`; `/healthz` and `/readyz` stay open for probes. Unset: `/reload` is disabled.
    pub(crate) token_file: Option<PathBuf>,
    /// Deprecated: an inline token for `POST /reload` alone; use `token_file`.
    pub(crate) reload_token: Option<String>,
    /// What every connection to the admin listener is held to.
    pub(crate) limits: ListenerLimits,
    /// TLS on the admin listener (no `cert_file`: plain TCP).
    pub(crate) tls: ListenerTls,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            endpoint: Some(SocketAddr::from(([127, 0, 0, 1], 9477))),
            token_file: None,
            reload_token: None,
            limits: ListenerLimits::default(),
            tls: ListenerTls::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogConfig {
    /// A `tracing` filter such as `info` or `tailgate=debug`; `RUST_LOG` overrides it.
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ShutdownConfig {
    /// How long SIGTERM may take to decide every buffered trace and flush the exporter.
    pub(crate) timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            // Below Kubernetes' 30 s grace, so a rollout's SIGKILL never cuts a drain short;
            // what is not exported by then stays in the storage log for the next start.
            timeout: Duration::from_secs(25),
        }
    }
}

/// Where the storage log lives, or that there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StorageKind {
    /// Segment files under `storage.dir`: nothing acknowledged is lost on a crash.
    Local,
    /// No log: buffered and queued spans are lost on a crash (today's behaviour before the log).
    Memory,
}

/// When the log is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Fsync {
    /// Before every answer (group commit): survives a machine crash.
    Always,
    /// Every `storage.fsync_interval`: a machine crash loses at most that much.
    Interval,
    /// Never: the page cache only; survives a process crash, not a machine crash.
    Never,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct StorageConfig {
    pub(crate) kind: StorageKind,
    /// The log's folder; one process at a time owns it.
    pub(crate) dir: PathBuf,
    pub(crate) fsync: Fsync,
    /// How often `fsync = "interval"` forces the log.
    pub(crate) fsync_interval: Duration,
    /// A segment file is closed at this size and a new one started.
    pub(crate) segment_bytes: Size,
    /// Bound on the log on disk. Past 90 % the oldest traces are decided early (trigger
    /// `disk`); at 100 % new data is refused with a retryable code.
    pub(crate) max_bytes: Size,
    /// How long decisions are kept in the log for late spans (the late-span horizon).
    pub(crate) decision_retention: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: StorageKind::Local,
            dir: PathBuf::from("tailgate-data/storage"),
            fsync: Fsync::Interval,
            fsync_interval: Duration::from_millis(100),
            segment_bytes: Size(64 << 20),
            max_bytes: Size(10 << 30),
            decision_retention: Duration::from_secs(300),
        }
    }
}

impl StorageConfig {
    fn validate(&self) -> Result<(), KeyError> {
        if self.kind == StorageKind::Memory {
            return Ok(());
        }
        if self.dir.as_os_str().is_empty() {
            return Err(KeyError::new("dir", "must not be empty"));
        }
        if self.fsync == Fsync::Interval && self.fsync_interval.0.is_zero() {
            return Err(KeyError::new("fsync_interval", "must be greater than zero"));
        }
        if self.segment_bytes.0 < 1 << 20 {
            return Err(KeyError::new("segment_bytes", "must be at least 1MiB"));
        }
        if self.max_bytes.0 < 2 * self.segment_bytes.0 {
            return Err(KeyError::new(
                "max_bytes",
                "must be at least twice storage.segment_bytes",
            ));
        }
        Ok(())
    }
}

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// The config `tailgate run` uses without `--config`: the agent pack, `config/agent.toml`,
/// embedded in the binary (its policies are the bundled ones, also embedded).
pub(crate) const EMBEDDED: &str = include_str!("../../../config/agent.toml");
/// How errors in [`EMBEDDED`] name it.
pub(crate) const EMBEDDED_SOURCE: &str = "<embedded config/agent.toml>";

/// A value that parsed but cannot be used: the dotted key at fault (relative to the section
/// that found it, until [`KeyError::within`] places it) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyError {
    key: String,
    message: String,
}

impl KeyError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The same error with its key prefixed by the table it was found in.
    fn within(mut self, table: &str) -> Self {
        self.key = if self.key.is_empty() {
            table.to_owned()
        } else {
            format!("{table}.{}", self.key)
        };
        self
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        // toml's own message already carries the line, the column, a caret under the key and
        // the key's name.
        let toml_error = |e: toml::de::Error| invalid(e.to_string().trim_end().to_owned());
        let lines = KeyLines::parse(text).map_err(toml_error)?;
        let at_line = |e: KeyError| {
            let line = lines
                .line_of(&e.key)
                .map(|l| format!("line {l}, "))
                .unwrap_or_default();
            invalid(format!("{line}key `{}`: {}", e.key, e.message))
        };
        // Before serde: a key of another exporter type is refused by serde too, but at the
        // line of `[exporter]`; here it gets its own.
        refuse_foreign_exporter_keys(&lines)
            .map_err(|(e, line)| invalid(format!("line {line}, key `{}`: {}", e.key, e.message)))?;
        let config: Config = toml::from_str(text).map_err(toml_error)?;
        config.validate().map_err(at_line)?;
        Ok(config)
    }

    /// Every section checks its own values; what spans entries (policy names) is checked here.
    fn validate(&self) -> Result<(), KeyError> {
        self.receivers
            .validate()
            .map_err(|e| e.within("receivers"))?;
        self.buffer.validate().map_err(|e| e.within("buffer"))?;
        self.exporter.validate().map_err(|e| e.within("exporter"))?;
        self.log.validate().map_err(|e| e.within("log"))?;
        self.storage.validate().map_err(|e| e.within("storage"))?;
        self.admin.validate().map_err(|e| e.within("admin"))?;
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let entry = format!("policies[{i}]");
            p.validate().map_err(|e| e.within(&entry))?;
            if !names.insert(p.name.as_str()) {
                return Err(KeyError::new(
                    "name",
                    format!("policy name {:?} is used twice", p.name),
                )
                .within(&entry));
            }
        }
        Ok(())
    }

    /// Worker threads to run, resolving `0` to the number of CPUs.
    pub(crate) fn worker_count(&self) -> usize {
        match self.buffer.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// The first key written in `[exporter]` that belongs to another `type`, with its line.
fn refuse_foreign_exporter_keys(lines: &KeyLines<'_>) -> Result<(), (KeyError, usize)> {
    let kind = match lines.str_at("exporter", "type") {
        None => ExporterKind::File,
        // A type no exporter has is left to serde, which names the types it accepts.
        Some(name) => match ExporterKind::ALL.into_iter().find(|k| k.name() == name) {
            Some(kind) => kind,
            None => return Ok(()),
        },
    };
    for (key, line) in lines.keys_in("exporter") {
        if let Some(why) = kind.refuse_key(&key) {
            return Err((KeyError::new(key, why).within("exporter"), line));
        }
    }
    Ok(())
}

impl AdminConfig {
    fn validate(&self) -> Result<(), KeyError> {
        self.tls.validate().map_err(|e| e.within("tls"))?;
        if self.token_file.is_some() && self.reload_token.is_some() {
            return Err(KeyError::new(
                "reload_token",
                "set admin.token_file or the deprecated admin.reload_token, not both",
            ));
        }
        Ok(())
    }
}

impl ReceiversConfig {
    fn validate(&self) -> Result<(), KeyError> {
        if self.grpc.is_none() && self.http.is_none() {
            return Err(KeyError::new(
                "",
                "at least one of grpc and http must be set",
            ));
        }
        if self.max_request_size.0 < 1024 {
            return Err(KeyError::new("max_request_size", "must be at least 1KiB"));
        }
        let prefix = &self.http_path_prefix;
        let path_chars = |c: char| c.is_ascii_alphanumeric() || "/-._~".contains(c);
        if !prefix.is_empty()
            && (!prefix.starts_with('/')
                || prefix.ends_with('/')
                || !prefix.chars().all(path_chars))
        {
            return Err(KeyError::new(
                "http_path_prefix",
                format!(
                    "must start with / and not end with one, in plain path characters (like \"/otlp\"), got {prefix:?}"
                ),
            ));
        }
        self.tls.validate().map_err(|e| e.within("tls"))?;
        self.cors.validate().map_err(|e| e.within("cors"))?;
        if self.max_in_flight_bytes.0 < self.max_request_size.0.saturating_mul(2) {
            return Err(KeyError::new(
                "max_in_flight_bytes",
                "must be at least twice receivers.max_request_size, so that a protobuf request at that size fits",
            ));
        }
        Ok(())
    }
}

impl BufferConfig {
    fn validate(&self) -> Result<(), KeyError> {
        if let Grace::Fixed(grace) = self.root_grace
            && grace.0.is_zero()
        {
            return Err(KeyError::new(
                "root_grace",
                "must be greater than zero, or \"auto\"",
            ));
        }
        if !(self.grace_quantile > 0.5 && self.grace_quantile < 1.0) {
            return Err(KeyError::new(
                "grace_quantile",
                "must be above 0.5 and below 1, for example 0.999",
            ));
        }
        if self.root_grace_min.0 > self.decision_wait.0 {
            return Err(KeyError::new(
                "root_grace_min",
                "must not be longer than buffer.decision_wait",
            ));
        }
        let positive = [
            ("root_grace_min", self.root_grace_min),
            ("trace_idle", self.trace_idle),
            ("decision_wait", self.decision_wait),
        ];
        for (key, value) in positive {
            if value.0.is_zero() {
                return Err(KeyError::new(key, "must be greater than zero"));
            }
        }
        if self.max_spans_per_trace == 0 {
            return Err(KeyError::new("max_spans_per_trace", "must be at least 1"));
        }
        if self.max_buffer_bytes.0 < 1 << 20 {
            return Err(KeyError::new("max_buffer_bytes", "must be at least 1MiB"));
        }
        Ok(())
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), KeyError> {
        // The filter the binary builds from this key; checked here so a typo is refused at
        // start instead of quietly logging at `info`.
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(drop)
            .map_err(|e| KeyError::new("level", format!("not a tracing filter: {e}")))
    }
}

impl PolicyConfig {
    fn validate(&self) -> Result<(), KeyError> {
        if self.plugin.is_some() == self.path.is_some() {
            let key = if self.path.is_some() { "path" } else { "name" };
            return Err(KeyError::new(
                key,
                format!(
                    "policy {:?} needs exactly one of `plugin` and `path`",
                    self.name
                ),
            ));
        }
        if self.timeout.0.is_zero() {
            return Err(KeyError::new(
                "timeout",
                format!("policy {:?}: must be greater than zero", self.name),
            ));
        }
        if self.on_enrich_error.is_some() && self.mode != PolicyMode::Enrich {
            return Err(KeyError::new(
                "on_enrich_error",
                format!(
                    "policy {:?}: only an enrichment (mode = \"enrich\") has it; on_error says what a failing call counts as",
                    self.name
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for DefaultVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultVerdict::Keep => "keep",
            DefaultVerdict::Drop => "drop",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_embedded_defaults() {
        let c = Config::parse("", "x.toml").unwrap();
        assert_eq!(c.buffer.root_grace, Grace::Auto);
        assert_eq!(c.buffer.decision_wait, Duration::from_secs(30));
        assert_eq!(c.receivers.max_request_size.0, 64 << 20);
        assert_eq!(c.exporter.kind(), ExporterKind::File);
        assert_eq!(c.decide.default, DefaultVerdict::Keep);
    }

    #[test]
    fn durations_and_sizes_are_written_as_text() {
        let c = Config::parse(
            "[buffer]\nroot_grace = \"500ms\"\nmax_buffer_bytes = \"512MiB\"\nmax_bytes_per_trace = 4096\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(
            c.buffer.root_grace,
            Grace::Fixed(Duration::from_millis(500))
        );
        assert_eq!(c.buffer.max_buffer_bytes.0, 512 << 20);
        assert_eq!(c.buffer.max_bytes_per_trace.0, 4096);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = Config::parse(
            "[buffer]\nroot_grace = \"1s\"\nroot_grase = \"2s\"\n",
            "conf/t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("conf/t.toml:"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("root_grase"), "{err}");
    }

    #[test]
    fn wrong_type_and_bad_duration_are_errors_with_the_line() {
        let err = Config::parse("[buffer]\nworkers = \"two\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("workers"), "{err}");
        let err = Config::parse("[buffer]\n\ndecision_wait = \"30 parsecs\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("invalid duration"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_the_key_and_line() {
        let err = Config::parse(
            "[exporter]\ntype = \"otlp_grpc\"\nendpoint = \"localhost:4317\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 3") && err.contains("exporter.endpoint"),
            "{err}"
        );
    }

    /// Parses `text` and returns the error, which must name `t.toml`, `key` and `line`.
    fn error_at(text: &str, key: &str, line: usize) -> String {
        let err = match Config::parse(text, "t.toml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(err.starts_with("t.toml:"), "{err}");
        assert!(err.contains(key), "no {key:?} in {err}");
        assert!(
            err.contains(&format!("line {line}")),
            "not line {line}: {err}"
        );
        err
    }

    /// A config with every section, so that each bad key below sits among others.
    const FULL: &str = "\
[receivers]
grpc = \"127.0.0.1:0\"
http = \"127.0.0.1:0\"

[buffer]
root_grace = \"1s\"

[decide]
default = \"keep\"

[exporter]
type = \"file\"
path = \"out.jsonl\"

[admin]
endpoint = \"127.0.0.1:0\"

[log]
level = \"info\"

[shutdown]
timeout = \"5s\"

[plugins]
cache_dir = \"\"

[[policies]]
name = \"errors\"
plugin = \"keep-errors\"

[[policies]]
name = \"slow\"
plugin = \"latency\"
";

    /// `FULL` with `line` inserted after the line holding `after`; returns the text and the
    /// inserted line's number.
    fn full_with(after: &str, line: &str) -> (String, usize) {
        let mut lines: Vec<&str> = FULL.lines().collect();
        let at = lines.iter().position(|l| *l == after).unwrap() + 1;
        lines.insert(at, line);
        (lines.join("\n") + "\n", at + 1)
    }

    #[test]
    fn the_full_config_is_valid() {
        let c = Config::parse(FULL, "t.toml").unwrap();
        assert_eq!(c.policies.len(), 2);
    }

    #[test]
    fn an_unknown_key_in_any_section_is_reported_at_its_line() {
        for (after, section) in [
            ("[receivers]", "receivers"),
            ("[buffer]", "buffer"),
            ("[decide]", "decide"),
            ("path = \"out.jsonl\"", "exporter"),
            ("[admin]", "admin"),
            ("[log]", "log"),
            ("[shutdown]", "shutdown"),
            ("[plugins]", "plugins"),
            ("plugin = \"latency\"", "policies"),
        ] {
            let (text, line) = full_with(after, "bogus_key = 1");
            let err = error_at(&text, "bogus_key", line);
            assert!(err.contains("unknown field"), "{section}: {err}");
        }
    }

    #[test]
    fn a_bad_value_in_any_section_is_reported_at_its_line() {
        for (after, bad, key) in [
            (
                "[receivers]",
                "max_request_size = 10",
                "receivers.max_request_size",
            ),
            ("[receivers]", "retry_after = 5", "retry_after"),
            ("[buffer]", "trace_idle = \"0s\"", "buffer.trace_idle"),
            (
                "[buffer]",
                "max_buffer_bytes = \"1KiB\"",
                "buffer.max_buffer_bytes",
            ),
            ("[decide]", "# a comment line", "default"),
            (
                "path = \"out.jsonl\"",
                "batch_max_spans = 0",
                "exporter.batch_max_spans",
            ),
            (
                "path = \"out.jsonl\"",
                "queue_max_spans = 10",
                "exporter.queue_max_spans",
            ),
            ("[admin]", "reload_token = 5", "reload_token"),
            ("[log]", "format = \"xml\"", "format"),
            ("[shutdown]", "# a comment line", "timeout"),
            ("[plugins]", "max_label_values = -1", "max_label_values"),
            (
                "plugin = \"latency\"",
                "timeout = \"0ms\"",
                "policies[1].timeout",
            ),
            ("plugin = \"latency\"", "on_error = \"explode\"", "on_error"),
            (
                "plugin = \"latency\"",
                "on_enrich_error = \"fail_closed\"",
                "policies[1].on_enrich_error",
            ),
            (
                "[receivers]",
                "max_in_flight_bytes = \"1MiB\"",
                "receivers.max_in_flight_bytes",
            ),
        ] {
            let (mut text, mut line) = full_with(after, bad);
            // Sections whose values are all checked by type get a wrong type instead.
            if bad.starts_with('#') {
                let replaced = match key {
                    "default" => ("default = \"keep\"", "default = \"maybe\""),
                    _ => ("timeout = \"5s\"", "timeout = \"soon\""),
                };
                text = FULL.replace(replaced.0, replaced.1);
                line = text.lines().position(|l| l == replaced.1).unwrap() + 1;
            }
            error_at(&text, key, line);
        }
        let (text, line) = full_with("[log]", "level = \"tailgate=loud\"");
        let text = text.replacen("level = \"info\"\n", "", 1);
        error_at(&text, "log.level", line);
    }

    #[test]
    fn the_admin_token_file_and_the_inline_token_are_not_both_taken() {
        let text = "[admin]\ntoken_file = \"/etc/admin-token\"\nreload_token = \"r\"\n";
        error_at(text, "admin.reload_token", 3);
        let c = Config::parse("[admin]\ntoken_file = \"/etc/admin-token\"\n", "t.toml").unwrap();
        assert!(c.admin.token_file.is_some());
    }

    #[test]
    fn an_error_in_the_nth_policy_points_at_that_entry() {
        let second_name = FULL.lines().position(|l| l == "name = \"slow\"").unwrap() + 1;
        // Neither plugin nor path: the entry's name line.
        let text = FULL.replace("plugin = \"latency\"\n", "");
        let err = error_at(&text, "policies[1].name", second_name);
        assert!(err.contains("\"slow\""), "{err}");
        // A name used twice: the second use.
        let text = FULL.replace("name = \"slow\"", "name = \"errors\"");
        error_at(&text, "policies[1].name", second_name);
        // Both plugin and path: the path line.
        let (text, line) = full_with("plugin = \"latency\"", "path = \"p.wasm\"");
        error_at(&text, "policies[1].path", line);
        // The first entry's errors stay at the first entry.
        let (text, line) = full_with("plugin = \"keep-errors\"", "timeout = \"0s\"");
        error_at(&text, "policies[0].timeout", line);
    }

    #[test]
    fn a_key_of_another_exporter_type_is_reported_at_its_own_line() {
        let (text, line) = full_with("path = \"out.jsonl\"", "endpoint = \"http://h:4317\"");
        let err = error_at(&text, "exporter.endpoint", line);
        assert!(err.contains("exporter type \"file\""), "{err}");
        // `type` written after the key, and the default type when `type` is absent.
        let text = "[exporter]\nmax_files = 2\ntype = \"otlp_http\"\nendpoint = \"http://h\"\n";
        error_at(text, "exporter.max_files", 2);
        let text = "[exporter]\npath = \"x\"\n\ncompression = \"none\"\n";
        error_at(text, "exporter.compression", 4);
        // A type no exporter has is reported as such, at the type's line.
        let err = error_at("[exporter]\n\ntype = \"kafka\"\n", "kafka", 3);
        assert!(err.contains("otlp_grpc"), "{err}");
    }

    fn repo_file(path: &str) -> String {
        let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
    }

    /// The dotted keys and values of a config's leaves, as JSON (see `keys::tree`).
    fn leaves(value: &serde_json::Value) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut keys = std::collections::BTreeSet::new();
        keys::leaf_keys(value, "", &mut keys);
        keys.into_iter()
            .map(|k| {
                let v = k
                    .split('.')
                    .try_fold(value, |v, part| v.get(part))
                    .cloned()
                    .unwrap_or_default();
                (k, v)
            })
            .collect()
    }

    fn differences(
        got: &std::collections::BTreeMap<String, serde_json::Value>,
        want: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Vec<String> {
        let mut keys: std::collections::BTreeSet<&String> = got.keys().collect();
        keys.extend(want.keys());
        keys.into_iter()
            .filter(|k| got.get(*k) != want.get(*k))
            .map(|k| format!("{k}: example {:?}, default {:?}", got.get(k), want.get(k)))
            .collect()
    }

    #[test]
    fn the_example_file_is_the_defaults_key_by_key() {
        let text = repo_file("config/tailgate.example.toml");
        let mut example = Config::parse(&text, "tailgate.example.toml").unwrap();
        assert!(!example.policies.is_empty(), "the example shows policies");
        example.policies.clear();
        let want = leaves(&keys::tree(&Config::default()));
        let diff = differences(&leaves(&keys::tree(&example)), &want);
        assert!(diff.is_empty(), "{diff:#?}");

        // Every key with a default is written out, not just left to default: a key added to
        // the structs must be added to the example.
        let written: toml::Table = toml::from_str(&text).unwrap();
        let mut written_keys = std::collections::BTreeSet::new();
        keys::leaf_keys(&keys::tree(&written), "", &mut written_keys);
        let missing: Vec<&String> = want
            .iter()
            .filter(|(k, v)| {
                !v.is_null() && !k.starts_with("policies") && !written_keys.contains(*k)
            })
            .map(|(k, _)| k)
            .collect();
        assert!(missing.is_empty(), "not in the example: {missing:?}");
    }

    #[test]
    fn the_example_files_commented_otlp_settings_are_the_otlp_defaults() {
        let text = repo_file("config/tailgate.example.toml");
        let otlp_only: Vec<String> = ExporterKind::OtlpGrpc
            .keys()
            .into_iter()
            .filter(|k| ExporterKind::File.refuse_key(k).is_some())
            .collect();
        // `# key = value` lines of the [exporter] section whose key is an OTLP setting.
        let section = text
            .split("\n[")
            .find(|s| s.starts_with("exporter]"))
            .unwrap();
        let mut table = String::from("type = \"otlp_grpc\"\n");
        for line in section.lines() {
            let Some(line) = line.strip_prefix("# ") else {
                continue;
            };
            let key = line.split('=').next().unwrap_or("").trim();
            if line.contains('=') && otlp_only.iter().any(|k| k == key) {
                table.push_str(line);
                table.push('\n');
            }
        }
        let shown: ExporterConfig =
            toml::from_str(&table).unwrap_or_else(|e| panic!("{e}\n{table}"));
        let mut shown = leaves(&keys::tree(&shown));
        let mut want = leaves(&keys::tree(&ExporterConfig::default_for(
            ExporterKind::OtlpGrpc,
        )));
        // The example's endpoint, retry limit and TLS files are examples (none has a default;
        // an unset limit depends on the storage mode); headers are a table.
        for skip in [
            "endpoint",
            "metrics_endpoint",
            "headers",
            "retry_max_elapsed",
            "ca_file",
            "client_cert_file",
            "client_key_file",
        ] {
            assert!(
                table.contains(skip) || skip == "headers",
                "{skip} not shown:\n{table}"
            );
            shown.remove(skip);
            want.remove(skip);
        }
        for k in &otlp_only {
            if k != "headers" {
                assert!(
                    table.contains(&format!("\n{k} =")),
                    "{k} not shown:\n{table}"
                );
            }
        }
        let diff = differences(&shown, &want);
        assert!(diff.is_empty(), "{diff:#?}");
    }

    /// The first-column keys of the README tables headed `| key |`, `| plugins key |` and
    /// `| policy key |` (the last as `policies.KEY`).
    fn readme_keys(readme: &str) -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        let mut prefix: Option<&str> = None;
        for line in readme.lines() {
            let Some(row) = line.strip_prefix('|') else {
                prefix = None;
                continue;
            };
            let first = row.split('|').next().unwrap_or("").trim();
            match first {
                "key" | "plugins key" => prefix = Some(""),
                "policy key" => prefix = Some("policies."),
                _ => {
                    let Some(prefix) = prefix else { continue };
                    for (i, name) in first.split('`').enumerate() {
                        if i % 2 == 1 {
                            keys.insert(format!("{prefix}{name}"));
                        }
                    }
                }
            }
        }
        keys
    }

    #[test]
    fn the_readme_tables_and_the_structs_have_the_same_keys() {
        let documented = readme_keys(&repo_file("README.md"));
        let schema = keys::schema_keys();
        let undocumented: Vec<&String> = schema.difference(&documented).collect();
        let unknown: Vec<&String> = documented.difference(&schema).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "missing from the README: {undocumented:?}; in the README but no such key: {unknown:?}"
        );
    }
}
