//! OTLP receiver conformance through the real binary: every error case answers with the code
//! the OTLP specification prescribes, and loses nothing else.

use std::io::Write;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceResponse, trace_service_client::TraceServiceClient,
};
use prost::Message;
use tonic::Code;
use tonic::codec::CompressionEncoding;

use crate::support::*;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn grpc_client(tg: &Tailgate) -> TraceServiceClient<tonic::transport::Channel> {
    TraceServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
}

/// A valid OTLP request of roughly `bytes` bytes.
fn request_of_size(bytes: usize) -> Vec<u8> {
    let mut spec = SpanSpec::new(9, 1, 0);
    spec.attrs.push(("payload".into(), "x".repeat(bytes)));
    request("svc", &[spec]).encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_invalid_argument_on_both_transports() {
    let tg = Tailgate::start("");
    // Field 1, length-delimited, claims 100 bytes but has 3.
    let garbage = vec![0x0a, 100, 1, 2, 3];
    let (code, headers, body) =
        post(tg.http, "application/x-protobuf", None, garbage.clone()).await;
    assert_eq!(code, 400);
    assert_eq!(headers["content-type"], "application/x-protobuf");
    let status = RpcStatus::decode(body.as_slice()).expect("google.rpc.Status body");
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(!status.message.is_empty());

    let mut client = grpc_client(&tg).await;
    let raw = tonic::Request::new(
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
            &[][..],
        )
        .unwrap(),
    );
    // A well-formed empty request succeeds...
    assert!(client.export(raw).await.is_ok());
    // ...and malformed bytes over gRPC are INVALID_ARGUMENT.
    let err = raw_grpc_export(&tg, garbage).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(tg.metrics().received(), 0.0);
}

/// Sends arbitrary bytes as the gRPC request message.
async fn raw_grpc_export(
    tg: &Tailgate,
    body: Vec<u8>,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    raw_grpc_call(
        tg,
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        body,
    )
    .await
}

