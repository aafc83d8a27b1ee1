//! Self-telemetry: the registry every stage registers its own metrics with, and the admin
//! listener that serves them with the host's health.
//!
//! The span accounting identity an operator can check on `/metrics` at any quiet moment:
//! `received = kept + dropped − rescued + refused`, and `kept = exported + export_failed + queued`.
//! The receivers count `received` and `refused`, the pipeline `kept` and `dropped`, the
//! exporter the rest; every code path that takes a span in or lets one go updates exactly one
//! of these counters, but a rescue: it keeps spans counted dropped before, and counts them in
//! `rescued` too, since counters never go down.
//!
//! Owns the registry and the admin listener's routes for metrics and health. Must never import
//! a stage: stages are told nothing by telemetry, they tell it, through metrics they register.

pub(crate) mod admin;

use std::sync::Arc;

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Metric;

/// Label sets of the host's metric families: fixed keys, values from the data.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// A counter family with string labels.
pub(crate) type CounterFamily = Family<Labels, Counter>;

/// Every metric of the host, under the `tailgate_` prefix. Stages register at start; the admin
/// listener renders on each scrape.
#[derive(Debug)]
pub struct Registry {
    inner: RwLock<prometheus_client::registry::Registry>,
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: RwLock::new(prometheus_client::registry::Registry::with_prefix(
                "tailgate",
            )),
        })
    }

    /// Registers `metric` as `tailgate_<name>` and hands it back, so a stage can keep the
    /// handle it counts with.
    pub(crate) fn register<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        self.inner.write().register(name, help, metric.clone());
        metric
    }

    /// A counter family registered as `tailgate_<name>`.
    pub(crate) fn counters(&self, name: &str, help: &str) -> CounterFamily {
        self.register(name, help, CounterFamily::default())
    }

    /// Registers metrics that are computed on each scrape.
    pub(crate) fn register_collector(&self, collector: Box<dyn Collector>) {
        self.inner.write().register_collector(collector);
    }

    /// The value of one series (`name{labels}` as rendered), 0 when absent: for tests.
    #[cfg(test)]
    pub(crate) fn value(&self, series: &str) -> f64 {
        self.render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The registry rendered in the OpenMetrics text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.read());
        out
    }
}

/// One label, for a family's `get_or_create`.
pub(crate) fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_owned())]
}
