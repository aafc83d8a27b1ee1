//! The policy chain as a [`Decider`]: one per worker thread, holding that worker's instances.
//!
//! Semantics: policies run in order; a `drop` from a policy marked `drop_rule` wins; otherwise
//! any `keep` keeps; if all abstain, the configured default applies. A `shadow` policy runs
//! and is measured, but its verdict is ignored. An `enrich` policy runs only on traces the
//! others decided to keep, after the decision, and contributes only edits. A failing call (trap, timeout, memory cap,
//! fuel) counts as the policy's `on_error` verdict, rebuilds the instance, and after repeated
//! failures quarantines the policy. Edits are kept only from calls that returned normally and
//! passed validation.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bindings::tailgate::policy::types::Decision as WitDecision;
use super::edits;
use super::state::{CallClock, TraceData, thread_cpu_time};
use super::{LoadedPolicy, PolicyInstance, PolicyRuntime, PolicySet};
use crate::config::{DefaultVerdict, OnError, PolicyMode};
use crate::decide::{Decider, DeciderFactory, Decision, TraceView, default_reason};
use crate::telemetry::{Metrics, PolicyMetrics};

/// Builds a [`WasmChain`] for each worker.
pub struct WasmChainFactory {
    pub runtime: Arc<PolicyRuntime>,
    pub metrics: Arc<Metrics>,
}

impl DeciderFactory for WasmChainFactory {
    fn build(&self) -> Box<dyn Decider> {
        Box::new(WasmChain {
            runtime: self.runtime.clone(),
            metrics: self.metrics.clone(),
            set: self.runtime.live.load_full(),
            instances: Vec::new(),
            handles: Vec::new(),
            cpu_read: None,
            data: None,
            clock: Instant::now(),
            default_policy: Arc::from("default"),
        })
    }
}

pub struct WasmChain {
    runtime: Arc<PolicyRuntime>,
    metrics: Arc<Metrics>,
    set: Arc<PolicySet>,
    /// This worker's instance of each policy of `set`, created on first use and after a trap.
    instances: Vec<Option<PolicyInstance>>,
    /// Each policy's metric series, resolved when the set is picked up.
    handles: Vec<PolicyMetrics>,
    /// When this thread's CPU clock was last read, and its value.
    cpu_read: Option<(Instant, Option<Duration>)>,
    /// The trace being decided with its index, boxed so it moves into each store and back as
    /// a pointer; kept between traces so the index's buffers are reused.
    data: Option<Box<TraceData>>,
    /// When the previous call ended (or the decision began): each call's latency runs from
    /// here, so a chain of N policies reads the clock N + 1 times, not 2N.
    clock: Instant,
    default_policy: Arc<str>,
}

/// One policy's contribution to a decision.
struct Outcome {
    verdict: WitDecision,
    reason: Cow<'static, str>,
    probability: Option<f64>,
}

impl WasmChain {
    /// Picks up a reloaded set; the old instances are dropped with the old set.
    fn refresh(&mut self) {
        let live = self.runtime.live.load();
        if live.generation != self.set.generation {
            self.set = live.clone();
            self.instances.clear();
        }
        if self.instances.len() != self.set.policies.len() {
            self.instances.resize_with(self.set.policies.len(), || None);
        }
        if self.handles.len() != self.set.policies.len() {
            self.handles = (self.set.policies.iter())
                .map(|p| self.metrics.policy_handles(&p.name))
                .collect();
        }
    }

