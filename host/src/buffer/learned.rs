//! What the buffer learns from arrival: how long to wait for a trace's last spans.
//!
//! Three things, each bounded in memory:
//! - **The root grace**, per (service, root span name): the quiet gaps between arrivals at and
//!   after a trace's root. The grace is a high quantile of them (`buffer.grace_quantile`, by
//!   default p99.9), times 1.1 plus 100 ms, between `root_grace_min` and `decision_wait`. A
//!   root whose key has too few samples takes the grace of all roots of the shard; before
//!   that has samples, [`START`] (6 s, above the OpenTelemetry SDKs' 5 s export delay).
//! - **The idle wait** for a trace without a root: the same quantile of the quiet gaps seen
//!   before roots arrived, never below `trace_idle`, at most `decision_wait`; [`START`] or
//!   `trace_idle`, the longer, before it has samples.
//! - **Instrumented callees**, per (service, CLIENT or PRODUCER span name): whether such
//!   spans got a SERVER or CONSUMER child. A trace waits for a missing child only where the
//!   callee was seen instrumented ([`Callees::expects_child`]).
//!
//! What a shard learned is saved with the storage log ([`Learned::save`], [`Learned::restore`])
//! and read back at start, so a restart does not wait out [`START`] again. The callees are not
//! saved: their keys are hashes of this process, and a few traces teach them again.
//!
//! One sample per trace and gap kind: the longest gap it showed. A trace cut too early shows
//! its gap later, as a late span; the pipeline reports that ([`Learned::observe_late`]), so the
//! estimate is not biased towards the traces it got right.
//!
//! Written by hand: the streaming quantile is a log-bucketed histogram (four buckets per
//! octave, from 1 ms to 70 min, 360 bytes) whose counts halve every [`HALVE_AT`] samples, so
//! it follows traffic that changes. The sketch crates on crates.io (DDSketch, t-digest) have
//! no decay and are larger per key.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::trace::Nanos;

const MS: Nanos = 1_000_000;

/// The grace and the idle wait before any sample: above the 5 s every OpenTelemetry SDK's
/// batch span processor waits before it exports.
pub(crate) const START: Nanos = 6_000 * MS;

/// Samples a key needs before its own quantile is used.
const MIN_SAMPLES: u32 = 32;

/// A histogram's counts halve when their total reaches this.
const HALVE_AT: u32 = 8192;

/// Buckets: one for gaps under 1 ms, then four per octave up to 2^22 ms (70 minutes).
const BUCKETS: usize = 1 + 4 * 22;

/// Distinct (service, root name) keys a shard learns; past it, new roots share the shard's
/// estimate of all roots. Keys unused for [`FORGET_AFTER`] are dropped.
const MAX_ROOTS: usize = 1024;
/// Distinct (service, client span name) keys a shard learns.
const MAX_CALLEES: usize = 4096;
const FORGET_AFTER: Nanos = 600 * 1_000 * MS;

/// A streaming, decaying histogram of gaps.
#[derive(Clone)]
pub(crate) struct Gaps {
    counts: [u32; BUCKETS],
    total: u32,
}

impl Default for Gaps {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket_of(gap: Nanos) -> usize {
    if gap < MS {
        return 0;
    }
    let ms = gap as f64 / MS as f64;
    (1 + (ms.log2() * 4.0).floor() as usize).min(BUCKETS - 1)
}

/// The upper edge of a bucket.
fn bucket_top(i: usize) -> Nanos {
    if i == 0 {
        return MS;
    }
    (2f64.powf(i as f64 / 4.0) * MS as f64) as Nanos
}

impl Gaps {
    pub(crate) fn observe(&mut self, gap: Nanos) {
        self.counts[bucket_of(gap)] += 1;
        self.total += 1;
        if self.total >= HALVE_AT {
            self.total = 0;
            for c in &mut self.counts {
                *c /= 2;
                self.total += *c;
            }
        }
    }

