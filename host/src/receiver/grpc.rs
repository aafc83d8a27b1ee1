//! OTLP/gRPC receiver: `opentelemetry.proto.collector.trace.v1.TraceService/Export` and
//! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`.
//!
//! tonic frames, decompresses (gzip) and limits the message; a raw codec hands us the request
//! bytes undecoded so the shared ingest path can split them at the wire level. One service
//! type per signal ([`ExportService<S>`]), as tonic routes by service name; everything after
//! the routing is shared. Status codes
//! follow the OTLP spec: bad data is INVALID_ARGUMENT, a full buffer UNAVAILABLE (retryable),
//! an oversized request RESOURCE_EXHAUSTED without RetryInfo (not retryable).

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{NamedService, UnaryService};
use tonic::{Code, Status};

use super::admission::{Admission, Over};
use super::auth::{Caller, Tokens};
use super::ingest::{Accepted, Ingest, Refusal};
use super::metrics::ReceiverMetrics;
use crate::otlp::signal::Signal;

/// The signal a gRPC service takes, as a type: tonic wants the service name as a constant.
pub(crate) trait Served: Clone + Send + Sync + 'static {
    const SIGNAL: Signal;
}

#[derive(Clone)]
pub(crate) struct Traces;
#[derive(Clone)]
pub(crate) struct Metrics;

impl Served for Traces {
    const SIGNAL: Signal = Signal::Traces;
}

impl Served for Metrics {
    const SIGNAL: Signal = Signal::Metrics;
}

/// An OTLP export service for signal `S`, serving raw request bytes to [`Ingest`].
#[derive(Clone)]
pub(crate) struct ExportService<S> {
    signal: PhantomData<S>,
    ingest: Arc<Ingest>,
    metrics: Arc<ReceiverMetrics>,
    max_request_size: usize,
    tokens: Option<Arc<Tokens>>,
    admission: Arc<Admission>,
}

impl<S: Served> ExportService<S> {
    pub(crate) fn new(
        ingest: Arc<Ingest>,
        metrics: Arc<ReceiverMetrics>,
        max_request_size: usize,
        tokens: Option<Arc<Tokens>>,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            signal: PhantomData,
            ingest,
            metrics,
            max_request_size,
            tokens,
            admission,
        }
    }
}

impl<S: Served> NamedService for ExportService<S> {
    const NAME: &'static str = S::SIGNAL.grpc_service();
}

impl<S: Served, B> Service<http::Request<B>> for ExportService<S>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != S::SIGNAL.grpc_path() {
            return Box::pin(async move {
                Ok(Status::unimplemented("only Export is served by this service").into_http())
            });
        }
        let mut tenant = None;
        if let Some(tokens) = &self.tokens {
            let authorization = req.headers().get(http::header::AUTHORIZATION);
            let caller = tokens.caller(authorization.map(|v| v.as_bytes()));
            if let Some(Caller::Tenant(bound)) = &caller {
                tenant = Some(bound.clone());
            }
            if caller.is_none() {
                self.metrics.request("grpc", "unauthenticated");
                return Box::pin(async move {
                    Ok(Status::unauthenticated(
                        "a bearer token listed in receivers.auth.tokens_file is required",
                    )
                    .into_http())
                });
            }
        }
        let this = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(this.max_request_size);
            let metrics = this.metrics.clone();
            let mut response = grpc.unary(ExportCall(this, tenant), req).await;
            remap_framing_errors(&mut response, &metrics);
            Ok(response)
        })
    }
}

