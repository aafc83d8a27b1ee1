//! What the e2e tests share: running the real `tailgate` binary (a private data folder, ports
//! bound as 0 and learned from its log, readiness from `/readyz`, metrics from `/metrics`, and a
//! kill on drop so a failing test never leaves a process behind), the downstream test backends,
//! the test plugin builds, and HTTP.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use tokio::sync::oneshot;

// Library items the tests use; paths adapt here only.
pub use tailgate::bench::{Rng, RpcStatus, decode_traces, metric_points, read_requests, seq_of};

pub const BIN: &str = env!("CARGO_BIN_EXE_tailgate");

/// A folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tailgate-e2e-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Tailgate {
    child: Child,
    pub dir: TempDir,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

/// Config sections for a test. Receivers always bind 127.0.0.1:0, and so does the admin
/// listener unless `sections` has an `[admin]` table (which must then bind it so); the
/// exporter defaults to a file in the test's folder unless `sections` has an `[exporter]`
/// table.
pub struct Setup<'a> {
    pub receivers: &'a str,
    pub sections: &'a str,
}

impl Tailgate {
    pub fn start(sections: &str) -> Self {
        Self::start_with(Setup {
            receivers: "",
            sections,
        })
    }

    pub fn start_with(setup: Setup<'_>) -> Self {
        let dir = TempDir::new("run");
        let out = dir.path().join("traces.jsonl");
        let mut config = format!(
            "[receivers]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n{}\n\n",
            setup.receivers
        );
        if !setup.sections.contains("[admin]") {
            config.push_str("[admin]\nendpoint = \"127.0.0.1:0\"\n\n");
        }
        if !setup.sections.contains("[exporter]") {
            config.push_str(&format!(
                "[exporter]\ntype = \"file\"\npath = {:?}\nbatch_timeout = \"50ms\"\n\n",
                out.display().to_string()
            ));
        }
        config.push_str(setup.sections);
        let config_path = dir.path().join("tailgate.toml");
        std::fs::write(&config_path, config).expect("write config");

        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config_path)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tailgate");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[tailgate] {line}");
                sink.lock().unwrap().push(line);
            }
        });

        let mut tg = Self {
            child,
            dir,
            grpc: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            log,
        };
        let ports = wait_for(Duration::from_secs(30), || {
            let find = |kind: &str| tg.log_line_after(&format!("{kind} listening on "));
            Some((find("grpc")?, find("http")?, find("admin")?))
        });
        let Some((grpc, http, admin)) = ports else {
            panic!(
                "tailgate did not report its ports; log:\n{}",
                tg.log().join("\n")
            );
        };
        tg.grpc = grpc.parse().expect("grpc addr");
        tg.http = http.parse().expect("http addr");
        tg.admin = admin.parse().expect("admin addr");
        for addr in [tg.grpc, tg.http, tg.admin] {
            assert!(addr.ip().is_loopback(), "a test listener on {addr}");
        }
        let ready = wait_for(Duration::from_secs(30), || {
            (http_get(tg.admin, "/readyz").ok()?.0 == 200).then_some(())
        });
        assert!(ready.is_some(), "tailgate never became ready");
        tg
    }

    fn log_line_after(&self, marker: &str) -> Option<String> {
        let log = self.log.lock().unwrap();
        log.iter().find_map(|l| {
            let at = l.find(marker)?;
            Some(l[at + marker.len()..].trim().to_owned())
        })
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output_path(&self) -> PathBuf {
        self.dir.path().join("traces.jsonl")
    }

    /// Every request the file exporter wrote, in order.
    pub fn exported(&self) -> Vec<ExportTraceServiceRequest> {
        let text = std::fs::read_to_string(self.output_path()).unwrap_or_default();
        text.lines()
            .map(|l| decode_traces(l.as_bytes()).expect("exported line is OTLP/JSON"))
            .collect()
    }

    /// The current `/metrics`, as series text (`name{labels}`) → value.
    pub fn metrics(&self) -> Metrics {
        self.metrics_as(None)
    }

    /// `/metrics` with the admin token, for a host that has `admin.token_file`.
    pub fn metrics_as(&self, token: Option<&str>) -> Metrics {
        let (code, body) =
            crate::http::get_as(self.admin, "/metrics", token).expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        Metrics::parse(&body)
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        self.wait_exit(Duration::from_secs(60))
            .expect("tailgate did not exit after SIGTERM")
    }

    /// Waits up to `timeout` for the process to exit (after a signal the test sent); None if
    /// it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.child.try_wait().expect("wait on tailgate"))
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:") * 1024
    }

    pub fn rss(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:") * 1024
    }
}