    pub(crate) fn samples(&self) -> u32 {
        self.total
    }

    fn counts(&self) -> Vec<u32> {
        self.counts.to_vec()
    }

    /// Counts saved by [`Self::counts`]; a list of another length (another bucket layout)
    /// gives nothing.
    fn from_counts(counts: &[u32]) -> Self {
        let mut gaps = Self::default();
        if counts.len() == BUCKETS {
            gaps.counts.copy_from_slice(counts);
            gaps.total = counts.iter().fold(0u32, |t, c| t.saturating_add(*c));
        }
        gaps
    }

    /// The upper edge of the bucket holding quantile `q`; None with too few samples.
    pub(crate) fn quantile(&self, q: f64) -> Option<Nanos> {
        if self.total < MIN_SAMPLES {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u32).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_top(i));
            }
        }
        Some(bucket_top(BUCKETS - 1))
    }
}

/// How the buffer times its decisions: fixed, or learned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GraceSettings {
    /// None: a fixed grace of `fixed`.
    pub(crate) auto: Option<AutoGrace>,
    pub(crate) fixed: Nanos,
    pub(crate) trace_idle: Nanos,
    pub(crate) decision_wait: Nanos,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AutoGrace {
    pub(crate) min: Nanos,
    pub(crate) quantile: f64,
}

struct RootGaps {
    service: Arc<str>,
    name: Box<str>,
    gaps: Gaps,
    used: Nanos,
}

/// One learned grace, for `/status` and `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnedGrace {
    pub service: String,
    pub root: String,
    pub grace_seconds: f64,
    pub samples: u32,
}

/// What a shard has learned, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LearnedReport {
    /// The grace of a root with too few samples of its own.
    pub grace_seconds: f64,
    pub idle_seconds: f64,
    pub roots: Vec<LearnedGrace>,
}

/// A shard's learned gaps, as saved between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SavedGaps {
    roots: Vec<SavedRoot>,
    all_roots: Vec<u32>,
    before_root: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedRoot {
    service: String,
    root: String,
    gaps: Vec<u32>,
}

/// A shard's learned timing. Time is a parameter, as in the rest of the buffer.
pub(crate) struct Learned {
    settings: GraceSettings,
    roots: HashMap<u64, RootGaps, foldhash::fast::RandomState>,
    all_roots: Gaps,
    before_root: Gaps,
    hasher: foldhash::fast::RandomState,
    pub(crate) callees: Callees,
}

impl Learned {
    pub(crate) fn new(settings: GraceSettings) -> Self {
        Self {
            settings,
            roots: HashMap::default(),
            all_roots: Gaps::default(),
            before_root: Gaps::default(),
            hasher: Default::default(),
            callees: Callees::default(),
        }
    }

    pub(crate) fn key(&self, service: &str, name: &str) -> u64 {
        self.hasher.hash_one((service, name))
    }

    fn bound(&self, auto: AutoGrace, quantile: Option<Nanos>) -> Nanos {
        let grace = match quantile {
            Some(q) => q + q / 10 + 100 * MS,
            None => START,
        };
        grace.clamp(auto.min, self.settings.decision_wait.max(auto.min))
    }

    /// The grace a trace gets when its root (of `service`, named `name`) arrives at `now`;
    /// also the key its gaps are learned under.
    pub(crate) fn grace_for(&mut self, service: &Arc<str>, name: &str, now: Nanos) -> (Nanos, u64) {
        let Some(auto) = self.settings.auto else {
            return (self.settings.fixed, 0);
        };
        let key = self.key(service, name);
        let own = match self.roots.get_mut(&key) {
            Some(r) => {
                r.used = now;
                r.gaps.quantile(auto.quantile)
            }
            None => {
                if self.roots.len() < MAX_ROOTS {
                    self.roots.insert(
                        key,
                        RootGaps {
                            service: service.clone(),
                            name: name.into(),
                            gaps: Gaps::default(),
                            used: now,
                        },
                    );
                }
                None
            }
        };
        let q = own.or_else(|| self.all_roots.quantile(auto.quantile));
        (self.bound(auto, q), key)
    }

