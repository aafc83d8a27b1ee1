//! Configuration: the TOML file (or the embedded defaults) parsed into typed, validated structs.
//!
//! Owns every default and every check on user-written values. Whatever reaches the rest of the
//! host from here is valid; errors name the file, the key and the line so an operator can fix
//! them without reading code. Never reads anything but the one file it is given.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole configuration. Every section and key is optional; absent ones take the defaults
/// documented in the README, which suit a first run on a laptop.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub(crate) receivers: ReceiversConfig,
    pub(crate) buffer: BufferConfig,
    pub decide: DecideConfig,
    pub(crate) exporter: ExporterConfig,
    pub(crate) admin: AdminConfig,
    pub(crate) log: LogConfig,
    pub(crate) shutdown: ShutdownConfig,
    pub plugins: PluginsConfig,
    /// The policy chain, in order. Empty: every trace gets `decide.default`.
    pub policies: Vec<PolicyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Compiled policies are cached here, keyed by the wasm's sha256 and the engine, so a
    /// restart or reload of an unchanged policy skips compilation. Empty: no cache.
    pub cache_dir: PathBuf,
    /// Distinct values one label of a policy counter may take before the rest are folded into
    /// `__overflow__`.
    pub(crate) max_label_values: usize,
    /// How often plugin files and the config file are checked for changes (hot swap). Zero
    /// turns watching off; SIGHUP and `POST /reload` still work.
    pub(crate) watch_interval: Seconds,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("tailgate-data/plugin-cache"),
            max_label_values: 1000,
            watch_interval: Seconds(Duration::from_millis(250)),
        }
    }
}

/// Whether a policy's verdict counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// The verdict takes part in the decision.
    #[default]
    Enforce,
    /// The policy runs and is measured, but its verdict is ignored.
    Shadow,
    /// An enrichment: runs only on traces the enforcing policies decided to keep, after that
    /// decision, and contributes only its edits (patches, span removals). Its keep / drop /
    /// abstain is ignored, and so is `on_error`: a failing enrichment leaves the trace as it
    /// is. Saves running cost enrichment, hygiene and trimming on traces that are dropped.
    Enrich,
}

/// What a failing policy call (trap, timeout, memory cap) counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnError {
    /// Losing an error trace is worse than keeping a boring one.
    #[default]
    Keep,
    Drop,
    Abstain,
}

