//! The decision step: a whole trace in, keep or drop out, with who decided and why.
//!
//! Owns the [`Decider`] interface that the policy chain implements, the combination of
//! verdicts, and the `sampling.*` stamp written on kept spans. It never touches the buffer or
//! the exporter: the worker hands it a complete trace and acts on the [`Decision`].

mod apply;

use std::sync::Arc;

use crate::buffer::{BufferedSpan, TraceId, Trigger};
use crate::config::{DecideConfig, DefaultVerdict};
pub use apply::apply;

use crate::otlp::wire::{self, AttrValue};

/// One policy's opinion of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop,
    Abstain,
}

/// A complete trace as the decision step sees it.
pub struct TraceView<'a> {
    pub trace_id: &'a TraceId,
    /// Lent for the decision; a decider may move them out but must put them back.
    pub spans: &'a mut Vec<BufferedSpan>,
    pub trigger: Trigger,
}

/// The outcome for one trace.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub keep: bool,
    /// The policy whose verdict decided (or `default`).
    pub policy: Arc<str>,
    /// A policy's own words, or one of the host's fixed texts. Shared, so handing a reason
    /// from a policy's answer to the decision and on to the export stamp copies no text.
    pub reason: Arc<str>,
    /// The probability with which traces like this one are kept, when below 1; stamped as the
    /// OTel `th` threshold so backends can re-weight counts.
    pub probability: Option<f64>,
    /// Validated edits from the policies, applied only if the trace is kept.
    pub edits: Vec<TraceEdit>,
}

/// One validated change to a kept trace. Indexes refer to the trace's spans as the decision
/// step saw them; encoded values were checked against the caps before they got here.
#[derive(Debug, Clone)]
pub enum TraceEdit {
    /// Set an attribute on a span: `kv` is an encoded `Span.attributes` entry (tag included).
    SpanAttribute { span: u32, key: String, kv: Vec<u8> },
    /// Set an attribute on the resource of a span (and every span of the trace sharing it).
    ResourceAttribute {
        span: u32,
        attribute: opentelemetry_proto::tonic::common::v1::KeyValue,
    },
    /// Trim a leaf span from the kept trace.
    RemoveSpan(u32),
}

/// What kept spans carry about their decision, encoded once per trace and appended to each
/// span's bytes at export.
#[derive(Debug)]
pub struct Stamp {
    pub policy: Arc<str>,
    pub reason: Arc<str>,
    /// `sampling.trigger`, `sampling.policy`, `sampling.reason` as encoded Span attributes.
    pub encoded: Box<[u8]>,
}

impl Stamp {
    pub fn new(decision: &Decision, trigger: Trigger) -> Self {
        let mut encoded = Vec::with_capacity(96 + decision.reason.len());
        wire::append_attribute(
            &mut encoded,
            "sampling.trigger",
            AttrValue::Str(trigger.as_str()),
        );
        wire::append_attribute(
            &mut encoded,
            "sampling.policy",
            AttrValue::Str(&decision.policy),
        );
        wire::append_attribute(
            &mut encoded,
            "sampling.reason",
            AttrValue::Str(&decision.reason),
        );
        Self {
            policy: decision.policy.clone(),
            reason: decision.reason.clone(),
            encoded: encoded.into_boxed_slice(),
        }
    }

    /// The same decision, for a span that arrived after it: the trigger says `late`.
    pub fn for_late_span(&self) -> Self {
        let decision = Decision {
            keep: true,
            policy: self.policy.clone(),
            reason: self.reason.clone(),
            ..Decision::default()
        };
        Self::new(&decision, Trigger::Late)
    }
}

/// Decides whole traces. One instance per worker thread, so implementations may keep state
/// (streaming percentiles, rate limiters) without locks.
pub trait Decider: Send {
    fn decide(&mut self, trace: &mut TraceView<'_>) -> Decision;

    /// Decides traces that came due together, in order, pushing one decision per trace onto
    /// `out`. A decider that can share work across the batch (one call into a policy for all
    /// of it) overrides this; the result must be what deciding them one by one would give.
    fn decide_batch(&mut self, traces: &mut [TraceView<'_>], out: &mut Vec<Decision>) {
        for trace in traces {
            out.push(self.decide(trace));
        }
    }
}

/// Builds one [`Decider`] per worker thread.
pub trait DeciderFactory: Send + Sync {
    fn build(&self) -> Box<dyn Decider>;
}

/// The chain of policies, in order, and the verdict when all abstain. With no policies
/// configured every trace gets the default verdict.
#[derive(Debug, Clone)]
pub struct PolicyChain {
    default: DefaultVerdict,
    default_policy: Arc<str>,
    default_reason: Arc<str>,
}

impl PolicyChain {
    pub fn from_config(config: &DecideConfig) -> Self {
        Self {
            default: config.default,
            default_policy: Arc::from("default"),
            default_reason: Arc::from(default_reason(config.default)),
        }
    }
}

/// The reason stamped when every policy abstained and the chain's default decided.
pub fn default_reason(default: DefaultVerdict) -> &'static str {
    match default {
        DefaultVerdict::Keep => "no policy decided; default verdict keep",
        DefaultVerdict::Drop => "no policy decided; default verdict drop",
    }
}

impl Decider for PolicyChain {
    fn decide(&mut self, _trace: &mut TraceView<'_>) -> Decision {
        Decision {
            keep: self.default == DefaultVerdict::Keep,
            policy: self.default_policy.clone(),
            reason: self.default_reason.clone(),
            probability: None,
            edits: Vec::new(),
        }
    }
}

impl DeciderFactory for PolicyChain {
    fn build(&self) -> Box<dyn Decider> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_verdict_comes_from_config() {
        let trace_id = [1u8; 16];
        let mut spans = Vec::new();
        let mut view = TraceView {
            trace_id: &trace_id,
            spans: &mut spans,
            trigger: Trigger::RootGrace,
        };
        let mut keep = PolicyChain::from_config(&DecideConfig {
            default: DefaultVerdict::Keep,
        });
        let mut drop = PolicyChain::from_config(&DecideConfig {
            default: DefaultVerdict::Drop,
        });
        assert!(keep.decide(&mut view).keep);
        let d = drop.decide(&mut view);
        assert!(!d.keep);
        assert_eq!(&*d.policy, "default");
    }
}
