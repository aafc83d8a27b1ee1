//! OTLP/HTTP receiver: `POST /v1/traces` and `POST /v1/metrics` (under
//! `receivers.http_path_prefix`) with a protobuf or JSON body, optionally gzip.
//!
//! The body is read as a stream and bounded after decompression: a small gzip body that would
//! expand past `max_request_size` is cut off while inflating, never held in memory whole.
//! Error bodies are `google.rpc.Status` in the request's own encoding, as OTLP asks.
//!
//! With `receivers.cors` set, tower-http's CORS layer answers browsers' preflights before the
//! handler (so a preflight needs no token) and adds the CORS headers to the responses of
//! allowed origins only.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http_body_util::BodyExt;
use prost::Message;

use super::admission::{Admission, Held, Over};
use super::auth::{Caller, Tokens};
use super::ingest::{Ingest, Refusal};
use super::metrics::ReceiverMetrics;
use crate::config::{CorsConfig, ReceiversConfig};
use crate::otlp::signal::Signal;
use crate::otlp::{RpcStatus, json};

#[derive(Clone)]
struct HttpState {
    ingest: Arc<Ingest>,
    metrics: Arc<ReceiverMetrics>,
    max_request_size: usize,
    retry_after: Duration,
    body_read_timeout: Duration,
    tokens: Option<Arc<Tokens>>,
    admission: Arc<Admission>,
}

pub(crate) fn router(
    ingest: Arc<Ingest>,
    metrics: Arc<ReceiverMetrics>,
    config: &ReceiversConfig,
    tokens: Option<Arc<Tokens>>,
    admission: Arc<Admission>,
) -> Router {
    let prefix = &config.http_path_prefix;
    let router = Router::new()
        .route(
            &format!("{prefix}{}", Signal::Traces.http_path()),
            any(|s, req| export(s, Signal::Traces, req)),
        )
        .route(
            &format!("{prefix}{}", Signal::Metrics.http_path()),
            any(|s, req| export(s, Signal::Metrics, req)),
        )
        .with_state(HttpState {
            ingest,
            metrics,
            max_request_size: config.max_request_size.bytes(),
            retry_after: config.retry_after.0,
            body_read_timeout: config.limits.body_read_timeout.0,
            tokens,
            admission,
        });
    match cors(&config.cors) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// The CORS layer `config` asks for; None while no origin is allowed.
fn cors(config: &CorsConfig) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if config.allowed_origins.is_empty() {
        return None;
    }
    let origins = config.allowed_origins.clone();
    let mut headers = vec![
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::AUTHORIZATION,
        header::HeaderName::from_static("x-requested-with"),
    ];
    // Checked when the config was read.
    headers.extend((config.allowed_headers.iter()).filter_map(|h| h.parse().ok()));
    let mut layer = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin
                .to_str()
                .is_ok_and(|o| origins.iter().any(|allowed| origin_matches(allowed, o)))
        }))
        .allow_methods([Method::POST])
        .allow_headers(headers);
    if let Some(max_age) = config.max_age {
        layer = layer.max_age(max_age.0);
    }
    Some(layer)
}

