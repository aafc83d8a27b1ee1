//! The storage log: what tailgate accepted, in order, durably, with positions.
//!
//! Owns two local logs under `storage.dir`: `spans/` (every accepted OTLP trace request, as
//! protobuf, appended before the sender is answered; and export batches spilled there while
//! the backend is slow or down) and `decisions/` (every decision before its effects, and which
//! kept spans were exported). It owns the directory lock, the pins and
//! the low watermark, the checkpoint (the watermark as last written, where replay starts), the
//! release of segments nothing needs any more, the disk bound, and the reading back of both
//! logs at start.
//!
//! Must never: free a record at or above the low watermark; answer an append before its bytes
//! are written (and forced, per `storage.fsync`); crash or stop replaying on a damaged record
//! (it is skipped, counted and named in a warning).
//!
//! Retention of the decision log: a closed decision segment is deleted once its newest record
//! is older than `storage.decision_retention` (the late-span horizon) and the span log's
//! watermark has passed every span its decisions refer to. Late spans of a trace decided
//! longer ago than that start a trace of their own, as they do once the in-memory decision
//! memory has forgotten it.

mod log;
mod metrics;
mod pins;
mod records;
mod segment;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

pub(crate) use crate::config::Fsync;
use crate::config::StorageConfig;
use crate::telemetry::Registry;
use crate::trace::TraceId;
pub(crate) use log::Admission;
pub(crate) use log::AppendError;
use log::{Log, LogOptions, SegmentInfo};
pub(crate) use metrics::StorageMetrics;
pub(crate) use pins::Pins;
pub(crate) use records::{DecisionRef, Exported, LoggedDecision};
pub(crate) use segment::{Record, RecordKind};

/// How often the watermark is recomputed, segments freed and the checkpoint written.
const RELEASE_EVERY: Duration = Duration::from_millis(500);
/// Early decisions (trigger `disk`) start at this share of `storage.max_bytes`.
const PRESSURE_SHARE: f64 = 0.9;
/// The share of `storage.max_bytes` (at most [`MAX_HEADROOM`]) that intake leaves to the
/// decision log: decision and export records are never refused, so they must have room when
/// intake is refused. 1 MiB holds the records of some 15,000 traces.
const HEADROOM_SHARE: u64 = 16;
const MAX_HEADROOM: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StorageError {
    #[error("storage directory {path}: {source}")]
    Dir { path: String, source: io::Error },
    #[error(
        "storage directory {path} is in use by another tailgate ({holder}); one process at a time owns a directory"
    )]
    Locked { path: String, holder: String },
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
}

/// The decision of a trace as the log last recorded it, and which of its span records were
/// exported since.
#[derive(Debug)]
pub struct RecoveredDecision {
    pub(crate) decision: LoggedDecision,
    pub(crate) exported: HashSet<u64>,
}

/// What a start finds in the log: the decisions, and where the span records to replay are.
pub(crate) struct Recovery {
    pub(crate) decisions: HashMap<TraceId, RecoveredDecision>,
    /// Pass-through records (metrics) already settled: not forwarded again.
    pub(crate) forwarded: HashSet<u64>,
    segments: Vec<(u64, PathBuf)>,
    from: u64,
}

pub(crate) struct Storage {
    spans: Log,
    decisions: Log,
    pub(crate) pins: Arc<Pins>,
    pub(crate) metrics: Arc<StorageMetrics>,
    total_bytes: Arc<AtomicU64>,
    /// Intake bytes admitted and not yet written: they count against the bound with what is
    /// written, so requests admitted at the same moment cannot together overshoot it.
    admitted: Arc<AtomicU64>,
    max_bytes: u64,
    retention: Duration,
    fsync: Fsync,
    dir: PathBuf,
    checkpoint: Mutex<u64>,
    /// (log end, unix nanos) as seen by each release round, for the watermark's age.
    ends_seen: Mutex<VecDeque<(u64, u64)>>,
    stop: AtomicBool,
    releaser: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: File,
}

