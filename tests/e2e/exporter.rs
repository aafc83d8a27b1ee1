//! The OTLP exporters against real downstream receivers that fail: every kept span is
//! delivered once the backend recovers, none twice; a permanent error is counted, not retried.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;

use crate::support::*;

/// The exporter under test; `extra` holds more `[exporter]` keys, one per line.
fn exporter_config(grpc: bool, addr: SocketAddr, extra: &str) -> String {
    format!(
        "[buffer]\nroot_grace = \"100ms\"\n\n[exporter]\ntype = \"{}\"\nendpoint = \"http://{addr}\"\n\
         batch_timeout = \"50ms\"\nbatch_max_spans = 50\nretry_initial_backoff = \"200ms\"\n\
         retry_max_backoff = \"1s\"\nretry_max_elapsed = \"60s\"\n{extra}\n[exporter.headers]\nx-api-key = \"secret\"\n",
        if grpc { "otlp_grpc" } else { "otlp_http" }
    )
}

/// Traces 1..=traces, each of `spans_per_trace` spans (ids `t * 100 + 1..`), one request each.
async fn send_traces(tg: &Tailgate, traces: u64, spans_per_trace: u64) {
    send_traces_from(tg, 1, traces, spans_per_trace).await;
}

async fn send_traces_from(tg: &Tailgate, first: u64, traces: u64, spans_per_trace: u64) {
    for t in first..first + traces {
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

/// Requests the backend refuses before it accepts (counted, not timed: whatever the machine's
/// speed, exactly these are refused and must be retried).
const REFUSED: usize = 6;

async fn every_kept_span_is_delivered_once_after_unavailability(grpc: bool) {
    let backend = start_backend(grpc, Behaviour::RefuseFirst(REFUSED)).await;
    let tg = Tailgate::start(&exporter_config(grpc, backend.addr, ""));
    send_traces(&tg, 40, 5).await;

    let done = wait_for(Duration::from_secs(60), || {
        (backend.received.lock().unwrap().spans.len() == 200).then_some(())
    });
    let r = backend.received.lock().unwrap();
    assert!(
        done.is_some(),
        "delivered {} of 200 spans in 60 s ({} requests, {} refused)",
        r.spans.len(),
        r.requests,
        r.refused
    );
    assert_eq!(r.refused, REFUSED, "the backend refused its first requests");
    let twice: Vec<_> = r.spans.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{} spans delivered twice", twice.len());
    drop(r);
    // The backend counts a batch before its answer reaches tailgate, which counts it after.
    let m = wait_for(Duration::from_secs(30), || {
        let m = tg.metrics();
        (m.exported() == 200.0).then_some(m)
    });
    let m = m.expect("tailgate counts every delivered span as exported");
    let retries = m.sum("tailgate_export_retries_total", &[]);
    assert!(
        retries >= REFUSED as f64,
        "each of the {REFUSED} refused requests was retried and counted: {retries} retries"
    );
    assert_eq!(m.sum("tailgate_export_failed_spans_total", &[]), 0.0);
    // The API key goes to a plain http:// endpoint: the start says so, naming the header and
    // never its value.
    let log = tg.log().join("\n");
    assert!(
        log.contains("plain http:// endpoint") && log.contains("x-api-key"),
        "the clear-text headers are warned about; log:\n{log}"
    );
    assert!(!log.contains("secret"), "a header's value is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_backend_unavailable_for_its_first_requests_then_ok() {
    every_kept_span_is_delivered_once_after_unavailability(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_backend_503_with_retry_after_for_its_first_requests_then_ok() {
    every_kept_span_is_delivered_once_after_unavailability(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_400_is_counted_and_logged_not_retried() {
    for grpc in [false, true] {
        let backend = start_backend(grpc, Behaviour::Reject).await;
        // One batch in flight at a time: a batch being retried would hold the only slot, so
        // the second batch below could not reach the backend before the first gave up
        // (retry_max_elapsed = 60 s, beyond the wait).
        let tg = Tailgate::start(&exporter_config(grpc, backend.addr, "concurrency = 1\n"));
        send_traces(&tg, 1, 4).await;
        let permanent = |spans: f64| {
            wait_for(Duration::from_secs(30), || {
                let m = tg.metrics();
                (m.sum(
                    "tailgate_export_failed_spans_total",
                    &["reason=\"permanent_error\""],
                ) == spans)
                    .then_some(m)
            })
        };
        assert!(
            permanent(4.0).is_some(),
            "the failed batch is counted (grpc={grpc})"
        );
        // A second batch, after the first failed: it reaching the backend shows the first is
        // no longer being sent.
        send_traces_from(&tg, 2, 1, 4).await;
        assert!(
            permanent(8.0).is_some(),
            "the second failed batch is counted (grpc={grpc})"
        );
        let r = backend.received.lock().unwrap();
        assert_eq!(
            r.requests, 2,
            "each batch sent once, never retried (grpc={grpc})"
        );
        let ids = |t: u64| -> HashSet<Vec<u8>> {
            (t * 100 + 1..=t * 100 + 4)
                .map(|s| span_id(s).to_vec())
                .collect()
        };
        let got = |i: usize| -> HashSet<Vec<u8>> { r.request_spans[i].iter().cloned().collect() };
        assert_eq!(
            got(0),
            ids(1),
            "the first request holds trace 1 (grpc={grpc})"
        );
        assert_eq!(
            got(1),
            ids(2),
            "the second request holds trace 2, not a retry of trace 1 (grpc={grpc})"
        );
        drop(r);
        assert!(
            tg.log().iter().any(|l| l.contains("not retrying")),
            "the refusal is logged"
        );
        assert_eq!(tg.metrics().sum("tailgate_export_retries_total", &[]), 0.0);
    }
}
