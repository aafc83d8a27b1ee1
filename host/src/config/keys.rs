//! The config's keys as data: every dotted key a file may set, read off the serialized
//! defaults (so no list of keys is kept by hand), and which changed keys a reload cannot apply.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{Config, ExporterConfig, ExporterKind, PolicyConfig};

/// What a reload applies (see `plugin::reload` and `plugin::build_set`): the policy chain and
/// the verdict when no policy decides. Every other key is read once, at start.
const APPLIED_ON_RELOAD: [&str; 2] = ["decide.default", "policies"];

/// The dotted keys whose value differs between `old` (what runs) and `new` (the file a reload
/// read) and that a reload does not apply: they take effect only after a restart. Sorted.
pub(crate) fn keys_needing_restart(old: &Config, new: &Config) -> Vec<String> {
    let (old, new) = (tree(old), tree(new));
    schema_keys()
        .into_iter()
        .filter(|key| !applied_on_reload(key))
        .filter(|key| lookup(&old, key) != lookup(&new, key))
        .collect()
}

fn applied_on_reload(key: &str) -> bool {
    APPLIED_ON_RELOAD.iter().any(|k| {
        key == *k
            || key
                .strip_prefix(k)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Every key of the config, dotted: `buffer.root_grace`, `exporter.endpoint` (the keys of
/// every exporter type), `policies.timeout` (a key of each `[[policies]]` entry). Tables a
/// user fills with their own keys (`exporter.headers`, `policies.config`) are one key each.
pub(super) fn schema_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut defaults = tree(&Config::default());
    if let Value::Object(sections) = &mut defaults {
        sections.remove("policies");
        sections.remove("exporter");
    }
    leaf_keys(&defaults, "", &mut keys);
    for kind in ExporterKind::ALL {
        leaf_keys(
            &tree(&ExporterConfig::default_for(kind)),
            "exporter",
            &mut keys,
        );
    }
    leaf_keys(&tree(&PolicyConfig::example()), "policies", &mut keys);
    keys
}

/// A value as JSON, where an unset optional key is still there, as `null`.
pub(super) fn tree(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The dotted keys of `value`'s leaves under `prefix`: non-empty tables are descended into.
pub(super) fn leaf_keys(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(v, &key, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// The value at a dotted key; `null` where it is absent (another exporter type's key).
fn lookup<'v>(tree: &'v Value, key: &str) -> &'v Value {
    key.split('.')
        .try_fold(tree, |v, part| v.get(part))
        .unwrap_or(&Value::Null)
}

impl PolicyConfig {
    /// A policy with every key at its default, for reading the policy keys off.
    fn example() -> Self {
        Self {
            name: String::new(),
            plugin: None,
            path: None,
            sha256: None,
            mode: Default::default(),
            drop_rule: false,
            on_error: Default::default(),
            on_enrich_error: Some(Default::default()),
            memory_limit: super::default_policy_memory(),
            timeout: super::default_policy_timeout(),
            fuel: None,
            max_patches: super::default_max_patches(),
            max_patch_bytes: super::default_max_patch_bytes(),
            log_per_second: super::default_log_per_second(),
            seed: 0,
            quarantine_after: super::default_quarantine_after(),
            quarantine_for: super::default_quarantine_for(),
            config: toml::Table::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t.toml").unwrap()
    }

    #[test]
    fn the_schema_holds_every_section_and_every_exporter_type() {
        let keys = schema_keys();
        for key in [
            "receivers.grpc",
            "buffer.root_grace",
            "decide.default",
            "exporter.type",
            "exporter.path",
            "exporter.endpoint",
            "exporter.headers",
            "exporter.batch_timeout",
            "admin.reload_token",
            "log.level",
            "shutdown.timeout",
            "plugins.watch_interval",
            "policies.name",
            "policies.fuel",
            "policies.config",
        ] {
            assert!(keys.contains(key), "{key} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k.starts_with("exporter.headers.")));
    }

    #[test]
    fn policies_and_the_default_verdict_reload_and_nothing_else_does() {
        let old = parse("[[policies]]\nname = \"a\"\nplugin = \"keep-errors\"\n");
        let reloadable = parse(
            "[decide]\ndefault = \"drop\"\n[[policies]]\nname = \"b\"\nplugin = \"latency\"\ntimeout = \"1s\"\n",
        );
        assert_eq!(
            keys_needing_restart(&old, &reloadable),
            Vec::<String>::new()
        );

        let new = parse(
            "[receivers]\ngrpc = \"0.0.0.0:4317\"\n[buffer]\nroot_grace = \"5s\"\n\
             [admin]\nreload_token = \"t\"\n[[policies]]\nname = \"a\"\nplugin = \"keep-errors\"\n",
        );
        assert_eq!(
            keys_needing_restart(&old, &new),
            ["admin.reload_token", "buffer.root_grace", "receivers.grpc"]
        );
        // The same value written differently is no change.
        let same = parse("[buffer]\ntrace_idle = \"10000ms\"\n");
        assert_eq!(
            keys_needing_restart(&Config::default(), &same),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_new_exporter_type_names_every_key_that_moved() {
        let new = parse("[exporter]\ntype = \"otlp_grpc\"\nendpoint = \"http://h:4317\"\n");
        let keys = keys_needing_restart(&Config::default(), &new);
        for key in ["exporter.type", "exporter.path", "exporter.endpoint"] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
        }
        assert!(
            !keys.iter().any(|k| k == "exporter.batch_timeout"),
            "{keys:?}"
        );
        let headers = parse(
            "[exporter]\ntype = \"otlp_grpc\"\nendpoint = \"http://h:4317\"\n[exporter.headers]\nk = \"v\"\n",
        );
        assert_eq!(keys_needing_restart(&new, &headers), ["exporter.headers"]);
    }
}
