//! The pipeline's metrics: spans and traces by decision, late spans, what waits in the buffer
//! and how long a decision took to come.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::buffer::{LearnedGrace, LearnedReport};
use crate::telemetry::{CounterFamily, Labels, Registry, label};
use crate::trace::Trigger;

pub(crate) struct PipelineMetrics {
    /// Resolved per trigger up front, so counting a decision costs one atomic add.
    spans_kept_by_trigger: Vec<Counter>,
    spans_dropped_by_trigger: Vec<Counter>,
    traces_decided: CounterFamily,
    late_spans: CounterFamily,
    spans_trimmed: CounterFamily,
    buffer_bytes: Gauge,
    buffer_spans: Gauge,
    buffer_traces: Gauge,
    /// By trigger, resolved up front.
    decision_lag: Vec<Histogram>,
    traces_rescued: CounterFamily,
    spans_rescued: Counter,
    revisable_traces: Gauge,
}

impl PipelineMetrics {
    pub(crate) fn new(registry: &Registry) -> Arc<Self> {
        let by_trigger = |family: CounterFamily| -> Vec<Counter> {
            Trigger::ALL
                .iter()
                .map(|t| family.get_or_create_owned(&label("trigger", t.as_str())))
                .collect()
        };
        Arc::new(Self {
            spans_kept_by_trigger: by_trigger(registry.counters(
                "spans_kept",
                "Spans of traces decided keep, by decision trigger",
            )),
            spans_dropped_by_trigger: by_trigger(registry.counters(
                "spans_dropped",
                "Spans of traces decided drop, by decision trigger",
            )),
            traces_decided: registry.counters(
                "traces_decided",
                "Traces decided, by trigger, verdict and deciding policy",
            ),
            late_spans: registry.counters(
                "late_spans",
                "Spans that arrived after their trace was decided and followed that decision",
            ),
            spans_trimmed: registry.counters(
                "spans_trimmed",
                "Spans removed from kept traces by policies (also counted in spans_dropped)",
            ),
            buffer_bytes: registry.register(
                "buffer_bytes",
                "Bytes held by buffered traces",
                Gauge::default(),
            ),
            buffer_spans: registry.register(
                "buffer_spans",
                "Spans waiting for their trace's decision",
                Gauge::default(),
            ),
            buffer_traces: registry.register(
                "buffer_traces",
                "Traces waiting for a decision",
                Gauge::default(),
            ),
            decision_lag: {
                // 1 ms .. ~65 s: from an immediate cap decision to a full decision_wait.
                let family = registry.register(
                    "decision_lag_seconds",
                    "From a trace's last span arriving to its decision, by trigger",
                    Family::<Labels, Histogram>::new_with_constructor(|| {
                        Histogram::new(exponential_buckets(0.001, 2.0, 17))
                    }),
                );
                (Trigger::ALL.iter())
                    .map(|t| family.get_or_create_owned(&label("trigger", t.as_str())))
                    .collect()
            },
            traces_rescued: registry.counters(
                "traces_rescued",
                "Dropped traces kept after all, within buffer.revision_window, when a late span \
                 changed the verdict; by the policy that kept them",
            ),
            spans_rescued: registry.register(
                "spans_rescued",
                "Spans counted dropped, then kept when their trace was rescued: received = kept + \
                 dropped - rescued + refused",
                Counter::default(),
            ),
            revisable_traces: registry.register(
                "revisable_traces",
                "Traces decided within buffer.revision_window, whose late spans may re-decide them",
                Gauge::default(),
            ),
        })
    }

    /// A dropped trace kept after all by `policy`: `spans` of it had been counted dropped.
    pub(crate) fn rescued(&self, policy: &str, spans: u64) {
        self.traces_rescued
            .get_or_create(&label("policy", policy))
            .inc();
        self.spans_rescued.inc_by(spans);
    }

    pub(crate) fn revisable(&self, delta: i64) {
        self.revisable_traces.inc_by(delta);
    }

    pub(crate) fn kept(&self, trigger: Trigger, spans: u64) {
        self.spans_kept_by_trigger[trigger.index()].inc_by(spans);
    }

    pub(crate) fn dropped(&self, trigger: Trigger, spans: u64) {
        self.spans_dropped_by_trigger[trigger.index()].inc_by(spans);
    }

    /// Counts one decided trace in the worker's `series`, which resolves a series on its
    /// first use only.
    pub(crate) fn decided(
        &self,
        series: &mut DecidedSeries,
        trigger: Trigger,
        keep: bool,
        policy: &Arc<str>,
        lag: Duration,
    ) {
        let by_policy = series.by_verdict(trigger, keep);
        match by_policy.get(&**policy) {
            Some(counter) => {
                counter.inc();
            }
            None => {
                let labels: Labels = vec![
                    ("trigger", trigger.as_str().to_owned()),
                    ("verdict", verdict(keep).to_owned()),
                    ("policy", policy.to_string()),
                ];
                let counter = self.traces_decided.get_or_create_owned(&labels);
                counter.inc();
                by_policy.insert(policy.clone(), counter);
            }
        }
        self.decision_lag[trigger.index()].observe(lag.as_secs_f64());
    }

