//! `attribute`: keep traces where an attribute matches a rule; abstain
//! otherwise. With `invert = true` it keeps traces where nothing in scope
//! matches instead (an absent attribute counts as "does not match").
//!
//! Config:
//! - `key` (string, required, non-empty): the attribute to look at.
//! - exactly one matcher:
//!   - `equals` (string, number or bool): compared by type. A string equals
//!     only a string value, a number equals an int or double value
//!     numerically, a bool equals only a bool value.
//!   - `min` and/or `max` (numbers, inclusive): an int or double value in the
//!     range; string values are never parsed.
//!   - `regex` (string, `regex-lite` syntax, unanchored: use `^...$` for a
//!     whole-string match): matches string values only.
//! - `scope` = `"any"` (default: any span) or `"root"` (only the root span;
//!   a trace whose root never arrived abstains, even with `invert`).
//! - `resource` (bool, default `false`): read the span's resource attribute
//!   instead of the span attribute.
//! - `invert` (bool, default `false`): keep when nothing in scope matches.
//! - `reason` (string, default `"attribute <key> matched"`, or
//!   `"attribute <key> did not match"` with `invert`).
//!
//! An empty trace (no spans) always abstains.
//!
//! Cost in Wasm host calls: `scope = "root"`: 2 (summary, then one `attr` or
//! `resource-attr`). `scope = "any"`: 2 for span attributes (summary, then one
//! `attr-column` for the whole trace); for resource attributes 1 + one
//! `resource-attr` per span, stopping at the first match.

use regex_lite::Regex;
use serde::Deserialize;
use tailgate_plugin_sdk::{AttrValue, Policy, Trace, Verdict, export_policy};

/// A literal for `equals`. Integers are kept apart from other numbers so an
/// int attribute compares exactly.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Any,
    Root,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub key: String,
    #[serde(default)]
    pub equals: Option<Literal>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub resource: bool,
    #[serde(default)]
    pub invert: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug)]
enum Matcher {
    Equals(Literal),
    Range { min: Option<f64>, max: Option<f64> },
    Regex(Regex),
}

impl Matcher {
    fn matches(&self, value: &AttrValue) -> bool {
        match self {
            Matcher::Equals(lit) => match (lit, value) {
                (Literal::Str(want), AttrValue::Str(got)) => want == got,
                (Literal::Bool(want), AttrValue::Bool(got)) => want == got,
                (Literal::Int(want), AttrValue::Int(got)) => want == got,
                (Literal::Int(want), AttrValue::Double(got)) => *want as f64 == *got,
                (Literal::Float(want), AttrValue::Int(got)) => *want == *got as f64,
                (Literal::Float(want), AttrValue::Double(got)) => want == got,
                _ => false,
            },
            Matcher::Range { min, max } => match value.as_f64() {
                Some(v) if !v.is_nan() => {
                    min.is_none_or(|lo| v >= lo) && max.is_none_or(|hi| v <= hi)
                }
                _ => false,
            },
            Matcher::Regex(re) => value.as_str().is_some_and(|s| re.is_match(s)),
        }
    }
}

pub struct Attribute {
    key: String,
    matcher: Matcher,
    scope: Scope,
    resource: bool,
    invert: bool,
    reason: String,
}