impl Drop for Tailgate {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls `f` every 20 ms until it returns Some or the timeout passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET http://{addr}{path}`: status and body (reqwest; see `tests/e2e/http.rs`).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), reqwest::Error> {
    crate::http::get(addr, path)
}

/// Parsed Prometheus text.
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Self {
        Self(
            crate::http::samples(text)
                .map(|(series, v)| (series.to_owned(), v))
                .collect(),
        )
    }

    /// Sum of every series of `name` whose labels contain each of `labels` (`key="value"`).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let labels_of = series.split_once('{').map_or("", |(_, l)| l);
                crate::http::metric_name(series) == name
                    && labels.iter().all(|want| labels_of.contains(want))
            })
            .map(|(_, v)| v)
            .sum()
    }

    pub fn received(&self) -> f64 {
        self.sum("tailgate_spans_received_total", &[])
    }

    pub fn kept(&self) -> f64 {
        self.sum("tailgate_spans_kept_total", &[])
    }

    pub fn dropped(&self) -> f64 {
        self.sum("tailgate_spans_dropped_total", &[])
    }

    pub fn refused(&self) -> f64 {
        self.sum("tailgate_spans_refused_total", &[])
    }

    /// Spans counted dropped, then kept when their trace was rescued.
    pub fn rescued(&self) -> f64 {
        self.sum("tailgate_spans_rescued_total", &[])
    }

    /// What `received` must equal: kept + dropped − rescued + refused.
    pub fn accounted(&self) -> f64 {
        self.kept() + self.dropped() - self.rescued() + self.refused()
    }

    pub fn exported(&self) -> f64 {
        self.sum("tailgate_exported_spans_total", &[])
    }
}

/// One span for a hand-built request.
#[derive(Clone)]
pub struct SpanSpec {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: [u8; 8],
    pub name: String,
    pub error: bool,
    pub attrs: Vec<(String, String)>,
    /// Integer attributes, after the string ones.
    pub ints: Vec<(String, i64)>,
}

impl SpanSpec {
    pub fn new(trace: u64, span: u64, parent: u64) -> Self {
        Self {
            trace_id: trace_id(trace),
            span_id: span_id(span),
            parent: if parent == 0 { [0; 8] } else { span_id(parent) },
            name: format!("span-{span}"),
            error: false,
            attrs: Vec::new(),
            ints: Vec::new(),
        }
    }
}

/// The OTel SDK's OTLP/gRPC span exporter, pointed at `tg` (it needs a Tokio runtime entered).
pub fn grpc_exporter(tg: &Tailgate) -> opentelemetry_otlp::SpanExporter {
    use opentelemetry_otlp::WithExportConfig;
    opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("http://{}", tg.grpc))
        .build()
        .expect("OTLP gRPC exporter")
}

pub fn trace_id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&0x7a11_6a7e_u64.to_be_bytes());
    id[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1).to_be_bytes());
    id
}

pub fn span_id(n: u64) -> [u8; 8] {
    (n.max(1)).to_be_bytes()
}

/// A request with one resource per distinct service.
pub fn request(service: &str, spans: &[SpanSpec]) -> ExportTraceServiceRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: spans
                    .iter()
                    .map(|s| Span {
                        trace_id: s.trace_id.to_vec(),
                        span_id: s.span_id.to_vec(),
                        parent_span_id: if s.parent == [0; 8] {
                            vec![]
                        } else {
                            s.parent.to_vec()
                        },
                        name: s.name.clone(),
                        kind: 2,
                        start_time_unix_nano: now - 5_000_000,
                        end_time_unix_nano: now,
                        attributes: (s.attrs.iter().map(|(k, v)| kv(k, v)))
                            .chain(s.ints.iter().map(|(k, v)| KeyValue {
                                key: k.clone(),
                                value: Some(AnyValue {
                                    value: Some(Value::IntValue(*v)),
                                }),
                                ..Default::default()
                            }))
                            .collect(),
                        status: s.error.then(|| Status {
                            code: 2,
                            message: "boom".into(),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

pub fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key_strindex: 0,
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

/// All spans in exported requests, with the `service.name` of their resource.
pub fn exported_spans(requests: &[ExportTraceServiceRequest]) -> Vec<(String, Span)> {
    let mut out = Vec::new();
    for r in requests {
        for rs in &r.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|res| res.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((service.clone(), s.clone()));
                }
            }
        }
    }
    out
}

pub fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

/// POSTs a body to the HTTP receiver; returns status, headers and body.
pub async fn post(
    addr: SocketAddr,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    post_to(addr, "/v1/traces", content_type, encoding, body).await
}

/// [`post`] to another path of the HTTP receiver.
pub async fn post_to(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    let resp = req.send().await.expect("POST to the HTTP receiver");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body").to_vec();
    (status, headers, body)
}

/// `tailgate loadgen --acked-out`: `<first_seq> <spans>` per acknowledged request (none while
/// the file does not exist yet).
pub fn read_acked(path: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let parsed = line
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            parsed.unwrap_or_else(|| panic!("--acked-out line {line:?}"))
        })
        .collect()
}

