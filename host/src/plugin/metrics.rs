//! The sandbox's metrics: policy calls by outcome, failures, quarantines, call latency, shadow
//! agreement, reloads and the live set.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::telemetry::{CounterFamily, Labels, Registry, label};

/// One policy's pre-resolved series, so the per-call path does no label lookup or allocation.
#[derive(Clone)]
pub(crate) struct PolicyHandles {
    pub(crate) keep: Counter,
    pub(crate) drop: Counter,
    pub(crate) abstain: Counter,
    pub(crate) invalid_edits: Counter,
    pub(crate) quarantined: Counter,
    /// Traces whose text attributes were removed because this fail-closed enrichment failed.
    pub(crate) failed_closed: Counter,
    pub(crate) latency: Histogram,
}

pub struct PluginMetrics {
    policy_calls: CounterFamily,
    policy_failures: CounterFamily,
    policy_quarantines: CounterFamily,
    policy_call_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    shadow_agreement: CounterFamily,
    failed_closed: CounterFamily,
    reloads: CounterFamily,
    policy_info: Family<Labels, Gauge>,
}

fn policy_call_histogram() -> Histogram {
    // 1 µs .. ~65 ms: a policy call is a few µs; the deadline cuts it off far below a second.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 17))
}

impl PluginMetrics {
    pub fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            policy_calls: registry.counters(
                "policy_calls",
                "Policy calls, by policy and outcome",
            ),
            policy_failures: registry.counters(
                "policy_failures",
                "Policy calls that failed (trap, timeout, memory, fuel, instantiate), by policy and kind",
            ),
            policy_quarantines: registry.counters(
                "policy_quarantines",
                "Times a policy was quarantined after repeated failures",
            ),
            policy_call_seconds: registry.register(
                "policy_call_seconds",
                "Duration of one policy decide call",
                Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
                    policy_call_histogram,
                ),
            ),
            shadow_agreement: registry.counters(
                "shadow_agreement",
                "Shadow policies' verdicts against the final decision, by policy and result",
            ),
            failed_closed: registry.counters(
                "policy_failed_closed",
                "Kept traces (or late spans) whose text attributes were removed because a fail-closed enrichment failed on them, by policy",
            ),
            reloads: registry.counters("reloads", "Policy set reloads, by outcome"),
            policy_info: registry.register(
                "policy_info",
                "The live policies: 1 per (policy, sha256, generation)",
                Family::<Labels, Gauge>::default(),
            ),
        })
    }

    /// One policy's call counters and latency histogram, resolved once.
    pub(crate) fn policy_handles(&self, policy: &str) -> PolicyHandles {
        let call = |outcome: &str| {
            let labels: Labels = vec![
                ("policy", policy.to_owned()),
                ("outcome", outcome.to_owned()),
            ];
            self.policy_calls.get_or_create(&labels).clone()
        };
        PolicyHandles {
            keep: call("keep"),
            drop: call("drop"),
            abstain: call("abstain"),
            invalid_edits: call("invalid_edits"),
            quarantined: call("quarantined"),
            failed_closed: self
                .failed_closed
                .get_or_create(&label("policy", policy))
                .clone(),
            latency: self
                .policy_call_seconds
                .get_or_create(&label("policy", policy))
                .clone(),
        }
    }

    pub(crate) fn policy_failure(&self, policy: &str, kind: &'static str) {
        let labels: Labels = vec![("policy", policy.to_owned()), ("kind", kind.to_owned())];
        self.policy_failures.get_or_create(&labels).inc();
    }

    pub(crate) fn policy_quarantined(&self, policy: &str) {
        self.policy_quarantines
            .get_or_create(&label("policy", policy))
            .inc();
    }

    pub(crate) fn shadow_agreement(&self, policy: &str, agrees: bool) {
        let result = if agrees { "agree" } else { "disagree" };
        let labels: Labels = vec![("policy", policy.to_owned()), ("result", result.to_owned())];
        self.shadow_agreement.get_or_create(&labels).inc();
    }

    pub(crate) fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&label("outcome", if ok { "ok" } else { "refused" }))
            .inc();
    }

    /// Replaces the live set's info series: one per (policy, sha256, generation).
    pub(crate) fn live_set(&self, generation: u64, policies: &[(&str, &str)]) {
        self.policy_info.clear();
        for (name, sha256) in policies {
            let labels: Labels = vec![
                ("policy", (*name).to_owned()),
                ("sha256", (*sha256).to_owned()),
                ("generation", generation.to_string()),
            ];
            self.policy_info.get_or_create(&labels).set(1);
        }
    }
}
