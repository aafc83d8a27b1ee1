//! `span-count`: keep traces whose span count is within
//! `min_spans..=max_spans`; abstain otherwise. Empty traces (no spans) always
//! abstain.
//!
//! Config: `min_spans` (integer, default 0); `max_spans` (integer, default:
//! no upper bound; must be >= `min_spans`). At least one of the two must be
//! set, so an empty config (which would keep every trace) is refused.
//!
//! The reason on kept traces names the count (`"span count 12"`). That makes
//! the `sampling.reason` label's cardinality as high as the range is wide.
//!
//! Cost in Wasm host calls: 1 per trace (the span count is in the summary).

use serde::Deserialize;
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub min_spans: Option<u32>,
    #[serde(default)]
    pub max_spans: Option<u32>,
}

pub struct SpanCount {
    min: u32,
    max: u32,
}

impl Policy for SpanCount {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if c.min_spans.is_none() && c.max_spans.is_none() {
            return Err("set min_spans and/or max_spans".to_owned());
        }
        let min = c.min_spans.unwrap_or(0);
        let max = c.max_spans.unwrap_or(u32::MAX);
        if min > max {
            return Err(format!(
                "min_spans ({min}) must not be greater than max_spans ({max})"
            ));
        }
        Ok(SpanCount { min, max })
    }

    // Decided from the summary alone, in batches.
    const SUMMARY_ONLY: bool = true;

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let n = trace.span_count();
        if n > 0 && (self.min..=self.max).contains(&n) {
            Verdict::keep(format!("span count {n}"))
        } else {
            Verdict::abstain()
        }
    }
}

export_policy!(SpanCount);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn trace(spans: usize) -> Trace {
        let mut b = TraceBuilder::new();
        for i in 0..spans {
            b = b.span(format!("s{i}"));
            if i > 0 {
                b = b.child_of(0);
            }
        }
        b.build()
    }

    fn policy(config: &str) -> SpanCount {
        testing::init::<SpanCount>(config).unwrap()
    }

    #[test]
    fn keeps_inside_inclusive_bounds() {
        let mut p = policy(r#"{"min_spans": 3, "max_spans": 5}"#);
        assert!(testing::decide(&mut p, &trace(2)).is_abstain());
        let at_min = testing::decide(&mut p, &trace(3));
        assert!(at_min.is_keep());
        assert_eq!(at_min.reason, "span count 3");
        assert_eq!(testing::decide(&mut p, &trace(5)).reason, "span count 5");
        assert!(testing::decide(&mut p, &trace(6)).is_abstain());
    }

    #[test]
    fn min_only_has_no_upper_bound() {
        let mut p = policy(r#"{"min_spans": 50}"#);
        assert!(testing::decide(&mut p, &trace(49)).is_abstain());
        assert!(testing::decide(&mut p, &trace(200)).is_keep());
    }

    #[test]
    fn max_only_defaults_min_to_zero_but_empty_traces_abstain() {
        let mut p = policy(r#"{"max_spans": 2}"#);
        assert!(testing::decide(&mut p, &trace(1)).is_keep());
        assert!(testing::decide(&mut p, &trace(2)).is_keep());
        assert!(testing::decide(&mut p, &trace(3)).is_abstain());
        assert!(testing::decide(&mut p, &trace(0)).is_abstain());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = |c: &str| testing::init::<SpanCount>(c).err().unwrap();
        assert!(err("{}").contains("min_spans and/or max_spans"));
        assert!(err(r#"{"min_spans": 5, "max_spans": 4}"#).contains("greater than"));
        assert!(err(r#"{"min_spans": -1}"#).contains("invalid config"));
        assert!(err(r#"{"max": 4}"#).contains("max"));
    }
}
