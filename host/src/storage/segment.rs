//! The on-disk format of a local log: segment files of checksummed records.
//!
//! A log is a folder of segments named by the position of their first byte
//! (`00000000000000000000.seg`, …). A position is a byte offset in the log as a whole, so the
//! segment that holds a position is the last one whose base is not above it, and a record's
//! position never changes while it exists.
//!
//! ```text
//! segment: "TGLOG\0" | format version u16 LE | 8 reserved bytes | record*
//! record:  magic u32 LE ("TGR1") | payload length u32 LE | crc32c u32 LE | kind u8
//!          | record time u64 LE (unix nanoseconds) | payload
//! ```
//!
//! The crc32c covers the kind, the time and the payload. The magic lets a reader find the next
//! record after a damaged one: it scans forward for a magic whose record checks out, so a flipped
//! byte costs one record, never the rest of the segment.
//!
//! Written here rather than taken from a crate: `okaywal` says of itself that its format is
//! unstable and not for production, and its checkpoint model frees space by entry, not below a
//! position that several holders pin; `commitlog` has had no release since 2020 and keeps
//! offset indexes we do not need. The format is small, and owning it lets the Kafka log carry
//! the same payloads.

use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

/// The record format this build writes. A reader accepts this version and every older one.
/// Version 2 added `Spill` records.
pub(crate) const FORMAT_VERSION: u16 = 2;
const FILE_MAGIC: &[u8; 6] = b"TGLOG\0";
pub(crate) const FILE_HEADER_LEN: u64 = 16;
const RECORD_MAGIC: [u8; 4] = *b"TGR1";
/// Magic, length, crc, kind, time.
pub(crate) const RECORD_HEADER_LEN: usize = 4 + 4 + 4 + 1 + 8;
/// No record is larger: a length above it is damage, not data.
pub(crate) const MAX_PAYLOAD: usize = 1 << 30;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RecordKind {
    /// An accepted OTLP trace request, as protobuf.
    Spans = 1,
    /// A batch of decisions.
    Decisions = 2,
    /// Traces whose kept spans left through the exporter.
    Exported = 3,
    /// An export batch (an encoded `ExportTraceServiceRequest`, policies' edits included) that
    /// waits here rather than in memory while the backend is slow or down. Only the running
    /// process reads it back; a restart re-exports from the span records, which stay pinned.
    Spill = 4,
    /// An accepted OTLP metrics request, as protobuf: passed through, pinned until the
    /// exporter settles it.
    Metrics = 5,
    /// Positions of pass-through records (metrics) the exporter settled: delivered, or given
    /// up on and counted failed. A restart forwards the others again.
    Forwarded = 6,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Spans),
            2 => Some(Self::Decisions),
            3 => Some(Self::Exported),
            4 => Some(Self::Spill),
            5 => Some(Self::Metrics),
            6 => Some(Self::Forwarded),
            _ => None,
        }
    }
}

/// The header every segment starts with.
pub(crate) fn file_header() -> [u8; FILE_HEADER_LEN as usize] {
    let mut h = [0u8; FILE_HEADER_LEN as usize];
    h[..6].copy_from_slice(FILE_MAGIC);
    h[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// Appends one encoded record to `out`.
pub(crate) fn encode_record(out: &mut Vec<u8>, kind: RecordKind, time: u64, payload: &[u8]) {
    let mut crc = crc32c::crc32c(&[kind as u8]);
    crc = crc32c::crc32c_append(crc, &time.to_le_bytes());
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(payload);
}

pub(crate) fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

/// The segments of a log folder, by base position.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((base, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// One intact record read back.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) position: u64,
    pub(crate) kind: RecordKind,
    pub(crate) time: u64,
    pub(crate) payload: Vec<u8>,
}

/// A stretch of a segment that held no intact record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Offset in the segment file.
    pub(crate) offset: u64,
    pub(crate) bytes: u64,
    /// A torn tail: the segment ends inside a record.
    pub(crate) torn: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SegmentError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "{path} was written by a newer tailgate (log format {found}; this build reads up to {supported}); refusing to start rather than discard it"
    )]
    Newer {
        path: String,
        found: u16,
        supported: u16,
    },
    #[error("{path} is not a tailgate log segment (bad magic)")]
    NotASegment { path: String },
}

/// A segment read whole: its records at or after `from`, the damage found, and its length.
pub(crate) struct SegmentContents {
    pub(crate) records: Vec<Record>,
    pub(crate) damage: Vec<Damage>,
    pub(crate) len: u64,
}

