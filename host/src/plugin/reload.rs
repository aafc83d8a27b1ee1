//! Hot swap: replace the live policy set while traces keep flowing.
//!
//! A reload re-reads the config file, then loads every policy off the decision path (compile,
//! type-check, `init`), tries each on sample traces in a fresh instance, and only then swaps
//! the set atomically. Workers pick the new set up at their next trace; traces already
//! buffered are decided by whichever set is live when their time comes, so nothing buffered
//! is lost. A refused reload leaves the old set running and says why.
//!
//! Triggers: a change of the config file or of a policy's `.wasm` file (polled), SIGHUP,
//! and `POST /reload` on the admin listener.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use parking_lot::Mutex;
use prost::Message;

use super::boundary::{CallClock, TraceData};
use super::index::TraceIndex;
use super::metrics::PluginMetrics;
use super::{PolicyRuntime, PolicySet, build_set};
use crate::config::{self, Config};
use crate::trace::{BufferedSpan, ResourceHeader, ScopeHeader};

/// What the last reload did, for the admin status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ReloadOutcome {
    pub(crate) trigger: String,
    pub(crate) ok: bool,
    pub(crate) message: String,
    pub(crate) generation: u64,
    pub(crate) took_ms: f64,
    pub(crate) at_unix_ms: u64,
}

pub(crate) struct Reloader {
    runtime: Arc<PolicyRuntime>,
    metrics: Arc<PluginMetrics>,
    config_path: Option<PathBuf>,
    base_dir: PathBuf,
    /// One reload at a time.
    busy: Mutex<()>,
    last: Mutex<Option<ReloadOutcome>>,
    /// The config the process started with: a reload applies only the policies and
    /// `decide.default`, so other keys are compared against this.
    running: Config,
    /// Keys changed in the file that take effect only after a restart, for `/status`.
    restart_needed: Mutex<Vec<String>>,
}

impl Reloader {
    pub(crate) fn new(
        runtime: Arc<PolicyRuntime>,
        metrics: Arc<PluginMetrics>,
        config_path: Option<PathBuf>,
        base_dir: PathBuf,
        running: Config,
    ) -> Arc<Self> {
        let reloader = Arc::new(Self {
            runtime,
            metrics,
            config_path,
            base_dir,
            busy: Mutex::new(()),
            last: Mutex::new(None),
            running,
            restart_needed: Mutex::new(Vec::new()),
        });
        reloader.publish_info(&reloader.runtime.live.load());
        reloader
    }

