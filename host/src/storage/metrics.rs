//! The storage log's metrics, `tailgate_storage_*`.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::telemetry::Registry;

pub(crate) struct StorageMetrics {
    pub(crate) bytes: Gauge,
    pub(crate) segments: Gauge,
    pub(crate) watermark_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub(crate) fsync_seconds: Histogram,
    pub(crate) append_seconds: Histogram,
    pub(crate) recovered_spans: Counter,
    pub(crate) reexported_spans: Counter,
    pub(crate) corrupt_records: Counter,
    pub(crate) parked_spans: Gauge,
}

impl StorageMetrics {
    pub(crate) fn new(registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            bytes: registry.register(
                "storage_bytes",
                "Bytes of the storage log on disk (spans and decisions)",
                Gauge::default(),
            ),
            segments: registry.register(
                "storage_segments",
                "Segment files of the storage log",
                Gauge::default(),
            ),
            watermark_age: registry.register(
                "storage_watermark_age_seconds",
                "Age of the oldest record still needed (the low watermark's segment)",
                Gauge::default(),
            ),
            // 50 µs .. ~1.6 s.
            fsync_seconds: registry.register(
                "storage_fsync_seconds",
                "Time to force the log to disk",
                Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            ),
            append_seconds: registry.register(
                "storage_append_seconds",
                "Time from an append's request to its answer, group commit and fsync included",
                Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            ),
            recovered_spans: registry.register(
                "storage_recovered_spans",
                "Spans of undecided traces rebuilt from the log at start",
                Counter::default(),
            ),
            reexported_spans: registry.register(
                "storage_reexported_spans",
                "Kept spans not yet exported at a stop, exported again from the log at start",
                Counter::default(),
            ),
            parked_spans: registry.register(
                "storage_parked_spans",
                "Spans of waiting traces held only in the log, read back when their trace is decided",
                Gauge::default(),
            ),
            corrupt_records: registry.register(
                "storage_corrupt_records",
                "Damaged or torn stretches of the log skipped during replay",
                Counter::default(),
            ),
        })
    }
}
