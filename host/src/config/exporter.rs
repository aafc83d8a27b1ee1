//! The `[exporter]` section: one table whose `type` decides which other keys it may hold.
//!
//! Owns the exporter's typed settings and the rule that a key of another type (`endpoint` on
//! a `file` exporter) is an error, not silently ignored. serde's internally tagged enums lose
//! `deny_unknown_fields` (and toml's line numbers) once `#[serde(flatten)]` shares keys
//! between variants, so the table is read flat and then split by type here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::KeyError;
use super::units::{Duration, Size};

/// The exporter: where kept traces go (`sink`, chosen by `type`) and the batching and queue
/// settings every type shares.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ExporterConfig {
    #[serde(flatten)]
    pub(crate) sink: ExporterSink,
    #[serde(flatten)]
    pub(crate) batching: ExportBatching,
}

/// The settings that belong to one exporter `type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ExporterSink {
    /// OTLP/JSON lines in a local file.
    File(FileExporterConfig),
    /// OTLP over gRPC.
    OtlpGrpc(OtlpExporterConfig),
    /// OTLP over HTTP, protobuf body.
    OtlpHttp(OtlpExporterConfig),
}

/// The value of `exporter.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ExporterKind {
    File,
    OtlpGrpc,
    OtlpHttp,
}

