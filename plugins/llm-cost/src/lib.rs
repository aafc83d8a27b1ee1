//! `llm-cost`: price every LLM call in a trace, count the spend per tenant,
//! user, feature and model, stamp it on the spans, and keep the traces that
//! cost more than a fixed limit or more than is usual for their root span
//! name.
//!
//! An LLM span is a span with a numeric (int or double, finite, >= 0) token
//! count: `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`, or the
//! older `llm.input_tokens` / `llm.output_tokens` where the `gen_ai` one is
//! missing or not numeric (string counts are never parsed). A missing count
//! is 0. The model is `gen_ai.request.model`, else `llm.model` (non-empty
//! strings). Its cost in USD is
//! `input / 1000 * input_per_1k + output / 1000 * output_per_1k`, with the
//! prices of the model's `pricing` entry (exact name match), else `fallback`.
//!
//! Patches, applied by the host only if the trace is finally kept (by this
//! policy or another):
//! - on each LLM span: `llm.cost_usd` (double); `llm.cost.fallback_price =
//!   true` when the model has no `pricing` entry (or no model is named); and
//!   `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//!   `gen_ai.request.model` copied from their `llm.*` names where a span has
//!   only those;
//! - on the root span (the summary's; none without a root):
//!   `llm.cost_usd.total` (double), `llm.usage.input_tokens.total` and
//!   `llm.usage.output_tokens.total` (ints).
//!
//! A verdict stays within [`PATCH_BUDGET`] patches and about
//! [`PATCH_BYTE_BUDGET`] bytes, a quarter of the host's default
//! `max_patches` / `max_patch_bytes`, since a verdict over a cap loses all
//! its patches. When the per-span patches would not fit, the `gen_ai.*`
//! copies go first, then the per-span costs: the root totals always stay.
//!
//! Counters, for every trace with LLM spans, kept or not: `llm_cost_usd`,
//! `llm_input_tokens` and `llm_output_tokens`, added once per distinct label
//! set in the trace (exposed as `tailgate_policy_llm_cost_usd_total{policy=…,
//! tenant=…, user=…, feature=…, model=…}` and so on). Labels: `tenant`,
//! `user`, `feature` from the span attributes `tenant.id`, `user.id`,
//! `feature.name` of the LLM span, else of the root span, else `"unknown"`
//! (strings, ints, doubles and bools are used as text); `model` is the
//! model, or `"unknown"`. `user` can have many values: the host folds those
//! beyond `plugins.max_label_values` into `__overflow__`.
//!
//! Decision, for traces with LLM spans (others abstain, unpriced and
//! unlearned):
//! - keep with [`REASON_THRESHOLD`] when the trace's total cost is above
//!   `threshold_usd`;
//! - else keep with `llm_cost_p90` (from `percentile`) when the total is
//!   above the `percentile` of the totals of recent traces with the same
//!   root span name (exact, over the last `window` of them; see
//!   `tailgate_plugin_sdk::stats`); every trace with LLM spans is learned
//!   from, kept or not;
//! - else keep with [`REASON_WARMUP`] while that root name has seen fewer
//!   than `warmup` traces. Learning is per policy instance (one per host
//!   worker thread), so each worker warms up on its own;
//! - else abstain (with the patches, in case another policy keeps it).
//!
//! Config:
//! - `fallback = { input_per_1k, output_per_1k }` (required): USD per 1000
//!   tokens for models missing from `pricing`. Required because no default
//!   price is right: 0 would hide spend, any other number would invent it.
//! - `pricing."<model>" = { input_per_1k, output_per_1k }` (default none).
//! - `threshold_usd` (number >= 0, default none): keep traces costing more.
//! - `percentile` (number in [0, 1], default 0.90): 0 turns the learned
//!   threshold, and with it the warm-up keeps, off. With `percentile = 0`
//!   and no `threshold_usd` the policy never keeps: it only counts and
//!   enriches.
//! - `warmup` (integer, default 100), `window` (integer, 1..=65536, default
//!   1024), `max_keys` (integer, default 256; 0 = one window for all root
//!   names): as in `adaptive-latency`; `window * (max_keys + 1)` must be at
//!   most 524288.
//!
//! Cost in Wasm host calls, per trace: 4 without LLM spans (one `count` per
//! token attribute, no allocation). With LLM spans 10 to 15: those 4, the
//! summary, one `attr-column` per token attribute present in the trace, the
//! model column (and the `llm.model` one only if a span needs it), the three
//! label columns and the root name (unless `percentile = 0`); then 3
//! `counter-add` per distinct label set.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use tailgate_plugin_sdk::stats::{
    DEFAULT_MAX_KEYS, DEFAULT_WARMUP, DEFAULT_WINDOW, Judgement, KeyedQuantiles, QuantileSettings,
    percentile_label,
};
use tailgate_plugin_sdk::{
    AttrValue, DictColumn, Patch, PatchTarget, Policy, Trace, Verdict, export_policy,
};