/// Sends arbitrary bytes as the request message of the gRPC method at `path`; the reply is
/// read as an export response (the same message on the wire for every signal).
pub async fn raw_grpc_call(
    tg: &Tailgate,
    path: &'static str,
    body: Vec<u8>,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", tg.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(
        tonic::Request::new(bytes::Bytes::from(body)),
        path,
        raw_codec::RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

mod raw_codec {
    use bytes::{Buf, BufMut, Bytes};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use prost::Message;
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    pub struct RawCodec;
    pub struct Enc;
    pub struct Dec;

    impl Codec for RawCodec {
        type Encode = Bytes;
        type Decode = ExportTraceServiceResponse;
        type Encoder = Enc;
        type Decoder = Dec;
        fn encoder(&mut self) -> Enc {
            Enc
        }
        fn decoder(&mut self) -> Dec {
            Dec
        }
    }

    impl Encoder for Enc {
        type Item = Bytes;
        type Error = Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put(item);
            Ok(())
        }
    }

    impl Decoder for Dec {
        type Item = ExportTraceServiceResponse;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
            let bytes = src.copy_to_bytes(src.remaining());
            ExportTraceServiceResponse::decode(bytes)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_with_a_json_status() {
    let tg = Tailgate::start("");
    let (code, headers, body) = post(
        tg.http,
        "application/json",
        None,
        b"{\"resourceSpans\": [ {".to_vec(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let status: serde_json::Value = serde_json::from_slice(&body).expect("JSON Status body");
    assert_eq!(status["code"], Code::InvalidArgument as i32);
    assert!(status["message"].as_str().is_some_and(|m| !m.is_empty()));

    // Wrong types for known fields are malformed too.
    let (code, _, _) = post(
        tg.http,
        "application/json",
        None,
        br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","startTimeUnixNano":true}]}]}]}"#.to_vec(),
    )
    .await;
    assert_eq!(code, 400);
    // Unsupported media type and method.
    let (code, _, _) = post(tg.http, "text/plain", None, b"hi".to_vec()).await;
    assert_eq!(code, 415);
    let resp = reqwest::get(format!("http://{}/v1/traces", tg.http))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_json_fields_are_ignored_and_charset_is_accepted() {
    let tg = Tailgate::start("[buffer]\nroot_grace = \"100ms\"\n");
    let body = br#"{
      "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}], "futureField": 1},
        "scopeSpans": [{
          "scope": {"name": "my.library", "someNewThing": {"a": [1, 2]}},
          "spans": [{
            "traceId": "5B8EFFF798038103D269B633813FC60C",
            "spanId": "EEE19B7EC3C1B174",
            "name": "I'm a server span",
            "startTimeUnixNano": "1544712660000000000",
            "endTimeUnixNano": 1544712661000000000,
            "kind": 2,
            "unknownSpanField": "ignored",
            "attributes": [{"key": "my.span.attr", "value": {"intValue": "42"}}]
          }]
        }]
      }],
      "topLevelExtension": true
    }"#;
    let (code, _, resp) = post(
        tg.http,
        "application/json; charset=utf-8",
        None,
        body.to_vec(),
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&resp));
    let exported = wait_for(Duration::from_secs(10), || {
        let s = exported_spans(&tg.exported());
        (!s.is_empty()).then_some(s)
    })
    .expect("exported");
    assert_eq!(exported.len(), 1);
    let (service, span) = &exported[0];
    assert_eq!(service, "json-svc");
    assert_eq!(span.name, "I'm a server span");
    assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
    assert_eq!(
        hex::encode(&span.trace_id),
        "5b8efff798038103d269b633813fc60c"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests_are_413_and_resource_exhausted_without_retry_info() {
    let tg = Tailgate::start_with(Setup {
        receivers: "max_request_size = \"64KiB\"",
        sections: "",
    });
    let big = request_of_size(100 << 10);
    let (code, _, body) = post(tg.http, "application/x-protobuf", None, big.clone()).await;
    assert_eq!(code, 413);
    assert_eq!(
        RpcStatus::decode(body.as_slice()).unwrap().code,
        Code::ResourceExhausted as i32
    );

    let err = raw_grpc_export(&tg, big.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.details().is_empty(),
        "no RetryInfo: the client must not retry"
    );

    // Compressed below the limit but larger once inflated: still too large.
    let (code, _, _) = post(tg.http, "application/x-protobuf", Some("gzip"), gzip(&big)).await;
    assert_eq!(code, 413);
    let mut client = grpc_client(&tg)
        .await
        .send_compressed(CompressionEncoding::Gzip);
    let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
        big.as_slice(),
    )
    .unwrap();
    let err = client.export(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // A request under the limit still goes through afterwards.
    let (code, _, _) = post(
        tg.http,
        "application/x-protobuf",
        None,
        request_of_size(10 << 10),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(tg.metrics().received(), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bomb_is_refused_without_inflating_it() {
    // The default 64 MiB limit; the bomb inflates to 1 GiB.
    let tg = Tailgate::start("");
    let before = tg.peak_rss();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(
        bomb.len() < 2 << 20,
        "the bomb is small: {} bytes",
        bomb.len()
    );
    let (code, _, _) = post(
        tg.http,
        "application/x-protobuf",
        Some("gzip"),
        bomb.clone(),
    )
    .await;
    assert_eq!(code, 413);

    let mut client = grpc_client(&tg)
        .await
        .send_compressed(CompressionEncoding::Gzip);
    // Over gRPC, tonic inflates into a buffer capped at the limit.
    let mut spec = SpanSpec::new(3, 1, 0);
    spec.attrs.push(("zeros".into(), "0".repeat(80 << 20)));
    let err = client.export(request("svc", &[spec])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    let peak = tg.peak_rss();
    let limit = 64u64 << 20;
    assert!(
        peak < 2 * limit,
        "peak RSS {} MiB (before: {} MiB) must stay under twice the 64 MiB limit",
        peak >> 20,
        before >> 20
    );
    assert_eq!(tg.metrics().received(), 0.0);
}

/// Gzip of `head`, then `item` `n` times joined by `sep`, then `tail`, streamed: the inflated
/// body is never held here.
fn gzip_repeated(head: &[u8], item: &[u8], sep: &[u8], n: usize, tail: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(head).unwrap();
    let chunk: Vec<u8> = [item, sep].concat().repeat(1 << 16);
    let mut left = n - 1;
    while left > 0 {
        let k = left.min(1 << 16);
        e.write_all(&chunk[..k * (item.len() + sep.len())]).unwrap();
        left -= k;
    }
    e.write_all(item).unwrap();
    e.write_all(tail).unwrap();
    e.finish().unwrap()
}

/// Twenty million empty spans, a body that is small on the wire and under the 64 MiB limit
/// once inflated, but would cost gigabytes as decoded spans.
const EMPTY_SPANS: usize = 20_000_000;
const PEAK_RSS_LIMIT: u64 = 512 << 20;

/// The hardening issue's request: 58 KB of gzip OTLP/JSON holding 20 million `{}` spans took
/// the process to 5 GB. Decoding now stops at `receivers.max_spans_per_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_million_empty_json_spans_are_refused_within_bounded_memory() {
    let tg = Tailgate::start("");
    let body = gzip_repeated(
        br#"{"resourceSpans":[{"scopeSpans":[{"spans":["#,
        b"{}",
        b",",
        EMPTY_SPANS,
        b"]}]}]}",
    );
    assert!(body.len() < 100 << 10, "{} bytes of gzip", body.len());
    let (code, _, reply) = post(tg.http, "application/json", Some("gzip"), body).await;
    let reply = String::from_utf8_lossy(&reply);
    assert_eq!(code, 413, "{reply}");
    assert!(
        reply.contains("\"code\":8") && reply.contains("more than 100000 spans"),
        "a google.rpc.Status with RESOURCE_EXHAUSTED naming the limit: {reply}"
    );
    let peak = tg.peak_rss();
    assert!(peak < PEAK_RSS_LIMIT, "peak RSS {} MiB", peak >> 20);
    eprintln!("20M empty JSON spans: refused, peak RSS {} MiB", peak >> 20);

    // A well-formed request right after it is served.
    let ok = request("svc", &[SpanSpec::new(1, 1, 0)]).encode_to_vec();
    let (code, _, _) = post(tg.http, "application/x-protobuf", None, ok).await;
    assert_eq!(code, 200);
    assert_eq!(tg.metrics().received(), 1.0);
}

/// The same shape in protobuf, where an empty span is two bytes, eight such requests at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_protobuf_requests_of_twenty_million_empty_spans_are_refused_within_bounded_memory() {
    let tg = Tailgate::start("");
    let spans = 2 * EMPTY_SPANS;
    let scope_head = [&[0x12][..], &varint(spans as u64)].concat();
    let resource_len = scope_head.len() + spans;
    let head = [&[0x0a][..], &varint(resource_len as u64), &scope_head].concat();
    // ResourceSpans { ScopeSpans { spans: [Span {}; 20M] } }, field 2 of each.
    let body = gzip_repeated(&head, &[0x12, 0x00], b"", EMPTY_SPANS, b"");
    // Eight at once are more than receivers.max_in_flight_bytes holds while their bodies
    // inflate: those that do not fit get the retryable 503, and retry as an SDK would.
    let sends: Vec<_> = (0..8)
        .map(|_| {
            let (addr, body) = (tg.http, body.clone());
            tokio::spawn(async move {
                for _ in 0..20 {
                    let sent = post(addr, "application/x-protobuf", Some("gzip"), body.clone());
                    let (code, headers, reply) = sent.await;
                    if code != 503 {
                        return (code, reply);
                    }
                    assert!(headers.contains_key("retry-after"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                panic!("still 503 after 20 tries");
            })
        })
        .collect();
    for send in sends {
        let (code, reply) = send.await.unwrap();
        assert_eq!(code, 413, "{}", String::from_utf8_lossy(&reply));
    }
    let peak = tg.peak_rss();
    assert!(peak < PEAK_RSS_LIMIT, "peak RSS {} MiB", peak >> 20);
    eprintln!(
        "8 x 20M empty protobuf spans: refused, peak RSS {} MiB",
        peak >> 20
    );
    let ok = request("svc", &[SpanSpec::new(1, 1, 0)]).encode_to_vec();
    let (code, _, _) = post(tg.http, "application/x-protobuf", None, ok).await;
    assert_eq!(code, 200);
    assert_eq!(tg.metrics().received(), 1.0);
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_are_rejected_in_partial_success_and_the_rest_is_kept() {
    let tg = Tailgate::start("[buffer]\nroot_grace = \"100ms\"\n");
    let good = SpanSpec::new(5, 1, 0);
    let mut empty_trace = SpanSpec::new(5, 2, 1);
    empty_trace.trace_id = [0; 16];
    let mut zero_span = SpanSpec::new(5, 3, 1);
    zero_span.span_id = [0; 8];
    let req = request("svc", &[good.clone(), empty_trace, zero_span]);
    let bytes = req.encode_to_vec();

    let (code, _, body) = post(tg.http, "application/x-protobuf", None, bytes).await;
    assert_eq!(code, 200);
    let resp = ExportTraceServiceResponse::decode(body.as_slice()).unwrap();
    let partial = resp.partial_success.expect("partial_success set");
    assert_eq!(partial.rejected_spans, 2);
    assert!(!partial.error_message.is_empty());

    // The same over gRPC, with a span whose trace id is 3 bytes long.
    let mut short = req.clone();
    short.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![1, 2, 3];
    let mut client = grpc_client(&tg).await;
    let resp = client.export(short).await.expect("accepted").into_inner();
    assert_eq!(resp.partial_success.unwrap().rejected_spans, 3);

    // And over JSON, where a non-hex id cannot be decoded.
    let json = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[
        {"traceId":"not-hex-at-all","spanId":"eee19b7ec3c1b174","name":"x"},
        {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"ok"}]}]}]}"#;
    let (code, _, body) = post(tg.http, "application/json", None, json.to_vec()).await;
    assert_eq!(code, 200);
    let resp: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(resp["partialSuccess"]["rejectedSpans"], "1");

    let kept = wait_for(Duration::from_secs(10), || {
        let s = exported_spans(&tg.exported());
        (s.len() == 2).then_some(s)
    })
    .expect("the valid spans are exported");
    assert!(kept.iter().any(|(_, s)| s.span_id == good.span_id.to_vec()));
    let m = tg.metrics();
    assert_eq!(m.received(), 8.0);
    assert_eq!(
        m.sum("tailgate_spans_refused_total", &["reason=\"invalid_id\""]),
        6.0
    );
    assert_eq!(m.received(), m.accounted());
}
