//! `cargo run --release -p tailgate-load -- metrics`: metrics pass-through, tailgate against
//! rotel, under the same `tailgate loadgen --signal metrics` load (cumulative sums, 10 series a
//! metric, 300 data points a request, over OTLP/gRPC), in alternating rounds: CPU seconds of
//! the collector process per million data points, with every point counted at a sink.
//!
//! tailgate runs on `config/agent.toml` (the storage log on, as by default: every metrics
//! request is logged before it is answered), exporting to the sink over OTLP/gRPC; rotel
//! forwards to the same sink. Writes `benches/results/metrics.md`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;

use super::process::{Guard, cpu_seconds, metric_sum, wait_for};
use super::{Paths, http_get, prepare_rotel, start_rotel, start_tailgate};

const USAGE: &str = "\
usage: cargo run --release -p tailgate-load -- metrics [options]

  --rounds N     alternating rounds (default 5)
  --rate N       data points/s (default 50000)
  --secs N       load per round in seconds (default 15)
  --tailgate-bin FILE   this tailgate binary instead of building the workspace's
  --out FILE     Markdown report (default benches/results/metrics.md)";

/// Counts the data points it is sent.
#[derive(Clone, Default)]
struct PointSink {
    points: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl MetricsService for PointSink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let points: usize = (request.get_ref().resource_metrics.iter())
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| match &m.data {
                Some(Data::Sum(s)) => s.data_points.len(),
                Some(Data::Gauge(g)) => g.data_points.len(),
                Some(Data::Histogram(h)) => h.data_points.len(),
                Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
                Some(Data::Summary(s)) => s.data_points.len(),
                None => 0,
            })
            .sum();
        self.points.fetch_add(points as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

struct Round {
    collector: &'static str,
    points: f64,
    arrived: u64,
    cpu: f64,
}

impl Round {
    fn cpu_per_million(&self) -> f64 {
        self.cpu / (self.points / 1e6).max(1e-9)
    }
}

pub fn run(args: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let (mut rounds, mut rate, mut secs) = (5usize, 50_000.0f64, 15u64);
    let (mut binary, mut out) = (None, None);
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rounds" => rounds = value()?.parse()?,
            "--rate" => rate = value()?.parse()?,
            "--secs" => secs = value()?.parse()?,
            "--tailgate-bin" => binary = Some(std::path::PathBuf::from(value()?)),
            "--out" => out = Some(std::path::PathBuf::from(value()?)),
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(true);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let paths = Paths::prepare(binary.as_deref())?;
    let rotel = prepare_rotel(&paths.work)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let sink = PointSink::default();
    let sink_addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = MetricsServiceServer::new(sink.clone())
            .max_decoding_message_size(64 << 20)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        anyhow::Ok(addr)
    })?;

    let mut results = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first, so drift in the machine's load falls on both.
        let order: [&'static str; 2] = if round % 2 == 0 {
            ["tailgate", "rotel"]
        } else {
            ["rotel", "tailgate"]
        };
        for collector in order {
            let dir = paths.work.join(format!("metrics-{collector}-{round}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            sink.points.store(0, Ordering::Relaxed);
            let mut running = match collector {
                "tailgate" => start_tailgate(&paths, &paths.tailgate, &dir, sink_addr, false)?,
                _ => start_rotel(&rotel.binary, &dir, sink_addr)?,
            };
            let pid = running.guard.pid();
            std::thread::sleep(Duration::from_secs(1));
            let before = cpu_seconds(pid)?;
            let report = run_loadgen(&paths.tailgate, &dir, running.grpc, rate, secs)?;
            let points = report["spans_accepted"].as_f64().unwrap_or(0.0);
            let arrived = wait_for(Duration::from_secs(60), || {
                let n = sink.points.load(Ordering::Relaxed);
                (n as f64 >= points).then_some(n)
            })
            .unwrap_or_else(|| sink.points.load(Ordering::Relaxed));
            let cpu = cpu_seconds(pid)? - before;
            if let Some(admin) = running.admin {
                let (_, text) = http_get(admin, "/metrics")?;
                let received = metric_sum(&text, "tailgate_metric_points_received_total");
                let exported = metric_sum(&text, "tailgate_metric_points_exported_total");
                if received != points || exported != points {
                    eprintln!(
                        "warning: tailgate counted {received} received, {exported} exported, of {points}"
                    );
                }
            }
            running.guard.stop(Duration::from_secs(15));
            let r = Round {
                collector,
                points,
                arrived,
                cpu,
            };
            eprintln!(
                "round {round} {collector}: {points} points, {arrived} arrived, {:.3} CPU s/M points",
                r.cpu_per_million()
            );
            results.push(r);
        }
    }
    let report = render(&results, rate, secs, &rotel.version);
    println!("{report}");
    let out = out.unwrap_or_else(|| paths.root.join("benches/results/metrics.md"));
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(results.iter().all(|r| r.arrived as f64 >= r.points))
}

