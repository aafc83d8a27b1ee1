//! OTLP export transport: puts one already-encoded `ExportTraceServiceRequest` on the wire to the
//! downstream (OTLP/gRPC or OTLP/HTTP with a protobuf body), classifies what comes back the way
//! the OTLP specification says (retryable, permanent, or delivered with a partial success), and
//! runs the retry-with-backoff loop around it.
//!
//! Owns: the connection pool (one tonic channel or one hyper client per [`Transport`]), TLS for
//! `https://` endpoints, gzip, per-attempt timeouts, the mapping of gRPC codes and HTTP statuses
//! to [`SendError`], and honouring the delay a server asks for (gRPC `RetryInfo`, HTTP
//! `Retry-After`). Batching, queueing and counting spans belong to the caller.
//!
//! Must never: retry an error the spec calls permanent (that re-sends data the backend has
//! already refused and hides a configuration mistake behind a retry storm), or lose the reason
//! of a failure (every [`SendError`] carries the status and the server's own words, so the
//! operator can act on it without packet captures). It never decodes the spans it sends.

use std::error::Error as StdError;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::otlp::{RetryInfo, RpcStatus};
use bytes::{BufMut as _, Bytes};
use http::header::{
    CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER,
    USER_AGENT,
};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::otlp::signal::Signal;

/// OTLP/HTTP binary protobuf content type (OTLP spec, "Binary Protobuf Encoding").
const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";
const USER_AGENT_VALUE: &str = concat!("tailgate/", env!("CARGO_PKG_VERSION"));
/// Largest HTTP response body we read; the same as tonic's default gRPC receive limit, so both
/// protocols bound a misbehaving server's reply alike.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// How much of a server's text goes into an error message: enough for any real explanation,
/// small enough that an HTML error page does not flood the log.
const MAX_REASON_CHARS: usize = 512;
/// Idle pooled HTTP connections are dropped after this; hyper-util's own default, set explicitly
/// because it only takes effect with a pool timer.
const HTTP_POOL_IDLE: Duration = Duration::from_secs(90);
/// `RetryPolicy` jitter: the wait is the backoff times a factor drawn from [1 - r, 1 + r]; 0.5 is
/// the OTel Collector exporterhelper's (cenkalti/backoff's) default randomization factor.
const RANDOMIZATION_FACTOR: f64 = 0.5;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Clone)]
pub(crate) struct TransportConfig {
    pub(crate) protocol: Protocol,
    /// What the bodies are: it picks the gRPC service and the default HTTP path.
    pub(crate) signal: Signal,
    /// gRPC: `http(s)://host:4317` (no path: the service path is fixed by OTLP). HTTP: a base
    /// `http(s)://host:4318`, to which the signal's path (`/v1/traces`) is appended when the
    /// path is empty or `/`, or a full URL with a path, used as is.
    pub(crate) endpoint: String,
    /// Extra headers (gRPC: metadata, keys lower-cased), e.g. API keys. The transport's own
    /// headers (content type, encoding) win over these.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) gzip: bool,
    /// Per attempt, connecting and reading the reply included.
    pub(crate) timeout: Duration,
    /// A private CA and a client certificate, for `https://` endpoints.
    pub(crate) tls: ClientTls,
}

/// A certificate chain's PEM and its key's.
type CertAndKey = (Vec<u8>, Vec<u8>);

/// PEM files for the exporter's TLS, read when the transport is built.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientTls {
    /// CAs trusted beside the system's and the bundled roots.
    pub(crate) ca_file: Option<PathBuf>,
    /// A client certificate chain and its key, for mutual TLS; both or neither.
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
}

impl ClientTls {
    fn read(path: &Path, key: &str, endpoint: &str) -> Result<Vec<u8>, TransportError> {
        std::fs::read(path).map_err(|e| TransportError::Tls {
            endpoint: endpoint.to_owned(),
            reason: format!("exporter.{key} {}: {e}", path.display()),
        })
    }

    /// The CA bundle's PEM, if one is set.
    fn ca_pem(&self, endpoint: &str) -> Result<Option<Vec<u8>>, TransportError> {
        self.ca_file
            .as_deref()
            .map(|p| Self::read(p, "ca_file", endpoint))
            .transpose()
    }

    /// The client certificate's and key's PEM, if they are set.
    fn identity_pem(&self, endpoint: &str) -> Result<Option<CertAndKey>, TransportError> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Ok(Some((
                Self::read(cert, "client_cert_file", endpoint)?,
                Self::read(key, "client_key_file", endpoint)?,
            ))),
            _ => Ok(None),
        }
    }
}

// Header values are usually API keys: a config dump in a log must not leak them.
impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TransportConfig")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("headers (values redacted)", &names)
            .field("gzip", &self.gzip)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Why a send did not deliver. The message names the endpoint, the status (gRPC code, HTTP
/// status, or the connection error with its causes) and whatever explanation the server gave.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SendError {
    /// Worth retrying (OTLP retryable codes, connection errors, timeouts). `after` = server-requested delay (gRPC RetryInfo / HTTP Retry-After).
    #[error("{message}")]
    Retryable {
        message: String,
        after: Option<Duration>,
    },
    /// Final: do not retry (e.g. 400, INVALID_ARGUMENT, UNAUTHENTICATED).
    #[error("{message}")]
    Permanent { message: String },
}

impl SendError {
    #[cfg(test)]
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, SendError::Retryable { .. })
    }

    pub(crate) fn message(&self) -> &str {
        match self {
            SendError::Retryable { message, .. } | SendError::Permanent { message } => message,
        }
    }

    /// The delay the server asked for, if any.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Retryable { after, .. } => *after,
            SendError::Permanent { .. } => None,
        }
    }
}

/// A successful export. A non-zero `rejected_spans` is the server's partial success: those
/// spans are gone for good (the spec forbids retrying them), `message` says why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) rejected_spans: i64,
    pub(crate) message: String,
}

/// A configuration the transport cannot work with. Header errors name the header but never
/// its value, which is usually a secret.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid exporter endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("invalid exporter header {name:?}: {reason}")]
    Header { name: String, reason: String },
    #[error("cannot set up TLS for exporter endpoint {endpoint:?}: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("invalid exporter timeout: {0}")]
    Timeout(String),
    #[error("the exporter transport must be created inside a tokio runtime")]
    NoRuntime,
}

/// Backoff between retries. Defaults follow the OTel Collector's exporterhelper (max 30 s,
/// max elapsed 5 min, multiplier 1.5, ±50 % jitter) except the initial backoff: 1 s instead of
/// 5 s, so that a short blip of a backend costs less queue time (see `config.rs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RetryPolicy {
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    /// No attempt is scheduled later than this after the first one started.
    pub(crate) max_elapsed: Duration,
    pub(crate) multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(300),
            multiplier: 1.5,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------------

