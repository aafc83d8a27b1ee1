//! One local log: a folder of segments and the thread that appends to it.
//!
//! Appends from any thread go to one writer thread, which takes every append waiting, writes
//! them with one `write`, forces them to disk as `storage.fsync` says (group commit), and only
//! then answers each with its position.
//!
//! A full disk (`ENOSPC`): a failed write answers the appends it carried with the error, and
//! its half-written bytes are cut off again, so a refused record is never replayed and its
//! space goes back to the disk; appends of the group written whole before the failure keep
//! their positions. (Should the cut fail, the bytes stay as a torn tail, which a reader
//! skips, and the writer goes on in a new segment.) Intake, the appends that pin (accepted
//! requests), never takes the file system's last [`INTAKE_RESERVE`] bytes: they are refused
//! as a full disk first, so the log's own records (decisions, exports) and the checkpoint,
//! whose writes are what frees segments, still fit when the disk is full.

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
/// Free space on the log's file system that intake leaves to the records that free space: the
/// checkpoint (a page), a new decision segment's header, and the decision and export records
/// (about 60 bytes a trace) of some 15,000 traces decided while intake is refused.
const INTAKE_RESERVE: u64 = 1 << 20;

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
    /// Dropped with the append, once it is answered: by then its bytes are in the written
    /// total (or were never written).
    _admission: Option<Admission>,
}

/// Intake bytes held against `storage.max_bytes` from admission until the record is written
/// or refused (see `Storage::admit`).
#[must_use]
pub(crate) struct Admission {
    pub(super) admitted: Arc<AtomicU64>,
    pub(super) bytes: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admitted.fetch_sub(self.bytes, Ordering::AcqRel);
    }
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
        self.append_admitted(kind, time, payload, span_end, pin, None)
    }

    /// [`Self::append`] of an admitted intake record: `admission` is released once it is
    /// answered.
    pub(crate) fn append_admitted(
        &self,
        kind: RecordKind,
        time: u64,
        payload: Bytes,
        span_end: u64,
        pin: bool,
        admission: Option<Admission>,
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
            _admission: admission,
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
        let group = self.refuse_intake_past_reserve(group);
        let mut buf = Vec::with_capacity(group.iter().map(Append::len).sum());
        let mut positions = Vec::with_capacity(group.len());
        // Appends whose bytes are in a segment whole: answered with their position even when
        // a later write of the group fails.
        let mut written = 0;
        let mut result: Result<(), AppendError> = Ok(());
        for a in &group {
            let len = a.len() as u64;
            let pending = buf.len() as u64;
            let full = self.active.as_ref().is_some_and(|s| {
                s.len + pending > segment::FILE_HEADER_LEN
                    && s.len + pending + len > self.options.segment_bytes
            });
            if full || self.active.is_none() {
                if let Err(e) = self.write_out(&mut buf) {
                    result = Err(AppendError::of(&e));
                    break;
                }
                // Forced by the roll (unless `fsync = never`) before it opens the next.
                written = positions.len();
                if let Err(e) = self.roll() {
                    result = Err(AppendError::of(&e));
                    break;
                }
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
        if result.is_ok() {
            match self.write_out(&mut buf) {
                Ok(()) => written = positions.len(),
                Err(e) => result = Err(AppendError::of(&e)),
            }
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
                (_, Some(&position)) if i < written => {
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
                (Ok(()), _) => Err(AppendError::Closed),
            };
            let _ = a.done.send(answer);
        }
    }

    /// Answers the intake of `group` (the appends that pin) with a full disk when writing it
    /// would leave less than [`INTAKE_RESERVE`] free on the log's file system; the rest goes on.
    fn refuse_intake_past_reserve(&self, group: Vec<Append>) -> Vec<Append> {
        let intake: u64 = (group.iter().filter(|a| a.pin))
            .map(|a| a.len() as u64)
            .sum();
        if intake == 0 {
            return group;
        }
        // A file system that cannot say how full it is is left to answer ENOSPC itself.
        let Ok(free) = free_bytes(&self.dir) else {
            return group;
        };
        if free >= intake + INTAKE_RESERVE {
            return group;
        }
        let full = AppendError::DiskFull(format!(
            "{free} bytes free in {}, and the last {INTAKE_RESERVE} are kept for the log's own \
             records",
            self.dir.display()
        ));
        let (refused, rest): (Vec<Append>, Vec<Append>) = group.into_iter().partition(|a| a.pin);
        for a in refused {
            let _ = a.done.send(Err(full.clone()));
        }
        rest
    }

    /// Writes `buf` at the end of the active segment. On failure nothing of it stays: the
    /// bytes that reached the file are cut off again (or, should the cut fail, left as a torn
    /// tail behind which the writer goes on in a new segment).
    fn write_out(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let written = active.file.write_all(buf);
        let wanted = buf.len() as u64;
        buf.clear();
        let len = match &written {
            Ok(()) => active.len + wanted,
            Err(_) => {
                if active.file.set_len(active.len).is_ok() {
                    // As if never written: no position moved, and the space is free again.
                    return written;
                }
                // Whatever stayed in the file counts, torn or not: positions never move back.
                active.file.metadata().map_or(active.len, |m| m.len())
            }
        };
        let grown = len.saturating_sub(active.len);
        active.len += grown;
        self.state.bytes.fetch_add(grown, Ordering::Relaxed);
        self.total_bytes.fetch_add(grown, Ordering::Relaxed);
        self.state
            .end
            .store(active.base + active.len, Ordering::Release);
        self.dirty = true;
        if written.is_err() {
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

/// Bytes an unprivileged writer may still use on the file system holding `dir` (statvfs(3)
/// `f_bavail × f_frsize`).
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("a storage path with a NUL byte"))?;
    // SAFETY: statvfs(3) fills the zeroed struct we own from a NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}