    /// How long a trace without its root (or still missing parts) waits after its last span.
    pub(crate) fn idle(&self) -> Nanos {
        let s = &self.settings;
        let Some(auto) = s.auto else {
            return s.trace_idle;
        };
        let learned = match self.before_root.quantile(auto.quantile) {
            Some(q) => q + q / 10 + 100 * MS,
            None => START,
        };
        learned.max(s.trace_idle).min(s.decision_wait)
    }

    /// A decided trace's longest gaps: at or after its root (under `key`), and before it.
    pub(crate) fn observe(
        &mut self,
        key: u64,
        after_root: Option<Nanos>,
        before_root: Option<Nanos>,
    ) {
        if self.settings.auto.is_none() {
            return;
        }
        if let Some(gap) = after_root {
            self.all_roots.observe(gap);
            if let Some(r) = self.roots.get_mut(&key) {
                r.gaps.observe(gap);
            }
        }
        if let Some(gap) = before_root {
            self.before_root.observe(gap);
        }
    }

    /// A span arrived `gap` after the last span of its trace, already decided: the trace had
    /// a root (`rooted`, the gap is one after it) or not (a gap before it).
    pub(crate) fn observe_late(&mut self, key: u64, rooted: bool, gap: Nanos) {
        if rooted {
            self.observe(key, Some(gap), None);
        } else {
            self.observe(key, None, Some(gap));
        }
    }

    /// What this shard learned, to be restored after a restart.
    pub(crate) fn save(&self) -> SavedGaps {
        SavedGaps {
            roots: (self.roots.values())
                .filter(|r| r.gaps.samples() > 0)
                .map(|r| SavedRoot {
                    service: r.service.to_string(),
                    root: r.name.to_string(),
                    gaps: r.gaps.counts(),
                })
                .collect(),
            all_roots: self.all_roots.counts(),
            before_root: self.before_root.counts(),
        }
    }

    /// Takes back what a run before learned, as if used at `now`.
    pub(crate) fn restore(&mut self, saved: SavedGaps, now: Nanos) {
        self.all_roots = Gaps::from_counts(&saved.all_roots);
        self.before_root = Gaps::from_counts(&saved.before_root);
        for r in saved.roots.into_iter().take(MAX_ROOTS) {
            let key = self.key(&r.service, &r.root);
            self.roots.insert(
                key,
                RootGaps {
                    service: Arc::from(r.service),
                    name: r.root.into(),
                    gaps: Gaps::from_counts(&r.gaps),
                    used: now,
                },
            );
        }
    }

    /// Drops keys unused since `now - FORGET_AFTER`.
    pub(crate) fn forget_unused(&mut self, now: Nanos) {
        let since = now.saturating_sub(FORGET_AFTER);
        self.roots.retain(|_, r| r.used >= since);
        self.callees.forget_unused(since);
    }

    pub(crate) fn report(&self) -> LearnedReport {
        let secs = |n: Nanos| n as f64 / 1e9;
        let Some(auto) = self.settings.auto else {
            return LearnedReport {
                grace_seconds: secs(self.settings.fixed),
                idle_seconds: secs(self.settings.trace_idle),
                roots: Vec::new(),
            };
        };
        let mut roots: Vec<LearnedGrace> = (self.roots.values())
            .filter_map(|r| {
                let q = r.gaps.quantile(auto.quantile)?;
                Some(LearnedGrace {
                    service: r.service.to_string(),
                    root: r.name.to_string(),
                    grace_seconds: secs(self.bound(auto, Some(q))),
                    samples: r.gaps.samples(),
                })
            })
            .collect();
        roots.sort_by(|a, b| (&a.service, &a.root).cmp(&(&b.service, &b.root)));
        LearnedReport {
            grace_seconds: secs(self.bound(auto, self.all_roots.quantile(auto.quantile))),
            idle_seconds: secs(self.idle()),
            roots,
        }
    }
}

