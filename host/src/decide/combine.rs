//! The combination of verdicts: how a chain's answers on one trace add up to a decision.
//!
//! Policies answer in chain order. A `drop` from a drop rule wins over everything; otherwise the
//! first `keep` decides; when every policy abstained (or dropped without being a drop rule),
//! the chain's default applies. A keep with a probability below 1 is stamped with the largest
//! such probability, unless some policy kept the trace for certain. A shadow policy's verdict
//! is set aside for its agreement metric and never counts; its edits are discarded.
//!
//! The tally never holds names or reasons: it holds indexes of answers that the caller keeps
//! (so adding a verdict copies no text), and asks the caller to name the deciding answer once.

use std::sync::Arc;

use super::{Decision, TraceEdit};
use crate::config::DefaultVerdict;

/// One policy's opinion of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop,
    Abstain,
}

/// How a policy's verdict counts in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its keep counts; its drop is an opinion the default can stand for.
    Enforce,
    /// As `Enforce`, and its drop wins over every keep.
    DropRule,
    /// Measured against the decision, never counted.
    Shadow,
}

/// No answer (in [`Tally`]).
const NONE: u32 = u32::MAX;

/// One trace's verdicts so far, combined in chain order. Reused trace after trace, so its
/// allocations are too.
#[derive(Debug)]
pub struct Tally {
    edits: Vec<TraceEdit>,
    /// The first drop rule's drop, as the caller's answer index.
    dropped_by: u32,
    /// The first keep, as the caller's answer index.
    kept_by: u32,
    /// The largest probability of a probabilistic keep; 0 when there is none.
    probability: f64,
    certain_keep: bool,
    /// Shadow policies' verdicts, by the caller's policy index.
    shadows: Vec<(u32, Verdict)>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            edits: Vec::new(),
            dropped_by: NONE,
            kept_by: NONE,
            probability: 0.0,
            certain_keep: false,
            shadows: Vec::new(),
        }
    }
}

impl Tally {
    /// Adds policy `policy`'s verdict, which the caller knows as answer `answer`, with the edits
    /// of its call (taken, or cleared for a shadow). `probability` is the keep's sampling
    /// probability when below 1.
    pub fn add(
        &mut self,
        role: Role,
        policy: u32,
        answer: u32,
        verdict: Verdict,
        probability: Option<f64>,
        own_edits: &mut Vec<TraceEdit>,
    ) {
        if role == Role::Shadow {
            self.shadows.push((policy, verdict));
            own_edits.clear();
            return;
        }
        self.edits.append(own_edits);
        match verdict {
            Verdict::Drop if role == Role::DropRule => {
                if self.dropped_by == NONE {
                    self.dropped_by = answer;
                }
            }
            Verdict::Keep => {
                match probability {
                    Some(p) => self.probability = self.probability.max(p),
                    None => self.certain_keep = true,
                }
                if self.kept_by == NONE {
                    self.kept_by = answer;
                }
            }
            // A drop from an ordinary policy is an opinion the default can stand for.
            Verdict::Drop | Verdict::Abstain => {}
        }
    }

    /// The decision the verdicts add up to, naming the deciding answer through `named`
    /// (its policy and reason); resets the tally for the next trace but for its shadows,
    /// which [`Tally::take_shadows`] hands out.
    pub fn decision(
        &mut self,
        mut named: impl FnMut(u32) -> (Arc<str>, Arc<str>),
        default: &DefaultDecision,
    ) -> Decision {
        let edits = std::mem::take(&mut self.edits);
        let decision = if self.dropped_by != NONE {
            let (policy, reason) = named(self.dropped_by);
            Decision {
                keep: false,
                policy,
                reason,
                probability: None,
                edits: Vec::new(),
            }
        } else if self.kept_by != NONE {
            let (policy, reason) = named(self.kept_by);
            Decision {
                keep: true,
                policy,
                reason,
                probability: (!self.certain_keep && self.probability > 0.0)
                    .then_some(self.probability),
                edits,
            }
        } else {
            default.decision(edits)
        };
        self.dropped_by = NONE;
        self.kept_by = NONE;
        self.probability = 0.0;
        self.certain_keep = false;
        decision
    }

    /// The shadow verdicts of the trace just decided, by policy index; leaves none behind.
    pub(crate) fn take_shadows(&mut self) -> std::vec::Drain<'_, (u32, Verdict)> {
        self.shadows.drain(..)
    }
}

/// Whether a shadow's verdict agrees with the decision (an abstention always does).
pub(crate) fn agrees(verdict: Verdict, decision: &Decision) -> bool {
    match verdict {
        Verdict::Keep => decision.keep,
        Verdict::Drop => !decision.keep,
        Verdict::Abstain => true,
    }
}

