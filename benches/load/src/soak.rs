//! `tailgate-load soak`: the storage log's promise, held over a long run. Two phases, each
//! against the harness's [`Sink`] and each with one `tailgate loadgen --acked-out` that sends for
//! the whole phase (retrying refusals and failed connections):
//!
//! 1. **Kill cycles.** One tailgate on one `[storage] dir` (default `fsync`), exporting OTLP/gRPC
//!    to the sink. Every cycle waits a random 2-8 s (drawn from the printed seed), `kill -9`s
//!    tailgate and restarts it on the same directory and port while loadgen keeps sending. At
//!    the end: loadgen stops, the restarted tailgate drains and gets SIGTERM. Per cycle: the
//!    spans acknowledged in its window (answered with success between the previous restart and
//!    its kill), how many of them were delivered by the end, lost, and the duplicate deliveries
//!    that arrived after its kill.
//! 2. **Outage.** A fresh tailgate with a small `storage.max_bytes` and the default retry
//!    budget (no limit with the log on); the sink goes down (gRPC `UNAVAILABLE`) for
//!    `--outage-secs` and comes back. `/metrics` is sampled every second: the log's size
//!    against its bound, and refusals by reason, to show where back-pressure starts.
//!
//! Owns: the schedule of kills (a seed replays it), the attribution of acknowledgements to
//! cycles (by the length of the `--acked-out` file at each kill: loadgen writes a line per
//! answer, unbuffered), and the report `benches/results/soak.md`.
//!
//! Must never: pass with an acknowledged span missing, with a kill followed by more
//! duplicates than were in flight, or with the log past its bound by more than a segment. Each
//! of these makes the command exit 1 (after writing the report).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::process::{self, Guard, http_get, metric_sum};
use crate::sink::{Seen, Sink};
use crate::{Paths, Running, launch_tailgate, machine};

/// Exporter batch size and OTLP concurrency, as in `tests/e2e/crash.rs`: small, so the
/// duplicate bound is tight.
const BATCH_MAX_SPANS: u64 = 512;
const CONCURRENCY: u64 = 2;
/// The load's shape, as in the crash tests: requests of 20 traces of 10 spans.
const TRACES_PER_REQUEST: u64 = 20;
const SPANS_PER_TRACE: u64 = 10;
const SPANS_PER_REQUEST: u64 = TRACES_PER_REQUEST * SPANS_PER_TRACE;
/// loadgen connections, each with one request in flight.
const CONNECTIONS: u64 = 2;
/// How long into each run the kill comes, in ms: drawn from the seed.
const KILL_AFTER_MS: (u64, u64) = (2_000, 8_000);
/// After a kill, answers that reached loadgen just before it still get their `--acked-out`
/// line written; the window of the next cycle starts after this.
const ACK_SETTLE: Duration = Duration::from_millis(200);
/// Load after the last restart, so the last recovery happens under load too.
const TAIL: Duration = Duration::from_secs(5);
/// Load before the outage starts and after it ends.
const OUTAGE_BEFORE: Duration = Duration::from_secs(5);
const OUTAGE_AFTER: Duration = Duration::from_secs(30);
/// The outage's log bound fills within this share of the outage (at the measured bytes per
/// span), and is at most 64 MiB, so back-pressure has most of the outage to show itself.
const FILL_SHARE: f64 = 1.0 / 3.0;
const MAX_BYTES_CAP: u64 = 64 << 20;
/// `storage.max_bytes` must hold two segments; below 8 MiB the bound is mostly segment slack.
const MAX_BYTES_FLOOR: u64 = 8 << 20;
/// Every acknowledged seq must be delivered within this of the load's end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// SIGTERM drains the exporter; this is `shutdown.timeout`'s default plus slack.
const STOP_GRACE: Duration = Duration::from_secs(60);

const USAGE: &str = "\
usage: cargo run --release -p tailgate-load -- soak [options]

  --cycles N          kill -9 cycles under load (default 20; 0 skips the phase)
  --outage-secs N     how long the test backend is down (default 600; 0 skips the phase)
  --rate N            loadgen spans/s in both phases (default 5000)
  --seed N            seed of the kill moments and of loadgen (default: the clock)
  --out FILE          Markdown report (default benches/results/soak.md)";

struct Options {
    cycles: u32,
    outage_secs: u64,
    rate: f64,
    seed: u64,
    out: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    let mut o = Options {
        cycles: 20,
        outage_secs: 600,
        rate: 5_000.0,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        out: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--cycles" => o.cycles = value("--cycles")?.parse()?,
            "--outage-secs" => o.outage_secs = value("--outage-secs")?.parse()?,
            "--rate" => o.rate = value("--rate")?.parse()?,
            "--seed" => o.seed = value("--seed")?.parse()?,
            "--out" => o.out = Some(value("--out")?.into()),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown soak argument {other:?}\n{USAGE}"),
        }
    }
    if !(o.rate > 0.0 && o.rate.is_finite()) {
        bail!("--rate must be a number of spans/s above 0");
    }
    Ok(o)
}

