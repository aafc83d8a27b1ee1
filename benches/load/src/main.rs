//! The load harness: tailgate (with the agent policy chain of `config/agent.toml`, the storage
//! log on as by default), the same tailgate with `storage.kind = "memory"` (the log's cost) and
//! rotel (a plain OTLP pass-through) under the same `tailgate loadgen` load, one after the other,
//! in one run, measured per collector process: CPU per million spans, idle, steady and peak RSS,
//! sustained spans/s at saturation, decision lag, loss and duplicates. Prints a Markdown report
//! and writes it to `benches/results/load.md`.
//!
//! Run: `cargo run --release -p tailgate-load` (add `-- --quick` for a smoke run; `-- --help`).
//! `cargo run --release -p tailgate-load -- soak` is the storage log's soak instead: `kill -9`
//! cycles and a backend outage under load (see `soak.rs`); `-- metrics` measures metrics
//! pass-through against rotel (see `metrics.rs`).
//!
//! Each (collector, phase) pair gets a fresh collector process and a reset sink, so every
//! number belongs to exactly one phase: phase 1 sends a fixed rate, phase 2 as fast as the load
//! generator's connections go. Every process started here is killed on drop, so an error or a
//! panic leaves nothing running; everything binds 127.0.0.1.

// The admin HTTP client and Prometheus parsing, shared with the e2e tests.
#[path = "../../../tests/e2e/http.rs"]
mod http;
mod metrics;
mod process;
mod sink;
mod soak;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use process::{Guard, children_cpu_seconds, cpu_seconds, http_get, metric_sum, status_bytes};
use sink::{Seen, Sink};

/// The rotel release the comparison is pinned to (PyPI package `rotel`).
const ROTEL_PACKAGE: &str = "rotel==0.0.1a15";
/// The decision-lag target is this + 100 ms: a fixed 2 s grace, which `config/agent.toml` had
/// before its grace was learned (`root_grace = "auto"`, which settles lower on this traffic).
const ROOT_GRACE_MS: f64 = 2_000.0;
/// Roots in the first seconds of a phase are left out of the steady-state lag: a learned grace
/// starts at 6 s and is learned from the decisions that follow.
const WARM_UP_SECS: i64 = 10;
/// How long an idle collector settles after becoming ready before its RSS is read.
const SETTLE: Duration = Duration::from_secs(1);
/// RSS sampling period during the fixed-rate phase.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Draining ends when the counts add up, or after they stop moving for this long.
const DRAIN_STABLE: Duration = Duration::from_secs(5);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

const USAGE: &str = "\
usage: cargo run --release -p tailgate-load -- [options]
       cargo run --release -p tailgate-load -- soak [soak options]   (soak --help)
       cargo run --release -p tailgate-load -- metrics [options]     (metrics --help)

  --quick             short phases (20,000 spans/s for 5 s, saturation for 5 s): a smoke run
  --rate N            fixed-rate phase, spans/s (default 50000)
  --secs N            length of each phase in seconds (default 20)
  --connections N     loadgen connections (default 4)
  --skip-rotel        tailgate only
  --fixed-only        the fixed-rate phase only
  --config FILE       tailgate's config instead of config/agent.toml (addresses, exporter and
                      plugin cache are set as for it)
  --tailgate-bin FILE run this tailgate binary instead of building the workspace's
  --out FILE          Markdown report (default benches/results/load.md; quick runs:
                      target/load/load-quick.md)";