#[derive(Debug, Clone, Deserialize)]
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
    /// Linear memory cap of one instance.
    #[serde(default = "default_policy_memory")]
    pub(crate) memory_limit: Size,
    /// Wall-clock budget of one call (epoch interruption).
    #[serde(default = "default_policy_timeout")]
    pub(crate) timeout: Seconds,
    /// Optional deterministic budget per call, in wasmtime fuel units.
    pub(crate) fuel: Option<u64>,
    /// Caps on a verdict's attribute writes.
    #[serde(default = "default_max_patches")]
    pub(crate) max_patches: usize,
    #[serde(default = "default_max_patch_bytes")]
    pub(crate) max_patch_bytes: Size,
    /// Log lines per second the policy may write; the rest are counted and dropped.
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
    pub(crate) quarantine_for: Seconds,
    /// The policy's own settings, handed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_policy_memory() -> Size {
    Size(16 << 20)
}
fn default_policy_timeout() -> Seconds {
    // Policies read a few fields per trace; 50 ms is generous and still bounds a stuck one.
    Seconds(Duration::from_millis(50))
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
fn default_quarantine_for() -> Seconds {
    Seconds(Duration::from_secs(60))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ReceiversConfig {
    /// OTLP/gRPC listen address; the OTLP default port is 4317.
    pub(crate) grpc: Option<SocketAddr>,
    /// OTLP/HTTP listen address; the OTLP default port is 4318.
    pub(crate) http: Option<SocketAddr>,
    /// Largest request accepted, measured after decompression (OTLP recommends 64 MiB).
    pub(crate) max_request_size: Size,
    /// `Retry-After` sent with HTTP 503 when the buffer is full.
    pub(crate) retry_after: Seconds,
}

impl Default for ReceiversConfig {
    fn default() -> Self {
        Self {
            grpc: Some(SocketAddr::from(([127, 0, 0, 1], 4317))),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 4318))),
            max_request_size: Size(64 << 20),
            retry_after: Seconds(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Quiet period after the root span arrives before the trace is decided (Refinery's default).
    pub(crate) root_grace: Seconds,
    /// Decide a trace when no span of it has arrived for this long.
    pub(crate) trace_idle: Seconds,
    /// Decide a trace at the latest this long after its first span (OTel `tail_sampling` default).
    pub(crate) decision_wait: Seconds,
    /// Decide a trace at once when it holds this many spans.
    pub(crate) max_spans_per_trace: usize,
    /// Decide a trace at once when its spans take this many bytes.
    pub(crate) max_bytes_per_trace: Size,
    /// Bound on all buffered traces. Past 90 % the oldest are decided early; at 100 % new data
    /// is refused with a retryable code.
    pub(crate) max_buffer_bytes: Size,
    /// Decision worker threads (shards); 0 = one per CPU.
    pub(crate) workers: usize,
    /// How many kept trace ids are remembered, so late spans follow the decision.
    pub(crate) remember_kept: usize,
    /// How many dropped trace ids are remembered (as 8-byte fingerprints).
    pub(crate) remember_dropped: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            root_grace: Seconds(Duration::from_secs(2)),
            trace_idle: Seconds(Duration::from_secs(10)),
            decision_wait: Seconds(Duration::from_secs(30)),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultVerdict {
    Keep,
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ExporterKind {
    /// OTLP/JSON lines in a local file.
    File,
    /// OTLP over gRPC.
    OtlpGrpc,
    /// OTLP over HTTP, protobuf body.
    OtlpHttp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Compression {
    None,
    Gzip,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ExporterConfig {
    #[serde(rename = "type")]
    pub(crate) kind: ExporterKind,
    /// File exporter: where kept traces are written, one ExportTraceServiceRequest per line.
    pub(crate) path: PathBuf,
    /// File exporter: rotate the file when it grows past this size.
    pub(crate) max_file_size: Size,
    /// File exporter: rotated files kept beside the live one.
    pub(crate) max_files: usize,
    /// OTLP exporters: `http://host:4317` for gRPC, `http://host:4318` (or a full URL) for HTTP.
    pub(crate) endpoint: String,
    /// OTLP exporters: extra headers (gRPC metadata), e.g. API keys.
    pub(crate) headers: std::collections::BTreeMap<String, String>,
    pub(crate) compression: Compression,
    /// Per attempt.
    pub(crate) timeout: Seconds,
    /// A batch is sent when it holds this many spans...
    pub(crate) batch_max_spans: usize,
    /// ...or when its oldest trace has waited this long.
    pub(crate) batch_timeout: Seconds,
    /// Kept spans waiting for the exporter; when full, deciding pauses and back-pressure reaches
    /// the receivers.
    pub(crate) queue_max_spans: usize,
    /// Batches in flight at once.
    pub(crate) concurrency: usize,
    pub(crate) retry_initial_backoff: Seconds,
    pub(crate) retry_max_backoff: Seconds,
    /// Give up on a batch (counted as failed) after retrying this long.
    pub(crate) retry_max_elapsed: Seconds,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        Self {
            kind: ExporterKind::File,
            path: PathBuf::from("tailgate-data/traces.jsonl"),
            max_file_size: Size(256 << 20),
            max_files: 4,
            endpoint: String::new(),
            headers: Default::default(),
            compression: Compression::Gzip,
            timeout: Seconds(Duration::from_secs(10)),
            batch_max_spans: 8192,
            batch_timeout: Seconds(Duration::from_millis(200)),
            queue_max_spans: 200_000,
            concurrency: 4,
            // The OTel Collector's exporterhelper uses 5 s / 30 s / 5 min; we start at 1 s so
            // that a short blip of a backend costs less queue time.
            retry_initial_backoff: Seconds(Duration::from_secs(1)),
            retry_max_backoff: Seconds(Duration::from_secs(30)),
            retry_max_elapsed: Seconds(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`; loopback by default since it is unauthenticated.
    pub(crate) endpoint: Option<SocketAddr>,
    /// Bearer token for `POST /reload`; unset disables the endpoint (SIGHUP and file changes
    /// still reload).
    pub(crate) reload_token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            endpoint: Some(SocketAddr::from(([127, 0, 0, 1], 9477))),
            reload_token: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ShutdownConfig {
    /// How long SIGTERM may take to decide every buffered trace and flush the exporter.
    pub(crate) timeout: Seconds,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: Seconds(Duration::from_secs(30)),
        }
    }
}

/// A duration written as text: `"2s"`, `"500ms"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(Seconds)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write it like \"30s\" or \"500ms\""
                ))
            })
    }
}

/// A size written as text (`"512MiB"`, `"64 MB"`) or as a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub u64);

impl Size {
    pub(crate) fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(text) => text
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|s| Size(s.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid size {text:?} ({e}); write it like \"512MiB\" or \"64KB\""
                    ))
                }),
        }
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
pub(crate) const EMBEDDED: &str = include_str!("../../config/agent.toml");
/// How errors in [`EMBEDDED`] name it.
pub(crate) const EMBEDDED_SOURCE: &str = "<embedded config/agent.toml>";

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
        let config: Config =
            toml::from_str(text).map_err(|e| invalid(describe_toml_error(&e, text)))?;
        config.validate().map_err(|(key, why)| {
            let line = find_key_line(text, key)
                .map(|l| format!("line {l}, "))
                .unwrap_or_default();
            invalid(format!("{line}key `{key}`: {why}"))
        })?;
        Ok(config)
    }

    /// Checks that hold across keys; returns the dotted key at fault.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let b = &self.buffer;
        let positive = [
            ("buffer.root_grace", b.root_grace.0),
            ("buffer.trace_idle", b.trace_idle.0),
            ("buffer.decision_wait", b.decision_wait.0),
            ("exporter.timeout", self.exporter.timeout.0),
            ("exporter.batch_timeout", self.exporter.batch_timeout.0),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err((key, "must be greater than zero".into()));
            }
        }
        if b.max_spans_per_trace == 0 {
            return Err(("buffer.max_spans_per_trace", "must be at least 1".into()));
        }
        if b.max_buffer_bytes.0 < 1 << 20 {
            return Err(("buffer.max_buffer_bytes", "must be at least 1MiB".into()));
        }
        if self.receivers.max_request_size.0 < 1024 {
            return Err(("receivers.max_request_size", "must be at least 1KiB".into()));
        }
        let e = &self.exporter;
        if e.batch_max_spans == 0 {
            return Err(("exporter.batch_max_spans", "must be at least 1".into()));
        }
        if e.queue_max_spans < e.batch_max_spans {
            return Err((
                "exporter.queue_max_spans",
                "must be at least exporter.batch_max_spans".into(),
            ));
        }
        if e.concurrency == 0 {
            return Err(("exporter.concurrency", "must be at least 1".into()));
        }
        match e.kind {
            ExporterKind::File if e.path.as_os_str().is_empty() => {
                return Err(("exporter.path", "the file exporter needs a path".into()));
            }
            ExporterKind::OtlpGrpc | ExporterKind::OtlpHttp => {
                let ok = e.endpoint.starts_with("http://") || e.endpoint.starts_with("https://");
                if !ok {
                    return Err((
                        "exporter.endpoint",
                        format!("must be an http:// or https:// URL, got {:?}", e.endpoint),
                    ));
                }
            }
            ExporterKind::File => {}
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.policies {
            if p.plugin.is_some() == p.path.is_some() {
                return Err((
                    "policies.name",
                    format!(
                        "policy {:?} needs exactly one of `plugin` and `path`",
                        p.name
                    ),
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err((
                    "policies.name",
                    format!("policy name {:?} is used twice", p.name),
                ));
            }
            if p.timeout.0.is_zero() {
                return Err((
                    "policies.timeout",
                    format!("policy {:?}: must be greater than zero", p.name),
                ));
            }
        }
        if self.receivers.grpc.is_none() && self.receivers.http.is_none() {
            return Err((
                "receivers",
                "at least one of grpc and http must be set".into(),
            ));
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

/// toml's own message already carries the line, the column, a caret under the key and the
/// unknown key's name; we only add which keys would have been accepted.
fn describe_toml_error(e: &toml::de::Error, _text: &str) -> String {
    e.to_string().trim_end().to_owned()
}

/// Finds the line of `section.key` in the text, for errors found after parsing.
fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            // `[table]` and `[[array-of-tables]]` alike.
            current = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            if section.is_empty() && current == key {
                return Some(i + 1);
            }
            continue;
        }
        let name = line.split('=').next().unwrap_or("").trim();
        if current == section && name == key {
            return Some(i + 1);
        }
    }
    None
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
        assert_eq!(c.buffer.root_grace.0, Duration::from_secs(2));
        assert_eq!(c.buffer.decision_wait.0, Duration::from_secs(30));
        assert_eq!(c.receivers.max_request_size.0, 64 << 20);
        assert_eq!(c.exporter.kind, ExporterKind::File);
        assert_eq!(c.decide.default, DefaultVerdict::Keep);
    }

    #[test]
    fn durations_and_sizes_are_written_as_text() {
        let c = Config::parse(
            "[buffer]\nroot_grace = \"500ms\"\nmax_buffer_bytes = \"512MiB\"\nmax_bytes_per_trace = 4096\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.buffer.root_grace.0, Duration::from_millis(500));
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
}
