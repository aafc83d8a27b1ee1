//! The whole pipeline through the real binary: real OpenTelemetry SDK exporters in, whole
//! traces out of the file exporter, decided once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::support::*;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Transport {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

/// A tracer provider exporting every span as it ends (one request per span), like a real
/// service with the OTel SDK's simple processor.
pub(crate) fn provider(tg: &Tailgate, transport: Transport, service: &str) -> SdkTracerProvider {
    let exporter = match transport {
        Transport::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{}", tg.grpc))
            .build(),
        Transport::HttpProtobuf | Transport::HttpJson => {
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(match transport {
                    Transport::HttpJson => Protocol::HttpJson,
                    _ => Protocol::HttpBinary,
                })
                .with_endpoint(format!("http://{}/v1/traces", tg.http))
                .build()
        }
    }
    .expect("build OTLP exporter");
    SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build()
}

fn trace_hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Spans of the exported output grouped by trace, with the index of the line (batch) each
/// span was in.
fn by_trace(
    tg: &Tailgate,
) -> HashMap<String, Vec<(usize, String, opentelemetry_proto::tonic::trace::v1::Span)>> {
    let mut out: HashMap<_, Vec<_>> = HashMap::new();
    for (line, request) in tg.exported().iter().enumerate() {
        for (service, span) in exported_spans(std::slice::from_ref(request)) {
            out.entry(trace_hex(&span.trace_id))
                .or_default()
                .push((line, service, span));
        }
    }
    out
}

