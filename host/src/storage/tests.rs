//! The storage log end to end within the crate: appends survive a reopen, the watermark frees
//! only what nothing pins, the lock refuses a second owner, decisions read back latest first.

use super::*;
use crate::config::{Size, StorageConfig};

fn config(dir: &Path) -> StorageConfig {
    StorageConfig {
        dir: dir.to_path_buf(),
        fsync: Fsync::Never,
        segment_bytes: Size(1 << 20),
        max_bytes: Size(64 << 20),
        ..StorageConfig::default()
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tailgate-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn append(storage: &Storage, payload: &[u8]) -> u64 {
    storage
        .append_spans(bytes::Bytes::copy_from_slice(payload), unix_nanos(), None)
        .blocking_recv()
        .expect("answered")
        .expect("appended")
}

fn replayed(recovery: &Recovery, storage: &Storage) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    recovery.replay(&storage.metrics, |r| out.push((r.position, r.payload)));
    out
}

#[test]
fn what_was_appended_and_still_pinned_is_replayed_after_a_reopen() {
    let dir = temp("reopen");
    let registry = Registry::new();
    let positions: Vec<u64> = {
        let (storage, _) = Storage::open(&config(&dir), &registry).expect("open");
        let p = (0..3u8).map(|i| append(&storage, &[i; 10])).collect();
        storage.close();
        p
    };
    let (storage, recovery) = Storage::open(&config(&dir), &Registry::new()).expect("reopen");
    let got = replayed(&recovery, &storage);
    assert_eq!(
        got,
        positions
            .iter()
            .zip(0..3u8)
            .map(|(p, i)| (*p, vec![i; 10]))
            .collect::<Vec<_>>(),
        "every record, at its position, pinned at close"
    );
    // New appends go after the old records, never over them.
    let next = append(&storage, b"after");
    assert!(next > *positions.last().unwrap());
    storage.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn released_records_are_not_replayed_and_their_segments_go() {
    let dir = temp("release");
    {
        let (storage, _) = Storage::open(&config(&dir), &Registry::new()).expect("open");
        let big = vec![7u8; 300 << 10];
        let positions: Vec<u64> = (0..8).map(|_| append(&storage, &big)).collect();
        let kept = positions[6];
        // Everyone lets go of all but the last two.
        for p in &positions[..6] {
            storage.pins.unpin(*p);
        }
        assert_eq!(storage.watermark(), kept);
        storage.release();
        let left: Vec<u64> = segment::list_segments(&dir.join("spans"))
            .unwrap()
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        assert!(left.len() < 4, "released segments were deleted: {left:?}");
        assert!(
            left.iter().all(|b| *b <= kept),
            "the pinned record's segment stays"
        );
        storage.close();
    }
    let (storage, recovery) = Storage::open(&config(&dir), &Registry::new()).expect("reopen");
    let got = replayed(&recovery, &storage);
    assert_eq!(got.len(), 2, "only the two records still pinned");
    storage.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_owner_is_refused_naming_the_first() {
    let dir = temp("lock");
    let (storage, _) = Storage::open(&config(&dir), &Registry::new()).expect("open");
    let err = Storage::open(&config(&dir), &Registry::new())
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(text.contains("in use by another tailgate"), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    storage.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_directory_is_refused_with_its_path() {
    let file = temp("not-a-dir");
    std::fs::write(&file, b"a file").expect("write");
    let err = Storage::open(&config(&file), &Registry::new())
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_latest_decision_of_a_trace_wins_and_exports_are_remembered() {
    let dir = temp("decisions");
    let d = |keep: bool, reason: &str| LoggedDecision {
        trace_id: [9; 16],
        keep,
        trigger: crate::trace::Trigger::RootGrace,
        probability: None,
        policy: "p".into(),
        reason: reason.into(),
    };
    {
        let (storage, _) = Storage::open(&config(&dir), &Registry::new()).expect("open");
        storage
            .log_decisions(&[d(false, "first").as_ref()])
            .expect("logged");
        storage
            .log_decisions(&[d(true, "rescued").as_ref()])
            .expect("logged");
        storage
            .log_exported(&[Exported {
                trace_id: [9; 16],
                records: vec![42],
            }])
            .blocking_recv()
            .expect("answered")
            .expect("logged");
        storage.close();
    }
    let (storage, recovery) = Storage::open(&config(&dir), &Registry::new()).expect("reopen");
    let r = recovery.decisions.get(&[9; 16]).expect("recovered");
    assert_eq!(r.decision, d(true, "rescued"));
    assert!(r.exported.contains(&42));
    storage.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_log_refuses_room_and_reports_pressure_first() {
    let dir = temp("full");
    let mut c = config(&dir);
    c.max_bytes = Size(2 << 20);
    let (storage, _) = Storage::open(&c, &Registry::new()).expect("open");
    assert!(storage.has_room(1 << 20));
    let chunk = vec![1u8; 400 << 10];
    let mut n = 0;
    while !storage.under_pressure() {
        append(&storage, &chunk);
        n += 1;
        assert!(n < 10, "pressure past 90 % of the bound");
    }
    assert!(!storage.has_room(400 << 10), "no room for another chunk");
    storage.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small deterministic generator for the damage tests (xorshift64*), seeded per round.
fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed.max(1);
    move |below| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % below.max(1)
    }
}

#[test]
fn torn_and_damaged_segments_keep_every_intact_record_and_count_the_rest() {
    for round in 0..12u64 {
        let mut random = rng(0x7a11_6a7e + round);
        let dir = temp(&format!("damage-{round}"));
        let total = {
            let (storage, _) = Storage::open(&config(&dir), &Registry::new()).expect("open");
            let n = 150;
            for i in 0..n {
                // Sizes vary, so record boundaries fall anywhere.
                append(&storage, &vec![i as u8; 5_000 + random(30_000) as usize]);
            }
            storage.close();
            n
        };
        let segments = segment::list_segments(&dir.join("spans")).unwrap();
        assert!(segments.len() >= 3, "several segments");
        // Where each record of a segment starts and ends, read before the damage.
        let layout = |base: u64, path: &Path| -> Vec<(u64, u64)> {
            let bytes = std::fs::read(path).unwrap();
            let contents = segment::read_segment(path, base, 0).unwrap();
            let mut spans = Vec::new();
            for r in &contents.records {
                let start = r.position - base;
                spans.push((
                    start,
                    start + (segment::RECORD_HEADER_LEN + r.payload.len()) as u64,
                ));
            }
            assert_eq!(spans.last().map(|s| s.1), Some(bytes.len() as u64));
            spans
        };
        // Flip one byte anywhere in an older segment's records: one record is lost.
        let (old_base, older) = &segments[random(segments.len() as u64 - 1) as usize];
        let old_layout = layout(*old_base, older);
        let mut bytes = std::fs::read(older).unwrap();
        let flip = segment::FILE_HEADER_LEN + random(bytes.len() as u64 - segment::FILE_HEADER_LEN);
        bytes[flip as usize] ^= 1 << random(8);
        std::fs::write(older, &bytes).unwrap();
        // Cut the newest segment that holds records at a random offset: the records wholly
        // before the cut stay; one cut through is torn, unless the cut falls on a boundary.
        let (new_base, newest) = segments
            .iter()
            .rev()
            .find(|(_, p)| file_len(p) > segment::FILE_HEADER_LEN)
            .unwrap();
        assert_ne!(
            new_base, old_base,
            "the flip and the cut are in different segments"
        );
        let new_layout = layout(*new_base, newest);
        let len = file_len(newest);
        let cut = segment::FILE_HEADER_LEN + random(len - segment::FILE_HEADER_LEN);
        std::fs::OpenOptions::new()
            .write(true)
            .open(newest)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let cut_away = new_layout.iter().filter(|(_, end)| *end > cut).count();
        let torn = new_layout
            .iter()
            .any(|(start, end)| *start < cut && cut < *end);
        assert!(old_layout.iter().any(|(s, e)| *s <= flip && flip < *e));

        let registry = Registry::new();
        let (storage, recovery) = Storage::open(&config(&dir), &registry).expect("reopen");
        let got = replayed(&recovery, &storage);
        assert_eq!(
            got.len(),
            total - 1 - cut_away,
            "round {round}: one record lost to the flip at {flip}, {cut_away} to the cut at {cut}"
        );
        // Every record read back is intact: its payload is one byte value, its index.
        assert!(got.iter().all(|(_, p)| p.iter().all(|b| *b == p[0])));
        assert_eq!(
            registry.value("tailgate_storage_corrupt_records_total"),
            1.0 + f64::from(u8::from(torn)),
            "round {round}: the flip, and the tear if the cut split a record"
        );
        storage.close();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_spilled_batch_reads_back_by_position_and_is_never_replayed_as_spans() {
    let dir = temp("spill");
    let mut small = config(&dir);
    small.max_bytes = Size(2 << 20);
    {
        let (storage, _) = Storage::open(&small, &Registry::new()).expect("open");
        let request = append(&storage, b"request");
        // Across segments (1 MiB each): each batch reads back from its own.
        let batches: Vec<(u64, Vec<u8>)> = (0..3u8)
            .map(|i| {
                let body = vec![i; 400 << 10];
                let position = storage
                    .spill(bytes::Bytes::from(body.clone()))
                    .blocking_recv()
                    .expect("answered")
                    .expect("spilled");
                (position, body)
            })
            .collect();
        for (position, body) in &batches {
            assert_eq!(&storage.read_spill(*position).expect("reads back"), body);
        }
        assert!(
            storage.read_spill(request).is_err(),
            "a span record is not a batch"
        );
        // Past the bound, a spill is refused: the batch stays in memory.
        let refused = storage
            .spill(bytes::Bytes::from(vec![9u8; 1 << 20]))
            .blocking_recv()
            .expect("answered");
        assert!(
            matches!(refused, Err(AppendError::DiskFull(_))),
            "{refused:?}"
        );
        storage.close();
    }
    let (storage, recovery) = Storage::open(&small, &Registry::new()).expect("reopen");
    let mut kinds = Vec::new();
    recovery.replay(&storage.metrics, |r| kinds.push(r.kind));
    // The restart re-exports from the span records; app::recover skips spilled batches.
    assert_eq!(kinds[0], RecordKind::Spans);
    assert!(
        kinds[1..].iter().all(|k| *k == RecordKind::Spill),
        "{kinds:?}"
    );
    storage.close();
    let _ = std::fs::remove_dir_all(&dir);
}