/// Whether CLIENT and PRODUCER spans, by (service, name), were seen with a SERVER or
/// CONSUMER child: a call into an instrumented service, whose side of the call a trace waits
/// for. A call into what is not instrumented (a database, a hosted model's API) never gets a
/// child, and a trace does not wait for one.
#[derive(Default)]
pub(crate) struct Callees {
    seen: HashMap<u64, Callee, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
}

#[derive(Clone, Copy)]
struct Callee {
    calls: u16,
    served: u16,
    used: Nanos,
}

/// Calls a callee needs before a trace waits for it.
const MIN_CALLS: u16 = 4;

impl Callees {
    pub(crate) fn key(&self, service: &str, name: &str) -> u64 {
        self.hasher.hash_one((service, name))
    }

    /// A call `key` was seen, served (with a child) or not.
    pub(crate) fn observe(&mut self, key: u64, served: bool, now: Nanos) {
        let full = self.seen.len() >= MAX_CALLEES;
        let entry = match self.seen.get_mut(&key) {
            Some(e) => e,
            None if full => return,
            None => self.seen.entry(key).or_insert(Callee {
                calls: 0,
                served: 0,
                used: now,
            }),
        };
        if entry.calls == u16::MAX {
            entry.calls /= 2;
            entry.served /= 2;
        }
        entry.calls += 1;
        entry.served += u16::from(served);
        entry.used = now;
    }

    /// Whether a call `key` without a child yet is worth waiting for: nine in ten of at
    /// least [`MIN_CALLS`] such calls were served.
    pub(crate) fn expects_child(&self, key: u64) -> bool {
        self.seen.get(&key).is_some_and(|c| {
            c.calls >= MIN_CALLS && u32::from(c.served) * 10 >= u32::from(c.calls) * 9
        })
    }

