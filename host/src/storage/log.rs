//! One local log: a folder of segments and the thread that appends to it.
//!
//! Appends from any thread go to one writer thread, which takes every append waiting, writes
//! them with one `write`, forces them to disk as `storage.fsync` says (group commit), and only
//! then answers each with its position. A failed write (a full disk) answers every append of
//! its batch with the error; the half-written bytes stay behind as a torn tail, which a reader
//! skips, and the writer goes on in a new segment.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Fsync;
use super::metrics::StorageMetrics;
use super::pins::Pins;
use super::segment::{self, RecordKind};

/// Most bytes one group commit writes; the rest wait for the next.
const MAX_GROUP_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum AppendError {
    #[error("the storage disk is full: {0}")]
    DiskFull(String),
    #[error("writing the storage log failed: {0}")]
    Io(String),
    #[error("the storage log is closed")]
    Closed,
}

impl AppendError {
    fn of(e: &io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull {
            AppendError::DiskFull(e.to_string())
        } else {
            AppendError::Io(e.to_string())
        }
    }
}

/// A closed segment: its base and, for the decision log's retention, what it holds.
#[derive(Debug, Clone)]
pub(crate) struct SegmentInfo {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
    /// Newest record time in it (unix nanoseconds).
    pub(crate) newest: u64,
    /// Largest `span_end` of its decision records (the decision log only).
    pub(crate) span_end: u64,
}

struct Append {
    kind: RecordKind,
    /// Shared with the caller (a request body), so it is copied once: into the group's write.
    payload: Bytes,
    time: u64,
    span_end: u64,
    /// Pin the record's position before answering, so no release passes it meanwhile.
    pin: bool,
    enqueued: Instant,
    done: oneshot::Sender<Result<u64, AppendError>>,
}

impl Append {
    /// Its bytes in the segment.
    fn len(&self) -> usize {
        segment::RECORD_HEADER_LEN + self.payload.len()
    }
}

/// What the writer and the release step share.
pub(crate) struct LogState {
    /// Closed segments, oldest first. The active one is not listed.
    pub(crate) closed: Mutex<Vec<SegmentInfo>>,
    /// The position the next record will get.
    pub(crate) end: AtomicU64,
    /// Bytes of every segment of this log, the active one included.
    pub(crate) bytes: Arc<AtomicU64>,
}

pub(crate) struct Log {
    tx: Mutex<Option<Sender<Append>>>,
    pub(crate) state: Arc<LogState>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

pub(crate) struct LogOptions {
    pub(crate) fsync: Fsync,
    pub(crate) fsync_interval: Duration,
    pub(crate) segment_bytes: u64,
    /// Where appends that ask are pinned (the span log only).
    pub(crate) pins: Option<Arc<Pins>>,
    pub(crate) metrics: Arc<StorageMetrics>,
    /// Bytes of every log of the storage, for its bound.
    pub(crate) total_bytes: Arc<AtomicU64>,
}

impl Log {
    /// Opens the log in `dir` for appending after the existing segments (read by the caller,
    /// which passes what it found), starting a new segment at `end`.
    pub(crate) fn open(
        name: &'static str,
        dir: &Path,
        closed: Vec<SegmentInfo>,
        end: u64,
        options: LogOptions,
    ) -> io::Result<Self> {
        let existing: u64 = closed.iter().map(|s| s.len).sum();
        options.total_bytes.fetch_add(existing, Ordering::Relaxed);
        let state = Arc::new(LogState {
            closed: Mutex::new(closed),
            end: AtomicU64::new(end),
            bytes: Arc::new(AtomicU64::new(existing)),
        });
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            active: None,
            state: state.clone(),
            pins: options.pins.clone(),
            metrics: options.metrics.clone(),
            total_bytes: options.total_bytes.clone(),
            options,
            last_sync: Instant::now(),
            dirty: false,
        };
        writer.roll()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name(format!("tailgate-{name}-log"))
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            state,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Appends a record; the answer comes once it is written (and forced, per `fsync`).
    pub(crate) fn append(
        &self,
        kind: RecordKind,
        time: u64,
        payload: Bytes,
        span_end: u64,
        pin: bool,
    ) -> oneshot::Receiver<Result<u64, AppendError>> {
        let (done, answer) = oneshot::channel();
        let append = Append {
            kind,
            payload,
            time,
            span_end,
            pin,
            enqueued: Instant::now(),
            done,
        };
        match &*self.tx.lock() {
            Some(tx) => {
                if let Err(e) = tx.send(append) {
                    let _ = e.0.done.send(Err(AppendError::Closed));
                }
            }
            None => {
                let _ = append.done.send(Err(AppendError::Closed));
            }
        }
        answer
    }

    /// Appends and waits, for threads outside the async runtime.
    pub(crate) fn append_blocking(
        &self,
        kind: RecordKind,
        time: u64,
        payload: Bytes,
        span_end: u64,
    ) -> Result<u64, AppendError> {
        self.append(kind, time, payload, span_end, false)
            .blocking_recv()
            .unwrap_or(Err(AppendError::Closed))
    }

    pub(crate) fn end(&self) -> u64 {
        self.state.end.load(Ordering::Acquire)
    }