/// Reason on traces kept because they cost more than `threshold_usd`.
pub const REASON_THRESHOLD: &str = "llm_cost";
/// Reason on traces kept while their root name is warming up.
pub const REASON_WARMUP: &str = "llm_cost_warmup";
/// The default `percentile`.
pub const DEFAULT_PERCENTILE: f64 = 0.90;

/// Most patches in one verdict: a quarter of the host's default
/// `max_patches` (256, host/src/config.rs).
pub const PATCH_BUDGET: usize = 64;
/// Most estimated patch bytes in one verdict: a quarter of the host's
/// default `max_patch_bytes` (64 KiB, host/src/config.rs).
pub const PATCH_BYTE_BUDGET: usize = 16 << 10;

// Attributes read.
pub const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub const MODEL: &str = "gen_ai.request.model";
pub const LEGACY_INPUT_TOKENS: &str = "llm.input_tokens";
pub const LEGACY_OUTPUT_TOKENS: &str = "llm.output_tokens";
pub const LEGACY_MODEL: &str = "llm.model";

// Attributes written.
pub const COST: &str = "llm.cost_usd";
pub const FALLBACK_PRICE: &str = "llm.cost.fallback_price";
pub const COST_TOTAL: &str = "llm.cost_usd.total";
pub const INPUT_TOKENS_TOTAL: &str = "llm.usage.input_tokens.total";
pub const OUTPUT_TOKENS_TOTAL: &str = "llm.usage.output_tokens.total";

// Counters.
pub const COUNTER_COST: &str = "llm_cost_usd";
pub const COUNTER_INPUT_TOKENS: &str = "llm_input_tokens";
pub const COUNTER_OUTPUT_TOKENS: &str = "llm_output_tokens";

/// Counter label -> the span attribute it is read from (the fourth label,
/// `model`, is the model).
pub const LABEL_ATTRS: [(&str, &str); 3] = [
    ("tenant", "tenant.id"),
    ("user", "user.id"),
    ("feature", "feature.name"),
];
/// Label value when neither the span nor the root has one.
pub const UNKNOWN: &str = "unknown";

/// Prices of one model, USD per 1000 tokens.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

impl Price {
    fn cost(&self, input: f64, output: f64) -> f64 {
        input / 1000.0 * self.input_per_1k + output / 1000.0 * self.output_per_1k
    }

