//! `retrieval-confidence`: keep traces in which a retrieval step was unsure
//! of what it found: some span's score attribute is below `threshold`.
//! Abstain otherwise, including when no span carries the attribute.
//!
//! Config:
//! - `attribute` (string, default `"retrieval.top_score"`, non-empty): the
//!   span attribute holding the score. Int and double values count (NaN does
//!   not); strings are never parsed, other types are skipped.
//! - `threshold` (number, default `0.7`, finite): a score strictly below it
//!   keeps the trace; a score equal to it does not.
//! - `spans` (list of strings, default `[]`): only spans whose name equals one
//!   of these count; empty means every span.
//! - `reason_detail` (bool, default `true`): name the span and score in the
//!   reason (see below); `false` gives the constant reason
//!   `"low_retrieval_confidence"`.
//!
//! When several spans qualify, the one with the lowest score (then the lowest
//! index) is the one reported.
//!
//! Reason: `low_retrieval_confidence: span '<name>' score <score> < <threshold>`,
//! e.g. `low_retrieval_confidence: span 'retrieve' score 0.48 < 0.70`. Scores
//! are shown with two decimals (more only when two would round up to the
//! threshold), int scores as they are, and names are cut to 64 characters.
//! The host uses the reason as a metric label, so its cardinality is the
//! number of distinct retrieval span names times the number of two-decimal
//! scores under the threshold (at most 70 per name for scores in `[0, 0.7)`).
//! Set `reason_detail = false` where span names are unbounded.
//!
//! Edit: the reported span gets `retrieval.low_confidence = true`, so the
//! finding is queryable in the backend whatever the reason says. (Only that
//! span: marking every low-scoring span would cost a `name` call each when
//! `spans` is set.)
//!
//! Cost in Wasm host calls: 1 `attr-column` for the whole trace. Only when
//! some score is low: + 1 (summary, to address spans) + 1 `name` per
//! low-scoring span examined, in ascending score order, stopping at the
//! first that passes `spans` (so exactly 1 without `spans`).

use serde::Deserialize;
use tailgate_plugin_sdk::{AttrValue, Policy, Trace, Verdict, export_policy};

/// Reason of a kept trace with `reason_detail = false`, and the prefix of the
/// detailed one.
pub const REASON: &str = "low_retrieval_confidence";

/// Span attribute set (to `true`) on the reported span of a kept trace.
pub const FLAG_ATTRIBUTE: &str = "retrieval.low_confidence";

/// Longest span name, in characters, that goes into the reason: keeps it short
/// (the host cuts reasons at 256 characters anyway).
const MAX_NAME_CHARS: usize = 64;

fn default_attribute() -> String {
    "retrieval.top_score".to_owned()
}

fn default_threshold() -> f64 {
    0.7
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_attribute")]
    pub attribute: String,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub spans: Vec<String>,
    #[serde(default = "default_true")]
    pub reason_detail: bool,
}

pub struct RetrievalConfidence {
    attribute: String,
    threshold: f64,
    /// `threshold` as the reason shows it, rendered once.
    threshold_text: String,
    spans: Vec<String>,
    reason_detail: bool,
}

