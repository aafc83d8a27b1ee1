//! Crash recovery under load: `tailgate loadgen` sends, tailgate gets `kill -9` at a random
//! moment, and a restart on the same `[storage] dir` delivers every `loadgen.seq` that tailgate
//! had acknowledged. Duplicates stay within what was in flight to the backend at the kill:
//! `exporter.concurrency × exporter.batch_max_spans` for an OTLP exporter,
//! `exporter.batch_max_spans` for the file exporter (one writer). Run for every
//! `storage.fsync` mode, into the file exporter and into an OTLP/gRPC test backend.
//!
//! "Acknowledged" is what loadgen lists in `--acked-out`: the requests answered with success.
//! The kill moment comes from a seed each test prints; `TAILGATE_CRASH_SEED=<seed>` replays it.
//!
//! Beside them, the log's disk bound under the same load: early decisions (trigger `disk`),
//! the log within `storage.max_bytes`, and nothing acknowledged lost.

use std::collections::HashMap;
use std::io::{Read, Seek as _, SeekFrom};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::*;

/// Exporter batch size and OTLP concurrency: small, so the duplicate bound is tight.
const BATCH_MAX_SPANS: u64 = 512;
const CONCURRENCY: u64 = 2;

/// The load: a few thousand spans/s in requests of 20 traces of 10 spans (200 spans each).
const RATE: u64 = 3_000;
const TRACES_PER_REQUEST: u64 = 20;
const SPANS_PER_TRACE: u64 = 10;

/// Traces decide 100 ms after their root, so most are exported while the load runs and the kill
/// finds spans in every state (buffered, queued, in flight, exported).
const DECIDE_FAST: &str = "root_grace = \"100ms\"\n";

#[derive(Clone, Copy, Debug)]
enum Fsync {
    Always,
    Interval,
    Never,
}

impl Fsync {
    fn key(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Interval => "interval",
            Fsync::Never => "never",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sink {
    File,
    OtlpGrpc,
}

struct Scenario {
    name: &'static str,
    fsync: Fsync,
    sink: Sink,
    /// The `[buffer]` keys.
    buffer: &'static str,
    /// When the kill comes, in ms after loadgen starts: drawn from the seed.
    kill_after_ms: RangeInclusive<u64>,
    /// How long loadgen keeps starting requests: past the latest kill, so the kill is mid-load.
    load_for: Duration,
    /// How long the restarted tailgate has to deliver every acknowledged seq.
    deliver_within: Duration,
}

/// `tailgate loadgen` at the tests' load for `duration`, listing what it gets acknowledged in
/// `acked`; `extra` are its retry (and seed) flags.
fn spawn_loadgen(endpoint: &str, duration: &str, extra: &[&str], acked: &Path) -> ChildGuard {
    ChildGuard(
        Command::new(BIN)
            .arg("loadgen")
            .args(["--endpoint", endpoint, "--duration", duration])
            .args(["--rate", &RATE.to_string(), "--connections", "2"])
            .args(["--traces-per-request", &TRACES_PER_REQUEST.to_string()])
            .args(["--spans-per-trace", &SPANS_PER_TRACE.to_string()])
            .args(extra)
            .arg("--quiet")
            .arg("--acked-out")
            .arg(acked)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tailgate loadgen"),
    )
}

/// `TAILGATE_CRASH_SEED` if set, else the clock.
fn seed() -> u64 {
    match std::env::var("TAILGATE_CRASH_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("TAILGATE_CRASH_SEED={s:?}: {e}")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// Where each run of tailgate exports: the OTLP backend, or a file per run (the killed run's
/// file may end in a torn line, and the restart must not append to it).
fn exporter_section(sink: Sink, backend: Option<&Backend>, file: &Path) -> String {
    let common = format!(
        "batch_max_spans = {BATCH_MAX_SPANS}\nbatch_timeout = \"50ms\"\n\
         queue_max_spans = 200000\n"
    );
    match sink {
        Sink::File => format!(
            "[exporter]\ntype = \"file\"\npath = {:?}\nmax_file_size = \"4GiB\"\n{common}\n",
            file.display().to_string()
        ),
        Sink::OtlpGrpc => format!(
            "[exporter]\ntype = \"otlp_grpc\"\nendpoint = \"http://{}\"\n\
             concurrency = {CONCURRENCY}\nretry_initial_backoff = \"100ms\"\n\
             retry_max_backoff = \"1s\"\n{common}\n",
            backend.expect("a backend for the OTLP exporter").addr
        ),
    }
}

fn storage_section(dir: &Path, fsync: Fsync) -> String {
    format!(
        "[storage]\nkind = \"local\"\ndir = {:?}\nfsync = \"{}\"\nfsync_interval = \"100ms\"\n",
        dir.display().to_string(),
        fsync.key()
    )
}

/// The most spans a restart may deliver twice: what was in flight to the backend at the kill.
fn duplicate_bound(sink: Sink) -> u64 {
    match sink {
        Sink::File => BATCH_MAX_SPANS,
        Sink::OtlpGrpc => CONCURRENCY * BATCH_MAX_SPANS,
    }
}

/// The seqs of a file exporter's output, read as the file grows: complete lines only, so a
/// line still being written (or torn by the kill) is never read as data.
struct ExportedFile {
    path: PathBuf,
    /// Bytes read and counted so far: always the end of a complete line.
    consumed: u64,
    seqs: HashMap<u64, usize>,
}

impl ExportedFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            consumed: 0,
            seqs: HashMap::new(),
        }
    }

    /// Counts the complete lines added since the last call; returns the bytes after the last
    /// complete line (a torn or unfinished line).
    fn poll(&mut self) -> usize {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return 0; // not created yet
        };
        let mut fresh = Vec::new();
        file.seek(SeekFrom::Start(self.consumed)).expect("seek");
        file.read_to_end(&mut fresh)
            .expect("read the exported file");
        let complete = fresh.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in fresh[..complete].split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let request = decode_traces(line).unwrap_or_else(|e| {
                panic!(
                    "{}: a complete line is not OTLP/JSON: {e}",
                    self.path.display()
                )
            });
            for (_, span) in exported_spans(&[request]) {
                let seq = seq_of(&span).expect("every loadgen span has a seq");
                *self.seqs.entry(seq).or_default() += 1;
            }
        }
        self.consumed += complete as u64;
        fresh.len() - complete
    }
}