    fn validate(&self, at: &str) -> Result<(), String> {
        for (name, v) in [
            ("input_per_1k", self.input_per_1k),
            ("output_per_1k", self.output_per_1k),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{at}.{name} must be a finite number >= 0, got {v}"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub pricing: BTreeMap<String, Price>,
    pub fallback: Price,
    #[serde(default)]
    pub threshold_usd: Option<f64>,
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    #[serde(default = "default_warmup")]
    pub warmup: u64,
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_percentile() -> f64 {
    DEFAULT_PERCENTILE
}
fn default_warmup() -> u64 {
    DEFAULT_WARMUP
}
fn default_window() -> usize {
    DEFAULT_WINDOW
}
fn default_max_keys() -> usize {
    DEFAULT_MAX_KEYS
}

pub struct LlmCost {
    pricing: BTreeMap<String, Price>,
    fallback: Price,
    threshold_usd: Option<f64>,
    /// Trace totals per root name; `None` with `percentile = 0`.
    costs: Option<KeyedQuantiles>,
    /// `llm_cost_p90` and the like, built once.
    percentile_reason: String,
}

/// One LLM span, priced.
struct LlmCall<'a> {
    span: u32,
    input: f64,
    output: f64,
    model: Option<&'a str>,
    cost: f64,
    fallback_price: bool,
    /// `gen_ai.*` values to fill in from their `llm.*` names.
    fill_input: Option<&'a AttrValue>,
    fill_output: Option<&'a AttrValue>,
    fill_model: Option<&'a str>,
}

/// What one label set in a trace adds to the counters.
struct LabelTotals<'a> {
    /// tenant, user, feature, model.
    labels: [Cow<'a, str>; 4],
    cost: f64,
    input: f64,
    output: f64,
}

fn at(column: &[Option<AttrValue>], span: u32) -> Option<&AttrValue> {
    column.get(span as usize)?.as_ref()
}

fn tokens(value: Option<&AttrValue>) -> Option<f64> {
    value?.as_f64().filter(|t| t.is_finite() && *t >= 0.0)
}

fn text(value: Option<&AttrValue>) -> Option<&str> {
    value?.as_str().filter(|s| !s.is_empty())
}

/// A label value from an attribute: strings as they are, other scalars as
/// text; bytes, arrays and empty strings count as absent.
fn label(value: Option<&AttrValue>) -> Option<Cow<'_, str>> {
    match value? {
        AttrValue::Str(s) if !s.is_empty() => Some(Cow::Borrowed(s)),
        v @ (AttrValue::Int(_) | AttrValue::Double(_) | AttrValue::Bool(_)) => {
            Some(Cow::Owned(v.to_string()))
        }
        _ => None,
    }
}

/// Payload bytes of a number or bool, at most (a varint s64 takes 10).
const SCALAR_BYTES: usize = 10;

/// The host sizes a patch as its encoded OTLP `KeyValue`; this overestimates
/// it (the tags and lengths around key and value take at most 8 bytes).
fn patch_bytes(key: &str, payload: usize) -> usize {
    key.len() + payload + 8
}

fn payload_bytes(value: &AttrValue) -> usize {
    match value {
        AttrValue::Str(s) | AttrValue::Json(s) => s.len(),
        AttrValue::Bytes(b) => b.len(),
        AttrValue::Int(_) | AttrValue::Double(_) | AttrValue::Bool(_) => SCALAR_BYTES,
    }
}

impl Policy for LlmCost {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        c.fallback.validate("fallback")?;
        for (model, price) in &c.pricing {
            if model.is_empty() {
                return Err("pricing: model names must not be empty".to_owned());
            }
            price.validate(&format!("pricing.\"{model}\""))?;
        }
        if let Some(t) = c.threshold_usd
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!(
                "threshold_usd must be a finite number >= 0, got {t}"
            ));
        }
        if !(0.0..=1.0).contains(&c.percentile) {
            return Err(format!(
                "percentile must be in [0, 1] (0 turns it off), got {}",
                c.percentile
            ));
        }
        let costs = if c.percentile == 0.0 {
            None
        } else {
            Some(KeyedQuantiles::new(QuantileSettings {
                percentile: c.percentile,
                window: c.window,
                warmup: c.warmup,
                max_keys: c.max_keys,
            })?)
        };
        Ok(LlmCost {
            pricing: c.pricing,
            fallback: c.fallback,
            threshold_usd: c.threshold_usd,
            costs,
            percentile_reason: format!("llm_cost_{}", percentile_label(c.percentile)),
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        // Most traces make no LLM call: find out with four calls that
        // allocate nothing before fetching any column.
        let present = [
            INPUT_TOKENS,
            OUTPUT_TOKENS,
            LEGACY_INPUT_TOKENS,
            LEGACY_OUTPUT_TOKENS,
        ]
        .map(|key| trace.count_attr(key) > 0);
        if !present.contains(&true) {
            return Verdict::abstain();
        }
        let column = |key: &str, wanted: bool| {
            if wanted {
                trace.attr_column(key)
            } else {
                Vec::new()
            }
        };
        let input = column(INPUT_TOKENS, present[0]);
        let output = column(OUTPUT_TOKENS, present[1]);
        let legacy_input = column(LEGACY_INPUT_TOKENS, present[2]);
        let legacy_output = column(LEGACY_OUTPUT_TOKENS, present[3]);
        // Text columns repeat a few values over many spans: dictionary-encoded,
        // each distinct string crosses into the guest once.
        let models = trace.attr_column_dict(MODEL);

        let n = trace.span_count();
        let mut calls: Vec<LlmCall> = Vec::new();
        for span in 0..n {
            let (gi, go) = (at(&input, span), at(&output, span));
            let (li, lo) = (
                tokens(at(&legacy_input, span)),
                tokens(at(&legacy_output, span)),
            );
            let (ti, to) = (tokens(gi), tokens(go));
            if ti.is_none() && to.is_none() && li.is_none() && lo.is_none() {
                continue;
            }
            calls.push(LlmCall {
                span,
                input: ti.or(li).unwrap_or(0.0),
                output: to.or(lo).unwrap_or(0.0),
                model: text(models.get(span)),
                cost: 0.0,
                fallback_price: false,
                // Only where the gen_ai name is absent, not merely unusable,
                // and the llm.* value is a usable count.
                fill_input: (gi.is_none() && li.is_some())
                    .then(|| at(&legacy_input, span))
                    .flatten(),
                fill_output: (go.is_none() && lo.is_some())
                    .then(|| at(&legacy_output, span))
                    .flatten(),
                fill_model: None,
            });
        }
        if calls.is_empty() {
            // Only negative or non-finite counts: nothing to price.
            return Verdict::abstain();
        }
        let legacy_models = if calls.iter().any(|c| c.model.is_none()) {
            trace.attr_column_dict(LEGACY_MODEL)
        } else {
            DictColumn::default()
        };
        let label_columns = LABEL_ATTRS.map(|(_, key)| trace.attr_column_dict(key));
        let root = trace.summary().root;
        let root_labels = root.map(|r| label_columns.each_ref().map(|col| label(col.get(r))));

        let (mut total_cost, mut total_input, mut total_output) = (0.0, 0.0, 0.0);
        let mut by_labels: Vec<LabelTotals> = Vec::new();
        for call in &mut calls {
            if call.model.is_none() {
                let legacy = text(legacy_models.get(call.span));
                call.model = legacy;
                // Fill only where gen_ai.request.model is absent altogether.
                if models.get(call.span).is_none() {
                    call.fill_model = legacy;
                }
            }
            let price = call.model.and_then(|m| self.pricing.get(m));
            call.fallback_price = price.is_none();
            call.cost = price
                .unwrap_or(&self.fallback)
                .cost(call.input, call.output);
            total_cost += call.cost;
            total_input += call.input;
            total_output += call.output;

            let [tenant, user, feature] = std::array::from_fn(|k| {
                label(label_columns[k].get(call.span))
                    .or_else(|| root_labels.as_ref().and_then(|r| r[k].clone()))
                    .unwrap_or(Cow::Borrowed(UNKNOWN))
            });
            let labels = [
                tenant,
                user,
                feature,
                Cow::Borrowed(call.model.unwrap_or(UNKNOWN)),
            ];
            match by_labels.iter_mut().find(|t| t.labels == labels) {
                Some(t) => {
                    t.cost += call.cost;
                    t.input += call.input;
                    t.output += call.output;
                }
                None => by_labels.push(LabelTotals {
                    labels,
                    cost: call.cost,
                    input: call.input,
                    output: call.output,
                }),
            }
        }

        for t in &by_labels {
            let labels = [
                ("tenant", &*t.labels[0]),
                ("user", &*t.labels[1]),
                ("feature", &*t.labels[2]),
                ("model", &*t.labels[3]),
            ];
            for (name, value) in [
                (COUNTER_COST, t.cost),
                (COUNTER_INPUT_TOKENS, t.input),
                (COUNTER_OUTPUT_TOKENS, t.output),
            ] {
                // Absurd token counts can overflow to infinity, which the
                // host would refuse.
                if value.is_finite() {
                    tailgate_plugin_sdk::counter_add(name, &labels, value);
                }
            }
        }

        let over_threshold = self.threshold_usd.is_some_and(|t| total_cost > t);
        let judgement = match &mut self.costs {
            Some(costs) => costs.check_and_observe(&trace.root_name(), total_cost),
            None => Judgement::Ignored,
        };
        let mut verdict = if over_threshold {
            Verdict::keep(REASON_THRESHOLD)
        } else {
            match judgement {
                Judgement::Judged { above: true, .. } => {
                    Verdict::keep(self.percentile_reason.as_str())
                }
                Judgement::WarmingUp => Verdict::keep(REASON_WARMUP),
                Judgement::Judged { above: false, .. } | Judgement::Ignored => Verdict::abstain(),
            }
        };
        verdict.patches = patches(root, &calls, total_cost, total_input, total_output);
        verdict
    }
}

