//! Deliberately hostile policies, built from `tests/plugins/`: each is contained, counted and
//! reported while the host keeps deciding other traces.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

use crate::support::*;

/// A private folder holding copies of the named components; its path is absolute, so the
/// config can name them whatever folder the config file ends up in.
struct Plugins(TempDir);

impl Plugins {
    fn new(names: &[&str]) -> Self {
        let dir = TempDir::new("hostile-wasm");
        for name in names {
            let file = format!("{name}.wasm");
            std::fs::copy(test_plugin(name), dir.path().join(&file))
                .unwrap_or_else(|e| panic!("copy {file}: {e}"));
        }
        Self(dir)
    }

    /// `path = "..."` for a config, absolute.
    fn path(&self, name: &str) -> String {
        format!(
            "{:?}",
            self.0
                .path()
                .join(format!("{name}.wasm"))
                .display()
                .to_string()
        )
    }
}

/// One trace of two spans (root first, so the root is span index 0) whose root is `name`.
fn trace(n: u64, root_name: &str) -> ExportTraceServiceRequest {
    let mut root = SpanSpec::new(n, n * 10 + 1, 0);
    root.name = root_name.to_owned();
    root.attrs = vec![
        ("http.route".into(), "/a".into()),
        ("n".into(), n.to_string()),
    ];
    let mut child = SpanSpec::new(n, n * 10 + 2, n * 10 + 1);
    child.attrs = vec![("db.system".into(), "pg".into())];
    request("svc", &[root, child])
}

async fn send(tg: &Tailgate, req: &ExportTraceServiceRequest) {
    let (code, _, body) = post(tg.http, "application/x-protobuf", None, req.encode_to_vec()).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

fn decided(tg: &Tailgate) -> f64 {
    tg.metrics().sum("tailgate_traces_decided_total", &[])
}

/// Waits until `n` traces are decided; returns the metrics then.
fn wait_decided(tg: &Tailgate, n: f64) -> Metrics {
    wait_for(Duration::from_secs(20), || {
        let m = tg.metrics();
        (m.sum("tailgate_traces_decided_total", &[]) >= n).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "{n} traces were not decided; decided {}; log:\n{}",
            decided(tg),
            tg.log().join("\n")
        )
    })
}

/// Exported spans of trace `n`, once the exporter has written `want` of them.
fn exported_of(
    tg: &Tailgate,
    n: u64,
    want: usize,
) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
    let id = trace_id(n);
    wait_for(Duration::from_secs(10), || {
        let spans: Vec<_> = exported_spans(&tg.exported())
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.trace_id == id)
            .collect();
        (spans.len() >= want).then_some(spans)
    })
    .unwrap_or_else(|| panic!("trace {n} was not exported with {want} spans"))
}

fn exported_ids(tg: &Tailgate) -> Vec<Vec<u8>> {
    let mut ids: Vec<_> = exported_spans(&tg.exported())
        .into_iter()
        .map(|(_, s)| s.trace_id)
        .collect();
    ids.dedup();
    ids
}

fn failures(m: &Metrics, policy: &str, kind: &str) -> f64 {
    m.sum(
        "tailgate_policy_failures_total",
        &[&format!("policy=\"{policy}\""), &format!("kind=\"{kind}\"")],
    )
}

fn calls(m: &Metrics, policy: &str, outcome: &str) -> f64 {
    m.sum(
        "tailgate_policy_calls_total",
        &[
            &format!("policy=\"{policy}\""),
            &format!("outcome=\"{outcome}\""),
        ],
    )
}

