//! The policy chain as a [`Decider`]: one per worker thread, holding that worker's instances.
//!
//! Semantics: policies run in order; a `drop` from a policy marked `drop_rule` wins; otherwise
//! any `keep` keeps; if all abstain, the configured default applies. A `shadow` policy runs
//! and is measured, but its verdict is ignored. An `enrich` policy runs only on traces the
//! others decided to keep, after the decision, and contributes only edits. A failing call (trap, timeout, memory cap,
//! fuel) counts as the policy's `on_error` verdict, rebuilds the instance, and after repeated
//! failures quarantines the policy. Edits are kept only from calls that returned normally and
//! passed validation.
//!
//! Traces that come due together are decided as a batch. Each summary-only policy answers the
//! whole batch first, in one `decide-summaries` call; then, trace by trace, every other policy
//! is called once (and so is every policy for a trace decided alone, where `decide` is
//! cheaper), and the trace's verdicts are combined in chain order. Every policy sees every
//! trace in the same order, so a batch decides exactly as one trace at a time would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bindings::tailgate::policy::types::Decision as WitDecision;
use super::boundary::{CallClock, TraceData, thread_cpu_time};
use super::edits;
use super::metrics::{PluginMetrics, PolicyHandles};
use super::{LoadedPolicy, PolicyInstance, PolicyRuntime, PolicySet};
use crate::config::{DefaultVerdict, OnEnrichError, OnError, PolicyMode};
use crate::decide::{
    Decider, DeciderFactory, Decision, DefaultDecision, Role, Tally, TraceEdit, TraceView, Verdict,
    agrees,
};

/// Builds a [`WasmChain`] for each worker.
pub struct WasmChainFactory {
    pub runtime: Arc<PolicyRuntime>,
    pub metrics: Arc<PluginMetrics>,
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
            scratch: None,
            facts: Vec::new(),
            answers: Vec::new(),
            tally: Tally::default(),
            outcomes: Vec::new(),
            single: Vec::with_capacity(1),
            clock: Instant::now(),
            default: DefaultDecision::new(DefaultVerdict::Keep),
        })
    }
}

pub(crate) struct WasmChain {
    runtime: Arc<PolicyRuntime>,
    metrics: Arc<PluginMetrics>,
    set: Arc<PolicySet>,
    /// This worker's instance of each policy of `set`, created on first use and after a trap.
    instances: Vec<Option<PolicyInstance>>,
    /// Each policy's metric series, resolved when the set is picked up.
    handles: Vec<PolicyHandles>,
    /// When this thread's CPU clock was last read, and its value.
    cpu_read: Option<(Instant, Option<Duration>)>,
    /// The trace being decided with its index, boxed so it moves into a store and back as a
    /// pointer; kept between decisions so the index's buffers are reused.
    scratch: Option<Box<TraceData>>,
    /// The batch's facts for summary-only policies (`decide-summaries`), built once per batch.
    facts: Vec<u64>,
    /// Each summary-only policy's answer for the batch, in chain order.
    answers: Vec<BatchAnswer>,
    /// The verdicts of the trace being decided; kept so its allocations are reused.
    tally: Tally,
    /// Every outcome of the batch's calls, with the policy that answered it: a summary-only
    /// call's distinct outcomes, one per trace of any other call. Tallies index into it.
    outcomes: Vec<(usize, Outcome)>,
    /// `decide`'s one-decision output, kept so its allocation is reused.
    single: Vec<Decision>,
    /// When the previous call ended (or the decision began): each call's latency runs from
    /// here, so a chain of N policies reads the clock N + 1 times, not 2N.
    clock: Instant,
    /// The default verdict and its reason, made again only when a reload changes the verdict
    /// (see `refresh`).
    default: DefaultDecision,
}

/// A summary-only policy's answer for a batch: the index of its first outcome in
/// [`WasmChain::outcomes`] and one code per trace relative to it; `None` while it is
/// quarantined.
type BatchAnswer = Option<(u32, Vec<u32>)>;

