//! `adaptive-latency`: keep traces slower than what is usual for their kind of
//! request: slower than the `percentile` of recent trace durations among
//! traces with the same root span name. Abstain otherwise.
//!
//! The duration is the summary's (latest span end minus earliest span start).
//! Each root span name learns its own threshold from its last `window`
//! traces (exact nearest-rank quantile, see `tailgate_plugin_sdk::stats`);
//! a trace is judged against the window as it was before the trace joined
//! it, and every non-empty trace joins it, kept or not. Traces whose root
//! never arrived share the key `""`. Root names beyond `max_keys` share one
//! overflow window.
//!
//! Until a root name has seen `warmup` traces there is no threshold to trust,
//! so its traces are all kept, with reason [`REASON_WARMUP`]. State is per
//! policy instance, and the host runs one instance per worker thread: each
//! worker warms up on its own, so expect up to `warmup` × root names ×
//! workers warm-up keeps after a start or reload.
//!
//! Config (all optional):
//! - `percentile` (number in (0, 1], default 0.95): the quantile a trace must
//!   exceed; the reason on kept traces is derived from it (`slow_p95`,
//!   `slow_p99`, `slow_p99.9`).
//! - `warmup` (integer, default 100): traces a root name must have seen
//!   before its traces are judged.
//! - `window` (integer, 1..=65536, default 1024): traces remembered per root
//!   name.
//! - `max_keys` (integer, default 256; 0 = one window for all root names):
//!   root names with their own window. `window * (max_keys + 1)` must be at
//!   most 524288 (8 MiB of windows, at 16 bytes a trace).
//! - `min_ms` (number >= 0, default 0): traces shorter than this are never
//!   kept by this policy, not even during warm-up (they are still learned
//!   from).
//!
//! Empty traces (no spans) abstain and are not learned from.
//!
//! Cost in Wasm: two host calls per trace (the summary, then the root span's
//! name); learning is a binary search and a short `memmove` in the window.

use serde::Deserialize;
use tailgate_plugin_sdk::stats::{
    DEFAULT_MAX_KEYS, DEFAULT_WARMUP, DEFAULT_WINDOW, Judgement, KeyedQuantiles, QuantileSettings,
    percentile_label,
};
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy};

/// Reason on traces kept because their root name is still warming up.
pub const REASON_WARMUP: &str = "latency_warmup";

/// The default `percentile`.
pub const DEFAULT_PERCENTILE: f64 = 0.95;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    #[serde(default)]
    pub min_ms: f64,
}

fn default_percentile() -> f64 {
    DEFAULT_PERCENTILE
}
fn default_warmup() -> u64 {
    DEFAULT_WARMUP
}
fn default_window() -> usize {
    DEFAULT_WINDOW
}
fn default_max_keys() -> usize {
    DEFAULT_MAX_KEYS
}

pub struct AdaptiveLatency {
    durations: KeyedQuantiles,
    min_ns: u64,
    /// `slow_p95` and the like, built once.
    reason: String,
}

impl Policy for AdaptiveLatency {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if !(c.min_ms.is_finite() && c.min_ms >= 0.0) {
            return Err(format!(
                "min_ms must be a finite number >= 0, got {}",
                c.min_ms
            ));
        }
        let durations = KeyedQuantiles::new(QuantileSettings {
            percentile: c.percentile,
            window: c.window,
            warmup: c.warmup,
            max_keys: c.max_keys,
        })?;
        Ok(AdaptiveLatency {
            durations,
            // Integer nanoseconds, as the host measures; `as` saturates.
            min_ns: (c.min_ms * 1e6).round() as u64,
            reason: format!("slow_{}", percentile_label(c.percentile)),
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let summary = trace.summary();
        if summary.span_count == 0 {
            return Verdict::abstain();
        }
        let duration_ns = summary.duration_ns;
        let judgement = self
            .durations
            .check_and_observe(&trace.root_name(), duration_ns as f64);
        if duration_ns < self.min_ns {
            return Verdict::abstain();
        }
        match judgement {
            Judgement::WarmingUp => Verdict::keep(REASON_WARMUP),
            Judgement::Judged { above: true, .. } => Verdict::keep(self.reason.as_str()),
            Judgement::Judged { above: false, .. } | Judgement::Ignored => Verdict::abstain(),
        }
    }
}

export_policy!(AdaptiveLatency);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> AdaptiveLatency {
        testing::init::<AdaptiveLatency>(config).unwrap()
    }

    fn trace(root: &str, ms: u64) -> Trace {
        TraceBuilder::new()
            .span(root)
            .duration_ms(ms)
            .span("db")
            .child_of(0)
            .duration_ms(ms / 2)
            .build()
    }

    fn decide(p: &mut AdaptiveLatency, t: &Trace) -> Verdict {
        let v = testing::decide(p, t);
        testing::check_verdict(t, &v).unwrap();
        v
    }

    /// Feed `root` the durations 1..=100 ms, in a scrambled order.
    fn learn(p: &mut AdaptiveLatency, root: &str) {
        for i in 0..100 {
            decide(p, &trace(root, (i * 37) % 100 + 1));
        }
    }

