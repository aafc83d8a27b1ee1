//! The exporter's metrics: the queue, delivered and failed spans, retries, batches, latency.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::telemetry::{CounterFamily, Registry, label};

pub(crate) struct ExportMetrics {
    pub(super) queue_spans: Gauge,
    pub(super) spilled_spans: Gauge,
    pub(super) spilled_total: Counter,
    pub(super) exported_spans: Counter,
    failed_spans: CounterFamily,
    pub(super) retries: Counter,
    batches: CounterFamily,
    pub(super) latency: Histogram,
}

impl ExportMetrics {
    pub(crate) fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            queue_spans: registry.register(
                "export_queue_spans",
                "Kept spans waiting for or in an export",
                Gauge::default(),
            ),
            spilled_spans: registry.register(
                "export_queue_spilled_spans",
                "Kept spans of the export queue that wait in the storage log, not in memory",
                Gauge::default(),
            ),
            spilled_total: registry.register(
                "export_spilled_spans",
                "Kept spans moved from the export queue's memory to the storage log",
                Counter::default(),
            ),
            exported_spans: registry.register(
                "exported_spans",
                "Kept spans delivered downstream",
                Counter::default(),
            ),
            failed_spans: registry.counters(
                "export_failed_spans",
                "Kept spans that could not be delivered, by reason",
            ),
            retries: registry.register(
                "export_retries",
                "Export attempts retried",
                Counter::default(),
            ),
            batches: registry.counters("export_batches", "Export batches, by outcome"),
            // 0.5 ms .. ~16 s: a local write to a backend retried for a while.
            latency: registry.register(
                "export_latency_seconds",
                "Time to deliver one batch, retries included",
                Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
        })
    }

    pub(super) fn failed(&self, reason: &'static str, spans: u64) {
        self.failed_spans
            .get_or_create(&label("reason", reason))
            .inc_by(spans);
    }

    pub(super) fn batch(&self, outcome: &'static str) {
        self.batches.get_or_create(&label("outcome", outcome)).inc();
    }
}