/// The verdict's patches: the root totals, then as many of the per-span
/// patches as fit the budget (see the crate docs).
fn patches(
    root: Option<u32>,
    calls: &[LlmCall],
    total_cost: f64,
    total_input: f64,
    total_output: f64,
) -> Vec<Patch> {
    let span_patch = |span: u32, key: &str, value: AttrValue| Patch {
        target: PatchTarget::Span(span),
        key: key.to_owned(),
        value,
    };
    let mut out = Vec::new();
    if let Some(r) = root {
        // `as` saturates, and token totals are far below 2^53 in practice.
        out.push(span_patch(r, COST_TOTAL, AttrValue::Double(total_cost)));
        out.push(span_patch(
            r,
            INPUT_TOKENS_TOTAL,
            AttrValue::Int(total_input.round() as i64),
        ));
        out.push(span_patch(
            r,
            OUTPUT_TOKENS_TOTAL,
            AttrValue::Int(total_output.round() as i64),
        ));
    }
    let count = out.len();
    let bytes: usize = out
        .iter()
        .map(|p| patch_bytes(&p.key, payload_bytes(&p.value)))
        .sum();

    // Measure the per-span patches before building any.
    let (mut cost_count, mut cost_bytes, mut fill_count, mut fill_bytes) = (0, 0, 0, 0);
    for c in calls {
        cost_count += 1;
        cost_bytes += patch_bytes(COST, SCALAR_BYTES);
        if c.fallback_price {
            cost_count += 1;
            cost_bytes += patch_bytes(FALLBACK_PRICE, SCALAR_BYTES);
        }
        for (key, value) in [(INPUT_TOKENS, c.fill_input), (OUTPUT_TOKENS, c.fill_output)] {
            if let Some(v) = value {
                fill_count += 1;
                fill_bytes += patch_bytes(key, payload_bytes(v));
            }
        }
        if let Some(m) = c.fill_model {
            fill_count += 1;
            fill_bytes += patch_bytes(MODEL, m.len());
        }
    }
    let fits = |n: usize, b: usize| count + n <= PATCH_BUDGET && bytes + b <= PATCH_BYTE_BUDGET;
    let with_costs = fits(cost_count, cost_bytes);
    let with_fills = with_costs && fits(cost_count + fill_count, cost_bytes + fill_bytes);
    if !with_costs {
        return out;
    }
    out.reserve(cost_count + if with_fills { fill_count } else { 0 });
    for c in calls {
        out.push(span_patch(c.span, COST, AttrValue::Double(c.cost)));
        if c.fallback_price {
            out.push(span_patch(c.span, FALLBACK_PRICE, AttrValue::Bool(true)));
        }
        if with_fills {
            if let Some(v) = c.fill_input {
                out.push(span_patch(c.span, INPUT_TOKENS, v.clone()));
            }
            if let Some(v) = c.fill_output {
                out.push(span_patch(c.span, OUTPUT_TOKENS, v.clone()));
            }
            if let Some(m) = c.fill_model {
                out.push(span_patch(c.span, MODEL, AttrValue::from(m)));
            }
        }
    }
    out
}