    #[test]
    fn warm_up_keeps_everything_then_only_the_slow_tail() {
        let mut p = policy("{}");
        for i in 0..100 {
            let v = decide(&mut p, &trace("GET /cart", (i * 37) % 100 + 1));
            assert!(v.is_keep(), "trace {i} during warm-up");
            assert_eq!(v.reason, REASON_WARMUP);
        }
        // Learned 1..=100 ms: p95 is 95 ms; slower is kept.
        let slow = decide(&mut p, &trace("GET /cart", 96));
        assert!(slow.is_keep());
        assert_eq!(slow.reason, "slow_p95");
        assert!(decide(&mut p, &trace("GET /cart", 95)).is_abstain());
        assert!(decide(&mut p, &trace("GET /cart", 20)).is_abstain());
    }

    #[test]
    fn each_root_name_learns_its_own_threshold() {
        let mut p = policy(r#"{"warmup": 100}"#);
        learn(&mut p, "GET /cart");
        // 50 ms is fast for the cart but a new root name is still warming up.
        assert!(decide(&mut p, &trace("GET /cart", 50)).is_abstain());
        assert_eq!(
            decide(&mut p, &trace("GET /search", 50)).reason,
            REASON_WARMUP
        );
        for _ in 0..100 {
            decide(&mut p, &trace("GET /search", 5));
        }
        // 6 ms is slow for search, nowhere near slow for the cart.
        assert!(decide(&mut p, &trace("GET /search", 6)).is_keep());
        assert!(decide(&mut p, &trace("GET /cart", 6)).is_abstain());
    }

    #[test]
    fn the_reason_follows_the_percentile() {
        let mut p = policy(r#"{"percentile": 0.99, "warmup": 10}"#);
        learn(&mut p, "r");
        // p99 of 1..=100 is 99.
        assert!(decide(&mut p, &trace("r", 99)).is_abstain());
        assert_eq!(decide(&mut p, &trace("r", 100)).reason, "slow_p99");
        let p = policy(r#"{"percentile": 0.999}"#);
        assert_eq!(p.reason, "slow_p99.9");
    }

    #[test]
    fn min_ms_is_a_floor_even_in_warm_up() {
        let mut p = policy(r#"{"min_ms": 30, "warmup": 10}"#);
        // Warm-up keeps only what reaches the floor.
        assert!(decide(&mut p, &trace("r", 29)).is_abstain());
        assert!(decide(&mut p, &trace("r", 30)).is_keep());
        learn(&mut p, "r");
        // Fast traces are learned from: the p95 is still about 95 ms.
        assert!(decide(&mut p, &trace("r", 94)).is_abstain());
        assert!(decide(&mut p, &trace("r", 97)).is_keep());
        // With a floor above the p95, nothing under the floor is kept.
        let mut high = policy(r#"{"min_ms": 200, "warmup": 10}"#);
        learn(&mut high, "r");
        assert!(decide(&mut high, &trace("r", 150)).is_abstain());
        assert!(decide(&mut high, &trace("r", 250)).is_keep());
    }

    #[test]
    fn the_threshold_moves_with_the_traffic() {
        let mut p = policy(r#"{"window": 100, "warmup": 100}"#);
        learn(&mut p, "r");
        assert!(decide(&mut p, &trace("r", 200)).is_keep());
        // After 100 traces of 200..300 ms, 200 ms is ordinary.
        for i in 0..100 {
            decide(&mut p, &trace("r", 200 + i));
        }
        assert!(decide(&mut p, &trace("r", 200)).is_abstain());
        assert!(decide(&mut p, &trace("r", 400)).is_keep());
    }

    #[test]
    fn root_names_beyond_max_keys_share_a_window() {
        let mut p = policy(r#"{"max_keys": 1, "warmup": 100}"#);
        learn(&mut p, "a");
        // "b" and "c" both overflow: "b" warms the shared window up for "c".
        for _ in 0..100 {
            decide(&mut p, &trace("b", 10));
        }
        assert!(decide(&mut p, &trace("c", 11)).is_keep());
        assert!(decide(&mut p, &trace("c", 10)).is_abstain());
        assert_eq!(p.durations.key_count(), 1);
    }

    #[test]
    fn rootless_traces_share_a_key_and_empty_traces_are_ignored() {
        let mut p = policy(r#"{"warmup": 2}"#);
        let rootless = |ms| {
            TraceBuilder::new()
                .span("orphan")
                .missing_parent()
                .duration_ms(ms)
                .build()
        };
        assert!(decide(&mut p, &rootless(10)).is_keep());
        assert!(decide(&mut p, &rootless(10)).is_keep());
        assert!(decide(&mut p, &rootless(10)).is_abstain());
        assert!(decide(&mut p, &rootless(11)).is_keep());
        let empty = TraceBuilder::new().build();
        assert!(decide(&mut p, &empty).is_abstain());
        assert_eq!(p.durations.get("").unwrap().seen(), 4);
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        for (bad, key) in [
            (r#"{"percentile": 0}"#, "percentile"),
            (r#"{"percentile": 1.5}"#, "percentile"),
            (r#"{"window": 0}"#, "window"),
            (r#"{"window": 100000}"#, "window"),
            (r#"{"window": 4096, "max_keys": 1000}"#, "max_keys"),
            (r#"{"min_ms": -1}"#, "min_ms"),
            (r#"{"percentil": 0.9}"#, "percentil"),
        ] {
            let err = testing::init::<AdaptiveLatency>(bad).err().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
        // Type errors come from serde, which says what it expected but not
        // where: still refused.
        assert!(testing::init::<AdaptiveLatency>(r#"{"warmup": -1}"#).is_err());
    }
}
