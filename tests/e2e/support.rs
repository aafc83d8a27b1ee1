//! Running the real `tailgate` binary for a test: a private data folder, ports bound as 0 and
//! learned from its log, readiness from `/readyz`, metrics from `/metrics`, and a kill on drop
//! so a failing test never leaves a process behind.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

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

/// Config sections for a test. Receivers and admin always bind 127.0.0.1:0; the exporter
/// defaults to a file in the test's folder unless `sections` has an `[exporter]` table.
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
            "[receivers]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n{}\n\n[admin]\nendpoint = \"127.0.0.1:0\"\n\n",
            setup.receivers
        );
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
            grpc: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
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
            .map(|l| {
                tailgate::otlp::json::decode_traces(l.as_bytes())
                    .expect("exported line is OTLP/JSON")
            })
            .collect()
    }

    /// The current `/metrics`, as series text (`name{labels}`) → value.
    pub fn metrics(&self) -> Metrics {
        let (code, body) = http_get(self.admin, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200);
        Metrics::parse(&body)
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tailgate did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// A plain HTTP/1.1 GET over a fresh connection: enough for the admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, dechunk(&body)))
}

/// Undoes `Transfer-Encoding: chunked` when the body looks chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size_line, after)) = rest.split_once("\r\n") else {
            return if out.is_empty() { body.to_owned() } else { out };
        };
        let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 || after.len() < size {
            return out;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// Parsed Prometheus text.
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut map = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                map.insert(series.to_owned(), v);
            }
        }
        Self(map)
    }

    /// Sum of every series of `name` whose labels contain each of `labels` (`key="value"`).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, l) = series.split_once('{').unwrap_or((series, ""));
                n == name && labels.iter().all(|want| l.contains(want))
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
        }
    }
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
                        attributes: s.attrs.iter().map(|(k, v)| kv(k, v)).collect(),
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
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("http://{addr}/v1/traces"))
        .header("content-type", content_type)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    let resp = req.send().await.expect("POST /v1/traces");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body").to_vec();
    (status, headers, body)
}
