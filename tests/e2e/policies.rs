//! The bundled WebAssembly policies deciding real traces through the real binary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message;

use crate::support::*;

const CHAIN: &str = r#"
[buffer]
root_grace = "100ms"

[decide]
default = "drop"

[[policies]]
name = "errors"
plugin = "keep-errors"

[[policies]]
name = "slow"
plugin = "latency"
[policies.config]
threshold_ms = 500

[[policies]]
name = "sample"
plugin = "probabilistic"
[policies.config]
rate = 0.25
"#;

/// A trace of two spans; the root lasts `ms` milliseconds.
fn trace(
    n: u64,
    error: bool,
    ms: u64,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    let mut root = SpanSpec::new(n, n * 10 + 1, 0);
    root.error = error;
    let child = SpanSpec::new(n, n * 10 + 2, n * 10 + 1);
    let mut req = request("svc", &[root, child]);
    let span = &mut req.resource_spans[0].scope_spans[0].spans[0];
    span.start_time_unix_nano = span.end_time_unix_nano - ms * 1_000_000;
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_chain_keeps_errors_slow_traces_and_a_consistent_sample() {
    let tg = Tailgate::start(CHAIN);
    // 20 error traces, 20 slow ones, 400 ordinary ones.
    let mut kind: HashMap<Vec<u8>, &str> = HashMap::new();
    for n in 1..=440u64 {
        let (error, ms, k) = match n {
            1..=20 => (true, 5, "error"),
            21..=40 => (false, 900, "slow"),
            _ => (false, 5, "normal"),
        };
        kind.insert(trace_id(n).to_vec(), k);
        let (code, _, _) = post(
            tg.http,
            "application/x-protobuf",
            None,
            trace(n, error, ms).encode_to_vec(),
        )
        .await;
        assert_eq!(code, 200);
    }
    let m = wait_for(Duration::from_secs(30), || {
        let m = tg.metrics();
        (m.sum("tailgate_traces_decided_total", &[]) == 440.0).then_some(m)
    })
    .expect("all traces decided");
    let exported = wait_for(Duration::from_secs(10), || {
        let spans = exported_spans(&tg.exported());
        (spans.len() as f64 == m.kept()).then_some(spans)
    })
    .expect("kept spans exported");

    let mut kept_traces: HashMap<Vec<u8>, (String, String)> = HashMap::new();
    for (_, span) in &exported {
        let policy = attr(span, "sampling.policy").unwrap_or_default().to_owned();
        let reason = attr(span, "sampling.reason").unwrap_or_default().to_owned();
        kept_traces.insert(span.trace_id.clone(), (policy, reason));
    }
    let count = |k: &str| kept_traces.keys().filter(|id| kind[*id] == k).count();
    assert_eq!(count("error"), 20, "every error trace kept");
    assert_eq!(count("slow"), 20, "every slow trace kept");
    for (id, (policy, _)) in &kept_traces {
        match kind[id] {
            "error" => assert_eq!(policy, "errors"),
            "slow" => assert_eq!(policy, "slow"),
            _ => assert_eq!(policy, "sample"),
        }
    }
    // The probabilistic policy keeps by trace id: the exact set is the one OTel's
    // TraceIdRatioBased threshold gives (R >= (1 - 0.25) * 2^56 on the low 56 bits).
    let threshold = ((1.0 - 0.25) * (1u64 << 56) as f64).round() as u64;
    for n in 41..=440u64 {
        let id = trace_id(n);
        let r = u64::from_be_bytes(id[8..].try_into().unwrap()) & ((1 << 56) - 1);
        assert_eq!(
            kept_traces.contains_key(id.as_slice()),
            r >= threshold,
            "trace {n}: R = {r:014x}"
        );
    }
    // Sampled traces carry the OTel threshold for 25% in their tracestate.
    let sampled = exported
        .iter()
        .find(|(_, s)| kind[&s.trace_id] == "normal")
        .expect("some normal trace sampled");
    assert!(
        sampled.1.trace_state.contains("ot=th:c"),
        "{:?}",
        sampled.1.trace_state
    );

    assert_eq!(m.received(), m.accounted());
    assert_eq!(
        m.sum(
            "tailgate_policy_calls_total",
            &["policy=\"errors\"", "outcome=\"keep\""]
        ),
        20.0
    );
    assert!(m.sum("tailgate_policy_info", &["policy=\"slow\""]) == 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_rule_attribute_span_count_and_rate_limit_through_the_host() {
    let tg = Tailgate::start(
        r#"
[buffer]
root_grace = "100ms"
workers = 1

[decide]
default = "drop"

[[policies]]
name = "health"
plugin = "drop"
drop_rule = true
[policies.config]
names = ["GET /healthz"]

[[policies]]
name = "vip"
plugin = "attribute"
[policies.config]
key = "tenant.id"
equals = "vip"

[[policies]]
name = "big"
plugin = "span-count"
[policies.config]
min_spans = 5

[[policies]]
name = "budget"
plugin = "rate-limit"
[policies.config]
spans_per_second = 0.001
burst = 4
"#,
    );
    let send = |n: u64, root_name: &str, spans: u64, tenant: &str| {
        let mut specs: Vec<SpanSpec> = (1..=spans)
            .map(|s| SpanSpec::new(n, n * 100 + s, if s == 1 { 0 } else { n * 100 + 1 }))
            .collect();
        specs[0].name = root_name.to_owned();
        for s in &mut specs {
            s.attrs.push(("tenant.id".into(), tenant.into()));
        }
        request("svc", &specs).encode_to_vec()
    };
    let cases = [
        // (trace, root name, spans, tenant, expected deciding policy, kept)
        (1u64, "GET /healthz", 6, "vip", "health", false), // the drop rule wins over every keep
        (2, "POST /chat", 2, "vip", "vip", true),
        (3, "POST /chat", 6, "acme", "big", true),
        // Every policy sees every trace: trace 2 already took 2 of the 4-token burst (the
        // 6-span traces never fit), so trace 4 takes the last 2 and trace 5 finds it empty.
        (4, "POST /chat", 2, "acme", "budget", true),
        (5, "POST /chat", 2, "acme", "default", false),
    ];
    for (n, name, spans, tenant, _, _) in cases {
        let (code, _, _) = post(
            tg.http,
            "application/x-protobuf",
            None,
            send(n, name, spans, tenant),
        )
        .await;
        assert_eq!(code, 200);
        // One at a time, so the token bucket sees them in order.
        let decided = wait_for(Duration::from_secs(10), || {
            (tg.metrics().sum("tailgate_traces_decided_total", &[]) == n as f64).then_some(())
        });
        assert!(decided.is_some(), "trace {n} decided");
    }
    let m = tg.metrics();
    for (n, _, _, _, policy, kept) in cases {
        let verdict = if kept {
            "verdict=\"keep\""
        } else {
            "verdict=\"drop\""
        };
        let label = format!("policy=\"{policy}\"");
        assert!(
            m.sum("tailgate_traces_decided_total", &[verdict, &label]) >= 1.0,
            "trace {n}: expected {verdict} by {policy}"
        );
    }
    assert_eq!(
        m.sum("tailgate_traces_decided_total", &["verdict=\"keep\""]),
        3.0
    );
    assert_eq!(
        m.sum(
            "tailgate_traces_decided_total",
            &["verdict=\"keep\"", "policy=\"budget\""]
        ),
        1.0
    );
    assert_eq!(m.received(), m.accounted());
}

/// A flood of junk `tenant.id` values, on the default config (no allow-list, the default
/// `plugins.label_ttl` of a minute), cannot push real tenants into `__overflow__` for good:
/// once the flood has been quiet for the ttl, real tenants are counted under their names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tenants_are_counted_under_their_names_a_minute_after_a_junk_flood() {
    let tg = Tailgate::start(
        "[buffer]\nroot_grace = \"100ms\"\n\n[[policies]]\nname = \"cost\"\nplugin = \"llm-cost\"\n\
         [policies.config]\nfallback = { input_per_1k = 0.003, output_per_1k = 0.015 }\n",
    );
    let llm_trace = |n: u64, tenant: &str| {
        let mut span = SpanSpec::new(n, n, 0);
        span.attrs = vec![
            ("tenant.id".into(), tenant.into()),
            ("gen_ai.request.model".into(), "gpt-4o".into()),
        ];
        span.ints = vec![("gen_ai.usage.input_tokens".into(), 1000)];
        span
    };
    // 10,000 junk tenants, 500 traces a request.
    for batch in 0..20u64 {
        let spans: Vec<SpanSpec> = (0..500)
            .map(|i| {
                let n = batch * 500 + i + 1;
                llm_trace(n, &format!("junk-{n}"))
            })
            .collect();
        let body = request("flood", &spans).encode_to_vec();
        let (code, _, _) = post(tg.http, "application/x-protobuf", None, body).await;
        assert_eq!(code, 200);
    }
    let series = |tenant: &str| {
        tg.metrics().sum(
            "tailgate_policy_llm_input_tokens_total",
            &[&format!("tenant=\"{tenant}\"")],
        )
    };
    let flooded = wait_for(Duration::from_secs(30), || {
        (series("__overflow__") >= 9_000.0 * 1000.0).then_some(())
    });
    assert!(flooded.is_some(), "the flood fills the label and folds");
    let quiet_since = Instant::now();
    // Right after it, a real tenant still folds: the junk holds the places for the ttl.
    let send_real = |n: u64, tenant: &'static str| {
        let body = request("app", &[llm_trace(n, tenant)]).encode_to_vec();
        let addr = tg.http;
        async move {
            let (code, _, _) = post(addr, "application/x-protobuf", None, body).await;
            assert_eq!(code, 200);
        }
    };
    send_real(20_001, "acme").await;
    let decided = |n: f64| {
        wait_for(Duration::from_secs(20), || {
            (tg.metrics().sum("tailgate_traces_decided_total", &[]) >= n).then_some(())
        })
    };
    assert!(decided(10_001.0).is_some());
    assert_eq!(series("acme"), 0.0, "folded while the junk is fresh");
    // A minute after the flood, real tenants get their own names.
    let ttl = Duration::from_secs(60);
    tokio::time::sleep(ttl.saturating_sub(quiet_since.elapsed()) + Duration::from_secs(2)).await;
    send_real(20_002, "acme").await;
    send_real(20_003, "globex").await;
    assert!(decided(10_003.0).is_some());
    assert_eq!(series("acme"), 1000.0, "{:?}", tg.metrics().0.len());
    assert_eq!(series("globex"), 1000.0);
}

/// Every string value of every exported span, with its key.
fn exported_strings(tg: &Tailgate) -> Vec<(String, String)> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    exported_spans(&tg.exported())
        .into_iter()
        .flat_map(|(_, span)| span.attributes)
        .filter_map(|kv| match kv.value?.value? {
            Value::StringValue(s) => Some((kv.key, s)),
            _ => None,
        })
        .collect()
}