impl Policy for RetrievalConfidence {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if c.attribute.is_empty() {
            return Err("attribute must not be empty".to_owned());
        }
        if !c.threshold.is_finite() {
            return Err(format!(
                "threshold must be a finite number, got {}",
                c.threshold
            ));
        }
        Ok(RetrievalConfidence {
            threshold_text: threshold_text(c.threshold),
            attribute: c.attribute,
            threshold: c.threshold,
            spans: c.spans,
            reason_detail: c.reason_detail,
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let column = trace.attr_column(&self.attribute);
        let score = |i: u32| column[i as usize].as_ref().and_then(AttrValue::as_f64);
        // Empty, and so not allocated, on the common path where every score is
        // fine.
        let mut low: Vec<u32> = (0..column.len() as u32)
            .filter(|&i| score(i).is_some_and(|s| s < self.threshold))
            .collect();
        if low.is_empty() {
            return Verdict::abstain();
        }
        low.sort_unstable_by(|&a, &b| {
            let (sa, sb) = (score(a).unwrap_or(f64::NAN), score(b).unwrap_or(f64::NAN));
            sa.total_cmp(&sb).then(a.cmp(&b))
        });
        for i in low {
            let Some(span) = trace.span(i) else { continue };
            let name = span.name();
            if !self.spans.is_empty() && !self.spans.contains(&name) {
                continue;
            }
            let reason = if self.reason_detail {
                let shown = match &column[i as usize] {
                    Some(AttrValue::Int(v)) => v.to_string(),
                    _ => score_text(score(i).unwrap_or(f64::NAN), self.threshold),
                };
                format!(
                    "{REASON}: span '{}' score {shown} < {}",
                    short_name(&name),
                    self.threshold_text
                )
            } else {
                REASON.to_owned()
            };
            return Verdict::keep(reason).patch_span(i, FLAG_ATTRIBUTE, true);
        }
        Verdict::abstain()
    }
}

/// The threshold with two decimals when that is exact (`0.70`), whole numbers
/// plainly (`70`), anything else in full (`0.755`).
fn threshold_text(t: f64) -> String {
    if t.fract() == 0.0 {
        return format!("{t}");
    }
    let two = format!("{t:.2}");
    if two.parse::<f64>() == Ok(t) {
        two
    } else {
        format!("{t}")
    }
}

/// `score` (below `threshold`) with two decimals, or with as many more as it
/// takes not to print a number that reads as reaching the threshold (0.699
/// with threshold 0.7 is `0.699`, not `0.70`).
fn score_text(score: f64, threshold: f64) -> String {
    for decimals in 2..=6 {
        let text = format!("{score:.decimals$}");
        if text.parse::<f64>().is_ok_and(|v| v < threshold) {
            return text;
        }
    }
    format!("{score}")
}

fn short_name(name: &str) -> &str {
    match name.char_indices().nth(MAX_NAME_CHARS) {
        Some((cut, _)) => &name[..cut],
        None => name,
    }
}

export_policy!(RetrievalConfidence);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> RetrievalConfidence {
        testing::init::<RetrievalConfidence>(config).unwrap()
    }

    fn err(config: &str) -> String {
        testing::init::<RetrievalConfidence>(config).err().unwrap()
    }

    /// `agent.run` root with one child `name` scoring `score`.
    fn scored(name: &str, score: impl Into<AttrValue>) -> Trace {
        TraceBuilder::new()
            .span("agent.run")
            .span(name)
            .child_of(0)
            .attr("retrieval.top_score", score)
            .build()
    }

    fn decide(p: &mut RetrievalConfidence, t: &Trace) -> Verdict {
        let v = testing::decide(p, t);
        testing::check_verdict(t, &v).unwrap();
        v
    }