struct Options {
    quick: bool,
    rate: f64,
    secs: u64,
    connections: usize,
    skip_rotel: bool,
    fixed_only: bool,
    config: Option<PathBuf>,
    tailgate_bin: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        quick: false,
        rate: 50_000.0,
        secs: 20,
        connections: 4,
        skip_rotel: false,
        fixed_only: false,
        config: None,
        tailgate_bin: None,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    let mut explicit = (false, false);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--rate" => {
                o.rate = value("--rate")?.parse()?;
                explicit.0 = true;
            }
            "--secs" => {
                o.secs = value("--secs")?.parse()?;
                explicit.1 = true;
            }
            "--connections" => o.connections = value("--connections")?.parse()?,
            "--skip-rotel" => o.skip_rotel = true,
            "--fixed-only" => o.fixed_only = true,
            "--config" => o.config = Some(value("--config")?.into()),
            "--tailgate-bin" => o.tailgate_bin = Some(value("--tailgate-bin")?.into()),
            "--out" => o.out = Some(value("--out")?.into()),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.quick {
        if !explicit.0 {
            o.rate = 20_000.0;
        }
        if !explicit.1 {
            o.secs = 5;
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let outcome = match std::env::args().nth(1).as_deref() {
        Some("soak") => soak::run(std::env::args().skip(2)),
        Some("metrics") => metrics::run(std::env::args().skip(2)),
        _ => run().map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where things are.
struct Paths {
    root: PathBuf,
    tailgate: PathBuf,
    /// The config tailgate phases start from (config/agent.toml unless `--config`).
    config: PathBuf,
    /// Scratch space: target/load.
    work: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Collector {
    /// The default: the storage log on (`fsync = "interval"`).
    Tailgate,
    /// The same with `storage.kind = "memory"`: the baseline of the log's cost.
    TailgateMemory,
    Rotel,
}

impl Collector {
    fn name(self) -> &'static str {
        match self {
            Collector::Tailgate => "tailgate",
            Collector::TailgateMemory => "tailgate (storage.kind = memory)",
            Collector::Rotel => "rotel",
        }
    }
}

#[derive(Clone, Copy)]
struct Phase {
    name: &'static str,
    /// Spans/s; 0 = saturation.
    rate: f64,
    secs: u64,
}

/// tailgate's own accounting, from /metrics.
#[derive(Clone, Copy, Default)]
struct Accounting {
    received: f64,
    kept: f64,
    dropped: f64,
    /// Spans counted dropped, then kept by a rescue.
    rescued: f64,
    refused: f64,
    exported: f64,
    export_failed: f64,
}

struct PhaseResult {
    collector: Collector,
    phase: Phase,
    loadgen: Value,
    idle_rss: u64,
    steady_rss: u64,
    peak_rss: u64,
    cpu_seconds: f64,
    loadgen_cpu_seconds: f64,
    drain_seconds: f64,
    drained: bool,
    accounting: Option<Accounting>,
    seen: Seen,
}

impl PhaseResult {
    fn lg(&self, key: &str) -> f64 {
        self.loadgen[key].as_f64().unwrap_or(0.0)
    }
    fn seq_count(&self) -> u64 {
        self.loadgen["seq_count"].as_u64().unwrap_or(0)
    }
    /// Spans the collector took in.
    fn spans_in(&self) -> f64 {
        self.lg("spans_accepted")
    }
    fn cpu_per_million(&self) -> f64 {
        self.cpu_seconds / (self.spans_in() / 1e6).max(1e-9)
    }
    /// Spans neither dropped by a policy nor delivered to the sink: refused, failed, or lost.
    fn loss(&self) -> f64 {
        let dropped = self.accounting.map_or(0.0, |a| a.dropped);
        self.seq_count() as f64 - dropped - self.seen.distinct_seqs as f64
    }
}

impl Paths {
    /// The workspace, a freshly built release tailgate (or `binary`), and the scratch folder
    /// (created).
    fn prepare(binary: Option<&Path>) -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .context("workspace root")?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let tailgate = match binary {
            Some(b) => b
                .canonicalize()
                .with_context(|| format!("{}", b.display()))?,
            None => build_tailgate(&root, &target)?,
        };
        let paths = Paths {
            tailgate,
            config: root.join("config/agent.toml"),
            work: target.join("load"),
            root,
        };
        std::fs::create_dir_all(&paths.work)?;
        Ok(paths)
    }
}

fn run() -> anyhow::Result<()> {
    let opts = parse_args()?;
    let mut paths = Paths::prepare(opts.tailgate_bin.as_deref())?;
    if let Some(config) = &opts.config {
        paths.config = config
            .canonicalize()
            .with_context(|| format!("{}", config.display()))?;
    }
    // One plugin cache for every tailgate phase, emptied now: the first phase starts cold
    // (compiling the policies, as a first deployment does) and the next restarts on a warm
    // cache (as every later restart does); the table shows the idle RSS of both.
    let _ = std::fs::remove_dir_all(paths.work.join("plugin-cache"));
    let rotel = if opts.skip_rotel {
        None
    } else {
        Some(prepare_rotel(&paths.work)?)
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load-sink")
        .enable_all()
        .build()?;
    let sink = Sink::default();
    let sink_addr = runtime.block_on(sink.start())?;
    eprintln!("sink listening on {sink_addr}");

    let phases = [
        Phase {
            name: "fixed",
            rate: opts.rate,
            secs: opts.secs,
        },
        Phase {
            name: "saturation",
            rate: 0.0,
            secs: opts.secs,
        },
    ];
    let mut collectors = vec![
        (Collector::Tailgate, paths.tailgate.clone()),
        (Collector::TailgateMemory, paths.tailgate.clone()),
    ];
    if let Some(r) = &rotel {
        collectors.push((Collector::Rotel, r.binary.clone()));
    }
    let started = Instant::now();
    let loadavg_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Vec::new();
    for (collector, binary) in &collectors {
        for phase in phases {
            if opts.fixed_only && phase.rate == 0.0 {
                continue;
            }
            let r = run_phase(&paths, *collector, binary, phase, &opts, &sink, sink_addr)?;
            print_phase(&r);
            results.push(r);
        }
    }
    drop(runtime);

    let report = render(
        &paths,
        &opts,
        rotel.as_ref(),
        &results,
        started.elapsed(),
        &loadavg_before,
    );
    println!("\n{report}");
    let out = opts.out.clone().unwrap_or_else(|| {
        if opts.quick {
            paths.work.join("load-quick.md")
        } else {
            paths.root.join("benches/results/load.md")
        }
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    eprintln!("report written to {}", out.display());
    Ok(())
}

/// `cargo build --release -p tailgate --bin tailgate`; the collector and the load generator.
fn build_tailgate(root: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the release tailgate binary …");
    let mut command = Command::new(&cargo);
    // `cargo run` gives this process the harness package's CARGO_* variables; build scripts
    // that watch them would rebuild the collector's dependencies on every alternation between
    // this build and a plain `cargo build`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(&*key);
        }
    }
    let status = command
        .args(["build", "--release", "-p", "tailgate", "--bin", "tailgate"])
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p tailgate failed ({status})");
    }
    let bin = target.join("release/tailgate");
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

struct Rotel {
    binary: PathBuf,
    version: String,
}

/// A venv under target/load with the pinned rotel; its `rotel-agent` binary.
fn prepare_rotel(work: &Path) -> anyhow::Result<Rotel> {
    let venv = work.join("venv");
    let find = || -> Option<PathBuf> {
        let lib = std::fs::read_dir(venv.join("lib")).ok()?;
        lib.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path().join("site-packages/rotel/rotel-agent"))
            .find(|p| p.exists())
    };
    let installed = std::fs::read_to_string(venv.join(".tailgate-load-rotel")).unwrap_or_default();
    if find().is_none() || installed.trim() != ROTEL_PACKAGE {
        eprintln!("installing {ROTEL_PACKAGE} into {} …", venv.display());
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context(
                "cannot run python3, needed to install rotel (install python3 with venv and \
                 pip, or pass --skip-rotel)",
            )?;
        if !made.success() {
            bail!(
                "python3 -m venv {} failed: is the venv module installed (Debian/Ubuntu: \
                 apt-get install python3-venv)? Or pass --skip-rotel",
                venv.display()
            );
        }
        let pip = venv.join("bin/pip");
        let ok = Command::new(&pip)
            .args(["install", "--quiet", ROTEL_PACKAGE])
            .status()
            .with_context(|| format!("cannot run {}", pip.display()))?;
        if !ok.success() {
            bail!("pip install {ROTEL_PACKAGE} failed (network? PyPI?); or pass --skip-rotel");
        }
        std::fs::write(venv.join(".tailgate-load-rotel"), ROTEL_PACKAGE)?;
    }
    let binary = find().context("rotel-agent not found in the rotel package")?;
    let out = Command::new(&binary).arg("--version").output()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Rotel { binary, version })
}

/// A collector running for one phase.
struct Running {
    guard: Guard,
    grpc: SocketAddr,
    admin: Option<SocketAddr>,
}

fn start_tailgate(
    paths: &Paths,
    binary: &Path,
    dir: &Path,
    sink: SocketAddr,
    memory_only: bool,
) -> anyhow::Result<Running> {
    let source = paths.config.clone();
    let text =
        std::fs::read_to_string(&source).with_context(|| format!("read {}", source.display()))?;
    let mut config: toml::Table = text.parse().context("config/agent.toml")?;
    // Only addresses, the exporter and the data dir change; the policies are the agent chain.
    let table = |c: &mut toml::Table, key: &str| -> anyhow::Result<toml::Table> {
        match c.remove(key) {
            Some(toml::Value::Table(t)) => Ok(t),
            None => Ok(toml::Table::new()),
            Some(_) => bail!("[{key}] in config/agent.toml is not a table"),
        }
    };
    let mut receivers = table(&mut config, "receivers")?;
    receivers.insert("grpc".into(), "127.0.0.1:0".into());
    receivers.insert("http".into(), "127.0.0.1:0".into());
    config.insert("receivers".into(), receivers.into());
    let mut admin = table(&mut config, "admin")?;
    admin.insert("endpoint".into(), "127.0.0.1:0".into());
    config.insert("admin".into(), admin.into());
    let mut exporter = toml::Table::new();
    exporter.insert("type".into(), "otlp_grpc".into());
    exporter.insert("endpoint".into(), format!("http://{sink}").into());
    config.insert("exporter".into(), exporter.into());
    let mut plugins = table(&mut config, "plugins")?;
    plugins.insert(
        "cache_dir".into(),
        paths.work.join("plugin-cache").display().to_string().into(),
    );
    config.insert("plugins".into(), plugins.into());
    if memory_only {
        let mut storage = toml::Table::new();
        storage.insert("kind".into(), "memory".into());
        config.insert("storage".into(), storage.into());
    }
    let config_path = dir.join("tailgate.toml");
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    launch_tailgate(binary, &config_path, dir, &dir.join("tailgate.log"))
}

/// Runs `tailgate run --config <config_path>` in `dir` (its stderr copied to `log_file`) and
/// waits until it has logged its gRPC and admin addresses and `/readyz` answers 200.
fn launch_tailgate(
    binary: &Path,
    config_path: &Path,
    dir: &Path,
    log_file: &Path,
) -> anyhow::Result<Running> {
    let mut command = Command::new(binary);
    command
        .args(["run", "--config"])
        .arg(config_path)
        .current_dir(dir)
        .env("RUST_LOG", "info");
    let guard = Guard::spawn("tailgate", command, log_file)?;
    let ports = process::wait_for(Duration::from_secs(60), || {
        let find = |kind: &str| guard.log_after(&format!("{kind} listening on "));
        Some((find("grpc")?, find("admin")?))
    });
    let Some((grpc, admin)) = ports else {
        bail!(
            "tailgate did not report its ports; log:\n{}",
            guard.log_lines().join("\n")
        );
    };
    let grpc: SocketAddr = grpc.parse()?;
    let admin: SocketAddr = admin.parse()?;
    process::wait_for(Duration::from_secs(60), || {
        (http_get(admin, "/readyz").ok()?.0 == 200).then_some(())
    })
    .context("tailgate never became ready")?;
    Ok(Running {
        guard,
        grpc,
        admin: Some(admin),
    })
}

fn start_rotel(binary: &Path, dir: &Path, sink: SocketAddr) -> anyhow::Result<Running> {
    let grpc = SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let http = SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let mut command = Command::new(binary);
    command
        .arg("start")
        .arg("--otlp-grpc-endpoint")
        .arg(grpc.to_string())
        .arg("--otlp-http-endpoint")
        .arg(http.to_string())
        .args(["--exporter", "otlp", "--otlp-exporter-endpoint"])
        .arg(format!("http://{sink}"))
        .arg("--pid-file")
        .arg(dir.join("rotel.pid"))
        .arg("--log-file")
        .arg(dir.join("rotel.log"))
        .current_dir(dir);
    let mut guard = Guard::spawn("rotel", command, &dir.join("rotel.stderr"))?;
    let up = process::wait_for(Duration::from_secs(30), || {
        TcpStream::connect_timeout(&grpc, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    });
    if up.is_none() || guard.try_wait()?.is_some() {
        bail!(
            "rotel did not start listening on {grpc}; stderr:\n{}",
            guard.log_lines().join("\n")
        );
    }
    Ok(Running {
        guard,
        grpc,
        admin: None,
    })
}

fn accounting(admin: SocketAddr) -> anyhow::Result<Accounting> {
    let (code, text) = http_get(admin, "/metrics")?;
    if code != 200 {
        bail!("GET /metrics: HTTP {code}");
    }
    Ok(Accounting {
        received: metric_sum(&text, "tailgate_spans_received_total"),
        kept: metric_sum(&text, "tailgate_spans_kept_total"),
        dropped: metric_sum(&text, "tailgate_spans_dropped_total"),
        rescued: metric_sum(&text, "tailgate_spans_rescued_total"),
        refused: metric_sum(&text, "tailgate_spans_refused_total"),
        exported: metric_sum(&text, "tailgate_exported_spans_total"),
        export_failed: metric_sum(&text, "tailgate_export_failed_spans_total"),
    })
}

fn run_phase(
    paths: &Paths,
    collector: Collector,
    binary: &Path,
    phase: Phase,
    opts: &Options,
    sink: &Sink,
    sink_addr: SocketAddr,
) -> anyhow::Result<PhaseResult> {
    eprintln!(
        "== {} / {} ({}, {} s)",
        collector.name(),
        phase.name,
        if phase.rate > 0.0 {
            format!("{} spans/s", phase.rate)
        } else {
            "saturation".into()
        },
        phase.secs
    );
    let dir = paths
        .work
        .join(format!("run-{}-{}", collector.name(), phase.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    sink.reset();
    let mut running = match collector {
        Collector::Tailgate => start_tailgate(paths, binary, &dir, sink_addr, false)?,
        Collector::TailgateMemory => start_tailgate(paths, binary, &dir, sink_addr, true)?,
        Collector::Rotel => start_rotel(binary, &dir, sink_addr)?,
    };
    let pid = running.guard.pid();
    std::thread::sleep(SETTLE);
    let idle_rss = status_bytes(pid, "VmRSS");
    let cpu_before = cpu_seconds(pid)?;

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.push(status_bytes(pid, "VmRSS"));
                std::thread::sleep(RSS_SAMPLE_EVERY);
            }
            samples
        })
    };
    let children_before = children_cpu_seconds();
    let loadgen = run_loadgen(paths, &dir, running.grpc, phase, opts.connections);
    let loadgen_cpu_seconds = children_cpu_seconds() - children_before;
    sampling.store(false, Ordering::Relaxed);
    let mut samples = sampler.join().unwrap_or_default();
    let loadgen = loadgen?;
    let load_end = Instant::now();

    // Draining: tailgate holds each trace for root_grace, then batches the export.
    let accepted = loadgen["spans_accepted"].as_f64().unwrap_or(0.0);
    let mut last = (sink.counts(), Instant::now());
    let drained = process::wait_for(DRAIN_TIMEOUT, || {
        let counts = sink.counts();
        let complete = match running.admin {
            Some(admin) => accounting(admin).ok().is_some_and(|a| {
                a.received - a.refused >= accepted
                    && a.kept + a.dropped + a.refused >= a.received
                    && a.exported + a.export_failed >= a.kept
                    && counts.0 as f64 >= a.exported
            }),
            None => counts.0 as f64 >= accepted,
        };
        if complete {
            return Some(true);
        }
        if counts != last.0 {
            last = (counts, Instant::now());
        } else if last.1.elapsed() >= DRAIN_STABLE {
            return Some(false);
        }
        None
    })
    .unwrap_or(false);
    let drain_seconds = load_end.elapsed().as_secs_f64();
    if !drained {
        eprintln!(
            "warning: {} / {}: counts did not add up after draining",
            collector.name(),
            phase.name
        );
    }
    let cpu_seconds = cpu_seconds(pid)? - cpu_before;
    let peak_rss = status_bytes(pid, "VmHWM");
    let accounting = running.admin.map(accounting).transpose()?;
    let seen = sink.snapshot();
    running.guard.stop(Duration::from_secs(15));

    samples.sort_unstable();
    let steady_rss = samples.get(samples.len() / 2).copied().unwrap_or(0);
    Ok(PhaseResult {
        collector,
        phase,
        loadgen,
        idle_rss,
        steady_rss,
        peak_rss,
        cpu_seconds,
        loadgen_cpu_seconds,
        drain_seconds,
        drained,
        accounting,
        seen,
    })
}

