//! The receivers' metrics: spans and metric data points received and refused, requests by
//! outcome.

use std::sync::Arc;

use crate::telemetry::{CounterFamily, Labels, Registry, label};

/// Why spans were refused back to their sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusedReason {
    /// Bad trace or span id; reported in `partial_success`.
    InvalidId,
    /// The buffer (for metrics: the memory queue, with no storage log) is full; the sender was
    /// told to retry.
    Memory,
    /// The host is shutting down; the sender was told to retry elsewhere.
    ShuttingDown,
    /// The storage log is full (`storage.max_bytes` or the disk itself); the sender was told
    /// to retry.
    DiskFull,
}

impl RefusedReason {
    fn as_str(self) -> &'static str {
        match self {
            RefusedReason::InvalidId => "invalid_id",
            RefusedReason::Memory => "memory",
            RefusedReason::ShuttingDown => "shutting_down",
            RefusedReason::DiskFull => "disk_full",
        }
    }
}

pub struct ReceiverMetrics {
    spans_received: CounterFamily,
    requests: CounterFamily,
    spans_refused: CounterFamily,
    points_received: CounterFamily,
    points_refused: CounterFamily,
}

impl ReceiverMetrics {
    pub fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            spans_received: registry.counters(
                "spans_received",
                "Spans received in valid requests, by transport (including spans then refused)",
            ),
            requests: registry
                .counters("requests", "OTLP export requests, by transport and outcome"),
            spans_refused: registry.counters(
                "spans_refused",
                "Spans refused back to the sender, by reason",
            ),
            points_received: registry.counters(
                "metric_points_received",
                "Metric data points received in valid requests, by transport (including points then refused)",
            ),
            points_refused: registry.counters(
                "metric_points_refused",
                "Metric data points refused back to the sender, by reason",
            ),
        })
    }

    pub(crate) fn received(&self, transport: &'static str, spans: u64) {
        self.spans_received
            .get_or_create(&label("transport", transport))
            .inc_by(spans);
    }

    pub(crate) fn request(&self, transport: &'static str, outcome: &'static str) {
        let labels: Labels = vec![
            ("transport", transport.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        self.requests.get_or_create(&labels).inc();
    }

    pub(crate) fn points_received(&self, transport: &'static str, points: u64) {
        self.points_received
            .get_or_create(&label("transport", transport))
            .inc_by(points);
    }

    pub(crate) fn points_refused(&self, reason: RefusedReason, points: u64) {
        if points > 0 {
            self.points_refused
                .get_or_create(&label("reason", reason.as_str()))
                .inc_by(points);
        }
    }

    pub(crate) fn refused(&self, reason: RefusedReason, spans: u64) {
        if spans > 0 {
            self.spans_refused
                .get_or_create(&label("reason", reason.as_str()))
                .inc_by(spans);
        }
    }
}
