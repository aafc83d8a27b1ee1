//! Policy plugins: WebAssembly components run by wasmtime, each in its own sandbox.
//!
//! Owns the engine (component model on, async off, pooling allocator, epoch interruption),
//! loading and checking components (imports, contract version, sha256 pins, the verified
//! compile cache of [`cache`]),
//! the per-call limits (memory, deadline, fuel, patch caps, log rate), and the live policy set
//! that hot swap replaces atomically. A policy never sees the host except through the
//! `tailgate:policy` world: no WASI, no files, no sockets. Must never import the receivers or
//! the exporter: it knows the trace model, the codec and the decision interface it implements.
//!
//! Files: [`index`] is the trace's index (pure data), [`boundary`] the host side of the WIT
//! interfaces, [`edits`] holding and checking a verdict's edits, [`chain`] the chain as a
//! decider, [`reload`] hot swap, [`counters`] the policies' own counters, [`cache`] the compile
//! cache.
//!
//! # The sandbox's invariants
//!
//! **Refused at load** (the old set keeps running on a reload): a component importing anything
//! but the `tailgate:policy` interfaces of a version in [`CONTRACT_VERSIONS`], one whose sha256
//! does not match its pin, one whose `init` returns an error, and one that fails a trial run
//! on sample traces.
//!
//! **Validated before use**, every value that comes back from a guest:
//! - span indexes, against the trace being decided: out of range traps the guest, never the
//!   host (as a Rust slice would);
//! - reason ids, against the instance's interned reasons: an unknown id fails the call;
//! - batch answers (`decide-summaries`): one code per trace, each naming a returned outcome;
//! - edits, all or nothing once the call returned normally: index in range, key not empty and
//!   at most 256 bytes, removals only of leaves, a `json` value that is an array or object,
//!   a probability in (0, 1].
//!
//! **Traps** (the call fails, `on_error` applies, the instance is rebuilt for the next trace):
//! a guest trap, a trace accessor called outside `decide`, an out-of-range index, the deadline
//! (`timeout`, epoch interruption), `fuel` running out, memory growth past `memory_limit`.
//! Repeated failures quarantine the policy for `quarantine_for`.
//!
//! **Capped**: linear memory (`memory_limit`), time per call (`timeout`, within one 5 ms epoch
//! tick), fuel, patches and their bytes per verdict (`max_patches`, `max_patch_bytes`),
//! removals (the trace's span count), interned reasons (1024 an instance, then ids per call),
//! reason and log texts (256 and 1024 bytes), log lines per second (`log_per_second`), counter
//! names, labels and series (`plugins.max_label_values`).

mod bindings;
mod boundary;
mod cache;
pub(crate) mod chain;
mod counters;
mod edits;
mod index;
mod json_value;
mod metrics;
pub(crate) mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder,
    UpdateDeadline,
};

use bindings::{Policy, PolicyPre};
use boundary::{PolicyMeta, PolicyState};
pub(crate) use counters::PolicyCounters;
pub(crate) use edits::fuzz as fuzz_edits;
pub use index::TraceIndex;
pub use metrics::PluginMetrics;

use crate::config::{Config as HostConfig, DefaultVerdict, PolicyConfig};

/// The WIT package versions this host implements. A component built against another
/// version is refused at load, naming the version it asked for.
pub(crate) const CONTRACT_PACKAGE: &str = tailgate_plugin_sdk::CONTRACT_PACKAGE;
pub(crate) const CONTRACT_VERSIONS: &[&str] = &[tailgate_plugin_sdk::CONTRACT_VERSION];

/// Epoch ticks drive call deadlines: a stuck call is stopped within its timeout plus one tick.
/// Each tick wakes a thread, which on a VM costs some 25 µs of CPU: at 1 ms that was 2.7% of a
/// core, idle or not, for a precision no policy needs against the 50 ms default timeout.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The bundled policies, compiled from `plugins/` by the build script and embedded.
mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));
}

/// Names of the policies built into this binary.
pub(crate) fn bundled_names() -> impl Iterator<Item = &'static str> {
    bundled::BUNDLED.iter().map(|(name, _)| *name)
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("policy {policy:?}: {message}")]
    Refused { policy: String, message: String },
    #[error("plugin engine: {0}")]
    Engine(String),
}

