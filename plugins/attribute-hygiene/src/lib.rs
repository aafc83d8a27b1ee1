//! `attribute-hygiene`: an enrichment that cleans the string attributes of kept traces before
//! they are stored. Run it with `mode = "enrich"` so it only sees traces the chain keeps; it
//! never has an opinion on keeping (it always abstains) and only returns attribute patches.
//!
//! What it does to each string-valued span attribute, in this order:
//! 1. keys matching `exempt` are never touched (ids, timestamps and tailgate's own stamps by
//!    default: `*.id`, `*_id`, `*timestamp*`, `*time_unix_nano*`, `sampling.*`);
//! 2. every `redact` pattern found in the value is replaced with its `replacement`
//!    (built in: `email` and `api_key`; add your own regexes);
//! 3. the first `rules` entry whose `keys` match decides the length limit: `truncate` cuts
//!    the value to `max_length` characters, `hash` replaces a value longer than `max_length`
//!    with `sha256:<first 16 hex digits>` so equal values still group together; keys no rule
//!    matches are truncated to the top-level `max_length`.
//!
//! Key patterns are exact keys or globs with `*` (any run of characters).
//!
//! Config (all optional):
//! - `max_length` (default 200): characters kept by the default truncation;
//! - `rules`: `[{ keys = ["agent.query"], action = "truncate" | "hash", max_length = 64 }]`;
//! - `redact` (default `["email", "api_key"]`): names of built-in patterns to apply;
//! - `patterns`: extra redactions, `[{ name = "ssn", regex = "\\d{3}-\\d{2}-\\d{4}" }]`;
//! - `replacement` (default `"[REDACTED:{name}]"`, `{name}` is the pattern's name);
//! - `exempt`: key patterns never touched (replaces the default list);
//! - `max_patches` (default 256, the host's default cap): at most this many attributes are
//!   rewritten per trace; the rest are counted as `hygiene_skipped` and left as they are.
//!
//! Counters: `hygiene_truncated`, `hygiene_hashed`, `hygiene_redacted`, `hygiene_skipped`.
//!
//! Cost in Wasm: one host call (`string-attrs`) for the whole trace, asking only for values
//! long enough to matter when no redaction is configured.

use std::collections::HashMap;

use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tailgate_plugin_sdk::{Policy, Trace, Verdict, export_policy, host};

const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}";
/// Common API key shapes: OpenAI/Anthropic-style `sk-…`, AWS access keys, GitHub tokens,
/// Slack tokens, and `Bearer` tokens.
/// ASCII word boundaries and spaces keep every search in the lazy DFA.
const API_KEY: &str = r"(?-u:\b)(?:sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,})|Bearer(?-u:\s)+[A-Za-z0-9._~+/-]{16,}=*";
/// Shortest string either built-in pattern can match; shorter values are not asked for.
const MIN_REDACTABLE: u32 = 6;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Truncate,
    Hash,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub keys: Vec<String>,
    #[serde(default = "truncate")]
    pub action: Action,
    pub max_length: Option<usize>,
}

fn truncate() -> Action {
    Action::Truncate
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternConfig {
    pub name: String,
    pub regex: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default = "default_redact")]
    pub redact: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<PatternConfig>,
    #[serde(default = "default_replacement")]
    pub replacement: String,
    #[serde(default = "default_exempt")]
    pub exempt: Vec<String>,
    #[serde(default = "default_max_patches")]
    pub max_patches: usize,
}

fn default_max_length() -> usize {
    200
}
fn default_redact() -> Vec<String> {
    vec!["email".into(), "api_key".into()]
}
fn default_replacement() -> String {
    "[REDACTED:{name}]".into()
}
fn default_exempt() -> Vec<String> {
    [
        "*.id",
        "*_id",
        "*timestamp*",
        "*time_unix_nano*",
        "sampling.*",
    ]
    .map(String::from)
    .to_vec()
}
fn default_max_patches() -> usize {
    256
}

/// A key pattern: an exact key, or a glob whose `*` matches any run of characters.
#[derive(Debug, Clone)]
struct KeyPattern(Vec<String>);

impl KeyPattern {
    fn new(pattern: &str) -> Self {
        KeyPattern(pattern.split('*').map(String::from).collect())
    }

    fn matches(&self, key: &str) -> bool {
        let parts = &self.0;
        if parts.len() == 1 {
            return key == parts[0];
        }
        let (first, last) = (&parts[0], &parts[parts.len() - 1]);
        if !key.starts_with(first.as_str()) || key.len() < first.len() + last.len() {
            return false;
        }
        let mut rest = &key[first.len()..key.len() - last.len()];
        if !key.ends_with(last.as_str()) {
            return false;
        }
        for middle in &parts[1..parts.len() - 1] {
            match rest.find(middle.as_str()) {
                Some(at) => rest = &rest[at + middle.len()..],
                None => return false,
            }
        }
        true
    }
}