/// A child process killed and reaped on drop, for tests that start the binary themselves.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Waits up to `timeout` for the process to exit by itself; None if it is still running
    /// (it is then killed when the guard drops).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.0.try_wait().expect("wait on child"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A flag a test's background threads poll to know when to stop; set on drop too, so they stop
/// even when the test fails before it sets it.
#[derive(Default)]
pub struct StopFlag(Arc<std::sync::atomic::AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the background threads poll.
    pub fn handle(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.0.clone()
    }

    pub fn stop(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- test plugins ----

/// The policy crates of `tests/plugins/` the e2e tests load (accessor-probe belongs to the
/// host's own tests).
const TEST_PLUGINS: [&str; 7] = [
    "hostile-grow",
    "hostile-panic",
    "hostile-patch",
    "hostile-spin",
    "hostile-summary",
    "swap-v1",
    "swap-v2",
];

/// The one folder every plugin build of the e2e tests writes to: under the cargo target
/// directory (`CARGO_TARGET_TMPDIR`), never in the source tree, reused across runs.
pub fn plugin_build_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-plugins")
}

/// The component `<name>.wasm` of a crate of `tests/plugins/`. Every test plugin is built
/// once per test binary, on first use, into [`plugin_build_dir`]`/components`.
pub fn test_plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = plugin_build_dir().join("components");
        let started = Instant::now();
        let built = tailgate_plugin_build::Builder::new(repo.join("tests/plugins"), &out)
            .only(TEST_PLUGINS.iter().map(|s| s.to_string()).collect())
            .build()
            .unwrap_or_else(|e| panic!("building the test policies: {e:#}"));
        for want in TEST_PLUGINS {
            assert!(
                built.iter().any(|p| p.name == want),
                "{want} was not built: {:?}",
                built.iter().map(|p| &p.name).collect::<Vec<_>>()
            );
        }
        eprintln!(
            "built {} test policies in {:?}",
            built.len(),
            started.elapsed()
        );
        out
    });
    assert!(
        TEST_PLUGINS.contains(&name),
        "{name} is not among the test plugins {TEST_PLUGINS:?}"
    );
    dir.join(format!("{name}.wasm"))
}

// ---- downstream test backends ----

/// What a downstream does with each request.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Refuses the first `n` requests it receives as temporarily unavailable (gRPC
    /// UNAVAILABLE; HTTP 503 with `Retry-After: 1`), then accepts every request.
    /// `RefuseFirst(0)` accepts everything.
    RefuseFirst(usize),
    /// Always a permanent error (gRPC INVALID_ARGUMENT, HTTP 400).
    Reject,
}

/// What a backend saw: span ids delivered with how often each arrived, and request counts.
#[derive(Default)]
pub struct Received {
    pub spans: HashMap<Vec<u8>, usize>,
    /// `loadgen.seq` of the spans that have one, with how often each arrived.
    pub seqs: HashMap<u64, usize>,
    /// Every request, accepted or not.
    pub requests: usize,
    /// Requests refused (temporarily or permanently).
    pub refused: usize,
    /// The span ids of each request, accepted or not, in arrival order.
    pub request_spans: Vec<Vec<Vec<u8>>>,
    /// While set, every request is refused as temporarily unavailable: an outage.
    pub down: bool,
    /// Trace ids of the accepted spans, with how many spans of each arrived.
    pub traces: HashMap<Vec<u8>, usize>,
    /// Every metrics request accepted, in arrival order.
    pub metrics: Vec<ExportMetricsServiceRequest>,
    /// Metrics requests refused as unavailable (during an outage).
    pub metrics_refused: usize,
}