/// Whether `origin` is `allowed`: equal (case-insensitively), `"*"`, or under a wildcard
/// first label (`https://*.example.com` allows `https://a.example.com` and
/// `https://a.b.example.com`, not `https://example.com`).
fn origin_matches(allowed: &str, origin: &str) -> bool {
    if allowed == "*" || allowed.eq_ignore_ascii_case(origin) {
        return true;
    }
    let Some((prefix, suffix)) = allowed.split_once('*') else {
        return false;
    };
    origin.len() > prefix.len() + suffix.len()
        && origin[..prefix.len()].eq_ignore_ascii_case(prefix)
        && origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        && !origin[prefix.len()..origin.len() - suffix.len()].contains(['/', ':'])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// gRPC status codes used in `google.rpc.Status` bodies.
const INVALID_ARGUMENT: i32 = 3;
const DEADLINE_EXCEEDED: i32 = 4;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNIMPLEMENTED: i32 = 12;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

async fn export(State(s): State<HttpState>, signal: Signal, req: Request) -> Response {
    let encoding = content_type(req.headers());
    // Errors about the request itself answer in its encoding when we can tell it, else JSON.
    let reply_as = encoding.unwrap_or(Encoding::Json);
    if req.method() != Method::POST {
        s.metrics.request("http", "bad_method");
        let mut r = status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            reply_as,
            UNIMPLEMENTED,
            &format!("only POST is allowed on {}", signal.http_path()),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let mut tenant = None;
    if let Some(tokens) = &s.tokens {
        let authorization = req.headers().get(header::AUTHORIZATION);
        let caller = tokens.caller(authorization.map(HeaderValue::as_bytes));
        if let Some(Caller::Tenant(bound)) = &caller {
            tenant = Some(bound.clone());
        }
        if caller.is_none() {
            s.metrics.request("http", "unauthenticated");
            let mut r = status_response(
                StatusCode::UNAUTHORIZED,
                reply_as,
                UNAUTHENTICATED,
                "a bearer token listed in receivers.auth.tokens_file is required",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let Some(encoding) = encoding else {
        s.metrics.request("http", "unsupported_media_type");
        return status_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reply_as,
            INVALID_ARGUMENT,
            "Content-Type must be application/x-protobuf or application/json",
        );
    };
    let gzip = match content_encoding(req.headers()) {
        Ok(gzip) => gzip,
        Err(name) => {
            s.metrics.request("http", "unsupported_media_type");
            return status_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                encoding,
                INVALID_ARGUMENT,
                &format!("unsupported Content-Encoding {name:?}; use gzip or none"),
            );
        }
    };
    let mut held = s.admission.start();
    let body = read_body(req.into_body(), gzip, s.max_request_size, &mut held);
    let body = match tokio::time::timeout(s.body_read_timeout, body)
        .await
        .unwrap_or(Err(BodyError::TimedOut))
    {
        Ok(body) => body,
        Err(BodyError::TimedOut) => {
            s.metrics.request("http", "timed_out");
            return status_response(
                StatusCode::REQUEST_TIMEOUT,
                encoding,
                DEADLINE_EXCEEDED,
                &format!(
                    "the request body did not arrive within {} ms",
                    s.body_read_timeout.as_millis()
                ),
            );
        }
        Err(BodyError::TooLarge) => {
            s.metrics.request("http", "too_large");
            return status_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                encoding,
                RESOURCE_EXHAUSTED,
                &format!(
                    "request larger than {} bytes after decompression",
                    s.max_request_size
                ),
            );
        }
        Err(BodyError::Corrupt(why)) => {
            s.metrics.request("http", "malformed");
            return status_response(StatusCode::BAD_REQUEST, encoding, INVALID_ARGUMENT, &why);
        }
        Err(BodyError::Over(over)) => return over_budget(&s, encoding, over),
    };
    // What decoding will build: the spans copied out (and for JSON the decoded messages).
    let decoding = match encoding {
        Encoding::Protobuf => body.len(),
        Encoding::Json => body.len().saturating_mul(2),
    };
    if let Err(over) = held.grow(decoding) {
        // A request the shape checks refuse gets that answer, not a retry it cannot use.
        if over == Over::Now
            && encoding == Encoding::Protobuf
            && let Err(refusal) = s.ingest.check_signal_shape(signal, &body)
        {
            return refused(&s, encoding, refusal);
        }
        return over_budget(&s, encoding, over);
    }
    let (json, transport) = match encoding {
        Encoding::Protobuf => (false, "http_protobuf"),
        Encoding::Json => (true, "http_json"),
    };
    let result = s
        .ingest
        .accept(
            signal,
            bytes::Bytes::from(body),
            json,
            transport,
            tenant.as_deref(),
        )
        .await;
    match result {
        Ok(accepted) => {
            s.metrics.request("http", super::outcome(&accepted));
            let response = super::grpc::response_for(accepted);
            let body = match encoding {
                Encoding::Protobuf => response.encode_to_vec(),
                Encoding::Json => json::encode_response(&response).into_bytes(),
            };
            typed(StatusCode::OK, encoding, body)
        }
        Err(refusal) => refused(&s, encoding, refusal),
    }
}

/// The answer OTLP prescribes for a request that was not taken.
fn refused(s: &HttpState, encoding: Encoding, refusal: Refusal) -> Response {
    match refusal {
        Refusal::Malformed(why) => {
            s.metrics.request("http", "malformed");
            status_response(StatusCode::BAD_REQUEST, encoding, INVALID_ARGUMENT, &why)
        }
        Refusal::TooLarge(why) => {
            s.metrics.request("http", "too_large");
            status_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                encoding,
                RESOURCE_EXHAUSTED,
                &why,
            )
        }
        refusal @ (Refusal::Busy
        | Refusal::MetricsQueueFull
        | Refusal::ShuttingDown
        | Refusal::DiskFull(_)) => {
            let why = match &refusal {
                Refusal::Busy => "tailgate's trace buffer is full; retry later".to_owned(),
                Refusal::MetricsQueueFull => {
                    "tailgate's metrics queue is full; retry later".to_owned()
                }
                Refusal::DiskFull(why) => {
                    format!("tailgate's storage log is full ({why}); retry later")
                }
                _ => "tailgate is shutting down".to_owned(),
            };
            unavailable(s, encoding, &why)
        }
    }
}

/// 503 with `Retry-After`: OTLP's retryable answer.
fn unavailable(s: &HttpState, encoding: Encoding, why: &str) -> Response {
    s.metrics.request("http", "unavailable");
    let mut r = status_response(StatusCode::SERVICE_UNAVAILABLE, encoding, UNAVAILABLE, why);
    let secs = s.retry_after.as_secs().max(1);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// A request the in-flight budget cannot take: now (retryable), or ever (413).
fn over_budget(s: &HttpState, encoding: Encoding, over: Over) -> Response {
    let limit = s.admission.limit();
    match over {
        Over::Now => unavailable(
            s,
            encoding,
            &format!(
                "tailgate's receivers hold receivers.max_in_flight_bytes ({limit} bytes) of requests; retry later"
            ),
        ),
        Over::Never => {
            s.metrics.request("http", "too_large");
            status_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                encoding,
                RESOURCE_EXHAUSTED,
                &format!(
                    "decoding this request would take more than receivers.max_in_flight_bytes ({limit} bytes)"
                ),
            )
        }
    }
}

/// The media type, ignoring parameters such as `charset=utf-8`.
fn content_type(headers: &HeaderMap) -> Option<Encoding> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let media = value.split(';').next()?.trim();
    if media.eq_ignore_ascii_case("application/x-protobuf")
        || media.eq_ignore_ascii_case("application/protobuf")
    {
        Some(Encoding::Protobuf)
    } else if media.eq_ignore_ascii_case("application/json") {
        Some(Encoding::Json)
    } else {
        None
    }
}