    /// Reloads now; returns the new generation, or why the old set stays.
    pub(crate) fn reload(&self, trigger: &str) -> Result<u64, String> {
        let _one = self.busy.lock();
        let started = Instant::now();
        let result = self.try_reload();
        let took = started.elapsed();
        let generation = self.runtime.live.load().generation;
        let outcome = ReloadOutcome {
            trigger: trigger.to_owned(),
            ok: result.is_ok(),
            message: match &result {
                Ok(_) => "policy set swapped".into(),
                Err(e) => e.clone(),
            },
            generation,
            took_ms: took.as_secs_f64() * 1000.0,
            at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        self.metrics.reloaded(outcome.ok);
        match &result {
            Ok(g) => tracing::info!(
                trigger,
                generation = g,
                took_ms = outcome.took_ms,
                "policy set reloaded"
            ),
            Err(e) => {
                tracing::error!(trigger, error = %e, "reload refused; the previous policy set keeps running")
            }
        }
        *self.last.lock() = Some(outcome);
        // The trial instances and a refused set's compile leave free heap behind too.
        super::release_freed_heap();
        result
    }

    fn try_reload(&self) -> Result<u64, String> {
        let config = match &self.config_path {
            Some(path) => Config::load(path).map_err(|e| e.to_string())?,
            None => {
                return Err(
                    "tailgate runs on embedded defaults: there is no config file to reload".into(),
                );
            }
        };
        let restart_needed = config::keys_needing_restart(&self.running, &config);
        if !restart_needed.is_empty() {
            tracing::warn!(
                keys = ?restart_needed,
                "changed config keys take effect only after a restart"
            );
        }
        *self.restart_needed.lock() = restart_needed;
        let generation = self.runtime.live.load().generation + 1;
        let set = build_set(&self.runtime.engine, &config, &self.base_dir, generation)
            .map_err(|e| e.to_string())?;
        self.try_on_samples(&set)?;
        self.publish_info(&set);
        self.runtime.publish(set);
        Ok(generation)
    }

    /// Runs every policy of a candidate set on sample traces in a fresh instance: a policy
    /// that traps or times out on ordinary traces never goes live.
    fn try_on_samples(&self, set: &PolicySet) -> Result<(), String> {
        let samples = sample_traces();
        for policy in &set.policies {
            let mut inst = policy.instantiate(self.runtime.engine.engine())?;
            if policy.summary_only {
                // As the chain calls it for a batch: every sample in one call. A trace decided
                // alone goes through `decide`, tried below.
                let mut facts = Vec::new();
                for (n, spans) in samples.iter().enumerate() {
                    TraceIndex::new(spans).push_facts(&[n as u8 + 1; 16], spans, &mut facts);
                }
                if let Err(trap) = inst.decide_summaries(policy, &facts, CallClock::now()) {
                    return Err(format!(
                        "policy {:?} failed on the sample traces: {trap:#}",
                        policy.name
                    ));
                }
            }
            for (n, spans) in samples.iter().enumerate() {
                let trace_id = [n as u8 + 1; 16];
                let trace = TraceData {
                    trace_id,
                    index: TraceIndex::new(spans),
                    spans: spans.clone(),
                };
                let (result, _) = inst.decide(policy, Box::new(trace), CallClock::now());
                if let Err(trap) = result {
                    return Err(format!(
                        "policy {:?} failed on sample trace {n}: {trap:#}",
                        policy.name
                    ));
                }
            }
        }
        Ok(())
    }

    fn publish_info(&self, set: &PolicySet) {
        let policies: Vec<(&str, &str)> = (set.policies.iter())
            .map(|p| (&*p.name, p.sha256.as_str()))
            .collect();
        self.metrics.live_set(set.generation, &policies);
    }

    /// The live set and the last reload, as JSON for `GET /status`.
    pub(crate) fn status_json(&self) -> serde_json::Value {
        let set = self.runtime.live.load();
        let policies: Vec<serde_json::Value> = set
            .policies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": &*p.name,
                    "sha256": p.sha256,
                    "mode": format!("{:?}", p.spec.mode).to_lowercase(),
                    "drop_rule": p.spec.drop_rule,
                    "quarantined": p.health.is_quarantined(),
                })
            })
            .collect();
        serde_json::json!({
            "generation": set.generation,
            "default": set.default.to_string(),
            "policies": policies,
            "last_reload": *self.last.lock(),
            "restart_needed": *self.restart_needed.lock(),
        })
    }

    /// Files whose change triggers a reload: the config and every policy loaded by path.
    fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.config_path.iter().cloned().collect();
        for p in &self.runtime.live.load().policies {
            if let Some(path) = &p.spec.path {
                files.push(self.base_dir.join(path));
            }
        }
        files
    }

    /// Polls the watched files and reloads on a change. Stops when `stop` turns true.
    pub(crate) fn watch(
        self: &Arc<Self>,
        interval: Duration,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) {
        if interval.is_zero() || self.config_path.is_none() {
            return;
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tailgate-reload-watch".into())
            .spawn(move || {
                let mut seen = fingerprint(&this.watched_files());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let now = fingerprint(&this.watched_files());
                    if now != seen {
                        // A file still being written settles within one more interval.
                        std::thread::sleep(interval);
                        let _ = this.reload("file change");
                        seen = fingerprint(&this.watched_files());
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the plugin file watcher; use SIGHUP or POST /reload");
        }
    }
}

fn fingerprint(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// A few ordinary traces: a two-span request, an error, and an agent-shaped trace with
/// GenAI attributes.
pub(crate) fn sample_traces() -> Vec<Vec<BufferedSpan>> {
    let resource = opentelemetry_proto::tonic::resource::v1::Resource {
        attributes: vec![kv(
            "service.name",
            any_value::Value::StringValue("sample".into()),
        )],
        ..Default::default()
    };
    let mut fields = Vec::new();
    prost::encoding::message::encode(1, &resource, &mut fields);
    let header = Arc::new(ScopeHeader {
        resource: Arc::new(ResourceHeader {
            fields: fields.into_boxed_slice(),
            resource: resource.encode_to_vec().into_boxed_slice(),
            service: Arc::from("sample"),
        }),
        fields: Box::new([]),
    });
    let span = |id: u8, parent: u8, name: &str, error: bool, attrs: Vec<KeyValue>| {
        let s = Span {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: name.into(),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(id) * 10_000_000,
            attributes: attrs,
            status: error.then(|| Status {
                code: 2,
                message: "sample error".into(),
            }),
            ..Default::default()
        };
        BufferedSpan {
            bytes: s.encode_to_vec().into_boxed_slice(),
            scope: header.clone(),
            span_id: [id; 8],
            parent_span_id: if parent == 0 { [0; 8] } else { [parent; 8] },
            start_unix_nano: s.start_time_unix_nano,
            end_unix_nano: s.end_time_unix_nano,
            status_code: if error { 2 } else { 0 },
            kind: 2,
            has_trace_state: false,
        }
    };
    let int = any_value::Value::IntValue;
    let string = |s: &str| any_value::Value::StringValue(s.into());
    vec![
        vec![
            span(1, 0, "GET /", false, vec![]),
            span(2, 1, "db.query", false, vec![]),
        ],
        vec![
            span(1, 0, "POST /pay", true, vec![]),
            span(2, 1, "charge", true, vec![]),
        ],
        vec![
            span(
                1,
                0,
                "agent.run",
                false,
                vec![kv("tenant.id", string("t1"))],
            ),
            span(
                2,
                1,
                "retrieval",
                false,
                vec![kv(
                    "retrieval.top_score",
                    any_value::Value::DoubleValue(0.8),
                )],
            ),
            span(
                3,
                1,
                "llm.call",
                false,
                vec![
                    kv("gen_ai.request.model", string("gpt-4o")),
                    kv("gen_ai.usage.input_tokens", int(1200)),
                    kv("gen_ai.usage.output_tokens", int(300)),
                ],
            ),
        ],
    ]
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        key_strindex: 0,
    }
}

/// The directory relative paths in a config file are resolved against.
pub(crate) fn base_dir_of(config_path: Option<&Path>) -> PathBuf {
    config_path
        .and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Registry;

    /// A config file in a fresh folder, removed on drop.
    struct ConfigFile {
        dir: PathBuf,
        path: PathBuf,
    }

    impl ConfigFile {
        fn new(name: &str, text: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("tailgate-reload-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            let path = dir.join("tailgate.toml");
            let file = Self { dir, path };
            file.write(text);
            file
        }

        fn write(&self, text: &str) {
            std::fs::write(&self.path, text).expect("write the config");
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const ONE: &str = "[plugins]\ncache_dir = \"\"\n\n[[policies]]\nname = \"errors\"\nplugin = \"keep-errors\"\n";

    fn reloader(file: &ConfigFile) -> (Arc<Reloader>, Arc<Registry>) {
        let config = Config::load(&file.path).expect("config");
        let runtime = PolicyRuntime::start(&config, &file.dir).expect("policies load");
        let registry = Registry::new();
        let reloader = Reloader::new(
            runtime,
            PluginMetrics::new(&registry),
            Some(file.path.clone()),
            file.dir.clone(),
            config,
        );
        (reloader, registry)
    }

    fn status(reloader: &Reloader) -> serde_json::Value {
        reloader.status_json()
    }

    fn names(status: &serde_json::Value) -> Vec<String> {
        (status["policies"].as_array().expect("policies").iter())
            .map(|p| p["name"].as_str().expect("name").to_owned())
            .collect()
    }

    #[test]
    fn a_changed_file_swaps_the_set_and_a_bad_one_leaves_it_running() {
        let file = ConfigFile::new("swap", ONE);
        let (reloader, registry) = reloader(&file);
        let before = status(&reloader);
        assert_eq!(names(&before), ["errors"]);

        file.write(&format!(
            "{ONE}\n[[policies]]\nname = \"slow\"\nplugin = \"latency\"\n[policies.config]\nthreshold_ms = 500\n"
        ));
        let generation = reloader.reload("test").expect("the new set loads");
        let after = status(&reloader);
        assert!(generation > before["generation"].as_u64().expect("generation"));
        assert_eq!(names(&after), ["errors", "slow"]);
        assert_eq!(after["last_reload"]["ok"], true);

        // A policy that does not exist: refused, with the reason, and the set stays.
        file.write(&format!(
            "{ONE}\n[[policies]]\nname = \"ghost\"\nplugin = \"no-such-policy\"\n"
        ));
        let why = reloader.reload("test").expect_err("refused");
        assert!(why.contains("no-such-policy"), "{why}");
        let refused = status(&reloader);
        assert_eq!(
            names(&refused),
            ["errors", "slow"],
            "the old set keeps running"
        );
        assert_eq!(refused["generation"], after["generation"]);
        assert_eq!(refused["last_reload"]["ok"], false);

        let metrics = registry.render();
        assert!(
            metrics.contains("tailgate_reloads_total{outcome=\"ok\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tailgate_reloads_total{outcome=\"refused\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("policy=\"slow\""),
            "the live set is published: {metrics}"
        );
    }

    #[test]
    fn a_key_that_needs_a_restart_is_named_in_status() {
        let file = ConfigFile::new("restart", ONE);
        let (reloader, _) = reloader(&file);
        file.write(&format!("[buffer]\nroot_grace = \"5s\"\n\n{ONE}"));
        reloader
            .reload("test")
            .expect("policies unchanged, reload ok");
        let status = status(&reloader);
        let keys: Vec<&str> = (status["restart_needed"].as_array().expect("restart_needed"))
            .iter()
            .filter_map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["buffer.root_grace"]);
    }

    #[test]
    fn embedded_defaults_have_no_file_to_reload() {
        let config = Config::parse(ONE, "embedded").expect("config");
        let runtime = PolicyRuntime::start(&config, Path::new(".")).expect("policies load");
        let reloader = Reloader::new(
            runtime,
            PluginMetrics::new(&Registry::new()),
            None,
            PathBuf::from("."),
            config,
        );
        let why = reloader.reload("test").expect_err("nothing to reload");
        assert!(why.contains("embedded defaults"), "{why}");
    }
}