/// A span that arrives after its trace was kept goes through the enrichments too: an e-mail
/// address in it is redacted before export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_span_carrying_an_email_address_is_redacted() {
    let tg = Tailgate::start(
        "[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"keep\"\n\n\
         [[policies]]\nname = \"hygiene\"\nplugin = \"attribute-hygiene\"\nmode = \"enrich\"\n",
    );
    let send = |spans: Vec<SpanSpec>| {
        let body = request("app", &spans).encode_to_vec();
        let addr = tg.http;
        async move {
            let (code, _, _) = post(addr, "application/x-protobuf", None, body).await;
            assert_eq!(code, 200);
        }
    };
    send(vec![SpanSpec::new(1, 1, 0)]).await;
    let decided = wait_for(Duration::from_secs(20), || {
        (tg.metrics().sum("tailgate_traces_decided_total", &[]) == 1.0).then_some(())
    });
    assert!(decided.is_some());
    let mut late = SpanSpec::new(1, 2, 1);
    late.attrs = vec![("user.contact".into(), "write to alice@example.com".into())];
    send(vec![late]).await;
    let strings = wait_for(Duration::from_secs(20), || {
        let strings = exported_strings(&tg);
        strings
            .iter()
            .any(|(k, _)| k == "user.contact")
            .then_some(strings)
    })
    .expect("the late span is exported");
    let contact = strings.iter().find(|(k, _)| k == "user.contact").unwrap();
    assert_eq!(contact.1, "write to [REDACTED:email]");
    let m = tg.metrics();
    assert_eq!(
        m.sum("tailgate_late_spans_total", &["verdict=\"keep\""]),
        1.0
    );
    assert_eq!(m.received(), m.accounted());
}

