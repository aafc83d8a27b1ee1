//! The blackhole OTLP/gRPC sink both collectors export to: counts spans, marks every
//! `loadgen.seq` in a bitmap (so loss and duplicates are exact), and records the decision lag of
//! each root span (receive wall time − root end time; the load generator ends roots at send time).
//!
//! It decodes only the fields it needs (a partial mirror of the OTLP messages: prost skips the
//! rest) so that it takes as little as possible of the CPU the collectors are measured on.
//!
//! For the soak's outage it can be taken down ([`Sink::set_down`]): it then answers every export
//! with gRPC `UNAVAILABLE` (a code OTLP says to retry) and records nothing but the refusal.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::body::Body;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// `tailgate::loadgen::SEQ_ATTRIBUTE` (not imported: see Cargo.toml).
const SEQ_ATTRIBUTE: &str = "loadgen.seq";
/// The root span the load generator makes.
const ROOT_NAME: &str = "agent.run";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Collectors batch up to 8192 spans; 64 MiB leaves room for any batch size either one uses.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

// Field numbers from opentelemetry/proto/{collector/trace,trace,common}/v1/*.proto.
#[derive(Clone, PartialEq, prost::Message)]
struct Request {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(message, repeated, tag = "2")]
    spans: Vec<Span>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Span {
    #[prost(bytes = "vec", tag = "4")]
    parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    name: String,
    #[prost(fixed64, tag = "8")]
    end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    attributes: Vec<KeyValue>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct KeyValue {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValue>,
}
/// `AnyValue` with only the `int_value` arm of its oneof.
#[derive(Clone, PartialEq, prost::Message)]
struct AnyValue {
    #[prost(int64, optional, tag = "3")]
    int_value: Option<i64>,
}

/// What the sink has seen since the last [`Sink::reset`].
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub spans: u64,
    pub requests: u64,
    /// Exports answered `UNAVAILABLE` while the sink was down (not in `requests`).
    pub refused_requests: u64,
    pub distinct_seqs: u64,
    pub duplicate_seqs: u64,
    pub spans_without_seq: u64,
    bitmap: Vec<u64>,
    /// Root lags in microseconds (negative if the clocks disagree).
    pub root_lags_us: Vec<i64>,
    /// The end time (Unix ns) of the root each lag in `root_lags_us` is of.
    pub root_ends_ns: Vec<i64>,
}