const HEAD: &str = "[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"drop\"\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_cut_off_at_the_deadline_and_deciding_goes_on() {
    let plugins = Plugins::new(&["hostile-spin"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"spin\"\npath = {}\ntimeout = \"50ms\"\non_error = \"keep\"\n",
        plugins.path("hostile-spin")
    ));

    let sent = Instant::now();
    send(&tg, &trace(1, "spin")).await;
    let m = wait_decided(&tg, 1.0);
    let decided_after = sent.elapsed();
    let spans = exported_of(&tg, 1, 2);
    let exported_after = sent.elapsed();
    let call_seconds = m.sum("tailgate_policy_call_seconds_sum", &["policy=\"spin\""]);
    eprintln!(
        "spin trace: decided {decided_after:?} after sending (root_grace 100 ms + timeout 50 ms \
         + 5 ms epoch tick = 155 ms bound, plus polling), exported after {exported_after:?}; \
         time inside the spinning call {:.1} ms",
        call_seconds * 1000.0
    );
    assert!(
        decided_after < Duration::from_secs(5),
        "the spin trace took {decided_after:?} to decide"
    );
    assert!(
        (0.045..2.0).contains(&call_seconds),
        "the spinning call ran {call_seconds} s against a 50 ms deadline"
    );
    assert!(failures(&m, "spin", "timeout") >= 1.0, "timeout counted");
    for s in &spans {
        assert_eq!(attr(s, "sampling.policy"), Some("spin"), "kept by on_error");
        assert!(
            attr(s, "sampling.reason").is_some_and(|r| r.contains("timeout")),
            "{:?}",
            attr(s, "sampling.reason")
        );
    }

    // The host keeps deciding: a normal trace right after is decided (dropped by default).
    send(&tg, &trace(2, "normal")).await;
    let m = wait_decided(&tg, 2.0);
    assert_eq!(calls(&m, "spin", "abstain"), 1.0);
    assert_eq!(
        m.sum(
            "tailgate_traces_decided_total",
            &["policy=\"default\"", "verdict=\"drop\""]
        ),
        1.0
    );
    assert_eq!(failures(&m, "spin", "timeout"), 1.0);
    assert_eq!(exported_ids(&tg), vec![trace_id(1).to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_stops_at_the_memory_cap() {
    let plugins = Plugins::new(&["hostile-grow"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"grow\"\npath = {}\nmemory_limit = \"4MiB\"\non_error = \"keep\"\n",
        plugins.path("hostile-grow")
    ));
    let rss_before = tg.rss();
    send(&tg, &trace(1, "grow")).await;
    let m = wait_decided(&tg, 1.0);
    // chain.rs `failure_kind`: the store limiter (trap_on_grow_failure) fails the grow with
    // an error that is not a `wasmtime::Trap` and whose text mentions memory: kind "memory".
    assert_eq!(failures(&m, "grow", "memory"), 1.0, "{:?}", m.0);
    assert_eq!(failures(&m, "grow", "trap"), 0.0);
    let spans = exported_of(&tg, 1, 2);
    assert!(
        spans
            .iter()
            .all(|s| attr(s, "sampling.policy") == Some("grow")),
        "kept by on_error"
    );
    // A second hoarder hits a fresh instance and the same cap; a normal trace still abstains.
    send(&tg, &trace(2, "grow")).await;
    send(&tg, &trace(3, "normal")).await;
    let m = wait_decided(&tg, 3.0);
    assert_eq!(failures(&m, "grow", "memory"), 2.0);
    assert_eq!(calls(&m, "grow", "abstain"), 1.0);
    let (rss, peak) = (tg.rss(), tg.peak_rss());
    eprintln!(
        "grow: RSS {} MiB before, {} MiB after, peak {} MiB",
        rss_before >> 20,
        rss >> 20,
        peak >> 20
    );
    assert!(peak < 200 << 20, "peak RSS {} MiB", peak >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_policy_is_counted_and_its_instance_rebuilt() {
    let plugins = Plugins::new(&["hostile-panic"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"panic\"\npath = {}\non_error = \"drop\"\n",
        plugins.path("hostile-panic")
    ));
    send(&tg, &trace(1, "panic")).await;
    let m = wait_decided(&tg, 1.0);
    assert_eq!(failures(&m, "panic", "trap"), 1.0, "{:?}", m.0);
    assert_eq!(
        m.sum("tailgate_traces_decided_total", &["verdict=\"drop\""]),
        1.0
    );

    send(&tg, &trace(2, "normal")).await;
    wait_decided(&tg, 2.0);
    let spans = exported_of(&tg, 2, 2);
    for s in &spans {
        assert_eq!(attr(s, "sampling.policy"), Some("panic"));
        assert_eq!(attr(s, "sampling.reason"), Some("panic-policy-alive"));
    }
    assert_eq!(exported_ids(&tg), vec![trace_id(2).to_vec()]);
    let m = tg.metrics();
    assert_eq!(calls(&m, "panic", "keep"), 1.0);
    // The SDK's panic hook logs the message through the host before the trap.
    assert!(
        tg.log()
            .iter()
            .any(|l| l.contains("hostile-panic was asked to panic")),
        "panic message logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summary_only_policy_failing_a_batch_is_contained_and_rebuilt() {
    let plugins = Plugins::new(&["hostile-summary"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"summary\"\npath = {}\non_error = \"drop\"\n",
        plugins.path("hostile-summary")
    ));
    // Six traces in one request, so each worker decides its share as one batch; trace 6 has
    // three spans, which makes the policy panic on that batch.
    let mut spans = Vec::new();
    for n in 1..=6u64 {
        spans.push(SpanSpec::new(n, n * 10 + 1, 0));
        spans.push(SpanSpec::new(n, n * 10 + 2, n * 10 + 1));
    }
    spans.push(SpanSpec::new(6, 63, 61));
    send(&tg, &request("svc", &spans)).await;
    let m = wait_decided(&tg, 6.0);
    assert_eq!(failures(&m, "summary", "trap"), 1.0, "{:?}", m.0);
    // One call per batch, not per trace: at most one batch for each of the two workers.
    let batches = m.sum(
        "tailgate_policy_call_seconds_count",
        &["policy=\"summary\""],
    );
    assert!(
        (1.0..=2.0).contains(&batches),
        "{batches} calls for 6 traces"
    );
    // on_error = "drop" for every trace of the failed batch (an ordinary policy's drop, so
    // the chain's default, drop, stands for it).
    let failed_batch = m.sum("tailgate_traces_decided_total", &["verdict=\"drop\""]);
    assert!(failed_batch >= 1.0, "trace 6 dropped by on_error");
    assert_eq!(calls(&m, "summary", "keep") + failed_batch, 6.0);

    // The instance was rebuilt: a later trace is decided normally.
    send(&tg, &trace(7, "normal")).await;
    wait_decided(&tg, 7.0);
    let spans = exported_of(&tg, 7, 2);
    for s in &spans {
        assert_eq!(attr(s, "sampling.policy"), Some("summary"));
        assert_eq!(attr(s, "sampling.reason"), Some("summary-policy-alive"));
    }
    assert!(!exported_ids(&tg).contains(&trace_id(6).to_vec()));
    let m = tg.metrics();
    assert_eq!(
        m.sum("tailgate_spans_received_total", &[]),
        m.sum("tailgate_spans_kept_total", &[]) + m.sum("tailgate_spans_dropped_total", &[])
    );
    assert!(
        tg.log()
            .iter()
            .any(|l| l.contains("hostile-summary was given three spans")),
        "panic message logged"
    );
}

/// Attributes as comparable (key, encoded value) pairs.
fn attrs(list: &[KeyValue]) -> Vec<(String, Vec<u8>)> {
    list.iter()
        .map(|kv| (kv.key.clone(), kv.encode_to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_patches_leave_the_trace_untouched() {
    let plugins = Plugins::new(&["hostile-patch"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"patch\"\npath = {}\n",
        plugins.path("hostile-patch")
    ));
    let sent = [
        trace(1, "badindex"),
        trace(2, "oversize"),
        trace(3, "normal"),
    ];
    for req in &sent {
        send(&tg, req).await;
    }
    let m = wait_decided(&tg, 3.0);
    assert_eq!(calls(&m, "patch", "invalid_edits"), 2.0, "{:?}", m.0);
    assert_eq!(calls(&m, "patch", "keep"), 3.0);

    for (n, req) in [(1u64, &sent[0]), (2, &sent[1])] {
        let spans = exported_of(&tg, n, 2);
        for s in &spans {
            let original = req.resource_spans[0].scope_spans[0]
                .spans
                .iter()
                .find(|o| o.span_id == s.span_id)
                .expect("exported span was sent");
            assert!(attr(s, "x").is_none(), "trace {n}: patch applied");
            let (stamps, rest): (Vec<_>, Vec<_>) = s
                .attributes
                .iter()
                .cloned()
                .partition(|kv| kv.key.starts_with("sampling."));
            assert_eq!(
                attrs(&rest),
                attrs(&original.attributes),
                "trace {n}: attributes changed"
            );
            let mut keys: Vec<_> = stamps.iter().map(|kv| kv.key.as_str()).collect();
            keys.sort();
            assert_eq!(
                keys,
                ["sampling.policy", "sampling.reason", "sampling.trigger"],
                "trace {n}"
            );
            assert_eq!(attr(s, "sampling.policy"), Some("patch"));
        }
    }
    let spans = exported_of(&tg, 3, 2);
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    let child = spans.iter().find(|s| !s.parent_span_id.is_empty()).unwrap();
    assert_eq!(
        attr(root, "ok.patched"),
        Some("yes"),
        "valid patch on span 0"
    );
    assert_eq!(attr(child, "ok.patched"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_quarantine_the_policy() {
    let plugins = Plugins::new(&["hostile-panic"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"fragile\"\npath = {}\non_error = \"abstain\"\n\
         quarantine_after = 3\nquarantine_for = \"60s\"\n",
        plugins.path("hostile-panic")
    ));
    for n in 1..=3 {
        send(&tg, &trace(n, "panic")).await;
    }
    let m = wait_decided(&tg, 3.0);
    assert_eq!(failures(&m, "fragile", "trap"), 3.0, "{:?}", m.0);
    assert_eq!(
        m.sum("tailgate_policy_quarantines_total", &["policy=\"fragile\""]),
        1.0
    );
    assert!(
        tg.log().iter().any(|l| l.contains("quarantined")),
        "a log line mentions the quarantine"
    );

    // Skipped while quarantined: normal traces that it would keep fall to the default (drop).
    for n in 4..=5 {
        send(&tg, &trace(n, "normal")).await;
    }
    let m = wait_decided(&tg, 5.0);
    assert_eq!(calls(&m, "fragile", "quarantined"), 2.0);
    assert_eq!(calls(&m, "fragile", "keep"), 0.0);
    assert_eq!(
        m.sum("tailgate_policy_quarantines_total", &["policy=\"fragile\""]),
        1.0
    );
    assert_eq!(
        m.sum(
            "tailgate_traces_decided_total",
            &["policy=\"default\"", "verdict=\"drop\""]
        ),
        5.0
    );
    assert!(tg.exported().is_empty());
}

/// Traces shaped to time a policy out must not quarantine it for everyone: one far larger
/// than any the policy has decided within its timeout fails (on_error applies) without
/// counting toward quarantine, while failures on traces of an ordinary size still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_traces_that_time_a_policy_out_do_not_quarantine_it() {
    let plugins = Plugins::new(&["hostile-spin"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"spin\"\npath = {}\ntimeout = \"20ms\"\n\
         on_error = \"keep\"\nquarantine_after = 2\nquarantine_for = \"60s\"\n",
        plugins.path("hostile-spin")
    ));
    // Two-span traces decided in time teach the host the policy's ordinary size.
    send(&tg, &trace(1, "normal")).await;
    wait_decided(&tg, 1.0);
    // Three spinning traces of 20 spans each: past twice the largest decided.
    for n in 2..=4 {
        let mut root = SpanSpec::new(n, n * 100, 0);
        root.name = "spin".into();
        let mut spans = vec![root];
        spans.extend((1..20).map(|k| SpanSpec::new(n, n * 100 + k, n * 100)));
        send(&tg, &request("svc", &spans)).await;
        wait_decided(&tg, n as f64);
    }
    let m = tg.metrics();
    let quarantines =
        |m: &Metrics| m.sum("tailgate_policy_quarantines_total", &["policy=\"spin\""]);
    assert_eq!(failures(&m, "spin", "timeout"), 3.0, "{:?}", m.0);
    assert_eq!(quarantines(&m), 0.0, "oversized failures do not quarantine");
    // Two spinning traces of the ordinary size do.
    for n in 5..=6 {
        send(&tg, &trace(n, "spin")).await;
    }
    let m = wait_decided(&tg, 6.0);
    assert_eq!(failures(&m, "spin", "timeout"), 5.0, "{:?}", m.0);
    assert_eq!(quarantines(&m), 1.0);
}

/// Traffic that fails every call must not flood the host's log: its lines about a policy share
/// the policy's `log_per_second`, while every failure is still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_logs_are_rate_limited_and_failures_still_counted() {
    let plugins = Plugins::new(&["hostile-panic"]);
    let tg = Tailgate::start(&format!(
        "{HEAD}[[policies]]\nname = \"fragile\"\npath = {}\non_error = \"abstain\"\n\
         log_per_second = 2\nquarantine_after = 1000\n",
        plugins.path("hostile-panic")
    ));
    let started = Instant::now();
    let mut burst = trace(1, "panic");
    for n in 2..=60 {
        burst
            .resource_spans
            .extend(trace(n, "panic").resource_spans);
    }
    send(&tg, &burst).await;
    let m = wait_decided(&tg, 60.0);
    let seconds = started.elapsed().as_secs() + 1;
    assert_eq!(failures(&m, "fragile", "trap"), 60.0, "{:?}", m.0);
    let lines = tg
        .log()
        .iter()
        .filter(|l| l.contains("policy call failed"))
        .count() as u64;
    assert!(
        (1..=2 * (seconds + 1)).contains(&lines),
        "{lines} failure lines in {seconds} s at 2 a second"
    );
}

/// `(component (type (instance)) (import "<name>" (instance (type 0))))` in the component
/// binary format, encoded by hand (the `wat` crate is not a dependency).
fn component_importing(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let mut c = vec![0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    // Type section (7): one empty instance type (0x42, no declarations).
    c.extend([0x07, 0x03, 0x01, 0x42, 0x00]);
    // Import section (10): one import, plain name, extern desc instance (0x05) of type 0.
    let mut body = vec![0x01, 0x00, name.len() as u8];
    body.extend(name);
    body.extend([0x05, 0x00]);
    c.push(0x0a);
    c.push(body.len() as u8);
    c.extend(body);
    c
}

/// Starts tailgate with `component` as its only policy, `evil`, checks that it refuses the
/// policy by name and exits with a failure rather than running, and returns its stderr.
fn refused_at_load(component: Vec<u8>) -> String {
    let dir = TempDir::new("hostile-refused");
    std::fs::write(dir.path().join("evil.wasm"), component).unwrap();
    let config = dir.path().join("tailgate.toml");
    std::fs::write(
        &config,
        "[receivers]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n[admin]\n\
         endpoint = \"127.0.0.1:0\"\n\n[exporter]\ntype = \"file\"\npath = \"out.jsonl\"\n\n\
         [[policies]]\nname = \"evil\"\npath = \"evil.wasm\"\n",
    )
    .unwrap();
    // Killed on drop, should it keep running or an assertion below fail.
    let mut child = ChildGuard(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tailgate"),
    );
    let status = child
        .wait_exit(Duration::from_secs(30))
        .expect("tailgate kept running with a policy it should have refused");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("{stderr}");
    assert!(!status.success(), "{status}");
    assert!(stderr.contains("evil"), "names the policy: {stderr}");
    stderr
}

#[test]
fn a_component_importing_outside_the_contract_is_refused_at_load() {
    let stderr = refused_at_load(component_importing("wasi:filesystem/types@0.2.0"));
    assert!(stderr.contains("wasi:filesystem/types@0.2.0"), "{stderr}");
}

#[test]
fn a_component_built_for_the_previous_contract_is_refused_naming_its_version() {
    // 0.3.0 passed the trace as a resource and returned reasons and edits in the verdict.
    let stderr = refused_at_load(component_importing("tailgate:policy/host@0.3.0"));
    assert!(stderr.contains("tailgate:policy@0.3.0"), "{stderr}");
    assert!(stderr.contains("accepts 0.4.0"), "{stderr}");
}
