//! The decision step: a whole trace in, keep or drop out, with who decided and why.
//!
//! Owns the [`Decider`] interface that the policy chain implements, the combination of
//! verdicts ([`Tally`], the one copy in the workspace: the benches' native chain uses it too),
//! and the `sampling.*` stamp written on kept spans. It never touches the buffer or
//! the exporter: the worker hands it a complete trace and acts on the [`Decision`].

mod apply;
mod combine;

use std::sync::Arc;

use crate::config::DefaultVerdict;
use crate::otlp::wire;
use crate::trace::{BufferedSpan, Stamp, TraceId, Trigger};
pub(crate) use apply::apply;
pub(crate) use combine::agrees;
pub use combine::{DefaultDecision, Role, Tally, Verdict};

/// A complete trace as the decision step sees it.
pub struct TraceView<'a> {
    pub trace_id: &'a TraceId,
    /// Lent for the decision; a decider may move them out but must put them back.
    pub spans: &'a mut Vec<BufferedSpan>,
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
    /// Remove every string-valued span attribute of the trace: what a fail-closed enrichment
    /// asks for when it failed, since it could not say which of them to redact.
    RemoveStringAttributes,
}

/// The stamp kept spans carry about `decision`: `sampling.trigger`, `sampling.policy` and
/// `sampling.reason`, encoded once for the whole trace.
pub fn stamp(decision: &Decision, trigger: Trigger) -> Stamp {
    stamp_of(&decision.policy, &decision.reason, trigger)
}

/// The same decision, for a span that arrived after it: the trigger says `late`.
pub(crate) fn late_stamp(stamp: &Stamp) -> Stamp {
    stamp_of(&stamp.policy, &stamp.reason, Trigger::Late)
}

fn stamp_of(policy: &Arc<str>, reason: &Arc<str>, trigger: Trigger) -> Stamp {
    let mut encoded = Vec::with_capacity(96 + reason.len());
    wire::append_attribute(&mut encoded, "sampling.trigger", trigger.as_str());
    wire::append_attribute(&mut encoded, "sampling.policy", policy);
    wire::append_attribute(&mut encoded, "sampling.reason", reason);
    Stamp {
        policy: policy.clone(),
        reason: reason.clone(),
        encoded: encoded.into_boxed_slice(),
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

    /// The enrichments' edits for spans that arrived after their trace was kept, seen as a
    /// trace of their own. A decider without enrichments has none.
    fn enrich_late(&mut self, _late: &mut TraceView<'_>) -> Vec<TraceEdit> {
        Vec::new()
    }
}

/// Builds one [`Decider`] per worker thread.
pub trait DeciderFactory: Send + Sync {
    fn build(&self) -> Box<dyn Decider>;
}

/// The reason stamped when every policy abstained and the chain's default decided.
pub(crate) fn default_reason(default: DefaultVerdict) -> &'static str {
    match default {
        DefaultVerdict::Keep => "no policy decided; default verdict keep",
        DefaultVerdict::Drop => "no policy decided; default verdict drop",
    }
}