struct Rule {
    keys: Vec<KeyPattern>,
    action: Action,
    max_length: usize,
}

struct Redaction {
    regex: Regex,
    replacement: String,
}

pub struct Hygiene {
    exempt: Vec<KeyPattern>,
    rules: Vec<Rule>,
    default_max: usize,
    redactions: Vec<Redaction>,
    custom_patterns: bool,
    max_patches: usize,
    /// What each key gets, worked out once: keys repeat on every span of every trace, and
    /// matching one against every glob was most of this policy's time.
    plans: HashMap<String, Plan>,
}

/// The treatment of one attribute key.
#[derive(Debug, Clone, Copy)]
enum Plan {
    Exempt,
    Limit(Action, usize),
}

/// Keys remembered at most; past it (a trace with generated keys) plans are worked out again
/// for each value rather than grow without bound.
const MAX_PLANS: usize = 4096;

/// What happened to one value.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Change {
    Truncated,
    Hashed,
}

impl Policy for Hygiene {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if c.max_length == 0 {
            return Err("max_length must be at least 1".into());
        }
        let custom_patterns = !c.patterns.is_empty();
        let mut redactions = Vec::new();
        let builtin = |name: &str| match name {
            "email" => Ok(EMAIL),
            "api_key" => Ok(API_KEY),
            other => Err(format!(
                "redact: unknown built-in pattern {other:?} (known: \"email\", \"api_key\"; add your own under `patterns`)"
            )),
        };
        let named = c
            .redact
            .iter()
            .map(|n| builtin(n).map(|re| (n.clone(), re.to_owned())))
            .chain(
                c.patterns
                    .iter()
                    .map(|p| Ok((p.name.clone(), p.regex.clone()))),
            );
        for item in named {
            let (name, re) = item?;
            let regex = Regex::new(&re)
                .map_err(|e| format!("patterns: regex of {name:?} does not compile: {e}"))?;
            redactions.push(Redaction {
                regex,
                replacement: c.replacement.replace("{name}", &name),
            });
        }
        let rules = c
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                if r.keys.is_empty() {
                    return Err(format!(
                        "rules[{i}].keys must name at least one key pattern"
                    ));
                }
                let max_length = r.max_length.unwrap_or(c.max_length);
                if max_length == 0 {
                    return Err(format!("rules[{i}].max_length must be at least 1"));
                }
                Ok(Rule {
                    keys: r.keys.iter().map(|k| KeyPattern::new(k)).collect(),
                    action: r.action,
                    max_length,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Hygiene {
            exempt: c.exempt.iter().map(|k| KeyPattern::new(k)).collect(),
            rules,
            default_max: c.max_length,
            redactions,
            custom_patterns,
            max_patches: c.max_patches,
            plans: HashMap::new(),
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let mut verdict = Verdict::abstain();
        let (mut truncated, mut hashed, mut redacted, mut skipped) = (0u32, 0u32, 0u32, 0u32);
        for (span, key, value) in trace.string_attrs(self.shortest_interesting()) {
            let (action, max) = match self.plan(&key) {
                Plan::Exempt => continue,
                Plan::Limit(action, max) => (action, max),
            };
            let redacted_value = self.redact(&value);
            let was_redacted = redacted_value.is_some();
            let (cleaned, change) = limit(action, max, redacted_value.unwrap_or(value));
            if !was_redacted && change.is_none() {
                continue;
            }
            if verdict.patches.len() >= self.max_patches {
                skipped += 1;
                continue;
            }
            redacted += u32::from(was_redacted);
            match change {
                Some(Change::Truncated) => truncated += 1,
                Some(Change::Hashed) => hashed += 1,
                None => {}
            }
            verdict = verdict.patch_span(span, key, cleaned);
        }
        for (name, n) in [
            ("hygiene_truncated", truncated),
            ("hygiene_hashed", hashed),
            ("hygiene_redacted", redacted),
            ("hygiene_skipped", skipped),
        ] {
            if n > 0 {
                host::counter_add(name, &[], f64::from(n));
            }
        }
        verdict
    }
}

impl Hygiene {
    /// The shortest value that could need a change, so the host sends no others.
    fn shortest_interesting(&self) -> u32 {
        let longest_allowed = self
            .rules
            .iter()
            .map(|r| r.max_length)
            .chain([self.default_max])
            .min()
            .unwrap_or(self.default_max);
        let by_length = u32::try_from(longest_allowed.saturating_add(1)).unwrap_or(u32::MAX);
        if self.redactions.is_empty() {
            by_length
        } else if self.custom_patterns {
            // A regex of the operator's may match anything, even one character.
            1
        } else {
            by_length.min(MIN_REDACTABLE)
        }
    }

    /// The value with every redaction applied, or `None` when nothing matched.
    fn redact(&self, value: &str) -> Option<String> {
        let mut out: Option<String> = None;
        for r in &self.redactions {
            let current = out.as_deref().unwrap_or(value);
            if r.regex.is_match(current) {
                out = Some(
                    r.regex
                        .replace_all(current, regex::NoExpand(&r.replacement))
                        .into_owned(),
                );
            }
        }
        out
    }

    /// Exempt, or the first rule whose key glob matches (the default length otherwise).
    fn plan(&mut self, key: &str) -> Plan {
        if let Some(plan) = self.plans.get(key) {
            return *plan;
        }
        let plan = if self.exempt.iter().any(|p| p.matches(key)) {
            Plan::Exempt
        } else {
            let (action, max) = self
                .rules
                .iter()
                .find(|r| r.keys.iter().any(|p| p.matches(key)))
                .map_or((Action::Truncate, self.default_max), |r| {
                    (r.action, r.max_length)
                });
            Plan::Limit(action, max)
        };
        if self.plans.len() < MAX_PLANS {
            self.plans.insert(key.to_owned(), plan);
        }
        plan
    }
}

fn limit(action: Action, max: usize, value: String) -> (String, Option<Change>) {
    // Characters, not bytes: never cut a UTF-8 sequence in half.
    let Some((cut, _)) = value.char_indices().nth(max) else {
        return (value, None);
    };
    match action {
        Action::Truncate => (value[..cut].to_owned(), Some(Change::Truncated)),
        Action::Hash => {
            let digest = Sha256::digest(value.as_bytes());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            (format!("sha256:{hex}"), Some(Change::Hashed))
        }
    }
}

export_policy!(Hygiene);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};
    use tailgate_plugin_sdk::{AttrValue, PatchTarget};