/// Reads the segment at `path` whose first byte is at position `base`.
pub(crate) fn read_segment(
    path: &Path,
    base: u64,
    from: u64,
) -> Result<SegmentContents, SegmentError> {
    let io_err = |source| SegmentError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err)?;
    let len = bytes.len() as u64;
    if bytes.len() < FILE_HEADER_LEN as usize {
        // Torn while its header was written: it never held a record.
        let damage = if bytes.is_empty() {
            Vec::new()
        } else {
            vec![Damage {
                offset: 0,
                bytes: len,
                torn: true,
            }]
        };
        return Ok(SegmentContents {
            records: Vec::new(),
            damage,
            len,
        });
    }
    if &bytes[..6] != FILE_MAGIC {
        return Err(SegmentError::NotASegment {
            path: path.display().to_string(),
        });
    }
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    if version > FORMAT_VERSION {
        return Err(SegmentError::Newer {
            path: path.display().to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (records, damage) = scan(&bytes, base, from);
    Ok(SegmentContents {
        records,
        damage,
        len,
    })
}

/// Reads the one record at `position` of the segment at `path` whose first byte is at `base`.
pub(crate) fn read_record_at(path: &Path, base: u64, position: u64) -> io::Result<Record> {
    use std::io::{Seek as _, SeekFrom};
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what} at position {position}", path.display()),
        )
    };
    let offset = position
        .checked_sub(base)
        .filter(|o| *o >= FILE_HEADER_LEN)
        .ok_or_else(|| invalid("no record"))?;
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = vec![0; RECORD_HEADER_LEN];
    file.read_exact(&mut bytes)?;
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(invalid("a bad record length"));
    }
    bytes.resize(RECORD_HEADER_LEN + len, 0);
    file.read_exact(&mut bytes[RECORD_HEADER_LEN..])?;
    match parse_at(&bytes, 0) {
        Parsed::Record(kind, time, _, _) => {
            bytes.drain(..RECORD_HEADER_LEN);
            Ok(Record {
                position,
                kind,
                time,
                payload: bytes,
            })
        }
        Parsed::Torn | Parsed::Bad => Err(invalid("a damaged record")),
    }
}

/// The records of a segment's bytes, and the stretches that held none.
pub(crate) fn scan(bytes: &[u8], base: u64, from: u64) -> (Vec<Record>, Vec<Damage>) {
    let mut records = Vec::new();
    let mut damage: Vec<Damage> = Vec::new();
    let mut at = FILE_HEADER_LEN as usize;
    while at < bytes.len() {
        match parse_at(bytes, at) {
            Parsed::Record(kind, time, payload, next) => {
                let position = base + at as u64;
                if position >= from {
                    records.push(Record {
                        position,
                        kind,
                        time,
                        payload: payload.to_vec(),
                    });
                }
                at = next;
            }
            Parsed::Torn | Parsed::Bad => {
                // Find the next record that checks out; everything before it is damage. A
                // length that runs past the end is a torn tail only if no record follows.
                let next = (at + 1..bytes.len())
                    .find(|&i| {
                        bytes[i..].starts_with(&RECORD_MAGIC)
                            && matches!(parse_at(bytes, i), Parsed::Record(..))
                    })
                    .unwrap_or(bytes.len());
                damage.push(Damage {
                    offset: at as u64,
                    bytes: (next - at) as u64,
                    torn: next == bytes.len(),
                });
                at = next;
            }
        }
    }
    (records, damage)
}

enum Parsed<'a> {
    Record(RecordKind, u64, &'a [u8], usize),
    /// The bytes end inside what looks like a record.
    Torn,
    /// Not a record: wrong magic, bad length, bad checksum or unknown kind.
    Bad,
}