/// What has reached the exporter's target so far: seq → deliveries.
enum Delivered<'a> {
    Files {
        killed: HashMap<u64, usize>,
        restarted: ExportedFile,
    },
    Backend(&'a Backend),
}

impl Delivered<'_> {
    fn snapshot(&mut self) -> HashMap<u64, usize> {
        match self {
            Delivered::Files { killed, restarted } => {
                restarted.poll();
                let mut all = killed.clone();
                for (seq, n) in &restarted.seqs {
                    *all.entry(*seq).or_default() += n;
                }
                all
            }
            Delivered::Backend(b) => b.received.lock().unwrap().seqs.clone(),
        }
    }
}

fn missing(acked: &[(u64, u64)], delivered: &HashMap<u64, usize>) -> Vec<u64> {
    let mut lost: Vec<u64> = acked
        .iter()
        .flat_map(|&(first, n)| first..first + n)
        .filter(|seq| !delivered.contains_key(seq))
        .collect();
    lost.sort_unstable();
    lost
}

/// A counter's value, or None when `/metrics` has no series of it.
fn counter(metrics: &Metrics, name: &str) -> Option<f64> {
    metrics
        .0
        .keys()
        .any(|series| crate::http::metric_name(series) == name)
        .then(|| metrics.sum(name, &[]))
}

/// What an exited child left in one of its pipes.
fn read_all(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_string(&mut text);
    }
    text
}