/// Ok(true) for gzip, Ok(false) for none; Err names an encoding we do not accept.
fn content_encoding(headers: &HeaderMap) -> Result<bool, String> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let value = value.to_str().unwrap_or("").trim();
    if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
        Ok(true)
    } else if value.is_empty() || value.eq_ignore_ascii_case("identity") {
        Ok(false)
    } else {
        Err(value.to_owned())
    }
}

#[derive(Debug)]
enum BodyError {
    TooLarge,
    /// Not all there within `body_read_timeout`.
    TimedOut,
    Corrupt(String),
    /// The in-flight budget cannot hold it.
    Over(Over),
}

/// Reads the body, inflating gzip on the fly, and stops as soon as either the bytes on the
/// wire or the bytes after inflation pass `limit`, or what it holds passes the in-flight
/// budget (`held` grows with it).
async fn read_body(
    mut body: Body,
    gzip: bool,
    limit: usize,
    held: &mut Held,
) -> Result<Vec<u8>, BodyError> {
    let mut raw_len = 0usize;
    let sink = LimitedSink::new(limit, held);
    let mut out = if gzip {
        Sink::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink)))
    } else {
        Sink::Plain(sink)
    };
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| BodyError::Corrupt(format!("reading the request body: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        raw_len += chunk.len();
        if raw_len > limit {
            return Err(BodyError::TooLarge);
        }
        match &mut out {
            Sink::Gzip(inflater) => inflater
                .write_all(&chunk)
                .map_err(|e| inflate_error(inflater.get_ref(), e))?,
            Sink::Plain(sink) => sink.write_all(&chunk).map_err(|e| inflate_error(sink, e))?,
        }
    }
    match out {
        Sink::Gzip(mut inflater) => {
            inflater
                .try_finish()
                .map_err(|e| inflate_error(inflater.get_ref(), e))?;
            let sink = inflater
                .finish()
                .map_err(|e| BodyError::Corrupt(format!("invalid gzip body: {e}")))?;
            Ok(sink.buf)
        }
        Sink::Plain(sink) => Ok(sink.buf),
    }
}

/// Where a body's bytes go: straight into the bounded buffer, or through gzip into it.
enum Sink<'a> {
    Plain(LimitedSink<'a>),
    Gzip(Box<flate2::write::MultiGzDecoder<LimitedSink<'a>>>),
}

fn inflate_error(sink: &LimitedSink<'_>, e: io::Error) -> BodyError {
    if sink.exceeded {
        BodyError::TooLarge
    } else if let Some(over) = sink.over {
        BodyError::Over(over)
    } else {
        BodyError::Corrupt(format!("invalid gzip body: {e}"))
    }
}

/// Collects inflated bytes and refuses to grow past the limit or the in-flight budget.
struct LimitedSink<'a> {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
    held: &'a mut Held,
    over: Option<Over>,
}

