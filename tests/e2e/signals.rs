//! Metrics beside traces: the OTel Python SDK's tracer and meter on one endpoint, metrics over
//! every transport to the backend unchanged, their own file on the default exporter, the spec's
//! errors for bad metrics, and acknowledged metrics surviving `kill -9`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric::Data, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use crate::support::*;

/// A metrics request of one gauge named `name` with `points` data points.
fn gauge(name: &str, points: usize) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "metered")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: name.into(),
                    unit: "1".into(),
                    data: Some(Data::Gauge(Gauge {
                        data_points: (0..points)
                            .map(|i| NumberDataPoint {
                                attributes: vec![kv("slot", &i.to_string())],
                                time_unix_nano: 1_700_000_000_000_000_000 + i as u64,
                                value: Some(number_data_point::Value::AsInt(i as i64)),
                                ..Default::default()
                            })
                            .collect(),
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Metric names the backend accepted, with how many data points of each.
fn names(received: &Received) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in (received.metrics.iter())
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
    {
        let one = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![m.clone()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        *out.entry(m.name.clone()).or_default() += metric_points(&one) as usize;
    }
    out
}

/// `received + replayed = exported + failed + refused + queued`, for data points.
fn metrics_accounted(m: &Metrics) -> (f64, f64) {
    let inflow = m.sum("tailgate_metric_points_received_total", &[])
        + m.sum("tailgate_metric_points_replayed_total", &[]);
    let outflow = m.sum("tailgate_metric_points_exported_total", &[])
        + m.sum("tailgate_metric_points_export_failed_total", &[])
        + m.sum("tailgate_metric_points_refused_total", &[])
        + m.sum("tailgate_metric_points_queued", &[]);
    (inflow, outflow)
}

fn otlp_exporter(grpc: bool, backend: &Backend, extra: &str) -> String {
    format!(
        "[exporter]\ntype = \"{}\"\nendpoint = \"http://{}\"\nbatch_timeout = \"50ms\"\n\
         retry_initial_backoff = \"100ms\"\nretry_max_backoff = \"500ms\"\n{extra}\n",
        if grpc { "otlp_grpc" } else { "otlp_http" },
        backend.addr
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last value of each cumulative series of `metric`, summed per `tenant.id`.
fn final_totals(received: &Received, metric: &str) -> HashMap<String, f64> {
    let mut last: HashMap<String, (u64, String, f64)> = HashMap::new();
    for m in (received.metrics.iter())
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .filter(|m| m.name == metric)
    {
        let Some(Data::Sum(sum)) = &m.data else {
            panic!("{metric} is a sum: {m:?}")
        };
        for p in &sum.data_points {
            let mut series: Vec<String> = (p.attributes.iter())
                .map(|a| format!("{}={:?}", a.key, a.value))
                .collect();
            series.sort();
            let tenant = (p.attributes.iter())
                .find(|a| a.key == "tenant.id")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .expect("every point has a tenant.id");
            let value = match p.value {
                Some(number_data_point::Value::AsDouble(v)) => v,
                Some(number_data_point::Value::AsInt(v)) => v as f64,
                None => panic!("a point without a value"),
            };
            let key = series.join(",");
            if last
                .get(&key)
                .is_none_or(|(t, _, _)| p.time_unix_nano >= *t)
            {
                last.insert(key, (p.time_unix_nano, tenant, value));
            }
        }
    }
    let mut totals = HashMap::new();
    for (_, tenant, value) in last.into_values() {
        *totals.entry(tenant).or_default() += value;
    }
    totals
}

/// The cost-attribution pattern agent teams copy, as a new user would run it: the OTel Python
/// SDK's tracer and meter (counters with dimensions from baggage, a periodic reader), both on
/// tailgate's one gRPC endpoint, on the agent pack's config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_teams_pattern_from_the_python_sdk_on_one_endpoint() {
    let backend = start_backend(true, Behaviour::RefuseFirst(0)).await;
    let (agent, _) = crate::agent::agent_config();
    let tg = Tailgate::start(&format!("{agent}\n{}", otlp_exporter(true, &backend, "")));
    let endpoint = format!("http://{}", tg.grpc);
    let (stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_python(
            "agent_pattern.py",
            &[
                ("TAILGATE_ENDPOINT", endpoint),
                ("RUNS", "40".into()),
                ("EXPORT_INTERVAL_MS", "400".into()),
            ],
            Duration::from_secs(120),
        )
    })
    .await
    .expect("python ran");
    for sign in [
        "Failed to export",
        "error code",
        "UNIMPLEMENTED",
        "Traceback",
        "Exception",
    ] {
        assert!(
            !stderr.contains(sign),
            "the SDK reported {sign:?}:\n{stderr}"
        );
    }
    let sent: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the script's report");

    // Every data point tailgate took reached the backend, and nothing is left queued.
    let settled = wait_for(Duration::from_secs(60), || {
        let m = tg.metrics();
        let received = m.sum("tailgate_metric_points_received_total", &[]);
        let arrived = backend.received.lock().unwrap().metric_points() as f64;
        (received > 0.0
            && arrived == received
            && m.sum("tailgate_metric_points_queued", &[]) == 0.0)
            .then_some(m)
    })
    .expect("every metric point reaches the backend");
    let (inflow, outflow) = metrics_accounted(&settled);
    assert_eq!(inflow, outflow, "metric points add up");
    assert_eq!(
        settled.sum("tailgate_metric_points_exported_total", &[]),
        settled.sum("tailgate_metric_points_received_total", &[]),
        "none refused or failed"
    );

    // The final cumulative values are the script's totals, per tenant.
    {
        let received = backend.received.lock().unwrap();
        let cost = final_totals(&received, "agent.llm.cost_usd");
        let tokens = final_totals(&received, "agent.llm.tokens");
        for (tenant, want) in sent["cost"].as_object().expect("cost per tenant") {
            let got = cost.get(tenant).copied().unwrap_or_default();
            assert!(
                (got - want.as_f64().unwrap()).abs() < 1e-9,
                "{tenant}: cost {got}, sent {want}"
            );
        }
        for (tenant, want) in sent["tokens"].as_object().expect("tokens per tenant") {
            assert_eq!(
                tokens.get(tenant).copied(),
                want.as_f64(),
                "{tenant} tokens"
            );
        }
        let unit = (received.metrics.iter())
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .find(|m| m.name == "agent.llm.cost_usd")
            .map(|m| m.unit.clone());
        assert_eq!(unit.as_deref(), Some("USD"), "passed through unchanged");
    }

    // The traces were sampled as usual: every failed run kept, every span accounted for.
    let errors: Vec<String> = (sent["errors"].as_array().expect("errors").iter())
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    let spans = sent["spans"].as_f64().expect("spans sent");
    let decided = wait_for(Duration::from_secs(60), || {
        let m = tg.metrics();
        (m.received() == spans && m.accounted() == spans).then_some(())
    });
    assert!(
        decided.is_some(),
        "every span decided: {:?}",
        tg.metrics().0
    );
    let missing = wait_for(Duration::from_secs(30), || {
        let r = backend.received.lock().unwrap();
        let missing: Vec<&String> = (errors.iter())
            .filter(|t| !r.traces.keys().any(|id| hex(id) == **t))
            .collect();
        missing.is_empty().then_some(())
    });
    assert!(missing.is_some(), "every failed run is kept: {errors:?}");
}

/// Metrics over gRPC, HTTP protobuf and HTTP JSON (under a path prefix) reach an OTLP/HTTP
/// backend on its metrics path, every point once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_every_transport_reach_the_backend_on_its_metrics_path() {
    let backend = start_backend(false, Behaviour::RefuseFirst(0)).await;
    let tg = Tailgate::start_with(Setup {
        receivers: "http_path_prefix = \"/otlp\"",
        sections: &otlp_exporter(false, &backend, ""),
    });
    let mut client = MetricsServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .expect("connect");
    client
        .export(gauge("over.grpc", 3))
        .await
        .expect("gRPC metrics accepted");
    let (code, _, _) = post_to(
        tg.http,
        "/otlp/v1/metrics",
        "application/x-protobuf",
        None,
        gauge("over.http.protobuf", 4).encode_to_vec(),
    )
    .await;
    assert_eq!(code, 200);
    let json = r#"{"resourceMetrics":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"browser"}}]},
        "scopeMetrics":[{"metrics":[{"name":"over.http.json","unit":"ms","gauge":{"dataPoints":[
        {"timeUnixNano":"1700000000000000000","asDouble":1.5},{"timeUnixNano":"1700000000000000001","asInt":"2"}]}}]}]}]}"#;
    let (code, _, body) = post_to(
        tg.http,
        "/otlp/v1/metrics",
        "application/json",
        None,
        json.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _, _) = post_to(
        tg.http,
        "/v1/metrics",
        "application/x-protobuf",
        None,
        gauge("unprefixed", 1).encode_to_vec(),
    )
    .await;
    assert_eq!(code, 404, "only the prefixed paths are served");

    let want = BTreeMap::from([
        ("over.grpc".to_owned(), 3),
        ("over.http.json".to_owned(), 2),
        ("over.http.protobuf".to_owned(), 4),
    ]);
    let got = wait_for(Duration::from_secs(30), || {
        let got = names(&backend.received.lock().unwrap());
        (got == want).then_some(got)
    });
    assert_eq!(got, Some(want), "every point, once");
    let m = tg.metrics();
    assert_eq!(m.sum("tailgate_metric_points_received_total", &[]), 9.0);
    assert_eq!(m.sum("tailgate_metric_points_exported_total", &[]), 9.0);
    let (inflow, outflow) = metrics_accounted(&m);
    assert_eq!(inflow, outflow);
    assert_eq!(m.received(), 0.0, "no span was counted for them");
}

