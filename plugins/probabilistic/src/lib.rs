//! `probabilistic`: keep a fixed fraction `rate` of traces, decided by the
//! trace's own randomness so every tailgate (and every OTel SDK or collector
//! using consistent probability sampling) with the same rate makes the same
//! choice for the same trace.
//!
//! The rule is OTel's consistent probability sampling (tracestate `th`/`rv`,
//! W3C Trace Context Level 2):
//! - randomness R: the explicit `rv` sub-key of the root span's `ot`
//!   tracestate entry if it holds 14 hex digits, else the trace id's lower 56
//!   bits (bytes 9..16, big-endian);
//! - rejection threshold T = 2^56 - round(rate * 2^56), rounding half away
//!   from zero (OTel collector-contrib `pkg/sampling` ProbabilityToThreshold,
//!   at full 56-bit precision);
//! - keep when R >= T, reporting probability = rate. The host turns that
//!   probability back into `th` with the same formula (see the WIT `verdict`
//!   docs), so the stamped `th` is exactly the T used here and downstream
//!   consumers can both re-weight counts and re-check the decision.
//!
//! Config: `rate` (0..=1, required); `on_miss` = `"abstain"` (default: let
//! the rest of the chain decide) or `"drop"`.

use serde::Deserialize;
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy};

/// 2^56: one more than the largest randomness value.
pub const MAX_THRESHOLD: u64 = 1 << 56;

/// Reason on kept traces.
pub const REASON_KEPT: &str = "sampled";
/// Reason on missed traces when `on_miss = "drop"`.
pub const REASON_MISSED: &str = "not sampled";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMiss {
    #[default]
    Abstain,
    Drop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub rate: f64,
    #[serde(default)]
    pub on_miss: OnMiss,
}

pub struct Probabilistic {
    rate: f64,
    threshold: u64,
    on_miss: OnMiss,
}

/// The rejection threshold T for a sampling probability `rate` in [0, 1]:
/// 2^56 - round(rate * 2^56). `rate * 2^56` is exact in f64 (a power-of-two
/// scaling), so the only rounding is the documented one. Rates below 2^-57
/// give T = 2^56, which no randomness reaches: never keep.
pub fn threshold(rate: f64) -> u64 {
    let scaled = (rate * MAX_THRESHOLD as f64).round() as u64;
    MAX_THRESHOLD - scaled.min(MAX_THRESHOLD)
}

/// The OTel `th` value for threshold `t`: hex with trailing zeros removed,
/// "0" for zero (always sample).
pub fn th_value(t: u64) -> String {
    if t == 0 {
        return "0".to_owned();
    }
    let s = format!("{t:014x}");
    s.trim_end_matches('0').to_owned()
}

pub use tailgate_plugin_sdk::{explicit_randomness, trace_id_randomness};

/// The randomness R the sampling decision uses for `trace` (the root's
/// explicit `rv`, else the trace id's; see [`Trace::randomness`]).
pub fn randomness(trace: &Trace) -> u64 {
    trace.randomness()
}

impl Policy for Probabilistic {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if !(c.rate.is_finite() && (0.0..=1.0).contains(&c.rate)) {
            return Err(format!("rate must be between 0 and 1, got {}", c.rate));
        }
        Ok(Probabilistic {
            rate: c.rate,
            threshold: threshold(c.rate),
            on_miss: c.on_miss,
        })
    }

    // The host passes R with the summary: decided in batches.
    const SUMMARY_ONLY: bool = true;

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if randomness(trace) >= self.threshold {
            Verdict::keep(REASON_KEPT).with_probability(self.rate)
        } else {
            match self.on_miss {
                OnMiss::Abstain => Verdict::abstain(),
                OnMiss::Drop => Verdict::drop(REASON_MISSED),
            }
        }
    }
}