impl Policy for Attribute {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if c.key.is_empty() {
            return Err("key must not be empty".to_owned());
        }
        let ranged = c.min.is_some() || c.max.is_some();
        let chosen = [c.equals.is_some(), ranged, c.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if chosen != 1 {
            return Err(format!(
                "set exactly one matcher: `equals`, `min`/`max` or `regex` (got {chosen})"
            ));
        }
        if let Some(Literal::Float(f)) = c.equals
            && !f.is_finite()
        {
            return Err(format!("equals must be a finite number, got {f}"));
        }
        let matcher = if let Some(lit) = c.equals {
            Matcher::Equals(lit)
        } else if let Some(pattern) = c.regex {
            Matcher::Regex(
                Regex::new(&pattern).map_err(|e| format!("invalid regex {pattern:?}: {e}"))?,
            )
        } else {
            for (name, v) in [("min", c.min), ("max", c.max)] {
                if let Some(v) = v
                    && !v.is_finite()
                {
                    return Err(format!("{name} must be a finite number, got {v}"));
                }
            }
            if let (Some(lo), Some(hi)) = (c.min, c.max)
                && lo > hi
            {
                return Err(format!("min ({lo}) must not be greater than max ({hi})"));
            }
            Matcher::Range {
                min: c.min,
                max: c.max,
            }
        };
        let reason = c.reason.unwrap_or_else(|| {
            if c.invert {
                format!("attribute {} did not match", c.key)
            } else {
                format!("attribute {} matched", c.key)
            }
        });
        Ok(Attribute {
            key: c.key,
            matcher,
            scope: c.scope,
            resource: c.resource,
            invert: c.invert,
            reason,
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        if trace.span_count() == 0 {
            return Verdict::abstain();
        }
        let read = |span: tailgate_plugin_sdk::Span<'_>| {
            if self.resource {
                span.resource_attr(&self.key)
            } else {
                span.attr(&self.key)
            }
        };
        let matched = match self.scope {
            Scope::Root => match trace.root() {
                Some(root) => read(root).is_some_and(|v| self.matcher.matches(&v)),
                None => return Verdict::abstain(),
            },
            Scope::Any if self.resource => trace
                .spans()
                .any(|s| read(s).is_some_and(|v| self.matcher.matches(&v))),
            // Each distinct value is matched (a regex run) once, however many
            // spans repeat it.
            Scope::Any => trace
                .attr_column_dict(&self.key)
                .values()
                .iter()
                .any(|v| self.matcher.matches(v)),
        };
        if matched != self.invert {
            Verdict::keep(self.reason.clone())
        } else {
            Verdict::abstain()
        }
    }
}

export_policy!(Attribute);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> Attribute {
        testing::init::<Attribute>(config).unwrap()
    }

    fn err(config: &str) -> String {
        testing::init::<Attribute>(config).err().unwrap()
    }

    /// A root without the attribute and a child carrying `value`.
    fn child_with(value: impl Into<AttrValue>) -> Trace {
        TraceBuilder::new()
            .span("root")
            .span("child")
            .child_of(0)
            .attr("k", value)
            .build()
    }