/// One policy's contribution to a decision.
struct Outcome {
    verdict: Verdict,
    reason: Arc<str>,
    probability: Option<f64>,
    /// The call returned and every edit it asked for was taken: false for a failed call (the
    /// verdict is then `on_error`'s) and for one whose edits were refused.
    complete: bool,
}

impl WasmChain {
    /// Picks up a reloaded set; the old instances are dropped with the old set.
    fn refresh(&mut self) {
        if self.runtime.generation() != self.set.generation {
            self.set = self.runtime.live.load_full();
            self.instances.clear();
        }
        if self.instances.len() != self.set.policies.len() {
            self.instances.resize_with(self.set.policies.len(), || None);
        }
        if self.default.verdict() != self.set.default {
            self.default = DefaultDecision::new(self.set.default);
        }
        if self.handles.len() != self.set.policies.len() {
            self.handles = (self.set.policies.iter())
                .map(|p| self.metrics.policy_handles(&p.name))
                .collect();
        }
    }

    /// Makes sure policy `i` has an instance on this worker; `Err` is the failed outcome.
    fn ensure_instance(&mut self, i: usize) -> Result<(), Outcome> {
        if self.instances[i].is_some() {
            return Ok(());
        }
        let policy: &LoadedPolicy = &self.set.policies[i];
        match policy.instantiate(self.runtime.engine.engine()) {
            Ok(inst) => {
                self.instances[i] = Some(inst);
                // Building the instance is not the call: start its clock afresh.
                self.clock = Instant::now();
                Ok(())
            }
            Err(e) => {
                if let Some(suppressed) = policy.health.may_log(policy.spec.log_per_second) {
                    tracing::error!(policy = %policy.name, error = %e, suppressed, "cannot instantiate policy");
                }
                Err(self.failed(policy, "instantiate"))
            }
        }
    }

    /// The clock of a call starting now (when the previous one ended).
    fn call_clock(&mut self) -> CallClock {
        let started = self.clock;
        // The thread's CPU clock is a system call: read it at most once a millisecond. An
        // older reading only makes the deadline stricter (it counts earlier work as the call's).
        if self
            .cpu_read
            .is_none_or(|(at, _)| started.duration_since(at) > Duration::from_millis(1))
        {
            self.cpu_read = Some((started, thread_cpu_time()));
        }
        CallClock {
            started,
            cpu_at_start: self.cpu_read.and_then(|(_, cpu)| cpu),
        }
    }

    /// Ends a call begun at `clock`: records its latency.
    fn end_call(&mut self, i: usize, clock: &CallClock) {
        self.clock = Instant::now();
        let elapsed = self.clock.duration_since(clock.started);
        self.handles[i].latency.observe(elapsed.as_secs_f64());
    }

    /// A failed call: counted, the instance rebuilt for the next call, `on_error` applied.
    /// `spans`: the trace's, for a single-trace call (0 for a batch).
    fn call_failed(&mut self, i: usize, trap: &wasmtime::Error, spans: usize) -> Outcome {
        let policy: &LoadedPolicy = &self.set.policies[i];
        let kind = failure_kind(trap);
        // A trace far larger than any the policy has decided within its limits is one they
        // cannot be expected to cover: it fails (on_error applies), but traffic shaped that way
        // must not quarantine the policy for everyone.
        let oversized = matches!(kind, "timeout" | "fuel" | "memory")
            && policy.health.beyond_what_it_decided(spans);
        if let Some(suppressed) = policy.health.may_log(policy.spec.log_per_second) {
            tracing::warn!(policy = %policy.name, kind, error = %format!("{trap:#}"), suppressed, "policy call failed; applying on_error");
        }
        // A trapped instance may be in any state: rebuild it for the next trace.
        self.instances[i] = None;
        if oversized {
            self.metrics.policy_failure(&policy.name, kind);
            return self.on_error(policy, kind);
        }
        self.failed(policy, kind)
    }