impl ExporterKind {
    pub(crate) const ALL: [ExporterKind; 3] = [Self::File, Self::OtlpGrpc, Self::OtlpHttp];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::OtlpGrpc => "otlp_grpc",
            Self::OtlpHttp => "otlp_http",
        }
    }

    /// Every key an exporter of this type may hold, read off its serialized default so that a
    /// field added to a type's struct is accepted without a list kept by hand.
    pub(super) fn keys(self) -> Vec<String> {
        match serde_json::to_value(ExporterConfig::default_for(self)) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Why `key` may not be set on an exporter of this type, if it is another type's setting.
    /// Keys no type knows are left to the parser's unknown-key error.
    pub(super) fn refuse_key(self, key: &str) -> Option<String> {
        if self.keys().iter().any(|k| k == key) {
            return None;
        }
        let owners: Vec<&str> = Self::ALL
            .into_iter()
            .filter(|kind| kind.keys().iter().any(|k| k == key))
            .map(Self::name)
            .collect();
        (!owners.is_empty()).then(|| {
            format!(
                "not a setting of exporter type {:?} (it belongs to {})",
                self.name(),
                owners.join(" and ")
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct FileExporterConfig {
    /// Where kept traces are written, one ExportTraceServiceRequest per line.
    pub(crate) path: PathBuf,
    /// Rotate the file when it grows past this size.
    pub(crate) max_file_size: Size,
    /// Rotated files kept beside the live one.
    pub(crate) max_files: usize,
    /// Where metrics are written, one ExportMetricsServiceRequest per line, rotated as `path`.
    pub(crate) metrics_path: PathBuf,
}

impl Default for FileExporterConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("tailgate-data/traces.jsonl"),
            max_file_size: Size(256 << 20),
            max_files: 4,
            metrics_path: PathBuf::from("tailgate-data/metrics.jsonl"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct OtlpExporterConfig {
    /// `http://host:4317` for gRPC, `http://host:4318` (or a full URL) for HTTP.
    pub(crate) endpoint: String,
    /// Where metrics go, when not to `endpoint`'s backend: the same forms as `endpoint`, the
    /// same protocol, headers and TLS.
    pub(crate) metrics_endpoint: Option<String>,
    /// Extra headers (gRPC metadata), e.g. API keys.
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) compression: Compression,
    /// Per attempt.
    pub(crate) timeout: Duration,
    /// Batches in flight at once.
    pub(crate) concurrency: usize,
    pub(crate) retry_initial_backoff: Duration,
    pub(crate) retry_max_backoff: Duration,
    /// Give up on a batch (counted as failed) after retrying this long. Unset: no limit with
    /// the storage log on (retry while there is disk), 5 minutes in memory-only mode.
    pub(crate) retry_max_elapsed: Option<Duration>,
    /// A PEM bundle of CAs trusted for an `https://` endpoint, beside the system's and the
    /// bundled Mozilla roots (a private CA).
    pub(crate) ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) for a backend that wants mutual TLS; with
    /// `client_key_file`.
    pub(crate) client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub(crate) client_key_file: Option<PathBuf>,
}

impl Default for OtlpExporterConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            metrics_endpoint: None,
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            timeout: Duration::from_secs(10),
            concurrency: 4,
            // The OTel Collector's exporterhelper uses 5 s / 30 s / 5 min; we start at 1 s so
            // that a short blip of a backend costs less queue time.
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(30),
            retry_max_elapsed: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

impl OtlpExporterConfig {
    /// Where metrics go: `metrics_endpoint` as written, or else `endpoint`'s backend. For
    /// OTLP/HTTP an `endpoint` whose path ends in `/v1/traces` gets `/v1/metrics` in its place,
    /// and a path of another shape gets `/v1/metrics` appended; a bare `host:port` (and any
    /// gRPC endpoint) is used as is, the transport adding the signal's path or service.
    pub(crate) fn metrics_target(&self, http: bool) -> String {
        if let Some(metrics) = &self.metrics_endpoint {
            return metrics.clone();
        }
        let endpoint = self.endpoint.trim();
        if !http {
            return endpoint.to_owned();
        }
        let (base, query) = match endpoint.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (endpoint, String::new()),
        };
        let path_at = base
            .find("://")
            .and_then(|scheme| base[scheme + 3..].find('/').map(|p| scheme + 3 + p));
        let path = path_at.map_or("", |at| &base[at..]);
        if path.is_empty() || path == "/" {
            return endpoint.to_owned();
        }
        let base = match base.strip_suffix("/v1/traces") {
            Some(prefix) => prefix,
            None => base.trim_end_matches('/'),
        };
        format!("{base}/v1/metrics{query}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Compression {
    None,
    Gzip,
}

/// Batching and queueing, the same for every exporter type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ExportBatching {
    /// A batch is sent when it holds this many spans...
    pub(crate) batch_max_spans: usize,
    /// ...or when its oldest trace has waited this long.
    pub(crate) batch_timeout: Duration,
    /// Kept spans waiting for the exporter; when full, deciding pauses and back-pressure reaches
    /// the receivers.
    pub(crate) queue_max_spans: usize,
    /// Metrics requests waiting for the exporter in memory. Past it, with the storage log on,
    /// they wait in the log only; without it, the receivers refuse metrics with a retryable
    /// code.
    pub(crate) metrics_queue_max_bytes: Size,
}

impl Default for ExportBatching {
    fn default() -> Self {
        Self {
            batch_max_spans: 8192,
            batch_timeout: Duration::from_millis(200),
            queue_max_spans: 200_000,
            metrics_queue_max_bytes: Size(64 << 20),
        }
    }
}

impl Default for ExporterConfig {
    fn default() -> Self {
        Self::default_for(ExporterKind::File)
    }
}

impl ExporterConfig {
    /// The defaults of an exporter of type `kind`.
    pub(crate) fn default_for(kind: ExporterKind) -> Self {
        let sink = match kind {
            ExporterKind::File => ExporterSink::File(FileExporterConfig::default()),
            ExporterKind::OtlpGrpc => ExporterSink::OtlpGrpc(OtlpExporterConfig::default()),
            ExporterKind::OtlpHttp => ExporterSink::OtlpHttp(OtlpExporterConfig::default()),
        };
        Self {
            sink,
            batching: ExportBatching::default(),
        }
    }

    pub(crate) fn kind(&self) -> ExporterKind {
        match self.sink {
            ExporterSink::File(_) => ExporterKind::File,
            ExporterSink::OtlpGrpc(_) => ExporterKind::OtlpGrpc,
            ExporterSink::OtlpHttp(_) => ExporterKind::OtlpHttp,
        }
    }

    /// Checks the values; keys are relative to `[exporter]`.
    pub(super) fn validate(&self) -> Result<(), KeyError> {
        let b = &self.batching;
        if b.batch_timeout.0.is_zero() {
            return Err(KeyError::new("batch_timeout", "must be greater than zero"));
        }
        if b.batch_max_spans == 0 {
            return Err(KeyError::new("batch_max_spans", "must be at least 1"));
        }
        if b.queue_max_spans < b.batch_max_spans {
            return Err(KeyError::new(
                "queue_max_spans",
                "must be at least exporter.batch_max_spans",
            ));
        }
        if b.metrics_queue_max_bytes.0 < 1 << 20 {
            return Err(KeyError::new(
                "metrics_queue_max_bytes",
                "must be at least 1MiB",
            ));
        }
        match &self.sink {
            ExporterSink::File(file) => {
                if file.path.as_os_str().is_empty() {
                    return Err(KeyError::new("path", "the file exporter needs a path"));
                }
                if file.metrics_path.as_os_str().is_empty() || file.metrics_path == file.path {
                    return Err(KeyError::new(
                        "metrics_path",
                        "needs a file of its own, not exporter.path",
                    ));
                }
            }
            ExporterSink::OtlpGrpc(otlp) | ExporterSink::OtlpHttp(otlp) => {
                let url =
                    otlp.endpoint.starts_with("http://") || otlp.endpoint.starts_with("https://");
                if !url {
                    return Err(KeyError::new(
                        "endpoint",
                        format!(
                            "must be an http:// or https:// URL, got {:?}",
                            otlp.endpoint
                        ),
                    ));
                }
                if let Some(metrics) = &otlp.metrics_endpoint
                    && !(metrics.starts_with("http://") || metrics.starts_with("https://"))
                {
                    return Err(KeyError::new(
                        "metrics_endpoint",
                        format!("must be an http:// or https:// URL, got {metrics:?}"),
                    ));
                }
                if otlp.timeout.0.is_zero() {
                    return Err(KeyError::new("timeout", "must be greater than zero"));
                }
                if otlp.concurrency == 0 {
                    return Err(KeyError::new("concurrency", "must be at least 1"));
                }
                match (&otlp.client_cert_file, &otlp.client_key_file) {
                    (Some(_), None) => {
                        return Err(KeyError::new(
                            "client_cert_file",
                            "needs exporter.client_key_file too",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(KeyError::new(
                            "client_key_file",
                            "needs exporter.client_cert_file too",
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// The table as written: every key of every type, each optional. Deserialized by serde in
/// place, so an unknown key or a wrong type keeps toml's line.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ExporterTable {
    #[serde(rename = "type")]
    kind: Option<ExporterKind>,
    path: Option<PathBuf>,
    max_file_size: Option<Size>,
    max_files: Option<usize>,
    metrics_path: Option<PathBuf>,
    endpoint: Option<String>,
    metrics_endpoint: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    compression: Option<Compression>,
    timeout: Option<Duration>,
    concurrency: Option<usize>,
    retry_initial_backoff: Option<Duration>,
    retry_max_backoff: Option<Duration>,
    retry_max_elapsed: Option<Duration>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    batch_max_spans: Option<usize>,
    batch_timeout: Option<Duration>,
    queue_max_spans: Option<usize>,
    metrics_queue_max_bytes: Option<Size>,
}

impl ExporterTable {
    /// The keys written in the table.
    fn written_keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn into_config(self) -> Result<ExporterConfig, String> {
        let kind = self.kind.unwrap_or(ExporterKind::File);
        for key in self.written_keys() {
            if let Some(why) = kind.refuse_key(&key) {
                return Err(format!("key `exporter.{key}`: {why}"));
            }
        }
        let sink = match kind {
            ExporterKind::File => {
                let d = FileExporterConfig::default();
                ExporterSink::File(FileExporterConfig {
                    path: self.path.unwrap_or(d.path),
                    max_file_size: self.max_file_size.unwrap_or(d.max_file_size),
                    max_files: self.max_files.unwrap_or(d.max_files),
                    metrics_path: self.metrics_path.unwrap_or(d.metrics_path),
                })
            }
            ExporterKind::OtlpGrpc | ExporterKind::OtlpHttp => {
                let d = OtlpExporterConfig::default();
                let otlp = OtlpExporterConfig {
                    endpoint: self.endpoint.unwrap_or(d.endpoint),
                    metrics_endpoint: self.metrics_endpoint,
                    headers: self.headers.unwrap_or(d.headers),
                    compression: self.compression.unwrap_or(d.compression),
                    timeout: self.timeout.unwrap_or(d.timeout),
                    concurrency: self.concurrency.unwrap_or(d.concurrency),
                    retry_initial_backoff: self
                        .retry_initial_backoff
                        .unwrap_or(d.retry_initial_backoff),
                    retry_max_backoff: self.retry_max_backoff.unwrap_or(d.retry_max_backoff),
                    retry_max_elapsed: self.retry_max_elapsed.or(d.retry_max_elapsed),
                    ca_file: self.ca_file,
                    client_cert_file: self.client_cert_file,
                    client_key_file: self.client_key_file,
                };
                if kind == ExporterKind::OtlpGrpc {
                    ExporterSink::OtlpGrpc(otlp)
                } else {
                    ExporterSink::OtlpHttp(otlp)
                }
            }
        };
        let d = ExportBatching::default();
        Ok(ExporterConfig {
            sink,
            batching: ExportBatching {
                batch_max_spans: self.batch_max_spans.unwrap_or(d.batch_max_spans),
                batch_timeout: self.batch_timeout.unwrap_or(d.batch_timeout),
                queue_max_spans: self.queue_max_spans.unwrap_or(d.queue_max_spans),
                metrics_queue_max_bytes: self
                    .metrics_queue_max_bytes
                    .unwrap_or(d.metrics_queue_max_bytes),
            },
        })
    }
}

impl<'de> Deserialize<'de> for ExporterConfig {
    /// A key of another type is refused here too, for callers that deserialize a `Config`
    /// directly; [`super::Config::parse`] finds it first, to report the key's own line.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ExporterTable::deserialize(d)?
            .into_config()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exporter(text: &str) -> Result<ExporterConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_type_chooses_the_settings() {
        let file = exporter("path = \"x.jsonl\"\nbatch_timeout = \"1s\"\n").unwrap();
        assert_eq!(file.kind(), ExporterKind::File);
        assert_eq!(file.batching.batch_timeout, Duration::from_secs(1));
        let ExporterSink::File(f) = &file.sink else {
            panic!("{file:?}")
        };
        assert_eq!(f.path, PathBuf::from("x.jsonl"));

        let http =
            exporter("type = \"otlp_http\"\nendpoint = \"http://h:4318\"\nconcurrency = 2\n")
                .unwrap();
        let ExporterSink::OtlpHttp(o) = &http.sink else {
            panic!("{http:?}")
        };
        assert_eq!((o.endpoint.as_str(), o.concurrency), ("http://h:4318", 2));
    }

    #[test]
    fn a_key_of_another_type_is_refused_by_name() {
        let err = exporter("type = \"file\"\nendpoint = \"http://h:4317\"\n").unwrap_err();
        assert!(
            err.contains("exporter.endpoint") && err.contains("otlp_grpc"),
            "{err}"
        );
        let err =
            exporter("type = \"otlp_grpc\"\nendpoint = \"http://h\"\nmax_files = 3\n").unwrap_err();
        assert!(
            err.contains("exporter.max_files") && err.contains("belongs to file"),
            "{err}"
        );
        // Shared keys belong to every type.
        for kind in ExporterKind::ALL {
            assert_eq!(kind.refuse_key("queue_max_spans"), None);
            assert_eq!(kind.refuse_key("type"), None);
        }
    }

    #[test]
    fn metrics_go_to_the_traces_backend_unless_told_otherwise() {
        let target = |endpoint: &str, http: bool| {
            OtlpExporterConfig {
                endpoint: endpoint.into(),
                ..Default::default()
            }
            .metrics_target(http)
        };
        assert_eq!(target("http://h:4318", true), "http://h:4318");
        assert_eq!(
            target("https://h/otlp/v1/traces?k=1", true),
            "https://h/otlp/v1/metrics?k=1"
        );
        assert_eq!(target("https://h/otlp/", true), "https://h/otlp/v1/metrics");
        assert_eq!(target("http://h:4317", false), "http://h:4317");
        let own = OtlpExporterConfig {
            endpoint: "http://h:4318".into(),
            metrics_endpoint: Some("http://m:4318/custom".into()),
            ..Default::default()
        };
        assert_eq!(own.metrics_target(true), "http://m:4318/custom");
        let err =
            exporter("type = \"otlp_http\"\nendpoint = \"http://h\"\nmetrics_endpoint = \"m:1\"\n")
                .map(|c| c.validate().map_err(|e| e.key))
                .expect("parses");
        assert_eq!(err, Err("metrics_endpoint".to_owned()));
        let err = exporter("path = \"a.jsonl\"\nmetrics_path = \"a.jsonl\"\n")
            .map(|c| c.validate().map_err(|e| e.key))
            .expect("parses");
        assert_eq!(err, Err("metrics_path".to_owned()));
    }

    #[test]
    fn serializes_flat_with_its_type() {
        let v = serde_json::to_value(ExporterConfig::default_for(ExporterKind::OtlpGrpc)).unwrap();
        assert_eq!(v["type"], "otlp_grpc");
        // Unset by default: its limit depends on the storage mode (see `Exporter::start`).
        assert!(v["retry_max_elapsed"].is_null(), "{v}");
        assert_eq!(v["batch_timeout"], "200ms");
        assert!(v.get("path").is_none(), "{v}");
    }
}