impl Seen {
    fn mark(&mut self, seq: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bitmap.len() {
            self.bitmap.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        if self.bitmap[word] & mask != 0 {
            self.duplicate_seqs += 1;
        } else {
            self.bitmap[word] |= mask;
            self.distinct_seqs += 1;
        }
    }

    /// Whether `seq` arrived at least once.
    pub fn contains(&self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        self.bitmap
            .get(word)
            .is_some_and(|w| w & (1u64 << bit) != 0)
    }

    /// Seqs below `n` never seen.
    pub fn missing_below(&self, n: u64) -> u64 {
        let mut seen = 0u64;
        for (w, word) in self.bitmap.iter().enumerate() {
            let base = w as u64 * 64;
            if base >= n {
                break;
            }
            let valid = n - base;
            let masked = if valid >= 64 {
                *word
            } else {
                word & ((1u64 << valid) - 1)
            };
            seen += u64::from(masked.count_ones());
        }
        n - seen
    }

    /// The `q` quantile of the root lags, in milliseconds.
    pub fn lag_ms(&self, q: f64) -> Option<f64> {
        self.lag_after_ms(q, 0)
    }

    /// [`Self::lag_ms`] over the roots that ended `warm_up_ns` or more after the first root
    /// seen: a learned grace's steady state, past its start value.
    pub fn lag_after_ms(&self, q: f64, warm_up_ns: i64) -> Option<f64> {
        let first = self.root_ends_ns.iter().min()?;
        let mut lags: Vec<i64> = (self.root_lags_us.iter().zip(&self.root_ends_ns))
            .filter(|(_, end)| **end - first >= warm_up_ns)
            .map(|(lag, _)| *lag)
            .collect();
        if lags.is_empty() {
            return None;
        }
        lags.sort_unstable();
        let i = ((lags.len() - 1) as f64 * q).round() as usize;
        Some(lags[i] as f64 / 1000.0)
    }
}

#[derive(Clone, Default)]
pub struct Sink {
    seen: Arc<Mutex<Seen>>,
    /// Down: every export is refused as temporarily unavailable.
    down: Arc<AtomicBool>,
}

impl Sink {
    /// Serves on 127.0.0.1 (a free port) until the runtime ends.
    pub async fn start(&self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = SinkService(self.clone());
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("sink stopped: {e}");
            }
        });
        Ok(addr)
    }

    pub fn snapshot(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Cheap counters for polling: (spans, distinct seqs).
    pub fn counts(&self) -> (u64, u64) {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        (s.spans, s.distinct_seqs)
    }

    pub fn reset(&self) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Seen::default();
    }

    /// Takes the sink down (every export answered `UNAVAILABLE`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    fn refuse(&self) -> tonic::Status {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused_requests += 1;
        tonic::Status::unavailable("the test backend is down (soak outage); retry later")
    }

    fn record(&self, request: &Request) {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.requests += 1;
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            seen.spans += 1;
            let seq = span
                .attributes
                .iter()
                .find(|a| a.key == SEQ_ATTRIBUTE)
                .and_then(|a| a.value.as_ref()?.int_value)
                .and_then(|v| u64::try_from(v).ok());
            match seq {
                Some(seq) => seen.mark(seq),
                None => seen.spans_without_seq += 1,
            }
            if span.parent_span_id.is_empty() && span.name == ROOT_NAME {
                let lag_us = (now_ns - span.end_time_unix_nano as i64) / 1000;
                seen.root_lags_us.push(lag_us);
                seen.root_ends_ns.push(span.end_time_unix_nano as i64);
            }
        }
    }
}

#[derive(Clone)]
struct SinkService(Sink);

impl NamedService for SinkService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

struct Export(Sink);

impl tonic::server::UnaryService<Request> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Request>) -> Self::Future {
        if self.0.down.load(Ordering::Relaxed) {
            return std::future::ready(Err(self.0.refuse()));
        }
        self.0.record(request.get_ref());
        std::future::ready(Ok(tonic::Response::new(
            ExportTraceServiceResponse::default(),
        )))
    }
}

impl Service<http::Request<Body>> for SinkService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let sink = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != EXPORT_PATH {
                return Ok(tonic::Status::unimplemented("only TraceService/Export").into_http());
            }
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, Request>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            Ok(grpc.unary(Export(sink), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use tonic::server::UnaryService as _;

    use super::*;

    #[test]
    fn the_bitmap_counts_distinct_duplicate_and_missing_seqs() {
        let mut s = Seen::default();
        for seq in [0, 1, 2, 2, 64, 130, 1] {
            s.mark(seq);
        }
        assert_eq!((s.distinct_seqs, s.duplicate_seqs), (5, 2));
        assert_eq!(s.missing_below(3), 0);
        assert_eq!(s.missing_below(65), 65 - 4);
        assert_eq!(s.missing_below(200), 200 - 5);
        assert!(s.contains(130) && s.contains(0) && !s.contains(3) && !s.contains(1 << 20));
    }

    #[test]
    fn a_down_sink_refuses_as_unavailable_and_records_nothing() {
        let sink = Sink::default();
        sink.set_down(true);
        let answer = Export(sink.clone()).call(tonic::Request::new(Request::default()));
        let status = answer.into_inner().expect_err("refused while down");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let seen = sink.snapshot();
        assert_eq!((seen.requests, seen.refused_requests), (0, 1));
        sink.set_down(false);
        let answer = Export(sink.clone()).call(tonic::Request::new(Request::default()));
        assert!(answer.into_inner().is_ok(), "accepted once back up");
        assert_eq!(sink.snapshot().requests, 1);
    }
}