fn n(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

/// Starts tailgate, runs loadgen into it, kills tailgate with SIGKILL at the seeded moment,
/// restarts it on the same storage and exporter target, and checks that every acknowledged
/// seq arrives with duplicates within the bound. Everything it starts is stopped on every path
/// (the process guards of `support`). Returns the restarted tailgate's `/metrics`, read once
/// every acknowledged seq had arrived.
fn crash_and_recover(s: Scenario) -> Metrics {
    let seed = seed();
    let mut rng = Rng(seed);
    let (lo, hi) = (*s.kill_after_ms.start(), *s.kill_after_ms.end());
    let kill_after = Duration::from_millis(rng.between(lo, hi));
    eprintln!(
        "{}: seed {seed} (TAILGATE_CRASH_SEED={seed} replays it), kill -9 {kill_after:?} \
         into the load",
        s.name
    );

    let dir = TempDir::new("crash");
    let storage = dir.path().join("storage");
    let files = [1, 2].map(|run| dir.path().join(format!("traces-{run}.jsonl")));
    let acked_path = dir.path().join("acked.txt");
    // The backend serves from its own runtime, so the test itself stays blocking.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime for the test backend");
    let backend = (s.sink == Sink::OtlpGrpc)
        .then(|| runtime.block_on(start_backend(true, Behaviour::RefuseFirst(0))));
    let config = |run: usize| {
        format!(
            "[buffer]\n{}\n[decide]\ndefault = \"keep\"\n\n{}\n{}",
            s.buffer,
            exporter_section(s.sink, backend.as_ref(), &files[run]),
            storage_section(&storage, s.fsync)
        )
    };

    let mut killed = Tailgate::start(&config(0));
    let endpoint = format!("http://{}", killed.grpc);
    let load_for = format!("{}ms", s.load_for.as_millis());
    let started = Instant::now();
    // Short retries: after the kill each request fails fast, and the run ends soon after
    // --duration.
    let seed_arg = seed.to_string();
    let mut loadgen = spawn_loadgen(
        &endpoint,
        &load_for,
        &[
            "--timeout",
            "1s",
            "--retry-for",
            "300ms",
            "--seed",
            &seed_arg,
        ],
        &acked_path,
    );
    // A fixed moment on purpose: the seeded instant of the kill is what the test varies.
    std::thread::sleep(kill_after.saturating_sub(started.elapsed()));
    signal(killed.pid(), "KILL");
    assert!(
        killed.wait_exit(Duration::from_secs(10)).is_some(),
        "tailgate outlived kill -9"
    );
    let killed_at = started.elapsed();

    assert!(
        loadgen.wait_exit(Duration::from_secs(120)).is_some(),
        "loadgen did not finish after the kill"
    );
    let stdout = read_all(loadgen.0.stdout.take());
    let stderr = read_all(loadgen.0.stderr.take());
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("loadgen printed no JSON summary ({e}); stdout:\n{stdout}\nstderr:\n{stderr}")
    });
    eprintln!("{}: killed at {killed_at:?}; loadgen: {summary}", s.name);
    // loadgen's spans all have valid ids: a success is all of its spans acknowledged.
    assert_eq!(n(&summary, "spans_rejected"), 0, "{summary}");
    assert!(
        n(&summary, "requests_failed") > 0,
        "the kill came after loadgen's last request, not under load: {summary}"
    );
    let acked = read_acked(&acked_path);
    let acked_spans: u64 = acked.iter().map(|(_, n)| n).sum();
    assert_eq!(
        acked_spans,
        n(&summary, "spans_accepted"),
        "--acked-out lists every accepted span"
    );
    assert!(acked_spans > 0, "nothing was acknowledged before the kill");

    let mut delivered = match &backend {
        Some(b) => Delivered::Backend(b),
        None => {
            let mut first = ExportedFile::new(files[0].clone());
            let torn = first.poll();
            eprintln!(
                "{}: the killed run's file holds {} seqs and ends in {torn} bytes of a torn line",
                s.name,
                first.seqs.len()
            );
            Delivered::Files {
                killed: first.seqs,
                restarted: ExportedFile::new(files[1].clone()),
            }
        }
    };
    let at_kill = delivered.snapshot();
    eprintln!(
        "{}: {acked_spans} spans acknowledged, {} of them delivered before the restart",
        s.name,
        acked_spans as usize - missing(&acked, &at_kill).len()
    );

    let mut restarted = Tailgate::start(&config(1));
    let arrived = wait_for(s.deliver_within, || {
        missing(&acked, &delivered.snapshot())
            .is_empty()
            .then_some(())
    });
    let metrics = restarted.metrics();
    let status = restarted.terminate();
    // Counted after the clean stop: nothing more can arrive.
    let seqs = delivered.snapshot();
    let lost = missing(&acked, &seqs);
    let duplicates: usize = seqs.values().map(|n| n - 1).sum();
    let duplicated_seqs = seqs.values().filter(|n| **n > 1).count();
    let out_of_range: Vec<u64> = seqs
        .keys()
        .copied()
        .filter(|seq| *seq >= n(&summary, "seq_count"))
        .take(10)
        .collect();
    eprintln!(
        "{}: acknowledged {acked_spans}, delivered {} distinct, lost {}, duplicated {duplicates} \
         ({duplicated_seqs} seqs); recovered {:?}, re-exported {:?}",
        s.name,
        seqs.len(),
        lost.len(),
        counter(&metrics, "tailgate_storage_recovered_spans_total"),
        counter(&metrics, "tailgate_storage_reexported_spans_total"),
    );
    assert!(
        lost.is_empty(),
        "{} of {acked_spans} acknowledged seqs never arrived (seed {seed}); the first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        arrived.is_some(),
        "the acknowledged seqs arrived only in the SIGTERM drain, not within {:?} of the \
         restart (seed {seed})",
        s.deliver_within
    );
    assert!(
        out_of_range.is_empty(),
        "seqs loadgen never sent: {out_of_range:?}"
    );
    let bound = duplicate_bound(s.sink);
    assert!(
        duplicates as u64 <= bound,
        "{duplicates} duplicate deliveries, more than the {bound} in flight at most (seed {seed})"
    );
    assert!(
        status.success(),
        "the restarted tailgate did not stop cleanly: {status}"
    );
    metrics
}