    /// Runs one policy on the trace. The trace data moves into the store for the call and
    /// always comes back, whatever the guest did.
    fn run_one(
        &mut self,
        i: usize,
        data: &mut Option<Box<TraceData>>,
        edits_out: &mut Vec<crate::decide::TraceEdit>,
    ) -> Option<Outcome> {
        // Borrowed, not cloned: an Arc clone here would bounce the policy's reference count
        // between every worker thread on every call.
        let policy: &LoadedPolicy = &self.set.policies[i];
        if policy.health.is_quarantined() {
            self.handles[i].quarantined.inc();
            return None;
        }
        if self.instances[i].is_none() {
            match policy.instantiate(self.runtime.engine.engine()) {
                Ok(inst) => {
                    self.instances[i] = Some(inst);
                    // Building the instance is not the call: start its clock afresh.
                    self.clock = Instant::now();
                }
                Err(e) => {
                    tracing::error!(policy = %policy.name, error = %e, "cannot instantiate policy");
                    return Some(self.failed(policy, "instantiate"));
                }
            }
        }
        let trace = data.take()?;
        let started = self.clock;
        // The thread's CPU clock is a system call: read it at most once a millisecond. An
        // older reading only makes the deadline stricter (it counts earlier work as the call's).
        if self
            .cpu_read
            .is_none_or(|(at, _)| started.duration_since(at) > Duration::from_millis(1))
        {
            self.cpu_read = Some((started, thread_cpu_time()));
        }
        let clock = CallClock {
            started,
            cpu_at_start: self.cpu_read.and_then(|(_, cpu)| cpu),
        };
        let inst = self.instances[i].as_mut()?;
        let (result, back) = inst.decide(policy, trace, clock);
        self.clock = Instant::now();
        let elapsed = self.clock.duration_since(started);
        *data = back;
        let handles = &self.handles[i];
        handles.latency.observe(elapsed.as_secs_f64());
        match result {
            Ok(verdict) => {
                policy.health.succeeded();
                let spans = data.as_ref().map_or(&[][..], |d| &d.spans[..]);
                let is_leaf = data.as_ref().map_or(&[][..], |d| &d.index.is_leaf[..]);
                match edits::validate(&verdict, spans, is_leaf, &policy.spec) {
                    Ok(mut edits) => edits_out.append(&mut edits),
                    Err(why) => {
                        handles.invalid_edits.inc();
                        tracing::warn!(policy = %policy.name, %why, "verdict edits rejected; trace left untouched");
                    }
                }
                let probability = verdict.probability.filter(|p| *p > 0.0 && *p < 1.0);
                match verdict.decision {
                    WitDecision::Keep => handles.keep.inc(),
                    WitDecision::Drop => handles.drop.inc(),
                    WitDecision::Abstain => handles.abstain.inc(),
                };
                Some(Outcome {
                    verdict: verdict.decision,
                    reason: Cow::Owned(truncated(verdict.reason, 256)),
                    probability,
                })
            }
            Err(trap) => {
                let kind = failure_kind(&trap);
                tracing::warn!(policy = %policy.name, kind, error = %format!("{trap:#}"), "policy call failed; applying on_error");
                // A trapped instance may be in any state: rebuild it for the next trace.
                self.instances[i] = None;
                Some(self.failed(policy, kind))
            }
        }
    }

    /// The chain's default verdict, when no enforcing policy kept or dropped the trace. Edits
    /// are kept only if the default keeps.
    fn default_decision(&self, edits: Vec<crate::decide::TraceEdit>) -> Decision {
        let keep = self.set.default == DefaultVerdict::Keep;
        Decision {
            keep,
            policy: self.default_policy.clone(),
            reason: Cow::Borrowed(default_reason(self.set.default)),
            probability: None,
            edits: if keep { edits } else { Vec::new() },
        }
    }