    /// Runs one policy on the trace. The trace data moves into the store for the call and
    /// always comes back, whatever the guest did.
    fn run_one(
        &mut self,
        i: usize,
        data: &mut Option<Box<TraceData>>,
        edits_out: &mut Vec<TraceEdit>,
    ) -> Option<Outcome> {
        if self.set.policies[i].health.is_quarantined() {
            self.handles[i].quarantined.inc();
            return None;
        }
        if let Err(failed) = self.ensure_instance(i) {
            return Some(failed);
        }
        let trace = data.take()?;
        let clock = self.call_clock();
        // Borrowed, not cloned: an Arc clone here would bounce the policy's reference count
        // between every worker thread on every call.
        let policy: &LoadedPolicy = &self.set.policies[i];
        let inst = self.instances[i].as_mut()?;
        let (result, back) = inst.decide(policy, trace, clock);
        *data = back;
        self.end_call(i, &clock);
        let policy: &LoadedPolicy = &self.set.policies[i];
        let handles = &self.handles[i];
        match result {
            Ok(answer) => {
                let spans = data.as_ref().map_or(&[][..], |d| &d.spans[..]);
                policy.health.succeeded(spans.len());
                let is_leaf = data.as_ref().map_or(&[][..], |d| &d.index.is_leaf[..]);
                let probability = answer.probability;
                let mut complete = true;
                match edits::validate(&answer.edits, probability, spans, is_leaf, &policy.spec) {
                    Ok(mut edits) => edits_out.append(&mut edits),
                    Err(why) => {
                        complete = false;
                        handles.invalid_edits.inc();
                        if let Some(suppressed) = policy.health.may_log(policy.spec.log_per_second)
                        {
                            tracing::warn!(policy = %policy.name, %why, suppressed, "verdict edits rejected; trace left untouched");
                        }
                    }
                }
                count(handles, answer.decision, 1);
                Some(Outcome {
                    verdict: verdict_of(answer.decision),
                    reason: answer.reason,
                    probability: answer.probability.filter(|p| *p > 0.0 && *p < 1.0),
                    complete,
                })
            }
            Err(trap) => {
                let spans = data.as_ref().map_or(0, |d| d.spans.len());
                Some(self.call_failed(i, &trap, spans))
            }
        }
    }