/// tonic reports errors it finds while framing the request (before our handler runs) with
/// codes that would mislead an OTLP client: an oversized message as OUT_OF_RANGE, which OTLP
/// clients retry forever, and a corrupt gzip body as INTERNAL. OTLP wants RESOURCE_EXHAUSTED
/// without RetryInfo and INVALID_ARGUMENT. These errors arrive as trailers-only responses,
/// so the status is in the headers.
fn remap_framing_errors(
    response: &mut http::Response<tonic::body::Body>,
    metrics: &ReceiverMetrics,
) {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return;
    };
    let remapped = match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => {
            metrics.request("grpc", "too_large");
            Status::resource_exhausted(format!("request too large: {}", status.message()))
        }
        Code::Internal if status.message().contains("decompress") => {
            metrics.request("grpc", "malformed");
            Status::invalid_argument(format!("malformed request: {}", status.message()))
        }
        _ => return,
    };
    let headers = response.headers_mut();
    headers.remove("grpc-status-details-bin");
    let _ = remapped.add_header(headers);
}

/// The service, and the tenant the caller's token binds it to.
struct ExportCall<S>(ExportService<S>, Option<Arc<str>>);

impl<S: Served> UnaryService<Bytes> for ExportCall<S> {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (service, tenant) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            let body = request.into_inner();
            // The message tonic framed, and the spans copied out of it.
            let mut held = service.admission.start();
            if let Err(over) = held.grow(body.len().saturating_mul(2)) {
                let limit = service.admission.limit();
                // A request the shape checks refuse gets that answer, not a retry.
                if over == Over::Now
                    && let Err(refusal) = service.ingest.check_signal_shape(S::SIGNAL, &body)
                {
                    return Err(service.refused(refusal));
                }
                return Err(match over {
                    Over::Now => {
                        service.metrics.request("grpc", "unavailable");
                        Status::unavailable(format!(
                            "tailgate's receivers hold receivers.max_in_flight_bytes ({limit} bytes) of requests; retry later"
                        ))
                    }
                    Over::Never => {
                        service.metrics.request("grpc", "too_large");
                        Status::resource_exhausted(format!(
                            "decoding this request would take more than receivers.max_in_flight_bytes ({limit} bytes)"
                        ))
                    }
                });
            }
            let result = service
                .ingest
                .accept(S::SIGNAL, body, false, "grpc", tenant.as_deref())
                .await;
            match result {
                Ok(accepted) => {
                    service.metrics.request("grpc", super::outcome(&accepted));
                    Ok(tonic::Response::new(response_for(accepted)))
                }
                Err(refusal) => Err(service.refused(refusal)),
            }
        })
    }
}

impl<S: Served> ExportService<S> {
    /// The status OTLP prescribes for a request that was not taken, counted.
    fn refused(&self, refusal: Refusal) -> Status {
        let metrics = &self.metrics;
        match refusal {
            Refusal::Malformed(message) => {
                metrics.request("grpc", "malformed");
                Status::invalid_argument(message)
            }
            Refusal::TooLarge(message) => {
                metrics.request("grpc", "too_large");
                Status::resource_exhausted(message)
            }
            Refusal::Busy => {
                metrics.request("grpc", "unavailable");
                Status::unavailable("tailgate's trace buffer is full; retry later")
            }
            Refusal::MetricsQueueFull => {
                metrics.request("grpc", "unavailable");
                Status::unavailable("tailgate's metrics queue is full; retry later")
            }
            Refusal::ShuttingDown => {
                metrics.request("grpc", "unavailable");
                Status::unavailable("tailgate is shutting down")
            }
            Refusal::DiskFull(why) => {
                metrics.request("grpc", "unavailable");
                Status::unavailable(format!(
                    "tailgate's storage log is full ({why}); retry later"
                ))
            }
        }
    }
}

/// The answer to an accepted request. The three signals' export responses are the same message
/// on the wire (field 1 the rejected count, field 2 the message), so the trace one answers for
/// metrics too.
pub(crate) fn response_for(accepted: Accepted) -> ExportTraceServiceResponse {
    let partial = accepted.rejected_spans > 0 || !accepted.message.is_empty();
    ExportTraceServiceResponse {
        partial_success: partial.then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(accepted.rejected_spans).unwrap_or(i64::MAX),
            error_message: accepted.message,
        }),
    }
}

/// Requests pass through as bytes; responses are encoded with prost.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bytes;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the response: {e}")))
    }
}

struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
