//! Sustained input far above `max_buffer_bytes`: memory stays bounded, the oldest traces are
//! decided early (trigger `memory`), and every span is accounted for on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_buffer_under_sustained_load_decides_early_and_accounts_for_every_span() {
    let backend = start_backend(true, Behaviour::RefuseFirst(0)).await;
    let tg = Tailgate::start(&format!(
        "[buffer]\nmax_buffer_bytes = \"4MiB\"\nroot_grace = \"60s\"\ntrace_idle = \"60s\"\ndecision_wait = \"2s\"\n\n\
         [exporter]\ntype = \"otlp_grpc\"\nendpoint = \"http://{}\"\nbatch_timeout = \"50ms\"\nbatch_max_spans = 1024\nqueue_max_spans = 4096\n",
        backend.addr
    ));

    // Watch resident memory while the load runs.
    let pid = tg.pid();
    let stop = StopFlag::new();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.handle(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kib) = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    peak.fetch_max(kib * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Four senders, each with 100-span requests of ~1 KiB spans, each trace spread over many
    // requests so nothing completes on its own: 64 MiB in all, 16 times the buffer.
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for sender in 0..4u64 {
        let (http, sent_bytes, unavailable) = (tg.http, sent_bytes.clone(), unavailable.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seq = 0u64;
            while sent_bytes.load(Ordering::Relaxed) < 64 << 20 {
                let spans: Vec<SpanSpec> = (0..100)
                    .map(|i| {
                        seq += 1;
                        let trace = sender * 1_000_000 + seq / 20;
                        let mut s = SpanSpec::new(trace, sender << 40 | seq, 7);
                        s.attrs.push(("payload".into(), format!("{i:01000}")));
                        s
                    })
                    .collect();
                let body = request("load", &spans).encode_to_vec();
                let len = body.len() as u64;
                let resp = client
                    .post(format!("http://{http}/v1/traces"))
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                    .expect("POST");
                match resp.status().as_u16() {
                    200 => {}
                    503 => {
                        assert!(resp.headers().contains_key("retry-after"));
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => panic!("unexpected status {other}"),
                }
                sent_bytes.fetch_add(len, Ordering::Relaxed);
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }

    // Let the last traces reach decision_wait and the exporter drain.
    let settled = wait_for(Duration::from_secs(30), || {
        let m = tg.metrics();
        let quiet = m.sum("tailgate_buffer_spans", &[]) == 0.0
            && m.sum("tailgate_export_queue_spans", &[]) == 0.0;
        quiet.then_some(m)
    });
    stop.stop();
    sampler.join().unwrap();
    let m = settled.expect("buffer and export queue drained");

    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "sent {} MiB; peak RSS {} MiB; 503s: {}; received {} kept {} dropped {} refused {} exported {}; early (memory) decisions {}",
        sent_bytes.load(Ordering::Relaxed) >> 20,
        peak >> 20,
        unavailable.load(Ordering::Relaxed),
        m.received(),
        m.kept(),
        m.dropped(),
        m.refused(),
        m.exported(),
        m.sum("tailgate_traces_decided_total", &["trigger=\"memory\""]),
    );
    assert!(
        m.sum("tailgate_traces_decided_total", &["trigger=\"memory\""]) > 0.0,
        "early decisions happened"
    );
    assert!(m.received() > 0.0);
    assert_eq!(
        m.received(),
        m.kept() + m.dropped() + m.refused(),
        "received = kept + dropped + refused"
    );
    assert_eq!(m.kept(), m.exported(), "every kept span exported");
    let delivered: usize = backend.received.lock().unwrap().spans.values().sum();
    assert_eq!(
        delivered as f64,
        m.exported(),
        "the backend saw every exported span"
    );
    // 64 MiB went through a 4 MiB buffer; what stays resident is the buffer, the export queue
    // and requests in flight, not the input.
    assert!(peak < 64 << 20, "peak RSS {} MiB", peak >> 20);
}