    /// Runs summary-only policy `i` on the whole batch in one `decide-summaries` call. Its
    /// distinct outcomes are appended to [`Self::outcomes`]; the answer is the index of the
    /// first and one code per trace relative to it, or `None` while the policy is quarantined.
    fn run_summaries(&mut self, i: usize) -> BatchAnswer {
        let traces = self.facts.len() / tailgate_plugin_sdk::FACT_WORDS;
        let base = self.outcomes.len() as u32;
        if self.set.policies[i].health.is_quarantined() {
            self.handles[i].quarantined.inc_by(traces as u64);
            return None;
        }
        if let Err(failed) = self.ensure_instance(i) {
            self.outcomes.push((i, failed));
            return Some((base, vec![0; traces]));
        }
        let clock = self.call_clock();
        let policy: &LoadedPolicy = &self.set.policies[i];
        let inst = self.instances[i].as_mut()?;
        let result = inst.decide_summaries(policy, &self.facts, clock);
        self.end_call(i, &clock);
        match result {
            Ok(answer) => {
                // A batch's size says nothing of one trace's: not learned from.
                self.set.policies[i].health.succeeded(0);
                // Counted by runs: consecutive traces mostly share an outcome, and adding one
                // to the same counter trace after trace waits on its own store every time.
                let mut counts = vec![0u64; answer.outcomes.len()];
                let mut codes = answer.codes.iter();
                if let Some(&first) = codes.next() {
                    let (mut code, mut run) = (first, 1u64);
                    for &c in codes {
                        if c == code {
                            run += 1;
                        } else {
                            counts[code as usize] += run;
                            (code, run) = (c, 1);
                        }
                    }
                    counts[code as usize] += run;
                }
                for (o, n) in answer.outcomes.into_iter().zip(counts) {
                    count(&self.handles[i], o.decision, n);
                    self.outcomes.push((
                        i,
                        Outcome {
                            verdict: verdict_of(o.decision),
                            reason: o.reason,
                            probability: o.probability.filter(|p| *p > 0.0 && *p < 1.0),
                            complete: true,
                        },
                    ));
                }
                Some((base, answer.codes))
            }
            Err(trap) => {
                let failed = self.call_failed(i, &trap, 0);
                self.outcomes.push((i, failed));
                Some((base, vec![0; traces]))
            }
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
        self.on_error(policy, kind)
    }

    /// The outcome `on_error` gives a failed call.
    fn on_error(&self, policy: &LoadedPolicy, kind: &'static str) -> Outcome {
        let verdict = match policy.spec.on_error {
            OnError::Keep => Verdict::Keep,
            OnError::Drop => Verdict::Drop,
            OnError::Abstain => Verdict::Abstain,
        };
        Outcome {
            verdict,
            reason: Arc::from(format!("policy failed ({kind}); on_error")),
            probability: None,
            complete: false,
        }
    }

    /// Runs enrichment `i` on the trace in `slot`. When a fail-closed one does not complete
    /// (it failed, is quarantined, or its edits were refused), the trace's text attributes go.
    fn enrich_one(
        &mut self,
        i: usize,
        slot: &mut Option<Box<TraceData>>,
        edits_out: &mut Vec<TraceEdit>,
    ) {
        let complete = self.run_one(i, slot, edits_out).is_some_and(|o| o.complete);
        let fail_closed =
            self.set.policies[i].spec.on_enrich_error == Some(OnEnrichError::FailClosed);
        if !complete && fail_closed {
            edits_out.push(TraceEdit::RemoveStringAttributes);
            self.handles[i].failed_closed.inc();
        }
    }

    fn has_enrichments(&self) -> bool {
        (self.set.policies.iter()).any(|p| p.spec.mode == PolicyMode::Enrich)
    }
}

/// How `policy`'s verdicts count in the chain (enrichments never reach the tally).
fn role(policy: &LoadedPolicy) -> Role {
    match (policy.spec.mode, policy.spec.drop_rule) {
        (PolicyMode::Shadow, _) => Role::Shadow,
        (_, true) => Role::DropRule,
        _ => Role::Enforce,
    }
}

fn verdict_of(decision: WitDecision) -> Verdict {
    match decision {
        WitDecision::Keep => Verdict::Keep,
        WitDecision::Drop => Verdict::Drop,
        WitDecision::Abstain => Verdict::Abstain,
    }
}

/// Counts `n` calls answering `decision`.
fn count(handles: &PolicyHandles, decision: WitDecision, n: u64) {
    match decision {
        WitDecision::Keep => handles.keep.inc_by(n),
        WitDecision::Drop => handles.drop.inc_by(n),
        WitDecision::Abstain => handles.abstain.inc_by(n),
    };
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
        // A batch of one, into a buffer kept between calls: no allocation per decision.
        let mut out = std::mem::take(&mut self.single);
        self.decide_batch(std::slice::from_mut(trace), &mut out);
        let decision = out.pop().unwrap_or_default();
        self.single = out;
        decision
    }