/// One downstream endpoint with its connection pool. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub(crate) struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    /// scheme://authority/path only: the query may carry credentials.
    display: String,
    protocol: Protocol,
    signal: Signal,
    timeout: Duration,
    gzip: bool,
    wire: Wire,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[expect(
    clippy::large_enum_variant,
    reason = "one per Transport, behind an Arc"
)]
enum Wire {
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
    },
    Http {
        client: HttpClient,
        uri: Uri,
        headers: HeaderMap,
    },
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("protocol", &self.inner.protocol)
            .field("endpoint", &self.inner.display)
            .finish_non_exhaustive()
    }
}

/// A body ready for the wire. HTTP gzip happens here, once per batch rather than per attempt;
/// gRPC compression is tonic's, per message.
struct Prepared {
    body: Bytes,
}

impl Transport {
    /// Validates the endpoint and headers and builds the connection pool without connecting: a
    /// downstream that is down at startup is a retryable send error later, not a startup failure.
    pub(crate) fn new(cfg: TransportConfig) -> Result<Self, TransportError> {
        // The gRPC channel spawns its worker task right here; fail with words, not a panic.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::NoRuntime);
        }
        if cfg.timeout.is_zero() {
            return Err(TransportError::Timeout("must be greater than zero".into()));
        }
        let uri = parse_endpoint(&cfg.endpoint)?;
        let tls = uri.scheme() == Some(&Scheme::HTTPS);
        let (display, wire) = match cfg.protocol {
            Protocol::Grpc => {
                let path = uri.path();
                if !(path.is_empty() || path == "/") || uri.query().is_some() {
                    return Err(endpoint_error(
                        &cfg.endpoint,
                        "a gRPC endpoint is scheme://host:port only; the service path is fixed by OTLP",
                    ));
                }
                let display = format!("{}", uri).trim_end_matches('/').to_owned();
                (display, grpc_wire(&cfg, tls)?)
            }
            Protocol::HttpProtobuf => {
                let uri = http_signal_uri(uri, &cfg.endpoint, cfg.signal)?;
                let display = match uri.authority() {
                    Some(a) => format!(
                        "{}://{}{}",
                        uri.scheme_str().unwrap_or("http"),
                        a,
                        uri.path()
                    ),
                    None => uri.to_string(),
                };
                (display, http_wire(&cfg, uri, tls)?)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                display,
                protocol: cfg.protocol,
                signal: cfg.signal,
                timeout: cfg.timeout,
                gzip: cfg.gzip,
                wire,
            }),
        })
    }

    /// The URL requests go to (HTTP: with `/v1/traces` resolved), without any query string.
    pub(crate) fn endpoint(&self) -> &str {
        &self.inner.display
    }

    /// One attempt, bounded by the per-attempt timeout.
    #[cfg(test)]
    pub(crate) async fn send(&self, body: Bytes) -> Result<Delivered, SendError> {
        let prepared = self.prepare(body).await?;
        self.attempt(&prepared).await
    }

    async fn prepare(&self, body: Bytes) -> Result<Prepared, SendError> {
        if !(self.inner.gzip && matches!(self.inner.wire, Wire::Http { .. })) {
            return Ok(Prepared { body });
        }
        // Batches run to megabytes and gzip costs milliseconds per megabyte: off the runtime's
        // worker threads so receivers keep being served meanwhile.
        let compressed = tokio::task::spawn_blocking(move || gzip(&body))
            .await
            .map_err(|e| SendError::Permanent {
                message: format!("gzip task failed: {e}"),
            })?
            .map_err(|e| SendError::Permanent {
                message: format!("gzip failed: {e}"),
            })?;
        Ok(Prepared { body: compressed })
    }

    async fn attempt(&self, prepared: &Prepared) -> Result<Delivered, SendError> {
        let timeout = self.inner.timeout;
        let fut = async {
            match &self.inner.wire {
                Wire::Grpc { channel, metadata } => {
                    self.grpc_attempt(channel, metadata, prepared).await
                }
                Wire::Http {
                    client,
                    uri,
                    headers,
                } => self.http_attempt(client, uri, headers, prepared).await,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Retryable {
                message: format!(
                    "no reply from {} within the per-attempt timeout of {timeout:?}",
                    self.inner.display
                ),
                after: None,
            }),
        }
    }

    async fn grpc_attempt(
        &self,
        channel: &Channel,
        metadata: &MetadataMap,
        prepared: &Prepared,
    ) -> Result<Delivered, SendError> {
        let mut grpc =
            tonic::client::Grpc::new(channel.clone()).accept_compressed(CompressionEncoding::Gzip);
        if self.inner.gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc.ready().await.map_err(|e| SendError::Retryable {
            message: format!(
                "gRPC channel to {} not ready: {}",
                self.inner.display,
                error_chain(&e)
            ),
            after: None,
        })?;
        let mut request = tonic::Request::new(prepared.body.clone());
        *request.metadata_mut() = metadata.clone();
        // Sent as grpc-timeout so the server can give up when we do.
        request.set_timeout(self.inner.timeout);
        let path = PathAndQuery::from_static(self.inner.signal.grpc_path());
        match grpc.unary(request, path, RawRequestCodec).await {
            Ok(response) => Ok(match response.into_inner() {
                Ok(reply) => delivered(reply),
                Err(e) => {
                    // The server said OK, so the data is in; only the partial-success detail is lost.
                    tracing::debug!(endpoint = %self.inner.display, error = %e, "undecodable gRPC export response");
                    Delivered::default()
                }
            }),
            Err(status) => Err(classify_grpc(&status, &self.inner.display)),
        }
    }

    async fn http_attempt(
        &self,
        client: &HttpClient,
        uri: &Uri,
        headers: &HeaderMap,
        prepared: &Prepared,
    ) -> Result<Delivered, SendError> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .body(Full::new(prepared.body.clone()))
            .map_err(|e| SendError::Permanent {
                message: format!("cannot build HTTP request: {e}"),
            })?;
        let h = request.headers_mut();
        h.clone_from(headers);
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(PROTOBUF_CONTENT_TYPE),
        );
        if self.inner.gzip {
            h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        } else {
            h.remove(CONTENT_ENCODING);
        }

        let response = client
            .request(request)
            .await
            .map_err(|e| SendError::Retryable {
                message: format!(
                    "HTTP POST {} failed: {}",
                    self.inner.display,
                    error_chain(&e)
                ),
                after: None,
            })?;
        let head = ReplyHead::of(&response);
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| error_chain(&*e));

        if head.status.is_success() {
            return Ok(match body.map(ExportTraceServiceResponse::decode) {
                Ok(Ok(reply)) => delivered(reply),
                // Accepted regardless: only the partial-success detail is lost.
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %self.inner.display, error = %e, "undecodable OTLP/HTTP response body");
                    Delivered::default()
                }
                Err(e) => {
                    tracing::debug!(endpoint = %self.inner.display, error = %e, "unreadable OTLP/HTTP response body");
                    Delivered::default()
                }
            });
        }
        Err(classify_http(&head, body, &self.inner.display))
    }
}

fn delivered(reply: ExportTraceServiceResponse) -> Delivered {
    match reply.partial_success {
        Some(p) => Delivered {
            rejected_spans: p.rejected_spans,
            message: truncate_chars(&p.error_message),
        },
        None => Delivered::default(),
    }
}