impl<'a> LimitedSink<'a> {
    fn new(limit: usize, held: &'a mut Held) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            exceeded: false,
            held,
            over: None,
        }
    }
}

impl Write for LimitedSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("decompressed body exceeds the size limit"));
        }
        if let Err(over) = self.held.grow(data.len()) {
            self.over = Some(over);
            return Err(io::Error::other("the in-flight budget is spent"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn typed(code: StatusCode, encoding: Encoding, body: Vec<u8>) -> Response {
    let content_type = match encoding {
        Encoding::Protobuf => "application/x-protobuf",
        Encoding::Json => "application/json",
    };
    (
        code,
        [(header::CONTENT_TYPE, content_type)],
        Body::from(body),
    )
        .into_response()
}

fn status_response(code: StatusCode, encoding: Encoding, rpc_code: i32, message: &str) -> Response {
    let body = match encoding {
        Encoding::Protobuf => RpcStatus {
            code: rpc_code,
            message: message.to_owned(),
            details: Vec::new(),
        }
        .encode_to_vec(),
        Encoding::Json => json::encode_status(rpc_code, message).into_bytes(),
    };
    typed(code, encoding, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    #[test]
    fn an_origin_is_allowed_exactly_or_under_a_wildcard_label() {
        let cases = [
            ("https://app.example.com", "https://app.example.com", true),
            ("https://app.example.com", "HTTPS://APP.example.com", true),
            ("https://app.example.com", "http://app.example.com", false),
            (
                "https://app.example.com",
                "https://app.example.com:8443",
                false,
            ),
            ("https://*.example.com", "https://a.example.com", true),
            ("https://*.example.com", "https://a.b.example.com", true),
            ("https://*.example.com", "https://example.com", false),
            ("https://*.example.com", "https://.example.com", false),
            (
                "https://*.example.com",
                "https://evil.com:1/.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://a.example.com.evil.com",
                false,
            ),
            ("*", "http://anything:3000", true),
        ];
        for (allowed, origin, want) in cases {
            assert_eq!(
                origin_matches(allowed, origin),
                want,
                "{allowed} / {origin}"
            );
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn gzip_bomb_is_cut_off_at_the_limit() {
        let bomb = gzip(&vec![0u8; 50 << 20]);
        assert!(bomb.len() < 100 << 10);
        let err = read_body(Body::from(bomb), true, 1 << 20, &mut unbounded())
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TooLarge));
    }

    #[tokio::test]
    async fn gzip_within_the_limit_inflates_and_corrupt_gzip_is_an_error() {
        let data = b"hello otlp".repeat(100);
        let body = read_body(Body::from(gzip(&data)), true, 1 << 20, &mut unbounded())
            .await
            .unwrap();
        assert_eq!(body, data);
        let err = read_body(
            Body::from(b"not gzip at all".to_vec()),
            true,
            1 << 20,
            &mut unbounded(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BodyError::Corrupt(_)));
    }

    fn unbounded() -> Held {
        Admission::new(usize::MAX).start()
    }

    #[tokio::test]
    async fn a_body_is_charged_as_it_inflates_and_stops_at_the_budget() {
        let admission = Admission::new(64 << 10);
        let mut other = admission.start();
        other.grow(32 << 10).unwrap();
        let data = vec![7u8; 48 << 10];
        let mut held = admission.start();
        let err = read_body(Body::from(gzip(&data)), true, 1 << 20, &mut held)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::Over(Over::Now)), "{err:?}");
        drop((held, other));
        let mut held = admission.start();
        let body = read_body(Body::from(gzip(&data)), true, 1 << 20, &mut held)
            .await
            .unwrap();
        assert_eq!(body.len(), data.len());
        let mut held = admission.start();
        let err = read_body(Body::from(vec![0u8; 65 << 10]), false, 1 << 20, &mut held)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::Over(Over::Never)), "{err:?}");
    }

    #[test]
    fn content_type_accepts_parameters() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert_eq!(content_type(&h), Some(Encoding::Json));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/X-Protobuf"),
        );
        assert_eq!(content_type(&h), Some(Encoding::Protobuf));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(content_type(&h), None);
    }
}