    fn policy(config: &str) -> Hygiene {
        testing::init::<Hygiene>(config).unwrap()
    }

    fn patched(v: &Verdict, span: u32, key: &str) -> Option<String> {
        v.patches
            .iter()
            .find(|p| p.target == PatchTarget::Span(span) && p.key == key)
            .map(|p| match &p.value {
                AttrValue::Str(s) => s.clone(),
                other => panic!("non-string patch {other:?}"),
            })
    }

    #[test]
    fn truncates_a_long_query_to_the_configured_length_and_leaves_short_values() {
        testing::reset();
        let mut p = policy(r#"{"rules": [{"keys": ["agent.query"], "max_length": 64}]}"#);
        let query = "q".repeat(500);
        let trace = TraceBuilder::new()
            .span("agent.run")
            .attr("agent.query", query.as_str())
            .attr("agent.note", "short")
            .build();
        let v = testing::decide(&mut p, &trace);
        testing::check_verdict(&trace, &v).unwrap();
        assert!(v.is_abstain());
        assert_eq!(patched(&v, 0, "agent.query").unwrap(), "q".repeat(64));
        assert_eq!(patched(&v, 0, "agent.note"), None);
        assert_eq!(v.patches.len(), 1);
        assert_eq!(testing::counter("hygiene_truncated", &[]), 1.0);
    }

    #[test]
    fn the_default_limit_applies_to_keys_no_rule_names() {
        let mut p = policy("{}");
        let trace = TraceBuilder::new()
            .span("a")
            .attr("http.url", "u".repeat(201).as_str())
            .attr("ok", "u".repeat(200).as_str())
            .build();
        let v = testing::decide(&mut p, &trace);
        assert_eq!(patched(&v, 0, "http.url").unwrap().len(), 200);
        assert_eq!(patched(&v, 0, "ok"), None);
    }

    #[test]
    fn truncation_counts_characters_and_never_splits_one() {
        let mut p = policy(r#"{"max_length": 3}"#);
        let trace = TraceBuilder::new().span("a").attr("k", "héllo").build();
        let v = testing::decide(&mut p, &trace);
        assert_eq!(patched(&v, 0, "k").unwrap(), "hél");
    }

    #[test]
    fn hash_rule_replaces_long_values_with_a_stable_digest() {
        let mut p =
            policy(r#"{"rules": [{"keys": ["prompt.*"], "action": "hash", "max_length": 8}]}"#);
        let trace = TraceBuilder::new()
            .span("a")
            .attr("prompt.text", "the same long prompt")
            .span("b")
            .attr("prompt.text", "the same long prompt")
            .attr("prompt.id_short", "short")
            .build();
        let v = testing::decide(&mut p, &trace);
        let a = patched(&v, 0, "prompt.text").unwrap();
        assert!(a.starts_with("sha256:") && a.len() == 7 + 16, "{a}");
        assert_eq!(Some(a), patched(&v, 1, "prompt.text"));
        assert_eq!(patched(&v, 1, "prompt.id_short"), None);
    }

    #[test]
    fn redacts_emails_and_api_keys_anywhere_in_a_value() {
        let mut p = policy("{}");
        let trace = TraceBuilder::new()
            .span("a")
            .attr("user.note", "mail jane.doe@example.com now")
            .attr("http.header", "Bearer abcdefghijklmnopqrstuvwxyz012345")
            .attr("llm.key", "key sk-proj-ABCDEFGHIJKLMNOPQRSTUV used")
            .attr("clean", "nothing to see here")
            .build();
        let v = testing::decide(&mut p, &trace);
        assert_eq!(
            patched(&v, 0, "user.note").unwrap(),
            "mail [REDACTED:email] now"
        );
        assert_eq!(patched(&v, 0, "http.header").unwrap(), "[REDACTED:api_key]");
        assert_eq!(
            patched(&v, 0, "llm.key").unwrap(),
            "key [REDACTED:api_key] used"
        );
        assert_eq!(patched(&v, 0, "clean"), None);
    }

    #[test]
    fn custom_patterns_and_replacement() {
        let mut p = policy(
            r#"{"redact": [], "patterns": [{"name": "ssn", "regex": "\\d{3}-\\d{2}-\\d{4}"}],
                "replacement": "<{name}>"}"#,
        );
        let trace = TraceBuilder::new()
            .span("a")
            .attr("form", "ssn 123-45-6789, mail a@b.io")
            .build();
        let v = testing::decide(&mut p, &trace);
        assert_eq!(patched(&v, 0, "form").unwrap(), "ssn <ssn>, mail a@b.io");
    }

    #[test]
    fn ids_timestamps_and_sampling_stamps_are_never_touched() {
        let mut p = policy(r#"{"max_length": 4}"#);
        let trace = TraceBuilder::new()
            .span("a")
            .attr("tenant.id", "tenant-with-a-long-id@example.com")
            .attr("session_id", "0123456789abcdef")
            .attr("event.timestamp", "2026-11-24T10:00:00Z")
            .attr("sampling.reason", "a long reason here")
            .attr("other", "truncate me")
            .build();
        let v = testing::decide(&mut p, &trace);
        assert_eq!(v.patches.len(), 1, "{:?}", v.patches);
        assert_eq!(patched(&v, 0, "other").unwrap(), "trun");
    }

    #[test]
    fn non_string_values_are_left_alone() {
        let mut p = policy(r#"{"max_length": 1}"#);
        let trace = TraceBuilder::new()
            .span("a")
            .attr("n", 123456789i64)
            .attr("f", 1.5f64)
            .build();
        assert!(testing::decide(&mut p, &trace).patches.is_empty());
    }

    #[test]
    fn patches_stop_at_the_cap_and_the_rest_are_counted() {
        testing::reset();
        let mut p = policy(r#"{"max_length": 1, "max_patches": 2}"#);
        let mut b = TraceBuilder::new();
        for i in 0..5 {
            b = b.span(format!("s{i}")).attr("k", "long");
        }
        let trace = b.build();
        let v = testing::decide(&mut p, &trace);
        testing::check_verdict(&trace, &v).unwrap();
        assert_eq!(v.patches.len(), 2);
        assert_eq!(testing::counter("hygiene_skipped", &[]), 3.0);
        assert_eq!(testing::counter("hygiene_truncated", &[]), 2.0);
    }

    #[test]
    fn key_globs() {
        let m = |p: &str, k: &str| KeyPattern::new(p).matches(k);
        assert!(m("*.id", "tenant.id"));
        assert!(!m("*.id", "tenant.idx"));
        assert!(m("sampling.*", "sampling.reason"));
        assert!(m("*time*", "a.timestamp"));
        assert!(m("a*b*c", "a-x-b-y-c"));
        assert!(!m("a*b*c", "a-c"));
        assert!(!m("ab*ba", "aba"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
    }

    #[test]
    fn bad_configs_are_refused_with_the_key() {
        let e = |c: &str| testing::init::<Hygiene>(c).err().unwrap();
        assert!(e(r#"{"max_length": 0}"#).contains("max_length"));
        assert!(e(r#"{"redact": ["phone"]}"#).contains("phone"));
        assert!(e(r#"{"patterns": [{"name": "x", "regex": "("}]}"#).contains("\"x\""));
        assert!(e(r#"{"rules": [{"keys": []}]}"#).contains("rules[0].keys"));
        assert!(e(r#"{"rules": [{"keys": ["a"], "action": "zip"}]}"#).contains("zip"));
        assert!(e(r#"{"max_len": 3}"#).contains("max_len"));
    }
}