fn endpoint_error(endpoint: &str, reason: impl Into<String>) -> TransportError {
    TransportError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.into(),
    }
}

fn parse_endpoint(endpoint: &str) -> Result<Uri, TransportError> {
    let uri: Uri = endpoint
        .trim()
        .parse()
        .map_err(|e| endpoint_error(endpoint, format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(endpoint_error(
                endpoint,
                "must start with http:// or https://",
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(endpoint_error(endpoint, "has no host"));
    }
    Ok(uri)
}

/// OTLP/HTTP: a base URL gets the signal path appended; a URL with a path is used verbatim
/// (the spec's rule for the per-signal endpoint setting).
fn http_signal_uri(uri: Uri, endpoint: &str, signal: Signal) -> Result<Uri, TransportError> {
    let path = uri.path();
    if !(path.is_empty() || path == "/") {
        return Ok(uri);
    }
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut parts = uri.into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(format!("{}{query}", signal.http_path()))
            .map_err(|e| endpoint_error(endpoint, format!("{e}")))?,
    );
    Uri::from_parts(parts).map_err(|e| endpoint_error(endpoint, format!("{e}")))
}

fn grpc_wire(cfg: &TransportConfig, tls: bool) -> Result<Wire, TransportError> {
    let mut metadata = MetadataMap::new();
    for (name, value) in &cfg.headers {
        let key = AsciiMetadataKey::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
            .map_err(|e| TransportError::Header {
                name: name.clone(),
                reason: format!(
                    "not a valid gRPC metadata key ({e}); binary (-bin) keys are not supported"
                ),
            })?;
        let value =
            AsciiMetadataValue::try_from(value.as_str()).map_err(|_| TransportError::Header {
                name: name.clone(),
                reason: "value must be printable ASCII".into(),
            })?;
        metadata.append(key, value);
    }

    let mut endpoint = Endpoint::from_shared(cfg.endpoint.trim().to_owned())
        .map_err(|e| endpoint_error(&cfg.endpoint, error_chain(&e)))?
        .connect_timeout(cfg.timeout)
        .user_agent(USER_AGENT_VALUE)
        .map_err(|e| endpoint_error(&cfg.endpoint, error_chain(&e)))?;
    if tls {
        // Bundled Mozilla roots make a scratch/distroless image work; the system store adds
        // private CAs. tonic refuses native roots when the system has none, hence the check.
        let mut tls_config = ClientTlsConfig::new().with_webpki_roots();
        if !native_roots().is_empty() {
            tls_config = tls_config.with_native_roots();
        }
        if let Some(ca) = cfg.tls.ca_pem(&cfg.endpoint)? {
            tls_config = tls_config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = cfg.tls.identity_pem(&cfg.endpoint)? {
            tls_config = tls_config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls_config)
            .map_err(|e| TransportError::Tls {
                endpoint: cfg.endpoint.clone(),
                reason: error_chain(&e),
            })?;
    }
    Ok(Wire::Grpc {
        channel: endpoint.connect_lazy(),
        metadata,
    })
}

fn http_wire(cfg: &TransportConfig, uri: Uri, tls: bool) -> Result<Wire, TransportError> {
    let mut headers = HeaderMap::new();
    for (name, value) in &cfg.headers {
        let key =
            HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| TransportError::Header {
                name: name.clone(),
                reason: format!("not a valid HTTP header name ({e})"),
            })?;
        let mut value = HeaderValue::from_str(value).map_err(|_| TransportError::Header {
            name: name.clone(),
            reason: "value must be visible ASCII".into(),
        })?;
        // Keeps API keys out of any Debug output of requests.
        value.set_sensitive(true);
        headers.append(key, value);
    }
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));

    let mut http = HttpConnector::new();
    http.enforce_http(false); // the TLS wrapper hands https:// URIs down to it
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls_config(cfg, tls)?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(HTTP_POOL_IDLE)
        .build(connector);
    Ok(Wire::Http {
        client,
        uri,
        headers,
    })
}

/// For plain http:// the TLS config is never used, so the trust store is not even loaded.
fn rustls_config(cfg: &TransportConfig, tls: bool) -> Result<rustls::ClientConfig, TransportError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let endpoint = cfg.endpoint.as_str();
    let tls_error = |key: &str, e: &dyn fmt::Display| TransportError::Tls {
        endpoint: endpoint.to_owned(),
        reason: format!("exporter.{key}: {e}"),
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut identity = None;
    if tls {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        roots.add_parsable_certificates(native_roots());
        if let Some(pem) = cfg.tls.ca_pem(endpoint)? {
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| tls_error("ca_file", &e))?;
                roots.add(cert).map_err(|e| tls_error("ca_file", &e))?;
            }
        }
        if let Some((cert, key)) = cfg.tls.identity_pem(endpoint)? {
            let chain = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_error("client_cert_file", &e))?;
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| tls_error("client_key_file", &e))?;
            identity = Some((chain, key));
        }
    }
    // ring explicitly: another dependency enabling aws-lc-rs must not make rustls ambiguous.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TransportError::Tls {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_error("client_cert_file", &e)),
        None => Ok(builder.with_no_client_auth()),
    }
}

fn native_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    if !found.errors.is_empty() {
        tracing::debug!(errors = ?found.errors, "some system CA certificates could not be loaded");
    }
    found.certs
}

/// Level 1: on OTLP spans it costs about a quarter of zlib's default level (6) and the body is
/// a few percent larger (`cargo bench -p tailgate --bench export`); compression is the largest
/// per-span cost of an export, and the collector runs on the senders' machines.
pub(crate) const GZIP_LEVEL: u32 = 1;

fn gzip(body: &[u8]) -> std::io::Result<Bytes> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::new(GZIP_LEVEL),
    );
    encoder.write_all(body)?;
    Ok(Bytes::from(encoder.finish()?))
}

// ---------------------------------------------------------------------------------------------
// gRPC: codec and classification
// ---------------------------------------------------------------------------------------------

/// Sends the caller's bytes as the message verbatim (they already are an encoded
/// `ExportTraceServiceRequest`) and decodes the reply. A reply that does not decode is handed up
/// as an error value rather than a `Status`, because the export itself succeeded.
#[derive(Debug, Clone, Copy, Default)]
struct RawRequestCodec;

struct RawEncoder;
struct ReplyDecoder;

impl Codec for RawRequestCodec {
    type Encode = Bytes;
    type Decode = Result<ExportTraceServiceResponse, prost::DecodeError>;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReplyDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for ReplyDecoder {
    type Item = Result<ExportTraceServiceResponse, prost::DecodeError>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        Ok(Some(ExportTraceServiceResponse::decode(src)))
    }
}

/// The delay of a `google.rpc.RetryInfo` inside serialized `google.rpc.Status` details.
/// Anything malformed or negative counts as no delay requested.
pub(crate) fn grpc_retry_delay(details: &[u8]) -> Option<Duration> {
    if details.is_empty() {
        return None;
    }
    let status = RpcStatus::decode(details).ok()?;
    status
        .details
        .iter()
        .filter(|any| any.type_url.ends_with("google.rpc.RetryInfo"))
        .find_map(|any| RetryInfo::decode(any.value.as_slice()).ok()?.retry_delay)
        .and_then(|d| {
            let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
            Some(Duration::new(u64::try_from(d.seconds).ok()?, nanos))
        })
}

