//! `latency`: keep traces whose duration (latest span end minus earliest span
//! start, across all spans) is at least `threshold_ms`; abstain otherwise.
//!
//! Config: `threshold_ms` (number, required, >= 0; fractions allowed).
//!
//! Cost in Wasm: one host call (the duration is in the precomputed summary).

use serde::Deserialize;
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy};

/// Reason stamped on kept traces (`sampling.reason`).
pub const REASON: &str = "slow";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub threshold_ms: f64,
}

pub struct Latency {
    threshold_ns: u64,
}

impl Policy for Latency {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if !(c.threshold_ms.is_finite() && c.threshold_ms >= 0.0) {
            return Err(format!(
                "threshold_ms must be a finite number >= 0, got {}",
                c.threshold_ms
            ));
        }
        // Compare in integer nanoseconds, as the host measures; `as` saturates
        // absurdly large thresholds to "never".
        Ok(Latency {
            threshold_ns: (c.threshold_ms * 1e6).round() as u64,
        })
    }

    // Decided from the summary alone, in batches.
    const SUMMARY_ONLY: bool = true;

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.span_count() > 0 && trace.duration_ns() >= self.threshold_ns {
            Verdict::keep(REASON)
        } else {
            Verdict::abstain()
        }
    }
}

export_policy!(Latency);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(threshold_ms: f64) -> Latency {
        testing::init::<Latency>(&format!(r#"{{"threshold_ms": {threshold_ms}}}"#)).unwrap()
    }

    #[test]
    fn keeps_at_and_above_the_threshold_and_abstains_below() {
        let mut p = policy(100.0);
        let at = TraceBuilder::new().span("a").duration_ms(100).build();
        let above = TraceBuilder::new().span("a").duration_ms(250).build();
        let below = TraceBuilder::new().span("a").duration_us(99_999).build();
        assert!(testing::decide(&mut p, &at).is_keep());
        assert_eq!(testing::decide(&mut p, &above).reason, REASON);
        assert!(testing::decide(&mut p, &below).is_abstain());
    }

    #[test]
    fn measures_the_whole_trace_not_the_longest_span() {
        // Two sequential 60 ms spans: no span reaches 100 ms, the trace does.
        let trace = TraceBuilder::new()
            .span("root")
            .duration_ms(60)
            .span("follow-up")
            .child_of(0)
            .offset_ms(60)
            .duration_ms(60)
            .build();
        assert!(trace.spans().all(|s| s.duration_ns() < 100_000_000));
        assert!(testing::decide(&mut policy(100.0), &trace).is_keep());
    }

    #[test]
    fn fractional_thresholds_are_honoured() {
        let mut p = policy(0.5);
        let t = |us| TraceBuilder::new().span("a").duration_us(us).build();
        assert!(testing::decide(&mut p, &t(500)).is_keep());
        assert!(testing::decide(&mut p, &t(499)).is_abstain());
    }

    #[test]
    fn an_empty_trace_is_never_slow() {
        let trace = TraceBuilder::new().build();
        assert!(testing::decide(&mut policy(0.0), &trace).is_abstain());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let missing = testing::init::<Latency>("{}").err().unwrap();
        assert!(missing.contains("threshold_ms"), "{missing}");
        let negative = testing::init::<Latency>(r#"{"threshold_ms": -1}"#)
            .err()
            .unwrap();
        assert!(negative.contains(">= 0"), "{negative}");
        let typo = testing::init::<Latency>(r#"{"threshold": 5}"#)
            .err()
            .unwrap();
        assert!(typo.contains("threshold"), "{typo}");
    }
}
