//! `drop`: a drop rule for traces nobody wants (health checks, readiness
//! probes, metrics scrapes). It answers drop when the trace's ROOT span
//! - has a name equal to one of `names`, or
//! - has a name starting with one of `prefixes`, or
//! - has a string attribute `route_key` equal to one of `routes`;
//!
//! and abstains otherwise, including when the root span never arrived.
//!
//! The host lets a drop verdict win over other policies' keeps only when this
//! policy is configured with `drop_rule = true`; without it a drop is just one
//! opinion in the chain.
//!
//! Config: `names` (list of strings, default `[]`); `prefixes` (list of
//! non-empty strings, default `[]`); `routes` (list of strings, default
//! `[]`); `route_key` (non-empty string, default `"http.route"`). At least one
//! of `names`, `prefixes` and `routes` must be non-empty.
//!
//! Reasons: `"drop rule: name"`, `"drop rule: prefix"`, `"drop rule: route"`.
//!
//! Cost in Wasm host calls: 1 (summary) + 1 `name` of the root if `names` or
//! `prefixes` is set + 1 `attr` of the root if `routes` is set and the name
//! did not already match.

use serde::Deserialize;
use tailgate_plugin_sdk::{AttrValue, Policy, Trace, Verdict, export_policy};

pub const REASON_NAME: &str = "drop rule: name";
pub const REASON_PREFIX: &str = "drop rule: prefix";
pub const REASON_ROUTE: &str = "drop rule: route";

fn default_route_key() -> String {
    "http.route".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default = "default_route_key")]
    pub route_key: String,
    #[serde(default)]
    pub routes: Vec<String>,
}

pub struct DropRule {
    names: Vec<String>,
    prefixes: Vec<String>,
    route_key: String,
    routes: Vec<String>,
}

impl Policy for DropRule {
    type Config = Config;

    fn init(c: Config) -> Result<Self, String> {
        if c.names.is_empty() && c.prefixes.is_empty() && c.routes.is_empty() {
            return Err("set at least one of names, prefixes or routes".to_owned());
        }
        if c.prefixes.iter().any(String::is_empty) {
            return Err(
                "prefixes must not contain an empty string (it would drop every trace)".to_owned(),
            );
        }
        if c.route_key.is_empty() {
            return Err("route_key must not be empty".to_owned());
        }
        Ok(DropRule {
            names: c.names,
            prefixes: c.prefixes,
            route_key: c.route_key,
            routes: c.routes,
        })
    }

    fn decide(&mut self, trace: &Trace) -> Verdict {
        let Some(root) = trace.root() else {
            return Verdict::abstain();
        };
        if !self.names.is_empty() || !self.prefixes.is_empty() {
            let name = root.name();
            if self.names.contains(&name) {
                return Verdict::drop(REASON_NAME);
            }
            if self.prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                return Verdict::drop(REASON_PREFIX);
            }
        }
        if !self.routes.is_empty()
            && let Some(AttrValue::Str(route)) = root.attr(&self.route_key)
            && self.routes.contains(&route)
        {
            return Verdict::drop(REASON_ROUTE);
        }
        Verdict::abstain()
    }
}

export_policy!(DropRule);

#[cfg(test)]
mod tests {
    use super::*;
    use tailgate_plugin_sdk::testing::{self, TraceBuilder};

    fn policy(config: &str) -> DropRule {
        testing::init::<DropRule>(config).unwrap()
    }

    fn rooted(root: &str, child: &str) -> Trace {
        TraceBuilder::new()
            .span(root)
            .span(child)
            .child_of(0)
            .build()
    }

    #[test]
    fn drops_by_exact_root_name_only() {
        let mut p = policy(r#"{"names": ["GET /healthz", "grpc.health.v1.Health/Check"]}"#);
        let v = testing::decide(&mut p, &rooted("GET /healthz", "db"));
        assert!(v.is_drop());
        assert_eq!(v.reason, REASON_NAME);
        assert!(testing::decide(&mut p, &rooted("GET /healthz/deep", "db")).is_abstain());
        // A matching child does not make the trace a health check.
        assert!(testing::decide(&mut p, &rooted("POST /pay", "GET /healthz")).is_abstain());
    }

    #[test]
    fn drops_by_root_name_prefix() {
        let mut p = policy(r#"{"prefixes": ["GET /health", "readiness"]}"#);
        let v = testing::decide(&mut p, &rooted("GET /health/live", "x"));
        assert!(v.is_drop());
        assert_eq!(v.reason, REASON_PREFIX);
        assert!(testing::decide(&mut p, &rooted("readiness-probe", "x")).is_drop());
        assert!(testing::decide(&mut p, &rooted("POST /health", "x")).is_abstain());
        assert!(testing::decide(&mut p, &rooted("api", "GET /health")).is_abstain());
    }

    #[test]
    fn drops_by_root_route_with_default_and_custom_key() {
        let mut p = policy(r#"{"routes": ["/healthz", "/metrics"]}"#);
        let health = TraceBuilder::new()
            .span("GET")
            .attr("http.route", "/healthz")
            .build();
        let v = testing::decide(&mut p, &health);
        assert!(v.is_drop());
        assert_eq!(v.reason, REASON_ROUTE);
        let api = TraceBuilder::new()
            .span("GET")
            .attr("http.route", "/api/users")
            .span("child")
            .child_of(0)
            .attr("http.route", "/healthz")
            .build();
        assert!(testing::decide(&mut p, &api).is_abstain());

        let mut custom = policy(r#"{"routes": ["/healthz"], "route_key": "url.path"}"#);
        let by_path = TraceBuilder::new()
            .span("GET")
            .attr("url.path", "/healthz")
            .build();
        assert!(testing::decide(&mut custom, &by_path).is_drop());
        assert!(testing::decide(&mut custom, &health).is_abstain());
    }

    #[test]
    fn abstains_without_a_root() {
        let mut p = policy(r#"{"names": ["GET /healthz"]}"#);
        let orphan = TraceBuilder::new()
            .span("GET /healthz")
            .missing_parent()
            .build();
        assert!(testing::decide(&mut p, &orphan).is_abstain());
        assert!(testing::decide(&mut p, &TraceBuilder::new().build()).is_abstain());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = |c: &str| testing::init::<DropRule>(c).err().unwrap();
        assert!(err("{}").contains("at least one of names, prefixes or routes"));
        assert!(err(r#"{"prefixes": [""]}"#).contains("empty string"));
        assert!(err(r#"{"routes": ["/x"], "route_key": ""}"#).contains("route_key"));
        assert!(err(r#"{"name": ["x"]}"#).contains("name"));
    }
}