/// A fail-closed hygiene that fails on a kept trace (here: out of fuel on a trace far larger
/// than the sample traces it was tried on) exports none of the text it would have redacted:
/// every text attribute goes, numbers stay, and the trace is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fail_closed_hygiene_exports_no_text_it_would_have_redacted() {
    let tg = Tailgate::start(&format!(
        "[buffer]\nroot_grace = \"100ms\"\n\n[decide]\ndefault = \"keep\"\n\n\
         [[policies]]\nname = \"hygiene\"\nplugin = \"attribute-hygiene\"\nmode = \"enrich\"\n\
         on_enrich_error = \"fail_closed\"\nfuel = {HYGIENE_FUEL}\n"
    ));
    let spans: Vec<SpanSpec> = (1..=400u64)
        .map(|i| {
            let mut span = SpanSpec::new(1, i, if i == 1 { 0 } else { 1 });
            span.attrs = vec![(
                "note".into(),
                format!("span {i}: ask bob{i}@example.com, {}", "x".repeat(150)),
            )];
            span.ints = vec![("attempt".into(), i as i64)];
            span
        })
        .collect();
    let body = request("app", &spans).encode_to_vec();
    let (code, _, _) = post(tg.http, "application/x-protobuf", None, body).await;
    assert_eq!(code, 200);
    let exported = wait_for(Duration::from_secs(20), || {
        let spans = exported_spans(&tg.exported());
        (spans.len() == 400).then_some(spans)
    })
    .expect("the trace is kept and exported");
    let m = tg.metrics();
    assert_eq!(
        m.sum(
            "tailgate_policy_failed_closed_total",
            &["policy=\"hygiene\""]
        ),
        1.0,
        "the hygiene call failed and the trace was closed"
    );
    assert!(
        m.sum("tailgate_policy_failures_total", &["kind=\"fuel\""]) >= 1.0,
        "out of fuel"
    );
    for (_, span) in &exported {
        assert!(attr(span, "note").is_none(), "a text attribute survived");
        assert!(
            span.attributes.iter().any(|kv| kv.key == "attempt"),
            "numbers stay"
        );
        assert_eq!(
            attr(span, "sampling.policy"),
            Some("default"),
            "the stamp is added after"
        );
    }
    assert!(
        !exported_strings(&tg)
            .iter()
            .any(|(_, v)| v.contains("@example.com")),
        "an address was exported"
    );
}

/// Enough fuel for attribute-hygiene's `init` and its trial on the sample traces, far too
/// little for a trace of 400 spans of long text (fuel counts Wasm instructions, so this holds
/// on any machine).
const HYGIENE_FUEL: u64 = 3_000_000;