    pub(crate) fn late(&self, keep: bool, spans: u64) {
        self.late_spans
            .get_or_create(&label("verdict", verdict(keep)))
            .inc_by(spans);
    }

    pub(crate) fn trimmed(&self, policy: &str, spans: u64) {
        self.spans_trimmed
            .get_or_create(&label("policy", policy))
            .inc_by(spans);
    }

    /// Adds one worker's change in what it holds.
    pub(crate) fn buffered(&self, bytes: i64, spans: i64, traces: i64) {
        self.buffer_bytes.inc_by(bytes);
        self.buffer_spans.inc_by(spans);
        self.buffer_traces.inc_by(traces);
    }
}

/// One worker's `traces_decided` series, by trigger, verdict and policy name. Resolving a
/// series in the family builds a label vector of three new strings and hashes it under the
/// family's lock: four allocations and a lock per decided trace, where this costs one lookup
/// of a name. Policy names come from the config, so this holds a few dozen entries at most.
#[derive(Default)]
pub(crate) struct DecidedSeries {
    /// Indexed by `trigger.index() * 2 + keep`.
    by_trigger: Vec<HashMap<Arc<str>, Counter, foldhash::fast::RandomState>>,
}

impl DecidedSeries {
    fn by_verdict(
        &mut self,
        trigger: Trigger,
        keep: bool,
    ) -> &mut HashMap<Arc<str>, Counter, foldhash::fast::RandomState> {
        if self.by_trigger.is_empty() {
            self.by_trigger
                .resize_with(Trigger::ALL.len() * 2, HashMap::default);
        }
        &mut self.by_trigger[trigger.index() * 2 + usize::from(keep)]
    }
}

fn verdict(keep: bool) -> &'static str {
    if keep { "keep" } else { "drop" }
}

/// What the shards learned about arrival, for `/status` and `/metrics`. Each worker publishes
/// its report about once a second; the board shows, per root, the longest grace of any shard.
pub(crate) struct TimingBoard {
    shards: Mutex<Vec<LearnedReport>>,
    graces: Family<Labels, Gauge<f64, AtomicU64>>,
    shown: Mutex<Vec<Labels>>,
    default_grace: Gauge<f64, AtomicU64>,
    idle: Gauge<f64, AtomicU64>,
}

impl TimingBoard {
    pub(crate) fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            shards: Mutex::new(Vec::new()),
            graces: registry.register(
                "root_grace_seconds",
                "The root grace learned per service and root span name (root_grace = \"auto\")",
                Family::default(),
            ),
            shown: Mutex::new(Vec::new()),
            default_grace: registry.register(
                "root_grace_default_seconds",
                "The grace of a root without enough samples of its own",
                Gauge::default(),
            ),
            idle: registry.register(
                "trace_idle_seconds",
                "How long a trace without its root waits after its last span",
                Gauge::default(),
            ),
        })
    }

    pub(crate) fn publish(&self, shard: usize, report: LearnedReport) {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        if shards.len() <= shard {
            shards.resize_with(shard + 1, LearnedReport::default);
        }
        shards[shard] = report;
        let merged = merge(&shards);
        drop(shards);
        self.default_grace.set(merged.grace_seconds);
        self.idle.set(merged.idle_seconds);
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let now: Vec<Labels> = (merged.roots.iter())
            .map(|r| {
                let labels: Labels = vec![("service", r.service.clone()), ("root", r.root.clone())];
                self.graces.get_or_create(&labels).set(r.grace_seconds);
                labels
            })
            .collect();
        for gone in shown.iter().filter(|l| !now.contains(l)) {
            self.graces.remove(gone);
        }
        *shown = now;
    }

    /// The merged report, as `/status` shows it.
    pub(crate) fn status_json(&self) -> serde_json::Value {
        let merged = merge(&self.shards.lock().unwrap_or_else(|e| e.into_inner()));
        let roots: Vec<serde_json::Value> = (merged.roots.iter())
            .map(|r| {
                serde_json::json!({
                    "service": r.service,
                    "root": r.root,
                    "grace_seconds": r.grace_seconds,
                    "samples": r.samples,
                })
            })
            .collect();
        serde_json::json!({
            "root_grace_default_seconds": merged.grace_seconds,
            "trace_idle_seconds": merged.idle_seconds,
            "root_graces": roots,
        })
    }
}

/// The shards' reports as one: the longest wait of any shard, the samples of all.
fn merge(shards: &[LearnedReport]) -> LearnedReport {
    let mut roots: BTreeMap<(String, String), LearnedGrace> = BTreeMap::new();
    let mut out = LearnedReport::default();
    for s in shards {
        out.grace_seconds = out.grace_seconds.max(s.grace_seconds);
        out.idle_seconds = out.idle_seconds.max(s.idle_seconds);
        for r in &s.roots {
            roots
                .entry((r.service.clone(), r.root.clone()))
                .and_modify(|m| {
                    m.grace_seconds = m.grace_seconds.max(r.grace_seconds);
                    m.samples += r.samples;
                })
                .or_insert_with(|| r.clone());
        }
    }
    out.roots = roots.into_values().collect();
    out
}