#[test]
fn sdk_traces_over_grpc_http_protobuf_and_json_are_exported_once_complete() {
    let tg = Tailgate::start("[buffer]\nroot_grace = \"1500ms\"\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut sent: HashMap<String, (Transport, usize)> = HashMap::new();
    for transport in [
        Transport::Grpc,
        Transport::HttpProtobuf,
        Transport::HttpJson,
    ] {
        let provider = provider(&tg, transport, &format!("svc-{transport:?}"));
        let tracer = provider.tracer("e2e");
        for _ in 0..3 {
            let root = tracer.start("request");
            let cx = Context::current_with_span(root);
            for i in 0..4 {
                let mut child = tracer.start_with_context(format!("step-{i}"), &cx);
                child.set_attribute(KeyValue::new("step", i as i64));
                child.end();
            }
            let id = trace_hex(&cx.span().span_context().trace_id().to_bytes());
            cx.span().end();
            sent.insert(id, (transport, 5));
        }
        provider.shutdown().expect("flush provider");
    }
    // Nothing is exported before the traces are decided (root_grace has not passed yet).
    let early = by_trace(&tg);
    assert!(
        sent.keys().all(|id| !early.contains_key(id)),
        "a trace was exported before its root_grace passed"
    );

    let all = wait_for(Duration::from_secs(20), || {
        let got = by_trace(&tg);
        sent.keys().all(|id| got.contains_key(id)).then_some(got)
    })
    .expect("every trace exported");
    for (id, (transport, spans)) in &sent {
        let got = &all[id];
        assert_eq!(
            got.len(),
            *spans,
            "{transport:?} trace {id} complete, each span once"
        );
        let lines: HashSet<usize> = got.iter().map(|(line, _, _)| *line).collect();
        assert_eq!(
            lines.len(),
            1,
            "{transport:?} trace {id} exported in one decision"
        );
        let ids: HashSet<Vec<u8>> = got.iter().map(|(_, _, s)| s.span_id.clone()).collect();
        assert_eq!(ids.len(), *spans, "no span twice");
        for (_, service, span) in got {
            assert_eq!(service, &format!("svc-{transport:?}"));
            assert_eq!(attr(span, "sampling.trigger"), Some("root_grace"));
            assert_eq!(attr(span, "sampling.policy"), Some("default"));
        }
    }
    let m = tg.metrics();
    assert_eq!(m.received(), 45.0);
    assert_eq!(m.kept(), 45.0);
    assert!(m.sum("tailgate_spans_received_total", &["transport=\"grpc\""]) == 15.0);
    assert!(
        m.sum(
            "tailgate_spans_received_total",
            &["transport=\"http_json\""]
        ) == 15.0
    );
}

#[test]
fn trace_from_two_services_in_several_requests_over_two_seconds_is_one_decision() {
    let tg = Tailgate::start("[buffer]\nroot_grace = \"1s\"\ntrace_idle = \"5s\"\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let frontend = provider(&tg, Transport::Grpc, "frontend");
    let backend = provider(&tg, Transport::HttpProtobuf, "backend");
    let root = frontend.tracer("e2e").start("GET /checkout");
    let cx = Context::current_with_span(root);
    let id = trace_hex(&cx.span().span_context().trace_id().to_bytes());
    for i in 0..3 {
        let span = backend
            .tracer("e2e")
            .start_with_context(format!("db-{i}"), &cx);
        drop(span); // ends and is exported now, in its own request
        std::thread::sleep(Duration::from_millis(700));
    }
    cx.span().end();
    frontend.shutdown().unwrap();
    backend.shutdown().unwrap();

    let got =
        wait_for(Duration::from_secs(20), || by_trace(&tg).remove(&id)).expect("trace exported");
    assert_eq!(got.len(), 4, "root and three children");
    let lines: HashSet<usize> = got.iter().map(|(l, _, _)| *l).collect();
    assert_eq!(lines.len(), 1, "exported together in one decision");
    let services: HashSet<&str> = got.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(services, HashSet::from(["frontend", "backend"]));
    assert_eq!(tg.metrics().sum("tailgate_traces_decided_total", &[]), 1.0);
}

#[test]
fn a_trace_whose_root_ended_is_decided_after_root_grace_not_decision_wait() {
    let tg = Tailgate::start(
        "[buffer]\nroot_grace = \"300ms\"\ntrace_idle = \"60s\"\ndecision_wait = \"120s\"\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let p = provider(&tg, Transport::Grpc, "svc");
    let root = p.tracer("e2e").start("root");
    let id = trace_hex(&root.span_context().trace_id().to_bytes());
    drop(root);
    p.shutdown().unwrap();
    // Well inside decision_wait (120 s) and trace_idle (60 s): only root_grace can fire.
    let got = wait_for(Duration::from_secs(15), || by_trace(&tg).remove(&id)).expect("decided");
    assert_eq!(attr(&got[0].2, "sampling.trigger"), Some("root_grace"));
    let m = tg.metrics();
    assert_eq!(
        m.sum("tailgate_traces_decided_total", &["trigger=\"root_grace\""]),
        1.0
    );
    assert_eq!(
        m.sum(
            "tailgate_traces_decided_total",
            &["trigger=\"decision_wait\""]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_span_follows_its_traces_decision() {
    for (verdict, exported_late) in [("keep", true), ("drop", false)] {
        let tg = Tailgate::start(&format!(
            "[buffer]\nroot_grace = \"200ms\"\n[decide]\ndefault = \"{verdict}\"\n"
        ));
        let first = request("svc", &[SpanSpec::new(1, 1, 0), SpanSpec::new(1, 2, 1)]);
        let (code, _, _) = post(
            tg.http,
            "application/x-protobuf",
            None,
            prost::Message::encode_to_vec(&first),
        )
        .await;
        assert_eq!(code, 200);
        let decided = wait_for(Duration::from_secs(10), || {
            (tg.metrics().sum("tailgate_traces_decided_total", &[]) == 1.0).then_some(())
        });
        assert!(decided.is_some(), "first part decided");

        let late = request("svc", &[SpanSpec::new(1, 3, 1)]);
        let (code, _, _) = post(
            tg.http,
            "application/x-protobuf",
            None,
            prost::Message::encode_to_vec(&late),
        )
        .await;
        assert_eq!(code, 200);
        let label = format!("verdict=\"{verdict}\"");
        let counted = wait_for(Duration::from_secs(10), || {
            (tg.metrics().sum("tailgate_late_spans_total", &[&label]) == 1.0).then_some(())
        });
        assert!(counted.is_some(), "late span counted for {verdict}");
        let m = tg.metrics();
        // It followed the decision instead of starting a new trace.
        assert_eq!(m.sum("tailgate_traces_decided_total", &[]), 1.0);
        assert_eq!(m.received(), 3.0);
        assert_eq!(m.kept() + m.dropped(), 3.0);
        if exported_late {
            let spans = wait_for(Duration::from_secs(10), || {
                let s = exported_spans(&tg.exported());
                (s.len() == 3).then_some(s)
            })
            .expect("late span exported");
            let late_span = spans
                .iter()
                .find(|(_, s)| s.span_id == span_id(3).to_vec())
                .unwrap();
            assert_eq!(attr(&late_span.1, "sampling.trigger"), Some("late"));
            assert_eq!(attr(&late_span.1, "sampling.policy"), Some("default"));
        } else {
            assert_eq!(
                m.sum("tailgate_spans_dropped_total", &["trigger=\"late\""]),
                1.0
            );
            assert!(exported_spans(&tg.exported()).is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_decides_and_exports_everything_buffered() {
    // Nothing would be decided for a minute: only shutdown can export these.
    let mut tg = Tailgate::start(
        "[buffer]\nroot_grace = \"60s\"\ntrace_idle = \"60s\"\ndecision_wait = \"60s\"\n",
    );
    let mut expected = HashSet::new();
    for t in 1..=50u64 {
        let spans: Vec<SpanSpec> = (1..=4)
            .map(|s| SpanSpec::new(t, s, if s == 1 { 0 } else { 1 }))
            .collect();
        let body = prost::Message::encode_to_vec(&request("svc", &spans));
        let (code, _, _) = post(tg.http, "application/x-protobuf", None, body).await;
        assert_eq!(code, 200);
        expected.insert(trace_id(t).to_vec());
    }
    let buffered = wait_for(Duration::from_secs(10), || {
        (tg.metrics().sum("tailgate_buffer_spans", &[]) == 200.0).then_some(())
    });
    assert!(buffered.is_some(), "all 200 spans buffered");
    assert!(tg.exported().is_empty());

    let status = tg.terminate();
    assert!(status.success(), "exit 0 after SIGTERM, got {status:?}");
    let spans = exported_spans(&tg.exported());
    assert_eq!(spans.len(), 200, "every buffered span exported");
    let traces: HashSet<Vec<u8>> = spans.iter().map(|(_, s)| s.trace_id.clone()).collect();
    assert_eq!(traces, expected);
    assert!(
        spans
            .iter()
            .all(|(_, s)| attr(s, "sampling.trigger") == Some("shutdown"))
    );
}
