//! OTLP/gRPC receiver: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
//!
//! tonic frames, decompresses (gzip) and limits the message; a raw codec hands us the request
//! bytes undecoded so the shared ingest path can split them at the wire level. Status codes
//! follow the OTLP spec: bad data is INVALID_ARGUMENT, a full buffer UNAVAILABLE (retryable),
//! an oversized request RESOURCE_EXHAUSTED without RetryInfo (not retryable).

use std::convert::Infallible;
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

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The gRPC TraceService, serving raw request bytes to [`Ingest`].
#[derive(Clone)]
pub(crate) struct TraceServiceRaw {
    ingest: Arc<Ingest>,
    metrics: Arc<ReceiverMetrics>,
    max_request_size: usize,
    tokens: Option<Arc<Tokens>>,
    admission: Arc<Admission>,
}

impl TraceServiceRaw {
    pub(crate) fn new(
        ingest: Arc<Ingest>,
        metrics: Arc<ReceiverMetrics>,
        max_request_size: usize,
        tokens: Option<Arc<Tokens>>,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            ingest,
            metrics,
            max_request_size,
            tokens,
            admission,
        }
    }
}

impl NamedService for TraceServiceRaw {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl<B> Service<http::Request<B>> for TraceServiceRaw
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
        if req.uri().path() != EXPORT_PATH {
            return Box::pin(async move {
                Ok(Status::unimplemented("only TraceService/Export is served here").into_http())
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
struct ExportCall(TraceServiceRaw, Option<Arc<str>>);

impl UnaryService<Bytes> for ExportCall {
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
                    && let Err(refusal) = service.ingest.check_shape(&body)
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
                .accept_protobuf_from(body, "grpc", tenant.as_deref())
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

impl TraceServiceRaw {
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
