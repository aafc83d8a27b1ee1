//! The OTLP exporters against real downstream receivers that fail: every kept span is
//! delivered once the backend recovers, none twice; a permanent error is counted, not retried.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::oneshot;

use crate::support::*;

/// What a downstream does with each request.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Unavailable until this instant, then OK.
    UnavailableUntil(Instant),
    /// Always a permanent error (gRPC INVALID_ARGUMENT, HTTP 400).
    Reject,
}

/// Span ids delivered, with how often each arrived, and request counts.
#[derive(Default)]
pub struct Received {
    pub spans: HashMap<Vec<u8>, usize>,
    /// `loadgen.seq` of the spans that have one, with how often each arrived.
    pub seqs: HashMap<u64, usize>,
    requests: usize,
    refused: usize,
}

#[derive(Clone)]
struct Downstream {
    behaviour: Behaviour,
    received: Arc<Mutex<Received>>,
}

impl Downstream {
    /// Ok(true) when the request is accepted; records it either way.
    fn handle(&self, request: &ExportTraceServiceRequest) -> Result<(), bool> {
        let mut r = self.received.lock().unwrap();
        r.requests += 1;
        let refuse = match self.behaviour {
            Behaviour::UnavailableUntil(t) => Instant::now() < t,
            Behaviour::Reject => true,
        };
        if refuse {
            r.refused += 1;
            return Err(matches!(self.behaviour, Behaviour::UnavailableUntil(_)));
        }
        for (_, span) in exported_spans(std::slice::from_ref(request)) {
            if let Some(seq) = tailgate::loadgen::seq_of(&span) {
                *r.seqs.entry(seq).or_default() += 1;
            }
            *r.spans.entry(span.span_id).or_default() += 1;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl TraceService for Downstream {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.handle(request.get_ref()) {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(true) => Err(tonic::Status::unavailable("backend warming up")),
            Err(false) => Err(tonic::Status::invalid_argument("backend rejects this data")),
        }
    }
}

async fn http_export(
    axum::extract::State(d): axum::extract::State<Downstream>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut out = HeaderMap::new();
    out.insert("content-type", "application/x-protobuf".parse().unwrap());
    let body = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        use std::io::Read;
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .unwrap();
        plain
    } else {
        body.to_vec()
    };
    let request =
        ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP from tailgate");
    match d.handle(&request) {
        Ok(()) => (
            StatusCode::OK,
            out,
            ExportTraceServiceResponse::default().encode_to_vec(),
        ),
        Err(true) => {
            out.insert("retry-after", "1".parse().unwrap());
            (StatusCode::SERVICE_UNAVAILABLE, out, Vec::new())
        }
        Err(false) => (StatusCode::BAD_REQUEST, out, Vec::new()),
    }
}

/// A running downstream; stopped when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Received>>,
    _stop: oneshot::Sender<()>,
}

pub async fn start_backend(grpc: bool, behaviour: Behaviour) -> Backend {
    let received = Arc::new(Mutex::new(Received::default()));
    let d = Downstream {
        behaviour,
        received: received.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    if grpc {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    TraceServiceServer::new(d)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
    } else {
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .with_state(d);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
    }
    Backend {
        addr,
        received,
        _stop: stop,
    }
}

fn exporter_config(grpc: bool, addr: SocketAddr) -> String {
    format!(
        "[buffer]\nroot_grace = \"100ms\"\n\n[exporter]\ntype = \"{}\"\nendpoint = \"http://{addr}\"\n\
         batch_timeout = \"50ms\"\nbatch_max_spans = 50\nretry_initial_backoff = \"200ms\"\n\
         retry_max_backoff = \"1s\"\nretry_max_elapsed = \"60s\"\n\n[exporter.headers]\nx-api-key = \"secret\"\n",
        if grpc { "otlp_grpc" } else { "otlp_http" }
    )
}

async fn send_traces(tg: &Tailgate, traces: u64, spans_per_trace: u64) {
    for t in 1..=traces {
        let spans: Vec<SpanSpec> = (1..=spans_per_trace)
            .map(|s| SpanSpec::new(t, t * 100 + s, if s == 1 { 0 } else { t * 100 + 1 }))
            .collect();
        let (code, _, _) = post(
            tg.http,
            "application/x-protobuf",
            None,
            request("svc", &spans).encode_to_vec(),
        )
        .await;
        assert_eq!(code, 200);
    }
}

async fn every_kept_span_is_delivered_once_after_unavailability(grpc: bool) {
    let backend = start_backend(
        grpc,
        Behaviour::UnavailableUntil(Instant::now() + Duration::from_secs(5)),
    )
    .await;
    let tg = Tailgate::start(&exporter_config(grpc, backend.addr));
    send_traces(&tg, 40, 5).await;

    let done = wait_for(Duration::from_secs(40), || {
        (backend.received.lock().unwrap().spans.len() == 200).then_some(())
    });
    let r = backend.received.lock().unwrap();
    assert!(done.is_some(), "delivered {} of 200 spans", r.spans.len());
    assert!(r.refused > 0, "the backend did refuse while unavailable");
    let twice: Vec<_> = r.spans.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{} spans delivered twice", twice.len());
    drop(r);
    // The backend counts a batch before its answer reaches tailgate, which counts it after.
    let m = wait_for(Duration::from_secs(10), || {
        let m = tg.metrics();
        (m.exported() == 200.0).then_some(m)
    });
    let m = m.expect("tailgate counts every delivered span as exported");
    assert!(m.sum("tailgate_export_retries_total", &[]) > 0.0);
    assert_eq!(m.sum("tailgate_export_failed_spans_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_backend_unavailable_for_5s_then_ok() {
    every_kept_span_is_delivered_once_after_unavailability(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_backend_503_with_retry_after_for_5s_then_ok() {
    every_kept_span_is_delivered_once_after_unavailability(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_400_is_counted_and_logged_not_retried() {
    for grpc in [false, true] {
        let backend = start_backend(grpc, Behaviour::Reject).await;
        let tg = Tailgate::start(&exporter_config(grpc, backend.addr));
        send_traces(&tg, 1, 4).await;
        let failed = wait_for(Duration::from_secs(15), || {
            let m = tg.metrics();
            (m.sum(
                "tailgate_export_failed_spans_total",
                &["reason=\"permanent_error\""],
            ) == 4.0)
                .then_some(m)
        });
        assert!(
            failed.is_some(),
            "the failed batch is counted (grpc={grpc})"
        );
        // Give a wrongly retrying exporter time to show itself.
        std::thread::sleep(Duration::from_millis(1500));
        let r = backend.received.lock().unwrap();
        assert_eq!(r.requests, 1, "sent once, never retried (grpc={grpc})");
        assert!(
            tg.log().iter().any(|l| l.contains("not retrying")),
            "the refusal is logged"
        );
        assert_eq!(tg.metrics().sum("tailgate_export_retries_total", &[]), 0.0);
    }
}
