//! The decision step: a whole trace in, keep or drop out, with who decided and why.
//!
//! Owns the [`Decider`] interface that the policy chain implements, the combination of
//! verdicts, and the `sampling.*` stamp written on kept spans. It never touches the buffer or
//! the exporter: the worker hands it a complete trace and acts on the [`Decision`].

use std::sync::Arc;

use crate::buffer::{BufferedSpan, TraceId, Trigger};
use crate::config::{DecideConfig, DefaultVerdict};
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
    pub spans: &'a [BufferedSpan],
    pub trigger: Trigger,
}

/// The outcome for one trace.
#[derive(Debug, Clone)]
pub struct Decision {
    pub keep: bool,
    /// The policy whose verdict decided (or `default`).
    pub policy: Arc<str>,
    pub reason: String,
}

/// What kept spans carry about their decision, encoded once per trace and appended to each
/// span's bytes at export.
#[derive(Debug)]
pub struct Stamp {
    pub policy: Arc<str>,
    pub reason: String,
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
        };
        Self::new(&decision, Trigger::Late)
    }
}

/// Decides whole traces. One instance per worker thread, so implementations may keep state
/// (streaming percentiles, rate limiters) without locks.
pub trait Decider: Send {
    fn decide(&mut self, trace: &TraceView<'_>) -> Decision;
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
}

impl PolicyChain {
    pub fn from_config(config: &DecideConfig) -> Self {
        Self {
            default: config.default,
            default_policy: Arc::from("default"),
        }
    }
}

impl Decider for PolicyChain {
    fn decide(&mut self, _trace: &TraceView<'_>) -> Decision {
        Decision {
            keep: self.default == DefaultVerdict::Keep,
            policy: self.default_policy.clone(),
            reason: format!("no policy decided; default verdict {}", self.default),
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
        let view = TraceView {
            trace_id: &trace_id,
            spans: &[],
            trigger: Trigger::RootGrace,
        };
        let mut keep = PolicyChain::from_config(&DecideConfig {
            default: DefaultVerdict::Keep,
        });
        let mut drop = PolicyChain::from_config(&DecideConfig {
            default: DefaultVerdict::Drop,
        });
        assert!(keep.decide(&view).keep);
        let d = drop.decide(&view);
        assert!(!d.keep);
        assert_eq!(&*d.policy, "default");
    }
}
