//! The pipeline's metrics: spans and traces by decision, late spans, what waits in the buffer
//! and how long a decision took to come.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

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
    decision_lag: Histogram,
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
            // 1 ms .. ~65 s: from an immediate cap decision to a full decision_wait.
            decision_lag: registry.register(
                "decision_lag_seconds",
                "From a trace's root (or last) span arriving to its decision",
                Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            ),
        })
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
        self.decision_lag.observe(lag.as_secs_f64());
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