impl Received {
    /// Data points in the accepted metrics requests.
    pub fn metric_points(&self) -> usize {
        self.metrics.iter().map(|r| metric_points(r) as usize).sum()
    }
}

#[derive(Clone)]
struct Downstream {
    behaviour: Behaviour,
    received: Arc<Mutex<Received>>,
}

/// Why a downstream refused a request.
enum Refusal {
    Unavailable,
    Permanent,
}

impl Downstream {
    /// Ok when the request is accepted; records it either way.
    fn handle(&self, request: &ExportTraceServiceRequest) -> Result<(), Refusal> {
        let mut r = self.received.lock().unwrap();
        r.requests += 1;
        let spans = exported_spans(std::slice::from_ref(request));
        r.request_spans
            .push(spans.iter().map(|(_, s)| s.span_id.clone()).collect());
        let refusal = match self.behaviour {
            _ if r.down => Some(Refusal::Unavailable),
            Behaviour::RefuseFirst(n) if r.requests <= n => Some(Refusal::Unavailable),
            Behaviour::RefuseFirst(_) => None,
            Behaviour::Reject => Some(Refusal::Permanent),
        };
        if let Some(refusal) = refusal {
            r.refused += 1;
            return Err(refusal);
        }
        for (_, span) in spans {
            if let Some(seq) = seq_of(&span) {
                *r.seqs.entry(seq).or_default() += 1;
            }
            *r.traces.entry(span.trace_id.clone()).or_default() += 1;
            *r.spans.entry(span.span_id).or_default() += 1;
        }
        Ok(())
    }
}

impl Downstream {
    /// Ok when the metrics request is accepted (everything is, outside an outage).
    fn handle_metrics(&self, request: ExportMetricsServiceRequest) -> Result<(), Refusal> {
        let mut r = self.received.lock().unwrap();
        if r.down {
            r.metrics_refused += 1;
            return Err(Refusal::Unavailable);
        }
        r.metrics.push(request);
        Ok(())
    }
}

#[tonic::async_trait]
impl MetricsService for Downstream {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        match self.handle_metrics(request.into_inner()) {
            Ok(()) => Ok(tonic::Response::new(ExportMetricsServiceResponse::default())),
            Err(_) => Err(tonic::Status::unavailable("backend down")),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Downstream {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.handle(request.get_ref()) {
            Ok(()) => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Err(Refusal::Unavailable) => Err(tonic::Status::unavailable("backend warming up")),
            Err(Refusal::Permanent) => {
                Err(tonic::Status::invalid_argument("backend rejects this data"))
            }
        }
    }
}

/// A request body, gunzipped when its `Content-Encoding` says gzip.
fn inflated(headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    if headers.get("content-encoding").is_none_or(|v| v != "gzip") {
        return body.to_vec();
    }
    use std::io::Read;
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut plain)
        .unwrap();
    plain
}

async fn http_export(
    axum::extract::State(d): axum::extract::State<Downstream>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut out = HeaderMap::new();
    out.insert("content-type", "application/x-protobuf".parse().unwrap());
    let body = inflated(&headers, &body);
    let request =
        ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP from the client");
    match d.handle(&request) {
        Ok(()) => (
            StatusCode::OK,
            out,
            ExportTraceServiceResponse::default().encode_to_vec(),
        ),
        Err(Refusal::Unavailable) => {
            out.insert("retry-after", "1".parse().unwrap());
            (StatusCode::SERVICE_UNAVAILABLE, out, Vec::new())
        }
        Err(Refusal::Permanent) => (StatusCode::BAD_REQUEST, out, Vec::new()),
    }
}

