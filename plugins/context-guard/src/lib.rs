//! `context-guard`: keep, and flag, traces whose request context looks
//! wrong; abstain when the trace is clean (and when it has no spans).
//!
//! Two checks, each on by default:
//! - mixed context (`mixed_context`): some key of `keys` has more than one
//!   distinct value across the trace's span attributes, e.g. two tenants in
//!   one request, a sign that context leaked between requests (a reused
//!   worker, a shared cache, a wrong propagation). Spans without the
//!   attribute, and empty strings, do not count. Values are compared as the
//!   text they render to, so int `42` and string `"42"` are the same.
//!   Resource attributes are not read.
//! - missing parent (`missing_parent`): some span names a parent that never
//!   arrived (`orphan-count` > 0), or the trace has no root at all.
//!
//! Flag: a kept trace gets the string attribute `tailgate.context_guard`
//! listing its findings, comma-joined, in this order:
//! - `mixed:<key>` for each key of `keys` (in config order) with mixed values;
//! - `missing_parent:<n>`, where n is the number of spans whose parent is
//!   missing;
//! - `no_root` when the root never arrived.
//!
//! For example `mixed:tenant.id,missing_parent:3`. It goes on the root span;
//! when the root never arrived, on the top span of every fragment (each span
//! whose parent is missing), at most `max_flagged_spans` of them in index
//! order. One string attribute, not one per finding, so a backend query for
//! "flagged" is one key.
//!
//! Reasons (fixed, low-cardinality metric labels): `"context_leak"`,
//! `"missing_parent"`, or `"context_leak,missing_parent"` for both.
//!
//! Config:
//! - `keys` (list of non-empty strings, default `["tenant.id", "user.id"]`;
//!   must be non-empty while `mixed_context` is on).
//! - `mixed_context` (bool, default `true`), `missing_parent` (bool, default
//!   `true`): at least one must be on.
//! - `max_flagged_spans` (integer, default `256`, >= 1): the host's default
//!   `max_patches` (`host/src/config.rs`). A verdict over the host's caps
//!   loses all its edits, so lower this with `max_patches`. The flags are
//!   also kept within the host's default `max_patch_bytes` (64 KiB).
//!
//! Cost in Wasm host calls: 1 (summary) + 1 `attr-column` per key when
//! `mixed_context` is on; + 1 (`parents`) to find the fragments when the
//! root never arrived and the trace is flagged.

use serde::Deserialize;
use tailgate_plugin_sdk::{AttrValue, Policy, Trace, Verdict, export_policy};

/// String span attribute listing a flagged trace's findings.
pub const FLAG_ATTRIBUTE: &str = "tailgate.context_guard";

pub const REASON_LEAK: &str = "context_leak";
pub const REASON_MISSING_PARENT: &str = "missing_parent";
pub const REASON_BOTH: &str = "context_leak,missing_parent";

/// The host's default `max_patch_bytes` (`host/src/config.rs`).
const MAX_PATCH_BYTES: usize = 64 << 10;

/// More than the protobuf framing of one string attribute (field tags and
/// length varints of `KeyValue` and `AnyValue`), which the host counts
/// against `max_patch_bytes` along with the key and value.
const PATCH_OVERHEAD_BYTES: usize = 16;

fn default_keys() -> Vec<String> {
    vec!["tenant.id".to_owned(), "user.id".to_owned()]
}

fn default_true() -> bool {
    true
}

/// The host's default `max_patches` (`host/src/config.rs`).
fn default_max_flagged_spans() -> u32 {
    256
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_keys")]
    pub keys: Vec<String>,
    #[serde(default = "default_true")]
    pub mixed_context: bool,
    #[serde(default = "default_true")]
    pub missing_parent: bool,
    #[serde(default = "default_max_flagged_spans")]
    pub max_flagged_spans: u32,
}

pub struct ContextGuard {
    /// Empty when the mixed-context check is off.
    keys: Vec<String>,
    missing_parent: bool,
    max_flagged_spans: usize,
}