/// `tailgate loadgen` as a subprocess; its JSON summary.
fn run_loadgen(
    paths: &Paths,
    dir: &Path,
    endpoint: SocketAddr,
    phase: Phase,
    connections: usize,
) -> anyhow::Result<Value> {
    let report = dir.join("loadgen.json");
    let mut command = Command::new(&paths.tailgate);
    command
        .arg("loadgen")
        .args(["--protocol", "grpc", "--endpoint"])
        .arg(format!("http://{endpoint}"))
        .arg("--connections")
        .arg(connections.to_string())
        .arg("--rate")
        .arg(phase.rate.to_string())
        .arg("--duration")
        .arg(format!("{}s", phase.secs))
        .arg("--quiet")
        .arg("--report")
        .arg(&report);
    let mut guard = Guard::spawn("loadgen", command, &dir.join("loadgen.log"))?;
    // Exit 1 only says not every span was accepted; the summary has the details.
    guard.wait(Duration::from_secs(phase.secs + 120))?;
    drop(guard);
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("loadgen wrote no summary to {}", report.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_phase(r: &PhaseResult) {
    eprintln!(
        "   {} spans in at {:.0} spans/s, CPU {:.2} s ({:.2} s per 1M spans), RSS idle {:.1} / steady {:.1} / peak {:.1} MiB, sink {} distinct {} dup, lag p50 {:?} p99 {:?} ms, loss {}, drained {} in {:.1} s",
        r.spans_in(),
        r.lg("spans_per_second"),
        r.cpu_seconds,
        r.cpu_per_million(),
        mib(r.idle_rss),
        mib(r.steady_rss),
        mib(r.peak_rss),
        r.seen.distinct_seqs,
        r.seen.duplicate_seqs,
        r.seen.lag_ms(0.5),
        r.seen.lag_ms(0.99),
        r.loss(),
        r.drained,
        r.drain_seconds,
    );
}

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
    let memory = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or("unknown".into(), |kib| {
            format!("{:.1} GiB", kib / 1048576.0)
        });
    let command = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into())
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    vec![
        (
            "CPUs (nproc)".into(),
            std::thread::available_parallelism().map_or("?".into(), |n| n.to_string()),
        ),
        ("CPU model".into(), cpu),
        ("Memory".into(), memory),
        (
            "Kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
        ("rustc".into(), command(&rustc, &["--version"])),
        (
            "tailgate commit".into(),
            command("git", &["rev-parse", "--short", "HEAD"]),
        ),
        (
            "Date (UTC)".into(),
            command("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ),
    ]
}

fn render(
    paths: &Paths,
    opts: &Options,
    rotel: Option<&Rotel>,
    results: &[PhaseResult],
    took: Duration,
    loadavg_before: &str,
) -> String {
    let find = |c: Collector, phase: &str| {
        results
            .iter()
            .find(|r| r.collector == c && r.phase.name == phase)
    };
    let mut md = String::new();
    let _ = writeln!(md, "# Load harness: tailgate vs rotel\n");
    let _ = writeln!(
        md,
        "Generated by `cargo run --release -p tailgate-load{}` in {:.0} s. Each phase runs a \
         fresh collector process; numbers are for the collector process only (the load \
         generator and the sink run beside it on the same machine).\n",
        if opts.quick { " -- --quick" } else { "" },
        took.as_secs_f64()
    );
    let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in machine() {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "| Load average before the run | {} |",
        loadavg_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        md,
        "| rotel | {} (PyPI `{ROTEL_PACKAGE}`) |",
        rotel.map_or("skipped", |r| r.version.as_str())
    );

    let _ = writeln!(md, "\n## Setup\n");
    let _ = writeln!(
        md,
        "- Load: `tailgate loadgen --protocol grpc --connections {} --duration {}s --rate R` \
         (30-span agent traces, 10 traces per request, default shape: 2 % each errors, slow, \
         costly, low-confidence). Phase `fixed`: R = {}; phase `saturation`: R = 0 (as fast as \
         the connections go).",
        opts.connections, opts.secs, opts.rate
    );
    let config = (paths.config.strip_prefix(&paths.root))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| {
            paths
                .config
                .file_name()
                .unwrap_or_default()
                .display()
                .to_string()
        });
    let grace = std::fs::read_to_string(&paths.config)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| Some(t.get("buffer")?.get("root_grace")?.as_str()?.to_owned()))
        .unwrap_or_else(|| "auto".into());
    let _ = writeln!(
        md,
        "- tailgate: `{config}` with only the receiver/admin addresses (127.0.0.1:0), the exporter \
         (`otlp_grpc` to the sink, defaults otherwise: gzip, batches of 8192 spans or 200 ms) and \
         the plugin cache dir changed. root_grace = {grace:?}."
    );
    let _ = writeln!(
        md,
        "- rotel: `rotel-agent start --exporter otlp --otlp-exporter-endpoint <sink>`, defaults \
         otherwise (gzip, batches of 8192 spans or 200 ms): a plain pass-through, no sampling."
    );
    let _ = writeln!(
        md,
        "- Sink: in the harness process, OTLP/gRPC, counts every `loadgen.seq` in a bitmap. \
         Decision lag = sink receive time − root span end time (the root ends when loadgen \
         makes the request), over the roots the sink receives (tailgate: kept traces only; \
         rotel: no decision, so its lag is its pass-through delay).\n"
    );

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "| Metric | tailgate | rotel | tailgate / rotel | Target |\n|---|---:|---:|---:|---|"
    );
    let row = |md: &mut String,
               name: &str,
               value: &dyn Fn(&PhaseResult) -> Option<f64>,
               phase: &str,
               digits: usize,
               target: &str| {
        let t = find(Collector::Tailgate, phase).and_then(value);
        let r = find(Collector::Rotel, phase).and_then(value);
        let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.digits$}"));
        let ratio = match (t, r) {
            (Some(t), Some(r)) if r != 0.0 => format!("{:.2}", t / r),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {ratio} | {target} |",
            fmt(t),
            fmt(r)
        );
    };
    row(
        &mut md,
        "Idle RSS, first start: compiles the policies (MiB)",
        &|r| Some(mib(r.idle_rss)),
        "fixed",
        1,
        "≤ 25 MiB",
    );
    row(
        &mut md,
        "Idle RSS, restart on a warm plugin cache (MiB)",
        &|r| Some(mib(r.idle_rss)),
        "saturation",
        1,
        "≤ 25 MiB",
    );
    row(
        &mut md,
        &format!("Steady RSS at {} spans/s (MiB, median)", opts.rate),
        &|r| Some(mib(r.steady_rss)),
        "fixed",
        1,
        "",
    );
    row(
        &mut md,
        "Peak RSS, fixed rate (MiB)",
        &|r| Some(mib(r.peak_rss)),
        "fixed",
        1,
        "",
    );
    row(
        &mut md,
        "Peak RSS, saturation (MiB)",
        &|r| Some(mib(r.peak_rss)),
        "saturation",
        1,
        "",
    );
    row(
        &mut md,
        "CPU s per 1M spans, fixed rate",
        &|r| Some(r.cpu_per_million()),
        "fixed",
        2,
        "≤ 0.5 × rotel",
    );
    row(
        &mut md,
        "CPU s per 1M spans, saturation",
        &|r| Some(r.cpu_per_million()),
        "saturation",
        2,
        "",
    );
    row(
        &mut md,
        "Achieved spans/s, fixed rate",
        &|r| Some(r.lg("spans_per_second")),
        "fixed",
        0,
        "",
    );
    row(
        &mut md,
        "Ingest spans/s, saturation (accepted ÷ load time)",
        &|r| Some(r.lg("spans_per_second")),
        "saturation",
        0,
        "",
    );
    row(
        &mut md,
        "Sustained spans/s, saturation (accepted ÷ (load + drain time))",
        &|r| Some(r.spans_in() / (r.lg("elapsed_seconds") + r.drain_seconds).max(1e-9)),
        "saturation",
        0,
        "≥ 100,000 with zero loss",
    );
    for (phase, label) in [("fixed", "fixed rate"), ("saturation", "saturation")] {
        row(
            &mut md,
            &format!("Decision lag p50 (ms), {label}"),
            &|r| r.seen.lag_ms(0.5),
            phase,
            0,
            "",
        );
        row(
            &mut md,
            &format!("Decision lag p99 (ms), {label}"),
            &|r| r.seen.lag_ms(0.99),
            phase,
            0,
            &format!("≤ {:.0} ms", ROOT_GRACE_MS + 100.0),
        );
        row(
            &mut md,
            &format!("Decision lag p99 (ms), {label}, after the first {WARM_UP_SECS} s"),
            &|r| r.seen.lag_after_ms(0.99, WARM_UP_SECS * 1_000_000_000),
            phase,
            0,
            "",
        );
    }
    for (phase, label) in [("fixed", "fixed rate"), ("saturation", "saturation")] {
        row(
            &mut md,
            &format!("Lost spans, {label}"),
            &|r| Some(r.loss()),
            phase,
            0,
            "0",
        );
        row(
            &mut md,
            &format!("Duplicate spans, {label}"),
            &|r| Some(r.seen.duplicate_seqs as f64),
            phase,
            0,
            "0",
        );
    }

    let _ = writeln!(md, "\n## Per phase\n");
    let _ = writeln!(
        md,
        "Spans unless noted. *Sent* = seqs loadgen handed out; *accepted* = taken by the \
         collector (loadgen's view); tailgate's own counts are from `/metrics`; *sink* = \
         distinct seqs that reached the sink; *lost* = sent − dropped by policy − sink.\n"
    );
    let _ = writeln!(
        md,
        "| Collector | Phase | Sent | Accepted | Rejected/failed | Retries | Received | Kept | Dropped | Refused | Exported | Sink | Dups | Lost | Collector CPU s | Loadgen CPU s | Drain s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let a = r.accounting;
        let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1}{} |",
            r.collector.name(),
            r.phase.name,
            r.seq_count(),
            r.spans_in(),
            r.lg("spans_rejected") + r.lg("spans_failed"),
            r.lg("retries"),
            f(a.map(|a| a.received)),
            f(a.map(|a| a.kept)),
            f(a.map(|a| a.dropped)),
            f(a.map(|a| a.refused)),
            f(a.map(|a| a.exported)),
            r.seen.distinct_seqs,
            r.seen.duplicate_seqs,
            r.loss(),
            r.cpu_seconds,
            r.loadgen_cpu_seconds,
            r.drain_seconds,
            if r.drained { "" } else { " (not settled)" },
        );
    }

    let _ = writeln!(
        md,
        "\n## The storage log's cost\n\ntailgate as above (the storage log on, its default \
         `fsync = \"interval\"`, under the phase's own directory) against the same with \
         `[storage] kind = \"memory\"`, in this run.\n\n\
         | Metric | log on | memory only | on / off | Target |\n|---|---:|---:|---:|---|"
    );
    let storage_row = |md: &mut String,
                       name: &str,
                       value: &dyn Fn(&PhaseResult) -> f64,
                       phase: &str,
                       target: &str| {
        let on = find(Collector::Tailgate, phase).map(value);
        let off = find(Collector::TailgateMemory, phase).map(value);
        let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.2}"));
        let ratio = match (on, off) {
            (Some(on), Some(off)) if off != 0.0 => format!("{:.2}", on / off),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {ratio} | {target} |",
            fmt(on),
            fmt(off)
        );
    };
    storage_row(
        &mut md,
        &format!("CPU s per 1M spans at {} spans/s", opts.rate),
        &|r| r.cpu_per_million(),
        "fixed",
        "≤ 1.15×",
    );
    storage_row(
        &mut md,
        "Sustained spans/s, saturation",
        &|r| r.spans_in() / (r.lg("elapsed_seconds") + r.drain_seconds).max(1e-9),
        "saturation",
        "log on: ≥ 150,000 with zero loss",
    );
    storage_row(
        &mut md,
        "Lost spans, saturation",
        &|r| r.loss(),
        "saturation",
        "0",
    );
    storage_row(
        &mut md,
        "Peak RSS, saturation (MiB)",
        &|r| mib(r.peak_rss),
        "saturation",
        "",
    );

    let _ = writeln!(md, "\n## Checks\n");
    for r in results {
        let mut checks: Vec<(String, bool)> = Vec::new();
        let sent = r.seq_count() as f64;
        checks.push((
            "every span at the sink has a seq below the seq count".into(),
            r.seen.distinct_seqs + r.seen.missing_below(r.seq_count()) == r.seq_count()
                && r.seen.spans_without_seq == 0,
        ));
        checks.push((
            "no duplicates at the sink".into(),
            r.seen.duplicate_seqs == 0,
        ));
        match r.accounting {
            Some(a) => {
                // A refused span is retried by loadgen, so tailgate receives it twice.
                checks.push((
                    format!(
                        "loadgen accepted = tailgate received − refused ({:.0} = {:.0})",
                        r.spans_in(),
                        a.received - a.refused
                    ),
                    r.spans_in() == a.received - a.refused,
                ));
                checks.push((
                    format!(
                        "received = kept + dropped − rescued + refused ({:.0} = {:.0})",
                        a.received,
                        a.kept + a.dropped - a.rescued + a.refused
                    ),
                    a.received == a.kept + a.dropped - a.rescued + a.refused,
                ));
                checks.push((
                    format!(
                        "sink distinct = exported = kept ({} = {:.0} = {:.0})",
                        r.seen.distinct_seqs, a.exported, a.kept
                    ),
                    r.seen.distinct_seqs as f64 == a.exported && a.exported == a.kept,
                ));
            }
            None => checks.push((
                format!(
                    "sink distinct = sent ({} = {sent:.0})",
                    r.seen.distinct_seqs
                ),
                r.seen.distinct_seqs as f64 == sent,
            )),
        }
        let line = checks
            .iter()
            .map(|(what, ok)| format!("{} {what}", if *ok { "✓" } else { "✗" }))
            .collect::<Vec<_>>()
            .join("; ");
        let _ = writeln!(
            md,
            "- **{} / {}**: {line}",
            r.collector.name(),
            r.phase.name
        );
    }
    let _ = writeln!(
        md,
        "\nScratch files (configs, logs, loadgen summaries) of this run: `{}`.",
        paths
            .work
            .strip_prefix(&paths.root)
            .unwrap_or(&paths.work)
            .display()
    );
    md
}