/// Unix nanoseconds now: the record time of what is appended.
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Storage {
    /// Opens (or creates) the log under `config.dir`, takes its lock, and reads what a
    /// previous run left: the decisions, and where replay of the span records starts.
    pub(crate) fn open(
        config: &StorageConfig,
        registry: &Registry,
    ) -> Result<(Arc<Self>, Recovery), StorageError> {
        let dir = config.dir.clone();
        let dir_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| StorageError::Dir { path, source }
        };
        let spans_dir = dir.join("spans");
        let decisions_dir = dir.join("decisions");
        for d in [&dir, &spans_dir, &decisions_dir] {
            std::fs::create_dir_all(d).map_err(dir_err(d))?;
        }
        let lock = take_lock(&dir)?;
        let metrics = StorageMetrics::new(registry);
        let checkpoint = read_checkpoint(&dir).map_err(dir_err(&dir))?;

        // The decision log, whole: the latest decision of each trace, and its exports.
        let mut decisions: HashMap<TraceId, RecoveredDecision> = HashMap::new();
        let mut forwarded = HashSet::new();
        let mut decision_segments = Vec::new();
        let mut decisions_end = 0;
        for (base, path) in
            segment::list_segments(&decisions_dir).map_err(dir_err(&decisions_dir))?
        {
            let contents = segment::read_segment(&path, base, 0)?;
            report_damage(&path, &contents.damage, &metrics);
            let mut newest = 0;
            for record in contents.records {
                newest = newest.max(record.time);
                apply_decision_record(&mut decisions, &mut forwarded, &record, &path);
            }
            decisions_end = base + contents.len;
            decision_segments.push(SegmentInfo {
                base,
                path,
                len: contents.len,
                newest,
                // Refers to spans up to anywhere in today's log, at most: held until the
                // watermark passes what this start replays.
                span_end: u64::MAX,
            });
        }

        let span_segments = segment::list_segments(&spans_dir).map_err(dir_err(&spans_dir))?;
        let mut span_infos = Vec::new();
        let mut spans_end = 0;
        for (base, path) in &span_segments {
            let len = std::fs::metadata(path).map_err(dir_err(path))?.len();
            spans_end = base + len;
            span_infos.push(SegmentInfo {
                base: *base,
                path: path.clone(),
                len,
                newest: 0,
                span_end: 0,
            });
        }
        // Segments wholly below the checkpoint were released; one left by a crash goes now.
        span_infos.retain(|s| {
            let below = s.base + s.len <= checkpoint && s.base + s.len < spans_end;
            if below {
                let _ = std::fs::remove_file(&s.path);
            }
            !below
        });
        let spans_end_at_open = spans_end;
        for s in &mut decision_segments {
            s.span_end = spans_end_at_open;
        }

        let pins = Arc::new(Pins::default());
        let total_bytes = Arc::new(AtomicU64::new(0));
        let options = |pins: Option<Arc<Pins>>| LogOptions {
            fsync: config.fsync,
            fsync_interval: config.fsync_interval.0,
            segment_bytes: config.segment_bytes.bytes() as u64,
            pins,
            metrics: metrics.clone(),
            total_bytes: total_bytes.clone(),
        };
        let spans = Log::open(
            "spans",
            &spans_dir,
            span_infos,
            spans_end,
            options(Some(pins.clone())),
        )
        .map_err(dir_err(&spans_dir))?;
        let decisions_log = Log::open(
            "decisions",
            &decisions_dir,
            decision_segments,
            decisions_end,
            options(None),
        )
        .map_err(dir_err(&decisions_dir))?;
        let storage = Arc::new(Self {
            spans,
            decisions: decisions_log,
            pins,
            metrics,
            total_bytes,
            admitted: Arc::new(AtomicU64::new(0)),
            max_bytes: config.max_bytes.bytes() as u64,
            retention: config.decision_retention.0,
            fsync: config.fsync,
            dir,
            checkpoint: Mutex::new(checkpoint),
            ends_seen: Mutex::new(VecDeque::from([(spans_end_at_open, unix_nanos())])),
            stop: AtomicBool::new(false),
            releaser: Mutex::new(None),
            _lock: lock,
        });
        let recovery = Recovery {
            decisions,
            forwarded,
            segments: span_segments
                .into_iter()
                .filter(|(base, path)| {
                    path.exists() && (*base >= checkpoint || base + file_len(path) > checkpoint)
                })
                .collect(),
            from: checkpoint,
        };
        Ok((storage, recovery))
    }

    /// Starts freeing what nothing needs. Call once the replay has pinned what it holds, so
    /// the first release cannot pass a record that is still to be replayed.
    pub(crate) fn start_release(self: &Arc<Self>) -> io::Result<()> {
        let releaser = {
            let storage = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("tailgate-storage-release".into())
                .spawn(move || {
                    while let Some(s) = storage.upgrade() {
                        if s.stop.load(Ordering::Acquire) {
                            break;
                        }
                        s.release();
                        drop(s);
                        std::thread::sleep(RELEASE_EVERY);
                    }
                })?
        };
        *self.releaser.lock() = Some(releaser);
        Ok(())
    }

    /// Appends an accepted trace request; answers with its position, pinned for the caller.
    /// Appends an accepted trace request, pinned. With an `admission` (from [`Self::admit`];
    /// the receivers always have one), its bytes stay held against the bound until the
    /// record is written or refused.
    pub(crate) fn append_spans(
        &self,
        request: Bytes,
        time: u64,
        admission: Option<Admission>,
    ) -> oneshot::Receiver<Result<u64, AppendError>> {
        self.spans
            .append_admitted(RecordKind::Spans, time, request, 0, true, admission)
    }

    /// Records decisions, waiting until they are written: call before acting on them.
    pub(crate) fn log_decisions(&self, decisions: &[DecisionRef<'_>]) -> Result<(), AppendError> {
        let payload = records::encode_decisions(decisions);
        self.decisions
            .append_blocking(
                RecordKind::Decisions,
                unix_nanos(),
                Bytes::from(payload),
                self.spans.end(),
            )
            .map(drop)
    }

    /// Records that the kept spans of these traces left through the exporter.
    pub(crate) fn log_exported(
        &self,
        traces: &[Exported],
    ) -> oneshot::Receiver<Result<u64, AppendError>> {
        let payload = records::encode_exported(traces);
        self.decisions.append(
            RecordKind::Exported,
            unix_nanos(),
            Bytes::from(payload),
            self.spans.end(),
            false,
        )
    }

    /// Appends an accepted pass-through request (metrics), pinned, as [`Self::append_spans`]
    /// does a trace request.
    pub(crate) fn append_passthrough(
        &self,
        request: Bytes,
        time: u64,
        admission: Option<Admission>,
    ) -> oneshot::Receiver<Result<u64, AppendError>> {
        self.spans
            .append_admitted(RecordKind::Metrics, time, request, 0, true, admission)
    }

    /// Records that these pass-through records were settled (delivered, or given up on).
    pub(crate) fn log_forwarded(
        &self,
        positions: &[u64],
    ) -> oneshot::Receiver<Result<u64, AppendError>> {
        self.decisions.append(
            RecordKind::Forwarded,
            unix_nanos(),
            Bytes::from(records::encode_positions(positions)),
            self.spans.end(),
            false,
        )
    }

    /// Reads back a pass-through request written by [`Self::append_passthrough`]. Blocking
    /// file I/O; the caller holds a pin on `position`.
    pub(crate) fn read_passthrough(&self, position: u64) -> io::Result<Vec<u8>> {
        self.read_record(position, RecordKind::Metrics)
    }

    /// Writes an export batch that would otherwise wait in memory; answers with its position,
    /// pinned until [`Self::read_spill`]'s caller unpins it. Refused when the disk bound leaves
    /// no room for it: the batch then waits in memory and back-pressure follows.
    pub(crate) fn spill(&self, batch: Bytes) -> oneshot::Receiver<Result<u64, AppendError>> {
        let Some(admission) = self.admit(batch.len()) else {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(AppendError::DiskFull(
                "storage.max_bytes leaves no room".into(),
            )));
            return rx;
        };
        self.spans.append_admitted(
            RecordKind::Spill,
            unix_nanos(),
            batch,
            0,
            true,
            Some(admission),
        )
    }

    /// Reads back a batch written by [`Self::spill`]. Blocking file I/O.
    pub(crate) fn read_spill(&self, position: u64) -> io::Result<Vec<u8>> {
        self.read_record(position, RecordKind::Spill)
    }

    /// Reads back an accepted trace request, for the spans of a parked trace. Blocking file
    /// I/O; the caller holds a pin on `position`.
    pub(crate) fn read_spans(&self, position: u64) -> io::Result<Vec<u8>> {
        self.read_record(position, RecordKind::Spans)
    }

    /// The span log's record at `position`, which must be of `kind`.
    fn read_record(&self, position: u64, kind: RecordKind) -> io::Result<Vec<u8>> {
        // A closed segment is found in the log's list; one past them all is the active one,
        // found in the folder.
        let closed = {
            let closed = self.spans.state.closed.lock();
            let i = closed.partition_point(|s| s.base <= position);
            i.checked_sub(1)
                .map(|i| &closed[i])
                .filter(|s| position < s.base + s.len)
                .map(|s| (s.base, s.path.clone()))
        };
        let (base, path) = match closed {
            Some(found) => found,
            None => segment::list_segments(&self.dir.join("spans"))?
                .into_iter()
                .rev()
                .find(|(base, _)| *base <= position)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no segment holds it"))?,
        };
        let record = segment::read_record_at(&path, base, position)?;
        if record.kind != kind {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: position {position} holds a {:?} record, not {kind:?}",
                    path.display(),
                    record.kind
                ),
            ));
        }
        Ok(record.payload)
    }

    /// What intake may fill: `storage.max_bytes` less the decision log's headroom.
    fn intake_limit(&self) -> u64 {
        self.max_bytes - (self.max_bytes / HEADROOM_SHARE).min(MAX_HEADROOM)
    }

    /// Admits a record of `bytes` payload for intake (a trace request, a spilled batch) if it
    /// fits under the bound with everything written and everything admitted before it, its
    /// framing and a new segment's header included; None when it does not. The bytes stay
    /// counted until the [`Admission`] is dropped, after the record is written (when they
    /// are in the written total).
    pub(crate) fn admit(&self, bytes: usize) -> Option<Admission> {
        let need = bytes as u64 + segment::RECORD_HEADER_LEN as u64 + segment::FILE_HEADER_LEN;
        let limit = self.intake_limit();
        let mut admitted = self.admitted.load(Ordering::Acquire);
        loop {
            if self.total_bytes.load(Ordering::Acquire) + admitted + need > limit {
                return None;
            }
            match self.admitted.compare_exchange_weak(
                admitted,
                admitted + need,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Admission {
                        admitted: self.admitted.clone(),
                        bytes: need,
                    });
                }
                Err(now) => admitted = now,
            }
        }
    }

    /// Whether a record of `bytes` would be admitted now.
    #[cfg(test)]
    pub(crate) fn has_room(&self, bytes: usize) -> bool {
        self.admit(bytes).is_some()
    }

    /// True past 90 % of `storage.max_bytes`: the oldest traces are decided early.
    pub(crate) fn under_pressure(&self) -> bool {
        self.total_bytes.load(Ordering::Relaxed) as f64 > self.max_bytes as f64 * PRESSURE_SHARE
    }

    /// The low watermark: nothing below it is needed.
    pub(crate) fn watermark(&self) -> u64 {
        // The end first: a record past it is not written yet, and one before it was pinned
        // before the end moved (see the writer), so the pins read next include it.
        let end = self.spans.end();
        self.pins.low().map_or(end, |low| low.min(end))
    }

    /// Recomputes the watermark, writes the checkpoint, frees what nothing needs.
    fn release(&self) {
        let now = unix_nanos();
        let watermark = self.watermark();
        {
            let mut checkpoint = self.checkpoint.lock();
            if watermark > *checkpoint {
                match write_checkpoint(&self.dir, watermark, self.fsync) {
                    Ok(()) => *checkpoint = watermark,
                    Err(e) => tracing::warn!(error = %e, "cannot write the storage checkpoint"),
                }
            }
        }
        let checkpoint = *self.checkpoint.lock();
        // Span segments go by the watermark, not the checkpoint: nothing below it is needed
        // whether or not the checkpoint could be written (a full disk may refuse it, and
        // freeing is what makes room). A replay that starts at an older checkpoint finds those
        // segments gone and begins at the first one left.
        let below = watermark.max(checkpoint);
        let freed = free_segments(&self.spans, |s| s.base + s.len <= below);
        let horizon = now.saturating_sub(u64::try_from(self.retention.as_nanos()).unwrap_or(0));
        let freed_decisions = free_segments(&self.decisions, |s| {
            s.newest < horizon && s.span_end <= checkpoint
        });
        self.total_bytes
            .fetch_sub(freed + freed_decisions, Ordering::Relaxed);
        let m = &self.metrics;
        m.bytes
            .set(i64::try_from(self.total_bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        let segments =
            self.spans.state.closed.lock().len() + self.decisions.state.closed.lock().len() + 2;
        m.segments.set(segments as i64);
        let mut ends = self.ends_seen.lock();
        ends.push_back((self.spans.end(), now));
        // The watermark's record was written when the end first passed it.
        while ends.len() > 1 && ends[1].0 <= watermark {
            ends.pop_front();
        }
        let age = ends
            .front()
            .filter(|(end, _)| *end <= watermark || ends.len() == 1)
            .map_or(0, |(_, at)| now.saturating_sub(*at));
        let age = if watermark >= self.spans.end() {
            0
        } else {
            age
        };
        m.watermark_age.set(age as f64 / 1e9);
        while ends.len() > 4096 {
            ends.pop_front();
        }
    }

    /// Stops the release thread, writes what is queued, forces it, and writes the checkpoint.
    pub(crate) fn close(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.releaser.lock().take() {
            let _ = t.join();
        }
        self.spans.close();
        self.decisions.close();
        self.release();
    }
}

impl Recovery {
    /// The span records to replay, oldest first, one segment at a time. Damage is skipped,
    /// counted and named; a segment that cannot be read at all is named and skipped.
    pub(crate) fn replay(&self, metrics: &StorageMetrics, mut f: impl FnMut(Record)) {
        for (base, path) in &self.segments {
            match segment::read_segment(path, *base, self.from) {
                Ok(contents) => {
                    report_damage(path, &contents.damage, metrics);
                    contents.records.into_iter().for_each(&mut f);
                }
                Err(e) => {
                    metrics.corrupt_records.inc();
                    tracing::error!(error = %e, "cannot replay a storage segment; skipping it");
                }
            }
        }
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Deletes the closed segments `done` says are no longer needed, oldest first, stopping at the
/// first that is still needed; returns the bytes freed.
fn free_segments(log: &Log, done: impl Fn(&SegmentInfo) -> bool) -> u64 {
    let mut closed = log.state.closed.lock();
    let mut freed = 0;
    while let Some(first) = closed.first() {
        if !done(first) {
            break;
        }
        match std::fs::remove_file(&first.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, segment = %first.path.display(), "cannot delete a released segment");
                break;
            }
        }
        freed += first.len;
        log.state.bytes.fetch_sub(first.len, Ordering::Relaxed);
        closed.remove(0);
    }
    freed
}

fn apply_decision_record(
    decisions: &mut HashMap<TraceId, RecoveredDecision>,
    forwarded: &mut HashSet<u64>,
    record: &Record,
    path: &Path,
) {
    match record.kind {
        RecordKind::Decisions => match records::decode_decisions(&record.payload) {
            Ok(list) => {
                for d in list {
                    // The latest record of a trace replaces the earlier ones.
                    decisions
                        .entry(d.trace_id)
                        .and_modify(|r| r.decision = d.clone())
                        .or_insert_with(|| RecoveredDecision {
                            decision: d,
                            exported: HashSet::new(),
                        });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, segment = %path.display(), position = record.position, "skipping a decision record")
            }
        },
        RecordKind::Exported => match records::decode_exported(&record.payload) {
            Ok(list) => {
                for t in list {
                    if let Some(r) = decisions.get_mut(&t.trace_id) {
                        r.exported.extend(t.records);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, segment = %path.display(), position = record.position, "skipping an export record")
            }
        },
        RecordKind::Forwarded => match records::decode_positions(&record.payload) {
            Ok(list) => forwarded.extend(list),
            Err(e) => {
                tracing::warn!(error = %e, segment = %path.display(), position = record.position, "skipping a forwarded record")
            }
        },
        RecordKind::Spans | RecordKind::Spill | RecordKind::Metrics => {}
    }
}

fn report_damage(path: &Path, damage: &[segment::Damage], metrics: &StorageMetrics) {
    for d in damage {
        metrics.corrupt_records.inc();
        tracing::warn!(
            segment = %path.display(),
            offset = d.offset,
            bytes = d.bytes,
            torn = d.torn,
            "skipping a damaged stretch of the storage log"
        );
    }
}

/// Takes the directory's lock, or names the process that holds it.
fn take_lock(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join("LOCK");
    let dir_err = |source| StorageError::Dir {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(dir_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "pid unknown".to_owned(),
                pid => format!("pid {pid}"),
            };
            return Err(StorageError::Locked {
                path: dir.display().to_string(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(dir_err(e)),
    }
    file.set_len(0).map_err(dir_err)?;
    write!(file, "{}", std::process::id()).map_err(dir_err)?;
    Ok(file)
}

fn read_checkpoint(dir: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(dir.join("CHECKPOINT")) {
        Ok(text) => Ok(text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(dir = %dir.display(), "unreadable storage checkpoint; replaying the whole log");
            0
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes the checkpoint by rename, so a crash leaves the old one or the new one.
fn write_checkpoint(dir: &Path, position: u64, fsync: Fsync) -> io::Result<()> {
    let tmp = dir.join("CHECKPOINT.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{position}")?;
    if fsync != Fsync::Never {
        f.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join("CHECKPOINT"))?;
    if fsync != Fsync::Never
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The log alone, for the criterion benches (`benches/storage.rs`): append, and read back.
pub mod bench {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::{RecordKind, Recovery, Storage, StorageError};
    use crate::config::Config;
    use crate::telemetry::Registry;

    /// A storage log opened on `config`'s `[storage]` section.
    pub struct BenchLog {
        storage: Arc<Storage>,
        recovery: Recovery,
    }

    impl BenchLog {
        pub fn open(config: &Config, registry: &Registry) -> Result<Self, String> {
            let (storage, recovery) = Storage::open(&config.storage, registry)
                .map_err(|e: StorageError| e.to_string())?;
            Ok(Self { storage, recovery })
        }

        /// Appends a trace request and waits until the log answers (per `storage.fsync`).
        pub fn append(&self, request: Bytes) -> u64 {
            self.storage
                .append_spans(request, super::unix_nanos(), None)
                .blocking_recv()
                .expect("the writer answers")
                .expect("appended")
        }

        /// Reads every span record left at open, in order, as a restart replays them.
        pub fn replay(&self, mut f: impl FnMut(u64, &[u8])) {
            self.recovery.replay(&self.storage.metrics, |r| {
                if r.kind == RecordKind::Spans {
                    f(r.position, &r.payload);
                }
            });
        }

        pub fn close(self) {
            self.storage.close();
        }
    }
}

/// The record decoders, for the fuzz targets (`host/fuzz`).
pub mod fuzz {
    /// Scans `data` as the bytes after a segment's header, then decodes every payload as
    /// both decision and export records. Nothing may panic; a record found lies inside the
    /// segment, in order.
    pub fn records(data: &[u8]) {
        let mut bytes = super::segment::file_header().to_vec();
        bytes.extend_from_slice(data);
        let (records, damage) = super::segment::scan(&bytes, 0, 0);
        let mut last = None;
        for r in &records {
            assert!(r.position < bytes.len() as u64, "a record past the end");
            assert!(last < Some(r.position), "records out of order");
            last = Some(r.position);
        }
        for d in &damage {
            assert!(
                d.offset + d.bytes <= bytes.len() as u64,
                "damage past the end"
            );
        }
        let _ = super::records::decode_decisions(data);
        let _ = super::records::decode_exported(data);
    }
}

#[cfg(test)]
mod tests;