impl Policy for ContextGuard {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if !c.mixed_context && !c.missing_parent {
            return Err(
                "mixed_context and missing_parent are both off: enable at least one check"
                    .to_owned(),
            );
        }
        if c.mixed_context && c.keys.is_empty() {
            return Err("keys must not be empty while mixed_context is on".to_owned());
        }
        if c.keys.iter().any(String::is_empty) {
            return Err("keys must not contain an empty string".to_owned());
        }
        if c.max_flagged_spans == 0 {
            return Err("max_flagged_spans must be at least 1".to_owned());
        }
        Ok(ContextGuard {
            keys: if c.mixed_context { c.keys } else { Vec::new() },
            missing_parent: c.missing_parent,
            max_flagged_spans: c.max_flagged_spans as usize,
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let summary = *trace.summary();
        if summary.span_count == 0 {
            return Verdict::abstain();
        }
        // Built only for a flagged trace: `String::new` does not allocate.
        let mut findings = String::new();
        let mut leak = false;
        for key in &self.keys {
            // The distinct values are enough: each crosses into the guest once.
            if has_mixed_values(trace.attr_column_dict(key).values()) {
                leak = true;
                push_finding(&mut findings, format_args!("mixed:{key}"));
            }
        }
        let missing = self.missing_parent && (summary.orphan_count > 0 || summary.root.is_none());
        if missing {
            if summary.orphan_count > 0 {
                push_finding(
                    &mut findings,
                    format_args!("missing_parent:{}", summary.orphan_count),
                );
            }
            if summary.root.is_none() {
                push_finding(&mut findings, format_args!("no_root"));
            }
        }
        let reason = match (leak, missing) {
            (false, false) => return Verdict::abstain(),
            (true, false) => REASON_LEAK,
            (false, true) => REASON_MISSING_PARENT,
            (true, true) => REASON_BOTH,
        };
        let mut verdict = Verdict::keep(reason);
        if let Some(root) = summary.root {
            return verdict.patch_span(root, FLAG_ATTRIBUTE, findings);
        }
        // No root: with none, every span without a parent in the trace names
        // one that is missing, so these are the tops of the fragments.
        let per_patch = FLAG_ATTRIBUTE.len() + findings.len() + PATCH_OVERHEAD_BYTES;
        let cap = self
            .max_flagged_spans
            .min(MAX_PATCH_BYTES / per_patch)
            .max(1);
        let tops = trace
            .parents()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_none())
            .map(|(i, _)| i as u32)
            .take(cap);
        for top in tops {
            verdict = verdict.patch_span(top, FLAG_ATTRIBUTE, findings.as_str());
        }
        if verdict.patches.is_empty() {
            // Every span has a parent yet none is the root: the parents form
            // a cycle. Flag span 0 so the finding still lands somewhere.
            verdict = verdict.patch_span(0, FLAG_ATTRIBUTE, findings);
        }
        verdict
    }
}

/// True when the column holds two different non-blank values.
/// True when the values (any order, repeats allowed) hold two that differ,
/// ignoring empty strings.
fn has_mixed_values(values: &[AttrValue]) -> bool {
    let mut values = values.iter().filter(|v| !is_blank(v));
    match values.next() {
        Some(first) => values.any(|v| !same_value(first, v)),
        None => false,
    }
}

fn is_blank(v: &AttrValue) -> bool {
    matches!(v, AttrValue::Str(s) if s.is_empty())
}

/// Equal values, or values of different types that render to the same text
/// (the allocation happens only in that rare mixed-type case).
fn same_value(a: &AttrValue, b: &AttrValue) -> bool {
    if std::mem::discriminant(a) == std::mem::discriminant(b) {
        a == b
    } else {
        a.to_string() == b.to_string()
    }
}

fn push_finding(findings: &mut String, finding: std::fmt::Arguments<'_>) {
    use std::fmt::Write;
    if !findings.is_empty() {
        findings.push(',');
    }
    // Writing to a String cannot fail.
    let _ = findings.write_fmt(finding);
}

