//! A real `ENOSPC`: the storage log on a tmpfs far smaller than `storage.max_bytes`, so the
//! disk itself fills before the bound does. tailgate must keep running, refuse with retryable
//! codes (`tailgate_spans_refused_total{reason="disk_full"}`) while the disk is full, take data
//! again once exports free segments, and deliver every acknowledged span.
//!
//! Two ways to fill it: the log itself outgrows it (its traces wait longer than the disk holds),
//! and another process takes every free byte, so that even the log's own records and the
//! checkpoint meet `ENOSPC` until that process lets go.
//!
//! The tmpfs needs root (CAP_SYS_ADMIN), as the tests and CI have. Where it cannot be mounted
//! the tests fail and say so: a check of the disk-full path that did not run is not a pass.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// The disk: 4 MiB (less the 1 MiB the log leaves to its own records) holds about 2.5 s of the
/// load below, half the 5 s its traces wait before they are decided and exported in the first
/// test, so the log must fill it.
const TMPFS_SIZE: &str = "4m";
const RATE: u64 = 3_000;

/// A tmpfs mounted for the test; unmounted on drop, also when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("create the tmpfs mount point");
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .stdin(Stdio::null())
            .output();
        let why = match mounted {
            Ok(out) if out.status.success() => return Self(path.to_owned()),
            Ok(out) => format!(
                "mount exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("cannot run mount: {e}"),
        };
        panic!(
            "this test needs a small tmpfs for a real ENOSPC and could not mount one at {} \
             ({why}). Run the e2e tests as root (CAP_SYS_ADMIN), e.g. in a container started \
             with --cap-add SYS_ADMIN or --privileged. The test is not skipped on purpose: an \
             untested disk-full path must not count as a pass.",
            path.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process the test started has not been reaped yet): detach it now,
            // the kernel frees it when the last user goes.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn u(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

/// Every trace kept `root_grace` after its root; the log on `mount` with a `max_bytes` far
/// above the disk, so a refusal can only come from the disk itself; segments of 1 MiB (the
/// least allowed), so exports free space a segment at a time. The exporter is the default file
/// exporter, in the run's folder outside the tmpfs.
fn start_on(mount: &Path, root_grace: &str) -> Tailgate {
    Tailgate::start(&format!(
        "[buffer]\nroot_grace = \"{root_grace}\"\ntrace_idle = \"60s\"\ndecision_wait = \"60s\"\n\n\
         [decide]\ndefault = \"keep\"\n\n\
         [storage]\ndir = {:?}\nsegment_bytes = \"1MiB\"\nmax_bytes = \"1GiB\"\n",
        mount.join("storage").display().to_string()
    ))
}

/// A run of `tailgate loadgen` into `tg` that retries refusals for up to 2 minutes.
struct Load {
    child: ChildGuard,
    acked: PathBuf,
    report: PathBuf,
}

impl Load {
    fn start(tg: &Tailgate, dir: &Path, duration: &str) -> Self {
        let acked = dir.join("acked.txt");
        let report = dir.join("loadgen.json");
        let child = ChildGuard(
            Command::new(BIN)
                .arg("loadgen")
                .args(["--endpoint", &format!("http://{}", tg.grpc)])
                .args(["--rate", &RATE.to_string(), "--connections", "2"])
                .args(["--traces-per-request", "20", "--spans-per-trace", "10"])
                .args(["--duration", duration, "--retry-for", "120s", "--quiet"])
                .arg("--acked-out")
                .arg(&acked)
                .arg("--report")
                .arg(&report)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn tailgate loadgen"),
        );
        Self {
            child,
            acked,
            report,
        }
    }

    /// Requests acknowledged so far.
    fn acked(&self) -> Vec<(u64, u64)> {
        read_acked(&self.acked)
    }

    /// Polls every 200 ms until loadgen exits, checking that tailgate stays up and handing
    /// `each` the current `/metrics` and the requests acknowledged so far; then loadgen's
    /// summary, checked: every refusal was retried until it got through.
    fn run(&mut self, tg: &mut Tailgate, mut each: impl FnMut(&Metrics, usize)) -> Value {
        let deadline = Instant::now() + Duration::from_secs(200);
        let finished = loop {
            if let Some(status) = tg.wait_exit(Duration::ZERO) {
                panic!("tailgate exited while its disk was full: {status}");
            }
            each(&tg.metrics(), self.acked().len());
            if let Some(status) = self.child.0.try_wait().expect("wait on loadgen") {
                break status;
            }
            assert!(Instant::now() < deadline, "loadgen did not finish");
            std::thread::sleep(Duration::from_millis(200));
        };
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(&self.report).expect("loadgen's --report"),
        )
        .expect("loadgen's JSON summary");
        eprintln!("diskfull: loadgen {finished}: {summary}");
        // Refused with a retryable code: loadgen retried every refusal until it got through.
        assert!(u(&summary, "retries") > 0, "nothing was retried: {summary}");
        assert_eq!(u(&summary, "spans_failed"), 0, "{summary}");
        assert_eq!(u(&summary, "spans_rejected"), 0, "{summary}");
        let acked_spans: u64 = self.acked().iter().map(|(_, n)| n).sum();
        assert_eq!(acked_spans, u(&summary, "spans_accepted"), "{summary}");
        summary
    }
}