async fn http_export_metrics(
    axum::extract::State(d): axum::extract::State<Downstream>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let body = inflated(&headers, &body);
    let request = ExportMetricsServiceRequest::decode(body.as_slice())
        .expect("valid OTLP metrics from the client");
    match d.handle_metrics(request) {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A running downstream on 127.0.0.1; shut down when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Received>>,
    _stop: oneshot::Sender<()>,
}

/// Starts an OTLP downstream (gRPC or HTTP/protobuf; traces and metrics) on the current Tokio
/// runtime, bound to 127.0.0.1 on a free port.
pub async fn start_backend(grpc: bool, behaviour: Behaviour) -> Backend {
    let received = Arc::new(Mutex::new(Received::default()));
    let d = Downstream {
        behaviour,
        received: received.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    if grpc {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    TraceServiceServer::new(d.clone())
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .add_service(
                    MetricsServiceServer::new(d)
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
                )
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
    } else {
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .route("/v1/metrics", axum::routing::post(http_export_metrics))
            .with_state(d);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
    }
    Backend {
        addr,
        received,
        _stop: stop,
    }
}

// ---- the OpenTelemetry Python SDK ----

/// A virtual environment with `tests/e2e/python/requirements.txt` installed, made once per
/// requirements under the test target folder (pip from PyPI). A machine without `python3`
/// fails the test that needs it, with the reason.
pub fn python_env() -> PathBuf {
    static ENV: OnceLock<PathBuf> = OnceLock::new();
    ENV.get_or_init(|| {
        let requirements =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/python/requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).expect("read requirements.txt");
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-otel");
        let stamp = venv.join("requirements.installed");
        // Another test process may be making it: one at a time.
        let _lock = setup_lock("python-otel");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let _ = std::fs::remove_dir_all(&venv);
            let made = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .unwrap_or_else(|e| panic!("python3 is needed for the Python SDK tests: {e}"));
            assert!(made.success(), "python3 -m venv failed");
            let installed = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&requirements)
                .status()
                .expect("run pip");
            assert!(
                installed.success(),
                "pip install -r {} failed",
                requirements.display()
            );
            std::fs::write(&stamp, &wanted).expect("write the stamp");
        }
        venv
    })
    .clone()
}

/// Runs `tests/e2e/python/<script>` in [`python_env`] with `env`; its stdout and stderr, after
/// it exits (killed past `timeout`).
pub fn run_python(script: &str, env: &[(&str, String)], timeout: Duration) -> (String, String) {
    let venv = python_env();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/e2e/python")
        .join(script);
    let mut command = Command::new(venv.join("bin/python"));
    command
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = ChildGuard(command.spawn().expect("spawn python"));
    let mut stdout = child.0.stdout.take().expect("stdout");
    let mut stderr = child.0.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = child.wait_exit(timeout);
    drop(child);
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "{script} failed ({status:?}):\n{err}"
    );
    (out, err)
}

// ---- a browser ----

/// Holds a file lock under the test target folder while a one-time setup runs, so test
/// processes running side by side do not make the same thing twice.
fn setup_lock(name: &str) -> std::fs::File {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).expect("target tmp dir");
    let lock = std::fs::File::create(dir.join(format!("{name}.lock"))).expect("lock file");
    lock.lock().expect("take the setup lock");
    lock
}

/// Debian's Chromium, installed with apt-get when the machine does not have it yet (CI runs
/// as root on a machine of the same kind). A machine that cannot install it fails the test
/// that needs it, with the reason.
pub fn chromium() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = PathBuf::from("/usr/bin/chromium");
        let _lock = setup_lock("chromium");
        if !path.exists() {
            let installed = Command::new("sh")
                .args([
                    "-c",
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium",
                ])
                .status()
                .unwrap_or_else(|e| panic!("cannot run apt-get to install chromium: {e}"));
            assert!(
                installed.success() && path.exists(),
                "the browser tests need Debian's chromium, and apt-get could not install it"
            );
        }
        path
    })
    .clone()
}

/// `tests/e2e/web` with its npm packages (`npm ci`, from its lock file) under the test target
/// folder, installed again only when the lock file changes.
pub fn web_env() -> PathBuf {
    static ENV: OnceLock<PathBuf> = OnceLock::new();
    ENV.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/web");
        let env = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-otel");
        let _lock = setup_lock("web-otel");
        std::fs::create_dir_all(&env).expect("web env dir");
        for file in ["package.json", "package-lock.json", "page.js", "drive.mjs"] {
            std::fs::copy(source.join(file), env.join(file))
                .unwrap_or_else(|e| panic!("copy tests/e2e/web/{file}: {e}"));
        }
        let wanted = std::fs::read_to_string(source.join("package-lock.json")).expect("lock");
        let stamp = env.join("lock.installed");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let installed = Command::new("npm")
                .args(["ci", "--silent", "--no-audit", "--no-fund"])
                .current_dir(&env)
                .status()
                .unwrap_or_else(|e| panic!("npm (Node 20) is needed for the browser tests: {e}"));
            assert!(installed.success(), "npm ci in {} failed", env.display());
            std::fs::write(&stamp, &wanted).expect("write the stamp");
        }
        env
    })
    .clone()
}

/// A port free on 127.0.0.1 a moment ago, for a server the test does not bind itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