/// The chain's default verdict, with its stamped name and reason made once.
#[derive(Debug, Clone)]
pub struct DefaultDecision {
    verdict: DefaultVerdict,
    policy: Arc<str>,
    reason: Arc<str>,
}

impl DefaultDecision {
    pub fn new(verdict: DefaultVerdict) -> Self {
        Self {
            verdict,
            policy: Arc::from("default"),
            reason: Arc::from(super::default_reason(verdict)),
        }
    }

    pub(crate) fn verdict(&self) -> DefaultVerdict {
        self.verdict
    }

    /// The decision when no enforcing policy kept or dropped the trace. Edits are kept only if
    /// the default keeps.
    pub(crate) fn decision(&self, edits: Vec<TraceEdit>) -> Decision {
        let keep = self.verdict == DefaultVerdict::Keep;
        Decision {
            keep,
            policy: self.policy.clone(),
            reason: self.reason.clone(),
            probability: None,
            edits: if keep { edits } else { Vec::new() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(at: u32) -> (Arc<str>, Arc<str>) {
        (Arc::from(format!("p{at}")), Arc::from(format!("r{at}")))
    }

    fn decide(answers: &[(Role, Verdict, Option<f64>)], default: DefaultVerdict) -> Decision {
        let mut tally = Tally::default();
        for (i, (role, verdict, p)) in answers.iter().enumerate() {
            tally.add(*role, i as u32, i as u32, *verdict, *p, &mut Vec::new());
        }
        tally.decision(names, &DefaultDecision::new(default))
    }

    use Role::*;
    use Verdict::*;

    #[test]
    fn a_drop_rule_wins_over_any_keep() {
        let d = decide(
            &[(Enforce, Keep, None), (DropRule, Drop, None)],
            DefaultVerdict::Keep,
        );
        assert!(!d.keep);
        assert_eq!(&*d.policy, "p1");
    }

    #[test]
    fn the_first_keep_decides_and_an_ordinary_drop_is_only_an_opinion() {
        let d = decide(
            &[
                (Enforce, Drop, None),
                (Enforce, Keep, None),
                (Enforce, Keep, None),
            ],
            DefaultVerdict::Drop,
        );
        assert!(d.keep);
        assert_eq!((&*d.policy, &*d.reason), ("p1", "r1"));
        let d = decide(&[(Enforce, Drop, None)], DefaultVerdict::Keep);
        assert!(d.keep, "the default stands for an ordinary drop");
        assert_eq!(&*d.policy, "default");
    }

    #[test]
    fn probability_is_the_largest_unless_a_keep_is_certain() {
        let d = decide(
            &[(Enforce, Keep, Some(0.1)), (Enforce, Keep, Some(0.25))],
            DefaultVerdict::Drop,
        );
        assert_eq!(d.probability, Some(0.25));
        let d = decide(
            &[(Enforce, Keep, Some(0.1)), (Enforce, Keep, None)],
            DefaultVerdict::Drop,
        );
        assert_eq!(d.probability, None);
    }

    #[test]
    fn shadows_never_count_and_are_handed_out_once() {
        let mut tally = Tally::default();
        let mut edits = vec![TraceEdit::RemoveSpan(0)];
        tally.add(Shadow, 0, 0, Keep, None, &mut edits);
        assert!(edits.is_empty(), "a shadow's edits are discarded");
        let d = tally.decision(names, &DefaultDecision::new(DefaultVerdict::Drop));
        assert!(!d.keep);
        assert!(d.edits.is_empty());
        let shadows: Vec<_> = tally.take_shadows().collect();
        assert_eq!(shadows, vec![(0, Keep)]);
        assert!(!agrees(Keep, &d));
        assert!(tally.take_shadows().next().is_none());
    }

    #[test]
    fn edits_survive_only_a_keep() {
        let mut tally = Tally::default();
        tally.add(
            Enforce,
            0,
            0,
            Abstain,
            None,
            &mut vec![TraceEdit::RemoveSpan(1)],
        );
        let d = tally.decision(names, &DefaultDecision::new(DefaultVerdict::Keep));
        assert_eq!(d.edits.len(), 1);
        tally.add(
            Enforce,
            0,
            0,
            Abstain,
            None,
            &mut vec![TraceEdit::RemoveSpan(1)],
        );
        let d = tally.decision(names, &DefaultDecision::new(DefaultVerdict::Drop));
        assert!(d.edits.is_empty());
    }
}