fn refused(policy: &str, message: impl std::fmt::Display) -> PluginError {
    PluginError::Refused {
        policy: policy.to_owned(),
        message: message.to_string(),
    }
}

/// How many instances the engine's pooling allocator holds. The pool is reserved (as virtual
/// address space) when the engine starts and never grows, so it is sized from the chain and
/// the worker count then: every worker's instance of every policy, twice over while a
/// reload's new set replaces the old one, plus the trial instances a load or reload runs. A
/// reload that would need more policies than it was sized for is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolSize {
    /// Policies a set may hold: twice the chain at start, and at least [`Self::MIN_POLICIES`].
    pub(crate) policies: usize,
    workers: usize,
}

impl PoolSize {
    /// Room for a small chain to grow by reloads without a restart.
    const MIN_POLICIES: usize = 16;
    /// Core instances per component: the guest module plus the shims `wasm-tools component
    /// new` adds, with room for toolchains that link several modules.
    const CORE_PER_COMPONENT: u32 = 4;

    pub(crate) fn new(policies: usize, workers: usize) -> Self {
        Self {
            policies: (2 * policies).max(Self::MIN_POLICIES),
            workers: workers.max(1),
        }
    }

    /// Component instances: (workers + trial runs) × policies × 2 (a reload's overlap).
    fn components(self) -> u32 {
        let n = (self.workers + 2) * self.policies * 2;
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// The wasmtime engine shared by every policy, and the thread that advances its epoch.
pub struct PluginEngine {
    pool: PoolSize,
    engine: Engine,
    linker: Linker<PolicyState>,
    cache: Option<cache::CompileCache>,
    counters: Arc<PolicyCounters>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// An engine for the benches and tools: a pool for a small chain on every CPU.
    pub fn new(
        cache_dir: Option<PathBuf>,
        max_label_values: usize,
    ) -> Result<Arc<Self>, PluginError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let labels = PolicyCounters::new(max_label_values, Duration::from_secs(60));
        Self::with_pool(cache_dir, labels, PoolSize::new(0, cpus))
    }

    pub(crate) fn with_pool(
        cache_dir: Option<PathBuf>,
        counters: PolicyCounters,
        size: PoolSize,
    ) -> Result<Arc<Self>, PluginError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(true);
        // `perf` names the policies' compiled functions through /tmp/perf-<pid>.map.
        if std::env::var_os("TAILGATE_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let mut pool = PoolingAllocationConfig::default();
        // Slots are virtual address space until used.
        let components = size.components();
        let cores = components.saturating_mul(PoolSize::CORE_PER_COMPONENT);
        pool.total_component_instances(components);
        pool.total_core_instances(cores);
        pool.total_memories(cores);
        pool.total_tables(cores);
        pool.max_memory_size(1 << 30);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| {
            PluginError::Engine(format!(
                "cannot reserve the Wasm instance pool ({components} component instances for up \
                 to {} policies on {} workers): {e:#}; lower buffer.workers or the number of \
                 policies",
                size.policies, size.workers
            ))
        })?;
        let mut linker = Linker::new(&engine);
        Policy::add_to_linker::<PolicyState, HasSelf<PolicyState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("tailgate-epoch".into())
            .spawn(move || {
                // Paced against the clock, not by sleeping a tick each round: sleep overshoots,
                // and deadlines are counted in ticks, so drift would stretch every deadline.
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    next += EPOCH_TICK;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch thread: {e}")))?;
        let cache = cache_dir.and_then(|dir| {
            cache::CompileCache::open(dir.clone(), &engine)
                .inspect_err(|reason| {
                    tracing::warn!(dir = %dir.display(), reason, "plugin compile cache disabled")
                })
                .ok()
        });
        Ok(Arc::new(Self {
            pool: size,
            engine,
            linker,
            cache,
            counters: Arc::new(counters),
            stop_ticker,
        }))
    }

    pub(crate) fn counters(&self) -> &Arc<PolicyCounters> {
        &self.counters
    }

    /// Compiles a component, or loads its compiled form from the cache.
    fn compile(&self, policy: &str, wasm: &[u8], sha: &str) -> Result<Component, PluginError> {
        if let Some(cache) = &self.cache {
            match cache.get(&self.engine, sha) {
                Ok(Some(component)) => return Ok(component),
                Ok(None) => {}
                Err(reason) => tracing::warn!(
                    policy,
                    reason,
                    "compile cache entry not used; compiling the policy afresh"
                ),
            }
        }
        let component = Component::new(&self.engine, wasm)
            .map_err(|e| refused(policy, format!("not a valid component: {e:#}")))?;
        if let Some(cache) = &self.cache {
            if let Err(reason) = cache.put(sha, &component) {
                tracing::warn!(policy, reason, "could not write the compile cache");
            } else if let Ok(Some(mapped)) = cache.get(&self.engine, sha) {
                // Run from the file just written, as a warm start does: its code is then
                // mapped from the page cache, not held in anonymous memory for the process's
                // life (tens of MiB for a pack).
                return Ok(mapped);
            }
        }
        Ok(component)
    }

    /// Checks that a component asks only for what the `policy` world offers, in a contract
    /// version this host speaks, before wasmtime's own type check.
    fn check_imports(&self, policy: &str, component: &Component) -> Result<(), PluginError> {
        let ty = component.component_type();
        for (name, item) in ty.imports(&self.engine) {
            // The world re-exports the contract's types (`use types.{trace, verdict}`); those
            // type imports carry no capability. Instances and functions do.
            if matches!(
                item.ty,
                wasmtime::component::types::ComponentItem::Type(_)
                    | wasmtime::component::types::ComponentItem::Resource(_)
            ) {
                continue;
            }
            let (package, version) = match name.split_once('@') {
                Some((iface, version)) => (iface.split('/').next().unwrap_or(iface), version),
                None => (name.split('/').next().unwrap_or(name), ""),
            };
            if package != CONTRACT_PACKAGE {
                return Err(refused(
                    policy,
                    format!(
                        "imports `{name}`, which the policy sandbox does not provide (only {CONTRACT_PACKAGE} interfaces are available)"
                    ),
                ));
            }
            if !CONTRACT_VERSIONS.contains(&version) {
                return Err(refused(
                    policy,
                    format!(
                        "was built for contract {CONTRACT_PACKAGE}@{version} (import `{name}`); this host accepts {}",
                        CONTRACT_VERSIONS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Loads, checks and `init`s one policy. Nothing here runs on the decision path.
    pub fn load(
        &self,
        spec: &PolicyConfig,
        base_dir: &Path,
    ) -> Result<Arc<LoadedPolicy>, PluginError> {
        let name = spec.name.as_str();
        let started = Instant::now();
        let wasm: std::borrow::Cow<'static, [u8]> = match (&spec.plugin, &spec.path) {
            (Some(plugin), _) => {
                let found = bundled::BUNDLED.iter().find(|(n, _)| n == plugin);
                match found {
                    Some((_, bytes)) => std::borrow::Cow::Borrowed(*bytes),
                    None => {
                        let known: Vec<&str> = bundled_names().collect();
                        return Err(refused(
                            name,
                            format!(
                                "no bundled plugin {plugin:?}; bundled: {}",
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            (None, Some(path)) => {
                let path = base_dir.join(path);
                std::fs::read(&path)
                    .map(std::borrow::Cow::Owned)
                    .map_err(|e| refused(name, format!("cannot read {}: {e}", path.display())))?
            }
            (None, None) => return Err(refused(name, "needs `plugin` or `path`")),
        };
        let sha = hex::encode(Sha256::digest(&wasm));
        if let Some(pin) = &spec.sha256
            && !pin.eq_ignore_ascii_case(&sha)
        {
            return Err(refused(
                name,
                format!("sha256 is {sha}, but the config pins {pin}"),
            ));
        }
        let component = self.compile(name, &wasm, &sha)?;
        self.check_imports(name, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| refused(name, format!("{e:#}")))?;
        let pre = PolicyPre::new(pre)
            .map_err(|e| refused(name, format!("does not export the policy world: {e:#}")))?;
        let config_json = serde_json::to_string(&spec.config).map_err(|e| refused(name, e))?;
        let mut policy = LoadedPolicy {
            spec: spec.clone(),
            name: Arc::from(name),
            sha256: sha,
            pre,
            config_json,
            meta: Arc::new(PolicyMeta {
                name: Arc::from(name),
                seed: spec.seed,
                log_per_second: spec.log_per_second,
                counters: self.counters.clone(),
                max_patches: spec.max_patches,
                max_patch_bytes: spec.max_patch_bytes.bytes(),
            }),
            health: PolicyHealth::default(),
            summary_only: false,
            load_time: Duration::ZERO,
        };
        // Refuse a policy whose init fails now, with the guest's message, rather than on the
        // first trace. Its capabilities are the first instance's.
        let first = policy
            .instantiate(&self.engine)
            .map_err(|e| refused(name, e))?;
        policy.summary_only = first.summary_only;
        policy.load_time = started.elapsed();
        Ok(Arc::new(policy))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Failure bookkeeping shared by every worker's instance of a policy.
#[derive(Default)]
pub(crate) struct PolicyHealth {
    consecutive_failures: AtomicU32,
    /// Unix ms until which the policy is skipped; 0 when it is not quarantined.
    quarantined_until_ms: AtomicU64,
    /// The host's own log lines about this policy (failed calls, rejected edits), limited
    /// across workers to the policy's `log_per_second`, as its own lines are.
    log_second: AtomicU64,
    logged_this_second: AtomicU32,
    logs_suppressed: AtomicU64,
    /// The most spans of a trace the policy has decided within its limits.
    largest_decided: AtomicU64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PolicyHealth {
    pub(crate) fn is_quarantined(&self) -> bool {
        // Read the clock only while a quarantine is set: this runs for every policy and trace.
        match self.quarantined_until_ms.load(Ordering::Relaxed) {
            0 => false,
            until => until > unix_ms(),
        }
    }

    /// A call returned normally, for a trace of `spans` spans (0: a batch, not learned from).
    fn succeeded(&self, spans: usize) {
        // Write only when there is something to change: every worker calls this on every
        // success, and an unconditional store would bounce the cache line between them.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        let spans = spans as u64;
        if spans > self.largest_decided.load(Ordering::Relaxed) {
            self.largest_decided.fetch_max(spans, Ordering::Relaxed);
        }
    }

    /// Whether a trace of `spans` spans is more than twice the largest this policy has
    /// decided within its limits: its timeout, fuel and memory cannot be expected to cover it,
    /// so failing on it does not count toward quarantine. Nothing is beyond before the policy
    /// has decided a trace.
    fn beyond_what_it_decided(&self, spans: usize) -> bool {
        let largest = self.largest_decided.load(Ordering::Relaxed);
        largest > 0 && spans as u64 > 2 * largest
    }

    /// Whether the host may log a line about this policy now. `Some(n)`: yes, and `n` lines
    /// were suppressed since the last one logged (hostile traffic can make every call fail;
    /// the failures are counted in metrics either way).
    pub(crate) fn may_log(&self, per_second: u32) -> Option<u64> {
        self.may_log_at(per_second, unix_ms() / 1000)
    }

    fn may_log_at(&self, per_second: u32, second: u64) -> Option<u64> {
        if self.log_second.load(Ordering::Relaxed) != second
            && self.log_second.swap(second, Ordering::Relaxed) != second
        {
            self.logged_this_second.store(0, Ordering::Relaxed);
        }
        if self.logged_this_second.fetch_add(1, Ordering::Relaxed) >= per_second.max(1) {
            self.logs_suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.logs_suppressed.swap(0, Ordering::Relaxed))
    }

    /// Returns true when this failure starts a quarantine.
    fn failed(&self, after: u32, for_: Duration) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= after.max(1) && !self.is_quarantined() {
            self.quarantined_until_ms
                .store(unix_ms() + for_.as_millis() as u64, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// A policy ready to run: compiled, type-checked, its `init` proven to succeed.
pub struct LoadedPolicy {
    pub(crate) spec: PolicyConfig,
    pub(crate) name: Arc<str>,
    pub(crate) sha256: String,
    pre: PolicyPre<PolicyState>,
    config_json: String,
    meta: Arc<PolicyMeta>,
    pub(crate) health: PolicyHealth,
    /// `init` declared the policy summary-only: a batch of traces is decided through one
    /// `decide-summaries` call; a trace decided alone still goes through `decide`.
    pub(crate) summary_only: bool,
    pub(crate) load_time: Duration,
}

/// One live instance of a policy, owned by one worker.
pub(crate) struct PolicyInstance {
    store: Store<PolicyState>,
    bindings: Policy,
    summary_only: bool,
}

impl LoadedPolicy {
    /// A fresh instance with its limits set and `init` called.
    pub(crate) fn instantiate(&self, engine: &Engine) -> Result<PolicyInstance, String> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.spec.memory_limit.bytes())
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(engine, PolicyState::new(self.meta.clone(), limits));
        store.limiter(|s| &mut s.limits);
        let timeout = self.spec.timeout.0;
        store.epoch_deadline_callback(move |ctx| {
            // The deadline is counted in epoch ticks of wall-clock time, which also run while
            // this thread is preempted. A guest that really used its budget of CPU is stopped
            // at once (so a runaway loop ends within its deadline plus one tick); a call that
            // was merely descheduled on a busy machine gets the rest of its CPU budget, up to
            // a hard wall-clock cap. Trapping it would throw away a stateful policy's state.
            let (wall, cpu) = ctx.data().call.elapsed();
            if cpu >= timeout || wall >= timeout.saturating_mul(PREEMPTED_WALL_FACTOR) {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(ticks(timeout - cpu)))
            }
        });
        store.set_epoch_deadline(self.deadline_ticks());
        store
            .set_fuel(self.spec.fuel.unwrap_or(u64::MAX))
            .map_err(|e| format!("{e:#}"))?;
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| format!("instantiation failed: {e:#}"))?;
        match bindings.call_init(&mut store, &self.config_json) {
            Ok(Ok(caps)) => Ok(PolicyInstance {
                store,
                bindings,
                summary_only: caps
                    .contains(bindings::tailgate::policy::types::Capabilities::SUMMARY_ONLY),
            }),
            Ok(Err(message)) => Err(format!("init refused its config: {message}")),
            Err(trap) => Err(format!("init trapped: {trap:#}")),
        }
    }
}

impl LoadedPolicy {
    /// The call deadline in epoch ticks.
    fn deadline_ticks(&self) -> u64 {
        ticks(self.spec.timeout.0)
    }
}

/// `d` in whole epoch ticks, at least one.
fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64
}

/// A preempted call may run this many timeouts of wall-clock time before it is stopped anyway.
const PREEMPTED_WALL_FACTOR: u32 = 10;

impl PolicyInstance {
    /// One `decide` call with this call's deadline, fuel and random stream. The trace moves
    /// into the store for the call and always comes back, whatever the guest did.
    fn decide(
        &mut self,
        policy: &LoadedPolicy,
        trace: Box<boundary::TraceData>,
        clock: boundary::CallClock,
    ) -> (wasmtime::Result<Answer>, Option<Box<boundary::TraceData>>) {
        self.store.set_epoch_deadline(policy.deadline_ticks());
        if let Some(fuel) = policy.spec.fuel {
            let _ = self.store.set_fuel(fuel);
        }
        let summary = trace.index.summary();
        let id = index::trace_id_words(&trace.trace_id);
        let state = self.store.data_mut();
        state.call = clock;
        state.seed_for(&trace.trace_id);
        state.reasons.new_call();
        state.trace = Some(trace);
        let result = self.bindings.call_decide(&mut self.store, summary, id);
        let state = self.store.data_mut();
        let back = state.trace.take();
        // The edits leave the store with the answer, so the next call starts with none.
        let edits = std::mem::take(&mut state.edits);
        let answer = result.and_then(|v| {
            Ok(Answer {
                decision: v.decision,
                reason: state.reasons.get(v.reason)?.clone(),
                probability: v.probability,
                edits,
            })
        });
        (answer, back)
    }

    /// One `decide-summaries` call over a batch: `facts` holds
    /// [`tailgate_plugin_sdk::FACT_WORDS`] words per trace. The answers are checked (one
    /// code per trace, each naming an outcome) before they are returned.
    fn decide_summaries(
        &mut self,
        policy: &LoadedPolicy,
        facts: &[u64],
        clock: boundary::CallClock,
    ) -> wasmtime::Result<BatchAnswer> {
        self.store.set_epoch_deadline(policy.deadline_ticks());
        if let Some(fuel) = policy.spec.fuel {
            let _ = self.store.set_fuel(fuel);
        }
        let state = self.store.data_mut();
        state.call = clock;
        // No per-trace stream here: the guest draws each trace's numbers itself (see the WIT
        // docs of `decide-summaries`); a stray `random` continues the seed's own stream.
        state.seed_for(&[0; 16]);
        state.reasons.new_call();
        let answer =
            self.bindings
                .call_decide_summaries(&mut self.store, policy.spec.seed, facts)?;
        let traces = facts.len() / tailgate_plugin_sdk::FACT_WORDS;
        if answer.codes.len() != traces {
            wasmtime::bail!(
                "decide-summaries answered {} codes for {traces} traces",
                answer.codes.len()
            );
        }
        if let Some(bad) = (answer.codes.iter()).find(|c| **c as usize >= answer.outcomes.len()) {
            wasmtime::bail!(
                "decide-summaries answered outcome {bad} of {}",
                answer.outcomes.len()
            );
        }
        let reasons = &self.store.data().reasons;
        let outcomes = (answer.outcomes.into_iter())
            .map(|o| {
                Ok(Answer {
                    decision: o.decision,
                    reason: reasons.get(o.reason)?.clone(),
                    probability: o.probability,
                    edits: edits::PendingEdits::default(),
                })
            })
            .collect::<wasmtime::Result<_>>()?;
        Ok(BatchAnswer {
            outcomes,
            codes: answer.codes,
        })
    }
}

/// A policy's answer for a trace, with its reason's text and the edits it asked for.
pub(crate) struct Answer {
    pub(crate) decision: bindings::tailgate::policy::types::Decision,
    pub(crate) reason: Arc<str>,
    pub(crate) probability: Option<f64>,
    pub(crate) edits: edits::PendingEdits,
}

/// A `decide-summaries` answer: its distinct answers (with no edits) and one index into them
/// per trace, both checked.
pub(crate) struct BatchAnswer {
    pub(crate) outcomes: Vec<Answer>,
    pub(crate) codes: Vec<u32>,
}

/// The policies live right now, in chain order, and what applies when they all abstain.
pub(crate) struct PolicySet {
    pub(crate) policies: Vec<Arc<LoadedPolicy>>,
    pub(crate) default: DefaultVerdict,
    /// Increases with every successful reload; workers rebuild instances when it changes.
    pub(crate) generation: u64,
}

/// The engine plus the swappable live set: what workers decide with and reloads replace.
pub struct PolicyRuntime {
    pub(crate) engine: Arc<PluginEngine>,
    pub(crate) live: ArcSwap<PolicySet>,
    /// The live set's generation, so a worker checks for a reload with one atomic load
    /// before it touches `live`. Set by [`PolicyRuntime::publish`] after the set.
    generation: AtomicU64,
}

impl PolicyRuntime {
    /// Loads every configured policy; any refusal is an error naming the policy and why.
    pub fn start(config: &HostConfig, base_dir: &Path) -> Result<Arc<Self>, PluginError> {
        // Like the exporter's path, the cache is relative to the working directory.
        let cache = (!config.plugins.cache_dir.as_os_str().is_empty())
            .then(|| config.plugins.cache_dir.clone());
        let pool = PoolSize::new(config.policies.len(), config.worker_count());
        let counters =
            PolicyCounters::new(config.plugins.max_label_values, config.plugins.label_ttl.0);
        let engine = PluginEngine::with_pool(cache, counters, pool)?;
        let set = build_set(&engine, config, base_dir, 1)?;
        release_freed_heap();
        Ok(Arc::new(Self {
            engine,
            generation: AtomicU64::new(set.generation),
            live: ArcSwap::from_pointee(set),
        }))
    }

    /// Makes `set` the live one.
    pub(crate) fn publish(&self, set: PolicySet) {
        let generation = set.generation;
        self.live.store(Arc::new(set));
        self.generation.store(generation, Ordering::Release);
    }

    /// The live set's generation (see [`PolicySet::generation`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Loads a whole policy set; the first refusal fails it.
pub(crate) fn build_set(
    engine: &PluginEngine,
    config: &HostConfig,
    base_dir: &Path,
    generation: u64,
) -> Result<PolicySet, PluginError> {
    if config.policies.len() > engine.pool.policies {
        return Err(PluginError::Engine(format!(
            "{} policies, but the Wasm instance pool was sized at start for {}; restart \
             tailgate to load this many",
            config.policies.len(),
            engine.pool.policies
        )));
    }
    let mut policies = Vec::with_capacity(config.policies.len());
    for spec in &config.policies {
        let policy = engine.load(spec, base_dir)?;
        tracing::info!(
            policy = %policy.name,
            sha256 = %policy.sha256,
            load_ms = policy.load_time.as_secs_f64() * 1000.0,
            "policy loaded"
        );
        policies.push(policy);
    }
    Ok(PolicySet {
        policies,
        default: config.decide.default,
        generation,
    })
}

/// Hands the heap that compiling left free back to the system; called once a policy set is
/// loaded (at start, and after a reload with its trial runs). Cranelift's working memory
/// (some 70 MiB for the agent pack on a cold cache) is freed when a compile ends, but glibc
/// keeps freed pages mapped, so without this a fresh process idles at four times the RSS of
/// one started on a warm cache.
pub(crate) fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heap to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::{PolicyHealth, PoolSize};

    #[test]
    fn the_instance_pool_grows_with_policies_and_workers() {
        // The agent pack (9 policies) on 2 workers: 18 policy slots, 4 instances of each, twice.
        assert_eq!(PoolSize::new(9, 2).components(), 18 * 4 * 2);
        // A small chain still has room to grow by reload.
        assert_eq!(PoolSize::new(1, 2).policies, PoolSize::MIN_POLICIES);
        // On a 64-CPU machine the fixed pool of 512 used to run out.
        assert!(PoolSize::new(9, 64).components() > 2_000);
    }

    #[test]
    fn a_pool_that_cannot_be_reserved_fails_the_start_naming_why() {
        let counters = super::PolicyCounters::new(10, std::time::Duration::from_secs(60));
        let err = super::PluginEngine::with_pool(None, counters, PoolSize::new(5_000, 100_000))
            .err()
            .expect("no machine reserves this much")
            .to_string();
        assert!(
            err.contains("instance pool") && err.contains("100000 workers"),
            "{err}"
        );
    }

    #[test]
    fn only_traces_well_past_the_largest_decided_are_beyond_a_policys_limits() {
        let health = PolicyHealth::default();
        assert!(
            !health.beyond_what_it_decided(1_000_000),
            "nothing learned yet"
        );
        health.succeeded(30);
        health.succeeded(0);
        health.succeeded(10);
        assert!(!health.beyond_what_it_decided(60));
        assert!(health.beyond_what_it_decided(61));
    }

    #[test]
    fn host_lines_about_a_policy_are_limited_per_second_and_say_what_was_suppressed() {
        let health = PolicyHealth::default();
        let first: Vec<_> = (0..10).map(|_| health.may_log_at(3, 100)).collect();
        assert_eq!(&first[..3], &[Some(0), Some(0), Some(0)]);
        assert!(first[3..].iter().all(Option::is_none), "{first:?}");
        // The next second's first line carries the count of those left out.
        assert_eq!(health.may_log_at(3, 101), Some(7));
        assert_eq!(health.may_log_at(3, 101), Some(0));
    }
}