    fn decide_batch(&mut self, traces: &mut [TraceView<'_>], out: &mut Vec<Decision>) {
        self.refresh();
        if self.set.policies.is_empty() {
            // No policies: the default decides, with no index built and no spans moved.
            out.extend(traces.iter().map(|_| self.default.decision(Vec::new())));
            return;
        }
        // A batch of one costs more through `decide-summaries` (the list in, the answer
        // record out) than through `decide`, which a summary-only policy answers the same way:
        // batch only from two traces on.
        let batched = traces.len() > 1;
        let summaries = batched && (self.set.policies.iter()).any(|p| p.summary_only);
        // Whether any policy reads the trace itself, so each trace needs its index in a store.
        let per_trace = (self.set.policies.iter())
            .any(|p| p.spec.mode != PolicyMode::Enrich && !(batched && p.summary_only));
        let enrich = self.has_enrichments();
        let mut data = self.scratch.take().unwrap_or_default();

        // 1. Summary-only policies answer the whole batch, policy by policy, from facts built
        //    with one index reused trace after trace (so it stays in cache).
        self.facts.clear();
        self.outcomes.clear();
        self.answers.clear();
        if summaries {
            for trace in traces.iter() {
                data.index.rebuild(trace.spans);
                data.index
                    .push_facts(trace.trace_id, trace.spans, &mut self.facts);
            }
            self.clock = Instant::now();
            for i in 0..self.set.policies.len() {
                let p = &self.set.policies[i];
                if p.summary_only && p.spec.mode != PolicyMode::Enrich {
                    let answer = self.run_summaries(i);
                    self.answers.push(answer);
                }
            }
        }

        // 2. Trace by trace: the other policies, then every verdict combined in chain order.
        let mut tally = std::mem::take(&mut self.tally);
        let mut own_edits = Vec::new();
        for (t, trace) in traces.iter_mut().enumerate() {
            // The trace's spans travel into each store and back.
            data.trace_id = *trace.trace_id;
            data.spans = std::mem::take(trace.spans);
            let mut indexed = false;
            if per_trace {
                data.index.rebuild(&data.spans);
                indexed = true;
                // Building the index is not a call: start the next call's clock afresh.
                self.clock = Instant::now();
            }
            let mut slot = Some(data);
            let mut next_answer = 0;
            for i in 0..self.set.policies.len() {
                let (mode, summary_only) = {
                    let p = &self.set.policies[i];
                    (p.spec.mode, p.summary_only)
                };
                if mode == PolicyMode::Enrich {
                    continue;
                }
                // This policy's answer for the trace, as an index into the batch's outcomes.
                let at = if summary_only && batched {
                    // The batch call's answer for this trace (none while quarantined).
                    let answer = &self.answers[next_answer];
                    next_answer += 1;
                    answer.as_ref().map(|(base, codes)| base + codes[t])
                } else {
                    match self.run_one(i, &mut slot, &mut own_edits) {
                        Some(outcome) => {
                            self.outcomes.push((i, outcome));
                            Some(self.outcomes.len() as u32 - 1)
                        }
                        None => {
                            own_edits.clear();
                            None
                        }
                    }
                };
                if let Some(at) = at {
                    let (_, outcome) = &self.outcomes[at as usize];
                    tally.add(
                        role(&self.set.policies[i]),
                        i as u32,
                        at,
                        outcome.verdict,
                        outcome.probability,
                        &mut own_edits,
                    );
                }
            }
            let mut decision = tally.decision(
                |at| {
                    let (p, outcome) = &self.outcomes[at as usize];
                    (self.set.policies[*p].name.clone(), outcome.reason.clone())
                },
                &self.default,
            );
            if decision.keep && enrich {
                // Enrichments see the kept trace; their verdicts are not opinions on keeping it.
                if let Some(d) = slot.as_mut().filter(|_| !indexed) {
                    d.index.rebuild(&d.spans);
                    self.clock = Instant::now();
                }
                for i in 0..self.set.policies.len() {
                    if self.set.policies[i].spec.mode == PolicyMode::Enrich {
                        self.enrich_one(i, &mut slot, &mut decision.edits);
                    }
                }
            }
            for (p, verdict) in tally.take_shadows() {
                self.metrics.shadow_agreement(
                    &self.set.policies[p as usize].name,
                    agrees(verdict, &decision),
                );
            }
            out.push(decision);
            data = slot.unwrap_or_default();
            *trace.spans = std::mem::take(&mut data.spans);
        }
        self.tally = tally;
        self.scratch = Some(data);
    }

    fn enrich_late(&mut self, late: &mut TraceView<'_>) -> Vec<TraceEdit> {
        self.refresh();
        let mut edits = Vec::new();
        if !self.has_enrichments() {
            return edits;
        }
        let mut data = self.scratch.take().unwrap_or_default();
        data.trace_id = *late.trace_id;
        data.spans = std::mem::take(late.spans);
        data.index.rebuild(&data.spans);
        self.clock = Instant::now();
        let mut slot = Some(data);
        for i in 0..self.set.policies.len() {
            if self.set.policies[i].spec.mode == PolicyMode::Enrich {
                self.enrich_one(i, &mut slot, &mut edits);
            }
        }
        let mut data = slot.unwrap_or_default();
        *late.spans = std::mem::take(&mut data.spans);
        self.scratch = Some(data);
        edits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::decide::DeciderFactory;
    use crate::plugin::PolicyRuntime;
    use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader};
    use opentelemetry_proto::tonic::trace::v1::{Span, Status};
    use prost::Message;

    /// Summary-only policies (decided through `decide-summaries`) beside one that reads
    /// attributes (decided through `decide`), a drop rule and a shadow.
    const CHAIN: &str = r#"
[plugins]
cache_dir = ""
[decide]
default = "drop"
[[policies]]
name = "health"
plugin = "drop"
drop_rule = true
[policies.config]
names = ["GET /health"]
[[policies]]
name = "errors"
plugin = "keep-errors"
[[policies]]
name = "vip"
plugin = "attribute"
[policies.config]
key = "tier"
equals = "vip"
[[policies]]
name = "slow"
plugin = "latency"
[policies.config]
threshold_ms = 40
[[policies]]
name = "sample"
plugin = "probabilistic"
[policies.config]
rate = 0.25
[[policies]]
name = "watch"
plugin = "span-count"
mode = "shadow"
[policies.config]
min_spans = 3
"#;

    fn chain(text: &str) -> Box<dyn Decider> {
        let config = Config::parse(text, "chain-test.toml").expect("config");
        let runtime = PolicyRuntime::start(&config, std::path::Path::new(".")).expect("load");
        WasmChainFactory {
            runtime,
            metrics: crate::plugin::PluginMetrics::new(&crate::telemetry::Registry::new()),
        }
        .build()
    }

    /// Trace `n`: 1 to 4 spans; some with an error, some slow, some with `tier = vip`, some
    /// health checks, and the root of every fifth carrying an explicit OTel randomness.
    fn trace(n: u64) -> ([u8; 16], Vec<BufferedSpan>) {
        let scope = Arc::new(ScopeHeader {
            resource: Arc::new(ResourceHeader {
                fields: Box::new([]),
                resource: Box::new([]),
                service: Arc::from("svc"),
            }),
            fields: Box::new([]),
        });
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        id[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        let spans = (0..1 + n % 4)
            .map(|i| {
                let span_id = (n * 16 + i + 1).to_be_bytes();
                let parent = if i == 0 { [0; 8] } else { (n * 16 + 1).to_be_bytes() };
                let start = 1_700_000_000_000_000_000 + i * 1_000_000;
                let end = start + if n % 7 == 3 { 50_000_000 } else { 2_000_000 };
                let error = i == 1 && n % 11 == 5;
                let mut attributes = Vec::new();
                if n % 9 == 2 {
                    attributes.push(opentelemetry_proto::tonic::common::v1::KeyValue {
                        key: "tier".into(),
                        value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                            value: Some(
                                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                                    "vip".into(),
                                ),
                            ),
                        }),
                        key_strindex: 0,
                    });
                }
                let span = Span {
                    trace_id: id.to_vec(),
                    span_id: span_id.to_vec(),
                    parent_span_id: if i == 0 { vec![] } else { parent.to_vec() },
                    name: if i == 0 && n % 13 == 4 {
                        "GET /health".into()
                    } else {
                        format!("op{i}")
                    },
                    trace_state: if i == 0 && n.is_multiple_of(5) {
                        // Top randomness: kept by any sampling rate.
                        "ot=rv:ffffffffffffff".into()
                    } else {
                        String::new()
                    },
                    start_time_unix_nano: start,
                    end_time_unix_nano: end,
                    attributes,
                    status: Some(Status {
                        code: if error { 2 } else { 0 },
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                BufferedSpan {
                    bytes: span.encode_to_vec().into_boxed_slice(),
                    scope: scope.clone(),
                    span_id,
                    parent_span_id: parent,
                    start_unix_nano: start,
                    end_unix_nano: end,
                    status_code: if error { 2 } else { 0 },
                    kind: 0,
                    has_trace_state: !span.trace_state.is_empty(),
                }
            })
            .collect();
        (id, spans)
    }

    fn key(d: &Decision) -> (bool, String, String, Option<u64>) {
        (
            d.keep,
            d.policy.to_string(),
            d.reason.to_string(),
            d.probability.map(f64::to_bits),
        )
    }

    #[test]
    fn a_batch_decides_exactly_as_one_trace_at_a_time() {
        let mut traces: Vec<_> = (1..=300).map(trace).collect();
        let mut single = chain(CHAIN);
        let alone: Vec<Decision> = (traces.iter_mut())
            .map(|(id, spans)| {
                single.decide(&mut TraceView {
                    trace_id: id,
                    spans,
                })
            })
            .collect();

        let mut batched = chain(CHAIN);
        let mut together = Vec::new();
        let mut at = 0;
        // Batches of varying sizes, as a worker forms them.
        for size in (1..).map(|k| 1 + (k * 7) % 40) {
            if at == traces.len() {
                break;
            }
            let end = (at + size).min(traces.len());
            let mut views: Vec<TraceView<'_>> = (traces[at..end].iter_mut())
                .map(|(id, spans)| TraceView {
                    trace_id: id,
                    spans,
                })
                .collect();
            batched.decide_batch(&mut views, &mut together);
            at = end;
        }
        assert_eq!(together.len(), traces.len());
        let a: Vec<_> = alone.iter().map(key).collect();
        let b: Vec<_> = together.iter().map(key).collect();
        assert_eq!(a, b);
        // The spans came back to the caller.
        for (n, (_, spans)) in (1u64..).zip(&traces) {
            assert_eq!(spans.len() as u64, 1 + n % 4);
        }

        // Each rule decided what it should, in chain order.
        for (n, d) in (1u64..).zip(&together) {
            let (expected, policy) = if n % 13 == 4 {
                (false, "health")
            } else if n % 11 == 5 && n % 4 >= 1 {
                (true, "errors")
            } else if n % 9 == 2 {
                (true, "vip")
            } else if n % 7 == 3 {
                (true, "slow")
            } else {
                // OTel consistent sampling at 0.25: R >= 2^56 - 2^54, R from the root's
                // explicit `rv` when it has one, else from the id's lower 56 bits.
                let r = if n.is_multiple_of(5) {
                    (1 << 56) - 1
                } else {
                    n.wrapping_mul(0x9E37_79B9_7F4A_7C15) & ((1 << 56) - 1)
                };
                if r >= (1u64 << 56) - (1 << 54) {
                    (true, "sample")
                } else {
                    (false, "default")
                }
            };
            assert_eq!((d.keep, &*d.policy), (expected, policy), "trace {n}");
            if policy == "sample" {
                assert_eq!(d.probability, Some(0.25), "trace {n}");
            }
        }
        assert!(together.iter().filter(|d| &*d.policy == "sample").count() > 60);
    }
}