fn run_loadgen(
    tailgate: &Path,
    dir: &Path,
    endpoint: SocketAddr,
    rate: f64,
    secs: u64,
) -> anyhow::Result<serde_json::Value> {
    let report = dir.join("loadgen.json");
    let mut command = Command::new(tailgate);
    command
        .args([
            "loadgen",
            "--signal",
            "metrics",
            "--protocol",
            "grpc",
            "--endpoint",
        ])
        .arg(format!("http://{endpoint}"))
        .args(["--connections", "4", "--rate"])
        .arg(rate.to_string())
        .arg("--duration")
        .arg(format!("{secs}s"))
        .arg("--quiet")
        .arg("--report")
        .arg(&report);
    let mut guard = Guard::spawn("loadgen", command, &dir.join("loadgen.log"))?;
    guard.wait(Duration::from_secs(secs + 120))?;
    drop(guard);
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("loadgen wrote no summary to {}", report.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn render(results: &[Round], rate: f64, secs: u64, rotel: &str) -> String {
    use std::fmt::Write as _;
    let of = |name: &str| -> Vec<f64> {
        (results.iter())
            .filter(|r| r.collector == name)
            .map(Round::cpu_per_million)
            .collect()
    };
    let (tailgate, rotel_cpu) = (of("tailgate"), of("rotel"));
    let mut s = String::new();
    let _ = writeln!(s, "# Metrics pass-through: tailgate against rotel\n");
    let _ = writeln!(
        s,
        "`cargo run --release -p tailgate-load -- metrics`: {} alternating rounds, each collector \
         in a fresh process per round, under `tailgate loadgen --signal metrics` at {rate} data \
         points/s for {secs} s over 4 OTLP/gRPC connections (cumulative sums of 10 series a \
         metric, 300 points a request), exporting to one OTLP/gRPC sink that counts every \
         point. tailgate on `config/agent.toml` (the storage log on); {rotel}. CPU is the \
         collector process's user + system time from the load's start until the sink has \
         every point.\n",
        tailgate.len()
    );
    let _ = writeln!(
        s,
        "| collector | CPU s per million points, median | min | max |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for (name, v) in [("tailgate", &tailgate), ("rotel", &rotel_cpu)] {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {name} | {:.3} | {min:.3} | {max:.3} |",
            median(v.clone())
        );
    }
    let ratio = median(tailgate.clone()) / median(rotel_cpu.clone()).max(1e-9);
    let _ = writeln!(s, "\nRatio of medians, tailgate / rotel: {ratio:.2}.\n");
    let _ = writeln!(
        s,
        "| round | collector | points | arrived | CPU s | CPU s / M |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|");
    for (i, r) in results.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} | {:.3} |",
            i / 2,
            r.collector,
            r.points,
            r.arrived,
            r.cpu,
            r.cpu_per_million()
        );
    }
    s
}
