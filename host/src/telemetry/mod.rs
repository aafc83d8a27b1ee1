//! Self-telemetry: the counters that account for every span, the buffer and exporter gauges,
//! and the admin listener that serves them.
//!
//! The span accounting identity an operator can check on `/metrics` at any quiet moment:
//! `received = kept + dropped + refused`, and `kept = exported + export_failed + queued`.
//! Every code path that takes a span in or lets one go updates exactly one of these counters;
//! nothing else in the host may count spans.

pub mod admin;

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::buffer::Trigger;

type Labels = Vec<(&'static str, String)>;

/// Pre-resolved series of one policy (see [`Metrics::policy_handles`]).
#[derive(Clone)]
pub struct PolicyMetrics {
    pub keep: Counter,
    pub drop: Counter,
    pub abstain: Counter,
    pub invalid_edits: Counter,
    pub quarantined: Counter,
    pub latency: Histogram,
}

/// Why spans were refused back to their sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// Bad trace or span id; reported in `partial_success`.
    InvalidId,
    /// The buffer is full; the sender was told to retry.
    Memory,
    /// The host is shutting down; the sender was told to retry elsewhere.
    ShuttingDown,
}

impl RefusedReason {
    fn as_str(self) -> &'static str {
        match self {
            RefusedReason::InvalidId => "invalid_id",
            RefusedReason::Memory => "memory",
            RefusedReason::ShuttingDown => "shutting_down",
        }
    }
}

/// Every metric the host exports, registered once at start. Hot-path handles are cloned out of
/// their families up front so that counting costs one atomic add.
pub struct Metrics {
    registry: Registry,

    pub spans_received: Family<Labels, Counter>,
    pub requests: Family<Labels, Counter>,
    spans_refused: Family<Labels, Counter>,

    spans_kept_by_trigger: Vec<Counter>,
    spans_dropped_by_trigger: Vec<Counter>,
    pub traces_decided: Family<Labels, Counter>,
    pub late_spans: Family<Labels, Counter>,

    pub buffer_bytes: Gauge,
    pub buffer_spans: Gauge,
    pub buffer_traces: Gauge,
    pub decision_lag: Histogram,

    pub export_queue_spans: Gauge,
    pub exported_spans: Counter,
    pub export_failed_spans: Family<Labels, Counter>,
    pub export_retries: Counter,
    pub export_batches: Family<Labels, Counter>,
    pub export_latency: Histogram,

    policy_calls: Family<Labels, Counter>,
    policy_failures: Family<Labels, Counter>,
    policy_quarantines: Family<Labels, Counter>,
    policy_call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    shadow_agreement: Family<Labels, Counter>,
    spans_trimmed: Family<Labels, Counter>,
    pub reloads: Family<Labels, Counter>,
    pub policy_info: Family<Labels, Gauge>,
    policy_counters: std::sync::OnceLock<Arc<crate::plugin::PolicyCounters>>,
}

