//! The command line: `tailgate run`, `tailgate check`, `tailgate loadgen`, `--version`,
//! `--help`.

use std::path::PathBuf;
use std::time::Duration;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

use crate::export::transport::Protocol;
use crate::loadgen::{LoadPlan, Shape};
use crate::otlp::signal::Signal;

#[derive(Debug, Parser)]
#[command(
    name = "tailgate",
    version,
    about = "Tail-sampling OpenTelemetry trace collector with sandboxed WebAssembly policies",
    long_about = "Receives OTLP traces (gRPC :4317, HTTP :4318), holds every span of a trace until \
                  the trace is complete, decides keep or drop on the whole trace, and exports \
                  kept traces over OTLP or to a file."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the collector until SIGTERM or SIGINT.
    Run {
        /// TOML config file; without it the embedded `config/agent.toml` is used (listen on
        /// 127.0.0.1:4317 and :4318, the agent policy pack, kept traces written to
        /// tailgate-data/traces.jsonl).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and exit: 0 if it is valid, 1 with the reason if not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send generated agent traces to an OTLP endpoint at a target rate (or write them to a
    /// file), then print a JSON summary on stdout.
    #[command(long_about = LOADGEN_ABOUT)]
    Loadgen(Box<LoadgenArgs>),
}

const LOADGEN_ABOUT: &str = "\
Send generated agent traces (30-span agent runs by default: retrieval, LLM and tool calls) to an \
OTLP endpoint at a target rate, or write them to a file, then print a one-line JSON summary on \
stdout: spans sent, accepted, rejected (partial success) and failed, requests, retries, elapsed \
seconds, achieved spans/s and the seq count.

Every span carries an int attribute `loadgen.seq`; one run's spans carry exactly 0..seq_count, \
each once. Requests are numbered in the order connections claim them from one shared counter, \
and request k holds seqs k*S .. k*S+n (S = traces-per-request * spans-per-trace). The root span \
of each trace ends at the wall clock when its request is made, so a receiver can measure \
decision lag as its receive time minus the root's end time.

With --rate, request k is due at start + k*S/rate over all connections together (one even \
timeline, no per-second bursts); each connection keeps one request in flight. Retryable \
failures (gRPC UNAVAILABLE, ABORTED, …, RESOURCE_EXHAUSTED with RetryInfo; HTTP 429, 502, 503, \
504, connection errors) are retried with backoff from 100 ms to 2 s for up to --retry-for, \
honouring RetryInfo and Retry-After; other failures count as failed.

Exit status: 0 when every span was accepted, 1 otherwise.";

/// Wire protocol of `tailgate loadgen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LoadgenProtocol {
    /// OTLP/gRPC (TraceService/Export).
    Grpc,
    /// OTLP/HTTP with a protobuf body, POST {endpoint}/v1/traces.
    Http,
}