/// OTLP spec, "OTLP/gRPC Response" / "Failures": which codes may be retried.
fn classify_grpc(status: &Status, endpoint: &str) -> SendError {
    let after = grpc_retry_delay(status.details());
    let message = describe_status(status, endpoint);
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => SendError::Retryable { message, after },
        // Only a server that says when to come back expects us to.
        Code::ResourceExhausted if after.is_some() => SendError::Retryable { message, after },
        // tonic attaches a source only to statuses it made up from a local or connection
        // failure (a reset stream, a dropped connection); a server's own status never has one.
        // Such a failure says nothing about the data, so it is treated like a failed connect.
        _ if status.source().is_some() => SendError::Retryable {
            message,
            after: None,
        },
        _ => SendError::Permanent { message },
    }
}

fn describe_status(status: &Status, endpoint: &str) -> String {
    let mut message = format!("gRPC {:?} from {endpoint}", status.code());
    if !status.message().is_empty() {
        message.push_str(": ");
        message.push_str(&truncate_chars(status.message()));
    }
    let mut source = status.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

// ---------------------------------------------------------------------------------------------
// HTTP: classification
// ---------------------------------------------------------------------------------------------

/// What classification needs from a response's status line and headers.
struct ReplyHead {
    status: StatusCode,
    retry_after: Option<Duration>,
    content_type: Option<String>,
    /// Redirects are not followed (the body would go somewhere the operator did not configure);
    /// naming the target lets them fix the endpoint instead.
    location: Option<String>,
}

impl ReplyHead {
    fn of<B>(response: &http::Response<B>) -> Self {
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        Self {
            status: response.status(),
            retry_after: header(RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now())),
            content_type: header(CONTENT_TYPE).map(str::to_owned),
            location: header(LOCATION).map(truncate_chars),
        }
    }
}

/// OTLP spec, "OTLP/HTTP Response" / "Retryable Response Codes": 429, 502, 503, 504 only.
fn classify_http(head: &ReplyHead, body: Result<Bytes, String>, endpoint: &str) -> SendError {
    let mut message = format!("HTTP {} from {endpoint}", head.status);
    if let Some(location) = &head.location {
        message.push_str(" (redirects to ");
        message.push_str(location);
        message.push(')');
    }
    match body {
        Ok(body) => {
            if let Some(reason) = describe_http_body(head.content_type.as_deref(), &body) {
                message.push_str(": ");
                message.push_str(&reason);
            }
        }
        Err(e) => {
            message.push_str(": (response body unreadable: ");
            message.push_str(&e);
            message.push(')');
        }
    }
    match head.status.as_u16() {
        429 | 502 | 503 | 504 => SendError::Retryable {
            message,
            after: head.retry_after,
        },
        _ => SendError::Permanent { message },
    }
}

/// The server's explanation: the `google.rpc.Status` message the spec says an OTLP server
/// sends, else (a proxy's HTML or JSON page) a cleaned-up snippet of the body.
fn describe_http_body(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    let ct = content_type.map(str::to_ascii_lowercase);
    let protobuf = ct.as_deref().is_some_and(|ct| {
        ct.starts_with(PROTOBUF_CONTENT_TYPE) || ct.starts_with("application/protobuf")
    });
    // Without a content type it may still be protobuf; one with a non-empty message is
    // unlikely to be an accident of decoding text.
    if (protobuf || ct.is_none())
        && let Ok(status) = RpcStatus::decode(body)
        && !status.message.is_empty()
    {
        return Some(truncate_chars(&status.message));
    }
    Some(snippet(body))
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let cleaned: String = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    truncate_chars(&cleaned)
}

fn truncate_chars(text: &str) -> String {
    match text.char_indices().nth(MAX_REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date. A date in the past means
/// "now"; anything unparsable means the server asked for nothing.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Retry
// ---------------------------------------------------------------------------------------------

/// Send with retries.
///
/// After a retryable error the next attempt waits `max(server-requested delay, backoff)`, where
/// backoff starts at `initial_backoff`, is multiplied by `multiplier` after each retry, and is
/// jittered by ±50 % and then capped at `max_backoff` (exporterhelper lets the jitter exceed the
/// cap; we do not). A server-requested delay is honoured even beyond `max_backoff`. Retrying
/// stops, returning the last error, when the next attempt would start more than `max_elapsed`
/// after the first one, or after `deadline`. Permanent errors return at once. `on_retry` is
/// called once per scheduled retry with the error that caused it, before the wait so that a log
/// shows the failure when it happens; if the deadline then cuts that wait short, that error is
/// what is returned and no further attempt is made.
///
/// `deadline` is an absolute cut-off for shutdown: no wait ends past it, and an attempt still
/// running at it is abandoned (returned as a retryable error; whether it arrived is unknown).
/// For a deadline that is only known once shutdown begins, see [`send_with_retry_until`].
pub(crate) async fn send_with_retry(
    transport: &Transport,
    body: Bytes,
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    on_retry: impl FnMut(&SendError),
) -> Result<Delivered, SendError> {
    // Kept alive for the whole call so the receiver never sees a closed channel.
    let (_keep, mut rx) = watch::channel(deadline);
    send_with_retry_until(transport, body, policy, &mut rx, on_retry).await
}

/// [`send_with_retry`] with a deadline that may be set or moved while retrying: the exporter
/// publishes `Some(drain deadline)` when shutdown begins (`Some(Instant::now())` to stop at
/// once), which cuts a long backoff short instead of letting shutdown wait for it. A dropped
/// sender leaves the last published deadline in force.
pub(crate) async fn send_with_retry_until(
    transport: &Transport,
    body: Bytes,
    policy: &RetryPolicy,
    deadline: &mut watch::Receiver<Option<Instant>>,
    mut on_retry: impl FnMut(&SendError),
) -> Result<Delivered, SendError> {
    let start = Instant::now();
    let prepared = transport.prepare(body).await?;
    let multiplier = policy.multiplier.max(1.0); // also maps NaN to 1
    let mut backoff = policy.initial_backoff.min(policy.max_backoff);
    loop {
        let result = tokio::select! {
            r = transport.attempt(&prepared) => r,
            () = reached(deadline) => Err(SendError::Retryable {
                message: format!(
                    "attempt to {} abandoned at the shutdown deadline",
                    transport.endpoint()
                ),
                after: None,
            }),
        };
        let error = match result {
            Ok(delivered) => return Ok(delivered),
            Err(e @ SendError::Permanent { .. }) => return Err(e),
            Err(e) => e,
        };
        let wait = jittered(backoff, policy.max_backoff)
            .max(error.retry_after().unwrap_or(Duration::ZERO));
        let next_at = Instant::now() + wait;
        if next_at.duration_since(start) > policy.max_elapsed {
            return Err(error);
        }
        on_retry(&error);
        tracing::debug!(endpoint = transport.endpoint(), ?wait, error = %error, "retrying export");
        if !wait_until(next_at, deadline).await {
            return Err(error);
        }
        backoff = Duration::try_from_secs_f64(backoff.as_secs_f64() * multiplier)
            .unwrap_or(policy.max_backoff)
            .min(policy.max_backoff);
    }
}

/// Sleeps until `at`; false (at once) as soon as a deadline before `at` is known.
async fn wait_until(at: Instant, deadline: &mut watch::Receiver<Option<Instant>>) -> bool {
    loop {
        // Copied out: a watch borrow must not live across an await.
        let current = *deadline.borrow_and_update();
        if current.is_some_and(|d| at > d) {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep_until(at) => return true,
            changed = deadline.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(at).await;
                    return true;
                }
            }
        }
    }
}

