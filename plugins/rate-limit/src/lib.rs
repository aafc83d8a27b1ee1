//! `rate-limit`: keep traces while a spans-per-second token bucket has room;
//! abstain otherwise.
//!
//! The bucket holds at most `burst` tokens and refills at `spans_per_second`
//! tokens per second by the host's decision clock (`now_ns`). A trace with
//! N spans is kept when N tokens are available, and then takes them; a trace
//! that does not fit abstains and takes nothing (so a later, smaller trace may
//! still fit). A trace with more than `burst` spans never fits. Empty traces
//! abstain. The bucket starts full at the first `decide`.
//!
//! The bucket is per instance: the host creates one instance per worker
//! thread, so the collector-wide rate is up to `spans_per_second` times the
//! number of workers.
//!
//! Config: `spans_per_second` (number, required, finite, > 0); `burst`
//! (number, default `spans_per_second` but at least 1, finite, >= 1).
//!
//! Cost in Wasm host calls: 2 per trace (summary and `now-ns`).

use serde::Deserialize;
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy, now_ns};

/// Reason stamped on kept traces (`sampling.reason`).
pub const REASON: &str = "within rate limit";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub spans_per_second: f64,
    #[serde(default)]
    pub burst: Option<f64>,
}

pub struct RateLimit {
    rate_per_ns: f64,
    burst: f64,
    tokens: f64,
    /// Clock reading of the last refill; `None` before the first trace.
    last_ns: Option<u64>,
}

impl RateLimit {
    fn refill(&mut self, now: u64) {
        match self.last_ns {
            None => self.tokens = self.burst,
            Some(last) => {
                let elapsed = now.saturating_sub(last) as f64;
                self.tokens = (self.tokens + elapsed * self.rate_per_ns).min(self.burst);
            }
        }
        // The host clock never decreases; keep the later reading anyway.
        self.last_ns = Some(self.last_ns.map_or(now, |l| l.max(now)));
    }
}

impl Policy for RateLimit {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        let sps = c.spans_per_second;
        if !(sps.is_finite() && sps > 0.0) {
            return Err(format!(
                "spans_per_second must be a finite number > 0, got {sps}"
            ));
        }
        let burst = c.burst.unwrap_or(sps.max(1.0));
        if !(burst.is_finite() && burst >= 1.0) {
            return Err(format!("burst must be a finite number >= 1, got {burst}"));
        }
        Ok(RateLimit {
            rate_per_ns: sps / 1e9,
            burst,
            tokens: burst,
            last_ns: None,
        })
    }

    // Decided from the summary alone, in batches.
    const SUMMARY_ONLY: bool = true;

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let spans = trace.span_count();
        if spans == 0 {
            return Verdict::abstain();
        }
        self.refill(now_ns());
        let cost = f64::from(spans);
        if cost <= self.tokens {
            self.tokens -= cost;
            Verdict::keep(REASON)
        } else {
            Verdict::abstain()
        }
    }
}

export_policy!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

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

    fn policy(config: &str) -> RateLimit {
        testing::reset();
        testing::set_now_ns(Some(T0));
        testing::init::<RateLimit>(config).unwrap()
    }

    #[test]
    fn burst_defaults_to_the_rate_and_then_abstains() {
        let mut p = policy(r#"{"spans_per_second": 10}"#);
        let four = trace(4);
        assert_eq!(testing::decide(&mut p, &four).reason, REASON);
        assert!(testing::decide(&mut p, &four).is_keep()); // 8 of 10 used
        assert!(testing::decide(&mut p, &four).is_abstain()); // 2 left
        // A smaller trace still fits in what is left.
        assert!(testing::decide(&mut p, &trace(2)).is_keep());
        assert!(testing::decide(&mut p, &trace(1)).is_abstain());
    }

    #[test]
    fn refills_over_time_up_to_burst() {
        let mut p = policy(r#"{"spans_per_second": 10, "burst": 20}"#);
        assert!(testing::decide(&mut p, &trace(20)).is_keep());
        assert!(testing::decide(&mut p, &trace(1)).is_abstain());

        // 0.5 s refills 5 tokens: 5 spans fit, 6 do not.
        testing::set_now_ns(Some(T0 + SEC / 2));
        assert!(testing::decide(&mut p, &trace(6)).is_abstain());
        assert!(testing::decide(&mut p, &trace(5)).is_keep());
        assert!(testing::decide(&mut p, &trace(1)).is_abstain());

        // An hour later the bucket is full again but capped at burst.
        testing::set_now_ns(Some(T0 + 3600 * SEC));
        assert!(testing::decide(&mut p, &trace(21)).is_abstain());
        assert!(testing::decide(&mut p, &trace(20)).is_keep());
        assert!(testing::decide(&mut p, &trace(1)).is_abstain());
    }

    #[test]
    fn fractional_rates_accumulate() {
        // burst defaults to 1 when the rate is below one span per second.
        let mut p = policy(r#"{"spans_per_second": 0.5}"#);
        assert!(testing::decide(&mut p, &trace(1)).is_keep());
        testing::set_now_ns(Some(T0 + SEC));
        assert!(testing::decide(&mut p, &trace(1)).is_abstain()); // 0.5 tokens
        testing::set_now_ns(Some(T0 + 2 * SEC));
        assert!(testing::decide(&mut p, &trace(1)).is_keep()); // 1.0 token
    }

    #[test]
    fn traces_larger_than_burst_never_fit_and_empty_traces_abstain() {
        let mut p = policy(r#"{"spans_per_second": 100, "burst": 3}"#);
        assert!(testing::decide(&mut p, &trace(4)).is_abstain());
        assert!(testing::decide(&mut p, &trace(0)).is_abstain());
        assert!(testing::decide(&mut p, &trace(3)).is_keep());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = |c: &str| testing::init::<RateLimit>(c).err().unwrap();
        assert!(err("{}").contains("spans_per_second"));
        assert!(err(r#"{"spans_per_second": 0}"#).contains("> 0"));
        assert!(err(r#"{"spans_per_second": -3}"#).contains("> 0"));
        assert!(err(r#"{"spans_per_second": 5, "burst": 0.5}"#).contains("burst"));
        assert!(err(r#"{"spans_per_second": 5, "burst": 0}"#).contains(">= 1"));
        assert!(err(r#"{"spans_per_second": 5, "rate": 1}"#).contains("rate"));
    }
}