    #[test]
    fn keeps_a_low_score_naming_span_and_score_and_flags_the_span() {
        let trace = scored("retrieve", 0.48);
        let v = decide(&mut policy("{}"), &trace);
        assert!(v.is_keep(), "{v:?}");
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'retrieve' score 0.48 < 0.70"
        );
        assert_eq!(
            v.patches,
            Verdict::keep("")
                .patch_span(1, FLAG_ATTRIBUTE, true)
                .patches
        );
        assert!(v.remove_spans.is_empty());
    }

    #[test]
    fn a_score_at_or_above_the_threshold_abstains() {
        let mut p = policy("{}");
        assert!(decide(&mut p, &scored("retrieve", 0.7)).is_abstain());
        assert!(decide(&mut p, &scored("retrieve", 0.93)).is_abstain());
        assert!(decide(&mut p, &scored("retrieve", 0.699_999)).is_keep());
    }

    #[test]
    fn a_score_that_rounds_to_the_threshold_is_not_shown_as_reaching_it() {
        let v = decide(&mut policy("{}"), &scored("retrieve", 0.699));
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'retrieve' score 0.699 < 0.70"
        );
    }

    #[test]
    fn int_and_double_scores_both_count() {
        let mut p = policy(r#"{"threshold": 70}"#);
        let v = decide(&mut p, &scored("rerank", 48i64));
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'rerank' score 48 < 70"
        );
        let v = decide(&mut p, &scored("rerank", 48.25));
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'rerank' score 48.25 < 70"
        );
        assert!(decide(&mut p, &scored("rerank", 70i64)).is_abstain());
        assert!(decide(&mut p, &scored("rerank", 70.0)).is_abstain());
    }

    #[test]
    fn missing_and_non_numeric_scores_are_ignored() {
        let mut p = policy("{}");
        let none = TraceBuilder::new()
            .span("agent.run")
            .span("retrieve")
            .child_of(0)
            .attr("retrieval.score", 0.1)
            .build();
        assert!(decide(&mut p, &none).is_abstain());
        assert!(decide(&mut p, &scored("retrieve", "0.1")).is_abstain());
        assert!(decide(&mut p, &scored("retrieve", false)).is_abstain());
        assert!(decide(&mut p, &scored("retrieve", f64::NAN)).is_abstain());
        assert!(decide(&mut p, &TraceBuilder::new().build()).is_abstain());
    }

    #[test]
    fn reports_the_lowest_score_of_several() {
        let trace = TraceBuilder::new()
            .span("agent.run")
            .span("retrieve.docs")
            .child_of(0)
            .attr("retrieval.top_score", 0.61)
            .span("retrieve.faq")
            .child_of(0)
            .attr("retrieval.top_score", 0.2)
            .span("retrieve.web")
            .child_of(0)
            .attr("retrieval.top_score", 0.95)
            .build();
        let v = decide(&mut policy("{}"), &trace);
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'retrieve.faq' score 0.20 < 0.70"
        );
        assert_eq!(v.patches.len(), 1);
        assert_eq!(
            v.patches[0].target,
            tailgate_plugin_sdk::PatchTarget::Span(2)
        );
    }

    #[test]
    fn spans_restricts_which_span_names_count() {
        let mut p = policy(r#"{"spans": ["retrieve"]}"#);
        // The lower score is on a span the config does not look at.
        let trace = TraceBuilder::new()
            .span("agent.run")
            .span("classify")
            .child_of(0)
            .attr("retrieval.top_score", 0.1)
            .span("retrieve")
            .child_of(0)
            .attr("retrieval.top_score", 0.5)
            .build();
        let v = decide(&mut p, &trace);
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'retrieve' score 0.50 < 0.70"
        );
        assert!(decide(&mut p, &scored("classify", 0.1)).is_abstain());
        assert!(decide(&mut p, &scored("retrieve.v2", 0.1)).is_abstain());
    }

    #[test]
    fn custom_attribute_and_threshold() {
        let mut p = policy(r#"{"attribute": "rag.similarity", "threshold": 0.755}"#);
        let trace = TraceBuilder::new()
            .span("search")
            .attr("rag.similarity", 0.75)
            .attr("retrieval.top_score", 0.99)
            .build();
        let v = decide(&mut p, &trace);
        assert_eq!(
            v.reason,
            "low_retrieval_confidence: span 'search' score 0.75 < 0.755"
        );
        assert!(decide(&mut p, &scored("search", 0.1)).is_abstain());
    }

    #[test]
    fn reason_detail_off_gives_a_constant_reason_and_still_flags() {
        let v = decide(
            &mut policy(r#"{"reason_detail": false}"#),
            &scored("r", 0.3),
        );
        assert_eq!(v.reason, REASON);
        assert_eq!(v.patches.len(), 1);
    }

    #[test]
    fn long_span_names_are_cut_in_the_reason() {
        let long = "é".repeat(100);
        let v = decide(&mut policy("{}"), &scored(&long, 0.1));
        assert!(
            v.reason.contains(&format!("'{}'", "é".repeat(64))),
            "{}",
            v.reason
        );
        assert!(!v.reason.contains(&"é".repeat(65)));
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        assert!(err(r#"{"attribute": ""}"#).contains("attribute"));
        assert!(err(r#"{"treshold": 0.5}"#).contains("treshold"));
        // JSON cannot spell infinity; a host converting TOML `inf` could.
        let infinite = RetrievalConfidence::init(Config {
            attribute: default_attribute(),
            threshold: f64::INFINITY,
            spans: Vec::new(),
            reason_detail: true,
        });
        assert!(infinite.err().unwrap().contains("threshold"));
    }
}