    /// Writes and forces what is queued, then stops the writer.
    pub(crate) fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

struct Active {
    file: File,
    base: u64,
    len: u64,
    newest: u64,
    span_end: u64,
}

struct Writer {
    dir: PathBuf,
    active: Option<Active>,
    state: Arc<LogState>,
    options: LogOptions,
    pins: Option<Arc<Pins>>,
    metrics: Arc<StorageMetrics>,
    total_bytes: Arc<AtomicU64>,
    last_sync: Instant,
    dirty: bool,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Append>) {
        let tick = match self.options.fsync {
            Fsync::Interval => self.options.fsync_interval,
            _ => Duration::from_secs(1),
        };
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(a) => a,
                Err(RecvTimeoutError::Timeout) => {
                    if self.options.fsync == Fsync::Interval && self.dirty {
                        self.sync();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut group = vec![first];
            let mut bytes = group[0].len();
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.len();
                        group.push(a);
                    }
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
        if self.dirty && self.options.fsync != Fsync::Never {
            self.sync();
        }
    }

    /// Writes a group, forces it as configured, and answers every append in it.
    ///
    /// A position is pinned (for appends that ask) before its bytes move the log's end, so a
    /// release that sees the new end also sees the pin and never frees the record.
    fn commit(&mut self, group: Vec<Append>) {
        let mut buf = Vec::with_capacity(group.iter().map(Append::len).sum());
        let mut positions = Vec::with_capacity(group.len());
        let mut result: Result<(), AppendError> = Ok(());
        for a in &group {
            let len = a.len() as u64;
            let pending = buf.len() as u64;
            let full = self.active.as_ref().is_some_and(|s| {
                s.len + pending > segment::FILE_HEADER_LEN
                    && s.len + pending + len > self.options.segment_bytes
            });
            if (full || self.active.is_none())
                && let Err(e) = self.write_out(&mut buf).and_then(|()| self.roll())
            {
                result = Err(AppendError::of(&e));
                break;
            }
            let Some(active) = self.active.as_mut() else {
                break;
            };
            let position = active.base + active.len + buf.len() as u64;
            if a.pin
                && let Some(pins) = &self.pins
            {
                pins.pin(position);
            }
            positions.push(position);
            segment::encode_record(&mut buf, a.kind, a.time, &a.payload);
            active.newest = active.newest.max(a.time);
            active.span_end = active.span_end.max(a.span_end);
        }
        if result.is_ok()
            && let Err(e) = self.write_out(&mut buf)
        {
            result = Err(AppendError::of(&e));
        }
        if result.is_ok() {
            match self.options.fsync {
                Fsync::Always => self.sync(),
                Fsync::Interval if self.last_sync.elapsed() >= self.options.fsync_interval => {
                    self.sync()
                }
                _ => {}
            }
        }
        for (i, a) in group.into_iter().enumerate() {
            let answer = match (&result, positions.get(i)) {
                (Ok(()), Some(&position)) => {
                    self.metrics
                        .append_seconds
                        .observe(a.enqueued.elapsed().as_secs_f64());
                    Ok(position)
                }
                (Err(e), position) => {
                    // Not written whole: nobody will hold this position.
                    if let (Some(&position), true, Some(pins)) = (position, a.pin, &self.pins) {
                        pins.unpin(position);
                    }
                    Err(e.clone())
                }
                (Ok(()), None) => Err(AppendError::Closed),
            };
            let _ = a.done.send(answer);
        }
    }

    /// Writes `buf` at the end of the active segment.
    fn write_out(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let written = active.file.write_all(buf);
        // Whatever reached the file counts, whole or torn: positions never move back.
        let len = match &written {
            Ok(()) => active.len + buf.len() as u64,
            Err(_) => active.file.metadata().map_or(active.len, |m| m.len()),
        };
        let grown = len - active.len;
        active.len = len;
        self.state.bytes.fetch_add(grown, Ordering::Relaxed);
        self.total_bytes.fetch_add(grown, Ordering::Relaxed);
        self.state
            .end
            .store(active.base + active.len, Ordering::Release);
        self.dirty = true;
        buf.clear();
        if written.is_err() {
            // Go on in a fresh segment after the torn bytes.
            let _ = self.roll();
        }
        written
    }

    fn sync(&mut self) {
        if let Some(active) = &self.active {
            let started = Instant::now();
            if let Err(e) = active.file.sync_data() {
                tracing::error!(error = %e, dir = %self.dir.display(), "fsync of the storage log failed");
            }
            self.metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        self.last_sync = Instant::now();
        self.dirty = false;
    }

    /// Closes the active segment (forcing it unless `fsync = never`) and starts the next.
    fn roll(&mut self) -> io::Result<()> {
        let base = match self.active.take() {
            Some(old) => {
                if self.options.fsync != Fsync::Never {
                    let _ = old.file.sync_data();
                }
                let base = old.base + old.len;
                self.state.closed.lock().push(SegmentInfo {
                    base: old.base,
                    path: self.dir.join(segment::segment_name(old.base)),
                    len: old.len,
                    newest: old.newest,
                    span_end: old.span_end,
                });
                base
            }
            None => self.state.end.load(Ordering::Acquire),
        };
        let path = self.dir.join(segment::segment_name(base));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let header = segment::file_header();
        if let Err(e) = file.write_all(&header) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        if self.options.fsync != Fsync::Never {
            file.sync_data()?;
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        let len = header.len() as u64;
        self.state.bytes.fetch_add(len, Ordering::Relaxed);
        self.total_bytes.fetch_add(len, Ordering::Relaxed);
        self.state.end.store(base + len, Ordering::Release);
        self.active = Some(Active {
            file,
            base,
            len,
            newest: 0,
            span_end: 0,
        });
        Ok(())
    }
}