fn policy_call_histogram() -> Histogram {
    // 1 µs .. ~65 ms: a policy call is a few µs; the deadline cuts it off far below a second.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 17))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("tailgate");

        let spans_received = Family::<Labels, Counter>::default();
        registry.register(
            "spans_received",
            "Spans received in valid requests, by transport (including spans then refused)",
            spans_received.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "OTLP export requests, by transport and outcome",
            requests.clone(),
        );
        let spans_refused = Family::<Labels, Counter>::default();
        registry.register(
            "spans_refused",
            "Spans refused back to the sender, by reason",
            spans_refused.clone(),
        );
        let spans_kept = Family::<Labels, Counter>::default();
        registry.register(
            "spans_kept",
            "Spans of traces decided keep, by decision trigger",
            spans_kept.clone(),
        );
        let spans_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "spans_dropped",
            "Spans of traces decided drop, by decision trigger",
            spans_dropped.clone(),
        );
        let by_trigger = |family: &Family<Labels, Counter>| -> Vec<Counter> {
            Trigger::ALL
                .iter()
                .map(|t| family.get_or_create_owned(&vec![("trigger", t.as_str().to_owned())]))
                .collect()
        };
        let spans_kept_by_trigger = by_trigger(&spans_kept);
        let spans_dropped_by_trigger = by_trigger(&spans_dropped);

        let traces_decided = Family::<Labels, Counter>::default();
        registry.register(
            "traces_decided",
            "Traces decided, by trigger, verdict and deciding policy",
            traces_decided.clone(),
        );
        let late_spans = Family::<Labels, Counter>::default();
        registry.register(
            "late_spans",
            "Spans that arrived after their trace was decided and followed that decision",
            late_spans.clone(),
        );

        let buffer_bytes = Gauge::default();
        registry.register(
            "buffer_bytes",
            "Bytes held by buffered traces",
            buffer_bytes.clone(),
        );
        let buffer_spans = Gauge::default();
        registry.register(
            "buffer_spans",
            "Spans waiting for their trace's decision",
            buffer_spans.clone(),
        );
        let buffer_traces = Gauge::default();
        registry.register(
            "buffer_traces",
            "Traces waiting for a decision",
            buffer_traces.clone(),
        );
        // 1 ms .. ~65 s: from an immediate cap decision to a full decision_wait.
        let decision_lag = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "decision_lag_seconds",
            "From a trace's root (or last) span arriving to its decision",
            decision_lag.clone(),
        );

        let export_queue_spans = Gauge::default();
        registry.register(
            "export_queue_spans",
            "Kept spans waiting for or in an export",
            export_queue_spans.clone(),
        );
        let exported_spans = Counter::default();
        registry.register(
            "exported_spans",
            "Kept spans delivered downstream",
            exported_spans.clone(),
        );
        let export_failed_spans = Family::<Labels, Counter>::default();
        registry.register(
            "export_failed_spans",
            "Kept spans that could not be delivered, by reason",
            export_failed_spans.clone(),
        );
        let export_retries = Counter::default();
        registry.register(
            "export_retries",
            "Export attempts retried",
            export_retries.clone(),
        );
        let export_batches = Family::<Labels, Counter>::default();
        registry.register(
            "export_batches",
            "Export batches, by outcome",
            export_batches.clone(),
        );
        let export_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "export_latency_seconds",
            "Time to deliver one batch, retries included",
            export_latency.clone(),
        );

        let policy_calls = Family::<Labels, Counter>::default();
        registry.register(
            "policy_calls",
            "Policy calls, by policy and outcome",
            policy_calls.clone(),
        );
        let policy_failures = Family::<Labels, Counter>::default();
        registry.register(
            "policy_failures",
            "Policy calls that failed (trap, timeout, memory, fuel, instantiate), by policy and kind",
            policy_failures.clone(),
        );
        let policy_quarantines = Family::<Labels, Counter>::default();
        registry.register(
            "policy_quarantines",
            "Times a policy was quarantined after repeated failures",
            policy_quarantines.clone(),
        );
        let policy_call_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
                policy_call_histogram,
            );
        registry.register(
            "policy_call_seconds",
            "Duration of one policy decide call",
            policy_call_seconds.clone(),
        );
        let shadow_agreement = Family::<Labels, Counter>::default();
        registry.register(
            "shadow_agreement",
            "Shadow policies' verdicts against the final decision, by policy and result",
            shadow_agreement.clone(),
        );
        let spans_trimmed = Family::<Labels, Counter>::default();
        registry.register(
            "spans_trimmed",
            "Spans removed from kept traces by policies (also counted in spans_dropped)",
            spans_trimmed.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        registry.register("reloads", "Policy set reloads, by outcome", reloads.clone());
        let policy_info = Family::<Labels, Gauge>::default();
        registry.register(
            "policy_info",
            "The live policies: 1 per (policy, sha256, generation)",
            policy_info.clone(),
        );

        Arc::new(Self {
            registry,
            policy_calls,
            policy_failures,
            policy_quarantines,
            policy_call_seconds,
            shadow_agreement,
            spans_trimmed,
            reloads,
            policy_info,
            policy_counters: std::sync::OnceLock::new(),
            spans_received,
            requests,
            spans_refused,
            spans_kept_by_trigger,
            spans_dropped_by_trigger,
            traces_decided,
            late_spans,
            buffer_bytes,
            buffer_spans,
            buffer_traces,
            decision_lag,
            export_queue_spans,
            exported_spans,
            export_failed_spans,
            export_retries,
            export_batches,
            export_latency,
        })
    }

    pub fn received(&self, transport: &'static str, spans: u64) {
        self.spans_received
            .get_or_create(&vec![("transport", transport.to_owned())])
            .inc_by(spans);
    }

    pub fn request(&self, transport: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&vec![
                ("transport", transport.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    pub fn refused(&self, reason: RefusedReason, spans: u64) {
        if spans > 0 {
            self.spans_refused
                .get_or_create(&vec![("reason", reason.as_str().to_owned())])
                .inc_by(spans);
        }
    }

    pub fn kept(&self, trigger: Trigger, spans: u64) {
        self.spans_kept_by_trigger[trigger.index()].inc_by(spans);
    }

    pub fn dropped(&self, trigger: Trigger, spans: u64) {
        self.spans_dropped_by_trigger[trigger.index()].inc_by(spans);
    }

    pub fn decided(&self, trigger: Trigger, keep: bool, policy: &str) {
        self.traces_decided
            .get_or_create(&vec![
                ("trigger", trigger.as_str().to_owned()),
                ("verdict", if keep { "keep" } else { "drop" }.to_owned()),
                ("policy", policy.to_owned()),
            ])
            .inc();
    }

    pub fn late(&self, keep: bool, spans: u64) {
        self.late_spans
            .get_or_create(&vec![(
                "verdict",
                if keep { "keep" } else { "drop" }.to_owned(),
            )])
            .inc_by(spans);
    }

    pub fn export_failed(&self, reason: &'static str, spans: u64) {
        self.export_failed_spans
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc_by(spans);
    }

    pub fn export_batch(&self, outcome: &'static str) {
        self.export_batches
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// One policy's call counters and latency histogram, resolved once so the per-call path
    /// does no label lookup or allocation.
    pub fn policy_handles(&self, policy: &str) -> PolicyMetrics {
        let call = |outcome: &str| {
            self.policy_calls
                .get_or_create(&vec![
                    ("policy", policy.to_owned()),
                    ("outcome", outcome.to_owned()),
                ])
                .clone()
        };
        PolicyMetrics {
            keep: call("keep"),
            drop: call("drop"),
            abstain: call("abstain"),
            invalid_edits: call("invalid_edits"),
            quarantined: call("quarantined"),
            latency: self
                .policy_call_seconds
                .get_or_create(&vec![("policy", policy.to_owned())])
                .clone(),
        }
    }

    pub fn policy_failure(&self, policy: &str, kind: &'static str) {
        self.policy_failures
            .get_or_create(&vec![
                ("policy", policy.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    pub fn policy_quarantined(&self, policy: &str) {
        self.policy_quarantines
            .get_or_create(&vec![("policy", policy.to_owned())])
            .inc();
    }

    pub fn shadow_agreement(&self, policy: &str, agrees: bool) {
        let result = if agrees { "agree" } else { "disagree" };
        self.shadow_agreement
            .get_or_create(&vec![
                ("policy", policy.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    pub fn trimmed(&self, policy: &str, spans: u64) {
        self.spans_trimmed
            .get_or_create(&vec![("policy", policy.to_owned())])
            .inc_by(spans);
    }

    /// Policies' own counters (`counter-add`) are rendered with the host's.
    pub fn attach_policy_counters(&self, counters: Arc<crate::plugin::PolicyCounters>) {
        let _ = self.policy_counters.set(counters);
    }

    /// The registry rendered in the Prometheus/OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        if let Some(counters) = self.policy_counters.get() {
            // Keep `# EOF` last, as OpenMetrics requires.
            let eof = out.rfind("# EOF").unwrap_or(out.len());
            let mut extra = String::new();
            counters.render(&mut extra);
            out.insert_str(eof, &extra);
        }
        out
    }
}