/// The kill at 1-4 s into a 5 s load, traces deciding 100 ms after their root.
fn under_load(name: &'static str, fsync: Fsync, sink: Sink) {
    crash_and_recover(Scenario {
        name,
        fsync,
        sink,
        buffer: DECIDE_FAST,
        kill_after_ms: 1_000..=4_000,
        load_for: Duration::from_secs(5),
        deliver_within: Duration::from_secs(60),
    });
}

#[test]
fn kill9_fsync_always_file_delivers_every_acked_seq() {
    under_load("kill9_fsync_always_file", Fsync::Always, Sink::File);
}

#[test]
fn kill9_fsync_always_otlp_grpc_delivers_every_acked_seq() {
    under_load(
        "kill9_fsync_always_otlp_grpc",
        Fsync::Always,
        Sink::OtlpGrpc,
    );
}

#[test]
fn kill9_fsync_interval_file_delivers_every_acked_seq() {
    under_load("kill9_fsync_interval_file", Fsync::Interval, Sink::File);
}

#[test]
fn kill9_fsync_interval_otlp_grpc_delivers_every_acked_seq() {
    under_load(
        "kill9_fsync_interval_otlp_grpc",
        Fsync::Interval,
        Sink::OtlpGrpc,
    );
}

#[test]
fn kill9_fsync_never_file_delivers_every_acked_seq() {
    under_load("kill9_fsync_never_file", Fsync::Never, Sink::File);
}

#[test]
fn kill9_fsync_never_otlp_grpc_delivers_every_acked_seq() {
    under_load("kill9_fsync_never_otlp_grpc", Fsync::Never, Sink::OtlpGrpc);
}

/// Traces that cannot decide before the kill (root_grace 30 s, nothing else sooner): every
/// acknowledged span is only in the buffer and the log when tailgate dies, so the restart must
/// rebuild them from the log, count them, and still deliver each one.
#[test]
fn kill9_with_every_trace_undecided_restart_recovers_them_from_the_log() {
    let metrics = crash_and_recover(Scenario {
        name: "kill9_with_every_trace_undecided",
        fsync: Fsync::Interval,
        sink: Sink::File,
        buffer: "root_grace = \"30s\"\ntrace_idle = \"60s\"\ndecision_wait = \"60s\"\n",
        kill_after_ms: 2_000..=2_000,
        load_for: Duration::from_secs(3),
        // The recovered traces decide on their own triggers: 30 s after their root arrived.
        deliver_within: Duration::from_secs(120),
    });
    let recovered = counter(&metrics, "tailgate_storage_recovered_spans_total");
    assert!(
        recovered.is_some_and(|n| n > 0.0),
        "the restart rebuilt no buffered span from the log: \
         tailgate_storage_recovered_spans_total = {recovered:?}"
    );
}

