//! `noise-trim`: an enrichment that trims noise from kept traces: leaf spans
//! shorter than `min_ms` that did not fail (cache hits, tiny internal steps).
//! It never keeps or drops anything itself: its decision is always abstain,
//! with the trims as span removals, which the host applies only if the trace
//! is kept.
//!
//! A span is trimmed when all of these hold:
//! - its duration is strictly less than `min_ms`;
//! - it is a leaf: no span of the trace names it as parent;
//! - its parent is in the trace. This spares the root, extra parentless
//!   spans, and a lone span whose parent never arrived (trimming it would
//!   hide that that part of the trace arrived at all);
//! - its status is not error;
//! - its name is not in `keep_names`.
//!
//! Only leaves present when the trace arrived are trimmed: a parent whose
//! children are all trimmed stays (the host checks removals against the
//! trace as it arrived, and a non-leaf removal rejects every edit).
//!
//! Config:
//! - `min_ms` (number, default `5`, finite and >= 0, fractions allowed);
//!   `0` trims nothing.
//! - `keep_names` (list of strings, default `[]`): span names never trimmed.
//! - `max_removals` (integer, default `256`, >= 1): at most this many spans
//!   trimmed per trace, the first in index order. The host (as of this
//!   writing) bounds a verdict's patches, not its removals, by `max_patches`
//!   (default 256, `host/src/config.rs`); the default keeps the removal list
//!   within that too, should the host ever count removals against it. Raise
//!   it for very wide traces.
//!
//! Counter: `noise_trimmed_spans` (no labels; `/metrics`:
//! `tailgate_policy_noise_trimmed_spans_total`), the number of spans put in
//! span removals. Meant for the host's `mode = "enrich"`, which runs the
//! policy only on traces the chain keeps, so the counter is what was trimmed.
//! In another mode it counts proposed trims, including on traces then
//! dropped.
//!
//! Cost in Wasm host calls: 1 (summary) + 1 (`durations`); when some span is
//! short, + 1 (`parents`) + 1 (`statuses`, only when the trace has errors) +
//! 1 `count-name` per `keep_names` entry, and only when one of those names
//! is in the trace, 1 `name` per otherwise trimmable span; + 1
//! `counter-add` when anything is trimmed.

use serde::Deserialize;
use tailgate_plugin_sdk::{Policy, StatusCode, Trace, Verdict, export_policy, host};

/// Counter of trimmed spans (`tailgate_policy_noise_trimmed_spans_total`).
pub const COUNTER: &str = "noise_trimmed_spans";

fn default_min_ms() -> f64 {
    5.0
}

/// The host's default `max_patches` (`host/src/config.rs`).
fn default_max_removals() -> u32 {
    256
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_min_ms")]
    pub min_ms: f64,
    #[serde(default)]
    pub keep_names: Vec<String>,
    #[serde(default = "default_max_removals")]
    pub max_removals: u32,
}

pub struct NoiseTrim {
    min_ns: u64,
    keep_names: Vec<String>,
    max_removals: usize,
}

impl Policy for NoiseTrim {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if !(c.min_ms.is_finite() && c.min_ms >= 0.0) {
            return Err(format!(
                "min_ms must be a finite number >= 0, got {}",
                c.min_ms
            ));
        }
        if c.max_removals == 0 {
            return Err("max_removals must be at least 1".to_owned());
        }
        Ok(NoiseTrim {
            // Integer nanoseconds, as the host measures; `as` saturates.
            min_ns: (c.min_ms * 1e6).round() as u64,
            keep_names: c.keep_names,
            max_removals: c.max_removals as usize,
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let mut verdict = Verdict::abstain();
        let summary = *trace.summary();
        // One span is the root or a lone fragment: never trimmed.
        if summary.span_count < 2 || self.min_ns == 0 {
            return verdict;
        }
        let durations = trace.durations();
        if !durations.iter().any(|&d| d < self.min_ns) {
            return verdict;
        }
        let parents = trace.parents();
        let statuses = (summary.error_count > 0).then(|| trace.statuses());
        // Ask for names only if a protected name is in the trace at all.
        let check_names = self.keep_names.iter().any(|n| trace.count_name(n) > 0);
        for span in trace.spans() {
            let i = span.index() as usize;
            if durations[i] >= self.min_ns
                || parents[i].is_none()
                || !span.is_leaf()
                || statuses.is_some_and(|s| s[i] == StatusCode::Error)
                || (check_names && self.keep_names.contains(&span.name()))
            {
                continue;
            }
            verdict.remove_spans.push(span.index());
            if verdict.remove_spans.len() == self.max_removals {
                break;
            }
        }
        if !verdict.remove_spans.is_empty() {
            host::counter_add(COUNTER, &[], verdict.remove_spans.len() as f64);
        }
        verdict
    }
}

export_policy!(NoiseTrim);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> NoiseTrim {
        testing::init::<NoiseTrim>(config).unwrap()
    }

    fn err(config: &str) -> String {
        testing::init::<NoiseTrim>(config).err().unwrap()
    }