/// On the default file exporter, metrics go to a file of their own, as OTLP/JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_go_to_their_own_file_on_the_file_exporter() {
    let tg = Tailgate::start("");
    let (code, _, _) = post_to(
        tg.http,
        "/v1/metrics",
        "application/x-protobuf",
        None,
        gauge("to.file", 2).encode_to_vec(),
    )
    .await;
    assert_eq!(code, 200);
    let file = tg.dir.path().join("tailgate-data/metrics.jsonl");
    let line = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })
    .expect("the metrics file is written");
    let lines: Vec<&str> = line.lines().collect();
    assert_eq!(lines.len(), 1, "{line}");
    let request: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    let metric = &request["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0];
    assert_eq!(metric["name"], "to.file");
    assert_eq!(
        metric["gauge"]["dataPoints"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(tg.exported().is_empty(), "nothing in the traces file");
}

/// Bad metrics get the answers bad traces get: 400 / INVALID_ARGUMENT with a reason,
/// 413 / RESOURCE_EXHAUSTED past the per-request bound, 405 for another method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_metrics_get_the_spec_errors() {
    let tg = Tailgate::start_with(Setup {
        receivers: "max_spans_per_request = 5",
        sections: "",
    });
    for (content_type, body) in [
        ("application/x-protobuf", vec![0xff, 0xff, 0xff, 0xff]),
        ("application/json", b"{\"resourceMetrics\": [".to_vec()),
        ("application/json", b"{\"resourceMetrics\": 7}".to_vec()),
    ] {
        let (code, headers, body) = post_to(tg.http, "/v1/metrics", content_type, None, body).await;
        assert_eq!(code, 400, "{content_type}");
        let ct = headers["content-type"].to_str().unwrap();
        assert!(
            ct.starts_with(content_type),
            "answered in its encoding: {ct}"
        );
        if content_type == "application/x-protobuf" {
            let status = RpcStatus::decode(&body[..]).expect("a google.rpc.Status body");
            assert_eq!(status.code, 3, "INVALID_ARGUMENT");
            assert!(!status.message.is_empty());
        }
    }
    let (code, _, _) = post_to(
        tg.http,
        "/v1/metrics",
        "application/x-protobuf",
        None,
        gauge("too.many", 6).encode_to_vec(),
    )
    .await;
    assert_eq!(code, 413);
    let err = crate::conformance::raw_grpc_call(
        &tg,
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        vec![0xff, 0xff, 0xff],
    )
    .await
    .expect_err("garbage is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let mut client = MetricsServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .expect("connect");
    let err = client
        .export(gauge("too.many", 6))
        .await
        .expect_err("too many points");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let get = reqwest::get(format!("http://{}/v1/metrics", tg.http))
        .await
        .expect("GET");
    assert_eq!(get.status().as_u16(), 405);
    let m = tg.metrics();
    assert_eq!(m.sum("tailgate_metric_points_received_total", &[]), 0.0);
    assert_eq!(m.sum("tailgate_metric_points_exported_total", &[]), 0.0);
}

/// Metrics acknowledged while the backend is down survive `kill -9`: the restart forwards
/// each of them once, and the counts add up over both runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_metrics_survive_kill_9_and_are_forwarded_once() {
    let backend = start_backend(true, Behaviour::RefuseFirst(0)).await;
    backend.received.lock().unwrap().down = true;
    let storage = TempDir::new("metrics-storage");
    let sections = format!(
        "{}\n[storage]\nkind = \"local\"\ndir = {:?}\nfsync = \"always\"\n",
        otlp_exporter(true, &backend, ""),
        storage.path().display().to_string()
    );
    let mut first = Tailgate::start(&sections);
    for i in 0..5 {
        let (code, _, _) = post_to(
            first.http,
            "/v1/metrics",
            "application/x-protobuf",
            None,
            gauge(&format!("acked.{i}"), 3).encode_to_vec(),
        )
        .await;
        assert_eq!(code, 200, "acknowledged");
    }
    let tried = wait_for(Duration::from_secs(30), || {
        (backend.received.lock().unwrap().metrics_refused > 0).then_some(())
    });
    assert!(
        tried.is_some(),
        "the exporter tried the backend while it was down"
    );
    let before = first.metrics();
    assert_eq!(before.sum("tailgate_metric_points_queued", &[]), 15.0);
    signal(first.pid(), "KILL");
    assert!(first.wait_exit(Duration::from_secs(10)).is_some(), "killed");
    drop(first);

    backend.received.lock().unwrap().down = false;
    let second = Tailgate::start(&sections);
    let want: BTreeMap<String, usize> = (0..5).map(|i| (format!("acked.{i}"), 3)).collect();
    let got = wait_for(Duration::from_secs(30), || {
        let got = names(&backend.received.lock().unwrap());
        (got == want).then_some(got)
    });
    assert_eq!(got, Some(want.clone()), "every acknowledged point arrived");
    let m = wait_for(Duration::from_secs(10), || {
        let m = second.metrics();
        (m.sum("tailgate_metric_points_queued", &[]) == 0.0).then_some(m)
    })
    .expect("nothing left queued");
    assert_eq!(m.sum("tailgate_metric_points_replayed_total", &[]), 15.0);
    let (inflow, outflow) = metrics_accounted(&m);
    assert_eq!(inflow, outflow);
    // A restart after that forwards nothing again: the log knows they were settled.
    let mut second = second;
    assert!(second.terminate().success(), "a clean stop");
    let third = Tailgate::start(&sections);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        third
            .metrics()
            .sum("tailgate_metric_points_replayed_total", &[]),
        0.0,
        "settled metrics are not forwarded again"
    );
    assert_eq!(names(&backend.received.lock().unwrap()), want, "once each");
}