/// A storage bound far below what the load brings, with traces that only `decision_wait` would
/// decide in time: past 90 % of the bound the oldest are decided early (trigger `disk`), the
/// log stays within its bound, and every acknowledged seq is delivered.
#[test]
fn a_small_storage_bound_decides_the_oldest_early_and_loses_nothing() {
    const MAX_BYTES: f64 = (3 << 20) as f64;
    let dir = TempDir::new("disk-bound");
    let out = dir.path().join("traces.jsonl");
    let acked_path = dir.path().join("acked.txt");
    let config = format!(
        "[buffer]\nroot_grace = \"60s\"\ntrace_idle = \"60s\"\ndecision_wait = \"120s\"\n\n\
         [decide]\ndefault = \"keep\"\n\n\
         [exporter]\ntype = \"file\"\npath = {:?}\nbatch_timeout = \"50ms\"\n\n\
         [storage]\ndir = {:?}\nsegment_bytes = \"1MiB\"\nmax_bytes = \"3MiB\"\n",
        out.display().to_string(),
        dir.path().join("storage").display().to_string()
    );
    let mut tg = Tailgate::start(&config);
    let endpoint = format!("http://{}", tg.grpc);
    // A full log refuses with a retryable code: retry long enough to get through.
    let mut loadgen = spawn_loadgen(&endpoint, "6s", &["--retry-for", "30s"], &acked_path);
    let mut peak = 0.0f64;
    let finished = wait_for(Duration::from_secs(120), || {
        peak = peak.max(tg.metrics().sum("tailgate_storage_bytes", &[]));
        loadgen.0.try_wait().ok().flatten()
    });
    assert!(finished.is_some(), "loadgen did not finish");
    let stdout = read_all(loadgen.0.stdout.take());
    let summary: Value = serde_json::from_str(stdout.trim()).expect("loadgen's JSON summary");
    assert_eq!(n(&summary, "spans_rejected"), 0, "{summary}");
    let metrics = tg.metrics();
    let early = metrics.sum("tailgate_spans_kept_total", &["trigger=\"disk\""]);
    let status = tg.terminate();
    assert!(status.success(), "tailgate did not stop cleanly: {status}");
    let acked = read_acked(&acked_path);
    let mut file = ExportedFile::new(out);
    file.poll();
    let lost = missing(&acked, &file.seqs);
    eprintln!(
        "disk bound: {} acknowledged, {} delivered, {early} kept early for disk, storage peak \
         {peak} bytes of {MAX_BYTES}; loadgen: {summary}",
        acked.iter().map(|(_, n)| n).sum::<u64>(),
        file.seqs.len()
    );
    assert!(early > 0.0, "nothing was decided early for disk: {summary}");
    assert!(
        peak <= MAX_BYTES,
        "the log grew past its bound: {peak} bytes"
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged seqs never arrived; the first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// A backend down for 30 s under load. Kept spans wait in the log (spilled export batches), not
/// in memory; the log stays within `storage.max_bytes`; back-pressure (retryable refusals,
/// `reason="disk_full"`) starts when the bound is reached, and not before; retries have no
/// time limit with the log on, so once the backend is back every acknowledged seq arrives and
/// no span is counted failed. The 10-minute version is in the soak command.
#[test]
fn a_backend_outage_waits_in_the_log_within_its_bound_and_loses_nothing() {
    const MAX_BYTES: f64 = (16 << 20) as f64;
    const OUTAGE: Duration = Duration::from_secs(30);
    let dir = TempDir::new("outage");
    let acked_path = dir.path().join("acked.txt");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime for the test backend");
    let backend = runtime.block_on(start_backend(true, Behaviour::RefuseFirst(0)));
    backend.received.lock().unwrap().down = true;
    // A small memory queue (spilling starts at half of it) and no retry limit set: the default
    // with the log on is to retry while there is disk.
    let config = format!(
        "[buffer]\n{DECIDE_FAST}\n[decide]\ndefault = \"keep\"\n\n\
         [exporter]\ntype = \"otlp_grpc\"\nendpoint = \"http://{}\"\nconcurrency = {CONCURRENCY}\n\
         retry_initial_backoff = \"100ms\"\nretry_max_backoff = \"1s\"\n\
         batch_max_spans = {BATCH_MAX_SPANS}\nbatch_timeout = \"50ms\"\nqueue_max_spans = 4096\n\n\
         [storage]\ndir = {:?}\nsegment_bytes = \"1MiB\"\nmax_bytes = \"16MiB\"\n",
        backend.addr,
        dir.path().join("storage").display().to_string()
    );
    let mut tg = Tailgate::start(&config);
    let endpoint = format!("http://{}", tg.grpc);
    let mut loadgen = spawn_loadgen(
        &endpoint,
        "40s",
        &["--timeout", "5s", "--retry-for", "90s"],
        &acked_path,
    );
    let started = Instant::now();
    let (mut peak, mut peak_spilled) = (0.0f64, 0.0f64);
    // The largest log size seen before the first refusal for disk, and the memory refusals.
    let mut first_refusal: Option<(Duration, f64)> = None;
    while started.elapsed() < OUTAGE {
        let m = tg.metrics();
        let bytes = m.sum("tailgate_storage_bytes", &[]);
        peak = peak.max(bytes);
        peak_spilled = peak_spilled.max(m.sum("tailgate_export_queue_spilled_spans", &[]));
        let disk_full = m.sum("tailgate_spans_refused_total", &["reason=\"disk_full\""]);
        if first_refusal.is_none() && disk_full > 0.0 {
            first_refusal = Some((started.elapsed(), peak));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let during = tg.metrics();
    backend.received.lock().unwrap().down = false;
    let finished = wait_for(Duration::from_secs(150), || {
        peak = peak.max(tg.metrics().sum("tailgate_storage_bytes", &[]));
        loadgen.0.try_wait().ok().flatten()
    });
    assert!(finished.is_some(), "loadgen did not finish");
    let stdout = read_all(loadgen.0.stdout.take());
    let summary: Value = serde_json::from_str(stdout.trim()).expect("loadgen's JSON summary");
    let acked = read_acked(&acked_path);
    let arrived = wait_for(Duration::from_secs(120), || {
        let seqs = backend.received.lock().unwrap().seqs.clone();
        missing(&acked, &seqs).is_empty().then_some(())
    });
    let after = tg.metrics();
    let status = tg.terminate();
    let seqs = backend.received.lock().unwrap().seqs.clone();
    let lost = missing(&acked, &seqs);
    let duplicates: usize = seqs.values().map(|n| n - 1).sum();
    let memory_refused = during.sum("tailgate_spans_refused_total", &["reason=\"memory\""]);
    eprintln!(
        "outage: {} acknowledged, {} delivered, {} lost, {duplicates} duplicated; storage peak \
         {peak} of {MAX_BYTES} bytes, spilled peak {peak_spilled} spans, first disk_full \
         refusal {first_refusal:?}, memory refusals {memory_refused}; loadgen: {summary}",
        acked.iter().map(|(_, n)| n).sum::<u64>(),
        seqs.len(),
        lost.len(),
    );
    assert!(status.success(), "tailgate did not stop cleanly: {status}");
    assert_eq!(n(&summary, "spans_rejected"), 0, "{summary}");
    assert!(
        lost.is_empty(),
        "{} acknowledged seqs never arrived; the first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        arrived.is_some(),
        "the acknowledged seqs arrived only in the SIGTERM drain"
    );
    assert!(
        peak_spilled > 0.0,
        "no kept span waited in the log during the outage"
    );
    assert!(
        peak <= MAX_BYTES,
        "the log grew past its bound: {peak} bytes"
    );
    let (at, bytes_before) = first_refusal.expect("the outage never filled the log to its bound");
    assert!(
        bytes_before >= 0.8 * MAX_BYTES,
        "senders were refused for disk at {at:?} with the log at {bytes_before} of {MAX_BYTES} bytes"
    );
    assert_eq!(
        memory_refused, 0.0,
        "back-pressure came from memory, not from the log's bound"
    );
    assert_eq!(
        after.sum("tailgate_export_failed_spans_total", &[]),
        0.0,
        "spans were given up on during the outage"
    );
    assert!(
        duplicates as u64 <= CONCURRENCY * BATCH_MAX_SPANS,
        "{duplicates} duplicate deliveries without a crash"
    );
    assert_eq!(
        after.received(),
        after.accounted(),
        "received = kept + dropped - rescued + refused"
    );
}
