//! `tailgate loadgen`, the real binary: every seq of a run arrives exactly once over gRPC and
//! over HTTP (through a backend that is unavailable at first, so retries are exercised), through
//! a real tailgate, and in an `--out` file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// Runs `tailgate loadgen` with `args`; returns its exit status and parsed JSON summary.
fn loadgen(args: &[&str]) -> (Output, Value) {
    let out = Command::new(BIN)
        .arg("loadgen")
        .args(args)
        .output()
        .expect("run tailgate loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "loadgen printed no JSON summary ({e}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, summary)
}

fn assert_each_seq_once(seqs: &HashMap<u64, usize>, n: u64) {
    let missing = (0..n).filter(|s| !seqs.contains_key(s)).count();
    let extra = seqs.keys().filter(|s| **s >= n).count();
    let twice = seqs.values().filter(|c| **c > 1).count();
    assert_eq!(
        (missing, extra, twice),
        (0, 0, 0),
        "(missing, out of range, duplicated) seqs of 0..{n}"
    );
}

fn n(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

/// Requests the test backend refuses before it accepts.
const REFUSED: usize = 5;

async fn every_seq_arrives_once(grpc: bool) {
    // The first requests are refused as unavailable: they are retried, none is lost or doubled.
    let backend = start_backend(grpc, Behaviour::RefuseFirst(REFUSED)).await;
    let endpoint = format!("http://{}", backend.addr);
    let args = [
        "--endpoint",
        &endpoint,
        "--protocol",
        if grpc { "grpc" } else { "http" },
        "--connections",
        "3",
        "--spans",
        "3000",
        "--rate",
        "3000",
        "--traces-per-request",
        "4",
        "--quiet",
    ];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    // The backend serves on this test's runtime: wait for the binary off it.
    let (out, summary) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        loadgen(&args)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "loadgen failed: {summary}");
    assert_eq!(n(&summary, "seq_count"), 3000);
    assert_eq!(n(&summary, "spans_sent"), 3000);
    assert_eq!(n(&summary, "spans_accepted"), 3000);
    assert_eq!(n(&summary, "requests_failed"), 0);
    assert_eq!(
        backend.received.lock().unwrap().refused,
        REFUSED,
        "the backend refused its first requests"
    );
    assert!(
        n(&summary, "retries") >= REFUSED as u64,
        "each of the {REFUSED} refused requests was retried and counted: {summary}"
    );
    // Paced at 3000 spans/s, 3000 spans take about a second, not a burst.
    let elapsed = summary["elapsed_seconds"].as_f64().unwrap();
    assert!(elapsed > 0.8, "paced run took {elapsed}s");
    assert_each_seq_once(&backend.received.lock().unwrap().seqs, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_grpc_delivers_every_seq_once_through_retries() {
    every_seq_arrives_once(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_http_delivers_every_seq_once_through_retries() {
    every_seq_arrives_once(false).await;
}

#[test]
fn loadgen_through_a_real_tailgate_every_seq_is_received_and_exported_once() {
    let tg = Tailgate::start("[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"keep\"\n");
    let endpoint = format!("http://{}", tg.grpc);
    let (out, summary) = loadgen(&[
        "--endpoint",
        &endpoint,
        "--spans",
        "2400",
        "--rate",
        "0",
        "--spans-per-trace",
        "8",
        "--quiet",
    ]);
    assert!(out.status.success(), "loadgen failed: {summary}");
    assert_eq!(n(&summary, "spans_accepted"), 2400);
    let m = wait_for(Duration::from_secs(20), || {
        let m = tg.metrics();
        (m.exported() == 2400.0).then_some(m)
    })
    .expect("tailgate exports every span");
    assert_eq!(m.received(), 2400.0);
    let mut seqs = HashMap::new();
    for (_, span) in exported_spans(&tg.exported()) {
        *seqs.entry(seq_of(&span).expect("seq")).or_insert(0usize) += 1;
    }
    assert_each_seq_once(&seqs, 2400);
}

#[test]
fn loadgen_out_writes_requests_that_decode_back_to_every_seq_once() {
    let dir = TempDir::new("loadgen-out");
    let path = dir.path().join("load.otlp");
    let report = dir.path().join("report.json");
    let (out, summary) = loadgen(&[
        "--out",
        path.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--spans",
        "1500",
        "--connections",
        "2",
    ]);
    assert!(out.status.success(), "loadgen --out failed: {summary}");
    let requests = read_requests(&path).expect("read the file back");
    assert_eq!(requests.len() as u64, n(&summary, "requests"));
    let mut seqs = HashMap::new();
    for (_, span) in exported_spans(&requests) {
        *seqs.entry(seq_of(&span).expect("seq")).or_insert(0usize) += 1;
    }
    assert_each_seq_once(&seqs, 1500);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report file")).unwrap();
    assert_eq!(written, summary, "--report holds the printed summary");
}

#[test]
fn loadgen_to_a_closed_port_fails_with_exit_1_and_says_why() {
    // A port nobody listens on: bind one, learn it, close it.
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{addr}");
    let (out, summary) = loadgen(&[
        "--endpoint",
        &endpoint,
        "--spans",
        "30",
        "--timeout",
        "1s",
        "--retry-for",
        "1s",
        "--quiet",
    ]);
    assert!(!out.status.success());
    assert_eq!(n(&summary, "spans_accepted"), 0);
    assert_eq!(n(&summary, "spans_failed"), 30);
    assert!(!summary["errors"].as_array().unwrap().is_empty());
}
