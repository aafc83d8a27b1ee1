//! The file sink: kept traces (or metrics, in a file of their own) as OTLP/JSON, one export
//! request per line, the format the OTel Collector's file exporter writes and its
//! `otlpjsonfile` receiver reads.
//!
//! Rotates by size, keeping `max_files` old files (`traces.jsonl.1` is the newest), so a
//! collector left running on defaults cannot fill the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use parking_lot::Mutex;
use prost::Message;

use crate::otlp::json;
use crate::otlp::signal::{self, Signal};

pub(crate) struct FileSink {
    signal: Signal,
    state: Mutex<FileState>,
}

struct FileState {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: usize,
}

impl FileSink {
    pub(crate) fn open(
        signal: Signal,
        path: &Path,
        max_size: u64,
        max_files: usize,
    ) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            signal,
            state: Mutex::new(FileState {
                path: path.to_owned(),
                file,
                size,
                max_size,
                max_files,
            }),
        })
    }

    /// Appends one encoded request as a JSON line, rotating first if the file is full.
    pub(crate) fn write_batch(&self, encoded: &[u8]) -> io::Result<()> {
        let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut line = match self.signal {
            Signal::Traces => {
                json::encode_traces(&ExportTraceServiceRequest::decode(encoded).map_err(invalid)?)
            }
            Signal::Metrics => signal::metrics_to_json(encoded).map_err(invalid)?,
        };
        line.push('\n');
        let mut state = self.state.lock();
        if state.size > 0 && state.size + line.len() as u64 > state.max_size {
            state.rotate()?;
        }
        // One write call per line, so a reader tailing the file never sees half a batch
        // interleaved with another.
        state.file.write_all(line.as_bytes())?;
        state.file.flush()?;
        state.size += line.len() as u64;
        Ok(())
    }
}

impl FileState {
    fn rotate(&mut self) -> io::Result<()> {
        let numbered = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.max_files == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.max_files));
            for n in (1..self.max_files).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn request(name: &str) -> Vec<u8> {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: name.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn writes_json_lines_and_rotates_by_size() {
        let dir = std::env::temp_dir().join(format!("tailgate-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("out/traces.jsonl");
        let sink = FileSink::open(Signal::Traces, &path, 300, 2).unwrap();
        for i in 0..6 {
            sink.write_batch(&request(&format!("span-{i}"))).unwrap();
        }
        let live = std::fs::read_to_string(&path).unwrap();
        let first = std::fs::read_to_string(dir.join("out/traces.jsonl.1")).unwrap();
        assert!(live.ends_with('\n'));
        for line in live.lines().chain(first.lines()) {
            let decoded = json::decode_traces(line.as_bytes()).unwrap();
            assert_eq!(
                decoded.resource_spans[0].scope_spans[0].spans[0].trace_id,
                vec![1; 16]
            );
        }
        assert!(live.contains("span-5"));
        assert!(
            !dir.join("out/traces.jsonl.3").exists(),
            "only max_files rotated files kept"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