/// Runs the soak; Ok(false) when a check failed (the report says which).
pub fn run(args: impl Iterator<Item = String>) -> anyhow::Result<bool> {
    let opts = parse_args(args)?;
    let paths = Paths::prepare(None)?;
    let work = paths.work.join("soak");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!(
        "soak: seed {} (--seed {} replays the kill moments)",
        opts.seed, opts.seed
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("soak-sink")
        .enable_all()
        .build()?;
    let sink = Sink::default();
    let sink_addr = runtime.block_on(sink.start())?;
    eprintln!("sink listening on {sink_addr}");

    let started = Instant::now();
    let kills = (opts.cycles > 0)
        .then(|| kill_cycles(&paths, &work.join("kills"), &opts, &sink, sink_addr))
        .transpose()?;
    let outage = (opts.outage_secs > 0)
        .then(|| outage(&paths, &work.join("outage"), &opts, &sink, sink_addr))
        .transpose()?;
    drop(runtime);

    let (report, passed) = render(&opts, kills.as_ref(), outage.as_ref(), started.elapsed());
    println!("\n{report}");
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| paths.root.join("benches/results/soak.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    eprintln!("report written to {}", out.display());
    if !passed {
        eprintln!("soak FAILED: see the checks in the report");
    }
    Ok(passed)
}

/// SplitMix64, so a seed gives the same kill moments whatever the dependencies do.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A tailgate config for the soak: receivers and admin on 127.0.0.1 (gRPC on `grpc_port`, 0
/// for any), every trace kept 100 ms after its root, OTLP/gRPC to the sink.
fn config(grpc_port: u16, sink: SocketAddr, exporter_extra: &str, storage: &str) -> String {
    format!(
        "[receivers]\ngrpc = \"127.0.0.1:{grpc_port}\"\nhttp = \"127.0.0.1:0\"\n\n\
         [admin]\nendpoint = \"127.0.0.1:0\"\n\n\
         [buffer]\nroot_grace = \"100ms\"\n\n\
         [decide]\ndefault = \"keep\"\n\n\
         [exporter]\ntype = \"otlp_grpc\"\nendpoint = \"http://{sink}\"\n\
         concurrency = {CONCURRENCY}\nbatch_max_spans = {BATCH_MAX_SPANS}\n\
         batch_timeout = \"50ms\"\nretry_initial_backoff = \"100ms\"\nretry_max_backoff = \"1s\"\n\
         {exporter_extra}\n\
         [storage]\n{storage}"
    )
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// `tailgate loadgen` at the soak's load into `endpoint`, listing acknowledged requests in
/// `acked`.
fn loadgen(
    paths: &Paths,
    endpoint: SocketAddr,
    opts: &Options,
    duration: Duration,
    retry_for: Duration,
    acked: &Path,
) -> Command {
    let mut command = Command::new(&paths.tailgate);
    command
        .arg("loadgen")
        .args(["--protocol", "grpc", "--endpoint"])
        .arg(format!("http://{endpoint}"))
        .args(["--connections", &CONNECTIONS.to_string()])
        .args(["--rate", &opts.rate.to_string()])
        .args(["--duration", &format!("{}s", duration.as_secs())])
        .args(["--traces-per-request", &TRACES_PER_REQUEST.to_string()])
        .args(["--spans-per-trace", &SPANS_PER_TRACE.to_string()])
        .args(["--seed", &opts.seed.to_string()])
        .args(["--retry-for", &format!("{}s", retry_for.as_secs())])
        .arg("--quiet")
        .arg("--acked-out")
        .arg(acked);
    command
}

/// `--acked-out` (or a stretch of it): `(first_seq, spans)` per acknowledged request.
fn parse_acked(text: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    text.lines()
        .map(|line| {
            let parsed = line
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            parsed.with_context(|| format!("--acked-out line {line:?}"))
        })
        .collect()
}

fn read_acked(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn file_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

/// What became of a list of acknowledged requests, by the sink's final count.
#[derive(Clone, Copy, Default)]
struct Fate {
    acknowledged: u64,
    delivered: u64,
    lost: u64,
}

impl Fate {
    fn of(acked: &[(u64, u64)], seen: &Seen) -> Self {
        let mut fate = Fate::default();
        for seq in acked.iter().flat_map(|&(first, n)| first..first + n) {
            fate.acknowledged += 1;
            if seen.contains(seq) {
                fate.delivered += 1;
            } else {
                fate.lost += 1;
            }
        }
        fate
    }

    fn add(&mut self, other: Fate) {
        self.acknowledged += other.acknowledged;
        self.delivered += other.delivered;
        self.lost += other.lost;
    }
}

/// Waits until every acknowledged seq in `acked` has reached the sink; false after `timeout`.
fn drained(sink: &Sink, acked: &Path, timeout: Duration) -> anyhow::Result<bool> {
    let acked = parse_acked(&read_acked(acked)?)?;
    Ok(process::wait_for(timeout, || {
        let seen = sink.snapshot();
        (Fate::of(&acked, &seen).lost == 0).then_some(())
    })
    .is_some())
}

struct KillCycle {
    kill_after: Duration,
    fate: Fate,
    /// Duplicate deliveries that arrived after this kill (until the next one, or the end).
    duplicates: u64,
    /// From the restart's spawn to `/readyz` answering.
    restart: Duration,
}

struct KillReport {
    cycles: Vec<KillCycle>,
    /// The acknowledgements after the last restart.
    tail: Fate,
    /// Duplicates before the first kill: nothing was restarted, so anything here is a bug.
    duplicates_before_first_kill: u64,
    /// Distinct seqs at the sink, acknowledged or not (a request the kill cut off after its
    /// append is delivered without its answer ever arriving).
    distinct_delivered: u64,
    drained: bool,
    final_stop: Option<ExitStatus>,
    took: Duration,
    storage: PathBuf,
}

impl KillReport {
    fn total(&self) -> Fate {
        let mut total = self.tail;
        for c in &self.cycles {
            total.add(c.fate);
        }
        total
    }
}

/// The most duplicates one kill may cause: the exporter's batches in flight to the backend
/// (the crash tests' bound), plus the requests loadgen had in flight, which tailgate may have
/// logged before the kill cut off their answer, and which loadgen then sends again.
fn duplicate_bound() -> u64 {
    CONCURRENCY * BATCH_MAX_SPANS + CONNECTIONS * SPANS_PER_REQUEST
}

fn kill_cycles(
    paths: &Paths,
    dir: &Path,
    opts: &Options,
    sink: &Sink,
    sink_addr: SocketAddr,
) -> anyhow::Result<KillReport> {
    eprintln!(
        "== kill cycles: {} × kill -9 at {}-{} s, {} spans/s",
        opts.cycles,
        KILL_AFTER_MS.0 / 1000,
        KILL_AFTER_MS.1 / 1000,
        opts.rate
    );
    std::fs::create_dir_all(dir)?;
    sink.reset();
    let mut rng = Rng(opts.seed);
    let waits: Vec<Duration> = (0..opts.cycles)
        .map(|_| Duration::from_millis(rng.between(KILL_AFTER_MS.0, KILL_AFTER_MS.1)))
        .collect();
    let storage = dir.join("storage");
    // The same port for every run: loadgen keeps one endpoint through the restarts.
    let port = process::free_port()?;
    let config_path = dir.join("tailgate.toml");
    std::fs::write(
        &config_path,
        config(
            port,
            sink_addr,
            "",
            &format!("dir = {}\n", toml_path(&storage)),
        ),
    )?;
    let start = |run: usize| {
        launch_tailgate(
            &paths.tailgate,
            &config_path,
            dir,
            &dir.join(format!("tailgate-{run}.log")),
        )
    };
    let started = Instant::now();
    let mut running = start(0)?;
    let acked_path = dir.join("acked.txt");
    // Longer than the cycles can take, so a harness that dies leaves no loadgen for long;
    // it is stopped once the cycles are done.
    let duration = waits.iter().sum::<Duration>() + Duration::from_secs(60) * (opts.cycles + 1);
    // Through a restart, with room to spare: recovery replays the log before it listens.
    let retry_for = Duration::from_secs(120);
    let mut load = Guard::spawn(
        "loadgen",
        loadgen(paths, running.grpc, opts, duration, retry_for, &acked_path),
        &dir.join("loadgen.log"),
    )?;

    let mut cycles = Vec::with_capacity(waits.len());
    // (acked-out bytes, sink duplicates) at each kill.
    let mut at_kill = Vec::with_capacity(waits.len());
    for (i, wait) in waits.iter().enumerate() {
        std::thread::sleep(*wait);
        if let Some(status) = load.try_wait()? {
            bail!("loadgen stopped during cycle {} ({status})", i + 1);
        }
        running
            .guard
            .kill()
            .with_context(|| format!("tailgate before kill {}", i + 1))?;
        std::thread::sleep(ACK_SETTLE);
        at_kill.push((file_len(&acked_path), sink.snapshot().duplicate_seqs));
        let restarting = Instant::now();
        running = start(i + 1).with_context(|| format!("restart after kill {}", i + 1))?;
        let restart = restarting.elapsed();
        eprintln!(
            "   kill {} after {:.1} s; restarted and ready in {:.1} s",
            i + 1,
            wait.as_secs_f64(),
            restart.as_secs_f64()
        );
        cycles.push(KillCycle {
            kill_after: *wait,
            fate: Fate::default(),
            duplicates: 0,
            restart,
        });
    }
    std::thread::sleep(TAIL);
    if let Some(status) = load.try_wait()? {
        bail!("loadgen stopped before the end of the cycles ({status})");
    }
    // loadgen's --acked-out is right at every moment, so stopping it mid-request loses no
    // acknowledgement: an answer it did not get is not listed.
    load.kill()?;
    let drained = drained(sink, &acked_path, DRAIN_TIMEOUT)?;
    if !drained {
        eprintln!("warning: not every acknowledged seq arrived within {DRAIN_TIMEOUT:?}");
    }
    if let Some(status) = running.guard.try_wait()? {
        bail!("tailgate exited by itself after the last restart ({status})");
    }
    let final_stop = running.guard.stop(STOP_GRACE);
    let seen = sink.snapshot();

    // Each kill's window is the stretch of --acked-out written since the previous one: loadgen
    // writes whole lines, one `write` each, so every offset read is at a line's end.
    let acked = read_acked(&acked_path)?;
    let window = |from: usize, to: usize| {
        let text = acked.get(from..to).context("--acked-out shrank")?;
        Ok::<_, anyhow::Error>(Fate::of(&parse_acked(text)?, &seen))
    };
    let mut from = 0;
    for (i, cycle) in cycles.iter_mut().enumerate() {
        let (to, dups) = at_kill[i];
        cycle.fate = window(from, to)?;
        let next = at_kill.get(i + 1).map_or(seen.duplicate_seqs, |n| n.1);
        cycle.duplicates = next - dups;
        from = to;
    }
    let tail = window(from, acked.len())?;
    Ok(KillReport {
        cycles,
        tail,
        duplicates_before_first_kill: at_kill.first().map_or(seen.duplicate_seqs, |k| k.1),
        distinct_delivered: seen.distinct_seqs,
        drained,
        final_stop,
        took: started.elapsed(),
        // As the report shows it: relative to the repository, not this machine's path.
        storage: storage
            .strip_prefix(&paths.root)
            .map_or_else(|_| storage.clone(), Path::to_path_buf),
    })
}

/// One `/metrics` sample of the outage phase.
#[derive(Clone)]
struct Sample {
    /// Seconds since the outage started (negative before).
    at: f64,
    sink_down: bool,
    storage_bytes: f64,
    /// `tailgate_spans_refused_total` by reason.
    refused: Vec<(String, f64)>,
    kept_for_disk: f64,
}

impl Sample {
    fn refused(&self, reason: &str) -> f64 {
        (self.refused.iter())
            .filter(|(r, _)| r == reason)
            .fold(0.0, |sum, (_, v)| sum + v)
    }

    fn refused_total(&self) -> f64 {
        self.refused.iter().fold(0.0, |sum, (_, v)| sum + v)
    }
}

fn sample(admin: SocketAddr, at: f64, sink_down: bool) -> anyhow::Result<Sample> {
    let (code, text) = http_get(admin, "/metrics")?;
    if code != 200 {
        bail!("GET /metrics: HTTP {code}");
    }
    let mut refused: Vec<(String, f64)> = Vec::new();
    for (series, value) in crate::http::samples(&text) {
        if crate::http::metric_name(series) != "tailgate_spans_refused_total" {
            continue;
        }
        let reason = series
            .split_once("reason=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("unlabelled", |(reason, _)| reason);
        match refused.iter_mut().find(|(r, _)| r == reason) {
            Some((_, v)) => *v += value,
            None => refused.push((reason.to_owned(), value)),
        }
    }
    let kept_for_disk = crate::http::samples(&text)
        .filter(|(series, _)| {
            crate::http::metric_name(series) == "tailgate_spans_kept_total"
                && series.contains("trigger=\"disk\"")
        })
        .map(|(_, v)| v)
        .sum();
    Ok(Sample {
        at,
        sink_down,
        storage_bytes: metric_sum(&text, "tailgate_storage_bytes"),
        refused,
        kept_for_disk,
    })
}

struct OutageReport {
    outage: Duration,
    max_bytes: u64,
    segment_bytes: u64,
    bytes_per_span: f64,
    loadgen: Value,
    fate: Fate,
    duplicates: u64,
    sink_refused_requests: u64,
    samples: Vec<Sample>,
    /// received, kept, dropped (net of the rescued), refused at the end, before SIGTERM.
    accounting: (f64, f64, f64, f64),
    drained: bool,
    final_stop: Option<ExitStatus>,
}

impl OutageReport {
    fn peak_bytes(&self) -> f64 {
        self.samples
            .iter()
            .map(|s| s.storage_bytes)
            .fold(0.0, f64::max)
    }

    fn overran(&self) -> bool {
        self.peak_bytes() > (self.max_bytes + self.segment_bytes) as f64
    }

    /// The first sample with any refusal.
    fn first_refusal(&self) -> Option<&Sample> {
        self.samples.iter().find(|s| s.refused_total() > 0.0)
    }

    fn first_of(&self, disk: bool) -> Option<&Sample> {
        self.samples.iter().find(|s| {
            let disk_full = s.refused("disk_full");
            if disk {
                disk_full > 0.0
            } else {
                s.refused_total() - disk_full > 0.0
            }
        })
    }

    /// Whether the first refusals were all for the disk bound.
    fn backpressure_at_disk_bound(&self) -> bool {
        self.first_refusal()
            .is_some_and(|s| s.refused_total() == s.refused("disk_full"))
    }
}

/// Log bytes per span of the soak's load: the wire size of its requests, as loadgen writes
/// them to a file (a storage record adds a 21-byte header per request).
fn bytes_per_span(paths: &Paths, dir: &Path, opts: &Options) -> anyhow::Result<f64> {
    const SPANS: u64 = 20_000;
    let file = dir.join("sample-requests.bin");
    let status = Command::new(&paths.tailgate)
        .arg("loadgen")
        .args(["--spans", &SPANS.to_string()])
        .args(["--traces-per-request", &TRACES_PER_REQUEST.to_string()])
        .args(["--spans-per-trace", &SPANS_PER_TRACE.to_string()])
        .args(["--seed", &opts.seed.to_string()])
        .arg("--out")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .status()
        .context("run tailgate loadgen --out")?;
    if !status.success() {
        bail!("tailgate loadgen --out failed ({status})");
    }
    let bytes = file_len(&file) as f64;
    let _ = std::fs::remove_file(&file);
    Ok(bytes / SPANS as f64)
}

fn outage(
    paths: &Paths,
    dir: &Path,
    opts: &Options,
    sink: &Sink,
    sink_addr: SocketAddr,
) -> anyhow::Result<OutageReport> {
    std::fs::create_dir_all(dir)?;
    let outage = Duration::from_secs(opts.outage_secs);
    let bytes_per_span = bytes_per_span(paths, dir, opts)?;
    let fill = opts.rate * bytes_per_span * outage.as_secs_f64() * FILL_SHARE;
    let max_bytes = ((fill as u64).clamp(MAX_BYTES_FLOOR, MAX_BYTES_CAP) >> 20) << 20;
    // 16 segments to the bound: the overrun allowed (one segment) stays small.
    let segment_bytes = ((max_bytes / 16) >> 20).max(1) << 20;
    eprintln!(
        "== outage: sink down for {} s at {} spans/s; storage.max_bytes = {} MiB \
         (fills in about {:.0} s at {bytes_per_span:.0} bytes/span), segments of {} MiB",
        outage.as_secs(),
        opts.rate,
        max_bytes >> 20,
        max_bytes as f64 / (opts.rate * bytes_per_span),
        segment_bytes >> 20
    );
    sink.reset();
    sink.set_down(false);
    let config_path = dir.join("tailgate.toml");
    std::fs::write(
        &config_path,
        config(
            0,
            sink_addr,
            "",
            &format!(
                "dir = {}\nmax_bytes = \"{}MiB\"\nsegment_bytes = \"{}MiB\"\n",
                toml_path(&dir.join("storage")),
                max_bytes >> 20,
                segment_bytes >> 20
            ),
        ),
    )?;
    let mut running: Running = launch_tailgate(
        &paths.tailgate,
        &config_path,
        dir,
        &dir.join("tailgate.log"),
    )?;
    let admin = running.admin.context("tailgate has an admin endpoint")?;
    let acked_path = dir.join("acked.txt");
    let report_path = dir.join("loadgen.json");
    let mut command = loadgen(
        paths,
        running.grpc,
        opts,
        OUTAGE_BEFORE + outage + OUTAGE_AFTER,
        // A request refused at the outage's start is retried until the log has room again.
        outage + Duration::from_secs(120),
        &acked_path,
    );
    command.arg("--report").arg(&report_path);
    let mut load = Guard::spawn("loadgen", command, &dir.join("loadgen.log"))?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut down = false;
    let mut next = Instant::now();
    loop {
        let elapsed = started.elapsed();
        let want_down = elapsed >= OUTAGE_BEFORE && elapsed < OUTAGE_BEFORE + outage;
        if want_down != down {
            sink.set_down(want_down);
            down = want_down;
            eprintln!(
                "   {:.0} s: the sink is {}",
                elapsed.as_secs_f64(),
                if down { "down" } else { "back up" }
            );
        }
        if let Some(status) = running.guard.try_wait()? {
            bail!("tailgate exited during the outage phase ({status})");
        }
        let at = elapsed.as_secs_f64() - OUTAGE_BEFORE.as_secs_f64();
        let s = sample(admin, at, down)?;
        if samples.len() % 10 == 0 {
            eprintln!(
                "   {at:>5.0} s: storage {:.1} MiB, refused {:?}",
                s.storage_bytes / (1 << 20) as f64,
                s.refused
            );
        }
        samples.push(s);
        if load.try_wait()?.is_some() && elapsed >= OUTAGE_BEFORE + outage {
            break;
        }
        next += Duration::from_secs(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    sink.set_down(false);
    let text = std::fs::read_to_string(&report_path)
        .with_context(|| format!("loadgen wrote no summary to {}", report_path.display()))?;
    let loadgen: Value = serde_json::from_str(&text)?;
    let drained = drained(sink, &acked_path, DRAIN_TIMEOUT)?;
    let end = sample(
        admin,
        (started.elapsed() - OUTAGE_BEFORE).as_secs_f64(),
        false,
    )?;
    samples.push(end);
    let (code, text) = http_get(admin, "/metrics")?;
    if code != 200 {
        bail!("GET /metrics: HTTP {code}");
    }
    let accounting = (
        metric_sum(&text, "tailgate_spans_received_total"),
        metric_sum(&text, "tailgate_spans_kept_total"),
        // Net of the rescued: spans counted dropped, then kept.
        metric_sum(&text, "tailgate_spans_dropped_total")
            - metric_sum(&text, "tailgate_spans_rescued_total"),
        metric_sum(&text, "tailgate_spans_refused_total"),
    );
    let final_stop = running.guard.stop(STOP_GRACE);
    let seen = sink.snapshot();
    Ok(OutageReport {
        outage,
        max_bytes,
        segment_bytes,
        bytes_per_span,
        loadgen,
        fate: Fate::of(&parse_acked(&read_acked(&acked_path)?)?, &seen),
        duplicates: seen.duplicate_seqs,
        sink_refused_requests: seen.refused_requests,
        samples,
        accounting,
        drained,
        final_stop,
    })
}

fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

fn exit(status: Option<ExitStatus>) -> String {
    status.map_or("killed after the grace".into(), |s| s.to_string())
}

/// The report, and whether every check passed.
fn render(
    opts: &Options,
    kills: Option<&KillReport>,
    outage: Option<&OutageReport>,
    took: Duration,
) -> (String, bool) {
    let mut md = String::new();
    let mut checks: Vec<(String, bool)> = Vec::new();
    let _ = writeln!(md, "# Soak: kill -9 cycles and a backend outage\n");
    let _ = writeln!(
        md,
        "Generated by `cargo run --release -p tailgate-load -- soak --cycles {} \
         --outage-secs {} --rate {} --seed {}` in {:.0} s.\n",
        opts.cycles,
        opts.outage_secs,
        opts.rate,
        opts.seed,
        took.as_secs_f64()
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    for (k, v) in machine() {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "| Seed | {} |", opts.seed);
    let _ = writeln!(
        md,
        "\nLoad: `tailgate loadgen --protocol grpc --connections {CONNECTIONS} --rate {} \
         --traces-per-request {TRACES_PER_REQUEST} --spans-per-trace {SPANS_PER_TRACE} \
         --acked-out …`, one run per phase, retrying refused requests and failed connections. \
         tailgate: every trace kept 100 ms after its root, exported OTLP/gRPC to the harness's \
         sink (`exporter.concurrency = {CONCURRENCY}`, `batch_max_spans = {BATCH_MAX_SPANS}`); \
         the sink records every `loadgen.seq` in a bitmap. *Acknowledged* = spans of requests \
         answered with success (`--acked-out`); *delivered* = those of them that reached the \
         sink by the end; *lost* = acknowledged − delivered.\n",
        opts.rate
    );

    if let Some(k) = kills {
        let bound = duplicate_bound();
        let _ = writeln!(md, "## Kill cycles\n");
        let _ = writeln!(
            md,
            "One tailgate on one `[storage] dir` (`{}`, default `fsync = \"interval\"`), \
             `kill -9` at a random moment 2-8 s after each (re)start, restarted at once on \
             the same directory and port while loadgen keeps sending. A cycle's *acknowledged* \
             spans were answered between the previous restart and its kill; its *duplicated* \
             are the duplicate deliveries that arrived after its kill. The bound per kill is \
             `exporter.concurrency × exporter.batch_max_spans` ({CONCURRENCY} × \
             {BATCH_MAX_SPANS}, the batches in flight to the backend) + loadgen's \
             `connections × spans per request` ({CONNECTIONS} × {SPANS_PER_REQUEST}, requests \
             logged before the kill cut off their answer, sent again by loadgen) = {bound}. \
             After the last restart: {} s more load, loadgen stopped, drain, SIGTERM.\n",
            k.storage.display(),
            TAIL.as_secs()
        );
        let _ = writeln!(
            md,
            "| Cycle | Kill after (s) | Acknowledged | Delivered | Lost | Duplicated | Restart to ready (s) |\n\
             |---:|---:|---:|---:|---:|---:|---:|"
        );
        for (i, c) in k.cycles.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {} | {} | {} | {:.1} |",
                i + 1,
                c.kill_after.as_secs_f64(),
                c.fate.acknowledged,
                c.fate.delivered,
                c.fate.lost,
                c.duplicates,
                c.restart.as_secs_f64()
            );
        }
        let _ = writeln!(
            md,
            "| after the last restart | {:.1} | {} | {} | {} | – | – |",
            TAIL.as_secs_f64(),
            k.tail.acknowledged,
            k.tail.delivered,
            k.tail.lost
        );
        let total = k.total();
        let duplicates: u64 = k.cycles.iter().map(|c| c.duplicates).sum();
        let _ = writeln!(
            md,
            "| **Total** | | **{}** | **{}** | **{}** | **{}** | |",
            total.acknowledged, total.delivered, total.lost, duplicates
        );
        let _ = writeln!(
            md,
            "\n{} distinct seqs reached the sink in all ({} more than acknowledged: requests \
             whose answer a kill or loadgen's stop cut off). The phase took {:.0} s.\n",
            k.distinct_delivered,
            k.distinct_delivered.saturating_sub(total.delivered),
            k.took.as_secs_f64()
        );
        checks.push((
            format!(
                "kill cycles: nothing acknowledged lost ({} of {})",
                total.lost, total.acknowledged
            ),
            total.lost == 0 && total.acknowledged > 0,
        ));
        let worst = k.cycles.iter().map(|c| c.duplicates).max().unwrap_or(0);
        checks.push((
            format!("kill cycles: duplicates per kill ≤ {bound} (worst {worst})"),
            worst <= bound,
        ));
        checks.push((
            format!(
                "kill cycles: no duplicates before the first kill ({})",
                k.duplicates_before_first_kill
            ),
            k.duplicates_before_first_kill == 0,
        ));
        checks.push((
            format!(
                "kill cycles: every acknowledged seq arrived within {} s of the load's end",
                DRAIN_TIMEOUT.as_secs()
            ),
            k.drained,
        ));
        checks.push((
            format!(
                "kill cycles: the last tailgate stopped cleanly on SIGTERM ({})",
                exit(k.final_stop)
            ),
            k.final_stop.is_some_and(|s| s.success()),
        ));
    }

    if let Some(o) = outage {
        let _ = writeln!(md, "## Outage\n");
        let bound = o.max_bytes as f64;
        let _ = writeln!(
            md,
            "A fresh tailgate with `storage.max_bytes = \"{} MiB\"` (filled in about {:.0} s at \
             {:.0} log bytes per span), `storage.segment_bytes = \"{} MiB\"`, \
             the default `exporter.retry_max_elapsed` (unset: no limit with the log on) and \
             `exporter.queue_max_spans`. \
             Load for {} s, then the sink answers `UNAVAILABLE` for {} s, then {} s more load \
             with the sink back; `/metrics` sampled every second.\n",
            o.max_bytes >> 20,
            bound / (opts.rate * o.bytes_per_span),
            o.bytes_per_span,
            o.segment_bytes >> 20,
            OUTAGE_BEFORE.as_secs(),
            o.outage.as_secs(),
            OUTAGE_AFTER.as_secs()
        );
        let first = o.first_refusal();
        let first_disk = o.first_of(true);
        let first_other = o.first_of(false);
        let when = |s: Option<&Sample>| {
            s.map_or("never".into(), |s| {
                format!(
                    "{:.0} s into the outage, at {:.1} MiB of storage ({:.0} % of the bound)",
                    s.at,
                    mib(s.storage_bytes),
                    100.0 * s.storage_bytes / bound
                )
            })
        };
        let reasons = o
            .samples
            .last()
            .map(|s| {
                s.refused
                    .iter()
                    .map(|(r, v)| format!("`{r}` {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "none".into());
        let lg = |key: &str| o.loadgen[key].as_u64().unwrap_or(0);
        let (received, kept, dropped, refused) = o.accounting;
        let rows: Vec<(&str, String)> = vec![
            ("Acknowledged spans", o.fate.acknowledged.to_string()),
            ("Delivered", o.fate.delivered.to_string()),
            ("Lost", o.fate.lost.to_string()),
            ("Duplicated (deliveries)", o.duplicates.to_string()),
            (
                "Peak `tailgate_storage_bytes` / bound",
                format!(
                    "{:.1} MiB / {} MiB (+ one segment: {} MiB)",
                    mib(o.peak_bytes()),
                    o.max_bytes >> 20,
                    (o.max_bytes + o.segment_bytes) >> 20
                ),
            ),
            ("First refusal", when(first)),
            (
                "First refusal's reasons",
                first.map_or("–".into(), |s| {
                    s.refused
                        .iter()
                        .filter(|(_, v)| *v > 0.0)
                        .map(|(r, _)| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }),
            ),
            ("First `disk_full` refusal", when(first_disk)),
            ("First refusal for another reason", when(first_other)),
            ("Refused spans by reason (end)", reasons),
            (
                "Kept early for disk (trigger `disk`)",
                o.samples
                    .last()
                    .map_or(0.0, |s| s.kept_for_disk)
                    .to_string(),
            ),
            (
                "Exports the sink refused while down",
                o.sink_refused_requests.to_string(),
            ),
            (
                "loadgen: requests, failed for good, retries",
                format!(
                    "{}, {}, {}",
                    lg("requests"),
                    lg("requests_failed"),
                    lg("retries")
                ),
            ),
            (
                "Every acknowledged seq delivered before SIGTERM",
                if o.drained {
                    "yes".into()
                } else {
                    format!("no, not within {} s", DRAIN_TIMEOUT.as_secs())
                },
            ),
            ("Exit on SIGTERM", exit(o.final_stop)),
            (
                "received = kept + dropped − rescued + refused",
                format!(
                    "{received:.0} = {kept:.0} + {dropped:.0} (net) + {refused:.0} {}",
                    if received == kept + dropped + refused {
                        "✓"
                    } else {
                        "✗"
                    }
                ),
            ),
        ];
        let _ = writeln!(md, "| | |\n|---|---|");
        for (k, v) in rows {
            let _ = writeln!(md, "| {k} | {v} |");
        }
        let verdict = if o.backpressure_at_disk_bound() {
            "Back-pressure started at the disk bound: the first refusals were `disk_full`."
                .to_owned()
        } else if first.is_none() {
            "Back-pressure never started: nothing was refused during the outage.".to_owned()
        } else {
            "Back-pressure did NOT start at the disk bound: the first refusals came from \
             memory, before the log reached `storage.max_bytes`."
                .to_owned()
        };
        let _ = writeln!(md, "\n**{verdict}**\n");
        eprintln!("outage: {verdict}");
        let _ = writeln!(
            md,
            "Every 5 s (t = seconds since the outage began):\n\n\
             | t (s) | Sink | Storage (MiB) | Refused `disk_full` | Refused, other reasons |\n\
             |---:|---|---:|---:|---:|"
        );
        for s in o.samples.iter().step_by(5) {
            let disk = s.refused("disk_full");
            let _ = writeln!(
                md,
                "| {:.0} | {} | {:.1} | {disk:.0} | {:.0} |",
                s.at,
                if s.sink_down { "down" } else { "up" },
                mib(s.storage_bytes),
                s.refused_total() - disk
            );
        }
        let _ = writeln!(md);
        checks.push((
            format!(
                "outage: nothing acknowledged lost ({} of {})",
                o.fate.lost, o.fate.acknowledged
            ),
            o.fate.lost == 0 && o.fate.acknowledged > 0,
        ));
        checks.push((
            format!(
                "outage: the log stayed within storage.max_bytes + one segment ({:.1} ≤ {} MiB)",
                mib(o.peak_bytes()),
                (o.max_bytes + o.segment_bytes) >> 20
            ),
            !o.overran(),
        ));
        checks.push((
            "outage: back-pressure started at the disk bound (the first refusals were disk_full)"
                .to_owned(),
            o.backpressure_at_disk_bound(),
        ));
    }

    let _ = writeln!(md, "## Checks\n");
    for (what, ok) in &checks {
        let _ = writeln!(md, "- {} {what}", if *ok { "✓" } else { "✗" });
    }
    let passed = checks.iter().all(|(_, ok)| *ok);
    let _ = writeln!(md, "\nThe command exits 1 when a check fails.");
    (md, passed)
}