    #[test]
    fn equals_string_matches_only_strings() {
        let mut p = policy(r#"{"key": "k", "equals": "gold"}"#);
        let kept = testing::decide(&mut p, &child_with("gold"));
        assert!(kept.is_keep());
        assert_eq!(kept.reason, "attribute k matched");
        assert!(testing::decide(&mut p, &child_with("silver")).is_abstain());
        assert!(testing::decide(&mut p, &child_with(true)).is_abstain());
        let absent = TraceBuilder::new()
            .span("root")
            .attr("other", "gold")
            .build();
        assert!(testing::decide(&mut p, &absent).is_abstain());
    }

    #[test]
    fn equals_number_compares_ints_and_doubles_numerically() {
        let mut p = policy(r#"{"key": "k", "equals": 500}"#);
        assert!(testing::decide(&mut p, &child_with(500i64)).is_keep());
        assert!(testing::decide(&mut p, &child_with(500.0f64)).is_keep());
        assert!(testing::decide(&mut p, &child_with(501i64)).is_abstain());
        assert!(testing::decide(&mut p, &child_with("500")).is_abstain());

        let mut f = policy(r#"{"key": "k", "equals": 2.5}"#);
        assert!(testing::decide(&mut f, &child_with(2.5f64)).is_keep());
        assert!(testing::decide(&mut f, &child_with(2i64)).is_abstain());
        let mut whole = policy(r#"{"key": "k", "equals": 3.0}"#);
        assert!(testing::decide(&mut whole, &child_with(3i64)).is_keep());
    }

    #[test]
    fn equals_bool_matches_only_bools() {
        let mut p = policy(r#"{"key": "k", "equals": true}"#);
        assert!(testing::decide(&mut p, &child_with(true)).is_keep());
        assert!(testing::decide(&mut p, &child_with(false)).is_abstain());
        assert!(testing::decide(&mut p, &child_with("true")).is_abstain());
        assert!(testing::decide(&mut p, &child_with(1i64)).is_abstain());
    }

    #[test]
    fn range_bounds_are_inclusive() {
        let mut p = policy(r#"{"key": "k", "min": 500, "max": 599}"#);
        assert!(testing::decide(&mut p, &child_with(500i64)).is_keep());
        assert!(testing::decide(&mut p, &child_with(599i64)).is_keep());
        assert!(testing::decide(&mut p, &child_with(550.5f64)).is_keep());
        assert!(testing::decide(&mut p, &child_with(499i64)).is_abstain());
        assert!(testing::decide(&mut p, &child_with(599.5f64)).is_abstain());
        assert!(testing::decide(&mut p, &child_with("550")).is_abstain());
    }

    #[test]
    fn open_ended_ranges() {
        let mut at_least = policy(r#"{"key": "k", "min": 10}"#);
        assert!(testing::decide(&mut at_least, &child_with(1_000_000i64)).is_keep());
        assert!(testing::decide(&mut at_least, &child_with(9.99f64)).is_abstain());
        let mut at_most = policy(r#"{"key": "k", "max": 10}"#);
        assert!(testing::decide(&mut at_most, &child_with(-5i64)).is_keep());
        assert!(testing::decide(&mut at_most, &child_with(10i64)).is_keep());
        assert!(testing::decide(&mut at_most, &child_with(11i64)).is_abstain());
    }

    #[test]
    fn regex_matches_string_values() {
        let mut p = policy(r#"{"key": "k", "regex": "^/api/v[0-9]+/pay"}"#);
        assert!(testing::decide(&mut p, &child_with("/api/v2/payments")).is_keep());
        assert!(testing::decide(&mut p, &child_with("/web/api/v2/pay")).is_abstain());
        assert!(testing::decide(&mut p, &child_with(2i64)).is_abstain());
    }

    #[test]
    fn invert_keeps_when_nothing_matches() {
        let mut p = policy(r#"{"key": "k", "equals": "gold", "invert": true}"#);
        let kept = testing::decide(&mut p, &child_with("silver"));
        assert!(kept.is_keep());
        assert_eq!(kept.reason, "attribute k did not match");
        let absent = TraceBuilder::new().span("root").build();
        assert!(testing::decide(&mut p, &absent).is_keep());
        assert!(testing::decide(&mut p, &child_with("gold")).is_abstain());
    }

    #[test]
    fn root_scope_ignores_other_spans() {
        let mut root = policy(r#"{"key": "k", "equals": "x", "scope": "root"}"#);
        let mut any = policy(r#"{"key": "k", "equals": "x"}"#);
        let on_child = child_with("x");
        assert!(testing::decide(&mut root, &on_child).is_abstain());
        assert!(testing::decide(&mut any, &on_child).is_keep());

        let on_root = TraceBuilder::new()
            .span("root")
            .attr("k", "x")
            .span("child")
            .child_of(0)
            .build();
        assert!(testing::decide(&mut root, &on_root).is_keep());
    }

    #[test]
    fn root_scope_abstains_without_a_root_even_inverted() {
        let mut p = policy(r#"{"key": "k", "equals": "x", "scope": "root", "invert": true}"#);
        let orphan = TraceBuilder::new()
            .span("lost")
            .missing_parent()
            .attr("k", "y")
            .build();
        assert!(testing::decide(&mut p, &orphan).is_abstain());
    }

    #[test]
    fn resource_reads_resource_attributes_not_span_attributes() {
        let mut p =
            policy(r#"{"key": "deployment.environment", "equals": "prod", "resource": true}"#);
        let on_resource = TraceBuilder::new()
            .span("root")
            .span("child")
            .child_of(0)
            .resource_attr("deployment.environment", "prod")
            .build();
        let on_span = TraceBuilder::new()
            .span("root")
            .attr("deployment.environment", "prod")
            .build();
        assert!(testing::decide(&mut p, &on_resource).is_keep());
        assert!(testing::decide(&mut p, &on_span).is_abstain());

        let mut span_only = policy(r#"{"key": "deployment.environment", "equals": "prod"}"#);
        assert!(testing::decide(&mut span_only, &on_span).is_keep());
        assert!(testing::decide(&mut span_only, &on_resource).is_abstain());
    }

    #[test]
    fn custom_reason_and_empty_trace() {
        let mut p = policy(r#"{"key": "k", "equals": "x", "reason": "vip", "invert": true}"#);
        assert_eq!(testing::decide(&mut p, &child_with("y")).reason, "vip");
        assert!(testing::decide(&mut p, &TraceBuilder::new().build()).is_abstain());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        assert!(err("{}").contains("key"));
        assert!(err(r#"{"key": "k"}"#).contains("exactly one matcher"));
        assert!(err(r#"{"key": "k", "equals": 1, "regex": "a"}"#).contains("exactly one matcher"));
        assert!(err(r#"{"key": "", "equals": 1}"#).contains("empty"));
        assert!(err(r#"{"key": "k", "min": 5, "max": 1}"#).contains("greater than max"));
        assert!(err(r#"{"key": "k", "regex": "("}"#).contains("invalid regex"));
        assert!(err(r#"{"key": "k", "equals": 1, "scope": "leaf"}"#).contains("unknown variant"));
        assert!(err(r#"{"key": "k", "equals": 1, "value": 2}"#).contains("value"));
        assert!(err(r#"{"key": "k", "equals": [1]}"#).contains("invalid config"));
    }
}