export_policy!(Probabilistic);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> Probabilistic {
        testing::init::<Probabilistic>(config).unwrap()
    }

    /// A trace whose randomness (lower 56 bits of the id) is `r`, with junk in
    /// the upper bytes that must be ignored, including byte 8.
    fn trace_with_r(r: u64) -> Trace {
        let mut id = [0xa5u8; 16];
        id[8..].copy_from_slice(&r.to_be_bytes());
        id[8] = 0xff;
        TraceBuilder::new().trace_id(id).span("root").build()
    }

    #[test]
    fn thresholds_match_otel_pkg_sampling() {
        // Values as OTel's ProbabilityToThreshold computes them (and as the
        // spec's examples show for the exact powers of two).
        assert_eq!(threshold(1.0), 0);
        assert_eq!(threshold(0.5), 0x80_0000_0000_0000);
        assert_eq!(threshold(0.25), 0xc0_0000_0000_0000);
        assert_eq!(threshold(0.1), 0xe6_6666_6666_6666);
        assert_eq!(threshold(0.01), 0xfd_70a3_d70a_3d71);
        assert_eq!(threshold(0.0), MAX_THRESHOLD);
        assert_eq!(th_value(threshold(0.25)), "c");
        assert_eq!(th_value(threshold(0.5)), "8");
        assert_eq!(th_value(threshold(1.0)), "0");
        assert_eq!(th_value(threshold(0.01)), "fd70a3d70a3d71");
    }

    #[test]
    fn keeps_exactly_when_randomness_reaches_the_threshold() {
        let mut p = policy(r#"{"rate": 0.5}"#);
        let t = threshold(0.5);
        let at = testing::decide(&mut p, &trace_with_r(t));
        assert!(at.is_keep());
        assert_eq!(at.probability, Some(0.5));
        assert_eq!(at.reason, REASON_KEPT);
        assert!(testing::decide(&mut p, &trace_with_r(t - 1)).is_abstain());
        assert!(testing::decide(&mut p, &trace_with_r(MAX_THRESHOLD - 1)).is_keep());
        assert!(testing::decide(&mut p, &trace_with_r(0)).is_abstain());
    }

    #[test]
    fn uses_bytes_9_to_16_big_endian() {
        let mut id = [0u8; 16];
        id[9] = 0x12;
        id[15] = 0x34;
        assert_eq!(trace_id_randomness(&id), 0x12_0000_0000_0034);
        id[8] = 0xff; // byte 8 is not part of the randomness
        id[0] = 0xff;
        assert_eq!(trace_id_randomness(&id), 0x12_0000_0000_0034);
    }

    #[test]
    fn on_miss_drop_drops_and_rate_zero_never_keeps() {
        let mut p = policy(r#"{"rate": 0.0, "on_miss": "drop"}"#);
        let v = testing::decide(&mut p, &trace_with_r(MAX_THRESHOLD - 1));
        assert!(v.is_drop());
        assert_eq!(v.reason, REASON_MISSED);
        let mut all = policy(r#"{"rate": 1}"#);
        let v = testing::decide(&mut all, &trace_with_r(0));
        assert!(v.is_keep());
        assert_eq!(v.probability, Some(1.0));
    }

    #[test]
    fn explicit_rv_in_the_root_tracestate_wins_over_the_trace_id() {
        let mut p = policy(r#"{"rate": 0.5, "on_miss": "drop"}"#);
        // Trace id randomness says keep, rv says miss.
        let mut id = [0u8; 16];
        id[9] = 0xff;
        let trace = TraceBuilder::new()
            .trace_id(id)
            .span("child")
            .child_of(1)
            .span("root")
            .trace_state("vendor=x,ot=th:0;rv:00000000000001")
            .build();
        assert_eq!(randomness(&trace), 1);
        assert!(testing::decide(&mut p, &trace).is_drop());
        // A malformed rv is ignored.
        assert_eq!(explicit_randomness("ot=rv:123"), None);
        assert_eq!(explicit_randomness("ot=rv:zz000000000000"), None);
        assert_eq!(
            explicit_randomness("ot=th:8;rv:abcdef01234567"),
            Some(0xab_cdef_0123_4567)
        );
    }

    #[test]
    fn decisions_are_consistent_across_rates_and_close_to_the_rate() {
        // Pseudo-random but fixed trace ids: this test cannot flake.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state
        };
        let ids: Vec<[u8; 16]> = (0..20_000)
            .map(|_| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&next().to_be_bytes());
                id[8..].copy_from_slice(&next().to_be_bytes());
                id
            })
            .collect();
        let mut low = policy(r#"{"rate": 0.1}"#);
        let mut high = policy(r#"{"rate": 0.3}"#);
        let (mut kept_low, mut kept_high) = (0, 0);
        for id in &ids {
            let trace = TraceBuilder::new().trace_id(*id).span("r").build();
            let l = testing::decide(&mut low, &trace).is_keep();
            let h = testing::decide(&mut high, &trace).is_keep();
            assert!(!l || h, "kept at 10% but not at 30%: {id:02x?}");
            kept_low += l as u32;
            kept_high += h as u32;
        }
        let frac = |k: u32| f64::from(k) / ids.len() as f64;
        assert!((frac(kept_low) - 0.1).abs() < 0.01, "{}", frac(kept_low));
        assert!((frac(kept_high) - 0.3).abs() < 0.015, "{}", frac(kept_high));
    }

    #[test]
    fn invalid_rates_are_refused() {
        for bad in [r#"{"rate": 1.5}"#, r#"{"rate": -0.1}"#, "{}"] {
            assert!(testing::init::<Probabilistic>(bad).is_err(), "{bad}");
        }
        let err = testing::init::<Probabilistic>(r#"{"rate": 0.5, "on_miss": "keep"}"#)
            .err()
            .unwrap();
        assert!(err.contains("keep"), "{err}");
    }
}