    fn failed(&self, policy: &LoadedPolicy, kind: &'static str) -> Outcome {
        self.metrics.policy_failure(&policy.name, kind);
        if policy
            .health
            .failed(policy.spec.quarantine_after, policy.spec.quarantine_for.0)
        {
            self.metrics.policy_quarantined(&policy.name);
            tracing::error!(
                policy = %policy.name,
                after = policy.spec.quarantine_after,
                seconds = policy.spec.quarantine_for.0.as_secs(),
                "policy quarantined after repeated failures; it is skipped until the quarantine ends"
            );
        }
        let verdict = match policy.spec.on_error {
            OnError::Keep => WitDecision::Keep,
            OnError::Drop => WitDecision::Drop,
            OnError::Abstain => WitDecision::Abstain,
        };
        Outcome {
            verdict,
            reason: Cow::Owned(format!("policy failed ({kind}); on_error")),
            probability: None,
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary, without copying it.
fn truncated(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Names what stopped a call, for metrics and logs.
fn failure_kind(e: &wasmtime::Error) -> &'static str {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timeout",
        Some(wasmtime::Trap::OutOfFuel) => "fuel",
        Some(wasmtime::Trap::MemoryOutOfBounds) => "memory",
        Some(_) => "trap",
        // The store limiter refuses growth past `memory_limit` with this error (wasmtime's
        // StoreLimits with trap_on_grow_failure); match it in the chain, not in the whole
        // rendered text, which also holds the guest's backtrace and function names.
        None if e.chain().any(|c| {
            c.to_string()
                .starts_with("forcing trap when growing memory")
        }) =>
        {
            "memory"
        }
        None => "trap",
    }
}

impl Decider for WasmChain {
    fn decide(&mut self, trace: &mut TraceView<'_>) -> Decision {
        self.refresh();
        if self.set.policies.is_empty() {
            // No policies: the default decides, with no index built and no spans moved.
            return self.default_decision(Vec::new());
        }
        // The worker lends us the spans; they travel into each store and back.
        let mut data = self.data.take().unwrap_or_default();
        data.trace_id = *trace.trace_id;
        data.spans = std::mem::take(trace.spans);
        let TraceData { spans, index, .. } = &mut *data;
        index.rebuild(spans);
        let mut data = Some(data);
        self.clock = Instant::now();
        let mut edits = Vec::new();
        let mut dropped_by: Option<(Arc<str>, Cow<'static, str>)> = None;
        let mut kept_by: Option<(Arc<str>, Cow<'static, str>)> = None;
        let mut probability: Option<f64> = None;
        let mut certain_keep = false;
        let mut shadows: Vec<(Arc<str>, WitDecision)> = Vec::new();
        for i in 0..self.set.policies.len() {
            let (mode, drop_rule) = {
                let spec = &self.set.policies[i].spec;
                (spec.mode, spec.drop_rule)
            };
            if mode == PolicyMode::Enrich {
                continue;
            }
            let mut own_edits = Vec::new();
            let Some(outcome) = self.run_one(i, &mut data, &mut own_edits) else {
                continue;
            };
            let policy = &self.set.policies[i];
            if mode == PolicyMode::Shadow {
                shadows.push((policy.name.clone(), outcome.verdict));
                continue;
            }
            edits.append(&mut own_edits);
            match outcome.verdict {
                WitDecision::Drop if drop_rule => {
                    if dropped_by.is_none() {
                        dropped_by = Some((policy.name.clone(), outcome.reason));
                    }
                }
                WitDecision::Keep => {
                    match outcome.probability {
                        Some(p) => probability = Some(probability.map_or(p, |q: f64| q.max(p))),
                        None => certain_keep = true,
                    }
                    if kept_by.is_none() {
                        kept_by = Some((policy.name.clone(), outcome.reason));
                    }
                }
                // A drop from an ordinary policy is an opinion the default can stand for.
                WitDecision::Drop | WitDecision::Abstain => {}
            }
        }
        let mut decision = if let Some((policy, reason)) = dropped_by {
            Decision {
                keep: false,
                policy,
                reason,
                ..Decision::default()
            }
        } else if let Some((policy, reason)) = kept_by {
            Decision {
                keep: true,
                policy,
                reason,
                probability: if certain_keep { None } else { probability },
                edits,
            }
        } else {
            self.default_decision(edits)
        };
        if decision.keep {
            // Enrichments see the kept trace; their verdicts are not opinions on keeping it.
            for i in 0..self.set.policies.len() {
                if self.set.policies[i].spec.mode == PolicyMode::Enrich {
                    self.run_one(i, &mut data, &mut decision.edits);
                }
            }
        }
        if let Some(mut data) = data {
            *trace.spans = std::mem::take(&mut data.spans);
            self.data = Some(data);
        }
        for (name, verdict) in shadows {
            let agrees = match verdict {
                WitDecision::Keep => decision.keep,
                WitDecision::Drop => !decision.keep,
                WitDecision::Abstain => true,
            };
            self.metrics.shadow_agreement(&name, agrees);
        }
        decision
    }
}