/// What `tailgate loadgen` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LoadgenSignal {
    /// Agent-shaped traces.
    Traces,
    /// Metric data points, one for each span the trace options describe (a request holds
    /// traces-per-request * spans-per-trace points, in cumulative sums of 10 series each, every
    /// point with its `loadgen.seq`), on MetricsService/Export or {endpoint}/v1/metrics.
    Metrics,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct LoadgenArgs {
    /// Where to send: default http://127.0.0.1:4317 for grpc, http://127.0.0.1:4318 for http.
    #[arg(long)]
    pub(crate) endpoint: Option<String>,
    #[arg(long, value_enum, default_value_t = LoadgenProtocol::Grpc)]
    pub(crate) protocol: LoadgenProtocol,
    /// Traces, or metrics (then every "span" below is a data point).
    #[arg(long, value_enum, default_value_t = LoadgenSignal::Traces)]
    pub(crate) signal: LoadgenSignal,
    /// Concurrent connections, each with its own generator (seed + i) and one request in flight.
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: usize,
    /// Target spans per second over all connections; 0 = as fast as possible (saturation).
    #[arg(long, default_value_t = 10_000.0)]
    pub(crate) rate: f64,
    /// Stop after this many spans (rounded up to whole traces). With --duration too, whichever
    /// comes first; with neither, --duration 10s.
    #[arg(long)]
    pub(crate) spans: Option<u64>,
    /// Stop starting requests after this long, e.g. 20s or 1m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Whole traces in each export request.
    #[arg(long, default_value_t = 10)]
    pub(crate) traces_per_request: usize,
    /// Seed of connection 0's generator; connection i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Spans per trace, root included.
    #[arg(long, default_value_t = Shape::default().spans_per_trace)]
    pub(crate) spans_per_trace: usize,
    /// Share of traces with a failing tool call.
    #[arg(long, default_value_t = Shape::default().error_rate)]
    pub(crate) error_rate: f64,
    /// Share of traces with one LLM call 20x slower than usual.
    #[arg(long, default_value_t = Shape::default().slow_rate)]
    pub(crate) slow_rate: f64,
    /// Share of traces on an expensive model with 10x the tokens.
    #[arg(long, default_value_t = Shape::default().costly_rate)]
    pub(crate) costly_rate: f64,
    /// Share of traces with low retrieval scores.
    #[arg(long, default_value_t = Shape::default().low_confidence_rate)]
    pub(crate) low_confidence_rate: f64,
    /// Gzip request bodies (costs the sender CPU).
    #[arg(long)]
    pub(crate) gzip: bool,
    /// Per-attempt timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub(crate) timeout: Duration,
    /// Keep retrying a request for up to this long (backoff 100 ms to 2 s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub(crate) retry_for: Duration,
    /// Write the requests to this file instead of sending them: length-delimited protobuf
    /// ExportTraceServiceRequests (a varint length, then the message), readable with
    /// tailgate::loadgen::read_requests. Needs --spans.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// List every request answered with success in this file, as the answers arrive: one line
    /// `<first_seq> <spans>` each (seqs first_seq .. first_seq+spans were acknowledged; a partial
    /// success is listed whole, its rejected spans counted in spans_rejected). Written line by
    /// line, unbuffered, so it stays right when the run ends in failures (a target killed
    /// mid-run); failed requests are never listed.
    #[arg(long, conflicts_with = "out")]
    pub(crate) acked_out: Option<PathBuf>,
    /// Also write the JSON summary, pretty-printed, to this file.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

impl LoadgenArgs {
    /// The plan these options describe. Without --spans or --duration the run lasts 10 s.
    pub(crate) fn plan(&self) -> LoadPlan {
        let protocol = match self.protocol {
            LoadgenProtocol::Grpc => Protocol::Grpc,
            LoadgenProtocol::Http => Protocol::HttpProtobuf,
        };
        let endpoint = self.endpoint.clone().unwrap_or_else(|| {
            match self.protocol {
                LoadgenProtocol::Grpc => "http://127.0.0.1:4317",
                LoadgenProtocol::Http => "http://127.0.0.1:4318",
            }
            .into()
        });
        let duration = match (self.spans, self.duration) {
            (None, None) => Some(Duration::from_secs(10)),
            (_, d) => d,
        };
        LoadPlan {
            protocol,
            signal: match self.signal {
                LoadgenSignal::Traces => Signal::Traces,
                LoadgenSignal::Metrics => Signal::Metrics,
            },
            endpoint,
            connections: self.connections,
            rate: self.rate,
            total_spans: self.spans,
            duration,
            traces_per_request: self.traces_per_request,
            seed: self.seed,
            shape: Shape {
                spans_per_trace: self.spans_per_trace,
                error_rate: self.error_rate,
                slow_rate: self.slow_rate,
                costly_rate: self.costly_rate,
                low_confidence_rate: self.low_confidence_rate,
                ..Shape::default()
            },
            gzip: self.gzip,
            timeout: self.timeout,
            retry_for: self.retry_for,
            progress: !self.quiet,
            acked_out: self.acked_out.clone(),
        }
    }
}

/// The `tailgate` binary: parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Loadgen(args) => loadgen(&args),
        Command::Check { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Load the policies too (compile, type-check, init with their config), so a
            // policy that would be refused at start is reported here.
            let base_dir = crate::plugin::reload::base_dir_of(Some(&path));
            let mut dry = config.clone();
            dry.plugins.cache_dir = Default::default(); // a check writes nothing
            if let Err(e) = crate::plugin::PolicyRuntime::start(&dry, &base_dir) {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!(
                "{}: ok ({} policies)",
                path.display(),
                config.policies.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let config_path = config.clone();
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Config::parse(crate::config::EMBEDDED, crate::config::EMBEDDED_SOURCE),
            };
            let config = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&config);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("tailgate-io")
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::app::run(config, config_path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `tailgate loadgen`: the run, its JSON summary on stdout (and in --report), exit 1 unless
/// every span was accepted.
fn loadgen(args: &LoadgenArgs) -> ExitCode {
    let plan = args.plan();
    let result = match &args.out {
        Some(path) => crate::loadgen::write_requests(&plan, path),
        None => {
            // Worker threads: one per connection up to the cores; the load generator must not
            // take more of the machine than its connections can use.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .worker_threads(plan.connections.clamp(1, cores))
                .thread_name("tailgate-loadgen")
                .build();
            match runtime {
                Ok(r) => r.block_on(crate::loadgen::send(&plan)),
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string(&summary) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("error: cannot encode the summary: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &args.report {
        let written = serde_json::to_string_pretty(&summary)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(path, text + "\n"));
        if let Err(e) = written {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    for e in &summary.errors {
        eprintln!("loadgen: {e}");
    }
    if summary.spans_accepted == summary.seq_count {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