    /// Decide, check the verdict as the host would, and return the removals.
    fn trimmed(p: &mut NoiseTrim, t: &Trace) -> Vec<u32> {
        let v = testing::decide(p, t);
        testing::check_verdict(t, &v).unwrap();
        assert!(v.is_abstain(), "{v:?}");
        assert!(v.patches.is_empty());
        v.remove_spans
    }

    /// root (100 ms) -> step (50 ms) -> {cache 1 ms, db 20 ms}; root -> log 2 ms.
    fn agent() -> TraceBuilder {
        TraceBuilder::new()
            .span("agent.run")
            .duration_ms(100)
            .span("step")
            .child_of(0)
            .duration_ms(50)
            .span("cache.get")
            .child_of(1)
            .duration_ms(1)
            .span("db.query")
            .child_of(1)
            .duration_ms(20)
            .span("log")
            .child_of(0)
            .duration_ms(2)
    }

    #[test]
    fn trims_short_leaves_and_counts_them() {
        let trace = agent().build();
        assert_eq!(trimmed(&mut policy("{}"), &trace), vec![2, 4]);
        assert_eq!(testing::counter(COUNTER, &[]), 2.0);
    }

    #[test]
    fn the_threshold_is_exclusive_and_fractions_work() {
        let t = |us| {
            TraceBuilder::new()
                .span("root")
                .duration_ms(10)
                .span("leaf")
                .child_of(0)
                .duration_us(us)
                .build()
        };
        let mut p = policy("{}");
        assert_eq!(trimmed(&mut p, &t(4_999)), vec![1]);
        assert!(trimmed(&mut p, &t(5_000)).is_empty());
        let mut half = policy(r#"{"min_ms": 0.5}"#);
        assert_eq!(trimmed(&mut half, &t(499)), vec![1]);
        assert!(trimmed(&mut half, &t(500)).is_empty());
    }

    #[test]
    fn never_trims_a_short_root() {
        let lone = TraceBuilder::new().span("root").duration_us(1).build();
        assert!(trimmed(&mut policy("{}"), &lone).is_empty());
        // A short root with a (long) child is not a leaf either way; a
        // short root among several parentless spans is still spared.
        let roots = TraceBuilder::new()
            .span("root")
            .duration_us(1)
            .span("second-root")
            .offset_ms(1)
            .duration_us(1)
            .build();
        assert!(trimmed(&mut policy("{}"), &roots).is_empty());
        assert_eq!(testing::counter(COUNTER, &[]), 0.0);
    }

    #[test]
    fn never_trims_a_span_with_children_even_if_short() {
        let trace = TraceBuilder::new()
            .span("root")
            .duration_ms(100)
            .span("fast-parent")
            .child_of(0)
            .duration_us(10)
            .span("slow-child")
            .child_of(1)
            .duration_ms(50)
            .build();
        assert!(trimmed(&mut policy("{}"), &trace).is_empty());
    }

    #[test]
    fn never_trims_an_error_leaf() {
        let trace = agent().span("failed.lookup").child_of(1).error().build();
        assert_eq!(trimmed(&mut policy("{}"), &trace), vec![2, 4]);
    }

    #[test]
    fn never_trims_a_lone_span_whose_parent_is_missing() {
        let trace = agent()
            .span("late.fragment")
            .missing_parent()
            .duration_us(3)
            .build();
        assert_eq!(trimmed(&mut policy("{}"), &trace), vec![2, 4]);
    }

    #[test]
    fn keep_names_are_never_trimmed() {
        let mut p = policy(r#"{"keep_names": ["log", "not.in.trace"]}"#);
        assert_eq!(trimmed(&mut p, &agent().build()), vec![2]);
        let mut absent = policy(r#"{"keep_names": ["not.in.trace"]}"#);
        assert_eq!(trimmed(&mut absent, &agent().build()), vec![2, 4]);
    }

    #[test]
    fn max_removals_caps_the_list_in_index_order() {
        let mut b = TraceBuilder::new().span("root").duration_ms(100);
        for k in 0..10 {
            b = b.span(format!("tick-{k}")).child_of(0);
        }
        let trace = b.build();
        assert_eq!(
            trimmed(&mut policy(r#"{"max_removals": 3}"#), &trace),
            vec![1, 2, 3]
        );
        assert_eq!(testing::counter(COUNTER, &[]), 3.0);
        assert_eq!(trimmed(&mut policy("{}"), &trace).len(), 10);
    }

    #[test]
    fn nothing_short_or_zero_threshold_trims_nothing() {
        let mut p = policy(r#"{"min_ms": 0.5}"#);
        assert!(trimmed(&mut p, &agent().build()).is_empty());
        assert!(trimmed(&mut policy(r#"{"min_ms": 0}"#), &agent().build()).is_empty());
        assert!(trimmed(&mut policy("{}"), &TraceBuilder::new().build()).is_empty());
        assert!(testing::counters().is_empty());
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        assert!(err(r#"{"min_ms": -1}"#).contains("min_ms"));
        assert!(err(r#"{"max_removals": 0}"#).contains("max_removals"));
        assert!(err(r#"{"max_removals": -1}"#).contains("invalid config"));
        assert!(err(r#"{"keep": ["x"]}"#).contains("keep"));
    }
}