fn parse_at(bytes: &[u8], at: usize) -> Parsed<'_> {
    let rest = &bytes[at..];
    if rest.len() < RECORD_HEADER_LEN {
        return if RECORD_MAGIC.starts_with(&rest[..rest.len().min(4)]) {
            Parsed::Torn
        } else {
            Parsed::Bad
        };
    }
    if rest[..4] != RECORD_MAGIC {
        return Parsed::Bad;
    }
    let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
    let len = word(4) as usize;
    let crc = word(8);
    if len > MAX_PAYLOAD {
        return Parsed::Bad;
    }
    if rest.len() < RECORD_HEADER_LEN + len {
        return Parsed::Torn;
    }
    let kind_byte = rest[12];
    let time_bytes = &rest[13..21];
    let payload = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
    let mut actual = crc32c::crc32c(&[kind_byte]);
    actual = crc32c::crc32c_append(actual, time_bytes);
    actual = crc32c::crc32c_append(actual, payload);
    if actual != crc {
        return Parsed::Bad;
    }
    let Some(kind) = RecordKind::from_u8(kind_byte) else {
        return Parsed::Bad;
    };
    let time = u64::from_le_bytes(time_bytes.try_into().unwrap_or([0; 8]));
    Parsed::Record(kind, time, payload, at + RECORD_HEADER_LEN + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(payloads: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = file_header().to_vec();
        let mut offsets = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            offsets.push(bytes.len());
            encode_record(&mut bytes, RecordKind::Spans, i as u64, p);
        }
        (bytes, offsets)
    }

    fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
        records.iter().map(|r| r.payload.clone()).collect()
    }

    #[test]
    fn one_record_reads_back_by_its_position_and_damage_is_an_error() {
        let (mut bytes, offsets) = segment(&[b"one", b"two", b"three"]);
        let path = std::env::temp_dir().join(format!("tailgate-seg-at-{}", std::process::id()));
        std::fs::write(&path, &bytes).expect("write");
        let base = 5000;
        for (i, want) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
            let position = base + offsets[i] as u64;
            let r = read_record_at(&path, base, position).expect("intact");
            assert_eq!(
                (r.payload.as_slice(), r.position, r.time),
                (*want, position, i as u64)
            );
        }
        // Inside the header, below the segment, or not at a record: errors, not data.
        assert!(read_record_at(&path, base, base).is_err());
        assert!(read_record_at(&path, base, base - 1).is_err());
        assert!(read_record_at(&path, base, base + offsets[1] as u64 + 1).is_err());
        // A flipped payload byte fails the checksum.
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        assert!(read_record_at(&path, base, base + offsets[2] as u64).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn records_read_back_with_their_positions_kinds_and_times() {
        let (bytes, offsets) = segment(&[b"one", b"", b"three"]);
        let (records, damage) = scan(&bytes, 1000, 0);
        assert!(damage.is_empty());
        assert_eq!(
            payloads(&records),
            vec![b"one".to_vec(), vec![], b"three".to_vec()]
        );
        for (r, (i, off)) in records.iter().zip(offsets.iter().enumerate()) {
            assert_eq!(r.position, 1000 + *off as u64);
            assert_eq!(r.time, i as u64);
            assert_eq!(r.kind, RecordKind::Spans);
        }
        let (from_second, _) = scan(&bytes, 1000, 1000 + offsets[1] as u64);
        assert_eq!(from_second.len(), 2, "records before `from` are skipped");
    }

    #[test]
    fn a_torn_tail_at_any_offset_keeps_every_whole_record_before_it() {
        let (bytes, offsets) = segment(&[b"alpha", b"beta", b"gamma"]);
        for cut in FILE_HEADER_LEN as usize..bytes.len() {
            let (records, damage) = scan(&bytes[..cut], 0, 0);
            let whole = offsets
                .iter()
                .zip(offsets.iter().skip(1).chain([&bytes.len()]))
                .filter(|(_, end)| **end <= cut)
                .count();
            assert_eq!(records.len(), whole, "cut at {cut}");
            let at_boundary = offsets.contains(&cut) || cut == bytes.len();
            assert_eq!(damage.len(), usize::from(!at_boundary), "cut at {cut}");
            if let Some(d) = damage.first() {
                assert!(d.torn);
                assert_eq!(d.offset as usize + d.bytes as usize, cut);
            }
        }
    }

    #[test]
    fn a_flipped_byte_costs_its_record_and_the_scan_goes_on() {
        let (bytes, offsets) = segment(&[b"first record", b"second record", b"third record"]);
        for i in offsets[1]..offsets[2] {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            let (records, damage) = scan(&damaged, 0, 0);
            assert_eq!(
                payloads(&records),
                vec![b"first record".to_vec(), b"third record".to_vec()],
                "flipped byte {i}"
            );
            assert_eq!(damage.len(), 1, "flipped byte {i}");
            assert_eq!(damage[0].offset as usize, offsets[1]);
            assert!(!damage[0].torn);
        }
    }

    #[test]
    fn a_segment_of_a_newer_format_is_refused_naming_both_versions() {
        let dir = std::env::temp_dir().join(format!("tailgate-seg-newer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(segment_name(0));
        let (mut bytes, _) = segment(&[b"x"]);
        bytes[6..8].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let err = read_segment(&path, 0, 0).err().expect("refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!("log format {}", FORMAT_VERSION + 1)),
            "{text}"
        );
        assert!(
            text.contains(&format!("reads up to {FORMAT_VERSION}")),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn segment_names_sort_by_base_and_parse_back() {
        let dir = std::env::temp_dir().join(format!("tailgate-seg-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for base in [900u64, 10, 123_456_789] {
            std::fs::write(dir.join(segment_name(base)), b"").expect("write");
        }
        std::fs::write(dir.join("LOCK"), b"").expect("write");
        let bases: Vec<u64> = list_segments(&dir)
            .expect("list")
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        assert_eq!(bases, vec![10, 900, 123_456_789]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