/// Once loadgen is done: every acknowledged seq reaches the file exporter, the accounting
/// holds (received = kept + dropped − rescued + refused, and what was not refused is what loadgen had
/// acknowledged), some of the refusals were for a full disk, and tailgate stops cleanly.
fn delivers_every_acked_seq_and_stops(mut tg: Tailgate, acked: &[(u64, u64)]) {
    let acked_spans: u64 = acked.iter().map(|(_, n)| n).sum();
    let lost_of = |delivered: &HashMap<u64, usize>| -> Vec<u64> {
        acked
            .iter()
            .flat_map(|&(first, n)| first..first + n)
            .filter(|seq| !delivered.contains_key(seq))
            .collect()
    };
    let mut delivered = HashMap::<u64, usize>::new();
    let all_delivered = wait_for(Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(500));
        delivered.clear();
        for (_, span) in exported_spans(&tg.exported()) {
            *delivered
                .entry(seq_of(&span).expect("every loadgen span has a seq"))
                .or_default() += 1;
        }
        lost_of(&delivered).is_empty().then_some(())
    });
    let metrics = wait_for(Duration::from_secs(30), || {
        let m = tg.metrics();
        (m.received() == m.accounted()).then_some(m)
    })
    .unwrap_or_else(|| tg.metrics());
    let (received, kept, dropped, refused, rescued) = (
        metrics.received(),
        metrics.kept(),
        metrics.dropped(),
        metrics.refused(),
        metrics.rescued(),
    );
    let disk_full = metrics.sum("tailgate_spans_refused_total", &["reason=\"disk_full\""]);
    let status = tg.terminate();
    let lost = lost_of(&delivered);
    eprintln!(
        "diskfull: {acked_spans} acknowledged, {} delivered, {} lost; received {received} = \
         kept {kept} + dropped {dropped} - rescued {rescued} + refused {refused} ({disk_full} for disk_full)",
        delivered.len(),
        lost.len()
    );
    assert!(
        lost.is_empty() && all_delivered.is_some(),
        "{} of {acked_spans} acknowledged seqs never arrived; the first: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(disk_full > 0.0, "nothing was refused for disk_full");
    assert_eq!(
        received,
        kept + dropped - rescued + refused,
        "received = kept + dropped - rescued + refused"
    );
    assert_eq!(
        received - refused,
        acked_spans as f64,
        "every span tailgate took was acknowledged to loadgen, and only those"
    );
    assert!(status.success(), "tailgate did not stop cleanly: {status}");
}

fn refused_for_disk(metrics: &Metrics) -> f64 {
    metrics.sum("tailgate_spans_refused_total", &["reason=\"disk_full\""])
}

#[test]
fn a_log_that_outgrows_its_disk_refuses_retryably_recovers_and_loses_nothing() {
    let dir = TempDir::new("diskfull");
    let mount = dir.path().join("tmpfs");
    // Declared before tailgate, so tailgate is stopped (dropped) before the unmount.
    let _tmpfs = Tmpfs::mount(&mount, TMPFS_SIZE);
    let mut tg = start_on(&mount, "5s");
    let mut load = Load::start(&tg, dir.path(), "12s");
    let mut acked_at_first_refusal = None;
    load.run(&mut tg, |metrics, acked| {
        if refused_for_disk(metrics) > 0.0 && acked_at_first_refusal.is_none() {
            acked_at_first_refusal = Some(acked);
        }
    });
    let acked = load.acked();
    let Some(acked_before) = acked_at_first_refusal else {
        panic!("the {TMPFS_SIZE} tmpfs never filled: nothing was refused for disk_full");
    };
    assert!(
        tg.log()
            .iter()
            .any(|l| l.contains("the storage disk is full")),
        "the refusals did not come from the disk being full"
    );
    assert!(
        acked.len() > acked_before,
        "nothing was acknowledged after the disk first filled ({acked_before} requests \
         before): acceptance never resumed"
    );
    delivers_every_acked_seq_and_stops(tg, &acked);
}

/// A file that takes every free byte of its file system; deleted on drop.
struct Filler(PathBuf);

impl Filler {
    fn take_all(path: PathBuf) -> Self {
        let mut file = std::fs::File::create(&path).expect("create the filler file");
        let chunk = vec![0u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // The last partial page too.
        while file.write(&[0u8]).is_ok_and(|n| n == 1) {}
        Self(path)
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_disk_another_process_fills_refuses_until_it_is_freed_and_loses_nothing() {
    let dir = TempDir::new("diskfull-other");
    let mount = dir.path().join("tmpfs");
    let _tmpfs = Tmpfs::mount(&mount, TMPFS_SIZE);
    // Traces decide at once: while the disk is full, the log's decision and export records
    // and its checkpoint meet ENOSPC themselves.
    let mut tg = start_on(&mount, "100ms");
    let mut load = Load::start(&tg, dir.path(), "10s");
    let mut filler = None;
    let mut freed_at = None;
    let mut refused_while_full = 0.0;
    load.run(&mut tg, |metrics, acked| {
        match (&filler, freed_at) {
            // Fill the disk once tailgate is taking the load.
            (None, None) if acked >= 5 => {
                filler = Some(Filler::take_all(mount.join("filler")));
            }
            // Free it once some requests were refused for it.
            (Some(_), None) => {
                refused_while_full = refused_for_disk(metrics);
                if refused_while_full >= 5.0 * 200.0 {
                    filler = None;
                    freed_at = Some(acked);
                }
            }
            _ => {}
        }
    });
    let acked = load.acked();
    let Some(acked_at_free) = freed_at else {
        panic!(
            "the disk was never freed: {refused_while_full} spans refused for disk_full while \
             another process held it"
        );
    };
    let enospc = tg
        .log()
        .iter()
        .filter(|l| l.contains("No space left on device"))
        .count();
    eprintln!("diskfull: {enospc} log lines name ENOSPC from the log's own writes");
    assert!(
        acked.len() > acked_at_free,
        "nothing was acknowledged after the disk was freed ({acked_at_free} requests before): \
         acceptance never resumed"
    );
    delivers_every_acked_seq_and_stops(tg, &acked);
}