    fn forget_unused(&mut self, since: Nanos) {
        self.seen.retain(|_, c| c.used >= since);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000 * MS;

    fn auto() -> Learned {
        Learned::new(GraceSettings {
            auto: Some(AutoGrace {
                min: S,
                quantile: 0.999,
            }),
            fixed: 2 * S,
            trace_idle: 3 * S,
            decision_wait: 30 * S,
        })
    }

    /// A small deterministic generator for synthetic arrival gaps.
    struct Lcg(u64);
    impl Lcg {
        fn unit(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn the_grace_starts_above_the_sdk_export_delay_and_converges_on_the_gaps_seen() {
        let mut l = auto();
        let svc: Arc<str> = Arc::from("api");
        let (grace, key) = l.grace_for(&svc, "GET /", 0);
        assert_eq!(grace, START);
        const { assert!(START > 5 * S) };
        // Gaps uniform in 0..5 s (two services, 5 s SDK batch delays).
        let mut r = Lcg(7);
        for _ in 0..5000 {
            l.observe(key, Some((r.unit() * 5e9) as Nanos), None);
        }
        let (grace, _) = l.grace_for(&svc, "GET /", 1);
        // p99.9 of U(0, 5 s) is 4.995 s; a bucket edge at most 19 % above it, plus 10 % and
        // 100 ms.
        assert!((5 * S..=6_700 * MS).contains(&grace), "{grace}");
        // The traffic changes to gaps near zero: the old gaps fade as counts halve.
        for _ in 0..100_000 {
            l.observe(key, Some((r.unit() * 50e6) as Nanos), None);
        }
        let (grace, _) = l.grace_for(&svc, "GET /", 2);
        assert_eq!(grace, S, "clamped to root_grace_min");
    }

    #[test]
    fn the_grace_stays_within_its_bounds() {
        let mut l = auto();
        let svc: Arc<str> = Arc::from("api");
        let (_, key) = l.grace_for(&svc, "slow", 0);
        for _ in 0..100 {
            l.observe(key, Some(3_600 * S), None);
        }
        assert_eq!(
            l.grace_for(&svc, "slow", 1).0,
            30 * S,
            "at most decision_wait"
        );
        // Another root of the shard, without samples of its own, takes the shard's estimate.
        assert_eq!(l.grace_for(&svc, "other", 1).0, 30 * S);
        let report = l.report();
        assert_eq!(report.roots.len(), 1);
        assert_eq!(report.roots[0].root, "slow");
        assert_eq!(report.roots[0].grace_seconds, 30.0);
    }

    #[test]
    fn the_idle_wait_covers_the_gaps_before_roots_and_never_goes_below_trace_idle() {
        let mut l = auto();
        assert_eq!(l.idle(), START);
        for _ in 0..100 {
            l.observe(0, None, Some(4 * S));
        }
        let idle = l.idle();
        assert!(idle > 4 * S && idle < 6 * S, "{idle}");
        for _ in 0..50_000 {
            l.observe(0, None, Some(0));
        }
        assert_eq!(l.idle(), 3 * S, "trace_idle is the floor");
    }

    #[test]
    fn a_fixed_grace_learns_nothing() {
        let mut l = Learned::new(GraceSettings {
            auto: None,
            fixed: 2 * S,
            trace_idle: 10 * S,
            decision_wait: 30 * S,
        });
        let svc: Arc<str> = Arc::from("api");
        for _ in 0..100 {
            l.observe(0, Some(20 * S), Some(20 * S));
        }
        assert_eq!(l.grace_for(&svc, "x", 0).0, 2 * S);
        assert_eq!(l.idle(), 10 * S);
    }

    #[test]
    fn a_callee_is_waited_for_only_once_seen_instrumented() {
        let mut c = Callees::default();
        let (db, tool) = (c.key("agent", "SELECT"), c.key("agent", "POST /tool"));
        for i in 0..10 {
            c.observe(db, false, i);
            c.observe(tool, true, i);
        }
        assert!(!c.expects_child(db));
        assert!(c.expects_child(tool));
        assert!(!c.expects_child(c.key("agent", "never seen")));
    }

    #[test]
    fn what_was_learned_is_restored_after_a_restart() {
        let mut l = auto();
        let svc: Arc<str> = Arc::from("api");
        let (_, key) = l.grace_for(&svc, "GET /", 0);
        for _ in 0..100 {
            l.observe(key, Some(3 * S), Some(4 * S));
        }
        let before = (l.grace_for(&svc, "GET /", 1).0, l.idle());
        let text = serde_json::to_string(&l.save()).unwrap();
        let mut again = auto();
        assert_eq!(again.grace_for(&svc, "GET /", 0).0, START);
        again.restore(serde_json::from_str(&text).unwrap(), 0);
        assert_eq!((again.grace_for(&svc, "GET /", 1).0, again.idle()), before);
        // A file of another layout restores nothing, and breaks nothing.
        let mut other = auto();
        other.restore(
            serde_json::from_str(r#"{"roots":[],"all_roots":[1,2],"before_root":[]}"#).unwrap(),
            0,
        );
        assert_eq!(other.idle(), START);
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = auto();
        let svc: Arc<str> = Arc::from("api");
        for i in 0..(MAX_ROOTS as u64 + 500) {
            l.grace_for(&svc, &format!("root-{i}"), i);
        }
        assert_eq!(l.roots.len(), MAX_ROOTS);
        l.forget_unused(FORGET_AFTER + 600);
        assert!(l.roots.len() < MAX_ROOTS);
        assert_eq!(std::mem::size_of::<Gaps>(), 4 * (BUCKETS + 1));
    }
}