export_policy!(ContextGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::PatchTarget;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> ContextGuard {
        testing::init::<ContextGuard>(config).unwrap()
    }

    fn err(config: &str) -> String {
        testing::init::<ContextGuard>(config).err().unwrap()
    }

    fn decide(p: &mut ContextGuard, t: &Trace) -> Verdict {
        let v = testing::decide(p, t);
        testing::check_verdict(t, &v).unwrap();
        v
    }

    /// The spans flagged, each with its flag value.
    fn flags(v: &Verdict) -> Vec<(u32, String)> {
        v.patches
            .iter()
            .map(|p| {
                assert_eq!(p.key, FLAG_ATTRIBUTE);
                let PatchTarget::Span(i) = p.target else {
                    panic!("flag on a resource: {p:?}")
                };
                (i, p.value.as_str().expect("a string flag").to_owned())
            })
            .collect()
    }

    /// A complete trace: root with tenant `t0`, children with tenants `ts`.
    fn tenants(t0: &str, ts: &[&str]) -> Trace {
        let mut b = TraceBuilder::new().span("root").attr("tenant.id", t0);
        for t in ts {
            b = b.span("child").child_of(0).attr("tenant.id", *t);
        }
        b.build()
    }

    #[test]
    fn a_clean_trace_abstains() {
        let mut p = policy("{}");
        let clean = TraceBuilder::new()
            .span("root")
            .attr("tenant.id", "acme")
            .attr("user.id", 7i64)
            .span("db")
            .child_of(0)
            .attr("tenant.id", "acme")
            .span("cache")
            .child_of(1)
            .attr("user.id", 7i64)
            .build();
        let v = decide(&mut p, &clean);
        assert!(v.is_abstain(), "{v:?}");
        assert!(v.patches.is_empty());
        assert!(decide(&mut p, &TraceBuilder::new().build()).is_abstain());
    }

    #[test]
    fn two_tenant_ids_are_flagged_on_the_root() {
        let v = decide(&mut policy("{}"), &tenants("acme", &["acme", "globex"]));
        assert!(v.is_keep());
        assert_eq!(v.reason, REASON_LEAK);
        assert_eq!(flags(&v), vec![(0, "mixed:tenant.id".to_owned())]);
    }

    #[test]
    fn both_keys_are_listed_in_config_order() {
        let trace = TraceBuilder::new()
            .span("root")
            .attr("user.id", "u1")
            .attr("tenant.id", "a")
            .span("child")
            .child_of(0)
            .attr("user.id", "u2")
            .attr("tenant.id", "b")
            .build();
        let v = decide(&mut policy("{}"), &trace);
        assert_eq!(
            flags(&v),
            vec![(0, "mixed:tenant.id,mixed:user.id".to_owned())]
        );
        let mut reversed = policy(r#"{"keys": ["user.id", "tenant.id"]}"#);
        let v = decide(&mut reversed, &trace);
        assert_eq!(
            flags(&v),
            vec![(0, "mixed:user.id,mixed:tenant.id".to_owned())]
        );
    }

    #[test]
    fn absent_and_empty_values_are_not_a_second_value() {
        let mut p = policy("{}");
        let trace = TraceBuilder::new()
            .span("root")
            .attr("tenant.id", "acme")
            .span("no-tenant")
            .child_of(0)
            .span("blank-tenant")
            .child_of(0)
            .attr("tenant.id", "")
            .build();
        assert!(decide(&mut p, &trace).is_abstain());
    }

    #[test]
    fn values_are_compared_as_text_across_types() {
        let mut p = policy(r#"{"keys": ["user.id"]}"#);
        let same = TraceBuilder::new()
            .span("root")
            .attr("user.id", 42i64)
            .span("child")
            .child_of(0)
            .attr("user.id", "42")
            .build();
        assert!(decide(&mut p, &same).is_abstain());
        let different = TraceBuilder::new()
            .span("root")
            .attr("user.id", 42i64)
            .span("child")
            .child_of(0)
            .attr("user.id", 43i64)
            .build();
        assert_eq!(decide(&mut p, &different).reason, REASON_LEAK);
    }

    #[test]
    fn a_missing_parent_is_flagged_on_the_root() {
        let trace = TraceBuilder::new()
            .span("root")
            .span("child")
            .child_of(0)
            .span("orphan")
            .missing_parent()
            .span("orphan.child")
            .child_of(2)
            .span("orphan2")
            .missing_parent()
            .build();
        let v = decide(&mut policy("{}"), &trace);
        assert_eq!(v.reason, REASON_MISSING_PARENT);
        assert_eq!(flags(&v), vec![(0, "missing_parent:2".to_owned())]);
    }

    #[test]
    fn without_a_root_every_fragment_top_is_flagged() {
        let trace = TraceBuilder::new()
            .span("a")
            .missing_parent()
            .attr("tenant.id", "acme")
            .span("a.child")
            .child_of(0)
            .span("b")
            .missing_parent()
            .attr("tenant.id", "globex")
            .build();
        let v = decide(&mut policy("{}"), &trace);
        assert_eq!(v.reason, REASON_BOTH);
        let flag = "mixed:tenant.id,missing_parent:2,no_root".to_owned();
        assert_eq!(flags(&v), vec![(0, flag.clone()), (2, flag)]);
    }

    #[test]
    fn flagged_fragments_stay_within_the_cap() {
        let mut b = TraceBuilder::new();
        for k in 0..300 {
            b = b.span(format!("fragment-{k}")).missing_parent();
        }
        let trace = b.build();
        let v = decide(&mut policy("{}"), &trace);
        assert_eq!(v.patches.len(), 256);
        let v = decide(&mut policy(r#"{"max_flagged_spans": 5}"#), &trace);
        assert_eq!(
            flags(&v).iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        // Long findings: the byte cap binds before the count cap.
        let key = "k".repeat(1000);
        let mut b = TraceBuilder::new();
        for k in 0..300 {
            b = b.span("f").missing_parent().attr(key.as_str(), k);
        }
        let mut long = policy(&format!(r#"{{"keys": ["{key}"]}}"#));
        let v = decide(&mut long, &b.build());
        let bytes: usize = v
            .patches
            .iter()
            .map(|p| p.key.len() + p.value.to_string().len() + PATCH_OVERHEAD_BYTES)
            .sum();
        assert!((1..256).contains(&v.patches.len()), "{}", v.patches.len());
        assert!(bytes <= MAX_PATCH_BYTES, "{bytes}");
    }

    #[test]
    fn a_parent_cycle_without_root_is_flagged_on_span_zero() {
        let trace = TraceBuilder::new()
            .span("a")
            .child_of(1)
            .span("b")
            .child_of(0)
            .build();
        let v = decide(&mut policy("{}"), &trace);
        assert_eq!(v.reason, REASON_MISSING_PARENT);
        assert_eq!(flags(&v), vec![(0, "no_root".to_owned())]);
    }

    #[test]
    fn each_check_can_be_turned_off() {
        let leak_and_orphan = TraceBuilder::new()
            .span("root")
            .attr("tenant.id", "a")
            .span("orphan")
            .missing_parent()
            .attr("tenant.id", "b")
            .build();
        let mut only_leak = policy(r#"{"missing_parent": false}"#);
        let v = decide(&mut only_leak, &leak_and_orphan);
        assert_eq!(v.reason, REASON_LEAK);
        assert_eq!(flags(&v), vec![(0, "mixed:tenant.id".to_owned())]);
        let mut only_orphans = policy(r#"{"mixed_context": false}"#);
        let v = decide(&mut only_orphans, &leak_and_orphan);
        assert_eq!(v.reason, REASON_MISSING_PARENT);
        assert_eq!(flags(&v), vec![(0, "missing_parent:1".to_owned())]);
        // With mixed_context off, an empty keys list is fine.
        policy(r#"{"mixed_context": false, "keys": []}"#);
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        let both_off = err(r#"{"mixed_context": false, "missing_parent": false}"#);
        assert!(both_off.contains("mixed_context") && both_off.contains("missing_parent"));
        assert!(err(r#"{"keys": []}"#).contains("keys"));
        assert!(err(r#"{"keys": ["tenant.id", ""]}"#).contains("keys"));
        assert!(err(r#"{"max_flagged_spans": 0}"#).contains("max_flagged_spans"));
        assert!(err(r#"{"key": ["tenant.id"]}"#).contains("key"));
    }
}