export_policy!(LlmCost);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    /// gpt-4o and claude priced, anything else at the fallback.
    const PRICED: &str = r#"{
        "pricing": {
            "gpt-4o": {"input_per_1k": 0.0025, "output_per_1k": 0.01},
            "claude-sonnet-4": {"input_per_1k": 0.003, "output_per_1k": 0.015}
        },
        "fallback": {"input_per_1k": 0.001, "output_per_1k": 0.002}"#;

    /// `PRICED` plus `extra` config keys.
    fn policy(extra: &str) -> LlmCost {
        let sep = if extra.is_empty() { "" } else { "," };
        testing::init::<LlmCost>(&format!("{PRICED}{sep}{extra}}}")).unwrap()
    }

    fn decide(p: &mut LlmCost, t: &Trace) -> Verdict {
        let v = testing::decide(p, t);
        testing::check_verdict(t, &v).unwrap();
        v
    }

    fn patch<'v>(v: &'v Verdict, span: u32, key: &str) -> Option<&'v AttrValue> {
        let found: Vec<_> = v
            .patches
            .iter()
            .filter(|p| p.target == PatchTarget::Span(span) && p.key == key)
            .collect();
        assert!(found.len() <= 1, "{key} patched {} times", found.len());
        found.first().map(|p| &p.value)
    }

    fn cost_of(v: &Verdict, span: u32, key: &str) -> f64 {
        patch(v, span, key)
            .and_then(AttrValue::as_f64)
            .unwrap_or_else(|| panic!("no {key} on span {span}: {:?}", v.patches))
    }

    fn assert_close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    /// A root and one LLM call costing `1000 * input_per_1k` of `model`.
    fn one_call(root: &str, model: &str, input: i64) -> Trace {
        TraceBuilder::new()
            .span(root)
            .attr("tenant.id", "acme")
            .span("chat")
            .child_of(0)
            .attr(MODEL, model)
            .attr(INPUT_TOKENS, input)
            .build()
    }

    #[test]
    fn prices_each_model_and_falls_back_for_unknown_ones() {
        let mut p = policy("");
        let trace = TraceBuilder::new()
            .span("agent.run")
            .span("chat gpt-4o")
            .child_of(0)
            .attr(MODEL, "gpt-4o")
            .attr(INPUT_TOKENS, 1000)
            .attr(OUTPUT_TOKENS, 500)
            .span("tool.search")
            .child_of(0)
            .span("chat claude")
            .child_of(0)
            .attr(MODEL, "claude-sonnet-4")
            .attr(INPUT_TOKENS, 2000)
            .attr(OUTPUT_TOKENS, 1000.0)
            .span("chat mystery")
            .child_of(0)
            .attr(MODEL, "mystery-7b")
            .attr(INPUT_TOKENS, 1000)
            .attr(OUTPUT_TOKENS, 1000)
            .build();
        let v = decide(&mut p, &trace);
        // 1.0 * 0.0025 + 0.5 * 0.01
        assert_close(cost_of(&v, 1, COST), 0.0075);
        // 2.0 * 0.003 + 1.0 * 0.015
        assert_close(cost_of(&v, 3, COST), 0.021);
        // 1.0 * 0.001 + 1.0 * 0.002, at the fallback price
        assert_close(cost_of(&v, 4, COST), 0.003);
        assert_eq!(patch(&v, 4, FALLBACK_PRICE), Some(&AttrValue::Bool(true)));
        assert_eq!(patch(&v, 1, FALLBACK_PRICE), None);
        assert_eq!(patch(&v, 3, FALLBACK_PRICE), None);
        // The tool span is no LLM call.
        assert_eq!(patch(&v, 2, COST), None);
        assert_close(cost_of(&v, 0, COST_TOTAL), 0.0315);
        assert_eq!(
            patch(&v, 0, INPUT_TOKENS_TOTAL),
            Some(&AttrValue::Int(4000))
        );
        assert_eq!(
            patch(&v, 0, OUTPUT_TOKENS_TOTAL),
            Some(&AttrValue::Int(2500))
        );
        // Nothing to fill: every span used the gen_ai names.
        assert_eq!(v.patches.len(), 3 + 3 + 1);
    }

    #[test]
    fn llm_names_are_read_and_copied_to_the_gen_ai_names() {
        let mut p = policy("");
        let trace = TraceBuilder::new()
            .span("root")
            .span("legacy")
            .child_of(0)
            .attr(LEGACY_MODEL, "gpt-4o")
            .attr(LEGACY_INPUT_TOKENS, 2000)
            .attr(LEGACY_OUTPUT_TOKENS, 100)
            .span("both")
            .child_of(0)
            .attr(MODEL, "claude-sonnet-4")
            .attr(LEGACY_MODEL, "gpt-4o")
            .attr(INPUT_TOKENS, 1000)
            .attr(LEGACY_INPUT_TOKENS, 9999)
            .attr(LEGACY_OUTPUT_TOKENS, 1000)
            .span("unusable gen_ai count")
            .child_of(0)
            .attr(INPUT_TOKENS, "1000")
            .attr(LEGACY_INPUT_TOKENS, 1000)
            .build();
        let v = decide(&mut p, &trace);
        // 2.0 * 0.0025 + 0.1 * 0.01
        assert_close(cost_of(&v, 1, COST), 0.006);
        assert_eq!(patch(&v, 1, INPUT_TOKENS), Some(&AttrValue::Int(2000)));
        assert_eq!(patch(&v, 1, OUTPUT_TOKENS), Some(&AttrValue::Int(100)));
        assert_eq!(patch(&v, 1, MODEL), Some(&AttrValue::from("gpt-4o")));
        // gen_ai wins where present; llm.* fills only what is missing.
        // 1.0 * 0.003 + 1.0 * 0.015
        assert_close(cost_of(&v, 2, COST), 0.018);
        assert_eq!(patch(&v, 2, INPUT_TOKENS), None);
        assert_eq!(patch(&v, 2, MODEL), None);
        assert_eq!(patch(&v, 2, OUTPUT_TOKENS), Some(&AttrValue::Int(1000)));
        // A string count is unusable, so llm.* prices the span, but the
        // span's own gen_ai value is not overwritten. No model: fallback.
        assert_close(cost_of(&v, 3, COST), 0.001);
        assert_eq!(patch(&v, 3, FALLBACK_PRICE), Some(&AttrValue::Bool(true)));
        assert_eq!(patch(&v, 3, INPUT_TOKENS), None);
        assert_eq!(
            patch(&v, 0, INPUT_TOKENS_TOTAL),
            Some(&AttrValue::Int(4000))
        );
    }

    #[test]
    fn counters_are_summed_per_label_set_across_traces() {
        let mut p = policy("");
        testing::reset();
        let trace = |tenant_on_root: &str| {
            TraceBuilder::new()
                .span("agent.run")
                .attr("tenant.id", tenant_on_root)
                .attr("feature.name", "summarise")
                .span("chat")
                .child_of(0)
                .attr("user.id", "u1")
                .attr(MODEL, "gpt-4o")
                .attr(INPUT_TOKENS, 1000)
                .attr(OUTPUT_TOKENS, 100)
                .span("chat again")
                .child_of(0)
                .attr("user.id", "u1")
                .attr(MODEL, "gpt-4o")
                .attr(INPUT_TOKENS, 1000)
                .attr(OUTPUT_TOKENS, 100)
                .span("chat for globex")
                .child_of(0)
                .attr("tenant.id", "globex")
                .attr(MODEL, "claude-sonnet-4")
                .attr(INPUT_TOKENS, 1000)
                .build()
        };
        decide(&mut p, &trace("acme"));
        decide(&mut p, &trace("acme"));
        decide(&mut p, &trace("initech"));
        let acme = [
            ("tenant", "acme"),
            ("user", "u1"),
            ("feature", "summarise"),
            ("model", "gpt-4o"),
        ];
        // Two traces, two calls each of 1.0 * 0.0025 + 0.1 * 0.01.
        assert_close(testing::counter(COUNTER_COST, &acme), 4.0 * 0.0035);
        assert_eq!(testing::counter(COUNTER_INPUT_TOKENS, &acme), 4000.0);
        assert_eq!(testing::counter(COUNTER_OUTPUT_TOKENS, &acme), 400.0);
        // The span's own tenant wins over the root's; no user anywhere.
        let globex = [
            ("tenant", "globex"),
            ("user", UNKNOWN),
            ("feature", "summarise"),
            ("model", "claude-sonnet-4"),
        ];
        assert_close(testing::counter(COUNTER_COST, &globex), 3.0 * 0.003);
        assert_eq!(testing::counter(COUNTER_OUTPUT_TOKENS, &globex), 0.0);
        let initech = [
            ("tenant", "initech"),
            ("user", "u1"),
            ("feature", "summarise"),
            ("model", "gpt-4o"),
        ];
        assert_eq!(testing::counter(COUNTER_INPUT_TOKENS, &initech), 2000.0);
        // Three label sets, three counters each.
        assert_eq!(testing::counters().len(), 9);
    }

    #[test]
    fn labels_fall_back_to_unknown_and_scalars_become_text() {
        let mut p = policy("");
        testing::reset();
        // No root: nothing to fall back to, and no root stamp.
        let trace = TraceBuilder::new()
            .span("chat")
            .missing_parent()
            .attr("tenant.id", 42)
            .attr("user.id", "")
            .attr(LEGACY_OUTPUT_TOKENS, 1000)
            .build();
        let v = decide(&mut p, &trace);
        let labels = [
            ("tenant", "42"),
            ("user", UNKNOWN),
            ("feature", UNKNOWN),
            ("model", UNKNOWN),
        ];
        assert_close(testing::counter(COUNTER_COST, &labels), 0.002);
        assert_eq!(patch(&v, 0, COST_TOTAL), None);
        assert_close(cost_of(&v, 0, COST), 0.002);
    }

    #[test]
    fn traces_without_llm_calls_abstain_untouched_and_unlearned() {
        let mut p = policy(r#""warmup": 1"#);
        testing::reset();
        let plain = TraceBuilder::new()
            .span("GET /")
            .attr("tenant.id", "acme")
            .span("db")
            .child_of(0)
            .build();
        let negative = TraceBuilder::new()
            .span("GET /")
            .attr(INPUT_TOKENS, -5)
            .build();
        for t in [&plain, &negative] {
            let v = decide(&mut p, t);
            assert!(v.is_abstain());
            assert!(v.patches.is_empty());
        }
        assert!(testing::counters().is_empty());
        assert!(p.costs.as_ref().unwrap().get("GET /").is_none());
    }

    #[test]
    fn keeps_above_the_fixed_threshold_and_abstains_with_patches_below() {
        let mut p = policy(r#""threshold_usd": 0.01, "percentile": 0"#);
        // gpt-4o input is 0.0025 per 1k: 4000 tokens cost 0.01, not above.
        let at = decide(&mut p, &one_call("r", "gpt-4o", 4000));
        assert!(at.is_abstain());
        assert_close(cost_of(&at, 0, COST_TOTAL), 0.01);
        let above = decide(&mut p, &one_call("r", "gpt-4o", 4001));
        assert!(above.is_keep());
        assert_eq!(above.reason, REASON_THRESHOLD);
        assert_eq!(above.patches.len(), 4);
    }

    #[test]
    fn warm_up_keeps_everything_then_the_percentile_keeps_the_costly_tail() {
        let mut p = policy(r#""warmup": 100"#);
        // 1000..=100_000 input tokens of gpt-4o: 0.0025..=0.25 USD.
        for i in 0..100 {
            let v = decide(
                &mut p,
                &one_call("agent", "gpt-4o", (i * 37) % 100 * 1000 + 1000),
            );
            assert!(v.is_keep(), "trace {i}");
            assert_eq!(v.reason, REASON_WARMUP);
        }
        // p90 of the learned totals is the 90th: 90_000 tokens.
        assert!(decide(&mut p, &one_call("agent", "gpt-4o", 90_000)).is_abstain());
        let costly = decide(&mut p, &one_call("agent", "gpt-4o", 91_000));
        assert!(costly.is_keep());
        assert_eq!(costly.reason, "llm_cost_p90");
        // Another root name has its own warm-up and threshold.
        assert_eq!(
            decide(&mut p, &one_call("other", "gpt-4o", 1)).reason,
            REASON_WARMUP
        );
        // The fixed threshold wins over the learned one, and its reason too.
        let mut both = policy(r#""warmup": 0, "threshold_usd": 0.1"#);
        assert_eq!(
            decide(&mut both, &one_call("r", "gpt-4o", 50_000)).reason,
            REASON_THRESHOLD
        );
    }

    #[test]
    fn percentile_zero_and_no_threshold_only_counts_and_enriches() {
        let mut p = policy(r#""percentile": 0"#);
        testing::reset();
        for _ in 0..3 {
            let v = decide(&mut p, &one_call("r", "gpt-4o", 1_000_000));
            assert!(v.is_abstain());
            assert_eq!(v.patches.len(), 4);
        }
        assert!(p.costs.is_none());
        let labels = [
            ("tenant", "acme"),
            ("user", UNKNOWN),
            ("feature", UNKNOWN),
            ("model", "gpt-4o"),
        ];
        assert_close(testing::counter(COUNTER_COST, &labels), 7.5);
    }

    /// A root and `calls` LLM spans that use only the llm.* names (four
    /// patches each: cost and three gen_ai copies).
    fn many_calls(calls: u32) -> Trace {
        let mut b = TraceBuilder::new().span("root");
        for _ in 0..calls {
            b = b
                .span("chat")
                .child_of(0)
                .attr(LEGACY_MODEL, "gpt-4o")
                .attr(LEGACY_INPUT_TOKENS, 1000)
                .attr(LEGACY_OUTPUT_TOKENS, 1000);
        }
        b.build()
    }

    #[test]
    fn patches_stay_within_the_budget_dropping_copies_then_span_costs() {
        let mut p = policy(r#""percentile": 0"#);
        // 10 calls: 3 + 10 * 4 = 43 patches, all fit.
        let v = decide(&mut p, &many_calls(10));
        assert_eq!(v.patches.len(), 43);
        assert_eq!(patch(&v, 10, MODEL), Some(&AttrValue::from("gpt-4o")));
        // 20 calls: 83 would not fit; root totals and span costs do.
        let v = decide(&mut p, &many_calls(20));
        assert_eq!(v.patches.len(), 23);
        assert_close(cost_of(&v, 20, COST), 0.0125);
        assert_eq!(patch(&v, 20, MODEL), None);
        // 70 calls: only the root totals.
        let v = decide(&mut p, &many_calls(70));
        assert_eq!(v.patches.len(), 3);
        assert_close(cost_of(&v, 0, COST_TOTAL), 70.0 * 0.0125);
        // A model name long enough to break the byte budget on its own.
        let long = "m".repeat(PATCH_BYTE_BUDGET);
        let trace = TraceBuilder::new()
            .span("root")
            .span("chat")
            .child_of(0)
            .attr(LEGACY_MODEL, long.as_str())
            .attr(LEGACY_INPUT_TOKENS, 1)
            .build();
        let v = decide(&mut p, &trace);
        assert_eq!(patch(&v, 1, MODEL), None);
        assert!(patch(&v, 1, COST).is_some());
    }

    #[test]
    fn a_30_span_trace_with_10_calls_stays_well_under_the_host_caps() {
        let mut p = policy(r#""percentile": 0"#);
        let mut b = TraceBuilder::new().span("root");
        for i in 1..30 {
            b = b.span("step").child_of(0);
            if i % 3 == 2 {
                b = b
                    .attr(LEGACY_MODEL, "a-model-nobody-priced-2025-01-01")
                    .attr(LEGACY_INPUT_TOKENS, 1000)
                    .attr(LEGACY_OUTPUT_TOKENS, 1000);
            }
        }
        let trace = b.build();
        assert_eq!(trace.span_count(), 30);
        let v = decide(&mut p, &trace);
        // Every patch kept: 3 + 10 * (cost, fallback flag, three copies).
        assert_eq!(v.patches.len(), 53);
        let bytes: usize = v
            .patches
            .iter()
            .map(|p| patch_bytes(&p.key, payload_bytes(&p.value)))
            .sum();
        assert!(bytes < PATCH_BYTE_BUDGET / 4, "{bytes}");
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        let fallback = r#""fallback": {"input_per_1k": 0.001, "output_per_1k": 0.002}"#;
        for (bad, key) in [
            ("{}".to_owned(), "fallback"),
            (
                r#"{"fallback": {"input_per_1k": 0.001}}"#.to_owned(),
                "output_per_1k",
            ),
            (
                r#"{"fallback": {"input_per_1k": -1, "output_per_1k": 0}}"#.to_owned(),
                "fallback.input_per_1k",
            ),
            (
                format!(
                    r#"{{{fallback}, "pricing": {{"gpt-4o": {{"input_per_1k": 1, "output_per_1k": -0.5}}}}}}"#
                ),
                r#"pricing."gpt-4o".output_per_1k"#,
            ),
            (
                format!(
                    r#"{{{fallback}, "pricing": {{"gpt-4o": {{"input_per_1k": 1, "output_per_1k": 1, "cached_per_1k": 1}}}}}}"#
                ),
                "cached_per_1k",
            ),
            (
                format!(r#"{{{fallback}, "threshold_usd": -0.01}}"#),
                "threshold_usd",
            ),
            (
                format!(r#"{{{fallback}, "percentile": 1.5}}"#),
                "percentile",
            ),
            (
                format!(r#"{{{fallback}, "percentile": -0.1}}"#),
                "percentile",
            ),
            (format!(r#"{{{fallback}, "window": 0}}"#), "window"),
            (
                format!(r#"{{{fallback}, "window": 65536, "max_keys": 256}}"#),
                "max_keys",
            ),
            (
                format!(r#"{{{fallback}, "treshold_usd": 1}}"#),
                "treshold_usd",
            ),
        ] {
            let err = testing::init::<LlmCost>(&bad).err().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let ok = testing::init::<LlmCost>(&format!("{{{fallback}}}")).unwrap();
        assert_eq!(ok.percentile_reason, "llm_cost_p90");
        assert!(ok.threshold_usd.is_none());
    }
}