/// Completes when the (possibly still moving) deadline has passed; never if there is none.
async fn reached(deadline: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let current = *deadline.borrow_and_update();
        let changed = async {
            if deadline.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        match current {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => return,
                () = changed => {}
            },
            None => changed.await,
        }
    }
}

fn jittered(backoff: Duration, max: Duration) -> Duration {
    let factor = 1.0 + RANDOMIZATION_FACTOR * (2.0 * unit_random() - 1.0);
    Duration::try_from_secs_f64(backoff.as_secs_f64() * factor)
        .unwrap_or(max)
        .min(max)
}

/// Uniform in [0, 1). `RandomState` is seeded from OS entropy: plenty to keep exporters that
/// failed together from retrying in lockstep, without a dependency for it.
fn unit_random() -> f64 {
    let bits = RandomState::new().hash_one(std::time::Instant::now()) >> 11; // 53 bits: an f64 mantissa
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::State;
    use axum::routing::post;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest,
    };
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::otlp::{ProtoAny, ProtoDuration};

    fn sample_request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![7; 16],
                        span_id: vec![9; 8],
                        name: "checkout".into(),
                        start_time_unix_nano: 1_700_000_000_000_000_000,
                        end_time_unix_nano: 1_700_000_000_500_000_000,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn sample_body() -> Bytes {
        Bytes::from(sample_request().encode_to_vec())
    }

    fn fast_policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_elapsed: Duration::from_secs(10),
            multiplier: 1.5,
        }
    }

    fn config(protocol: Protocol, endpoint: String) -> TransportConfig {
        TransportConfig {
            protocol,
            signal: Signal::Traces,
            endpoint,
            headers: vec![("X-Honeycomb-Team".into(), "secret-key".into())],
            gzip: false,
            timeout: Duration::from_secs(5),
            tls: ClientTls::default(),
        }
    }

    fn retry_info_details(code: Code, delay: Duration) -> Bytes {
        let retry_info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: i64::try_from(delay.as_secs()).expect("small delay"),
                nanos: i32::try_from(delay.subsec_nanos()).expect("nanos fit"),
            }),
        };
        let status = RpcStatus {
            code: code as i32,
            message: "slow down".into(),
            details: vec![
                // An unrelated detail first: the parser must look past it.
                ProtoAny {
                    type_url: "type.googleapis.com/google.rpc.DebugInfo".into(),
                    value: vec![1, 2, 3],
                },
                ProtoAny {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: retry_info.encode_to_vec(),
                },
            ],
        };
        Bytes::from(status.encode_to_vec())
    }

    struct TestServer {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl TestServer {
        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let _ = self.task.await;
        }
    }

    // ---- gRPC sink ----------------------------------------------------------------------------

    type GrpcCalls = Arc<Mutex<Vec<(ExportTraceServiceRequest, MetadataMap)>>>;
    type GrpcReply = Box<dyn Fn(usize) -> Result<ExportTraceServiceResponse, Status> + Send + Sync>;

    struct GrpcSink {
        calls: GrpcCalls,
        reply: GrpcReply,
    }

    #[tonic::async_trait]
    impl TraceService for GrpcSink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
            let metadata = request.metadata().clone();
            let n = {
                let mut calls = self.calls.lock().expect("lock");
                calls.push((request.into_inner(), metadata));
                calls.len()
            };
            (self.reply)(n).map(tonic::Response::new)
        }
    }

    /// `reply(n)` answers the n-th call (1-based).
    async fn grpc_sink(
        reply: impl Fn(usize) -> Result<ExportTraceServiceResponse, Status> + Send + Sync + 'static,
    ) -> (TestServer, GrpcCalls) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = GrpcCalls::default();
        let sink = GrpcSink {
            calls: calls.clone(),
            reply: Box::new(reply),
        };
        let service = TraceServiceServer::new(sink).accept_compressed(CompressionEncoding::Gzip);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(
                    service,
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        (
            TestServer {
                addr,
                stop: Some(tx),
                task,
            },
            calls,
        )
    }

    fn grpc_transport(addr: SocketAddr, gzip: bool) -> Transport {
        let mut cfg = config(Protocol::Grpc, format!("http://{addr}"));
        cfg.gzip = gzip;
        Transport::new(cfg).expect("transport")
    }

    #[tokio::test]
    async fn grpc_unavailable_with_retry_info_is_retried_after_the_requested_delay() {
        let delay = Duration::from_millis(200);
        let (server, calls) = grpc_sink(move |n| {
            if n <= 2 {
                Err(Status::with_details(
                    Code::Unavailable,
                    "backend warming up",
                    retry_info_details(Code::Unavailable, delay),
                ))
            } else {
                Ok(ExportTraceServiceResponse::default())
            }
        })
        .await;
        let transport = grpc_transport(server.addr, false);

        let mut retries = Vec::new();
        let start = Instant::now();
        let result = send_with_retry(&transport, sample_body(), &fast_policy(), None, |e| {
            retries.push(e.clone())
        })
        .await;
        let elapsed = start.elapsed();

        assert_eq!(result.expect("delivered"), Delivered::default());
        assert_eq!(retries.len(), 2);
        for e in &retries {
            assert!(e.is_retryable());
            assert_eq!(e.retry_after(), Some(delay));
            assert!(
                e.message().contains("Unavailable") && e.message().contains("backend warming up"),
                "{e}"
            );
        }
        assert!(
            elapsed >= delay * 2,
            "two waits of the RetryInfo delay, took {elapsed:?}"
        );
        let calls = calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 3);
        for (request, metadata) in &calls {
            assert_eq!(request, &sample_request());
            assert_eq!(
                metadata
                    .get("x-honeycomb-team")
                    .and_then(|v| v.to_str().ok()),
                Some("secret-key")
            );
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn grpc_invalid_argument_is_permanent_and_not_retried() {
        let (server, calls) =
            grpc_sink(|_| Err(Status::invalid_argument("trace_id must be 16 bytes"))).await;
        let transport = grpc_transport(server.addr, false);
        let mut retries = 0;
        let result = send_with_retry(&transport, sample_body(), &fast_policy(), None, |_| {
            retries += 1
        })
        .await;
        let err = result.expect_err("permanent");
        assert!(!err.is_retryable(), "{err:?}");
        assert!(
            err.message().contains("InvalidArgument")
                && err.message().contains("trace_id must be 16 bytes"),
            "{err}"
        );
        assert_eq!(retries, 0);
        assert_eq!(calls.lock().expect("lock").len(), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn grpc_resource_exhausted_is_retryable_only_with_retry_info() {
        let (server, calls) = grpc_sink(|n| {
            if n == 1 {
                Err(Status::resource_exhausted("quota exceeded for good"))
            } else {
                Err(Status::with_details(
                    Code::ResourceExhausted,
                    "rate limited",
                    retry_info_details(Code::ResourceExhausted, Duration::from_millis(1500)),
                ))
            }
        })
        .await;
        let transport = grpc_transport(server.addr, false);

        let without = transport.send(sample_body()).await.expect_err("error");
        assert!(
            matches!(without, SendError::Permanent { .. }),
            "{without:?}"
        );
        assert!(without.message().contains("quota exceeded for good"));

        let with = transport.send(sample_body()).await.expect_err("error");
        assert!(with.is_retryable(), "{with:?}");
        assert_eq!(with.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(calls.lock().expect("lock").len(), 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn grpc_partial_success_is_reported() {
        let (server, _calls) = grpc_sink(|_| {
            Ok(ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans: 3,
                    error_message: "3 spans older than the retention window".into(),
                }),
            })
        })
        .await;
        let transport = grpc_transport(server.addr, false);
        let delivered = transport.send(sample_body()).await.expect("delivered");
        assert_eq!(
            delivered,
            Delivered {
                rejected_spans: 3,
                message: "3 spans older than the retention window".into()
            }
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn grpc_gzip_request_arrives_intact() {
        let (server, calls) = grpc_sink(|_| Ok(ExportTraceServiceResponse::default())).await;
        let transport = grpc_transport(server.addr, true);
        transport.send(sample_body()).await.expect("delivered");
        let calls = calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, sample_request());
        assert_eq!(
            calls[0]
                .1
                .get("grpc-encoding")
                .and_then(|v| v.to_str().ok()),
            Some("gzip")
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn grpc_deadline_cuts_a_long_server_requested_wait_short() {
        let (server, calls) = grpc_sink(|_| {
            Err(Status::with_details(
                Code::Unavailable,
                "down for maintenance",
                retry_info_details(Code::Unavailable, Duration::from_secs(30)),
            ))
        })
        .await;
        let transport = grpc_transport(server.addr, false);
        let start = Instant::now();
        let mut retries = 0;
        let deadline = Some(start + Duration::from_millis(300));
        let err = send_with_retry(&transport, sample_body(), &fast_policy(), deadline, |_| {
            retries += 1
        })
        .await
        .expect_err("gives up");
        assert!(
            err.message().contains("down for maintenance"),
            "the last error is returned: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(retries, 0);
        assert_eq!(calls.lock().expect("lock").len(), 1);
        server.stop().await;
    }

    // ---- HTTP sink ----------------------------------------------------------------------------

    type HttpCalls = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;
    type HttpReply = Arc<dyn Fn(usize) -> axum::response::Response + Send + Sync>;

    #[derive(Clone)]
    struct HttpSink {
        calls: HttpCalls,
        reply: HttpReply,
    }

    async fn http_handler(
        State(sink): State<HttpSink>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        let n = {
            let mut calls = sink.calls.lock().expect("lock");
            calls.push((headers, body));
            calls.len()
        };
        (sink.reply)(n)
    }

    async fn http_sink(
        reply: impl Fn(usize) -> axum::response::Response + Send + Sync + 'static,
    ) -> (TestServer, HttpCalls) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = HttpCalls::default();
        let sink = HttpSink {
            calls: calls.clone(),
            reply: Arc::new(reply),
        };
        let app = axum::Router::new()
            .route("/v1/traces", post(http_handler))
            .with_state(sink);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        (
            TestServer {
                addr,
                stop: Some(tx),
                task,
            },
            calls,
        )
    }

    fn response(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> axum::response::Response {
        let mut builder = http::Response::builder().status(status);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder
            .body(axum::body::Body::from(body))
            .expect("test response")
    }

    fn http_transport(addr: SocketAddr, gzip: bool) -> Transport {
        let mut cfg = config(Protocol::HttpProtobuf, format!("http://{addr}"));
        cfg.gzip = gzip;
        Transport::new(cfg).expect("transport")
    }

    #[tokio::test]
    async fn http_503_with_retry_after_is_retried_after_that_delay() {
        let (server, calls) = http_sink(|n| {
            if n == 1 {
                response(503, &[("retry-after", "1")], Vec::new())
            } else {
                response(200, &[], Vec::new())
            }
        })
        .await;
        let transport = http_transport(server.addr, false);
        let mut retries = Vec::new();
        let start = Instant::now();
        let delivered = send_with_retry(&transport, sample_body(), &fast_policy(), None, |e| {
            retries.push(e.clone())
        })
        .await
        .expect("delivered");
        assert_eq!(delivered, Delivered::default());
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(retries.len(), 1);
        assert_eq!(retries[0].retry_after(), Some(Duration::from_secs(1)));
        assert!(retries[0].message().contains("503"), "{}", retries[0]);
        assert_eq!(calls.lock().expect("lock").len(), 2);
        server.stop().await;
    }

    #[tokio::test]
    async fn http_400_is_permanent_and_carries_the_servers_status_message() {
        let status = RpcStatus {
            code: 3,
            message: "span 7 has an invalid trace id".into(),
            details: vec![],
        };
        let body = status.encode_to_vec();
        let (server, calls) = http_sink(move |_| {
            response(
                400,
                &[("content-type", "application/x-protobuf")],
                body.clone(),
            )
        })
        .await;
        let transport = http_transport(server.addr, false);
        let mut retries = 0;
        let err = send_with_retry(&transport, sample_body(), &fast_policy(), None, |_| {
            retries += 1
        })
        .await
        .expect_err("permanent");
        assert!(matches!(err, SendError::Permanent { .. }), "{err:?}");
        assert!(
            err.message().contains("400")
                && err.message().contains("span 7 has an invalid trace id"),
            "{err}"
        );
        assert_eq!(retries, 0);
        assert_eq!(calls.lock().expect("lock").len(), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn http_error_page_becomes_a_trimmed_snippet() {
        let page = format!(
            "<html>\n<body>\tUnauthorized: bad API key {}</body></html>",
            "x".repeat(2000)
        );
        let (server, _calls) = http_sink(move |_| {
            response(
                401,
                &[("content-type", "text/html")],
                page.clone().into_bytes(),
            )
        })
        .await;
        let err = http_transport(server.addr, false)
            .send(sample_body())
            .await
            .expect_err("error");
        assert!(matches!(err, SendError::Permanent { .. }), "{err:?}");
        assert!(
            err.message().contains("401") && err.message().contains("<html> <body> Unauthorized"),
            "{err}"
        );
        assert!(
            err.message().chars().count() < MAX_REASON_CHARS + 200,
            "{}",
            err.message().len()
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn http_partial_success_and_headers() {
        let reply = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 2,
                error_message: "too big".into(),
            }),
        }
        .encode_to_vec();
        let (server, calls) = http_sink(move |_| {
            response(
                200,
                &[("content-type", "application/x-protobuf")],
                reply.clone(),
            )
        })
        .await;
        let delivered = http_transport(server.addr, false)
            .send(sample_body())
            .await
            .expect("delivered");
        assert_eq!(
            delivered,
            Delivered {
                rejected_spans: 2,
                message: "too big".into()
            }
        );
        let calls = calls.lock().expect("lock").clone();
        let (headers, body) = &calls[0];
        assert_eq!(body, &sample_body());
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/x-protobuf")
        );
        assert_eq!(
            headers
                .get("x-honeycomb-team")
                .and_then(|v| v.to_str().ok()),
            Some("secret-key")
        );
        assert!(headers.get("content-encoding").is_none());
        server.stop().await;
    }

    #[tokio::test]
    async fn http_gzip_body_decompresses_to_the_sent_bytes() {
        let (server, calls) = http_sink(|_| response(200, &[], Vec::new())).await;
        http_transport(server.addr, true)
            .send(sample_body())
            .await
            .expect("delivered");
        let calls = calls.lock().expect("lock").clone();
        let (headers, body) = &calls[0];
        assert_eq!(
            headers
                .get("content-encoding")
                .and_then(|v| v.to_str().ok()),
            Some("gzip")
        );
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body.as_ref()), &mut plain)
            .expect("gzip");
        assert_eq!(plain, sample_body());
        server.stop().await;
    }

    #[tokio::test]
    async fn http_retry_after_as_a_date_is_reported() {
        let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
        let (server, _calls) =
            http_sink(move |_| response(429, &[("retry-after", &at)], Vec::new())).await;
        let err = http_transport(server.addr, false)
            .send(sample_body())
            .await
            .expect_err("throttled");
        let after = err.retry_after().expect("delay");
        // HTTP dates have whole-second resolution.
        assert!(
            after > Duration::from_secs(1) && after <= Duration::from_secs(3),
            "{after:?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn max_elapsed_stops_retrying() {
        let (server, calls) = http_sink(|_| response(503, &[], b"overloaded".to_vec())).await;
        let transport = http_transport(server.addr, false);
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            max_elapsed: Duration::from_millis(150),
            multiplier: 2.0,
        };
        let mut retries = 0;
        let start = Instant::now();
        let err = send_with_retry(&transport, sample_body(), &policy, None, |_| retries += 1)
            .await
            .expect_err("gives up");
        let elapsed = start.elapsed();
        assert!(
            err.is_retryable()
                && err.message().contains("503")
                && err.message().contains("overloaded"),
            "{err}"
        );
        let calls = calls.lock().expect("lock").len();
        assert!(calls >= 3, "retried within the budget: {calls} calls");
        assert_eq!(retries, calls - 1);
        assert!(
            elapsed <= Duration::from_millis(150) + Duration::from_millis(500),
            "{elapsed:?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn a_deadline_published_during_backoff_stops_the_wait() {
        let (server, calls) =
            http_sink(|_| response(503, &[("retry-after", "30")], Vec::new())).await;
        let transport = http_transport(server.addr, false);
        let (tx, mut rx) = watch::channel(None);
        let start = Instant::now();
        // A budget far beyond the 30 s asked for, so only the deadline can end the wait.
        let policy = RetryPolicy {
            max_elapsed: Duration::from_secs(300),
            ..fast_policy()
        };
        let waiter = tokio::spawn(async move {
            let mut retries = 0;
            let r = send_with_retry_until(&transport, sample_body(), &policy, &mut rx, |_| {
                retries += 1
            })
            .await;
            (r, retries)
        });
        while calls.lock().expect("lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send_replace(Some(Instant::now()));
        let (result, retries) = waiter.await.expect("join");
        assert!(result.expect_err("last error").message().contains("503"));
        assert_eq!(retries, 1);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        server.stop().await;
    }

    // ---- connection failures -------------------------------------------------------------------

    async fn unused_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn connection_refused_is_retryable_for_both_protocols() {
        let addr = unused_port().await;
        for transport in [grpc_transport(addr, false), http_transport(addr, true)] {
            let err = transport.send(sample_body()).await.expect_err("refused");
            assert!(err.is_retryable(), "{err:?}");
            assert!(
                err.message().contains(&addr.to_string()),
                "names the endpoint: {err}"
            );
        }
    }

    /// Accepts connections and never answers; returns the address and a task to abort.
    async fn silent_server(close_at_once: bool) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                if !close_at_once {
                    held.push(socket);
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_silent_server_hits_the_per_attempt_timeout() {
        let (addr, task) = silent_server(false).await;
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let mut cfg = config(protocol, format!("http://{addr}"));
            cfg.timeout = Duration::from_millis(200);
            let start = Instant::now();
            let err = Transport::new(cfg)
                .expect("transport")
                .send(sample_body())
                .await
                .expect_err("timeout");
            assert!(err.is_retryable(), "{err:?}");
            // tonic enforces the grpc-timeout we send, so for gRPC it may be its timer that fires.
            assert!(err.message().to_lowercase().contains("timeout"), "{err}");
            assert!(start.elapsed() < Duration::from_secs(2));
        }
        task.abort();
    }

    #[tokio::test]
    async fn the_deadline_abandons_an_attempt_in_flight() {
        let (addr, task) = silent_server(false).await;
        let transport = Transport::new(config(Protocol::HttpProtobuf, format!("http://{addr}")))
            .expect("transport");
        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(200));
        let err = send_with_retry(&transport, sample_body(), &fast_policy(), deadline, |_| {})
            .await
            .expect_err("abandoned");
        assert!(
            err.is_retryable() && err.message().contains("shutdown deadline"),
            "{err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        task.abort();
    }

    #[tokio::test]
    async fn https_endpoints_build_and_a_failed_handshake_is_retryable() {
        let (addr, task) = silent_server(true).await;
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let mut cfg = config(protocol, format!("https://{addr}"));
            cfg.timeout = Duration::from_secs(2);
            let err = Transport::new(cfg)
                .expect("TLS set up")
                .send(sample_body())
                .await
                .expect_err("no TLS there");
            assert!(err.is_retryable(), "{err:?}");
        }
        task.abort();
    }

    // ---- configuration -------------------------------------------------------------------------

    #[tokio::test]
    async fn bad_configuration_is_rejected_with_the_culprit_named() {
        let bad = |protocol, endpoint: &str, headers: Vec<(String, String)>| {
            let mut cfg = config(protocol, endpoint.into());
            cfg.headers = headers;
            Transport::new(cfg).expect_err("invalid").to_string()
        };
        let e = bad(Protocol::Grpc, "localhost:4317", vec![]);
        assert!(e.contains("localhost:4317") && e.contains("http://"), "{e}");
        let e = bad(Protocol::HttpProtobuf, "not a url", vec![]);
        assert!(e.contains("not a url"), "{e}");
        let e = bad(Protocol::Grpc, "http://collector:4317/v1/traces", vec![]);
        assert!(e.contains("path"), "{e}");
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let e = bad(
                protocol,
                "http://collector:4317",
                vec![("bad name".into(), "secret-1".into())],
            );
            assert!(e.contains("bad name") && !e.contains("secret-1"), "{e}");
            let e = bad(
                protocol,
                "http://collector:4317",
                vec![("api-key".into(), "secret-2\n".into())],
            );
            assert!(e.contains("api-key") && !e.contains("secret-2"), "{e}");
        }
        let mut cfg = config(Protocol::Grpc, "http://collector:4317".into());
        cfg.timeout = Duration::ZERO;
        assert!(matches!(
            Transport::new(cfg),
            Err(TransportError::Timeout(_))
        ));
    }

    #[test]
    fn new_outside_a_runtime_is_an_error_not_a_panic() {
        let r = Transport::new(config(Protocol::Grpc, "http://collector:4317".into()));
        assert!(matches!(r, Err(TransportError::NoRuntime)));
    }

    #[tokio::test]
    async fn http_endpoint_gets_the_traces_path_only_when_it_has_none() {
        let resolved = |endpoint: &str| {
            let t =
                Transport::new(config(Protocol::HttpProtobuf, endpoint.into())).expect("transport");
            match &t.inner.wire {
                Wire::Http { uri, .. } => (uri.to_string(), t.endpoint().to_owned()),
                Wire::Grpc { .. } => unreachable!("HTTP transport"),
            }
        };
        assert_eq!(resolved("http://c:4318").0, "http://c:4318/v1/traces");
        assert_eq!(resolved("http://c:4318/").0, "http://c:4318/v1/traces");
        assert_eq!(
            resolved("https://api.honeycomb.io").0,
            "https://api.honeycomb.io/v1/traces"
        );
        assert_eq!(
            resolved("http://c:4318/otlp/v1/traces").0,
            "http://c:4318/otlp/v1/traces"
        );
        let (uri, shown) = resolved("http://c:4318?token=abc");
        assert_eq!(uri, "http://c:4318/v1/traces?token=abc");
        assert_eq!(
            shown, "http://c:4318/v1/traces",
            "the query stays out of messages"
        );
        let metrics = Transport::new(TransportConfig {
            signal: Signal::Metrics,
            ..config(Protocol::HttpProtobuf, "http://c:4318".into())
        })
        .expect("transport");
        assert_eq!(metrics.endpoint(), "http://c:4318/v1/metrics");
        let g = Transport::new(config(Protocol::Grpc, "http://c:4317".into())).expect("transport");
        assert_eq!(g.endpoint(), "http://c:4317");
        assert!(!format!("{g:?}").contains("secret-key"));
        assert!(
            !format!("{:?}", config(Protocol::Grpc, "http://c:4317".into())).contains("secret-key")
        );
    }

    // ---- parsers and policy --------------------------------------------------------------------

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn retry_info_is_found_among_details_and_malformed_ones_are_ignored() {
        let d = retry_info_details(Code::Unavailable, Duration::from_millis(2500));
        assert_eq!(grpc_retry_delay(&d), Some(Duration::from_millis(2500)));
        assert_eq!(grpc_retry_delay(&[]), None);
        assert_eq!(grpc_retry_delay(&[0xff, 0xff, 0xff]), None);
        let negative = RpcStatus {
            code: 14,
            message: String::new(),
            details: vec![ProtoAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: RetryInfo {
                    retry_delay: Some(ProtoDuration {
                        seconds: -1,
                        nanos: 0,
                    }),
                }
                .encode_to_vec(),
            }],
        };
        assert_eq!(grpc_retry_delay(&negative.encode_to_vec()), None);
    }

    #[test]
    fn grpc_codes_follow_the_otlp_spec() {
        let retryable = [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unavailable,
            Code::DataLoss,
        ];
        for code in retryable {
            assert!(
                classify_grpc(&Status::new(code, "x"), "e").is_retryable(),
                "{code:?}"
            );
        }
        let permanent = [
            Code::Unknown,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::Internal,
            Code::Unauthenticated,
        ];
        for code in permanent {
            assert!(
                !classify_grpc(&Status::new(code, "x"), "e").is_retryable(),
                "{code:?}"
            );
        }
        // A status tonic made up from a broken connection is not the server's verdict.
        let local = Status::from_error(Box::new(std::io::Error::other(
            "connection reset mid-stream",
        )));
        assert_eq!(local.code(), Code::Unknown);
        let e = classify_grpc(&local, "http://c:4317");
        assert!(
            e.is_retryable() && e.message().contains("connection reset mid-stream"),
            "{e}"
        );
    }

    #[test]
    fn http_statuses_follow_the_otlp_spec() {
        let head = |code: u16| ReplyHead {
            status: StatusCode::from_u16(code).expect("status"),
            retry_after: Some(Duration::from_secs(7)),
            content_type: None,
            location: None,
        };
        for code in [429, 502, 503, 504] {
            let e = classify_http(&head(code), Ok(Bytes::new()), "e");
            assert_eq!(e.retry_after(), Some(Duration::from_secs(7)), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 405, 413, 415, 500, 501] {
            let e = classify_http(&head(code), Ok(Bytes::new()), "e");
            assert!(!e.is_retryable(), "{code}");
        }
        let e = classify_http(&head(502), Err("reset".into()), "e");
        assert!(
            e.message().contains("502") && e.message().contains("unreadable: reset"),
            "{e}"
        );
        let moved = ReplyHead {
            location: Some("https://new.example/v1/traces".into()),
            ..head(308)
        };
        let e = classify_http(&moved, Ok(Bytes::new()), "http://old.example/v1/traces");
        assert!(
            e.message()
                .contains("redirects to https://new.example/v1/traces"),
            "{e}"
        );
    }

    #[test]
    fn jitter_stays_within_half_the_backoff_and_under_the_cap() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_secs(2), Duration::from_secs(30));
            assert!(
                j >= Duration::from_secs(1) && j <= Duration::from_secs(3),
                "{j:?}"
            );
            assert!(
                jittered(Duration::from_secs(40), Duration::from_secs(30))
                    <= Duration::from_secs(30)
            );
        }
        let r: Vec<f64> = (0..100).map(|_| unit_random()).collect();
        assert!(r.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(
            r.iter().any(|x| *x < 0.5) && r.iter().any(|x| *x >= 0.5),
            "not constant"
        );
        assert_eq!(
            RetryPolicy::default(),
            RetryPolicy {
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(30),
                max_elapsed: Duration::from_secs(300),
                multiplier: 1.5,
            }
        );
    }

    #[tokio::test]
    async fn futures_are_send_so_callers_can_spawn_them() {
        fn assert_send<T: Send>(_: &T) {}
        let transport = grpc_transport(unused_port().await, false);
        let calls = AtomicUsize::new(0);
        let policy = fast_policy();
        let fut = send_with_retry(&transport, sample_body(), &policy, None, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
        });
        assert_send(&fut);
        assert_send(&transport.send(sample_body()));
        fn assert_clone_sync<T: Clone + Send + Sync>() {}
        assert_clone_sync::<Transport>();
    }
}
